//! Attachments' bytes: a content-addressed blob store under the node's data directory.
//!
//! Each content is stored once, named by its SHA-256 digest, however often it is sent.
//! Uploads arrive in chunks, appended in order to a partial file; once every byte is there
//! the upload is sealed ([`seal`]: the digest verified, the file fsynced, then moved to its
//! name) on the node's sealing actor, off its request loop, so a partial or corrupt blob is
//! never served and a large file's fsync never stalls other members. A partial upload survives a restart: its length
//! on disk is how far it got, and the client resumes from there.
//!
//! # Layout (under `DATA/blobs/`)
//! - `sha256/AB/ABCDEF…` (the full 64-character hex digest, in a directory named by its
//!   first two characters): a complete, verified blob, mode 0600.
//! - `uploaders/AB/ABCDEF…`: the principal a complete blob's storage is charged to.
//! - `uploads/ABCDEF….TAG.part`: an upload in progress, where `TAG` names its uploader (24
//!   hex digits of the SHA-256 of the uploader's principal, [`Slot`]);
//!   `uploads/ABCDEF….TAG.size`: its declared size in bytes as decimal text, a space, and
//!   the uploader's principal. (Before uploads had owners, the names had no `TAG`: such
//!   files are renamed at [`Blobs::open`].)
//!
//! # Who owns what
//! An upload in progress belongs to the key that declared it ([`Slot`]: digest and
//! uploader): another member's `upload` of the same digest, with any size, is an upload of
//! its own, and its chunks never touch this one, so nobody can block or spoil anyone
//! else's. A complete content is shared: stored once, served to every member, and whichever
//! upload completes second finds it there and drops its own bytes.
//!
//! # Quota and reserve ([`Limits`])
//! A member's storage is the sizes its unfinished uploads declare plus the sizes of the
//! complete contents charged to it that the node keeps; an `upload` that would take it past
//! the quota is refused ([`BlobError::Quota`]). A content is charged to the member whose
//! upload completed it first (the one who sent its bytes), and to nobody else: one who
//! declares a content that is already complete sends nothing and is charged nothing. The
//! charge goes when the content goes (retention, [`Blobs::retain`]). Contents completed
//! before the node recorded uploaders are charged to nobody. Without a PostgreSQL store the
//! charges are summed from the `uploaders/` files once, when the node starts, and kept up to
//! date in memory; with one they are the `uploader` column of `blobs`, summed per `upload`
//! (an index on it). The unfinished uploads are counted per uploader from `uploads/` when
//! the node starts and kept in memory too, so that an `upload` reads no directory.
//!
//! Below the quotas, the node keeps a reserve of free disk on the data directory's file
//! system (`statvfs`): an `upload`, or a chunk, that would leave less free space than the
//! reserve is refused ([`BlobError::StorageFull`]) before anything is written, so that
//! attachments never take the room the log needs.
//!
//! # Shared blobs (`--store postgres://…`)
//! With a PostgreSQL store, a complete blob lives in the group's schema too (tables
//! `blob_chunks` and `blobs`, see [`crate::store::postgres`]; on a group host, the host's
//! schema, every row under the group's gid, over one connection for all its groups,
//! [`PgBlobClient`]), so that whichever node of the group is active serves it after a
//! failover. Uploads in progress stay local files (a
//! failover loses an unfinished upload: the client's `upload` then answers `have` 0 at the
//! new node, and it starts over). Sealing ([`seal`], on the sealing actor's own connection)
//! copies the content into the database in pieces of [`PG_CHUNK_BYTES`], checking its
//! digest on the way if it was not already, and commits before the file is named: the
//! upload is acked only after that commit. The local files are then a cache: a `size` or
//! `read` that misses it reads the database, one range (at most a protocol chunk) at a time
//! straight from the rows, never a whole blob. Retention deletes a blob's rows with its file,
//! in a transaction fenced by the lease's epoch as the log's commits are; copies are not
//! fenced (a verified content is the same bytes whichever node writes it).
//! Without a PostgreSQL store nothing of this applies: blobs are files only.
//!
//! Nothing is held in memory beyond one chunk and a SHA-256 state per upload in progress:
//! each chunk is hashed as it is appended, so completing an upload costs no second pass
//! over its bytes. Only an upload resumed after a restart (whose state was lost) is hashed
//! by reading its file back, in 64 KiB pieces, once.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use agora_proto::wire::{GroupName, Sha256Digest};
use postgres::Client;
use sha2::{Digest, Sha256};

use crate::store::{PgSchema, StoreError};

/// The piece of a blob one `blob_chunks` row holds in PostgreSQL, in bytes: 1 MiB, the
/// protocol's largest download range ([`agora_proto::wire::MAX_CHUNK_BYTES`]), so that a
/// range read touches at most two rows. Every piece but a blob's last has this length.
pub const PG_CHUNK_BYTES: usize = 1 << 20;

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A chunk that does not start where the upload stands (chunks are appended in order).
    #[error("chunk at offset {offset}, but the upload holds {have} bytes")]
    BadOffset {
        /// The chunk's offset.
        offset: u64,
        /// Bytes stored so far: where the next chunk must start.
        have: u64,
    },
    /// A chunk that would pass the declared size.
    #[error("chunk of {len} bytes at {offset} passes the declared size {size}")]
    PastEnd {
        /// The chunk's offset.
        offset: u64,
        /// The chunk's length.
        len: u64,
        /// The declared size.
        size: u64,
    },
    /// The same digest was declared with another size.
    #[error("an upload of this digest is in progress with size {have}, not {declared}")]
    SizeConflict {
        /// The size declared now.
        declared: u64,
        /// The size of the upload in progress.
        have: u64,
    },
    /// Declaring this upload would pass the uploader's storage quota.
    #[error(
        "{pending} bytes of unfinished uploads and {kept} bytes of kept content are yours; \
         this upload would pass your quota of {quota} bytes"
    )]
    Quota {
        /// Bytes the uploader's unfinished uploads declare.
        pending: u64,
        /// Bytes of complete content charged to the uploader that the node keeps.
        kept: u64,
        /// The quota.
        quota: u64,
    },
    /// The uploader already has its maximum of unfinished uploads.
    #[error("you have {max} unfinished uploads, the most this node allows; finish one first")]
    TooManyUploads {
        /// The maximum.
        max: usize,
    },
    /// Storing `needed` more bytes would leave less free disk than the node's reserve.
    #[error(
        "the node is short of disk: {free} bytes free, {needed} needed, {reserve} kept in \
         reserve; nothing was stored; retry later"
    )]
    StorageFull {
        /// Free bytes on the data directory's file system (for unprivileged users).
        free: u64,
        /// Bytes the refused upload or chunk would have written.
        needed: u64,
        /// The reserve.
        reserve: u64,
    },
    /// No upload of this digest is in progress (and no such blob exists).
    #[error("no upload of {0} in progress")]
    NoUpload(Sha256Digest),
    /// No complete blob has this digest.
    #[error("no blob {0}")]
    NotFound(Sha256Digest),
    /// Every byte arrived but they hash to another digest; the upload was discarded.
    #[error("the bytes received hash to {actual}, not {declared}; the upload was discarded")]
    DigestMismatch {
        /// The digest declared.
        declared: Sha256Digest,
        /// The digest of the bytes received.
        actual: Sha256Digest,
    },
    /// A read past a blob's end.
    #[error("offset {offset} is past the blob's {size} bytes")]
    Range {
        /// The offset asked.
        offset: u64,
        /// The blob's size.
        size: u64,
    },
    /// The file system failed (a full disk, say); nothing acked was lost.
    #[error("blob store: {0}")]
    Io(#[from] std::io::Error),
    /// The PostgreSQL store failed (unreachable, a query refused, rows that do not add up);
    /// nothing acked was lost.
    #[error("blob store: {0}")]
    Store(#[from] StoreError),
}

impl From<postgres::Error> for BlobError {
    fn from(e: postgres::Error) -> Self {
        BlobError::Store(StoreError::Postgres(e))
    }
}

/// How far an upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Bytes stored so far, of `size`: the next chunk starts at `have`.
    Partial {
        /// Bytes stored.
        have: u64,
        /// The declared size.
        size: u64,
    },
    /// The blob is complete and verified (it may have been stored by an earlier upload).
    Complete {
        /// Its size.
        size: u64,
    },
    /// Every byte is there; the content is being sealed (verified if need be, fsynced and
    /// named) by [`seal`], off the caller's thread. `verified`: its digest already checked
    /// out (hashed as it arrived), so sealing needs no second pass.
    Sealing {
        /// Its size.
        size: u64,
        /// Whether the digest was already verified.
        verified: bool,
        /// True when this call completed the upload: the caller must now have it sealed
        /// ([`seal`]) and then call [`Blobs::sealed`]. False when a seal is already under
        /// way (a retried last chunk, a second `upload` of the same content).
        start: bool,
    },
}

/// One upload in progress: the content's digest and the principal of the member who
/// declared it. Uploads of one digest by two members are two slots: each belongs to its
/// uploader (see the module docs, "Who owns what").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Slot {
    /// The content's digest.
    pub digest: Sha256Digest,
    /// The uploader's principal (`key:…`, or `name:…` on an `--insecure` node).
    pub uploader: String,
}

impl Slot {
    /// The upload of `digest` by `uploader` (a principal).
    pub fn new(digest: Sha256Digest, uploader: &str) -> Slot {
        Slot {
            digest,
            uploader: uploader.to_owned(),
        }
    }

    /// The slot's file name stem: `DIGEST.TAG`, `TAG` 24 hex digits of the SHA-256 of the
    /// uploader (principals hold characters no file name may).
    fn stem(&self) -> String {
        format!("{}.{}", self.digest, Slot::tag(&self.uploader))
    }

    /// The tag of `uploader`'s slots' file names.
    fn tag(uploader: &str) -> String {
        hex::encode(&Sha256::digest(uploader.as_bytes())[..12])
    }
}

/// The node's bounds on what uploads may store, checked at `upload` (and the reserve at
/// every chunk too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes one member may hold: its unfinished uploads' declared sizes plus the complete
    /// contents charged to it (`--upload-quota`).
    pub quota: u64,
    /// Free bytes the data directory's file system keeps whatever uploads want
    /// (`--disk-reserve-bytes`); 0: no reserve.
    pub reserve: u64,
    /// Unfinished uploads one member may have at once (`--max-uploads-per-member`): each
    /// is two files, and an entry in memory ([`Blobs`] counts them at open).
    pub max_uploads: usize,
}

