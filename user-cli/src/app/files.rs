//! `send_file` and `get_file`: attachments (PROTOCOL §6.9), streamed in chunks with a
//! progress display, never held whole in memory, and resumed when run again after an
//! interruption.
//!
//! - Upload: the file is hashed (SHA-256) in one streaming pass, shown as progress (a
//!   multi-GiB file takes a while), the node says how much of that content it holds
//!   (`have`), the rest goes in its chunk size, then a message carries the file. A content
//!   the node holds already is not sent again.
//! - A transfer cut part way (a timeout, a local write) ends with "run the same command
//!   again to resume"; a refusal does not.
//! - Download: into `TARGET.agora-part` beside the target, resumed from its length; the whole
//!   file is then checked against the digest and only then renamed to the target, so a short
//!   or corrupt download never stands under the target's name.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use agora_proto::id::MessageId;
use agora_proto::wire::{Attachment, HistoryQuery, Message, Sha256Digest};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::{App, CliError};
use crate::render::{Format, Item, Output};

/// A transfer's progress, shown on stderr: a bar on a terminal, a line per tenth without one,
/// and with `--json` progress events on stdout.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    format: Format,
    /// `progress` for a transfer, `hashing` for the pass that hashes a file first.
    event: &'static str,
    what: String,
    total: u64,
    last_tenth: u64,
}

impl Progress {
    fn new(format: Format, what: String, total: u64, done: u64) -> Progress {
        Progress::of("progress", format, what, total, done)
    }

    /// The hashing pass before an upload: on a terminal a bar, else a line per tenth
    /// (`hashing report.pdf: 1258291 of 12582912 bytes`), with `--json` `hashing` events.
    fn hashing(format: Format, what: String, total: u64) -> Progress {
        Progress::of("hashing", format, what, total, 0)
    }

    fn of(event: &'static str, format: Format, what: String, total: u64, done: u64) -> Progress {
        let bar = (format == Format::Human && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(if event == "hashing" {
                format!("hashing {what}")
            } else {
                what.clone()
            });
            bar.set_position(done);
            bar
        });
        let progress = Progress {
            bar,
            format,
            event,
            what,
            total,
            last_tenth: done * 10 / total.max(1),
        };
        // Where it starts (a resumed transfer starts past 0), then at every tenth.
        progress.report(done);
        progress
    }

    fn report(&self, done: u64) {
        if self.bar.is_some() {
            return;
        }
        match self.format {
            // Not println!: a closed stdout (`| head -1`) must not panic.
            Format::Json => {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stdout().lock(),
                    "{}",
                    serde_json::json!({"event": self.event, "what": self.what, "done": done, "total": self.total})
                );
            }
            Format::Human if self.event == "hashing" => {
                eprintln!("hashing {}: {done} of {} bytes", self.what, self.total)
            }
            Format::Human => eprintln!("{}: {done} of {} bytes", self.what, self.total),
        }
    }

    fn set(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let tenth = done * 10 / self.total.max(1);
        if tenth == self.last_tenth && done < self.total {
            return;
        }
        self.last_tenth = tenth;
        self.report(done);
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The SHA-256 of a file and its size, read in 1 MiB pieces; `progress` gets the bytes
/// hashed so far after each piece.
fn hash_path(path: &Path, mut progress: impl FnMut(u64)) -> std::io::Result<(Sha256Digest, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        progress(size);
    }
    Ok((Sha256Digest::from_bytes(hasher.finalize().into()), size))
}

/// A media type from a file name's extension, for the common kinds; else
/// `application/octet-stream`.
fn media_type_of(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "pdf" => "application/pdf",
        "txt" | "log" => "text/plain",
        "md" => "text/markdown",
        "csv" => "text/csv",
        "json" => "application/json",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "mp3" => "audio/mpeg",
        "mp4" => "video/mp4",
        _ => "application/octet-stream",
    }
}

/// A local file's failure (exit 4), naming the file.
fn io_error(path: &Path, e: &std::io::Error) -> CliError {
    CliError::Local {
        path: path.to_owned(),
        source: std::io::Error::new(e.kind(), e.to_string()),
    }
}

