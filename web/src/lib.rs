//! `agora-web`: Agora in the browser. An HTTP gateway (axum on tokio) that serves the chat
//! page and a WebSocket endpoint, and speaks to the federation as the signed-in person, with
//! that person's CURVE key, through the same client library as user-cli (`agora-common`).
//! docs/WEB.md is normative for its HTTP routes and WebSocket protocol.
//!
//! # Personal mode (the default)
//! The gateway acts as one user whose key pair it loads from the usual key directory. It
//! listens on loopback and prints a URL with a one-time random token, as Jupyter does:
//! `http://127.0.0.1:PORT/?token=T`. The first request with the token gets a session cookie
//! (`HttpOnly; SameSite=Strict`) and is redirected to `/`; the token is then spent. A link
//! works for a few minutes (`--link-ttl`); `agora-web link` asks the running gateway for a
//! new one over its local socket ([`link`]). Every other request without the session cookie
//! is answered `401`, which names that command.
//!
//! # Hosted mode
//! People sign in with an account name and password ([`accounts`], Argon2id); the gateway
//! keeps each account's key pair. Sign-in is rate-limited ([`auth::SignInLimiter`]).
//!
//! # Layout
//! - [`auth`]: tokens, sessions, the sign-in limiter.
//! - [`accounts`]: hosted accounts on disk.
//! - [`bridge`]: one thread per WebSocket session owning that session's ZeroMQ sockets.
//! - [`files`]: attachments over HTTP.
//! - [`guard`]: the Origin, Sec-Fetch-Site and CSRF-token checks (a middleware).
//! - [`limits`]: caps on connections and WebSockets, per address, per identity and in all.
//! - [`link`]: personal mode's local socket that hands out new sign-in links.
//! - [`wire`]: the WebSocket protocol's JSON messages.

pub mod accounts;
pub mod auth;
pub mod bridge;
pub mod files;
pub mod guard;
pub mod hub;
pub mod limits;
pub mod link;
pub mod live;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use futures_util::StreamExt;

use crate::bridge::Identity;

/// The page, embedded: no build step at install time.
const INDEX_HTML: &str = include_str!("../assets/index.html");
/// The page's script and style (nothing inline: the CSP forbids it).
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
/// Hosted mode's sign-in page; `{{message}}` and `{{signup}}` are filled in.
const SIGNIN_HTML: &str = include_str!("../assets/signin.html");
const SIGNIN_CSS: &str = include_str!("../assets/signin.css");

/// Content-Security-Policy of every page: scripts and styles only from this origin, nothing
/// inline, no plugins, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

/// RFC 8187's `attr-char` (what a `filename*` value keeps as it is); every other byte is
/// percent-encoded.
const ATTR_CHAR: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// The largest WebSocket request a client may send: 64 KiB. A larger one (up to
/// [`WS_READ_LIMIT_BYTES`]) is answered `too_large` and the session goes on.
pub const MAX_WS_MESSAGE_BYTES: usize = 64 << 10;

/// A WebSocket's read buffer to start with: 4 KiB (it grows for a larger frame).
pub const WS_READ_BUFFER_BYTES: usize = 4 << 10;

/// The largest WebSocket message or frame the gateway reads at all: 1 MiB. Past it the
/// session is closed with code 1009 ("message too big", RFC 6455 §7.4.1).
pub const WS_READ_LIMIT_BYTES: usize = 1 << 20;

/// The largest `POST /signin` or `/signup` body: 4 KiB (a name of at most 32 bytes, a
/// password of at most 1,024, a form token); a larger one is answered `413` unread.
pub const SIGN_IN_BODY_BYTES: usize = 4 << 10;

