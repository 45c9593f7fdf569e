//! The push path against the real `group-node` binary (issue 10, items 3 and 4):
//!
//! - memory is bounded in bytes: 100 subscriptions that never read while 1 GiB of 1 MiB
//!   messages is sent; the node's RSS stays under 128 MiB, and every subscriber that then
//!   reads gets every entry exactly once (after backfill);
//! - subscription slots are fair over CURVE: fresh keys filling every slot cannot lock a
//!   long-standing member out (the same at the full scale of 1,000 keys × 16 on 10,000
//!   slots is the unit test `a_thousand_fresh_keys_cannot_lock_a_member_out` in
//!   `group-node/src/subscribers.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_common::client::{ClientCurve, ClientOptions, GroupClient};
use agora_common::keys::{Keypair, PublicKey};
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_proto::action::call;
use agora_proto::codec::{decode_reply, encode_call};
use agora_proto::id::MessageId;
use agora_proto::wire::{
    EntryKind, ErrorCode, SendAck, SendRequest, SubscribeReply, SubscribeRequest, UserName,
    WireError,
};
use agora_tests::Server;
use serde_json::value::RawValue;

/// Every receive of these tests waits at most this long.
const WAIT: Duration = Duration::from_secs(60);

fn user(n: &str) -> UserName {
    UserName::new(n).expect("name")
}

/// A directory on disk (not tmpfs: the log holds 1 GiB) under the target directory.
fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

/// Starts a `group-node` for `group` without a registry and without a rate limit, its data
/// and log in `dir`, with `extra` arguments.
fn start_node(dir: &tempfile::TempDir, group: &str, extra: &[&str]) -> Server {
    let data = dir.path().join("node");
    let mut args = vec![
        group,
        "127.0.0.1:0",
        "--no-registry",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--rate-limit",
        "0",
    ];
    args.extend_from_slice(extra);
    Server::start("group-node", &args, &dir.path().join("node.log"))
}

/// The node's resident set size, in bytes (`VmRSS` of `/proc/PID/status`).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Samples the node's RSS every 10 ms on a thread until dropped; keeps the largest.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut max, mut samples) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                if let Some(rss) = rss_bytes(pid) {
                    max = max.max(rss);
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (max, samples)
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns (largest RSS in bytes, samples taken).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A DEALER connected to the node, as a subscriber connection (CURVE with `keys`).
fn dealer(ctx: &zmq::Context, node: &Server, keys: Option<&Keypair>) -> zmq::Socket {
    let s = ctx.socket(zmq::DEALER).expect("dealer");
    s.set_linger(0).expect("linger");
    s.set_rcvtimeo(i32::try_from(WAIT.as_millis()).unwrap_or(i32::MAX))
        .expect("rcvtimeo");
    if let Some(k) = keys {
        let server: PublicKey = node.key.as_deref().expect("a key").parse().expect("key");
        s.set_curve_serverkey(server.as_bytes()).expect("serverkey");
        s.set_curve_publickey(k.public.as_bytes())
            .expect("publickey");
        s.set_curve_secretkey(k.secret_bytes()).expect("secretkey");
    }
    s.connect(&node.endpoint).expect("connect");
    s
}

/// Sends `subscribe` on `s` (as a REQ would: empty delimiter first).
fn send_subscribe(s: &zmq::Socket, who: &UserName) {
    let frames = encode_call::<call::Subscribe>(&SubscribeRequest {
        group: None,
        user: who.clone(),
        batch: true,
        acked_seq: None,
    });
    s.send_multipart(std::iter::once(Vec::new()).chain(frames), 0)
        .expect("send subscribe");
}

/// The reply to a `subscribe` sent on `s` (the first message back; nothing is pushed
/// before it).
fn subscribe_reply(s: &zmq::Socket) -> Result<SubscribeReply, WireError> {
    let frames = s.recv_multipart(0).expect("a subscribe reply in time");
    decode_reply::<SubscribeReply>(frames.get(1..).unwrap_or_default()).expect("a reply")
}

/// A JSON string body of exactly `bytes` bytes of JSON text, starting with `n`.
fn body(n: u64, bytes: usize) -> Box<RawValue> {
    let head = format!("{n:08}");
    let fill = "x".repeat(bytes - 2 - head.len());
    RawValue::from_string(format!("\"{head}{fill}\"")).expect("json")
}

