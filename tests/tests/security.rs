//! Security end to end: CURVE keys, wrong keys, and `--insecure` only on loopback.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use agora_tests::{bin, cli, wait_for, Federation};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn servers_keep_a_private_secret_key_and_print_the_public_one() {
    let fed = Federation::start("200ms");
    let secret = std::path::Path::new(&fed.path("registry-data")).join("registry.key_secret");
    let mode = std::fs::metadata(&secret)
        .expect("secret file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let public = agora_common::keys::load_public(
        &std::path::Path::new(&fed.path("registry-data")).join("registry.key"),
    )
    .expect("public certificate");
    assert_eq!(public.to_string(), fed.registry_key());
}

#[test]
fn a_client_without_the_registry_key_is_told_what_to_do() {
    let fed = Federation::start("200ms");
    let dir = fed.path("keys");
    let state = fed.path("state");
    // No key, and no answer where the key would be asked for (the CURVE endpoint itself
    // never answers a plaintext request).
    let run = cli(
        &[
            "--registry",
            &fed.registry.endpoint,
            "--user",
            "alice",
            "groups",
        ],
        "",
        &[
            ("AGORA_KEY_DIR", &dir),
            ("AGORA_STATE_DIR", &state),
            ("AGORA_REGISTRY_KEY_ENDPOINT", &fed.registry.endpoint),
        ],
    );
    assert_eq!(run.code, Some(3), "unreachable: {run:?}");
    assert!(run.stderr.contains("--registry-key"), "{run:?}");
}

#[test]
fn a_client_with_a_wrong_registry_key_gets_no_answer_and_a_clear_error() {
    let fed = Federation::start("200ms");
    let wrong = agora_common::keys::Keypair::generate()
        .expect("keys")
        .public
        .to_string();
    let dir = fed.path("keys");
    let run = cli(
        &[
            "--registry",
            &fed.registry.endpoint,
            "--user",
            "alice",
            "--timeout",
            "600ms",
            "groups",
        ],
        "",
        &[("AGORA_KEY_DIR", &dir), ("AGORA_REGISTRY_KEY", &wrong)],
    );
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stderr.contains("unreachable"), "{run:?}");
    assert!(run.stderr.contains("public key"), "{run:?}");
}

#[test]
fn a_node_with_a_wrong_registry_key_says_why_it_cannot_register() {
    let fed = Federation::start("200ms");
    let wrong = agora_common::keys::Keypair::generate()
        .expect("keys")
        .public
        .to_string();
    let data = fed.path("data-cool");
    let node = agora_tests::Server::start(
        "group-node",
        &[
            "Cool Group",
            "127.0.0.1:0",
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &wrong,
            "--data-dir",
            &data,
            "--heartbeat",
            "200ms",
        ],
        std::path::Path::new(&fed.path("node.log")),
    );
    assert!(
        wait_for(WAIT, || node.log().contains("cannot register")),
        "{}",
        node.log()
    );
    let groups = fed.cli("alice", &["groups"], "");
    assert!(!groups.stdout.contains("Cool Group"), "{groups:?}");
}

#[test]
fn insecure_mode_is_refused_off_loopback() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().to_str().expect("utf-8");
    let registry = Command::new(bin("registry"))
        .args([
            "--insecure",
            "--bind",
            "tcp://0.0.0.0:0",
            "--data-dir",
            data,
        ])
        .output()
        .expect("run registry");
    assert_eq!(registry.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&registry.stderr).contains("loopback"));

    let node = Command::new(bin("group-node"))
        .args([
            "g",
            "0.0.0.0:0",
            "--insecure",
            "--no-registry",
            "--data-dir",
            data,
        ])
        .output()
        .expect("run group-node");
    assert_eq!(node.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&node.stderr).contains("loopback"));

    let run = cli(
        &[
            "--insecure",
            "--registry",
            "tcp://10.0.0.1:5555",
            "--user",
            "a",
            "groups",
        ],
        "",
        &[],
    );
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("loopback"), "{run:?}");
}

