//! LAN discovery of registries, in the zguide's and CZMQ's `zbeacon` pattern: a registry
//! started with `--beacon` sends a [`Beacon`] datagram every second to a broadcast address;
//! a client asked for `--registry auto` listens on the beacon port for a bounded time and
//! uses the registry it hears (PROTOCOL §10).
//!
//! Nothing here broadcasts unless asked: [`Beaconer::start`] takes the broadcast address
//! explicitly, and tests use the loopback broadcast address `127.255.255.255` only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agora_proto::beacon::{Beacon, MAX_BEACON_BYTES};

/// Sends a beacon every interval from its own thread; stops when dropped.
#[derive(Debug)]
pub struct Beaconer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Beaconer {
    /// Sends `beacon` to `to` (a broadcast address and the beacon port) now and then every
    /// `interval` (1 s by convention), with `SO_BROADCAST` set. A failed send is logged and
    /// retried at the next interval.
    ///
    /// # Errors
    /// Creating or configuring the UDP socket, or spawning the thread.
    pub fn start(
        beacon: &Beacon,
        to: SocketAddrV4,
        interval: Duration,
    ) -> std::io::Result<Beaconer> {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_broadcast(true)?;
        let datagram = beacon.encode();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("beacon".into())
            .spawn(move || loop {
                if let Err(e) = socket.send_to(&datagram, to) {
                    tracing::warn!(error = %e, %to, "could not send the beacon");
                }
                match stopped.recv_timeout(interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            })?;
        Ok(Beaconer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Beaconer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A registry heard: its beacon (the endpoint's host filled in) and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    /// What it announced.
    pub beacon: Beacon,
    /// The datagram's source address.
    pub from: SocketAddr,
}

/// Listens on UDP `port` (all IPv4 addresses, shared with other listeners by `SO_REUSEADDR`
/// and `SO_REUSEPORT`) for `wait`, and returns the registries heard, each once (by name,
/// endpoint and key), sorted by name. Datagrams that are not beacons of this version are
/// ignored (logged at debug).
///
/// # Errors
/// Creating or binding the socket.
pub fn listen(port: u16, wait: Duration) -> std::io::Result<Vec<Heard>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    let socket: UdpSocket = socket.into();
    let deadline = Instant::now() + wait;
    let mut heard: Vec<Heard> = Vec::new();
    let mut buf = [0u8; MAX_BEACON_BYTES + 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left))?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        match Beacon::decode(&buf[..n], from.ip()) {
            Ok(beacon) => {
                let seen = heard.iter().any(|h| {
                    h.beacon.name == beacon.name
                        && h.beacon.endpoint == beacon.endpoint
                        && h.beacon.key == beacon.key
                });
                if !seen {
                    heard.push(Heard { beacon, from });
                }
            }
            Err(e) => tracing::debug!(%from, error = %e, "ignored a datagram on the beacon port"),
        }
    }
    heard.sort_by(|a, b| {
        (&a.beacon.name, &a.beacon.endpoint).cmp(&(&b.beacon.name, &b.beacon.endpoint))
    });
    Ok(heard)
}

/// Why no one registry was chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoverError {
    /// Nothing heard.
    #[error(
        "no registry heard on UDP port {port} within {}: start one with --beacon \
         (on this LAN), or pass --registry ENDPOINT",
        crate::human_duration(*wait)
    )]
    NoneHeard {
        /// The beacon port.
        port: u16,
        /// How long it listened.
        wait: Duration,
    },
    /// Several heard and none named.
    #[error("several registries heard: {}; pick one with --registry-name", list(.0))]
    Several(Vec<Beacon>),
    /// None of those heard has the name asked for.
    #[error("no registry named {name:?} heard; heard: {}", list(.heard))]
    NoneNamed {
        /// The name asked for.
        name: String,
        /// What was heard.
        heard: Vec<Beacon>,
    },
}

