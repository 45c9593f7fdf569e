//! The directory of live groups: soft state, rebuilt by heartbeats.
//!
//! Entries live in memory, owned by the registry's one socket thread. They need no disk:
//! every group node repeats `register` each heartbeat interval, and every group host
//! repeats `heartbeat_host` and registers its groups again when the registry's count of
//! them differs from its own, so after a registry restart the directory is whole again
//! within one interval. An entry not refreshed within the TTL is gone at that moment
//! (PROTOCOL §4.1), whenever the sweep that frees its memory runs: every read and write
//! checks the TTL itself.
//!
//! # Hosts (PROTOCOL §4.1.1)
//! An entry registered by `register_groups` is *held* by its host, the pair (endpoint,
//! public key): it has no heartbeat of its own and is live while its host is. The host's
//! one `heartbeat_host` refreshes all of them at once (O(1): one map update), and the
//! reply counts them. A host whose TTL passes drops every name it holds. A plain
//! `register` of a held name makes it an entry of its own again.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{Endpoint, ErrorCode, GroupEntry, GroupName, WireError};

use crate::store::GroupRegistration;

/// One name in the directory.
#[derive(Debug)]
struct Slot {
    /// The entry as listed; for a held entry, `last_heartbeat` is read from its host.
    entry: GroupEntry,
    /// Held by the host `(entry.endpoint, entry.public_key)`: live while that host is.
    held: bool,
}

/// A group host: its key, its last heartbeat and how many entries it holds.
#[derive(Debug, Clone, Copy)]
struct HostLive {
    key: Option<PublicKey>,
    last_heartbeat: Timestamp,
    names: u64,
}

/// Live groups by name, and the hosts holding some of them.
#[derive(Debug)]
pub struct Directory {
    entries: BTreeMap<GroupName, Slot>,
    /// Hosts by endpoint; more than one only when keys differ at one endpoint (a host
    /// restarted with another key pair before the old one's TTL passed).
    hosts: HashMap<Endpoint, Vec<HostLive>>,
    ttl: Duration,
    max_groups: usize,
}

impl Directory {
    /// An empty directory whose entries expire `ttl` after their last refresh (their own, or
    /// their host's) and which holds at most `max_groups`.
    pub fn new(ttl: Duration, max_groups: usize) -> Directory {
        Directory {
            entries: BTreeMap::new(),
            hosts: HashMap::new(),
            ttl,
            max_groups,
        }
    }

    fn host(&self, endpoint: &Endpoint, key: Option<PublicKey>) -> Option<&HostLive> {
        self.hosts.get(endpoint)?.iter().find(|h| h.key == key)
    }

    fn host_mut(&mut self, endpoint: &Endpoint, key: Option<PublicKey>) -> Option<&mut HostLive> {
        self.hosts
            .get_mut(endpoint)?
            .iter_mut()
            .find(|h| h.key == key)
    }

    /// The last refresh of `slot`: its own, or its host's (`None`: its host is gone).
    fn last_heartbeat(&self, slot: &Slot) -> Option<Timestamp> {
        if slot.held {
            self.host(&slot.entry.endpoint, slot.entry.public_key)
                .map(|h| h.last_heartbeat)
        } else {
            Some(slot.entry.last_heartbeat)
        }
    }

    fn is_live(&self, slot: &Slot, now: Timestamp) -> bool {
        self.last_heartbeat(slot)
            .is_some_and(|t| t > now.saturating_sub(self.ttl))
    }

    /// The entry as listed: a held one carries its host's last heartbeat.
    fn view(&self, slot: &Slot) -> GroupEntry {
        let mut entry = slot.entry.clone();
        if let Some(t) = self.last_heartbeat(slot) {
            entry.last_heartbeat = t;
        }
        entry
    }

    /// Removes `name`, keeping its host's count right.
    fn remove(&mut self, name: &GroupName) -> Option<Slot> {
        let slot = self.entries.remove(name)?;
        if slot.held {
            if let Some(h) = self.host_mut(&slot.entry.endpoint, slot.entry.public_key) {
                h.names = h.names.saturating_sub(1);
            }
        }
        Some(slot)
    }

