//! `lookup`: one live group by name.

use agora_proto::time::Timestamp;
use agora_proto::wire::{ErrorCode, LookupReply, LookupRequest, WireError};

use crate::store::RegistryStore;

/// The live entry named `r.name`.
///
/// # Errors
/// `unknown_group`, `internal` (the store failed).
pub fn apply(
    store: &mut dyn RegistryStore,
    r: LookupRequest,
    now: Timestamp,
) -> Result<LookupReply, WireError> {
    match store.lookup_group(&r.name, now).map_err(super::internal)? {
        Some(group) => Ok(LookupReply { group }),
        None => Err(WireError::new(
            ErrorCode::UnknownGroup,
            format!("no live group named \"{}\"", r.name),
        )),
    }
}
