//! Presence: live sessions of registered users, soft state with a TTL.
//!
//! A client `connect`s and repeats it within the TTL (the presence heartbeat); a session not
//! renewed in time ends, and its user shows `offline` with the durable last-seen time.
//! Only account holders have sessions, so the table is bounded by the accounts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_common::keys::PublicKey;
use agora_proto::wire::Presence;

/// Live sessions by key.
#[derive(Debug)]
pub struct Sessions {
    ttl: Duration,
    live: HashMap<PublicKey, (Presence, Instant)>,
}

impl Sessions {
    /// No sessions; each lives `ttl` after its last renewal.
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            live: HashMap::new(),
        }
    }

    /// The TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Starts or renews `key`'s session with `status` (`online` or `away`).
    pub fn renew(&mut self, key: PublicKey, status: Presence, now: Instant) {
        self.live.insert(key, (status, now + self.ttl));
    }

    /// Ends `key`'s session.
    pub fn end(&mut self, key: &PublicKey) {
        self.live.remove(key);
    }

    /// `key`'s presence at `now`.
    pub fn presence(&self, key: &PublicKey, now: Instant) -> Presence {
        match self.live.get(key) {
            Some((status, expires)) if *expires > now => *status,
            _ => Presence::Offline,
        }
    }

    /// How many live sessions are `online` and how many `away` at `now`.
    pub fn counts(&self, now: Instant) -> (usize, usize) {
        let live = self.live.values().filter(|(_, expires)| *expires > now);
        live.fold((0, 0), |(online, away), (status, _)| match status {
            Presence::Away => (online, away + 1),
            _ => (online + 1, away),
        })
    }

    /// Drops ended sessions.
    pub fn expire(&mut self, now: Instant) {
        self.live.retain(|_, (_, expires)| *expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_after_the_ttl_unless_renewed() {
        let key = PublicKey::from_bytes([1; 32]);
        let mut s = Sessions::new(Duration::from_secs(3));
        let t0 = Instant::now();
        assert_eq!(s.presence(&key, t0), Presence::Offline);
        s.renew(key, Presence::Online, t0);
        assert_eq!(
            s.presence(&key, t0 + Duration::from_secs(2)),
            Presence::Online
        );
        s.renew(key, Presence::Away, t0 + Duration::from_secs(2));
        assert_eq!(
            s.presence(&key, t0 + Duration::from_secs(4)),
            Presence::Away
        );
        assert_eq!(
            s.presence(&key, t0 + Duration::from_secs(6)),
            Presence::Offline
        );
        s.renew(key, Presence::Online, t0);
        s.end(&key);
        assert_eq!(s.presence(&key, t0), Presence::Offline);
    }
}
