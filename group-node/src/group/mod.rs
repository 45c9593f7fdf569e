//! One group's rules: the engine. It owns no socket, no thread and reads no clock: the host
//! ([`crate::host`]) hands it each request with the time of its batch, and performs what it
//! returns (the reply to send, entries to push once durable, uploads to seal off the loop).
//!
//! - [`Group`]: one group's state (its settings, log store, subscribers, attachments) and
//!   [`Group::apply`], the exhaustive dispatch of a decoded request to its handler.
//! - `cmd/`: one handler per action (`cmd/send.rs`, `cmd/join.rs` …).
//! - [`subscribers`]: the live stream, pushed through a [`PushSink`] the host gives it.
//! - [`blobs`]: attachments' bytes; [`identity`]: who the caller is.
//!
//! `group/` imports nothing of `host/` and no `zmq` (the test
//! `group_does_not_import_host_or_zmq` scans its sources).

use std::time::{Duration, Instant, SystemTime};

use agora_common::keys::PublicKey;
use agora_common::server::reply_frames;
use agora_proto::action::{call, Call, NodeRequest};
use agora_proto::codec::{encode_ok_data, Frames};
use agora_proto::time::Timestamp;
use agora_proto::wire::{ErrorCode, GroupName, Message, WireError};

use crate::store::{GroupLog, Retention, StoreError};

pub mod blobs;
pub(crate) mod cmd;

pub(crate) use cmd::store_error;
pub mod identity;
pub mod subscribers;

use blobs::{Blobs, Slot};
use subscribers::{PushFailed, PushSink, PushStats, Subscribers};

/// One group's settings: what its handlers check. The host's [`crate::Config`] holds them
/// for a host of one ([`crate::Config::group_config`]).
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The group's name.
    pub name: GroupName,
    /// Largest message body, in bytes of JSON text (default 1 MiB).
    pub max_message_bytes: usize,
    /// Largest attachment, in bytes (default 4 GiB).
    pub max_file_bytes: u64,
    /// Most members (default 100,000).
    pub max_members: u64,
    /// What to delete from the log (default: nothing).
    pub retention: Retention,
    /// How long an unfinished upload, or a content no message carries, is kept (default
    /// 24 h).
    pub upload_ttl: Duration,
}

/// What can fail in the engine outside a request (whose failures are its error reply).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The push sink failed for good (the host's socket: its context was terminated).
    #[error(transparent)]
    Push(#[from] PushFailed),
    /// The store failed.
    #[error("store")]
    Store(#[from] StoreError),
}

/// What a request carries beside its decoded body, and the time of its batch.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The request's data frame (`upload_chunk`'s bytes), if any.
    pub data: Option<&'a [u8]>,
    /// The caller's envelope: identifies its connection for `subscribe`.
    pub envelope: &'a Frames,
    /// The caller's authenticated CURVE key (`None` on an `--insecure` node).
    pub peer: Option<PublicKey>,
    /// The wall-clock time of the batch.
    pub now: Timestamp,
    /// The monotonic time of the batch, for subscription leases.
    pub instant: Instant,
}

/// What [`Group::apply`] did.
#[derive(Debug)]
pub enum Applied {
    /// The reply to send once the batch is durable, and whether it is `ok`.
    Reply {
        /// The encoded reply frames.
        frames: Frames,
        /// The handler succeeded.
        ok: bool,
    },
    /// The last chunk of an upload (or an upload complete before a restart): its reply
    /// waits until the host has sealed `slot` off the loop ([`Group::seal_reply`]).
    Seal {
        /// The upload to seal.
        slot: Slot,
        /// Its digest was verified while its chunks arrived.
        verified: bool,
    },
}

