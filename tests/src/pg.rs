//! A throwaway PostgreSQL cluster for a test: `initdb` in a temporary directory, one
//! `postgres` server listening on a Unix socket in that directory only (no TCP port, so no
//! port to collide on), stopped and removed on drop. [`PgCluster::start_tls`] also listens
//! on the loopback, TLS only, at a port the system picked free.
//!
//! Debian's `postgresql` package provides the programs (`/usr/lib/postgresql/N/bin`;
//! `scripts/deps.sh --postgres` installs it). PostgreSQL refuses to run as root, so as root
//! the cluster belongs to the `postgres` user that the package creates: the directory is
//! handed to it and the programs run with its uid and gid.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_for;

/// The role the tests connect as (a superuser, `initdb -U`).
pub const ROLE: &str = "agora";

/// The role that a cluster of [`PgCluster::start_tls`] lets in over TCP only with a client
/// certificate that its client CA signed and whose CN is this name (`cert` in
/// `pg_hba.conf`); a superuser.
pub const CERT_ROLE: &str = "agora_cert";

/// A running throwaway cluster; stopped (fast shutdown, then SIGKILL) and removed on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    server: Option<Child>,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    host: Option<crate::netns::Host>,
    port: u16,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// The directory of the newest installed PostgreSQL's server programs.
///
/// # Panics
/// If PostgreSQL is not installed: the tests that need it fail, they never skip.
pub fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/N/bin/initdb): \
             apt-get install postgresql (scripts/deps.sh --postgres does)"
        )
    })
}

/// The uid and gid of `user`, through `id`.
fn ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

impl PgCluster {
    /// Makes and starts a cluster with a superuser [`ROLE`] and trust authentication, and
    /// waits until it accepts connections.
    ///
    /// # Panics
    /// If PostgreSQL is not installed, `initdb` fails, or the server is not ready in 30 s.
    pub fn start() -> PgCluster {
        PgCluster::start_on(None)
    }

    /// As [`PgCluster::start`], with the server on `host` (a network namespace of the
    /// test's), listening on its address, port 5432, too, with trust authentication from
    /// anywhere (the namespace's LAN is the test's own): [`PgCluster::tcp_url`].
    ///
    /// # Panics
    /// As [`PgCluster::start`].
    pub fn start_on(host: Option<&crate::netns::Host>) -> PgCluster {
        PgCluster::start_with(host, false)
    }

    /// As [`PgCluster::start`], and listening on 127.0.0.1 at a port the system picked free
    /// too, where only TLS connections are accepted (`hostssl`; plain TCP is refused), with
    /// a self-signed certificate for `localhost`: [`PgCluster::tls_url`],
    /// [`PgCluster::tls_ca`]. [`CERT_ROLE`] is let in there only with the client
    /// certificate of [`PgCluster::tls_client_cert`] ([`PgCluster::tls_cert_url`]).
    ///
    /// # Panics
    /// As [`PgCluster::start`].
    pub fn start_tls() -> PgCluster {
        PgCluster::start_with(None, true)
    }

