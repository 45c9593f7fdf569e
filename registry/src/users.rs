//! User accounts: a user name bound to the CURVE key that registered it, durably.
//!
//! Stored beside the group-name owners in `registry.sqlite3` (WAL, `synchronous=FULL`):
//! `users(name TEXT PRIMARY KEY, key TEXT NOT NULL UNIQUE, registered_at_us INTEGER,
//! last_seen_us INTEGER)`, the key in Z85. A key holds at most one account.

use std::path::Path;

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{UserEntry, UserName};
use rusqlite::{params, Connection, OptionalExtension};

use crate::owners::{open_db, OwnersError};

/// The account store.
#[derive(Debug)]
pub struct Users {
    conn: Connection,
}

impl Users {
    /// Opens or creates the accounts in `dir/registry.sqlite3`.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn open(dir: &Path) -> Result<Users, OwnersError> {
        let conn = open_db(dir)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS users (
                 name TEXT PRIMARY KEY,
                 key TEXT NOT NULL UNIQUE,
                 registered_at_us INTEGER NOT NULL,
                 last_seen_us INTEGER) WITHOUT ROWID;",
        )?;
        let has_last_seen: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('users') WHERE name = 'last_seen_us'")?
            .exists([])?;
        if !has_last_seen {
            conn.execute_batch("ALTER TABLE users ADD COLUMN last_seen_us INTEGER;")?;
        }
        Ok(Users { conn })
    }

    fn row(
        name: String,
        key: String,
        at: i64,
        seen: Option<i64>,
    ) -> Result<UserEntry, OwnersError> {
        let corrupt = || OwnersError::Corrupt {
            name: name.clone(),
            key: key.clone(),
        };
        Ok(UserEntry {
            name: UserName::new(name.clone()).map_err(|_| corrupt())?,
            key: key.parse().map_err(|_| corrupt())?,
            registered_at: Timestamp::from_micros(at),
            presence: agora_proto::wire::Presence::Offline,
            last_seen: seen.map(Timestamp::from_micros),
        })
    }

    /// Records that `key`'s session was live at `at`.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn seen(&self, key: &PublicKey, at: Timestamp) -> Result<(), OwnersError> {
        let mut stmt = self
            .conn
            .prepare_cached("UPDATE users SET last_seen_us = ?2 WHERE key = ?1")?;
        stmt.execute(params![key.to_string(), at.as_micros()])?;
        Ok(())
    }

    /// The account named `name`.
    ///
    /// # Errors
    /// [`OwnersError`].
    pub fn by_name(&self, name: &UserName) -> Result<Option<UserEntry>, OwnersError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, key, registered_at_us, last_seen_us FROM users WHERE name = ?1",
        )?;
        let row = stmt
            .query_row([name.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        row.map(|(n, k, a, l)| Self::row(n, k, a, l)).transpose()
    }

    /// The account `key` holds.
    ///
    /// # Errors
    /// [`OwnersError`].
    pub fn by_key(&self, key: &PublicKey) -> Result<Option<UserEntry>, OwnersError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, key, registered_at_us, last_seen_us FROM users WHERE key = ?1",
        )?;
        let row = stmt
            .query_row([key.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        row.map(|(n, k, a, l)| Self::row(n, k, a, l)).transpose()
    }

    /// Creates the account (committed before this returns); false, storing nothing, when
    /// the name or the key already holds an account.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn insert(&self, entry: &UserEntry) -> Result<bool, OwnersError> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO users (name, key, registered_at_us) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )?;
        let inserted = stmt.execute(params![
            entry.name.as_str(),
            entry.key.to_string(),
            entry.registered_at.as_micros()
        ])?;
        Ok(inserted == 1)
    }

    /// Removes the account; returns whether it existed.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn remove(&self, name: &UserName) -> Result<bool, OwnersError> {
        Ok(self
            .conn
            .execute("DELETE FROM users WHERE name = ?1", [name.as_str()])?
            == 1)
    }

    /// How many accounts there are.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn count(&self) -> Result<u64, OwnersError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Every account, sorted by name.
    ///
    /// # Errors
    /// [`OwnersError`].
    pub fn all(&self) -> Result<Vec<UserEntry>, OwnersError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, key, registered_at_us, last_seen_us FROM users ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (n, k, a, l) = row?;
            out.push(Self::row(n, k, a, l)?);
        }
        Ok(out)
    }
}
