//! Live subscribers and the push path: the zguide's "Clone" pattern (chapter 5), server side,
//! with credit-based flow control (zguide chapter 7, "Credit-Based Flow Control").
//!
//! A subscriber is a connection (its ROUTER envelope) that sent `subscribe` for a member.
//! Subscriptions are leases: a client renews with `subscribe` well within the lease, and a
//! subscription not renewed in time ends. A member who leaves loses their subscriptions at
//! once, so only members are ever pushed to.
//!
//! # Push
//! After each batch commits, [`Subscribers::push`] encodes every new entry once, builds the
//! push messages once (batches of up to [`MAX_PUSH_BATCH_BYTES`] for subscriptions that
//! asked for `batch`, one `entry` event per entry for the others) and sends the same bytes to
//! every subscriber with `DONTWAIT`. (The safe libzmq binding has no `zmq_msg_copy`, so
//! libzmq still copies the bytes once per subscriber inside `send`.) A vanished peer
//! (`EHOSTUNREACH`, thanks to `ROUTER_MANDATORY`) is dropped; a full queue (`EAGAIN`) loses
//! the push, which the client reads back from the log.
//!
//! # Memory bounded in bytes
//! The node cannot see how much of a peer's queue libzmq still holds, so the subscriber
//! tells it: every `subscribe` may carry `acked_seq`, the newest seq the connection has
//! received. Each subscription keeps the pushes sent and not yet acked (its bytes in
//! flight). A push is withheld from a subscription whose bytes in flight would pass its
//! budget (default [`DEFAULT_PUSH_BUDGET_BYTES`]; one push is always allowed when nothing is
//! in flight), and from every subscription while the node's bytes in flight would pass the
//! total budget (default [`DEFAULT_PUSH_BUDGET_TOTAL_BYTES`]). A subscriber that missed
//! pushes sees a gap in seq, or a `last_seq` ahead of it in the reply to its next ack, and
//! backfills from the log. A subscription that ends while bytes are in flight keeps them
//! counted (they are still queued in libzmq) until the connection acks them, subscribing
//! again, or is found gone: while the total budget blocks pushes, each such connection is
//! probed with an `unsubscribed` event at most once a second, and `EHOSTUNREACH` frees it.
//! On a group host the total is the host's: every group's subscribers count their bytes in
//! flight in one shared [`HostBudget`] ([`Subscribers::with_host_budget`]), so the host's
//! push memory is bounded whatever its number of groups.
//!
//! # Fair slots
//! A member holds at most `max_per_member` subscriptions. When the node holds its maximum,
//! a new subscription evicts the oldest subscription of the principal holding the most
//! (ties: the greatest principal), provided that principal holds more than the requester
//! would after admission; otherwise the requester gets `limit_reached`. Fresh keys therefore
//! cannot lock members out: a member holding fewer subscriptions than the biggest holder can
//! always subscribe. The evicted connection gets an `unsubscribed` event.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::{AddAssign, SubAssign};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::Principal;
use agora_proto::codec::Frames;
use agora_proto::wire::{
    ErrorCode, GroupName, Message, WireError, DEFAULT_PUSH_BUDGET_BYTES,
    DEFAULT_PUSH_BUDGET_TOTAL_BYTES, MAX_PUSH_BATCH_BYTES,
};

/// Most `unsubscribed` notices waiting for the next push round; more are not sent (the
/// client notices on its next renewal).
const MAX_NOTICES: usize = 4096;

/// How often ended subscriptions still holding bytes in flight are probed while the total
/// budget withholds pushes.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// What a `subscribe` asks for beside the lease (see `SubscribeRequest` in
/// `agora_proto::wire`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Push batched `entries` events rather than one `entry` event per entry.
    pub batch: bool,
    /// The newest seq the connection has received: frees the pushes up to it. `None`: an
    /// older client, whose renewal acks what was pushed before its previous renewal.
    pub acked_seq: Option<u64>,
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndCause {
    /// The lease ran out.
    Expired,
    /// Another principal got the slot.
    Evicted,
    /// The client unsubscribed, or the member left.
    Unsubscribed,
}

impl EndCause {
    fn reason(self) -> &'static str {
        match self {
            EndCause::Expired => "expired",
            EndCause::Evicted => "evicted",
            EndCause::Unsubscribed => "ended",
        }
    }
}

/// The pushes sent to one connection and not acked yet.
#[derive(Debug, Default)]
struct Credit {
    /// (newest seq in the push, bytes), oldest first.
    in_flight: VecDeque<(u64, usize)>,
    /// The sum of `in_flight`'s bytes.
    bytes: usize,
    /// The client has sent `acked_seq` at least once.
    explicit: bool,
    /// For clients without `acked_seq`: the newest seq pushed when the previous renewal came.
    renewal_mark: u64,
    /// The newest seq pushed.
    newest: u64,
}

impl Credit {
    /// Forgets the pushes holding only entries up to `seq`; returns the bytes freed.
    fn ack(&mut self, seq: u64) -> usize {
        let mut freed = 0;
        while let Some(&(s, n)) = self.in_flight.front() {
            if s > seq {
                break;
            }
            self.in_flight.pop_front();
            freed += n;
        }
        self.bytes -= freed;
        freed
    }

    fn record(&mut self, seq: u64, bytes: usize) {
        self.newest = self.newest.max(seq);
        self.in_flight.push_back((self.newest, bytes));
        self.bytes += bytes;
    }

