//! `unregister`: remove a group.

use agora_common::proto::{Empty, UnregisterRequest, WireError};

use crate::directory::Directory;

/// Removes `r.name` if `r.endpoint` holds it.
///
/// # Errors
/// `unknown_group`, `name_taken` (see [`Directory::unregister`]).
pub fn apply(dir: &mut Directory, r: UnregisterRequest) -> Result<Empty, WireError> {
    dir.unregister(&r.name, &r.endpoint)?;
    tracing::info!(group = %r.name, endpoint = %r.endpoint, "group unregistered");
    Ok(Empty {})
}
