//! `register`: add or refresh a group (also the heartbeat).

use agora_common::proto::{RegisterReply, RegisterRequest, WireError};
use agora_common::time::Timestamp;

use crate::directory::Directory;
use crate::Config;

/// Registers or refreshes `r.name` at `r.endpoint`.
///
/// # Errors
/// `name_taken`, `limit_reached` (see [`Directory::register`]).
pub fn apply(
    dir: &mut Directory,
    config: &Config,
    r: RegisterRequest,
    now: Timestamp,
) -> Result<RegisterReply, WireError> {
    let group = dir.register(r.name, r.endpoint, r.members, r.public_key, now)?;
    Ok(RegisterReply {
        group,
        heartbeat_ms: u64::try_from(config.heartbeat.as_millis()).unwrap_or(u64::MAX),
        ttl_ms: u64::try_from(config.ttl().as_millis()).unwrap_or(u64::MAX),
    })
}
