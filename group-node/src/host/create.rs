//! `create` and `delete` (PROTOCOL §6.11): they change the host's table of groups, not one
//! group's rules, so they live in the host.
//!
//! A `create` first has the registrar register the name (when the host has a registry; the
//! loop waits for that answer, at most 2 s), then inserts the group (live), its creator's
//! membership and `join` entry in the turn's transaction: its reply leaves after that turn's
//! sync, like any write. If the turn rolls back, the group is forgotten and unregistered.
//! (The plan's pending rows, registered after the sync without holding the loop, are not
//! built: a crash between the registration and the commit leaves a registered name that
//! expires with the host's heartbeat.) A `delete` archives the group (its rows stay), frees its name
//! on the host at once, ends its subscriptions and unregisters it.

use std::collections::BTreeSet;

use agora_common::keys::PublicKey;
use agora_proto::action::NodeRequest;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    CreateReply, CreateRequest, DeleteReply, ErrorCode, GroupMode, HostedGroup, MembershipRequest,
    UserName, WireError,
};

use super::groups::Hosted;
use super::Node;
use crate::group::{Applied, Input};
use crate::registrar::RegistrarError;
use crate::store::{GroupLog, GroupState, NewGroup, Principal, StoreError};

impl Node {
    /// `create {group, user, mode}` on a group host: the caller owns the new group.
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
    ) -> Result<CreateReply, WireError> {
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
        if self.groups.slot(&r.group).is_some() {
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
        self.register_first(&r)?;
        let gid = match self.db.insert_group(NewGroup {
            name: &r.group,
            owner: Some(&principal),
            created_by: Some(&principal),
            mode: r.mode,
            state: GroupState::Live,
            at: input.now,
        }) {
            Ok(gid) => gid,
            Err(e) => {
                if let Some(registrar) = &self.registrar {
                    registrar.remove(r.group.clone());
                }
                return Err(match e {
                    StoreError::NameTaken(_) => name_taken(&r),
                    e => crate::group::store_error(e),
                });
            }
        };
        let slot = self.groups.insert(Hosted {
            name: r.group.clone(),
            gid,
            owner: Some(peer),
            stopped: false,
            loaded: None,
        });
        self.created.push(slot);
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
        let last_seq = l.log.last_seq();
        tracing::info!(group = %r.group, %gid, by = %peer, "group created");
        Ok(CreateReply {
            group: r.group,
            mode: r.mode,
            owner: peer,
            last_seq,
        })
    }

    /// Registers the name of a group about to be created, when the host has a registry, and
    /// waits for the registry's answer (at most [`REGISTER_WAIT`], on the loop: a create
    /// costs its host one registry round trip).
    ///
    /// # Errors
    /// `name_taken` (the registry binds the name to another key, or another live endpoint
    /// holds it), the registry's `limit_reached`; `internal` when it does not answer
    /// (nothing was created).
    fn register_first(&self, r: &CreateRequest) -> Result<(), WireError> {
        let Some(registrar) = &self.registrar else {
            return Ok(());
        };
        let answer = registrar
            .register_now(vec![HostedGroup {
                name: r.group.clone(),
                members: 1,
            }])
            .recv_timeout(REGISTER_WAIT);
        match answer {
            Ok((_, Ok(()))) => Ok(()),
            Ok((_, Err(RegistrarError::Refused(e)))) => {
                let code = match e.code {
                    ErrorCode::LimitReached | ErrorCode::TooManyNames => ErrorCode::LimitReached,
                    _ => ErrorCode::NameTaken,
                };
                Err(WireError::new(
                    code,
                    format!("the registry refused \"{}\": {}", r.group, e.message),
                ))
            }
            Ok((_, Err(e))) => Err(unregistered(&e.to_string())),
            Err(_) => Err(unregistered("no answer")),
        }
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
        let hosted = self.groups.get_mut(slot);
        if let Some(l) = hosted.loaded.as_deref_mut() {
            l.group.end_subscriptions();
        }
        self.groups.forget(slot);
        if let Some(registrar) = &self.registrar {
            registrar.remove(name.clone());
        }
        tracing::info!(group = %name, %gid, "group deleted (archived)");
        Ok(DeleteReply {
            group: name,
            deleted: true,
        })
    }
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
