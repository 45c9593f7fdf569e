//! Group hosts (issue 24): requests routed by `group`, errors naming it, `renew`; the real
//! binaries over CURVE, request bodies written by hand.

use agora_common::client::{ClientOptions, ReqClient};
use agora_proto::codec::{decode_reply, Frames};
use agora_proto::wire::{Empty, ErrorCode, RenewReply, WireError, PROTOCOL};
use agora_tests::{Federation, Server};
use serde::de::DeserializeOwned;

/// Sends `body` to `server` as `user`; returns the decoded reply.
fn ask<T: DeserializeOwned>(
    fed: &Federation,
    server: &Server,
    user: &str,
    body: &str,
) -> Result<T, WireError> {
    let ctx = zmq::Context::new();
    let mut client = ReqClient::new(&ctx, server.endpoint.clone(), ClientOptions::default())
        .with_curve(fed.curve(user, server));
    let frames: Frames = vec![PROTOCOL.to_vec(), body.as_bytes().to_vec()];
    let reply = client.request_frames(&frames).expect("a reply");
    decode_reply::<T>(&reply).expect("a well-formed reply")
}

#[test]
fn a_node_of_one_renews_in_one_request_and_names_the_group_in_errors() {
    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");

    // `renew`: its own group renewed (batched pushes), another refused by name.
    let renewed: RenewReply = ask(
        &fed,
        &node,
        "alice",
        r#"{"action":"renew","user":"alice","groups":[
            {"group":"Cool Group","acked_seq":0},{"group":"Elsewhere"}]}"#,
    )
    .expect("renew answered");
    assert_eq!(renewed.groups.len(), 1, "{renewed:?}");
    assert_eq!(renewed.groups[0].group.as_str(), "Cool Group");
    assert!(renewed.groups[0].lease_ms > 0);
    assert_eq!(renewed.refused.len(), 1, "{renewed:?}");
    assert_eq!(renewed.refused[0].code, ErrorCode::UnknownGroup);
    assert_eq!(
        renewed.refused[0].group.as_ref().map(|g| g.as_str()),
        Some("Elsewhere")
    );

    // A non-member's renew of the group: refused, naming it.
    let bob: RenewReply = ask(
        &fed,
        &node,
        "bob",
        r#"{"action":"renew","user":"bob","groups":[{"group":"Cool Group"}]}"#,
    )
    .expect("renew answered");
    assert!(bob.groups.is_empty());
    assert_eq!(bob.refused[0].code, ErrorCode::NotMember);
    assert_eq!(
        bob.refused[0].group.as_ref().map(|g| g.as_str()),
        Some("Cool Group")
    );

    // No entries, or too many: invalid_field naming `groups`.
    let e = ask::<RenewReply>(
        &fed,
        &node,
        "alice",
        r#"{"action":"renew","user":"alice","groups":[]}"#,
    )
    .expect_err("no entries");
    assert_eq!(e.code, ErrorCode::InvalidField);
    assert!(e.message.starts_with("groups:"), "{e}");

    // An error to a request naming a group carries it; one naming none, none.
    let e = ask::<Empty>(
        &fed,
        &node,
        "bob",
        r#"{"action":"send","group":"Cool Group","user":"bob","body":"hi"}"#,
    )
    .expect_err("bob is no member");
    assert_eq!(e.code, ErrorCode::NotMember);
    assert_eq!(e.group.as_ref().map(|g| g.as_str()), Some("Cool Group"));
    let e = ask::<Empty>(
        &fed,
        &node,
        "bob",
        r#"{"action":"send","user":"bob","body":"hi"}"#,
    )
    .expect_err("bob is no member");
    assert_eq!(e.code, ErrorCode::NotMember);
    assert_eq!(e.group, None);
    let e = ask::<Empty>(
        &fed,
        &node,
        "alice",
        r#"{"action":"get_messages","group":"Elsewhere","user":"alice"}"#,
    )
    .expect_err("another group");
    assert_eq!(e.code, ErrorCode::UnknownGroup);
    assert_eq!(e.group.as_ref().map(|g| g.as_str()), Some("Elsewhere"));
}
