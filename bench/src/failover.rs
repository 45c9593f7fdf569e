//! Workload 9 (with `--postgres`): failover time of an active/standby pair of `group-node`s
//! sharing one PostgreSQL database and one key pair.
//!
//! A round starts a registry, an active node and a standby (a copy of the active's
//! `node.key` and `node.key_secret`, the same `--store`), and a client that sends acked
//! messages back to back, each with a fixed id: on a timeout or an error reply it looks the
//! group up again in the registry, makes a new client for the endpoint it gives, and sends
//! the same id again (what user-cli does on a moved group). The active is killed with
//! SIGKILL; the round measures from the kill to the first ack from the new active, and
//! notes when the standby logged that it took the lease and when it printed its endpoint.
//! Then it reads the log back: every acked message exactly once, in order, at the seq its
//! ack gave, and no seq gap or duplicate; anything else is an [`Integrity`] error.
//!
//! Everything runs over CURVE whatever `--curve` says: an `--insecure` registry cannot tell
//! the group's owner from another node (no key), so it refuses the standby's registration
//! while the dead node's entry lives, and the round would measure the registry's TTL.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora_common::client::{ClientCurve, ClientError, ClientOptions, GroupClient, RegistryClient};
use agora_common::keys::{Keypair, PublicKey};
use agora_proto::id::MessageId;
use agora_proto::wire::{EntryKind, GroupName, HistoryQuery, UserName};
use anyhow::{bail, Context};

use crate::dm::{start_registry, RegistryProc};

/// The group the pair serves (the name `spawn_node` gives every bench node).
const GROUP: &str = "bench";
/// Acks before the kill, and acks from the new active before the round ends.
const ACKS_AROUND_KILL: u64 = 20;
/// How long any one step of a round may take.
const STEP: Duration = Duration::from_secs(30);

/// One way to run the pair and the client.
#[derive(Debug, Clone)]
pub struct Setting {
    /// For the table: the client's timeout and the node's flags.
    pub label: &'static str,
    /// The client's request options (its timeout is part of what is measured).
    pub client: ClientOptions,
    /// `--failover-poll` of both nodes: how often the standby tries to take the lease.
    pub poll: &'static str,
}

/// The settings measured: the library's default client, a 1 s client, and a fast pair.
pub fn settings() -> Vec<Setting> {
    vec![
        Setting {
            label: "defaults: client 5 s over 3 attempts (a lookup after each unanswered one), --failover-poll 100ms",
            client: ClientOptions::default(),
            poll: "100ms",
        },
        Setting {
            label: "client 1 s (1 attempt), --failover-poll 100ms (default)",
            client: ClientOptions {
                timeout: Duration::from_secs(1),
                attempts: 1,
            },
            poll: "100ms",
        },
        Setting {
            label: "client 250 ms (1 attempt), --failover-poll 50ms",
            client: ClientOptions {
                timeout: Duration::from_millis(250),
                attempts: 1,
            },
            poll: "50ms",
        },
    ]
}

/// One round's measures, each from the SIGKILL of the active.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// To the first ack from the new active.
    pub to_ack: Duration,
    /// To the standby's "took the lease" log line (as read by the bench).
    pub to_lease: Duration,
    /// To the standby's `listening …` line.
    pub to_listening: Duration,
    /// Failed attempts (timeouts, error replies) the client made after the kill.
    pub retries: u64,
    /// Failed attempts before the kill: timeouts on the live active.
    pub spurious: u64,
}

/// Acked messages lost, duplicated or out of order, or a seq gap: the run fails on it.
#[derive(Debug)]
pub struct Integrity(pub String);

impl std::fmt::Display for Integrity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failover integrity: {}", self.0)
    }
}

impl std::error::Error for Integrity {}

/// What a node of the pair printed, with when the bench read it.
#[derive(Debug, Default)]
struct Seen {
    standby: Option<Instant>,
    took_lease: Option<Instant>,
    listening: Option<(Instant, String, Option<PublicKey>)>,
}

/// A `group-node` of the pair (killed on drop), its stdout and stderr read by two threads
/// that note the lines the round waits for (the rest of stderr goes to the bench's).
struct PairNode {
    child: Child,
    seen: Arc<Mutex<Seen>>,
    dir: tempfile::TempDir,
}

