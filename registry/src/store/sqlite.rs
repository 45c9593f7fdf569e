//! The SQLite backend: one registry on one machine, as before `--store` existed.
//!
//! Accounts ([`crate::users`]), owners ([`crate::owners`]) and mailboxes
//! ([`crate::mailbox`]) are durable in `registry.sqlite3` in the data directory; the
//! directory ([`crate::directory`]) and presence sessions ([`crate::presence`]) live in
//! memory and are rebuilt by heartbeats after a restart; the key pair is in the data
//! directory's `registry.key` and `registry.key_secret`.
//!
//! # A file system that refuses writes
//! Every connection goes through SQLite's `unix-excl` VFS ([`crate::owners::VFS`]): the
//! WAL index is in heap memory, not in a mapped `-shm` file, so a file made immutable or a
//! file system turned read-only fails a write with an error instead of killing the process
//! with SIGBUS. Such an error, an I/O error and a full disk become
//! [`StoreError::Unwritable`] (answered `internal`; each change is one transaction, so
//! nothing of it is stored), whose cause is logged once when writes begin to fail and once
//! when a write succeeds again.

use std::path::Path;
use std::time::{Duration, Instant};

use agora_common::keys::{Keypair, PublicKey};
use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    BlockedEntry, DeadLetter, Dm, Endpoint, GroupEntry, GroupName, Presence, UserEntry, UserName,
};
use serde_json::value::RawValue;

use super::{GroupRegistration, Refusable, RegistryStore, StoreError, StoreSettings};
use crate::directory::Directory;
use crate::mailbox::{Copy, MailboxError, Mailboxes, Stored};
use crate::owners::{Owners, OwnersError};
use crate::presence::Sessions;
use crate::users::Users;

/// The durable half: accounts, owners, mailboxes.
#[derive(Debug)]
struct Durable {
    owners: Owners,
    users: Users,
    mailboxes: Mailboxes,
}

/// Whether writes to `registry.sqlite3` are failing, so that the cause is logged once.
#[derive(Debug)]
struct Health {
    /// The database file, named in the log lines.
    db: std::path::PathBuf,
    /// Writes fail for a cause outside SQLite: it was logged when they began to fail, and
    /// is not logged again until a write succeeds.
    unwritable: bool,
}

impl Health {
    /// Passes `result` on; an error of the file system under the store becomes
    /// [`StoreError::Unwritable`], its cause logged here once when writes begin to fail.
    fn check<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        result.map_err(|e| self.failed(e))
    }

    /// [`Health::check`] of a call that writes: its success after failures is logged once
    /// as writes working again.
    fn wrote<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        self.wrote_if(result, |_| true)
    }

    /// [`Health::wrote`] where `changed` tells whether the call changed a row: a call that
    /// changed nothing (a release of an unbound name, an ack of nothing) wrote nothing, so
    /// it does not show that the store can be written again.
    fn wrote_if<T>(
        &mut self,
        result: Result<T, StoreError>,
        changed: impl FnOnce(&T) -> bool,
    ) -> Result<T, StoreError> {
        let result = self.check(result);
        if self.unwritable && result.as_ref().is_ok_and(changed) {
            self.unwritable = false;
            tracing::info!(store = %self.db.display(), "the store can be written again");
        }
        result
    }

    /// [`Health::wrote_if`] for the mailbox's calls.
    fn wrote_mail<T>(
        &mut self,
        result: Result<T, MailboxError>,
        changed: impl FnOnce(&T) -> bool,
    ) -> Result<T, MailboxError> {
        match result {
            Err(MailboxError::Store(e)) => Err(MailboxError::Store(self.failed(e))),
            Ok(value) => {
                let changed = changed(&value);
                self.wrote_if(Ok(()), |_| changed)?;
                Ok(value)
            }
            other => other,
        }
    }

    fn failed(&mut self, e: StoreError) -> StoreError {
        let StoreError::Sqlite(OwnersError::Sqlite(source)) = e else {
            return e;
        };
        if !crate::owners::refused_by_file_system(&source) {
            return StoreError::Sqlite(OwnersError::Sqlite(source));
        }
        if self.unwritable {
            tracing::debug!(error = %source, "the store still cannot be written");
        } else {
            self.unwritable = true;
            // SQLite's message says "disk I/O error"; the file system's own answer names
            // the cause (immutable: "Operation not permitted"; read-only: "Read-only file
            // system"). Only the WAL is opened to ask: closing a descriptor of the database
            // file would drop this process's lock on it (POSIX locks are per process).
            let mut wal = self.db.as_os_str().to_owned();
            wal.push("-wal");
            let wal = std::path::PathBuf::from(wal);
            let cause = match std::fs::OpenOptions::new().append(true).open(&wal) {
                Err(e) => format!("{source}; opening {} for writing: {e}", wal.display()),
                Ok(_) => source.to_string(),
            };
            tracing::error!(
                error = %cause,
                store = %self.db.display(),
                "the store cannot be written: writes are answered internal and nothing of \
                 them is stored until it can; reads go on"
            );
        }
        StoreError::Unwritable(source)
    }
}

