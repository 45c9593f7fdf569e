//! The command loop shared by interactive mode (rustyline prompt with history and tab
//! completion) and script mode (commands read from a non-TTY stdin). Each line is parsed by
//! the same clap definition as the command line ([`crate::command`]) and run by the same
//! function.
//!
//! At the prompt, text pasted as one block (bracketed paste, as terminals and tmux
//! `paste-buffer -p` send it) runs line by line once Enter is pressed, as typed lines would.
//! At the `... ` prompt of a message read up to `END`, Ctrl-C or Ctrl-D abandons the message
//! (nothing is sent); in a script, the end of the input ends the message instead.
//! The session's [`App`] is made by the first command that needs it ([`LazyApp`]), so
//! `help` or `exit` need no registry.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use rustyline::error::ReadlineError;
use rustyline::history::{DefaultHistory, History};
use rustyline::Editor;

use crate::app::{App, CliError};
use crate::command::{self, Command, Context as Where, Parsed, Step};

/// Where command lines come from.
pub trait LineSource {
    /// The next line without its newline, or `None` at end of input.
    ///
    /// # Errors
    /// Reading failed.
    fn read_line(&mut self, prompt: &str) -> std::io::Result<Option<String>>;

    /// Completes group and user names from `names` from now on (the prompt's tab
    /// completion; nothing elsewhere).
    fn complete_names(&mut self, _names: crate::app::Names) {}
}

/// The prompt a message's lines are read at, up to `END` (`send GROUP` with no text).
const CONTINUATION_PROMPT: &str = "... ";

/// What prepares an [`App`] just made for its session (the live printer, presence, tab
/// completion of names), given the session's line source.
pub type Setup<'a> = Box<dyn FnMut(&mut App, &mut dyn LineSource) + 'a>;

/// The session's [`App`], made when the first command that needs it runs (or earlier, by
/// [`LazyApp::get`]): making it may ask the registry for its key, and a session that only
/// asks for `help` or `exit` must work without a registry. A failure to make it is the
/// failed command's error line; the next command tries again.
pub struct LazyApp<'a> {
    app: Option<App>,
    make: Box<dyn FnMut() -> Result<App, String> + 'a>,
    /// Run once on the app just made (the live printer, presence), with the session's line
    /// source.
    setup: Setup<'a>,
}

impl<'a> LazyApp<'a> {
    /// An app `make` makes when first needed, then `setup` prepares for the session.
    pub fn new(
        make: impl FnMut() -> Result<App, String> + 'a,
        setup: impl FnMut(&mut App, &mut dyn LineSource) + 'a,
    ) -> LazyApp<'a> {
        LazyApp {
            app: None,
            make: Box::new(make),
            setup: Box::new(setup),
        }
    }

    /// The app, made (and set up) now if it was not yet.
    ///
    /// # Errors
    /// Why it could not be made (one line, without the `user-cli: ` prefix).
    pub fn get(&mut self, source: &mut dyn LineSource) -> Result<&mut App, String> {
        if self.app.is_none() {
            let mut app = (self.make)()?;
            (self.setup)(&mut app, source);
            self.app = Some(app);
        }
        self.app
            .as_mut()
            .ok_or_else(|| "the client could not be made".to_owned())
    }
}

/// Lines from a reader (script mode, and what one-shot `send_message` reads): no prompts, no
/// echo. A line that is not UTF-8 is an [`std::io::ErrorKind::InvalidData`] error naming its
/// number (`input line 3: not UTF-8`); it is consumed, so the next read goes on after it. A
/// line longer than [`MAX_LINE_BYTES`] is an [`std::io::ErrorKind::FileTooLarge`] error as
/// soon as that much is read (input with no newline, `/dev/zero`, never fills memory); the
/// next read skips the rest of it first.
pub struct Script<R: BufRead> {
    reader: R,
    /// Lines read so far.
    line: u64,
    /// Whether the last line was cut at [`MAX_LINE_BYTES`], its rest still to skip.
    cut: bool,
}

/// The longest line a [`Script`] reads: twice the largest message body user-cli sends
/// (`send G TEXT` on one line has room for a whole body), 2 MiB.
pub const MAX_LINE_BYTES: u64 = 2 * crate::command::MAX_INPUT_BYTES;

