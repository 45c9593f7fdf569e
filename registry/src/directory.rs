//! The directory of live groups: soft state, rebuilt by heartbeats.
//!
//! Entries live in memory, owned by the registry's one socket thread. They need no disk:
//! every group node repeats `register` each heartbeat interval, so after a registry restart
//! the directory is whole again within one interval. An entry not refreshed within the TTL
//! is gone at that moment (PROTOCOL §4.1), whenever the sweep that frees its memory runs:
//! every read and write checks the TTL itself.

use std::collections::BTreeMap;
use std::time::Duration;

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{Endpoint, ErrorCode, GroupEntry, GroupName, WireError};

/// Live groups by name.
#[derive(Debug)]
pub struct Directory {
    entries: BTreeMap<GroupName, GroupEntry>,
    ttl: Duration,
    max_groups: usize,
}

impl Directory {
    /// An empty directory whose entries expire `ttl` after their last refresh and which
    /// holds at most `max_groups`.
    pub fn new(ttl: Duration, max_groups: usize) -> Directory {
        Directory {
            entries: BTreeMap::new(),
            ttl,
            max_groups,
        }
    }

    fn is_live(&self, entry: &GroupEntry, now: Timestamp) -> bool {
        entry.last_heartbeat > now.saturating_sub(self.ttl)
    }

    /// Drops every entry whose TTL has passed; returns the names dropped.
    pub fn expire(&mut self, now: Timestamp) -> Vec<GroupName> {
        let cutoff = now.saturating_sub(self.ttl);
        let dead: Vec<GroupName> = self
            .entries
            .values()
            .filter(|e| e.last_heartbeat <= cutoff)
            .map(|e| e.name.clone())
            .collect();
        for name in &dead {
            self.entries.remove(name);
        }
        dead
    }

    /// Registers `name` at `endpoint`, or refreshes it.
    ///
    /// A name held by another live endpoint is refused, unless `owner_verified` (the caller
    /// is the name's owner, moving it); a dead holder is replaced. Entries of other names at
    /// the same endpoint are kept when `owner_verified` (a CURVE registry: one endpoint may
    /// serve many groups, a group host, and an entry is not another key's to drop); without
    /// ownership (`--insecure`, no keys) they are dropped: one endpoint is one node.
    ///
    /// # Errors
    /// `name_taken`, or `limit_reached` when the directory is full.
    pub fn register(
        &mut self,
        name: GroupName,
        endpoint: Endpoint,
        members: u64,
        public_key: Option<PublicKey>,
        owner_verified: bool,
        now: Timestamp,
    ) -> Result<GroupEntry, WireError> {
        let live = self
            .entries
            .get(&name)
            .is_some_and(|e| self.is_live(e, now));
        if let Some(held) = self.entries.get_mut(&name).filter(|_| live) {
            if held.endpoint == endpoint {
                held.last_heartbeat = now;
                held.members = members;
                held.public_key = public_key;
                return Ok(held.clone());
            }
        }
        if let Some(held) = self.entries.get(&name) {
            if self.is_live(held, now) && !owner_verified {
                return Err(WireError::new(
                    ErrorCode::NameTaken,
                    format!("group \"{name}\" is held by {}", held.endpoint),
                ));
            }
        }
        if !owner_verified {
            self.entries
                .retain(|n, e| *n == name || e.endpoint != endpoint);
        }
        if !self.entries.contains_key(&name) && self.entries.len() >= self.max_groups {
            self.expire(now);
            if self.entries.len() >= self.max_groups {
                return Err(WireError::new(
                    ErrorCode::LimitReached,
                    format!(
                        "the registry holds its maximum of {} groups",
                        self.max_groups
                    ),
                ));
            }
        }
        let entry = GroupEntry {
            name: name.clone(),
            endpoint,
            members,
            registered_at: now,
            last_heartbeat: now,
            public_key,
        };
        self.entries.insert(name, entry.clone());
        Ok(entry)
    }

    /// Removes `name`, if `endpoint` holds it.
    ///
    /// # Errors
    /// `unknown_group` if not registered (or its TTL has passed), `name_taken` if another
    /// endpoint holds it.
    pub fn unregister(
        &mut self,
        name: &GroupName,
        endpoint: &Endpoint,
        now: Timestamp,
    ) -> Result<(), WireError> {
        match self.entries.get(name).filter(|e| self.is_live(e, now)) {
            None => Err(unknown(name)),
            Some(e) if e.endpoint != *endpoint => Err(WireError::new(
                ErrorCode::NameTaken,
                format!("group \"{name}\" is held by {}, not {endpoint}", e.endpoint),
            )),
            Some(_) => {
                self.entries.remove(name);
                Ok(())
            }
        }
    }

    /// Live entries, sorted by name.
    pub fn list(&self, now: Timestamp) -> Vec<GroupEntry> {
        self.entries
            .values()
            .filter(|e| self.is_live(e, now))
            .cloned()
            .collect()
    }

    /// The live entry for `name`.
    ///
    /// # Errors
    /// `unknown_group`.
    pub fn lookup(&self, name: &GroupName, now: Timestamp) -> Result<GroupEntry, WireError> {
        self.entries
            .get(name)
            .filter(|e| self.is_live(e, now))
            .cloned()
            .ok_or_else(|| unknown(name))
    }
}

