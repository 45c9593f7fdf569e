//! Issue 23, the servers' first hour: what an operator meets starting `group-node` and
//! `registry` by hand, at the process level. Arguments are checked before anything is
//! created; a busy port leaves nothing behind; exit codes follow the README's table; empty
//! text is refused by the node; a node with the wrong key pair stops at start and never
//! takes the lease; no SQLite file with `--store`; PostgreSQL's notices stay at DEBUG;
//! `--beacon-address` needs `--beacon`; every request series exists at 0 from the start; a
//! shutdown with the registry gone is quiet.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agora_common::client::{ClientOptions, ReqClient};
use agora_proto::action::{Action, Role};
use agora_proto::codec::{decode_reply, Frames};
use agora_proto::wire::{ErrorCode, WireError, PROTOCOL};
use agora_tests::{run, run_command, wait_for, Federation, Server, START_TIMEOUT};

/// A port nothing listens on: bound by the system, then closed.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Nothing exists at `path`.
fn absent(path: &Path) -> bool {
    !path.exists()
}

/// Issue 23 item 2: `group-node 'Bad Port' 127.0.0.1:99999` printed `listening
/// tcp://127.0.0.1:34463` (the port wrapped). Every endpoint argument of both servers is
/// checked first: a usage error naming the argument and the value, exit 2, and no data
/// directory, key pair or socket.
#[test]
fn a_bad_endpoint_is_a_usage_error_before_anything_is_created() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let node = |args: &[&str]| {
        let mut all = vec!["Bad Port"];
        all.extend_from_slice(args);
        all.extend(["--data-dir", data]);
        run("group-node", &all, "")
    };
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["127.0.0.1:99999", "--no-registry"],
            "127.0.0.1:99999",
            "port must be 0-65535",
        ),
        (
            vec!["udp://127.0.0.1:5", "--no-registry"],
            "udp://127.0.0.1:5",
            "unknown scheme",
        ),
        (
            vec!["127.0.0.1", "--no-registry"],
            "ADDRESS",
            "expected HOST:PORT",
        ),
        (
            vec!["127.0.0.1:0", "--registry", "127.0.0.1:70000"],
            "--registry",
            "port must be 1-65535",
        ),
        (
            vec!["127.0.0.1:0", "--registry", "tcp://0.0.0.0:5555"],
            "--registry",
            "wildcard",
        ),
        (
            vec!["127.0.0.1:0", "--advertise", "*:5"],
            "--advertise",
            "wildcard",
        ),
        (
            vec![
                "127.0.0.1:0",
                "--no-registry",
                "--metrics",
                "127.0.0.1:65536",
            ],
            "--metrics",
            "port must be 0-65535",
        ),
        (
            vec!["0.0.0.0:0", "--registry", "127.0.0.1:5555"],
            "ADDRESS",
            "--advertise",
        ),
        (
            vec!["127.0.0.2:0", "--insecure", "--registry", "10.0.0.1:5555"],
            "--registry",
            "loopback",
        ),
    ];
    for (args, names, says) in cases {
        let out = node(&args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(names) && out.stderr.contains(says),
            "{args:?}: {out:?}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        assert!(absent(Path::new(data)), "{args:?} made {data}");
    }
    let registry = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--data-dir", data]);
        run("registry", &all, "")
    };
    for (args, names, says) in [
        (
            vec!["--bind", "127.0.0.1:99999"],
            "--bind",
            "port must be 0-65535",
        ),
        (
            vec!["--bind", "127.0.0.1:0", "--key-bind", "ipc:///tmp/k"],
            "--key-bind",
            "unknown scheme",
        ),
        (
            vec!["--bind", "127.0.0.1:0", "--metrics", "localhost:x"],
            "--metrics",
            "port must be 0-65535",
        ),
        (
            vec!["--bind", "0.0.0.0:0", "--insecure"],
            "--bind",
            "loopback",
        ),
    ] {
        let out = registry(&args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(names) && out.stderr.contains(says),
            "{args:?}: {out:?}"
        );
        assert!(absent(Path::new(data)), "{args:?} made {data}");
    }
}

/// `IP:PORT` is an endpoint wherever one is taken: `--registry` and `--advertise` too.
#[test]
fn ip_port_is_taken_for_the_registry_and_the_advertised_endpoint() {
    let fed = Federation::start("200ms");
    let registry = fed
        .registry
        .endpoint
        .strip_prefix("tcp://")
        .expect("tcp://")
        .to_owned();
    let key = fed.registry_key();
    let data = fed.path("data-ip-port");
    let mut args = vec![
        "Cool Group",
        "127.0.0.1:0",
        "--registry",
        &registry,
        "--registry-key",
        &key,
        "--data-dir",
        &data,
        "--heartbeat",
        "200ms",
    ];
    args.extend(fed.store_args());
    let node = Server::start("group-node", &args, &fed.dir.path().join("node.log"));
    assert!(
        wait_for(START_TIMEOUT, || node.log().contains("registered")),
        "{}",
        node.log()
    );
    fed.join_when_listed("alice", "Cool Group");
}

