//! `list`: every live group.

use agora_proto::time::Timestamp;
use agora_proto::wire::{ListReply, WireError};

use crate::store::RegistryStore;

/// Live groups, sorted by name.
///
/// # Errors
/// `internal` (the store failed).
pub fn apply(store: &mut dyn RegistryStore, now: Timestamp) -> Result<ListReply, WireError> {
    Ok(ListReply {
        groups: store.list_groups(now).map_err(super::internal)?,
    })
}