/// Hosted mode's parts.
#[derive(Debug)]
pub struct Hosted {
    /// The accounts.
    pub accounts: accounts::Accounts,
    /// Sign-in attempts allowed.
    pub limiter: auth::SignInLimiter,
    /// Whether anyone may make an account (`--open-signup`).
    pub open_signup: bool,
    /// Served over TLS: the sign-in form's cookie gets `Secure`, as the session's does.
    pub tls: bool,
}

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The sessions (and personal mode's token).
    pub sessions: Arc<auth::Sessions>,
    /// How a session reaches the federation.
    pub federation: Arc<bridge::Federation>,
    /// Hosted mode's accounts; `None` in personal mode.
    pub hosted: Option<Arc<Hosted>>,
    /// Served over TLS (cookies get `Secure`).
    pub tls: bool,
    /// Personal mode: the command that prints a new sign-in link (`agora-web link`, with
    /// the `--link-socket` it needs), named on the `401` page; `None` in hosted mode.
    pub link_command: Option<Arc<str>>,
    /// Where uploads wait while they are hashed and sent.
    pub spool: Arc<std::path::PathBuf>,
    /// Every identity's live feed.
    pub hub: Arc<hub::Hub>,
    /// Open WebSockets allowed: `--max-websockets` in all (past them an upgrade is `503`),
    /// and per identity and per client address (`429`).
    pub websockets: Arc<limits::WebSocketCaps>,
    /// The origins besides its own the gateway acts for (`--origin`), see [`guard`].
    pub origins: Arc<guard::Origins>,
    /// The largest upload, in bytes (`--max-upload-bytes`, default 4 GiB as a node's
    /// `--max-file-bytes`); a larger one is `413 too_large` before or while it is spooled.
    pub max_upload_bytes: u64,
    /// Uploads in progress, bounded per identity (`--max-uploads-per-user`), per client
    /// address (`--max-uploads-per-address`) and in spooled bytes (`--max-spool-bytes`).
    pub uploads: Arc<files::Uploads>,
    /// Downloads in progress, bounded per identity (`--max-downloads-per-user`) and per
    /// client address (`--max-downloads-per-address`), and how long one waits for a client
    /// that stopped reading (`--download-stall-timeout`).
    pub downloads: Arc<limits::DownloadCaps>,
}

/// The gateway's routes (docs/WEB.md): `/` (the page, or hosted mode's sign-in page),
/// `/app.js`, `/app.css`, `/ws`, `POST /signin`, `POST /signup`, `POST /signout`,
/// `POST /files/GROUP`, `GET /files/GROUP/SEQ`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/app.css", get(app_css))
        .route("/ws", get(ws))
        .route(
            "/signin",
            post(sign_in).layer(DefaultBodyLimit::max(SIGN_IN_BODY_BYTES)),
        )
        .route("/signin.css", get(signin_css))
        .route(
            "/signup",
            post(sign_up).layer(DefaultBodyLimit::max(SIGN_IN_BODY_BYTES)),
        )
        .route("/signout", post(sign_out))
        .route(
            "/files/{group}",
            post(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/files/{group}/{seq}", get(download))
        // Before every handler: cross-origin requests that act are refused (guard.rs).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::protect,
        ))
        // On every response, the guard's refusals included: other origins cannot read it.
        .layer(axum::middleware::map_response(same_origin_only))
        .with_state(state)
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// `401` without a live session: in personal mode it says how to get a new sign-in link
/// (the exact command), in hosted mode to sign in.
fn unauthorized(state: &AppState) -> Response {
    let body = match &state.link_command {
        Some(command) => {
            let ttl = state
                .sessions
                .link_ttl()
                .map(|t| humantime::format_duration(t).to_string())
                .unwrap_or_default();
            format!(
                "401: not signed in. A sign-in link works once, within {ttl} of being made; \
                 this one was used already, has expired or is wrong, or the session ended.\n\n\
                 For a new link, run this where agora-web runs, as the same user:\n\n    \
                 {command}\n\nand open the URL it prints.\n"
            )
        }
        None => "401: not signed in: sign in on the gateway's page, /\n".to_owned(),
    };
    text(StatusCode::UNAUTHORIZED, body)
}

/// `Cross-Origin-Resource-Policy: same-origin` (Fetch §3.2), on every response
/// (`same_origin_only`): a page on another port of the same host is same site, so its
/// `<img>`, `<script>` or `no-cors` fetch carries the session cookie; with this header the
/// browser withholds the response from it (no probing whether a file loads or how large it
/// is, no running app.js or reading a download as a script).
pub const CORP: (header::HeaderName, &str) = (
    header::HeaderName::from_static("cross-origin-resource-policy"),
    "same-origin",
);

