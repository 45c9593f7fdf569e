//! The Agora protocol, AGORA/1, defined once. `docs/PROTOCOL.md` is the normative text; this
//! crate is its one implementation, shared by the servers, the clients and the tests.
//!
//! # Layout
//! - [`action`]: the action table: every action once, with its request and reply types and
//!   the role that serves it; a request enum per server; typed calls.
//! - [`wire`]: the wire types: requests, replies, error codes, names and endpoints.
//! - [`codec`]: ZeroMQ frames (as byte vectors) to and from [`wire`] values, and the ROUTER
//!   envelope.
//! - [`time`]: microsecond UTC timestamps (RFC 3339) and the `since` filter parser.
//! - [`id`]: message ids (UUID v7).
//! - [`key`]: CURVE public keys in Z85.
//! - [`beacon`]: the registry's LAN beacon (UDP, the zbeacon pattern).
//!
//! It depends on neither libzmq nor SQLite: frames are plain `Vec<u8>`s here, and the
//! sockets live in `agora-common`.
#![deny(missing_docs)]

pub mod action;
pub mod beacon;
pub mod codec;
pub mod id;
pub mod key;
pub mod time;
pub mod wire;
