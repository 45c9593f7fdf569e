//! User accounts and presence: `user_register`, `user_unregister`, `users`, `whois`,
//! `connect`, `disconnect`.
//!
//! An account binds a user name to the caller's authenticated key, so it needs CURVE: on an
//! `--insecure` registry (no peer key) these actions are `forbidden`.

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    ConnectReply, ConnectRequest, ErrorCode, Presence, UserEntry, UserNameRequest, UserReply,
    UserUnregisterRequest, UsersReply, WireError,
};

use super::internal;
use crate::store::{RegistryStore, StoreError};

fn need(peer: Option<PublicKey>) -> Result<PublicKey, WireError> {
    peer.ok_or_else(|| {
        WireError::new(
            ErrorCode::Forbidden,
            "user accounts need CURVE identities; this registry runs --insecure",
        )
    })
}

/// The caller's own account: `users`, `whois` and blocks need one, so that only account
/// holders see who else has an account (PROTOCOL §4.5).
///
/// # Errors
/// `no_account` (the key has none), `internal`.
pub(crate) fn own_account(
    store: &mut dyn RegistryStore,
    key: &PublicKey,
) -> Result<UserEntry, WireError> {
    store.user_by_key(key).map_err(internal)?.ok_or_else(|| {
        WireError::new(
            ErrorCode::NoAccount,
            "this key has no account: register one first (user_register)",
        )
    })
}

fn unknown(name: &agora_proto::wire::UserName) -> WireError {
    WireError::new(ErrorCode::UnknownUser, format!("no user named {name}"))
}

/// `user_register`: binds `r.name` to the caller's key. Repeating it is not an error.
///
/// # Errors
/// `name_taken` (the name is another key's, or the caller's key already holds another
/// account), `limit_reached` (the store's `max_users` accounts exist), `forbidden` (no CURVE),
/// `internal`.
pub fn register(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    r: UserNameRequest,
    now: Timestamp,
) -> Result<UserReply, WireError> {
    let key = need(peer)?;
    let taken = |store: &mut dyn RegistryStore, name| -> Result<UserReply, WireError> {
        if let Some(held) = store.user_by_name(name).map_err(internal)? {
            if held.key == key {
                return Ok(UserReply {
                    user: held,
                    changed: false,
                });
            }
            return Err(WireError::new(
                ErrorCode::NameTaken,
                format!("the user name {name} belongs to another key"),
            ));
        }
        match store.user_by_key(&key).map_err(internal)? {
            Some(mine) => Err(WireError::new(
                ErrorCode::NameTaken,
                format!("this key already holds the account {}", mine.name),
            )),
            None => Err(WireError::new(
                ErrorCode::Internal,
                "the account changed meanwhile; retry",
            )),
        }
    };
    if store.user_by_name(&r.name).map_err(internal)?.is_some()
        || store.user_by_key(&key).map_err(internal)?.is_some()
    {
        return taken(store, &r.name);
    }
    let user = UserEntry {
        name: r.name,
        key,
        registered_at: now,
        presence: Presence::Offline,
        last_seen: None,
    };
    // Another registry sharing the store may have taken the name or key meanwhile.
    match store.insert_user(&user) {
        Ok(true) => {}
        Ok(false) => return taken(store, &user.name),
        Err(e @ StoreError::TooManyUsers(_)) => {
            return Err(WireError::new(ErrorCode::LimitReached, e.to_string()))
        }
        Err(e) => return Err(internal(e)),
    }
    tracing::info!(user = %user.name, key = %user.key, "user registered");
    Ok(UserReply {
        user,
        changed: true,
    })
}

/// `user_unregister`: removes the caller's own account, its mailbox and its session, when
/// `confirm` is true.
///
/// # Errors
/// `invalid_field` (no confirmation), `unknown_user`, `forbidden` (another key's account,
/// or no CURVE), `internal`.
pub fn unregister(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    r: UserUnregisterRequest,
) -> Result<UserReply, WireError> {
    let key = need(peer)?;
    if !r.confirm {
        return Err(WireError::new(
            ErrorCode::InvalidField,
            "confirm must be true: removing an account cannot be undone",
        ));
    }
    let held = store
        .user_by_name(&r.name)
        .map_err(internal)?
        .ok_or_else(|| unknown(&r.name))?;
    if held.key != key {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            format!("the account {} belongs to another key", r.name),
        ));
    }
    store.remove_user(&r.name, &key).map_err(internal)?;
    tracing::info!(user = %r.name, "user unregistered");
    Ok(UserReply {
        user: UserEntry {
            presence: Presence::Offline,
            ..held
        },
        changed: true,
    })
}

/// `users`: every account, with its presence; for account holders only.
///
/// # Errors
/// `no_account` (the caller's key has none), `forbidden` (no CURVE), `internal`.
pub fn list(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
) -> Result<UsersReply, WireError> {
    let key = need(peer)?;
    own_account(store, &key)?;
    Ok(UsersReply {
        users: store.all_users().map_err(internal)?,
    })
}

/// `whois`: one account, with its presence; for account holders only.
///
/// # Errors
/// `no_account` (the caller's key has none), `unknown_user`, `forbidden` (no CURVE),
/// `internal`.
pub fn whois(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    r: UserNameRequest,
) -> Result<UserReply, WireError> {
    let key = need(peer)?;
    own_account(store, &key)?;
    let user = store
        .user_by_name(&r.name)
        .map_err(internal)?
        .ok_or_else(|| unknown(&r.name))?;
    Ok(UserReply {
        user,
        changed: false,
    })
}

/// `connect`: starts or renews the caller's session (`online` unless `r.status` says
/// `away`) for `presence_ttl`, and records it as seen now.
///
/// # Errors
/// `unknown_user` (the caller's key has no account), `invalid_field` (status `offline`),
/// `forbidden` (no CURVE), `internal`.
pub fn connect(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    r: ConnectRequest,
    now: Timestamp,
    presence_ttl: std::time::Duration,
) -> Result<ConnectReply, WireError> {
    let key = need(peer)?;
    let status = r.status.unwrap_or(Presence::Online);
    if status == Presence::Offline {
        return Err(WireError::new(
            ErrorCode::InvalidField,
            "status must be online or away; disconnect to go offline",
        ));
    }
    let user = store.user_by_key(&key).map_err(internal)?.ok_or_else(|| {
        WireError::new(
            ErrorCode::UnknownUser,
            "this key has no account: register one first",
        )
    })?;
    let seen = store.renew_session(&key, status, now).map_err(internal)?;
    Ok(ConnectReply {
        user: UserEntry {
            presence: status,
            last_seen: Some(seen),
            ..user
        },
        ttl_ms: u64::try_from(presence_ttl.as_millis()).unwrap_or(u64::MAX),
    })
}

/// `disconnect`: ends the caller's session.
///
/// # Errors
/// `unknown_user`, `forbidden` (no CURVE), `internal`.
pub fn disconnect(
    store: &mut dyn RegistryStore,
    peer: Option<PublicKey>,
    now: Timestamp,
) -> Result<UserReply, WireError> {
    let key = need(peer)?;
    let user = store
        .user_by_key(&key)
        .map_err(internal)?
        .ok_or_else(|| WireError::new(ErrorCode::UnknownUser, "this key has no account"))?;
    let seen = store.end_session(&key, now).map_err(internal)?;
    Ok(UserReply {
        user: UserEntry {
            presence: Presence::Offline,
            last_seen: Some(seen),
            ..user
        },
        changed: true,
    })
}
