//! Attack suite (docs/SECURITY.md), the group node's attachments and user-cli's local files:
//! each test performs the attack against the real binaries (issue 22, findings 9, 15, 19).
//!
//! - Storage: completed content counts against its uploader's `--upload-quota`, and uploads
//!   stop at the node's free-disk reserve (`--disk-reserve-bytes`, `storage_full`).
//! - Uploads in progress: each belongs to the key that declared it; another member's chunks
//!   and declarations of the same digest go to an upload of their own.
//! - user-cli's state (its private groups, their endpoints and keys) is 0600 in a 0700
//!   directory, and a looser one is tightened.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_proto::wire::{ErrorCode, Sha256Digest, UserName};
use agora_tests::{CliRun, Federation, Server};
use sha2::{Digest, Sha256};

const GROUP: &str = "Cool Group";

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The modes of the state directory and of every file in it.
fn state_modes(dir: &Path) -> (u32, Vec<(String, u32)>) {
    let mut files: Vec<(String, u32)> = std::fs::read_dir(dir)
        .expect("read the state directory")
        .map(|e| {
            let path = e.expect("entry").path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, mode(&path))
        })
        .collect();
    files.sort();
    (mode(dir), files)
}

#[test]
fn user_cli_state_is_private_from_creation_and_a_looser_one_is_tightened() {
    let fed = Federation::start("200ms");
    let _node = fed.node(GROUP, "127.0.0.1:0", "cool", &[]);
    let state = Path::new(&fed.state_dir()).to_owned();
    assert!(!state.exists(), "no state before the first run");

    // A fresh run (a join writes the state: the group, its endpoint and key).
    fed.join_when_listed("alice", GROUP);
    let (dir, files) = state_modes(&state);
    assert_eq!(dir, 0o700, "the state directory: {dir:o}");
    assert!(
        files.iter().any(|(name, _)| name == "alice.json"),
        "{files:?}"
    );
    for (name, m) in &files {
        assert_eq!(*m, 0o600, "{name}: {m:o}");
    }

    // A state left readable by others (an older build, a copy, a umask of 022) is tightened
    // at the next run, with a word on stderr.
    chmod(&state, 0o755);
    chmod(&state.join("alice.json"), 0o644);
    std::fs::write(state.join("bob.json"), b"{}").expect("write");
    chmod(&state.join("bob.json"), 0o644);
    // Files that are not user-cli's (a state directory the user keeps scripts in, ~/bin
    // say) keep their modes: a script stays executable.
    let foreign = [("script", 0o755), ("notes.txt", 0o644)];
    for (name, m) in foreign {
        std::fs::write(state.join(name), b"#!/bin/sh\n").expect("write");
        chmod(&state.join(name), m);
    }
    let run = ok(fed.cli("alice", &["send", GROUP, "hello"], ""));
    assert!(run.stderr.contains("tightened"), "{run:?}");
    let (dir, files) = state_modes(&state);
    assert_eq!(dir, 0o700, "the state directory: {dir:o}");
    for (name, m) in &files {
        let want = foreign
            .iter()
            .find(|(f, _)| f == name)
            .map_or(0o600, |(_, m)| *m);
        assert_eq!(*m, want, "{name}: {m:o}");
    }
    // Nothing was lost on the way.
    let text = std::fs::read_to_string(state.join("alice.json")).expect("state");
    assert!(text.contains(GROUP), "{text}");
}

fn digest_of(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest::from_bytes(Sha256::digest(bytes).into())
}

/// Deterministic content, different for each seed.
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 2_654_435_761 % 251) as u8 ^ seed)
        .collect()
}

fn options() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(5),
        attempts: 2,
    }
}

fn client(fed: &Federation, node: &Server, user: &str) -> GroupClient {
    GroupClient::new(
        &zmq::Context::new(),
        &node.endpoint,
        UserName::new(user).expect("name"),
        None,
        options(),
    )
    .with_curve(fed.curve(user, node))
}

/// A member: joined, with a client of its own.
fn member(fed: &Federation, node: &Server, user: &str) -> GroupClient {
    let mut c = client(fed, node, user);
    c.join().expect("join");
    c
}

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// `upload_status` of `digest` as `user` (GroupClient has no call for it).
fn upload_status(
    fed: &Federation,
    node: &Server,
    user: &str,
    digest: Sha256Digest,
) -> Result<agora_proto::wire::UploadReply, ClientError> {
    agora_common::client::ReqClient::new(&zmq::Context::new(), &node.endpoint, options())
        .with_curve(fed.curve(user, node))
        .call::<agora_proto::action::call::UploadStatus>(&agora_proto::wire::UploadStatusRequest {
            group: None,
            user: UserName::new(user).expect("name"),
            sha256: digest,
        })
}

