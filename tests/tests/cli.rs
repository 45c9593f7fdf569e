//! user-cli's one command model, seen from outside: completions and the man page come from
//! the same definition as the commands, and session lines are checked by it too.

use std::process::{Command, Stdio};

use agora_tests::bin;

fn user_cli(args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin("user-cli"))
        .args(args)
        .env_remove("USER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run user-cli");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("stdin");
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn completions_and_the_man_page_come_from_the_command_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = user_cli(&["completions", shell], "");
        assert_eq!(code, Some(0), "{shell}: {err}");
        for word in ["join", "send_dm", "set_mode", "--registry"] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
    let (code, man, err) = user_cli(&["manpage"], "");
    assert_eq!(code, Some(0), "{err}");
    assert!(man.contains(".TH user-cli 1"), "{man}");
    assert!(man.contains("join"), "{man}");
}

#[test]
fn session_lines_are_parsed_by_the_same_definition() {
    // Bad arguments are usage errors before anything is sent: the registry here does not
    // exist, and no line reaches it. Each prints its error; the session goes on and its
    // status stays 0 (only `exit N` sets it).
    let (code, out, err) = user_cli(
        &[
            "--insecure",
            "--user",
            "alice",
            "--registry",
            "tcp://127.0.0.1:9",
        ],
        "help\nset_mode g secret\ninvite g not-a-key\nmessages g --since 10:00:00 --latest 3\n",
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("get_group_list"),
        "help lists the seed words: {out}"
    );
    assert!(err.contains("invalid value 'secret'"), "{err}");
    assert!(err.contains("not-a-key"), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}
