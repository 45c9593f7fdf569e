//! The followers workload's load generator (issue 24 item 6): what a messaging benchmark
//! drives a server with, instead of one `common::live::Feed` (a thread and a context) per
//! user.
//!
//! - [`Followers`]: [`FOLLOWER_THREADS`] threads (more past [`USERS_PER_THREAD`] users),
//!   one ZeroMQ context each; each owns the DEALER sockets of its users (one per user, with the user's CURVE keys) and polls them
//!   together. On the wire each does what a feed does (PROTOCOL §6.7, §6.7.1): `subscribe`
//!   each group with `batch` at the start; one `renew` of all its groups (with `acked_seq`)
//!   every [`FeedOptions::renew`](agora_common::live::FeedOptions) (the feed's pace); an
//!   `entries` push counted, and acked (a `subscribe` with `acked_seq`) past half the
//!   subscription's budget or [`ACK_EVERY_BYTES`], as the feed does; `unsubscribed`
//!   answered by subscribing again. It does not backfill: a seq skipped is counted as a
//!   gap (and its delivery as lost).
//! - [`send`]: the sender, [`SEND_CONNECTIONS`] DEALER connections with up to
//!   [`IN_FLIGHT`] sends each in flight (tagged, PROTOCOL §2), paced at the rate, round
//!   robin over the groups; every body carries its index and send time ([`stamped`]).
//!
//! Latency is from the send's timestamp to each follower's receipt of the push. A
//! delivery is lost only if its send was acked and it never came.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_common::keys::{Keypair, PublicKey};
use agora_common::live::ACK_EVERY_BYTES;
use agora_proto::action::{call, NodeRequest};
use agora_proto::codec::{decode_reply, encode_call, encode_request, Frames};
use agora_proto::id::MessageId;
use agora_proto::wire::{
    EntryKind, GroupName, PushBatch, RenewEntry, RenewReply, RenewRequest, SendAck, SendRequest,
    SubscribeReply, SubscribeRequest, UserName, WireError, MAX_RENEW_GROUPS, PROTOCOL,
};
use anyhow::{bail, Context};

/// Threads driving the followers, at least (one ZeroMQ context each).
pub const FOLLOWER_THREADS: usize = 2;
/// Users per thread at most: libzmq caps a context at 1023 sockets (`ZMQ_MAX_SOCKETS`),
/// and the `zmq` crate does not set the option.
pub const USERS_PER_THREAD: usize = 1000;
/// The sender's connections.
pub const SEND_CONNECTIONS: usize = 4;
/// Sends in flight per connection at most.
pub const IN_FLIGHT: usize = 32;

/// A message body: `"K MICROS"`, send K, MICROS since `epoch` when it was sent.
pub fn stamped(k: u64, epoch: Instant) -> Box<serde_json::value::RawValue> {
    let text = format!("\"{k} {}\"", epoch.elapsed().as_micros());
    serde_json::value::RawValue::from_string(text)
        .unwrap_or_else(|_| unreachable!("digits are JSON"))
}

/// The send index and send time (an offset from the epoch) a [`stamped`] body carries.
pub fn stamp_of(body: &serde_json::value::RawValue) -> Option<(u64, Duration)> {
    let text: String = serde_json::from_str(body.get()).ok()?;
    let (k, micros) = text.split_once(' ')?;
    Some((k.parse().ok()?, Duration::from_micros(micros.parse().ok()?)))
}

/// One user's subscription to one group.
struct Sub {
    group: GroupName,
    /// The last seq received (set from the first subscribe reply: what came before is not
    /// wanted).
    last_seq: Option<u64>,
    subscribed: bool,
    budget: u64,
    unacked: usize,
}

/// One user: its connection and its groups.
struct User {
    name: UserName,
    socket: zmq::Socket,
    subs: Vec<Sub>,
}

impl User {
    fn send(&self, request: &NodeRequest) {
        let frames = encode_request(request);
        // A full pipe drops this one: the next renewal makes up for it, as a feed's does.
        let _ = self.socket.send_multipart(
            std::iter::once(&[][..]).chain(frames.iter().map(Vec::as_slice)),
            zmq::DONTWAIT,
        );
    }

