//! Attachments over HTTP: the page uploads a file's bytes as a request body and downloads a
//! message's file by its seq; the gateway moves them to and from the group's node with the
//! windowed transfers of `common::transfer` (PROTOCOL §6.9), as user-cli does.
//!
//! - `POST /files/GROUP?name=N&type=T[&caption=C]`: the body is the file. The gateway
//!   stores it in a temporary file while hashing it (SHA-256), uploads it, and sends the
//!   message; the answer is the send's ack as JSON (`{"ok": true, "ack": …}`). Memory stays
//!   at one chunk window whatever the size.
//! - `GET /files/GROUP/SEQ`: the file message SEQ carries, streamed as the node serves it
//!   (`Content-Type` its media type; raster images inline, everything else as an
//!   attachment download). The bytes are hashed on the way; a mismatch aborts the response.

use std::io::{Seek, Write};

use agora_common::client::{ClientCurve, ClientError, GroupClient};
use agora_common::transfer::UploadTarget;
use agora_proto::id::MessageId;
use agora_proto::wire::{
    Attachment, GroupName, HistoryQuery, Message, SendAck, Sha256Digest, MAX_CHUNK_BYTES,
    UPLOAD_WINDOW,
};
use sha2::Digest;

use crate::bridge::{Federation, Identity};

/// Media types shown inline in the page; any other is served as a download (an SVG or
/// HTML file could carry script).
pub const INLINE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// Why a file could not be moved, with the wire error code the page shows.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The federation refused or failed.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// The request was wrong (`invalid_field`), or the message carries no file
    /// (`not_found`).
    #[error("{1}")]
    Request(&'static str, String),
    /// The gateway's disk failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl FileError {
    /// The code for the page: the protocol's (PROTOCOL §7), or `timeout`, `internal`.
    pub fn code(&self) -> &str {
        match self {
            FileError::Client(ClientError::Server(w)) => w.code.as_str(),
            FileError::Client(ClientError::Timeout { .. }) => "timeout",
            FileError::Request(code, _) => code,
            _ => "internal",
        }
    }
}

fn node(
    ctx: &zmq::Context,
    federation: &Federation,
    identity: &Identity,
    group: &GroupName,
) -> Result<(GroupClient, UploadTarget), ClientError> {
    let entry = federation.registry_client(ctx, identity).lookup(group)?;
    let curve = entry.public_key.map(|key| ClientCurve {
        keypair: identity.keypair.clone(),
        server_key: key,
    });
    let mut client = GroupClient::new(
        ctx,
        entry.endpoint.as_str(),
        identity.user.clone(),
        Some(group.clone()),
        federation.options(),
    );
    if let Some(curve) = &curve {
        client = client.with_curve(curve.clone());
    }
    let target = UploadTarget {
        endpoint: entry.endpoint.as_str().to_owned(),
        curve,
        group: Some(group.clone()),
        user: identity.user.clone(),
    };
    Ok((client, target))
}

/// Hashes a file the gateway holds: its SHA-256 and size.
///
/// # Errors
/// Reading fails.
pub fn hash(file: &mut std::fs::File) -> std::io::Result<(Sha256Digest, u64)> {
    file.rewind()?;
    let mut hasher = sha2::Sha256::new();
    let size = std::io::copy(file, &mut HashWriter(&mut hasher))?;
    Ok((Sha256Digest::from_bytes(hasher.finalize().into()), size))
}

struct HashWriter<'a>(&'a mut sha2::Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Uploads `file` (whole, already written) to `group`'s node and sends it as a message
/// with `caption`. Blocking: run it off the async runtime.
///
/// # Errors
/// [`FileError::Request`] for a bad name or media type (`invalid_field`); the node's
/// refusals (`not_member`, `too_large`); [`FileError::Io`].
pub fn put(
    federation: &Federation,
    identity: &Identity,
    group: &GroupName,
    file: &mut std::fs::File,
    name: String,
    media_type: String,
    caption: Option<String>,
) -> Result<SendAck, FileError> {
    let (sha256, size) = hash(file)?;
    let attachment = Attachment {
        sha256,
        size,
        name,
        media_type,
    };
    attachment
        .validate()
        .map_err(|e| FileError::Request("invalid_field", e))?;
    let ctx = federation.contexts.take();
    let (mut client, target) = node(ctx.context(), federation, identity, group)?;
    agora_common::transfer::put(
        ctx.context(),
        &target,
        sha256,
        size,
        file,
        federation.timeout,
        || client.upload(sha256, size),
        |_| {},
    )
    .map_err(|e| match e {
        agora_common::transfer::PutError::Ask(e) | agora_common::transfer::PutError::Send(e) => {
            FileError::Client(e)
        }
        agora_common::transfer::PutError::Sealing => {
            FileError::Request("timeout", "the node is still sealing the file".into())
        }
        other => FileError::Request("digest_mismatch", other.to_string()),
    })?;
    let caption = match caption {
        Some(text) => serde_json::json!(text).to_string(),
        None => "null".to_owned(),
    };
    let caption = serde_json::value::RawValue::from_string(caption)
        .map_err(|e| FileError::Request("invalid_field", e.to_string()))?;
    Ok(client.send_attachment(attachment, caption, MessageId::new_v7())?)
}

/// The file message `seq` of `group` carries.
///
/// # Errors
/// [`FileError::Request`] `not_found` when there is no such message or it carries no file;
/// the node's refusals.
pub fn find(
    federation: &Federation,
    identity: &Identity,
    group: &GroupName,
    seq: u64,
) -> Result<(Attachment, UploadTarget), FileError> {
    let ctx = federation.contexts.take();
    let (mut client, target) = node(ctx.context(), federation, identity, group)?;
    let page = client.get_messages(HistoryQuery::AfterSeq(seq.saturating_sub(1)), Some(1))?;
    let message: Option<Message> = page.messages.into_iter().find(|m| m.seq == seq);
    let attachment = message
        .and_then(|m| m.attachment)
        .ok_or_else(|| FileError::Request("not_found", format!("no file at #{seq}")))?;
    Ok((attachment, target))
}

/// Streams `attachment` from the node into `sink`, range by range, checking its SHA-256 at
/// the end. Blocking: run it off the async runtime.
///
/// # Errors
/// The node's refusals; [`FileError::Request`] `digest_mismatch` when the bytes do not
/// hash to the attachment's digest; a `sink` failure (the reader went away) as
/// [`ClientError::Read`].
pub fn get(
    federation: &Federation,
    target: &UploadTarget,
    attachment: &Attachment,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<(), FileError> {
    let mut hasher = sha2::Sha256::new();
    let ctx = federation.contexts.take();
    agora_common::transfer::download_windowed(
        ctx.context(),
        target,
        attachment.sha256,
        attachment.size,
        0,
        MAX_CHUNK_BYTES as u64,
        UPLOAD_WINDOW,
        federation.timeout,
        |_, bytes| {
            hasher.update(bytes);
            sink(bytes)
        },
    )?;
    if Sha256Digest::from_bytes(hasher.finalize().into()) != attachment.sha256 {
        return Err(FileError::Request(
            "digest_mismatch",
            "the node's bytes do not match the file's digest".into(),
        ));
    }
    Ok(())
}
