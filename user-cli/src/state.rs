//! The client's own state, kept per user in the state directory
//! (`$XDG_STATE_HOME/agora/USER.json`, usually `~/.local/state/agora/`): the groups joined
//! from this client, each with its node's last known endpoint, the last seq shown, and
//! whether to follow it live. It is what lets a restarted client report unread counts and
//! resume each stream where it stopped, and reach known groups while the registry is down.
//! With several registries (`--registry A,B`), it also keeps the one that last answered, to
//! try first next time.
//!
//! The state lists private groups with their endpoints and keys, so the directory is 0700
//! and its files 0600 from the moment they are created; an existing looser directory or
//! file is tightened when the state is opened, with a warning on stderr
//! ([`agora_common::fsmode`]).
//!
//! # One user, many processes
//! Several processes of one user (two terminals, a `watch`, scripts, one-shot commands) share
//! the file. Each save is atomic (a temporary file of its own in the same directory, synced,
//! then renamed over the file: [`agora_common::fsmode::write_private`]) and made under an
//! advisory lock on `USER.json.lock` beside it (`flock`, through fd-lock), and it *merges*:
//! under the lock it reads what is on disk now ("theirs"), compares it and this process's
//! state ("ours") with what this process last read or wrote ("base"), and writes the merge,
//! field by field ([`merge`]):
//!
//! - a group's `last_seen`: the larger of ours and theirs (seen is seen, wherever), except
//!   where the two sides name different places for the group (re-created elsewhere, its seqs
//!   started again): then the last seen of the side whose place is kept;
//! - a group's `endpoint` and `public_key` (together), and its `subscribed`: ours where this
//!   process changed them since base, else theirs;
//! - the joined groups: the union, except that a group in base and missing on one side was
//!   left there (`leave` here, or in another process) and stays left, unless this process
//!   joined it since ([`StateFile::joined`]: a leave there, then a join here);
//! - `registry` (the one that last answered): ours if this process changed it, else theirs.
//!
//! The merge becomes this process's state and its new base, so a long-running prompt also
//! learns the groups joined from another terminal. An unreadable file on disk at save time
//! is set aside as `USER.json.bad` (as when opened) and replaced by this process's state.
//!
//! A save waits at most [`LOCK_WAIT`] (2 s) for another process's lock (a stopped process,
//! Ctrl-Z in the middle of a save, can hold it for ever); then it warns once and skips, and
//! the next save merges what it would have written. The slow part of a save runs on a copy
//! ([`StateFile::begin_save`], [`Save::run`], [`StateFile::finish_save`]), so a prompt's
//! commands and tab completion never wait on the file ([`save_shared`]). The temporary
//! files of saves killed part way (`.USER.json.XXXXXX.tmp`) are removed, under the lock,
//! when the state is opened.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_proto::wire::UserName;
use serde::{Deserialize, Serialize};

/// One joined group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// The node's endpoint when last seen.
    pub endpoint: String,
    /// The last seq shown to the user.
    pub last_seen: u64,
    /// Whether to follow the group live.
    pub subscribed: bool,
    /// The node's CURVE public key when last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<agora_common::keys::PublicKey>,
}

/// Everything kept, by group name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Joined groups.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupState>,
    /// Of a list of registry endpoints, the one that last answered (`None`: the list's
    /// first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
}

/// The state and the file it lives in.
#[derive(Debug)]
pub struct StateFile {
    path: Option<PathBuf>,
    /// The state.
    pub state: State,
    /// The state as this process last read or wrote it: what a save compares both its own
    /// state and the file's with, to tell which side changed what ([`merge`]).
    base: State,
    /// The groups `join`ed by this process since its last save ([`StateFile::joined`]).
    joined: BTreeSet<String>,
    /// Whether a save skipped for a held lock was reported ([`StateFile::lock_warned`]).
    lock_warned: bool,
}

