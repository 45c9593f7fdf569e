//! Direct messages: `send_dm`, `mailbox`, `ack_dm`, `dead_letters`.
//!
//! The sender is the caller's account (by its authenticated key), never a field of the
//! request. A message that cannot be delivered is never dropped silently: it goes to the
//! sender's dead letters with the reason, and the sender is told at once.

use std::time::Instant;

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    AckDmReply, AckDmRequest, DeadLettersReply, Dm, DmAck, ErrorCode, MailboxReply, MailboxRequest,
    SendDmRequest, WireError, MAX_PAGE_LIMIT,
};

use crate::mailbox::{MailboxError, Mailboxes};
use crate::owners::OwnersError;
use crate::presence::Sessions;
use crate::users::Users;

/// Largest DM body, in bytes of JSON text (32 KiB).
pub const MAX_DM_BYTES: usize = 32 << 10;

fn need<'a>(
    users: Option<&'a Users>,
    mailboxes: Option<&'a mut Mailboxes>,
    peer: Option<PublicKey>,
) -> Result<(&'a Users, &'a mut Mailboxes, PublicKey), WireError> {
    match (users, mailboxes, peer) {
        (Some(u), Some(m), Some(k)) => Ok((u, m, k)),
        _ => Err(WireError::new(
            ErrorCode::Forbidden,
            "direct messages need CURVE identities; this registry runs --insecure",
        )),
    }
}

fn internal(e: OwnersError) -> WireError {
    tracing::error!(error = %e, "mailbox store failed");
    WireError::new(ErrorCode::Internal, "registry storage failure; retry later")
}

/// `send_dm`: stores the message in the recipient's mailbox (at most `max` waiting).
///
/// # Errors
/// `unknown_user` (no such recipient: dead-lettered; or the caller has no account),
/// `limit_reached` (the mailbox is full: dead-lettered), `too_large`, `id_conflict`,
/// `forbidden` (no CURVE), `internal`.
/// On success, also the recipient's key and the stored message, to push to the recipient's
/// live connection (`None` for a retried duplicate, which was pushed the first time).
pub fn send(
    users: Option<&Users>,
    mailboxes: Option<&mut Mailboxes>,
    sessions: &Sessions,
    peer: Option<PublicKey>,
    r: SendDmRequest,
    now: Timestamp,
    max: u64,
) -> Result<(DmAck, Option<(PublicKey, Dm)>), WireError> {
    let (users, mailboxes, key) = need(users, mailboxes, peer)?;
    let sender = users.by_key(&key).map_err(internal)?.ok_or_else(|| {
        WireError::new(
            ErrorCode::UnknownUser,
            "this key has no account: register one to send direct messages",
        )
    })?;
    let len = r.body.get().len();
    if len > MAX_DM_BYTES {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!("body is {len} bytes; the limit is {MAX_DM_BYTES} bytes"),
        ));
    }
    let Some(recipient) = users.by_name(&r.to).map_err(internal)? else {
        mailboxes
            .dead(&key, r.to.as_str(), "unknown_user", &r.body, now)
            .map_err(internal)?;
        return Err(WireError::new(
            ErrorCode::UnknownUser,
            format!(
                "no user named {}; the message is in your dead letters",
                r.to
            ),
        ));
    };
    match mailboxes.store(&recipient.key, &sender.name, &key, r.id, &r.body, now, max) {
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
                    recipient: sessions.presence(&recipient.key, Instant::now()),
                    duplicate,
                },
                push,
            ))
        }
        Err(MailboxError::Full) => {
            mailboxes
                .dead(&key, r.to.as_str(), "mailbox_full", &r.body, now)
                .map_err(internal)?;
            Err(WireError::new(
                ErrorCode::LimitReached,
                format!(
                    "{}'s mailbox is full; the message is in your dead letters",
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
    users: Option<&Users>,
    mailboxes: Option<&mut Mailboxes>,
    peer: Option<PublicKey>,
    r: MailboxRequest,
) -> Result<MailboxReply, WireError> {
    let (_, mailboxes, key) = need(users, mailboxes, peer)?;
    let limit = r.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE_LIMIT {
        return Err(WireError::new(
            ErrorCode::InvalidField,
            format!("limit must be from 1 to {MAX_PAGE_LIMIT}"),
        ));
    }
    let (messages, more) = mailboxes.fetch(&key, r.after_n, limit).map_err(internal)?;
    Ok(MailboxReply { messages, more })
}

/// `ack_dm`: removes the caller's messages up to `r.up_to`.
///
/// # Errors
/// `forbidden` (no CURVE), `internal`.
pub fn ack(
    users: Option<&Users>,
    mailboxes: Option<&mut Mailboxes>,
    peer: Option<PublicKey>,
    r: AckDmRequest,
) -> Result<AckDmReply, WireError> {
    let (_, mailboxes, key) = need(users, mailboxes, peer)?;
    Ok(AckDmReply {
        removed: mailboxes.ack(&key, r.up_to).map_err(internal)?,
    })
}

/// `dead_letters`: the caller's undeliverable messages.
///
/// # Errors
/// `forbidden` (no CURVE), `internal`.
pub fn dead_letters(
    users: Option<&Users>,
    mailboxes: Option<&mut Mailboxes>,
    peer: Option<PublicKey>,
) -> Result<DeadLettersReply, WireError> {
    let (_, mailboxes, key) = need(users, mailboxes, peer)?;
    Ok(DeadLettersReply {
        letters: mailboxes.dead_letters(&key).map_err(internal)?,
    })
}
