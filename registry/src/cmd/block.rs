//! Blocking senders of direct messages: `block`, `unblock`, `blocked` (PROTOCOL §4.6.2).
//!
//! A block is the blocker's account refusing direct messages from another account's key;
//! it holds for that key whatever name it takes later, and is removed with the blocker's
//! account. Blocks need an account (`no_account`) and CURVE (`forbidden`).

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    BlockReply, BlockedReply, ErrorCode, UserName, UserNameRequest, WireError,
};

use super::internal;
use super::users::own_account;
use crate::store::RegistryStore;

fn need(peer: Option<PublicKey>) -> Result<PublicKey, WireError> {
    peer.ok_or_else(|| {
        WireError::new(
            ErrorCode::Forbidden,
            "blocks need CURVE identities; this registry runs --insecure",
        )
    })
}

/// `block`: from now on, direct messages (and `multicast`, `broadcast` copies) from the
/// account `r.name` to the caller are refused with `blocked` and go to their sender's dead
/// letters. Blocking again is not an error (`changed: false`).
///
/// # Errors
/// `no_account` (the caller has none), `unknown_user` (no account `r.name`),
/// `invalid_field` (the caller's own name), `limit_reached` (the caller blocks
/// [`crate::store::MAX_BLOCKS`] users already), `forbidden` (no CURVE), `internal`.
pub fn block(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    r: UserNameRequest,
    now: Timestamp,
) -> Result<BlockReply, WireError> {
    let key = need(peer)?;
    own_account(store, &key)?;
    let target = store
        .user_by_name(&r.name)
        .map_err(internal)?
        .ok_or_else(|| {
            WireError::new(ErrorCode::UnknownUser, format!("no user named {}", r.name))
        })?;
    if target.key == key {
        return Err(WireError::new(
            ErrorCode::InvalidField,
            "name: you cannot block yourself",
        ));
    }
    let changed = store.block(&key, &target, now).map_err(internal)??;
    if changed {
        tracing::info!(blocker = %key, blocked = %target.key, "user blocked");
    }
    Ok(BlockReply {
        name: r.name,
        changed,
    })
}

/// `unblock`: lifts the caller's block of the user blocked as `r.name` (or of the key that
/// holds the account `r.name` now). Unblocking a user not blocked is not an error
/// (`changed: false`).
///
/// # Errors
/// `no_account`, `forbidden` (no CURVE), `internal`.
pub fn unblock(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    r: UserNameRequest,
) -> Result<BlockReply, WireError> {
    let key = need(peer)?;
    own_account(store, &key)?;
    let now_holder = store
        .user_by_name(&r.name)
        .map_err(internal)?
        .map(|u| u.key);
    let changed = store
        .unblock(&key, &r.name, now_holder.as_ref())
        .map_err(internal)?;
    Ok(BlockReply {
        name: r.name,
        changed,
    })
}

/// `blocked`: the users the caller blocks, sorted by name.
///
/// # Errors
/// `no_account`, `forbidden` (no CURVE), `internal`.
pub fn blocked(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
) -> Result<BlockedReply, WireError> {
    let key = need(peer)?;
    own_account(store, &key)?;
    Ok(BlockedReply {
        blocked: store.blocked(&key).map_err(internal)?,
    })
}

/// Whether `recipient` blocks `sender`: the `blocked` refusal for a `send_dm`.
pub(crate) fn refusal(name: &UserName) -> WireError {
    WireError::new(
        ErrorCode::Blocked,
        format!(
            "{name} does not accept direct messages from you; the message is in your dead letters"
        ),
    )
}
