//! The prompt and a session's words, as the QA pass of issue 23 found them: pasted blocks,
//! abandoning a message typed up to `END`, seed 004's upper-case words as aliases, one-line
//! session errors, usage errors for zero ports and durations, a session with no registry, one
//! wording for a key with no account, and keys printed where their brackets cannot mislead.
//! The prompt runs on a pseudo-terminal of its own ([`agora_tests::Pty`]); every read of its
//! output has a deadline.

use agora_tests::{CliRun, Federation};

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

/// The bodies of `group`'s messages as `user` sees them, in order.
fn bodies(fed: &Federation, user: &str, group: &str) -> Vec<String> {
    let run = ok(fed.cli(user, &["--json", "messages", group], ""));
    run.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("body").and_then(|b| b.as_str()).map(str::to_owned))
        .collect()
}

/// A block pasted into a real terminal (bracketed paste: `ESC[200~ … ESC[201~`, its lines
/// ended by CR, as tmux `paste-buffer -p` sends it) was sent as ONE message, its newlines
/// turned into spaces and its quotes lost. Each line now runs as if typed, quotes kept.
#[test]
fn a_bracketed_paste_of_several_lines_runs_each_line() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Paste G", "127.0.0.1:0", "paste", &[]);
    fed.join_when_listed("alice", "Paste G");

    let mut alice = fed.prompt("alice");
    let at = alice.expect(0, "Type help for commands");
    alice.expect(at, "agora> ");
    alice.paste(
        "\x1b[200~send \"Paste G\" 'first,  quoted'\rsend \"Paste G\" second line\r\
         exit 7\x1b[201~\r",
    );
    let code = alice.wait_exit();
    let shown = alice.shown();
    assert_eq!(code, Some(7), "{shown}");
    let got = bodies(&fed, "alice", "Paste G");
    assert!(
        got.ends_with(&["first,  quoted".to_owned(), "second line".to_owned()]),
        "{got:?} {shown}"
    );
}

/// A message typed up to `END` could not be abandoned: Ctrl-C at `... ` only cleared the
/// line and Ctrl-D sent the partial text. Both abandon it now, nothing sent, and the prompt
/// goes on; `END` still sends.
#[test]
fn ctrl_c_or_ctrl_d_at_the_message_prompt_abandons_the_message() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Abandon G", "127.0.0.1:0", "abandon", &[]);
    fed.join_when_listed("alice", "Abandon G");
    let before = bodies(&fed, "alice", "Abandon G");

    let mut alice = fed.prompt("alice");
    let at = alice.expect(0, "agora> ");
    alice.type_line("send \"Abandon G\"");
    let at = alice.expect(at, "... ");
    alice.type_line("half a thought");
    let at = alice.expect(at, "... ");
    alice.paste("\x03");
    let at = alice.expect(at, "the message is not sent");
    let at = alice.expect(at, "agora> ");

    alice.type_line("send_message \"Abandon G\"");
    let at = alice.expect(at, "... ");
    alice.type_line("another half");
    let at = alice.expect(at, "... ");
    alice.paste("\x04");
    let at = alice.expect(at, "the message is not sent");
    let at = alice.expect(at, "agora> ");

    alice.type_line("send \"Abandon G\"");
    let at = alice.expect(at, "... ");
    alice.type_line("whole");
    let at = alice.expect(at, "... ");
    alice.type_line("END");
    let at = alice.expect(at, "sent to Abandon G");
    alice.expect(at, "agora> ");
    alice.type_line("exit");
    assert_eq!(alice.wait_exit(), Some(0), "{}", alice.shown());

    let after = bodies(&fed, "alice", "Abandon G");
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    assert_eq!(after.last().map(String::as_str), Some("whole"), "{after:?}");
}

/// Seed 004's upper-case words worked in a session only: `help` did not list them,
/// `help REGISTER` said "unrecognized subcommand", and the one-shot `user-cli SEND bob x`
/// was refused. A session's typo printed clap's `Usage:` block.
#[test]
fn the_upper_case_seed_words_are_aliases_and_a_typo_is_one_line() {
    let fed = Federation::start("200ms");
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("bob", &["register", "bob"], ""));

    let help = ok(fed.cli("alice", &["help", "REGISTER"], ""));
    assert!(help.stdout.contains("Usage: user-cli register"), "{help:?}");
    let sent = ok(fed.cli("alice", &["SEND", "bob", "hi", "bob"], ""));
    assert!(sent.stdout.contains("bob"), "{sent:?}");
    let check = ok(fed.cli("bob", &["check"], ""));
    assert!(check.stdout.contains(": hi bob"), "{check:?}");

    let session = ok(fed.cli("alice", &[], "help\nhelp SEND\nfoo_typo\njion G\n"));
    for word in ["SEND", "CONNECT", "DISCONNECT", "REGISTER", "UNREGISTER"] {
        assert!(session.stdout.contains(word), "{word}: {session:?}");
    }
    assert!(
        session.stdout.contains("Usage: send_dm <TO>"),
        "{session:?}"
    );
    let errors: Vec<&str> = session.stderr.lines().collect();
    assert_eq!(
        errors,
        [
            "user-cli: unknown command \"foo_typo\"; type help for the commands",
            "user-cli: unknown command \"jion\"; did you mean \"join_group\" or \"join\"? Type \
             help for the commands"
        ],
        "{session:?}"
    );

    // One-shot usage errors keep clap's text, prefixed as every other error.
    let typo = fed.cli("alice", &["foo_typo"], "");
    assert_eq!(typo.code, Some(2), "{typo:?}");
    assert!(
        typo.stderr
            .starts_with("user-cli: unrecognized subcommand 'foo_typo'"),
        "{typo:?}"
    );
}

