//! `agora-web`: the chat page and its WebSocket gateway.
//!
//! - Personal mode (default): `agora-web --user NAME [--registry-key KEY]` (without the
//!   key, the one user-cli pinned is used, or it is fetched and pinned as user-cli does);
//!   `agora-web link` prints a new sign-in link from the running gateway.
//! - Hosted mode: `agora-web --hosted [--open-signup] [--tls-cert C --tls-key K]`, with
//!   accounts made by `agora-web add-user NAME` (password on stdin).
//!
//! Prints `listening URL` on stdout once bound (personal mode's URL carries a one-time
//! token); logs go to stderr (RUST_LOG; coloured only on a terminal). Arguments are checked
//! first, then the TLS files are read and `--bind` is bound, then (personal mode) the link socket, and only then is
//! anything else made or asked (the pinned key, the key pair, the account at the registry,
//! the data directory). Errors are one line, each cause once.
//!
//! Exit codes (the README's table): 0 after SIGINT or SIGTERM (`link`: the link was
//! printed); 1 refused (the registry's key changed, an account name taken, the gateway
//! refused `link`); 2 usage, before anything is made (an endpoint or `--bind` malformed or
//! out of range, a non-loopback `--bind` in personal mode, plain HTTP beyond loopback
//! without `--insecure-http`, no `--user`); 3 a server did not answer (the registry's key
//! endpoint with nothing pinned; `link`: no gateway answers); 4 local input or output, and
//! any other failure (the port is taken, a key file, the data directory, the link socket is
//! another gateway's).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agora_common::server::Exit;
use agora_proto::wire::{Endpoint, UserName};
use agora_web::link::{LinkError, LinkSocket};
use agora_web::{accounts, auth, bridge, router, AppState, Hosted};
use anyhow::Context;
use clap::{Parser, Subcommand};

