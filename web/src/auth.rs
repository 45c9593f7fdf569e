//! Signing in, and the sessions it opens.
//!
//! A session is a random id in the cookie `agora_session` (`HttpOnly; SameSite=Strict;
//! Path=/`, plus `Secure` over TLS) mapped to the [`Identity`] it acts as. Ids and tokens
//! are 32 random bytes from the OS (`getrandom`), hex-encoded.
//!
//! - Personal mode: a sign-in link's one-time token is exchanged for a session
//!   ([`Sessions::redeem`]); every session acts as the one configured user. The gateway
//!   prints the first link at start; `agora-web link` asks the running gateway for another
//!   ([`Sessions::mint`], over [`crate::link`]'s local socket). A link works once, and only
//!   for [`Sessions::link_ttl`] ([`LINK_TTL`] by default).
//! - Hosted mode: a name and password checked by [`crate::accounts`]; the session acts as
//!   that account. Attempts are rate-limited per client address and per (address, account
//!   name) pair ([`SignInLimiter`]), never per name alone: no one can lock an owner out.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use agora_proto::wire::UserName;

use crate::bridge::Identity;

/// The cookie's name.
pub const COOKIE: &str = "agora_session";

/// Most live sessions by default: 10,000. At the cap, opening one more evicts the expired
/// ones, then the one idle longest among those with no WebSocket open (a page with its
/// WebSocket open makes no HTTP requests, but is in use), then the one idle longest
/// ([`SessionLimits::max`], `--max-sessions`).
pub const MAX_SESSIONS: usize = 10_000;

/// How long a session may go unused by default before it ends: 7 days (`--session-idle`).
/// A session with a WebSocket open is in use.
pub const SESSION_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a session lives at most by default, however used: 30 days
/// (`--session-lifetime`).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long a personal-mode sign-in link works by default: 5 minutes (`--link-ttl`).
pub const LINK_TTL: Duration = Duration::from_secs(5 * 60);

/// Most sign-in links waiting to be used at once: 16. Minting one more drops the oldest.
pub const MAX_LINKS: usize = 16;

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
    /// Whether a WebSocket of the session is open (it holds a receiver of `ended`; so does
    /// a request being handled, for as long as it runs).
    fn in_use(&self) -> bool {
        self.ended.receiver_count() > 0
    }

    fn expired(&self, now: Instant, limits: &SessionLimits) -> bool {
        now.duration_since(self.opened) >= limits.lifetime
            || (!self.in_use() && now.duration_since(self.used) >= limits.idle)
    }
}

/// Whether the browser says a request comes from a page of another origin: a
/// `Sec-Fetch-Site` other than `same-origin` or `none` (typed in, a bookmark). Such a request
/// may still be answered, but does not count as a use of the session: a page of another
/// port (same site, so it has the cookie) cannot keep a session from idling out.
fn cross_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .is_some_and(|site| !matches!(site.as_bytes(), b"same-origin" | b"none"))
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

/// A sign-in link's token, not yet used.
#[derive(Debug)]
struct Link {
    token: String,
    expires: Instant,
}

/// Personal mode's one identity and its sign-in links.
#[derive(Debug)]
struct Personal {
    identity: Arc<Identity>,
    /// How long a link works.
    ttl: Duration,
    /// The links not yet used, oldest first; at most [`MAX_LINKS`].
    links: Mutex<VecDeque<Link>>,
}

/// The live sessions, and personal mode's sign-in links not yet used.
///
/// Sessions end when signed out, when unused for [`SessionLimits::idle`], and
/// [`SessionLimits::lifetime`] after they opened; an ended session's WebSockets close.
/// Expiry is checked at each use and by [`Sessions::sweep`].
#[derive(Debug)]
pub struct Sessions {
    personal: Option<Personal>,
    live: Mutex<HashMap<String, Live>>,
    limits: SessionLimits,
}

impl Sessions {
    /// No session and no link (hosted mode), with the default [`SessionLimits`].
    pub fn new() -> Sessions {
        Sessions {
            personal: None,
            live: Mutex::new(HashMap::new()),
            limits: SessionLimits::default(),
        }
    }

