//! The durable group log and membership.
//!
//! A host keeps every group it serves in one database: [`HostDb`] (the transaction, the
//! `groups` table) and, per group, a [`GroupDb`] view implementing [`GroupLog`] over a small
//! cached [`LogState`] ([`host`]). A node of one group uses [`GroupStore`], the same data
//! methods plus the transaction in one value. Two backends implement them:
//! - [`SqliteHost`] / [`SqliteStore`] ([`sqlite`]): one SQLite file in WAL mode in the
//!   node's data directory, every group's rows in one set of tables; the embedded default.
//! - [`PgHost`] / [`PgStore`] ([`postgres`]): one schema in a PostgreSQL database (`--store
//!   postgres://…`) per host (a node of one group: per group), which several nodes on
//!   different machines share, one active at a time ([`lease`](crate::lease)).
//!
//! Writes happen inside a batch: [`GroupStore::begin`], any number of operations, then
//! [`GroupStore::commit`]. The node puts every request it has in hand into one batch and
//! sends the acks after the commit (and, for SQLite's deferred durability, the WAL sync that
//! [`GroupStore::flusher`] gives): group commit, one fsync for many messages, without acking
//! anything that is not durable.
//!
//! # Memory
//! Bounded per host, not per group: a loaded group's [`LogState`] is under 48 bytes; SQLite
//! keeps a 16 MiB page cache on the writer ([`sqlite::WRITER_CACHE_KIB`]), 2 MiB on the
//! checkpointer, and 64 prepared statements per connection ([`sqlite::STATEMENT_CACHE`]),
//! shared by every group; [`PgHost`] keeps one prepared statement per SQL text it runs (a
//! fixed set, `gid` a parameter) and one member cache for all its groups, an LRU of
//! 100,000 principals ([`postgres::DEFAULT_MEMBER_CACHE`]).
//!
//! # Failure inside a batch
//! When a write fails (an I/O error, a full disk, a lost connection), the database may roll
//! back the whole transaction by itself: SQLite does on I/O errors, PostgreSQL on any error
//! in a transaction. The store marks the batch aborted and refuses every later write of the
//! batch with [`StoreError::Aborted`] instead of letting it run (and commit) on its own; reads
//! go on. [`GroupStore::commit`] then fails, and the cached seq and clock are reloaded from
//! what is stored, so the next batch numbers on from there: no seq gap, and nothing answered
//! as failed is stored.
//!
//! # A file system that refuses writes
//! An I/O error, a full disk, a store file made immutable or a file system turned read-only
//! fails each write with [`StoreError::Unwritable`]: the batch is answered `internal` and
//! nothing of it is stored, reads go on, and writes work again once the cause is gone,
//! without a restart. The cause is logged once when writes begin to fail and once when they
//! work again, not at each refused write.

use std::time::Duration;

use serde_json::value::RawValue;

use agora_proto::id::MessageId;
use agora_proto::key::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    Attachment, EntryKind, GroupMode, HistoryQuery, Member, Message, SendAck, Sha256Digest,
    UserName,
};

#[cfg(test)]
mod conformance;
pub mod host;
pub mod postgres;
pub mod sqlite;

pub use self::host::{GroupDb, GroupId, GroupRow, GroupState, HostDb, LogState, NewGroup};
pub use self::postgres::{PgGroup, PgHost, PgSchema, PgStore};
pub use self::sqlite::{
    CheckpointStats, Checkpointer, Durability, SqliteGroup, SqliteHost, SqliteStore, WalSync,
};

/// A right or restriction a principal holds in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Grant {
    /// May invite, kick, ban, unban and set the mode.
    Admin,
    /// May join the group while it is private.
    Invite,
    /// May not join, nor stay a member.
    Ban,
}

impl Grant {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Grant::Admin => "admin",
            Grant::Invite => "invite",
            Grant::Ban => "ban",
        }
    }
}

/// Who a member is, as stored: `key:<Z85 public key>` for a CURVE-authenticated peer, or
/// `name:<user>` for a peer on an `--insecure` connection (where the claimed name is all
/// there is).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Principal(String);

impl Principal {
    /// The principal of a CURVE key.
    pub fn key(key: &PublicKey) -> Principal {
        Principal(format!("key:{key}"))
    }

    /// The principal of an unauthenticated user name.
    pub fn name(user: &UserName) -> Principal {
        Principal(format!("name:{user}"))
    }

    /// A principal as stored (`key:…` or `name:…`), read back from a store.
    pub(crate) fn from_stored(stored: String) -> Principal {
        Principal(stored)
    }