/// Agora in the browser: serves the chat page and speaks to the federation with the
/// signed-in person's key.
#[derive(Debug, Parser)]
#[command(
    name = "agora-web",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Makes a hosted account: reads its password from stdin (prompted without echo on a
    /// terminal) and makes its key pair under the data directory.
    AddUser {
        /// The account name (a user name: letters, digits, '.', '_', '-').
        name: UserName,
        /// The hosted gateway's data directory [default: ~/.local/share/agora-web].
        #[arg(long, env = "AGORA_WEB_DATA")]
        data_dir: Option<PathBuf>,
    },
    /// Prints a new one-time sign-in link (personal mode), asked of the running gateway over
    /// its link socket: for a link that was used already or has expired. Only the user who
    /// started the gateway can ask.
    Link {
        /// The gateway's link socket [default: $XDG_RUNTIME_DIR/agora-web/link.sock, or
        /// link.sock in the data directory without $XDG_RUNTIME_DIR].
        #[arg(long, env = "AGORA_WEB_LINK_SOCKET")]
        link_socket: Option<PathBuf>,
        /// The data directory, for the default link socket [default:
        /// ~/.local/share/agora-web].
        #[arg(long, env = "AGORA_WEB_DATA")]
        data_dir: Option<PathBuf>,
        /// How long to wait for the gateway's answer.
        #[arg(long, env = "AGORA_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, clap::Args)]
struct Serve {
    /// Personal mode: whose key to use (USER.key in the key directory, made by user-cli on
    /// first use).
    #[arg(long, env = "AGORA_USER", conflicts_with = "hosted")]
    user: Option<UserName>,
    /// Hosted mode: people sign in with an account name and password.
    #[arg(long)]
    hosted: bool,
    /// Hosted mode: anyone may make an account on the sign-in page.
    #[arg(long, requires = "hosted")]
    open_signup: bool,
    /// Hosted mode's data directory: accounts, their keys, the upload spool, the pinned
    /// registry key; personal mode's link socket without $XDG_RUNTIME_DIR
    /// [default: ~/.local/share/agora-web].
    #[arg(long, env = "AGORA_WEB_DATA")]
    data_dir: Option<PathBuf>,
    /// Personal mode: the local socket where `agora-web link` asks for a new sign-in link
    /// (0600, in a directory only you can enter) [default:
    /// $XDG_RUNTIME_DIR/agora-web/link.sock, or link.sock in the data directory].
    #[arg(long, env = "AGORA_WEB_LINK_SOCKET")]
    link_socket: Option<PathBuf>,
    /// Personal mode: how long a sign-in link works (each works once).
    #[arg(long, env = "AGORA_WEB_LINK_TTL", default_value = "5min", value_parser = humantime::parse_duration)]
    link_ttl: Duration,
    /// Personal mode: user-cli's state directory, whose known_servers.json holds the
    /// registry keys user-cli pinned [default: ~/.local/state/agora].
    #[arg(long, env = "AGORA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Where to listen, IP:PORT (port 0 picks one). Personal mode serves loopback only;
    /// hosted mode needs TLS or --insecure-http for any other address.
    #[arg(long, env = "AGORA_WEB_BIND", default_value = "127.0.0.1:8080", value_parser = bind_address)]
    bind: SocketAddr,
    /// The TLS certificate chain, PEM (with --tls-key): serve HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key, PEM.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Hosted mode: serve plain HTTP on an address other than loopback (passwords and
    /// sessions then cross the network in clear).
    #[arg(long)]
    insecure_http: bool,
    /// The registry's endpoint (IP:PORT or tcp://HOST:PORT), or a comma-separated list of
    /// the endpoints of registries sharing one database (tried in order; the next when one
    /// does not answer).
    #[arg(long, env = "AGORA_REGISTRY", default_value = "tcp://127.0.0.1:5555", value_parser = registry_list)]
    registry: String,
    /// The registry's CURVE public key (40 Z85 characters). Without it, the key pinned for
    /// the registry in known_servers.json (user-cli's, in --state-dir; hosted mode's, in
    /// --data-dir), checked against the registry's key endpoint; with no pin, the key
    /// endpoint's answer, pinned there on first use.
    #[arg(long, env = "AGORA_REGISTRY_KEY", allow_hyphen_values = true)]
    registry_key: Option<agora_common::keys::PublicKey>,
    /// The registry's plaintext key endpoint, IP:PORT or tcp://HOST:PORT [default: the
    /// registry's port + 1].
    #[arg(long, env = "AGORA_REGISTRY_KEY_ENDPOINT", value_parser = agora_common::server::args::connect)]
    registry_key_endpoint: Option<Endpoint>,
    /// Personal mode: where key pairs live [default: ~/.config/agora].
    #[arg(long, env = "AGORA_KEY_DIR")]
    key_dir: Option<PathBuf>,
    /// The largest file a person may upload, in bytes (as a node's --max-file-bytes).
    #[arg(long, env = "AGORA_WEB_MAX_UPLOAD_BYTES", default_value_t = 4 << 30)]
    max_upload_bytes: u64,
    /// Hosted mode: most keys (client addresses, and address and name pairs) each sign-in
    /// limiter holds; idle ones are dropped each minute, and while it is full every
    /// sign-in is answered 429.
    #[arg(long, env = "AGORA_WEB_SIGN_IN_MAX_KEYS", default_value_t = auth::LIMITER_KEYS)]
    sign_in_max_keys: usize,
    /// Most uploads one identity may have in progress at once; past it an upload is
    /// answered 429 before its body is read.
    #[arg(long, env = "AGORA_WEB_MAX_UPLOADS_PER_USER", default_value_t = 4)]
    max_uploads_per_user: usize,
    /// Most uploads one client address may have in progress at once, whatever the
    /// accounts; past it an upload is answered 429 before its body is read.
    #[arg(long, env = "AGORA_WEB_MAX_UPLOADS_PER_ADDRESS", default_value_t = 16)]
    max_uploads_per_address: usize,
    /// Most downloads one identity may have in progress at once; past it a download is
    /// answered 429.
    #[arg(long, env = "AGORA_WEB_MAX_DOWNLOADS_PER_USER", default_value_t = 16)]
    max_downloads_per_user: usize,
    /// Most downloads one client address (an IPv6 one by its /64) may have in progress at
    /// once, whatever the accounts; past it a download is answered 429.
    #[arg(
        long,
        env = "AGORA_WEB_MAX_DOWNLOADS_PER_ADDRESS",
        default_value_t = 32
    )]
    max_downloads_per_address: usize,
    /// How long a download waits for a client that stopped reading before it ends (and
    /// gives back its thread and slots).
    #[arg(long, env = "AGORA_WEB_DOWNLOAD_STALL_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    download_stall_timeout: Duration,
    /// Most bytes of uploads on their way to a node the spool holds at once, in all (one
    /// identity, or one client address, may hold half); past it an upload is answered 507.
    #[arg(long, env = "AGORA_WEB_MAX_SPOOL_BYTES", default_value_t = 16 << 30)]
    max_spool_bytes: u64,
    /// Most WebSockets open at once (each a page or tab); past it an upgrade is answered
    /// 503.
    #[arg(long, env = "AGORA_WEB_MAX_WEBSOCKETS", default_value_t = 2000)]
    max_websockets: usize,
    /// Most WebSockets one identity (account, or personal mode's user) may have open at
    /// once; past it an upgrade is answered 429.
    #[arg(
        long,
        env = "AGORA_WEB_MAX_WEBSOCKETS_PER_IDENTITY",
        default_value_t = 16
    )]
    max_websockets_per_identity: usize,
    /// Most WebSockets one client address (an IPv6 one by its /64) may have open at once;
    /// past it an upgrade is answered 429. (Behind a reverse proxy every client has the
    /// proxy's address.)
    #[arg(
        long,
        env = "AGORA_WEB_MAX_WEBSOCKETS_PER_ADDRESS",
        default_value_t = 64
    )]
    max_websockets_per_address: usize,
    /// Most TCP connections open at once (WebSockets included); past it a new connection is
    /// closed at once (plain HTTP reads a 503 first).
    #[arg(long, env = "AGORA_WEB_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Most TCP connections one client address (an IPv6 one by its /64) may have open at
    /// once (WebSockets included); past it a new one is closed at once.
    #[arg(
        long,
        env = "AGORA_WEB_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256
    )]
    max_connections_per_address: usize,
    /// How long a client may take to send a request's headers, counted from when the
    /// connection opens or its previous response went out: so also how long an idle
    /// keep-alive connection is kept. Past it the connection is closed. Also the TLS
    /// handshake's limit.
    #[arg(long, env = "AGORA_WEB_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// Another origin (scheme://host[:port]) the page may be served from, as the browser
    /// sees it: for a gateway behind a reverse proxy. Repeat it, or comma-separate them in
    /// the variable. Requests that act (POST, the WebSocket) must come from the gateway's
    /// own origin (its Host) or one of these.
    #[arg(long = "origin", value_name = "URL", env = "AGORA_WEB_ORIGIN", value_delimiter = ',', value_parser = agora_web::guard::parse_origin)]
    origins: Vec<String>,
    /// A session unused this long ends (a page with its WebSocket open is in use).
    #[arg(long, env = "AGORA_WEB_SESSION_IDLE", default_value = "7days", value_parser = humantime::parse_duration)]
    session_idle: Duration,
    /// A session ends this long after sign-in, however used.
    #[arg(long, env = "AGORA_WEB_SESSION_LIFETIME", default_value = "30days", value_parser = humantime::parse_duration)]
    session_lifetime: Duration,
    /// Most live sessions; at the cap a sign-in evicts the expired sessions, then the one
    /// unused longest with no WebSocket open, then the one unused longest.
    #[arg(long, env = "AGORA_WEB_MAX_SESSIONS", default_value_t = auth::MAX_SESSIONS)]
    max_sessions: usize,
    /// How long to wait for a server, per call.
    #[arg(long, env = "AGORA_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file (the quickstart's web.log) gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match args.command {
        Some(Command::AddUser { name, data_dir }) => add_user(&name, data_dir),
        Some(Command::Link {
            link_socket: socket,
            data_dir,
            timeout,
        }) => link(socket, data_dir, timeout),
        None => serve(args.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agora-web: {}", one_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// `error` and its causes on one line, `: `-separated, each said once: a cause whose text
/// its parent already quotes (`… (zmq: Invalid argument)`, then `zmq: Invalid argument`,
/// then `Invalid argument`) is left out.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// `--bind`: an IP address and a port, `127.0.0.1:8080` or `[::1]:8080` (port 0 picks a
/// free one).
///
/// # Errors
/// What is wrong, in words (clap prints it after the flag and the value, and exits 2).
fn bind_address(s: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = s.parse() {
        return Ok(address);
    }
    match s.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_err() => {
            Err("port must be 0-65535 (0 picks a free port)".to_owned())
        }
        _ => Err("expected IP:PORT, such as 127.0.0.1:8080 or [::1]:8080 \
                  (an IP address, not a host name)"
            .to_owned()),
    }
}

