//! `lookup`: one live group by name.

use agora_proto::time::Timestamp;
use agora_proto::wire::{LookupReply, LookupRequest, WireError};

use crate::directory::Directory;

/// The live entry named `r.name`.
///
/// # Errors
/// `unknown_group`.
pub fn apply(dir: &Directory, r: LookupRequest, now: Timestamp) -> Result<LookupReply, WireError> {
    Ok(LookupReply {
        group: dir.lookup(&r.name, now)?,
    })
}
