//! Live subscribers and the push path (zguide "Clone" pattern, server side).
//!
//! A subscriber is a connection (its ROUTER envelope) that sent `subscribe` for a member.
//! After each batch commits, every new log entry is pushed to every subscriber with
//! `DONTWAIT`: a peer over its HWM loses that push (`EAGAIN`) and catches up by backfill from
//! the log; a vanished peer (`EHOSTUNREACH`, thanks to `ROUTER_MANDATORY`) is dropped.
//! Subscriptions are leases: a client renews with `subscribe` well within the lease, and a
//! subscription not renewed in time is dropped. A member who leaves loses their
//! subscriptions at once, so only members are ever pushed to.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_common::codec::Frames;
use agora_common::proto::{ErrorCode, GroupName, Message, PushEvent, WireError, PROTOCOL};
use agora_common::store::Principal;

#[derive(Debug)]
struct Subscription {
    member: Principal,
    expires: Instant,
}

/// What one push round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Pushes handed to libzmq.
    pub sent: u64,
    /// Pushes lost to a full queue (HWM) or the fault-injection switch.
    pub dropped: u64,
    /// Subscribers found gone and removed.
    pub gone: u64,
}

/// The node's subscribers, keyed by envelope.
#[derive(Debug)]
pub struct Subscribers {
    subs: HashMap<Frames, Subscription>,
    lease: Duration,
    max: usize,
    max_per_member: usize,
    /// Test-only fault injection: drop every Nth push (0 = never).
    drop_every: u64,
    pushes: u64,
}

impl Subscribers {
    /// No subscribers yet; leases last `lease`; at most `max` subscriptions, and
    /// `max_per_member` live connections per member; with `drop_every` > 0, every
    /// `drop_every`-th push is dropped on purpose (tests only).
    pub fn new(lease: Duration, max: usize, max_per_member: usize, drop_every: u64) -> Subscribers {
        Subscribers {
            subs: HashMap::new(),
            lease,
            max,
            max_per_member,
            drop_every,
            pushes: 0,
        }
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How many subscriptions there are.
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Subscribes (or renews) the connection `envelope` for `member`; returns true if new.
    ///
    /// # Errors
    /// `limit_reached` when the node has its maximum of subscriptions.
    pub fn subscribe(
        &mut self,
        envelope: &Frames,
        member: &Principal,
        now: Instant,
    ) -> Result<bool, WireError> {
        let expires = now + self.lease;
        if let Some(sub) = self.subs.get_mut(envelope) {
            sub.member = member.clone();
            sub.expires = expires;
            return Ok(false);
        }
        if self.subs.len() >= self.max {
            return Err(WireError::new(
                ErrorCode::LimitReached,
                format!("the node has its maximum of {} subscriptions", self.max),
            ));
        }
        let mine = self.subs.values().filter(|s| s.member == *member).count();
        if mine >= self.max_per_member {
            return Err(WireError::new(
                ErrorCode::LimitReached,
                format!(
                    "this member has its maximum of {} live connections",
                    self.max_per_member
                ),
            ));
        }
        self.subs.insert(
            envelope.clone(),
            Subscription {
                member: member.clone(),
                expires,
            },
        );
        Ok(true)
    }

    /// Ends the subscription of the connection `envelope`; returns whether it had one.
    pub fn unsubscribe(&mut self, envelope: &Frames) -> bool {
        self.subs.remove(envelope).is_some()
    }

    /// Ends every subscription of `member` (who left the group).
    pub fn remove_member(&mut self, member: &Principal) -> usize {
        let before = self.subs.len();
        self.subs.retain(|_, s| s.member != *member);
        before - self.subs.len()
    }

    /// Drops subscriptions whose lease ran out.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.subs.len();
        self.subs.retain(|_, s| s.expires > now);
        before - self.subs.len()
    }

    /// Pushes each entry, in order, to every subscriber.
    ///
    /// # Errors
    /// libzmq errors other than `EAGAIN` and `EHOSTUNREACH` (context terminated).
    pub fn push(
        &mut self,
        socket: &zmq::Socket,
        group: &GroupName,
        entries: &[Message],
    ) -> Result<PushStats, zmq::Error> {
        let mut stats = PushStats::default();
        if self.subs.is_empty() || entries.is_empty() {
            return Ok(stats);
        }
        let mut gone: Vec<Frames> = Vec::new();
        for entry in entries {
            let event = PushEvent {
                event: "entry".into(),
                group: group.clone(),
                entry: entry.clone(),
            };
            let body = serde_json::to_vec(&event).unwrap_or_default();
            for (envelope, _) in self.subs.iter() {
                self.pushes += 1;
                if self.drop_every > 0 && self.pushes % self.drop_every == 0 {
                    stats.dropped += 1;
                    continue;
                }
                let frames = envelope
                    .iter()
                    .map(Vec::as_slice)
                    .chain([PROTOCOL, body.as_slice()]);
                match socket.send_multipart(frames, zmq::DONTWAIT) {
                    Ok(()) => stats.sent += 1,
                    Err(zmq::Error::EAGAIN) => stats.dropped += 1,
                    Err(zmq::Error::EHOSTUNREACH) => gone.push(envelope.clone()),
                    Err(e) => return Err(e),
                }
            }
            for envelope in gone.drain(..) {
                if self.subs.remove(&envelope).is_some() {
                    stats.gone += 1;
                }
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &[u8]) -> Frames {
        vec![id.to_vec(), Vec::new()]
    }

    #[test]
    fn leases_renew_expire_and_are_bounded() {
        let mut s = Subscribers::new(Duration::from_secs(5), 2, 2, 0);
        let alice = Principal::name(&agora_common::proto::UserName::new("alice").expect("name"));
        let t0 = Instant::now();
        assert_eq!(s.subscribe(&env(b"a"), &alice, t0), Ok(true));
        assert_eq!(s.subscribe(&env(b"b"), &alice, t0), Ok(true));
        let full = s.subscribe(&env(b"c"), &alice, t0).expect_err("full");
        assert_eq!(full.code, ErrorCode::LimitReached);
        assert_eq!(
            s.subscribe(&env(b"a"), &alice, t0 + Duration::from_secs(4)),
            Ok(false)
        );
        assert_eq!(s.expire(t0 + Duration::from_secs(6)), 1);
        assert_eq!(s.len(), 1);
        assert_eq!(s.remove_member(&alice), 1);
        assert!(s.is_empty());
    }

    #[test]
    fn connections_per_member_are_bounded() {
        let mut s = Subscribers::new(Duration::from_secs(5), 100, 2, 0);
        let name = |n: &str| Principal::name(&agora_common::proto::UserName::new(n).expect("name"));
        let t0 = Instant::now();
        assert_eq!(s.subscribe(&env(b"a1"), &name("alice"), t0), Ok(true));
        assert_eq!(s.subscribe(&env(b"a2"), &name("alice"), t0), Ok(true));
        let third = s
            .subscribe(&env(b"a3"), &name("alice"), t0)
            .expect_err("bounded");
        assert_eq!(third.code, ErrorCode::LimitReached);
        // Renewing an existing one, and other members, are fine.
        assert_eq!(s.subscribe(&env(b"a1"), &name("alice"), t0), Ok(false));
        assert_eq!(s.subscribe(&env(b"b1"), &name("bob"), t0), Ok(true));
    }
}
