//! `create` and `delete` (PROTOCOL §6.11): they change the host's table of groups, not one
//! group's rules, so they live in the host.
//!
//! # Create, in the plan's order (group-host §3.2)
//! 1. The turn inserts the group, its creator's membership and `join` entry in its
//!    transaction. Without a registry the group is live at once and its reply leaves after
//!    the turn's sync, like any write. With one, the group is *pending* (it answers
//!    `unknown_group`; its name is taken on the host) and its reply waits: a [`Creating`].
//! 2. Once that turn is durable, the registrar registers the name ([`CreateWaiter`]); the
//!    loop looks at its answer on every pass without waiting for it, so a slow or silent
//!    registry holds up that `create` alone, never the host's other groups. A request the
//!    registrar gives up on (after one heartbeat interval) is sent again while the create's
//!    [`REGISTER_WAIT`] lasts.
//! 3. The registry took it: a later turn makes the group live, and its reply leaves after
//!    that turn's sync. Refused, or no answer within [`REGISTER_WAIT`]: that turn archives
//!    the pending group (its name is free again at once) and the reply is `name_taken` or
//!    `limit_reached` (the registry's refusal) or `internal` ("nothing was created; retry").
//!
//! A crash before step 3 leaves a pending group that was never acked: the host removes it at
//! start ([`crate::store::HostDb::remove_pending_groups`]).
//!
//! A `delete` archives the group (its rows stay), frees its name on the host at once, ends
//! its subscriptions and unregisters it.

use std::collections::BTreeSet;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use agora_common::keys::PublicKey;
use agora_proto::action::{call, NodeRequest};
use agora_proto::codec::Frames;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    CreateReply, CreateRequest, DeleteReply, ErrorCode, GroupMode, HostedGroup, MembershipRequest,
    UserName, WireError,
};

use super::groups::Hosted;
use super::serve::{Appended, Served};
use super::Node;
use crate::group::{reply, Applied, Input};
use crate::registrar::{RegistrarError, Registration};
use crate::store::{GroupLog, GroupState, NewGroup, Principal, StoreError};

