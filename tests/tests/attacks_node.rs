//! Attack suite (docs/SECURITY.md), the group node's attachments and user-cli's local files:
//! each test performs the attack against the real binaries (issue 22, findings 9, 15, 19).
//!
//! - Storage: completed content counts against its uploader's `--upload-quota`, and uploads
//!   stop at the node's free-disk reserve (`--disk-reserve-bytes`, `storage_full`).
//! - Uploads in progress: each belongs to the key that declared it; another member's chunks
//!   and declarations of the same digest go to an upload of their own.
//! - user-cli's state (its private groups, their endpoints and keys) is 0600 in a 0700
//!   directory, and a looser one is tightened.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_proto::wire::{ErrorCode, Sha256Digest, UserName};
use agora_tests::{CliRun, Federation, Server};
use sha2::{Digest, Sha256};

const GROUP: &str = "Cool Group";

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The modes of the state directory and of every file in it.
fn state_modes(dir: &Path) -> (u32, Vec<(String, u32)>) {
    let mut files: Vec<(String, u32)> = std::fs::read_dir(dir)
        .expect("read the state directory")
        .map(|e| {
            let path = e.expect("entry").path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, mode(&path))
        })
        .collect();
    files.sort();
    (mode(dir), files)
}

#[test]
fn user_cli_state_is_private_from_creation_and_a_looser_one_is_tightened() {
    let fed = Federation::start("200ms");
    let _node = fed.node(GROUP, "127.0.0.1:0", "cool", &[]);
    let state = Path::new(&fed.state_dir()).to_owned();
    assert!(!state.exists(), "no state before the first run");

    // A fresh run (a join writes the state: the group, its endpoint and key).
    fed.join_when_listed("alice", GROUP);
    let (dir, files) = state_modes(&state);
    assert_eq!(dir, 0o700, "the state directory: {dir:o}");
    assert!(
        files.iter().any(|(name, _)| name == "alice.json"),
        "{files:?}"
    );
    for (name, m) in &files {
        assert_eq!(*m, 0o600, "{name}: {m:o}");
    }

    // A state left readable by others (an older build, a copy, a umask of 022) is tightened
    // at the next run, with a word on stderr.
    chmod(&state, 0o755);
    chmod(&state.join("alice.json"), 0o644);
    std::fs::write(state.join("bob.json"), b"{}").expect("write");
    chmod(&state.join("bob.json"), 0o644);
    let run = ok(fed.cli("alice", &["send", GROUP, "hello"], ""));
    assert!(run.stderr.contains("tightened"), "{run:?}");
    let (dir, files) = state_modes(&state);
    assert_eq!(dir, 0o700, "the state directory: {dir:o}");
    for (name, m) in &files {
        assert_eq!(*m, 0o600, "{name}: {m:o}");
    }
    // Nothing was lost on the way.
    let text = std::fs::read_to_string(state.join("alice.json")).expect("state");
    assert!(text.contains(GROUP), "{text}");
}
