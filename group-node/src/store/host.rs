//! One database per host: [`HostDb`] holds the transaction and the `groups` table, and
//! [`GroupDb`] is one group's view of it ([`GroupLog`]), for the group a [`LogState`] names.
//!
//! The host keeps one small [`LogState`] per group it serves (the cached high-water marks and
//! member count: tens of bytes) and asks [`HostDb::group`] for a view when a request of that
//! group is applied. Every view writes into the one batch [`HostDb::begin`] opened, so one
//! [`HostDb::commit`] (and one sync of its [`HostDb::flusher`]) covers every group of a turn.
//!
//! # After a failed commit
//! [`HostDb::commit`] rolls the whole batch back. The [`LogState`] of every group the batch
//! touched may then be ahead of what is stored: the caller reloads each with
//! [`HostDb::reload`] before that group's next batch (a [`SqliteStore`] does it for its
//! own group).
//!
//! # Backends
//! - SQLite ([`SqliteHost`], schema version 7: one file, a `gid` in every row).
//! - PostgreSQL ([`PgHost`], schema version 4: a schema per host, a `gid` in every row;
//!   a node of one group keeps its group's schema, its group being gid 1).
//!
//! [`SqliteStore`]: super::SqliteStore

use agora_proto::id::MessageId;
use agora_proto::time::{MonotonicClock, Timestamp};
use agora_proto::wire::{
    GroupMode, GroupName, HistoryQuery, Member, SendAck, Sha256Digest, UserName,
};
use serde_json::value::RawValue;

use super::postgres::{PgGroup, PgHost};
use super::sqlite::{Checkpointer, SqliteGroup, SqliteHost};
use super::{Flush, Grant, GroupLog, NewMessage, Page, Principal, Retention, StoreError};

/// A group's number on its host: 1, 2, … in creation order, never reused (an archived
/// group keeps its rows and its number). A node of one group serves gid 1.
///
/// Seqs of one group stay below 2^40 and gids below 2^23: SQLite keys a message by
/// `gid << 40 | seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u32);

impl GroupId {
    /// The group of a node of one (and the group a migrated one-group file holds).
    pub const ONE: GroupId = GroupId(1);
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a group stands on its host (the `groups.state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupState {
    /// Created, not yet registered: not served, deleted at the next start
    /// ([`HostDb::remove_pending_groups`]).
    Pending,
    /// Served.
    Live,
    /// Deleted by its owner: its rows stay, its name is free on the host.
    Archived,
}

impl GroupState {
    /// The stored form: `pending`, `live` or `archived`.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Pending => "pending",
            GroupState::Live => "live",
            GroupState::Archived => "archived",
        }
    }

    /// The state of a stored form; `None` for anything else.
    pub fn from_stored(s: &str) -> Option<GroupState> {
        match s {
            "pending" => Some(GroupState::Pending),
            "live" => Some(GroupState::Live),
            "archived" => Some(GroupState::Archived),
            _ => None,
        }
    }
}

/// A group as the host's `groups` table holds it ([`HostDb::live_groups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRow {
    /// Its number on the host.
    pub gid: GroupId,
    /// Its name (unique among the host's pending and live groups).
    pub name: GroupName,
    /// Who owns it: the creator; `None` for the host key (a node of one: `--owner` or the
    /// node key, as configured, not stored).
    pub owner: Option<Principal>,
    /// Open or private.
    pub mode: GroupMode,
    /// Pending, live or archived.
    pub state: GroupState,
    /// Who created it (`None`: the operator, or a migrated file), for `--max-groups-per-key`.
    pub created_by: Option<Principal>,
    /// How many members it has (for the registrar's heartbeat).
    pub members: u64,
}

/// A group to insert with [`HostDb::insert_group`].
#[derive(Debug, Clone, Copy)]
pub struct NewGroup<'a> {
    /// Its name; refused with [`StoreError::NameTaken`] if a pending or live group of the
    /// host has it.
    pub name: &'a GroupName,
    /// Its owner (`None`: the host key).
    pub owner: Option<&'a Principal>,
    /// Who asks for it (`None`: the operator).
    pub created_by: Option<&'a Principal>,
    /// Open or private.
    pub mode: GroupMode,
    /// Usually [`GroupState::Pending`] until the registry accepted the name.
    pub state: GroupState,
    /// The time of creation.
    pub at: Timestamp,
}

/// One group's cached log state: the newest seq, the clock that keeps time monotonic, the
/// member count. About 40 bytes; the host keeps one per group it has loaded
/// ([`HostDb::load`]) and hands it to [`HostDb::group`] with each batch.
#[derive(Debug, Clone, Copy)]
pub struct LogState {
    pub(super) gid: GroupId,
    pub(super) last_seq: u64,
    pub(super) clock: MonotonicClock,
    pub(super) member_count: u64,
}

impl LogState {
    /// The group this state is of.
    pub fn gid(&self) -> GroupId {
        self.gid
    }

