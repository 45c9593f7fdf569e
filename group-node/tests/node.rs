//! In-process tests: a real [`Node`] on an ephemeral loopback port, driven over ZeroMQ.

use std::time::Duration;

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_proto::codec::Frames;
use agora_proto::id::MessageId;
use agora_proto::wire::{EntryKind, ErrorCode, HistoryQuery, UserName, PROTOCOL};
use serde_json::value::RawValue;

mod support;

use support::{client, start, Running};

fn body(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("json")
}

/// Sends raw frames on a fresh REQ and returns the reply's JSON.
fn raw(n: &Running, frames: Frames) -> serde_json::Value {
    let s = n.ctx.socket(zmq::REQ).expect("socket");
    s.set_linger(0).expect("linger");
    s.set_rcvtimeo(5000).expect("rcvtimeo");
    s.connect(&n.endpoint).expect("connect");
    s.send_multipart(frames, 0).expect("send");
    let reply = s.recv_multipart(0).expect("reply within 5 s");
    assert_eq!(reply[0], PROTOCOL);
    serde_json::from_slice(&reply[1]).expect("reply is JSON")
}

fn code_of(reply: &serde_json::Value) -> &str {
    assert_eq!(reply["ok"], false, "{reply}");
    reply["error"].as_str().unwrap_or_default()
}

fn server_code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Server(w) => w.code,
        other => panic!("expected a server error, got {other}"),
    }
}