/// Issue 23: "a node on a busy port makes a key pair and a data directory first, then
/// fails with the cause repeated". Now: exit 4, the endpoint named once, the cause once,
/// and nothing on disk; the same for the registry's two ports.
#[test]
fn a_busy_port_leaves_no_key_pair_and_no_data_directory() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8");

    let node = run(
        "group-node",
        &["G", &addr, "--no-registry", "--data-dir", data_s],
        "",
    );
    assert_eq!(node.code, Some(4), "{node:?}");
    assert_eq!(node.stderr.matches(&addr).count(), 1, "{node:?}");
    assert_eq!(node.stderr.matches("in use").count(), 1, "{node:?}");
    assert!(absent(&data), "the node left {}", data.display());

    let registry = run("registry", &["--bind", &addr, "--data-dir", data_s], "");
    assert_eq!(registry.code, Some(4), "{registry:?}");
    assert_eq!(registry.stderr.matches("in use").count(), 1, "{registry:?}");
    assert!(absent(&data), "the registry left {}", data.display());
    // Its key endpoint's port (given, or the next one) is checked before anything too.
    let registry = run(
        "registry",
        &[
            "--bind",
            "127.0.0.1:0",
            "--key-bind",
            &addr,
            "--data-dir",
            data_s,
        ],
        "",
    );
    assert_eq!(registry.code, Some(4), "{registry:?}");
    assert!(registry.stderr.contains("--key-bind"), "{registry:?}");
    assert!(absent(&data), "the registry left {}", data.display());
}

/// Issue 23: "a node warns that it tightened permissions of the directory it just made".
/// A data directory the node makes (parents included) is private from creation and not
/// warned about; one that existed with a looser mode is tightened with the warning.
#[test]
fn a_fresh_data_directory_gets_no_permissions_warning_and_a_loose_one_does() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let fresh = dir.path().join("new/parents/data");
    let mut node = Server::start(
        "group-node",
        &[
            "G",
            "127.0.0.1:0",
            "--no-registry",
            "--data-dir",
            fresh.to_str().expect("utf-8"),
        ],
        &dir.path().join("fresh.log"),
    );
    assert_eq!(node.terminate().code(), Some(0), "{}", node.log());
    assert!(!node.log().contains("tightened"), "{}", node.log());
    let mode = std::fs::metadata(&fresh)
        .expect("data dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    let fresh = dir.path().join("new/registry/data");
    let mut registry = Server::start(
        "registry",
        &[
            "--bind",
            "127.0.0.1:0",
            "--data-dir",
            fresh.to_str().expect("utf-8"),
        ],
        &dir.path().join("registry.log"),
    );
    assert_eq!(registry.terminate().code(), Some(0), "{}", registry.log());
    assert!(!registry.log().contains("tightened"), "{}", registry.log());

    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).expect("mkdir");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut node = Server::start(
        "group-node",
        &[
            "G",
            "127.0.0.1:0",
            "--no-registry",
            "--data-dir",
            loose.to_str().expect("utf-8"),
        ],
        &dir.path().join("loose.log"),
    );
    assert_eq!(node.terminate().code(), Some(0));
    assert!(node.log().contains("tightened"), "{}", node.log());
}

/// The exit-code table for the servers: 0 clean stop (in the shutdown test below), 1
/// refused (the owner tests), 2 usage (above), 3 unreachable, 4 local I/O (the busy port).
#[test]
fn an_unreachable_registry_or_database_exits_3() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    // No --registry-key and nothing at the registry's key endpoint: the key cannot be had.
    let registry = format!("127.0.0.1:{}", closed_port());
    let node = run(
        "group-node",
        &[
            "G",
            "127.0.0.1:0",
            "--registry",
            &registry,
            "--data-dir",
            data,
        ],
        "",
    );
    assert_eq!(node.code, Some(3), "{node:?}");
    assert!(node.stderr.contains(&registry), "{node:?}");

    let url = format!("postgres://agora@127.0.0.1:{}/agora", closed_port());
    let reg = run(
        "registry",
        &["--bind", "127.0.0.1:0", "--store", &url, "--data-dir", data],
        "",
    );
    assert_eq!(reg.code, Some(3), "{reg:?}");
}