/// `--registry`: one endpoint or a comma-separated list, each `IP:PORT` or
/// `tcp://HOST:PORT`; returned with every endpoint in `tcp://` form.
///
/// # Errors
/// The first bad endpoint and what is wrong with it: a port outside 1-65535, a wildcard or
/// malformed host, another scheme, an empty list.
fn registry_list(s: &str) -> Result<String, String> {
    agora_proto::wire::endpoint_list(s).map_err(|e| e.to_string())
}

/// A failure whose exit code is known where it happens (the table in the module's doc): a
/// usage error (an argument that clap accepted alone but not with the others), a port that
/// cannot be bound, a registry that did not answer.
#[derive(Debug)]
struct Failure {
    exit: Exit,
    message: String,
}

impl Failure {
    /// Exit code 2: a bad argument, found before anything is made.
    fn usage(message: impl Into<String>) -> anyhow::Error {
        Failure {
            exit: Exit::Usage,
            message: message.into(),
        }
        .into()
    }

    /// Exit code 3: a server did not answer.
    fn unreachable(message: impl Into<String>) -> anyhow::Error {
        Failure {
            exit: Exit::Unreachable,
            message: message.into(),
        }
        .into()
    }

    /// Exit code 4: local input or output (a port, a file, a directory).
    fn local(message: impl Into<String>) -> anyhow::Error {
        Failure {
            exit: Exit::LocalIo,
            message: message.into(),
        }
        .into()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code for a failure (the table in the module's doc), by the first cause in the
/// chain whose type says which: 1 only for a real refusal (by a server, or a name taken on
/// this gateway), 3 for a server that did not answer, 4 for local input or output and for
/// anything else that is not known to be one of those.
fn exit_code(error: &anyhow::Error) -> u8 {
    use agora_common::client::ClientError;
    use agora_common::trust::TrustError;
    use agora_web::accounts::AccountError;
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<Failure>() {
            return e.exit as u8;
        }
        if let Some(e) = cause.downcast_ref::<LinkError>() {
            return match e {
                LinkError::NoGateway { .. } | LinkError::Timeout { .. } => 3,
                LinkError::Refused { .. } => 1,
                _ => 4,
            };
        }
        if let Some(e) = cause.downcast_ref::<TrustError>() {
            return match e {
                TrustError::Unknown { .. } => 3,
                TrustError::Changed { .. } => 1,
                _ => 4,
            };
        }
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return match e {
                ClientError::Timeout { .. } | ClientError::BadReply(_) => 3,
                ClientError::Server(_) => 1,
                _ => 4,
            };
        }
        if let Some(e) = cause.downcast_ref::<AccountError>() {
            return match e {
                AccountError::Exists(_) | AccountError::Taken(_) => 1,
                AccountError::BadPassword => 2,
                AccountError::Registry(_) => 3,
                _ => 4,
            };
        }
    }
    // A key file, a directory, a socket, or a cause of no known kind: local.
    Exit::LocalIo as u8
}

/// Where the link socket is: `given`, else `$XDG_RUNTIME_DIR/agora-web/link.sock`, else
/// `link.sock` in the data directory.
fn link_socket(given: Option<PathBuf>, data_dir_arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(runtime) if runtime.is_absolute() => Ok(runtime.join("agora-web").join("link.sock")),
        _ => Ok(data_dir(data_dir_arg)?.join("link.sock")),
    }
}

