//! TLS to PostgreSQL, for the stores of the group node and the registry (feature
//! `postgres`): rustls through `tokio-postgres-rustls`, so no OpenSSL.
//!
//! # When a connection is encrypted
//! - With a CA file (`--store-ca FILE`, PEM certificates): always. The server's certificate
//!   must chain to one of them and name the URL's host (`verify-full` in libpq's terms), and
//!   the URL's `sslmode` is raised to `require`.
//! - With a client certificate (`--store-cert FILE --store-key FILE`) or `sslmode=require`
//!   in the URL, and no CA file: the same checks against the system's trust store
//!   (`/etc/ssl/certs` through `rustls-native-certs`).
//! - Otherwise the connection is plain TCP (or a Unix socket), as before;
//!   [`PgConnector::warn_if_plain`] logs a warning when its host is not a Unix socket or the
//!   loopback.
//!
//! There is no mode that encrypts without checking the server (libpq's `require` without a
//! root certificate): it would protect against nobody who can intercept the connection.
//!
//! # Client certificates
//! With [`PgTlsFiles::cert`] and [`PgTlsFiles::key`] (libpq's `sslcert` and `sslkey`) the
//! client presents that certificate chain in the handshake, for servers that authenticate
//! by it (`cert` in `pg_hba.conf`, where the certificate's CN names the role). As libpq
//! does, a key file that its owner's group or others can read is refused: mode 0600 or
//! less, or 0640 or less when root owns it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres::config::{Host, SslMode};
use postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why a TLS setup for PostgreSQL could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    /// The CA file could not be read or holds no PEM certificate.
    #[error("--store-ca {path}: {reason}")]
    Ca {
        /// The file given.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The client certificate file could not be read or holds no PEM certificate.
    #[error("--store-cert {path}: {reason}")]
    Cert {
        /// The file given.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The client key file could not be read, holds no PEM private key (PKCS #8, PKCS #1 or
    /// SEC1), or others can read it (the module docs).
    #[error("--store-key {path}: {reason}")]
    Key {
        /// The file given.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// rustls refused the setup (such as no usable certificate in the trust store, or a key
    /// that does not match the certificate).
    #[error("TLS for PostgreSQL: {0}")]
    Rustls(String),
}

/// The files TLS to PostgreSQL is set up from (module docs); all `None` by default, for
/// TLS only when the URL says `sslmode=require`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgTlsFiles {
    /// PEM file of the CA certificates the server's certificate must chain to (libpq's
    /// `sslrootcert`, `--store-ca`).
    pub ca: Option<PathBuf>,
    /// PEM file of the client's certificate chain, leaf first (libpq's `sslcert`,
    /// `--store-cert`); only together with [`PgTlsFiles::key`].
    pub cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key (libpq's `sslkey`, `--store-key`).
    pub key: Option<PathBuf>,
}

/// How to reach one PostgreSQL server: its parsed URL, with TLS or without (module docs).
#[derive(Clone)]
pub struct PgConnector {
    config: Config,
    tls: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnector")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl PgConnector {
    /// Sets up connections for `config` (a parsed `postgres://` URL, with any timeouts
    /// already set), with TLS as the module docs say: verified against the PEM certificates
    /// in `files.ca` if given, presenting `files.cert` if given. The server's NOTICEs are logged at
    /// DEBUG (target `agora::postgres`).
    ///
    /// # Errors
    /// [`PgTlsError::Ca`], [`PgTlsError::Cert`], [`PgTlsError::Key`] for an unreadable file,
    /// one without what it should hold, or a key others can read; [`PgTlsError::Rustls`]
    /// when rustls cannot be set up (a key that does not match the certificate).
    pub fn new(mut config: Config, files: &PgTlsFiles) -> Result<PgConnector, PgTlsError> {
        let client_auth = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some((chain_from(cert)?, key_from(key)?)),
            (None, None) => None,
            _ => {
                return Err(PgTlsError::Rustls(
                    "a client certificate needs both --store-cert and --store-key".into(),
                ))
            }
        };
        let roots = match &files.ca {
            Some(path) => Some(roots_from(path)?),
            None if client_auth.is_some() || config.get_ssl_mode() == SslMode::Require => {
                Some(native_roots()?)
            }
            None => None,
        };
        let tls = match roots {
            Some(roots) => {
                config.ssl_mode(SslMode::Require);
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let builder = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| PgTlsError::Rustls(e.to_string()))?
                    .with_root_certificates(roots);
                let client = match client_auth {
                    Some((chain, key)) => builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| PgTlsError::Rustls(format!("the client certificate: {e}")))?,
                    None => builder.with_no_client_auth(),
                };
                Some(MakeRustlsConnect::new(client))
            }
            None => None,
        };
        // NOTICEs (`schema … already exists, skipping` at every start) are the server
        // talking to itself: DEBUG, not the INFO that tokio-postgres logs them at.
        config.notice_callback(|notice| {
            tracing::debug!(target: "agora::postgres", severity = notice.severity(),
                code = notice.code().code(), "{}", notice.message());
        });
        Ok(PgConnector { config, tls })
    }

    /// Whether connections are made over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Logs a warning when connections are plain and go to a host other than this machine
    /// (a Unix socket or the loopback): messages and keys would cross the network in the
    /// clear. For a binary to call once at start.
    pub fn warn_if_plain(&self) {
        if self.tls.is_some() {
            return;
        }
        if let Some(host) = self.config.get_hosts().iter().find(|h| !is_local(h)) {
            tracing::warn!(
                host = ?host,
                "the PostgreSQL connection is not encrypted: give --store-ca (or \
                 sslmode=require) to use TLS across machines"
            );
        }
    }

    /// The parsed URL, to change settings (such as `application_name`) per connection.
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// Opens a connection.
    ///
    /// # Errors
    /// The `postgres` client's: an unreachable or refusing server, a failed TLS handshake
    /// (a certificate not trusted, or not for the URL's host).
    pub fn connect(&self) -> Result<Client, postgres::Error> {
        match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(postgres::NoTls),
        }
    }
}

