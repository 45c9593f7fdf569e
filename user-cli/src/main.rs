//! `user-cli`: the Agora chat client.
//!
//! Without a subcommand it reads commands: from a prompt on a terminal, or line by line
//! from stdin otherwise (a scripted session). Subcommands run one command and exit.
//!
//! Exit codes: 0 success; 1 a server refused a command (unknown group, not a member, message
//! too large, …); 2 usage error; 3 a node or the registry was unreachable within the
//! timeout; 4 any other failure. A session exits with the code of its first failed command.

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
#[command(name = "user-cli", version, about)]
struct Args {
    /// The registry's endpoint, or `auto`: the registry heard on the LAN by its beacon
    /// (PROTOCOL §10; its key is then pinned on first use).
    /// Several registries sharing one database are given as a list, `tcp://A:5555,tcp://B:5555`:
    /// tried in order, and the next one used when one does not answer.
    #[arg(
        long,
        global = true,
        env = "AGORA_REGISTRY",
        default_value = "tcp://127.0.0.1:5555"
    )]
    registry: String,
    /// Your user name [default: $USER].
    #[arg(long, global = true, env = "AGORA_USER")]
    user: Option<UserName>,
    /// Print results as JSON lines.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for a server, per command.
    #[arg(long, global = true, env = "AGORA_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
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
    /// The UDP port registries' beacons arrive on (--registry auto, discover).
    #[arg(long, global = true, env = "AGORA_BEACON_PORT", default_value_t = agora_proto::beacon::BEACON_PORT)]
    beacon_port: u16,
    /// How long --registry auto and discover listen for beacons (sent every second).
    #[arg(long, global = true, env = "AGORA_DISCOVER_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
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

fn main() -> ExitCode {
    let args = Args::parse();
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

fn run(mut args: Args) -> u8 {
    match &args.command {
        Some(Command::Completions { shell }) => {
            // Into a buffer first: `generate` panics when its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Args::command(), "user-cli", &mut script);
            return match std::io::stdout().write_all(&script) {
                Ok(()) => 0,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
                Err(e) => {
                    eprintln!("user-cli: {e}");
                    4
                }
            };
        }
        Some(Command::Manpage) => {
            return match clap_mangen::Man::new(Args::command()).render(&mut std::io::stdout()) {
                Ok(()) => 0,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
                Err(e) => {
                    eprintln!("user-cli: {e}");
                    4
                }
            };
        }
        _ => {}
    }
    let user = match args.user.clone().map(Ok).unwrap_or_else(|| {
        let name =
            std::env::var("USER").map_err(|_| "no --user given and $USER is not set".to_owned())?;
        UserName::new(name)
            .map_err(|e| format!("$USER is not a valid user name ({e}); pass --user"))
    }) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("user-cli: {e}");
            return 2;
        }
    };
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
    if args.registry == "auto" {
        if let Err(e) = auto_registry(&mut args) {
            eprintln!("user-cli: {e}");
            return 2;
        }
    }
    if let Some(Command::ForgetRegistry) = &args.command {
        let result = known_servers(&args).and_then(|path| {
            agora_common::trust::forget(&path, &args.registry).map_err(|e| e.to_string())
        });
        return match result {
            Ok(true) => {
                println!("forgot the key pinned for {}", args.registry);
                0
            }
            Ok(false) => {
                println!("no key was pinned for {}", args.registry);
                0
            }
            Err(e) => {
                eprintln!("user-cli: {e}");
                1
            }
        };
    }
    if let Some(Command::Keys { action }) = &args.command {
        return match keys(&args, &user, action.as_ref()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("user-cli: {e}");
                1
            }
        };
    }
    let curve = match curve(&args, &user) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("user-cli: {e}");
            return 2;
        }
    };
    let state = state::StateFile::open(args.state_dir.clone(), &user);
    let mut app = App::new(&args.registry, user, options, format, state, curve);
    // Not a held lock: `watch` prints pushed direct messages from another thread.
    let mut out = std::io::stdout();
    let result = match args.command {
        None => return session(&mut app, &mut out),
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
            }
            Err(e) => Err(CliError::Io(e)),
        },
        Some(command) => {
            // `send_message` reads its text lines from stdin.
            let mut stdin = repl::Script(std::io::stdin().lock());
            command::run(&mut app, command, Context::Alone, &mut stdin, &mut out).map(|_| ())
        }
    };
    let _ = out.flush();
    match result {
        Ok(()) => 0,
        Err(e) => report(&e),
    }
}

