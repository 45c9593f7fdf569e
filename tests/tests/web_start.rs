//! agora-web's start-up, as the servers' and user-cli's (issue 23, items 2, 3 and 5): its
//! endpoints are checked before anything is made (`IP:PORT` accepted, lists entry by entry,
//! exit 2 naming the flag and the value), `--bind` is bound before the key pair, the pin,
//! the account at the registry, the data directory and the link socket (a busy port leaves
//! none of them: exit 4 naming `--bind`), a log file gets no colour codes, errors say each
//! cause once, and the exit codes follow the README's table.
//!
//! Each gateway runs in an environment of its own (`env_clear`, a fresh `HOME`), so that
//! "nothing made" can be checked by looking at that home.

use std::path::{Path, PathBuf};
use std::process::Command;

use agora_tests::{bin, run_command, CliRun, Federation, Server, START_TIMEOUT};

/// A fresh home for one gateway run, and the command that runs agora-web in it with `args`:
/// no environment but `PATH`, `HOME` and `TZ` (no `AGORA_*`, no `XDG_*`), so every default
/// place (keys, pins, data, link socket) is under the home.
fn in_fresh_home(dir: &Path, args: &[&str]) -> (PathBuf, Command) {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).expect("home");
    let mut command = Command::new(bin("agora-web"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("TZ", "UTC")
        .args(args);
    (home, command)
}

/// Every path under `dir` (empty when nothing was made there).
fn made_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            found.push(path);
        }
    }
    found
}

/// The one stderr line of a failed run, without the program's prefix; fails the test when
/// there are more lines or no prefix.
fn one_error_line(run: &CliRun) -> &str {
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {run:?}");
    lines[0]
        .strip_prefix("agora-web: ")
        .unwrap_or_else(|| panic!("prefixed with the program's name: {run:?}"))
}

/// Whether `text` holds a duration written with fractions of a second to many places, as
/// `{:?}` of a Duration writes it (`1.001601364s`), rather than as people write it.
fn has_debug_duration(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.windows(5).enumerate().any(|(i, w)| {
        w[0].is_ascii_digit()
            && w[1] == b'.'
            && w[2..].iter().all(u8::is_ascii_digit)
            && bytes.get(i + 5).is_some_and(u8::is_ascii_digit)
    })
}

/// `tcp://HOST:PORT` as `HOST:PORT`.
fn host_port(endpoint: &str) -> &str {
    endpoint.strip_prefix("tcp://").unwrap_or(endpoint)
}

#[test]
fn bad_endpoints_and_ports_are_usage_errors_naming_the_flag_before_anything_is_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Each bad value with what the one error line must name.
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--registry", "tcp://127.0.0.1:99999"],
            &["--registry", "tcp://127.0.0.1:99999", "1-65535"],
        ),
        (
            &["--registry", "127.0.0.1:99999"],
            &["--registry", "127.0.0.1:99999", "1-65535"],
        ),
        // A list is checked entry by entry: the bad entry is named.
        (
            &["--registry", "127.0.0.1:5555,udp://127.0.0.1:5556"],
            &["--registry", "udp://127.0.0.1:5556", "tcp://"],
        ),
        (
            &["--registry", "0.0.0.0:5555"],
            &["--registry", "0.0.0.0", "wildcard"],
        ),
        (
            &["--registry-key-endpoint", "127.0.0.1:0"],
            &["--registry-key-endpoint", "127.0.0.1:0", "1-65535"],
        ),
        (
            &["--registry-key-endpoint", "ipc:///tmp/key"],
            &["--registry-key-endpoint", "ipc://"],
        ),
        (
            &["--bind", "127.0.0.1:99999"],
            &["--bind", "127.0.0.1:99999", "0-65535"],
        ),
        (&["--bind", "localhost:8080"], &["--bind", "IP:PORT"]),
        // No key endpoint past port 65535, and no key given: said, not tried blank.
        (
            &["--registry", "127.0.0.1:65535"],
            &["--registry", "127.0.0.1:65535", "--registry-key-endpoint"],
        ),
    ];
    for (i, (args, named)) in cases.iter().enumerate() {
        let case = dir.path().join(format!("case-{i}"));
        let (home, mut command) = in_fresh_home(&case, &["--user", "alice"]);
        command.args(*args);
        let refused = run_command(command, "");
        assert_eq!(
            refused.code,
            Some(2),
            "{args:?}: a usage error: {refused:?}"
        );
        let said = refused.stderr.trim();
        for word in *named {
            assert!(said.contains(word), "{args:?}: names {word:?}: {said}");
        }
        assert!(!said.contains("zmq"), "{args:?}: no libzmq words: {said}");
        assert_eq!(
            made_under(&home),
            Vec::<PathBuf>::new(),
            "{args:?}: nothing made"
        );
    }
    // The environment's value is checked the same way.
    let case = dir.path().join("env");
    let (home, mut command) = in_fresh_home(&case, &["--user", "alice"]);
    command.env("AGORA_REGISTRY", "127.0.0.1:70000");
    let refused = run_command(command, "");
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(refused.stderr.contains("127.0.0.1:70000"), "{refused:?}");
    assert_eq!(made_under(&home), Vec::<PathBuf>::new());
}

