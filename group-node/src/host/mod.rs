//! The host: sockets, threads, time and the data directory of a group node; it knows no
//! action's rules (those are [`crate::group`]'s).
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
//! - [`Node`]: bind ([`Node::bind`]) and serve ([`Node::run`], `host/serve.rs`: the loop,
//!   the sync pipeline, stop, sweeps, the [`RouterSink`] that pushes go through).
//! - [`sync`]: the sync, checkpoint and sealing actors; `data_dir`: the data directory.

use std::path::PathBuf;
use std::time::Duration;

use crate::store::{
    self, Durability, GroupId, GroupLog, GroupState, HostDb, NewGroup, Retention, SqliteHost,
    SqliteStore, StoreError,
};
use agora_common::client::max_request_bytes;
use agora_common::keys::{KeyError, Keypair, PublicKey};
use agora_common::ratelimit::{Limiter, RateLimit};
use agora_common::server::{bind_router, Peer, RouterOptions};
use agora_common::zap::{Authenticator, ZapPolicy};
use agora_proto::codec::Frames;
use agora_proto::wire::{Endpoint, GroupName, Message, DEFAULT_MAX_MESSAGE_BYTES};

mod create;
mod data_dir;
pub mod groups;
pub mod route;
mod serve;
pub mod sweeps;
pub mod sync;

pub use data_dir::{
    default_data_dir, first_missing, lock_data_dir, node_key_pair, unmake_data_dir, DataDirLock,
};
pub use serve::RouterSink;

use crate::group::subscribers::Subscribers;
use crate::group::{blobs, Group, GroupConfig};
use crate::{heartbeat, lease};
use data_dir::private_files;
use groups::{GroupTable, Hosted, Loaded};
use sync as durable;

/// Most requests handled in one batch (one transaction, one fsync).
pub const MAX_BATCH: usize = 512;

/// Most committed batches waiting for their sync; the loop reads no new request while this
/// many wait (default 4).
pub const MAX_PIPELINE: usize = 4;

/// WAL bytes written, estimated, between checkpoint nudges: 4 MiB, SQLite's default
/// automatic checkpoint (1000 pages of 4 KiB). Checkpointing more often costs appends, as
/// the checkpoint's syncs of the database file compete with the WAL's.
const CHECKPOINT_BYTES: u64 = 4 << 20;

/// Most groups of a group host by default: 10,000.
pub const DEFAULT_MAX_GROUPS: usize = 10_000;

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
    /// 4 MiB, [`agora_proto::wire::DEFAULT_PUSH_BUDGET_BYTES`]); see [`crate::subscribers`].
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
    /// Make the group private at start (it stays so until `set_mode`); on a group host, the
    /// groups `groups` makes.
    pub private: bool,
    /// The `--host` form: serve every live group of the host database
    /// (`DATA/host.sqlite3`), each request naming its group; `name` is unused. Default
    /// false: a host of the one group `name`.
    pub host: bool,
    /// On a group host with a PostgreSQL `store`: the id whose hash names its schema
    /// (`agora_host_<hash>`, [`store::PgSchema::Host`]) and its lease; its standbys give the
    /// same. Default: the host's public key (which its standbys share); needed with
    /// `insecure`.
    pub host_id: Option<String>,
    /// On a group host: groups to make at start if the host has none of that name (the
    /// operator's, owned by the host key).
    pub groups: Vec<GroupName>,
    /// On a group host: most groups (default 10,000).
    pub max_groups: usize,
    /// On a group host: who may `create` groups (default nobody).
    pub creators: Creators,
    /// On a group host: most groups one key may create (default 100).
    pub max_groups_per_key: u64,
}

/// Who may `create` groups on a group host (`--creators`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Creators {
    /// Nobody: the operator makes groups with `--group`.
    #[default]
    Nobody,
    /// Any CURVE key (`--creators any`).
    Any,
    /// These keys (`--creators KEY[,KEY...]`).
    Keys(Vec<PublicKey>),
}

impl Creators {
    /// Whether `key` may create a group.
    pub fn allow(&self, key: &PublicKey) -> bool {
        match self {
            Creators::Nobody => false,
            Creators::Any => true,
            Creators::Keys(keys) => keys.contains(key),
        }
    }
}

