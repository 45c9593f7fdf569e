//! `registry`: the Agora group directory.
//!
//! Arguments are checked before anything is created (no socket, key pair, data directory
//! or database schema for a command that fails on them), and the ports are checked to be
//! bindable before the store is opened.
//!
//! # Exit codes
//! - 0: a clean stop (SIGINT, SIGTERM or the operator's `stop`); `release` freed the name.
//! - 1: `release` of a name that is bound to no key, or refused by the running registry.
//! - 2: usage: a bad argument (a port past 65535, a malformed endpoint, an unknown scheme,
//!   `--insecure` off loopback, `--beacon-address` without `--beacon`, `--beacon-port 0`).
//! - 3: unreachable: PostgreSQL (`--store`) cannot be reached at start, or refuses this
//!   registry (authentication failed, the database does not exist); the running registry
//!   that `release` asks does not answer.
//! - 4: local input or output: a port that cannot be bound (`--bind`, `--key-bind`,
//!   `--metrics`), the data directory, the key pair or the store's files; `release` with
//!   no registry database in `--data-dir`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use agora_common::server::{args as check, Exit};
use agora_common::shutdown::Shutdown;
use agora_registry::{Config, Registry, DEFAULT_BIND};
use anyhow::Context;
use clap::Parser;

/// The Agora registry: group nodes register and heartbeat here; clients list and look up
/// groups. Prints `listening ENDPOINT` on stdout once bound; logs go to stderr (RUST_LOG).
#[derive(Debug, Parser)]
#[command(name = "registry", version, about)]
struct Args {
    /// Endpoint to bind, IP:PORT or tcp://HOST:PORT; port 0 binds a free port.
    #[arg(long, env = "AGORA_REGISTRY_BIND", default_value = DEFAULT_BIND, value_parser = check::bind)]
    bind: String,
    /// Heartbeat interval expected from group nodes (for example 2s, 500ms).
    #[arg(long, env = "AGORA_HEARTBEAT", default_value = "2s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Missed heartbeats after which a group expires.
    #[arg(long, env = "AGORA_TTL_INTERVALS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    ttl_intervals: u32,
    /// Most groups held at once.
    #[arg(long, env = "AGORA_MAX_GROUPS", default_value_t = 10_000)]
    max_groups: usize,
    /// Directory of the registry's key pair and, without --store, its SQLite database
    /// [default: ~/.local/share/agora/registry].
    #[arg(long, env = "AGORA_REGISTRY_DATA_DIR", global = true)]
    data_dir: Option<std::path::PathBuf>,
    /// Keep everything (directory, presence, accounts, owners, mailboxes, the key pair) in
    /// this PostgreSQL database (postgres://… or postgresql://…, schema agora_registry);
    /// registries given the same one act as one registry. Without it: SQLite in --data-dir
    /// and memory, one registry.
    #[arg(long, env = "AGORA_REGISTRY_STORE", hide_env_values = true, value_parser = store_url, global = true)]
    store: Option<String>,
    /// PEM file of the CA certificates that PostgreSQL's server certificate must chain to:
    /// the connection is then TLS, checked against the URL's host name. Without it, TLS is
    /// used only when the URL says sslmode=require (checked against the system's trust
    /// store).
    #[arg(
        long,
        env = "AGORA_REGISTRY_STORE_CA",
        requires = "store",
        global = true
    )]
    store_ca: Option<std::path::PathBuf>,
    /// PEM file of a client certificate (chain, leaf first) to present to PostgreSQL, for
    /// servers that authenticate by certificate (cert in pg_hba.conf: its CN names the
    /// role). Makes the connection TLS.
    #[arg(long, env = "AGORA_REGISTRY_STORE_CERT", requires_all = ["store", "store_key"], global = true)]
    store_cert: Option<std::path::PathBuf>,
    /// PEM file of the private key of --store-cert; mode 0600 or less (0640 if root owns
    /// it), as libpq requires.
    #[arg(
        long,
        env = "AGORA_REGISTRY_STORE_KEY",
        requires = "store_cert",
        global = true
    )]
    store_key: Option<std::path::PathBuf>,
    /// Run without CURVE encryption and authentication: local experiments only; refused
    /// unless the bind endpoint is loopback.
    #[arg(long)]
    insecure: bool,
    /// How long a direct message waits unread before it expires to the sender's dead letters.
    #[arg(long, env = "AGORA_DM_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    dm_ttl: Duration,
    /// Most user accounts.
    #[arg(long, env = "AGORA_MAX_USERS", default_value_t = 100_000)]
    max_users: u64,
    /// Most direct messages waiting in one mailbox; more are dead-lettered.
    #[arg(long, env = "AGORA_MAX_MAILBOX", default_value_t = 1000)]
    max_mailbox: u64,
    /// The share of one mailbox a single sender may fill, in percent of --max-mailbox
    /// (rounded up, at least one message); past it, `share_full` (dead-lettered).
    #[arg(long, env = "AGORA_DM_SHARE", default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=100))]
    dm_share: u8,
    /// Direct messages per second one sender may send (send_dm, multicast, broadcast; 0: no
    /// limit); past it, `rate_limited`.
    #[arg(long, env = "AGORA_DM_RATE", default_value_t = 10.0)]
    dm_rate: f64,
    /// Direct messages one sender may send at once after being idle.
    #[arg(long, env = "AGORA_DM_BURST", default_value_t = 100.0)]
    dm_burst: f64,
    /// Most group names one node key may own (a group host serves many groups with one
    /// key); past it, `too_many_names`.
    #[arg(long, env = "AGORA_MAX_NAMES_PER_KEY", default_value_t = 100)]
    max_names_per_key: u64,
    /// A group host's CURVE public key (40 Z85 characters; repeat the flag for several):
    /// it may own up to --max-groups names instead of --max-names-per-key.
    #[arg(
        long = "host-key",
        env = "AGORA_HOST_KEYS",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    host_keys: Vec<agora_common::keys::PublicKey>,
    /// How long a group name stays bound to its key after its group last registered; then
    /// the name is free for any key (for example 30d, 12h).
    #[arg(long, env = "AGORA_NAME_LAPSE", default_value = "30d", value_parser = humantime::parse_duration)]
    name_lapse: Duration,
    /// How long a user's session lives without a renewal (presence TTL).
    #[arg(long, env = "AGORA_PRESENCE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    presence_ttl: Duration,
    /// Where the plaintext key endpoint (which tells clients the public key for pinning on
    /// first use) binds [default: the same host, the next port].
    #[arg(long, env = "AGORA_REGISTRY_KEY_BIND", value_parser = check::bind)]
    key_bind: Option<String>,
    /// Requests per second allowed per peer (0: no limit); over it, `rate_limited`.
    #[arg(long, env = "AGORA_RATE_LIMIT", default_value_t = 2_000.0)]
    rate_limit: f64,
    /// Requests a peer may send at once after being idle.
    #[arg(long, env = "AGORA_RATE_BURST", default_value_t = 4_000.0)]
    rate_burst: f64,
    /// Serve Prometheus metrics (`/metrics`) and health (`/healthz`: 200 serving, 503
    /// draining) over HTTP on this IP:PORT, or on loopback with a bare PORT (9100 is
    /// 127.0.0.1:9100; port 0 picks one). Bind a non-loopback address only where the
    /// network is trusted. Off unless given.
    #[arg(long, env = "AGORA_METRICS", value_parser = check::metrics)]
    metrics: Option<String>,
    /// The operator's CURVE public key (40 Z85 characters): the one key whose `stop`
    /// (`user-cli admin stop-registry`) is accepted. Without it only SIGINT or SIGTERM stop
    /// the registry.
    #[arg(long, env = "AGORA_OPERATOR", allow_hyphen_values = true)]
    operator: Option<agora_common::keys::PublicKey>,
    /// Accounts that may `broadcast` to every user besides the operator (comma-separated
    /// names, or the flag repeated).
    #[arg(long = "admin", env = "AGORA_ADMINS", value_delimiter = ',')]
    admins: Vec<agora_proto::wire::UserName>,
    /// This registry's name in its beacon, by which clients choose among several
    /// (`--registry-name`); 1 to 64 bytes.
    #[arg(long, env = "AGORA_REGISTRY_NAME", default_value = "agora", value_parser = registry_name)]
    name: String,
    /// Announce this registry on the LAN: a UDP beacon every second to --beacon-address
    /// (PROTOCOL §10; the zbeacon pattern). Off unless given; AGORA_BEACON=true (or 1, yes,
    /// on) turns it on from the environment, false (0, no, off) leaves it off.
    #[arg(long, env = "AGORA_BEACON", value_parser = clap::builder::BoolishValueParser::new())]
    beacon: bool,
    /// The IPv4 broadcast address the beacon goes to: the LAN's (such as 192.168.1.255), or
    /// 127.255.255.255 for this machine only. No default: nothing is broadcast by accident.
    /// Needs --beacon: without it, a usage error (exit 2), not a silent no-op.
    #[arg(long, env = "AGORA_BEACON_ADDRESS")]
    beacon_address: Option<std::net::Ipv4Addr>,
    /// The UDP port the beacon goes to (the zbeacon convention); 1-65535.
    #[arg(long, env = "AGORA_BEACON_PORT", default_value_t = agora_proto::beacon::BEACON_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    beacon_port: u16,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Free a group name from the key that owns it, so another node's key can register it.
    /// Works while the registry runs (same --data-dir, or the same --store): a running
    /// SQLite registry holds its database alone, so it is asked instead, at the endpoint it
    /// wrote to registry.endpoint in --data-dir, with its own key pair from there.
    Release {
        /// The group name.
        name: agora_proto::wire::GroupName,
    },
}

