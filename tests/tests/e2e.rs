//! End-to-end: the real registry, group nodes and user-cli, chatting over loopback.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::{HistoryQuery, UserName};
use agora_tests::{wait_for, CliRun, Federation};
use serde_json::value::RawValue;

fn json_lines(run: &CliRun) -> Vec<serde_json::Value> {
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// Only the chat messages of a `--json messages` listing (no join/leave events).
fn chat(entries: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    entries
        .into_iter()
        .filter(|m| m["kind"] == "message")
        .collect()
}

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

#[test]
fn two_users_chat_in_two_groups_one_named_with_a_space() {
    let fed = Federation::start("200ms");
    let cool = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let news = fed.node("news", "127.0.0.1:0", "news", &[]);
    assert!(
        wait_for(Duration::from_secs(10), || {
            let run = fed.cli("alice", &["groups"], "");
            run.stdout.contains("Cool Group") && run.stdout.contains("news")
        }),
        "both groups registered"
    );

    // Alice: the seed's command words, a quoted name, an IP:PORT, multi-line send_message.
    let script = format!(
        "get_group_list\n\
         join_group \"Cool Group\"\n\
         join_group {news}\n\
         send_message \"Cool Group\"\n\
         hello from alice\n\
         second line\n\
         END\n\
         send news breaking story\n\
         exit\n\
         send news never sent\n",
        news = news.host_port()
    );
    let run = ok(fed.cli("alice", &[], &script));
    assert!(run.stdout.contains("joined Cool Group"), "{run:?}");
    assert!(run.stdout.contains("joined news"), "{run:?}");
    assert!(run.stdout.contains("sent to Cool Group: seq 2"), "{run:?}");
    assert!(run.stdout.contains("sent to news: seq 2"), "{run:?}");

    // Bob joins Cool Group only, replies, and reads the whole conversation.
    let run = ok(fed.cli(
        "bob",
        &[],
        "join \"Cool Group\"\nsend \"Cool Group\" hi alice\nget_messages \"Cool Group\"\n",
    ));
    assert!(
        run.stdout
            .contains("Cool Group #2 alice: hello from alice\n    second line"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("Cool Group #3 * bob joined\n")
            && run.stdout.contains("Cool Group #4 bob: hi alice"),
        "{run:?}"
    );

    // One-shot JSON: alice sees both messages in seq order, typed bodies intact.
    ok(fed.cli(
        "alice",
        &[
            "send",
            "Cool Group",
            "--json-body",
            r#"{"t":21.5,"ok":true}"#,
        ],
        "",
    ));
    let msgs = json_lines(&ok(fed.cli(
        "alice",
        &["--json", "messages", "Cool Group"],
        "",
    )));
    let seqs: Vec<u64> = msgs
        .iter()
        .map(|m| m["seq"].as_u64().unwrap_or(0))
        .collect();
    let kinds: Vec<&str> = msgs
        .iter()
        .map(|m| m["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(kinds, vec!["join", "message", "join", "message", "message"]);
    assert_eq!(msgs[0]["sender"], "alice");
    assert_eq!(msgs[1]["body"], "hello from alice\nsecond line");
    assert_eq!(msgs[4]["body"]["t"], 21.5);
    assert_eq!(msgs[4]["body"]["ok"], true);

    // The other group kept its own log, and "never sent" after exit was never sent.
    let msgs = chat(json_lines(&ok(fed.cli(
        "alice",
        &["--json", "messages", "news"],
        "",
    ))));
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["body"], "breaking story");

    // Member counts reach the registry with the heartbeat.
    assert!(wait_for(Duration::from_secs(10), || {
        let groups = json_lines(&fed.cli("alice", &["--json", "groups"], ""));
        groups
            .iter()
            .any(|g| g["name"] == "Cool Group" && g["members"] == 2)
    }));
    drop((cool, news));
}

#[test]
fn history_by_time_seq_id_and_latest() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    let first = json_lines(&ok(fed.cli(
        "alice",
        &["--json", "send", "Cool Group", "early"],
        "",
    )));
    let t1 =
        Timestamp::parse_rfc3339(first[0]["time"].as_str().unwrap_or_default()).expect("ack time");
    // HH:MM:SS has whole seconds: wait (by polling the clock) until the next second starts.
    assert!(wait_for(Duration::from_secs(3), || {
        Timestamp::now().as_micros() / 1_000_000 > t1.as_micros() / 1_000_000
    }));
    let second = json_lines(&ok(fed.cli(
        "alice",
        &["--json", "send", "Cool Group", "late"],
        "",
    )));
    let t2 =
        Timestamp::parse_rfc3339(second[0]["time"].as_str().unwrap_or_default()).expect("ack time");
    ok(fed.cli("alice", &["send", "Cool Group", "latest"], ""));

    // The seed's form: get_messages GROUP HH:MM:SS, today in local time (TZ=UTC here).
    let hhmmss = t2.to_datetime().format("%H:%M:%S").to_string();
    let run = ok(fed.cli(
        "alice",
        &[],
        &format!("get_messages \"Cool Group\" {hhmmss}\n"),
    ));
    assert!(!run.stdout.contains("early"), "{run:?}");
    assert!(run.stdout.contains("#3 alice: late"), "{run:?}");
    assert!(run.stdout.contains("#4 alice: latest"), "{run:?}");

    // RFC 3339 since, after a seq, by id, latest N.
    let bodies = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["--json", "messages", "Cool Group"];
        all.extend_from_slice(args);
        json_lines(&ok(fed.cli("alice", &all, "")))
            .iter()
            .map(|m| m["body"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        bodies(&["--since", &t2.to_string()]),
        vec!["late", "latest"]
    );
    assert_eq!(bodies(&["--after-seq", "3"]), vec!["latest"]);
    let id = first[0]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(bodies(&["--id", &id]), vec!["early"]);
    assert_eq!(bodies(&["--latest", "2"]), vec!["late", "latest"]);

    let missing = fed.cli(
        "alice",
        &[
            "messages",
            "Cool Group",
            "--id",
            &MessageId::new_v7().to_string(),
        ],
        "",
    );
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(missing.stderr.contains("not_found"), "{missing:?}");
    let bad_time = fed.cli(
        "alice",
        &["messages", "Cool Group", "--since", "noonish"],
        "",
    );
    assert_eq!(bad_time.code, Some(2), "{bad_time:?}");
    assert!(bad_time.stderr.contains("invalid time"), "{bad_time:?}");
}

#[test]
fn a_non_member_is_refused_and_errors_name_the_group() {
    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    ok(fed.cli("alice", &["send", "Cool Group", "members only"], ""));

    let read = fed.cli("mallory", &["messages", "Cool Group"], "");
    assert_eq!(read.code, Some(1), "{read:?}");
    // (A first line may say that mallory's key pair was just made.)
    assert_eq!(
        read.stderr.lines().last(),
        Some("user-cli: mallory is not a member of \"Cool Group\"")
    );
    assert!(!read.stdout.contains("members only"));
    let send = fed.cli("mallory", &["send", node.host_port(), "let me in"], "");
    assert_eq!(send.code, Some(1), "{send:?}");
    assert!(send.stderr.contains("not a member"), "{send:?}");

    let unknown = fed.cli("alice", &["join", "No Such Group"], "");
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(
        unknown.stderr.contains("unknown group") && unknown.stderr.contains("\"No Such Group\""),
        "{unknown:?}"
    );

    // A script goes on after a failure, which does not set its exit status (issue 23).
    let run = fed.cli(
        "mallory",
        &[],
        "get_messages \"Cool Group\"\njoin \"Cool Group\"\nget_messages \"Cool Group\"\n",
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("not a member"), "{run:?}");
    assert!(run.stdout.contains("alice: members only"), "{run:?}");

    // An address whose key nobody told us: refused before any traffic, exit code 2.
    let unknown = fed.cli("alice", &["messages", "127.0.0.1:1"], "");
    assert_eq!(unknown.code, Some(2), "{unknown:?}");
    assert!(
        unknown.stderr.contains("no public key known"),
        "{unknown:?}"
    );

    // Nothing the refused requests did reached the log.
    let all = chat(json_lines(&ok(fed.cli(
        "alice",
        &["--json", "messages", "Cool Group"],
        "",
    ))));
    assert_eq!(all.len(), 1);

    // A known node that is down: a clear line, exit code 3, no hang.
    let mut node = node;
    node.kill9();
    let dead = fed.cli(
        "alice",
        &["--timeout", "300ms", "messages", "Cool Group"],
        "",
    );
    assert_eq!(dead.code, Some(3), "{dead:?}");
    assert!(dead.stderr.contains("unreachable"), "{dead:?}");
}

#[test]
fn a_node_restart_keeps_history_and_seq() {
    let fed = Federation::start("200ms");
    let mut node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let addr = node.host_port().to_owned();
    fed.join_when_listed("alice", &addr);
    for text in ["one", "two", "three"] {
        ok(fed.cli("alice", &["send", &addr, text], ""));
    }
    let status = node.terminate();
    assert!(status.success(), "clean shutdown: {status:?}");
    assert!(node.log().contains("unregistered"), "{}", node.log());

    let _node = fed.node("Cool Group", &addr, "cool", &[]);
    let run = ok(fed.cli("alice", &["send", &addr, "four"], ""));
    assert!(run.stdout.contains("seq 5"), "{run:?}");
    let bodies: Vec<String> = chat(json_lines(&ok(fed.cli(
        "alice",
        &["--json", "messages", &addr],
        "",
    ))))
    .iter()
    .map(|m| m["body"].as_str().unwrap_or_default().to_owned())
    .collect();
    assert_eq!(bodies, vec!["one", "two", "three", "four"]);
}

#[test]
fn a_registry_restart_recovers_the_group_list_within_a_heartbeat() {
    let mut fed = Federation::start("200ms");
    let _a = fed.node("Cool Group", "127.0.0.1:0", "a", &[]);
    let _b = fed.node("news", "127.0.0.1:0", "b", &[]);
    let listed = |fed: &Federation| {
        let run = fed.cli("alice", &["--timeout", "1s", "groups"], "");
        run.stdout.contains("Cool Group") && run.stdout.contains("news")
    };
    assert!(wait_for(Duration::from_secs(10), || listed(&fed)));

    // With the registry down, members who know the node's address (and key, saved when
    // they joined) go on chatting.
    let addr = _a.host_port().to_owned();
    ok(fed.cli("alice", &["join", &addr], ""));
    ok(fed.cli("bob", &["join", &addr], ""));
    fed.kill_registry();
    ok(fed.cli("alice", &["send", &addr, "registry is down"], ""));
    let run = ok(fed.cli("bob", &["messages", &addr], ""));
    assert!(run.stdout.contains("alice: registry is down"), "{run:?}");

    fed.restart_registry("200ms");
    let started = std::time::Instant::now();
    // Nodes heartbeat every 200 ms; allow generous slack for a loaded CI machine.
    assert!(
        wait_for(Duration::from_secs(10), || listed(&fed)),
        "groups did not come back; registry log:\n{}",
        fed.registry.log()
    );
    eprintln!(
        "group list recovered {:?} after the registry restart",
        started.elapsed()
    );
}

#[test]
fn kill_9_during_a_stream_of_acked_sends_loses_no_acked_message() {
    let fed = Federation::start("200ms");
    let mut node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let endpoint = node.endpoint.clone();
    let addr = node.host_port().to_owned();
    let options = ClientOptions {
        timeout: Duration::from_millis(600),
        attempts: 1,
    };
    let ctx = zmq::Context::new();
    let acked: Arc<Mutex<BTreeMap<MessageId, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..4 {
        let (ctx, endpoint, acked, stop) = (
            ctx.clone(),
            endpoint.clone(),
            Arc::clone(&acked),
            Arc::clone(&stop),
        );
        let curve = fed.curve(&format!("sender{s}"), &node);
        senders.push(std::thread::spawn(move || {
            let user = UserName::new(format!("sender{s}")).expect("name");
            let mut client =
                GroupClient::new(&ctx, &endpoint, user, None, options).with_curve(curve);
            client.join().expect("join before the kill");
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let body = RawValue::from_string(format!("\"s{s}-{n}\"")).expect("json");
                let id = MessageId::new_v7();
                match client.send_with_id(body, id) {
                    Ok(ack) => {
                        acked.lock().expect("lock").insert(id, ack.seq);
                    }
                    Err(ClientError::Timeout { .. }) => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        }));
    }
    assert!(wait_for(Duration::from_secs(20), || {
        acked.lock().expect("lock").len() >= 300
    }));
    node.kill9();
    let acked_at_kill = acked.lock().expect("lock").len();
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.join().expect("sender thread");
    }
    let acked = acked.lock().expect("lock").clone();

    let restarted = fed.node("Cool Group", &addr, "cool", &[]);
    let mut reader = GroupClient::new(
        &ctx,
        &endpoint,
        UserName::new("sender0").expect("name"),
        None,
        ClientOptions::default(),
    )
    .with_curve(fed.curve("sender0", &restarted));
    let mut stored: BTreeMap<MessageId, u64> = BTreeMap::new();
    let mut seqs = Vec::new();
    reader
        .for_each_page(HistoryQuery::AfterSeq(0), Some(1000), |page| {
            for m in &page.messages {
                stored.insert(m.id, m.seq);
                seqs.push(m.seq);
            }
            true
        })
        .expect("history after restart");
    let lost: Vec<_> = acked
        .iter()
        .filter(|(id, seq)| stored.get(id) != Some(seq))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acked messages lost: {lost:?}",
        lost.len()
    );
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "seq is gap-free after the crash");
    eprintln!(
        "{} acked ({} at the kill), {} stored after restart",
        acked.len(),
        acked_at_kill,
        stored.len()
    );
}

/// A joined group is reached at the endpoint saved when it was joined, with no registry
/// round trip: with the registry down and a 60 s timeout, sending still finishes well within
/// the CLI's 30 s deadline (a lookup first would wait out the timeout). When the node has
/// moved (restarted on another port, the registry entry moved by its key), the first try at
/// the saved endpoint fails, the registry is asked once, and the send goes to the new node.
#[test]
fn a_joined_group_is_reached_at_its_saved_endpoint_and_followed_when_it_moves() {
    let mut fed = Federation::start("200ms");
    let mut node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");

    fed.kill_registry();
    let sent = ok(fed.cli(
        "alice",
        &["--timeout", "60s", "send", "Cool Group", "registry is down"],
        "",
    ));
    assert!(sent.stdout.contains("sent to Cool Group: seq"), "{sent:?}");
    fed.restart_registry("200ms");

    // The node moves to a new port, with the same data directory and key.
    let old = node.host_port().to_owned();
    node.terminate();
    let moved = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let new = moved.host_port().to_owned();
    assert_ne!(old, new);
    assert!(
        wait_for(Duration::from_secs(20), || fed
            .cli("alice", &["--timeout", "1s", "groups"], "")
            .stdout
            .contains(&new)),
        "the registry never listed the moved node"
    );
    let sent = ok(fed.cli(
        "alice",
        &["--timeout", "1s", "send", "Cool Group", "after the move"],
        "",
    ));
    assert!(sent.stdout.contains("sent to Cool Group: seq"), "{sent:?}");
    let log = ok(fed.cli("alice", &["--json", "messages", &new], ""));
    let bodies: Vec<String> = json_lines(&log)
        .iter()
        .filter(|m| m["kind"] == "message")
        .map(|m| m["body"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(bodies, vec!["registry is down", "after the move"]);
}
