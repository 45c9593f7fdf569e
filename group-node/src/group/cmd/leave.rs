//! `leave`: stop being a member (idempotent).

use crate::store::GroupLog;
use agora_proto::wire::{EntryKind, MembershipReply, MembershipRequest, WireError};

use super::{store_error, Ctx};

/// # Errors
/// `internal`.
pub fn apply<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: MembershipRequest,
) -> Result<MembershipReply, WireError> {
    let caller = ctx.caller(&r.user);
    let removed = ctx
        .store
        .remove_member(&caller.principal)
        .map_err(store_error)?;
    if let Some(user) = &removed {
        ctx.subscribers.remove_member(&caller.principal);
        ctx.append_event(user, EntryKind::Leave)?;
    }
    Ok(MembershipReply {
        group: ctx.config.name.clone(),
        changed: removed.is_some(),
        user: removed.unwrap_or(caller.claimed),
        last_seq: ctx.store.last_seq(),
    })
}
