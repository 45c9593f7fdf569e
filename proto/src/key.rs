//! CURVE public keys (RFC 26/CurveZMQ) as they travel: 32 bytes, written as 40 Z85
//! characters (RFC 32/Z85, through the `z85` crate).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Text that is not a CURVE key: not 40 characters of canonical Z85.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CURVE key {0:?}: expected 40 Z85 characters")]
pub struct BadKey(pub String);

/// A CURVE public key: 32 bytes, written as 40 Z85 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The 32 key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }
}

/// The 32 bytes of a key written as 40 Z85 characters (public or secret).
///
/// # Errors
/// [`BadKey`] unless `s` is exactly the Z85 encoding of 32 bytes: not
/// `zmq::z85_decode`, which leaks its input on every call and accepts characters outside
/// the alphabet; a key is valid only if encoding its bytes gives the text back (no padding
/// extension, no overflowing groups).
pub fn decode_z85_key(s: &str) -> Result<[u8; 32], BadKey> {
    if s.len() != 40 {
        return Err(BadKey(s.chars().take(48).collect()));
    }
    z85::decode(s)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .filter(|bytes| encode_z85_key(bytes) == s)
        .ok_or_else(|| BadKey(s.to_owned()))
}

/// 32 key bytes as 40 Z85 characters (32 is a multiple of 4: plain Z85, no padding).
pub fn encode_z85_key(bytes: &[u8; 32]) -> String {
    z85::encode(bytes)
}

impl FromStr for PublicKey {
    type Err = BadKey;

    /// Parses 40 Z85 characters.
    fn from_str(s: &str) -> Result<Self, BadKey> {
        decode_z85_key(s).map(PublicKey)
    }
}

impl TryFrom<String> for PublicKey {
    type Error = BadKey;
    fn try_from(s: String) -> Result<Self, BadKey> {
        s.parse()
    }
}

impl From<PublicKey> for String {
    fn from(k: PublicKey) -> String {
        k.to_string()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_z85_key(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_keys_are_named() {
        assert!("short".parse::<PublicKey>().is_err());
        assert!("~".repeat(40).parse::<PublicKey>().is_err());
        let key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";
        assert_eq!(
            key.parse::<PublicKey>().map(|k| k.to_string()).as_deref(),
            Ok(key)
        );
    }
}
