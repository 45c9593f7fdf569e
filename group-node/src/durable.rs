//! The stages that make commits durable off the request loop.
//!
//! - [`Syncer`]: an actor (zguide chapter 4, CZMQ `zactor`) that `fdatasync`s the WAL. The
//!   loop commits batch N (written, not yet synced), asks the syncer to sync up to N, and
//!   goes on to receive and apply batch N+1. The syncer takes every request waiting, syncs
//!   once, and answers with the highest batch number it covered; the loop then releases that
//!   batch's replies and pushes. One sync covers every batch committed before it starts.
//! - [`CheckpointThread`]: copies the WAL back into the database on its own SQLite
//!   connection, so that no commit ever waits for a checkpoint.
//!
//! # Control pipe
//! The loop and the syncer share an inproc `PAIR` pipe. Loop → syncer: one frame of 8 bytes,
//! the batch number (big-endian u64), or an empty frame to stop. Syncer → loop: 8 bytes, the
//! highest batch now durable, or an empty frame when a sync failed (the syncer then stops).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::store::{Checkpointer, WalSync};

/// How often the checkpoint thread runs a passive checkpoint when nobody nudges it (10 s):
/// an idle node's WAL is copied back too.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// A WAL generation this long (in frames of a 4 KiB page: 64 MiB) gets a `RESTART`
/// checkpoint, which waits for the writer, instead of a passive one. Under sustained load a
/// passive checkpoint never finds the WAL fully copied back when a transaction starts, so
/// the WAL would never start over and would grow without bound.
pub const WAL_RESTART_FRAMES: i64 = 16_384;

static PIPE_ID: AtomicU64 = AtomicU64::new(0);

/// The loop's end of the sync actor.
pub struct Syncer {
    pipe: zmq::Socket,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer").finish_non_exhaustive()
    }
}

/// The syncer could not make a batch durable; nothing it was syncing may be acked.
#[derive(Debug, thiserror::Error)]
#[error("fdatasync of the WAL failed; stopping without acking unsynced batches")]
pub struct SyncFailed;

impl Syncer {
    /// Starts the actor's thread, syncing through `wal`.
    ///
    /// # Errors
    /// libzmq's (binding the inproc pipe) or the thread spawn's, as `io::Error`.
    pub fn start(ctx: &zmq::Context, wal: WalSync) -> std::io::Result<Syncer> {
        let endpoint = format!(
            "inproc://agora-syncer-{}",
            PIPE_ID.fetch_add(1, Ordering::Relaxed)
        );
        let zmq_io = |e: zmq::Error| std::io::Error::other(e.to_string());
        let pipe = ctx.socket(zmq::PAIR).map_err(zmq_io)?;
        pipe.set_linger(0).map_err(zmq_io)?;
        pipe.bind(&endpoint).map_err(zmq_io)?;
        let child = ctx.socket(zmq::PAIR).map_err(zmq_io)?;
        child.set_linger(0).map_err(zmq_io)?;
        child.connect(&endpoint).map_err(zmq_io)?;
        let thread = std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || sync_loop(&child, &wal))?;
        Ok(Syncer {
            pipe,
            thread: Some(thread),
        })
    }

    /// The pipe, to poll for [`Syncer::recv`] beside the ROUTER.
    pub fn poll_item(&self) -> zmq::PollItem<'_> {
        self.pipe.as_poll_item(zmq::POLLIN)
    }

    /// Asks for everything committed up to batch `batch` to be made durable.
    ///
    /// # Errors
    /// libzmq's (context terminated).
    pub fn request(&self, batch: u64) -> Result<(), zmq::Error> {
        self.pipe.send(&batch.to_be_bytes()[..], 0)
    }

    /// The highest durable batch, waiting up to `timeout_ms` (-1: forever); `Ok(None)` if
    /// nothing came in time.
    ///
    /// # Errors
    /// [`SyncFailed`] when the sync failed or the actor is gone.
    pub fn recv(&self, timeout_ms: i32) -> Result<Option<u64>, SyncFailed> {
        self.pipe.set_rcvtimeo(timeout_ms).map_err(|_| SyncFailed)?;
        let mut latest = None;
        loop {
            let flags = if latest.is_some() { zmq::DONTWAIT } else { 0 };
            match self.pipe.recv_bytes(flags) {
                Ok(bytes) => {
                    let raw: [u8; 8] = bytes.as_slice().try_into().map_err(|_| SyncFailed)?;
                    latest = Some(u64::from_be_bytes(raw));
                }
                Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => return Ok(latest),
                Err(_) => return Err(SyncFailed),
            }
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let _ = self.pipe.send(&b""[..], 0);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sync_loop(pipe: &zmq::Socket, wal: &WalSync) {
    loop {
        let Ok(first) = pipe.recv_bytes(0) else {
            return;
        };
        let Ok(raw) = <[u8; 8]>::try_from(first.as_slice()) else {
            return; // empty frame: stop
        };
        let mut upto = u64::from_be_bytes(raw);
        // Every request already waiting is covered by the same sync.
        while let Ok(more) = pipe.recv_bytes(zmq::DONTWAIT) {
            match <[u8; 8]>::try_from(more.as_slice()) {
                Ok(raw) => upto = upto.max(u64::from_be_bytes(raw)),
                Err(_) => return,
            }
        }
        if let Err(e) = wal.sync() {
            tracing::error!(error = %e, "fdatasync of the WAL failed");
            let _ = pipe.send(&b""[..], 0);
            return;
        }
        if pipe.send(&upto.to_be_bytes()[..], 0).is_err() {
            return;
        }
    }
}

/// The checkpoint stage: a thread owning a [`Checkpointer`]. It runs a passive checkpoint
/// every [`CHECKPOINT_INTERVAL`] and whenever [`CheckpointThread::nudge`]d, and a restart
/// checkpoint after one that found the WAL past [`WAL_RESTART_FRAMES`]. Dropping it stops the thread at once.
#[derive(Debug)]
pub struct CheckpointThread {
    nudge: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl CheckpointThread {
    /// Starts the thread.
    ///
    /// # Errors
    /// The thread spawn's.
    pub fn start(checkpointer: Checkpointer) -> std::io::Result<CheckpointThread> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, &rx))?;
        Ok(CheckpointThread {
            nudge: Some(tx),
            thread: Some(thread),
        })
    }

    /// Asks for a checkpoint soon; a nudge already waiting covers this one.
    pub fn nudge(&self) {
        if let Some(tx) = &self.nudge {
            match tx.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            }
        }
    }
}

impl Drop for CheckpointThread {
    fn drop(&mut self) {
        self.nudge.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn checkpoint_loop(mut checkpointer: Checkpointer, nudges: &Receiver<()>) {
    let mut restart = false;
    loop {
        match nudges.recv_timeout(CHECKPOINT_INTERVAL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if checkpointer.wal_bytes() == 0 {
            continue;
        }
        match checkpointer.checkpoint(restart) {
            Ok(stats) => {
                // The WAL file keeps its size when it starts over, so count its frames.
                restart = stats.wal_frames > WAL_RESTART_FRAMES;
                tracing::trace!(
                    wal_frames = stats.wal_frames,
                    checkpointed = stats.checkpointed,
                    restart,
                    "checkpoint"
                );
            }
            Err(e) => tracing::warn!(error = %e, restart, "checkpoint failed; will retry"),
        }
    }
}
