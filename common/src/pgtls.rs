//! TLS to PostgreSQL, for the stores of the group node and the registry (feature
//! `postgres`): rustls through `tokio-postgres-rustls`, so no OpenSSL.
//!
//! # When a connection is encrypted
//! - With a CA file (`--store-ca FILE`, PEM certificates): always. The server's certificate
//!   must chain to one of them and name the URL's host (`verify-full` in libpq's terms), and
//!   the URL's `sslmode` is raised to `require`.
//! - With `sslmode=require` in the URL and no CA file: the same checks against the system's
//!   trust store (`/etc/ssl/certs` through `rustls-native-certs`).
//! - Otherwise the connection is plain TCP (or a Unix socket), as before;
//!   [`PgConnector::warn_if_plain`] logs a warning when its host is not a Unix socket or the
//!   loopback.
//!
//! There is no mode that encrypts without checking the server (libpq's `require` without a
//! root certificate): it would protect against nobody who can intercept the connection.

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
    /// rustls refused the setup (such as no usable certificate in the trust store).
    #[error("TLS for PostgreSQL: {0}")]
    Rustls(String),
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
    /// already set), with TLS as the module docs say, verified against the PEM certificates
    /// in `ca` if given.
    ///
    /// # Errors
    /// [`PgTlsError::Ca`] for an unreadable CA file or one without certificates;
    /// [`PgTlsError::Rustls`] when rustls cannot be set up.
    pub fn new(mut config: Config, ca: Option<&Path>) -> Result<PgConnector, PgTlsError> {
        let roots = match ca {
            Some(path) => Some(roots_from(path)?),
            None if config.get_ssl_mode() == SslMode::Require => Some(native_roots()?),
            None => None,
        };
        let tls = match roots {
            Some(roots) => {
                config.ssl_mode(SslMode::Require);
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let client = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| PgTlsError::Rustls(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(MakeRustlsConnect::new(client))
            }
            None => None,
        };
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
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let fail = |reason: String| PgTlsError::Ca {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| fail(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("a certificate rustls refuses: {e}")))?;
    }
    if roots.is_empty() {
        return Err(fail("no CERTIFICATE in it".into()));
    }
    Ok(roots)
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
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let config: Config = "postgresql://a@db.example/x".parse().expect("url");
        let err = PgConnector::new(config, Some(&path)).expect_err("refused");
        assert!(
            err.to_string().contains("ca.pem") && err.to_string().contains("no CERTIFICATE"),
            "{err}"
        );
        let missing = PgConnector::new(
            "postgresql://a@db.example/x".parse().expect("url"),
            Some(&dir.path().join("absent.pem")),
        )
        .expect_err("refused");
        assert!(matches!(missing, PgTlsError::Ca { .. }), "{missing}");
    }

    #[test]
    fn plain_unless_a_ca_or_sslmode_require() {
        let plain = PgConnector::new("postgresql://a@127.0.0.1/x".parse().expect("url"), None)
            .expect("plain");
        assert!(!plain.is_tls());
        let socket =
            PgConnector::new("postgresql:///x?host=/tmp".parse().expect("url"), None).expect("ok");
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
