//! The one command model: a clap definition that parses both the command line
//! (`user-cli join "Cool Group"`) and each line of a session (`join "Cool Group"` at the
//! prompt or in a script, split with shlex as a shell would), and the one function that runs
//! a parsed command ([`run`]).
//!
//! The seeds' words are aliases of the same commands: `get_group_list`, `join_group`,
//! `leave_group`, `get_messages GROUP [HH:MM:SS]`, `send_message GROUP` (`send` with no text:
//! the lines that follow, up to `END` or the end of the input), seed 004's upper-case
//! `REGISTER`, `CONNECT NAME`, `SEND NAME TEXT` (a direct message) and seed 003's
//! `NAME: text`. Help lists each command once, its other words as aliases. Shell
//! completions and the man page come from the same definition (`user-cli completions bash`,
//! `user-cli manpage`).

use std::io::{IsTerminal, Write};

use agora_proto::id::MessageId;
use agora_proto::key::PublicKey;
use agora_proto::wire::{GroupMode, GroupName, Presence, UserName};
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
    /// Send a message to a group: TEXT, a file's text, stdin's, or the lines up to END.
    ///
    /// The text is TEXT, the content of --file PATH, all of stdin with TEXT `-`, or with
    /// neither the lines that follow, up to a line END or the end of the input. Empty text
    /// is refused ("nothing to send").
    #[command(visible_alias = "send_message", alias = "send-message")]
    Send {
        /// The group.
        group: String,
        /// The text (words are joined by spaces); `-` reads it from stdin to its end.
        #[arg(num_args = 0.., allow_hyphen_values = true, conflicts_with = "file")]
        text: Vec<String>,
        /// Read the text from this file (UTF-8, up to the node's message size, 1 MiB by
        /// default).
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
        /// Send the text as a JSON value (number, bool, object, list) instead of a string.
        #[arg(long)]
        json_body: bool,
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
    /// Create a group on a group host: you become its owner and a member, following it live.
    ///
    /// The host is --host, else $AGORA_HOST, else the one host your joined groups are on (when
    /// they are all on one). Refused (exit 1, with the host's code): `forbidden` (the host
    /// does not let your key create groups, or is a node of one group), `limit_reached` (the
    /// host, or your key, has as many groups as allowed), `name_taken`.
    Create {
        /// The new group's name (quoted if it has spaces).
        name: GroupName,
        /// Who may join: anyone not banned (open), or only invited keys (private).
        #[arg(long, value_enum, default_value_t = Mode::Open)]
        mode: Mode,
        /// The group host: IP:PORT or tcp://HOST:PORT [default: the host of your joined
        /// groups when they are all on one].
        #[arg(long, env = "AGORA_HOST", value_name = "ENDPOINT")]
        host: Option<String>,
        /// The host's public key (40 Z85 characters; the host prints it at start)
        /// [default: the key the registry lists for groups at that endpoint].
        #[arg(
            long,
            env = "AGORA_HOST_KEY",
            value_name = "KEY",
            allow_hyphen_values = true
        )]
        host_key: Option<PublicKey>,
    },
    /// Delete a group you own: its messages are archived, its members unsubscribed and its
    /// name freed. Asks first, unless --yes (without a terminal to ask on, --yes is needed).
    Delete {
        /// The group.
        group: String,
        /// Confirm without being asked: deleting a group cannot be undone from user-cli.
        #[arg(long)]
        yes: bool,
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
    #[command(visible_alias = "REGISTER")]
    Register {
        /// The user name.
        name: UserName,
    },
    /// Remove your account NAME: needs --yes, or a typed "yes" in a session.
    #[command(visible_alias = "UNREGISTER")]
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
    /// written `SEND NAME TEXT` or `NAME: text`).
    #[command(name = "send_dm", visible_alias = "SEND", alias = "send-dm")]
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
    #[command(visible_alias = "CONNECT")]
    Connect {
        /// Mark yourself away instead of online.
        #[arg(long)]
        away: bool,
        /// Ignored (`CONNECT NAME` is accepted): you are who your key says.
        #[arg(hide = true)]
        name: Option<String>,
    },
    /// Mark yourself away (as `connect --away`).
    Away,
    /// Go offline.
    #[command(visible_alias = "DISCONNECT")]
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
    /// Leave the session (at the prompt or in a script), with exit status STATUS
    /// [default: 0].
    #[command(visible_alias = "quit")]
    Exit {
        /// The session's exit status, 0 to 255.
        status: Option<u8>,
    },
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
    /// Messages since this time: RFC 3339, or HH:MM:SS for today in local time.
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

/// Parses one session line: seed 003's `NAME: text` shorthand, then the words split as a
/// shell would and parsed by clap. Seed 004's upper-case words are aliases in the definition
/// (`SEND NAME TEXT` is a direct message; `send` is the group one); another command word
/// that is not one of the definition's is tried in lower case (`JOIN G`).
///
/// # Errors
/// [`CliError::Usage`] as one line: `unknown command "frobnicate"` (with clap's "did you
/// mean" when it has one), clap's message for a missing or bad argument, or unbalanced
/// quotes; each says where to look (`help`, `help COMMAND`).
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
        if !is_command_word(first) {
            *first = first.to_ascii_lowercase();
        }
    }
    match Line::try_parse_from(&words) {
        Ok(l) => Ok(Parsed::Command(l.command)),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                Ok(Parsed::Help(e.render().to_string()))
            }
            _ => Err(CliError::Usage(session_error(&e, &words))),
        },
    }
}

