//! The live stream, client side: the zguide's "Clone" pattern (chapter 5) on Agora's log.
//!
//! A [`Feed`] is an [`Actor`]: one thread that owns a DEALER socket per subscribed group
//! node, woken at once by a stop or a command (`add`, `remove`) on its pipe. It sends
//! `subscribe` on each and renews it every [`FeedOptions::renew`]; the node pushes every new
//! log entry to that connection. The feed remembers the last seq it delivered per group and
//! hands entries to the consumer in seq order, each exactly once:
//!
//! - an entry at or below the last seq is a duplicate and is skipped;
//! - an entry past the next expected seq reveals a gap (a push dropped at the node's HWM, a
//!   reconnect after a node restart): the feed first reads the missing entries from the log
//!   with `get_messages after_seq`, then goes on;
//! - every renewal reply carries the node's `last_seq`, so a gap is found even when no push
//!   arrives (an idle group after a restart, a client that was offline).
//!
//! The feed subscribes with `batch` (the node pushes several entries per message,
//! `{"event": "entries"}`; single `entry` events are still understood) and acks: each
//! renewal carries `acked_seq`, the last seq handed to the consumer, and once the pushes
//! received since the last ack pass half the node's push budget (`budget_bytes` in the
//! `subscribe` reply) or [`ACK_EVERY_BYTES`], whichever is less, the feed renews at once
//! (credit-based flow control, zguide chapter 7). The smaller bound matters when many
//! subscribers share the node's total budget: each then holds little of it, and waiting for
//! half of its own budget would stall it until the next timed renewal.
//! A consumer that stops taking events stops the acks, so the node stops pushing to it; the
//! feed reads the rest from the log when the consumer comes back.
//!
//! Backfill uses a separate Lazy Pirate REQ client on the feed thread: a node that dies in
//! the middle of a backfill holds the other groups' entries back for up to the client
//! timeout (nothing is lost; they are delivered after).
//! The consumer receives [`FeedEvent`]s in a handler called on the feed's thread
//! ([`Feed::with_handler`]: the interactive client prints there, with no relay thread) or
//! through a bounded channel ([`Feed::start`]): a slow consumer slows the feed, the node drops
//! pushes to it at its HWM, and the feed backfills later.
//!
//! # Failover
//! A feed given a locator ([`Feed::with_locator`], a registry lookup) notices a node that
//! stops answering: when a group's renewals go unanswered for
//! [`FeedOptions::relocate_after`], it asks the locator where the group is now, and if it
//! moved (a standby took over, a node restarted elsewhere) it subscribes there, after the
//! last seq it delivered: the new node's reply reveals the gap and the feed backfills it,
//! so the consumer sees every entry once and in order across the move.
//!
//! # Pipe commands
//! `["add", GROUPSPEC_JSON]` and `["remove", ENDPOINT]`; `$TERM` unsubscribes every group and
//! stops.

use std::collections::HashMap;

/// The feed acks (renews with `acked_seq`) at least every this many pushed bytes (256 KiB),
/// even when the node's budget for it is larger.
pub const ACK_EVERY_BYTES: usize = 256 << 10;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use crate::actor::{Actor, Pipe, Wake};
use crate::client::{ClientError, ClientOptions, GroupClient};
use agora_proto::action::NodeRequest;
use agora_proto::codec::{encode_request, Frames};
use agora_proto::wire::{
    ErrorCode, GroupName, HistoryQuery, MembershipRequest, Message, PushBatch, PushEvent,
    SubscribeReply, SubscribeRequest, UserName, WireError, PROTOCOL,
};

/// How soon a subscribe that found no connection is tried again.
const RETRY_UNCONNECTED: Duration = Duration::from_millis(50);

/// How long a gap revealed by a `subscribe` reply may wait for pushes already on their way
/// (the node sends a batch's replies before its pushes) before the feed backfills it.
const PUSH_GRACE: Duration = Duration::from_millis(100);

