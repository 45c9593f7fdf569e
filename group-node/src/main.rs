//! `group-node NAME IP:PORT`: serve one Agora group; `group-node --host IP:PORT --data-dir
//! DIR`: serve every group of a group host; `group-node host import|export`: move groups
//! into and out of a stopped host ([`host_cmd`]).
//!
//! Arguments are checked before anything is created (no socket, key pair or data
//! directory for a command that fails on them); then the port is bound before the data
//! directory and a new key pair are made, so a busy port leaves nothing behind.
//!
//! # Exit codes
//! - 0: a clean stop (SIGINT, SIGTERM or an accepted `stop`), or stopped while a standby.
//! - 1: refused by a server: the registry binds the group's name to another key (a standby
//!   started without the active node's `node.key` and `node.key_secret`), its key changed
//!   since it was pinned, or this node lost its lease to another.
//! - 2: usage: a bad argument (a port past 65535, a malformed or wildcard host where one is
//!   connected to or advertised, an unknown scheme, `--insecure` off loopback,
//!   `--beacon-port 0`; with `--registry auto`, several registries heard and no
//!   `--registry-name` to choose).
//! - 3: unreachable: no registry heard (`--registry auto`), none of the `--registry-name`
//!   asked for, or its key cannot be fetched; PostgreSQL (`--store`) not reached within
//!   `--failover-timeout` at start, or refusing the node (authentication, no such
//!   database). A node that reached it once and waits as a standby keeps waiting.
//! - 4: local input or output: the port or the `--metrics` port cannot be bound, the data
//!   directory (in use by another node, with `--store` too), the key pair or the store's
//!   files cannot be made or read, a failed sync.
//!
//! `host import` and `host export`: 0 done; 1 a name the host has already (import, the
//! others imported), no live group of that name (export); 2 `--to` not empty, a bad
//! argument; 4 a data directory in use by a running group-node, one without the database
//! it needs, any file that cannot be read or written.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agora_common::server::{args as check, Exit};
use agora_common::shutdown::Shutdown;
use agora_group_node::lease::{Lease, LeaseConfig};
use agora_group_node::store::postgres::PgTarget;
use agora_group_node::store::Retention;
use agora_group_node::store::StoreError;
use agora_group_node::{default_data_dir, Config, Node, NodeError};
use agora_proto::wire::{Endpoint, GroupName, DEFAULT_MAX_MESSAGE_BYTES};
use anyhow::Context;
use clap::Parser;

mod host_cmd;

