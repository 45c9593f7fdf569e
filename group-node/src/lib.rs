//! The Agora group node: one process per group.
//!
//! A ROUTER socket serves membership (`join`, `leave`, `members`), the durable sequenced log
//! (`send`) and history (`get_messages`), as `docs/PROTOCOL.md` specifies. The node registers
//! with the registry and heartbeats on its own thread ([`heartbeat`]).
//!
//! # Group commit, pipelined
//! The socket thread takes every request waiting (up to [`MAX_BATCH`]), handles them all in
//! one store transaction and commits it to the WAL without syncing. The [`durable::Syncer`]
//! then `fdatasync`s the WAL on its own thread while the socket thread receives and applies
//! the next batch (at most [`MAX_PIPELINE`] batches wait for their sync). A batch's replies
//! and pushes are released only once a sync covering it is done, in batch order; replies to
//! reads wait too, since they may show entries of an unsynced batch. Under load one fsync
//! covers many sends; no ack leaves before its message is on disk. When nothing else waits
//! (no batch syncing, no request received), the loop syncs the batch itself, sparing the two
//! thread wake-ups that one client waiting for each ack would pay. Checkpoints run on their
//! own thread ([`durable::CheckpointThread`]).
//!
//! # Data directory
//! Made only once the ROUTER is bound ([`Node::bind`]): a port that cannot be bound leaves no
//! directory and no key pair behind. Mode 0700 with the store's files 0600 (looser ones that
//! existed are tightened, with a warning; what the node makes is private from creation),
//! `group.sqlite3` only when the log is SQLite (none with a PostgreSQL store), and one
//! node per directory: the node holds an `flock` on `node.lock` while it lives. The WAL is
//! zero-filled to [`Config::wal_prealloc_bytes`] at start, so that commits overwrite it
//! rather than grow it.
//!
//! # Failures
//! - A batch whose commit fails (disk full, I/O error) is rolled back whole: its writes are
//!   answered `internal` and are not in the log; a retried `send` whose id was stored by an
//!   earlier batch still gets its `duplicate` ack; its reads are answered again from what is
//!   stored. The next batch numbers on from the last stored seq: no gap. Writes succeed again
//!   as soon as space returns.
//! - A failed `fdatasync` stops the node with [`NodeError::Sync`], acking nothing that it
//!   covered: after a failed sync the page cache cannot be trusted (PostgreSQL's rule). Those
//!   sends got no reply; a retry with the same id after a restart is stored once.
//!
//! # Layout
//! - [`Node`]: bind ([`Node::bind`]) and serve ([`Node::run`]).
//! - `cmd/`: one handler per action; [`identity`]: who the caller is.
//! - [`subscribers`]: the live stream: leases and the push after each commit.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::{Durability, Flush, GroupStore, PgStore, Retention, SqliteStore, StoreError};
use agora_common::client::{max_request_bytes, ClientCurve};
use agora_common::keys::{KeyError, Keypair, PublicKey};
use agora_common::ratelimit::{Limiter, RateLimit};
use agora_common::server::{
    bind_router, rate_limit, recv_batch, reply_frames, send_reply, Incoming, Peer, Received,
    RouterOptions,
};
use agora_common::shutdown::{Shutdown, SHUTDOWN_POLL};
use agora_common::zap::{Authenticator, ZapPolicy};
use agora_proto::action::{call, Call, NodeRequest};
use agora_proto::codec::{encode_ok_data, Frames};
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    Endpoint, ErrorCode, GroupName, HistoryQuery, Message, SendAck, StopReply, WireError,
    DEFAULT_MAX_MESSAGE_BYTES,
};

pub mod blobs;
mod cmd;
pub mod durable;
pub mod heartbeat;
pub mod identity;
pub mod lease;
pub mod registrar;
pub mod store;
pub mod subscribers;

use subscribers::Subscribers;

/// Most requests handled in one batch (one transaction, one fsync).
pub const MAX_BATCH: usize = 512;

/// Most committed batches waiting for their sync; the loop reads no new request while this
/// many wait (default 4).
pub const MAX_PIPELINE: usize = 4;

/// WAL bytes written, estimated, between checkpoint nudges: 4 MiB, SQLite's default
/// automatic checkpoint (1000 pages of 4 KiB). Checkpointing more often costs appends, as
/// the checkpoint's syncs of the database file compete with the WAL's.
const CHECKPOINT_BYTES: u64 = 4 << 20;

/// The largest attachment a node takes by default: 4 GiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 4 << 30;

/// What one member may store in attachments by default (its unfinished uploads' declared
/// sizes plus the complete contents charged to it that the node keeps): 8 GiB.
pub const DEFAULT_UPLOAD_QUOTA: u64 = 8 << 30;

