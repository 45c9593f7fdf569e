//! The request loop of a host: receive a batch, apply each request to its group, commit
//! once, hand the sync stage the batch, release replies and pushes once it is durable.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agora_common::client::ClientCurve;
use agora_common::keys::PublicKey;
use agora_common::server::{rate_limit, recv_batch, reply_frames, send_reply, Incoming, Received};
use agora_common::shutdown::{Shutdown, SHUTDOWN_POLL};
use agora_proto::action::{call, NodeRequest};
use agora_proto::codec::Frames;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    ErrorCode, GroupName, HistoryQuery, Message, RenewReply, RenewRequest, SendAck, StopReply,
    WireError, MAX_RENEW_GROUPS,
};

use super::create::Creating;
use super::groups::Loaded;
use super::route::{route, route_name, Route, Serving};
use super::{
    durable, heartbeat, lease, wal_estimate, Node, NodeError, CHECKPOINT_BYTES, MAX_BATCH,
    MAX_PIPELINE,
};
use crate::group::subscribers::{Delivery, PushSink};
use crate::group::{blobs, reply, Applied, Input};
use crate::store::{Flush, GroupLog, StoreError};

/// The host's [`PushSink`]: its ROUTER socket, sending without blocking. A vanished peer
/// (`EHOSTUNREACH`, the socket is `ROUTER_MANDATORY`) is [`Delivery::Gone`], a full queue
/// (`EAGAIN`) [`Delivery::Full`]; any other libzmq error is kept in `failed` for the host
/// to stop on.
pub struct RouterSink<'a> {
    socket: &'a zmq::Socket,
    /// The libzmq error that failed a push, if one did.
    pub failed: Option<zmq::Error>,
}

impl<'a> RouterSink<'a> {
    /// A sink over `socket` (a ROUTER).
    pub fn new(socket: &'a zmq::Socket) -> RouterSink<'a> {
        RouterSink {
            socket,
            failed: None,
        }
    }
}

impl PushSink for RouterSink<'_> {
    fn send(&mut self, envelope: &Frames, body: &[u8]) -> Delivery {
        let frames = envelope
            .iter()
            .map(Vec::as_slice)
            .chain([agora_proto::wire::PROTOCOL, body]);
        match self.socket.send_multipart(frames, zmq::DONTWAIT) {
            Ok(()) => Delivery::Sent,
            Err(zmq::Error::EAGAIN) => Delivery::Full,
            Err(zmq::Error::EHOSTUNREACH) => Delivery::Gone,
            Err(e) => {
                self.failed = Some(e);
                Delivery::Failed
            }
        }
    }
}

