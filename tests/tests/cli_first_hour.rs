//! user-cli in a newcomer's first hour (issue 23): a shell with no `$USER`, `--registry`
//! values checked before anything is made, one exit-code table (0 ok, 1 refused, 2 usage,
//! 3 unreachable, 4 local I/O) with sessions that go on after a failed line, messages from
//! arguments, stdin or a file (empty ones refused, input that is not UTF-8 named by its
//! line), errors in people's words, aligned tables, JSON with the documented fields, and help
//! in the user's words. Each test runs the real binaries.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agora_tests::{bin, cli, run_command, wait_for, CliRun, Federation, Server};

/// The environment of a user-cli run of `fed` (state, keys, the registry's key).
fn env_of(fed: &Federation) -> Vec<(&'static str, String)> {
    vec![
        ("TZ", "UTC".to_owned()),
        ("AGORA_STATE_DIR", fed.state_dir()),
        ("AGORA_KEY_DIR", fed.key_dir()),
        ("AGORA_REGISTRY_KEY", fed.registry_key()),
    ]
}

/// Runs user-cli as `user` against `fed` with stdin given as bytes (which may not be UTF-8):
/// the bytes go in a file that a shell redirects to user-cli's stdin, and the harness's
/// [`run_command`] runs it to its end within its deadline.
fn cli_bytes(fed: &Federation, user: &str, args: &[&str], stdin: &[u8]) -> CliRun {
    let input = tempfile::NamedTempFile::new_in(fed.path("")).expect("an input file");
    std::fs::write(input.path(), stdin).expect("write the input");
    let mut command = Command::new("sh");
    command
        .args(["-c", "exec \"$@\" < \"$0\""])
        .arg(input.path())
        .arg(bin("user-cli"))
        .args(["--registry", &fed.registry.endpoint, "--user", user])
        .args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("AGORA_") {
            command.env_remove(key);
        }
    }
    command.envs(env_of(fed));
    run_command(command, "")
}

/// A user-cli command in a bare environment, as `env -i PATH=… HOME=…` gives: no `$USER`,
/// no `$LOGNAME`, no `$TERM`, nothing of the caller's.
fn bare(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(bin("user-cli"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .args(args);
    command
}

/// A federation with one group, `Cool Group`, that `alice` (and `bob`) joined.
fn federation_with_a_group() -> (Federation, Server) {
    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    (fed, node)
}

fn run_as(fed: &Federation, user: &str, args: &[&str], stdin: &str) -> CliRun {
    fed.cli(user, args, stdin)
}

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:#?}");
    run
}

/// The JSON objects of a run's stdout, one per line.
fn json_lines(run: &CliRun) -> Vec<serde_json::Value> {
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Whether `object` has every one of `fields`.
fn has_fields(object: &serde_json::Value, fields: &[&str]) -> bool {
    fields.iter().all(|f| object.get(f).is_some())
}

/// A free loopback TCP port with nothing listening (bound, read and released).
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Whether a message shows a duration with a fraction (`1.001396117s`, `3.3s`) instead of
/// as people write it (`1s`, `3s 300ms`).
fn has_raw_duration(text: &str) -> bool {
    text.split(|c: char| c.is_whitespace() || matches!(c, ';' | ',' | '(' | ')'))
        .any(|word| {
            let number = word.trim_end_matches("ms").trim_end_matches('s');
            number.len() < word.len() && number.contains('.') && number.parse::<f64>().is_ok()
        })
}

#[test]
fn without_user_the_os_account_is_used_and_identity_free_commands_never_ask() {
    let fed = Federation::start("200ms");
    let home = tempfile::tempdir().expect("home");
    let keys = home.path().join("keys");
    let state = home.path().join("state");
    let keys_arg = keys.to_str().expect("utf-8");
    let state_arg = state.to_str().expect("utf-8");

    // Commands that need no identity: none says a word about a user, none makes a key.
    let beacon_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
        .to_string();
    for (args, code) in [
        (vec!["completions", "bash"], 0),
        (vec!["manpage"], 0),
        (vec!["help"], 0),
        (vec!["help", "send"], 0),
        (vec!["forget-registry"], 0),
        (
            vec![
                "discover",
                "--beacon-port",
                &beacon_port,
                "--discover-wait",
                "200ms",
            ],
            3,
        ),
    ] {
        let mut all = vec!["--key-dir", keys_arg, "--state-dir", state_arg];
        all.extend(args.iter().copied());
        let run = run_command(bare(home.path(), &all), "");
        assert_eq!(run.code, Some(code), "{args:?}: {run:#?}");
        assert!(
            !run.stderr.contains("$USER") && !run.stderr.contains("key pair"),
            "{args:?} asks for a user: {run:#?}"
        );
        assert!(!keys.exists(), "{args:?} made a key pair");
    }

    // A command that needs one: the OS account name, said once with the key pair.
    let me = whoami_name();
    let mut groups = bare(
        home.path(),
        &[
            "--key-dir",
            keys_arg,
            "--state-dir",
            state_arg,
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &fed.registry_key(),
            "groups",
        ],
    );
    groups.current_dir(home.path());
    let run = run_command(groups, "");
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stderr.contains(&format!(
            "made the key pair of user {me} (from the OS account name"
        )),
        "{run:#?}"
    );
    assert!(keys.join(format!("{me}.key")).exists());
    // Said once: the next run has the key pair and says nothing.
    let mut again = bare(
        home.path(),
        &[
            "--key-dir",
            keys_arg,
            "--state-dir",
            state_arg,
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &fed.registry_key(),
            "groups",
        ],
    );
    again.current_dir(home.path());
    let run = run_command(again, "");
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stderr, "", "{run:#?}");

    // $LOGNAME comes before the OS account name.
    let mut logname = bare(
        home.path(),
        &[
            "--key-dir",
            keys_arg,
            "--state-dir",
            state_arg,
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &fed.registry_key(),
            "keys",
        ],
    );
    logname.env("LOGNAME", "carol");
    let run = run_command(logname, "");
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stderr
            .contains("made the key pair of user carol (from $LOGNAME"),
        "{run:#?}"
    );
}

