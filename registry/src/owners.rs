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
use rusqlite::{params, Connection, OptionalExtension};

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

/// Opens (creating it and its directory if needed) the registry's durable store,
/// `dir/registry.sqlite3`, in WAL mode with `synchronous=FULL`. Owners, accounts and
/// mailboxes each keep a connection to it. The directory is made 0700 and the database file
/// 0600 before SQLite opens it, and looser existing ones are tightened (logged), as
/// [`private_sqlite`] says.
///
/// # Errors
/// [`OwnersError::Sqlite`] (also for a directory that cannot be created).
pub fn open_db(dir: &Path) -> Result<Connection, OwnersError> {
    // Private before SQLite creates anything: its -wal and -shm files take the database
    // file's mode (0600).
    let db = dir.join("registry.sqlite3");
    private_sqlite(dir, &db).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let conn = Connection::open(&db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    conn.execute_batch("PRAGMA synchronous=FULL;")?;
    Ok(conn)
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
    fsmode::private_file(db)?;
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
        let mut conn = open_db(dir)?;
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
