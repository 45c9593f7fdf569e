//! User accounts end to end: names bound to keys in the registry.

use agora_tests::{CliRun, Federation};

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

#[test]
fn an_account_binds_a_name_to_a_key_and_only_that_key_removes_it() {
    let fed = Federation::start("200ms");
    // Listing accounts needs one (issue 22, finding 18).
    let none = fed.cli("alice", &["users"], "");
    assert_eq!(none.code, Some(1), "{none:?}");
    assert!(none.stderr.contains("user-cli register NAME"), "{none:?}");
    let run = ok(fed.cli("alice", &["register", "alice"], ""));
    assert!(run.stdout.contains("registered alice"), "{run:?}");
    assert!(ok(fed.cli("alice", &["register", "alice"], ""))
        .stdout
        .contains("already yours"));

    // Another key cannot take the name; one key holds one account.
    let taken = fed.cli("bob", &["register", "alice"], "");
    assert_eq!(taken.code, Some(1), "{taken:?}");
    assert!(taken.stderr.contains("name_taken"), "{taken:?}");
    // Seed 004's upper-case words work in a script.
    ok(fed.cli("mallory", &[], "REGISTER mallory\n"));
    let again = fed.cli("mallory", &["register", "mallory2"], "");
    assert_eq!(again.code, Some(1), "{again:?}");

    let users = ok(fed.cli("mallory", &["--json", "users"], ""));
    let listed: Vec<(String, String)> = users
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|u| {
            (
                u["name"].as_str().unwrap_or("").to_owned(),
                u["key"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("alice".to_owned(), fed.user_key("alice")),
            ("mallory".to_owned(), fed.user_key("mallory")),
        ]
    );
    let whois = ok(fed.cli("mallory", &["whois", "alice"], ""));
    assert!(whois.stdout.contains(&fed.user_key("alice")), "{whois:?}");

    // Only alice's key removes alice, and only when confirmed.
    let forbidden = fed.cli("bob", &["unregister", "alice", "--yes"], "");
    assert_eq!(forbidden.code, Some(1), "{forbidden:?}");
    assert!(forbidden.stderr.contains("forbidden"), "{forbidden:?}");
    let unconfirmed = fed.cli("alice", &["unregister", "alice"], "");
    assert_eq!(unconfirmed.code, Some(2), "{unconfirmed:?}");
    // In a session the refusal is said, and the session's status stays 0 (issue 23).
    let declined = fed.cli("alice", &[], "UNREGISTER alice\nno\n");
    assert_eq!(declined.code, Some(0), "{declined:?}");
    assert!(declined.stderr.contains("not confirmed"), "{declined:?}");
    ok(fed.cli("mallory", &["whois", "alice"], ""));
    let removed = ok(fed.cli("alice", &[], "UNREGISTER alice\nyes\n"));
    assert!(removed.stdout.contains("unregistered alice"), "{removed:?}");
    let gone = fed.cli("mallory", &["whois", "alice"], "");
    assert_eq!(gone.code, Some(1), "{gone:?}");
    assert!(gone.stderr.contains("unknown_user"), "{gone:?}");
    // The name is free again, for any key.
    ok(fed.cli("bob", &["register", "alice"], ""));

    // Accounts are durable: a registry killed and restarted still has them.
    let mut fed = fed;
    fed.restart_registry("200ms");
    let after = ok(fed.cli("mallory", &["whois", "alice"], ""));
    assert!(after.stdout.contains(&fed.user_key("bob")), "{after:?}");
}

#[test]
fn presence_follows_connect_disconnect_and_expires_after_a_killed_client() {
    use std::time::Duration;
    let fed = Federation::start_with("200ms", &["--presence-ttl", "1s"]);
    let presence_of = |fed: &Federation, name: &str| -> String {
        let run = fed.cli("observer", &["--json", "whois", name], "");
        serde_json::from_str::<serde_json::Value>(run.stdout.trim())
            .ok()
            .and_then(|u| u["presence"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("observer", &["register", "observer"], ""));
    assert_eq!(presence_of(&fed, "alice"), "offline");
    // Seed 004's words, in a script.
    let run = ok(fed.cli("alice", &[], "CONNECT alice\n"));
    assert!(run.stdout.contains("alice is online"), "{run:?}");
    assert_eq!(presence_of(&fed, "alice"), "online");
    ok(fed.cli("alice", &["connect", "--away"], ""));
    assert_eq!(presence_of(&fed, "alice"), "away");
    ok(fed.cli("alice", &[], "DISCONNECT alice\n"));
    assert_eq!(presence_of(&fed, "alice"), "offline");
    let listed = ok(fed.cli("observer", &["users"], ""));
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.starts_with("alice ") && l.contains("offline, last seen")),
        "{listed:?}"
    );

    // A long-running client keeps alice present; killed, she goes offline within the TTL.
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    let mut watch = fed.spawn_cli("alice", &["watch", "Cool Group"]);
    assert!(watch.wait_stderr("watching", Duration::from_secs(20)));
    // Online, and still online past one TTL: the client renews its session.
    assert!(agora_tests::wait_for(
        Duration::from_secs(10),
        || presence_of(&fed, "alice") == "online"
    ));
    std::thread::sleep(Duration::from_millis(1500)); // one TTL: only renewals keep her online
    assert_eq!(presence_of(&fed, "alice"), "online");
    drop(watch); // SIGKILL: no disconnect is sent
    assert!(agora_tests::wait_for(
        Duration::from_secs(10),
        || presence_of(&fed, "alice") == "offline"
    ));
}