impl Default for Limits {
    /// No quota and no reserve.
    fn default() -> Self {
        Limits {
            quota: u64::MAX,
            reserve: 0,
            max_uploads: usize::MAX,
        }
    }
}

/// A sealed content: its size, and whether this seal stored it (so that it is charged to
/// the slot's uploader) or found it complete already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    /// The content's size in bytes.
    pub size: u64,
    /// True when this upload completed it first: it is charged to its uploader.
    pub new: bool,
}

/// Where a store's files are, for [`seal`] on another thread.
#[derive(Debug, Clone)]
pub struct BlobLayout {
    root: PathBuf,
}

impl BlobLayout {
    /// The layout of the blob tree at `root` (a `blobs/` directory).
    pub fn at(root: PathBuf) -> BlobLayout {
        BlobLayout { root }
    }

    /// The blob tree's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, digest: &Sha256Digest) -> PathBuf {
        let hex = digest.to_string();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    /// The file naming the principal a complete blob is charged to.
    fn uploader_path(&self, digest: &Sha256Digest) -> PathBuf {
        let hex = digest.to_string();
        self.root.join("uploaders").join(&hex[..2]).join(hex)
    }

    fn part_path(&self, slot: &Slot) -> PathBuf {
        self.root
            .join("uploads")
            .join(format!("{}.part", slot.stem()))
    }

    fn size_path(&self, slot: &Slot) -> PathBuf {
        self.root
            .join("uploads")
            .join(format!("{}.size", slot.stem()))
    }
}

/// Seals a fully received upload: checks its digest (unless `verified`), fsyncs it, moves it
/// to its name and fsyncs the directory; returns its size and whether it was new (charged to
/// the slot's uploader, [`Kept`]). A content complete already (another member's upload got
/// there first) is kept as it is, and this upload's bytes are dropped. A mismatch discards
/// the upload. With `pg` (a connection to the group's PostgreSQL store,
/// [`PgBlobTarget::connect`], and the group's gid there, [`PgBlobTarget::gid`]), the
/// content is first copied into the database in one
/// transaction, with its uploader, and committed, before the local file is named (see the
/// module docs); a content the database already holds is not copied again. Blocking I/O of
/// the whole content: the node runs it on an actor, never on its loop.
///
/// # Errors
/// [`BlobError::DigestMismatch`], [`BlobError::NoUpload`], [`BlobError::Io`],
/// [`BlobError::Store`] (the database failed: the upload stays where it was, to seal again).
pub fn seal(
    layout: &BlobLayout,
    slot: &Slot,
    verified: bool,
    pg: Option<(&mut Client, i32)>,
) -> Result<Kept, BlobError> {
    let digest = &slot.digest;
    let Some((client, gid)) = pg else {
        return seal_local(layout, slot, verified, true);
    };
    if let Some(size) = pg_size(client, gid, digest)? {
        // Complete in the database already (an earlier upload, maybe at another node): only
        // the local copy is left to make, from the bytes just received.
        return match seal_local(layout, slot, verified, false) {
            Ok(_) => Ok(Kept { size, new: false }),
            Err(e @ BlobError::DigestMismatch { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, %digest, "could not keep a local copy of a blob");
                discard_files(layout, slot);
                Ok(Kept { size, new: false })
            }
        };
    }
    let mut file = File::open(layout.part_path(slot)).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => BlobError::NoUpload(*digest),
        _ => BlobError::Io(e),
    })?;
    let mut tx = client.transaction()?;
    let copied = copy_into(
        &mut tx,
        gid,
        &mut file,
        digest,
        !verified,
        Some(&slot.uploader),
    )?;
    if let Some(actual) = copied.actual.filter(|actual| actual != digest) {
        drop(tx); // rolled back
        drop(file);
        discard_files(layout, slot);
        return Err(BlobError::DigestMismatch {
            declared: *digest,
            actual,
        });
    }
    tx.commit()?;
    // The database holds it now; the local file is a cache. Failing to keep it loses nothing.
    drop(file);
    if let Err(e) = seal_local(layout, slot, true, true) {
        tracing::warn!(error = %e, %digest, "could not keep a local copy of a blob");
        discard_files(layout, slot);
    }
    Ok(Kept {
        size: copied.size,
        new: true,
    })
}

/// [`seal`] without a database: the local file is the blob. `record`: name the slot's
/// uploader as the one a new blob is charged to (`uploaders/`).
fn seal_local(
    layout: &BlobLayout,
    slot: &Slot,
    verified: bool,
    record: bool,
) -> Result<Kept, BlobError> {
    let digest = &slot.digest;
    let part = layout.part_path(slot);
    let mut file = File::open(&part).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => BlobError::NoUpload(*digest),
        _ => BlobError::Io(e),
    })?;
    let target = layout.blob_path(digest);
    if let Ok(there) = fs::metadata(&target) {
        // Another member's upload completed it first: theirs stays, ours goes.
        drop(file);
        discard_files(layout, slot);
        return Ok(Kept {
            size: there.len(),
            new: false,
        });
    }
    let size = file.metadata()?.len();
    if !verified {
        let actual = hash_file(&mut file)?;
        if actual != *digest {
            drop(file);
            discard_files(layout, slot);
            return Err(BlobError::DigestMismatch {
                declared: *digest,
                actual,
            });
        }
    }
    file.sync_all()?;
    if let Some(dir) = target.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if record {
        // Before the blob is named: a crash in between leaves a stray charge, which the
        // charge count skips, never a blob charged to nobody.
        let charge = layout.uploader_path(digest);
        if let Some(dir) = charge.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        write_private(&charge, slot.uploader.as_bytes())?;
    }
    fs::rename(&part, &target)?;
    if let Some(dir) = target.parent() {
        File::open(dir)?.sync_all()?;
    }
    let _ = fs::remove_file(layout.size_path(slot));
    Ok(Kept { size, new: true })
}

/// Removes an upload's partial file and declaration.
fn discard_files(layout: &BlobLayout, slot: &Slot) {
    let _ = fs::remove_file(layout.part_path(slot));
    let _ = fs::remove_file(layout.size_path(slot));
}

/// What [`copy_into`] copied.
struct Copied {
    /// Bytes copied.
    size: u64,
    /// The digest of those bytes, when asked to hash them.
    actual: Option<Sha256Digest>,
}

/// Copies `file`'s content, from its start, into `blob_chunks` as `digest`'s pieces of
/// [`PG_CHUNK_BYTES`], then its `blobs` row (charged to `uploader`, if known), in the
/// caller's transaction; hashes it on the way when `hash` (the caller compares, and rolls
/// back on a mismatch). One piece in memory at a time.
fn copy_into(
    tx: &mut postgres::Transaction<'_>,
    gid: i32,
    file: &mut File,
    digest: &Sha256Digest,
    hash: bool,
    uploader: Option<&str>,
) -> Result<Copied, BlobError> {
    let key = digest.as_bytes().as_slice();
    let insert = tx.prepare(
        "INSERT INTO blob_chunks (gid, digest, byte_offset, data) VALUES ($4, $1, $2, $3)
         ON CONFLICT DO NOTHING",
    )?;
    let mut hasher = hash.then(Sha256::new);
    let mut piece = vec![0u8; PG_CHUNK_BYTES];
    let mut at = 0u64;
    file.seek(SeekFrom::Start(0))?;
    loop {
        let n = read_full(file, &mut piece)?;
        if n == 0 {
            break;
        }
        let bytes = &piece[..n];
        if let Some(h) = hasher.as_mut() {
            h.update(bytes);
        }
        let offset = i64::try_from(at).map_err(|_| corrupt(digest, "past 2^63 bytes"))?;
        tx.execute(&insert, &[&key, &offset, &bytes, &gid])?;
        at += n as u64;
    }
    let size = i64::try_from(at).map_err(|_| corrupt(digest, "past 2^63 bytes"))?;
    tx.execute(
        "INSERT INTO blobs (gid, digest, size, uploader) VALUES ($4, $1, $2, $3)
         ON CONFLICT DO NOTHING",
        &[&key, &size, &uploader, &gid],
    )?;
    Ok(Copied {
        size: at,
        actual: hasher.map(|h| Sha256Digest::from_bytes(h.finalize().into())),
    })
}

/// Reads until `buf` is full or the file ends; returns how many bytes.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn corrupt(digest: &Sha256Digest, what: &str) -> BlobError {
    BlobError::Store(StoreError::Corrupt(format!("blob {digest}: {what}")))
}

/// The size of `digest` in the database, if it is complete there.
///
/// # Errors
/// [`BlobError::Store`].
fn pg_size(client: &mut Client, gid: i32, digest: &Sha256Digest) -> Result<Option<u64>, BlobError> {
    let row = client.query_opt(
        "SELECT size FROM blobs WHERE gid = $2 AND digest = $1",
        &[&digest.as_bytes().as_slice(), &gid],
    )?;
    row.map(|r| u64::try_from(r.get::<_, i64>(0)).map_err(|_| corrupt(digest, "a negative size")))
        .transpose()
}

/// The bytes of complete content charged to `uploader` in the database (the `blobs_uploader`
/// index).
///
/// # Errors
/// [`BlobError::Store`].
fn pg_charged(client: &mut Client, gid: i32, uploader: &str) -> Result<u64, BlobError> {
    let total: i64 = client
        .query_one(
            "SELECT COALESCE(SUM(size), 0)::BIGINT FROM blobs WHERE gid = $2 AND uploader = $1",
            &[&uploader, &gid],
        )?
        .get(0);
    Ok(u64::try_from(total).unwrap_or(0))
}

