//! The live stream, client side: the zguide's "Clone" pattern (chapter 5) on Agora's log.
//!
//! A [`Feed`] is an [`Actor`]: one thread that owns ONE DEALER socket per host (a group host
//! or a node of one), whatever the number of its groups followed, woken at once by a stop or
//! a command (`add`, `remove`) on its pipe. It sends `subscribe` for each group and renews
//! them every [`FeedOptions::renew`], with one `renew` per host (PROTOCOL §6.7.1, up to
//! [`MAX_RENEW_GROUPS`] groups each) once the host has two or more groups followed, or one
//! `subscribe` per group from a host that answers `renew` with `unknown_action`. The node
//! pushes every new log entry to that connection. The feed remembers the last seq it
//! delivered per group and hands entries to the consumer in seq order, each exactly once:
//!
//! - an entry at or below the last seq is a duplicate and is skipped;
//! - an entry past the next expected seq reveals a gap (a push dropped at the node's HWM, a
//!   reconnect after a node restart): the feed reads the missing entries from the log with
//!   `get_messages after_seq`, then goes on;
//! - every renewal reply carries the node's `last_seq`, so a gap is found even when no push
//!   arrives (an idle group after a restart, a client that was offline).
//!
//! # Demultiplexing
//! Everything a host sends names its group: pushes, `subscribe` (and `renew`) replies,
//! history pages, and errors ([`WireError::group`]); each goes to that group's state. A
//! message naming no group is logged and dropped, never guessed, with two exceptions that
//! are not guesses: `unknown_action` naming no group answers a `renew` (the host predates
//! it), and a host followed for one group only (a node of one, older than group hosts, does
//! not name the group in its errors) has that one group. `not_member` and `unknown_group`
//! end one group, never the connection; `unsubscribed` makes the feed subscribe that group
//! again. A spec without a group name ([`GroupSpec::group`] `None`: a node of one) is filed
//! under the name its node's `subscribe` reply gives.
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
//! Backfill goes over the same DEALER (`get_messages`, one page in flight per group, awaited
//! for [`FeedOptions::client`]'s timeout, then tried again after a renewal): one connection
//! per host, and a host that dies in the middle of a backfill holds no other host's groups
//! back.
//! The consumer receives [`FeedEvent`]s in a handler called on the feed's thread
//! ([`Feed::with_handler`]: the interactive client prints there, with no relay thread) or
//! through a bounded channel ([`Feed::start`]): a slow consumer slows the feed, the node drops
//! pushes to it at its HWM, and the feed backfills later.
//!
//! # Failover
//! A feed given a locator ([`Feed::with_locator`], a registry lookup) notices a host that
//! stops answering: when nothing comes on its connection for
//! [`FeedOptions::relocate_after`], it asks the locator where each of the host's groups is
//! now, and moves each one that moved (a standby took over, a node restarted elsewhere; the
//! groups may land on different hosts), subscribing there after the last seq it delivered:
//! the new host's reply reveals the gap and the feed backfills it, so the consumer sees
//! every entry once and in order across the move.
//!
//! # Calls: commands over the same connection
//! [`Feed::call`] sends any request (its data frame too: `upload_chunk`, `download`) on the
//! host's DEALER, made for it if the feed does not hold one yet (and later used for
//! following), behind a tag frame of its own: `[TAG, "", "AGORA/1", body]`. The host echoes
//! every frame before the delimiter (PROTOCOL §2; the zguide's extended reply envelope,
//! chapter 3), so the reply comes back as `[TAG, "", "AGORA/1", reply]` and is told from the
//! feed's own traffic, which carries no tag (pushes come behind the envelope of the
//! `subscribe` that made the subscription). A reply not back within the call's timeout is
//! answered [`ClientError::Timeout`]; one that comes later is dropped. A host reached only
//! for calls is closed after [`CALL_HOST_IDLE`] without one. [`FeedLink`] makes this an
//! [`Exchange`], for the typed views ([`crate::client::HostView`]): the prompt follows and
//! commands the groups of a host over one connection.
//!
//! # Pipe commands
//! `["add", GROUPSPEC_JSON]`, `["remove", ENDPOINT]` (every group there) and
//! `["remove", ENDPOINT, GROUP]`; `["call"]` (calls waiting in the feed's bounded call
//! queue); `$TERM` unsubscribes every group and stops.

use std::collections::HashMap;

/// The feed acks (renews with `acked_seq`) at least every this many pushed bytes (256 KiB),
/// even when the node's budget for it is larger.
pub const ACK_EVERY_BYTES: usize = 256 << 10;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::{Duration, Instant};

use crate::actor::{Actor, Pipe, Wake};
use crate::client::{get_messages_request, ClientError, ClientOptions, Exchange};
use agora_proto::action::NodeRequest;
use agora_proto::codec::{encode_request, Frames};
use agora_proto::wire::{
    ErrorCode, GroupName, HistoryQuery, MembershipRequest, Message, MessagesPage, PushBatch,
    PushEvent, RenewEntry, RenewReply, RenewRequest, SubscribeReply, SubscribeRequest, UserName,
    WireError, MAX_RENEW_GROUPS, PROTOCOL,
};

/// A host the feed reaches only for calls (no group followed there) is closed after this
/// long without one (60 s).
pub const CALL_HOST_IDLE: Duration = Duration::from_secs(60);

/// The most calls waiting for the feed's thread to take them (64); past it
/// [`Feed::call`] answers `EAGAIN` at once.
pub const MAX_QUEUED_CALLS: usize = 64;

/// How long past a call's own timeout its caller waits for the feed's thread to answer it
/// (which it always does by the timeout, unless stopped).
const CALL_GRACE: Duration = Duration::from_secs(1);

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
    /// How long a backfill page is awaited (`timeout`; `attempts` is not used: a page not
    /// answered is asked for again after a renewal).
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
    /// Calls for the feed's thread, which takes them when `["call"]` wakes it.
    calls: SyncSender<Call>,
}

/// What a call's caller receives: the reply's frames (signature, body, and a data frame for
/// `download`), or why there is none.
pub type CallReply = Result<Frames, ClientError>;

/// A request for the feed's thread to send on a host's connection ([`Feed::call`]).
struct Call {
    endpoint: String,
    server_key: Option<crate::keys::PublicKey>,
    frames: Frames,
    timeout: Duration,
    reply: SyncSender<CallReply>,
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
        let (calls, queued) = mpsc::sync_channel(MAX_QUEUED_CALLS);
        let mut worker = Worker {
            ctx: ctx.clone(),
            user,
            keypair,
            options,
            hosts: HashMap::new(),
            on_event: Box::new(on_event),
            locate,
            calls: queued,
            next_tag: 0,
        };
        let actor = Actor::start(ctx, "agora-feed", move |pipe| worker.run(&pipe))?;
        Ok(Feed { actor, calls })
    }

    /// Sends `frames` (a request: signature, body, and a data frame for `upload_chunk`) to
    /// the host at `endpoint` over the feed's connection to it, made now if the feed holds
    /// none (CURVE with `server_key` when the feed has a key pair), and returns where the
    /// reply will come: its frames, [`ClientError::Timeout`] when none came within
    /// `timeout` (a later one is dropped), or the connection's failure. Nothing is retried.
    /// See the module's "Calls".
    pub fn call(
        &self,
        endpoint: &str,
        server_key: Option<crate::keys::PublicKey>,
        frames: Frames,
        timeout: Duration,
    ) -> Receiver<CallReply> {
        let (reply, rx) = mpsc::sync_channel(1);
        let call = Call {
            endpoint: endpoint.to_owned(),
            server_key,
            frames,
            timeout,
            reply,
        };
        match self.calls.try_send(call) {
            Ok(()) => {
                // The call waits in the queue; the worker takes it when woken (or at its
                // next round, should the pipe be full).
                let _ = self.actor.send(&[b"call"]);
            }
            Err(mpsc::TrySendError::Full(call) | mpsc::TrySendError::Disconnected(call)) => {
                let _ = call
                    .reply
                    .try_send(Err(ClientError::Zmq(zmq::Error::EAGAIN)));
            }
        }
        rx
    }

    /// As [`Feed::call`], waiting for the reply.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when no reply came within `timeout` (or the feed stopped);
    /// [`ClientError::Zmq`] for the connection's failure or a full call queue.
    pub fn request(
        &self,
        endpoint: &str,
        server_key: Option<crate::keys::PublicKey>,
        frames: Frames,
        timeout: Duration,
    ) -> CallReply {
        let rx = self.call(endpoint, server_key, frames, timeout);
        rx.recv_timeout(timeout + CALL_GRACE).unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                endpoint: endpoint.to_owned(),
                waited: timeout,
            })
        })
    }

    /// The calls of the host at `endpoint` over this feed's connection, as an
    /// [`Exchange`] for the typed views: each request waits and is tried again as
    /// `options` says (a new tag per attempt; every request is safe to repeat).
    pub fn link(
        &self,
        endpoint: &str,
        server_key: Option<crate::keys::PublicKey>,
        options: ClientOptions,
    ) -> FeedLink<'_> {
        FeedLink {
            feed: self,
            endpoint: endpoint.to_owned(),
            server_key,
            options,
        }
    }

    /// Follows a group over its host's one connection (replacing any earlier spec of the
    /// same group at that endpoint; a spec without a group replaces the endpoint's earlier
    /// one without).
    pub fn add(&self, spec: GroupSpec) {
        match serde_json::to_vec(&spec) {
            Ok(json) => {
                let _ = self.actor.send(&[b"add", &json]);
            }
            Err(e) => tracing::error!(error = %e, "feed: cannot encode a group spec"),
        }
    }

    /// Stops following every group at `endpoint`, unsubscribes, and closes the connection.
    pub fn remove(&self, endpoint: &str) {
        let _ = self.actor.send(&[b"remove", endpoint.as_bytes()]);
    }

    /// Stops following `group` at `endpoint` (or at the host it moved to since), and
    /// unsubscribes; the connection stays for the host's other groups.
    pub fn remove_group(&self, endpoint: &str, group: &GroupName) {
        let _ = self
            .actor
            .send(&[b"remove", endpoint.as_bytes(), group.as_str().as_bytes()]);
    }
}