/// `--store`: a PostgreSQL URL, else an argument error (exit 2).
fn store_url(url: &str) -> Result<String, String> {
    if agora_registry::store::is_postgres_url(url) {
        Ok(url.to_owned())
    } else {
        Err("a PostgreSQL URL, postgres://… or postgresql://…".into())
    }
}

fn registry_name(name: &str) -> Result<String, String> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err("a name of 1 to 64 bytes without control characters".into());
    }
    Ok(name.to_owned())
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

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { exit, error }) => {
            eprintln!("registry: {error:#}");
            exit.code()
        }
    }
}

/// What the arguments say together, checked before anything is created.
///
/// # Errors
/// A usage error naming the argument.
fn check_usage(args: &Args) -> anyhow::Result<()> {
    if args.beacon && args.beacon_address.is_none() {
        anyhow::bail!(
            "--beacon needs --beacon-address (AGORA_BEACON_ADDRESS): the LAN's broadcast \
             address, such as 192.168.1.255, or 127.255.255.255 for this machine only"
        );
    }
    if let (Some(address), false) = (args.beacon_address, args.beacon) {
        anyhow::bail!(
            "--beacon-address {address} without --beacon announces nothing: add --beacon \
             (or AGORA_BEACON=true) to announce this registry, or drop --beacon-address"
        );
    }
    if args.insecure && args.command.is_none() {
        let key_bind = args.key_bind.iter().map(|e| ("--key-bind", e));
        if let Some((arg, e)) = std::iter::once(("--bind", &args.bind))
            .chain(key_bind)
            .find(|(_, e)| !agora_proto::wire::is_loopback(e))
        {
            anyhow::bail!(
                "--insecure is allowed only on loopback endpoints, and {arg} is {e:?}; \
                 drop --insecure (CURVE needs no setup) or bind 127.0.0.1"
            );
        }
    }
    Ok(())
}

