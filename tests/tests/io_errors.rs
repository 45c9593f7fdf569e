//! I/O errors beyond a full disk (issue 23, item 16), on the real `group-node` and `registry`
//! binaries with their data directories on a small ext4 file system that the test makes in a
//! file and mounts through a loop device.
//!
//! What broke: with the store's files made immutable (`chattr +i`) while a node ran, the next
//! send killed it with SIGBUS and no log line. SQLite wrote the WAL index through a shared
//! memory map of the `-shm` file, and ext4 answers a write fault on a mapped page of a file
//! that cannot be written with SIGBUS. The node now keeps the WAL index in its own memory
//! (SQLite's `unix-excl` VFS), so every failed write is an error SQLite returns.
//!
//! What must hold, for an immutable store and for a file system that turned read-only after
//! an error (`mount -o remount,abort`: what ext4's `errors=remount-ro` does on an I/O
//! error; a plain `remount,ro` is refused while files are open for writing):
//! - the process never dies by a signal;
//! - the cause is logged once (one ERROR line), not once per refused write;
//! - writes are answered `internal` and nothing of them is stored; reads are answered;
//! - once the cause is gone (`chattr -i`; for the read-only file system: stop, unmount,
//!   `e2fsck`, mount, start), writes are acked again and every acked message is there at its
//!   seq, with no seq gap.
//!
//! The registry had the same exposure and is fixed the same way; its case is the last test
//! here.
//!
//! Mounting and `chattr` need root (CI runs as root), `mkfs.ext4`, `e2fsck` and a loop
//! device; without them each test says it skipped and passes, as it cannot run. SQLite only:
//! with `--store` (PostgreSQL, `AGORA_TEST_STORE=postgres`) the node has no store files.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_proto::id::MessageId;
use agora_proto::wire::{ErrorCode, HistoryQuery, UserName};
use agora_tests::{wait_for, CliRun, Server};
use serde_json::value::RawValue;

const GROUP: &str = "Failing Disk";
/// How long the cause may take to go away and writes to be acked again.
const RECOVERY: Duration = Duration::from_secs(30);
/// The text of the one ERROR line a node logs when its store stops taking writes.
const CAUSE_LINE: &str = "the store cannot be written";
/// The text of the line it logs when writes work again.
const RECOVERED_LINE: &str = "the store can be written again";

/// A small ext4 file system in an image file, mounted through a loop device at a temporary
/// directory; unmounted on drop.
struct Ext4 {
    /// Holds the image, outside the mount.
    _dir: tempfile::TempDir,
    image: PathBuf,
    mount: tempfile::TempDir,
}

