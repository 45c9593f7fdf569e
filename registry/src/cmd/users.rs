//! User accounts and presence: `user_register`, `user_unregister`, `users`, `whois`,
//! `connect`, `disconnect`.
//!
//! An account binds a user name to the caller's authenticated key, so it needs CURVE: on an
//! `--insecure` registry these actions are `forbidden`.

use std::time::Instant;

use agora_common::keys::PublicKey;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    ConnectReply, ConnectRequest, ErrorCode, Presence, UserEntry, UserNameRequest, UserReply,
    UserUnregisterRequest, UsersReply, WireError,
};

use crate::owners::OwnersError;
use crate::presence::Sessions;
use crate::users::Users;

/// `entry` with its presence filled in.
fn present(mut entry: UserEntry, sessions: &Sessions, now: Instant) -> UserEntry {
    entry.presence = sessions.presence(&entry.key, now);
    entry
}

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

fn unknown(name: &agora_proto::wire::UserName) -> WireError {
    WireError::new(ErrorCode::UnknownUser, format!("no user named {name}"))
}

/// `user_register`: binds `r.name` to the caller's key. Repeating it is not an error.
///
/// # Errors
/// `name_taken` (the name is another key's, or the caller's key already holds another
/// account), `limit_reached` (`max_users` accounts exist), `forbidden` (no CURVE),
/// `internal`.
pub fn register(
    users: Option<&Users>,
    peer: Option<PublicKey>,
    r: UserNameRequest,
    now: Timestamp,
    max_users: u64,
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
    if users.count().map_err(internal)? >= max_users {
        return Err(WireError::new(
            ErrorCode::LimitReached,
            format!("the registry holds its maximum of {max_users} accounts"),
        ));
    }
    let user = UserEntry {
        name: r.name,
        key,
        registered_at: now,
        presence: Presence::Offline,
        last_seen: None,
    };
    users.insert(&user).map_err(internal)?;
    tracing::info!(user = %user.name, key = %user.key, "user registered");
    Ok(UserReply {
        user,
        changed: true,
    })
}

/// `user_unregister`: removes the caller's own account and its mailbox, when `confirm` is
/// true.
///
/// # Errors
/// `invalid_field` (no confirmation), `unknown_user`, `forbidden` (another key's account,
/// or no CURVE), `internal`.
pub fn unregister(
    users: Option<&Users>,
    mailboxes: Option<&crate::mailbox::Mailboxes>,
    sessions: &mut Sessions,
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
    if let Some(mailboxes) = mailboxes {
        mailboxes.purge(&key).map_err(internal)?;
    }
    users.remove(&r.name).map_err(internal)?;
    sessions.end(&key);
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
pub fn list(
    users: Option<&Users>,
    sessions: &Sessions,
    peer: Option<PublicKey>,
) -> Result<UsersReply, WireError> {
    let (users, _) = need(users, peer)?;
    let now = Instant::now();
    Ok(UsersReply {
        users: users
            .all()
            .map_err(internal)?
            .into_iter()
            .map(|u| present(u, sessions, now))
            .collect(),
    })
}

/// `whois`: one account.
///
/// # Errors
/// `unknown_user`, `forbidden` (no CURVE), `internal`.
pub fn whois(
    users: Option<&Users>,
    sessions: &Sessions,
    peer: Option<PublicKey>,
    r: UserNameRequest,
) -> Result<UserReply, WireError> {
    let (users, _) = need(users, peer)?;
    let user = users
        .by_name(&r.name)
        .map_err(internal)?
        .ok_or_else(|| unknown(&r.name))?;
    Ok(UserReply {
        user: present(user, sessions, Instant::now()),
        changed: false,
    })
}

/// `connect`: starts or renews the caller's session (`online` unless `r.status` says
/// `away`), and records it as seen now.
///
/// # Errors
/// `unknown_user` (the caller's key has no account), `invalid_field` (status `offline`),
/// `forbidden` (no CURVE), `internal`.
pub fn connect(
    users: Option<&Users>,
    sessions: &mut Sessions,
    peer: Option<PublicKey>,
    r: ConnectRequest,
    now: Timestamp,
) -> Result<ConnectReply, WireError> {
    let (users, key) = need(users, peer)?;
    let status = r.status.unwrap_or(Presence::Online);
    if status == Presence::Offline {
        return Err(WireError::new(
            ErrorCode::InvalidField,
            "status must be online or away; disconnect to go offline",
        ));
    }
    let user = users.by_key(&key).map_err(internal)?.ok_or_else(|| {
        WireError::new(
            ErrorCode::UnknownUser,
            "this key has no account: register one first",
        )
    })?;
    sessions.renew(key, status, Instant::now());
    users.seen(&key, now).map_err(internal)?;
    Ok(ConnectReply {
        user: UserEntry {
            presence: status,
            last_seen: Some(now),
            ..user
        },
        ttl_ms: u64::try_from(sessions.ttl().as_millis()).unwrap_or(u64::MAX),
    })
}

/// `disconnect`: ends the caller's session.
///
/// # Errors
/// `unknown_user`, `forbidden` (no CURVE), `internal`.
pub fn disconnect(
    users: Option<&Users>,
    sessions: &mut Sessions,
    peer: Option<PublicKey>,
    now: Timestamp,
) -> Result<UserReply, WireError> {
    let (users, key) = need(users, peer)?;
    let user = users
        .by_key(&key)
        .map_err(internal)?
        .ok_or_else(|| WireError::new(ErrorCode::UnknownUser, "this key has no account"))?;
    sessions.end(&key);
    users.seen(&key, now).map_err(internal)?;
    Ok(UserReply {
        user: UserEntry {
            presence: Presence::Offline,
            last_seen: Some(now),
            ..user
        },
        changed: true,
    })
}
