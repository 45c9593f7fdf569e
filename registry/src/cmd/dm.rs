//! Direct messages: `send_dm`, `mailbox`, `ack_dm`, `dead_letters`.
//!
//! The sender is the caller's account (by its authenticated key), never a field of the
//! request. A message that cannot be delivered is never dropped silently: it goes to the
//! sender's dead letters with the reason, and the sender is told at once.

use agora_common::keys::PublicKey;
use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    AckDmReply, AckDmRequest, BroadcastRequest, DeadLettersReply, Dm, DmAck, ErrorCode,
    MailboxReply, MailboxRequest, MulticastReply, MulticastRequest, SendDmRequest, Undelivered,
    UserEntry, UserName, WireError, MAX_MULTICAST_RECIPIENTS, MAX_PAGE_LIMIT,
};

use super::internal;
use crate::mailbox::{Copy, MailboxError};
use crate::store::RegistryStore;

/// Largest DM body, in bytes of JSON text (32 KiB).
pub const MAX_DM_BYTES: usize = 32 << 10;

fn need(peer: Option<PublicKey>) -> Result<PublicKey, WireError> {
    peer.ok_or_else(|| {
        WireError::new(
            ErrorCode::Forbidden,
            "direct messages need CURVE identities; this registry runs --insecure",
        )
    })
}

/// The caller's account, by its key.
fn account(store: &mut dyn RegistryStore, key: &PublicKey) -> Result<UserEntry, WireError> {
    store.user_by_key(key).map_err(internal)?.ok_or_else(|| {
        WireError::new(
            ErrorCode::UnknownUser,
            "this key has no account: register one to send direct messages",
        )
    })
}

