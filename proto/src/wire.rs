//! The wire types of protocol `AGORA/1`: requests, replies, error codes and validated names.
//!
//! `docs/PROTOCOL.md` is normative; this module mirrors it. Every request is a JSON object
//! with an `action` member naming one of [`crate::action::Action`]; every reply is a JSON object with
//! `"ok": true` and the action's fields, or `"ok": false` with an [`ErrorCode`] and a message.
//! Unknown members are ignored, so that later minor versions can add optional fields.
//!
//! In this module "message" means a chat message of a group log ([`Message`]); the multipart
//! ZeroMQ unit is handled by [`crate::codec`].

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::id::MessageId;
use crate::time::Timestamp;

/// The protocol signature frame that opens every request and reply: protocol name and major
/// version (as the zguide's Majordomo `MDPC01`). A peer speaking another major version gets
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL: &[u8] = b"AGORA/1";

/// Longest group name, in characters (Unicode scalar values).
pub const MAX_GROUP_NAME_CHARS: usize = 64;
/// Longest user name, in bytes (the name is ASCII).
pub const MAX_USER_NAME_BYTES: usize = 32;
/// Longest endpoint string, in bytes.
pub const MAX_ENDPOINT_BYTES: usize = 256;
/// Default size limit of one message body, in bytes of its JSON text (1 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Room for the rest of a request beside the body, in bytes (64 KiB). A server's frame limit
/// (`ZMQ_MAXMSGSIZE`) is its body limit plus this.
pub const REQUEST_OVERHEAD_BYTES: usize = 64 << 10;
/// Messages in one history page when the request gives no `limit`.
pub const DEFAULT_PAGE_LIMIT: u32 = 100;
/// The largest `limit` (and `latest`) a history request may ask for.
pub const MAX_PAGE_LIMIT: u32 = 1000;
/// A history page stops growing once its bodies pass this many bytes (4 MiB); it always holds
/// at least one message, so a page is at most this plus one maximal body.
pub const MAX_PAGE_BYTES: usize = 4 << 20;
/// A batched push (`{"event": "entries"}`, [`PushBatch`]) stops growing once its JSON passes
/// this many bytes (1 MiB); it always holds at least one entry, so a push message is at most
/// this plus one maximal entry.
pub const MAX_PUSH_BATCH_BYTES: usize = 1 << 20;
/// A node's default push budget per subscription, in bytes of pushed event JSON not yet
/// acked by the subscriber (4 MiB). See [`SubscribeRequest::acked_seq`].
pub const DEFAULT_PUSH_BUDGET_BYTES: usize = 4 << 20;
/// A node's default push budget for all its subscriptions together, in bytes (64 MiB).
pub const DEFAULT_PUSH_BUDGET_TOTAL_BYTES: usize = 64 << 20;

/// Stable error codes, sent as snake_case strings in `"error"`. Documented in
/// `docs/PROTOCOL.md`; never renamed within a major version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frames after the envelope are not `[signature, body]`.
    BadFrames,
    /// The signature frame names another protocol or major version.
    UnsupportedVersion,
    /// The body frame is not JSON (or not UTF-8).
    InvalidJson,
    /// The body is JSON but not an object, or a field is missing or invalid.
    InvalidField,
    /// The `action` names no action this server handles.
    UnknownAction,
    /// A body or request is over the size limit.
    TooLarge,
    /// The request needs membership and the user is not a member.
    NotMember,
    /// No such group here (registry), or the request's `group` is not this node's.
    UnknownGroup,
    /// The group name is held by another live endpoint.
    NameTaken,
    /// A looked-up item (a message id) does not exist.
    NotFound,
    /// A client-chosen message id is already used by a different message.
    IdConflict,
    /// A configured bound is full (groups in the registry, members in a group).
    LimitReached,
    /// The peer sent more requests than its rate limit allows; retry later.
    RateLimited,
    /// The caller's role does not allow this (policy actions need the owner or an admin).
    Forbidden,
    /// The caller's key is banned from the group.
    Banned,
    /// The group is private and the caller's key was not invited.
    NotInvited,
    /// No user account of that name.
    UnknownUser,
    /// An upload chunk that does not start where the upload stands; ask `upload` again for
    /// where to resume.
    BadOffset,
    /// An upload's bytes hash to another digest than the one declared; it was discarded.
    DigestMismatch,
    /// The server failed (storage); the request may be retried.
    Internal,
    /// The server is stopping (a `stop`, or SIGTERM): nothing of the request was done; retry
    /// it (with the same id, for a `send`) once the server is back, or at its new endpoint.
    ShuttingDown,
    /// The caller's key has no account, and the action needs one (`users`, `whois`, `block`,
    /// `unblock`, `blocked`): register one first (`user_register`).
    NoAccount,
    /// The sender already holds its share of the recipient's mailbox (registry
    /// `--dm-share`); the message went to the sender's dead letters.
    ShareFull,
    /// The recipient has blocked the sender; the message went to the sender's dead letters.
    Blocked,
    /// The registering key already owns its maximum of group names (registry
    /// `--max-names-per-key`).
    TooManyNames,
    /// An `upload` or `upload_chunk` would leave less free disk on the node than its
    /// reserve (`--disk-reserve-bytes`); nothing was stored: retry later.
    StorageFull,
    /// A code this client does not know (from a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code a server sends (all but [`ErrorCode::Unknown`]), in documentation order
    /// (PROTOCOL §7). A new code fails to compile in [`ErrorCode::index`] until it is listed.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::BadFrames,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidJson,
        ErrorCode::InvalidField,
        ErrorCode::UnknownAction,
        ErrorCode::TooLarge,
        ErrorCode::NotMember,
        ErrorCode::UnknownGroup,
        ErrorCode::NameTaken,
        ErrorCode::NotFound,
        ErrorCode::IdConflict,
        ErrorCode::LimitReached,
        ErrorCode::RateLimited,
        ErrorCode::Forbidden,
        ErrorCode::Banned,
        ErrorCode::NotInvited,
        ErrorCode::UnknownUser,
        ErrorCode::BadOffset,
        ErrorCode::DigestMismatch,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::NoAccount,
        ErrorCode::ShareFull,
        ErrorCode::Blocked,
        ErrorCode::TooManyNames,
        ErrorCode::StorageFull,
    ];

    /// The code's place in [`ErrorCode::ALL`] (`None` for [`ErrorCode::Unknown`]). An
    /// exhaustive match: a new variant must be placed here, and so in `ALL`.
    pub fn index(self) -> Option<usize> {
        let i = match self {
            ErrorCode::BadFrames => 0,
            ErrorCode::UnsupportedVersion => 1,
            ErrorCode::InvalidJson => 2,
            ErrorCode::InvalidField => 3,
            ErrorCode::UnknownAction => 4,
            ErrorCode::TooLarge => 5,
            ErrorCode::NotMember => 6,
            ErrorCode::UnknownGroup => 7,
            ErrorCode::NameTaken => 8,
            ErrorCode::NotFound => 9,
            ErrorCode::IdConflict => 10,
            ErrorCode::LimitReached => 11,
            ErrorCode::RateLimited => 12,
            ErrorCode::Forbidden => 13,
            ErrorCode::Banned => 14,
            ErrorCode::NotInvited => 15,
            ErrorCode::UnknownUser => 16,
            ErrorCode::BadOffset => 17,
            ErrorCode::DigestMismatch => 18,
            ErrorCode::Internal => 19,
            ErrorCode::ShuttingDown => 20,
            ErrorCode::NoAccount => 21,
            ErrorCode::ShareFull => 22,
            ErrorCode::Blocked => 23,
            ErrorCode::TooManyNames => 24,
            ErrorCode::StorageFull => 25,
            ErrorCode::Unknown => return None,
        };
        Some(i)
    }

    /// The wire name (`"not_member"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrames => "bad_frames",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::UnknownAction => "unknown_action",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotMember => "not_member",
            ErrorCode::UnknownGroup => "unknown_group",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::NotFound => "not_found",
            ErrorCode::IdConflict => "id_conflict",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Banned => "banned",
            ErrorCode::NotInvited => "not_invited",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::BadOffset => "bad_offset",
            ErrorCode::DigestMismatch => "digest_mismatch",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::NoAccount => "no_account",
            ErrorCode::ShareFull => "share_full",
            ErrorCode::Blocked => "blocked",
            ErrorCode::TooManyNames => "too_many_names",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"ok": false, "error": CODE, "message": TEXT}`, and for `rate_limited`
/// also `"retry_after_ms": N`. A group node's error to a request that named a group carries
/// that `"group"` too (group hosts, PROTOCOL §6), so a client with one connection to a group host can tell
/// whose request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// The stable code.
    #[serde(rename = "error")]
    pub code: ErrorCode,
    /// Human-readable detail; not stable.
    pub message: String,
    /// With `rate_limited`: milliseconds until a request from this peer is accepted again
    /// (at least 1). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// From a group node: the group the failed request named (group hosts, PROTOCOL §6). Absent when the
    /// request named none, or from an older node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
}

impl WireError {
    /// An error with this code and detail.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
            retry_after_ms: None,
            group: None,
        }
    }

    /// This error, naming `group` (the group of the request it answers; `None` leaves it
    /// absent).
    pub fn with_group(mut self, group: Option<GroupName>) -> WireError {
        self.group = group;
        self
    }

    /// A `rate_limited` error: retry after `wait` (rounded up to whole milliseconds, at
    /// least 1).
    pub fn rate_limited(wait: std::time::Duration) -> WireError {
        let ms = u64::try_from(wait.as_micros().div_ceil(1000))
            .unwrap_or(u64::MAX)
            .max(1);
        WireError {
            code: ErrorCode::RateLimited,
            message: format!("too many requests; retry in {ms} ms"),
            retry_after_ms: Some(ms),
            group: None,
        }
    }
}

/// Why a name or endpoint was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty, or only white space.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// Over the length limit.
    #[error("{what} is longer than {max}")]
    TooLong {
        /// `"group name"`, `"user name"` or `"endpoint"`.
        what: &'static str,
        /// The limit, in the unit of that name's rule.
        max: usize,
    },
    /// Has a character the rule forbids.
    #[error("{what} {value:?} has a forbidden character")]
    BadChar {
        /// `"group name"` or `"user name"`.
        what: &'static str,
        /// The rejected value.
        value: String,
    },
    /// Not `tcp://HOST:PORT`, or HOST is a wildcard (`*`, `0.0.0.0`, `[::]`).
    #[error("endpoint {0:?} is not tcp://HOST:PORT with a connectable HOST (no wildcard) and a port from 1 to 65535")]
    BadEndpoint(String),
    /// An endpoint with what is wrong with it ([`Endpoint::new`] returns this one).
    #[error("endpoint {value:?}: {problem}")]
    Endpoint {
        /// The rejected value.
        value: String,
        /// What is wrong.
        problem: EndpointProblem,
    },
}

