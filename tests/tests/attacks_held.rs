//! Attack suite (docs/SECURITY.md): attacks that the engine already refused, kept here so
//! that they stay refused. Each performs the attack against the real binaries.

use std::time::Duration;

use agora_tests::{CliRun, Federation};

const WAIT: Duration = Duration::from_secs(20);
const GROUP: &str = "Cool Group";

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

#[test]
fn a_banned_or_kicked_member_keeps_no_live_stream() {
    let fed = Federation::start("200ms");
    let alice = fed.user_key("alice");
    let _node = fed.node(GROUP, "127.0.0.1:0", "cool", &["--owner", &alice]);
    fed.join_when_listed("alice", GROUP);
    for user in ["mallory", "eve"] {
        ok(fed.cli(user, &["join", GROUP], ""));
    }

    for (user, action, target) in [
        ("mallory", "ban", fed.user_key("mallory")),
        ("eve", "kick", "eve".to_owned()),
    ] {
        // The member is watching, and sees the group's messages live.
        let mut watch = fed.spawn_cli(user, &["--json", "watch", GROUP]);
        let before = format!("before the {action} of {user}");
        // The watch subscribes after it starts: send until one arrives live.
        assert!(
            agora_tests::wait_for(WAIT, || {
                ok(fed.cli("alice", &["send", GROUP, &before], ""));
                watch.wait_lines(Duration::from_millis(500), |lines| {
                    lines.iter().any(|l| l.contains(&before))
                })
            }),
            "{user} never saw {before:?} live: {:?} {:?}",
            watch.lines,
            watch.errors
        );

        // The owner removes the member; what is said afterwards never reaches its stream.
        ok(fed.cli("alice", &[action, GROUP, &target], ""));
        let secret = format!("said after the {action} of {user}");
        ok(fed.cli("alice", &["send", GROUP, &secret], ""));
        let exited = watch.wait_exit(WAIT);
        assert!(
            exited.is_some(),
            "{user}'s watch went on after the {action}: {:?} {:?}",
            watch.lines,
            watch.errors
        );
        assert_ne!(exited, Some(Some(0)), "the watch says it was refused");
        assert!(
            !watch.lines.iter().any(|l| l.contains(&secret)),
            "{user} received {secret:?}: {:?}",
            watch.lines
        );
        let read = fed.cli(user, &["messages", GROUP], "");
        assert_ne!(read.code, Some(0), "{read:?}");
        assert!(!read.stdout.contains(&secret), "{read:?}");
    }
}

/// One raw request to the registry as `user`'s key: `[AGORA/1, body]`; the reply's body.
fn raw_registry_request(
    fed: &Federation,
    user: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    use agora_common::client::{ClientOptions, ReqClient};
    let ctx = zmq::Context::new();
    let mut client = ReqClient::new(&ctx, &fed.registry.endpoint, ClientOptions::default())
        .with_curve(fed.curve(user, &fed.registry));
    let frames = vec![b"AGORA/1".to_vec(), body.to_string().into_bytes()];
    let reply = client
        .request_frames(&frames)
        .unwrap_or_else(|e| panic!("{body}: {e}"));
    let last = reply
        .last()
        .unwrap_or_else(|| panic!("{body}: an empty reply"));
    serde_json::from_slice(last).unwrap_or_else(|e| panic!("{body}: {e}"))
}

#[test]
fn another_key_neither_reads_nor_acks_a_mailbox_nor_forges_presence() {
    let fed = Federation::start("200ms");
    for user in ["bob", "carol", "mallory"] {
        ok(fed.cli(user, &["register", user], ""));
    }
    let secret = "for bob's eyes only";
    ok(fed.cli("carol", &["send_dm", "bob", secret], ""));

    // Every field that might name someone else is tried; the key decides.
    for body in [
        serde_json::json!({"action": "mailbox", "user": "bob"}),
        serde_json::json!({"action": "mailbox", "name": "bob", "to": "bob"}),
        serde_json::json!({"action": "ack_dm", "up_to": 1000, "user": "bob"}),
        serde_json::json!({"action": "dead_letters", "user": "carol"}),
        serde_json::json!({"action": "connect", "status": "online", "user": "bob", "name": "bob"}),
    ] {
        let reply = raw_registry_request(&fed, "mallory", body.clone());
        let text = reply.to_string();
        assert!(
            !text.contains(secret),
            "{body} answered bob's message: {text}"
        );
        if reply["ok"] == true {
            if let Some(user) = reply.get("user") {
                assert_eq!(user["name"], "mallory", "{body}: {text}");
            }
        }
    }

    // Bob's message is still his, unread, and he is not online.
    let whois = ok(fed.cli("carol", &["--json", "whois", "bob"], ""));
    assert!(
        whois.stdout.contains("\"offline\""),
        "bob's presence was forged: {whois:?}"
    );
    let check = ok(fed.cli("bob", &["check"], ""));
    assert!(
        check.stdout.contains(secret),
        "bob lost his message: {check:?}"
    );
}
