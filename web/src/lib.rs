//! `agora-web`: Agora in the browser. An HTTP gateway (axum on tokio) that serves the chat
//! page and a WebSocket endpoint, and speaks to the federation as the signed-in person, with
//! that person's CURVE key, through the same client library as user-cli (`agora-common`).
//!
//! # Personal mode (the default)
//! The gateway acts as one user whose key pair it loads from the usual key directory. It
//! listens on loopback and prints a URL with a one-time random token, as Jupyter does:
//! `http://127.0.0.1:PORT/?token=T`. The first request with the token gets a session cookie
//! (`HttpOnly; SameSite=Strict`) and is redirected to `/`; the token is then spent. Every
//! other request without the session cookie is answered `401`.
//!
//! # Layout
//! - [`auth`]: the token and the sessions.
//! - [`bridge`]: one thread per WebSocket session owning that session's ZeroMQ sockets.
//! - [`wire`]: the WebSocket protocol's JSON messages (docs/WEB.md).

pub mod auth;
pub mod bridge;
pub mod wire;

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// The page, embedded: no build step at install time.
const INDEX_HTML: &str = include_str!("../assets/index.html");
/// The page's script and style (nothing inline: the CSP forbids it).
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// Content-Security-Policy of the page: scripts and styles only from this origin, nothing
/// inline, no plugins, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; \
     base-uri 'none'";

/// The largest WebSocket message a client may send: 64 KiB.
pub const MAX_WS_MESSAGE_BYTES: usize = 64 << 10;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The token and the sessions.
    pub auth: Arc<auth::Auth>,
    /// How a session reaches the federation.
    pub federation: Arc<bridge::Federation>,
}

/// The gateway's routes: `/` (the page), `/app.js`, `/app.css`, `/ws` (the WebSocket).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/app.css", get(app_css))
        .route("/ws", get(ws))
        .with_state(state)
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "401: open the URL agora-web printed (it carries the token)\n",
    )
        .into_response()
}

async fn index(
    State(state): State<AppState>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(token) = q.token {
        return match state.auth.redeem(&token) {
            Some(session) => (
                [(header::SET_COOKIE, auth::cookie(&session))],
                Redirect::to("/"),
            )
                .into_response(),
            None => unauthorized(),
        };
    }
    if !state.auth.has_session(&headers) {
        return unauthorized();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        INDEX_HTML,
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
    if !state.auth.has_session(headers) {
        return unauthorized();
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

async fn ws(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // The session first: without one, nothing is said about the endpoint.
    if !state.auth.has_session(&headers) {
        return unauthorized();
    }
    match upgrade {
        Ok(upgrade) => upgrade
            .max_message_size(MAX_WS_MESSAGE_BYTES)
            .on_upgrade(move |socket| session(socket, state)),
        Err(rejection) => rejection.into_response(),
    }
}

/// One WebSocket session: each text message is a request ([`wire::Request`]), answered in
/// order by the session's bridge thread. A bad message gets an error reply; the session goes
/// on.
async fn session(mut socket: WebSocket, state: AppState) {
    let (mut bridge, mut events) = match bridge::Session::start(&state.federation) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "could not start a session's bridge");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(message)) => message,
                _ => break,
            },
            Some(event) = events.recv() => {
                if socket.send(Message::Text(event.into())).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let reply = match message {
            Message::Text(text) => match serde_json::from_str::<wire::Request>(text.as_str()) {
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
}