/// What is wrong with an endpoint string: the part of an error message after the value,
/// for a command line (`ADDRESS "127.0.0.1:99999": port must be 1-65535`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointProblem {
    /// A scheme other than `tcp://` (`ipc://`, `udp://`, `http://`).
    #[error("unknown scheme {0:?}; only tcp:// is supported (or give IP:PORT)")]
    Scheme(String),
    /// No `tcp://` where the full form is required ([`Endpoint::new`]; command lines take
    /// `IP:PORT` too, through [`Endpoint::from_host_port`]).
    #[error("expected tcp://HOST:PORT")]
    NoScheme,
    /// No `:PORT` after the host.
    #[error("expected HOST:PORT (or tcp://HOST:PORT)")]
    NoPort,
    /// A connect endpoint's port is not a number from 1 to 65535.
    #[error("port must be 1-65535")]
    Port,
    /// A bind endpoint's port is not a number from 0 to 65535 (or `*`).
    #[error("port must be 0-65535 (0 binds a free port)")]
    BindPort,
    /// The host is a wildcard, which a server binds but nobody can connect to.
    #[error("{0} is a wildcard address, which nobody can connect to; give the host's address")]
    Wildcard(String),
    /// The host is empty or has characters no host name, IP address or interface has.
    #[error("host {0:?} is not a host name, an IP address or a bracketed IPv6 address")]
    Host(String),
    /// Longer than [`MAX_ENDPOINT_BYTES`].
    #[error("longer than {MAX_ENDPOINT_BYTES} bytes")]
    TooLong,
}

/// Splits `tcp://HOST:PORT` or `HOST:PORT` into the host and the port text, after checking
/// the length and the scheme.
fn endpoint_parts(s: &str) -> Result<(&str, &str), EndpointProblem> {
    if s.len() > MAX_ENDPOINT_BYTES {
        return Err(EndpointProblem::TooLong);
    }
    let rest = match s.split_once("://") {
        Some(("tcp", rest)) => rest,
        Some((scheme, _)) => return Err(EndpointProblem::Scheme(format!("{scheme}://"))),
        None => s,
    };
    let (host, port) = rest.rsplit_once(':').ok_or(EndpointProblem::NoPort)?;
    // `[::1]` without a port splits inside the brackets.
    if host.starts_with('[') && !host.ends_with(']') {
        return Err(EndpointProblem::NoPort);
    }
    Ok((host, port))
}

/// Whether `host` is a wildcard: `*`, `0.0.0.0` or `[::]` (any spelling).
fn is_wildcard_host(host: &str) -> bool {
    host == "*"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_unspecified())
        || host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
            .is_some_and(|a| a.is_unspecified())
}

/// Whether `host` is a host name, an IPv4 address or a bracketed IPv6 address.
fn is_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Checks an endpoint a server binds, `tcp://HOST:PORT` or `HOST:PORT`: HOST an address,
/// a host name, an interface name or a wildcard (`*`, `0.0.0.0`, `[::]`); PORT 0 to 65535
/// or `*` (0 and `*` bind a free port, which the server prints). Returns it as
/// `tcp://HOST:PORT`.
///
/// # Errors
/// [`EndpointProblem::TooLong`], [`EndpointProblem::Scheme`], [`EndpointProblem::NoPort`],
/// [`EndpointProblem::BindPort`], [`EndpointProblem::Host`].
pub fn bind_endpoint(s: &str) -> Result<String, EndpointProblem> {
    let (host, port) = endpoint_parts(s)?;
    if port != "*" && port.parse::<u16>().is_err() {
        return Err(EndpointProblem::BindPort);
    }
    if host != "*" && !is_host(host) {
        return Err(EndpointProblem::Host(host.to_owned()));
    }
    Ok(format!("tcp://{host}:{port}"))
}

/// Checks a comma-separated list of connect endpoints (each `tcp://HOST:PORT` or
/// `HOST:PORT`, as [`Endpoint::from_host_port`]), as `--registry` takes for registries
/// sharing one database. Returns the list with every endpoint in `tcp://` form.
///
/// # Errors
/// The first bad endpoint's [`NameError::Endpoint`]; [`NameError::Empty`] for an empty list.
pub fn endpoint_list(s: &str) -> Result<String, NameError> {
    let endpoints = s
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| Endpoint::from_host_port(e).map(String::from))
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err(NameError::Empty("endpoint list"));
    }
    Ok(endpoints.join(","))
}

