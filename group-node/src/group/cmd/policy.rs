//! Group policy: `invite`, `kick`, `ban`, `unban`, `promote` and `set_mode`.
//!
//! The owner (the key named with `--owner`, else the node's own key) and the admins it
//! promotes manage the group; only the owner promotes. Policy needs identities, so it is
//! refused on an `--insecure` node. Every change is a `policy` entry in the log, so members
//! see it in history and in the live stream.

use crate::store::{Grant, GroupLog, Principal};
use agora_common::keys::PublicKey;
use agora_proto::wire::{
    EntryKind, ErrorCode, KeyTargetRequest, MemberTargetRequest, PolicyReply, SetModeRequest,
    UserName, WireError,
};
use serde_json::value::RawValue;

use super::{store_error, Ctx};
use crate::group::identity::Caller;

/// What the caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The group's owner.
    Owner,
    /// Promoted by the owner.
    Admin,
    /// Anyone else.
    Other,
}

/// The caller's role.
///
/// # Errors
/// `internal`.
pub fn role<S: GroupLog + ?Sized>(ctx: &Ctx<'_, S>, caller: &Caller) -> Result<Role, WireError> {
    if caller.key.is_some() && caller.key == ctx.owner {
        return Ok(Role::Owner);
    }
    if ctx
        .store
        .has(&caller.principal, Grant::Admin)
        .map_err(store_error)?
    {
        return Ok(Role::Admin);
    }
    Ok(Role::Other)
}

/// The caller's role if it may manage the group.
fn manager<S: GroupLog + ?Sized>(
    ctx: &Ctx<'_, S>,
    claimed: &UserName,
) -> Result<(Caller, Role), WireError> {
    let caller = ctx.caller(claimed);
    if caller.key.is_none() {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            "group policy needs CURVE identities; this node runs --insecure",
        ));
    }
    match role(ctx, &caller)? {
        Role::Other => Err(WireError::new(
            ErrorCode::Forbidden,
            format!(
                "only the owner and admins of \"{}\" may do that",
                ctx.config.name
            ),
        )),
        r => Ok((caller, r)),
    }
}

/// Writes the policy entry (sender: the caller's member name, or the name it claims).
fn record<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    caller: &Caller,
    body: serde_json::Value,
) -> Result<(), WireError> {
    let sender = ctx
        .store
        .member(&caller.principal)
        .map_err(store_error)?
        .unwrap_or_else(|| caller.claimed.clone());
    let body = RawValue::from_string(body.to_string())
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
    ctx.append(&sender, EntryKind::Policy, &body, None, None)
        .map(|_| ())
}

fn reply<S: GroupLog + ?Sized>(ctx: &Ctx<'_, S>, changed: bool) -> PolicyReply {
    PolicyReply {
        group: ctx.config.name.clone(),
        changed,
        last_seq: ctx.store.last_seq(),
    }
}

fn is_owner<S: GroupLog + ?Sized>(ctx: &Ctx<'_, S>, who: &Principal) -> bool {
    ctx.owner
        .is_some_and(|k: PublicKey| Principal::key(&k) == *who)
}

/// Removes `who` from the members and ends its subscriptions; returns its name.
fn expel<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    who: &Principal,
) -> Result<Option<UserName>, WireError> {
    let name = ctx.store.remove_member(who).map_err(store_error)?;
    if name.is_some() {
        ctx.subscribers.remove_member(who);
    }
    Ok(name)
}

/// `invite`: let `r.key` join while the group is private.
///
/// # Errors
/// `forbidden`, `internal`.
pub fn invite<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: KeyTargetRequest,
) -> Result<PolicyReply, WireError> {
    let (caller, _) = manager(ctx, &r.user)?;
    let target = Principal::key(&r.key);
    let changed = ctx
        .store
        .grant(&target, Grant::Invite, ctx.now)
        .map_err(store_error)?;
    if changed {
        record(
            ctx,
            &caller,
            serde_json::json!({"action": "invite", "target": r.key}),
        )?;
    }
    Ok(reply(ctx, changed))
}