impl Node {
    /// `create {group, user, mode}` on a group host: the caller owns the new group. Returns
    /// its reply, or `None` when the group is pending and its reply waits for the registry
    /// (a [`Creating`] of this turn; see the module docs).
    ///
    /// # Errors
    /// `forbidden` (no CURVE key, or not in `--creators`), `limit_reached` (`--max-groups`,
    /// `--max-groups-per-key`), `name_taken` (a group of the host has the name), `internal`.
    pub(super) fn create(
        &mut self,
        r: CreateRequest,
        input: &Input<'_>,
        appended: &mut super::serve::Appended,
        touched: &mut BTreeSet<usize>,
    ) -> Result<Option<CreateReply>, WireError> {
        let Some(peer) = input.peer else {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "create needs a CURVE key; this host runs --insecure",
            ));
        };
        if !self.config.creators.allow(&peer) {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "this key may not create groups here (the host's --creators)",
            ));
        }
        let principal = Principal::key(&peer);
        if let Some(slot) = self.groups.slot(&r.group) {
            // Its creator asking again (a client's retry, its first reply late): the
            // answer to the first goes to this one too.
            if self.groups.get(slot).owner == Some(peer) && self.wait_again(slot, input.envelope) {
                return Ok(None);
            }
            return Err(name_taken(&r));
        }
        let (mine, all) = self
            .db
            .group_counts(&principal)
            .map_err(crate::group::store_error)?;
        if all >= self.config.max_groups as u64 {
            return Err(WireError::new(
                ErrorCode::LimitReached,
                format!(
                    "this host holds its maximum of {} groups",
                    self.config.max_groups
                ),
            ));
        }
        if mine >= self.config.max_groups_per_key {
            return Err(WireError::new(
                ErrorCode::LimitReached,
                format!(
                    "this key created its maximum of {} groups here",
                    self.config.max_groups_per_key
                ),
            ));
        }
        // With a registry the group is pending until the registry takes its name.
        let pending = self.registrar.is_some();
        let gid = self
            .db
            .insert_group(NewGroup {
                name: &r.group,
                owner: Some(&principal),
                created_by: Some(&principal),
                mode: r.mode,
                state: if pending {
                    GroupState::Pending
                } else {
                    GroupState::Live
                },
                at: input.now,
            })
            .map_err(|e| match e {
                StoreError::NameTaken(_) => name_taken(&r),
                e => crate::group::store_error(e),
            })?;
        let slot = self.groups.insert(Hosted {
            name: r.group.clone(),
            gid,
            owner: Some(peer),
            stopped: false,
            pending,
            loaded: None,
            members: 1,
        });
        self.created.push(slot);
        let made = self.start_created(slot, &r, peer, input, appended, touched);
        if made.is_err() {
            // Nothing of it stays: no slot, its row archived (else it stayed pending, or
            // live with no member, and its name taken for good).
            appended.remove(&slot);
            self.groups.forget(slot);
            self.idle_due.set(slot, Instant::now());
            if let Err(e) = self
                .db
                .set_group_state(gid, GroupState::Archived, input.now)
            {
                tracing::error!(error = %e, group = %r.group, "cannot archive a failed create");
            }
        }
        let made = made?;
        if pending {
            tracing::debug!(group = %made.group, %gid, by = %peer, "group pending");
            self.creating.push(Creating {
                slot,
                envelopes: vec![input.envelope.clone()],
                reply: made,
            });
            return Ok(None);
        }
        tracing::info!(group = %made.group, %gid, by = %peer, "group created");
        Ok(Some(made))
    }

    /// Loads the group just stored in `slot` and has its creator join it (its mode set
    /// first): its `create` reply.
    ///
    /// # Errors
    /// `internal` if it cannot be loaded, its mode stored, or the join is refused.
    fn start_created(
        &mut self,
        slot: usize,
        r: &CreateRequest,
        peer: PublicKey,
        input: &Input<'_>,
        appended: &mut Appended,
        touched: &mut BTreeSet<usize>,
    ) -> Result<CreateReply, WireError> {
        self.load(slot)?;
        touched.insert(slot);
        let Node { db, groups, .. } = &mut *self;
        let l = groups
            .get_mut(slot)
            .loaded
            .as_deref_mut()
            .ok_or_else(super::serve::internal_error)?;
        let mut view = db.group(&mut l.log);
        if r.mode == GroupMode::Private {
            view.set_mode(GroupMode::Private)
                .map_err(crate::group::store_error)?;
        }
        let join = NodeRequest::Join(MembershipRequest {
            group: Some(r.group.clone()),
            user: r.user.clone(),
        });
        match l
            .group
            .apply(&mut view, join, input, appended.entry(slot).or_default())
        {
            Applied::Reply { ok: true, .. } => {}
            _ => return Err(super::serve::internal_error()),
        }
        Ok(CreateReply {
            group: r.group.clone(),
            mode: r.mode,
            owner: peer,
            last_seq: l.log.last_seq(),
        })
    }

    /// Whether a `create` of the group in `slot` waits (for its turn's sync or for the
    /// registry).
    pub(super) fn create_waits(&self, slot: usize) -> bool {
        self.creating.iter().any(|c| c.slot == slot)
            || self.create_waiters.iter().any(|w| w.creating.slot == slot)
    }

    /// Adds `envelope` to the waiting create of the pending group in `slot`; false if there
    /// is none here (its turn waits for its sync, or the group is not pending).
    fn wait_again(&mut self, slot: usize, envelope: &Frames) -> bool {
        if !self.groups.get(slot).pending {
            return false;
        }
        let waiting = self
            .creating
            .iter_mut()
            .chain(self.create_waiters.iter_mut().map(|w| &mut w.creating))
            .find(|c| c.slot == slot);
        match waiting {
            Some(c) => {
                c.envelopes.push(envelope.clone());
                true
            }
            None => false,
        }
    }

    /// Has the registrar register the names of `creates` (pending groups whose turn is
    /// durable now); their replies wait for its answers ([`Node::settle_creates`]).
    pub(super) fn register_created(&mut self, creates: Vec<Creating>) {
        for c in creates {
            let name = self.groups.get(c.slot).name.clone();
            let answer = match &self.registrar {
                Some(registrar) => registrar.register_now(vec![HostedGroup { name, members: 1 }]),
                // No registrar (it is started by `run`): an answer that never comes.
                None => std::sync::mpsc::sync_channel(1).1,
            };
            self.create_waiters.push(CreateWaiter {
                creating: c,
                answer,
                deadline: Instant::now() + REGISTER_WAIT,
            });
        }
    }

    /// Whether `create`s wait for the registry.
    pub(super) fn creates_waiting(&self) -> bool {
        !self.create_waiters.is_empty()
    }

    /// Settles the waiting `create`s the registry answered, or that waited
    /// [`REGISTER_WAIT`] by `now`, in one turn of their own: the registered groups become
    /// live, the others are archived (their names free). Returns that turn, to queue for its
    /// sync (its replies leave after it), or `None` when none is settled.
    pub(super) fn settle_creates(&mut self, now: Instant) -> Option<Served> {
        let mut decided: Vec<(Creating, Result<(), WireError>)> = Vec::new();
        let mut waiting = Vec::with_capacity(self.create_waiters.len());
        for w in std::mem::take(&mut self.create_waiters) {
            let outcome = match w.answer.try_recv() {
                Ok((_, Ok(()))) => Ok(()),
                Ok((_, Err(RegistrarError::Refused(e)))) => {
                    let code = match e.code {
                        ErrorCode::LimitReached | ErrorCode::TooManyNames => {
                            ErrorCode::LimitReached
                        }
                        _ => ErrorCode::NameTaken,
                    };
                    Err(WireError::new(
                        code,
                        format!(
                            "the registry refused \"{}\": {}",
                            w.creating.reply.group, e.message
                        ),
                    ))
                }
                // The registrar gave up on one request (after one heartbeat interval): ask
                // again while the create's own wait lasts.
                Ok((_, Err(RegistrarError::Unreachable { .. })))
                    if now < w.deadline && self.registrar.is_some() =>
                {
                    if let Some(registrar) = &self.registrar {
                        let name = w.creating.reply.group.clone();
                        waiting.push(CreateWaiter {
                            answer: registrar.register_now(vec![HostedGroup { name, members: 1 }]),
                            ..w
                        });
                    }
                    continue;
                }
                Ok((_, Err(e))) => Err(unregistered(&e.to_string())),
                Err(TryRecvError::Empty) if now < w.deadline => {
                    waiting.push(w);
                    continue;
                }
                Err(TryRecvError::Empty) => {
                    // An answer may still come: the registry must not keep the name.
                    if let Some(registrar) = &self.registrar {
                        registrar.remove(w.creating.reply.group.clone());
                    }
                    Err(unregistered(&format!(
                        "no answer in {}",
                        humantime::format_duration(REGISTER_WAIT)
                    )))
                }
                Err(TryRecvError::Disconnected) => Err(unregistered("the registrar stopped")),
            };
            decided.push((w.creating, outcome));
        }
        self.create_waiters = waiting;
        if decided.is_empty() {
            return None;
        }
        let at = Timestamp::now();
        let committed = self.db.begin().and_then(|()| {
            for (c, outcome) in &decided {
                let state = match outcome {
                    Ok(()) => GroupState::Live,
                    Err(_) => GroupState::Archived,
                };
                self.db
                    .set_group_state(self.groups.get(c.slot).gid, state, at)?;
            }
            self.db.commit()
        });
        let fenced = matches!(committed, Err(StoreError::Fenced { .. }));
        if let Err(e) = &committed {
            tracing::error!(error = %e, "cannot settle the waiting creates; nothing was created");
            self.deposed |= fenced;
        }
        let mut replies = Vec::with_capacity(decided.len());
        for (c, outcome) in decided {
            let name = c.reply.group.clone();
            let outcome = match (&committed, outcome) {
                (Ok(()), outcome) => outcome,
                (Err(_), Ok(())) => {
                    // Registered, but not live: the registry lets it go again.
                    if let Some(registrar) = &self.registrar {
                        registrar.remove(name.clone());
                    }
                    Err(if fenced {
                        super::serve::stopping()
                    } else {
                        unregistered("storage failure")
                    })
                }
                (Err(_), Err(e)) => Err(e),
            };
            let frames = match outcome {
                Ok(()) => {
                    self.groups.get_mut(c.slot).pending = false;
                    tracing::info!(group = %name, gid = %self.groups.get(c.slot).gid,
                        by = %c.reply.owner, "group created");
                    reply::<call::Create>(Ok(c.reply)).0
                }
                Err(e) => {
                    tracing::info!(group = %name, error = %e.message, "group not created");
                    self.groups.forget(c.slot);
                    reply::<call::Create>(Err(e.with_group(Some(name)))).0
                }
            };
            for envelope in c.envelopes {
                replies.push((envelope, frames.clone()));
            }
        }
        Some(Served {
            wrote: committed.is_ok(),
            replies,
            appended: Appended::new(),
            creates: Vec::new(),
        })
    }

    /// Answers every waiting `create` `shutting_down` (the host is draining; their pending
    /// groups are removed when it starts again).
    pub(super) fn refuse_creates(&mut self) -> Vec<(Frames, Frames)> {
        let mut replies = Vec::new();
        for w in std::mem::take(&mut self.create_waiters) {
            let name = Some(w.creating.reply.group.clone());
            let frames = reply::<call::Create>(Err(super::serve::stopping().with_group(name))).0;
            for envelope in w.creating.envelopes {
                replies.push((envelope, frames.clone()));
            }
        }
        replies
    }

    /// `delete {group, user}` on a group host: by the group's owner or the host key. The
    /// group is archived, its name free at once.
    ///
    /// # Errors
    /// `forbidden`, `internal`.
    pub(super) fn delete(
        &mut self,
        slot: usize,
        _user: &UserName,
        peer: Option<PublicKey>,
        now: Timestamp,
        touched: &mut BTreeSet<usize>,
    ) -> Result<DeleteReply, WireError> {
        let hosted = self.groups.get(slot);
        if peer.is_none() || (peer != hosted.owner && peer != self.public_key()) {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "only the group's owner or the host's key may delete it",
            ));
        }
        let (gid, name) = (hosted.gid, hosted.name.clone());
        self.db
            .set_group_state(gid, GroupState::Archived, now)
            .map_err(crate::group::store_error)?;
        touched.insert(slot);
        // Its name answers `unknown_group` from here on; its subscriptions end and the
        // registry lets it go once the turn commits ([`Node::finish_deletes`]), and it is
        // served again if the turn rolls back ([`Node::undo_deletes`]).
        self.groups.forget(slot);
        self.deleted.push(slot);
        tracing::info!(group = %name, %gid, "group deleted (archived)");
        Ok(DeleteReply {
            group: name,
            deleted: true,
        })
    }

    /// The deletes of a turn that committed: their groups' subscriptions end and the
    /// registry lets their names go.
    pub(super) fn finish_deletes(&mut self) {
        for slot in std::mem::take(&mut self.deleted) {
            let hosted = self.groups.get_mut(slot);
            if let Some(l) = hosted.loaded.as_deref_mut() {
                l.group.end_subscriptions();
            }
            if let Some(registrar) = &self.registrar {
                registrar.remove(self.groups.get(slot).name.clone());
            }
            // Its engine is let go once its `unsubscribed` notices are sent (sweeps).
            self.idle_due.set(slot, Instant::now());
        }
    }

    /// The deletes of a turn that rolled back: their groups are not archived, and are
    /// served again under their names.
    pub(super) fn undo_deletes(&mut self) {
        for slot in std::mem::take(&mut self.deleted) {
            self.groups.restore(slot);
            tracing::info!(group = %self.groups.get(slot).name, "delete rolled back");
        }
    }
}

