//! `register`: add or refresh a group (also the heartbeat).

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{ErrorCode, GroupEntry, RegisterReply, RegisterRequest, WireError};

use crate::store::{GroupRegistration, RegistryStore};
use crate::Config;

/// Registers or refreshes `r.name` at `r.endpoint` for the node whose authenticated key is
/// `peer` (`None` on an `--insecure` registry: no ownership).
///
/// With CURVE, a name belongs to the key that first registered it: another key gets
/// `name_taken` (even after the owner's entry expired, until an operator releases the
/// name or the binding lapses, `--name-lapse` after its group last registered), while the
/// owner may move the name to a new endpoint at any time (a node restarted on another
/// port). A key owns at most `--max-names-per-key` names (`--max-groups` for a
/// `--host-key`). Entries of other names at the same endpoint are kept (a group host
/// serves many). The advertised `public_key` must be the caller's own.
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
    check_key(r.public_key, peer)?;
    let group = register_one(
        store,
        config,
        GroupRegistration {
            name: r.name,
            endpoint: r.endpoint,
            members: r.members,
            public_key: r.public_key,
            host: false,
        },
        peer,
        now,
    )?;
    Ok(RegisterReply {
        group,
        heartbeat_ms: config.heartbeat_ms(),
        ttl_ms: config.ttl_ms(),
    })
}

/// The advertised `public_key` must be the authenticated caller's (`peer`; any on an
/// `--insecure` registry).
///
/// # Errors
/// `invalid_field` naming `public_key`.
pub(crate) fn check_key(
    public_key: Option<PublicKey>,
    peer: Option<PublicKey>,
) -> Result<(), WireError> {
    match peer {
        Some(key) if public_key != Some(key) => Err(WireError::new(
            ErrorCode::InvalidField,
            "public_key must be the registering node's own key",
        )),
        _ => Ok(()),
    }
}

/// One registration by `register` (§4.1's rules): the name is claimed for `peer` (bound
/// to it if free), then registered.
///
/// # Errors
/// `name_taken`, `too_many_names`, `limit_reached`, `internal`.
pub(crate) fn register_one(
    store: &mut dyn RegistryStore,
    config: &Config,
    g: GroupRegistration,
    peer: Option<PublicKey>,
    now: Timestamp,
) -> Result<GroupEntry, WireError> {
    let owner_verified = match peer {
        Some(key) => {
            let claim = store
                .claim_group_up_to(&g.name, &key, config.max_names_for(&key), now)
                .map_err(super::internal)?;
            verify_claim(&g.name, &key, claim)?;
            true
        }
        None => false,
    };
    store
        .register_group(g, owner_verified, now)
        .map_err(super::internal)?
}

/// Whether the claim of `name` by `key` ([`RegistryStore::claim_group`]) makes `key` its
/// owner; a new binding is logged.
///
/// # Errors
/// `name_taken` (another key owns it), or the claim's own refusal (`too_many_names`).
pub(crate) fn verify_claim(
    name: &agora_proto::wire::GroupName,
    key: &PublicKey,
    claim: Result<(PublicKey, bool), WireError>,
) -> Result<(), WireError> {
    let (owner, bound) = claim?;
    if owner != *key {
        return Err(WireError::new(
            ErrorCode::NameTaken,
            format!(
                "group \"{name}\" belongs to another key; its operator can free it with `registry release`"
            ),
        ));
    }
    if bound {
        tracing::info!(group = %name, %key, "group name bound to its key");
    }
    Ok(())
}
