//! Attachments' bytes through the real group node (PROTOCOL §6.9): chunked, resumable,
//! content-addressed uploads and ranged downloads, members only.

use std::path::Path;
use std::time::Duration;

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_proto::wire::{
    ErrorCode, Sha256Digest, UserName, CHUNK_BYTES, MAX_CHUNK_BYTES, UPLOAD_WINDOW,
};
use agora_tests::{Federation, Server};
use sha2::{Digest, Sha256};

fn digest_of(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest::from_bytes(Sha256::digest(bytes).into())
}

/// Deterministic content that no two sizes share a prefix pattern with.
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 2_654_435_761 % 251) as u8 ^ seed)
        .collect()
}

fn client(fed: &Federation, node: &Server, user: &str) -> GroupClient {
    let ctx = zmq::Context::new();
    GroupClient::new(
        &ctx,
        &node.endpoint,
        UserName::new(user).expect("name"),
        None,
        ClientOptions {
            timeout: Duration::from_secs(3),
            attempts: 3,
        },
    )
    .with_curve(fed.curve(user, node))
}

fn code(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Sends `data[from..]` in the node's chunk size; returns the last reply.
fn send_from(
    c: &mut GroupClient,
    digest: Sha256Digest,
    data: &[u8],
    from: u64,
) -> agora_proto::wire::UploadReply {
    let mut at = from as usize;
    let mut last = None;
    while at < data.len() {
        let end = (at + (256 << 10)).min(data.len());
        last = Some(
            c.upload_chunk(digest, at as u64, data[at..end].to_vec())
                .expect("chunk"),
        );
        at = end;
    }
    last.expect("at least one chunk")
}

fn download_all(c: &mut GroupClient, digest: Sha256Digest) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let (reply, bytes) = c
            .download(digest, out.len() as u64, None)
            .expect("download");
        out.extend(bytes);
        if out.len() as u64 >= reply.size {
            return out;
        }
    }
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

/// Bytes of `digest` the node's log shows it received as chunks (`what` = "upload chunk",
/// stored or refused) or served as ranges ("download range"): its `agora::transfer` events.
fn transferred(log: &str, digest: &Sha256Digest, what: &str) -> u64 {
    let digest = format!("digest={digest}");
    log.lines()
        .filter(|l| l.contains(what) && l.contains(&digest))
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("len="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no len in {l:?}"))
        })
        .sum()
}

