//! Issue 23, one user in many processes: user-cli processes of one user running at once
//! (terminals, scripts, one-shot commands) share the client state file. Each save is atomic
//! and made under a lock, merging what the others saved meanwhile, so no process prints a
//! warning and no process's update is lost.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use agora_tests::{wait_for, CliRun, Federation};

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

/// The state file of `user`, as JSON.
fn state_of(fed: &Federation, user: &str) -> serde_json::Value {
    let path = std::path::Path::new(&fed.state_dir()).join(format!("{user}.json"));
    let text = std::fs::read_to_string(&path).expect("the state file");
    serde_json::from_str(&text).expect("state JSON")
}

/// Issue 23: 20 processes of one user at once, each with an update of its own to save (a
/// group joined, a group unsubscribed, entries seen by `check`) beside sends and listings.
/// Before, each saved the state it had read at its start (the last save won) and the fixed
/// temporary name made saves fail with `No such file or directory`.
#[test]
fn twenty_processes_of_one_user_print_no_warning_and_lose_no_update() {
    const JOINERS: usize = 8;
    let fed = Federation::start("200ms");
    let names: Vec<String> = (0..JOINERS + 2).map(|i| format!("g{i}")).collect();
    let pending: Vec<_> = names
        .iter()
        .map(|n| fed.spawn_node(n, "127.0.0.1:0", n, &[]))
        .collect();
    let _nodes: Vec<_> = pending
        .into_iter()
        .map(|p| p.wait_listening(Duration::from_secs(30)))
        .collect();
    // alice follows the last two groups already; bob has written in them.
    let (a, b) = (&names[JOINERS], &names[JOINERS + 1]);
    for g in [a, b] {
        fed.join_when_listed("alice", g);
        fed.join_when_listed("bob", g);
        ok(fed.cli("bob", &[], &format!("send {g} one\nsend {g} two\n")));
    }
    for g in &names[..JOINERS] {
        // Listed, so that the joins below do not wait for a registration.
        fed.join_when_listed("bob", g);
    }

    // 20 at once: 8 join a group each, 1 unsubscribes from a, 11 check (seeing bob's
    // messages) or send and list.
    let runs: Vec<(String, CliRun)> = std::thread::scope(|s| {
        let mut threads = Vec::new();
        for (i, g) in names[..JOINERS].iter().enumerate() {
            let fed = &fed;
            threads.push(s.spawn(move || {
                (
                    format!("join {g} ({i})"),
                    fed.cli("alice", &["join", g], ""),
                )
            }));
        }
        threads.push(s.spawn(|| {
            (
                "unsubscribe".to_owned(),
                fed.cli("alice", &["unsubscribe", a], ""),
            )
        }));
        for i in 0..11 {
            let fed = &fed;
            threads.push(s.spawn(move || {
                let run = if i % 2 == 0 {
                    fed.cli("alice", &["check"], "")
                } else {
                    fed.cli(
                        "alice",
                        &[],
                        &format!("send {b} mine {i}\nmessages {b} --latest 1\n"),
                    )
                };
                (format!("check or send ({i})"), run)
            }));
        }
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    assert_eq!(runs.len(), 20);
    for (what, run) in &runs {
        assert_eq!(run.code, Some(0), "{what}: {run:?}");
        assert_eq!(run.stderr, "", "{what} printed on stderr: {run:?}");
    }

    let state = state_of(&fed, "alice");
    let groups = state["groups"].as_object().expect("groups");
    for g in &names {
        assert!(groups.contains_key(g), "{g} was lost: {state:#}");
    }
    assert_eq!(groups.len(), names.len(), "{state:#}");
    assert_eq!(
        groups[a.as_str()]["subscribed"],
        false,
        "the unsubscribe was lost: {state:#}"
    );
    for g in &names[..JOINERS] {
        assert_eq!(groups[g.as_str()]["subscribed"], true, "{state:#}");
    }
    // Each check saw bob's two messages (seqs after both joins) in both groups.
    let bobs_last = |g: &str| -> u64 {
        let run = ok(fed.cli("bob", &["--json", "messages", g], ""));
        run.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["sender"] == "bob" && m["kind"] == "message")
            .filter_map(|m| m["seq"].as_u64())
            .max()
            .expect("bob's messages")
    };
    for g in [a, b] {
        let seen = groups[g.as_str()]["last_seen"].as_u64().expect("last_seen");
        assert!(
            seen >= bobs_last(g),
            "{g}: the checks' last seen was lost: {state:#}"
        );
    }
    // No temporary file is left beside the state.
    let leftovers: Vec<String> = std::fs::read_dir(fed.state_dir())
        .expect("state dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Issue 23: your own messages never count as unread, sent from a script or a one-shot
/// command, and `check` does not show them; others' do count.
#[test]
fn your_own_messages_do_not_count_as_unread() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    fed.join_when_listed("bob", "Cool Group");
    ok(fed.cli("alice", &["check"], ""));
    ok(fed.cli("alice", &[], "send \"Cool Group\" from a script\n"));
    ok(fed.cli(
        "alice",
        &["send", "Cool Group", "from", "a", "one-shot"],
        "",
    ));
    let run = ok(fed.cli("alice", &["check"], ""));
    assert!(run.stdout.contains("Cool Group: 0 unread"), "{run:?}");
    assert!(!run.stdout.contains("from a"), "{run:?}");

    ok(fed.cli("bob", &["send", "Cool Group", "hello", "alice"], ""));
    ok(fed.cli("alice", &["send", "Cool Group", "hi", "bob"], ""));
    let run = ok(fed.cli("alice", &["--json", "check"], ""));
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["group"] == "Cool Group" && l["unread"] == 1),
        "{run:?}"
    );
    let shown: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("seq").is_some()).collect();
    assert_eq!(shown.len(), 1, "{run:?}");
    assert_eq!(shown[0]["sender"], "bob");
    // All seen: nothing is unread after.
    let run = ok(fed.cli("alice", &["check"], ""));
    assert!(run.stdout.contains("Cool Group: 0 unread"), "{run:?}");
}

