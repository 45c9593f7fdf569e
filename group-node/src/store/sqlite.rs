//! One SQLite file in WAL mode holding every group of a host: [`SqliteHost`] (the
//! connection, the transaction, the `groups` table), [`SqliteGroup`] (one group's view,
//! [`GroupLog`]) and [`SqliteStore`] (a node of one group: the host with gid 1 and its
//! [`LogState`], a [`GroupStore`]). The embedded default.
//!
//! Two [`Durability`] settings:
//! - [`Durability::Commit`] (`synchronous=FULL`): a commit returns once the WAL is fsynced, so
//!   a committed transaction survives a process kill and a power loss.
//! - [`Durability::Deferred`] (`synchronous=NORMAL`): a commit writes the WAL to the page
//!   cache and returns; the caller makes it durable with [`WalSync::sync`] (an `fdatasync` of
//!   the WAL file) on another thread, and acks only after that. Checkpoints run on their own
//!   connection and thread ([`Checkpointer`]), never inside a commit. This is what the group
//!   node runs: while one batch syncs, the next is applied.
//!
//! Writes happen inside a batch: [`SqliteHost::begin`] ([`GroupStore::begin`]), any number of
//! operations on any groups, then [`SqliteHost::commit`]. The node puts every request it has
//! in hand into one batch and sends the acks after the commit (and the sync): group commit,
//! one fsync for many messages of many groups, without acking anything that is not on disk.
//!
//! # Failure inside a batch
//! When a write fails with an I/O error or a full disk, SQLite may roll back the whole
//! transaction by itself. The store notices (the connection is back in autocommit mode),
//! marks the batch aborted, and refuses every later write of the batch with
//! [`StoreError::Aborted`] instead of letting it run (and commit) on its own; reads go on.
//! The commit then fails, and the cached seq and clock of each group the batch touched are
//! reloaded from the file ([`SqliteHost::load`]; a [`SqliteStore`] does it itself), so the
//! next batch numbers on from what is stored: no seq gap, and nothing answered as failed is
//! stored.
//!
//! # A file system that refuses writes
//! Every connection goes through SQLite's `unix-excl` VFS ([`VFS`]): the WAL index is in
//! heap memory, not in a `-shm` file mapped into memory, so a file made immutable or a file
//! system turned read-only fails a write with an error instead of killing the process with
//! SIGBUS. Such an error, an I/O error and a full disk become [`StoreError::Unwritable`],
//! whose cause is logged once when writes begin to fail and once when a commit succeeds
//! again; the batch is refused as above.
//!
//! # Memory
//! Bounded per host, whatever the number of groups: SQLite's page cache of the writer
//! ([`WRITER_CACHE_KIB`], 16 MiB) and of the checkpointer (SQLite's default, 2 MiB), and
//! [`STATEMENT_CACHE`] (64) prepared statements per connection, shared by every group (the
//! gid is a parameter). A group in memory is its [`LogState`] (about 40 bytes).
//!
//! # Schema (version 7, in `PRAGMA user_version`)
//! One set of tables for every group of the host, a `gid` in every row
//! (`docs/design/group-host.md` §2.1). An idle group costs its `groups` row and its
//! members' rows, a few hundred bytes.
//! - `host_meta(key TEXT PRIMARY KEY, value)`: reserved for the host's own settings.
//! - `groups(gid INTEGER PRIMARY KEY, name, state, owner, mode, last_seq, last_time_us,
//!   created_by, created_at_us, archived_at_us)`: one row per group not removed, gids
//!   never reused (`AUTOINCREMENT`: not even a removed pending group's); `state` `pending`, `live` or `archived`; `owner` and `created_by` principals
//!   (`key:…`), NULL for the host key; `mode` `open` or `private`. A partial unique index
//!   keeps names unique among groups not archived; another indexes `created_by` for the
//!   per-key cap. `last_seq` and `last_time_us` are high-water marks written when retention
//!   deletes rows, so that seq stays gap-free and time monotonic after it.
//! - `messages(k INTEGER PRIMARY KEY, gid, id BLOB, time_us, sender, body, kind, sender_key,
//!   attachment, attachment_sha256)`: the logs, keyed by `k = gid << 40 | seq`, so a group's
//!   log is one range of the table's B-tree; `id` is unique per group (`messages_id(gid,
//!   id)`); `body` the JSON text as sent; `kind` `message`, `join` or `leave`; `sender_key`
//!   the sender's Z85 CURVE key, NULL without CURVE; `attachment` the JSON of the file a
//!   message carries and `attachment_sha256` its digest, with a partial index
//!   `(gid, attachment_sha256)` (what keeps a blob from retention's sweep). No index on
//!   `time_us`: time is strictly increasing with seq, so the first seq at or after a time is
//!   found by a binary search over the key ([`SqliteStore::first_seq_at`]), and each append
//!   updates two B-trees, not three.
//! - `members(gid, principal, user, joined_at_us)`, primary key `(gid, principal)`, `user`
//!   unique per group: who is a member ([`Principal`]) and the name bound to them there.
//! - `grants(gid, principal, kind, at_us)`, primary key `(gid, principal, kind)`: `admin`,
//!   `invite` and `ban` rights and restrictions.
//!
//! A group moves between hosts as a file: [`SqliteHost::export_group`] writes it alone into
//! a new version 7 file (as gid 1), [`SqliteHost::import_group`] copies such a file (or a
//! node of one's, migrated first) in under a new gid.
//!
//! Versions 1 to 6 were one file per group (`meta(key, value)` with the group's name, mode
//! and high-water marks; `messages(seq INTEGER PRIMARY KEY, id UNIQUE, …)`; `members`,
//! `grants` without `gid`). Opening one migrates it in place, in one transaction, to version
//! 7 with the group as gid 1.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::value::RawValue;

use agora_proto::id::MessageId;
use agora_proto::key::PublicKey;
use agora_proto::time::{MonotonicClock, Timestamp};
use agora_proto::wire::{
    Attachment, EntryKind, GroupMode, GroupName, HistoryQuery, Member, Message, SendAck,
    Sha256Digest, UserName,
};

use super::host::{GroupId, GroupRow, GroupState, LogState, NewGroup};
use super::{
    attachment_json, Flush, Grant, GroupLog, GroupStore, NewMessage, Page, Principal, Retention,
    StoreError,
};

const SCHEMA_VERSION: i64 = 7;

/// The writer connection's page cache, in KiB (`PRAGMA cache_size=-16384`): 16 MiB per host,
/// whatever its number of groups. The checkpointer keeps SQLite's default (2 MiB).
pub const WRITER_CACHE_KIB: u32 = 16 * 1024;

/// Prepared statements cached per connection (rusqlite's LRU; its default is 16). Every
/// group shares them: the gid is a parameter.
pub const STATEMENT_CACHE: usize = 64;

/// The bits of a message key `k` that hold the seq: `k = gid << 40 | seq`.
const SEQ_BITS: u32 = 40;
/// The largest seq a group can have.
const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;

/// The first and last message key of group `gid`'s log.
fn key_range(gid: GroupId) -> (i64, i64) {
    let lo = i64::from(gid.0) << SEQ_BITS;
    (lo, lo | MAX_SEQ as i64)
}

/// The message key of `seq` in group `gid` (seqs past [`MAX_SEQ`] are clamped to it).
fn key(gid: GroupId, seq: u64) -> i64 {
    (i64::from(gid.0) << SEQ_BITS) | seq.min(MAX_SEQ) as i64
}

/// The schema of version 7 (see the module docs).
const SCHEMA_V7: &str = "
    CREATE TABLE host_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
    CREATE TABLE groups (
        gid INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT,
        mode TEXT NOT NULL DEFAULT 'open',
        last_seq INTEGER NOT NULL DEFAULT 0,
        last_time_us INTEGER NOT NULL DEFAULT 0,
        created_by TEXT,
        created_at_us INTEGER NOT NULL,
        archived_at_us INTEGER);
    CREATE UNIQUE INDEX groups_name ON groups(name) WHERE state <> 'archived';
    CREATE INDEX groups_creator ON groups(created_by) WHERE state <> 'archived';
    CREATE TABLE messages (
        k INTEGER PRIMARY KEY,
        gid INTEGER NOT NULL,
        id BLOB NOT NULL,
        time_us INTEGER NOT NULL,
        sender TEXT NOT NULL,
        body TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'message',
        sender_key TEXT,
        attachment TEXT,
        attachment_sha256 BLOB);
    CREATE UNIQUE INDEX messages_id ON messages(gid, id);
    CREATE INDEX messages_attachment ON messages(gid, attachment_sha256)
        WHERE attachment_sha256 IS NOT NULL;
    CREATE TABLE members (
        gid INTEGER NOT NULL,
        principal TEXT NOT NULL,
        user TEXT NOT NULL,
        joined_at_us INTEGER NOT NULL,
        PRIMARY KEY (gid, principal)) WITHOUT ROWID;
    CREATE UNIQUE INDEX members_user ON members(gid, user);
    CREATE TABLE grants (
        gid INTEGER NOT NULL,
        principal TEXT NOT NULL,
        kind TEXT NOT NULL,
        at_us INTEGER NOT NULL,
        PRIMARY KEY (gid, principal, kind)) WITHOUT ROWID;
";

/// Takes a version 1–5 file (one group) to version 6, step by step, as earlier builds did.
fn migrate_to_6(conn: &Connection, version: i64) -> Result<(), StoreError> {
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS messages (
             seq INTEGER PRIMARY KEY,
             id BLOB NOT NULL UNIQUE,
             time_us INTEGER NOT NULL,
             sender TEXT NOT NULL,
             body TEXT NOT NULL,
             kind TEXT NOT NULL DEFAULT 'message',
             sender_key TEXT,
             attachment TEXT,
             attachment_sha256 BLOB);
         CREATE TABLE IF NOT EXISTS members (
             principal TEXT PRIMARY KEY,
             user TEXT NOT NULL UNIQUE,
             joined_at_us INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS grants (
             principal TEXT NOT NULL,
             kind TEXT NOT NULL,
             at_us INTEGER NOT NULL,
             PRIMARY KEY (principal, kind)) WITHOUT ROWID;
         COMMIT;",
    )?;
    if version == 1 {
        // Version 1 had no event entries: every row is a chat message.
        conn.execute_batch(
            "ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'message';",
        )?;
    }
    if version == 1 || version == 2 {
        // Before version 3 members were known by name alone, and had no keys.
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE messages ADD COLUMN sender_key TEXT;
             CREATE TABLE members_v3 (
                 principal TEXT PRIMARY KEY,
                 user TEXT NOT NULL UNIQUE,
                 joined_at_us INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO members_v3 SELECT 'name:' || user, user, joined_at_us FROM members;
             DROP TABLE members;
             ALTER TABLE members_v3 RENAME TO members;
             COMMIT;",
        )?;
    }
    if (1..6).contains(&version) {
        conn.execute_batch(
            "ALTER TABLE messages ADD COLUMN attachment TEXT;
             ALTER TABLE messages ADD COLUMN attachment_sha256 BLOB;",
        )?;
    }
    conn.execute_batch(
        "DROP INDEX IF EXISTS messages_time;
         PRAGMA user_version = 6;",
    )?;
    Ok(())
}