/// A `create` of the batch being served whose group is pending: its reply waits for the
/// batch's sync, then for the registry.
#[derive(Debug)]
pub(super) struct Creating {
    /// The group's slot.
    slot: usize,
    /// The caller's envelope, and those of its retries while the group is pending.
    envelopes: Vec<Frames>,
    /// The reply once the group is live.
    reply: CreateReply,
}

/// A `create` whose name the registrar is registering.
#[derive(Debug)]
pub(super) struct CreateWaiter {
    creating: Creating,
    /// The registrar's answer.
    answer: Receiver<Registration>,
    /// When to give up: [`REGISTER_WAIT`] after the request.
    deadline: Instant,
}

/// How long a `create` waits for the registry to take its name: 2 s.
const REGISTER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The `internal` error of a create whose name the registry did not take.
fn unregistered(why: &str) -> WireError {
    WireError::new(
        ErrorCode::Internal,
        format!("the registry did not take the name ({why}); nothing was created; retry"),
    )
}

fn name_taken(r: &CreateRequest) -> WireError {
    WireError::new(
        ErrorCode::NameTaken,
        format!("a group named \"{}\" exists on this host", r.group),
    )
}

#[cfg(test)]
mod tests {
    use agora_common::keys::Keypair;
    use agora_common::server::Received;
    use agora_proto::wire::GroupName;

