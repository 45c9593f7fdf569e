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
    let fed = Federation::start_with("200ms", &["--max-mailbox", "2"]);
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
            .contains("bob\tonline")
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
