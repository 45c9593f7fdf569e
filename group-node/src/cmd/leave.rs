//! `leave`: stop being a member (idempotent).

use agora_common::proto::{EntryKind, MembershipReply, MembershipRequest, WireError};
use agora_common::store::GroupStore;

use super::{store_error, Ctx};
use crate::identity::caller;

/// # Errors
/// `unknown_group`, `internal`.
pub fn apply<S: GroupStore>(
    ctx: &mut Ctx<'_, S>,
    r: MembershipRequest,
) -> Result<MembershipReply, WireError> {
    ctx.check_group(r.group.as_ref())?;
    let caller = caller(&r.user);
    let changed = ctx.store.remove_member(&caller.user).map_err(store_error)?;
    if changed {
        ctx.subscribers.remove_user(&caller.user);
        ctx.append_event(&caller.user, EntryKind::Leave)?;
    }
    Ok(MembershipReply {
        group: ctx.config.name.clone(),
        user: caller.user,
        changed,
        last_seq: ctx.store.last_seq(),
    })
}
