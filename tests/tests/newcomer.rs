//! The first hour, as a newcomer meets it (issue 23): a fresh clone of this repository, the
//! README's quickstart run in a bare shell (`env -i PATH=… HOME=…`: no `$USER`, no `$TERM`, no
//! terminal) with the chat's commands on stdin, a second user in "another terminal" (user-cli
//! one-shot commands in the same bare environment), and, through to the end: two users
//! chatting, a file up and down, a direct message delivered live, a web sign-in link used,
//! refused when reused and minted again, and a clean stop that leaves no process, no
//! temporary directory and no warning behind.
//!
//! The clone runs the binaries this workspace built (`scripts/quickstart.sh --bin-dir`), so
//! the test compiles nothing; `AGORA_PORT=0` gives every server a free port.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use agora_tests::{bin, wait_for, CliRun};

/// The quickstart checks what is installed before it starts anything; generous, since a
/// loaded CI machine runs this beside other tests.
const QUICKSTART_START: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);

/// The directory holding `cargo`, so that the quickstart's `scripts/deps.sh` finds Rust in
/// a bare `PATH`, as a newcomer's shell (with rustup's line in the profile) would.
fn cargo_dir() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin")])
        .find(|dir| dir.join("cargo").exists())
        .expect("cargo is on PATH or in ~/.cargo/bin")
}

/// A `PATH` as `env -i` with a login shell's usual directories gives.
fn bare_path() -> String {
    format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        cargo_dir().display()
    )
}

/// A command in a bare environment: only `PATH`, `HOME` and `TMPDIR` (and `extra`).
fn bare(program: &Path, home: &Path, tmp: &Path, extra: &[(&str, &str)]) -> Command {
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("PATH", bare_path())
        .env("HOME", home)
        .env("TMPDIR", tmp);
    for (k, v) in extra {
        command.env(k, v);
    }
    command
}

/// The login name `id -un` gives: who the chat is for when `$USER` is unset.
fn login_name() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Reads lines from `r` on a thread into a channel.
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

/// `scripts/quickstart.sh` running in its own process group, with no terminal (a pipe, not
/// [`agora_tests::Pty`]: the newcomer's bare shell has none), its chat reading the commands
/// the test writes. Dropped, the whole group is stopped ([`agora_tests::stop_groups`]) and
/// the quickstart reaped.
struct Quickstart {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    lines: Vec<String>,
    errors: Vec<String>,
}

impl Quickstart {
    fn start(mut command: Command) -> Quickstart {
        let mut child = command
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the quickstart");
        let stdin = child.stdin.take();
        let stdout = lines_of(child.stdout.take().expect("stdout"));
        let stderr = lines_of(child.stderr.take().expect("stderr"));
        Quickstart {
            child,
            stdin,
            stdout,
            stderr,
            lines: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn drain(&mut self) {
        self.lines.extend(self.stdout.try_iter());
        self.errors.extend(self.stderr.try_iter());
    }

    /// The first stdout line that `find` accepts, waiting up to `timeout`.
    fn wait_line(&mut self, timeout: Duration, find: impl Fn(&str) -> bool) -> Option<String> {
        let mut found = None;
        wait_for(timeout, || {
            self.drain();
            found = self.lines.iter().find(|l| find(l)).cloned();
            found.is_some() || matches!(self.child.try_wait(), Ok(Some(_)))
        });
        self.drain();
        found.or_else(|| self.lines.iter().find(|l| find(l)).cloned())
    }

    /// Types one line into the chat.
    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to the chat");
        stdin.flush().expect("flush");
    }

    fn transcript(&mut self) -> String {
        self.drain();
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.lines.join("\n"),
            self.errors.join("\n")
        )
    }

