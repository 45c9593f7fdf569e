//! `subscribe`: start or renew the live stream to the calling connection (members only).

use agora_common::proto::{MembershipRequest, SubscribeReply, WireError};
use agora_common::store::GroupStore;

use super::Ctx;

/// # Errors
/// `unknown_group`, `not_member`, `limit_reached` (the node's subscription bound).
pub fn apply<S: GroupStore>(
    ctx: &mut Ctx<'_, S>,
    r: MembershipRequest,
) -> Result<SubscribeReply, WireError> {
    ctx.check_group(r.group.as_ref())?;
    let caller = ctx.caller(&r.user);
    ctx.require_member(&caller)?;
    ctx.subscribers
        .subscribe(ctx.envelope, &caller.principal, ctx.instant)?;
    Ok(SubscribeReply {
        group: ctx.config.name.clone(),
        last_seq: ctx.store.last_seq(),
        lease_ms: u64::try_from(ctx.subscribers.lease().as_millis()).unwrap_or(u64::MAX),
    })
}