/// The OS account name, as `id -un` says.
fn whoami_name() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn registry_values_are_checked_before_anything_is_made_and_ip_port_is_accepted() {
    let fed = Federation::start("200ms");
    let home = tempfile::tempdir().expect("home");
    let keys = home.path().join("keys");
    let state = home.path().join("state");
    for bad in [
        "tcp://127.0.0.1:99999",
        "127.0.0.1:99999",
        "127.0.0.1:0",
        "0.0.0.0:5555",
        "tcp://*:5555",
        "udp://127.0.0.1:5555",
        "http://127.0.0.1:5555",
        "tcp://127.0.0.1:5555,nonsense",
    ] {
        let run = cli(
            &["--registry", bad, "--user", "alice", "groups"],
            "",
            &[
                ("AGORA_KEY_DIR", keys.to_str().expect("utf-8")),
                ("AGORA_STATE_DIR", state.to_str().expect("utf-8")),
            ],
        );
        assert_eq!(run.code, Some(2), "{bad}: {run:#?}");
        assert!(run.stderr.contains("--registry"), "{bad}: {run:#?}");
        let shown = bad.rsplit(',').next().expect("a value");
        assert!(run.stderr.contains(shown), "{bad}: {run:#?}");
        assert_eq!(run.stderr.lines().count(), 1, "one line: {run:#?}");
        assert!(!keys.exists(), "{bad}: a key pair was made");
        assert!(!state.exists(), "{bad}: the state directory was made");
    }

    // IP:PORT as well as tcp://, and lists of either.
    let host_port = fed
        .registry
        .endpoint
        .strip_prefix("tcp://")
        .expect("a tcp endpoint")
        .to_owned();
    let env = env_of(&fed);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for registry in [
        host_port.clone(),
        format!("127.0.0.1:{},{host_port}", dead_port()),
    ] {
        let run = cli(
            &[
                "--registry",
                &registry,
                "--user",
                "alice",
                "--timeout",
                "2s",
                "groups",
            ],
            "",
            &env,
        );
        assert_eq!(run.code, Some(0), "{registry}: {run:#?}");
    }
}