/// `--beacon-port 0` and `--timeout 0s` were accepted and failed later: usage errors now,
/// naming the flag, before anything is made.
#[test]
fn a_zero_beacon_port_or_timeout_is_a_usage_error_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let keys = dir.path().join("keys");
    let (state, keys) = (state.to_str().expect("utf8"), keys.to_str().expect("utf8"));
    for (flag, value, command) in [
        ("--beacon-port", "0", "discover"),
        ("--timeout", "0s", "groups"),
        ("--discover-wait", "0ms", "discover"),
    ] {
        let run = agora_tests::cli(
            &[
                "--user",
                "zed",
                "--state-dir",
                state,
                "--key-dir",
                keys,
                flag,
                value,
                command,
            ],
            "",
            &[],
        );
        assert_eq!(run.code, Some(2), "{flag} {value}: {run:?}");
        assert!(
            run.stderr.starts_with("user-cli: ") && run.stderr.contains(flag),
            "{run:?}"
        );
    }
    assert!(!dir.path().join("keys").exists(), "a key pair was made");
}

/// `echo help | user-cli` with no registry running exited 3: the session asked for the
/// registry's key before its first line. `help` and `exit` need no registry; a command that
/// needs it says it is unreachable, and the session goes on.
#[test]
fn a_session_needs_no_registry_before_a_command_that_does() {
    // A TCP port that accepts and never speaks ZMTP: a registry that does not answer.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("tcp://{}", silent.local_addr().expect("addr"));
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let keys = dir.path().join("keys");
    let (state, keys) = (state.to_str().expect("utf8"), keys.to_str().expect("utf8"));
    let args = [
        "--user",
        "zed",
        "--registry",
        &endpoint,
        "--registry-key-endpoint",
        &endpoint,
        "--timeout",
        "300ms",
        "--state-dir",
        state,
        "--key-dir",
        keys,
    ];
    let help = agora_tests::cli(&args, "help\n", &[]);
    assert_eq!(help.code, Some(0), "{help:?}");
    assert!(help.stdout.contains("Commands"), "{help:?}");
    assert!(help.stderr.is_empty(), "{help:?}");

    let run = agora_tests::cli(&args, "groups\nhelp join\nexit 5\n", &[]);
    assert_eq!(run.code, Some(5), "{run:?}");
    assert!(run.stdout.contains("Usage: join <GROUP>"), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains("unreachable"), "{run:?}");
}

/// A key with no account was told three ways (`run user-cli register NAME first`, `bob:
/// unknown_user: this key has no account`, `registry …: unknown_user: …`), and `check` said
/// "direct messages: 0 new". One wording now, naming what to run where the user is, no
/// protocol code; `check` says nothing about direct messages; an unknown recipient is named
/// once.
#[test]
fn no_account_is_said_one_way_naming_what_to_run() {
    let fed = Federation::start("200ms");
    ok(fed.cli("bob", &["register", "bob"], ""));
    // The key pair first, so that stderr holds only the refusals.
    fed.user_key("nobody");
    let alone = "no account: your key has none yet; run `user-cli register NAME` to make one";
    for args in [&["users"][..], &["send_dm", "bob", "hi"], &["connect"]] {
        let run = fed.cli("nobody", args, "");
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert_eq!(
            run.stderr.trim_end(),
            format!("user-cli: {alone}"),
            "{args:?}"
        );
    }
    let session = ok(fed.cli("nobody", &[], "users\nsend_dm bob hi\nconnect\ncheck\n"));
    let said = "user-cli: no account: your key has none yet; type `register NAME` to make one";
    let errors: Vec<&str> = session.stderr.lines().collect();
    assert_eq!(errors, [said, said, said], "{session:?}");
    let check = ok(fed.cli("nobody", &["check"], ""));
    assert!(!check.stdout.contains("direct messages"), "{check:?}");
    assert!(ok(fed.cli("bob", &["check"], ""))
        .stdout
        .contains("direct messages: 0 new"));

    let nosuch = fed.cli("bob", &["send_dm", "nosuch", "hello"], "");
    assert_eq!(nosuch.code, Some(1), "{nosuch:?}");
    assert_eq!(nosuch.stderr.matches("nosuch").count(), 1, "{nosuch:?}");
    // The stable code stays for scripts, as for every refusal.
    assert!(
        nosuch
            .stderr
            .starts_with("user-cli: unknown_user: no user named nosuch"),
        "{nosuch:?}"
    );
}

/// Keys were printed inside parentheses ("(public key DG]26:…j))"), though Z85 keys hold
/// brackets of their own: a key is last on its line now.
#[test]
fn a_key_is_printed_last_on_its_line() {
    let fed = Federation::start("200ms");
    let owner = fed.user_key("owner");
    let _node = fed.node(
        "Keys G",
        "127.0.0.1:0",
        "keys",
        &["--private", "--owner", &owner],
    );
    let made = ok(fed.cli("newcomer", &["groups"], ""));
    let line = made
        .stderr
        .lines()
        .find(|l| l.contains("made the key pair"))
        .unwrap_or_else(|| panic!("{made:?}"));
    let key = fed.user_key("newcomer");
    assert!(line.ends_with(&format!("public key: {key}")), "{line}");

    fed.join_when_listed("owner", "Keys G");
    let invite = ok(fed.cli("owner", &["invite", "Keys G", &key], ""));
    let said = format!("{}{}", invite.stdout, invite.stderr);
    assert!(said.trim_end().ends_with(&key), "{invite:?}");
    assert!(!said.contains(&format!("({key}")), "{invite:?}");
}
