//! Harness for process-level tests: start the real binaries on ephemeral loopback
//! endpoints, read the endpoint each prints, and kill and reap them on drop.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which
//! `scripts/test.sh` does); they are looked up beside the test executable's `deps/` folder.
//! [`Chromedriver`] runs the installed chromedriver (and, through it, Chromium) for the browser
//! tests; [`Pty`] runs a program (user-cli's interactive prompt) on a pseudo-terminal of its
//! own, and [`stop_groups`] stops whole process groups.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod netns;
pub mod pg;

/// How long a server may take to print its endpoint line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one user-cli run may take before the test fails.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of a workspace binary (`registry`, `group-node`, `user-cli`).
///
/// # Panics
/// If it is not built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/PROFILE/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Established TCP connections, from any process of this network namespace, to the server
/// at `endpoint` (`tcp://127.0.0.1:PORT`): its clients' connections, read from
/// `/proc/net/tcp` and `/proc/net/tcp6` (state `01`, remote port PORT). For tests that
/// count how many connections a client holds to a server.
///
/// # Panics
/// If `endpoint` has no port.
pub fn connections_to(endpoint: &str) -> usize {
    let port: u16 = endpoint
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("a tcp endpoint with a port");
    let mut n = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state)) = (fields.get(2), fields.get(3)) else {
                continue;
            };
            let remote_port = remote
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "01" && remote_port == Some(port) {
                n += 1;
            }
        }
    }
    n
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The origin (`http://127.0.0.1:PORT`, scheme and authority, no path) of a running
/// `agora-web` [`Server`], as a browser sends it in `Origin` on the gateway's own pages.
/// The gateway refuses state-changing requests and WebSocket upgrades without it.
///
/// # Panics
/// If the server's endpoint is not an `http://` or `https://` URL.
pub fn web_origin(server: &Server) -> String {
    let url = server.endpoint.as_str();
    let (scheme, rest) = url.split_once("://").expect("the web endpoint is a URL");
    assert!(
        scheme == "http" || scheme == "https",
        "not a web endpoint: {url}"
    );
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    format!("{scheme}://{authority}")
}

