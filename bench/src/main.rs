//! `agora-bench`: Agora side by side with NATS (JetStream on a file store) and Redis
//! (streams with AOF), with raw libzmq as the transport floor, on one machine in one run.
//!
//! It starts every server itself on ephemeral loopback ports (the Agora binaries from
//! beside this one, `nats-server` and `redis-server` from `PATH`), pins servers and
//! clients to separate CPUs with `taskset` where it can, runs each workload `--repeat`
//! times, and prints one Markdown table of medians with the ratio Agora/peer. The
//! workloads and what each side's durability setting means are in docs/PERFORMANCE.md.
//!
//! Run: `scripts/bench.sh` (installs the peer servers, builds release, runs this).
//! `--quick` is CI's smoke run: small sizes, and it fails on a wrong count or an Agora
//! loss, never on a timing. `--postgres` adds Agora storing in PostgreSQL (a throwaway
//! cluster the bench starts: `pg`) beside SQLite on workloads 2 and 5, and workload 9, the
//! failover time of an active/standby pair (`failover`). `--federation` measures many
//! groups on one machine: a group host against JetStream streams and one process per group,
//! and the registry holding them (`federation`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use agora_common::client::{ClientCurve, ClientOptions, GroupClient};
use agora_proto::action::call;
use agora_proto::codec::{decode_reply, encode_call};
use agora_proto::id::MessageId;
use agora_proto::wire::{SendAck, SendRequest, UserName};
use anyhow::{bail, Context};
use clap::Parser;
use serde_json::value::RawValue;

use table::{median, Better, Row};
use workload::{Fanout, Latency, Sizes};

mod agora;
mod dm;
mod failover;
mod federation;
mod floor;
mod follow_load;
mod live;
mod peers;
mod pg;
mod servers;
mod table;
mod web;
mod workload;

/// Benchmarks Agora against NATS, Redis and raw libzmq on loopback.
#[derive(Debug, Parser)]
#[command(name = "agora-bench", about)]
struct Args {
    /// CI's smoke run: every workload at small sizes, once; fails on a wrong count or an
    /// Agora loss, never on timings.
    #[arg(long)]
    quick: bool,
    /// Runs per workload; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(8..))]
    body_bytes: u64,
    /// Run Agora over CURVE (its default). Without it Agora runs `--insecure`, as the
    /// peers run without TLS.
    #[arg(long)]
    curve: bool,
    /// Only these workloads (1–9; repeatable; 9, failover, needs --postgres). Default: all,
    /// or none with --web.
    #[arg(long = "workload", value_parser = clap::value_parser!(u8).range(1..=9))]
    workloads: Vec<u8>,
    /// Agora only: skip the peers (no nats-server or redis-server needed).
    #[arg(long)]
    no_peers: bool,
    /// Also Agora storing in PostgreSQL (`group-node --store`) beside SQLite on the durable
    /// workloads (2, acked appends; 5, history), and workload 9, failover time of an
    /// active/standby pair. The bench starts a throwaway cluster itself (needs Debian's
    /// postgresql package; scripts/deps.sh --postgres).
    #[arg(long)]
    postgres: bool,
    /// Workload 8's file size, MiB (the figure is 1 GiB; its memory bound is checked
    /// at 4096).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    file_mib: u64,
    /// Also the direct-message measures (Agora only; over CURVE): stored and pushed DMs, and
    /// a broadcast to 10,000 accounts (200 with --quick) in recipients per second.
    #[arg(long)]
    dm: bool,
    /// The web gateway under load (Agora only; over CURVE): `--web-sessions` WebSocket
    /// sessions on one agora-web, all following one group, against as many user-cli feeds.
    /// Runs the numbered workloads only when `--workload` names them.
    #[arg(long)]
    web: bool,
    /// The web workload's concurrent WebSocket sessions (and baseline feeds).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    web_sessions: u64,
    /// The web workload's messages per phase of a round [default: 200, 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    web_messages: Option<u64>,
    /// The web workload's pace: one message sent every this long.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    web_interval: Duration,
    /// Many groups on one machine (issue 24): a group host holding 10,000 groups made
    /// through `create` (200 with --quick) beside JetStream holding as many streams and
    /// today's one process per group (100 nodes, 5 with --quick, scaled), and the registry
    /// holding them. Runs the numbered workloads only when `--workload` names them.
    #[arg(long)]
    federation: bool,
    /// The federation run's following users (each in 10 of 1,000 groups; with --quick, 5 of
    /// 20) [default: 2000, 40 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    federation_users: Option<u64>,
    /// The federation run's followers through one `common::live::Feed` each (a thread and
    /// a ZeroMQ context per user, user-cli's code) instead of the load generator (two
    /// threads, one context, a DEALER per user doing what a feed does on the wire).
    #[arg(long)]
    federation_feeds: bool,
    /// Of the federation run, measure only the followers (the other rows show `—`).
    #[arg(long)]
    federation_followers_only: bool,
    /// Internal: be the libzmq REP echo server of the transport floor.
    #[arg(long, hide = true)]
    serve_rep: bool,
    /// Internal: be workload 8's client (ENDPOINT KEY FILE SHA256; KEY `-` without CURVE),
    /// a process of its own so that its RSS is the client's.
    #[arg(long, hide = true, num_args = 4)]
    file_client: Option<Vec<String>>,
}

const NATS_JS: &str = "NATS JetStream, file store";
const REDIS_EVERYSEC: &str = "Redis stream, AOF everysec";
const REDIS_ALWAYS: &str = "Redis stream, AOF always";
const NATS_CORE: &str = "NATS core pub/sub (not stored)";
const REDIS_PUBSUB: &str = "Redis pub/sub (not stored)";
const ZMQ_PUBSUB: &str = "libzmq PUB/SUB (floor)";
/// The peer of a PostgreSQL row: the same workload on SQLite, in the same run.
const SQLITE: &str = "Agora, SQLite store (the row above)";
/// The suffix of a PostgreSQL row's workload.
const ON_POSTGRES: &str = "Agora on PostgreSQL (--store)";