impl Drop for PairNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PairNode {
    /// Starts a node of group [`GROUP`] on a free loopback port, registered with `reg`,
    /// storing in `store`; with `keys_from`, with the key pair of that data directory.
    fn spawn(
        reg: &RegistryProc,
        store: &str,
        poll: &str,
        keys_from: Option<&Path>,
    ) -> anyhow::Result<PairNode> {
        let bin = std::env::current_exe()?.with_file_name("group-node");
        if !bin.exists() {
            bail!("{} not found: build group-node first", bin.display());
        }
        let dir = tempfile::tempdir()?;
        if let Some(from) = keys_from {
            for file in ["node.key", "node.key_secret"] {
                std::fs::copy(from.join(file), dir.path().join(file))
                    .with_context(|| format!("copying {file}"))?;
            }
        }
        // The lease's info lines are what the round waits for.
        let log = std::env::var("AGORA_BENCH_LOG").unwrap_or_else(|_| "error".into());
        let registry_key = reg.key().to_string();
        let mut child = crate::servers::server_command(&bin)
            .args([GROUP, "127.0.0.1:0", "--rate-limit", "0"])
            .args([
                "--registry",
                reg.endpoint(),
                "--registry-key",
                &registry_key,
            ])
            .args(["--store", store, "--failover-poll", poll])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", format!("{log},agora_group_node::lease=info"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stdout, stderr) = (
            child.stdout.take().context("stdout")?,
            child.stderr.take().context("stderr")?,
        );
        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let words: Vec<&str> = line.split_whitespace().collect();
                let parsed = match words.as_slice() {
                    ["listening", endpoint, "public-key", key] => {
                        Some(((*endpoint).to_owned(), key.parse().ok()))
                    }
                    ["listening", endpoint] => Some(((*endpoint).to_owned(), None)),
                    _ => None,
                };
                if let (Some((endpoint, key)), Ok(mut seen)) = (parsed, s.lock()) {
                    seen.listening
                        .get_or_insert((Instant::now(), endpoint, key));
                }
            }
        });
        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let now = Instant::now();
                let Ok(mut seen) = s.lock() else { return };
                if line.contains("another node holds the lease") {
                    seen.standby.get_or_insert(now);
                } else if line.contains("took the lease") {
                    seen.took_lease.get_or_insert(now);
                } else {
                    eprintln!("group-node: {line}");
                }
            }
        });
        Ok(PairNode { child, seen, dir })
    }

    /// Polls (every 5 ms, for `wait` at most) until `pick` finds something in what the node
    /// printed.
    fn wait_for<T>(
        &self,
        wait: Duration,
        what: &str,
        pick: impl Fn(&Seen) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(t) = self.seen.lock().ok().as_deref().and_then(&pick) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("{what} within {wait:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn listening(&self, wait: Duration) -> anyhow::Result<(Instant, String, PublicKey)> {
        let (at, endpoint, key) =
            self.wait_for(wait, "no `listening` line", |s| s.listening.clone())?;
        Ok((
            at,
            endpoint,
            key.context("the node printed no public key (it runs over CURVE)")?,
        ))
    }
}

/// One acked message: when, its id and seq, and whether it came from the new active.
#[derive(Debug, Clone, Copy)]
struct Ack {
    at: Instant,
    id: MessageId,
    seq: u64,
    from_new: bool,
}

/// What the client thread hands back: its acks, its failed attempts after the kill, and the
/// log as read from the new active at the end (seq, kind, id).
struct ClientRun {
    acks: Vec<Ack>,
    retries_before_kill: u64,
    retries_after_kill: u64,
    log: Vec<(u64, EntryKind, MessageId)>,
}

/// The client's shared counters: acks so far, acks from the new active, and the kill flag.
#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    acked_from_new: AtomicU64,
    killed: AtomicBool,
    stop: AtomicBool,
}