/// How long a save waits for another process's lock on the state file before it gives up
/// (the next save merges what this one would have written): 2 s.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// How often a waiting save tries the lock again.
const LOCK_RETRY: Duration = Duration::from_millis(20);

/// A save in progress, copied out of a [`StateFile`] by [`StateFile::begin_save`]: the slow
/// part (the lock, the read, the merge, the synced write) runs from this copy, so a shared
/// state's mutex is not held while another process holds the file.
#[derive(Debug)]
pub struct Save {
    path: Option<PathBuf>,
    base: State,
    state: State,
    joined: BTreeSet<String>,
}

impl Save {
    /// Under an advisory lock on `USER.json.lock` (tried until `wait` runs out), reads the
    /// file, [`merge`]s, and writes the result atomically (a temporary file of its own, mode
    /// 0600, renamed over the old one), creating the directory with mode 0700 if needed.
    /// Nothing is written when the file already holds the merge. A file on disk that cannot
    /// be parsed is set aside as `USER.json.bad` (as [`StateFile::open`] does) and replaced.
    /// Returns the merge (what the file holds now).
    ///
    /// # Errors
    /// [`io::ErrorKind::TimedOut`] when another process held the lock for all of `wait`;
    /// the directory, the lock file or the state file cannot be created or written.
    pub fn run(&self, wait: Duration) -> io::Result<State> {
        let Some(path) = &self.path else {
            return Ok(self.state.clone());
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        agora_common::fsmode::private_dir(dir)?;
        let mut lock_path = path.clone().into_os_string();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let mut lock = fd_lock::RwLock::new(agora_common::fsmode::private_file(&lock_path)?);
        let deadline = Instant::now() + wait;
        let _held = loop {
            match lock.try_write() {
                Ok(held) => break held,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "{} is held by another process for {}; not saved this time \
                                 (the next save merges)",
                                lock_path.display(),
                                humantime::format_duration(wait)
                            ),
                        ));
                    }
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(e) => return Err(e),
            }
        };
        let theirs = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(state) => Some(state),
                Err(e) => {
                    set_aside(path, &e);
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let merged = merge(
            &self.base,
            &self.state,
            theirs.as_ref().unwrap_or(&self.base),
            &self.joined,
        );
        if theirs.as_ref() != Some(&merged) {
            let bytes = serde_json::to_vec_pretty(&merged).map_err(io::Error::other)?;
            agora_common::fsmode::write_private(path, &bytes)?;
        }
        Ok(merged)
    }
}

