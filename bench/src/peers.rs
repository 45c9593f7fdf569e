//! The same workloads against NATS (JetStream on a file store, core pub/sub) through
//! `async-nats`, and Redis (streams with AOF, pub/sub) through `redis`.
//!
//! Each run starts its own server (see [`crate::servers`]) and drives it from a
//! current-thread Tokio runtime on the bench's CPU, as Agora's clients run on one thread.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::{LocalBoxStream, StreamExt};
use futures::TryStreamExt;
use redis::AsyncCommands;

use crate::servers::{start_nats, start_redis, Server};
use crate::workload::{Fanout, History, Latency, Sizes};

const STREAM: &str = "bench";
const FANOUT_SUBJECT: &str = "fan";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A body of `bytes` bytes whose first 8 hold `n` (little-endian), the rest filler.
pub fn payload(n: u64, bytes: usize) -> Vec<u8> {
    let mut p = vec![b'x'; bytes.max(8)];
    p[..8].copy_from_slice(&n.to_le_bytes());
    p
}

fn index_of(p: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(p.get(..8)?.try_into().ok()?))
}

// ---------------------------------------------------------------------------------------
// NATS

async fn nats_connect(server: &Server) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 16)
        .connect(format!("nats://{}", server.addr))
        .await
        .context("connecting to nats-server")
}

async fn nats_stream(
    js: &async_nats::jetstream::Context,
    max_messages: Option<u64>,
) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    use async_nats::jetstream::stream::{Config, StorageType};
    let max = max_messages.map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX));
    js.create_stream(Config {
        name: STREAM.into(),
        subjects: vec![STREAM.into()],
        storage: StorageType::File,
        allow_direct: true,
        max_messages: max,
        ..Default::default()
    })
    .await
    .context("creating the JetStream stream")
}

/// Publishes `count` messages to the stream with `window` acks outstanding.
async fn nats_publish(
    js: &async_nats::jetstream::Context,
    count: u64,
    window: usize,
    bytes: usize,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for n in 0..count {
        if acks.len() >= window {
            acks.try_next().await?;
        }
        let ack = js
            .publish(STREAM, payload(n, bytes).into())
            .await
            .context("publish")?;
        acks.push(std::future::IntoFuture::into_future(ack));
    }
    while acks.try_next().await?.is_some() {}
    Ok(t.elapsed())
}

/// Workload 1 against NATS: sequential JetStream direct gets of the last message.
pub fn nats_request_reply(sizes: &Sizes) -> anyhow::Result<Latency> {
    let server = start_nats()?;
    runtime()?.block_on(async {
        let client = nats_connect(&server).await?;
        let js = async_nats::jetstream::new(client);
        let stream = nats_stream(&js, None).await?;
        nats_publish(&js, 1, 1, sizes.bytes).await?;
        let mut samples = Vec::with_capacity(sizes.requests as usize);
        for _ in 0..sizes.requests {
            let t = Instant::now();
            let m = stream.direct_get_last_for_subject(STREAM).await?;
            samples.push(t.elapsed());
            if m.payload.len() != sizes.bytes.max(8) {
                bail!("direct get returned {} bytes", m.payload.len());
            }
        }
        Ok(Latency::of(samples))
    })
}

/// Workload 2 against JetStream: `count` publishes with `window` acks outstanding.
pub fn nats_append(window: usize, count: u64, bytes: usize) -> anyhow::Result<f64> {
    let server = start_nats()?;
    runtime()?.block_on(async {
        let js = async_nats::jetstream::new(nats_connect(&server).await?);
        nats_stream(&js, None).await?;
        let took = nats_publish(&js, count, window, bytes).await?;
        Ok(count as f64 / took.as_secs_f64())
    })
}

