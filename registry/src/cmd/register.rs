//! `register`: add or refresh a group (also the heartbeat).

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{ErrorCode, RegisterReply, RegisterRequest, WireError};

use crate::directory::Directory;
use crate::owners::Owners;
use crate::Config;

/// Registers or refreshes `r.name` at `r.endpoint` for the node whose authenticated key is
/// `peer`.
///
/// With CURVE, a name belongs to the key that first registered it: another key gets
/// `name_taken` (even after the owner's entry expired, until an operator releases the
/// name), while the owner may move the name to a new endpoint at any time (a node restarted
/// on another port). The advertised `public_key` must be the caller's own.
///
/// # Errors
/// `name_taken`, `invalid_field` (a `public_key` that is not the caller's),
/// `limit_reached`, `internal` (the ownership store failed).
pub fn apply(
    dir: &mut Directory,
    owners: Option<&Owners>,
    config: &Config,
    r: RegisterRequest,
    peer: Option<PublicKey>,
    now: Timestamp,
) -> Result<RegisterReply, WireError> {
    let owner_verified = match (owners, peer) {
        (Some(owners), Some(key)) => {
            if r.public_key != Some(key) {
                return Err(WireError::new(
                    ErrorCode::InvalidField,
                    "public_key must be the registering node's own key",
                ));
            }
            match owners.owner(&r.name).map_err(internal)? {
                Some(owner) if owner != key => {
                    return Err(WireError::new(
                        ErrorCode::NameTaken,
                        format!(
                            "group \"{}\" belongs to another key; its operator can free it with `registry release`",
                            r.name
                        ),
                    ))
                }
                Some(_) => true,
                None => {
                    owners.bind(&r.name, &key, now).map_err(internal)?;
                    tracing::info!(group = %r.name, %key, "group name bound to its key");
                    true
                }
            }
        }
        _ => false,
    };
    let group = dir.register(
        r.name,
        r.endpoint,
        r.members,
        r.public_key,
        owner_verified,
        now,
    )?;
    Ok(RegisterReply {
        group,
        heartbeat_ms: u64::try_from(config.heartbeat.as_millis()).unwrap_or(u64::MAX),
        ttl_ms: u64::try_from(config.ttl().as_millis()).unwrap_or(u64::MAX),
    })
}

fn internal(e: crate::owners::OwnersError) -> WireError {
    tracing::error!(error = %e, "ownership store failed");
    WireError::new(ErrorCode::Internal, "registry storage failure; retry later")
}
