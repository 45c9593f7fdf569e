//! [`GroupStore`] in one SQLite file in WAL mode: the embedded default.
//! Two [`Durability`] settings:
//! - [`Durability::Commit`] (`synchronous=FULL`): a commit returns once the WAL is fsynced, so
//!   a committed transaction survives a process kill and a power loss.
//! - [`Durability::Deferred`] (`synchronous=NORMAL`): a commit writes the WAL to the page
//!   cache and returns; the caller makes it durable with [`WalSync::sync`] (an `fdatasync` of
//!   the WAL file) on another thread, and acks only after that. Checkpoints run on their own
//!   connection and thread ([`Checkpointer`]), never inside a commit. This is what the group
//!   node runs: while one batch syncs, the next is applied.
//!
//! Writes happen inside a batch: [`GroupStore::begin`], any number of operations, then
//! [`GroupStore::commit`]. The node puts every request it has in hand into one batch and
//! sends the acks after the commit (and the sync): group commit, one fsync for many messages,
//! without acking anything that is not on disk.
//!
//! # Failure inside a batch
//! When a write fails with an I/O error or a full disk, SQLite may roll back the whole
//! transaction by itself. The store notices (the connection is back in autocommit mode),
//! marks the batch aborted, and refuses every later write of the batch with
//! [`StoreError::Aborted`] instead of letting it run (and commit) on its own; reads go on.
//! [`GroupStore::commit`] then fails, and the cached seq and clock are reloaded from the file,
//! so the next batch numbers on from what is stored: no seq gap, and nothing answered as
//! failed is stored.
//!
//! # A file system that refuses writes
//! Every connection goes through SQLite's `unix-excl` VFS ([`VFS`]): the WAL index is in
//! heap memory, not in a `-shm` file mapped into memory, so a file made immutable or a file
//! system turned read-only fails a write with an error instead of killing the process with
//! SIGBUS. Such an error, an I/O error and a full disk become [`StoreError::Unwritable`],
//! whose cause is logged once when writes begin to fail and once when a commit succeeds
//! again; the batch is refused as above.
//!
//! # Schema (version 6, in `PRAGMA user_version`)
//! - `meta(key TEXT PRIMARY KEY, value)`: `group` (name), `last_seq`, `last_time_us`. The
//!   high-water marks keep seq gap-free and time monotonic after retention deletes rows.
//! - `messages(seq INTEGER PRIMARY KEY, id BLOB UNIQUE, time_us, sender, body, kind,
//!   sender_key)`: the log; `body` is the JSON text as sent; `id` the 16 UUID bytes; `kind`
//!   `message`, `join` or `leave` (version 2); `sender_key` the sender's Z85 CURVE key, NULL
//!   without CURVE (version 3). No index on `time_us` (dropped in version 5): time is
//!   strictly increasing with seq, so the first seq at or after a time is found by a binary
//!   search over the primary key ([`SqliteStore::first_seq_at`]), and each append updates
//!   two B-trees, not three (one WAL page less to write and sync per commit).
//! - `messages.attachment`, `messages.attachment_sha256` (version 6): the file a message
//!   carries, as the JSON of its `Attachment`, and its digest (32 bytes), with a partial index
//!   over the messages that have one: what keeps a blob from retention's sweep.
//! - `members(principal TEXT PRIMARY KEY, user TEXT UNIQUE, joined_at_us)`: who is a member
//!   ([`Principal`]), and the user name bound to them in this group (version 3; before, the
//!   user name was the identity).
//! - `grants(principal, kind, at_us)`, primary key `(principal, kind)`: `admin`, `invite` and
//!   `ban` rights and restrictions (version 4). The group's mode is `meta.mode`.

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

use super::{
    attachment_json, Flush, Grant, GroupStore, NewMessage, Page, Principal, Retention, StoreError,
};

const SCHEMA_VERSION: i64 = 6;

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

