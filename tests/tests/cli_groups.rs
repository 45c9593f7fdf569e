//! Issue 24, groups people create: `user-cli create NAME [--mode open|private] [--host
//! ENDPOINT] [--host-key KEY]` and `delete GROUP [--yes]`, their exit codes (the README's
//! table: 1 refused with the server's code, 2 usage, 3 unreachable), and where `create`
//! goes without `--host`.

use std::time::Duration;

use agora_tests::{connections_to, wait_for, CliRun, Federation};

const WAIT: Duration = Duration::from_secs(20);

fn code(run: &CliRun, expected: i32) {
    assert_eq!(run.code, Some(expected), "{run:?}");
}

/// A node of one group answers `create` and `delete` with `forbidden` (groups are made on a
/// group host): exit 1, the code and the node's words on stderr, nothing saved.
#[test]
fn create_and_delete_on_a_node_of_one_are_forbidden() {
    let fed = Federation::start("200ms");
    let node = fed.node("Ops", "127.0.0.1:0", "ops", &[]);
    fed.join_when_listed("alice", "Ops");

    // Without --host: the one host alice's groups are on.
    let run = fed.cli("alice", &["create", "Night Shift"], "");
    code(&run, 1);
    assert!(run.stderr.contains("Night Shift"), "{run:?}");
    assert!(run.stderr.contains("forbidden"), "{run:?}");
    assert!(
        run.stderr.contains("group host"),
        "the node's words: {run:?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");

    // With --host, its key from the registry's listing; --json changes nothing on stderr.
    let run = fed.cli(
        "bob",
        &[
            "--json",
            "create",
            "Night Shift",
            "--mode",
            "private",
            "--host",
            node.host_port(),
        ],
        "",
    );
    code(&run, 1);
    assert!(run.stderr.contains("forbidden"), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");

    let run = fed.cli("alice", &["delete", "Ops", "--yes"], "");
    code(&run, 1);
    assert!(run.stderr.contains("forbidden"), "{run:?}");
    // Still there, still alice's.
    let run = fed.cli("alice", &["send", "Ops", "still here"], "");
    code(&run, 0);
}

/// `create` with no host to go to, or no key for it, is a usage error (exit 2) naming
/// `--host` or `--host-key`; a host that does not answer is exit 3.
#[test]
fn create_without_a_host_is_usage_and_an_unreachable_host_is_exit_3() {
    let fed = Federation::start("200ms");
    let run = fed.cli("alice", &["create", "team"], "");
    code(&run, 2);
    assert!(run.stderr.contains("--host"), "{run:?}");

    // Nothing listed at this endpoint: no key known for it.
    let silent = "127.0.0.1:9";
    let run = fed.cli("alice", &["create", "team", "--host", silent], "");
    code(&run, 2);
    assert!(run.stderr.contains("--host-key"), "{run:?}");

    let key = fed.user_key("somehost");
    let run = fed.cli(
        "alice",
        &[
            "--timeout",
            "300ms",
            "create",
            "team",
            "--host",
            silent,
            "--host-key",
            &key,
        ],
        "",
    );
    code(&run, 3);
    assert!(run.stderr.contains("unreachable"), "{run:?}");
    assert!(run.stderr.contains("300ms"), "{run:?}");

    for bad in [
        vec!["create", "team", "--mode", "secret"],
        vec!["create", "team", "--host", "127.0.0.1:99999"],
        vec!["create", "team", "--host-key", "not-a-key"],
    ] {
        let run = fed.cli("alice", &bad, "");
        code(&run, 2);
    }
}

/// `delete` asks first: alone without a terminal and without --yes it refuses (exit 2)
/// before reaching anything; in a script the next line answers; at the prompt a typed
/// answer other than `yes` deletes nothing.
#[test]
fn delete_asks_and_without_a_terminal_needs_yes() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Ops", "127.0.0.1:0", "ops", &[]);
    fed.join_when_listed("alice", "Ops");

    let run = fed.cli("alice", &["delete", "Ops"], "yes\n");
    code(&run, 2);
    assert!(run.stderr.contains("--yes"), "{run:?}");

    // A script: the line after `delete` is the answer.
    let run = fed.cli("alice", &[], "delete Ops\nno\nsend Ops after\n");
    code(&run, 0);
    assert!(
        run.stderr.contains("not confirmed; nothing deleted"),
        "{run:?}"
    );
    assert!(run.stdout.contains("sent to Ops"), "{run:?}");

    // The prompt: asked, answered no; `help` lists both commands.
    let mut alice = fed.prompt("alice");
    let at = alice.expect(0, "agora> ");
    alice.type_line("help");
    let at = alice.expect(at, "create");
    let at = alice.expect(at, "delete");
    let at = alice.expect(at, "agora> ");
    alice.type_line("delete Ops");
    let at = alice.expect(at, "Type yes: ");
    alice.type_line("no");
    let at = alice.expect(at, "not confirmed; nothing deleted");
    alice.expect(at, "agora> ");
    alice.type_line("exit");
    assert_eq!(alice.wait_exit(), Some(0), "{}", alice.shown());
}