impl Ext4 {
    /// Makes and mounts a 192 MiB ext4 (room for the node's 64 MiB zero-filled WAL); the
    /// reason where that cannot be done.
    fn make() -> Result<Ext4, String> {
        if !is_root() {
            return Err("mounting a file system needs root (CI runs as root)".into());
        }
        for tool in ["mkfs.ext4", "e2fsck", "chattr", "mount", "umount"] {
            if !tool_exists(tool) {
                return Err(format!("{tool} is not installed"));
            }
        }
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let image = dir.path().join("ext4.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(192 << 20))
            .map_err(|e| format!("image: {e}"))?;
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .map_err(|e| format!("mkfs.ext4: {e}"))?;
        if !made.success() {
            return Err(format!("mkfs.ext4 failed: {made}"));
        }
        let mount = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let fs = Ext4 {
            _dir: dir,
            image,
            mount,
        };
        if !fs.mount_image() {
            // No loop device in this container, say.
            return Err("mount -o loop failed (no loop device?)".into());
        }
        Ok(fs)
    }

    fn mount_image(&self) -> bool {
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&self.image)
            .arg(self.mount.path())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn path(&self) -> &Path {
        self.mount.path()
    }

    /// What ext4 does on an I/O error under `errors=remount-ro`: the journal is aborted and
    /// the file system turns read-only, under the processes that have files open on it.
    fn abort(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,abort"])
            .arg(self.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -o remount,abort");
    }

    /// Unmounts, repairs (`e2fsck -fy`: the abort left the file system marked with errors)
    /// and mounts again: what an operator does after such an error.
    fn repair(&self) {
        let status = Command::new("umount")
            .arg(self.path())
            .status()
            .expect("run umount");
        assert!(status.success(), "umount");
        let checked = Command::new("e2fsck")
            .args(["-fy"])
            .arg(&self.image)
            .output()
            .expect("run e2fsck");
        // 0: clean; 1: errors corrected.
        assert!(
            matches!(checked.status.code(), Some(0 | 1)),
            "e2fsck: {checked:?}"
        );
        assert!(self.mount_image(), "mount the repaired file system");
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount.path()).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn tool_exists(tool: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|dir| Path::new(dir).join(tool).exists())
}

/// `chattr FLAG` on each of `files` that exists.
fn chattr(flag: &str, files: &[PathBuf]) {
    for file in files.iter().filter(|f| f.exists()) {
        let status = Command::new("chattr")
            .arg(flag)
            .arg(file)
            .status()
            .expect("run chattr");
        assert!(status.success(), "chattr {flag} {}", file.display());
    }
}

/// The SQLite files of a store: the database and its `-wal` and `-shm` companions.
fn sqlite_files(db: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| {
            let mut name = db.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        })
        .collect()
}

fn client(endpoint: &str, user: &str) -> GroupClient {
    let ctx = zmq::Context::new();
    GroupClient::new(
        &ctx,
        endpoint,
        UserName::new(user).expect("name"),
        None,
        ClientOptions {
            timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        },
    )
}

/// An insecure node with its data in `data`, without rate limits or a disk reserve.
fn start_node(data: &Path, log: &Path) -> Server {
    Server::start(
        "group-node",
        &[
            GROUP,
            "127.0.0.1:0",
            "--insecure",
            "--no-registry",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--rate-limit",
            "0",
            "--disk-reserve-bytes",
            "0",
        ],
        log,
    )
}

/// A body of about `n` bytes.
fn body(n: usize) -> Box<RawValue> {
    RawValue::from_string(format!("\"{}\"", "x".repeat(n))).expect("json")
}

/// What a writer saw, by id.
#[derive(Default)]
struct Outcomes {
    acked: BTreeMap<MessageId, u64>,
    internal: BTreeSet<MessageId>,
}

impl Outcomes {
    /// Sends one message with a fresh id; records and returns the outcome.
    fn send(&mut self, c: &mut GroupClient, size: usize) -> Result<u64, ErrorCode> {
        let id = MessageId::new_v7();
        match c.send_with_id(body(size), id) {
            Ok(ack) => {
                assert!(!ack.duplicate, "a fresh id came back duplicate");
                self.acked.insert(id, ack.seq);
                Ok(ack.seq)
            }
            Err(ClientError::Server(e)) => {
                if e.code == ErrorCode::Internal {
                    self.internal.insert(id);
                }
                Err(e.code)
            }
            Err(e) => panic!("send: {e}"),
        }
    }

    /// Reads the whole log back and checks it: no seq gap, every acked id at its acked seq,
    /// no id answered `internal` stored.
    fn check_log(&self, c: &mut GroupClient) {
        let mut stored: BTreeMap<MessageId, u64> = BTreeMap::new();
        let mut seqs = Vec::new();
        c.for_each_page(HistoryQuery::AfterSeq(0), Some(100), |page| {
            for m in &page.messages {
                seqs.push(m.seq);
                stored.insert(m.id, m.seq);
            }
            true
        })
        .expect("read the log");
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "the log has a seq gap");
        for (id, seq) in &self.acked {
            assert_eq!(
                stored.get(id),
                Some(seq),
                "acked message {id} is not at its seq"
            );
        }
        for id in &self.internal {
            assert!(
                !stored.contains_key(id),
                "message {id} was answered internal but is stored"
            );
        }
    }
}

/// The node's ERROR lines.
fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("ERROR")).collect()
}

/// The node is still running (it did not exit, by a signal or otherwise).
fn assert_alive(node: &mut Server) {
    if let Some(status) = node.wait_exit(Duration::ZERO) {
        panic!(
            "the node exited ({}); log:\n{}",
            describe(status),
            node.log()
        );
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(signal)) => format!("killed by signal {signal}"),
        (Some(code), None) => format!("exit status {code}"),
        (None, None) => "no status".into(),
    }
}

