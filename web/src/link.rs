//! Fresh sign-in links from a running personal-mode gateway: its local link socket.
//!
//! A personal-mode gateway listens on a Unix socket ([`LinkSocket`]) that only its own user
//! can open: the socket is 0600 in a 0700 directory, and the gateway also checks the peer's
//! user id (`SO_PEERCRED`) against its own. `agora-web link` ([`request`]) asks there for a
//! new one-time link ([`crate::auth::Sessions::mint`]) and prints it, so a spent or expired
//! link never needs a restart.
//!
//! # Format
//! One request line, one answer line, then the gateway closes the connection (UTF-8, `\n`
//! ends each line, at most [`MAX_LINE_BYTES`]):
//!
//! - request `link`: answer `ok URL` (`http://127.0.0.1:PORT/?token=T`);
//! - anything else, or no link to give: answer `error MESSAGE`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::auth::Sessions;

/// The longest request or answer line, in bytes: 4 KiB.
pub const MAX_LINE_BYTES: usize = 4 << 10;

/// How long the gateway waits for a request line: 5 s.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong with the link socket, at either end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Another gateway answers at the socket's path (at start).
    #[error(
        "another agora-web answers at {0} (`agora-web link` asks it): stop it, or pass \
         --link-socket with another path"
    )]
    Busy(PathBuf),
    /// The socket's directory can be entered by others (at start).
    #[error(
        "{path}: other users can enter this directory (mode {mode:o}); the link socket needs \
         a private one (chmod 700 it, or pass --link-socket in another)"
    )]
    SharedDirectory {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Something other than a socket is at the path (at start).
    #[error("{0} exists and is not a socket: remove it, or pass --link-socket with another path")]
    NotASocket(PathBuf),
    /// No gateway answers at the path (`agora-web link`).
    #[error(
        "no agora-web answers at {path} ({cause}): start it (agora-web --user NAME), or pass \
         the --link-socket it was started with"
    )]
    NoGateway {
        /// The socket's path.
        path: PathBuf,
        /// Why the connection failed (said in the message, so not a `source`).
        cause: std::io::Error,
    },
    /// The gateway did not answer in time (`agora-web link`).
    #[error("the agora-web at {path} did not answer within {waited}: is it stuck? restart it")]
    Timeout {
        /// The socket's path.
        path: PathBuf,
        /// How long it waited, as people write it (`5s`).
        waited: String,
    },
    /// The gateway answered `error …` (`agora-web link`).
    #[error("the agora-web at {path} refused: {message}")]
    Refused {
        /// The socket's path.
        path: PathBuf,
        /// Its message.
        message: String,
    },
    /// Any other I/O failure on the socket or its directory.
    #[error("{path}: {cause}")]
    Io {
        /// The socket or its directory.
        path: PathBuf,
        /// The failure (said in the message, so not a `source`).
        cause: std::io::Error,
    },
}

impl LinkError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LinkError + '_ {
        move |cause| LinkError::Io {
            path: path.to_owned(),
            cause,
        }
    }
}

/// A bound link socket; its file is removed when it is dropped (if it is still the one it
/// bound).
#[derive(Debug)]
pub struct LinkSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    /// The socket file's inode, to remove only our own.
    inode: u64,
    /// Our user id: the socket file's owner.
    uid: u32,
}

impl LinkSocket {
    /// Binds the link socket at `path`, mode 0600. Its directory is made (0700) if missing;
    /// an existing one must not be open to others. A socket left by a gateway that is gone
    /// is replaced; one a live gateway answers at is not.
    ///
    /// # Errors
    /// [`LinkError::Busy`], [`LinkError::SharedDirectory`], [`LinkError::NotASocket`], or
    /// [`LinkError::Io`] (the directory cannot be made, the socket cannot be bound).
    pub fn bind(path: &Path) -> Result<LinkSocket, LinkError> {
        let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => d.to_owned(),
            None => PathBuf::from("."),
        };
        if dir.exists() {
            let mode = std::fs::metadata(&dir).map_err(LinkError::io(&dir))?.mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(LinkError::SharedDirectory { path: dir, mode });
            }
        } else {
            agora_common::fsmode::private_dir(&dir).map_err(LinkError::io(&dir))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(LinkError::NotASocket(path.to_owned()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(LinkError::Busy(path.to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a link socket nobody answers at");
                    std::fs::remove_file(path).map_err(LinkError::io(path))?;
                }
                Err(e) => return Err(LinkError::io(path)(e)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LinkError::io(path)(e)),
        }
        let listener = UnixListener::bind(path).map_err(LinkError::io(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(LinkError::io(path))?;
        let meta = std::fs::metadata(path).map_err(LinkError::io(path))?;
        listener
            .set_nonblocking(true)
            .map_err(LinkError::io(path))?;
        Ok(LinkSocket {
            listener: Some(listener),
            path: path.to_owned(),
            inode: meta.ino(),
            uid: meta.uid(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers link requests for ever (run it as a task, on a tokio runtime): each `link`
    /// gets `ok {base}{token}` with a token from `sessions`. A peer of another user is
    /// refused without an answer; each request line is awaited at most
    /// [`REQUEST_TIMEOUT`].
    ///
    /// # Errors
    /// The socket cannot be registered with the runtime.
    pub async fn serve(mut self, sessions: Arc<Sessions>, base: String) -> std::io::Result<()> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let base = Arc::new(base);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "link socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(peer) if peer.uid() == self.uid => {}
                Ok(peer) => {
                    tracing::warn!(uid = peer.uid(), "link socket: refused another user");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "link socket: no peer credentials");
                    continue;
                }
            }
            let (sessions, base) = (Arc::clone(&sessions), Arc::clone(&base));
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &sessions, &base).await {
                    tracing::info!(error = %e, "link socket: a request failed");
                }
            });
        }
    }
}

