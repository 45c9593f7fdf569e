//! The command loop shared by interactive mode (rustyline prompt with history and tab
//! completion) and script mode (commands read from a non-TTY stdin).
//!
//! The seed's command words work as written (`get_group_list`, `join_group IP:PORT`,
//! `leave_group`, `get_messages IP:PORT [HH:MM:SS]`, `send_message IP:PORT` followed by text
//! lines ending with `END`, `exit`), alongside short names. Arguments are split like a shell
//! does, so a group name with spaces is quoted: `join_group "Cool Group"`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::{DefaultHistory, History};
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

use crate::app::{App, CliError, HistoryArgs};

/// Command words, for help and completion: (words, arguments, what it does).
pub const COMMANDS: &[(&str, &str, &str)] = &[
    (
        "get_group_list | groups",
        "",
        "list the groups in the registry",
    ),
    ("join_group | join", "GROUP", "join a group"),
    ("leave_group | leave", "GROUP", "leave a group"),
    ("members", "GROUP", "list a group's members"),
    (
        "get_messages | messages",
        "GROUP [HH:MM:SS | RFC3339]",
        "show messages, optionally since a time (HH:MM:SS is today, local time)",
    ),
    (
        "send_message",
        "GROUP",
        "send the text lines that follow, up to a line END",
    ),
    ("send", "GROUP TEXT...", "send one line of text"),
    (
        "subscribe | unsubscribe",
        "GROUP",
        "follow a joined group live, or stop (joining subscribes)",
    ),
    (
        "check",
        "",
        "show what arrived in your groups since you last looked",
    ),
    (
        "invite | ban | unban",
        "GROUP KEY",
        "owner/admins: let a key into a private group, or keep it out",
    ),
    (
        "kick | promote",
        "GROUP USER",
        "owner/admins: remove a member; owner: make an admin",
    ),
    (
        "set_mode",
        "GROUP open|private",
        "owner/admins: who may join",
    ),
    (
        "register | REGISTER",
        "NAME",
        "make NAME your account (bound to your key)",
    ),
    (
        "unregister | UNREGISTER",
        "NAME",
        "remove your account (asks to confirm)",
    ),
    ("users", "", "list accounts, with presence"),
    (
        "send_dm, SEND, NAME:",
        "NAME TEXT...",
        "send a direct message (also `NAME: text`)",
    ),
    (
        "dead_letters",
        "",
        "your messages that could not be delivered",
    ),
    (
        "connect | CONNECT, away, disconnect | DISCONNECT",
        "",
        "go online, away or offline (the prompt keeps you online)",
    ),
    ("whois", "NAME", "show one account"),
    ("help", "", "show this list"),
    ("exit | quit", "", "leave the program"),
];

const WORDS: &[&str] = &[
    "get_group_list",
    "groups",
    "join_group",
    "join",
    "leave_group",
    "leave",
    "members",
    "get_messages",
    "messages",
    "send_message",
    "send",
    "subscribe",
    "unsubscribe",
    "check",
    "invite",
    "ban",
    "unban",
    "kick",
    "promote",
    "set_mode",
    "register",
    "unregister",
    "users",
    "whois",
    "send_dm",
    "dead_letters",
    "connect",
    "away",
    "disconnect",
    "help",
    "exit",
    "quit",
];

/// Where command lines come from.
pub trait LineSource {
    /// The next line without its newline, or `None` at end of input.
    ///
    /// # Errors
    /// Reading failed.
    fn read_line(&mut self, prompt: &str) -> std::io::Result<Option<String>>;
}

/// Lines from a reader (script mode): no prompts, no echo.
pub struct Script<R: BufRead>(pub R);

impl<R: BufRead> LineSource for Script<R> {
    fn read_line(&mut self, _prompt: &str) -> std::io::Result<Option<String>> {
        let mut line = String::new();
        if self.0.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let trimmed = line.trim_end_matches(['\n', '\r']).len();
        line.truncate(trimmed);
        Ok(Some(line))
    }
}

/// Completes command words at the start of the line.
#[derive(Debug, Default)]
pub struct CommandHelper;

impl Completer for CommandHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let head = &line[..pos];
        if head.contains(char::is_whitespace) {
            return Ok((pos, Vec::new()));
        }
        let pairs = WORDS
            .iter()
            .filter(|w| w.starts_with(head))
            .map(|w| Pair {
                display: (*w).to_owned(),
                replacement: format!("{w} "),
            })
            .collect();
        Ok((0, pairs))
    }
}
impl Hinter for CommandHelper {
    type Hint = String;
}
impl Highlighter for CommandHelper {}
impl Validator for CommandHelper {}
impl Helper for CommandHelper {}