/// An Agora group node: membership, a durable sequenced message log and history for one
/// group, or for many with --host. Prints `listening ENDPOINT` on stdout once bound; logs
/// go to stderr (RUST_LOG).
#[derive(Debug, Parser)]
#[command(
    name = "group-node",
    version,
    about,
    after_help = "Moving groups into or out of a stopped group host: \
                  `group-node host import|export` (see `group-node host --help`)."
)]
struct Args {
    /// The group's name; may contain spaces ("Cool Group"). Not with --host.
    #[arg(required_unless_present = "host", conflicts_with = "host")]
    name: Option<GroupName>,
    /// Address to bind, IP:PORT or tcp://HOST:PORT (port 0 binds a free port), for example
    /// 127.0.0.1:5560. It is also what members are told to connect to, so a wildcard
    /// (`0.0.0.0`, `[::]`) needs --advertise unless --no-registry.
    #[arg(value_name = "ADDRESS", value_parser = check::bind, required_unless_present = "host")]
    addr: Option<String>,
    /// Serve many groups at this address (IP:PORT or tcp://HOST:PORT) as a group host:
    /// every live group of DATA/host.sqlite3, each request naming its group (PROTOCOL §6).
    /// Needs --data-dir; instead of NAME ADDRESS.
    #[arg(long, value_name = "ADDRESS", value_parser = check::bind, requires = "data_dir")]
    host: Option<String>,
    /// With --host: a group to make at start if the host has none of that name, owned by
    /// the host key (repeatable).
    #[arg(long = "group", value_name = "NAME", requires = "host")]
    groups: Vec<GroupName>,
    /// With --host: who may create groups with `create`: `any` (any CURVE key), or a
    /// comma-separated list of Z85 public keys. Default: nobody (the operator's --group only).
    #[arg(long, env = "AGORA_CREATORS", value_name = "any|KEY[,KEY...]", requires = "host",
          value_parser = creators)]
    creators: Option<agora_group_node::host::Creators>,
    /// With --host: most groups one key may create.
    #[arg(long, env = "AGORA_MAX_GROUPS_PER_KEY", default_value_t = 100)]
    max_groups_per_key: u64,
    /// With --host: most groups the host holds.
    #[arg(long, env = "AGORA_MAX_GROUPS", default_value_t = agora_group_node::DEFAULT_MAX_GROUPS)]
    max_groups: usize,
    /// With --host and --store: the id that names the host's PostgreSQL schema and lease;
    /// its standbys give the same [default: the host's public key, which its standbys share
    /// with its node.key; needed with --insecure].
    #[arg(long, env = "AGORA_HOST_ID", requires_all = ["host", "store"])]
    host_id: Option<String>,
    /// Serve Prometheus metrics (`/metrics`) and health (`/healthz`: 200 serving, 503
    /// draining) over HTTP on this IP:PORT, or on loopback with a bare PORT (9100 is
    /// 127.0.0.1:9100; port 0 picks one). Bind a non-loopback address only where the
    /// network is trusted. Off unless given.
    #[arg(long, env = "AGORA_METRICS", value_parser = check::metrics)]
    metrics: Option<String>,
    /// The registry's endpoint, or `auto`: the registry heard on the LAN by its beacon
    /// (PROTOCOL §10; its key is then pinned in the data directory on first use).
    /// Several registries sharing one database are given as a list, `tcp://A:5555,tcp://B:5555`:
    /// tried in order, and the next one used when one does not answer. IP:PORT is taken too.
    #[arg(long, env = "AGORA_REGISTRY", default_value = "tcp://127.0.0.1:5555", value_parser = check::registry)]
    registry: String,
    /// With --registry auto: the name of the registry to use when several are heard.
    #[arg(long, env = "AGORA_REGISTRY_NAME")]
    registry_name: Option<String>,
    /// The UDP port registries' beacons arrive on (--registry auto); 1-65535.
    #[arg(long, env = "AGORA_BEACON_PORT", default_value_t = agora_proto::beacon::BEACON_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    beacon_port: u16,
    /// How long --registry auto listens for beacons (sent every second).
    #[arg(long, env = "AGORA_DISCOVER_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    discover_wait: Duration,
    /// Serve without registering anywhere.
    #[arg(long, conflicts_with = "registry")]
    no_registry: bool,
    /// Endpoint to register for members, IP:PORT or tcp://HOST:PORT, when it differs from
    /// the bound one (NAT, a wildcard ADDRESS).
    #[arg(long, env = "AGORA_ADVERTISE", value_parser = check::connect)]
    advertise: Option<Endpoint>,
    /// Directory for the group's SQLite store, key pair and attachments [default:
    /// ~/.local/share/agora/groups/NAME].
    #[arg(long, env = "AGORA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Keep the log and membership in this PostgreSQL database (postgres://USER@HOST/DB,
    /// or libpq's key=value form) instead of SQLite in the data directory. Several nodes of
    /// the group (on different hosts, each with a copy of the group's key pair) may share
    /// it: one is active, the others wait as standbys and take over when it goes.
    #[arg(long, env = "AGORA_STORE", value_parser = postgres_url)]
    store: Option<String>,
    /// How often a standby tries to take the lease.
    #[arg(long, env = "AGORA_FAILOVER_POLL", default_value = "100ms", value_parser = humantime::parse_duration)]
    failover_poll: Duration,
    /// How often the active node checks its hold on the lease.
    #[arg(long, env = "AGORA_FAILOVER_CHECK", default_value = "200ms", value_parser = humantime::parse_duration)]
    failover_check: Duration,
    /// How long the active node may go without reaching the database before it stops
    /// serving, and how long the database may stay unreachable at start before the node
    /// exits (3). The database frees a silent holder's lease after --store-net-timeout, so
    /// keep this shorter.
    #[arg(long, env = "AGORA_FAILOVER_TIMEOUT", default_value = "1500ms", value_parser = humantime::parse_duration)]
    failover_timeout: Duration,
    /// Connection timeouts towards PostgreSQL, set on both ends (TCP keepalives and
    /// TCP_USER_TIMEOUT): how soon a dead link or host is noticed.
    #[arg(long, env = "AGORA_STORE_NET_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    store_net_timeout: Duration,
    /// PEM file of the CA certificates that PostgreSQL's server certificate must chain to:
    /// the connection is then TLS, checked against the URL's host name. Without it, TLS is
    /// used only when the URL says sslmode=require (checked against the system's trust
    /// store).
    #[arg(long, env = "AGORA_STORE_CA", requires = "store")]
    store_ca: Option<PathBuf>,
    /// PEM file of a client certificate (chain, leaf first) to present to PostgreSQL, for
    /// servers that authenticate by certificate (cert in pg_hba.conf: its CN names the
    /// role). Makes the connection TLS.
    #[arg(long, env = "AGORA_STORE_CERT", requires_all = ["store", "store_key"])]
    store_cert: Option<PathBuf>,
    /// PEM file of the private key of --store-cert; mode 0600 or less (0640 if root owns
    /// it), as libpq requires.
    #[arg(long, env = "AGORA_STORE_KEY", requires = "store_cert")]
    store_key: Option<PathBuf>,
    /// Largest message body, in bytes of JSON text.
    #[arg(long, env = "AGORA_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Largest attachment, in bytes; a larger upload gets `too_large` before any byte is
    /// stored.
    #[arg(long, env = "AGORA_MAX_FILE_BYTES", default_value_t = agora_group_node::DEFAULT_MAX_FILE_BYTES)]
    max_file_bytes: u64,
    /// An unfinished upload is discarded after this long without a chunk, and a content no
    /// message carries is deleted once this old.
    #[arg(long, env = "AGORA_UPLOAD_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    upload_ttl: Duration,
    /// Bytes of attachments one member may hold: what its unfinished uploads declare plus
    /// the complete contents it uploaded first that the node keeps; an upload past it gets
    /// `limit_reached`.
    #[arg(long, env = "AGORA_UPLOAD_QUOTA", default_value_t = agora_group_node::DEFAULT_UPLOAD_QUOTA)]
    upload_quota: u64,
    /// Free bytes uploads must leave on the data directory's file system (statvfs); an
    /// upload or chunk that would go below gets `storage_full`. 0: no reserve.
    #[arg(long, env = "AGORA_DISK_RESERVE_BYTES", default_value_t = agora_group_node::DEFAULT_DISK_RESERVE_BYTES)]
    disk_reserve_bytes: u64,
    /// Unfinished uploads one member may have at once; one more gets `limit_reached`.
    #[arg(long, env = "AGORA_MAX_UPLOADS_PER_MEMBER", default_value_t = agora_group_node::DEFAULT_MAX_UPLOADS_PER_MEMBER)]
    max_uploads_per_member: usize,
    /// Keep only the newest N messages [default: keep all].
    #[arg(long, env = "AGORA_MAX_MESSAGES", value_parser = clap::value_parser!(u64).range(1..))]
    max_messages: Option<u64>,
    /// Delete messages older than this, for example 30d or 12h [default: keep all].
    #[arg(long, env = "AGORA_MAX_AGE", value_parser = humantime::parse_duration)]
    max_age: Option<Duration>,
    /// Registry heartbeat interval.
    #[arg(long, env = "AGORA_HEARTBEAT", default_value = "2s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Most members of the group.
    #[arg(long, env = "AGORA_MAX_MEMBERS", default_value_t = 100_000)]
    max_members: u64,
    /// How long a live subscription lives without renewal.
    #[arg(long, env = "AGORA_LEASE", default_value = "5s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Most live subscriptions.
    #[arg(long, env = "AGORA_MAX_SUBSCRIBERS", default_value_t = 10_000)]
    max_subscribers: usize,
    /// Most live connections (subscriptions) one member may hold.
    #[arg(long, env = "AGORA_MAX_SUBSCRIPTIONS_PER_MEMBER", default_value_t = 16)]
    max_subscriptions_per_member: usize,
    /// Messages queued per peer (ZMQ_SNDHWM) before pushes to it are dropped; a subscriber
    /// that misses pushes catches up from the log.
    #[arg(long, env = "AGORA_SNDHWM", default_value_t = 1000)]
    sndhwm: i32,
    /// Push budget per live subscription, in bytes of pushed event JSON the subscriber has
    /// not acked yet; over it, pushes to it wait and it catches up from the log.
    #[arg(long, env = "AGORA_PUSH_BUDGET", default_value_t = agora_proto::wire::DEFAULT_PUSH_BUDGET_BYTES)]
    push_budget: usize,
    /// Push budget of the whole node, in bytes pushed and not acked over all subscriptions.
    #[arg(long, env = "AGORA_PUSH_BUDGET_TOTAL", default_value_t = agora_proto::wire::DEFAULT_PUSH_BUDGET_TOTAL_BYTES)]
    push_budget_total: usize,
    /// Zero-fill the WAL file to this many bytes at start, so that appends overwrite it rather
    /// than grow it (each sync of a grown file also commits its size: slower). 0: off.
    #[arg(long, env = "AGORA_WAL_PREALLOC", default_value_t = agora_group_node::DEFAULT_WAL_PREALLOC_BYTES)]
    wal_prealloc: u64,
    /// Test only: drop every Nth push on purpose, to exercise subscribers' backfill.
    #[arg(long, hide = true, default_value_t = 0)]
    fault_drop_push_every: u64,
    /// The registry's plaintext key endpoint, asked when no --registry-key is given (the key
    /// is then pinned in the data directory on first use) [default: the registry's host, the
    /// next port].
    #[arg(long, env = "AGORA_REGISTRY_KEY_ENDPOINT", value_parser = check::connect)]
    registry_key_endpoint: Option<Endpoint>,
    /// The registry's CURVE public key (40 Z85 characters; the registry prints it at start).
    #[arg(long, env = "AGORA_REGISTRY_KEY", allow_hyphen_values = true)]
    registry_key: Option<agora_common::keys::PublicKey>,
    /// Run without CURVE encryption and authentication: local experiments only; refused
    /// unless every endpoint is loopback.
    #[arg(long)]
    insecure: bool,
    /// The group owner's CURVE public key (a user's key; `user-cli keys` shows it)
    /// [default: the node's own key].
    #[arg(long, env = "AGORA_OWNER", allow_hyphen_values = true)]
    owner: Option<agora_common::keys::PublicKey>,
    /// Make the group private: only invited keys may join, and non-members see nothing.
    #[arg(long)]
    private: bool,
    /// Requests per second allowed per peer (0: no limit); over it, `rate_limited`.
    #[arg(long, env = "AGORA_RATE_LIMIT", default_value_t = 2_000.0)]
    rate_limit: f64,
    /// Requests a peer may send at once after being idle.
    #[arg(long, env = "AGORA_RATE_BURST", default_value_t = 4_000.0)]
    rate_burst: f64,
}

