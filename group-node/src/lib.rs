//! The Agora group node: a host of one group (`group-node NAME IP:PORT`).
//!
//! A ROUTER socket serves membership (`join`, `leave`, `members`), the durable sequenced log
//! (`send`) and history (`get_messages`), as `docs/PROTOCOL.md` specifies. The node registers
//! with the registry and heartbeats on its own thread ([`heartbeat`]).
//!
//! # Layout
//! - [`host`]: sockets, threads, time and the data directory; knows no action's rules.
//!   [`Node`] binds ([`Node::bind`]) and serves ([`Node::run`]): the request loop, the
//!   pipeline of batches waiting for their sync ([`durable`], `host/sync.rs`), stop, sweeps.
//! - [`group`]: one group's rules, with no socket, thread or clock of its own: [`group::Group`]
//!   applies one request ([`group::Group::apply`]) against the store and returns its reply;
//!   its handlers (`group/cmd/`, one per action), [`subscribers`] (the live stream, pushed
//!   through a [`subscribers::PushSink`] the host gives it), [`blobs`] (attachments' bytes) and
//!   [`identity`] (who the caller is).
//! - [`store`]: the log and membership (SQLite or PostgreSQL); [`lease`]: the PostgreSQL
//!   lease of a node with standbys.
//!
//! `group/` never imports `host/` nor `zmq`, and reads no clock: the host passes the time in
//! (a unit test scans its sources for that).

pub mod group;
pub mod heartbeat;
pub mod host;
pub mod lease;
pub mod registrar;
pub mod store;

pub use group::{blobs, identity, subscribers};
pub use host::sync as durable;
pub use host::{
    default_data_dir, first_missing, lock_data_dir, node_key_pair, unmake_data_dir, Config,
    DataDirLock, Node, NodeError, DEFAULT_DISK_RESERVE_BYTES, DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_GROUPS, DEFAULT_MAX_UPLOADS_PER_MEMBER, DEFAULT_UPLOAD_QUOTA, DEFAULT_UPLOAD_TTL,
    DEFAULT_WAL_PREALLOC_BYTES, MAX_BATCH, MAX_PIPELINE,
};
