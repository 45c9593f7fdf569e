//! `unsubscribe`: stop the live stream to the calling connection.

use crate::store::GroupStore;
use agora_proto::wire::{MembershipRequest, UnsubscribeReply, WireError};

use super::Ctx;

/// # Errors
/// `unknown_group`.
pub fn apply<S: GroupStore + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: MembershipRequest,
) -> Result<UnsubscribeReply, WireError> {
    ctx.check_group(r.group.as_ref())?;
    Ok(UnsubscribeReply {
        group: ctx.config.name.clone(),
        changed: ctx.subscribers.unsubscribe(ctx.envelope),
    })
}
