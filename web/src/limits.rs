//! Caps on what one client may hold: connections and WebSockets, in total, per address and
//! per identity, and how long a connection may take to say what it wants.
//!
//! - [`Slots`]: counted slots per key (an address, an account name), each [`Slot`] given back
//!   when it is dropped; a key with no slot held is forgotten, so the map holds at most as
//!   many keys as there are slots in use.
//! - [`ConnectionCaps`]: an `axum_server` acceptor in front of the others (TCP_NODELAY,
//!   TLS) that refuses a connection past `--max-connections` or
//!   `--max-connections-per-address`, and wraps the rest in [`Capped`], which holds the
//!   connection's slots and closes a connection that has not sent the start of its first
//!   request within `--header-read-timeout` (hyper's own header-read timeout takes over from
//!   there; it is armed only once hyper starts to parse, after it has chosen HTTP/1 from the
//!   first bytes), and closes one that opens with the HTTP/2 preface: the gateway serves
//!   HTTP/1.1 only, on every listener (see [`H2_PREFACE`]).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Counted slots per key: at most `per_key` held at once for any one key.
#[derive(Debug)]
pub struct Slots<K> {
    held: Mutex<HashMap<K, usize>>,
    per_key: usize,
}

/// One slot of a [`Slots`] for its key; given back on drop.
#[derive(Debug)]
pub struct Slot<K: Hash + Eq> {
    slots: Arc<Slots<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    /// At most `per_key` slots per key (0 refuses every one).
    pub fn new(per_key: usize) -> Arc<Slots<K>> {
        Arc::new(Slots {
            held: Mutex::new(HashMap::new()),
            per_key,
        })
    }

    /// A slot for `key`; `None` when `key` holds `per_key` already.
    pub fn take(self: &Arc<Self>, key: K) -> Option<Slot<K>> {
        let mut held = self.held.lock().ok()?;
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= self.per_key {
            if *n == 0 {
                held.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: Arc::clone(self),
            key,
        })
    }

    /// Slots `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.held
            .lock()
            .map(|h| h.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Keys holding at least one slot.
    pub fn keys(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.slots.held.lock() {
            if let Some(n) = held.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    held.remove(&self.key);
                }
            }
        }
    }
}

/// The connection caps and the first-request deadline, in front of `inner` (which sets
/// TCP_NODELAY, or does TLS).
#[derive(Clone, Debug)]
pub struct ConnectionCaps<A> {
    inner: A,
    total: Arc<Semaphore>,
    per_address: Arc<Slots<IpAddr>>,
    first_request: Duration,
    plain: bool,
}

/// What a refused plain-HTTP connection reads before it is closed.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\
    Content-Type: text/plain; charset=utf-8\r\nContent-Length: 51\r\n\r\n\
    503: too many connections from this address or all\n";

impl<A> ConnectionCaps<A> {
    /// The slots for one more connection from `peer`, counted by its
    /// [`crate::auth::bucket`] (an IPv6 address by its /64); `None` past either cap.
    fn admit(&self, peer: IpAddr) -> Option<(OwnedSemaphorePermit, Slot<IpAddr>)> {
        let total = Arc::clone(&self.total).try_acquire_owned().ok()?;
        let slot = self.per_address.take(crate::auth::bucket(peer))?;
        Some((total, slot))
    }

    /// At most `total` connections at once and `per_address` from any one client address
    /// (an IPv6 address counts by its /64, as every per-address cap: [`crate::auth::bucket`]);
    /// each has `first_request` to send the first bytes of its first request. `plain` (no TLS)
    /// lets a refused connection read a `503` before it is closed.
    pub fn new(
        inner: A,
        total: usize,
        per_address: usize,
        first_request: Duration,
        plain: bool,
    ) -> ConnectionCaps<A> {
        ConnectionCaps {
            inner,
            total: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            per_address: Slots::new(per_address),
            first_request,
            plain,
        }
    }
}

