//! Windowed transfers: several `upload_chunk`s, or `download` ranges, in flight on one
//! DEALER, under the node's credit window (PROTOCOL §6.9; the zguide's chapter 7 file
//! transfer). A REQ socket would wait a whole round trip per chunk; here the next chunks are
//! on the wire while the node handles the first. The node answers one connection's requests
//! in order, so replies arrive in the order they were asked.
//!
//! At most `window` chunks are in memory at either end.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use agora_proto::action::call;
use agora_proto::codec::{decode_reply, decode_reply_data, encode_call, encode_call_data};
use agora_proto::wire::{
    DownloadReply, DownloadRequest, GroupName, Sha256Digest, UploadChunkRequest, UploadReply,
    UserName,
};

use crate::client::{ClientCurve, ClientError, MAX_REPLY_BYTES};

/// Why [`put`] did not leave the content complete on the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PutError<E> {
    /// Asking the node where the upload stands (`upload`) failed.
    #[error(transparent)]
    Ask(E),
    /// Sending the chunks failed (a timeout, the node's refusal, reading the source).
    #[error(transparent)]
    Send(ClientError),
    /// Every byte was sent, but the node's seal failed (a resumed upload whose bytes did not
    /// match the digest) and discarded them: run again.
    #[error("the node holds {have} of {size} bytes after the upload; run again")]
    Incomplete {
        /// The bytes the node holds now.
        have: u64,
        /// The content's size.
        size: u64,
    },
    /// The node is still sealing the content after the timeout: ask again later.
    #[error("the content is still being sealed; run again")]
    Sealing,
}

/// The slowest a node's seal is expected to go, in bytes per second (16 MiB/s): how long
/// [`put`] waits for a seal beyond its timeout grows with the file (4 GiB: 256 s more).
pub const SEAL_BYTES_PER_SEC: u64 = 16 << 20;

/// Leaves the content `sha256` (`size` bytes, read from `source`) complete on the node: asks
/// where the upload stands with `ask` (the `upload` request, PROTOCOL §6.9), sends what is
/// missing with [`upload_windowed`], asks again after a `bad_offset` (a node restart) or an
/// unanswered chunk (twice at most, resuming where the node stands; an unanswered last
/// chunk whose bytes are all there is a seal still running), and waits out the node's seal
/// for up to `timeout` plus the file's size at [`SEAL_BYTES_PER_SEC`]. `progress` gets the
/// bytes the node holds after each chunk's reply.
///
/// # Errors
/// [`PutError::Ask`] with `ask`'s error; [`PutError::Send`]; [`PutError::Incomplete`];
/// [`PutError::Sealing`].
#[allow(clippy::too_many_arguments)] // the upload's whole description, no more
pub fn put<R: Read + Seek, E>(
    ctx: &zmq::Context,
    target: &UploadTarget,
    sha256: Sha256Digest,
    size: u64,
    source: &mut R,
    timeout: Duration,
    mut ask: impl FnMut() -> Result<UploadReply, E>,
    mut progress: impl FnMut(u64),
) -> Result<(), PutError<E>> {
    let start = ask().map_err(PutError::Ask)?;
    let mut complete = start.complete;
    if !complete && start.have < size {
        let mut from = start.have;
        let mut tries = 0;
        while from < size {
            let sent = upload_windowed(
                ctx,
                target,
                sha256,
                source,
                size,
                from,
                usize::try_from(start.chunk_bytes).unwrap_or(256 << 10),
                start.window,
                timeout,
                &mut progress,
            );
            match sent {
                Ok(last) => {
                    complete = last.complete;
                    break;
                }
                Err(ClientError::Server(w))
                    if w.code == agora_proto::wire::ErrorCode::BadOffset && tries < 2 =>
                {
                    tries += 1;
                    let now = ask().map_err(PutError::Ask)?;
                    complete = now.complete;
                    from = now.have;
                }
                Err(e @ ClientError::Timeout { .. }) => {
                    // The last chunk's reply waits for the seal, which can outlast the timeout
                    // (a large file copied into the node's database): every byte may be
                    // there already. Otherwise a slow reply mid-stream: resume where the node
                    // stands, as after `bad_offset`.
                    let now = ask().map_err(PutError::Ask)?;
                    if now.complete || now.have >= size {
                        complete = now.complete;
                        break;
                    }
                    if tries >= 2 {
                        return Err(PutError::Send(e));
                    }
                    tries += 1;
                    from = now.have;
                }
                Err(e) => return Err(PutError::Send(e)),
            }
        }
    }
    // Every byte is at the node; until its seal ends `upload` answers `have == size` without
    // `complete` (a seal resumed after a restart, or another upload's). A seal reads the
    // whole file (and, with a PostgreSQL store, copies it into the database): allow it
    // [`SEAL_BYTES_PER_SEC`] on top of the timeout.
    let allowance = Duration::from_secs(size / SEAL_BYTES_PER_SEC);
    let deadline = Instant::now() + timeout + allowance;
    while !complete {
        let now = ask().map_err(PutError::Ask)?;
        complete = now.complete;
        if !complete && now.have < size {
            return Err(PutError::Incomplete {
                have: now.have,
                size,
            });
        }
        if !complete && Instant::now() >= deadline {
            return Err(PutError::Sealing);
        }
        if !complete {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

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
/// reply. Returns the last reply (`complete` once the node verified the digest). There must
/// be something to send (`from < size`): an upload whose bytes are all there is complete, or
/// being sealed, and is asked about with `upload`.
///
/// # Errors
/// [`ClientError::Read`] with [`std::io::ErrorKind::InvalidInput`] when `from >= size`;
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
    if from >= size {
        return Err(ClientError::Read(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("nothing to send: the upload starts at {from} of {size} bytes"),
        )));
    }
    let socket = dealer(ctx, target)?;
    let chunk_bytes = chunk_bytes.max(1);
    let window = usize::try_from(window.max(1)).unwrap_or(1);
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let mut next = from;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
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
        if reply.complete || (in_flight.is_empty() && next >= size) {
            return Ok(reply);
        }
    }
}