/// Saves a state shared between threads (the prompt and its live feed) without holding
/// its mutex for the slow part: copies out under the mutex, runs [`Save::run`] with
/// [`LOCK_WAIT`] unlocked, and takes the result back in under the mutex. A save skipped for
/// a held lock is a warning once per process; other failures warn each time.
pub fn save_shared(state: &Mutex<StateFile>) {
    let lock = || state.lock().unwrap_or_else(PoisonError::into_inner);
    let save = lock().begin_save();
    match save.run(LOCK_WAIT) {
        Ok(merged) => lock().finish_save(save, merged),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            let mut s = lock();
            if !std::mem::replace(s.lock_warned(), true) {
                tracing::warn!(error = %e, "could not save the client state");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not save the client state"),
    }
}

impl StateFile {
    /// Loads `DIR/USER.json` (`dir` defaults to the user's state directory). A missing file
    /// is an empty state; an unreadable one is set aside as `USER.json.bad` with a warning.
    /// An existing directory looser than 0700, and files in it looser than 0600, are
    /// tightened (each with a warning); a missing directory is not created until
    /// [`Save::run`].
    pub fn open(dir: Option<PathBuf>, user: &UserName) -> StateFile {
        let dir = dir.or_else(|| {
            directories::ProjectDirs::from("", "", "agora")
                .map(|d| d.state_dir().unwrap_or_else(|| d.data_dir()).to_owned())
        });
        if let Some(dir) = &dir {
            tighten_dir(dir);
            remove_stale_temporaries(dir, user.as_str());
        }
        let path = dir.map(|d| d.join(format!("{user}.json")));
        let state = path.as_deref().map(load).unwrap_or_default();
        StateFile {
            path,
            base: state.clone(),
            state,
            joined: BTreeSet::new(),
            lock_warned: false,
        }
    }

    /// Saves the state, merged with what other processes of the same user saved since this
    /// one last read or wrote the file (the module's "One user, many processes"):
    /// [`StateFile::begin_save`], [`Save::run`] with [`LOCK_WAIT`], then
    /// [`StateFile::finish_save`]. A caller that shares the state between threads runs the
    /// middle step without holding its mutex ([`save_shared`]).
    ///
    /// # Errors
    /// As [`Save::run`]: the directory, the lock file or the state file cannot be created,
    /// locked (within [`LOCK_WAIT`]: [`io::ErrorKind::TimedOut`]) or written.
    #[cfg(test)]
    pub fn save(&mut self) -> io::Result<()> {
        let save = self.begin_save();
        let merged = save.run(LOCK_WAIT)?;
        self.finish_save(save, merged);
        Ok(())
    }

    /// A copy of what a save needs (the state, its base, the groups joined since), to
    /// [`Save::run`] away from whatever guards this `StateFile`.
    pub fn begin_save(&self) -> Save {
        Save {
            path: self.path.clone(),
            base: self.base.clone(),
            state: self.state.clone(),
            joined: self.joined.clone(),
        }
    }

    /// Takes in what [`Save::run`] wrote (`merged`, the file's content now): it becomes the
    /// base, and the state becomes the merge with it of what changed here while the save
    /// ran (a group seen further, joined or left meanwhile is kept for the next save).
    pub fn finish_save(&mut self, save: Save, merged: State) {
        let changed_meanwhile: BTreeSet<String> =
            self.joined.difference(&save.joined).cloned().collect();
        self.state = merge(&save.state, &self.state, &merged, &changed_meanwhile);
        self.base = merged;
        self.joined = changed_meanwhile;
    }

    /// Whether the warning that the state file's lock was held too long was printed (once
    /// per process is enough: the next save merges what this one skipped).
    pub fn lock_warned(&mut self) -> &mut bool {
        &mut self.lock_warned
    }

    /// Notes that this process joined `group` (the `join` command): the next save keeps it
    /// even if another process left it meanwhile (its leave came first).
    pub fn joined(&mut self, group: &str) {
        self.joined.insert(group.to_owned());
    }

    /// Records that `seq` of `group` was shown; returns whether it was new.
    pub fn seen(&mut self, group: &str, seq: u64) -> bool {
        match self.state.groups.get_mut(group) {
            Some(g) if seq > g.last_seen => {
                g.last_seen = seq;
                true
            }
            _ => false,
        }
    }
}

/// The three-way merge of a save: `ours` (this process's state) and `theirs` (the file's,
/// as other processes left it), each compared with `base` (what this process last read or
/// wrote). Per field, as the module's "One user, many processes" lists: `last_seen` the
/// maximum; `endpoint` with `public_key`, and `subscribed`, from the side that changed them
/// (ours when both did); groups joined on either side kept, groups left on either side (in
/// base, missing on that side) dropped unless in `joined` (joined by this process since
/// base); `registry` ours if changed, else theirs.
pub fn merge(base: &State, ours: &State, theirs: &State, joined: &BTreeSet<String>) -> State {
    let mut groups = BTreeMap::new();
    let names = ours.groups.keys().chain(theirs.groups.keys());
    for name in names {
        if groups.contains_key(name) {
            continue;
        }
        let was = base.groups.get(name);
        let merged = match (ours.groups.get(name), theirs.groups.get(name)) {
            (Some(o), Some(t)) => {
                let place_changed =
                    was.is_none_or(|b| (&b.endpoint, b.public_key) != (&o.endpoint, o.public_key));
                let place = if place_changed { o } else { t };
                // Where the two sides name different places, the group was re-created
                // elsewhere on the side that changed it and its seqs started again: that
                // side's last seen goes with its place.
                let same_place = (&o.endpoint, o.public_key) == (&t.endpoint, t.public_key);
                let last_seen = if same_place {
                    o.last_seen.max(t.last_seen)
                } else {
                    place.last_seen
                };
                let sub_changed = was.is_none_or(|b| b.subscribed != o.subscribed);
                GroupState {
                    endpoint: place.endpoint.clone(),
                    public_key: place.public_key,
                    last_seen,
                    subscribed: if sub_changed {
                        o.subscribed
                    } else {
                        t.subscribed
                    },
                }
            }
            // Joined on one side since base: kept. In base but gone on the other side: left
            // there, and stays left, unless joined here after.
            (Some(one), None) if was.is_none() || joined.contains(name) => one.clone(),
            (None, Some(one)) if was.is_none() => one.clone(),
            _ => continue,
        };
        groups.insert(name.clone(), merged);
    }
    State {
        groups,
        registry: if ours.registry != base.registry {
            ours.registry.clone()
        } else {
            theirs.registry.clone()
        },
    }
}

/// Tightens an existing state directory to 0700 and the state files in it
/// ([`is_state_file`]: every user's state, the known servers, set-aside `.bad` files) to
/// 0600; other files in the directory are not ours and keep their modes (the directory may
/// be one the user keeps other things in, `~/bin` say). Failures are warnings: the state is
/// still usable, and the next save creates its file 0600.
fn tighten_dir(dir: &Path) {
    use agora_common::fsmode;
    if let Err(e) = fsmode::tighten(dir, fsmode::DIR_MODE) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot tighten the state directory");
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) && is_state_file(&entry.file_name()) {
            let path = entry.path();
            if let Err(e) = fsmode::tighten(&path, fsmode::FILE_MODE) {
                tracing::warn!(path = %path.display(), error = %e, "cannot tighten a state file");
            }
        }
    }
}

