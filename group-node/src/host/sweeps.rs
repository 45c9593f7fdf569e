//! Timers of the host's groups: age retention and the attachments' TTL sweep, each kept as
//! a due-time index ([`DueTimes`]) over every group of the host, loaded or not.
//!
//! At start every group is due at once (a group nobody touches after a restart is swept
//! too), then each is due again when its sweep says: age retention when its oldest entry
//! passes `--max-age` (a group with an empty log only once it appends), the TTL sweep every
//! `min(--upload-ttl, 1 min)` while the group has a blob tree. The loop takes at most
//! [`MAX_SWEEPS_PER_PASS`] due groups per pass; while nothing is due it does no per-group
//! work at all (one look at the smallest due time).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use agora_proto::time::Timestamp;
use agora_proto::wire::HistoryQuery;

use super::{Config, Node};
use crate::store::{GroupLog, Retention};

/// Most groups one pass of the loop sweeps (of each kind): a host of 10,000 groups sweeps
/// them all at start over many passes, answering requests between them.
pub const MAX_SWEEPS_PER_PASS: usize = 64;

/// When each group (by slot) is next due, ordered by time.
#[derive(Debug, Default)]
pub struct DueTimes {
    order: BTreeSet<(Instant, usize)>,
    by_slot: HashMap<usize, Instant>,
}

impl DueTimes {
    /// Nothing due.
    pub fn new() -> DueTimes {
        DueTimes::default()
    }

    /// Makes `slot` due at `at`, replacing any due time it had.
    pub fn set(&mut self, slot: usize, at: Instant) {
        if let Some(old) = self.by_slot.insert(slot, at) {
            self.order.remove(&(old, slot));
        }
        self.order.insert((at, slot));
    }

    /// Makes `slot` due at `at` unless it is due already (at any time).
    pub fn set_if_absent(&mut self, slot: usize, at: Instant) {
        if !self.by_slot.contains_key(&slot) {
            self.set(slot, at);
        }
    }

    /// Whether `slot` has a due time.
    pub fn contains(&self, slot: usize) -> bool {
        self.by_slot.contains_key(&slot)
    }

    /// Takes up to `most` slots due by `now`, earliest first; they are no longer due.
    pub fn take_due(&mut self, now: Instant, most: usize) -> Vec<usize> {
        let mut due = Vec::new();
        while due.len() < most {
            match self.order.first() {
                Some(&(at, slot)) if at <= now => {
                    self.order.remove(&(at, slot));
                    self.by_slot.remove(&slot);
                    due.push(slot);
                }
                _ => break,
            }
        }
        due
    }

    /// How many groups have a due time.
    pub fn len(&self) -> usize {
        self.by_slot.len()
    }

    /// Whether no group has one.
    pub fn is_empty(&self) -> bool {
        self.by_slot.is_empty()
    }
}

/// How long a group host keeps a group loaded (its engine and log state) after its last
/// request while it is idle: 60 s. Idle: no subscribers (live or draining), no seal or
/// create waiting.
pub const LOADED_IDLE: Duration = Duration::from_secs(60);

/// The most groups a group host keeps loaded: 1,024. Past it the idle groups used least
/// recently are let go at once, whatever their idle time (any request, even one refused
/// later, loads its group: without a bound anyone could keep every group in memory). Busy
/// groups stay loaded past it.
pub const MAX_LOADED_GROUPS: usize = 1024;

/// How often a group's attachments are swept: `min(--upload-ttl, 1 min)`.
pub fn blob_interval(config: &Config) -> Duration {
    config.upload_ttl.min(Duration::from_secs(60))
}

/// The least time between two age sweeps of one group: 1 s.
const AGE_SWEEP_GAP: Duration = Duration::from_secs(1);

impl Node {
    /// The directory of the blob tree of the group in `slot`.
    fn blob_tree(&self, slot: usize) -> std::path::PathBuf {
        match self.many {
            true => self
                .config
                .data_dir
                .join("groups")
                .join(self.groups.get(slot).gid.to_string())
                .join("blobs"),
            false => self.config.data_dir.join("blobs"),
        }
    }

