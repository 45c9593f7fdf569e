//! Trust on first use for the registry's key (as SSH's `known_hosts`).
//!
//! CURVE needs the server's public key before the handshake. The registry therefore also
//! answers on a plaintext **key endpoint** ([`KeyService`]): one action, `server_key`,
//! answered with its public key. A client that was not given the key asks there once, pins
//! the answer in a known-servers file, and from then on uses the pin. On every later start it
//! asks again: a different answer means the key changed (a reinstalled registry, or someone in
//! the middle), and the client refuses loudly until the pin is removed.
//!
//! # Format
//! The known-servers file is JSON: `{"tcp://host:5555": "Z85 public key", …}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::actor::{Actor, Pipe, Wake};
use crate::client::{ClientError, ClientOptions, ReqClient};
use crate::keys::PublicKey;
use crate::server::{bind_router, recv_batch, reply_frames, send_reply, Incoming};
use agora_proto::action::{call, KeyRequest};
use agora_proto::wire::{ServerKeyReply, ServerKeyRequest};

/// Trust failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The pinned key and the key the server now presents differ.
    #[error(
        "THE REGISTRY'S KEY HAS CHANGED for {endpoint}: pinned {pinned}, now presented {presented}. \
         Someone may be in the middle. If the change is expected, remove the pin: \
         user-cli forget-registry"
    )]
    Changed {
        /// The registry endpoint.
        endpoint: String,
        /// The key pinned before.
        pinned: PublicKey,
        /// The key the key endpoint presents now.
        presented: PublicKey,
    },
    /// No key given, none pinned, and the key endpoint did not answer.
    /// Its text leaves the cause to the error chain (`{:#}` prints it once).
    #[error("no key for the registry at {endpoint}: pass --registry-key, or reach its key endpoint {key_endpoint} once")]
    Unknown {
        /// The registry endpoint.
        endpoint: String,
        /// Where the key was asked for.
        key_endpoint: String,
        /// Why that failed.
        source: ClientError,
    },
    /// The known-servers file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O or JSON error.
        source: std::io::Error,
    },
}

/// How the registry key was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Given on the command line or in the environment.
    Given,
    /// Pinned earlier (and the key endpoint agrees, or did not answer).
    Pinned,
    /// Fetched from the key endpoint just now, and pinned.
    FirstUse,
}

/// The default key endpoint of a registry endpoint: the same host, the next port.
pub fn default_key_endpoint(endpoint: &str) -> Option<String> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("{host}:{}", port.checked_add(1)?))
}

