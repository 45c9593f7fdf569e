//! ROUTER plumbing shared by the registry and group nodes.
//!
//! The request path, one step per function: [`bind_router`] makes the socket;
//! [`recv_batch_wait`] waits for a message and takes every one waiting (up to a bound);
//! [`Incoming::from_received`] splits the envelope once and decodes the request; a handler
//! returns a `Result<T, WireError>` that [`reply_frames`] encodes; [`send_reply`] puts the
//! envelope back and sends without blocking.

use serde::Serialize;

use crate::keys::{Keypair, PublicKey};
use agora_proto::action::ServerRequest;
use agora_proto::codec::{
    decode_request_data, encode_error, encode_ok, split_envelope, CodecError, Frames,
    MAX_ENVELOPE_FRAMES, MAX_ENVELOPE_FRAME_BYTES,
};
use agora_proto::wire::WireError;

/// Socket bounds and security for a server's ROUTER.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// `ZMQ_MAXMSGSIZE`, in bytes: a peer sending a larger message is disconnected by libzmq.
    pub max_request_bytes: i64,
    /// `ZMQ_SNDHWM` and `ZMQ_RCVHWM`, in messages (default 1000 each).
    pub hwm: i32,
    /// ZMTP heartbeat interval (`ZMQ_HEARTBEAT_IVL`, RFC 37); a peer silent for three
    /// intervals (`ZMQ_HEARTBEAT_TIMEOUT`) is disconnected. `None` disables heartbeats.
    pub heartbeat: Option<std::time::Duration>,
    /// The server's CURVE key pair: with it, the socket is a CURVE server (RFC 26) in ZAP
    /// domain [`crate::zap::DOMAIN`], and a [`crate::zap::Authenticator`] must run in the
    /// same context. `None` leaves the socket unencrypted (NULL mechanism).
    pub curve: Option<Keypair>,
}

/// Binds a ROUTER at `endpoint` (`tcp://IP:PORT`; port 0 or `*` picks a free port) with
/// linger 0, `ROUTER_MANDATORY` (a reply to a vanished peer fails visibly instead of being
/// dropped silently) and the given bounds. Returns the socket and the endpoint it really
/// bound.
///
/// # Errors
/// libzmq's, for example `EADDRINUSE` or `EINVAL` for a malformed endpoint.
pub fn bind_router(
    ctx: &zmq::Context,
    endpoint: &str,
    options: RouterOptions,
) -> Result<(zmq::Socket, String), zmq::Error> {
    let socket = ctx.socket(zmq::ROUTER)?;
    socket.set_linger(0)?;
    socket.set_router_mandatory(true)?;
    socket.set_maxmsgsize(options.max_request_bytes)?;
    socket.set_sndhwm(options.hwm)?;
    socket.set_rcvhwm(options.hwm)?;
    if let Some(keys) = &options.curve {
        socket.set_curve_server(true)?;
        socket.set_curve_secretkey(keys.secret_bytes())?;
        socket.set_zap_domain(crate::zap::DOMAIN)?;
    }
    if let Some(ivl) = options.heartbeat {
        let ms = i32::try_from(ivl.as_millis()).unwrap_or(i32::MAX).max(1);
        socket.set_heartbeat_ivl(ms)?;
        socket.set_heartbeat_timeout(ms.saturating_mul(3))?;
    }
    let endpoint = match endpoint.strip_suffix(":0") {
        Some(host) => format!("{host}:*"),
        None => endpoint.to_owned(),
    };
    socket.bind(&endpoint)?;
    let bound = socket
        .get_last_endpoint()?
        .unwrap_or_else(|raw| String::from_utf8_lossy(&raw).into_owned());
    Ok((socket, bound))
}

