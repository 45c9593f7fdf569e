//! Metrics and health for operators: the servers' counters in the Prometheus text format
//! (the `prometheus` crate's default registry) and `/healthz`, over HTTP (`tiny_http`) on
//! `--metrics ADDR`, which is off unless given.
//!
//! # Endpoints
//! - `GET /metrics`: every metric, Prometheus text exposition format 0.0.4.
//! - `GET /healthz`: `200 serving` while the server serves, `503 draining` once it stops
//!   (a `stop`, SIGINT or SIGTERM) until it exits.
//!
//! Anything else is `404`. The metrics are process-wide statics, as the `prometheus` crate
//! has them: one server per process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use agora_proto::wire::ErrorCode;
use prometheus::{
    register_histogram, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
};

static DRAINING: AtomicBool = AtomicBool::new(false);

/// Requests answered, by action (`invalid` for one that could not be decoded) and by code
/// (`ok`, or the error code).
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "agora_requests_total",
        "Requests answered, by action and by code (ok or the error code).",
        &["action", "code"]
    )
    .unwrap_or_else(|e| unreachable!("a fixed, valid metric: {e}"))
});

/// Requests committed per batch (group commit), node only.
pub static COMMIT_BATCH: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "agora_commit_batch_size",
        "Requests committed together in one batch (group commit).",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
    )
    .unwrap_or_else(|e| unreachable!("a fixed, valid metric: {e}"))
});

/// Time each `fdatasync` of the log's WAL took, in seconds, node only.
pub static FSYNC_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "agora_fsync_seconds",
        "Time one fdatasync of the log's write-ahead log took.",
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
    )
    .unwrap_or_else(|e| unreachable!("a fixed, valid metric: {e}"))
});

/// A gauge of this process, by name and help text; registered on first use.
fn gauge(name: &str, help: &str) -> IntGauge {
    register_int_gauge!(name, help).unwrap_or_else(|e| unreachable!("a fixed, valid metric: {e}"))
}

/// The log's last seq, node only.
pub static LAST_SEQ: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("agora_log_last_seq", "The seq of the log's newest entry."));

/// The log's size on disk in bytes (the SQLite database and its WAL), node only.
pub static LOG_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "agora_log_bytes",
        "Bytes of the log on disk: the SQLite database and its write-ahead log.",
    )
});

/// Live subscriptions, node only.
pub static SUBSCRIBERS: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("agora_subscribers", "Live subscriptions to the log."));

/// Pushes to subscribers, by outcome: `sent`, `dropped` (a full queue; the subscriber
/// backfills from history) and `withheld` (over a push budget; it backfills too).
pub static PUSHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "agora_pushes_total",
        "Pushes to subscribers, by outcome: sent, dropped (full queue) or withheld (over budget); \
         subscribers backfill the last two from history.",
        &["outcome"]
    )
    .unwrap_or_else(|e| unreachable!("a fixed, valid metric: {e}"))
});

/// The groups of a group host (`group-node --host`), by state: `live` (served),
/// `pending` (created, waiting for the registry), `stopped` (`stop {group}`) and
/// `deleted` (archived since the host started); node only. Host-wide: a host carries no
/// per-group series (its groups are unbounded); a node of one has `agora_log_last_seq`.
pub static HOST_GROUPS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "agora_host_groups",
        "Groups of this group host, by state: live, pending, stopped, deleted.",
        &["state"]
    )
    .unwrap_or_else(|e| unreachable!("a fixed, valid metric: {e}"))
});

/// Groups of a group host whose engine and log state are in memory, node only.
pub static HOST_GROUPS_LOADED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "agora_host_groups_loaded",
        "Groups of this group host with their engine and log state in memory.",
    )
});

/// Entries appended to the log, over every group of the node, node only.
pub static LOG_ENTRIES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "agora_log_entries_total",
        "Entries appended to the log, over every group of this node."
    )
    .unwrap_or_else(|e| unreachable!("a fixed, valid metric: {e}"))
});

/// Groups registered, registry only.
pub static GROUPS: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("agora_groups", "Groups in the directory."));

