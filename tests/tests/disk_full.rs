//! Exact failure semantics when the disk fills mid-batch (issue 10, item 5), on the real
//! `group-node` binary with its data directory on a small tmpfs that the test mounts.
//!
//! Several writers send 1 KB and 900 KB bodies concurrently, each with a fresh client id,
//! while a reader asks for `info` and history. Once the tmpfs is full (the writers see
//! `internal`), the test grows it (`mount -o remount,size=…`) and the writers must be acked
//! again by the same node process. Then the whole log is read back and checked: no seq gap,
//! every acked id stored at its acked seq, no id answered `internal` stored, and no read
//! answered `internal`.
//!
//! Mounting needs root (CI runs as root); elsewhere the test says so and passes without
//! running, as it cannot mount.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_proto::id::MessageId;
use agora_proto::wire::{ErrorCode, HistoryQuery, UserName};
use agora_tests::Server;
use serde_json::value::RawValue;

const GROUP: &str = "Full Disk";
const WRITERS: usize = 4;
/// Acks each writer must get after the space returns.
const ACKS_AFTER: u64 = 5;
const DEADLINE: Duration = Duration::from_secs(120);

/// A tmpfs mounted at a temporary directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "remount the tmpfs to {size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
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

/// An insecure node with its data on the tmpfs, without rate limits, and without a disk
/// reserve for uploads (`--disk-reserve-bytes 0`; the default, 1 GiB, is more than the
/// tmpfs): what is tested here is a disk that fills anyway.
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

/// What the writers saw, by id.
#[derive(Default)]
struct Outcomes {
    acked: BTreeMap<MessageId, u64>,
    internal: BTreeSet<MessageId>,
}

#[test]
fn a_full_disk_loses_no_acked_message_leaves_no_gap_and_stores_no_internal_id() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let Some(fs) = Tmpfs::mount("24m") else {
        panic!("cannot mount a tmpfs although root");
    };
    let data: PathBuf = fs.path().join("node");
    let log = tempfile::NamedTempFile::new().expect("log");
    let node = start_node(&data, log.path());
    let endpoint = node.endpoint.clone();
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let internals_seen = Arc::new(AtomicU64::new(0));
    let freed = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (endpoint, outcomes, internals_seen, freed) = (
                endpoint.clone(),
                Arc::clone(&outcomes),
                Arc::clone(&internals_seen),
                Arc::clone(&freed),
            );
            std::thread::spawn(move || {
                let mut c = client(&endpoint, &format!("writer{w}"));
                c.join().expect("join");
                let mut acks_after = 0;
                let mut n = 0u64;
                while acks_after < ACKS_AFTER {
                    assert!(started.elapsed() < DEADLINE, "writer {w} ran out of time");
                    n += 1;
                    let size = if n.is_multiple_of(3) { 900_000 } else { 1_000 };
                    let body =
                        RawValue::from_string(format!("\"{}\"", "x".repeat(size))).expect("json");
                    let id = MessageId::new_v7();
                    let after = freed.load(Ordering::SeqCst);
                    match c.send_with_id(body, id) {
                        Ok(ack) => {
                            assert!(!ack.duplicate, "a fresh id came back duplicate");
                            outcomes.lock().expect("lock").acked.insert(id, ack.seq);
                            if after {
                                acks_after += 1;
                            }
                        }
                        Err(ClientError::Server(e)) if e.code == ErrorCode::Internal => {
                            outcomes.lock().expect("lock").internal.insert(id);
                            internals_seen.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => panic!("writer {w}: unexpected {e}"),
                    }
                }
            })
        })
        .collect();

    let reader = {
        let (endpoint, done) = (endpoint.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut c = client(&endpoint, "reader");
            c.join().expect("reader joins");
            let mut reads = 0u64;
            while !done.load(Ordering::SeqCst) {
                c.info().expect("info is answered while the disk is full");
                c.get_messages(HistoryQuery::Latest(2), None)
                    .expect("history is answered while the disk is full");
                reads += 1;
            }
            reads
        })
    };

    // Wait until the disk has filled (several writes refused), then give it room again.
    let deadline = started + DEADLINE;
    while internals_seen.load(Ordering::SeqCst) < 8 {
        assert!(
            Instant::now() < deadline,
            "the tmpfs never filled; node log:\n{}",
            node.log()
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
    fs.resize("512m");
    freed.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().expect("writer");
    }
    done.store(true, Ordering::SeqCst);
    let reads = reader.join().expect("reader");
    assert!(reads > 0, "the reader never read");

    // Read the whole log back.
    let mut c = client(&endpoint, "reader");
    let mut stored: BTreeMap<MessageId, u64> = BTreeMap::new();
    let mut seqs = Vec::new();
    c.for_each_page(HistoryQuery::AfterSeq(0), Some(50), |page| {
        for m in &page.messages {
            seqs.push(m.seq);
            stored.insert(m.id, m.seq);
        }
        true
    })
    .expect("read the log");
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "the log has a seq gap");
    let outcomes = outcomes.lock().expect("lock");
    assert!(!outcomes.internal.is_empty() && !outcomes.acked.is_empty());
    for (id, seq) in &outcomes.acked {
        assert_eq!(
            stored.get(id),
            Some(seq),
            "acked message {id} is not at its seq"
        );
    }
    for id in &outcomes.internal {
        assert!(
            !stored.contains_key(id),
            "message {id} was answered internal but is stored"
        );
    }
    eprintln!(
        "disk full: {} acked, {} internal, {} entries, {reads} reads",
        outcomes.acked.len(),
        outcomes.internal.len(),
        seqs.len()
    );
}