/// `too_large` for a body over [`MAX_DM_BYTES`].
fn within_limit(body: &serde_json::value::RawValue) -> Result<(), WireError> {
    let len = body.get().len();
    if len > MAX_DM_BYTES {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!("body is {len} bytes; the limit is {MAX_DM_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// `send_dm`: stores the message in the recipient's mailbox (at most `max` waiting, at
/// most the store's `dm_share` of them from this sender).
///
/// # Errors
/// `unknown_user` (no such recipient: dead-lettered; or the caller has no account),
/// `blocked` (the recipient blocks the caller: dead-lettered), `share_full` (the caller
/// holds its share of the mailbox: dead-lettered), `limit_reached` (the mailbox is full:
/// dead-lettered), `too_large`, `id_conflict`, `forbidden` (no CURVE), `internal`.
/// On success, also the recipient's key and the stored message, to push to the recipient's
/// live connection (`None` for a retried duplicate, which was pushed the first time).
pub fn send(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    r: SendDmRequest,
    now: Timestamp,
    max: u64,
) -> Result<(DmAck, Option<(PublicKey, Dm)>), WireError> {
    let key = need(peer)?;
    let sender = account(store, &key)?;
    within_limit(&r.body)?;
    let Some(recipient) = store.user_by_name(&r.to).map_err(internal)? else {
        store
            .dead_letter(&key, r.to.as_str(), "unknown_user", &r.body, now)
            .map_err(internal)?;
        return Err(WireError::new(
            ErrorCode::UnknownUser,
            format!(
                "no user named {}; the message is in your dead letters",
                r.to
            ),
        ));
    };
    if store.blocks(&recipient.key, &key).map_err(internal)? {
        store
            .dead_letter(&key, r.to.as_str(), "blocked", &r.body, now)
            .map_err(internal)?;
        return Err(super::block::refusal(&r.to));
    }
    match store.store_dm(&recipient.key, &sender.name, &key, r.id, &r.body, now, max) {
        Ok((n, id, time, duplicate)) => {
            let push = (!duplicate).then(|| {
                (
                    recipient.key,
                    Dm {
                        n,
                        id,
                        time,
                        from: sender.name.clone(),
                        from_key: key,
                        body: r.body.clone(),
                    },
                )
            });
            Ok((
                DmAck {
                    n,
                    id,
                    time,
                    recipient: recipient.presence,
                    duplicate,
                },
                push,
            ))
        }
        Err(MailboxError::Full) => {
            store
                .dead_letter(&key, r.to.as_str(), "mailbox_full", &r.body, now)
                .map_err(internal)?;
            Err(WireError::new(
                ErrorCode::LimitReached,
                format!(
                    "{}'s mailbox is full; the message is in your dead letters",
                    r.to
                ),
            ))
        }
        Err(MailboxError::ShareFull) => {
            store
                .dead_letter(&key, r.to.as_str(), "share_full", &r.body, now)
                .map_err(internal)?;
            Err(WireError::new(
                ErrorCode::ShareFull,
                format!(
                    "you already have your share of messages waiting in {}'s mailbox; \
                     the message is in your dead letters: send again once they read theirs",
                    r.to
                ),
            ))
        }
        Err(MailboxError::IdConflict(id)) => Err(WireError::new(
            ErrorCode::IdConflict,
            format!("message id {id} is already used by a different message"),
        )),
        Err(MailboxError::Store(e)) => Err(internal(e)),
    }
}

/// `mailbox`: the caller's messages after `r.after_n`.
///
/// # Errors
/// `invalid_field` (limit out of range), `forbidden` (no CURVE), `internal`.
pub fn mailbox(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    r: MailboxRequest,
) -> Result<MailboxReply, WireError> {
    let key = need(peer)?;
    let limit = r.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE_LIMIT {
        return Err(WireError::new(
            ErrorCode::InvalidField,
            format!("limit must be from 1 to {MAX_PAGE_LIMIT}"),
        ));
    }
    let (messages, more) = store.fetch_dms(&key, r.after_n, limit).map_err(internal)?;
    Ok(MailboxReply { messages, more })
}

/// `ack_dm`: removes the caller's messages up to `r.up_to`.
///
/// # Errors
/// `forbidden` (no CURVE), `internal`.
pub fn ack(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    r: AckDmRequest,
) -> Result<AckDmReply, WireError> {
    let key = need(peer)?;
    Ok(AckDmReply {
        removed: store.ack_dms(&key, r.up_to).map_err(internal)?,
    })
}

/// `dead_letters`: the caller's undeliverable messages.
///
/// # Errors
/// `forbidden` (no CURVE), `internal`.
pub fn dead_letters(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
) -> Result<DeadLettersReply, WireError> {
    let key = need(peer)?;
    Ok(DeadLettersReply {
        letters: store.dead_letters(&key).map_err(internal)?,
    })
}

/// Who may `broadcast`, and how full a mailbox may get.
#[derive(Debug, Clone, Copy)]
pub struct FanOut<'a> {
    /// The operator's key (`--operator`).
    pub operator: Option<PublicKey>,
    /// Accounts the operator names as admins (`--admin`).
    pub admins: &'a [UserName],
    /// Messages waiting per mailbox at most (`--max-mailbox`).
    pub max: u64,
}

/// What a fan-out asks for: its recipients, body and id.
#[derive(Debug)]
pub enum FanOutRequest {
    /// `multicast` to these names.
    Multicast(MulticastRequest),
    /// `broadcast` to every account but the sender's.
    Broadcast(BroadcastRequest),
}

/// `multicast` and `broadcast`: a copy of one message in each recipient's mailbox, all in
/// one transaction (one commit however many recipients); recipients that do not exist,
/// block the sender, or whose mailbox (or the sender's share of it) is full are in the
/// reply and in the sender's dead letters. Each copy's id
/// is derived from the message id and the recipient ([`crate::mailbox::copy_id`]), so a
/// retry with the same id stores nothing twice.
///
/// # Errors
/// `unknown_user` (the caller has no account), `forbidden` (no CURVE; a `broadcast` from
/// neither the operator nor an admin), `invalid_field` (no recipient, or more than 1,000),
/// `too_large` (the body), `id_conflict` (the id was used for another message), `internal`.
/// On success, also the stored copies to push to recipients' live connections.
pub fn fan_out(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    request: FanOutRequest,
    now: Timestamp,
    rules: FanOut<'_>,
) -> Result<(MulticastReply, Vec<(PublicKey, Dm)>), WireError> {
    let key = need(peer)?;
    let sender = account(store, &key)?;
    let (names, body, id) = match request {
        FanOutRequest::Multicast(r) => {
            if r.to.is_empty() || r.to.len() > MAX_MULTICAST_RECIPIENTS {
                return Err(WireError::new(
                    ErrorCode::InvalidField,
                    format!("to: 1 to {MAX_MULTICAST_RECIPIENTS} recipients"),
                ));
            }
            let mut to = r.to;
            to.sort();
            to.dedup();
            (Some(to), r.body, r.id)
        }
        FanOutRequest::Broadcast(r) => {
            if Some(key) != rules.operator && !rules.admins.contains(&sender.name) {
                return Err(WireError::new(
                    ErrorCode::Forbidden,
                    "only the registry's operator and admins may broadcast",
                ));
            }
            (None, r.body, r.id)
        }
    };
    within_limit(&body)?;
    let id = id.unwrap_or_else(MessageId::new_v7);
    let mut refused: Vec<(String, &'static str)> = Vec::new();
    let recipients: Vec<UserEntry> = match names {
        Some(names) => {
            let mut found = Vec::with_capacity(names.len());
            for name in names {
                match store.user_by_name(&name).map_err(internal)? {
                    Some(entry) => found.push(entry),
                    None => refused.push((name.as_str().to_owned(), "unknown_user")),
                }
            }
            found
        }
        None => store
            .all_users()
            .map_err(internal)?
            .into_iter()
            .filter(|u| u.key != key)
            .collect(),
    };
    let blockers = store.blockers_of(&key).map_err(internal)?;
    let mut open = Vec::with_capacity(recipients.len());
    for u in recipients {
        if blockers.contains(&u.key) {
            refused.push((u.name.as_str().to_owned(), "blocked"));
        } else {
            open.push(u);
        }
    }
    let recipients = open;
    let copies: Vec<(PublicKey, UserName, MessageId)> = recipients
        .into_iter()
        .map(|u| (u.key, u.name, crate::mailbox::copy_id(&id, &u.key)))
        .collect();
    let stored = store
        .store_dms(&copies, &refused, &sender.name, &key, &body, now, rules.max)
        .map_err(|e| match e {
            MailboxError::IdConflict(_) => WireError::new(
                ErrorCode::IdConflict,
                format!("message id {id} is already used by a different message"),
            ),
            MailboxError::Store(e) => internal(e),
            // `store_dms` reports a full mailbox per copy, never for the whole request.
            MailboxError::Full | MailboxError::ShareFull => {
                WireError::new(ErrorCode::Internal, "registry storage failure; retry later")
            }
        })?;
    let mut reply = MulticastReply {
        id,
        stored: 0,
        duplicates: 0,
        undelivered: refused
            .into_iter()
            .map(|(to, reason)| Undelivered {
                to,
                reason: match reason {
                    "blocked" => ErrorCode::Blocked,
                    _ => ErrorCode::UnknownUser,
                },
            })
            .collect(),
    };
    let mut push = Vec::new();
    for copy in stored {
        match copy {
            Copy::Stored {
                duplicate: true, ..
            } => reply.duplicates += 1,
            Copy::Stored {
                recipient,
                n,
                id,
                time,
                duplicate: false,
            } => {
                reply.stored += 1;
                push.push((
                    recipient,
                    Dm {
                        n,
                        id,
                        time,
                        from: sender.name.clone(),
                        from_key: key,
                        body: body.clone(),
                    },
                ));
            }
            Copy::Full(name) => reply.undelivered.push(Undelivered {
                to: name.as_str().to_owned(),
                reason: ErrorCode::LimitReached,
            }),
            Copy::ShareFull(name) => reply.undelivered.push(Undelivered {
                to: name.as_str().to_owned(),
                reason: ErrorCode::ShareFull,
            }),
        }
    }
    Ok((reply, push))
}
