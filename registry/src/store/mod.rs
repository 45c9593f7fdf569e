//! Where the registry keeps its state, behind one trait served by two backends.
//!
//! [`RegistryStore`] is everything a request handler reads or writes: the directory of live
//! groups, group-name owners, user accounts and their presence sessions, direct-message
//! mailboxes and dead letters, and the registry's own CURVE key pair. Handlers call the
//! trait and never see SQL.
//!
//! # Storage
//! - [`sqlite::SqliteStore`] (the default, no `--store`): one registry on one machine.
//!   Accounts, owners and mailboxes are durable in `registry.sqlite3` in the data directory
//!   (WAL, `synchronous=FULL`); the directory and presence sessions are soft state in
//!   memory; the key pair is `registry.key` / `registry.key_secret` in the data directory.
//! - [`postgres::PgStore`] (`--store postgres://…`): every part in one PostgreSQL database,
//!   in the schema `agora_registry`, so that several registries over one database behave
//!   as one registry (the same key pair, directory, presence, accounts and mailboxes).
//!   Expiry uses the database's clock, never a host's. Schema versions are in
//!   [`postgres::MIGRATIONS`].
//!
//! Every change is committed before the call returns, so a reply sent after it never
//! announces something a crash could lose.

use std::path::Path;
use std::time::Duration;

use agora_common::keys::{KeyError, Keypair, PublicKey};
use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    BlockedEntry, DeadLetter, Dm, Endpoint, GroupEntry, GroupName, Presence, UserEntry, UserName,
    WireError,
};
use serde_json::value::RawValue;

use crate::mailbox::{Copy, MailboxError, Stored};
use crate::owners::OwnersError;

pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> Self {
        StoreError::Postgres(e)
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The SQLite backend failed (or found a damaged row).
    #[error(transparent)]
    Sqlite(#[from] OwnersError),
    /// The PostgreSQL backend failed: connection, query or commit.
    ///
    /// Its text carries the causes already ([`agora_common::pgtls::describe`]), so the
    /// client error is not its `source` (`{:#}` would say each cause twice).
    #[error("postgres: {}", agora_common::pgtls::describe(.0))]
    Postgres(::postgres::Error),
    /// The TLS setup for PostgreSQL failed (`--store-ca`, `--store-cert`, `--store-key`), see [`agora_common::pgtls`].
    #[error("{0}")]
    PgTls(#[from] agora_common::pgtls::PgTlsError),
    /// A stored value does not parse (hand-edited or damaged row).
    #[error("corrupt {what} in the store: {value:?}")]
    Corrupt {
        /// What the value should have been (`user name`, `key`, …).
        what: &'static str,
        /// The stored text.
        value: String,
    },
    /// The database was migrated by a newer registry than this one.
    #[error(
        "the database's schema is version {found}, newer than this registry knows ({known}): \
         upgrade the registry"
    )]
    SchemaTooNew {
        /// The version in `agora_registry.schema_version`.
        found: i32,
        /// The newest version this build knows.
        known: i32,
    },
    /// The key pair could not be read, made or cached.
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    /// `--store` is not a PostgreSQL URL.
    #[error("--store must be a PostgreSQL URL (postgres://… or postgresql://…), not {0:?}")]
    NotPostgres(String),
    /// The database connection is broken and the next attempt to connect is not yet due
    /// ([`postgres::RECONNECT_INTERVAL`]).
    #[error("the database connection is broken; connecting again shortly")]
    Disconnected,
    /// An account, owner or mailbox call on a store opened without them (`--insecure`).
    #[error("this registry keeps no accounts, owners or mailboxes (--insecure)")]
    NoAccounts,
    /// [`StoreSettings::max_users`] accounts exist already: no more are made.
    #[error("the registry holds its maximum of {0} accounts")]
    TooManyUsers(u64),
    /// The data directory could not be made private (0700, created or tightened).
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file system under the SQLite store refused a write: an I/O error, a full disk, a
    /// file made immutable, a file system turned read-only. Nothing of the change is stored;
    /// reads go on; writes work again once the cause is gone. The store logged the cause
    /// when writes began to fail, once (see [`StoreError::is_logged`]).
    #[error("the store cannot be written: {0}")]
    Unwritable(rusqlite::Error),
}

impl StoreError {
    /// Whether the cause of this error has been logged already, so that a caller logs it at
    /// debug level only: [`StoreError::Unwritable`] (the store logs the cause once when
    /// writes begin to fail, not at every refused request).
    pub fn is_logged(&self) -> bool {
        matches!(self, StoreError::Unwritable(_))
    }
}