/// Workload 8 against NATS Object Store on JetStream's file store: `bytes` put from a file
/// (async-nats chunks it, 128 KiB by default), then got back into a file. Up and down, MB/s.
pub fn nats_object_store(bytes: u64) -> anyhow::Result<(f64, f64)> {
    use async_nats::jetstream::object_store::Config;
    use async_nats::jetstream::stream::StorageType;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("up.bin");
    crate::agora::write_source(&src, bytes)?;
    let server = start_nats()?;
    runtime()?.block_on(async {
        let js = async_nats::jetstream::new(nats_connect(&server).await?);
        let store = js
            .create_object_store(Config {
                bucket: "files".into(),
                max_bytes: -1,
                storage: StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("create object store: {e}"))?;
        let mut file = tokio::fs::File::open(&src).await?;
        let t = Instant::now();
        store
            .put("file", &mut file)
            .await
            .map_err(|e| anyhow::anyhow!("put: {e}"))?;
        let up = t.elapsed();
        let dst = dir.path().join("down.bin");
        let t = Instant::now();
        let mut object = store
            .get("file")
            .await
            .map_err(|e| anyhow::anyhow!("get: {e}"))?;
        let mut out = tokio::fs::File::create(&dst).await?;
        let copied = tokio::io::copy(&mut object, &mut out).await?;
        out.flush().await?;
        let down = t.elapsed();
        if copied != bytes {
            bail!("got {copied} bytes back of {bytes}");
        }
        Ok((
            bytes as f64 / 1e6 / up.as_secs_f64(),
            bytes as f64 / 1e6 / down.as_secs_f64(),
        ))
    })
}

/// Workload 4 against core NATS pub/sub (not stored): each subscriber on its own
/// connection.
pub fn nats_fanout(subscribers: usize, messages: u64, bytes: usize) -> anyhow::Result<Fanout> {
    let server = start_nats()?;
    runtime()?.block_on(async {
        let (subs, publisher) = nats_fanout_setup(&server, subscribers).await?;
        let (publish, flush) = nats_publisher(publisher);
        fanout_run(subs, publish, flush, messages, bytes).await
    })
}

/// Workload 4 latency against core NATS: one message at a time, each waiting for every
/// subscriber.
pub fn nats_fanout_latency(
    subscribers: usize,
    messages: u64,
    bytes: usize,
) -> anyhow::Result<Latency> {
    let server = start_nats()?;
    runtime()?.block_on(async {
        let (subs, publisher) = nats_fanout_setup(&server, subscribers).await?;
        latency_run(subs, nats_publisher(publisher), messages, bytes).await
    })
}

type Deliveries = LocalBoxStream<'static, Vec<u8>>;
type Publish = Box<dyn FnMut(Vec<u8>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>>>>>;
/// Runs once every publish completed: pushes out what the client still buffers.
type Flush = Pin<Box<dyn Future<Output = anyhow::Result<()>>>>;

async fn nats_fanout_setup(
    server: &Server,
    subscribers: usize,
) -> anyhow::Result<(Vec<Deliveries>, async_nats::Client)> {
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let c = nats_connect(server).await?;
        let s = c.subscribe(FANOUT_SUBJECT).await?;
        c.flush().await?;
        // The stream keeps its client alive.
        subs.push(
            s.map(move |m| {
                let _alive = &c;
                m.payload.to_vec()
            })
            .boxed_local(),
        );
    }
    Ok((subs, nats_connect(server).await?))
}

fn nats_publisher(client: async_nats::Client) -> (Publish, Flush) {
    let flush = client.clone();
    (
        Box::new(move |p| {
            let c = client.clone();
            Box::pin(async move {
                c.publish(FANOUT_SUBJECT, p.into()).await?;
                Ok(())
            })
        }),
        Box::pin(async move { Ok(flush.flush().await?) }),
    )
}

/// Workload 5 against JetStream: a stream of `sizes.history` messages; replay by start
/// time (pull consumer, batches of 1000), direct gets by seq, the newest 1000 (a consumer
/// from seq last−999), and everything (a consumer from the start).
pub fn nats_history(sizes: &Sizes) -> anyhow::Result<History> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let server = start_nats()?;
    runtime()?.block_on(async {
        let js = async_nats::jetstream::new(nats_connect(&server).await?);
        let stream = nats_stream(&js, None).await?;
        nats_publish(&js, sizes.history, 100, sizes.bytes).await?;
        let n = sizes.history;
        let half = n / 2 + 1;
        let start_time = stream.direct_get(half).await?.time;
        let replay = |policy: DeliverPolicy, expect: u64| {
            let stream = stream.clone();
            async move {
                let t = Instant::now();
                let consumer = stream
                    .create_consumer(pull::Config {
                        deliver_policy: policy,
                        ack_policy: AckPolicy::None,
                        ..Default::default()
                    })
                    .await?;
                let mut got = 0u64;
                while got < expect {
                    let want = (expect - got).min(1000) as usize;
                    let mut batch = consumer.fetch().max_messages(want).messages().await?;
                    let before = got;
                    while let Some(m) = batch.next().await {
                        m.map_err(|e| anyhow::anyhow!("fetch: {e}"))?;
                        got += 1;
                    }
                    if got == before {
                        bail!("replay stalled at {got} of {expect}");
                    }
                }
                Ok::<f64, anyhow::Error>(got as f64 / t.elapsed().as_secs_f64())
            }
        };
        let by_time = replay(DeliverPolicy::ByStartTime { start_time }, n - half + 1).await?;
        let all = replay(DeliverPolicy::All, n).await?;
        let t = Instant::now();
        for _ in 0..sizes.latest_pages {
            replay(
                DeliverPolicy::ByStartSequence {
                    start_sequence: n.saturating_sub(999).max(1),
                },
                n.min(1000),
            )
            .await?;
        }
        let latest = (sizes.latest_pages * n.min(1000)) as f64 / t.elapsed().as_secs_f64();
        let mut rng = fastrand::Rng::with_seed(7);
        let t = Instant::now();
        for _ in 0..sizes.lookups {
            let seq = rng.u64(1..=n);
            let m = stream.direct_get(seq).await?;
            if m.sequence != seq {
                bail!("direct get {seq} returned {}", m.sequence);
            }
        }
        let by_id = sizes.lookups as f64 / t.elapsed().as_secs_f64();
        Ok(History {
            by_time,
            by_id,
            latest,
            all,
        })
    })
}