/// `agora-web link`: prints a new sign-in link of the gateway at the link socket.
fn link(
    socket: Option<PathBuf>,
    data_dir_arg: Option<PathBuf>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let path = link_socket(socket, data_dir_arg)?;
    let url = agora_web::link::request(&path, timeout)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{url}")?;
    out.flush()?;
    Ok(())
}

/// The command that prints a new link from the gateway whose link socket is `path`: plain
/// `agora-web link` when that is where it looks by default.
fn link_command(path: &std::path::Path) -> String {
    if link_socket(None, None).is_ok_and(|default| default == path) {
        return "agora-web link".to_owned();
    }
    let shown = path.to_string_lossy();
    let quoted = shlex::try_quote(&shown).unwrap_or(shown.clone());
    format!("agora-web link --link-socket {quoted}")
}

/// The registry's key: `--registry-key`, else the one pinned in `known` (a
/// `known_servers.json`, shared with user-cli in personal mode), checked against the key
/// endpoint, else the key endpoint's, pinned on first use.
///
/// # Errors
/// [`agora_common::trust::TrustError`]: the key changed, no key to be had, the file.
fn registry_key(
    args: &Serve,
    known: &std::path::Path,
) -> anyhow::Result<agora_common::keys::PublicKey> {
    if let Some(key) = args.registry_key {
        return Ok(key);
    }
    let ctx = zmq::Context::new();
    let wait = args.timeout.min(Duration::from_secs(1));
    let (key, trust) = agora_common::trust::registry_list_key(
        &ctx,
        known,
        &args.registry,
        args.registry_key_endpoint.as_ref().map(Endpoint::as_str),
        None,
        wait,
    )
    .map_err(|e| trust_failure(e, wait))?;
    match trust {
        agora_common::trust::Trust::FirstUse => tracing::warn!(
            key = %key,
            registry = %args.registry,
            pins = %known.display(),
            "pinned the registry key on first use: compare it with the key the registry printed"
        ),
        _ => tracing::info!(key = %key, pins = %known.display(), "the registry key pinned"),
    }
    Ok(key)
}