    /// The stored form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The CURVE key, for a `key:` principal.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.0.strip_prefix("key:").and_then(|k| k.parse().ok())
    }
}

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> Self {
        StoreError::Postgres(e)
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed (I/O, disk full, corruption, locked).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (connection lost, server error, constraint violated).
    ///
    /// Its text carries the causes already ([`agora_common::pgtls::describe`]), so the
    /// client error is not its `source` (`{:#}` would say each cause twice).
    #[error("postgres: {}", agora_common::pgtls::describe(.0))]
    Postgres(::postgres::Error),
    /// The TLS setup for PostgreSQL failed (`--store-ca`, `--store-cert`, `--store-key`), see [`agora_common::pgtls`].
    #[error("{0}")]
    PgTls(#[from] agora_common::pgtls::PgTlsError),
    /// Another node of the group took the lease: this node's epoch is no longer the
    /// stored one, so nothing it writes may commit (the fencing token, checked in every
    /// commit's transaction). The node must stop serving.
    #[error("fenced: the lease moved to epoch {current} (this node held {held})")]
    Fenced {
        /// The epoch this node holds.
        held: i64,
        /// The epoch stored now.
        current: i64,
    },
    /// A client-chosen id is already stored for a different sender or body.
    #[error("message id {0} is already used by a different message")]
    IdConflict(MessageId),
    /// The database belongs to another group.
    #[error("data belongs to group {found:?}, not {expected:?}")]
    WrongGroup {
        /// The group this node serves.
        expected: String,
        /// The group named in the database.
        found: String,
    },
    /// Migrating a store file to the current schema needs more free space than its file
    /// system has (the log is copied once, in one transaction); nothing was changed.
    #[error("migrating {path} to schema version 7 needs about {needed} bytes free and {free} are: free space on its file system (or move the data directory) and start again")]
    NoSpace {
        /// The store file.
        path: std::path::PathBuf,
        /// About the bytes the migration writes: the file and its WAL, once more.
        needed: u64,
        /// The bytes available to this process on that file system (`statvfs`).
        free: u64,
    },
    /// A pending or live group of the host has this name ([`HostDb::insert_group`]).
    #[error("a group named {0} is already on this host")]
    NameTaken(String),
    /// The store cannot do this.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// The user name is bound to another member of this group.
    #[error("user name {0} belongs to another member")]
    LabelTaken(UserName),
    /// The stored schema is newer than this build understands.
    #[error("schema version {found} is newer than this build's {known}")]
    SchemaTooNew {
        /// The stored version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A stored row does not decode (hand-edited or damaged file).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// An earlier write of this batch failed and SQLite rolled the batch back; nothing more
    /// is written until the next [`GroupStore::begin`].
    #[error("the batch was rolled back after an earlier failure")]
    Aborted,
    /// The file system under the store refused a write: an I/O error, a full disk, a file
    /// made immutable, a file system turned read-only. Nothing of the batch is stored; reads
    /// go on; writes work again once the cause is gone. The store logged the cause when
    /// writes began to fail, once (see [`StoreError::is_logged`]).
    #[error("the store cannot be written: {0}")]
    Unwritable(rusqlite::Error),
}

impl StoreError {
    /// Whether the cause of this error has been logged already, so that a caller logs it at
    /// debug level only: [`StoreError::Unwritable`] (the store logs the cause once when
    /// writes begin to fail, not at every refused write) and [`StoreError::Aborted`] (the
    /// failure that aborted the batch was logged when it happened).
    pub fn is_logged(&self) -> bool {
        matches!(self, StoreError::Unwritable(_) | StoreError::Aborted)
    }
}

/// An entry to append.
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    /// The sender, already checked to be a member (for events: who joined or left).
    pub sender: &'a UserName,
    /// A chat message or an event.
    pub kind: EntryKind,
    /// The sender's authenticated CURVE key, if any.
    pub sender_key: Option<PublicKey>,
    /// The JSON body text.
    pub body: &'a RawValue,
    /// The client's id, for an idempotent retry; `None` makes a UUID v7.
    pub id: Option<MessageId>,
    /// The wall-clock time of arrival; the stored time is this or later (monotonic).
    pub now: Timestamp,
    /// The file the message carries, if any.
    pub attachment: Option<&'a Attachment>,
}

/// What to delete from the log; `None` fields keep everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep only the newest N messages.
    pub max_messages: Option<u64>,
    /// Delete messages older than this.
    pub max_age: Option<Duration>,
}

/// One page of history.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// In seq order.
    pub messages: Vec<Message>,
    /// More messages match after the last one.
    pub more: bool,
}

/// Makes committed batches durable, for a store whose commit returns before they are
/// (SQLite's [`Durability::Deferred`]): everything committed before [`Flush::sync`] is
/// called is durable when it returns. Sent to the thread that syncs.
pub trait Flush: Send + std::fmt::Debug {
    /// Makes every committed batch durable.
    ///
    /// # Errors
    /// The I/O error. After a failed sync nothing it covered may be acked (the node stops).
    fn sync(&self) -> std::io::Result<()>;
}

/// The [`Flush`] of a store whose commit is already durable (SQLite's
/// [`Durability::Commit`], PostgreSQL with `synchronous_commit` on): nothing to do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Durable;