/// The bodies of `group`'s messages (not its join and leave entries), as `user` reads them.
fn bodies(fed: &Federation, user: &str, group: &str) -> Vec<String> {
    let run = fed.cli(user, &["--json", "messages", group], "");
    code(&run, 0);
    run.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["kind"] == "message")
        .map(|m| {
            assert_eq!(m["group"], group, "{m}");
            m["body"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// Issue 24 (docs/design/group-host.md §0): user-cli kept one client per endpoint, made
/// with the first group's name, so on a group host a second group's messages went to the
/// first. Two groups of one host, written to by one process (one client for the host) and
/// by several, each get their own messages.
#[test]
fn two_groups_on_one_host_get_their_own_messages() {
    let fed = Federation::start("200ms");
    let _host = fed.host("host", &["--group", "Ops", "--group", "Dev"]);
    fed.join_when_listed("alice", "Ops");
    fed.join_when_listed("alice", "Dev");

    code(&fed.cli("alice", &["send", "Ops", "to ops"], ""), 0);
    code(&fed.cli("alice", &["send", "Dev", "to dev"], ""), 0);
    // One process, both groups: one client for the host, each request naming its group.
    code(
        &fed.cli("alice", &[], "send Dev again dev\nsend Ops again ops\n"),
        0,
    );
    assert_eq!(bodies(&fed, "alice", "Ops"), ["to ops", "again ops"]);
    assert_eq!(bodies(&fed, "alice", "Dev"), ["to dev", "again dev"]);

    // A member of one is not of the other.
    fed.join_when_listed("bob", "Dev");
    assert_eq!(bodies(&fed, "bob", "Dev"), ["to dev", "again dev"]);
    let run = fed.cli("bob", &["send", "Ops", "not a member"], "");
    code(&run, 1);
    assert!(run.stderr.contains("not a member"), "{run:?}");
}

/// The prompt and `watch` follow two groups of one host, each entry shown under its own
/// group, and leaving one keeps the other followed; `watch` holds one connection to the host
/// for both.
#[test]
fn the_prompt_and_watch_follow_two_groups_of_one_host_each_under_its_name() {
    let fed = Federation::start("200ms");
    let host = fed.host("host", &["--group", "Ops", "--group", "Dev"]);
    for user in ["alice", "bob", "carol"] {
        fed.join_when_listed(user, "Ops");
        fed.join_when_listed(user, "Dev");
    }
    let mut watch = fed.spawn_cli("bob", &["--json", "watch", "Ops", "Dev"]);
    assert!(watch.wait_stderr("watching Ops", WAIT), "bob's watch");
    assert!(watch.wait_stderr("watching Dev", WAIT), "bob's watch");
    let mut alice = fed.prompt("alice");
    let at = alice.expect(0, "agora> ");

    code(&fed.cli("carol", &["send", "Ops", "for ops"], ""), 0);
    code(&fed.cli("carol", &["send", "Dev", "for dev"], ""), 0);
    let ops = alice.expect_line(0, "carol: for ops");
    let dev = alice.expect_line(0, "carol: for dev");
    let lines = alice.lines();
    assert!(lines[ops].contains(" Ops #"), "{lines:#?}");
    assert!(lines[dev].contains(" Dev #"), "{lines:#?}");

    // Leaving Ops at the prompt: Dev is still followed there.
    alice.type_line("leave Ops");
    alice.expect(at, "left Ops");
    code(&fed.cli("carol", &["send", "Dev", "still dev"], ""), 0);
    alice.expect_line(0, "carol: still dev");
    alice.type_line("exit");
    assert_eq!(alice.wait_exit(), Some(0), "{}", alice.shown());

    let mut seen = Vec::new();
    let all = watch.wait_lines(WAIT, |lines| {
        seen = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["sender"] == "carol" && m["kind"] == "message")
            .map(|m| format!("{} {}", m["group"], m["body"]))
            .collect();
        seen.len() >= 3
    });
    assert!(all, "{seen:?}");
    // Only bob's watch is connected now: one connection for both groups.
    let mut held = 0;
    let one = wait_for(WAIT, || {
        held = connections_to(&host.endpoint);
        held == 1
    });
    assert!(one, "{held} connections to the host");
    assert_eq!(
        seen,
        [
            r#""Ops" "for ops""#,
            r#""Dev" "for dev""#,
            r#""Dev" "still dev""#
        ]
    );
}

/// On a group host, `create` makes a group the creator owns, is a member of and follows
/// (JSON: the host's reply and the host); without --host it goes to the one host of your
/// groups. Refused with the host's code (exit 1): a key not among `--creators`
/// (`forbidden`), a name in use (`name_taken`), past `--max-groups` (`limit_reached`), a
/// delete by someone other than the owner (`forbidden`). The owner's delete frees the name
/// and leaves the host's other groups as they were.
#[test]
fn create_on_a_host_makes_your_group_and_delete_frees_its_name() {
    let fed = Federation::start("200ms");
    let alice_key = fed.user_key("alice");
    // The operator's Lobby, and room for two more.
    let host = fed.host(
        "host",
        &[
            "--group",
            "Lobby",
            "--creators",
            &alice_key,
            "--max-groups",
            "3",
        ],
    );
    let key = host.key.clone().expect("the host's key");
    let create = |user: &str, name: &str| {
        fed.cli(
            user,
            &[
                "--json",
                "create",
                name,
                "--host",
                host.host_port(),
                "--host-key",
                &key,
            ],
            "",
        )
    };
    let run = create("bob", "Ops");
    code(&run, 1);
    assert!(run.stderr.contains("Ops: forbidden"), "{run:?}");

    let run = create("alice", "Ops");
    code(&run, 0);
    let created: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
    assert_eq!(created["group"], "Ops");
    assert_eq!(created["mode"], "open");
    assert_eq!(created["owner"], alice_key);
    assert_eq!(created["host"], host.endpoint);
    let run = create("alice", "Ops");
    code(&run, 1);
    assert!(run.stderr.contains("name_taken"), "{run:?}");

    // Without --host: the one host alice's groups are on (its key saved with Ops).
    let run = fed.cli("alice", &["create", "Dev", "--mode", "private"], "");
    code(&run, 0);
    assert!(
        run.stdout
            .contains(&format!("created Dev (private) on {}", host.endpoint)),
        "{run:?}"
    );
    let run = create("alice", "Third");
    code(&run, 1);
    assert!(run.stderr.contains("limit_reached"), "{run:?}");

    // Alice is a member of both already, and writes in them.
    code(&fed.cli("alice", &["send", "Ops", "hello ops"], ""), 0);
    code(&fed.cli("alice", &["send", "Dev", "hello dev"], ""), 0);
    fed.join_when_listed("bob", "Ops");
    assert_eq!(bodies(&fed, "bob", "Ops"), ["hello ops"]);
    let run = fed.cli("bob", &["join", "Dev"], "");
    code(&run, 1);
    let run = fed.cli("bob", &["delete", "Ops", "--yes"], "");
    code(&run, 1);
    assert!(run.stderr.contains("forbidden"), "{run:?}");

    let run = fed.cli("alice", &["--json", "delete", "Ops", "--yes"], "");
    code(&run, 0);
    let deleted: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
    assert_eq!(
        deleted,
        serde_json::json!({"group": "Ops", "deleted": true})
    );
    let run = fed.cli("alice", &["send", "Ops", "gone?"], "");
    code(&run, 1);
    // Dev is as it was; the name Ops is free again, for a new group.
    assert_eq!(bodies(&fed, "alice", "Dev"), ["hello dev"]);
    code(&create("alice", "Ops"), 0);
    assert!(bodies(&fed, "alice", "Ops").is_empty());
}

/// At the prompt: `create` makes the group and follows it at once (another member's message
/// shows above the prompt); `delete`, asked and answered `yes`, deletes it.
#[test]
fn the_prompt_creates_follows_and_deletes_a_group() {
    let fed = Federation::start("200ms");
    let host = fed.host("host", &["--group", "Lobby", "--creators", "any"]);
    let key = host.key.clone().expect("the host's key");
    let mut alice = fed.prompt("alice");
    let at = alice.expect(0, "agora> ");
    alice.type_line(&format!(
        "create Night --host {} --host-key '{key}'",
        host.host_port()
    ));
    let at = alice.expect(at, "created Night (open)");
    let at = alice.expect(at, "agora> ");

    fed.join_when_listed("bob", "Night");
    code(&fed.cli("bob", &["send", "Night", "evening all"], ""), 0);
    let line = alice.expect_line(0, "bob: evening all");
    assert!(
        alice.lines()[line].contains(" Night #"),
        "{}",
        alice.shown()
    );

    alice.type_line("delete Night");
    let at = alice.expect(at, "Type yes: ");
    alice.type_line("yes");
    let at = alice.expect(at, "deleted Night");
    alice.expect(at, "agora> ");
    alice.type_line("exit");
    assert_eq!(alice.wait_exit(), Some(0), "{}", alice.shown());
    let run = fed.cli("bob", &["send", "Night", "anyone?"], "");
    code(&run, 1);
}

/// Issue 24 item 3: the prompt held two connections to a host whose groups it followed and
/// commanded: its live feed's, and a REQ beside it for its commands. Its commands now go
/// over the feed's connection (each behind a tag the host echoes), so a prompt following two
/// groups of one host, sending to both and reading their history, holds one.
#[test]
fn a_prompt_following_and_commanding_two_groups_of_a_host_holds_one_connection() {
    let fed = Federation::start("200ms");
    let host = fed.host("host", &["--group", "Ops", "--group", "Dev"]);
    for user in ["alice", "carol"] {
        fed.join_when_listed(user, "Ops");
        fed.join_when_listed(user, "Dev");
    }
    let mut alice = fed.prompt("alice");
    let at = alice.expect(0, "agora> ");
    alice.type_line("send Ops to ops");
    let at = alice.expect(at, "sent to Ops: seq");
    alice.type_line("send Dev to dev");
    let at = alice.expect(at, "sent to Dev: seq");
    alice.type_line("messages Ops");
    let at = alice.expect(at, "alice: to ops");
    alice.type_line("messages Dev");
    let at = alice.expect(at, "alice: to dev");
    // Both groups are followed live over that connection.
    code(&fed.cli("carol", &["send", "Ops", "for ops"], ""), 0);
    code(&fed.cli("carol", &["send", "Dev", "for dev"], ""), 0);
    alice.expect_line(0, "carol: for ops");
    alice.expect_line(0, "carol: for dev");

    // carol's one-shot clients are gone: only the prompt is connected, once.
    let mut held = 0;
    let one = wait_for(WAIT, || {
        held = connections_to(&host.endpoint);
        held == 1
    });
    assert!(one, "the prompt holds {held} connections to the host");
    // And it stays one after more commands.
    alice.type_line("send Ops again");
    let at = alice.expect(at, "sent to Ops: seq");
    alice.type_line("members Dev");
    alice.expect(at, "carol");
    assert_eq!(connections_to(&host.endpoint), 1);
    alice.type_line("exit");
    assert_eq!(alice.wait_exit(), Some(0), "{}", alice.shown());
    assert_eq!(bodies(&fed, "alice", "Ops"), ["to ops", "for ops", "again"]);
}