/// The free disk space uploads leave on the data directory's file system by default: 1 GiB.
pub const DEFAULT_DISK_RESERVE_BYTES: u64 = 1 << 30;

/// Unfinished uploads one member may have at once by default: 64.
pub const DEFAULT_MAX_UPLOADS_PER_MEMBER: usize = 64;

/// How long an unfinished upload, or a content no message carries, is kept by default: 24 h.
pub const DEFAULT_UPLOAD_TTL: Duration = Duration::from_secs(24 * 3600);

/// The WAL's zero-filled length by default: one WAL generation before a `RESTART`
/// checkpoint starts it over ([`durable::WAL_RESTART_FRAMES`] frames of a 4 KiB page and its
/// 24-byte frame header, plus the 32-byte WAL header), so that a busy node's WAL is never
/// grown by an append: about 64 MiB.
pub const DEFAULT_WAL_PREALLOC_BYTES: u64 = durable::WAL_RESTART_FRAMES as u64 * (4096 + 24) + 32;

/// The estimated WAL bytes of one committed batch: two leaf pages (the table's and the `id`
/// index's) plus the bodies and their rows.
fn wal_estimate(appended: &[Message]) -> u64 {
    let rows: usize = appended.iter().map(|m| m.body.get().len() + 128).sum();
    2 * 4096 + rows as u64
}

/// Group node settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The group's name.
    pub name: GroupName,
    /// Where to bind the ROUTER, `tcp://IP:PORT` (port 0 picks a free port).
    pub bind: String,
    /// The endpoint registered for members to connect to. Default: the bound endpoint, with
    /// a wildcard address (`0.0.0.0`, `[::]`) replaced by loopback.
    pub advertise: Option<Endpoint>,
    /// The registry's endpoint, or a comma-separated list of registries sharing one
    /// database; `None` runs without registering.
    pub registry: Option<String>,
    /// The directory holding `group.sqlite3` (unless `store` is set), the node's key pair
    /// and attachments' blobs.
    pub data_dir: PathBuf,
    /// A PostgreSQL database for the log and membership ([`store::postgres`], with its TLS
    /// and connection timeouts) instead of SQLite in `data_dir`, holding attachments'
    /// complete blobs too (their files in `data_dir` are then a cache, [`blobs`]); default
    /// none.
    pub store: Option<store::postgres::PgTarget>,
    /// Largest message body, in bytes of JSON text (default 1 MiB).
    pub max_message_bytes: usize,
    /// Largest attachment, in bytes (default 4 GiB, [`DEFAULT_MAX_FILE_BYTES`]); a larger
    /// `upload` gets `too_large` before any byte is stored.
    pub max_file_bytes: u64,
    /// An upload not written to for this long is discarded, and a complete content that no
    /// message carries is deleted once it is this old (default 24 h,
    /// [`DEFAULT_UPLOAD_TTL`]). Swept every minute, or every `upload_ttl` if shorter.
    pub upload_ttl: Duration,
    /// Bytes one member may store in attachments: the sizes its unfinished uploads declare
    /// plus the complete contents charged to it (the first to complete a content is charged
    /// for it) that the node keeps (default 8 GiB, [`DEFAULT_UPLOAD_QUOTA`]); an `upload`
    /// past it gets `limit_reached`.
    pub upload_quota: u64,
    /// Free bytes that uploads leave on the data directory's file system (default 1 GiB,
    /// [`DEFAULT_DISK_RESERVE_BYTES`]; 0: none); an `upload` or chunk that would go below it
    /// gets `storage_full`.
    pub disk_reserve_bytes: u64,
    /// Unfinished uploads one member may have at once (default 64,
    /// [`DEFAULT_MAX_UPLOADS_PER_MEMBER`]); one more `upload` gets `limit_reached`.
    pub max_uploads_per_member: usize,
    /// What to delete from the log (default: nothing).
    pub retention: Retention,
    /// How often to heartbeat the registry (default 2 s).
    pub heartbeat: Duration,
    /// Most members (default 100,000).
    pub max_members: u64,
    /// How long a subscription lives without renewal (default 5 s).
    pub lease: Duration,
    /// Most subscriptions (default 10,000).
    pub max_subscribers: usize,
    /// Most live connections (subscriptions) per member (default 16).
    pub max_subscriptions_per_member: usize,
    /// Messages queued per peer before pushes to it are dropped (`ZMQ_SNDHWM`, default 1000).
    pub sndhwm: i32,
    /// Test-only fault injection: drop every Nth push (default 0, never).
    pub fault_drop_push_every: u64,
    /// Push budget per subscription: bytes of event JSON pushed and not acked (default
    /// 4 MiB, [`agora_proto::wire::DEFAULT_PUSH_BUDGET_BYTES`]); see [`subscribers`].
    pub push_budget_bytes: usize,
    /// Push budget of the node, over all subscriptions (default 64 MiB,
    /// [`agora_proto::wire::DEFAULT_PUSH_BUDGET_TOTAL_BYTES`]).
    pub push_budget_total_bytes: usize,
    /// The WAL file is zero-filled to this many bytes at start, so that appends overwrite it
    /// instead of growing it (see [`SqliteStore::preallocate_wal`]); 0 turns that off.
    /// Default [`DEFAULT_WAL_PREALLOC_BYTES`]. Failing to fill (a full disk) only logs.
    pub wal_prealloc_bytes: u64,
    /// Serve without CURVE. Refused unless every endpoint (bind, advertised, registry) is
    /// loopback.
    pub insecure: bool,
    /// The registry's CURVE public key; required with a registry unless `insecure`.
    pub registry_key: Option<PublicKey>,
    /// Requests per second per peer (default 2,000, bursts of 4,000; rate 0 disables).
    pub rate_limit: RateLimit,
    /// The group owner's key; default the node's own key (the operator).
    pub owner: Option<PublicKey>,
    /// Make the group private at start (it stays so until `set_mode`).
    pub private: bool,
}

