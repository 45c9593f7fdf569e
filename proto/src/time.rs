//! Time on the wire and in the store.
//!
//! A [`Timestamp`] is a count of microseconds since the Unix epoch, in UTC. On the wire it is
//! an RFC 3339 string with exactly six fractional digits and the `Z` suffix, for example
//! `2026-11-22T03:58:28.123456Z`. [`parse_since`] turns what a user types (RFC 3339, or
//! `HH:MM:SS` meaning today in local time, as seed 001's `get_messages IP:PORT HH:MM:SS`)
//! into a timestamp.

use std::fmt;

use chrono::{DateTime, Local, LocalResult, NaiveTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A UTC instant with microsecond precision.
///
/// # Format
/// On the wire: RFC 3339 with six fractional digits and `Z`, as produced by `Display`.
/// Parsing accepts any RFC 3339 offset and precision; sub-microsecond digits are truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

/// Why a time string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimeError {
    /// Neither RFC 3339 nor `HH:MM:SS` (what a user may type, [`parse_since`]).
    #[error("invalid time {0:?}: expected RFC 3339 (2026-11-22T10:00:00Z) or HH:MM:SS")]
    Invalid(String),
    /// Not RFC 3339, the only form on the wire ([`Timestamp::parse_rfc3339`]).
    #[error("invalid time {0:?}: expected RFC 3339, such as 2026-11-22T10:00:00Z")]
    NotRfc3339(String),
    /// `HH:MM:SS` names a local time that does not exist today (a DST gap).
    #[error("local time {0:?} does not exist today")]
    NonexistentLocal(String),
    /// Outside the range a timestamp can hold (about ±292,000 years).
    #[error("time {0:?} is out of range")]
    OutOfRange(String),
}

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        Timestamp(Utc::now().timestamp_micros())
    }

    /// A timestamp from microseconds since the Unix epoch.
    pub const fn from_micros(micros: i64) -> Timestamp {
        Timestamp(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// The next representable instant, one microsecond later (saturating).
    pub fn next(self) -> Timestamp {
        Timestamp(self.0.saturating_add(1))
    }

    /// This instant minus `d` (saturating at the representable minimum).
    pub fn saturating_sub(self, d: std::time::Duration) -> Timestamp {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_sub(micros))
    }

    /// Parses an RFC 3339 string with any offset.
    ///
    /// # Errors
    /// [`TimeError::NotRfc3339`] if it is not RFC 3339, [`TimeError::OutOfRange`] if it does not
    /// fit in microseconds since the epoch.
    pub fn parse_rfc3339(s: &str) -> Result<Timestamp, TimeError> {
        // The common case on the wire, UTC with `Z` after 1970, through humantime's parser
        // (about a third of chrono's time per call; a page carries 1000 of these); any other
        // offset, or an error, through chrono's.
        if let Some(micros) = humantime::parse_rfc3339(s)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_micros()).ok())
        {
            return Ok(Timestamp(micros));
        }
        let dt =
            DateTime::parse_from_rfc3339(s).map_err(|_| TimeError::NotRfc3339(s.to_owned()))?;
        Ok(Timestamp(dt.timestamp_micros()))
    }

    /// This instant as a chrono UTC date-time.
    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.0).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with microseconds: `2026-11-22T07:00:00.123456Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // humantime writes the same format without an intermediate String, for 1970 through
        // 9999; chrono covers the rest.
        const YEAR_10000_MICROS: i64 = 253_402_300_800_000_000;
        if (0..YEAR_10000_MICROS).contains(&self.0) {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(self.0.unsigned_abs());
            return write!(f, "{}", humantime::format_rfc3339_micros(t));
        }
        f.write_str(
            &self
                .to_datetime()
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// Parses a user's `since` argument against the given local "now".
///
/// Accepts RFC 3339 (`2026-11-22T10:00:00Z`, `2026-11-22T10:00:00+01:00`) or `HH:MM:SS`,
/// which means that wall-clock time today in `now`'s time zone. When a DST change makes a
/// local time ambiguous, the earlier instant is used.
///
/// # Errors
/// [`TimeError::Invalid`] for any other shape, [`TimeError::NonexistentLocal`] for a local
/// time skipped by a DST change.
pub fn parse_since<Tz: TimeZone>(input: &str, now: &DateTime<Tz>) -> Result<Timestamp, TimeError> {
    let input = input.trim();
    if let Ok(t) = Timestamp::parse_rfc3339(input) {
        return Ok(t);
    }
    let time = NaiveTime::parse_from_str(input, "%H:%M:%S")
        .map_err(|_| TimeError::Invalid(input.to_owned()))?;
    let naive = now.date_naive().and_time(time);
    match now.timezone().from_local_datetime(&naive) {
        LocalResult::Single(dt) | LocalResult::Ambiguous(dt, _) => {
            Ok(Timestamp(dt.timestamp_micros()))
        }
        LocalResult::None => Err(TimeError::NonexistentLocal(input.to_owned())),
    }
}

/// [`parse_since`] against the machine's local time zone and clock.
///
/// # Errors
/// As [`parse_since`].
pub fn parse_since_local(input: &str) -> Result<Timestamp, TimeError> {
    parse_since(input, &Local::now())
}

/// Hands out strictly increasing timestamps even when the wall clock steps back.
///
/// Each call returns `max(now, last + 1 µs)`: a group's log stays in time order, and
/// "since T" queries stay a prefix cut of the seq order.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    last: Timestamp,
}

impl MonotonicClock {
    /// A clock whose next reading is after `last` (the newest stored time).
    pub fn after(last: Timestamp) -> MonotonicClock {
        MonotonicClock { last }
    }

    /// The next timestamp given the wall-clock reading `wall`.
    pub fn tick(&mut self, wall: Timestamp) -> Timestamp {
        let t = if wall > self.last {
            wall
        } else {
            self.last.next()
        };
        self.last = t;
        t
    }

    /// The last timestamp handed out.
    pub fn last(&self) -> Timestamp {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;
    use proptest::prelude::*;

    proptest! {
        /// The fast paths (humantime) print and read exactly what chrono does.
        #[test]
        fn fast_paths_agree_with_chrono(micros in -62_135_596_800_000_000i64..253_402_300_799_999_999) {
            let t = Timestamp::from_micros(micros);
            let chrono_text = t.to_datetime().to_rfc3339_opts(SecondsFormat::Micros, true);
            prop_assert_eq!(t.to_string(), chrono_text.clone());
            prop_assert_eq!(Timestamp::parse_rfc3339(&chrono_text), Ok(t));
            let offset = t.to_datetime().with_timezone(&FixedOffset::east_opt(7200).expect("offset"));
            prop_assert_eq!(Timestamp::parse_rfc3339(&offset.to_rfc3339()), Ok(t));
        }
    }

    #[test]
    fn display_has_six_fraction_digits_and_z() {
        let t = Timestamp::from_micros(1_700_000_000_000_001);
        assert_eq!(t.to_string(), "2023-11-14T22:13:20.000001Z");
        assert_eq!(Timestamp::parse_rfc3339(&t.to_string()), Ok(t));
    }

    #[test]
    fn rfc3339_with_offset_is_normalised_to_utc() {
        let t = Timestamp::parse_rfc3339("2026-11-22T10:00:00+01:00").expect("valid");
        assert_eq!(t.to_string(), "2026-11-22T09:00:00.000000Z");
    }

    #[test]
    fn since_hh_mm_ss_is_today_in_the_given_zone() {
        let zone = FixedOffset::east_opt(2 * 3600).expect("offset");
        let now = zone
            .with_ymd_and_hms(2026, 11, 22, 18, 30, 0)
            .single()
            .expect("time");
        let t = parse_since("09:15:30", &now).expect("valid");
        assert_eq!(t.to_string(), "2026-11-22T07:15:30.000000Z");
    }

    #[test]
    fn since_accepts_rfc3339() {
        let now = Utc::now();
        let t = parse_since("2026-01-02T03:04:05.5Z", &now).expect("valid");
        assert_eq!(t.to_string(), "2026-01-02T03:04:05.500000Z");
    }

    #[test]
    fn since_rejects_garbage_with_the_input_named() {
        let now = Utc::now();
        for bad in ["", "25:00:00", "12:00", "yesterday", "12:00:00:00"] {
            assert_eq!(
                parse_since(bad, &now),
                Err(TimeError::Invalid(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn monotonic_clock_survives_a_step_back() {
        let mut c = MonotonicClock::after(Timestamp::from_micros(100));
        assert_eq!(c.tick(Timestamp::from_micros(200)).as_micros(), 200);
        assert_eq!(c.tick(Timestamp::from_micros(50)).as_micros(), 201);
        assert_eq!(c.tick(Timestamp::from_micros(201)).as_micros(), 202);
        assert_eq!(c.tick(Timestamp::from_micros(1000)).as_micros(), 1000);
    }
}