/// How a feed subscribes and catches up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedOptions {
    /// How often each subscription is renewed; also the longest an idle group goes before a
    /// gap is noticed (default 1 s; the node's lease is 5 s).
    pub renew: Duration,
    /// The backfill client's timeout and attempts.
    pub client: ClientOptions,
    /// Capacity of the event channel, in events (default 1024).
    pub channel: usize,
    /// How long a group's renewals may go unanswered before a feed with a locator asks
    /// where the group is now (default 3 s); again at most this often while it is lost.
    pub relocate_after: Duration,
}

impl Default for FeedOptions {
    fn default() -> Self {
        FeedOptions {
            renew: Duration::from_secs(1),
            client: ClientOptions::default(),
            channel: 1024,
            relocate_after: Duration::from_secs(3),
        }
    }
}

/// A group to follow.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupSpec {
    /// How the user named it (for messages): a name or an address.
    pub label: String,
    /// The node's endpoint.
    pub endpoint: String,
    /// The group's name, if known; then the node must serve it (`unknown_group` otherwise).
    pub group: Option<GroupName>,
    /// Deliver entries after this seq; `None` starts at the node's last seq when subscribed.
    pub after_seq: Option<u64>,
    /// The node's CURVE public key; needed when the feed has a key pair.
    pub server_key: Option<crate::keys::PublicKey>,
}

/// What a feed reports.
#[derive(Debug)]
pub enum FeedEvent {
    /// A log entry, in seq order, exactly once per group.
    Entry {
        /// The spec's label.
        label: String,
        /// The group.
        group: GroupName,
        /// The entry.
        entry: Message,
        /// False when it came from backfill rather than a push.
        live: bool,
    },
    /// A subscription was made (first time, or again after the node lost it).
    Subscribed {
        /// The spec's label.
        label: String,
        /// The group.
        group: GroupName,
        /// The node's last seq at that moment.
        last_seq: u64,
    },
    /// Something failed. With `fatal` the group is dropped from the feed (not a member,
    /// unknown group); otherwise the feed keeps trying.
    Error {
        /// The spec's label.
        label: String,
        /// What went wrong.
        error: ClientError,
        /// Whether the feed gave up on this group.
        fatal: bool,
    },
}

/// Where a group's node is now: its endpoint and CURVE key, or `None` if that cannot be told
/// (a registry lookup, say). Called on the feed's thread.
pub type Locate =
    Box<dyn FnMut(&GroupName) -> Option<(String, Option<crate::keys::PublicKey>)> + Send>;

/// A [`Locate`] that looks groups up in the registry at `endpoint` (over CURVE with
/// `curve`), with a REQ client made on the feed's thread at the first lookup and made anew
/// after a failure (Lazy Pirate).
pub fn registry_locator(
    ctx: &zmq::Context,
    endpoint: &str,
    curve: Option<crate::client::ClientCurve>,
    options: ClientOptions,
) -> Locate {
    let (ctx, endpoint) = (ctx.clone(), endpoint.to_owned());
    let mut client: Option<crate::client::RegistryClient> = None;
    Box::new(move |group: &GroupName| {
        let registry = client.get_or_insert_with(|| {
            let registry = crate::client::RegistryClient::new(&ctx, &endpoint, options);
            match &curve {
                Some(curve) => registry.with_curve(curve.clone()),
                None => registry,
            }
        });
        match registry.lookup(group) {
            Ok(entry) => Some((entry.endpoint.to_string(), entry.public_key)),
            Err(e) => {
                tracing::debug!(%group, error = %e, "feed: cannot look the group up");
                client = None;
                None
            }
        }
    })
}

/// A running live stream, an [`Actor`]; stops (and unsubscribes) when dropped.
#[derive(Debug)]
pub struct Feed {
    actor: Actor,
}