/// The run: sizes, Agora's node arguments, the rows so far, and what failed.
struct Bench {
    sizes: Sizes,
    node_args: Vec<&'static str>,
    peers: bool,
    rows: Vec<Row>,
    failures: Vec<String>,
    /// The cluster of `--postgres`.
    postgres: Option<pg::Postgres>,
    /// Failover rounds whose log lost, duplicated or reordered an acked message: the run
    /// fails on any, `--quick` or not.
    integrity: Vec<String>,
}

impl Bench {
    /// Runs `f` `sizes.repeat` times; a failure is recorded (with `what`) and ends the
    /// repeats.
    fn runs<T>(&mut self, what: &str, mut f: impl FnMut() -> anyhow::Result<T>) -> Vec<T> {
        let mut out = Vec::new();
        for _ in 0..self.sizes.repeat {
            let started = Instant::now();
            let result = f();
            eprintln!(
                "agora-bench: {what}: {:.1} s",
                started.elapsed().as_secs_f64()
            );
            match result {
                Ok(v) => out.push(v),
                Err(e) => {
                    eprintln!("agora-bench: {what}: {e:#}");
                    self.failures.push(format!("{what}: {e:#}"));
                    break;
                }
            }
        }
        out
    }

    /// As [`Bench::runs`] for Agora storing in PostgreSQL: `f` gets the URL of a fresh
    /// database per run. Nothing without `--postgres`.
    fn pg_runs<T>(&mut self, what: &str, mut f: impl FnMut(&str) -> anyhow::Result<T>) -> Vec<T> {
        let Some(mut pg) = self.postgres.take() else {
            return Vec::new();
        };
        let out = self.runs(what, || f(&pg.database()?));
        self.postgres = Some(pg);
        out
    }

    /// As [`Bench::runs`] for a peer; nothing when the peers are off.
    fn peer_runs<T>(&mut self, what: &str, f: impl FnMut() -> anyhow::Result<T>) -> Vec<T> {
        if self.peers {
            self.runs(what, f)
        } else {
            Vec::new()
        }
    }