    /// Forgets the host `(endpoint, key)` and drops every entry it holds.
    fn purge_host(&mut self, endpoint: &Endpoint, key: Option<PublicKey>) {
        if let Some(hosts) = self.hosts.get_mut(endpoint) {
            hosts.retain(|h| h.key != key);
            if hosts.is_empty() {
                self.hosts.remove(endpoint);
            }
        }
        self.entries
            .retain(|_, s| !(s.held && s.entry.endpoint == *endpoint && s.entry.public_key == key));
    }

    /// Drops every entry whose TTL has passed (a held entry's: its host's), and the dead
    /// hosts; returns the names dropped.
    pub fn expire(&mut self, now: Timestamp) -> Vec<GroupName> {
        let dead: Vec<GroupName> = self
            .entries
            .iter()
            .filter(|(_, s)| !self.is_live(s, now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &dead {
            self.entries.remove(name);
        }
        let cutoff = now.saturating_sub(self.ttl);
        self.hosts.retain(|_, hosts| {
            hosts.retain(|h| h.last_heartbeat > cutoff);
            !hosts.is_empty()
        });
        dead
    }

    /// Registers `g.name` at `g.endpoint`, or refreshes it; with `g.host`, the entry is held
    /// by the host `(g.endpoint, g.public_key)` (`register_groups`) and lives while the host
    /// heartbeats.
    ///
    /// A name held by another live endpoint is refused, unless `owner_verified` (the caller
    /// is the name's owner, moving it); a dead holder is replaced. Entries of other names at
    /// the same endpoint are kept when `owner_verified` (a CURVE registry: one endpoint may
    /// serve many groups, a group host, and an entry is not another key's to drop) or when
    /// the entry is a host's; a plain `register` without ownership (`--insecure`, no keys)
    /// drops them: one endpoint is one node.
    ///
    /// # Errors
    /// `name_taken`, or `limit_reached` when the directory is full.
    pub fn register(
        &mut self,
        g: GroupRegistration,
        owner_verified: bool,
        now: Timestamp,
    ) -> Result<GroupEntry, WireError> {
        let cutoff = now.saturating_sub(self.ttl);
        if g.host {
            // A host back after its TTL: the names it held are gone, not revived.
            if self
                .host(&g.endpoint, g.public_key)
                .is_some_and(|h| h.last_heartbeat <= cutoff)
            {
                self.purge_host(&g.endpoint, g.public_key);
            }
        }
        let mut registered_at = now;
        if let Some(held) = self.entries.get(&g.name).filter(|s| self.is_live(s, now)) {
            if held.entry.endpoint == g.endpoint {
                registered_at = held.entry.registered_at;
            } else if !owner_verified {
                return Err(WireError::new(
                    ErrorCode::NameTaken,
                    format!("group \"{}\" is held by {}", g.name, held.entry.endpoint),
                ));
            }
        }
        if !owner_verified && !g.host {
            let others: Vec<GroupName> = self
                .entries
                .iter()
                .filter(|(n, s)| **n != g.name && s.entry.endpoint == g.endpoint)
                .map(|(n, _)| n.clone())
                .collect();
            for name in &others {
                self.remove(name);
            }
        }
        if !self.entries.contains_key(&g.name) && self.entries.len() >= self.max_groups {
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
        self.remove(&g.name);
        let entry = GroupEntry {
            name: g.name.clone(),
            endpoint: g.endpoint,
            members: g.members,
            registered_at,
            last_heartbeat: now,
            public_key: g.public_key,
        };
        if g.host {
            match self.host_mut(&entry.endpoint, entry.public_key) {
                Some(h) => {
                    h.last_heartbeat = now;
                    h.names += 1;
                }
                None => self
                    .hosts
                    .entry(entry.endpoint.clone())
                    .or_default()
                    .push(HostLive {
                        key: entry.public_key,
                        last_heartbeat: now,
                        names: 1,
                    }),
            }
        }
        self.entries.insert(
            g.name,
            Slot {
                entry: entry.clone(),
                held: g.host,
            },
        );
        Ok(entry)
    }

    /// `heartbeat_host`: refreshes the host `(endpoint, key)` and with it every entry it
    /// holds, in O(1); returns how many live entries it holds. A host unknown here, or whose
    /// TTL has passed (its names are dropped now), holds 0: it registers them again.
    pub fn heartbeat_host(
        &mut self,
        endpoint: &Endpoint,
        key: Option<PublicKey>,
        now: Timestamp,
    ) -> u64 {
        let cutoff = now.saturating_sub(self.ttl);
        match self.host_mut(endpoint, key) {
            Some(h) if h.last_heartbeat > cutoff => {
                h.last_heartbeat = now;
                h.names
            }
            Some(_) => {
                self.purge_host(endpoint, key);
                0
            }
            None => 0,
        }
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
        match self.entries.get(name).filter(|s| self.is_live(s, now)) {
            None => Err(unknown(name)),
            Some(s) if s.entry.endpoint != *endpoint => Err(WireError::new(
                ErrorCode::NameTaken,
                format!(
                    "group \"{name}\" is held by {}, not {endpoint}",
                    s.entry.endpoint
                ),
            )),
            Some(_) => {
                self.remove(name);
                Ok(())
            }
        }
    }

    /// Live entries, sorted by name.
    pub fn list(&self, now: Timestamp) -> Vec<GroupEntry> {
        self.entries
            .values()
            .filter(|s| self.is_live(s, now))
            .map(|s| self.view(s))
            .collect()
    }

    /// How many entries are live.
    pub fn count(&self, now: Timestamp) -> usize {
        self.entries
            .values()
            .filter(|s| self.is_live(s, now))
            .count()
    }

    /// The live entry for `name`.
    ///
    /// # Errors
    /// `unknown_group`.
    pub fn lookup(&self, name: &GroupName, now: Timestamp) -> Result<GroupEntry, WireError> {
        self.entries
            .get(name)
            .filter(|s| self.is_live(s, now))
            .map(|s| self.view(s))
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
    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }
    /// A plain `register` of `n` at port `port`.
    fn node(n: &str, port: u16, members: u64) -> GroupRegistration {
        GroupRegistration {
            name: name(n),
            endpoint: ep(port),
            members,
            public_key: None,
            host: false,
        }
    }
    /// An entry of `register_groups` from the host at `port` with key `k`.
    fn hosted(n: &str, port: u16, k: Option<u8>) -> GroupRegistration {
        GroupRegistration {
            name: name(n),
            endpoint: ep(port),
            members: 1,
            public_key: k.map(key),
            host: true,
        }
    }
    fn names(d: &Directory, now: Timestamp) -> Vec<GroupName> {
        d.list(now).into_iter().map(|e| e.name).collect()
    }

    #[test]
    fn refresh_keeps_registered_at_and_takeover_is_refused() {
        let mut d = Directory::new(Duration::from_secs(6), 10);
        d.register(node("Cool Group", 1, 0), false, t(10))
            .expect("first");
        let e = d
            .register(node("Cool Group", 1, 3), false, t(12))
            .expect("refresh");
        assert_eq!(
            (e.registered_at, e.last_heartbeat, e.members),
            (t(10), t(12), 3)
        );
        let err = d
            .register(node("Cool Group", 2, 0), false, t(13))
            .expect_err("taken");
        assert_eq!(err.code, ErrorCode::NameTaken);
        // Once the holder's TTL passes, the name is free again.
        let e = d
            .register(node("Cool Group", 2, 0), false, t(18))
            .expect("after ttl");
        assert_eq!(e.endpoint, ep(2));
    }

    /// PROTOCOL §4.1: an entry whose TTL has passed is gone at that moment, whether or not
    /// the sweep ([`Directory::expire`]) has run: a register from the same endpoint 0.1 s
    /// later creates it anew, and it cannot be unregistered.
    #[test]
    fn an_expired_entry_is_gone_before_any_sweep() {
        let mut d = Directory::new(Duration::from_secs(6), 10);
        d.register(node("g", 1, 0), false, t(0)).expect("first");
        let later = Timestamp::from_micros(6_100_000);
        let e = d.register(node("g", 1, 1), false, later).expect("again");
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
        d.register(node("a", 1, 0), false, t(0)).expect("a");
        d.register(node("b", 2, 0), false, t(4)).expect("b");
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
        d.register(node("a", 1, 0), false, t(0)).expect("a");
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
        d.register(node("victim", 1, 0), true, t(0))
            .expect("victim");
        d.register(node("evil", 1, 0), true, t(1)).expect("evil");
        assert_eq!(names(&d, t(1)), vec![name("evil"), name("victim")]);
    }

    #[test]
    fn without_owners_a_new_name_at_the_same_endpoint_replaces_the_old_one() {
        let mut d = Directory::new(Duration::from_secs(6), 10);
        d.register(node("old", 1, 0), false, t(0)).expect("old");
        d.register(node("new", 1, 0), false, t(1)).expect("new");
        assert_eq!(names(&d, t(1)), vec![name("new")]);
    }

    #[test]
    fn the_directory_is_bounded() {
        let mut d = Directory::new(Duration::from_secs(6), 1);
        d.register(node("a", 1, 0), false, t(0)).expect("a");
        let err = d.register(node("b", 2, 0), false, t(1)).expect_err("full");
        assert_eq!(err.code, ErrorCode::LimitReached);
        d.register(node("b", 2, 0), false, t(7))
            .expect("a expired, room again");
    }

    /// §4.1.1: the names of `register_groups` live on the host's one heartbeat, which
    /// counts them; the listed `last_heartbeat` is the host's.
    #[test]
    fn a_host_heartbeat_keeps_its_names_live_and_counts_them() {
        let mut d = Directory::new(Duration::from_secs(6), 100);
        for n in ["a", "b", "c"] {
            d.register(hosted(n, 1, Some(1)), true, t(0)).expect(n);
        }
        assert_eq!(d.heartbeat_host(&ep(1), Some(key(1)), t(5)), 3);
        assert_eq!(d.heartbeat_host(&ep(1), Some(key(1)), t(10)), 3);
        let listed = d.list(t(15));
        assert_eq!(listed.len(), 3, "live 15 s after registering: {listed:?}");
        assert!(listed
            .iter()
            .all(|e| e.last_heartbeat == t(10) && e.registered_at == t(0)));
        assert_eq!(
            d.lookup(&name("b"), t(15)).map(|e| e.last_heartbeat),
            Ok(t(10))
        );
        assert!(d.expire(t(15)).is_empty());
        // Another key heartbeating the same endpoint is another host: it holds nothing and
        // refreshes nothing.
        assert_eq!(d.heartbeat_host(&ep(1), Some(key(2)), t(15)), 0);
        assert_eq!(d.heartbeat_host(&ep(2), Some(key(1)), t(15)), 0);
        d.unregister(&name("a"), &ep(1), t(15)).expect("unregister");
        assert_eq!(d.heartbeat_host(&ep(1), Some(key(1)), t(15)), 2);
    }

    /// §4.1.1: a host silent past the TTL drops every name it holds, before and at the
    /// sweep; coming back, it holds 0 and its old names are not revived by one new one.
    #[test]
    fn a_hosts_expiry_drops_its_names() {
        let mut d = Directory::new(Duration::from_secs(6), 100);
        for n in ["a", "b"] {
            d.register(hosted(n, 1, Some(1)), true, t(0)).expect(n);
        }
        d.register(node("solo", 2, 0), false, t(5)).expect("solo");
        assert_eq!(names(&d, t(6)), vec![name("solo")]);
        assert_eq!(
            d.lookup(&name("a"), t(6)).map_err(|e| e.code),
            Err(ErrorCode::UnknownGroup)
        );
        d.register(hosted("c", 1, Some(1)), true, t(7)).expect("c");
        assert_eq!(names(&d, t(7)), vec![name("c"), name("solo")]);
        assert_eq!(d.heartbeat_host(&ep(1), Some(key(1)), t(8)), 1);
        let mut dropped = d.expire(t(14));
        dropped.sort();
        assert_eq!(dropped, vec![name("c"), name("solo")]);
        assert_eq!(d.heartbeat_host(&ep(1), Some(key(1)), t(14)), 0);
        assert!(d.hosts.is_empty());
    }

    /// A heartbeat that comes after the TTL finds its names gone (0), even before a sweep.
    #[test]
    fn a_late_host_heartbeat_holds_nothing() {
        let mut d = Directory::new(Duration::from_secs(6), 100);
        d.register(hosted("a", 1, None), false, t(0)).expect("a");
        assert_eq!(d.heartbeat_host(&ep(1), None, t(6)), 0);
        assert!(d.list(t(6)).is_empty());
        assert_eq!(d.heartbeat_host(&ep(1), None, t(7)), 0);
    }

    /// §4.1: without owners, a plain `register` keeps "one endpoint is one node"; names a
    /// host registered with `register_groups` at one endpoint are all kept.
    #[test]
    fn without_owners_a_hosts_names_at_one_endpoint_are_kept() {
        let mut d = Directory::new(Duration::from_secs(6), 100);
        for n in ["a", "b", "c"] {
            d.register(hosted(n, 1, None), false, t(0)).expect(n);
        }
        assert_eq!(d.list(t(1)).len(), 3);
        assert_eq!(d.heartbeat_host(&ep(1), None, t(1)), 3);
        // Another node's name is still refused while the host holds it.
        let err = d.register(node("a", 2, 0), false, t(2)).expect_err("taken");
        assert_eq!(err.code, ErrorCode::NameTaken);
        // A plain register at the host's endpoint: one endpoint is one node, as today.
        d.register(node("solo", 1, 0), false, t(2)).expect("solo");
        assert_eq!(names(&d, t(2)), vec![name("solo")]);
        assert_eq!(d.heartbeat_host(&ep(1), None, t(3)), 0);
    }

    /// The owner moves a held name to another endpoint; the old host counts one fewer,
    /// and a plain `register` of a held name makes it an entry of its own.
    #[test]
    fn the_owner_moves_a_held_name_and_the_old_host_counts_one_fewer() {
        let mut d = Directory::new(Duration::from_secs(6), 100);
        for n in ["a", "b", "c"] {
            d.register(hosted(n, 1, Some(1)), true, t(0)).expect(n);
        }
        d.register(hosted("a", 2, Some(1)), true, t(1))
            .expect("moved");
        assert_eq!(d.heartbeat_host(&ep(1), Some(key(1)), t(2)), 2);
        assert_eq!(d.heartbeat_host(&ep(2), Some(key(1)), t(2)), 1);
        assert_eq!(d.lookup(&name("a"), t(2)).map(|e| e.endpoint), Ok(ep(2)));
        let mut plain = node("b", 1, 0);
        plain.public_key = Some(key(1));
        d.register(plain, true, t(3)).expect("plain");
        assert_eq!(d.heartbeat_host(&ep(1), Some(key(1)), t(4)), 1);
        // The plain entry lives on its own heartbeat, not the host's.
        assert_eq!(d.heartbeat_host(&ep(2), Some(key(1)), t(5)), 1);
        d.heartbeat_host(&ep(1), Some(key(1)), t(8));
        d.heartbeat_host(&ep(2), Some(key(1)), t(8));
        assert_eq!(names(&d, t(9)), vec![name("a"), name("c")]);
    }

    /// The cap counts held entries too.
    #[test]
    fn host_entries_count_towards_the_bound() {
        let mut d = Directory::new(Duration::from_secs(6), 2);
        d.register(hosted("a", 1, None), false, t(0)).expect("a");
        d.register(hosted("b", 1, None), false, t(0)).expect("b");
        let err = d
            .register(hosted("c", 1, None), false, t(1))
            .expect_err("full");
        assert_eq!(err.code, ErrorCode::LimitReached);
        assert_eq!(d.heartbeat_host(&ep(1), None, t(1)), 2);
    }
}