#[test]
fn an_unreachable_registry_exits_3_naming_its_endpoint_in_every_path() {
    let home = tempfile::tempdir().expect("home");
    let keys = home.path().join("keys");
    let state = home.path().join("state");
    let dead = format!("127.0.0.1:{}", dead_port());
    let env = [
        ("AGORA_KEY_DIR", keys.to_str().expect("utf-8")),
        ("AGORA_STATE_DIR", state.to_str().expect("utf-8")),
    ];

    // No key given: its key endpoint is asked first, for the whole --timeout (it was cut to
    // 1 s whatever --timeout said), and does not answer.
    let run = cli(
        &[
            "--registry",
            &dead,
            "--user",
            "alice",
            "--timeout",
            "1200ms",
            "groups",
        ],
        "",
        &env,
    );
    assert_eq!(run.code, Some(3), "{run:#?}");
    assert!(
        run.stderr.contains(&format!("tcp://{dead}")),
        "the real endpoint: {run:#?}"
    );
    assert!(run.stderr.contains("within 1s 200ms"), "{run:#?}");
    assert!(!has_raw_duration(&run.stderr), "{run:#?}");
    assert!(!keys.exists(), "no key pair for an unreachable registry");

    // A key given: the registry itself does not answer, within the whole --timeout.
    let key = agora_common::keys::Keypair::generate()
        .expect("a key pair")
        .public
        .to_string();
    let with_key = [env[0], env[1], ("AGORA_REGISTRY_KEY", key.as_str())];
    let run = cli(
        &[
            "--registry",
            &dead,
            "--user",
            "alice",
            "--timeout",
            "1500ms",
            "groups",
        ],
        "",
        &with_key,
    );
    assert_eq!(run.code, Some(3), "{run:#?}");
    assert!(run.stderr.contains(&format!("tcp://{dead}")), "{run:#?}");
    assert!(run.stderr.contains("within 1s 500ms"), "{run:#?}");
    assert!(!has_raw_duration(&run.stderr), "{run:#?}");

    // --registry auto with no registry heard.
    let beacon_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
        .to_string();
    let run = cli(
        &[
            "--registry",
            "auto",
            "--beacon-port",
            &beacon_port,
            "--discover-wait",
            "300ms",
            "--user",
            "alice",
            "groups",
        ],
        "",
        &env,
    );
    assert_eq!(run.code, Some(3), "{run:#?}");
    assert!(run.stderr.contains("within 300ms"), "{run:#?}");

    // In a session the line fails, says so, and the session goes on.
    let run = cli(
        &["--registry", &dead, "--user", "alice", "--timeout", "1s"],
        "groups\nexit 5\n",
        &with_key,
    );
    assert_eq!(run.code, Some(5), "{run:#?}");
    assert!(run.stderr.contains(&format!("tcp://{dead}")), "{run:#?}");
}

#[test]
fn exit_codes_follow_the_table_and_a_failed_session_line_does_not_set_the_status() {
    let (fed, _node) = federation_with_a_group();
    ok(run_as(&fed, "alice", &["send", "Cool Group", "hello"], ""));

    // 1: refused by a server, a missing message included.
    let missing = run_as(&fed, "alice", &["get_file", "Cool Group", "999"], "");
    assert_eq!(missing.code, Some(1), "{missing:#?}");
    assert!(missing.stderr.contains("no message 999"), "{missing:#?}");
    let no_file = run_as(&fed, "alice", &["get_file", "Cool Group", "1"], "");
    assert_eq!(no_file.code, Some(1), "{no_file:#?}");
    let unknown = run_as(&fed, "alice", &["join", "No Such Group"], "");
    assert_eq!(unknown.code, Some(1), "{unknown:#?}");
    // 2: usage.
    let usage = run_as(&fed, "alice", &["set_mode", "Cool Group", "secret"], "");
    assert_eq!(usage.code, Some(2), "{usage:#?}");
    // 4: local input or output.
    let missing_file = run_as(
        &fed,
        "alice",
        &["send_file", "Cool Group", "/nonexistent/report.pdf"],
        "",
    );
    assert_eq!(missing_file.code, Some(4), "{missing_file:#?}");
    assert!(
        missing_file.stderr.contains("/nonexistent/report.pdf"),
        "{missing_file:#?}"
    );
    let missing_text = run_as(
        &fed,
        "alice",
        &["send", "Cool Group", "--file", "/nonexistent/text.txt"],
        "",
    );
    assert_eq!(missing_text.code, Some(4), "{missing_text:#?}");

    // Sessions: failed lines print their error and the session goes on; `exit N` sets
    // the status, `exit` and the end of input are 0.
    let session = run_as(
        &fed,
        "alice",
        &[],
        "frobnicate\njoin\nget_file \"Cool Group\" 999\nsend \"Cool Group\" after the errors\n",
    );
    assert_eq!(session.code, Some(0), "{session:#?}");
    assert_eq!(session.stderr.lines().count(), 3, "{session:#?}");
    assert!(
        !session.stderr.contains("Usage:") && !session.stderr.contains("agora>"),
        "{session:#?}"
    );
    assert!(
        session.stdout.contains("sent to Cool Group"),
        "{session:#?}"
    );
    for (script, code) in [
        ("frobnicate\nexit\n", 0),
        ("exit 7\ngroups\n", 7),
        ("frobnicate\nexit 0\n", 0),
        ("exit 255\n", 255),
        ("exit 256\nquit 3\n", 3),
    ] {
        let run = run_as(&fed, "alice", &[], script);
        assert_eq!(run.code, Some(code), "{script:?}: {run:#?}");
    }
}

