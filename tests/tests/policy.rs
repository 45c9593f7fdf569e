//! Group policy end to end over CURVE: owner, admins, private groups, invites, kicks, bans,
//! and the policy entries in the log.

use std::time::Duration;

use agora_tests::{CliRun, Federation};

const WAIT: Duration = Duration::from_secs(20);

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

fn refused(run: CliRun, code: &str) -> CliRun {
    assert_eq!(run.code, Some(1), "expected a refusal: {run:?}");
    assert!(run.stderr.contains(code), "expected {code}: {run:?}");
    assert!(
        run.stdout.is_empty(),
        "a refused peer read something: {run:?}"
    );
    run
}

#[test]
fn a_private_group_takes_only_invited_keys_and_shows_outsiders_nothing() {
    let fed = Federation::start("200ms");
    let alice = fed.user_key("alice");
    let _node = fed.node(
        "Secret",
        "127.0.0.1:0",
        "secret",
        &["--private", "--owner", &alice],
    );
    // The owner joins without an invitation.
    fed.join_when_listed("alice", "Secret");
    ok(fed.cli("alice", &["send", "Secret", "for members only"], ""));

    refused(fed.cli("bob", &["join", "Secret"], ""), "not_invited");
    refused(fed.cli("bob", &["messages", "Secret"], ""), "not a member");
    refused(fed.cli("bob", &["members", "Secret"], ""), "not a member");
    let mut watch = fed.spawn_cli("bob", &["--json", "watch", "Secret"]);
    assert_eq!(watch.wait_exit(WAIT), Some(Some(1)), "{:?}", watch.errors);
    assert!(watch.lines.is_empty());

    // Only the owner or an admin may invite.
    refused(
        fed.cli("bob", &["invite", "Secret", &fed.user_key("bob")], ""),
        "forbidden",
    );
    ok(fed.cli("alice", &["invite", "Secret", &fed.user_key("bob")], ""));
    ok(fed.cli("bob", &["join", "Secret"], ""));
    let run = ok(fed.cli("bob", &["messages", "Secret"], ""));
    assert!(run.stdout.contains("alice: for members only"), "{run:?}");
    assert!(run.stdout.contains("* alice invite"), "{run:?}");
    assert!(ok(fed.cli("bob", &["members", "Secret"], ""))
        .stdout
        .contains("alice"));
}

#[test]
fn kicks_bans_and_admins() {
    let fed = Federation::start("200ms");
    let alice = fed.user_key("alice");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &["--owner", &alice]);
    fed.join_when_listed("alice", "Cool Group");
    for u in ["bob", "carol", "mallory"] {
        ok(fed.cli(u, &["join", "Cool Group"], ""));
    }

    // Members who are not the owner or an admin manage nothing.
    refused(
        fed.cli("carol", &["kick", "Cool Group", "bob"], ""),
        "forbidden",
    );
    refused(
        fed.cli("bob", &["promote", "Cool Group", "bob"], ""),
        "forbidden",
    );

    // A ban removes the member at once, and keeps the key out, whatever name it claims.
    ok(fed.cli(
        "alice",
        &["ban", "Cool Group", &fed.user_key("mallory")],
        "",
    ));
    refused(
        fed.cli("mallory", &["messages", "Cool Group"], ""),
        "not a member",
    );
    refused(fed.cli("mallory", &["join", "Cool Group"], ""), "banned");
    let mut watch = fed.spawn_cli("mallory", &["--json", "watch", "Cool Group"]);
    assert_eq!(watch.wait_exit(WAIT), Some(Some(1)));
    assert!(watch.lines.is_empty());

    // The owner promotes bob; bob, now an admin, kicks carol; carol may come back.
    ok(fed.cli("alice", &["promote", "Cool Group", "bob"], ""));
    ok(fed.cli("bob", &["kick", "Cool Group", "carol"], ""));
    refused(
        fed.cli("carol", &["messages", "Cool Group"], ""),
        "not a member",
    );
    // An admin cannot kick the owner, nor ban it.
    refused(
        fed.cli("bob", &["kick", "Cool Group", "alice"], ""),
        "forbidden",
    );
    refused(
        fed.cli("bob", &["ban", "Cool Group", &alice], ""),
        "forbidden",
    );
    ok(fed.cli("carol", &["join", "Cool Group"], ""));

    // Every change is an entry in the log, in order.
    let run = ok(fed.cli("alice", &["--json", "messages", "Cool Group"], ""));
    let actions: Vec<String> = run
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["kind"] == "policy")
        .map(|e| {
            let body: serde_json::Value = e["body"].clone();
            format!(
                "{} {}",
                e["sender"].as_str().unwrap_or(""),
                body["action"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(actions, vec!["alice ban", "alice promote", "bob kick"]);

    // Unban lets the key join again; set_mode makes the group private for newcomers.
    ok(fed.cli(
        "alice",
        &["unban", "Cool Group", &fed.user_key("mallory")],
        "",
    ));
    ok(fed.cli("mallory", &["join", "Cool Group"], ""));
    ok(fed.cli("alice", &["set_mode", "Cool Group", "private"], ""));
    refused(fed.cli("dave", &["join", "Cool Group"], ""), "not_invited");
}