/// A process that holds a file's `flock` (util-linux `flock` in a shell that then becomes
/// `sleep`, so one process holds it), killed when dropped.
struct HeldLock(Child);

impl HeldLock {
    fn on(path: &std::path::Path) -> HeldLock {
        let child = Command::new("sh")
            .args(["-c", "exec 9>>\"$0\" && flock 9 && exec sleep 60"])
            .arg(path)
            .spawn()
            .expect("sh with flock (util-linux)");
        let held = HeldLock(child);
        let taken = wait_for(Duration::from_secs(10), || {
            Command::new("flock")
                .args(["--nonblock", "--exclusive"])
                .arg(path)
                .arg("true")
                .status()
                .is_ok_and(|s| s.code() == Some(1))
        });
        assert!(taken, "the lock was not taken");
        held
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Review of issue 23: a save waited for `USER.json.lock` with no time limit, so another
/// process stopped in the middle of a save (Ctrl-Z) hung every command of that user, and
/// the prompt with it. A command now gives up on the lock after 2 s, warns, and finishes;
/// its update is saved by a later save.
#[test]
fn a_held_state_lock_does_not_hang_a_one_shot_command() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    fed.join_when_listed("bob", "Cool Group");
    ok(fed.cli("alice", &["check"], ""));
    ok(fed.cli("bob", &["send", "Cool Group", "while", "locked"], ""));

    let lock = std::path::Path::new(&fed.state_dir()).join("alice.json.lock");
    let held = HeldLock::on(&lock);
    let started = Instant::now();
    let run = ok(fed.cli("alice", &["check"], ""));
    let took = started.elapsed();
    assert!(run.stdout.contains("while locked"), "{run:?}");
    assert!(
        took < Duration::from_secs(10),
        "check took {took:?} with the lock held"
    );
    assert!(
        run.stderr
            .contains("alice.json.lock is held by another process for 2s"),
        "{run:?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "warned once: {run:?}");
    drop(held);

    // The lock free again: the next check saves what it sees, with no warning.
    let run = ok(fed.cli("alice", &["check"], ""));
    assert_eq!(run.stderr, "", "{run:?}");
    let run = ok(fed.cli("alice", &["check"], ""));
    assert!(run.stdout.contains("Cool Group: 0 unread"), "{run:?}");
}
