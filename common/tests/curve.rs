//! CURVE over real sockets: a ROUTER from `bind_router` with a server key pair and the ZAP
//! handler, and Lazy Pirate clients in another context (as another process would be).

use std::time::Duration;

use agora_common::client::{ClientCurve, ClientError, ClientOptions, ReqClient};
use agora_common::keys::Keypair;
use agora_common::server::{
    bind_router, poll_ready, recv_batch, send_reply, Incoming, RouterOptions,
};
use agora_common::shutdown::Shutdown;
use agora_common::zap::{Authenticator, ZapPolicy};
use agora_proto::action::{call, RegistryRequest};
use agora_proto::codec::{decode_reply, encode_call, encode_ok};
use agora_proto::wire::ListRequest;
use serde::{Deserialize, Serialize};

/// What the test server answers: the key ZAP authenticated for the request's connection.
#[derive(Debug, Serialize, Deserialize)]
struct Who {
    peer: Option<String>,
}

struct Server {
    endpoint: String,
    key: Keypair,
    stop: Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }
}

fn server(policy: ZapPolicy) -> Server {
    let ctx = zmq::Context::new();
    let key = Keypair::generate().expect("keys");
    let zap = Authenticator::start(&ctx, policy).expect("zap");
    let options = RouterOptions {
        max_request_bytes: 1 << 16,
        hwm: 100,
        heartbeat: None,
        curve: Some(key.clone()),
    };
    let (socket, endpoint) = bind_router(&ctx, "tcp://127.0.0.1:0", options).expect("bind");
    let stop = Shutdown::new();
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let _zap = zap;
        let mut batch = Vec::new();
        while !flag.is_triggered() {
            if !poll_ready(&socket, 50).expect("poll") {
                continue;
            }
            recv_batch(&socket, 16, &mut batch).expect("recv");
            for received in batch.drain(..) {
                let incoming =
                    Incoming::<RegistryRequest>::from_received(received).expect("envelope");
                let who = Who {
                    peer: incoming.peer.map(|k| k.to_string()),
                };
                send_reply(&socket, incoming.envelope, encode_ok(&who)).expect("send");
            }
        }
    });
    Server {
        endpoint,
        key,
        stop,
        thread: Some(thread),
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_millis(1500),
        attempts: 1,
    }
}

fn ask(client: &mut ReqClient) -> Result<Who, ClientError> {
    let reply = client.request_frames(&encode_call::<call::List>(&ListRequest {}))?;
    Ok(decode_reply::<Who>(&reply)??)
}

#[test]
fn the_server_learns_the_client_key_from_the_handshake() {
    let s = server(ZapPolicy::default());
    let ctx = zmq::Context::new();
    let me = Keypair::generate().expect("keys");
    let mut client = ReqClient::new(&ctx, s.endpoint.clone(), options()).with_curve(ClientCurve {
        keypair: me.clone(),
        server_key: s.key.public,
    });
    let who = ask(&mut client).expect("reply over CURVE");
    assert_eq!(who.peer, Some(me.public.to_string()));
}

#[test]
fn a_wrong_server_key_or_no_curve_gets_no_answer() {
    let s = server(ZapPolicy::default());
    let ctx = zmq::Context::new();
    let impostor = Keypair::generate().expect("keys").public;
    let mut wrong = ReqClient::new(&ctx, s.endpoint.clone(), options()).with_curve(ClientCurve {
        keypair: Keypair::generate().expect("keys"),
        server_key: impostor,
    });
    assert!(matches!(ask(&mut wrong), Err(ClientError::Timeout { .. })));
    let mut plain = ReqClient::new(&ctx, s.endpoint.clone(), options());
    assert!(matches!(ask(&mut plain), Err(ClientError::Timeout { .. })));
    // The server is unharmed: a proper client still gets through.
    let mut good = ReqClient::new(&ctx, s.endpoint.clone(), options()).with_curve(ClientCurve {
        keypair: Keypair::generate().expect("keys"),
        server_key: s.key.public,
    });
    assert!(ask(&mut good).is_ok());
}
