//! The web gateway under load (issue 14, part 6): `sessions` WebSocket sessions
//! (tokio-tungstenite) on one `agora-web`, all following one group, against as many
//! subscribers on user-cli's path (`common::live` feeds, what `user-cli watch` runs) in this
//! process, on the same registry and node, round by round.
//!
//! A round has two phases, in alternating order from round to round:
//! - *gateway*: `sessions` WebSocket sessions follow the group; one more session sends
//!   `messages` texts, one every `interval`, each waiting for its ack;
//! - *baseline*: `sessions` feeds follow the group as the same user; a `GroupClient` sends
//!   as many, at the same pace.
//!
//! Latency is from just before a send to each subscriber's arrival of that entry, over every
//! (message, subscriber) pair. CPU time (`/proc/PID/stat`) of the gateway, the node and this
//! process is read over the sends and deliveries, and over a quiet window with everyone
//! following. The gateway's resident memory is read before its sessions open, once they all
//! follow, and every 100 ms until the last delivery.
//!
//! Everything runs over CURVE: `agora-web` talks CURVE to the registry, and a node
//! registers with a CURVE registry only over CURVE. Every session acts as one user (personal
//! mode has one), so the node runs with `--max-subscriptions-per-member` above the session
//! count (its default, 16, caps a personal gateway at 16 following tabs), and, as in every
//! bench workload, without its per-peer rate limit.

use std::collections::HashMap;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use agora_common::client::{ClientCurve, ClientOptions, GroupClient, RegistryClient};
use agora_common::keys::Keypair;
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_proto::wire::{EntryKind, GroupName, UserName};
use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::dm::{start_registry, RegistryProc};
use crate::workload::Latency;
use crate::{body, spawn_server, NodeProc};

/// The group every session follows (the bench node's name).
const GROUP: &str = "bench";

/// The one user of the personal gateway, and of the baseline's feeds.
const USER: &str = "alice";

/// How long one step may take: a connection, a handshake, a reply, a subscription.
const STEP: Duration = Duration::from_secs(30);

/// A subscriber that has received nothing for this long gives up (its count then fails).
const SILENCE: Duration = Duration::from_secs(30);

/// How long CPU use is read with every subscriber following and nothing sent.
const IDLE_WINDOW: Duration = Duration::from_secs(2);

/// WebSocket sessions opened at once while the gateway phase sets up.
const OPENING: usize = 32;

/// Baseline feeds per ZeroMQ context: libzmq caps a context at 1023 sockets
/// (`ZMQ_MAX_SOCKETS`), and a feed holds about four.
const FEEDS_PER_CONTEXT: usize = 128;

/// One round's measures. CPU times are per delivery (one message to one subscriber), over
/// the sends and deliveries of the phase, in µs.
#[derive(Debug, Clone)]
pub struct Round {
    /// Send→deliver on user-cli's path.
    pub baseline: Latency,
    /// This process's CPU per delivery in the baseline phase (the feeds).
    pub baseline_clients_cpu_us: f64,
    /// group-node's CPU per delivery in the baseline phase.
    pub baseline_node_cpu_us: f64,
    /// This process's and group-node's CPU use with the feeds following and nothing sent, %
    /// of one core.
    pub baseline_idle_pct: (f64, f64),
    /// The gateway phase, or why it failed (a failed gateway is not tried again).
    pub gateway: Result<GatewayRound, String>,
}

/// The gateway phase's measures.
#[derive(Debug, Clone, Copy)]
pub struct GatewayRound {
    /// Send→deliver through the gateway.
    pub latency: Latency,
    /// agora-web's CPU per delivery.
    pub cpu_us: f64,
    /// This process's CPU per delivery (the WebSocket clients).
    pub clients_cpu_us: f64,
    /// group-node's CPU per delivery.
    pub node_cpu_us: f64,
    /// agora-web's and group-node's CPU use with the sessions following and nothing sent,
    /// % of one core.
    pub idle_pct: (f64, f64),
    /// The gateway's VmRSS before the sessions open, KiB.
    pub rss_before_kib: u64,
    /// The gateway's VmRSS once every session follows, KiB.
    pub rss_following_kib: u64,
    /// The gateway's largest VmRSS seen from then to the last delivery (read every
    /// 100 ms), KiB.
    pub rss_max_kib: u64,
}

