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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
}

impl StateFile {
    /// Loads `DIR/USER.json` (`dir` defaults to the user's state directory). A missing file
    /// is an empty state; an unreadable one is set aside as `USER.json.bad` with a warning.
    /// An existing directory looser than 0700, and files in it looser than 0600, are
    /// tightened (each with a warning); a missing directory is not created until
    /// [`StateFile::save`].
    pub fn open(dir: Option<PathBuf>, user: &UserName) -> StateFile {
        let dir = dir.or_else(|| {
            directories::ProjectDirs::from("", "", "agora")
                .map(|d| d.state_dir().unwrap_or_else(|| d.data_dir()).to_owned())
        });
        if let Some(dir) = &dir {
            tighten_dir(dir);
        }
        let path = dir.map(|d| d.join(format!("{user}.json")));
        let state = path.as_deref().map(load).unwrap_or_default();
        StateFile { path, state }
    }

    /// Writes the state atomically (a temporary file, mode 0600, renamed over the old one),
    /// creating the directory with mode 0700 if needed.
    ///
    /// # Errors
    /// The directory or file cannot be written.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(std::io::Error::other)?;
        agora_common::fsmode::write_private(path, &bytes)
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
/// `known_servers.json`), `*.json.bad` (set aside unreadable) or `*.json.tmp` (a save that
/// an earlier build was killed in the middle of).
fn is_state_file(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    [".json", ".json.bad", ".json.tmp"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

fn load(path: &Path) -> State {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            let bad = path.with_extension("json.bad");
            tracing::warn!(path = %path.display(), error = %e, "unreadable state set aside");
            let _ = std::fs::rename(path, bad);
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
}