/// Refuses a migration the file system has no room for: it copies the log once, in one
/// transaction, so it needs about the file's size (and its WAL's) free.
///
/// # Errors
/// [`StoreError::NoSpace`] (a failing `statvfs` is no error: the migration itself fails on
/// a full disk, leaving the file as it was).
fn check_space_to_migrate(path: &Path) -> Result<(), StoreError> {
    let needed: u64 = [path.to_owned(), wal_path(path)]
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stat = match rustix::fs::statvfs(dir) {
        Ok(stat) => stat,
        Err(e) => {
            // The migration itself fails on a full disk, leaving the file as it was.
            tracing::debug!(error = %e, dir = %dir.display(), "statvfs failed; migrating unchecked");
            return Ok(());
        }
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < needed {
        return Err(StoreError::NoSpace {
            path: path.to_owned(),
            needed,
            free,
        });
    }
    Ok(())
}

/// Takes a version 6 file (one group, named in `meta`, or `fallback` if it is not) to
/// version 7 in one transaction: the group becomes gid 1, its messages are copied under
/// their new keys (the old table's `UNIQUE(id)` goes only with a rebuild), its members and
/// grants get `gid = 1`, `meta` goes. The file needs free space about the log's size
/// meanwhile; a failure leaves it at version 6.
fn migrate_6_to_7(conn: &mut Connection, fallback: Option<&GroupName>) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let name: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'group'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let name = match (name, fallback) {
        (Some(name), _) => name,
        (None, Some(fallback)) => fallback.to_string(),
        (None, None) => {
            return Err(StoreError::Corrupt(
                "a version 6 file names no group (meta 'group')".into(),
            ))
        }
    };
    tracing::info!(group = %name, "migrating the SQLite store to version 7 (one file per host)");
    tx.execute_batch(
        "ALTER TABLE messages RENAME TO messages_v6;
         ALTER TABLE members RENAME TO members_v6;
         ALTER TABLE grants RENAME TO grants_v6;
         DROP INDEX IF EXISTS messages_attachment;",
    )?;
    tx.execute_batch(SCHEMA_V7)?;
    tx.execute(
        "INSERT INTO groups (gid, name, state, mode, last_seq, last_time_us, created_at_us)
         VALUES (1, ?1, 'live',
             COALESCE((SELECT value FROM meta WHERE key = 'mode'), 'open'),
             COALESCE((SELECT value FROM meta WHERE key = 'last_seq'), 0),
             COALESCE((SELECT value FROM meta WHERE key = 'last_time_us'), 0),
             ?2)",
        params![name, Timestamp::now().as_micros()],
    )?;
    tx.execute_batch(
        "INSERT INTO messages (k, gid, id, time_us, sender, body, kind, sender_key, attachment,
             attachment_sha256)
             SELECT (1 << 40) | seq, 1, id, time_us, sender, body, kind, sender_key, attachment,
                 attachment_sha256
             FROM messages_v6 ORDER BY seq;
         INSERT INTO members (gid, principal, user, joined_at_us)
             SELECT 1, principal, user, joined_at_us FROM members_v6;
         INSERT INTO grants (gid, principal, kind, at_us)
             SELECT 1, principal, kind, at_us FROM grants_v6;
         DROP TABLE messages_v6;
         DROP TABLE members_v6;
         DROP TABLE grants_v6;
         DROP TABLE meta;
         PRAGMA user_version = 7;",
    )?;
    tx.commit()?;
    Ok(())
}

/// The database of a host in one SQLite file (see the module docs): the writer connection
/// and the batch's state. Reach a group's rows through [`SqliteHost::group`] (or
/// [`HostDb::group`](super::HostDb::group)) only.
pub struct SqliteHost {
    conn: Connection,
    /// SQLite rolled this batch back after a failed write (see the module docs).
    aborted: bool,
    /// Writes fail for a cause outside SQLite ([`StoreError::Unwritable`]): the cause was
    /// logged when they began to fail, and is not logged again until a commit succeeds.
    unwritable: bool,
    /// `total_changes` at [`SqliteHost::begin`]: a commit that changed no row wrote nothing,
    /// so it does not show that the store can be written again, and needs no sync.
    changes_at_begin: u64,
    /// The last successful commit changed a row ([`SqliteHost::last_commit_wrote`]).
    last_commit_wrote: bool,
    path: std::path::PathBuf,
    durability: Durability,
}