/// The text of a `postgres` client error with its causes (`postgres::Error`'s own text
/// leaves them out: "error performing TLS handshake", without which certificate check
/// failed), joined by ": ".
pub fn describe(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Where a PostgreSQL URL (or libpq key=value string) points, for messages: its
/// `HOST:PORT` list and database, never its password (`127.0.0.1:5432, database agora`).
/// A string that does not parse is described as `the --store database`.
pub fn target(url: &str) -> String {
    use std::str::FromStr;
    let Ok(config) = Config::from_str(url) else {
        return "the --store database".into();
    };
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "the default host".to_owned()
    } else {
        hosts.join(",")
    };
    match config.get_dbname() {
        Some(db) => format!("{hosts}, database {db}"),
        None => hosts,
    }
}

/// Whether a PostgreSQL error means the database refuses this client for good, so that
/// retrying cannot help: authentication failed (SQLSTATE class 28) or the database does
/// not exist (3D000).
pub fn is_refusal(e: &postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("28") || code == "3D000"
    })
}

/// Whether a PostgreSQL error at start means the database cannot be used: no connection
/// (refused, timed out, a failed TLS handshake), a refusal ([`is_refusal`]), or a server
/// that takes no connections now (53300 too many connections, 57P03 starting up or
/// shutting down). A server error to a query is not one of them.
pub fn is_unreachable(e: &postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => is_refusal(e) || matches!(db.code().code(), "53300" | "57P03"),
    }
}

/// A PostgreSQL failure for a message, said once, naming `--store` and where it points
/// ([`target`], never the password): `--store 127.0.0.1:5432, database agora: error
/// connecting to server: Connection refused (os error 111)`, `--store 127.0.0.1:5432,
/// database nodb: database "nodb" does not exist`.
pub fn explain(url: &str, e: &postgres::Error) -> String {
    let cause = match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => describe(e),
    };
    format!("--store {}: {cause}", target(url))
}

/// Whether a host is this machine: a Unix socket directory, `localhost` or a loopback
/// address.
fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

fn roots_from(path: &Path) -> Result<rustls::RootCertStore, PgTlsError> {
    let fail = |reason: String| PgTlsError::Ca {
        path: path.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path, fail)? {
        roots
            .add(cert)
            .map_err(|e| fail(format!("a certificate rustls refuses: {e}")))?;
    }
    Ok(roots)
}

