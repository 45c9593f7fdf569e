//! The workloads against the real Agora servers (`group-node`, `registry`), through the
//! client code user-cli runs (`common::client`, `common::live`).

use std::time::{Duration, Instant};

use agora_common::client::ClientOptions;
use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::{EntryKind, HistoryQuery, UserName};
use anyhow::{bail, Context};

use crate::workload::{Fanout, FileRun, History, Latency, Sizes};
use crate::{body, start_node, windowed_sends};

fn options() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(30),
        attempts: 1,
    }
}

/// Workload 1: sequential `get_messages latest 1` on a one-message log.
pub fn request_reply(node_args: &[&str], sizes: &Sizes) -> anyhow::Result<Latency> {
    let ctx = zmq::Context::new();
    let node = start_node(node_args)?;
    let user = UserName::new("bench")?;
    let mut client = node.client(&ctx, &user, options())?;
    client.join()?;
    client.send(body(0, sizes.bytes))?;
    let mut samples = Vec::with_capacity(sizes.requests as usize);
    for _ in 0..sizes.requests {
        let t = Instant::now();
        let page = client.get_messages(HistoryQuery::Latest(1), None)?;
        samples.push(t.elapsed());
        if page.messages.len() != 1 {
            bail!("latest 1 gave {} messages", page.messages.len());
        }
    }
    Ok(Latency::of(samples))
}

/// Workload 2: `count` acked appends with `window` in flight (1: one client waiting for
/// each ack), each acked after its commit (fsync). Messages per second.
pub fn append(node_args: &[&str], window: usize, count: u64, bytes: usize) -> anyhow::Result<f64> {
    let ctx = zmq::Context::new();
    let node = start_node(node_args)?;
    let user = UserName::new("bench")?;
    let mut client = node.client(&ctx, &user, options())?;
    client.join()?;
    let took = if window == 1 {
        let t = Instant::now();
        for n in 0..count {
            client.send(body(n, bytes))?;
        }
        t.elapsed()
    } else {
        windowed_sends(&ctx, &node, &user, count, window, bytes)?
    };
    Ok(count as f64 / took.as_secs_f64())
}

