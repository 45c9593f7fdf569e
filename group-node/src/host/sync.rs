//! The stages that make commits durable off the request loop, each an
//! [`agora_common::actor::Actor`].
//!
//! - [`Syncer`]: `fdatasync`s the WAL. The loop commits batch N (written, not yet synced),
//!   asks the syncer to sync up to N, and goes on to receive and apply batch N+1. The syncer
//!   takes every request waiting, syncs once, and answers with the highest batch number it
//!   covered; the loop then releases that batch's replies and pushes. One sync covers every
//!   batch committed before it starts.
//! - [`CheckpointThread`]: copies the WAL back into the database on its own SQLite
//!   connection, so that no commit ever waits for a checkpoint.
//!
//! # Pipe messages
//! Loop → syncer: one frame of 8 bytes, the batch number (big-endian u64). Syncer → loop:
//! 8 bytes, the highest batch now durable, or an empty frame when a sync failed (the syncer
//! then stops). Loop → checkpointer: `nudge`. Both stop at once on `$TERM` (a drop).

use std::time::Duration;

use agora_common::actor::{Actor, Pipe, Wake};

use crate::store::{Checkpointer, Flush};

/// How often the checkpoint thread runs a passive checkpoint when nobody nudges it (10 s):
/// an idle node's WAL is copied back too.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// A WAL generation this long (in frames of a 4 KiB page: 64 MiB) gets a `RESTART`
/// checkpoint, which waits for the writer, instead of a passive one. Under sustained load a
/// passive checkpoint never finds the WAL fully copied back when a transaction starts, so
/// the WAL would never start over and would grow without bound.
pub const WAL_RESTART_FRAMES: i64 = 16_384;

/// The loop's end of the sync actor. Dropping it stops the actor at once.
#[derive(Debug)]
pub struct Syncer {
    actor: Actor,
}

/// The syncer could not make a batch durable; nothing it was syncing may be acked.
#[derive(Debug, thiserror::Error)]
#[error("fdatasync of the WAL failed; stopping without acking unsynced batches")]
pub struct SyncFailed;

impl Syncer {
    /// Starts the actor, syncing through `wal`.
    ///
    /// # Errors
    /// libzmq's (binding the inproc pipe) or the thread spawn's, as `io::Error`.
    pub fn start(ctx: &zmq::Context, wal: Box<dyn Flush>) -> std::io::Result<Syncer> {
        let actor = Actor::start(ctx, "wal-sync", move |pipe| sync_loop(&pipe, wal.as_ref()))?;
        Ok(Syncer { actor })
    }

    /// The pipe, to poll for [`Syncer::recv`] beside the ROUTER.
    pub fn poll_item(&self) -> zmq::PollItem<'_> {
        self.actor.as_poll_item()
    }

    /// Asks for everything committed up to batch `batch` to be made durable.
    ///
    /// # Errors
    /// libzmq's (context terminated; `EAGAIN` past 1000 requests not read, which the loop's
    /// pipeline bound rules out).
    pub fn request(&self, batch: u64) -> Result<(), zmq::Error> {
        self.actor.send(&[&batch.to_be_bytes()])
    }

    /// The highest durable batch, waiting up to `timeout_ms` (-1: forever); `Ok(None)` if
    /// nothing came in time.
    ///
    /// # Errors
    /// [`SyncFailed`] when the sync failed or the actor is gone.
    pub fn recv(&self, timeout_ms: i32) -> Result<Option<u64>, SyncFailed> {
        let wait = u64::try_from(timeout_ms)
            .map(Duration::from_millis)
            .unwrap_or(Duration::MAX);
        let mut latest = None;
        let mut next_wait = Some(wait);
        while let Some(frames) = self.actor.recv(next_wait).map_err(|_| SyncFailed)? {
            let raw: [u8; 8] = frames
                .first()
                .and_then(|f| f.as_slice().try_into().ok())
                .ok_or(SyncFailed)?;
            latest = Some(u64::from_be_bytes(raw));
            next_wait = None; // then only what is already waiting
        }
        Ok(latest)
    }
}