fn read_known(path: &Path) -> Result<BTreeMap<String, PublicKey>, TrustError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TrustError::File {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(source) => Err(TrustError::File {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_known(path: &Path, known: &BTreeMap<String, PublicKey>) -> Result<(), TrustError> {
    let io = |source| TrustError::File {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec_pretty(known).map_err(|e| io(std::io::Error::other(e)))?;
    // Private like the state beside it (0600 in a 0700 directory).
    crate::fsmode::write_private(path, &json).map_err(io)
}

/// Asks a key endpoint for the server's key (plaintext, one attempt).
///
/// # Errors
/// [`ClientError`]: no answer within `timeout`, or a bad answer.
pub fn fetch_key(
    ctx: &zmq::Context,
    key_endpoint: &str,
    timeout: Duration,
) -> Result<PublicKey, ClientError> {
    let options = ClientOptions {
        timeout,
        attempts: 1,
    };
    let mut client = ReqClient::new(ctx, key_endpoint, options);
    Ok(client
        .call::<call::ServerKey>(&ServerKeyRequest {})?
        .public_key)
}

/// The registry's key: `given` if any; else the one pinned for `endpoint` in `known`
/// (checked against the key endpoint when it answers); else fetched and pinned.
///
/// # Errors
/// [`TrustError::Changed`] when the key endpoint presents another key than the pin;
/// [`TrustError::Unknown`] when there is nothing to go on; [`TrustError::File`].
pub fn registry_key(
    ctx: &zmq::Context,
    known: &Path,
    endpoint: &str,
    key_endpoint: &str,
    given: Option<PublicKey>,
    timeout: Duration,
) -> Result<(PublicKey, Trust), TrustError> {
    if let Some(key) = given {
        return Ok((key, Trust::Given));
    }
    match fetch_key(ctx, key_endpoint, timeout) {
        Ok(presented) => pin_presented(known, endpoint, presented),
        Err(source) => match read_known(known)?.get(endpoint) {
            Some(pinned) => Ok((*pinned, Trust::Pinned)),
            None => Err(TrustError::Unknown {
                endpoint: endpoint.to_owned(),
                key_endpoint: key_endpoint.to_owned(),
                source,
            }),
        },
    }
}

/// [`registry_key`] for a registry list ([`crate::client::registry_endpoints`]): each
/// endpoint in turn, with its own key endpoint (`key_endpoint` if given, else
/// [`default_key_endpoint`] of it), until one gives a key. The registries of a list share
/// one key pair, so any answer will do; each endpoint's pin is its own.
///
/// # Errors
/// The last endpoint's, as [`registry_key`]'s; [`TrustError::Changed`] at once.
pub fn registry_list_key(
    ctx: &zmq::Context,
    known: &Path,
    list: &str,
    key_endpoint: Option<&str>,
    given: Option<PublicKey>,
    timeout: Duration,
) -> Result<(PublicKey, Trust), TrustError> {
    let endpoints = crate::client::registry_endpoints(list);
    let mut last = None;
    for endpoint in &endpoints {
        let key_endpoint = key_endpoint
            .map(str::to_owned)
            .or_else(|| default_key_endpoint(endpoint))
            .unwrap_or_default();
        match registry_key(ctx, known, endpoint, &key_endpoint, given, timeout) {
            Ok(found) => return Ok(found),
            Err(e @ TrustError::Changed { .. }) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| TrustError::Unknown {
        endpoint: list.to_owned(),
        key_endpoint: key_endpoint.unwrap_or_default().to_owned(),
        source: ClientError::Timeout {
            endpoint: list.to_owned(),
            waited: Duration::ZERO,
        },
    }))
}

/// Checks a key `presented` for the registry at `endpoint` by a source that cannot prove
/// it (the key endpoint, a LAN beacon) against the pin in `known`: the pinned key is used;
/// with no pin, `presented` is pinned now ([`Trust::FirstUse`]).
///
/// # Errors
/// [`TrustError::Changed`] when a different key is pinned; [`TrustError::File`].
pub fn pin_presented(
    known: &Path,
    endpoint: &str,
    presented: PublicKey,
) -> Result<(PublicKey, Trust), TrustError> {
    let mut pins = read_known(known)?;
    match pins.get(endpoint).copied() {
        Some(pinned) if pinned != presented => Err(TrustError::Changed {
            endpoint: endpoint.to_owned(),
            pinned,
            presented,
        }),
        Some(pinned) => Ok((pinned, Trust::Pinned)),
        None => {
            pins.insert(endpoint.to_owned(), presented);
            write_known(known, &pins)?;
            Ok((presented, Trust::FirstUse))
        }
    }
}

/// Removes the pin for `endpoint`; returns whether there was one.
///
/// # Errors
/// [`TrustError::File`].
pub fn forget(known: &Path, endpoint: &str) -> Result<bool, TrustError> {
    let mut pins = read_known(known)?;
    let had = pins.remove(endpoint).is_some();
    if had {
        write_known(known, &pins)?;
    }
    Ok(had)
}

/// A server's plaintext key endpoint, on its own [`Actor`]; stops when dropped.
#[derive(Debug)]
pub struct KeyService {
    endpoint: String,
    _actor: Actor,
}

impl KeyService {
    /// Binds `bind` (NULL mechanism; port 0 for any) and answers `server_key` with `key`.
    /// Every other request gets `unknown_action`.
    ///
    /// # Errors
    /// libzmq's (`EADDRINUSE`…).
    pub fn start(ctx: &zmq::Context, bind: &str, key: PublicKey) -> Result<KeyService, zmq::Error> {
        KeyService::bind(ctx, bind)?.serve(ctx, key)
    }

    /// Binds `bind` without answering yet: a server binds its ports before it creates
    /// anything, and hands out its key ([`KeyListener::serve`]) only once the key is saved.
    /// Requests that arrive in between wait.
    ///
    /// # Errors
    /// libzmq's (`EADDRINUSE`…).
    pub fn bind(ctx: &zmq::Context, bind: &str) -> Result<KeyListener, zmq::Error> {
        let options = crate::server::RouterOptions {
            max_request_bytes: 4096,
            hwm: 100,
            heartbeat: None,
            curve: None,
        };
        let (socket, endpoint) = bind_router(ctx, bind, options)?;
        Ok(KeyListener { socket, endpoint })
    }

    /// The endpoint really bound.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// A bound key endpoint that does not answer yet ([`KeyService::bind`]).
pub struct KeyListener {
    socket: zmq::Socket,
    endpoint: String,
}

impl std::fmt::Debug for KeyListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyListener")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl KeyListener {
    /// The endpoint really bound.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Starts answering `server_key` with `key`, on an actor of its own.
    ///
    /// # Errors
    /// The actor's thread cannot start (`EMFILE`).
    pub fn serve(self, ctx: &zmq::Context, key: PublicKey) -> Result<KeyService, zmq::Error> {
        let KeyListener { socket, endpoint } = self;
        let actor = Actor::start(ctx, "key-endpoint", move |pipe| serve(&pipe, &socket, key))
            .map_err(|_| zmq::Error::EMFILE)?;
        Ok(KeyService {
            endpoint,
            _actor: actor,
        })
    }
}

fn serve(pipe: &Pipe, socket: &zmq::Socket, key: PublicKey) {
    let mut batch = Vec::new();
    loop {
        let mut items = [pipe.as_poll_item(), socket.as_poll_item(zmq::POLLIN)];
        match zmq::poll(&mut items, -1) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(_) => return,
        }
        if items[0].is_readable() && matches!(pipe.take(), Wake::Term) {
            return;
        }
        if !items[1].is_readable() {
            continue;
        }
        if recv_batch(socket, 64, &mut batch).is_err() {
            return;
        }
        for received in batch.drain(..) {
            let Ok(incoming) = Incoming::from_received(received) else {
                continue;
            };
            let reply = match incoming.request {
                Ok(KeyRequest::ServerKey(_)) => {
                    reply_frames(Ok(ServerKeyReply { public_key: key }))
                }
                Err(e) => reply_frames::<()>(Err(e.to_wire())),
            };
            if send_reply(socket, incoming.envelope, reply).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review of issue 23: a new registry handed out its key before saving it. A bound key
    /// endpoint answers nothing until it is served, and then the key it is given.
    #[test]
    fn a_bound_key_endpoint_answers_only_once_served() {
        let ctx = zmq::Context::new();
        let listener = KeyService::bind(&ctx, "tcp://127.0.0.1:0").expect("bind");
        let endpoint = listener.endpoint().to_owned();
        let early = fetch_key(&ctx, &endpoint, Duration::from_millis(300));
        assert!(
            matches!(early, Err(ClientError::Timeout { .. })),
            "{early:?}"
        );
        let key = crate::keys::Keypair::generate().expect("keys").public;
        let _service = listener.serve(&ctx, key).expect("serve");
        let served = fetch_key(&ctx, &endpoint, Duration::from_secs(5)).expect("answered");
        assert_eq!(served, key);
    }

    #[test]
    fn first_use_pins_then_a_changed_key_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let known = dir.path().join("known_servers.json");
        let ctx = zmq::Context::new();
        let first = crate::keys::Keypair::generate().expect("keys").public;
        let service = KeyService::start(&ctx, "tcp://127.0.0.1:0", first).expect("bind");
        let wait = Duration::from_secs(5);
        let reg = "tcp://127.0.0.1:5555";
        let (key, how) =
            registry_key(&ctx, &known, reg, service.endpoint(), None, wait).expect("first use");
        assert_eq!((key, how), (first, Trust::FirstUse));
        let (key, how) =
            registry_key(&ctx, &known, reg, service.endpoint(), None, wait).expect("pinned");
        assert_eq!((key, how), (first, Trust::Pinned));
        drop(service);

        let second = crate::keys::Keypair::generate().expect("keys").public;
        let service = KeyService::start(&ctx, "tcp://127.0.0.1:0", second).expect("bind");
        let changed = registry_key(&ctx, &known, reg, service.endpoint(), None, wait);
        assert!(
            matches!(changed, Err(TrustError::Changed { pinned, presented, .. }) if pinned == first && presented == second)
        );
        // A given key wins; forgetting the pin allows a new first use.
        let (key, how) =
            registry_key(&ctx, &known, reg, service.endpoint(), Some(second), wait).expect("given");
        assert_eq!((key, how), (second, Trust::Given));
        assert!(forget(&known, reg).expect("forget"));
        let (key, how) =
            registry_key(&ctx, &known, reg, service.endpoint(), None, wait).expect("again");
        assert_eq!((key, how), (second, Trust::FirstUse));
    }

    #[test]
    fn the_default_key_endpoint_is_the_next_port() {
        assert_eq!(
            default_key_endpoint("tcp://10.0.0.1:5555").as_deref(),
            Some("tcp://10.0.0.1:5556")
        );
        assert_eq!(default_key_endpoint("tcp://h:65535"), None);
    }
}
