//! The one command model: a clap definition that parses both the command line
//! (`user-cli join "Cool Group"`) and each line of a session (`join "Cool Group"` at the
//! prompt or in a script, split with shlex as a shell would), and the one function that runs
//! a parsed command ([`run`]).
//!
//! The seeds' words are aliases of the same commands: `get_group_list`, `join_group`,
//! `leave_group`, `get_messages GROUP [HH:MM:SS]`, `send_message GROUP` (text lines up to
//! `END`), seed 004's upper-case `REGISTER`, `CONNECT NAME`, `SEND NAME TEXT` (a direct
//! message) and seed 003's `NAME: text`. Shell completions and the man page come from the same
//! definition (`user-cli completions bash`, `user-cli manpage`).

use std::io::Write;

use agora_proto::id::MessageId;
use agora_proto::key::PublicKey;
use agora_proto::wire::{GroupMode, Presence, UserName};
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};

use crate::app::{App, CliError, HistoryArgs, PolicyChange};
use crate::render::Output;

/// One command, from the command line or a session line.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the groups in the registry.
    #[command(visible_alias = "get_group_list")]
    Groups,
    /// Join a group (a name, or IP:PORT).
    #[command(visible_alias = "join_group")]
    Join {
        /// The group: its name (quoted if it has spaces) or IP:PORT.
        group: String,
    },
    /// Leave a group.
    #[command(visible_alias = "leave_group")]
    Leave {
        /// The group.
        group: String,
    },
    /// List a group's members.
    Members {
        /// The group.
        group: String,
    },
    /// Send one line of text (or, with --json-body, a JSON value) to a group.
    Send {
        /// The group.
        group: String,
        /// The text (words are joined by spaces).
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
        /// Send TEXT as a JSON value (number, bool, object, list) instead of a string.
        #[arg(long)]
        json_body: bool,
    },
    /// Send the text lines that follow, up to a line END (seed 001's send_message).
    #[command(name = "send_message", alias = "send-message")]
    SendMessage {
        /// The group.
        group: String,
    },
    /// Send a file to a group: streamed in chunks with progress, resumed if run again after
    /// an interruption; a content the node already holds is not sent again.
    #[command(name = "send_file", alias = "send-file")]
    SendFile {
        /// The group.
        group: String,
        /// The file.
        path: std::path::PathBuf,
        /// A caption shown with it.
        #[arg(long)]
        caption: Option<String>,
        /// Its media type (RFC 6838) [default: from the extension, else
        /// application/octet-stream].
        #[arg(long)]
        media_type: Option<String>,
    },
    /// Download the file a message carries (by its seq or id), verified against its digest;
    /// resumed if run again after an interruption.
    #[command(name = "get_file", alias = "get-file")]
    GetFile {
        /// The group.
        group: String,
        /// The message: its seq or its id.
        message: String,
        /// Where to write it [default: the file's name, in the current directory].
        #[arg(long)]
        out: Option<std::path::PathBuf>,
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
    /// Show unread counts and what arrived in your groups and mailbox since you last looked.
    Check,
    /// Stream new messages of groups to stdout, one line each (JSON with --json), until
    /// interrupted (SIGINT or SIGTERM). Runs alone, not in a session.
    Watch {
        /// The groups.
        #[arg(required = true, num_args = 1..)]
        groups: Vec<String>,
        /// Start after this seq instead of from now (0 replays the whole log first).
        #[arg(long)]
        after_seq: Option<u64>,
    },
    /// Show a group's messages: all of them, or those one selector picks.
    #[command(visible_alias = "get_messages")]
    Messages {
        /// The group.
        group: String,
        #[command(flatten)]
        select: HistorySelector,
    },
    /// Owner/admins: let a key join a private group.
    Invite {
        /// The group.
        group: String,
        /// The key (40 Z85 characters; `user-cli keys` shows one's own).
        #[arg(allow_hyphen_values = true)]
        key: PublicKey,
    },
    /// Owner/admins: remove a key from the group and keep it out.
    Ban {
        /// The group.
        group: String,
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: PublicKey,
    },
    /// Owner/admins: lift a ban.
    Unban {
        /// The group.
        group: String,
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: PublicKey,
    },
    /// Owner/admins: remove a member (by the name they joined with).
    Kick {
        /// The group.
        group: String,
        /// The member's name.
        member: UserName,
    },
    /// Owner: make a member an admin.
    Promote {
        /// The group.
        group: String,
        /// The member's name.
        member: UserName,
    },
    /// Owner/admins: make the group open or private.
    #[command(name = "set_mode", alias = "set-mode")]
    SetMode {
        /// The group.
        group: String,
        /// Who may join from now on.
        mode: Mode,
    },
    /// Make NAME your account: a user name bound to your key.
    Register {
        /// The user name.
        name: UserName,
    },
    /// Remove your account NAME: needs --yes, or a typed "yes" in a session.
    Unregister {
        /// The user name.
        name: UserName,
        /// Confirm: removing an account cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// List accounts, with presence.
    Users,
    /// Show one account.
    Whois {
        /// The user name.
        name: UserName,
    },
    /// Send a direct message; it waits in the user's mailbox until they read it (also
    /// seed 004's `SEND NAME TEXT` and seed 003's `NAME: text`).
    #[command(name = "send_dm", alias = "send-dm")]
    SendDm {
        /// The recipient's user name.
        to: UserName,
        /// The text (words are joined by spaces).
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
    },
    /// Send one direct message to several users (a copy in each mailbox); those it cannot
    /// reach are listed, and in your dead letters.
    Multicast {
        /// The recipients, comma-separated (alice,bob).
        to: Recipients,
        /// The text (words are joined by spaces).
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
    },
    /// Send one direct message to every user (the registry's operator and admins only).
    Broadcast {
        /// The text (words are joined by spaces).
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
    },
    /// Your messages that could not be delivered, with the reasons.
    #[command(name = "dead_letters", alias = "dead-letters")]
    DeadLetters,
    /// Refuse direct messages from a user from now on (they are told, and their message
    /// goes to their dead letters).
    Block {
        /// The user name.
        name: UserName,
    },
    /// Accept direct messages from a user you blocked.
    Unblock {
        /// The user name.
        name: UserName,
    },
    /// List the users you block.
    Blocked,
    /// Go online (or away with --away) and show the direct messages waiting for you.
    Connect {
        /// Mark yourself away instead of online.
        #[arg(long)]
        away: bool,
        /// Ignored: seed 004 writes `CONNECT NAME`; you are who your key says.
        #[arg(hide = true)]
        name: Option<String>,
    },
    /// Mark yourself away (as `connect --away`).
    Away,
    /// Go offline.
    Disconnect {
        /// Ignored, as for connect.
        #[arg(hide = true)]
        name: Option<String>,
    },
    /// Show your public key (making your key pair if needed), or export or import it.
    Keys {
        #[command(subcommand)]
        action: Option<KeysAction>,
    },
    /// Operators' commands.
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Forget the registry key pinned for --registry (after its operator changed it).
    #[command(name = "forget-registry", alias = "forget_registry")]
    ForgetRegistry,
    /// List the registries announcing themselves on this LAN (their beacons, heard for
    /// --discover-wait on --beacon-port).
    Discover,
    /// Print a shell completion script for user-cli (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print user-cli's man page (roff) to stdout.
    Manpage,
    /// Leave the session (at the prompt or in a script).
    #[command(alias = "quit")]
    Exit,
}

/// Who may join a group from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Anyone not banned.
    Open,
    /// Only invited keys (and the owner and admins).
    Private,
}