/// The exit status of a registry failure, and its text: a PostgreSQL failure names
/// `--store` and where it points (`store`, the URL; never its password), and says its
/// cause once.
fn registry_failure(e: agora_registry::RegistryError, store: Option<&str>) -> Failure {
    use agora_registry::store::StoreError;
    use agora_registry::RegistryError;
    if let (RegistryError::Store(StoreError::Postgres(pg)), Some(url)) = (&e, store) {
        // Unreachable, or refusing this registry (authentication, no such database): 3.
        let exit = if agora_common::pgtls::is_unreachable(pg) {
            Exit::Unreachable
        } else {
            Exit::LocalIo
        };
        let advice = if pg.as_db_error().is_none() {
            "; check that PostgreSQL runs there"
        } else {
            ""
        };
        return Failure {
            exit,
            error: anyhow::anyhow!("{}{advice}", agora_common::pgtls::explain(url, pg)),
        };
    }
    let exit = match &e {
        RegistryError::InsecureNotLoopback(_) => Exit::Usage,
        RegistryError::Store(StoreError::Postgres(pg)) if pg.as_db_error().is_none() => {
            Exit::Unreachable
        }
        _ => Exit::LocalIo,
    };
    Failure {
        exit,
        error: e.into(),
    }
}

/// The TLS files for PostgreSQL the flags give.
fn store_tls(args: &Args) -> agora_common::pgtls::PgTlsFiles {
    agora_common::pgtls::PgTlsFiles {
        ca: args.store_ca.clone(),
        cert: args.store_cert.clone(),
        key: args.store_key.clone(),
    }
}

