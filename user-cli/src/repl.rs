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
            Ok(Parsed::Command(c)) => command::run(app, c, Where::Session, source, out),
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