/// `ban`: remove `r.key` if a member, and refuse it from now on.
///
/// # Errors
/// `forbidden` (also for banning the owner), `internal`.
pub fn ban<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: KeyTargetRequest,
) -> Result<PolicyReply, WireError> {
    let (caller, role) = manager(ctx, &r.user)?;
    let target = Principal::key(&r.key);
    if is_owner(ctx, &target)
        || (role == Role::Admin && ctx.store.has(&target, Grant::Admin).map_err(store_error)?)
    {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            "the owner cannot be banned, and only the owner bans an admin",
        ));
    }
    let banned = ctx
        .store
        .grant(&target, Grant::Ban, ctx.now)
        .map_err(store_error)?;
    ctx.store
        .revoke(&target, Grant::Invite)
        .map_err(store_error)?;
    ctx.store
        .revoke(&target, Grant::Admin)
        .map_err(store_error)?;
    let removed = expel(ctx, &target)?;
    let changed = banned || removed.is_some();
    if changed {
        record(
            ctx,
            &caller,
            serde_json::json!({"action": "ban", "target": r.key, "member": removed}),
        )?;
    }
    Ok(reply(ctx, changed))
}

/// `unban`: lift a ban on `r.key`.
///
/// # Errors
/// `forbidden`, `internal`.
pub fn unban<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: KeyTargetRequest,
) -> Result<PolicyReply, WireError> {
    let (caller, _) = manager(ctx, &r.user)?;
    let changed = ctx
        .store
        .revoke(&Principal::key(&r.key), Grant::Ban)
        .map_err(store_error)?;
    if changed {
        record(
            ctx,
            &caller,
            serde_json::json!({"action": "unban", "target": r.key}),
        )?;
    }
    Ok(reply(ctx, changed))
}

/// `kick`: remove the member named `r.member` (it may join again unless banned, or the group
/// is private and it was not invited).
///
/// # Errors
/// `forbidden` (also for kicking the owner, or an admin unless the owner asks), `not_found`
/// (no such member), `internal`.
pub fn kick<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: MemberTargetRequest,
) -> Result<PolicyReply, WireError> {
    let (caller, role) = manager(ctx, &r.user)?;
    let target = member_named(ctx, &r.member)?;
    if is_owner(ctx, &target)
        || (role == Role::Admin && ctx.store.has(&target, Grant::Admin).map_err(store_error)?)
    {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            "the owner cannot be kicked, and only the owner kicks an admin",
        ));
    }
    ctx.store
        .revoke(&target, Grant::Invite)
        .map_err(store_error)?;
    let removed = expel(ctx, &target)?;
    if removed.is_some() {
        record(
            ctx,
            &caller,
            serde_json::json!({"action": "kick", "target": r.member}),
        )?;
    }
    Ok(reply(ctx, removed.is_some()))
}

/// `promote`: make the member named `r.member` an admin (owner only).
///
/// # Errors
/// `forbidden`, `not_found`, `internal`.
pub fn promote<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: MemberTargetRequest,
) -> Result<PolicyReply, WireError> {
    let (caller, role) = manager(ctx, &r.user)?;
    if role != Role::Owner {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            "only the owner promotes admins",
        ));
    }
    let target = member_named(ctx, &r.member)?;
    let changed = ctx
        .store
        .grant(&target, Grant::Admin, ctx.now)
        .map_err(store_error)?;
    if changed {
        record(
            ctx,
            &caller,
            serde_json::json!({"action": "promote", "target": r.member}),
        )?;
    }
    Ok(reply(ctx, changed))
}

/// `set_mode`: make the group open or private.
///
/// # Errors
/// `forbidden`, `internal`.
pub fn set_mode<S: GroupLog + ?Sized>(
    ctx: &mut Ctx<'_, S>,
    r: SetModeRequest,
) -> Result<PolicyReply, WireError> {
    let (caller, _) = manager(ctx, &r.user)?;
    let changed = ctx.store.set_mode(r.mode).map_err(store_error)?;
    if changed {
        record(
            ctx,
            &caller,
            serde_json::json!({"action": "set_mode", "mode": r.mode}),
        )?;
    }
    Ok(reply(ctx, changed))
}

fn member_named<S: GroupLog + ?Sized>(
    ctx: &Ctx<'_, S>,
    name: &UserName,
) -> Result<Principal, WireError> {
    ctx.store
        .member_named(name)
        .map_err(store_error)?
        .ok_or_else(|| {
            WireError::new(
                ErrorCode::NotFound,
                format!("{name} is not a member of \"{}\"", ctx.config.name),
            )
        })
}