#[test]
fn empty_messages_are_refused_and_text_comes_from_stdin_a_file_or_the_lines_up_to_end() {
    let (fed, _node) = federation_with_a_group();
    ok(run_as(&fed, "bob", &["join", "Cool Group"], ""));

    // Nothing to send: refused before anything is sent, for every kind of message.
    for args in [
        vec!["send", "Cool Group", ""],
        vec!["send", "Cool Group", "   "],
        vec!["send", "Cool Group", "--json-body", "\"  \""],
        vec!["send_dm", "bob", " "],
        vec!["multicast", "bob,carol", ""],
        vec!["broadcast", "  "],
    ] {
        let run = run_as(&fed, "alice", &args, "");
        assert_eq!(run.code, Some(2), "{args:?}: {run:#?}");
        assert!(run.stderr.contains("nothing to send"), "{args:?}: {run:#?}");
    }
    for stdin in ["END\n", "", "  \n\nEND\n"] {
        let run = run_as(&fed, "alice", &["send_message", "Cool Group"], stdin);
        assert_eq!(run.code, Some(2), "{stdin:?}: {run:#?}");
        assert!(run.stderr.contains("nothing to send"), "{run:#?}");
    }
    let latest = |fed: &Federation| -> serde_json::Value {
        let run = ok(run_as(
            fed,
            "alice",
            &["--json", "messages", "Cool Group", "--latest", "1"],
            "",
        ));
        json_lines(&run).pop().expect("a message")
    };
    let before = latest(&fed)["seq"].clone();

    // The end of input ends send_message's text.
    ok(run_as(
        &fed,
        "alice",
        &["send_message", "Cool Group"],
        "hello\n",
    ));
    assert_eq!(latest(&fed)["body"], "hello");
    assert_ne!(latest(&fed)["seq"], before, "sent");
    ok(run_as(
        &fed,
        "alice",
        &["send_message", "Cool Group"],
        "two\nlines\nEND\nignored\n",
    ));
    assert_eq!(latest(&fed)["body"], "two\nlines");
    // `send G -`: stdin to its end.
    ok(run_as(
        &fed,
        "alice",
        &["send", "Cool Group", "-"],
        "from\nstdin\n",
    ));
    assert_eq!(latest(&fed)["body"], "from\nstdin");
    // `send G --file PATH`: a body near 1 MB, more than an argument list holds.
    let big: String = (0..1_000_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let path = fed.path("body.txt");
    std::fs::write(&path, format!("{big}\n")).expect("write");
    ok(run_as(
        &fed,
        "alice",
        &["send", "Cool Group", "--file", &path],
        "",
    ));
    assert_eq!(latest(&fed)["body"].as_str().map(str::len), Some(big.len()));
    assert!(latest(&fed)["body"] == big.as_str());
    // A file's caption may be empty.
    let report = fed.path("report.txt");
    std::fs::write(&report, "a report").expect("write");
    ok(run_as(
        &fed,
        "alice",
        &["send_file", "Cool Group", &report, "--caption", ""],
        "",
    ));

    // Input that is not UTF-8 is reported as input, with its line number.
    let seq = latest(&fed)["seq"].clone();
    let run = cli_bytes(
        &fed,
        "alice",
        &["send_message", "Cool Group"],
        b"fine\n\xff\xfe bad\nEND\n",
    );
    // Local input (exit 4), not usage (it exited 2).
    assert_eq!(run.code, Some(4), "{run:#?}");
    assert!(run.stderr.contains("input line 2: not UTF-8"), "{run:#?}");
    assert!(!run.stderr.contains("output"), "{run:#?}");
    assert_eq!(latest(&fed)["seq"], seq, "nothing sent");
    let bad_file = fed.path("bad.txt");
    std::fs::write(&bad_file, b"one\ntwo\nthree \xc3\x28\n").expect("write");
    let run = run_as(
        &fed,
        "alice",
        &["send", "Cool Group", "--file", &bad_file],
        "",
    );
    assert_eq!(run.code, Some(4), "{run:#?}");
    assert!(run.stderr.contains("line 3: not UTF-8"), "{run:#?}");
    // In a stdin session the line is skipped and the next ones run.
    let run = cli_bytes(
        &fed,
        "alice",
        &[],
        b"send \"Cool Group\" first\n\xff\xfe\nsend \"Cool Group\" second\n",
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.contains("input line 2: not UTF-8"), "{run:#?}");
    assert_eq!(latest(&fed)["body"], "second");
}

#[test]
fn an_interrupted_send_file_says_how_to_resume_and_hashing_shows_progress() {
    let (fed, node) = federation_with_a_group();
    let path = fed.path("big.bin");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &content).expect("write");

    // Progress while hashing, before the upload's.
    let run = ok(run_as(
        &fed,
        "alice",
        &["send_file", "Cool Group", &path],
        "",
    ));
    let lines: Vec<&str> = run.stderr.lines().collect();
    let first_hashed = lines
        .iter()
        .position(|l| l.starts_with("hashing big.bin: "));
    let first_sent = lines.iter().position(|l| l.starts_with("big.bin: "));
    assert!(
        first_hashed.is_some() && first_hashed < first_sent,
        "{run:#?}"
    );
    let run = ok(run_as(
        &fed,
        "alice",
        &["--json", "send_file", "Cool Group", &path],
        "",
    ));
    assert!(
        json_lines(&run)
            .iter()
            .any(|v| v["event"] == "hashing" && v["total"] == 3_000_000),
        "{run:#?}"
    );

    // The node stops answering (SIGSTOP) before the upload: the whole --timeout, in words,
    // and what to do.
    let other = fed.path("other.bin");
    std::fs::write(&other, &content[..1_000_000]).expect("write");
    let pid = node.pid().to_string();
    let stopped = Command::new("kill").args(["-STOP", &pid]).status();
    assert!(stopped.is_ok_and(|s| s.success()), "SIGSTOP the node");
    let run = run_as(
        &fed,
        "alice",
        &["--timeout", "2s", "send_file", "Cool Group", &other],
        "",
    );
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert_eq!(run.code, Some(3), "{run:#?}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.ends_with("run the same command again to resume"),
        "{run:#?}"
    );
    assert!(last.contains("within 2s"), "{run:#?}");
    assert!(
        last.contains(&node.endpoint),
        "the real endpoint {}: {run:#?}",
        node.endpoint
    );
    assert!(!has_raw_duration(last), "{run:#?}");
    // Run again, it completes.
    assert!(wait_for(Duration::from_secs(20), || {
        run_as(&fed, "alice", &["send_file", "Cool Group", &other], "").code == Some(0)
    }));
}