impl From<Mode> for GroupMode {
    fn from(m: Mode) -> GroupMode {
        match m {
            Mode::Open => GroupMode::Open,
            Mode::Private => GroupMode::Private,
        }
    }
}

/// At most one way to pick messages; none means the whole log.
#[derive(Debug, Clone, Default, ClapArgs)]
#[group(multiple = false)]
pub struct HistorySelector {
    /// Messages since this time: RFC 3339, or HH:MM:SS for today in local time (seed 001's
    /// `get_messages GROUP HH:MM:SS`).
    #[arg(value_name = "SINCE")]
    pub since_arg: Option<String>,
    /// The same, as an option.
    #[arg(long)]
    pub since: Option<String>,
    /// Only messages after this seq.
    #[arg(long)]
    pub after_seq: Option<u64>,
    /// Only the message with this id.
    #[arg(long)]
    pub id: Option<MessageId>,
    /// Only the newest N messages (1 to 1000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub latest: Option<u32>,
}

impl From<HistorySelector> for HistoryArgs {
    fn from(s: HistorySelector) -> HistoryArgs {
        HistoryArgs {
            since: s.since_arg.or(s.since),
            after_seq: s.after_seq,
            id: s.id,
            latest: s.latest,
        }
    }
}

/// `keys` subcommands.
/// `multicast`'s recipients: user names separated by commas (`alice,bob`), each checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipients(pub Vec<UserName>);