/// One group: settings, live subscribers and attachments. Its log is the host's: each call
/// that reads or writes it is given the group's view of the open batch ([`GroupLog`]).
pub struct Group {
    pub(crate) config: GroupConfig,
    /// Boxed: a group's engine stays under 1 KiB (`an_idle_group_is_small`).
    pub(crate) subscribers: Box<Subscribers>,
    pub(crate) blobs: Blobs,
    /// The owner's key (`None` on an `--insecure` node).
    pub(crate) owner: Option<PublicKey>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Group {
    /// A group with its `subscribers` and `blobs`, owned by `owner`.
    pub fn new(
        config: GroupConfig,
        subscribers: Subscribers,
        blobs: Blobs,
        owner: Option<PublicKey>,
    ) -> Group {
        Group {
            config,
            subscribers: Box::new(subscribers),
            blobs,
            owner,
        }
    }

    /// The group's name.
    pub fn name(&self) -> &GroupName {
        &self.config.name
    }

    /// The group's settings.
    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// The owner's key (`None` on an `--insecure` node).
    pub fn owner(&self) -> Option<PublicKey> {
        self.owner
    }

    /// The live subscribers.
    pub fn subscribers(&self) -> &Subscribers {
        &self.subscribers
    }

    /// Runs the handler of `request` on `store` (this group's view of the open batch, for
    /// writes), appending
    /// to `appended` the entries to push once the batch is durable. `stop` is the host's and
    /// is refused here.
    pub fn apply<S: GroupLog + ?Sized>(
        &mut self,
        store: &mut S,
        request: NodeRequest,
        input: &Input<'_>,
        appended: &mut Vec<Message>,
    ) -> Applied {
        let mut sealing = Vec::new();
        let mut ctx = cmd::Ctx {
            store,
            config: &self.config,
            now: input.now,
            instant: input.instant,
            envelope: input.envelope,
            subscribers: &mut self.subscribers,
            blobs: &self.blobs,
            sealing: &mut sealing,
            appended,
            peer: input.peer,
            owner: self.owner,
        };
        // An error to a request naming its group says which (one DEALER, many groups).
        let named = request.group().cloned();
        let named = &named;
        let (frames, ok) = match request {
            NodeRequest::Info(r) => reply_in::<call::Info>(named, cmd::info::apply(&mut ctx, r)),
            NodeRequest::Join(r) => reply_in::<call::Join>(named, cmd::join::apply(&mut ctx, r)),
            NodeRequest::Leave(r) => reply_in::<call::Leave>(named, cmd::leave::apply(&mut ctx, r)),
            NodeRequest::Members(r) => {
                reply_in::<call::Members>(named, cmd::members::apply(&mut ctx, r))
            }
            NodeRequest::Send(r) => reply_in::<call::Send>(named, cmd::send::apply(&mut ctx, r)),
            NodeRequest::GetMessages(r) => {
                reply_in::<call::GetMessages>(named, cmd::get_messages::apply(&mut ctx, r))
            }
            NodeRequest::Subscribe(r) => {
                reply_in::<call::Subscribe>(named, cmd::subscribe::apply(&mut ctx, r))
            }
            NodeRequest::Unsubscribe(r) => {
                reply_in::<call::Unsubscribe>(named, cmd::unsubscribe::apply(&mut ctx, r))
            }
            NodeRequest::Invite(r) => {
                reply_in::<call::Invite>(named, cmd::policy::invite(&mut ctx, r))
            }
            NodeRequest::Kick(r) => reply_in::<call::Kick>(named, cmd::policy::kick(&mut ctx, r)),
            NodeRequest::Ban(r) => reply_in::<call::Ban>(named, cmd::policy::ban(&mut ctx, r)),
            NodeRequest::Unban(r) => {
                reply_in::<call::Unban>(named, cmd::policy::unban(&mut ctx, r))
            }
            NodeRequest::Promote(r) => {
                reply_in::<call::Promote>(named, cmd::policy::promote(&mut ctx, r))
            }
            NodeRequest::SetMode(r) => {
                reply_in::<call::SetMode>(named, cmd::policy::set_mode(&mut ctx, r))
            }
            NodeRequest::Upload(r) => {
                let result = cmd::files::upload(&mut ctx, r);
                if let Some((slot, verified)) = sealing.pop() {
                    // Complete before a restart but not sealed: answered once it is.
                    return Applied::Seal { slot, verified };
                }
                reply_in::<call::Upload>(named, result)
            }
            NodeRequest::UploadChunk(r) => {
                let result = cmd::files::upload_chunk(&mut ctx, r, input.data.unwrap_or_default());
                if let Some((slot, verified)) = sealing.pop() {
                    // The last chunk: answered once the host's sealer is done.
                    return Applied::Seal { slot, verified };
                }
                reply_in::<call::UploadChunk>(named, result)
            }
            NodeRequest::UploadStatus(r) => {
                reply_in::<call::UploadStatus>(named, cmd::files::upload_status(&mut ctx, r))
            }
            NodeRequest::Download(r) => match cmd::files::download(&mut ctx, r) {
                Ok((fields, bytes)) => {
                    agora_common::metrics::count(call::Download::ACTION.as_str(), None);
                    (encode_ok_data(&fields, bytes), true)
                }
                Err(e) => reply_in::<call::Download>(named, Err(e)),
            },
            // The host's: it answers them before a group sees them.
            NodeRequest::Stop(_) | NodeRequest::Renew(_) => reply_in::<call::Stop>(
                named,
                Err(WireError::new(ErrorCode::Internal, "not a group's request")),
            ),
            NodeRequest::Create(_) | NodeRequest::Delete(_) => reply_in::<call::Create>(
                named,
                Err(WireError::new(
                    ErrorCode::Forbidden,
                    "this node serves one group; groups are created and deleted on a group \
                     host (group-node --host)",
                )),
            ),
        };
        Applied::Reply { frames, ok }
    }

    /// One entry of a `renew` (PROTOCOL §6.7.1): a `subscribe` of the connection in `input`
    /// for `user` with `acked_seq`, its pushes batched.
    ///
    /// # Errors
    /// As `subscribe`, each naming this group.
    pub fn renew<S: GroupLog + ?Sized>(
        &mut self,
        store: &mut S,
        user: &agora_proto::wire::UserName,
        acked_seq: Option<u64>,
        input: &Input<'_>,
    ) -> Result<agora_proto::wire::SubscribeReply, WireError> {
        let mut unused = Vec::new();
        let mut sealing = Vec::new();
        let mut ctx = cmd::Ctx {
            store,
            config: &self.config,
            now: input.now,
            instant: input.instant,
            envelope: input.envelope,
            subscribers: &mut self.subscribers,
            blobs: &self.blobs,
            sealing: &mut sealing,
            appended: &mut unused,
            peer: input.peer,
            owner: self.owner,
        };
        let request = agora_proto::wire::SubscribeRequest {
            group: Some(self.config.name.clone()),
            user: user.clone(),
            batch: true,
            acked_seq,
        };
        cmd::subscribe::apply(&mut ctx, request)
            .map_err(|e| e.with_group(Some(self.config.name.clone())))
    }

    /// Pushes `entries` (durable, in seq order) to the subscribers through `sink`, and sends
    /// waiting `unsubscribed` events; `now` paces probes of ended subscriptions.
    ///
    /// # Errors
    /// [`GroupError::Push`] when the sink fails for good.
    pub fn push(
        &mut self,
        sink: &mut dyn PushSink,
        entries: &[Message],
        now: Instant,
    ) -> Result<PushStats, GroupError> {
        Ok(self
            .subscribers
            .push(sink, &self.config.name, entries, now)?)
    }

    /// Ends every subscription (the group was deleted): each connection is told
    /// `unsubscribed` at the next push round.
    pub fn end_subscriptions(&mut self) {
        self.subscribers.end_all();
    }

    /// Ends the subscriptions whose lease ran out by `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.subscribers.expire(now)
    }

