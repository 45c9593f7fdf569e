//! Agora's shared library, used by every binary of the suite.
//!
//! # Layout
//! - [`proto`]: the wire types: requests, replies, error codes, names and endpoints.
//! - [`codec`]: ZeroMQ frames to and from [`proto`] values, and the ROUTER envelope.
//! - [`time`]: microsecond UTC timestamps (RFC 3339) and the `since` filter parser.
//! - [`id`]: message ids (UUID v7).
//! - [`inbox`]: presence heartbeat and pushed direct messages, for clients and bots.
//! - [`keys`]: CURVE key pairs and their certificate files.
//! - [`store`]: the durable group log and membership in SQLite.
//! - [`client`]: the request/reply client (zguide "Lazy Pirate") and typed clients for the
//!   registry and group nodes.
//! - [`ratelimit`]: per-peer token buckets.
//! - [`server`]: ROUTER plumbing shared by the servers: bind, batch receive, reply.
//! - [`live`]: the live stream client (zguide "Clone"): subscribe, dedupe by seq, backfill.
//! - [`trust`]: pinning the registry key on first use, and the key endpoint that serves it.
//! - [`zap`]: the ZAP handler (RFC 27) that names CURVE clients by their keys.
//! - [`shutdown`]: a cooperative shutdown flag that servers poll.
//!
//! `docs/PROTOCOL.md` is the normative description of everything on the wire; this crate
//! implements it.
#![deny(missing_docs)]

pub mod client;
pub mod codec;
pub mod id;
pub mod inbox;
pub mod keys;
pub mod live;
pub mod proto;
pub mod ratelimit;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod time;
pub mod trust;
pub mod zap;