#[test]
fn insecure_mode_works_on_loopback_with_a_warning() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("registry.log");
    let registry = agora_tests::Server::start(
        "registry",
        &[
            "--insecure",
            "--bind",
            "tcp://127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().expect("utf-8"),
        ],
        &log,
    );
    assert!(registry.key.is_none());
    assert!(wait_for(WAIT, || registry
        .log()
        .contains("WITHOUT encryption")));
    let run = cli(
        &[
            "--insecure",
            "--registry",
            &registry.endpoint,
            "--user",
            "a",
            "groups",
        ],
        "",
        &[],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("WITHOUT encryption"), "{run:?}");
}

#[test]
fn a_forged_sender_is_ignored_and_the_stored_sender_is_the_authenticated_key() {
    use agora_common::client::{ClientError, ClientOptions, GroupClient};
    use agora_proto::wire::{ErrorCode, UserName};
    use serde_json::value::RawValue;

    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    assert_eq!(
        fed.cli("mallory", &["join", "Cool Group"], "").code,
        Some(0)
    );

    // Mallory's own key, but every request claims to be alice.
    let ctx = zmq::Context::new();
    let mallory = fed.curve("mallory", &node);
    let mallory_key = mallory.keypair.public.to_string();
    let mut forger = GroupClient::new(
        &ctx,
        &node.endpoint,
        UserName::new("alice").expect("name"),
        None,
        ClientOptions::default(),
    )
    .with_curve(mallory);
    let body = RawValue::from_string("\"I am alice\"".into()).expect("json");
    let ack = forger.send(body).expect("stored as mallory's");

    let run = fed.cli("alice", &["--json", "messages", "Cool Group"], "");
    assert_eq!(run.code, Some(0), "{run:?}");
    let entry: serde_json::Value = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|e| e["seq"] == ack.seq)
        .expect("the forged message is in the log");
    assert_eq!(entry["sender"], "mallory");
    assert_eq!(entry["sender_key"], mallory_key.as_str());

    // Another key cannot take a name a member holds.
    let mut eve = GroupClient::new(
        &ctx,
        &node.endpoint,
        UserName::new("alice").expect("name"),
        None,
        ClientOptions::default(),
    )
    .with_curve(fed.curve("eve", &node));
    match eve.join() {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::NameTaken),
        other => panic!("expected name_taken, got {other:?}"),
    }
}