/// A group name: 1 to 64 characters, no control characters, no leading or trailing white
/// space. Spaces inside are allowed (`Cool Group`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GroupName(String);

impl GroupName {
    /// Validates a group name.
    ///
    /// # Errors
    /// [`NameError::Empty`], [`NameError::TooLong`] (over [`MAX_GROUP_NAME_CHARS`]) or
    /// [`NameError::BadChar`] (a control character, or white space at either end).
    pub fn new(name: impl Into<String>) -> Result<GroupName, NameError> {
        let name = name.into();
        if name.trim().is_empty() {
            return Err(NameError::Empty("group name"));
        }
        if name.chars().count() > MAX_GROUP_NAME_CHARS {
            return Err(NameError::TooLong {
                what: "group name",
                max: MAX_GROUP_NAME_CHARS,
            });
        }
        if name.chars().any(char::is_control) || name.trim() != name {
            return Err(NameError::BadChar {
                what: "group name",
                value: name,
            });
        }
        Ok(GroupName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A user name: 1 to 32 bytes of ASCII letters, digits, `_`, `-` and `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName(String);

impl UserName {
    /// Validates a user name.
    ///
    /// # Errors
    /// [`NameError::Empty`], [`NameError::TooLong`] (over [`MAX_USER_NAME_BYTES`]) or
    /// [`NameError::BadChar`].
    pub fn new(name: impl Into<String>) -> Result<UserName, NameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NameError::Empty("user name"));
        }
        if name.len() > MAX_USER_NAME_BYTES {
            return Err(NameError::TooLong {
                what: "user name",
                max: MAX_USER_NAME_BYTES,
            });
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(NameError::BadChar {
                what: "user name",
                value: name,
            });
        }
        Ok(UserName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A connectable ZeroMQ TCP endpoint, `tcp://HOST:PORT`: HOST a name, an IPv4 address or a
/// bracketed IPv6 address, PORT from 1 to 65535 (no wildcards).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint(String);

impl Endpoint {
    /// Validates an endpoint.
    ///
    /// # Errors
    /// [`NameError::TooLong`] over [`MAX_ENDPOINT_BYTES`], [`NameError::Endpoint`]
    /// otherwise, saying what is wrong ([`EndpointProblem`]).
    pub fn new(endpoint: impl Into<String>) -> Result<Endpoint, NameError> {
        let endpoint = endpoint.into();
        if !endpoint.starts_with("tcp://") && !endpoint.contains("://") {
            return Err(NameError::Endpoint {
                value: endpoint,
                problem: EndpointProblem::NoScheme,
            });
        }
        match Endpoint::problem(&endpoint) {
            None => Ok(Endpoint(endpoint)),
            Some(EndpointProblem::TooLong) => Err(NameError::TooLong {
                what: "endpoint",
                max: MAX_ENDPOINT_BYTES,
            }),
            Some(problem) => Err(NameError::Endpoint {
                value: endpoint,
                problem,
            }),
        }
    }

    /// What is wrong with `s` as a connect endpoint (`tcp://HOST:PORT` or `HOST:PORT`), if
    /// anything.
    fn problem(s: &str) -> Option<EndpointProblem> {
        let (host, port) = match endpoint_parts(s) {
            Ok(parts) => parts,
            Err(e) => return Some(e),
        };
        if is_wildcard_host(host) {
            return Some(EndpointProblem::Wildcard(host.to_owned()));
        }
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Some(EndpointProblem::Port);
        }
        if !is_host(host) {
            return Some(EndpointProblem::Host(host.to_owned()));
        }
        None
    }

    /// Turns `IP:PORT` or `HOST:PORT` (as the seed's command lines take) or a full
    /// `tcp://…` string into an endpoint.
    ///
    /// # Errors
    /// As [`Endpoint::new`].
    pub fn from_host_port(s: &str) -> Result<Endpoint, NameError> {
        if s.contains("://") {
            Endpoint::new(s)
        } else {
            Endpoint::new(format!("tcp://{s}")).map_err(|e| match e {
                NameError::Endpoint { problem, .. } => NameError::Endpoint {
                    value: s.to_owned(),
                    problem,
                },
                e => e,
            })
        }
    }

    /// The endpoint string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether a `tcp://HOST:PORT` endpoint (bind or connect form) names a loopback address:
/// `localhost`, `127.0.0.0/8` or `[::1]`. `--insecure` is allowed only when every endpoint
/// is loopback.
pub fn is_loopback(endpoint: &str) -> bool {
    let Some((host, _port)) = endpoint
        .strip_prefix("tcp://")
        .unwrap_or(endpoint)
        .rsplit_once(':')
    else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

macro_rules! string_newtype {
    ($($t:ident),*) => {$(
        impl TryFrom<String> for $t {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                $t::new(s)
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $t::new(s)
            }
        }
    )*};
}
string_newtype!(GroupName, UserName, Endpoint);

// ----- requests -----

/// `register`: add a group to the registry, or refresh it. Group nodes repeat it every
/// heartbeat interval; it is idempotent for the same name and endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The group's name.
    pub name: GroupName,
    /// Where members reach the group node.
    pub endpoint: Endpoint,
    /// The node's current member count (default 0).
    #[serde(default)]
    pub members: u64,
    /// The node's CURVE public key, for clients to connect with; absent for an
    /// `--insecure` node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<crate::key::PublicKey>,
}

/// `unregister`: remove a group; only its registered endpoint may do so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnregisterRequest {
    /// The group's name.
    pub name: GroupName,
    /// The endpoint it was registered with.
    pub endpoint: Endpoint,
}

/// `list`: every live group. No fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {}

/// `lookup`: one live group by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupRequest {
    /// The group's name.
    pub name: GroupName,
}

/// `info`: the node's group name, last seq and member count. Anyone may ask.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoRequest {
    /// If present, must be this node's group (else `unknown_group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
}

/// `join` and `leave`: change the caller's membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRequest {
    /// If present, must be this node's group (else `unknown_group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller.
    pub user: UserName,
}

/// `subscribe`: start or renew the live stream to the calling connection, and ack what it
/// received (credit-based flow control, zguide chapter 7). Without `batch` and `acked_seq`
/// it is the `AGORA/1.0` request, which a [`MembershipRequest`] also encodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeRequest {
    /// If present, must be this node's group (else `unknown_group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller.
    pub user: UserName,
    /// The client accepts batched pushes, `{"event": "entries"}` ([`PushBatch`]); without it
    /// (default false) each entry is pushed alone as `{"event": "entry"}` ([`PushEvent`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batch: bool,
    /// The ack: the seq of the newest entry this connection has received and handed on
    /// (from pushes or backfill). Every push carrying only entries up to it no longer counts
    /// against the subscription's push budget ([`SubscribeReply::budget_bytes`]). A value
    /// past the node's last seq counts as the last seq. Absent (older clients): each renewal
    /// acks what was pushed before the previous renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_seq: Option<u64>,
}

impl SubscribeRequest {
    /// A plain subscribe (no batches, no ack), as `AGORA/1.0` clients send it.
    pub fn plain(group: Option<GroupName>, user: UserName) -> SubscribeRequest {
        SubscribeRequest {
            group,
            user,
            batch: false,
            acked_seq: None,
        }
    }
}

/// `members`: the member list. Anyone may ask.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersRequest {
    /// If present, must be this node's group (else `unknown_group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
}

