//! The lease that makes one node of a group the active one, when the group's log is in
//! PostgreSQL and several nodes (on different hosts) share it: the zguide's Binary Star,
//! with the database as the arbiter instead of a peer-to-peer vote.
//!
//! # Protocol
//! - **The lease** is a session-level advisory lock, `pg_try_advisory_lock(hashtextextended(
//!   'agora-lease:' || schema, 0))`, held by a connection of its own: one per schema, so one
//!   for all the groups of a host ([`PgSchema::Host`]; 10,000 locks per host would overflow
//!   PostgreSQL's lock table), one per group for a node of one ([`PgSchema::Group`]). A
//!   standby tries to take it every [`LeaseConfig::poll`] (default 100 ms). PostgreSQL frees it when that session
//!   ends: at once when the holder's process dies (its kernel closes the socket), and
//!   within the target's network timeout ([`PgTarget::with_net_timeout`], default 2 s:
//!   keepalives and `tcp_user_timeout`,
//!   set on the server's side of the session too) when the holder's host or link is gone.
//! - **The epoch** (the fencing token) is bumped by every taker, in `lease.epoch`, right
//!   after it takes the lock; the store checks it in every commit's transaction
//!   ([`PgStore`](crate::store::PgStore)), so a node that lost the lease can never commit,
//!   even if it has not noticed yet.
//! - **The holder checks** its lease connection every [`LeaseConfig::check`] (default
//!   200 ms) with a `SELECT 1`. With no success for [`LeaseConfig::timeout`] (default
//!   1.5 s, shorter than the server's detection), or an error, [`Lease::held`] turns false
//!   and the node stops serving (fail-stop): it never serves on a lease it may have lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agora_common::shutdown::Shutdown;
use agora_proto::wire::GroupName;

use crate::store::postgres::{connect, prepare, PgSchema, PgTarget};
use crate::store::StoreError;

/// How a node takes and keeps the lease.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The database, its TLS and network timeout (default 2 s).
    pub target: PgTarget,
    /// The schema whose lease this is: a group's (a node of one) or a host's.
    pub schema: PgSchema,
    /// Who asks, for `lease.holder` and the logs (default `HOST pid PID`).
    pub holder: String,
    /// How often a standby tries to take the lease (default 100 ms).
    pub poll: Duration,
    /// How often the holder checks its lease connection (default 200 ms).
    pub check: Duration,
    /// How long the holder may go without a successful check before it stops, and how
    /// long the database may stay unreachable at start before [`Lease::acquire`] gives up
    /// (default 1.5 s).
    pub timeout: Duration,
}

impl LeaseConfig {
    /// The defaults for a node of the one group `group` in the database `target`.
    pub fn new(target: PgTarget, group: GroupName) -> LeaseConfig {
        LeaseConfig::of(target, PgSchema::Group(group))
    }

    /// The defaults for the lease of `schema` (a group host's: [`PgSchema::Host`]) in the
    /// database `target`.
    pub fn of(target: PgTarget, schema: PgSchema) -> LeaseConfig {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown-host".to_owned());
        LeaseConfig {
            target,
            schema,
            holder: format!("{host} pid {}", std::process::id()),
            poll: Duration::from_millis(100),
            check: Duration::from_millis(200),
            timeout: Duration::from_millis(1500),
        }
    }
}