#[test]
fn a_group_name_belongs_to_its_key_until_the_operator_releases_it() {
    let fed = Federation::start("200ms");
    let endpoint_of = |fed: &Federation| -> Option<String> {
        let run = fed.cli("alice", &["--json", "groups"], "");
        run.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|g| g["name"] == "Cool Group")
            .and_then(|g| g["endpoint"].as_str().map(str::to_owned))
    };
    let mut owner = fed.node("Cool Group", "127.0.0.1:0", "owner", &[]);
    assert!(wait_for(WAIT, || endpoint_of(&fed).as_deref()
        == Some(owner.endpoint.as_str())));

    // The owner's key may move the name to a new endpoint at once (a restart on a new port),
    // although the old entry has not expired.
    owner.kill9();
    let owner = fed.node("Cool Group", "127.0.0.1:0", "owner", &[]);
    assert!(wait_for(WAIT, || endpoint_of(&fed).as_deref()
        == Some(owner.endpoint.as_str())));

    // Another key is refused while the owner is live... (an intruder stores elsewhere: one
    // sharing the owner's PostgreSQL store would be a standby waiting for the lease)
    let elsewhere = fed.pg.as_ref().map(|pg| pg.database("intruder"));
    let intruder_store: Vec<&str> = match &elsewhere {
        Some(url) => vec!["--store", url.as_str()],
        None => Vec::new(),
    };
    // It stops at start, before it makes anything (issue 23: a node that stayed up
    // refused for ever held its lease and hid the mistake).
    let registry_key = fed.registry_key();
    let intruder_data = fed.node_data_dir("intruder");
    let intruder_key = fed.path("intruder-key/node.key");
    agora_common::keys::Keypair::load_or_generate(std::path::Path::new(&intruder_key))
        .expect("intruder key");
    std::fs::create_dir_all(&intruder_data).expect("data dir");
    for file in ["node.key", "node.key_secret"] {
        std::fs::copy(
            fed.path(&format!("intruder-key/{file}")),
            format!("{intruder_data}/{file}"),
        )
        .expect("key");
    }
    let mut intruder_args = vec![
        "Cool Group",
        "127.0.0.1:0",
        "--registry",
        &fed.registry.endpoint,
        "--registry-key",
        &registry_key,
        "--data-dir",
        &intruder_data,
        "--heartbeat",
        "200ms",
    ];
    intruder_args.extend(intruder_store.iter().copied());
    let refused = agora_tests::run("group-node", &intruder_args, "");
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("binds group"), "{refused:?}");
    assert_eq!(endpoint_of(&fed).as_deref(), Some(owner.endpoint.as_str()));
    // ...and after the owner is gone and its entry expired.
    drop(owner);
    assert!(wait_for(WAIT, || endpoint_of(&fed).is_none()));
    let refused = agora_tests::run("group-node", &intruder_args, "");
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert_eq!(endpoint_of(&fed), None);

    // The operator frees the name; the intruder then takes it.
    let release = Command::new(bin("registry"))
        .args(["--data-dir", &fed.path("registry-data")])
        .args(fed.store_args())
        .args(["release", "Cool Group"])
        .output()
        .expect("run registry release");
    assert!(release.status.success(), "{release:?}");
    let intruder = fed.node("Cool Group", "127.0.0.1:0", "intruder", &intruder_store);
    assert!(wait_for(WAIT, || endpoint_of(&fed).as_deref()
        == Some(intruder.endpoint.as_str())));
}

/// `registry release` while the registry runs: a SQLite registry holds its database alone
/// (its WAL index in memory, issue 23), so the command asks it (`release`, with the
/// registry's own key pair from the data directory); the action is obeyed only from that key
/// and the operator's. Once the registry stopped, the command opens the database itself.
#[test]
fn registry_release_beside_a_running_registry_asks_it_and_obeys_only_its_key_or_the_operators() {
    use agora_common::client::{ClientCurve, ClientError, ClientOptions, RegistryClient};
    use agora_proto::wire::{ErrorCode, GroupName};
    let operator = agora_common::keys::Keypair::generate().expect("operator key pair");
    let operator_key = operator.public.to_string();
    let mut fed = Federation::start_with("200ms", &["--operator", &operator_key]);
    let sqlite = fed.store.is_none();
    let name = GroupName::new("Cool Group").expect("name");
    let ctx = zmq::Context::new();
    let registry = |curve: ClientCurve| {
        RegistryClient::new(&ctx, &fed.registry.endpoint, ClientOptions::default())
            .with_curve(curve)
    };
    let owner_of = || {
        registry(fed.curve("reader", &fed.registry))
            .owner(&name)
            .expect("owner")
    };
    // A node binds the name to its key; the binding outlives it.
    let bind = || {
        let node = fed.node("Cool Group", "127.0.0.1:0", "owner", &[]);
        assert!(wait_for(WAIT, || owner_of().is_some()));
        drop(node);
    };
    bind();

    // Any other key is refused, and the name stays bound.
    match registry(fed.curve("mallory", &fed.registry)).release(&name) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Forbidden, "{e}"),
        other => panic!("a release by another key: {other:?}"),
    }
    assert!(owner_of().is_some());
    // The operator's key is obeyed.
    let server_key = fed.registry_key().parse().expect("registry key");
    let mut by_operator = registry(ClientCurve {
        keypair: operator,
        server_key,
    });
    assert!(by_operator.release(&name).expect("release"));
    assert_eq!(owner_of(), None);
    assert!(!by_operator.release(&name).expect("release again"));

    // The command, beside the running registry.
    bind();
    let data = fed.path("registry-data");
    let store_args: Vec<String> = fed.store_args().iter().map(|a| a.to_string()).collect();
    let release = || {
        agora_tests::run_command(
            {
                let mut command = Command::new(bin("registry"));
                command
                    .args(["--data-dir", &data])
                    .args(&store_args)
                    .args(["release", "Cool Group"]);
                command
            },
            "",
        )
    };
    let run = release();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout.trim(), "released \"Cool Group\"", "{run:?}");
    assert_eq!(owner_of(), None);
    if sqlite {
        // It asked the running registry: the database was not opened beside it.
        let log = fed.registry.log();
        assert!(log.contains("released by the operator"), "{log}");
    }
    let run = release();
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("is not bound to any key"), "{run:?}");
    if sqlite {
        // A registry that holds its database but does not answer: unreachable (exit 3),
        // named, with the wait as people write it.
        let signal = |sig: &str| {
            let pid = fed.registry.pid().to_string();
            let status = Command::new("kill")
                .args([sig, &pid])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {sig}");
        };
        signal("-STOP");
        let run = release();
        signal("-CONT");
        assert_eq!(run.code, Some(3), "{run:?}");
        assert!(
            run.stderr.contains("did not answer") && run.stderr.contains("within 5s"),
            "{run:?}"
        );
    }

    // Stopped, the registry removes its endpoint file and lets go of its database: the
    // command opens it itself.
    let status = fed.registry.terminate();
    assert_eq!(status.code(), Some(0), "{}", fed.registry.log());
    let file = std::path::Path::new(&data).join("registry.endpoint");
    assert!(!file.exists(), "{} is left behind", file.display());
    let run = release();
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("is not bound to any key"), "{run:?}");
}

