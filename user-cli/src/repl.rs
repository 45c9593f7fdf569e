//! The command loop shared by interactive mode (rustyline prompt with history and tab
//! completion) and script mode (commands read from a non-TTY stdin). Each line is parsed by
//! the same clap definition as the command line ([`crate::command`]) and run by the same
//! function.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use rustyline::error::ReadlineError;
use rustyline::history::{DefaultHistory, History};
use rustyline::Editor;

use crate::app::App;
use crate::command::{self, Context as Where, Parsed, Step};

/// Where command lines come from.
pub trait LineSource {
    /// The next line without its newline, or `None` at end of input.
    ///
    /// # Errors
    /// Reading failed.
    fn read_line(&mut self, prompt: &str) -> std::io::Result<Option<String>>;
}

/// Lines from a reader (script mode, and what one-shot `send_message` reads): no prompts, no
/// echo. A line that is not UTF-8 is an [`std::io::ErrorKind::InvalidData`] error naming its
/// number (`input line 3: not UTF-8`); it is consumed, so the next read goes on after it.
pub struct Script<R: BufRead> {
    reader: R,
    /// Lines read so far.
    line: u64,
}

impl<R: BufRead> Script<R> {
    /// Lines from `reader`, numbered from 1.
    pub fn new(reader: R) -> Script<R> {
        Script { reader, line: 0 }
    }
}

impl<R: BufRead> LineSource for Script<R> {
    fn read_line(&mut self, _prompt: &str) -> std::io::Result<Option<String>> {
        let mut bytes = Vec::new();
        if self.reader.read_until(b'\n', &mut bytes)? == 0 {
            return Ok(None);
        }
        self.line += 1;
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
        Ok(Interactive { editor, history })
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

/// Runs commands from `source` until `exit` or end of input. A failed line prints its error
/// to `err` as one line and does not stop the session or change its exit status; an input
/// line that is not UTF-8 is reported with its number and skipped. Returns the status
/// `exit N` gave (0 for `exit` and at end of input), or 4 when reading input failed.
pub fn run_session(
    app: &mut App,
    source: &mut dyn LineSource,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    loop {
        let line = match source.read_line("agora> ") {
            Ok(Some(line)) => line,
            Ok(None) => return 0,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
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
            Ok(Parsed::Command(c)) => command::run(app, c, Where::Session, source, out),
            Err(e) => Err(e),
        };
        let _ = out.flush();
        match result {
            Ok(Step::Continue) => {}
            Ok(Step::Exit(status)) => return status,
            Err(e) => {
                let _ = writeln!(err, "user-cli: {e}");
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
}
