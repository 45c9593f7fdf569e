//! The transport floor: raw libzmq over the same loopback, with no storage and no
//! protocol. REQ/REP against an echo server in its own process (this binary with
//! `--serve-rep`, on the servers' CPU), and PUB/SUB with the default HWM (1000), which
//! drops above it (zguide chapter 5).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::peers::payload;
use crate::workload::{Fanout, Latency, Sizes};

/// The echo server: binds a REP socket on a free loopback port, prints `listening
/// ENDPOINT`, and answers each request with its own frames, until killed.
///
/// # Errors
/// When the socket cannot be bound.
pub fn serve_rep() -> anyhow::Result<()> {
    let ctx = zmq::Context::new();
    let rep = ctx.socket(zmq::REP)?;
    rep.set_linger(0)?;
    rep.bind("tcp://127.0.0.1:0")?;
    let endpoint = rep
        .get_last_endpoint()?
        .map_err(|_| anyhow::anyhow!("endpoint is not UTF-8"))?;
    println!("listening {endpoint}");
    loop {
        let frames = rep.recv_multipart(0)?;
        rep.send_multipart(frames, 0)?;
    }
}

struct Echo(std::process::Child);

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Workload 1 on raw REQ/REP: `sizes.requests` sequential round trips of a body of
/// `sizes.bytes`.
pub fn request_reply(sizes: &Sizes) -> anyhow::Result<Latency> {
    let exe = std::env::current_exe()?;
    let mut child = crate::servers::server_command(&exe)
        .arg("--serve-rep")
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let _echo = Echo(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let endpoint = line
        .strip_prefix("listening ")
        .context("the echo server printed no endpoint")?
        .trim();
    let ctx = zmq::Context::new();
    let req = ctx.socket(zmq::REQ)?;
    req.set_linger(0)?;
    req.set_rcvtimeo(10_000)?;
    req.connect(endpoint)?;
    let body = payload(0, sizes.bytes);
    let mut samples = Vec::with_capacity(sizes.requests as usize);
    for _ in 0..sizes.requests {
        let t = Instant::now();
        req.send(&body[..], 0)?;
        let reply = req.recv_bytes(0).context("no echo within 10 s")?;
        samples.push(t.elapsed());
        if reply.len() != body.len() {
            bail!("echo of {} bytes", reply.len());
        }
    }
    Ok(Latency::of(samples))
}

/// How long a subscriber waits for the next message before it counts the rest as lost.
const QUIET: Duration = Duration::from_secs(3);

/// What a subscriber saw: (subscriber, message index, arrival).
type Seen = (usize, u64, Instant);

/// The index of the probe messages that wait out the slow joiners.
const PROBE: u64 = u64::MAX;
/// The index of the message that tells subscribers the run is over.
const END: u64 = u64::MAX - 1;

/// Subscribers on their own threads, each sending what it sees, and stopping at [`END`] or
/// after [`QUIET`] without a message.
fn subscribers(
    ctx: &zmq::Context,
    endpoint: &str,
    count: usize,
) -> anyhow::Result<(mpsc::Receiver<Seen>, Vec<std::thread::JoinHandle<()>>)> {
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::new();
    for i in 0..count {
        let sub = ctx.socket(zmq::SUB)?;
        sub.set_linger(0)?;
        sub.set_rcvtimeo(QUIET.as_millis() as i32)?;
        sub.set_subscribe(b"")?;
        sub.connect(endpoint)?;
        let tx = tx.clone();
        threads.push(std::thread::spawn(move || {
            while let Ok(m) = sub.recv_bytes(0) {
                let n = m
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(PROBE, u64::from_le_bytes);
                if n == END || tx.send((i, n, Instant::now())).is_err() {
                    break;
                }
            }
        }));
    }
    Ok((rx, threads))
}

/// A bound PUB socket whose `count` subscribers are all connected: it publishes probe
/// messages until each subscriber got one (the zguide's answer to the slow-joiner
/// problem), then waits until no probe is in flight.
fn publisher_with(
    ctx: &zmq::Context,
    count: usize,
) -> anyhow::Result<(
    zmq::Socket,
    mpsc::Receiver<Seen>,
    Vec<std::thread::JoinHandle<()>>,
)> {
    let publisher = ctx.socket(zmq::PUB)?;
    publisher.set_linger(0)?;
    publisher.bind("tcp://127.0.0.1:0")?;
    let endpoint = publisher
        .get_last_endpoint()?
        .map_err(|_| anyhow::anyhow!("endpoint is not UTF-8"))?;
    let (rx, threads) = subscribers(ctx, &endpoint, count)?;
    let probe = payload(PROBE, 8);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ready = std::collections::HashSet::new();
    while ready.len() < count {
        if Instant::now() > deadline {
            bail!(
                "{} of {count} subscribers connected within 10 s",
                ready.len()
            );
        }
        publisher.send(&probe[..], 0)?;
        while let Ok((i, _, _)) = rx.recv_timeout(Duration::from_millis(10)) {
            ready.insert(i);
        }
    }
    // Drain the probes still in flight.
    while rx.recv_timeout(Duration::from_millis(50)).is_ok() {}
    Ok((publisher, rx, threads))
}

/// Workload 4 on raw PUB/SUB: `messages` published as fast as the socket takes them.
pub fn fanout(subscribers: usize, messages: u64, bytes: usize) -> anyhow::Result<Fanout> {
    let ctx = zmq::Context::new();
    let (publisher, rx, threads) = publisher_with(&ctx, subscribers)?;
    let started = Instant::now();
    for n in 0..messages {
        publisher.send(payload(n, bytes), 0)?;
    }
    let (mut delivered, mut done) = (0u64, started);
    let expected = messages * subscribers as u64;
    while delivered < expected {
        match rx.recv_timeout(QUIET) {
            Ok((_, n, at)) if n < messages => {
                delivered += 1;
                done = at;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    finish(publisher, rx, threads);
    Ok(Fanout {
        delivered_per_s: delivered as f64 / done.duration_since(started).as_secs_f64(),
        lost: expected - delivered,
    })
}

/// Workload 4 latency on raw PUB/SUB: one message at a time, each after every subscriber
/// received the one before.
pub fn fanout_latency(subscribers: usize, messages: u64, bytes: usize) -> anyhow::Result<Latency> {
    let ctx = zmq::Context::new();
    let (publisher, rx, threads) = publisher_with(&ctx, subscribers)?;
    let mut samples = Vec::with_capacity(messages as usize * subscribers);
    for n in 0..messages {
        let t = Instant::now();
        publisher.send(payload(n, bytes), 0)?;
        let mut got = 0;
        while got < subscribers {
            match rx.recv_timeout(QUIET) {
                Ok((_, i, at)) if i == n => {
                    samples.push(at.duration_since(t));
                    got += 1;
                }
                Ok(_) => {}
                Err(_) => bail!("message {n} reached {got} of {subscribers} subscribers"),
            }
        }
    }
    finish(publisher, rx, threads);
    Ok(Latency::of(samples))
}

/// Tells the subscribers the run is over and joins them (a subscriber that misses the end
/// message stops after [`QUIET`]).
fn finish(
    publisher: zmq::Socket,
    rx: mpsc::Receiver<Seen>,
    threads: Vec<std::thread::JoinHandle<()>>,
) {
    let _ = publisher.send(payload(END, 8), 0);
    drop(rx);
    for t in threads {
        let _ = t.join();
    }
}

/// The disk floor of an acked durable append: `count` sequential appends of `bytes` to a
/// file in the temporary directory the servers use, each followed by `fdatasync`.
/// Appends per second: no store that syncs before each ack, one at a time, can beat it.
///
/// # Errors
/// When the file cannot be written or synced.
pub fn fsync_rate(count: u64, bytes: usize) -> anyhow::Result<f64> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let mut file = std::fs::File::create(dir.path().join("floor"))?;
    let body = payload(0, bytes);
    let t = Instant::now();
    for _ in 0..count {
        file.write_all(&body)?;
        file.sync_data()?;
    }
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

/// The storage floor of an acked durable append: `count` appends through Agora's own store
/// (`common::store::SqliteStore`: WAL, `synchronous=FULL`), one transaction each, in this
/// process and with no network. Appends per second: what a group node could ack at one in
/// flight if messaging cost nothing.
///
/// # Errors
/// When the store cannot be opened or written.
pub fn store_commit_rate(count: u64, bytes: usize) -> anyhow::Result<f64> {
    use agora_group_node::store::SqliteStore;
    let dir = tempfile::tempdir()?;
    let group = agora_proto::wire::GroupName::new("floor")?;
    let sender = agora_proto::wire::UserName::new("floor")?;
    let mut store = SqliteStore::open(&dir.path().join("floor.sqlite3"), &group)?;
    commit_rate(&mut store, &sender, count, bytes)
}

/// Appends `count` messages of `bytes` to `store` as `sender`, each in a transaction of its
/// own (begin, append, commit: one durable commit each, as the node's 1-in-flight path);
/// returns messages per second. Shared by the SQLite and PostgreSQL storage floors.
///
/// # Errors
/// The store's errors.
pub fn commit_rate(
    store: &mut dyn agora_group_node::store::GroupStore,
    sender: &agora_proto::wire::UserName,
    count: u64,
    bytes: usize,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    for n in 0..count {
        let body = crate::body(n, bytes);
        let id = agora_proto::id::MessageId::new_v7();
        store.begin()?;
        // As the node's batch does: the client ids first (a no-op on SQLite).
        store.expect_appends(&[id])?;
        store.append(agora_group_node::store::NewMessage {
            sender,
            kind: agora_proto::wire::EntryKind::Message,
            sender_key: None,
            body: &body,
            id: Some(id),
            now: agora_proto::time::Timestamp::now(),
            attachment: None,
        })?;
        store.commit()?;
    }
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

/// Workload 8's disk floor: `bytes` written to a file in 1 MiB pieces, then `fsync`ed, in
/// the directory the servers use. MB/s.
///
/// # Errors
/// The file's I/O errors.
pub fn file_write_fsync(bytes: u64) -> anyhow::Result<f64> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let mut file = std::fs::File::create(dir.path().join("floor.bin"))?;
    let piece = vec![0x5au8; 1 << 20];
    let t = std::time::Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(piece.len() as u64)).unwrap_or(piece.len());
        file.write_all(&piece[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(bytes as f64 / 1e6 / t.elapsed().as_secs_f64())
}