/// Workload 6 against JetStream: publishes into a stream capped by `max_msgs` (discard
/// old), 100 acks outstanding; checks the stream holds exactly the cap.
pub fn nats_retention(sizes: &Sizes) -> anyhow::Result<f64> {
    let server = start_nats()?;
    runtime()?.block_on(async {
        let js = async_nats::jetstream::new(nats_connect(&server).await?);
        let mut stream = nats_stream(&js, Some(sizes.retention_cap)).await?;
        let took = nats_publish(&js, sizes.retention_sends, 100, sizes.bytes).await?;
        retention_rate(stream.info().await?.state.messages, took, sizes)
    })
}

/// Appends per second of a retention run, after checking the capped stream holds exactly
/// the cap.
fn retention_rate(kept: u64, took: Duration, sizes: &Sizes) -> anyhow::Result<f64> {
    if kept != sizes.retention_cap {
        bail!(
            "the capped stream holds {kept}, not {}",
            sizes.retention_cap
        );
    }
    Ok(sizes.retention_sends as f64 / took.as_secs_f64())
}

/// Workload 7 against JetStream: nats-server RSS (KiB) empty and after each point.
pub fn nats_memory(points: &[u64], bytes: usize) -> anyhow::Result<Vec<u64>> {
    let server = start_nats()?;
    runtime()?.block_on(async {
        let js = async_nats::jetstream::new(nats_connect(&server).await?);
        nats_stream(&js, None).await?;
        let mut rss = vec![server.rss_kib()?];
        let mut stored = 0;
        for &point in points {
            nats_publish(&js, point - stored, 100, bytes).await?;
            stored = point;
            rss.push(server.rss_kib()?);
        }
        Ok(rss)
    })
}

// ---------------------------------------------------------------------------------------
// Redis

/// `XADD bench [MAXLEN = maxlen] * b BODY`, the body holding `n`.
fn xadd(n: u64, bytes: usize, maxlen: Option<u64>) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(STREAM);
    if let Some(m) = maxlen {
        cmd.arg("MAXLEN").arg("=").arg(m);
    }
    cmd.arg("*").arg("b").arg(payload(n, bytes));
    cmd
}

fn redis_client(server: &Server) -> anyhow::Result<redis::Client> {
    Ok(redis::Client::open(format!("redis://{}/", server.addr))?)
}