impl<R: BufRead> Script<R> {
    /// Lines from `reader`, numbered from 1.
    pub fn new(reader: R) -> Script<R> {
        Script {
            reader,
            line: 0,
            cut: false,
        }
    }

    /// Reads up to and including the next newline without keeping it (the rest of a line
    /// cut at [`MAX_LINE_BYTES`]).
    fn skip_line(&mut self) -> std::io::Result<()> {
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            match buf.iter().position(|b| *b == b'\n') {
                Some(at) => {
                    self.reader.consume(at + 1);
                    return Ok(());
                }
                None => {
                    let n = buf.len();
                    self.reader.consume(n);
                }
            }
        }
    }
}

impl<R: BufRead> LineSource for Script<R> {
    fn read_line(&mut self, _prompt: &str) -> std::io::Result<Option<String>> {
        use std::io::Read as _;
        if std::mem::take(&mut self.cut) {
            self.skip_line()?;
        }
        let mut bytes = Vec::new();
        if (&mut self.reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut bytes)?
            == 0
        {
            return Ok(None);
        }
        self.line += 1;
        if bytes.len() as u64 > MAX_LINE_BYTES && bytes.last() != Some(&b'\n') {
            self.cut = true;
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!(
                    "input line {}: longer than {} bytes",
                    self.line, MAX_LINE_BYTES
                ),
            ));
        }
        while bytes.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
            bytes.pop();
        }
        String::from_utf8(bytes).map(Some).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("input line {}: not UTF-8", self.line),
            )
        })
    }
}

mod complete;

pub use complete::CommandHelper;

/// The interactive prompt, with history kept in `history` (if any).
pub struct Interactive {
    editor: Editor<CommandHelper, DefaultHistory>,
    history: Option<PathBuf>,
    /// The lines after the first of a pasted block, to run next.
    pending: VecDeque<String>,
}

impl Interactive {
    /// A prompt whose history is loaded from and saved to `history`.
    ///
    /// # Errors
    /// The terminal cannot be set up.
    pub fn new(history: Option<PathBuf>) -> rustyline::Result<Interactive> {
        use clap::CommandFactory;
        let mut editor = Editor::<CommandHelper, DefaultHistory>::new()?;
        editor.set_helper(Some(CommandHelper::new(
            command::words(),
            crate::Args::command(),
            crate::app::Names::default(),
        )));
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        Ok(Interactive {
            editor,
            history,
            pending: VecDeque::new(),
        })
    }
}

impl Interactive {
    /// Completes group and user names from `names` from now on
    /// ([`crate::app::App::names`]).
    pub fn complete_names(&mut self, names: crate::app::Names) {
        if let Some(helper) = self.editor.helper_mut() {
            helper.set_names(names);
        }
    }

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
    /// The next line typed, or of a block pasted. A pasted block arrives as one edit
    /// (bracketed paste), its lines joined by newlines: each is returned in turn, as if typed.
    /// Ctrl-C is an [`std::io::ErrorKind::Interrupted`] error (the session loop shows the
    /// prompt again; a message read at `... ` is abandoned), as is Ctrl-D at `... ` (the
    /// message is not sent); Ctrl-D elsewhere is the end of input.
    fn read_line(&mut self, prompt: &str) -> std::io::Result<Option<String>> {
        if let Some(line) = self.pending.pop_front() {
            return Ok(Some(line));
        }
        let continuation = prompt == CONTINUATION_PROMPT;
        match self.editor.readline(prompt) {
            Ok(line) => {
                let mut lines = line
                    .split('\n')
                    .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned());
                let first = lines.next().unwrap_or_default();
                self.pending.extend(lines);
                for l in std::iter::once(&first).chain(&self.pending) {
                    if !l.trim().is_empty() {
                        let _ = self.editor.history_mut().add(l);
                    }
                }
                Ok(Some(first))
            }
            Err(ReadlineError::Interrupted) => Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                if continuation {
                    "interrupted (Ctrl-C): the message is not sent"
                } else {
                    "interrupted (Ctrl-C)"
                },
            )),
            Err(ReadlineError::Eof) if continuation => Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "end of input (Ctrl-D): the message is not sent; END on a line of its own \
                 sends it",
            )),
            Err(ReadlineError::Eof) => Ok(None),
            Err(ReadlineError::Io(e)) => Err(e),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    fn complete_names(&mut self, names: crate::app::Names) {
        Interactive::complete_names(self, names);
    }
}

