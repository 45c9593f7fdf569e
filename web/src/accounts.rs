//! Hosted mode's accounts: a name, a password hash and a CURVE key pair the gateway keeps
//! for the person.
//!
//! # Layout under the data directory (mode 0700)
//! - `accounts/NAME`: the password's Argon2id hash as a PHC string (`$argon2id$v=19$…`,
//!   the `argon2` crate's defaults), mode 0600, created once (`O_EXCL`).
//! - `keys/NAME.key` and `keys/NAME.key_secret`: the account's CURVE certificate pair (ZPL,
//!   as user-cli writes them); the secret is mode 0600. `agora-web add-user` uses a pair an
//!   administrator placed there; the gateway never removes one it did not make.
//! - `keys/NAME.signup`: written by a sign-up just before it saves the pair it generated,
//!   removed once the account is complete. Only a pair with this mark is removed when the
//!   gateway finds the sign-up unfinished ([`Accounts::remove_unfinished`]).
//! - `spool/`: uploads on their way to a node (see [`crate::files`]).
//!
//! The directories are made 0700 and existing looser ones, and looser hash and secret
//! files, are tightened at start with a log line ([`agora_common::fsmode`]).
//!
//! # One path for every refusal
//! [`Accounts::verify`] refuses an over-long password before any other work, for every
//! name, and checks a missing account's password against a dummy hash with the same
//! Argon2 cost as a real one: how long a refusal takes tells no names apart.
//!
//! # Argon2's memory
//! Each hash or check works in 19 MiB (the crate's default cost). Allocated per call, those
//! blocks stay with the allocator's per-thread arenas (a hosted gateway grew by 190 MB over
//! its first ten sign-ins, then stayed there). So every hash runs on one of
//! [`HASH_THREADS`] threads of the accounts' own, each with its blocks allocated once at
//! start and reused: at most that many hashes at once, whatever the number of sign-ins in
//! flight, and `HASH_THREADS` × 19 MiB in all.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use agora_common::fsmode;
use agora_common::keys::{secret_path, Keypair};
use agora_proto::wire::UserName;
use argon2::password_hash::{
    rand_core::OsRng, Output, ParamsString, PasswordHash, Salt, SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};

use crate::bridge::Identity;

/// Shortest password accepted: 8 characters other than whitespace (8 spaces are no
/// password).
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted: 1,024 bytes (hashing is the cost a sign-in pays).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Threads that run Argon2: 2, so at most two hashes (2 × 19 MiB) at once.
pub const HASH_THREADS: usize = 2;
/// Hashes waiting for a thread; past them a sign-in or sign-up is [`AccountError::Busy`]
/// at once (each waiting one holds a blocking thread): 64.
pub const HASH_QUEUE: usize = 64;

/// Why an account could not be made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccountError {
    /// Wrong name or password (one error for both: no one learns which names exist).
    #[error("wrong name or password")]
    WrongPassword,
    /// The name is taken on this gateway.
    #[error("the account {0} exists")]
    Exists(UserName),
    /// The registry binds the name to another key: the account would act under a name that
    /// is someone else's on the federation.
    #[error("the registry binds the name {0} to another key")]
    Taken(UserName),
    /// The registry could not be asked (no answer, or a refusal other than `name_taken`);
    /// nothing was made.
    #[error("{0}")]
    Registry(String),
    /// The password has fewer than [`MIN_PASSWORD_CHARS`] characters other than whitespace,
    /// or more than [`MAX_PASSWORD_BYTES`] bytes.
    #[error(
        "a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_BYTES} bytes, at least \
        {MIN_PASSWORD_CHARS} of them other than whitespace"
    )]
    BadPassword,
    /// [`HASH_QUEUE`] hashes are waiting already: try again in a moment.
    #[error("{HASH_QUEUE} password checks are waiting already")]
    Busy,
    /// Reading or writing the data directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The stored hash or key is unreadable.
    #[error("{0}")]
    Corrupt(String),
}