/// The interactive prompt, with history kept in `history` (if any).
pub struct Interactive {
    editor: Editor<CommandHelper, DefaultHistory>,
    history: Option<PathBuf>,
}

impl Interactive {
    /// A prompt whose history is loaded from and saved to `history`.
    ///
    /// # Errors
    /// The terminal cannot be set up.
    pub fn new(history: Option<PathBuf>) -> rustyline::Result<Interactive> {
        let mut editor = Editor::<CommandHelper, DefaultHistory>::new()?;
        editor.set_helper(Some(CommandHelper));
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        Ok(Interactive { editor, history })
    }
}

impl Interactive {
    /// A printer that writes lines above the prompt without garbling what is being typed
    /// (rustyline's `ExternalPrinter`).
    ///
    /// # Errors
    /// The terminal does not support it.
    pub fn printer(&mut self) -> rustyline::Result<crate::app::Printer> {
        use rustyline::ExternalPrinter as _;
        let mut p = self.editor.create_external_printer()?;
        Ok(Box::new(move |line: String| {
            let _ = p.print(format!("{line}\n"));
        }))
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        if let Some(path) = &self.history {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = self.editor.save_history(path);
        }
    }
}

impl LineSource for Interactive {
    fn read_line(&mut self, prompt: &str) -> std::io::Result<Option<String>> {
        match self.editor.readline(prompt) {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = self.editor.history_mut().add(&line);
                }
                Ok(Some(line))
            }
            Err(ReadlineError::Interrupted) => Ok(Some(String::new())),
            Err(ReadlineError::Eof) => Ok(None),
            Err(ReadlineError::Io(e)) => Err(e),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Writes the command list.
///
/// # Errors
/// Writing failed.
pub fn write_help(out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "Commands (GROUP is a name, quoted if it has spaces, or IP:PORT):"
    )?;
    for (words, args, what) in COMMANDS {
        writeln!(out, "  {:<44} {what}", format!("{words} {args}").trim_end())?;
    }
    Ok(())
}

/// What a line asks for.
enum Step {
    Continue,
    Exit,
}

/// Runs commands from `source` until `exit` or end of input. Errors go to `err` as one line
/// each and do not stop the session. Returns the exit code of the first failed command, or
/// 0.
pub fn run_session(
    app: &mut App,
    source: &mut dyn LineSource,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let mut status = 0u8;
    loop {
        let line = match source.read_line("agora> ") {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                let _ = writeln!(err, "user-cli: input: {e}");
                return 4;
            }
        };
        match run_line(app, &line, source, out) {
            Ok(Step::Continue) => {}
            Ok(Step::Exit) => break,
            Err(e) => {
                let _ = writeln!(err, "user-cli: {e}");
                if status == 0 {
                    status = e.exit_code();
                }
            }
        }
        let _ = out.flush();
    }
    status
}

fn one_arg<'a>(cmd: &str, args: &'a [String]) -> Result<&'a str, CliError> {
    match args {
        [one] => Ok(one),
        _ => Err(CliError::Usage(format!(
            "{cmd} takes one GROUP (quote a name with spaces)"
        ))),
    }
}