fn list(beacons: &[Beacon]) -> String {
    if beacons.is_empty() {
        return "none".into();
    }
    beacons
        .iter()
        .map(|b| format!("{} at {}", b.name, b.endpoint))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one registry to use among `heard`: the one named `name` if given, else the only
/// one.
///
/// # Errors
/// [`DiscoverError`]: none heard (`port` and `wait` say where and how long), several and no
/// name, or none of that name.
pub fn choose(
    heard: &[Heard],
    name: Option<&str>,
    port: u16,
    wait: Duration,
) -> Result<Beacon, DiscoverError> {
    let beacons: Vec<Beacon> = heard.iter().map(|h| h.beacon.clone()).collect();
    let named: Vec<&Beacon> = match name {
        Some(n) => beacons.iter().filter(|b| b.name == n).collect(),
        None => beacons.iter().collect(),
    };
    match (named.as_slice(), name) {
        ([one], _) => Ok((*one).clone()),
        ([], None) => Err(DiscoverError::NoneHeard { port, wait }),
        ([], Some(n)) => Err(DiscoverError::NoneNamed {
            name: n.to_owned(),
            heard: beacons,
        }),
        (several, _) => Err(DiscoverError::Several(
            several.iter().map(|b| (*b).clone()).collect(),
        )),
    }
}

/// The key to use for the registry `chosen` by beacon: `given` if any (an explicit
/// `--registry-key` always wins); none when `insecure`; else the key it announced, checked
/// against the pin for its endpoint in the known-servers file `known` and pinned there on
/// first use ([`crate::trust::pin_presented`]: the same warning and the same refusal as for
/// the key endpoint).
///
/// # Errors
/// [`HeardKeyError::NoKey`] for a registry that announces none (an `--insecure` one) when
/// CURVE is wanted; [`HeardKeyError::Trust`] when another key is pinned, or the file fails.
pub fn heard_key(
    chosen: &Beacon,
    known: &std::path::Path,
    given: Option<crate::keys::PublicKey>,
    insecure: bool,
) -> Result<Option<(crate::keys::PublicKey, crate::trust::Trust)>, HeardKeyError> {
    if let Some(key) = given {
        return Ok(Some((key, crate::trust::Trust::Given)));
    }
    if insecure {
        return Ok(None);
    }
    let key = chosen.key.ok_or_else(|| HeardKeyError::NoKey {
        name: chosen.name.clone(),
        endpoint: chosen.endpoint.clone(),
    })?;
    Ok(Some(crate::trust::pin_presented(
        known,
        &chosen.endpoint,
        key,
    )?))
}

/// `--registry auto` for a server or a bot: listens on `port` for `wait`, chooses the
/// registry named `name` (or the only one heard), and returns its beacon with the key to use
/// ([`heard_key`]: `given`, none when `insecure`, else the announced one, pinned in `known`
/// on first use, which is logged as a warning).
///
/// # Errors
/// [`AutoError`]: the socket, [`DiscoverError`], or [`HeardKeyError`].
pub fn auto(
    port: u16,
    wait: Duration,
    name: Option<&str>,
    known: &std::path::Path,
    given: Option<crate::keys::PublicKey>,
    insecure: bool,
) -> Result<(Beacon, Option<crate::keys::PublicKey>), AutoError> {
    let heard = listen(port, wait).map_err(|source| AutoError::Listen { port, source })?;
    let chosen = choose(&heard, name, port, wait)?;
    let key = heard_key(&chosen, known, given, insecure)?;
    if let Some((key, crate::trust::Trust::FirstUse)) = key {
        tracing::warn!(%key, registry = %chosen.endpoint, name = %chosen.name,
            "pinned the registry key heard by beacon on first use; compare it with the key the registry printed");
    }
    tracing::info!(registry = %chosen.endpoint, name = %chosen.name, "registry heard by beacon");
    Ok((chosen, key.map(|(k, _)| k)))
}

/// Why `--registry auto` found no registry to use.
#[derive(Debug, thiserror::Error)]
pub enum AutoError {
    /// The beacon port could not be listened on.
    #[error("listening on UDP port {port}: {source}")]
    Listen {
        /// The port.
        port: u16,
        /// The socket error.
        source: std::io::Error,
    },
    /// None, several, or none of that name heard.
    #[error(transparent)]
    Discover(#[from] DiscoverError),
    /// Its key cannot be used.
    #[error(transparent)]
    Key(#[from] HeardKeyError),
}

/// Why the key of a registry heard by beacon cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HeardKeyError {
    /// It announces no key.
    #[error(
        "the registry {name:?} at {endpoint} announces no key (it runs --insecure): pass \
         --insecure, or --registry-key"
    )]
    NoKey {
        /// Its name.
        name: String,
        /// Its endpoint.
        endpoint: String,
    },
    /// Its key differs from the pin, or the known-servers file failed.
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A free UDP port on loopback (the OS picks it; it is released for the test to use).
    fn free_port() -> u16 {
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    #[test]
    fn a_beacon_to_the_loopback_broadcast_address_is_heard_and_garbage_is_not() {
        let port = free_port();
        let to = SocketAddrV4::new(Ipv4Addr::new(127, 255, 255, 255), port);
        let junk = UdpSocket::bind("127.0.0.1:0").expect("junk socket");
        junk.set_broadcast(true).expect("broadcast");
        let lab = Beacon::new("lab", "tcp://0.0.0.0:7000", None);
        let _a = Beaconer::start(&lab, to, Duration::from_millis(100)).expect("beacon");
        let _b = Beaconer::start(
            &Beacon::new("annex", "tcp://127.0.0.1:7100", None),
            to,
            Duration::from_millis(100),
        )
        .expect("beacon");
        for _ in 0..5 {
            junk.send_to(b"\x00garbage", to).expect("junk");
        }
        let heard = listen(port, Duration::from_millis(600)).expect("listen");
        let names: Vec<(&str, &str)> = heard
            .iter()
            .map(|h| (h.beacon.name.as_str(), h.beacon.endpoint.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("annex", "tcp://127.0.0.1:7100"),
                ("lab", "tcp://127.0.0.1:7000")
            ]
        );
        assert!(matches!(
            choose(&heard, None, port, Duration::ZERO),
            Err(DiscoverError::Several(b)) if b.len() == 2
        ));
        assert_eq!(
            choose(&heard, Some("lab"), port, Duration::ZERO).map(|b| b.name),
            Ok("lab".to_owned())
        );
        assert!(matches!(
            choose(&heard, Some("attic"), port, Duration::ZERO),
            Err(DiscoverError::NoneNamed { .. })
        ));
        assert!(matches!(
            choose(&[], None, port, Duration::ZERO),
            Err(DiscoverError::NoneHeard { .. })
        ));
    }
}
