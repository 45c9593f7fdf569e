//! Live delivery end to end: the real binaries, `user-cli watch`, and the `common::live`
//! feed against real group-node processes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_proto::id::MessageId;
use agora_proto::wire::{EntryKind, UserName};
use agora_tests::{wait_for, CliRun, Federation, Streaming};
use serde_json::value::RawValue;

const WAIT: Duration = Duration::from_secs(20);

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

fn entries(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn seqs(lines: &[String]) -> Vec<u64> {
    entries(lines)
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect()
}

/// Sends until acked, retrying a timeout with the same id (the node may be restarting).
fn send_until_acked(client: &mut GroupClient, text: &str) -> u64 {
    let id = MessageId::new_v7();
    let deadline = Instant::now() + WAIT;
    loop {
        let body = RawValue::from_string(format!("\"{text}\"")).expect("json");
        match client.send_with_id(body, id) {
            Ok(ack) => return ack.seq,
            Err(ClientError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(e) => panic!("send {text}: {e}"),
        }
    }
}

fn watch(fed: &Federation, user: &str, group: &str, from_zero: bool) -> Streaming {
    let mut args = vec!["--json", "watch", group];
    if from_zero {
        args.extend(["--after-seq", "0"]);
    }
    let mut w = fed.spawn_cli(user, &args);
    assert!(
        w.wait_stderr("watching", WAIT),
        "{user}'s watch never subscribed: {:?}",
        w.errors
    );
    w
}

#[test]
fn three_members_see_each_others_messages_live() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    let users = ["alice", "bob", "carol"];
    for u in &users[1..] {
        ok(fed.cli(u, &["join", "Cool Group"], ""));
    }
    let mut watchers: Vec<Streaming> = users
        .iter()
        .map(|u| watch(&fed, u, "Cool Group", false))
        .collect();
    for u in users {
        ok(fed.cli(u, &["send", "Cool Group", &format!("hello from {u}")], ""));
    }
    for (w, me) in watchers.iter_mut().zip(users) {
        let got_all = w.wait_lines(WAIT, |lines| {
            entries(lines)
                .iter()
                .filter(|e| e["kind"] == "message")
                .count()
                == 3
        });
        assert!(got_all, "{me} saw {:?}", w.lines);
        let texts: BTreeSet<String> = entries(&w.lines)
            .iter()
            .map(|e| e["body"].as_str().unwrap_or_default().to_owned())
            .collect();
        for u in users {
            assert!(
                texts.contains(&format!("hello from {u}")),
                "{me}: {texts:?}"
            );
        }
        assert_eq!(w.interrupt(), Some(0), "watch exits cleanly on SIGINT");
    }
}

#[test]
fn a_non_members_watch_receives_nothing() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    let mut w = fed.spawn_cli("mallory", &["--json", "watch", "Cool Group"]);
    ok(fed.cli("alice", &["send", "Cool Group", "secret"], ""));
    let code = w
        .wait_exit(WAIT)
        .expect("watch of a non-member ends by itself");
    assert_eq!(code, Some(1));
    assert!(w.lines.is_empty(), "{:?}", w.lines);
    assert!(
        w.errors.iter().any(|l| l.contains("not a member")),
        "{:?}",
        w.errors
    );
}