/// Sends `body` to `server` as `user` (the tester's key pair) and returns the reply's fields
/// or its error.
fn request(fed: &Federation, server: &Server, body: &str) -> Result<serde_json::Value, WireError> {
    let ctx = zmq::Context::new();
    let mut client = ReqClient::new(&ctx, server.endpoint.clone(), ClientOptions::default())
        .with_curve(fed.curve("tester", server));
    let frames: Frames = vec![PROTOCOL.to_vec(), body.as_bytes().to_vec()];
    let reply = client.request_frames(&frames).expect("a reply");
    decode_reply::<serde_json::Value>(&reply).expect("a well-formed reply")
}

/// Issue 23 item 5: `send G ""`, an at-once `END` and `"   "` each got a seq, and peers saw
/// `bob:` with nothing after it. The node refuses empty or white-space-only text with
/// `invalid_field` naming `body`, stores nothing, and takes every other JSON value.
#[test]
fn the_node_refuses_empty_and_blank_text_and_stores_nothing() {
    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    request(&fed, &node, r#"{"action":"join","user":"tester"}"#).expect("join");
    for body in [r#""""#, r#""   ""#, r#""\n\t""#, r#""\u00a0\u2003""#] {
        let send = format!(r#"{{"action":"send","user":"tester","body":{body}}}"#);
        let e = request(&fed, &node, &send).expect_err(body);
        assert_eq!(e.code, ErrorCode::InvalidField, "{body}: {e}");
        assert!(e.message.starts_with("body"), "{body}: {e}");
    }
    let info = request(&fed, &node, r#"{"action":"info"}"#).expect("info");
    // The join is the only entry.
    assert_eq!(info["last_seq"], 1, "{info}");
    for body in [r#"" x ""#, "null", "{}", r#"{"text": ""}"#, "0"] {
        let send = format!(r#"{{"action":"send","user":"tester","body":{body}}}"#);
        request(&fed, &node, &send).unwrap_or_else(|e| panic!("{body}: {e}"));
    }
}

/// The `group-node` arguments [`Federation::spawn_node`] gives, for a run to its end.
fn node_args<'a>(fed: &'a Federation, registry_key: &'a str, data: &'a str) -> Vec<&'a str> {
    vec![
        "ha",
        "127.0.0.1:0",
        "--registry",
        &fed.registry.endpoint,
        "--registry-key",
        registry_key,
        "--data-dir",
        data,
        "--heartbeat",
        "200ms",
    ]
}

/// Issue 23 item 15: a node whose key is not the one its group name is bound to (no copied
/// `node.key*`, or another key pair) stops at start with exit 1, says what to copy, and
/// creates nothing.
#[test]
fn a_node_with_another_key_than_the_names_owner_stops_at_start() {
    let fed = Federation::start("200ms");
    let owner = fed.node("ha", "127.0.0.1:0", "a", &[]);
    assert!(
        wait_for(START_TIMEOUT, || owner.log().contains("registered")),
        "{}",
        owner.log()
    );
    let key = fed.registry_key();
    let fresh = fed.node_data_dir("b");
    let mut args = node_args(&fed, &key, &fresh);
    args.extend(fed.store_args());
    let out = run("group-node", &args, "");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("node.key") && out.stderr.contains("node.key_secret"),
        "{out:?}"
    );
    assert!(out.stderr.contains(&fresh), "{out:?}");
    assert!(absent(Path::new(&fresh)), "{fresh} was made");

    // Another key pair in place: named in the error, and nothing else made.
    let other = fed.node_data_dir("c");
    let (pair, _) =
        agora_common::keys::Keypair::load_or_generate(&Path::new(&other).join("node.key"))
            .expect("key pair");
    let mut args = node_args(&fed, &key, &other);
    args.extend(fed.store_args());
    let out = run("group-node", &args, "");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains(&pair.public.to_string()), "{out:?}");
    let left: Vec<_> = std::fs::read_dir(&other)
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");

    // The owner's copied key pair passes the check.
    fed.share_node_keys("a", "d");
    let d = fed.node_data_dir("d");
    let mut args = node_args(&fed, &key, &d);
    args.extend(fed.store_args());
    // It serves, or (sharing the owner's PostgreSQL store) waits as its standby.
    let copy = Server::spawn("group-node", &args, &fed.dir.path().join("node-d.log"));
    assert!(
        wait_for(START_TIMEOUT, || {
            let log = copy.log();
            log.contains("group node serving") || log.contains("waiting for it")
        }),
        "{}",
        copy.log()
    );
    assert!(!copy.log().contains("binds group"), "{}", copy.log());
}

