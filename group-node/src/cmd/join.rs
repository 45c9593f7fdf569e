//! `join`: become a member (idempotent).

use agora_common::proto::{EntryKind, ErrorCode, MembershipReply, MembershipRequest, WireError};
use agora_common::store::GroupStore;

use super::{store_error, Ctx};

/// # Errors
/// `unknown_group`, `limit_reached` (the group has `max_members`), `internal`.
pub fn apply<S: GroupStore>(
    ctx: &mut Ctx<'_, S>,
    r: MembershipRequest,
) -> Result<MembershipReply, WireError> {
    ctx.check_group(r.group.as_ref())?;
    let caller = ctx.caller(&r.user);
    let already = ctx
        .store
        .member(&caller.principal)
        .map_err(store_error)?
        .is_some();
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
