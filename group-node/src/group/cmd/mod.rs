//! One handler per group-node action. Each takes the decoded request and a [`Ctx`], and
//! returns the reply body or a [`WireError`]; none touches the socket. The request was
//! routed to this group by its `group` already (the host's `route`): no handler checks it. Writes go into the
//! store's open batch and are acked by the caller after the batch commits.

use std::time::Instant;

use crate::store::{GroupLog, NewMessage, StoreError};
use agora_proto::codec::Frames;
use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::{Attachment, EntryKind, ErrorCode, Message, SendAck, UserName, WireError};
use serde_json::value::RawValue;

use crate::group::identity::Caller;
use crate::group::subscribers::Subscribers;
use crate::group::GroupConfig;

pub mod files;
pub mod get_messages;
pub mod info;
pub mod join;
pub mod leave;
pub mod members;
pub mod policy;
pub mod send;
pub mod subscribe;
pub mod unsubscribe;

/// What a handler may use.
pub struct Ctx<'a, S: GroupLog + ?Sized> {
    /// The group's store, inside an open batch.
    pub store: &'a mut S,
    /// The group's settings.
    pub config: &'a GroupConfig,
    /// The wall-clock time of this batch.
    pub now: Timestamp,
    /// The monotonic time of this batch, for leases.
    pub instant: Instant,
    /// The caller's envelope: identifies its connection for `subscribe`.
    pub envelope: &'a Frames,
    /// The live subscribers.
    pub subscribers: &'a mut Subscribers,
    /// Attachments' bytes.
    pub blobs: &'a crate::group::blobs::Blobs,
    /// Uploads whose last chunk this request wrote, to seal off the loop (digest, verified):
    /// their reply waits for the seal.
    pub sealing: &'a mut Vec<(crate::group::blobs::Slot, bool)>,
    /// Entries appended in this batch, pushed to subscribers once it commits.
    pub appended: &'a mut Vec<Message>,
    /// The caller's authenticated CURVE key (`None` on an `--insecure` node).
    pub peer: Option<agora_common::keys::PublicKey>,
    /// The group owner's key (`None` on an `--insecure` node).
    pub owner: Option<agora_common::keys::PublicKey>,
}

impl<S: GroupLog + ?Sized> Ctx<'_, S> {
    /// The caller of a request claiming to be `claimed` (see [`crate::group::identity`]).
    pub fn caller(&self, claimed: &UserName) -> Caller {
        crate::group::identity::caller(claimed, self.peer)
    }

    /// Checks that `caller` is a member; returns the name bound to them in this group.
    ///
    /// # Errors
    /// `not_member`; `internal` if the store fails.
    pub fn require_member(&self, caller: &Caller) -> Result<UserName, WireError> {
        match self.store.member(&caller.principal).map_err(store_error)? {
            Some(name) => Ok(name),
            None => Err(WireError::new(
                ErrorCode::NotMember,
                format!(
                    "{} is not a member of \"{}\"",
                    caller.claimed, self.config.name
                ),
            )),
        }
    }
}

impl<S: GroupLog + ?Sized> Ctx<'_, S> {
    /// Appends an entry and queues it for the push after the commit (unless it is a
    /// retried duplicate, which was pushed the first time).
    ///
    /// # Errors
    /// `id_conflict`, `internal`.
    pub fn append(
        &mut self,
        sender: &UserName,
        kind: EntryKind,
        body: &RawValue,
        id: Option<MessageId>,
        attachment: Option<&Attachment>,
    ) -> Result<SendAck, WireError> {
        let ack = self
            .store
            .append(NewMessage {
                sender,
                kind,
                sender_key: self.peer,
                body,
                id,
                now: self.now,
                attachment,
            })
            .map_err(store_error)?;
        if !ack.duplicate {
            self.appended.push(Message {
                seq: ack.seq,
                id: ack.id,
                time: ack.time,
                sender: sender.clone(),
                kind,
                body: body.to_owned(),
                sender_key: self.peer,
                attachment: attachment.cloned(),
            });
        }
        Ok(ack)
    }

    /// Appends a `join` or `leave` event for `user`.
    ///
    /// # Errors
    /// `internal`.
    pub fn append_event(&mut self, user: &UserName, kind: EntryKind) -> Result<(), WireError> {
        let null = RawValue::from_string("null".to_owned())
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("event body: {e}")))?;
        self.append(user, kind, &null, None, None).map(|_| ())
    }
}

/// Maps a storage failure to its wire error: `id_conflict` for a reused id, `internal`
/// (logged) for the rest.
pub fn store_error(e: StoreError) -> WireError {
    match e {
        StoreError::IdConflict(id) => WireError::new(
            ErrorCode::IdConflict,
            format!("message id {id} is already used by a different message"),
        ),
        StoreError::LabelTaken(name) => WireError::new(
            ErrorCode::NameTaken,
            format!("the user name {name} belongs to another member of this group"),
        ),
        other => {
            if other.is_logged() {
                tracing::debug!(error = %other, "store failed");
            } else {
                tracing::error!(error = %other, "store failed");
            }
            WireError::new(ErrorCode::Internal, "storage failure; retry later")
        }
    }
}