    use crate::{Config, Node};

    fn request(id: u8, peer: &Keypair, body: serde_json::Value) -> Received {
        Received {
            frames: vec![
                vec![0, id],
                Vec::new(),
                agora_proto::wire::PROTOCOL.to_vec(),
                body.to_string().into_bytes(),
            ],
            peer: Some(peer.public),
        }
    }

    fn body(reply: &[Vec<u8>]) -> String {
        String::from_utf8_lossy(reply.last().expect("a body")).into_owned()
    }

    /// A group a crash left pending (stored, its name never registered, its create never
    /// answered) is gone when the host starts again: not served, its name free for a create.
    #[test]
    fn a_group_left_pending_by_a_crash_is_removed_at_start() {
        use crate::store::{GroupState, NewGroup};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(
            GroupName::new("host").expect("name"),
            "tcp://127.0.0.1:0",
            dir.path().to_owned(),
        );
        config.host = true;
        config.insecure = true;
        config.wal_prealloc_bytes = 0;
        config.creators = crate::host::Creators::Any;
        let ctx = zmq::Context::new();
        let name = GroupName::new("left").expect("name");
        {
            let mut node = Node::bind(&ctx, config.clone()).expect("bind");
            node.db.begin().expect("begin");
            node.db
                .insert_group(NewGroup {
                    name: &name,
                    owner: None,
                    created_by: None,
                    mode: agora_proto::wire::GroupMode::Open,
                    state: GroupState::Pending,
                    at: agora_proto::time::Timestamp::now(),
                })
                .expect("insert");
            node.db.commit().expect("commit");
            node.db.flusher().sync().expect("sync");
        }
        let mut node = Node::bind(&ctx, config).expect("bind again");
        assert_eq!(node.db.find_group(&name).expect("find"), None, "removed");
        assert!(!node.groups.serves(&name));
        let alice = Keypair::generate().expect("keys");
        let made = node.serve_batch(&mut vec![request(
            1,
            &alice,
            serde_json::json!({"action": "create", "group": "left", "user": "alice"}),
        )]);
        let made = body(&made.replies[0].1);
        assert!(made.contains(r#""ok":true"#), "the name is free: {made}");
    }

    /// A group stopped on a host kept its subscriptions (and its registration): its
    /// subscribers were never told and clients were sent back to it. Now a stop ends them,
    /// as a delete does.
    #[test]
    fn a_stopped_group_kept_its_subscriptions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(
            GroupName::new("host").expect("name"),
            "tcp://127.0.0.1:0",
            dir.path().to_owned(),
        );
        config.host = true;
        config.wal_prealloc_bytes = 0;
        config.groups = vec![GroupName::new("g").expect("name")];
        let ctx = zmq::Context::new();
        let mut node = Node::bind(&ctx, config).expect("bind");
        let alice = Keypair::generate().expect("keys");
        let served = node.serve_batch(&mut vec![
            request(
                1,
                &alice,
                serde_json::json!({"action": "join", "group": "g", "user": "alice"}),
            ),
            request(
                2,
                &alice,
                serde_json::json!({"action": "subscribe", "group": "g", "user": "alice"}),
            ),
        ]);
        for (_, reply) in &served.replies {
            assert!(body(reply).contains(r#""ok":true"#), "{}", body(reply));
        }
        let slot = node
            .groups
            .slot(&GroupName::new("g").expect("name"))
            .expect("slot");
        let subscribed = |node: &Node| {
            node.groups
                .get(slot)
                .loaded
                .as_deref()
                .is_some_and(|l| !l.group.subscribers().is_empty())
        };
        assert!(subscribed(&node));
        let mut stop = request(
            3,
            &alice,
            serde_json::json!({"action": "stop", "group": "g", "user": "host"}),
        );
        stop.peer = Some(node.public_key().expect("a host key"));
        let stop = node.serve_batch(&mut vec![stop]);
        assert!(
            body(&stop.replies[0].1).contains(r#""stopping":true"#),
            "{}",
            body(&stop.replies[0].1)
        );
        assert!(!subscribed(&node), "its subscriptions ended");
    }

    /// A `create` whose group could not be loaded (here its blob directory cannot be made)
    /// answered `internal` but kept its row and slot: the name stayed taken (pending forever
    /// with a registry). Now nothing of it stays: not served, and a retry creates it.
    #[test]
    fn a_create_that_failed_after_its_insert_kept_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(
            GroupName::new("host").expect("name"),
            "tcp://127.0.0.1:0",
            dir.path().to_owned(),
        );
        config.host = true;
        config.insecure = true;
        config.wal_prealloc_bytes = 0;
        config.creators = crate::host::Creators::Any;
        let ctx = zmq::Context::new();
        let mut node = Node::bind(&ctx, config).expect("bind");
        let groups = dir.path().join("groups");
        let _ = std::fs::remove_dir_all(&groups);
        std::fs::write(&groups, b"not a directory").expect("write");
        let alice = Keypair::generate().expect("keys");
        let create = |id| {
            request(
                id,
                &alice,
                serde_json::json!({"action": "create", "group": "x", "user": "alice"}),
            )
        };
        let failed = node.serve_batch(&mut vec![create(1)]);
        let failed = body(&failed.replies[0].1);
        assert!(failed.contains(r#""error":"internal""#), "{failed}");
        let x = GroupName::new("x").expect("name");
        assert!(!node.groups.serves(&x));
        assert_eq!(node.groups.slot(&x), None, "its slot forgotten");

        std::fs::remove_file(&groups).expect("remove");
        let made = node.serve_batch(&mut vec![create(2)]);
        let made = body(&made.replies[0].1);
        assert!(
            made.contains(r#""ok":true"#),
            "the name is free again: {made}"
        );
        assert!(node.groups.serves(&x));
    }

    /// A `delete` whose turn does not commit (a later write of that turn fails and SQLite
    /// rolls the transaction back) leaves its group served, under its name, as before: the
    /// delete is answered `internal` and nothing of it stays.
    #[test]
    fn a_delete_rolled_back_with_its_turn_leaves_the_group_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(
            GroupName::new("host").expect("name"),
            "tcp://127.0.0.1:0",
            dir.path().to_owned(),
        );
        config.host = true;
        config.insecure = true;
        config.wal_prealloc_bytes = 0;
        config.creators = crate::host::Creators::Any;
        config.groups = vec![GroupName::new("other").expect("name")];
        let ctx = zmq::Context::new();
        let mut node = Node::bind(&ctx, config).expect("bind");
        let alice = Keypair::generate().expect("keys");
        let made = node.serve_batch(&mut vec![request(
            1,
            &alice,
            serde_json::json!({"action": "create", "group": "mine", "user": "alice"}),
        )]);
        assert!(body(&made.replies[0].1).contains(r#""ok":true"#));

        // Any message stored from now on rolls its whole transaction back.
        let db = rusqlite::Connection::open(dir.path().join("host.sqlite3")).expect("open");
        db.execute_batch(
            "CREATE TRIGGER fault BEFORE INSERT ON messages
             BEGIN SELECT RAISE(ROLLBACK, 'injected fault'); END;",
        )
        .expect("trigger");
        let served = node.serve_batch(&mut vec![
            request(
                2,
                &alice,
                serde_json::json!({"action": "delete", "group": "mine", "user": "alice"}),
            ),
            request(
                3,
                &alice,
                serde_json::json!({"action": "join", "group": "other", "user": "alice"}),
            ),
        ]);
        let delete = body(&served.replies[0].1);
        assert!(delete.contains(r#""error":"internal""#), "{delete}");
        assert!(!served.wrote);

        db.execute_batch("DROP TRIGGER fault").expect("drop");
        let info = node.serve_batch(&mut vec![request(
            4,
            &alice,
            serde_json::json!({"action": "info", "group": "mine", "user": "alice"}),
        )]);
        let info = body(&info.replies[0].1);
        assert!(info.contains(r#""ok":true"#), "still served: {info}");
        let again = node.serve_batch(&mut vec![request(
            5,
            &alice,
            serde_json::json!({"action": "delete", "group": "mine", "user": "alice"}),
        )]);
        let again = body(&again.replies[0].1);
        assert!(again.contains(r#""deleted":true"#), "{again}");
    }
}