    fn row(
        &mut self,
        workload: impl Into<String>,
        unit: &'static str,
        better: Better,
        agora: Option<f64>,
        peers: Vec<(&'static str, Option<f64>)>,
    ) {
        self.rows.push(Row {
            workload: workload.into(),
            unit,
            better,
            agora,
            peers: if self.peers { peers } else { Vec::new() },
        });
    }

    fn latency_rows(
        &mut self,
        workload: &str,
        agora: &[Latency],
        peers: Vec<(&'static str, Vec<Latency>)>,
    ) {
        let p50 = |v: &[Latency]| median(v.iter().map(|l| l.p50_us).collect());
        let p99 = |v: &[Latency]| median(v.iter().map(|l| l.p99_us).collect());
        self.row(
            format!("{workload}, p50"),
            "µs",
            Better::Lower,
            p50(agora),
            peers.iter().map(|(p, v)| (*p, p50(v))).collect(),
        );
        self.row(
            format!("{workload}, p99"),
            "µs",
            Better::Lower,
            p99(agora),
            peers.iter().map(|(p, v)| (*p, p99(v))).collect(),
        );
    }
}

fn med(values: &[f64]) -> Option<f64> {
    median(values.to_vec())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(a) = &args.file_client {
        let [endpoint, key, src, digest] = a.as_slice() else {
            bail!("--file-client takes ENDPOINT KEY FILE SHA256");
        };
        let key = match key.as_str() {
            "-" => None,
            k => Some(k.parse()?),
        };
        let run = agora::file_client(endpoint, key, Path::new(src), digest.parse()?)?;
        println!("{}", serde_json::to_string(&run)?);
        return Ok(());
    }
    if args.serve_rep {
        return floor::serve_rep();
    }
    let missing = servers::missing_packages();
    if !missing.is_empty() && !args.no_peers {
        eprintln!(
            "agora-bench: missing Debian packages: {}. Install them (scripts/bench.sh does), \
             or run with --no-peers.",
            missing.join(" ")
        );
        std::process::exit(2);
    }
    let pinning = servers::pin_self();
    let bytes = args.body_bytes as usize;
    let sizes = if args.quick {
        Sizes::quick(bytes)
    } else {
        Sizes {
            file_bytes: args.file_mib << 20,
            ..Sizes::full(bytes, args.repeat as usize)
        }
    };
    let mut bench = Bench {
        sizes,
        node_args: if args.curve {
            Vec::new()
        } else {
            vec!["--insecure"]
        },
        peers: !args.no_peers,
        rows: Vec::new(),
        failures: Vec::new(),
        postgres: None,
        integrity: Vec::new(),
    };
    if args.workloads.contains(&9) && !args.postgres {
        eprintln!("agora-bench: workload 9 (failover) needs --postgres");
        std::process::exit(2);
    }
    if args.postgres {
        let pg = pg::Postgres::start()?;
        eprintln!("agora-bench: {}", pg.note);
        bench.postgres = Some(pg);
    }
    let all = args.workloads.is_empty() && !args.web && !args.federation;
    let wants = |w: u8| all || args.workloads.contains(&w);
    let mut losses = Vec::new();
    if wants(1) {
        request_reply(&mut bench);
    }
    if wants(2) {
        append(&mut bench);
    }
    if wants(3) {
        concurrent(&mut bench);
    }
    if wants(4) {
        losses = fanout(&mut bench);
    }
    if wants(5) {
        history(&mut bench);
    }
    if wants(6) {
        retention(&mut bench);
    }
    if wants(7) {
        memory(&mut bench);
    }
    if wants(8) {
        files(&mut bench);
    }
    if wants(9) && args.postgres {
        failover(&mut bench);
    }
    if args.dm {
        dm::stored(bench.sizes.lookups, bytes)?;
        dm::latency(bench.sizes.fanout_latency, bytes)?;
        dm::broadcast(bench.sizes.registry_groups, bytes)?;
    }
    if args.web {
        if let Some(n) = args.web_messages {
            bench.sizes.web_messages = n;
        }
        web(&mut bench, args.web_sessions as usize, args.web_interval);
    }
    if args.federation {
        let sizes = if args.quick {
            federation::FedSizes::quick()
        } else {
            federation::FedSizes::full()
        };
        let mut follow = if args.quick {
            federation::FollowSizes::quick()
        } else {
            federation::FollowSizes::full()
        };
        if let Some(users) = args.federation_users {
            follow.users = users;
        }
        follow.feeds = args.federation_feeds;
        losses.push(federation(
            &mut bench,
            &sizes,
            &follow,
            !args.federation_followers_only,
        ));
    }

    println!("{}", heading(&args, &bench, &pinning));
    for line in table::markdown(&bench.rows) {
        println!("{line}");
    }
    if !bench.failures.is_empty() {
        println!("\nFailed runs (their cells show —):");
        for f in &bench.failures {
            println!("- {f}");
        }
    }
    if !bench.integrity.is_empty() {
        println!("\nFailover rounds that lost, duplicated or reordered acked messages:");
        for f in &bench.integrity {
            println!("- {f}");
        }
        bail!(
            "{} failover rounds failed their log check",
            bench.integrity.len()
        );
    }
    let agora_lost: u64 = losses.iter().sum();
    if agora_lost > 0 {
        bail!("Agora lost {agora_lost} deliveries after backfill");
    }
    if args.quick && !bench.failures.is_empty() {
        bail!("{} runs failed", bench.failures.len());
    }
    Ok(())
}

fn heading(args: &Args, bench: &Bench, pinning: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = servers::machine_cpus();
    let version = |program: &str, flag: &str| {
        std::process::Command::new(program)
            .arg(flag)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "not found".into())
    };
    let (major, minor, patch) = zmq::version();
    let postgres = bench
        .postgres
        .as_ref()
        .map(|pg| format!("{}.\n", pg.note))
        .unwrap_or_default();
    format!(
        "agora-bench{}: {} cores ({cpu}); {pinning}; medians of {} run(s); bodies {} B.\n\
         Agora {} over {}{}; {}; {}; libzmq {major}.{minor}.{patch}.\n{postgres}",
        if args.quick { " --quick" } else { "" },
        cores,
        bench.sizes.repeat,
        bench.sizes.bytes,
        env!("CARGO_PKG_VERSION"),
        if args.curve {
            "CURVE"
        } else {
            "plain TCP (--insecure)"
        },
        match (args.web, args.federation) {
            (true, true) => " (the web and federation measures: CURVE)",
            (true, false) => " (the web workload: CURVE)",
            (false, true) => " (the federation measures: CURVE)",
            (false, false) => "",
        },
        servers::nats_program().map_or_else(
            || "nats-server not found".to_owned(),
            |p| version(&p.to_string_lossy(), "--version")
        ),
        version("redis-server", "--version"),
    )
}

/// Workload 1: request/reply latency.
fn request_reply(b: &mut Bench) {
    let (sizes, node) = (b.sizes.clone(), b.node_args.clone());
    let agora = b.runs("agora request/reply", || {
        agora::request_reply(&node, &sizes)
    });
    let nats = b.peer_runs("nats request/reply", || peers::nats_request_reply(&sizes));
    let redis = b.peer_runs("redis request/reply", || peers::redis_request_reply(&sizes));
    let zmq = b.peer_runs("zmq request/reply", || floor::request_reply(&sizes));
    b.latency_rows(
        &format!("1. request/reply, {} sequential `latest 1`", sizes.requests),
        &agora,
        vec![
            ("NATS JetStream direct get (last msg)", nats),
            ("Redis XREVRANGE COUNT 1", redis),
            ("libzmq REQ/REP echo (floor)", zmq),
        ],
    );
}

/// Workload 2: acked appends at 1 and 100 in flight.
fn append(b: &mut Bench) {
    let (sizes, node) = (b.sizes.clone(), b.node_args.clone());
    for (window, count) in [(1, sizes.append_one), (100, sizes.append_window)] {
        let bytes = sizes.bytes;
        let agora = b.runs("agora append", || {
            agora::append(&node, window, count, bytes)
        });
        let nats = b.peer_runs("nats append", || peers::nats_append(window, count, bytes));
        let everysec = b.peer_runs("redis everysec append", || {
            peers::redis_append("everysec", window, count, bytes)
        });
        let always = b.peer_runs("redis always append", || {
            peers::redis_append("always", window, count, bytes)
        });
        let mut peers = vec![
            (NATS_JS, med(&nats)),
            (REDIS_EVERYSEC, med(&everysec)),
            (REDIS_ALWAYS, med(&always)),
        ];
        let on_pg = b.pg_runs("agora append, postgres", |url| {
            agora::append(&with_store(&node, url), window, count, bytes)
        });
        let mut pg_peers = if b.peers { peers.clone() } else { Vec::new() };
        pg_peers.push((SQLITE, med(&agora)));
        if window == 1 && b.postgres.is_some() {
            let floor = b.pg_runs("pg store floor", |url| {
                pg::store_commit_rate(url, count, bytes)
            });
            pg_peers.push((
                "Agora's PgStore alone, in-process (storage floor)",
                med(&floor),
            ));
        }
        if window == 1 {
            let disk = b.runs("fdatasync floor", || floor::fsync_rate(count, bytes));
            peers.push(("append + fdatasync of a file (disk floor)", med(&disk)));
            let store = b.runs("store floor", || floor::store_commit_rate(count, bytes));
            peers.push((
                "Agora's store alone, in-process (storage floor)",
                med(&store),
            ));
        }
        b.row(
            format!("2. acked append, {window} in flight ({count} msgs)"),
            "msgs/s",
            Better::Higher,
            med(&agora),
            peers,
        );
        if b.postgres.is_some() {
            b.rows.push(Row {
                workload: format!(
                    "2. acked append, {window} in flight ({count} msgs), {ON_POSTGRES}"
                ),
                unit: "msgs/s",
                better: Better::Higher,
                agora: med(&on_pg),
                peers: pg_peers,
            });
        }
    }
}

/// `node` with `--store URL`.
fn with_store<'a>(node: &[&'a str], url: &'a str) -> Vec<&'a str> {
    let mut args = node.to_vec();
    args.extend(["--store", url]);
    args
}