/// One failover round under `setting`, storing in `store` (a fresh database).
///
/// # Errors
/// A server that does not start or does not become standby or active in time, a client
/// that gets no ack within 30 s, and [`Integrity`] when the log read back is wrong.
pub fn round(store: &str, setting: &Setting, bytes: usize) -> anyhow::Result<Round> {
    let ctx = zmq::Context::new();
    let reg = start_registry(&[])?;
    let mut active = PairNode::spawn(&reg, store, setting.poll, None)?;
    let (_, old_endpoint, node_key) = active.listening(STEP)?;
    let standby = PairNode::spawn(&reg, store, setting.poll, Some(active.dir.path()))?;
    standby.wait_for(STEP, "the second node did not become a standby", |s| {
        s.standby
    })?;

    let user = UserName::new("bench")?;
    let keypair = Keypair::generate()?;
    let group = GroupName::new(GROUP)?;
    let mut registry =
        RegistryClient::new(&ctx, reg.endpoint(), setting.client).with_curve(ClientCurve {
            keypair: keypair.clone(),
            server_key: reg.key(),
        });
    // The active's entry is in the registry before the kill: the standby's registration
    // then moves it, as in production.
    let deadline = Instant::now() + STEP;
    while registry.lookup(&group).map(|e| e.endpoint.to_string()).ok() != Some(old_endpoint.clone())
    {
        if Instant::now() > deadline {
            bail!("the active node was not listed within {STEP:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let progress = Arc::new(Progress::default());
    let client = {
        let setup = Client {
            ctx: ctx.clone(),
            registry: RegistryClient::new(&ctx, reg.endpoint(), setting.client).with_curve(
                ClientCurve {
                    keypair: keypair.clone(),
                    server_key: reg.key(),
                },
            ),
            endpoint: old_endpoint.clone(),
            node_key,
            keypair,
            user: user.clone(),
            options: setting.client,
            bytes,
        };
        let progress = Arc::clone(&progress);
        // The thread owns the client's sockets (the registry client's opens on first use).
        std::thread::spawn(move || setup.send_loop(&progress))
    };
    // On an error here the client is stopped all the same, then the error returned.
    let kill = (|| -> anyhow::Result<(Instant, Instant, Instant)> {
        let deadline = Instant::now() + STEP;
        while progress.acked.load(Ordering::Relaxed) < ACKS_AROUND_KILL {
            if client.is_finished() || Instant::now() > deadline {
                bail!("the client got no {ACKS_AROUND_KILL} acks from the active");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        progress.killed.store(true, Ordering::Relaxed);
        let killed = Instant::now();
        active.child.kill()?; // SIGKILL
        active.child.wait()?;
        let deadline = killed + STEP;
        while progress.acked_from_new.load(Ordering::Relaxed) < ACKS_AROUND_KILL {
            if client.is_finished() || Instant::now() > deadline {
                bail!("the client got no {ACKS_AROUND_KILL} acks from the new active");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let took_lease = standby.wait_for(STEP, "no `took the lease` line", |s| s.took_lease)?;
        let (listening, _, _) = standby.listening(STEP)?;
        Ok((killed, took_lease, listening))
    })();
    progress.stop.store(true, Ordering::Relaxed);
    let run = client
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?;
    // The client's own error says more than "it stopped".
    let run = run?;
    let (killed, took_lease, listening) = kill?;
    let first_new = run
        .acks
        .iter()
        .find(|a| a.from_new)
        .context("no ack from the new active")?;
    check_log(&run)?;
    Ok(Round {
        to_ack: first_new.at.saturating_duration_since(killed),
        to_lease: took_lease.saturating_duration_since(killed),
        to_listening: listening.saturating_duration_since(killed),
        retries: run.retries_after_kill,
        spurious: run.retries_before_kill,
    })
}

/// The round's client, before it starts: where it sends first, as whom, and its registry.
struct Client {
    ctx: zmq::Context,
    registry: RegistryClient,
    endpoint: String,
    node_key: PublicKey,
    keypair: Keypair,
    user: UserName,
    options: ClientOptions,
    bytes: usize,
}

impl Client {
    /// Sends acked messages back to back until told to stop (after the message in hand is
    /// acked), each with its own fixed id; on a timeout or an error reply, looks the group up
    /// in the registry and sends the same id to the endpoint given (a new client, over CURVE
    /// with the key in the entry). Then reads the whole log from where it ended.
    fn send_loop(self, progress: &Progress) -> anyhow::Result<ClientRun> {
        let Client {
            ctx,
            mut registry,
            endpoint,
            node_key,
            keypair,
            user,
            options,
            bytes,
        } = self;
        let group = GroupName::new(GROUP)?;
        // One attempt at a time, looking the group up again after each unanswered one, as
        // user-cli does (PROTOCOL §11.2): the options' timeout is spread over its attempts.
        let attempt = options.one_attempt();
        let connect = |endpoint: &str, server_key: PublicKey| {
            GroupClient::new(&ctx, endpoint, user.clone(), None, attempt).with_curve(ClientCurve {
                keypair: keypair.clone(),
                server_key,
            })
        };
        let old = endpoint.to_owned();
        let mut current = old.clone();
        let mut client = connect(&current, node_key);
        client.join()?;
        let mut run = ClientRun {
            acks: Vec::new(),
            retries_before_kill: 0,
            retries_after_kill: 0,
            log: Vec::new(),
        };
        let mut n = 0u64;
        while !progress.stop.load(Ordering::Relaxed) {
            let id = MessageId::new_v7();
            let body = crate::body(n, bytes);
            let deadline = Instant::now() + STEP;
            let ack = loop {
                match client.send_with_id(body.clone(), id) {
                    Ok(ack) => break ack,
                    Err(e @ (ClientError::Timeout { .. } | ClientError::Server(_))) => {
                        // Before the kill: a timeout on the live node (a short timeout on a
                        // busy machine); the lookup gives the same endpoint, the retry the
                        // same id.
                        if progress.killed.load(Ordering::Relaxed) {
                            run.retries_after_kill += 1;
                        } else {
                            run.retries_before_kill += 1;
                        }
                        if Instant::now() > deadline {
                            bail!("no ack for message {n} within {STEP:?}: {e}");
                        }
                        // A registry that does not answer in time: the same endpoint again.
                        if let Ok(entry) = registry.lookup(&group) {
                            let key = entry
                                .public_key
                                .context("the registry's entry has no node key")?;
                            current = entry.endpoint.to_string();
                            client = connect(&current, key);
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if ack.id != id {
                bail!("message {n} was acked with id {}, not {id}", ack.id);
            }
            let from_new = current != old;
            run.acks.push(Ack {
                at: Instant::now(),
                id,
                seq: ack.seq,
                from_new,
            });
            progress.acked.fetch_add(1, Ordering::Relaxed);
            if from_new {
                progress.acked_from_new.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
        }
        client.for_each_page(HistoryQuery::AfterSeq(0), Some(1000), |page| {
            run.log
                .extend(page.messages.iter().map(|m| (m.seq, m.kind, m.id)));
            true
        })?;
        Ok(run)
    }
}

/// Checks the log read back against the acks: seqs 1, 2, 3, … with no gap or duplicate,
/// and the chat messages exactly the acked ones, in order, each at the seq its ack gave.
///
/// # Errors
/// [`Integrity`], saying what is wrong.
fn check_log(run: &ClientRun) -> anyhow::Result<()> {
    let fail = |what: String| Err(Integrity(what).into());
    for (i, (seq, _, _)) in run.log.iter().enumerate() {
        if *seq != i as u64 + 1 {
            return fail(format!(
                "entry {i} of the log has seq {seq}: a gap or a duplicate"
            ));
        }
    }
    let stored: Vec<(u64, MessageId)> = run
        .log
        .iter()
        .filter(|(_, kind, _)| *kind == EntryKind::Message)
        .map(|(seq, _, id)| (*seq, *id))
        .collect();
    let acked: Vec<(u64, MessageId)> = run.acks.iter().map(|a| (a.seq, a.id)).collect();
    if stored != acked {
        let lost = acked.iter().filter(|a| !stored.contains(a)).count();
        let extra = stored.iter().filter(|s| !acked.contains(s)).count();
        return fail(format!(
            "{} messages acked, {} stored: {lost} acked not stored (or at another seq), \
             {extra} stored not acked, or out of order",
            acked.len(),
            stored.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(acked: &[(u64, MessageId)], log: &[(u64, EntryKind, MessageId)]) -> ClientRun {
        ClientRun {
            acks: acked
                .iter()
                .map(|&(seq, id)| Ack {
                    at: Instant::now(),
                    id,
                    seq,
                    from_new: false,
                })
                .collect(),
            retries_before_kill: 0,
            retries_after_kill: 0,
            log: log.to_vec(),
        }
    }

    fn integrity_error(run: &ClientRun) -> Option<String> {
        check_log(run)
            .err()
            .map(|e| e.downcast::<Integrity>().expect("an Integrity error").0)
    }

    #[test]
    fn a_log_holding_every_ack_once_at_its_seq_passes() {
        let (join, a, b) = (
            MessageId::new_v7(),
            MessageId::new_v7(),
            MessageId::new_v7(),
        );
        let log = [
            (1, EntryKind::Join, join),
            (2, EntryKind::Message, a),
            (3, EntryKind::Message, b),
        ];
        assert_eq!(integrity_error(&run(&[(2, a), (3, b)], &log)), None);
    }

    #[test]
    fn a_seq_gap_a_lost_ack_and_a_duplicate_fail() {
        let (a, b) = (MessageId::new_v7(), MessageId::new_v7());
        let gap = [(1, EntryKind::Message, a), (3, EntryKind::Message, b)];
        let gap = integrity_error(&run(&[(1, a), (3, b)], &gap)).expect("a gap fails");
        assert!(gap.contains("gap"), "{gap}");
        let lost = [(1, EntryKind::Message, a)];
        assert!(integrity_error(&run(&[(1, a), (2, b)], &lost)).is_some());
        let twice = [(1, EntryKind::Message, a), (2, EntryKind::Message, a)];
        assert!(integrity_error(&run(&[(1, a)], &twice)).is_some());
    }
}
