//! PROTOCOL.md §3.1's checks, against the real registry and group node over CURVE, with
//! request bodies written by hand as a client in another language would send them.

use agora_common::client::{ClientOptions, ReqClient};
use agora_proto::codec::{decode_reply, Frames};
use agora_proto::wire::{Empty, ErrorCode, WireError, PROTOCOL};
use agora_tests::{Federation, Server};

/// Sends `body` as a request to `server` and returns the error it answers (panics on `ok`).
fn refused(fed: &Federation, server: &Server, body: &[u8]) -> WireError {
    let ctx = zmq::Context::new();
    let mut client = ReqClient::new(&ctx, server.endpoint.clone(), ClientOptions::default())
        .with_curve(fed.curve("tester", server));
    let frames: Frames = vec![PROTOCOL.to_vec(), body.to_vec()];
    let reply = client.request_frames(&frames).expect("a reply");
    match decode_reply::<Empty>(&reply).expect("a well-formed reply") {
        Ok(_) => panic!("{} was accepted", String::from_utf8_lossy(body)),
        Err(e) => e,
    }
}

#[test]
fn each_server_checks_the_body_and_the_role_before_any_field() {
    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);

    // Another role's action, without any of its fields: unknown_action, not invalid_field.
    for action in ["get_messages", "send", "join", "set_mode", "subscribe"] {
        let e = refused(
            &fed,
            &fed.registry,
            format!(r#"{{"action":"{action}"}}"#).as_bytes(),
        );
        assert_eq!(e.code, ErrorCode::UnknownAction, "registry, {action}: {e}");
    }
    for action in ["register", "lookup", "send_dm", "user_register", "ack_dm"] {
        let e = refused(
            &fed,
            &node,
            format!(r#"{{"action":"{action}"}}"#).as_bytes(),
        );
        assert_eq!(e.code, ErrorCode::UnknownAction, "node, {action}: {e}");
    }

    // Invalid UTF-8 in a member nobody reads.
    let mut body = br#"{"action":"info","note":""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#""}"#);
    assert_eq!(refused(&fed, &node, &body).code, ErrorCode::InvalidJson);

    // A body nested 100,000 levels deep is refused, not stored.
    let deep = format!(
        r#"{{"action":"send","user":"tester","body":{}1{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(
        refused(&fed, &node, deep.as_bytes()).code,
        ErrorCode::InvalidJson
    );

    // invalid_field names its field.
    let e = refused(
        &fed,
        &node,
        br#"{"action":"get_messages","user":"tester","since":"10:00:00"}"#,
    );
    assert_eq!(e.code, ErrorCode::InvalidField);
    assert!(e.message.starts_with("since: "), "{e}");
    assert!(
        !e.message.contains("HH:MM:SS"),
        "the wire takes RFC 3339 only: {e}"
    );
}