impl Node {
    /// Serves until `shutdown` is triggered, then unregisters.
    ///
    /// # Errors
    /// [`NodeError::Zmq`] if the socket fails, [`NodeError::Thread`]. Bad requests and
    /// storage failures are answered and never end the loop.
    pub fn run(mut self, shutdown: &Shutdown) -> Result<(), NodeError> {
        let members = Arc::new(AtomicU64::new(self.member_count(0)));
        let curve = self
            .keys
            .clone()
            .zip(self.config.registry_key)
            .map(|(keypair, server_key)| ClientCurve {
                keypair,
                server_key,
            });
        self.registrar = match (&self.config.registry, self.many) {
            (Some(registry), true) => {
                let registrar = crate::registrar::Registrar::start(
                    &self.ctx,
                    crate::registrar::RegistrarConfig {
                        registry: registry.clone(),
                        curve: curve.clone(),
                        endpoint: self.endpoint.clone(),
                        heartbeat: self.config.heartbeat,
                    },
                )
                .map_err(NodeError::Thread)?;
                for slot in 0..self.groups.len() {
                    let members = self.member_count(slot);
                    registrar.set(self.groups.get(slot).name.clone(), members);
                }
                Some(registrar)
            }
            _ => None,
        };
        let _heartbeat = match &self.config.registry {
            Some(_) if self.many => None,
            Some(registry) => Some(
                heartbeat::Heartbeat::start(
                    &self.ctx,
                    registry.clone(),
                    curve,
                    self.config.name.clone(),
                    self.endpoint.clone(),
                    self.config.heartbeat,
                    Arc::clone(&members),
                )
                .map_err(NodeError::Thread)?,
            ),
            None => None,
        };
        let syncer =
            durable::Syncer::start(&self.ctx, self.db.flusher()).map_err(NodeError::Thread)?;
        let checkpoints = match self.db.checkpoints()? {
            Some(checkpointer) => Some(
                durable::CheckpointThread::start(&self.ctx, checkpointer)
                    .map_err(NodeError::Thread)?,
            ),
            None => None,
        };
        // A host of one seals in its group's tree (with its PostgreSQL copy); a group host
        // names each group's tree with each seal.
        // (A group host may start with no group at all: it has no slot 0.)
        let one = match self.many {
            false => self.groups.get(0).loaded.as_deref(),
            true => None,
        };
        let (layout, pg) = match one {
            Some(l) => (l.group.blobs.layout(), l.group.blobs.postgres().cloned()),
            None => (
                blobs::BlobLayout::at(self.config.data_dir.join("blobs")),
                None,
            ),
        };
        let sealer = match self.many {
            false => durable::Sealer::start(&self.ctx, layout, pg),
            // A group host's blobs in PostgreSQL: the host's schema, each job's gid.
            true => durable::Sealer::start_host(
                &self.ctx,
                layout,
                super::host_blob_target(&self.config, &self.db, self.lease.as_ref()),
            ),
        };
        self.sealer = Some(sealer.map_err(NodeError::Thread)?);
        if self.many {
            tracing::info!(groups = self.groups.len(), endpoint = %self.endpoint, "group host serving");
        } else {
            tracing::info!(group = %self.config.name, endpoint = %self.endpoint,
                last_seq = self.last_seq(0), "group node serving");
        }
        let poll_ms = i64::try_from(SHUTDOWN_POLL.as_millis()).unwrap_or(100);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut pipeline = Pipeline {
            wal: self.db.flusher(),
            requested: 0,
            wal_written: 0,
            waiting: VecDeque::new(),
        };
        self.schedule_sweeps_at_start(Instant::now());
        let mut next_lease_sweep = Instant::now();
        let mut lost = false;
        while !shutdown.is_triggered() && !self.stopping {
            if self.deposed || self.lease.as_ref().is_some_and(|l| !l.held()) {
                tracing::error!(group = %self.config.name, "lost the lease; stopping (another node may be active)");
                lost = true;
                break;
            }
            let accepting = pipeline.waiting.len() < MAX_PIPELINE;
            // A create waiting for the registry is looked at every 10 ms, not every 100.
            let poll_ms = if self.creates_waiting() { 10 } else { poll_ms };
            let (requests, synced, sealed) = {
                let sealer = self.sealer.as_ref().map(durable::Sealer::poll_item);
                let mut items: Vec<zmq::PollItem<'_>> = [
                    Some(self.socket.as_poll_item(if accepting {
                        zmq::POLLIN
                    } else {
                        zmq::PollEvents::empty()
                    })),
                    Some(syncer.poll_item()),
                    sealer,
                ]
                .into_iter()
                .flatten()
                .collect();
                match zmq::poll(&mut items, poll_ms) {
                    Ok(_) => {}
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                (
                    items[0].is_readable(),
                    items[1].is_readable(),
                    items.get(2).is_some_and(zmq::PollItem::is_readable),
                )
            };
            if sealed {
                self.answer_seals()?;
            }
            if synced {
                if let Some(upto) = syncer.recv(0)? {
                    self.release(&mut pipeline, upto)?;
                }
            }
            if requests {
                recv_batch(&self.socket, MAX_BATCH, &mut batch)?;
                if !batch.is_empty() {
                    let done = self.serve_batch(&mut batch);
                    members.store(self.member_count(0), Ordering::Relaxed);
                    self.schedule_age_sweeps(done.appended.keys().copied(), Instant::now());
                    if let Some(registrar) = &self.registrar {
                        // A pending group is registered by its create ([`Node::settle_creates`]).
                        for &slot in done.appended.keys() {
                            if self.groups.get(slot).pending {
                                continue;
                            }
                            let count = self.member_count(slot);
                            registrar.set(self.groups.get(slot).name.clone(), count);
                        }
                    }
                    self.queue(&mut pipeline, done, &syncer, checkpoints.as_ref())?;
                }
            }
            if self.creates_waiting() {
                if let Some(settled) = self.settle_creates(Instant::now()) {
                    self.queue(&mut pipeline, settled, &syncer, checkpoints.as_ref())?;
                }
            }
            if Instant::now() >= next_lease_sweep {
                let now = Instant::now();
                let expired: usize = self
                    .groups
                    .loaded_mut()
                    .map(|(_, l)| l.group.expire(now))
                    .sum();
                if expired > 0 {
                    tracing::debug!(expired, "subscriptions expired");
                }
                self.update_gauges();
                next_lease_sweep = Instant::now() + Duration::from_millis(500);
            }
            // Only the groups due: nothing per group while none is.
            if self.sweep_ages(Instant::now(), Timestamp::now()) {
                pipeline.requested += 1;
                syncer.request(pipeline.requested)?;
            }
            self.sweep_blobs_due(Instant::now(), SystemTime::now());
            self.let_go_idle(Instant::now());
        }
        agora_common::metrics::set_draining();
        // Drain: every batch already committed gets its sync, then its replies and pushes;
        // requests arriving meanwhile are refused with `shutting_down` (nothing of them done).
        tracing::info!(group = %self.config.name, batches = pipeline.waiting.len(), "draining");
        let mut waited = Duration::ZERO;
        while let Some(last) = pipeline.waiting.back().map(|w| w.batch) {
            self.refuse_arrivals(&mut batch)?;
            match syncer.recv(100)? {
                Some(upto) => self.release(&mut pipeline, upto)?,
                None => {
                    waited += Duration::from_millis(100);
                    if waited.as_millis().is_multiple_of(1000) {
                        tracing::warn!(waiting_for = last, "still waiting for the WAL sync");
                    }
                }
            }
        }
        self.refuse_arrivals(&mut batch)?;
        for (envelope, reply) in self.refuse_creates() {
            send_reply(&self.socket, envelope, reply)?;
        }
        drop(checkpoints);
        if lost {
            return Err(NodeError::LeaseLost);
        }
        self.registrar = None;
        tracing::info!(group = %self.config.name, "group node stopping");
        Ok(())
    }