/// Why the registry's key could not be had, said once: a key endpoint that did not answer
/// is named with the wait as given (`1s`), with what to do (exit code 3); anything else as
/// it is (its exit code by [`exit_code`]).
fn trust_failure(error: agora_common::trust::TrustError, wait: Duration) -> anyhow::Error {
    use agora_common::client::ClientError;
    use agora_common::trust::TrustError;
    match error {
        TrustError::Unknown {
            endpoint,
            key_endpoint,
            source: ClientError::Timeout { .. },
        } => Failure::unreachable(format!(
            "registry {endpoint}: unreachable: its key endpoint {key_endpoint} gave no key \
             within {}; check that the registry runs there, or pass --registry-key",
            humantime::format_duration(wait)
        )),
        e => e.into(),
    }
}

/// user-cli's pins: `known_servers.json` in its state directory (`--state-dir`, else
/// `~/.local/state/agora`, as user-cli finds it).
fn user_cli_pins(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(d) => d,
        None => directories::ProjectDirs::from("", "", "agora")
            .map(|d| d.state_dir().unwrap_or_else(|| d.data_dir()).to_owned())
            .ok_or_else(|| {
                Failure::usage("no home directory for user-cli's pinned keys; pass --state-dir")
            })?,
    };
    Ok(dir.join("known_servers.json"))
}

fn data_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(d) => Ok(d),
        None => directories::ProjectDirs::from("", "", "agora-web")
            .map(|d| d.data_dir().to_owned())
            .ok_or_else(|| Failure::usage("no home directory; pass --data-dir")),
    }
}

fn add_user(name: &UserName, data_dir_arg: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = data_dir(data_dir_arg)?;
    let accounts = accounts::Accounts::open(&dir)?;
    let password = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        rpassword::prompt_password(format!("password for {name}: "))?
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    let identity = accounts.add(name, &password)?;
    println!(
        "added {name} (key {}) under {}",
        identity.keypair.public,
        dir.display()
    );
    Ok(())
}

