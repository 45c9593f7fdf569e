//! LAN discovery by UDP beacon (PROTOCOL §10), through the real binaries. Every beacon goes
//! to the loopback broadcast address 127.255.255.255, on a port the test picks.

use agora_tests::{cli, CliRun, Federation, Server};

/// A free UDP port (the OS picks it on loopback; released for the test's beacons).
fn free_udp_port() -> String {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port().to_string())
        .expect("a free UDP port")
}

/// A registry's arguments to announce itself as `name` on `port`, on loopback only.
fn beacon<'a>(port: &'a str, name: &'a str) -> [&'a str; 7] {
    [
        "--beacon",
        "--beacon-address",
        "127.255.255.255",
        "--beacon-port",
        port,
        "--name",
        name,
    ]
}

/// A registry of its own (data and log named by `tag`, a new key pair) bound to `bind`,
/// announcing itself as `name` on `port`.
fn beaconing_registry(fed: &Federation, bind: &str, port: &str, name: &str, tag: &str) -> Server {
    let data = fed.path(&format!("{tag}-data"));
    let mut args = vec![
        "--bind",
        bind,
        "--key-bind",
        "tcp://127.0.0.1:0",
        "--data-dir",
        &data,
    ];
    args.extend_from_slice(&beacon(port, name));
    Server::start(
        "registry",
        &args,
        &fed.dir.path().join(format!("{tag}.log")),
    )
}

/// user-cli as `user` with `--registry auto` on beacon port `port` and `args`, with the
/// federation's key and state directories and no registry key given.
fn auto(fed: &Federation, user: &str, port: &str, args: &[&str]) -> CliRun {
    let mut all = vec![
        "--registry",
        "auto",
        "--beacon-port",
        port,
        "--discover-wait",
        "2500ms",
        "--user",
        user,
    ];
    all.extend_from_slice(args);
    let (state, keys) = (fed.state_dir(), fed.key_dir());
    cli(
        &all,
        "",
        &[
            ("TZ", "UTC"),
            ("AGORA_STATE_DIR", &state),
            ("AGORA_KEY_DIR", &keys),
        ],
    )
}

/// user-cli `--registry auto groups` on a pseudo-terminal (`script -qec`), answering
/// `choice` when it asks which registry; with a state directory of its own, so that its pin
/// is a first use. Returns everything the terminal showed.
fn pick_on_terminal(fed: &Federation, port: &str, choice: &str) -> String {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let user_cli = agora_tests::bin("user-cli");
    let command = format!(
        "{} --registry auto --beacon-port {port} --discover-wait 2500ms --user zed groups",
        user_cli.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("AGORA_STATE_DIR", fed.path("terminal-state"))
        .env("AGORA_KEY_DIR", fed.key_dir())
        .env_remove("AGORA_REGISTRY")
        .env_remove("AGORA_REGISTRY_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{choice}\n").as_bytes())
        .expect("answer");
    let exited = agora_tests::wait_for(std::time::Duration::from_secs(20), || {
        child.try_wait().ok().flatten().is_some()
    });
    drop(stdin);
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    let mut shown = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut shown);
    }
    assert!(exited, "user-cli on a terminal did not finish: {shown}");
    shown
}

