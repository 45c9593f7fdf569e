//! Direct-message mailboxes and dead letters, durable in `registry.sqlite3` (WAL,
//! `synchronous=FULL`; each change commits before its reply).
//!
//! # Schema
//! - `mailbox(recipient, n, id UNIQUE, sender, sender_key, time_us, body, acked)`, primary
//!   key `(recipient, n)`: the recipient is its key (Z85), so a name re-registered by another
//!   key never sees old mail; `n` counts 1, 2, 3, … per recipient (`mailbox_next` keeps the
//!   counter, so acked numbers are never reused); index on `time_us` for expiry. An acked
//!   message stays, marked `acked = 1` and no longer shown or counted, until the DM TTL
//!   passes: its id keeps answering a retry with `duplicate: true` (PROTOCOL §4.6).
//! - `dead_letters(sender_key, n, time_us, recipient, reason, body)`: undeliverable messages
//!   per sender, with the reason.

use std::path::Path;

use agora_common::keys::PublicKey;
use agora_proto::id::MessageId;
use agora_proto::time::{MonotonicClock, Timestamp};
use agora_proto::wire::{DeadLetter, Dm, UserName};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::value::RawValue;

use crate::owners::{open_db, OwnersError};
use crate::store::StoreError;

/// Why a message could not be stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// The recipient's mailbox holds its maximum.
    #[error("mailbox full")]
    Full,
    /// The sender holds its share of the recipient's mailbox ([`Mailboxes::with_share`]).
    #[error("the sender's share of the mailbox is full")]
    ShareFull,
    /// The id is already used by another message.
    #[error("id {0} is already used by another message")]
    IdConflict(MessageId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<OwnersError> for MailboxError {
    fn from(e: OwnersError) -> Self {
        MailboxError::Store(StoreError::Sqlite(e))
    }
}

impl From<rusqlite::Error> for MailboxError {
    fn from(e: rusqlite::Error) -> Self {
        MailboxError::Store(StoreError::Sqlite(OwnersError::Sqlite(e)))
    }
}

/// Mailboxes and dead letters.
#[derive(Debug)]
pub struct Mailboxes {
    conn: Connection,
    clock: MonotonicClock,
    /// The most messages one sender may have waiting in one mailbox.
    share: u64,
}

/// What became of one copy of a multicast ([`Mailboxes::store_many`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copy {
    /// In the recipient's mailbox (now, or by an earlier try when `duplicate`).
    Stored {
        /// The recipient's key.
        recipient: PublicKey,
        /// Its number in that mailbox.
        n: u64,
        /// The copy's id.
        id: MessageId,
        /// When it was stored.
        time: Timestamp,
        /// Stored by an earlier try of the same id.
        duplicate: bool,
    },
    /// The recipient (by name) has a full mailbox: dead-lettered.
    Full(UserName),
    /// The sender holds its share of the recipient's (by name) mailbox: dead-lettered.
    ShareFull(UserName),
}

/// The id of the copy of message `id` for `recipient`: the first 16 bytes of
/// SHA-256(`agora/copy` ‖ id ‖ recipient key), as a UUIDv8 (RFC 9562 §5.8). The same
/// message and recipient always give the same id, so a retried multicast stores no copy
/// twice.
pub fn copy_id(id: &MessageId, recipient: &PublicKey) -> MessageId {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"agora/copy");
    h.update(id.as_bytes());
    h.update(recipient.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    MessageId::from_bytes(bytes)
}

/// Records one dead letter from `sender_key` (Z85) to `to` on `conn` (or a transaction).
fn dead_letter(
    conn: &Connection,
    sender_key: &str,
    to: &str,
    reason: &str,
    body: &RawValue,
    now: Timestamp,
) -> Result<(), OwnersError> {
    let next: i64 = conn.query_row(
        "SELECT COALESCE(MAX(n), 0) + 1 FROM dead_letters WHERE sender_key = ?1",
        [sender_key],
        |r| r.get(0),
    )?;
    conn.execute(
        "INSERT INTO dead_letters (sender_key, n, time_us, recipient, reason, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![sender_key, next, now.as_micros(), to, reason, body.get()],
    )?;
    // Bounded: a sender keeps its newest MAX_DEAD_LETTERS.
    conn.execute(
        "DELETE FROM dead_letters WHERE sender_key = ?1 AND n <= ?2",
        params![sender_key, next - MAX_DEAD_LETTERS],
    )?;
    Ok(())
}