/// The file of pinned registry keys: `STATE_DIR/known_servers.json`.
/// `discover`: the registries heard, one per line (`NAME ENDPOINT key KEY`), or JSON lines
/// (`{"name", "endpoint", "key"}`); exit code 1 when none is heard.
fn discover(args: &Args, format: Format) -> u8 {
    let heard = match agora_common::beacon::listen(args.beacon_port, args.discover_wait) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("user-cli: listening on UDP port {}: {e}", args.beacon_port);
            return 1;
        }
    };
    if heard.is_empty() {
        eprintln!(
            "user-cli: no registry heard on UDP port {} within {:?}",
            args.beacon_port, args.discover_wait
        );
        return 1;
    }
    for h in &heard {
        let b = &h.beacon;
        match format {
            Format::Json => println!(
                "{}",
                serde_json::json!({"name": b.name, "endpoint": b.endpoint, "key": b.key})
            ),
            Format::Human => match b.key {
                Some(key) => println!("{} {} key {key}", b.name, b.endpoint),
                None => println!("{} {} (insecure)", b.name, b.endpoint),
            },
        }
    }
    0
}

/// `--registry auto`: listens for beacons, picks the registry (by --registry-name, the only
/// one heard, or by asking on a terminal), and sets `args.registry` to its endpoint and,
/// unless --registry-key was given, `args.registry_key` to its key, pinned on first use.
fn auto_registry(args: &mut Args) -> Result<(), String> {
    use std::io::BufRead;
    let heard = agora_common::beacon::listen(args.beacon_port, args.discover_wait)
        .map_err(|e| format!("listening on UDP port {}: {e}", args.beacon_port))?;
    let chosen = match agora_common::beacon::choose(
        &heard,
        args.registry_name.as_deref(),
        args.beacon_port,
        args.discover_wait,
    ) {
        Ok(b) => b,
        Err(agora_common::beacon::DiscoverError::Several(several))
            if std::io::stdin().is_terminal() =>
        {
            eprintln!("user-cli: several registries heard:");
            for (i, b) in several.iter().enumerate() {
                eprintln!("  {}. {} at {}", i + 1, b.name, b.endpoint);
            }
            eprint!("use which (1-{})? ", several.len());
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            line.trim()
                .parse::<usize>()
                .ok()
                .and_then(|n| several.get(n.wrapping_sub(1)).cloned())
                .ok_or_else(|| format!("{:?} is not one of 1-{}", line.trim(), several.len()))?
        }
        Err(e) => return Err(e.to_string()),
    };
    args.registry = chosen.endpoint.clone();
    let known = known_servers(args)?;
    let key = agora_common::beacon::heard_key(&chosen, &known, args.registry_key, args.insecure)
        .map_err(|e| e.to_string())?;
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

fn known_servers(args: &Args) -> Result<std::path::PathBuf, String> {
    let dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => directories::ProjectDirs::from("", "", "agora")
            .map(|d| d.state_dir().unwrap_or_else(|| d.data_dir()).to_owned())
            .ok_or("no home directory for the known servers; pass --state-dir")?,
    };
    Ok(dir.join("known_servers.json"))
}

/// Where `user`'s key pair lives: `KEY_DIR/USER.key` (and `_secret`).
fn key_path(args: &Args, user: &UserName) -> Result<std::path::PathBuf, String> {
    let dir = match &args.key_dir {
        Some(d) => d.clone(),
        None => directories::ProjectDirs::from("", "", "agora")
            .map(|d| d.config_dir().to_owned())
            .ok_or("no home directory for the key pair; pass --key-dir")?,
    };
    Ok(dir.join(format!("{user}.key")))
}