#[test]
fn groups_and_members_are_aligned_tables_with_plurals() {
    let (fed, _node) = federation_with_a_group();
    let _news = fed.node("news", "127.0.0.1:0", "news", &[]);
    assert!(wait_for(Duration::from_secs(20), || {
        run_as(&fed, "alice", &["groups"], "")
            .stdout
            .contains("news")
    }));
    // The member count comes with the node's next heartbeat.
    let mut run = None;
    let counted = wait_for(Duration::from_secs(20), || {
        let groups = ok(run_as(&fed, "alice", &["groups"], ""));
        let done = groups
            .stdout
            .lines()
            .any(|l| l.starts_with("Cool Group") && l.ends_with(" 1 member"));
        run = Some(groups);
        done
    });
    let run = run.expect("a run");
    assert!(counted, "{run:#?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{run:#?}");
    assert!(lines[0].starts_with("GROUP"), "{run:#?}");
    let column = |l: &str, word: &str| l.find(word);
    let at = column(lines[0], "ENDPOINT");
    assert!(
        lines[1..].iter().all(|l| column(l, "tcp://") == at),
        "aligned: {run:#?}"
    );
    assert!(!run.stdout.contains('\t'), "{run:#?}");
    assert!(
        !run.stdout.contains('|') && !run.stdout.contains('+'),
        "{run:#?}"
    );
    let cool = lines
        .iter()
        .find(|l| l.starts_with("Cool Group"))
        .expect("row");
    assert!(cool.ends_with(" 1 member"), "{run:#?}");
    let news = lines.iter().find(|l| l.starts_with("news")).expect("row");
    assert!(news.ends_with(" 0 members"), "{run:#?}");

    let run = ok(run_as(&fed, "alice", &["members", "Cool Group"], ""));
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("MEMBER"), "{run:#?}");
    assert!(lines[1].starts_with("alice "), "{run:#?}");
    assert_eq!(lines.last().copied(), Some("1 member"), "{run:#?}");
    ok(run_as(&fed, "bob", &["join", "Cool Group"], ""));
    let run = ok(run_as(&fed, "alice", &["members", "Cool Group"], ""));
    assert_eq!(run.stdout.lines().last(), Some("2 members"), "{run:#?}");
}