/// The registry's limits the store applies.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    /// How long a group entry lives without a heartbeat (the registry's TTL, default 6 s).
    pub group_ttl: Duration,
    /// The most groups listed at once (default 10,000).
    pub max_groups: usize,
    /// How long a presence session lives without a renewal (default 30 s).
    pub presence_ttl: Duration,
    /// The most accounts (default 100,000), checked with the insert: registries sharing a
    /// database take turns (an advisory lock), so that together they never go past it.
    pub max_users: u64,
    /// The most group names one key may own at once, not counting lapsed ones (default 100:
    /// room for a group host serving many groups); past it, a new name is refused with
    /// `too_many_names`.
    pub max_names_per_key: u64,
    /// How long a name stays bound to its key after its group last registered (default 30
    /// days); then it lapses and any key may claim it. The last registration is recorded at
    /// most every tenth of this, so a binding lapses between 0.9 and 1 times it after the
    /// group's last `register`.
    pub name_lapse: Duration,
    /// The most direct messages one sender may have waiting in one mailbox (default 100: a
    /// tenth of the default `--max-mailbox`); past it, `share_full`.
    pub dm_share: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            group_ttl: Duration::from_secs(6),
            max_groups: 10_000,
            presence_ttl: Duration::from_secs(30),
            max_users: 100_000,
            max_names_per_key: 100,
            name_lapse: Duration::from_secs(30 * 24 * 3600),
            dm_share: 100,
        }
    }
}

/// The most users one account may block (10,000); past it, `block` is refused with
/// `limit_reached`.
pub const MAX_BLOCKS: u64 = 10_000;

/// The `too_many_names` refusal of a key that owns `max` names already.
pub fn too_many_names(max: u64) -> WireError {
    WireError::new(
        agora_proto::wire::ErrorCode::TooManyNames,
        format!(
            "this key owns its maximum of {max} group names; a name whose group stops \
             registering is freed after the registry's --name-lapse"
        ),
    )
}

/// The `limit_reached` refusal of a `block` by an account that blocks [`MAX_BLOCKS`] users.
pub fn too_many_blocks() -> WireError {
    WireError::new(
        agora_proto::wire::ErrorCode::LimitReached,
        format!("you block the maximum of {MAX_BLOCKS} users; unblock one first"),
    )
}

/// How often the last registration of a bound name is written: a tenth of the lapse.
pub fn seen_interval(lapse: Duration) -> Duration {
    lapse / 10
}

/// What a node's `register` asks for.
#[derive(Debug, Clone)]
pub struct GroupRegistration {
    /// The group's name.
    pub name: GroupName,
    /// Where its members reach it.
    pub endpoint: Endpoint,
    /// Its member count.
    pub members: u64,
    /// The node's CURVE public key (`None` for an `--insecure` node).
    pub public_key: Option<PublicKey>,
    /// Held by the host `(endpoint, public_key)` (`register_groups`, PROTOCOL §4.1.1):
    /// live while the host sends `heartbeat_host`, and never replacing other names at the
    /// endpoint. False for a plain `register`.
    pub host: bool,
}

/// The result of a directory change that a peer's request can be refused: the outer error is
/// a storage failure, the inner one the refusal to send back (`name_taken`,
/// `limit_reached`, `unknown_group`).
pub type Refusable<T> = Result<Result<T, WireError>, StoreError>;

/// One claim's result in a batch ([`RegistryStore::claim_groups_up_to`]): the owner and
/// whether this call bound it, or the refusal (`too_many_names`).
pub type Claim = Result<(PublicKey, bool), WireError>;

/// One registry's storage: SQLite for a single registry ([`sqlite::SqliteStore`]), or
/// PostgreSQL shared by several ([`postgres::PgStore`]).
///
/// Every time-dependent call takes `now`, the caller's clock; a backend shared by several
/// registries ignores it and uses the database's clock, so that registries on different
/// hosts agree on expiry. Each change is committed before the call returns.
pub trait RegistryStore: Send {
    /// A short name of the backend for logs (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

    /// The registry's CURVE key pair, and whether it was just made. SQLite: the files in
    /// `data_dir`, made on first start. PostgreSQL: the pair stored in the database; on an
    /// empty database the first registry stores its own (the one in `data_dir`, else a new
    /// one), and every registry then uses the stored pair.
    ///
    /// # Errors
    /// [`StoreError::Keys`], or the backend's error.
    fn key_pair(&mut self, data_dir: &Path) -> Result<(Keypair, bool), StoreError>;

