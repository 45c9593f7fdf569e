//! `agora-bench`: measures a real `group-node` process (started from beside this binary).
//!
//! - one client's sequential acked sends per second (each waits for its ack);
//! - acked sends per second with a window of requests in flight on one DEALER (group commit);
//! - history replay of the newest `--replay` messages, in pages of 1000;
//! - the node's resident memory (VmRSS) as the log grows to `--messages`, and after a full
//!   replay: history lives on disk, so it must stay flat.
//!
//! Build first: `cargo build --release --bins`, then `cargo run --release -p agora-bench`.
//! Prints a table; asserts nothing about timings.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agora_common::client::{ClientCurve, ClientOptions, GroupClient};
use agora_common::codec::{decode_reply, encode_request};
use agora_common::id::MessageId;
use agora_common::proto::{HistoryQuery, Request, SendAck, SendRequest, UserName};
use anyhow::{bail, Context};
use clap::Parser;
use serde_json::value::RawValue;

mod dm;
mod live;

/// Benchmarks a real group node on loopback.
#[derive(Debug, Parser)]
#[command(name = "agora-bench", about)]
struct Args {
    /// Sequential acked sends to time.
    #[arg(long, default_value_t = 5_000)]
    sequential: u64,
    /// Total messages stored before the memory reading (the log grows to this).
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Messages replayed from history.
    #[arg(long, default_value_t = 100_000)]
    replay: u64,
    /// Requests in flight for the windowed send.
    #[arg(long, default_value_t = 100)]
    window: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 128)]
    body_bytes: usize,
    /// Sequential sends per live latency run.
    #[arg(long, default_value_t = 1_000)]
    latency_messages: u64,
    /// Messages per fan-out run.
    #[arg(long, default_value_t = 20_000)]
    fanout_messages: u64,
    /// Skip the storage benchmarks (acked sends, replay, memory).
    #[arg(long)]
    live_only: bool,
    /// Skip the live-stream benchmarks.
    #[arg(long)]
    no_live: bool,
    /// Run the node without CURVE (to measure what encryption costs).
    #[arg(long)]
    insecure: bool,
    /// Stored direct messages a reconnecting user receives.
    #[arg(long, default_value_t = 10_000)]
    stored_dms: u64,
    /// Skip the direct-message benchmarks.
    #[arg(long)]
    no_dm: bool,
}