/// The accounts under one data directory.
#[derive(Debug, Clone)]
pub struct Accounts {
    dir: PathBuf,
    /// The hash a missing account's password is checked against (a random password's, with
    /// the same parameters as real ones).
    dummy: String,
    hashers: Hashers,
}

/// Work for a hashing thread, given that thread's Argon2 blocks.
type Job = Box<dyn FnOnce(&mut [Block]) + Send>;

/// The threads Argon2 runs on ([`HASH_THREADS`]); they end when the last [`Accounts`] clone
/// is dropped.
#[derive(Debug, Clone)]
struct Hashers {
    jobs: SyncSender<Job>,
}

impl Hashers {
    fn start() -> std::io::Result<Hashers> {
        let (jobs, queue) = sync_channel::<Job>(HASH_QUEUE);
        let queue: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(queue));
        for i in 0..HASH_THREADS {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    let mut blocks = vec![Block::default(); Params::DEFAULT.block_count()];
                    loop {
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut blocks),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Hashers { jobs })
    }

    /// Runs `work` on a hashing thread and waits for it (blocking: call it off the async
    /// runtime).
    ///
    /// # Errors
    /// [`AccountError::Busy`] when [`HASH_QUEUE`] jobs are waiting; `Corrupt` if the threads
    /// are gone.
    fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut [Block]) -> T + Send + 'static,
    ) -> Result<T, AccountError> {
        let (done, result) = sync_channel(1);
        let gone = || AccountError::Corrupt("the hashing threads are gone".into());
        self.jobs
            .try_send(Box::new(move |blocks: &mut [Block]| {
                let _ = done.send(work(blocks));
            }))
            .map_err(|e| match e {
                TrySendError::Full(_) => AccountError::Busy,
                TrySendError::Disconnected(_) => gone(),
            })?;
        result.recv().map_err(|_| gone())
    }

    /// A new PHC string for `password`: Argon2id v19, the crate's default parameters, a
    /// random salt (what `Argon2::default().hash_password` makes).
    fn hash(&self, password: &str) -> Result<String, AccountError> {
        let password = password.to_owned();
        self.run(move |blocks| {
            let salt = SaltString::generate(&mut OsRng);
            let params = Params::DEFAULT;
            let output = argon2_output(
                blocks,
                password.as_bytes(),
                Algorithm::Argon2id,
                Version::V0x13,
                params.clone(),
                salt.as_salt(),
                Params::DEFAULT_OUTPUT_LEN,
            )?;
            let hash = PasswordHash {
                algorithm: Algorithm::Argon2id.ident(),
                version: Some(Version::V0x13.into()),
                params: ParamsString::try_from(&params)?,
                salt: Some(salt.as_salt()),
                hash: Some(output),
            };
            Ok::<_, argon2::password_hash::Error>(hash.to_string())
        })?
        .map_err(|e| AccountError::Corrupt(e.to_string()))
    }

    /// Whether `password` matches the PHC string `hash` (what `verify_password` of the
    /// `password-hash` crate does, in this thread's blocks; the outputs compare in constant
    /// time). A hash that does not parse, or asks for more memory than the default, matches
    /// nothing.
    fn check(&self, password: &str, hash: &str) -> Result<bool, AccountError> {
        #[cfg(test)]
        ARGON2_CHECKS.with(|n| n.set(n.get() + 1));
        let (password, hash) = (password.to_owned(), hash.to_owned());
        self.run(move |blocks| {
            let Ok(hash) = PasswordHash::new(&hash) else {
                return false;
            };
            let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
                return false;
            };
            let (Ok(algorithm), Ok(params)) =
                (Algorithm::try_from(hash.algorithm), Params::try_from(&hash))
            else {
                return false;
            };
            let version = match hash.version.map(Version::try_from).transpose() {
                Ok(v) => v.unwrap_or_default(),
                Err(_) => return false,
            };
            argon2_output(
                blocks,
                password.as_bytes(),
                algorithm,
                version,
                params,
                salt,
                expected.len(),
            )
            .is_ok_and(|computed| computed == expected)
        })
    }
}