/// A `--store` value: a PostgreSQL URL.
fn postgres_url(value: &str) -> Result<String, String> {
    if agora_group_node::store::postgres::is_postgres_url(value) {
        Ok(value.to_owned())
    } else {
        Err(
            "expected a PostgreSQL URL, postgres://… or postgresql://… (without --store, \
             the log is SQLite in the data directory)"
                .to_owned(),
        )
    }
}

/// A failure of `run`: what to print and the exit status.
struct Failure {
    exit: Exit,
    error: anyhow::Error,
}

/// Tags an error with its exit status.
trait ExitWith<T> {
    fn exit_with(self, exit: Exit) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> ExitWith<T> for Result<T, E> {
    fn exit_with(self, exit: Exit) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            exit,
            error: e.into(),
        })
    }
}

fn fail<T>(exit: Exit, error: anyhow::Error) -> Result<T, Failure> {
    Err(Failure { exit, error })
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `group-node host …` parses on its own; anything else is a node's command line.
    let command = if is_host_command(&argv) {
        let without_host = argv.iter().take(1).chain(argv.iter().skip(2));
        Err(HostArgs::parse_from(without_host).command)
    } else {
        Ok(Args::parse_from(&argv))
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match command {
        Ok(args) => run(args),
        Err(host) => host_cmd::run(host),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { exit, error }) => {
            eprintln!("group-node: {error:#}");
            exit.code()
        }
    }
}

