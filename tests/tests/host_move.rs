//! Moving groups (issue 24 item 8): `group-node host import` of a node of one's data
//! directory into a group host, and `host export` from one host then `host import` into
//! another, each followed by `registry release` as the README says; the group is then served
//! at its new endpoint with its log (the same seqs, ids and times), members, owner and files.
//! The real binaries, SQLite stores (a node of one on PostgreSQL has no file to import).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agora_tests::{bin, run, wait_for, CliRun, Federation};

const WAIT: Duration = Duration::from_secs(30);

/// Whether this run's nodes store in PostgreSQL: then a node of one has no `group.sqlite3`.
fn skipped() -> bool {
    let pg = agora_tests::test_store_is_postgres();
    if pg {
        eprintln!("skipped: host import reads SQLite files, and AGORA_TEST_STORE is PostgreSQL");
    }
    pg
}

/// The endpoint the registry lists for `group`, asked as `user`.
fn listed_at(fed: &Federation, group: &str) -> Option<String> {
    let run = fed.cli("carol", &["--json", "groups"], "");
    run.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|g| g["name"] == group)
        .and_then(|g| g["endpoint"].as_str().map(str::to_owned))
}

/// `registry release NAME` beside the running registry.
fn release(fed: &Federation, group: &str) {
    let out = Command::new(bin("registry"))
        .args(["--data-dir", &fed.path("registry-data"), "release", group])
        .output()
        .expect("run registry release");
    assert!(out.status.success(), "release {group}: {out:?}");
}

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

/// The seq in a `send`/`send_file` ack (`… seq N …`).
fn seq_of(stdout: &str) -> u64 {
    stdout
        .split("seq ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a seq in the ack: {stdout}"))
}