impl Feed {
    /// Starts an empty feed acting as `user`, talking CURVE with `keypair` if given (then
    /// every [`GroupSpec`] needs its `server_key`); events arrive on the returned receiver,
    /// which holds at most [`FeedOptions::channel`] of them (the feed waits when it is full).
    /// Drop the receiver before the feed: a feed waiting on a full channel notices a
    /// dropped receiver, not a stop.
    ///
    /// # Errors
    /// The actor could not be started.
    pub fn start(
        ctx: &zmq::Context,
        user: UserName,
        keypair: Option<crate::keys::Keypair>,
        options: FeedOptions,
    ) -> std::io::Result<(Feed, Receiver<FeedEvent>)> {
        let (events, rx) = mpsc::sync_channel(options.channel.max(1));
        let feed = Feed::with_handler(ctx, user, keypair, options, move |event| {
            events.send(event).is_ok()
        })?;
        Ok((feed, rx))
    }

    /// As [`Feed::start`], with each event handed to `on_event` on the feed's own thread;
    /// `on_event` returns false when the consumer is gone (the feed then stops).
    ///
    /// # Errors
    /// The actor could not be started.
    pub fn with_handler(
        ctx: &zmq::Context,
        user: UserName,
        keypair: Option<crate::keys::Keypair>,
        options: FeedOptions,
        on_event: impl FnMut(FeedEvent) -> bool + Send + 'static,
    ) -> std::io::Result<Feed> {
        Feed::with_locator(ctx, user, keypair, options, None, on_event)
    }

    /// As [`Feed::with_handler`], following groups that move when `locate` is given (see
    /// the module's "Failover").
    ///
    /// # Errors
    /// The actor could not be started.
    pub fn with_locator(
        ctx: &zmq::Context,
        user: UserName,
        keypair: Option<crate::keys::Keypair>,
        options: FeedOptions,
        locate: Option<Locate>,
        on_event: impl FnMut(FeedEvent) -> bool + Send + 'static,
    ) -> std::io::Result<Feed> {
        let mut worker = Worker {
            ctx: ctx.clone(),
            user,
            keypair,
            options,
            groups: HashMap::new(),
            on_event: Box::new(on_event),
            locate,
        };
        let actor = Actor::start(ctx, "agora-feed", move |pipe| worker.run(&pipe))?;
        Ok(Feed { actor })
    }

    /// Follows a group (replacing any earlier spec for the same endpoint).
    pub fn add(&self, spec: GroupSpec) {
        match serde_json::to_vec(&spec) {
            Ok(json) => {
                let _ = self.actor.send(&[b"add", &json]);
            }
            Err(e) => tracing::error!(error = %e, "feed: cannot encode a group spec"),
        }
    }

    /// Stops following the group at `endpoint`, and unsubscribes.
    pub fn remove(&self, endpoint: &str) {
        let _ = self.actor.send(&[b"remove", endpoint.as_bytes()]);
    }
}

struct GroupFeed {
    spec: GroupSpec,
    socket: zmq::Socket,
    backfill: GroupClient,
    group: Option<GroupName>,
    last_seq: Option<u64>,
    next_renew: Instant,
    subscribed: bool,
    /// The node's last seq from a reply, and when to backfill if it is still ahead of us.
    behind: Option<(u64, Instant)>,
    /// The node's push budget for this subscription, in bytes (0: unknown, ack on renewal).
    budget: usize,
    /// Bytes of pushes received since the last ack.
    unacked: usize,
    /// When the node last sent anything on the subscription's socket (or it was made).
    last_heard: Instant,
    /// Not before then is the locator asked again.
    next_locate: Instant,
}

struct Worker {
    ctx: zmq::Context,
    user: UserName,
    keypair: Option<crate::keys::Keypair>,
    options: FeedOptions,
    groups: HashMap<String, GroupFeed>,
    on_event: Box<dyn FnMut(FeedEvent) -> bool + Send>,
    locate: Option<Locate>,
}

/// The consumer hung up.
struct Closed;

impl Worker {
    fn run(&mut self, pipe: &Pipe) {
        loop {
            match self.step(pipe) {
                Ok(true) => {}
                Ok(false) => {
                    for g in self.groups.values() {
                        self.unsubscribe(g);
                    }
                    return;
                }
                Err(Closed) => return,
            }
        }
    }