/// Up to `max` bytes of `digest` from `offset`, read from the database, and its size: only
/// the rows the range touches, and only their bytes in the range (`substring` of an
/// uncompressed out-of-line value reads just the TOAST pieces it needs).
///
/// # Errors
/// [`BlobError::NotFound`], [`BlobError::Range`], [`BlobError::Store`] (also rows that do not
/// cover the range: a corrupt store).
fn pg_read(
    client: &mut Client,
    gid: i32,
    digest: &Sha256Digest,
    offset: u64,
    max: usize,
) -> Result<(u64, Vec<u8>), BlobError> {
    let size = pg_size(client, gid, digest)?.ok_or(BlobError::NotFound(*digest))?;
    if offset > size {
        return Err(BlobError::Range { offset, size });
    }
    let end = size.min(offset.saturating_add(max as u64));
    if end == offset {
        return Ok((size, Vec::new()));
    }
    let first = offset - offset % PG_CHUNK_BYTES as u64;
    let (offset_i, end_i, first_i) = (
        i64::try_from(offset).map_err(|_| corrupt(digest, "offset"))?,
        i64::try_from(end).map_err(|_| corrupt(digest, "end"))?,
        i64::try_from(first).map_err(|_| corrupt(digest, "offset"))?,
    );
    let rows = client.query(
        "SELECT substring(data FROM (GREATEST($2 - byte_offset, 0) + 1)::int
                          FOR (LEAST($3 - byte_offset, length(data)::bigint)
                               - GREATEST($2 - byte_offset, 0))::int)
         FROM blob_chunks
         WHERE gid = $5 AND digest = $1 AND byte_offset >= $4 AND byte_offset < $3
         ORDER BY byte_offset",
        &[
            &digest.as_bytes().as_slice(),
            &offset_i,
            &end_i,
            &first_i,
            &gid,
        ],
    )?;
    let want = usize::try_from(end - offset).map_err(|_| corrupt(digest, "range"))?;
    let mut bytes = Vec::with_capacity(want);
    for row in &rows {
        bytes.extend_from_slice(row.get::<_, &[u8]>(0));
    }
    if bytes.len() != want {
        return Err(corrupt(
            digest,
            &format!("its rows hold {} bytes of {offset}..{end}", bytes.len()),
        ));
    }
    Ok((size, bytes))
}

/// Deletes `digest`'s rows, in one transaction fenced by `epoch` (as a commit of the log is:
/// a node whose lease moved deletes nothing); returns whether it was there.
///
/// # Errors
/// [`StoreError::Fenced`], [`StoreError::Postgres`], as [`BlobError::Store`].
fn pg_delete(
    client: &mut Client,
    gid: i32,
    digest: &Sha256Digest,
    epoch: Option<i64>,
) -> Result<bool, BlobError> {
    let key = digest.as_bytes().as_slice();
    let mut tx = client.transaction()?;
    if let Some(held) = epoch {
        let current: i64 = tx
            .query_opt("SELECT epoch FROM lease WHERE id = 1 FOR SHARE", &[])?
            .ok_or_else(|| StoreError::Corrupt("no lease row".into()))?
            .get(0);
        if current != held {
            return Err(StoreError::Fenced { held, current }.into());
        }
    }
    let found = tx.execute(
        "DELETE FROM blobs WHERE gid = $2 AND digest = $1",
        &[&key, &gid],
    )? == 1;
    tx.execute(
        "DELETE FROM blob_chunks WHERE gid = $2 AND digest = $1",
        &[&key, &gid],
    )?;
    tx.commit()?;
    Ok(found)
}

/// The blobs in the database sealed at least `min_age` ago that no message of the log
/// carries: one query (the `messages_attachment` index), however many blobs are kept, so
/// that a sweep costs the loop no query per blob.
fn pg_unreferenced(
    client: &mut Client,
    gid: i32,
    min_age: Duration,
) -> Result<Vec<Sha256Digest>, BlobError> {
    let rows = client.query(
        "SELECT b.digest FROM blobs b
         WHERE b.gid = $2 AND b.sealed_at <= now() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM messages m
                           WHERE m.gid = b.gid AND m.attachment_sha256 = b.digest)",
        &[&min_age.as_secs_f64(), &gid],
    )?;
    Ok(rows
        .iter()
        .filter_map(|r| <[u8; 32]>::try_from(r.get::<_, &[u8]>(0)).ok())
        .map(Sha256Digest::from_bytes)
        .collect())
}

/// Copies the complete local blob `digest` into the database if it is not there (a blob
/// sealed before the node stored blobs in PostgreSQL), checking its digest on the way;
/// returns whether it copied. A local file whose bytes do not match is left alone, with a
/// warning.
///
/// # Errors
/// [`BlobError::Io`], [`BlobError::Store`].
pub fn backfill(
    layout: &BlobLayout,
    client: &mut Client,
    gid: i32,
    digest: &Sha256Digest,
) -> Result<bool, BlobError> {
    if pg_size(client, gid, digest)?.is_some() {
        return Ok(false);
    }
    let mut file = match File::open(layout.blob_path(digest)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    // Charged to whom the local files say (nobody, for a blob sealed before they did).
    let uploader = fs::read_to_string(layout.uploader_path(digest)).ok();
    let mut tx = client.transaction()?;
    let copied = copy_into(&mut tx, gid, &mut file, digest, true, uploader.as_deref())?;
    if let Some(actual) = copied.actual.filter(|actual| actual != digest) {
        tracing::warn!(%digest, %actual, "a local blob does not match its name; not copied");
        return Ok(false);
    }
    tx.commit()?;
    Ok(true)
}

/// The digests of the complete blobs in the local files.
///
/// # Errors
/// [`BlobError::Io`] listing the store.
pub fn local_blobs(layout: &BlobLayout) -> Result<Vec<Sha256Digest>, BlobError> {
    let mut out = Vec::new();
    for dir in fs::read_dir(layout.root.join("sha256"))? {
        for entry in fs::read_dir(dir?.path())? {
            if let Ok(digest) = entry?.file_name().to_string_lossy().parse() {
                out.push(digest);
            }
        }
    }
    Ok(out)
}

/// Where a group's blobs live in PostgreSQL: its database, its schema (the group's, or its
/// host's), its gid there, and the fencing epoch of the lease the node serves under. Cheap
/// to clone, for the sealing actor's connection.
#[derive(Clone)]
pub struct PgBlobTarget {
    target: crate::store::postgres::PgTarget,
    schema: PgSchema,
    gid: i32,
    epoch: Option<i64>,
}

impl std::fmt::Debug for PgBlobTarget {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBlobTarget")
            .field("schema", &self.schema)
            .field("gid", &self.gid)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl PgBlobTarget {
    /// The blobs of `group` in the database `target` (the store's, with its TLS and network
    /// timeout); deletions are fenced by `epoch` when the node serves under a lease.
    pub fn new(
        target: &crate::store::postgres::PgTarget,
        group: &GroupName,
        epoch: Option<i64>,
    ) -> Self {
        PgBlobTarget {
            target: target.clone(),
            schema: PgSchema::Group(group.clone()),
            gid: 1,
            epoch,
        }
    }

    /// The blobs of the group `gid` of the group host whose schema is `schema` (a
    /// [`PgSchema::Host`]); deletions are fenced by `epoch` as [`PgBlobTarget::new`]'s.
    pub fn in_host(
        target: &crate::store::postgres::PgTarget,
        schema: PgSchema,
        gid: crate::store::GroupId,
        epoch: Option<i64>,
    ) -> Self {
        PgBlobTarget {
            target: target.clone(),
            schema,
            gid: i32::try_from(gid.0).unwrap_or(i32::MAX),
            epoch,
        }
    }

    /// The same database and schema, for the group `gid` of the host.
    pub fn for_group(&self, gid: crate::store::GroupId) -> Self {
        PgBlobTarget {
            gid: i32::try_from(gid.0).unwrap_or(i32::MAX),
            ..self.clone()
        }
    }

    /// The group's gid in the schema's blob tables (1 for a node of one).
    pub fn gid(&self) -> i32 {
        self.gid
    }

    /// A connection to the group's schema (which the store made at open),
    /// committing at least with `synchronous_commit` `on`, as the store does: an upload is
    /// acked only once its blob is durable. `role` names it in `pg_stat_activity`.
    ///
    /// # Errors
    /// [`StoreError::Postgres`].
    pub fn connect(&self, role: &str) -> Result<Client, StoreError> {
        let mut client = crate::store::postgres::connect(&self.target, role)?;
        client.batch_execute(&format!("SET search_path TO {}", self.schema.name()))?;
        let level: String = client.query_one("SHOW synchronous_commit", &[])?.get(0);
        if level == "off" || level == "local" {
            client.batch_execute("SET synchronous_commit = on")?;
        }
        Ok(client)
    }
}

impl PgBlobTarget {
    /// Runs `f` on the connection in `slot`, connecting first (as `role`, see
    /// [`PgBlobTarget::connect`]) if there is none or it broke; a connection that `f` left
    /// closed is dropped, to be made again on the next call.
    ///
    /// # Errors
    /// `f`'s; [`BlobError::Store`] when connecting fails.
    pub fn with<T>(
        &self,
        slot: &mut Option<Client>,
        role: &str,
        f: impl FnOnce(&mut Client) -> Result<T, BlobError>,
    ) -> Result<T, BlobError> {
        let mut client = match slot.take() {
            Some(client) if !client.is_closed() => client,
            _ => self.connect(role)?,
        };
        let result = f(&mut client);
        if !client.is_closed() {
            *slot = Some(client);
        }
        result
    }
}

/// The loop's connection to the shared blobs: made at open, made again on the next use after
/// it broke. One for all the groups of a host ([`Blobs::with_postgres_on`]).
struct Shared {
    target: PgBlobTarget,
    client: PgBlobClient,
}

/// A connection to a PostgreSQL store's blobs that several groups' [`Blobs`] share (a
/// group host's: one connection, not one per group); made when first needed, and again
/// after it broke.
#[derive(Clone, Default)]
pub struct PgBlobClient(std::sync::Arc<std::sync::Mutex<Option<Client>>>);

impl std::fmt::Debug for PgBlobClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBlobClient").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Runs `f` on the connection, connecting first if there is none; a connection that `f`
    /// left closed is dropped.
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T, BlobError>) -> Result<T, BlobError> {
        let mut client = self
            .client
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.target.with(&mut client, "blobs", f)
    }
}

