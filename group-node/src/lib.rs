//! The Agora group node: one process per group.
//!
//! A ROUTER socket serves membership (`join`, `leave`, `members`), the durable sequenced log
//! (`send`) and history (`get_messages`), as `docs/PROTOCOL.md` specifies. The node registers
//! with the registry and heartbeats on its own thread ([`heartbeat`]).
//!
//! # Group commit
//! The socket thread takes every request waiting (up to [`MAX_BATCH`]), handles them all in
//! one store transaction, commits once, and only then sends the replies. Under load one fsync
//! covers many sends; no ack leaves before its message is on disk.
//!
//! # Layout
//! - [`Node`]: bind ([`Node::bind`]) and serve ([`Node::run`]).
//! - `cmd/`: one handler per action; [`identity`]: who the caller is.
//! - [`subscribers`]: the live stream: leases and the push after each commit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_common::client::{max_request_bytes, ClientCurve};
use agora_common::codec::Frames;
use agora_common::keys::{KeyError, Keypair, PublicKey};
use agora_common::proto::{
    Endpoint, ErrorCode, GroupName, Request, WireError, DEFAULT_MAX_MESSAGE_BYTES,
};
use agora_common::ratelimit::{Limiter, RateLimit};
use agora_common::server::{
    bind_router, rate_limit, recv_batch_wait, reply_frames, send_reply, Incoming, Peer,
    RouterOptions,
};
use agora_common::shutdown::{Shutdown, SHUTDOWN_POLL};
use agora_common::store::{GroupStore, Retention, SqliteStore, StoreError};
use agora_common::time::Timestamp;
use agora_common::zap::{Authenticator, ZapPolicy};

mod cmd;
pub mod heartbeat;
pub mod identity;
pub mod subscribers;

use subscribers::Subscribers;

/// Most requests handled in one batch (one transaction, one fsync).
pub const MAX_BATCH: usize = 512;

/// Group node settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The group's name.
    pub name: GroupName,
    /// Where to bind the ROUTER, `tcp://IP:PORT` (port 0 picks a free port).
    pub bind: String,
    /// The endpoint registered for members to connect to. Default: the bound endpoint, with
    /// a wildcard address (`0.0.0.0`, `[::]`) replaced by loopback.
    pub advertise: Option<Endpoint>,
    /// The registry's endpoint; `None` runs without registering.
    pub registry: Option<String>,
    /// The directory holding `group.sqlite3`.
    pub data_dir: PathBuf,
    /// Largest message body, in bytes of JSON text (default 1 MiB).
    pub max_message_bytes: usize,
    /// What to delete from the log (default: nothing).
    pub retention: Retention,
    /// How often to heartbeat the registry (default 2 s).
    pub heartbeat: Duration,
    /// Most members (default 100,000).
    pub max_members: u64,
    /// How long a subscription lives without renewal (default 5 s).
    pub lease: Duration,
    /// Most subscriptions (default 10,000).
    pub max_subscribers: usize,
    /// Most live connections (subscriptions) per member (default 16).
    pub max_subscriptions_per_member: usize,
    /// Messages queued per peer before pushes to it are dropped (`ZMQ_SNDHWM`, default 1000).
    pub sndhwm: i32,
    /// Test-only fault injection: drop every Nth push (default 0, never).
    pub fault_drop_push_every: u64,
    /// Serve without CURVE. Refused unless every endpoint (bind, advertised, registry) is
    /// loopback.
    pub insecure: bool,
    /// The registry's CURVE public key; required with a registry unless `insecure`.
    pub registry_key: Option<PublicKey>,
    /// Requests per second per peer (default 2,000, bursts of 4,000; rate 0 disables).
    pub rate_limit: RateLimit,
    /// The group owner's key; default the node's own key (the operator).
    pub owner: Option<PublicKey>,
    /// Make the group private at start (it stays so until `set_mode`).
    pub private: bool,
}

impl Config {
    /// A config with defaults for everything but the name, bind endpoint and data dir.
    pub fn new(name: GroupName, bind: impl Into<String>, data_dir: PathBuf) -> Config {
        Config {
            name,
            bind: bind.into(),
            advertise: None,
            registry: None,
            data_dir,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            retention: Retention::default(),
            heartbeat: Duration::from_secs(2),
            max_members: 100_000,
            lease: Duration::from_secs(5),
            max_subscribers: 10_000,
            max_subscriptions_per_member: 16,
            sndhwm: 1000,
            fault_drop_push_every: 0,
            insecure: false,
            registry_key: None,
            rate_limit: RateLimit::default(),
            owner: None,
            private: false,
        }
    }
}

