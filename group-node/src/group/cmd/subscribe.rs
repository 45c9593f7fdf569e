//! `subscribe`: start or renew the live stream to the calling connection (members only), and
//! take its ack (`acked_seq`), which frees its push budget.

use crate::store::GroupLog;
use agora_proto::wire::{SubscribeReply, SubscribeRequest, WireError};

use super::Ctx;
use crate::group::subscribers::SubscribeOptions;

/// # Errors
/// `not_member`, `limit_reached` (the member's connection bound, or a full
/// node where nobody holds more subscriptions than the caller would).
pub fn apply<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: SubscribeRequest,
) -> Result<SubscribeReply, WireError> {
    let caller = ctx.caller(&r.user);
    ctx.require_member(&caller)?;
    let last_seq = ctx.store.last_seq();
    let options = SubscribeOptions {
        batch: r.batch,
        // An ack past the log acks everything pushed (nothing past it was).
        acked_seq: r.acked_seq.map(|s| s.min(last_seq)),
    };
    ctx.subscribers
        .subscribe_with(ctx.envelope, &caller.principal, ctx.instant, options)?;
    Ok(SubscribeReply {
        group: ctx.config.name.clone(),
        last_seq,
        lease_ms: u64::try_from(ctx.subscribers.lease().as_millis()).unwrap_or(u64::MAX),
        budget_bytes: u64::try_from(ctx.subscribers.budget()).unwrap_or(u64::MAX),
    })
}