    /// Registers or refreshes a group (PROTOCOL §4.1): a live entry at the same endpoint is
    /// refreshed; a name held by another live endpoint is refused unless `owner_verified`
    /// (its owner moves it). Entries of other names at the same endpoint are kept when
    /// `owner_verified` (a CURVE registry: one endpoint may serve many groups, and another
    /// key's entry is not the caller's to drop); without ownership (`--insecure`) they are
    /// dropped: one endpoint is one node.
    ///
    /// # Errors
    /// Refusals `name_taken`, `limit_reached`; the backend's error.
    fn register_group(
        &mut self,
        group: GroupRegistration,
        owner_verified: bool,
        now: Timestamp,
    ) -> Refusable<GroupEntry>;

    /// `heartbeat_host` (PROTOCOL §4.1.1): refreshes every live entry held by the host
    /// `(endpoint, public_key)`; returns how many there are (0 for a host unknown here or
    /// whose TTL has passed).
    ///
    /// # Errors
    /// The backend's error.
    fn heartbeat_host(
        &mut self,
        endpoint: &Endpoint,
        public_key: Option<PublicKey>,
        now: Timestamp,
    ) -> Result<u64, StoreError>;

    /// Removes `name`'s entry if `endpoint` holds it.
    ///
    /// # Errors
    /// Refusals `unknown_group`, `name_taken` (another endpoint holds it); the backend's
    /// error.
    fn unregister_group(
        &mut self,
        name: &GroupName,
        endpoint: &Endpoint,
        now: Timestamp,
    ) -> Refusable<()>;

    /// Live entries, sorted by name.
    ///
    /// # Errors
    /// The backend's error.
    fn list_groups(&mut self, now: Timestamp) -> Result<Vec<GroupEntry>, StoreError>;

    /// How many entries are live (the `agora_groups` gauge): [`RegistryStore::list_groups`]'s
    /// length, without copying the entries where the backend can.
    ///
    /// # Errors
    /// The backend's error.
    fn count_groups(&mut self, now: Timestamp) -> Result<u64, StoreError> {
        Ok(self.list_groups(now)?.len() as u64)
    }

    /// The live entry named `name`.
    ///
    /// # Errors
    /// The backend's error.
    fn lookup_group(
        &mut self,
        name: &GroupName,
        now: Timestamp,
    ) -> Result<Option<GroupEntry>, StoreError>;

    /// Frees the entries whose TTL has passed; returns their names.
    ///
    /// # Errors
    /// The backend's error.
    fn expire_groups(&mut self, now: Timestamp) -> Result<Vec<GroupName>, StoreError>;

    /// The key `name` is bound to, binding it to `key` first if it is unbound or its
    /// binding lapsed ([`StoreSettings::name_lapse`]); also whether this call bound it.
    /// A claim by the owner records the registration (at most every [`seen_interval`]).
    /// Race-free: of two registries claiming at once, one wins.
    ///
    /// # Errors
    /// Refusal `too_many_names` ([`too_many_names`]) when binding would give `key` more than
    /// [`StoreSettings::max_names_per_key`] names (a refused claim changes nothing: a lapsed
    /// binding stays until a claim succeeds); the backend's error;
    /// [`StoreError::NoAccounts`] without owners.
    fn claim_group(
        &mut self,
        name: &GroupName,
        key: &PublicKey,
        now: Timestamp,
    ) -> Refusable<(PublicKey, bool)>;

    /// [`RegistryStore::claim_group`] with a cap of `max_names` for `key` instead of
    /// [`StoreSettings::max_names_per_key`] (a `--host-key`'s is `--max-groups`).
    ///
    /// # Errors
    /// As [`RegistryStore::claim_group`].
    fn claim_group_up_to(
        &mut self,
        name: &GroupName,
        key: &PublicKey,
        max_names: u64,
        now: Timestamp,
    ) -> Refusable<(PublicKey, bool)>;

    /// [`RegistryStore::claim_group_up_to`] of each of `names` for one key (one
    /// `register_groups`), each claim's result in order. SQLite and PostgreSQL make them in
    /// one transaction (one sync for all); the default makes them one by one.
    ///
    /// # Errors
    /// The backend's error (nothing of the batch is stored);
    /// [`StoreError::NoAccounts`] without owners.
    fn claim_groups_up_to(
        &mut self,
        names: &[GroupName],
        key: &PublicKey,
        max_names: u64,
        now: Timestamp,
    ) -> Result<Vec<Claim>, StoreError> {
        names
            .iter()
            .map(|name| self.claim_group_up_to(name, key, max_names, now))
            .collect()
    }

