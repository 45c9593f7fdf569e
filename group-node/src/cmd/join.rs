//! `join`: become a member (idempotent).

use agora_common::proto::{EntryKind, ErrorCode, MembershipReply, MembershipRequest, WireError};
use agora_common::store::GroupStore;

use super::{store_error, Ctx};
use crate::identity::caller;

/// # Errors
/// `unknown_group`, `limit_reached` (the group has `max_members`), `internal`.
pub fn apply<S: GroupStore>(
    ctx: &mut Ctx<'_, S>,
    r: MembershipRequest,
) -> Result<MembershipReply, WireError> {
    ctx.check_group(r.group.as_ref())?;
    let caller = caller(&r.user);
    let already = ctx.store.is_member(&caller.user).map_err(store_error)?;
    if !already && ctx.store.member_count() >= ctx.config.max_members {
        return Err(WireError::new(
            ErrorCode::LimitReached,
            format!(
                "\"{}\" has its maximum of {} members",
                ctx.config.name, ctx.config.max_members
            ),
        ));
    }
    let changed = ctx
        .store
        .add_member(&caller.user, ctx.now)
        .map_err(store_error)?;
    if changed {
        ctx.append_event(&caller.user, EntryKind::Join)?;
    }
    Ok(MembershipReply {
        group: ctx.config.name.clone(),
        user: caller.user,
        changed,
        last_seq: ctx.store.last_seq(),
    })
}
