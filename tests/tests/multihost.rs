//! The suite across hosts (issue 15): network namespaces that the test makes itself, joined
//! by a bridge ([`agora_tests::netns`]), with the database, two registries, two nodes of
//! one group (active and standby), a second group, and two clients, each on a host of its
//! own. Under steady load (acked sends, a live subscriber, DMs) the test kills the active
//! node, later a registry, then cuts the new active node off the LAN and heals the link,
//! and checks that nothing acked was lost, that neither the log nor the subscriber has a
//! gap or a duplicate, that no two nodes ever committed at once, and that every DM arrived
//! once. It prints each failover time.
//!
//! Needs root and iproute2; skips, saying why, where network namespaces cannot be made.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora_tests::netns::{Host, Lan};
use agora_tests::pg::PgCluster;
use agora_tests::{bin, run_command, wait_for, CliRun, Pending, Server, Streaming};

const GROUP: &str = "ha";
const OTHER: &str = "g2";
const WAIT: Duration = Duration::from_secs(30);

/// What the test's hosts share: the registry list, its key, and the test's directory.
struct Site {
    registries: String,
    registry_key: String,
    dir: PathBuf,
    store: String,
}

impl Site {
    /// user-cli as `user` on `host`, with its own state and the shared key directory.
    fn cli(&self, host: &Host, user: &str, args: &[&str]) -> Command {
        let mut command = host.command(bin("user-cli"));
        for (key, _) in std::env::vars() {
            if key.starts_with("AGORA_") {
                command.env_remove(key);
            }
        }
        command
            .env("TZ", "UTC")
            .env("AGORA_STATE_DIR", self.dir.join(format!("state-{user}")))
            .env("AGORA_KEY_DIR", self.dir.join("keys"))
            .env("AGORA_REGISTRY_KEY", &self.registry_key)
            .args([
                "--registry",
                &self.registries,
                "--user",
                user,
                "--timeout",
                "1s",
            ])
            .args(args);
        command
    }

    fn run(&self, host: &Host, user: &str, args: &[&str]) -> CliRun {
        run_command(self.cli(host, user, args), "")
    }

    /// A group node of `group` on `host`, its data in `DIR/data-<tag>`, its log in
    /// `DIR/node-<log>.log`.
    fn node(&self, host: &Host, group: &str, tag: &str, log: &str) -> Pending {
        let mut command = host.command(bin("group-node"));
        let data = self.data(tag);
        command.args([
            group,
            &format!("{}:6000", host.ip),
            "--registry",
            &self.registries,
            "--registry-key",
            &self.registry_key,
            "--store",
            &self.store,
            "--data-dir",
            path_str(&data),
            "--heartbeat",
            "300ms",
        ]);
        Server::spawn_command(
            command,
            "group-node",
            &self.dir.join(format!("node-{log}.log")),
        )
    }

    fn data(&self, tag: &str) -> PathBuf {
        self.dir.join(format!("data-{tag}"))
    }
}

/// The test's directory; on a failure, the tail of every log in it is printed first.
struct Keep(tempfile::TempDir);

