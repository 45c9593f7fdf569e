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
        let result = match command::parse_line(&line) {
            Ok(Parsed::Nothing) => Ok(Step::Continue),
            Ok(Parsed::Help(text)) => writeln!(out, "{}", text.trim_end())
                .map(|()| Step::Continue)
                .map_err(Into::into),
            Ok(Parsed::Command(c)) => command::run(app, c, Where::Session, source, out),
            Err(e) => Err(e),
        };
        match result {
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