/// Sends `count` messages of `bytes` as `who`, `window` in flight, each acked (it returns
/// after the last ack); returns the last seq.
fn windowed_sends(
    ctx: &zmq::Context,
    node: &Server,
    who: &UserName,
    count: u64,
    bytes: usize,
) -> u64 {
    const WINDOW: u64 = 4;
    let s = dealer(ctx, node, None);
    let (mut sent, mut acked, mut last) = (0u64, 0u64, 0u64);
    while acked < count {
        while sent < count && sent - acked < WINDOW {
            let frames = encode_call::<call::Send>(&SendRequest {
                group: None,
                user: who.clone(),
                body: body(sent, bytes),
                id: Some(MessageId::new_v7()),
                attachment: None,
            });
            s.send_multipart(std::iter::once(Vec::new()).chain(frames), 0)
                .expect("send");
            sent += 1;
        }
        let reply = s.recv_multipart(0).expect("an ack in time");
        let ack = decode_reply::<SendAck>(reply.get(1..).unwrap_or_default())
            .expect("a reply")
            .unwrap_or_else(|e| panic!("send refused: {e}"));
        last = last.max(ack.seq);
        acked += 1;
    }
    last
}

/// Takes a feed's events until it has handed on seq `last`; returns the message entries'
/// seqs and bodies' numbers, in the order received.
fn read_all(rx: &Receiver<FeedEvent>, last: u64) -> (Vec<u64>, Vec<u64>) {
    let (mut seqs, mut numbers) = (Vec::new(), Vec::new());
    let mut newest = 0;
    while newest < last {
        match rx.recv_timeout(WAIT) {
            Ok(FeedEvent::Entry { entry, .. }) => {
                newest = entry.seq;
                if entry.kind == EntryKind::Message {
                    seqs.push(entry.seq);
                    let n = entry.body.get().get(1..9).and_then(|d| d.parse().ok());
                    numbers.push(n.expect("a numbered body"));
                }
            }
            Ok(FeedEvent::Error {
                error, fatal: true, ..
            }) => panic!("the feed gave up: {error}"),
            Ok(_) => {}
            Err(_) => panic!("no entry within {WAIT:?}, at seq {newest} of {last}"),
        }
    }
    (seqs, numbers)
}

#[test]
fn a_hundred_stalled_subscriptions_keep_the_node_under_128_mib_and_readers_get_every_entry_once() {
    const SUBSCRIPTIONS: usize = 100;
    /// Feeds among them whose consumer takes nothing until every message is sent (each then
    /// reads about 1 GiB back, mostly from the log).
    const READERS: usize = 2;
    const MESSAGES: u64 = 1024;
    const BYTES: usize = 1 << 20;
    const RSS_LIMIT: u64 = 128 << 20;
    let dir = data_dir();
    let node = start_node(&dir, "push", &["--insecure"]);
    let pid = node.pid();
    let ctx = zmq::Context::new();
    let options = ClientOptions {
        timeout: WAIT,
        ..ClientOptions::default()
    };
    let client = |n: &UserName| GroupClient::new(&ctx, &node.endpoint, n.clone(), None, options);
    let names: Vec<UserName> = (0..SUBSCRIPTIONS)
        .map(|i| user(&format!("sub{i}")))
        .collect();
    let mut start_seq = 0;
    for n in &names {
        start_seq = client(n).join().expect("join").last_seq;
    }
    let sender = user("sender");
    start_seq = start_seq.max(client(&sender).join().expect("join").last_seq);
    // Readers: real feeds whose consumer takes nothing yet (a channel of one event): the
    // feed thread blocks, stops reading its socket, stops acking and renewing.
    let mut readers = Vec::new();
    for n in &names[..READERS] {
        let feed_options = FeedOptions {
            channel: 1,
            client: options,
            ..FeedOptions::default()
        };
        let (feed, rx) = Feed::start(&ctx, n.clone(), None, feed_options).expect("feed");
        feed.add(GroupSpec {
            label: "push".into(),
            endpoint: node.endpoint.clone(),
            group: None,
            after_seq: Some(start_seq),
            server_key: None,
        });
        match rx.recv_timeout(WAIT) {
            Ok(FeedEvent::Subscribed { .. }) => {}
            other => panic!("{n} did not subscribe: {other:?}"),
        }
        readers.push((feed, rx));
    }
    // The others: connections that subscribe once, read the reply, and never read again
    // nor renew.
    let stalled: Vec<zmq::Socket> = names[READERS..]
        .iter()
        .map(|n| {
            let s = dealer(&ctx, &node, None);
            send_subscribe(&s, n);
            subscribe_reply(&s).expect("subscribed");
            s
        })
        .collect();
    let idle_rss = rss_bytes(pid).expect("the node's RSS");
    let sampler = RssSampler::start(pid);
    let started = Instant::now();
    let last = windowed_sends(&ctx, &node, &sender, MESSAGES, BYTES);
    let send_time = started.elapsed();
    let after_sends = rss_bytes(pid).expect("the node's RSS");
    // The readers now read, together: pushes still queued, then the rest from the log.
    let started = Instant::now();
    let (feeds, receivers): (Vec<Feed>, Vec<Receiver<FeedEvent>>) = readers.into_iter().unzip();
    let threads: Vec<_> = receivers
        .into_iter()
        .map(|rx| std::thread::spawn(move || read_all(&rx, last)))
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (seqs, mut numbers) = t.join().expect("a reader thread");
        assert_eq!(
            seqs,
            (start_seq + 1..=last).collect::<Vec<_>>(),
            "reader {i}: not every seq exactly once, in order"
        );
        numbers.sort_unstable();
        assert_eq!(numbers, (0..MESSAGES).collect::<Vec<_>>(), "reader {i}");
    }
    let read_time = started.elapsed();
    let (max_rss, samples) = sampler.finish();
    eprintln!(
        "node RSS: {} MiB idle, {} MiB after the sends, {} MiB at most over {samples} samples; \
         {MESSAGES} × 1 MiB sent in {send_time:?}, read back by {READERS} readers in {read_time:?}",
        idle_rss >> 20,
        after_sends >> 20,
        max_rss >> 20,
    );
    assert!(samples > 0);
    assert!(
        max_rss < RSS_LIMIT,
        "the node's RSS reached {} MiB; log:\n{}",
        max_rss >> 20,
        node.log()
    );
    drop(stalled);
    drop(feeds);
}