/// A host's calls over a [`Feed`]'s connection ([`Feed::link`]): an [`Exchange`].
#[derive(Debug)]
pub struct FeedLink<'f> {
    feed: &'f Feed,
    endpoint: String,
    server_key: Option<crate::keys::PublicKey>,
    options: ClientOptions,
}

impl Exchange for FeedLink<'_> {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Up to `attempts` calls, each waiting its share of `timeout`, as a Lazy Pirate
    /// client retries (a DEALER needs no new socket: the next attempt has a new tag).
    fn request_frames(&mut self, frames: &Frames) -> Result<Frames, ClientError> {
        let attempts = self.options.attempts.max(1);
        let per_attempt = self.options.timeout / attempts;
        for attempt in 1..=attempts {
            match self
                .feed
                .request(&self.endpoint, self.server_key, frames.clone(), per_attempt)
            {
                Err(ClientError::Timeout { .. }) => {
                    tracing::debug!(endpoint = %self.endpoint, attempt, "no reply to a call");
                }
                reply => return reply,
            }
        }
        Err(ClientError::Timeout {
            endpoint: self.endpoint.clone(),
            waited: self.options.timeout,
        })
    }
}

/// A call sent (or waiting for the connection) and not answered yet.
struct PendingCall {
    /// The request, until it is sent.
    unsent: Option<Frames>,
    timeout: Duration,
    deadline: Instant,
    reply: SyncSender<CallReply>,
}

/// One followed group of a host.
struct GroupFeed {
    spec: GroupSpec,
    last_seq: Option<u64>,
    subscribed: bool,
    /// The node's last seq from a reply, and when to backfill if it is still ahead of us.
    behind: Option<(u64, Instant)>,
    /// The node's push budget for this subscription, in bytes (0: unknown, ack on renewal).
    budget: usize,
    /// Bytes of pushes received since the last ack.
    unacked: usize,
    /// A backfill page asked for and not answered yet: until when it is awaited.
    paging: Option<Instant>,
}

impl GroupFeed {
    fn new(spec: GroupSpec) -> GroupFeed {
        GroupFeed {
            last_seq: spec.after_seq,
            spec,
            subscribed: false,
            behind: None,
            budget: 0,
            unacked: 0,
            paging: None,
        }
    }
}

/// Whether a host answers `renew` (PROTOCOL §6.7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RenewSupport {
    /// Not asked yet (or asked, no answer yet).
    Untried,
    /// It answered a `renew`.
    Answered,
    /// It answered `unknown_action` (a node older than §6.7.1): renew group by group.
    Refused,
}

/// One host's connection and the groups followed over it.
struct HostFeed {
    socket: zmq::Socket,
    /// The groups, by name.
    groups: HashMap<GroupName, GroupFeed>,
    /// A spec without a group name (a node of one names it in its `subscribe` reply, which
    /// files it under that name).
    unnamed: Option<GroupFeed>,
    /// When every group of the host is renewed next (one `renew` per
    /// [`MAX_RENEW_GROUPS`]).
    next_renew: Instant,
    renew: RenewSupport,
    /// When the host last sent anything on the connection (or it was made).
    last_heard: Instant,
    /// Not before then is the locator asked again.
    next_locate: Instant,
    /// Calls not answered yet, by tag.
    calls: HashMap<u64, PendingCall>,
    /// When the last call was made here, if any.
    last_call: Option<Instant>,
}

impl HostFeed {
    /// No group followed, no call waiting, and none made for [`CALL_HOST_IDLE`]: the
    /// connection can go.
    fn is_empty(&self) -> bool {
        self.groups.is_empty()
            && self.unnamed.is_none()
            && self.calls.is_empty()
            && self
                .last_call
                .is_none_or(|at| at.elapsed() >= CALL_HOST_IDLE)
    }

    /// When a host that follows nothing may be closed, if it is kept for calls.
    fn idle_at(&self) -> Option<Instant> {
        if !self.groups.is_empty() || self.unnamed.is_some() || !self.calls.is_empty() {
            return None;
        }
        self.last_call.map(|at| at + CALL_HOST_IDLE)
    }

    /// Sends the calls waiting for the connection, until one does not go (no connection
    /// yet, or its queue is full); a call the socket refuses otherwise is answered so.
    fn flush_calls(&mut self) {
        let mut failed: Vec<(u64, zmq::Error)> = Vec::new();
        let mut tags: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.unsent.is_some())
            .map(|(tag, _)| *tag)
            .collect();
        tags.sort_unstable();
        for tag in tags {
            let Some(call) = self.calls.get_mut(&tag) else {
                continue;
            };
            let Some(frames) = call.unsent.take() else {
                continue;
            };
            match send_tagged(&self.socket, tag, &frames) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => {
                    call.unsent = Some(frames);
                    break;
                }
                Err(e) => failed.push((tag, e)),
            }
        }
        for (tag, e) in failed {
            if let Some(call) = self.calls.remove(&tag) {
                let _ = call.reply.try_send(Err(ClientError::Zmq(e)));
            }
        }
    }

    fn has_unsent(&self) -> bool {
        self.calls.values().any(|c| c.unsent.is_some())
    }

    fn group_mut(&mut self, group: Option<&GroupName>) -> Option<&mut GroupFeed> {
        match group {
            Some(name) => self.groups.get_mut(name),
            None => self.unnamed.as_mut(),
        }
    }

    /// The one group of a host followed for one group only, named or not.
    fn only_group(&self) -> Option<Option<GroupName>> {
        match (self.groups.len(), &self.unnamed) {
            (1, None) => self.groups.keys().next().cloned().map(Some),
            (0, Some(_)) => Some(None),
            _ => None,
        }
    }
}

struct Worker {
    ctx: zmq::Context,
    user: UserName,
    keypair: Option<crate::keys::Keypair>,
    options: FeedOptions,
    /// By endpoint: one DEALER per host.
    hosts: HashMap<String, HostFeed>,
    on_event: Box<dyn FnMut(FeedEvent) -> bool + Send>,
    locate: Option<Locate>,
    /// Calls from [`Feed::call`], taken when `["call"]` wakes the thread.
    calls: Receiver<Call>,
    /// The tag of the next call (unique for the feed's life).
    next_tag: u64,
}

/// The consumer hung up.
struct Closed;