    /// Personal mode: no session yet; links minted by [`Sessions::mint`] open sessions that
    /// act as `identity`, each link once and for `link_ttl` after it was minted.
    pub fn personal(identity: Identity, link_ttl: Duration) -> Sessions {
        Sessions {
            personal: Some(Personal {
                identity: Arc::new(identity),
                ttl: link_ttl,
                links: Mutex::new(VecDeque::new()),
            }),
            ..Sessions::new()
        }
    }

    /// How long a sign-in link works; `None` in hosted mode (no links).
    pub fn link_ttl(&self) -> Option<Duration> {
        self.personal.as_ref().map(|p| p.ttl)
    }

    /// Personal mode: a new sign-in link's token (32 random bytes, hex), good for one
    /// sign-in within [`Sessions::link_ttl`]. At [`MAX_LINKS`] unused links the oldest is
    /// dropped. `None` in hosted mode or without randomness.
    pub fn mint(&self) -> Option<String> {
        let personal = self.personal.as_ref()?;
        let token = random_hex().ok()?;
        let now = Instant::now();
        let mut links = personal.links.lock().ok()?;
        links.retain(|l| l.expires > now);
        while links.len() >= MAX_LINKS {
            links.pop_front();
        }
        links.push_back(Link {
            token: token.clone(),
            expires: now + personal.ttl,
        });
        Some(token)
    }

    /// Sign-in links minted and not yet used nor expired.
    pub fn links(&self) -> usize {
        let now = Instant::now();
        self.personal
            .as_ref()
            .and_then(|p| p.links.lock().ok())
            .map_or(0, |links| links.iter().filter(|l| l.expires > now).count())
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

    /// Spends the link whose token is `token` (compared in constant time with each) for a
    /// new session id; `None` for a wrong, used or expired token, in hosted mode, or without
    /// randomness.
    pub fn redeem(&self, token: &str) -> Option<String> {
        let personal = self.personal.as_ref()?;
        let now = Instant::now();
        let mut links = personal.links.lock().ok()?;
        links.retain(|l| l.expires > now);
        let found = links
            .iter()
            .position(|l| crate::guard::token_matches(&l.token, token))?;
        let session = self.open(Arc::clone(&personal.identity))?;
        links.remove(found);
        Some(session)
    }

    /// A new session acting as `identity`. At [`SessionLimits::max`] the expired sessions
    /// are dropped, then the one unused longest among those with no WebSocket open, then the
    /// one unused longest. `None` only without randomness.
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
                .min_by_key(|(_, s)| (s.in_use(), s.used))
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

    /// The request's live session, marked used unless the browser says the request comes
    /// from a page of another origin (`Sec-Fetch-Site`); `None` without a live session's
    /// cookie (an expired one is dropped).
    pub fn session(&self, headers: &HeaderMap) -> Option<SessionRef> {
        self.find(headers, !cross_site(headers))
    }

    /// The request's live session, marked used if `touch`.
    fn find(&self, headers: &HeaderMap, touch: bool) -> Option<SessionRef> {
        let id = session_id(headers)?;
        let now = Instant::now();
        let mut live = self.live.lock().ok()?;
        let session = live.get_mut(id)?;
        if session.expired(now, &self.limits) {
            live.remove(id);
            return None;
        }
        if touch {
            session.used = now;
        }
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

    /// The request's session's CSRF token; `None` without a live session. The session is
    /// not marked used: the guard ([`crate::guard`]) asks before it knows whether the request
    /// is accepted, and a refused one (another origin's) must not keep the session alive;
    /// the handler of an accepted one marks it.
    pub fn csrf(&self, headers: &HeaderMap) -> Option<String> {
        self.find(headers, false).map(|s| s.csrf)
    }

    /// Ends the request's session, if it has one: its WebSockets close.
    pub fn close(&self, headers: &HeaderMap) {
        if let (Some(id), Ok(mut live)) = (session_id(headers), self.live.lock()) {
            live.remove(id);
        }
    }

    /// Drops the expired sessions (their WebSockets close) and sign-in links; how many
    /// sessions.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        if let Some(mut links) = self.personal.as_ref().and_then(|p| p.links.lock().ok()) {
            links.retain(|l| l.expires > now);
        }
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

/// Sign-in and sign-up attempts allowed, counted per client address and per (address,
/// account name) pair (the GCRA of `governor`):
///
/// - per address: a burst of [`ADDRESS_BURST`], then one every [`ADDRESS_REFILL`];
/// - per address and name: a burst of [`SIGN_IN_BURST`], then one every [`SIGN_IN_REFILL`].
///
/// There is no count per name alone: guesses from one address never lock the account's
/// owner out on another. An IPv6 address counts by its /64 prefix (one host usually holds a
/// whole /64); an IPv4-mapped one as the IPv4 address.
///
/// The address is checked first; a refused address touches no per-name state. Both maps are
/// bounded: keys idle long enough to be back at a full burst (at most a minute) are dropped
/// every [`PRUNE_EVERY`] and whenever a map passes half of its most keys
/// ([`LIMITER_KEYS`] by default, `--sign-in-max-keys`); a map still full after that refuses
/// every attempt (fail closed) until keys age out.
#[derive(Debug)]
pub struct SignInLimiter {
    by_address: DefaultKeyedRateLimiter<IpAddr>,
    by_pair: DefaultKeyedRateLimiter<(IpAddr, UserName)>,
    max_keys: usize,
    pruned: Mutex<Instant>,
}

/// Attempts one address and one name may make at once: 5.
pub const SIGN_IN_BURST: u32 = 5;
/// After that burst, one attempt per this long for the same address and name: 12 s (5 a
/// minute).
pub const SIGN_IN_REFILL: Duration = Duration::from_secs(12);
/// Attempts one address may make at once, whatever the names: 10.
pub const ADDRESS_BURST: u32 = 10;
/// After that burst, one attempt per this long from the same address: 6 s (10 a minute).
pub const ADDRESS_REFILL: Duration = Duration::from_secs(6);
/// Keys each of the limiter's maps holds at most by default: 10,000 (some 150 bytes a key).
pub const LIMITER_KEYS: usize = 10_000;
/// How often idle keys are dropped: every 60 s (checked on the next attempt).
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Whether a [`SignInLimiter`] lets an attempt through, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on: check the password.
    Allowed,
    /// The address made too many attempts (for any name).
    AddressLimited,
    /// The address made too many attempts for this name.
    NameLimited,
    /// The limiter's maps are full (a flood from many addresses): refused until keys age out.
    Full,
}

/// The bucket a client address counts in, for every per-address cap: IPv4 as is, IPv6 by
/// its /64 (one host usually holds a whole /64), an IPv4-mapped IPv6 address as IPv4.
pub fn bucket(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
            )),
        },
    }
}

