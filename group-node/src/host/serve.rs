//! The request loop of a host: receive a batch, apply each request to its group, commit
//! once, hand the sync stage the batch, release replies and pushes once it is durable.

use std::collections::VecDeque;
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

use super::route::{route, route_name, Route, Serving};
use super::{
    durable, heartbeat, lease, wal_estimate, Node, NodeError, CHECKPOINT_BYTES, MAX_BATCH,
    MAX_PIPELINE,
};
use crate::group::subscribers::{Delivery, PushSink};
use crate::group::{blobs, reply, Applied, Input};
use crate::store::{Flush, Retention, StoreError};

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
        let members = Arc::new(AtomicU64::new(self.group.store.member_count()));
        let _heartbeat = match &self.config.registry {
            Some(registry) => Some(
                heartbeat::Heartbeat::start(
                    &self.ctx,
                    registry.clone(),
                    self.keys
                        .clone()
                        .zip(self.config.registry_key)
                        .map(|(keypair, server_key)| ClientCurve {
                            keypair,
                            server_key,
                        }),
                    self.group.config.name.clone(),
                    self.endpoint.clone(),
                    self.config.heartbeat,
                    Arc::clone(&members),
                )
                .map_err(NodeError::Thread)?,
            ),
            None => None,
        };
        let syncer = durable::Syncer::start(&self.ctx, self.group.store.flusher())
            .map_err(NodeError::Thread)?;
        let checkpoints = match self.group.store.checkpoints()? {
            Some(checkpointer) => Some(
                durable::CheckpointThread::start(&self.ctx, checkpointer)
                    .map_err(NodeError::Thread)?,
            ),
            None => None,
        };
        self.sealer = Some(
            durable::Sealer::start(
                &self.ctx,
                self.group.blobs.layout(),
                self.group.blobs.postgres().cloned(),
            )
            .map_err(NodeError::Thread)?,
        );
        tracing::info!(group = %self.group.config.name, endpoint = %self.endpoint,
            last_seq = self.group.store.last_seq(), "group node serving");
        let poll_ms = i64::try_from(SHUTDOWN_POLL.as_millis()).unwrap_or(100);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut pipeline = Pipeline {
            wal: self.group.store.flusher(),
            requested: 0,
            wal_written: 0,
            waiting: VecDeque::new(),
        };
        let mut next_age_sweep = Instant::now();
        let blob_sweep = self.config.upload_ttl.min(Duration::from_secs(60));
        let mut next_blob_sweep = Instant::now() + blob_sweep;
        let mut next_lease_sweep = Instant::now();
        let mut lost = false;
        while !shutdown.is_triggered() && !self.stopping {
            if self.deposed || self.lease.as_ref().is_some_and(|l| !l.held()) {
                tracing::error!(group = %self.group.config.name, "lost the lease; stopping (another node may be active)");
                lost = true;
                break;
            }
            let accepting = pipeline.waiting.len() < MAX_PIPELINE;
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
                    members.store(self.group.store.member_count(), Ordering::Relaxed);
                    self.queue(&mut pipeline, done, &syncer, checkpoints.as_ref())?;
                }
            }
            if Instant::now() >= next_lease_sweep {
                let expired = self.group.subscribers.expire(Instant::now());
                if expired > 0 {
                    tracing::debug!(expired, "subscriptions expired");
                }
                self.update_gauges();
                next_lease_sweep = Instant::now() + Duration::from_millis(500);
            }
            if self.config.retention.max_age.is_some() && Instant::now() >= next_age_sweep {
                if self.group.sweep_retention(Timestamp::now()) {
                    pipeline.requested += 1;
                    syncer.request(pipeline.requested)?;
                }
                next_age_sweep = Instant::now() + Duration::from_secs(1);
            }
            if Instant::now() >= next_blob_sweep {
                self.group.sweep_blobs(SystemTime::now());
                next_blob_sweep = Instant::now() + blob_sweep;
            }
        }
        agora_common::metrics::set_draining();
        // Drain: every batch already committed gets its sync, then its replies and pushes;
        // requests arriving meanwhile are refused with `shutting_down` (nothing of them done).
        tracing::info!(group = %self.group.config.name, batches = pipeline.waiting.len(), "draining");
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
        drop(checkpoints);
        if lost {
            return Err(NodeError::LeaseLost);
        }
        tracing::info!(group = %self.group.config.name, "group node stopping");
        Ok(())
    }

    /// The gauges a scrape reads: last seq, log bytes on disk, subscriptions.
    fn update_gauges(&self) {
        use agora_common::metrics::{LAST_SEQ, LOG_BYTES, SUBSCRIBERS};
        LAST_SEQ.set(i64::try_from(self.group.store.last_seq()).unwrap_or(i64::MAX));
        SUBSCRIBERS.set(i64::try_from(self.group.subscribers.len()).unwrap_or(i64::MAX));
        let bytes = self.group.store.stored_bytes();
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
        if Some(peer) != self.group.owner && Some(peer) != self.public_key() {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "only the group owner's key or the node's own may stop it",
            ));
        }
        tracing::info!(group = %self.group.config.name, by = %peer, "stop requested");
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
            let serving = Serving::<fn(&GroupName) -> bool>::One(self.group.name());
            let result = route_name(&entry.group, &serving)
                .and_then(|_| self.group.renew(&r.user, entry.acked_seq, input));
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
            pipeline.wal_written += wal_estimate(&done.appended);
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
            return self.send_out(done.replies, &done.appended);
        }
        if done.wrote {
            pipeline.requested += 1;
            syncer.request(pipeline.requested)?;
        } else if pipeline.waiting.is_empty() {
            return self.send_out(done.replies, &done.appended);
        }
        pipeline.waiting.push_back(Waiting {
            batch: pipeline.requested,
            replies: done.replies,
            appended: done.appended,
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
                self.send_out(w.replies, &w.appended)?;
            }
        }
        Ok(())
    }

    /// Sends a durable batch's replies, then pushes its entries to the subscribers.
    fn send_out(
        &mut self,
        replies: Vec<(Frames, Frames)>,
        appended: &[Message],
    ) -> Result<(), NodeError> {
        for (envelope, reply) in replies {
            // An empty reply waits elsewhere (a last chunk waiting for its seal).
            if !reply.is_empty() {
                send_reply(&self.socket, envelope, reply)?;
            }
        }
        let mut sink = RouterSink::new(&self.socket);
        let stats = match self.group.push(&mut sink, appended, Instant::now()) {
            Ok(stats) => stats,
            Err(_) => return Err(sink.failed.unwrap_or(zmq::Error::ETERM).into()),
        };
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

    /// Hands the upload `slot` to the sealer and keeps `envelope` to answer when it is done;
    /// returns the empty reply that `send_out` skips.
    fn defer_seal(
        &mut self,
        slot: blobs::Slot,
        verified: bool,
        envelope: &Frames,
    ) -> (Frames, bool) {
        let sent = self.sealer.as_ref().map(|s| s.seal(&slot, verified));
        match sent {
            Some(Ok(())) => {
                self.seal_waiters
                    .entry(slot)
                    .or_default()
                    .push(envelope.clone());
                (Vec::new(), true)
            }
            // No sealer (not running) or its pipe is full: seal here rather than lose it.
            _ => (self.group.seal_here(&slot, verified), true),
        }
    }

    /// Answers the last chunks whose seals ended.
    fn answer_seals(&mut self) -> Result<(), NodeError> {
        let done = self
            .sealer
            .as_ref()
            .map(durable::Sealer::recv)
            .unwrap_or_default();
        for (slot, sealed) in done {
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
            let frames = self.group.seal_reply(&slot, outcome);
            for envelope in self.seal_waiters.remove(&slot).unwrap_or_default() {
                send_reply(&self.socket, envelope, frames.clone())?;
            }
        }
        Ok(())
    }

    /// Handles a batch in one transaction and commits it (to the WAL, not yet synced).
    /// Returns the replies to send once it is durable. A failed commit rolls the whole batch
    /// back and answers it as the module docs say.
    fn serve_batch(&mut self, batch: &mut Vec<Received>) -> Served {
        let now = Timestamp::now();
        let instant = Instant::now();
        let mut appended = Vec::new();
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
        let began = if any_write {
            self.group.store.begin()
        } else {
            Ok(())
        };
        if let Err(e) = &began {
            if e.is_logged() {
                tracing::debug!(error = %e, "cannot start a transaction");
            } else {
                tracing::error!(error = %e, "cannot start a transaction");
            }
        } else {
            // The sends' ids, looked up together; a failure aborts the batch, whose writes
            // are then refused and rolled back at commit.
            let ids: Vec<agora_proto::id::MessageId> = incoming
                .iter()
                .filter_map(|i| match &i.request {
                    Ok(NodeRequest::Send(r)) => r.id,
                    _ => None,
                })
                .collect();
            if let Err(e) = self.group.store.expect_appends(&ids) {
                tracing::error!(error = %e, "cannot look up the batch's message ids");
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
        if !any_write || began.is_err() {
            return Served {
                wrote: false,
                replies: handled.into_iter().map(|h| (h.envelope, h.reply)).collect(),
                appended: Vec::new(),
            };
        }
        let retention = self.config.retention;
        let committed = (|| {
            if retention.max_messages.is_some() {
                self.group.store.apply_retention(
                    Retention {
                        max_age: None,
                        ..retention
                    },
                    now,
                )?;
            }
            self.group.store.commit()
        })();
        match committed {
            Ok(()) => {
                if let (Some(first), Some(last)) = (appended.first(), appended.last()) {
                    tracing::debug!(target: "agora::commit",
                        epoch = self.lease.as_ref().map(lease::Lease::epoch),
                        first_seq = first.seq, last_seq = last.seq, "committed");
                }
                Served {
                    // A batch that changed nothing needs no sync (`last_commit_wrote`).
                    wrote: self.group.store.last_commit_wrote() || !appended.is_empty(),
                    replies: handled.into_iter().map(|h| (h.envelope, h.reply)).collect(),
                    appended,
                }
            }
            Err(e @ StoreError::Fenced { .. }) => {
                // Another node took the lease: nothing of this batch is stored, and this
                // node must not answer from the log any more. Every request is refused as
                // by a stopping node, so that clients look the group up again.
                tracing::error!(error = %e, "commit fenced: another node holds the lease");
                self.deposed = true;
                Served {
                    wrote: false,
                    replies: handled
                        .into_iter()
                        .map(|h| (h.envelope, reply_frames::<()>(Err(stopping()))))
                        .collect(),
                    appended: Vec::new(),
                }
            }
            Err(e) => {
                // Nothing of this batch is stored: no reply may claim otherwise.
                if e.is_logged() {
                    tracing::debug!(error = %e, "commit failed; batch rolled back");
                } else {
                    tracing::error!(error = %e, "commit failed; batch rolled back");
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
                    appended: Vec::new(),
                }
            }
        }
    }

    /// The reply to a request of a batch that was rolled back (see [`Redo`]).
    fn answer_after_rollback(&mut self, redo: Redo, reply: Frames, envelope: &Frames) -> Frames {
        match redo {
            Redo::Keep => reply,
            Redo::Internal => internal(),
            Redo::Send(id) => match self.group.store.page(HistoryQuery::ById(id), 1, usize::MAX) {
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
            },
            Redo::Read(request, peer) => {
                let mut unused = Vec::new();
                self.dispatch(
                    *request,
                    None,
                    envelope,
                    peer,
                    Timestamp::now(),
                    Instant::now(),
                    &mut unused,
                )
                .0
            }
        }
    }

    /// Runs the handler of `request` (with `data`, the request's data frame, for
    /// `upload_chunk`); returns its reply and whether it succeeded.
    #[allow(clippy::too_many_arguments)] // each is one piece of the handlers' context
    fn dispatch(
        &mut self,
        request: NodeRequest,
        data: Option<&[u8]>,
        envelope: &Frames,
        peer: Option<PublicKey>,
        now: Timestamp,
        instant: Instant,
        appended: &mut Vec<Message>,
    ) -> (Frames, bool) {
        if self.stopping {
            // After a `stop` in the same batch: nothing more is done.
            let named = request.group().cloned();
            return (reply_frames::<()>(Err(stopping().with_group(named))), false);
        }
        let serving = Serving::<fn(&GroupName) -> bool>::One(self.group.name());
        match route(&request, &serving) {
            Err(e) => return (reply_frames::<()>(Err(e)), false),
            Ok(Route::Host) | Ok(Route::Group(_)) => {}
        }
        if let NodeRequest::Stop(_) = request {
            return reply::<call::Stop>(self.begin_stop(peer));
        }
        if let NodeRequest::Renew(r) = request {
            let input = Input {
                data,
                envelope,
                peer,
                now,
                instant,
            };
            return reply::<call::Renew>(self.renew(r, &input));
        }
        let input = Input {
            data,
            envelope,
            peer,
            now,
            instant,
        };
        match self.group.apply(request, &input, appended) {
            Applied::Reply { frames, ok } => (frames, ok),
            Applied::Seal { slot, verified } => self.defer_seal(slot, verified, envelope),
        }
    }
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
    appended: Vec<Message>,
}

/// A served batch: replies (envelope, reply frames) and the entries to push.
struct Served {
    /// It committed a transaction that needs a sync.
    wrote: bool,
    replies: Vec<(Frames, Frames)>,
    appended: Vec<Message>,
}

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
    Send(agora_proto::id::MessageId),
    /// A read: handled again, from what is stored.
    Read(Box<NodeRequest>, Option<PublicKey>),
}

impl Redo {
    /// What to do with `request` if it succeeds and its batch is then rolled back.
    fn of(request: &NodeRequest, peer: Option<PublicKey>) -> Redo {
        match request {
            NodeRequest::Send(r) => r.id.map_or(Redo::Internal, Redo::Send),
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
fn stopping() -> WireError {
    WireError::new(
        ErrorCode::ShuttingDown,
        "this node is stopping; nothing was done: retry (a send with the same id) once it is back",
    )
}