#[test]
fn json_output_of_each_command_parses_and_has_the_documented_fields() {
    let (fed, _node) = federation_with_a_group();
    let json = |user: &str, args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        json_lines(&ok(run_as(&fed, user, &all, "")))
    };
    let check = |what: &str, values: &[serde_json::Value], fields: &[&str]| {
        assert!(!values.is_empty(), "{what}: no output");
        for v in values {
            assert!(has_fields(v, fields), "{what}: {v} lacks one of {fields:?}");
        }
    };
    check(
        "groups",
        &json("alice", &["groups"]),
        &["name", "endpoint", "members"],
    );
    check(
        "join",
        &json("bob", &["join", "Cool Group"]),
        &["group", "user", "changed", "last_seq"],
    );
    check(
        "members",
        &json("alice", &["members", "Cool Group"]),
        &["user", "joined_at"],
    );
    check(
        "send",
        &json("alice", &["send", "Cool Group", "hello"]),
        &["seq", "id", "time"],
    );
    let messages = json("alice", &["messages", "Cool Group"]);
    check(
        "messages",
        &messages,
        &["group", "seq", "id", "time", "sender", "kind", "body"],
    );
    assert!(messages.iter().all(|m| m["group"] == "Cool Group"));
    check("check", &json("bob", &["check"]), &["group"]);
    let file = fed.path("f.txt");
    std::fs::write(&file, "content").expect("write");
    let sent = json("alice", &["send_file", "Cool Group", &file]);
    let ack: Vec<serde_json::Value> = sent
        .into_iter()
        .filter(|v| v.get("event").is_none())
        .collect();
    check("send_file", &ack, &["seq", "id", "time"]);
    let seq = ack[0]["seq"].to_string();
    let out = fed.path("f-copy.txt");
    let got: Vec<serde_json::Value> = json("bob", &["get_file", "Cool Group", &seq, "--out", &out])
        .into_iter()
        .filter(|v| v.get("event").is_none())
        .collect();
    check("get_file", &got, &["saved", "attachment"]);
    check(
        "leave",
        &json("bob", &["leave", "Cool Group"]),
        &["group", "user", "changed"],
    );
    check(
        "register",
        &json("alice", &["register", "alice"]),
        &["user", "changed"],
    );
    ok(run_as(&fed, "bob", &["register", "bob"], ""));
    check(
        "send_dm",
        &json("alice", &["send_dm", "bob", "hi"]),
        &["n", "id", "time", "recipient"],
    );
    check("users", &json("alice", &["users"]), &["name", "presence"]);
    check("whois", &json("alice", &["whois", "bob"]), &["name", "key"]);
    check(
        "unsubscribe",
        &json("alice", &["unsubscribe", "Cool Group"]),
        &["group", "subscribed"],
    );
    check(
        "subscribe",
        &json("alice", &["subscribe", "Cool Group"]),
        &["group", "subscribed"],
    );
    check("connect", &json("alice", &["connect"]), &["user", "ttl_ms"]);
    check(
        "block",
        &json("alice", &["block", "bob"]),
        &["name", "blocked", "changed"],
    );
    check(
        "blocked",
        &json("alice", &["blocked"]),
        &["name", "key", "since"],
    );
    let refused = run_as(
        &fed,
        "bob",
        &["send_dm", "alice", "blocked, so a dead letter"],
        "",
    );
    assert_eq!(refused.code, Some(1), "{refused:#?}");
    check(
        "dead_letters",
        &json("bob", &["dead_letters"]),
        &["time", "to", "reason", "body"],
    );
    check(
        "multicast",
        &json("alice", &["multicast", "bob", "to you"]),
        &["stored"],
    );
}

