//! The action table: every action of AGORA/1 declared once, with its wire name, request
//! type, reply type and the server role that answers it (PROTOCOL.md §4–§6).
//!
//! The `actions!` macro turns the table into:
//! - [`Action`]: every action, with [`Action::as_str`], [`Action::from_wire`] and
//!   [`Action::role`];
//! - one request enum per server role ([`RegistryRequest`], [`NodeRequest`],
//!   [`KeyRequest`]), each implementing [`ServerRequest`], which the codec decodes into
//!   (`crate::codec::decode_request`), checking the role before any field;
//! - one marker type per action in [`call`], implementing [`Call`], so that a client's call
//!   returns that action's reply type and a server's handler must produce it.
//!
//! # Adding an action
//! Add one line to the table below (name, wire name, request type => reply type) under the
//! role that serves it, define the request and reply types in [`crate::wire`] if they are new,
//! and add the handler file on the server (`group-node/src/cmd/` or `registry/src/cmd/`). The
//! server's `dispatch` is an exhaustive match on its request enum, so the compiler points at
//! the one arm to add; PROTOCOL.md documents the action.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::*;

/// Which server answers an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The registry (PROTOCOL §4).
    Registry,
    /// A group node (PROTOCOL §6).
    Node,
    /// A server's plaintext key endpoint (PROTOCOL §1.1).
    KeyEndpoint,
}

impl Role {
    /// How the role is named in messages: `registry`, `group-node`, `key endpoint`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Registry => "registry",
            Role::Node => "group-node",
            Role::KeyEndpoint => "key endpoint",
        }
    }
}

/// One action, as a type: its request, its reply and its [`Action`]. The types in [`call`]
/// implement it; a client call is typed by it (`ReqClient::call::<call::Info>(&req)` returns
/// an [`InfoReply`]).
pub trait Call {
    /// The action.
    const ACTION: Action;
    /// The request's fields (without `action`).
    type Request: Serialize + DeserializeOwned;
    /// The reply's fields (without `ok`).
    type Reply: Serialize + DeserializeOwned;
}

/// A server's request enum: what one role decodes a request body into.
pub trait ServerRequest: Sized {
    /// The role whose actions this enum holds.
    const ROLE: Role;

    /// Parses the fields of `action`'s request from the JSON `body`.
    ///
    /// # Errors
    /// `None` when `action` is not one of this role's; `Some(Err(e))` with serde_json's
    /// error when a field is missing or invalid.
    fn from_body(action: Action, body: &[u8]) -> Option<Result<Self, serde_json::Error>>;

    /// The path of the field (`members`, `body.x`, `ids[2]`) where `body` fails to parse as
    /// `action`'s request, found by parsing again with `serde_path_to_error` (only on a
    /// failure, so the common path pays nothing). `None` when the failure is at the top level
    /// or the second parse fails differently.
    fn field_path(action: Action, body: &[u8]) -> Option<String>;

    /// This request's action.
    fn action(&self) -> Action;

    /// The JSON body: `{"action": NAME, …fields}`.
    fn to_body(&self) -> Vec<u8>;
}

#[derive(Serialize)]
struct Tagged<'a, T> {
    action: &'static str,
    #[serde(flatten)]
    fields: &'a T,
}

/// The JSON body of a request: `{"action": NAME, …fields of request}`.
pub fn tagged_body<T: Serialize>(action: Action, request: &T) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail.
    serde_json::to_vec(&Tagged {
        action: action.as_str(),
        fields: request,
    })
    .unwrap_or_default()
}

/// The path at which `body` fails to parse as a `T`, when a tracked parse fails the same
/// way as an untracked one.
fn traced_path<T: DeserializeOwned>(body: &[u8]) -> Option<String> {
    let plain = serde_json::from_slice::<T>(body).err()?;
    let traced =
        serde_path_to_error::deserialize::<_, T>(&mut serde_json::Deserializer::from_slice(body))
            .err()?;
    let path = traced.path().to_string();
    (traced.inner().to_string() == plain.to_string() && path != ".").then_some(path)
}