    /// Applies a renewal's ack; returns the bytes freed.
    fn renewal(&mut self, acked_seq: Option<u64>) -> usize {
        match acked_seq {
            Some(seq) => {
                self.explicit = true;
                self.ack(seq)
            }
            None if !self.explicit => {
                let mark = std::mem::replace(&mut self.renewal_mark, self.newest);
                self.ack(mark)
            }
            None => 0,
        }
    }
}

#[derive(Debug)]
struct Subscription {
    member: Principal,
    expires: Instant,
    /// When it was made, as a counter: the smallest is the oldest.
    order: u64,
    batch: bool,
    credit: Credit,
}

/// An ended subscription whose pushes may still sit in libzmq's queue.
#[derive(Debug)]
struct Draining {
    credit: Credit,
    why: EndCause,
}

/// Where the pushes go: the host's ROUTER socket (`host::RouterSink`), or a vector in
/// tests ([`VecSink`]). The engine owns no socket.
pub trait PushSink {
    /// Hands one push to the transport without blocking. The message is `envelope`'s frames
    /// (the connection's routing identity), then `AGORA/1`, then `body` (the event JSON).
    fn send(&mut self, envelope: &Frames, body: &[u8]) -> Delivery;
}

/// What became of one push handed to a [`PushSink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the connection.
    Sent,
    /// The connection's queue is full (its HWM): the push is lost, the client backfills.
    Full,
    /// The connection is gone: its subscription and bytes in flight are forgotten.
    Gone,
    /// The transport failed for good (a terminated context): the push round stops.
    Failed,
}

/// The sink failed for good ([`Delivery::Failed`]); the sink knows why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the push transport failed")]
pub struct PushFailed;

/// A [`PushSink`] that keeps every push (envelope, event JSON) and answers each one with
/// `answer` (default [`Delivery::Sent`]): for tests without a socket.
#[derive(Debug)]
pub struct VecSink {
    /// The pushes sent, oldest first.
    pub sent: Vec<(Frames, Vec<u8>)>,
    /// What `send` answers.
    pub answer: Delivery,
}

impl Default for VecSink {
    fn default() -> VecSink {
        VecSink {
            sent: Vec::new(),
            answer: Delivery::Sent,
        }
    }
}

impl PushSink for VecSink {
    fn send(&mut self, envelope: &Frames, body: &[u8]) -> Delivery {
        if self.answer == Delivery::Sent {
            self.sent.push((envelope.clone(), body.to_vec()));
        }
        self.answer
    }
}

/// What one push round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Push messages handed to libzmq.
    pub sent: u64,
    /// Bytes of event JSON handed to libzmq.
    pub sent_bytes: u64,
    /// Pushes lost to a full queue (HWM) or the fault-injection switch.
    pub dropped: u64,
    /// Pushes withheld because a subscription's or the node's push budget was spent.
    pub withheld: u64,
    /// Subscribers (live or ended with bytes in flight) found gone and removed.
    pub gone: u64,
}

/// The push budget of a whole group host: bytes pushed and not acked over every group's
/// subscriptions, and their most (`--push-budget-total`). Shared by every group's
/// [`Subscribers`]; the host's loop alone changes it.
#[derive(Debug)]
pub struct HostBudget {
    in_flight: AtomicUsize,
    total: usize,
}

impl HostBudget {
    /// A budget of `total` bytes, none in flight.
    pub fn new(total: usize) -> HostBudget {
        HostBudget {
            in_flight: AtomicUsize::new(0),
            total,
        }
    }

