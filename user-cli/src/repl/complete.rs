//! Tab completion at the prompt ([`CommandHelper`], rustyline's `Completer`): command words
//! at the start of the line, and known user names as `NAME: ` (a direct message); after them, what the argument under the cursor takes, read from
//! the command's clap definition (the same one that parses the line):
//!
//! - a group (`GROUP` arguments, `watch`'s groups): the groups joined (the state file) and
//!   those of the last `groups` listing, quoted when they have spaces (`'Cool Group'`);
//! - a user (`send_dm`, `whois`, `block`, `unblock`, `kick`, `promote`; each of `multicast`'s
//!   comma-separated names): the accounts `users` and `whois` showed, those you sent direct
//!   messages to or got them from, and the senders seen in your groups;
//! - a path (`send_file`'s file, `get_file --out`, `keys export|import`, any `--file`):
//!   files and directories, by rustyline's `FilenameCompleter`;
//! - an option (`--…`): the command's own options; a fixed set of values (`set_mode`'s
//!   `open`/`private`): those values.
//!
//! The line is split as the session splits it (shlex, as a shell would), so a word being
//! typed inside quotes (`send "Cool G`) completes too.

use std::borrow::Cow;

use clap::builder::ValueHint;
use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::{Context, Helper};

use crate::app::Names;

/// What the word under the cursor is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    /// A command word.
    Command,
    /// A subcommand of `keys` or `admin`.
    Subcommand(Vec<String>),
    /// A group name.
    Group,
    /// A user name; `list`: one of several separated by commas.
    User { list: bool },
    /// A file or directory.
    Path,
    /// One of these fixed values (options, a value enum).
    Values(Vec<String>),
    /// Nothing to offer.
    Nothing,
}

/// The prompt's completer, hinter, highlighter and validator (only completion does
/// anything).
pub struct CommandHelper {
    words: Vec<String>,
    command: clap::Command,
    names: Names,
    files: FilenameCompleter,
}

impl std::fmt::Debug for CommandHelper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandHelper")
            .field("words", &self.words.len())
            .finish_non_exhaustive()
    }
}

impl CommandHelper {
    /// A completer offering `words` at the start of a line, and after them what `command`'s
    /// subcommands take, with group and user names from `names`.
    pub fn new(words: Vec<String>, mut command: clap::Command, names: Names) -> CommandHelper {
        command.build();
        CommandHelper {
            words,
            command,
            names,
            files: FilenameCompleter::new(),
        }
    }

    /// Uses `names` for group and user names from now on.
    pub fn set_names(&mut self, names: Names) {
        self.names = names;
    }

    /// The candidates for the line `line` with the cursor at byte `pos`: where the
    /// replaced text starts, and each replacement.
    fn candidates(&self, line: &str, pos: usize) -> (usize, Vec<Pair>) {
        let head = &line[..pos];
        let (done, start, typed) = split(head);
        let pick = |names: Vec<String>, start: usize, typed: &str, end: &str| {
            let pairs: Vec<Pair> = names
                .into_iter()
                .filter(|n| n.starts_with(typed))
                .map(|n| Pair {
                    replacement: format!("{}{end}", quote(&n)),
                    display: n,
                })
                .collect();
            (start, pairs)
        };
        match self.slot(&done, &typed) {
            Slot::Command => {
                let (at, mut pairs) = pick(self.words.clone(), start, &typed, " ");
                // Seed 003's `NAME: text`, a direct message.
                let (_, dms) = pick(self.names.users(), start, &typed, ": ");
                pairs.extend(dms.into_iter().filter(|p| !p.replacement.starts_with('\'')));
                (at, pairs)
            }
            Slot::Subcommand(words) | Slot::Values(words) => pick(words, start, &typed, " "),
            Slot::Group => pick(self.names.groups(), start, &typed, " "),
            Slot::User { list: false } => pick(self.names.users(), start, &typed, " "),
            Slot::User { list: true } => {
                // Only the name after the last comma is completed.
                let cut = typed.rfind(',').map_or(0, |i| i + 1);
                let at = start + head[start..].rfind(',').map_or(0, |i| i + 1);
                pick(self.names.users(), at, &typed[cut..], "")
            }
            Slot::Path => self
                .files
                .complete_path(line, pos)
                .unwrap_or((pos, Vec::new())),
            Slot::Nothing => (pos, Vec::new()),
        }
    }

