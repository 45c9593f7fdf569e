//! PostgreSQL for `--postgres`: one throwaway cluster per bench run
//! ([`agora_tests::pg::PgCluster`]: `initdb` in a temporary directory, a server on a Unix
//! socket only, on this machine), its durability settings set and checked ([`DURABLE`]),
//! moved to the servers' CPU, and a fresh database for every run that stores in it. Also the
//! storage floor of the PostgreSQL rows: [`PgStore`] alone, in-process.
//!
//! [`PgStore`]: agora_group_node::store::PgStore

use std::time::{Duration, Instant};

use agora_tests::pg::PgCluster;
use anyhow::{anyhow, bail, Context};

/// The settings that make a commit's ack mean "durable": set with `ALTER SYSTEM` and checked
/// with `SHOW` on a new connection before any run. They are PostgreSQL's defaults; the bench
/// states them rather than trusting that nothing changed them.
pub const DURABLE: [(&str, &str); 3] = [
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "on"),
];

/// The bench's cluster (stopped and removed on drop), and the databases made in it so far.
pub struct Postgres {
    cluster: PgCluster,
    databases: u32,
    /// What the table's heading says of the cluster: version, where it runs, its settings.
    pub note: String,
}

impl Postgres {
    /// Starts the cluster, makes it durable ([`DURABLE`]) and pins its processes to the
    /// servers' CPU.
    ///
    /// # Errors
    /// PostgreSQL not installed, a cluster that does not start (`PgCluster::start` panics;
    /// the panic is caught here), or a setting that does not read back as set.
    pub fn start() -> anyhow::Result<Postgres> {
        let installed = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("bin/initdb").is_file());
        if !installed {
            bail!(
                "PostgreSQL is not installed (no /usr/lib/postgresql/N/bin/initdb): \
                 `apt-get install postgresql` (scripts/deps.sh --postgres), or run without --postgres"
            );
        }
        let cluster = std::panic::catch_unwind(PgCluster::start).map_err(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            anyhow!("the PostgreSQL cluster did not start: {why}")
        })?;
        let mut pg = Postgres {
            cluster,
            databases: 0,
            note: String::new(),
        };
        let settings = pg.make_durable()?;
        let pinned = pg.pin_to_servers();
        pg.note = format!(
            "PostgreSQL {settings}: a throwaway cluster started by the bench on this machine, \
             reached over a Unix socket (no TCP), {pinned}"
        );
        Ok(pg)
    }

    fn connect(&self, database: &str) -> anyhow::Result<postgres::Client> {
        postgres::Client::connect(&self.cluster.url(database), postgres::NoTls)
            .with_context(|| format!("connecting to the bench's PostgreSQL ({database})"))
    }

    /// Sets [`DURABLE`], reloads, and waits (10 s at most) until a new connection shows
    /// every value; returns the version and the settings as read back.
    fn make_durable(&self) -> anyhow::Result<String> {
        let mut db = self.connect("postgres")?;
        for (name, value) in DURABLE {
            // One statement per call: ALTER SYSTEM refuses to run in a transaction block.
            db.batch_execute(&format!("ALTER SYSTEM SET {name} = {value}"))?;
        }
        db.batch_execute("SELECT pg_reload_conf()")?;
        let show = |db: &mut postgres::Client, name: &str| -> anyhow::Result<String> {
            Ok(db.query_one(&format!("SHOW {name}"), &[])?.get(0))
        };
        // The reload is a signal to the postmaster: read back on fresh connections until
        // it took effect.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut db = self.connect("postgres")?;
            let mut wrong = Vec::new();
            for (name, value) in DURABLE {
                let got = show(&mut db, name)?;
                if got != value {
                    wrong.push(format!("{name}={got}"));
                }
            }
            if wrong.is_empty() {
                let version = show(&mut db, "server_version")?;
                let sync_method = show(&mut db, "wal_sync_method")?;
                let set: Vec<String> = DURABLE.iter().map(|(n, v)| format!("{n}={v}")).collect();
                return Ok(format!(
                    "{version} ({}, wal_sync_method={sync_method})",
                    set.join(", ")
                ));
            }
            if Instant::now() > deadline {
                bail!(
                    "PostgreSQL still shows {} 10 s after ALTER SYSTEM",
                    wrong.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Moves the postmaster and the processes it has forked so far to the servers' CPU
    /// (the cluster inherited the bench's own pinning); backends forked later inherit it.
    /// Returns a description for the heading.
    fn pin_to_servers(&self) -> String {
        let Some((server, _)) = crate::servers::cpus() else {
            return "not pinned".into();
        };
        let pid_file = self.cluster.socket_dir().join("data/postmaster.pid");
        let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
        else {
            return "not pinned (no postmaster.pid)".into();
        };
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let mut all = vec![pid];
        all.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
        if all.iter().all(|&p| crate::servers::pin(p, server)) {
            format!("on the servers' CPU {server} with the nodes")
        } else {
            "not pinned (taskset failed)".into()
        }
    }

    /// Creates a fresh, empty database and returns its URL (`postgresql:///benchN?host=…`).
    ///
    /// # Errors
    /// When the server refuses.
    pub fn database(&mut self) -> anyhow::Result<String> {
        self.databases += 1;
        let name = format!("bench{}", self.databases);
        self.connect("postgres")?
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .with_context(|| format!("creating database {name}"))?;
        Ok(self.cluster.url(&name))
    }
}

/// The storage floor of the PostgreSQL rows: `count` appends through [`PgStore`] alone
/// (in this process, no network, no node), each its own transaction and commit, as the
/// node's commit stage does at 1 in flight. Messages per second.
///
/// [`PgStore`]: agora_group_node::store::PgStore
///
/// # Errors
/// The store's errors.
pub fn store_commit_rate(url: &str, count: u64, bytes: usize) -> anyhow::Result<f64> {
    use agora_group_node::store::PgStore;
    let group = agora_proto::wire::GroupName::new("floor")?;
    let sender = agora_proto::wire::UserName::new("floor")?;
    let target = agora_group_node::store::postgres::PgTarget::new(url);
    let mut store = PgStore::open(&target, &group, None)?;
    crate::floor::commit_rate(&mut store, &sender, count, bytes)
}