/// Workload 3: `clients` clients, each on its own connection and thread, each sending
/// `per_client` messages one at a time (each waits for its ack after fsync). Total
/// messages per second.
pub fn concurrent_clients(
    node_args: &[&str],
    clients: usize,
    per_client: u64,
    bytes: usize,
) -> anyhow::Result<f64> {
    let ctx = zmq::Context::new();
    let node = start_node(node_args)?;
    let connections = (0..clients)
        .map(|i| {
            let user = UserName::new(format!("c{i}"))?;
            let mut client = node.client(&ctx, &user, options())?;
            client.join()?;
            Ok((client, per_client, bytes))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let took = crate::workload::concurrently(connections, |(mut client, per_client, bytes)| {
        for n in 0..per_client {
            client.send(body(n, bytes))?;
        }
        Ok(())
    })?;
    Ok((clients as u64 * per_client) as f64 / took.as_secs_f64())
}

/// Workload 4, throughput: see [`crate::live::fanout`].
pub fn fanout(
    node_args: &[&str],
    subscribers: usize,
    messages: u64,
    bytes: usize,
) -> anyhow::Result<Fanout> {
    crate::live::fanout(subscribers, messages, 100, bytes, node_args)
}

/// Workload 4, latency: see [`crate::live::latency`].
pub fn fanout_latency(
    node_args: &[&str],
    subscribers: usize,
    messages: u64,
    bytes: usize,
) -> anyhow::Result<Latency> {
    crate::live::latency(subscribers, messages, bytes, node_args)
}

/// Workload 5 on a log of `sizes.history` messages: replay from the time of the middle
/// message, lookups by id, the newest page of 1000, and the whole log, in pages of 1000.
pub fn history(node_args: &[&str], sizes: &Sizes) -> anyhow::Result<History> {
    let ctx = zmq::Context::new();
    let node = start_node(node_args)?;
    let user = UserName::new("bench")?;
    let mut client = node.client(&ctx, &user, options())?;
    client.join()?;
    windowed_sends(&ctx, &node, &user, sizes.history, 100, sizes.bytes)?;
    // An untimed pass collects the ids and times (every peer gets the same warm-up).
    let mut index: Vec<(MessageId, Timestamp)> = Vec::with_capacity(sizes.history as usize);
    client.for_each_page(HistoryQuery::AfterSeq(0), Some(1000), |page| {
        index.extend(
            page.messages
                .iter()
                .filter(|m| m.kind == EntryKind::Message)
                .map(|m| (m.id, m.time)),
        );
        true
    })?;
    if index.len() as u64 != sizes.history {
        bail!("stored {} of {} messages", index.len(), sizes.history);
    }
    let half = index.len() / 2;
    let mut replay = |query: HistoryQuery, expect: u64| -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut got = 0u64;
        client.for_each_page(query, Some(1000), |page| {
            got += page
                .messages
                .iter()
                .filter(|m| m.kind == EntryKind::Message)
                .count() as u64;
            true
        })?;
        let secs = t.elapsed().as_secs_f64();
        if got != expect {
            bail!("replay {query:?} gave {got} messages, expected {expect}");
        }
        Ok(got as f64 / secs)
    };
    let by_time = replay(
        HistoryQuery::Since(index[half].1),
        (index.len() - half) as u64,
    )?;
    let all = replay(HistoryQuery::AfterSeq(0), index.len() as u64)?;

    let mut rng = fastrand::Rng::with_seed(7);
    let t = Instant::now();
    for _ in 0..sizes.lookups {
        let (id, _) = index[rng.usize(..index.len())];
        let page = client.get_messages(HistoryQuery::ById(id), None)?;
        if page.messages.first().map(|m| m.id) != Some(id) {
            bail!("lookup by id {id} missed");
        }
    }
    let by_id = sizes.lookups as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    for _ in 0..sizes.latest_pages {
        let page = client.get_messages(HistoryQuery::Latest(1000), Some(1000))?;
        if page.messages.len() != 1000.min(index.len() + 1) {
            bail!("latest 1000 gave {}", page.messages.len());
        }
    }
    let latest = (sizes.latest_pages * 1000) as f64 / t.elapsed().as_secs_f64();
    Ok(History {
        by_time,
        by_id,
        latest,
        all,
    })
}

/// Workload 6: `sizes.retention_sends` appends, 100 in flight, into a group capped at
/// `sizes.retention_cap` entries (`--max-messages`); returns messages per second after
/// checking the log holds exactly the cap.
pub fn retention(node_args: &[&str], sizes: &Sizes) -> anyhow::Result<f64> {
    let ctx = zmq::Context::new();
    let cap = sizes.retention_cap.to_string();
    let node = start_node(&[node_args, &["--max-messages", &cap]].concat())?;
    let user = UserName::new("bench")?;
    let mut client = node.client(&ctx, &user, options())?;
    client.join()?;
    let took = windowed_sends(&ctx, &node, &user, sizes.retention_sends, 100, sizes.bytes)?;
    let mut kept = 0u64;
    client.for_each_page(HistoryQuery::AfterSeq(0), Some(1000), |page| {
        kept += page.messages.len() as u64;
        true
    })?;
    if kept != sizes.retention_cap {
        bail!(
            "the capped log holds {kept} entries, not {}",
            sizes.retention_cap
        );
    }
    Ok(sizes.retention_sends as f64 / took.as_secs_f64())
}

/// Workload 7: group-node RSS (KiB) with an empty log, after `points` messages each
/// (cumulative counts, ascending), and after replaying the whole log.
pub fn node_memory(node_args: &[&str], points: &[u64], bytes: usize) -> anyhow::Result<Vec<u64>> {
    let ctx = zmq::Context::new();
    let node = start_node(node_args)?;
    let user = UserName::new("bench")?;
    let mut client = node.client(&ctx, &user, options())?;
    client.join()?;
    let mut rss = vec![node.rss_kib()?];
    let mut stored = 0;
    for &point in points {
        windowed_sends(&ctx, &node, &user, point - stored, 100, bytes)?;
        stored = point;
        rss.push(node.rss_kib()?);
    }
    let mut replayed = 0u64;
    client.for_each_page(HistoryQuery::AfterSeq(0), Some(1000), |page| {
        replayed += page.messages.len() as u64;
        true
    })?;
    if replayed < stored {
        bail!("replayed {replayed} entries of {stored}");
    }
    rss.push(node.rss_kib()?);
    Ok(rss)
}

/// Workload 7: registry RSS (KiB) with `groups` groups registered (and heartbeating).
pub fn registry_memory(groups: u64) -> anyhow::Result<u64> {
    let ctx = zmq::Context::new();
    let max = (groups + 100).to_string();
    // One key registers them all: its cap of names is raised with the directory's.
    let reg = crate::dm::start_registry(&[
        "--max-groups",
        &max,
        "--max-names-per-key",
        &max,
        "--heartbeat",
        "10m",
    ])?;
    let (mut client, curve) = reg.client(&ctx)?;
    let key = curve.keypair.public;
    for g in 0..groups {
        let name = agora_proto::wire::GroupName::new(format!("group-{g}"))?;
        let endpoint = format!("tcp://127.0.0.1:{}", 10_000 + g % 50_000)
            .parse()
            .context("endpoint")?;
        client.register(&name, &endpoint, 0, Some(key))?;
    }
    let listed = client.list()?.len() as u64;
    if listed != groups {
        bail!("the registry lists {listed} of {groups} groups");
    }
    reg.rss_kib()
}

/// Workload 8: a file of `bytes` up to the node (windowed chunks, `agora_common::transfer`,
/// as user-cli's `send_file`) and back (windowed 1 MiB ranges into a file, as `get_file`),
/// through files on disk at both ends, checked against its SHA-256 after. The client is a
/// process of its own ([`file_client`], this binary with `--file-client`), so that its
/// peak RSS is the client's alone; the node's is read at the end.
pub fn file_transfer(node_args: &[&str], bytes: u64) -> anyhow::Result<FileRun> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("up.bin");
    let digest = write_source(&src, bytes)?;
    let node = start_node(node_args)?;
    let key = node.key.map_or_else(|| "-".to_owned(), |k| k.to_string());
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("--file-client")
        .args([&node.endpoint, &key])
        .arg(&src)
        .arg(digest.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("the file client failed ({})", out.status);
    }
    let client: ClientRun =
        serde_json::from_slice(&out.stdout).context("the file client's report")?;
    Ok(FileRun {
        up_mb_s: bytes as f64 / 1e6 / client.up_s,
        down_mb_s: bytes as f64 / 1e6 / client.down_s,
        node_peak_kib: node.peak_rss_kib()?,
        client_peak_kib: client.peak_kib,
    })
}

