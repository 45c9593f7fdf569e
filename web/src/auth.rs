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
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::bridge::Identity;

/// The cookie's name.
pub const COOKIE: &str = "agora_session";

/// Most live sessions by default: 10,000. At the cap, opening one more evicts the expired
/// ones, then the one idle longest ([`SessionLimits::max`], `--max-sessions`).
pub const MAX_SESSIONS: usize = 10_000;

/// How long a session may go unused by default before it ends: 7 days (`--session-idle`).
/// A session with a WebSocket open is in use.
pub const SESSION_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a session lives at most by default, however used: 30 days
/// (`--session-lifetime`).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

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

/// The value of the cookie `name` a request carries, if any.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
}

/// The session id a request's cookie carries, if any.
pub fn session_id(headers: &HeaderMap) -> Option<&str> {
    cookie_value(headers, COOKIE)
}

/// How long sessions live and how many there may be.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// A session unused this long ends ([`SESSION_IDLE`] by default).
    pub idle: Duration,
    /// A session ends this long after it opened ([`SESSION_LIFETIME`] by default).
    pub lifetime: Duration,
    /// Most live sessions ([`MAX_SESSIONS`] by default).
    pub max: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            idle: SESSION_IDLE,
            lifetime: SESSION_LIFETIME,
            max: MAX_SESSIONS,
        }
    }
}

/// One live session.
#[derive(Debug)]
struct Live {
    identity: Arc<Identity>,
    /// Its CSRF token (crate::guard).
    csrf: String,
    opened: Instant,
    used: Instant,
    /// Dropped when the session ends: every WebSocket of the session holds a receiver and
    /// closes when it sees the sender gone.
    ended: tokio::sync::watch::Sender<()>,
}

impl Live {
    fn expired(&self, now: Instant, limits: &SessionLimits) -> bool {
        let in_use = self.ended.receiver_count() > 0;
        now.duration_since(self.opened) >= limits.lifetime
            || (!in_use && now.duration_since(self.used) >= limits.idle)
    }
}

/// A live session as a request finds it.
#[derive(Debug)]
pub struct SessionRef {
    /// Who it acts as.
    pub identity: Arc<Identity>,
    /// Its CSRF token (for the page).
    pub csrf: String,
    /// Changes (fails) when the session ends: a WebSocket of the session waits on it.
    pub ended: tokio::sync::watch::Receiver<()>,
}

/// The live sessions, and personal mode's token not yet spent.
///
/// Sessions end when signed out, when unused for [`SessionLimits::idle`], and
/// [`SessionLimits::lifetime`] after they opened; an ended session's WebSockets close.
/// Expiry is checked at each use and by [`Sessions::sweep`].
#[derive(Debug)]
pub struct Sessions {
    token: Mutex<Option<(String, Arc<Identity>)>>,
    live: Mutex<HashMap<String, Live>>,
    limits: SessionLimits,
}

