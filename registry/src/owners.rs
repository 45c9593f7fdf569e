//! Who owns each group name: the CURVE key that first registered it.
//!
//! Bindings are durable (SQLite in the registry's data directory, `registry.sqlite3`, WAL,
//! `synchronous=FULL`), unlike the directory itself: a name stays bound to its key across
//! registry restarts and after its node stops heartbeating. Only an operator releases a
//! name (`registry release NAME`), which works while the registry runs.
//!
//! A binding lapses once its group has not registered for the registry's `--name-lapse`
//! (default 30 days): the name is free again. A key owns at most `--max-names-per-key`
//! names (default 100) that have not lapsed.
//!
//! # Schema (version 3, in `PRAGMA user_version`)
//! `owners(name TEXT PRIMARY KEY, key TEXT NOT NULL, bound_at_us INTEGER NOT NULL,
//! seen_at_us INTEGER)`, the key in Z85, `seen_at_us` the last `register` by the owner
//! (recorded at most every tenth of the lapse; `NULL`: never since binding), index on `key`.
//! Version 1 had no `seen_at_us`; opening adds it. Opening a database of version 1 or 2
//! sets every `NULL` `seen_at_us` to the time of opening, so that bindings made before
//! lapsing existed lapse a full `--name-lapse` after the upgrade, not at once.

use std::path::Path;
use std::time::Duration;

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::GroupName;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

/// Ownership store failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OwnersError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored key does not parse (hand-edited or damaged file).
    #[error("corrupt owner key for {name}: {key}")]
    Corrupt {
        /// The group name.
        name: String,
        /// The stored text.
        key: String,
    },
}

/// The SQLite VFS of every connection to `registry.sqlite3`: `unix-excl`.
///
/// Why: SQLite's default VFS keeps the WAL index in the `-shm` file, mapped into memory and
/// shared between processes. When the kernel will not let that file be written (made
/// immutable, or on a file system that turned read-only after an error), a write to a
/// mapped page is not an error SQLite can return but SIGBUS, which killed the registry
/// (issue 23). With `unix-excl` the first connection of the process takes an exclusive lock
/// on the database file, held until its last connection closes, and the WAL index lives in
/// heap memory shared by the process's connections (owners, accounts, mailboxes): no file
/// is mapped, every failed write is an error, and no `-shm` file is made. No other process
/// can open the database meanwhile: `registry release` asks the running registry instead
/// (its `release` action).
pub const VFS: &str = "unix-excl";

/// How long a connection waits for a lock held by another connection: 5 s.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating it and its directory if needed) the registry's durable store,
/// `dir/registry.sqlite3`, in WAL mode with `synchronous=FULL`, through [`VFS`] with
/// memory-mapped I/O off (`mmap_size=0`), waiting [`BUSY_TIMEOUT`] for a lock. Owners,
/// accounts and mailboxes each keep a connection to it. The directory is made 0700 and the
/// database file 0600 before SQLite opens it, and looser existing ones are tightened
/// (logged), as [`private_sqlite`] says.
///
/// # Errors
/// [`OwnersError::Sqlite`] (also for a directory that cannot be created).
pub fn open_db(dir: &Path) -> Result<Connection, OwnersError> {
    open_db_waiting(dir, BUSY_TIMEOUT)
}

/// [`open_db`], waiting at most `busy` for a lock: `Duration::ZERO` fails at once with
/// SQLite's `SQLITE_BUSY` ([`is_busy`]) when another process (a running registry) holds
/// the database.
///
/// # Errors
/// As [`open_db`].
pub fn open_db_waiting(dir: &Path, busy: Duration) -> Result<Connection, OwnersError> {
    // Private before SQLite creates anything: its -wal file takes the database file's mode
    // (0600).
    let db = dir.join("registry.sqlite3");
    private_sqlite(dir, &db).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let conn = Connection::open_with_flags_and_vfs(&db, OpenFlags::default(), VFS)?;
    conn.busy_timeout(busy)?;
    // Before the first access: a mapped database file would fault as the -shm file did.
    conn.execute_batch("PRAGMA mmap_size=0;")?;
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    conn.execute_batch("PRAGMA synchronous=FULL;")?;
    Ok(conn)
}