impl Keep {
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Keep {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.0.path()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("==== {} (last 40 lines)", path.display());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

fn json(line: &str) -> Option<serde_json::Value> {
    serde_json::from_str(line).ok()
}

/// An acked send or DM: its body, its seq (or mailbox number), when the user-cli run that
/// got it started, and when the ack came.
#[derive(Debug, Clone)]
struct Ack {
    body: String,
    seq: u64,
    started: Instant,
    at: Instant,
}

/// A client sending in a loop on its own thread until stopped: `args(i)` is the user-cli
/// command of the i-th message and its body.
struct Load {
    acks: Arc<Mutex<Vec<Ack>>>,
    /// The last failed runs' stderr (for a stall's message).
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(
        site: Arc<Site>,
        host: Host,
        user: &'static str,
        args: impl Fn(u64) -> (Vec<String>, String) + Send + 'static,
        seq_field: &'static str,
    ) -> Load {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acks, stop) = (Arc::clone(&acks), Arc::clone(&stop));
            let failures = Arc::clone(&failures);
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let (args, body) = args(i);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let started = Instant::now();
                    let run = site.run(&host, user, &args);
                    let seq = (run.code == Some(0))
                        .then(|| run.stdout.lines().find_map(json))
                        .flatten()
                        .and_then(|v| v[seq_field].as_u64());
                    if let Some(seq) = seq {
                        lock(&acks).push(Ack {
                            body,
                            seq,
                            started,
                            at: Instant::now(),
                        });
                    } else {
                        let mut failures = lock(&failures);
                        if failures.len() >= 5 {
                            failures.remove(0);
                        }
                        failures.push(format!("{:?} {}", run.code, run.stderr.trim()));
                    }
                }
            })
        };
        Load {
            acks,
            failures,
            stop,
            thread: Some(thread),
        }
    }

    fn acks(&self) -> Vec<Ack> {
        lock(&self.acks).clone()
    }

    /// Waits until `n` acks of runs started after `after` have come; how long after `after`
    /// the first of them came (an ack already on its way at the event does not count).
    fn wait_more(&self, after: Instant, n: usize) -> Duration {
        let got = wait_for(Duration::from_secs(60), || {
            self.acks().iter().filter(|a| a.started > after).count() >= n
        });
        assert!(
            got,
            "the load stalled: no {n} acks after the event; last failures: {:#?}",
            lock(&self.failures)
        );
        let first = self
            .acks()
            .iter()
            .find(|a| a.started > after)
            .map(|a| a.at)
            .expect("an ack");
        first.duration_since(after)
    }

    fn finish(mut self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
        self.acks()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `committed` lines of a node's log: (time, epoch, first seq, last seq).
fn commits(log: &str) -> Vec<(chrono::DateTime<chrono::Utc>, i64, u64, u64)> {
    log.lines()
        .filter(|l| l.contains("committed"))
        .filter_map(|l| {
            let time = l.split_whitespace().next()?.parse().ok()?;
            let field = |name: &str| -> Option<&str> {
                let at = l.find(&format!("{name}="))? + name.len() + 1;
                l[at..].split_whitespace().next()
            };
            let epoch = field("epoch")?
                .trim_start_matches("Some(")
                .trim_end_matches(')')
                .parse()
                .ok()?;
            Some((
                time,
                epoch,
                field("first_seq")?.parse().ok()?,
                field("last_seq")?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn across_hosts_failovers_lose_nothing_acked() {
    if let Some(why) = Lan::unavailable() {
        eprintln!("SKIPPED across_hosts_failovers_lose_nothing_acked: {why}");
        return;
    }
    let mut lan = Lan::start();
    let db = lan.host("db");
    let reg_hosts = [lan.host("registry-1"), lan.host("registry-2")];
    let node_hosts = [lan.host("node-a"), lan.host("node-b")];
    let other_host = lan.host("node-other");
    let clients = [lan.host("client-1"), lan.host("client-2")];
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = Keep(dir);

    let pg = PgCluster::start_on(Some(&db));
    pg.database("agora");
    let store = pg.tcp_url("agora");

    // Two registries over the one database: one directory, one key pair.
    let registries: Vec<Server> = reg_hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let mut command = host.command(bin("registry"));
            let data = dir.path().join(format!("registry-{i}"));
            command.args([
                "--bind",
                &format!("tcp://{}:5555", host.ip),
                "--store",
                &store,
                "--data-dir",
                path_str(&data),
                "--heartbeat",
                "300ms",
            ]);
            Server::spawn_command(
                command,
                "registry",
                &dir.path().join(format!("registry-{i}.log")),
            )
            .wait_listening(WAIT)
        })
        .collect();
    let mut registries = registries.into_iter();
    let (mut registry_1, _registry_2) = (
        registries.next().expect("registry 1"),
        registries.next().expect("registry 2"),
    );
    assert_eq!(
        registry_1.key, _registry_2.key,
        "the registries share a key pair"
    );
    let site = Arc::new(Site {
        registries: format!("{},{}", registry_1.endpoint, _registry_2.endpoint),
        registry_key: registry_1.key.clone().expect("CURVE"),
        dir: dir.path().to_owned(),
        store,
    });

    // The group's two nodes (one key pair), and a second group.
    let [host_a, host_b] = &node_hosts;
    let mut node_a = site.node(host_a, GROUP, "a", "a").wait_listening(WAIT);
    std::fs::create_dir_all(site.data("b")).expect("data dir");
    for file in ["node.key", "node.key_secret"] {
        std::fs::copy(site.data("a").join(file), site.data("b").join(file)).expect("key");
    }
    let standby_b = site.node(host_b, GROUP, "b", "b");
    assert!(
        wait_for(WAIT, || standby_b.log().contains("waiting for it")),
        "no standby: {}",
        standby_b.log()
    );
    let _other = site
        .node(&other_host, OTHER, "other", "other")
        .wait_listening(WAIT);

    let [c1, c2] = &clients;
    for (host, user) in [(c1, "alice"), (c2, "bob")] {
        ok(site.run(host, user, &["register", user]));
        for group in [GROUP, OTHER] {
            assert!(
                wait_for(WAIT, || site.run(host, user, &["join", group]).code
                    == Some(0)),
                "{user} cannot join {group}"
            );
        }
    }
    ok(site.run(c1, "alice", &["send", OTHER, "before"]));

    // bob follows the group live and takes DMs on client 2.
    let mut watch =
        Streaming::spawn(site.cli(c2, "bob", &["--json", "watch", GROUP, "--after-seq", "0"]));
    assert!(watch.wait_stderr("watching", WAIT));
    // alice sends to the group, and DMs bob, from client 1.
    let sends = Load::start(
        Arc::clone(&site),
        c1.clone(),
        "alice",
        |i| {
            let body = format!("m{i}");
            (
                vec!["--json".into(), "send".into(), GROUP.into(), body.clone()],
                body,
            )
        },
        "seq",
    );
    let dms = Load::start(
        Arc::clone(&site),
        c1.clone(),
        "alice",
        |i| {
            let body = format!("d{i}");
            (
                vec![
                    "--json".into(),
                    "send_dm".into(),
                    "bob".into(),
                    body.clone(),
                ],
                body,
            )
        },
        "n",
    );
    sends.wait_more(Instant::now() - Duration::from_secs(3600), 10);

    // 1. The active node dies (SIGKILL): the standby takes over.
    node_a.kill9();
    let killed = Instant::now();
    let failover = sends.wait_more(killed, 5);
    let mut node_b = standby_b.wait_listening(WAIT);
    eprintln!("failover 1 (kill -9 of the active node): first ack after {failover:?}");
    let standby_a = site.node(host_a, GROUP, "a", "a-again");
    assert!(wait_for(WAIT, || standby_a
        .log()
        .contains("waiting for it")));

    // 2. A registry dies: clients and nodes go on through the other.
    registry_1.kill9();
    let killed = Instant::now();
    let send_gap = sends.wait_more(killed, 5);
    let dm_gap = dms.wait_more(killed, 3);
    eprintln!(
        "registry 1 killed: first group ack after {send_gap:?}, first DM ack after {dm_gap:?}"
    );

    // 3. The active node is cut off the LAN (from the database and everyone): it stops
    //    serving, the database frees its lease, and the standby takes over. Then the link
    //    heals, and the cut node comes back as a standby.
    lan.cut(host_b);
    let cut = Instant::now();
    let failover = sends.wait_more(cut, 5);
    let node_a = standby_a.wait_listening(WAIT);
    eprintln!("failover 2 (active node cut off): first ack after {failover:?}");
    let stopped = node_b
        .wait_exit(WAIT)
        .expect("the cut-off node stops by itself");
    assert!(!stopped.success());
    assert!(node_b.log().contains("lost the lease"), "{}", node_b.log());
    lan.heal(host_b);
    let standby_b = site.node(host_b, GROUP, "b", "b-again");
    assert!(wait_for(WAIT, || standby_b
        .log()
        .contains("waiting for it")));
    sends.wait_more(Instant::now(), 5);

    let acked = sends.finish();
    let dms_acked = dms.finish();
    ok(site.run(c1, "alice", &["send", OTHER, "after"]));

    // 0 acked messages lost, no gap or duplicate in the log, each where its ack said.
    let log: Vec<serde_json::Value> = ok(site.run(c2, "bob", &["--json", "messages", GROUP]))
        .stdout
        .lines()
        .filter_map(json)
        .collect();
    let seqs: Vec<u64> = log.iter().filter_map(|e| e["seq"].as_u64()).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "a gap or a duplicate in the log");
    for ack in &acked {
        let stored: Vec<&serde_json::Value> = log
            .iter()
            .filter(|e| e["body"] == ack.body.as_str())
            .collect();
        assert_eq!(
            stored.len(),
            1,
            "{} stored {} times",
            ack.body,
            stored.len()
        );
        assert_eq!(
            stored[0]["seq"].as_u64(),
            Some(ack.seq),
            "{} moved",
            ack.body
        );
    }
    eprintln!("{} acked sends, all in the log once", acked.len());

    // The subscriber: every seq once, in order, across both failovers.
    let last = *expected.last().expect("entries");
    let entries = |lines: &[String]| -> Vec<u64> {
        lines
            .iter()
            .filter_map(|l| json(l))
            .filter(|v| v.get("group").is_some())
            .filter_map(|v| v["seq"].as_u64())
            .collect()
    };
    assert!(
        watch.wait_lines(WAIT, |lines| entries(lines).len() as u64 >= last),
        "the subscriber stopped at {:?}",
        entries(&watch.lines).last()
    );
    assert_eq!(
        entries(&watch.lines),
        expected,
        "the subscriber saw a gap or a duplicate"
    );

    // Every acked DM reached bob once.
    let dm_bodies = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| json(l))
            .filter(|v| v.get("from").is_some())
            .filter_map(|v| v["body"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(
        watch.wait_lines(WAIT, |lines| {
            let got = dm_bodies(lines);
            dms_acked.iter().all(|a| got.contains(&a.body))
        }),
        "DMs missing: got {:?}",
        dm_bodies(&watch.lines)
    );
    let got = dm_bodies(&watch.lines);
    for body in &got {
        assert_eq!(
            got.iter().filter(|b| *b == body).count(),
            1,
            "DM {body} twice"
        );
    }
    eprintln!("{} acked DMs, each delivered once", dms_acked.len());

    // Never two nodes committing at once: by seq, the epochs only grow, and each epoch's
    // commits all come after the previous epoch's last.
    let mut all: Vec<_> = ["a", "b", "a-again", "b-again"]
        .iter()
        .flat_map(|tag| {
            commits(
                &std::fs::read_to_string(dir.path().join(format!("node-{tag}.log")))
                    .unwrap_or_default(),
            )
        })
        .collect();
    all.sort_by_key(|c| c.2);
    for pair in all.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(a.3 < b.2, "overlapping commits {a:?} {b:?}");
        assert!(
            a.1 <= b.1,
            "an older epoch committed after a newer one: {a:?} {b:?}"
        );
        if a.1 != b.1 {
            assert!(
                a.0 < b.0,
                "epoch {} committed before epoch {} ended",
                b.1,
                a.1
            );
        }
    }
    let epochs: std::collections::BTreeSet<i64> = all.iter().map(|c| c.1).collect();
    assert!(
        epochs.len() >= 3,
        "expected three active terms, saw epochs {epochs:?}"
    );

    // The second group kept its own log.
    let other: Vec<serde_json::Value> = ok(site.run(c2, "bob", &["--json", "messages", OTHER]))
        .stdout
        .lines()
        .filter_map(json)
        .filter(|e| e["kind"] == "message")
        .collect();
    assert_eq!(other.len(), 2);
    drop((node_a, standby_b, watch));
}
