//! `group-node host import` and `group-node host export`: moving groups into and out of a
//! group host's data directory while it is stopped (a module of the binary, not of the
//! library; `docs/design/group-host.md` §2.2).
//!
//! A group travels as a directory laid out as a node of one's data directory:
//! `group.sqlite3` (the group alone, schema 7, as gid 1) and `blobs/` (its attachments). A
//! node of one's own data directory is therefore a valid source, and so is what `export`
//! writes. On the host the group gets a new gid: its rows go into `host.sqlite3`
//! ([`SqliteHost::import_group`], one transaction) and its blobs to `groups/GID/blobs/`.
//!
//! Both refuse while a group-node holds the host's data directory (its `node.lock`), and
//! `import` while one holds a source's: nothing is copied from or into a store in use.
//!
//! Attachments are copied, never moved, so the source stays whole until the operator
//! removes it: complete contents (`blobs/sha256/`, never written again) are hard-linked when
//! both directories are on one file system, anything else is copied and fsynced.

use std::fs;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use agora_common::server::Exit;
use agora_group_node::store::{Durability, GroupState, Principal, SqliteHost, StoreError};
use agora_group_node::NodeError;
use agora_proto::time::Timestamp;
use agora_proto::wire::GroupName;

use crate::{Failure, HostCommand};

/// A group host's database file in its data directory.
const HOST_DB: &str = "host.sqlite3";
/// A node of one's (or an export's) database file.
const GROUP_DB: &str = "group.sqlite3";

/// Runs `group-node host import|export`.
pub(crate) fn run(command: HostCommand) -> Result<(), Failure> {
    match command {
        HostCommand::Import {
            data_dir,
            sources,
            owner,
        } => import(
            &data_dir,
            &sources,
            owner.map(|k| Principal::key(&k)).as_ref(),
        ),
        HostCommand::Export {
            name,
            data_dir,
            to,
            archive,
        } => export(&name, &data_dir, &to, archive),
    }
}

fn failure(exit: Exit, error: anyhow::Error) -> Failure {
    Failure { exit, error }
}

/// Takes `dir`'s lock, saying what to do when a running group-node holds it (exit 4).
fn lock(dir: &Path, what: &str) -> Result<agora_group_node::DataDirLock, Failure> {
    agora_group_node::lock_data_dir(dir).map_err(|e| match e {
        NodeError::Locked(_) => failure(
            Exit::LocalIo,
            anyhow::anyhow!(
                "{what} {}: in use by a running group-node (it holds node.lock); stop it \
                 first (SIGTERM or `systemctl stop`: it drains, nothing acked is lost)",
                dir.display()
            ),
        ),
        e => failure(Exit::LocalIo, e.into()),
    })
}

/// Opens (or makes) the host's database, 0600 in a 0700 directory, each commit synced.
fn open_host(dir: &Path) -> Result<SqliteHost, Failure> {
    let path = dir.join(HOST_DB);
    agora_common::fsmode::private_file(&path)
        .map_err(|e| failure(Exit::LocalIo, anyhow::anyhow!("{}: {e}", path.display())))?;
    SqliteHost::open_with(&path, Durability::Commit).map_err(|e| store_failure(&path, e))
}

fn store_failure(path: &Path, e: StoreError) -> Failure {
    failure(
        Exit::LocalIo,
        anyhow::Error::new(e).context(path.display().to_string()),
    )
}