#[test]
fn help_speaks_the_users_words_and_a_commands_own_options_come_first() {
    let home = tempfile::tempdir().expect("home");
    let run = run_command(bare(home.path(), &["help", "send"]), "");
    assert_eq!(run.code, Some(0), "{run:#?}");
    let file = run.stdout.find("--file").expect("send's own --file");
    let global = run.stdout.find("Global options").expect("a global heading");
    let registry = run.stdout.find("--registry").expect("--registry");
    assert!(file < global && global < registry, "{}", run.stdout);
    assert!(
        run.stdout.contains("Usage: user-cli send"),
        "{}",
        run.stdout
    );

    // At the prompt: each command once, the seeds' words as its aliases, no internals.
    let env = [
        ("AGORA_KEY_DIR", home.path().to_str().expect("utf-8")),
        ("AGORA_STATE_DIR", home.path().to_str().expect("utf-8")),
    ];
    let registry = format!("tcp://127.0.0.1:{}", dead_port());
    let run = cli(
        &["--insecure", "--user", "alice", "--registry", &registry],
        "help\n",
        &env,
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    let help = run.stdout;
    assert!(!help.contains("seed"), "{help}");
    for (command, alias) in [
        ("groups", "get_group_list"),
        ("send", "send_message"),
        ("join", "join_group"),
        ("messages", "get_messages"),
    ] {
        let rows: Vec<&str> = help
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("{command} ")))
            .collect();
        assert_eq!(rows.len(), 1, "{command} listed once: {help}");
        assert!(
            rows[0].contains(&format!("[alias: {alias}]")),
            "{command}'s alias {alias}: {help}"
        );
        assert!(
            !help
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{alias} "))),
            "{alias} is an alias, not a command of its own: {help}"
        );
    }

    // A session error is one line, with no `Usage: agora>`.
    let run = cli(
        &["--insecure", "--user", "alice", "--registry", &registry],
        "join\nfrobnicate\n",
        &env,
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.contains("warning"))
        .collect();
    assert_eq!(errors.len(), 2, "{run:#?}");
    assert!(!run.stderr.contains("Usage"), "{run:#?}");
    assert!(run.stderr.contains("help join"), "{run:#?}");
}

