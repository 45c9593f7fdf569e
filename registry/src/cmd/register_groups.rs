//! `register_groups`: a group host registers or refreshes many groups at once
//! (PROTOCOL §4.1.1).

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    ErrorCode, GroupName, RegisterGroupsReply, RegisterGroupsRequest, WireError,
    MAX_REGISTER_GROUPS,
};

use crate::store::{GroupRegistration, RegistryStore};
use crate::Config;

/// Registers each of `r.groups` at `r.endpoint` by `register`'s rules (§4.1, see
/// [`super::register::apply`]), each on its own: a refused entry is listed in `refused`
/// with its error naming it ([`WireError::group`]) and does not stop the others. The
/// entries registered are held by the host `(r.endpoint, r.public_key)`: they live while
/// the host sends `heartbeat_host`, and are never dropped for another name at the same
/// endpoint.
///
/// # Errors
/// For the whole request: `invalid_field` (no groups, more than [`MAX_REGISTER_GROUPS`],
/// or a `public_key` that is not the caller's), `internal` (the store failed; entries
/// before the failure stay registered). Per entry: `name_taken`, `too_many_names`,
/// `limit_reached`.
pub fn apply(
    store: &mut dyn RegistryStore,
    config: &Config,
    r: RegisterGroupsRequest,
    peer: Option<PublicKey>,
    now: Timestamp,
) -> Result<RegisterGroupsReply, WireError> {
    if r.groups.is_empty() || r.groups.len() > MAX_REGISTER_GROUPS {
        return Err(WireError::new(
            ErrorCode::InvalidField,
            format!(
                "groups: 1 to {MAX_REGISTER_GROUPS} entries, not {}",
                r.groups.len()
            ),
        ));
    }
    super::register::check_key(r.public_key, peer)?;
    // Every claim in one store call: one sync for a batch of new bindings, not one each.
    let names: Vec<GroupName> = r.groups.iter().map(|g| g.name.clone()).collect();
    let claims = match peer {
        Some(key) => Some(
            store
                .claim_groups_up_to(&names, &key, config.max_names_for(&key), now)
                .map_err(super::internal)?,
        ),
        None => None,
    };
    let mut claims = claims.map(Vec::into_iter);
    let mut registered = Vec::with_capacity(r.groups.len());
    let mut refused = Vec::new();
    for group in r.groups {
        let name = group.name.clone();
        let owner_verified = match (peer, claims.as_mut().and_then(Iterator::next)) {
            (Some(key), Some(claim)) => {
                if let Err(e) = super::register::verify_claim(&name, &key, claim) {
                    refused.push(e.with_group(Some(name)));
                    continue;
                }
                true
            }
            _ => false,
        };
        let g = GroupRegistration {
            name: group.name,
            endpoint: r.endpoint.clone(),
            members: group.members,
            public_key: r.public_key,
            host: true,
        };
        match store
            .register_group(g, owner_verified, now)
            .map_err(super::internal)?
        {
            Ok(_) => registered.push(name),
            Err(e) => refused.push(e.with_group(Some(name))),
        }
    }
    if !refused.is_empty() {
        tracing::info!(endpoint = %r.endpoint, registered = registered.len(),
            refused = refused.len(), "group host's registration partly refused");
    }
    Ok(RegisterGroupsReply {
        registered,
        refused,
        heartbeat_ms: config.heartbeat_ms(),
        ttl_ms: config.ttl_ms(),
    })
}