/// Dead letters kept per sender: the newest 1,000.
pub const MAX_DEAD_LETTERS: i64 = 1000;

/// A stored message's number, id, time, and whether it was a retry.
pub type Stored = (u64, MessageId, Timestamp, bool);

impl Mailboxes {
    /// Opens or creates the tables in `dir/registry.sqlite3`.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn open(dir: &Path) -> Result<Mailboxes, OwnersError> {
        let conn = open_db(dir)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS mailbox (
                 recipient TEXT NOT NULL,
                 n INTEGER NOT NULL,
                 id BLOB NOT NULL UNIQUE,
                 sender TEXT NOT NULL,
                 sender_key TEXT NOT NULL,
                 time_us INTEGER NOT NULL,
                 body TEXT NOT NULL,
                 acked INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (recipient, n)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS mailbox_time ON mailbox(time_us);
             CREATE TABLE IF NOT EXISTS mailbox_next (
                 recipient TEXT PRIMARY KEY,
                 next_n INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS dead_letters (
                 sender_key TEXT NOT NULL,
                 n INTEGER NOT NULL,
                 time_us INTEGER NOT NULL,
                 recipient TEXT NOT NULL,
                 reason TEXT NOT NULL,
                 body TEXT NOT NULL,
                 PRIMARY KEY (sender_key, n)) WITHOUT ROWID;",
        )?;
        // Registries before the `acked` column deleted acked messages; add it to their table.
        let has_acked: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('mailbox') WHERE name = 'acked'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_acked {
            conn.execute_batch("ALTER TABLE mailbox ADD COLUMN acked INTEGER NOT NULL DEFAULT 0;")?;
        }
        let last: Option<i64> =
            conn.query_row("SELECT MAX(time_us) FROM mailbox", [], |r| r.get(0))?;
        Ok(Mailboxes {
            conn,
            clock: MonotonicClock::after(Timestamp::from_micros(last.unwrap_or(0))),
            share: u64::MAX,
        })
    }

    /// Lets one sender have at most `share` messages waiting in any one mailbox (default:
    /// no limit besides the mailbox's own maximum); past it, a store is
    /// [`MailboxError::ShareFull`] ([`Copy::ShareFull`] for a copy).
    pub fn with_share(self, share: u64) -> Mailboxes {
        Mailboxes { share, ..self }
    }

