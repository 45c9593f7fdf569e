//! Hosted mode's accounts: a name, a password hash and a CURVE key pair the gateway keeps
//! for the person.
//!
//! # Layout under the data directory (mode 0700)
//! - `accounts/NAME`: the password's Argon2id hash as a PHC string (`$argon2id$v=19$…`,
//!   the `argon2` crate's defaults), mode 0600, created once (`O_EXCL`).
//! - `keys/NAME.key` and `keys/NAME.key_secret`: the account's CURVE certificate pair (ZPL,
//!   as user-cli writes them); the secret is mode 0600.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use agora_common::keys::Keypair;
use agora_proto::wire::UserName;
use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};

use crate::bridge::Identity;

/// Shortest password accepted: 8 characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted: 1,024 bytes (hashing is the cost a sign-in pays).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Why an account could not be made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccountError {
    /// Wrong name or password (one error for both: no one learns which names exist).
    #[error("wrong name or password")]
    WrongPassword,
    /// The name is taken.
    #[error("the account {0} exists")]
    Exists(UserName),
    /// The password is shorter than [`MIN_PASSWORD_CHARS`] or longer than
    /// [`MAX_PASSWORD_BYTES`].
    #[error("a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_BYTES} bytes")]
    BadPassword,
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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AccountError + '_ {
    move |source| AccountError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Accounts {
    /// The accounts under `dir`, made (mode 0700) if missing.
    ///
    /// # Errors
    /// [`AccountError::Io`].
    pub fn open(dir: &Path) -> Result<Accounts, AccountError> {
        for sub in ["accounts", "keys"] {
            let path = dir.join(sub);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(io(&path))?;
        }
        Ok(Accounts {
            dir: dir.to_owned(),
        })
    }

    fn hash_path(&self, name: &UserName) -> PathBuf {
        self.dir.join("accounts").join(name.as_str())
    }

    fn key_path(&self, name: &UserName) -> PathBuf {
        self.dir.join("keys").join(format!("{name}.key"))
    }

    /// Makes the account `name` with `password` and a new key pair.
    ///
    /// # Errors
    /// [`AccountError::Exists`], [`AccountError::BadPassword`], [`AccountError::Io`],
    /// [`AccountError::Corrupt`] (no key pair could be made).
    pub fn add(&self, name: &UserName, password: &str) -> Result<Identity, AccountError> {
        if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
            return Err(AccountError::BadPassword);
        }
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| AccountError::Corrupt(e.to_string()))?
            .to_string();
        let path = self.hash_path(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => AccountError::Exists(name.clone()),
                _ => AccountError::Io {
                    path: path.clone(),
                    source: e,
                },
            })?;
        let (keypair, _) = Keypair::load_or_generate(&self.key_path(name))
            .map_err(|e| AccountError::Corrupt(e.to_string()))?;
        file.write_all(hash.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io(&path))?;
        Ok(Identity {
            user: name.clone(),
            keypair,
        })
    }

    /// The account `name` if `password` is its password.
    ///
    /// # Errors
    /// [`AccountError::WrongPassword`] (no such account, or another password),
    /// [`AccountError::Io`], [`AccountError::Corrupt`].
    pub fn verify(&self, name: &UserName, password: &str) -> Result<Identity, AccountError> {
        let path = self.hash_path(name);
        let stored = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The same work as a real check, so timing tells no names apart.
                let _ = Argon2::default()
                    .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng));
                return Err(AccountError::WrongPassword);
            }
            Err(e) => return Err(AccountError::Io { path, source: e }),
        };
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AccountError::WrongPassword);
        }
        let hash = PasswordHash::new(stored.trim())
            .map_err(|e| AccountError::Corrupt(format!("{}: {e}", path.display())))?;
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .map_err(|_| AccountError::WrongPassword)?;
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

    #[test]
    fn an_account_signs_in_with_its_password_only_and_its_secrets_are_0600() {
        let dir = tempfile::tempdir().expect("dir");
        let accounts = Accounts::open(dir.path()).expect("open");
        let alice: UserName = "alice".parse().expect("name");
        assert!(matches!(
            accounts.add(&alice, "short"),
            Err(AccountError::BadPassword)
        ));
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
            let mode = std::fs::metadata(dir.path().join(file))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let stored = std::fs::read_to_string(dir.path().join("accounts/alice")).expect("hash");
        assert!(stored.starts_with("$argon2id$"), "{stored}");
    }
}
