//! `register`: add or refresh a group (also the heartbeat).

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{ErrorCode, RegisterReply, RegisterRequest, WireError};

use crate::store::{GroupRegistration, RegistryStore};
use crate::Config;

/// Registers or refreshes `r.name` at `r.endpoint` for the node whose authenticated key is
/// `peer` (`None` on an `--insecure` registry: no ownership).
///
/// With CURVE, a name belongs to the key that first registered it: another key gets
/// `name_taken` (even after the owner's entry expired, until an operator releases the
/// name or the binding lapses, `--name-lapse` after its group last registered), while the
/// owner may move the name to a new endpoint at any time (a node restarted on another
/// port). A key owns at most `--max-names-per-key` names. Entries of other names at the
/// same endpoint are kept (a group host serves many). The advertised `public_key` must be
/// the caller's own.
///
/// # Errors
/// `name_taken`, `too_many_names`, `invalid_field` (a `public_key` that is not the
/// caller's), `limit_reached`, `internal` (the store failed).
pub fn apply(
    store: &mut dyn RegistryStore,
    config: &Config,
    r: RegisterRequest,
    peer: Option<PublicKey>,
    now: Timestamp,
) -> Result<RegisterReply, WireError> {
    let owner_verified = match peer {
        Some(key) => {
            if r.public_key != Some(key) {
                return Err(WireError::new(
                    ErrorCode::InvalidField,
                    "public_key must be the registering node's own key",
                ));
            }
            let (owner, bound) = store
                .claim_group(&r.name, &key, now)
                .map_err(super::internal)??;
            if owner != key {
                return Err(WireError::new(
                    ErrorCode::NameTaken,
                    format!(
                        "group \"{}\" belongs to another key; its operator can free it with `registry release`",
                        r.name
                    ),
                ));
            }
            if bound {
                tracing::info!(group = %r.name, %key, "group name bound to its key");
            }
            true
        }
        None => false,
    };
    let group = store
        .register_group(
            GroupRegistration {
                name: r.name,
                endpoint: r.endpoint,
                members: r.members,
                public_key: r.public_key,
            },
            owner_verified,
            now,
        )
        .map_err(super::internal)??;
    Ok(RegisterReply {
        group,
        heartbeat_ms: u64::try_from(config.heartbeat.as_millis()).unwrap_or(u64::MAX),
        ttl_ms: u64::try_from(config.ttl().as_millis()).unwrap_or(u64::MAX),
    })
}