/// A held lease; dropping it ends its session, which frees it.
#[derive(Debug)]
pub struct Lease {
    epoch: i64,
    base: Instant,
    /// Milliseconds after `base` of the last successful check.
    last_ok: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    timeout: Duration,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Lease {
    /// Waits until this node holds the lease, then bumps the epoch and starts checking.
    /// Returns `Ok(None)` if `shutdown` is triggered first.
    ///
    /// At start, a database that refuses this node (authentication, a database that does
    /// not exist: [`agora_common::pgtls::is_refusal`]) fails at once, and one that cannot
    /// be reached fails after [`LeaseConfig::timeout`]. Once it has been reached, a standby
    /// keeps waiting through any outage (it outlives a database restart), with one warning
    /// per outage.
    ///
    /// # Errors
    /// [`StoreError::Postgres`] at start, as above; [`StoreError::SchemaTooNew`] or
    /// [`StoreError::WrongGroup`] (no point retrying); a thread that cannot start, as
    /// [`StoreError::Corrupt`].
    pub fn acquire(config: &LeaseConfig, shutdown: &Shutdown) -> Result<Option<Lease>, StoreError> {
        let schema = config.schema.name();
        let mut announced = false;
        let started = Instant::now();
        // Whether the database was ever reached: until then, it is the start that fails.
        let mut reached = false;
        // Whether the current outage was logged.
        let mut warned = false;
        let mut session: Option<postgres::Client> = None;
        let mut client = loop {
            if shutdown.is_triggered() {
                return Ok(None);
            }
            let taken = Self::try_take(config, &schema, &mut session);
            if session.is_some() {
                reached = true;
                if warned {
                    tracing::info!(lease = %config.schema, "reached the database again");
                    warned = false;
                }
            }
            match taken {
                Ok(true) => match session.take() {
                    Some(client) => break client,
                    None => continue,
                },
                Ok(false) => {
                    if !announced {
                        tracing::info!(lease = %config.schema, "standby: another node holds the lease; waiting for it");
                        announced = true;
                    }
                }
                Err(e @ (StoreError::SchemaTooNew { .. } | StoreError::WrongGroup { .. })) => {
                    return Err(e)
                }
                Err(StoreError::Postgres(e))
                    if !reached
                        && (agora_common::pgtls::is_refusal(&e)
                            || started.elapsed() >= config.timeout) =>
                {
                    return Err(StoreError::Postgres(e))
                }
                Err(e) => {
                    session = None;
                    if !reached {
                        // The start's own retries: it fails with one line if they run out.
                        tracing::debug!(error = %e, "cannot reach the database yet; retrying");
                    } else if !warned {
                        tracing::warn!(error = %e,
                            "cannot reach the database for the lease; retrying until it answers");
                        warned = true;
                    }
                    std::thread::sleep(config.poll.max(Duration::from_millis(500)));
                }
            }
            std::thread::sleep(config.poll);
        };
        let epoch: i64 = client
            .query_one(
                "UPDATE lease SET epoch = epoch + 1, holder = $1, since = now()
                 WHERE id = 1 RETURNING epoch",
                &[&config.holder],
            )?
            .get(0);
        tracing::info!(lease = %config.schema, epoch, "took the lease: this node is active");
        let base = Instant::now();
        let last_ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel();
        let thread = {
            let (last_ok, failed, check) =
                (Arc::clone(&last_ok), Arc::clone(&failed), config.check);
            std::thread::Builder::new()
                .name("lease".into())
                .spawn(move || loop {
                    match stopped.recv_timeout(check) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    match client.batch_execute("SELECT 1") {
                        Ok(()) => {
                            let ms = u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX);
                            last_ok.store(ms, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the lease's connection failed");
                            failed.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                })
                .map_err(|e| StoreError::Corrupt(format!("lease thread: {e}")))?
        };
        Ok(Some(Lease {
            epoch,
            base,
            last_ok,
            failed,
            timeout: config.timeout,
            stop: Some(stop),
            thread: Some(thread),
        }))
    }

    /// One attempt to take the lock on `session` (connected and the schema prepared
    /// first, if it is not yet); whether it was taken.
    fn try_take(
        config: &LeaseConfig,
        schema: &str,
        session: &mut Option<postgres::Client>,
    ) -> Result<bool, StoreError> {
        let client = match session {
            Some(client) => client,
            None => {
                let mut client = connect(&config.target, "lease")?;
                prepare(&mut client, &config.schema)?;
                session.insert(client)
            }
        };
        Ok(client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('agora-lease:' || $1, 0))",
                &[&schema],
            )?
            .get(0))
    }

    /// The fencing epoch this lease was taken with.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Whether the lease is still surely held: its connection answered within the timeout
    /// and never failed.
    pub fn held(&self) -> bool {
        if self.failed.load(Ordering::Relaxed) {
            return false;
        }
        let last = Duration::from_millis(self.last_ok.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last) < self.timeout
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