/// Whether `word` is a command's name or one of its aliases (`help` included).
fn is_command_word(word: &str) -> bool {
    use clap::CommandFactory;
    word == "help"
        || Line::command()
            .get_subcommands()
            .any(|c| c.get_name() == word || c.get_all_aliases().any(|a| a == word))
}

/// clap's error for a session line as one line. An unknown command word is
/// `unknown command "WORD"`, with clap's suggestion when it has one (`did you mean
/// "join"?`), then `type help for the commands`. Any other error is clap's text without the
/// `Usage: agora> …` and `For more information` lines (a session has no program name to
/// show), then where to look: `help COMMAND` for a known command, else `help`.
fn session_error(error: &clap::Error, words: &[String]) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() == ErrorKind::InvalidSubcommand {
        let word = match error.get(ContextKind::InvalidSubcommand) {
            Some(ContextValue::String(w)) => w.clone(),
            _ => words.first().cloned().unwrap_or_default(),
        };
        let suggested = match error.get(ContextKind::SuggestedSubcommand) {
            Some(ContextValue::String(s)) => vec![s.clone()],
            Some(ContextValue::Strings(s)) => s.clone(),
            _ => Vec::new(),
        };
        return match suggested.as_slice() {
            [] => format!("unknown command {word:?}; type help for the commands"),
            names => format!(
                "unknown command {word:?}; did you mean {}? Type help for the commands",
                names
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        };
    }
    let rendered = error.render().to_string();
    let text: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
        .collect();
    let text = text.join(" ");
    let text = text.trim_start_matches("error: ");
    let known = words.first().filter(|w| is_command_word(w));
    match known {
        Some(word) => format!("{text}; type help {word} for its arguments"),
        None => format!("{text}; type help for the commands"),
    }
}

/// Whether `command` runs only alone (`user-cli COMMAND`), never as a session line: `watch`,
/// `keys`, `forget-registry`, `discover`, `completions`, `manpage`.
pub fn runs_alone(command: &Command) -> bool {
    matches!(
        command,
        Command::Watch { .. }
            | Command::Keys { .. }
            | Command::ForgetRegistry
            | Command::Discover
            | Command::Completions { .. }
            | Command::Manpage
    )
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
    /// `exit` or `exit N`: end the session with this status.
    Exit(u8),
}