/// `group-node host import|export`: a command line of its own, parsed only when the first
/// argument is `host` and the second one of its words ([`is_host_command`]), so that a
/// node's arguments parse exactly as before (a group named `host` included).
#[derive(Debug, Parser)]
#[command(
    name = "group-node host",
    bin_name = "group-node host",
    version,
    about = "Move groups into or out of a group host's data directory, the host stopped: \
             a group travels as a directory laid out as a node of one's (group.sqlite3, blobs/).",
    long_about = None
)]
struct HostArgs {
    #[command(subcommand)]
    command: HostCommand,
}

/// Whether `argv` is `group-node host import|export|help …` (or `host` alone, or its
/// `--help`) rather than a node of a group named `host`.
fn is_host_command(argv: &[std::ffi::OsString]) -> bool {
    argv.get(1).is_some_and(|a| a == "host")
        && argv.get(2).is_none_or(|a| {
            ["import", "export", "help", "-h", "--help"]
                .iter()
                .any(|w| a == *w)
        })
}

/// `group-node host import|export`: a group moves as a directory laid out as a node of
/// one's data directory (`group.sqlite3` and `blobs/`). Both refuse (exit 4) while a
/// group-node holds a data directory they read or write.
#[derive(Debug, clap::Subcommand)]
enum HostCommand {
    /// Copy groups into a group host (its data directory; the host stopped).
    ///
    /// Each group comes with its log (seqs, ids, times), members, grants, mode, owner and
    /// attachments, under a new gid. A name the host has already is skipped (exit 1). The
    /// sources stay as they were. The registry still binds each name to the key that served
    /// it: free it with `registry release NAME` before starting the host.
    Import {
        /// The group host's data directory (made if missing).
        #[arg(long, env = "AGORA_DATA_DIR", value_name = "DIR")]
        data_dir: PathBuf,
        /// A stopped group node's --data-dir, or a directory `host export` wrote
        /// (repeatable).
        #[arg(value_name = "SOURCE", required = true)]
        sources: Vec<PathBuf>,
        /// The owner of the imported groups: the --owner the node of one was started with
        /// (a node keeps it in its flags, not its files) [default: the owner stored with the
        /// group; for a node of one's group, the host's key].
        #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
        owner: Option<agora_common::keys::PublicKey>,
    },
    /// Write one group of a group host into a new directory (the host stopped).
    ///
    /// The directory is laid out as a node of one's data directory (`group.sqlite3`,
    /// `blobs/`), for `host import` on another host.
    Export {
        /// The group's name.
        name: GroupName,
        /// The group host's data directory.
        #[arg(long, env = "AGORA_DATA_DIR", value_name = "DIR")]
        data_dir: PathBuf,
        /// Where to write it: a new (or empty) directory.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Then archive the group on this host (a move): the host serves it no more and its
        /// name is free here; its rows stay.
        #[arg(long)]
        archive: bool,
    },
}

