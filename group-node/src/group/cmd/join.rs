//! `join`: become a member (idempotent). Banned keys are refused, and a private group takes
//! only invited keys (and its owner and admins).

use crate::store::{Grant, GroupLog};
use agora_proto::wire::{
    EntryKind, ErrorCode, GroupMode, MembershipReply, MembershipRequest, WireError,
};

use super::policy::{role, Role};
use super::{store_error, Ctx};

/// # Errors
/// `banned`, `not_invited`, `name_taken` (another member has that name),
/// `limit_reached` (the group has `max_members`), `internal`.
pub fn apply<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: MembershipRequest,
) -> Result<MembershipReply, WireError> {
    let caller = ctx.caller(&r.user);
    if ctx
        .store
        .has(&caller.principal, Grant::Ban)
        .map_err(store_error)?
    {
        return Err(WireError::new(
            ErrorCode::Banned,
            format!("this key is banned from \"{}\"", ctx.config.name),
        ));
    }
    let already = ctx
        .store
        .member(&caller.principal)
        .map_err(store_error)?
        .is_some();
    if !already
        && ctx.store.mode().map_err(store_error)? == GroupMode::Private
        && role(ctx, &caller)? == Role::Other
        && !ctx
            .store
            .has(&caller.principal, Grant::Invite)
            .map_err(store_error)?
    {
        return Err(WireError::new(
            ErrorCode::NotInvited,
            format!(
                "\"{}\" is private; its owner or an admin must invite this key first",
                ctx.config.name
            ),
        ));
    }
    if !already && ctx.store.member_count() >= ctx.config.max_members {
        return Err(WireError::new(
            ErrorCode::LimitReached,
            format!(
                "\"{}\" has its maximum of {} members",
                ctx.config.name, ctx.config.max_members
            ),
        ));
    }
    let (user, changed) = ctx
        .store
        .add_member(&caller.principal, &caller.claimed, ctx.now)
        .map_err(store_error)?;
    if changed {
        ctx.append_event(&user, EntryKind::Join)?;
    }
    Ok(MembershipReply {
        group: ctx.config.name.clone(),
        user,
        changed,
        last_seq: ctx.store.last_seq(),
    })
}