impl Config {
    /// A config with defaults for everything but the name, bind endpoint and data dir.
    pub fn new(name: GroupName, bind: impl Into<String>, data_dir: PathBuf) -> Config {
        Config {
            name,
            bind: bind.into(),
            advertise: None,
            registry: None,
            data_dir,
            store: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            upload_ttl: DEFAULT_UPLOAD_TTL,
            upload_quota: DEFAULT_UPLOAD_QUOTA,
            disk_reserve_bytes: DEFAULT_DISK_RESERVE_BYTES,
            max_uploads_per_member: DEFAULT_MAX_UPLOADS_PER_MEMBER,
            retention: Retention::default(),
            heartbeat: Duration::from_secs(2),
            max_members: 100_000,
            lease: Duration::from_secs(5),
            max_subscribers: 10_000,
            max_subscriptions_per_member: 16,
            sndhwm: 1000,
            fault_drop_push_every: 0,
            push_budget_bytes: agora_proto::wire::DEFAULT_PUSH_BUDGET_BYTES,
            push_budget_total_bytes: agora_proto::wire::DEFAULT_PUSH_BUDGET_TOTAL_BYTES,
            wal_prealloc_bytes: DEFAULT_WAL_PREALLOC_BYTES,
            insecure: false,
            registry_key: None,
            rate_limit: RateLimit::default(),
            owner: None,
            private: false,
        }
    }
}