impl std::str::FromStr for Recipients {
    type Err = String;

    fn from_str(s: &str) -> Result<Recipients, String> {
        s.split(',')
            .map(|name| UserName::new(name.trim()).map_err(|e| format!("{name:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Recipients)
    }
}

/// `admin` subcommands: for the operator's key only.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AdminAction {
    /// Stop a group's node: it answers `shutting_down` to new requests, acks what it already
    /// committed, unregisters and exits (needs the group owner's key or the node's own).
    Stop {
        /// The group: its name or IP:PORT.
        group: String,
    },
    /// Stop the registry (needs the key it was started with as --operator).
    #[command(name = "stop-registry", alias = "stop_registry")]
    StopRegistry,
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
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

/// A session line as clap sees it: the same [`Command`]s, without a program name.
#[derive(Debug, Parser)]
#[command(
    name = "agora>",
    no_binary_name = true,
    disable_version_flag = true,
    help_template = "Commands (GROUP is a name, quoted if it has spaces, or IP:PORT):\n{subcommands}\n\n`help COMMAND` shows a command's arguments."
)]
struct Line {
    #[command(subcommand)]
    command: Command,
}

/// What a session line asks for.
#[derive(Debug)]
pub enum Parsed {
    /// Nothing: blank, or a `#` comment.
    Nothing,
    /// A command.
    Command(Command),
    /// Text for the user: `help`, or a command's `--help`.
    Help(String),
}

/// Parses one session line: seed 003's `NAME: text` shorthand, seed 004's upper-case words
/// (`SEND NAME TEXT` is a direct message; `send` is the group one), then the words split as
/// a shell would and parsed by clap.
///
/// # Errors
/// [`CliError::Usage`] with clap's message (unknown command, missing or bad argument) or for
/// unbalanced quotes.
pub fn parse_line(line: &str) -> Result<Parsed, CliError> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(Parsed::Nothing);
    }
    if let Some((name, text)) = trimmed.split_once(": ") {
        if let Ok(to) = UserName::new(name) {
            return Ok(Parsed::Command(Command::SendDm {
                to,
                text: vec![text.trim().to_owned()],
            }));
        }
    }
    let mut words = shlex::split(trimmed)
        .ok_or_else(|| CliError::Usage(format!("unbalanced quotes in {trimmed:?}")))?;
    if let Some(first) = words.first_mut() {
        *first = if first == "SEND" {
            "send_dm".to_owned()
        } else {
            first.to_ascii_lowercase()
        };
    }
    match Line::try_parse_from(&words) {
        Ok(l) => Ok(Parsed::Command(l.command)),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                Ok(Parsed::Help(e.render().to_string()))
            }
            _ => Err(CliError::Usage(
                e.render()
                    .to_string()
                    .trim_start_matches("error: ")
                    .replace(
                        "For more information, try '--help'.",
                        "Type help for the commands.",
                    )
                    .trim_end()
                    .to_owned(),
            )),
        },
    }
}

/// Every command word and visible alias, for tab completion at the prompt.
pub fn words() -> Vec<String> {
    use clap::CommandFactory;
    let mut words: Vec<String> = Line::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .flat_map(|c| {
            std::iter::once(c.get_name().to_owned())
                .chain(c.get_visible_aliases().map(str::to_owned))
        })
        .chain(["help".to_owned(), "quit".to_owned()])
        .collect();
    words.sort();
    words.dedup();
    words
}