    /// Discards stale uploads, and deletes the contents that no kept message carries (once
    /// older than the upload TTL at `now`): what retention leaves of attachments. With a
    /// PostgreSQL store, their rows go too (fenced by the lease: a deposed node deletes
    /// nothing). Failures are logged.
    pub fn sweep_blobs<S: GroupLog + ?Sized>(&mut self, store: &S, now: SystemTime) {
        let ttl = self.config.upload_ttl;
        match self.blobs.expire_uploads(ttl, now) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(expired = n, "unfinished uploads discarded"),
            Err(e) => tracing::warn!(error = %e, "could not expire uploads"),
        }
        // A store failure keeps the blob: never delete what may still be referenced.
        match self
            .blobs
            .retain(ttl, now, |d| store.references(d).unwrap_or(true))
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "unreferenced contents deleted"),
            Err(e) => tracing::warn!(error = %e, "could not sweep contents"),
        }
    }

    /// Applies the age retention at `now` to `store`, inside a batch the caller opened and
    /// commits; returns how many messages it deleted.
    ///
    /// # Errors
    /// The store's.
    pub fn retain_by_age<S: GroupLog + ?Sized>(
        &self,
        store: &mut S,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let policy = Retention {
            max_messages: None,
            ..self.config.retention
        };
        if policy.max_age.is_none() {
            return Ok(0);
        }
        store.apply_retention(policy, now)
    }

    /// Applies the count retention (`max_messages`) to `store` at the end of a batch that
    /// appended; returns how many messages it deleted.
    ///
    /// # Errors
    /// The store's.
    pub fn retain_by_count<S: GroupLog + ?Sized>(
        &self,
        store: &mut S,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let policy = Retention {
            max_age: None,
            ..self.config.retention
        };
        if policy.max_messages.is_none() {
            return Ok(0);
        }
        store.apply_retention(policy, now)
    }

    /// Seals `slot` on the calling thread (when the host has no sealer to hand it to) and
    /// returns the reply to its last chunk.
    pub fn seal_here(&self, slot: &Slot, verified: bool) -> Frames {
        let result = self.blobs.seal_here(slot, verified);
        reply::<call::UploadChunk>(
            result
                .map(|p| cmd::files::reply(slot.digest, p))
                .map_err(|e| cmd::files::blob_error(e).with_group(Some(self.config.name.clone()))),
        )
        .0
    }

    /// Records the end of the seal of `slot` done off the loop (`kept`: what it stored, if
    /// it completed; `failed`: its error) and returns the reply to its last chunk.
    pub fn seal_reply(&self, slot: &Slot, outcome: Result<blobs::Kept, WireError>) -> Frames {
        let kept = outcome.as_ref().ok().copied();
        self.blobs.sealed(slot, kept);
        reply_frames(outcome.map(|kept| {
            cmd::files::reply(slot.digest, blobs::Progress::Complete { size: kept.size })
        }))
    }
}