/// A transfer's failure part way: what was done is kept, and running the same command again
/// resumes. A refusal (not a member, too large, a usage error) is not resumable and stays as
/// it is.
fn resumable(e: CliError) -> CliError {
    match e {
        CliError::Remote {
            source: agora_common::client::ClientError::Server(_),
            ..
        }
        | CliError::Usage(_)
        | CliError::Refused(_)
        | CliError::TooLarge { .. }
        | CliError::Interrupted(_) => e,
        other => CliError::Interrupted(Box::new(other)),
    }
}

impl App {
    /// Where `target`'s node is, and as whom to talk to it, for a windowed transfer.
    ///
    /// # Errors
    /// Resolution failures; no key known for the node.
    fn transfer_target(
        &mut self,
        target: &str,
    ) -> Result<agora_common::transfer::UploadTarget, CliError> {
        let resolved = self.resolve(target)?;
        Ok(agora_common::transfer::UploadTarget {
            endpoint: resolved.endpoint.to_string(),
            curve: self.node_curve(target, resolved.key)?,
            group: resolved.name,
            user: self.user.clone(),
        })
    }

    /// `send_file GROUP PATH [--caption TEXT] [--media-type TYPE]`.
    ///
    /// # Errors
    /// [`CliError::Local`] for a file that cannot be read; the node's refusals; a transfer
    /// cut part way is [`CliError::Interrupted`] (run again to resume).
    pub fn send_file(
        &mut self,
        target: &str,
        path: &Path,
        caption: Option<&str>,
        media_type: Option<&str>,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| CliError::Usage(format!("{}: not a file", path.display())))?;
        let format = self.format;
        let total = std::fs::metadata(path)
            .map_err(|e| io_error(path, &e))?
            .len();
        let mut hashing = Progress::hashing(format, name.clone(), total);
        let hashed = hash_path(path, |done| hashing.set(done));
        hashing.finish();
        let (sha256, size) = hashed.map_err(|e| io_error(path, &e))?;
        let upload_target = self.transfer_target(target)?;
        let mut file = File::open(path).map_err(|e| io_error(path, &e))?;
        let ctx = self.ctx.clone();
        let timeout = self.options.timeout;
        let mut progress: Option<Progress> = None;
        let put = agora_common::transfer::put(
            &ctx,
            &upload_target,
            sha256,
            size,
            &mut file,
            timeout,
            || {
                self.on_node(target, |node| node.upload(sha256, size))
                    .map(|(reply, _)| reply)
            },
            |have| {
                progress
                    .get_or_insert_with(|| Progress::new(format, name.clone(), size, have))
                    .set(have);
            },
        );
        if let Some(progress) = progress {
            progress.finish();
        }
        match put {
            Ok(()) => {}
            Err(agora_common::transfer::PutError::Ask(e)) => return Err(resumable(e)),
            Err(agora_common::transfer::PutError::Send(source)) => {
                return Err(resumable(super::remote(target, source)))
            }
            Err(agora_common::transfer::PutError::Incomplete { have, size }) => {
                return Err(CliError::Interrupted(Box::new(CliError::Refused(format!(
                    "{target}: the node holds {have} of {size} bytes after the upload"
                )))))
            }
            Err(agora_common::transfer::PutError::Sealing) => {
                return Err(CliError::Interrupted(Box::new(CliError::Refused(format!(
                    "{target}: the node is still checking the file"
                )))))
            }
            Err(e) => {
                return Err(CliError::Interrupted(Box::new(CliError::Refused(format!(
                    "{target}: {e}"
                )))))
            }
        }
        let attachment = Attachment {
            sha256,
            size,
            name,
            media_type: media_type.unwrap_or(media_type_of(path)).to_owned(),
        };
        let caption = match caption {
            Some(text) => crate::command::json_string(text),
            None => "null".to_owned(),
        };
        let caption =
            RawValue::from_string(caption).map_err(|e| CliError::Usage(format!("caption: {e}")))?;
        let id = self.new_message_id();
        let (ack, _) = self.on_node(target, |node| {
            node.send_attachment(attachment.clone(), caption.clone(), id)
        })?;
        out.emit(Item::Sent {
            group: target,
            ack: &ack,
        })?;
        Ok(())
    }

    /// `get_file GROUP SEQ|ID [--out PATH]`: the file a message carries.
    ///
    /// # Errors
    /// [`CliError::Usage`] for a bad `SEQ|ID`; [`CliError::Refused`] for a message that does
    /// not exist or carries no file; [`CliError::Local`] for a file that cannot be written;
    /// [`CliError::Interrupted`] for a download cut part way; a digest mismatch (the download
    /// did not match: nothing is left at the
    /// target); the node's refusals.
    pub fn get_file(
        &mut self,
        target: &str,
        which: &str,
        out_path: Option<&Path>,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let query = match (which.parse::<u64>(), which.parse::<MessageId>()) {
            (Ok(seq), _) if seq > 0 => HistoryQuery::AfterSeq(seq - 1),
            (_, Ok(id)) => HistoryQuery::ById(id),
            _ => {
                return Err(CliError::Usage(format!(
                    "{which:?} is neither a seq nor a message id"
                )))
            }
        };
        let (page, _) = self.on_node(target, |node| node.get_messages(query, Some(1)))?;
        let message: Message = page
            .messages
            .into_iter()
            .next()
            .filter(|m| match query {
                HistoryQuery::AfterSeq(before) => m.seq == before + 1,
                _ => true,
            })
            .ok_or_else(|| CliError::Refused(format!("{target}: no message {which}")))?;
        let attachment = message.attachment.ok_or_else(|| {
            CliError::Refused(format!("{target}: message {which} carries no file"))
        })?;
        // The name is the sender's: only its last component, never a path.
        let default_name = Path::new(&attachment.name)
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(attachment.sha256.to_string()));
        let dest = out_path.map_or(default_name, Path::to_path_buf);
        let part = PathBuf::from(format!("{}.agora-part", dest.display()));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(|e| io_error(&part, &e))?;
        let mut have = file.metadata().map_err(|e| io_error(&part, &e))?.len();
        if have > attachment.size {
            file.set_len(0).map_err(|e| io_error(&part, &e))?;
            have = 0;
        }
        let mut progress =
            Progress::new(self.format, attachment.name.clone(), attachment.size, have);
        let label = target.to_owned();
        let source = self.transfer_target(target)?;
        let downloaded = agora_common::transfer::download_windowed(
            &self.ctx,
            &source,
            attachment.sha256,
            attachment.size,
            have,
            agora_proto::wire::MAX_CHUNK_BYTES as u64,
            agora_proto::wire::UPLOAD_WINDOW,
            self.options.timeout,
            |offset, bytes| {
                file.write_all(bytes)?;
                progress.set(offset + bytes.len() as u64);
                Ok(())
            },
        )
        .map_err(|source| resumable(super::remote(&label, source)));
        progress.finish();
        downloaded?;
        file.sync_all().map_err(|e| io_error(&part, &e))?;
        drop(file);
        let (digest, size) = hash_path(&part, |_| {}).map_err(|e| io_error(&part, &e))?;
        if digest != attachment.sha256 || size != attachment.size {
            let _ = std::fs::remove_file(&part);
            return Err(CliError::Refused(format!(
                "{label}: the download hashes to {digest}, not {}; discarded it, run the same command again",
                attachment.sha256
            )));
        }
        std::fs::rename(&part, &dest).map_err(|e| io_error(&dest, &e))?;
        out.emit(Item::FileSaved {
            path: &dest,
            attachment: &attachment,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_common::client::ClientError;

    #[test]
    fn a_cut_transfer_says_run_again_and_a_refusal_does_not() {
        let timeout = CliError::Remote {
            target: "Cool Group".into(),
            source: ClientError::Timeout {
                endpoint: "tcp://127.0.0.1:5560".into(),
                waited: std::time::Duration::from_secs(5),
            },
        };
        let cut = resumable(timeout);
        assert!(matches!(cut, CliError::Interrupted(_)));
        assert!(cut
            .to_string()
            .ends_with("run the same command again to resume"));
        assert_eq!(cut.exit_code(), 3);
        let refused = CliError::Remote {
            target: "Cool Group".into(),
            source: ClientError::Server(agora_proto::wire::WireError::new(
                agora_proto::wire::ErrorCode::NotMember,
                "mallory is not a member of \"Cool Group\"",
            )),
        };
        let refused = resumable(refused);
        assert!(!refused.to_string().contains("resume"));
        assert_eq!(refused.exit_code(), 1);
        let local = resumable(io_error(
            Path::new("/tmp/x.agora-part"),
            &std::io::Error::from(std::io::ErrorKind::StorageFull),
        ));
        assert!(local.to_string().starts_with("/tmp/x.agora-part: "));
        assert!(local.to_string().ends_with("to resume"));
        assert_eq!(local.exit_code(), 4);
    }
}