/// Adds [`CORP`] to a response (a middleware over every route).
async fn same_origin_only(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(CORP.0, header::HeaderValue::from_static(CORP.1));
    response
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Hosted mode's sign-in page with `message` (fixed texts of ours, never input), and a
/// fresh form token: in the cookie [`guard::FORM_COOKIE`] and the form's hidden field (the
/// guard wants both, equal, on `POST /signin` and `/signup`).
fn sign_in_page(hosted: &Hosted, status: StatusCode, message: &str) -> Response {
    sign_in_page_with(hosted, status, message, None)
}

/// [`sign_in_page`], keeping `form_token` (the request's own [`guard::FORM_COOKIE`]) when
/// it is one of ours (64 hex digits): two sign-in tabs then share one token, and the first
/// one's form still posts.
fn sign_in_page_with(
    hosted: &Hosted,
    status: StatusCode,
    message: &str,
    form_token: Option<&str>,
) -> Response {
    let signup = if hosted.open_signup {
        r#"<button formaction="/signup" id="signup">Make this account</button>"#
    } else {
        ""
    };
    let kept = form_token.filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()));
    let token = match kept {
        Some(t) => t.to_owned(),
        None => match auth::random_hex() {
            Ok(t) => t,
            Err(_) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "500: no randomness for the form token\n".into(),
                )
            }
        },
    };
    let mut page = html(
        status,
        SIGNIN_HTML
            .replace("{{message}}", message)
            .replace("{{signup}}", signup)
            .replace("{{csrf}}", &token),
    );
    // `Secure` over TLS, as the session's cookie: a plain-HTTP page on the same host cannot
    // set or read it then.
    let secure = if hosted.tls { "; Secure" } else { "" };
    let cookie = format!(
        "{}={token}; HttpOnly; SameSite=Strict; Path=/{secure}",
        guard::FORM_COOKIE
    );
    if let Ok(value) = cookie.parse() {
        page.headers_mut().insert(header::SET_COOKIE, value);
    }
    page
}

fn signed_in(state: &AppState, identity: Identity) -> Response {
    match state.sessions.open(Arc::new(identity)) {
        Some(session) => (
            [(header::SET_COOKIE, auth::cookie(&session, state.tls))],
            Redirect::to("/"),
        )
            .into_response(),
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "503: no session could be made (no randomness); try later\n".into(),
        ),
    }
}

async fn index(
    State(state): State<AppState>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    if let (Some(token), None) = (q.token, &state.hosted) {
        // A link opened again in a browser that is signed in already: the page, without the
        // token in the address bar (the token is left alone).
        if state.sessions.session(&headers).is_some() {
            return Redirect::to("/").into_response();
        }
        return match state.sessions.redeem(&token) {
            Some(session) => (
                [(header::SET_COOKIE, auth::cookie(&session, state.tls))],
                Redirect::to("/"),
            )
                .into_response(),
            None => unauthorized(&state),
        };
    }
    if let Some(session) = state.sessions.session(&headers) {
        // The session's CSRF token, for the page to send with what it posts (guard.rs).
        return html(
            StatusCode::OK,
            INDEX_HTML.replace("{{csrf}}", &session.csrf),
        );
    }
    match &state.hosted {
        Some(hosted) => sign_in_page_with(
            hosted,
            StatusCode::OK,
            "",
            auth::cookie_value(&headers, guard::FORM_COOKIE),
        ),
        None => unauthorized(&state),
    }
}

/// The sign-in form's fields.
#[derive(serde::Deserialize)]
struct Credentials {
    name: String,
    password: String,
}

