//! `upload`, `upload_chunk`, `upload_status`, `download`: attachments' bytes, members only
//! (PROTOCOL §6.9). Membership is checked before the digest is looked at, so that in a
//! private group an outsider learns nothing, not even whether a content exists. An upload
//! in progress belongs to the key that declared it ([`Slot`]): the first three actions
//! act on the caller's own upload of the digest, never on another member's.

use agora_proto::wire::{
    DownloadReply, DownloadRequest, ErrorCode, Sha256Digest, UploadChunkRequest, UploadReply,
    UploadRequest, UploadStatusRequest, UserName, WireError, CHUNK_BYTES, MAX_CHUNK_BYTES,
    UPLOAD_WINDOW,
};

use super::Ctx;
use crate::group::blobs::{BlobError, Progress, Slot};
use crate::store::GroupLog;

/// # Errors
/// `not_member`, `too_large` (over `--max-file-bytes`), `limit_reached`
/// (the caller's unfinished uploads and kept contents would pass `--upload-quota`, or it
/// has `--max-uploads-per-member` unfinished uploads already),
/// `storage_full` (the disk would go below `--disk-reserve-bytes`), `invalid_field`
/// (`size` differs from the caller's upload of the same digest in progress), `internal`.
pub fn upload<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: UploadRequest,
) -> Result<UploadReply, WireError> {
    members_only(ctx, &r.user)?;
    let slot = slot(ctx, r.sha256, &r.user);
    if r.size > ctx.config.max_file_bytes {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "size: {} bytes; this node takes files of at most {} bytes",
                r.size, ctx.config.max_file_bytes
            ),
        ));
    }
    let progress = ctx.blobs.begin(&slot, r.size).map_err(blob_error)?;
    // Complete but not sealed before a restart: sealed now, off the loop.
    Ok(sealing_reply(ctx, slot, progress))
}

/// # Errors
/// `not_member`, `too_large` (a chunk over 1 MiB), `bad_offset`, `not_found`
/// (the caller declared no upload of the digest), `invalid_field` (past the declared size),
/// `storage_full`, `digest_mismatch`, `internal`.
pub fn upload_chunk<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: UploadChunkRequest,
    data: &[u8],
) -> Result<UploadReply, WireError> {
    members_only(ctx, &r.user)?;
    if data.len() > MAX_CHUNK_BYTES {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!("a chunk of {} bytes; at most {MAX_CHUNK_BYTES}", data.len()),
        ));
    }
    // Every chunk received, before it is stored or refused: what a resumed transfer sent
    // again is counted from these (RUST_LOG=agora::transfer=debug).
    tracing::debug!(
        target: "agora::transfer",
        digest = %r.sha256,
        offset = r.offset,
        len = data.len(),
        "upload chunk"
    );
    let slot = slot(ctx, r.sha256, &r.user);
    let progress = ctx
        .blobs
        .write_chunk(&slot, r.offset, data)
        .map_err(blob_error)?;
    // The last chunk: sealed off the loop.
    Ok(sealing_reply(ctx, slot, progress))
}

/// # Errors
/// `not_member`, `not_found` (neither a content nor the caller's upload of
/// it), `internal`.
pub fn upload_status<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: UploadStatusRequest,
) -> Result<UploadReply, WireError> {
    members_only(ctx, &r.user)?;
    let slot = slot(ctx, r.sha256, &r.user);
    match ctx.blobs.progress(&slot).map_err(blob_error)? {
        Some(progress) => Ok(reply(r.sha256, progress)),
        None => Err(not_found(&r.sha256)),
    }
}