/// Node failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The ROUTER could not be bound.
    #[error("cannot bind {endpoint}")]
    Bind {
        /// The endpoint asked for.
        endpoint: String,
        /// libzmq's error.
        source: zmq::Error,
    },
    /// The bound endpoint cannot be advertised; pass an explicit one.
    #[error("cannot advertise {0}; give --advertise tcp://HOST:PORT")]
    Advertise(String),
    /// The data directory could not be created.
    #[error("data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("store")]
    Store(#[from] StoreError),
    /// libzmq failed while serving.
    #[error("zmq")]
    Zmq(#[from] zmq::Error),
    /// The heartbeat, sync or checkpoint thread could not start.
    #[error("thread: {0}")]
    Thread(std::io::Error),
    /// An `fdatasync` of the WAL failed: the node stops without acking what it covered.
    #[error(transparent)]
    Sync(#[from] durable::SyncFailed),
    /// The key pair could not be loaded or made, or this libzmq has no CURVE.
    #[error("the node's key pair")]
    Keys(#[from] KeyError),
    /// `--insecure` with an endpoint that is not loopback.
    #[error("--insecure is allowed only on loopback endpoints, not {0}")]
    InsecureNotLoopback(String),
    /// Another process serves from this data directory (it holds `node.lock`).
    #[error("{0} is in use by another group-node (one node per data directory)")]
    Locked(PathBuf),
    /// The lease was lost (its database connection failed or went unanswered), or a
    /// commit found that another node took it: this node stops serving (fail-stop).
    #[error("lost the lease: another node may be active now")]
    LeaseLost,
    /// A registry is configured but not its key.
    #[error("the registry's public key is needed: pass --registry-key (the registry prints it at start)")]
    NoRegistryKey,
}

/// A bound group node, ready to [`run`](Node::run).
pub struct Node {
    ctx: zmq::Context,
    config: Config,
    socket: zmq::Socket,
    endpoint: Endpoint,
    store: Box<dyn GroupStore>,
    /// The lease this node serves under, when the store is shared ([`lease`]).
    lease: Option<lease::Lease>,
    /// A commit was fenced: another node holds the lease.
    deposed: bool,
    blobs: blobs::Blobs,
    /// The sealing actor (started by `run`), and the envelopes of the last chunks whose
    /// replies wait for it, by digest.
    sealer: Option<durable::Sealer>,
    seal_waiters: std::collections::HashMap<blobs::Slot, Vec<Frames>>,
    subscribers: Subscribers,
    keys: Option<Keypair>,
    owner: Option<PublicKey>,
    /// Set by an accepted `stop`: the loop ends, the node drains and exits.
    stopping: bool,
    limiter: Limiter<Peer>,
    _zap: Option<Authenticator>,
    /// The data directory's lock, held while the node lives.
    _lock: DataDirLock,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("group", &self.config.name)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Replaces a wildcard bind address with loopback, for advertising.
fn advertisable(bound: &str) -> Result<Endpoint, NodeError> {
    let fixed = bound
        .replacen("tcp://0.0.0.0:", "tcp://127.0.0.1:", 1)
        .replacen("tcp://[::]:", "tcp://[::1]:", 1);
    if fixed != bound {
        tracing::warn!(%bound, advertised = %fixed, "bound to a wildcard address; advertising loopback (use --advertise)");
    }
    Endpoint::new(fixed).map_err(|_| NodeError::Advertise(bound.to_owned()))
}

impl Node {
    /// Binds the ROUTER (a new key pair is made in memory for that), then makes the data
    /// directory, saves a new key pair there and opens the store; a bind that fails leaves
    /// nothing on disk.
    ///
    /// # Errors
    /// [`NodeError::DataDir`], [`NodeError::Store`] (including a data dir of another
    /// group), [`NodeError::Bind`], [`NodeError::Advertise`].
    pub fn bind(ctx: &zmq::Context, config: Config) -> Result<Node, NodeError> {
        Node::bind_leased(ctx, config, None, None)
    }

    /// As [`Node::bind`], serving under `lease` (taken with [`lease::Lease::acquire`]) when
    /// the store is shared: its commits are fenced by the lease's epoch, and the node stops
    /// when the lease is lost ([`NodeError::LeaseLost`]). `lock` is the data directory's
    /// lock when the caller took it already ([`lock_data_dir`], before waiting for the
    /// lease); without it, it is taken here.
    ///
    /// # Errors
    /// As [`Node::bind`].
    pub fn bind_leased(
        ctx: &zmq::Context,
        config: Config,
        lease: Option<lease::Lease>,
        lock: Option<DataDirLock>,
    ) -> Result<Node, NodeError> {
        // Bind first: a busy port or a bad endpoint leaves nothing behind (no key pair, no
        // data directory). A CURVE server socket needs its secret key before it binds, so a
        // new key pair is made in memory here and saved only once the socket is bound.
        let (keys, new_key, zap) = if config.insecure {
            let registries = config
                .registry
                .as_deref()
                .map(agora_common::client::registry_endpoints)
                .unwrap_or_default();
            let advertised = config.advertise.as_ref().map(|e| e.to_string());
            let endpoints = std::iter::once(config.bind.clone())
                .chain(registries)
                .chain(advertised);
            for e in endpoints {
                if !agora_proto::wire::is_loopback(&e) {
                    return Err(NodeError::InsecureNotLoopback(e));
                }
            }
            tracing::warn!("running WITHOUT encryption or authentication (--insecure)");
            (None, false, None)
        } else {
            agora_common::keys::require_curve()?;
            if config.registry.is_some() && config.registry_key.is_none() {
                return Err(NodeError::NoRegistryKey);
            }
            let (keys, new_key) = node_key_pair(&config.data_dir)?;
            (
                Some(keys),
                new_key,
                Some(Authenticator::start(ctx, ZapPolicy::default())?),
            )
        };
        let options = RouterOptions {
            // Room for an upload chunk too, whatever the body limit.
            max_request_bytes: max_request_bytes(
                config
                    .max_message_bytes
                    .max(agora_proto::wire::MAX_CHUNK_BYTES),
            ),
            hwm: config.sndhwm,
            heartbeat: Some(Duration::from_secs(1)),
            curve: keys.clone(),
        };
        let (socket, bound) =
            bind_router(ctx, &config.bind, options).map_err(|source| NodeError::Bind {
                endpoint: config.bind.clone(),
                source,
            })?;
        let endpoint = match &config.advertise {
            Some(e) => e.clone(),
            None => advertisable(&bound)?,
        };
        let db = config.data_dir.join("group.sqlite3");
        // With PostgreSQL, no SQLite file: only the directory (key pair, blob cache, lock).
        let sqlite = config.store.is_none().then_some(db.as_path());
        private_files(&config.data_dir, sqlite).map_err(|source| NodeError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let lock = match lock {
            Some(lock) => lock,
            None => lock_data_dir(&config.data_dir)?,
        };
        if let (Some(keys), true) = (&keys, new_key) {
            keys.save(&config.data_dir.join("node.key"))?;
            tracing::info!(public_key = %keys.public, "made a new node key pair");
        }
        let store: Box<dyn GroupStore> = match &config.store {
            Some(target) => Box::new(PgStore::open(
                target,
                &config.name,
                lease.as_ref().map(lease::Lease::epoch),
            )?),
            None => {
                let store = SqliteStore::open_with(&db, &config.name, Durability::Deferred)?;
                if config.wal_prealloc_bytes > 0 {
                    match store.preallocate_wal(config.wal_prealloc_bytes) {
                        Ok(0) => {}
                        Ok(added) => tracing::debug!(added, "zero-filled the WAL"),
                        Err(e) => tracing::warn!(error = %e, bytes = config.wal_prealloc_bytes,
                            "could not zero-fill the WAL; appends will grow it (slower syncs)"),
                    }
                }
                Box::new(store)
            }
        };
        let blobs = blobs::Blobs::open(&config.data_dir)
            .map_err(|e| NodeError::DataDir {
                path: config.data_dir.join("blobs"),
                source: std::io::Error::other(e.to_string()),
            })?
            .with_limits(blobs::Limits {
                quota: config.upload_quota,
                reserve: config.disk_reserve_bytes,
                max_uploads: config.max_uploads_per_member,
            });
        // With a PostgreSQL store, complete blobs live there too: any node of the group
        // serves them after a failover (`blobs`, "Shared blobs").
        let blobs = match &config.store {
            Some(target) => blobs
                .with_postgres(blobs::PgBlobTarget::new(
                    target,
                    &config.name,
                    lease.as_ref().map(lease::Lease::epoch),
                ))
                .map_err(|e| match e {
                    blobs::BlobError::Store(e) => NodeError::Store(e),
                    e => NodeError::DataDir {
                        path: config.data_dir.join("blobs"),
                        source: std::io::Error::other(e.to_string()),
                    },
                })?,
            None => blobs,
        };
        // The charges of kept contents, counted before any seal can run (without a
        // PostgreSQL store; with one, they are its rows).
        blobs.count_kept().map_err(|e| NodeError::DataDir {
            path: config.data_dir.join("blobs"),
            source: std::io::Error::other(e.to_string()),
        })?;
        let subscribers = Subscribers::new(
            config.lease,
            config.max_subscribers,
            config.max_subscriptions_per_member,
            config.fault_drop_push_every,
        )
        .with_push_budget(config.push_budget_bytes, config.push_budget_total_bytes);
        let limiter = Limiter::new(config.rate_limit);
        let owner = match &keys {
            Some(k) => Some(config.owner.unwrap_or(k.public)),
            None => None,
        };
        let mut store = store;
        if config.private {
            store.begin()?;
            store.set_mode(agora_proto::wire::GroupMode::Private)?;
            store.commit()?;
        }
        Ok(Node {
            ctx: ctx.clone(),
            config,
            socket,
            endpoint,
            store,
            lease,
            deposed: false,
            blobs,
            sealer: None,
            seal_waiters: std::collections::HashMap::new(),
            subscribers,
            keys,
            owner,
            stopping: false,
            limiter,
            _zap: zap,
            _lock: lock,
        })
    }

    /// The node's CURVE public key (`None` with `--insecure`): members connect with it, and
    /// it is published in the registry listing.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.keys.as_ref().map(|k| k.public)
    }

    /// The endpoint members connect to (and that is registered).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Serves until `shutdown` is triggered, then unregisters.
    ///
    /// # Errors
    /// [`NodeError::Zmq`] if the socket fails, [`NodeError::Thread`]. Bad requests and
    /// storage failures are answered and never end the loop.
    pub fn run(mut self, shutdown: &Shutdown) -> Result<(), NodeError> {
        let members = Arc::new(AtomicU64::new(self.store.member_count()));
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
            durable::Syncer::start(&self.ctx, self.store.flusher()).map_err(NodeError::Thread)?;
        let checkpoints = match self.store.checkpoints()? {
            Some(checkpointer) => Some(
                durable::CheckpointThread::start(&self.ctx, checkpointer)
                    .map_err(NodeError::Thread)?,
            ),
            None => None,
        };
        self.sealer = Some(
            durable::Sealer::start(
                &self.ctx,
                self.blobs.layout(),
                self.blobs.postgres().cloned(),
            )
            .map_err(NodeError::Thread)?,
        );
        tracing::info!(group = %self.config.name, endpoint = %self.endpoint,
            last_seq = self.store.last_seq(), "group node serving");
        let poll_ms = i64::try_from(SHUTDOWN_POLL.as_millis()).unwrap_or(100);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut pipeline = Pipeline {
            wal: self.store.flusher(),
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
                tracing::error!(group = %self.config.name, "lost the lease; stopping (another node may be active)");
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
                    members.store(self.store.member_count(), Ordering::Relaxed);
                    self.queue(&mut pipeline, done, &syncer, checkpoints.as_ref())?;
                }
            }
            if Instant::now() >= next_lease_sweep {
                let expired = self.subscribers.expire(Instant::now());
                if expired > 0 {
                    tracing::debug!(expired, "subscriptions expired");
                }
                self.update_gauges();
                next_lease_sweep = Instant::now() + Duration::from_millis(500);
            }
            if self.config.retention.max_age.is_some() && Instant::now() >= next_age_sweep {
                if self.sweep_retention() {
                    pipeline.requested += 1;
                    syncer.request(pipeline.requested)?;
                }
                next_age_sweep = Instant::now() + Duration::from_secs(1);
            }
            if Instant::now() >= next_blob_sweep {
                self.sweep_blobs();
                next_blob_sweep = Instant::now() + blob_sweep;
            }
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
        drop(checkpoints);
        if lost {
            return Err(NodeError::LeaseLost);
        }
        tracing::info!(group = %self.config.name, "group node stopping");
        Ok(())
    }

    /// The gauges a scrape reads: last seq, log bytes on disk, subscriptions.
    fn update_gauges(&self) {
        use agora_common::metrics::{LAST_SEQ, LOG_BYTES, SUBSCRIBERS};
        LAST_SEQ.set(i64::try_from(self.store.last_seq()).unwrap_or(i64::MAX));
        SUBSCRIBERS.set(i64::try_from(self.subscribers.len()).unwrap_or(i64::MAX));
        let bytes = self.store.stored_bytes();
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
        if Some(peer) != self.owner && Some(peer) != self.public_key() {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "only the group owner's key or the node's own may stop it",
            ));
        }
        tracing::info!(group = %self.config.name, by = %peer, "stop requested");
        self.stopping = true;
        Ok(StopReply { stopping: true })
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
        let stats = self
            .subscribers
            .push(&self.socket, &self.config.name, appended)?;
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
            _ => {
                let result = self.blobs.seal_here(&slot, verified);
                reply::<call::UploadChunk>(
                    result
                        .map(|p| cmd::files::reply(slot.digest, p))
                        .map_err(cmd::files::blob_error),
                )
            }
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
            let kept = match &sealed {
                durable::Sealed::Complete(kept) => Some(*kept),
                _ => None,
            };
            self.blobs.sealed(&slot, kept);
            let digest = slot.digest;
            let result = match sealed {
                durable::Sealed::Complete(kept) => Ok(cmd::files::reply(
                    digest,
                    blobs::Progress::Complete { size: kept.size },
                )),
                durable::Sealed::Mismatch(message) => {
                    Err(WireError::new(ErrorCode::DigestMismatch, message))
                }
                durable::Sealed::Failed(_) => Err(WireError::new(
                    ErrorCode::Internal,
                    "storage failure; the upload stands where it was; retry later",
                )),
            };
            let frames = reply_frames(result);
            for envelope in self.seal_waiters.remove(&slot).unwrap_or_default() {
                send_reply(&self.socket, envelope, frames.clone())?;
            }
        }
        Ok(())
    }

    /// Discards stale uploads, and deletes the contents that no kept message carries (once
    /// older than the upload TTL): what retention leaves of attachments. With a PostgreSQL
    /// store, their rows go too (fenced by the lease: a deposed node deletes nothing).
    fn sweep_blobs(&mut self) {
        let ttl = self.config.upload_ttl;
        match self.blobs.expire_uploads(ttl) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(expired = n, "unfinished uploads discarded"),
            Err(e) => tracing::warn!(error = %e, "could not expire uploads"),
        }
        let store = &self.store;
        // A store failure keeps the blob: never delete what may still be referenced.
        match self
            .blobs
            .retain(ttl, |d| store.references(d).unwrap_or(true))
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "unreferenced contents deleted"),
            Err(e) => tracing::warn!(error = %e, "could not sweep contents"),
        }
    }

    /// Applies the age retention in a batch of its own; returns whether it committed a
    /// deletion (which then needs a sync like any write).
    fn sweep_retention(&mut self) -> bool {
        let policy = self.config.retention;
        let result = self.store.begin().and_then(|()| {
            let n = self.store.apply_retention(policy, Timestamp::now())?;
            self.store.commit()?;
            Ok(n)
        });
        match result {
            Ok(0) => false,
            Ok(n) => {
                tracing::debug!(deleted = n, "retention");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "retention failed");
                false
            }
        }
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
            self.store.begin()
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
            if let Err(e) = self.store.expect_appends(&ids) {
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
                self.store.apply_retention(
                    Retention {
                        max_age: None,
                        ..retention
                    },
                    now,
                )?;
            }
            self.store.commit()
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
                    wrote: self.store.last_commit_wrote() || !appended.is_empty(),
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
            Redo::Send(id) => match self.store.page(HistoryQuery::ById(id), 1, usize::MAX) {
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
            return (reply_frames::<()>(Err(stopping())), false);
        }
        if let NodeRequest::Stop(_) = request {
            return reply::<call::Stop>(self.begin_stop(peer));
        }
        let mut sealing = Vec::new();
        let mut ctx = cmd::Ctx {
            store: &mut *self.store,
            config: &self.config,
            now,
            instant,
            envelope,
            subscribers: &mut self.subscribers,
            blobs: &self.blobs,
            sealing: &mut sealing,
            appended,
            peer,
            owner: self.owner,
        };
        match request {
            NodeRequest::Info(r) => reply::<call::Info>(cmd::info::apply(&mut ctx, r)),
            NodeRequest::Join(r) => reply::<call::Join>(cmd::join::apply(&mut ctx, r)),
            NodeRequest::Leave(r) => reply::<call::Leave>(cmd::leave::apply(&mut ctx, r)),
            NodeRequest::Members(r) => reply::<call::Members>(cmd::members::apply(&mut ctx, r)),
            NodeRequest::Send(r) => reply::<call::Send>(cmd::send::apply(&mut ctx, r)),
            NodeRequest::GetMessages(r) => {
                reply::<call::GetMessages>(cmd::get_messages::apply(&mut ctx, r))
            }
            NodeRequest::Subscribe(r) => {
                reply::<call::Subscribe>(cmd::subscribe::apply(&mut ctx, r))
            }
            NodeRequest::Unsubscribe(r) => {
                reply::<call::Unsubscribe>(cmd::unsubscribe::apply(&mut ctx, r))
            }
            NodeRequest::Invite(r) => reply::<call::Invite>(cmd::policy::invite(&mut ctx, r)),
            NodeRequest::Kick(r) => reply::<call::Kick>(cmd::policy::kick(&mut ctx, r)),
            NodeRequest::Ban(r) => reply::<call::Ban>(cmd::policy::ban(&mut ctx, r)),
            NodeRequest::Unban(r) => reply::<call::Unban>(cmd::policy::unban(&mut ctx, r)),
            NodeRequest::Promote(r) => reply::<call::Promote>(cmd::policy::promote(&mut ctx, r)),
            NodeRequest::SetMode(r) => reply::<call::SetMode>(cmd::policy::set_mode(&mut ctx, r)),
            NodeRequest::Upload(r) => {
                let result = cmd::files::upload(&mut ctx, r);
                if let Some((slot, verified)) = sealing.pop() {
                    // Complete before a restart but not sealed: answered once it is.
                    return self.defer_seal(slot, verified, envelope);
                }
                reply::<call::Upload>(result)
            }
            NodeRequest::UploadChunk(r) => {
                let result = cmd::files::upload_chunk(&mut ctx, r, data.unwrap_or_default());
                if let Some((slot, verified)) = sealing.pop() {
                    // The last chunk: answered once the sealer is done (`answer_seals`).
                    return self.defer_seal(slot, verified, envelope);
                }
                reply::<call::UploadChunk>(result)
            }
            NodeRequest::UploadStatus(r) => {
                reply::<call::UploadStatus>(cmd::files::upload_status(&mut ctx, r))
            }
            NodeRequest::Download(r) => match cmd::files::download(&mut ctx, r) {
                Ok((fields, bytes)) => {
                    agora_common::metrics::count(call::Download::ACTION.as_str(), None);
                    (encode_ok_data(&fields, bytes), true)
                }
                Err(e) => reply::<call::Download>(Err(e)),
            },
            // Answered above, before any handler's context.
            NodeRequest::Stop(_) => (reply_frames::<()>(Err(stopping())), false),
            NodeRequest::Create(_) | NodeRequest::Delete(_) => {
                reply::<call::Create>(Err(WireError::new(
                    ErrorCode::Forbidden,
                    "this node serves one group; groups are created and deleted on a group \
                     host (group-node --host)",
                )))
            }
            NodeRequest::Renew(_) => reply::<call::Renew>(Err(WireError::new(
                ErrorCode::UnknownAction,
                "renew: not served by this node yet; renew each group with subscribe",
            ))),
        }
    }
}

