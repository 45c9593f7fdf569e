//! The guard against other origins: cross-site WebSocket hijacking and request forgery.
//!
//! `SameSite=Strict` does not separate ports or sibling subdomains: a page on another port of
//! the same host is "same site" and its requests carry the session cookie. So every request
//! that can act for someone is checked here, once, as a middleware ([`protect`], wired in
//! [`crate::router`]) before any handler runs:
//!
//! - `GET /ws` (the upgrade) and every state-changing request (any method but `GET`, `HEAD`
//!   and `OPTIONS`: `POST /signin`, `/signup`, `/signout`, `/files/GROUP`) must carry an
//!   `Origin` that is the gateway's own: `http://HOST` or `https://HOST` (by how it serves)
//!   for the request's `Host`, or one given with `--origin` (a deployment behind a reverse
//!   proxy). A missing `Origin`, `null`, or another is refused `403 forbidden_origin`.
//! - Where the browser sends `Sec-Fetch-Site`, it must be `same-origin`; otherwise `403
//!   cross_site`.
//! - The POST routes carry a token as well (`403 bad_csrf` without the right one), compared
//!   in constant time (`subtle`): a signed-in session's token ([`crate::auth::Sessions`],
//!   on the page as `<meta name="agora-csrf">`), sent in the [`CSRF_HEADER`] header or the
//!   form field [`FORM_FIELD`]; and for `/signin` and `/signup`, which have no session yet, a
//!   double-submit token: the sign-in page sets the cookie [`FORM_COOKIE`] and puts the same
//!   value in the form's hidden [`FORM_FIELD`].
//!
//! A route that needs a session (`/ws`, `/signout`, `/files/…`) is passed to its handler
//! without these checks when the request has no live session: the handler answers `401`
//! (`/signout` only clears the cookie), and nothing is said about the route.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::{auth, AppState};

/// The request header that carries a signed-in session's token: `X-Agora-CSRF`.
pub const CSRF_HEADER: &str = "x-agora-csrf";

/// The cookie of the sign-in form's double-submit token: `agora_form`.
pub const FORM_COOKIE: &str = "agora_form";

/// The form field that carries a token: `csrf`.
pub const FORM_FIELD: &str = "csrf";

/// The largest form body the guard reads to find [`FORM_FIELD`]: 16 KiB; a larger one is
/// `413 too_large`.
pub const FORM_BODY_LIMIT: usize = 16 << 10;

/// The origins the gateway answers for besides its own (`--origin`, normalized by
/// [`parse_origin`]).
#[derive(Clone, Debug, Default)]
pub struct Origins {
    extra: Vec<String>,
}

impl Origins {
    /// The gateway's own origin plus `extra` (each as [`parse_origin`] returns it).
    pub fn new(extra: Vec<String>) -> Origins {
        Origins { extra }
    }

    /// Whether `origin` (an `Origin` header's value) is the gateway's: the request's
    /// `host` under `scheme` (`http` or `https`), or one of the extra origins.
    pub fn allows(&self, origin: &str, host: Option<&str>, scheme: &str) -> bool {
        let Some(origin) = normalize(origin) else {
            return false;
        };
        let own = host.and_then(|h| normalize(&format!("{scheme}://{h}")));
        own.as_deref() == Some(origin.as_str()) || self.extra.contains(&origin)
    }
}

/// An origin as the guard compares it: `scheme://host[:port]`, lowercase, without the
/// scheme's default port; `None` for anything else (a path, user info, `null`).
fn normalize(origin: &str) -> Option<String> {
    let origin = origin.trim().to_ascii_lowercase();
    let (scheme, authority) = origin.split_once("://")?;
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let default_port = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    if authority.is_empty()
        || authority
            .bytes()
            .any(|b| matches!(b, b'/' | b'?' | b'#' | b'@' | b'\\') || b.is_ascii_whitespace())
    {
        return None;
    }
    let authority = authority.strip_suffix(default_port).unwrap_or(authority);
    Some(format!("{scheme}://{authority}"))
}

