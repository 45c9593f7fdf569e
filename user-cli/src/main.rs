//! `user-cli`: the Agora chat client.
//!
//! Without a subcommand it reads commands: from a prompt on a terminal, or line by line
//! from stdin otherwise (a scripted session). Subcommands run one command and exit.
//!
//! The user is `--user`, else `$USER`, else `$LOGNAME`, else the OS account name, else `me`
//! (never a failure: `env -i` and cron work); the prompt's greeting says who, and so does
//! the line that says a key pair was made. `discover`, `help`, `completions`, `manpage` and
//! `forget-registry` need no identity.
//!
//! Exit codes: 0 success; 1 a server refused the command (unknown group, not a member, no
//! such message, message too large, …); 2 usage (a bad argument, an endpoint libzmq
//! refuses, empty text, checked before anything is created: no key pair is made for a bad
//! `--registry`); 3 a server was unreachable within the timeout or gave a reply that could
//! not be read (a node, or the registry in every path, its key endpoint included); 4 local
//! input or output (input that is not UTF-8, a file, the state or key directory, stdout; a
//! closed stdout ends a one-shot command quietly with 0). A
//! session (the prompt, or lines on stdin) prints a failed line's error and goes on: its
//! exit status is 0, or N after `exit N`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use agora_common::client::ClientOptions;
use agora_common::shutdown::Shutdown;
use agora_proto::wire::UserName;
use clap::{CommandFactory, Parser};

mod app;
mod command;
mod render;
mod repl;
mod state;

use app::{App, CliError};
use command::{Command, Context, KeysAction};
use render::Format;

/// The Agora chat client. Run without a command for the interactive prompt (or a script on
/// stdin); `help` at the prompt lists its commands.
#[derive(Debug, Parser)]
#[command(
    name = "user-cli",
    version,
    about,
    next_help_heading = "Global options"
)]
struct Args {
    /// The registry's endpoint, IP:PORT or tcp://HOST:PORT, or `auto`: the registry heard on
    /// the LAN by its beacon (its key is then pinned on first use).
    /// Several registries sharing one database are given as a list, `tcp://A:5555,tcp://B:5555`:
    /// tried in order, and the next one used when one does not answer.
    #[arg(
        long,
        global = true,
        env = "AGORA_REGISTRY",
        default_value = "tcp://127.0.0.1:5555"
    )]
    registry: String,
    /// Your user name [default: $USER, else $LOGNAME, else the OS account name, else `me`].
    #[arg(long, global = true, env = "AGORA_USER")]
    user: Option<UserName>,
    /// Print results as JSON lines.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for a server, per command (the registry's key endpoint too when no
    /// key is pinned for it yet; once pinned, its check waits at most 1 s before the pin is
    /// used).
    #[arg(long, global = true, env = "AGORA_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    timeout: Duration,
    /// Where the client keeps joined groups and what was last seen
    /// [default: ~/.local/state/agora].
    #[arg(long, global = true, env = "AGORA_STATE_DIR")]
    state_dir: Option<std::path::PathBuf>,
    /// The registry's CURVE public key (40 Z85 characters; the registry prints it at start).
    #[arg(
        long,
        global = true,
        env = "AGORA_REGISTRY_KEY",
        allow_hyphen_values = true
    )]
    registry_key: Option<agora_common::keys::PublicKey>,
    /// The registry's plaintext key endpoint, asked when no key is given (the key is then
    /// pinned on first use) [default: the registry's host, the next port].
    #[arg(long, global = true, env = "AGORA_REGISTRY_KEY_ENDPOINT")]
    registry_key_endpoint: Option<String>,
    /// With --registry auto: the name of the registry to use when several are heard.
    #[arg(long, global = true, env = "AGORA_REGISTRY_NAME")]
    registry_name: Option<String>,
    /// The UDP port registries' beacons arrive on (--registry auto, discover), 1-65535.
    #[arg(long, global = true, env = "AGORA_BEACON_PORT", default_value_t = agora_proto::beacon::BEACON_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    beacon_port: u16,
    /// How long --registry auto and discover listen for beacons (sent every second).
    #[arg(long, global = true, env = "AGORA_DISCOVER_WAIT", default_value = "3s", value_parser = positive_duration)]
    discover_wait: Duration,
    /// Where your key pair lives (USER.key and USER.key_secret, made on first use)
    /// [default: ~/.config/agora].
    #[arg(long, global = true, env = "AGORA_KEY_DIR")]
    key_dir: Option<std::path::PathBuf>,
    /// Talk without CURVE encryption and authentication: local experiments only; refused
    /// unless the registry and nodes are on loopback.
    #[arg(long, global = true)]
    insecure: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// A duration as people write it (`5s`, `1s 200ms`), at least 1 ms: `--timeout 0s` would