/// Encodes a handler's result for action `C`, whose reply type the handler must produce;
/// true when it is `ok`.
fn reply<C: Call>(result: Result<C::Reply, WireError>) -> (Frames, bool) {
    let ok = result.is_ok();
    (agora_common::server::answer::<C>(result), ok)
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

/// The data directory's lock ([`lock_data_dir`]), held until dropped.
#[derive(Debug)]
pub struct DataDirLock(#[allow(dead_code)] std::fs::File);

/// Takes the data directory's lock: an exclusive `flock` on `node.lock` (mode 0600), held
/// until the returned value is dropped (or the process dies), so that two nodes never
/// share one data directory, with SQLite or with `--store` (where a second node would
/// otherwise wait as a standby on the first one's directory). Makes the directory (0700)
/// if it does not exist.
///
/// # Errors
/// [`NodeError::Locked`] when another process holds it; [`NodeError::DataDir`] on I/O.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, NodeError> {
    use std::os::unix::fs::OpenOptionsExt;
    agora_common::fsmode::private_dir(dir).map_err(|source| NodeError::DataDir {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join("node.lock");
    let io = |source| NodeError::DataDir {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(DataDirLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(NodeError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// The topmost of `dir` and its parents that does not exist yet: what
/// [`lock_data_dir`] would make, for [`unmake_data_dir`]; `None` when `dir` exists.
pub fn first_missing(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .last()
        .map(Path::to_owned)
}

/// Removes what a failed start made ([`lock_data_dir`]): `dir`'s `node.lock`, then `dir`
/// and its parents up to `made` ([`first_missing`] before the start), each only if empty.
/// Failures are ignored (what is left is an empty directory at worst).
pub fn unmake_data_dir(dir: &Path, made: &Path) {
    let _ = std::fs::remove_file(dir.join("node.lock"));
    for a in dir.ancestors() {
        if std::fs::remove_dir(a).is_err() || a == made {
            break;
        }
    }
}

/// Makes the data directory private: creates it (and its parents) with mode 0700, or
/// tightens an existing one to 0700, and creates the SQLite database file `db` (when the
/// log is SQLite) with mode 0600 (SQLite gives its `-wal` and `-shm` files the database
/// file's mode), tightening existing store files to 0600 ([`agora_common::fsmode`]). Each
/// change to an existing path is logged; a path made here is private from creation and is
/// not.
fn private_files(dir: &Path, db: Option<&Path>) -> std::io::Result<()> {
    use agora_common::fsmode;
    fsmode::private_dir(dir)?;
    let Some(db) = db else {
        return Ok(());
    };
    fsmode::private_file(db)?;
    for suffix in ["-wal", "-shm"] {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        fsmode::tighten(Path::new(&path), fsmode::FILE_MODE)?;
    }
    Ok(())
}

/// The node's key pair, `node.key` and `node.key_secret` in `dir`: loaded when the secret
/// file exists, else made in memory (and `true`), for the caller to save once the socket is
/// bound. Nothing is written here.
///
/// # Errors
/// [`NodeError::Keys`]: the files cannot be read, are loose or do not match; no CURVE.
pub fn node_key_pair(dir: &Path) -> Result<(Keypair, bool), NodeError> {
    let path = dir.join("node.key");
    if agora_common::keys::secret_path(&path).exists() {
        Ok((Keypair::load(&path)?, false))
    } else {
        Ok((Keypair::generate()?, true))
    }
}

/// The default data directory of `group`: the user's data directory
/// (`$XDG_DATA_HOME/agora`, usually `~/.local/share/agora`), then `groups/`, then the group
/// name with every byte outside `[A-Za-z0-9_-]` percent-encoded, so that any name is one
/// safe path component.
pub fn default_data_dir(group: &GroupName) -> Option<PathBuf> {
    let base = directories::ProjectDirs::from("", "", "agora")?;
    Some(base.data_dir().join("groups").join(path_component(group)))
}

fn path_component(group: &GroupName) -> String {
    let mut out = String::new();
    for b in group.as_str().bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_become_safe_path_components() {
        let g = |s: &str| GroupName::new(s).expect("name");
        assert_eq!(path_component(&g("Cool Group")), "Cool%20Group");
        assert_eq!(path_component(&g("../etc")), "%2E%2E%2Fetc");
        assert_eq!(path_component(&g("..")), "%2E%2E");
    }

    #[test]
    fn wildcard_binds_advertise_loopback() {
        assert_eq!(
            advertisable("tcp://0.0.0.0:5000").expect("ok").as_str(),
            "tcp://127.0.0.1:5000"
        );
        assert_eq!(
            advertisable("tcp://10.1.2.3:5000").expect("ok").as_str(),
            "tcp://10.1.2.3:5000"
        );
    }
}