/// Waits up to `timeout_ms` for a message. A signal interrupting the wait (`EINTR`) counts
/// as "nothing yet", so that the caller looks at its shutdown flag.
///
/// # Errors
/// libzmq's, other than `EINTR`.
pub fn poll_ready(socket: &zmq::Socket, timeout_ms: i64) -> Result<bool, zmq::Error> {
    match socket.poll(zmq::POLLIN, timeout_ms) {
        Ok(n) => Ok(n > 0),
        Err(zmq::Error::EINTR) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A message as received: its frames, and the sender's key as ZAP authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// All frames, envelope included.
    pub frames: Frames,
    /// The CURVE public key of the connection (`User-Id`), or `None` without CURVE.
    pub peer: Option<PublicKey>,
}

/// Receives every message already waiting, up to `max`, into `out`, without blocking.
///
/// # Errors
/// libzmq's, other than `EAGAIN` (which ends the batch).
pub fn recv_batch(
    socket: &zmq::Socket,
    max: usize,
    out: &mut Vec<Received>,
) -> Result<(), zmq::Error> {
    while out.len() < max {
        match recv_one(socket, zmq::DONTWAIT)? {
            Some(r) => out.push(r),
            None => break,
        }
    }
    Ok(())
}

/// Waits up to `timeout_ms` for a message, in the receive itself (it sets `ZMQ_RCVTIMEO`;
/// no separate poll, one call fewer per request than [`poll_ready`] then [`recv_batch`]),
/// then takes every message already waiting, up to `max` in all, into `out`. Nothing
/// arriving in time, or a signal interrupting the wait (`EINTR`), leaves `out` as it was,
/// so that the caller looks at its shutdown flag.
///
/// # Errors
/// libzmq's, other than `EAGAIN` and `EINTR`.
pub fn recv_batch_wait(
    socket: &zmq::Socket,
    max: usize,
    out: &mut Vec<Received>,
    timeout_ms: i32,
) -> Result<(), zmq::Error> {
    socket.set_rcvtimeo(timeout_ms)?;
    if out.len() >= max {
        return Ok(());
    }
    match recv_one(socket, 0)? {
        Some(r) => out.push(r),
        None => return Ok(()),
    }
    recv_batch(socket, max, out)
}

/// One whole message, or `None` on `EAGAIN` (nothing within the timeout, or nothing
/// waiting with `DONTWAIT`) or `EINTR`.
fn recv_one(socket: &zmq::Socket, flags: i32) -> Result<Option<Received>, zmq::Error> {
    let first = match socket.recv_msg(flags) {
        Ok(m) => m,
        Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut more = first.get_more();
    let mut frames = vec![first.to_vec()];
    let mut peer = None;
    while more {
        // The rest of a multipart message is already here: ZeroMQ delivers it whole.
        let mut part = socket.recv_msg(0)?;
        more = part.get_more();
        // The routing id frame is made by the ROUTER itself and carries no metadata;
        // the frames that came over the wire carry the connection's User-Id.
        if peer.is_none() {
            peer = part
                .gets("User-Id")
                .filter(|id| !id.is_empty())
                .and_then(|id| id.parse().ok());
        }
        frames.push(part.to_vec());
    }
    Ok(Some(Received { frames, peer }))
}

/// A received request: the envelope to reply behind, the authenticated sender, and the
/// decoded request or why it could not be decoded.
#[derive(Debug)]
pub struct Incoming<R> {
    /// Identity frames and the empty delimiter.
    pub envelope: Frames,
    /// The sender's CURVE key, as ZAP authenticated it.
    pub peer: Option<PublicKey>,
    /// The request (one of the server's request enum, `R`), or the decode error to answer
    /// with: a request for another role is `unknown_action` before any field is read.
    pub request: Result<R, CodecError>,
    /// The data frame after the body, for an action whose request carries one
    /// (`upload_chunk`).
    pub data: Option<Vec<u8>>,
}

/// Who sent a request, for per-peer limits: its CURVE key, or (without CURVE) its
/// connection's routing id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// An authenticated key.
    Key(PublicKey),
    /// A connection's routing id frame.
    Connection(Vec<u8>),
}

/// Applies `limiter` to `incoming`: `Some(reply)` (a `rate_limited` error) when its peer is
/// over the limit, `None` to go on.
pub fn rate_limit<R>(
    limiter: &mut crate::ratelimit::Limiter<Peer>,
    incoming: &Incoming<R>,
    now: std::time::Instant,
) -> Option<Frames> {
    let peer = match incoming.peer {
        Some(key) => Peer::Key(key),
        None => Peer::Connection(incoming.envelope.first().cloned().unwrap_or_default()),
    };
    match limiter.check(&peer, now) {
        Ok(()) => None,
        Err(wait) => Some(reply_frames::<()>(Err(WireError::rate_limited(wait)))),
    }
}

impl<R: ServerRequest> Incoming<R> {
    /// Splits and decodes one ROUTER message. An envelope past the bounds (more than
    /// [`MAX_ENVELOPE_FRAMES`] frames before the delimiter, or one longer than
    /// [`MAX_ENVELOPE_FRAME_BYTES`]) makes the request [`CodecError::Envelope`]
    /// (`bad_frames`), answered behind that envelope: a client may put frames of its own
    /// there (PROTOCOL §2), a few and short.
    ///
    /// # Errors
    /// [`CodecError::NoDelimiter`]: there is no envelope, so nothing can be answered; the
    /// caller logs it and drops the message.
    pub fn from_received(received: Received) -> Result<Incoming<R>, CodecError> {
        let (envelope, body) = split_envelope(received.frames)?;
        // The delimiter is the envelope's last frame.
        let frames = envelope.len().saturating_sub(1);
        let longest = envelope.iter().map(Vec::len).max().unwrap_or(0);
        let (request, data) = if frames > MAX_ENVELOPE_FRAMES || longest > MAX_ENVELOPE_FRAME_BYTES
        {
            (Err(CodecError::Envelope { frames, longest }), None)
        } else {
            match decode_request_data(body) {
                Ok((request, data)) => (Ok(request), data),
                Err(e) => (Err(e), None),
            }
        };
        Ok(Incoming {
            envelope,
            peer: received.peer,
            request,
            data,
        })
    }
}

/// Encodes a handler's result for action `C` as reply frames; the handler must produce `C`'s
/// reply type (the action table in `agora_proto::action` says which).
/// Counted in [`crate::metrics::REQUESTS`] by action and code.
pub fn answer<C: agora_proto::action::Call>(result: Result<C::Reply, WireError>) -> Frames {
    crate::metrics::count(C::ACTION.as_str(), result.as_ref().err().map(|e| e.code));
    reply_frames(result)
}

/// Encodes a handler's result as reply frames.
pub fn reply_frames<T: Serialize>(result: Result<T, WireError>) -> Frames {
    match result {
        Ok(body) => encode_ok(&body),
        Err(e) => encode_error(&e),
    }
}

/// Sends `reply` behind `envelope` without blocking. A peer that vanished
/// (`EHOSTUNREACH`) or whose queue is full (`EAGAIN`) loses this reply; that is logged at
/// debug and warn level, and the server goes on.
///
/// # Errors
/// Other libzmq errors (context terminated).
pub fn send_reply(socket: &zmq::Socket, envelope: Frames, reply: Frames) -> Result<(), zmq::Error> {
    match socket.send_multipart(envelope.into_iter().chain(reply), zmq::DONTWAIT) {
        Ok(()) => Ok(()),
        Err(zmq::Error::EHOSTUNREACH) => {
            tracing::debug!("reply dropped: peer disconnected");
            Ok(())
        }
        Err(zmq::Error::EAGAIN) => {
            tracing::warn!("reply dropped: peer's queue is full (HWM)");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Command-line checks of endpoints for the servers' clap value parsers: each returns the
/// value in `tcp://` form, or what is wrong with it in words (clap prints it after the
/// argument's name and value, and exits 2 before anything is created).
pub mod args {
    use agora_proto::wire::{bind_endpoint, Endpoint, NameError};

    /// An endpoint to bind, `IP:PORT` or `tcp://HOST:PORT`; port 0 binds a free port.
    ///
    /// # Errors
    /// What is wrong ([`agora_proto::wire::EndpointProblem`]).
    pub fn bind(s: &str) -> Result<String, String> {
        bind_endpoint(s).map_err(|p| p.to_string())
    }

    /// An endpoint to connect to, `IP:PORT` or `tcp://HOST:PORT` (no wildcard, port 1-65535).
    ///
    /// # Errors
    /// What is wrong ([`agora_proto::wire::EndpointProblem`]).
    pub fn connect(s: &str) -> Result<Endpoint, String> {
        Endpoint::from_host_port(s).map_err(|e| match e {
            NameError::Endpoint { problem, .. } => problem.to_string(),
            e => e.to_string(),
        })
    }

    /// `--registry`: `auto`, or one endpoint or a comma-separated list of them, each
    /// `IP:PORT` or `tcp://HOST:PORT`.
    ///
    /// # Errors
    /// The bad endpoint of the list and what is wrong with it.
    pub fn registry(s: &str) -> Result<String, String> {
        if s == "auto" {
            return Ok(s.to_owned());
        }
        agora_proto::wire::endpoint_list(s).map_err(|e| e.to_string())
    }

    /// `--metrics`: `IP:PORT`, or a bare `PORT` on loopback; port 0 binds a free port.
    ///
    /// # Errors
    /// Not an IP address and port, or a port past 65535.
    pub fn metrics(s: &str) -> Result<String, String> {
        if s.parse::<u16>().is_ok() || s.parse::<std::net::SocketAddr>().is_ok() {
            return Ok(s.to_owned());
        }
        let port_bad = s
            .rsplit_once(':')
            .map_or(!s.contains(['.', '[']), |(_, p)| p.parse::<u16>().is_err());
        if port_bad {
            Err("port must be 0-65535 (0 binds a free port)".into())
        } else {
            Err("expected IP:PORT, or a bare PORT for loopback".into())
        }
    }
}

/// Whether `endpoint` (`tcp://IP:PORT`, as [`args::bind`] returns it) can be bound now: a
/// TCP listener is bound there and closed at once. A check before anything is created, so
/// that a busy port is reported before a key pair or a data directory exists; the real bind
/// can still fail later and is reported then. Port 0 or `*`, and a host that is not an IP
/// address (a host or interface name), are not checked.
///
/// # Errors
/// The bind's, such as `AddrInUse` or `AddrNotAvailable`.
pub fn check_bindable(endpoint: &str) -> std::io::Result<()> {
    let rest = endpoint.strip_prefix("tcp://").unwrap_or(endpoint);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Ok(());
    };
    let Ok(port) = port.parse::<u16>() else {
        return Ok(());
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = match host {
        "*" => std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        h => match h.parse() {
            Ok(ip) => ip,
            Err(_) => return Ok(()),
        },
    };
    if port == 0 {
        return Ok(());
    }
    std::net::TcpListener::bind((ip, port)).map(drop)
}

/// The exit status a server's `main` returns for a failure, as the README's table has it
/// for every binary (0 is a clean stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 1: refused by a server (the registry refuses the group name to this key).
    Refused = 1,
    /// 2: a bad argument, found before anything is created.
    Usage = 2,
    /// 3: a server this one cannot do without is unreachable (the registry, for its key;
    /// PostgreSQL).
    Unreachable = 3,
    /// 4: local input or output: the data directory, a port that cannot be bound, the
    /// store's files.
    LocalIo = 4,
}

impl Exit {
    /// The status as `main` returns it.
    pub fn code(self) -> std::process::ExitCode {
        std::process::ExitCode::from(self as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_proto::action::{call, NodeRequest};
    use agora_proto::codec::encode_call;
    use agora_proto::wire::{ErrorCode, InfoRequest};

    /// A message with `envelope` before the delimiter and an `info` request after it.
    fn received(envelope: Vec<Vec<u8>>) -> Received {
        let mut frames = envelope;
        frames.push(Vec::new());
        frames.extend(encode_call::<call::Info>(&InfoRequest { group: None }));
        Received { frames, peer: None }
    }

    fn code(envelope: Vec<Vec<u8>>) -> Result<(), ErrorCode> {
        let incoming = Incoming::<NodeRequest>::from_received(received(envelope.clone()))
            .expect("an envelope");
        let mut echoed = envelope;
        echoed.push(Vec::new());
        assert_eq!(
            incoming.envelope, echoed,
            "answered behind the whole envelope"
        );
        incoming.request.map(drop).map_err(|e| e.to_wire().code)
    }

    /// A client's own frames before the delimiter (a tag to match replies, PROTOCOL §2) are
    /// accepted up to 8 frames of up to 255 bytes, routing id included; past either bound
    /// the request is `bad_frames`, answered behind the envelope it came with.
    #[test]
    fn envelopes_past_8_frames_or_255_bytes_a_frame_are_bad_frames() {
        let id = b"\0peer".to_vec();
        assert_eq!(code(vec![id.clone()]), Ok(()));
        assert_eq!(code(vec![id.clone(), 7u64.to_be_bytes().to_vec()]), Ok(()));
        let eight: Vec<Vec<u8>> = std::iter::once(id.clone())
            .chain((1..8u8).map(|i| vec![i; MAX_ENVELOPE_FRAME_BYTES]))
            .collect();
        assert_eq!(code(eight.clone()), Ok(()));
        let mut nine = eight;
        nine.push(b"one more".to_vec());
        assert_eq!(code(nine), Err(ErrorCode::BadFrames));
        let long = vec![id, vec![b'x'; MAX_ENVELOPE_FRAME_BYTES + 1]];
        assert_eq!(code(long.clone()), Err(ErrorCode::BadFrames));
        let e = Incoming::<NodeRequest>::from_received(received(long))
            .expect("an envelope")
            .request
            .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "envelope of 2 frames, the longest 256 bytes: at most 8 frames of at most 255 \
             bytes each before the delimiter"
        );
    }
}
