//! Signing in, and the sessions it opens.
//!
//! A session is a random id in the cookie `agora_session` (`HttpOnly; SameSite=Strict;
//! Path=/`, plus `Secure` over TLS) mapped to the [`Identity`] it acts as. Ids and tokens
//! are 32 random bytes from the OS (`getrandom`), hex-encoded.
//!
//! - Personal mode: a one-time token in the printed URL is exchanged for a session
//!   ([`Sessions::redeem`]); every session acts as the one configured user.
//! - Hosted mode: a name and password checked by [`crate::accounts`]; the session acts as
//!   that account. Attempts are rate-limited per client address and per account name
//!   ([`SignInLimiter`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use axum::http::{header, HeaderMap};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::bridge::Identity;

/// The cookie's name.
pub const COOKIE: &str = "agora_session";

/// Most live sessions (sign-ins past it are refused, none is evicted): 10,000.
pub const MAX_SESSIONS: usize = 10_000;

/// 32 random bytes, hex.
///
/// # Errors
/// The OS has no randomness to give.
pub fn random_hex() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The `Set-Cookie` value for `session`; `secure` adds `Secure` (served over TLS).
pub fn cookie(session: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/{secure}")
}

/// The `Set-Cookie` value that ends the session in the browser.
pub fn cleared_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// The session id a request's cookie carries, if any.
pub fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The live sessions, and personal mode's token not yet spent.
#[derive(Debug)]
pub struct Sessions {
    token: Mutex<Option<(String, Arc<Identity>)>>,
    live: Mutex<HashMap<String, Arc<Identity>>>,
}

impl Sessions {
    /// No session and no token (hosted mode).
    pub fn new() -> Sessions {
        Sessions {
            token: Mutex::new(None),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Personal mode: a fresh one-time token whose session acts as `identity`.
    ///
    /// # Errors
    /// The OS has no randomness to give.
    pub fn with_token(identity: Identity) -> Result<Sessions, getrandom::Error> {
        let sessions = Sessions::new();
        if let Ok(mut token) = sessions.token.lock() {
            *token = Some((random_hex()?, Arc::new(identity)));
        }
        Ok(sessions)
    }

    /// The token, until it is spent (for the URL printed at start).
    pub fn token(&self) -> Option<String> {
        self.token
            .lock()
            .ok()
            .and_then(|t| t.as_ref().map(|(token, _)| token.clone()))
    }

    /// Spends `token` for a new session id; `None` for a wrong or spent token (or when the
    /// sessions are full).
    pub fn redeem(&self, token: &str) -> Option<String> {
        let mut held = self.token.lock().ok()?;
        let identity = match held.as_ref() {
            Some((t, identity)) if t == token => Arc::clone(identity),
            _ => return None,
        };
        let session = self.open(identity)?;
        *held = None;
        Some(session)
    }

    /// A new session acting as `identity`; `None` when [`MAX_SESSIONS`] are live (or there
    /// is no randomness).
    pub fn open(&self, identity: Arc<Identity>) -> Option<String> {
        let session = random_hex().ok()?;
        let mut live = self.live.lock().ok()?;
        if live.len() >= MAX_SESSIONS {
            return None;
        }
        live.insert(session.clone(), identity);
        Some(session)
    }

    /// Who the request's session acts as; `None` without a live session's cookie.
    pub fn identity(&self, headers: &HeaderMap) -> Option<Arc<Identity>> {
        let id = session_id(headers)?;
        self.live.lock().ok()?.get(id).cloned()
    }

    /// Ends the request's session, if it has one.
    pub fn close(&self, headers: &HeaderMap) {
        if let (Some(id), Ok(mut live)) = (session_id(headers), self.live.lock()) {
            live.remove(id);
        }
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new()
    }
}

/// Sign-in attempts allowed per client address and per account name: a burst of
/// [`SIGN_IN_BURST`], then one every [`SIGN_IN_REFILL`] (the GCRA of `governor`).
#[derive(Debug)]
pub struct SignInLimiter {
    by_address: DefaultKeyedRateLimiter<IpAddr>,
    by_name: DefaultKeyedRateLimiter<String>,
}

/// Attempts a client address or an account name may make at once: 5.
pub const SIGN_IN_BURST: u32 = 5;
/// After the burst, one attempt per this long: 12 s (5 a minute).
pub const SIGN_IN_REFILL: std::time::Duration = std::time::Duration::from_secs(12);
/// Keys the limiter remembers before it forgets the idle ones: 10,000.
const LIMITER_KEYS: usize = 10_000;

impl SignInLimiter {
    /// The limits above.
    pub fn new() -> SignInLimiter {
        let burst = NonZeroU32::new(SIGN_IN_BURST).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(SIGN_IN_REFILL)
            .unwrap_or_else(|| Quota::per_minute(burst))
            .allow_burst(burst);
        SignInLimiter {
            by_address: RateLimiter::keyed(quota),
            by_name: RateLimiter::keyed(quota),
        }
    }

    /// Whether one more attempt from `address` for `name` is allowed now (it is counted).
    pub fn allow(&self, address: IpAddr, name: &str) -> bool {
        if self.by_address.len() > LIMITER_KEYS {
            self.by_address.retain_recent();
        }
        if self.by_name.len() > LIMITER_KEYS {
            self.by_name.retain_recent();
        }
        let address_ok = self.by_address.check_key(&address).is_ok();
        let name_ok = self.by_name.check_key(&name.to_owned()).is_ok();
        address_ok && name_ok
    }
}

impl Default for SignInLimiter {
    fn default() -> Self {
        SignInLimiter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            user: "alice".parse().expect("name"),
            keypair: agora_common::keys::Keypair::generate().expect("keys"),
        }
    }

    #[test]
    fn the_token_opens_one_session_once_and_only_its_cookie_counts() {
        let sessions = Sessions::with_token(identity()).expect("sessions");
        let token = sessions.token().expect("a token");
        assert_eq!(sessions.redeem("wrong"), None);
        let session = sessions.redeem(&token).expect("a session");
        assert_eq!(sessions.redeem(&token), None, "spent");
        assert_eq!(sessions.token(), None);
        let mut headers = HeaderMap::new();
        assert!(sessions.identity(&headers).is_none());
        headers.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={session}")
                .parse()
                .expect("header"),
        );
        assert_eq!(
            sessions.identity(&headers).map(|i| i.user.to_string()),
            Some("alice".to_owned())
        );
        sessions.close(&headers);
        assert!(sessions.identity(&headers).is_none(), "closed");
        headers.insert(
            header::COOKIE,
            format!("{COOKIE}=forged").parse().expect("header"),
        );
        assert!(sessions.identity(&headers).is_none());
        assert!(cookie(&session, false).contains("HttpOnly; SameSite=Strict"));
        assert!(cookie(&session, true).ends_with("; Secure"));
    }

    #[test]
    fn sign_in_attempts_past_the_burst_are_refused_per_address_and_per_name() {
        let limiter = SignInLimiter::new();
        let (a, b): (IpAddr, IpAddr) =
            ("127.0.0.1".parse().expect("ip"), "::1".parse().expect("ip"));
        for _ in 0..SIGN_IN_BURST {
            assert!(limiter.allow(a, "alice"));
        }
        assert!(
            !limiter.allow(a, "alice"),
            "the address and the name are spent"
        );
        assert!(
            !limiter.allow(b, "alice"),
            "the name is spent from any address"
        );
        assert!(
            !limiter.allow(a, "bob"),
            "the address is spent for any name"
        );
        assert!(limiter.allow(b, "bob"));
    }
}
