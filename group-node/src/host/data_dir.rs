//! The data directory: its lock, its modes, the node's key pair, its default place.

use std::path::{Path, PathBuf};

use agora_common::keys::Keypair;
use agora_proto::wire::GroupName;

use super::NodeError;

/// The data directory's lock ([`lock_data_dir`]), held until dropped.
#[derive(Debug)]
pub struct DataDirLock(#[allow(dead_code)] std::fs::File);

/// Takes the data directory's lock: an exclusive `flock` on `node.lock` (mode 0600), held
/// until the returned value is dropped (or the process dies), so that two nodes never
/// share one data directory, with SQLite or with `--store` (where a second node would
/// otherwise wait as a standby on the first one's directory). Makes the directory (0700)
/// if it does not exist.
///
/// # Errors
/// [`NodeError::Locked`] when another process holds it; [`NodeError::DataDir`] on I/O.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, NodeError> {
    use std::os::unix::fs::OpenOptionsExt;
    agora_common::fsmode::private_dir(dir).map_err(|source| NodeError::DataDir {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join("node.lock");
    let io = |source| NodeError::DataDir {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(DataDirLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(NodeError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// The topmost of `dir` and its parents that does not exist yet: what
/// [`lock_data_dir`] would make, for [`unmake_data_dir`]; `None` when `dir` exists.
pub fn first_missing(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .last()
        .map(Path::to_owned)
}

/// Removes what a failed start made ([`lock_data_dir`]): `dir`'s `node.lock`, then `dir`
/// and its parents up to `made` ([`first_missing`] before the start), each only if empty.
/// Failures are ignored (what is left is an empty directory at worst).
pub fn unmake_data_dir(dir: &Path, made: &Path) {
    let _ = std::fs::remove_file(dir.join("node.lock"));
    for a in dir.ancestors() {
        if std::fs::remove_dir(a).is_err() || a == made {
            break;
        }
    }
}

/// Makes the data directory private: creates it (and its parents) with mode 0700, or
/// tightens an existing one to 0700, and creates the SQLite database file `db` (when the
/// log is SQLite) with mode 0600 (SQLite gives its `-wal` and `-shm` files the database
/// file's mode), tightening existing store files to 0600 ([`agora_common::fsmode`]). Each
/// change to an existing path is logged; a path made here is private from creation and is
/// not.
pub(super) fn private_files(dir: &Path, db: Option<&Path>) -> std::io::Result<()> {
    use agora_common::fsmode;
    fsmode::private_dir(dir)?;
    let Some(db) = db else {
        return Ok(());
    };
    fsmode::private_file(db)?;
    for suffix in ["-wal", "-shm"] {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        fsmode::tighten(Path::new(&path), fsmode::FILE_MODE)?;
    }
    Ok(())
}

/// The node's key pair, `node.key` and `node.key_secret` in `dir`: loaded when the secret
/// file exists, else made in memory (and `true`), for the caller to save once the socket is
/// bound. Nothing is written here.
///
/// # Errors
/// [`NodeError::Keys`]: the files cannot be read, are loose or do not match; no CURVE.
pub fn node_key_pair(dir: &Path) -> Result<(Keypair, bool), NodeError> {
    let path = dir.join("node.key");
    if agora_common::keys::secret_path(&path).exists() {
        Ok((Keypair::load(&path)?, false))
    } else {
        Ok((Keypair::generate()?, true))
    }
}

/// The default data directory of `group`: the user's data directory
/// (`$XDG_DATA_HOME/agora`, usually `~/.local/share/agora`), then `groups/`, then the group
/// name with every byte outside `[A-Za-z0-9_-]` percent-encoded, so that any name is one
/// safe path component.
pub fn default_data_dir(group: &GroupName) -> Option<PathBuf> {
    let base = directories::ProjectDirs::from("", "", "agora")?;
    Some(base.data_dir().join("groups").join(path_component(group)))
}

fn path_component(group: &GroupName) -> String {
    let mut out = String::new();
    for b in group.as_str().bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_become_safe_path_components() {
        let g = |s: &str| GroupName::new(s).expect("name");
        assert_eq!(path_component(&g("Cool Group")), "Cool%20Group");
        assert_eq!(path_component(&g("../etc")), "%2E%2E%2Fetc");
        assert_eq!(path_component(&g("..")), "%2E%2E");
    }
}
