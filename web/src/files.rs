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
//!
//! Before an upload's body is read, the gateway takes one of the identity's and one of the
//! client address's upload slots ([`Uploads`]: a few at once for each) and asks the group's
//! node whether the caller is a member ([`check_member`]); the spool's bytes are bounded in
//! all, per identity and per address.

use std::collections::HashMap;
use std::io::{Seek, Write};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use agora_common::client::{ClientCurve, ClientError, HostClient};
use agora_common::transfer::UploadTarget;
use agora_proto::id::MessageId;
use agora_proto::wire::{
    Attachment, GroupName, HistoryQuery, Message, SendAck, Sha256Digest, UserName, MAX_CHUNK_BYTES,
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
) -> Result<(HostClient, UploadTarget), ClientError> {
    let entry = federation.registry_client(ctx, identity).lookup(group)?;
    let curve = entry.public_key.map(|key| ClientCurve {
        keypair: identity.keypair.clone(),
        server_key: key,
    });
    // One request's client: every call names the group (its host may serve several).
    let mut client = HostClient::new(
        ctx,
        entry.endpoint.as_str(),
        identity.user.clone(),
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

/// Whether `identity` may upload to `group`: the group is registered and its node counts
/// the caller as a member. One registry lookup and one empty history page (the page after
/// the last seq, which only members may read). Blocking: run it off the async runtime.
///
/// # Errors
/// The registry's or node's refusal: `unknown_group`, `not_member`, `banned`; a timeout.
pub fn check_member(
    federation: &Federation,
    identity: &Identity,
    group: &GroupName,
) -> Result<(), FileError> {
    let ctx = federation.contexts.take();
    let (mut client, _) = node(ctx.context(), federation, identity, group)?;
    client
        .group(group)
        .get_messages(HistoryQuery::AfterSeq(u64::MAX), Some(1))?;
    Ok(())
}

/// Uploads in progress: at most `per_identity` at once for one identity and `per_address`
/// for one client address (by [`crate::auth::bucket`]), and at most `spool_bytes` bytes
/// spooled at once in all (half of that for one identity, or one address). The maps hold
/// only identities and addresses with an upload in progress.
#[derive(Debug)]
pub struct Uploads {
    per_identity: usize,
    per_address: usize,
    spool_bytes: u64,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// Per identity: uploads in progress and the bytes they spooled.
    by_identity: HashMap<UserName, (usize, u64)>,
    /// The same per client address.
    by_address: HashMap<IpAddr, (usize, u64)>,
    /// Bytes spooled in all.
    spooled: u64,
}

/// Why an upload may not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadRefusal {
    /// The identity, or the client address, has its most uploads in progress (HTTP 429).
    Busy,
    /// The spool, or the identity's or the address's share of it, is full (HTTP 507).
    SpoolFull,
}

/// Takes one from a count and `bytes` from its bytes, dropping the entry at zero.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, (usize, u64)>, key: &K, bytes: u64) {
    if let Some((count, held)) = map.get_mut(key) {
        *count = count.saturating_sub(1);
        *held = held.saturating_sub(bytes);
        if *count == 0 {
            map.remove(key);
        }
    }
}

impl Uploads {
    /// At most `per_identity` uploads at once per identity and `per_address` per client
    /// address (each at least 1), and `spool_bytes` bytes spooled in all.
    pub fn new(per_identity: usize, per_address: usize, spool_bytes: u64) -> Uploads {
        Uploads {
            per_identity: per_identity.max(1),
            per_address: per_address.max(1),
            spool_bytes,
            held: Mutex::default(),
        }
    }

    /// One of `user`'s and one of `address`'s upload slots, released when the
    /// [`UploadSlot`] drops.
    ///
    /// # Errors
    /// [`UploadRefusal::Busy`].
    pub fn start(
        self: &Arc<Self>,
        user: &UserName,
        address: IpAddr,
    ) -> Result<UploadSlot, UploadRefusal> {
        let address = crate::auth::bucket(address);
        let mut held = self.held.lock().map_err(|_| UploadRefusal::Busy)?;
        let mine = held.by_identity.get(user).map_or(0, |(n, _)| *n);
        let here = held.by_address.get(&address).map_or(0, |(n, _)| *n);
        if mine >= self.per_identity || here >= self.per_address {
            return Err(UploadRefusal::Busy);
        }
        held.by_identity.entry(user.clone()).or_default().0 += 1;
        held.by_address.entry(address).or_default().0 += 1;
        Ok(UploadSlot {
            uploads: Arc::clone(self),
            user: user.clone(),
            address,
            bytes: 0,
        })
    }
}