    /// The seq of the newest message ever appended (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// How many members the group has.
    pub fn member_count(&self) -> u64 {
        self.member_count
    }
}

/// The database of a host: the transaction, the `groups` table, and a view per group.
/// Static dispatch over the backends (no `Box` per request).
pub enum HostDb {
    /// One SQLite file (schema version 7).
    Sqlite(SqliteHost),
    /// A PostgreSQL schema (version 4): a host's, or a node of one group's.
    Pg(Box<PgHost>),
}

impl std::fmt::Debug for HostDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostDb::Sqlite(h) => h.fmt(f),
            HostDb::Pg(h) => h.fmt(f),
        }
    }
}

impl HostDb {
    /// Starts a write batch for every group of the turn.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Unwritable`] if the transaction cannot start.
    pub fn begin(&mut self) -> Result<(), StoreError> {
        match self {
            HostDb::Sqlite(h) => h.begin(),
            HostDb::Pg(h) => h.begin(),
        }
    }

    /// Commits the batch (durable once [`HostDb::flusher`] synced it, for SQLite's deferred
    /// durability). On error nothing of the batch is stored, and the caller reloads the
    /// [`LogState`] of each group it touched ([`HostDb::reload`]).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Unwritable`], [`StoreError::Aborted`],
    /// [`StoreError::Fenced`], [`StoreError::Postgres`].
    pub fn commit(&mut self) -> Result<(), StoreError> {
        match self {
            HostDb::Sqlite(h) => h.commit(),
            HostDb::Pg(h) => h.commit(),
        }
    }

    /// Whether the last successful commit stored anything ([`super::GroupStore::last_commit_wrote`]).
    pub fn last_commit_wrote(&self) -> bool {
        match self {
            HostDb::Sqlite(h) => h.last_commit_wrote(),
            HostDb::Pg(_) => true,
        }
    }

    /// What makes a committed batch durable before its acks leave.
    pub fn flusher(&self) -> Box<dyn Flush> {
        match self {
            HostDb::Sqlite(h) => h.flusher(),
            HostDb::Pg(h) => h.flusher(),
        }
    }

    /// A checkpointer for its own thread (SQLite's deferred WAL), `None` if not needed.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] if its connection cannot open.
    pub fn checkpoints(&self) -> Result<Option<Checkpointer>, StoreError> {
        match self {
            HostDb::Sqlite(h) => h.checkpoints(),
            HostDb::Pg(_) => Ok(None),
        }
    }

    /// The bytes the database takes (the file and its WAL, or the relations), 0 if unknown.
    pub fn stored_bytes(&self) -> u64 {
        match self {
            HostDb::Sqlite(h) => h.stored_bytes(),
            HostDb::Pg(h) => h.stored_bytes(),
        }
    }

    /// The live groups, by gid, with their member counts: what the host serves at start.
    /// One query, no per-group work.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`], [`StoreError::Postgres`].
    pub fn live_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        match self {
            HostDb::Sqlite(h) => h.live_groups(),
            HostDb::Pg(h) => h.live_groups(),
        }
    }

    /// The gid and state of the group named `name` that is not archived, if any.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn find_group(
        &self,
        name: &GroupName,
    ) -> Result<Option<(GroupId, GroupState)>, StoreError> {
        match self {
            HostDb::Sqlite(h) => h.find_group(name),
            HostDb::Pg(h) => h.find_group(name),
        }
    }

    /// Deletes the groups left pending (created, never registered, never acked) with their
    /// rows; returns how many. Call it at start, outside a batch.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn remove_pending_groups(&mut self) -> Result<u64, StoreError> {
        match self {
            HostDb::Sqlite(h) => h.remove_pending_groups(),
            HostDb::Pg(h) => h.remove_pending_groups(),
        }
    }

    /// How many pending or live groups `created_by` created (for `--max-groups-per-key`),
    /// and how many pending or live groups the host has in all (for `--max-groups`).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn group_counts(&self, created_by: &Principal) -> Result<(u64, u64), StoreError> {
        match self {
            HostDb::Sqlite(h) => h.group_counts(created_by),
            HostDb::Pg(h) => h.group_counts(created_by),
        }
    }

    /// Inserts a group in the open batch; returns its new gid (one more than any the host
    /// ever had). Its log starts empty: [`HostDb::load`] gives its state.
    ///
    /// # Errors
    /// [`StoreError::NameTaken`] if a pending or live group of the host has the name;
    /// [`StoreError::Sqlite`], [`StoreError::Postgres`], [`StoreError::Aborted`].
    pub fn insert_group(&mut self, g: NewGroup<'_>) -> Result<GroupId, StoreError> {
        match self {
            HostDb::Sqlite(h) => h.insert_group(g),
            HostDb::Pg(h) => h.insert_group(g),
        }
    }

    /// Sets a group's state in the open batch (archiving records the time `at`).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if there is no such group; [`StoreError::NameTaken`] when a
    /// group is made live again while another has its name; [`StoreError::Sqlite`],
    /// [`StoreError::Postgres`], [`StoreError::Aborted`].
    pub fn set_group_state(
        &mut self,
        gid: GroupId,
        state: GroupState,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        match self {
            HostDb::Sqlite(h) => h.set_group_state(gid, state, at),
            HostDb::Pg(h) => h.set_group_state(gid, state, at),
        }
    }

    /// Reads a group's [`LogState`] from the database: two index descents (the newest
    /// message and the member count), whatever the log's length.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if there is no such group; [`StoreError::Sqlite`].
    pub fn load(&self, gid: GroupId) -> Result<LogState, StoreError> {
        match self {
            HostDb::Sqlite(h) => h.load(gid),
            HostDb::Pg(h) => h.load(gid),
        }
    }

    /// Reads `state` back from the database (after a failed commit).
    ///
    /// # Errors
    /// As [`HostDb::load`].
    pub fn reload(&self, state: &mut LogState) -> Result<(), StoreError> {
        *state = self.load(state.gid)?;
        Ok(())
    }

    /// The PostgreSQL schema the database is in, `None` for SQLite.
    pub fn pg_schema(&self) -> Option<&super::PgSchema> {
        match self {
            HostDb::Sqlite(_) => None,
            HostDb::Pg(h) => Some(h.schema()),
        }
    }

    /// The view of the group `state` belongs to, for this batch. Reads and writes go to that
    /// group's rows only.
    pub fn group<'a>(&'a mut self, state: &'a mut LogState) -> GroupDb<'a> {
        match self {
            HostDb::Sqlite(h) => GroupDb::Sqlite(SqliteGroup::new(h, state)),
            HostDb::Pg(h) => GroupDb::Pg(h.group(state)),
        }
    }
}