/// Parses an `--origin` value: `http://HOST[:PORT]` or `https://HOST[:PORT]` (a trailing
/// `/` is allowed; no path).
///
/// # Errors
/// What is wrong with it, for clap to print.
pub fn parse_origin(value: &str) -> Result<String, String> {
    normalize(value).ok_or_else(|| {
        format!("{value:?} is not an origin: write it as https://HOST or http://HOST:PORT")
    })
}

/// Why the guard refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `Origin` header (or not text).
    NoOrigin,
    /// An `Origin` that is not the gateway's.
    ForeignOrigin(String),
    /// `Sec-Fetch-Site` other than `same-origin`.
    CrossSite(String),
    /// No token, or not the right one.
    BadToken,
    /// A form body past [`FORM_BODY_LIMIT`].
    TooLarge,
}

impl Refusal {
    /// The error code (docs/WEB.md §2.1): `forbidden_origin`, `cross_site`, `bad_csrf`,
    /// `too_large`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NoOrigin | Refusal::ForeignOrigin(_) => "forbidden_origin",
            Refusal::CrossSite(_) => "cross_site",
            Refusal::BadToken => "bad_csrf",
            Refusal::TooLarge => "too_large",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::FORBIDDEN,
        }
    }

    /// What was wrong, for the person (or the script) that sent it.
    pub fn message(&self) -> String {
        match self {
            Refusal::NoOrigin => {
                "no Origin header: requests that act must come from the gateway's own page".into()
            }
            Refusal::ForeignOrigin(o) => format!(
                "Origin {o} is not this gateway's (a gateway behind a proxy names its public \
                 origin with --origin)"
            ),
            Refusal::CrossSite(s) => format!("Sec-Fetch-Site {s}: only same-origin requests act"),
            Refusal::BadToken => {
                "missing or wrong CSRF token: reload the page and try again".into()
            }
            Refusal::TooLarge => format!("a form is at most {FORM_BODY_LIMIT} bytes"),
        }
    }

    /// The refusal as a response: JSON `{"ok": false, "error", "message"}` for `json`, else
    /// text.
    pub fn into_response(self, json: bool) -> Response {
        let (status, code, message) = (self.status(), self.code(), self.message());
        if json {
            return (
                status,
                axum::Json(serde_json::json!({"ok": false, "error": code, "message": message})),
            )
                .into_response();
        }
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{}: {code}: {message}\n", status.as_u16()),
        )
            .into_response()
    }
}

/// The `Origin` and `Sec-Fetch-Site` checks on `headers` of a request served over `scheme`.
///
/// # Errors
/// The first check that fails.
pub fn check_origin(origins: &Origins, headers: &HeaderMap, scheme: &str) -> Result<(), Refusal> {
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .ok_or(Refusal::NoOrigin)?;
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !origins.allows(origin, host, scheme) {
        return Err(Refusal::ForeignOrigin(origin.chars().take(200).collect()));
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        if site.as_bytes() != b"same-origin" {
            return Err(Refusal::CrossSite(
                String::from_utf8_lossy(site.as_bytes())
                    .chars()
                    .take(40)
                    .collect(),
            ));
        }
    }
    Ok(())
}

/// Whether `presented` is `expected` (a token we issued, never empty), in constant time.
pub fn token_matches(expected: &str, presented: &str) -> bool {
    !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// The value of field `name` in a form body (`application/x-www-form-urlencoded`). Tokens
/// are hex, so the value is taken as it is, not percent-decoded (an encoded one does not
/// match).
fn form_field<'a>(body: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(body)
        .ok()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The token a request presents: the [`CSRF_HEADER`] header, else a form body's
/// [`FORM_FIELD`] (the body is read, up to [`FORM_BODY_LIMIT`], and put back).
async fn presented_token(request: Request) -> Result<(Option<String>, Request), Refusal> {
    if let Some(value) = request.headers().get(CSRF_HEADER) {
        let token = value.to_str().ok().map(str::to_owned);
        return Ok((token, request));
    }
    let is_form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Ok((None, request));
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > FORM_BODY_LIMIT as u64) {
        return Err(Refusal::TooLarge);
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, FORM_BODY_LIMIT)
        .await
        .map_err(|_| Refusal::TooLarge)?;
    let token = form_field(&bytes, FORM_FIELD).map(str::to_owned);
    Ok((token, Request::from_parts(parts, Body::from(bytes))))
}

