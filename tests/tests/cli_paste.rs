//! The interactive prompt takes text that arrives all at once: a pasted line, tmux's
//! `send-keys`, a fast typist over ssh. The prompt runs on a pseudo-terminal of its own
//! (util-linux's `script`), and each line is written to it in one write; every read of its
//! output has a deadline.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use agora_tests::{bin, wait_for, CliRun, Federation};

/// How long a pasted line may take to run (a send to a node on loopback takes milliseconds).
const WAIT: Duration = Duration::from_secs(15);

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

/// A user-cli prompt on a pseudo-terminal, its output collected as it comes; killed and
/// reaped on drop (the prompt then sees its terminal hang up).
struct Prompt {
    child: Child,
    stdin: ChildStdin,
    output: mpsc::Receiver<Vec<u8>>,
    /// Everything the terminal showed so far (prompts and escape sequences included).
    shown: Vec<u8>,
}

impl Prompt {
    /// Starts `user`'s prompt against `fed`'s registry, under `TERM=xterm`.
    fn start(fed: &Federation, user: &str) -> Prompt {
        let script = agora_tests::installed("script", &[], "util-linux installs it");
        let mut command = Command::new(script);
        for (key, _) in std::env::vars() {
            if key.starts_with("AGORA_") {
                command.env_remove(key);
            }
        }
        let user_cli = bin("user-cli").display().to_string();
        command
            .args([
                "--quiet",
                "--return",
                "--flush",
                "--command",
                &format!("'{user_cli}'"),
                "/dev/null",
            ])
            .env("TERM", "xterm")
            .env("TZ", "UTC")
            .env("HOME", fed.path("home"))
            .env("AGORA_REGISTRY", &fed.registry.endpoint)
            .env("AGORA_USER", user)
            .env("AGORA_STATE_DIR", fed.state_dir())
            .env("AGORA_KEY_DIR", fed.key_dir())
            .env("AGORA_REGISTRY_KEY", fed.registry_key())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().expect("spawn script");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Prompt {
            child,
            stdin,
            output,
            shown: Vec::new(),
        }
    }

    /// What the terminal showed so far, as text.
    fn shown(&mut self) -> String {
        for chunk in self.output.try_iter() {
            self.shown.extend(chunk);
        }
        String::from_utf8_lossy(&self.shown).into_owned()
    }

    /// Waits (up to [`WAIT`]) until the terminal has shown `text` after byte `from`; returns
    /// where it ends.
    ///
    /// # Panics
    /// If it does not show in time.
    fn expect(&mut self, from: usize, text: &str) -> usize {
        let mut end = None;
        wait_for(WAIT, || {
            let shown = self.shown();
            end = shown
                .get(from..)
                .and_then(|s| s.find(text))
                .map(|at| from + at + text.len());
            end.is_some()
        });
        end.unwrap_or_else(|| {
            panic!(
                "the prompt did not show {text:?} within {WAIT:?}; it showed {:?}",
                self.shown()
            )
        })
    }

    /// Writes `keys` to the terminal in one write, as a paste delivers them.
    fn paste(&mut self, keys: &str) {
        self.stdin
            .write_all(keys.as_bytes())
            .expect("write to the terminal");
        self.stdin.flush().expect("flush");
    }

    /// Waits (up to [`WAIT`]) for the prompt to end; its exit code.
    fn exit_code(&mut self) -> Option<i32> {
        let mut code = None;
        let ended = wait_for(WAIT, || match self.child.try_wait() {
            Ok(Some(status)) => {
                code = status.code();
                true
            }
            _ => false,
        });
        assert!(ended, "the prompt did not end: {:?}", self.shown());
        code
    }
}

impl Drop for Prompt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

    let mut alice = Prompt::start(&fed, "alice");
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
    assert_eq!(alice.exit_code(), Some(7), "{:?}", alice.shown());
}

/// Several lines pasted at once (a block copied from a script, or typed ahead over ssh): only
/// the first ran, since rustyline dropped what followed it in the same read when the line
/// ended (unless built with its `buffer-redux` feature). Now each runs, in order.
#[test]
fn several_lines_pasted_at_once_all_run_in_order() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Pasted G", "127.0.0.1:0", "pasted", &[]);
    fed.join_when_listed("alice", "Pasted G");

    let mut alice = Prompt::start(&fed, "alice");
    let at = alice.expect(0, "Type help for commands");
    alice.expect(at, "agora> ");
    alice.paste("send \"Pasted G\" first line\nsend \"Pasted G\" second line\nexit 7\n");
    let code = alice.exit_code();
    let stored = ok(fed.cli("alice", &["messages", "Pasted G"], ""));
    assert!(
        stored.stdout.contains("Pasted G #2 alice: first line")
            && stored.stdout.contains("Pasted G #3 alice: second line"),
        "{stored:?} {:?}",
        alice.shown()
    );
    assert_eq!(code, Some(7), "{:?}", alice.shown());
}