    /// The key `name` is bound to, if any.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without owners.
    fn group_owner(&mut self, name: &GroupName) -> Result<Option<PublicKey>, StoreError>;

    /// Unbinds `name` (`registry release`); returns whether it was bound.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without owners.
    fn release_group(&mut self, name: &GroupName) -> Result<bool, StoreError>;

    /// The account named `name`, with its presence.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn user_by_name(&mut self, name: &UserName) -> Result<Option<UserEntry>, StoreError>;

    /// The account `key` holds, with its presence.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn user_by_key(&mut self, key: &PublicKey) -> Result<Option<UserEntry>, StoreError>;

    /// Creates the account; false (nothing stored) when its name or key already holds one.
    ///
    /// # Errors
    /// [`StoreError::TooManyUsers`] when [`StoreSettings::max_users`] accounts exist; the
    /// backend's error; [`StoreError::NoAccounts`] without accounts.
    fn insert_user(&mut self, entry: &UserEntry) -> Result<bool, StoreError>;

    /// Removes the account `name` held by `key`, its mailbox and its session; returns
    /// whether it existed.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn remove_user(&mut self, name: &UserName, key: &PublicKey) -> Result<bool, StoreError>;

    /// How many accounts there are.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn count_users(&mut self) -> Result<u64, StoreError>;

    /// Every account with its presence, sorted by name.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn all_users(&mut self) -> Result<Vec<UserEntry>, StoreError>;