    /// The gauges a scrape reads: log bytes on disk and subscriptions over every group; the
    /// last seq on a node of one; the groups by state on a group host (host-wide series
    /// only: their number is bounded whatever the number of groups).
    fn update_gauges(&mut self) {
        use agora_common::metrics::{
            HOST_GROUPS, HOST_GROUPS_LOADED, LAST_SEQ, LOG_BYTES, SUBSCRIBERS,
        };
        if !self.many {
            LAST_SEQ.set(i64::try_from(self.last_seq(0)).unwrap_or(i64::MAX));
        } else {
            let (mut live, mut pending, mut stopped, mut deleted, mut loaded) = (0, 0, 0, 0, 0);
            for (slot, h) in self.groups.iter() {
                match (h.pending, h.stopped) {
                    (true, _) => pending += 1,
                    (false, false) => live += 1,
                    // A deleted group's name left the table (another may hold it now).
                    (false, true) if self.groups.slot(&h.name) == Some(slot) => stopped += 1,
                    (false, true) => deleted += 1,
                }
                loaded += i64::from(h.loaded.is_some());
            }
            for (state, n) in [
                ("live", live),
                ("pending", pending),
                ("stopped", stopped),
                ("deleted", deleted),
            ] {
                HOST_GROUPS.with_label_values(&[state]).set(n);
            }
            HOST_GROUPS_LOADED.set(loaded);
        }
        let subscribers: usize = self
            .groups
            .iter()
            .filter_map(|(_, h)| h.loaded.as_deref())
            .map(|l| l.group.subscribers().len())
            .sum();
        SUBSCRIBERS.set(i64::try_from(subscribers).unwrap_or(i64::MAX));
        let bytes = self.db.stored_bytes();
        LOG_BYTES.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Answers every request already waiting with `shutting_down`: the node is draining.
    fn refuse_arrivals(&mut self, batch: &mut Vec<Received>) -> Result<(), NodeError> {
        recv_batch(&self.socket, MAX_BATCH, batch)?;
        for received in batch.drain(..) {
            if let Ok(incoming) = Incoming::<NodeRequest>::from_received(received) {
                send_reply(
                    &self.socket,
                    incoming.envelope,
                    reply_frames::<()>(Err(stopping())),
                )?;
            }
        }
        Ok(())
    }

    /// `stop`: accepted from the group owner's key or the node's own; the loop then ends and
    /// the node drains (`run`).
    ///
    /// # Errors
    /// `forbidden` for any other key, and on an `--insecure` node (no key to check).
    fn begin_stop(&mut self, peer: Option<PublicKey>) -> Result<StopReply, WireError> {
        let Some(peer) = peer else {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "stop needs the operator's CURVE key; this node runs --insecure: send it SIGTERM",
            ));
        };
        if Some(peer) != self.groups.get(0).owner && Some(peer) != self.public_key() {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "only the group owner's key or the node's own may stop it",
            ));
        }
        tracing::info!(group = %self.config.name, by = %peer, "stop requested");
        self.stopping = true;
        Ok(StopReply { stopping: true })
    }

    /// `renew` (PROTOCOL §6.7.1): one `subscribe` per entry, each routed on its own; the
    /// refused entries' errors name their group.
    ///
    /// # Errors
    /// `invalid_field` naming `groups` when it holds none or more than
    /// [`MAX_RENEW_GROUPS`].
    fn renew(&mut self, r: RenewRequest, input: &Input<'_>) -> Result<RenewReply, WireError> {
        if r.groups.is_empty() || r.groups.len() > MAX_RENEW_GROUPS {
            return Err(WireError::new(
                ErrorCode::InvalidField,
                format!(
                    "groups: {} entries; send 1 to {MAX_RENEW_GROUPS}",
                    r.groups.len()
                ),
            ));
        }
        let mut reply = RenewReply {
            groups: Vec::with_capacity(r.groups.len()),
            refused: Vec::new(),
        };
        for entry in r.groups {
            let routed = {
                let groups = &self.groups;
                let live = |n: &GroupName| groups.serves(n);
                let serving = if self.many {
                    Serving::Many(live)
                } else {
                    Serving::One(&self.config.name)
                };
                route_name(&entry.group, &serving)
            };
            // A group stopped on this host answers as a stopping node, as in `dispatch`.
            let routed = match routed {
                Err(e)
                    if e.code == ErrorCode::UnknownGroup && self.groups.stopped(&entry.group) =>
                {
                    Err(stopping())
                }
                routed => routed,
            };
            let named = Some(entry.group.clone());
            let result = routed
                .and_then(|name| {
                    let slot = self.groups.slot(&name).ok_or_else(internal_error)?;
                    self.load(slot)?;
                    Ok(slot)
                })
                .and_then(|slot| {
                    let Node { db, groups, .. } = &mut *self;
                    let l = groups
                        .get_mut(slot)
                        .loaded
                        .as_deref_mut()
                        .ok_or_else(internal_error)?;
                    let mut view = db.group(&mut l.log);
                    l.group.renew(&mut view, &r.user, entry.acked_seq, input)
                })
                .map_err(|e| e.with_group(named));
            match result {
                Ok(renewed) => reply.groups.push(renewed),
                Err(e) => reply.refused.push(e),
            }
        }
        Ok(reply)
    }

    /// Queues a served batch behind the batches still syncing, asking for its own sync if it
    /// wrote; a batch that wrote nothing with nothing ahead of it is released at once.
    fn queue(
        &mut self,
        pipeline: &mut Pipeline,
        done: Served,
        syncer: &durable::Syncer,
        checkpoints: Option<&durable::CheckpointThread>,
    ) -> Result<(), NodeError> {
        if done.wrote {
            agora_common::metrics::COMMIT_BATCH.observe(done.replies.len() as f64);
            pipeline.wal_written += done.appended.values().map(|a| wal_estimate(a)).sum::<u64>();
            if pipeline.wal_written >= CHECKPOINT_BYTES {
                pipeline.wal_written = 0;
                if let Some(checkpoints) = checkpoints {
                    checkpoints.nudge();
                }
            }
        }
        if done.wrote && pipeline.waiting.is_empty() && !self.request_waiting() {
            // Nothing else to do meanwhile: sync here and spare the two thread wake-ups of
            // the sync stage, which one client waiting for each ack pays in full (measured:
            // about 20% of acked appends at 1 in flight on the 2026-12-01 machine). A request
            // arriving now waits at most this sync, as it would for its own batch's.
            if let Err(e) = pipeline.wal.sync() {
                tracing::error!(error = %e, "fdatasync of the WAL failed");
                return Err(durable::SyncFailed.into());
            }
            return self.send_out(done.replies, done.appended, done.creates);
        }
        if done.wrote {
            pipeline.requested += 1;
            syncer.request(pipeline.requested)?;
        } else if pipeline.waiting.is_empty() {
            return self.send_out(done.replies, done.appended, done.creates);
        }
        pipeline.waiting.push_back(Waiting {
            batch: pipeline.requested,
            replies: done.replies,
            appended: done.appended,
            creates: done.creates,
        });
        Ok(())
    }

    /// Whether a request is already waiting on the ROUTER (`ZMQ_EVENTS`, no system call).
    fn request_waiting(&self) -> bool {
        self.socket
            .get_events()
            .map(|e| e.contains(zmq::POLLIN))
            .unwrap_or(true)
    }

    /// Releases, in order, every waiting batch that the sync up to `upto` covers.
    fn release(&mut self, pipeline: &mut Pipeline, upto: u64) -> Result<(), NodeError> {
        while pipeline.waiting.front().is_some_and(|w| w.batch <= upto) {
            if let Some(w) = pipeline.waiting.pop_front() {
                self.send_out(w.replies, w.appended, w.creates)?;
            }
        }
        Ok(())
    }

    /// Sends a durable batch's replies, then pushes its entries to the subscribers, and has
    /// the names of the groups it created pending registered.
    fn send_out(
        &mut self,
        replies: Vec<(Frames, Frames)>,
        appended: Appended,
        creates: Vec<Creating>,
    ) -> Result<(), NodeError> {
        if !creates.is_empty() {
            self.register_created(creates);
        }
        for (envelope, reply) in replies {
            // An empty reply waits elsewhere (a last chunk waiting for its seal).
            if !reply.is_empty() {
                send_reply(&self.socket, envelope, reply)?;
            }
        }
        let mut stats = crate::group::subscribers::PushStats::default();
        let mut sink = RouterSink::new(&self.socket);
        let now = Instant::now();
        for (slot, l) in self.groups.loaded_mut() {
            let entries = appended.get(&slot).map(Vec::as_slice).unwrap_or_default();
            if entries.is_empty() && !l.group.subscribers().has_notices() {
                continue;
            }
            match l.group.push(&mut sink, entries, now) {
                Ok(s) => {
                    stats.sent += s.sent;
                    stats.dropped += s.dropped;
                    stats.withheld += s.withheld;
                    stats.gone += s.gone;
                }
                Err(_) => return Err(sink.failed.unwrap_or(zmq::Error::ETERM).into()),
            }
        }
        let pushes = &agora_common::metrics::PUSHES;
        pushes.with_label_values(&["sent"]).inc_by(stats.sent);
        pushes.with_label_values(&["dropped"]).inc_by(stats.dropped);
        pushes
            .with_label_values(&["withheld"])
            .inc_by(stats.withheld);
        if stats.dropped > 0 || stats.gone > 0 {
            tracing::debug!(
                sent = stats.sent,
                dropped = stats.dropped,
                gone = stats.gone,
                "push round"
            );
        }
        Ok(())
    }

    /// Hands the upload `upload` of the group in `slot` to the sealer and keeps `envelope`
    /// to answer when it is done; returns the empty reply that `send_out` skips.
    fn defer_seal(
        &mut self,
        slot: usize,
        upload: blobs::Slot,
        verified: bool,
        envelope: &Frames,
    ) -> (Frames, bool) {
        let Some(loaded) = self.groups.get(slot).loaded.as_deref() else {
            return (internal(), false);
        };
        let layout = self.many.then(|| loaded.group.blobs.layout());
        let gid = self.many.then(|| self.groups.get(slot).gid);
        let tag = u32::try_from(slot).unwrap_or(u32::MAX);
        let sent = self
            .sealer
            .as_ref()
            .map(|s| s.seal_in(tag, layout.as_ref(), gid, &upload, verified));
        match sent {
            Some(Ok(())) => {
                self.seal_waiters
                    .entry((slot, upload))
                    .or_default()
                    .push(envelope.clone());
                (Vec::new(), true)
            }
            // No sealer (not running) or its pipe is full: seal here rather than lose it.
            _ => (loaded.group.seal_here(&upload, verified), true),
        }
    }

    /// Answers the last chunks whose seals ended.
    fn answer_seals(&mut self) -> Result<(), NodeError> {
        let done = self
            .sealer
            .as_ref()
            .map(durable::Sealer::recv)
            .unwrap_or_default();
        for (tag, upload, sealed) in done {
            let slot = usize::try_from(tag).unwrap_or(usize::MAX);
            let outcome = match sealed {
                durable::Sealed::Complete(kept) => Ok(kept),
                durable::Sealed::Mismatch(message) => {
                    Err(WireError::new(ErrorCode::DigestMismatch, message))
                }
                durable::Sealed::Failed(_) => Err(WireError::new(
                    ErrorCode::Internal,
                    "storage failure; the upload stands where it was; retry later",
                )),
            };
            let Some(loaded) = (slot < self.groups.len())
                .then(|| self.groups.get(slot).loaded.as_deref())
                .flatten()
            else {
                continue;
            };
            // The request named its group on a host: the error names it too.
            let outcome =
                outcome.map_err(|e| e.with_group(Some(self.groups.get(slot).name.clone())));
            let frames = loaded.group.seal_reply(&upload, outcome);
            for envelope in self
                .seal_waiters
                .remove(&(slot, upload))
                .unwrap_or_default()
            {
                send_reply(&self.socket, envelope, frames.clone())?;
            }
        }
        Ok(())
    }

    /// Handles a batch in one transaction and commits it (to the WAL, not yet synced).
    /// Returns the replies to send once it is durable. A failed commit rolls the whole batch
    /// back and answers it as the module docs say.
    pub(super) fn serve_batch(&mut self, batch: &mut Vec<Received>) -> Served {
        let now = Timestamp::now();
        let instant = Instant::now();
        let mut appended = Appended::new();
        let mut touched = BTreeSet::new();
        self.created.clear();
        self.creating.clear();
        self.deleted.clear();
        let mut handled: Vec<Handled> = Vec::with_capacity(batch.len());
        let incoming: Vec<Incoming<NodeRequest>> = batch
            .drain(..)
            .filter_map(|frames| match Incoming::from_received(frames) {
                Ok(i) => Some(i),
                Err(e) => {
                    tracing::warn!(error = %e, "dropped unanswerable message");
                    None
                }
            })
            .collect();
        // A batch of reads alone opens no transaction and needs no sync.
        let any_write = incoming
            .iter()
            .any(|i| matches!(&i.request, Ok(r) if writes(r)));
        let began = if any_write { self.db.begin() } else { Ok(()) };
        if let Err(e) = &began {
            if e.is_logged() {
                tracing::debug!(error = %e, "cannot start a transaction");
            } else {
                tracing::error!(error = %e, "cannot start a transaction");
            }
        } else {
            // The sends' ids, looked up together per group; a failure aborts the batch,
            // whose writes are then refused and rolled back at commit.
            let mut ids: BTreeMap<usize, Vec<agora_proto::id::MessageId>> = BTreeMap::new();
            for i in &incoming {
                if let Ok(NodeRequest::Send(r)) = &i.request {
                    let slot = r
                        .group
                        .as_ref()
                        .map_or((!self.many).then_some(0), |g| self.groups.slot(g));
                    if let (Some(slot), Some(id)) = (slot, r.id) {
                        ids.entry(slot).or_default().push(id);
                    }
                }
            }
            for (slot, ids) in ids {
                if self.load(slot).is_err() {
                    continue;
                }
                let Node { db, groups, .. } = &mut *self;
                if let Some(l) = groups.get_mut(slot).loaded.as_deref_mut() {
                    touched.insert(slot);
                    if let Err(e) = db.group(&mut l.log).expect_appends(&ids) {
                        tracing::error!(error = %e, "cannot look up the batch's message ids");
                    }
                }
            }
        }
        for incoming in incoming {
            let limited = rate_limit(&mut self.limiter, &incoming, instant);
            let (reply, redo) = match incoming.request {
                _ if limited.is_some() => (limited.unwrap_or_default(), Redo::Keep),
                Ok(request) if began.is_err() && writes(&request) => (internal(), Redo::Keep),
                Ok(request) => {
                    let redo = if any_write {
                        Redo::of(&request, incoming.peer)
                    } else {
                        Redo::Keep
                    };
                    let (reply, ok) = self.dispatch(
                        request,
                        incoming.data.as_deref(),
                        &incoming.envelope,
                        incoming.peer,
                        now,
                        instant,
                        &mut appended,
                        &mut touched,
                    );
                    (reply, if ok { redo } else { redo.unless_failed() })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rejected request");
                    let wire = e.to_wire();
                    agora_common::metrics::count("invalid", Some(wire.code));
                    (reply_frames::<()>(Err(wire)), Redo::Keep)
                }
            };
            handled.push(Handled {
                envelope: incoming.envelope,
                reply,
                redo,
            });
        }
        appended.retain(|_, a| !a.is_empty());
        if !any_write || began.is_err() {
            return Served {
                wrote: false,
                replies: handled.into_iter().map(|h| (h.envelope, h.reply)).collect(),
                appended: Appended::new(),
                creates: Vec::new(),
            };
        }
        let committed = (|| {
            let Node { db, groups, .. } = &mut *self;
            for &slot in appended.keys() {
                if let Some(l) = groups.get_mut(slot).loaded.as_deref_mut() {
                    let mut view = db.group(&mut l.log);
                    l.group.retain_by_count(&mut view, now)?;
                }
            }
            db.commit()
        })();
        match committed {
            Ok(()) => {
                let entries: usize = appended.values().map(Vec::len).sum();
                agora_common::metrics::LOG_ENTRIES.inc_by(entries as u64);
                for (slot, entries) in &appended {
                    if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
                        tracing::debug!(target: "agora::commit",
                            epoch = self.lease.as_ref().map(lease::Lease::epoch),
                            slot, first_seq = first.seq, last_seq = last.seq, "committed");
                    }
                }
                self.finish_deletes();
                Served {
                    // A batch that changed nothing needs no sync (`last_commit_wrote`).
                    wrote: self.db.last_commit_wrote() || !appended.is_empty(),
                    replies: handled.into_iter().map(|h| (h.envelope, h.reply)).collect(),
                    appended,
                    creates: std::mem::take(&mut self.creating),
                }
            }
            Err(e @ StoreError::Fenced { .. }) => {
                // Another node took the lease: nothing of this batch is stored, and this
                // node must not answer from the log any more. Every request is refused as
                // by a stopping node, so that clients look the group up again.
                tracing::error!(error = %e, "commit fenced: another node holds the lease");
                self.deposed = true;
                for slot in std::mem::take(&mut self.created) {
                    self.groups.forget(slot);
                }
                self.creating.clear();
                self.undo_deletes();
                Served {
                    wrote: false,
                    replies: handled
                        .into_iter()
                        .map(|h| (h.envelope, reply_frames::<()>(Err(stopping()))))
                        .collect(),
                    appended: Appended::new(),
                    creates: Vec::new(),
                }
            }
            Err(e) => {
                // Nothing of this batch is stored: no reply may claim otherwise.
                if e.is_logged() {
                    tracing::debug!(error = %e, "commit failed; batch rolled back");
                } else {
                    tracing::error!(error = %e, "commit failed; batch rolled back");
                }
                // Groups it created are not stored: forget them (a pending one was never
                // registered). Groups it deleted are not archived: they are served again.
                for slot in std::mem::take(&mut self.created) {
                    self.groups.forget(slot);
                    if let Some(registrar) = &self.registrar {
                        registrar.remove(self.groups.get(slot).name.clone());
                    }
                }
                self.creating.clear();
                self.undo_deletes();
                // The cached log states of the groups it touched are ahead: read them back.
                let Node { db, groups, .. } = &mut *self;
                for &slot in &touched {
                    if let Some(l) = groups.get_mut(slot).loaded.as_deref_mut() {
                        if let Err(e) = db.reload(&mut l.log) {
                            tracing::error!(error = %e, "cannot reload a group's log state");
                        }
                    }
                }
                let replies = handled
                    .into_iter()
                    .map(|h| {
                        let reply = self.answer_after_rollback(h.redo, h.reply, &h.envelope);
                        (h.envelope, reply)
                    })
                    .collect();
                Served {
                    wrote: false,
                    replies,
                    appended: Appended::new(),
                    creates: Vec::new(),
                }
            }
        }
    }

    /// The reply to a request of a batch that was rolled back (see [`Redo`]).
    fn answer_after_rollback(&mut self, redo: Redo, reply: Frames, envelope: &Frames) -> Frames {
        match redo {
            Redo::Keep => reply,
            Redo::Internal => internal(),
            Redo::Send(group, id) => {
                let slot = group
                    .as_ref()
                    .map_or((!self.many).then_some(0), |g| self.groups.slot(g));
                let Node { db, groups, .. } = &mut *self;
                let Some(l) = slot.and_then(|s| groups.get_mut(s).loaded.as_deref_mut()) else {
                    return internal();
                };
                match db
                    .group(&mut l.log)
                    .page(HistoryQuery::ById(id), 1, usize::MAX)
                {
                    Ok(page) => match page.messages.first() {
                        Some(m) => reply_frames(Ok(SendAck {
                            seq: m.seq,
                            id,
                            time: m.time,
                            duplicate: true,
                        })),
                        None => internal(),
                    },
                    Err(_) => internal(),
                }
            }
            Redo::Read(request, peer) => {
                let mut unused = Appended::new();
                let mut touched = BTreeSet::new();
                self.dispatch(
                    *request,
                    None,
                    envelope,
                    peer,
                    Timestamp::now(),
                    Instant::now(),
                    &mut unused,
                    &mut touched,
                )
                .0
            }
        }
    }

    /// The newest seq of the group in `slot` (0 if it is not loaded).
    fn last_seq(&self, slot: usize) -> u64 {
        self.groups
            .get(slot)
            .loaded
            .as_deref()
            .map_or(0, |l| l.log.last_seq())
    }

    /// The member count of the group in `slot`: its log state's once loaded, else what the
    /// store said at start (0 for a slot past the table).
    fn member_count(&self, slot: usize) -> u64 {
        if slot >= self.groups.len() {
            return 0;
        }
        let hosted = self.groups.get(slot);
        hosted
            .loaded
            .as_deref()
            .map_or(hosted.members, |l| l.log.member_count())
    }

    /// Makes the engine and log state of the group in `slot` if this is its first request:
    /// its blob tree is `DATA/groups/GID/blobs`.
    ///
    /// # Errors
    /// `internal` (logged) if its log state or blob tree cannot be read.
    pub(super) fn load(&mut self, slot: usize) -> Result<(), WireError> {
        if self.many {
            // Its last use: a group idle for `LOADED_IDLE` is let go (`sweeps`).
            self.idle_due
                .set(slot, Instant::now() + super::sweeps::LOADED_IDLE);
        }
        if self.groups.get(slot).loaded.is_some() {
            return Ok(());
        }
        // Every group of the host pushes within the host's one total budget.
        let budget = self.groups.push_budget(self.config.push_budget_total_bytes);
        let hosted = self.groups.get(slot);
        let dir = self
            .config
            .data_dir
            .join("groups")
            .join(hosted.gid.to_string());
        let made = (|| {
            let log = self.db.load(hosted.gid)?;
            agora_common::fsmode::private_dir(&dir).map_err(|source| NodeError::DataDir {
                path: dir.clone(),
                source,
            })?;
            let blobs = super::open_blobs(
                &self.config,
                &dir,
                self.lease.as_ref(),
                super::host_blob_target(&self.config, &self.db, self.lease.as_ref())
                    .map(|t| (t.for_group(hosted.gid), self.blob_client.clone())),
            )?;
            let mut config = self.config.group_config();
            config.name = hosted.name.clone();
            let group = crate::group::Group::new(
                config,
                super::group_subscribers(&self.config).with_host_budget(budget),
                blobs,
                hosted.owner,
            );
            Ok::<_, NodeError>(Loaded { group, log })
        })();
        match made {
            Ok(loaded) => {
                self.groups.get_mut(slot).loaded = Some(Box::new(loaded));
                let interval = super::sweeps::blob_interval(&self.config);
                self.blob_due.set_if_absent(slot, Instant::now() + interval);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), group = %hosted.name, "cannot load a group");
                Err(internal_error())
            }
        }
    }

    /// Runs the handler of `request` (with `data`, the request's data frame, for
    /// `upload_chunk`) in the group it is routed to; returns its reply and whether it
    /// succeeded. Entries it appends go to `appended` under its group's slot, and that slot
    /// to `touched`.
    #[allow(clippy::too_many_arguments)] // each is one piece of the handlers' context
    fn dispatch(
        &mut self,
        request: NodeRequest,
        data: Option<&[u8]>,
        envelope: &Frames,
        peer: Option<PublicKey>,
        now: Timestamp,
        instant: Instant,
        appended: &mut Appended,
        touched: &mut BTreeSet<usize>,
    ) -> (Frames, bool) {
        let named = request.group().cloned();
        if self.stopping {
            // After a `stop` in the same batch: nothing more is done.
            return (reply_frames::<()>(Err(stopping().with_group(named))), false);
        }
        let routed = {
            let groups = &self.groups;
            let live = |n: &GroupName| groups.serves(n);
            let serving = if self.many {
                Serving::Many(live)
            } else {
                Serving::One(&self.config.name)
            };
            route(&request, &serving)
        };
        let input = Input {
            data,
            envelope,
            peer,
            now,
            instant,
        };
        let slot = match routed {
            Err(e) => {
                // A group stopped on this host answers as a stopping node.
                let stopped = self.many
                    && e.code == ErrorCode::UnknownGroup
                    && named.as_ref().is_some_and(|g| self.groups.stopped(g));
                let e = if stopped {
                    stopping().with_group(named)
                } else {
                    e
                };
                return (reply_frames::<()>(Err(e)), false);
            }
            Ok(Route::Host) => {
                return match request {
                    NodeRequest::Stop(_) if self.many => {
                        reply::<call::Stop>(self.begin_host_stop(peer))
                    }
                    NodeRequest::Stop(_) => reply::<call::Stop>(self.begin_stop(peer)),
                    NodeRequest::Renew(r) => reply::<call::Renew>(self.renew(r, &input)),
                    NodeRequest::Create(r) if self.many => {
                        match self.create(r, &input, appended, touched) {
                            Ok(Some(made)) => reply::<call::Create>(Ok(made)),
                            // Pending: the reply waits for the registry (`settle_creates`).
                            Ok(None) => (Vec::new(), true),
                            Err(e) => reply::<call::Create>(Err(e.with_group(named))),
                        }
                    }
                    NodeRequest::Create(_) => reply::<call::Create>(Err(WireError::new(
                        ErrorCode::Forbidden,
                        "this node serves one group; groups are created on a group host \
                         (group-node --host)",
                    )
                    .with_group(named))),
                    _ => (internal(), false),
                };
            }
            Ok(Route::Group(name)) => match self.groups.slot(&name) {
                Some(slot) => slot,
                None => return (internal(), false),
            },
        };
        if let (NodeRequest::Delete(r), true) = (&request, self.many) {
            return reply::<call::Delete>(
                self.delete(slot, &r.user, peer, now, touched)
                    .map_err(|e| e.with_group(named)),
            );
        }
        if let NodeRequest::Stop(_) = request {
            if !self.many {
                return reply::<call::Stop>(self.begin_stop(peer));
            }
            return reply::<call::Stop>(
                self.stop_group(slot, peer).map_err(|e| e.with_group(named)),
            );
        }
        if let Err(e) = self.load(slot) {
            return (reply_frames::<()>(Err(e.with_group(named))), false);
        }
        touched.insert(slot);
        let Node { db, groups, .. } = &mut *self;
        let Some(l) = groups.get_mut(slot).loaded.as_deref_mut() else {
            return (internal(), false);
        };
        let mut view = db.group(&mut l.log);
        let applied = l.group.apply(
            &mut view,
            request,
            &input,
            appended.entry(slot).or_default(),
        );
        match applied {
            Applied::Reply { frames, ok } => (frames, ok),
            Applied::Seal {
                slot: upload,
                verified,
            } => self.defer_seal(slot, upload, verified, envelope),
        }
    }

    /// `stop` of the whole host (no `group`): accepted from the host's own key only.
    ///
    /// # Errors
    /// `forbidden` for any other key, and on an `--insecure` host.
    fn begin_host_stop(&mut self, peer: Option<PublicKey>) -> Result<StopReply, WireError> {
        if peer.is_none() || peer != self.public_key() {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "only the host's own key may stop the host; name a group to stop one",
            ));
        }
        tracing::info!(endpoint = %self.endpoint, "host stop requested");
        self.stopping = true;
        Ok(StopReply { stopping: true })
    }

    /// `stop {group}` on a group host: accepted from the group's owner or the host key; the
    /// group then answers `shutting_down` until the host restarts, its subscriptions end
    /// (each gets `unsubscribed`) and the registry no longer lists it here.
    ///
    /// # Errors
    /// `forbidden` for any other key, and on an `--insecure` host.
    fn stop_group(&mut self, slot: usize, peer: Option<PublicKey>) -> Result<StopReply, WireError> {
        let hosted = self.groups.get(slot);
        if peer.is_none() || (peer != hosted.owner && peer != self.public_key()) {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "only the group owner's key or the host's own may stop a group",
            ));
        }
        tracing::info!(group = %hosted.name, "group stop requested");
        let name = hosted.name.clone();
        let hosted = self.groups.get_mut(slot);
        hosted.stopped = true;
        // As a delete: its subscribers are told at the next push round, and the registry
        // stops sending clients here.
        if let Some(l) = hosted.loaded.as_deref_mut() {
            l.group.end_subscriptions();
        }
        if let Some(registrar) = &self.registrar {
            registrar.remove(name);
        }
        Ok(StopReply { stopping: true })
    }
}