/// Whether a file of the state directory is one user-cli writes: `*.json` (a user's state,
/// `known_servers.json`), `*.json.bad` (set aside unreadable), `*.json.lock` (the lock a
/// save holds), or a save's temporary file: `.USER.json.XXXXXX.tmp` ([`is_temporary`]), or
/// `USER.json.tmp` from an earlier build.
fn is_state_file(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    [".json", ".json.bad", ".json.lock", ".json.tmp"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
        || is_temporary(&name, None)
}

/// Whether `name` is a save's temporary file (`.USER.json.XXXXXX.tmp`, as
/// [`agora_common::fsmode::write_private`] names them, or an earlier build's
/// `USER.json.tmp`), of `user`'s state if given.
fn is_temporary(name: &str, user: Option<&str>) -> bool {
    if let Some(user) = user {
        return name == format!("{user}.json.tmp")
            || name
                .strip_prefix(&format!(".{user}.json."))
                .is_some_and(|rest| rest.ends_with(".tmp") && !rest.contains('/'));
    }
    name.ends_with(".json.tmp")
        || (name.starts_with('.') && name.ends_with(".tmp") && name.contains(".json."))
}

/// Removes `user`'s temporary files left by saves that were killed part way. A live save
/// holds the lock while its temporary file exists, so they are removed under the lock (tried
/// for [`LOCK_WAIT`]; if another process holds it all that time, they stay for the next
/// open).
fn remove_stale_temporaries(dir: &Path, user: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let stale: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| is_temporary(&e.file_name().to_string_lossy(), Some(user)))
        .map(|e| e.path())
        .collect();
    if stale.is_empty() {
        return;
    }
    let lock_path = dir.join(format!("{user}.json.lock"));
    let Ok(file) = agora_common::fsmode::private_file(&lock_path) else {
        return;
    };
    let mut lock = fd_lock::RwLock::new(file);
    let deadline = Instant::now() + LOCK_WAIT;
    let _held = loop {
        match lock.try_write() {
            Ok(held) => break held,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(LOCK_RETRY);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    };
    for path in stale {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::debug!(path = %path.display(), error = %e, "cannot remove a stale temporary file");
        }
    }
}

