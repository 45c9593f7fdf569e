//! Routing a request to the group it names (PROTOCOL §6): the one place the `group` field of
//! a node request is checked. No handler checks it again.
//!
//! - A host of one group (`group-node NAME IP:PORT`): a request without `group` is for its
//!   group; one naming another group gets `unknown_group`.
//! - A group host (`--host`): `group` is required (`invalid_field` naming `group`), and must
//!   be one of its live groups (`unknown_group`).
//!
//! `renew` names its groups per entry (each routed on its own), `create` names a group that
//! does not exist yet, and `stop` without `group` is the host's own: those go to the host.

use agora_proto::action::NodeRequest;
use agora_proto::wire::{ErrorCode, GroupName, WireError};

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To this group's engine.
    Group(GroupName),
    /// To the host: `create`, `renew` (routed per entry by [`route_name`]) and `stop`
    /// without `group`.
    Host,
}

/// What a host serves, for routing.
#[derive(Debug, Clone, Copy)]
pub enum Serving<'a, F: Fn(&GroupName) -> bool> {
    /// A host of one group: this one.
    One(&'a GroupName),
    /// A group host: the live groups are those `F` says yes to.
    Many(F),
}

/// Routes `request` (see the module docs).
///
/// # Errors
/// `invalid_field` (a group host and no `group`), `unknown_group` (a group not served here),
/// each naming the group it was about in [`WireError::group`].
pub fn route<F: Fn(&GroupName) -> bool>(
    request: &NodeRequest,
    serving: &Serving<'_, F>,
) -> Result<Route, WireError> {
    match request {
        NodeRequest::Create(_) | NodeRequest::Renew(_) => return Ok(Route::Host),
        NodeRequest::Stop(r) if r.group.is_none() => return Ok(Route::Host),
        _ => {}
    }
    match request.group() {
        Some(group) => route_name(group, serving).map(Route::Group),
        None => match serving {
            Serving::One(name) => Ok(Route::Group((*name).clone())),
            Serving::Many(_) => Err(WireError::new(
                ErrorCode::InvalidField,
                "group: required on a group host",
            )),
        },
    }
}

/// Checks that `group` is served here; returns it.
///
/// # Errors
/// `unknown_group`, naming `group`.
pub fn route_name<F: Fn(&GroupName) -> bool>(
    group: &GroupName,
    serving: &Serving<'_, F>,
) -> Result<GroupName, WireError> {
    let served = match serving {
        Serving::One(name) => *name == group,
        Serving::Many(live) => live(group),
    };
    if served {
        return Ok(group.clone());
    }
    let message = match serving {
        Serving::One(name) => format!("this node serves \"{name}\", not \"{group}\""),
        Serving::Many(_) => format!("this host serves no group \"{group}\""),
    };
    Err(WireError::new(ErrorCode::UnknownGroup, message).with_group(Some(group.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_proto::wire::{InfoRequest, MembershipRequest, UserName};

    fn g(s: &str) -> GroupName {
        GroupName::new(s).expect("name")
    }

    fn info(group: Option<&str>) -> NodeRequest {
        NodeRequest::Info(InfoRequest {
            group: group.map(g),
        })
    }

    fn never(_: &GroupName) -> bool {
        false
    }

    #[test]
    fn a_host_of_one_takes_no_group_as_its_own_and_refuses_another() {
        let own = g("own");
        let one = Serving::<fn(&GroupName) -> bool>::One(&own);
        assert_eq!(route(&info(None), &one), Ok(Route::Group(own.clone())));
        assert_eq!(
            route(&info(Some("own")), &one),
            Ok(Route::Group(own.clone()))
        );
        let e = route(&info(Some("other")), &one).expect_err("another group");
        assert_eq!(e.code, ErrorCode::UnknownGroup);
        assert_eq!(e.group, Some(g("other")));
    }

    #[test]
    fn a_group_host_requires_group_and_refuses_groups_it_does_not_serve() {
        let many = Serving::Many(|n: &GroupName| n.as_str() == "a" || n.as_str() == "b");
        let e = route(&info(None), &many).expect_err("no group");
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert!(e.message.starts_with("group:"), "{}", e.message);
        assert_eq!(route(&info(Some("b")), &many), Ok(Route::Group(g("b"))));
        let e = route(&info(Some("c")), &many).expect_err("not served");
        assert_eq!(e.code, ErrorCode::UnknownGroup);
        assert_eq!(e.group, Some(g("c")));
    }

    #[test]
    fn stop_without_group_and_renew_go_to_the_host() {
        let many = Serving::Many(never);
        let stop = |group: Option<&str>| {
            NodeRequest::Stop(MembershipRequest {
                group: group.map(g),
                user: UserName::new("op").expect("user"),
            })
        };
        assert_eq!(route(&stop(None), &many), Ok(Route::Host));
        let e = route(&stop(Some("x")), &many).expect_err("stop of a group not here");
        assert_eq!(e.code, ErrorCode::UnknownGroup);
        let renew = NodeRequest::Renew(agora_proto::wire::RenewRequest {
            user: UserName::new("u").expect("user"),
            groups: Vec::new(),
        });
        assert_eq!(route(&renew, &many), Ok(Route::Host));
    }
}