    /// Stores a message for `recipient` (at most `max` waiting); a retry with the same id,
    /// sender and body (byte for byte) returns the first result, also after the recipient
    /// acked it, until the DM TTL expires it.
    ///
    /// # Errors
    /// [`MailboxError::Full`], [`MailboxError::IdConflict`], [`MailboxError::Store`].
    #[allow(clippy::too_many_arguments)]
    pub fn store(
        &mut self,
        recipient: &PublicKey,
        sender: &UserName,
        sender_key: &PublicKey,
        id: Option<MessageId>,
        body: &RawValue,
        now: Timestamp,
        max: u64,
    ) -> Result<Stored, MailboxError> {
        let to = recipient.to_string();
        if let Some(id) = id {
            let found: Option<(i64, i64, String, String, String)> = self
                .conn
                .query_row(
                    "SELECT n, time_us, recipient, sender_key, body FROM mailbox WHERE id = ?1",
                    [id.as_bytes().as_slice()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()?;
            if let Some((n, t, r, k, b)) = found {
                if r == to && k == sender_key.to_string() && b == body.get() {
                    return Ok((
                        u64::try_from(n).unwrap_or(0),
                        id,
                        Timestamp::from_micros(t),
                        true,
                    ));
                }
                return Err(MailboxError::IdConflict(id));
            }
        }
        let tx = self.conn.transaction()?;
        let (waiting, mine): (i64, i64) = tx.query_row(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE sender_key = ?2) FROM mailbox
             WHERE recipient = ?1 AND acked = 0",
            params![&to, sender_key.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if u64::try_from(waiting).unwrap_or(u64::MAX) >= max {
            return Err(MailboxError::Full);
        }
        if u64::try_from(mine).unwrap_or(u64::MAX) >= self.share {
            return Err(MailboxError::ShareFull);
        }
        let next: i64 = tx
            .query_row(
                "SELECT next_n FROM mailbox_next WHERE recipient = ?1",
                [&to],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(1);
        let id = id.unwrap_or_else(MessageId::new_v7);
        let mut clock = self.clock;
        let time = clock.tick(now);
        tx.execute(
            "INSERT INTO mailbox (recipient, n, id, sender, sender_key, time_us, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                to,
                next,
                id.as_bytes().as_slice(),
                sender.as_str(),
                sender_key.to_string(),
                time.as_micros(),
                body.get()
            ],
        )?;
        tx.execute(
            "INSERT INTO mailbox_next (recipient, next_n) VALUES (?1, ?2)
             ON CONFLICT (recipient) DO UPDATE SET next_n = excluded.next_n",
            params![to, next + 1],
        )?;
        tx.commit()?;
        self.clock = clock;
        Ok((u64::try_from(next).unwrap_or(0), id, time, false))
    }

    /// Stores one message's copies, one per recipient (each with its own id: see
    /// [`copy_id`]), at most `max` waiting in each mailbox (and the sender's share of it),
    /// and dead-letters the recipients in `refused` (name and reason: `unknown_user`,
    /// `blocked`), those whose mailbox is full (`mailbox_full`) and those whose mailbox holds
    /// the sender's share (`share_full`):
    /// all in one transaction, so a broadcast to thousands costs one commit. A copy whose id
    /// is already stored with the same sender and body is a duplicate (a retry).
    ///
    /// # Errors
    /// [`MailboxError::IdConflict`] when a copy's id holds another message (nothing is
    /// stored); [`MailboxError::Store`].
    #[allow(clippy::too_many_arguments)]
    pub fn store_many(
        &mut self,
        copies: &[(PublicKey, UserName, MessageId)],
        refused: &[(String, &'static str)],
        sender: &UserName,
        sender_key: &PublicKey,
        body: &RawValue,
        now: Timestamp,
        max: u64,
    ) -> Result<Vec<Copy>, MailboxError> {
        let from = sender_key.to_string();
        let share = self.share;
        let mut clock = self.clock;
        let tx = self.conn.transaction()?;
        let mut out = Vec::with_capacity(copies.len());
        let mut dead: Vec<(&str, &str)> = refused
            .iter()
            .map(|(n, reason)| (n.as_str(), *reason))
            .collect();
        {
            let mut by_id = tx.prepare_cached(
                "SELECT n, time_us, recipient, sender_key, body FROM mailbox WHERE id = ?1",
            )?;
            let mut waiting = tx.prepare_cached(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE sender_key = ?2) FROM mailbox
                 WHERE recipient = ?1 AND acked = 0",
            )?;
            let mut next_n =
                tx.prepare_cached("SELECT next_n FROM mailbox_next WHERE recipient = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO mailbox (recipient, n, id, sender, sender_key, time_us, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut bump = tx.prepare_cached(
                "INSERT INTO mailbox_next (recipient, next_n) VALUES (?1, ?2)
                 ON CONFLICT (recipient) DO UPDATE SET next_n = excluded.next_n",
            )?;
            for (recipient, name, id) in copies {
                let to = recipient.to_string();
                let found: Option<(i64, i64, String, String, String)> = by_id
                    .query_row([id.as_bytes().as_slice()], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()?;
                if let Some((n, t, r, k, b)) = found {
                    if r == to && k == from && b == body.get() {
                        out.push(Copy::Stored {
                            recipient: *recipient,
                            n: u64::try_from(n).unwrap_or(0),
                            id: *id,
                            time: Timestamp::from_micros(t),
                            duplicate: true,
                        });
                        continue;
                    }
                    return Err(MailboxError::IdConflict(*id));
                }
                let (held, mine): (i64, i64) =
                    waiting.query_row(params![&to, &from], |r| Ok((r.get(0)?, r.get(1)?)))?;
                if u64::try_from(held).unwrap_or(u64::MAX) >= max {
                    out.push(Copy::Full(name.clone()));
                    dead.push((name.as_str(), "mailbox_full"));
                    continue;
                }
                if u64::try_from(mine).unwrap_or(u64::MAX) >= share {
                    out.push(Copy::ShareFull(name.clone()));
                    dead.push((name.as_str(), "share_full"));
                    continue;
                }
                let next: i64 = next_n
                    .query_row([&to], |r| r.get(0))
                    .optional()?
                    .unwrap_or(1);
                let time = clock.tick(now);
                insert.execute(params![
                    to,
                    next,
                    id.as_bytes().as_slice(),
                    sender.as_str(),
                    from,
                    time.as_micros(),
                    body.get()
                ])?;
                bump.execute(params![to, next + 1])?;
                out.push(Copy::Stored {
                    recipient: *recipient,
                    n: u64::try_from(next).unwrap_or(0),
                    id: *id,
                    time,
                    duplicate: false,
                });
            }
        }
        for (to, reason) in dead {
            dead_letter(&tx, &from, to, reason, body, now)?;
        }
        tx.commit()?;
        self.clock = clock;
        Ok(out)
    }

    /// Messages waiting unread, over all mailboxes.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn waiting(&self) -> Result<u64, OwnersError> {
        let n: i64 =
            self.conn
                .query_row("SELECT COUNT(*) FROM mailbox WHERE acked = 0", [], |r| {
                    r.get(0)
                })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// `recipient`'s messages numbered after `after`, at most `limit`, and whether more
    /// follow.
    ///
    /// # Errors
    /// [`OwnersError`].
    pub fn fetch(
        &self,
        recipient: &PublicKey,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<Dm>, bool), OwnersError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT n, id, time_us, sender, sender_key, body FROM mailbox
             WHERE recipient = ?1 AND n > ?2 AND acked = 0 ORDER BY n LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![
                recipient.to_string(),
                i64::try_from(after).unwrap_or(i64::MAX),
                i64::from(limit) + 1
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        let mut more = false;
        for row in rows {
            let (n, id, t, from, key, body) = row?;
            if out.len() >= limit as usize {
                more = true;
                break;
            }
            let corrupt = || OwnersError::Corrupt {
                name: from.clone(),
                key: key.clone(),
            };
            out.push(Dm {
                n: u64::try_from(n).map_err(|_| corrupt())?,
                id: MessageId::from_bytes(id.as_slice().try_into().map_err(|_| corrupt())?),
                time: Timestamp::from_micros(t),
                from: UserName::new(from.clone()).map_err(|_| corrupt())?,
                from_key: key.parse().map_err(|_| corrupt())?,
                body: RawValue::from_string(body).map_err(|_| corrupt())?,
            });
        }
        Ok((out, more))
    }

    /// Marks `recipient`'s messages numbered up to `up_to` as acked (no longer shown or
    /// counted; kept for retries until they expire); returns how many.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn ack(&self, recipient: &PublicKey, up_to: u64) -> Result<u64, OwnersError> {
        Ok(self.conn.execute(
            "UPDATE mailbox SET acked = 1 WHERE recipient = ?1 AND n <= ?2 AND acked = 0",
            params![
                recipient.to_string(),
                i64::try_from(up_to).unwrap_or(i64::MAX)
            ],
        )? as u64)
    }

    /// Removes `recipient`'s whole mailbox (its account is gone).
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn purge(&self, recipient: &PublicKey) -> Result<(), OwnersError> {
        let to = recipient.to_string();
        self.conn
            .execute("DELETE FROM mailbox WHERE recipient = ?1", [&to])?;
        self.conn
            .execute("DELETE FROM mailbox_next WHERE recipient = ?1", [&to])?;
        Ok(())
    }

    /// Moves every unacked message stored before `cutoff` to its sender's dead letters
    /// (reason `expired`) and forgets the acked ones, in one transaction; returns how many
    /// became dead letters.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn expire(&mut self, cutoff: Timestamp, now: Timestamp) -> Result<u64, OwnersError> {
        let tx = self.conn.transaction()?;
        let expired: Vec<(String, String, String)> = {
            let mut stmt = tx.prepare(
                "SELECT m.sender_key, COALESCE(u.name, m.recipient), m.body
                 FROM mailbox m LEFT JOIN users u ON u.key = m.recipient
                 WHERE m.time_us < ?1 AND m.acked = 0 ORDER BY m.time_us",
            )?;
            let rows = stmt.query_map([cutoff.as_micros()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        for (sender, to, body) in &expired {
            tx.execute(
                "INSERT INTO dead_letters (sender_key, n, time_us, recipient, reason, body)
                 VALUES (?1, (SELECT COALESCE(MAX(n), 0) + 1 FROM dead_letters WHERE sender_key = ?1),
                         ?2, ?3, 'expired', ?4)",
                params![sender, now.as_micros(), to, body],
            )?;
        }
        tx.execute(
            "DELETE FROM mailbox WHERE time_us < ?1",
            [cutoff.as_micros()],
        )?;
        tx.commit()?;
        Ok(expired.len() as u64)
    }

    /// Records a message from `sender_key` to `to` that could not be delivered.
    ///
    /// # Errors
    /// [`OwnersError::Sqlite`].
    pub fn dead(
        &self,
        sender_key: &PublicKey,
        to: &str,
        reason: &str,
        body: &RawValue,
        now: Timestamp,
    ) -> Result<(), OwnersError> {
        dead_letter(&self.conn, &sender_key.to_string(), to, reason, body, now)
    }

    /// `sender_key`'s dead letters, oldest first.
    ///
    /// # Errors
    /// [`OwnersError`].
    pub fn dead_letters(&self, sender_key: &PublicKey) -> Result<Vec<DeadLetter>, OwnersError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT time_us, recipient, reason, body FROM dead_letters
             WHERE sender_key = ?1 ORDER BY n",
        )?;
        let rows = stmt.query_map([sender_key.to_string()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (t, to, reason, body) = row?;
            out.push(DeadLetter {
                time: Timestamp::from_micros(t),
                body: RawValue::from_string(body).map_err(|_| OwnersError::Corrupt {
                    name: to.clone(),
                    key: reason.clone(),
                })?,
                to,
                reason,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32])
    }

    #[test]
    fn a_multicast_retried_stores_no_copy_twice_and_full_mailboxes_are_dead_lettered() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut m = Mailboxes::open(dir.path()).expect("open");
        let body = RawValue::from_string("\"hi all\"".into()).expect("json");
        let name = |s: &str| UserName::new(s).expect("name");
        let id = MessageId::new_v7();
        let copies: Vec<(PublicKey, UserName, MessageId)> = (2..5)
            .map(|b| (key(b), name(&format!("u{b}")), copy_id(&id, &key(b))))
            .collect();
        // u4's mailbox already holds its maximum (1 here).
        m.store(
            &key(4),
            &name("x"),
            &key(9),
            None,
            &body,
            Timestamp::from_micros(1),
            1,
        )
        .expect("fill u4");
        let unknown = vec![("nobody".to_owned(), "unknown_user")];
        let store = |m: &mut Mailboxes| {
            m.store_many(
                &copies,
                &unknown,
                &name("alice"),
                &key(1),
                &body,
                Timestamp::from_micros(2),
                1,
            )
            .expect("store_many")
        };
        let first = store(&mut m);
        let stored = |copies: &[Copy], dup: bool| {
            copies
                .iter()
                .filter(|c| matches!(c, Copy::Stored { duplicate, .. } if *duplicate == dup))
                .count()
        };
        assert_eq!((stored(&first, false), stored(&first, true)), (2, 0));
        assert!(first.contains(&Copy::Full(name("u4"))));
        // The same message again: the two copies are duplicates, nothing new is stored.
        let again = store(&mut m);
        assert_eq!((stored(&again, false), stored(&again, true)), (0, 2));
        assert_eq!(m.fetch(&key(2), 0, 10).expect("u2").0.len(), 1);
        // The same id with another body is refused whole.
        let other = RawValue::from_string("\"changed\"".into()).expect("json");
        assert!(matches!(
            m.store_many(
                &copies,
                &[],
                &name("alice"),
                &key(1),
                &other,
                Timestamp::from_micros(3),
                10
            ),
            Err(MailboxError::IdConflict(_))
        ));
        // Dead letters: the unknown name and the full mailbox, each try.
        let reasons: Vec<(String, String)> = m
            .dead_letters(&key(1))
            .expect("dead")
            .into_iter()
            .map(|d| (d.to, d.reason))
            .collect();
        assert!(
            reasons.contains(&("nobody".into(), "unknown_user".into())),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&("u4".into(), "mailbox_full".into())),
            "{reasons:?}"
        );
        assert_ne!(copy_id(&id, &key(2)), copy_id(&id, &key(3)));
    }

    #[test]
    fn dead_letters_are_bounded_per_sender_keeping_the_newest() {
        let dir = tempfile::tempdir().expect("tmp");
        let m = Mailboxes::open(dir.path()).expect("open");
        let body = RawValue::from_string("\"x\"".into()).expect("json");
        for i in 0..(MAX_DEAD_LETTERS + 5) {
            m.dead(
                &key(1),
                &format!("u{i}"),
                "unknown_user",
                &body,
                Timestamp::from_micros(i),
            )
            .expect("dead");
        }
        m.dead(
            &key(2),
            "other",
            "unknown_user",
            &body,
            Timestamp::from_micros(0),
        )
        .expect("dead");
        let letters = m.dead_letters(&key(1)).expect("list");
        assert_eq!(letters.len() as i64, MAX_DEAD_LETTERS);
        assert_eq!(letters[0].to, "u5");
        assert_eq!(m.dead_letters(&key(2)).expect("list").len(), 1);
    }

    #[test]
    fn messages_are_numbered_per_recipient_and_acks_never_reuse_numbers() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut m = Mailboxes::open(dir.path()).expect("open");
        let body = RawValue::from_string("1".into()).expect("json");
        let alice = UserName::new("alice").expect("name");
        let now = Timestamp::now();
        let store = |m: &mut Mailboxes, to: u8| {
            m.store(&key(to), &alice, &key(9), None, &body, now, 10)
                .expect("store")
                .0
        };
        assert_eq!(
            (store(&mut m, 1), store(&mut m, 1), store(&mut m, 2)),
            (1, 2, 1)
        );
        assert_eq!(m.ack(&key(1), 2).expect("ack"), 2);
        assert_eq!(store(&mut m, 1), 3);
        let (waiting, more) = m.fetch(&key(1), 0, 10).expect("fetch");
        assert_eq!((waiting.len(), more), (1, false));
        assert!(matches!(
            m.store(&key(3), &alice, &key(9), None, &body, now, 0),
            Err(MailboxError::Full)
        ));
    }

    /// A retry of a DM the recipient already acked is still a duplicate, not a new message,
    /// until the DM TTL expires it; acked messages neither show nor fill the mailbox.
    #[test]
    fn an_acked_id_stays_deduplicated_until_it_expires() {
        let dir = tempfile::tempdir().expect("tmp");
        let _users = crate::users::Users::open(dir.path()).expect("users"); // expiry joins it
        let mut m = Mailboxes::open(dir.path()).expect("open");
        let body = RawValue::from_string("\"hi\"".into()).expect("json");
        let alice = UserName::new("alice").expect("name");
        let id = MessageId::new_v7();
        let t0 = Timestamp::from_micros(1_000_000);
        let first = m
            .store(&key(1), &alice, &key(9), Some(id), &body, t0, 1)
            .expect("store");
        assert!(!first.3);
        assert_eq!(m.ack(&key(1), first.0).expect("ack"), 1);
        assert!(m.fetch(&key(1), 0, 10).expect("fetch").0.is_empty());
        let retry = m
            .store(&key(1), &alice, &key(9), Some(id), &body, t0, 1)
            .expect("retry");
        assert_eq!(
            (retry.0, retry.3),
            (first.0, true),
            "a duplicate, not stored again"
        );
        // The acked message does not count against a mailbox of one.
        m.store(&key(1), &alice, &key(9), None, &body, t0, 1)
            .expect("room for one more");
        // Once expired, the acked one is forgotten without becoming a dead letter.
        let later = Timestamp::from_micros(9_000_000);
        assert_eq!(
            m.expire(Timestamp::from_micros(2_000_000), later)
                .expect("expire"),
            1
        );
        assert!(m.dead_letters(&key(9)).expect("dead").len() == 1);
        let again = m
            .store(&key(1), &alice, &key(9), Some(id), &body, later, 1)
            .expect("after expiry");
        assert!(!again.3, "expired ids are new again");
    }
}
