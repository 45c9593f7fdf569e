//! `heartbeat_host`: one refresh for every group a host holds (PROTOCOL §4.1.1).

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{HeartbeatHostReply, HeartbeatHostRequest, WireError};

use crate::store::RegistryStore;
use crate::Config;

/// Refreshes the host `(r.endpoint, r.public_key)` and every entry it registered with
/// `register_groups`; `known` is how many live entries it holds. `r.groups` (the host's own
/// count) is not trusted for anything: a host that sees `known` differ registers its groups
/// again.
///
/// # Errors
/// `invalid_field` (a `public_key` that is not the caller's), `internal`.
pub fn apply(
    store: &mut dyn RegistryStore,
    config: &Config,
    r: HeartbeatHostRequest,
    peer: Option<PublicKey>,
    now: Timestamp,
) -> Result<HeartbeatHostReply, WireError> {
    super::register::check_key(r.public_key, peer)?;
    let known = store
        .heartbeat_host(&r.endpoint, r.public_key, now)
        .map_err(super::internal)?;
    if known != r.groups {
        tracing::debug!(endpoint = %r.endpoint, known, told = r.groups,
            "group host's count differs; it registers again");
    }
    Ok(HeartbeatHostReply {
        known,
        heartbeat_ms: config.heartbeat_ms(),
        ttl_ms: config.ttl_ms(),
    })
}