/// How long `registry release` waits for a running registry's answer.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// `registry release NAME`: frees the name in the `--store` database, or in the SQLite
/// database of `--data-dir`; a running SQLite registry holds that database alone, so then
/// the running registry is asked ([`release_by_running`]).
fn release(args: &Args, name: &agora_proto::wire::GroupName) -> Result<(), Failure> {
    let dir = args.data_dir.clone().unwrap_or(Config::default().data_dir);
    let released = match &args.store {
        Some(url) => {
            let mut store = agora_registry::store::open(
                Some(url),
                &store_tls(args),
                &dir,
                release_settings(args),
                true,
            )
            .map_err(|e| registry_failure(e.into(), Some(url)))?;
            store
                .release_group(name)
                .map_err(|e| registry_failure(e.into(), Some(url)))?
        }
        None => {
            use agora_registry::owners::{is_busy, Owners};
            // A typo in --data-dir must not make a database (nor the directory).
            let db = dir.join("registry.sqlite3");
            if !db.exists() {
                return Err(Failure {
                    exit: Exit::LocalIo,
                    error: anyhow::anyhow!(
                        "no registry database in {} ({} does not exist); pass the --data-dir \
                         the registry runs with, or --store",
                        dir.display(),
                        db.display()
                    ),
                });
            }
            // A running registry holds the lock for good: waiting longer gains nothing, a
            // moment covers another `release` run at the same time.
            match Owners::open_waiting(&dir, Duration::from_millis(200)) {
                Ok(owners) => owners
                    .release(name)
                    .with_context(|| format!("releasing \"{name}\" in {}", dir.display()))
                    .exit_with(Exit::LocalIo)?,
                Err(e) if is_busy(&e) => release_by_running(&dir, name)?,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("opening the database in {}", dir.display()))
                        .exit_with(Exit::LocalIo)
                }
            }
        }
    };
    if released {
        println!("released \"{name}\"");
        return Ok(());
    }
    let error = match &args.store {
        Some(_) => anyhow::anyhow!("\"{name}\" is not bound to any key in the --store database"),
        None => anyhow::anyhow!("\"{name}\" is not bound to any key in {}", dir.display()),
    };
    Err(Failure {
        exit: Exit::Refused,
        error,
    })
}

/// The store settings the flags give (what `release` opens the `--store` database with).
fn release_settings(args: &Args) -> agora_registry::store::StoreSettings {
    Config {
        heartbeat: args.heartbeat,
        ttl_intervals: args.ttl_intervals,
        max_groups: args.max_groups,
        presence_ttl: args.presence_ttl,
        max_users: args.max_users,
        max_mailbox: args.max_mailbox,
        dm_share_percent: args.dm_share,
        max_names_per_key: args.max_names_per_key,
        name_lapse: args.name_lapse,
        ..Config::default()
    }
    .store_settings()
}

/// Asks the registry running on `dir` to release `name` (its `release` action), at the
/// endpoint it wrote to `dir/registry.endpoint`, over CURVE with its own key pair from
/// `dir`; true if the name was bound.
///
/// # Errors
/// Exit 4 when the endpoint file or the key pair cannot be read, 3 when the registry does
/// not answer, 1 when it refuses.
fn release_by_running(
    dir: &std::path::Path,
    name: &agora_proto::wire::GroupName,
) -> Result<bool, Failure> {
    use agora_common::client::{ClientCurve, ClientError, ClientOptions, RegistryClient};
    let file = dir.join(agora_registry::ENDPOINT_FILE);
    let endpoint = std::fs::read_to_string(&file)
        .with_context(|| {
            format!(
                "a running registry holds the database in {}, and {} does not say where it \
                 listens; run the command again once it has started, or stop it first",
                dir.display(),
                file.display()
            )
        })
        .exit_with(Exit::LocalIo)?;
    let endpoint = endpoint.trim();
    let key_path = dir.join("registry.key");
    let keypair = agora_common::keys::Keypair::load(&key_path)
        .with_context(|| {
            format!(
                "reading the registry's key pair {} to ask the running registry",
                key_path.display()
            )
        })
        .exit_with(Exit::LocalIo)?;
    let ctx = zmq::Context::new();
    let options = ClientOptions {
        timeout: RELEASE_TIMEOUT,
        ..ClientOptions::default()
    };
    let server_key = keypair.public;
    let mut client = RegistryClient::new(&ctx, endpoint, options).with_curve(ClientCurve {
        keypair,
        server_key,
    });
    match client.release(name) {
        Ok(released) => Ok(released),
        Err(ClientError::Timeout { .. }) => Err(Failure {
            exit: Exit::Unreachable,
            error: anyhow::anyhow!(
                "a running registry holds the database in {}, and it did not answer at {endpoint} \
                 (named in {}) within {}; is it still running?",
                dir.display(),
                file.display(),
                humantime::format_duration(RELEASE_TIMEOUT)
            ),
        }),
        Err(ClientError::Server(e)) => Err(Failure {
            exit: Exit::Refused,
            error: anyhow::anyhow!("the registry at {endpoint} refused: {e}"),
        }),
        Err(e) => Err(Failure {
            exit: Exit::Unreachable,
            error: anyhow::Error::new(e).context(format!("asking the registry at {endpoint}")),
        }),
    }
}

