//! Direct messages end to end: durable mailboxes, numbered delivery, dead letters.

use agora_tests::{CliRun, Federation};

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

#[test]
fn offline_messages_survive_a_registry_restart_and_arrive_once_in_order() {
    let mut fed = Federation::start("200ms");
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("bob", &["register", "bob"], ""));

    // Three ways to send: the subcommand, seed 004's SEND, seed 003's `name: text`.
    let first = ok(fed.cli("alice", &["send_dm", "bob", "one"], ""));
    assert!(
        first.stdout.contains("bob is offline; message saved (#1)"),
        "{first:?}"
    );
    ok(fed.cli("alice", &[], "SEND bob two\n"));
    ok(fed.cli("alice", &[], "bob: three\n"));

    // No acked message is lost when the registry dies.
    fed.restart_registry("200ms");

    let run = ok(fed.cli("bob", &["check"], ""));
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("MESSAGE"))
        .collect();
    assert_eq!(lines.len(), 3, "{run:?}");
    for (i, (line, text)) in lines.iter().zip(["one", "two", "three"]).enumerate() {
        assert!(
            line.starts_with(&format!("MESSAGE {} FROM alice [Stored]", i + 1)),
            "{line}"
        );
        assert!(line.ends_with(&format!(": {text}")), "{line}");
    }
    assert!(run.stdout.contains("direct messages: 3 new"), "{run:?}");
    // Shown once: the next check has nothing.
    let again = ok(fed.cli("bob", &["check"], ""));
    assert!(again.stdout.contains("direct messages: 0 new"), "{again:?}");
    assert!(!again.stdout.contains("MESSAGE"), "{again:?}");

    // The sender is the authenticated account, with its key; numbering goes on.
    ok(fed.cli("bob", &["connect"], ""));
    let online = ok(fed.cli("alice", &["send_dm", "bob", "are you there?"], ""));
    assert!(online.stdout.contains("sent to bob (#4)"), "{online:?}");
    let json = ok(fed.cli("bob", &["--json", "check"], ""));
    let dm: serde_json::Value = json
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["n"] == 4)
        .expect("message 4");
    assert_eq!(dm["from"], "alice");
    assert_eq!(dm["from_key"], fed.user_key("alice").as_str());
}

#[test]
fn undeliverable_messages_go_to_dead_letters_and_unregister_removes_the_mailbox() {
    // Each sender may fill the whole (small) mailbox here: the share is tested in
    // attacks_registry.
    let fed = Federation::start_with("200ms", &["--max-mailbox", "2", "--dm-share", "100"]);
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("bob", &["register", "bob"], ""));

    let unknown = fed.cli("alice", &["send_dm", "carol", "hello?"], "");
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(unknown.stderr.contains("dead letters"), "{unknown:?}");
    ok(fed.cli("alice", &["send_dm", "bob", "1"], ""));
    ok(fed.cli("alice", &["send_dm", "bob", "2"], ""));
    let full = fed.cli("alice", &["send_dm", "bob", "3"], "");
    assert_eq!(full.code, Some(1), "{full:?}");
    assert!(full.stderr.contains("mailbox is full"), "{full:?}");

    let dead = ok(fed.cli("alice", &["dead_letters"], ""));
    let lines: Vec<&str> = dead.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{dead:?}");
    assert!(
        lines[0].ends_with("to carol: hello? (unknown_user)"),
        "{dead:?}"
    );
    assert!(lines[1].ends_with("to bob: 3 (mailbox_full)"), "{dead:?}");

    // Unregistering removes the mailbox with the account.
    ok(fed.cli("bob", &["unregister", "bob", "--yes"], ""));
    ok(fed.cli("bob", &["register", "bob"], ""));
    let run = ok(fed.cli("bob", &["check"], ""));
    assert!(run.stdout.contains("direct messages: 0 new"), "{run:?}");
}

#[test]
fn an_online_user_gets_direct_messages_live_and_they_count_as_read() {
    use std::time::Duration;
    const WAIT: Duration = Duration::from_secs(20);
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("bob", &["register", "bob"], ""));
    fed.join_when_listed("bob", "Cool Group");
    // bob's long-running client keeps him online and takes pushed messages.
    let mut watch = fed.spawn_cli("bob", &["watch", "Cool Group"]);
    assert!(watch.wait_stderr("watching", WAIT));
    assert!(agora_tests::wait_for(WAIT, || {
        fed.cli("alice", &["whois", "bob"], "")
            .stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["presence", "online"]))
    }));

    let sent = ok(fed.cli("alice", &["send_dm", "bob", "live hello"], ""));
    assert!(sent.stdout.contains("sent to bob (#1)"), "{sent:?}");
    assert!(
        watch.wait_lines(WAIT, |lines| lines.iter().any(|l| l
            .starts_with("MESSAGE 1 FROM alice [")
            && l.ends_with(": live hello"))),
        "{:?}",
        watch.lines
    );
    // Shown live, so acked: nothing waits in the mailbox.
    assert!(agora_tests::wait_for(WAIT, || {
        fed.cli("bob", &["check"], "")
            .stdout
            .contains("direct messages: 0 new")
    }));
}