/// `send`: append a message to the group log (members only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// If present, must be this node's group (else `unknown_group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The sender; must be a member.
    pub user: UserName,
    /// Any JSON value: string, bool, number, object, list or null. At most the node's
    /// `--max-message-bytes` (default 1 MiB) of JSON text.
    pub body: Box<RawValue>,
    /// A client-chosen id. A retry with the same id, sender and body gets the first ack
    /// again and is stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<MessageId>,
    /// A file this message carries (AGORA/1.1): its content must be complete on the node
    /// (§6.9); the body is then the caption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
}

impl SendRequest {
    /// Checks the body as a chat message: a JSON string that is empty or only white space
    /// (Unicode `White_Space`, after JSON unescaping) is refused, unless the message carries
    /// an attachment (the body is then its caption, which may be empty). Any other JSON value
    /// is taken as it is.
    ///
    /// # Errors
    /// The `invalid_field` message, starting with the field's path (`body`).
    pub fn check_body(&self) -> Result<(), String> {
        if self.attachment.is_none() && is_blank_text(&self.body) {
            return Err(
                "body: the text is empty or only white space; there is nothing to send".into(),
            );
        }
        Ok(())
    }
}

/// Whether `body` is a JSON string that is empty or only white space once unescaped
/// (`""`, `"   "`, `"\n\t"`, `"\u00a0"`). Other JSON values are never blank.
pub fn is_blank_text(body: &RawValue) -> bool {
    let text = body.get().trim_start();
    if !text.starts_with('"') {
        return false;
    }
    serde_json::from_str::<String>(text).is_ok_and(|s| s.trim().is_empty())
}

/// A file carried by a message: the content's digest and size, and how to present it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The content's SHA-256.
    pub sha256: Sha256Digest,
    /// Its size in bytes.
    pub size: u64,
    /// The file's name, for people and as a default file name: 1 to 255 bytes, no control
    /// characters, no `/`.
    pub name: String,
    /// Its media type (RFC 6838), such as `image/png`: at most 127 bytes, `type/subtype`.
    pub media_type: String,
}

impl Attachment {
    /// Checks `name` and `media_type`.
    ///
    /// # Errors
    /// The message for `invalid_field`, starting with the field's path.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 255 {
            return Err("attachment.name: must be 1 to 255 bytes".into());
        }
        if self.name.chars().any(|c| c.is_control() || c == '/') {
            return Err("attachment.name: no control characters and no '/'".into());
        }
        let ok_type = self.media_type.len() <= 127
            && self.media_type.split('/').count() == 2
            && self
                .media_type
                .split('/')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_graphic()));
        if !ok_type {
            return Err(format!(
                "attachment.media_type: {:?} is not type/subtype (RFC 6838)",
                self.media_type.chars().take(64).collect::<String>()
            ));
        }
        Ok(())
    }
}

/// The bytes of one upload chunk, at most (1 MiB); a node answers a larger one
/// `too_large`.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// The chunk size a node asks uploads to use, and sends downloads in (256 KiB).
pub const CHUNK_BYTES: usize = 256 << 10;

/// Chunks an uploader may have in flight before waiting for their replies (8): the credit
/// window, zguide chapter 7's file transfer.
pub const UPLOAD_WINDOW: u32 = 8;

/// `upload`: declares, or resumes, the upload of a file's content (members only). The
/// content is named by its digest; a content the node already holds is not sent again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadRequest {
    /// If present, must be this node's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller's name (identity is the key).
    pub user: UserName,
    /// The SHA-256 of the whole content.
    pub sha256: Sha256Digest,
    /// The content's size in bytes.
    pub size: u64,
}

/// Where an upload stands: `upload`, `upload_chunk` and `upload_status` answer this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReply {
    /// The content's digest.
    pub sha256: Sha256Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes the node holds: the next chunk starts here.
    pub have: u64,
    /// The content is complete, verified and durable (`have == size`).
    pub complete: bool,
    /// The chunk size to send, in bytes ([`CHUNK_BYTES`]).
    pub chunk_bytes: u64,
    /// Chunks that may be in flight at once ([`UPLOAD_WINDOW`]).
    pub window: u32,
}

/// `upload_chunk`: `[signature, body, bytes]`, the bytes to store at `offset` (members
/// only). Chunks are appended in order: `offset` must be where the upload stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadChunkRequest {
    /// If present, must be this node's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller's name.
    pub user: UserName,
    /// The upload's digest.
    pub sha256: Sha256Digest,
    /// Where the chunk's bytes go, in bytes from the start.
    pub offset: u64,
}

/// `upload_status`: where the upload of `sha256` stands (members only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadStatusRequest {
    /// If present, must be this node's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller's name.
    pub user: UserName,
    /// The upload's digest.
    pub sha256: Sha256Digest,
}

/// `download`: up to `length` bytes of a complete content from `offset` (members only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadRequest {
    /// If present, must be this node's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller's name.
    pub user: UserName,
    /// The content's digest.
    pub sha256: Sha256Digest,
    /// The first byte, default 0.
    #[serde(default)]
    pub offset: u64,
    /// At most this many bytes, default and most [`MAX_CHUNK_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

/// A `download` reply's fields; the bytes follow in their own frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadReply {
    /// The content's digest.
    pub sha256: Sha256Digest,
    /// Its whole size in bytes.
    pub size: u64,
    /// Where these bytes start.
    pub offset: u64,
    /// How many bytes the data frame holds.
    pub length: u64,
}

/// `get_messages`: read the log (members only). At most one selector of `after_seq`,
/// `since`, `id` and `latest`; none means the whole log from seq 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetMessagesRequest {
    /// If present, must be this node's group (else `unknown_group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller; must be a member.
    pub user: UserName,
    /// Messages with seq greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
    /// Messages stored at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// The one message with this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<MessageId>,
    /// The newest N messages (1 to [`MAX_PAGE_LIMIT`]), in seq order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<u32>,
    /// Page size, 1 to [`MAX_PAGE_LIMIT`]; default [`DEFAULT_PAGE_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `invite`, `ban`, `unban`: a policy action on a key (members are keys; a key need not
/// have joined yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyTargetRequest {
    /// If present, must be this node's group (else `unknown_group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller's name (a label; the caller is its key).
    pub user: UserName,
    /// The key acted on.
    pub key: crate::key::PublicKey,
}

/// `kick`, `promote`: a policy action on a member, by the name they joined with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberTargetRequest {
    /// If present, must be this node's group (else `unknown_group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller's name (a label; the caller is its key).
    pub user: UserName,
    /// The member acted on.
    pub member: UserName,
}

/// Whether anyone may join, or only invited keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupMode {
    /// Anyone not banned may join.
    #[default]
    Open,
    /// Only invited keys (and the owner and admins) may join; non-members see nothing.
    Private,
}

impl GroupMode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupMode::Open => "open",
            GroupMode::Private => "private",
        }
    }
}

/// `set_mode`: make the group open or private.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetModeRequest {
    /// If present, must be this node's group (else `unknown_group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupName>,
    /// The caller's name (a label; the caller is its key).
    pub user: UserName,
    /// The new mode.
    pub mode: GroupMode,
}

/// `server_key`: asked on a server's plaintext key endpoint. No fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerKeyRequest {}

/// Reply to `server_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerKeyReply {
    /// The server's CURVE public key.
    pub public_key: crate::key::PublicKey,
}

/// `user_register` and `whois`: a user name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNameRequest {
    /// The account's name.
    pub name: UserName,
}

/// `user_unregister`: remove an account; `confirm` must be `true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserUnregisterRequest {
    /// The account's name.
    pub name: UserName,
    /// The explicit confirmation: without `true`, nothing is removed (`invalid_field`).
    #[serde(default)]
    pub confirm: bool,
}

/// Whether a user is around.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// A live session.
    Online,
    /// A live session, marked away.
    Away,
    /// No live session.
    #[default]
    Offline,
}