impl std::fmt::Debug for SqliteHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteHost")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl SqliteHost {
    /// Opens or creates the host database at `path` with the given durability, migrating a
    /// one-group file of versions 1–6 to version 7 (its group becomes gid 1).
    ///
    /// With [`Durability::Commit`] the file is opened in SQLite's exclusive locking mode:
    /// this connection holds the file's lock until it closes, so each transaction skips the
    /// per-transaction file locking. With [`Durability::Deferred`] it is shared among this
    /// process's connections (so that a [`Checkpointer`] can open it too); one writer per
    /// file is still the rule, and no other process may open it meanwhile ([`VFS`]).
    ///
    /// # Errors
    /// [`StoreError::SchemaTooNew`]; [`StoreError::Corrupt`] for a version 6 file naming no
    /// group; [`StoreError::Sqlite`] (a busy file waits 5 s, then `database is locked`).
    pub fn open_with(path: &Path, durability: Durability) -> Result<SqliteHost, StoreError> {
        SqliteHost::open_named(path, durability, None)
    }

    /// As [`SqliteHost::open_with`]; `name` names the group of a one-group file whose
    /// `meta` lacks it.
    fn open_named(
        path: &Path,
        durability: Durability,
        name: Option<&GroupName>,
    ) -> Result<SqliteHost, StoreError> {
        let mut conn = connect(path)?;
        if durability == Durability::Commit {
            // Before the first WAL access, so that SQLite never maps the shared-memory index.
            conn.execute_batch("PRAGMA locking_mode=EXCLUSIVE;")?;
        }
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "SQLite did not switch to WAL mode");
        }
        match durability {
            Durability::Commit => conn.execute_batch("PRAGMA synchronous=FULL;")?,
            Durability::Deferred => {
                conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0;")?
            }
        }
        conn.execute_batch(&format!("PRAGMA cache_size=-{WRITER_CACHE_KIB};"))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        // A version 0 file with a `meta` table: an earlier build stopped between making its
        // tables and writing their version.
        let legacy = (1..=6).contains(&version)
            || (version == 0
                && conn
                    .prepare("SELECT 1 FROM sqlite_schema WHERE name = 'meta'")?
                    .exists([])?);
        if legacy {
            check_space_to_migrate(path)?;
            if version < 6 {
                migrate_to_6(&conn, version)?;
            }
            migrate_6_to_7(&mut conn, name)?;
        } else if version == 0 {
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA_V7} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))?;
        }
        Ok(SqliteHost {
            conn,
            aborted: false,
            unwritable: false,
            changes_at_begin: 0,
            last_commit_wrote: false,
            path: path.to_owned(),
            durability,
        })
    }

    /// How commits of this store become durable.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The view of the group `state` belongs to, for this batch.
    pub fn group<'a>(&'a mut self, state: &'a mut LogState) -> SqliteGroup<'a> {
        SqliteGroup::new(self, state)
    }

    /// Zero-fills the WAL file up to `bytes` (a no-op if it is already that long), then
    /// `fdatasync`s it; returns the bytes added. Call it before the first write of a
    /// [`Durability::Deferred`] store, while nothing else writes.
    ///
    /// Why: an `fdatasync` after an append that grows a file must also commit the file's new
    /// size and blocks through the filesystem journal; one after an overwrite of blocks already
    /// written need not. On ext4 that made each WAL sync 1.5–2× slower (measured: 8 KiB
    /// `pwrite` + `fdatasync`, 324–374 µs growing against 181–216 µs overwriting). SQLite
    /// writes the WAL from the start again after a complete checkpoint, so a file already as
    /// long as the WAL gets is overwritten, never grown. Zeros (not `fallocate`, whose
    /// unwritten extents cost the same journal commit at first write) follow PostgreSQL's
    /// `wal_init_zero`. SQLite ignores the zeros: WAL recovery stops at the first frame whose
    /// salt does not match the header's, as it does for a previous generation's frames.
    ///
    /// # Errors
    /// The I/O error (a full disk, say). The file is then cut back to its old length, so a
    /// failed preallocation leaves nothing behind.
    pub fn preallocate_wal(&self, bytes: u64) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let wal = wal_path(&self.path);
        let file = std::fs::OpenOptions::new().write(true).open(&wal)?;
        let old = file.metadata()?.len();
        if old >= bytes {
            return Ok(0);
        }
        let zeros = vec![0u8; 1 << 20];
        let filled = (|| {
            let mut at = old;
            while at < bytes {
                let n = usize::try_from((bytes - at).min(zeros.len() as u64)).unwrap_or(0);
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            file.sync_data()
        })();
        match filled {
            Ok(()) => Ok(bytes - old),
            Err(e) => {
                let _ = file.set_len(old);
                Err(e)
            }
        }
    }

    /// A handle that makes this store's committed transactions durable from another thread
    /// (for [`Durability::Deferred`]).
    pub fn wal_sync(&self) -> WalSync {
        WalSync {
            wal: wal_path(&self.path),
            file: std::sync::OnceLock::new(),
        }
    }

    /// A second connection to this store's file, for checkpoints on another thread (page
    /// cache: SQLite's default, 2 MiB).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] if the file cannot be opened.
    pub fn checkpointer(&self) -> Result<Checkpointer, StoreError> {
        let conn = connect(&self.path)?;
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0;")?;
        Ok(Checkpointer {
            conn,
            wal: wal_path(&self.path),
        })
    }

    /// Starts a write batch (`BEGIN IMMEDIATE`).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Unwritable`].
    pub fn begin(&mut self) -> Result<(), StoreError> {
        self.aborted = false;
        self.changes_at_begin = self.conn.total_changes();
        let begun = (|| -> Result<(), StoreError> {
            self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            Ok(())
        })();
        begun.map_err(|e| self.write_failed(e))
    }

    /// Commits the batch. On error it is rolled back, the connection is usable again, and
    /// the caller reloads the [`LogState`] of every group the batch touched
    /// ([`SqliteHost::load`]).
    ///
    /// # Errors
    /// [`StoreError::Aborted`], [`StoreError::Unwritable`], [`StoreError::Sqlite`].
    pub fn commit(&mut self) -> Result<(), StoreError> {
        let result = (|| -> Result<(), StoreError> {
            if self.aborted {
                return Err(StoreError::Aborted);
            }
            self.conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        })();
        if let Err(e) = result {
            // Leave the connection usable.
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            self.aborted = false;
            return Err(self.write_failed(e));
        }
        self.last_commit_wrote = self.conn.total_changes() > self.changes_at_begin;
        if self.last_commit_wrote {
            self.write_succeeded();
        }
        Ok(())
    }

    /// Whether the last successful commit changed a row (see
    /// [`GroupStore::last_commit_wrote`]).
    pub fn last_commit_wrote(&self) -> bool {
        self.last_commit_wrote
    }

    /// What makes a committed batch durable: nothing for [`Durability::Commit`], the WAL's
    /// `fdatasync` ([`WalSync`]) for [`Durability::Deferred`].
    pub fn flusher(&self) -> Box<dyn Flush> {
        match self.durability {
            Durability::Commit => Box::new(super::Durable),
            Durability::Deferred => Box::new(self.wal_sync()),
        }
    }

    /// A [`Checkpointer`] for [`Durability::Deferred`], `None` for [`Durability::Commit`].
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] if its connection cannot open.
    pub fn checkpoints(&self) -> Result<Option<Checkpointer>, StoreError> {
        match self.durability {
            Durability::Commit => Ok(None),
            Durability::Deferred => self.checkpointer().map(Some),
        }
    }

    /// The bytes of the database file and its WAL.
    pub fn stored_bytes(&self) -> u64 {
        [self.path.clone(), wal_path(&self.path)]
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }

    /// The live groups by gid, with their member counts (two queries).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn live_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        let mut counts = std::collections::HashMap::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT gid, COUNT(*) FROM members GROUP BY gid")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                counts.insert(row.get::<_, i64>(0)?, row.get::<_, i64>(1)?);
            }
        }
        let mut stmt = self.conn.prepare(
            "SELECT gid, name, owner, mode, state, created_by FROM groups
             WHERE state = 'live' ORDER BY gid",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let gid: i64 = row.get(0)?;
            let name: String = row.get(1)?;
            let state: String = row.get(4)?;
            out.push(GroupRow {
                gid: GroupId(
                    u32::try_from(gid).map_err(|_| StoreError::Corrupt(format!("gid {gid}")))?,
                ),
                name: GroupName::new(name)
                    .map_err(|e| StoreError::Corrupt(format!("group {gid}: {e}")))?,
                owner: row.get::<_, Option<String>>(2)?.map(Principal::from_stored),
                mode: parse_mode(row.get::<_, Option<String>>(3)?.as_deref()),
                state: GroupState::from_stored(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("group {gid}: state {state:?}")))?,
                created_by: row.get::<_, Option<String>>(5)?.map(Principal::from_stored),
                members: counts
                    .get(&gid)
                    .and_then(|n| u64::try_from(*n).ok())
                    .unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// The gid and state of the group named `name` that is not archived, if any.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn find_group(
        &self,
        name: &GroupName,
    ) -> Result<Option<(GroupId, GroupState)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT gid, state FROM groups WHERE name = ?1 AND state <> 'archived'",
        )?;
        let found: Option<(i64, String)> = stmt
            .query_row([name.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        found
            .map(|(gid, state)| {
                Ok((
                    GroupId(
                        u32::try_from(gid)
                            .map_err(|_| StoreError::Corrupt(format!("gid {gid}")))?,
                    ),
                    GroupState::from_stored(&state).ok_or_else(|| {
                        StoreError::Corrupt(format!("group {gid}: state {state:?}"))
                    })?,
                ))
            })
            .transpose()
    }

    /// Deletes the pending groups and their rows, in a transaction of its own; returns how
    /// many. Call it at start, outside a batch.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn remove_pending_groups(&mut self) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let gids: Vec<i64> = {
            let mut stmt = tx.prepare("SELECT gid FROM groups WHERE state = 'pending'")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for &gid in &gids {
            let (lo, hi) = key_range(GroupId(u32::try_from(gid).unwrap_or(u32::MAX)));
            tx.execute("DELETE FROM messages WHERE k BETWEEN ?1 AND ?2", [lo, hi])?;
            tx.execute("DELETE FROM members WHERE gid = ?1", [gid])?;
            tx.execute("DELETE FROM grants WHERE gid = ?1", [gid])?;
            tx.execute("DELETE FROM groups WHERE gid = ?1", [gid])?;
        }
        tx.commit()?;
        Ok(gids.len() as u64)
    }

    /// How many groups not archived `created_by` created, and how many the host has in all.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn group_counts(&self, created_by: &Principal) -> Result<(u64, u64), StoreError> {
        let mut by = self.conn.prepare_cached(
            "SELECT COUNT(*) FROM groups WHERE created_by = ?1 AND state <> 'archived'",
        )?;
        let mine: i64 = by.query_row([created_by.as_str()], |r| r.get(0))?;
        let mut all = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM groups WHERE state <> 'archived'")?;
        let total: i64 = all.query_row([], |r| r.get(0))?;
        Ok((
            u64::try_from(mine).unwrap_or(0),
            u64::try_from(total).unwrap_or(0),
        ))
    }

    /// Inserts a group in the open batch; returns its gid (one more than the highest ever,
    /// removed pending groups included).
    ///
    /// # Errors
    /// [`StoreError::NameTaken`], [`StoreError::Aborted`], [`StoreError::Sqlite`].
    pub fn insert_group(&mut self, g: NewGroup<'_>) -> Result<GroupId, StoreError> {
        self.write(|h| {
            if h.find_group(g.name)?.is_some() {
                return Err(StoreError::NameTaken(g.name.to_string()));
            }
            h.conn
                .prepare_cached(
                    "INSERT INTO groups (name, state, owner, mode, created_by, created_at_us)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    g.name.as_str(),
                    g.state.as_str(),
                    g.owner.map(Principal::as_str),
                    g.mode.as_str(),
                    g.created_by.map(Principal::as_str),
                    g.at.as_micros(),
                ])?;
            let rowid = h.conn.last_insert_rowid();
            // Keys hold the gid in 23 bits (`gid << 40` in an i64).
            let gid = u32::try_from(rowid)
                .ok()
                .filter(|g| *g < 1 << 23)
                .ok_or_else(|| StoreError::Corrupt(format!("no gid left (at {rowid})")))?;
            Ok(GroupId(gid))
        })
    }

    /// Sets a group's state in the open batch; archiving records `at`.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if there is no such group; [`StoreError::NameTaken`] if it is
    /// made pending or live while another group has its name; [`StoreError::Aborted`],
    /// [`StoreError::Sqlite`].
    pub fn set_group_state(
        &mut self,
        gid: GroupId,
        state: GroupState,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(|h| {
            let changed = h
                .conn
                .prepare_cached(
                    "UPDATE groups SET state = ?2,
                         archived_at_us = CASE WHEN ?2 = 'archived' THEN ?3 ELSE NULL END
                     WHERE gid = ?1",
                )?
                .execute(params![i64::from(gid.0), state.as_str(), at.as_micros()]);
            match changed {
                Ok(0) => Err(StoreError::Corrupt(format!("no group {gid}"))),
                Ok(_) => Ok(()),
                Err(e)
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) =>
                {
                    let name: String = h.conn.query_row(
                        "SELECT name FROM groups WHERE gid = ?1",
                        [i64::from(gid.0)],
                        |r| r.get(0),
                    )?;
                    Err(StoreError::NameTaken(name))
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Reads group `gid`'s [`LogState`]: its stored high-water marks, its newest message (one
    /// descent of the messages B-tree) and its member count.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if there is no such group; [`StoreError::Sqlite`].
    pub fn load(&self, gid: GroupId) -> Result<LogState, StoreError> {
        let marks: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT last_seq, last_time_us FROM groups WHERE gid = ?1")?
            .query_row([i64::from(gid.0)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((stored_seq, stored_time)) = marks else {
            return Err(StoreError::Corrupt(format!("no group {gid}")));
        };
        let (lo, hi) = key_range(gid);
        let newest: Option<(i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT k & 0xFFFFFFFFFF, time_us FROM messages WHERE k BETWEEN ?1 AND ?2
                 ORDER BY k DESC LIMIT 1",
            )?
            .query_row([lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (max_seq, max_time) = newest.unwrap_or((0, 0));
        let members: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM members WHERE gid = ?1")?
            .query_row([i64::from(gid.0)], |r| r.get(0))?;
        Ok(LogState {
            gid,
            last_seq: u64::try_from(stored_seq.max(max_seq)).unwrap_or(0),
            clock: MonotonicClock::after(Timestamp::from_micros(stored_time.max(max_time))),
            member_count: u64::try_from(members).unwrap_or(0),
        })
    }

    /// Copies the one group of the store file at `from` into this host under a new gid, in
    /// one transaction of its own (call it outside a batch, with the host not serving):
    /// its log (seqs, ids, times kept), members, grants, mode, owner and high-water marks.
    /// `from` is first migrated to version 7 if it is older (a node of one's
    /// `group.sqlite3`); it must hold exactly one group that is not archived. Its blobs are
    /// files, for the caller to move (`docs/design/group-host.md` §2.2).
    ///
    /// # Errors
    /// [`StoreError::NameTaken`] if a pending or live group here has its name (nothing is
    /// copied); [`StoreError::Corrupt`] if `from` does not hold exactly one such group;
    /// [`StoreError::SchemaTooNew`], [`StoreError::NoSpace`] from its migration;
    /// [`StoreError::Sqlite`].
    pub fn import_group(&mut self, from: &Path) -> Result<(GroupId, GroupName), StoreError> {
        drop(SqliteHost::open_with(from, Durability::Commit)?);
        self.conn.execute(
            "ATTACH DATABASE ?1 AS src",
            [from.to_string_lossy().as_ref()],
        )?;
        let copied = self.copy_group_from_src();
        let detached = self.conn.execute_batch("DETACH DATABASE src");
        let copied = copied?;
        detached?;
        Ok(copied)
    }

    /// The transaction of [`SqliteHost::import_group`], `src` attached.
    fn copy_group_from_src(&mut self) -> Result<(GroupId, GroupName), StoreError> {
        let tx = self.conn.transaction()?;
        let found: Vec<(i64, String)> = {
            let mut stmt =
                tx.prepare("SELECT gid, name FROM src.groups WHERE state <> 'archived'")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let [(src_gid, name)] = found.as_slice() else {
            return Err(StoreError::Corrupt(format!(
                "an imported file must hold one group, not {}",
                found.len()
            )));
        };
        let taken = tx
            .prepare("SELECT 1 FROM groups WHERE name = ?1 AND state <> 'archived'")?
            .exists([name])?;
        if taken {
            return Err(StoreError::NameTaken(name.clone()));
        }
        tx.execute(
            "INSERT INTO groups (name, state, owner, mode, last_seq, last_time_us, created_by,
                 created_at_us)
             SELECT name, 'live', owner, mode, last_seq, last_time_us, created_by, created_at_us
             FROM src.groups WHERE gid = ?1",
            [src_gid],
        )?;
        let gid = tx.last_insert_rowid();
        let gid = u32::try_from(gid)
            .ok()
            .filter(|g| *g < 1 << 23)
            .ok_or_else(|| StoreError::Corrupt(format!("no gid left (at {gid})")))?;
        let (lo, hi) = key_range(GroupId(u32::try_from(*src_gid).unwrap_or(u32::MAX)));
        tx.execute(
            "INSERT INTO messages (k, gid, id, time_us, sender, body, kind, sender_key,
                 attachment, attachment_sha256)
             SELECT (?1 << 40) | (k & 0xFFFFFFFFFF), ?1, id, time_us, sender, body, kind,
                 sender_key, attachment, attachment_sha256
             FROM src.messages WHERE k BETWEEN ?2 AND ?3 ORDER BY k",
            params![i64::from(gid), lo, hi],
        )?;
        tx.execute(
            "INSERT INTO members (gid, principal, user, joined_at_us)
             SELECT ?1, principal, user, joined_at_us FROM src.members WHERE gid = ?2",
            params![i64::from(gid), src_gid],
        )?;
        tx.execute(
            "INSERT INTO grants (gid, principal, kind, at_us)
             SELECT ?1, principal, kind, at_us FROM src.grants WHERE gid = ?2",
            params![i64::from(gid), src_gid],
        )?;
        tx.commit()?;
        let name = GroupName::new(name.clone())
            .map_err(|e| StoreError::Corrupt(format!("group {src_gid}: {e}")))?;
        Ok((GroupId(gid), name))
    }

    /// Writes group `gid` alone into a new store file at `to` (version 7, the group as gid
    /// 1, live), for [`SqliteHost::import_group`] on another host or a node of one. Call it
    /// outside a batch. The group stays here as it is.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if there is no such group or `to` already holds one;
    /// [`StoreError::Sqlite`].
    pub fn export_group(&mut self, gid: GroupId, to: &Path) -> Result<(), StoreError> {
        drop(SqliteHost::open_with(to, Durability::Commit)?);
        self.conn
            .execute("ATTACH DATABASE ?1 AS dst", [to.to_string_lossy().as_ref()])?;
        let copied = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction()?;
            let held: i64 = tx.query_row("SELECT COUNT(*) FROM dst.groups", [], |r| r.get(0))?;
            if held > 0 {
                return Err(StoreError::Corrupt(format!(
                    "{} holds a group already",
                    to.display()
                )));
            }
            let g = i64::from(gid.0);
            let copied = tx.execute(
                "INSERT INTO dst.groups (gid, name, state, owner, mode, last_seq, last_time_us,
                     created_by, created_at_us)
                 SELECT 1, name, 'live', owner, mode, last_seq, last_time_us, created_by,
                     created_at_us
                 FROM groups WHERE gid = ?1",
                [g],
            )?;
            if copied == 0 {
                return Err(StoreError::Corrupt(format!("no group {gid}")));
            }
            let (lo, hi) = key_range(gid);
            tx.execute(
                "INSERT INTO dst.messages (k, gid, id, time_us, sender, body, kind, sender_key,
                     attachment, attachment_sha256)
                 SELECT (1 << 40) | (k & 0xFFFFFFFFFF), 1, id, time_us, sender, body, kind,
                     sender_key, attachment, attachment_sha256
                 FROM messages WHERE k BETWEEN ?1 AND ?2 ORDER BY k",
                [lo, hi],
            )?;
            tx.execute(
                "INSERT INTO dst.members (gid, principal, user, joined_at_us)
                 SELECT 1, principal, user, joined_at_us FROM members WHERE gid = ?1",
                [g],
            )?;
            tx.execute(
                "INSERT INTO dst.grants (gid, principal, kind, at_us)
                 SELECT 1, principal, kind, at_us FROM grants WHERE gid = ?1",
                [g],
            )?;
            tx.commit()?;
            Ok(())
        })();
        let detached = self.conn.execute_batch("DETACH DATABASE dst");
        copied?;
        detached?;
        Ok(())
    }

    /// Sets group `gid`'s owner (`None`: the host key), in a transaction of its own: call it
    /// outside a batch, with the host not serving. For `group-node host import --owner`: a
    /// node of one keeps its owner in its `--owner` flag, not in its file, so an imported
    /// group's owner is the host key unless the operator says whose it was.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if there is no such group; [`StoreError::Sqlite`].
    pub fn set_group_owner(
        &mut self,
        gid: GroupId,
        owner: Option<&Principal>,
    ) -> Result<(), StoreError> {
        let changed = self.conn.execute(
            "UPDATE groups SET owner = ?2 WHERE gid = ?1",
            params![i64::from(gid.0), owner.map(Principal::as_str)],
        )?;
        if changed == 0 {
            return Err(StoreError::Corrupt(format!("no group {gid}")));
        }
        Ok(())
    }

    /// Runs `write` unless the batch is already aborted; if it fails and SQLite has rolled
    /// the transaction back (autocommit is on again), marks the batch aborted.
    fn write<T>(
        &mut self,
        write: impl FnOnce(&mut SqliteHost) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.aborted {
            return Err(StoreError::Aborted);
        }
        let result = write(self);
        if result.is_err() && self.conn.is_autocommit() {
            // The failure itself is logged (by the caller, or once by `write_failed`).
            tracing::debug!("SQLite rolled the batch back; its later writes are refused");
            self.aborted = true;
        }
        result.map_err(|e| self.write_failed(e))
    }

    /// What a failed write returns: an error of the file system under the store (an I/O
    /// error, a full disk, a file or file system that refuses writes) becomes
    /// [`StoreError::Unwritable`], and its cause is logged here, once, when writes begin to
    /// fail (and a line when they work again, [`SqliteHost::write_succeeded`]); any other
    /// error is returned as it is.
    fn write_failed(&mut self, e: StoreError) -> StoreError {
        let StoreError::Sqlite(source) = e else {
            return e;
        };
        if !refused_by_file_system(&source) {
            return StoreError::Sqlite(source);
        }
        if self.unwritable {
            tracing::debug!(error = %source, "the store still cannot be written");
        } else {
            self.unwritable = true;
            // SQLite's message says "disk I/O error"; the file system's own answer names
            // the cause (immutable: "Operation not permitted"; read-only: "Read-only file
            // system"). Only the WAL is opened to ask: closing a descriptor of the database
            // file would drop this process's lock on it (POSIX locks are per process).
            let wal = wal_path(&self.path);
            let cause = match std::fs::OpenOptions::new().append(true).open(&wal) {
                Err(e) => format!("{source}; opening {} for writing: {e}", wal.display()),
                Ok(_) => source.to_string(),
            };
            tracing::error!(
                error = %cause,
                store = %self.path.display(),
                "the store cannot be written: writes are answered internal and nothing of \
                 them is stored until it can; reads go on"
            );
        }
        StoreError::Unwritable(source)
    }

    /// Notes a commit that wrote: logs once that writes work again after they failed.
    fn write_succeeded(&mut self) {
        if self.unwritable {
            self.unwritable = false;
            tracing::info!(store = %self.path.display(), "the store can be written again");
        }
    }

    /// The first stored seq of group `gid` whose time is at or after `time_us`, `None` if
    /// every stored entry is older. A binary search over the key (time is strictly
    /// increasing with seq, PROTOCOL.md §5): about log2(entries) point reads, no index on
    /// time.
    fn first_seq_at(&self, st: &LogState, time_us: i64) -> Result<Option<i64>, StoreError> {
        let (_, hi_key) = key_range(st.gid);
        // The entry at the first seq >= `seq`, as (seq, time_us).
        let mut at = self.conn.prepare_cached(
            "SELECT k & 0xFFFFFFFFFF, time_us FROM messages WHERE k >= ?1 AND k <= ?2
             ORDER BY k LIMIT 1",
        )?;
        let mut entry = |seq: i64| -> Result<Option<(i64, i64)>, StoreError> {
            let k = key(st.gid, u64::try_from(seq).unwrap_or(0));
            Ok(at
                .query_row([k, hi_key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?)
        };
        let Some((first, first_time)) = entry(0)? else {
            return Ok(None);
        };
        if first_time >= time_us {
            return Ok(Some(first));
        }
        // Invariant: the entry at `lo` is older than `time_us`; the answer is above `lo`
        // and at most `hi` (past the last seq: none).
        let (mut lo, mut hi) = (first, i64::try_from(st.last_seq).unwrap_or(i64::MAX) + 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match entry(mid)? {
                Some((seq, t)) if t < time_us => lo = seq,
                _ => hi = mid,
            }
        }
        Ok(entry(hi)?.map(|(seq, _)| seq))
    }

    fn row_to_message(row: &rusqlite::Row<'_>) -> Result<Message, StoreError> {
        let seq: i64 = row.get(0)?;
        let id: Vec<u8> = row.get(1)?;
        let time_us: i64 = row.get(2)?;
        let sender: String = row.get(3)?;
        let body: String = row.get(4)?;
        let kind: String = row.get(5)?;
        let kind = EntryKind::from_name(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("seq {seq}: kind {kind:?}")))?;
        let sender_key: Option<String> = row.get(6)?;
        let sender_key = sender_key
            .map(|k| k.parse::<PublicKey>())
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("seq {seq}: sender_key: {e}")))?;
        let id: [u8; 16] = id
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("seq {seq}: id is not 16 bytes")))?;
        let attachment: Option<String> = row.get(7)?;
        let attachment = attachment
            .map(|json| serde_json::from_str::<Attachment>(&json))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("seq {seq}: attachment: {e}")))?;
        Ok(Message {
            seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("seq {seq}")))?,
            id: MessageId::from_bytes(id),
            time: Timestamp::from_micros(time_us),
            sender: UserName::new(sender)
                .map_err(|e| StoreError::Corrupt(format!("seq {seq}: {e}")))?,
            kind,
            body: RawValue::from_string(body)
                .map_err(|e| StoreError::Corrupt(format!("seq {seq}: body: {e}")))?,
            sender_key,
            attachment,
        })
    }

    /// A page of `sql`, whose `?1`, `?2` are a key range and `?3` the row limit.
    fn select_page(
        &self,
        sql: &str,
        range: (i64, i64),
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![range.0, range.1, i64::from(limit) + 1])?;
        let mut messages = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        while let Some(row) = rows.next()? {
            if messages.len() as u64 >= u64::from(limit)
                || (bytes >= max_bytes && !messages.is_empty())
            {
                more = true;
                break;
            }
            let m = Self::row_to_message(row)?;
            bytes += m.body.get().len();
            messages.push(m);
        }
        Ok(Page { messages, more })
    }
}