/// fail every command later, so it is a usage error at once.
///
/// # Errors
/// What is wrong with the text, for clap's message (which names the flag).
fn positive_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(1) {
        return Err("must be at least 1ms (as 5s or 250ms)".into());
    }
    Ok(d)
}

/// The arguments, or clap's usage error as `user-cli: …` on stderr (the prefix every other
/// error of this binary has) and exit code 2; help and version print as clap does.
fn parse_args() -> Result<Args, ExitCode> {
    use clap::error::ErrorKind;
    match Args::try_parse() {
        Ok(args) => Ok(args),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            eprint!("user-cli: {text}");
            Err(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    ExitCode::from(run(args))
}

/// A failure before any command runs: its exit code and its one line.
#[derive(Debug)]
struct Failure {
    /// The exit code (the README's table).
    code: u8,
    /// What went wrong and what to do.
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    fn unreachable(message: impl Into<String>) -> Failure {
        Failure {
            code: 3,
            message: message.into(),
        }
    }

    fn local(message: impl Into<String>) -> Failure {
        Failure {
            code: 4,
            message: message.into(),
        }
    }
}

fn run(args: Args) -> u8 {
    match run_checked(args) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("user-cli: {}", f.message);
            f.code
        }
    }
}

fn run_checked(mut args: Args) -> Result<u8, Failure> {
    match &args.command {
        Some(Command::Completions { shell }) => {
            // Into a buffer first: `generate` panics when its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Args::command(), "user-cli", &mut script);
            return write_stdout(&script);
        }
        Some(Command::Manpage) => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Args::command())
                .render(&mut page)
                .map_err(|e| Failure::local(format!("man page: {e}")))?;
            return write_stdout(&page);
        }
        _ => {}
    }
    let options = ClientOptions {
        timeout: args.timeout,
        ..ClientOptions::default()
    };
    let format = if args.json {
        Format::Json
    } else {
        Format::Human
    };
    if let Some(Command::Discover) = &args.command {
        return discover(&args, format);
    }
    // Arguments first: nothing (a key pair, a pin, the state) is made for a bad one.
    if args.registry != "auto" {
        args.registry = checked_endpoints("--registry", &args.registry)?;
    }
    if let Some(list) = &args.registry_key_endpoint {
        args.registry_key_endpoint = Some(checked_endpoints("--registry-key-endpoint", list)?);
    }
    if args.registry == "auto" {
        auto_registry(&mut args)?;
    }
    if let Some(Command::ForgetRegistry) = &args.command {
        let path = known_servers(&args)?;
        let forgot = agora_common::trust::forget(&path, &args.registry)
            .map_err(|e| Failure::local(e.to_string()))?;
        let said = if forgot {
            format!("forgot the key pinned for {}\n", args.registry)
        } else {
            format!("no key was pinned for {}\n", args.registry)
        };
        return write_stdout(said.as_bytes());
    }
    let user = Identity::of(args.user.clone());
    if let Some(Command::Keys { action }) = &args.command {
        return keys(&args, &user, action.as_ref());
    }
    // Not a held lock: `watch` prints pushed direct messages from another thread.
    let mut out = std::io::stdout();
    if args.command.is_none() {
        // The registry's key is asked for by the first command that needs it, not before:
        // `echo help | user-cli` works with no registry.
        let make = || make_app(&args, &user, options, format).map_err(|f| f.message);
        return Ok(session(make, &user, &mut out));
    }
    let mut app = make_app(&args, &user, options, format)?;
    let result = match args.command {
        None => Ok(0),
        Some(Command::Watch { groups, after_seq }) => match Shutdown::on_signals() {
            Ok(stop) => {
                // Direct messages pushed while watching are printed to stdout too.
                let _present = app.keep_present(Some(Box::new(|line: String| {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                })));
                app.watch(
                    &groups,
                    after_seq,
                    &mut render::Output::new(format, &mut out),
                    &stop,
                )
                .map(|()| 0)
            }
            Err(e) => Err(CliError::Io(e)),
        },
        Some(command) => {
            // `send` with no text, or `-`, reads its text from stdin.
            let mut stdin = repl::Script::new(std::io::stdin().lock());
            command::run(&mut app, command, Context::Alone, &mut stdin, &mut out).map(|step| {
                match step {
                    command::Step::Exit(status) => status,
                    command::Step::Continue => 0,
                }
            })
        }
    };
    let _ = out.flush();
    Ok(match result {
        Ok(code) => code,
        Err(e) => report(&e),
    })
}

