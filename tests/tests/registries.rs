//! Several registries over one PostgreSQL database (`registry --store URL`) behave as one
//! registry: the same public key, the same directory, presence, accounts and mailboxes,
//! DMs pushed across registries, and nothing lost when one of them is killed.
//!
//! These tests always store in PostgreSQL (a throwaway cluster), whatever
//! `AGORA_TEST_STORE` says.

use std::time::Duration;

use agora_tests::{wait_for, CliRun, Federation};

const WAIT: Duration = Duration::from_secs(20);

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

#[test]
fn two_registries_on_one_database_act_as_one_and_losing_one_loses_nothing() {
    // A is the federation's registry; B shares its database.
    let mut fed = Federation::start_on_postgres("200ms", &["--presence-ttl", "3s"]);
    let b = fed.another_registry("b", "200ms", &["--presence-ttl", "3s"]);
    // One key pair: a client pinning either trusts both.
    assert!(fed.registry.key.is_some());
    assert_eq!(
        fed.registry.key, b.key,
        "A and B print different public keys"
    );

    // A group node heartbeating A (nodes take no --store yet) is listed by B.
    let key = fed.registry_key();
    let node_data = fed.path("data-cool");
    let _node = agora_tests::Server::start(
        "group-node",
        &[
            "Cool Group",
            "127.0.0.1:0",
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &key,
            "--data-dir",
            &node_data,
            "--heartbeat",
            "200ms",
        ],
        &fed.dir.path().join("node-cool.log"),
    );
    assert!(
        wait_for(WAIT, || fed
            .cli_via(&b, "carol", &["groups"], "")
            .stdout
            .contains("Cool Group")),
        "B never listed the group heartbeating A"
    );

    // Accounts made through either registry are one set.
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli_via(&b, "bob", &["register", "bob"], ""));
    let taken = fed.cli_via(&b, "mallory", &["register", "alice"], "");
    assert_ne!(taken.code, Some(0), "{taken:?}");

    // Presence set through A is seen through B.
    ok(fed.cli("alice", &["connect", "--away"], ""));
    let whois = ok(fed.cli_via(&b, "bob", &["whois", "alice"], ""));
    assert!(
        whois
            .stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["presence", "away"])),
        "{whois:?}"
    );

    // A DM sent through A reaches bob live through B, where his client is connected.
    let joined = wait_for(WAIT, || {
        fed.cli_via(&b, "bob", &["join", "Cool Group"], "").code == Some(0)
    });
    assert!(joined, "bob could not join through B");
    let mut watch = fed.spawn_cli_via(&b, "bob", &["watch", "Cool Group"]);
    assert!(watch.wait_stderr("watching", WAIT), "{:?}", watch.errors);
    assert!(wait_for(WAIT, || fed
        .cli("alice", &["whois", "bob"], "")
        .stdout
        .lines()
        .any(|l| l.split_whitespace().eq(["presence", "online"]))));
    let sent = ok(fed.cli("alice", &["send_dm", "bob", "live hello"], ""));
    assert!(sent.stdout.contains("sent to bob (#1)"), "{sent:?}");
    assert!(
        watch.wait_lines(WAIT, |lines| lines
            .iter()
            .any(|l| l.starts_with("MESSAGE 1 FROM alice [")
                && !l.contains("[Stored]")
                && l.ends_with(": live hello"))),
        "the DM sent through A was not pushed through B: {:?}",
        watch.lines
    );
    drop(watch);

    // Stored through A, then A is killed: B has every message, in order, once.
    ok(fed.cli("alice", &["send_dm", "bob", "two"], ""));
    ok(fed.cli("alice", &["send_dm", "bob", "three"], ""));
    fed.kill_registry();
    let run = ok(fed.cli_via(&b, "bob", &["check"], ""));
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("MESSAGE"))
        .collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    for (line, (n, text)) in lines.iter().zip([(2, "two"), (3, "three")]) {
        assert!(
            line.starts_with(&format!("MESSAGE {n} FROM alice [")),
            "{line}"
        );
        assert!(line.ends_with(&format!(": {text}")), "{line}");
    }
    // Acked through B: nothing waits any more; the accounts made through A are there.
    let again = ok(fed.cli_via(&b, "bob", &["check"], ""));
    assert!(again.stdout.contains("direct messages: 0 new"), "{again:?}");
    ok(fed.cli_via(&b, "bob", &["whois", "alice"], ""));

    // Given both, A first: the first run waits A out and moves to B; the next starts at B,
    // the registry that answered (kept in the state file).
    let both = format!("{},{}", fed.registry.endpoint, b.endpoint);
    let moved = ok(fed.cli_at(&both, "bob", &["--timeout", "1s", "whois", "alice"], ""));
    assert!(moved.stderr.contains("trying the next one"), "{moved:?}");
    let direct = ok(fed.cli_at(&both, "bob", &["--timeout", "1s", "whois", "alice"], ""));
    assert!(!direct.stderr.contains("trying the next one"), "{direct:?}");
}
