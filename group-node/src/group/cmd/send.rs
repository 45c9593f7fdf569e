//! `send`: append a message to the log (members only). The ack is sent after the batch
//! holding the append commits.

use crate::store::GroupLog;
use agora_proto::wire::{EntryKind, ErrorCode, SendAck, SendRequest, WireError};

use super::Ctx;

/// A message may carry a file (`attachment`): its content must be complete here, with the
/// size given (PROTOCOL §6.9); the body is then its caption.
///
/// # Errors
/// `not_member`, `too_large` (body over `max_message_bytes`),
/// `invalid_field` (a body that is empty or white-space-only text without an attachment,
/// [`SendRequest::check_body`]; a bad attachment name, media type or size), `not_found` (the attachment's
/// content is not complete on this node), `id_conflict`, `internal`.
pub fn apply<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: SendRequest,
) -> Result<SendAck, WireError> {
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
    r.check_body()
        .map_err(|m| WireError::new(ErrorCode::InvalidField, m))?;
    if let Some(a) = &r.attachment {
        a.validate()
            .map_err(|m| WireError::new(ErrorCode::InvalidField, m))?;
        match ctx.blobs.size(&a.sha256) {
            Ok(Some(size)) if size == a.size => {}
            Ok(Some(size)) => {
                return Err(WireError::new(
                    ErrorCode::InvalidField,
                    format!(
                        "attachment.size: the content {} has {size} bytes, not {}",
                        a.sha256, a.size
                    ),
                ))
            }
            Ok(None) => {
                return Err(WireError::new(
                    ErrorCode::NotFound,
                    format!(
                        "attachment.sha256: no complete content {} here; upload it first",
                        a.sha256
                    ),
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "blob store failed");
                return Err(WireError::new(
                    ErrorCode::Internal,
                    "storage failure; nothing was stored; retry later",
                ));
            }
        }
    }
    ctx.append(
        &sender,
        EntryKind::Message,
        &r.body,
        r.id,
        r.attachment.as_ref(),
    )
}