/// The client: the CURVE settings ([`curve`]: the registry's key, asked of its key endpoint
/// when not pinned, and the user's key pair), the state file and the [`App`].
///
/// # Errors
/// As [`curve`]'s.
fn make_app(
    args: &Args,
    user: &Identity,
    options: ClientOptions,
    format: Format,
) -> Result<App, Failure> {
    let curve = curve(args, user)?;
    let state = state::StateFile::open(args.state_dir.clone(), &user.name);
    Ok(App::new(
        &args.registry,
        user.name.clone(),
        options,
        format,
        state,
        curve,
    ))
}

/// Writes `bytes` to stdout: 0, also when the reader went away (a closed pipe); 4 when
/// writing failed otherwise.
fn write_stdout(bytes: &[u8]) -> Result<u8, Failure> {
    match std::io::stdout().write_all(bytes) {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(Failure::local(format!("output: {e}"))),
    }
}

/// A comma-separated list of endpoints, each `tcp://HOST:PORT` or `HOST:PORT`, as the
/// `tcp://` list the clients use.
///
/// # Errors
/// A usage error naming `flag` and the bad value: a port outside 1-65535, a wildcard or
/// malformed host, another scheme, an empty list.
fn checked_endpoints(flag: &str, list: &str) -> Result<String, Failure> {
    let endpoints = agora_common::client::registry_endpoints(list);
    if endpoints.is_empty() {
        return Err(Failure::usage(format!(
            "{flag} {list:?}: no endpoint given; give IP:PORT or tcp://HOST:PORT"
        )));
    }
    let checked = endpoints
        .iter()
        .map(|e| {
            agora_proto::wire::Endpoint::from_host_port(e)
                .map(|e| e.as_str().to_owned())
                .map_err(|error| match error {
                    agora_proto::wire::NameError::Endpoint { problem, .. } => {
                        Failure::usage(format!("{flag} {e:?}: {problem}"))
                    }
                    _ => Failure::usage(format!(
                        "{flag} {e:?}: not an endpoint; give IP:PORT or tcp://HOST:PORT, \
                         a host to connect to (not a wildcard such as 0.0.0.0) and a port \
                         from 1 to 65535"
                    )),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(checked.join(","))
}

/// Who the user is, and where the name came from (said when a key pair is made for it, and
/// in the prompt's greeting).
#[derive(Debug, Clone)]
struct Identity {
    name: UserName,
    /// `--user` (or `AGORA_USER`), `$USER`, `$LOGNAME`, `the OS account name`, or
    /// `the default`.
    from: &'static str,
}

/// The name used when no other source gives a valid one.
const FALLBACK_USER: &str = "me";

impl Identity {
    /// `--user` if given, else the first valid user name of `$USER`, `$LOGNAME` and the
    /// OS account name, else [`FALLBACK_USER`]: never a failure, so that a shell with no
    /// `$USER` (`env -i`, cron, a container) works.
    fn of(given: Option<UserName>) -> Identity {
        if let Some(name) = given {
            return Identity {
                name,
                from: "--user",
            };
        }
        let os = || whoami::username().ok();
        let candidates: [(&'static str, Option<String>); 3] = [
            ("$USER", std::env::var("USER").ok()),
            ("$LOGNAME", std::env::var("LOGNAME").ok()),
            ("the OS account name", os()),
        ];
        candidates
            .into_iter()
            .find_map(|(from, value)| {
                let name = UserName::new(value?).ok()?;
                Some(Identity { name, from })
            })
            .unwrap_or_else(|| Identity {
                name: UserName::new(FALLBACK_USER).expect("a valid user name"),
                from: "the default",
            })
    }

    /// How the prompt greets: `Agora chat as alice (from $LOGNAME; --user NAME for
    /// another). Type help for commands, exit to leave.`
    fn greeting(&self) -> String {
        let whence = match self.from {
            "--user" => String::new(),
            from => format!(" (from {from}; --user NAME for another)"),
        };
        format!(
            "Agora chat as {}{whence}. Type help for commands, exit to leave.",
            self.name
        )
    }
}

/// `discover`: the registries heard, one per line (`NAME ENDPOINT key KEY`), or JSON lines
/// (`{"name", "endpoint", "key"}`); exit code 3 when none is heard, 4 when the UDP port
/// cannot be bound.
fn discover(args: &Args, format: Format) -> Result<u8, Failure> {
    let heard = agora_common::beacon::listen(args.beacon_port, args.discover_wait)
        .map_err(|e| Failure::local(format!("listening on UDP port {}: {e}", args.beacon_port)))?;
    if heard.is_empty() {
        return Err(Failure::unreachable(format!(
            "no registry heard on UDP port {} within {}: start one with --beacon, or pass \
             --registry ENDPOINT",
            args.beacon_port,
            app::human_duration(args.discover_wait)
        )));
    }
    let mut lines = String::new();
    for h in &heard {
        let b = &h.beacon;
        let line = match format {
            Format::Json => {
                serde_json::json!({"name": b.name, "endpoint": b.endpoint, "key": b.key})
                    .to_string()
            }
            // A beacon is anyone's on the LAN: its words are escaped like a peer's.
            Format::Human => render::escape_controls(&match b.key {
                Some(key) => format!("{} {} key {key}", b.name, b.endpoint),
                None => format!("{} {} (insecure)", b.name, b.endpoint),
            })
            .into_owned(),
        };
        lines.push_str(&line);
        lines.push('\n');
    }
    write_stdout(lines.as_bytes())
}

/// `--registry auto`: listens for beacons, picks the registry (by --registry-name, the only
/// one heard, or by asking on a terminal), and sets `args.registry` to its endpoint and,
/// unless --registry-key was given, `args.registry_key` to its key, pinned on first use.
///
/// # Errors
/// Exit 3 when none (or none of that name) is heard; 2 when several are heard and none is
/// picked; 4 when the UDP port cannot be bound or the pins cannot be written.
fn auto_registry(args: &mut Args) -> Result<(), Failure> {
    use agora_common::beacon::DiscoverError;
    use std::io::BufRead;
    let heard = agora_common::beacon::listen(args.beacon_port, args.discover_wait)
        .map_err(|e| Failure::local(format!("listening on UDP port {}: {e}", args.beacon_port)))?;
    let chosen = match agora_common::beacon::choose(
        &heard,
        args.registry_name.as_deref(),
        args.beacon_port,
        args.discover_wait,
    ) {
        Ok(b) => b,
        Err(DiscoverError::Several(several)) if std::io::stdin().is_terminal() => {
            eprintln!("user-cli: several registries heard:");
            for (i, b) in several.iter().enumerate() {
                let line = format!("  {}. {} at {}", i + 1, b.name, b.endpoint);
                eprintln!("{}", render::escape_controls(&line));
            }
            eprint!("use which (1-{})? ", several.len());
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| Failure::local(format!("reading the answer: {e}")))?;
            line.trim()
                .parse::<usize>()
                .ok()
                .and_then(|n| several.get(n.wrapping_sub(1)).cloned())
                .ok_or_else(|| {
                    Failure::usage(format!(
                        "{:?} is not one of 1-{}",
                        line.trim(),
                        several.len()
                    ))
                })?
        }
        Err(DiscoverError::NoneHeard { port, wait }) => {
            return Err(Failure::unreachable(format!(
                "--registry auto: no registry heard on UDP port {port} within {}: start one \
                 with --beacon (on this LAN), or pass --registry ENDPOINT",
                app::human_duration(wait)
            )))
        }
        Err(e @ DiscoverError::Several(_)) => return Err(Failure::usage(e.to_string())),
        Err(e) => return Err(Failure::unreachable(e.to_string())),
    };
    args.registry = chosen.endpoint.clone();
    let known = known_servers(args)?;
    let key = agora_common::beacon::heard_key(&chosen, &known, args.registry_key, args.insecure)
        .map_err(|e| match e {
            agora_common::beacon::HeardKeyError::Trust(e) => trust_failure(&e, &args.registry),
            other => Failure::usage(other.to_string()),
        })?;
    if let Some((key, trust)) = key {
        if trust == agora_common::trust::Trust::FirstUse {
            eprintln!(
                "user-cli: warning: pinned the registry key {key} for {} (heard by beacon as {:?}) \
                 on first use; compare it with the key the registry printed",
                args.registry, chosen.name
            );
        }
        args.registry_key = Some(key);
    }
    Ok(())
}

/// The file of pinned registry keys: `STATE_DIR/known_servers.json`.
/// How long to wait for the registry's key endpoint: the whole `--timeout` when a registry
/// of the list has no pinned key (first use: the key is needed, and a slow link gets the time
/// it was given), at most [`PINNED_KEY_CHECK`] when every one is pinned (the answer only
/// confirms the pin, and a registry that is down must not cost every command the whole
/// timeout before the pin is used).
fn key_fetch_timeout(timeout: Duration, known: &std::path::Path, registry: &str) -> Duration {
    let pinned: std::collections::BTreeMap<String, serde_json::Value> = std::fs::read(known)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let all_pinned = agora_common::client::registry_endpoints(registry)
        .iter()
        .all(|e| pinned.contains_key(e.as_str()));
    if all_pinned {
        timeout.min(PINNED_KEY_CHECK)
    } else {
        timeout
    }
}

/// The longest wait for the key endpoint when the registry's key is already pinned: 1 s.
const PINNED_KEY_CHECK: Duration = Duration::from_secs(1);

fn known_servers(args: &Args) -> Result<std::path::PathBuf, Failure> {
    let dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => directories::ProjectDirs::from("", "", "agora")
            .map(|d| d.state_dir().unwrap_or_else(|| d.data_dir()).to_owned())
            .ok_or_else(|| {
                Failure::usage("no home directory for the known servers; pass --state-dir")
            })?,
    };
    Ok(dir.join("known_servers.json"))
}

/// Where `user`'s key pair lives: `KEY_DIR/USER.key` (and `_secret`).
fn key_path(args: &Args, user: &UserName) -> Result<std::path::PathBuf, Failure> {
    let dir = match &args.key_dir {
        Some(d) => d.clone(),
        None => directories::ProjectDirs::from("", "", "agora")
            .map(|d| d.config_dir().to_owned())
            .ok_or_else(|| Failure::usage("no home directory for the key pair; pass --key-dir"))?,
    };
    Ok(dir.join(format!("{user}.key")))
}

/// A key file's failure: 4 (local I/O), except a key that is malformed (2).
fn key_failure(e: &agora_common::keys::KeyError) -> Failure {
    match e {
        agora_common::keys::KeyError::BadKey(_) => Failure::usage(e.to_string()),
        _ => Failure::local(e.to_string()),
    }
}

/// Says once, on stderr, that a key pair was made, and for whom.
fn made_key_pair(user: &Identity, dir: &std::path::Path, public: &impl std::fmt::Display) {
    let whence = match user.from {
        "--user" => String::new(),
        from => format!(" (from {from}; --user NAME for another)"),
    };
    eprintln!(
        // The key last on the line: Z85 keys hold brackets and parentheses of their own.
        "user-cli: made the key pair of user {}{whence} in {}; public key: {public}",
        user.name,
        dir.display()
    );
}

/// `keys`: show, export or import the user's key pair; what it did on stdout
/// ([`write_stdout`]: a closed stdout is not an error).
fn keys(args: &Args, user: &Identity, action: Option<&KeysAction>) -> Result<u8, Failure> {
    use agora_common::keys::Keypair;
    let path = key_path(args, &user.name)?;
    let said = match action {
        None => {
            let (pair, created) = Keypair::load_or_generate(&path).map_err(|e| key_failure(&e))?;
            if created {
                made_key_pair(user, path.parent().unwrap_or(&path), &pair.public);
            }
            let note = if created { " (just made)" } else { "" };
            format!("{}\t{}{note}\n", pair.public, path.display())
        }
        Some(KeysAction::Export { path: to }) => {
            let pair = Keypair::load(&path).map_err(|e| key_failure(&e))?;
            pair.save(to).map_err(|e| key_failure(&e))?;
            format!("exported {} to {}\n", pair.public, to.display())
        }
        Some(KeysAction::Import { path: from, force }) => {
            let pair = Keypair::load(from).map_err(|e| key_failure(&e))?;
            if agora_common::keys::secret_path(&path).exists() && !force {
                return Err(Failure::usage(format!(
                    "{} already holds a key pair; pass --force to replace it",
                    path.display()
                )));
            }
            pair.save(&path).map_err(|e| key_failure(&e))?;
            format!("imported {} as {}'s key pair\n", pair.public, user.name)
        }
    };
    write_stdout(said.as_bytes())
}

/// Why the registry's key could not be had, with its exit code: 3 when its key endpoint did
/// not answer, 1 when a different key is pinned, 4 for the pins' file.
fn trust_failure(e: &agora_common::trust::TrustError, registry: &str) -> Failure {
    use agora_common::client::ClientError;
    use agora_common::trust::TrustError;
    match e {
        TrustError::Unknown {
            endpoint,
            key_endpoint,
            source: ClientError::Timeout { waited, .. },
        } => Failure::unreachable(format!(
            "registry {endpoint}: unreachable: its key endpoint {key_endpoint} gave no key \
             within {}; check that the registry runs there, or pass --registry-key",
            app::human_duration(*waited)
        )),
        TrustError::Unknown {
            endpoint,
            key_endpoint,
            source,
        } => Failure::unreachable(format!(
            "registry {endpoint}: its key endpoint {key_endpoint} gave no key ({source}); \
             pass --registry-key"
        )),
        TrustError::Changed { .. } => Failure {
            code: 1,
            message: e.to_string(),
        },
        TrustError::File { .. } => Failure::local(e.to_string()),
        other => Failure::unreachable(format!("registry {registry}: {other}")),
    }
}

/// The CURVE settings: the registry's key (given, pinned, or asked of its key endpoint),
/// then the user's key pair (made on first use, once the registry's key is known).
fn curve(
    args: &Args,
    user: &Identity,
) -> Result<Option<agora_common::client::ClientCurve>, Failure> {
    if args.insecure {
        if !agora_common::client::registry_endpoints(&args.registry)
            .iter()
            .all(|e| agora_proto::wire::is_loopback(e))
        {
            return Err(Failure::usage(format!(
                "--insecure is allowed only on loopback endpoints, not {}",
                args.registry
            )));
        }
        eprintln!("user-cli: warning: talking WITHOUT encryption or authentication (--insecure)");
        return Ok(None);
    }
    agora_common::keys::require_curve().map_err(|e| Failure::local(e.to_string()))?;
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
    let ctx = zmq::Context::new();
    let known = known_servers(args)?;
    let (server_key, trust) = agora_common::trust::registry_list_key(
        &ctx,
        &known,
        &args.registry,
        args.registry_key_endpoint.as_deref(),
        args.registry_key,
        key_fetch_timeout(args.timeout, &known, &args.registry),
    )
    .map_err(|e| trust_failure(&e, &args.registry))?;
    if trust == agora_common::trust::Trust::FirstUse {
        eprintln!(
            "user-cli: warning: pinned the registry key {server_key} for {} on first use; \
             compare it with the key the registry printed",
            args.registry
        );
    }
    let path = key_path(args, &user.name)?;
    let (keypair, created) =
        agora_common::keys::Keypair::load_or_generate(&path).map_err(|e| key_failure(&e))?;
    if created {
        made_key_pair(user, path.parent().unwrap_or(&path), &keypair.public);
    }
    Ok(Some(agora_common::client::ClientCurve {
        keypair,
        server_key,
    }))
}

/// Prints a one-shot command's failure and gives its exit code; stdout closed by its reader
/// (`| head -1`) is no failure: the command did its work, and ends quietly with 0, as
/// [`write_stdout`].
fn report(e: &CliError) -> u8 {
    if matches!(e, CliError::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe) {
        return 0;
    }
    // A server's words can be in it.
    eprintln!("user-cli: {}", render::escape_controls(&e.to_string()));
    e.exit_code()
}

/// A session: the prompt on a terminal (greeting, what arrived while away, the live stream
/// above the prompt), else a script read from stdin. The [`App`] is made by `make` when the
/// first command needs it; at a terminal, at once too, so that the greeting can show what
/// arrived (a registry that does not answer is said once, and asked again by the next
/// command that needs it).
fn session<'a>(
    make: impl FnMut() -> Result<App, String> + 'a,
    user: &Identity,
    out: &mut dyn Write,
) -> u8 {
    let mut err = std::io::stderr();
    if std::io::stdin().is_terminal() {
        let history =
            directories::ProjectDirs::from("", "", "agora").map(|d| d.data_dir().join("history"));
        let mut prompt = match repl::Interactive::new(history) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("user-cli: terminal: {e}");
                return 4;
            }
        };
        let _ = writeln!(out, "{}", user.greeting());
        let _ = out.flush();
        // What arrives live (group entries; direct messages while you are present, from the
        // start with an account, else from `register` or `connect`) is printed above the
        // prompt, through one printer.
        let mut printer = Some(prompt.printer().unwrap_or_else(|e| {
            let _ = writeln!(
                err,
                "user-cli: this terminal cannot print above the prompt ({e}); live lines are printed as they come"
            );
            stdout_printer()
        }));
        let setup = move |app: &mut App, lines: &mut dyn repl::LineSource| {
            let mut err = std::io::stderr();
            // What arrived while away (seed 003's !check), then the live stream.
            let mut stdout = std::io::stdout();
            if let Err(e) = app.check(&mut render::Output::new(app.format, &mut stdout)) {
                let _ = writeln!(err, "user-cli: {e}");
            }
            let _ = stdout.flush();
            if let Some(printer) = printer.take() {
                app.print_live(printer, true);
            }
            if let Err(e) = app.start_live() {
                let _ = writeln!(err, "user-cli: live stream: {e}");
            }
            app.present_if_registered();
            lines.complete_names(app.names());
        };
        let mut app = repl::LazyApp::new(make, setup);
        if let Err(e) = app.get(&mut prompt) {
            let _ = writeln!(err, "user-cli: {}", render::escape_controls(&e));
        }
        repl::run_session(&mut app, &mut prompt, out, &mut err)
    } else {
        // A script: once present (after `register` or `connect`), the direct messages pushed
        // to you are printed to stdout between the commands' output, as `watch` prints them.
        let setup = |app: &mut App, _: &mut dyn repl::LineSource| {
            app.print_live(stdout_printer(), false);
        };
        let mut app = repl::LazyApp::new(make, setup);
        let mut script = repl::Script::new(std::io::stdin().lock());
        repl::run_session(&mut app, &mut script, out, &mut err)
    }
}