fn sync_loop(pipe: &Pipe, wal: &dyn Flush) {
    loop {
        let mut upto = match pipe.wait(None) {
            Wake::Term => return,
            Wake::Timeout => continue,
            Wake::Command(frames) => match batch_of(&frames) {
                Some(n) => n,
                None => return,
            },
        };
        // Every request already waiting is covered by the same sync.
        loop {
            match pipe.take() {
                Wake::Term => return,
                Wake::Timeout => break,
                Wake::Command(frames) => match batch_of(&frames) {
                    Some(n) => upto = upto.max(n),
                    None => return,
                },
            }
        }
        if let Err(e) = wal.sync() {
            tracing::error!(error = %e, "fdatasync of the WAL failed");
            let _ = pipe.send(&[b""]);
            return;
        }
        if pipe.send(&[&upto.to_be_bytes()]).is_err() {
            return;
        }
    }
}

/// The batch number a sync request carries.
fn batch_of(frames: &[Vec<u8>]) -> Option<u64> {
    let raw: [u8; 8] = frames.first()?.as_slice().try_into().ok()?;
    Some(u64::from_be_bytes(raw))
}

/// The checkpoint stage: an actor owning a [`Checkpointer`]. It runs a passive checkpoint
/// every [`CHECKPOINT_INTERVAL`] and whenever [`CheckpointThread::nudge`]d, and a restart
/// checkpoint after one that found the WAL past [`WAL_RESTART_FRAMES`]. Dropping it stops
/// the actor at once (a checkpoint in progress finishes first).
#[derive(Debug)]
pub struct CheckpointThread {
    actor: Actor,
}

impl CheckpointThread {
    /// Starts the actor.
    ///
    /// # Errors
    /// libzmq's or the thread spawn's, as `io::Error`.
    pub fn start(ctx: &zmq::Context, checkpointer: Checkpointer) -> std::io::Result<Self> {
        let actor = Actor::start(ctx, "checkpoint", move |pipe| {
            checkpoint_loop(&pipe, checkpointer);
        })?;
        Ok(CheckpointThread { actor })
    }

    /// Asks for a checkpoint soon; nudges waiting together make one checkpoint.
    pub fn nudge(&self) {
        let _ = self.actor.send(&[b"nudge"]);
    }
}

fn checkpoint_loop(pipe: &Pipe, mut checkpointer: Checkpointer) {
    let mut restart = false;
    // Checkpoints fail while the file system refuses writes: warned once, not at every try.
    let mut failing = false;
    loop {
        match pipe.wait(Some(CHECKPOINT_INTERVAL)) {
            Wake::Term => return,
            Wake::Command(_) | Wake::Timeout => {}
        }
        // Nudges that came meanwhile are covered by this checkpoint.
        loop {
            match pipe.take() {
                Wake::Term => return,
                Wake::Command(_) => {}
                Wake::Timeout => break,
            }
        }
        if checkpointer.wal_bytes() == 0 {
            continue;
        }
        match checkpointer.checkpoint(restart) {
            Ok(stats) => {
                if failing {
                    failing = false;
                    tracing::info!("checkpoints work again");
                }
                // The WAL file keeps its size when it starts over, so count its frames.
                restart = stats.wal_frames > WAL_RESTART_FRAMES;
                tracing::trace!(
                    wal_frames = stats.wal_frames,
                    checkpointed = stats.checkpointed,
                    restart,
                    "checkpoint"
                );
            }
            Err(e) if failing => tracing::debug!(error = %e, restart, "checkpoint failed again"),
            Err(e) => {
                failing = true;
                tracing::warn!(error = %e, restart,
                    "checkpoint failed; will retry (logged again only once one succeeds)");
            }
        }
    }
}

/// The sealing stage: an actor that seals completed uploads ([`crate::blobs::seal`]: the
/// digest checked if need be, the content fsynced and named) so that a large file's fsync
/// never stalls the request loop. One job at a time, in order. With a PostgreSQL store it
/// holds a connection of its own, made when first needed and again after it broke: a seal
/// copies the content into the database and commits before it answers, so that the upload is
/// acked only once any node of the group can serve it. Between jobs it copies the local blobs
/// that the database lacks (sealed before blobs were kept there), one at a time, a job
/// waiting always going first.
///
/// # Pipe messages
/// Loop → sealer: `[tag (4 bytes), root, digest (32 bytes), verified (1 byte, 0 or 1),
/// uploader, gid (4 bytes, optional)]` (the upload's [`crate::blobs::Slot`], in the blob
/// tree at `root`, or the sealer's own when empty; `tag` names the group on a host, `gid`
/// its rows in a PostgreSQL host's blob tables). Sealer → loop: `[tag, digest,
/// uploader, "ok", size (8 bytes, big-endian), new (1 byte, 0 or 1)]`, `[tag, digest,
/// uploader, "mismatch", message]` or `[tag, digest, uploader, "error", message]`.
#[derive(Debug)]
pub struct Sealer {
    actor: Actor,
}