/// `keys`: show, export or import the user's key pair.
fn keys(args: &Args, user: &UserName, action: Option<&KeysAction>) -> Result<(), String> {
    use agora_common::keys::Keypair;
    let path = key_path(args, user)?;
    match action {
        None => {
            let (pair, created) = Keypair::load_or_generate(&path).map_err(|e| e.to_string())?;
            let note = if created { " (just made)" } else { "" };
            println!("{}	{}{note}", pair.public, path.display());
        }
        Some(KeysAction::Export { path: to }) => {
            let pair = Keypair::load(&path).map_err(|e| e.to_string())?;
            pair.save(to).map_err(|e| e.to_string())?;
            println!("exported {} to {}", pair.public, to.display());
        }
        Some(KeysAction::Import { path: from, force }) => {
            let pair = Keypair::load(from).map_err(|e| e.to_string())?;
            if agora_common::keys::secret_path(&path).exists() && !force {
                return Err(format!(
                    "{} already holds a key pair; pass --force to replace it",
                    path.display()
                ));
            }
            pair.save(&path).map_err(|e| e.to_string())?;
            println!("imported {} as {user}'s key pair", pair.public);
        }
    }
    Ok(())
}

/// The CURVE settings: the user's key pair (made on first use) and the registry's key.
fn curve(
    args: &Args,
    user: &UserName,
) -> Result<Option<agora_common::client::ClientCurve>, String> {
    if args.insecure {
        if !agora_common::client::registry_endpoints(&args.registry)
            .iter()
            .all(|e| agora_proto::wire::is_loopback(e))
        {
            return Err(format!(
                "--insecure is allowed only on loopback endpoints, not {}",
                args.registry
            ));
        }
        eprintln!("user-cli: warning: talking WITHOUT encryption or authentication (--insecure)");
        return Ok(None);
    }
    agora_common::keys::require_curve().map_err(|e| e.to_string())?;
    let ctx = zmq::Context::new();
    let (server_key, trust) = agora_common::trust::registry_list_key(
        &ctx,
        &known_servers(args)?,
        &args.registry,
        args.registry_key_endpoint.as_deref(),
        args.registry_key,
        args.timeout.min(Duration::from_secs(1)),
    )
    .map_err(|e| e.to_string())?;
    if trust == agora_common::trust::Trust::FirstUse {
        eprintln!(
            "user-cli: warning: pinned the registry key {server_key} for {} on first use; \
             compare it with the key the registry printed",
            args.registry
        );
    }
    let path = key_path(args, user)?;
    let (keypair, created) =
        agora_common::keys::Keypair::load_or_generate(&path).map_err(|e| e.to_string())?;
    let dir = path.parent().unwrap_or(&path).to_owned();
    if created {
        eprintln!(
            "user-cli: made your key pair in {} (public key {})",
            dir.display(),
            keypair.public
        );
    }
    Ok(Some(agora_common::client::ClientCurve {
        keypair,
        server_key,
    }))
}

fn report(e: &CliError) -> u8 {
    eprintln!("user-cli: {e}");
    e.exit_code()
}

fn session(app: &mut App, out: &mut dyn Write) -> u8 {
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
        let _ = writeln!(out, "Agora chat. Type help for commands, exit to leave.");
        // What arrived while away (seed 003's !check), then the live stream.
        if let Err(e) = app.check(&mut render::Output::new(app.format, out)) {
            let _ = writeln!(err, "user-cli: {e}");
        }
        // What arrives live (group entries; direct messages while you are present, from the
        // start with an account, else from `register` or `connect`) is printed above the
        // prompt, through one printer.
        let printer = prompt.printer().unwrap_or_else(|e| {
            let _ = writeln!(
                err,
                "user-cli: this terminal cannot print above the prompt ({e}); live lines are printed as they come"
            );
            stdout_printer()
        });
        app.print_live(printer, true);
        if let Err(e) = app.start_live() {
            let _ = writeln!(err, "user-cli: live stream: {e}");
        }
        app.present_if_registered();
        prompt.complete_names(app.names());
        repl::run_session(app, &mut prompt, out, &mut err)
    } else {
        // A script: once present (after `register` or `connect`), the direct messages pushed
        // to you are printed to stdout between the commands' output, as `watch` prints them.
        app.print_live(stdout_printer(), false);
        let mut script = repl::Script(std::io::stdin().lock());
        repl::run_session(app, &mut script, out, &mut err)
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

    #[test]
    fn the_argument_definitions_are_consistent() {
        super::Args::command().debug_assert();
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