/// Uploads all of `data` (declared, then in chunks of 256 KiB); returns the last reply.
fn upload_all(c: &mut GroupClient, data: &[u8]) -> agora_proto::wire::UploadReply {
    let digest = digest_of(data);
    let mut reply = c.upload(digest, data.len() as u64).expect("declare");
    let mut at = reply.have as usize;
    while at < data.len() {
        let end = (at + (256 << 10)).min(data.len());
        reply = c
            .upload_chunk(digest, at as u64, data[at..end].to_vec())
            .expect("chunk");
        at = end;
    }
    reply
}

fn download_all(c: &mut GroupClient, digest: Sha256Digest) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let (reply, bytes) = c
            .download(digest, out.len() as u64, None)
            .expect("download");
        assert!(!bytes.is_empty() || out.len() as u64 == reply.size);
        out.extend(bytes);
        if out.len() as u64 >= reply.size {
            return out;
        }
    }
}

/// Finding 9: with `--upload-quota 1000`, five 900-byte uploads used to complete and stay
/// (only unfinished uploads counted). Kept content counts now, until the node lets it go.
#[test]
fn completed_uploads_count_against_the_quota_until_the_content_goes() {
    let fed = Federation::start("200ms");
    // Contents no message carries go after --upload-ttl (swept as often).
    let node = fed.node(
        GROUP,
        "127.0.0.1:0",
        "cool",
        &["--upload-quota", "1000", "--upload-ttl", "3s"],
    );
    let mut alice = member(&fed, &node, "alice");
    let mut bob = member(&fed, &node, "bob");

    let first = content(900, 1);
    let done = upload_all(&mut alice, &first);
    assert!(done.complete, "{done:?}");
    // The attack: more completed uploads, never sent in a message. The next one is refused
    // before any byte is stored, however many completed before.
    let mut refused = 0;
    for seed in 2..=5 {
        let more = content(900, seed);
        let result = alice.upload(digest_of(&more), more.len() as u64);
        assert_eq!(code(result), ErrorCode::LimitReached, "upload {seed}");
        refused += 1;
    }
    assert_eq!(refused, 4);
    // Even a small one: 900 kept + 101 > 1000.
    assert_eq!(
        code(alice.upload(digest_of(b"small"), 101)),
        ErrorCode::LimitReached
    );
    assert!(download_all(&mut alice, digest_of(&first)) == first);

    // The quota is per member: bob's own upload goes through, and declaring alice's content
    // costs him nothing (it is stored once, charged to alice).
    let his = content(900, 9);
    assert!(upload_all(&mut bob, &his).complete);
    let shared = bob
        .upload(digest_of(&first), first.len() as u64)
        .expect("declare alice's content");
    assert!(shared.complete, "{shared:?}");

    // Once the node lets the content go (no message carries it), alice has her room back.
    let again = content(900, 6);
    let mut last = None;
    let freed = agora_tests::wait_for(Duration::from_secs(20), || {
        let result = alice.upload(digest_of(&again), again.len() as u64);
        let ok = result.is_ok();
        last = Some(result);
        ok
    });
    assert!(freed, "alice's quota was never freed: {last:?}");
    assert_eq!(
        code(alice.download(digest_of(&first), 0, None)),
        ErrorCode::NotFound
    );
}

/// Finding 9, the node's share: a reserve of free disk that uploads never take.
#[test]
fn uploads_stop_at_the_disk_reserve_with_storage_full() {
    let fed = Federation::start("200ms");
    // A reserve larger than any disk here: the node is always "short of disk".
    let node = fed.node(
        GROUP,
        "127.0.0.1:0",
        "cool",
        &["--disk-reserve-bytes", &(1u64 << 60).to_string()],
    );
    let mut alice = member(&fed, &node, "alice");
    let data = content(1000, 3);
    assert_eq!(
        code(alice.upload(digest_of(&data), data.len() as u64)),
        ErrorCode::StorageFull
    );
    // Nothing was declared: a chunk finds no upload.
    assert_eq!(
        code(alice.upload_chunk(digest_of(&data), 0, data.clone())),
        ErrorCode::NotFound
    );
    // Messages still go: the reserve is the log's.
    alice
        .send(serde_json::value::to_raw_value(&"still here").expect("json"))
        .expect("a message while uploads are refused");
    assert!(
        node.log().contains("the disk is at its reserve"),
        "{}",
        node.log()
    );
}

