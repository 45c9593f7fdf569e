//! Issue 23, live presence and direct messages in a running session: `register NAME` and
//! `connect` typed in a session make the user present at once, keep them present across
//! renewals, and start the live direct-message stream, with no restart. A session on a
//! piped stdin (a script kept open) prints pushed messages to stdout, as `watch` does.
//!
//! Each session here is a user-cli whose stdin the test writes to over time (a pipe, or the
//! prompt on a pseudo-terminal, [`agora_tests::Pty`]); every read of its output has a
//! deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agora_tests::{wait_for, CliRun, Federation};

const WAIT: Duration = Duration::from_secs(20);

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

/// A user-cli session reading commands from a pipe the test writes to, its output lines
/// collected as they come; killed and reaped on drop.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: mpsc::Receiver<Vec<u8>>,
    stderr: mpsc::Receiver<String>,
    /// Everything printed on stdout so far (a prompt's unfinished line included).
    raw: Vec<u8>,
    /// Every complete stdout line so far.
    lines: Vec<String>,
    /// Every stderr line so far.
    errors: Vec<String>,
}

fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// What `r` gives, as it comes (a prompt is not a line).
fn chunks_of(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0; 4096];
        while let Ok(n @ 1..) = r.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

impl Session {
    /// Starts `user`'s session against `fed`'s registry, reading a pipe.
    fn start(fed: &Federation, user: &str) -> Session {
        let mut command = fed.user_cli_command(user);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn user-cli");
        let stdin = child.stdin.take();
        let stdout = chunks_of(child.stdout.take().expect("stdout"));
        let stderr = lines_of(child.stderr.take().expect("stderr"));
        Session {
            child,
            stdin,
            stdout,
            stderr,
            raw: Vec::new(),
            lines: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Writes `line` and a newline to the session's stdin.
    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to the session");
        stdin.flush().expect("flush");
    }

    fn drain(&mut self) {
        for chunk in self.stdout.try_iter() {
            self.raw.extend(chunk);
        }
        let text = String::from_utf8_lossy(&self.raw);
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        self.lines = complete
            .split('\n')
            .map(|l| l.trim_end_matches('\r').to_owned())
            .filter(|_| !complete.is_empty())
            .collect();
        self.errors.extend(self.stderr.try_iter());
    }

    /// Waits (up to [`WAIT`]) for a stdout line containing `text`, after the first `from`
    /// lines; returns its index.
    ///
    /// # Panics
    /// If none comes in time.
    fn expect_line(&mut self, from: usize, text: &str) -> usize {
        let mut found = None;
        wait_for(WAIT, || {
            self.drain();
            found = self
                .lines
                .iter()
                .skip(from)
                .position(|l| l.contains(text))
                .map(|i| i + from);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no line with {text:?} within {WAIT:?}; stdout {:#?}, stderr {:#?}",
                self.lines, self.errors
            )
        })
    }

    /// Ends the input and waits (up to [`WAIT`]) for the exit code.
    fn finish(&mut self) -> Option<i32> {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drain();
                return status.code();
            }
            assert!(Instant::now() < deadline, "the session did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `user`'s presence as `whois` shows it to `observer`.
fn presence(fed: &Federation, user: &str) -> String {
    let run = fed.cli("observer", &["--json", "whois", user], "");
    serde_json::from_str::<serde_json::Value>(run.stdout.trim())
        .ok()
        .and_then(|u| u["presence"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// How often [`stays`] looks: each look is a user-cli run, whose CPU the renewals it checks
/// must not starve on a small machine.
const STAYS_EVERY: Duration = Duration::from_millis(200);

/// Whether `user` is `want` at every look, every [`STAYS_EVERY`], from now to `period` from
/// now (several TTLs: the renewals keep it); the first other presence seen if not.
fn stays(fed: &Federation, user: &str, want: &str, period: Duration) -> Result<(), String> {
    let deadline = Instant::now() + period;
    loop {
        let look = Instant::now();
        let now = presence(fed, user);
        if now != want {
            return Err(now);
        }
        if look >= deadline {
            return Ok(());
        }
        // The condition is that it holds throughout: the next look, at most at the deadline.
        let next = (look + STAYS_EVERY).min(deadline);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// Issue 23: `register NAME` typed in a running session made the user online only until the
/// prompt was restarted (`users` showed them offline, DMs went only to the mailbox). Now it
/// is online at once and stays so across renewals, DMs are printed live, `disconnect` stops
/// the renewals, `connect` starts them again, and `away` is not undone by the next renewal.
#[test]
fn register_and_connect_typed_in_a_running_session_make_you_present_with_live_dms() {
    // Renewals come every third of the TTL: a loaded machine still renews in time.
    let ttl = Duration::from_secs(2);
    let fed = Federation::start_with("200ms", &["--presence-ttl", "2s"]);
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("observer", &["register", "observer"], ""));

    fed.user_key("bob"); // made now, so that the session prints nothing on stderr
    let mut bob = Session::start(&fed, "bob");
    bob.type_line("register bob");
    let at = bob.expect_line(0, "registered bob");
    assert_eq!(presence(&fed, "bob"), "online", "online at once");
    assert_eq!(
        stays(&fed, "bob", "online", 2 * ttl),
        Ok(()),
        "online from renewal to renewal"
    );
    let listed = ok(fed.cli("observer", &["users"], ""));
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.contains("bob") && l.contains("online")),
        "{listed:?}"
    );

    // A DM to bob shows in his session, without `check`, and is taken from the mailbox.
    ok(fed.cli("alice", &["send_dm", "bob", "hello", "live"], ""));
    let dm = bob.expect_line(at, "FROM alice");
    assert!(bob.lines[dm].ends_with(": hello live"), "{:?}", bob.lines);
    assert!(
        !bob.lines[dm].contains("[Stored]"),
        "pushed, not read from the mailbox: {:?}",
        bob.lines
    );

    // `disconnect` stops the renewals: offline at once, and still after the TTL.
    bob.type_line("disconnect");
    let at = bob.expect_line(dm, "bob is offline");
    assert_eq!(presence(&fed, "bob"), "offline");
    assert_eq!(stays(&fed, "bob", "offline", 2 * ttl), Ok(()));
    // A DM now waits in the mailbox; `connect` shows it, then the stream is live again.
    ok(fed.cli("alice", &["send_dm", "bob", "while", "away"], ""));
    bob.type_line("connect");
    let at = bob.expect_line(at, "[Stored]");
    assert!(bob.lines[at].ends_with(": while away"), "{:?}", bob.lines);
    assert_eq!(presence(&fed, "bob"), "online");
    ok(fed.cli("alice", &["send_dm", "bob", "back", "live"], ""));
    let dm = bob.expect_line(at, ": back live");
    assert!(!bob.lines[dm].contains("[Stored]"), "{:?}", bob.lines);

    // `away` holds across renewals (the renewals said online).
    bob.type_line("away");
    bob.expect_line(dm, "bob is away");
    assert_eq!(stays(&fed, "bob", "away", 2 * ttl), Ok(()));

    // The script ends: exit 0, nothing on stderr, and the presence lapses.
    assert_eq!(bob.finish(), Some(0), "{:?} {:?}", bob.lines, bob.errors);
    assert!(bob.errors.is_empty(), "{:?}", bob.errors);
    assert!(
        wait_for(WAIT, || presence(&fed, "bob") == "offline"),
        "bob's presence did not lapse"
    );
}

/// Issue 23: `connect` typed in a session of a user registered earlier (in another run)
/// makes them present and starts the live stream; a session that says nothing about
/// presence stays as it was (a script is not present by itself).
#[test]
fn connect_typed_in_a_session_starts_the_live_dm_stream() {
    let fed = Federation::start_with("200ms", &["--presence-ttl", "1s"]);
    ok(fed.cli("alice", &["register", "alice"], ""));
    ok(fed.cli("carol", &["register", "carol"], ""));
    ok(fed.cli("observer", &["register", "observer"], ""));

    let mut carol = Session::start(&fed, "carol");
    carol.type_line("users");
    let at = carol.expect_line(0, "observer");
    assert_eq!(
        presence(&fed, "carol"),
        "offline",
        "a script is not present by itself"
    );
    carol.type_line("CONNECT carol");
    let at = carol.expect_line(at, "no messages waiting");
    assert_eq!(presence(&fed, "carol"), "online");
    ok(fed.cli("alice", &["send_dm", "carol", "hi", "carol"], ""));
    let dm = carol.expect_line(at, "MESSAGE 1 FROM alice");
    assert!(carol.lines[dm].ends_with(": hi carol"), "{:?}", carol.lines);
    // Acked once printed: nothing waits in the mailbox.
    let check = ok(fed.cli("carol", &["check"], ""));
    assert!(check.stdout.contains("direct messages: 0 new"), "{check:?}");
    assert_eq!(carol.finish(), Some(0), "{:?}", carol.errors);
}

/// Issue 23: your own message sent from another client (here a one-shot `user-cli send`)
/// never showed in your prompt; now it does, marked as yours, while one typed at this prompt
/// is not shown twice (its ack was). The group's name is typed with tab completion.
#[test]
fn your_own_messages_from_another_client_show_in_the_prompt_marked_as_yours() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    fed.join_when_listed("bob", "Cool Group");

    let mut alice = fed.prompt("alice");
    let at = alice.expect_line(0, "Type help for commands");
    ok(fed.cli("bob", &["send", "Cool Group", "hello", "alice"], ""));
    let at = alice.expect_line(at, "bob: hello alice");
    ok(fed.cli("alice", &["send", "Cool Group", "from", "elsewhere"], ""));
    let mine = alice.expect_line(at, "(you): from elsewhere");
    let line = &alice.lines()[mine];
    assert!(
        line.contains("Cool Group #") && line.contains(" alice (you): "),
        "{line:?}"
    );

    // Typed here, the group's name completed by tab: acked, not echoed.
    alice.type_slowly("send Coo\ttyped here\n");
    let at = alice.expect_line(mine, "sent to Cool Group");
    // bob's next message comes after it in the log: once it shows, an echo would have too.
    ok(fed.cli("bob", &["send", "Cool Group", "after", "yours"], ""));
    alice.expect_line(at, "bob: after yours");
    let lines = alice.lines();
    assert!(
        !lines.iter().any(|l| l.contains("(you): typed here")),
        "{lines:?}"
    );
    alice.type_line("exit");
    assert_eq!(alice.wait_exit(), Some(0), "{:?}", alice.lines());
    // Nothing of yours is unread, from either client.
    let run = ok(fed.cli("alice", &["check"], ""));
    assert!(run.stdout.contains("Cool Group: 0 unread"), "{run:?}");
}
