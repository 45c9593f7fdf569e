//! `send`: append a message to the log (members only). The ack is sent after the batch
//! holding the append commits.

use crate::store::GroupStore;
use agora_proto::wire::{EntryKind, ErrorCode, SendAck, SendRequest, WireError};

use super::Ctx;

/// # Errors
/// `unknown_group`, `not_member`, `too_large` (body over `max_message_bytes`),
/// `id_conflict`, `internal`.
pub fn apply<S: GroupStore>(ctx: &mut Ctx<'_, S>, r: SendRequest) -> Result<SendAck, WireError> {
    ctx.check_group(r.group.as_ref())?;
    // The sender is the member the authenticated caller is, whatever `user` claims.
    let sender = ctx.require_member(&ctx.caller(&r.user))?;
    let len = r.body.get().len();
    if len > ctx.config.max_message_bytes {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "body is {len} bytes; the limit is {} bytes",
                ctx.config.max_message_bytes
            ),
        ));
    }
    ctx.append(&sender, EntryKind::Message, &r.body, r.id)
}