/// Node failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The ROUTER could not be bound.
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        /// The endpoint asked for.
        endpoint: String,
        /// libzmq's error.
        source: zmq::Error,
    },
    /// The bound endpoint cannot be advertised; pass an explicit one.
    #[error("cannot advertise {0}; give --advertise tcp://HOST:PORT")]
    Advertise(String),
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// libzmq failed while serving.
    #[error("zmq: {0}")]
    Zmq(#[from] zmq::Error),
    /// The heartbeat thread could not start.
    #[error("heartbeat thread: {0}")]
    Thread(std::io::Error),
    /// The key pair could not be loaded or made, or this libzmq has no CURVE.
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    /// `--insecure` with an endpoint that is not loopback.
    #[error("--insecure is allowed only on loopback endpoints, not {0}")]
    InsecureNotLoopback(String),
    /// A registry is configured but not its key.
    #[error("the registry's public key is needed: pass --registry-key (the registry prints it at start)")]
    NoRegistryKey,
}

/// A bound group node, ready to [`run`](Node::run).
pub struct Node {
    ctx: zmq::Context,
    config: Config,
    socket: zmq::Socket,
    endpoint: Endpoint,
    store: SqliteStore,
    subscribers: Subscribers,
    keys: Option<Keypair>,
    owner: Option<PublicKey>,
    limiter: Limiter<Peer>,
    _zap: Option<Authenticator>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("group", &self.config.name)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Replaces a wildcard bind address with loopback, for advertising.
fn advertisable(bound: &str) -> Result<Endpoint, NodeError> {
    let fixed = bound
        .replacen("tcp://0.0.0.0:", "tcp://127.0.0.1:", 1)
        .replacen("tcp://[::]:", "tcp://[::1]:", 1);
    if fixed != bound {
        tracing::warn!(%bound, advertised = %fixed, "bound to a wildcard address; advertising loopback (use --advertise)");
    }
    Endpoint::new(fixed).map_err(|_| NodeError::Advertise(bound.to_owned()))
}

impl Node {
    /// Opens the store and binds the ROUTER.
    ///
    /// # Errors
    /// [`NodeError::DataDir`], [`NodeError::Store`] (including a data dir of another
    /// group), [`NodeError::Bind`], [`NodeError::Advertise`].
    pub fn bind(ctx: &zmq::Context, config: Config) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let store = SqliteStore::open(&config.data_dir.join("group.sqlite3"), &config.name)?;
        let (keys, zap) = if config.insecure {
            let endpoints = [Some(config.bind.as_str()), config.registry.as_deref()];
            let advertised = config.advertise.as_ref().map(Endpoint::as_str);
            for e in endpoints.into_iter().chain([advertised]).flatten() {
                if !agora_common::proto::is_loopback(e) {
                    return Err(NodeError::InsecureNotLoopback(e.to_owned()));
                }
            }
            tracing::warn!("running WITHOUT encryption or authentication (--insecure)");
            (None, None)
        } else {
            agora_common::keys::require_curve()?;
            if config.registry.is_some() && config.registry_key.is_none() {
                return Err(NodeError::NoRegistryKey);
            }
            let (keys, created) = Keypair::load_or_generate(&config.data_dir.join("node.key"))?;
            if created {
                tracing::info!(public_key = %keys.public, "made a new node key pair");
            }
            (
                Some(keys),
                Some(Authenticator::start(ctx, ZapPolicy::default())?),
            )
        };
        let options = RouterOptions {
            max_request_bytes: max_request_bytes(config.max_message_bytes),
            hwm: config.sndhwm,
            heartbeat: Some(Duration::from_secs(1)),
            curve: keys.clone(),
        };
        let (socket, bound) =
            bind_router(ctx, &config.bind, options).map_err(|source| NodeError::Bind {
                endpoint: config.bind.clone(),
                source,
            })?;
        let endpoint = match &config.advertise {
            Some(e) => e.clone(),
            None => advertisable(&bound)?,
        };
        let subscribers = Subscribers::new(
            config.lease,
            config.max_subscribers,
            config.max_subscriptions_per_member,
            config.fault_drop_push_every,
        );
        let limiter = Limiter::new(config.rate_limit);
        let owner = match &keys {
            Some(k) => Some(config.owner.unwrap_or(k.public)),
            None => None,
        };
        let mut store = store;
        if config.private {
            store.begin()?;
            store.set_mode(agora_common::proto::GroupMode::Private)?;
            store.commit()?;
        }
        Ok(Node {
            ctx: ctx.clone(),
            config,
            socket,
            endpoint,
            store,
            subscribers,
            keys,
            owner,
            limiter,
            _zap: zap,
        })
    }

