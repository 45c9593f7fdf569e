//! Metrics and health of the real servers (`--metrics`): a scrape before and after traffic
//! shows the counters and gauges moving with it.

use std::time::Duration;

use agora_tests::{wait_for, CliRun, Federation};

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    match ureq::get(&url).timeout(Duration::from_secs(5)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// The value of the sample `name` (with its labels, as exposed) in a scrape; 0 if absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_scrape_of_each_server_moves_with_traffic_and_both_say_they_serve() {
    let fed = Federation::start_with("200ms", &["--metrics", "127.0.0.1:0"]);
    let node = fed.node(
        "Cool Group",
        "127.0.0.1:0",
        "cool",
        &["--metrics", "127.0.0.1:0"],
    );
    let (reg_addr, node_addr) = (fed.registry.metrics_addr(), node.metrics_addr());
    assert_eq!(get(&reg_addr, "/healthz"), (200, "serving\n".into()));
    assert_eq!(get(&node_addr, "/healthz"), (200, "serving\n".into()));

    let before = get(&node_addr, "/metrics").1;
    fed.join_when_listed("alice", "Cool Group");
    for n in 0..5 {
        ok(fed.cli(
            "alice",
            &["send", "Cool Group", &format!("message {n}")],
            "",
        ));
    }
    let refused = fed.cli("mallory", &["send", "Cool Group", "let me in"], "");
    assert_eq!(refused.code, Some(1), "{refused:?}");
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("bob", &["register", "bob"], ""));
    ok(fed.cli("alice", &["send_dm", "bob", "waiting for you"], ""));

    // The node: requests by action and code, a commit batch and an fsync per send, the last
    // seq (alice's join and five messages).
    assert!(
        wait_for(Duration::from_secs(10), || {
            sample(&get(&node_addr, "/metrics").1, "agora_log_last_seq") == 6.0
        }),
        "{}",
        get(&node_addr, "/metrics").1
    );
    let after = get(&node_addr, "/metrics").1;
    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(
        moved(r#"agora_requests_total{action="send",code="ok"}"#),
        5.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"agora_requests_total{action="send",code="not_member"}"#),
        1.0,
        "{after}"
    );
    assert!(moved("agora_commit_batch_size_count") >= 6.0, "{after}");
    if fed.store.is_none() {
        // SQLite's WAL is synced by the node; a PostgreSQL commit is durable by itself.
        assert!(moved("agora_fsync_seconds_count") >= 1.0, "{after}");
    }
    assert!(sample(&after, "agora_log_bytes") > 0.0, "{after}");
    assert!(after.contains("agora_pushes_total"), "{after}");

    // The registry: its own requests, accounts, and bob's unread message.
    assert!(
        wait_for(Duration::from_secs(10), || {
            let text = get(&reg_addr, "/metrics").1;
            sample(&text, "agora_mailbox_depth") == 1.0 && sample(&text, "agora_accounts") == 2.0
        }),
        "{}",
        get(&reg_addr, "/metrics").1
    );
    let reg = get(&reg_addr, "/metrics").1;
    assert_eq!(
        sample(&reg, r#"agora_requests_total{action="send_dm",code="ok"}"#),
        1.0,
        "{reg}"
    );
    assert!(
        sample(&reg, r#"agora_requests_total{action="lookup",code="ok"}"#) >= 1.0,
        "{reg}"
    );
    assert_eq!(sample(&reg, "agora_groups"), 1.0, "{reg}");
}

/// A group host's scrape is host-wide: its groups by state, entries appended over all of
/// them, subscriptions and bytes; no per-group series (no `agora_log_last_seq`, which only
/// a node of one has, and no `group` label).
#[test]
fn a_group_host_scrape_counts_its_groups_by_state_and_carries_no_group_series() {
    let fed = Federation::start("200ms");
    let host = fed.host(
        "m",
        &[
            "--group",
            "alpha",
            "--group",
            "beta",
            "--group",
            "gamma",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let addr = host.metrics_addr();
    let live = |text: &str| sample(text, r#"agora_host_groups{state="live"}"#);
    assert!(
        wait_for(Duration::from_secs(10), || live(&get(&addr, "/metrics").1)
            == 3.0),
        "{}",
        get(&addr, "/metrics").1
    );
    let before = get(&addr, "/metrics").1;
    assert_eq!(sample(&before, "agora_host_groups_loaded"), 0.0, "{before}");

    for group in ["alpha", "beta"] {
        fed.join_when_listed("alice", group);
        ok(fed.cli("alice", &["send", group, "hello"], ""));
    }
    // Two joins and two messages, in two groups; the third group never loaded.
    assert!(
        wait_for(Duration::from_secs(10), || {
            let text = get(&addr, "/metrics").1;
            sample(&text, "agora_log_entries_total") - sample(&before, "agora_log_entries_total")
                == 4.0
                && sample(&text, "agora_host_groups_loaded") == 2.0
        }),
        "{}",
        get(&addr, "/metrics").1
    );
    let after = get(&addr, "/metrics").1;
    assert_eq!(live(&after), 3.0, "{after}");
    assert!(!after.contains("agora_log_last_seq"), "{after}");
    assert!(!after.contains("group=\""), "no per-group label: {after}");
    assert!(sample(&after, "agora_log_bytes") > 0.0, "{after}");
}