fn chain_from(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, PgTlsError> {
    certificates(path, |reason| PgTlsError::Cert {
        path: path.to_owned(),
        reason,
    })
}

/// The PEM certificates in the file at `path`, at least one; `fail` makes the error.
fn certificates(
    path: &Path,
    fail: impl Fn(String) -> PgTlsError,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, PgTlsError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(fail("no CERTIFICATE in it".into()));
    }
    Ok(certs)
}

fn key_from(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, PgTlsError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::PrivateKeyDer;
    use std::os::unix::fs::MetadataExt as _;
    let fail = |reason: String| PgTlsError::Key {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(fail(format!(
            "others can read it (mode {mode:o}); allow {allowed:o} or less"
        )));
    }
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| fail(format!("no private key: {e}")))
}

fn native_roots() -> Result<rustls::RootCertStore, PgTlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(PgTlsError::Rustls(format!(
            "sslmode=require, no --store-ca, and no certificate in the system's trust store ({} errors)",
            found.errors.len()
        )));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    /// Review of issue 23: a store error names where it points, never the password.
    #[test]
    fn a_target_names_host_port_and_database_never_the_password() {
        assert_eq!(
            super::target("postgres://agora:s3cret@127.0.0.1:25999/agora"),
            "127.0.0.1:25999, database agora"
        );
        assert_eq!(
            super::target("host=db1 port=6000 dbname=nodb password=s3cret"),
            "db1:6000, database nodb"
        );
        assert!(!super::target("postgres://u:s3cret@h/d").contains("s3cret"));
    }

    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let config: Config = "postgresql://a@db.example/x".parse().expect("url");
        let files = |ca: PathBuf| PgTlsFiles {
            ca: Some(ca),
            ..PgTlsFiles::default()
        };
        let err = PgConnector::new(config, &files(path)).expect_err("refused");
        assert!(
            err.to_string().contains("ca.pem") && err.to_string().contains("no CERTIFICATE"),
            "{err}"
        );
        let missing = PgConnector::new(
            "postgresql://a@db.example/x".parse().expect("url"),
            &files(dir.path().join("absent.pem")),
        )
        .expect_err("refused");
        assert!(matches!(missing, PgTlsError::Ca { .. }), "{missing}");
    }

    #[test]
    fn a_client_key_others_can_read_or_a_certificate_without_key_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let key = dir.path().join("client.key");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").expect("write");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        let cert = dir.path().join("client.crt");
        let url = || "postgresql://a@db.example/x".parse().expect("url");
        let readable = PgConnector::new(
            url(),
            &PgTlsFiles {
                cert: Some(cert.clone()),
                key: Some(key.clone()),
                ..PgTlsFiles::default()
            },
        );
        // The certificate is read first; it is missing here.
        assert!(
            matches!(readable, Err(PgTlsError::Cert { .. })),
            "{readable:?}"
        );
        assert!(
            matches!(key_from(&key), Err(PgTlsError::Key { ref reason, .. }) if reason.contains("others can read")),
            "{:?}",
            key_from(&key)
        );
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        assert!(
            matches!(key_from(&key), Err(PgTlsError::Key { ref reason, .. }) if reason.contains("no private key")),
            "{:?}",
            key_from(&key)
        );
        let half = PgConnector::new(
            url(),
            &PgTlsFiles {
                cert: Some(cert),
                ..PgTlsFiles::default()
            },
        );
        assert!(
            matches!(half, Err(PgTlsError::Rustls(ref e)) if e.contains("both")),
            "{half:?}"
        );
    }

    #[test]
    fn plain_unless_a_ca_or_sslmode_require() {
        let none = PgTlsFiles::default();
        let plain = PgConnector::new("postgresql://a@127.0.0.1/x".parse().expect("url"), &none)
            .expect("plain");
        assert!(!plain.is_tls());
        let socket =
            PgConnector::new("postgresql:///x?host=/tmp".parse().expect("url"), &none).expect("ok");
        assert!(!socket.is_tls());
    }

    #[test]
    fn local_hosts_are_sockets_localhost_and_loopback() {
        assert!(is_local(&Host::Unix("/run/postgresql".into())));
        assert!(is_local(&Host::Tcp("localhost".into())));
        assert!(is_local(&Host::Tcp("127.0.0.1".into())));
        assert!(is_local(&Host::Tcp("::1".into())));
        assert!(!is_local(&Host::Tcp("10.77.0.2".into())));
        assert!(!is_local(&Host::Tcp("db.example".into())));
    }
}