/// SQLite in the data directory plus soft state in memory.
#[derive(Debug)]
pub struct SqliteStore {
    health: Health,
    directory: Directory,
    sessions: Sessions,
    durable: Option<Durable>,
    max_users: u64,
    max_names_per_key: u64,
    name_lapse: Duration,
}

impl SqliteStore {
    /// Opens `data_dir/registry.sqlite3` (made with the directory if needed) when
    /// `accounts`; without, nothing is opened and only the directory is kept (an
    /// `--insecure` registry).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn open(
        data_dir: &Path,
        settings: StoreSettings,
        accounts: bool,
    ) -> Result<SqliteStore, StoreError> {
        let durable = if accounts {
            Some(Durable {
                owners: Owners::open(data_dir)?,
                users: Users::open(data_dir)?,
                mailboxes: Mailboxes::open(data_dir)?.with_share(settings.dm_share),
            })
        } else {
            None
        };
        Ok(SqliteStore {
            health: Health {
                db: data_dir.join("registry.sqlite3"),
                unwritable: false,
            },
            directory: Directory::new(settings.group_ttl, settings.max_groups),
            sessions: Sessions::new(settings.presence_ttl),
            durable,
            max_users: settings.max_users,
            max_names_per_key: settings.max_names_per_key,
            name_lapse: settings.name_lapse,
        })
    }

    fn durable(&mut self) -> Result<&mut Durable, StoreError> {
        self.durable.as_mut().ok_or(StoreError::NoAccounts)
    }

    fn present(&self, mut entry: UserEntry) -> UserEntry {
        entry.presence = self.sessions.presence(&entry.key, Instant::now());
        entry
    }
}

impl SqliteStore {
    /// [`RegistryStore::claim_group`] without the health check. `owned` is the count of
    /// `key`'s names that have not lapsed, read at the first new binding and kept by the
    /// caller across the claims of one batch (a count is O(names of the key)).
    fn claim(
        &mut self,
        name: &GroupName,
        key: &PublicKey,
        max: u64,
        now: Timestamp,
        owned: &mut Option<u64>,
    ) -> Refusable<(PublicKey, bool)> {
        let lapse = self.name_lapse;
        let owners = &self.durable()?.owners;
        let lapsed = now.saturating_sub(lapse);
        // One registry per file, one thread: nothing comes between the reads and the writes.
        let binding = owners.binding(name)?;
        if let Some((owner, seen)) = binding {
            if seen > lapsed {
                if owner == *key && seen <= now.saturating_sub(super::seen_interval(lapse)) {
                    owners.seen(name, now)?;
                }
                return Ok(Ok((owner, false)));
            }
        }
        // The cap before a lapsed binding is released: a refused claim changes nothing (a
        // lapsed name's own binding does not count, being lapsed).
        let count = match *owned {
            Some(n) => n,
            None => owners.count_live(key, lapsed)?,
        };
        *owned = Some(count);
        if count >= max {
            return Ok(Err(super::too_many_names(max)));
        }
        if let Some((owner, _)) = binding {
            owners.release(name)?;
            tracing::info!(group = %name, %owner, ?lapse,
                "group name lapsed: its group did not register within the lapse");
        }
        owners.bind(name, key, now)?;
        *owned = Some(count + 1);
        Ok(Ok((*key, true)))
    }
}