#[test]
fn an_unread_message_expires_to_the_senders_dead_letters() {
    use std::time::Duration;
    let fed = Federation::start_with("200ms", &["--dm-ttl", "300ms"]);
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("bob", &["register", "bob"], ""));
    ok(fed.cli("alice", &["send_dm", "bob", "read me soon"], ""));
    assert!(agora_tests::wait_for(Duration::from_secs(20), || {
        fed.cli("alice", &["dead_letters"], "")
            .stdout
            .contains("to bob: read me soon (expired)")
    }));
    let run = ok(fed.cli("bob", &["check"], ""));
    assert!(run.stdout.contains("direct messages: 0 new"), "{run:?}");
}

/// Seed 004: "once they reconnect they will receive all pending messages". `CONNECT` in a
/// script shows what waits, in order and numbered, and acks it: the next `CONNECT` shows
/// nothing new.
#[test]
fn connect_in_a_script_shows_the_waiting_messages_once() {
    let fed = Federation::start("200ms");
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("bob", &["register", "bob"], ""));
    ok(fed.cli("alice", &[], "SEND bob first\nSEND bob second\n"));

    let run = ok(fed.cli("bob", &[], "CONNECT bob\n"));
    assert!(run.stdout.contains("bob is online"), "{run:?}");
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("MESSAGE"))
        .collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    assert!(lines[0].starts_with("MESSAGE 1 FROM alice [") && lines[0].ends_with(": first"));
    assert!(lines[1].starts_with("MESSAGE 2 FROM alice [") && lines[1].ends_with(": second"));

    let again = ok(fed.cli("bob", &[], "CONNECT bob\n"));
    assert!(!again.stdout.contains("MESSAGE"), "{again:?}");
    assert!(again.stdout.contains("no messages waiting"), "{again:?}");
}

#[test]
fn multicast_and_broadcast_put_one_copy_in_each_mailbox_and_push_to_who_is_online() {
    use std::time::Duration;
    const WAIT: Duration = Duration::from_secs(20);
    // carol is an admin by name; the operator is dave's key.
    let dave = agora_common::keys::Keypair::generate().expect("key pair");
    let fed = Federation::start_with(
        "200ms",
        &["--operator", &dave.public.to_string(), "--admin", "carol"],
    );
    dave.save(&std::path::Path::new(&fed.key_dir()).join("dave.key"))
        .expect("save dave's key");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        ok(fed.cli(user, &["register", user], ""));
    }
    // bob is online with a live client; the others are not.
    fed.join_when_listed("bob", "Cool Group");
    let mut watch = fed.spawn_cli("bob", &["watch", "Cool Group"]);
    assert!(watch.wait_stderr("watching", WAIT));
    assert!(agora_tests::wait_for(WAIT, || {
        fed.cli("alice", &["whois", "bob"], "")
            .stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["presence", "online"]))
    }));

    // Multicast: a copy each, a name twice gets one, an unknown name is reported and
    // dead-lettered.
    let sent = ok(fed.cli(
        "alice",
        &["multicast", "bob,erin,bob,zed", "lunch", "at", "noon"],
        "",
    ));
    assert!(
        sent.stdout
            .contains("sent to 2 users; not delivered (in your dead letters): zed (unknown_user)"),
        "{sent:?}"
    );
    assert!(
        watch.wait_lines(WAIT, |lines| lines.iter().any(|l| l
            .starts_with("MESSAGE 1 FROM alice [")
            && l.ends_with(": lunch at noon"))),
        "bob got it pushed: {:?}",
        watch.lines
    );
    let erin = ok(fed.cli("erin", &["check"], ""));
    assert!(erin.stdout.contains(": lunch at noon"), "{erin:?}");
    let dead = ok(fed.cli("alice", &["dead_letters"], ""));
    assert!(
        dead.stdout.contains("zed") && dead.stdout.contains("unknown_user"),
        "{dead:?}"
    );

    // Broadcast: refused to a plain user, taken from an admin and from the operator's key,
    // one copy per account but the sender's.
    let refused = fed.cli("alice", &["broadcast", "hello", "all"], "");
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("forbidden"), "{refused:?}");
    let from_admin = ok(fed.cli(
        "carol",
        &["--json", "broadcast", "maintenance", "at", "six"],
        "",
    ));
    let reply: serde_json::Value =
        serde_json::from_str(from_admin.stdout.trim()).expect("one JSON reply");
    assert_eq!(reply["stored"], 4, "{reply}");
    assert_eq!(reply["undelivered"], serde_json::json!([]), "{reply}");
    ok(fed.cli("dave", &["broadcast", "from", "the", "operator"], ""));
    for user in ["alice", "erin", "dave"] {
        let run = ok(fed.cli(user, &["--json", "check"], ""));
        let texts: Vec<String> = run
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["body"].as_str().map(str::to_owned))
            .collect();
        let want: &[&str] = match user {
            "alice" => &["maintenance at six", "from the operator"],
            "erin" => &["maintenance at six", "from the operator"],
            _ => &["maintenance at six"],
        };
        for text in want {
            assert_eq!(
                texts.iter().filter(|t| t == text).count(),
                1,
                "{user} has {text:?} once: {texts:?}"
            );
        }
    }
}