/// What [`file_client`] reports on stdout, as one JSON object.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ClientRun {
    /// Seconds from the `upload` declaration to the last chunk's reply (the content sealed).
    pub up_s: f64,
    /// Seconds to download it all into a file (flushed, not fsynced).
    pub down_s: f64,
    /// The client process's peak resident set, KiB (`VmHWM`).
    pub peak_kib: u64,
}

/// Workload 8's client, in a process of its own (`agora-bench --file-client ENDPOINT KEY
/// FILE SHA256`; KEY `-` for an `--insecure` node): joins the node as `bench` with a key pair
/// of its own, uploads `src`, downloads it into a file beside it, checks its digest, and
/// returns the times and its peak RSS.
///
/// # Errors
/// The node's refusals, timeouts (30 s per reply), file I/O, and a download that does not
/// hash to `sha256`.
pub fn file_client(
    endpoint: &str,
    server_key: Option<agora_common::keys::PublicKey>,
    src: &std::path::Path,
    sha256: agora_proto::wire::Sha256Digest,
) -> anyhow::Result<ClientRun> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let bytes = std::fs::metadata(src)?.len();
    let ctx = zmq::Context::new();
    let user = UserName::new("bench")?;
    let curve = match server_key {
        Some(server_key) => Some(agora_common::client::ClientCurve {
            keypair: agora_common::keys::Keypair::generate()?,
            server_key,
        }),
        None => None,
    };
    let mut client =
        agora_common::client::GroupClient::new(&ctx, endpoint, user.clone(), None, options());
    if let Some(curve) = curve.clone() {
        client = client.with_curve(curve);
    }
    client.join()?;
    let t = Instant::now();
    let start = client.upload(sha256, bytes)?;
    let target = agora_common::transfer::UploadTarget {
        endpoint: endpoint.to_owned(),
        curve,
        group: None,
        user,
    };
    let mut source = std::fs::File::open(src)?;
    let done = agora_common::transfer::upload_windowed(
        &ctx,
        &target,
        sha256,
        &mut source,
        bytes,
        start.have,
        usize::try_from(start.chunk_bytes).unwrap_or(256 << 10),
        start.window,
        Duration::from_secs(30),
        |_| {},
    )?;
    let up = t.elapsed();
    if !done.complete {
        bail!("the upload did not complete: {done:?}");
    }

    let dst = src.with_extension("down");
    let t = Instant::now();
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&dst)?);
        agora_common::transfer::download_windowed(
            &ctx,
            &target,
            sha256,
            bytes,
            0,
            agora_proto::wire::MAX_CHUNK_BYTES as u64,
            agora_proto::wire::UPLOAD_WINDOW,
            Duration::from_secs(30),
            |_, chunk| file.write_all(chunk),
        )?;
        file.flush()?;
    }
    let down = t.elapsed();
    let peak_kib = crate::servers::peak_rss_kib(std::process::id())?;
    let mut back = Sha256::new();
    let mut file = std::fs::File::open(&dst)?;
    std::io::copy(&mut file, &mut back)?;
    if agora_proto::wire::Sha256Digest::from_bytes(back.finalize().into()) != sha256 {
        bail!("the downloaded file does not match its digest");
    }
    Ok(ClientRun {
        up_s: up.as_secs_f64(),
        down_s: down.as_secs_f64(),
        peak_kib,
    })
}

/// Workload 8's source file: `bytes` of deterministic content at `path`, written and hashed
/// in 1 MiB pieces; returns its SHA-256.
///
/// # Errors
/// The file's I/O errors.
pub fn write_source(
    path: &std::path::Path,
    bytes: u64,
) -> anyhow::Result<agora_proto::wire::Sha256Digest> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let mut hasher = Sha256::new();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut piece = vec![0u8; 1 << 20];
    let mut left = bytes;
    let mut n = 0u64;
    while left > 0 {
        for (i, b) in piece.iter_mut().enumerate() {
            *b = ((n + i as u64).wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        let len = usize::try_from(left.min(piece.len() as u64)).unwrap_or(piece.len());
        file.write_all(&piece[..len])?;
        hasher.update(&piece[..len]);
        left -= len as u64;
        n += len as u64;
    }
    file.flush()?;
    Ok(agora_proto::wire::Sha256Digest::from_bytes(
        hasher.finalize().into(),
    ))
}
