//! `unregister`: remove a group.

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{Empty, ErrorCode, UnregisterRequest, WireError};

use crate::store::RegistryStore;

/// Removes `r.name` if `r.endpoint` holds it and, with CURVE, the caller `peer` owns it.
/// The name stays bound to its owner's key.
///
/// # Errors
/// `unknown_group`, `name_taken` (another endpoint or key holds it), `internal`.
pub fn apply(
    store: &mut dyn RegistryStore,
    r: UnregisterRequest,
    peer: Option<PublicKey>,
    now: Timestamp,
) -> Result<Empty, WireError> {
    if let Some(key) = peer {
        if let Some(owner) = store.group_owner(&r.name).map_err(super::internal)? {
            if owner != key {
                return Err(WireError::new(
                    ErrorCode::NameTaken,
                    format!("group \"{}\" belongs to another key", r.name),
                ));
            }
        }
    }
    store
        .unregister_group(&r.name, &r.endpoint, now)
        .map_err(super::internal)??;
    tracing::info!(group = %r.name, endpoint = %r.endpoint, "group unregistered");
    Ok(Empty {})
}
