//! `info`: the group's name, last seq and member count. Open to anyone.

use crate::store::GroupLog;
use agora_proto::wire::{InfoReply, InfoRequest, WireError};

use super::Ctx;

/// # Errors
/// None.
pub fn apply<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    _r: InfoRequest,
) -> Result<InfoReply, WireError> {
    Ok(InfoReply {
        group: ctx.config.name.clone(),
        last_seq: ctx.store.last_seq(),
        members: ctx.store.member_count(),
        max_message_bytes: u64::try_from(ctx.config.max_message_bytes).unwrap_or(u64::MAX),
        mode: ctx.store.mode().map_err(super::store_error)?,
    })
}