fn run_line(
    app: &mut App,
    line: &str,
    source: &mut dyn LineSource,
    out: &mut dyn Write,
) -> Result<Step, CliError> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(Step::Continue);
    }
    // Seed 003's shorthand for a direct message: `NAME: text`.
    if let Some((name, text)) = trimmed.split_once(": ") {
        if agora_proto::wire::UserName::new(name).is_ok() {
            app.send_dm(name, json_string(text.trim()), out)?;
            return Ok(Step::Continue);
        }
    }
    let words = shlex::split(trimmed)
        .ok_or_else(|| CliError::Usage(format!("unbalanced quotes in {trimmed:?}")))?;
    let Some((cmd, args)) = words.split_first() else {
        return Ok(Step::Continue);
    };
    // Seed 004's `SEND user message` is a direct message; lower-case `send` is the group one.
    if cmd == "SEND" {
        return match args {
            [to, text @ ..] if !text.is_empty() => {
                app.send_dm(to, json_string(&text.join(" ")), out)?;
                Ok(Step::Continue)
            }
            _ => Err(CliError::Usage(
                "SEND takes a user name and a message".into(),
            )),
        };
    }
    // Seed 004's other words are upper case (REGISTER, UNREGISTER): words match in any case.
    match cmd.to_ascii_lowercase().as_str() {
        "help" => write_help(out)?,
        "exit" | "quit" => return Ok(Step::Exit),
        "get_group_list" | "groups" => app.groups(out)?,
        "join_group" | "join" => app.join(one_arg(cmd, args)?, out)?,
        "leave_group" | "leave" => app.leave(one_arg(cmd, args)?, out)?,
        "members" => app.members(one_arg(cmd, args)?, out)?,
        "subscribe" => app.subscribe(one_arg(cmd, args)?, out)?,
        "unsubscribe" => app.unsubscribe(one_arg(cmd, args)?, out)?,
        "check" => app.check(out)?,
        "register" => app.user_register(one_arg(cmd, args)?, out)?,
        "unregister" => {
            let name = one_arg(cmd, args)?.to_owned();
            let answer = source.read_line(&format!(
                "remove the account {name}? This cannot be undone. Type yes: "
            ))?;
            if answer.as_deref().map(str::trim) != Some("yes") {
                return Err(CliError::Usage(format!(
                    "unregister {name}: not confirmed; nothing removed"
                )));
            }
            app.user_unregister(&name, true, out)?;
        }
        "users" => app.users(out)?,
        "send_dm" => match args {
            [to, text @ ..] if !text.is_empty() => {
                app.send_dm(to, json_string(&text.join(" ")), out)?;
            }
            _ => return Err(CliError::Usage("send_dm takes NAME and TEXT".into())),
        },
        "dead_letters" => app.dead_letters(out)?,
        // Seed 004 writes `CONNECT name`: the name is yours, known from your key.
        "connect" => app.connect(agora_proto::wire::Presence::Online, out)?,
        "away" => app.connect(agora_proto::wire::Presence::Away, out)?,
        "disconnect" => app.disconnect(out)?,
        "whois" => app.whois(one_arg(cmd, args)?, out)?,
        "invite" | "ban" | "unban" | "kick" | "promote" | "set_mode" => {
            let [target, arg] = args else {
                return Err(CliError::Usage(format!(
                    "{cmd} takes GROUP and one argument"
                )));
            };
            app.policy(target, policy_change(cmd, arg)?, out)?;
        }
        "get_messages" | "messages" => {
            let (target, since) = match args {
                [target] => (target, None),
                [target, since] => (target, Some(since.clone())),
                _ => {
                    return Err(CliError::Usage(format!(
                        "{cmd} takes GROUP and an optional time (HH:MM:SS or RFC 3339)"
                    )))
                }
            };
            let history = HistoryArgs {
                since,
                ..HistoryArgs::default()
            };
            app.messages(target, &history, out)?;
        }
        "send_message" => {
            let target = one_arg(cmd, args)?.to_owned();
            let mut lines = Vec::new();
            loop {
                match source.read_line("... ")? {
                    Some(l) if l.trim_end() == "END" => break,
                    Some(l) => lines.push(l),
                    None => {
                        return Err(CliError::Usage(
                            "send_message: input ended before the END line; nothing sent".into(),
                        ))
                    }
                }
            }
            app.send(&target, json_string(&lines.join("\n")), out)?;
        }
        "send" => match args {
            [target, text @ ..] if !text.is_empty() => {
                app.send(target, json_string(&text.join(" ")), out)?;
            }
            _ => return Err(CliError::Usage("send takes GROUP and TEXT".into())),
        },
        other => {
            return Err(CliError::Usage(format!(
                "unknown command {other:?}; type help for the list"
            )))
        }
    }
    Ok(Step::Continue)
}

/// The policy change `cmd ARG` asks for.
///
/// # Errors
/// [`CliError::Usage`] for a bad key, name or mode.
pub fn policy_change(cmd: &str, arg: &str) -> Result<crate::app::PolicyChange, CliError> {
    use crate::app::PolicyChange;
    use agora_proto::wire::{GroupMode, UserName};
    let key = || {
        arg.parse()
            .map_err(|e: agora_proto::key::BadKey| CliError::Usage(e.to_string()))
    };
    let user = || UserName::new(arg).map_err(|e| CliError::Usage(e.to_string()));
    Ok(match cmd {
        "invite" => PolicyChange::Invite(key()?),
        "ban" => PolicyChange::Ban(key()?),
        "unban" => PolicyChange::Unban(key()?),
        "kick" => PolicyChange::Kick(user()?),
        "promote" => PolicyChange::Promote(user()?),
        _ => PolicyChange::SetMode(match arg {
            "open" => GroupMode::Open,
            "private" => GroupMode::Private,
            other => {
                return Err(CliError::Usage(format!(
                    "mode must be open or private, not {other:?}"
                )))
            }
        }),
    })
}

/// A text as a JSON string body.
pub fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}