    /// Handles one command from the owner; false for `$TERM`.
    fn command(&mut self, wake: Wake) -> Result<bool, Closed> {
        let frames = match wake {
            Wake::Term => return Ok(false),
            Wake::Timeout => return Ok(true),
            Wake::Command(frames) => frames,
        };
        match frames.as_slice() {
            [verb, json] if verb == b"add" => match serde_json::from_slice::<GroupSpec>(json) {
                Ok(spec) => {
                    if let Err(error) = self.add(spec.clone()) {
                        self.emit(FeedEvent::Error {
                            label: spec.label,
                            error,
                            fatal: true,
                        })?;
                    }
                }
                Err(e) => tracing::error!(error = %e, "feed: bad add command"),
            },
            [verb, endpoint] if verb == b"remove" => {
                if let Some(g) = self
                    .groups
                    .remove(String::from_utf8_lossy(endpoint).as_ref())
                {
                    self.unsubscribe(&g);
                }
            }
            _ => tracing::warn!("feed: unknown command"),
        }
        Ok(true)
    }

    fn add(&mut self, spec: GroupSpec) -> Result<(), ClientError> {
        let g = self.connect(spec)?;
        if let Some(old) = self.groups.insert(g.spec.endpoint.clone(), g) {
            self.unsubscribe(&old);
        }
        Ok(())
    }

    /// The subscription of `spec`, connected (not yet subscribed).
    fn connect(&self, spec: GroupSpec) -> Result<GroupFeed, ClientError> {
        let curve = match (&self.keypair, spec.server_key) {
            (Some(keypair), Some(server_key)) => Some(crate::client::ClientCurve {
                keypair: keypair.clone(),
                server_key,
            }),
            (Some(_), None) => {
                return Err(ClientError::Server(WireError::new(
                    ErrorCode::Unknown,
                    format!("no CURVE key known for {}", spec.endpoint),
                )))
            }
            (None, _) => None,
        };
        let socket = self.ctx.socket(zmq::DEALER)?;
        socket.set_linger(0)?;
        // Renewals are not queued for a connection that is not up.
        socket.set_immediate(true)?;
        socket.set_sndhwm(16)?;
        socket.set_rcvhwm(10_000)?;
        socket.set_heartbeat_ivl(1000)?;
        socket.set_heartbeat_timeout(3000)?;
        socket.set_maxmsgsize(crate::client::MAX_REPLY_BYTES)?;
        if let Some(curve) = &curve {
            socket.set_curve_serverkey(curve.server_key.as_bytes())?;
            socket.set_curve_publickey(curve.keypair.public.as_bytes())?;
            socket.set_curve_secretkey(curve.keypair.secret_bytes())?;
        }
        socket.connect(&spec.endpoint)?;
        let mut backfill = GroupClient::new(
            &self.ctx,
            &spec.endpoint,
            self.user.clone(),
            spec.group.clone(),
            self.options.client,
        );
        if let Some(curve) = curve {
            backfill = backfill.with_curve(curve);
        }
        let g = GroupFeed {
            group: spec.group.clone(),
            last_seq: spec.after_seq,
            socket,
            backfill,
            next_renew: Instant::now(),
            subscribed: false,
            behind: None,
            budget: 0,
            unacked: 0,
            last_heard: Instant::now(),
            next_locate: Instant::now(),
            spec,
        };
        Ok(g)
    }

    /// Asks the locator where the group of subscription `key` is now, and moves the
    /// subscription there if it moved, keeping its last delivered seq (the new node's
    /// reply reveals what was missed, and it is backfilled).
    fn relocate(&mut self, key: &str, now: Instant) -> Result<(), Closed> {
        let Some(g) = self.groups.get_mut(key) else {
            return Ok(());
        };
        g.next_locate = now + self.options.relocate_after;
        let (Some(group), Some(locate)) = (g.group.clone(), self.locate.as_mut()) else {
            return Ok(());
        };
        let Some((endpoint, server_key)) = locate(&group) else {
            return Ok(());
        };
        if endpoint == g.spec.endpoint {
            return Ok(());
        }
        tracing::info!(%group, from = %g.spec.endpoint, to = %endpoint, "the group moved; following it");
        let spec = GroupSpec {
            endpoint,
            server_key,
            after_seq: g.last_seq,
            ..g.spec.clone()
        };
        let label = spec.label.clone();
        match self.connect(spec) {
            Ok(moved) => {
                if let Some(old) = self.groups.insert(key.to_owned(), moved) {
                    self.unsubscribe(&old);
                }
                Ok(())
            }
            Err(error) => self.emit(FeedEvent::Error {
                label,
                error,
                fatal: false,
            }),
        }
    }