/// Workload 3: fsync per write under concurrent clients.
fn concurrent(b: &mut Bench) {
    let (sizes, node) = (b.sizes.clone(), b.node_args.clone());
    let (clients, per, bytes) = (sizes.clients, sizes.per_client, sizes.bytes);
    let agora = b.runs("agora concurrent", || {
        agora::concurrent_clients(&node, clients, per, bytes)
    });
    let always = b.peer_runs("redis always concurrent", || {
        peers::redis_concurrent_clients("always", clients, per, bytes)
    });
    b.row(
        format!("3. fsync per write, {clients} clients × {per} appends"),
        "msgs/s",
        Better::Higher,
        med(&agora),
        vec![(REDIS_ALWAYS, med(&always))],
    );
}

/// Workload 4: fan-out throughput, loss and latency. Returns Agora's losses.
fn fanout(b: &mut Bench) -> Vec<u64> {
    let (sizes, node) = (b.sizes.clone(), b.node_args.clone());
    let mut agora_losses = Vec::new();
    for subs in [1, 10, 100] {
        for bytes in [sizes.bytes, sizes.large_bytes] {
            let n = sizes.fanout_messages(subs, bytes);
            let label = format!(
                "4. fan-out to {subs} sub(s), {}, {n} msgs",
                if bytes >= 1024 {
                    format!("{} KiB", bytes / 1024)
                } else {
                    format!("{bytes} B")
                }
            );
            let agora = b.runs("agora fan-out", || agora::fanout(&node, subs, n, bytes));
            let nats = b.peer_runs("nats fan-out", || peers::nats_fanout(subs, n, bytes));
            let redis = b.peer_runs("redis fan-out", || peers::redis_fanout(subs, n, bytes));
            let zmq = b.peer_runs("zmq fan-out", || floor::fanout(subs, n, bytes));
            agora_losses.extend(agora.iter().map(|f| f.lost));
            let rate = |v: &[Fanout]| median(v.iter().map(|f| f.delivered_per_s).collect());
            let lost = |v: &[Fanout]| median(v.iter().map(|f| f.lost as f64).collect());
            b.row(
                format!("{label}: delivered"),
                "deliveries/s",
                Better::Higher,
                rate(&agora),
                vec![
                    (NATS_CORE, rate(&nats)),
                    (REDIS_PUBSUB, rate(&redis)),
                    (ZMQ_PUBSUB, rate(&zmq)),
                ],
            );
            b.row(
                format!(
                    "{label}: lost (of {}; Agora after backfill)",
                    n * subs as u64
                ),
                "deliveries",
                Better::Lower,
                lost(&agora),
                vec![
                    (NATS_CORE, lost(&nats)),
                    (REDIS_PUBSUB, lost(&redis)),
                    (ZMQ_PUBSUB, lost(&zmq)),
                ],
            );
            let m = sizes.latency_messages(bytes);
            let agora = b.runs("agora fan-out latency", || {
                agora::fanout_latency(&node, subs, m, bytes)
            });
            let nats = b.peer_runs("nats fan-out latency", || {
                peers::nats_fanout_latency(subs, m, bytes)
            });
            let redis = b.peer_runs("redis fan-out latency", || {
                peers::redis_fanout_latency(subs, m, bytes)
            });
            let zmq = b.peer_runs("zmq fan-out latency", || {
                floor::fanout_latency(subs, m, bytes)
            });
            b.latency_rows(
                &format!("{label}: send→deliver"),
                &agora,
                vec![(NATS_CORE, nats), (REDIS_PUBSUB, redis), (ZMQ_PUBSUB, zmq)],
            );
        }
    }
    agora_losses
}