/// Subscribes a fresh CURVE key's connections until refused; returns the sockets kept open.
fn flood(ctx: &zmq::Context, node: &Server, keys: &Keypair, name: &UserName) -> Vec<zmq::Socket> {
    let mut open = Vec::new();
    loop {
        let s = dealer(ctx, node, Some(keys));
        send_subscribe(&s, name);
        match subscribe_reply(&s) {
            Ok(_) => open.push(s),
            Err(e) => {
                assert_eq!(e.code, ErrorCode::LimitReached, "{e}");
                return open;
            }
        }
    }
}

#[test]
fn fresh_keys_filling_every_slot_cannot_lock_a_member_out() {
    const SLOTS: usize = 64;
    const PER_MEMBER: usize = 8;
    const FRESH: usize = 16;
    let dir = data_dir();
    let (slots, per_member) = (SLOTS.to_string(), PER_MEMBER.to_string());
    let node = start_node(
        &dir,
        "fair",
        &[
            "--max-subscribers",
            &slots,
            "--max-subscriptions-per-member",
            &per_member,
        ],
    );
    let ctx = zmq::Context::new();
    let server_key: PublicKey = node.key.as_deref().expect("CURVE").parse().expect("key");
    let join = |keys: &Keypair, name: &UserName| {
        GroupClient::new(
            &ctx,
            &node.endpoint,
            name.clone(),
            None,
            ClientOptions::default(),
        )
        .with_curve(ClientCurve {
            keypair: keys.clone(),
            server_key,
        })
        .join()
        .expect("join");
    };
    // The long-standing member, with one live connection.
    let (alice_keys, alice) = (Keypair::generate().expect("keys"), user("alice"));
    join(&alice_keys, &alice);
    let alice_1 = dealer(&ctx, &node, Some(&alice_keys));
    send_subscribe(&alice_1, &alice);
    subscribe_reply(&alice_1).expect("alice subscribes");
    // Fresh keys, each subscribing up to its limit: 16 × 8 = 128 asks for 63 free slots.
    let mut held = Vec::new();
    for i in 0..FRESH {
        let (keys, name) = (
            Keypair::generate().expect("keys"),
            user(&format!("fresh{i}")),
        );
        join(&keys, &name);
        held.push(flood(&ctx, &node, &keys, &name));
    }
    let opened: usize = held.iter().map(Vec::len).sum();
    assert!(opened >= SLOTS, "the fresh keys opened only {opened}");
    // Every slot is taken, and alice can still subscribe more connections.
    for _ in 0..2 {
        let s = dealer(&ctx, &node, Some(&alice_keys));
        send_subscribe(&s, &alice);
        subscribe_reply(&s).expect("a member subscribes on a full node");
        held.push(vec![s]);
    }
    // Alice's first connection was never evicted: its renewal is a renewal.
    send_subscribe(&alice_1, &alice);
    // Pushed events (the fresh keys' joins) come first; the reply follows them.
    let renewed = loop {
        let frames = alice_1.recv_multipart(0).expect("a message in time");
        if let Ok(r) = decode_reply::<SubscribeReply>(frames.get(1..).unwrap_or_default()) {
            break r;
        }
    };
    assert!(renewed.is_ok(), "{renewed:?}");
}