/// As [`reply`], with an error naming `group` ([`WireError::group`]) when the request named
/// one.
fn reply_in<C: Call>(
    group: &Option<GroupName>,
    result: Result<C::Reply, WireError>,
) -> (Frames, bool) {
    reply::<C>(result.map_err(|e| e.with_group(group.clone())))
}

/// Encodes a handler's result for action `C`, whose reply type the handler must produce;
/// true when it is `ok`.
pub fn reply<C: Call>(result: Result<C::Reply, WireError>) -> (Frames, bool) {
    let ok = result.is_ok();
    (agora_common::server::answer::<C>(result), ok)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// `group/` is the engine: it must not reach for the host, a socket or a clock (the
    /// host passes the time in). Its tests may.
    #[test]
    fn group_does_not_import_host_or_zmq() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/group");
        let mut files = vec![];
        let mut dirs = vec![dir];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).expect("read src/group") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        assert!(files.len() >= 10, "found only {files:?}");
        let banned = [
            "crate::host",
            "super::host",
            "zmq::",
            "use zmq",
            "Instant::now",
            "SystemTime::now",
            "Timestamp::now",
            "std::thread",
        ];
        let mut found = vec![];
        for file in &files {
            let text = std::fs::read_to_string(file).expect("read");
            // Only the code: a file's tests may use sockets, threads and clocks.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (n, line) in code.lines().enumerate() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                for b in banned {
                    if line.contains(b) {
                        found.push(format!("{}:{}: {b}", file.display(), n + 1));
                    }
                }
            }
        }
        assert!(found.is_empty(), "the engine reaches outside: {found:#?}");
    }
}