impl<A, S> axum_server::accept::Accept<TcpStream, S> for ConnectionCaps<A>
where
    A: axum_server::accept::Accept<TcpStream, S> + Clone + Send + Sync + 'static,
    A::Stream: AsyncRead + AsyncWrite + Unpin + Send,
    A::Future: Send + 'static,
    S: Send + 'static,
{
    type Stream = Capped<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let address = stream.peer_addr()?.ip();
            let Some((total, slot)) = this.admit(address) else {
                tracing::warn!(
                    peer = %address,
                    held = this.per_address.held(&crate::auth::bucket(address)),
                    "connection refused: --max-connections or --max-connections-per-address"
                );
                if this.plain {
                    // Best effort, never waits: the client learns why.
                    let _ = stream.try_write(REFUSED);
                }
                return Err(io::Error::other("connection cap reached"));
            };
            let (stream, service) = this.inner.accept(stream, service).await?;
            Ok((
                Capped {
                    inner: stream,
                    first_request: Some(Box::pin(tokio::time::sleep(this.first_request))),
                    read: 0,
                    preface: Some(0),
                    _total: total,
                    _slot: slot,
                },
                service,
            ))
        })
    }
}

/// Bytes after which the first-request deadline is off: the HTTP/2 preface's length, the
/// most hyper reads before it picks a protocol and arms its own header-read timeout.
const FIRST_REQUEST_BYTES: usize = 24;

/// The HTTP/2 client connection preface (RFC 9113 §3.4), 24 bytes. axum-server serves with
/// hyper-util's `auto` builder, which takes HTTP/2 whenever a connection opens with these
/// bytes, whatever TLS's ALPN said and even over plain TCP ("prior knowledge"); its
/// `http1_only` does nothing for `serve_connection_with_upgrades`. hyper has no header-read
/// or idle timeout for HTTP/2, so such a connection could hold its slots for ever: [`Capped`]
/// fails the read that completes the preface instead, and the connection is closed.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An accepted connection: holds its slots until it is closed, fails its reads once the
/// first-request deadline passes before `FIRST_REQUEST_BYTES` have come in, and fails the
/// read that completes an HTTP/2 preface ([`H2_PREFACE`]): the gateway speaks HTTP/1.1 only.
#[derive(Debug)]
pub struct Capped<T> {
    inner: T,
    first_request: Option<Pin<Box<tokio::time::Sleep>>>,
    read: usize,
    /// How many of the first bytes match [`H2_PREFACE`]; `None` once one differs.
    preface: Option<usize>,
    _total: OwnedSemaphorePermit,
    _slot: Slot<IpAddr>,
}

/// `Some(matched)` while the connection's first bytes, `matched` so far and `new` now, are
/// the start of [`H2_PREFACE`] (the whole preface at 24); `None` once they differ.
fn preface_matched(matched: usize, new: &[u8]) -> Option<usize> {
    let rest = &H2_PREFACE[matched.min(H2_PREFACE.len())..];
    let n = new.len().min(rest.len());
    (new[..n] == rest[..n]).then_some(matched + n)
}

impl<T: AsyncRead + Unpin> AsyncRead for Capped<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let new = &buf.filled()[before..];
                this.read += new.len();
                if let Some(matched) = this.preface {
                    this.preface = preface_matched(matched, new);
                    if this.preface == Some(H2_PREFACE.len()) {
                        tracing::info!("connection closed: HTTP/2 is not served (HTTP/1.1 only)");
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "HTTP/2 is not served: HTTP/1.1 only",
                        )));
                    }
                }
                if this.read >= FIRST_REQUEST_BYTES {
                    this.first_request = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.first_request.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within --header-read-timeout",
                ))),
                _ => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Capped<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The WebSocket caps: `--max-websockets` in all, per identity and per client address.
#[derive(Debug)]
pub struct WebSocketCaps {
    /// Open WebSockets in all (`--max-websockets`); past them an upgrade is `503`.
    pub total: Arc<Semaphore>,
    /// Per account name (`--max-websockets-per-identity`); past them `429`.
    pub per_identity: Arc<Slots<agora_proto::wire::UserName>>,
    /// Per client address (`--max-websockets-per-address`), keyed by
    /// [`crate::auth::bucket`] (an IPv6 address by its /64); past them `429`.
    pub per_address: Arc<Slots<IpAddr>>,
}

/// What an open WebSocket holds; its slots are given back when it is dropped.
#[derive(Debug)]
pub struct WebSocketSlots {
    _total: OwnedSemaphorePermit,
    _identity: Slot<agora_proto::wire::UserName>,
    _address: Slot<IpAddr>,
}

/// Which WebSocket cap refused an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebSocketRefusal {
    /// `--max-websockets` are open.
    Total,
    /// The identity holds `--max-websockets-per-identity`.
    Identity,
    /// The client address holds `--max-websockets-per-address`.
    Address,
}

