//! User accounts: `user_register`, `user_unregister`, `users`, `whois`.
//!
//! An account binds a user name to the caller's authenticated key, so it needs CURVE: on an
//! `--insecure` registry these actions are `forbidden`.

use agora_common::keys::PublicKey;
use agora_common::proto::{
    ErrorCode, UserEntry, UserNameRequest, UserReply, UserUnregisterRequest, UsersReply, WireError,
};
use agora_common::time::Timestamp;

use crate::owners::OwnersError;
use crate::users::Users;

fn need(users: Option<&Users>, peer: Option<PublicKey>) -> Result<(&Users, PublicKey), WireError> {
    match (users, peer) {
        (Some(users), Some(peer)) => Ok((users, peer)),
        _ => Err(WireError::new(
            ErrorCode::Forbidden,
            "user accounts need CURVE identities; this registry runs --insecure",
        )),
    }
}

fn internal(e: OwnersError) -> WireError {
    tracing::error!(error = %e, "account store failed");
    WireError::new(ErrorCode::Internal, "registry storage failure; retry later")
}

fn unknown(name: &agora_common::proto::UserName) -> WireError {
    WireError::new(ErrorCode::UnknownUser, format!("no user named {name}"))
}

/// `user_register`: binds `r.name` to the caller's key. Repeating it is not an error.
///
/// # Errors
/// `name_taken` (the name is another key's, or the caller's key already holds another
/// account), `forbidden` (no CURVE), `internal`.
pub fn register(
    users: Option<&Users>,
    peer: Option<PublicKey>,
    r: UserNameRequest,
    now: Timestamp,
) -> Result<UserReply, WireError> {
    let (users, key) = need(users, peer)?;
    if let Some(held) = users.by_name(&r.name).map_err(internal)? {
        if held.key == key {
            return Ok(UserReply {
                user: held,
                changed: false,
            });
        }
        return Err(WireError::new(
            ErrorCode::NameTaken,
            format!("the user name {} belongs to another key", r.name),
        ));
    }
    if let Some(mine) = users.by_key(&key).map_err(internal)? {
        return Err(WireError::new(
            ErrorCode::NameTaken,
            format!("this key already holds the account {}", mine.name),
        ));
    }
    let user = UserEntry {
        name: r.name,
        key,
        registered_at: now,
    };
    users.insert(&user).map_err(internal)?;
    tracing::info!(user = %user.name, key = %user.key, "user registered");
    Ok(UserReply {
        user,
        changed: true,
    })
}

/// `user_unregister`: removes the caller's own account, when `confirm` is true.
///
/// # Errors
/// `invalid_field` (no confirmation), `unknown_user`, `forbidden` (another key's account,
/// or no CURVE), `internal`.
pub fn unregister(
    users: Option<&Users>,
    peer: Option<PublicKey>,
    r: UserUnregisterRequest,
) -> Result<UserReply, WireError> {
    let (users, key) = need(users, peer)?;
    if !r.confirm {
        return Err(WireError::new(
            ErrorCode::InvalidField,
            "confirm must be true: removing an account cannot be undone",
        ));
    }
    let held = users
        .by_name(&r.name)
        .map_err(internal)?
        .ok_or_else(|| unknown(&r.name))?;
    if held.key != key {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            format!("the account {} belongs to another key", r.name),
        ));
    }
    users.remove(&r.name).map_err(internal)?;
    tracing::info!(user = %r.name, "user unregistered");
    Ok(UserReply {
        user: held,
        changed: true,
    })
}

/// `users`: every account.
///
/// # Errors
/// `forbidden` (no CURVE), `internal`.
pub fn list(users: Option<&Users>, peer: Option<PublicKey>) -> Result<UsersReply, WireError> {
    let (users, _) = need(users, peer)?;
    Ok(UsersReply {
        users: users.all().map_err(internal)?,
    })
}

/// `whois`: one account.
///
/// # Errors
/// `unknown_user`, `forbidden` (no CURVE), `internal`.
pub fn whois(
    users: Option<&Users>,
    peer: Option<PublicKey>,
    r: UserNameRequest,
) -> Result<UserReply, WireError> {
    let (users, _) = need(users, peer)?;
    let user = users
        .by_name(&r.name)
        .map_err(internal)?
        .ok_or_else(|| unknown(&r.name))?;
    Ok(UserReply {
        user,
        changed: false,
    })
}