/// Issue 23 item 15, the failover recipe with PostgreSQL: a standby started without the
/// copied `node.key*` stops at start (exit 1) and never takes or waits for the lease; one
/// with them waits as a standby. With `--store`, no `group.sqlite3` is made, and
/// PostgreSQL's `schema … already exists, skipping` notices are DEBUG, not INFO.
#[test]
fn a_standby_without_the_copied_keys_never_takes_the_lease_and_postgres_makes_no_sqlite_file() {
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let active = fed.node("ha", "127.0.0.1:0", "a", &["--store", &url]);
    assert!(
        wait_for(START_TIMEOUT, || active.log().contains("registered")),
        "{}",
        active.log()
    );
    let data_a = fed.node_data_dir("a");
    assert!(
        absent(&Path::new(&data_a).join("group.sqlite3")),
        "a SQLite file with --store"
    );

    let key = fed.registry_key();
    let b = fed.node_data_dir("b");
    let mut args = node_args(&fed, &key, &b);
    args.extend(["--store", &url]);
    let out = run("group-node", &args, "");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("node.key_secret"), "{out:?}");
    assert!(
        !out.stderr.contains("standby") && !out.stderr.contains("the lease"),
        "{out:?}"
    );
    assert!(absent(Path::new(&b)));
    assert!(!active.log().contains("lost the lease"), "{}", active.log());

    fed.share_node_keys("a", "c");
    let standby = fed.spawn_node("ha", "127.0.0.1:0", "c", &["--store", &url]);
    assert!(
        wait_for(START_TIMEOUT, || standby.log().contains("waiting for it")),
        "{}",
        standby.log()
    );
    assert!(
        absent(&Path::new(&fed.node_data_dir("c")).join("group.sqlite3")),
        "a SQLite file with --store"
    );
    // The schema existed when the standby started: PostgreSQL said so, at DEBUG only.
    assert!(
        !standby.log().contains("already exists"),
        "{}",
        standby.log()
    );
    // The registry's schema, made by the first run, exists at the second: a NOTICE.
    let release = [
        "--store",
        url.as_str(),
        "--data-dir",
        &fed.path("release"),
        "release",
        "nobody",
    ];
    for run_no in 0..2 {
        let mut command = Command::new(agora_tests::bin("registry"));
        command
            .args(release)
            .env("RUST_LOG", "info,agora::postgres=debug");
        let out = run_command(command, "");
        assert_eq!(out.code, Some(1), "release of a free name: {out:?}");
        let notices: Vec<_> = out
            .stderr
            .lines()
            .filter(|l| l.contains("already exists"))
            .collect();
        assert!(notices.iter().all(|l| l.contains("DEBUG")), "{notices:?}");
        assert!(run_no == 0 || !notices.is_empty(), "no notice: {out:?}");
    }
    let quiet = run("registry", &release, "");
    assert!(!quiet.stderr.contains("already exists"), "{quiet:?}");
    assert!(
        absent(&Path::new(&fed.path("release")).join("registry.sqlite3")),
        "the registry made a SQLite file with --store"
    );
}