    fn membership(&self, g: &GroupFeed) -> MembershipRequest {
        MembershipRequest {
            group: g.group.clone(),
            user: self.user.clone(),
        }
    }

    /// The `subscribe` that renews `g`'s subscription and acks what was handed on.
    fn subscribe_request(&self, g: &GroupFeed) -> NodeRequest {
        NodeRequest::Subscribe(SubscribeRequest {
            group: g.group.clone(),
            user: self.user.clone(),
            batch: true,
            acked_seq: g.last_seq,
        })
    }

    /// Renews (and acks) now; on `EAGAIN` (no connection yet) tries again shortly.
    fn renew(&mut self, key: &str, now: Instant) {
        let Some(g) = self.groups.get(key) else {
            return;
        };
        let frames = encode_request(&self.subscribe_request(g));
        let next = match send_dealer(&g.socket, &frames) {
            Ok(()) => self.options.renew,
            Err(_) => RETRY_UNCONNECTED.min(self.options.renew),
        };
        if let Some(g) = self.groups.get_mut(key) {
            g.next_renew = now + next;
            g.unacked = 0;
        }
    }

    fn unsubscribe(&self, g: &GroupFeed) {
        let frames = encode_request(&NodeRequest::Unsubscribe(self.membership(g)));
        let _ = g.socket.set_linger(200);
        let _ = send_dealer(&g.socket, &frames);
    }

    fn emit(&mut self, event: FeedEvent) -> Result<(), Closed> {
        if (self.on_event)(event) {
            Ok(())
        } else {
            Err(Closed)
        }
    }

    /// One round: renew what is due, wait for traffic or a command, handle them. False once
    /// the owner said stop.
    fn step(&mut self, pipe: &Pipe) -> Result<bool, Closed> {
        let now = Instant::now();
        // With no group, nothing is due: wait for a command.
        let mut wait: Option<Duration> = None;
        let due: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.next_renew <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.renew(&key, now);
        }
        if self.locate.is_some() {
            let after = self.options.relocate_after;
            let lost: Vec<String> = self
                .groups
                .iter()
                .filter(|(_, g)| {
                    now.saturating_duration_since(g.last_heard) >= after && g.next_locate <= now
                })
                .map(|(k, _)| k.clone())
                .collect();
            for key in lost {
                self.relocate(&key, now)?;
            }
        }
        let lagging: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.behind.is_some_and(|(_, at)| at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in lagging {
            let Some(g) = self.groups.get_mut(&key) else {
                continue;
            };
            let target = g.behind.take().map_or(0, |(seq, _)| seq);
            if g.last_seq.unwrap_or(0) < target {
                self.backfill(&key)?;
            }
        }
        let mut sooner = |d: Duration| wait = Some(wait.map_or(d, |w| w.min(d)));
        for g in self.groups.values() {
            sooner(g.next_renew.saturating_duration_since(now));
            if let Some((_, at)) = g.behind {
                sooner(at.saturating_duration_since(now));
            }
        }
        let keys: Vec<String> = self.groups.keys().cloned().collect();
        let (command, ready): (bool, Vec<bool>) = {
            let mut items: Vec<zmq::PollItem<'_>> = std::iter::once(pipe.as_poll_item())
                .chain(
                    keys.iter()
                        .filter_map(|k| self.groups.get(k))
                        .map(|g| g.socket.as_poll_item(zmq::POLLIN)),
                )
                .collect();
            let ms = wait.map_or(-1, |w| i64::try_from(w.as_millis()).unwrap_or(i64::MAX));
            match zmq::poll(&mut items, ms) {
                Ok(_) => (
                    items[0].is_readable(),
                    items[1..].iter().map(zmq::PollItem::is_readable).collect(),
                ),
                Err(zmq::Error::EINTR) => return Ok(true),
                Err(_) => return Ok(false),
            }
        };
        if command && !self.command(pipe.take())? {
            return Ok(false);
        }
        for (key, readable) in keys.iter().zip(ready) {
            if !readable {
                continue;
            }
            while let Some(g) = self.groups.get_mut(key) {
                match g.socket.recv_multipart(zmq::DONTWAIT) {
                    Ok(frames) => {
                        g.last_heard = Instant::now();
                        self.handle(key, &frames)?;
                    }
                    Err(_) => break,
                }
            }
        }
        Ok(true)
    }

