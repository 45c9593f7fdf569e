//! The SQLite backend: one registry on one machine, as before `--store` existed.
//!
//! Accounts ([`crate::users`]), owners ([`crate::owners`]) and mailboxes
//! ([`crate::mailbox`]) are durable in `registry.sqlite3` in the data directory; the
//! directory ([`crate::directory`]) and presence sessions ([`crate::presence`]) live in
//! memory and are rebuilt by heartbeats after a restart; the key pair is in the data
//! directory's `registry.key` and `registry.key_secret`.

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
use crate::owners::Owners;
use crate::presence::Sessions;
use crate::users::Users;

/// The durable half: accounts, owners, mailboxes.
#[derive(Debug)]
struct Durable {
    owners: Owners,
    users: Users,
    mailboxes: Mailboxes,
}

/// SQLite in the data directory plus soft state in memory.
#[derive(Debug)]
pub struct SqliteStore {
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
        Ok(self.directory.register(
            group.name,
            group.endpoint,
            group.members,
            group.public_key,
            owner_verified,
            now,
        ))
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
        let (max, lapse) = (self.max_names_per_key, self.name_lapse);
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
        if owners.count_live(key, lapsed)? >= max {
            return Ok(Err(super::too_many_names(max)));
        }
        if let Some((owner, _)) = binding {
            owners.release(name)?;
            tracing::info!(group = %name, %owner, ?lapse,
                "group name lapsed: its group did not register within the lapse");
        }
        owners.bind(name, key, now)?;
        Ok(Ok((*key, true)))
    }

    fn group_owner(&mut self, name: &GroupName) -> Result<Option<PublicKey>, StoreError> {
        Ok(self.durable()?.owners.owner(name)?)
    }

    fn release_group(&mut self, name: &GroupName) -> Result<bool, StoreError> {
        Ok(self.durable()?.owners.release(name)?)
    }

    fn user_by_name(&mut self, name: &UserName) -> Result<Option<UserEntry>, StoreError> {
        let user = self.durable()?.users.by_name(name)?;
        Ok(user.map(|u| self.present(u)))
    }

    fn user_by_key(&mut self, key: &PublicKey) -> Result<Option<UserEntry>, StoreError> {
        let user = self.durable()?.users.by_key(key)?;
        Ok(user.map(|u| self.present(u)))
    }

    fn insert_user(&mut self, entry: &UserEntry) -> Result<bool, StoreError> {
        // One registry per file, one thread: nothing comes between the count and the insert.
        let max = self.max_users;
        let users = &mut self.durable()?.users;
        if users.count()? >= max {
            return Err(StoreError::TooManyUsers(max));
        }
        Ok(users.insert(entry)?)
    }

    fn remove_user(&mut self, name: &UserName, key: &PublicKey) -> Result<bool, StoreError> {
        let durable = self.durable()?;
        durable.mailboxes.purge(key)?;
        durable.users.remove_blocks(key)?;
        let removed = durable.users.remove(name)?;
        self.sessions.end(key);
        Ok(removed)
    }

    fn count_users(&mut self) -> Result<u64, StoreError> {
        Ok(self.durable()?.users.count()?)
    }

    fn all_users(&mut self) -> Result<Vec<UserEntry>, StoreError> {
        let users = self.durable()?.users.all()?;
        Ok(users.into_iter().map(|u| self.present(u)).collect())
    }

    fn renew_session(
        &mut self,
        key: &PublicKey,
        status: Presence,
        now: Timestamp,
    ) -> Result<Timestamp, StoreError> {
        self.durable()?.users.seen(key, now)?;
        self.sessions.renew(*key, status, Instant::now());
        Ok(now)
    }

    fn end_session(&mut self, key: &PublicKey, now: Timestamp) -> Result<Timestamp, StoreError> {
        self.durable()?.users.seen(key, now)?;
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
        self.durable()?
            .mailboxes
            .store(recipient, sender, sender_key, id, body, now, max)
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
        self.durable()?
            .mailboxes
            .store_many(copies, refused, sender, sender_key, body, now, max)
    }

    fn block(
        &mut self,
        blocker: &PublicKey,
        blocked: &UserEntry,
        now: Timestamp,
    ) -> Refusable<bool> {
        match self
            .durable()?
            .users
            .block(blocker, blocked, now, super::MAX_BLOCKS)?
        {
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
        Ok(self.durable()?.users.unblock(blocker, name, key)?)
    }

    fn blocked(&mut self, blocker: &PublicKey) -> Result<Vec<BlockedEntry>, StoreError> {
        Ok(self.durable()?.users.blocked(blocker)?)
    }

    fn blockers_of(
        &mut self,
        sender: &PublicKey,
    ) -> Result<std::collections::HashSet<PublicKey>, StoreError> {
        Ok(self.durable()?.users.blockers_of(sender)?)
    }

    fn blocks(&mut self, blocker: &PublicKey, sender: &PublicKey) -> Result<bool, StoreError> {
        Ok(self.durable()?.users.blocks(blocker, sender)?)
    }

    fn fetch_dms(
        &mut self,
        recipient: &PublicKey,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<Dm>, bool), StoreError> {
        Ok(self.durable()?.mailboxes.fetch(recipient, after, limit)?)
    }

    fn ack_dms(&mut self, recipient: &PublicKey, up_to: u64) -> Result<u64, StoreError> {
        Ok(self.durable()?.mailboxes.ack(recipient, up_to)?)
    }

    fn dead_letter(
        &mut self,
        sender_key: &PublicKey,
        to: &str,
        reason: &str,
        body: &RawValue,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        Ok(self
            .durable()?
            .mailboxes
            .dead(sender_key, to, reason, body, now)?)
    }

    fn dead_letters(&mut self, sender_key: &PublicKey) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.durable()?.mailboxes.dead_letters(sender_key)?)
    }

    fn waiting_dms(&mut self) -> Result<u64, StoreError> {
        match &self.durable {
            Some(d) => Ok(d.mailboxes.waiting()?),
            None => Ok(0),
        }
    }

    fn expire_dms(&mut self, ttl: Duration, now: Timestamp) -> Result<u64, StoreError> {
        match &mut self.durable {
            Some(d) => Ok(d.mailboxes.expire(now.saturating_sub(ttl), now)?),
            None => Ok(0),
        }
    }
}
