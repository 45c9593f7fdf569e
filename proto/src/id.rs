//! Message ids.
//!
//! Every message in a group log has a [`MessageId`], a UUID (RFC 9562). The node makes a
//! version 7 UUID (time-ordered) unless the client chose one; a client that chooses its own id
//! makes a retried `send` idempotent.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A message id: a UUID, written on the wire in the hyphenated lower-case form
/// (`0193a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A new time-ordered id (UUID v7).
    pub fn new_v7() -> MessageId {
        MessageId(Uuid::now_v7())
    }

    /// The 16 bytes of the UUID, as stored.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// An id from its 16 stored bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> MessageId {
        MessageId(Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;

    /// Parses any UUID form the `uuid` crate accepts (hyphenated, simple, braced, URN).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(MessageId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_ids_are_distinct_and_round_trip() {
        let a = MessageId::new_v7();
        let b = MessageId::new_v7();
        assert_ne!(a, b);
        assert_eq!(a.to_string().parse::<MessageId>().expect("parse"), a);
        assert_eq!(MessageId::from_bytes(*a.as_bytes()), a);
    }
}