    /// Starts or renews `key`'s presence session with `status` (`online` or `away`) for
    /// the presence TTL, and records it as last seen; returns that time.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn renew_session(
        &mut self,
        key: &PublicKey,
        status: Presence,
        now: Timestamp,
    ) -> Result<Timestamp, StoreError>;

    /// Ends `key`'s session and records it as last seen; returns that time.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn end_session(&mut self, key: &PublicKey, now: Timestamp) -> Result<Timestamp, StoreError>;

    /// How many live sessions are `online` and how many `away`.
    ///
    /// # Errors
    /// The backend's error.
    fn session_counts(&mut self) -> Result<(u64, u64), StoreError>;

    /// Frees ended sessions.
    ///
    /// # Errors
    /// The backend's error.
    fn expire_sessions(&mut self) -> Result<(), StoreError>;

    /// Stores a DM for `recipient` (at most `max` waiting, at most
    /// [`StoreSettings::dm_share`] of them from `sender_key`); a retry with the same id,
    /// sender and body returns the first result (see [`crate::mailbox::Mailboxes::store`]).
    ///
    /// # Errors
    /// [`MailboxError::ShareFull`], [`MailboxError::Full`], [`MailboxError::IdConflict`],
    /// [`MailboxError::Store`].
    #[allow(clippy::too_many_arguments)]
    fn store_dm(
        &mut self,
        recipient: &PublicKey,
        sender: &UserName,
        sender_key: &PublicKey,
        id: Option<MessageId>,
        body: &RawValue,
        now: Timestamp,
        max: u64,
    ) -> Result<Stored, MailboxError>;

    /// Stores one message's copies and dead-letters `refused` (name and reason), full
    /// mailboxes and full shares, all in one transaction (see
    /// [`crate::mailbox::Mailboxes::store_many`]).
    ///
    /// # Errors
    /// [`MailboxError::IdConflict`] (nothing stored), [`MailboxError::Store`].
    #[allow(clippy::too_many_arguments)]
    fn store_dms(
        &mut self,
        copies: &[(PublicKey, UserName, MessageId)],
        refused: &[(String, &'static str)],
        sender: &UserName,
        sender_key: &PublicKey,
        body: &RawValue,
        now: Timestamp,
        max: u64,
    ) -> Result<Vec<Copy>, MailboxError>;

    /// Makes `blocker` refuse direct messages from `blocked`'s key (PROTOCOL §4.6.2); true
    /// if it did not already.
    ///
    /// # Errors
    /// Refusal `limit_reached` when `blocker` blocks [`MAX_BLOCKS`] users already; the
    /// backend's error; [`StoreError::NoAccounts`] without accounts.
    fn block(
        &mut self,
        blocker: &PublicKey,
        blocked: &UserEntry,
        now: Timestamp,
    ) -> Refusable<bool>;

    /// Lifts `blocker`'s block of the user blocked as `name`, or of `key` (the key that
    /// holds the account `name` now); true if there was one.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn unblock(
        &mut self,
        blocker: &PublicKey,
        name: &UserName,
        key: Option<&PublicKey>,
    ) -> Result<bool, StoreError>;

    /// The users `blocker` blocks, sorted by name.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn blocked(&mut self, blocker: &PublicKey) -> Result<Vec<BlockedEntry>, StoreError>;

    /// The accounts (their keys) that block direct messages from `sender`: one read for a
    /// whole `multicast` or `broadcast`.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn blockers_of(
        &mut self,
        sender: &PublicKey,
    ) -> Result<std::collections::HashSet<PublicKey>, StoreError>;

    /// Whether `blocker` blocks direct messages from `sender`.
    ///
    /// # Errors
    /// The backend's error; [`StoreError::NoAccounts`] without accounts.
    fn blocks(&mut self, blocker: &PublicKey, sender: &PublicKey) -> Result<bool, StoreError>;

    /// `recipient`'s unacked messages numbered after `after`, at most `limit`, and whether
    /// more follow.
    ///
    /// # Errors
    /// The backend's error.
    fn fetch_dms(
        &mut self,
        recipient: &PublicKey,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<Dm>, bool), StoreError>;

    /// Acks `recipient`'s messages numbered up to `up_to`; returns how many.
    ///
    /// # Errors
    /// The backend's error.
    fn ack_dms(&mut self, recipient: &PublicKey, up_to: u64) -> Result<u64, StoreError>;

    /// Records a message from `sender_key` to `to` that could not be delivered, keeping the
    /// sender's newest [`crate::mailbox::MAX_DEAD_LETTERS`].
    ///
    /// # Errors
    /// The backend's error.
    fn dead_letter(
        &mut self,
        sender_key: &PublicKey,
        to: &str,
        reason: &str,
        body: &RawValue,
        now: Timestamp,
    ) -> Result<(), StoreError>;

    /// `sender_key`'s dead letters, oldest first.
    ///
    /// # Errors
    /// The backend's error.
    fn dead_letters(&mut self, sender_key: &PublicKey) -> Result<Vec<DeadLetter>, StoreError>;

    /// Unacked messages over all mailboxes.
    ///
    /// # Errors
    /// The backend's error.
    fn waiting_dms(&mut self) -> Result<u64, StoreError>;

    /// Moves every unacked message stored more than `ttl` ago to its sender's dead letters
    /// (reason `expired`) and forgets the acked ones; returns how many became dead letters.
    ///
    /// # Errors
    /// The backend's error.
    fn expire_dms(&mut self, ttl: Duration, now: Timestamp) -> Result<u64, StoreError>;

    /// Messages stored by OTHER registries sharing this store since the last call, as
    /// (recipient, number), so that this registry can push them to recipients connected to
    /// it. Never waits long (PostgreSQL: reads at most every 50 ms, waiting up to 1 ms).
    /// Always empty for a store no other registry shares.
    ///
    /// # Errors
    /// The backend's error.
    fn stored_elsewhere(&mut self) -> Result<Vec<(PublicKey, u64)>, StoreError> {
        Ok(Vec::new())
    }
}

/// Opens the store `url` names (`None`: SQLite in `data_dir`; TLS to PostgreSQL set up
/// from `tls`), with accounts, owners and
/// mailboxes unless `accounts` is false (an `--insecure` registry keeps only the
/// directory).
///
/// # Errors
/// [`StoreError::NotPostgres`] for a URL that is not `postgres://…` or `postgresql://…`;
/// the backend's error (connection, migration, [`StoreError::SchemaTooNew`]).
pub fn open(
    url: Option<&str>,
    tls: &agora_common::pgtls::PgTlsFiles,
    data_dir: &Path,
    settings: StoreSettings,
    accounts: bool,
) -> Result<Box<dyn RegistryStore>, StoreError> {
    match url {
        None => Ok(Box::new(sqlite::SqliteStore::open(
            data_dir, settings, accounts,
        )?)),
        Some(url) if is_postgres_url(url) => {
            // Connected first: a database that cannot be used leaves no directory behind.
            let store = postgres::PgStore::connect(url, tls, settings)?;
            // The data directory holds only the key pair's files here; private all the same.
            agora_common::fsmode::private_dir(data_dir).map_err(|source| StoreError::DataDir {
                path: data_dir.to_owned(),
                source,
            })?;
            Ok(Box::new(store))
        }
        Some(other) => Err(StoreError::NotPostgres(other.to_owned())),
    }
}

/// Whether `url` selects the PostgreSQL backend (`postgres://…` or `postgresql://…`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}
