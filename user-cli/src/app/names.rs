//! The names the prompt's tab completion offers ([`Names`]): group names (the groups joined,
//! from the state file, and the registry's last listing) and user names (from `users`,
//! `whois`, the accounts you sent direct messages to or got them from, and the senders seen
//! in your groups). Filled by [`App`] as commands run and live entries arrive; read by the
//! completer in `repl`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use super::{lock, App};
use crate::state::StateFile;

/// At most this many names of each kind are kept (a registry with more groups or users
/// than this completes from the first ones seen).
pub const MAX_NAMES: usize = 10_000;

/// A shared, cheap-to-clone handle on the names seen so far.
#[derive(Clone, Default)]
pub struct Names {
    known: Arc<Mutex<Known>>,
    /// The client state, for the joined groups (as other processes' saves merge them in).
    state: Option<Arc<Mutex<StateFile>>>,
}

#[derive(Default)]
struct Known {
    groups: BTreeSet<String>,
    users: BTreeSet<String>,
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names").finish_non_exhaustive()
    }
}

fn add(set: &mut BTreeSet<String>, names: impl IntoIterator<Item = String>) {
    for name in names {
        if set.len() >= MAX_NAMES {
            return;
        }
        set.insert(name);
    }
}

impl Names {
    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes group names (a listing's).
    pub fn add_groups(&self, names: impl IntoIterator<Item = String>) {
        add(&mut self.known().groups, names);
    }

    /// Notes user names.
    pub fn add_users(&self, names: impl IntoIterator<Item = String>) {
        add(&mut self.known().users, names);
    }

    /// Every group name known: the joined ones and those listed, sorted, each once.
    pub fn groups(&self) -> Vec<String> {
        let mut all = self.known().groups.clone();
        if let Some(state) = &self.state {
            all.extend(lock(state).state.groups.keys().cloned());
        }
        all.into_iter().collect()
    }

    /// Every user name known, sorted.
    pub fn users(&self) -> Vec<String> {
        self.known().users.iter().cloned().collect()
    }
}

impl App {
    /// The names tab completion offers, kept up to date as this client runs commands.
    pub fn names(&self) -> Names {
        Names {
            known: Arc::clone(&self.session.names.known),
            state: Some(Arc::clone(&self.state)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sorted_once_and_bounded() {
        let names = Names::default();
        names.add_groups(["b".to_owned(), "a".to_owned(), "b".to_owned()]);
        names.add_users((0..MAX_NAMES + 5).map(|i| format!("u{i}")));
        assert_eq!(names.groups(), ["a", "b"]);
        assert_eq!(names.users().len(), MAX_NAMES);
    }
}
