//! `unsubscribe`: stop the live stream to the calling connection.

use crate::store::GroupLog;
use agora_proto::wire::{MembershipRequest, UnsubscribeReply, WireError};

use super::Ctx;

/// # Errors
/// None.
pub fn apply<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    _r: MembershipRequest,
) -> Result<UnsubscribeReply, WireError> {
    Ok(UnsubscribeReply {
        group: ctx.config.name.clone(),
        changed: ctx.subscribers.unsubscribe(ctx.envelope),
    })
}
