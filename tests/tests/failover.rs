//! Standby failover of a group stored in PostgreSQL: two `group-node` processes share one
//! database and the group's key pair; one holds the lease and serves, the other waits. These
//! run on loopback in one network namespace; the multi-host test cuts real links.

use std::time::{Duration, Instant};

use agora_tests::{wait_for, CliRun, Federation, Server};

const GROUP: &str = "ha";

fn json_lines(run: &CliRun) -> Vec<serde_json::Value> {
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

/// Every entry's seq, and the chat bodies in order, as bob reads the log.
fn read_log(fed: &Federation) -> (Vec<u64>, Vec<String>) {
    let entries = json_lines(&ok(fed.cli("bob", &["--json", "messages", GROUP], "")));
    let seqs = entries
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect();
    let bodies = entries
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| e["body"].as_str().unwrap_or("").to_owned())
        .collect();
    (seqs, bodies)
}

#[test]
fn a_standby_takes_over_after_kill_9_and_nothing_acked_is_lost() {
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let mut active: Server = fed.node(GROUP, "127.0.0.1:0", "a", &["--store", &url]);
    fed.share_node_keys("a", "b");
    let standby = fed.spawn_node(GROUP, "127.0.0.1:0", "b", &["--store", &url]);
    assert!(
        wait_for(Duration::from_secs(20), || standby
            .log()
            .contains("waiting for it")),
        "the second node did not become a standby: {}",
        standby.log()
    );

    fed.join_when_listed("alice", GROUP);
    fed.join_when_listed("bob", GROUP);
    fed.join_when_listed("carol", GROUP);
    // carol follows the group live across the failover.
    let mut watch = fed.spawn_cli("carol", &["--json", "watch", GROUP, "--after-seq", "0"]);
    assert!(watch.wait_stderr("watching", Duration::from_secs(20)));
    let mut acked = Vec::new();
    for i in 0..10 {
        let body = format!("before {i}");
        ok(fed.cli("alice", &["send", GROUP, &body], ""));
        acked.push(body);
    }

    active.kill9();
    let killed = Instant::now();
    // alice's saved endpoint is the dead node's: her send's first attempt (a third of the
    // default 5 s timeout) goes unanswered, she looks the group up again, and sends the same
    // message (same id) to the new active.
    let body = "after the kill".to_owned();
    let run = fed.cli("alice", &["send", GROUP, &body], "");
    let mut failover = killed.elapsed();
    if run.code != Some(0) {
        // The standby had not registered yet when she looked: one more try.
        ok(fed.cli("alice", &["--timeout", "2s", "send", GROUP, &body], ""));
        failover = killed.elapsed();
    }
    acked.push(body);
    let new_active = standby.wait_listening(Duration::from_secs(10));
    assert!(new_active.log().contains("took the lease"));
    eprintln!("failover: kill -9 to the first ack from the standby in {failover:?}");

    for i in 0..5 {
        let body = format!("after {i}");
        ok(fed.cli("alice", &["send", GROUP, &body], ""));
        acked.push(body);
    }
    let (seqs, bodies) = read_log(&fed);
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "a gap or a duplicate in the log");
    assert_eq!(
        bodies, acked,
        "acked messages lost, duplicated or reordered"
    );
}

#[test]
fn a_node_whose_lease_moved_commits_nothing_and_stops() {
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let mut node = fed.node(GROUP, "127.0.0.1:0", "a", &["--store", &url]);
    fed.join_when_listed("alice", GROUP);
    ok(fed.cli("alice", &["send", GROUP, "first"], ""));

    // Another node took the lease (as one whose link to this node's host is cut would):
    // the epoch moves on in the database while this node still runs.
    let schema: String = {
        let mut db = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        let schema: String = db
            .query_one(
                "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'agora_group_%'",
                &[],
            )
            .expect("the group's schema")
            .get(0);
        db.execute(&format!("UPDATE {schema}.lease SET epoch = epoch + 1"), &[])
            .expect("bump the epoch");
        schema
    };

    let refused = fed.cli("alice", &["--timeout", "2s", "send", GROUP, "fenced"], "");
    assert_ne!(refused.code, Some(0), "a fenced node acked: {refused:?}");
    let status = node
        .wait_exit(Duration::from_secs(10))
        .expect("the fenced node stops");
    assert!(!status.success());
    assert!(node.log().contains("fenced"), "{}", node.log());

    let mut db = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let bodies: Vec<String> = db
        .query(
            &format!("SELECT body FROM {schema}.messages WHERE kind = 'message' ORDER BY seq"),
            &[],
        )
        .expect("read the log")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(bodies, vec!["\"first\"".to_owned()]);
}
