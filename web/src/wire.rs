//! The gateway's WebSocket protocol (docs/WEB.md): one JSON object per text message each
//! way. A request names its operation in `op`; its reply carries the same `op` and `ok`.

use agora_proto::id::MessageId;
use agora_proto::wire::{GroupName, UserName};
use serde::{Deserialize, Serialize};

/// A request from the page.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Who the session acts as: `user` and `key`.
    Whoami,
    /// The registry's group list.
    Groups,
    /// Every account, with its presence.
    Users,
    /// Become a member of a group (a private group needs an invitation).
    Join {
        /// The group.
        group: GroupName,
    },
    /// Stop being a member of a group.
    Leave {
        /// The group.
        group: GroupName,
    },
    /// A page of a group's history, at most `limit` entries (default 100, 1 to 1000): after
    /// `after_seq`; or else the page just before `before_seq` (scroll-back); or else the
    /// newest.
    History {
        /// The group.
        group: GroupName,
        /// Entries after this seq.
        #[serde(default)]
        after_seq: Option<u64>,
        /// The page that ends just before this seq.
        #[serde(default)]
        before_seq: Option<u64>,
        /// How many at most.
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Follow a group live: its entries after `after_seq` (default: from now on) arrive as
    /// `entry` events, in seq order, exactly once, with catch-up from the log after gaps.
    Follow {
        /// The group.
        group: GroupName,
        /// Deliver entries after this seq (the page's last seen, to catch up after a
        /// dropped connection).
        #[serde(default)]
        after_seq: Option<u64>,
    },
    /// Stop following a group live.
    Unfollow {
        /// The group.
        group: GroupName,
    },
    /// A text message to a group; answered once it is stored, with its seq.
    Send {
        /// The group.
        group: GroupName,
        /// The text, stored as a JSON string body.
        text: String,
        /// A client-chosen id, so that a retry is stored once.
        #[serde(default)]
        id: Option<MessageId>,
    },
    /// Go online: presence and direct messages pushed as `dm` events from now on; the reply
    /// holds the mailbox as it stands (unread messages).
    Inbox,
    /// A direct message; answered once it is in the recipient's mailbox.
    Dm {
        /// The recipient.
        to: UserName,
        /// The text, stored as a JSON string body.
        text: String,
        /// A client-chosen id, so that a retry is stored once.
        #[serde(default)]
        id: Option<MessageId>,
    },
    /// The page showed the direct messages numbered up to `up_to`: they leave the mailbox.
    DmRead {
        /// The last number shown.
        up_to: u64,
    },
    /// Refuse direct messages from a user from now on (PROTOCOL §4.6.2).
    Block {
        /// The user.
        name: UserName,
    },
    /// Accept direct messages from a blocked user again.
    Unblock {
        /// The user.
        name: UserName,
    },
    /// The users this account blocks.
    Blocked,
}

impl Request {
    /// The operation's name, as in `op`.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Whoami => "whoami",
            Request::Groups => "groups",
            Request::Users => "users",
            Request::Join { .. } => "join",
            Request::Leave { .. } => "leave",
            Request::History { .. } => "history",
            Request::Follow { .. } => "follow",
            Request::Unfollow { .. } => "unfollow",
            Request::Send { .. } => "send",
            Request::Inbox => "inbox",
            Request::Dm { .. } => "dm",
            Request::DmRead { .. } => "dm_read",
            Request::Block { .. } => "block",
            Request::Unblock { .. } => "unblock",
            Request::Blocked => "blocked",
        }
    }
}

/// A reply: `{"ok": true, "op": OP, …fields}` or `{"ok": false, "op": OP|null, "error":
/// CODE, "message": TEXT}`. Codes are the protocol's (PROTOCOL §7), plus `invalid_json` for
/// a message that is not a request and `timeout` when the federation did not answer.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Reply(pub serde_json::Value);

impl Reply {
    /// A success of `op` with `fields` (an object) merged in.
    pub fn ok(op: &str, fields: serde_json::Value) -> Reply {
        let mut out = serde_json::json!({"ok": true, "op": op});
        if let (Some(out), serde_json::Value::Object(fields)) = (out.as_object_mut(), fields) {
            out.extend(fields);
        }
        Reply(out)
    }

    /// A failure of `op` (`None`: the message was not a request).
    pub fn error(op: Option<&str>, code: &str, message: &str) -> Reply {
        Reply(serde_json::json!({"ok": false, "op": op, "error": code, "message": message}))
    }
}