async fn sign_in(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<Credentials>,
) -> Response {
    let Some(hosted) = state.hosted.clone() else {
        return text(
            StatusCode::NOT_FOUND,
            "404: personal mode has no sign-in\n".into(),
        );
    };
    // The name is a name before anything keys on it (the form is at most
    // SIGN_IN_BODY_BYTES); then the address's limit, then the address and name's.
    let Ok(name) = form.name.parse::<agora_proto::wire::UserName>() else {
        return sign_in_page(&hosted, StatusCode::BAD_REQUEST, &bad_name());
    };
    if let Some(refused) = limited(&hosted, peer, &name) {
        return refused;
    }
    let checked = {
        let hosted = Arc::clone(&hosted);
        let federation = Arc::clone(&state.federation);
        tokio::task::spawn_blocking(move || {
            let identity = hosted.accounts.verify(&name, &form.password)?;
            // The account's key is registered at its first sign-in (a repeat changes
            // nothing); a registry that does not answer now is asked again next time, one
            // that binds the name to another key refuses the account.
            match register_account(&federation, &identity) {
                Ok(()) => {}
                Err(e @ accounts::AccountError::Taken(_)) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "sign-in without registration"),
            }
            Ok::<_, accounts::AccountError>(identity)
        })
        .await
    };
    match checked {
        Ok(Ok(identity)) => signed_in(&state, identity),
        Ok(Err(accounts::AccountError::WrongPassword)) => {
            tracing::info!(peer = %peer, "sign-in refused");
            sign_in_page(&hosted, StatusCode::UNAUTHORIZED, "Wrong name or password.")
        }
        Ok(Err(e @ accounts::AccountError::Taken(_))) => {
            tracing::warn!(peer = %peer, error = %e, "sign-in refused");
            sign_in_page(&hosted, StatusCode::FORBIDDEN, TAKEN)
        }
        Ok(Err(accounts::AccountError::Busy)) => busy(&hosted),
        Ok(Err(e)) => failed(
            &hosted,
            "sign-in",
            &e,
            "The gateway could not read the account.",
        ),
        Err(e) => failed(&hosted, "sign-in", &e, "Try again."),
    }
}

/// The sign-in page's answer to a name that is not one.
fn bad_name() -> String {
    format!(
        "A name is 1 to {} letters, digits, '.', '_' or '-'.",
        agora_proto::wire::MAX_USER_NAME_BYTES
    )
}
/// The sign-in page's answer to a name the registry binds to another key.
const TAKEN: &str = "That name belongs to another key on the federation: pick another.";

/// `503` when every password check's place in the queue is taken
/// ([`accounts::HASH_QUEUE`]).
fn busy(hosted: &Hosted) -> Response {
    tracing::warn!("sign-in refused: the password checks' queue is full");
    sign_in_page(
        hosted,
        StatusCode::SERVICE_UNAVAILABLE,
        "The gateway is busy: try again in a moment.",
    )
}

/// `429` when [`auth::SignInLimiter`] refuses one more attempt from `peer` for `name`.
fn limited(
    hosted: &Hosted,
    peer: SocketAddr,
    name: &agora_proto::wire::UserName,
) -> Option<Response> {
    match hosted.limiter.check(peer.ip(), name) {
        auth::Verdict::Allowed => None,
        verdict => {
            tracing::warn!(peer = %peer.ip(), ?verdict, "sign-in rate-limited");
            Some(sign_in_page(
                hosted,
                StatusCode::TOO_MANY_REQUESTS,
                "Too many attempts: wait a minute.",
            ))
        }
    }
}

/// Registers `identity`'s name and key with the registry (PROTOCOL §4.4), for an account.
///
/// # Errors
/// [`accounts::AccountError::Taken`] when the registry binds the name to another key
/// (`name_taken`); [`accounts::AccountError::Registry`] for any other failure.
fn register_account(
    federation: &bridge::Federation,
    identity: &Identity,
) -> Result<(), accounts::AccountError> {
    match federation
        .registry_client(federation.contexts.take().context(), identity)
        .user_register(&identity.user)
    {
        Ok(_) => Ok(()),
        Err(agora_common::client::ClientError::Server(w))
            if w.code == agora_proto::wire::ErrorCode::NameTaken =>
        {
            Err(accounts::AccountError::Taken(identity.user.clone()))
        }
        Err(e) => Err(accounts::AccountError::Registry(format!(
            "registering {} with the registry: {e}",
            identity.user
        ))),
    }
}

/// The sign-in page after the gateway itself failed `what` (logged with `error`).
fn failed(hosted: &Hosted, what: &str, error: &dyn std::fmt::Display, message: &str) -> Response {
    tracing::error!(error = %error, what, "account operation failed");
    sign_in_page(hosted, StatusCode::INTERNAL_SERVER_ERROR, message)
}