/// Workload 1 against Redis: sequential `XREVRANGE bench + - COUNT 1`.
pub fn redis_request_reply(sizes: &Sizes) -> anyhow::Result<Latency> {
    let server = start_redis("everysec")?;
    let mut c = redis_client(&server)?.get_connection()?;
    let _: String = xadd(0, sizes.bytes, None).query(&mut c)?;
    let mut samples = Vec::with_capacity(sizes.requests as usize);
    for _ in 0..sizes.requests {
        let t = Instant::now();
        let r: redis::streams::StreamRangeReply = c.xrevrange_count(STREAM, "+", "-", 1)?;
        samples.push(t.elapsed());
        if r.ids.len() != 1 {
            bail!("XREVRANGE gave {} entries", r.ids.len());
        }
    }
    Ok(Latency::of(samples))
}

use redis::Commands;

async fn redis_xadd_window(
    conn: &redis::aio::MultiplexedConnection,
    count: u64,
    window: usize,
    bytes: usize,
    maxlen: Option<u64>,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    futures::stream::iter(0..count)
        .map(|n| {
            let mut c = conn.clone();
            async move { xadd(n, bytes, maxlen).query_async::<String>(&mut c).await }
        })
        .buffer_unordered(window)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(t.elapsed())
}

/// Workload 2 against Redis: `count` XADDs with `window` in flight (1: one connection
/// waiting for each reply), AOF with `appendfsync` as given.
pub fn redis_append(
    appendfsync: &str,
    window: usize,
    count: u64,
    bytes: usize,
) -> anyhow::Result<f64> {
    let server = start_redis(appendfsync)?;
    let client = redis_client(&server)?;
    if window == 1 {
        let mut c = client.get_connection()?;
        let t = Instant::now();
        for n in 0..count {
            let _: String = xadd(n, bytes, None).query(&mut c)?;
        }
        return Ok(count as f64 / t.elapsed().as_secs_f64());
    }
    runtime()?.block_on(async {
        let conn = client.get_multiplexed_async_connection().await?;
        let took = redis_xadd_window(&conn, count, window, bytes, None).await?;
        Ok(count as f64 / took.as_secs_f64())
    })
}