    fn handle(&mut self, key: &str, frames: &Frames) -> Result<(), Closed> {
        let [empty, sig, body] = frames.as_slice() else {
            return Ok(());
        };
        if !empty.is_empty() || sig.as_slice() != PROTOCOL {
            return Ok(());
        }
        // Pushes as nodes encode them are recognised by their start, and parsed once.
        if body.starts_with(br#"{"event":"entries","#) {
            if let Ok(batch) = serde_json::from_slice::<PushBatch>(body) {
                for entry in batch.entries {
                    self.deliver(key, batch.group.clone(), entry, true)?;
                }
            }
            return self.pushed(key, body.len());
        }
        if body.starts_with(br#"{"event":"entry","#) {
            if let Ok(event) = serde_json::from_slice::<PushEvent>(body) {
                self.deliver(key, event.group, event.entry, true)?;
            }
            return self.pushed(key, body.len());
        }
        #[derive(serde::Deserialize)]
        struct Head {
            ok: Option<bool>,
            event: Option<String>,
            last_seq: Option<u64>,
        }
        let Ok(head) = serde_json::from_slice::<Head>(body) else {
            return Ok(());
        };
        let head_ok = match (head.ok, head.event.as_deref()) {
            (Some(ok), _) => ok,
            (None, Some("entry" | "entries")) => {
                // A push from an encoder that orders members differently.
                return self.handle_push(key, body);
            }
            (None, Some("unsubscribed")) => {
                // The node ended the subscription (lease, eviction): subscribe again now.
                if let Some(g) = self.groups.get_mut(key) {
                    g.subscribed = false;
                    g.next_renew = Instant::now();
                }
                return Ok(());
            }
            (None, _) => return Ok(()), // an event this client does not know
        };
        if !head_ok {
            let error = serde_json::from_slice::<WireError>(body)
                .unwrap_or_else(|e| WireError::new(ErrorCode::Unknown, e.to_string()));
            let fatal = matches!(error.code, ErrorCode::NotMember | ErrorCode::UnknownGroup);
            let label = if fatal {
                self.groups.remove(key).map(|g| g.spec.label)
            } else {
                self.groups.get(key).map(|g| g.spec.label.clone())
            };
            let Some(label) = label else {
                return Ok(());
            };
            return self.emit(FeedEvent::Error {
                label,
                error: ClientError::Server(error),
                fatal,
            });
        }
        if head.last_seq.is_none() {
            return Ok(()); // the reply to an unsubscribe
        }
        let Ok(reply) = serde_json::from_slice::<SubscribeReply>(body) else {
            return Ok(());
        };
        let Some(g) = self.groups.get_mut(key) else {
            return Ok(());
        };
        g.group = Some(reply.group.clone());
        g.budget = usize::try_from(reply.budget_bytes).unwrap_or(usize::MAX);
        let first = !g.subscribed;
        g.subscribed = true;
        let last = *g.last_seq.get_or_insert(reply.last_seq);
        if reply.last_seq > last {
            // Entries up to last_seq may still be on their way as pushes: give them a moment.
            let at = Instant::now() + PUSH_GRACE;
            g.behind = Some(match g.behind {
                Some((seq, t)) => (seq.max(reply.last_seq), t.min(at)),
                None => (reply.last_seq, at),
            });
        }
        let label = g.spec.label.clone();
        if first {
            self.emit(FeedEvent::Subscribed {
                label,
                group: reply.group,
                last_seq: reply.last_seq,
            })?;
        }
        Ok(())
    }