/// Prints each line to stdout at once (a script's live lines, or a terminal that cannot print
/// above the prompt).
fn stdout_printer() -> app::Printer {
    Box::new(|line: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::{checked_endpoints, Identity};

    #[test]
    fn the_argument_definitions_are_consistent() {
        super::Args::command().debug_assert();
    }

    /// QA of issue 23: `--beacon-port 0` and `--timeout 0s` were accepted and failed later;
    /// they are usage errors naming the flag.
    #[test]
    fn a_zero_port_or_duration_is_a_usage_error_naming_the_flag() {
        use clap::Parser as _;
        for (flag, value) in [
            ("--beacon-port", "0"),
            ("--timeout", "0s"),
            ("--timeout", "0ms"),
            ("--discover-wait", "0s"),
        ] {
            let e =
                super::Args::try_parse_from(["user-cli", flag, value, "groups"]).expect_err(flag);
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{flag}");
            assert!(e.to_string().contains(flag), "{flag}: {e}");
        }
        let ok =
            super::Args::try_parse_from(["user-cli", "--timeout", "1ms", "--beacon-port", "1"])
                .expect("1ms and port 1");
        assert_eq!(ok.timeout, std::time::Duration::from_millis(1));
    }

    #[test]
    fn registry_endpoints_take_ip_port_and_lists_and_refuse_bad_ports_hosts_and_schemes() {
        assert_eq!(
            checked_endpoints("--registry", "127.0.0.1:5555").ok(),
            Some("tcp://127.0.0.1:5555".to_owned())
        );
        assert_eq!(
            checked_endpoints("--registry", "tcp://a:1, 127.0.0.1:2").ok(),
            Some("tcp://a:1,tcp://127.0.0.1:2".to_owned())
        );
        for bad in [
            "tcp://127.0.0.1:99999",
            "127.0.0.1:0",
            "0.0.0.0:5555",
            "tcp://*:1",
            "[::]:1",
            "udp://127.0.0.1:5555",
            "127.0.0.1",
            "",
            ",",
        ] {
            let Err(f) = checked_endpoints("--registry", bad) else {
                panic!("{bad:?} accepted");
            };
            assert_eq!(f.code, 2, "{bad:?}");
            assert!(f.message.starts_with("--registry"), "{}", f.message);
            assert!(f.message.contains(bad.trim_matches(',')), "{}", f.message);
        }
    }

    #[test]
    fn a_given_user_is_used_and_the_greeting_says_who_and_from_where() {
        let given = Identity::of(Some(
            agora_proto::wire::UserName::new("alice").expect("a name"),
        ));
        assert_eq!(given.name.as_str(), "alice");
        assert!(given.greeting().starts_with("Agora chat as alice."));
        let defaulted = Identity {
            name: agora_proto::wire::UserName::new("root").expect("a name"),
            from: "the OS account name",
        };
        assert_eq!(
            defaulted.greeting(),
            "Agora chat as root (from the OS account name; --user NAME for another). \
             Type help for commands, exit to leave."
        );
    }
}

#[cfg(test)]
mod key_args {
    use clap::Parser;

    /// Z85 keys may start with '-' (about one in 85 does): a regression test for such keys
    /// being read as flags.
    #[test]
    fn keys_that_start_with_a_hyphen_are_values() {
        // Keys starting with '-', at least one with a digit next ("-0…" looks like a
        // negative number to a parser).
        let mut keys: Vec<String> = Vec::new();
        for _ in 0..200_000 {
            let k = agora_common::keys::Keypair::generate()
                .expect("keys")
                .public
                .to_string();
            let digit_next = k.chars().nth(1).is_some_and(|c| c.is_ascii_digit());
            if k.starts_with('-') && (keys.len() < 20 || digit_next) {
                keys.push(k);
                if keys.len() > 20 && digit_next {
                    break;
                }
            }
        }
        assert!(keys.len() > 20, "found {} hyphenated keys", keys.len());
        for key in keys {
            let args = super::Args::try_parse_from([
                "user-cli",
                "--registry-key",
                &key,
                "invite",
                "g",
                &key,
            ])
            .unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(args.registry_key.map(|k| k.to_string()), Some(key.clone()));
            assert!(
                matches!(&args.command, Some(super::Command::Invite { key: k, .. }) if k.to_string() == key)
            );
        }
    }
}