async fn sign_up(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<Credentials>,
) -> Response {
    let Some(hosted) = state.hosted.clone().filter(|h| h.open_signup) else {
        return text(StatusCode::FORBIDDEN, "403: sign-up is closed\n".into());
    };
    let Ok(name) = form.name.parse::<agora_proto::wire::UserName>() else {
        return sign_in_page(&hosted, StatusCode::BAD_REQUEST, &bad_name());
    };
    if let Some(refused) = limited(&hosted, peer, &name) {
        return refused;
    }
    let federation = Arc::clone(&state.federation);
    let made = {
        let hosted = Arc::clone(&hosted);
        // The registry first: nothing is kept unless it binds the name to the new key.
        tokio::task::spawn_blocking(move || {
            hosted.accounts.sign_up(&name, &form.password, |identity| {
                register_account(&federation, identity)
            })
        })
        .await
    };
    match made {
        Ok(Ok(identity)) => signed_in(&state, identity),
        Ok(Err(accounts::AccountError::Exists(_))) => {
            sign_in_page(&hosted, StatusCode::CONFLICT, "That name is taken.")
        }
        Ok(Err(e @ accounts::AccountError::Taken(_))) => {
            tracing::info!(peer = %peer, error = %e, "sign-up refused");
            sign_in_page(&hosted, StatusCode::CONFLICT, TAKEN)
        }
        Ok(Err(e @ accounts::AccountError::Registry(_))) => {
            tracing::warn!(error = %e, "sign-up without a registry");
            sign_in_page(
                &hosted,
                StatusCode::SERVICE_UNAVAILABLE,
                "The registry did not answer; nothing was made. Try again.",
            )
        }
        Ok(Err(accounts::AccountError::BadPassword)) => sign_in_page(
            &hosted,
            StatusCode::BAD_REQUEST,
            "A password has at least 8 characters other than spaces.",
        ),
        Ok(Err(accounts::AccountError::Busy)) => busy(&hosted),
        Ok(Err(e)) => failed(&hosted, "sign-up", &e, "The account could not be made."),
        Err(e) => failed(&hosted, "sign-up", &e, "Try again."),
    }
}

/// Registers `identity`'s name and key with the registry (PROTOCOL §4.4); a repeat changes
/// nothing.
///
/// # Errors
/// The registry's refusal (such as `name_taken` by another key), as text.
pub fn register(federation: &bridge::Federation, identity: &Identity) -> Result<(), String> {
    federation
        .registry_client(federation.contexts.take().context(), identity)
        .user_register(&identity.user)
        .map(|_| ())
        .map_err(|e| format!("registering {} with the registry: {e}", identity.user))
}

/// `POST /signout` (same-origin, with the session's token: guard.rs): ends the session on the
/// server, which closes its WebSockets, and clears the cookie.
async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> Response {
    state.sessions.close(&headers);
    (
        [(header::SET_COOKIE, auth::cleared_cookie())],
        Redirect::to("/"),
    )
        .into_response()
}

/// The sign-in page's style: public, it holds nothing of anyone's.
async fn signin_css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        SIGNIN_CSS,
    )
        .into_response()
}

async fn app_js(State(state): State<AppState>, headers: HeaderMap) -> Response {
    asset(&state, &headers, "text/javascript; charset=utf-8", APP_JS)
}

async fn app_css(State(state): State<AppState>, headers: HeaderMap) -> Response {
    asset(&state, &headers, "text/css; charset=utf-8", APP_CSS)
}

