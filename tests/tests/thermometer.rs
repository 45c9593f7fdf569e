//! The thermometer example bot (seed 003), written only against `agora-common`, against the
//! real registry and a group node.

use std::time::Duration;

use agora_tests::{connections_to, wait_for, CliRun, Federation, Server};

const WAIT: Duration = Duration::from_secs(20);

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

#[test]
fn the_thermometer_answers_range_and_delivers_readings_to_a_subscriber() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Weather", "127.0.0.1:0", "weather", &[]);
    assert!(wait_for(WAIT, || fed
        .cli("alice", &["groups"], "")
        .stdout
        .contains("Weather")));
    let registry_key = fed.registry_key();
    let keys = fed.key_dir();
    let _bot = Server::start(
        "thermometer",
        &[
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &registry_key,
            "--key-dir",
            &keys,
            "--group",
            "Weather",
            "--every",
            "200ms",
        ],
        std::path::Path::new(&fed.path("thermometer.log")),
    );
    ok(fed.cli("alice", &["register", "alice"], ""));

    // Collects alice's direct messages, check after check.
    let mut inbox = String::new();
    let mut read_until = |fed: &Federation, what: &str| {
        wait_for(WAIT, || {
            inbox.push_str(&ok(fed.cli("alice", &["check"], "")).stdout);
            inbox.contains(what)
        })
    };
    ok(fed.cli("alice", &["send_dm", "thermometer1", "range"], ""));
    assert!(read_until(&fed, "FROM thermometer1 [Stored]"));
    assert!(read_until(&fed, ": range 15.0..30.0 C"));

    ok(fed.cli("alice", &["send_dm", "thermometer1", "subscribe"], ""));
    assert!(read_until(&fed, ": subscribed"));
    assert!(read_until(&fed, ": temperature "));

    // Readings are also published to the group, as typed bodies.
    ok(fed.cli("alice", &["join", "Weather"], ""));
    assert!(wait_for(WAIT, || {
        let run = ok(fed.cli("alice", &["--json", "messages", "Weather"], ""));
        run.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|m| {
                m["sender"] == "thermometer1"
                    && m["body"]["unit"] == "C"
                    && m["body"]["temperature"]
                        .as_f64()
                        .is_some_and(|t| (15.0..=30.0).contains(&t))
            })
    }));
}

/// `user-cli --json messages GROUP` holds a reading by thermometer1 (a typed body in range).
fn has_reading(fed: &Federation, group: &str) -> bool {
    let run = ok(fed.cli("alice", &["--json", "messages", group], ""));
    run.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|m| {
            m["sender"] == "thermometer1"
                && m["group"] == group
                && m["body"]["temperature"]
                    .as_f64()
                    .is_some_and(|t| (15.0..=30.0).contains(&t))
        })
}

/// Issue 24: `--group` is repeatable; the readings go to every group given, each request
/// naming its group (on a group host, one connection serves them all).
#[test]
fn readings_go_to_each_group_given() {
    let fed = Federation::start("200ms");
    let _weather = fed.node("Weather", "127.0.0.1:0", "weather", &[]);
    let _garden = fed.node("Garden", "127.0.0.1:0", "garden", &[]);
    fed.join_when_listed("alice", "Weather");
    fed.join_when_listed("alice", "Garden");
    let registry_key = fed.registry_key();
    let keys = fed.key_dir();
    let _bot = Server::start(
        "thermometer",
        &[
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &registry_key,
            "--key-dir",
            &keys,
            "--group",
            "Weather",
            "--group",
            "Garden",
            "--every",
            "200ms",
        ],
        std::path::Path::new(&fed.path("thermometer.log")),
    );
    for group in ["Weather", "Garden"] {
        assert!(wait_for(WAIT, || has_reading(&fed, group)), "{group}");
    }
}

/// Issue 24: two groups of one group host get the readings over one connection, each
/// request naming its group.
#[test]
fn readings_go_to_two_groups_of_one_host_over_one_connection() {
    let fed = Federation::start("200ms");
    let host = fed.host("host", &["--group", "Weather", "--group", "Garden"]);
    fed.join_when_listed("alice", "Weather");
    fed.join_when_listed("alice", "Garden");
    let registry_key = fed.registry_key();
    let keys = fed.key_dir();
    let _bot = Server::start(
        "thermometer",
        &[
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &registry_key,
            "--key-dir",
            &keys,
            "--group",
            "Weather",
            "--group",
            "Garden",
            "--every",
            "200ms",
        ],
        std::path::Path::new(&fed.path("thermometer.log")),
    );
    for group in ["Weather", "Garden"] {
        assert!(wait_for(WAIT, || has_reading(&fed, group)), "{group}");
    }
    // user-cli's runs are over: the bot's is the one connection left.
    let mut held = 0;
    let one = wait_for(WAIT, || {
        held = connections_to(&host.endpoint);
        held == 1
    });
    assert!(one, "{held} connections to the host");
}