/// `connect`: start or renew the caller's session; repeat it within the TTL to stay
/// present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// `online` (default) or `away`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Presence>,
    /// Push new direct messages to this connection (a DEALER) while the session lives, as
    /// `{"event": "dm", "dm": DM}` (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub push: bool,
}

/// A pushed direct message: `{"event": "dm", "dm": {…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DmEvent {
    /// Always `"dm"`.
    pub event: String,
    /// The message, as `mailbox` returns it.
    pub dm: Dm,
}

/// Reply to `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReply {
    /// The caller's account, with its presence.
    pub user: UserEntry,
    /// The session ends unless renewed within this many milliseconds.
    pub ttl_ms: u64,
}

/// `send_dm`: a direct message to the user named `to`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendDmRequest {
    /// The recipient.
    pub to: UserName,
    /// Any JSON value, at most the registry's DM size limit (32 KiB of JSON text).
    pub body: Box<RawValue>,
    /// A client-chosen id: a retry with the same id is stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<MessageId>,
}

/// Reply to `send_dm`: the message is committed in the recipient's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmAck {
    /// Its number in the recipient's mailbox: 1, 2, 3, … per recipient.
    pub n: u64,
    /// Its id.
    pub id: MessageId,
    /// When the registry stored it.
    pub time: Timestamp,
    /// The recipient's presence when it was stored (`offline`: "stored for offline user").
    pub recipient: Presence,
    /// True when this is a retry of an already stored message.
    #[serde(default)]
    pub duplicate: bool,
}

/// Most recipients of one `multicast` (1,000).
pub const MAX_MULTICAST_RECIPIENTS: usize = 1000;

/// `multicast`: one direct message to several users, a copy in each one's mailbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MulticastRequest {
    /// The recipients: 1 to [`MAX_MULTICAST_RECIPIENTS`] names (a name given twice gets one
    /// copy).
    pub to: Vec<UserName>,
    /// Any JSON value, at most the registry's DM size limit (32 KiB of JSON text).
    pub body: Box<RawValue>,
    /// A client-chosen id: a retry with the same id stores no copy twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<MessageId>,
}

/// `broadcast`: one direct message to every account but the sender's (the registry's
/// operator and admins only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BroadcastRequest {
    /// Any JSON value, at most the registry's DM size limit (32 KiB of JSON text).
    pub body: Box<RawValue>,
    /// A client-chosen id: a retry with the same id stores no copy twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<MessageId>,
}

/// A recipient a `multicast` or `broadcast` copy did not reach (also in the sender's dead
/// letters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undelivered {
    /// The recipient's name.
    pub to: String,
    /// Why: `unknown_user`, `limit_reached` (a full mailbox), `share_full` (the sender's
    /// share of that mailbox is full) or `blocked` (the recipient blocks the sender).
    pub reason: ErrorCode,
}

/// Reply to `multicast` and `broadcast`: every copy that could be stored is committed, in
/// one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MulticastReply {
    /// The message's id (the request's, or one the registry chose).
    pub id: MessageId,
    /// Copies stored now.
    pub stored: u64,
    /// Copies stored by an earlier try of the same id.
    pub duplicates: u64,
    /// Copies that could not be stored, with the reason.
    pub undelivered: Vec<Undelivered>,
}

/// `mailbox`: the caller's messages after number `after_n` (default 0: all not yet acked).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxRequest {
    /// Messages numbered after this.
    #[serde(default)]
    pub after_n: u64,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// A direct message in a mailbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dm {
    /// Its number in the mailbox.
    pub n: u64,
    /// Its id.
    pub id: MessageId,
    /// When it was stored.
    pub time: Timestamp,
    /// The sender's account name.
    pub from: UserName,
    /// The sender's key.
    pub from_key: crate::key::PublicKey,
    /// The JSON body, as sent.
    pub body: Box<RawValue>,
}

impl PartialEq for Dm {
    fn eq(&self, other: &Self) -> bool {
        (self.n, self.id, self.time, &self.from, self.from_key)
            == (other.n, other.id, other.time, &other.from, other.from_key)
            && self.body.get() == other.body.get()
    }
}

/// Reply to `mailbox`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MailboxReply {
    /// Messages in number order.
    pub messages: Vec<Dm>,
    /// More messages follow the last one.
    pub more: bool,
}

/// `ack_dm`: the caller has shown every message up to number `up_to`; they are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckDmRequest {
    /// The last number shown.
    pub up_to: u64,
}

/// Reply to `ack_dm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckDmReply {
    /// How many messages were removed.
    pub removed: u64,
}

/// A message that could not be delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When it was refused.
    pub time: Timestamp,
    /// The recipient named.
    pub to: String,
    /// Why: `unknown_user` or `mailbox_full`.
    pub reason: String,
    /// The body, as sent.
    pub body: Box<RawValue>,
}

impl PartialEq for DeadLetter {
    fn eq(&self, other: &Self) -> bool {
        (self.time, &self.to, &self.reason) == (other.time, &other.to, &other.reason)
            && self.body.get() == other.body.get()
    }
}

/// Reply to `dead_letters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLettersReply {
    /// The caller's dead letters, oldest first.
    pub letters: Vec<DeadLetter>,
}

/// A user account: a name bound to a CURVE key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEntry {
    /// The user name.
    pub name: UserName,
    /// The key that owns it.
    pub key: crate::key::PublicKey,
    /// When it was registered.
    pub registered_at: Timestamp,
    /// Whether the user is around (default `offline`).
    #[serde(default)]
    pub presence: Presence,
    /// When a session of the user was last live, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Timestamp>,
}

/// Reply to `user_register`, `user_unregister` and `whois`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserReply {
    /// The account.
    pub user: UserEntry,
    /// Whether this call changed anything (false for a repeated registration, and `whois`).
    pub changed: bool,
}

/// Reply to `users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsersReply {
    /// Every account, sorted by name.
    pub users: Vec<UserEntry>,
}

/// Reply to `block` and `unblock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockReply {
    /// The user named in the request.
    pub name: UserName,
    /// Whether this call changed anything (false for a repeated block, or an unblock of a
    /// user not blocked).
    pub changed: bool,
}

/// One user the caller blocks (PROTOCOL §4.6.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedEntry {
    /// The account's name when it was blocked.
    pub name: UserName,
    /// Its key: the block holds for this key, whatever name it takes later.
    pub key: crate::key::PublicKey,
    /// When it was blocked.
    pub since: Timestamp,
}

/// Reply to `blocked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedReply {
    /// The users the caller blocks, sorted by name.
    pub blocked: Vec<BlockedEntry>,
}

/// Reply to a policy action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReply {
    /// The node's group.
    pub group: GroupName,
    /// Whether anything changed (false for a repeated invite, an unban of a key not banned…).
    pub changed: bool,
    /// The seq of the newest entry (the policy event, when something changed).
    pub last_seq: u64,
}

/// Which part of the log a `get_messages` reads: its selector, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// Seq greater than this (0 for the whole log).
    AfterSeq(u64),
    /// Stored at or after this time.
    Since(Timestamp),
    /// The message with this id.
    ById(MessageId),
    /// The newest N.
    Latest(u32),
}