/// An embedded file, for a live session only.
fn asset(
    state: &AppState,
    headers: &HeaderMap,
    content_type: &'static str,
    body: &'static str,
) -> Response {
    if state.sessions.identity(headers).is_none() {
        return unauthorized(state);
    }
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `GET /ws` (its Origin checked by guard.rs): a session's WebSocket, within the caps per
/// identity and per address (`429`) and in all (`503`).
async fn ws(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // The session first: without one, nothing is said about the endpoint.
    let Some(found) = state.sessions.session(&headers) else {
        return unauthorized(&state);
    };
    let (identity, ended) = (found.identity, found.ended);
    let permit = match state.websockets.take(&identity.user, peer.ip()) {
        Ok(permit) => permit,
        Err(refused) => {
            tracing::warn!(user = %identity.user, peer = %peer.ip(), ?refused, "WebSocket refused");
            return match refused {
                limits::WebSocketRefusal::Total => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503: too many open pages on this gateway; try later\n".into(),
                ),
                limits::WebSocketRefusal::Identity => text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "429: too many open pages for this account; close one\n".into(),
                ),
                limits::WebSocketRefusal::Address => text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "429: too many open pages from this address; close one\n".into(),
                ),
            };
        }
    };
    match upgrade {
        Ok(upgrade) => upgrade
            .max_message_size(WS_READ_LIMIT_BYTES)
            .max_frame_size(WS_READ_LIMIT_BYTES)
            // Grows for a large frame; 4 KiB keeps an idle session small (the default,
            // 128 KiB, is zero-filled before each read).
            .read_buffer_size(WS_READ_BUFFER_BYTES)
            .on_upgrade(move |socket| async move {
                session(socket, state, identity, ended).await;
                drop(permit);
            }),
        Err(rejection) => rejection.into_response(),
    }
}

/// One WebSocket session: each text message is a request ([`wire::Request`]), answered in
/// order (by the session's bridge thread, or here for `follow` and `unfollow`). A bad message
/// gets an error reply; the session goes on. Events (its groups' entries from the hub, its
/// inbox's direct messages) go out between replies, through one bounded queue. When the
/// HTTP session ends (`ended` fails: signed out, expired, evicted) the WebSocket is closed
/// with code 1008 ("policy violation", RFC 6455 §7.4.1).
async fn session(
    mut socket: WebSocket,
    state: AppState,
    identity: Arc<Identity>,
    mut ended: tokio::sync::watch::Receiver<()>,
) {
    let (events, mut outgoing) = tokio::sync::mpsc::channel(bridge::EVENT_QUEUE);
    let bridge = match bridge::Session::start(&state.federation, &identity, events.clone()) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "could not start a session's bridge");
            return;
        }
    };
    let mut following: std::collections::HashMap<
        agora_proto::wire::GroupName,
        tokio::task::JoinHandle<()>,
    > = std::collections::HashMap::new();
    loop {
        let message = tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    // Past the read limit, or not WebSocket at all: say why, then close.
                    let text = e.to_string();
                    let code = if text.contains("too long") || text.contains("Space limit") {
                        axum::extract::ws::close_code::SIZE
                    } else {
                        axum::extract::ws::close_code::PROTOCOL
                    };
                    tracing::info!(error = %text, "closing a WebSocket");
                    let reason = format!("at most {MAX_WS_MESSAGE_BYTES} bytes per message");
                    let _ = socket
                        .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    break;
                }
                None => break,
            },
            Some(event) = outgoing.recv() => {
                if socket.send(Message::Text(event)).await.is_err() {
                    break;
                }
                continue;
            }
            Err(_) = ended.changed() => {
                tracing::info!(user = %identity.user, "session ended: closing its WebSocket");
                let _ = socket
                    .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                        code: axum::extract::ws::close_code::POLICY,
                        reason: "signed out".into(),
                    })))
                    .await;
                break;
            }
        };
        let reply = match message {
            Message::Text(text) if text.len() > MAX_WS_MESSAGE_BYTES => wire::Reply::error(
                None,
                "too_large",
                &format!(
                    "{} bytes: at most {MAX_WS_MESSAGE_BYTES} per message",
                    text.len()
                ),
            ),
            Message::Text(text) => match serde_json::from_str::<wire::Request>(text.as_str()) {
                Ok(wire::Request::Follow { group, after_seq }) => {
                    if let Some(old) = following.remove(&group) {
                        old.abort();
                    }
                    match bridge.lookup(group.clone()).await {
                        Err(reply) => reply,
                        Ok(entry) => match state.hub.follow(
                            &state.federation,
                            &identity,
                            &group,
                            entry.endpoint.as_str(),
                            entry.public_key,
                        ) {
                            Ok((receiver, subscribed)) => {
                                let forwarder = live::Forwarder {
                                    hub: Arc::clone(&state.hub),
                                    identity: Arc::clone(&identity),
                                    bridge: bridge.clone(),
                                    group: group.clone(),
                                    out: events.clone(),
                                };
                                following.insert(
                                    group.clone(),
                                    tokio::spawn(forwarder.run(receiver, subscribed, after_seq)),
                                );
                                wire::Reply::ok("follow", serde_json::json!({ "group": group }))
                            }
                            Err(e) => wire::Reply::error(
                                Some("follow"),
                                "internal",
                                &format!("the live feed did not start: {e}"),
                            ),
                        },
                    }
                }
                Ok(wire::Request::Unfollow { group }) => {
                    if let Some(old) = following.remove(&group) {
                        old.abort();
                    }
                    wire::Reply::ok("unfollow", serde_json::json!({ "group": group }))
                }
                Ok(request) => bridge.call(request).await,
                Err(e) => wire::Reply::error(None, "invalid_json", &e.to_string()),
            },
            Message::Binary(_) => {
                wire::Reply::error(None, "invalid_json", "send JSON text messages")
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let text = serde_json::to_string(&reply).unwrap_or_default();
        if socket.send(Message::Text(text.into())).await.is_err() {
            break;
        }
    }
    for (_, forwarder) in following {
        forwarder.abort();
    }
}