/// Whether `e` is SQLite's "database is busy/locked": another process holds the database
/// (under [`VFS`], a running registry).
pub fn is_busy(e: &OwnersError) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        OwnersError::Sqlite(e) => matches!(
            e.sqlite_error_code(),
            Some(C::DatabaseBusy | C::DatabaseLocked)
        ),
        OwnersError::Corrupt { .. } => false,
    }
}

/// Whether `e` is the file system refusing a write (an I/O error, a full disk, a read-only
/// or immutable file, a file that cannot be opened), as opposed to the statement itself
/// failing (a constraint, a locked database).
pub fn refused_by_file_system(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    matches!(
        e.sqlite_error_code(),
        Some(C::SystemIoFailure | C::DiskFull | C::ReadOnly | C::CannotOpen | C::PermissionDenied)
    )
}

/// Makes the registry's SQLite files private: `dir` 0700, `db` created 0600 before SQLite
/// opens it (SQLite gives the `-wal` and `-shm` files it creates the database file's mode),
/// and existing looser ones tightened to 0700 / 0600, each change logged.
///
/// # Errors
/// The I/O error of creating or tightening any of them.
pub fn private_sqlite(dir: &Path, db: &Path) -> std::io::Result<()> {
    use agora_common::fsmode;
    fsmode::private_dir(dir)?;
    // An existing file is only chmodded, never opened: closing a descriptor of it would drop
    // the lock this process's first connection holds on it (POSIX locks are per process),
    // and let another process open the database beside the registry ([`VFS`]).
    if db.exists() {
        fsmode::tighten(db, fsmode::FILE_MODE)?;
    } else {
        fsmode::private_file(db)?;
    }
    for suffix in ["-wal", "-shm"] {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        fsmode::tighten(Path::new(&path), fsmode::FILE_MODE)?;
    }
    Ok(())
}

/// Name → owner key bindings.
#[derive(Debug)]
pub struct Owners {
    conn: Connection,
}