macro_rules! actions {
    ($(
        $(#[$role_doc:meta])*
        $role:ident => $enum:ident {
            $(
                $(#[$doc:meta])*
                $variant:ident $wire:literal $request:ty => $reply:ty,
            )*
        }
    )*) => {
        /// Every action a server understands, with its wire name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Action {
            $($( $(#[$doc])* $variant, )*)*
        }

        impl Action {
            /// Every action, in documentation order.
            pub const ALL: &'static [Action] = &[$($(Action::$variant,)*)*];

            /// The wire name (`"get_messages"`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($(Action::$variant => $wire,)*)*
                }
            }

            /// An action with this wire name, if any: the first in the table when two roles
            /// share the name (`stop`); see [`Action::from_wire_in`].
            pub fn from_wire(name: &str) -> Option<Action> {
                Action::ALL.iter().copied().find(|a| a.as_str() == name)
            }

            /// The action with this wire name that `role` serves, if any.
            pub fn from_wire_in(name: &str, role: Role) -> Option<Action> {
                Action::ALL
                    .iter()
                    .copied()
                    .find(|a| a.as_str() == name && a.role() == role)
            }

            /// The server role that answers this action.
            pub fn role(self) -> Role {
                match self {
                    $($(Action::$variant => Role::$role,)*)*
                }
            }
        }

        /// One marker type per action, implementing [`Call`]: `call::Info` is the `info`
        /// action, its [`InfoRequest`] and its [`InfoReply`].
        pub mod call {
            #[allow(unused_imports)]
            use super::*;
            $($(
                $(#[$doc])*
                #[derive(Debug, Clone, Copy)]
                pub struct $variant;

                impl Call for $variant {
                    const ACTION: Action = Action::$variant;
                    type Request = $request;
                    type Reply = $reply;
                }
            )*)*
        }

        $(
            $(#[$role_doc])*
            #[derive(Debug, Clone)]
            pub enum $enum {
                $( $(#[$doc])* $variant($request), )*
            }

            impl ServerRequest for $enum {
                const ROLE: Role = Role::$role;

                fn from_body(
                    action: Action,
                    body: &[u8],
                ) -> Option<Result<Self, serde_json::Error>> {
                    match action {
                        $(Action::$variant => Some(
                            serde_json::from_slice::<$request>(body).map($enum::$variant)
                        ),)*
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }

                fn field_path(action: Action, body: &[u8]) -> Option<String> {
                    match action {
                        $(Action::$variant => traced_path::<$request>(body),)*
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }

                fn action(&self) -> Action {
                    match self {
                        $($enum::$variant(_) => Action::$variant,)*
                    }
                }

                fn to_body(&self) -> Vec<u8> {
                    match self {
                        $($enum::$variant(r) => tagged_body(Action::$variant, r),)*
                    }
                }
            }
        )*
    };
}

actions! {
    /// A request to the registry (PROTOCOL §4).
    Registry => RegistryRequest {
        /// Register a group, or refresh it (the heartbeat).
        Register "register" RegisterRequest => RegisterReply,
        /// Remove a group.
        Unregister "unregister" UnregisterRequest => Empty,
        /// List live groups.
        List "list" ListRequest => ListReply,
        /// Find one group by name.
        Lookup "lookup" LookupRequest => LookupReply,
        /// The key a group name is bound to, live or not (read-only; a node asks before it
        /// serves, so that a node with the wrong key pair stops at start).
        Owner "owner" LookupRequest => OwnerReply,
        /// Bind a user name to the caller's key (an account).
        UserRegister "user_register" UserNameRequest => UserReply,
        /// Remove the caller's account (with explicit confirmation).
        UserUnregister "user_unregister" UserUnregisterRequest => UserReply,
        /// List user accounts.
        Users "users" ListRequest => UsersReply,
        /// One user account.
        Whois "whois" UserNameRequest => UserReply,
        /// Start or renew the caller's session (also the presence heartbeat).
        Connect "connect" ConnectRequest => ConnectReply,
        /// End the caller's session.
        Disconnect "disconnect" ListRequest => UserReply,
        /// Send a direct message to a user's mailbox.
        SendDm "send_dm" SendDmRequest => DmAck,
        /// Read the caller's mailbox.
        Mailbox "mailbox" MailboxRequest => MailboxReply,
        /// Remove shown messages from the caller's mailbox.
        AckDm "ack_dm" AckDmRequest => AckDmReply,
        /// The caller's undeliverable messages, with reasons.
        DeadLetters "dead_letters" ListRequest => DeadLettersReply,
        /// (The operator's key) drain and exit.
        StopRegistry "stop" ListRequest => StopReply,
        /// One direct message to several users, a copy in each mailbox.
        Multicast "multicast" MulticastRequest => MulticastReply,
        /// (The operator and admins) one direct message to every account.
        Broadcast "broadcast" BroadcastRequest => MulticastReply,
        /// Refuse direct messages from a user, from now on.
        Block "block" UserNameRequest => BlockReply,
        /// Accept direct messages from a blocked user again.
        Unblock "unblock" UserNameRequest => BlockReply,
        /// The users the caller blocks.
        Blocked "blocked" ListRequest => BlockedReply,
        /// (The registry's own key or the operator's) free a group name from its owner key
        /// (`registry release NAME` beside a running registry).
        Release "release" LookupRequest => ReleaseReply,
        /// Register or refresh up to 128 groups of one group host (§4.1.1).
        RegisterGroups "register_groups" RegisterGroupsRequest => RegisterGroupsReply,
        /// Keep every group a host registered live, in one request (§4.1.1).
        HeartbeatHost "heartbeat_host" HeartbeatHostRequest => HeartbeatHostReply,
    }
    /// A request to a group node (PROTOCOL §6).
    Node => NodeRequest {
        /// Name, last seq and member count.
        Info "info" InfoRequest => InfoReply,
        /// Become a member.
        Join "join" MembershipRequest => MembershipReply,
        /// Stop being a member.
        Leave "leave" MembershipRequest => MembershipReply,
        /// List members (members only in a private group).
        Members "members" MembersRequest => MembersReply,
        /// Append a message to the log.
        Send "send" SendRequest => SendAck,
        /// Read the log.
        GetMessages "get_messages" GetMessagesRequest => MessagesPage,
        /// Start or renew the live stream to this connection.
        Subscribe "subscribe" SubscribeRequest => SubscribeReply,
        /// Stop the live stream to this connection.
        Unsubscribe "unsubscribe" MembershipRequest => UnsubscribeReply,
        /// (Owner, admins) let a key join a private group.
        Invite "invite" KeyTargetRequest => PolicyReply,
        /// (Owner, admins) remove a member.
        Kick "kick" MemberTargetRequest => PolicyReply,
        /// (Owner, admins) remove a key and keep it out.
        Ban "ban" KeyTargetRequest => PolicyReply,
        /// (Owner, admins) lift a ban.
        Unban "unban" KeyTargetRequest => PolicyReply,
        /// (Owner) make a member an admin.
        Promote "promote" MemberTargetRequest => PolicyReply,
        /// (Owner, admins) make the group open or private.
        SetMode "set_mode" SetModeRequest => PolicyReply,
        /// Declare or resume an upload (AGORA/1.1).
        Upload "upload" UploadRequest => UploadReply,
        /// Store one chunk of an upload; its bytes follow in a third frame (AGORA/1.1).
        UploadChunk "upload_chunk" UploadChunkRequest => UploadReply,
        /// Where an upload stands (AGORA/1.1).
        UploadStatus "upload_status" UploadStatusRequest => UploadReply,
        /// Read a range of a content; the bytes follow in a third frame (AGORA/1.1).
        Download "download" DownloadRequest => DownloadReply,
        /// (The owner's key, or the node's own) drain, unregister and exit.
        Stop "stop" MembershipRequest => StopReply,
        /// Make a new group on a group host; the caller owns it (§6.11).
        Create "create" CreateRequest => CreateReply,
        /// Archive a group and free its name; its owner only (§6.11).
        Delete "delete" MembershipRequest => DeleteReply,
        /// Renew the subscriptions of several groups of one host at once (§6.7.1).
        Renew "renew" RenewRequest => RenewReply,
    }
    /// A request to a server's plaintext key endpoint (PROTOCOL §1.1).
    KeyEndpoint => KeyRequest {
        /// The server's CURVE public key, for pinning on first use.
        ServerKey "server_key" ServerKeyRequest => ServerKeyReply,
    }
}

impl Action {
    /// Whether a request of this action carries a data frame after its body
    /// (`upload_chunk`); every other request is exactly two frames.
    pub fn request_has_data(self) -> bool {
        matches!(self, Action::UploadChunk)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl NodeRequest {
    /// The group this request names, if any: the new group's name for `create`; `None` for
    /// `renew`, which names one per entry. On a group host a request without one is
    /// refused (`invalid_field` naming `group`, PROTOCOL §6).
    pub fn group(&self) -> Option<&GroupName> {
        match self {
            NodeRequest::Info(r) => r.group.as_ref(),
            NodeRequest::Join(r)
            | NodeRequest::Leave(r)
            | NodeRequest::Unsubscribe(r)
            | NodeRequest::Stop(r)
            | NodeRequest::Delete(r) => r.group.as_ref(),
            NodeRequest::Members(r) => r.group.as_ref(),
            NodeRequest::Send(r) => r.group.as_ref(),
            NodeRequest::GetMessages(r) => r.group.as_ref(),
            NodeRequest::Subscribe(r) => r.group.as_ref(),
            NodeRequest::Invite(r) | NodeRequest::Ban(r) | NodeRequest::Unban(r) => {
                r.group.as_ref()
            }
            NodeRequest::Kick(r) | NodeRequest::Promote(r) => r.group.as_ref(),
            NodeRequest::SetMode(r) => r.group.as_ref(),
            NodeRequest::Upload(r) => r.group.as_ref(),
            NodeRequest::UploadChunk(r) => r.group.as_ref(),
            NodeRequest::UploadStatus(r) => r.group.as_ref(),
            NodeRequest::Download(r) => r.group.as_ref(),
            NodeRequest::Create(r) => Some(&r.group),
            NodeRequest::Renew(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_one_wire_name_in_its_role() {
        let mut names: Vec<(&str, &str)> = Action::ALL
            .iter()
            .map(|a| (a.role().as_str(), a.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            Action::ALL.len(),
            "wire names are unique in a role"
        );
        for &a in Action::ALL {
            assert_eq!(Action::from_wire_in(a.as_str(), a.role()), Some(a));
        }
        assert_eq!(Action::from_wire("nope"), None);
        assert_eq!(Action::GetMessages.role(), Role::Node);
        assert_eq!(Action::SendDm.role(), Role::Registry);
        assert_eq!(Action::ServerKey.role(), Role::KeyEndpoint);
        assert_eq!(Action::from_wire_in("stop", Role::Node), Some(Action::Stop));
        assert_eq!(
            Action::from_wire_in("stop", Role::Registry),
            Some(Action::StopRegistry)
        );
    }
}
