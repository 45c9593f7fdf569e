//! Attachments across a standby failover: with `--store postgres://…` a complete blob lives in
//! the group's PostgreSQL schema as well as in the active node's files, so the standby that
//! takes over serves a file sent before the active died, though it never had the file.

use std::path::Path;
use std::time::Duration;

use agora_proto::wire::Sha256Digest;
use agora_tests::{wait_for, CliRun, Federation};
use sha2::{Digest, Sha256};

const GROUP: &str = "ha-files";

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

fn digest_of(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest::from_bytes(Sha256::digest(bytes).into())
}

/// Deterministic content of `len` bytes.
fn content(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 2_654_435_761 % 251) as u8)
        .collect()
}

/// The seq in user-cli's `sent to GROUP: seq N at TIME`.
fn seq_of(stdout: &str) -> String {
    stdout
        .split("seq ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a seq in the ack")
        .to_owned()
}

/// Complete blobs in the files of the node started with `tag`.
/// `user-cli OPTIONS get_file GROUP SEQ --out OUT` as `user`.
fn get_file(fed: &Federation, user: &str, options: &[&str], seq: &str, out: &Path) -> CliRun {
    let mut args = options.to_vec();
    args.extend([
        "get_file",
        GROUP,
        seq,
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    fed.cli(user, &args, "")
}

fn blob_files(fed: &Federation, tag: &str) -> usize {
    let root = Path::new(&fed.node_data_dir(tag)).join("blobs/sha256");
    std::fs::read_dir(root)
        .map(|dirs| {
            dirs.flatten()
                .map(|d| std::fs::read_dir(d.path()).map_or(0, Iterator::count))
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes of `digest` the node's log shows it received as upload chunks (its
/// `agora::transfer` events).
fn chunk_bytes_received(log: &str, digest: &Sha256Digest) -> u64 {
    let digest = format!("digest={digest}");
    log.lines()
        .filter(|l| l.contains("upload chunk") && l.contains(&digest))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("len="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

#[test]
fn a_file_sent_before_kill_9_downloads_whole_from_the_standby_that_took_over() {
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let mut active = fed.node(GROUP, "127.0.0.1:0", "a", &["--store", &url]);
    fed.share_node_keys("a", "b");
    let standby = fed.spawn_node(GROUP, "127.0.0.1:0", "b", &["--store", &url]);
    assert!(
        wait_for(Duration::from_secs(20), || standby
            .log()
            .contains("waiting for it")),
        "the second node did not become a standby: {}",
        standby.log()
    );
    fed.join_when_listed("alice", GROUP);
    fed.join_when_listed("bob", GROUP);

    // A few MiB: several of the protocol's chunks, and several rows of 1 MiB in the database.
    let dir = tempfile::tempdir().expect("tmp");
    let data = content((5 << 20) + 12_345);
    let digest = digest_of(&data);
    let src = dir.path().join("report.bin");
    std::fs::write(&src, &data).expect("write");
    let src = src.to_str().expect("utf-8");
    let sent = ok(fed.cli("alice", &["send_file", GROUP, src], ""));
    let seq = seq_of(&sent.stdout);
    assert_eq!(blob_files(&fed, "a"), 1, "the active keeps its local copy");
    assert_eq!(blob_files(&fed, "b"), 0, "the standby has no file of it");

    active.kill9();
    let new_active = standby.wait_listening(Duration::from_secs(20));
    assert!(new_active.log().contains("took the lease"));

    // bob's saved endpoint may still be the dead node's: his run times out, looks the group
    // up again, and is run again until the standby has registered.
    let out = dir.path().join("back.bin");
    let mut last = None;
    let fetched = wait_for(Duration::from_secs(30), || {
        let run = get_file(&fed, "bob", &["--timeout", "2s"], &seq, &out);
        let done = run.code == Some(0);
        last = Some(run);
        done
    });
    assert!(fetched, "bob could not fetch the file: {last:?}");
    let back = std::fs::read(&out).expect("read the download");
    assert_eq!(back.len(), data.len());
    assert_eq!(digest_of(&back), digest, "the download differs");

    // The same content sent again at the new active is not uploaded again: it is complete.
    let mut again = None;
    let resent = wait_for(Duration::from_secs(30), || {
        let run = fed.cli("alice", &["--timeout", "2s", "send_file", GROUP, src], "");
        let done = run.code == Some(0);
        again = Some(run);
        done
    });
    assert!(resent, "alice could not send the file again: {again:?}");
    let again = again.expect("a run");
    assert_ne!(seq_of(&again.stdout), seq);
    assert_eq!(
        chunk_bytes_received(&new_active.log(), &digest),
        0,
        "the new active took the content again"
    );
}

/// Regression: with a PostgreSQL store the seal copies the file into the database before the
/// last chunk is acked, which can outlast the client's timeout; the upload then waits the seal
/// out (the node says every byte is there) instead of failing.
#[test]
fn a_seal_that_outlasts_the_client_timeout_still_completes_the_send() {
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let _node = fed.node(GROUP, "127.0.0.1:0", "a", &["--store", &url]);
    fed.join_when_listed("alice", GROUP);
    let dir = tempfile::tempdir().expect("tmp");
    let data = content(64 << 20);
    let src = dir.path().join("big.bin");
    std::fs::write(&src, &data).expect("write");
    let sent = fed.cli(
        "alice",
        &[
            "--timeout",
            "300ms",
            "send_file",
            GROUP,
            src.to_str().expect("utf-8"),
        ],
        "",
    );
    assert_eq!(sent.code, Some(0), "{sent:?}");
    let seq = seq_of(&sent.stdout);
    let out = dir.path().join("back.bin");
    ok(get_file(&fed, "alice", &[], &seq, &out));
    assert_eq!(
        digest_of(&std::fs::read(&out).expect("read")),
        digest_of(&data)
    );
}