/// Runs commands from `source` until `exit` or end of input. A failed line prints its error
/// to `err` as one line and does not stop the session or change its exit status; an input
/// line that is not UTF-8 is reported with its number and skipped; Ctrl-C at the prompt
/// shows it again. `help`, `exit` and the commands that run only alone need no [`App`]; the
/// first other command makes it. Returns the status `exit N` gave (0 for `exit` and at end
/// of input), or 4 when reading input failed.
pub fn run_session(
    app: &mut LazyApp<'_>,
    source: &mut dyn LineSource,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    loop {
        let line = match source.read_line("agora> ") {
            Ok(Some(line)) => line,
            Ok(None) => return 0,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::FileTooLarge
                ) =>
            {
                let _ = writeln!(err, "user-cli: {e}");
                continue;
            }
            Err(e) => {
                let _ = writeln!(err, "user-cli: reading input: {e}");
                return 4;
            }
        };
        let result = match command::parse_line(&line) {
            Ok(Parsed::Nothing) => Ok(Step::Continue),
            Ok(Parsed::Help(text)) => writeln!(out, "{}", text.trim_end())
                .map(|()| Step::Continue)
                .map_err(Into::into),
            Ok(Parsed::Command(Command::Exit { status })) => Ok(Step::Exit(status.unwrap_or(0))),
            Ok(Parsed::Command(c)) if command::runs_alone(&c) => Err(CliError::Usage(
                "that command runs alone: user-cli COMMAND, not in a session".into(),
            )),
            Ok(Parsed::Command(c)) => match app.get(source) {
                Ok(app) => command::run(app, c, Where::Session, source, out),
                Err(e) => {
                    let said = crate::render::escape_controls(&e).into_owned();
                    let _ = writeln!(err, "user-cli: {said}");
                    continue;
                }
            },
            Err(e) => Err(e),
        };
        let _ = out.flush();
        match result {
            Ok(Step::Continue) => {}
            Ok(Step::Exit(status)) => return status,
            Err(e) => {
                let said = crate::render::escape_controls(&e.to_string()).into_owned();
                let _ = writeln!(err, "user-cli: {said}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LineSource, Script};

    #[test]
    fn a_line_that_is_not_utf8_is_named_by_its_number_and_the_next_lines_follow() {
        let mut script = Script::new(&b"first\r\nsecond\n\xff\xfe\nfourth"[..]);
        assert_eq!(
            script.read_line("").ok().flatten().as_deref(),
            Some("first")
        );
        assert_eq!(
            script.read_line("").ok().flatten().as_deref(),
            Some("second")
        );
        let bad = script.read_line("").expect_err("not UTF-8");
        assert_eq!(bad.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(bad.to_string(), "input line 3: not UTF-8");
        assert_eq!(
            script.read_line("").ok().flatten().as_deref(),
            Some("fourth")
        );
        assert!(matches!(script.read_line(""), Ok(None)));
    }

    /// Review of issue 23: a line with no end (`/dev/zero` on stdin) was read into memory
    /// whole; it fails once it passes the limit, and the next read starts after it.
    #[test]
    fn a_line_longer_than_the_limit_fails_at_the_limit_and_is_skipped() {
        let limit = super::MAX_LINE_BYTES as usize;
        let mut input = vec![b'x'; limit + 10];
        input.extend_from_slice(b"\nnext\n");
        let mut script = Script::new(&input[..]);
        let long = script.read_line("").expect_err("too long");
        assert_eq!(long.kind(), std::io::ErrorKind::FileTooLarge);
        assert_eq!(
            long.to_string(),
            format!("input line 1: longer than {limit} bytes")
        );
        assert_eq!(script.read_line("").ok().flatten().as_deref(), Some("next"));
        assert!(matches!(script.read_line(""), Ok(None)));
        let mut exact = vec![b'y'; limit];
        exact.push(b'\n');
        let mut script = Script::new(&exact[..]);
        assert_eq!(
            script.read_line("").ok().flatten().map(|l| l.len()),
            Some(limit)
        );
    }
}