/// Workload 5: history on a log of `sizes.history` messages.
fn history(b: &mut Bench) {
    let (sizes, node) = (b.sizes.clone(), b.node_args.clone());
    let agora = b.runs("agora history", || agora::history(&node, &sizes));
    let on_pg = b.pg_runs("agora history, postgres", |url| {
        agora::history(&with_store(&node, url), &sizes)
    });
    let nats = b.peer_runs("nats history", || peers::nats_history(&sizes));
    let redis = b.peer_runs("redis history", || peers::redis_history(&sizes));
    let n = sizes.history;
    type Pick = fn(&workload::History) -> f64;
    let rows: [(String, &'static str, Pick); 4] = [
        (
            format!("5. history of {n}: replay by time (newest half), pages of 1000"),
            "msgs/s",
            |h| h.by_time,
        ),
        (
            format!("5. history of {n}: {} lookups by id", sizes.lookups),
            "lookups/s",
            |h| h.by_id,
        ),
        (
            format!("5. history of {n}: newest 1000, repeated"),
            "msgs/s",
            |h| h.latest,
        ),
        (
            format!("5. history of {n}: all, pages of 1000"),
            "msgs/s",
            |h| h.all,
        ),
    ];
    for (label, unit, pick) in rows {
        let m = |v: &[workload::History]| median(v.iter().map(pick).collect());
        let peers = vec![
            ("NATS JetStream consumer / direct get", m(&nats)),
            ("Redis XRANGE / XREVRANGE", m(&redis)),
        ];
        let mut pg_peers = if b.peers { peers.clone() } else { Vec::new() };
        pg_peers.push((SQLITE, m(&agora)));
        b.row(label.clone(), unit, Better::Higher, m(&agora), peers);
        if b.postgres.is_some() {
            b.rows.push(Row {
                workload: format!("{label}, {ON_POSTGRES}"),
                unit,
                better: Better::Higher,
                agora: m(&on_pg),
                peers: pg_peers,
            });
        }
    }
}

/// Workload 9: failover time of an active/standby pair on PostgreSQL, per setting (see
/// [`mod@failover`]); `sizes.repeat` rounds each.
fn failover(b: &mut Bench) {
    let Some(mut pg) = b.postgres.take() else {
        return;
    };
    let rounds = b.sizes.repeat;
    for setting in failover::settings() {
        let mut got = Vec::new();
        for n in 1..=rounds {
            let started = Instant::now();
            let result = pg
                .database()
                .and_then(|url| failover::round(&url, &setting, b.sizes.bytes));
            let took = started.elapsed().as_secs_f64();
            let what = format!("failover round {n}, {}", setting.label);
            match result {
                Ok(r) => {
                    eprintln!(
                        "agora-bench: {what}: {took:.1} s; from the kill: lease taken {} ms, \
                         standby listening {} ms, first ack {} ms; {} failed attempts after \
                         the kill, {} before it",
                        r.to_lease.as_millis(),
                        r.to_listening.as_millis(),
                        r.to_ack.as_millis(),
                        r.retries,
                        r.spurious
                    );
                    got.push(r);
                }
                Err(e) => {
                    eprintln!("agora-bench: {what}: {e:#}");
                    if e.is::<failover::Integrity>() {
                        b.integrity.push(format!("{what}: {e:#}"));
                    } else {
                        b.failures.push(format!("{what}: {e:#}"));
                    }
                    break;
                }
            }
        }
        let ms = |f: fn(&failover::Round) -> Duration| -> Vec<f64> {
            got.iter().map(|r| f(r).as_secs_f64() * 1e3).collect()
        };
        let max = |v: Vec<f64>| v.into_iter().reduce(f64::max);
        let label = format!("9. failover ({})", setting.label);
        b.row(
            format!(
                "{label}: kill -9 of the active → first ack from the standby, median of {} \
                 (target ≤ 3,000)",
                got.len()
            ),
            "ms",
            Better::Lower,
            median(ms(|r| r.to_ack)),
            Vec::new(),
        );
        b.row(
            format!("{label}: the same, max of {}", got.len()),
            "ms",
            Better::Lower,
            max(ms(|r| r.to_ack)),
            Vec::new(),
        );
        b.row(
            format!("{label}: kill -9 → the standby took the lease, median"),
            "ms",
            Better::Lower,
            median(ms(|r| r.to_lease)),
            Vec::new(),
        );
        b.row(
            format!("{label}: kill -9 → the standby printed its endpoint, median"),
            "ms",
            Better::Lower,
            median(ms(|r| r.to_listening)),
            Vec::new(),
        );
        b.row(
            format!("{label}: client timeouts on the live active before the kill, total"),
            "attempts",
            Better::Lower,
            (!got.is_empty()).then(|| got.iter().map(|r| r.spurious as f64).sum()),
            Vec::new(),
        );
    }
    b.postgres = Some(pg);
}

/// Workload 6: appends into a capped log.
fn retention(b: &mut Bench) {
    let (sizes, node) = (b.sizes.clone(), b.node_args.clone());
    let agora = b.runs("agora retention", || agora::retention(&node, &sizes));
    let nats = b.peer_runs("nats retention", || peers::nats_retention(&sizes));
    let redis = b.peer_runs("redis retention", || peers::redis_retention(&sizes));
    b.row(
        format!(
            "6. appends into a log capped at {}, 100 in flight ({} msgs)",
            sizes.retention_cap, sizes.retention_sends
        ),
        "msgs/s",
        Better::Higher,
        med(&agora),
        vec![
            ("NATS JetStream max_msgs", med(&nats)),
            ("Redis XADD MAXLEN = (everysec)", med(&redis)),
        ],
    );
}

/// Workload 8: a file up to a node and back; the disk floor writes and fsyncs as many bytes.
fn files(b: &mut Bench) {
    let (sizes, node) = (b.sizes.clone(), b.node_args.clone());
    // One run of each side per round, not all of one side first: on a VM the first touch of
    // memory (the page cache these runs fill with gigabytes) costs several times what later
    // touches do, and the side run first would get the coldest memory.
    b.sizes.repeat = 1;
    let (mut runs, mut nats, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..sizes.repeat {
        runs.extend(b.runs("agora file transfer", || {
            agora::file_transfer(&node, sizes.file_bytes)
        }));
        nats.extend(b.peer_runs("nats object store", || {
            peers::nats_object_store(sizes.file_bytes)
        }));
        floor.extend(b.peer_runs("disk floor, file", || {
            floor::file_write_fsync(sizes.file_bytes)
        }));
    }
    b.sizes.repeat = sizes.repeat;
    let mib = sizes.file_bytes >> 20;
    let pick = |v: &[(f64, f64)], up: bool| {
        med(&v
            .iter()
            .map(|n| if up { n.0 } else { n.1 })
            .collect::<Vec<_>>())
    };
    b.row(
        format!("8. a {mib} MiB file up (chunks of 256 KiB, 8 in flight)"),
        "MB/s",
        Better::Higher,
        med(&runs.iter().map(|r| r.up_mb_s).collect::<Vec<_>>()),
        vec![
            ("NATS Object Store put (file store)", pick(&nats, true)),
            ("write + fsync of a file (disk floor)", med(&floor)),
        ],
    );
    b.row(
        format!("8. the {mib} MiB file down (ranges of 1 MiB, 8 in flight)"),
        "MB/s",
        Better::Higher,
        med(&runs.iter().map(|r| r.down_mb_s).collect::<Vec<_>>()),
        vec![("NATS Object Store get", pick(&nats, false))],
    );
    b.row(
        format!("8. group-node peak RSS over the {mib} MiB transfer"),
        "KiB",
        Better::Lower,
        med(&runs
            .iter()
            .map(|r| r.node_peak_kib as f64)
            .collect::<Vec<_>>()),
        Vec::new(),
    );
    b.row(
        format!("8. client process peak RSS over the {mib} MiB transfer"),
        "KiB",
        Better::Lower,
        med(&runs
            .iter()
            .map(|r| r.client_peak_kib as f64)
            .collect::<Vec<_>>()),
        Vec::new(),
    );
}

/// Workload 7: server memory, read once (not repeated).
fn memory(b: &mut Bench) {
    let (sizes, node) = (b.sizes.clone(), b.node_args.clone());
    let saved = b.sizes.repeat;
    b.sizes.repeat = 1;
    let points = sizes.memory_points.clone();
    let agora = b.runs("agora memory", || {
        agora::node_memory(&node, &points, sizes.bytes)
    });
    let nats = b.peer_runs("nats memory", || peers::nats_memory(&points, sizes.bytes));
    let redis = b.peer_runs("redis memory", || peers::redis_memory(&points, sizes.bytes));
    let at = |v: &[Vec<u64>], i: usize| v.first().and_then(|r| r.get(i)).map(|k| *k as f64);
    let mut labels = vec!["empty".to_owned()];
    labels.extend(points.iter().map(|p| format!("{p} msgs")));
    for (i, label) in labels.iter().enumerate() {
        b.row(
            format!("7. server RSS, {label}"),
            "KiB",
            Better::Lower,
            at(&agora, i),
            vec![
                ("nats-server (JetStream file)", at(&nats, i)),
                ("redis-server (stream)", at(&redis, i)),
            ],
        );
    }
    b.row(
        format!(
            "7. group-node RSS after replaying all {}",
            points.last().copied().unwrap_or(0)
        ),
        "KiB",
        Better::Lower,
        at(&agora, labels.len()),
        Vec::new(),
    );
    let groups = sizes.registry_groups;
    let reg = b.runs("registry memory", || agora::registry_memory(groups));
    b.row(
        format!("7. registry RSS with {groups} groups"),
        "KiB",
        Better::Lower,
        reg.first().map(|k| *k as f64),
        Vec::new(),
    );
    b.sizes.repeat = saved;
}

/// The web gateway: send→deliver through `sessions` WebSocket sessions on one agora-web
/// against user-cli's path (as many `common::live` feeds), and the gateway's memory.
fn web(b: &mut Bench, sessions: usize, interval: Duration) {
    // Each session holds a WebSocket and a few ZeroMQ sockets in the gateway; the baseline's
    // feeds as many in this process.
    let needed = 16 * sessions as u64 + 1024;
    let limit = web::raise_open_files(needed);
    if limit < needed {
        eprintln!("agora-bench: web: open files limited to {limit} (wanted {needed})");
    }
    let mut stage = match web::Stage::start(sessions) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agora-bench: web: {e:#}");
            b.failures.push(format!("web setup: {e:#}"));
            return;
        }
    };
    let (messages, bytes) = (b.sizes.web_messages, b.sizes.bytes);
    let mut n = 0;
    let rounds = b.runs("web gateway and baseline", || {
        n += 1;
        stage.round(n % 2 == 1, messages, bytes, interval)
    });
    let peak = stage.gateway_peak_rss_kib().ok();
    drop(stage);
    let label = format!(
        "web. {sessions} session(s) in one group, one msg every {} ms",
        interval.as_millis()
    );
    let mut failed = Vec::new();
    for r in &rounds {
        if let Err(e) = &r.gateway {
            if !failed.contains(e) {
                failed.push(e.clone());
            }
        }
    }
    b.failures
        .extend(failed.iter().map(|e| format!("web gateway phase: {e}")));
    let pick = |f: fn(&web::Round) -> f64| median(rounds.iter().map(f).collect());
    let gateway = |f: fn(&web::GatewayRound) -> f64| {
        median(
            rounds
                .iter()
                .filter_map(|r| r.gateway.as_ref().ok())
                .map(f)
                .collect(),
        )
    };
    // The baseline is Agora's own, not a peer's: shown with or without --no-peers.
    let baseline = "user-cli's path: common::live feeds";
    for (name, through, base) in [
        (
            "send→deliver through agora-web, p50",
            gateway(|g| g.latency.p50_us),
            pick(|r| r.baseline.p50_us),
        ),
        (
            "send→deliver through agora-web, p99",
            gateway(|g| g.latency.p99_us),
            pick(|r| r.baseline.p99_us),
        ),
    ] {
        b.rows.push(Row {
            workload: format!("{label}: {name}"),
            unit: "µs",
            better: Better::Lower,
            agora: through,
            peers: vec![(baseline, base)],
        });
    }
    // Per round, then the median: both phases of a round ran on the same machine state.
    let added: Vec<f64> = rounds
        .iter()
        .filter_map(|r| {
            let g = r.gateway.as_ref().ok()?;
            Some(g.latency.p50_us - r.baseline.p50_us)
        })
        .collect();
    b.row(
        format!("{label}: agora-web's added p50 (target ≤ 1,000)"),
        "µs",
        Better::Lower,
        median(added),
        Vec::new(),
    );
    b.rows.push(Row {
        workload: format!("{label}: CPU per delivery, agora-web"),
        unit: "µs",
        better: Better::Lower,
        agora: gateway(|g| g.cpu_us),
        peers: vec![(
            "the baseline's feeds (this process)",
            pick(|r| r.baseline_clients_cpu_us),
        )],
    });
    b.row(
        format!("{label}: CPU per delivery, the WebSocket clients (this process)"),
        "µs",
        Better::Lower,
        gateway(|g| g.clients_cpu_us),
        Vec::new(),
    );
    b.rows.push(Row {
        workload: format!("{label}: CPU per delivery, group-node, gateway phase"),
        unit: "µs",
        better: Better::Lower,
        agora: gateway(|g| g.node_cpu_us),
        peers: vec![("baseline phase", pick(|r| r.baseline_node_cpu_us))],
    });
    b.rows.push(Row {
        workload: format!("web. {sessions} session(s) following, nothing sent: CPU, agora-web"),
        unit: "% of a core",
        better: Better::Lower,
        agora: gateway(|g| g.idle_pct.0),
        peers: vec![(
            "the baseline's feeds (this process)",
            pick(|r| r.baseline_idle_pct.0),
        )],
    });
    b.rows.push(Row {
        workload: format!("web. {sessions} session(s) following, nothing sent: CPU, group-node"),
        unit: "% of a core",
        better: Better::Lower,
        agora: gateway(|g| g.idle_pct.1),
        peers: vec![("baseline phase", pick(|r| r.baseline_idle_pct.1))],
    });
    b.row(
        "web. agora-web RSS before the sessions open",
        "KiB",
        Better::Lower,
        gateway(|g| g.rss_before_kib as f64),
        Vec::new(),
    );
    b.row(
        format!("web. agora-web RSS, {sessions} session(s) following (target ≤ 262,144)"),
        "KiB",
        Better::Lower,
        gateway(|g| g.rss_following_kib as f64),
        Vec::new(),
    );
    b.row(
        format!("{label}: agora-web's largest RSS while sending"),
        "KiB",
        Better::Lower,
        gateway(|g| g.rss_max_kib as f64),
        Vec::new(),
    );
    b.row(
        "web. agora-web peak RSS over the run (VmHWM, or the largest VmRSS seen)",
        "KiB",
        Better::Lower,
        peak.map(|k| k as f64),
        Vec::new(),
    );
}

/// The federation measures (`--federation`), once each: a group host with N groups beside
/// JetStream with N streams and N single-group nodes (scaled from a few), and the registry
/// with N groups; then users following groups of one host while messages are sent. Targets
/// (issue 24) are in the rows' names. Returns the deliveries lost. Without `all`, only the
/// followers are measured.
fn federation(
    b: &mut Bench,
    sizes: &federation::FedSizes,
    follow: &federation::FollowSizes,
    all: bool,
) -> u64 {
    let saved = b.sizes.repeat;
    b.sizes.repeat = 1;
    let n = sizes.groups;
    let host = match all {
        true => b.runs("federation: group host", || federation::host(sizes)),
        false => Vec::new(),
    };
    let js = match all {
        true => b.peer_runs("federation: JetStream streams", || {
            federation::jetstream(sizes)
        }),
        false => Vec::new(),
    };
    let off = match all {
        true => b.runs("federation: single-group nodes, WAL prealloc off", || {
            federation::single_nodes(sizes, false)
        }),
        false => Vec::new(),
    };
    let on = match all {
        true => b.runs("federation: single-group nodes, WAL prealloc on", || {
            federation::single_nodes(sizes, true)
        }),
        false => Vec::new(),
    };
    let reg = match all {
        true => b.runs("federation: registry", || federation::registry(sizes)),
        false => Vec::new(),
    };
    let fol = b.runs("federation: users following groups", || {
        federation::followers(follow)
    });
    b.sizes.repeat = saved;
    let fol = fol.first().copied();
    let host = host.first().copied();
    let js = js.first().copied();
    let (off, on) = (off.first().copied(), on.first().copied());
    let reg = reg.first().copied();
    const JS: &str = "JetStream, one file-store stream per group";
    const OFF: &str = "one group-node per group, --wal-prealloc 0";
    const ON: &str = "one group-node per group, WAL zero-filled (default)";
    let peers = b.peers;
    let mut push = |workload: String,
                    unit: &'static str,
                    better: Better,
                    agora: Option<f64>,
                    js_value: Option<Option<f64>>,
                    others: Vec<(&'static str, Option<f64>)>| {
        let mut row_peers = Vec::new();
        if let (true, Some(v)) = (peers, js_value) {
            row_peers.push((JS, v));
        }
        row_peers.extend(others);
        b.rows.push(Row {
            workload,
            unit,
            better,
            agora,
            peers: row_peers,
        });
    };
    let singles = |f: fn(&federation::Singles) -> f64| {
        vec![(OFF, off.as_ref().map(f)), (ON, on.as_ref().map(f))]
    };
    push(
        match host.map(|h| h.made) {
            Some(federation::Made::AtStart(_)) => format!(
                "fed. {n} groups made at the host's start (`--group`: this group-node has no \
                 `create`)"
            ),
            _ => format!(
                "fed. {n} groups made on one group host by `create`, {} in flight",
                sizes.in_flight
            ),
        },
        "groups/s",
        Better::Higher,
        host.map(|h| h.scale.create_per_s),
        Some(js.map(|j| j.create_per_s)),
        Vec::new(),
    );
    push(
        format!("fed. RSS per idle group, host with {n} (target ≤ 64)"),
        "KiB",
        Better::Lower,
        host.map(|h| h.scale.rss_kib),
        Some(js.map(|j| j.rss_kib)),
        singles(|s| s.rss_kib),
    );
    push(
        format!("fed. disk per idle group, host with {n} (target ≤ 64)"),
        "KiB",
        Better::Lower,
        host.map(|h| h.scale.disk_kib),
        Some(js.map(|j| j.disk_kib)),
        singles(|s| s.disk_kib),
    );
    push(
        format!("fed. database per idle group after a clean stop, host with {n}"),
        "KiB",
        Better::Lower,
        host.map(|h| h.db_kib),
        None,
        Vec::new(),
    );
    push(
        "fed. the host's data directory before any group (its WAL zero-filled)".into(),
        "KiB",
        Better::Lower,
        host.map(|h| h.disk_empty_kib),
        None,
        Vec::new(),
    );
    push(
        format!("fed. threads per group, host with {n}"),
        "threads",
        Better::Lower,
        host.map(|h| h.threads as f64 / n.max(1) as f64),
        None,
        vec![(OFF, off.map(|s| s.threads))],
    );
    push(
        format!("fed. host threads with {n} groups"),
        "threads",
        Better::Lower,
        host.map(|h| h.threads as f64),
        None,
        Vec::new(),
    );
    push(
        format!("fed. CPU of {n} idle groups, nobody connected"),
        "% of a core",
        Better::Lower,
        host.map(|h| h.idle_cpu_pct),
        None,
        vec![(
            "one group-node per group, scaled to N",
            off.map(|s| s.idle_cpu_pct * n as f64),
        )],
    );
    push(
        format!("fed. host RSS with {n} idle groups"),
        "KiB",
        Better::Lower,
        host.map(|h| h.rss_kib as f64),
        None,
        Vec::new(),
    );
    push(
        format!("fed. kill -9 and restart → all {n} groups answer `info` (target ≤ 5,000)"),
        "ms",
        Better::Lower,
        host.map(|h| h.restart.as_secs_f64() * 1e3),
        None,
        Vec::new(),
    );
    push(
        format!("fed. registry: {n} groups of one host by `register_groups`"),
        "groups/s",
        Better::Higher,
        reg.map(|r| r.register_per_s),
        None,
        Vec::new(),
    );
    push(
        format!("fed. registry: `list` of {n} groups"),
        "ms",
        Better::Lower,
        reg.map(|r| r.list_ms),
        None,
        Vec::new(),
    );
    push(
        format!(
            "fed. registry CPU with {n} groups, one `heartbeat_host` each interval (target ≤ 2)"
        ),
        "% of a core",
        Better::Lower,
        reg.map(|r| r.idle_cpu_pct),
        None,
        Vec::new(),
    );
    push(
        format!("fed. registry RSS with {n} groups of one host"),
        "KiB",
        Better::Lower,
        reg.map(|r| r.rss_kib as f64),
        None,
        Vec::new(),
    );
    let label = format!(
        "fed. {} users (own CURVE keys{}) following {} of {} groups, {} msg/s for {} s",
        follow.users,
        if follow.feeds {
            ", a live::Feed each"
        } else {
            ", load generator"
        },
        follow.per_user,
        follow.groups,
        follow.rate,
        follow.send_for.as_secs()
    );
    type Measure = (
        &'static str,
        &'static str,
        fn(&federation::FollowRun) -> f64,
    );
    push(
        format!("{label}: sends acked per second"),
        "msgs/s",
        Better::Higher,
        fol.as_ref().map(|f| f.ack_per_s),
        None,
        Vec::new(),
    );
    let measures: [Measure; 9] = [
        ("feeds' start → all subscribed", "ms", |f| {
            f.subscribe_time.as_secs_f64() * 1e3
        }),
        ("send → each follower, p50", "µs", |f| f.latency.p50_us),
        (
            "send → each follower, p99 (target ≤ 50,000)",
            "µs",
            |f| f.latency.p99_us,
        ),
        ("deliveries", "deliveries", |f| f.expected as f64),
        ("lost (target 0)", "deliveries", |f| f.lost as f64),
        (
            "host CPU, following, nothing sent (target ≤ 2)",
            "% of a core",
            |f| f.host_idle_pct,
        ),
        (
            "registry CPU, following, nothing sent",
            "% of a core",
            |f| f.registry_idle_pct,
        ),
        ("host CPU while sending", "% of a core", |f| f.host_busy_pct),
        ("registry CPU while sending", "% of a core", |f| {
            f.registry_busy_pct
        }),
    ];
    for (what, unit, f) in measures {
        push(
            format!("{label}: {what}"),
            unit,
            Better::Lower,
            fol.as_ref().map(f),
            None,
            Vec::new(),
        );
    }
    match fol {
        Some(f) if f.acked < f.sent => {
            b.failures.push(format!(
                "followers: {} of {} sends acked (the host fell behind {} msg/s; deliveries \
                 of unacked sends are not counted as lost)",
                f.acked, f.sent, follow.rate
            ));
            0
        }
        Some(f) => f.lost,
        None => 0,
    }
}

/// A running `group-node` process (killed on drop).
pub(crate) struct NodeProc {
    child: Child,
    pub(crate) endpoint: String,
    /// The node's CURVE public key, as it printed it (`None` for an `--insecure` node).
    pub(crate) key: Option<agora_common::keys::PublicKey>,
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

    /// The node's resident memory, KiB.
    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        servers::rss_kib(self.child.id())
    }

    /// The node's peak resident memory so far, KiB.
    pub(crate) fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        servers::peak_rss_kib(self.child.id())
    }
}

