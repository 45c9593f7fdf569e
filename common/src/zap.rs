//! The ZAP handler (RFC 27/ZAP): authenticates every connection to the CURVE servers of one
//! ZeroMQ context.
//!
//! libzmq asks the handler bound at [`ZAP_ENDPOINT`] about each new connection to a socket
//! with a ZAP domain. For CURVE, the handler accepts the client and names it by its public
//! key: the reply's User-Id is the key in Z85, and libzmq attaches it to every message from
//! that connection (`zmq_msg_gets("User-Id")`). A server therefore knows who sent a request
//! from the handshake, never from the request body.
//!
//! # Format
//! Request frames: version `1.0`, request id, domain, address, routing id, mechanism, then
//! the mechanism's credentials (CURVE: the client's 32-byte public key).
//! Reply frames: version `1.0`, request id, status code (`200` or `400`), status text,
//! user id, metadata (empty).

use crate::actor::{Actor, Pipe, Wake};
use crate::keys::PublicKey;

/// Where libzmq looks for the handler, per context (RFC 27).
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// The ZAP domain Agora's servers set (`ZMQ_ZAP_DOMAIN`).
pub const DOMAIN: &str = "agora";

/// Whom the handler lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZapPolicy {
    /// Accept unauthenticated (NULL mechanism) connections, with an empty User-Id. Only for
    /// `--insecure` loopback setups.
    pub allow_null: bool,
}

/// A running ZAP handler, an [`Actor`]; stops when dropped.
#[derive(Debug)]
pub struct Authenticator {
    _actor: Actor,
}

impl Authenticator {
    /// Binds the handler in `ctx` and serves it on its own thread.
    ///
    /// # Errors
    /// libzmq's; `EADDRINUSE` if the context already has a handler.
    pub fn start(ctx: &zmq::Context, policy: ZapPolicy) -> Result<Authenticator, zmq::Error> {
        let socket = ctx.socket(zmq::REP)?;
        socket.set_linger(0)?;
        socket.bind(ZAP_ENDPOINT)?;
        let actor = Actor::start(ctx, "zap", move |pipe| serve(&pipe, &socket, policy))
            .map_err(|_| zmq::Error::EMFILE)?;
        Ok(Authenticator { _actor: actor })
    }
}

fn serve(pipe: &Pipe, socket: &zmq::Socket, policy: ZapPolicy) {
    loop {
        let mut items = [pipe.as_poll_item(), socket.as_poll_item(zmq::POLLIN)];
        match zmq::poll(&mut items, -1) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "ZAP handler stopped");
                return;
            }
        }
        if items[0].is_readable() && matches!(pipe.take(), Wake::Term) {
            return;
        }
        if !items[1].is_readable() {
            continue;
        }
        let Ok(request) = socket.recv_multipart(0) else {
            continue;
        };
        let reply = decide(&request, policy);
        if let Err(e) = socket.send_multipart(reply, 0) {
            tracing::error!(error = %e, "ZAP reply failed");
        }
    }
}

/// The reply frames for one ZAP request.
pub fn decide(request: &[Vec<u8>], policy: ZapPolicy) -> Vec<Vec<u8>> {
    let request_id = request.get(1).cloned().unwrap_or_default();
    let reply = |code: &str, text: &str, user: &str| {
        vec![
            b"1.0".to_vec(),
            request_id.clone(),
            code.as_bytes().to_vec(),
            text.as_bytes().to_vec(),
            user.as_bytes().to_vec(),
            Vec::new(),
        ]
    };
    if request.first().map(Vec::as_slice) != Some(b"1.0") || request.len() < 6 {
        return reply("400", "malformed ZAP request", "");
    }
    let address = String::from_utf8_lossy(&request[3]);
    match (request[5].as_slice(), &request[6..]) {
        (b"CURVE", [key]) => match <[u8; 32]>::try_from(key.as_slice()) {
            Ok(bytes) => {
                let key = PublicKey::from_bytes(bytes);
                tracing::debug!(%address, %key, "CURVE client accepted");
                reply("200", "OK", &key.to_string())
            }
            Err(_) => reply("400", "bad CURVE key", ""),
        },
        (b"NULL", _) if policy.allow_null => reply("200", "OK", ""),
        (mechanism, _) => {
            tracing::warn!(%address, mechanism = %String::from_utf8_lossy(mechanism),
                "connection refused: not CURVE");
            reply("400", "CURVE required", "")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(mechanism: &str, creds: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut r = vec![
            b"1.0".to_vec(),
            b"7".to_vec(),
            DOMAIN.as_bytes().to_vec(),
            b"127.0.0.1".to_vec(),
            b"id".to_vec(),
            mechanism.as_bytes().to_vec(),
        ];
        r.extend(creds.iter().map(|c| c.to_vec()));
        r
    }

    #[test]
    fn curve_clients_are_named_by_their_key() {
        let key = [7u8; 32];
        let reply = decide(&request("CURVE", &[&key]), ZapPolicy::default());
        assert_eq!(reply[1], b"7");
        assert_eq!(reply[2], b"200");
        assert_eq!(
            reply[4],
            PublicKey::from_bytes(key).to_string().into_bytes()
        );
    }

    #[test]
    fn null_is_refused_unless_allowed_and_garbage_is_refused() {
        assert_eq!(
            decide(&request("NULL", &[]), ZapPolicy::default())[2],
            b"400"
        );
        let open = ZapPolicy { allow_null: true };
        assert_eq!(decide(&request("NULL", &[]), open)[2], b"200");
        assert_eq!(decide(&request("PLAIN", &[b"u", b"p"]), open)[2], b"400");
        assert_eq!(decide(&request("CURVE", &[b"short"]), open)[2], b"400");
        assert_eq!(decide(&[b"2.0".to_vec()], open)[2], b"400");
    }
}