/// The `internal` error of a group that cannot be loaded.
pub(super) fn internal_error() -> WireError {
    WireError::new(ErrorCode::Internal, "storage failure; retry later")
}

/// The `internal` reply of a write that is not stored.
fn internal() -> Frames {
    reply_frames::<()>(Err(WireError::new(
        ErrorCode::Internal,
        "storage failure; nothing was stored; retry later",
    )))
}

/// Batches committed and waiting for their sync, oldest first.
struct Pipeline {
    /// The store's flush (the WAL's sync), for a sync on the loop thread when nothing else
    /// waits.
    wal: Box<dyn Flush>,
    /// The number of the last batch whose sync was asked for.
    requested: u64,
    /// WAL bytes written (estimated) since the last checkpoint nudge.
    wal_written: u64,
    waiting: VecDeque<Waiting>,
}

/// A batch whose replies wait for the sync of batch `batch`.
struct Waiting {
    batch: u64,
    replies: Vec<(Frames, Frames)>,
    appended: Appended,
    creates: Vec<Creating>,
}

/// A served batch: replies (envelope, reply frames), the entries to push, and the groups it
/// created pending, to register once it is durable.
pub(super) struct Served {
    /// It committed a transaction that needs a sync.
    pub(super) wrote: bool,
    pub(super) replies: Vec<(Frames, Frames)>,
    pub(super) appended: Appended,
    pub(super) creates: Vec<Creating>,
}