/// One group's view of a [`HostDb`] ([`HostDb::group`]).
#[derive(Debug)]
pub enum GroupDb<'a> {
    /// A group of an SQLite host.
    Sqlite(SqliteGroup<'a>),
    /// A group of a PostgreSQL host.
    Pg(PgGroup<'a>),
}

impl GroupDb<'_> {
    fn log(&self) -> &dyn GroupLog {
        match self {
            GroupDb::Sqlite(g) => g,
            GroupDb::Pg(g) => g,
        }
    }

    fn log_mut(&mut self) -> &mut dyn GroupLog {
        match self {
            GroupDb::Sqlite(g) => g,
            GroupDb::Pg(g) => g,
        }
    }
}

impl GroupLog for GroupDb<'_> {
    fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        self.log().member(who)
    }
    fn add_member(
        &mut self,
        who: &Principal,
        user: &UserName,
        at: Timestamp,
    ) -> Result<(UserName, bool), StoreError> {
        self.log_mut().add_member(who, user, at)
    }
    fn remove_member(&mut self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        self.log_mut().remove_member(who)
    }
    fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError> {
        self.log().member_named(user)
    }
    fn grant(&mut self, who: &Principal, grant: Grant, at: Timestamp) -> Result<bool, StoreError> {
        self.log_mut().grant(who, grant, at)
    }
    fn revoke(&mut self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.log_mut().revoke(who, grant)
    }
    fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.log().has(who, grant)
    }
    fn mode(&self) -> Result<GroupMode, StoreError> {
        self.log().mode()
    }
    fn set_mode(&mut self, mode: GroupMode) -> Result<bool, StoreError> {
        self.log_mut().set_mode(mode)
    }
    fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.log().members()
    }
    fn member_count(&self) -> u64 {
        self.log().member_count()
    }
    fn expect_appends(&mut self, ids: &[MessageId]) -> Result<(), StoreError> {
        self.log_mut().expect_appends(ids)
    }
    fn append(&mut self, msg: NewMessage<'_>) -> Result<SendAck, StoreError> {
        self.log_mut().append(msg)
    }
    fn stored_ack(
        &self,
        id: MessageId,
        sender: &UserName,
        body: &RawValue,
        attachment: Option<&str>,
    ) -> Result<Option<SendAck>, StoreError> {
        self.log().stored_ack(id, sender, body, attachment)
    }
    fn references(&self, digest: &Sha256Digest) -> Result<bool, StoreError> {
        self.log().references(digest)
    }
    fn page(&self, query: HistoryQuery, limit: u32, max_bytes: usize) -> Result<Page, StoreError> {
        self.log().page(query, limit, max_bytes)
    }
    fn last_seq(&self) -> u64 {
        self.log().last_seq()
    }
    fn apply_retention(&mut self, policy: Retention, now: Timestamp) -> Result<u64, StoreError> {
        self.log_mut().apply_retention(policy, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a loaded group costs the host in memory for its log: its `LogState`.
    #[test]
    fn a_log_state_is_at_most_48_bytes() {
        assert!(
            std::mem::size_of::<LogState>() <= 48,
            "{}",
            std::mem::size_of::<LogState>()
        );
    }
}