impl GetMessagesRequest {
    /// The validated selector and page limit.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidField`] when more than one selector is given, or `latest` or
    /// `limit` is 0 or above [`MAX_PAGE_LIMIT`].
    pub fn query(&self) -> Result<(HistoryQuery, u32), WireError> {
        let given = [
            self.after_seq.is_some(),
            self.since.is_some(),
            self.id.is_some(),
            self.latest.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(WireError::new(
                ErrorCode::InvalidField,
                "give at most one of after_seq, since, id and latest",
            ));
        }
        let check = |name: &str, v: u32| {
            if v == 0 || v > MAX_PAGE_LIMIT {
                Err(WireError::new(
                    ErrorCode::InvalidField,
                    format!("{name} must be from 1 to {MAX_PAGE_LIMIT}, got {v}"),
                ))
            } else {
                Ok(v)
            }
        };
        let limit = check("limit", self.limit.unwrap_or(DEFAULT_PAGE_LIMIT))?;
        let query = if let Some(s) = self.after_seq {
            HistoryQuery::AfterSeq(s)
        } else if let Some(t) = self.since {
            HistoryQuery::Since(t)
        } else if let Some(id) = self.id {
            HistoryQuery::ById(id)
        } else if let Some(n) = self.latest {
            HistoryQuery::Latest(check("latest", n)?)
        } else {
            HistoryQuery::AfterSeq(0)
        };
        Ok((query, limit))
    }
}

/// A SHA-256 digest (FIPS 180-4), the name of an attachment's content: on the wire, 64
/// lower-case hexadecimal characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// The digest of these 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Sha256Digest {
        Sha256Digest(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Text that is not 64 hexadecimal characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SHA-256 digest {0:?}: expected 64 lower-case hexadecimal characters")]
pub struct BadDigest(pub String);

impl std::str::FromStr for Sha256Digest {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<Self, BadDigest> {
        let bad = || BadDigest(s.chars().take(80).collect());
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| bad())?;
        Ok(Sha256Digest(bytes))
    }
}

impl TryFrom<String> for Sha256Digest {
    type Error = BadDigest;
    fn try_from(s: String) -> Result<Self, BadDigest> {
        s.parse()
    }
}

impl From<Sha256Digest> for String {
    fn from(d: Sha256Digest) -> String {
        d.to_string()
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

// ----- replies -----

/// A registry entry, as `list` and `lookup` return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEntry {
    /// The group's name.
    pub name: GroupName,
    /// Where members reach the group node.
    pub endpoint: Endpoint,
    /// Member count at the last heartbeat.
    pub members: u64,
    /// When this entry was first registered (since the registry started).
    pub registered_at: Timestamp,
    /// When the node last refreshed it.
    pub last_heartbeat: Timestamp,
    /// The node's CURVE public key; absent for an `--insecure` node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<crate::key::PublicKey>,
}

/// Reply to `register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReply {
    /// The entry as stored.
    pub group: GroupEntry,
    /// How often the registry expects a refresh, in milliseconds.
    pub heartbeat_ms: u64,
    /// How long an entry lives without a refresh, in milliseconds.
    pub ttl_ms: u64,
}

/// Reply to `unregister`, `list` (with groups) and any reply without fields of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// Reply to `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    /// Live groups, sorted by name.
    pub groups: Vec<GroupEntry>,
}

/// Reply to `lookup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupReply {
    /// The entry.
    pub group: GroupEntry,
}

/// Reply to `owner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerReply {
    /// The group name asked about.
    pub name: GroupName,
    /// The CURVE key the name is bound to (the key of the node that first registered it),
    /// or `None` when the name is free (never registered, released, lapsed, or the registry
    /// runs `--insecure` and binds no names).
    pub owner: Option<crate::key::PublicKey>,
}

/// Reply to `release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReply {
    /// The group name asked about.
    pub name: GroupName,
    /// Whether it was bound to a key (and is now free); `false`: it was bound to none.
    pub released: bool,
}

/// Reply to `info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoReply {
    /// The node's group.
    pub group: GroupName,
    /// The seq of the newest message, 0 if none was ever sent.
    pub last_seq: u64,
    /// How many members the group has.
    pub members: u64,
    /// The node's body size limit, in bytes of JSON text.
    pub max_message_bytes: u64,
    /// Open or private (default open when absent).
    #[serde(default)]
    pub mode: GroupMode,
}

/// Reply to `join` and `leave`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipReply {
    /// The node's group.
    pub group: GroupName,
    /// The caller.
    pub user: UserName,
    /// Whether membership changed (false for a repeated join or leave).
    pub changed: bool,
    /// The seq of the newest message at that moment.
    pub last_seq: u64,
}

/// One member in a `members` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member.
    pub user: UserName,
    /// When they joined.
    pub joined_at: Timestamp,
    /// Their CURVE public key; absent on an `--insecure` node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<crate::key::PublicKey>,
}

/// Reply to `members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersReply {
    /// The node's group.
    pub group: GroupName,
    /// Members sorted by name.
    pub members: Vec<Member>,
}

/// Reply to `send`: the ack, sent only after the message is committed to disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendAck {
    /// The message's seq in the group: 1, 2, 3, … without gaps.
    pub seq: u64,
    /// The message's id (the client's, if it chose one).
    pub id: MessageId,
    /// When the node stored it; strictly increasing with seq.
    pub time: Timestamp,
    /// True when this is a retry of an already stored message.
    #[serde(default)]
    pub duplicate: bool,
}

/// What a log entry records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntryKind {
    /// A chat message sent with `send`.
    #[default]
    Message,
    /// `sender` joined the group; the body is `null`.
    Join,
    /// `sender` left the group; the body is `null`.
    Leave,
    /// `sender` changed the group's policy; the body says how:
    /// `{"action": "invite"|"kick"|"ban"|"unban"|"promote"|"set_mode", "target": NAME-OR-KEY,
    /// "mode": "open"|"private"}` (`target` or `mode` as the action has).
    Policy,
}

impl EntryKind {
    /// The wire and storage name (`"join"`).
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Message => "message",
            EntryKind::Join => "join",
            EntryKind::Leave => "leave",
            EntryKind::Policy => "policy",
        }
    }

    /// The kind with this name, if any.
    pub fn from_name(name: &str) -> Option<EntryKind> {
        [
            EntryKind::Message,
            EntryKind::Join,
            EntryKind::Leave,
            EntryKind::Policy,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// An entry of a group log: a chat message, or a system event (join, leave).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    /// Position in the group log.
    pub seq: u64,
    /// Unique id.
    pub id: MessageId,
    /// When the node stored it.
    pub time: Timestamp,
    /// Who sent it (for events: who joined or left).
    pub sender: UserName,
    /// What the entry records (default `message` when absent).
    #[serde(default)]
    pub kind: EntryKind,
    /// The JSON body, as sent; `null` for events.
    pub body: Box<RawValue>,
    /// The sender's authenticated CURVE public key; absent from an `--insecure` node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_key: Option<crate::key::PublicKey>,
    /// The file the message carries, if any (its body is then the caption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
            && self.id == other.id
            && self.time == other.time
            && self.sender == other.sender
            && self.kind == other.kind
            && self.body.get() == other.body.get()
            && self.sender_key == other.sender_key
            && self.attachment == other.attachment
    }
}

/// Reply to `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeReply {
    /// The node's group.
    pub group: GroupName,
    /// The newest seq when the subscription was made or renewed: everything after it will be
    /// pushed; anything up to it that the client has not seen, it reads with `get_messages`.
    pub last_seq: u64,
    /// The subscription ends unless renewed within this many milliseconds.
    pub lease_ms: u64,
    /// The subscription's push budget, in bytes of event JSON: the node stops pushing to
    /// this connection while this many bytes are pushed and not acked
    /// ([`SubscribeRequest::acked_seq`]). A client SHOULD ack after receiving about half of
    /// it. 0 (absent, from an older node): the node has no budget; ack on renewal only.
    #[serde(default)]
    pub budget_bytes: u64,
}

/// Reply to `stop` (node) and `stop_registry`: the server drains and exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopReply {
    /// Always true: the server has begun to drain. It answers `shutting_down` to requests
    /// that arrive from now on, and exits 0 once drained.
    pub stopping: bool,
}