/// A DEALER connected to `target`'s node (over CURVE when it has keys).
fn dealer(ctx: &zmq::Context, target: &UploadTarget) -> Result<zmq::Socket, ClientError> {
    let socket = ctx.socket(zmq::DEALER)?;
    socket.set_linger(0)?;
    socket.set_maxmsgsize(MAX_REPLY_BYTES)?;
    if let Some(curve) = &target.curve {
        socket.set_curve_serverkey(curve.server_key.as_bytes())?;
        socket.set_curve_publickey(curve.keypair.public.as_bytes())?;
        socket.set_curve_secretkey(curve.keypair.secret_bytes())?;
    }
    socket.connect(&target.endpoint)?;
    Ok(socket)
}

/// Reads the content `sha256` of `size` bytes from `from` to the end, as ranges of
/// `range_bytes` (at most 1 MiB) with up to `window` asked at once, handing each range to
/// `sink` in order (`sink(offset, bytes)`).
///
/// # Errors
/// [`ClientError::Timeout`] when a reply takes longer than `timeout`; the node's refusal
/// (`not_found`, `not_member`); [`ClientError::BadReply`] for a range that is not the one
/// asked; [`ClientError::Read`] when `sink` fails.
#[allow(clippy::too_many_arguments)] // the download's whole description, no more
pub fn download_windowed(
    ctx: &zmq::Context,
    target: &UploadTarget,
    sha256: Sha256Digest,
    size: u64,
    from: u64,
    range_bytes: u64,
    window: u32,
    timeout: Duration,
    mut sink: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<(), ClientError> {
    let socket = dealer(ctx, target)?;
    let range_bytes = range_bytes.max(1);
    let window = usize::try_from(window.max(1)).unwrap_or(1);
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let mut next = from;
    let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
    loop {
        while in_flight.len() < window && next < size {
            let length = (size - next).min(range_bytes);
            let request = DownloadRequest {
                group: target.group.clone(),
                user: target.user.clone(),
                sha256,
                offset: next,
                length: Some(length),
            };
            let frames = encode_call::<call::Download>(&request);
            socket.send_multipart(std::iter::once(Vec::new()).chain(frames), 0)?;
            in_flight.push_back((next, length));
            next += length;
        }
        let Some(&(offset, length)) = in_flight.front() else {
            return Ok(());
        };
        if socket.poll(zmq::POLLIN, timeout_ms)? == 0 {
            return Err(ClientError::Timeout {
                endpoint: target.endpoint.clone(),
                waited: timeout,
            });
        }
        let frames = socket.recv_multipart(0)?;
        let (reply, bytes) =
            decode_reply_data::<DownloadReply>(frames.get(1..).unwrap_or_default())??;
        if reply.offset != offset || bytes.len() as u64 != length {
            return Err(ClientError::BadReply(
                agora_proto::codec::CodecError::Field(format!(
                    "asked {length} bytes at {offset}, got {} at {}",
                    bytes.len(),
                    reply.offset
                )),
            ));
        }
        sink(offset, &bytes).map_err(ClientError::Read)?;
        in_flight.pop_front();
    }
}