/// Stops the node with SIGTERM and checks that it exits 0, not by a signal.
fn assert_clean_stop(node: &mut Server) {
    let status = node.terminate();
    assert_eq!(
        (status.code(), status.signal()),
        (Some(0), None),
        "the node stopped with {}; log:\n{}",
        describe(status),
        node.log()
    );
}

/// Writes against a store that refuses them: each answered `internal`, the node alive and
/// answering reads, the cause logged once.
fn refused_while_failing(
    node: &mut Server,
    writer: &mut GroupClient,
    reader: &mut GroupClient,
    outcomes: &mut Outcomes,
    last_acked: u64,
) {
    for n in 0..12 {
        // Small bodies and one of 200 KB (more than SQLite's page cache keeps back).
        let size = if n % 4 == 3 { 200_000 } else { 1_000 };
        match outcomes.send(writer, size) {
            Err(ErrorCode::Internal) => {}
            other => panic!("a write to a failing store was answered {other:?}"),
        }
        assert_alive(node);
    }
    // A batch that changes nothing commits without writing: it shows nothing about the
    // store, so the cause is not logged as gone, and then again.
    writer
        .join()
        .expect("a member's join again changes nothing");
    match outcomes.send(writer, 1_000) {
        Err(ErrorCode::Internal) => {}
        other => panic!("a write to a failing store was answered {other:?}"),
    }
    // Membership changes are writes too.
    let mut late = client(&node.endpoint, "late");
    match late.join() {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Internal, "{e}"),
        other => panic!("a join on a failing store: {other:?}"),
    }
    // Reads are answered, from what is stored.
    let info = reader.info().expect("info while the store fails");
    assert_eq!(info.last_seq, last_acked, "{info:?}");
    let page = reader
        .get_messages(HistoryQuery::Latest(3), None)
        .expect("history while the store fails");
    assert_eq!(page.messages.last().map(|m| m.seq), Some(last_acked));
    assert_alive(node);
    let log = node.log();
    let errors = error_lines(&log);
    assert_eq!(
        errors.len(),
        1,
        "expected the cause logged once; log:\n{log}"
    );
    assert!(errors[0].contains(CAUSE_LINE), "log:\n{log}");
    eprintln!("the cause, as logged: {}", errors[0]);
}

/// Sends until one is acked (the cause may take a moment to be noticed as gone).
fn acked_again(writer: &mut GroupClient, outcomes: &mut Outcomes) {
    let mut last = None;
    assert!(
        wait_for(RECOVERY, || {
            last = Some(outcomes.send(writer, 1_000));
            matches!(last, Some(Ok(_)))
        }),
        "writes were not acked again: {last:?}"
    );
    for _ in 0..5 {
        outcomes
            .send(writer, 1_000)
            .expect("a write once the store is writable");
    }
}

#[test]
fn a_store_made_immutable_answers_writes_internal_and_never_kills_the_node_by_sigbus() {
    let fs = match Ext4::make() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let data = fs.path().join("node");
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut node = start_node(&data, log.path());
    let mut writer = client(&node.endpoint, "writer");
    writer.join().expect("join");
    let mut reader = client(&node.endpoint, "reader");
    reader.join().expect("join");
    let mut outcomes = Outcomes::default();
    let mut last = 0;
    for _ in 0..20 {
        last = outcomes.send(&mut writer, 1_000).expect("send");
    }

    let files = sqlite_files(&data.join("group.sqlite3"));
    // The WAL index is in the node's memory, not in a mapped file.
    assert!(!files[2].exists(), "{} exists", files[2].display());
    chattr("+i", &files);
    refused_while_failing(&mut node, &mut writer, &mut reader, &mut outcomes, last);
    // The checkpoint thread (every 10 s) fails too, on its own connection: warned once.
    assert!(
        wait_for(Duration::from_secs(15), || node
            .log()
            .contains("checkpoint failed")),
        "no checkpoint ran; log:\n{}",
        node.log()
    );
    assert_alive(&mut node);
    refused_while_failing(&mut node, &mut writer, &mut reader, &mut outcomes, last);
    let warned = |log: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("checkpoint failed"))
            .count()
    };
    assert_eq!(warned(&node.log()), 1, "{}", node.log());

    chattr("-i", &files);
    acked_again(&mut writer, &mut outcomes);
    assert!(node.log().contains(RECOVERED_LINE), "{}", node.log());
    outcomes.check_log(&mut reader);
    assert_clean_stop(&mut node);
    eprintln!(
        "immutable store: {} acked, {} internal",
        outcomes.acked.len(),
        outcomes.internal.len()
    );
}