/// An upload that fills the disk: the chunk that did not fit gets `internal` and is cut back,
/// so the upload stands where its last acked chunk left it; once space returns it resumes
/// from there and completes byte-identical. Nothing partial is ever served.
#[test]
fn a_full_disk_refuses_an_upload_chunk_and_the_upload_resumes_when_space_returns() {
    use sha2::{Digest, Sha256};
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let Some(fs) = Tmpfs::mount("16m") else {
        panic!("cannot mount a tmpfs although root");
    };
    let log = tempfile::NamedTempFile::new().expect("log");
    let node = start_node(&fs.path().join("node"), log.path());
    let mut alice = client(&node.endpoint, "alice");
    alice.join().expect("join");
    let content: Vec<u8> = (0..24u64 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let digest = agora_proto::wire::Sha256Digest::from_bytes(Sha256::digest(&content).into());
    let chunk = 256 << 10;
    alice.upload(digest, content.len() as u64).expect("declare");
    let mut acked = 0u64;
    let refused = loop {
        let end = (acked as usize + chunk).min(content.len());
        match alice.upload_chunk(digest, acked, content[acked as usize..end].to_vec()) {
            Ok(reply) => {
                assert!(!reply.complete, "24 MiB fitted in a 16 MiB tmpfs");
                acked = reply.have;
            }
            Err(ClientError::Server(e)) => break e,
            Err(e) => panic!("unexpected: {e}"),
        }
    };
    assert_eq!(refused.code, ErrorCode::Internal, "{refused}");
    assert!(acked > 0, "not even one chunk fitted");
    // The chunk that did not fit left nothing behind: the upload stands at the last ack.
    let status = alice
        .upload(digest, content.len() as u64)
        .expect("status on a full disk");
    assert_eq!(status.have, acked);
    assert!(matches!(
        alice.download(digest, 0, Some(10)),
        Err(ClientError::Server(e)) if e.code == ErrorCode::NotFound
    ));

    fs.resize("256m");
    let mut at = acked as usize;
    let mut last = None;
    while at < content.len() {
        let end = (at + chunk).min(content.len());
        last = Some(
            alice
                .upload_chunk(digest, at as u64, content[at..end].to_vec())
                .expect("a chunk once space returned"),
        );
        at = end;
    }
    assert!(last.is_some_and(|r| r.complete));
    let mut back = Vec::with_capacity(content.len());
    while back.len() < content.len() {
        let (_, bytes) = alice
            .download(digest, back.len() as u64, None)
            .expect("download");
        back.extend(bytes);
    }
    assert!(back == content, "the resumed upload is not byte-identical");
}