    fn subscribe(&mut self, i: usize) {
        let request = NodeRequest::Subscribe(SubscribeRequest {
            group: Some(self.subs[i].group.clone()),
            user: self.name.clone(),
            batch: true,
            acked_seq: self.subs[i].last_seq,
        });
        self.send(&request);
        self.subs[i].unacked = 0;
    }

    fn renew(&mut self) {
        let entries: Vec<RenewEntry> = self
            .subs
            .iter()
            .map(|s| RenewEntry {
                group: s.group.clone(),
                acked_seq: s.last_seq,
            })
            .collect();
        for chunk in entries.chunks(MAX_RENEW_GROUPS) {
            self.send(&NodeRequest::Renew(RenewRequest {
                user: self.name.clone(),
                groups: chunk.to_vec(),
            }));
        }
        for s in &mut self.subs {
            s.unacked = 0;
        }
    }
}

/// What the follower threads count together.
pub struct Counts {
    /// (user, group) subscriptions made (first reply each).
    pub subscribed: AtomicU64,
    /// Deliveries of each send index.
    pub delivered: Vec<AtomicU32>,
    /// Seqs skipped in a user's stream of a group (never delivered: no backfill here).
    pub gaps: AtomicU64,
    /// Errors the host answered.
    pub refused: AtomicU64,
    /// `unsubscribed` events (answered by subscribing again).
    pub unsubscribed: AtomicU64,
    stop: AtomicBool,
}

/// The follower threads, running until dropped or [`Followers::finish`]ed.
pub struct Followers {
    /// The counts so far.
    pub counts: Arc<Counts>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<Vec<Duration>>>>,
}

impl Followers {
    /// Starts [`FOLLOWER_THREADS`] threads (or one per [`USERS_PER_THREAD`]) driving `users` (name, key pair, groups) at the
    /// host `endpoint` (key `server_key`), renewing every `renew`; `sends` sizes the
    /// delivery counts (the send indexes expected).
    ///
    /// # Errors
    /// A socket that cannot be made (open files, the context's socket cap).
    pub fn start(
        users: Vec<(UserName, Keypair, Vec<GroupName>)>,
        endpoint: &str,
        server_key: PublicKey,
        renew: Duration,
        sends: u64,
        epoch: Instant,
    ) -> anyhow::Result<Followers> {
        let threads = FOLLOWER_THREADS.max(users.len().div_ceil(USERS_PER_THREAD));
        let contexts: Vec<zmq::Context> = (0..threads).map(|_| zmq::Context::new()).collect();
        let counts = Arc::new(Counts {
            subscribed: AtomicU64::new(0),
            delivered: (0..sends).map(|_| AtomicU32::new(0)).collect(),
            gaps: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unsubscribed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let mut shares: Vec<Vec<User>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, (name, keypair, groups)) in users.into_iter().enumerate() {
            let socket = contexts[i % threads].socket(zmq::DEALER)?;
            socket.set_linger(0)?;
            socket.set_rcvhwm(0)?;
            socket.set_curve_serverkey(server_key.as_bytes())?;
            socket.set_curve_publickey(keypair.public.as_bytes())?;
            socket.set_curve_secretkey(keypair.secret_bytes())?;
            socket
                .connect(endpoint)
                .with_context(|| format!("connecting to {endpoint}"))?;
            let subs = groups
                .into_iter()
                .map(|group| Sub {
                    group,
                    last_seq: None,
                    subscribed: false,
                    budget: 0,
                    unacked: 0,
                })
                .collect();
            shares[i % threads].push(User { name, socket, subs });
        }
        let threads = shares
            .into_iter()
            .map(|users| {
                let counts = Arc::clone(&counts);
                std::thread::spawn(move || follow(users, &counts, renew, epoch))
            })
            .collect();
        Ok(Followers { counts, threads })
    }

    /// Stops the threads; returns every delivery's latency.
    ///
    /// # Errors
    /// A thread that failed or panicked.
    pub fn finish(mut self) -> anyhow::Result<Vec<Duration>> {
        self.counts.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.threads.drain(..) {
            all.extend(
                t.join()
                    .map_err(|_| anyhow::anyhow!("a follower thread panicked"))??,
            );
        }
        Ok(all)
    }
}

impl Drop for Followers {
    fn drop(&mut self) {
        self.counts.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One follower thread: subscribe everything, then renew, receive and ack until stopped.
fn follow(
    mut users: Vec<User>,
    counts: &Counts,
    renew: Duration,
    epoch: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    for u in &mut users {
        for i in 0..u.subs.len() {
            u.subscribe(i);
        }
    }
    let mut next_renew = Instant::now() + renew;
    while !counts.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_renew {
            users.iter_mut().for_each(User::renew);
            next_renew = now + renew;
        }
        let ready: Vec<bool> = {
            let mut items: Vec<zmq::PollItem> = users
                .iter()
                .map(|u| u.socket.as_poll_item(zmq::POLLIN))
                .collect();
            let wait = next_renew
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20));
            zmq::poll(&mut items, wait.as_millis() as i64)?;
            items.iter().map(zmq::PollItem::is_readable).collect()
        };
        for (u, ready) in users.iter_mut().zip(ready) {
            if !ready {
                continue;
            }
            while let Ok(frames) = u.socket.recv_multipart(zmq::DONTWAIT) {
                handle(u, &frames, counts, epoch, &mut latencies);
            }
        }
    }
    Ok(latencies)
}

