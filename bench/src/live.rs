//! Live-stream benchmarks: send→deliver latency and fan-out throughput, through the real
//! node and the `common::live` feed (the same code user-cli runs).

use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agora_common::client::ClientOptions;
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_proto::wire::{EntryKind, UserName};
use anyhow::{bail, Context};

use crate::workload::{Fanout, Latency};
use crate::{body, start_node, windowed_sends, NodeProc};

/// What one subscriber saw: (seq, when, came live).
type Seen = Vec<(u64, Instant, bool)>;

struct Subscriber {
    _feed: Feed,
    thread: JoinHandle<Seen>,
}

fn subscribe(
    ctx: &zmq::Context,
    node: &NodeProc,
    count: usize,
    until_seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<Vec<Subscriber>> {
    let mut subs = Vec::new();
    let mut ready = Vec::new();
    for i in 0..count {
        let user = UserName::new(format!("sub{i}"))?;
        node.client(ctx, &user, ClientOptions::default())?.join()?;
        let curve = node.curve(&user)?;
        let server_key = curve.as_ref().map(|c| c.server_key);
        let (feed, rx) = Feed::start(ctx, user, curve.map(|c| c.keypair), FeedOptions::default())?;
        feed.add(GroupSpec {
            label: "bench".into(),
            endpoint: node.endpoint.clone(),
            group: None,
            after_seq: None,
            server_key,
        });
        let (tx_ready, rx_ready) = std::sync::mpsc::channel();
        ready.push(rx_ready);
        let until = std::sync::Arc::clone(&until_seq);
        let thread = std::thread::spawn(move || collect(&rx, &tx_ready, &until));
        subs.push(Subscriber {
            _feed: feed,
            thread,
        });
    }
    for r in ready {
        r.recv_timeout(Duration::from_secs(30))
            .context("a subscriber never subscribed")?;
    }
    Ok(subs)
}

/// Collects a subscriber's entries until it has seen seq `until` (set by the sender once
/// it knows the last seq; 0 until then), or nothing came for 30 s.
fn collect(
    rx: &Receiver<FeedEvent>,
    ready: &std::sync::mpsc::Sender<()>,
    until: &std::sync::atomic::AtomicU64,
) -> Seen {
    let mut seen = Vec::new();
    let (mut newest, mut last_progress) = (0u64, Instant::now());
    loop {
        // Short waits, so that a subscriber that already has everything notices `until`.
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(FeedEvent::Subscribed { .. }) => {
                let _ = ready.send(());
            }
            Ok(FeedEvent::Entry { entry, live, .. }) => {
                if entry.kind == EntryKind::Message {
                    seen.push((entry.seq, Instant::now(), live));
                }
                newest = newest.max(entry.seq);
                last_progress = Instant::now();
            }
            Ok(FeedEvent::Error { .. }) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if last_progress.elapsed() > Duration::from_secs(30) {
                    return seen;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return seen,
        }
        let target = until.load(std::sync::atomic::Ordering::SeqCst);
        if target > 0 && newest >= target {
            return seen;
        }
    }
}

/// One live run: a node, `subscribers` subscribed feeds, and a joined sender. Fields drop
/// in order: the feeds stop before the node, and the context goes last.
struct Stage {
    subs: Vec<Subscriber>,
    /// The seq every subscriber waits for (0 until the sender knows it).
    until: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sender: agora_common::client::GroupClient,
    user: UserName,
    /// The log's last seq after the sender joined.
    joined_seq: u64,
    node: NodeProc,
    ctx: zmq::Context,
}

impl Stage {
    fn start(subscribers: usize, node_args: &[&str]) -> anyhow::Result<Stage> {
        let ctx = zmq::Context::new();
        let node = start_node(node_args)?;
        let until = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let subs = subscribe(&ctx, &node, subscribers, std::sync::Arc::clone(&until))?;
        let user = UserName::new("sender")?;
        let mut sender = node.client(&ctx, &user, ClientOptions::default())?;
        let joined_seq = sender.join()?.last_seq;
        Ok(Stage {
            subs,
            until,
            sender,
            user,
            joined_seq,
            node,
            ctx,
        })
    }

    /// Tells the subscribers the last seq and collects what each saw.
    fn finish(self, last_seq: u64) -> anyhow::Result<Vec<Seen>> {
        self.until
            .store(last_seq, std::sync::atomic::Ordering::SeqCst);
        self.subs
            .into_iter()
            .map(|s| {
                s.thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("subscriber panicked"))
            })
            .collect()
    }
}

/// Latency from the start of a `send` to each subscriber's delivery, `messages` sequential
/// sends (each waits for its ack), with `subscribers` subscribers.
///
/// # Errors
/// When a subscriber misses a message (after backfill) or a send fails.
pub fn latency(
    subscribers: usize,
    messages: u64,
    bytes: usize,
    node_args: &[&str],
) -> anyhow::Result<Latency> {
    let mut stage = Stage::start(subscribers, node_args)?;
    let mut sent_at = std::collections::HashMap::new();
    let mut last = 0;
    for n in 0..messages {
        let t = Instant::now();
        let ack = stage.sender.send(body(n, bytes))?;
        sent_at.insert(ack.seq, t);
        last = ack.seq;
    }
    let mut samples = Vec::new();
    for seen in stage.finish(last)? {
        if seen.len() as u64 != messages {
            bail!("a subscriber got {} of {messages} messages", seen.len());
        }
        for (seq, at, _) in seen {
            if let Some(t) = sent_at.get(&seq) {
                samples.push(at.saturating_duration_since(*t));
            }
        }
    }
    Ok(Latency::of(samples))
}

/// Fan-out: `messages` sent with `window` in flight, to `subscribers` subscribers:
/// deliveries per second (all subscribers together) and deliveries lost after backfill.
/// Entries that missed their push and came by backfill count as delivered, at the time
/// they arrived.
///
/// # Errors
/// When a send fails or a subscriber never subscribes.
pub fn fanout(
    subscribers: usize,
    messages: u64,
    window: usize,
    bytes: usize,
    node_args: &[&str],
) -> anyhow::Result<Fanout> {
    let stage = Stage::start(subscribers, node_args)?;
    let started = Instant::now();
    windowed_sends(
        &stage.ctx,
        &stage.node,
        &stage.user,
        messages,
        window,
        bytes,
    )?;
    // Entries: the subscribers' joins came before; the sender's join, then the messages.
    let last_seq = stage.joined_seq + messages;
    let (mut delivered, mut lost) = (0u64, 0u64);
    let mut done = started;
    for seen in stage.finish(last_seq)? {
        delivered += seen.len() as u64;
        lost += messages.saturating_sub(seen.len() as u64);
        if let Some((_, at, _)) = seen.last() {
            done = done.max(*at);
        }
    }
    let secs = done.saturating_duration_since(started).as_secs_f64();
    Ok(Fanout {
        delivered_per_s: delivered as f64 / secs,
        lost,
    })
}