/// Workload 3 against Redis: `clients` connections on their own threads, each sending
/// `per_client` XADDs one at a time, AOF with `appendfsync` as given.
pub fn redis_concurrent_clients(
    appendfsync: &str,
    clients: usize,
    per_client: u64,
    bytes: usize,
) -> anyhow::Result<f64> {
    let server = start_redis(appendfsync)?;
    let client = redis_client(&server)?;
    let connections = (0..clients)
        .map(|_| Ok((client.get_connection()?, per_client, bytes)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let took = crate::workload::concurrently(connections, |(mut c, per_client, bytes)| {
        for n in 0..per_client {
            let _: String = xadd(n, bytes, None).query(&mut c)?;
        }
        Ok(())
    })?;
    Ok((clients as u64 * per_client) as f64 / took.as_secs_f64())
}

async fn redis_fanout_setup(
    server: &Server,
    subscribers: usize,
) -> anyhow::Result<(Vec<Deliveries>, Publish)> {
    let client = redis_client(server)?;
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let mut ps = client.get_async_pubsub().await?;
        ps.subscribe(FANOUT_SUBJECT).await?;
        subs.push(
            ps.into_on_message()
                .map(|m| m.get_payload_bytes().to_vec())
                .boxed_local(),
        );
    }
    let conn = client.get_multiplexed_async_connection().await?;
    let publish: Publish = Box::new(move |p| {
        let mut c = conn.clone();
        Box::pin(async move {
            let _: u64 = c.publish(FANOUT_SUBJECT, p).await?;
            Ok(())
        })
    });
    Ok((subs, publish))
}

/// Workload 4 against Redis pub/sub (not stored): each subscriber on its own connection.
pub fn redis_fanout(subscribers: usize, messages: u64, bytes: usize) -> anyhow::Result<Fanout> {
    let server = start_redis("everysec")?;
    runtime()?.block_on(async {
        let (subs, publish) = redis_fanout_setup(&server, subscribers).await?;
        fanout_run(subs, publish, Box::pin(async { Ok(()) }), messages, bytes).await
    })
}

/// Workload 4 latency against Redis pub/sub.
pub fn redis_fanout_latency(
    subscribers: usize,
    messages: u64,
    bytes: usize,
) -> anyhow::Result<Latency> {
    let server = start_redis("everysec")?;
    runtime()?.block_on(async {
        let (subs, publish) = redis_fanout_setup(&server, subscribers).await?;
        latency_run(subs, (publish, Box::pin(async { Ok(()) })), messages, bytes).await
    })
}

/// Workload 5 against Redis: XRANGE from the middle entry's millisecond id (stream ids
/// are times), XRANGE id id lookups, XREVRANGE + - COUNT 1000, and XRANGE - + in pages
/// of 1000 (exclusive `(` start after each page).
pub fn redis_history(sizes: &Sizes) -> anyhow::Result<History> {
    let server = start_redis("everysec")?;
    let client = redis_client(&server)?;
    let ids = runtime()?.block_on(async {
        let conn = client.get_multiplexed_async_connection().await?;
        redis_xadd_window(&conn, sizes.history, 100, sizes.bytes, None).await?;
        Ok::<(), anyhow::Error>(())
    });
    ids?;
    let mut c = client.get_connection()?;
    let mut index = Vec::with_capacity(sizes.history as usize);
    let page = |c: &mut redis::Connection, start: &str| -> anyhow::Result<Vec<String>> {
        let r: redis::streams::StreamRangeReply = c.xrange_count(STREAM, start, "+", 1000)?;
        Ok(r.ids.into_iter().map(|e| e.id).collect())
    };
    // The untimed pass that collects the ids.
    let mut start = "-".to_owned();
    loop {
        let ids = page(&mut c, &start)?;
        let Some(last) = ids.last() else { break };
        start = format!("({last}");
        index.extend(ids);
    }
    if index.len() as u64 != sizes.history {
        bail!("stored {} of {}", index.len(), sizes.history);
    }
    let mut replay = |from: String| -> anyhow::Result<(u64, f64)> {
        let t = Instant::now();
        let (mut start, mut got) = (from, 0u64);
        loop {
            let ids = page(&mut c, &start)?;
            let Some(last) = ids.last() else { break };
            start = format!("({last}");
            got += ids.len() as u64;
        }
        Ok((got, got as f64 / t.elapsed().as_secs_f64()))
    };
    // The time of the middle entry: the millisecond part of its id.
    let half = index.len() / 2;
    let ms = index[half].split('-').next().unwrap_or("0").to_owned();
    let (got, by_time) = replay(ms)?;
    if got < (index.len() - half) as u64 {
        bail!("replay by time gave {got}");
    }
    let (got, all) = replay("-".into())?;
    if got != index.len() as u64 {
        bail!("replay gave {got} of {}", index.len());
    }
    let t = Instant::now();
    for _ in 0..sizes.latest_pages {
        let r: redis::streams::StreamRangeReply = c.xrevrange_count(STREAM, "+", "-", 1000)?;
        if r.ids.len() != index.len().min(1000) {
            bail!("XREVRANGE gave {}", r.ids.len());
        }
    }
    let latest = (sizes.latest_pages * 1000) as f64 / t.elapsed().as_secs_f64();
    let mut rng = fastrand::Rng::with_seed(7);
    let t = Instant::now();
    for _ in 0..sizes.lookups {
        let id = &index[rng.usize(..index.len())];
        let r: redis::streams::StreamRangeReply = c.xrange(STREAM, id, id)?;
        if r.ids.first().map(|e| &e.id) != Some(id) {
            bail!("XRANGE {id} {id} missed");
        }
    }
    let by_id = sizes.lookups as f64 / t.elapsed().as_secs_f64();
    Ok(History {
        by_time,
        by_id,
        latest,
        all,
    })
}

/// Workload 6 against Redis: XADD MAXLEN = cap, 100 in flight, AOF everysec; checks XLEN.
pub fn redis_retention(sizes: &Sizes) -> anyhow::Result<f64> {
    let server = start_redis("everysec")?;
    let client = redis_client(&server)?;
    let took = runtime()?.block_on(async {
        let conn = client.get_multiplexed_async_connection().await?;
        redis_xadd_window(
            &conn,
            sizes.retention_sends,
            100,
            sizes.bytes,
            Some(sizes.retention_cap),
        )
        .await
    })?;
    let kept: u64 = client.get_connection()?.xlen(STREAM)?;
    retention_rate(kept, took, sizes)
}

/// Workload 7 against Redis: redis-server RSS (KiB) empty and after each point.
pub fn redis_memory(points: &[u64], bytes: usize) -> anyhow::Result<Vec<u64>> {
    let server = start_redis("everysec")?;
    let client = redis_client(&server)?;
    runtime()?.block_on(async {
        let conn = client.get_multiplexed_async_connection().await?;
        let mut rss = vec![server.rss_kib()?];
        let mut stored = 0;
        for &point in points {
            redis_xadd_window(&conn, point - stored, 100, bytes, None).await?;
            stored = point;
            rss.push(server.rss_kib()?);
        }
        Ok(rss)
    })
}

// ---------------------------------------------------------------------------------------
// The fan-out harness shared by NATS and Redis

/// How long a subscriber waits for the next delivery before it counts the rest as lost.
const QUIET: Duration = Duration::from_secs(3);

/// Publishes `messages` (100 publishes in flight) and counts every subscriber's
/// deliveries until each has all of them or has been quiet for [`QUIET`].
async fn fanout_run(
    subs: Vec<Deliveries>,
    mut publish: Publish,
    flush: Flush,
    messages: u64,
    bytes: usize,
) -> anyhow::Result<Fanout> {
    let subscribers = subs.len() as u64;
    let started = Instant::now();
    let local = tokio::task::LocalSet::new();
    let counters: Vec<_> = subs
        .into_iter()
        .map(|mut s| {
            local.spawn_local(async move {
                let (mut got, mut last) = (0u64, None);
                while got < messages {
                    match tokio::time::timeout(QUIET, s.next()).await {
                        Ok(Some(_)) => {
                            got += 1;
                            last = Some(Instant::now());
                        }
                        _ => break,
                    }
                }
                (got, last)
            })
        })
        .collect();
    local
        .run_until(async move {
            futures::stream::iter(0..messages)
                .map(|n| publish(payload(n, bytes)))
                .buffer_unordered(100)
                .try_for_each(|()| async { Ok(()) })
                .await?;
            flush.await
        })
        .await?;
    let (mut delivered, mut done) = (0u64, started);
    for c in counters {
        let (got, last) = local.run_until(c).await?;
        delivered += got;
        if let Some(last) = last {
            done = done.max(last);
        }
    }
    Ok(Fanout {
        delivered_per_s: delivered as f64 / done.duration_since(started).as_secs_f64(),
        lost: messages * subscribers - delivered,
    })
}

/// Publishes `messages` one at a time, each after every subscriber received the one
/// before (or [`QUIET`] passed), and returns send→deliver percentiles.
async fn latency_run(
    subs: Vec<Deliveries>,
    (mut publish, _): (Publish, Flush),
    messages: u64,
    bytes: usize,
) -> anyhow::Result<Latency> {
    let subscribers = subs.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let local = tokio::task::LocalSet::new();
    for mut s in subs {
        let tx = tx.clone();
        local.spawn_local(async move {
            while let Some(p) = s.next().await {
                if tx.send((index_of(&p), Instant::now())).is_err() {
                    break;
                }
            }
        });
    }
    local
        .run_until(async move {
            let mut samples = Vec::with_capacity(messages as usize * subscribers);
            for n in 0..messages {
                let t = Instant::now();
                publish(payload(n, bytes)).await?;
                let mut got = 0;
                while got < subscribers {
                    match tokio::time::timeout(QUIET, rx.recv()).await {
                        Ok(Some((Some(i), at))) if i == n => {
                            samples.push(at.duration_since(t));
                            got += 1;
                        }
                        Ok(Some(_)) => {}
                        _ => bail!("message {n} reached {got} of {subscribers} subscribers"),
                    }
                }
            }
            Ok(Latency::of(samples))
        })
        .await
}