/// `host import --data-dir HOST SOURCE...`: each SOURCE's group into the host, under a new
/// gid. A group whose name the host already has is skipped (exit 1 at the end, the others
/// imported); any other failure stops at once (exit 4), the groups before it imported.
fn import(host: &Path, sources: &[PathBuf], owner: Option<&Principal>) -> Result<(), Failure> {
    // Before anything is made: every source holds a group's database.
    for source in sources {
        if !source.join(GROUP_DB).is_file() {
            let hint = if source.join(HOST_DB).is_file() {
                "it is a group host's: take one group out with `group-node host export NAME \
                 --data-dir DIR --to NEW_DIR` and import NEW_DIR"
                    .to_owned()
            } else {
                "give a group node's --data-dir (stopped) or a directory `group-node host \
                 export` wrote"
                    .to_owned()
            };
            return Err(failure(
                Exit::LocalIo,
                anyhow::anyhow!("{}: no {GROUP_DB} there; {hint}", source.display()),
            ));
        }
    }
    let made = agora_group_node::first_missing(host);
    let host_lock = lock(host, "the host's data directory")?;
    let mut imported = 0;
    let result = import_locked(host, sources, owner, &mut imported);
    drop(host_lock);
    if let (Err(_), 0, Some(made)) = (&result, imported, &made) {
        // A host directory made here and nothing imported into it: leave nothing behind.
        let _ = fs::remove_dir_all(made);
    }
    result
}