#[test]
fn a_file_system_turned_read_only_by_an_error_answers_writes_internal_and_loses_no_ack() {
    let fs = match Ext4::make() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let data = fs.path().join("node");
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut node = start_node(&data, log.path());
    let mut writer = client(&node.endpoint, "writer");
    writer.join().expect("join");
    let mut reader = client(&node.endpoint, "reader");
    reader.join().expect("join");
    let mut outcomes = Outcomes::default();
    let mut last = 0;
    for _ in 0..20 {
        last = outcomes.send(&mut writer, 1_000).expect("send");
    }

    fs.abort();
    refused_while_failing(&mut node, &mut writer, &mut reader, &mut outcomes, last);

    // The file system cannot be made writable under the open files: the operator stops the
    // node, repairs the file system and starts the node again.
    assert_clean_stop(&mut node);
    drop((writer, reader));
    fs.repair();
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut node = start_node(&data, log.path());
    let mut writer = client(&node.endpoint, "writer");
    let mut reader = client(&node.endpoint, "reader");
    acked_again(&mut writer, &mut outcomes);
    outcomes.check_log(&mut reader);
    assert_clean_stop(&mut node);
    eprintln!(
        "read-only file system: {} acked, {} internal",
        outcomes.acked.len(),
        outcomes.internal.len()
    );
}