fn run(args: Args) -> Result<(), Failure> {
    check_usage(&args).exit_with(Exit::Usage)?;
    let shutdown = Shutdown::on_signals()
        .context("installing signal handlers")
        .exit_with(Exit::LocalIo)?;
    let defaults = Config::default();
    if let Some(Command::Release { name }) = &args.command {
        return release(&args, name);
    }
    // Before anything exists: a busy port is reported now, not after the data directory,
    // the key pair or the database schema were made (the bind reports one taken meanwhile).
    let key_bind = match &args.key_bind {
        Some(e) => Some(e.clone()),
        None if args.insecure || args.bind.ends_with(":0") || args.bind.ends_with(":*") => None,
        None => agora_common::trust::default_key_endpoint(&args.bind),
    };
    for (arg, endpoint) in
        std::iter::once(("--bind", &args.bind)).chain(key_bind.iter().map(|e| ("--key-bind", e)))
    {
        agora_common::server::check_bindable(endpoint)
            .with_context(|| {
                format!("cannot bind {arg} {endpoint}; choose another port (0 binds a free one)")
            })
            .exit_with(Exit::LocalIo)?;
    }
    // The metrics port too, before anything exists and before the `listening` line; it
    // answers once the registry serves.
    let metrics = agora_common::metrics::MetricsListener::bind_flag(args.metrics.as_deref())
        .exit_with(Exit::LocalIo)?;
    let store_tls = store_tls(&args);
    let config = Config {
        bind: args.bind,
        heartbeat: args.heartbeat,
        ttl_intervals: args.ttl_intervals,
        max_groups: args.max_groups,
        data_dir: args.data_dir.unwrap_or(defaults.data_dir),
        store: args.store,
        store_tls,
        insecure: args.insecure,
        rate_limit: agora_common::ratelimit::RateLimit {
            rate: args.rate_limit,
            burst: args.rate_burst,
            ..Default::default()
        },
        key_bind: args.key_bind,
        presence_ttl: args.presence_ttl,
        max_mailbox: args.max_mailbox,
        max_users: args.max_users,
        dm_ttl: args.dm_ttl,
        operator: args.operator,
        admins: args.admins,
        dm_share_percent: args.dm_share,
        dm_rate: agora_common::ratelimit::RateLimit {
            rate: args.dm_rate,
            burst: args.dm_burst,
            ..Default::default()
        },
        max_names_per_key: args.max_names_per_key,
        name_lapse: args.name_lapse,
        host_keys: args.host_keys,
    };
    let ctx = zmq::Context::new();
    let store = config.store.clone();
    let registry =
        Registry::bind(&ctx, config).map_err(|e| registry_failure(e, store.as_deref()))?;
    let announce = || -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match (registry.public_key(), registry.key_endpoint()) {
            (Some(key), Some(key_endpoint)) => writeln!(
                out,
                "listening {} public-key {key} key-endpoint {key_endpoint}",
                registry.endpoint()
            )?,
            _ => writeln!(out, "listening {}", registry.endpoint())?,
        }
        out.flush()
    };
    announce().exit_with(Exit::LocalIo)?;
    let _beacon = match (args.beacon, args.beacon_address) {
        (true, Some(address)) => {
            let to = std::net::SocketAddrV4::new(address, args.beacon_port);
            let beacon = agora_proto::beacon::Beacon::new(
                &args.name,
                registry.endpoint(),
                registry.public_key(),
            );
            tracing::info!(%to, name = %args.name, "announcing this registry by beacon");
            Some(
                agora_common::beacon::Beaconer::start(&beacon, to, Duration::from_secs(1))
                    .context("starting the beacon")
                    .exit_with(Exit::LocalIo)?,
            )
        }
        _ => None,
    };
    // Every request series at 0 before the first scrape (rate() needs a start).
    agora_common::metrics::register_requests(agora_proto::action::Role::Registry);
    let _metrics = metrics
        .map(agora_common::metrics::MetricsListener::serve)
        .transpose()
        .exit_with(Exit::LocalIo)?;
    registry
        .run(&shutdown)
        .map_err(|e| registry_failure(e, store.as_deref()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_argument_definitions_are_consistent() {
        super::Args::command().debug_assert();
    }
}