#[test]
fn kill_9_of_the_node_mid_stream_then_restart_every_seq_shown_once() {
    let fed = Federation::start("200ms");
    let mut node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let addr = node.host_port().to_owned();
    let endpoint = node.endpoint.clone();
    fed.join_when_listed("alice", &addr);
    let mut w = watch(&fed, "alice", &addr, true);

    let acked = Arc::new(AtomicU64::new(0));
    let last_seq = Arc::new(AtomicU64::new(0));
    let sender = {
        let (acked, last_seq, endpoint) = (Arc::clone(&acked), Arc::clone(&last_seq), endpoint);
        let curve = fed.curve("alice", &node);
        std::thread::spawn(move || {
            let ctx = zmq::Context::new();
            let options = ClientOptions {
                timeout: Duration::from_millis(500),
                attempts: 1,
            };
            let mut c = GroupClient::new(
                &ctx,
                &endpoint,
                UserName::new("alice").expect("name"),
                None,
                options,
            )
            .with_curve(curve);
            for i in 0..300 {
                let seq = send_until_acked(&mut c, &format!("m{i}"));
                last_seq.fetch_max(seq, Ordering::SeqCst);
                acked.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    assert!(wait_for(WAIT, || acked.load(Ordering::SeqCst) >= 100));
    node.kill9();
    let _node = fed.node("Cool Group", &addr, "cool", &[]);
    sender.join().expect("sender");
    let last = last_seq.load(Ordering::SeqCst);
    assert!(
        w.wait_lines(WAIT, |lines| seqs(lines).last() == Some(&last)),
        "watcher stopped at {:?} of {last}",
        seqs(&w.lines).last()
    );
    assert_eq!(seqs(&w.lines), (1..=last).collect::<Vec<_>>());
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn forced_drops_on_the_push_path_still_show_every_message_once() {
    let fed = Federation::start("200ms");
    // Every third push is dropped on purpose, and the queue per peer is tiny.
    let node = fed.node(
        "Cool Group",
        "127.0.0.1:0",
        "cool",
        &["--fault-drop-push-every", "3", "--sndhwm", "20"],
    );
    let addr = node.host_port().to_owned();
    fed.join_when_listed("alice", &addr);
    let mut w = watch(&fed, "alice", &addr, false);
    let ctx = zmq::Context::new();
    let mut c = GroupClient::new(
        &ctx,
        &node.endpoint,
        UserName::new("alice").expect("name"),
        None,
        ClientOptions::default(),
    )
    .with_curve(fed.curve("alice", &node));
    let first = send_until_acked(&mut c, "m0");
    let mut last = first;
    for i in 1..200 {
        last = send_until_acked(&mut c, &format!("m{i}"));
    }
    assert!(
        w.wait_lines(WAIT, |lines| seqs(lines).last() == Some(&last)),
        "watcher stopped at {:?} of {last}",
        seqs(&w.lines).last()
    );
    assert_eq!(seqs(&w.lines), (first..=last).collect::<Vec<_>>());
}

#[test]
fn fifty_concurrent_subscribers_get_every_message_in_order() {
    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let ctx = zmq::Context::new();
    let client = |name: &str| {
        GroupClient::new(
            &ctx,
            &node.endpoint,
            UserName::new(name).expect("name"),
            None,
            ClientOptions::default(),
        )
        .with_curve(fed.curve(name, &node))
    };
    let mut feeds = Vec::new();
    for i in 0..50 {
        let name = format!("sub{i}");
        client(&name).join().expect("join");
        let curve = fed.curve(&name, &node);
        let (feed, rx) = Feed::start(
            &ctx,
            UserName::new(name).expect("name"),
            Some(curve.keypair),
            FeedOptions::default(),
        )
        .expect("feed");
        feed.add(GroupSpec {
            label: "Cool Group".into(),
            endpoint: node.endpoint.clone(),
            group: None,
            after_seq: None,
            server_key: Some(curve.server_key),
        });
        feeds.push((feed, rx));
    }
    for (_, rx) in &feeds {
        let deadline = Instant::now() + WAIT;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(FeedEvent::Subscribed { .. }) => break,
                Ok(_) => {}
                Err(_) => panic!("a subscriber never subscribed"),
            }
        }
    }
    let mut sender = client("sub0");
    let mut sent = Vec::new();
    for i in 0..100 {
        sent.push(send_until_acked(&mut sender, &format!("m{i}")));
    }
    for (i, (_, rx)) in feeds.iter().enumerate() {
        let mut got = Vec::new();
        let deadline = Instant::now() + WAIT;
        while got.last() != sent.last() {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(FeedEvent::Entry { entry, .. }) if entry.kind == EntryKind::Message => {
                    got.push(entry.seq)
                }
                Ok(FeedEvent::Error {
                    error, fatal: true, ..
                }) => panic!("sub{i}: {error}"),
                Ok(_) => {}
                Err(_) => panic!("sub{i} stopped at {:?}", got.last()),
            }
        }
        assert_eq!(got, sent, "sub{i}");
    }
}

#[test]
fn with_the_registry_stopped_two_members_keep_chatting_by_name() {
    let mut fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    ok(fed.cli("bob", &["join", "Cool Group"], ""));
    let mut w = watch(&fed, "alice", "Cool Group", false);
    fed.kill_registry();
    // Names resolve through the endpoints each client saved when it joined.
    for text in ["registry down", "still here"] {
        ok(fed.cli("bob", &["--timeout", "1s", "send", "Cool Group", text], ""));
    }
    ok(fed.cli(
        "alice",
        &["--timeout", "1s", "send", "Cool Group", "me too"],
        "",
    ));
    assert!(w.wait_lines(WAIT, |lines| {
        let bodies: Vec<String> = entries(lines)
            .iter()
            .map(|e| e["body"].as_str().unwrap_or_default().to_owned())
            .collect();
        ["registry down", "still here", "me too"]
            .iter()
            .all(|t| bodies.iter().any(|b| b == t))
    }));
    // A name never joined from this client still needs the registry.
    let run = fed.cli("carol", &["--timeout", "500ms", "join", "Cool Group"], "");
    assert_eq!(run.code, Some(3), "{run:?}");
}

#[test]
fn a_client_that_was_offline_catches_up_with_an_unread_count() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    ok(fed.cli("bob", &["join", "Cool Group"], ""));
    for text in ["one", "two", "three"] {
        ok(fed.cli("bob", &["send", "Cool Group", text], ""));
    }
    // bob's join event and his three messages arrived while alice was away.
    let run = ok(fed.cli("alice", &["check"], ""));
    assert!(run.stdout.contains("Cool Group: 4 unread"), "{run:?}");
    assert!(run.stdout.contains("* bob joined"), "{run:?}");
    for text in ["one", "two", "three"] {
        assert!(run.stdout.contains(&format!("bob: {text}")), "{run:?}");
    }
    let again = ok(fed.cli("alice", &["check"], ""));
    assert!(again.stdout.contains("Cool Group: 0 unread"), "{again:?}");
    // The interactive command works in a script too.
    ok(fed.cli("bob", &["send", "Cool Group", "four"], ""));
    let run = ok(fed.cli("alice", &[], "check\n"));
    assert!(run.stdout.contains("Cool Group: 1 unread"), "{run:?}");
    assert!(run.stdout.contains("bob: four"), "{run:?}");
}