/// Reply to `unsubscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsubscribeReply {
    /// The node's group.
    pub group: GroupName,
    /// Whether this connection was subscribed.
    pub changed: bool,
}

/// A pushed event of the live stream: `{"event": "entry", "group": G, "entry": {…}}`, one
/// entry per push message. Sent to subscriptions made without `batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushEvent {
    /// Always `"entry"`; clients ignore events of names they do not know.
    pub event: String,
    /// The group.
    pub group: GroupName,
    /// The log entry, as `get_messages` returns it.
    pub entry: Message,
}

/// A batched push of the live stream, sent to subscriptions made with `batch`.
///
/// # Format
/// `{"event": "entries", "group": G, "entries": [ENTRY, …]}`: consecutive entries of one
/// commit, in seq order, each as `get_messages` returns it. A batch stops growing once its
/// JSON passes [`MAX_PUSH_BATCH_BYTES`] and holds at least one entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushBatch {
    /// Always `"entries"`.
    pub event: String,
    /// The group.
    pub group: GroupName,
    /// The log entries, in seq order.
    pub entries: Vec<Message>,
}

/// A push telling a connection that its subscription ended without its asking.
///
/// # Format
/// `{"event": "unsubscribed", "group": G, "reason": R}`, `R` one of `expired` (the lease ran
/// out), `evicted` (the node was full and gave the slot to a principal holding fewer, §6.7).
/// The client may subscribe again; nothing is lost, as the log keeps every entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsubscribedEvent {
    /// Always `"unsubscribed"`.
    pub event: String,
    /// The group.
    pub group: GroupName,
    /// `expired` or `evicted`; clients accept others.
    pub reason: String,
}

/// Reply to `get_messages`: one page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagesPage {
    /// The node's group.
    pub group: GroupName,
    /// Messages in seq order.
    pub messages: Vec<Message>,
    /// True when more messages match after the last one here: ask again with `after_seq` set
    /// to the last seq received.
    pub more: bool,
}

/// The most groups one `register_groups` request may carry (PROTOCOL §4.1.1): 128 names of
/// 64 characters stay well under the registry's 64 KiB request limit.
pub const MAX_REGISTER_GROUPS: usize = 128;

/// The most groups one `renew` request may carry (PROTOCOL §6.7.1).
pub const MAX_RENEW_GROUPS: usize = 256;

/// One group of a host, as `register_groups` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedGroup {
    /// The group's name.
    pub name: GroupName,
    /// Its current member count (default 0).
    #[serde(default)]
    pub members: u64,
}

/// `register_groups` (PROTOCOL §4.1.1): a group host registers (or refreshes) up to
/// [`MAX_REGISTER_GROUPS`] of its groups at once. Each entry follows `register`'s rules
/// (§4.1) on its own; the entries it registers are then held by the host
/// `(endpoint, public_key)` and stay live while the host sends `heartbeat_host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterGroupsRequest {
    /// Where members reach the host.
    pub endpoint: Endpoint,
    /// The host's CURVE public key; absent for an `--insecure` host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<crate::key::PublicKey>,
    /// The groups, 1 to [`MAX_REGISTER_GROUPS`] (else `invalid_field` naming `groups`).
    pub groups: Vec<HostedGroup>,
}

/// Reply to `register_groups`: which names are now registered, and each refused one with
/// its own error (`name_taken`, `too_many_names`, `limit_reached`, `invalid_field`), naming
/// it in [`WireError::group`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterGroupsReply {
    /// The names registered or refreshed, in request order.
    pub registered: Vec<GroupName>,
    /// The names refused, each error naming its group.
    #[serde(default)]
    pub refused: Vec<WireError>,
    /// How often the registry expects `heartbeat_host`, in milliseconds.
    pub heartbeat_ms: u64,
    /// How long the host's entries live without a heartbeat, in milliseconds.
    pub ttl_ms: u64,
}

/// `heartbeat_host` (PROTOCOL §4.1.1): one refresh for every group a host registered with
/// `register_groups`, whatever their number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatHostRequest {
    /// Where members reach the host.
    pub endpoint: Endpoint,
    /// The host's CURVE public key; absent for an `--insecure` host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<crate::key::PublicKey>,
    /// How many groups the host believes the registry holds for it.
    pub groups: u64,
}

/// Reply to `heartbeat_host`. When `known` differs from the request's `groups` (the registry
/// restarted, or entries expired), the host registers its groups again with
/// `register_groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatHostReply {
    /// How many live entries the registry holds for this host.
    pub known: u64,
    /// How often the registry expects `heartbeat_host`, in milliseconds.
    pub heartbeat_ms: u64,
    /// How long the host's entries live without a heartbeat, in milliseconds.
    pub ttl_ms: u64,
}

/// `create` (PROTOCOL §6.11): make a new group on a group host; the caller becomes its owner
/// and first member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// The new group's name (§3.3's name rules; else `invalid_field`).
    pub group: GroupName,
    /// The caller, who becomes the owner.
    pub user: UserName,
    /// Open (default) or private.
    #[serde(default)]
    pub mode: GroupMode,
}

/// Reply to `create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateReply {
    /// The new group.
    pub group: GroupName,
    /// Its mode.
    pub mode: GroupMode,
    /// Its owner: the caller's key.
    pub owner: crate::key::PublicKey,
    /// The seq of the newest entry: the owner's join.
    pub last_seq: u64,
}

/// Reply to `delete` (PROTOCOL §6.11): the group is archived and its name is free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteReply {
    /// The deleted group.
    pub group: GroupName,
    /// Always true.
    pub deleted: bool,
}

/// One group's renewal in a `renew` request: as a `subscribe` of that group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewEntry {
    /// The group.
    pub group: GroupName,
    /// As [`SubscribeRequest::acked_seq`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_seq: Option<u64>,
}

/// `renew` (PROTOCOL §6.7.1): `subscribe` for up to [`MAX_RENEW_GROUPS`] groups of one host
/// in one request, each entry with `subscribe`'s meaning; the live stream is batched
/// (`entries` events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// The caller.
    pub user: UserName,
    /// The groups, 1 to [`MAX_RENEW_GROUPS`] (else `invalid_field` naming `groups`).
    pub groups: Vec<RenewEntry>,
}