    /// At start every group is due for its age sweep (with `--max-age`), and every group
    /// with a blob tree for its TTL sweep (a loaded one after one interval).
    pub(super) fn schedule_sweeps_at_start(&mut self, now: Instant) {
        let aging = self.config.retention.max_age.is_some();
        let interval = blob_interval(&self.config);
        for slot in 0..self.groups.len() {
            if aging {
                self.age_due.set(slot, now);
            }
            if self.groups.get(slot).loaded.is_some() {
                self.blob_due.set(slot, now + interval);
            } else if self.blob_tree(slot).is_dir() {
                self.blob_due.set(slot, now);
            }
        }
    }

    /// Groups that appended and had nothing to age out are due once their new entries are
    /// `--max-age` old.
    pub(super) fn schedule_age_sweeps(&mut self, slots: impl Iterator<Item = usize>, now: Instant) {
        let Some(max_age) = self.config.retention.max_age else {
            return;
        };
        for slot in slots {
            self.age_due.set_if_absent(slot, now + max_age);
        }
    }

    /// Applies the age retention to the groups due by `now` (at most
    /// [`MAX_SWEEPS_PER_PASS`]) in one batch of its own, loaded or not (an idle group's log
    /// state is read for it and dropped after), and makes each due again when its oldest
    /// entry left will be `--max-age` old. Returns whether it committed a deletion (which
    /// then needs a sync like any write).
    pub(super) fn sweep_ages(&mut self, now: Instant, at: Timestamp) -> bool {
        let Some(max_age) = self.config.retention.max_age else {
            return false;
        };
        let due = self.age_due.take_due(now, MAX_SWEEPS_PER_PASS);
        if due.is_empty() {
            return false;
        }
        let policy = Retention {
            max_messages: None,
            ..self.config.retention
        };
        let mut next: Vec<(usize, Option<Timestamp>)> = Vec::with_capacity(due.len());
        let Node { db, groups, .. } = &mut *self;
        let result = db.begin().and_then(|()| {
            let mut deleted = 0;
            for &slot in &due {
                let hosted = groups.get_mut(slot);
                if hosted.stopped || hosted.pending {
                    continue;
                }
                let gid = hosted.gid;
                let mut idle = None;
                let log = match hosted.loaded.as_deref_mut() {
                    Some(l) => &mut l.log,
                    None => idle.insert(db.load(gid)?),
                };
                let mut view = db.group(log);
                let n = view.apply_retention(policy, at)?;
                if n > 0 {
                    tracing::debug!(target: "agora::commit", %gid, deleted = n, "retention");
                }
                deleted += n;
                let oldest = view.page(HistoryQuery::AfterSeq(0), 1, usize::MAX)?;
                next.push((slot, oldest.messages.first().map(|m| m.time)));
            }
            db.commit()?;
            Ok(deleted)
        });
        match result {
            Ok(deleted) => {
                for (slot, oldest) in next {
                    // Due when its oldest entry is max_age old; an empty log when it appends.
                    if let Some(oldest) = oldest {
                        let age = at.as_micros().saturating_sub(oldest.as_micros());
                        let left = (max_age.as_micros() as i64).saturating_sub(age);
                        let wait = Duration::from_micros(u64::try_from(left).unwrap_or(0));
                        self.age_due.set(slot, now + wait.max(AGE_SWEEP_GAP));
                    }
                }
                deleted > 0
            }
            Err(e) => {
                tracing::error!(error = %e, "retention failed; trying again in 1s");
                let Node {
                    db,
                    groups,
                    age_due,
                    ..
                } = &mut *self;
                for &slot in &due {
                    if let Some(l) = groups.get_mut(slot).loaded.as_deref_mut() {
                        let _ = db.reload(&mut l.log);
                    }
                    age_due.set(slot, now + AGE_SWEEP_GAP);
                }
                false
            }
        }
    }

