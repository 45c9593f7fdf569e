//! Personal mode's sign-in: a one-time random token in the printed URL, exchanged for a
//! session cookie (`agora_session`, `HttpOnly; SameSite=Strict; Path=/`). Tokens and session
//! ids are 32 random bytes from the OS (`getrandom`), hex-encoded.

use std::collections::HashSet;
use std::sync::Mutex;

use axum::http::{header, HeaderMap};

/// The cookie's name.
pub const COOKIE: &str = "agora_session";

/// Most live sessions: new sign-ins past it evict none and are refused (1,000).
pub const MAX_SESSIONS: usize = 1000;

/// The token not yet spent, and the sessions it opened.
#[derive(Debug)]
pub struct Auth {
    token: Mutex<Option<String>>,
    sessions: Mutex<HashSet<String>>,
}

/// 32 random bytes, hex.
///
/// # Errors
/// The OS has no randomness to give.
pub fn random_hex() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The `Set-Cookie` value for `session`.
pub fn cookie(session: &str) -> String {
    format!("{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/")
}

impl Auth {
    /// A fresh token and no session.
    ///
    /// # Errors
    /// The OS has no randomness to give.
    pub fn new() -> Result<Auth, getrandom::Error> {
        Ok(Auth {
            token: Mutex::new(Some(random_hex()?)),
            sessions: Mutex::new(HashSet::new()),
        })
    }

    /// The token, until it is spent (for the URL printed at start).
    pub fn token(&self) -> Option<String> {
        self.token.lock().ok().and_then(|t| t.clone())
    }

    /// Spends `token` for a new session id; `None` for a wrong or spent token (or when the
    /// sessions are full).
    pub fn redeem(&self, token: &str) -> Option<String> {
        let mut held = self.token.lock().ok()?;
        if held.as_deref() != Some(token) {
            return None;
        }
        let session = random_hex().ok()?;
        let mut sessions = self.sessions.lock().ok()?;
        if sessions.len() >= MAX_SESSIONS {
            return None;
        }
        *held = None;
        sessions.insert(session.clone());
        Some(session)
    }

    /// Whether the request carries a live session's cookie.
    pub fn has_session(&self, headers: &HeaderMap) -> bool {
        let Ok(sessions) = self.sessions.lock() else {
            return false;
        };
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| name == COOKIE && sessions.contains(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_opens_one_session_once_and_only_its_cookie_counts() {
        let auth = Auth::new().expect("auth");
        let token = auth.token().expect("a token");
        assert_eq!(auth.redeem("wrong"), None);
        let session = auth.redeem(&token).expect("a session");
        assert_eq!(auth.redeem(&token), None, "spent");
        assert_eq!(auth.token(), None);
        let mut headers = HeaderMap::new();
        assert!(!auth.has_session(&headers));
        headers.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={session}")
                .parse()
                .expect("header"),
        );
        assert!(auth.has_session(&headers));
        headers.insert(
            header::COOKIE,
            format!("{COOKIE}=forged").parse().expect("header"),
        );
        assert!(!auth.has_session(&headers));
        assert!(cookie(&session).contains("HttpOnly; SameSite=Strict"));
    }
}
