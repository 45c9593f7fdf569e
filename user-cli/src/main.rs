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
use clap::{Parser, Subcommand};

mod app;
mod render;
mod repl;
mod state;

use app::{App, CliError, HistoryArgs};
use render::Format;

/// The Agora chat client. Run without a command for the interactive prompt (or a script on
/// stdin); `help` at the prompt lists its commands.
#[derive(Debug, Parser)]
#[command(name = "user-cli", version, about)]
struct Args {
    /// The registry's endpoint.
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

#[derive(Debug, Subcommand)]
enum Command {
    /// List the groups in the registry.
    Groups,
    /// Join a group (a name, or IP:PORT).
    Join {
        /// The group.
        group: String,
    },
    /// Leave a group.
    Leave {
        /// The group.
        group: String,
    },
    /// List a group's members.
    Members {
        /// The group.
        group: String,
    },
    /// Send a message.
    Send {
        /// The group.
        group: String,
        /// The text (words are joined by spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// Send TEXT as a JSON value (number, bool, object, list) instead of a string.
        #[arg(long)]
        json_body: bool,
    },
    /// Follow a joined group live (joining subscribes by default).
    Subscribe {
        /// The group.
        group: String,
    },
    /// Stop following a group live, without leaving it.
    Unsubscribe {
        /// The group.
        group: String,
    },
    /// Show unread counts and what arrived in your groups since you last looked.
    Check,
    /// Stream new messages of groups to stdout, one line each (JSON with --json), until
    /// interrupted (SIGINT or SIGTERM).
    Watch {
        /// The groups.
        #[arg(required = true, num_args = 1..)]
        groups: Vec<String>,
        /// Start after this seq instead of from now (0 replays the whole log first).
        #[arg(long)]
        after_seq: Option<u64>,
    },
    /// Owner/admins: let a key join a private group.
    Invite {
        /// The group.
        group: String,
        /// The key (40 Z85 characters; `user-cli keys` shows one's own).
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Owner/admins: remove a key from the group and keep it out.
    Ban {
        /// The group.
        group: String,
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Owner/admins: lift a ban.
    Unban {
        /// The group.
        group: String,
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Owner/admins: remove a member (by the name they joined with).
    Kick {
        /// The group.
        group: String,
        /// The member's name.
        member: String,
    },
    /// Owner: make a member an admin.
    Promote {
        /// The group.
        group: String,
        /// The member's name.
        member: String,
    },
    /// Owner/admins: make the group open or private.
    #[command(name = "set_mode", alias = "set-mode")]
    SetMode {
        /// The group.
        group: String,
        /// `open` or `private`.
        mode: String,
    },
    /// Forget the registry key pinned for --registry (after its operator changed it).
    ForgetRegistry,
    /// Make NAME your account: a user name bound to your key.
    Register {
        /// The user name.
        name: String,
    },
    /// Remove your account NAME (needs --yes).
    Unregister {
        /// The user name.
        name: String,
        /// Confirm: removing an account cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// List accounts, with presence.
    Users,
    /// Send a direct message; it waits in the user's mailbox until they read it.
    #[command(name = "send_dm", alias = "send-dm")]
    SendDm {
        /// The recipient's user name.
        to: String,
        /// The text (words are joined by spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Your messages that could not be delivered, with the reasons.
    #[command(name = "dead_letters", alias = "dead-letters")]
    DeadLetters,
    /// Go online (or away with --away) until the session's TTL passes.
    Connect {
        /// Mark yourself away instead of online.
        #[arg(long)]
        away: bool,
    },
    /// Go offline.
    Disconnect,
    /// Show one account.
    Whois {
        /// The user name.
        name: String,
    },
    /// Show your public key (making your key pair if needed), or export or import it.
    Keys {
        #[command(subcommand)]
        action: Option<KeysAction>,
    },
    /// Show a group's messages (all of them unless a filter is given).
    Messages {
        /// The group.
        group: String,
        /// Only messages since this time: RFC 3339, or HH:MM:SS for today in local time.
        #[arg(long)]
        since: Option<String>,
        /// Only messages after this seq.
        #[arg(long)]
        after_seq: Option<u64>,
        /// Only the message with this id.
        #[arg(long)]
        id: Option<String>,
        /// Only the newest N messages (1 to 1000).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        latest: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Write your key pair as PATH (public certificate) and PATH_secret (mode 0600).
    Export {
        /// Where to write.
        path: std::path::PathBuf,
    },
    /// Use the key pair in PATH_secret (a CZMQ certificate, as `export` writes) from now on.
    Import {
        /// The public certificate's path; the secret one is PATH_secret.
        path: std::path::PathBuf,
        /// Replace an existing key pair (servers will then know you as someone else).
        #[arg(long)]
        force: bool,
    },
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

fn run(args: Args) -> u8 {
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
        Some(Command::Groups) => app.groups(&mut out),
        Some(Command::Join { group }) => app.join(&group, &mut out),
        Some(Command::Leave { group }) => app.leave(&group, &mut out),
        Some(Command::Members { group }) => app.members(&group, &mut out),
        Some(Command::Subscribe { group }) => app.subscribe(&group, &mut out),
        Some(Command::Unsubscribe { group }) => app.unsubscribe(&group, &mut out),
        Some(Command::Check) => app.check(&mut out),
        Some(Command::Register { name }) => app.user_register(&name, &mut out),
        Some(Command::Unregister { name, yes }) => {
            if yes {
                app.user_unregister(&name, true, &mut out)
            } else {
                Err(CliError::Usage(format!(
                    "unregister {name}: pass --yes to confirm; removing an account cannot be undone"
                )))
            }
        }
        Some(Command::Users) => app.users(&mut out),
        Some(Command::SendDm { to, text }) => {
            app.send_dm(&to, repl::json_string(&text.join(" ")), &mut out)
        }
        Some(Command::DeadLetters) => app.dead_letters(&mut out),
        Some(Command::Connect { away }) => app.connect(
            if away {
                agora_proto::wire::Presence::Away
            } else {
                agora_proto::wire::Presence::Online
            },
            &mut out,
        ),
        Some(Command::Disconnect) => app.disconnect(&mut out),
        Some(Command::Whois { name }) => app.whois(&name, &mut out),
        Some(Command::Invite { group, key }) => policy(&mut app, "invite", &group, &key, &mut out),
        Some(Command::Ban { group, key }) => policy(&mut app, "ban", &group, &key, &mut out),
        Some(Command::Unban { group, key }) => policy(&mut app, "unban", &group, &key, &mut out),
        Some(Command::Kick { group, member }) => {
            policy(&mut app, "kick", &group, &member, &mut out)
        }
        Some(Command::Promote { group, member }) => {
            policy(&mut app, "promote", &group, &member, &mut out)
        }
        Some(Command::SetMode { group, mode }) => {
            policy(&mut app, "set_mode", &group, &mode, &mut out)
        }
        // Handled above, before any connection is set up.
        Some(Command::Keys { .. } | Command::ForgetRegistry) => Ok(()),
        Some(Command::Watch { groups, after_seq }) => match Shutdown::on_signals() {
            Ok(stop) => {
                // Direct messages pushed while watching are printed to stdout too.
                let _present = app.keep_present(Some(Box::new(|line: String| {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                })));
                app.watch(&groups, after_seq, &mut out, &stop)
            }
            Err(e) => Err(CliError::Io(e)),
        },
        Some(Command::Send {
            group,
            text,
            json_body,
        }) => {
            let text = text.join(" ");
            let body = if json_body {
                text
            } else {
                repl::json_string(&text)
            };
            app.send(&group, body, &mut out)
        }
        Some(Command::Messages {
            group,
            since,
            after_seq,
            id,
            latest,
        }) => app.messages(
            &group,
            &HistoryArgs {
                since,
                after_seq,
                id,
                latest,
            },
            &mut out,
        ),
    };
    let _ = out.flush();
    match result {
        Ok(()) => 0,
        Err(e) => report(&e),
    }
}

/// The file of pinned registry keys: `STATE_DIR/known_servers.json`.
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
        if !agora_proto::wire::is_loopback(&args.registry) {
            return Err(format!(
                "--insecure is allowed only on loopback endpoints, not {}",
                args.registry
            ));
        }
        eprintln!("user-cli: warning: talking WITHOUT encryption or authentication (--insecure)");
        return Ok(None);
    }
    agora_common::keys::require_curve().map_err(|e| e.to_string())?;
    let key_endpoint = args
        .registry_key_endpoint
        .clone()
        .or_else(|| agora_common::trust::default_key_endpoint(&args.registry))
        .unwrap_or_default();
    let ctx = zmq::Context::new();
    let (server_key, trust) = agora_common::trust::registry_key(
        &ctx,
        &known_servers(args)?,
        &args.registry,
        &key_endpoint,
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

fn policy(
    app: &mut App,
    cmd: &str,
    group: &str,
    arg: &str,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let change = repl::policy_change(cmd, arg)?;
    app.policy(group, change, out)
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
        if let Err(e) = app.check(out) {
            let _ = writeln!(err, "user-cli: {e}");
        }
        let mut _present = None;
        match prompt.printer() {
            Ok(printer) => {
                // One printer above the prompt, shared by group messages and DMs.
                let shared = std::sync::Arc::new(std::sync::Mutex::new(printer));
                let share = || -> app::Printer {
                    let shared = std::sync::Arc::clone(&shared);
                    Box::new(move |line: String| {
                        let mut print = shared
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        (*print)(line);
                    })
                };
                if let Err(e) = app.start_live(share()) {
                    let _ = writeln!(err, "user-cli: live stream: {e}");
                }
                _present = app.keep_present(Some(share()));
            }
            Err(e) => {
                let _ = writeln!(err, "user-cli: no live stream on this terminal: {e}");
                _present = app.keep_present(None);
            }
        }
        repl::run_session(app, &mut prompt, out, &mut err)
    } else {
        let mut script = repl::Script(std::io::stdin().lock());
        repl::run_session(app, &mut script, out, &mut err)
    }
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
                matches!(&args.command, Some(super::Command::Invite { key: k, .. }) if *k == key)
            );
        }
    }
}
