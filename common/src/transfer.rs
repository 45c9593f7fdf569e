//! Windowed uploads: several `upload_chunk`s in flight on one DEALER, under the node's credit
//! window (PROTOCOL §6.9; the zguide's chapter 7 file transfer). A REQ socket would wait a
//! whole round trip per chunk; here the next chunks are on the wire while the node writes
//! the first.
//!
//! The file is read one chunk at a time, so at most `window` chunks are in memory.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use agora_proto::action::call;
use agora_proto::codec::{decode_reply, encode_call_data};
use agora_proto::wire::{GroupName, Sha256Digest, UploadChunkRequest, UploadReply, UserName};

use crate::client::{ClientCurve, ClientError, MAX_REPLY_BYTES};

/// Where and as whom to upload.
#[derive(Debug, Clone)]
pub struct UploadTarget {
    /// The node's endpoint.
    pub endpoint: String,
    /// CURVE towards it (`None` on an `--insecure` node).
    pub curve: Option<ClientCurve>,
    /// The group, checked by the node.
    pub group: Option<GroupName>,
    /// The caller's name.
    pub user: UserName,
}

/// Sends `source`'s bytes from `from` to the end (`size`) as chunks of `chunk_bytes`, with
/// up to `window` in flight, and calls `progress` with the bytes the node holds after each
/// reply. Returns the last reply (`complete` once the node verified the digest).
///
/// # Errors
/// [`ClientError::Timeout`] when a reply takes longer than `timeout`; the node's refusal
/// ([`ClientError::Server`], such as `bad_offset` after a node restart: ask `upload` where to
/// resume); [`ClientError::Zmq`]; [`ClientError::Read`] when reading `source` fails.
#[allow(clippy::too_many_arguments)] // the upload's whole description, no more
pub fn upload_windowed<R: Read + Seek>(
    ctx: &zmq::Context,
    target: &UploadTarget,
    sha256: Sha256Digest,
    source: &mut R,
    size: u64,
    from: u64,
    chunk_bytes: usize,
    window: u32,
    timeout: Duration,
    mut progress: impl FnMut(u64),
) -> Result<UploadReply, ClientError> {
    let socket = ctx.socket(zmq::DEALER)?;
    socket.set_linger(0)?;
    socket.set_maxmsgsize(MAX_REPLY_BYTES)?;
    if let Some(curve) = &target.curve {
        socket.set_curve_serverkey(curve.server_key.as_bytes())?;
        socket.set_curve_publickey(curve.keypair.public.as_bytes())?;
        socket.set_curve_secretkey(curve.keypair.secret_bytes())?;
    }
    socket.connect(&target.endpoint)?;
    let chunk_bytes = chunk_bytes.max(1);
    let window = usize::try_from(window.max(1)).unwrap_or(1);
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let mut next = from;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut last = None;
    source
        .seek(SeekFrom::Start(from))
        .map_err(ClientError::Read)?;
    loop {
        while in_flight.len() < window && next < size {
            let len = usize::try_from((size - next).min(chunk_bytes as u64)).unwrap_or(chunk_bytes);
            let mut bytes = vec![0u8; len];
            source.read_exact(&mut bytes).map_err(ClientError::Read)?;
            let request = UploadChunkRequest {
                group: target.group.clone(),
                user: target.user.clone(),
                sha256,
                offset: next,
            };
            let frames = encode_call_data::<call::UploadChunk>(&request, bytes);
            // A DEALER adds the empty delimiter a REQ would.
            socket.send_multipart(std::iter::once(Vec::new()).chain(frames), 0)?;
            in_flight.push_back(next);
            next += len as u64;
        }
        if in_flight.is_empty() {
            return last.ok_or(ClientError::Timeout {
                endpoint: target.endpoint.clone(),
                waited: Duration::ZERO,
            });
        }
        if socket.poll(zmq::POLLIN, timeout_ms)? == 0 {
            return Err(ClientError::Timeout {
                endpoint: target.endpoint.clone(),
                waited: timeout,
            });
        }
        let frames = socket.recv_multipart(0)?;
        let reply = decode_reply::<UploadReply>(frames.get(1..).unwrap_or_default())??;
        in_flight.pop_front();
        progress(reply.have);
        if reply.complete {
            return Ok(reply);
        }
        last = Some(reply);
    }
}