fn quota(burst: u32, refill: Duration) -> Quota {
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(refill)
        .unwrap_or_else(|| Quota::per_minute(burst))
        .allow_burst(burst)
}

impl SignInLimiter {
    /// The limits above, with [`LIMITER_KEYS`] keys per map at most.
    pub fn new() -> SignInLimiter {
        SignInLimiter::with_max_keys(LIMITER_KEYS)
    }

    /// The limits above, with `max_keys` keys per map at most (at least 2).
    pub fn with_max_keys(max_keys: usize) -> SignInLimiter {
        SignInLimiter {
            by_address: RateLimiter::keyed(quota(ADDRESS_BURST, ADDRESS_REFILL)),
            by_pair: RateLimiter::keyed(quota(SIGN_IN_BURST, SIGN_IN_REFILL)),
            max_keys: max_keys.max(2),
            pruned: Mutex::new(Instant::now()),
        }
    }

    /// Drops idle keys when [`PRUNE_EVERY`] has passed or a map is over half full.
    fn prune(&self) {
        let due = self
            .pruned
            .lock()
            .map(|mut last| {
                let due = last.elapsed() >= PRUNE_EVERY
                    || self.by_address.len() > self.max_keys / 2
                    || self.by_pair.len() > self.max_keys / 2;
                if due {
                    *last = Instant::now();
                }
                due
            })
            .unwrap_or(true);
        if due {
            for map in [&self.by_address as &dyn Prune, &self.by_pair] {
                map.prune();
            }
        }
    }