/// A text as a JSON string body.
pub fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// The JSON body of a message: `text` as a JSON string, or with `json_body` the JSON value
/// it spells.
///
/// # Errors
/// [`CliError::Usage`] "nothing to send" for text that is empty or only white space (or a
/// JSON string that is).
pub fn body_of(text: &str, json_body: bool) -> Result<String, CliError> {
    let nothing = || CliError::Usage("nothing to send: the text is empty".into());
    if text.trim().is_empty() {
        return Err(nothing());
    }
    if !json_body {
        return Ok(json_string(text));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::String(s)) if s.trim().is_empty() => Err(nothing()),
        _ => Ok(text.to_owned()),
    }
}

/// How much text `send` reads from stdin, a file or the lines up to `END` before it asks the
/// node for its limit, in bytes: the node's default limit on a message body (1 MiB). Past
/// the limit (this one, or the node's when larger) the body is refused as soon as that much
/// is read ([`CliError::TooLarge`]), so `--file /dev/zero` or `yes |` never fill memory.
pub const MAX_INPUT_BYTES: u64 = agora_proto::wire::DEFAULT_MAX_MESSAGE_BYTES as u64;

/// The limit `send`'s input is read through: [`MAX_INPUT_BYTES`] at first; once that is
/// passed, the node's own limit (asked once, through `node`) if larger.
struct InputLimit<'a> {
    group: &'a str,
    max: u64,
    node: Option<&'a mut dyn FnMut() -> Option<u64>>,
}

impl<'a> InputLimit<'a> {
    /// [`MAX_INPUT_BYTES`] for `group`, raised to what `node` says when passed.
    fn new(group: &'a str, node: Option<&'a mut dyn FnMut() -> Option<u64>>) -> InputLimit<'a> {
        InputLimit {
            group,
            max: MAX_INPUT_BYTES,
            node,
        }
    }

    /// Whether `len` bytes are within the limit, asking the node the first time they are
    /// not.
    fn allows(&mut self, len: u64) -> bool {
        if len <= self.max {
            return true;
        }
        if let Some(ask) = self.node.take() {
            if let Some(node_max) = ask() {
                self.max = self.max.max(node_max);
            }
        }
        len <= self.max
    }

    /// The too-large error naming the limit.
    fn error(&self) -> CliError {
        CliError::TooLarge {
            target: self.group.to_owned(),
            len: None,
            max: self.max,
        }
    }
}

/// An input error: not UTF-8 (with its line) is the input's fault, anything else a failure
/// to read; both exit 4 (local input).
fn input_error(e: std::io::Error) -> CliError {
    CliError::Input(e)
}

/// The lines that follow, up to a line `END` or the end of the input, joined by newlines
/// (`send GROUP` with no text, and its alias `send_message GROUP`). A line that is not UTF-8
/// fails the message, but the lines up to `END` are still read, so that none of them runs as
/// a command. Past the limit the message fails with [`CliError::TooLarge`]: at once when
/// alone (`drain` false: the input may never end), after reading up to `END` in a session
/// (`drain`: the lines are dropped as they come).
fn read_until_end_line(
    lines: &mut dyn crate::repl::LineSource,
    limit: &mut InputLimit<'_>,
    drain: bool,
) -> Result<String, CliError> {
    let mut text = Vec::new();
    let mut len = 0u64;
    let mut bad = None;
    loop {
        let failed = match lines.read_line("... ") {
            Ok(Some(l)) if l.trim_end() == "END" => break,
            Ok(Some(l)) => {
                // The newlines that join the lines count; the last one does not.
                len += l.len() as u64 + u64::from(len > 0);
                if bad.is_none() && !limit.allows(len) {
                    text.clear();
                    limit.error()
                } else {
                    if bad.is_none() {
                        text.push(l);
                    }
                    continue;
                }
            }
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => limit.error(),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                input_error(std::io::Error::new(e.kind(), format!("{e}; nothing sent")))
            }
            Err(e) => return Err(input_error(e)),
        };
        if !drain && matches!(failed, CliError::TooLarge { .. }) {
            return Err(failed);
        }
        bad.get_or_insert(failed);
    }
    match bad {
        Some(e) => Err(e),
        None => Ok(text.join("\n")),
    }
}