/// One message from the host to user `u`.
fn handle(
    u: &mut User,
    frames: &Frames,
    counts: &Counts,
    epoch: Instant,
    latencies: &mut Vec<Duration>,
) {
    let [empty, sig, body] = frames.as_slice() else {
        return;
    };
    if !empty.is_empty() || sig.as_slice() != PROTOCOL {
        return;
    }
    if body.starts_with(br#"{"event":"entries","#) {
        let Ok(batch) = serde_json::from_slice::<PushBatch>(body) else {
            return;
        };
        let Some(i) = u.subs.iter().position(|s| s.group == batch.group) else {
            return;
        };
        let now = epoch.elapsed();
        for entry in batch.entries {
            let s = &mut u.subs[i];
            let last = *s.last_seq.get_or_insert(entry.seq.saturating_sub(1));
            if entry.seq <= last {
                continue;
            }
            counts
                .gaps
                .fetch_add(entry.seq - last - 1, Ordering::Relaxed);
            s.last_seq = Some(entry.seq);
            if entry.kind != EntryKind::Message {
                continue;
            }
            if let Some((k, sent)) = stamp_of(&entry.body) {
                latencies.push(now.saturating_sub(sent));
                if let Some(d) = counts.delivered.get(k as usize) {
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let s = &mut u.subs[i];
        s.unacked += body.len();
        if s.budget > 0 && s.unacked >= (s.budget as usize / 2).min(ACK_EVERY_BYTES) {
            u.subscribe(i);
        }
        return;
    }
    #[derive(serde::Deserialize)]
    struct Head {
        ok: Option<bool>,
        event: Option<String>,
        group: Option<GroupName>,
        groups: Option<serde::de::IgnoredAny>,
        lease_ms: Option<u64>,
    }
    let Ok(head) = serde_json::from_slice::<Head>(body) else {
        return;
    };
    let mut subscribed = |reply: SubscribeReply| {
        if let Some(s) = u.subs.iter_mut().find(|s| s.group == reply.group) {
            if !s.subscribed {
                s.subscribed = true;
                counts.subscribed.fetch_add(1, Ordering::Relaxed);
            }
            s.budget = reply.budget_bytes;
            s.last_seq.get_or_insert(reply.last_seq);
        }
    };
    match (head.ok, head.event.as_deref()) {
        (None, Some("unsubscribed")) => {
            counts.unsubscribed.fetch_add(1, Ordering::Relaxed);
            if let Some(i) = u
                .subs
                .iter()
                .position(|s| Some(&s.group) == head.group.as_ref())
            {
                u.subscribe(i);
            }
        }
        (Some(false), _) => {
            let n = counts.refused.fetch_add(1, Ordering::Relaxed);
            if n < 5 {
                if let Ok(e) = serde_json::from_slice::<WireError>(body) {
                    eprintln!("agora-bench: followers: {} refused: {e}", u.name);
                }
            }
        }
        (Some(true), _) if head.groups.is_some() => {
            if let Ok(reply) = serde_json::from_slice::<RenewReply>(body) {
                reply.groups.into_iter().for_each(&mut subscribed);
                let refused = reply.refused.len() as u64;
                counts.refused.fetch_add(refused, Ordering::Relaxed);
            }
        }
        (Some(true), _) if head.lease_ms.is_some() => {
            if let Ok(reply) = serde_json::from_slice::<SubscribeReply>(body) {
                subscribed(reply);
            }
        }
        _ => {}
    }
}

/// What [`send`] did.
pub struct Sent {
    /// Sends made.
    pub sent: u64,
    /// Which were acked, by send index.
    pub acked: Vec<bool>,
    /// From the first send to the last ack.
    pub took: Duration,
}

/// Sends `total` messages at `rate` per second as `user` (key pair `keypair`), send k to
/// `groups[k % groups.len()]`, over [`SEND_CONNECTIONS`] connections with up to
/// [`IN_FLIGHT`] unacked each; waits for the acks up to `grace` after the last was due.
///
/// # Errors
/// A socket error, an undecodable reply, a refused send.
#[allow(clippy::too_many_arguments)]
pub fn send(
    ctx: &zmq::Context,
    endpoint: &str,
    server_key: PublicKey,
    user: &UserName,
    keypair: &Keypair,
    groups: &[GroupName],
    rate: u64,
    total: u64,
    grace: Duration,
    epoch: Instant,
) -> anyhow::Result<Sent> {
    let mut conns = Vec::new();
    for _ in 0..SEND_CONNECTIONS {
        let s = ctx.socket(zmq::DEALER)?;
        s.set_linger(0)?;
        s.set_curve_serverkey(server_key.as_bytes())?;
        s.set_curve_publickey(keypair.public.as_bytes())?;
        s.set_curve_secretkey(keypair.secret_bytes())?;
        s.connect(endpoint)?;
        conns.push((s, 0usize));
    }
    let mut acked = vec![false; total as usize];
    let (mut sent, mut n_acked) = (0u64, 0u64);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(total as f64 / rate as f64) + grace;
    let mut last_ack = started;
    let mut next = 0usize;
    while n_acked < total {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        let mut blocked = 0;
        while sent < total.min(due) && blocked < conns.len() {
            let (socket, in_flight) = &mut conns[next];
            next = (next + 1) % SEND_CONNECTIONS;
            if *in_flight >= IN_FLIGHT {
                blocked += 1;
                continue;
            }
            blocked = 0;
            let g = &groups[(sent % groups.len() as u64) as usize];
            let frames = encode_call::<call::Send>(&SendRequest {
                group: Some(g.clone()),
                user: user.clone(),
                body: stamped(sent, epoch),
                id: Some(MessageId::new_v7()),
                attachment: None,
            });
            let tag = sent.to_be_bytes();
            socket.send_multipart(
                [&tag[..], &[][..]]
                    .into_iter()
                    .chain(frames.iter().map(Vec::as_slice)),
                0,
            )?;
            *in_flight += 1;
            sent += 1;
        }
        let ready: Vec<bool> = {
            let mut items: Vec<zmq::PollItem> = conns
                .iter()
                .map(|(s, _)| s.as_poll_item(zmq::POLLIN))
                .collect();
            zmq::poll(&mut items, 1)?;
            items.iter().map(zmq::PollItem::is_readable).collect()
        };
        for ((socket, in_flight), ready) in conns.iter_mut().zip(ready) {
            if !ready {
                continue;
            }
            while let Ok(reply) = socket.recv_multipart(zmq::DONTWAIT) {
                let k = reply
                    .first()
                    .and_then(|t| <[u8; 8]>::try_from(t.as_slice()).ok())
                    .map(u64::from_be_bytes)
                    .context("a send reply without its tag")?;
                if let Err(e) = decode_reply::<SendAck>(reply.get(2..).unwrap_or_default())? {
                    bail!("send {k} refused: {e}");
                }
                *in_flight = in_flight.saturating_sub(1);
                if let Some(a) = acked.get_mut(k as usize) {
                    if !*a {
                        *a = true;
                        n_acked += 1;
                    }
                }
                last_ack = Instant::now();
            }
        }
        if Instant::now() > deadline {
            eprintln!(
                "agora-bench: followers: {n_acked} of {total} sends acked {} after the last \
                 was due",
                humantime::format_duration(grace)
            );
            break;
        }
    }
    Ok(Sent {
        sent,
        acked,
        took: last_ack.duration_since(started),
    })
}