fn serve(args: Serve) -> anyhow::Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        _ => None,
    };
    let loopback = args.bind.ip().is_loopback();
    if !args.hosted && !loopback {
        return Err(Failure::usage(format!(
            "--bind {}: personal mode serves loopback only (the page acts with your key); \
             use 127.0.0.1:PORT, or --hosted",
            args.bind
        )));
    }
    if args.hosted && !loopback && tls.is_none() && !args.insecure_http {
        return Err(Failure::usage(format!(
            "--bind {} is not loopback: pass --tls-cert and --tls-key, or --insecure-http",
            args.bind
        )));
    }
    if !args.hosted && args.user.is_none() {
        return Err(Failure::usage(
            "pass --user NAME (personal mode) or --hosted",
        ));
    }
    if args.registry_key.is_none() && args.registry_key_endpoint.is_none() {
        // The key endpoint is the registry's port + 1: none past 65534.
        for endpoint in agora_common::client::registry_endpoints(&args.registry) {
            if agora_common::trust::default_key_endpoint(&endpoint).is_none() {
                return Err(Failure::usage(format!(
                    "--registry {endpoint}: no key endpoint at the next port; pass \
                     --registry-key or --registry-key-endpoint"
                )));
            }
        }
    }
    // Every place a file goes, found before anything is made (no home directory: exit 2).
    let known = if args.hosted {
        data_dir(args.data_dir.clone())?.join("known_servers.json")
    } else {
        user_cli_pins(args.state_dir.clone())?
    };
    let key_dir = match (&args.key_dir, args.hosted) {
        (_, true) => None,
        (Some(d), false) => Some(d.clone()),
        (None, false) => Some(
            directories::ProjectDirs::from("", "", "agora")
                .map(|d| d.config_dir().to_owned())
                .ok_or_else(|| Failure::usage("no home directory; pass --key-dir"))?,
        ),
    };
    let socket_path = match args.hosted {
        true => None,
        false => Some(link_socket(
            args.link_socket.clone(),
            args.data_dir.clone(),
        )?),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The TLS files before the port: a missing or bad one is said before anything is made,
    // and never after a `listening` line.
    let tls_config = match &tls {
        Some((cert, key)) => Some(runtime.block_on(tls_config(cert, key))?),
        None => None,
    };
    // The port before anything is made or asked: a busy one leaves no key pair, no pin, no
    // account at the registry, no data directory and no link socket behind.
    let listener = listen(args.bind)?;
    let registry_key = registry_key(&args, &known)?;
    // Personal mode's link socket once the registry's key is had (a registry that does not
    // answer leaves no directory for it), before the key pair and the account (another
    // gateway's socket leaves neither); the first link once the port is known.
    let link_listener = match &socket_path {
        Some(path) => {
            if args.link_socket.is_none() {
                // The default place is ours to make private (--link-socket's must be).
                if let Some(dir) = path.parent() {
                    agora_common::fsmode::private_dir(dir)
                        .with_context(|| format!("{}", dir.display()))?;
                }
            }
            Some(LinkSocket::bind(path)?)
        }
        None => None,
    };
    if args.hosted && !loopback && tls.is_none() {
        tracing::warn!(
            bind = %args.bind,
            "serving plain HTTP beyond loopback (--insecure-http): passwords and session \
             cookies cross the network in clear"
        );
    }
    let federation = bridge::Federation {
        contexts: Arc::default(),
        registry: args.registry.clone(),
        registry_key,
        timeout: args.timeout,
        hosted: args.hosted,
    };
    let (sessions, hosted, spool) = if args.hosted {
        let dir = data_dir(args.data_dir.clone())?;
        let accounts = accounts::Accounts::open(&dir)?;
        accounts.remove_unfinished()?;
        // Accounts::open made the directory private (0700, tightened with a log line).
        let spool = dir.join("spool");
        agora_common::fsmode::private_dir(&spool)
            .with_context(|| format!("{}", spool.display()))?;
        let hosted = Hosted {
            accounts,
            limiter: auth::SignInLimiter::with_max_keys(args.sign_in_max_keys),
            open_signup: args.open_signup,
            tls: tls.is_some(),
        };
        (auth::Sessions::new(), Some(Arc::new(hosted)), spool)
    } else {
        let user = args
            .user
            .clone()
            .context("pass --user NAME (personal mode) or --hosted")?;
        let dir = key_dir.context("personal mode has a key directory")?;
        let (keypair, _) =
            agora_common::keys::Keypair::load_or_generate(&dir.join(format!("{user}.key")))?;
        let identity = bridge::Identity { user, keypair };
        // Direct messages and presence need the account (user-cli `register` makes the same
        // one; a repeat changes nothing).
        if let Err(e) = agora_web::register(&federation, &identity) {
            tracing::warn!(error = %e, "direct messages need the account");
        }
        (
            auth::Sessions::personal(identity, args.link_ttl),
            None,
            std::env::temp_dir(),
        )
    };
    let limits = auth::SessionLimits {
        idle: args.session_idle,
        lifetime: args.session_lifetime,
        max: args.max_sessions,
    };
    let sessions = Arc::new(sessions.with_limits(limits));
    let state = AppState {
        sessions: Arc::clone(&sessions),
        federation: Arc::new(federation),
        hosted,
        tls: tls.is_some(),
        link_command: socket_path
            .as_deref()
            .map(|path| Arc::from(link_command(path))),
        spool: Arc::new(spool),
        max_upload_bytes: args.max_upload_bytes,
        uploads: Arc::new(agora_web::files::Uploads::new(
            args.max_uploads_per_user,
            args.max_uploads_per_address,
            args.max_spool_bytes,
        )),
        downloads: Arc::new(agora_web::limits::DownloadCaps::new(
            args.max_downloads_per_user,
            args.max_downloads_per_address,
            args.download_stall_timeout,
        )),
        hub: Arc::default(),
        websockets: Arc::new(agora_web::limits::WebSocketCaps::new(
            args.max_websockets,
            args.max_websockets_per_identity,
            args.max_websockets_per_address,
        )),
        origins: Arc::new(agora_web::guard::Origins::new(args.origins.clone())),
    };
    // A page holds a few descriptors (its TCP connection, ZeroMQ sockets and signalers):
    // the soft limit's usual 1,024 would stop the gateway near 150 pages.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open files"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    runtime.block_on(async move {
        let addr = listener
            .local_addr()
            .with_context(|| format!("--bind {}", args.bind))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        // Personal mode: the first link, and the link socket's service.
        let url = match link_listener {
            Some(socket) => {
                let base = format!("{scheme}://{addr}/?token=");
                let token = sessions
                    .mint()
                    .context("no randomness for the link's token")?;
                tracing::info!(
                    socket = %socket.path().display(),
                    ttl = %humantime::format_duration(args.link_ttl),
                    "a sign-in link works once, for the ttl; `agora-web link` prints a new one"
                );
                let link_sessions = Arc::clone(&sessions);
                let link_base = base.clone();
                tokio::spawn(async move {
                    if let Err(e) = socket.serve(link_sessions, link_base).await {
                        tracing::error!(error = %e, "the link socket stopped");
                    }
                });
                format!("{base}{token}")
            }
            None => format!("{scheme}://{addr}/"),
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {url}")?;
        out.flush()?;
        drop(out);
        let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
        // Expired sessions end (and close their WebSockets) within a minute, or sooner
        // for short limits.
        let sweep = limits
            .idle
            .min(limits.lifetime)
            .min(Duration::from_secs(60))
            / 2;
        tokio::spawn(Arc::clone(&sessions).sweep_every(sweep));
        let caps = (
            args.max_connections,
            args.max_connections_per_address,
            args.header_read_timeout,
        );
        let handle = axum_server::Handle::new();
        let stopper = handle.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            stopper.graceful_shutdown(Some(Duration::from_secs(5)));
        });
        match tls_config {
            Some(config) => {
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config)
                    .handshake_timeout(args.header_read_timeout)
                    .acceptor(axum_server::accept::NoDelayAcceptor::new());
                let mut server = axum_server::from_tcp(listener).acceptor(
                    agora_web::limits::ConnectionCaps::new(acceptor, caps.0, caps.1, caps.2, false),
                );
                http1_timeouts(server.http_builder(), args.header_read_timeout);
                server.handle(handle).serve(app).await?;
            }
            None => {
                let mut server = axum_server::from_tcp(listener).acceptor(
                    agora_web::limits::ConnectionCaps::new(
                        axum_server::accept::NoDelayAcceptor::new(),
                        caps.0,
                        caps.1,
                        caps.2,
                        true,
                    ),
                );
                http1_timeouts(server.http_builder(), args.header_read_timeout);
                server.handle(handle).serve(app).await?;
            }
        }
        Ok(())
    })
}