    /// Sweeps the attachments of the groups due by `now` (at most
    /// [`MAX_SWEEPS_PER_PASS`]): unfinished uploads past `--upload-ttl` and contents no
    /// message carries. A group not loaded is loaded for it and let go after, unless it
    /// has subscribers or a seal waiting. Each is due again after one interval while it
    /// has a blob tree.
    pub(super) fn sweep_blobs_due(&mut self, now: Instant, at: SystemTime) {
        let due = self.blob_due.take_due(now, MAX_SWEEPS_PER_PASS);
        if due.is_empty() {
            return;
        }
        let interval = blob_interval(&self.config);
        for slot in due {
            let hosted = self.groups.get(slot);
            if hosted.stopped || hosted.pending {
                continue;
            }
            let was_loaded = hosted.loaded.is_some();
            // A loaded group's idle time is its requests', not its sweeps'.
            if !was_loaded && self.load(slot).is_err() {
                self.blob_due.set(slot, now + interval);
                continue;
            }
            let Node { db, groups, .. } = &mut *self;
            if let Some(l) = groups.get_mut(slot).loaded.as_deref_mut() {
                let view = db.group(&mut l.log);
                l.group.sweep_blobs(&view, at);
            }
            let sealing = self.seal_waiters.keys().any(|(s, _)| *s == slot);
            let hosted = self.groups.get_mut(slot);
            let quiet = hosted
                .loaded
                .as_deref()
                .is_some_and(|l| l.group.subscribers().is_empty());
            if self.many && !was_loaded && quiet && !sealing {
                if let Some(l) = hosted.loaded.take() {
                    hosted.members = l.log.member_count();
                }
            }
            if self.blob_tree(slot).is_dir() {
                self.blob_due.set(slot, now + interval);
            }
        }
    }

    /// Lets go of a group host's loaded groups idle for [`LOADED_IDLE`], and, while more
    /// than [`MAX_LOADED_GROUPS`] are loaded, of the idle ones used least recently (at
    /// most [`MAX_SWEEPS_PER_PASS`] of each per pass). A group let go keeps its member
    /// count for the registrar; its next request loads it again. A busy group (with
    /// subscribers, a seal or a create waiting) is looked at again after [`LOADED_IDLE`].
    pub(super) fn let_go_idle(&mut self, now: Instant) {
        if !self.many || self.idle_due.is_empty() {
            return;
        }
        let mut busy = Vec::new();
        for slot in self.idle_due.take_due(now, MAX_SWEEPS_PER_PASS) {
            if !self.let_go(slot) {
                busy.push(slot);
            }
        }
        // Every due time is at most `now + LOADED_IDLE`: the first are the least recent.
        let over = self.idle_due.len().saturating_sub(self.max_loaded);
        let (mut gone, mut looked) = (0, 0);
        while gone < over && looked < MAX_SWEEPS_PER_PASS {
            let Some(slot) = self.idle_due.take_due(now + LOADED_IDLE, 1).pop() else {
                break;
            };
            looked += 1;
            match self.let_go(slot) {
                true => gone += 1,
                false => busy.push(slot),
            }
        }
        for slot in busy {
            self.idle_due.set(slot, now + LOADED_IDLE);
        }
    }

