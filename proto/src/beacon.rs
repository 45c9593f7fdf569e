//! The registry's LAN beacon (PROTOCOL §10): one UDP datagram a second that says where a
//! registry is and what its CURVE key is, in the zguide's and CZMQ's `zbeacon` pattern.
//!
//! # Format
//! One UDP datagram of at most [`MAX_BEACON_BYTES`] bytes, a UTF-8 JSON object:
//! `{"protocol": "AGORA", "version": 1, "name": "lab", "endpoint": "tcp://10.0.0.5:5555",
//! "key": "Z85…" | null}`. A receiver ignores anything else: other protocols, other major
//! versions, larger datagrams, bad JSON. When `endpoint`'s host is unspecified (`0.0.0.0`,
//! `*`, `::`), the receiver puts in the address the datagram came from.

use serde::{Deserialize, Serialize};

use crate::key::PublicKey;

/// The protocol tag every beacon carries.
pub const BEACON_PROTOCOL: &str = "AGORA";

/// The beacon format's version; a receiver ignores beacons of any other.
pub const BEACON_VERSION: u32 = 1;

/// The UDP port beacons go to unless told otherwise: 5670, the zbeacon convention.
pub const BEACON_PORT: u16 = 5670;

/// The largest beacon a receiver reads: 512 bytes.
pub const MAX_BEACON_BYTES: usize = 512;

/// What a registry announces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Beacon {
    /// Always [`BEACON_PROTOCOL`].
    pub protocol: String,
    /// Always [`BEACON_VERSION`].
    pub version: u32,
    /// The registry's name (its `--name`), by which clients pick among several (1 to 64
    /// bytes).
    pub name: String,
    /// The registry's request endpoint, `tcp://HOST:PORT`.
    pub endpoint: String,
    /// The registry's CURVE public key (`None` on an `--insecure` registry).
    pub key: Option<PublicKey>,
}

/// Why a datagram is not a beacon.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BeaconError {
    /// Over [`MAX_BEACON_BYTES`].
    #[error("a datagram of {0} bytes; a beacon has at most {MAX_BEACON_BYTES}")]
    TooLarge(usize),
    /// Not JSON of the beacon's shape.
    #[error("not a beacon: {0}")]
    Malformed(String),
    /// Another protocol, or another version of this one.
    #[error("a beacon of {protocol}/{version}, not {BEACON_PROTOCOL}/{BEACON_VERSION}")]
    Foreign {
        /// The tag it carried.
        protocol: String,
        /// The version it carried.
        version: u32,
    },
    /// A name of 0 or more than 64 bytes, or an endpoint that is not `tcp://HOST:PORT`.
    #[error("a beacon with a bad {0}")]
    BadField(&'static str),
}

impl Beacon {
    /// A beacon of this version for the registry `name` at `endpoint`.
    pub fn new(
        name: impl Into<String>,
        endpoint: impl Into<String>,
        key: Option<PublicKey>,
    ) -> Self {
        Beacon {
            protocol: BEACON_PROTOCOL.to_owned(),
            version: BEACON_VERSION,
            name: name.into(),
            endpoint: endpoint.into(),
            key,
        }
    }

    /// The datagram's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a datagram; `from` is where it came from, put into an unspecified endpoint
    /// host.
    ///
    /// # Errors
    /// [`BeaconError`]: too large, malformed, foreign, or with a bad field.
    pub fn decode(datagram: &[u8], from: std::net::IpAddr) -> Result<Beacon, BeaconError> {
        if datagram.len() > MAX_BEACON_BYTES {
            return Err(BeaconError::TooLarge(datagram.len()));
        }
        let mut beacon: Beacon =
            serde_json::from_slice(datagram).map_err(|e| BeaconError::Malformed(e.to_string()))?;
        if beacon.protocol != BEACON_PROTOCOL || beacon.version != BEACON_VERSION {
            return Err(BeaconError::Foreign {
                protocol: beacon.protocol,
                version: beacon.version,
            });
        }
        if beacon.name.is_empty()
            || beacon.name.len() > 64
            || beacon.name.chars().any(char::is_control)
        {
            return Err(BeaconError::BadField("name"));
        }
        let (host, port) = beacon
            .endpoint
            .strip_prefix("tcp://")
            .and_then(|rest| rest.rsplit_once(':'))
            .ok_or(BeaconError::BadField("endpoint"))?;
        if port.parse::<u16>().is_err() || host.is_empty() {
            return Err(BeaconError::BadField("endpoint"));
        }
        if matches!(host, "0.0.0.0" | "*" | "[::]" | "::") {
            beacon.endpoint = match from {
                std::net::IpAddr::V4(ip) => format!("tcp://{ip}:{port}"),
                std::net::IpAddr::V6(ip) => format!("tcp://[{ip}]:{port}"),
            };
        }
        Ok(beacon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    const FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));

    #[test]
    fn a_beacon_round_trips_and_an_unspecified_host_becomes_the_sender() {
        let b = Beacon::new("lab", "tcp://127.0.0.1:5555", None);
        assert_eq!(Beacon::decode(&b.encode(), FROM), Ok(b));
        let any = Beacon::new("lab", "tcp://0.0.0.0:5555", None);
        assert_eq!(
            Beacon::decode(&any.encode(), FROM).map(|b| b.endpoint),
            Ok("tcp://10.0.0.5:5555".to_owned())
        );
    }

    #[test]
    fn anything_else_is_refused_with_its_reason() {
        assert!(matches!(
            Beacon::decode(&[b' '; MAX_BEACON_BYTES + 1], FROM),
            Err(BeaconError::TooLarge(_))
        ));
        assert!(matches!(
            Beacon::decode(b"ZRE\x01garbage", FROM),
            Err(BeaconError::Malformed(_))
        ));
        let mut other = Beacon::new("lab", "tcp://127.0.0.1:5555", None);
        other.version = 2;
        assert!(matches!(
            Beacon::decode(&other.encode(), FROM),
            Err(BeaconError::Foreign { version: 2, .. })
        ));
        for (name, endpoint, field) in [
            ("", "tcp://127.0.0.1:5555", "name"),
            ("lab", "ipc:///tmp/x", "endpoint"),
            ("lab", "tcp://127.0.0.1:http", "endpoint"),
        ] {
            assert_eq!(
                Beacon::decode(&Beacon::new(name, endpoint, None).encode(), FROM),
                Err(BeaconError::BadField(field))
            );
        }
    }
}