/// One window of upload chunks, and of download ranges: the most a resumed transfer may send
/// again (PROTOCOL §6.9).
const UPLOAD_AGAIN: u64 = CHUNK_BYTES as u64 * UPLOAD_WINDOW as u64;
const DOWNLOAD_AGAIN: u64 = MAX_CHUNK_BYTES as u64 * UPLOAD_WINDOW as u64;

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The length of the file at `path` (0 when there is none).
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn blob_count(fed: &Federation, tag: &str) -> usize {
    let root = fed.dir.path().join(format!("data-{tag}/blobs/sha256"));
    std::fs::read_dir(root)
        .map(|dirs| {
            dirs.flatten()
                .map(|d| std::fs::read_dir(d.path()).map_or(0, Iterator::count))
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_file_goes_up_in_chunks_comes_back_equal_and_is_stored_once() {
    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let mut alice = client(&fed, &node, "alice");
    let mut bob = client(&fed, &node, "bob");
    alice.join().expect("join");
    bob.join().expect("join");

    let data = content(8 << 20, 7);
    let digest = digest_of(&data);
    let start = alice.upload(digest, data.len() as u64).expect("declare");
    assert_eq!((start.have, start.complete), (0, false));
    // Nothing is served before the content is complete.
    assert_eq!(code(bob.download(digest, 0, None)), ErrorCode::NotFound);
    let done = send_from(&mut alice, digest, &data, 0);
    assert!(done.complete && done.have == data.len() as u64, "{done:?}");

    let back = download_all(&mut bob, digest);
    assert_eq!(digest_of(&back), digest);
    assert!(back == data);
    // A range in the middle.
    let (reply, bytes) = bob.download(digest, 1000, Some(10)).expect("range");
    assert_eq!((reply.offset, reply.length), (1000, 10));
    assert_eq!(bytes, data[1000..1010]);

    // The same content from another member is not sent again, and is stored once.
    let again = bob
        .upload(digest, data.len() as u64)
        .expect("declare again");
    assert!(again.complete);
    assert_eq!(blob_count(&fed, "cool"), 1);
}

#[test]
fn bad_chunks_get_specific_errors_and_corrupt_nothing() {
    let fed = Federation::start("200ms");
    let node = fed.node(
        "Cool Group",
        "127.0.0.1:0",
        "cool",
        &["--max-file-bytes", "1000000", "--upload-quota", "700000"],
    );
    let mut alice = client(&fed, &node, "alice");
    alice.join().expect("join");
    let data = content(300_000, 1);
    let digest = digest_of(&data);

    assert_eq!(code(alice.upload(digest, 2_000_000)), ErrorCode::TooLarge);
    alice.upload(digest, data.len() as u64).expect("declare");
    // Unfinished uploads count against the member's quota (700,000 bytes here).
    assert_eq!(
        code(alice.upload(digest_of(b"another"), 500_000)),
        ErrorCode::LimitReached
    );
    assert_eq!(
        code(alice.upload_chunk(digest, 10, data[..100].to_vec())),
        ErrorCode::BadOffset
    );
    assert_eq!(
        code(alice.upload_chunk(digest, 0, content(300_001, 1))),
        ErrorCode::InvalidField
    );
    assert_eq!(
        code(alice.upload_chunk(digest_of(b"undeclared"), 0, vec![1])),
        ErrorCode::NotFound
    );
    // The upload is where it was: nothing of the bad chunks was kept.
    assert_eq!(
        alice
            .upload(digest, data.len() as u64)
            .expect("status")
            .have,
        0
    );

    // Bytes that do not hash to the declared digest are discarded at the end.
    let liar = digest_of(b"what I claim");
    alice.upload(liar, data.len() as u64).expect("declare");
    alice
        .upload_chunk(liar, 0, data[..200_000].to_vec())
        .expect("first part");
    assert_eq!(
        code(alice.upload_chunk(liar, 200_000, data[200_000..].to_vec())),
        ErrorCode::DigestMismatch
    );
    assert_eq!(code(alice.download(liar, 0, None)), ErrorCode::NotFound);
    assert_eq!(blob_count(&fed, "cool"), 0);
}

#[test]
fn outsiders_learn_nothing_and_an_upload_resumes_after_a_kill_9() {
    let fed = Federation::start("200ms");
    let mut node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let addr = node.host_port().to_owned();
    let mut alice = client(&fed, &node, "alice");
    alice.join().expect("join");
    let data = content(3 << 20, 9);
    let digest = digest_of(&data);
    alice.upload(digest, data.len() as u64).expect("declare");
    let half = 1 << 20;
    let partial = alice
        .upload_chunk(digest, 0, data[..half].to_vec())
        .expect("first chunks");
    assert_eq!(partial.have, half as u64);

    // A non-member gets the same answer for a content that exists and one that does not.
    let mut mallory = client(&fed, &node, "mallory");
    assert_eq!(
        code(mallory.download(digest, 0, None)),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(mallory.download(digest_of(b"nothing"), 0, None)),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(mallory.upload(digest, data.len() as u64)),
        ErrorCode::NotMember
    );

    // The node dies; restarted on the same data, it says where the upload stands.
    node.kill9();
    let node = fed.node("Cool Group", &addr, "cool", &[]);
    let mut alice = client(&fed, &node, "alice");
    let resumed = alice.upload(digest, data.len() as u64).expect("resume");
    assert_eq!(resumed.have, half as u64, "{resumed:?}");
    let done = send_from(&mut alice, digest, &data, resumed.have);
    assert!(done.complete);
    assert!(download_all(&mut alice, digest) == data);
}

#[test]
fn a_message_carries_a_file_and_retention_deletes_the_content_it_frees() {
    use agora_proto::id::MessageId;
    use agora_proto::wire::{Attachment, HistoryQuery};
    use serde_json::value::RawValue;

    let fed = Federation::start("200ms");
    let node = fed.node(
        "Cool Group",
        "127.0.0.1:0",
        "cool",
        &["--max-messages", "2", "--upload-ttl", "1s"],
    );
    let mut alice = client(&fed, &node, "alice");
    alice.join().expect("join");
    let data = content(100_000, 3);
    let digest = digest_of(&data);
    let file = Attachment {
        sha256: digest,
        size: data.len() as u64,
        name: "report.pdf".into(),
        media_type: "application/pdf".into(),
    };
    let caption = || RawValue::from_string("\"the report\"".into()).expect("json");

    // The content must be there first.
    assert_eq!(
        code(alice.send_attachment(file.clone(), caption(), MessageId::new_v7())),
        ErrorCode::NotFound
    );
    alice.upload(digest, data.len() as u64).expect("declare");
    send_from(&mut alice, digest, &data, 0);
    let bad_type = Attachment {
        media_type: "pdf".into(),
        ..file.clone()
    };
    assert_eq!(
        code(alice.send_attachment(bad_type, caption(), MessageId::new_v7())),
        ErrorCode::InvalidField
    );
    let id = MessageId::new_v7();
    let ack = alice
        .send_attachment(file.clone(), caption(), id)
        .expect("a file message");
    // A retry is the same message; the same id with another file is a conflict.
    assert!(
        alice
            .send_attachment(file.clone(), caption(), id)
            .expect("retry")
            .duplicate
    );
    let other = Attachment {
        name: "other.pdf".into(),
        ..file.clone()
    };
    assert_eq!(
        code(alice.send_attachment(other, caption(), id)),
        ErrorCode::IdConflict
    );
    let page = alice
        .get_messages(HistoryQuery::AfterSeq(ack.seq - 1), None)
        .expect("history");
    assert_eq!(page.messages[0].attachment.as_ref(), Some(&file));
    assert_eq!(page.messages[0].body.get(), "\"the report\"");

    // A content no message carries goes once older than the upload TTL; the one the kept
    // message carries stays, however old.
    let loose = content(5_000, 4);
    let loose_digest = digest_of(&loose);
    alice
        .upload(loose_digest, loose.len() as u64)
        .expect("declare");
    send_from(&mut alice, loose_digest, &loose, 0);
    assert_eq!(blob_count(&fed, "cool"), 2);
    assert!(
        agora_tests::wait_for(Duration::from_secs(20), || blob_count(&fed, "cool") == 1),
        "the loose content was not deleted"
    );
    assert_eq!(
        code(alice.download(loose_digest, 0, None)),
        ErrorCode::NotFound
    );
    assert!(
        alice.download(digest, 0, Some(10)).is_ok(),
        "the carried content stays"
    );
    // Two newer messages push it out of the log (--max-messages 2); the next sweep, once
    // the content is older than the upload TTL, deletes it.
    for text in ["one", "two"] {
        alice
            .send(RawValue::from_string(format!("\"{text}\"")).expect("json"))
            .expect("send");
    }
    assert!(
        agora_tests::wait_for(Duration::from_secs(20), || blob_count(&fed, "cool") == 0),
        "the freed content was not deleted"
    );
    assert_eq!(code(alice.download(digest, 0, None)), ErrorCode::NotFound);
}

#[test]
fn user_cli_sends_and_gets_a_file_resuming_a_partial_download_and_refusing_a_corrupt_one() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    fed.join_when_listed("bob", "Cool Group");
    let dir = tempfile::tempdir().expect("tmp");
    let data = content(3 << 20, 5);
    let src = dir.path().join("data.bin");
    std::fs::write(&src, &data).expect("write");
    // Bob watches live, as people (human lines, not --json).
    let mut watch = fed.spawn_cli("bob", &["watch", "Cool Group"]);
    assert!(
        watch.wait_stderr("watching", Duration::from_secs(20)),
        "bob's watch never subscribed: {:?}",
        watch.errors
    );

    let sent = fed.cli(
        "alice",
        &[
            "send_file",
            "Cool Group",
            src.to_str().expect("utf-8"),
            "--caption",
            "the data",
        ],
        "",
    );
    assert_eq!(sent.code, Some(0), "{sent:?}");
    let seq = seq_of(&sent.stdout);
    let line = "alice: [file data.bin, 3.0 MiB, application/octet-stream] the data";
    let shown = fed.cli("bob", &["messages", "Cool Group"], "");
    assert!(shown.stdout.contains(line), "{shown:?}");
    assert!(
        watch.wait_lines(Duration::from_secs(20), |lines| lines
            .iter()
            .any(|l| l.contains(&format!("#{seq} {line}")))),
        "bob's watch showed {:?}",
        watch.lines
    );
    watch.interrupt();

    let get = |out: &Path| {
        fed.cli(
            "bob",
            &[
                "get_file",
                "Cool Group",
                &seq,
                "--out",
                out.to_str().expect("utf-8"),
            ],
            "",
        )
    };
    let whole = dir.path().join("whole.bin");
    let run = get(&whole);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(std::fs::read(&whole).expect("read") == data);

    // A partial download left by an interruption is resumed from its length; with --json,
    // progress comes as events on stdout, from where it resumed to the end, then the result.
    let resumed = dir.path().join("resumed.bin");
    std::fs::write(dir.path().join("resumed.bin.agora-part"), &data[..1 << 20]).expect("part");
    let run = fed.cli(
        "bob",
        &[
            "--json",
            "get_file",
            "Cool Group",
            &seq,
            "--out",
            resumed.to_str().expect("utf-8"),
        ],
        "",
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(std::fs::read(&resumed).expect("read") == data);
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let done: Vec<u64> = lines
        .iter()
        .filter(|v| v["event"] == "progress")
        .map(|v| {
            assert_eq!(v["total"], data.len() as u64, "{v}");
            v["done"].as_u64().expect("done")
        })
        .collect();
    assert_eq!(done.first(), Some(&(1 << 20)), "{}", run.stdout);
    assert_eq!(done.last(), Some(&(data.len() as u64)), "{}", run.stdout);
    assert!(done.windows(2).all(|w| w[0] < w[1]), "{done:?}");
    assert!(
        lines.last().is_some_and(|v| v.get("saved").is_some()),
        "{}",
        run.stdout
    );
    assert!(!dir.path().join("resumed.bin.agora-part").exists());

    // A corrupt partial file fails the digest check: nothing stands at the target, and the
    // next run starts over and succeeds.
    let target = dir.path().join("checked.bin");
    let part = dir.path().join("checked.bin.agora-part");
    std::fs::write(&part, vec![0u8; 1 << 20]).expect("bad part");
    let run = get(&target);
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(!target.exists() && !part.exists(), "{run:?}");
    let run = get(&target);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(std::fs::read(&target).expect("read") == data);

    // The same in the prompt: a session line sends a file and another gets it back.
    let small = dir.path().join("note.txt");
    std::fs::write(&small, b"a small file").expect("write");
    let back = dir.path().join("note-back.txt");
    let script = format!(
        "send_file \"Cool Group\" {} --caption \"from the prompt\"\n\
         get_file \"Cool Group\" {} --out {}\n\
         messages \"Cool Group\" --latest 1\n",
        small.display(),
        seq.parse::<u64>().expect("a seq") + 1,
        back.display()
    );
    let run = fed.cli("bob", &[], &script);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout
            .contains("bob: [file note.txt, 12 B, text/plain] from the prompt"),
        "{run:?}"
    );
    assert_eq!(std::fs::read(&back).expect("read"), b"a small file");
}

/// The peak resident set size of process `pid`, in bytes (`VmHWM` of `/proc/PID/status`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    line.split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse::<u64>().ok())
        .expect("a number")
        * 1024
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn a_64_mib_upload_killed_midway_resumes_and_the_node_stays_small() {
    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    let dir = tempfile::tempdir().expect("tmp");
    let data = content(64 << 20, 11);
    let digest = digest_of(&data);
    let src = dir.path().join("big.bin");
    std::fs::write(&src, &data).expect("write");
    let src_arg = src.to_str().expect("utf-8");

    // The client is frozen as soon as the node holds part of the file, then killed.
    let mut upload = fed.spawn_cli("alice", &["send_file", "Cool Group", src_arg]);
    let mut probe = client(&fed, &node, "alice");
    let started = agora_tests::wait_for(Duration::from_secs(30), || {
        probe
            .upload(digest, data.len() as u64)
            .is_ok_and(|r| r.have > 0)
    });
    assert!(started, "the upload never began");
    signal(upload.pid(), "-STOP");
    let at_kill = probe.upload(digest, data.len() as u64).expect("status");
    assert!(
        !at_kill.complete,
        "the client finished before it could be stopped"
    );
    signal(upload.pid(), "-KILL");
    assert!(upload.wait_exit(Duration::from_secs(10)).is_some());

    // Run again: it goes on from where the node stands, and the file arrives whole.
    let run = fed.cli("alice", &["send_file", "Cool Group", src_arg], "");
    assert_eq!(run.code, Some(0), "{run:?}");
    // Its first progress line says where it started.
    let first_progress: u64 = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("big.bin: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a progress line");
    assert!(
        first_progress >= at_kill.have,
        "started at {first_progress}, the node held {}",
        at_kill.have
    );
    let out = dir.path().join("back.bin");
    let seq = seq_of(&run.stdout);
    let got = fed.cli(
        "alice",
        &[
            "get_file",
            "Cool Group",
            &seq,
            "--out",
            out.to_str().expect("utf-8"),
        ],
        "",
    );
    assert_eq!(got.code, Some(0), "{got:?}");
    assert!(std::fs::read(&out).expect("read") == data);
    // What the killed run had in flight is all that was sent twice.
    let received = transferred(&node.log(), &digest, "upload chunk");
    assert!(
        received >= data.len() as u64 && received - data.len() as u64 <= UPLOAD_AGAIN,
        "the node received {received} bytes of a {}-byte file",
        data.len()
    );
    eprintln!(
        "upload, client killed: {} bytes sent again",
        received - data.len() as u64
    );
    // One chunk at a time in memory: the node never held the file.
    let peak = peak_rss(node.pid());
    assert!(peak < 64 << 20, "node peak RSS {} MiB", peak >> 20);
}

/// Once `started` holds, freezes the node (so that `run`, a user-cli transfer, cannot finish)
/// and kills it: the client finds its node gone and exits with an error. Returns the dead
/// node's log.
fn kill_node_under(
    run: &mut agora_tests::Streaming,
    node: &mut Server,
    started: impl FnMut() -> bool,
) -> String {
    assert!(
        agora_tests::wait_for(Duration::from_secs(60), started),
        "the transfer never began"
    );
    signal(node.pid(), "-STOP");
    node.kill9();
    let log = node.log();
    let code = run.wait_exit(Duration::from_secs(60));
    assert!(
        matches!(code, Some(Some(c)) if c != 0),
        "the client did not fail without its node: {code:?}"
    );
    log
}

#[test]
fn transfers_cut_by_a_kill_9_resume_and_send_at_most_one_window_again() {
    let fed = Federation::start("200ms");
    let mut node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let addr = node.host_port().to_owned();
    fed.join_when_listed("alice", "Cool Group");
    let dir = tempfile::tempdir().expect("tmp");
    let data = content(48 << 20, 23);
    let size = data.len() as u64;
    let digest = digest_of(&data);
    let src = dir.path().join("cut.bin");
    std::fs::write(&src, &data).expect("write");
    let src_arg = src.to_str().expect("utf-8");
    let quick = ["--timeout", "2s"];

    // An upload whose node dies under it: run again once the node is back, it goes on from
    // where the node stands.
    let mut probe = client(&fed, &node, "alice");
    let mut upload = fed.spawn_cli(
        "alice",
        &[&quick[..], &["send_file", "Cool Group", src_arg]].concat(),
    );
    let first = kill_node_under(&mut upload, &mut node, || {
        probe.upload(digest, size).is_ok_and(|r| r.have > 0)
    });
    let before = transferred(&first, &digest, "upload chunk");
    assert!(
        before > 0 && before < size,
        "{before} of {size} before the kill"
    );
    node = fed.node("Cool Group", &addr, "cool", &[]);
    let sent = fed.cli("alice", &["send_file", "Cool Group", src_arg], "");
    assert_eq!(sent.code, Some(0), "{sent:?}");
    let received = before + transferred(&node.log(), &digest, "upload chunk");
    assert!(
        received >= size && received - size <= UPLOAD_AGAIN,
        "the nodes received {received} bytes of a {size}-byte file"
    );
    eprintln!("upload, node killed: {} bytes sent again", received - size);
    let seq = seq_of(&sent.stdout);

    // A download whose client is killed, then one whose node dies under it: each run again
    // goes on from the partial file's length.
    let get = |out: &Path| -> Vec<String> {
        [
            &quick[..],
            &[
                "get_file",
                "Cool Group",
                &seq,
                "--out",
                out.to_str().expect("utf-8"),
            ],
        ]
        .concat()
        .iter()
        .map(|a| (*a).to_owned())
        .collect()
    };
    let out = dir.path().join("back.bin");
    let part = dir.path().join("back.bin.agora-part");
    let served_before = transferred(&node.log(), &digest, "download range");
    let mut download = fed.spawn_cli("alice", &args(&get(&out)));
    assert!(
        agora_tests::wait_for(Duration::from_secs(60), || file_len(&part) > 0),
        "the download never began"
    );
    signal(download.pid(), "-STOP");
    assert!(
        file_len(&part) < size,
        "the download finished before the kill"
    );
    signal(download.pid(), "-KILL");
    assert!(download.wait_exit(Duration::from_secs(10)).is_some());
    let run = fed.cli("alice", &args(&get(&out)), "");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(std::fs::read(&out).expect("read") == data);
    let served = transferred(&node.log(), &digest, "download range") - served_before;
    assert!(
        served >= size && served - size <= DOWNLOAD_AGAIN,
        "the node served {served} bytes of a {size}-byte file to a killed and a resumed run"
    );
    eprintln!(
        "download, client killed: {} bytes sent again",
        served - size
    );

    let out = dir.path().join("again.bin");
    let part = dir.path().join("again.bin.agora-part");
    let served_before = transferred(&node.log(), &digest, "download range");
    let mut download = fed.spawn_cli("alice", &args(&get(&out)));
    let first = kill_node_under(&mut download, &mut node, || file_len(&part) > 0);
    let partial = file_len(&part);
    assert!(
        partial > 0 && partial < size,
        "{partial} of {size} before the kill"
    );
    node = fed.node("Cool Group", &addr, "cool", &[]);
    let run = fed.cli("alice", &args(&get(&out)), "");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(std::fs::read(&out).expect("read") == data);
    assert!(!part.exists());
    let served = transferred(&first, &digest, "download range") - served_before
        + transferred(&node.log(), &digest, "download range");
    assert!(
        served >= size && served - size <= DOWNLOAD_AGAIN,
        "the nodes served {served} bytes of a {size}-byte file"
    );
    eprintln!("download, node killed: {} bytes sent again", served - size);
}

#[test]
fn a_seal_after_a_restart_verifies_what_it_did_not_hash_and_refuses_a_mismatch() {
    let fed = Federation::start("200ms");
    let mut node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    let addr = node.host_port().to_owned();
    let mut alice = client(&fed, &node, "alice");
    alice.join().expect("join");
    let data = content(1 << 20, 31);
    let liar = digest_of(b"not these bytes");
    alice.upload(liar, data.len() as u64).expect("declare");
    send_from(&mut alice, liar, &data[..512 << 10], 0);

    // Restarted, the node has lost the hash of the first half: the seal reads it back, finds
    // the mismatch, and discards the upload.
    node.kill9();
    node = fed.node("Cool Group", &addr, "cool", &[]);
    let mut alice = client(&fed, &node, "alice");
    let resumed = alice.upload(liar, data.len() as u64).expect("resume");
    assert_eq!(resumed.have, 512 << 10);
    assert_eq!(
        code(alice.upload_chunk(liar, 512 << 10, data[512 << 10..].to_vec())),
        ErrorCode::DigestMismatch
    );
    assert_eq!(code(alice.download(liar, 0, None)), ErrorCode::NotFound);
    assert_eq!(blob_count(&fed, "cool"), 0);
    let again = alice
        .upload(liar, data.len() as u64)
        .expect("declare again");
    assert_eq!(
        (again.have, again.complete),
        (0, false),
        "discarded: {again:?}"
    );

    // A node that died between an upload's last byte and its seal: the next `upload` seals
    // it (verified by reading it back) before answering, and a lie found then is refused.
    node.kill9();
    let uploads = fed.dir.path().join("data-cool/blobs/uploads");
    let digest = digest_of(&data);
    // Alice's uploads (blobs.rs, Layout): named by the digest and a tag of her principal.
    let principal = format!("key:{}", fed.user_key("alice"));
    let tag: String = Sha256::digest(principal.as_bytes())[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for (name, bytes) in [(digest, &data[..]), (liar, &data[..])] {
        std::fs::write(uploads.join(format!("{name}.{tag}.part")), bytes).expect("part");
        std::fs::write(
            uploads.join(format!("{name}.{tag}.size")),
            format!("{} {principal}", bytes.len()),
        )
        .expect("size");
    }
    node = fed.node("Cool Group", &addr, "cool", &[]);
    let mut alice = client(&fed, &node, "alice");
    let sealed = alice.upload(digest, data.len() as u64).expect("sealed");
    assert!(
        sealed.complete && sealed.have == data.len() as u64,
        "{sealed:?}"
    );
    assert!(download_all(&mut alice, digest) == data);
    assert_eq!(
        code(alice.upload(liar, data.len() as u64)),
        ErrorCode::DigestMismatch
    );
    assert_eq!(code(alice.download(liar, 0, None)), ErrorCode::NotFound);
    assert_eq!(blob_count(&fed, "cool"), 1);
    drop(node);
}

#[test]
fn in_a_private_group_an_outsider_learns_nothing_of_its_files() {
    let fed = Federation::start("200ms");
    let owner = fed.user_key("alice");
    let node = fed.node(
        "Secret",
        "127.0.0.1:0",
        "secret",
        &["--private", "--owner", &owner],
    );
    let mut alice = client(&fed, &node, "alice");
    alice.join().expect("the owner joins");
    let data = content(300_000, 41);
    let digest = digest_of(&data);
    alice.upload(digest, data.len() as u64).expect("declare");
    assert!(send_from(&mut alice, digest, &data, 0).complete);

    // Not invited: every attachment action answers `not_member`, alike for a content that
    // exists and one that does not, and nothing is stored for the outsider.
    let mut mallory = client(&fed, &node, "mallory");
    let nothing = digest_of(b"nothing");
    for d in [digest, nothing] {
        assert_eq!(code(mallory.download(d, 0, None)), ErrorCode::NotMember);
        assert_eq!(code(mallory.upload(d, 10)), ErrorCode::NotMember);
        assert_eq!(
            code(mallory.upload_chunk(d, 0, b"0123456789".to_vec())),
            ErrorCode::NotMember
        );
    }
    let uploads = fed.dir.path().join("data-secret/blobs/uploads");
    assert_eq!(std::fs::read_dir(uploads).map_or(0, Iterator::count), 0);
    assert!(download_all(&mut alice, digest) == data);
}
