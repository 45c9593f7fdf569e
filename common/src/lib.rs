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

/// A duration as people write it, for messages and logs: whole milliseconds below one
/// second (`250ms`), whole seconds or tenths of a second from one second on (`1s`,
/// `1s 500ms`, `5s`; rounded to the nearest tenth), in humantime's notation, which
/// `humantime::parse_duration` (every duration flag) reads back. Never `2.002584094s`.
pub fn human_duration(d: std::time::Duration) -> String {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let ms = if ms >= 1000 {
        ms.saturating_add(50) / 100 * 100
    } else {
        ms
    };
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::human_duration;
    use std::time::Duration;

    /// Review of issue 23: `within 2.002584094s` reached group-node's, agora-web's and the
    /// thermometer's messages, and a copy rounded 40 ms to `0s`.
    #[test]
    fn durations_read_as_people_write_them() {
        let cases = [
            (Duration::from_millis(40), "40ms"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_nanos(1_004_849_877), "1s"),
            (Duration::from_nanos(2_002_584_094), "2s"),
            (Duration::from_millis(1500), "1s 500ms"),
            (Duration::from_millis(3334), "3s 300ms"),
            (Duration::from_secs(5), "5s"),
            (Duration::from_secs(90), "1m 30s"),
        ];
        for (d, want) in cases {
            assert_eq!(human_duration(d), want, "{d:?}");
        }
    }
}