impl WebSocketCaps {
    /// `total` in all, `per_identity` per account name, `per_address` per client address.
    pub fn new(total: usize, per_identity: usize, per_address: usize) -> WebSocketCaps {
        WebSocketCaps {
            total: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            per_identity: Slots::new(per_identity),
            per_address: Slots::new(per_address),
        }
    }

    /// The slots for one more WebSocket of `user` from `address` (counted by its
    /// [`crate::auth::bucket`]: an IPv6 address by its /64).
    ///
    /// # Errors
    /// The cap that is full.
    pub fn take(
        &self,
        user: &agora_proto::wire::UserName,
        address: IpAddr,
    ) -> Result<WebSocketSlots, WebSocketRefusal> {
        let identity = self
            .per_identity
            .take(user.clone())
            .ok_or(WebSocketRefusal::Identity)?;
        let address = self
            .per_address
            .take(crate::auth::bucket(address))
            .ok_or(WebSocketRefusal::Address)?;
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| WebSocketRefusal::Total)?;
        Ok(WebSocketSlots {
            _total: total,
            _identity: identity,
            _address: address,
        })
    }
}

/// Downloads in progress (`GET /files/GROUP/SEQ`): at most `--max-downloads-per-user` per
/// identity and `--max-downloads-per-address` per client address (by
/// [`crate::auth::bucket`]); past either a download is `429`. Each one also holds a blocking
/// thread while it reads from the node, so a client that stops reading is let go after
/// [`DownloadCaps::stall`] (`--download-stall-timeout`).
#[derive(Debug)]
pub struct DownloadCaps {
    /// Per account name.
    pub per_identity: Arc<Slots<agora_proto::wire::UserName>>,
    /// Per client address's bucket.
    pub per_address: Arc<Slots<IpAddr>>,
    /// How long a download waits for its client to take the next range before it ends.
    pub stall: Duration,
}

/// What a download in progress holds; given back when it is dropped.
#[derive(Debug)]
pub struct DownloadSlots {
    _identity: Slot<agora_proto::wire::UserName>,
    _address: Slot<IpAddr>,
}

impl DownloadCaps {
    /// `per_identity` per account name and `per_address` per client address; a client that
    /// takes nothing for `stall` loses its download.
    pub fn new(per_identity: usize, per_address: usize, stall: Duration) -> DownloadCaps {
        DownloadCaps {
            per_identity: Slots::new(per_identity),
            per_address: Slots::new(per_address),
            stall,
        }
    }