    fn start_with(host: Option<&crate::netns::Host>, tls: bool) -> PgCluster {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("agora-pg")
            .tempdir()
            .expect("tempdir");
        let owner = if is_root() {
            let owner = ids("postgres").expect(
                "running as root, the cluster needs the `postgres` user (Debian's postgresql package makes it)",
            );
            chown(dir.path(), owner);
            Some(owner)
        } else {
            None
        };
        let mut cluster = PgCluster {
            dir,
            server: None,
            bin,
            owner,
            host: None,
            port: 5432,
        };
        let data = cluster.data_dir();
        let out = cluster
            .command("initdb")
            .args(["-D", path_str(&data), "-U", ROLE, "-A", "trust"])
            .args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listen = match host {
            None if tls => {
                cluster.port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                cluster.make_certificate();
                // Only the socket (trust) and TLS on the loopback: plain TCP is refused.
                // CERT_ROLE needs a client certificate.
                std::fs::write(
                    data.join("pg_hba.conf"),
                    format!(
                        "local all all trust\n\
                         hostssl all {CERT_ROLE} 127.0.0.1/32 cert\n\
                         hostssl all all 127.0.0.1/32 trust\n"
                    ),
                )
                .expect("pg_hba.conf");
                "127.0.0.1".to_owned()
            }
            Some(host) => {
                let mut hba = std::fs::OpenOptions::new()
                    .append(true)
                    .open(data.join("pg_hba.conf"))
                    .expect("pg_hba.conf");
                std::io::Write::write_all(&mut hba, b"host all all 0.0.0.0/0 trust\n")
                    .expect("pg_hba.conf");
                cluster.host = Some(host.clone());
                host.ip.clone()
            }
            None => String::new(),
        };
        let log = std::fs::File::create(cluster.dir.path().join("postgres.log")).expect("log");
        if let Some((uid, gid)) = owner {
            chown(&cluster.dir.path().join("postgres.log"), (uid, gid));
        }
        let socket_dir = cluster.socket_dir();
        let mut command = cluster.command("postgres");
        command
            .args(["-D", path_str(&data), "-k", path_str(&socket_dir)])
            .args(["-c", &format!("listen_addresses={listen}")])
            .args(["-c", &format!("port={}", cluster.port)])
            .args(["-c", "max_connections=200"])
            // Durability as in production: fsync stays on (the benchmark measures it).
            .args(["-c", "shared_buffers=64MB"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group, so that the drop can stop the server and its children.
            .process_group(0);
        cluster.server = Some(command.spawn().expect("spawn postgres"));
        let url = cluster.url("postgres");
        let ready = wait_for(Duration::from_secs(30), || {
            off_runtime(|| postgres::Client::connect(&url, postgres::NoTls).is_ok())
        });
        assert!(ready, "postgres did not start; log:\n{}", cluster.log());
        if tls && host.is_none() {
            off_runtime(|| {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
                client
                    .batch_execute(&format!("CREATE ROLE {CERT_ROLE} LOGIN SUPERUSER"))
                    .expect("create the certificate's role");
            });
        }
        cluster
    }

    /// A command running `program` of the installed PostgreSQL as the cluster's owner, on
    /// the cluster's host. In a namespace, `setpriv` drops to the owner after `ip netns
    /// exec` (which needs root) and execs the program.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match (&self.host, self.owner) {
            (Some(host), Some((uid, gid))) => {
                let mut command = host.command("setpriv");
                command
                    .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
                    .arg("--clear-groups")
                    .arg(path);
                command
            }
            (Some(host), None) => host.command(path),
            (None, owner) => {
                let mut command = Command::new(path);
                if let Some((uid, gid)) = owner {
                    command.uid(uid).gid(gid);
                }
                command
            }
        }
    }

    /// The URL of `database` over TCP at the cluster's host address (for clients on other
    /// hosts of the LAN), `postgresql://agora@IP:5432/DATABASE`.
    ///
    /// # Panics
    /// If the cluster was not started on a host.
    pub fn tcp_url(&self, database: &str) -> String {
        let host = self.host.as_ref().expect("a cluster started on a host");
        format!("postgresql://{ROLE}@{}:5432/{database}", host.ip)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the server's socket (`.s.PGSQL.5432`).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// The connection URL of `database` as [`ROLE`], over the Unix socket:
    /// `postgresql:///DATABASE?host=DIR&port=PORT&user=agora`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql:///{database}?host={}&port={}&user={ROLE}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// The URL of `database` over TLS on the loopback (a cluster of
    /// [`PgCluster::start_tls`]): `postgresql://agora@localhost:PORT/DATABASE`. TLS is up to
    /// the client (`--store-ca`); the server refuses the connection without it.
    pub fn tls_url(&self, database: &str) -> String {
        format!("postgresql://{ROLE}@localhost:{}/{database}", self.port)
    }

    /// The PEM file of the server's self-signed certificate (for `localhost` and
    /// 127.0.0.1), to verify it by: what `--store-ca` takes.
    pub fn tls_ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// As [`PgCluster::tls_url`], as [`CERT_ROLE`], who must present
    /// [`PgCluster::tls_client_cert`].
    pub fn tls_cert_url(&self, database: &str) -> String {
        format!(
            "postgresql://{CERT_ROLE}@localhost:{}/{database}",
            self.port
        )
    }

    /// The PEM files `(certificate, key)` of a client certificate for [`CERT_ROLE`] that
    /// the server's client CA signed (what `--store-cert` and `--store-key` take); the key
    /// has mode 0600.
    pub fn tls_client_cert(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("client.crt"),
            self.dir.path().join("client.key"),
        )
    }