#[test]
fn garbage_gets_specific_errors_and_harms_nothing() {
    let n = start("Cool Group", |c| c.max_message_bytes = 1000);
    let mut alice = client(&n, "alice");
    alice.join().expect("join");
    let first = alice.send(body(r#""before the garbage""#)).expect("send");

    let sig = PROTOCOL.to_vec();
    let j = |s: &str| s.as_bytes().to_vec();
    assert_eq!(code_of(&raw(&n, vec![sig.clone()])), "bad_frames");
    assert_eq!(
        code_of(&raw(&n, vec![sig.clone(), j("{}"), j("x")])),
        "bad_frames"
    );
    assert_eq!(
        code_of(&raw(&n, vec![j("AGORA/2"), j("{}")])),
        "unsupported_version"
    );
    assert_eq!(
        code_of(&raw(&n, vec![sig.clone(), j("{\"action\":")])),
        "invalid_json"
    );
    assert_eq!(
        code_of(&raw(&n, vec![sig.clone(), vec![0xff, 0x00]])),
        "invalid_json"
    );
    assert_eq!(
        code_of(&raw(&n, vec![sig.clone(), j("42")])),
        "invalid_field"
    );
    assert_eq!(
        code_of(&raw(&n, vec![sig.clone(), j(r#"{"action":"fly"}"#)])),
        "unknown_action"
    );
    assert_eq!(
        code_of(&raw(&n, vec![sig.clone(), j(r#"{"action":"list"}"#)])),
        "unknown_action"
    );
    let missing = raw(
        &n,
        vec![sig.clone(), j(r#"{"action":"send","user":"alice"}"#)],
    );
    assert_eq!(code_of(&missing), "invalid_field");
    assert!(missing["message"]
        .as_str()
        .unwrap_or_default()
        .contains("body"));
    let bad_user = raw(
        &n,
        vec![sig.clone(), j(r#"{"action":"join","user":"a b"}"#)],
    );
    assert_eq!(code_of(&bad_user), "invalid_field");
    let other_group = raw(
        &n,
        vec![
            sig.clone(),
            j(r#"{"action":"join","user":"x","group":"Other"}"#),
        ],
    );
    assert_eq!(code_of(&other_group), "unknown_group");
    let two_selectors = raw(
        &n,
        vec![
            sig.clone(),
            j(r#"{"action":"get_messages","user":"alice","latest":1,"after_seq":0}"#),
        ],
    );
    assert_eq!(code_of(&two_selectors), "invalid_field");

    // A peer without a REQ envelope cannot be answered; it is dropped, nothing else.
    let dealer = n.ctx.socket(zmq::DEALER).expect("dealer");
    dealer.set_linger(0).expect("linger");
    dealer.connect(&n.endpoint).expect("connect");
    dealer
        .send_multipart([sig.clone(), j("{}")], 0)
        .expect("send");

    // Oversized: over the body limit gets too_large; far over the frame limit is cut off by
    // libzmq without harming anyone else.
    let big = format!("\"{}\"", "x".repeat(2000));
    assert_eq!(
        server_code(alice.send(body(&big)).expect_err("too large")),
        ErrorCode::TooLarge
    );
    // The frame limit is the larger of the body limit and an upload chunk (1 MiB), plus
    // 64 KiB of room.
    let huge = format!("\"{}\"", "x".repeat(1_300_000));
    let mut hog = GroupClient::new(
        &n.ctx,
        &n.endpoint,
        UserName::new("alice").expect("name"),
        None,
        ClientOptions {
            timeout: Duration::from_millis(300),
            attempts: 1,
        },
    );
    assert!(matches!(
        hog.send(body(&huge)),
        Err(ClientError::Timeout { .. })
    ));

    // Non-members can neither write nor read.
    let mut mallory = client(&n, "mallory");
    assert_eq!(
        server_code(mallory.send(body("1")).expect_err("refused")),
        ErrorCode::NotMember
    );
    assert_eq!(
        server_code(
            mallory
                .get_messages(HistoryQuery::AfterSeq(0), None)
                .expect_err("refused")
        ),
        ErrorCode::NotMember
    );

    // Still serving, and the log holds exactly the one good message.
    let after = alice.send(body(r#""after the garbage""#)).expect("send");
    assert_eq!(after.seq, first.seq + 1);
    let page = alice
        .get_messages(HistoryQuery::AfterSeq(0), None)
        .expect("history");
    let texts: Vec<(EntryKind, &str)> = page
        .messages
        .iter()
        .map(|m| (m.kind, m.body.get()))
        .collect();
    assert_eq!(
        texts,
        vec![
            (EntryKind::Join, "null"),
            (EntryKind::Message, r#""before the garbage""#),
            (EntryKind::Message, r#""after the garbage""#)
        ]
    );
}

#[test]
fn a_retried_send_is_stored_once_and_a_reused_id_conflicts() {
    let n = start("Cool Group", |_| {});
    let mut alice = client(&n, "alice");
    alice.join().expect("join");
    let id = MessageId::new_v7();
    let first = alice.send_with_id(body(r#"{"n":1}"#), id).expect("send");
    let retry = alice.send_with_id(body(r#"{"n":1}"#), id).expect("retry");
    assert_eq!(
        (retry.seq, retry.id, retry.time),
        (first.seq, first.id, first.time)
    );
    assert!(retry.duplicate);
    assert_eq!(
        server_code(
            alice
                .send_with_id(body(r#"{"n":2}"#), id)
                .expect_err("conflict")
        ),
        ErrorCode::IdConflict
    );
    // seq 1 is alice's join event; her message is seq 2, stored once.
    let info = alice.info().expect("info");
    assert_eq!(info.last_seq, 2);
}

#[test]
fn history_is_paginated_in_seq_order() {
    let n = start("Cool Group", |_| {});
    let mut alice = client(&n, "alice");
    alice.join().expect("join");
    for i in 1..=250 {
        alice.send(body(&i.to_string())).expect("send");
    }
    let mut pages = 0;
    let mut seqs = Vec::new();
    alice
        .for_each_page(HistoryQuery::AfterSeq(0), None, |page| {
            pages += 1;
            assert!(page.messages.len() <= 100);
            seqs.extend(page.messages.iter().map(|m| m.seq));
            true
        })
        .expect("history");
    // 251 entries: the join event, then 250 messages.
    assert_eq!(pages, 3);
    assert_eq!(seqs, (1..=251).collect::<Vec<u64>>());
    let latest = alice
        .get_messages(HistoryQuery::Latest(5), None)
        .expect("latest");
    let seqs: Vec<u64> = latest.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![247, 248, 249, 250, 251]);
    assert!(!latest.more);
}

#[test]
fn membership_changes_are_idempotent_and_listed() {
    let n = start("Cool Group", |_| {});
    let mut alice = client(&n, "alice");
    let mut bob = client(&n, "bob");
    assert!(alice.join().expect("join").changed);
    assert!(!alice.join().expect("join again").changed);
    assert!(bob.join().expect("join").changed);
    let users: Vec<String> = alice
        .members()
        .expect("members")
        .members
        .iter()
        .map(|m| m.user.to_string())
        .collect();
    assert_eq!(users, vec!["alice", "bob"]);
    assert!(bob.leave().expect("leave").changed);
    assert!(!bob.leave().expect("leave again").changed);
    assert_eq!(alice.info().expect("info").members, 1);
    assert_eq!(
        server_code(bob.send(body("1")).expect_err("left")),
        ErrorCode::NotMember
    );
}

#[test]
fn a_loose_data_directory_and_store_are_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let parent = tempfile::tempdir().expect("tempdir");
    let fresh = parent.path().join("fresh");
    let loose = parent.path().join("loose");
    std::fs::create_dir(&loose).expect("mkdir");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ctx = zmq::Context::new();
    let group = agora_proto::wire::GroupName::new("Private Files").expect("name");
    let bind = |dir: &std::path::Path| {
        let mut config =
            agora_group_node::Config::new(group.clone(), "tcp://127.0.0.1:0", dir.to_owned());
        config.insecure = true;
        drop(agora_group_node::Node::bind(&ctx, config).expect("bind"));
    };
    bind(&fresh);
    bind(&loose);
    for dir in [&fresh, &loose] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
        assert_eq!(mode(&dir.join("group.sqlite3")), 0o600, "{}", dir.display());
    }
    // A store file left readable by others is tightened on the next start.
    let db = loose.join("group.sqlite3");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    bind(&loose);
    assert_eq!(mode(&db), 0o600);
}

#[test]
fn a_second_node_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = zmq::Context::new();
    let config = || {
        let mut c = agora_group_node::Config::new(
            agora_proto::wire::GroupName::new("One Writer").expect("name"),
            "tcp://127.0.0.1:0",
            dir.path().to_owned(),
        );
        c.insecure = true;
        c
    };
    let first = agora_group_node::Node::bind(&ctx, config()).expect("first node");
    let second = agora_group_node::Node::bind(&ctx, config());
    assert!(
        matches!(second, Err(agora_group_node::NodeError::Locked(_))),
        "{second:?}"
    );
    drop(first);
    agora_group_node::Node::bind(&ctx, config()).expect("the lock is free again");
}

/// Issue 23: a node on a busy port made its key pair and data directory, then failed. The
/// library binds first (the port taken between main's check and the bind, or a caller
/// without that check): nothing is left on disk, with CURVE (a new key pair) or without.
#[test]
fn a_bind_that_fails_leaves_no_data_directory_and_no_key_pair() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("tcp://{}", busy.local_addr().expect("addr"));
    let parent = tempfile::tempdir().expect("tempdir");
    let ctx = zmq::Context::new();
    for insecure in [false, true] {
        let dir = parent.path().join(format!("data-{insecure}"));
        let mut config = agora_group_node::Config::new(
            agora_proto::wire::GroupName::new("Busy").expect("name"),
            endpoint.clone(),
            dir.clone(),
        );
        config.insecure = insecure;
        let err = agora_group_node::Node::bind(&ctx, config).expect_err("a busy port");
        assert!(
            matches!(err, agora_group_node::NodeError::Bind { .. }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), format!("cannot bind {endpoint}"));
        assert!(!dir.exists(), "{} was made", dir.display());
    }
}