impl RegistryStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn key_pair(&mut self, data_dir: &Path) -> Result<(Keypair, bool), StoreError> {
        Ok(Keypair::load_or_generate(&data_dir.join("registry.key"))?)
    }

    fn register_group(
        &mut self,
        group: GroupRegistration,
        owner_verified: bool,
        now: Timestamp,
    ) -> Refusable<GroupEntry> {
        Ok(self.directory.register(group, owner_verified, now))
    }

    fn heartbeat_host(
        &mut self,
        endpoint: &Endpoint,
        public_key: Option<PublicKey>,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        Ok(self.directory.heartbeat_host(endpoint, public_key, now))
    }

    fn unregister_group(
        &mut self,
        name: &GroupName,
        endpoint: &Endpoint,
        now: Timestamp,
    ) -> Refusable<()> {
        Ok(self.directory.unregister(name, endpoint, now))
    }

    fn list_groups(&mut self, now: Timestamp) -> Result<Vec<GroupEntry>, StoreError> {
        Ok(self.directory.list(now))
    }

    fn count_groups(&mut self, now: Timestamp) -> Result<u64, StoreError> {
        Ok(self.directory.count(now) as u64)
    }

    fn lookup_group(
        &mut self,
        name: &GroupName,
        now: Timestamp,
    ) -> Result<Option<GroupEntry>, StoreError> {
        Ok(self.directory.lookup(name, now).ok())
    }

    fn expire_groups(&mut self, now: Timestamp) -> Result<Vec<GroupName>, StoreError> {
        Ok(self.directory.expire(now))
    }

    fn claim_group(
        &mut self,
        name: &GroupName,
        key: &PublicKey,
        now: Timestamp,
    ) -> Refusable<(PublicKey, bool)> {
        self.claim_group_up_to(name, key, self.max_names_per_key, now)
    }

    fn claim_group_up_to(
        &mut self,
        name: &GroupName,
        key: &PublicKey,
        max_names: u64,
        now: Timestamp,
    ) -> Refusable<(PublicKey, bool)> {
        // Only a new binding shows a write (the owner's "seen" is rare and small).
        let result = self.claim(name, key, max_names, now, &mut None);
        self.health.wrote_if(result, |r| matches!(r, Ok((_, true))))
    }

    fn claim_groups_up_to(
        &mut self,
        names: &[GroupName],
        key: &PublicKey,
        max_names: u64,
        now: Timestamp,
    ) -> Result<Vec<super::Claim>, StoreError> {
        let result = (|| {
            self.durable()?.owners.begin()?;
            let mut owned = None;
            let claims: Result<Vec<_>, StoreError> = names
                .iter()
                .map(|name| self.claim(name, key, max_names, now, &mut owned))
                .collect();
            let owners = &self.durable()?.owners;
            match claims {
                Ok(claims) => {
                    owners.commit()?;
                    Ok(claims)
                }
                Err(e) => {
                    owners.rollback();
                    Err(e)
                }
            }
        })();
        self.health.wrote_if(result, |claims| {
            claims.iter().any(|c| matches!(c, Ok((_, true))))
        })
    }

    fn group_owner(&mut self, name: &GroupName) -> Result<Option<PublicKey>, StoreError> {
        let result = self.durable().and_then(|d| Ok(d.owners.owner(name)?));
        self.health.check(result)
    }

    fn release_group(&mut self, name: &GroupName) -> Result<bool, StoreError> {
        let result = self.durable().and_then(|d| Ok(d.owners.release(name)?));
        self.health.wrote_if(result, |released| *released)
    }

    fn user_by_name(&mut self, name: &UserName) -> Result<Option<UserEntry>, StoreError> {
        let result = self.durable().and_then(|d| Ok(d.users.by_name(name)?));
        let user = self.health.check(result)?;
        Ok(user.map(|u| self.present(u)))
    }

    fn user_by_key(&mut self, key: &PublicKey) -> Result<Option<UserEntry>, StoreError> {
        let result = self.durable().and_then(|d| Ok(d.users.by_key(key)?));
        let user = self.health.check(result)?;
        Ok(user.map(|u| self.present(u)))
    }

    fn insert_user(&mut self, entry: &UserEntry) -> Result<bool, StoreError> {
        // One registry per file, one thread: nothing comes between the count and the insert.
        let max = self.max_users;
        let result = self.durable().and_then(|d| {
            if d.users.count()? >= max {
                return Err(StoreError::TooManyUsers(max));
            }
            Ok(d.users.insert(entry)?)
        });
        self.health.wrote_if(result, |inserted| *inserted)
    }

    fn remove_user(&mut self, name: &UserName, key: &PublicKey) -> Result<bool, StoreError> {
        let result = self.durable().and_then(|d| {
            d.mailboxes.purge(key)?;
            d.users.remove_blocks(key)?;
            Ok(d.users.remove(name)?)
        });
        let removed = self.health.wrote(result)?;
        self.sessions.end(key);
        Ok(removed)
    }

    fn count_users(&mut self) -> Result<u64, StoreError> {
        let result = self.durable().and_then(|d| Ok(d.users.count()?));
        self.health.check(result)
    }

    fn all_users(&mut self) -> Result<Vec<UserEntry>, StoreError> {
        let result = self.durable().and_then(|d| Ok(d.users.all()?));
        let users = self.health.check(result)?;
        Ok(users.into_iter().map(|u| self.present(u)).collect())
    }

    fn renew_session(
        &mut self,
        key: &PublicKey,
        status: Presence,
        now: Timestamp,
    ) -> Result<Timestamp, StoreError> {
        let result = self.durable().and_then(|d| Ok(d.users.seen(key, now)?));
        self.health.wrote(result)?;
        self.sessions.renew(*key, status, Instant::now());
        Ok(now)
    }

    fn end_session(&mut self, key: &PublicKey, now: Timestamp) -> Result<Timestamp, StoreError> {
        let result = self.durable().and_then(|d| Ok(d.users.seen(key, now)?));
        self.health.wrote(result)?;
        self.sessions.end(key);
        Ok(now)
    }

    fn session_counts(&mut self) -> Result<(u64, u64), StoreError> {
        let (online, away) = self.sessions.counts(Instant::now());
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Ok((count(online), count(away)))
    }

    fn expire_sessions(&mut self) -> Result<(), StoreError> {
        self.sessions.expire(Instant::now());
        Ok(())
    }

    fn store_dm(
        &mut self,
        recipient: &PublicKey,
        sender: &UserName,
        sender_key: &PublicKey,
        id: Option<MessageId>,
        body: &RawValue,
        now: Timestamp,
        max: u64,
    ) -> Result<Stored, MailboxError> {
        let result = self.durable().map_err(MailboxError::Store).and_then(|d| {
            d.mailboxes
                .store(recipient, sender, sender_key, id, body, now, max)
        });
        // A retry (the fourth field) stores nothing.
        self.health.wrote_mail(result, |stored| !stored.3)
    }

    fn store_dms(
        &mut self,
        copies: &[(PublicKey, UserName, MessageId)],
        refused: &[(String, &'static str)],
        sender: &UserName,
        sender_key: &PublicKey,
        body: &RawValue,
        now: Timestamp,
        max: u64,
    ) -> Result<Vec<Copy>, MailboxError> {
        let result = self.durable().map_err(MailboxError::Store).and_then(|d| {
            d.mailboxes
                .store_many(copies, refused, sender, sender_key, body, now, max)
        });
        self.health.wrote_mail(result, |_| true)
    }

    fn block(
        &mut self,
        blocker: &PublicKey,
        blocked: &UserEntry,
        now: Timestamp,
    ) -> Refusable<bool> {
        let result = self
            .durable()
            .and_then(|d| Ok(d.users.block(blocker, blocked, now, super::MAX_BLOCKS)?));
        match self.health.wrote_if(result, |r| *r == Some(true))? {
            Some(changed) => Ok(Ok(changed)),
            None => Ok(Err(super::too_many_blocks())),
        }
    }

    fn unblock(
        &mut self,
        blocker: &PublicKey,
        name: &UserName,
        key: Option<&PublicKey>,
    ) -> Result<bool, StoreError> {
        let result = self
            .durable()
            .and_then(|d| Ok(d.users.unblock(blocker, name, key)?));
        self.health.wrote_if(result, |lifted| *lifted)
    }

    fn blocked(&mut self, blocker: &PublicKey) -> Result<Vec<BlockedEntry>, StoreError> {
        let result = self.durable().and_then(|d| Ok(d.users.blocked(blocker)?));
        self.health.check(result)
    }

    fn blockers_of(
        &mut self,
        sender: &PublicKey,
    ) -> Result<std::collections::HashSet<PublicKey>, StoreError> {
        let result = self
            .durable()
            .and_then(|d| Ok(d.users.blockers_of(sender)?));
        self.health.check(result)
    }

    fn blocks(&mut self, blocker: &PublicKey, sender: &PublicKey) -> Result<bool, StoreError> {
        let result = self
            .durable()
            .and_then(|d| Ok(d.users.blocks(blocker, sender)?));
        self.health.check(result)
    }

    fn fetch_dms(
        &mut self,
        recipient: &PublicKey,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<Dm>, bool), StoreError> {
        let result = self
            .durable()
            .and_then(|d| Ok(d.mailboxes.fetch(recipient, after, limit)?));
        self.health.check(result)
    }

    fn ack_dms(&mut self, recipient: &PublicKey, up_to: u64) -> Result<u64, StoreError> {
        let result = self
            .durable()
            .and_then(|d| Ok(d.mailboxes.ack(recipient, up_to)?));
        self.health.wrote_if(result, |acked| *acked > 0)
    }

    fn dead_letter(
        &mut self,
        sender_key: &PublicKey,
        to: &str,
        reason: &str,
        body: &RawValue,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let result = self
            .durable()
            .and_then(|d| Ok(d.mailboxes.dead(sender_key, to, reason, body, now)?));
        self.health.wrote(result)
    }

    fn dead_letters(&mut self, sender_key: &PublicKey) -> Result<Vec<DeadLetter>, StoreError> {
        let result = self
            .durable()
            .and_then(|d| Ok(d.mailboxes.dead_letters(sender_key)?));
        self.health.check(result)
    }

    fn waiting_dms(&mut self) -> Result<u64, StoreError> {
        let result = match &self.durable {
            Some(d) => d.mailboxes.waiting().map_err(StoreError::from),
            None => Ok(0),
        };
        self.health.check(result)
    }

    fn expire_dms(&mut self, ttl: Duration, now: Timestamp) -> Result<u64, StoreError> {
        let result = match &mut self.durable {
            Some(d) => d
                .mailboxes
                .expire(now.saturating_sub(ttl), now)
                .map_err(StoreError::from),
            None => Ok(0),
        };
        // A sweep that expired nothing may have written nothing: it shows nothing about
        // whether the store can be written again.
        self.health.wrote_if(result, |expired| *expired > 0)
    }
}
