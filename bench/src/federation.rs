//! `--federation`: many groups on one machine (issue 24, docs/PERFORMANCE.md "Federation
//! scale"), side by side in one run:
//! - [`host`]: one `group-node --host` holding N groups made through `create` (CURVE, one
//!   creator key): create rate, RSS and disk per idle group, threads, idle CPU, and the
//!   time from `kill -9` and a restart to all N answering `info`;
//! - [`jetstream`]: nats-server holding N file-store streams: create rate, RSS and disk per
//!   stream (the peer the targets name);
//! - [`single_nodes`]: today's design, one `group-node NAME IP:PORT` process per group,
//!   measured at [`FedSizes::single_nodes`] and divided per group (so scaled to any N),
//!   with the WAL zero-filled at start (`--wal-prealloc`, the default) and without;
//! - [`registry`]: the registry holding N groups of one host through `register_groups`,
//!   kept live by `heartbeat_host`: `list` latency and idle CPU.
//!
//! Per-group figures are differences: (value with N − value empty) / N. CPU is read from
//! `/proc/PID/stat` ([`crate::servers::cpu_time`]) over [`FedSizes::idle`]. Nothing here
//! asserts a timing; a wrong count fails the run.

use std::process::Child;
use std::time::{Duration, Instant};

use agora_common::client::{ClientCurve, ClientOptions, HostClient};
use agora_common::keys::{Keypair, PublicKey};
use agora_proto::wire::{Endpoint, GroupMode, GroupName, HostedGroup, RegisterGroupsRequest};
use agora_proto::wire::{UserName, MAX_REGISTER_GROUPS};
use anyhow::{bail, Context};
use futures::TryStreamExt;

use crate::servers::{self, cpu_time, disk_bytes, rss_kib, threads};

/// The sizes of one federation run.
#[derive(Debug, Clone, Copy)]
pub struct FedSizes {
    /// Groups on the host, streams in JetStream, groups in the registry (N).
    pub groups: u64,
    /// Single-group `group-node` processes started per WAL setting.
    pub single_nodes: usize,
    /// How long idle CPU is read over.
    pub idle: Duration,
    /// Creates (stream creates, restart `info`s) in flight at once, one per client thread
    /// (Agora) or future (JetStream).
    pub in_flight: usize,
}

impl FedSizes {
    /// The run: 10,000 groups, 100 single-group nodes, 10 s idle windows.
    pub fn full() -> FedSizes {
        FedSizes {
            groups: 10_000,
            single_nodes: 100,
            idle: Duration::from_secs(10),
            in_flight: 8,
        }
    }

    /// CI's smoke run (well under a minute): 200 groups, 5 nodes, 2 s idle windows.
    pub fn quick() -> FedSizes {
        FedSizes {
            groups: 200,
            single_nodes: 5,
            idle: Duration::from_secs(2),
            in_flight: 8,
        }
    }
}

/// How long a server is left alone after a phase before its memory is read.
const SETTLE: Duration = Duration::from_secs(1);

/// What holding N groups (or streams) costs.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Creates per second, [`FedSizes::in_flight`] at a time.
    pub create_per_s: f64,
    /// (RSS with N − RSS empty) / N, KiB.
    pub rss_kib: f64,
    /// (disk with N − disk empty) / N, KiB (allocated blocks, as `du`).
    pub disk_kib: f64,
}

impl Scale {
    fn of(n: u64, took: Duration, rss: (u64, u64), disk: (u64, u64)) -> Scale {
        let n = n.max(1) as f64;
        // Signed: a difference within noise may come out below zero, and shows as such.
        let diff = |(before, after): (u64, u64)| after as f64 - before as f64;
        Scale {
            create_per_s: n / took.as_secs_f64(),
            rss_kib: diff(rss) / n,
            disk_kib: diff(disk) / 1024.0 / n,
        }
    }
}

/// The group host's measures.
#[derive(Debug, Clone, Copy)]
pub struct HostRun {
    /// Create rate, RSS and disk per idle group.
    pub scale: Scale,
    /// How the groups were made.
    pub made: Made,
    /// The host's RSS with N groups, KiB.
    pub rss_kib: u64,
    /// The host's threads with N groups.
    pub threads: u64,
    /// The host's CPU with N idle groups and nobody connected, % of one core.
    pub idle_cpu_pct: f64,
    /// From `kill -9` to all N groups answering `info` after a restart.
    pub restart: Duration,
    /// The data directory of the host before any group (its preallocated WAL counts whole),
    /// KiB.
    pub disk_empty_kib: f64,
    /// The database file per group after a clean stop (SIGTERM; its WAL checkpointed into
    /// it): (`host.sqlite3` with N − an empty host's) / N, KiB. The allocated-blocks figure
    /// ([`Scale::disk_kib`]) does not see groups that fit in the host's zero-filled WAL.
    pub db_kib: f64,
}