fn import_locked(
    host: &Path,
    sources: &[PathBuf],
    owner: Option<&Principal>,
    imported: &mut usize,
) -> Result<(), Failure> {
    let mut db = open_host(host)?;
    let groups = host.join("groups");
    let mut skipped = Vec::new();
    for source in sources {
        let _source_lock = lock(source, "the group's data directory")?;
        make_private_dir(&groups)?;
        // The blobs first, beside their final place: a failed copy leaves the host as it was.
        let staging = groups.join(format!(".import-{}", std::process::id()));
        let blobs = source.join("blobs");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| io_failure(&staging, e))?;
        }
        if blobs.is_dir() {
            copy_tree(&blobs, &staging, true).map_err(|e| {
                let _ = fs::remove_dir_all(&staging);
                failure(
                    Exit::LocalIo,
                    anyhow::anyhow!(
                        "copying {} to {}: {e}; nothing of {} was imported",
                        blobs.display(),
                        staging.display(),
                        source.display()
                    ),
                )
            })?;
        }
        let copied = db.import_group(&source.join(GROUP_DB));
        let (gid, name) = match copied {
            Ok(done) => done,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                if let StoreError::NameTaken(name) = &e {
                    eprintln!(
                        "group-node: {}: the host already has a group named {name:?}; \
                         skipped (delete or export it there first)",
                        source.display()
                    );
                    skipped.push(name.clone());
                    continue;
                }
                return Err(store_failure(&source.join(GROUP_DB), e));
            }
        };
        if let Some(owner) = owner {
            db.set_group_owner(gid, Some(owner))
                .map_err(|e| store_failure(&host.join(HOST_DB), e))?;
        }
        let dir = groups.join(gid.to_string());
        make_private_dir(&dir)?;
        if staging.exists() {
            let to = dir.join("blobs");
            fs::rename(&staging, &to).map_err(|e| io_failure(&to, e))?;
            sync_dir(&dir).map_err(|e| io_failure(&dir, e))?;
        }
        let state = db
            .load(gid)
            .map_err(|e| store_failure(&host.join(HOST_DB), e))?;
        say(&format!(
            "imported {:?} from {} as group {gid}: {} ({})",
            name.as_str(),
            source.display(),
            plural(state.last_seq(), "entry", "entries"),
            plural(state.member_count(), "member", "members"),
        ))?;
        *imported += 1;
    }
    if skipped.is_empty() {
        Ok(())
    } else {
        Err(failure(
            Exit::Refused,
            anyhow::anyhow!(
                "{} not imported: the host has {} already",
                plural(skipped.len() as u64, "group", "groups"),
                skipped
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }
}

/// `host export NAME --data-dir HOST --to DIR [--archive]`.
fn export(name: &GroupName, host: &Path, to: &Path, archive: bool) -> Result<(), Failure> {
    // Before anything is made.
    if fs::read_dir(to).is_ok_and(|mut d| d.next().is_some()) {
        return Err(failure(
            Exit::Usage,
            anyhow::anyhow!(
                "--to {}: exists and is not empty; give a new directory",
                to.display()
            ),
        ));
    }
    if !host.join(HOST_DB).is_file() {
        return Err(failure(
            Exit::LocalIo,
            anyhow::anyhow!(
                "--data-dir {}: no {HOST_DB} there; give the data directory of a group host \
                 (group-node --host) that keeps its groups in SQLite (a host on PostgreSQL, \
                 --store, cannot export yet)",
                host.display()
            ),
        ));
    }
    let _host_lock = lock(host, "the host's data directory")?;
    let mut db = open_host(host)?;
    let gid = match db
        .find_group(name)
        .map_err(|e| store_failure(&host.join(HOST_DB), e))?
    {
        Some((gid, GroupState::Live)) => gid,
        _ => {
            return Err(failure(
                Exit::Refused,
                anyhow::anyhow!(
                    "the host in {} has no group named {:?}; its groups are listed by \
                     `user-cli groups`",
                    host.display(),
                    name.as_str()
                ),
            ))
        }
    };
    let made = agora_group_node::first_missing(to);
    let written = (|| {
        make_private_dir(to)?;
        let file = to.join(GROUP_DB);
        agora_common::fsmode::private_file(&file).map_err(|e| io_failure(&file, e))?;
        db.export_group(gid, &file)
            .map_err(|e| store_failure(&file, e))?;
        let blobs = host.join("groups").join(gid.to_string()).join("blobs");
        if blobs.is_dir() {
            let dst = to.join("blobs");
            copy_tree(&blobs, &dst, true).map_err(|e| io_failure(&dst, e))?;
        }
        sync_dir(to).map_err(|e| io_failure(to, e))
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(to);
        if let Some(made) = made {
            let _ = fs::remove_dir(made);
        }
        return Err(e);
    }
    if archive {
        let archived = (|| {
            db.begin()?;
            db.set_group_state(gid, GroupState::Archived, Timestamp::now())?;
            db.commit()
        })();
        archived.map_err(|e| store_failure(&host.join(HOST_DB), e))?;
    }
    say(&format!(
        "exported {:?} to {}{}",
        name.as_str(),
        to.display(),
        if archive {
            "; archived on this host (its name is free here)"
        } else {
            ""
        }
    ))
}

/// One line on stdout.
fn say(line: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| failure(Exit::LocalIo, anyhow::anyhow!("stdout: {e}")))
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn io_failure(path: &Path, e: std::io::Error) -> Failure {
    failure(Exit::LocalIo, anyhow::anyhow!("{}: {e}", path.display()))
}

/// Makes `dir` (and its parents) 0700, or tightens it.
fn make_private_dir(dir: &Path) -> Result<(), Failure> {
    agora_common::fsmode::private_dir(dir).map_err(|e| io_failure(dir, e))
}

/// Copies the tree `src` to `dst` (made here, 0700): files under a top-level `sha256/`
/// (complete contents, never written again) are hard-linked when `link` and the file system
/// allows it, every other file copied (mode kept) and fsynced; each directory is fsynced.
fn copy_tree(src: &Path, dst: &Path, link: bool) -> std::io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        if kind.is_dir() {
            // Only the top level decides: everything below `sha256/` is a complete content.
            let below = link && entry.file_name() == "sha256";
            copy_subtree(&from, &to, below)?;
        } else if kind.is_file() {
            copy_file(&from, &to, false)?;
        }
    }
    sync_dir(dst)
}

fn copy_subtree(src: &Path, dst: &Path, link: bool) -> std::io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let to = dst.join(entry.file_name());
        if kind.is_dir() {
            copy_subtree(&entry.path(), &to, link)?;
        } else if kind.is_file() {
            copy_file(&entry.path(), &to, link)?;
        }
    }
    sync_dir(dst)
}

fn copy_file(from: &Path, to: &Path, link: bool) -> std::io::Result<()> {
    if link && fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    fs::copy(from, to)?;
    fs::File::open(to)?.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}