/// The entries a batch appended, by the slot of their group.
pub(super) type Appended = BTreeMap<usize, Vec<Message>>;

/// A request of the batch being served, with its reply so far.
struct Handled {
    envelope: Frames,
    reply: Frames,
    redo: Redo,
}

/// How to answer a request if its batch is rolled back.
enum Redo {
    /// The reply stands: it was an error, and nothing of it was stored.
    Keep,
    /// A write that succeeded: now `internal`.
    Internal,
    /// A `send` with a client id that succeeded: the `duplicate` ack if an earlier batch
    /// stored that id, else `internal`.
    Send(Option<GroupName>, agora_proto::id::MessageId),
    /// A read: handled again, from what is stored.
    Read(Box<NodeRequest>, Option<PublicKey>),
}

impl Redo {
    /// What to do with `request` if it succeeds and its batch is then rolled back.
    fn of(request: &NodeRequest, peer: Option<PublicKey>) -> Redo {
        match request {
            NodeRequest::Send(r) => {
                r.id.map_or(Redo::Internal, |id| Redo::Send(r.group.clone(), id))
            }
            // Attachments' bytes live outside the store's transaction: a rollback does
            // not touch them, so their replies stand (and a chunk must not be written twice).
            NodeRequest::Upload(_)
            | NodeRequest::UploadChunk(_)
            | NodeRequest::UploadStatus(_)
            | NodeRequest::Download(_) => Redo::Keep,
            r if writes(r) => Redo::Internal,
            r => Redo::Read(Box::new(r.clone()), peer),
        }
    }