/// Stops `child` with SIGTERM (a clean stop: the database is checkpointed and closed) and
/// waits up to 30 s for it to exit.
fn stop_cleanly(mut child: Killed) -> anyhow::Result<()> {
    let pid = child.0.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .context("running kill -TERM")?;
    if !sent.success() {
        bail!("kill -TERM {pid} failed");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.0.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("group-node {pid} did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The size of the host's database file in `dir`, bytes.
fn db_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let path = dir.join("host.sqlite3");
    Ok(std::fs::metadata(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .len())
}

/// Today's one-process-per-group design, per group.
#[derive(Debug, Clone, Copy)]
pub struct Singles {
    /// RSS per group (one process), KiB.
    pub rss_kib: f64,
    /// Threads per group.
    pub threads: f64,
    /// Disk per group (its data directory), KiB.
    pub disk_kib: f64,
    /// Idle CPU per group, % of one core.
    pub idle_cpu_pct: f64,
}

/// The registry's measures with N groups of one host.
#[derive(Debug, Clone, Copy)]
pub struct RegistryRun {
    /// `register_groups` rate (128 names a request, one client), names per second.
    pub register_per_s: f64,
    /// The median `list` of all N, ms.
    pub list_ms: f64,
    /// The registry's CPU while the host's one `heartbeat_host` comes each interval and
    /// nothing else, % of one core.
    pub idle_cpu_pct: f64,
    /// The registry's RSS with N groups, KiB.
    pub rss_kib: u64,
}

/// A child process killed (`SIGKILL`) and reaped on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The CPU `pid` uses over `window`, % of one core.
fn idle_cpu_pct(pids: &[u32], window: Duration) -> anyhow::Result<f64> {
    let total = |pids: &[u32]| -> anyhow::Result<Duration> {
        pids.iter()
            .map(|p| cpu_time(*p))
            .sum::<anyhow::Result<Duration>>()
    };
    let before = total(pids)?;
    let started = Instant::now();
    std::thread::sleep(window);
    let used = total(pids)?.saturating_sub(before);
    Ok(100.0 * used.as_secs_f64() / started.elapsed().as_secs_f64())
}

fn group_name(i: u64) -> anyhow::Result<GroupName> {
    Ok(GroupName::new(format!("g{i:05}"))?)
}

/// The words of a server's `listening ENDPOINT public-key KEY` line.
fn endpoint_and_key(words: &[String]) -> anyhow::Result<(String, PublicKey)> {
    match words {
        [_, endpoint, _, key] => Ok((endpoint.clone(), key.parse()?)),
        _ => bail!("group-node printed {words:?}, not `listening ENDPOINT public-key KEY`"),
    }
}

/// Runs `work(i)` for every i in 0..n on `threads` threads (thread t takes i ≡ t mod
/// `threads`), each with its own state from `state()`; returns the time until the last
/// finished.
fn spread<S: Send>(
    n: u64,
    threads: usize,
    state: impl Fn() -> anyhow::Result<S>,
    work: impl Fn(&mut S, u64) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<Duration> {
    let threads = threads.max(1) as u64;
    let states = (0..threads)
        .map(|_| state())
        .collect::<anyhow::Result<Vec<S>>>()?;
    let started = Instant::now();
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = states
            .into_iter()
            .zip(0..)
            .map(|(mut s, t)| {
                scope.spawn(move || {
                    (t..n)
                        .step_by(threads as usize)
                        .try_for_each(|i| work(&mut s, i))
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
        })
    })?;
    Ok(started.elapsed())
}

/// How a host's groups were made, and the time it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// Through `create`, [`FedSizes::in_flight`] at a time.
    Create(Duration),
    /// At start (`--group NAME` for each), by a group-node that refuses `--creators` (no
    /// `create` yet): from the start to its endpoint line.
    AtStart(Duration),
}

impl Made {
    /// The time the groups took to make, either way.
    pub fn took(self) -> Duration {
        match self {
            Made::Create(t) | Made::AtStart(t) => t,
        }
    }
}

/// A group host's command line: `--host ADDR`, room for `max` groups, no rate limit, the
/// `registry` arguments (`--no-registry` when empty), and either any key may create
/// (`--creators any`, `max` groups per key) or `at_start` groups made at start (`--group`).
#[derive(Debug, Clone)]
struct HostLine {
    max: u64,
    creators: bool,
    at_start: u64,
    registry: Vec<String>,
}

impl HostLine {
    /// Starts the host in `dir` at `addr` (IP:PORT; port 0 picks one); returns it with its
    /// endpoint and CURVE key.
    fn start(
        &self,
        addr: &str,
        dir: &std::path::Path,
    ) -> anyhow::Result<(Killed, String, PublicKey)> {
        let max = self.max.to_string();
        let mut args: Vec<String> = ["--host", addr, "--max-groups", &max, "--rate-limit", "0"]
            .map(String::from)
            .into();
        if self.creators {
            args.extend(["--creators", "any", "--max-groups-per-key", &max].map(String::from));
        }
        for i in 0..self.at_start {
            args.push("--group".into());
            args.push(group_name(i)?.to_string());
        }
        if self.registry.is_empty() {
            args.push("--no-registry".into());
        }
        args.extend(self.registry.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (child, words) = crate::spawn_server_in("group-node", &args, dir)
            .context("starting `group-node --host` (this needs a group-node with --host)")?;
        let child = Killed(child);
        let (endpoint, key) = endpoint_and_key(&words)?;
        Ok((child, endpoint, key))
    }
}

/// A group host holding `n` groups.
struct Host {
    child: Killed,
    endpoint: String,
    key: PublicKey,
    /// Its command line, for a restart.
    line: HostLine,
    made: Made,
    /// The host's RSS before any group, KiB.
    rss0: u64,
    /// Its data directory's disk before any group, bytes.
    disk0: u64,
    /// Groups the host held when `rss0` and `disk0` were read (0, or 1 for a host without
    /// `create`).
    groups0: u64,
}

/// Starts a host in `dir` and makes `n` groups on it, `in_flight` creates at a time, as
/// `user` with the key pair `creator` (their owner). A group-node that refuses
/// `--creators` (no `create` yet) makes them at start instead (`--group`), owned by the
/// host key, after a start with one group in the same directory for the "empty" figures
/// (an empty host is the case `create` needs, and a host without it may not take it).
fn make_groups(
    dir: &std::path::Path,
    n: u64,
    registry: &[&str],
    in_flight: usize,
    creator: &Keypair,
    user: &UserName,
) -> anyhow::Result<Host> {
    let mut line = HostLine {
        max: n,
        creators: true,
        at_start: 0,
        registry: registry.iter().map(|a| (*a).to_owned()).collect(),
    };
    match line.start("127.0.0.1:0", dir) {
        Ok((child, endpoint, key)) => {
            std::thread::sleep(SETTLE);
            let rss0 = rss_kib(child.0.id())?;
            let disk0 = disk_bytes(dir)?;
            let ctx = zmq::Context::new();
            // One attempt each: a retried create whose first try landed is `name_taken`.
            let options = ClientOptions {
                timeout: Duration::from_secs(30),
                attempts: 1,
            };
            let took = spread(
                n,
                in_flight,
                || {
                    Ok(
                        HostClient::new(&ctx, &endpoint, user.clone(), options).with_curve(
                            ClientCurve {
                                keypair: creator.clone(),
                                server_key: key,
                            },
                        ),
                    )
                },
                |c, i| {
                    let name = group_name(i)?;
                    c.create(&name, GroupMode::Open)
                        .with_context(|| format!("create {name}"))?;
                    Ok(())
                },
            )?;
            Ok(Host {
                child,
                endpoint,
                key,
                line,
                made: Made::Create(took),
                rss0,
                disk0,
                groups0: 0,
            })
        }
        Err(e) => {
            eprintln!(
                "agora-bench: federation: {e:#}; trying again with the groups made at start \
                 (--group), as a group-node without `create` does"
            );
            line.creators = false;
            line.at_start = 1;
            let (empty, _, _) = line.start("127.0.0.1:0", dir)?;
            std::thread::sleep(SETTLE);
            let rss0 = rss_kib(empty.0.id())?;
            let disk0 = disk_bytes(dir)?;
            drop(empty);
            line.at_start = n;
            let started = Instant::now();
            let (child, endpoint, key) = line.start("127.0.0.1:0", dir)?;
            let took = started.elapsed();
            Ok(Host {
                child,
                endpoint,
                key,
                line,
                made: Made::AtStart(took),
                rss0,
                disk0,
                groups0: 1,
            })
        }
    }
}

/// The group host: N groups through `create` (see [`make_groups`]), measured idle, then
/// `kill -9` and a restart on the same endpoint until every group answers `info`.
///
/// # Errors
/// A host that does not start, a refused create, a group not served after the restart
/// within 2 minutes.
pub fn host(s: &FedSizes) -> anyhow::Result<HostRun> {
    let dir = tempfile::tempdir()?;
    let creator = Keypair::generate()?;
    let user = UserName::new("bench")?;
    let Host {
        mut child,
        endpoint,
        key,
        line,
        made,
        rss0,
        disk0,
        groups0,
    } = make_groups(dir.path(), s.groups, &[], s.in_flight, &creator, &user)?;
    let pid = child.0.id();
    std::thread::sleep(SETTLE);
    let rss = rss_kib(pid)?;
    let disk = disk_bytes(dir.path())?;
    let threads = threads(pid)?;
    let idle_cpu_pct = idle_cpu_pct(&[pid], s.idle)?;

    // kill -9, then the same endpoint again (libzmq binds with SO_REUSEADDR).
    let addr = endpoint
        .strip_prefix("tcp://")
        .context("the host's endpoint is not tcp://")?
        .to_owned();
    child.0.kill()?;
    child.0.wait()?;
    let killed = Instant::now();
    let (restarted, endpoint2, _) = line.start(&addr, dir.path())?;
    if endpoint2 != endpoint {
        bail!("the host came back at {endpoint2}, not {endpoint}");
    }
    let ctx = zmq::Context::new();
    let client = || {
        HostClient::new(
            &ctx,
            &endpoint,
            user.clone(),
            ClientOptions {
                timeout: Duration::from_secs(1),
                attempts: 1,
            },
        )
        .with_curve(ClientCurve {
            keypair: creator.clone(),
            server_key: key,
        })
    };
    let deadline = killed + Duration::from_secs(120);
    spread(
        s.groups,
        s.in_flight,
        || Ok(client()),
        |c, i| {
            let name = group_name(i)?;
            loop {
                match c.group(&name).info() {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() > deadline => {
                        bail!("{name} not served 2 minutes after the restart: {e}")
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        },
    )?;
    let restart = killed.elapsed();
    stop_cleanly(restarted)?;
    let db = db_bytes(dir.path())?;
    // An empty host of the same command line, stopped as cleanly, for the database's base.
    let empty_dir = tempfile::tempdir()?;
    let empty_line = HostLine {
        at_start: groups0,
        ..line.clone()
    };
    let (empty, _, _) = empty_line.start("127.0.0.1:0", empty_dir.path())?;
    stop_cleanly(empty)?;
    let db0 = db_bytes(empty_dir.path())?;
    Ok(HostRun {
        disk_empty_kib: disk0 as f64 / 1024.0,
        db_kib: (db as f64 - db0 as f64) / 1024.0 / (s.groups - groups0).max(1) as f64,
        scale: Scale::of(s.groups - groups0, made.took(), (rss0, rss), (disk0, disk)),
        made,
        rss_kib: rss,
        threads,
        idle_cpu_pct,
        restart,
    })
}

/// nats-server holding N JetStream streams on its file store, one subject each, created
/// [`FedSizes::in_flight`] at a time.
///
/// # Errors
/// A server that does not start, a refused create, a stream count other than N.
pub fn jetstream(s: &FedSizes) -> anyhow::Result<Scale> {
    use async_nats::jetstream::stream::{Config, StorageType};
    let server = servers::start_nats()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = async_nats::connect(format!("nats://{}", server.addr))
            .await
            .context("connecting to nats-server")?;
        let js = async_nats::jetstream::new(client);
        tokio::time::sleep(SETTLE).await;
        let rss0 = server.rss_kib()?;
        let disk0 = disk_bytes(server.dir())?;
        let started = Instant::now();
        let mut pending = futures::stream::FuturesUnordered::new();
        for i in 0..s.groups {
            if pending.len() >= s.in_flight {
                pending.try_next().await?;
            }
            let js = js.clone();
            pending.push(async move {
                js.create_stream(Config {
                    name: format!("g{i:05}"),
                    subjects: vec![format!("g.{i:05}")],
                    storage: StorageType::File,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .with_context(|| format!("creating stream g{i:05}"))
            });
        }
        while pending.try_next().await?.is_some() {}
        let took = started.elapsed();
        let streams = js.query_account().await.context("account info")?.streams;
        if streams as u64 != s.groups {
            bail!("nats-server holds {streams} streams, not {}", s.groups);
        }
        tokio::time::sleep(SETTLE).await;
        let rss = server.rss_kib()?;
        let disk = disk_bytes(server.dir())?;
        Ok(Scale::of(s.groups, took, (rss0, rss), (disk0, disk)))
    })
}

/// Today's design: [`FedSizes::single_nodes`] `group-node NAME IP:PORT` processes (CURVE,
/// no registry), each idle; their RSS, threads, disk and CPU summed, per group.
/// `wal_prealloc`: the default zero-filled WAL, else `--wal-prealloc 0`.
///
/// # Errors
/// A node that does not start.
pub fn single_nodes(s: &FedSizes, wal_prealloc: bool) -> anyhow::Result<Singles> {
    let extra: &[&str] = if wal_prealloc {
        &[]
    } else {
        &["--wal-prealloc", "0"]
    };
    let nodes = (0..s.single_nodes)
        .map(|_| crate::start_node(extra))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(SETTLE);
    let pids: Vec<u32> = nodes.iter().map(|n| n.child.id()).collect();
    let (mut rss, mut thread_count, mut disk) = (0, 0, 0);
    for (node, pid) in nodes.iter().zip(&pids) {
        rss += rss_kib(*pid)?;
        thread_count += threads(*pid)?;
        disk += disk_bytes(node._dir.path())?;
    }
    let cpu = idle_cpu_pct(&pids, s.idle)?;
    let n = nodes.len().max(1) as f64;
    Ok(Singles {
        rss_kib: rss as f64 / n,
        threads: thread_count as f64 / n,
        disk_kib: disk as f64 / 1024.0 / n,
        idle_cpu_pct: cpu / n,
    })
}

/// The registry holding N groups of one host (a `--host-key`), registered 128 a request
/// with `register_groups` and kept live by one `heartbeat_host` each interval, as a host's
/// registrar does. The host's endpoint is never dialled: the registry only stores it.
///
/// # Errors
/// A registry that does not start, a refused name, a `list` of other than N groups.
pub fn registry(s: &FedSizes) -> anyhow::Result<RegistryRun> {
    let ctx = zmq::Context::new();
    let host = Keypair::generate()?;
    let max = (s.groups + 100).to_string();
    let host_key = host.public.to_string();
    let reg = crate::dm::start_registry(&["--max-groups", &max, "--host-key", &host_key])?;
    let (mut client, _) = reg.client_as(&ctx, host.clone())?;
    let endpoint: Endpoint = "tcp://127.0.0.1:9".parse().context("endpoint")?;
    let mut heartbeat = Duration::from_secs(2);
    let started = Instant::now();
    let names = (0..s.groups)
        .map(group_name)
        .collect::<anyhow::Result<Vec<_>>>()?;
    for chunk in names.chunks(MAX_REGISTER_GROUPS) {
        let reply = client.register_groups(&RegisterGroupsRequest {
            endpoint: endpoint.clone(),
            public_key: Some(host.public),
            groups: chunk
                .iter()
                .map(|name| HostedGroup {
                    name: name.clone(),
                    members: 1,
                })
                .collect(),
        })?;
        if let Some(e) = reply.refused.first() {
            bail!(
                "register_groups refused {} names, the first: {e}",
                reply.refused.len()
            );
        }
        heartbeat = Duration::from_millis(reply.heartbeat_ms.max(100));
    }
    let register_per_s = s.groups as f64 / started.elapsed().as_secs_f64();
    let mut lists = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let listed = client.list()?.len() as u64;
        lists.push(t.elapsed().as_secs_f64() * 1e3);
        if listed != s.groups {
            bail!("the registry lists {listed} of {} groups", s.groups);
        }
    }
    // The host's heartbeat goes on beside the idle window, on its own thread and client.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (mut beat_client, _) = reg.client_as(&ctx, host.clone())?;
    let groups = s.groups;
    let public = host.public;
    let beats = std::thread::spawn(move || -> anyhow::Result<()> {
        loop {
            let reply = beat_client.heartbeat_host(&endpoint, Some(public), groups)?;
            if reply.known != groups {
                bail!(
                    "the registry knows {} of the host's {groups} groups",
                    reply.known
                );
            }
            match stopped.recv_timeout(heartbeat) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                _ => return Ok(()),
            }
        }
    });
    let idle = idle_cpu_pct(&[reg.pid()], s.idle);
    let _ = stop.send(());
    beats
        .join()
        .map_err(|_| anyhow::anyhow!("the heartbeat thread panicked"))??;
    Ok(RegistryRun {
        register_per_s,
        list_ms: crate::table::median(lists).unwrap_or(0.0),
        idle_cpu_pct: idle?,
        rss_kib: reg.rss_kib()?,
    })
}

/// The sizes of the followers workload ([`followers`]).
#[derive(Debug, Clone, Copy)]
pub struct FollowSizes {
    /// Users, each with its own CURVE key and feed.
    pub users: u64,
    /// Groups on the host, all active.
    pub groups: u64,
    /// Groups each user joins and follows.
    pub per_user: u64,
    /// Messages per second sent across the groups (round robin).
    pub rate: u64,
    /// How long they are sent.
    pub send_for: Duration,
    /// How long CPU is read with everyone following and nothing sent.
    pub idle: Duration,
    /// Follow through one `common::live::Feed` per user (a thread and a context each)
    /// instead of the load generator ([`crate::follow_load`]).
    pub feeds: bool,
}

impl FollowSizes {
    /// The run: 2,000 users in 10 of 1,000 groups each, 1,000 msg/s for 60 s.
    pub fn full() -> FollowSizes {
        FollowSizes {
            users: 2_000,
            groups: 1_000,
            per_user: 10,
            rate: 1_000,
            send_for: Duration::from_secs(60),
            idle: Duration::from_secs(10),
            feeds: false,
        }
    }

    /// CI's smoke run: 40 users in 5 of 20 groups, 100 msg/s for 2 s.
    pub fn quick() -> FollowSizes {
        FollowSizes {
            users: 40,
            groups: 20,
            per_user: 5,
            rate: 100,
            send_for: Duration::from_secs(2),
            idle: Duration::from_secs(2),
            feeds: false,
        }
    }

    /// The groups user `u` follows.
    fn groups_of(&self, u: u64) -> impl Iterator<Item = u64> + '_ {
        (0..self.per_user).map(move |j| (u * self.per_user + j) % self.groups)
    }
}

/// What the followers workload measured.
#[derive(Debug, Clone, Copy)]
pub struct FollowRun {
    /// Send → delivery to each follower, live pushes and backfill alike.
    pub latency: crate::workload::Latency,
    /// Deliveries that never came (the feed backfills a gap, so this must be 0).
    pub lost: u64,
    /// Deliveries expected: each message times its group's followers.
    pub expected: u64,
    /// From the feeds' start to every subscription made.
    pub subscribe_time: Duration,
    /// Messages sent.
    pub sent: u64,
    /// Of them, acked (all, unless the host fell more than 2 minutes behind).
    pub acked: u64,
    /// Acks per second, from the first send to the last ack: below `rate` when the host
    /// could not keep up.
    pub ack_per_s: f64,
    /// Host CPU with everyone following and nothing sent, % of one core.
    pub host_idle_pct: f64,
    /// Registry CPU over the same window.
    pub registry_idle_pct: f64,
    /// Host CPU while sending, % of one core.
    pub host_busy_pct: f64,
    /// Registry CPU while sending.
    pub registry_busy_pct: f64,
}

/// Feeds per ZeroMQ context: libzmq caps a context at 1023 sockets (`ZMQ_MAX_SOCKETS`).
const FEEDS_PER_CONTEXT: u64 = 128;

/// What the feeds' handlers share: deliveries so far and their latencies.
#[derive(Default)]
struct Deliveries {
    subscribed: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
    latencies: std::sync::Mutex<Vec<Duration>>,
}

use crate::follow_load::{stamp_of, stamped};

/// `users` users, each with its own CURVE key, each joined to and following
/// [`FollowSizes::per_user`] of [`FollowSizes::groups`] groups of one host (registered
/// with a registry), through `common::live::Feed` (one connection per host); host and
/// registry CPU idle, then `rate` messages/s for `send_for` from one sender, delivery
/// latency from send to each follower, and deliveries lost.
///
/// # Errors
/// A server that does not start, a refused create, join or send, feeds that do not all
/// subscribe within 2 minutes.
pub fn followers(s: &FollowSizes) -> anyhow::Result<FollowRun> {
    use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
    use agora_proto::action::call;
    use agora_proto::codec::{decode_reply, encode_call};
    use agora_proto::id::MessageId;
    use agora_proto::wire::{EntryKind, SendAck, SendRequest};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let needed = 8 * s.users + 1024;
    let limit = crate::web::raise_open_files(needed);
    if limit < needed {
        eprintln!("agora-bench: followers: open files limited to {limit} (wanted {needed})");
    }
    let max = (s.groups + 100).to_string();
    let reg = crate::dm::start_registry(&["--max-groups", &max, "--max-names-per-key", &max])?;
    let reg_key = reg.key().to_string();
    let dir = tempfile::tempdir()?;
    let sender = Keypair::generate()?;
    let sender_name = UserName::new("sender")?;
    let registry = ["--registry", reg.endpoint(), "--registry-key", &reg_key];
    let Host {
        child: host,
        endpoint,
        key,
        ..
    } = make_groups(dir.path(), s.groups, &registry, 8, &sender, &sender_name)?;
    let host_pid = host.0.id();
    let ctx = zmq::Context::new();
    let options = ClientOptions {
        timeout: Duration::from_secs(30),
        attempts: 1,
    };
    let client = |user: &UserName, keypair: &Keypair| {
        HostClient::new(&ctx, &endpoint, user.clone(), options).with_curve(ClientCurve {
            keypair: keypair.clone(),
            server_key: key,
        })
    };
    // The sender is a member of every group (its owner after `create`: join is a no-op).
    spread(
        s.groups,
        8,
        || Ok(client(&sender_name, &sender)),
        |c, i| {
            let group = group_name(i)?;
            c.group(&group)
                .join()
                .with_context(|| format!("the sender joining {group}"))?;
            Ok(())
        },
    )?;
    let users = (0..s.users)
        .map(|u| Ok((UserName::new(format!("u{u}"))?, Keypair::generate()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    spread(
        s.users,
        8,
        || Ok(()),
        |(), u| {
            let (name, keypair) = &users[u as usize];
            let mut c = client(name, keypair);
            for g in s.groups_of(u) {
                let group = group_name(g)?;
                c.group(&group)
                    .join()
                    .with_context(|| format!("{name} joining {group}"))?;
            }
            Ok(())
        },
    )?;

    if !s.feeds {
        let names = (0..s.groups)
            .map(group_name)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let users = users
            .into_iter()
            .enumerate()
            .map(|(u, (name, keypair))| {
                let groups = s.groups_of(u as u64).map(|g| names[g as usize].clone());
                (name, keypair, groups.collect())
            })
            .collect();
        let run = followers_load(
            s,
            users,
            &endpoint,
            key,
            (&sender_name, &sender),
            host_pid,
            reg.pid(),
        );
        drop(host);
        return run;
    }
    let epoch = Instant::now();
    let shared = Arc::new(Deliveries::default());
    let contexts: Vec<zmq::Context> = (0..s.users.div_ceil(FEEDS_PER_CONTEXT))
        .map(|_| zmq::Context::new())
        .collect();
    let mut feeds = Vec::new();
    for (u, (name, keypair)) in users.iter().enumerate() {
        let d = Arc::clone(&shared);
        let feed = Feed::with_handler(
            &contexts[u / FEEDS_PER_CONTEXT as usize],
            name.clone(),
            Some(keypair.clone()),
            FeedOptions::default(),
            move |event| {
                match event {
                    FeedEvent::Subscribed { .. } => {
                        d.subscribed.fetch_add(1, Ordering::Relaxed);
                    }
                    FeedEvent::Entry { entry, .. } if entry.kind == EntryKind::Message => {
                        if let Some((_, sent)) = stamp_of(&entry.body) {
                            let took = epoch.elapsed().saturating_sub(sent);
                            if let Ok(mut l) = d.latencies.lock() {
                                l.push(took);
                            }
                        }
                        d.received.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                true
            },
        )?;
        for g in s.groups_of(u as u64) {
            let group = group_name(g)?;
            feed.add(GroupSpec {
                label: group.to_string(),
                endpoint: endpoint.clone(),
                group: Some(group),
                after_seq: None,
                server_key: Some(key),
            });
        }
        feeds.push(feed);
    }
    let subscriptions = s.users * s.per_user;
    let cpu = |pid: u32| cpu_time(pid);
    let (hs, bs, opened) = (cpu(host_pid)?, cpu(std::process::id())?, Instant::now());
    while shared.subscribed.load(Ordering::Relaxed) < subscriptions {
        if opened.elapsed() > Duration::from_secs(180) {
            let secs = opened.elapsed().as_secs_f64();
            let pct = |used: Duration| 100.0 * used.as_secs_f64() / secs;
            bail!(
                "{} of {subscriptions} subscriptions made within 3 minutes of the feeds' start \
                 (meanwhile the host used {:.0}% of a core, this process {:.0}%)",
                shared.subscribed.load(Ordering::Relaxed),
                pct(cpu(host_pid)?.saturating_sub(hs)),
                pct(cpu(std::process::id())?.saturating_sub(bs)),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let subscribe_time = opened.elapsed();
    let (h0, r0, t0) = (cpu(host_pid)?, cpu(reg.pid())?, Instant::now());
    std::thread::sleep(s.idle);
    let idle_secs = t0.elapsed().as_secs_f64();
    let host_idle_pct = 100.0 * cpu(host_pid)?.saturating_sub(h0).as_secs_f64() / idle_secs;
    let registry_idle_pct = 100.0 * cpu(reg.pid())?.saturating_sub(r0).as_secs_f64() / idle_secs;

    // One DEALER as the sender, paced at `rate`, round robin over the groups.
    let dealer = ctx.socket(zmq::DEALER)?;
    dealer.set_linger(0)?;
    dealer.set_sndhwm(0)?;
    dealer.set_curve_serverkey(key.as_bytes())?;
    dealer.set_curve_publickey(sender.public.as_bytes())?;
    dealer.set_curve_secretkey(sender.secret_bytes())?;
    dealer.connect(&endpoint)?;
    let names = (0..s.groups)
        .map(group_name)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut followers_of = vec![0u64; s.groups as usize];
    for u in 0..s.users {
        for g in s.groups_of(u) {
            followers_of[g as usize] += 1;
        }
    }
    let total = s.rate * s.send_for.as_secs().max(1);
    let (h1, r1, started) = (cpu(host_pid)?, cpu(reg.pid())?, Instant::now());
    let (mut sent, mut acked, mut expected) = (0u64, 0u64, 0u64);
    // A host slower than `rate` acks late: the backlog gets 2 minutes, then the run ends
    // with what was acked (and says so).
    let ack_deadline = started + s.send_for + Duration::from_secs(120);
    let mut last_ack = started;
    while acked < total {
        let due = (started.elapsed().as_secs_f64() * s.rate as f64) as u64;
        while sent < total.min(due) {
            let g = (sent % s.groups) as usize;
            let frames = encode_call::<call::Send>(&SendRequest {
                group: Some(names[g].clone()),
                user: sender_name.clone(),
                body: stamped(sent, epoch),
                id: Some(MessageId::new_v7()),
                attachment: None,
            });
            dealer.send_multipart(std::iter::once(Vec::new()).chain(frames), 0)?;
            expected += followers_of[g];
            sent += 1;
        }
        if dealer.poll(zmq::POLLIN, 1)? > 0 {
            let reply = dealer.recv_multipart(0)?;
            if let Err(e) = decode_reply::<SendAck>(reply.get(1..).unwrap_or_default())? {
                bail!("send refused: {e}");
            }
            acked += 1;
            last_ack = Instant::now();
        }
        if Instant::now() > ack_deadline {
            eprintln!(
                "agora-bench: followers: {acked} of {total} sends acked 2 minutes after the \
                 last was due"
            );
            break;
        }
    }
    let ack_per_s = acked as f64 / last_ack.duration_since(started).as_secs_f64().max(1e-3);
    let busy_secs = started.elapsed().as_secs_f64();
    let host_busy_pct = 100.0 * cpu(host_pid)?.saturating_sub(h1).as_secs_f64() / busy_secs;
    let registry_busy_pct = 100.0 * cpu(reg.pid())?.saturating_sub(r1).as_secs_f64() / busy_secs;
    // Deliveries still on their way, or being backfilled: until all came, or none for 30 s.
    // (With sends unacked, `expected` counts messages the host may never have stored.)
    let (mut last, mut progress) = (0, Instant::now());
    loop {
        let got = shared.received.load(Ordering::Relaxed);
        if got >= expected || progress.elapsed() > Duration::from_secs(30) {
            break;
        }
        if got != last {
            (last, progress) = (got, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(feeds);
    let received = shared.received.load(Ordering::Relaxed);
    let latencies = std::mem::take(
        &mut *shared
            .latencies
            .lock()
            .map_err(|_| anyhow::anyhow!("a feed handler panicked"))?,
    );
    drop(host);
    Ok(FollowRun {
        latency: crate::workload::Latency::of(latencies),
        lost: expected.saturating_sub(received),
        expected,
        subscribe_time,
        sent,
        acked,
        ack_per_s,
        host_idle_pct,
        registry_idle_pct,
        host_busy_pct,
        registry_busy_pct,
    })
}

/// The followers and the sender through [`crate::follow_load`]: subscribed, CPU idle, then
/// `rate` messages/s for `send_for`; deliveries of acked sends only are expected.
fn followers_load(
    s: &FollowSizes,
    users: Vec<(UserName, Keypair, Vec<GroupName>)>,
    endpoint: &str,
    key: PublicKey,
    (sender_name, sender): (&UserName, &Keypair),
    host_pid: u32,
    reg_pid: u32,
) -> anyhow::Result<FollowRun> {
    use crate::follow_load::{send, Followers};
    use std::sync::atomic::Ordering;

    let names = (0..s.groups)
        .map(group_name)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut followers_of = vec![0u64; s.groups as usize];
    for u in 0..s.users {
        for g in s.groups_of(u) {
            followers_of[g as usize] += 1;
        }
    }
    let total = s.rate * s.send_for.as_secs().max(1);
    let epoch = Instant::now();
    let renew = agora_common::live::FeedOptions::default().renew;
    let cpu = |pid: u32| cpu_time(pid);
    let (hs, bs, opened) = (cpu(host_pid)?, cpu(std::process::id())?, Instant::now());
    let followers = Followers::start(users, endpoint, key, renew, total, epoch)?;
    let counts = std::sync::Arc::clone(&followers.counts);
    let subscriptions = s.users * s.per_user;
    while counts.subscribed.load(Ordering::Relaxed) < subscriptions {
        if opened.elapsed() > Duration::from_secs(180) {
            let secs = opened.elapsed().as_secs_f64();
            let pct = |used: Duration| 100.0 * used.as_secs_f64() / secs;
            bail!(
                "{} of {subscriptions} subscriptions made within 3 minutes of the followers' \
                 start (meanwhile the host used {:.0}% of a core, this process {:.0}%)",
                counts.subscribed.load(Ordering::Relaxed),
                pct(cpu(host_pid)?.saturating_sub(hs)),
                pct(cpu(std::process::id())?.saturating_sub(bs)),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let subscribe_time = opened.elapsed();
    let (h0, r0, t0) = (cpu(host_pid)?, cpu(reg_pid)?, Instant::now());
    std::thread::sleep(s.idle);
    let idle_secs = t0.elapsed().as_secs_f64();
    let host_idle_pct = 100.0 * cpu(host_pid)?.saturating_sub(h0).as_secs_f64() / idle_secs;
    let registry_idle_pct = 100.0 * cpu(reg_pid)?.saturating_sub(r0).as_secs_f64() / idle_secs;

    let ctx = zmq::Context::new();
    let (h1, r1, started) = (cpu(host_pid)?, cpu(reg_pid)?, Instant::now());
    let sent = send(
        &ctx,
        endpoint,
        key,
        sender_name,
        sender,
        &names,
        s.rate,
        total,
        Duration::from_secs(120),
        epoch,
    )?;
    let busy_secs = started.elapsed().as_secs_f64();
    let host_busy_pct = 100.0 * cpu(host_pid)?.saturating_sub(h1).as_secs_f64() / busy_secs;
    let registry_busy_pct = 100.0 * cpu(reg_pid)?.saturating_sub(r1).as_secs_f64() / busy_secs;
    let groups = s.groups as usize;
    let acked_sends = || (0..sent.sent as usize).filter(|k| sent.acked[*k]);
    let expected: u64 = acked_sends().map(|k| followers_of[k % groups]).sum();
    let received = || -> u64 {
        acked_sends()
            .map(|k| u64::from(counts.delivered[k].load(Ordering::Relaxed)))
            .sum()
    };
    // Deliveries still on their way: until all came, or none for 30 s.
    let (mut last, mut progress) = (0, Instant::now());
    loop {
        let got = received();
        if got >= expected || progress.elapsed() > Duration::from_secs(30) {
            break;
        }
        if got != last {
            (last, progress) = (got, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let latencies = followers.finish()?;
    let received = received();
    let (gaps, refused, unsubscribed) = (
        counts.gaps.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.unsubscribed.load(Ordering::Relaxed),
    );
    if gaps + refused + unsubscribed > 0 {
        eprintln!(
            "agora-bench: followers: {gaps} seqs skipped, {refused} requests refused, \
             {unsubscribed} subscriptions ended by the host"
        );
    }
    let acked = acked_sends().count() as u64;
    Ok(FollowRun {
        latency: crate::workload::Latency::of(latencies),
        lost: expected.saturating_sub(received),
        expected,
        subscribe_time,
        sent: sent.sent,
        acked,
        ack_per_s: acked as f64 / sent.took.as_secs_f64().max(1e-3),
        host_idle_pct,
        registry_idle_pct,
        host_busy_pct,
        registry_busy_pct,
    })
}