/// Every line to the end of the input, joined by newlines (`send GROUP -`).
///
/// # Errors
/// [`CliError::TooLarge`] as soon as more than the limit is read; [`CliError::Input`] for a
/// line that is not UTF-8 or a failed read.
fn read_to_end(
    lines: &mut dyn crate::repl::LineSource,
    limit: &mut InputLimit<'_>,
) -> Result<String, CliError> {
    let mut text = Vec::new();
    let mut len = 0u64;
    loop {
        match lines.read_line("") {
            Ok(Some(l)) => {
                len += l.len() as u64 + u64::from(len > 0);
                if !limit.allows(len) {
                    return Err(limit.error());
                }
                text.push(l);
            }
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => return Err(limit.error()),
            Err(e) => return Err(input_error(e)),
        }
    }
    Ok(text.join("\n").trim_end_matches('\n').to_owned())
}

/// A text file's content without its final newlines (`send GROUP --file PATH`), read
/// through the limit.
///
/// # Errors
/// [`CliError::Local`] when it cannot be read; [`CliError::TooLarge`] when it holds more
/// than the limit; [`CliError::Input`] naming the line that is not UTF-8.
fn read_text_file(path: &std::path::Path, limit: &mut InputLimit<'_>) -> Result<String, CliError> {
    use std::io::Read as _;
    let local = |source| CliError::Local {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(local)?;
    let mut bytes = Vec::new();
    loop {
        // Up to one byte past the limit: that byte says the file is over it.
        let room = limit.max + 1 - bytes.len() as u64;
        let n = (&mut file)
            .take(room)
            .read_to_end(&mut bytes)
            .map_err(local)?;
        if (n as u64) < room {
            break;
        }
        if !limit.allows(bytes.len() as u64) {
            return Err(limit.error());
        }
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text.trim_end_matches(['\n', '\r']).to_owned()),
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            Err(input_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} line {line}: not UTF-8", path.display()),
            )))
        }
    }
}

