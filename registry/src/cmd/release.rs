//! `release`: free a group name from the key it is bound to, by the registry's own key or
//! the operator's.
//!
//! `registry release NAME` opens the database directly when no registry holds it; a running
//! SQLite registry holds its database alone (its `unix-excl` VFS, [`crate::owners::VFS`]),
//! so the command asks it with this action instead, over CURVE with the registry's own key
//! pair from the data directory (only someone who can read the data directory has it).

use agora_common::keys::PublicKey;
use agora_proto::wire::{ErrorCode, LookupRequest, ReleaseReply, WireError};

use crate::store::RegistryStore;

/// Unbinds `r.name` when `peer` is one of `allowed` (the registry's own public key and the
/// `--operator` key, when given).
///
/// # Errors
/// `forbidden` from any other key (and always on an `--insecure` registry, whose peers have
/// no key); `internal` (the store failed, nothing changed).
pub fn apply(
    store: &mut dyn RegistryStore,
    r: LookupRequest,
    peer: Option<PublicKey>,
    allowed: &[PublicKey],
) -> Result<ReleaseReply, WireError> {
    if !peer.is_some_and(|peer| allowed.contains(&peer)) {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            "only the registry's own key pair (registry release, with its --data-dir) or the \
             operator's key (--operator) may release a group name",
        ));
    }
    let released = store.release_group(&r.name).map_err(super::internal)?;
    tracing::info!(group = %r.name, released, "group name released by the operator");
    Ok(ReleaseReply {
        name: r.name,
        released,
    })
}