/// Reads one request line from `stream` and answers it.
async fn answer(
    stream: tokio::net::UnixStream,
    sessions: &Sessions,
    base: &str,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_LINE_BYTES as u64));
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(read) => {
            read?;
        }
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    }
    let reply = match line.trim_end_matches(['\r', '\n']) {
        "link" => match sessions.mint() {
            Some(token) => {
                tracing::info!("a new sign-in link was handed out on the link socket");
                format!("ok {base}{token}\n")
            }
            None => "error no link could be made (hosted mode, or no randomness)\n".to_owned(),
        },
        other => format!(
            "error unknown request {:?}: the only one is \"link\"\n",
            other.chars().take(64).collect::<String>()
        ),
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

impl Drop for LinkSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What `agora-web link` says when the gateway closes without an answer.
const NO_ANSWER: &str =
    "it closed the connection without an answer (a gateway answers only the user who started it)";

/// Asks the gateway at the link socket `path` for a new sign-in link, waiting at most
/// `timeout` for its answer; returns the link's URL.
///
/// # Errors
/// [`LinkError::NoGateway`] when nothing answers at `path`, [`LinkError::Timeout`],
/// [`LinkError::Refused`] when the gateway answers `error …`, [`LinkError::Io`].
pub fn request(path: &Path, timeout: Duration) -> Result<String, LinkError> {
    let mut stream = UnixStream::connect(path).map_err(|cause| match cause.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            LinkError::NoGateway {
                path: path.to_owned(),
                cause,
            }
        }
        _ => LinkError::io(path)(cause),
    })?;
    let timed_out = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => LinkError::Timeout {
            path: path.to_owned(),
            waited: humantime::format_duration(timeout).to_string(),
        },
        // It answers only its own user, by closing.
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
            LinkError::Refused {
                path: path.to_owned(),
                message: NO_ANSWER.to_owned(),
            }
        }
        _ => LinkError::io(path)(e),
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(LinkError::io(path))?;
    stream.write_all(b"link\n").map_err(timed_out)?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(&mut stream, MAX_LINE_BYTES as u64))
        .read_line(&mut line)
        .map_err(timed_out)?;
    let line = line.trim_end_matches(['\r', '\n']);
    match line.split_once(' ') {
        Some(("ok", url)) => Ok(url.to_owned()),
        Some(("error", message)) => Err(LinkError::Refused {
            path: path.to_owned(),
            message: message.to_owned(),
        }),
        _ if line.is_empty() => Err(LinkError::Refused {
            path: path.to_owned(),
            message: NO_ANSWER.to_owned(),
        }),
        _ => Err(LinkError::Refused {
            path: path.to_owned(),
            message: format!("an answer that is not one: {line:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Arc<Sessions> {
        let identity = crate::bridge::Identity {
            user: "alice".parse().expect("name"),
            keypair: agora_common::keys::Keypair::generate().expect("keys"),
        };
        Arc::new(Sessions::personal(identity, crate::auth::LINK_TTL))
    }

    #[test]
    fn a_link_is_minted_over_the_socket_and_the_socket_is_private_and_removed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("run/link.sock");
        let socket = LinkSocket::bind(&path).expect("bind");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("run")), 0o700);
        assert!(
            matches!(LinkSocket::bind(&path), Err(LinkError::Busy(_))),
            "a second gateway does not take it"
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let sessions = sessions();
        let served = Arc::clone(&sessions);
        let thread_path = path.clone();
        let (url, wrong) = runtime.block_on(async move {
            let task = tokio::spawn(socket.serve(served, "http://127.0.0.1:1/?token=".into()));
            let url = tokio::task::spawn_blocking(move || {
                let url = request(&thread_path, Duration::from_secs(5));
                let mut raw = UnixStream::connect(&thread_path).expect("connect");
                raw.write_all(b"links\n").expect("write");
                let mut wrong = String::new();
                BufReader::new(raw).read_line(&mut wrong).expect("read");
                (url, wrong)
            })
            .await
            .expect("client");
            task.abort();
            let _ = task.await;
            url
        });
        let url = url.expect("a link");
        let token = url
            .strip_prefix("http://127.0.0.1:1/?token=")
            .expect("the base");
        assert!(sessions.redeem(token).is_some(), "a working token");
        assert!(wrong.starts_with("error unknown request"), "{wrong}");
        drop(runtime);
        assert!(!path.exists(), "removed when the gateway stops");
        assert!(matches!(
            request(&path, Duration::from_secs(1)),
            Err(LinkError::NoGateway { .. })
        ));
    }

    #[test]
    fn a_socket_left_behind_is_replaced_and_a_shared_directory_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("run/link.sock");
        agora_common::fsmode::private_dir(&dir.path().join("run")).expect("private");
        // A gateway killed with SIGKILL leaves its socket file.
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let socket = LinkSocket::bind(&path).expect("the stale one is replaced");
        drop(socket);
        std::fs::write(&path, b"not a socket").expect("file");
        assert!(matches!(
            LinkSocket::bind(&path),
            Err(LinkError::NotASocket(_))
        ));
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).expect("dir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(matches!(
            LinkSocket::bind(&shared.join("link.sock")),
            Err(LinkError::SharedDirectory { mode: 0o755, .. })
        ));
    }
}