/// The reply and the bytes for its data frame.
///
/// # Errors
/// `not_member`, `not_found` (no complete content: a partial upload is never
/// served), `invalid_field` (`offset` past the end, `length` 0), `internal`.
pub fn download<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: DownloadRequest,
) -> Result<(DownloadReply, Vec<u8>), WireError> {
    members_only(ctx, &r.user)?;
    let max = match r.length {
        Some(0) => {
            return Err(WireError::new(
                ErrorCode::InvalidField,
                "length: must be at least 1",
            ))
        }
        Some(n) => usize::try_from(n)
            .unwrap_or(MAX_CHUNK_BYTES)
            .min(MAX_CHUNK_BYTES),
        None => MAX_CHUNK_BYTES,
    };
    // From the local file, or (a node that was a standby when it was sent) the shared store.
    let (size, bytes) = match ctx.blobs.read(&r.sha256, r.offset, max) {
        Err(BlobError::NotFound(_)) => return Err(not_found(&r.sha256)),
        other => other.map_err(blob_error)?,
    };
    tracing::debug!(
        target: "agora::transfer",
        digest = %r.sha256,
        offset = r.offset,
        len = bytes.len(),
        "download range"
    );
    Ok((
        DownloadReply {
            sha256: r.sha256,
            size,
            offset: r.offset,
            length: bytes.len() as u64,
        },
        bytes,
    ))
}

/// The caller's upload of `digest`: its slot, keyed by the caller's principal (its key; on an
/// `--insecure` node, its name).
fn slot<S: GroupLog + ?Sized>(ctx: &Ctx<'_, S>, digest: Sha256Digest, user: &UserName) -> Slot {
    Slot::new(digest, ctx.caller(user).principal.as_str())
}

fn members_only<S: GroupLog + ?Sized>(ctx: &Ctx<'_, S>, user: &UserName) -> Result<(), WireError> {
    ctx.require_member(&ctx.caller(user)).map(|_| ())
}

/// The reply of an upload at `progress`; when this request completed the upload
/// ([`Progress::Sealing`] with `start`), the content is handed to the loop to be sealed off
/// it (`ctx.sealing`), and the reply waits for the seal.
fn sealing_reply<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    slot: Slot,
    progress: Progress,
) -> UploadReply {
    let sha256 = slot.digest;
    if let Progress::Sealing {
        verified,
        start: true,
        ..
    } = progress
    {
        ctx.sealing.push((slot, verified));
    }
    reply(sha256, progress)
}

/// The reply of an upload at `progress`.
pub fn reply(sha256: Sha256Digest, progress: Progress) -> UploadReply {
    let (have, size, complete) = match progress {
        Progress::Partial { have, size } => (have, size, false),
        Progress::Sealing { size, .. } => (size, size, false),
        Progress::Complete { size } => (size, size, true),
    };
    UploadReply {
        sha256,
        size,
        have,
        complete,
        chunk_bytes: CHUNK_BYTES as u64,
        window: UPLOAD_WINDOW,
    }
}

fn not_found(digest: &Sha256Digest) -> WireError {
    WireError::new(ErrorCode::NotFound, format!("no content {digest} here"))
}

/// The wire error of a blob store failure.
pub fn blob_error(e: BlobError) -> WireError {
    let code = match &e {
        BlobError::BadOffset { .. } => ErrorCode::BadOffset,
        BlobError::DigestMismatch { .. } => ErrorCode::DigestMismatch,
        BlobError::NoUpload(_) | BlobError::NotFound(_) => ErrorCode::NotFound,
        BlobError::Quota { .. } | BlobError::TooManyUploads { .. } => ErrorCode::LimitReached,
        BlobError::StorageFull { .. } => {
            tracing::warn!(error = %e, "upload refused: the disk is at its reserve");
            ErrorCode::StorageFull
        }
        BlobError::PastEnd { .. } | BlobError::SizeConflict { .. } | BlobError::Range { .. } => {
            ErrorCode::InvalidField
        }
        BlobError::Io(_) | BlobError::Store(_) => {
            tracing::error!(error = %e, "blob store failed");
            return WireError::new(
                ErrorCode::Internal,
                "storage failure; nothing was stored; retry later",
            );
        }
    };
    WireError::new(code, e.to_string())
}