/// An upload in progress: its identity's and its address's slots and the spool bytes it
/// holds.
#[derive(Debug)]
pub struct UploadSlot {
    uploads: Arc<Uploads>,
    user: UserName,
    address: IpAddr,
    bytes: u64,
}

impl UploadSlot {
    /// Holds `total` spool bytes for this upload in all (no change when it holds that much
    /// already).
    ///
    /// # Errors
    /// [`UploadRefusal::SpoolFull`]: the spool, or the identity's or the address's half of
    /// it, is full.
    pub fn hold(&mut self, total: u64) -> Result<(), UploadRefusal> {
        let more = total.saturating_sub(self.bytes);
        if more == 0 {
            return Ok(());
        }
        let mut held = self
            .uploads
            .held
            .lock()
            .map_err(|_| UploadRefusal::SpoolFull)?;
        let half = self.uploads.spool_bytes / 2;
        let mine = held.by_identity.get(&self.user).map_or(0, |(_, b)| *b);
        let here = held.by_address.get(&self.address).map_or(0, |(_, b)| *b);
        if held.spooled.saturating_add(more) > self.uploads.spool_bytes
            || mine.saturating_add(more) > half
            || here.saturating_add(more) > half
        {
            return Err(UploadRefusal::SpoolFull);
        }
        held.spooled += more;
        if let Some((_, b)) = held.by_identity.get_mut(&self.user) {
            *b += more;
        }
        if let Some((_, b)) = held.by_address.get_mut(&self.address) {
            *b += more;
        }
        self.bytes = total;
        Ok(())
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        if let Ok(mut held) = self.uploads.held.lock() {
            held.spooled = held.spooled.saturating_sub(self.bytes);
            release(&mut held.by_identity, &self.user, self.bytes);
            release(&mut held.by_address, &self.address, self.bytes);
        }
    }
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
        || client.group(group).upload(sha256, size),
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
    Ok(client
        .group(group)
        .send_attachment(attachment, caption, MessageId::new_v7())?)
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
    let page = client
        .group(group)
        .get_messages(HistoryQuery::AfterSeq(seq.saturating_sub(1)), Some(1))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_bounded_per_identity_and_the_spool_in_all_and_slots_come_back() {
        let uploads = Arc::new(Uploads::new(2, 100, 1000));
        let (alice, bob): (UserName, UserName) =
            ("alice".parse().expect("name"), "bob".parse().expect("name"));
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let mut a1 = uploads.start(&alice, a).expect("first");
        let a2 = uploads.start(&alice, a).expect("second");
        assert_eq!(uploads.start(&alice, b).err(), Some(UploadRefusal::Busy));
        let mut b1 = uploads.start(&bob, b).expect("another identity");
        a1.hold(400).expect("400");
        assert_eq!(
            a1.hold(600),
            Err(UploadRefusal::SpoolFull),
            "past alice's half"
        );
        b1.hold(500).expect("bob's half");
        let mut b2 = uploads.start(&bob, b).expect("bob's second");
        assert_eq!(
            b2.hold(200),
            Err(UploadRefusal::SpoolFull),
            "past the spool"
        );
        drop((a1, a2));
        b2.hold(0).expect("nothing");
        let _again = uploads.start(&alice, a).expect("a slot came back");
        drop((b1, b2));
        let held = uploads.held.lock().expect("lock");
        assert_eq!(held.spooled, 0);
        assert_eq!(held.by_identity.len(), 1, "only alice's live upload");
        assert_eq!(held.by_address.len(), 1, "only its address");
    }

    #[test]
    fn one_address_is_bounded_whatever_the_identities_it_uses() {
        let uploads = Arc::new(Uploads::new(4, 3, 1000));
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let same_64: IpAddr = "2001:db8::2".parse().expect("ip");
        let names: Vec<UserName> = ["u1", "u2", "u3", "u4"]
            .iter()
            .map(|n| n.parse().expect("name"))
            .collect();
        let mut slots: Vec<UploadSlot> = names[..3]
            .iter()
            .map(|n| uploads.start(n, a).expect("a slot"))
            .collect();
        assert_eq!(
            uploads.start(&names[3], same_64).err(),
            Some(UploadRefusal::Busy),
            "a fourth identity on the same /64"
        );
        slots[0].hold(300).expect("300");
        slots[1].hold(200).expect("200");
        assert_eq!(
            slots[2].hold(1),
            Err(UploadRefusal::SpoolFull),
            "past the address's half"
        );
        slots.pop();
        let _other = uploads
            .start(&names[3], "10.0.0.9".parse().expect("ip"))
            .expect("another address");
    }
}