/// A registry with its data in `data` (CURVE, port 0), logging to `log`.
fn start_registry(data: &Path, log: &Path) -> Server {
    Server::start(
        "registry",
        &[
            "--bind",
            "tcp://127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ],
        log,
    )
}

/// Runs `user-cli --user USER ARGS` against `registry`, with the users' keys and state in
/// `clients`.
fn registry_cli(registry: &Server, clients: &Path, user: &str, args: &[&str]) -> CliRun {
    let (state, keys) = (clients.join("state"), clients.join("keys"));
    let key = registry.key.clone().expect("the registry runs with CURVE");
    let env = [
        ("AGORA_REGISTRY", registry.endpoint.as_str()),
        ("AGORA_REGISTRY_KEY", key.as_str()),
        ("AGORA_STATE_DIR", state.to_str().expect("utf-8 path")),
        ("AGORA_KEY_DIR", keys.to_str().expect("utf-8 path")),
    ];
    let mut all = vec!["--user", user];
    all.extend_from_slice(args);
    agora_tests::cli(&all, "", &env)
}

/// Alice and Bob have accounts, and Alice's DM `before` waits in Bob's mailbox.
fn registry_with_a_dm(registry: &Server, clients: &Path) {
    for user in ["alice", "bob"] {
        let run = registry_cli(registry, clients, user, &["register", user]);
        assert_eq!(run.code, Some(0), "{run:?}");
    }
    let run = registry_cli(registry, clients, "alice", &["send_dm", "bob", "before"]);
    assert_eq!(run.code, Some(0), "{run:?}");
}

/// While the registry's store fails: writes (`send_dm`, `register`) are refused by the
/// server (exit 1, not unreachable), reads (`users`) are answered from what is stored, the
/// registry runs on, and the cause is logged once.
fn registry_refuses_while_failing(registry: &mut Server, clients: &Path) {
    let cli = |user: &str, args: &[&str]| registry_cli(registry, clients, user, args);
    let refused = cli("alice", &["send_dm", "bob", "while failing"]);
    let late = cli("carol", &["register", "carol"]);
    let again = cli("alice", &["send_dm", "bob", "while failing, again"]);
    let users = cli("alice", &["--json", "users"]);
    if let Some(status) = registry.wait_exit(Duration::ZERO) {
        panic!(
            "the registry exited ({}); log:\n{}",
            describe(status),
            registry.log()
        );
    }
    assert_eq!(
        (refused.code, late.code, again.code),
        (Some(1), Some(1), Some(1)),
        "{refused:?} {late:?} {again:?}"
    );
    assert_eq!(users.code, Some(0), "{users:?}");
    assert!(
        users.stdout.contains("alice") && users.stdout.contains("bob"),
        "{users:?}"
    );
    assert!(!users.stdout.contains("carol"), "{users:?}");
    let log = registry.log();
    let errors = error_lines(&log);
    assert_eq!(
        errors.len(),
        1,
        "expected the cause logged once; log:\n{log}"
    );
    assert!(errors[0].contains(CAUSE_LINE), "log:\n{log}");
    eprintln!("the cause, as logged: {}", errors[0]);
}

/// Once the cause is gone: writes work again, and of the DMs Bob gets `before` and `after`,
/// none refused meanwhile.
fn registry_writes_again(registry: &Server, clients: &Path) {
    let cli = |user: &str, args: &[&str]| registry_cli(registry, clients, user, args);
    let run = cli("alice", &["send_dm", "bob", "after"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let run = cli("carol", &["register", "carol"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let check = cli("bob", &["check"]);
    assert_eq!(check.code, Some(0), "{check:?}");
    assert!(
        check.stdout.contains("before") && check.stdout.contains("after"),
        "{check:?}"
    );
    assert!(!check.stdout.contains("while failing"), "{check:?}");
}

/// Stops the registry with SIGTERM and checks that it exits 0, not by a signal.
fn assert_registry_stops_cleanly(registry: &mut Server) {
    let status = registry.terminate();
    assert_eq!(
        (status.code(), status.signal()),
        (Some(0), None),
        "the registry stopped with {}; log:\n{}",
        describe(status),
        registry.log()
    );
}

/// The registry had the same exposure: its SQLite shared the WAL index through a mapped
/// `-shm` file (so that `registry release` could open the database beside it), and a
/// `send_dm` after its files were made immutable killed it by SIGBUS (signal 7). It now
/// keeps the WAL index in memory as the node does, and `registry release` asks the running
/// registry instead (tests/tests/security.rs).
#[test]
fn a_registry_store_made_immutable_answers_internal_and_never_kills_the_registry_by_sigbus() {
    let fs = match Ext4::make() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let data = fs.path().join("registry");
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut registry = start_registry(&data, log.path());
    let clients = tempfile::tempdir().expect("tempdir");
    registry_with_a_dm(&registry, clients.path());

    let files = sqlite_files(&data.join("registry.sqlite3"));
    // The WAL index is in the registry's memory, not in a mapped file.
    assert!(!files[2].exists(), "{} exists", files[2].display());
    chattr("+i", &files);
    let failing = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        registry_refuses_while_failing(&mut registry, clients.path())
    }));
    chattr("-i", &files);
    if let Err(panic) = failing {
        std::panic::resume_unwind(panic);
    }
    registry_writes_again(&registry, clients.path());
    assert!(
        registry.log().contains(RECOVERED_LINE),
        "{}",
        registry.log()
    );
    assert_registry_stops_cleanly(&mut registry);
}

/// The registry on a file system that ext4 turned read-only: it runs on, refusing writes,
/// until the operator stops it (exit 0), repairs the file system and starts it again; then
/// writes work and nothing acked is lost.
#[test]
fn a_registry_on_a_file_system_turned_read_only_answers_internal_and_loses_no_dm() {
    let fs = match Ext4::make() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let data = fs.path().join("registry");
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut registry = start_registry(&data, log.path());
    let clients = tempfile::tempdir().expect("tempdir");
    registry_with_a_dm(&registry, clients.path());

    fs.abort();
    registry_refuses_while_failing(&mut registry, clients.path());
    assert_registry_stops_cleanly(&mut registry);
    fs.repair();
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut registry = start_registry(&data, log.path());
    registry_writes_again(&registry, clients.path());
    assert_registry_stops_cleanly(&mut registry);
}