/// Starts the binary `name` beside this one (on the servers' CPU) with `args` and a
/// temporary data directory (`--data-dir`), and returns it with the words of its
/// `listening …` line.
pub(crate) fn spawn_server(
    name: &str,
    args: &[&str],
) -> anyhow::Result<(Child, Vec<String>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let (child, words) = spawn_server_in(name, args, dir.path())?;
    Ok((child, words, dir))
}

/// As [`spawn_server`], in the data directory `dir` (kept by the caller: a restart finds
/// what the last run left).
pub(crate) fn spawn_server_in(
    name: &str,
    args: &[&str],
    dir: &Path,
) -> anyhow::Result<(Child, Vec<String>)> {
    let bin: PathBuf = std::env::current_exe()?.with_file_name(name);
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release --bins` first",
            bin.display()
        );
    }
    let mut child = servers::server_command(&bin)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env(
            "RUST_LOG",
            std::env::var("AGORA_BENCH_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    let read = child
        .stdout
        .take()
        .context("stdout")
        .and_then(|out| Ok(BufReader::new(out).read_line(&mut line)?));
    if read.is_err() || line.is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{name} exited before printing its endpoint");
    }
    let words = line.split_whitespace().map(str::to_owned).collect();
    Ok((child, words))
}

/// Starts the release `group-node` beside this binary on a free loopback port, with `extra`
/// arguments, in a temporary data directory. The per-peer rate limit is off: the bench
/// measures throughput, and one bench client sends far more than a person would.
pub(crate) fn start_node(extra: &[&str]) -> anyhow::Result<NodeProc> {
    let mut args = vec!["--no-registry"];
    args.extend_from_slice(extra);
    spawn_node(&args)
}

/// As [`start_node`], registered with the registry `extra` names (`--registry E
/// --registry-key K`).
pub(crate) fn spawn_node(extra: &[&str]) -> anyhow::Result<NodeProc> {
    let mut args = vec!["bench", "127.0.0.1:0", "--rate-limit", "0"];
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
            let frames = encode_call::<call::Send>(&SendRequest {
                group: None,
                user: user.clone(),
                body: body(sent, bytes),
                id: Some(MessageId::new_v7()),
                attachment: None,
            });
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