    /// Lets go of the group in `slot` (its engine and log state; its member count kept)
    /// unless it is busy: true if it is not loaded now.
    fn let_go(&mut self, slot: usize) -> bool {
        if slot >= self.groups.len() || self.groups.get(slot).loaded.is_none() {
            return true;
        }
        let sealing = self.seal_waiters.keys().any(|(s, _)| *s == slot);
        let creating = self.groups.get(slot).pending || self.create_waits(slot);
        let hosted = self.groups.get_mut(slot);
        let quiet = hosted.loaded.as_deref().is_some_and(|l| {
            let subs = l.group.subscribers();
            subs.is_empty() && subs.in_flight_bytes() == 0 && !subs.has_notices()
        });
        if !quiet || sealing || creating {
            return false;
        }
        if let Some(l) = hosted.loaded.take() {
            hosted.members = l.log.member_count();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Any request loads its group (an `info` from a stranger, before any membership
    /// check), and loaded groups were let go only by a blob sweep that loaded them: anyone
    /// could keep every group of a host in memory. Now past the cap (here 10) the idle
    /// groups used least recently are let go at once, the rest after [`LOADED_IDLE`]; a
    /// group with a subscriber stays; one let go answers again (loaded anew).
    #[test]
    fn any_request_kept_every_group_loaded() {
        use agora_common::keys::Keypair;
        use agora_common::server::Received;
        use agora_proto::wire::GroupName;

        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(
            GroupName::new("host").expect("name"),
            "tcp://127.0.0.1:0",
            dir.path().to_owned(),
        );
        config.host = true;
        config.insecure = true;
        config.wal_prealloc_bytes = 0;
        config.groups = (0..30)
            .map(|i| GroupName::new(format!("g{i:02}")).expect("name"))
            .collect();
        let ctx = zmq::Context::new();
        let mut node = Node::bind(&ctx, config).expect("bind");
        node.max_loaded = 10;
        let alice = Keypair::generate().expect("keys");
        let request = |id: u8, body: serde_json::Value| Received {
            frames: vec![
                vec![0, id],
                Vec::new(),
                agora_proto::wire::PROTOCOL.to_vec(),
                body.to_string().into_bytes(),
            ],
            peer: Some(alice.public),
        };
        let loaded = |node: &Node| {
            (0..node.groups.len())
                .filter(|&s| node.groups.get(s).loaded.is_some())
                .count()
        };
        let served = node.serve_batch(&mut vec![
            request(
                0,
                serde_json::json!({"action": "join", "group": "g00", "user": "alice"}),
            ),
            request(
                2,
                serde_json::json!({"action": "join", "group": "g01", "user": "alice"}),
            ),
            request(
                1,
                serde_json::json!({"action": "subscribe", "group": "g00", "user": "alice"}),
            ),
        ]);
        for (_, reply) in &served.replies {
            let body = String::from_utf8_lossy(reply.last().expect("body")).into_owned();
            assert!(body.contains(r#""ok":true"#), "{body}");
        }
        for i in 0..30u8 {
            let group = format!("g{i:02}");
            node.serve_batch(&mut vec![request(
                i,
                serde_json::json!({"action": "info", "group": group, "user": "mallory"}),
            )]);
        }
        assert_eq!(loaded(&node), 30, "every request loaded its group");

        let now = Instant::now();
        node.let_go_idle(now);
        assert_eq!(loaded(&node), 10, "down to the cap at once");
        let g00 = node
            .groups
            .slot(&GroupName::new("g00").expect("name"))
            .expect("g00");
        assert!(
            node.groups.get(g00).loaded.is_some(),
            "g00 has a subscriber"
        );
        node.let_go_idle(now + LOADED_IDLE + Duration::from_secs(1));
        assert_eq!(loaded(&node), 1, "only the busy group after the idle time");
        let g01 = node
            .groups
            .slot(&GroupName::new("g01").expect("name"))
            .expect("g01");
        assert_eq!(node.groups.get(g01).members, 1, "its member count is kept");

        let again = node.serve_batch(&mut vec![request(
            99,
            serde_json::json!({"action": "info", "group": "g29", "user": "alice"}),
        )]);
        let body = String::from_utf8_lossy(again.replies[0].1.last().expect("body")).into_owned();
        assert!(
            body.contains(r#""error""#) || body.contains(r#""ok""#),
            "{body}"
        );
        assert_eq!(loaded(&node), 2, "loaded again by its next request");
    }

    /// Due times come out in time order, at most `most` at once, each slot once; a slot set
    /// again moves; nothing comes out before it is due.
    #[test]
    fn due_times_come_out_in_order_once() {
        let t0 = Instant::now();
        let mut d = DueTimes::new();
        d.set(3, t0 + Duration::from_secs(3));
        d.set(1, t0 + Duration::from_secs(1));
        d.set(2, t0 + Duration::from_secs(2));
        d.set_if_absent(1, t0 + Duration::from_secs(9));
        d.set(2, t0 + Duration::from_secs(5));
        assert_eq!(d.len(), 3);
        assert!(d.take_due(t0, 10).is_empty(), "nothing due yet");
        assert_eq!(d.take_due(t0 + Duration::from_secs(4), 10), vec![1, 3]);
        assert_eq!(d.take_due(t0 + Duration::from_secs(9), 10), vec![2]);
        assert!(d.is_empty());
        for slot in 0..10 {
            d.set(slot, t0);
        }
        assert_eq!(d.take_due(t0, 4).len(), 4);
        assert_eq!(d.len(), 6);
    }
}
