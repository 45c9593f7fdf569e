//! Per-peer request rate limits: a token bucket per peer.
//!
//! Each peer (its CURVE key, or its connection on an `--insecure` server) has a bucket of
//! `burst` tokens that refills at `rate` tokens per second; a request takes one token, and a
//! request that finds the bucket empty is refused with `rate_limited`. The table of buckets
//! is bounded: when full, buckets that have refilled completely (idle peers) are dropped,
//! and if none has, the peer is refused until one does.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Rate limit settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second per peer; 0 disables the limit.
    pub rate: f64,
    /// Requests a peer may make at once after being idle.
    pub burst: f64,
    /// Most peers tracked at once.
    pub max_peers: usize,
}

impl Default for RateLimit {
    /// 2,000 requests/s sustained, bursts of 4,000, 100,000 peers.
    fn default() -> Self {
        RateLimit {
            rate: 2_000.0,
            burst: 4_000.0,
            max_peers: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by peer.
#[derive(Debug)]
pub struct Limiter<K> {
    limit: RateLimit,
    buckets: HashMap<K, Bucket>,
}

impl<K: Eq + Hash + Clone> Limiter<K> {
    /// An empty limiter.
    pub fn new(limit: RateLimit) -> Limiter<K> {
        Limiter {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for `peer` at `now`; `Err(wait)` says how long until one is free.
    ///
    /// # Errors
    /// The time until the peer may ask again.
    pub fn check(&mut self, peer: &K, now: Instant) -> Result<(), Duration> {
        let RateLimit {
            rate,
            burst,
            max_peers,
        } = self.limit;
        if rate <= 0.0 {
            return Ok(());
        }
        let refill = |b: &Bucket| {
            (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst)
        };
        if !self.buckets.contains_key(peer) && self.buckets.len() >= max_peers {
            self.buckets.retain(|_, b| refill(b) < burst);
            if self.buckets.len() >= max_peers {
                return Err(Duration::from_secs_f64(1.0 / rate));
            }
        }
        let bucket = self.buckets.entry(peer.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = refill(bucket);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut l = Limiter::new(RateLimit {
            rate: 10.0,
            burst: 3.0,
            max_peers: 10,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(&"a", t0).is_ok());
        }
        let wait = l.check(&"a", t0).expect_err("empty");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another peer has its own bucket.
        assert!(l.check(&"b", t0).is_ok());
        // 100 ms later, one token is back.
        assert!(l.check(&"a", t0 + Duration::from_millis(100)).is_ok());
        assert!(l.check(&"a", t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn the_peer_table_is_bounded_and_idle_peers_make_room() {
        let mut l = Limiter::new(RateLimit {
            rate: 10.0,
            burst: 2.0,
            max_peers: 2,
        });
        let t0 = Instant::now();
        assert!(l.check(&1, t0).is_ok());
        assert!(l.check(&2, t0).is_ok());
        assert!(l.check(&3, t0).is_err(), "table full, nobody idle");
        let later = t0 + Duration::from_secs(1);
        assert!(l.check(&3, later).is_ok(), "idle peers were dropped");
    }

    #[test]
    fn rate_zero_disables_the_limit() {
        let mut l = Limiter::new(RateLimit {
            rate: 0.0,
            burst: 0.0,
            max_peers: 0,
        });
        for _ in 0..1000 {
            assert!(l.check(&"a", Instant::now()).is_ok());
        }
    }
}