/// One phase's measures.
struct Phase {
    latency: Latency,
    /// CPU used during the sends and deliveries, and the deliveries.
    cpu: Cpu,
    deliveries: u64,
    /// CPU used over [`IDLE_WINDOW`] with every subscriber following and nothing sent.
    idle: Cpu,
}

/// CPU time used so far by the gateway, the node and this process.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    gateway: Duration,
    node: Duration,
    clients: Duration,
}

impl Cpu {
    fn read(gateway: u32, node: u32) -> anyhow::Result<Cpu> {
        Ok(Cpu {
            gateway: crate::servers::cpu_time(gateway)?,
            node: crate::servers::cpu_time(node)?,
            clients: crate::servers::cpu_time(std::process::id())?,
        })
    }

    /// What was used since `earlier`.
    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            gateway: self.gateway.saturating_sub(earlier.gateway),
            node: self.node.saturating_sub(earlier.node),
            clients: self.clients.saturating_sub(earlier.clients),
        }
    }
}

impl Phase {
    /// `cpu` per delivery, µs.
    fn per_delivery(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.deliveries.max(1) as f64
    }
}

/// `cpu` used over [`IDLE_WINDOW`], in % of one core.
fn idle_pct(cpu: Duration) -> f64 {
    100.0 * cpu.as_secs_f64() / IDLE_WINDOW.as_secs_f64()
}

/// The gateway phase's memory readings, KiB.
struct Memory {
    before: u64,
    following: u64,
    largest: u64,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A running `agora-web` in personal mode (killed on drop), and the session cookie its
/// token bought.
struct Gateway {
    child: Child,
    /// `127.0.0.1:PORT`.
    addr: String,
    /// `agora_session=ID`.
    cookie: String,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(registry: &RegistryProc, key_dir: &std::path::Path) -> anyhow::Result<Gateway> {
        let registry_key = registry.key().to_string();
        let key_dir = key_dir.to_str().context("a UTF-8 key directory")?;
        let (child, words, dir) = spawn_server(
            "agora-web",
            &[
                "--user",
                USER,
                "--bind",
                "127.0.0.1:0",
                "--registry",
                registry.endpoint(),
                "--registry-key",
                &registry_key,
                "--key-dir",
                key_dir,
                // Every session is one identity from one address here: lift the caps
                // that keep one account or one address from taking every slot.
                "--max-websockets-per-identity",
                "1000000",
                "--max-websockets-per-address",
                "1000000",
                "--max-connections",
                "1000000",
                "--max-connections-per-address",
                "1000000",
            ],
        )?;
        let mut gateway = Gateway {
            child,
            addr: String::new(),
            cookie: String::new(),
            _dir: dir,
        };
        let url = match words.as_slice() {
            [_, url] => url.clone(),
            _ => bail!("agora-web printed {words:?}, not `listening URL`"),
        };
        let base = url.split("/?token=").next().unwrap_or_default();
        gateway.addr = base.trim_start_matches("http://").to_owned();
        gateway.cookie = session_cookie(&url)?;
        Ok(gateway)
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        crate::servers::rss_kib(self.child.id())
    }

    fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        crate::servers::peak_rss_kib(self.child.id())
    }
}