/// Argon2 of `password` and `salt` (base64, as in a PHC string) into an output of `len`
/// bytes, working in `blocks` (as `Argon2::hash_password` does, in memory of ours).
///
/// # Errors
/// Parameters that need more than `blocks` (`MemoryTooLittle`), a bad salt or length.
fn argon2_output(
    blocks: &mut [Block],
    password: &[u8],
    algorithm: Algorithm,
    version: Version,
    params: Params,
    salt: Salt<'_>,
    len: usize,
) -> argon2::password_hash::Result<Output> {
    let mut salt_bytes = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_bytes)?;
    let argon2 = Argon2::new(algorithm, version, params);
    Output::init_with(len, |out| {
        Ok(argon2.hash_password_into_with_memory(password, salt, out, &mut *blocks)?)
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AccountError + '_ {
    move |source| AccountError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Whether `password` may be an account's: [`MIN_PASSWORD_CHARS`] characters other than
/// whitespace, at most [`MAX_PASSWORD_BYTES`] bytes.
///
/// # Errors
/// [`AccountError::BadPassword`].
pub fn check_password(password: &str) -> Result<(), AccountError> {
    let visible = password.chars().filter(|c| !c.is_whitespace()).count();
    if visible < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err(AccountError::BadPassword);
    }
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Password checks asked for from this thread (tests count them).
    static ARGON2_CHECKS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

impl Accounts {
    /// The accounts under `dir`: the directory and its `accounts/` and `keys/` made (mode
    /// 0700) if missing, tightened to 0700 if looser, and existing hash and secret key files
    /// tightened to 0600 (each change logged).
    ///
    /// # Errors
    /// [`AccountError::Io`]; [`AccountError::Corrupt`] when no dummy hash can be made.
    pub fn open(dir: &Path) -> Result<Accounts, AccountError> {
        fsmode::private_dir(dir).map_err(io(dir))?;
        for sub in ["accounts", "keys"] {
            let path = dir.join(sub);
            fsmode::private_dir(&path).map_err(io(&path))?;
            for entry in std::fs::read_dir(&path).map_err(io(&path))? {
                let file = entry.map_err(io(&path))?.path();
                let private =
                    sub == "accounts" || file.to_str().is_some_and(|f| f.ends_with("_secret"));
                if private && file.is_file() {
                    fsmode::tighten(&file, fsmode::FILE_MODE).map_err(io(&file))?;
                }
            }
        }
        // A random password's hash: a missing account costs what a real one does.
        let mut random = [0u8; 16];
        getrandom::getrandom(&mut random).map_err(|e| AccountError::Corrupt(e.to_string()))?;
        let hashers = Hashers::start().map_err(io(dir))?;
        Ok(Accounts {
            dir: dir.to_owned(),
            dummy: hashers.hash(&hex::encode(random))?,
            hashers,
        })
    }

    fn hash_path(&self, name: &UserName) -> PathBuf {
        self.dir.join("accounts").join(name.as_str())
    }

    fn key_path(&self, name: &UserName) -> PathBuf {
        self.dir.join("keys").join(format!("{name}.key"))
    }

    /// Creates `accounts/NAME` empty (mode 0600, `O_EXCL`): the name is held on this gateway
    /// and no password opens it yet ([`Accounts::verify`] takes an empty file for no
    /// account).
    fn reserve(&self, name: &UserName) -> Result<std::fs::File, AccountError> {
        let path = self.hash_path(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(fsmode::FILE_MODE)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => AccountError::Exists(name.clone()),
                _ => AccountError::Io {
                    path: path.clone(),
                    source: e,
                },
            })
    }

    /// The mark of a key pair a sign-up generated for `name`: `keys/NAME.signup` (no
    /// account's key file ends so).
    fn signup_mark(&self, name: &UserName) -> PathBuf {
        self.dir.join("keys").join(format!("{name}.signup"))
    }

    /// Removes `paths` (a missing one is fine; another failure is logged).
    fn remove_files(paths: &[PathBuf]) {
        for path in paths {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "could not roll back")
                }
            }
        }
    }

    /// Removes the key pair a sign-up generated for `name`, with its mark; nothing when there
    /// is no mark (the pair, if any, is someone else's).
    fn remove_signup_keys(&self, name: &UserName) {
        let mark = self.signup_mark(name);
        if mark.exists() {
            let key = self.key_path(name);
            Self::remove_files(&[secret_path(&key), key, mark]);
        }
    }

    /// Removes what a failed [`Accounts::sign_up`] wrote for `name`: the reservation, and
    /// the key pair if it generated one (marked).
    fn roll_back(&self, name: &UserName) {
        Self::remove_files(&[self.hash_path(name)]);
        self.remove_signup_keys(name);
    }

    /// Makes the account `name` with `password` and a new key pair, or with the key pair
    /// already at `keys/NAME.key` (`agora-web add-user`; nothing is registered). On failure
    /// nothing of it is left: the name is free again, and a key pair it generated is removed
    /// (one that was there already is kept).
    ///
    /// # Errors
    /// [`AccountError::Exists`], [`AccountError::BadPassword`], [`AccountError::Io`],
    /// [`AccountError::Corrupt`] (no key pair could be made or read).
    pub fn add(&self, name: &UserName, password: &str) -> Result<Identity, AccountError> {
        check_password(password)?;
        let hash = self.hashers.hash(password)?;
        let mut file = self.reserve(name)?;
        let key = self.key_path(name);
        let placed = secret_path(&key).exists();
        let made = (|| {
            let (keypair, _) = Keypair::load_or_generate(&key)
                .map_err(|e| AccountError::Corrupt(e.to_string()))?;
            let path = self.hash_path(name);
            file.write_all(hash.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io(&path))?;
            Ok(Identity {
                user: name.clone(),
                keypair,
            })
        })();
        if made.is_err() {
            let mut made_here = vec![self.hash_path(name)];
            if !placed {
                made_here.extend([secret_path(&key), key]);
            }
            Self::remove_files(&made_here);
        }
        made
    }

    /// Removes what sign-ups and add-users that never finished left (the gateway stopped
    /// while one waited for the registry, or add-user failed or was killed): empty
    /// `accounts/NAME` files, each with a warning, and the key pairs sign-ups generated for
    /// names that have no complete account (those marked `keys/NAME.signup`). A key pair
    /// without the mark is never removed: it may be one an administrator placed for
    /// add-user. A complete account's leftover mark is removed alone. For a server's start,
    /// before any sign-up can be in progress; returns the names whose reservation was
    /// removed.
    ///
    /// # Errors
    /// [`AccountError::Io`] when a directory cannot be read.
    pub fn remove_unfinished(&self) -> Result<Vec<UserName>, AccountError> {
        let dir = self.dir.join("accounts");
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<UserName>().ok());
            let empty = std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0);
            if let (Some(name), true) = (name, empty) {
                tracing::warn!(account = %name, "removed an unfinished sign-up");
                Self::remove_files(&[path]);
                removed.push(name);
            }
        }
        let keys = self.dir.join("keys");
        for entry in std::fs::read_dir(&keys).map_err(io(&keys))? {
            let path = entry.map_err(io(&keys))?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".signup"))
                .and_then(|n| n.parse::<UserName>().ok())
            else {
                continue;
            };
            let complete = std::fs::metadata(self.hash_path(&name)).is_ok_and(|m| m.len() > 0);
            if complete {
                Self::remove_files(&[path]);
            } else {
                tracing::warn!(account = %name, "removed an unfinished sign-up's key pair");
                self.remove_signup_keys(&name);
            }
        }
        Ok(removed)
    }

    /// Sign-up: makes the account `name` with `password` and a new key pair only once
    /// `register` (the registry binding the name to that key) succeeded. The name is held
    /// meanwhile by an empty hash file that no password opens; when `register` fails,
    /// nothing is left on disk, so no account ever acts under a name the registry gives to
    /// another key.
    ///
    /// # Errors
    /// [`AccountError::BadPassword`] and [`AccountError::Exists`] (an account, or a key pair
    /// placed for add-user, holds the name) before any work; what
    /// `register` returns ([`AccountError::Taken`], [`AccountError::Registry`]);
    /// [`AccountError::Io`], [`AccountError::Corrupt`] (then what was written is removed).
    pub fn sign_up(
        &self,
        name: &UserName,
        password: &str,
        register: impl FnOnce(&Identity) -> Result<(), AccountError>,
    ) -> Result<Identity, AccountError> {
        check_password(password)?;
        let mut file = self.reserve(name)?;
        if secret_path(&self.key_path(name)).exists() {
            // A key pair placed for add-user holds the name: never overwritten.
            Self::remove_files(&[self.hash_path(name)]);
            return Err(AccountError::Exists(name.clone()));
        }
        let made = (|| {
            let identity = Identity {
                user: name.clone(),
                keypair: Keypair::generate().map_err(|e| AccountError::Corrupt(e.to_string()))?,
            };
            let hash = self.hashers.hash(password)?;
            register(&identity)?;
            // Marked first: a start after a crash removes only a pair it finds marked.
            let mark = self.signup_mark(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(fsmode::FILE_MODE)
                .open(&mark)
                .and_then(|mut f| {
                    f.write_all(b"a sign-up in progress generated this name's key pair\n")?;
                    f.sync_all()
                })
                .map_err(io(&mark))?;
            identity
                .keypair
                .save(&self.key_path(name))
                .map_err(|e| AccountError::Corrupt(e.to_string()))?;
            let path = self.hash_path(name);
            file.write_all(hash.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io(&path))?;
            // The account is complete; a mark left behind is removed at the next start.
            Self::remove_files(&[mark]);
            Ok(identity)
        })();
        if made.is_err() {
            self.roll_back(name);
        }
        made
    }

    /// The account `name` if `password` is its password. Every refusal takes one of two
    /// paths whatever the name: an over-long password is refused before any work; any other
    /// costs one Argon2 check (against a dummy hash when there is no such account).
    ///
    /// # Errors
    /// [`AccountError::WrongPassword`] (no such account, or another password),
    /// [`AccountError::Io`], [`AccountError::Corrupt`].
    pub fn verify(&self, name: &UserName, password: &str) -> Result<Identity, AccountError> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AccountError::WrongPassword);
        }
        let path = self.hash_path(name);
        let stored = match std::fs::read_to_string(&path) {
            // An empty file is a name held by a sign-up in progress: no account yet.
            Ok(s) if s.trim().is_empty() => None,
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(AccountError::Io { path, source: e }),
        };
        let Some(stored) = stored else {
            // The same work as a real check, so timing tells no names apart.
            self.hashers.check(password, &self.dummy)?;
            return Err(AccountError::WrongPassword);
        };
        PasswordHash::new(stored.trim())
            .map_err(|e| AccountError::Corrupt(format!("{}: {e}", path.display())))?;
        if !self.hashers.check(password, stored.trim())? {
            return Err(AccountError::WrongPassword);
        }
        let keypair = Keypair::load(&self.key_path(name))
            .map_err(|e| AccountError::Corrupt(e.to_string()))?;
        Ok(Identity {
            user: name.clone(),
            keypair,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn an_account_signs_in_with_its_password_only_and_its_secrets_are_0600() {
        let dir = tempfile::tempdir().expect("dir");
        let accounts = Accounts::open(dir.path()).expect("open");
        let alice: UserName = "alice".parse().expect("name");
        for weak in [
            "short",
            "        ",
            " a b c d e f g ",
            &"x".repeat(MAX_PASSWORD_BYTES + 1),
        ] {
            assert!(
                matches!(accounts.add(&alice, weak), Err(AccountError::BadPassword)),
                "{weak:?}"
            );
        }
        let made = accounts.add(&alice, "correct horse").expect("add");
        assert!(matches!(
            accounts.add(&alice, "another password"),
            Err(AccountError::Exists(_))
        ));
        let signed_in = accounts.verify(&alice, "correct horse").expect("verify");
        assert_eq!(signed_in.keypair.public, made.keypair.public);
        assert!(matches!(
            accounts.verify(&alice, "wrong horse"),
            Err(AccountError::WrongPassword)
        ));
        assert!(matches!(
            accounts.verify(&"bob".parse().expect("name"), "correct horse"),
            Err(AccountError::WrongPassword)
        ));
        for file in ["accounts/alice", "keys/alice.key_secret"] {
            assert_eq!(mode(&dir.path().join(file)), 0o600, "{file}");
        }
        let stored = std::fs::read_to_string(dir.path().join("accounts/alice")).expect("hash");
        assert!(stored.starts_with("$argon2id$"), "{stored}");
    }

    #[test]
    fn a_refusal_costs_the_same_argon2_work_for_a_missing_account_as_for_an_existing_one() {
        let dir = tempfile::tempdir().expect("dir");
        let accounts = Accounts::open(dir.path()).expect("open");
        let alice: UserName = "alice".parse().expect("name");
        let nobody: UserName = "nobody".parse().expect("name");
        accounts.add(&alice, "correct horse").expect("add");
        let checks = |name: &UserName, password: &str| {
            let before = ARGON2_CHECKS.with(std::cell::Cell::get);
            assert!(matches!(
                accounts.verify(name, password),
                Err(AccountError::WrongPassword)
            ));
            ARGON2_CHECKS.with(std::cell::Cell::get) - before
        };
        assert_eq!(checks(&alice, "wrong horse"), 1);
        assert_eq!(
            checks(&nobody, "wrong horse"),
            1,
            "a dummy hash for a missing one"
        );
        let long = "x".repeat(MAX_PASSWORD_BYTES + 1);
        assert_eq!(checks(&alice, &long), 0, "refused before Argon2");
        assert_eq!(checks(&nobody, &long), 0, "refused before Argon2 alike");
        // The dummy hash has the real ones' parameters.
        let real = std::fs::read_to_string(dir.path().join("accounts/alice")).expect("hash");
        let params = |h: &str| h.split('$').take(4).collect::<Vec<_>>().join("$");
        assert_eq!(params(&accounts.dummy), params(real.trim()));
    }

    #[test]
    fn past_the_queue_a_password_check_is_refused_at_once_as_busy() {
        let dir = tempfile::tempdir().expect("dir");
        let accounts = Accounts::open(dir.path()).expect("open");
        let alice: UserName = "alice".parse().expect("name");
        // Jobs that hold their thread until `release` is dropped: both threads (each job
        // says when it runs), then the whole queue.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let (started, running) = std::sync::mpsc::channel::<()>();
        let job = |gate: &Arc<Mutex<std::sync::mpsc::Receiver<()>>>| -> Job {
            let (gate, started) = (Arc::clone(gate), started.clone());
            Box::new(move |_| {
                let _ = started.send(());
                let _ = gate.lock().map(|g| g.recv());
            })
        };
        for _ in 0..HASH_THREADS {
            accounts.hashers.jobs.try_send(job(&gate)).expect("queued");
        }
        for _ in 0..HASH_THREADS {
            running
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("a hashing thread took a job");
        }
        let mut queued = 0;
        while accounts.hashers.jobs.try_send(job(&gate)).is_ok() {
            queued += 1;
        }
        assert_eq!(queued, HASH_QUEUE);
        assert!(matches!(
            accounts.verify(&alice, "wrong horse"),
            Err(AccountError::Busy)
        ));
        drop(release);
        let waited = std::time::Instant::now();
        while matches!(
            accounts.verify(&alice, "wrong horse"),
            Err(AccountError::Busy)
        ) {
            assert!(waited.elapsed() < std::time::Duration::from_secs(10));
        }
    }

    #[test]
    fn hashes_are_the_crates_own_both_ways() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let dir = tempfile::tempdir().expect("dir");
        let accounts = Accounts::open(dir.path()).expect("open");
        let ours = accounts.hashers.hash("correct horse").expect("hash");
        let parsed = PasswordHash::new(&ours).expect("a PHC string");
        Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .expect("the crate verifies ours");
        let salt = SaltString::generate(&mut OsRng);
        let theirs = Argon2::default()
            .hash_password(b"correct horse", &salt)
            .expect("hash")
            .to_string();
        assert!(accounts
            .hashers
            .check("correct horse", &theirs)
            .expect("check"));
        assert!(!accounts
            .hashers
            .check("wrong horse", &theirs)
            .expect("check"));
        assert!(!accounts
            .hashers
            .check("correct horse", "garbage")
            .expect("check"));
        // More memory than the threads hold: refused, not allocated.
        let big = theirs.replace("m=19456", "m=65536");
        assert!(!accounts
            .hashers
            .check("correct horse", &big)
            .expect("check"));
    }

    #[test]
    fn a_sign_up_the_registry_refuses_leaves_nothing_and_one_it_takes_signs_in() {
        let dir = tempfile::tempdir().expect("dir");
        let accounts = Accounts::open(dir.path()).expect("open");
        let mallory: UserName = "mallory".parse().expect("name");
        let refused = accounts.sign_up(&mallory, "mallory's password", |identity| {
            // Meanwhile the name is held, and no password opens it.
            assert!(matches!(
                accounts.verify(&identity.user, "mallory's password"),
                Err(AccountError::WrongPassword)
            ));
            assert!(matches!(
                accounts.sign_up(&identity.user, "another password", |_| Ok(())),
                Err(AccountError::Exists(_))
            ));
            Err(AccountError::Taken(identity.user.clone()))
        });
        assert!(
            matches!(refused, Err(AccountError::Taken(_))),
            "{refused:?}"
        );
        for file in [
            "accounts/mallory",
            "keys/mallory.key",
            "keys/mallory.key_secret",
        ] {
            assert!(!dir.path().join(file).exists(), "{file} was left");
        }
        assert!(matches!(
            accounts.verify(&mallory, "mallory's password"),
            Err(AccountError::WrongPassword)
        ));
        let mut registered = None;
        let made = accounts
            .sign_up(&mallory, "mallory's password", |identity| {
                registered = Some(identity.keypair.public);
                Ok(())
            })
            .expect("sign-up");
        assert_eq!(Some(made.keypair.public), registered);
        let signed_in = accounts.verify(&mallory, "mallory's password").expect("in");
        assert_eq!(signed_in.keypair.public, made.keypair.public);
        assert!(matches!(
            accounts.sign_up(&mallory, "mallory's password", |_| Ok(())),
            Err(AccountError::Exists(_))
        ));
        assert!(
            !dir.path().join("keys/mallory.signup").exists(),
            "a complete sign-up leaves no mark"
        );
        // One the gateway stopped in the middle of (its key pair saved and marked, the hash
        // not yet written) is removed at the next start, key pair and all.
        std::fs::write(dir.path().join("accounts/eve"), b"").expect("held");
        for file in ["keys/eve.key", "keys/eve.key_secret", "keys/eve.signup"] {
            std::fs::write(dir.path().join(file), b"").expect("key");
        }
        let removed = accounts.remove_unfinished().expect("removed");
        assert_eq!(removed, vec!["eve".parse::<UserName>().expect("name")]);
        for file in [
            "accounts/eve",
            "keys/eve.key",
            "keys/eve.key_secret",
            "keys/eve.signup",
        ] {
            assert!(!dir.path().join(file).exists(), "{file} was left");
        }
        assert!(dir.path().join("accounts/mallory").exists());
    }

    /// Places a key pair for `name` as an administrator does before `add-user`.
    fn place_keys(dir: &Path, name: &str) -> Keypair {
        let pair = Keypair::generate().expect("keys");
        pair.save(&dir.join(format!("keys/{name}.key")))
            .expect("save");
        pair
    }

    #[test]
    fn a_failed_add_user_frees_the_name_and_keeps_a_key_pair_it_did_not_make() {
        let dir = tempfile::tempdir().expect("dir");
        let accounts = Accounts::open(dir.path()).expect("open");
        let alice: UserName = "alice".parse().expect("name");
        let placed = place_keys(dir.path(), "alice");
        // A secret others can read: Keypair::load refuses it, after the name is reserved.
        let secret = dir.path().join("keys/alice.key_secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            accounts.add(&alice, "correct horse"),
            Err(AccountError::Corrupt(_))
        ));
        assert!(
            !dir.path().join("accounts/alice").exists(),
            "the reservation is rolled back"
        );
        assert!(secret.exists(), "the placed key pair is kept");
        assert!(dir.path().join("keys/alice.key").exists());
        // Fixed, the same add-user goes through with the placed pair.
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let made = accounts.add(&alice, "correct horse").expect("add");
        assert_eq!(made.keypair.public, placed.public);
    }

    #[test]
    fn an_unfinished_account_at_start_loses_only_the_key_pairs_a_sign_up_generated() {
        let dir = tempfile::tempdir().expect("dir");
        let accounts = Accounts::open(dir.path()).expect("open");
        // add-user killed between its reservation and its hash, with a placed pair.
        let placed = place_keys(dir.path(), "admin-made");
        std::fs::write(dir.path().join("accounts/admin-made"), b"").expect("held");
        // A complete sign-up whose mark was left behind.
        let bob: UserName = "bob".parse().expect("name");
        let made = accounts
            .sign_up(&bob, "bob's password", |_| Ok(()))
            .expect("sign-up");
        std::fs::write(dir.path().join("keys/bob.signup"), b"").expect("mark");
        let removed = accounts.remove_unfinished().expect("removed");
        assert_eq!(
            removed,
            vec!["admin-made".parse::<UserName>().expect("name")]
        );
        assert!(!dir.path().join("accounts/admin-made").exists());
        for file in ["keys/admin-made.key", "keys/admin-made.key_secret"] {
            assert!(dir.path().join(file).exists(), "{file} was removed");
        }
        assert!(!dir.path().join("keys/bob.signup").exists());
        let signed_in = accounts.verify(&bob, "bob's password").expect("bob");
        assert_eq!(signed_in.keypair.public, made.keypair.public);
        // The name is free for add-user again, with the placed pair; a sign-up may not
        // take a name whose pair was placed.
        let carol: UserName = "carol".parse().expect("name");
        place_keys(dir.path(), "carol");
        assert!(matches!(
            accounts.sign_up(&carol, "carol's password", |_| Ok(())),
            Err(AccountError::Exists(_))
        ));
        assert!(!dir.path().join("accounts/carol").exists());
        assert!(dir.path().join("keys/carol.key_secret").exists());
        let admin_made: UserName = "admin-made".parse().expect("name");
        let added = accounts
            .add(&admin_made, "correct horse")
            .expect("add-user");
        assert_eq!(added.keypair.public, placed.public);
    }

    #[test]
    fn an_existing_looser_data_directory_is_tightened() {
        let root = tempfile::tempdir().expect("dir");
        let dir = root.path().join("web");
        Accounts::open(&dir)
            .expect("open")
            .add(&"alice".parse().expect("name"), "correct horse")
            .expect("add");
        for (path, loose) in [
            ("", 0o755),
            ("accounts", 0o755),
            ("keys", 0o777),
            ("accounts/alice", 0o644),
            ("keys/alice.key_secret", 0o644),
        ] {
            std::fs::set_permissions(dir.join(path), std::fs::Permissions::from_mode(loose))
                .expect("chmod");
        }
        Accounts::open(&dir).expect("open again");
        for (path, tight) in [
            ("", 0o700),
            ("accounts", 0o700),
            ("keys", 0o700),
            ("accounts/alice", 0o600),
            ("keys/alice.key_secret", 0o600),
        ] {
            assert_eq!(mode(&dir.join(path)), tight, "{path}");
        }
    }
}