/// `POST /files/GROUP`'s query.
#[derive(serde::Deserialize)]
struct UploadQuery {
    name: String,
    #[serde(rename = "type", default)]
    media_type: Option<String>,
    #[serde(default)]
    caption: Option<String>,
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"ok": false, "error": code, "message": message})),
    )
        .into_response()
}

fn file_error(e: &files::FileError) -> Response {
    let status = match e.code() {
        "not_member" | "forbidden" | "not_invited" | "banned" => StatusCode::FORBIDDEN,
        "not_found" | "unknown_group" => StatusCode::NOT_FOUND,
        "invalid_field" => StatusCode::BAD_REQUEST,
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    json_error(status, e.code(), &e.to_string())
}

/// Who asks about which group, for the file routes: `401` without a session, `400
/// invalid_field` for a group name that is not one.
fn caller(
    state: &AppState,
    headers: &HeaderMap,
    group: &str,
) -> Result<(Arc<Identity>, agora_proto::wire::GroupName), Box<Response>> {
    let identity = state
        .sessions
        .identity(headers)
        .ok_or_else(|| Box::new(unauthorized(state)))?;
    let group = group.parse().map_err(|_| {
        Box::new(json_error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "group: not a name",
        ))
    })?;
    Ok((identity, group))
}

async fn upload(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(group): Path<String>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (identity, group) = match caller(&state, &headers, &group) {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("at most {} bytes per file", state.max_upload_bytes),
        )
    };
    let spool_full = || {
        json_error(
            StatusCode::INSUFFICIENT_STORAGE,
            "limit_reached",
            "the gateway's upload spool is full; try later",
        )
    };
    if declared.is_some_and(|n| n > state.max_upload_bytes) {
        return too_large();
    }
    // Nothing of the body is read before the caller holds one of its upload slots and the
    // group's node counts it as a member.
    let mut slot = match state.uploads.start(&identity.user, peer.ip()) {
        Ok(slot) => slot,
        Err(_) => {
            return json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "limit_reached",
                "too many uploads in progress; wait for one to finish",
            )
        }
    };
    let checked = {
        let (federation, identity, group) = (
            Arc::clone(&state.federation),
            Arc::clone(&identity),
            group.clone(),
        );
        tokio::task::spawn_blocking(move || files::check_member(&federation, &identity, &group))
            .await
    };
    match checked {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return file_error(&e),
        Err(e) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            )
        }
    }
    if declared.is_some_and(|n| slot.hold(n).is_err()) {
        return spool_full();
    }
    // The body to a spool file, a frame at a time: memory stays bounded whatever the size.
    let spooled = tempfile::tempfile_in(state.spool.as_path()).map(tokio::fs::File::from_std);
    let mut spool = match spooled {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "no spool file");
            return json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no spool");
        }
    };
    let mut stream = body.into_data_stream();
    let mut spooled = 0u64;
    while let Some(frame) = stream.next().await {
        let written = match frame {
            Ok(bytes) => {
                spooled += bytes.len() as u64;
                if spooled > state.max_upload_bytes {
                    return too_large();
                }
                if slot.hold(spooled).is_err() {
                    return spool_full();
                }
                tokio::io::AsyncWriteExt::write_all(&mut spool, &bytes).await
            }
            Err(e) => return json_error(StatusCode::BAD_REQUEST, "invalid_field", &e.to_string()),
        };
        if let Err(e) = written {
            tracing::error!(error = %e, "spooling an upload failed");
            return json_error(StatusCode::INSUFFICIENT_STORAGE, "internal", "spool full");
        }
    }
    let mut spool = spool.into_std().await;
    let federation = Arc::clone(&state.federation);
    let media_type = q
        .media_type
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "application/octet-stream".into());
    let sent = tokio::task::spawn_blocking(move || {
        let sent = files::put(
            &federation,
            &identity,
            &group,
            &mut spool,
            q.name,
            media_type,
            q.caption,
        );
        // The slot (and its spool bytes) is free once the node has the file.
        drop(slot);
        sent
    })
    .await;
    match sent {
        Ok(Ok(ack)) => axum::Json(serde_json::json!({"ok": true, "ack": ack})).into_response(),
        Ok(Err(e)) => file_error(&e),
        Err(e) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    }
}