/// Issue 23 item 15: `--beacon-address` without `--beacon` sent nothing and said nothing;
/// now it is a usage error, and `AGORA_BEACON` turns the beacon on from the environment.
#[test]
fn beacon_address_needs_beacon_and_agora_beacon_turns_it_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let out = run(
        "registry",
        &[
            "--bind",
            "127.0.0.1:0",
            "--beacon-address",
            "127.255.255.255",
            "--data-dir",
            data,
        ],
        "",
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--beacon"), "{out:?}");
    assert!(absent(Path::new(data)));

    let port = closed_port().to_string();
    let mut command = Command::new(agora_tests::bin("registry"));
    command
        .args([
            "--bind",
            "127.0.0.1:0",
            "--beacon-address",
            "127.255.255.255",
            "--beacon-port",
            &port,
            "--data-dir",
            data,
        ])
        .env("AGORA_BEACON", "yes");
    let registry = Server::spawn_command(command, "registry", &dir.path().join("r.log"))
        .wait_listening(START_TIMEOUT);
    assert!(
        wait_for(START_TIMEOUT, || registry
            .log()
            .contains("announcing this registry by beacon")),
        "{}",
        registry.log()
    );
    drop(registry);

    let mut command = Command::new(agora_tests::bin("registry"));
    command
        .args([
            "--bind",
            "127.0.0.1:0",
            "--beacon-address",
            "127.255.255.255",
        ])
        .args(["--data-dir", data])
        .env("AGORA_BEACON", "false");
    let out = run_command(command, "");
    assert_eq!(out.code, Some(2), "AGORA_BEACON=false: {out:?}");

    // --beacon needs an address; AGORA_BEACON=false alone (an environment file that
    // turns it off) is no error.
    let out = run(
        "registry",
        &["--bind", "127.0.0.1:0", "--beacon", "--data-dir", data],
        "",
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--beacon-address"), "{out:?}");
    let mut command = Command::new(agora_tests::bin("registry"));
    command
        .args(["--bind", "127.0.0.1:0", "--data-dir", data])
        .env("AGORA_BEACON", "false");
    let registry = Server::spawn_command(command, "registry", &dir.path().join("off.log"))
        .wait_listening(START_TIMEOUT);
    assert!(!registry.log().contains("beacon"), "{}", registry.log());
}

/// Issue 23 item 15: `agora_requests_total{action,code}` series appeared only at their
/// first increment, so `rate()` missed it. A scrape right after start, before any request,
/// has every action of that server with `ok` and every error code, at 0.
#[test]
fn every_request_series_exists_at_zero_from_the_start() {
    let fed = Federation::start_with("200ms", &["--metrics", "127.0.0.1:0"]);
    let node = fed.node(
        "Cool Group",
        "127.0.0.1:0",
        "cool",
        &["--metrics", "127.0.0.1:0"],
    );
    for (server, role) in [(&fed.registry, Role::Registry), (&node, Role::Node)] {
        let url = format!("http://{}/metrics", server.metrics_addr());
        let text = ureq::get(&url)
            .timeout(Duration::from_secs(5))
            .call()
            .expect("scrape")
            .into_string()
            .expect("text");
        let mut seen = 0;
        for action in Action::ALL.iter().filter(|a| a.role() == role) {
            for code in ["ok", "internal", "rate_limited", "invalid_field"] {
                let series = format!(
                    "agora_requests_total{{action=\"{}\",code=\"{code}\"}}",
                    action.as_str()
                );
                assert!(text.contains(&series), "{role:?}: no {series}");
                seen += 1;
            }
        }
        assert!(seen > 40, "{role:?}: {seen}");
        assert!(
            text.contains("agora_requests_total{action=\"invalid\",code=\"invalid_json\"}"),
            "{role:?}"
        );
    }
}

/// Issue 23: "shutdown logs `could not unregister … within 1.004849877s`" when the registry
/// is gone. Now one INFO line with the duration as people write it, and exit 0.
#[test]
fn a_shutdown_with_the_registry_gone_is_one_quiet_line_and_exit_0() {
    let mut fed = Federation::start("200ms");
    let key = fed.registry_key();
    let data = fed.node_data_dir("quiet");
    // A long heartbeat: the node is still registered (as it thinks) when it stops.
    let mut args = vec![
        "Cool Group",
        "127.0.0.1:0",
        "--registry",
        &fed.registry.endpoint,
        "--registry-key",
        &key,
        "--data-dir",
        &data,
        "--heartbeat",
        "30s",
    ];
    let store = fed
        .store_args()
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<_>>();
    args.extend(store.iter().map(String::as_str));
    let mut node = Server::start("group-node", &args, &fed.dir.path().join("quiet.log"));
    assert!(
        wait_for(START_TIMEOUT, || node.log().contains("registered")),
        "{}",
        node.log()
    );
    fed.kill_registry();
    assert_eq!(node.terminate().code(), Some(0), "{}", node.log());
    let log = node.log();
    let line = log
        .lines()
        .find(|l| l.contains("not unregistered"))
        .unwrap_or_else(|| panic!("no unregister line: {log}"));
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("within 1s"), "{line}");
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && l.contains("unregister")),
        "{log}"
    );
}

/// No Debug-formatted duration (`2.002584094s`) in `text`: a digit run of six or more after
/// a decimal point.
fn has_raw_duration(text: &str) -> bool {
    text.split('.').skip(1).any(|after| {
        after.chars().take_while(char::is_ascii_digit).count() >= 6
            && after
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .starts_with('s')
    })
}

/// Review of issue 23: a registry without a key endpoint gave `… (no reply from
/// tcp://127.0.0.1:25000 within 2.002584094s): no reply from tcp://127.0.0.1:25000 within
/// 2.002584094s`, exit 3; and a PostgreSQL that refuses the connection, `registry: store:
/// postgres: error connecting to server: Connection refused (os error 111): error
/// connecting to server: Connection refused (os error 111)`. Each cause once, the wait as
/// given, `--store` named by its host:port and never its password; nothing is made.
#[test]
fn an_unreachable_registry_or_database_says_each_cause_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    let port = closed_port();
    let registry = format!("127.0.0.1:{port}");
    let node = run(
        "group-node",
        &[
            "G",
            "127.0.0.1:0",
            "--registry",
            &registry,
            "--data-dir",
            data_s,
        ],
        "",
    );
    assert_eq!(node.code, Some(3), "{node:?}");
    let key_endpoint = format!("tcp://127.0.0.1:{}", port + 1);
    assert_eq!(node.stderr.matches(&key_endpoint).count(), 1, "{node:?}");
    assert!(node.stderr.contains("within 2s;"), "{node:?}");
    assert!(!has_raw_duration(&node.stderr), "{node:?}");
    assert_eq!(node.stderr.lines().count(), 1, "{node:?}");

    let pg_port = closed_port();
    let url = format!("postgres://agora:s3cret@127.0.0.1:{pg_port}/agora");
    let reg = run(
        "registry",
        &[
            "--bind",
            "127.0.0.1:0",
            "--store",
            &url,
            "--data-dir",
            data_s,
        ],
        "",
    );
    assert_eq!(reg.code, Some(3), "{reg:?}");
    let named = format!("--store 127.0.0.1:{pg_port}, database agora: ");
    assert!(reg.stderr.contains(&named), "{reg:?}");
    assert_eq!(reg.stderr.matches("refused").count(), 1, "{reg:?}");
    assert!(!reg.stderr.contains("s3cret"), "{reg:?}");
    assert_eq!(reg.stderr.lines().count(), 1, "{reg:?}");
    assert!(absent(&data), "the registry left {}", data.display());
}

