//! `get_messages`: read the log (members only), one bounded page at a time.

use crate::store::GroupLog;
use agora_proto::wire::{
    ErrorCode, GetMessagesRequest, HistoryQuery, MessagesPage, WireError, MAX_PAGE_BYTES,
};

use super::{store_error, Ctx};

/// # Errors
/// `not_member`, `invalid_field` (two selectors, bad limit), `not_found`
/// (no message with that id), `internal`.
pub fn apply<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: GetMessagesRequest,
) -> Result<MessagesPage, WireError> {
    ctx.require_member(&ctx.caller(&r.user))?;
    let (query, limit) = r.query()?;
    let page = ctx
        .store
        .page(query, limit, MAX_PAGE_BYTES)
        .map_err(store_error)?;
    if let (HistoryQuery::ById(id), true) = (query, page.messages.is_empty()) {
        return Err(WireError::new(
            ErrorCode::NotFound,
            format!("no message with id {id} in \"{}\"", ctx.config.name),
        ));
    }
    Ok(MessagesPage {
        group: ctx.config.name.clone(),
        messages: page.messages,
        more: page.more,
    })
}