    /// Whether anything of the quickstart's process group still runs (its id is the
    /// quickstart's pid: `process_group(0)`).
    fn group_alive(&self) -> bool {
        agora_tests::group_alive(self.child.id())
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        // SIGTERM lets the quickstart stop its servers; SIGKILL after 10 s.
        let child = &mut self.child;
        let group = child.id();
        agora_tests::stop_groups(&[group], Duration::from_secs(10), || {
            let _ = child.try_wait();
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a one-shot command to its end, with a deadline.
fn run(command: Command) -> CliRun {
    agora_tests::run_command(command, "")
}

/// `curl`-free GET with the given cookie; returns the status, the `Set-Cookie` values and the
/// body.
fn get(url: &str, cookie: Option<&str>) -> (u16, Vec<String>, String) {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(10))
        .build();
    let mut request = agent.get(url);
    if let Some(cookie) = cookie {
        request = request.set("Cookie", cookie);
    }
    let response = match request.call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = response.status();
    let cookies = response
        .all("set-cookie")
        .into_iter()
        .map(str::to_owned)
        .collect();
    let body = response.into_string().unwrap_or_default();
    (status, cookies, body)
}

#[test]
fn a_newcomer_chats_sends_a_file_gets_a_live_dm_and_uses_the_web_link_in_a_bare_shell() {
    if agora_tests::test_store_is_postgres() {
        eprintln!("the quickstart stores in SQLite only: its test runs in the SQLite pass");
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let home = work.path().join("home");
    let tmp = work.path().join("tmp");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::create_dir_all(&tmp).expect("tmp");

    // A fresh clone of what is committed, as a newcomer gets it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let clone = work.path().join("agora");
    let cloned = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(root)
        .arg(&clone)
        .status()
        .expect("git clone");
    assert!(cloned.success(), "git clone of {} failed", root.display());

    let bin_dir = bin("user-cli").parent().expect("bin dir").to_path_buf();
    let beacon_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
        .to_string();
    let me = login_name();
    let mut command = bare(
        Path::new("bash"),
        &home,
        &tmp,
        &[("AGORA_PORT", "0"), ("AGORA_BEACON_PORT", &beacon_port)],
    );
    command
        .arg(clone.join("scripts/quickstart.sh"))
        .arg("--web")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .current_dir(&clone);
    let mut quick = Quickstart::start(command);

    // It says who you are, with no $USER.
    let you = quick.wait_line(QUICKSTART_START, |l| l.starts_with("You are "));
    assert_eq!(
        you.as_deref().and_then(|l| l.split_whitespace().nth(2)),
        Some(format!("{me}.").as_str()),
        "the quickstart names the user it chats as\n{}",
        quick.transcript()
    );
    // The registry's key, quoted, and in the file it names.
    let export = quick
        .wait_line(STEP, |l| l.contains("export AGORA_REGISTRY_KEY="))
        .expect("the key line");
    let key = export
        .split_once("AGORA_REGISTRY_KEY='")
        .and_then(|(_, rest)| rest.strip_suffix('\''))
        .expect("the key is in single quotes")
        .to_owned();
    assert_eq!(key.len(), 40, "a Z85 key: {export}");
    let state = home.join(".local/state/agora/quickstart");
    assert_eq!(
        std::fs::read_to_string(state.join("registry-key"))
            .expect("the key file")
            .trim(),
        key
    );
    let registry = quick
        .wait_line(STEP, |l| l.starts_with("Local federation: registry "))
        .and_then(|l| {
            l.trim_start_matches("Local federation: registry ")
                .split(',')
                .next()
                .map(str::to_owned)
        })
        .expect("the registry's endpoint");
    let page = quick
        .wait_line(STEP, |l| l.starts_with("The chat page"))
        .and_then(|l| l.split_whitespace().last().map(str::to_owned))
        .expect("the page's link");

    // The second terminal: bob, in the same bare shell.
    let bob = |args: &[&str]| {
        let mut c = bare(
            &bin_dir.join("user-cli"),
            &home,
            &tmp,
            &[("AGORA_REGISTRY_KEY", &key)],
        );
        c.args(["--registry", &registry, "--user", "bob", "--timeout", "5s"])
            .args(args);
        run(c)
    };

    // Two users chatting.
    quick.type_line(&format!("register {me}"));
    quick.type_line("join_group \"Cool Group\"");
    quick.type_line("send_message \"Cool Group\"");
    quick.type_line("Hello everyone!");
    quick.type_line("END");
    let joined = bob(&["join", "Cool Group"]);
    assert_eq!(joined.code, Some(0), "bob joins: {joined:?}");
    assert!(
        wait_for(STEP, || bob(&["messages", "Cool Group"])
            .stdout
            .contains(&format!("{me}: Hello everyone!"))),
        "bob reads the newcomer's message\n{}",
        quick.transcript()
    );
    let sent = bob(&["send", "Cool Group", "hi there"]);
    assert_eq!(sent.code, Some(0), "bob sends: {sent:?}");
    // A scripted session prints what it is asked for (live group messages are the
    // prompt's, on a terminal: tests/tests/cli_live.rs).
    quick.type_line("get_messages \"Cool Group\"");
    assert!(
        quick
            .wait_line(STEP, |l| l.contains("bob: hi there"))
            .is_some(),
        "bob's message is in the newcomer's chat\n{}",
        quick.transcript()
    );

    // A file up (bob) and down (the newcomer).
    let upload = work.path().join("report.bin");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&upload, &content).expect("write the file");
    let up = bob(&[
        "--json",
        "send_file",
        "Cool Group",
        upload.to_str().expect("utf-8"),
    ]);
    assert_eq!(up.code, Some(0), "bob sends a file: {up:?}");
    let seq = up
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("seq").and_then(serde_json::Value::as_u64))
        .expect("send_file's JSON result has the seq");
    let down = work.path().join("down.bin");
    quick.type_line(&format!(
        "get_file \"Cool Group\" {seq} --out {}",
        down.display()
    ));
    assert!(
        wait_for(STEP, || std::fs::read(&down).is_ok_and(|b| b == content)),
        "the newcomer downloads bob's file intact\n{}",
        quick.transcript()
    );

    // A direct message, delivered live to the chat.
    let registered = bob(&["register", "bob"]);
    assert_eq!(registered.code, Some(0), "bob registers: {registered:?}");
    assert!(
        wait_for(STEP, || bob(&["users"])
            .stdout
            .lines()
            .any(|l| l.contains(&me) && l.contains("online"))),
        "the newcomer, registered in the running chat, is online\n{}",
        quick.transcript()
    );
    let dm = bob(&["send_dm", &me, "are you there?"]);
    assert_eq!(dm.code, Some(0), "bob's DM: {dm:?}");
    assert!(
        quick
            .wait_line(STEP, |l| l.contains("bob") && l.contains("are you there?"))
            .is_some(),
        "the DM shows in the chat without asking for it\n{}",
        quick.transcript()
    );

    // The web link: works once; reused, the 401 says how to get another; a new one works.
    let (status, cookies, _) = get(&page, None);
    assert!(
        (200..400).contains(&status) && !cookies.is_empty(),
        "the printed link signs in: {status} {cookies:?}"
    );
    let (status, _, body) = get(&page, None);
    assert_eq!(status, 401, "the link works once");
    assert!(
        body.contains("agora-web link"),
        "the 401 page says how to get a new link: {body}"
    );
    let mut mint = bare(&bin_dir.join("agora-web"), &home, &tmp, &[]);
    mint.arg("link");
    let minted = run(mint);
    assert_eq!(minted.code, Some(0), "agora-web link: {minted:?}");
    let fresh = minted
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a link")
        .to_owned();
    let (status, cookies, _) = get(&fresh, None);
    assert!(
        (200..400).contains(&status) && !cookies.is_empty(),
        "a freshly minted link signs in: {status} {cookies:?}"
    );

    // Leaving the chat stops everything, cleanly.
    quick.type_line("exit");
    quick.stdin = None;
    let status = wait_for(Duration::from_secs(60), || {
        matches!(quick.child.try_wait(), Ok(Some(_)))
    });
    assert!(status, "the quickstart ends with the chat");
    let code = quick.child.wait().expect("wait").code();
    let transcript = quick.transcript();
    assert_eq!(code, Some(0), "the quickstart's exit code\n{transcript}");
    assert!(
        wait_for(Duration::from_secs(10), || !quick.group_alive()),
        "no server is left running"
    );
    for log in ["registry.log", "cool.log", "news.log", "web.log"] {
        let text = std::fs::read_to_string(state.join(log)).unwrap_or_default();
        assert!(
            !text.contains("WARN") && !text.contains("ERROR"),
            "{log} has no warning: {text}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("tmp")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "no temporary file is left: {left:?}");
    // Shown with --nocapture: what the newcomer saw.
    eprintln!("{transcript}");
    assert!(
        !transcript.contains("user-cli:"),
        "no command of the session failed\n{transcript}"
    );
}