/// Sends `item` to a download's body from its blocking thread, waiting at most `stall` for
/// the client to make room.
///
/// # Errors
/// `BrokenPipe` when the client is gone, `TimedOut` when it took nothing for `stall`: the
/// download ends either way (and its thread and slots are free).
fn send_within(
    runtime: &tokio::runtime::Handle,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    item: std::io::Result<Vec<u8>>,
    stall: std::time::Duration,
) -> std::io::Result<()> {
    match runtime.block_on(tokio::time::timeout(stall, tx.send(item))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(std::io::ErrorKind::BrokenPipe.into()),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took nothing for --download-stall-timeout",
        )),
    }
}

async fn download(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((group, seq)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Response {
    let (identity, group) = match caller(&state, &headers, &group) {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    // Held until the last range is sent or the download ends (in the sending thread).
    let Some(slots) = state.downloads.take(&identity.user, peer.ip()) else {
        tracing::warn!(user = %identity.user, peer = %peer.ip(), "download refused: too many in progress");
        return json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "limit_reached",
            "too many downloads in progress; wait for one to finish",
        );
    };
    let federation = Arc::clone(&state.federation);
    let found = {
        let federation = Arc::clone(&federation);
        tokio::task::spawn_blocking(move || files::find(&federation, &identity, &group, seq)).await
    };
    let (attachment, target) = match found {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return file_error(&e),
        Err(e) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            )
        }
    };
    // Ranges flow through a small queue: the node is read as fast as the browser takes them,
    // and a browser that takes nothing for the stall timeout loses the download.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let meta = attachment.clone();
    let (runtime, stall) = (tokio::runtime::Handle::current(), state.downloads.stall);
    tokio::task::spawn_blocking(move || {
        let sent = files::get(&federation, &target, &meta, |bytes| {
            send_within(&runtime, &tx, Ok(bytes.to_vec()), stall)
        });
        if let Err(e) = sent {
            tracing::warn!(error = %e, "download failed");
            let _ = tx.try_send(Err(std::io::Error::other(e.to_string())));
        }
        drop(slots);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let inline = files::INLINE_TYPES.contains(&attachment.media_type.as_str());
    let content_type = if inline {
        attachment.media_type.clone()
    } else {
        "application/octet-stream".to_owned()
    };
    // The name goes in RFC 6266's `filename*` (RFC 8187 percent-encoding).
    let disposition = format!(
        "{}; filename*=UTF-8''{}",
        if inline { "inline" } else { "attachment" },
        percent_encoding::utf8_percent_encode(&attachment.name, ATTR_CHAR)
    );
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_LENGTH, attachment.size.to_string()),
        (header::CONTENT_DISPOSITION, disposition),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; sandbox".to_owned(),
        ),
    ] {
        if let Ok(value) = value.parse() {
            h.insert(name, value);
        }
    }
    response
}