/// The blob store of one node.
#[derive(Debug)]
pub struct Blobs {
    root: PathBuf,
    /// The quota and the reserve ([`Blobs::with_limits`]; none by default).
    limits: Limits,
    /// The SHA-256 state of each upload in progress over its first `n` bytes.
    hashing: RefCell<HashMap<Slot, (Sha256, u64)>>,
    /// Uploads whose every byte is there, being sealed elsewhere ([`seal`]), and whether
    /// their digest was already verified.
    sealing: RefCell<HashMap<Slot, bool>>,
    /// Without a PostgreSQL store: the bytes of complete content charged to each uploader,
    /// summed from the `uploaders/` files at start ([`Blobs::count_kept`]) or else at the
    /// first need ([`Blobs::charged`]), then kept up to date as contents are sealed and
    /// removed.
    charges: RefCell<Option<HashMap<String, u64>>>,
    /// The unfinished uploads of each uploader: the size each of its declarations in
    /// `uploads/` declares, by digest. Counted from the directory at open (so what a node
    /// killed mid-upload left is counted again), then kept up to date as uploads are
    /// declared, sealed, discarded and expired, so that an `upload` reads no directory: its
    /// cost does not grow with other members' uploads.
    unfinished: RefCell<HashMap<String, HashMap<Sha256Digest, u64>>>,
    /// A buffer with room for a block-aligned chunk, for `O_DIRECT` writes (at most one
    /// chunk, 1 MiB, plus a block).
    staging: RefCell<Vec<u8>>,
    /// The group's PostgreSQL store, when complete blobs live there too.
    shared: Option<Shared>,
}

/// The block size `O_DIRECT` writes are aligned to (offset, length and memory): 4 KiB, the
/// logical block size of the disks and file systems the node runs on, and a divisor of the
/// documented chunk size (PROTOCOL §6.9).
const DIRECT_BLOCK: u64 = 4096;

