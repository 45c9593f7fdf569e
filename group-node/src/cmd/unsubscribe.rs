//! `unsubscribe`: stop the live stream to the calling connection.

use agora_common::proto::{MembershipRequest, UnsubscribeReply, WireError};
use agora_common::store::GroupStore;

use super::Ctx;

/// # Errors
/// `unknown_group`.
pub fn apply<S: GroupStore>(
    ctx: &mut Ctx<'_, S>,
    r: MembershipRequest,
) -> Result<UnsubscribeReply, WireError> {
    ctx.check_group(r.group.as_ref())?;
    Ok(UnsubscribeReply {
        group: ctx.config.name.clone(),
        changed: ctx.subscribers.unsubscribe(ctx.envelope),
    })
}