impl Worker {
    fn run(&mut self, pipe: &Pipe) {
        loop {
            match self.step(pipe) {
                Ok(true) => {}
                Ok(false) => {
                    for host in self.hosts.values() {
                        for name in host.groups.keys() {
                            self.unsubscribe(host, Some(name));
                        }
                        if host.unnamed.is_some() {
                            self.unsubscribe(host, None);
                        }
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
                    let label = spec.label.clone();
                    if let Err(error) = self.add(spec) {
                        self.emit(FeedEvent::Error {
                            label,
                            error,
                            fatal: true,
                        })?;
                    }
                }
                Err(e) => tracing::error!(error = %e, "feed: bad add command"),
            },
            [verb] if verb == b"call" => self.take_calls(),
            [verb, endpoint] if verb == b"remove" => {
                let endpoint = String::from_utf8_lossy(endpoint).into_owned();
                if let Some(host) = self.hosts.get_mut(&endpoint) {
                    let groups = std::mem::take(&mut host.groups);
                    let unnamed = host.unnamed.take();
                    if let Some(host) = self.hosts.get(&endpoint) {
                        for name in groups.keys() {
                            self.unsubscribe(host, Some(name));
                        }
                        if unnamed.is_some() {
                            self.unsubscribe(host, None);
                        }
                    }
                    // Kept while calls use it.
                    if self.hosts.get(&endpoint).is_some_and(HostFeed::is_empty) {
                        self.hosts.remove(&endpoint);
                    }
                }
            }
            [verb, endpoint, group] if verb == b"remove" => {
                match GroupName::new(String::from_utf8_lossy(group).as_ref()) {
                    Ok(group) => self.remove_group(&String::from_utf8_lossy(endpoint), &group),
                    Err(e) => tracing::error!(error = %e, "feed: bad remove command"),
                }
            }
            _ => tracing::warn!("feed: unknown command"),
        }
        Ok(true)
    }

    /// Follows `spec` over its host's connection (made if it is the host's first group),
    /// replacing an earlier spec of the same group there, and subscribes now.
    fn add(&mut self, spec: GroupSpec) -> Result<(), ClientError> {
        let endpoint = spec.endpoint.clone();
        if !self.hosts.contains_key(&endpoint) {
            let host = self.connect(&endpoint, spec.server_key)?;
            self.hosts.insert(endpoint.clone(), host);
        }
        let name = spec.group.clone();
        let Some(host) = self.hosts.get_mut(&endpoint) else {
            return Ok(());
        };
        match &name {
            Some(name) => {
                host.groups.insert(name.clone(), GroupFeed::new(spec));
            }
            None => host.unnamed = Some(GroupFeed::new(spec)),
        }
        self.subscribe(&endpoint, name.as_ref(), Instant::now());
        Ok(())
    }

    /// Stops following `group` at `endpoint` (or wherever it moved to), and unsubscribes;
    /// a host left with no group is disconnected.
    fn remove_group(&mut self, endpoint: &str, group: &GroupName) {
        let at = if self
            .hosts
            .get(endpoint)
            .is_some_and(|h| h.groups.contains_key(group))
        {
            Some(endpoint.to_owned())
        } else {
            self.hosts
                .iter()
                .find(|(_, h)| h.groups.contains_key(group))
                .map(|(e, _)| e.clone())
        };
        let Some(at) = at else {
            return;
        };
        if let Some(host) = self.hosts.get_mut(&at) {
            host.groups.remove(group);
        }
        if let Some(host) = self.hosts.get(&at) {
            self.unsubscribe(host, Some(group));
            if host.is_empty() {
                self.hosts.remove(&at);
            }
        }
    }

    /// A connection to the host at `endpoint` (not yet subscribed to anything).
    fn connect(
        &self,
        endpoint: &str,
        server_key: Option<crate::keys::PublicKey>,
    ) -> Result<HostFeed, ClientError> {
        let curve = match (&self.keypair, server_key) {
            (Some(keypair), Some(server_key)) => Some(crate::client::ClientCurve {
                keypair: keypair.clone(),
                server_key,
            }),
            (Some(_), None) => {
                return Err(ClientError::Server(WireError::new(
                    ErrorCode::Unknown,
                    format!("no CURVE key known for {endpoint}"),
                )))
            }
            (None, _) => None,
        };
        let socket = self.ctx.socket(zmq::DEALER)?;
        socket.set_linger(0)?;
        // Renewals are not queued for a connection that is not up.
        socket.set_immediate(true)?;
        socket.set_sndhwm(1000)?;
        socket.set_rcvhwm(10_000)?;
        socket.set_heartbeat_ivl(1000)?;
        socket.set_heartbeat_timeout(3000)?;
        socket.set_maxmsgsize(crate::client::MAX_REPLY_BYTES)?;
        if let Some(curve) = &curve {
            socket.set_curve_serverkey(curve.server_key.as_bytes())?;
            socket.set_curve_publickey(curve.keypair.public.as_bytes())?;
            socket.set_curve_secretkey(curve.keypair.secret_bytes())?;
        }
        socket.connect(endpoint)?;
        let now = Instant::now();
        Ok(HostFeed {
            socket,
            groups: HashMap::new(),
            unnamed: None,
            next_renew: now + self.options.renew,
            renew: RenewSupport::Untried,
            last_heard: now,
            next_locate: now,
            calls: HashMap::new(),
            last_call: None,
        })
    }

    /// Takes every call waiting in the queue and sends it (connecting to its host first if
    /// need be).
    fn take_calls(&mut self) {
        while let Ok(call) = self.calls.try_recv() {
            self.start_call(call);
        }
    }

    /// Sends one call on its host's connection (made now if the feed holds none), behind
    /// a tag of its own; a host not connected yet gets it once the connection is up.
    fn start_call(&mut self, call: Call) {
        let now = Instant::now();
        if !self.hosts.contains_key(&call.endpoint) {
            match self.connect(&call.endpoint, call.server_key) {
                Ok(host) => {
                    self.hosts.insert(call.endpoint.clone(), host);
                }
                Err(e) => {
                    let _ = call.reply.try_send(Err(e));
                    return;
                }
            }
        }
        let Some(host) = self.hosts.get_mut(&call.endpoint) else {
            return;
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        host.last_call = Some(now);
        host.calls.insert(
            tag,
            PendingCall {
                unsent: Some(call.frames),
                timeout: call.timeout,
                deadline: now + call.timeout,
                reply: call.reply,
            },
        );
        host.flush_calls();
    }

    /// A tagged message from the host at `endpoint`: the reply to the call of that tag,
    /// handed to its caller (one whose call timed out is dropped).
    fn answer_call(&mut self, endpoint: &str, mut frames: Frames) {
        let tag = frames
            .first()
            .and_then(|t| <[u8; 8]>::try_from(t.as_slice()).ok())
            .map(u64::from_be_bytes);
        let call = tag.and_then(|tag| {
            self.hosts
                .get_mut(endpoint)
                .and_then(|h| h.calls.remove(&tag))
        });
        match call {
            Some(call) => {
                let reply = frames.split_off(2);
                let _ = call.reply.try_send(Ok(reply));
            }
            None => {
                tracing::debug!(%endpoint, "feed: a reply to no call waiting (timed out); dropped")
            }
        }
    }

    /// Answers the calls past their deadline with a timeout; closes hosts kept for calls
    /// only that have been idle for [`CALL_HOST_IDLE`].
    fn expire_calls(&mut self, now: Instant) {
        let mut idle: Vec<String> = Vec::new();
        for (endpoint, host) in &mut self.hosts {
            let late: Vec<u64> = host
                .calls
                .iter()
                .filter(|(_, c)| c.deadline <= now)
                .map(|(tag, _)| *tag)
                .collect();
            for tag in late {
                if let Some(call) = host.calls.remove(&tag) {
                    let _ = call.reply.try_send(Err(ClientError::Timeout {
                        endpoint: endpoint.clone(),
                        waited: call.timeout,
                    }));
                }
            }
            if host.idle_at().is_some_and(|at| at <= now) {
                idle.push(endpoint.clone());
            }
        }
        for endpoint in idle {
            self.hosts.remove(&endpoint);
        }
    }

    /// Asks the locator where each group of the silent host at `endpoint` is now, and
    /// moves each one that moved (they may land on different hosts), keeping its last
    /// delivered seq (the new host's reply reveals what was missed, and it is backfilled).
    fn relocate(&mut self, endpoint: &str, now: Instant) -> Result<(), Closed> {
        let Some(host) = self.hosts.get_mut(endpoint) else {
            return Ok(());
        };
        host.next_locate = now + self.options.relocate_after;
        let names: Vec<GroupName> = host.groups.keys().cloned().collect();
        for name in names {
            let Some(locate) = self.locate.as_mut() else {
                return Ok(());
            };
            let Some((to, server_key)) = locate(&name) else {
                continue;
            };
            if to == endpoint {
                continue;
            }
            tracing::info!(group = %name, from = %endpoint, %to, "the group moved; following it");
            let Some(g) = self
                .hosts
                .get_mut(endpoint)
                .and_then(|h| h.groups.remove(&name))
            else {
                continue;
            };
            if let Some(host) = self.hosts.get(endpoint) {
                self.unsubscribe(host, Some(&name));
            }
            let spec = GroupSpec {
                endpoint: to,
                server_key,
                after_seq: g.last_seq,
                ..g.spec
            };
            let label = spec.label.clone();
            if let Err(error) = self.add(spec) {
                self.emit(FeedEvent::Error {
                    label,
                    error,
                    fatal: false,
                })?;
            }
        }
        if self.hosts.get(endpoint).is_some_and(HostFeed::is_empty) {
            self.hosts.remove(endpoint);
        }
        Ok(())
    }

    /// The `subscribe` that renews `group`'s subscription and acks what was handed on.
    fn subscribe_request(&self, group: Option<&GroupName>, g: &GroupFeed) -> NodeRequest {
        NodeRequest::Subscribe(SubscribeRequest {
            group: group.cloned(),
            user: self.user.clone(),
            batch: true,
            acked_seq: g.last_seq,
        })
    }

    /// Subscribes (renews, acks) one group now; on `EAGAIN` (no connection yet) the host's
    /// renewal comes again shortly.
    fn subscribe(&mut self, endpoint: &str, group: Option<&GroupName>, now: Instant) {
        let Some(host) = self.hosts.get(endpoint) else {
            return;
        };
        let Some(g) = (match group {
            Some(name) => host.groups.get(name),
            None => host.unnamed.as_ref(),
        }) else {
            return;
        };
        let frames = encode_request(&self.subscribe_request(group, g));
        let sent = send_dealer(&host.socket, &frames).is_ok();
        if let Some(host) = self.hosts.get_mut(endpoint) {
            if !sent {
                host.next_renew = host
                    .next_renew
                    .min(now + RETRY_UNCONNECTED.min(self.options.renew));
            }
            if let Some(g) = host.group_mut(group) {
                g.unacked = 0;
            }
        }
    }

    /// Renews (and acks) every group of the host at `endpoint`: one `renew` per
    /// [`MAX_RENEW_GROUPS`] groups when the host answers it, else one `subscribe` each.
    fn renew_host(&mut self, endpoint: &str, now: Instant) {
        let Some(host) = self.hosts.get(endpoint) else {
            return;
        };
        let mut frames: Vec<Frames> = Vec::new();
        if host.groups.len() >= 2 && host.renew != RenewSupport::Refused {
            let entries: Vec<RenewEntry> = host
                .groups
                .iter()
                .map(|(name, g)| RenewEntry {
                    group: name.clone(),
                    acked_seq: g.last_seq,
                })
                .collect();
            for chunk in entries.chunks(MAX_RENEW_GROUPS) {
                frames.push(encode_request(&NodeRequest::Renew(RenewRequest {
                    user: self.user.clone(),
                    groups: chunk.to_vec(),
                })));
            }
        } else {
            for (name, g) in &host.groups {
                frames.push(encode_request(&self.subscribe_request(Some(name), g)));
            }
        }
        if let Some(g) = &host.unnamed {
            frames.push(encode_request(&self.subscribe_request(None, g)));
        }
        let sent = frames
            .iter()
            .all(|frames| send_dealer(&host.socket, frames).is_ok());
        if let Some(host) = self.hosts.get_mut(endpoint) {
            host.next_renew = now
                + if sent {
                    self.options.renew
                } else {
                    RETRY_UNCONNECTED.min(self.options.renew)
                };
            for g in host.groups.values_mut().chain(host.unnamed.as_mut()) {
                g.unacked = 0;
            }
        }
    }

    /// Asks for the page of `group`'s log after its last delivered seq, unless one is
    /// awaited already; the reply comes on the host's connection ([`Worker::page`]).
    fn request_page(&mut self, endpoint: &str, group: &GroupName, now: Instant) {
        let Some(host) = self.hosts.get_mut(endpoint) else {
            return;
        };
        let Some(g) = host.groups.get_mut(group) else {
            return;
        };
        if g.paging.is_some_and(|until| until > now) {
            return;
        }
        let request = get_messages_request(
            Some(group.clone()),
            self.user.clone(),
            HistoryQuery::AfterSeq(g.last_seq.unwrap_or(0)),
            Some(1000),
        );
        let frames = encode_request(&NodeRequest::GetMessages(request));
        if send_dealer(&host.socket, &frames).is_ok() {
            g.paging = Some(now + self.options.client.timeout);
        } else {
            // No connection: try again after a renewal.
            g.paging = None;
            let target = g.last_seq.unwrap_or(0) + 1;
            g.behind = Some((target, now + self.options.renew));
        }
    }

    fn unsubscribe(&self, host: &HostFeed, group: Option<&GroupName>) {
        let frames = encode_request(&NodeRequest::Unsubscribe(MembershipRequest {
            group: group.cloned(),
            user: self.user.clone(),
        }));
        let _ = host.socket.set_linger(200);
        let _ = send_dealer(&host.socket, &frames);
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
        self.take_calls();
        let now = Instant::now();
        self.expire_calls(now);
        let due: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.next_renew <= now)
            .map(|(e, _)| e.clone())
            .collect();
        for endpoint in due {
            self.renew_host(&endpoint, now);
        }
        if self.locate.is_some() {
            let after = self.options.relocate_after;
            let lost: Vec<String> = self
                .hosts
                .iter()
                .filter(|(_, h)| {
                    now.saturating_duration_since(h.last_heard) >= after && h.next_locate <= now
                })
                .map(|(e, _)| e.clone())
                .collect();
            for endpoint in lost {
                self.relocate(&endpoint, now)?;
            }
        }
        // Pages unanswered in time, and gaps due for a backfill.
        let mut timed_out: Vec<(String, GroupName)> = Vec::new();
        let mut lagging: Vec<(String, GroupName)> = Vec::new();
        for (endpoint, host) in &mut self.hosts {
            for (name, g) in &mut host.groups {
                if g.paging.is_some_and(|until| until <= now) {
                    g.paging = None;
                    let target = g.last_seq.unwrap_or(0) + 1;
                    g.behind = Some((target, now + self.options.renew));
                    timed_out.push((endpoint.clone(), name.clone()));
                } else if g.paging.is_none() && g.behind.is_some_and(|(_, at)| at <= now) {
                    let target = g.behind.take().map_or(0, |(seq, _)| seq);
                    if g.last_seq.unwrap_or(0) < target {
                        lagging.push((endpoint.clone(), name.clone()));
                    }
                }
            }
        }
        for (endpoint, name) in timed_out {
            let label = self
                .hosts
                .get(&endpoint)
                .and_then(|h| h.groups.get(&name))
                .map(|g| g.spec.label.clone());
            if let Some(label) = label {
                self.emit(FeedEvent::Error {
                    label,
                    error: ClientError::Timeout {
                        endpoint,
                        waited: self.options.client.timeout,
                    },
                    fatal: false,
                })?;
            }
        }
        for (endpoint, name) in lagging {
            self.request_page(&endpoint, &name, now);
        }
        // With no host, nothing is due: wait for a command.
        let mut wait: Option<Duration> = None;
        let mut sooner = |at: Instant| {
            let d = at.saturating_duration_since(now);
            wait = Some(wait.map_or(d, |w| w.min(d)));
        };
        for host in self.hosts.values() {
            sooner(host.next_renew);
            for call in host.calls.values() {
                sooner(call.deadline);
            }
            if let Some(at) = host.idle_at() {
                sooner(at);
            }
            for g in host.groups.values() {
                match (g.paging, g.behind) {
                    (Some(until), _) => sooner(until),
                    (None, Some((_, at))) => sooner(at),
                    (None, None) => {}
                }
            }
        }
        let endpoints: Vec<String> = self.hosts.keys().cloned().collect();
        let (command, ready): (bool, Vec<bool>) = {
            let mut items: Vec<zmq::PollItem<'_>> = std::iter::once(pipe.as_poll_item())
                .chain(endpoints.iter().filter_map(|e| self.hosts.get(e)).map(|h| {
                    // Writable wakes the calls waiting for the connection.
                    let events = if h.has_unsent() {
                        zmq::POLLIN | zmq::POLLOUT
                    } else {
                        zmq::POLLIN
                    };
                    h.socket.as_poll_item(events)
                }))
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
        for host in self.hosts.values_mut() {
            if host.has_unsent() {
                host.flush_calls();
            }
        }
        for (endpoint, readable) in endpoints.iter().zip(ready) {
            if !readable {
                continue;
            }
            while let Some(host) = self.hosts.get_mut(endpoint) {
                match host.socket.recv_multipart(zmq::DONTWAIT) {
                    Ok(frames) => {
                        host.last_heard = Instant::now();
                        // A call's reply comes behind its tag; the feed's own traffic
                        // behind the bare delimiter.
                        if frames.len() >= 4 && !frames[0].is_empty() && frames[1].is_empty() {
                            self.answer_call(endpoint, frames);
                        } else {
                            self.handle(endpoint, &frames)?;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        Ok(true)
    }

    /// Handles one message from the host at `endpoint`, routed to its group by the `group`
    /// it carries (pushes, replies, errors).
    fn handle(&mut self, endpoint: &str, frames: &Frames) -> Result<(), Closed> {
        let [empty, sig, body] = frames.as_slice() else {
            tracing::debug!(%endpoint, frames = frames.len(), "feed: a message of unexpected shape; dropped");
            return Ok(());
        };
        if !empty.is_empty() || sig.as_slice() != PROTOCOL {
            tracing::debug!(%endpoint, "feed: a message of another protocol; dropped");
            return Ok(());
        }
        // Pushes as nodes encode them are recognised by their start, and parsed once.
        if body.starts_with(br#"{"event":"entries","#) || body.starts_with(br#"{"event":"entry","#)
        {
            return self.handle_push(endpoint, body);
        }
        #[derive(serde::Deserialize)]
        struct Head {
            ok: Option<bool>,
            event: Option<String>,
            group: Option<GroupName>,
            last_seq: Option<u64>,
            lease_ms: Option<u64>,
            messages: Option<serde::de::IgnoredAny>,
            groups: Option<serde::de::IgnoredAny>,
        }
        let head = match serde_json::from_slice::<Head>(body) {
            Ok(head) => head,
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, "feed: an undecodable message; dropped");
                return Ok(());
            }
        };
        match (head.ok, head.event.as_deref()) {
            // A push from an encoder that orders members differently.
            (None, Some("entry" | "entries")) => self.handle_push(endpoint, body),
            (None, Some("unsubscribed")) => {
                // The node ended the subscription (lease, eviction): subscribe again now.
                let Some(name) = head.group else {
                    tracing::warn!(%endpoint, "feed: an unsubscribed event naming no group; dropped");
                    return Ok(());
                };
                let Some(g) = self
                    .hosts
                    .get_mut(endpoint)
                    .and_then(|h| h.groups.get_mut(&name))
                else {
                    return Ok(());
                };
                g.subscribed = false;
                self.subscribe(endpoint, Some(&name), Instant::now());
                Ok(())
            }
            (None, _) => Ok(()), // an event this client does not know
            (Some(false), _) => {
                let error = serde_json::from_slice::<WireError>(body)
                    .unwrap_or_else(|e| WireError::new(ErrorCode::Unknown, e.to_string()));
                self.refused(endpoint, error)
            }
            (Some(true), _) if head.groups.is_some() => {
                match serde_json::from_slice::<RenewReply>(body) {
                    Ok(reply) => {
                        if let Some(host) = self.hosts.get_mut(endpoint) {
                            host.renew = RenewSupport::Answered;
                        }
                        for subscribed in reply.groups {
                            self.subscribed(endpoint, subscribed)?;
                        }
                        for error in reply.refused {
                            self.refused(endpoint, error)?;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%endpoint, error = %e, "feed: a bad renew reply; dropped")
                    }
                }
                Ok(())
            }
            (Some(true), _) if head.messages.is_some() => {
                match serde_json::from_slice::<MessagesPage>(body) {
                    Ok(page) => self.page(endpoint, page),
                    Err(e) => {
                        tracing::warn!(%endpoint, error = %e, "feed: a bad page; dropped");
                        Ok(())
                    }
                }
            }
            (Some(true), _) if head.last_seq.is_some() && head.lease_ms.is_some() => {
                match serde_json::from_slice::<SubscribeReply>(body) {
                    Ok(reply) => self.subscribed(endpoint, reply),
                    Err(e) => {
                        tracing::warn!(%endpoint, error = %e, "feed: a bad subscribe reply; dropped");
                        Ok(())
                    }
                }
            }
            (Some(true), _) => Ok(()), // the reply to an unsubscribe
        }
    }

    /// An error from the host at `endpoint`, for the group it names. One naming no group
    /// is a `renew` refused by a node older than it (`unknown_action`), or, from a host
    /// followed for one group only, that group's (a node of one, older than group hosts,
    /// names none); any other is logged and dropped, never guessed.
    fn refused(&mut self, endpoint: &str, error: WireError) -> Result<(), Closed> {
        let Some(host) = self.hosts.get_mut(endpoint) else {
            return Ok(());
        };
        let name = match &error.group {
            Some(name) if host.groups.contains_key(name) => Some(name.clone()),
            Some(name) => {
                tracing::debug!(%endpoint, group = %name, error = %error, "feed: an error for a group not followed; dropped");
                return Ok(());
            }
            None if error.code == ErrorCode::UnknownAction
                && host.renew != RenewSupport::Answered
                && host.groups.len() >= 2 =>
            {
                tracing::debug!(%endpoint, "the host does not answer renew; renewing group by group");
                host.renew = RenewSupport::Refused;
                let names: Vec<GroupName> = host.groups.keys().cloned().collect();
                let now = Instant::now();
                for name in names {
                    self.subscribe(endpoint, Some(&name), now);
                }
                return Ok(());
            }
            None => match host.only_group() {
                Some(name) => name,
                None => {
                    tracing::warn!(%endpoint, error = %error, "feed: an error naming no group from a host of several groups; dropped");
                    return Ok(());
                }
            },
        };
        let fatal = matches!(error.code, ErrorCode::NotMember | ErrorCode::UnknownGroup);
        let label = if fatal {
            let removed = match &name {
                Some(name) => host.groups.remove(name),
                None => host.unnamed.take(),
            };
            if host.is_empty() {
                self.hosts.remove(endpoint);
            }
            removed.map(|g| g.spec.label)
        } else {
            let renew = self.options.renew;
            host.group_mut(name.as_ref()).map(|g| {
                if g.paging.take().is_some() {
                    // The page may be what failed: ask again after a renewal.
                    let target = g.last_seq.unwrap_or(0) + 1;
                    g.behind = Some((target, Instant::now() + renew));
                }
                g.spec.label.clone()
            })
        };
        let Some(label) = label else {
            return Ok(());
        };
        self.emit(FeedEvent::Error {
            label,
            error: ClientError::Server(error),
            fatal,
        })
    }

    /// A `subscribe` reply (or one entry of a `renew` reply) for the group it names; the
    /// host's unnamed spec takes the name of a group not followed yet.
    fn subscribed(&mut self, endpoint: &str, reply: SubscribeReply) -> Result<(), Closed> {
        let Some(host) = self.hosts.get_mut(endpoint) else {
            return Ok(());
        };
        if !host.groups.contains_key(&reply.group) {
            match host.unnamed.take() {
                Some(g) => {
                    host.groups.insert(reply.group.clone(), g);
                }
                None => {
                    tracing::debug!(%endpoint, group = %reply.group, "feed: a subscribe reply for a group not followed; dropped");
                    return Ok(());
                }
            }
        }
        let Some(g) = host.groups.get_mut(&reply.group) else {
            return Ok(());
        };
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

    /// A backfill page: its entries are delivered, and the next page asked for while
    /// there are more.
    fn page(&mut self, endpoint: &str, page: MessagesPage) -> Result<(), Closed> {
        let name = page.group.clone();
        let Some(g) = self
            .hosts
            .get_mut(endpoint)
            .and_then(|h| h.groups.get_mut(&name))
        else {
            tracing::debug!(%endpoint, group = %name, "feed: a page for a group not followed; dropped");
            return Ok(());
        };
        g.paging = None;
        let more = page.more && !page.messages.is_empty();
        for entry in page.messages {
            self.deliver(endpoint, &name, entry, false)?;
        }
        if more {
            self.request_page(endpoint, &name, Instant::now());
        }
        Ok(())
    }

    /// Decodes a push whatever the order of its members, and delivers its entries.
    fn handle_push(&mut self, endpoint: &str, body: &[u8]) -> Result<(), Closed> {
        let (group, entries) = if let Ok(batch) = serde_json::from_slice::<PushBatch>(body) {
            (batch.group, batch.entries)
        } else if let Ok(event) = serde_json::from_slice::<PushEvent>(body) {
            (event.group, vec![event.entry])
        } else {
            tracing::warn!(%endpoint, "feed: an undecodable push; dropped");
            return Ok(());
        };
        for entry in entries {
            self.deliver(endpoint, &group, entry, true)?;
        }
        self.pushed(endpoint, &group, body.len());
        Ok(())
    }

    /// Counts a push of `bytes` handed on; acks at once past half the node's budget or
    /// [`ACK_EVERY_BYTES`].
    fn pushed(&mut self, endpoint: &str, group: &GroupName, bytes: usize) {
        let Some(g) = self
            .hosts
            .get_mut(endpoint)
            .and_then(|h| h.groups.get_mut(group))
        else {
            return;
        };
        g.unacked += bytes;
        if g.budget > 0 && g.unacked >= (g.budget / 2).min(ACK_EVERY_BYTES) {
            self.subscribe(endpoint, Some(group), Instant::now());
        }
    }

    /// Hands `entry` to the consumer unless it is a duplicate. A live entry past the next
    /// expected seq asks for the missing ones from the log and is dropped (the page brings
    /// it back, in order). A backfilled entry past a gap (its predecessors were deleted by
    /// retention) is delivered as it is.
    fn deliver(
        &mut self,
        endpoint: &str,
        group: &GroupName,
        entry: Message,
        live: bool,
    ) -> Result<(), Closed> {
        let Some(g) = self
            .hosts
            .get_mut(endpoint)
            .and_then(|h| h.groups.get_mut(group))
        else {
            tracing::debug!(%endpoint, %group, "feed: an entry for a group not followed; dropped");
            return Ok(());
        };
        let last = *g.last_seq.get_or_insert(entry.seq.saturating_sub(1));
        if entry.seq <= last {
            return Ok(());
        }
        if entry.seq > last + 1 && live {
            let now = Instant::now();
            g.behind = Some(match g.behind {
                Some((seq, at)) => (seq.max(entry.seq), at),
                None => (entry.seq, now + PUSH_GRACE),
            });
            self.request_page(endpoint, group, now);
            return Ok(());
        }
        g.last_seq = Some(entry.seq);
        let label = g.spec.label.clone();
        self.emit(FeedEvent::Entry {
            label,
            group: group.clone(),
            entry,
            live,
        })
    }
}

/// Sends a call on a DEALER behind its tag: `[TAG, "", frames...]` (TAG 8 bytes, big
/// endian), an envelope the host echoes (PROTOCOL §2).
fn send_tagged(socket: &zmq::Socket, tag: u64, frames: &Frames) -> Result<(), zmq::Error> {
    let tag = tag.to_be_bytes();
    socket.send_multipart(
        [&tag[..], &[][..]]
            .into_iter()
            .chain(frames.iter().map(Vec::as_slice)),
        zmq::DONTWAIT,
    )
}

/// Sends a request on a DEALER: the empty delimiter a REQ would add, then the frames.
fn send_dealer(socket: &zmq::Socket, frames: &Frames) -> Result<(), zmq::Error> {
    socket.send_multipart(
        std::iter::once(&[][..]).chain(frames.iter().map(Vec::as_slice)),
        zmq::DONTWAIT,
    )
}

#[cfg(test)]
mod tests {
    //! The feed against an in-process fake host: a ROUTER serving two groups at one
    //! endpoint, scripted per request.
    use super::*;
    use agora_proto::codec::{decode_request, encode_error, encode_ok};
    use agora_proto::id::MessageId;
    use agora_proto::time::Timestamp;
    use agora_proto::wire::EntryKind;
    use std::collections::HashSet;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn name(s: &str) -> GroupName {
        GroupName::new(s).expect("group name")
    }

    fn entry(seq: u64) -> Message {
        Message {
            seq,
            id: MessageId::new_v7(),
            time: Timestamp::now(),
            sender: "alice".parse().expect("user"),
            kind: EntryKind::Message,
            body: serde_json::value::RawValue::from_string(format!("\"m{seq}\"")).expect("body"),
            sender_key: None,
            attachment: None,
        }
    }

    /// A fake host: a ROUTER on 127.0.0.1, the identities that talked to it, and what
    /// they asked.
    struct FakeHost {
        socket: zmq::Socket,
        endpoint: String,
        peers: HashSet<Vec<u8>>,
    }

    impl FakeHost {
        fn bind(ctx: &zmq::Context) -> FakeHost {
            let socket = ctx.socket(zmq::ROUTER).expect("router");
            socket.set_linger(0).expect("linger");
            socket.bind("tcp://127.0.0.1:*").expect("bind");
            let endpoint = socket
                .get_last_endpoint()
                .expect("endpoint")
                .expect("utf-8");
            FakeHost {
                socket,
                endpoint,
                peers: HashSet::new(),
            }
        }

        /// The next request and its sender's identity, within 100 ms.
        fn next(&mut self) -> Option<(Vec<u8>, NodeRequest)> {
            if self.socket.poll(zmq::POLLIN, 100).ok()? == 0 {
                return None;
            }
            let frames = self.socket.recv_multipart(0).ok()?;
            let identity = frames.first()?.clone();
            self.peers.insert(identity.clone());
            let request = decode_request::<NodeRequest>(&frames[2..]).expect("a request");
            Some((identity, request))
        }

        fn send(&self, identity: &[u8], frames: Frames) {
            self.socket
                .send_multipart(
                    [identity, &[][..]]
                        .into_iter()
                        .chain(frames.iter().map(Vec::as_slice)),
                    0,
                )
                .expect("send");
        }

        fn push(&self, identity: &[u8], group: &str, seqs: &[u64]) {
            let batch = PushBatch {
                event: "entries".into(),
                group: name(group),
                entries: seqs.iter().map(|&s| entry(s)).collect(),
            };
            let body = serde_json::to_vec(&batch).expect("push");
            self.send(identity, vec![PROTOCOL.to_vec(), body]);
        }
    }

    fn subscribed(group: &GroupName, last_seq: u64) -> SubscribeReply {
        SubscribeReply {
            group: group.clone(),
            last_seq,
            lease_ms: 5000,
            budget_bytes: 0,
        }
    }

    fn spec(host: &FakeHost, group: &str) -> GroupSpec {
        GroupSpec {
            label: group.into(),
            endpoint: host.endpoint.clone(),
            group: Some(name(group)),
            after_seq: Some(0),
            server_key: None,
        }
    }

    fn options() -> FeedOptions {
        FeedOptions {
            renew: Duration::from_millis(200),
            ..FeedOptions::default()
        }
    }

    /// Two groups of one host over one connection: pushes, replies, pages and errors each
    /// reach their group by the `group` they carry; a push for a group not followed and an
    /// error naming no group are dropped; `not_member` ends one group, not the connection;
    /// backfill is asked for over the same connection; a host that answers `renew` with
    /// `unknown_action` is renewed group by group from then on.
    #[test]
    fn one_connection_per_host_demultiplexes_two_groups_by_their_group() {
        let ctx = zmq::Context::new();
        let mut host = FakeHost::bind(&ctx);
        let (feed, rx) =
            Feed::start(&ctx, "bob".parse().expect("user"), None, options()).expect("feed");
        feed.add(spec(&host, "Alpha"));
        feed.add(spec(&host, "Beta"));
        let (alpha, beta) = (name("Alpha"), name("Beta"));
        let mut got: HashMap<GroupName, Vec<u64>> = HashMap::new();
        let mut errors: Vec<(String, ErrorCode, bool)> = Vec::new();
        let (mut renews, mut subscribes_after_refusal, mut refused) = (0, 0, false);
        let mut pages: Vec<(GroupName, u64)> = Vec::new();
        let start = Instant::now();
        let done = |got: &HashMap<GroupName, Vec<u64>>, errors: &Vec<_>, after: u32| {
            got.get(&alpha).map(Vec::len) == Some(4)
                && got.get(&beta).map(Vec::len) == Some(2)
                && !errors.is_empty()
                && after >= 3
        };
        // The script moves on by what the host has seen, not by timing: a subscribe sent
        // before the connection is up is not sent, and the host's renewal covers it.
        let (mut alpha_pushed, mut beta_paged, mut beta_ended) = (false, false, false);
        let mut answered: HashSet<GroupName> = HashSet::new();
        while !done(&got, &errors, subscribes_after_refusal) {
            assert!(
                start.elapsed() < DEADLINE,
                "got {got:?}, errors {errors:?}, renews {renews}, after refusal {subscribes_after_refusal}"
            );
            if let Some((peer, request)) = host.next() {
                match request {
                    NodeRequest::Subscribe(s) => {
                        let group = s.group.expect("every subscribe names its group");
                        if refused && group == alpha {
                            subscribes_after_refusal += 1;
                        }
                        let last = if group == beta { 2 } else { 0 };
                        host.send(&peer, encode_ok(&subscribed(&group, last)));
                        answered.insert(group);
                    }
                    NodeRequest::Renew(r) => {
                        assert!(!refused, "renew again after unknown_action");
                        renews += 1;
                        assert_eq!(r.groups.len(), 2, "one renew for the host's two groups");
                        refused = true;
                        host.send(
                            &peer,
                            encode_error(&WireError::new(ErrorCode::UnknownAction, "renew")),
                        );
                    }
                    NodeRequest::GetMessages(g) => {
                        let group = g.group.expect("every page request names its group");
                        let after = g.after_seq.expect("after_seq");
                        pages.push((group.clone(), after));
                        let last = if group == beta { 2 } else { 4 };
                        beta_paged |= group == beta;
                        let page = MessagesPage {
                            group: group.clone(),
                            messages: (after + 1..=last).map(entry).collect(),
                            more: false,
                        };
                        host.send(&peer, encode_ok(&page));
                    }
                    NodeRequest::Unsubscribe(_) => {}
                    other => panic!("unexpected request {other:?}"),
                }
                if !alpha_pushed && answered.contains(&alpha) && answered.contains(&beta) {
                    alpha_pushed = true;
                    host.push(&peer, "Alpha", &[1, 2]);
                    // Not followed: dropped.
                    host.push(&peer, "Gamma", &[1]);
                    // Names no group, from a host of two: dropped.
                    host.send(
                        &peer,
                        encode_error(&WireError::new(ErrorCode::Internal, "whose?")),
                    );
                    // 3 is missing: read from the log, over this connection.
                    host.push(&peer, "Alpha", &[4]);
                }
                if refused && beta_paged && !beta_ended {
                    beta_ended = true;
                    // Beta ends (not a member any more); its later push is dropped.
                    host.send(
                        &peer,
                        encode_error(
                            &WireError::new(ErrorCode::NotMember, "gone")
                                .with_group(Some(beta.clone())),
                        ),
                    );
                    host.push(&peer, "Beta", &[3]);
                }
            }
            while let Ok(event) = rx.try_recv() {
                match event {
                    FeedEvent::Entry { group, entry, .. } => {
                        got.entry(group).or_default().push(entry.seq)
                    }
                    FeedEvent::Error {
                        label,
                        error: ClientError::Server(e),
                        fatal,
                    } => errors.push((label, e.code, fatal)),
                    FeedEvent::Error { label, error, .. } => panic!("{label}: {error}"),
                    FeedEvent::Subscribed { .. } => {}
                }
            }
        }
        assert_eq!(got[&alpha], vec![1, 2, 3, 4], "in order, each once");
        assert_eq!(got[&beta], vec![1, 2]);
        assert!(!got.contains_key(&name("Gamma")));
        assert_eq!(
            errors,
            vec![("Beta".to_owned(), ErrorCode::NotMember, true)]
        );
        assert_eq!(renews, 1);
        assert!(pages.contains(&(beta.clone(), 0)), "{pages:?}");
        assert!(pages.contains(&(alpha.clone(), 2)), "{pages:?}");
        assert_eq!(host.peers.len(), 1, "one connection for the host's groups");
        drop(rx);
        drop(feed);
    }

    /// Calls go over the feed's connection to a host: made for the first call (a host not
    /// followed yet) and then used for following too, each call behind its own tag, which
    /// the host echoes. Data frames travel both ways (`upload_chunk`, `download`); a push
    /// between a call and its reply is the feed's, not the call's; a call not answered in
    /// time is a timeout, and its late reply is dropped without disturbing the next call.
    #[test]
    fn calls_share_the_hosts_connection_behind_their_own_tag() {
        use agora_proto::action::call;
        use agora_proto::codec::{
            decode_reply, decode_reply_data, encode_call, encode_call_data, encode_ok_data,
            split_envelope,
        };
        use agora_proto::wire::{
            DownloadReply, DownloadRequest, InfoReply, InfoRequest, Sha256Digest,
            UploadChunkRequest, UploadReply,
        };
        let ctx = zmq::Context::new();
        let host = FakeHost::bind(&ctx);
        let (feed, rx) =
            Feed::start(&ctx, "bob".parse().expect("user"), None, options()).expect("feed");
        let digest = Sha256Digest::from_bytes([7; 32]);
        let user: UserName = "bob".parse().expect("user");
        let alpha = name("Alpha");
        // A request as the host sees it: its envelope (identity, the feed's tag, delimiter),
        // the decoded request and its data frame.
        let next = |host: &FakeHost| -> Option<(Frames, NodeRequest, Option<Vec<u8>>)> {
            if host.socket.poll(zmq::POLLIN, 100).ok()? == 0 {
                return None;
            }
            let frames = host.socket.recv_multipart(0).ok()?;
            let (envelope, body) = split_envelope(frames).expect("an envelope");
            let (request, data) =
                agora_proto::codec::decode_request_data::<NodeRequest>(body).expect("request");
            Some((envelope, request, data))
        };
        let reply = |host: &FakeHost, envelope: Frames, frames: Frames| {
            host.socket
                .send_multipart(envelope.into_iter().chain(frames), 0)
                .expect("reply");
        };
        let answer = |rx: &Receiver<CallReply>| -> CallReply {
            rx.recv_timeout(DEADLINE).expect("every call is answered")
        };

        // 1. An upload chunk to a host the feed holds no connection to: one is made, and
        // the request's data frame arrives behind a tag.
        let chunk = UploadChunkRequest {
            group: Some(alpha.clone()),
            user: user.clone(),
            sha256: digest,
            offset: 0,
        };
        let uploaded = feed.call(
            &host.endpoint,
            None,
            encode_call_data::<call::UploadChunk>(&chunk, b"abc".to_vec()),
            DEADLINE,
        );
        let (envelope, request, data) = {
            let start = Instant::now();
            loop {
                assert!(start.elapsed() < DEADLINE, "the upload never came");
                if let Some(got) = next(&host) {
                    break got;
                }
            }
        };
        assert!(
            matches!(request, NodeRequest::UploadChunk(_)),
            "{request:?}"
        );
        assert_eq!(data.as_deref(), Some(&b"abc"[..]));
        assert_eq!(envelope.len(), 3, "identity, tag, delimiter: {envelope:?}");
        assert_eq!(envelope[1].len(), 8, "an 8-byte tag");
        let identity = envelope[0].clone();
        // Follow a group there too: the same connection.
        feed.add(spec(&host, "Alpha"));
        let subscribe = loop {
            match next(&host) {
                Some((env, NodeRequest::Subscribe(_), _)) => break env,
                Some((_, other, _)) => panic!("unexpected {other:?}"),
                None => {}
            }
        };
        assert_eq!(subscribe, vec![identity.clone(), Vec::new()], "untagged");
        reply(&host, subscribe.clone(), encode_ok(&subscribed(&alpha, 0)));
        // A push before the upload's reply: the feed's, delivered as an entry.
        host.push(&identity, "Alpha", &[1]);
        let up = UploadReply {
            sha256: digest,
            size: 3,
            have: 3,
            complete: true,
            chunk_bytes: 3,
            window: 1,
        };
        reply(&host, envelope, encode_ok(&up));
        let frames = answer(&uploaded).expect("the upload's reply");
        let got = decode_reply::<UploadReply>(&frames)
            .expect("frames")
            .expect("ok");
        assert_eq!(got.have, 3);

        // 2. A download: the reply's data frame comes back with it.
        let ask = DownloadRequest {
            group: Some(alpha.clone()),
            user: user.clone(),
            sha256: digest,
            offset: 1,
            length: Some(2),
        };
        let downloaded = feed.call(
            &host.endpoint,
            None,
            encode_call::<call::Download>(&ask),
            DEADLINE,
        );
        let envelope = loop {
            match next(&host) {
                Some((env, NodeRequest::Download(_), _)) => break env,
                Some((_, NodeRequest::Subscribe(_) | NodeRequest::Renew(_), _)) | None => {}
                Some((_, other, _)) => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(envelope[0], identity, "one connection");
        let range = DownloadReply {
            sha256: digest,
            size: 3,
            offset: 1,
            length: 2,
        };
        reply(&host, envelope, encode_ok_data(&range, b"bc".to_vec()));
        let frames = answer(&downloaded).expect("the download's reply");
        let (got, bytes) = decode_reply_data::<DownloadReply>(&frames)
            .expect("frames")
            .expect("ok");
        assert_eq!((got.offset, bytes.as_slice()), (1, &b"bc"[..]));

        // 3. A call not answered in time is a timeout; its late reply is dropped, and the
        // next call gets its own reply.
        let info = |timeout| {
            feed.call(
                &host.endpoint,
                None,
                encode_call::<call::Info>(&InfoRequest {
                    group: Some(alpha.clone()),
                }),
                timeout,
            )
        };
        let slow = info(Duration::from_millis(300));
        let late = loop {
            match next(&host) {
                Some((env, NodeRequest::Info(_), _)) => break env,
                Some((_, NodeRequest::Subscribe(_) | NodeRequest::Renew(_), _)) | None => {}
                Some((_, other, _)) => panic!("unexpected {other:?}"),
            }
        };
        match answer(&slow) {
            Err(ClientError::Timeout { waited, .. }) => {
                assert_eq!(waited, Duration::from_millis(300));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        let info_reply = |last_seq| InfoReply {
            group: alpha.clone(),
            last_seq,
            members: 1,
            max_message_bytes: 1 << 20,
            mode: agora_proto::wire::GroupMode::Open,
        };
        reply(&host, late, encode_ok(&info_reply(1)));
        let fresh = info(DEADLINE);
        let envelope = loop {
            match next(&host) {
                Some((env, NodeRequest::Info(_), _)) => break env,
                Some((_, NodeRequest::Subscribe(_) | NodeRequest::Renew(_), _)) | None => {}
                Some((_, other, _)) => panic!("unexpected {other:?}"),
            }
        };
        reply(&host, envelope, encode_ok(&info_reply(2)));
        let frames = answer(&fresh).expect("the second info's reply");
        let got = decode_reply::<InfoReply>(&frames)
            .expect("frames")
            .expect("ok");
        assert_eq!(got.last_seq, 2, "its own reply, not the late one");

        // The push was delivered as the group's entry, not taken for a reply.
        let start = Instant::now();
        let entry = loop {
            assert!(start.elapsed() < DEADLINE, "the push never arrived");
            if let Ok(FeedEvent::Entry { group, entry, .. }) =
                rx.recv_timeout(Duration::from_millis(100))
            {
                break (group, entry.seq);
            }
        };
        assert_eq!(entry, (alpha.clone(), 1));
        drop(rx);
        drop(feed);
    }

    /// A host that answers `renew` gets one per renewal for all its groups; a group it
    /// refuses there (naming it) ends alone, and the next `renew` leaves it out.
    #[test]
    fn renew_covers_a_hosts_groups_and_a_refused_group_ends_alone() {
        let ctx = zmq::Context::new();
        let mut host = FakeHost::bind(&ctx);
        let (feed, rx) =
            Feed::start(&ctx, "bob".parse().expect("user"), None, options()).expect("feed");
        for group in ["Alpha", "Beta", "Delta"] {
            feed.add(spec(&host, group));
        }
        let mut renewals: Vec<Vec<String>> = Vec::new();
        let mut fatal: Vec<String> = Vec::new();
        let start = Instant::now();
        while renewals.len() < 2 {
            assert!(start.elapsed() < DEADLINE, "renewals {renewals:?}");
            if let Some((peer, request)) = host.next() {
                match request {
                    NodeRequest::Subscribe(s) => {
                        let group = s.group.expect("names its group");
                        host.send(&peer, encode_ok(&subscribed(&group, 0)));
                    }
                    NodeRequest::Renew(r) => {
                        let mut names: Vec<String> =
                            r.groups.iter().map(|e| e.group.to_string()).collect();
                        names.sort();
                        renewals.push(names);
                        let reply = RenewReply {
                            groups: r
                                .groups
                                .iter()
                                .filter(|e| e.group.as_str() != "Beta")
                                .map(|e| subscribed(&e.group, 0))
                                .collect(),
                            refused: r
                                .groups
                                .iter()
                                .filter(|e| e.group.as_str() == "Beta")
                                .map(|e| {
                                    WireError::new(ErrorCode::UnknownGroup, "deleted")
                                        .with_group(Some(e.group.clone()))
                                })
                                .collect(),
                        };
                        host.send(&peer, encode_ok(&reply));
                    }
                    NodeRequest::Unsubscribe(_) => {}
                    other => panic!("unexpected request {other:?}"),
                }
            }
            while let Ok(event) = rx.try_recv() {
                if let FeedEvent::Error {
                    label, fatal: true, ..
                } = event
                {
                    fatal.push(label);
                }
            }
        }
        assert_eq!(renewals[0], vec!["Alpha", "Beta", "Delta"]);
        assert_eq!(renewals[1], vec!["Alpha", "Delta"]);
        assert_eq!(fatal, vec!["Beta"]);
        assert_eq!(host.peers.len(), 1);
        drop(rx);
        drop(feed);
    }

    /// A host that goes silent: each of its groups is looked up and moves on its own (here
    /// to two different hosts), after its last delivered seq, and what it missed is read
    /// from its new host's log.
    #[test]
    fn a_silent_hosts_groups_each_move_where_the_locator_says() {
        let ctx = zmq::Context::new();
        let mut old = FakeHost::bind(&ctx);
        let mut hosts = [FakeHost::bind(&ctx), FakeHost::bind(&ctx)];
        let to = [hosts[0].endpoint.clone(), hosts[1].endpoint.clone()];
        let locate: Locate = Box::new(move |group: &GroupName| {
            let i = usize::from(group.as_str() != "Alpha");
            Some((to[i].clone(), None))
        });
        let options = FeedOptions {
            renew: Duration::from_millis(100),
            relocate_after: Duration::from_millis(500),
            ..FeedOptions::default()
        };
        let (events, rx) = mpsc::sync_channel(64);
        let feed = Feed::with_locator(
            &ctx,
            "bob".parse().expect("user"),
            None,
            options,
            Some(locate),
            move |event| events.send(event).is_ok(),
        )
        .expect("feed");
        feed.add(spec(&old, "Alpha"));
        feed.add(spec(&old, "Beta"));
        let mut got: HashMap<String, Vec<u64>> = HashMap::new();
        let mut asked: [HashSet<String>; 2] = [HashSet::new(), HashSet::new()];
        let (mut pushed, mut silent) = (HashSet::new(), false);
        let start = Instant::now();
        while got.values().map(Vec::len).sum::<usize>() < 4 {
            assert!(start.elapsed() < DEADLINE, "got {got:?}, asked {asked:?}");
            if !silent {
                if let Some((peer, NodeRequest::Subscribe(s))) = old.next() {
                    let group = s.group.expect("names its group");
                    old.send(&peer, encode_ok(&subscribed(&group, 0)));
                    if pushed.insert(group.clone()) {
                        old.push(&peer, group.as_str(), &[1]);
                    }
                    // Both groups have had their entry 1: the host goes silent.
                    silent = pushed.len() == 2;
                }
            }
            for (i, host) in hosts.iter_mut().enumerate() {
                match host.next() {
                    Some((peer, NodeRequest::Subscribe(s))) => {
                        let group = s.group.expect("names its group");
                        asked[i].insert(group.to_string());
                        host.send(&peer, encode_ok(&subscribed(&group, 2)));
                    }
                    Some((peer, NodeRequest::GetMessages(g))) => {
                        let group = g.group.expect("names its group");
                        asked[i].insert(group.to_string());
                        let after = g.after_seq.expect("after_seq");
                        let page = MessagesPage {
                            group,
                            messages: (after + 1..=2).map(entry).collect(),
                            more: false,
                        };
                        host.send(&peer, encode_ok(&page));
                    }
                    Some((_, NodeRequest::Unsubscribe(_))) | None => {}
                    Some((_, other)) => panic!("unexpected request {other:?}"),
                }
            }
            while let Ok(event) = rx.try_recv() {
                if let FeedEvent::Entry { label, entry, .. } = event {
                    got.entry(label).or_default().push(entry.seq);
                }
            }
        }
        assert_eq!(got["Alpha"], vec![1, 2]);
        assert_eq!(got["Beta"], vec![1, 2]);
        assert_eq!(asked[0], HashSet::from(["Alpha".to_owned()]));
        assert_eq!(asked[1], HashSet::from(["Beta".to_owned()]));
        drop(rx);
        drop(feed);
    }
}