/// Finding 15: another member who knows the digest sent a junk last chunk (the upload
/// ended in `digest_mismatch`, discarded) or declared it with another size (blocked until
/// `--upload-ttl`). Uploads in progress belong to the key that declared them now.
#[test]
fn another_member_can_neither_spoil_nor_block_an_upload_in_progress() {
    let fed = Federation::start("200ms");
    let node = fed.node(GROUP, "127.0.0.1:0", "cool", &[]);
    let mut alice = member(&fed, &node, "alice");
    let mut mallory = member(&fed, &node, "mallory");
    let data = content(600 << 10, 7);
    let digest = digest_of(&data);
    let half = 256 << 10;

    // Alice declares and sends the first part.
    alice.upload(digest, data.len() as u64).expect("declare");
    alice
        .upload_chunk(digest, 0, data[..half].to_vec())
        .expect("first part");

    // Mallory's junk, exactly where alice's upload stands and up to its end: not hers.
    let junk = vec![0xAA; data.len() - half];
    assert_eq!(
        code(mallory.upload_chunk(digest, half as u64, junk.clone())),
        ErrorCode::NotFound
    );
    // Nor does she learn how far alice got.
    assert_eq!(
        code(upload_status(&fed, &node, "mallory", digest)),
        ErrorCode::NotFound
    );
    // Declaring the digest with another size gives her an upload of her own.
    let hers = mallory.upload(digest, 10).expect("her own upload");
    assert_eq!((hers.have, hers.size, hers.complete), (0, 10, false));
    assert_eq!(
        code(mallory.upload_chunk(digest, 0, vec![0; 10])),
        ErrorCode::DigestMismatch,
        "her junk spoils only her own upload"
    );
    mallory.upload(digest, 10).expect("declared again");

    // Alice's upload is where she left it, and completes.
    let status = upload_status(&fed, &node, "alice", digest).expect("alice's status");
    assert_eq!((status.have, status.size), (half as u64, data.len() as u64));
    let resumed = alice.upload(digest, data.len() as u64).expect("resume");
    assert_eq!(resumed.have, half as u64);
    let mut at = half;
    let mut last = None;
    while at < data.len() {
        let end = (at + (256 << 10)).min(data.len());
        last = Some(
            alice
                .upload_chunk(digest, at as u64, data[at..end].to_vec())
                .expect("chunk"),
        );
        at = end;
    }
    assert!(last.is_some_and(|r| r.complete), "{last:?}");
    assert!(
        download_all(&mut alice, digest) == data,
        "not byte-for-byte"
    );
    // A complete content is shared: mallory sees it complete, and reads the same bytes.
    let shared = upload_status(&fed, &node, "mallory", digest).expect("complete");
    assert!(
        shared.complete && shared.size == data.len() as u64,
        "{shared:?}"
    );
    assert!(download_all(&mut mallory, digest) == data);

    // Declared first with a wrong size, a digest no longer blocks its real uploader.
    let other = content(300 << 10, 8);
    let other_digest = digest_of(&other);
    mallory.upload(other_digest, 1).expect("mallory squats");
    let done = upload_all(&mut alice, &other);
    assert!(done.complete, "{done:?}");
    assert!(download_all(&mut alice, other_digest) == other);
}

/// Unfinished uploads are files on the node, and each `upload` reads the caller's: one
/// member declaring thousands of 1-byte uploads is stopped at `--max-uploads-per-member`,
/// and that is its own cap only.
#[test]
fn one_member_cannot_declare_unfinished_uploads_without_end() {
    let fed = Federation::start("200ms");
    let node = fed.node(
        GROUP,
        "127.0.0.1:0",
        "cool",
        &["--max-uploads-per-member", "3"],
    );
    let mut mallory = member(&fed, &node, "mallory");
    let mut alice = member(&fed, &node, "alice");
    let mut accepted = 0;
    let refused = loop {
        let digest = digest_of(format!("never sent {accepted}").as_bytes());
        match mallory.upload(digest, 1) {
            Ok(_) => accepted += 1,
            Err(ClientError::Server(e)) => break e,
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(
            accepted <= 3,
            "more than 3 unfinished uploads were accepted"
        );
    };
    assert_eq!(refused.code, ErrorCode::LimitReached, "{refused}");
    assert_eq!(accepted, 3);
    // Resuming one of hers costs nothing; alice's uploads are hers to make.
    mallory
        .upload(digest_of(b"never sent 0"), 1)
        .expect("resume");
    let data = content(1000, 5);
    assert!(upload_all(&mut alice, &data).complete);
}

/// The charges are the node's record, not its memory: a restarted node (its files, or with
/// PostgreSQL its rows) still counts what a member uploaded before.
#[test]
fn kept_content_still_counts_after_the_node_restarts() {
    let fed = Federation::start("200ms");
    let args = ["--upload-quota", "1000"];
    let mut node = fed.node(GROUP, "127.0.0.1:0", "cool", &args);
    let addr = node.host_port().to_owned();
    let mut alice = member(&fed, &node, "alice");
    let first = content(900, 1);
    assert!(upload_all(&mut alice, &first).complete);
    node.kill9();

    let node = fed.node(GROUP, &addr, "cool", &args);
    let mut alice = client(&fed, &node, "alice");
    let more = content(900, 2);
    assert_eq!(
        code(alice.upload(digest_of(&more), more.len() as u64)),
        ErrorCode::LimitReached
    );
    assert!(download_all(&mut alice, digest_of(&first)) == first);
}