/// The TLS configuration from `--tls-cert` and `--tls-key` (PEM), HTTP/1.1 only: the
/// header-read timeout is HTTP/1's (and WebSockets are). ALPN alone does not stop
/// hyper-util from taking HTTP/2 when the first bytes are its preface: `limits::Capped`
/// closes those, on every listener.
///
/// # Errors
/// A local failure (exit code 4) naming both flags: a file cannot be read, or holds no
/// certificate or key.
async fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<axum_server::tls_rustls::RustlsConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
        .await
        .map_err(|e| {
            Failure::local(format!(
                "--tls-cert {} and --tls-key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    let mut only_h1 = (*config.get_inner()).clone();
    only_h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.reload_from_config(Arc::new(only_h1));
    Ok(config)
}

/// The listener at `--bind` (non-blocking, for the runtime).
///
/// # Errors
/// A local failure (exit code 4) naming `--bind` and saying what to do: the port is taken,
/// the address is not this machine's, the port needs privileges.
fn listen(bind: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use std::io::ErrorKind;
    let listener = std::net::TcpListener::bind(bind).map_err(|e| {
        let why = match e.kind() {
            ErrorKind::AddrInUse => {
                "address in use: another program listens there; pick another port".to_owned()
            }
            ErrorKind::AddrNotAvailable => {
                "address not available: it is not one of this machine's; give one of its \
                 addresses, or 127.0.0.1"
                    .to_owned()
            }
            ErrorKind::PermissionDenied => "permission denied: ports below 1024 need \
                 privileges; pick a port from 1024 up"
                .to_owned(),
            _ => format!("cannot listen there: {e}"),
        };
        Failure::local(format!("--bind {bind}: {why}"))
    })?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("--bind {bind}"))?;
    Ok(listener)
}

/// hyper's HTTP/1 header-read timeout (it needs a timer to take effect; without one it is
/// off). hyper starts it when it waits for a request's head, so it also bounds an idle
/// keep-alive connection.
fn http1_timeouts(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    header_read_timeout: Duration,
) {
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_common::client::ClientError;
    use agora_common::trust::TrustError;

    #[test]
    fn a_cause_its_parent_quotes_is_said_once() {
        let error = anyhow::Error::from(TrustError::Unknown {
            endpoint: "tcp://127.0.0.1:5555".to_owned(),
            key_endpoint: "tcp://127.0.0.1:5556".to_owned(),
            source: ClientError::Zmq(zmq::Error::EINVAL),
        });
        let line = one_line(&error);
        assert_eq!(line.matches("Invalid argument").count(), 1, "{line}");
        assert!(line.contains("tcp://127.0.0.1:5556"), "{line}");
        // Context that adds words keeps them, and the cause follows once.
        let error = anyhow::Error::from(std::io::Error::other("disk full"))
            .context("/data/web: writing the pin");
        assert_eq!(one_line(&error), "/data/web: writing the pin: disk full");
    }

    #[test]
    fn exit_codes_follow_the_readme_table() {
        use agora_proto::wire::{ErrorCode, WireError};
        let timeout = || ClientError::Timeout {
            endpoint: "tcp://127.0.0.1:5555".to_owned(),
            waited: Duration::from_secs(1),
        };
        let cases: Vec<(anyhow::Error, u8, &str)> = vec![
            (Failure::usage("--bind"), 2, "usage"),
            (Failure::local("--bind in use"), 4, "a port"),
            (
                anyhow::Error::from(timeout()).context("registering"),
                3,
                "a registry that did not answer",
            ),
            (
                ClientError::Server(WireError::new(ErrorCode::NameTaken, "taken")).into(),
                1,
                "a refusal",
            ),
            (
                TrustError::Unknown {
                    endpoint: "tcp://127.0.0.1:5555".to_owned(),
                    key_endpoint: "tcp://127.0.0.1:5556".to_owned(),
                    source: timeout(),
                }
                .into(),
                3,
                "no key to be had",
            ),
            (
                std::io::Error::from(std::io::ErrorKind::PermissionDenied).into(),
                4,
                "local I/O",
            ),
            (
                agora_common::keys::KeyError::Mismatch(PathBuf::from("/k/alice.key")).into(),
                4,
                "a key file",
            ),
            (
                anyhow::anyhow!("something nobody classified"),
                4,
                "unknown: not a refusal",
            ),
        ];
        for (error, code, what) in cases {
            assert_eq!(exit_code(&error), code, "{what}: {error:#}");
        }
    }
}