    /// Whether one more attempt from `address` for `name` may go on now; it is counted
    /// (right password or wrong). The address is checked first: a refused address is not
    /// counted against the name.
    pub fn check(&self, address: IpAddr, name: &UserName) -> Verdict {
        self.prune();
        let address = bucket(address);
        if self.by_address.len() >= self.max_keys || self.by_pair.len() >= self.max_keys {
            return Verdict::Full;
        }
        if self.by_address.check_key(&address).is_err() {
            return Verdict::AddressLimited;
        }
        if self.by_pair.check_key(&(address, name.clone())).is_err() {
            return Verdict::NameLimited;
        }
        Verdict::Allowed
    }

    /// Keys held: (addresses, address and name pairs).
    pub fn keys(&self) -> (usize, usize) {
        (self.by_address.len(), self.by_pair.len())
    }
}

/// A keyed limiter whose idle keys can be dropped (so both maps go through one loop).
trait Prune {
    fn prune(&self);
}

impl<K: std::hash::Hash + Eq + Clone> Prune for DefaultKeyedRateLimiter<K> {
    fn prune(&self) {
        self.retain_recent();
        self.shrink_to_fit();
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
        let sessions = Sessions::personal(identity(), LINK_TTL);
        let token = sessions.mint().expect("a token");
        assert_eq!(sessions.redeem("wrong"), None);
        let session = sessions.redeem(&token).expect("a session");
        assert_eq!(sessions.redeem(&token), None, "spent");
        assert_eq!(sessions.links(), 0);
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
    fn each_minted_link_works_once_until_it_expires_and_hosted_mode_has_none() {
        assert_eq!(Sessions::new().mint(), None, "hosted mode mints no link");
        let sessions = Sessions::personal(identity(), Duration::from_millis(200));
        let first = sessions.mint().expect("a link");
        let second = sessions.mint().expect("another link");
        assert_ne!(first, second);
        assert_eq!(sessions.links(), 2);
        assert!(sessions.redeem(&second).is_some(), "a newer link");
        assert!(
            sessions.redeem(&first).is_some(),
            "the older one still works"
        );
        assert_eq!(sessions.redeem(&first), None, "once");
        let late = sessions.mint().expect("a link");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(sessions.redeem(&late), None, "expired");
        assert_eq!(sessions.links(), 0);
        assert_eq!(sessions.len(), 2, "the two sessions live on");
    }

    #[test]
    fn at_most_max_links_wait_and_minting_more_drops_the_oldest() {
        let sessions = Sessions::personal(identity(), LINK_TTL);
        let oldest = sessions.mint().expect("a link");
        let rest: Vec<String> = (1..=MAX_LINKS)
            .map(|_| sessions.mint().expect("a link"))
            .collect();
        assert_eq!(sessions.links(), MAX_LINKS);
        assert_eq!(sessions.redeem(&oldest), None, "dropped");
        assert!(rest.iter().all(|t| sessions.redeem(t).is_some()));
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
    fn at_the_cap_a_session_with_its_websocket_open_is_evicted_last() {
        let limits = SessionLimits {
            idle: Duration::from_secs(3600),
            lifetime: Duration::from_secs(3600),
            max: 2,
        };
        let sessions = Sessions::new().with_limits(limits);
        let open_page = cookie_for(&sessions.open(Arc::new(identity())).expect("first"));
        // Its WebSocket holds the session's `ended` (lib.rs `ws`), and makes no requests.
        let websocket = sessions.session(&open_page).expect("live").ended;
        std::thread::sleep(Duration::from_millis(2));
        let recent = cookie_for(&sessions.open(Arc::new(identity())).expect("second"));
        assert!(sessions.identity(&recent).is_some());
        let third = cookie_for(&sessions.open(Arc::new(identity())).expect("third"));
        assert!(
            sessions.identity(&open_page).is_some(),
            "the page with its WebSocket open stays, though unused longest"
        );
        assert!(
            sessions.identity(&recent).is_none(),
            "the one without a WebSocket goes"
        );
        assert!(sessions.identity(&third).is_some());
        // With every session's WebSocket open, the one unused longest goes.
        let third_socket = sessions.session(&third).expect("live").ended;
        std::thread::sleep(Duration::from_millis(2));
        assert!(sessions.identity(&open_page).is_some(), "used again");
        let fourth = cookie_for(&sessions.open(Arc::new(identity())).expect("fourth"));
        assert!(sessions.identity(&third).is_none());
        assert!(
            third_socket.has_changed().is_err(),
            "its WebSocket hears the end"
        );
        assert!(sessions.identity(&fourth).is_some());
        drop(websocket);
    }

    #[test]
    fn refused_or_cross_site_requests_do_not_keep_a_session_from_idling_out() {
        let limits = SessionLimits {
            idle: Duration::from_secs(1),
            lifetime: Duration::from_secs(3600),
            max: 10,
        };
        let sessions = Sessions::new().with_limits(limits);
        let victim = cookie_for(&sessions.open(Arc::new(identity())).expect("a session"));
        let mut cross = victim.clone();
        cross.insert("sec-fetch-site", "same-site".parse().expect("header"));
        let mut own = victim.clone();
        own.insert("sec-fetch-site", "same-origin".parse().expect("header"));
        // Another port's page posts (the guard asks for the token, then refuses) and loads
        // the gateway's GET routes, over and over, past the idle time.
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1300) {
            let _ = sessions.csrf(&victim);
            let _ = sessions.session(&cross);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            sessions.identity(&own).is_none(),
            "neither the guard's look-up nor another origin's request is a use"
        );
        // The gateway's own page does keep it.
        let kept = cookie_for(&sessions.open(Arc::new(identity())).expect("a session"));
        let mut kept_own = kept.clone();
        kept_own.insert("sec-fetch-site", "same-origin".parse().expect("header"));
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1300) {
            assert!(sessions.session(&kept_own).is_some(), "in use");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            sessions.identity(&kept).is_some(),
            "without Sec-Fetch-Site too"
        );
    }