/// The group's whole log as `user` sees it, one JSON object per message (seq, id, time,
/// sender, body, file): what must come through a move unchanged.
fn log_of(fed: &Federation, user: &str, group: &str) -> Vec<serde_json::Value> {
    let run = ok(fed.cli(user, &["--json", "messages", group], ""));
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `user` downloads the file of message `seq` of `group`; returns its bytes.
fn file_of(fed: &Federation, user: &str, group: &str, seq: u64, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    ok(fed.cli(
        user,
        &[
            "get_file",
            group,
            &seq.to_string(),
            "--out",
            out.to_str().expect("utf-8"),
        ],
        "",
    ));
    std::fs::read(out).expect("the downloaded file")
}

#[test]
fn a_node_of_ones_group_imported_into_a_host_is_served_there_with_its_log_members_owner_and_files()
{
    if skipped() {
        return;
    }
    let fed = Federation::start("200ms");
    let alice_key = fed.user_key("alice");
    let mut node = fed.node("news", "127.0.0.1:0", "old", &["--owner", &alice_key]);
    fed.join_when_listed("alice", "news");
    fed.join_when_listed("bob", "news");
    ok(fed.cli("alice", &["send", "news", "before the move"], ""));
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let src = Path::new(&fed.path("report.bin")).to_owned();
    std::fs::write(&src, &data).expect("write");
    let sent = ok(fed.cli(
        "bob",
        &["send_file", "news", src.to_str().expect("utf-8")],
        "",
    ));
    let file_seq = seq_of(&sent.stdout);
    let before = log_of(&fed, "alice", "news");
    assert_eq!(before.len(), 4, "two joins, a message, a file: {before:?}");

    // While the node runs, its data directory is in use: refused, nothing made.
    let host_dir = fed.node_data_dir("new");
    let old_dir = fed.node_data_dir("old");
    let import = ["host", "import", "--data-dir", &host_dir, &old_dir];
    let refused = run("group-node", &import, "");
    assert_eq!(refused.code, Some(4), "{refused:?}");
    assert!(refused.stderr.contains("node.lock"), "{refused:?}");
    assert!(
        !Path::new(&host_dir).exists(),
        "a refused import made the host's directory"
    );

    // The README's move: stop the node, free its name, import, start the host.
    assert!(node.terminate().success(), "{}", node.log());
    release(&fed, "news");
    let imported = run(
        "group-node",
        &[
            "host",
            "import",
            "--data-dir",
            &host_dir,
            &old_dir,
            "--owner",
            &alice_key,
        ],
        "",
    );
    assert_eq!(imported.code, Some(0), "{imported:?}");
    assert!(
        imported.stdout.contains(r#"imported "news""#) && imported.stdout.contains("4 entries"),
        "{imported:?}"
    );
    let host = fed.host("new", &[]);
    assert!(
        wait_for(WAIT, || listed_at(&fed, "news").as_deref()
            == Some(&host.endpoint)),
        "news is listed at {:?}, not at the host {}",
        listed_at(&fed, "news"),
        host.endpoint
    );

    // Its log, members and file, as they were; the log numbers on.
    assert_eq!(log_of(&fed, "alice", "news"), before);
    let members = ok(fed.cli("bob", &["members", "news"], ""));
    assert!(
        members.stdout.contains("alice") && members.stdout.contains("bob"),
        "{members:?}"
    );
    let got = file_of(
        &fed,
        "alice",
        "news",
        file_seq,
        Path::new(&fed.path("got.bin")),
    );
    assert!(got == data, "the file came back different");
    let after = ok(fed.cli("bob", &["send", "news", "after the move"], ""));
    assert_eq!(seq_of(&after.stdout), 5, "{after:?}");
    // Its owner is alice (--owner): she may change the mode, bob may not.
    let by_bob = fed.cli("bob", &["set_mode", "news", "private"], "");
    assert_eq!(by_bob.code, Some(1), "{by_bob:?}");
    ok(fed.cli("alice", &["set_mode", "news", "private"], ""));
    // The source stays whole: its files are still there.
    assert!(Path::new(&old_dir).join("group.sqlite3").is_file());
    assert!(Path::new(&old_dir).join("blobs").join("sha256").is_dir());
}

#[test]
fn a_group_exported_from_one_host_and_imported_into_another_is_served_there_alone() {
    if skipped() {
        return;
    }
    let fed = Federation::start("200ms");
    let mut a = fed.host("a", &["--group", "alpha", "--group", "beta"]);
    for group in ["alpha", "beta"] {
        fed.join_when_listed("alice", group);
    }
    ok(fed.cli("alice", &["send", "alpha", "in alpha"], ""));
    ok(fed.cli("alice", &["send", "beta", "in beta"], ""));
    let data = b"a small file, moved with its group".to_vec();
    let src = Path::new(&fed.path("note.txt")).to_owned();
    std::fs::write(&src, &data).expect("write");
    let sent = ok(fed.cli(
        "alice",
        &["send_file", "alpha", src.to_str().expect("utf-8")],
        "",
    ));
    let file_seq = seq_of(&sent.stdout);
    let alpha_before = log_of(&fed, "alice", "alpha");
    let beta_before = log_of(&fed, "alice", "beta");

    let a_dir = fed.node_data_dir("a");
    let b_dir = fed.node_data_dir("b");
    let moved = fed.path("alpha-moved");
    let export = [
        "host",
        "export",
        "alpha",
        "--data-dir",
        &a_dir,
        "--to",
        &moved,
        "--archive",
    ];
    let refused = run("group-node", &export, "");
    assert_eq!(
        refused.code,
        Some(4),
        "export beside the running host: {refused:?}"
    );
    assert!(!Path::new(&moved).exists());

    assert!(a.terminate().success(), "{}", a.log());
    let exported = run("group-node", &export, "");
    assert_eq!(exported.code, Some(0), "{exported:?}");
    assert!(
        Path::new(&moved).join("group.sqlite3").is_file(),
        "{exported:?}"
    );
    // Not over what is there; a group the host does not have.
    let again = run("group-node", &export, "");
    assert_eq!(again.code, Some(2), "{again:?}");
    assert!(again.stderr.contains("--to"), "{again:?}");
    let none = run(
        "group-node",
        &[
            "host",
            "export",
            "alpha",
            "--data-dir",
            &a_dir,
            "--to",
            &fed.path("nothing"),
        ],
        "",
    );
    assert_eq!(none.code, Some(1), "archived, so no longer there: {none:?}");

    let import = ["host", "import", "--data-dir", &b_dir, &moved];
    let imported = run("group-node", &import, "");
    assert_eq!(imported.code, Some(0), "{imported:?}");
    let twice = run("group-node", &import, "");
    assert_eq!(twice.code, Some(1), "{twice:?}");
    assert!(twice.stderr.contains("already"), "{twice:?}");

    release(&fed, "alpha");
    let a = fed.host("a", &[]);
    let b = fed.host("b", &[]);
    assert!(
        wait_for(WAIT, || listed_at(&fed, "alpha").as_deref()
            == Some(&b.endpoint)
            && listed_at(&fed, "beta").as_deref() == Some(&a.endpoint)),
        "alpha at {:?} (b is {}), beta at {:?} (a is {})",
        listed_at(&fed, "alpha"),
        b.endpoint,
        listed_at(&fed, "beta"),
        a.endpoint
    );
    assert_eq!(log_of(&fed, "alice", "alpha"), alpha_before);
    assert_eq!(log_of(&fed, "alice", "beta"), beta_before);
    let got = file_of(
        &fed,
        "alice",
        "alpha",
        file_seq,
        Path::new(&fed.path("got.txt")),
    );
    assert!(got == data, "the file came back different");
    let next = ok(fed.cli("alice", &["send", "alpha", "on b"], ""));
    assert_eq!(
        seq_of(&next.stdout),
        alpha_before.len() as u64 + 1,
        "{next:?}"
    );
    // The old host serves beta alone now.
    assert!(a.log().contains("serving groups=1 "), "{}", a.log());
}

/// A node that died by `kill -9` left its last commits in its WAL: the import reads them
/// too, so every message it acked is in the host.
#[test]
fn a_node_killed_with_sigkill_is_imported_with_every_message_it_acked() {
    if skipped() {
        return;
    }
    let fed = Federation::start("200ms");
    let mut node = fed.node("crashed", "127.0.0.1:0", "old", &[]);
    fed.join_when_listed("alice", "crashed");
    let mut script = String::new();
    for i in 1..=20 {
        script.push_str(&format!("send crashed message-{i}\n"));
    }
    let sent = ok(fed.cli("alice", &[], &script));
    assert_eq!(sent.stdout.matches("seq ").count(), 20, "{sent:?}");
    node.kill9();

    release(&fed, "crashed");
    let host_dir = fed.node_data_dir("new");
    let imported = run(
        "group-node",
        &[
            "host",
            "import",
            "--data-dir",
            &host_dir,
            &fed.node_data_dir("old"),
        ],
        "",
    );
    assert_eq!(imported.code, Some(0), "{imported:?}");
    assert!(imported.stdout.contains("21 entries"), "{imported:?}");
    let host = fed.host("new", &[]);
    assert!(
        wait_for(WAIT, || listed_at(&fed, "crashed").as_deref()
            == Some(&host.endpoint)),
        "crashed is listed at {:?}",
        listed_at(&fed, "crashed")
    );
    let log = log_of(&fed, "alice", "crashed");
    let bodies: Vec<_> = log.iter().skip(1).map(|m| m["body"].clone()).collect();
    let want: Vec<_> = (1..=20)
        .map(|i| serde_json::Value::String(format!("message-{i}")))
        .collect();
    assert_eq!(bodies, want);
    let seqs: Vec<_> = log.iter().map(|m| m["seq"].as_u64().unwrap_or(0)).collect();
    assert_eq!(seqs, (1..=21).collect::<Vec<u64>>(), "gap-free, from 1");
}