    /// For a request whose handler failed: its error stands, unless it is a read.
    fn unless_failed(self) -> Redo {
        match self {
            Redo::Read(..) => self,
            _ => Redo::Keep,
        }
    }
}

/// Whether a group-node request writes to the store (reads: `info`, `members`,
/// `get_messages`, `subscribe`, `unsubscribe`; the attachment actions write only blobs,
/// outside the store's transaction).
fn writes(request: &NodeRequest) -> bool {
    !matches!(
        request,
        NodeRequest::Info(_)
            | NodeRequest::Members(_)
            | NodeRequest::GetMessages(_)
            | NodeRequest::Subscribe(_)
            | NodeRequest::Renew(_)
            | NodeRequest::Unsubscribe(_)
            | NodeRequest::Upload(_)
            | NodeRequest::UploadChunk(_)
            | NodeRequest::UploadStatus(_)
            | NodeRequest::Download(_)
            | NodeRequest::Stop(_)
    )
}

/// The `shutting_down` error of a draining node.
pub(super) fn stopping() -> WireError {
    WireError::new(
        ErrorCode::ShuttingDown,
        "this node is stopping; nothing was done: retry (a send with the same id) once it is back",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    /// A [`Flush`] that counts its syncs.
    #[derive(Debug)]
    struct Counting(Box<dyn Flush>, Arc<AtomicU64>);

    impl Flush for Counting {
        fn sync(&self) -> std::io::Result<()> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.sync()
        }
    }

    fn request(id: u8, body: serde_json::Value) -> Received {
        Received {
            frames: vec![
                vec![0, id],
                Vec::new(),
                agora_proto::wire::PROTOCOL.to_vec(),
                body.to_string().into_bytes(),
            ],
            peer: None,
        }
    }

    /// One turn whose requests append to 50 groups commits once and is made durable by
    /// one sync: the host's group commit spans groups.
    #[test]
    fn one_commit_turn_syncs_once_for_many_groups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(
            GroupName::new("host").expect("name"),
            "tcp://127.0.0.1:0",
            dir.path().to_owned(),
        );
        config.host = true;
        config.insecure = true;
        config.wal_prealloc_bytes = 0;
        config.groups = (0..50)
            .map(|i| GroupName::new(format!("g{i}")).expect("name"))
            .collect();
        let ctx = zmq::Context::new();
        let mut node = Node::bind(&ctx, config).expect("bind");
        let count = Arc::new(AtomicU64::new(0));
        let flush = |node: &Node| -> Box<dyn Flush> {
            Box::new(Counting(node.db.flusher(), Arc::clone(&count)))
        };
        let syncer = durable::Syncer::start(&ctx, flush(&node)).expect("syncer");
        let mut pipeline = Pipeline {
            wal: flush(&node),
            requested: 0,
            wal_written: 0,
            waiting: VecDeque::new(),
        };
        let turn = |node: &mut Node, action: &str| -> Served {
            let mut batch: Vec<Received> = (0..50u8)
                .map(|i| {
                    request(
                        i,
                        serde_json::json!({"action": action, "group": format!("g{i}"),
                            "user": "u", "body": "hi"}),
                    )
                })
                .collect();
            node.serve_batch(&mut batch)
        };
        for action in ["join", "send"] {
            let served = turn(&mut node, action);
            assert_eq!(served.appended.len(), 50, "{action}: entries in 50 groups");
            assert!(served.wrote);
            for (_, reply) in &served.replies {
                let body = String::from_utf8_lossy(reply.last().expect("a body"));
                assert!(body.contains(r#""ok":true"#), "{action}: {body}");
            }
            let before = count.load(Ordering::Relaxed);
            node.queue(&mut pipeline, served, &syncer, None)
                .expect("queued");
            let deadline = Instant::now() + Duration::from_secs(10);
            while pipeline.waiting.front().is_some() && Instant::now() < deadline {
                if let Some(upto) = syncer.recv(100).expect("syncer") {
                    node.release(&mut pipeline, upto).expect("release");
                }
            }
            assert!(pipeline.waiting.is_empty(), "{action}: the turn was synced");
            assert_eq!(
                count.load(Ordering::Relaxed) - before,
                1,
                "{action}: one sync for a turn over 50 groups"
            );
        }
        let log = |slot: usize| {
            node.groups
                .get(slot)
                .loaded
                .as_deref()
                .map(|l| l.log.last_seq())
        };
        assert!(
            (0..50).all(|s| log(s) == Some(2)),
            "each group: its join and its message"
        );
    }
}