/// The CSRF token in one of a gateway's pages: the sign-in form's hidden `csrf` field, or
/// the chat page's `<meta name="agora-csrf" content="…">` (sent back in `X-Agora-CSRF` or a
/// form's `csrf` field).
pub fn web_csrf(html: &str) -> Option<String> {
    [r#"name="csrf" value=""#, r#"name="agora-csrf" content=""#]
        .iter()
        .find_map(|marker| {
            let at = html.find(marker)? + marker.len();
            html[at..].split('"').next().map(str::to_owned)
        })
        .filter(|token| !token.is_empty())
}

/// A running server process; killed (SIGKILL) and reaped on drop.
pub struct Server {
    child: Child,
    /// The endpoint it printed (`tcp://127.0.0.1:PORT`).
    pub endpoint: String,
    /// The CURVE public key it printed (Z85), if it runs with CURVE.
    pub key: Option<String>,
    /// The plaintext key endpoint it printed (the registry's).
    pub key_endpoint: Option<String>,
    log: PathBuf,
}

impl Server {
    /// Starts `bin` with `args`, with stderr logged to `log`, and waits for its
    /// `listening ENDPOINT` line.
    ///
    /// # Panics
    /// If it does not start or print the line within [`START_TIMEOUT`].
    pub fn start(bin_name: &str, args: &[&str], log: &Path) -> Server {
        Server::spawn(bin_name, args, log).wait_listening(START_TIMEOUT)
    }

    /// Starts `bin` with `args`, with stderr logged to `log`, without waiting for its
    /// `listening` line (a standby group node prints it only when it becomes active).
    ///
    /// # Panics
    /// If it cannot be spawned.
    pub fn spawn(bin_name: &str, args: &[&str], log: &Path) -> Pending {
        let mut command = Command::new(bin(bin_name));
        command.args(args);
        Server::spawn_command(command, bin_name, log)
    }

    /// As [`Server::spawn`], running `command` (the binary and its arguments, wrapped in
    /// `ip netns exec NS`, say), named `bin_name` in messages.
    ///
    /// # Panics
    /// If it cannot be spawned.
    pub fn spawn_command(mut command: Command, bin_name: &str, log: &Path) -> Pending {
        let stderr = std::fs::File::create(log).expect("log file");
        let mut child = command
            // Transfers' chunks too: tests count what a resumed transfer sent again.
            .env("RUST_LOG", "info,agora::transfer=debug,agora::commit=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, line) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        Pending {
            child: Some(child),
            line,
            bin_name: bin_name.to_owned(),
            log: log.to_owned(),
        }
    }

    /// The process id (to read `/proc/PID/status`, for example).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `HOST:PORT` of the endpoint, as the seed's commands take it.
    pub fn host_port(&self) -> &str {
        self.endpoint.trim_start_matches("tcp://")
    }

    /// Sends SIGTERM and waits for a clean exit.
    ///
    /// # Panics
    /// If it does not exit within 10 s.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the server to exit by itself (after a `stop`, say); its
    /// status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_for(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// SIGKILL, as `kill -9`, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read(&self.log)
    }

    /// The `IP:PORT` the server logged as `metrics serving addr=…` (it was started with
    /// `--metrics`), waiting up to 10 s for the line.
    ///
    /// # Panics
    /// If no such line comes in time.
    pub fn metrics_addr(&self) -> String {
        let mut addr = None;
        let found = wait_for(Duration::from_secs(10), || {
            addr = self
                .log()
                .lines()
                .find(|l| l.contains("metrics serving"))
                .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
                .map(str::to_owned);
            addr.is_some()
        });
        assert!(found, "no metrics line in the log: {}", self.log());
        addr.unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server started with [`Server::spawn`] that has not printed its `listening` line yet;
/// killed (SIGKILL) and reaped on drop.
pub struct Pending {
    child: Option<Child>,
    line: mpsc::Receiver<String>,
    bin_name: String,
    log: PathBuf,
}

impl Pending {
    /// Waits up to `timeout` for the `listening ENDPOINT [public-key KEY] [key-endpoint E]`
    /// line.
    ///
    /// # Panics
    /// If it does not come in time, or the process exits first.
    pub fn wait_listening(mut self, timeout: Duration) -> Server {
        let mut child = self.child.take().expect("not yet waited for");
        let (bin_name, log) = (self.bin_name.clone(), self.log.clone());
        let line = match self.line.recv_timeout(timeout) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{bin_name} printed no endpoint; log:\n{}", read(&log));
            }
        };
        let mut words = line.split_whitespace();
        let (Some("listening"), Some(endpoint)) = (words.next(), words.next()) else {
            let _ = child.kill();
            let status = child.wait();
            panic!(
                "{bin_name} did not start ({status:?}), printed {line:?}; log:\n{}",
                read(&log)
            );
        };
        let key = match (words.next(), words.next()) {
            (Some("public-key"), Some(key)) => Some(key.to_owned()),
            _ => None,
        };
        let key_endpoint = match (words.next(), words.next()) {
            (Some("key-endpoint"), Some(e)) => Some(e.to_owned()),
            _ => None,
        };
        Server {
            endpoint: endpoint.to_owned(),
            key,
            key_endpoint,
            child,
            log,
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        read(&self.log)
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Waits up to `timeout` for the process to exit; `Some(exit code)` if it did (`Some(None)`
    /// when a signal ended it), `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let mut code = None;
        wait_for(timeout, || match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => {
                code = Some(status.code());
                true
            }
            _ => false,
        });
        code
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A `user-cli` command with `args`, the caller's `AGORA_*` settings removed and `env` set.
fn user_cli(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(bin("user-cli"));
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("AGORA_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command
}

/// A finished user-cli run.
#[derive(Debug)]
pub struct CliRun {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

/// Runs `user-cli` with `args`, feeding `stdin`, with `env` set.
///
/// # Panics
/// If it runs past [`CLI_TIMEOUT`].
pub fn cli(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> CliRun {
    finish(user_cli(args, env), "user-cli", args, stdin)
}

/// Runs the workspace binary `bin_name` (`agora-web add-user NAME`, say) with `args` to its
/// end, feeding `stdin`.
///
/// # Panics
/// If it is not built, or runs past [`CLI_TIMEOUT`].
pub fn run(bin_name: &str, args: &[&str], stdin: &str) -> CliRun {
    let mut command = Command::new(bin(bin_name));
    command.args(args);
    finish(command, bin_name, args, stdin)
}

/// Runs `command` (a binary wrapped in `ip netns exec`, say) to its end, feeding `stdin`.
///
/// # Panics
/// If it cannot be spawned, or runs past [`CLI_TIMEOUT`].
pub fn run_command(command: Command, stdin: &str) -> CliRun {
    finish(command, "command", &[], stdin)
}

/// Spawns `command`, feeds it `stdin`, and collects its output and exit code.
fn finish(mut command: Command, name: &str, args: &[&str], stdin: &str) -> CliRun {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} {args:?} ran past {CLI_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    CliRun {
        code: status.code(),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Which storage backend the federation's servers use: SQLite in their data directories
/// (the default), or, with `AGORA_TEST_STORE=postgres`, one PostgreSQL database in a
/// throwaway cluster of the federation's own (`--store URL`). `scripts/test.sh` runs the
/// process-level tests once with each.
pub fn test_store_is_postgres() -> bool {
    std::env::var("AGORA_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// A federation for a test: a temp dir, a registry, and helpers to start group nodes.
pub struct Federation {
    /// Holds logs and data dirs; removed on drop.
    pub dir: tempfile::TempDir,
    /// The registry.
    pub registry: Server,
    /// The database's URL, when the servers store in PostgreSQL
    /// ([`test_store_is_postgres`]).
    pub store: Option<String>,
    /// The cluster holding it; stopped after the registry (fields drop in order).
    pub pg: Option<pg::PgCluster>,
}

impl Federation {
    /// Starts a registry on an ephemeral loopback port with the given heartbeat.
    pub fn start(heartbeat: &str) -> Federation {
        Federation::start_with(heartbeat, &[])
    }

    /// As [`Federation::start`], with `extra` registry arguments.
    pub fn start_with(heartbeat: &str, extra: &[&str]) -> Federation {
        Federation::start_inner(heartbeat, extra, test_store_is_postgres())
    }

    /// As [`Federation::start_with`], storing in PostgreSQL whatever `AGORA_TEST_STORE`
    /// says (for tests of several registries over one database,
    /// [`Federation::another_registry`]).
    pub fn start_on_postgres(heartbeat: &str, extra: &[&str]) -> Federation {
        Federation::start_inner(heartbeat, extra, true)
    }

    /// As [`Federation::start_with`], storing in SQLite whatever `AGORA_TEST_STORE` says (for
    /// tests that time a client's batching against the registry, not its storage).
    pub fn start_on_sqlite(heartbeat: &str, extra: &[&str]) -> Federation {
        Federation::start_inner(heartbeat, extra, false)
    }

    fn start_inner(heartbeat: &str, extra: &[&str], postgres: bool) -> Federation {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("registry-data");
        let (pg, store) = if postgres {
            let cluster = pg::PgCluster::start();
            let url = cluster.database("agora");
            (Some(cluster), Some(url))
        } else {
            (None, None)
        };
        let mut args = vec![
            "--bind",
            "tcp://127.0.0.1:0",
            "--heartbeat",
            heartbeat,
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ];
        if let Some(url) = &store {
            args.extend(["--store", url.as_str()]);
        }
        args.extend_from_slice(extra);
        let registry = Server::start("registry", &args, &dir.path().join("registry.log"));
        Federation {
            dir,
            registry,
            store,
            pg,
        }
    }

    /// A PostgreSQL database for nodes that share a store (an active and its standbys):
    /// the federation's own when it stores in PostgreSQL, else a new cluster's, which the
    /// caller keeps for as long as the nodes run. Returns the cluster (if one was started)
    /// and the database's URL.
    pub fn shared_store(&self) -> (Option<pg::PgCluster>, String) {
        match &self.store {
            Some(url) => (None, url.clone()),
            None => {
                let cluster = pg::PgCluster::start();
                let url = cluster.database("agora");
                (Some(cluster), url)
            }
        }
    }

    /// Gives the node of data directory `to` (its tag) the key pair of `from`'s: nodes of
    /// one group share it.
    ///
    /// # Panics
    /// If the files cannot be copied.
    pub fn share_node_keys(&self, from: &str, to: &str) {
        let (from, to) = (self.node_data_dir(from), self.node_data_dir(to));
        std::fs::create_dir_all(&to).expect("data dir");
        for file in ["node.key", "node.key_secret"] {
            std::fs::copy(format!("{from}/{file}"), format!("{to}/{file}")).expect("copy key");
        }
    }

    /// `--store URL` when the federation stores in PostgreSQL, else nothing.
    pub fn store_args(&self) -> Vec<&str> {
        match &self.store {
            Some(url) => vec!["--store", url.as_str()],
            None => Vec::new(),
        }
    }

    /// Starts another registry over the federation's PostgreSQL store (so one registry with
    /// the first, the same key pair included), on an ephemeral loopback port, its data in
    /// `DIR/registry-data-<tag>`, with `extra` arguments.
    ///
    /// # Panics
    /// If the federation stores in SQLite, or the registry does not start.
    pub fn another_registry(&self, tag: &str, heartbeat: &str, extra: &[&str]) -> Server {
        assert!(
            self.store.is_some(),
            "registries share a PostgreSQL store only"
        );
        let data = self.path(&format!("registry-data-{tag}"));
        let mut args = vec![
            "--bind",
            "tcp://127.0.0.1:0",
            "--heartbeat",
            heartbeat,
            "--data-dir",
            &data,
        ];
        args.extend(self.store_args());
        args.extend_from_slice(extra);
        Server::start(
            "registry",
            &args,
            &self.dir.path().join(format!("registry-{tag}.log")),
        )
    }

    /// Kills the registry (SIGKILL); [`Federation::restart_registry`] brings it back.
    pub fn kill_registry(&mut self) {
        self.registry.kill9();
    }

    /// Kills the registry if it runs, and starts a new one on the same endpoint (and with
    /// the same key pair).
    pub fn restart_registry(&mut self, heartbeat: &str) {
        self.start_registry_on("registry-data", "registry-2.log", heartbeat);
    }

    /// Kills the registry and starts one with a NEW key pair on the same endpoint and key
    /// endpoint (a reinstalled registry, or an impostor). With PostgreSQL, which holds the
    /// key pair, the new registry gets a new, empty database (and so does whatever starts
    /// after it with [`Federation::store_args`]).
    pub fn replace_registry(&mut self, heartbeat: &str) {
        if let Some(pg) = &self.pg {
            static FRESH: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
            let n = FRESH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.store = Some(pg.database(&format!("agora-new-{n}")));
        }
        self.start_registry_on("registry-data-new", "registry-new.log", heartbeat);
    }

    /// Kills the registry and starts one on the same endpoint and key endpoint (whose
    /// default, the next port, may belong to another test), with data in `DIR/data` and
    /// the federation's store ([`Federation::store_args`]).
    fn start_registry_on(&mut self, data: &str, log: &str, heartbeat: &str) {
        self.registry.kill9();
        let endpoint = self.registry.endpoint.clone();
        let key_endpoint = self.registry.key_endpoint.clone().expect("a key endpoint");
        let data = self.path(data);
        let mut args = vec![
            "--bind",
            &endpoint,
            "--key-bind",
            &key_endpoint,
            "--heartbeat",
            heartbeat,
            "--data-dir",
            &data,
        ];
        args.extend(self.store_args());
        let registry = Server::start("registry", &args, &self.dir.path().join(log));
        self.registry = registry;
    }

    /// Joins `group` as `user` as soon as the group is listed (nodes register within a
    /// heartbeat of starting).
    ///
    /// # Panics
    /// If the join does not succeed within 20 s.
    pub fn join_when_listed(&self, user: &str, group: &str) {
        let mut last = None;
        let joined = wait_for(Duration::from_secs(20), || {
            let run = self.cli(user, &["join", group], "");
            let ok = run.code == Some(0);
            last = Some(run);
            ok
        });
        assert!(joined, "{user} could not join {group}: {last:?}");
    }

    /// A path inside the federation's temporary directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// The registry's public key.
    pub fn registry_key(&self) -> String {
        self.registry
            .key
            .clone()
            .expect("the registry runs with CURVE")
    }

    /// The environment user-cli runs of this federation get.
    fn cli_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TZ", "UTC".to_owned()),
            ("AGORA_STATE_DIR", self.state_dir()),
            ("AGORA_KEY_DIR", self.key_dir()),
            ("AGORA_REGISTRY_KEY", self.registry_key()),
        ]
    }

    /// A `user-cli` command as `user` against this federation's registry, everything given
    /// by environment (`AGORA_REGISTRY`, `AGORA_USER`, the state and key directories, the
    /// registry key, `HOME` in the federation's directory, `TZ=UTC`), the caller's own
    /// `AGORA_*` settings removed: for a session on a pipe or a [`Pty`].
    pub fn user_cli_command(&self, user: &str) -> Command {
        let mut command = user_cli(&[], &[]);
        command
            .env("HOME", self.path("home"))
            .env("AGORA_REGISTRY", &self.registry.endpoint)
            .env("AGORA_USER", user)
            .envs(self.cli_env());
        command
    }

    /// `user`'s interactive prompt against this federation's registry, on a terminal of its
    /// own ([`Federation::user_cli_command`] under a [`Pty`]).
    pub fn prompt(&self, user: &str) -> Pty {
        Pty::start(self.user_cli_command(user))
    }

    /// Where user key pairs live (shared by user-cli runs and library clients of a test).
    pub fn key_dir(&self) -> String {
        self.path("keys")
    }

    /// `user`'s public key (its key pair made on first use, as user-cli does), in Z85.
    pub fn user_key(&self, user: &str) -> String {
        let path = Path::new(&self.key_dir()).join(format!("{user}.key"));
        let (keypair, _) =
            agora_common::keys::Keypair::load_or_generate(&path).expect("user key pair");
        keypair.public.to_string()
    }

    /// CURVE settings for a library client acting as `user` (its key pair made on first
    /// use, as user-cli does) towards `server`.
    pub fn curve(&self, user: &str, server: &Server) -> agora_common::client::ClientCurve {
        let path = Path::new(&self.key_dir()).join(format!("{user}.key"));
        let (keypair, _) =
            agora_common::keys::Keypair::load_or_generate(&path).expect("user key pair");
        let server_key = server
            .key
            .as_deref()
            .expect("the server runs with CURVE")
            .parse()
            .expect("a valid key");
        agora_common::client::ClientCurve {
            keypair,
            server_key,
        }
    }

    /// Starts a group node named `name` at `addr` (`127.0.0.1:0` for a fresh port), its data
    /// in `DIR/data-<tag>`, and waits for its `listening` line.
    pub fn node(&self, name: &str, addr: &str, tag: &str, extra: &[&str]) -> Server {
        self.spawn_node(name, addr, tag, extra)
            .wait_listening(START_TIMEOUT)
    }

    /// As [`Federation::node`], without waiting for the `listening` line (a standby prints
    /// it when it takes over).
    pub fn spawn_node(&self, name: &str, addr: &str, tag: &str, extra: &[&str]) -> Pending {
        let data = self.node_data_dir(tag);
        let registry_key = self.registry_key();
        let mut args = vec![
            name,
            addr,
            "--registry",
            &self.registry.endpoint,
            "--registry-key",
            &registry_key,
            "--data-dir",
            &data,
            "--heartbeat",
            "200ms",
        ];
        if !extra.contains(&"--store") {
            args.extend(self.store_args());
        }
        args.extend_from_slice(extra);
        Server::spawn(
            "group-node",
            &args,
            &self.dir.path().join(format!("node-{tag}.log")),
        )
    }

    /// Starts a group host (`group-node --host 127.0.0.1:0`) registered with this
    /// federation's registry, its data in `DIR/data-<tag>` (SQLite, whatever the test store),
    /// and waits for its `listening` line. `extra` adds flags (`--group NAME` ...).
    pub fn host(&self, tag: &str, extra: &[&str]) -> Server {
        let data = self.node_data_dir(tag);
        let registry_key = self.registry_key();
        let mut args = vec![
            "--host",
            "127.0.0.1:0",
            "--registry",
            &self.registry.endpoint,
            "--registry-key",
            &registry_key,
            "--data-dir",
            &data,
            "--heartbeat",
            "200ms",
        ];
        args.extend_from_slice(extra);
        Server::spawn(
            "group-node",
            &args,
            &self.dir.path().join(format!("host-{tag}.log")),
        )
        .wait_listening(START_TIMEOUT)
    }

    /// The data directory of the node started with `tag`.
    pub fn node_data_dir(&self, tag: &str) -> String {
        self.path(&format!("data-{tag}"))
    }

    /// The state directory user-cli runs of this federation use.
    pub fn state_dir(&self) -> String {
        self.dir.path().join("state").to_string_lossy().into_owned()
    }

    /// The arguments and environment of a user-cli run as `user` against `registry` (an
    /// endpoint, or a comma-separated list of them).
    fn cli_setup(
        &self,
        registry: &str,
        user: &str,
        args: &[&str],
    ) -> (Vec<String>, Vec<(&'static str, String)>) {
        let mut all: Vec<String> = ["--registry", registry, "--user", user]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        (all, self.cli_env())
    }

    /// Runs user-cli against this federation's registry as `user`.
    pub fn cli(&self, user: &str, args: &[&str], stdin: &str) -> CliRun {
        self.cli_via(&self.registry, user, args, stdin)
    }

    /// Runs user-cli against `registry` (another one, [`Federation::another_registry`]) as
    /// `user`.
    pub fn cli_via(&self, registry: &Server, user: &str, args: &[&str], stdin: &str) -> CliRun {
        self.cli_at(&registry.endpoint, user, args, stdin)
    }

    /// Runs user-cli as `user` with `--registry registries` (a comma-separated list of
    /// endpoints of registries sharing one database).
    pub fn cli_at(&self, registries: &str, user: &str, args: &[&str], stdin: &str) -> CliRun {
        let (args, env) = self.cli_setup(registries, user, args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cli(&args, stdin, &env)
    }

    /// Starts `agora-web` in personal mode as `user` (its key pair in
    /// [`Federation::key_dir`], shared with user-cli runs) on an ephemeral loopback port; the
    /// endpoint is the URL with the one-time token.
    pub fn web_personal(&self, user: &str) -> Server {
        self.web_personal_with(user, &[])
    }

    /// As [`Federation::web_personal`], with `extra` arguments (`--session-idle 1s`, say).
    pub fn web_personal_with(&self, user: &str, extra: &[&str]) -> Server {
        let mut command = self.web_personal_command(user);
        command.args(extra);
        Server::spawn_command(
            command,
            "agora-web",
            &self.dir.path().join(format!("web-{user}.log")),
        )
        .wait_listening(START_TIMEOUT)
    }

    /// The command [`Federation::web_personal`] runs, not yet started: for a test that sets
    /// the gateway's environment (a limit given by its `AGORA_WEB_…` variable, say). Its link
    /// socket is one of its own in the test's directory (`DIR/links/web-N.sock`, through
    /// `AGORA_WEB_LINK_SOCKET`; a `--link-socket` argument wins), never the user's.
    pub fn web_personal_command(&self, user: &str) -> Command {
        static GATEWAYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = GATEWAYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut command = Command::new(bin("agora-web"));
        command.env(
            "AGORA_WEB_LINK_SOCKET",
            self.path(&format!("links/web-{n}.sock")),
        );
        command.args([
            "--user",
            user,
            "--bind",
            "127.0.0.1:0",
            "--registry",
            &self.registry.endpoint,
            "--registry-key",
            &self.registry_key(),
            "--key-dir",
            &self.key_dir(),
        ]);
        command
    }

    /// Starts `agora-web --hosted` on an ephemeral loopback port with its accounts in
    /// `DIR/<data>`; the endpoint is the base URL (the sign-in page).
    pub fn web_hosted(&self, data: &str) -> Server {
        self.web_hosted_with(data, &[])
    }

    /// As [`Federation::web_hosted`], with `extra` arguments (`--open-signup`, say).
    pub fn web_hosted_with(&self, data: &str, extra: &[&str]) -> Server {
        let mut command = self.web_hosted_command(data);
        command.args(extra);
        Server::spawn_command(
            command,
            "agora-web",
            &self.dir.path().join(format!("web-{data}.log")),
        )
        .wait_listening(START_TIMEOUT)
    }

    /// The command [`Federation::web_hosted`] runs, not yet started: for a test that sets
    /// the gateway's environment.
    pub fn web_hosted_command(&self, data: &str) -> Command {
        let mut command = Command::new(bin("agora-web"));
        command.args([
            "--hosted",
            "--data-dir",
            &self.path(data),
            "--bind",
            "127.0.0.1:0",
            "--registry",
            &self.registry.endpoint,
            "--registry-key",
            &self.registry_key(),
        ]);
        command
    }

    /// Makes the hosted account `name` with `password` in `DIR/<data>` (`agora-web add-user`,
    /// the password on stdin).
    ///
    /// # Panics
    /// If add-user fails.
    pub fn web_add_user(&self, data: &str, name: &str, password: &str) {
        let data_dir = self.path(data);
        let made = run(
            "agora-web",
            &["add-user", name, "--data-dir", &data_dir],
            &format!("{password}\n"),
        );
        assert_eq!(made.code, Some(0), "add-user {name}: {made:?}");
    }

    /// Starts `user-cli ARGS` (for example `watch`) as `user` in the background.
    pub fn spawn_cli(&self, user: &str, args: &[&str]) -> Streaming {
        self.spawn_cli_via(&self.registry, user, args)
    }

    /// Starts `user-cli ARGS` as `user` against `registry` in the background.
    pub fn spawn_cli_via(&self, registry: &Server, user: &str, args: &[&str]) -> Streaming {
        let (args, env) = self.cli_setup(&registry.endpoint, user, args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Streaming::start(&args, &env)
    }
}

/// A user-cli that keeps running (`watch`): its output lines arrive on channels; it is
/// interrupted with SIGINT, and killed and reaped on drop.
pub struct Streaming {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// Every stdout line received so far.
    pub lines: Vec<String>,
    /// Every stderr line received so far.
    pub errors: Vec<String>,
}

impl Streaming {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Streaming {
        Streaming::spawn(user_cli(args, env))
    }

    /// Runs `command` (a user-cli, in a network namespace, say) with its output lines
    /// streamed.
    ///
    /// # Panics
    /// If it cannot be spawned.
    pub fn spawn(mut command: Command) -> Streaming {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn user-cli");
        let stdout = lines_of(Box::new(child.stdout.take().expect("stdout")));
        let stderr = lines_of(Box::new(child.stderr.take().expect("stderr")));
        Streaming {
            child,
            stdout,
            stderr,
            lines: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn drain(&mut self) {
        self.lines.extend(self.stdout.try_iter());
        self.errors.extend(self.stderr.try_iter());
    }

    /// Waits until some stderr line contains `text`; returns whether one did in time.
    pub fn wait_stderr(&mut self, text: &str, timeout: Duration) -> bool {
        wait_for(timeout, || {
            self.drain();
            self.errors.iter().any(|l| l.contains(text))
        })
    }

    /// Waits until `done` holds for the stdout lines so far; returns whether it did in time.
    pub fn wait_lines(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[String]) -> bool,
    ) -> bool {
        wait_for(timeout, || {
            self.drain();
            done(&self.lines)
        })
    }

    /// Sends SIGINT and waits (up to 10 s) for the exit code.
    ///
    /// # Panics
    /// If it does not exit.
    pub fn interrupt(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let code = self.wait_exit(Duration::from_secs(10));
        code.expect("user-cli ignored SIGINT")
    }

    /// The process id (to stop or signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (up to `timeout`) for it to exit by itself; `Some(exit code)` if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let mut code = None;
        wait_for(timeout, || match self.child.try_wait() {
            Ok(Some(status)) => {
                code = Some(status.code());
                true
            }
            _ => false,
        });
        // The pipes close at exit; collect what is left.
        if code.is_some() {
            wait_for(Duration::from_secs(2), || {
                self.drain();
                match self.stdout.try_recv() {
                    Ok(line) => {
                        self.lines.push(line);
                        false
                    }
                    Err(e) => e == mpsc::TryRecvError::Disconnected,
                }
            });
        }
        self.drain();
        code
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads lines from `r` on a thread into a channel.
fn lines_of(r: Box<dyn Read + Send>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Whether process group `pgid` has a member (a zombie not yet reaped counts).
pub fn group_alive(pgid: u32) -> bool {
    Command::new("kill")
        .args(["-0", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Stops the process groups `pgids`: SIGTERM to each, up to `grace` for all to be empty
/// (calling `reap` meanwhile, so that a child of the test that leads a group is reaped, not
/// left a zombie member), then SIGKILL to those that still have members. Returns whether
/// they ended within `grace`.
pub fn stop_groups(pgids: &[u32], grace: Duration, mut reap: impl FnMut()) -> bool {
    let signal = |name: &str, pgid: u32| {
        let _ = Command::new("kill")
            .args([name, "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
    };
    for &pgid in pgids {
        signal("-TERM", pgid);
    }
    let ended = wait_for(grace, || {
        reap();
        !pgids.iter().any(|&pgid| group_alive(pgid))
    });
    if !ended {
        for &pgid in pgids {
            signal("-KILL", pgid);
        }
    }
    ended
}

/// How long a [`Pty`] waits for what it expects (a text on the terminal, a key's echo, the
/// program's session, its exit): 20 s.
pub const PTY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a dropped [`Pty`] gives its processes to end after SIGTERM before SIGKILL: 5 s.
pub const PTY_GRACE: Duration = Duration::from_secs(5);

/// A program on a pseudo-terminal of its own (`user-cli`'s interactive prompt, say), typed
/// into and read as a person at a terminal would.
///
/// # What it starts
/// util-linux's `script --quiet --return --flush --command 'PROGRAM' 'ARG'… /dev/null`, in a
/// process group of its own (`process_group(0)`). `script` opens the pseudo-terminal and runs
/// the program on it through `$SHELL -c` (the program and its arguments single-quoted) in a
/// new session, so the program is in a process group of its own too (its session's, whose
/// id [`Pty::start`] reads from `/proc`). The program gets the environment of the
/// [`Command`] given to [`Pty::start`] (the variables it sets and removes, over the test's;
/// `TERM=xterm` unless it sets `TERM`) and its working directory. With `--return`, `script`
/// exits with the program's exit code.
///
/// # How to type
/// What is written to `script`'s stdin arrives on the terminal as keys. [`Pty::paste`]
/// writes text in one write (a paste, tmux's `send-keys`, type-ahead over ssh);
/// [`Pty::type_line`] a line and Enter in one write; [`Pty::type_slowly`] one key at a time,
/// each once the terminal has shown something after the one before (its echo, a
/// completion), as a person types, so that a tab completes what the line holds.
///
/// # How output arrives
/// Everything the terminal shows (the program's stdout and stderr, prompts, echoed keys,
/// escape sequences) is read on a thread as it comes. [`Pty::shown`] is all of it so far, as
/// text, and [`Pty::expect`] finds a text after a byte offset in it. [`Pty::lines`] are its
/// complete lines (split at `\n`, each without its trailing `\r`, escape sequences and
/// echoed input kept: look for text in them with `contains`), and [`Pty::expect_line`]
/// finds one after a line index. `script`'s own stderr (it prints nothing with `--quiet`
/// unless it fails) is kept for panic messages.
///
/// # Deadlines
/// Every wait has one: [`PTY_TIMEOUT`] for [`Pty::expect`], [`Pty::expect_line`], each key's
/// echo in [`Pty::type_slowly`], [`Pty::wait_exit`] and the program's session at start; a
/// drop gives [`PTY_GRACE`] after SIGTERM. A wait that runs out panics with what the
/// terminal showed.
///
/// # Drop
/// Stops `script`'s process group and the program's ([`stop_groups`]: SIGTERM, which
/// `script` also passes on to the program, then SIGKILL after [`PTY_GRACE`]) and reaps
/// `script`, so nothing it started outlives the test, even one that panicked.
pub struct Pty {
    child: Child,
    stdin: ChildStdin,
    output: mpsc::Receiver<Vec<u8>>,
    stderr: mpsc::Receiver<String>,
    /// Everything the terminal showed so far.
    shown: Vec<u8>,
    /// What `script` printed on its stderr so far.
    errors: Vec<String>,
    /// The program's session (and process group) id, once `script` has started it.
    session: Option<u32>,
    /// The program's file name, for messages.
    name: String,
}

impl Pty {
    /// Starts `program` (its program, arguments, environment changes and working directory)
    /// on a pseudo-terminal, and waits (up to [`PTY_TIMEOUT`]) for `script` to start it in
    /// its session.
    ///
    /// # Panics
    /// If `script` is not installed (util-linux), cannot be spawned, starts no program in
    /// time, or an argument is not UTF-8.
    pub fn start(program: Command) -> Pty {
        let script = installed("script", &[], "util-linux installs it");
        let quote = |arg: &std::ffi::OsStr| {
            let arg = arg.to_str().expect("a UTF-8 program and arguments");
            format!("'{}'", arg.replace('\'', r"'\''"))
        };
        let line: Vec<String> = std::iter::once(program.get_program())
            .chain(program.get_args())
            .map(quote)
            .collect();
        let name = Path::new(program.get_program())
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut command = Command::new(script);
        command
            .args(["--quiet", "--return", "--flush", "--command"])
            // `exec`, so the program is the session leader whatever shell `script` uses
            // (one shell forks for `-c`, another execs).
            .arg(format!("exec {}", line.join(" ")))
            .arg("/dev/null")
            .env("TERM", "xterm");
        for (key, value) in program.get_envs() {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        if let Some(dir) = program.get_current_dir() {
            command.current_dir(dir);
        }
        let mut child = command
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn script for {name}: {e}"));
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stderr = lines_of(Box::new(child.stderr.take().expect("stderr")));
        let mut pty = Pty {
            child,
            stdin,
            output,
            stderr,
            shown: Vec::new(),
            errors: Vec::new(),
            session: None,
            name,
        };
        let script_pid = pty.child.id();
        let mut session = None;
        let started = wait_for(PTY_TIMEOUT, || {
            session = child_of(script_pid);
            session.is_some() || matches!(pty.child.try_wait(), Ok(Some(_)))
        });
        pty.session = session;
        if !started {
            let context = pty.context();
            panic!(
                "script started no {} within {PTY_TIMEOUT:?}; {context}",
                pty.name
            );
        }
        pty
    }

    /// The program's process id, which is also its session's and process group's id (`None`
    /// if it exited before [`Pty::start`] saw it).
    pub fn program_pid(&self) -> Option<u32> {
        self.session
    }

    /// Writes `keys` to the terminal in one write, as a paste delivers them (a tab or an
    /// escape sequence included).
    ///
    /// # Panics
    /// If the terminal is gone.
    pub fn paste(&mut self, keys: &str) {
        self.stdin
            .write_all(keys.as_bytes())
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("write to {}'s terminal: {e}", self.name));
    }

    /// Types `line` and Enter, in one write.
    ///
    /// # Panics
    /// If the terminal is gone.
    pub fn type_line(&mut self, line: &str) {
        self.paste(&format!("{line}\n"));
    }

    /// Types `keys` one at a time, each once the terminal has shown something after the one
    /// before (its echo, a completion), as a person types.
    ///
    /// # Panics
    /// If the terminal shows nothing after a key within [`PTY_TIMEOUT`].
    pub fn type_slowly(&mut self, keys: &str) {
        for key in keys.chars() {
            self.drain();
            let before = self.shown.len();
            self.paste(&key.to_string());
            let shown = wait_for(PTY_TIMEOUT, || {
                self.drain();
                self.shown.len() > before
            });
            if !shown {
                let context = self.context();
                panic!(
                    "{} did not show {key:?} within {PTY_TIMEOUT:?}; {context}",
                    self.name
                );
            }
        }
    }

    fn drain(&mut self) {
        for chunk in self.output.try_iter() {
            self.shown.extend(chunk);
        }
        self.errors.extend(self.stderr.try_iter());
    }

    /// What the terminal showed and `script` said, for a panic message.
    fn context(&mut self) -> String {
        self.drain();
        format!(
            "the terminal showed {:?}; script's stderr {:?}",
            String::from_utf8_lossy(&self.shown),
            self.errors
        )
    }

    /// Everything the terminal showed so far, as text (prompts and escape sequences
    /// included).
    pub fn shown(&mut self) -> String {
        self.drain();
        String::from_utf8_lossy(&self.shown).into_owned()
    }

    /// The complete lines the terminal showed so far (split at `\n`, without the trailing
    /// `\r`); the line being written (a prompt) is not one yet.
    pub fn lines(&mut self) -> Vec<String> {
        let shown = self.shown();
        match shown.rfind('\n') {
            Some(end) => shown[..end]
                .split('\n')
                .map(|l| l.trim_end_matches('\r').to_owned())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Waits (up to [`PTY_TIMEOUT`]) until the terminal has shown `text` after byte `from`
    /// of [`Pty::shown`]; returns the byte offset where it ends (the next `from`).
    ///
    /// # Panics
    /// If it does not show in time.
    pub fn expect(&mut self, from: usize, text: &str) -> usize {
        let mut end = None;
        wait_for(PTY_TIMEOUT, || {
            let shown = self.shown();
            end = shown
                .get(from..)
                .and_then(|s| s.find(text))
                .map(|at| from + at + text.len());
            end.is_some()
        });
        end.unwrap_or_else(|| {
            let context = self.context();
            panic!(
                "{} did not show {text:?} within {PTY_TIMEOUT:?}; {context}",
                self.name
            )
        })
    }

    /// Waits (up to [`PTY_TIMEOUT`]) for a complete line containing `text` after the first
    /// `from` lines of [`Pty::lines`]; returns its index.
    ///
    /// # Panics
    /// If none comes in time.
    pub fn expect_line(&mut self, from: usize, text: &str) -> usize {
        let mut found = None;
        wait_for(PTY_TIMEOUT, || {
            found = self
                .lines()
                .iter()
                .skip(from)
                .position(|l| l.contains(text))
                .map(|i| i + from);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            let lines = self.lines();
            let context = self.context();
            panic!(
                "{} showed no line with {text:?} within {PTY_TIMEOUT:?}; lines {lines:#?}; \
                 {context}",
                self.name
            )
        })
    }

    /// Waits (up to [`PTY_TIMEOUT`]) for the program, and `script` with it, to exit; the
    /// program's exit code (`None` if a signal ended it).
    ///
    /// # Panics
    /// If it does not exit in time.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut code = None;
        let ended = wait_for(PTY_TIMEOUT, || match self.child.try_wait() {
            Ok(Some(status)) => {
                code = Some(status.code());
                true
            }
            _ => false,
        });
        if !ended {
            let context = self.context();
            panic!(
                "{} did not exit within {PTY_TIMEOUT:?}; {context}",
                self.name
            );
        }
        self.drain();
        code.flatten()
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        // `script`'s group id is its pid (`process_group(0)`); the program's is its session's.
        let groups: Vec<u32> = std::iter::once(self.child.id())
            .chain(self.session)
            .collect();
        let child = &mut self.child;
        stop_groups(&groups, PTY_GRACE, || {
            let _ = child.try_wait();
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process of `parent` (from `/proc/PID/stat`), if it has one.
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // After "(comm)": state, ppid, ...
                    let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                    ppid.parse::<u32>().ok()
                })
                == Some(parent)
        })
}

/// A program the machine must have installed (`chromium`, say): the first `name` on `PATH`,
/// else the first of `fallbacks` that exists.
///
/// # Panics
/// If there is none, naming what installs it: the tests that need it fail, they never skip.
pub fn installed(name: &str, fallbacks: &[&str], installs: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed (not on PATH, nor at {fallbacks:?}): {installs} \
                 (scripts/deps.sh --browser does)"
            )
        })
}

/// `chromedriver` on an ephemeral loopback port (started with `--port=0`, it prints the port
/// it took), in a process group of its own, which the browsers it starts share. Dropping it
/// kills the whole group (SIGKILL) and reaps chromedriver, so no browser outlives a test, even
/// one that panicked before closing its sessions. Chromium's crash handlers leave the group
/// (they exit by themselves once their browser is gone): they are told apart by their crash
/// database, under this driver's own config directory, and waited for.
pub struct Chromedriver {
    child: Child,
    /// Its WebDriver endpoint, `http://127.0.0.1:PORT`.
    pub url: String,
    /// The Chromium binary sessions should run.
    pub chromium: PathBuf,
    /// Its log and the browsers' config and cache directories (`XDG_CONFIG_HOME`, ...).
    dir: tempfile::TempDir,
}

impl Chromedriver {
    /// Starts chromedriver, its log and the browsers' config under a new directory in `dir`,
    /// and waits for its port.
    ///
    /// # Panics
    /// If chromedriver or Chromium is not installed (Debian's `chromium-driver` and
    /// `chromium`), or chromedriver prints no port within [`START_TIMEOUT`].
    pub fn start(dir: &Path) -> Chromedriver {
        const INSTALLS: &str = "apt-get install chromium chromium-driver";
        let driver = installed(
            "chromedriver",
            &["/usr/lib/chromium/chromedriver"],
            INSTALLS,
        );
        let chromium = installed("chromium", &["/usr/lib/chromium/chromium"], INSTALLS);
        let dir = tempfile::Builder::new()
            .prefix("chromedriver-")
            .tempdir_in(dir)
            .expect("a chromedriver dir");
        let log = dir.path().join("chromedriver.log");
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(&driver)
            .arg("--port=0")
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", driver.display()));
        let stdout = lines_of(Box::new(child.stdout.take().expect("stdout")));
        // "ChromeDriver was started successfully on port 41283."
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        let port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stdout.recv_timeout(left) {
                Ok(line) => {
                    let port = line
                        .contains("started successfully")
                        .then(|| line.rsplit_once("on port "))
                        .flatten()
                        .and_then(|(_, p)| p.trim_end_matches('.').trim().parse::<u16>().ok());
                    seen.push(line);
                    if let Some(port) = port {
                        break port;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait();
                    panic!(
                        "chromedriver printed no port ({status:?}); stdout {seen:?}; log:\n{}",
                        read(&log)
                    );
                }
            }
        };
        // Whatever else it prints is read and dropped, so that it never blocks on a full pipe.
        std::thread::spawn(move || stdout.into_iter().for_each(drop));
        Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            chromium,
            dir,
        }
    }

    /// chromedriver's log so far.
    pub fn log(&self) -> String {
        read(&self.dir.path().join("chromedriver.log"))
    }

    /// A WebDriver session in a new headless Chromium with its profile in `profile` and a
    /// window of `width` × `height` CSS pixels. Its only traffic is to 127.0.0.1: anything
    /// not for loopback (which Chromium never proxies) goes to a proxy where nothing listens.
    /// An alert stays open (`unhandledPromptBehavior: ignore`), so a test can see it fired.
    ///
    /// # Panics
    /// If chromedriver opens no session (the panic carries its log).
    pub async fn session(&self, profile: &Path, width: u32, height: u32) -> fantoccini::Client {
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={width},{height}"),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-default-apps".to_owned(),
            "--disable-extensions".to_owned(),
            "--proxy-server=socks5://127.0.0.1:9".to_owned(),
        ];
        let capabilities = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": self.chromium, "args": args },
            "timeouts": { "pageLoad": 20_000, "script": 10_000, "implicit": 0 },
            "unhandledPromptBehavior": "ignore",
        });
        let capabilities = capabilities
            .as_object()
            .cloned()
            .expect("capabilities are an object");
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no WebDriver session: {e}; chromedriver's log:\n{}",
                    self.log()
                )
            })
    }

    /// The processes other than zombies whose command line names this driver's directory
    /// (Chromium's crash handlers, with `--database=DIR/config/...`).
    fn strays(&self) -> Vec<u32> {
        let mark = self.dir.path().as_os_str().as_encoded_bytes();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|stat| {
                        let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
                        Some(state == "Z")
                    })
                    .unwrap_or(true);
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !zombie && cmdline.windows(mark.len()).any(|w| w == mark)
            })
            .collect()
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The group's id is chromedriver's pid (`process_group(0)`).
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !wait_for(Duration::from_secs(5), || self.strays().is_empty()) {
            for pid in self.strays() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}
