//! User accounts: a user name bound to the CURVE key that registered it, durably.
//!
//! Stored beside the group-name owners in `registry.sqlite3` (WAL, `synchronous=FULL`):
//! `users(name TEXT PRIMARY KEY, key TEXT NOT NULL UNIQUE, registered_at_us INTEGER,
//! last_seen_us INTEGER)`, the key in Z85. A key holds at most one account.
//!
//! Blocks (PROTOCOL §4.6.2) are in `blocks(blocker TEXT, blocked_key TEXT, blocked_name
//! TEXT, since_us INTEGER)`, primary key `(blocker, blocked_key)`, index on `blocked_key`:
//! keys in Z85, the name as it was when blocked. A block holds for the blocked key, whatever name it takes later.

use std::path::Path;

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{BlockedEntry, UserEntry, UserName};
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
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS blocks (
                 blocker TEXT NOT NULL,
                 blocked_key TEXT NOT NULL,
                 blocked_name TEXT NOT NULL,
                 since_us INTEGER NOT NULL,
                 PRIMARY KEY (blocker, blocked_key)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS blocks_blocked ON blocks(blocked_key);",
        )?;
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

    /// Makes `blocker` refuse DMs from `blocked` (its key, and its name for listing), unless
    /// `blocker` blocks `max` users already. Returns `Some(changed)`, or `None` when full.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn block(
        &self,
        blocker: &PublicKey,
        blocked: &UserEntry,
        now: Timestamp,
        max: u64,
    ) -> Result<Option<bool>, OwnersError> {
        let (by, key) = (blocker.to_string(), blocked.key.to_string());
        let held: bool = self
            .conn
            .prepare_cached("SELECT 1 FROM blocks WHERE blocker = ?1 AND blocked_key = ?2")?
            .exists(params![by, key])?;
        if held {
            return Ok(Some(false));
        }
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM blocks WHERE blocker = ?1",
            [&by],
            |r| r.get(0),
        )?;
        if u64::try_from(n).unwrap_or(u64::MAX) >= max {
            return Ok(None);
        }
        self.conn.execute(
            "INSERT INTO blocks (blocker, blocked_key, blocked_name, since_us)
             VALUES (?1, ?2, ?3, ?4)",
            params![by, key, blocked.name.as_str(), now.as_micros()],
        )?;
        Ok(Some(true))
    }

    /// Lifts `blocker`'s block of the user blocked under `name` (or whose account now has
    /// that name, `key`); returns whether there was one.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn unblock(
        &self,
        blocker: &PublicKey,
        name: &UserName,
        key: Option<&PublicKey>,
    ) -> Result<bool, OwnersError> {
        let key = key.map(|k| k.to_string()).unwrap_or_default();
        Ok(self.conn.execute(
            "DELETE FROM blocks WHERE blocker = ?1 AND (blocked_name = ?2 OR blocked_key = ?3)",
            params![blocker.to_string(), name.as_str(), key],
        )? > 0)
    }

    /// Whether `blocker` blocks `sender`.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn blocks(&self, blocker: &PublicKey, sender: &PublicKey) -> Result<bool, OwnersError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM blocks WHERE blocker = ?1 AND blocked_key = ?2")?
            .exists(params![blocker.to_string(), sender.to_string()])?)
    }

    /// The keys of the accounts that block `sender`.
    ///
    /// # Errors
    /// [`OwnersError`].
    pub fn blockers_of(
        &self,
        sender: &PublicKey,
    ) -> Result<std::collections::HashSet<PublicKey>, OwnersError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT blocker FROM blocks WHERE blocked_key = ?1")?;
        let rows = stmt.query_map([sender.to_string()], |r| r.get::<_, String>(0))?;
        let mut out = std::collections::HashSet::new();
        for row in rows {
            let key = row?;
            out.insert(key.parse().map_err(|_| OwnersError::Corrupt {
                name: "(a blocker)".into(),
                key,
            })?);
        }
        Ok(out)
    }

    /// The users `blocker` blocks, sorted by name.
    ///
    /// # Errors
    /// [`OwnersError`].
    pub fn blocked(&self, blocker: &PublicKey) -> Result<Vec<BlockedEntry>, OwnersError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT blocked_name, blocked_key, since_us FROM blocks WHERE blocker = ?1
             ORDER BY blocked_name, blocked_key",
        )?;
        let rows = stmt.query_map([blocker.to_string()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, key, since) = row?;
            let corrupt = || OwnersError::Corrupt {
                name: name.clone(),
                key: key.clone(),
            };
            out.push(BlockedEntry {
                name: UserName::new(name.clone()).map_err(|_| corrupt())?,
                key: key.parse().map_err(|_| corrupt())?,
                since: Timestamp::from_micros(since),
            });
        }
        Ok(out)
    }

    /// Removes every block `blocker` holds (its account is removed).
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn remove_blocks(&self, blocker: &PublicKey) -> Result<(), OwnersError> {
        self.conn.execute(
            "DELETE FROM blocks WHERE blocker = ?1",
            [blocker.to_string()],
        )?;
        Ok(())
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