    /// Writes the server's certificate and key (the key readable by the owner alone, as
    /// PostgreSQL requires) into the data directory and sets `ssl` on there, and the
    /// certificate as [`PgCluster::tls_ca`].
    fn make_certificate(&self) {
        let data = self.data_dir();
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .expect("certificate");
        std::fs::write(self.tls_ca(), cert.cert.pem()).expect("ca.pem");
        std::fs::write(data.join("server.crt"), cert.cert.pem()).expect("server.crt");
        let key = data.join("server.key");
        std::fs::write(&key, cert.key_pair.serialize_pem()).expect("server.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod server.key");
        if let Some(owner) = self.owner {
            chown(&data.join("server.crt"), owner);
            chown(&key, owner);
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("postgresql.conf");
        std::io::Write::write_all(
            &mut conf,
            b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
              ssl_ca_file = 'client-ca.crt'\n",
        )
        .expect("postgresql.conf");

        // A CA for client certificates, and one certificate it signed for CERT_ROLE.
        let ca_key = rcgen::KeyPair::generate().expect("client CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agora test client CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("client CA");
        std::fs::write(data.join("client-ca.crt"), ca_cert.pem()).expect("client-ca.crt");
        if let Some(owner) = self.owner {
            chown(&data.join("client-ca.crt"), owner);
        }
        let client_key = rcgen::KeyPair::generate().expect("client key");
        let mut client_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, CERT_ROLE);
        let client_cert = client_params
            .signed_by(&client_key, &ca_cert, &ca_key)
            .expect("client certificate");
        let (cert_path, key_path) = self.tls_client_cert();
        std::fs::write(&cert_path, client_cert.pem()).expect("client.crt");
        std::fs::write(&key_path, client_key.serialize_pem()).expect("client.key");
        std::fs::set_permissions(
            &key_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod client.key");
    }

    /// Creates an empty database and returns its URL.
    ///
    /// # Panics
    /// If the server refuses.
    pub fn database(&self, name: &str) -> String {
        let url = self.url("postgres");
        off_runtime(|| {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
            client
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .expect("create database");
        });
        self.url(name)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        let pid = server.id().to_string();
        // SIGINT: fast shutdown (aborts sessions, then a clean stop); SIGKILL of the whole
        // group if that takes too long.
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let stopped = wait_for(Duration::from_secs(10), || {
            matches!(server.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
            let _ = server.wait();
        }
    }
}

/// Runs `f` on a thread of its own: the synchronous `postgres` client runs a Tokio runtime
/// of its own, which panics inside another's (the browser tests are `#[tokio::test]`s).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("postgres client thread"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .is_some_and(|s| s.trim() == "0")
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to the postgres user");
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_serves_and_is_gone_after_drop() {
        let cluster = PgCluster::start();
        let url = cluster.database("probe");
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        let row = client.query_one("SELECT 40 + 2", &[]).expect("query");
        assert_eq!(row.get::<_, i32>(0), 42);
        drop(client);
        let socket = cluster.socket_dir().join(".s.PGSQL.5432");
        assert!(socket.exists());
        drop(cluster);
        assert!(!socket.exists(), "the server's socket outlived the cluster");
    }
}
