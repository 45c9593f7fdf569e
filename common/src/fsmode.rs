//! File modes for private data: directories 0700 and files 0600 from the moment they are
//! created, and existing looser ones tightened, with a `warn!` naming the path and both
//! modes.
//!
//! Anything that holds other people's words or a user's private list of groups (a node's
//! store, a registry's database, user-cli's state files, a gateway's accounts) goes through
//! these functions, so that no other local user can read it at any moment: a file is never
//! created with the default mode and narrowed afterwards.
//!
//! The modes given at creation are further narrowed by the process's umask, never widened.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode of a private directory: `rwx------`.
pub const DIR_MODE: u32 = 0o700;
/// The mode of a private file: `rw-------`.
pub const FILE_MODE: u32 = 0o600;

/// Removes from `path`'s permission bits every bit outside `mode` (so a 0755 directory
/// becomes 0700 for `mode` 0o700; a 0500 one is left as is). A missing path is not an
/// error. Each change is logged with `warn!` (fields `path`, `old`, `new`, octal).
///
/// Returns the old mode (permission bits only) when it was changed, `None` when the path is
/// missing or already within `mode`.
///
/// # Errors
/// The path's metadata cannot be read (other than not found) or its mode cannot be set.
pub fn tighten(path: &Path, mode: u32) -> io::Result<Option<u32>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let old = meta.permissions().mode() & 0o777;
    if old & !mode == 0 {
        return Ok(None);
    }
    let new = old & mode;
    std::fs::set_permissions(path, Permissions::from_mode(new))?;
    tracing::warn!(path = %path.display(), old = format!("{old:o}"), new = format!("{new:o}"),
        "tightened permissions of private data");
    Ok(Some(old))
}

/// Makes `dir` a private directory: creates it, and any missing parents, with mode 0700
/// ([`DIR_MODE`]), or [`tighten`]s an existing one to 0700. Parents that already exist are
/// left alone.
///
/// # Errors
/// The directory cannot be created or its mode cannot be read or set.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    tighten(dir, DIR_MODE)?;
    Ok(())
}

/// Opens `path` for writing as a private file: creates it with mode 0600 ([`FILE_MODE`]) if
/// missing (its contents are kept, not truncated), or [`tighten`]s an existing one to 0600.
/// The directory must exist (see [`private_dir`]).
///
/// # Errors
/// The file cannot be opened or created, or its mode cannot be read or set.
pub fn private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    tighten(path, FILE_MODE)?;
    Ok(file)
}

/// Replaces `path` atomically with `bytes`, as a private file: writes a temporary file of
/// its own in the same directory (`.NAME.XXXXXX.tmp`, a unique name, created with mode 0600
/// ([`FILE_MODE`])), syncs it and renames it over `path`. The directory is made private
/// first ([`private_dir`]), so a state file is never readable by others, not even for a
/// moment. Processes saving the same file at once each write their own temporary file, so
/// `path` is always one of their complete contents (the last rename wins), never a mix.
///
/// # Errors
/// The directory or the file cannot be created, written, synced or renamed.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => {
            private_dir(dir)?;
            dir
        }
        None => Path::new("."),
    };
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".");
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(Permissions::from_mode(FILE_MODE))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn new_paths_are_private_from_creation() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("a/b");
        let file = dir.join("state.json");
        write_private(&file, b"{}").expect("write");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read(&file).expect("read"), b"{}");
        assert_eq!(
            std::fs::read_dir(&dir).expect("list").count(),
            1,
            "no temporary file is left"
        );
        private_file(&dir.join("db")).expect("file");
        assert_eq!(mode(&dir.join("db")), 0o600);
    }

    #[test]
    fn looser_paths_are_tightened_and_stricter_ones_kept() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("d");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).expect("chmod");
        let file = dir.join("f");
        std::fs::write(&file, b"x").expect("write");
        std::fs::set_permissions(&file, Permissions::from_mode(0o644)).expect("chmod");
        private_dir(&dir).expect("dir");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(tighten(&file, FILE_MODE).expect("tighten"), Some(0o644));
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read(&file).expect("read"), b"x");
        std::fs::set_permissions(&file, Permissions::from_mode(0o400)).expect("chmod");
        assert_eq!(tighten(&file, FILE_MODE).expect("tighten"), None);
        assert_eq!(mode(&file), 0o400);
        assert_eq!(
            tighten(&dir.join("missing"), FILE_MODE).expect("missing"),
            None
        );
        // An existing file that a rename replaces gets the new file's mode.
        std::fs::set_permissions(&file, Permissions::from_mode(0o644)).expect("chmod");
        write_private(&file, b"y").expect("write");
        assert_eq!(mode(&file), 0o600);
    }

    /// Issue 22 review, C2: processes saving one state file at once (`watch` and `send`)
    /// each write a temporary file of their own; the file is always one of the complete
    /// contents, never one renamed over another's half-written bytes.
    #[test]
    fn concurrent_writes_leave_one_complete_content() {
        let root = tempfile::tempdir().expect("tmp");
        let file = root.path().join("state.json");
        let contents: Vec<Vec<u8>> = (0..8u8)
            .map(|i| {
                let line = format!("{{\"writer\": {i}, \"pad\": \"{}\"}}", "x".repeat(64 << 10));
                line.into_bytes()
            })
            .collect();
        write_private(&file, &contents[0]).expect("first");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut reads = 0;
        std::thread::scope(|s| {
            let writers: Vec<_> = contents
                .iter()
                .map(|c| {
                    s.spawn(|| {
                        for _ in 0..20 {
                            write_private(&file, c).expect("write");
                        }
                    })
                })
                .collect();
            let reader = s.spawn(|| {
                let mut seen = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = std::fs::read(&file).expect("read");
                    assert!(
                        contents.contains(&got),
                        "a mixed or partial file: {} bytes",
                        got.len()
                    );
                    assert_eq!(mode(&file), 0o600);
                    seen += 1;
                }
                seen
            });
            for w in writers {
                w.join().expect("writer");
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            reads = reader.join().expect("reader");
        });
        assert!(reads > 0);
        let got = std::fs::read(&file).expect("read");
        assert!(contents.contains(&got));
        let left: Vec<_> = std::fs::read_dir(root.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("state.json")]);
    }
}