    /// Decodes a push whatever the order of its members.
    fn handle_push(&mut self, key: &str, body: &[u8]) -> Result<(), Closed> {
        if let Ok(batch) = serde_json::from_slice::<PushBatch>(body) {
            if batch.event == "entries" {
                for entry in batch.entries {
                    self.deliver(key, batch.group.clone(), entry, true)?;
                }
            }
        } else if let Ok(event) = serde_json::from_slice::<PushEvent>(body) {
            if event.event == "entry" {
                self.deliver(key, event.group, event.entry, true)?;
            }
        }
        self.pushed(key, body.len())
    }

    /// Counts a push of `bytes` handed on; acks at once past half the node's budget or
    /// [`ACK_EVERY_BYTES`].
    fn pushed(&mut self, key: &str, bytes: usize) -> Result<(), Closed> {
        let Some(g) = self.groups.get_mut(key) else {
            return Ok(());
        };
        g.unacked += bytes;
        if g.budget > 0 && g.unacked >= (g.budget / 2).min(ACK_EVERY_BYTES) {
            self.renew(key, Instant::now());
        }
        Ok(())
    }

    /// Hands `entry` to the consumer unless it is a duplicate; a live entry past the next
    /// expected seq triggers a backfill first, and is dropped (to be read back in order
    /// later) if the backfill cannot close the gap. A backfilled entry past a gap (its
    /// predecessors were deleted by retention) is delivered as it is.
    fn deliver(
        &mut self,
        key: &str,
        group: GroupName,
        entry: Message,
        live: bool,
    ) -> Result<(), Closed> {
        let Some(g) = self.groups.get_mut(key) else {
            return Ok(());
        };
        let last = *g.last_seq.get_or_insert(entry.seq.saturating_sub(1));
        if entry.seq <= last {
            return Ok(());
        }
        if entry.seq > last + 1 && live {
            self.backfill(key)?;
            let Some(g) = self.groups.get_mut(key) else {
                return Ok(());
            };
            let last = g.last_seq.unwrap_or(0);
            if entry.seq > last + 1 {
                // The backfill could not close the gap (node unreachable). Showing this
                // entry now would skip the missing ones for good: drop it, and read it
                // from the log in order once the node answers again.
                g.behind = Some((entry.seq, Instant::now() + PUSH_GRACE));
                return Ok(());
            }
            return self.deliver(key, group, entry, false);
        }
        g.last_seq = Some(entry.seq);
        let label = g.spec.label.clone();
        self.emit(FeedEvent::Entry {
            label,
            group,
            entry,
            live,
        })
    }

    /// Reads every entry after the last delivered one from the log, a page at a time.
    fn backfill(&mut self, key: &str) -> Result<(), Closed> {
        loop {
            let Some(g) = self.groups.get_mut(key) else {
                return Ok(());
            };
            let after = g.last_seq.unwrap_or(0);
            match g
                .backfill
                .get_messages(HistoryQuery::AfterSeq(after), Some(1000))
            {
                Ok(page) => {
                    let more = page.more && !page.messages.is_empty();
                    for entry in page.messages {
                        self.deliver(key, page.group.clone(), entry, false)?;
                    }
                    if !more {
                        return Ok(());
                    }
                }
                Err(error) => {
                    let label = g.spec.label.clone();
                    return self.emit(FeedEvent::Error {
                        label,
                        error,
                        fatal: false,
                    });
                }
            }
        }
    }
}

/// Sends a request on a DEALER: the empty delimiter a REQ would add, then the frames.
fn send_dealer(socket: &zmq::Socket, frames: &Frames) -> Result<(), zmq::Error> {
    socket.send_multipart(
        std::iter::once(&[][..]).chain(frames.iter().map(Vec::as_slice)),
        zmq::DONTWAIT,
    )
}