fn unknown(name: &GroupName) -> WireError {
    WireError::new(
        ErrorCode::UnknownGroup,
        format!("no live group named \"{name}\""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_micros(s * 1_000_000)
    }
    fn name(s: &str) -> GroupName {
        GroupName::new(s).expect("name")
    }
    fn ep(port: u16) -> Endpoint {
        Endpoint::new(format!("tcp://127.0.0.1:{port}")).expect("endpoint")
    }

    #[test]
    fn refresh_keeps_registered_at_and_takeover_is_refused() {
        let mut d = Directory::new(Duration::from_secs(6), 10);
        d.register(name("Cool Group"), ep(1), 0, None, false, t(10))
            .expect("first");
        let e = d
            .register(name("Cool Group"), ep(1), 3, None, false, t(12))
            .expect("refresh");
        assert_eq!(
            (e.registered_at, e.last_heartbeat, e.members),
            (t(10), t(12), 3)
        );
        let err = d
            .register(name("Cool Group"), ep(2), 0, None, false, t(13))
            .expect_err("taken");
        assert_eq!(err.code, ErrorCode::NameTaken);
        // Once the holder's TTL passes, the name is free again.
        let e = d
            .register(name("Cool Group"), ep(2), 0, None, false, t(18))
            .expect("after ttl");
        assert_eq!(e.endpoint, ep(2));
    }

    /// PROTOCOL §4.1: an entry whose TTL has passed is gone at that moment, whether or not
    /// the sweep ([`Directory::expire`]) has run: a register from the same endpoint 0.1 s
    /// later creates it anew, and it cannot be unregistered.
    #[test]
    fn an_expired_entry_is_gone_before_any_sweep() {
        let mut d = Directory::new(Duration::from_secs(6), 10);
        d.register(name("g"), ep(1), 0, None, false, t(0))
            .expect("first");
        let later = Timestamp::from_micros(6_100_000);
        let e = d
            .register(name("g"), ep(1), 1, None, false, later)
            .expect("again");
        assert_eq!(e.registered_at, later, "created anew, not refreshed");
        let gone = Timestamp::from_micros(12_200_000);
        assert_eq!(
            d.unregister(&name("g"), &ep(1), gone).map_err(|e| e.code),
            Err(ErrorCode::UnknownGroup)
        );
    }

    #[test]
    fn entries_expire_after_ttl() {
        let mut d = Directory::new(Duration::from_secs(6), 10);
        d.register(name("a"), ep(1), 0, None, false, t(0))
            .expect("a");
        d.register(name("b"), ep(2), 0, None, false, t(4))
            .expect("b");
        assert_eq!(d.list(t(5)).len(), 2);
        assert_eq!(d.list(t(6)).len(), 1);
        assert_eq!(
            d.lookup(&name("a"), t(6)).map_err(|e| e.code),
            Err(ErrorCode::UnknownGroup)
        );
        assert_eq!(d.expire(t(6)), vec![name("a")]);
    }

    #[test]
    fn unregister_needs_the_holding_endpoint() {
        let mut d = Directory::new(Duration::from_secs(6), 10);
        d.register(name("a"), ep(1), 0, None, false, t(0))
            .expect("a");
        assert_eq!(
            d.unregister(&name("a"), &ep(2), t(1)).map_err(|e| e.code),
            Err(ErrorCode::NameTaken)
        );
        assert_eq!(
            d.unregister(&name("x"), &ep(1), t(1)).map_err(|e| e.code),
            Err(ErrorCode::UnknownGroup)
        );
        d.unregister(&name("a"), &ep(1), t(1)).expect("unregister");
        assert!(d.list(t(0)).is_empty());
    }

    /// Finding 5 of issue 22: with keys, a name registered at another group's endpoint
    /// leaves that group's entry alone (the same key may serve both: a group host).
    #[test]
    fn with_owners_a_new_name_at_the_same_endpoint_keeps_the_old_one() {
        let mut d = Directory::new(Duration::from_secs(6), 10);
        d.register(name("victim"), ep(1), 0, None, true, t(0))
            .expect("victim");
        d.register(name("evil"), ep(1), 0, None, true, t(1))
            .expect("evil");
        let names: Vec<_> = d.list(t(1)).into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec![name("evil"), name("victim")]);
    }

    #[test]
    fn without_owners_a_new_name_at_the_same_endpoint_replaces_the_old_one() {
        let mut d = Directory::new(Duration::from_secs(6), 10);
        d.register(name("old"), ep(1), 0, None, false, t(0))
            .expect("old");
        d.register(name("new"), ep(1), 0, None, false, t(1))
            .expect("new");
        let names: Vec<_> = d.list(t(1)).into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec![name("new")]);
    }

    #[test]
    fn the_directory_is_bounded() {
        let mut d = Directory::new(Duration::from_secs(6), 1);
        d.register(name("a"), ep(1), 0, None, false, t(0))
            .expect("a");
        let err = d
            .register(name("b"), ep(2), 0, None, false, t(1))
            .expect_err("full");
        assert_eq!(err.code, ErrorCode::LimitReached);
        d.register(name("b"), ep(2), 0, None, false, t(7))
            .expect("a expired, room again");
    }
}