#[test]
fn a_user_key_pair_is_made_once_and_can_be_exported_and_imported() {
    let dir = tempfile::tempdir().expect("tmp");
    let keys = dir.path().join("keys");
    let keys = keys.to_str().expect("utf-8");
    let show = |user: &str| cli(&["--user", user, "keys"], "", &[("AGORA_KEY_DIR", keys)]);
    let first = show("alice");
    assert_eq!(first.code, Some(0), "{first:?}");
    assert!(first.stdout.contains("(just made)"), "{first:?}");
    let alice_key = first
        .stdout
        .split('\t')
        .next()
        .unwrap_or_default()
        .to_owned();
    let again = show("alice");
    assert!(again.stdout.starts_with(&alice_key) && !again.stdout.contains("just made"));
    let mode = std::fs::metadata(dir.path().join("keys/alice.key_secret"))
        .expect("secret")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let export = dir.path().join("backup/alice.key");
    let export = export.to_str().expect("utf-8");
    let run = cli(
        &["--user", "alice", "keys", "export", export],
        "",
        &[("AGORA_KEY_DIR", keys)],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    // bob has his own pair; importing over it needs --force.
    show("bob");
    let import = |force: bool| {
        let mut args = vec!["--user", "bob", "keys", "import", export];
        if force {
            args.push("--force");
        }
        cli(&args, "", &[("AGORA_KEY_DIR", keys)])
    };
    let refused = import(false);
    assert_eq!(refused.code, Some(2), "usage, as --yes: {refused:?}");
    assert!(refused.stderr.contains("--force"), "{refused:?}");
    assert_eq!(import(true).code, Some(0));
    assert!(show("bob").stdout.starts_with(&alice_key));
}

#[test]
fn a_peer_over_its_rate_limit_is_refused_with_a_specific_code_and_recovers() {
    use agora_common::client::{ClientError, ClientOptions, GroupClient};
    use agora_proto::wire::{ErrorCode, UserName};

    let fed = Federation::start("200ms");
    let node = fed.node(
        "Cool Group",
        "127.0.0.1:0",
        "cool",
        &["--rate-limit", "5", "--rate-burst", "5"],
    );
    let ctx = zmq::Context::new();
    let client = |user: &str| {
        GroupClient::new(
            &ctx,
            &node.endpoint,
            UserName::new(user).expect("name"),
            None,
            ClientOptions::default(),
        )
        .with_curve(fed.curve(user, &node))
    };
    let mut greedy = client("greedy");
    let mut codes = Vec::new();
    for _ in 0..12 {
        match greedy.info() {
            Ok(_) => codes.push("ok"),
            Err(ClientError::Server(e)) if e.code == ErrorCode::RateLimited => {
                // Machine-readable: how long until this peer's bucket has a token again.
                let wait = e
                    .retry_after_ms
                    .expect("rate_limited carries retry_after_ms");
                assert!((1..=60_000).contains(&wait), "retry_after_ms {wait}");
                codes.push("rate_limited")
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert!(
        codes.iter().filter(|c| **c == "ok").count() >= 5,
        "{codes:?}"
    );
    assert!(codes.contains(&"rate_limited"), "{codes:?}");
    // Another peer is not affected, and the greedy one recovers as its bucket refills.
    assert!(client("polite").info().is_ok());
    assert!(wait_for(WAIT, || greedy.info().is_ok()));
}

#[test]
fn the_registry_key_is_pinned_on_first_use_and_a_changed_key_is_refused() {
    let mut fed = Federation::start("200ms");
    let key_endpoint = fed.registry.key_endpoint.clone().expect("key endpoint");
    let state = fed.path("tofu-state");
    let keys = fed.path("keys");
    // No registry key given: only where to ask for it.
    let run_cli = |fed: &Federation, args: &[&str]| {
        let mut all = vec![
            "--registry",
            fed.registry.endpoint.as_str(),
            "--user",
            "alice",
        ];
        all.extend_from_slice(args);
        cli(
            &all,
            "",
            &[
                ("AGORA_KEY_DIR", &keys),
                ("AGORA_STATE_DIR", &state),
                ("AGORA_REGISTRY_KEY_ENDPOINT", &key_endpoint),
            ],
        )
    };
    let first = run_cli(&fed, &["groups"]);
    assert_eq!(first.code, Some(0), "{first:?}");
    assert!(
        first.stderr.contains("pinned the registry key"),
        "{first:?}"
    );
    assert!(first.stderr.contains(&fed.registry_key()), "{first:?}");
    let second = run_cli(&fed, &["groups"]);
    assert_eq!(second.code, Some(0), "{second:?}");
    assert!(!second.stderr.contains("pinned"), "{second:?}");

    // A node pins it too, and registers.
    let data = fed.path("node-tofu");
    let node = agora_tests::Server::start(
        "group-node",
        &[
            "Pinned",
            "127.0.0.1:0",
            "--registry",
            &fed.registry.endpoint,
            "--registry-key-endpoint",
            &key_endpoint,
            "--data-dir",
            &data,
            "--heartbeat",
            "200ms",
        ],
        std::path::Path::new(&fed.path("node-tofu.log")),
    );
    assert!(wait_for(WAIT, || run_cli(&fed, &["groups"])
        .stdout
        .contains("Pinned")));
    drop(node);

    // The registry comes back with another key: refused loudly, until the pin is forgotten.
    fed.replace_registry("200ms");
    let changed = run_cli(&fed, &["groups"]);
    assert_eq!(changed.code, Some(1), "refused: {changed:?}");
    assert!(changed.stderr.contains("KEY HAS CHANGED"), "{changed:?}");
    let forget = run_cli(&fed, &["forget-registry"]);
    assert_eq!(forget.code, Some(0), "{forget:?}");
    let again = run_cli(&fed, &["groups"]);
    assert_eq!(again.code, Some(0), "{again:?}");
    assert!(
        again.stderr.contains("pinned the registry key"),
        "{again:?}"
    );
}