impl Flush for Durable {
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One group's data: its log, members, grants and mode. Every write happens inside the
/// batch that [`GroupStore::begin`] (or [`HostDb::begin`]) opened; reads see the batch's
/// own writes.
pub trait GroupLog: Send {
    /// The user name bound to `who`, if `who` is a member.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError>;
    /// Adds `who` as a member named `user`; returns the bound name and whether `who` was
    /// added (false: already a member, keeping the name it joined with).
    ///
    /// # Errors
    /// [`StoreError::LabelTaken`] when another member has that name; [`StoreError::Sqlite`].
    fn add_member(
        &mut self,
        who: &Principal,
        user: &UserName,
        at: Timestamp,
    ) -> Result<(UserName, bool), StoreError>;
    /// Removes a member; returns the name they had, or `None` if they were not one.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    fn remove_member(&mut self, who: &Principal) -> Result<Option<UserName>, StoreError>;
    /// The member who joined with the name `user`, if any.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError>;
    /// Gives `who` the grant; returns false if it already had it.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn grant(&mut self, who: &Principal, grant: Grant, at: Timestamp) -> Result<bool, StoreError>;
    /// Takes the grant from `who`; returns false if it did not have it.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn revoke(&mut self, who: &Principal, grant: Grant) -> Result<bool, StoreError>;
    /// Whether `who` has the grant.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError>;
    /// Open or private (default open).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn mode(&self) -> Result<GroupMode, StoreError>;
    /// Sets the mode; returns false if it already was that.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn set_mode(&mut self, mode: GroupMode) -> Result<bool, StoreError>;
    /// All members, sorted by name.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    fn members(&self) -> Result<Vec<Member>, StoreError>;
    /// How many members there are.
    fn member_count(&self) -> u64;
    /// Says which client ids the open batch is about to [`append`](GroupLog::append), so
    /// that a store can look them up in one go instead of one query per message (PostgreSQL,
    /// where each query is a round trip). Ids appended without being expected are still
    /// checked, one at a time. Does nothing by default.
    ///
    /// # Errors
    /// [`StoreError::Postgres`], which aborts the batch.
    fn expect_appends(&mut self, _ids: &[MessageId]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Appends a message, or returns the earlier ack if its client id is already stored with
    /// the same sender and body (`duplicate: true`).
    ///
    /// # Errors
    /// [`StoreError::IdConflict`] when the id is stored with another sender or body;
    /// [`StoreError::Sqlite`].
    fn append(&mut self, msg: NewMessage<'_>) -> Result<SendAck, StoreError>;
    /// The stored ack of message `id` if it is in the log with this sender, body and
    /// attachment (its JSON as stored, `None` for none) (`duplicate: true`), `None` if `id` is
    /// not stored.
    ///
    /// # Errors
    /// [`StoreError::IdConflict`] when it is stored with another sender, body or attachment;
    /// [`StoreError::Sqlite`].
    fn stored_ack(
        &self,
        id: MessageId,
        sender: &UserName,
        body: &RawValue,
        attachment: Option<&str>,
    ) -> Result<Option<SendAck>, StoreError>;
    /// Whether a message in the log carries the content `digest` (so that its blob stays).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn references(&self, digest: &Sha256Digest) -> Result<bool, StoreError>;
    /// A page of history for `query`: at most `limit` messages, and no more once bodies pass
    /// `max_bytes` (at least one message is returned when any matches).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    fn page(&self, query: HistoryQuery, limit: u32, max_bytes: usize) -> Result<Page, StoreError>;
    /// The seq of the newest message ever appended (0 if none).
    fn last_seq(&self) -> u64;
    /// Deletes what the policy says to delete; returns how many messages were deleted.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn apply_retention(&mut self, policy: Retention, now: Timestamp) -> Result<u64, StoreError>;
}

/// What a node of one group needs from storage: one group's data ([`GroupLog`]) and the
/// transaction around it, in one value ([`SqliteStore`], [`PgStore`]). A host of many
/// groups uses [`HostDb`] and one [`GroupDb`] view per group instead.
pub trait GroupStore: GroupLog {
    /// Starts a write batch.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] if the transaction cannot start.
    fn begin(&mut self) -> Result<(), StoreError>;
    /// Commits the batch durably. On error the batch is rolled back and cached state reloaded.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`]: nothing of the batch is stored.
    fn commit(&mut self) -> Result<(), StoreError>;
    /// Whether the last successful [`GroupStore::commit`] stored anything. A batch whose
    /// writes all changed nothing (a member's join again, a retried send) commits no page,
    /// so it needs no sync before its replies: one on a file system turned read-only would
    /// fail and stop the node for nothing. `true` unless the store knows better.
    fn last_commit_wrote(&self) -> bool {
        true
    }
    /// What makes a committed batch durable before its acks leave ([`Durable`] when the
    /// commit already is).
    fn flusher(&self) -> Box<dyn Flush>;
    /// A checkpointer to run on its own thread, for a store that needs one (SQLite's
    /// deferred WAL); `None` by default.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] if its connection cannot open.
    fn checkpoints(&self) -> Result<Option<Checkpointer>, StoreError> {
        Ok(None)
    }
    /// The bytes the log takes in storage (files, or relations), for the metrics gauge; 0
    /// when unknown.
    fn stored_bytes(&self) -> u64;
}

/// An attachment as stored: its JSON.
pub(crate) fn attachment_json(a: &Attachment) -> Result<String, StoreError> {
    serde_json::to_string(a).map_err(|e| StoreError::Corrupt(format!("attachment: {e}")))
}
