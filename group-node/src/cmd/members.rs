//! `members`: the member list. Open to anyone for now; private groups (security issue)
//! will restrict it.

use agora_common::proto::{MembersReply, MembersRequest, WireError};
use agora_common::store::GroupStore;

use super::{store_error, Ctx};

/// # Errors
/// `unknown_group`, `internal`.
pub fn apply<S: GroupStore>(
    ctx: &mut Ctx<'_, S>,
    r: MembersRequest,
) -> Result<MembersReply, WireError> {
    ctx.check_group(r.group.as_ref())?;
    Ok(MembersReply {
        group: ctx.config.name.clone(),
        members: ctx.store.members().map_err(store_error)?,
    })
}