impl Config {
    /// The settings of the group served, taken from these.
    pub fn group_config(&self) -> GroupConfig {
        GroupConfig {
            name: self.name.clone(),
            max_message_bytes: self.max_message_bytes,
            max_file_bytes: self.max_file_bytes,
            max_members: self.max_members,
            retention: self.retention,
            upload_ttl: self.upload_ttl,
        }
    }

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
            host: false,
            host_id: None,
            groups: Vec::new(),
            max_groups: DEFAULT_MAX_GROUPS,
            creators: Creators::Nobody,
            max_groups_per_key: 100,
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
    /// A group host on PostgreSQL (`--host` with `--store`) without a key to name its schema
    /// by (`--insecure`) nor a [`Config::host_id`].
    #[error("a group host on PostgreSQL names its schema by its public key, and --insecure has none: pass --host-id ID (the same on its standbys)")]
    HostOnPostgres,
    /// The host would hold more than `--max-groups` groups.
    #[error("the host would hold more than --max-groups {0} groups")]
    TooManyGroups(usize),
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
    /// The host's database: every group's log.
    db: HostDb,
    /// The groups served (one for `group-node NAME IP:PORT`).
    groups: GroupTable,
    /// The `--host` form: every request must name its group.
    many: bool,
    /// A group host's registration (one heartbeat for all its groups), while it runs.
    registrar: Option<crate::registrar::Registrar>,
    /// Groups created in the batch being served: forgotten again if it rolls back.
    created: Vec<usize>,
    /// The `create`s of the batch being served that wait for the registry (their groups
    /// pending): handed to the registrar once the batch is durable.
    creating: Vec<create::Creating>,
    /// The `create`s whose names the registrar is registering, oldest first.
    create_waiters: Vec<create::CreateWaiter>,
    /// Groups deleted in the batch being served: served again if it rolls back.
    deleted: Vec<usize>,
    /// When each group's age retention is due ([`sweeps`]).
    age_due: sweeps::DueTimes,
    /// When each group's attachments' TTL sweep is due ([`sweeps`]).
    blob_due: sweeps::DueTimes,
    /// When each loaded group of a group host is idle long enough to be let go: its last
    /// request plus [`sweeps::LOADED_IDLE`] ([`sweeps`]).
    idle_due: sweeps::DueTimes,
    /// The most groups a group host keeps loaded while others are idle
    /// ([`sweeps::MAX_LOADED_GROUPS`]).
    max_loaded: usize,
    /// The lease this node serves under, when the store is shared ([`lease`]).
    lease: Option<lease::Lease>,
    /// A PostgreSQL group host's one connection for every group's blobs.
    blob_client: blobs::PgBlobClient,
    /// A commit was fenced: another node holds the lease.
    deposed: bool,
    /// The sealing actor (started by `run`), and the envelopes of the last chunks whose
    /// replies wait for it, by digest.
    sealer: Option<durable::Sealer>,
    seal_waiters: std::collections::HashMap<(usize, blobs::Slot), Vec<Frames>>,
    keys: Option<Keypair>,
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

/// The subscribers of a new group, with the node's lease, bounds and push budgets.
fn group_subscribers(config: &Config) -> Subscribers {
    Subscribers::new(
        config.lease,
        config.max_subscribers,
        config.max_subscriptions_per_member,
        config.fault_drop_push_every,
    )
    .with_push_budget(config.push_budget_bytes, config.push_budget_total_bytes)
}

/// Where a group host's blobs live in PostgreSQL (its schema, fenced by its lease), for the
/// group `gid` 0 ([`blobs::PgBlobTarget::for_group`] names one); `None` without a
/// PostgreSQL store or on a node of one.
fn host_blob_target(
    config: &Config,
    db: &HostDb,
    lease: Option<&lease::Lease>,
) -> Option<blobs::PgBlobTarget> {
    match (config.host, &config.store, db.pg_schema()) {
        (true, Some(target), Some(schema)) => Some(blobs::PgBlobTarget::in_host(
            target,
            schema.clone(),
            GroupId(0),
            lease.map(lease::Lease::epoch),
        )),
        _ => None,
    }
}

/// Opens the attachments' blob tree under `dir` (`dir/blobs`) with the node's limits, kept
/// in PostgreSQL too with a PostgreSQL store (a group of a host: at `host`'s target, over
/// the host's one blob connection), and counts the charges of what it keeps.
///
/// # Errors
/// [`NodeError::DataDir`], [`NodeError::Store`].
fn open_blobs(
    config: &Config,
    dir: &std::path::Path,
    lease: Option<&lease::Lease>,
    host: Option<(blobs::PgBlobTarget, blobs::PgBlobClient)>,
) -> Result<blobs::Blobs, NodeError> {
    let io = |e: blobs::BlobError| NodeError::DataDir {
        path: dir.join("blobs"),
        source: std::io::Error::other(e.to_string()),
    };
    let blobs = blobs::Blobs::open(dir)
        .map_err(io)?
        .with_limits(blobs::Limits {
            quota: config.upload_quota,
            reserve: config.disk_reserve_bytes,
            max_uploads: config.max_uploads_per_member,
        });
    // With a PostgreSQL store, complete blobs live there too: any node of the group
    // serves them after a failover (`blobs`, "Shared blobs").
    if let Some((target, client)) = host {
        let blobs = blobs.with_postgres_on(target, client);
        blobs.count_kept().map_err(io)?;
        return Ok(blobs);
    }
    let blobs = match config.store.as_ref().filter(|_| !config.host) {
        Some(target) => blobs
            .with_postgres(blobs::PgBlobTarget::new(
                target,
                &config.name,
                lease.map(lease::Lease::epoch),
            ))
            .map_err(|e| match e {
                blobs::BlobError::Store(e) => NodeError::Store(e),
                e => io(e),
            })?,
        None => blobs,
    };
    // The charges of kept contents, counted before any seal can run (without a
    // PostgreSQL store; with one, they are its rows).
    blobs.count_kept().map_err(io)?;
    Ok(blobs)
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
            // 5 s (a dead peer dropped within 15 s): at 1 s, each idle follower cost a
            // CURVE PING and PONG a second beside its renewals (PERFORMANCE.md, idle row).
            heartbeat: Some(Duration::from_secs(5)),
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
        let db_path = config.data_dir.join(if config.host {
            "host.sqlite3"
        } else {
            "group.sqlite3"
        });
        // With PostgreSQL, no SQLite file: only the directory (key pair, blob cache, lock).
        let sqlite = config.store.is_none().then_some(db_path.as_path());
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
        let mut db = match &config.store {
            Some(target) => {
                // A node of one keeps its group's schema (its standbys find it by the name);
                // a group host's is named by its host id, its public key by default.
                let schema = if config.host {
                    let id = config
                        .host_id
                        .clone()
                        .or_else(|| keys.as_ref().map(|k| k.public.to_string()))
                        .ok_or(NodeError::HostOnPostgres)?;
                    store::PgSchema::Host(id)
                } else {
                    store::PgSchema::Group(config.name.clone())
                };
                HostDb::Pg(Box::new(store::PgHost::open(
                    target,
                    schema,
                    lease.as_ref().map(lease::Lease::epoch),
                )?))
            }
            None => {
                let host = if config.host {
                    SqliteHost::open_with(&db_path, Durability::Deferred)?
                } else {
                    SqliteStore::open_with(&db_path, &config.name, Durability::Deferred)?
                        .into_parts()
                        .0
                };
                if config.wal_prealloc_bytes > 0 {
                    match host.preallocate_wal(config.wal_prealloc_bytes) {
                        Ok(0) => {}
                        Ok(added) => tracing::debug!(added, "zero-filled the WAL"),
                        Err(e) => tracing::warn!(error = %e, bytes = config.wal_prealloc_bytes,
                            "could not zero-fill the WAL; appends will grow it (slower syncs)"),
                    }
                }
                HostDb::Sqlite(host)
            }
        };
        let host_key = keys.as_ref().map(|k| k.public);
        let mut groups = GroupTable::new();
        if config.host {
            // Groups a crash left pending were never acked: nothing of them stays.
            let removed = db.remove_pending_groups()?;
            if removed > 0 {
                tracing::info!(
                    removed,
                    "removed groups left pending (created, never acked)"
                );
            }
            // The operator's groups (`--group`), made live at once if new.
            // The host's count is read once, not once per new name.
            let mut held = if config.groups.is_empty() {
                0
            } else {
                db.live_groups()?.len()
            };
            for name in &config.groups {
                if db.find_group(name)?.is_none() {
                    if held >= config.max_groups {
                        return Err(NodeError::TooManyGroups(config.max_groups));
                    }
                    held += 1;
                    db.begin()?;
                    db.insert_group(NewGroup {
                        name,
                        owner: None,
                        created_by: None,
                        mode: if config.private {
                            agora_proto::wire::GroupMode::Private
                        } else {
                            agora_proto::wire::GroupMode::Open
                        },
                        state: GroupState::Live,
                        at: agora_proto::time::Timestamp::now(),
                    })?;
                    db.commit()?;
                    db.flusher().sync().map_err(|source| NodeError::DataDir {
                        path: db_path.clone(),
                        source,
                    })?;
                }
            }
            for row in db.live_groups()? {
                groups.insert(Hosted {
                    name: row.name,
                    gid: row.gid,
                    owner: row.owner.and_then(|p| p.public_key()).or(host_key),
                    stopped: false,
                    pending: false,
                    loaded: None,
                    members: row.members,
                });
            }
        } else {
            let mut log = db.load(GroupId::ONE)?;
            let blobs = open_blobs(&config, &config.data_dir, lease.as_ref(), None)?;
            let owner = host_key.map(|k| config.owner.unwrap_or(k));
            if config.private {
                db.begin()?;
                db.group(&mut log)
                    .set_mode(agora_proto::wire::GroupMode::Private)?;
                db.commit()?;
            }
            let group = Group::new(
                config.group_config(),
                group_subscribers(&config),
                blobs,
                owner,
            );
            groups.insert(Hosted {
                name: config.name.clone(),
                gid: GroupId::ONE,
                owner,
                stopped: false,
                pending: false,
                members: log.member_count(),
                loaded: Some(Box::new(Loaded { group, log })),
            });
        }
        let limiter = Limiter::new(config.rate_limit);
        let many = config.host;
        Ok(Node {
            ctx: ctx.clone(),
            config,
            socket,
            endpoint,
            db,
            groups,
            many,
            registrar: None,
            created: Vec::new(),
            creating: Vec::new(),
            create_waiters: Vec::new(),
            deleted: Vec::new(),
            age_due: sweeps::DueTimes::new(),
            blob_due: sweeps::DueTimes::new(),
            idle_due: sweeps::DueTimes::new(),
            max_loaded: sweeps::MAX_LOADED_GROUPS,
            lease,
            blob_client: blobs::PgBlobClient::default(),
            deposed: false,
            sealer: None,
            seal_waiters: std::collections::HashMap::new(),
            keys,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