#[test]
fn an_interrupted_get_file_says_how_to_resume_and_the_same_command_resumes() {
    let (fed, node) = federation_with_a_group();
    ok(run_as(&fed, "bob", &["join", "Cool Group"], ""));
    let path = fed.path("big.bin");
    let content: Vec<u8> = (0..48u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &content).expect("write");
    let sent = ok(run_as(
        &fed,
        "alice",
        &["--json", "send_file", "Cool Group", &path],
        "",
    ));
    let seq = json_lines(&sent)
        .iter()
        .find_map(|v| v.get("seq").and_then(serde_json::Value::as_u64))
        .expect("the seq")
        .to_string();

    // The node stops answering (SIGSTOP) as the download starts. On a fast machine the
    // download may win the race: then it is tried again with another target.
    let pid = node.pid().to_string();
    let signal = |sig: &str| {
        let sent = Command::new("kill").args([sig, &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {sig} the node");
    };
    let mut cut = None;
    for attempt in 0..3 {
        let out = fed.path(&format!("down-{attempt}.bin"));
        let mut get = fed.spawn_cli(
            "bob",
            &[
                "--timeout",
                "2s",
                "get_file",
                "Cool Group",
                &seq,
                "--out",
                &out,
            ],
        );
        assert!(
            get.wait_stderr("big.bin: ", Duration::from_secs(20)),
            "no progress: {:?}",
            get.errors
        );
        signal("-STOP");
        let code = get.wait_exit(Duration::from_secs(20));
        signal("-CONT");
        match code {
            Some(Some(0)) => continue,
            Some(code) => {
                cut = Some((code, get.errors.clone(), out));
                break;
            }
            None => panic!("get_file did not end: {:?}", get.errors),
        }
    }
    let (code, errors, out) = cut.expect("a download stopped part way in three tries");
    assert_eq!(code, Some(3), "{errors:?}");
    let last = errors.last().cloned().unwrap_or_default();
    assert!(
        last.ends_with("run the same command again to resume"),
        "{errors:?}"
    );
    assert!(
        last.contains(&node.endpoint),
        "the real endpoint: {errors:?}"
    );
    assert!(last.contains("within 2s"), "{errors:?}");
    assert!(!has_raw_duration(&last), "{errors:?}");
    assert!(
        !Path::new(&out).exists(),
        "nothing stands under the target's name"
    );

    // The same command again: it resumes from the part and the file arrives whole.
    assert!(
        wait_for(Duration::from_secs(20), || {
            run_as(
                &fed,
                "bob",
                &["get_file", "Cool Group", &seq, "--out", &out],
                "",
            )
            .code
                == Some(0)
        }),
        "the same command again"
    );
    assert!(std::fs::read(&out).expect("read") == content);
}

/// Review of issue 23: `send` read its input whole into memory, so `--file /dev/zero` (or
/// `yes | user-cli send G -`) filled it. Reading stops at 1 MiB, refused at once with the
/// too-large error naming the limit, and nothing is sent.
#[test]
fn send_from_an_endless_input_is_refused_at_the_limit_without_filling_memory() {
    let (fed, _node) = federation_with_a_group();
    ok(run_as(&fed, "alice", &["send", "Cool Group", "before"], ""));
    let started = Instant::now();
    let run = run_as(
        &fed,
        "alice",
        &["send", "Cool Group", "--file", "/dev/zero"],
        "",
    );
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stderr
            .contains("Cool Group: message too large: the limit is 1048576 bytes"),
        "{run:#?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // `yes |`: many short lines on stdin, more than the limit.
    let yes = "y\n".repeat(1_200_000);
    for args in [
        vec!["send", "Cool Group", "-"],
        vec!["send_message", "Cool Group"],
    ] {
        let run = run_as(&fed, "alice", &args, &yes);
        assert_eq!(run.code, Some(1), "{args:?}: {run:#?}");
        assert!(
            run.stderr.contains("the limit is 1048576 bytes"),
            "{args:?}: {run:#?}"
        );
    }
    let run = ok(run_as(
        &fed,
        "alice",
        &["--json", "messages", "Cool Group", "--latest", "1"],
        "",
    ));
    assert_eq!(json_lines(&run)[0]["body"], "before", "nothing was sent");

    // A node that takes 2 MiB: past 1 MiB user-cli asks it, and a 1.5 MiB file is sent;
    // `/dev/zero` stops at its limit.
    let _big = fed.node(
        "Big Group",
        "127.0.0.1:0",
        "big",
        &["--max-message-bytes", "2097152"],
    );
    fed.join_when_listed("alice", "Big Group");
    let path = fed.path("big.txt");
    std::fs::write(&path, "z".repeat(1_500_000)).expect("write");
    ok(run_as(
        &fed,
        "alice",
        &["send", "Big Group", "--file", &path],
        "",
    ));
    let run = run_as(
        &fed,
        "alice",
        &["send", "Big Group", "--file", "/dev/zero"],
        "",
    );
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stderr.contains("the limit is 2097152 bytes"),
        "{run:#?}"
    );
}

/// Review of issue 23: a peer's message reached the terminal raw: an OSC 52 sequence sets
/// the clipboard, a carriage return rewrites the line (a fake `(you)`). `messages` shows
/// them escaped; `--json` keeps them as JSON escapes.
#[test]
fn a_peers_terminal_control_characters_arrive_escaped_in_messages() {
    let (fed, _node) = federation_with_a_group();
    ok(run_as(&fed, "bob", &["join", "Cool Group"], ""));
    let body = "copy\u{1b}]52;c;aGk=\u{7}\r[2026-01-01 00:00:00] Cool Group #9 alice (you): fake";
    ok(run_as(&fed, "bob", &["send", "Cool Group", body], ""));
    let run = ok(run_as(&fed, "alice", &["messages", "Cool Group"], ""));
    assert!(
        !run.stdout.contains('\u{1b}')
            && !run.stdout.contains('\r')
            && !run.stdout.contains('\u{7}'),
        "{run:#?}"
    );
    assert!(
        run.stdout
            .contains("bob: copy\\u{1b}]52;c;aGk=\\u{7}\\r[2026-01-01 00:00:00] Cool Group #9"),
        "{run:#?}"
    );
    let run = ok(run_as(
        &fed,
        "alice",
        &["--json", "messages", "Cool Group", "--latest", "1"],
        "",
    ));
    assert_eq!(json_lines(&run)[0]["body"], body);
}

/// Review of issue 23: `forget-registry` and `keys` printed with `println!`, which panics
/// (exit 101) when stdout's reader is gone (`user-cli keys | head -0`). They end quietly.
#[test]
fn a_closed_stdout_does_not_panic_forget_registry_or_keys() {
    let home = tempfile::tempdir().expect("home");
    for args in [vec!["forget-registry"], vec!["--user", "alice", "keys"]] {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let mut child = bare(home.path(), &args)
            .args(["--state-dir", &home.path().join("state").to_string_lossy()])
            .args(["--key-dir", &home.path().join("keys").to_string_lossy()])
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn user-cli");
        let mut status = None;
        let ended = wait_for(Duration::from_secs(20), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if !ended {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not end");
        }
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
        }
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            matches!(status.and_then(|s| s.code()), Some(0 | 4)),
            "{args:?}: {status:?} {stderr}"
        );
    }
}