/// A group's mode as stored (`private`; anything else is open).
fn parse_mode(stored: Option<&str>) -> GroupMode {
    match stored {
        Some("private") => GroupMode::Private,
        _ => GroupMode::Open,
    }
}

/// One group's rows in a [`SqliteHost`], for one batch ([`GroupLog`]): every statement
/// names the group's gid, so a view never reads nor writes another group's rows.
pub struct SqliteGroup<'a> {
    host: &'a mut SqliteHost,
    state: &'a mut LogState,
}

impl std::fmt::Debug for SqliteGroup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteGroup")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<'a> SqliteGroup<'a> {
    /// The view of `state`'s group in `host`.
    pub fn new(host: &'a mut SqliteHost, state: &'a mut LogState) -> SqliteGroup<'a> {
        SqliteGroup { host, state }
    }
}

/// [`GroupStore`] for a node of one group: a [`SqliteHost`] serving gid 1, with its
/// [`LogState`].
pub struct SqliteStore {
    host: SqliteHost,
    state: LogState,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("last_seq", &self.state.last_seq)
            .field("member_count", &self.state.member_count)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens or creates the store of `group` at `path` (WAL, `synchronous=FULL`), in
    /// SQLite's exclusive locking mode (see [`SqliteHost::open_with`]). One process per
    /// store: a second opener waits the busy timeout (5 s) and then fails with `database is
    /// locked`.
    ///
    /// # Errors
    /// [`StoreError::WrongGroup`] if the file's gid 1 is another group,
    /// [`StoreError::SchemaTooNew`], [`StoreError::Sqlite`].
    pub fn open(path: &Path, group: &GroupName) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, group, Durability::Commit)
    }

    /// Opens or creates the store of `group` at `path` with the given durability: the host
    /// database with `group` as gid 1 (made if the file has no group yet; a file of versions
    /// 1–6 is migrated, its group becoming gid 1).
    ///
    /// # Errors
    /// As [`SqliteStore::open`].
    pub fn open_with(
        path: &Path,
        group: &GroupName,
        durability: Durability,
    ) -> Result<SqliteStore, StoreError> {
        let host = SqliteHost::open_named(path, durability, Some(group))?;
        let found: Option<String> = host
            .conn
            .query_row("SELECT name FROM groups WHERE gid = 1", [], |r| r.get(0))
            .optional()?;
        match found {
            Some(found) if found != group.as_str() => {
                return Err(StoreError::WrongGroup {
                    expected: group.to_string(),
                    found,
                })
            }
            Some(_) => {}
            None => {
                host.conn.execute(
                    "INSERT INTO groups (gid, name, state, mode, created_at_us)
                     VALUES (1, ?1, 'live', 'open', ?2)",
                    params![group.as_str(), Timestamp::now().as_micros()],
                )?;
            }
        }
        let state = host.load(GroupId::ONE)?;
        Ok(SqliteStore { host, state })
    }

    /// The host database and gid 1's state, for a caller that serves the file as a host.
    pub fn into_parts(self) -> (SqliteHost, LogState) {
        (self.host, self.state)
    }

    /// The host database under this store.
    pub fn host(&self) -> &SqliteHost {
        &self.host
    }

    /// How commits of this store become durable.
    pub fn durability(&self) -> Durability {
        self.host.durability
    }

    /// See [`SqliteHost::preallocate_wal`].
    ///
    /// # Errors
    /// The I/O error; the file is cut back to its old length.
    pub fn preallocate_wal(&self, bytes: u64) -> std::io::Result<u64> {
        self.host.preallocate_wal(bytes)
    }

    /// A handle that makes this store's committed transactions durable from another thread
    /// (for [`Durability::Deferred`]).
    pub fn wal_sync(&self) -> WalSync {
        self.host.wal_sync()
    }

    /// A second connection to this store's file, for checkpoints on another thread.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] if the file cannot be opened.
    pub fn checkpointer(&self) -> Result<Checkpointer, StoreError> {
        self.host.checkpointer()
    }

    /// The first stored seq whose time is at or after `time_us`, `None` if every stored
    /// entry is older (a binary search over the key, no index on time).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn first_seq_at(&self, time_us: i64) -> Result<Option<i64>, StoreError> {
        self.host.first_seq_at(&self.state, time_us)
    }

    fn view(&mut self) -> SqliteGroup<'_> {
        SqliteGroup::new(&mut self.host, &mut self.state)
    }

    /// A read-only view: reads need no `&mut`, and never change the state.
    fn read(&self) -> GroupRead<'_> {
        GroupRead {
            host: &self.host,
            state: &self.state,
        }
    }
}

