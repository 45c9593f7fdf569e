//! What the workloads measure and how big they are; shared by Agora and every peer.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Workload sizes. [`Sizes::full`] is what docs/PERFORMANCE.md reports; [`Sizes::quick`]
/// is CI's smoke run, which checks counts and loss, never timings.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Body bytes (128 unless `--body-bytes`).
    pub bytes: usize,
    /// The large body of the fan-out workload (64 KiB).
    pub large_bytes: usize,
    /// Workload 1: sequential requests.
    pub requests: u64,
    /// Workload 2: appends at 1 in flight.
    pub append_one: u64,
    /// Workload 2: appends at 100 in flight.
    pub append_window: u64,
    /// Workload 3: concurrent clients (50).
    pub clients: usize,
    /// Workload 3: appends per client, one at a time.
    pub per_client: u64,
    /// Workload 4: messages per throughput run at `bytes` with 1 or 10 subscribers
    /// (divided by 10 for 100 subscribers, and by 16 for the large body).
    pub fanout: u64,
    /// Workload 4: sequential messages per latency run (divided by 5 for the large body).
    pub fanout_latency: u64,
    /// Workload 5: messages in the log (100k).
    pub history: u64,
    /// Workload 5: single-message lookups by id, one at a time.
    pub lookups: u64,
    /// Workload 5: how many times the newest 1000 are read.
    pub latest_pages: u64,
    /// Workload 6: the cap, in messages.
    pub retention_cap: u64,
    /// Workload 6: appends sent into the capped log, 100 in flight.
    pub retention_sends: u64,
    /// Workload 7: the stored-message counts (cumulative, ascending) where RSS is read.
    pub memory_points: Vec<u64>,
    /// Workload 7: groups registered before the registry's RSS is read (10k).
    pub registry_groups: u64,
    /// Workload 8: the file sent up and back, in bytes (1 GiB).
    pub file_bytes: u64,
    /// The web workload: messages per phase of a round.
    pub web_messages: u64,
    /// Runs per workload; the table shows the median.
    pub repeat: usize,
}

impl Sizes {
    /// The sizes the issue names (20k requests, 100k-message history, 1M-message memory).
    pub fn full(bytes: usize, repeat: usize) -> Sizes {
        Sizes {
            bytes,
            large_bytes: 64 * 1024,
            requests: 20_000,
            append_one: 5_000,
            append_window: 50_000,
            clients: 50,
            per_client: 400,
            fanout: 20_000,
            fanout_latency: 1_000,
            history: 100_000,
            lookups: 10_000,
            latest_pages: 100,
            retention_cap: 10_000,
            retention_sends: 100_000,
            memory_points: vec![100_000, 1_000_000],
            registry_groups: 10_000,
            file_bytes: 1 << 30,
            web_messages: 200,
            repeat,
        }
    }

    /// A smoke run of every workload in seconds (CI).
    pub fn quick(bytes: usize) -> Sizes {
        Sizes {
            bytes,
            large_bytes: 64 * 1024,
            requests: 200,
            append_one: 100,
            append_window: 2_000,
            clients: 50,
            per_client: 4,
            fanout: 500,
            fanout_latency: 50,
            history: 3_000,
            lookups: 100,
            latest_pages: 3,
            retention_cap: 100,
            retention_sends: 1_000,
            memory_points: vec![1_000, 5_000],
            registry_groups: 200,
            file_bytes: 8 << 20,
            web_messages: 20,
            repeat: 1,
        }
    }

    /// Messages in a fan-out throughput run.
    pub fn fanout_messages(&self, subscribers: usize, bytes: usize) -> u64 {
        let mut n = self.fanout;
        if subscribers >= 100 {
            n /= 10;
        }
        if bytes > self.bytes {
            n /= 16;
        }
        n.max(10)
    }

    /// Messages in a fan-out latency run.
    pub fn latency_messages(&self, bytes: usize) -> u64 {
        if bytes > self.bytes {
            (self.fanout_latency / 5).max(10)
        } else {
            self.fanout_latency
        }
    }
}

/// Latency percentiles of one run.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
}

impl Latency {
    /// Nearest-rank p50 and p99 of `samples` (0 for none).
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort();
        let pct = |p: f64| {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((samples.len() - 1) as f64 * p).round() as usize;
            samples[i].as_secs_f64() * 1e6
        };
        Latency {
            p50_us: pct(0.50),
            p99_us: pct(0.99),
        }
    }
}

/// One fan-out throughput run.
#[derive(Debug, Clone, Copy)]
pub struct Fanout {
    /// Deliveries (all subscribers together) per second, from the first send to the last
    /// delivery.
    pub delivered_per_s: f64,
    /// Deliveries that never arrived (for Agora: after backfill).
    pub lost: u64,
}

/// One history run: messages (or lookups) per second.
#[derive(Debug, Clone, Copy)]
pub struct History {
    /// Replay from the time of the middle message to the end, pages of 1000.
    pub by_time: f64,
    /// Single-message lookups by id (for JetStream: by stream seq), one at a time.
    pub by_id: f64,
    /// The newest 1000, as one request, repeated.
    pub latest: f64,
    /// The whole log from the start, pages of 1000.
    pub all: f64,
}

/// Workload 3's driver: one thread per connection in `clients`, all released at once, each
/// running `work` on its own connection. Returns the time from the release until the last
/// finished.
///
/// # Errors
/// The first client's error, or a panicked client thread.
pub fn concurrently<C: Send + 'static>(
    clients: Vec<C>,
    work: fn(C) -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let barrier = Arc::new(Barrier::new(clients.len() + 1));
    let threads: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                work(client)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok(started.elapsed())
}

/// Workload 8's measures of one run.
#[derive(Debug, Clone, Copy)]
pub struct FileRun {
    /// Upload throughput, MB/s (10^6 bytes per second).
    pub up_mb_s: f64,
    /// Download throughput, MB/s.
    pub down_mb_s: f64,
    /// The node's peak resident set, KiB.
    pub node_peak_kib: u64,
    /// The client process's peak resident set, KiB.
    pub client_peak_kib: u64,
}