/// Review of issue 23: with an unreachable `--store`, group-node never exited and logged
/// `cannot reach the database for the lease; retrying` every 0.6 s; a missing database
/// gave `database "nodb" does not exist: db error: FATAL: database "nodb" does not exist`
/// (exit 4 from the registry, which left an empty data directory). At start, a database
/// that does not answer within --failover-timeout, or refuses (no such database), exits 3
/// with one line naming `--store`, and leaves no data directory.
#[test]
fn postgres_unreachable_or_missing_at_start_exits_3_with_one_line_and_makes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    // Its parents too: what the node made is removed, up to the first that existed.
    let data = dir.path().join("new/data");
    let data_s = data.to_str().expect("utf-8");
    let pg_port = closed_port();
    let url = format!("postgres://agora:s3cret@127.0.0.1:{pg_port}/agora");
    let started = std::time::Instant::now();
    let node = run(
        "group-node",
        &[
            "G",
            "127.0.0.1:0",
            "--no-registry",
            "--store",
            &url,
            "--failover-timeout",
            "500ms",
            "--data-dir",
            data_s,
        ],
        "",
    );
    assert_eq!(node.code, Some(3), "{node:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let named = format!("--store 127.0.0.1:{pg_port}, database agora: ");
    assert!(node.stderr.contains(&named), "{node:?}");
    assert!(node.stderr.contains("500ms"), "{node:?}");
    assert!(!node.stderr.contains("s3cret"), "{node:?}");
    assert_eq!(node.stderr.lines().count(), 1, "one line: {node:?}");
    assert!(
        absent(&dir.path().join("new")),
        "the node left {}",
        data.display()
    );

    let cluster = agora_tests::pg::PgCluster::start();
    let missing = cluster.url("nodb");
    let node = run(
        "group-node",
        &[
            "G",
            "127.0.0.1:0",
            "--no-registry",
            "--store",
            &missing,
            "--failover-timeout",
            "1h",
            "--data-dir",
            data_s,
        ],
        "",
    );
    assert_eq!(node.code, Some(3), "a refusal is not retried: {node:?}");
    assert_eq!(
        node.stderr
            .matches("database \"nodb\" does not exist")
            .count(),
        1,
        "{node:?}"
    );
    assert!(node.stderr.contains("--store "), "{node:?}");
    assert!(
        absent(&dir.path().join("new")),
        "the node left {}",
        data.display()
    );

    let reg = run(
        "registry",
        &[
            "--bind",
            "127.0.0.1:0",
            "--store",
            &missing,
            "--data-dir",
            data_s,
        ],
        "",
    );
    assert_eq!(reg.code, Some(3), "{reg:?}");
    assert_eq!(
        reg.stderr
            .matches("database \"nodb\" does not exist")
            .count(),
        1,
        "{reg:?}"
    );
    assert!(reg.stderr.contains("--store "), "{reg:?}");
    assert!(absent(&data), "the registry left {}", data.display());
}

/// Review of issue 23: with `--store`, two nodes shared one data directory (the second
/// logged standby instead of failing). The data directory's lock is taken with `--store`
/// too: the second exits 4 at once, naming the directory.
#[test]
fn a_second_node_on_one_data_directory_with_store_fails_instead_of_waiting() {
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let data = fed.node_data_dir("shared");
    let args = [
        "lock",
        "127.0.0.1:0",
        "--no-registry",
        "--store",
        url.as_str(),
        "--data-dir",
        data.as_str(),
    ];
    let first = Server::start("group-node", &args, Path::new(&fed.path("first.log")));
    let second = run("group-node", &args, "");
    assert_eq!(second.code, Some(4), "{second:?}");
    assert!(
        second.stderr.contains("in use by another group-node"),
        "{second:?}"
    );
    assert!(!second.stderr.contains("standby"), "{second:?}");
    assert!(!first.log().contains("lost the lease"), "{}", first.log());
}