/// The read half of a group's view, shared by [`SqliteGroup`] and [`SqliteStore`].
struct GroupRead<'a> {
    host: &'a SqliteHost,
    state: &'a LogState,
}

const SELECT: &str = "SELECT k & 0xFFFFFFFFFF, id, time_us, sender, body, kind, sender_key,
    attachment FROM messages";

impl GroupRead<'_> {
    fn gid(&self) -> i64 {
        i64::from(self.state.gid.0)
    }

    fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        let mut stmt = self
            .host
            .conn
            .prepare_cached("SELECT user FROM members WHERE gid = ?1 AND principal = ?2")?;
        let user: Option<String> = stmt
            .query_row(params![self.gid(), who.as_str()], |r| r.get(0))
            .optional()?;
        user.map(|u| UserName::new(u).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError> {
        let mut stmt = self
            .host
            .conn
            .prepare_cached("SELECT principal FROM members WHERE gid = ?1 AND user = ?2")?;
        Ok(stmt
            .query_row(params![self.gid(), user.as_str()], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .map(Principal::from_stored))
    }

    fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        let mut stmt = self.host.conn.prepare_cached(
            "SELECT 1 FROM grants WHERE gid = ?1 AND principal = ?2 AND kind = ?3",
        )?;
        Ok(stmt.exists(params![self.gid(), who.as_str(), grant.as_str()])?)
    }

    fn mode(&self) -> Result<GroupMode, StoreError> {
        let mut stmt = self
            .host
            .conn
            .prepare_cached("SELECT mode FROM groups WHERE gid = ?1")?;
        let mode: Option<String> = stmt.query_row([self.gid()], |r| r.get(0)).optional()?;
        Ok(parse_mode(mode.as_deref()))
    }

    fn members(&self) -> Result<Vec<Member>, StoreError> {
        let mut stmt = self.host.conn.prepare_cached(
            "SELECT user, joined_at_us, principal FROM members WHERE gid = ?1 ORDER BY user",
        )?;
        let mut rows = stmt.query([self.gid()])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let user: String = row.get(0)?;
            let principal: String = row.get(2)?;
            out.push(Member {
                user: UserName::new(user).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                joined_at: Timestamp::from_micros(row.get(1)?),
                key: Principal::from_stored(principal).public_key(),
            });
        }
        Ok(out)
    }

    fn stored_ack(
        &self,
        id: MessageId,
        sender: &UserName,
        body: &RawValue,
        attachment: Option<&str>,
    ) -> Result<Option<SendAck>, StoreError> {
        let mut stmt = self.host.conn.prepare_cached(
            "SELECT k & 0xFFFFFFFFFF, time_us, sender, body, attachment FROM messages
             WHERE gid = ?1 AND id = ?2",
        )?;
        let found = stmt
            .query_row(params![self.gid(), id.as_bytes().as_slice()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .optional()?;
        let Some((seq, time_us, stored_sender, stored_body, stored_attachment)) = found else {
            return Ok(None);
        };
        if stored_sender != sender.as_str()
            || stored_body != body.get()
            || stored_attachment.as_deref() != attachment
        {
            return Err(StoreError::IdConflict(id));
        }
        Ok(Some(SendAck {
            seq: u64::try_from(seq).unwrap_or(0),
            id,
            time: Timestamp::from_micros(time_us),
            duplicate: true,
        }))
    }

    fn references(&self, digest: &Sha256Digest) -> Result<bool, StoreError> {
        let mut stmt = self
            .host
            .conn
            .prepare_cached("SELECT 1 FROM messages WHERE gid = ?1 AND attachment_sha256 = ?2")?;
        Ok(stmt.exists(params![self.gid(), digest.as_bytes().as_slice()])?)
    }

    fn page(&self, query: HistoryQuery, limit: u32, max_bytes: usize) -> Result<Page, StoreError> {
        let gid = self.state.gid;
        let (_, hi) = key_range(gid);
        let after = |seq: u64| (key(gid, seq), hi);
        let empty = Page {
            messages: Vec::new(),
            more: false,
        };
        match query {
            HistoryQuery::AfterSeq(seq) => self.host.select_page(
                &format!("{SELECT} WHERE k > ?1 AND k <= ?2 ORDER BY k LIMIT ?3"),
                after(seq),
                limit,
                max_bytes,
            ),
            HistoryQuery::Since(t) => {
                // Time is monotonic in seq, so "since T" is "after the seq before T".
                match self.host.first_seq_at(self.state, t.as_micros())? {
                    Some(first) => self.host.select_page(
                        &format!("{SELECT} WHERE k > ?1 AND k <= ?2 ORDER BY k LIMIT ?3"),
                        after(u64::try_from(first - 1).unwrap_or(0)),
                        limit,
                        max_bytes,
                    ),
                    None => Ok(empty),
                }
            }
            HistoryQuery::ById(id) => {
                let mut stmt = self
                    .host
                    .conn
                    .prepare_cached(&format!("{SELECT} WHERE gid = ?1 AND id = ?2"))?;
                let mut rows = stmt.query(params![self.gid(), id.as_bytes().as_slice()])?;
                let mut messages = Vec::new();
                if let Some(row) = rows.next()? {
                    messages.push(SqliteHost::row_to_message(row)?);
                }
                Ok(Page {
                    messages,
                    more: false,
                })
            }
            HistoryQuery::Latest(n) => {
                // `limit` does not apply: `latest` is its own bound. `more` is true only when
                // the byte cap cut the page, and then the omitted messages are the older ones.
                let _ = limit;
                // Newest first straight off the key (no temporary table), cut at n.
                let mut page = self.host.select_page(
                    // `?3` is n + 1 (the extra row that tells `more`): take n.
                    &format!("{SELECT} WHERE k >= ?1 AND k <= ?2 ORDER BY k DESC LIMIT ?3 - 1"),
                    key_range(gid),
                    n,
                    max_bytes,
                )?;
                page.messages.reverse();
                Ok(page)
            }
        }
    }
}

/// When a commit is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`, exclusive locking: [`GroupStore::commit`] returns after the WAL is
    /// fsynced. SQLite checkpoints inside the commit that crosses 1000 WAL pages. The default.
    #[default]
    Commit,
    /// `synchronous=NORMAL`, automatic checkpoints off, shared locking: a commit returns once
    /// the WAL is written (not synced). The caller must [`WalSync::sync`] before acking, and
    /// run a [`Checkpointer`] so that the WAL is copied back and reused.
    Deferred,
}

/// The SQLite VFS of every connection to a store: `unix-excl`.
///
/// Why: SQLite's default VFS keeps the WAL index in the `-shm` file, mapped into memory and
/// shared between processes. When the kernel will not let that file be written (made
/// immutable, or on a file system that turned read-only after an error), a write to a mapped
/// page is not an error SQLite can return but SIGBUS, which killed the node with no log line
/// (issue 23). With `unix-excl` the process holds an exclusive lock on the database file
/// and the WAL index lives in heap memory, shared by this process's connections (the
/// writer and the [`Checkpointer`]), so no file is mapped and every failed write is an
/// error. No other process can open the store meanwhile; the node's data-directory lock
/// already rules one out. No `-shm` file is made.
pub const VFS: &str = "unix-excl";

/// Opens a connection to the store at `path` through [`VFS`], with a 5 s busy timeout and
/// memory-mapped I/O of the database file off (`mmap_size=0`, SQLite's default, made sure
/// of: a mapped database file would fault the same way).
fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), VFS)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch("PRAGMA mmap_size=0;")?;
    Ok(conn)
}

