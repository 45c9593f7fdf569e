//! The groups a host serves: [`GroupTable`], name → slot → [`Hosted`].
//!
//! An idle group is its name, number, owner and a flag: a [`Hosted`] without its
//! [`Loaded`] part. Its engine ([`Group`]: subscribers, attachments) and its cached log state
//! ([`LogState`]) are made the first time a request names it ([`crate::Node`] loads it), and
//! kept while the host lives.

use std::collections::HashMap;
use std::sync::Arc;

use agora_common::keys::PublicKey;
use agora_proto::wire::GroupName;

use crate::group::subscribers::HostBudget;
use crate::group::Group;
use crate::store::{GroupId, LogState};

/// A group in use: its engine and its cached log state.
#[derive(Debug)]
pub struct Loaded {
    /// The engine.
    pub group: Group,
    /// The newest seq, clock and member count, for the host database's view.
    pub log: LogState,
}

/// One group of the host.
#[derive(Debug)]
pub struct Hosted {
    /// Its name.
    pub name: GroupName,
    /// Its number in the host database.
    pub gid: GroupId,
    /// Its owner's key (`None`: the host key, or an `--insecure` host).
    pub owner: Option<PublicKey>,
    /// Stopped by `stop {group}`: answers `shutting_down` until the host restarts.
    pub stopped: bool,
    /// Created and stored, its name not yet taken by the registry: it answers
    /// `unknown_group`, and its `create` reply waits ([`crate::Node`]'s create waiters).
    pub pending: bool,
    /// Its engine and log state, once a request named it.
    pub loaded: Option<Box<Loaded>>,
    /// Its member count as the store gave it at start (or at create), for the registrar
    /// while the group is not loaded; once loaded, its log state's count is the one used.
    pub members: u64,
}

/// The host's groups, by name; slots are never reused while the host runs.
#[derive(Debug, Default)]
pub struct GroupTable {
    by_name: HashMap<GroupName, usize>,
    slots: Vec<Hosted>,
    /// The push budget every loaded group's subscribers share.
    push_budget: Option<Arc<HostBudget>>,
}

impl GroupTable {
    /// No groups.
    pub fn new() -> GroupTable {
        GroupTable::default()
    }

    /// Adds a group; returns its slot. A name already there keeps its slot.
    pub fn insert(&mut self, hosted: Hosted) -> usize {
        if let Some(&slot) = self.by_name.get(&hosted.name) {
            return slot;
        }
        let slot = self.slots.len();
        self.by_name.insert(hosted.name.clone(), slot);
        self.slots.push(hosted);
        slot
    }

    /// The push budget the host's groups share: made at the first call with `total` bytes
    /// (`--push-budget-total`), the same budget after.
    pub fn push_budget(&mut self, total: usize) -> Arc<HostBudget> {
        Arc::clone(
            self.push_budget
                .get_or_insert_with(|| Arc::new(HostBudget::new(total))),
        )
    }

    /// The slot of the group named `name`.
    pub fn slot(&self, name: &GroupName) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Whether `name` is a group served here (not stopped, not pending).
    pub fn serves(&self, name: &GroupName) -> bool {
        self.slot(name)
            .is_some_and(|s| !self.slots[s].stopped && !self.slots[s].pending)
    }

    /// Whether `name` is a group of the host stopped by `stop {group}` (it answers
    /// `shutting_down`, not `unknown_group`).
    pub fn stopped(&self, name: &GroupName) -> bool {
        self.slot(name).is_some_and(|s| self.slots[s].stopped)
    }

    /// Frees the name of the group in `slot` (deleted, or created by a batch that rolled
    /// back): it answers `unknown_group`, and a new group may take the name. Its slot stays,
    /// stopped (its engine still sends the `unsubscribed` notices it holds).
    pub fn forget(&mut self, slot: usize) {
        let hosted = &mut self.slots[slot];
        hosted.stopped = true;
        if self.by_name.get(&hosted.name) == Some(&slot) {
            self.by_name.remove(&hosted.name);
        }
    }

    /// Serves the group in `slot` again under its name (its delete rolled back), unless
    /// another group took the name meanwhile.
    ///
    /// # Panics
    /// If `slot` was not returned by this table.
    pub fn restore(&mut self, slot: usize) {
        let hosted = &mut self.slots[slot];
        if !self.by_name.contains_key(&hosted.name) {
            hosted.stopped = false;
            self.by_name.insert(hosted.name.clone(), slot);
        }
    }

    /// The group in `slot`.
    ///
    /// # Panics
    /// If `slot` was not returned by this table.
    pub fn get(&self, slot: usize) -> &Hosted {
        &self.slots[slot]
    }

    /// The group in `slot`, to change.
    ///
    /// # Panics
    /// If `slot` was not returned by this table.
    pub fn get_mut(&mut self, slot: usize) -> &mut Hosted {
        &mut self.slots[slot]
    }

    /// How many groups there are.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Every group, by slot.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Hosted)> {
        self.slots.iter().enumerate()
    }

    /// Every loaded group, by slot.
    pub fn loaded_mut(&mut self) -> impl Iterator<Item = (usize, &mut Loaded)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, h)| h.loaded.as_deref_mut().map(|l| (i, l)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the host keeps per idle group stays small: no engine, no log state, no buffers.
    #[test]
    fn an_idle_group_is_small() {
        assert!(
            std::mem::size_of::<Hosted>() <= 128,
            "{}",
            std::mem::size_of::<Hosted>()
        );
        assert!(
            std::mem::size_of::<Group>() < 1024,
            "{}",
            std::mem::size_of::<Group>()
        );
        let mut table = GroupTable::new();
        let name = GroupName::new("idle").expect("name");
        let slot = table.insert(Hosted {
            name: name.clone(),
            gid: GroupId(7),
            owner: None,
            stopped: false,
            pending: false,
            loaded: None,
            members: 0,
        });
        assert_eq!(table.slot(&name), Some(slot));
        assert!(table.serves(&name));
        assert!(table.get(slot).loaded.is_none());
        table.get_mut(slot).stopped = true;
        assert!(!table.serves(&name));
    }
}