/// Accounts, registry only.
pub static ACCOUNTS: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("agora_accounts", "User accounts."));

/// Direct messages waiting unread in all mailboxes, registry only.
pub static MAILBOX_DEPTH: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "agora_mailbox_depth",
        "Direct messages waiting unread, over all mailboxes.",
    )
});

/// Users by presence (`online`, `away`), registry only.
pub static PRESENCE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "agora_presence",
        "Users with a live session, by presence.",
        &["status"]
    )
    .unwrap_or_else(|e| unreachable!("a fixed, valid metric: {e}"))
});

/// The codes a request that cannot be decoded is counted with, under action `invalid`.
const DECODE_CODES: &[ErrorCode] = &[
    ErrorCode::BadFrames,
    ErrorCode::UnsupportedVersion,
    ErrorCode::InvalidJson,
    ErrorCode::InvalidField,
    ErrorCode::UnknownAction,
];

/// Makes every `agora_requests_total{action, code}` series of `role`'s server exist at 0,
/// before the first request: each of its actions with `ok` and every error code
/// ([`ErrorCode::ALL`]), and `invalid` with the codes of requests that cannot be decoded.
/// A series that appears only at its first increment is missed by `rate()` and shows as
/// "no data" on a dashboard. Called by the servers at start.
pub fn register_requests(role: agora_proto::action::Role) {
    for action in agora_proto::action::Action::ALL {
        if action.role() != role {
            continue;
        }
        REQUESTS.with_label_values(&[action.as_str(), "ok"]);
        for code in ErrorCode::ALL {
            REQUESTS.with_label_values(&[action.as_str(), code.as_str()]);
        }
    }
    for code in DECODE_CODES {
        REQUESTS.with_label_values(&["invalid", code.as_str()]);
    }
}

/// Counts one answered request of `action` (its wire name) that ended with `code` (`None`:
/// `ok`).
pub fn count(action: &str, code: Option<ErrorCode>) {
    REQUESTS
        .with_label_values(&[action, code.map_or("ok", ErrorCode::as_str)])
        .inc();
}

/// Marks the server as draining: `/healthz` answers 503 from now on.
pub fn set_draining() {
    DRAINING.store(true, Ordering::SeqCst);
}

/// Whether [`set_draining`] was called.
pub fn is_draining() -> bool {
    DRAINING.load(Ordering::SeqCst)
}

/// The HTTP server of `/metrics` and `/healthz`, on its own thread; stops when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The metrics HTTP listener, bound but not answering yet: a server binds it before it
/// creates anything (a busy `--metrics` port fails the start with nothing left behind) and
/// starts answering ([`MetricsListener::serve`]) once it serves. Connections that arrive
/// in between wait in the listen queue.
pub struct MetricsListener {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
}

impl std::fmt::Debug for MetricsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsListener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MetricsListener {
    /// Binds `addr`: `IP:PORT`, or a bare `PORT` for loopback (`127.0.0.1:PORT`); port 0
    /// picks one.
    ///
    /// # Errors
    /// Binding `addr` fails (`AddrInUse`, `AddrNotAvailable`, ...).
    pub fn bind(addr: &str) -> std::io::Result<MetricsListener> {
        let addr = match addr.parse::<u16>() {
            Ok(port) => format!("127.0.0.1:{port}"),
            Err(_) => addr.to_owned(),
        };
        let server = Arc::new(tiny_http::Server::http(&addr).map_err(|e| {
            match e.downcast::<std::io::Error>() {
                Ok(io) => *io,
                Err(other) => std::io::Error::other(other.to_string()),
            }
        })?);
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("not an IP address"))?;
        Ok(MetricsListener { server, addr })
    }

    /// A server's `--metrics`: [`MetricsListener::bind`] when `addr` is given, `None`
    /// without it.
    ///
    /// # Errors
    /// One line naming the flag and the address: `--metrics 127.0.0.1:9100: address in use;
    /// choose another port (0 picks a free one)`.
    pub fn bind_flag(addr: Option<&str>) -> std::io::Result<Option<MetricsListener>> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        MetricsListener::bind(addr).map(Some).map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "address in use; choose another port (0 picks a free one)".to_owned()
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    "not an address of this machine; bind one of its addresses".to_owned()
                }
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied; choose a port above 1023".to_owned()
                }
                _ => e.to_string(),
            };
            std::io::Error::new(e.kind(), format!("--metrics {addr}: {why}"))
        })
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts answering `/metrics` and `/healthz`, and logs where (`metrics serving
    /// addr=IP:PORT`).
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn serve(self) -> std::io::Result<MetricsServer> {
        let MetricsListener { server, addr } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || serve(&server, &stop))?
        };
        tracing::info!(%addr, "metrics serving");
        Ok(MetricsServer {
            server,
            stop,
            thread: Some(thread),
            addr,
        })
    }
}