/// Whether `e` is the file system refusing a write (an I/O error, a full disk, a read-only
/// or immutable file, a file that cannot be opened), as opposed to the statement itself
/// failing (a constraint, a locked database).
fn refused_by_file_system(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    matches!(
        e.sqlite_error_code(),
        Some(C::SystemIoFailure | C::DiskFull | C::ReadOnly | C::CannotOpen | C::PermissionDenied)
    )
}

/// The WAL file of the database at `db`: `db` with `-wal` appended (SQLite's naming).
fn wal_path(db: &Path) -> std::path::PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    std::path::PathBuf::from(s)
}

/// Makes the committed transactions of a [`Durability::Deferred`] store durable: everything
/// committed before [`WalSync::sync`] is called is on disk when it returns. Send it to the
/// thread that syncs; it holds only the WAL's path.
#[derive(Debug)]
pub struct WalSync {
    wal: std::path::PathBuf,
    file: std::sync::OnceLock<std::fs::File>,
}

impl Flush for WalSync {
    fn sync(&self) -> std::io::Result<()> {
        WalSync::sync(self)
    }
}

impl WalSync {
    /// `fdatasync`s the WAL file. Linux flushes a file's dirty pages whichever descriptor
    /// asks, so a descriptor of our own covers the frames SQLite wrote through its own. The
    /// descriptor is opened at the first sync and kept: SQLite replaces or deletes the WAL
    /// only when the last connection closes, and the store's writer outlives every sync.
    ///
    /// # Errors
    /// The I/O error. The page cache's state after a failed sync is unknown (it may have
    /// dropped the dirty pages), so a caller must not ack what it was syncing, nor trust
    /// later syncs of the same data: the node stops (fail-stop, as PostgreSQL does).
    pub fn sync(&self) -> std::io::Result<()> {
        let _timer = agora_common::metrics::FSYNC_SECONDS.start_timer();
        if let Some(f) = self.file.get() {
            return f.sync_data();
        }
        match std::fs::File::open(&self.wal) {
            Ok(f) => self.file.get_or_init(|| f).sync_data(),
            // No WAL yet: nothing was committed through one.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A second connection that checkpoints a [`Durability::Deferred`] store (copies WAL pages
/// back into the database file, so that the WAL can be reused), on a thread of its own and
/// never inside a commit. SQLite allows one checkpointer beside the writer in WAL mode.
pub struct Checkpointer {
    conn: Connection,
    wal: std::path::PathBuf,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("wal", &self.wal)
            .finish_non_exhaustive()
    }
}

/// What one checkpoint did, in WAL frames (pages), from `PRAGMA wal_checkpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Frames in the WAL.
    pub wal_frames: i64,
    /// Frames copied back into the database so far.
    pub checkpointed: i64,
}

impl Checkpointer {
    /// The WAL file's size in bytes (0 if it does not exist).
    pub fn wal_bytes(&self) -> u64 {
        std::fs::metadata(&self.wal).map(|m| m.len()).unwrap_or(0)
    }

    /// Runs a `PASSIVE` checkpoint: copies what it can without waiting for the writer
    /// (SQLite syncs the WAL before and the database after). With `restart`, a `RESTART`
    /// checkpoint instead, which waits (up to the 5 s busy timeout) until the writer's next
    /// transaction can start the WAL over: for when the WAL has grown past a bound because
    /// passive checkpoints never caught up under load.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn checkpoint(&mut self, restart: bool) -> Result<CheckpointStats, StoreError> {
        let sql = if restart {
            "PRAGMA wal_checkpoint(RESTART)"
        } else {
            "PRAGMA wal_checkpoint(PASSIVE)"
        };
        let (wal_frames, checkpointed) = self
            .conn
            .query_row(sql, [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))?;
        Ok(CheckpointStats {
            wal_frames,
            checkpointed,
        })
    }
}

impl SqliteGroup<'_> {
    fn read(&self) -> GroupRead<'_> {
        GroupRead {
            host: self.host,
            state: self.state,
        }
    }

    fn gid(&self) -> i64 {
        i64::from(self.state.gid.0)
    }
}

impl GroupLog for SqliteGroup<'_> {
    fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        self.read().member(who)
    }

    fn add_member(
        &mut self,
        who: &Principal,
        user: &UserName,
        at: Timestamp,
    ) -> Result<(UserName, bool), StoreError> {
        let gid = self.gid();
        let state = &mut *self.state;
        self.host.write(|h| {
            let read = GroupRead { host: h, state };
            if let Some(bound) = read.member(who)? {
                return Ok((bound, false));
            }
            if read.member_named(user)?.is_some() {
                return Err(StoreError::LabelTaken(user.clone()));
            }
            let mut stmt = h.conn.prepare_cached(
                "INSERT INTO members (gid, principal, user, joined_at_us) VALUES (?1, ?2, ?3, ?4)",
            )?;
            stmt.execute(params![gid, who.as_str(), user.as_str(), at.as_micros()])?;
            state.member_count += 1;
            Ok((user.clone(), true))
        })
    }

    fn remove_member(&mut self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        let gid = self.gid();
        let state = &mut *self.state;
        self.host.write(|h| {
            let Some(bound) = (GroupRead { host: h, state }).member(who)? else {
                return Ok(None);
            };
            let mut stmt = h
                .conn
                .prepare_cached("DELETE FROM members WHERE gid = ?1 AND principal = ?2")?;
            stmt.execute(params![gid, who.as_str()])?;
            state.member_count = state.member_count.saturating_sub(1);
            Ok(Some(bound))
        })
    }

    fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError> {
        self.read().member_named(user)
    }

    fn grant(&mut self, who: &Principal, grant: Grant, at: Timestamp) -> Result<bool, StoreError> {
        let gid = self.gid();
        self.host.write(|h| {
            let mut stmt = h.conn.prepare_cached(
                "INSERT INTO grants (gid, principal, kind, at_us) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
            )?;
            Ok(stmt.execute(params![gid, who.as_str(), grant.as_str(), at.as_micros()])? == 1)
        })
    }

    fn revoke(&mut self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        let gid = self.gid();
        self.host.write(|h| {
            let mut stmt = h.conn.prepare_cached(
                "DELETE FROM grants WHERE gid = ?1 AND principal = ?2 AND kind = ?3",
            )?;
            Ok(stmt.execute(params![gid, who.as_str(), grant.as_str()])? == 1)
        })
    }

    fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.read().has(who, grant)
    }

    fn mode(&self) -> Result<GroupMode, StoreError> {
        self.read().mode()
    }

    fn set_mode(&mut self, mode: GroupMode) -> Result<bool, StoreError> {
        let gid = self.gid();
        self.host.write(|h| {
            let mut stmt = h
                .conn
                .prepare_cached("UPDATE groups SET mode = ?2 WHERE gid = ?1 AND mode <> ?2")?;
            Ok(stmt.execute(params![gid, mode.as_str()])? == 1)
        })
    }

    fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.read().members()
    }

    fn member_count(&self) -> u64 {
        self.state.member_count
    }

    fn append(&mut self, msg: NewMessage<'_>) -> Result<SendAck, StoreError> {
        let state = &mut *self.state;
        self.host.write(|h| {
            let id = msg.id.unwrap_or_else(MessageId::new_v7);
            let seq = state.last_seq + 1;
            if seq > MAX_SEQ {
                return Err(StoreError::Corrupt(format!(
                    "group {}: the log is full (seq {MAX_SEQ})",
                    state.gid
                )));
            }
            let mut clock = state.clock;
            let time = clock.tick(msg.now);
            // One statement in the common case: the (gid, id) unique index finds a retry
            // while inserting, instead of a lookup before every insert.
            let mut stmt = h.conn.prepare_cached(
                "INSERT INTO messages (k, gid, id, time_us, sender, body, kind, sender_key,
                     attachment, attachment_sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (gid, id) DO NOTHING",
            )?;
            let attachment = msg.attachment.map(attachment_json).transpose()?;
            let inserted = stmt.execute(params![
                key(state.gid, seq),
                i64::from(state.gid.0),
                id.as_bytes().as_slice(),
                time.as_micros(),
                msg.sender.as_str(),
                msg.body.get(),
                msg.kind.as_str(),
                msg.sender_key.map(|k| k.to_string()),
                attachment,
                msg.attachment.map(|a| a.sha256.as_bytes().to_vec()),
            ])?;
            if inserted == 1 {
                state.last_seq = seq;
                state.clock = clock;
                return Ok(SendAck {
                    seq,
                    id,
                    time,
                    duplicate: false,
                });
            }
            // A retry of a stored message: the same sender, body and attachment get the
            // stored ack.
            (GroupRead { host: h, state })
                .stored_ack(id, msg.sender, msg.body, attachment.as_deref())?
                .ok_or_else(|| StoreError::Corrupt(format!("id {id} conflicts but is not found")))
        })
    }

    fn stored_ack(
        &self,
        id: MessageId,
        sender: &UserName,
        body: &RawValue,
        attachment: Option<&str>,
    ) -> Result<Option<SendAck>, StoreError> {
        self.read().stored_ack(id, sender, body, attachment)
    }

    fn references(&self, digest: &Sha256Digest) -> Result<bool, StoreError> {
        self.read().references(digest)
    }

    fn page(&self, query: HistoryQuery, limit: u32, max_bytes: usize) -> Result<Page, StoreError> {
        self.read().page(query, limit, max_bytes)
    }

    fn last_seq(&self) -> u64 {
        self.state.last_seq
    }

    fn apply_retention(&mut self, policy: Retention, now: Timestamp) -> Result<u64, StoreError> {
        let state = &mut *self.state;
        self.host.write(|h| {
            let (lo, _) = key_range(state.gid);
            let mut deleted = 0;
            if let Some(max) = policy.max_messages {
                let keep_from = state.last_seq.saturating_sub(max);
                let mut stmt = h
                    .conn
                    .prepare_cached("DELETE FROM messages WHERE k >= ?1 AND k <= ?2")?;
                deleted += stmt.execute([lo, key(state.gid, keep_from)])? as u64;
            }
            if let Some(age) = policy.max_age {
                let cutoff = now.saturating_sub(age);
                // Everything before the first entry at or after the cutoff (all of it if none).
                let keep_from = h.first_seq_at(state, cutoff.as_micros())?;
                let mut stmt = h
                    .conn
                    .prepare_cached("DELETE FROM messages WHERE k >= ?1 AND k < ?2")?;
                let end = match keep_from {
                    Some(seq) => key(state.gid, u64::try_from(seq).unwrap_or(0)),
                    None => key(state.gid, MAX_SEQ) + 1,
                };
                deleted += stmt.execute([lo, end])? as u64;
            }
            if deleted > 0 {
                // `MAX(k)` may no longer give the high-water marks: store them. Appends later
                // in the batch are above them, and a reload takes the larger.
                let mut stmt = h.conn.prepare_cached(
                    "UPDATE groups SET last_seq = ?2, last_time_us = ?3 WHERE gid = ?1",
                )?;
                stmt.execute(params![
                    i64::from(state.gid.0),
                    i64::try_from(state.last_seq).unwrap_or(i64::MAX),
                    state.clock.last().as_micros(),
                ])?;
            }
            Ok(deleted)
        })
    }
}