/// Reply to `renew`: one [`SubscribeReply`] per group renewed, and each refused group's
/// error naming it in [`WireError::group`] (`not_member`, `unknown_group`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewReply {
    /// The subscriptions made or renewed, in request order.
    pub groups: Vec<SubscribeReply>,
    /// The groups refused.
    #[serde(default)]
    pub refused: Vec<WireError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_allow_inner_spaces_only() {
        assert!(GroupName::new("Cool Group").is_ok());
        assert!(GroupName::new("日本語 ok").is_ok());
        assert_eq!(GroupName::new("  "), Err(NameError::Empty("group name")));
        assert!(matches!(
            GroupName::new(" lead"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            GroupName::new("a\nb"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            GroupName::new("x".repeat(65)),
            Err(NameError::TooLong { max: 64, .. })
        ));
    }

    #[test]
    fn user_names_are_restricted_ascii() {
        assert!(UserName::new("alice_1.b-c").is_ok());
        assert!(matches!(
            UserName::new("al ice"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            UserName::new("x".repeat(33)),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn endpoints_need_tcp_host_and_real_port() {
        assert!(Endpoint::new("tcp://127.0.0.1:5555").is_ok());
        assert!(Endpoint::new("tcp://[::1]:5555").is_ok());
        assert!(Endpoint::new("tcp://node-1.example:80").is_ok());
        for bad in [
            "127.0.0.1:5555",
            "tcp://127.0.0.1:0",
            "tcp://127.0.0.1:*",
            "tcp://*:5555",
            "tcp://:5555",
            "ipc:///tmp/x",
            "tcp://a b:1",
        ] {
            assert!(Endpoint::new(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Endpoint::from_host_port("10.0.0.1:5560")
                .expect("valid")
                .as_str(),
            "tcp://10.0.0.1:5560"
        );
    }

    /// Issue 23: `127.0.0.1:99999` was wrapped to a random port; each way an endpoint can
    /// be wrong has its own words.
    #[test]
    fn endpoint_errors_say_what_is_wrong() {
        let problem = |s: &str| match Endpoint::from_host_port(s) {
            Err(NameError::Endpoint { value, problem }) => {
                assert_eq!(value, s);
                problem
            }
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(problem("127.0.0.1:99999"), EndpointProblem::Port);
        assert_eq!(problem("tcp://127.0.0.1:0"), EndpointProblem::Port);
        assert_eq!(problem("127.0.0.1:x"), EndpointProblem::Port);
        assert_eq!(problem("127.0.0.1"), EndpointProblem::NoPort);
        assert_eq!(problem("[::1]"), EndpointProblem::NoPort);
        assert_eq!(
            problem("udp://127.0.0.1:5"),
            EndpointProblem::Scheme("udp://".into())
        );
        assert_eq!(
            problem("0.0.0.0:5555"),
            EndpointProblem::Wildcard("0.0.0.0".into())
        );
        assert_eq!(problem("a b:1"), EndpointProblem::Host("a b".into()));
        assert_eq!(
            Endpoint::from_host_port("127.0.0.1:99999")
                .expect_err("bad port")
                .to_string(),
            "endpoint \"127.0.0.1:99999\": port must be 1-65535"
        );
        assert!(matches!(
            Endpoint::new("127.0.0.1:5555"),
            Err(NameError::Endpoint {
                problem: EndpointProblem::NoScheme,
                ..
            })
        ));
    }

    #[test]
    fn bind_endpoints_take_wildcards_and_port_0_but_no_port_past_65535() {
        assert_eq!(
            bind_endpoint("127.0.0.1:0").as_deref(),
            Ok("tcp://127.0.0.1:0")
        );
        assert_eq!(bind_endpoint("tcp://*:*").as_deref(), Ok("tcp://*:*"));
        assert_eq!(
            bind_endpoint("0.0.0.0:5555").as_deref(),
            Ok("tcp://0.0.0.0:5555")
        );
        assert_eq!(bind_endpoint("[::]:1").as_deref(), Ok("tcp://[::]:1"));
        assert_eq!(
            bind_endpoint("127.0.0.1:99999"),
            Err(EndpointProblem::BindPort)
        );
        assert_eq!(
            bind_endpoint("127.0.0.1:-1"),
            Err(EndpointProblem::BindPort)
        );
        assert_eq!(bind_endpoint("127.0.0.1"), Err(EndpointProblem::NoPort));
        assert_eq!(
            bind_endpoint("ipc:///tmp/x"),
            Err(EndpointProblem::Scheme("ipc://".into()))
        );
        assert_eq!(
            bind_endpoint("tcp://:5"),
            Err(EndpointProblem::Host(String::new()))
        );
    }

    #[test]
    fn endpoint_lists_take_ip_port_and_name_the_bad_one() {
        assert_eq!(
            endpoint_list("127.0.0.1:5555, tcp://127.0.0.1:5557").as_deref(),
            Ok("tcp://127.0.0.1:5555,tcp://127.0.0.1:5557")
        );
        assert!(matches!(
            endpoint_list("127.0.0.1:5555,127.0.0.1:70000"),
            Err(NameError::Endpoint { value, problem: EndpointProblem::Port }) if value == "127.0.0.1:70000"
        ));
        assert!(matches!(endpoint_list(" , "), Err(NameError::Empty(_))));
    }

    /// Issue 23: `send G ""` and `"   "` were stored, and peers saw `bob:` with nothing.
    #[test]
    fn blank_text_bodies_are_refused_unless_they_caption_a_file() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).expect("json");
        for blank in [
            r#""""#,
            r#""   ""#,
            r#""\n\t ""#,
            r#""\u00a0""#,
            r#" "\u2003" "#,
        ] {
            assert!(is_blank_text(&raw(blank)), "{blank}");
        }
        for fine in [
            r#""hi""#,
            r#"" . ""#,
            "null",
            "0",
            "{}",
            "[]",
            r#"{"text": ""}"#,
            "false",
        ] {
            assert!(!is_blank_text(&raw(fine)), "{fine}");
        }
        let mut send: SendRequest =
            serde_json::from_str(r#"{"user": "bob", "body": "  "}"#).expect("send");
        assert_eq!(
            send.check_body(),
            Err("body: the text is empty or only white space; there is nothing to send".into())
        );
        send.attachment = Some(Attachment {
            sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                .parse()
                .expect("digest"),
            size: 0,
            name: "a.txt".into(),
            media_type: "text/plain".into(),
        });
        assert_eq!(send.check_body(), Ok(()));
    }

    #[test]
    fn every_error_code_is_listed_once_in_all() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), Some(i), "{code:?}");
        }
        assert_eq!(ErrorCode::Unknown.index(), None);
    }

    #[test]
    fn digests_are_64_lower_case_hex_characters() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Sha256Digest = hex.parse().expect("the digest of nothing");
        assert_eq!(d.to_string(), hex);
        assert_eq!(
            serde_json::to_string(&d).expect("json"),
            format!("\"{hex}\"")
        );
        for bad in [
            "",
            "abc",
            &hex.to_uppercase(),
            &format!("{hex}00"),
            &hex.replace('e', "g"),
        ] {
            assert!(bad.parse::<Sha256Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcard_addresses_are_not_endpoints() {
        for wildcard in [
            "tcp://0.0.0.0:5555",
            "tcp://[::]:1",
            "tcp://*:1",
            "tcp://[0::0]:2",
        ] {
            assert!(Endpoint::new(wildcard).is_err(), "{wildcard}");
        }
        for fine in ["tcp://10.0.0.5:5560", "tcp://[::1]:1", "tcp://node-1.lan:7"] {
            assert!(Endpoint::new(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn only_loopback_endpoints_count_as_loopback() {
        for yes in [
            "tcp://127.0.0.1:5555",
            "tcp://127.8.9.1:0",
            "tcp://[::1]:1",
            "tcp://localhost:5",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "tcp://0.0.0.0:5555",
            "tcp://10.0.0.1:1",
            "tcp://*:1",
            "tcp://[::]:1",
            "tcp://example.com:1",
            "junk",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn history_query_rejects_two_selectors_and_bad_limits() {
        let user = UserName::new("a").expect("valid");
        let mut r = GetMessagesRequest {
            group: None,
            user,
            after_seq: Some(1),
            since: None,
            id: None,
            latest: Some(3),
            limit: None,
        };
        assert_eq!(r.query().map_err(|e| e.code), Err(ErrorCode::InvalidField));
        r.after_seq = None;
        assert_eq!(r.query(), Ok((HistoryQuery::Latest(3), DEFAULT_PAGE_LIMIT)));
        r.limit = Some(0);
        assert_eq!(r.query().map_err(|e| e.code), Err(ErrorCode::InvalidField));
    }

    #[test]
    fn unknown_error_codes_decode_as_unknown() {
        let e: WireError =
            serde_json::from_str(r#"{"error":"brand_new","message":"x"}"#).expect("decode");
        assert_eq!(e.code, ErrorCode::Unknown);
    }
}
