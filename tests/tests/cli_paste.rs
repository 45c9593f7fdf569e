//! The interactive prompt takes text that arrives all at once: a pasted line, tmux's
//! `send-keys`, a fast typist over ssh. The prompt runs on a pseudo-terminal of its own
//! ([`agora_tests::Pty`]), and each line is written to it in one write; every read of its
//! output has a deadline.

use std::process::Command;
use std::time::Duration;

use agora_tests::{group_alive, wait_for, CliRun, Federation, Pty};

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

/// A line pasted into the prompt stalled: rustyline 15, with the external printer that shows
/// live messages above the prompt, handled only the first of several characters that arrived
/// at once until the next key was pressed (rustyline issue 976), so a pasted command never
/// ran. Now each pasted line runs at once: the message is sent and stored, and a pasted
/// `exit` ends the prompt.
#[test]
fn a_line_pasted_into_the_prompt_runs_without_another_key() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Pasted G", "127.0.0.1:0", "pasted", &[]);
    fed.join_when_listed("alice", "Pasted G");

    let mut alice = fed.prompt("alice");
    let at = alice.expect(0, "Type help for commands");
    let at = alice.expect(at, "agora> ");
    alice.paste("send \"Pasted G\" pasted in one go\n");
    let at = alice.expect(at, "sent to Pasted G");
    let stored = ok(fed.cli("alice", &["messages", "Pasted G"], ""));
    assert!(
        stored
            .stdout
            .contains("Pasted G #2 alice: pasted in one go"),
        "{stored:?}"
    );

    alice.expect(at, "agora> ");
    alice.paste("exit 7\n");
    assert_eq!(alice.wait_exit(), Some(7), "{:?}", alice.shown());
}

/// Several lines pasted at once (a block copied from a script, or typed ahead over ssh): only
/// the first ran, since rustyline dropped what followed it in the same read when the line
/// ended (unless built with its `buffer-redux` feature). Now each runs, in order.
#[test]
fn several_lines_pasted_at_once_all_run_in_order() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Pasted G", "127.0.0.1:0", "pasted", &[]);
    fed.join_when_listed("alice", "Pasted G");

    let mut alice = fed.prompt("alice");
    let at = alice.expect(0, "Type help for commands");
    alice.expect(at, "agora> ");
    alice.paste("send \"Pasted G\" first line\nsend \"Pasted G\" second line\nexit 7\n");
    let code = alice.wait_exit();
    let stored = ok(fed.cli("alice", &["messages", "Pasted G"], ""));
    assert!(
        stored.stdout.contains("Pasted G #2 alice: first line")
            && stored.stdout.contains("Pasted G #3 alice: second line"),
        "{stored:?} {:?}",
        alice.shown()
    );
    assert_eq!(code, Some(7), "{:?}", alice.shown());
}

/// The harness's Drop killed only `script`, not the prompt, which runs in a session of its own
/// on the terminal. Now dropping the [`Pty`] stops the prompt's process group as well.
#[test]
fn a_dropped_prompt_leaves_no_user_cli_running() {
    let fed = Federation::start("200ms");
    let mut alice = fed.prompt("alice");
    alice.expect(0, "agora> ");
    let pid = alice.program_pid().expect("user-cli runs on the terminal");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "user-cli",
        "the terminal's session is the prompt's"
    );
    drop(alice);
    assert!(
        wait_for(Duration::from_secs(5), || !group_alive(pid)),
        "user-cli (pid {pid}) outlived its Pty"
    );
}

/// The same for a program that ignores the terminal's hangup (which is all that killing
/// `script` alone gives it): the [`Pty`] stops its process group.
#[test]
fn a_dropped_pty_stops_a_program_that_ignores_hangup() {
    let mut command = Command::new("sh");
    command.args(["-c", "trap '' HUP; echo ready; exec sleep 600"]);
    let mut pty = Pty::start(command);
    pty.expect(0, "ready");
    let pid = pty.program_pid().expect("the program runs on the terminal");
    drop(pty);
    assert!(
        wait_for(Duration::from_secs(5), || !group_alive(pid)),
        "the program (pid {pid}) outlived its Pty"
    );
}