impl GroupLog for SqliteStore {
    fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        self.read().member(who)
    }
    fn add_member(
        &mut self,
        who: &Principal,
        user: &UserName,
        at: Timestamp,
    ) -> Result<(UserName, bool), StoreError> {
        self.view().add_member(who, user, at)
    }
    fn remove_member(&mut self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        self.view().remove_member(who)
    }
    fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError> {
        self.read().member_named(user)
    }
    fn grant(&mut self, who: &Principal, grant: Grant, at: Timestamp) -> Result<bool, StoreError> {
        self.view().grant(who, grant, at)
    }
    fn revoke(&mut self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.view().revoke(who, grant)
    }
    fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.read().has(who, grant)
    }
    fn mode(&self) -> Result<GroupMode, StoreError> {
        self.read().mode()
    }
    fn set_mode(&mut self, mode: GroupMode) -> Result<bool, StoreError> {
        self.view().set_mode(mode)
    }
    fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.read().members()
    }
    fn member_count(&self) -> u64 {
        self.state.member_count
    }
    fn append(&mut self, msg: NewMessage<'_>) -> Result<SendAck, StoreError> {
        self.view().append(msg)
    }
    fn stored_ack(
        &self,
        id: MessageId,
        sender: &UserName,
        body: &RawValue,
        attachment: Option<&str>,
    ) -> Result<Option<SendAck>, StoreError> {
        self.read().stored_ack(id, sender, body, attachment)
    }
    fn references(&self, digest: &Sha256Digest) -> Result<bool, StoreError> {
        self.read().references(digest)
    }
    fn page(&self, query: HistoryQuery, limit: u32, max_bytes: usize) -> Result<Page, StoreError> {
        self.read().page(query, limit, max_bytes)
    }
    fn last_seq(&self) -> u64 {
        self.state.last_seq
    }
    fn apply_retention(&mut self, policy: Retention, now: Timestamp) -> Result<u64, StoreError> {
        self.view().apply_retention(policy, now)
    }
}

impl GroupStore for SqliteStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        self.host.begin()
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let result = self.host.commit();
        if result.is_err() {
            // Keep the cache true to what is on disk.
            self.state = self.host.load(GroupId::ONE)?;
        }
        result
    }

    fn last_commit_wrote(&self) -> bool {
        self.host.last_commit_wrote()
    }

    fn flusher(&self) -> Box<dyn Flush> {
        self.host.flusher()
    }

    fn checkpoints(&self) -> Result<Option<Checkpointer>, StoreError> {
        self.host.checkpoints()
    }

    fn stored_bytes(&self) -> u64 {
        self.host.stored_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::{append, group, user};
    use super::*;
    use agora_proto::wire::MAX_PAGE_BYTES;

    /// A zero-filled WAL is overwritten, not grown, and SQLite's recovery reads the frames
    /// before the zeros: a copy of the files taken after a sync (as a crash would leave
    /// them, WAL not checkpointed) opens with every synced message.
    #[test]
    fn a_preallocated_wal_is_overwritten_and_recovers_after_a_crash() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("g.sqlite3");
        let mut s = SqliteStore::open_with(&path, &group(), Durability::Deferred).expect("open");
        let wal = wal_path(&path);
        let size = 4 << 20;
        let before = std::fs::metadata(&wal)
            .expect("the WAL exists once open")
            .len();
        assert!(before < size);
        assert_eq!(s.preallocate_wal(size).expect("fill"), size - before);
        assert_eq!(
            s.preallocate_wal(size).expect("again"),
            0,
            "already long enough"
        );
        for n in 0..200 {
            append(&mut s, &format!("{{\"n\":{n}}}"), 1_000 + n);
        }
        s.wal_sync().sync().expect("sync");
        assert_eq!(
            std::fs::metadata(&wal).expect("wal").len(),
            size,
            "not grown"
        );
        let crashed = tempfile::tempdir().expect("tmp");
        let copy = crashed.path().join("g.sqlite3");
        std::fs::copy(&path, &copy).expect("db");
        std::fs::copy(&wal, wal_path(&copy)).expect("wal");
        let reopened = SqliteStore::open(&copy, &group()).expect("recover");
        let page = reopened
            .page(HistoryQuery::AfterSeq(0), 1000, MAX_PAGE_BYTES)
            .expect("page");
        assert_eq!(page.messages.len(), 200);
        assert_eq!(page.messages.last().map(|m| m.seq), Some(200));
    }

    /// The WAL index lives in this process's memory (the `unix-excl` VFS), shared by the
    /// writer and the checkpointer: no `-shm` file is made (nothing to map, so nothing to
    /// fault with SIGBUS when the file system refuses writes), and a checkpoint on the second
    /// connection copies back what the writer committed, which then writes on.
    #[test]
    fn the_wal_index_is_in_memory_and_shared_with_the_checkpointer() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("g.sqlite3");
        let mut s = SqliteStore::open_with(&path, &group(), Durability::Deferred).expect("open");
        let mut checkpointer = s.checkpointer().expect("checkpointer");
        for n in 0..50 {
            append(&mut s, &format!("{{\"n\":{n}}}"), 1_000 + n);
        }
        s.wal_sync().sync().expect("sync");
        let stats = checkpointer.checkpoint(false).expect("checkpoint");
        assert!(stats.wal_frames > 0, "{stats:?}");
        assert_eq!(stats.checkpointed, stats.wal_frames, "{stats:?}");
        for n in 50..60 {
            append(&mut s, &format!("{{\"n\":{n}}}"), 1_000 + n);
        }
        let mut shm = path.as_os_str().to_owned();
        shm.push("-shm");
        assert!(!std::path::Path::new(&shm).exists(), "a -shm file was made");
        drop((s, checkpointer));
        let reopened = SqliteStore::open(&path, &group()).expect("reopen");
        assert_eq!(reopened.last_seq(), 60);
    }

    #[test]
    fn a_version_1_file_is_migrated_and_keeps_its_messages() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("g");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                r#"CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
                 INSERT INTO meta VALUES ('group', 'Cool Group');
                 CREATE TABLE messages (seq INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE,
                     time_us INTEGER NOT NULL, sender TEXT NOT NULL, body TEXT NOT NULL);
                 CREATE TABLE members (user TEXT PRIMARY KEY, joined_at_us INTEGER NOT NULL)
                     WITHOUT ROWID;
                 INSERT INTO messages VALUES (1, x'0123456789abcdef0123456789abcdef', 5, 'bob', '"hi"');
                 INSERT INTO members VALUES ('bob', 5);
                 PRAGMA user_version = 1;"#,
            )
            .expect("v1 schema");
        }
        let s = SqliteStore::open(&path, &group()).expect("migrate");
        let page = s
            .page(HistoryQuery::AfterSeq(0), 10, MAX_PAGE_BYTES)
            .expect("page");
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.messages[0].kind, EntryKind::Message);
        assert_eq!(page.messages[0].body.get(), "\"hi\"");
        assert_eq!(page.messages[0].sender_key, None);
        assert_eq!(
            s.member(&Principal::name(&user("bob"))).expect("q"),
            Some(user("bob"))
        );
        assert_eq!(s.member_count(), 1);
        drop(s);
        SqliteStore::open(&path, &group()).expect("reopen at version 4");
    }

    #[test]
    fn a_file_of_another_group_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("g");
        drop(SqliteStore::open(&path, &group()).expect("open"));
        let other = GroupName::new("other").expect("name");
        assert!(matches!(
            SqliteStore::open(&path, &other),
            Err(StoreError::WrongGroup { .. })
        ));
    }
}

#[cfg(test)]
mod host_tests {
    use super::super::conformance::{group, user};
    use super::super::host::{GroupId, GroupState, NewGroup};
    use super::*;
    use agora_proto::wire::MAX_PAGE_BYTES;