/// How a seal ended.
#[derive(Debug)]
pub enum Sealed {
    /// The content is complete: its size, and whether this upload stored it.
    Complete(crate::blobs::Kept),
    /// Its bytes hash to another digest; the upload was discarded.
    Mismatch(String),
    /// The file system or the database failed; the upload stays where it was.
    Failed(String),
}

impl Sealer {
    /// Starts the actor over the blob store at `layout`, keeping complete blobs in `pg` too
    /// when given (the group's PostgreSQL store, [`crate::blobs::Blobs::postgres`]).
    ///
    /// # Errors
    /// libzmq's or the thread spawn's, as `io::Error`.
    pub fn start(
        ctx: &zmq::Context,
        layout: crate::blobs::BlobLayout,
        pg: Option<crate::blobs::PgBlobTarget>,
    ) -> std::io::Result<Sealer> {
        let actor = Actor::start(ctx, "blob-seal", move |pipe| {
            seal_loop(&pipe, &layout, pg.as_ref(), true);
        })?;
        Ok(Sealer { actor })
    }

    /// As [`Sealer::start`], for a group host: each job names its group's blob tree and,
    /// with `pg` (the host's schema, [`crate::blobs::PgBlobTarget::in_host`]), its gid
    /// ([`Sealer::seal_in`]); no local blobs are copied between jobs.
    ///
    /// # Errors
    /// As [`Sealer::start`].
    pub fn start_host(
        ctx: &zmq::Context,
        layout: crate::blobs::BlobLayout,
        pg: Option<crate::blobs::PgBlobTarget>,
    ) -> std::io::Result<Sealer> {
        let actor = Actor::start(ctx, "blob-seal", move |pipe| {
            seal_loop(&pipe, &layout, pg.as_ref(), false);
        })?;
        Ok(Sealer { actor })
    }
    /// Asks for the upload `slot` to be sealed (`verified`: its digest already checked
    /// out).
    ///
    /// # Errors
    /// libzmq's.
    pub fn seal(&self, slot: &crate::blobs::Slot, verified: bool) -> Result<(), zmq::Error> {
        self.seal_in(0, None, None, slot, verified)
    }

    /// As [`Sealer::seal`], for the group `tag` of a host whose blob tree is `layout`
    /// (`None`: the sealer's own) and whose gid is `gid` (`None`: the sealer's target's);
    /// [`Sealer::recv`] returns the tag with the outcome.
    ///
    /// # Errors
    /// libzmq's.
    pub fn seal_in(
        &self,
        tag: u32,
        layout: Option<&crate::blobs::BlobLayout>,
        gid: Option<crate::store::GroupId>,
        slot: &crate::blobs::Slot,
        verified: bool,
    ) -> Result<(), zmq::Error> {
        let root = layout
            .map(|l| l.root().as_os_str().as_encoded_bytes().to_vec())
            .unwrap_or_default();
        let (tag, verified) = (tag.to_be_bytes(), [u8::from(verified)]);
        let gid = gid.map(|g| g.0.to_be_bytes());
        let mut frames: Vec<&[u8]> = vec![
            &tag,
            &root,
            slot.digest.as_bytes(),
            &verified,
            slot.uploader.as_bytes(),
        ];
        if let Some(gid) = &gid {
            frames.push(gid);
        }
        self.actor.send(&frames)
    }

    /// The pipe, to poll for [`Sealer::recv`] beside the ROUTER.
    pub fn poll_item(&self) -> zmq::PollItem<'_> {
        self.actor.as_poll_item()
    }

    /// Every seal that ended, without waiting, with the tag it was asked with.
    pub fn recv(&self) -> Vec<(u32, crate::blobs::Slot, Sealed)> {
        let mut out = Vec::new();
        while let Ok(Some(mut frames)) = self.actor.recv(None) {
            if frames.is_empty() {
                continue;
            }
            let tag = frames.remove(0);
            let Ok(tag) = <[u8; 4]>::try_from(tag.as_slice()) else {
                continue;
            };
            let tag = u32::from_be_bytes(tag);
            let (Some(digest), Some(uploader), Some(kind), Some(detail)) =
                (frames.first(), frames.get(1), frames.get(2), frames.get(3))
            else {
                continue;
            };
            let (Ok(digest), Ok(uploader)) = (
                <[u8; 32]>::try_from(digest.as_slice()),
                std::str::from_utf8(uploader),
            ) else {
                continue;
            };
            let slot = crate::blobs::Slot::new(
                agora_proto::wire::Sha256Digest::from_bytes(digest),
                uploader,
            );
            let text = || String::from_utf8_lossy(detail).into_owned();
            let sealed = match kind.as_slice() {
                b"ok" => match <[u8; 8]>::try_from(detail.as_slice()) {
                    Ok(size) => Sealed::Complete(crate::blobs::Kept {
                        size: u64::from_be_bytes(size),
                        new: frames.get(4).is_some_and(|f| f.first() == Some(&1)),
                    }),
                    Err(_) => Sealed::Failed("a bad size from the sealer".into()),
                },
                b"mismatch" => Sealed::Mismatch(text()),
                _ => Sealed::Failed(text()),
            };
            out.push((tag, slot, sealed));
        }
        out
    }
}