    /// The node's CURVE public key (`None` with `--insecure`): members connect with it, and
    /// it is published in the registry listing.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.keys.as_ref().map(|k| k.public)
    }

    /// The endpoint members connect to (and that is registered).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Serves until `shutdown` is triggered, then unregisters.
    ///
    /// # Errors
    /// [`NodeError::Zmq`] if the socket fails, [`NodeError::Thread`]. Bad requests and
    /// storage failures are answered and never end the loop.
    pub fn run(mut self, shutdown: &Shutdown) -> Result<(), NodeError> {
        let members = Arc::new(AtomicU64::new(self.store.member_count()));
        let _heartbeat = match &self.config.registry {
            Some(registry) => Some(
                heartbeat::Heartbeat::start(
                    &self.ctx,
                    registry.clone(),
                    self.keys
                        .clone()
                        .zip(self.config.registry_key)
                        .map(|(keypair, server_key)| ClientCurve {
                            keypair,
                            server_key,
                        }),
                    self.config.name.clone(),
                    self.endpoint.clone(),
                    self.config.heartbeat,
                    Arc::clone(&members),
                )
                .map_err(NodeError::Thread)?,
            ),
            None => None,
        };
        tracing::info!(group = %self.config.name, endpoint = %self.endpoint,
            last_seq = self.store.last_seq(), "group node serving");
        let poll_ms = i32::try_from(SHUTDOWN_POLL.as_millis()).unwrap_or(100);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut next_age_sweep = Instant::now();
        let mut next_lease_sweep = Instant::now();
        while !shutdown.is_triggered() {
            recv_batch_wait(&self.socket, MAX_BATCH, &mut batch, poll_ms)?;
            if !batch.is_empty() {
                self.serve_batch(&mut batch)?;
                members.store(self.store.member_count(), Ordering::Relaxed);
            }
            if Instant::now() >= next_lease_sweep {
                let expired = self.subscribers.expire(Instant::now());
                if expired > 0 {
                    tracing::debug!(expired, "subscriptions expired");
                }
                next_lease_sweep = Instant::now() + Duration::from_millis(500);
            }
            if self.config.retention.max_age.is_some() && Instant::now() >= next_age_sweep {
                self.sweep_retention();
                next_age_sweep = Instant::now() + Duration::from_secs(1);
            }
        }
        tracing::info!(group = %self.config.name, "group node stopping");
        Ok(())
    }

    fn sweep_retention(&mut self) {
        let policy = self.config.retention;
        let result = self.store.begin().and_then(|()| {
            let n = self.store.apply_retention(policy, Timestamp::now())?;
            self.store.commit()?;
            Ok(n)
        });
        match result {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "retention"),
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
    }

    /// Handles a batch in one transaction; replies only after the commit.
    fn serve_batch(
        &mut self,
        batch: &mut Vec<agora_common::server::Received>,
    ) -> Result<(), NodeError> {
        let now = Timestamp::now();
        let instant = Instant::now();
        let mut appended = Vec::new();
        let mut replies: Vec<(Frames, Frames)> = Vec::with_capacity(batch.len());
        if let Err(e) = self.store.begin() {
            tracing::error!(error = %e, "cannot start a transaction");
            let internal = WireError::new(ErrorCode::Internal, "storage failure; retry later");
            for frames in batch.drain(..) {
                if let Ok(incoming) = Incoming::from_received(frames) {
                    replies.push((incoming.envelope, reply_frames::<()>(Err(internal.clone()))));
                }
            }
            return self.send_all(replies);
        }
        for frames in batch.drain(..) {
            let incoming = match Incoming::from_received(frames) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(error = %e, "dropped unanswerable message");
                    continue;
                }
            };
            let limited = rate_limit(&mut self.limiter, &incoming, instant);
            let reply = match incoming.request {
                _ if limited.is_some() => limited.unwrap_or_default(),
                Ok(request) => self.dispatch(
                    request,
                    &incoming.envelope,
                    incoming.peer,
                    now,
                    instant,
                    &mut appended,
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "rejected request");
                    reply_frames::<()>(Err(e.to_wire()))
                }
            };
            replies.push((incoming.envelope, reply));
        }
        let retention = self.config.retention;
        let committed = (|| {
            if retention.max_messages.is_some() {
                self.store.apply_retention(
                    Retention {
                        max_age: None,
                        ..retention
                    },
                    now,
                )?;
            }
            self.store.commit()
        })();
        if let Err(e) = committed {
            // Nothing of this batch is stored: no reply may claim otherwise.
            tracing::error!(error = %e, "commit failed; batch rolled back");
            let internal = WireError::new(ErrorCode::Internal, "storage failure; retry later");
            for (_, reply) in &mut replies {
                *reply = reply_frames::<()>(Err(internal.clone()));
            }
            appended.clear();
        }
        self.send_all(replies)?;
        let stats = self
            .subscribers
            .push(&self.socket, &self.config.name, &appended)?;
        if stats.dropped > 0 || stats.gone > 0 {
            tracing::debug!(
                sent = stats.sent,
                dropped = stats.dropped,
                gone = stats.gone,
                "push round"
            );
        }
        Ok(())
    }

    fn send_all(&self, replies: Vec<(Frames, Frames)>) -> Result<(), NodeError> {
        for (envelope, reply) in replies {
            send_reply(&self.socket, envelope, reply)?;
        }
        Ok(())
    }

    fn dispatch(
        &mut self,
        request: Request,
        envelope: &Frames,
        peer: Option<PublicKey>,
        now: Timestamp,
        instant: Instant,
        appended: &mut Vec<agora_common::proto::Message>,
    ) -> Frames {
        let mut ctx = cmd::Ctx {
            store: &mut self.store,
            config: &self.config,
            now,
            instant,
            envelope,
            subscribers: &mut self.subscribers,
            appended,
            peer,
            owner: self.owner,
        };
        match request {
            Request::Info(r) => reply_frames(cmd::info::apply(&mut ctx, r)),
            Request::Join(r) => reply_frames(cmd::join::apply(&mut ctx, r)),
            Request::Leave(r) => reply_frames(cmd::leave::apply(&mut ctx, r)),
            Request::Members(r) => reply_frames(cmd::members::apply(&mut ctx, r)),
            Request::Send(r) => reply_frames(cmd::send::apply(&mut ctx, r)),
            Request::GetMessages(r) => reply_frames(cmd::get_messages::apply(&mut ctx, r)),
            Request::Subscribe(r) => reply_frames(cmd::subscribe::apply(&mut ctx, r)),
            Request::Unsubscribe(r) => reply_frames(cmd::unsubscribe::apply(&mut ctx, r)),
            Request::Invite(r) => reply_frames(cmd::policy::invite(&mut ctx, r)),
            Request::Kick(r) => reply_frames(cmd::policy::kick(&mut ctx, r)),
            Request::Ban(r) => reply_frames(cmd::policy::ban(&mut ctx, r)),
            Request::Unban(r) => reply_frames(cmd::policy::unban(&mut ctx, r)),
            Request::Promote(r) => reply_frames(cmd::policy::promote(&mut ctx, r)),
            Request::SetMode(r) => reply_frames(cmd::policy::set_mode(&mut ctx, r)),
            other => reply_frames::<()>(Err(WireError::new(
                ErrorCode::UnknownAction,
                format!(
                    "{} is a registry action, not a group-node action",
                    other.action()
                ),
            ))),
        }
    }
}