/// `--creators`: `any`, or Z85 public keys separated by commas.
fn creators(value: &str) -> Result<agora_group_node::host::Creators, String> {
    if value == "any" {
        return Ok(agora_group_node::host::Creators::Any);
    }
    value
        .split(',')
        .map(|k| {
            k.trim()
                .parse()
                .map_err(|e| format!("{k:?} is not a Z85 public key ({e}); give `any` or keys"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(agora_group_node::host::Creators::Keys)
}

/// What the arguments say together, checked before anything is created.
///
/// # Errors
/// A usage error naming the argument.
fn check_usage(args: &Args) -> anyhow::Result<()> {
    let addr = args.bind_addr();
    let host = addr.rsplit_once(':').map_or("", |(h, _)| h);
    let wildcard = matches!(
        Endpoint::new(format!("{host}:1")),
        Err(agora_proto::wire::NameError::Endpoint {
            problem: agora_proto::wire::EndpointProblem::Wildcard(_),
            ..
        })
    );
    if wildcard && !args.no_registry && args.advertise.is_none() {
        anyhow::bail!(
            "ADDRESS {:?} is a wildcard, which members cannot connect to; add --advertise \
             IP:PORT (the address members reach this node at), or bind one address",
            addr
        );
    }
    if args.host.is_some() && args.store.is_some() && args.insecure && args.host_id.is_none() {
        anyhow::bail!(
            "--host with --store and --insecure: pass --host-id ID, the name of the host's \
             schema that its standbys give too (without --insecure it is the host's public key)"
        );
    }
    if args.insecure {
        let mut endpoints = vec![("ADDRESS", addr.to_owned())];
        if !args.no_registry && args.registry != "auto" {
            endpoints.extend(
                agora_common::client::registry_endpoints(&args.registry)
                    .into_iter()
                    .map(|e| ("--registry", e)),
            );
        }
        endpoints.extend(
            args.advertise
                .iter()
                .map(|e| ("--advertise", e.to_string())),
        );
        if let Some((arg, e)) = endpoints
            .into_iter()
            .find(|(_, e)| !agora_proto::wire::is_loopback(e))
        {
            anyhow::bail!(
                "--insecure is allowed only on loopback endpoints, and {arg} is {e:?}; \
                 drop --insecure (CURVE needs no setup) or use 127.0.0.1"
            );
        }
    }
    Ok(())
}

impl Args {
    /// The address to bind: ADDRESS, or --host's.
    fn bind_addr(&self) -> &str {
        self.host
            .as_deref()
            .or(self.addr.as_deref())
            .unwrap_or_default()
    }
}

fn run(mut args: Args) -> Result<(), Failure> {
    check_usage(&args).exit_with(Exit::Usage)?;
    let name = match args.name.take() {
        Some(name) => name,
        // A group host's own name, for its logs: it serves the groups of its database.
        None => GroupName::new("group host")
            .context("the group host's name")
            .exit_with(Exit::Usage)?,
    };
    let addr = args.bind_addr().to_owned();
    let data_dir = match args.data_dir.take() {
        Some(d) => d,
        None => default_data_dir(&name)
            .context("no home directory to derive a data directory from; pass --data-dir")
            .exit_with(Exit::Usage)?,
    };
    // Before anything exists: a busy port is reported now, not after a key pair and a data
    // directory were made (and the bind below still reports a port taken meanwhile).
    agora_common::server::check_bindable(&addr)
        .with_context(|| format!("cannot bind {addr}; choose another port (0 binds a free one)"))
        .exit_with(Exit::LocalIo)?;
    // The metrics port too, before anything exists and before the `listening` line; it
    // answers once the node serves.
    let metrics = agora_common::metrics::MetricsListener::bind_flag(args.metrics.as_deref())
        .exit_with(Exit::LocalIo)?;
    let shutdown = Shutdown::on_signals()
        .context("installing signal handlers")
        .exit_with(Exit::LocalIo)?;
    if args.registry == "auto" && !args.no_registry {
        let (chosen, key) = agora_common::beacon::auto(
            args.beacon_port,
            args.discover_wait,
            args.registry_name.as_deref(),
            &data_dir.join("known_servers.json"),
            args.registry_key,
            args.insecure,
        )
        .map_err(|e| {
            use agora_common::beacon::{AutoError, DiscoverError, HeardKeyError};
            let exit = match &e {
                AutoError::Listen { .. } => Exit::LocalIo,
                // None heard, or none of the name asked for: no such registry reachable.
                AutoError::Discover(
                    DiscoverError::NoneHeard { .. } | DiscoverError::NoneNamed { .. },
                ) => Exit::Unreachable,
                // Several heard and no --registry-name to choose: say which.
                AutoError::Discover(_) => Exit::Usage,
                AutoError::Key(HeardKeyError::Trust(agora_common::trust::TrustError::File {
                    ..
                })) => Exit::LocalIo,
                // A changed key, or a registry without one: refused.
                AutoError::Key(_) => Exit::Refused,
            };
            Failure {
                exit,
                error: e.into(),
            }
        })?;
        args.registry = chosen.endpoint;
        args.registry_key = key;
    }
    let mut config = Config::new(name, addr.clone(), data_dir);
    config.host = args.host.is_some();
    config.groups = std::mem::take(&mut args.groups);
    config.max_groups = args.max_groups;
    config.creators = args.creators.take().unwrap_or_default();
    config.max_groups_per_key = args.max_groups_per_key;
    config.advertise = args.advertise;
    config.registry = (!args.no_registry).then(|| args.registry.clone());
    config.max_message_bytes = args.max_message_bytes;
    config.max_file_bytes = args.max_file_bytes;
    config.upload_ttl = args.upload_ttl;
    config.upload_quota = args.upload_quota;
    config.disk_reserve_bytes = args.disk_reserve_bytes;
    config.max_uploads_per_member = args.max_uploads_per_member;
    config.retention = Retention {
        max_messages: args.max_messages,
        max_age: args.max_age,
    };
    config.heartbeat = args.heartbeat;
    config.max_members = args.max_members;
    config.lease = args.lease;
    config.max_subscribers = args.max_subscribers;
    config.max_subscriptions_per_member = args.max_subscriptions_per_member;
    config.sndhwm = args.sndhwm;
    config.fault_drop_push_every = args.fault_drop_push_every;
    config.push_budget_bytes = args.push_budget;
    config.push_budget_total_bytes = args.push_budget_total;
    config.registry_key = args.registry_key;
    config.wal_prealloc_bytes = args.wal_prealloc;
    let ctx = zmq::Context::new();
    if let (false, false, None) = (args.insecure, args.no_registry, args.registry_key) {
        let (key, trust) = agora_common::trust::registry_list_key(
            &ctx,
            &config.data_dir.join("known_servers.json"),
            &args.registry,
            args.registry_key_endpoint.as_ref().map(Endpoint::as_str),
            None,
            Duration::from_secs(2),
        )
        .map_err(trust_failure)?;
        if trust == agora_common::trust::Trust::FirstUse {
            tracing::warn!(%key, registry = %args.registry,
                "pinned the registry key on first use; compare it with the key the registry printed");
        }
        config.registry_key = Some(key);
    }
    config.insecure = args.insecure;
    config.owner = args.owner;
    config.private = args.private;
    config.rate_limit = agora_common::ratelimit::RateLimit {
        rate: args.rate_limit,
        burst: args.rate_burst,
        ..Default::default()
    };
    config.store = args.store.as_ref().map(|url| {
        PgTarget::new(url.clone())
            .with_tls(agora_common::pgtls::PgTlsFiles {
                ca: args.store_ca.clone(),
                cert: args.store_cert.clone(),
                key: args.store_key.clone(),
            })
            .with_net_timeout(args.store_net_timeout)
    });
    // Before the lease: a node whose key is not the name's owner would hold the lease while
    // the registry refuses it, blocking every standby that has the right key.
    check_owner(&ctx, &config)?;
    // With --store too, one node per data directory: the lock is taken before the lease,
    // so a second node on the same directory fails now instead of waiting as a standby.
    let made_dir = agora_group_node::first_missing(&config.data_dir);
    let lock = match &config.store {
        Some(_) => Some(
            agora_group_node::lock_data_dir(&config.data_dir).map_err(|e| {
                if let Some(made) = &made_dir {
                    agora_group_node::unmake_data_dir(&config.data_dir, made);
                }
                node_failure(e)
            })?,
        ),
        None => None,
    };
    // A start that fails before the node is bound leaves no directory it made.
    let undo = |failure: Failure| {
        if let Some(made) = &made_dir {
            agora_group_node::unmake_data_dir(&config.data_dir, made);
        }
        failure
    };
    // A group host on PostgreSQL: its schema and lease are named by its host id, its public
    // key by default (made now if the data directory has none, so that the lease taken here
    // and the store opened at bind name the same schema).
    if config.host && config.store.is_some() {
        let id = match args.host_id.take() {
            Some(id) => id,
            None => {
                agora_common::keys::Keypair::load_or_generate(&config.data_dir.join("node.key"))
                    .context("the node's key pair")
                    .exit_with(Exit::LocalIo)
                    .map_err(undo)?
                    .0
                    .public
                    .to_string()
            }
        };
        config.host_id = Some(id);
    }
    let lease = match &config.store {
        Some(target) => {
            target
                .connector()
                .exit_with(Exit::LocalIo)
                .map_err(undo)?
                .warn_if_plain();
            let mut lease_config = match (&config.host_id, config.host) {
                (Some(id), true) => LeaseConfig::of(
                    target.clone(),
                    agora_group_node::store::PgSchema::Host(id.clone()),
                ),
                _ => LeaseConfig::new(target.clone(), config.name.clone()),
            };
            lease_config.poll = args.failover_poll;
            lease_config.check = args.failover_check;
            lease_config.timeout = args.failover_timeout;
            let acquired = Lease::acquire(&lease_config, &shutdown).map_err(|e| match e {
                StoreError::Postgres(pg) if agora_common::pgtls::is_unreachable(&pg) => {
                    let url = target.url();
                    let error = if pg.as_db_error().is_some() {
                        anyhow::anyhow!("{}", agora_common::pgtls::explain(url, &pg))
                    } else {
                        let cause = agora_common::pgtls::explain(url, &pg);
                        // A failed TLS handshake is an answer, and the fix is the CA.
                        let check = if cause.contains("certificate") || cause.contains("TLS") {
                            "check that --store-ca holds the CA that signed its certificate"
                        } else {
                            "check that PostgreSQL runs there"
                        };
                        anyhow::anyhow!(
                            "{cause} (still failing after --failover-timeout {}); {check}",
                            agora_common::human_duration(args.failover_timeout)
                        )
                    };
                    undo(Failure {
                        exit: Exit::Unreachable,
                        error,
                    })
                }
                e => undo(Failure {
                    exit: Exit::LocalIo,
                    error: anyhow::Error::new(e).context("taking the lease"),
                }),
            })?;
            match acquired {
                Some(lease) => Some(lease),
                // Stopped while a standby.
                None => return Ok(()),
            }
        }
        None => None,
    };
    let store = args.store.clone();
    let node = Node::bind_leased(&ctx, config, lease, lock)
        .map_err(|e| store_failure(e, store.as_deref()))?;
    let announce = || -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match node.public_key() {
            Some(key) => writeln!(out, "listening {} public-key {key}", node.endpoint())?,
            None => writeln!(out, "listening {}", node.endpoint())?,
        }
        out.flush()
    };
    announce().exit_with(Exit::LocalIo)?;
    // Every request series at 0 before the first scrape (rate() needs a start).
    agora_common::metrics::register_requests(agora_proto::action::Role::Node);
    let _metrics = metrics
        .map(agora_common::metrics::MetricsListener::serve)
        .transpose()
        .exit_with(Exit::LocalIo)?;
    node.run(&shutdown)
        .map_err(|e| store_failure(e, store.as_deref()))?;
    Ok(())
}

/// Why the registry's key could not be had, said once, with its exit status: 3 when its
/// key endpoint did not answer (named, with the wait as given), 4 for the pins' file, 1
/// for a changed key.
fn trust_failure(e: agora_common::trust::TrustError) -> Failure {
    use agora_common::client::ClientError;
    use agora_common::trust::TrustError;
    match e {
        TrustError::Unknown {
            endpoint,
            key_endpoint,
            source: ClientError::Timeout { waited, .. },
        } => Failure {
            exit: Exit::Unreachable,
            error: anyhow::anyhow!(
                "registry {endpoint}: unreachable: its key endpoint {key_endpoint} gave no key \
                 within {}; check that the registry runs there, or pass --registry-key",
                agora_common::human_duration(waited)
            ),
        },
        e => {
            let exit = match e {
                TrustError::Unknown { .. } => Exit::Unreachable,
                TrustError::File { .. } => Exit::LocalIo,
                _ => Exit::Refused,
            };
            Failure {
                exit,
                error: e.into(),
            }
        }
    }
}

/// The exit status of a node failure, and its text: a PostgreSQL failure names `--store`
/// and where it points (`store`, the URL; never its password), its cause said once.
fn store_failure(e: NodeError, store: Option<&str>) -> Failure {
    if let (NodeError::Store(StoreError::Postgres(pg)), Some(url)) = (&e, store) {
        let exit = if agora_common::pgtls::is_unreachable(pg) {
            Exit::Unreachable
        } else {
            Exit::LocalIo
        };
        return Failure {
            exit,
            error: anyhow::anyhow!("{}", agora_common::pgtls::explain(url, pg)),
        };
    }
    node_failure(e)
}

/// The exit status of a node failure.
fn node_failure(e: NodeError) -> Failure {
    let exit = match &e {
        NodeError::InsecureNotLoopback(_)
        | NodeError::NoRegistryKey
        | NodeError::HostOnPostgres
        | NodeError::TooManyGroups(_) => Exit::Usage,
        NodeError::LeaseLost => Exit::Refused,
        NodeError::Store(StoreError::Postgres(pg)) if pg.as_db_error().is_none() => {
            Exit::Unreachable
        }
        _ => Exit::LocalIo,
    };
    Failure {
        exit,
        error: e.into(),
    }
}

/// Asks the registry which key owns the group's name, and stops (exit 1) when it is not
/// this node's: a standby started without the active node's `node.key*` would otherwise
/// make a key pair of its own, take the lease and be refused `name_taken` for ever. Nothing
/// is created here: without a key pair in the data directory, a name that is bound already
/// belongs to another key. A registry that does not answer, or does not know `owner`, is
/// logged and the node goes on (the heartbeat keeps trying, as before).
fn check_owner(ctx: &zmq::Context, config: &Config) -> Result<(), Failure> {
    let (Some(registry), Some(server_key), false) =
        (&config.registry, config.registry_key, config.insecure)
    else {
        return Ok(());
    };
    let key_path = config.data_dir.join("node.key");
    let ours = if agora_common::keys::secret_path(&key_path).exists() {
        Some(
            agora_common::keys::Keypair::load(&key_path)
                .context("the node's key pair")
                .exit_with(Exit::LocalIo)?,
        )
    } else {
        None
    };
    // Without a key pair yet, ask with a throwaway one: `owner` is open to anyone.
    let keypair = match &ours {
        Some(k) => k.clone(),
        None => agora_common::keys::Keypair::generate().exit_with(Exit::LocalIo)?,
    };
    let mut client = agora_common::client::RegistryClient::new(
        ctx,
        registry,
        agora_common::client::ClientOptions {
            timeout: Duration::from_secs(2),
            attempts: 1,
        },
    )
    .with_curve(agora_common::client::ClientCurve {
        keypair,
        server_key,
    });
    let owner = match client.owner(&config.name) {
        Ok(owner) => owner,
        Err(e) => {
            tracing::warn!(%registry, error = %e,
                "could not ask the registry who owns the group name; going on");
            return Ok(());
        }
    };
    match (owner, ours) {
        (None, _) => Ok(()),
        (Some(owner), Some(ours)) if owner == ours.public => Ok(()),
        (Some(owner), ours) => {
            let dir = config.data_dir.display();
            let mine = match ours {
                Some(k) => format!("this node's key is {} ({dir}/node.key)", k.public),
                None => format!("this node has no key pair in {dir}"),
            };
            fail(
                Exit::Refused,
                anyhow::anyhow!(
                    "the registry binds group \"{}\" to the key {owner}, and {mine}: copy node.key \
                     and node.key_secret from the data directory of the node that serves it into \
                     {dir} (mode 0600 for the secret), or free the name with `registry release`",
                    config.name
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_argument_definitions_are_consistent() {
        super::Args::command().debug_assert();
        super::HostArgs::command().debug_assert();
    }

    #[test]
    fn host_is_a_command_only_before_its_words_and_a_group_named_host_is_served() {
        let argv = |a: &[&str]| a.iter().map(|s| s.into()).collect::<Vec<_>>();
        assert!(super::is_host_command(&argv(&[
            "group-node",
            "host",
            "import"
        ])));
        assert!(super::is_host_command(&argv(&[
            "group-node",
            "host",
            "--help"
        ])));
        assert!(super::is_host_command(&argv(&["group-node", "host"])));
        assert!(!super::is_host_command(&argv(&[
            "group-node",
            "host",
            "127.0.0.1:5560"
        ])));
        assert!(!super::is_host_command(&argv(&[
            "group-node",
            "--host",
            "127.0.0.1:0"
        ])));
        assert!(!super::is_host_command(&argv(&[
            "group-node",
            "news",
            "import"
        ])));
    }
}
