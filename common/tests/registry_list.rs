//! A registry client with a list of endpoints moves to the next when one does not answer.

use std::time::Duration;

use agora_common::client::{ClientOptions, RegistryClient};
use agora_proto::codec::encode_ok;
use agora_proto::wire::ListReply;

/// A ROUTER on an ephemeral loopback port; returns it and its endpoint.
fn router(ctx: &zmq::Context) -> (zmq::Socket, String) {
    let socket = ctx.socket(zmq::ROUTER).expect("socket");
    socket.set_linger(0).expect("linger");
    socket.bind("tcp://127.0.0.1:*").expect("bind");
    let endpoint = socket
        .get_last_endpoint()
        .expect("endpoint")
        .expect("utf-8");
    (socket, endpoint)
}

#[test]
fn a_silent_registry_is_passed_over_for_the_next_and_the_next_is_kept() {
    let ctx = zmq::Context::new();
    // The first registry takes requests and never answers (a hung or partitioned host).
    let (silent_socket, silent) = router(&ctx);
    let (live, live_endpoint) = router(&ctx);
    let server = std::thread::spawn(move || {
        let mut answered = 0;
        // Answers `list` twice, then stops; every receive has a timeout.
        live.set_rcvtimeo(10_000).expect("timeout");
        while answered < 2 {
            let Ok(mut frames) = live.recv_multipart(0) else {
                break;
            };
            frames.truncate(2); // identity, empty delimiter
            frames.extend(encode_ok(&ListReply { groups: Vec::new() }));
            live.send_multipart(frames, 0).expect("reply");
            answered += 1;
        }
        answered
    });
    let options = ClientOptions {
        timeout: Duration::from_millis(300),
        attempts: 1,
    };
    let mut client = RegistryClient::new(&ctx, &format!("{silent}, {live_endpoint}"), options);
    assert_eq!(client.endpoint(), silent);
    assert!(client
        .list()
        .expect("the second registry answers")
        .is_empty());
    assert_eq!(client.endpoint(), live_endpoint);
    // The next call goes straight to the one that answered: the silent one got one
    // request in all.
    assert!(client.list().expect("kept").is_empty());
    assert_eq!(client.endpoint(), live_endpoint);
    assert_eq!(server.join().expect("server"), 2);
    let mut heard = 0;
    while silent_socket.recv_multipart(zmq::DONTWAIT).is_ok() {
        heard += 1;
    }
    assert_eq!(heard, 1);
}