/// The middleware: the checks in the module's doc, then the route's handler.
pub async fn protect(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let upgrade = path == "/ws";
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if safe && !upgrade {
        return next.run(request).await;
    }
    let json = path.starts_with("/files/");
    let form_route = path == "/signin" || path == "/signup";
    let expected = if form_route {
        auth::cookie_value(request.headers(), FORM_COOKIE).map(str::to_owned)
    } else {
        // (Not a use of the session: only an accepted request's handler marks it used.)
        match state.sessions.csrf(request.headers()) {
            Some(token) => Some(token),
            // No session: the handler answers 401, or /signout clears the cookie.
            None => return next.run(request).await,
        }
    };
    let scheme = if state.tls { "https" } else { "http" };
    if let Err(refusal) = check_origin(&state.origins, request.headers(), scheme) {
        tracing::warn!(path, error = refusal.code(), reason = %refusal.message(), "request refused");
        return refusal.into_response(json);
    }
    if upgrade {
        // A browser cannot set headers on a WebSocket: the Origin is the check.
        return next.run(request).await;
    }
    let path = path.to_owned();
    if expected.is_none() {
        // No form token was ever issued to this browser: nothing to compare, nothing to read.
        tracing::warn!(path, "request refused: no form token cookie");
        return Refusal::BadToken.into_response(json);
    }
    let (presented, request) = match presented_token(request).await {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(json),
    };
    let matches = match (&expected, &presented) {
        (Some(expected), Some(presented)) => token_matches(expected, presented),
        _ => false,
    };
    if !matches {
        tracing::warn!(path, "request refused: missing or wrong CSRF token");
        return Refusal::BadToken.into_response(json);
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, value.parse().expect("header"));
        }
        h
    }

    #[test]
    fn only_the_gateways_own_origin_or_a_configured_one_passes() {
        let origins = Origins::new(vec![parse_origin("https://chat.example.org/").expect("ok")]);
        let own = |origin: &str| {
            check_origin(
                &origins,
                &headers(&[("host", "127.0.0.1:8080"), ("origin", origin)]),
                "http",
            )
        };
        assert_eq!(own("http://127.0.0.1:8080"), Ok(()));
        assert_eq!(own("HTTP://127.0.0.1:8080"), Ok(()));
        assert_eq!(own("https://chat.example.org"), Ok(()));
        for foreign in [
            "http://127.0.0.1:8081",
            "https://127.0.0.1:8080",
            "http://localhost:8080",
            "null",
            "http://127.0.0.1:8080.evil.example",
            "http://evil@127.0.0.1:8080",
        ] {
            assert!(
                matches!(own(foreign), Err(Refusal::ForeignOrigin(_))),
                "{foreign}"
            );
        }
        assert_eq!(
            check_origin(&origins, &headers(&[("host", "127.0.0.1:8080")]), "http"),
            Err(Refusal::NoOrigin)
        );
        let cross = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "same-site"),
        ]);
        assert!(matches!(
            check_origin(&origins, &cross, "http"),
            Err(Refusal::CrossSite(_))
        ));
        let default_port = headers(&[
            ("host", "example.org:443"),
            ("origin", "https://example.org"),
        ]);
        assert_eq!(check_origin(&origins, &default_port, "https"), Ok(()));
    }

    #[test]
    fn origins_given_on_the_command_line_are_checked_and_normalized() {
        assert_eq!(
            parse_origin("https://Chat.Example.org:443/").as_deref(),
            Ok("https://chat.example.org")
        );
        assert_eq!(
            parse_origin("http://h:8080").as_deref(),
            Ok("http://h:8080")
        );
        for bad in [
            "chat.example.org",
            "ftp://h",
            "https://h/path",
            "https://",
            "null",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_match_only_exactly_and_never_empty() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
        assert!(!token_matches("", ""));
        assert_eq!(
            form_field(b"name=a&csrf=00ff&password=x", "csrf"),
            Some("00ff")
        );
        assert_eq!(form_field(b"name=a", "csrf"), None);
    }
}