fn seal_loop(
    pipe: &Pipe,
    layout: &crate::blobs::BlobLayout,
    pg: Option<&crate::blobs::PgBlobTarget>,
    backfill_local: bool,
) {
    let mut client: Option<postgres::Client> = None;
    // Local blobs to copy into the database if it lacks them, between jobs.
    let mut backfill: std::collections::VecDeque<agora_proto::wire::Sha256Digest> = match pg {
        Some(_) if backfill_local => crate::blobs::local_blobs(layout)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot list the local blobs to copy into PostgreSQL");
                Vec::new()
            })
            .into(),
        _ => std::collections::VecDeque::new(),
    };
    loop {
        let wake = if backfill.is_empty() {
            pipe.wait(None)
        } else {
            pipe.take()
        };
        let frames = match wake {
            Wake::Term => return,
            Wake::Timeout => {
                if let (Some(digest), Some(target)) = (backfill.pop_front(), pg) {
                    let copied = target.with(&mut client, "seal", |c| {
                        crate::blobs::backfill(layout, c, target.gid(), &digest)
                    });
                    match copied {
                        Ok(true) => tracing::info!(%digest, "copied a local blob into PostgreSQL"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, %digest, "could not copy a local blob into PostgreSQL");
                        }
                    }
                }
                continue;
            }
            Wake::Command(frames) => frames,
        };
        let (Some(tag), Some(root), Some(digest), Some(verified), Some(uploader)) = (
            frames.first(),
            frames.get(1),
            frames.get(2),
            frames.get(3),
            frames.get(4),
        ) else {
            continue;
        };
        let own;
        let layout = if root.is_empty() {
            layout
        } else {
            use std::os::unix::ffi::OsStrExt;
            own = crate::blobs::BlobLayout::at(std::path::PathBuf::from(
                std::ffi::OsStr::from_bytes(root),
            ));
            &own
        };
        let (Ok(bytes), Ok(uploader)) = (
            <[u8; 32]>::try_from(digest.as_slice()),
            std::str::from_utf8(uploader),
        ) else {
            continue;
        };
        let slot =
            crate::blobs::Slot::new(agora_proto::wire::Sha256Digest::from_bytes(bytes), uploader);
        let digest = slot.digest;
        let verified = verified.first() == Some(&1);
        let gid = frames
            .get(5)
            .and_then(|g| <[u8; 4]>::try_from(g.as_slice()).ok())
            .map(|g| i32::try_from(u32::from_be_bytes(g)).unwrap_or(i32::MAX));
        let sealed = match pg {
            Some(target) => {
                let gid = gid.unwrap_or(target.gid());
                target.with(&mut client, "seal", |c| {
                    crate::blobs::seal(layout, &slot, verified, Some((c, gid)))
                })
            }
            None => crate::blobs::seal(layout, &slot, verified, None),
        };
        let head = [
            tag.as_slice(),
            digest.as_bytes().as_slice(),
            slot.uploader.as_bytes(),
        ];
        let reply = match sealed {
            Ok(kept) => pipe.send(&[
                head[0],
                head[1],
                head[2],
                b"ok",
                &kept.size.to_be_bytes(),
                &[u8::from(kept.new)],
            ]),
            Err(e @ crate::blobs::BlobError::DigestMismatch { .. }) => pipe.send(&[
                head[0],
                head[1],
                head[2],
                b"mismatch",
                e.to_string().as_bytes(),
            ]),
            Err(e) => {
                tracing::error!(error = %e, %digest, "sealing an upload failed");
                pipe.send(&[
                    head[0],
                    head[1],
                    head[2],
                    b"error",
                    e.to_string().as_bytes(),
                ])
            }
        };
        if reply.is_err() {
            return;
        }
    }
}
