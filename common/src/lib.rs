//! Agora's shared runtime, used by every binary of the suite: the ZeroMQ side of the
//! protocol that `agora-proto` defines.
//!
//! # Layout
//! - [`beacon`]: LAN discovery of registries by UDP beacon (zbeacon).
//! - [`actor`]: the one background-thread primitive (zguide/CZMQ actor): a thread owning
//!   its sockets, stopped at once through an inproc pipe.
//! - [`inbox`]: presence heartbeat and pushed direct messages, for clients and bots.
//! - [`keys`]: CURVE key pairs and their certificate files.
//! - [`fsmode`]: private directories (0700) and files (0600), looser ones tightened.
//! - [`client`]: the request/reply client (zguide "Lazy Pirate") and typed clients for the
//!   registry and group nodes.
//! - [`metrics`]: Prometheus metrics and `/healthz` over HTTP (`--metrics ADDR`).
//! - [`ratelimit`]: per-peer token buckets.
//! - [`server`]: ROUTER plumbing shared by the servers: bind, batch receive, reply.
//! - [`live`]: the live stream client (zguide "Clone"): subscribe, dedupe by seq, backfill.
//! - [`transfer`]: windowed uploads of attachments (several chunks in flight).
//! - [`trust`]: pinning the registry key on first use, and the key endpoint that serves it.
//! - [`zap`]: the ZAP handler (RFC 27) that names CURVE clients by their keys.
//! - [`shutdown`]: a cooperative shutdown flag that servers poll.
//!
//! `docs/PROTOCOL.md` is the normative description of everything on the wire; `agora-proto`
//! implements its types and codec, this crate its sockets.
#![deny(missing_docs)]

pub mod actor;
pub mod beacon;
pub mod client;
pub mod fsmode;
pub mod inbox;
pub mod keys;
pub mod live;
pub mod metrics;
#[cfg(feature = "postgres")]
pub mod pgtls;
pub mod ratelimit;
pub mod server;
pub mod shutdown;
pub mod transfer;
pub mod trust;
pub mod zap;