/// Review of issue 23: a busy `--metrics` port failed only after the data directory and a
/// key pair were made, and after `listening …` was printed. It is bound before anything
/// is created: exit 4, `--metrics ADDR: address in use` once, nothing on stdout, nothing
/// left.
#[test]
fn a_busy_metrics_port_leaves_nothing_and_prints_no_listening_line() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    let said = format!("--metrics {addr}: address in use");
    let node = run(
        "group-node",
        &[
            "G",
            "127.0.0.1:0",
            "--no-registry",
            "--metrics",
            &addr,
            "--data-dir",
            data_s,
        ],
        "",
    );
    assert_eq!(node.code, Some(4), "{node:?}");
    assert_eq!(node.stderr.matches(&said).count(), 1, "{node:?}");
    assert!(node.stdout.is_empty(), "{node:?}");
    assert!(absent(&data), "the node left {}", data.display());
    let registry = run(
        "registry",
        &[
            "--bind",
            "127.0.0.1:0",
            "--metrics",
            &addr,
            "--data-dir",
            data_s,
        ],
        "",
    );
    assert_eq!(registry.code, Some(4), "{registry:?}");
    assert_eq!(registry.stderr.matches(&said).count(), 1, "{registry:?}");
    assert!(registry.stdout.is_empty(), "{registry:?}");
    assert!(absent(&data), "the registry left {}", data.display());
}

/// Review of issue 23: `registry release NAME --data-dir DIR` was refused (the flag after
/// the subcommand), and `--data-dir /typo` made `/typo/registry.sqlite3`. The global flags
/// are taken after the subcommand and listed in its help; a directory without a registry
/// database is exit 4, and nothing is made.
#[test]
fn registry_release_takes_its_flags_after_the_name_and_makes_nothing_for_a_typo() {
    let help = run("registry", &["release", "--help"], "");
    assert_eq!(help.code, Some(0), "{help:?}");
    assert!(
        help.stdout.contains("--data-dir") && help.stdout.contains("--store"),
        "{help:?}"
    );
    let dir = tempfile::tempdir().expect("tmp");
    let typo = dir.path().join("typo");
    let typo_s = typo.to_str().expect("utf-8");
    let out = run("registry", &["release", "G", "--data-dir", typo_s], "");
    assert_eq!(out.code, Some(4), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("no registry database in {typo_s}")),
        "{out:?}"
    );
    assert!(absent(&typo), "release made {}", typo.display());

    // A real one, with the flag after the name: a free name is exit 1 (refused), not 2.
    let data = dir.path().join("registry");
    let data_s = data.to_str().expect("utf-8");
    let mut registry = Server::start(
        "registry",
        &["--bind", "127.0.0.1:0", "--data-dir", data_s],
        &dir.path().join("registry.log"),
    );
    assert_eq!(registry.terminate().code(), Some(0), "{}", registry.log());
    let out = run("registry", &["release", "nobody", "--data-dir", data_s], "");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("not bound to any key"), "{out:?}");
}

/// Review of issue 23: `registry --beacon --beacon-address 127.255.255.255 --beacon-port 0`
/// started and warned every second for ever. Port 0 is a usage error for `--beacon-port`
/// on every binary that has it, before anything is created.
#[test]
fn beacon_port_0_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    let runs = [
        run(
            "registry",
            &[
                "--bind",
                "127.0.0.1:0",
                "--beacon",
                "--beacon-address",
                "127.255.255.255",
                "--beacon-port",
                "0",
                "--data-dir",
                data_s,
            ],
            "",
        ),
        run(
            "group-node",
            &[
                "G",
                "127.0.0.1:0",
                "--registry",
                "auto",
                "--beacon-port",
                "0",
                "--data-dir",
                data_s,
            ],
            "",
        ),
        run(
            "thermometer",
            &[
                "--registry",
                "auto",
                "--beacon-port",
                "0",
                "--key-dir",
                data_s,
            ],
            "",
        ),
    ];
    for out in runs {
        assert_eq!(out.code, Some(2), "{out:?}");
        assert!(out.stderr.contains("--beacon-port"), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
    }
    assert!(absent(&data), "left {}", data.display());
}

/// Review of issue 23: `--registry auto` with no registry of the asked `--registry-name`
/// exited 2 from group-node (3 from user-cli): no such registry heard is unreachable, 3.
#[test]
fn registry_auto_with_no_registry_of_that_name_exits_3() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    // A UDP port no beacon goes to.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("udp")
        .local_addr()
        .expect("addr")
        .port()
        .to_string();
    let out = run(
        "group-node",
        &[
            "G",
            "127.0.0.1:0",
            "--registry",
            "auto",
            "--registry-name",
            "attic",
            "--beacon-port",
            &port,
            "--discover-wait",
            "300ms",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ],
        "",
    );
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("attic"), "{out:?}");
}

