//! User accounts end to end: names bound to keys in the registry.

use agora_tests::{CliRun, Federation};

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

#[test]
fn an_account_binds_a_name_to_a_key_and_only_that_key_removes_it() {
    let fed = Federation::start("200ms");
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

    let users = ok(fed.cli("bob", &["--json", "users"], ""));
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
    let whois = ok(fed.cli("bob", &["whois", "alice"], ""));
    assert!(whois.stdout.contains(&fed.user_key("alice")), "{whois:?}");

    // Only alice's key removes alice, and only when confirmed.
    let forbidden = fed.cli("bob", &["unregister", "alice", "--yes"], "");
    assert_eq!(forbidden.code, Some(1), "{forbidden:?}");
    assert!(forbidden.stderr.contains("forbidden"), "{forbidden:?}");
    let unconfirmed = fed.cli("alice", &["unregister", "alice"], "");
    assert_eq!(unconfirmed.code, Some(2), "{unconfirmed:?}");
    let declined = fed.cli("alice", &[], "UNREGISTER alice\nno\n");
    assert_eq!(declined.code, Some(2), "{declined:?}");
    ok(fed.cli("bob", &["whois", "alice"], ""));
    let removed = ok(fed.cli("alice", &[], "UNREGISTER alice\nyes\n"));
    assert!(removed.stdout.contains("unregistered alice"), "{removed:?}");
    let gone = fed.cli("bob", &["whois", "alice"], "");
    assert_eq!(gone.code, Some(1), "{gone:?}");
    assert!(gone.stderr.contains("unknown_user"), "{gone:?}");
    // The name is free again, for any key.
    ok(fed.cli("bob", &["register", "alice"], ""));

    // Accounts are durable: a registry killed and restarted still has them.
    let mut fed = fed;
    fed.restart_registry("200ms");
    let after = ok(fed.cli("carol", &["whois", "alice"], ""));
    assert!(after.stdout.contains(&fed.user_key("bob")), "{after:?}");
}