    /// The slots for one more download of `user` from `address`; `None` when the identity
    /// or the address (its bucket) holds its most already.
    pub fn take(
        &self,
        user: &agora_proto::wire::UserName,
        address: IpAddr,
    ) -> Option<DownloadSlots> {
        let identity = self.per_identity.take(user.clone())?;
        let address = self.per_address.take(crate::auth::bucket(address))?;
        Some(DownloadSlots {
            _identity: identity,
            _address: address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_slots_and_gets_them_back_on_drop() {
        let slots = Slots::new(2);
        let a = slots.take("a").expect("first");
        let b = slots.take("a").expect("second");
        assert!(slots.take("a").is_none(), "the third is refused");
        let other = slots.take("b").expect("another key has its own");
        drop(a);
        let c = slots.take("a").expect("given back");
        drop((b, c, other));
        assert_eq!(slots.keys(), 0, "keys without slots are forgotten");
    }

    fn capped(inner: &[u8]) -> Capped<&[u8]> {
        let total = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        let slot = Slots::new(1)
            .take(IpAddr::from([127, 0, 0, 1]))
            .expect("slot");
        Capped {
            inner,
            first_request: Some(Box::pin(tokio::time::sleep(Duration::from_secs(60)))),
            read: 0,
            preface: Some(0),
            _total: total,
            _slot: slot,
        }
    }

    #[tokio::test]
    async fn a_connection_that_opens_with_the_http2_preface_fails_its_read() {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 10];
        // In pieces, as a client may send it: the read that completes it fails.
        let mut h2 = capped(H2_PREFACE);
        assert_eq!(h2.read(&mut buf).await.expect("a prefix is read"), 10);
        assert_eq!(h2.read(&mut buf).await.expect("a prefix is read"), 10);
        let refused = h2.read(&mut buf).await.expect_err("HTTP/2 is refused");
        assert_eq!(refused.kind(), io::ErrorKind::InvalidData);
        // At once, followed by frames.
        let mut whole = H2_PREFACE.to_vec();
        whole.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let mut h2 = capped(&whole);
        let mut big = [0u8; 64];
        assert!(h2.read(&mut big).await.is_err());
        // HTTP/1.1, even a request that starts as the preface does, reads through.
        for request in [
            &b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"PRI * HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            let mut h1 = capped(request);
            let mut got = Vec::new();
            h1.read_to_end(&mut got).await.expect("HTTP/1.1 is read");
            assert_eq!(got, request);
        }
    }

    #[test]
    fn connection_and_websocket_caps_count_an_ipv6_host_by_its_64() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let caps = ConnectionCaps::new((), 10, 1, Duration::from_secs(1), true);
        let first = caps.admit(ip("2001:db8:1:2::1")).expect("the first");
        assert!(
            caps.admit(ip("2001:db8:1:2:ffff::7")).is_none(),
            "another host of the same /64 is the same address"
        );
        let _other = caps.admit(ip("2001:db8:1:3::1")).expect("another /64");
        let _v4 = caps.admit(ip("10.0.0.1")).expect("IPv4");
        assert!(
            caps.admit(ip("::ffff:10.0.0.1")).is_none(),
            "an IPv4-mapped address is its IPv4 address"
        );
        drop(first);
        assert!(caps.admit(ip("2001:db8:1:2::9")).is_some(), "given back");

        let ws = WebSocketCaps::new(10, 10, 1);
        let alice: agora_proto::wire::UserName = "alice".parse().expect("name");
        let _a = ws.take(&alice, ip("2001:db8::1")).expect("the first");
        assert_eq!(
            ws.take(&alice, ip("2001:db8::2")).err(),
            Some(WebSocketRefusal::Address),
            "the same /64"
        );
        assert!(ws.take(&alice, ip("2001:db8:0:1::2")).is_ok());
    }

    #[test]
    fn downloads_count_per_identity_and_per_address() {
        let caps = DownloadCaps::new(2, 3, Duration::from_secs(60));
        let (alice, bob): (agora_proto::wire::UserName, agora_proto::wire::UserName) =
            ("alice".parse().expect("name"), "bob".parse().expect("name"));
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let a1 = caps.take(&alice, ip("10.0.0.1")).expect("a1");
        let _a2 = caps.take(&alice, ip("10.0.0.2")).expect("a2");
        assert!(caps.take(&alice, ip("10.0.0.3")).is_none(), "per identity");
        let _b1 = caps.take(&bob, ip("2001:db8::1")).expect("b1");
        let _b2 = caps.take(&bob, ip("2001:db8::2")).expect("b2");
        assert!(
            caps.take(&bob, ip("2001:db8::3")).is_none(),
            "bob's own cap"
        );
        drop(a1);
        let _a3 = caps.take(&alice, ip("10.0.0.1")).expect("given back");
        let _c = caps.take(&"carol".parse().expect("name"), ip("10.0.0.1"));
        assert_eq!(caps.per_address.held(&ip("10.0.0.1")), 2);
        let caps = DownloadCaps::new(10, 2, Duration::from_secs(60));
        let _x = caps.take(&alice, ip("2001:db8::1")).expect("x");
        let _y = caps.take(&bob, ip("2001:db8::ffff")).expect("y");
        assert!(
            caps.take(&alice, ip("2001:db8::7")).is_none(),
            "per address, an IPv6 host by its /64"
        );
    }

    #[test]
    fn websocket_caps_count_per_identity_per_address_and_in_all() {
        let caps = WebSocketCaps::new(3, 2, 2);
        let (alice, bob): (agora_proto::wire::UserName, agora_proto::wire::UserName) =
            ("alice".parse().expect("name"), "bob".parse().expect("name"));
        let (here, there): (IpAddr, IpAddr) = (
            "127.0.0.1".parse().expect("ip"),
            "127.0.0.2".parse().expect("ip"),
        );
        let _a1 = caps.take(&alice, here).expect("a1");
        let _a2 = caps.take(&alice, there).expect("a2");
        assert_eq!(
            caps.take(&alice, there).err(),
            Some(WebSocketRefusal::Identity)
        );
        let _b1 = caps.take(&bob, here).expect("b1");
        assert_eq!(caps.take(&bob, here).err(), Some(WebSocketRefusal::Address));
        assert_eq!(caps.take(&bob, there).err(), Some(WebSocketRefusal::Total));
        assert_eq!(caps.per_identity.held(&bob), 1, "a refusal holds nothing");
    }
}