    /// What the word being typed is, after the complete words `done`.
    fn slot(&self, done: &[String], typed: &str) -> Slot {
        let Some(first) = done.first() else {
            return Slot::Command;
        };
        let name = if first == "SEND" {
            "send_dm".to_owned()
        } else {
            first.to_ascii_lowercase()
        };
        let Some(mut command) = self.command.find_subcommand(&name) else {
            return Slot::Nothing;
        };
        let mut positional = 0;
        let mut value_of: Option<&clap::Arg> = None;
        for word in &done[1..] {
            if value_of.take().is_some() {
                continue;
            }
            if let Some(long) = word.strip_prefix("--") {
                value_of = command
                    .get_opts()
                    .find(|a| a.get_long() == Some(long))
                    .filter(|a| a.get_action().takes_values());
            } else if command.has_subcommands() && positional == 0 {
                match command.find_subcommand(word) {
                    Some(sub) => command = sub,
                    None => return Slot::Nothing,
                }
            } else {
                positional += 1;
            }
        }
        if let Some(arg) = value_of {
            return arg_slot(command, arg);
        }
        if typed.starts_with('-') {
            let mut options: Vec<String> = command
                .get_opts()
                .chain(
                    command
                        .get_arguments()
                        .filter(|a| !a.get_action().takes_values()),
                )
                .filter(|a| !a.is_global_set() && !a.is_hide_set())
                .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
                .filter(|l| l != "--help")
                .collect();
            options.sort();
            options.dedup();
            return Slot::Values(options);
        }
        if command.has_subcommands() {
            return match positional {
                0 => Slot::Subcommand(
                    command
                        .get_subcommands()
                        .filter(|c| !c.is_hide_set())
                        .map(|c| c.get_name().to_owned())
                        .collect(),
                ),
                _ => Slot::Nothing,
            };
        }
        let positionals: Vec<&clap::Arg> = command.get_positionals().collect();
        let arg = positionals.get(positional).copied().or_else(|| {
            positionals
                .last()
                .copied()
                .filter(|a| a.get_num_args().is_some_and(|n| n.max_values() > 1))
        });
        arg.map_or(Slot::Nothing, |arg| arg_slot(command, arg))
    }
}

/// What the value of `arg` (of `command`) is.
fn arg_slot(command: &clap::Command, arg: &clap::Arg) -> Slot {
    let id = arg.get_id().as_str();
    if matches!(
        arg.get_value_hint(),
        ValueHint::AnyPath | ValueHint::FilePath | ValueHint::DirPath
    ) || matches!(id, "path" | "file" | "out")
    {
        return Slot::Path;
    }
    match id {
        "group" | "groups" => Slot::Group,
        // A new account's or group's name is not one of the known ones.
        "name" if matches!(command.get_name(), "register" | "create") => Slot::Nothing,
        "to" if command.get_name() == "multicast" => Slot::User { list: true },
        "to" | "name" | "member" => Slot::User { list: false },
        _ => {
            let values: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| v.get_name().to_owned())
                .collect();
            if values.is_empty() {
                Slot::Nothing
            } else {
                Slot::Values(values)
            }
        }
    }
}

/// A name as it must be typed: as is when a shell would read it back unchanged, else quoted
/// (`'Cool Group'`).
fn quote(name: &str) -> Cow<'_, str> {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.,:/@+=%".contains(c));
    if plain {
        return Cow::Borrowed(name);
    }
    shlex::try_quote(name).unwrap_or(Cow::Borrowed(name))
}

/// Splits the text before the cursor as the session splits a line (shell words: quotes and
/// backslashes): the complete words, the byte offset where the word being typed starts, and
/// that word as typed so far, unquoted. A line ending in a space is starting a new word.
fn split(head: &str) -> (Vec<String>, usize, String) {
    let mut done = Vec::new();
    let mut word = String::new();
    let mut start = None;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in head.char_indices() {
        if escaped {
            word.push(c);
            escaped = false;
            continue;
        }
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                escaped = true;
                start.get_or_insert(i);
            }
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                start.get_or_insert(i);
            }
            (None, c) if c.is_whitespace() => {
                if start.take().is_some() {
                    done.push(std::mem::take(&mut word));
                }
            }
            (None, c) => {
                word.push(c);
                start.get_or_insert(i);
            }
        }
    }
    (done, start.unwrap_or(head.len()), word)
}

impl Completer for CommandHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        Ok(self.candidates(line, pos))
    }
}
impl Hinter for CommandHelper {
    type Hint = String;
}
impl Highlighter for CommandHelper {}
impl Validator for CommandHelper {}
impl Helper for CommandHelper {}

#[cfg(test)]
mod tests {
    use super::*;

    fn helper(names: &Names) -> CommandHelper {
        use clap::CommandFactory;
        CommandHelper::new(
            crate::command::words(),
            crate::Args::command(),
            names.clone(),
        )
    }

    fn names() -> Names {
        let names = Names::default();
        names.add_groups(["Cool Group".into(), "chess".into(), "cooking".into()]);
        names.add_users(["alice".into(), "albert".into(), "bob".into()]);
        names
    }

    /// The replacements offered for the line `line` with the cursor at its end, and where
    /// the replaced text starts.
    fn complete(h: &CommandHelper, line: &str) -> (usize, Vec<String>) {
        let (at, pairs) = h.candidates(line, line.len());
        (at, pairs.into_iter().map(|p| p.replacement).collect())
    }