/// Runs one command. `lines` supplies what some commands read after their line
/// (`send`'s text when none is given, `unregister`'s confirmation in a session).
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
            file,
            json_body,
        } => {
            let text = {
                // Past MAX_INPUT_BYTES, the node is asked for its own limit (once).
                let mut ask = || app.max_message_bytes(&group);
                let mut limit = InputLimit::new(&group, Some(&mut ask));
                match (file, text.as_slice()) {
                    (Some(path), _) => read_text_file(&path, &mut limit)?,
                    (None, [dash]) if dash == "-" => {
                        if context == Context::Session {
                            return Err(CliError::Usage(
                                "send GROUP -: stdin is this session's input; in a session, \
                                 give no text and type the lines, then END"
                                    .into(),
                            ));
                        }
                        read_to_end(lines, &mut limit)?
                    }
                    (None, []) => {
                        read_until_end_line(lines, &mut limit, context == Context::Session)?
                    }
                    (None, words) => words.join(" "),
                }
            };
            app.send(&group, body_of(&text, json_body)?, out)?;
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
                        ))
                        .map_err(input_error)?
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
        Command::Create {
            name,
            mode,
            host,
            host_key,
        } => app.create(&name, mode.into(), host.as_deref(), host_key, out)?,
        Command::Delete { group, yes } => {
            let question = format!(
                "delete the group {group}? Its messages are archived and its name is freed. \
                 Type yes: "
            );
            let confirmed = yes
                || match context {
                    Context::Session => lines
                        .read_line(&question)
                        .map_err(input_error)?
                        .is_some_and(|a| a.trim() == "yes"),
                    Context::Alone if std::io::stdin().is_terminal() => {
                        eprint!("{question}");
                        lines
                            .read_line("")
                            .map_err(input_error)?
                            .is_some_and(|a| a.trim() == "yes")
                    }
                    Context::Alone => {
                        return Err(CliError::Usage(format!(
                            "delete {group}: pass --yes to confirm (there is no terminal to \
                             ask on); deleting archives its messages and frees its name"
                        )))
                    }
                };
            if !confirmed {
                return Err(CliError::Usage(format!(
                    "delete {group}: not confirmed; nothing deleted"
                )));
            }
            app.delete(&group, out)?;
        }
        Command::Users => app.users(out)?,
        Command::Whois { name } => app.whois(name.as_str(), out)?,
        Command::SendDm { to, text } => {
            app.send_dm(to.as_str(), body_of(&text.join(" "), false)?, out)?
        }
        Command::DeadLetters => app.dead_letters(out)?,
        Command::Block { name } => app.block(&name, true, out)?,
        Command::Unblock { name } => app.block(&name, false, out)?,
        Command::Blocked => app.blocked(out)?,
        Command::Multicast { to, text } => {
            app.fan_out(Some(to.0), body_of(&text.join(" "), false)?, out)?
        }
        Command::Broadcast { text } => app.fan_out(None, body_of(&text.join(" "), false)?, out)?,
        Command::Connect { away: false, .. } => app.connect(Presence::Online, out)?,
        Command::Connect { away: true, .. } | Command::Away => app.connect(Presence::Away, out)?,
        Command::Disconnect { .. } => app.disconnect(out)?,
        Command::Exit { status } => return Ok(Step::Exit(status.unwrap_or(0))),
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
        assert!(matches!(command("quit"), Command::Exit { status: None }));
        assert!(matches!(
            command("exit 7"),
            Command::Exit { status: Some(7) }
        ));
        assert!(parse_line("exit 256").is_err());
        assert!(
            matches!(command("send_message g"), Command::Send { group, text, file: None, .. } if group == "g" && text.is_empty())
        );
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

    /// Issue 24: `create NAME [--mode open|private] [--host ENDPOINT] [--host-key KEY]` and
    /// `delete GROUP [--yes]`, checked by the parser.
    #[test]
    fn create_and_delete_parse_and_check_their_arguments() {
        let Command::Create {
            name,
            mode,
            host,
            host_key,
        } = command("create 'Night Shift' --mode private --host 127.0.0.1:7000")
        else {
            panic!("create");
        };
        assert_eq!(name.as_str(), "Night Shift");
        assert_eq!(mode, Mode::Private);
        assert_eq!(host.as_deref(), Some("127.0.0.1:7000"));
        assert!(host_key.is_none());
        assert!(matches!(
            command("create team"),
            Command::Create {
                mode: Mode::Open,
                ..
            }
        ));
        assert!(matches!(
            command("delete team"),
            Command::Delete { yes: false, .. }
        ));
        assert!(matches!(
            command("delete team --yes"),
            Command::Delete { yes: true, .. }
        ));
        for bad in [
            "create",
            "create team --mode secret",
            "create team --host-key not-a-key",
            "create ''",
            "delete",
        ] {
            assert!(matches!(parse_line(bad), Err(CliError::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn empty_text_is_nothing_to_send_and_json_bodies_pass_through() {
        for empty in ["", "   ", "\n\t"] {
            let Err(CliError::Usage(e)) = body_of(empty, false) else {
                panic!("{empty:?} accepted");
            };
            assert!(e.contains("nothing to send"), "{e}");
        }
        assert!(matches!(body_of("\"  \"", true), Err(CliError::Usage(_))));
        assert_eq!(body_of("hi", false).ok().as_deref(), Some("\"hi\""));
        assert_eq!(
            body_of("{\"a\":1}", true).ok().as_deref(),
            Some("{\"a\":1}")
        );
    }

    #[test]
    fn a_session_error_is_one_line_without_usage_and_names_where_to_look() {
        for (line, hint) in [
            ("join", "type help join"),
            ("frobnicate", "type help for the commands"),
            ("set_mode g secret", "type help set_mode"),
            ("get_group_list extra", "type help get_group_list"),
        ] {
            let Err(CliError::Usage(e)) = parse_line(line) else {
                panic!("{line} parsed");
            };
            assert!(!e.contains('\n'), "{line}: {e}");
            assert!(!e.contains("Usage") && !e.contains("agora>"), "{line}: {e}");
            assert!(e.contains(hint), "{line}: {e}");
        }
    }

    /// QA of issue 23: a typo in a session printed clap's "unrecognized subcommand" with a
    /// `Usage:` block; it is one line naming the word, with clap's suggestion when it has one.
    #[test]
    fn an_unknown_command_in_a_session_is_named_with_a_suggestion() {
        let Err(CliError::Usage(e)) = parse_line("jion g") else {
            panic!("jion parsed");
        };
        assert!(
            e.starts_with("unknown command \"jion\"; did you mean ")
                && e.contains("\"join\"")
                && e.ends_with("? Type help for the commands"),
            "{e}"
        );
        let Err(CliError::Usage(e)) = parse_line("foo_typo") else {
            panic!("foo_typo parsed");
        };
        assert_eq!(
            e,
            "unknown command \"foo_typo\"; type help for the commands"
        );
    }

    /// QA of issue 23: seed 004's upper-case words ran in a session but were no commands of
    /// the definition: `help` did not list them, `help REGISTER` and the one-shot
    /// `user-cli SEND bob x` were refused. They are aliases now, listed by help.
    #[test]
    fn the_upper_case_seed_words_are_listed_aliases_with_their_own_help() {
        let Ok(Parsed::Help(text)) = parse_line("help") else {
            panic!("help");
        };
        for word in ["SEND", "CONNECT", "DISCONNECT", "REGISTER", "UNREGISTER"] {
            assert!(text.contains(word), "{word} not in help: {text}");
            let Ok(Parsed::Help(own)) = parse_line(&format!("help {word}")) else {
                panic!("help {word}");
            };
            assert!(own.contains("Usage:"), "help {word}: {own}");
        }
        assert!(matches!(
            command("UNREGISTER alice --yes"),
            Command::Unregister { yes: true, .. }
        ));
        assert!(matches!(
            command("DISCONNECT alice"),
            Command::Disconnect { .. }
        ));
        assert!(matches!(command("JOIN g"), Command::Join { .. }));
    }

    #[test]
    fn send_takes_its_text_from_arguments_a_file_or_stdin() {
        assert!(
            matches!(command("send g --file /tmp/x"), Command::Send { text, file: Some(_), .. } if text.is_empty())
        );
        assert!(matches!(command("send g -"), Command::Send { text, .. } if text == ["-"]));
        assert!(
            matches!(command("send g --json-body 12"), Command::Send { text, json_body: true, .. } if text == ["12"])
        );
        assert!(parse_line("send g --file /tmp/x hello").is_err());
    }

    #[test]
    fn lines_up_to_end_or_the_end_of_input_and_a_bad_line_fails_the_message() {
        let mut lines = crate::repl::Script::new(&b"one\ntwo\nEND\nafter\n"[..]);
        assert_eq!(
            read_until_end_line(&mut lines, &mut InputLimit::new("G", None), true)
                .ok()
                .as_deref(),
            Some("one\ntwo")
        );
        let mut lines = crate::repl::Script::new(&b"hello\n"[..]);
        assert_eq!(
            read_until_end_line(&mut lines, &mut InputLimit::new("G", None), true)
                .ok()
                .as_deref(),
            Some("hello")
        );
        // The bad line fails the message; the lines to END are read, not run as commands.
        let mut lines = crate::repl::Script::new(&b"ok\n\xff\nmore\nEND\nnext\n"[..]);
        let Err(CliError::Input(e)) =
            read_until_end_line(&mut lines, &mut InputLimit::new("G", None), true)
        else {
            panic!("a bad line passed");
        };
        assert_eq!(e.to_string(), "input line 2: not UTF-8; nothing sent");
        use crate::repl::LineSource;
        assert_eq!(lines.read_line("").ok().flatten().as_deref(), Some("next"));
    }

    /// Review of issue 23: `send` read its input whole into memory (`--file /dev/zero`,
    /// `yes | user-cli send G -`); it stops at the limit with the too-large error.
    #[test]
    fn input_over_the_limit_is_refused_as_soon_as_the_limit_is_read() {
        let limit = MAX_INPUT_BYTES as usize;
        let started = std::time::Instant::now();
        let e = read_text_file(
            std::path::Path::new("/dev/zero"),
            &mut InputLimit::new("G", None),
        )
        .expect_err("endless");
        assert!(
            matches!(e, CliError::TooLarge { len: None, max, .. } if max == MAX_INPUT_BYTES),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!("G: message too large: the limit is {limit} bytes")
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Many short lines (`yes`), and one endless line, from stdin.
        let many = "y\n".repeat(limit);
        let mut lines = crate::repl::Script::new(many.as_bytes());
        assert!(matches!(
            read_to_end(&mut lines, &mut InputLimit::new("G", None)),
            Err(CliError::TooLarge { .. })
        ));
        let zeros = vec![0u8; 3 * limit];
        let mut lines = crate::repl::Script::new(&zeros[..]);
        assert!(matches!(
            read_to_end(&mut lines, &mut InputLimit::new("G", None)),
            Err(CliError::TooLarge { .. })
        ));
        let mut lines = crate::repl::Script::new(many.as_bytes());
        assert!(matches!(
            read_until_end_line(&mut lines, &mut InputLimit::new("G", None), false),
            Err(CliError::TooLarge { .. })
        ));
        // In a session the lines up to END are still read (and dropped); the next runs.
        let session = format!("{many}END\nnext\n");
        let mut lines = crate::repl::Script::new(session.as_bytes());
        assert!(matches!(
            read_until_end_line(&mut lines, &mut InputLimit::new("G", None), true),
            Err(CliError::TooLarge { .. })
        ));
        use crate::repl::LineSource;
        assert_eq!(lines.read_line("").ok().flatten().as_deref(), Some("next"));
        // Exactly the limit passes.
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("body.txt");
        std::fs::write(&path, "z".repeat(limit)).expect("write");
        assert_eq!(
            read_text_file(&path, &mut InputLimit::new("G", None))
                .map(|t| t.len())
                .ok(),
            Some(limit)
        );
    }

    /// Past 1 MiB the node is asked its limit once: a node that takes 2 MiB gets a 1.5 MiB
    /// file, and `/dev/zero` still stops, at the node's limit.
    #[test]
    fn past_the_default_the_nodes_own_limit_applies() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("body.txt");
        let big = MAX_INPUT_BYTES as usize * 3 / 2;
        std::fs::write(&path, "z".repeat(big)).expect("write");
        let mut asked = 0;
        let mut node = || {
            asked += 1;
            Some(2 * MAX_INPUT_BYTES)
        };
        let text = read_text_file(&path, &mut InputLimit::new("G", Some(&mut node)));
        assert_eq!(text.map(|t| t.len()).ok(), Some(big));
        let mut node = || Some(2 * MAX_INPUT_BYTES);
        let e = read_text_file(
            std::path::Path::new("/dev/zero"),
            &mut InputLimit::new("G", Some(&mut node)),
        )
        .expect_err("endless");
        assert!(e.to_string().ends_with("the limit is 2097152 bytes"), "{e}");
        // The node's own limit smaller than the default: the default stands.
        let mut node = || Some(1000);
        let e =
            read_text_file(&path, &mut InputLimit::new("G", Some(&mut node))).expect_err("over");
        assert!(e.to_string().ends_with("the limit is 1048576 bytes"), "{e}");
        assert_eq!(asked, 1);
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