/// The default data directory of `group`: the user's data directory
/// (`$XDG_DATA_HOME/agora`, usually `~/.local/share/agora`), then `groups/`, then the group
/// name with every byte outside `[A-Za-z0-9_-]` percent-encoded, so that any name is one
/// safe path component.
pub fn default_data_dir(group: &GroupName) -> Option<PathBuf> {
    let base = directories::ProjectDirs::from("", "", "agora")?;
    Some(base.data_dir().join("groups").join(path_component(group)))
}

fn path_component(group: &GroupName) -> String {
    let mut out = String::new();
    for b in group.as_str().bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_become_safe_path_components() {
        let g = |s: &str| GroupName::new(s).expect("name");
        assert_eq!(path_component(&g("Cool Group")), "Cool%20Group");
        assert_eq!(path_component(&g("../etc")), "%2E%2E%2Fetc");
        assert_eq!(path_component(&g("..")), "%2E%2E");
    }

    #[test]
    fn wildcard_binds_advertise_loopback() {
        assert_eq!(
            advertisable("tcp://0.0.0.0:5000").expect("ok").as_str(),
            "tcp://127.0.0.1:5000"
        );
        assert_eq!(
            advertisable("tcp://10.1.2.3:5000").expect("ok").as_str(),
            "tcp://10.1.2.3:5000"
        );
    }
}