/// Spends the one-time token of `url` for the session cookie (`agora_session=ID`).
fn session_cookie(url: &str) -> anyhow::Result<String> {
    let agent = ureq::AgentBuilder::new().redirects(0).timeout(STEP).build();
    let response = match agent.get(url).call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => bail!("GET {url}: {e}"),
    };
    let set_cookie = response
        .header("Set-Cookie")
        .with_context(|| format!("no session cookie (HTTP {})", response.status()))?;
    Ok(set_cookie
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// The run's servers: a registry, a node registered with it, and the gateway, with the
/// user's key pair in a key directory the gateway reads. Fields drop in order: the gateway
/// first, the context last.
pub struct Stage {
    gateway: Gateway,
    node: NodeProc,
    _registry: RegistryProc,
    user: UserName,
    keypair: Keypair,
    _keys: tempfile::TempDir,
    ctx: zmq::Context,
    sessions: usize,
    /// The gateway's largest VmRSS seen so far, KiB.
    rss_seen_kib: u64,
    /// Why the gateway phase failed, once it has.
    gateway_failed: Option<String>,
}

impl Stage {
    /// Starts the servers, registers the user, joins it to the group, and starts the
    /// gateway.
    ///
    /// # Errors
    /// A server that does not start, or a registration or join that fails.
    pub fn start(sessions: usize) -> anyhow::Result<Stage> {
        let ctx = zmq::Context::new();
        let registry = start_registry(&[])?;
        let registry_key = registry.key().to_string();
        // The two phases' subscriptions may overlap briefly while one phase ends.
        let per_member = (2 * sessions + 16).to_string();
        let max_subscribers = (2 * sessions + 16).max(10_000).to_string();
        let node = crate::spawn_node(&[
            "--registry",
            registry.endpoint(),
            "--registry-key",
            &registry_key,
            "--heartbeat",
            "200ms",
            "--max-subscriptions-per-member",
            &per_member,
            "--max-subscribers",
            &max_subscribers,
        ])?;
        let keys = tempfile::tempdir()?;
        let (keypair, _) = Keypair::load_or_generate(&keys.path().join(format!("{USER}.key")))?;
        let user = UserName::new(USER)?;
        let options = ClientOptions {
            timeout: STEP,
            attempts: 1,
        };
        let mut reg =
            RegistryClient::new(&ctx, registry.endpoint(), options).with_curve(ClientCurve {
                keypair: keypair.clone(),
                server_key: registry.key(),
            });
        reg.user_register(&user)?;
        // Listed within a heartbeat of starting.
        let group = GroupName::new(GROUP)?;
        let deadline = Instant::now() + STEP;
        while let Err(e) = reg.lookup(&group) {
            if Instant::now() > deadline {
                bail!("the node was not listed within {STEP:?}: {e}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut stage = Stage {
            gateway: Gateway::start(&registry, keys.path())?,
            node,
            _registry: registry,
            user,
            keypair,
            _keys: keys,
            ctx,
            sessions,
            rss_seen_kib: 0,
            gateway_failed: None,
        };
        stage.client()?.join()?;
        Ok(stage)
    }

    /// A request client of the node acting as the user, over CURVE.
    fn client(&mut self) -> anyhow::Result<GroupClient> {
        let server_key = self.node.key.context("the node runs with CURVE")?;
        Ok(GroupClient::new(
            &self.ctx,
            &self.node.endpoint,
            self.user.clone(),
            None,
            ClientOptions {
                timeout: STEP,
                attempts: 1,
            },
        )
        .with_curve(ClientCurve {
            keypair: self.keypair.clone(),
            server_key,
        }))
    }

    /// The gateway's peak resident set so far, KiB: its VmHWM, or the largest VmRSS seen if
    /// larger (the kernel updates VmHWM lazily: a peak freed with `madvise` can be missed).
    ///
    /// # Errors
    /// When `/proc` cannot be read.
    pub fn gateway_peak_rss_kib(&self) -> anyhow::Result<u64> {
        Ok(self.gateway.peak_rss_kib()?.max(self.rss_seen_kib))
    }

    /// One round: both phases, the gateway's first when `gateway_first`. A gateway phase
    /// that fails is reported in the round, and not tried again in later rounds.
    ///
    /// # Errors
    /// The baseline phase fails: a feed that does not subscribe, a send refused, a
    /// subscriber that misses messages.
    pub fn round(
        &mut self,
        gateway_first: bool,
        messages: u64,
        bytes: usize,
        interval: Duration,
    ) -> anyhow::Result<Round> {
        let (gateway, baseline) = if gateway_first {
            let g = self.gateway_round(messages, bytes, interval);
            (g, self.baseline_phase(messages, bytes, interval)?)
        } else {
            let b = self.baseline_phase(messages, bytes, interval)?;
            (self.gateway_round(messages, bytes, interval), b)
        };
        Ok(Round {
            baseline: baseline.latency,
            baseline_clients_cpu_us: baseline.per_delivery(baseline.cpu.clients),
            baseline_node_cpu_us: baseline.per_delivery(baseline.cpu.node),
            baseline_idle_pct: (
                idle_pct(baseline.idle.clients),
                idle_pct(baseline.idle.node),
            ),
            gateway,
        })
    }

    /// The gateway phase, unless it failed before.
    fn gateway_round(
        &mut self,
        messages: u64,
        bytes: usize,
        interval: Duration,
    ) -> Result<GatewayRound, String> {
        if let Some(e) = &self.gateway_failed {
            return Err(e.clone());
        }
        match self.gateway_phase(messages, bytes, interval) {
            Ok((phase, memory)) => {
                self.rss_seen_kib = self.rss_seen_kib.max(memory.largest);
                Ok(GatewayRound {
                    latency: phase.latency,
                    cpu_us: phase.per_delivery(phase.cpu.gateway),
                    clients_cpu_us: phase.per_delivery(phase.cpu.clients),
                    node_cpu_us: phase.per_delivery(phase.cpu.node),
                    idle_pct: (idle_pct(phase.idle.gateway), idle_pct(phase.idle.node)),
                    rss_before_kib: memory.before,
                    rss_following_kib: memory.following,
                    rss_max_kib: memory.largest,
                })
            }
            Err(e) => {
                let e = format!("{e:#}");
                eprintln!("agora-bench: web: the gateway phase failed: {e}");
                self.gateway_failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The log's last seq.
    fn last_seq(&mut self) -> anyhow::Result<u64> {
        Ok(self.client()?.info()?.last_seq)
    }

    /// The gateway phase: `sessions` WebSocket sessions follow, one more sends.
    fn gateway_phase(
        &mut self,
        messages: u64,
        bytes: usize,
        interval: Duration,
    ) -> anyhow::Result<(Phase, Memory)> {
        // One unmeasured send first (the sender's session connects to the node on it).
        let target = self.last_seq()? + 1 + messages;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (addr, cookie) = (self.gateway.addr.clone(), self.gateway.cookie.clone());
        let gateway = &self.gateway;
        let sessions = self.sessions;
        let (pid, node_pid) = (gateway.child.id(), self.node.child.id());
        runtime.block_on(async move {
            let before = gateway.rss_kib()?;
            let started = Instant::now();
            let opened: Vec<anyhow::Result<Ws>> = futures::stream::iter(0..sessions)
                .map(|_| follower(&addr, &cookie))
                .buffer_unordered(OPENING)
                .collect()
                .await;
            let total = opened.len();
            let mut followers = Vec::with_capacity(total);
            let mut first_error = None;
            for o in opened {
                match o {
                    Ok(ws) => followers.push(ws),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                bail!(
                    "{} of {total} WebSocket sessions follow (agora-web VmRSS {} KiB then); \
                     the first failure: {e:#}",
                    followers.len(),
                    gateway.rss_kib()?
                );
            }
            let following = gateway.rss_kib()?;
            eprintln!(
                "agora-bench: web: {sessions} sessions follow after {:.1} s; agora-web VmRSS \
                 {following} KiB ({before} KiB before)",
                started.elapsed().as_secs_f64(),
            );
            let largest = Arc::new(AtomicU64::new(following));
            let sampler = tokio::spawn(sample_rss(pid, Arc::clone(&largest)));
            let idle = Cpu::read(pid, node_pid)?;
            tokio::time::sleep(IDLE_WINDOW).await;
            let idle = Cpu::read(pid, node_pid)?.since(idle);
            let mut sender = open(&addr, &cookie).await?;
            let cpu = Cpu::read(pid, node_pid)?;
            let receivers: Vec<_> = followers
                .into_iter()
                .map(|ws| tokio::spawn(receive(ws, target)))
                .collect();
            let sent_at = gateway_sends(&mut sender, messages, bytes, interval).await?;
            let mut seen = Vec::with_capacity(receivers.len());
            for r in receivers {
                seen.push(r.await?);
            }
            let cpu = Cpu::read(pid, node_pid)?.since(cpu);
            if let Ok(kib) = gateway.rss_kib() {
                largest.fetch_max(kib, Ordering::Relaxed);
            }
            sampler.abort();
            let mut all = Vec::with_capacity(seen.len());
            for (entries, mut ws) in seen {
                let _ = tokio::time::timeout(STEP, ws.close(None)).await;
                all.push(entries);
            }
            let _ = tokio::time::timeout(STEP, sender.close(None)).await;
            let phase = Phase {
                latency: latency(&sent_at, &all, messages)?,
                cpu,
                deliveries: messages * sessions as u64,
                idle,
            };
            let memory = Memory {
                before,
                following,
                largest: largest.load(Ordering::Relaxed),
            };
            Ok((phase, memory))
        })
    }

    /// The baseline phase: `sessions` feeds in this process, a `GroupClient` sender.
    fn baseline_phase(
        &mut self,
        messages: u64,
        bytes: usize,
        interval: Duration,
    ) -> anyhow::Result<Phase> {
        let target = self.last_seq()? + 1 + messages;
        let server_key = self.node.key.context("the node runs with CURVE")?;
        let contexts: Vec<zmq::Context> = (0..self.sessions.div_ceil(FEEDS_PER_CONTEXT))
            .map(|_| zmq::Context::new())
            .collect();
        let (ready_tx, ready) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let mut feeds = Vec::with_capacity(self.sessions);
        let mut logs = Vec::with_capacity(self.sessions);
        for i in 0..self.sessions {
            let log: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
            let (ready_tx, done_tx, mine) = (ready_tx.clone(), done_tx.clone(), Arc::clone(&log));
            let mut told = false;
            let feed = Feed::with_handler(
                &contexts[i / FEEDS_PER_CONTEXT],
                self.user.clone(),
                Some(self.keypair.clone()),
                FeedOptions::default(),
                move |event| {
                    match event {
                        FeedEvent::Entry { entry, .. } if entry.kind == EntryKind::Message => {
                            let at = Instant::now();
                            if let Ok(mut log) = mine.lock() {
                                log.push((entry.seq, at));
                            }
                            if entry.seq == target {
                                let _ = done_tx.send(());
                            }
                        }
                        FeedEvent::Subscribed { .. } if !told => {
                            told = true;
                            let _ = ready_tx.send(Ok(()));
                        }
                        FeedEvent::Error { error, fatal, .. } if !told => {
                            told = true;
                            let _ = ready_tx.send(Err(format!("{error} (fatal: {fatal})")));
                        }
                        _ => {}
                    }
                    true
                },
            )?;
            feed.add(GroupSpec {
                label: GROUP.into(),
                endpoint: self.node.endpoint.clone(),
                group: None,
                after_seq: None,
                server_key: Some(server_key),
            });
            feeds.push(feed);
            logs.push(log);
        }
        let started = Instant::now();
        for _ in 0..self.sessions {
            match ready.recv_timeout(STEP) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("a baseline feed failed: {e}"),
                Err(_) => bail!("a baseline feed did not subscribe within {STEP:?}"),
            }
        }
        eprintln!(
            "agora-bench: web: {} baseline feeds subscribed after {:.1} s",
            self.sessions,
            started.elapsed().as_secs_f64()
        );
        let mut sender = self.client()?;
        let (pid, node_pid) = (self.gateway.child.id(), self.node.child.id());
        let idle = Cpu::read(pid, node_pid)?;
        std::thread::sleep(IDLE_WINDOW);
        let idle = Cpu::read(pid, node_pid)?.since(idle);
        let cpu = Cpu::read(pid, node_pid)?;
        // Unmeasured, as the gateway phase's first: the client connects on it.
        sender.send(body(0, bytes))?;
        let mut sent_at = HashMap::new();
        let start = Instant::now();
        for n in 0..messages {
            let tick = start + interval * u32::try_from(n).unwrap_or(u32::MAX);
            std::thread::sleep(tick.saturating_duration_since(Instant::now()));
            let t = Instant::now();
            let ack = sender.send(body(n, bytes))?;
            sent_at.insert(ack.seq, t);
        }
        for _ in 0..self.sessions {
            if done.recv_timeout(SILENCE).is_err() {
                break;
            }
        }
        let cpu = Cpu::read(pid, node_pid)?.since(cpu);
        drop(feeds);
        drop(contexts);
        let seen: Vec<Vec<(u64, Instant)>> = logs
            .iter()
            .map(|l| l.lock().map(|l| l.clone()).unwrap_or_default())
            .collect();
        Ok(Phase {
            latency: latency(&sent_at, &seen, messages)?,
            cpu,
            deliveries: messages * self.sessions as u64,
            idle,
        })
    }
}

/// Keeps the largest VmRSS of process `pid` in `largest`, read every 100 ms.
async fn sample_rss(pid: u32, largest: Arc<AtomicU64>) {
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        every.tick().await;
        if let Ok(kib) = crate::servers::rss_kib(pid) {
            largest.fetch_max(kib, Ordering::Relaxed);
        }
    }
}

/// Opens a WebSocket session on the gateway at `addr` with the session `cookie`.
async fn open(addr: &str, cookie: &str) -> anyhow::Result<Ws> {
    let mut request = format!("ws://{addr}/ws").into_client_request()?;
    request.headers_mut().insert("Cookie", cookie.parse()?);
    // As the gateway's own page: it refuses an upgrade from any other origin.
    request
        .headers_mut()
        .insert("Origin", format!("http://{addr}").parse()?);
    let tcp = tokio::time::timeout(STEP, tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    // tungstenite zero-fills its read buffer up to this size before every read, even one
    // that finds nothing (the 128 KiB default would cost this process a memset per poll).
    let config = WebSocketConfig::default().read_buffer_size(4 << 10);
    let handshake = tokio_tungstenite::client_async_with_config(request, tcp, Some(config));
    let (ws, _) = tokio::time::timeout(STEP, handshake)
        .await
        .context("the WebSocket handshake timed out")??;
    Ok(ws)
}

/// The next text message on `ws` as JSON, within `wait`.
async fn next_json(ws: &mut Ws, wait: Duration) -> anyhow::Result<serde_json::Value> {
    loop {
        let message = tokio::time::timeout(wait, ws.next())
            .await
            .context("no message in time")?
            .context("the gateway closed the session")??;
        if let WsMessage::Text(text) = message {
            return Ok(serde_json::from_str(text.as_str())?);
        }
    }
}

/// Opens a session that follows the group from now on, once its subscription is made.
async fn follower(addr: &str, cookie: &str) -> anyhow::Result<Ws> {
    let mut ws = open(addr, cookie).await?;
    let follow = serde_json::json!({"op": "follow", "group": GROUP});
    ws.send(WsMessage::text(follow.to_string())).await?;
    let mut replied = false;
    loop {
        let message = next_json(&mut ws, STEP).await.context("following")?;
        match (message.get("ok"), message["event"].as_str()) {
            (Some(ok), _) if ok == true => replied = true,
            (Some(_), _) => bail!("follow refused: {message}"),
            (None, Some("subscribed")) if replied => return Ok(ws),
            (None, Some("error")) => bail!("following failed: {message}"),
            _ => {}
        }
    }
}

/// The part of a pushed event the receivers read.
#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    event: Option<&'a str>,
    entry: Option<EntryHead>,
}

#[derive(serde::Deserialize)]
struct EntryHead {
    seq: u64,
    #[serde(default)]
    kind: EntryKind,
}

/// Records each message entry's arrival until seq `target` arrived or nothing came for
/// [`SILENCE`]; hands the session back for closing.
async fn receive(mut ws: Ws, target: u64) -> (Vec<(u64, Instant)>, Ws) {
    let mut seen = Vec::new();
    loop {
        let message = match tokio::time::timeout(SILENCE, ws.next()).await {
            Ok(Some(Ok(message))) => message,
            _ => return (seen, ws),
        };
        let at = Instant::now();
        let WsMessage::Text(text) = message else {
            continue;
        };
        let Ok(event) = serde_json::from_str::<Event>(text.as_str()) else {
            continue;
        };
        if let (Some("entry"), Some(entry)) = (event.event, event.entry) {
            if entry.kind == EntryKind::Message {
                seen.push((entry.seq, at));
                if entry.seq >= target {
                    return (seen, ws);
                }
            }
        }
    }
}

/// Sends one unmeasured text, then `messages` texts through `ws`, one every `interval`,
/// each waiting for its ack; returns when each measured seq was sent.
async fn gateway_sends(
    ws: &mut Ws,
    messages: u64,
    bytes: usize,
    interval: Duration,
) -> anyhow::Result<HashMap<u64, Instant>> {
    let warm_up = serde_json::json!({"op": "send", "group": GROUP, "text": "warm-up"});
    ws.send(WsMessage::text(warm_up.to_string())).await?;
    let reply = next_json(ws, STEP)
        .await
        .context("waiting for a send's ack")?;
    if reply["ok"] != true {
        bail!("send refused: {reply}");
    }
    let mut sent_at = HashMap::new();
    let start = tokio::time::Instant::now();
    for n in 0..messages {
        tokio::time::sleep_until(start + interval * u32::try_from(n).unwrap_or(u32::MAX)).await;
        // The same JSON body as the baseline's: a string of `bytes` - 2 digits.
        let text = format!("{n:0>width$}", width = bytes.saturating_sub(2));
        let request = serde_json::json!({"op": "send", "group": GROUP, "text": text});
        let t = Instant::now();
        ws.send(WsMessage::text(request.to_string())).await?;
        let reply = next_json(ws, STEP)
            .await
            .context("waiting for a send's ack")?;
        let Some(seq) = reply["ack"]["seq"].as_u64() else {
            bail!("send refused: {reply}");
        };
        sent_at.insert(seq, t);
    }
    Ok(sent_at)
}

/// Percentiles of arrival − send over every (message, subscriber) pair; fails when a
/// subscriber missed one.
fn latency(
    sent_at: &HashMap<u64, Instant>,
    seen: &[Vec<(u64, Instant)>],
    messages: u64,
) -> anyhow::Result<Latency> {
    let mut samples = Vec::with_capacity(seen.len() * messages as usize);
    for entries in seen {
        let got = entries
            .iter()
            .filter(|(seq, _)| sent_at.contains_key(seq))
            .count();
        if got as u64 != messages {
            bail!("a subscriber got {got} of {messages} messages");
        }
        samples.extend(
            entries
                .iter()
                .filter_map(|(seq, at)| sent_at.get(seq).map(|t| at.saturating_duration_since(*t))),
        );
    }
    Ok(Latency::of(samples))
}

/// Raises this process's open-file limit (inherited by the servers it starts) to at least
/// `needed`, up to the hard limit, with util-linux's `prlimit`. Returns the soft limit now.
pub fn raise_open_files(needed: u64) -> u64 {
    let soft_hard = || -> Option<(u64, u64)> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut words = line.trim_start_matches("Max open files").split_whitespace();
        let parse = |w: Option<&str>| match w {
            Some("unlimited") => Some(u64::MAX),
            w => w?.parse().ok(),
        };
        Some((parse(words.next())?, parse(words.next())?))
    };
    let Some((soft, hard)) = soft_hard() else {
        return 0;
    };
    if soft >= needed {
        return soft;
    }
    let to = if hard == u64::MAX {
        needed.to_string()
    } else {
        needed.min(hard).to_string()
    };
    let hard = if hard == u64::MAX {
        "unlimited".to_owned()
    } else {
        hard.to_string()
    };
    let _ = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={to}:{hard}"))
        .status();
    soft_hard().map_or(soft, |(s, _)| s)
}
