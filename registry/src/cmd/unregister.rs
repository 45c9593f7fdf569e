//! `unregister`: remove a group.

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{Empty, ErrorCode, UnregisterRequest, WireError};

use crate::directory::Directory;
use crate::owners::Owners;

/// Removes `r.name` if `r.endpoint` holds it and, with CURVE, the caller `peer` owns it.
/// The name stays bound to its owner's key.
///
/// # Errors
/// `unknown_group`, `name_taken` (another endpoint or key holds it).
pub fn apply(
    dir: &mut Directory,
    owners: Option<&Owners>,
    r: UnregisterRequest,
    peer: Option<PublicKey>,
    now: Timestamp,
) -> Result<Empty, WireError> {
    if let (Some(owners), Some(key)) = (owners, peer) {
        if let Ok(Some(owner)) = owners.owner(&r.name) {
            if owner != key {
                return Err(WireError::new(
                    ErrorCode::NameTaken,
                    format!("group \"{}\" belongs to another key", r.name),
                ));
            }
        }
    }
    dir.unregister(&r.name, &r.endpoint, now)?;
    tracing::info!(group = %r.name, endpoint = %r.endpoint, "group unregistered");
    Ok(Empty {})
}