/// Sets an unparseable state file aside as `USER.json.bad` (replacing an older one), with a
/// warning, so that what it held can still be looked at.
fn set_aside(path: &Path, error: &serde_json::Error) {
    let bad = path.with_extension("json.bad");
    tracing::warn!(path = %path.display(), set_aside = %bad.display(), error = %error, "unreadable state set aside");
    let _ = std::fs::rename(path, bad);
}

fn load(path: &Path) -> State {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            set_aside(path, &e);
            State::default()
        }),
        Err(_) => State::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_garbage_is_set_aside() {
        let dir = tempfile::tempdir().expect("tmp");
        let user = UserName::new("alice").expect("name");
        let mut f = StateFile::open(Some(dir.path().to_owned()), &user);
        f.state.groups.insert(
            "Cool Group".into(),
            GroupState {
                endpoint: "tcp://127.0.0.1:1".into(),
                last_seen: 3,
                subscribed: true,
                public_key: None,
            },
        );
        assert!(f.seen("Cool Group", 5));
        assert!(!f.seen("Cool Group", 4));
        f.save().expect("save");
        let again = StateFile::open(Some(dir.path().to_owned()), &user);
        assert_eq!(again.state, f.state);

        std::fs::write(dir.path().join("alice.json"), b"{not json").expect("write");
        let fresh = StateFile::open(Some(dir.path().to_owned()), &user);
        assert!(fresh.state.groups.is_empty());
        assert!(dir.path().join("alice.json.bad").exists());
    }

    fn group(endpoint: &str, last_seen: u64, subscribed: bool) -> GroupState {
        GroupState {
            endpoint: endpoint.into(),
            last_seen,
            subscribed,
            public_key: None,
        }
    }

    /// Issue 23: two processes of one user that each changed something save one after the
    /// other; the file keeps both changes (it kept only the last save's state).
    #[test]
    fn two_processes_saves_merge_instead_of_the_last_one_winning() {
        let dir = tempfile::tempdir().expect("tmp");
        let user = UserName::new("alice").expect("name");
        let open = || StateFile::open(Some(dir.path().to_owned()), &user);
        let mut first = open();
        first
            .state
            .groups
            .insert("a".into(), group("tcp://a:1", 1, true));
        first
            .state
            .groups
            .insert("b".into(), group("tcp://b:1", 1, true));
        first
            .state
            .groups
            .insert("c".into(), group("tcp://c:1", 1, true));
        first.save().expect("save");

        // Two processes start from that.
        let mut one = open();
        let mut two = open();
        // One: joins d, sees a up to 9, leaves c, unsubscribes b, remembers a registry.
        one.state
            .groups
            .insert("d".into(), group("tcp://d:1", 4, true));
        assert!(one.seen("a", 9));
        one.state.groups.remove("c");
        one.state.groups.get_mut("b").expect("b").subscribed = false;
        one.state.registry = Some("tcp://r2:1".into());
        // Two: joins e, sees a up to 5 and c up to 7, finds b moved.
        two.state
            .groups
            .insert("e".into(), group("tcp://e:1", 2, true));
        assert!(two.seen("a", 5));
        assert!(two.seen("c", 7));
        two.state.groups.get_mut("b").expect("b").endpoint = "tcp://b:2".into();
        one.save().expect("save one");
        two.save().expect("save two");

        let want = State {
            groups: [
                ("a".into(), group("tcp://a:1", 9, true)),
                ("b".into(), group("tcp://b:2", 1, false)),
                ("d".into(), group("tcp://d:1", 4, true)),
                ("e".into(), group("tcp://e:1", 2, true)),
            ]
            .into_iter()
            .collect(),
            registry: Some("tcp://r2:1".into()),
        };
        assert_eq!(open().state, want, "the file");
        assert_eq!(two.state, want, "the last saver learns the other's changes");
        // One saves again with nothing new: it learns two's changes, and the file stays.
        one.save().expect("save one again");
        assert_eq!(one.state, want);
        assert_eq!(open().state, want);
        // Leaving a group another process still has: it stays left after that one saves.
        one.state.groups.remove("e");
        one.save().expect("leave e");
        assert!(two.seen("e", 3));
        two.save().expect("save two again");
        assert!(!open().state.groups.contains_key("e"));
        // Left in one, then joined again in the other (which still had it): joined.
        one.state.groups.remove("d");
        one.save().expect("leave d");
        two.state.groups.get_mut("d").expect("d").subscribed = true;
        two.joined("d");
        two.save().expect("join d");
        assert!(
            open().state.groups.contains_key("d"),
            "the join after the leave"
        );
    }

    /// Issue 23: saves from many threads at once (each its own open file, as processes) lose
    /// no group: the lock serializes the read-merge-write.
    #[test]
    fn concurrent_saves_lose_no_update() {
        let dir = tempfile::tempdir().expect("tmp");
        let user = UserName::new("alice").expect("name");
        std::thread::scope(|s| {
            for i in 0..16 {
                let (dir, user) = (dir.path(), &user);
                s.spawn(move || {
                    let mut f = StateFile::open(Some(dir.to_owned()), user);
                    f.state
                        .groups
                        .insert(format!("g{i}"), group("tcp://g:1", i, true));
                    f.save().expect("save");
                    // A second change on top of whatever the first save merged in.
                    f.state
                        .groups
                        .insert("shared".into(), group("tcp://s:1", 0, true));
                    f.seen("shared", i);
                    f.save().expect("save again");
                });
            }
        });
        let f = StateFile::open(Some(dir.path().to_owned()), &user);
        for i in 0..16 {
            assert_eq!(f.state.groups[&format!("g{i}")].last_seen, i, "g{i}");
        }
        assert_eq!(f.state.groups["shared"].last_seen, 15);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(
            names,
            ["alice.json", "alice.json.lock"],
            "no temporary file is left"
        );
    }

    /// Review of issue 23: a save waited for the lock with no time limit, so a process
    /// stopped in the middle of a save (Ctrl-Z) hung every other one for ever.
    #[test]
    fn a_held_lock_times_out_instead_of_hanging_the_save() {
        let dir = tempfile::tempdir().expect("tmp");
        let user = UserName::new("alice").expect("name");
        let mut f = StateFile::open(Some(dir.path().to_owned()), &user);
        f.state
            .groups
            .insert("a".into(), group("tcp://a:1", 1, true));
        std::fs::create_dir_all(dir.path()).expect("dir");
        let mut other = fd_lock::RwLock::new(
            agora_common::fsmode::private_file(&dir.path().join("alice.json.lock")).expect("lock"),
        );
        let held = other.write().expect("hold the lock");
        let started = Instant::now();
        let save = f.begin_save();
        let e = save
            .run(Duration::from_millis(300))
            .expect_err("the lock is held");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("alice.json.lock"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(held);
        let merged = save.run(Duration::from_millis(300)).expect("free now");
        f.finish_save(save, merged);
        assert!(StateFile::open(Some(dir.path().to_owned()), &user)
            .state
            .groups
            .contains_key("a"));
    }

    /// Review of issue 23: what changes under the mutex while a save runs unlocked (a
    /// message seen, a group joined) is kept for the next save, not overwritten by the merge.
    #[test]
    fn changes_made_while_a_save_runs_are_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let user = UserName::new("alice").expect("name");
        let mut f = StateFile::open(Some(dir.path().to_owned()), &user);
        f.state
            .groups
            .insert("a".into(), group("tcp://a:1", 1, true));
        let save = f.begin_save();
        assert!(f.seen("a", 5));
        f.state
            .groups
            .insert("b".into(), group("tcp://b:1", 0, true));
        f.joined("b");
        let merged = save.run(LOCK_WAIT).expect("save");
        f.finish_save(save, merged);
        assert_eq!(f.state.groups["a"].last_seen, 5);
        assert!(f.state.groups.contains_key("b"));
        f.save().expect("save again");
        let again = StateFile::open(Some(dir.path().to_owned()), &user);
        assert_eq!(again.state.groups["a"].last_seen, 5);
        assert!(again.state.groups.contains_key("b"));
    }

    /// Review of issue 23: a group re-created elsewhere (another endpoint and key, its seqs
    /// started again) kept the larger last seen of the old place, so the new place's first
    /// messages counted as seen.
    #[test]
    fn last_seen_follows_the_side_that_moved_the_group() {
        let base = State {
            groups: [("g".into(), group("tcp://old:1", 40, true))]
                .into_iter()
                .collect(),
            registry: None,
        };
        // Theirs moved it and saw 2 there; ours saw further at the old place.
        let mut ours = base.clone();
        ours.groups.get_mut("g").expect("g").last_seen = 45;
        let mut theirs = base.clone();
        theirs
            .groups
            .insert("g".into(), group("tcp://new:1", 2, true));
        let m = merge(&base, &ours, &theirs, &BTreeSet::new());
        assert_eq!(m.groups["g"], group("tcp://new:1", 2, true));
        // Ours moved it: ours.
        let m = merge(&base, &theirs, &ours, &BTreeSet::new());
        assert_eq!(m.groups["g"], group("tcp://new:1", 2, true));
        // Same place on both sides: the larger.
        let mut other = base.clone();
        other.groups.get_mut("g").expect("g").last_seen = 41;
        let m = merge(&base, &ours, &other, &BTreeSet::new());
        assert_eq!(m.groups["g"].last_seen, 45);
    }

    /// Review of issue 23: a file on disk that cannot be parsed at save time was overwritten
    /// with no copy kept; it is set aside as `.bad`, as opening does.
    #[test]
    fn garbage_found_at_save_time_is_set_aside() {
        let dir = tempfile::tempdir().expect("tmp");
        let user = UserName::new("alice").expect("name");
        let mut f = StateFile::open(Some(dir.path().to_owned()), &user);
        f.state
            .groups
            .insert("a".into(), group("tcp://a:1", 1, true));
        std::fs::write(dir.path().join("alice.json"), b"{half written").expect("write");
        f.save().expect("save");
        assert_eq!(
            std::fs::read(dir.path().join("alice.json.bad")).expect("set aside"),
            b"{half written"
        );
        let again = StateFile::open(Some(dir.path().to_owned()), &user);
        assert!(again.state.groups.contains_key("a"));
    }

    /// Review of issue 23: the temporary files of a killed save (`.USER.json.XXXXXX.tmp`)
    /// were neither tightened nor removed; they are removed when the state is opened, and
    /// other users' files and files that are not ours stay.
    #[test]
    fn stale_temporary_files_are_removed_on_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let user = UserName::new("alice").expect("name");
        for name in [
            ".alice.json.Ab3xYz.tmp",
            "alice.json.tmp",
            ".bob.json.Ab3xYz.tmp",
            "notes.tmp",
        ] {
            std::fs::write(dir.path().join(name), b"{}").expect("write");
        }
        assert!(is_state_file(std::ffi::OsStr::new(
            ".alice.json.Ab3xYz.tmp"
        )));
        assert!(!is_state_file(std::ffi::OsStr::new("notes.tmp")));
        let _ = StateFile::open(Some(dir.path().to_owned()), &user);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [".bob.json.Ab3xYz.tmp", "alice.json.lock", "notes.tmp"]
        );
    }
}