#[test]
fn a_registry_given_as_ip_port_is_asked_for_its_key_and_gets_the_account() {
    let fed = Federation::start("200ms");
    let key_endpoint = fed
        .registry
        .key_endpoint
        .clone()
        .expect("the registry prints its key endpoint");
    let (home, mut command) = in_fresh_home(
        &fed.dir.path().join("ip-port"),
        &[
            "--user",
            "alice",
            "--bind",
            "127.0.0.1:0",
            "--registry",
            host_port(&fed.registry.endpoint),
            "--registry-key-endpoint",
            host_port(&key_endpoint),
        ],
    );
    command.env("AGORA_WEB_LINK_SOCKET", fed.path("links/ip-port.sock"));
    let web = Server::spawn_command(
        command,
        "agora-web",
        &fed.dir.path().join("web-ip-port.log"),
    )
    .wait_listening(START_TIMEOUT);
    // The key was asked of the key endpoint and pinned under the registry's tcp:// form, as
    // user-cli pins it.
    let pins = std::fs::read_to_string(home.join(".local/state/agora/known_servers.json"))
        .expect("the pin is written");
    let pins: serde_json::Value = serde_json::from_str(&pins).expect("pins are JSON");
    assert_eq!(
        pins[&fed.registry.endpoint].as_str(),
        Some(fed.registry_key().as_str()),
        "{pins}"
    );
    // And the account was made at that registry (registering happens before `listening`),
    // as another user sees it.
    let bob = fed.cli("bob", &["register", "bob"], "");
    assert_eq!(bob.code, Some(0), "{bob:?}");
    let whois = fed.cli("bob", &["whois", "alice"], "");
    assert_eq!(
        whois.code,
        Some(0),
        "alice has an account: {whois:?}; log:\n{}",
        web.log()
    );
    assert!(
        !web.log().contains("direct messages need the account"),
        "{}",
        web.log()
    );
}