impl Sessions {
    /// No session and no token (hosted mode), with the default [`SessionLimits`].
    pub fn new() -> Sessions {
        Sessions {
            token: Mutex::new(None),
            live: Mutex::new(HashMap::new()),
            limits: SessionLimits::default(),
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

    /// The same sessions with `limits`.
    pub fn with_limits(mut self, limits: SessionLimits) -> Sessions {
        self.limits = limits;
        self
    }

    /// How long sessions live.
    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    /// The token, until it is spent (for the URL printed at start).
    pub fn token(&self) -> Option<String> {
        self.token
            .lock()
            .ok()
            .and_then(|t| t.as_ref().map(|(token, _)| token.clone()))
    }

    /// Spends `token` (compared in constant time) for a new session id; `None` for a wrong
    /// or spent token (or without randomness).
    pub fn redeem(&self, token: &str) -> Option<String> {
        let mut held = self.token.lock().ok()?;
        let identity = match held.as_ref() {
            Some((t, identity)) if crate::guard::token_matches(t, token) => Arc::clone(identity),
            _ => return None,
        };
        let session = self.open(identity)?;
        *held = None;
        Some(session)
    }

    /// A new session acting as `identity`. At [`SessionLimits::max`] the expired sessions
    /// are dropped, then the one unused longest. `None` only without randomness.
    pub fn open(&self, identity: Arc<Identity>) -> Option<String> {
        let session = random_hex().ok()?;
        let csrf = random_hex().ok()?;
        let now = Instant::now();
        let mut live = self.live.lock().ok()?;
        if live.len() >= self.limits.max {
            live.retain(|_, s| !s.expired(now, &self.limits));
        }
        while live.len() >= self.limits.max.max(1) {
            let oldest = live
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(id, _)| id.clone())?;
            live.remove(&oldest);
            tracing::info!("session evicted: --max-sessions are live");
        }
        let (ended, _) = tokio::sync::watch::channel(());
        live.insert(
            session.clone(),
            Live {
                identity,
                csrf,
                opened: now,
                used: now,
                ended,
            },
        );
        Some(session)
    }

    /// The request's live session, marked used; `None` without a live session's cookie (an
    /// expired one is dropped).
    pub fn session(&self, headers: &HeaderMap) -> Option<SessionRef> {
        let id = session_id(headers)?;
        let now = Instant::now();
        let mut live = self.live.lock().ok()?;
        let session = live.get_mut(id)?;
        if session.expired(now, &self.limits) {
            live.remove(id);
            return None;
        }
        session.used = now;
        Some(SessionRef {
            identity: Arc::clone(&session.identity),
            csrf: session.csrf.clone(),
            ended: session.ended.subscribe(),
        })
    }

    /// Who the request's session acts as; `None` without a live session's cookie.
    pub fn identity(&self, headers: &HeaderMap) -> Option<Arc<Identity>> {
        self.session(headers).map(|s| s.identity)
    }

    /// The request's session's CSRF token; `None` without a live session.
    pub fn csrf(&self, headers: &HeaderMap) -> Option<String> {
        self.session(headers).map(|s| s.csrf)
    }

    /// Ends the request's session, if it has one: its WebSockets close.
    pub fn close(&self, headers: &HeaderMap) {
        if let (Some(id), Ok(mut live)) = (session_id(headers), self.live.lock()) {
            live.remove(id);
        }
    }

    /// Drops the expired sessions (their WebSockets close); how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let Ok(mut live) = self.live.lock() else {
            return 0;
        };
        let before = live.len();
        live.retain(|_, s| !s.expired(now, &self.limits));
        before - live.len()
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sweeps every `period` (at least 100 ms), for ever: run it as a task.
    pub async fn sweep_every(self: Arc<Self>, period: Duration) {
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let n = self.sweep();
            if n > 0 {
                tracing::info!(sessions = n, "sessions expired");
            }
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

    fn cookie_for(session: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = format!("{COOKIE}={session}").parse().expect("header");
        headers.insert(header::COOKIE, value);
        headers
    }

    #[test]
    fn a_session_ends_when_idle_and_its_websockets_hear_it() {
        let limits = SessionLimits {
            idle: Duration::from_millis(50),
            lifetime: Duration::from_secs(3600),
            max: 10,
        };
        let sessions = Sessions::new().with_limits(limits);
        let used = cookie_for(&sessions.open(Arc::new(identity())).expect("a session"));
        let idle = cookie_for(&sessions.open(Arc::new(identity())).expect("a session"));
        let page = sessions.session(&used).expect("live");
        assert_eq!(page.csrf.len(), 64, "its own token");
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            sessions.identity(&idle).is_none(),
            "unused past --session-idle"
        );
        assert!(
            sessions.identity(&used).is_some(),
            "a session with a WebSocket open is in use"
        );
        sessions.close(&used);
        assert!(
            page.ended.has_changed().is_err(),
            "its WebSocket hears the end"
        );
        assert!(sessions.is_empty());
    }

    #[test]
    fn at_the_cap_the_expired_then_the_longest_unused_session_is_evicted() {
        let limits = SessionLimits {
            idle: Duration::from_secs(3600),
            lifetime: Duration::from_secs(3600),
            max: 2,
        };
        let sessions = Sessions::new().with_limits(limits);
        let first = cookie_for(&sessions.open(Arc::new(identity())).expect("first"));
        let second = cookie_for(&sessions.open(Arc::new(identity())).expect("second"));
        std::thread::sleep(Duration::from_millis(2));
        assert!(sessions.identity(&first).is_some(), "first is used again");
        let third = cookie_for(&sessions.open(Arc::new(identity())).expect("not refused"));
        assert!(
            sessions.identity(&second).is_none(),
            "the longest unused is evicted"
        );
        assert!(sessions.identity(&first).is_some());
        assert!(sessions.identity(&third).is_some());
        assert_eq!(sessions.len(), 2);
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