    /// Bytes in flight over every group.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The most bytes in flight over every group.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Bytes in flight over one group's subscriptions, counted in its host's [`HostBudget`]
/// too when it has one.
#[derive(Debug, Default)]
struct InFlight {
    mine: usize,
    host: Option<Arc<HostBudget>>,
}

impl InFlight {
    /// Whether `n` more bytes would pass a total: this group's `own_total`, or its host's
    /// when it has one (both hold: one group's subscribers that never ack cannot fill the
    /// host's total and starve the other groups).
    fn would_pass(&self, n: usize, own_total: usize) -> bool {
        self.mine + n > own_total
            || self
                .host
                .as_ref()
                .is_some_and(|host| host.in_flight() + n > host.total)
    }
}

impl AddAssign<usize> for InFlight {
    fn add_assign(&mut self, n: usize) {
        self.mine += n;
        if let Some(host) = &self.host {
            host.in_flight.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl SubAssign<usize> for InFlight {
    fn sub_assign(&mut self, n: usize) {
        // Never below zero: a group's count holds at least what it gave the host's.
        let n = n.min(self.mine);
        self.mine -= n;
        if let Some(host) = &self.host {
            host.in_flight.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mine = self.mine;
        *self -= mine;
    }
}

/// The node's subscribers, keyed by envelope, with their push budgets.
#[derive(Debug)]
pub struct Subscribers {
    subs: HashMap<Frames, Subscription>,
    /// Each principal's subscriptions, oldest first.
    by_member: HashMap<Principal, BTreeMap<u64, Frames>>,
    /// (subscriptions held, principal), for finding the biggest holder.
    by_count: BTreeSet<(usize, Principal)>,
    /// EndCause subscriptions still holding bytes in flight.
    draining: HashMap<Frames, Draining>,
    /// `unsubscribed` events to send at the next push round.
    notices: Vec<(Frames, EndCause)>,
    /// Bytes in flight over every subscription, live and draining.
    in_flight: InFlight,
    lease: Duration,
    max: usize,
    max_per_member: usize,
    budget: usize,
    total_budget: usize,
    next_order: u64,
    next_probe: Option<Instant>,
    /// Test-only fault injection: drop every Nth push (0 = never).
    drop_every: u64,
    pushes: u64,
}

impl Subscribers {
    /// No subscribers yet; leases last `lease`; at most `max` subscriptions, and
    /// `max_per_member` live connections per member; with `drop_every` > 0, every
    /// `drop_every`-th push is dropped on purpose (tests only). Push budgets are the
    /// defaults, [`DEFAULT_PUSH_BUDGET_BYTES`] per subscription and
    /// [`DEFAULT_PUSH_BUDGET_TOTAL_BYTES`] in all; see [`Subscribers::with_push_budget`].
    pub fn new(lease: Duration, max: usize, max_per_member: usize, drop_every: u64) -> Subscribers {
        Subscribers {
            subs: HashMap::new(),
            by_member: HashMap::new(),
            by_count: BTreeSet::new(),
            draining: HashMap::new(),
            notices: Vec::new(),
            in_flight: InFlight::default(),
            lease,
            max,
            max_per_member,
            budget: DEFAULT_PUSH_BUDGET_BYTES,
            total_budget: DEFAULT_PUSH_BUDGET_TOTAL_BYTES,
            next_order: 0,
            next_probe: None,
            drop_every,
            pushes: 0,
        }
    }

    /// Sets the push budgets, in bytes of event JSON pushed and not acked: `per_subscription`
    /// for each subscription, `total` for the node.
    pub fn with_push_budget(mut self, per_subscription: usize, total: usize) -> Subscribers {
        self.budget = per_subscription;
        self.total_budget = total;
        self
    }

    /// Counts this group's bytes in flight in `host` too, and withholds pushes while the
    /// host's total would pass its budget, as well as while this group's own total would
    /// ([`Subscribers::with_push_budget`]). Set before any push.
    pub fn with_host_budget(mut self, host: Arc<HostBudget>) -> Subscribers {
        self.in_flight = InFlight {
            mine: 0,
            host: Some(host),
        };
        self
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The push budget of one subscription, in bytes.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes pushed and not acked, over every subscription (including ended ones whose
    /// connection may still hold them).
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight.mine
    }

    /// How many subscriptions there are.
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Whether `unsubscribed` events wait for the next push round.
    pub fn has_notices(&self) -> bool {
        !self.notices.is_empty()
    }

    /// How many subscriptions `member` holds.
    pub fn held_by(&self, member: &Principal) -> usize {
        self.by_member.get(member).map_or(0, BTreeMap::len)
    }

    /// Subscribes (or renews) the connection `envelope` for `member` with default options
    /// (no batches, no ack); returns true if new. See [`Subscribers::subscribe_with`].
    ///
    /// # Errors
    /// As [`Subscribers::subscribe_with`].
    pub fn subscribe(
        &mut self,
        envelope: &Frames,
        member: &Principal,
        now: Instant,
    ) -> Result<bool, WireError> {
        self.subscribe_with(envelope, member, now, SubscribeOptions::default())
    }

    /// Subscribes (or renews) the connection `envelope` for `member`, applying the ack in
    /// `options`; returns true if the subscription is new. A full node evicts the oldest
    /// subscription of the biggest holder when that holder holds more than `member` would
    /// after admission (module docs, "Fair slots").
    ///
    /// # Errors
    /// `limit_reached` when `member` holds its maximum of connections, or when the node is
    /// full and no principal holds more than `member` would.
    pub fn subscribe_with(
        &mut self,
        envelope: &Frames,
        member: &Principal,
        now: Instant,
        options: SubscribeOptions,
    ) -> Result<bool, WireError> {
        let expires = now + self.lease;
        if let Some(sub) = self.subs.get_mut(envelope) {
            sub.expires = expires;
            sub.batch = options.batch;
            self.in_flight -= sub.credit.renewal(options.acked_seq);
            if sub.member != *member {
                let (old, order) = (
                    std::mem::replace(&mut sub.member, member.clone()),
                    sub.order,
                );
                self.unindex(&old, order);
                self.index(member, order, envelope);
            }
            return Ok(false);
        }
        let mine = self.held_by(member);
        if mine >= self.max_per_member {
            return Err(WireError::new(
                ErrorCode::LimitReached,
                format!(
                    "this member has its maximum of {} live connections",
                    self.max_per_member
                ),
            ));
        }
        if self.subs.len() >= self.max {
            self.evict_for(member, mine)?;
        }
        let order = self.next_order;
        self.next_order += 1;
        let mut credit = self
            .draining
            .remove(envelope)
            .map(|d| d.credit)
            .unwrap_or_default();
        self.in_flight -= credit.renewal(options.acked_seq);
        self.subs.insert(
            envelope.clone(),
            Subscription {
                member: member.clone(),
                expires,
                order,
                batch: options.batch,
                credit,
            },
        );
        self.index(member, order, envelope);
        Ok(true)
    }

    /// Frees a slot for a principal holding `mine` subscriptions, by evicting the oldest
    /// subscription of the biggest holder.
    fn evict_for(&mut self, member: &Principal, mine: usize) -> Result<(), WireError> {
        let full = || {
            WireError::new(
                ErrorCode::LimitReached,
                format!(
                    "the node has its maximum of {} subscriptions, and no member holds more \
                     than this one would",
                    self.max
                ),
            )
        };
        let Some((held, top)) = self.by_count.last().cloned() else {
            return Err(full());
        };
        if held <= mine + 1 {
            return Err(full());
        }
        let Some(envelope) = self
            .by_member
            .get(&top)
            .and_then(|subs| subs.first_key_value())
            .map(|(_, e)| e.clone())
        else {
            return Err(full());
        };
        tracing::info!(
            evicted = top.as_str(),
            held,
            for_member = member.as_str(),
            "node full: evicted the oldest subscription of the biggest holder"
        );
        self.end(&envelope, EndCause::Evicted);
        Ok(())
    }

    fn index(&mut self, member: &Principal, order: u64, envelope: &Frames) {
        let subs = self.by_member.entry(member.clone()).or_default();
        let before = subs.len();
        subs.insert(order, envelope.clone());
        if before > 0 {
            self.by_count.remove(&(before, member.clone()));
        }
        self.by_count.insert((before + 1, member.clone()));
    }

    fn unindex(&mut self, member: &Principal, order: u64) {
        let Some(subs) = self.by_member.get_mut(member) else {
            return;
        };
        let before = subs.len();
        subs.remove(&order);
        let after = subs.len();
        if after == before {
            return;
        }
        self.by_count.remove(&(before, member.clone()));
        if after == 0 {
            self.by_member.remove(member);
        } else {
            self.by_count.insert((after, member.clone()));
        }
    }

    /// Ends a subscription; its bytes in flight stay counted until acked or found gone.
    fn end(&mut self, envelope: &Frames, why: EndCause) -> bool {
        let Some(sub) = self.subs.remove(envelope) else {
            return false;
        };
        self.unindex(&sub.member, sub.order);
        if sub.credit.bytes > 0 {
            self.draining.insert(
                envelope.clone(),
                Draining {
                    credit: sub.credit,
                    why,
                },
            );
        }
        if why != EndCause::Unsubscribed && self.notices.len() < MAX_NOTICES {
            self.notices.push((envelope.clone(), why));
        }
        true
    }

    /// Forgets a connection found gone: libzmq dropped its queue.
    fn forget(&mut self, envelope: &Frames) {
        if let Some(sub) = self.subs.remove(envelope) {
            self.unindex(&sub.member, sub.order);
            self.in_flight -= sub.credit.bytes;
        }
        if let Some(d) = self.draining.remove(envelope) {
            self.in_flight -= d.credit.bytes;
        }
    }

    /// Ends the subscription of the connection `envelope`; returns whether it had one.
    pub fn unsubscribe(&mut self, envelope: &Frames) -> bool {
        self.end(envelope, EndCause::Unsubscribed)
    }

    /// Ends every subscription (the group is gone); each is told at the next push round.
    pub fn end_all(&mut self) -> usize {
        let envelopes: Vec<Frames> = self.subs.keys().cloned().collect();
        for e in &envelopes {
            self.end(e, EndCause::Unsubscribed);
        }
        envelopes.len()
    }

    /// Ends every subscription of `member` (who left the group).
    pub fn remove_member(&mut self, member: &Principal) -> usize {
        let envelopes: Vec<Frames> = self
            .by_member
            .get(member)
            .map(|subs| subs.values().cloned().collect())
            .unwrap_or_default();
        for e in &envelopes {
            self.end(e, EndCause::Unsubscribed);
        }
        envelopes.len()
    }

    /// Ends subscriptions whose lease ran out; they are told at the next push round.
    pub fn expire(&mut self, now: Instant) -> usize {
        let expired: Vec<Frames> = self
            .subs
            .iter()
            .filter(|(_, s)| s.expires <= now)
            .map(|(e, _)| e.clone())
            .collect();
        for e in &expired {
            self.end(e, EndCause::Expired);
        }
        expired.len()
    }

    /// Pushes `entries` (committed, in seq order) to every subscriber within its budget, and
    /// sends waiting `unsubscribed` events, through `sink`; `now` paces the probes of ended
    /// subscriptions.
    ///
    /// # Errors
    /// [`PushFailed`] when the sink fails for good ([`Delivery::Failed`]).
    pub fn push(
        &mut self,
        sink: &mut dyn PushSink,
        group: &GroupName,
        entries: &[Message],
        now: Instant,
    ) -> Result<PushStats, PushFailed> {
        let mut stats = PushStats::default();
        let group_json = serde_json::to_string(group).unwrap_or_default();
        self.send_notices(sink, &group_json, &mut stats)?;
        if self.subs.is_empty() || entries.is_empty() {
            return Ok(stats);
        }
        // Each entry is encoded once; each push message is built once.
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .iter()
            .map(|e| (e.seq, serde_json::to_vec(e).unwrap_or_default()))
            .collect();
        let batches = if self.subs.values().any(|s| s.batch) {
            batch_events(&group_json, &encoded)
        } else {
            Vec::new()
        };
        let singles = if self.subs.values().any(|s| !s.batch) {
            single_events(&group_json, &encoded)
        } else {
            Vec::new()
        };
        let mut gone: Vec<Frames> = Vec::new();
        let mut total_full = false;
        let Subscribers {
            subs,
            in_flight,
            budget,
            total_budget,
            drop_every,
            pushes,
            ..
        } = self;
        for (envelope, sub) in subs.iter_mut() {
            let events = if sub.batch { &batches } else { &singles };
            for (seq, body) in events {
                let n = body.len();
                if sub.credit.bytes > 0 && sub.credit.bytes + n > *budget {
                    stats.withheld += 1;
                    continue;
                }
                if in_flight.would_pass(n, *total_budget) {
                    stats.withheld += 1;
                    total_full = true;
                    continue;
                }
                *pushes += 1;
                if *drop_every > 0 && *pushes % *drop_every == 0 {
                    stats.dropped += 1;
                    continue;
                }
                match sink.send(envelope, body) {
                    Delivery::Sent => {
                        sub.credit.record(*seq, n);
                        *in_flight += n;
                        stats.sent += 1;
                        stats.sent_bytes += n as u64;
                    }
                    Delivery::Full => stats.dropped += 1,
                    Delivery::Gone => {
                        gone.push(envelope.clone());
                        break;
                    }
                    Delivery::Failed => return Err(PushFailed),
                }
            }
        }
        for envelope in &gone {
            self.forget(envelope);
            stats.gone += 1;
        }
        if total_full {
            self.probe(sink, &group_json, &mut stats, now)?;
        }
        Ok(stats)
    }

    /// Sends the waiting `unsubscribed` events.
    fn send_notices(
        &mut self,
        sink: &mut dyn PushSink,
        group_json: &str,
        stats: &mut PushStats,
    ) -> Result<(), PushFailed> {
        for (envelope, why) in std::mem::take(&mut self.notices) {
            if self.subs.contains_key(&envelope) {
                continue; // subscribed again since
            }
            self.notify(sink, &envelope, group_json, why, stats)?;
        }
        Ok(())
    }

    /// While the total budget withholds pushes, probes each ended subscription still
    /// holding bytes, at most once per [`PROBE_INTERVAL`]: a connection found gone frees them.
    fn probe(
        &mut self,
        sink: &mut dyn PushSink,
        group_json: &str,
        stats: &mut PushStats,
        now: Instant,
    ) -> Result<(), PushFailed> {
        if self.next_probe.is_some_and(|t| now < t) {
            return Ok(());
        }
        self.next_probe = Some(now + PROBE_INTERVAL);
        let ended: Vec<(Frames, EndCause)> = self
            .draining
            .iter()
            .map(|(e, d)| (e.clone(), d.why))
            .collect();
        for (envelope, why) in ended {
            self.notify(sink, &envelope, group_json, why, stats)?;
        }
        Ok(())
    }

    /// Sends one `unsubscribed` event; its bytes count against a draining connection.
    fn notify(
        &mut self,
        sink: &mut dyn PushSink,
        envelope: &Frames,
        group_json: &str,
        why: EndCause,
        stats: &mut PushStats,
    ) -> Result<(), PushFailed> {
        let body = format!(
            r#"{{"event":"unsubscribed","group":{group_json},"reason":"{}"}}"#,
            why.reason()
        );
        match sink.send(envelope, body.as_bytes()) {
            Delivery::Sent => {
                if let Some(d) = self.draining.get_mut(envelope) {
                    let newest = d.credit.newest;
                    d.credit.record(newest, body.len());
                    self.in_flight += body.len();
                }
                Ok(())
            }
            Delivery::Full => Ok(()),
            Delivery::Gone => {
                if self.draining.contains_key(envelope) {
                    stats.gone += 1;
                }
                self.forget(envelope);
                Ok(())
            }
            Delivery::Failed => Err(PushFailed),
        }
    }
}

/// `{"event":"entries",…}` messages of consecutive encoded entries, each closed once it
/// passes [`MAX_PUSH_BATCH_BYTES`]: (newest seq, bytes).
fn batch_events(group_json: &str, encoded: &[(u64, Vec<u8>)]) -> Vec<(u64, Vec<u8>)> {
    let head = format!(r#"{{"event":"entries","group":{group_json},"entries":["#);
    let mut out = Vec::new();
    let mut current: Option<(u64, Vec<u8>)> = None;
    for (seq, entry) in encoded {
        let (newest, body) = current.get_or_insert_with(|| {
            let mut b = Vec::with_capacity(head.len() + entry.len() + 2);
            b.extend_from_slice(head.as_bytes());
            (*seq, b)
        });
        if body.len() > head.len() {
            body.push(b',');
        }
        body.extend_from_slice(entry);
        *newest = *seq;
        if body.len() >= MAX_PUSH_BATCH_BYTES {
            if let Some((seq, mut body)) = current.take() {
                body.extend_from_slice(b"]}");
                out.push((seq, body));
            }
        }
    }
    if let Some((seq, mut body)) = current {
        body.extend_from_slice(b"]}");
        out.push((seq, body));
    }
    out
}

/// One `{"event":"entry",…}` message per encoded entry: (seq, bytes).
fn single_events(group_json: &str, encoded: &[(u64, Vec<u8>)]) -> Vec<(u64, Vec<u8>)> {
    let head = format!(r#"{{"event":"entry","group":{group_json},"entry":"#);
    encoded
        .iter()
        .map(|(seq, entry)| {
            let mut b = Vec::with_capacity(head.len() + entry.len() + 1);
            b.extend_from_slice(head.as_bytes());
            b.extend_from_slice(entry);
            b.push(b'}');
            (*seq, b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_proto::wire::{EntryKind, PushBatch, PushEvent, UserName};

    fn env(id: &[u8]) -> Frames {
        vec![id.to_vec(), Vec::new()]
    }

    fn name(n: &str) -> Principal {
        Principal::name(&UserName::new(n).expect("name"))
    }

    #[test]
    fn leases_renew_expire_and_are_bounded() {
        let mut s = Subscribers::new(Duration::from_secs(5), 2, 2, 0);
        let alice = name("alice");
        let t0 = Instant::now();
        assert_eq!(s.subscribe(&env(b"a"), &alice, t0), Ok(true));
        assert_eq!(s.subscribe(&env(b"b"), &alice, t0), Ok(true));
        let full = s.subscribe(&env(b"c"), &alice, t0).expect_err("full");
        assert_eq!(full.code, ErrorCode::LimitReached);
        assert_eq!(
            s.subscribe(&env(b"a"), &alice, t0 + Duration::from_secs(4)),
            Ok(false)
        );
        assert_eq!(s.expire(t0 + Duration::from_secs(6)), 1);
        assert_eq!(s.len(), 1);
        assert_eq!(s.remove_member(&alice), 1);
        assert!(s.is_empty());
        assert_eq!(s.held_by(&alice), 0);
    }

    #[test]
    fn connections_per_member_are_bounded() {
        let mut s = Subscribers::new(Duration::from_secs(5), 100, 2, 0);
        let t0 = Instant::now();
        assert_eq!(s.subscribe(&env(b"a1"), &name("alice"), t0), Ok(true));
        assert_eq!(s.subscribe(&env(b"a2"), &name("alice"), t0), Ok(true));
        let third = s
            .subscribe(&env(b"a3"), &name("alice"), t0)
            .expect_err("bounded");
        assert_eq!(third.code, ErrorCode::LimitReached);
        // Renewing an existing one, and other members, are fine.
        assert_eq!(s.subscribe(&env(b"a1"), &name("alice"), t0), Ok(false));
        assert_eq!(s.subscribe(&env(b"b1"), &name("bob"), t0), Ok(true));
    }

    #[test]
    fn a_full_node_evicts_the_oldest_lease_of_the_biggest_holder() {
        let mut s = Subscribers::new(Duration::from_secs(5), 4, 16, 0);
        let t0 = Instant::now();
        for i in 0..3u8 {
            assert_eq!(
                s.subscribe(&env(&[b'm', i]), &name("mallory"), t0),
                Ok(true)
            );
        }
        assert_eq!(s.subscribe(&env(b"b1"), &name("bob"), t0), Ok(true));
        // Full: alice (0 held) takes mallory's oldest (mallory holds 3 > 0 + 1).
        assert_eq!(s.subscribe(&env(b"a1"), &name("alice"), t0), Ok(true));
        assert_eq!(s.held_by(&name("mallory")), 2);
        assert_eq!(s.len(), 4);
        assert_eq!(s.notices, vec![(env(&[b'm', 0]), EndCause::Evicted)]);
        // Alice's second: mallory holds 2, not more than alice would (2): refused.
        let refused = s
            .subscribe(&env(b"a2"), &name("alice"), t0)
            .expect_err("fair share reached");
        assert_eq!(refused.code, ErrorCode::LimitReached);
        // Mallory cannot take back a slot from bob or alice (1 each).
        let refused = s
            .subscribe(&env(b"m9"), &name("mallory"), t0)
            .expect_err("mallory holds the most");
        assert_eq!(refused.code, ErrorCode::LimitReached);
        // The evicted connection's renewal is a new subscription, refused the same way.
        assert!(s.subscribe(&env(&[b'm', 0]), &name("mallory"), t0).is_err());
    }

    /// Item 4 of issue 10 at full scale, on `Subscribers` itself (the process-level test in
    /// `tests/tests/push_budget.rs` does the same over CURVE at a smaller scale): 1,000 fresh
    /// keys each subscribe up to their limit of 16 on a node of 10,000 slots, then a
    /// long-standing member subscribes.
    #[test]
    fn a_thousand_fresh_keys_cannot_lock_a_member_out() {
        let mut s = Subscribers::new(Duration::from_secs(5), 10_000, 16, 0);
        let t0 = Instant::now();
        let member = name("member");
        assert_eq!(s.subscribe(&env(b"member-1"), &member, t0), Ok(true));
        let mut refused = 0;
        for k in 0..1000u32 {
            let key = name(&format!("fresh{k}"));
            for c in 0..16u32 {
                let e = env(format!("f{k}-{c}").as_bytes());
                match s.subscribe(&e, &key, t0) {
                    Ok(true) => {}
                    Ok(false) => panic!("a new connection counted as a renewal"),
                    Err(e) => {
                        assert_eq!(e.code, ErrorCode::LimitReached);
                        refused += 1;
                    }
                }
            }
        }
        assert_eq!(s.len(), 10_000);
        assert!(refused > 0);
        // The member kept its lease and can open more connections.
        assert_eq!(s.held_by(&member), 1);
        assert_eq!(s.subscribe(&env(b"member-1"), &member, t0), Ok(false));
        assert_eq!(s.subscribe(&env(b"member-2"), &member, t0), Ok(true));
        assert_eq!(s.subscribe(&env(b"member-3"), &member, t0), Ok(true));
        assert_eq!(s.held_by(&member), 3);
        // Nobody holds more than a fair share plus one.
        let most = s.by_count.last().map_or(0, |(n, _)| *n);
        assert!(most <= 11, "a key holds {most}");
    }

    fn entry(seq: u64, body: &str) -> Message {
        Message {
            seq,
            id: agora_proto::id::MessageId::new_v7(),
            time: agora_proto::time::Timestamp::from_micros(i64::try_from(seq).unwrap_or(0)),
            sender: UserName::new("alice").expect("name"),
            kind: EntryKind::Message,
            body: serde_json::value::RawValue::from_string(body.to_owned()).expect("json"),
            sender_key: None,
            attachment: None,
        }
    }

    #[test]
    fn batches_are_valid_events_within_the_cap_and_singles_match_push_event() {
        let group = GroupName::new("Cool Group").expect("name");
        let g = serde_json::to_string(&group).expect("json");
        let big = format!("\"{}\"", "x".repeat(400 << 10));
        let entries: Vec<Message> = (1..=6).map(|s| entry(s, &big)).collect();
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .iter()
            .map(|e| (e.seq, serde_json::to_vec(e).expect("json")))
            .collect();
        let batches = batch_events(&g, &encoded);
        // 400 KiB entries: three fill a 1 MiB batch.
        assert_eq!(
            batches.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![3, 6]
        );
        let mut seqs = Vec::new();
        for (newest, bytes) in &batches {
            assert!(bytes.len() < MAX_PUSH_BATCH_BYTES + (401 << 10));
            let b: PushBatch = serde_json::from_slice(bytes).expect("a valid batch");
            assert_eq!((b.event.as_str(), &b.group), ("entries", &group));
            assert_eq!(b.entries.last().map(|e| e.seq), Some(*newest));
            seqs.extend(b.entries.iter().map(|e| e.seq));
        }
        assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
        for ((seq, bytes), e) in single_events(&g, &encoded).iter().zip(&entries) {
            let p: PushEvent = serde_json::from_slice(bytes).expect("a valid event");
            assert_eq!((*seq, p.event.as_str(), &p.entry), (e.seq, "entry", e));
        }
    }

    #[test]
    fn credit_frees_on_ack_and_older_clients_ack_on_the_second_renewal() {
        let mut c = Credit::default();
        c.record(3, 100);
        c.record(5, 50);
        assert_eq!(c.renewal(Some(4)), 100);
        assert_eq!(c.bytes, 50);
        assert_eq!(c.renewal(Some(9)), 50);
        assert!(c.in_flight.is_empty());
        let mut legacy = Credit::default();
        legacy.record(1, 10);
        assert_eq!(
            legacy.renewal(None),
            0,
            "pushed after no renewal: still in flight"
        );
        legacy.record(2, 20);
        assert_eq!(
            legacy.renewal(None),
            10,
            "pushed before the previous renewal"
        );
        assert_eq!(legacy.renewal(None), 20);
    }

    /// A sink whose connections never read: every push is queued, except to the
    /// connections in `gone`, which are found gone (as `ROUTER_MANDATORY` reports them).
    #[derive(Default)]
    struct Unread {
        gone: std::collections::HashSet<Frames>,
    }

    impl PushSink for Unread {
        fn send(&mut self, envelope: &Frames, _body: &[u8]) -> Delivery {
            if self.gone.contains(envelope) {
                Delivery::Gone
            } else {
                Delivery::Sent
            }
        }
    }

    /// A group host's total push budget holds over all its groups: 20 groups, each with
    /// room for 5 pushes of its own and 3 per subscription, share a host total of 10; a
    /// round of pushes to every group sends 10 in all, the others are withheld; an ack in
    /// one group frees room for the others; a group dropped gives its bytes back.
    #[test]
    fn pushes_across_many_groups_stop_at_the_host_total() {
        let body = format!("\"{}\"", "z".repeat(1000));
        let one = single_events(
            "\"g00\"",
            &[(1, serde_json::to_vec(&entry(1, &body)).expect("json"))],
        )[0]
        .1
        .len();
        let host = Arc::new(HostBudget::new(10 * one + 10));
        let t0 = Instant::now();
        let mut groups: Vec<(GroupName, Subscribers)> = (0..20)
            .map(|i| {
                let mut s = Subscribers::new(Duration::from_secs(5), 10, 10, 0)
                    .with_push_budget(3 * one + 10, 5 * one + 10)
                    .with_host_budget(Arc::clone(&host));
                s.subscribe(&env(&[b'h', i]), &name("u"), t0)
                    .expect("subscribe");
                (GroupName::new(format!("g{i:02}")).expect("name"), s)
            })
            .collect();
        let mut sink = VecSink::default();
        let mut withheld = 0;
        for (group, s) in &mut groups {
            let stats = s
                .push(&mut sink, group, &[entry(1, &body)], t0)
                .expect("push");
            withheld += stats.withheld;
        }
        assert_eq!(sink.sent.len(), 10, "the host's total, not 20 groups' own");
        assert_eq!(withheld, 10);
        assert_eq!(host.in_flight(), 10 * one);
        let mine: usize = groups.iter().map(|(_, s)| s.in_flight_bytes()).sum();
        assert_eq!(mine, host.in_flight(), "each group counts its share");

        // The first group's subscriber acks: one more push fits, in another group.
        let (first, rest) = groups.split_at_mut(1);
        first[0]
            .1
            .subscribe_with(
                &env(&[b'h', 0]),
                &name("u"),
                t0,
                SubscribeOptions {
                    acked_seq: Some(1),
                    ..SubscribeOptions::default()
                },
            )
            .expect("ack");
        assert_eq!(host.in_flight(), 9 * one);
        let (group, s) = &mut rest[15];
        s.push(&mut sink, group, &[entry(2, &body)], t0)
            .expect("push");
        assert_eq!(sink.sent.len(), 11);
        assert_eq!(host.in_flight(), 10 * one);

        // A group dropped (its engine gone) gives its bytes back to the host.
        let held = groups[1].1.in_flight_bytes();
        assert!(held > 0);
        groups.remove(1);
        assert_eq!(host.in_flight(), 10 * one - held);
    }

    /// One group's subscribers that never ack stop at that group's own total, not at the
    /// host's: a group with room for 2 pushes of its own (5 subscribers, a host total of
    /// 10) sends 2, and another group of the same host still gets its pushes (before, the
    /// first group filled the host's total and the second got none).
    #[test]
    fn one_groups_unacked_pushes_starved_the_other_groups_of_the_host() {
        let body = format!("\"{}\"", "z".repeat(1000));
        let one = single_events(
            "\"g00\"",
            &[(1, serde_json::to_vec(&entry(1, &body)).expect("json"))],
        )[0]
        .1
        .len();
        let host = Arc::new(HostBudget::new(10 * one + 10));
        let t0 = Instant::now();
        let make = |tag: u8| {
            let mut s = Subscribers::new(Duration::from_secs(5), 10, 10, 0)
                .with_push_budget(3 * one + 10, 2 * one + 10)
                .with_host_budget(Arc::clone(&host));
            for i in 0..5u8 {
                s.subscribe(&env(&[tag, i]), &name(&format!("u{i}")), t0)
                    .expect("subscribe");
            }
            s
        };
        let (mut a, mut b) = (make(b'a'), make(b'b'));
        let (ga, gb) = (
            GroupName::new("g01").expect("name"),
            GroupName::new("g02").expect("name"),
        );
        let mut sink = VecSink::default();
        for seq in 1..=4 {
            a.push(&mut sink, &ga, &[entry(seq, &body)], t0)
                .expect("push");
        }
        assert_eq!(sink.sent.len(), 2, "group a stops at its own total");
        assert_eq!(host.in_flight(), 2 * one);
        let stats = b
            .push(&mut sink, &gb, &[entry(1, &body)], t0)
            .expect("push");
        assert_eq!(stats.sent, 2, "group b still pushes");
        assert_eq!(host.in_flight(), 4 * one);
    }

    /// Pushes to connections that never read: the budgets hold, an ack frees its
    /// subscription's budget, and an expired subscription keeps its bytes counted until its
    /// connection acks or is gone.
    #[test]
    fn budgets_withhold_pushes_until_acked() {
        let mut sink = Unread::default();
        let group = GroupName::new("g").expect("name");
        let body = format!("\"{}\"", "y".repeat(1000));
        let one = single_events(
            "\"g\"",
            &[(1, serde_json::to_vec(&entry(1, &body)).expect("json"))],
        )[0]
        .1
        .len();
        // Room for 3 pushes per subscription, 5 in all.
        let mut s = Subscribers::new(Duration::from_secs(5), 10, 10, 0)
            .with_push_budget(3 * one + 10, 5 * one + 10);
        let envelopes: Vec<Frames> = (0..2u8).map(|i| env(&[b'd', i])).collect();
        let t0 = Instant::now();
        for (i, e) in envelopes.iter().enumerate() {
            s.subscribe(e, &name(&format!("u{i}")), t0)
                .expect("subscribe");
        }
        let mut seq = 0;
        let mut round = |s: &mut Subscribers, sink: &mut Unread| {
            seq += 1;
            s.push(sink, &group, &[entry(seq, &body)], t0)
                .expect("push")
        };
        let mut sent = 0;
        for _ in 0..4 {
            sent += round(&mut s, &mut sink).sent;
        }
        // 4 rounds × 2 subscribers = 8 offered: 2 + 2, then the total (5) lets one more
        // through, then nothing.
        assert_eq!(sent, 5);
        assert_eq!(s.in_flight_bytes(), 5 * one);
        assert!(envelopes.iter().all(|e| s.subs[e].credit.bytes <= 3 * one));
        let d1_bytes = s.subs[&envelopes[1]].credit.bytes;
        // d0 acks all it got: its bytes are freed, and it has room again.
        s.subscribe_with(
            &envelopes[0],
            &name("u0"),
            t0,
            SubscribeOptions {
                batch: false,
                acked_seq: Some(4),
            },
        )
        .expect("ack");
        assert_eq!(s.in_flight_bytes(), d1_bytes);
        round(&mut s, &mut sink);
        assert_eq!(s.subs[&envelopes[0]].credit.bytes, one);
        // Expiry keeps the bytes counted: the connections still hold them.
        let before = s.in_flight_bytes();
        s.expire(t0 + Duration::from_secs(6));
        assert!(s.is_empty());
        assert_eq!(s.in_flight_bytes(), before);
        // d1 goes away: the next probe finds it gone and frees its bytes.
        sink.gone.insert(envelopes[1].clone());
        s.next_probe = None;
        s.probe(&mut sink, "\"g\"", &mut PushStats::default(), t0)
            .expect("probe");
        assert_eq!(
            s.draining.len(),
            1,
            "the closed connection was not found gone"
        );
        // d0 subscribes again with an ack of everything: nothing is in flight any more.
        s.subscribe_with(
            &envelopes[0],
            &name("u0"),
            t0,
            SubscribeOptions {
                batch: true,
                acked_seq: Some(seq),
            },
        )
        .expect("again");
        assert_eq!(s.in_flight_bytes(), 0);
    }
}