#[test]
fn a_log_written_to_a_file_has_no_colour_codes() {
    let fed = Federation::start("200ms");
    let web = fed.web_personal("alice");
    // The link line is logged before `listening`: the log has something to look at.
    let log = web.log();
    assert!(log.contains("sign-in link"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI escape in a log file: {log:?}"
    );
}

#[test]
fn a_busy_bind_port_makes_nothing_and_names_the_flag() {
    let fed = Federation::start("200ms");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let address = taken.local_addr().expect("its address").to_string();
    let key_endpoint = fed.registry.key_endpoint.clone().expect("key endpoint");
    let expected = format!(
        "--bind {address}: address in use: another program listens there; pick another port"
    );

    // Personal mode, with no key pinned: it would pin, make a key pair, register the account
    // and make the link socket, were the port bound later.
    let (home, command) = in_fresh_home(
        &fed.dir.path().join("personal"),
        &[
            "--user",
            "alice",
            "--bind",
            &address,
            "--registry",
            &fed.registry.endpoint,
            "--registry-key-endpoint",
            &key_endpoint,
        ],
    );
    let refused = run_command(command, "");
    assert_eq!(refused.code, Some(4), "local I/O: {refused:?}");
    assert_eq!(one_error_line(&refused), expected);
    assert_eq!(made_under(&home), Vec::<PathBuf>::new(), "nothing made");
    let bob = fed.cli("bob", &["register", "bob"], "");
    assert_eq!(bob.code, Some(0), "{bob:?}");
    let whois = fed.cli("bob", &["whois", "alice"], "");
    assert_eq!(whois.code, Some(1), "no account registered: {whois:?}");
    assert!(
        whois.stderr.contains("no user named alice") || whois.stderr.contains("unknown_user"),
        "{whois:?}"
    );

    // Hosted mode: no data directory.
    let data = fed.dir.path().join("hosted-data");
    let (home, mut command) = in_fresh_home(
        &fed.dir.path().join("hosted"),
        &[
            "--hosted",
            "--bind",
            &address,
            "--registry",
            &fed.registry.endpoint,
            "--registry-key-endpoint",
            &key_endpoint,
        ],
    );
    command.arg("--data-dir").arg(&data);
    let refused = run_command(command, "");
    assert_eq!(refused.code, Some(4), "{refused:?}");
    assert_eq!(one_error_line(&refused), expected);
    assert!(!data.exists(), "no data directory");
    assert_eq!(made_under(&home), Vec::<PathBuf>::new());
    drop(taken);
}

#[test]
fn an_unanswered_registry_exits_3_with_its_cause_once_and_makes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port that accepts TCP and never speaks ZMTP: the key request gets no answer.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a silent port");
    let silent = silent.local_addr().expect("its address").to_string();
    let (home, command) = in_fresh_home(
        dir.path(),
        &[
            "--user",
            "alice",
            "--bind",
            "127.0.0.1:0",
            "--registry",
            &silent,
            "--registry-key-endpoint",
            &silent,
            "--timeout",
            "1s",
        ],
    );
    let failed = run_command(command, "");
    assert_eq!(failed.code, Some(3), "unreachable: {failed:?}");
    let said = one_error_line(&failed);
    for part in [
        format!("registry tcp://{silent}"),
        format!("key endpoint tcp://{silent}"),
        "within 1s".to_owned(),
        "--registry-key".to_owned(),
    ] {
        assert!(said.contains(&part), "names {part:?}: {said}");
    }
    assert_eq!(said.matches("within").count(), 1, "the cause once: {said}");
    assert!(
        !has_debug_duration(said),
        "a duration as people write it: {said}"
    );
    assert_eq!(made_under(&home), Vec::<PathBuf>::new(), "nothing made");
}

#[test]
fn a_key_pair_that_cannot_be_written_exits_4_not_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").expect("a file");
    let key_dir = file.join("keys");
    let registry_key = agora_common::keys::Keypair::generate()
        .expect("a key pair")
        .public
        .to_string();
    let (_home, mut command) = in_fresh_home(
        dir.path(),
        &[
            "--user",
            "alice",
            "--bind",
            "127.0.0.1:0",
            "--registry-key",
            &registry_key,
        ],
    );
    command.arg("--key-dir").arg(&key_dir);
    command.env("AGORA_WEB_LINK_SOCKET", dir.path().join("links/web.sock"));
    let failed = run_command(command, "");
    assert_eq!(failed.code, Some(4), "local I/O: {failed:?}");
    let said = one_error_line(&failed);
    assert!(
        said.contains(&*file.to_string_lossy()),
        "names the path: {said}"
    );
    assert!(
        !dir.path().join("links/web.sock").exists(),
        "the link socket is removed again"
    );
}

#[test]
fn a_tls_file_that_cannot_be_read_fails_before_listening_and_makes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let missing = dir.path().join("missing.pem");
    let registry_key = agora_common::keys::Keypair::generate()
        .expect("a key pair")
        .public
        .to_string();
    let (home, mut command) = in_fresh_home(
        dir.path(),
        &[
            "--hosted",
            "--bind",
            "127.0.0.1:0",
            "--registry-key",
            &registry_key,
        ],
    );
    command
        .arg("--data-dir")
        .arg(&data)
        .arg("--tls-cert")
        .arg(&missing)
        .arg("--tls-key")
        .arg(&missing);
    let failed = run_command(command, "");
    assert_eq!(failed.code, Some(4), "local I/O: {failed:?}");
    assert_eq!(failed.stdout, "", "no listening line: {failed:?}");
    let said = one_error_line(&failed);
    assert!(
        said.starts_with("--tls-cert ") && said.contains(&*missing.to_string_lossy()),
        "names the flag and the file: {said}"
    );
    assert!(!data.exists(), "no data directory");
    assert_eq!(made_under(&home), Vec::<PathBuf>::new());
}
