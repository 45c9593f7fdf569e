//! Who owns each group name: the CURVE key that first registered it.
//!
//! Bindings are durable (SQLite in the registry's data directory, `registry.sqlite3`, WAL,
//! `synchronous=FULL`), unlike the directory itself: a name stays bound to its key across
//! registry restarts and after its node stops heartbeating. Only an operator releases a
//! name (`registry release NAME`), which works while the registry runs.
//!
//! # Schema (version 1, in `PRAGMA user_version`)
//! `owners(name TEXT PRIMARY KEY, key TEXT NOT NULL, bound_at_us INTEGER NOT NULL)`, the key
//! in Z85.

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
/// mailboxes each keep a connection to it.
///
/// # Errors
/// [`OwnersError::Sqlite`] (also for a directory that cannot be created).
pub fn open_db(dir: &Path) -> Result<Connection, OwnersError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let conn = Connection::open(dir.join("registry.sqlite3"))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    conn.execute_batch("PRAGMA synchronous=FULL;")?;
    Ok(conn)
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
        let conn = open_db(dir)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS owners (
                 name TEXT PRIMARY KEY,
                 key TEXT NOT NULL,
                 bound_at_us INTEGER NOT NULL) WITHOUT ROWID;
             PRAGMA user_version = 1;",
        )?;
        Ok(Owners { conn })
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