/// Review of issue 23: `thermometer --registry 127.0.0.1:99999` said `no registry key` and
/// exited 1, and its help said "(seed 003's thermometer)". The endpoint is checked by the
/// same parser as the servers' (exit 2 naming the flag); the help says what it is.
#[test]
fn the_thermometer_checks_registry_and_its_help_speaks_the_users_words() {
    let out = run("thermometer", &["--registry", "127.0.0.1:99999"], "");
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("--registry") && out.stderr.contains("port must be 1-65535"),
        "{out:?}"
    );
    let help = run("thermometer", &["--help"], "");
    assert_eq!(help.code, Some(0), "{help:?}");
    assert!(!help.stdout.contains("seed"), "{help:?}");
    assert!(help.stdout.contains("temperature"), "{help:?}");
}

/// A proxy in front of a PostgreSQL Unix socket, for cutting the database off: it listens
/// at `DIR/.s.PGSQL.PORT` (libpq's name, so a URL with `host=DIR&port=PORT` reaches it) and
/// forwards to the real socket while it is up; cut, it closes every connection and drops
/// new ones at once.
struct PgProxy {
    dir: tempfile::TempDir,
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl PgProxy {
    fn start(real_dir: &Path, port: u16) -> PgProxy {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let dir = tempfile::tempdir().expect("tmp");
        let listener =
            UnixListener::bind(dir.path().join(format!(".s.PGSQL.{port}"))).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let real = real_dir.join(format!(".s.PGSQL.{port}"));
        let (up, stop) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(false)),
        );
        let open: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let accept = {
            let (up, stop, open) = (Arc::clone(&up), Arc::clone(&stop), Arc::clone(&open));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let client = match listener.accept() {
                        Ok((client, _)) => client,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection closes at once
                    }
                    let Ok(server) = UnixStream::connect(&real) else {
                        continue;
                    };
                    client.set_nonblocking(false).expect("blocking");
                    let pipe = |mut from: UnixStream, mut to: UnixStream| {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    };
                    let mut kept = open.lock().expect("lock");
                    for s in [&client, &server] {
                        kept.push(s.try_clone().expect("clone"));
                    }
                    pipe(
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    );
                    pipe(server, client);
                }
            })
        };
        PgProxy {
            dir,
            port,
            up,
            stop,
            open,
            accept: Some(accept),
        }
    }

    fn url(&self, database: &str) -> String {
        format!(
            "postgresql:///{database}?host={}&port={}&user={}",
            self.dir.path().display(),
            self.port,
            agora_tests::pg::ROLE
        )
    }

    /// Cuts (`false`) or restores (`true`) the database.
    fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for s in self.open.lock().expect("lock").drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.set_up(false);
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Review of issue 23: a node waiting for the lease logged `cannot reach the database for
/// the lease; retrying` every 0.6 s for as long as the database was gone. A standby that
/// has reached the database keeps waiting through an outage longer than
/// --failover-timeout (only the start gives up), warns once, and takes over once the
/// database is back and the active node is gone.
#[test]
fn a_standby_keeps_waiting_through_a_database_outage_and_warns_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = agora_tests::pg::PgCluster::start();
    let direct = cluster.database("agora");
    let port: u16 = direct
        .rsplit_once("port=")
        .and_then(|(_, rest)| rest.split('&').next())
        .and_then(|p| p.parse().ok())
        .expect("the cluster's port in its URL");
    let proxy = PgProxy::start(&cluster.socket_dir(), port);
    let node = |url: &str, tag: &str| {
        let data = dir.path().join(tag);
        let args = [
            "ha",
            "127.0.0.1:0",
            "--no-registry",
            "--store",
            url,
            "--failover-timeout",
            "300ms",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ];
        Server::spawn("group-node", &args, &dir.path().join(format!("{tag}.log")))
    };
    let mut active = node(&direct, "active").wait_listening(START_TIMEOUT);
    let mut standby = node(&proxy.url("agora"), "standby");
    assert!(
        wait_for(START_TIMEOUT, || standby.log().contains("waiting for it")),
        "{}",
        standby.log()
    );
    proxy.set_up(false);
    let warned = |log: &str| log.matches("cannot reach the database").count();
    assert!(
        wait_for(START_TIMEOUT, || warned(&standby.log()) > 0),
        "{}",
        standby.log()
    );
    // Ten times --failover-timeout without the database: still waiting, warned once.
    assert!(
        !wait_for(Duration::from_secs(3), || standby.exited()),
        "the standby gave up: {}",
        standby.log()
    );
    assert_eq!(warned(&standby.log()), 1, "{}", standby.log());
    proxy.set_up(true);
    active.kill9();
    assert!(
        wait_for(START_TIMEOUT, || standby.log().contains("took the lease")),
        "{}",
        standby.log()
    );
    assert!(
        standby.log().contains("reached the database again"),
        "{}",
        standby.log()
    );
    assert_eq!(warned(&standby.log()), 1, "{}", standby.log());
}