impl MetricsServer {
    /// Serves `/metrics` and `/healthz` on `addr`: `IP:PORT`, or a bare `PORT` for loopback
    /// (`127.0.0.1:PORT`); port 0 picks one.
    ///
    /// # Errors
    /// Binding `addr` fails, or the thread cannot be spawned.
    pub fn start(addr: &str) -> std::io::Result<MetricsServer> {
        MetricsListener::bind(addr)?.serve()
    }

    /// As [`MetricsServer::start`] when `addr` is given (a server's `--metrics`), logging
    /// where it serves (`metrics serving addr=IP:PORT`); `None` without it.
    ///
    /// # Errors
    /// As [`MetricsListener::bind_flag`] and [`MetricsListener::serve`].
    pub fn serve(addr: Option<&str>) -> std::io::Result<Option<MetricsServer>> {
        MetricsListener::bind_flag(addr)?
            .map(MetricsListener::serve)
            .transpose()
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &tiny_http::Server, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let request = match server.recv_timeout(Duration::from_millis(500)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint failed");
                return;
            }
        };
        let get = *request.method() == tiny_http::Method::Get;
        let (status, body, content_type) = match (get, request.url()) {
            (true, "/metrics") => {
                let encoder = prometheus::TextEncoder::new();
                match encoder.encode_to_string(&prometheus::gather()) {
                    Ok(text) => (200, text, prometheus::TEXT_FORMAT),
                    Err(e) => (500, format!("{e}\n"), "text/plain; charset=utf-8"),
                }
            }
            (true, "/healthz") if is_draining() => {
                (503, "draining\n".to_owned(), "text/plain; charset=utf-8")
            }
            (true, "/healthz") => (200, "serving\n".to_owned(), "text/plain; charset=utf-8"),
            _ => (404, "not found\n".to_owned(), "text/plain; charset=utf-8"),
        };
        let mut response = tiny_http::Response::from_string(body).with_status_code(status);
        if let Ok(header) = tiny_http::Header::from_bytes("Content-Type", content_type) {
            response = response.with_header(header);
        }
        if let Err(e) = request.respond(response) {
            tracing::debug!(error = %e, "a metrics client went away");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(url: &str) -> (u16, String) {
        match ureq::get(url).timeout(Duration::from_secs(5)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => panic!("GET {url}: {e}"),
        }
    }

    #[test]
    fn metrics_are_text_and_health_turns_503_when_draining() {
        let server = MetricsServer::start("0").expect("start");
        assert!(
            server.local_addr().ip().is_loopback(),
            "a bare port is loopback"
        );
        let base = format!("http://{}", server.local_addr());
        count("send", None);
        count("send", Some(ErrorCode::NotMember));
        let (status, text) = get(&format!("{base}/metrics"));
        assert_eq!(status, 200);
        assert!(
            text.contains(r#"agora_requests_total{action="send",code="not_member"} 1"#),
            "{text}"
        );
        assert_eq!(get(&format!("{base}/healthz")), (200, "serving\n".into()));
        assert_eq!(get(&format!("{base}/nothing")).0, 404);
        set_draining();
        assert_eq!(get(&format!("{base}/healthz")), (503, "draining\n".into()));
    }
}