impl Owners {
    /// Opens or creates the bindings in `dir/registry.sqlite3`.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn open(dir: &Path) -> Result<Owners, OwnersError> {
        Owners::open_waiting(dir, BUSY_TIMEOUT)
    }

    /// [`Owners::open`], waiting at most `busy` for a lock held by another process (see
    /// [`open_db_waiting`]).
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`]; [`is_busy`] tells a database that another process holds.
    pub fn open_waiting(dir: &Path, busy: Duration) -> Result<Owners, OwnersError> {
        let mut conn = open_db_waiting(dir, busy)?;
        let tx = conn.transaction()?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS owners (
                 name TEXT PRIMARY KEY,
                 key TEXT NOT NULL,
                 bound_at_us INTEGER NOT NULL) WITHOUT ROWID;",
        )?;
        let has_seen: bool = tx
            .prepare("SELECT 1 FROM pragma_table_info('owners') WHERE name = 'seen_at_us'")?
            .exists([])?;
        if !has_seen {
            tx.execute_batch("ALTER TABLE owners ADD COLUMN seen_at_us INTEGER;")?;
        }
        if version < 3 {
            // Bindings made before lapsing existed (or under version 2, which left them
            // NULL) count as seen now: their groups had no reason to register, and
            // without this every name bound more than a lapse ago would be free at once.
            tx.execute(
                "UPDATE owners SET seen_at_us = ?1 WHERE seen_at_us IS NULL",
                [Timestamp::now().as_micros()],
            )?;
        }
        tx.execute_batch(
            "CREATE INDEX IF NOT EXISTS owners_key ON owners(key);
             PRAGMA user_version = 3;",
        )?;
        tx.commit()?;
        Ok(Owners { conn })
    }

    /// Begins a transaction, so that many claims (one `register_groups`) cost one commit
    /// and one sync instead of one each; [`Owners::commit`] or [`Owners::rollback`] ends it.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn begin(&self) -> Result<(), OwnersError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    /// Commits the transaction of [`Owners::begin`].
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`] (the transaction is rolled back).
    pub fn commit(&self) -> Result<(), OwnersError> {
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            self.rollback();
            return Err(e.into());
        }
        Ok(())
    }

    /// Rolls the transaction of [`Owners::begin`] back, if one is open.
    pub fn rollback(&self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// `name`'s binding: its key, and the last time its group registered (or was bound).
    ///
    /// # Errors
    /// [`OwnersError`].
    pub fn binding(&self, name: &GroupName) -> Result<Option<(PublicKey, Timestamp)>, OwnersError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, COALESCE(seen_at_us, bound_at_us) FROM owners WHERE name = ?1",
        )?;
        let row: Option<(String, i64)> = stmt
            .query_row([name.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(k, seen)| {
            let key = k.parse().map_err(|_| OwnersError::Corrupt {
                name: name.to_string(),
                key: k,
            })?;
            Ok((key, Timestamp::from_micros(seen)))
        })
        .transpose()
    }

    /// Records that `name`'s group registered at `now` (keeps its binding from lapsing).
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn seen(&self, name: &GroupName, now: Timestamp) -> Result<(), OwnersError> {
        let mut stmt = self
            .conn
            .prepare_cached("UPDATE owners SET seen_at_us = ?2 WHERE name = ?1")?;
        stmt.execute(params![name.as_str(), now.as_micros()])?;
        Ok(())
    }

    /// How many names `key` owns whose group registered (or was bound) after `since`.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn count_live(&self, key: &PublicKey, since: Timestamp) -> Result<u64, OwnersError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT COUNT(*) FROM owners WHERE key = ?1 AND COALESCE(seen_at_us, bound_at_us) > ?2",
        )?;
        let n: i64 = stmt.query_row(params![key.to_string(), since.as_micros()], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The key `name` is bound to, if any.
    ///
    /// # Errors
    /// [`OwnersError`].
    pub fn owner(&self, name: &GroupName) -> Result<Option<PublicKey>, OwnersError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key FROM owners WHERE name = ?1")?;
        let key: Option<String> = stmt.query_row([name.as_str()], |r| r.get(0)).optional()?;
        key.map(|k| {
            k.parse().map_err(|_| OwnersError::Corrupt {
                name: name.to_string(),
                key: k,
            })
        })
        .transpose()
    }

    /// Binds `name` to `key` (committed before this returns).
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`], also when the name is already bound.
    pub fn bind(
        &self,
        name: &GroupName,
        key: &PublicKey,
        now: Timestamp,
    ) -> Result<(), OwnersError> {
        let mut stmt = self
            .conn
            .prepare_cached("INSERT INTO owners (name, key, bound_at_us) VALUES (?1, ?2, ?3)")?;
        stmt.execute(params![name.as_str(), key.to_string(), now.as_micros()])?;
        Ok(())
    }

    /// Unbinds `name`; returns whether it was bound.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn release(&self, name: &GroupName) -> Result<bool, OwnersError> {
        Ok(self
            .conn
            .execute("DELETE FROM owners WHERE name = ?1", [name.as_str()])?
            == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_survive_reopen_and_release() {
        let dir = tempfile::tempdir().expect("tmp");
        let name = GroupName::new("Cool Group").expect("name");
        let key = agora_common::keys::Keypair::generate()
            .expect("keys")
            .public;
        {
            let o = Owners::open(dir.path()).expect("open");
            assert_eq!(o.owner(&name).expect("q"), None);
            o.bind(&name, &key, Timestamp::now()).expect("bind");
        }
        let o = Owners::open(dir.path()).expect("reopen");
        assert_eq!(o.owner(&name).expect("q"), Some(key));
        assert!(o.release(&name).expect("release"));
        assert!(!o.release(&name).expect("release again"));
        assert_eq!(o.owner(&name).expect("q"), None);
    }
}