impl Blobs {
    /// Opens (creating, mode 0700) the store under `dir`, with no quota and no reserve
    /// ([`Blobs::with_limits`]). Uploads left by a build whose uploads had no owners are
    /// given to the uploader their declaration names.
    ///
    /// # Errors
    /// [`BlobError::Io`].
    pub fn open(dir: &Path) -> Result<Blobs, BlobError> {
        let root = dir.join("blobs");
        for d in [root.join("sha256"), root.join("uploads")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)?;
        }
        let blobs = Blobs {
            root,
            limits: Limits::default(),
            hashing: RefCell::new(HashMap::new()),
            sealing: RefCell::new(HashMap::new()),
            charges: RefCell::new(None),
            unfinished: RefCell::new(HashMap::new()),
            staging: RefCell::new(Vec::new()),
            shared: None,
        };
        blobs.adopt_unowned_uploads()?;
        blobs.count_unfinished()?;
        Ok(blobs)
    }

    /// Bounds what uploads may store: each member's quota and the disk's reserve.
    pub fn with_limits(mut self, limits: Limits) -> Blobs {
        self.limits = limits;
        self
    }

    /// Renames the uploads declared before uploads had owners (`DIGEST.part`,
    /// `DIGEST.size`) to the slot of the uploader their declaration names; a declaration
    /// that names nobody is dropped.
    fn adopt_unowned_uploads(&self) -> Result<(), BlobError> {
        let uploads = self.root.join("uploads");
        for entry in fs::read_dir(&uploads)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some(hex) = name.strip_suffix(".size") else {
                continue;
            };
            let Ok(digest) = hex.parse::<Sha256Digest>() else {
                continue;
            };
            let old_part = uploads.join(format!("{hex}.part"));
            match self.declaration(&path)? {
                Some((_, owner)) if !owner.is_empty() => {
                    let slot = Slot::new(digest, &owner);
                    if old_part.exists() {
                        fs::rename(&old_part, self.part_path(&slot))?;
                    }
                    fs::rename(&path, self.size_path(&slot))?;
                }
                _ => {
                    let _ = fs::remove_file(&old_part);
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }

    /// Counts the unfinished uploads in `uploads/` by uploader ([`Blobs::pending`]): each
    /// declaration `DIGEST.TAG.size` whose uploader's tag is `TAG`. Others (unreadable, or
    /// not in this form) are skipped, as `upload` never counted them.
    fn count_unfinished(&self) -> Result<(), BlobError> {
        let mut unfinished: HashMap<String, HashMap<Sha256Digest, u64>> = HashMap::new();
        for entry in fs::read_dir(self.root.join("uploads"))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some((hex, tag)) = name
                .strip_suffix(".size")
                .and_then(|stem| stem.split_once('.'))
            else {
                continue;
            };
            let Ok(digest) = hex.parse::<Sha256Digest>() else {
                continue;
            };
            match self.declaration(&path) {
                Ok(Some((size, owner))) if Slot::tag(&owner) == tag => {
                    unfinished.entry(owner).or_default().insert(digest, size);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "an unreadable upload declaration is not counted");
                }
            }
        }
        *self.unfinished.borrow_mut() = unfinished;
        Ok(())
    }

    /// Records that `slot` is declared with `size` bytes (its `.size` file written).
    fn declared(&self, slot: &Slot, size: u64) {
        self.unfinished
            .borrow_mut()
            .entry(slot.uploader.clone())
            .or_default()
            .insert(slot.digest, size);
    }

    /// Records that `slot`'s declaration is gone (sealed, discarded, expired).
    fn undeclared(&self, slot: &Slot) {
        let mut unfinished = self.unfinished.borrow_mut();
        if let Some(slots) = unfinished.get_mut(&slot.uploader) {
            slots.remove(&slot.digest);
            if slots.is_empty() {
                unfinished.remove(&slot.uploader);
            }
        }
    }

    /// Keeps complete blobs in the group's PostgreSQL store too (see the module docs),
    /// connecting to it now.
    ///
    /// # Errors
    /// [`BlobError::Store`] when the database cannot be reached.
    pub fn with_postgres(mut self, target: PgBlobTarget) -> Result<Blobs, BlobError> {
        let client = target.connect("blobs")?;
        self.shared = Some(Shared {
            target,
            client: PgBlobClient(std::sync::Arc::new(std::sync::Mutex::new(Some(client)))),
        });
        Ok(self)
    }

    /// Keeps complete blobs in PostgreSQL too, at `target` (a group of a host,
    /// [`PgBlobTarget::in_host`]), over `client`, which the host's other groups share; no
    /// connection is made now.
    pub fn with_postgres_on(mut self, target: PgBlobTarget, client: PgBlobClient) -> Blobs {
        self.shared = Some(Shared { target, client });
        self
    }

    /// The PostgreSQL store complete blobs are kept in, if any: the sealing actor connects
    /// to it.
    pub fn postgres(&self) -> Option<&PgBlobTarget> {
        self.shared.as_ref().map(|s| &s.target)
    }

    /// Where this store's files are, for [`seal`] on another thread.
    pub fn layout(&self) -> BlobLayout {
        BlobLayout {
            root: self.root.clone(),
        }
    }

    fn blob_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.layout().blob_path(digest)
    }

    fn part_path(&self, slot: &Slot) -> PathBuf {
        self.layout().part_path(slot)
    }

    fn size_path(&self, slot: &Slot) -> PathBuf {
        self.layout().size_path(slot)
    }

    /// The sealing of `slot` ended (see [`seal`]): `kept` when its content is complete (and
    /// charged to its uploader if this upload stored it), `None` when it failed.
    pub fn sealed(&self, slot: &Slot, kept: Option<Kept>) {
        self.sealing.borrow_mut().remove(slot);
        // A seal that failed on the database keeps the upload, to seal again; every other
        // end removed its declaration.
        if !self.size_path(slot).exists() {
            self.undeclared(slot);
        }
        if let Some(Kept { size, new: true }) = kept {
            if let Some(charges) = self.charges.borrow_mut().as_mut() {
                let charged = charges.entry(slot.uploader.clone()).or_default();
                *charged = charged.saturating_add(size);
            }
        }
    }

    /// Seals `slot` on this thread (see [`seal`]): for tests and recovery.
    ///
    /// # Errors
    /// As [`seal`].
    pub fn seal_here(&self, slot: &Slot, verified: bool) -> Result<Progress, BlobError> {
        let layout = self.layout();
        let result = match &self.shared {
            Some(shared) => shared
                .with(|client| seal(&layout, slot, verified, Some((client, shared.target.gid)))),
            None => seal(&layout, slot, verified, None),
        };
        self.sealed(slot, result.as_ref().ok().copied());
        result.map(|kept| Progress::Complete { size: kept.size })
    }

    /// The size of the complete blob `digest`, if there is one: the local file's, else, with
    /// a PostgreSQL store, the database's.
    ///
    /// # Errors
    /// [`BlobError::Io`] other than "not found"; [`BlobError::Store`].
    pub fn size(&self, digest: &Sha256Digest) -> Result<Option<u64>, BlobError> {
        match self.local_size(digest)? {
            Some(size) => Ok(Some(size)),
            None => self.shared_size(digest),
        }
    }

    fn local_size(&self, digest: &Sha256Digest) -> Result<Option<u64>, BlobError> {
        match fs::metadata(self.blob_path(digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn shared_size(&self, digest: &Sha256Digest) -> Result<Option<u64>, BlobError> {
        match &self.shared {
            Some(shared) => shared.with(|client| pg_size(client, shared.target.gid, digest)),
            None => Ok(None),
        }
    }

    /// Where the upload `slot` stands: complete (by whoever's upload, here or, with a
    /// PostgreSQL store, in the database), or the slot's own progress. Another member's
    /// upload of the same digest is not looked at. A slot whose content another upload
    /// completed is dropped (its bytes are not needed).
    ///
    /// # Errors
    /// [`BlobError::Io`], [`BlobError::Store`].
    pub fn progress(&self, slot: &Slot) -> Result<Option<Progress>, BlobError> {
        if let Some(size) = self.local_size(&slot.digest)? {
            if !self.sealing.borrow().contains_key(slot) && self.size_path(slot).exists() {
                self.discard(slot);
            }
            return Ok(Some(Progress::Complete { size }));
        }
        // An upload in progress here is asked about without the database, so that a chunk
        // costs no query; if the content is complete there already, sealing finds it.
        let Some(size) = self.declared_size(slot)? else {
            return Ok(self
                .shared_size(&slot.digest)?
                .map(|size| Progress::Complete { size }));
        };
        if let Some(&verified) = self.sealing.borrow().get(slot) {
            return Ok(Some(Progress::Sealing {
                size,
                verified,
                start: false,
            }));
        }
        let have = match fs::metadata(self.part_path(slot)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(Some(Progress::Partial { have, size }))
    }

    fn declared_size(&self, slot: &Slot) -> Result<Option<u64>, BlobError> {
        Ok(self
            .declaration(&self.size_path(slot))?
            .map(|(size, _)| size))
    }

    /// The size and uploader a `.size` file declares.
    fn declaration(&self, path: &Path) -> Result<Option<(u64, String)>, BlobError> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let (size, owner) = text.split_once(' ').unwrap_or((text.as_str(), ""));
                Ok(size
                    .trim()
                    .parse()
                    .ok()
                    .map(|size| (size, owner.trim_end_matches('\n').to_owned())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// How many unfinished uploads `owner` has, and the bytes they declare together: from
    /// memory ([`Blobs::count_unfinished`]), at most `--max-uploads-per-member` entries,
    /// however many other members' uploads there are.
    fn pending(&self, owner: &str) -> (usize, u64) {
        self.unfinished.borrow().get(owner).map_or((0, 0), |slots| {
            let bytes = slots
                .values()
                .fold(0u64, |sum, &size| sum.saturating_add(size));
            (slots.len(), bytes)
        })
    }

    /// Bytes of complete content charged to `uploader` that the node keeps (see the module
    /// docs, "Quota and reserve").
    ///
    /// # Errors
    /// [`BlobError::Io`] listing the store; [`BlobError::Store`].
    pub fn charged(&self, uploader: &str) -> Result<u64, BlobError> {
        if let Some(shared) = &self.shared {
            return shared.with(|client| pg_charged(client, shared.target.gid, uploader));
        }
        let mut charges = self.charges.borrow_mut();
        let charges = match charges.as_mut() {
            Some(charges) => charges,
            None => charges.insert(self.count_charges()?),
        };
        Ok(charges.get(uploader).copied().unwrap_or(0))
    }

    /// Counts the charges of the kept contents now (without a PostgreSQL store; with one,
    /// its rows are the charges and this does nothing), rather than at the first `upload`.
    /// Call it before any seal runs: a blob sealed while they are being counted could be
    /// counted twice.
    ///
    /// # Errors
    /// [`BlobError::Io`] listing the store.
    pub fn count_kept(&self) -> Result<(), BlobError> {
        if self.shared.is_none() {
            let counted = self.count_charges()?;
            *self.charges.borrow_mut() = Some(counted);
        }
        Ok(())
    }

    /// Sums the sizes of the local blobs by the uploader their `uploaders/` file names. A
    /// charge whose blob is not there (a seal cut short, or under way) is skipped.
    fn count_charges(&self) -> Result<HashMap<String, u64>, BlobError> {
        let mut out = HashMap::new();
        let dirs = match fs::read_dir(self.root.join("uploaders")) {
            Ok(dirs) => dirs,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for dir in dirs {
            for entry in fs::read_dir(dir?.path())? {
                let path = entry?.path();
                let Some(Ok(digest)) = path
                    .file_name()
                    .map(|n| n.to_string_lossy().parse::<Sha256Digest>())
                else {
                    continue;
                };
                if let Some(size) = self.local_size(&digest)? {
                    let who = fs::read_to_string(&path)?;
                    let charged: &mut u64 = out.entry(who).or_default();
                    *charged = charged.saturating_add(size);
                }
            }
        }
        Ok(out)
    }

    /// Refuses to write `needed` more bytes when that would leave less free space than the
    /// reserve on the store's file system (`statvfs`: blocks available to unprivileged
    /// users).
    ///
    /// # Errors
    /// [`BlobError::StorageFull`]; [`BlobError::Io`] when `statvfs` fails.
    fn ensure_room(&self, needed: u64) -> Result<(), BlobError> {
        let reserve = self.limits.reserve;
        if reserve == 0 {
            return Ok(());
        }
        let stat = rustix::fs::statvfs(&self.root).map_err(std::io::Error::from)?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < needed.saturating_add(reserve) {
            return Err(BlobError::StorageFull {
                free,
                needed,
                reserve,
            });
        }
        Ok(())
    }

    /// Begins (or, with the same size, resumes) the upload `slot` of `size` bytes. A blob
    /// already complete is not uploaded again, and resuming costs no quota: the answer says
    /// where it stands. A new upload must fit in its uploader's quota (their unfinished
    /// uploads' declared sizes plus the complete contents charged to them) and leave the
    /// disk's reserve free ([`Limits`]). An upload whose every byte arrived before a
    /// restart, but which was not sealed, answers [`Progress::Sealing`] with `start`: the
    /// caller has it sealed (its digest checked by reading it back) off its thread, as after
    /// a last chunk.
    ///
    /// # Errors
    /// [`BlobError::SizeConflict`] when this uploader's upload of the digest has another
    /// size; [`BlobError::TooManyUploads`]; [`BlobError::Quota`];
    /// [`BlobError::StorageFull`]; [`BlobError::Io`];
    /// [`BlobError::Store`].
    pub fn begin(&self, slot: &Slot, size: u64) -> Result<Progress, BlobError> {
        match self.progress(slot)? {
            Some(p @ (Progress::Complete { .. } | Progress::Sealing { .. })) => return Ok(p),
            // Every byte arrived but the node stopped before sealing it: seal it now.
            Some(Progress::Partial {
                have,
                size: declared,
            }) if declared == size && have == size => {
                self.sealing.borrow_mut().insert(slot.clone(), false);
                return Ok(Progress::Sealing {
                    size,
                    verified: false,
                    start: true,
                });
            }
            Some(Progress::Partial {
                have,
                size: declared,
            }) if declared == size => {
                self.declared(slot, size);
                return Ok(Progress::Partial { have, size });
            }
            Some(Progress::Partial { size: have, .. }) => {
                return Err(BlobError::SizeConflict {
                    declared: size,
                    have,
                })
            }
            None => {}
        }
        let owner = slot.uploader.as_str();
        let (uploads, pending) = self.pending(owner);
        if uploads >= self.limits.max_uploads {
            return Err(BlobError::TooManyUploads {
                max: self.limits.max_uploads,
            });
        }
        let kept = self.charged(owner)?;
        let quota = self.limits.quota;
        if pending.saturating_add(kept).saturating_add(size) > quota {
            return Err(BlobError::Quota {
                pending,
                kept,
                quota,
            });
        }
        self.ensure_room(size)?;
        write_private(&self.size_path(slot), format!("{size} {owner}").as_bytes())?;
        self.declared(slot, size);
        if size == 0 {
            write_private(&self.part_path(slot), b"")?;
            return self.seal_here(slot, false);
        }
        Ok(Progress::Partial { have: 0, size })
    }

    /// Appends `bytes` at `offset` to the upload `slot` (the caller's own: another member's
    /// upload of the digest is never touched). Once every byte is there, checks the digest
    /// if it was hashed as it arrived and answers [`Progress::Sealing`]: the caller then has
    /// it sealed ([`seal`], off its thread) and calls [`Blobs::sealed`]. Returns where the
    /// upload stands after.
    ///
    /// # Errors
    /// [`BlobError::NoUpload`] (this uploader declared no upload of the digest),
    /// [`BlobError::BadOffset`] (the error says where to resume), [`BlobError::PastEnd`],
    /// [`BlobError::StorageFull`] (nothing written), [`BlobError::DigestMismatch`],
    /// [`BlobError::Io`].
    pub fn write_chunk(
        &self,
        slot: &Slot,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Progress, BlobError> {
        let digest = &slot.digest;
        let (have, size) = match self.progress(slot)? {
            Some(Progress::Partial { have, size }) => (have, size),
            Some(p @ (Progress::Complete { .. } | Progress::Sealing { .. })) => return Ok(p),
            None => return Err(BlobError::NoUpload(*digest)),
        };
        if offset != have {
            return Err(BlobError::BadOffset { offset, have });
        }
        let len = bytes.len() as u64;
        if offset + len > size {
            return Err(BlobError::PastEnd { offset, len, size });
        }
        self.ensure_room(len)?;
        self.append(slot, have, bytes)?;
        {
            let mut hashing = self.hashing.borrow_mut();
            match hashing.get_mut(slot) {
                Some((hasher, n)) if *n == offset => {
                    hasher.update(bytes);
                    *n += len;
                }
                // No state for the bytes before (a restart): `finish` reads them back.
                Some(_) => {
                    hashing.remove(slot);
                }
                None if offset == 0 => {
                    let mut hasher = Sha256::new();
                    hasher.update(bytes);
                    hashing.insert(slot.clone(), (hasher, len));
                }
                None => {}
            }
        }
        if offset + len == size {
            // Hashed as it arrived: a mismatch is known now, without reading anything back.
            let state = self.hashing.borrow_mut().remove(slot);
            let verified = match state {
                Some((hasher, n)) if n == size => {
                    let actual = Sha256Digest::from_bytes(hasher.finalize().into());
                    if actual != *digest {
                        self.discard(slot);
                        return Err(BlobError::DigestMismatch {
                            declared: *digest,
                            actual,
                        });
                    }
                    true
                }
                _ => false,
            };
            self.sealing.borrow_mut().insert(slot.clone(), verified);
            return Ok(Progress::Sealing {
                size,
                verified,
                start: true,
            });
        }
        Ok(Progress::Partial {
            have: offset + len,
            size,
        })
    }

    /// Writes `bytes` at `have`, the end of `slot`'s partial file. A chunk of whole blocks
    /// at a block boundary ([`DIRECT_BLOCK`]; every chunk of the documented size but a file's
    /// last) goes around the page cache (`O_DIRECT`), so the loop's core does not copy
    /// gigabytes into it; any other chunk, or a file system without `O_DIRECT` (tmpfs), goes
    /// through it. Either way the seal's fsync makes the bytes durable. A short write (a full
    /// disk) is cut off, so that no torn chunk is left to resume after.
    fn append(&self, slot: &Slot, have: u64, bytes: &[u8]) -> Result<(), BlobError> {
        use std::os::unix::fs::FileExt;
        let path = self.part_path(slot);
        let aligned = have.is_multiple_of(DIRECT_BLOCK)
            && (bytes.len() as u64).is_multiple_of(DIRECT_BLOCK)
            && !bytes.is_empty();
        let direct = aligned
            .then(|| {
                OpenOptions::new()
                    .create(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .mode(0o600)
                    .open(&path)
                    .ok()
            })
            .flatten();
        if let Some(file) = direct {
            // O_DIRECT needs the memory aligned too: copy into a block-aligned stretch of a
            // buffer kept for it.
            let mut staging = self.staging.borrow_mut();
            let align = usize::try_from(DIRECT_BLOCK).unwrap_or(4096);
            if staging.len() < bytes.len() + align {
                staging.resize(bytes.len() + align, 0);
            }
            let at = staging.as_ptr().align_offset(align);
            let block = &mut staging[at..at + bytes.len()];
            block.copy_from_slice(bytes);
            match file.write_all_at(block, have) {
                Ok(()) => return Ok(()),
                // A device with larger blocks: write through the page cache instead.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    let _ = file.set_len(have);
                }
                Err(e) => {
                    let _ = file.set_len(have);
                    return Err(e.into());
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        if let Err(e) = file.write_all(bytes) {
            let _ = file.set_len(have);
            return Err(e.into());
        }
        Ok(())
    }

    /// Forgets the upload `slot`.
    pub fn discard(&self, slot: &Slot) {
        self.hashing.borrow_mut().remove(slot);
        let _ = fs::remove_file(self.part_path(slot));
        let _ = fs::remove_file(self.size_path(slot));
        self.undeclared(slot);
    }

    /// The size of the complete blob `digest`, and up to `max` bytes of it from `offset`
    /// (fewer at its end): from the local file, else, with a PostgreSQL store, straight from
    /// the database's rows (one range in memory, never the whole blob).
    ///
    /// # Errors
    /// [`BlobError::NotFound`] (also for an upload still in progress: a partial blob is never
    /// served), [`BlobError::Range`], [`BlobError::Io`], [`BlobError::Store`].
    pub fn read(
        &self,
        digest: &Sha256Digest,
        offset: u64,
        max: usize,
    ) -> Result<(u64, Vec<u8>), BlobError> {
        let mut file = match File::open(self.blob_path(digest)) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match &self.shared {
                    Some(shared) => shared
                        .with(|client| pg_read(client, shared.target.gid, digest, offset, max)),
                    None => Err(BlobError::NotFound(*digest)),
                };
            }
            Err(e) => return Err(e.into()),
        };
        let size = file.metadata()?.len();
        if offset > size {
            return Err(BlobError::Range { offset, size });
        }
        file.seek(SeekFrom::Start(offset))?;
        let want = usize::try_from((size - offset).min(max as u64)).unwrap_or(max);
        let mut bytes = vec![0u8; want];
        file.read_exact(&mut bytes)?;
        Ok((size, bytes))
    }

    /// Removes every complete blob at least `min_age` old at `now` (since it was completed) for which
    /// `keep` is false, its file and, with a PostgreSQL store, its rows; returns how many.
    /// The age spares a content just uploaded whose message has not been sent yet. What a
    /// removed blob was charged to its uploader is freed.
    ///
    /// # Errors
    /// [`BlobError::Io`] listing the store; [`BlobError::Store`] listing or deleting rows
    /// ([`StoreError::Fenced`] when another node holds the lease: nothing is deleted).
    pub fn retain(
        &self,
        min_age: Duration,
        now: SystemTime,
        mut keep: impl FnMut(&Sha256Digest) -> bool,
    ) -> Result<u64, BlobError> {
        let mut removed = std::collections::HashSet::new();
        if let Some(shared) = &self.shared {
            shared.with(|client| {
                // `keep` still has the last word on each candidate.
                let gid = shared.target.gid;
                for digest in pg_unreferenced(client, gid, min_age)? {
                    if !keep(&digest) && pg_delete(client, gid, &digest, shared.target.epoch)? {
                        removed.insert(digest);
                    }
                }
                Ok(())
            })?;
        }
        for dir in fs::read_dir(self.root.join("sha256"))? {
            for entry in fs::read_dir(dir?.path())? {
                let entry = entry?;
                let Ok(digest) = entry.file_name().to_string_lossy().parse::<Sha256Digest>() else {
                    continue;
                };
                let meta = entry.metadata();
                let size = meta.as_ref().map(std::fs::Metadata::len).unwrap_or(0);
                let age = meta
                    .and_then(|m| m.modified())
                    .map(|t| now.duration_since(t).unwrap_or_default())
                    .unwrap_or_default();
                // A cache file whose rows just went goes too, whatever its age.
                let gone = removed.contains(&digest);
                if (gone || (age >= min_age && !keep(&digest)))
                    && fs::remove_file(entry.path()).is_ok()
                {
                    self.uncharge(&digest, size);
                    removed.insert(digest);
                }
            }
        }
        Ok(removed.len() as u64)
    }

    /// Removes the charge file of a removed blob of `size` bytes, and (without a
    /// PostgreSQL store, where the rows are the charges) frees what it charged.
    fn uncharge(&self, digest: &Sha256Digest, size: u64) {
        let path = self.layout().uploader_path(digest);
        let Ok(who) = fs::read_to_string(&path) else {
            return;
        };
        let _ = fs::remove_file(&path);
        if let Some(charged) = self
            .charges
            .borrow_mut()
            .as_mut()
            .and_then(|c| c.get_mut(&who))
        {
            *charged = charged.saturating_sub(size);
        }
    }

    /// Discards uploads not written to for `ttl` at `now`; returns how many.
    ///
    /// # Errors
    /// [`BlobError::Io`] listing the store.
    pub fn expire_uploads(&self, ttl: Duration, now: SystemTime) -> Result<u64, BlobError> {
        let uploads = self.root.join("uploads");
        let mut expired = 0;
        for entry in fs::read_dir(&uploads)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".size") else {
                continue;
            };
            let part = uploads.join(format!("{stem}.part"));
            // The last write: the partial file's, or the declaration's if nothing came.
            let touched = fs::metadata(&part)
                .or_else(|_| entry.metadata())
                .and_then(|m| m.modified())?;
            if now.duration_since(touched).unwrap_or_default() < ttl {
                continue;
            }
            let digest = stem.split('.').next().and_then(|hex| hex.parse().ok());
            match (digest, self.declaration(&entry.path())?) {
                (Some(digest), Some((_, owner))) => self.discard(&Slot::new(digest, &owner)),
                _ => {
                    let _ = fs::remove_file(&part);
                    let _ = fs::remove_file(entry.path());
                }
            }
            expired += 1;
        }
        Ok(expired)
    }
}

/// The SHA-256 of a file's content, read in 64 KiB pieces.
fn hash_file(file: &mut File) -> std::io::Result<Sha256Digest> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Sha256Digest::from_bytes(hasher.finalize().into()))
}

/// Writes a small file with mode 0600, replacing it, and fsyncs it.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest::from_bytes(Sha256::digest(bytes).into())
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn an_upload_in_chunks_resumes_after_a_reopen_and_completes_verified() {
        let dir = tempfile::tempdir().expect("tmp");
        let data = content(1_000_000);
        let digest = digest_of(&data);
        let chunk = 256 << 10;
        {
            let blobs = Blobs::open(dir.path()).expect("open");
            assert_eq!(
                blobs
                    .begin(&Slot::new(digest, "k"), data.len() as u64)
                    .expect("begin"),
                Progress::Partial {
                    have: 0,
                    size: 1_000_000
                }
            );
            blobs
                .write_chunk(&Slot::new(digest, "k"), 0, &data[..chunk])
                .expect("chunk 1");
            // A partial blob is never served.
            assert!(matches!(
                blobs.read(&digest, 0, 10),
                Err(BlobError::NotFound(_))
            ));
        }
        // A restart: the same store, opened again, says where to resume.
        let blobs = Blobs::open(dir.path()).expect("reopen");
        let Progress::Partial { have, .. } = blobs
            .begin(&Slot::new(digest, "k"), data.len() as u64)
            .expect("resume")
        else {
            panic!("still partial");
        };
        assert_eq!(have, chunk as u64);
        // A chunk at the wrong offset says where the upload stands, and changes nothing.
        assert!(matches!(
            blobs.write_chunk(&Slot::new(digest, "k"), 0, &data[..10]),
            Err(BlobError::BadOffset { offset: 0, have: h }) if h == chunk as u64
        ));
        let mut at = have as usize;
        let mut last = None;
        while at < data.len() {
            let end = (at + chunk).min(data.len());
            last = Some(
                blobs
                    .write_chunk(&Slot::new(digest, "k"), at as u64, &data[at..end])
                    .expect("chunk"),
            );
            at = end;
        }
        let Some(Progress::Sealing { verified, .. }) = last else {
            panic!("the last chunk starts the seal: {last:?}");
        };
        // Resumed after a reopen: the first part was not hashed as it arrived.
        assert!(!verified);
        // Sealing is under way: nothing is served yet, and a retried last chunk or a second
        // `upload` does not start another seal.
        assert!(matches!(
            blobs.read(&digest, 0, 10),
            Err(BlobError::NotFound(_))
        ));
        let tail = (data.len() - 1) / chunk * chunk;
        for again in [
            blobs.write_chunk(&Slot::new(digest, "k"), tail as u64, &data[tail..]),
            blobs.begin(&Slot::new(digest, "k"), data.len() as u64),
        ] {
            assert_eq!(
                again.expect("again"),
                Progress::Sealing {
                    size: 1_000_000,
                    verified: false,
                    start: false
                }
            );
        }
        assert_eq!(
            blobs
                .seal_here(&Slot::new(digest, "k"), verified)
                .expect("seal"),
            Progress::Complete { size: 1_000_000 }
        );
        let mut back = Vec::new();
        while back.len() < data.len() {
            back.extend(
                blobs
                    .read(&digest, back.len() as u64, chunk)
                    .expect("read")
                    .1,
            );
        }
        assert_eq!(back, data);
        // The same content again is not uploaded again.
        assert_eq!(
            blobs
                .begin(&Slot::new(digest, "k"), data.len() as u64)
                .expect("again"),
            Progress::Complete { size: 1_000_000 }
        );
    }

    #[test]
    fn a_digest_mismatch_discards_the_upload_and_bad_chunks_change_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let blobs = Blobs::open(dir.path()).expect("open");
        let data = content(1000);
        let wrong = digest_of(b"something else");
        blobs.begin(&Slot::new(wrong, "k"), 1000).expect("begin");
        assert!(matches!(
            blobs.write_chunk(&Slot::new(wrong, "k"), 0, &content(1001)),
            Err(BlobError::PastEnd { .. })
        ));
        assert!(matches!(
            blobs.write_chunk(&Slot::new(wrong, "k"), 0, &data),
            Err(BlobError::DigestMismatch { .. })
        ));
        assert_eq!(
            blobs.progress(&Slot::new(wrong, "k")).expect("progress"),
            None
        );
        assert!(matches!(
            blobs.read(&wrong, 0, 10),
            Err(BlobError::NotFound(_))
        ));
        assert!(matches!(
            blobs
                .begin(&Slot::new(wrong, "k"), 1000)
                .and_then(|_| blobs.begin(&Slot::new(wrong, "k"), 999)),
            Err(BlobError::SizeConflict { .. })
        ));
        // The empty content completes at once.
        let empty = digest_of(b"");
        assert_eq!(
            blobs.begin(&Slot::new(empty, "k"), 0).expect("empty"),
            Progress::Complete { size: 0 }
        );
    }

    #[test]
    fn retention_and_expiry_remove_what_nothing_needs() {
        let dir = tempfile::tempdir().expect("tmp");
        let blobs = Blobs::open(dir.path()).expect("open");
        let (a, b) = (content(10), content(20));
        let (da, db) = (digest_of(&a), digest_of(&b));
        for (d, bytes) in [(da, &a), (db, &b)] {
            blobs
                .begin(&Slot::new(d, "k"), bytes.len() as u64)
                .expect("begin");
            let sealing = blobs
                .write_chunk(&Slot::new(d, "k"), 0, bytes)
                .expect("write");
            assert_eq!(
                sealing,
                Progress::Sealing {
                    size: bytes.len() as u64,
                    verified: true,
                    start: true,
                }
            );
            blobs.seal_here(&Slot::new(d, "k"), true).expect("seal");
        }
        assert_eq!(
            blobs
                .retain(Duration::from_secs(3600), SystemTime::now(), |_| false)
                .expect("young"),
            0,
            "a content just completed is spared"
        );
        assert_eq!(
            blobs
                .retain(Duration::ZERO, SystemTime::now(), |d| *d == da)
                .expect("retain"),
            1
        );
        assert_eq!(blobs.size(&da).expect("a"), Some(10));
        assert_eq!(blobs.size(&db).expect("b"), None);
        let pending = digest_of(b"never finished");
        blobs.begin(&Slot::new(pending, "k"), 100).expect("begin");
        assert_eq!(
            blobs
                .expire_uploads(Duration::from_secs(3600), SystemTime::now())
                .expect("keep"),
            0
        );
        assert_eq!(
            blobs
                .expire_uploads(Duration::ZERO, SystemTime::now())
                .expect("expire"),
            1
        );
        assert_eq!(
            blobs.progress(&Slot::new(pending, "k")).expect("gone"),
            None
        );
    }

    #[test]
    fn unfinished_uploads_and_kept_contents_count_against_their_uploaders_quota() {
        let dir = tempfile::tempdir().expect("tmp");
        let blobs = Blobs::open(dir.path()).expect("open").with_limits(Limits {
            quota: 1000,
            ..Limits::default()
        });
        let (a, b, c) = (digest_of(b"a"), digest_of(b"b"), digest_of(b"c"));
        let alice = |d| Slot::new(d, "alice");
        blobs.begin(&alice(a), 600).expect("within");
        assert!(matches!(
            blobs.begin(&alice(b), 500),
            Err(BlobError::Quota {
                pending: 600,
                kept: 0,
                quota: 1000
            })
        ));
        // Another uploader has a quota of their own; resuming costs nothing.
        blobs.begin(&Slot::new(b, "bob"), 500).expect("bob's own");
        blobs.begin(&alice(a), 600).expect("a resume");
        // Discarded uploads free the quota.
        blobs.discard(&alice(a));
        blobs.begin(&alice(c), 900).expect("room again");
        blobs.discard(&alice(c));

        // Completed contents still count, until retention removes them.
        let x = content(700);
        let dx = digest_of(&x);
        blobs.begin(&alice(dx), 700).expect("begin");
        let Progress::Sealing { verified, .. } =
            blobs.write_chunk(&alice(dx), 0, &x).expect("write")
        else {
            panic!("sealing");
        };
        blobs.seal_here(&alice(dx), verified).expect("seal");
        assert_eq!(blobs.charged("alice").expect("charged"), 700);
        assert!(matches!(
            blobs.begin(&alice(c), 400),
            Err(BlobError::Quota {
                pending: 0,
                kept: 700,
                quota: 1000
            })
        ));
        // Declaring a content that is complete costs nothing, and charges nobody else.
        assert_eq!(
            blobs.begin(&Slot::new(dx, "bob"), 700).expect("bob"),
            Progress::Complete { size: 700 }
        );
        assert_eq!(blobs.charged("bob").expect("charged"), 0);
        // The charges are counted again from the files after a restart.
        let again = Blobs::open(dir.path()).expect("reopen");
        assert_eq!(again.charged("alice").expect("charged"), 700);
        assert_eq!(
            again
                .retain(Duration::ZERO, SystemTime::now(), |_| false)
                .expect("retain"),
            1
        );
        assert_eq!(again.charged("alice").expect("freed"), 0);
    }

    /// Issue 22 review, S5: a member's unfinished uploads are counted in memory (from the
    /// directory once, at open), not by reading every entry of `uploads/` at each `upload`,
    /// whose cost grew with every other member's uploads. The count follows declarations,
    /// seals, discards and expiry, and is made again at open (what a node killed mid-upload
    /// left still counts). An entry planted in `uploads/` after open that cannot be read (a
    /// directory under the name of one of the member's declarations) shows that `upload`
    /// reads none of it: the scan failed on it.
    #[test]
    fn unfinished_uploads_are_counted_in_memory_and_again_at_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let limits = Limits {
            quota: 10_000,
            max_uploads: 3,
            ..Limits::default()
        };
        let blobs = Blobs::open(dir.path()).expect("open").with_limits(limits);
        for i in 0..200u32 {
            let other = Slot::new(digest_of(&i.to_le_bytes()), &format!("member {i}"));
            blobs.begin(&other, 10).expect("another member's upload");
        }
        let alice = |d| Slot::new(d, "alice");
        let x = content(3000);
        let (a, b, c, d) = (
            digest_of(b"a"),
            digest_of(b"b"),
            digest_of(&x),
            digest_of(b"d"),
        );
        let planted = dir.path().join(format!(
            "blobs/uploads/{}.{}.size",
            digest_of(b"planted"),
            Slot::tag("alice")
        ));
        fs::create_dir(&planted).expect("plant");
        for (digest, size) in [(a, 1000), (b, 2000), (c, 3000)] {
            blobs.begin(&alice(digest), size).expect("declare");
        }
        assert_eq!(blobs.pending("alice"), (3, 6000));
        assert!(matches!(
            blobs.begin(&alice(d), 1),
            Err(BlobError::TooManyUploads { max: 3 })
        ));
        // Resuming one's own upload counts it once.
        blobs.begin(&alice(a), 1000).expect("resume");
        assert_eq!(blobs.pending("alice"), (3, 6000));
        blobs.discard(&alice(b));
        assert_eq!(blobs.pending("alice"), (2, 4000));
        // A completed upload is no longer pending; its content is kept, and charged.
        let Progress::Sealing { verified, .. } =
            blobs.write_chunk(&alice(c), 0, &x).expect("write")
        else {
            panic!("sealing");
        };
        blobs.seal_here(&alice(c), verified).expect("seal");
        assert_eq!(blobs.pending("alice"), (1, 1000));
        assert_eq!(blobs.charged("alice").expect("charged"), 3000);
        assert!(matches!(
            blobs.begin(&alice(d), 6001),
            Err(BlobError::Quota {
                pending: 1000,
                kept: 3000,
                quota: 10_000
            })
        ));
        blobs.begin(&alice(d), 6000).expect("within the quota");
        assert_eq!(blobs.pending("alice"), (2, 7000));
        assert_eq!(blobs.pending("member 7"), (1, 10));
        fs::remove_dir(&planted).expect("unplant");

        // A node killed now: the next start counts the same from the files.
        drop(blobs);
        let blobs = Blobs::open(dir.path()).expect("reopen").with_limits(limits);
        assert_eq!(blobs.pending("alice"), (2, 7000));
        assert_eq!(blobs.pending("member 7"), (1, 10));
        assert_eq!(
            blobs
                .expire_uploads(Duration::ZERO, SystemTime::now())
                .expect("expire"),
            202
        );
        assert_eq!(blobs.pending("alice"), (0, 0));
        assert_eq!(blobs.pending("member 7"), (0, 0));
        assert!(blobs.unfinished.borrow().is_empty());
    }

    #[test]
    fn an_upload_belongs_to_its_uploader_and_another_cannot_spoil_or_block_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let blobs = Blobs::open(dir.path()).expect("open");
        let data = content(1000);
        let d = digest_of(&data);
        let (alice, mallory) = (Slot::new(d, "alice"), Slot::new(d, "mallory"));
        blobs.begin(&alice, 1000).expect("alice");
        blobs.write_chunk(&alice, 0, &data[..500]).expect("half");
        // Mallory's chunk finds no upload of hers; her declaration with another size is an
        // upload of her own, and her junk ends only hers.
        assert!(matches!(
            blobs.write_chunk(&mallory, 500, &[0u8; 500]),
            Err(BlobError::NoUpload(_))
        ));
        assert_eq!(blobs.progress(&mallory).expect("status"), None);
        assert_eq!(
            blobs.begin(&mallory, 10).expect("her own"),
            Progress::Partial { have: 0, size: 10 }
        );
        assert!(matches!(
            blobs.write_chunk(&mallory, 0, &[0u8; 10]),
            Err(BlobError::DigestMismatch { .. })
        ));
        assert_eq!(
            blobs.progress(&alice).expect("alice's"),
            Some(Progress::Partial {
                have: 500,
                size: 1000
            })
        );
        let Progress::Sealing { verified, .. } =
            blobs.write_chunk(&alice, 500, &data[500..]).expect("rest")
        else {
            panic!("sealing");
        };
        assert!(verified);
        blobs.seal_here(&alice, verified).expect("seal");
        assert_eq!(blobs.read(&d, 0, 2000).expect("read").1, data);
        // A second upload of the same content that completes later keeps the first.
        let bob = Slot::new(d, "bob");
        blobs.discard(&bob);
        assert_eq!(
            blobs.begin(&bob, 1000).expect("bob"),
            Progress::Complete { size: 1000 }
        );
        assert_eq!(blobs.charged("alice").expect("alice"), 1000);
        assert_eq!(blobs.charged("bob").expect("bob"), 0);
    }

    #[test]
    fn uploads_declared_before_they_had_owners_are_adopted() {
        let dir = tempfile::tempdir().expect("tmp");
        let data = content(300);
        let d = digest_of(&data);
        let uploads = dir.path().join("blobs/uploads");
        fs::create_dir_all(&uploads).expect("mkdir");
        fs::write(uploads.join(format!("{d}.part")), &data[..100]).expect("part");
        fs::write(uploads.join(format!("{d}.size")), "300 name:old timer").expect("size");
        let blobs = Blobs::open(dir.path()).expect("open");
        let slot = Slot::new(d, "name:old timer");
        assert_eq!(
            blobs.begin(&slot, 300).expect("resume"),
            Progress::Partial {
                have: 100,
                size: 300
            }
        );
    }

    #[test]
    fn the_disk_reserve_refuses_uploads_and_chunks() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = digest_of(b"x");
        let slot = Slot::new(d, "k");
        let full = Blobs::open(dir.path()).expect("open").with_limits(Limits {
            reserve: u64::MAX / 2,
            ..Limits::default()
        });
        assert!(matches!(
            full.begin(&slot, 1),
            Err(BlobError::StorageFull { needed: 1, .. })
        ));
        let roomy = Blobs::open(dir.path()).expect("open");
        roomy.begin(&slot, 1).expect("no reserve");
        assert!(matches!(
            full.write_chunk(&slot, 0, b"x"),
            Err(BlobError::StorageFull { needed: 1, .. })
        ));
        assert_eq!(
            full.progress(&slot).expect("unchanged"),
            Some(Progress::Partial { have: 0, size: 1 })
        );
    }

    /// Uploads `data` as `digest` to `blobs` in chunks of 256 KiB; returns the last progress.
    fn upload_all(blobs: &Blobs, digest: &Sha256Digest, data: &[u8]) -> Progress {
        let slot = Slot::new(*digest, "k");
        blobs.begin(&slot, data.len() as u64).expect("begin");
        let mut last = None;
        for (i, piece) in data.chunks(256 << 10).enumerate() {
            last = Some(
                blobs
                    .write_chunk(&slot, (i * (256 << 10)) as u64, piece)
                    .expect("chunk"),
            );
        }
        last.expect("a chunk")
    }

    fn count(client: &mut Client, sql: &str, digest: &Sha256Digest) -> i64 {
        client
            .query_one(sql, &[&digest.as_bytes().as_slice()])
            .expect("count")
            .get(0)
    }

    #[test]
    fn a_blob_sealed_with_postgres_is_served_by_another_node_range_by_range() {
        let cluster = agora_tests::pg::PgCluster::start();
        let url = cluster.database("agora");
        let group = GroupName::new("blobs").expect("name");
        let pg = crate::store::postgres::PgTarget::new(url);
        // The store makes the schema, as the node opens it before its blobs.
        let _store = crate::store::PgStore::open(&pg, &group, None).expect("store");
        let target = PgBlobTarget::new(&pg, &group, None);
        let (dir_a, dir_b) = (
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
        );
        let a = Blobs::open(dir_a.path())
            .and_then(|b| b.with_postgres(target.clone()))
            .expect("a");

        // Four pieces in the database, the last one short.
        let data = content(3 * PG_CHUNK_BYTES + 12_345);
        let digest = digest_of(&data);
        let Progress::Sealing { verified, .. } = upload_all(&a, &digest, &data) else {
            panic!("the last chunk starts the seal");
        };
        // As the sealing actor does: on a connection of its own.
        let mut sealer = None;
        let slot = Slot::new(digest, "k");
        let kept = target
            .with(&mut sealer, "seal", |c| {
                seal(&a.layout(), &slot, verified, Some((c, target.gid())))
            })
            .expect("seal");
        a.sealed(&slot, Some(kept));
        let size = kept.size;
        assert_eq!(size, data.len() as u64);
        assert!(kept.new);
        // Charged to its uploader in the database, where any node of the group sees it.
        assert_eq!(a.charged("k").expect("charged"), size);
        let mut db = target.connect("test").expect("connect");
        let pieces = "SELECT COUNT(*) FROM blob_chunks WHERE digest = $1";
        assert_eq!(count(&mut db, pieces, &digest), 4);
        assert_eq!(
            count(&mut db, "SELECT size FROM blobs WHERE digest = $1", &digest),
            data.len() as i64
        );

        // Another node (a standby that took over) has no file, and serves it all the same.
        let b = Blobs::open(dir_b.path())
            .and_then(|b| b.with_postgres(target.clone()))
            .expect("b");
        assert_eq!(
            b.progress(&Slot::new(digest, "k")).expect("progress"),
            Some(Progress::Complete { size })
        );
        assert_eq!(
            b.begin(&Slot::new(digest, "k"), size).expect("begin"),
            Progress::Complete { size },
            "not uploaded again"
        );
        assert_eq!(b.size(&digest).expect("size"), Some(size));
        // Ranges across a piece's end, at a piece's start, at the very end, and all of it
        // from an unaligned start.
        let at = PG_CHUNK_BYTES as u64 - 10;
        for (offset, max) in [(at, 100), (PG_CHUNK_BYTES as u64, 5), (size - 3, 1 << 20)] {
            let (got_size, bytes) = b.read(&digest, offset, max).expect("range");
            assert_eq!(got_size, size);
            let end = (offset as usize + max).min(data.len());
            assert!(bytes == data[offset as usize..end], "range {offset}+{max}");
        }
        let mut back = data[..1000].to_vec();
        while back.len() < data.len() {
            let (_, bytes) = b.read(&digest, back.len() as u64, 1 << 20).expect("read");
            assert!(!bytes.is_empty());
            back.extend(bytes);
        }
        assert!(back == data);
        assert_eq!(b.read(&digest, size, 10).expect("end").1, Vec::<u8>::new());
        assert!(matches!(
            b.read(&digest, size + 1, 10),
            Err(BlobError::Range { .. })
        ));
        assert!(matches!(
            b.read(&digest_of(b"nothing"), 0, 10),
            Err(BlobError::NotFound(_))
        ));

        // A resumed upload whose bytes do not match: the copy is rolled back, nothing stays.
        let wrong = digest_of(b"not these bytes");
        a.begin(&Slot::new(wrong, "k"), data.len() as u64)
            .expect("begin");
        a.write_chunk(&Slot::new(wrong, "k"), 0, &data[..256 << 10])
            .expect("chunk");
        let a = Blobs::open(dir_a.path())
            .and_then(|b| b.with_postgres(target.clone()))
            .expect("a again");
        let mut last = None;
        for (i, piece) in data.chunks(256 << 10).enumerate().skip(1) {
            last = Some(a.write_chunk(&Slot::new(wrong, "k"), (i * (256 << 10)) as u64, piece));
        }
        assert!(matches!(
            last,
            Some(Ok(Progress::Sealing {
                verified: false,
                ..
            }))
        ));
        assert!(matches!(
            a.seal_here(&Slot::new(wrong, "k"), false),
            Err(BlobError::DigestMismatch { .. })
        ));
        assert_eq!(count(&mut db, pieces, &wrong), 0);
        assert_eq!(a.progress(&Slot::new(wrong, "k")).expect("gone"), None);

        // The empty content: a row and no piece.
        let empty = digest_of(b"");
        assert_eq!(
            a.begin(&Slot::new(empty, "k"), 0).expect("empty"),
            Progress::Complete { size: 0 }
        );
        assert_eq!(b.read(&empty, 0, 10).expect("empty").0, 0);

        // Deletions are fenced: a node whose lease moved deletes nothing.
        let fenced = Blobs::open(dir_b.path())
            .and_then(|b| b.with_postgres(PgBlobTarget::new(&pg, &group, Some(7))))
            .expect("fenced");
        assert!(matches!(
            fenced.retain(Duration::ZERO, SystemTime::now(), |_| false),
            Err(BlobError::Store(StoreError::Fenced { .. }))
        ));
        // Retention deletes the rows of what no message carries, and the cache file.
        db.execute(
            "INSERT INTO messages (seq, id, time_us, sender, body, kind, attachment_sha256)
             VALUES (1, $1, 0, 'alice', '{}', 'message', $2)",
            &[&[7u8; 16].as_slice(), &empty.as_bytes().as_slice()],
        )
        .expect("a message carrying the empty content");
        assert_eq!(
            b.retain(Duration::from_secs(3600), SystemTime::now(), |_| false)
                .expect("young"),
            0
        );
        // The query spares what a message carries, before `keep` is asked.
        assert_eq!(
            b.retain(Duration::ZERO, SystemTime::now(), |_| false)
                .expect("retain"),
            1
        );
        // The other node's cache file goes at its next sweep.
        assert_eq!(
            a.retain(Duration::ZERO, SystemTime::now(), |d| *d == empty)
                .expect("cache"),
            1
        );
        assert_eq!(count(&mut db, pieces, &digest), 0);
        assert_eq!(b.size(&digest).expect("gone"), None);
        assert_eq!(a.size(&digest).expect("gone"), None);
        assert_eq!(b.size(&empty).expect("kept"), Some(0));

        // A blob sealed before blobs were kept in the database is copied in once.
        let old = Blobs::open(dir_b.path()).expect("files only");
        let Progress::Sealing { verified, .. } = upload_all(&old, &digest, &data) else {
            panic!("sealing");
        };
        old.seal_here(&Slot::new(digest, "k"), verified)
            .expect("seal");
        let mut slot = None;
        let layout = old.layout();
        let copy = |slot: &mut Option<Client>| {
            target.with(slot, "seal", |c| {
                backfill(&layout, c, target.gid(), &digest)
            })
        };
        assert_eq!(local_blobs(&layout).expect("list"), vec![digest]);
        assert!(copy(&mut slot).expect("copied"));
        assert!(!copy(&mut slot).expect("there already"));
        assert_eq!(count(&mut db, pieces, &digest), 4);
    }
}
