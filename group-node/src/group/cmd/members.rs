//! `members`: the member list. Open to anyone in an open group; in a private group only
//! members see it.

use crate::store::{GroupLog, Principal};
use agora_proto::wire::{ErrorCode, GroupMode, MembersReply, MembersRequest, WireError};

use super::{store_error, Ctx};

/// # Errors
/// `not_member` (a private group, asked by a non-member), `internal`.
pub fn apply<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    _r: MembersRequest,
) -> Result<MembersReply, WireError> {
    if ctx.store.mode().map_err(store_error)? == GroupMode::Private {
        let member = match ctx.peer {
            Some(key) => ctx
                .store
                .member(&Principal::key(&key))
                .map_err(store_error)?
                .is_some(),
            None => false,
        };
        if !member {
            return Err(WireError::new(
                ErrorCode::NotMember,
                format!(
                    "\"{}\" is private: only members see its members",
                    ctx.config.name
                ),
            ));
        }
    }
    Ok(MembersReply {
        group: ctx.config.name.clone(),
        members: ctx.store.members().map_err(store_error)?,
    })
}