/// [`GroupStore`] in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    last_seq: u64,
    clock: MonotonicClock,
    member_count: u64,
    /// Retention deleted rows in this transaction: the high-water marks must be written to
    /// `meta`, since `MAX(seq)` and `MAX(time_us)` may no longer give them. Otherwise the
    /// commit writes no `meta` page (one page less to sync per commit).
    meta_dirty: bool,
    /// SQLite rolled this batch back after a failed write (see the module docs).
    aborted: bool,
    /// Writes fail for a cause outside SQLite ([`StoreError::Unwritable`]): the cause was
    /// logged when they began to fail, and is not logged again until a commit succeeds.
    unwritable: bool,
    /// `total_changes` at [`GroupStore::begin`]: a commit that changed no row wrote nothing,
    /// so it does not show that the store can be written again, and needs no sync.
    changes_at_begin: u64,
    /// The last successful commit changed a row ([`GroupStore::last_commit_wrote`]).
    last_commit_wrote: bool,
    path: std::path::PathBuf,
    durability: Durability,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("last_seq", &self.last_seq)
            .field("member_count", &self.member_count)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens or creates the store of `group` at `path` (WAL, `synchronous=FULL`), in
    /// SQLite's exclusive locking mode: this connection holds the file's lock until it
    /// closes, so each transaction skips the per-transaction file locking and the WAL index
    /// lives in heap memory. One process per store: a second opener waits the busy timeout
    /// (5 s) and then fails with `database is locked`.
    ///
    /// # Errors
    /// [`StoreError::WrongGroup`] if the file belongs to another group,
    /// [`StoreError::SchemaTooNew`], [`StoreError::Sqlite`].
    pub fn open(path: &Path, group: &GroupName) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, group, Durability::Commit)
    }

    /// Opens or creates the store of `group` at `path` with the given durability. With
    /// [`Durability::Deferred`] the file is opened in shared locking mode among this
    /// process's connections (so that a [`Checkpointer`] can open it too); one writer per
    /// store is still the rule, and no other process may open the file meanwhile ([`VFS`]).
    ///
    /// # Errors
    /// As [`SqliteStore::open`].
    pub fn open_with(
        path: &Path,
        group: &GroupName,
        durability: Durability,
    ) -> Result<SqliteStore, StoreError> {
        let conn = connect(path)?;
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
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                known: SCHEMA_VERSION,
            });
        }
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
             CREATE INDEX IF NOT EXISTS messages_attachment ON messages(attachment_sha256)
                 WHERE attachment_sha256 IS NOT NULL;
             PRAGMA user_version = 6;",
        )?;
        let found: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'group'", [], |r| {
                r.get(0)
            })
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
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('group', ?1)",
                    [group.as_str()],
                )?;
            }
        }
        let mut store = SqliteStore {
            conn,
            last_seq: 0,
            clock: MonotonicClock::after(Timestamp::EPOCH),
            member_count: 0,
            meta_dirty: false,
            aborted: false,
            unwritable: false,
            changes_at_begin: 0,
            last_commit_wrote: false,
            path: path.to_owned(),
            durability,
        };
        store.reload()?;
        Ok(store)
    }

    /// How commits of this store become durable.
    pub fn durability(&self) -> Durability {
        self.durability
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

    /// A second connection to this store's file, for checkpoints on another thread.
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

    /// Runs `write` unless the batch is already aborted; if it fails and SQLite has rolled
    /// the transaction back (autocommit is on again), marks the batch aborted.
    fn write<T>(
        &mut self,
        write: impl FnOnce(&mut SqliteStore) -> Result<T, StoreError>,
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
    /// fail (and a line when they work again, [`SqliteStore::write_succeeded`]); any other
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

    /// Reads the cached high-water marks and counts back from the file.
    fn reload(&mut self) -> Result<(), StoreError> {
        let meta = |key: &str| -> Result<i64, StoreError> {
            Ok(self
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
                .unwrap_or(0))
        };
        let (max_seq, max_time): (Option<i64>, Option<i64>) =
            self.conn
                .query_row("SELECT MAX(seq), MAX(time_us) FROM messages", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        let last_seq = meta("last_seq")?.max(max_seq.unwrap_or(0));
        let last_time = meta("last_time_us")?.max(max_time.unwrap_or(0));
        let members: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM members", [], |r| r.get(0))?;
        self.last_seq = u64::try_from(last_seq).unwrap_or(0);
        self.clock = MonotonicClock::after(Timestamp::from_micros(last_time));
        self.member_count = u64::try_from(members).unwrap_or(0);
        Ok(())
    }

    /// The first stored seq whose time is at or after `time_us`, `None` if every stored
    /// entry is older. A binary search over the primary key (time is strictly increasing
    /// with seq, PROTOCOL.md §5): about log2(entries) point reads, no index on time.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn first_seq_at(&self, time_us: i64) -> Result<Option<i64>, StoreError> {
        // The entry at the first seq >= `seq`, as (seq, time_us).
        let mut at = self.conn.prepare_cached(
            "SELECT seq, time_us FROM messages WHERE seq >= ?1 ORDER BY seq LIMIT 1",
        )?;
        let mut entry = |seq: i64| -> Result<Option<(i64, i64)>, StoreError> {
            Ok(at
                .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?)
        };
        let Some((first, first_time)) = entry(i64::MIN)? else {
            return Ok(None);
        };
        if first_time >= time_us {
            return Ok(Some(first));
        }
        // Invariant: the entry at `lo` is older than `time_us`; the answer is above `lo`
        // and at most `hi` (past the last seq: none).
        let (mut lo, mut hi) = (first, i64::try_from(self.last_seq).unwrap_or(i64::MAX) + 1);
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

    fn select_page(
        &self,
        sql: &str,
        param: i64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![param, i64::from(limit) + 1])?;
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

const SELECT: &str =
    "SELECT seq, id, time_us, sender, body, kind, sender_key, attachment FROM messages";

impl GroupStore for SqliteStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        self.aborted = false;
        self.changes_at_begin = self.conn.total_changes();
        let begun = (|| -> Result<(), StoreError> {
            self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            Ok(())
        })();
        begun.map_err(|e| self.write_failed(e))
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let result = (|| -> Result<(), StoreError> {
            if self.aborted {
                return Err(StoreError::Aborted);
            }
            if self.meta_dirty {
                let mut stmt = self.conn.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )?;
                stmt.execute(params!["last_seq", self.last_seq as i64])?;
                stmt.execute(params!["last_time_us", self.clock.last().as_micros()])?;
            }
            self.conn.prepare_cached("COMMIT")?.execute([])?;
            self.meta_dirty = false;
            Ok(())
        })();
        if let Err(e) = result {
            // Leave the connection usable and the caches true to what is on disk.
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            self.meta_dirty = false;
            self.aborted = false;
            self.reload()?;
            return Err(self.write_failed(e));
        }
        self.last_commit_wrote = self.conn.total_changes() > self.changes_at_begin;
        if self.last_commit_wrote {
            self.write_succeeded();
        }
        Ok(())
    }

    fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT user FROM members WHERE principal = ?1")?;
        let user: Option<String> = stmt.query_row([who.as_str()], |r| r.get(0)).optional()?;
        user.map(|u| UserName::new(u).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    fn add_member(
        &mut self,
        who: &Principal,
        user: &UserName,
        at: Timestamp,
    ) -> Result<(UserName, bool), StoreError> {
        self.write(|s| {
            if let Some(bound) = s.member(who)? {
                return Ok((bound, false));
            }
            let mut taken = s
                .conn
                .prepare_cached("SELECT 1 FROM members WHERE user = ?1")?;
            if taken.exists([user.as_str()])? {
                return Err(StoreError::LabelTaken(user.clone()));
            }
            let mut stmt = s.conn.prepare_cached(
                "INSERT INTO members (principal, user, joined_at_us) VALUES (?1, ?2, ?3)",
            )?;
            stmt.execute(params![who.as_str(), user.as_str(), at.as_micros()])?;
            s.member_count += 1;
            Ok((user.clone(), true))
        })
    }

    fn remove_member(&mut self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        self.write(|s| {
            let Some(bound) = s.member(who)? else {
                return Ok(None);
            };
            let mut stmt = s
                .conn
                .prepare_cached("DELETE FROM members WHERE principal = ?1")?;
            stmt.execute([who.as_str()])?;
            s.member_count = s.member_count.saturating_sub(1);
            Ok(Some(bound))
        })
    }

    fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT principal FROM members WHERE user = ?1")?;
        Ok(stmt
            .query_row([user.as_str()], |r| r.get::<_, String>(0))
            .optional()?
            .map(Principal::from_stored))
    }

    fn grant(&mut self, who: &Principal, grant: Grant, at: Timestamp) -> Result<bool, StoreError> {
        self.write(|s| {
            let mut stmt = s.conn.prepare_cached(
                "INSERT INTO grants (principal, kind, at_us) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )?;
            Ok(stmt.execute(params![who.as_str(), grant.as_str(), at.as_micros()])? == 1)
        })
    }

    fn revoke(&mut self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.write(|s| {
            let mut stmt = s
                .conn
                .prepare_cached("DELETE FROM grants WHERE principal = ?1 AND kind = ?2")?;
            Ok(stmt.execute(params![who.as_str(), grant.as_str()])? == 1)
        })
    }

    fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM grants WHERE principal = ?1 AND kind = ?2")?;
        Ok(stmt.exists(params![who.as_str(), grant.as_str()])?)
    }

    fn mode(&self) -> Result<GroupMode, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'mode'")?;
        let mode: Option<String> = stmt.query_row([], |r| r.get(0)).optional()?;
        Ok(match mode.as_deref() {
            Some("private") => GroupMode::Private,
            _ => GroupMode::Open,
        })
    }

    fn set_mode(&mut self, mode: GroupMode) -> Result<bool, StoreError> {
        self.write(|s| {
            if s.mode()? == mode {
                return Ok(false);
            }
            let mut stmt = s.conn.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('mode', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?;
            stmt.execute([mode.as_str()])?;
            Ok(true)
        })
    }

    fn members(&self) -> Result<Vec<Member>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT user, joined_at_us, principal FROM members ORDER BY user")?;
        let mut rows = stmt.query([])?;
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

    fn member_count(&self) -> u64 {
        self.member_count
    }

    fn append(&mut self, msg: NewMessage<'_>) -> Result<SendAck, StoreError> {
        self.write(|s| {
            let id = msg.id.unwrap_or_else(MessageId::new_v7);
            let seq = s.last_seq + 1;
            let mut clock = s.clock;
            let time = clock.tick(msg.now);
            // One statement in the common case: the id's UNIQUE index finds a retry while
            // inserting, instead of a lookup before every insert.
            let mut stmt = s.conn.prepare_cached(
                "INSERT INTO messages
                     (seq, id, time_us, sender, body, kind, sender_key, attachment, attachment_sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (id) DO NOTHING",
            )?;
            let attachment = msg.attachment.map(attachment_json).transpose()?;
            let inserted = stmt.execute(params![
                seq as i64,
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
                s.last_seq = seq;
                s.clock = clock;
                return Ok(SendAck {
                    seq,
                    id,
                    time,
                    duplicate: false,
                });
            }
            // A retry of a stored message: the same sender, body and attachment get the
            // stored ack.
            s.stored_ack(id, msg.sender, msg.body, attachment.as_deref())?
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
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, time_us, sender, body, attachment FROM messages WHERE id = ?1",
        )?;
        let found = stmt
            .query_row([id.as_bytes().as_slice()], |r| {
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
            .conn
            .prepare_cached("SELECT 1 FROM messages WHERE attachment_sha256 = ?1")?;
        Ok(stmt.exists([digest.as_bytes().as_slice()])?)
    }

    fn page(&self, query: HistoryQuery, limit: u32, max_bytes: usize) -> Result<Page, StoreError> {
        match query {
            HistoryQuery::AfterSeq(after) => self.select_page(
                &format!("{SELECT} WHERE seq > ?1 ORDER BY seq LIMIT ?2"),
                i64::try_from(after).unwrap_or(i64::MAX),
                limit,
                max_bytes,
            ),
            HistoryQuery::Since(t) => {
                // Time is monotonic in seq, so "since T" is "after the seq before T".
                match self.first_seq_at(t.as_micros())? {
                    Some(first) => self.select_page(
                        &format!("{SELECT} WHERE seq > ?1 ORDER BY seq LIMIT ?2"),
                        first - 1,
                        limit,
                        max_bytes,
                    ),
                    None => Ok(Page {
                        messages: Vec::new(),
                        more: false,
                    }),
                }
            }
            HistoryQuery::ById(id) => {
                let mut stmt = self
                    .conn
                    .prepare_cached(&format!("{SELECT} WHERE id = ?1"))?;
                let mut rows = stmt.query([id.as_bytes().as_slice()])?;
                let mut messages = Vec::new();
                if let Some(row) = rows.next()? {
                    messages.push(Self::row_to_message(row)?);
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
                // Newest first straight off the primary key (no temporary table), cut at n.
                let mut page = self.select_page(
                    &format!("{SELECT} ORDER BY seq DESC LIMIT min(?1, ?2)"),
                    i64::from(n),
                    n,
                    max_bytes,
                )?;
                page.messages.reverse();
                Ok(page)
            }
        }
    }

    fn last_commit_wrote(&self) -> bool {
        self.last_commit_wrote
    }

    fn last_seq(&self) -> u64 {
        self.last_seq
    }

    fn flusher(&self) -> Box<dyn Flush> {
        match self.durability {
            Durability::Commit => Box::new(super::Durable),
            Durability::Deferred => Box::new(self.wal_sync()),
        }
    }

    fn checkpoints(&self) -> Result<Option<Checkpointer>, StoreError> {
        match self.durability {
            Durability::Commit => Ok(None),
            Durability::Deferred => self.checkpointer().map(Some),
        }
    }

    fn stored_bytes(&self) -> u64 {
        [self.path.clone(), wal_path(&self.path)]
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }

    fn apply_retention(&mut self, policy: Retention, now: Timestamp) -> Result<u64, StoreError> {
        self.write(|s| {
            let mut deleted = 0;
            if let Some(max) = policy.max_messages {
                let keep_from = s.last_seq.saturating_sub(max);
                let mut stmt = s
                    .conn
                    .prepare_cached("DELETE FROM messages WHERE seq <= ?1")?;
                deleted += stmt.execute([i64::try_from(keep_from).unwrap_or(i64::MAX)])? as u64;
            }
            if let Some(age) = policy.max_age {
                let cutoff = now.saturating_sub(age);
                // Everything before the first entry at or after the cutoff (all of it if none).
                let keep_from = s.first_seq_at(cutoff.as_micros())?.unwrap_or(i64::MAX);
                let mut stmt = s
                    .conn
                    .prepare_cached("DELETE FROM messages WHERE seq < ?1")?;
                deleted += stmt.execute([keep_from])? as u64;
            }
            if deleted > 0 {
                s.meta_dirty = true;
            }
            Ok(deleted)
        })
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