    /// Makes a version 6 file as the builds before version 7 left one: their schema
    /// (statements copied from them), a group whose retention deleted seqs 1–2 and whose
    /// newest seq 4 was deleted too (the high-water marks in `meta`), a private mode, a
    /// member with a key and one without, grants, an attachment.
    fn version_6_file(path: &Path) {
        let conn = Connection::open(path).expect("open");
        conn.execute_batch(
            r#"CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
             CREATE TABLE messages (
                 seq INTEGER PRIMARY KEY,
                 id BLOB NOT NULL UNIQUE,
                 time_us INTEGER NOT NULL,
                 sender TEXT NOT NULL,
                 body TEXT NOT NULL,
                 kind TEXT NOT NULL DEFAULT 'message',
                 sender_key TEXT,
                 attachment TEXT,
                 attachment_sha256 BLOB);
             CREATE TABLE members (
                 principal TEXT PRIMARY KEY,
                 user TEXT NOT NULL UNIQUE,
                 joined_at_us INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE grants (
                 principal TEXT NOT NULL,
                 kind TEXT NOT NULL,
                 at_us INTEGER NOT NULL,
                 PRIMARY KEY (principal, kind)) WITHOUT ROWID;
             CREATE INDEX messages_attachment ON messages(attachment_sha256)
                 WHERE attachment_sha256 IS NOT NULL;
             PRAGMA user_version = 6;
             INSERT INTO meta (key, value) VALUES ('group', 'Cool Group');
             INSERT INTO meta (key, value) VALUES ('mode', 'private');
             INSERT INTO meta (key, value) VALUES ('last_seq', 4);
             INSERT INTO meta (key, value) VALUES ('last_time_us', 4000);
             INSERT INTO messages (seq, id, time_us, sender, body, kind, sender_key)
                 VALUES (3, x'0123456789abcdef0123456789abcdef', 3000, 'bob', '"hi"', 'message',
                     NULL);
             INSERT INTO members VALUES ('name:bob', 'bob', 5);
             INSERT INTO members VALUES ('key:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7', 'carol', 6);
             INSERT INTO grants VALUES ('name:bob', 'admin', 7);
             INSERT INTO grants VALUES ('name:eve', 'ban', 8);"#,
        )
        .expect("v6 schema");
    }

    #[test]
    fn a_version_6_file_is_migrated_to_7_and_keeps_seq_ids_members_grants_mode() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("group.sqlite3");
        version_6_file(&path);
        let mut s = SqliteStore::open(&path, &group()).expect("migrate");
        let version: i64 = s
            .host
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 7);
        let page = s
            .page(HistoryQuery::AfterSeq(0), 10, MAX_PAGE_BYTES)
            .expect("page");
        assert_eq!(page.messages.len(), 1);
        let m = &page.messages[0];
        assert_eq!(
            (m.seq, m.id.as_bytes()[0], m.time.as_micros(), m.body.get()),
            (3, 0x01, 3000, "\"hi\"")
        );
        // The high-water marks of the deleted seq 4 hold: the next append is 5, later.
        assert_eq!(s.last_seq(), 4);
        assert_eq!(s.mode().expect("mode"), GroupMode::Private);
        assert_eq!(s.member_count(), 2);
        let bob = Principal::name(&user("bob"));
        assert_eq!(s.member(&bob).expect("q"), Some(user("bob")));
        assert!(s.has(&bob, Grant::Admin).expect("has"));
        assert!(s
            .has(&Principal::name(&user("eve")), Grant::Ban)
            .expect("has"));
        let members = s.members().expect("members");
        assert_eq!(members[1].user, user("carol"));
        assert!(members[1].key.is_some(), "the key principal survives");
        s.begin().expect("begin");
        let b = RawValue::from_string("1".into()).expect("json");
        let ack = s
            .append(NewMessage {
                sender: &user("bob"),
                kind: EntryKind::Message,
                sender_key: None,
                body: &b,
                id: None,
                now: Timestamp::from_micros(10),
                attachment: None,
            })
            .expect("append");
        s.commit().expect("commit");
        assert_eq!(ack.seq, 5);
        assert!(ack.time.as_micros() > 4000);
        drop(s);
        let s = SqliteStore::open(&path, &group()).expect("reopen at version 7");
        assert_eq!(s.last_seq(), 5);
        let other = GroupName::new("other").expect("name");
        drop(s);
        assert!(matches!(
            SqliteStore::open(&path, &other),
            Err(StoreError::WrongGroup { .. })
        ));
    }

    /// A migration that fails halfway (here: a version 6 file whose `meta` names no group
    /// and no name is given) leaves the file at version 6, whole.
    #[test]
    fn a_failed_migration_leaves_the_version_6_file_as_it_was() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("group.sqlite3");
        version_6_file(&path);
        Connection::open(&path)
            .expect("open")
            .execute_batch("DELETE FROM meta WHERE key = 'group'")
            .expect("delete");
        assert!(matches!(
            SqliteHost::open_with(&path, Durability::Commit),
            Err(StoreError::Corrupt(_))
        ));
        let conn = Connection::open(&path).expect("open");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        let seqs: i64 = conn
            .query_row("SELECT COUNT(*) FROM messages WHERE seq = 3", [], |r| {
                r.get(0)
            })
            .expect("v6 messages");
        assert_eq!((version, seqs), (6, 1));
    }

    /// Groups come and go by state: a name is unique among pending and live groups, free
    /// again once archived; gids are never reused; pending groups (never acked) are removed
    /// at start with their rows; only live ones are served.
    #[test]
    fn pending_groups_are_removed_archived_names_freed_gids_never_reused() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut h =
            SqliteHost::open_with(&dir.path().join("h.sqlite3"), Durability::Commit).expect("open");
        let (a, b) = (
            GroupName::new("a").expect("name"),
            GroupName::new("b").expect("name"),
        );
        let creator = Principal::name(&user("carol"));
        let new = |name, state| NewGroup {
            name,
            owner: Some(&creator),
            created_by: Some(&creator),
            mode: GroupMode::Open,
            state,
            at: Timestamp::from_micros(1),
        };
        h.begin().expect("begin");
        let ga = h.insert_group(new(&a, GroupState::Live)).expect("a");
        let gb = h.insert_group(new(&b, GroupState::Pending)).expect("b");
        let mut st = h.load(gb).expect("load");
        h.group(&mut st)
            .add_member(&creator, &user("carol"), Timestamp::from_micros(2))
            .expect("join");
        h.commit().expect("commit");
        assert_eq!(h.group_counts(&creator).expect("counts"), (2, 2));
        assert_eq!(
            h.find_group(&b).expect("find"),
            Some((gb, GroupState::Pending))
        );
        assert_eq!(h.remove_pending_groups().expect("remove"), 1);
        assert_eq!(h.find_group(&b).expect("find"), None);
        assert!(h.load(gb).is_err(), "its row is gone");
        h.begin().expect("begin");
        h.set_group_state(ga, GroupState::Archived, Timestamp::from_micros(3))
            .expect("archive");
        let again = h.insert_group(new(&a, GroupState::Live)).expect("a again");
        assert!(matches!(
            h.set_group_state(ga, GroupState::Live, Timestamp::from_micros(4)),
            Err(StoreError::NameTaken(n)) if n == "a"
        ));
        h.commit().expect("commit");
        assert_eq!(again, GroupId(3), "gid 2 was b's: never reused");
        let live: Vec<GroupId> = h
            .live_groups()
            .expect("live")
            .into_iter()
            .map(|g| g.gid)
            .collect();
        assert_eq!(live, vec![again]);
    }

    /// The issue's target: an idle group costs ≤ 64 KiB of disk. 10,000 groups, each with
    /// its creator as member, a grant and a `join` entry, in batches of 500, then a
    /// checkpoint: (file − empty file) / 10,000.
    #[test]
    fn ten_thousand_idle_groups_take_under_64_kib_of_disk_each() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("h.sqlite3");
        let mut h = SqliteHost::open_with(&path, Durability::Deferred).expect("open");
        let mut cp = h.checkpointer().expect("checkpointer");
        let empty = std::fs::metadata(&path).expect("db").len();
        let null = RawValue::from_string("null".into()).expect("json");
        let n = 10_000u32;
        for batch in 0..n / 500 {
            h.begin().expect("begin");
            for i in 0..500 {
                let name = GroupName::new(format!("group {}", batch * 500 + i)).expect("name");
                let creator = Principal::name(&user(&format!("u{}", batch * 500 + i)));
                let gid = h
                    .insert_group(NewGroup {
                        name: &name,
                        owner: Some(&creator),
                        created_by: Some(&creator),
                        mode: GroupMode::Open,
                        state: GroupState::Live,
                        at: Timestamp::from_micros(1),
                    })
                    .expect("insert");
                let mut st = h.load(gid).expect("load");
                let mut g = h.group(&mut st);
                g.add_member(&creator, &user("owner"), Timestamp::from_micros(2))
                    .expect("join");
                g.grant(&creator, Grant::Admin, Timestamp::from_micros(2))
                    .expect("grant");
                g.append(NewMessage {
                    sender: &user("owner"),
                    kind: EntryKind::Join,
                    sender_key: None,
                    body: &null,
                    id: None,
                    now: Timestamp::from_micros(3),
                    attachment: None,
                })
                .expect("join entry");
            }
            h.commit().expect("commit");
        }
        h.wal_sync().sync().expect("sync");
        cp.checkpoint(true).expect("checkpoint");
        let full = std::fs::metadata(&path).expect("db").len();
        let per_group = (full - empty) / u64::from(n);
        eprintln!("disk per idle group: {per_group} bytes ({full} bytes for {n} groups)");
        assert!(per_group <= 64 * 1024, "{per_group} bytes per idle group");
        drop((h, cp));
        // What a restart reads before serving: one query for the groups, one for the counts.
        let t = std::time::Instant::now();
        let h = SqliteHost::open_with(&path, Durability::Deferred).expect("reopen");
        let live = h.live_groups().expect("live");
        eprintln!("reopen and read {} groups: {:?}", live.len(), t.elapsed());
        assert_eq!(live.len(), n as usize);
        assert!(live.iter().all(|g| g.members == 1));
    }

    /// A group moves between hosts by export and import: group 2 of one host, exported,
    /// becomes a new gid on another host that has a group already, with its seqs, ids,
    /// times, members, grants, mode and high-water marks; a name live on the host is
    /// refused and nothing is copied; a node of one's version 6 file imports too.
    #[test]
    fn a_group_exported_from_one_host_imports_into_another_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let null = RawValue::from_string("null".into()).expect("json");
        let owner = Principal::name(&user("olga"));
        let make = |h: &mut SqliteHost, name: &str| {
            let name = GroupName::new(name).expect("name");
            h.begin().expect("begin");
            let gid = h
                .insert_group(NewGroup {
                    name: &name,
                    owner: Some(&owner),
                    created_by: Some(&owner),
                    mode: GroupMode::Open,
                    state: GroupState::Live,
                    at: Timestamp::from_micros(1),
                })
                .expect("insert");
            let mut st = h.load(gid).expect("load");
            let mut g = h.group(&mut st);
            g.add_member(&owner, &user("olga"), Timestamp::from_micros(2))
                .expect("join");
            for t in 0..5 {
                g.append(NewMessage {
                    sender: &user("olga"),
                    kind: EntryKind::Message,
                    sender_key: None,
                    body: &null,
                    id: None,
                    now: Timestamp::from_micros(10 + t),
                    attachment: None,
                })
                .expect("append");
            }
            h.commit().expect("commit");
            (gid, st)
        };
        let mut a =
            SqliteHost::open_with(&dir.path().join("a.sqlite3"), Durability::Commit).expect("a");
        make(&mut a, "first");
        let (moved, mut st) = make(&mut a, "moved");
        a.begin().expect("begin");
        let mut g = a.group(&mut st);
        g.set_mode(GroupMode::Private).expect("mode");
        g.grant(&owner, Grant::Admin, Timestamp::from_micros(3))
            .expect("grant");
        g.apply_retention(
            Retention {
                max_messages: Some(2),
                max_age: None,
            },
            Timestamp::from_micros(0),
        )
        .expect("retention");
        a.commit().expect("commit");
        let file = dir.path().join("moved.sqlite3");
        a.export_group(moved, &file).expect("export");

        let mut b =
            SqliteHost::open_with(&dir.path().join("b.sqlite3"), Durability::Commit).expect("b");
        make(&mut b, "moved");
        assert!(matches!(
            b.import_group(&file),
            Err(StoreError::NameTaken(n)) if n == "moved"
        ));
        assert_eq!(b.live_groups().expect("live").len(), 1, "nothing copied");
        let mut c =
            SqliteHost::open_with(&dir.path().join("c.sqlite3"), Durability::Commit).expect("c");
        make(&mut c, "resident");
        let (gid, name) = c.import_group(&file).expect("import");
        assert_eq!((gid, name.as_str()), (GroupId(2), "moved"));
        let mut st = c.load(gid).expect("load");
        assert_eq!(st.last_seq(), 5);
        let g = c.group(&mut st);
        let page = g
            .page(HistoryQuery::AfterSeq(0), 10, MAX_PAGE_BYTES)
            .expect("page");
        assert_eq!(
            page.messages
                .iter()
                .map(|m| (m.seq, m.time.as_micros()))
                .collect::<Vec<_>>(),
            vec![(4, 13), (5, 14)]
        );
        assert_eq!(g.mode().expect("mode"), GroupMode::Private);
        assert!(g.has(&owner, Grant::Admin).expect("has"));
        assert_eq!(g.member_count(), 1);
        let row = c
            .live_groups()
            .expect("live")
            .into_iter()
            .find(|r| r.gid == gid)
            .expect("row");
        assert_eq!(row.owner, Some(owner.clone()));

        let old = dir.path().join("group.sqlite3");
        version_6_file(&old);
        let (gid, name) = c.import_group(&old).expect("import v6");
        assert_eq!((gid, name), (GroupId(3), group()));
        assert_eq!(c.load(gid).expect("load").last_seq(), 4);
    }
}