#[test]
fn clients_and_nodes_find_the_registry_by_its_beacon_and_pin_its_key() {
    let port = free_udp_port();
    let fed = Federation::start_with("200ms", &beacon(&port, "lab"));
    let key = fed.registry.key.clone().expect("a CURVE registry");

    // discover lists what it hears; the endpoint is the registry's own.
    let run = auto(&fed, "alice", &port, &["discover"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout.trim(),
        format!("lab {} key {key}", fed.registry.endpoint),
        "{run:?}"
    );

    // A node finds it too, and registers.
    let node_data = fed.path("data-auto");
    let _node = Server::start(
        "group-node",
        &[
            "Cool Group",
            "127.0.0.1:0",
            "--registry",
            "auto",
            "--beacon-port",
            &port,
            "--discover-wait",
            "2500ms",
            "--data-dir",
            &node_data,
            "--heartbeat",
            "200ms",
        ],
        &fed.dir.path().join("node-auto.log"),
    );

    // The first use pins the key heard, with the warning; the next runs are quiet.
    let first = auto(&fed, "alice", &port, &["groups"]);
    assert_eq!(first.code, Some(0), "{first:?}");
    assert!(
        first
            .stderr
            .contains(&format!("pinned the registry key {key}")),
        "{first:?}"
    );
    assert!(
        agora_tests::wait_for(std::time::Duration::from_secs(20), || {
            auto(&fed, "alice", &port, &["groups"])
                .stdout
                .contains("Cool Group")
        }),
        "the node found by beacon never registered"
    );
    let again = auto(&fed, "alice", &port, &["join", "Cool Group"]);
    assert_eq!(again.code, Some(0), "{again:?}");
    assert!(!again.stderr.contains("pinned"), "{again:?}");

    // Nothing on another port: a clear error, and nothing was sent anywhere.
    let silent = free_udp_port();
    let none = auto(&fed, "alice", &silent, &["groups"]);
    assert_eq!(none.code, Some(3), "unreachable: {none:?}");
    assert!(none.stderr.contains("no registry heard"), "{none:?}");
}

#[test]
fn among_several_registries_one_is_picked_by_name_and_a_changed_key_is_refused() {
    let port = free_udp_port();
    let mut fed = Federation::start_with("200ms", &beacon(&port, "lab"));
    let annex = beaconing_registry(&fed, "tcp://127.0.0.1:0", &port, "annex", "annex");

    // On a terminal (a pty from util-linux's `script`), user-cli lists them and asks.
    let picked = pick_on_terminal(&fed, &port, "2");
    assert!(
        picked.contains("several registries heard")
            && picked.contains("1. annex at")
            && picked.contains("2. lab at"),
        "{picked}"
    );
    assert!(
        picked.contains(&format!(
            "pinned the registry key {}",
            fed.registry.key.as_deref().expect("lab's key")
        )),
        "lab, the second, was used: {picked}"
    );

    let both = auto(&fed, "alice", &port, &["groups"]);
    assert_eq!(both.code, Some(2), "{both:?}");
    assert!(
        both.stderr.contains("several registries heard")
            && both.stderr.contains("annex at")
            && both.stderr.contains("lab at"),
        "{both:?}"
    );
    let named = auto(
        &fed,
        "alice",
        &port,
        &["--registry-name", "annex", "groups"],
    );
    assert_eq!(named.code, Some(0), "{named:?}");
    assert!(
        named
            .stderr
            .contains(annex.key.as_deref().expect("annex key")),
        "the annex's key was pinned: {named:?}"
    );
    let unknown = auto(
        &fed,
        "alice",
        &port,
        &["--registry-name", "attic", "groups"],
    );
    assert_eq!(unknown.code, Some(3), "unreachable: {unknown:?}");
    assert!(
        unknown.stderr.contains("no registry named \"attic\""),
        "{unknown:?}"
    );

    // lab is pinned, then replaced by a registry with another key on the same endpoint:
    // its beacon is refused as loudly as the key endpoint would be.
    let lab = auto(&fed, "alice", &port, &["--registry-name", "lab", "groups"]);
    assert_eq!(lab.code, Some(0), "{lab:?}");
    fed.registry.kill9();
    let endpoint = fed.registry.endpoint.clone();
    fed.registry = beaconing_registry(&fed, &endpoint, &port, "lab", "lab-new");
    let changed = auto(&fed, "alice", &port, &["--registry-name", "lab", "groups"]);
    assert_eq!(changed.code, Some(1), "refused: {changed:?}");
    assert!(
        changed.stderr.contains("THE REGISTRY'S KEY HAS CHANGED"),
        "{changed:?}"
    );
    // An explicit key always wins.
    let new_key = fed.registry.key.clone().expect("a key");
    let given = auto(
        &fed,
        "alice",
        &port,
        &[
            "--registry-name",
            "lab",
            "--registry-key",
            &new_key,
            "groups",
        ],
    );
    assert_eq!(given.code, Some(0), "{given:?}");
}

#[test]
fn the_thermometer_bot_finds_the_registry_by_its_beacon() {
    let port = free_udp_port();
    let fed = Federation::start_with("200ms", &beacon(&port, "lab"));
    let keys = fed.key_dir();
    let _bot = Server::start(
        "thermometer",
        &[
            "--registry",
            "auto",
            "--beacon-port",
            &port,
            "--discover-wait",
            "2500ms",
            "--key-dir",
            &keys,
        ],
        &fed.dir.path().join("thermometer.log"),
    );
    // `whois` needs an account of one's own.
    let alice = fed.cli("alice", &["register", "alice"], "");
    assert_eq!(alice.code, Some(0), "{alice:?}");
    let registered =
        |fed: &Federation| fed.cli("alice", &["whois", "thermometer1"], "").code == Some(0);
    assert!(
        agora_tests::wait_for(std::time::Duration::from_secs(20), || registered(&fed)),
        "the bot never registered its account"
    );
    let pins = std::fs::read_to_string(std::path::Path::new(&keys).join("known_servers.json"))
        .expect("the bot pinned the key it heard");
    assert!(
        pins.contains(fed.registry.key.as_deref().expect("a key")),
        "{pins}"
    );
}