/// Where a command runs: alone from the command line, or as a line of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `user-cli COMMAND`.
    Alone,
    /// A line at the prompt or in a script.
    Session,
}

/// Whether a session goes on after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read the next line.
    Continue,
    /// `exit`.
    Exit,
}

/// A text as a JSON string body.
pub fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// Runs one command. `lines` supplies what some commands read after their line
/// (`send_message`'s text, `unregister`'s confirmation in a session).
///
/// # Errors
/// The command's failure. Commands that run only alone (`watch`, `keys`,
/// `forget-registry`, `completions`, `manpage`) are a [`CliError::Usage`] in a session; the
/// caller runs them itself when alone.
pub fn run(
    app: &mut App,
    command: Command,
    context: Context,
    lines: &mut dyn crate::repl::LineSource,
    out: &mut dyn Write,
) -> Result<Step, CliError> {
    let out = &mut Output::new(app.format, out);
    match command {
        Command::Groups => app.groups(out)?,
        Command::Join { group } => app.join(&group, out)?,
        Command::Leave { group } => app.leave(&group, out)?,
        Command::Members { group } => app.members(&group, out)?,
        Command::Subscribe { group } => app.subscribe(&group, out)?,
        Command::Unsubscribe { group } => app.unsubscribe(&group, out)?,
        Command::Check => app.check(out)?,
        Command::Send {
            group,
            text,
            json_body,
        } => {
            let text = text.join(" ");
            let body = if json_body { text } else { json_string(&text) };
            app.send(&group, body, out)?;
        }
        Command::SendMessage { group } => {
            let mut text = Vec::new();
            loop {
                match lines.read_line("... ")? {
                    Some(l) if l.trim_end() == "END" => break,
                    Some(l) => text.push(l),
                    None => {
                        return Err(CliError::Usage(
                            "send_message: input ended before the END line; nothing sent".into(),
                        ))
                    }
                }
            }
            app.send(&group, json_string(&text.join("\n")), out)?;
        }
        Command::Messages { group, select } => app.messages(&group, &select.into(), out)?,
        Command::SendFile {
            group,
            path,
            caption,
            media_type,
        } => app.send_file(
            &group,
            &path,
            caption.as_deref(),
            media_type.as_deref(),
            out,
        )?,
        Command::GetFile {
            group,
            message,
            out: path,
        } => app.get_file(&group, &message, path.as_deref(), out)?,
        Command::Invite { group, key } => app.policy(&group, PolicyChange::Invite(key), out)?,
        Command::Ban { group, key } => app.policy(&group, PolicyChange::Ban(key), out)?,
        Command::Unban { group, key } => app.policy(&group, PolicyChange::Unban(key), out)?,
        Command::Kick { group, member } => app.policy(&group, PolicyChange::Kick(member), out)?,
        Command::Promote { group, member } => {
            app.policy(&group, PolicyChange::Promote(member), out)?
        }
        Command::SetMode { group, mode } => {
            app.policy(&group, PolicyChange::SetMode(mode.into()), out)?
        }
        Command::Register { name } => app.user_register(name.as_str(), out)?,
        Command::Unregister { name, yes } => {
            let confirmed = yes
                || (context == Context::Session
                    && lines
                        .read_line(&format!(
                            "remove the account {name}? This cannot be undone. Type yes: "
                        ))?
                        .is_some_and(|a| a.trim() == "yes"));
            if !confirmed {
                return Err(CliError::Usage(match context {
                    Context::Alone => format!(
                        "unregister {name}: pass --yes to confirm; removing an account cannot be undone"
                    ),
                    Context::Session => format!("unregister {name}: not confirmed; nothing removed"),
                }));
            }
            app.user_unregister(name.as_str(), true, out)?;
        }
        Command::Users => app.users(out)?,
        Command::Whois { name } => app.whois(name.as_str(), out)?,
        Command::SendDm { to, text } => {
            app.send_dm(to.as_str(), json_string(&text.join(" ")), out)?
        }
        Command::DeadLetters => app.dead_letters(out)?,
        Command::Block { name } => app.block(&name, true, out)?,
        Command::Unblock { name } => app.block(&name, false, out)?,
        Command::Blocked => app.blocked(out)?,
        Command::Multicast { to, text } => {
            app.fan_out(Some(to.0), json_string(&text.join(" ")), out)?
        }
        Command::Broadcast { text } => app.fan_out(None, json_string(&text.join(" ")), out)?,
        Command::Connect { away: false, .. } => app.connect(Presence::Online, out)?,
        Command::Connect { away: true, .. } | Command::Away => app.connect(Presence::Away, out)?,
        Command::Disconnect { .. } => app.disconnect(out)?,
        Command::Exit => return Ok(Step::Exit),
        Command::Admin {
            action: AdminAction::Stop { group },
        } => app.admin_stop(&group, out)?,
        Command::Admin {
            action: AdminAction::StopRegistry,
        } => app.admin_stop_registry(out)?,
        Command::Watch { .. }
        | Command::Keys { .. }
        | Command::ForgetRegistry
        | Command::Discover
        | Command::Completions { .. }
        | Command::Manpage => {
            return Err(CliError::Usage(
                "that command runs alone: user-cli COMMAND, not in a session".into(),
            ))
        }
    }
    Ok(Step::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(line: &str) -> Command {
        match parse_line(line).expect(line) {
            Parsed::Command(c) => c,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn blocking_commands_parse_in_a_session() {
        assert!(
            matches!(command("block mallory"), Command::Block { name } if name.as_str() == "mallory")
        );
        assert!(
            matches!(command("unblock mallory"), Command::Unblock { name } if name.as_str() == "mallory")
        );
        assert!(matches!(command("blocked"), Command::Blocked));
        assert!(parse_line("block").is_err(), "a name is needed");
    }

    #[test]
    fn the_seeds_words_are_the_same_commands() {
        assert!(matches!(command("get_group_list"), Command::Groups));
        assert!(
            matches!(command("join_group \"Cool Group\""), Command::Join { group } if group == "Cool Group")
        );
        assert!(
            matches!(command("REGISTER alice"), Command::Register { name } if name.as_str() == "alice")
        );
        assert!(matches!(
            command("CONNECT alice"),
            Command::Connect { away: false, .. }
        ));
        assert!(
            matches!(command("SEND bob hi there"), Command::SendDm { to, text } if to.as_str() == "bob" && text.join(" ") == "hi there")
        );
        assert!(matches!(command("bob: hello"), Command::SendDm { text, .. } if text == ["hello"]));
        assert!(matches!(command("send g hi"), Command::Send { .. }));
        let Command::Messages { group, select } = command("get_messages 127.0.0.1:5000 10:00:00")
        else {
            panic!("messages");
        };
        assert_eq!(group, "127.0.0.1:5000");
        assert_eq!(HistoryArgs::from(select).since.as_deref(), Some("10:00:00"));
        assert!(matches!(command("quit"), Command::Exit));
        assert!(matches!(parse_line("  # a comment"), Ok(Parsed::Nothing)));
    }

    #[test]
    fn arguments_are_typed_and_checked_by_the_parser() {
        for bad in [
            "set_mode g secret",
            "invite g not-a-key",
            "kick g 'two words'",
            "messages g --latest 0",
            "messages g --since 10:00:00 --latest 5",
            "messages g 10:00:00 --after-seq 3",
            "frobnicate",
            "join",
        ] {
            assert!(matches!(parse_line(bad), Err(CliError::Usage(_))), "{bad}");
        }
        assert!(matches!(
            command("set_mode g private"),
            Command::SetMode {
                mode: Mode::Private,
                ..
            }
        ));
        assert!(matches!(
            command("invite g rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"),
            Command::Invite { .. }
        ));
    }

    #[test]
    fn help_lists_the_commands_and_words_complete() {
        let Ok(Parsed::Help(text)) = parse_line("help") else {
            panic!("help");
        };
        assert!(
            text.contains("join") && text.contains("get_group_list"),
            "{text}"
        );
        let words = words();
        assert!(words.iter().any(|w| w == "join_group"));
        assert!(words.iter().any(|w| w == "send_dm"));
    }
}