pub(crate) struct NodeProc {
    child: Child,
    pub(crate) endpoint: String,
    /// The node's CURVE public key, as it printed it (`None` for an `--insecure` node).
    key: Option<agora_common::keys::PublicKey>,
    /// One key pair per bench user: the node knows a member by key.
    users: std::cell::RefCell<std::collections::HashMap<UserName, agora_common::keys::Keypair>>,
    _dir: tempfile::TempDir,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProc {
    /// CURVE settings for `user`'s connections to this node (one key pair per user).
    pub(crate) fn curve(&self, user: &UserName) -> anyhow::Result<Option<ClientCurve>> {
        let Some(server_key) = self.key else {
            return Ok(None);
        };
        let mut users = self.users.borrow_mut();
        let keypair = match users.get(user) {
            Some(k) => k.clone(),
            None => {
                let k = agora_common::keys::Keypair::generate()?;
                users.insert(user.clone(), k.clone());
                k
            }
        };
        Ok(Some(ClientCurve {
            keypair,
            server_key,
        }))
    }

    /// A request client of this node acting as `user`, over CURVE.
    pub(crate) fn client(
        &self,
        ctx: &zmq::Context,
        user: &UserName,
        options: ClientOptions,
    ) -> anyhow::Result<GroupClient> {
        let client = GroupClient::new(ctx, &self.endpoint, user.clone(), None, options);
        Ok(match self.curve(user)? {
            Some(curve) => client.with_curve(curve),
            None => client,
        })
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc status")
    }
}

/// Starts the release binary `name` beside this one with `args` and a temporary data
/// directory (`--data-dir`), and returns it with the words of its `listening …` line.
pub(crate) fn spawn_server(
    name: &str,
    args: &[&str],
) -> anyhow::Result<(Child, Vec<String>, tempfile::TempDir)> {
    let bin: PathBuf = std::env::current_exe()?.with_file_name(name);
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release --bins` first",
            bin.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(&bin)
        .args(args)
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let words = line.split_whitespace().map(str::to_owned).collect();
    Ok((child, words, dir))
}

/// Starts the release `group-node` beside this binary on a free loopback port, with `extra`
/// arguments, in a temporary data directory. The per-peer rate limit is off: the bench
/// measures throughput, and one bench client sends far more than a person would.
pub(crate) fn start_node(extra: &[&str]) -> anyhow::Result<NodeProc> {
    let mut args = vec!["bench", "127.0.0.1:0", "--no-registry", "--rate-limit", "0"];
    args.extend_from_slice(extra);
    let (child, words, dir) = spawn_server("group-node", &args)?;
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let (endpoint, key) = match words.as_slice() {
        [_, endpoint, _, key] => (*endpoint, Some(key.parse()?)),
        [_, endpoint] => (*endpoint, None),
        _ => bail!("group-node printed {words:?}, not `listening ENDPOINT [public-key KEY]`"),
    };
    Ok(NodeProc {
        child,
        endpoint: endpoint.to_owned(),
        key,
        users: Default::default(),
        _dir: dir,
    })
}

pub(crate) fn body(n: u64, bytes: usize) -> Box<RawValue> {
    let text = format!("{n:0>width$}", width = bytes.saturating_sub(2));
    RawValue::from_string(format!("\"{text}\"")).unwrap_or_else(|_| unreachable!("digits are JSON"))
}

/// Sends `count` messages with `window` in flight on one DEALER; returns the time taken.
pub(crate) fn windowed_sends(
    ctx: &zmq::Context,
    node: &NodeProc,
    user: &UserName,
    count: u64,
    window: usize,
    bytes: usize,
) -> anyhow::Result<Duration> {
    let s = ctx.socket(zmq::DEALER)?;
    s.set_linger(0)?;
    s.set_rcvtimeo(30_000)?;
    s.set_sndhwm(0)?;
    if let Some(curve) = node.curve(user)? {
        s.set_curve_serverkey(curve.server_key.as_bytes())?;
        s.set_curve_publickey(curve.keypair.public.as_bytes())?;
        s.set_curve_secretkey(curve.keypair.secret_bytes())?;
    }
    s.connect(&node.endpoint)?;
    let started = Instant::now();
    let (mut sent, mut acked) = (0u64, 0u64);
    while acked < count {
        while sent < count && sent - acked < window as u64 {
            let req = Request::Send(SendRequest {
                group: None,
                user: user.clone(),
                body: body(sent, bytes),
                id: Some(MessageId::new_v7()),
            });
            let frames = encode_request(&req);
            s.send_multipart(std::iter::once(Vec::new()).chain(frames), 0)?;
            sent += 1;
        }
        let reply = s.recv_multipart(0).context("no ack within 30 s")?;
        let ack = decode_reply::<SendAck>(reply.get(1..).unwrap_or_default())?;
        if let Err(e) = ack {
            bail!("send refused: {e}");
        }
        acked += 1;
    }
    Ok(started.elapsed())
}

/// The chat messages of a page (not the join/leave events).
fn chat_messages(page: &agora_common::proto::MessagesPage) -> u64 {
    page.messages
        .iter()
        .filter(|m| m.kind == agora_common::proto::EntryKind::Message)
        .count() as u64
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("{:<52} {:>14}", "measure", "result");
    let base: &[&str] = if args.insecure { &["--insecure"] } else { &[] };
    if !args.live_only {
        storage(&args, base)?;
    }
    if !args.no_dm && !args.insecure {
        dm::stored(args.stored_dms, args.body_bytes)?;
        dm::latency(args.latency_messages, args.body_bytes)?;
    }
    if !args.no_live {
        for subs in [1, 10, 100] {
            live::latency(subs, args.latency_messages, args.body_bytes, base)?;
        }
        live::fanout(10, args.fanout_messages, args.window, args.body_bytes, base)?;
        // Every 10th push dropped on purpose: backfill must recover all of them.
        live::fanout(
            10,
            args.fanout_messages,
            args.window,
            args.body_bytes,
            &[base, &["--fault-drop-push-every", "10"]].concat(),
        )?;
    }
    Ok(())
}

fn storage(args: &Args, node_args: &[&str]) -> anyhow::Result<()> {
    let ctx = zmq::Context::new();
    let node = start_node(node_args)?;
    let user = UserName::new("bench")?;
    let options = ClientOptions {
        timeout: Duration::from_secs(30),
        attempts: 1,
    };
    let mut client = node.client(&ctx, &user, options)?;
    client.join()?;
    let rss_empty = node.rss_kib()?;

    let started = Instant::now();
    for n in 0..args.sequential {
        client.send(body(n, args.body_bytes))?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{:<52} {:>10.0} /s",
        format!(
            "sequential acked sends, 1 client ({} msgs)",
            args.sequential
        ),
        args.sequential as f64 / secs
    );

    let windowed = args.replay.max(10_000).min(args.messages);
    let took = windowed_sends(&ctx, &node, &user, windowed, args.window, args.body_bytes)?;
    println!(
        "{:<52} {:>10.0} /s",
        format!("acked sends, {} in flight ({} msgs)", args.window, windowed),
        windowed as f64 / took.as_secs_f64()
    );
    let mut stored = args.sequential + windowed;
    let rss_100k = node.rss_kib()?;

    let started = Instant::now();
    let mut replayed = 0u64;
    let from = stored.saturating_sub(args.replay);
    client.for_each_page(HistoryQuery::AfterSeq(from), Some(1000), |page| {
        replayed += chat_messages(page);
        true
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{:<52} {:>10.0} /s",
        format!("history replay, pages of 1000 ({replayed} msgs)"),
        replayed as f64 / secs
    );

    if stored < args.messages {
        let rest = args.messages - stored;
        let took = windowed_sends(&ctx, &node, &user, rest, args.window, args.body_bytes)?;
        println!(
            "{:<52} {:>10.0} /s",
            format!("acked sends, {} in flight ({} msgs)", args.window, rest),
            rest as f64 / took.as_secs_f64()
        );
        stored = args.messages;
    }
    let rss_full = node.rss_kib()?;
    let mut all = 0u64;
    client.for_each_page(HistoryQuery::AfterSeq(0), Some(1000), |page| {
        all += chat_messages(page);
        true
    })?;
    let rss_after_replay = node.rss_kib()?;
    println!("{:<52} {:>10} KiB", "group-node RSS, empty log", rss_empty);
    println!(
        "{:<52} {:>10} KiB",
        format!("group-node RSS, {} msgs", args.sequential + windowed),
        rss_100k
    );
    println!(
        "{:<52} {:>10} KiB",
        format!("group-node RSS, {stored} msgs"),
        rss_full
    );
    println!(
        "{:<52} {:>10} KiB",
        format!("group-node RSS, after replaying all {all}"),
        rss_after_replay
    );
    if all != stored {
        bail!("replayed {all} messages, stored {stored}");
    }
    Ok(())
}
