//! `owner`: the key a group name is bound to, whether its group is live or not.

use agora_proto::wire::{LookupRequest, OwnerReply, WireError};

use crate::store::{RegistryStore, StoreError};

/// The key `r.name` is bound to, `None` when it is free. Read-only: a group node asks it
/// before it takes its lease or serves, so that a node whose key pair is not the owner's
/// (a standby started without the copied `node.key*`) stops at start instead of being
/// refused `name_taken` for ever. A registry without name bindings (`--insecure`) answers
/// `None`.
///
/// # Errors
/// `internal` (the store failed).
pub fn apply(store: &mut dyn RegistryStore, r: LookupRequest) -> Result<OwnerReply, WireError> {
    let owner = match store.group_owner(&r.name) {
        Ok(owner) => owner,
        Err(StoreError::NoAccounts) => None,
        Err(e) => return Err(super::internal(e)),
    };
    Ok(OwnerReply {
        name: r.name,
        owner,
    })
}