    fn name(n: &str) -> UserName {
        n.parse().expect("name")
    }

    #[test]
    fn failures_for_a_name_from_one_address_never_lock_out_another_address() {
        let limiter = SignInLimiter::new();
        let (a, b): (IpAddr, IpAddr) = (
            "127.0.0.2".parse().expect("ip"),
            "127.0.0.3".parse().expect("ip"),
        );
        for _ in 0..SIGN_IN_BURST {
            assert_eq!(limiter.check(a, &name("alice")), Verdict::Allowed);
        }
        assert_eq!(limiter.check(a, &name("alice")), Verdict::NameLimited);
        assert_eq!(
            limiter.check(b, &name("alice")),
            Verdict::Allowed,
            "the owner on a clean address gets in"
        );
        // The address's own limit covers every name it tries.
        let mut last = Verdict::Allowed;
        for i in 0..ADDRESS_BURST {
            last = limiter.check(a, &name(&format!("user{i}")));
        }
        assert_eq!(last, Verdict::AddressLimited);
        let before = limiter.keys();
        assert_eq!(limiter.check(a, &name("fresh")), Verdict::AddressLimited);
        assert_eq!(
            limiter.keys(),
            before,
            "a refused address adds no per-name key"
        );
    }

    #[test]
    fn a_full_limiter_refuses_rather_than_grows() {
        let limiter = SignInLimiter::with_max_keys(4);
        let mut verdicts = Vec::new();
        for i in 0..6 {
            let host: IpAddr = format!("10.0.0.{i}").parse().expect("ip");
            verdicts.push(limiter.check(host, &name("alice")));
        }
        // Fresh keys are not idle enough to be dropped: the map stays at its bound.
        assert_eq!(&verdicts[..4], &[Verdict::Allowed; 4], "{verdicts:?}");
        assert_eq!(&verdicts[4..], &[Verdict::Full; 2], "{verdicts:?}");
        assert_eq!(limiter.keys(), (4, 4));
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64_and_a_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert_eq!(bucket(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(bucket(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(bucket(ip("10.0.0.1")), ip("10.0.0.1"));
        let limiter = SignInLimiter::new();
        for i in 0..ADDRESS_BURST {
            let host = ip(&format!("2001:db8::{i:x}"));
            assert_eq!(
                limiter.check(host, &name(&format!("u{i}"))),
                Verdict::Allowed
            );
        }
        assert_eq!(
            limiter.check(ip("2001:db8::ffff"), &name("v")),
            Verdict::AddressLimited,
            "another host of the same /64"
        );
        assert_eq!(limiter.keys().0, 1);
    }
}