    #[test]
    fn lines_split_as_a_shell_would_with_the_word_being_typed_last() {
        assert_eq!(split(""), (vec![], 0, String::new()));
        assert_eq!(split("jo"), (vec![], 0, "jo".into()));
        assert_eq!(split("join "), (vec!["join".into()], 5, String::new()));
        assert_eq!(
            split("send 'Cool Group' hi th"),
            (
                vec!["send".into(), "Cool Group".into(), "hi".into()],
                21,
                "th".into()
            )
        );
        assert_eq!(
            split("send \"Cool G"),
            (vec!["send".into()], 5, "Cool G".into())
        );
        assert_eq!(
            split("send Cool\\ G"),
            (vec!["send".into()], 5, "Cool G".into())
        );
    }

    #[test]
    fn command_words_complete_at_the_start_of_a_line() {
        let h = helper(&names());
        let (at, got) = complete(&h, "sen");
        assert_eq!(at, 0);
        for word in ["send ", "send_dm ", "send_file ", "send_message "] {
            assert!(got.contains(&word.to_owned()), "{word} in {got:?}");
        }
        assert!(got.iter().all(|w| w.starts_with("sen")), "{got:?}");
        let (_, got) = complete(&h, "get_group");
        assert_eq!(got, ["get_group_list "]);
        // A known user's name, for seed 003's `NAME: text`.
        assert_eq!(complete(&h, "bo").1, ["bob: "]);
        assert!(complete(&h, "al").1.contains(&"alice: ".to_owned()));
    }

    /// Issue 23: group names complete after every command that takes a group, quoted when
    /// they have spaces; joined groups come from the state as well as the listing.
    #[test]
    fn group_names_complete_quoted_when_they_have_spaces() {
        let names = names();
        let h = helper(&names);
        assert_eq!(complete(&h, "join Coo"), (5, vec!["'Cool Group' ".into()]));
        assert_eq!(
            complete(&h, "send c"),
            (5, vec!["chess ".into(), "cooking ".into()])
        );
        // Inside quotes already typed: the whole word is replaced.
        assert_eq!(
            complete(&h, "messages \"Cool"),
            (9, vec!["'Cool Group' ".into()])
        );
        assert_eq!(complete(&h, "members ").1.len(), 3);
        assert_eq!(complete(&h, "watch chess co").1, ["cooking "]);
        assert_eq!(complete(&h, "get_file ch").1, ["chess "]);
        assert_eq!(complete(&h, "admin stop ch").1, ["chess "]);
        // The message text is not a group.
        assert!(complete(&h, "send chess c").1.is_empty());
    }

    #[test]
    fn user_names_complete_where_a_user_is_named() {
        let h = helper(&names());
        assert_eq!(
            complete(&h, "send_dm al"),
            (8, vec!["albert ".into(), "alice ".into()])
        );
        assert_eq!(complete(&h, "SEND b").1, ["bob "]);
        assert_eq!(complete(&h, "whois b").1, ["bob "]);
        assert_eq!(complete(&h, "kick chess b").1, ["bob "]);
        // Each name of a comma-separated list.
        assert_eq!(
            complete(&h, "multicast bob,ali"),
            (14, vec!["alice".into()])
        );
        // A new account's name is not completed from the known ones.
        assert!(complete(&h, "register a").1.is_empty());
    }

    #[test]
    fn paths_options_and_fixed_values_complete() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("photo.jpg"), b"x").expect("write");
        let base = dir.path().display().to_string();
        let h = helper(&names());
        let (_, got) = complete(&h, &format!("send_file chess {base}/pho"));
        assert!(
            got.iter().any(|p| p.ends_with("photo.jpg")),
            "send_file's path: {got:?}"
        );
        let (_, got) = complete(&h, &format!("get_file chess 3 --out {base}/ph"));
        assert!(
            got.iter().any(|p| p.ends_with("photo.jpg")),
            "--out: {got:?}"
        );
        let (_, got) = complete(&h, &format!("keys export {base}/ph"));
        assert!(
            got.iter().any(|p| p.ends_with("photo.jpg")),
            "keys: {got:?}"
        );
        assert_eq!(complete(&h, "get_file chess 3 --o").1, ["--out "]);
        assert_eq!(complete(&h, "set_mode chess p").1, ["private "]);
        assert_eq!(complete(&h, "keys ex").1, ["export "]);
        assert_eq!(complete(&h, "help jo").1, ["join "]);
    }

    /// Issue 24: `create` completes its options and mode, never a known group as the new
    /// name; `delete` completes a group.
    #[test]
    fn create_and_delete_complete() {
        let h = helper(&names());
        assert!(complete(&h, "create c").1.is_empty(), "a new name");
        assert_eq!(complete(&h, "create team --mode p").1, ["private "]);
        let (_, options) = complete(&h, "create team --");
        for option in ["--host ", "--host-key ", "--mode "] {
            assert!(options.contains(&option.to_owned()), "{options:?}");
        }
        assert_eq!(complete(&h, "delete ch").1, ["chess "]);
        assert_eq!(complete(&h, "delete chess --y").1, ["--yes "]);
        assert!(complete(&h, "cre").1.contains(&"create ".to_owned()));
    }
}
