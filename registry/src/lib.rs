//! The Agora registry: the central directory of groups.
//!
//! Group nodes `register` their name and endpoint and repeat it every heartbeat interval;
//! entries not refreshed within the TTL expire. Clients `list` groups and `lookup` one by
//! name. The wire protocol is `docs/PROTOCOL.md`.
//!
//! # Layout
//! - [`Registry`]: binds the ROUTER ([`Registry::bind`]) and runs the request loop
//!   ([`Registry::run`]) until shutdown.
//! - [`store`]: the [`store::RegistryStore`] trait every handler calls, and its two
//!   backends.
//! - [`directory`], [`presence`]: the live groups and user sessions, in memory (SQLite
//!   backend); [`owners`], [`users`], [`mailbox`]: the SQLite tables.
//! - `cmd/`: one handler per action.
//!
//! # Storage
//! Without `--store` the registry keeps its durable state (name owners, accounts,
//! mailboxes) in `registry.sqlite3` in its data directory, and the directory and presence
//! in memory: one registry per machine. With `--store postgres://…` it keeps all of it,
//! its key pair included, in the PostgreSQL schema `agora_registry`, and several registries
//! over one database answer as one registry: any of them lists the groups heartbeating
//! another, and a DM sent through one is read and acked through another. See [`store`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agora_common::keys::{KeyError, Keypair, PublicKey};
use agora_common::zap::{Authenticator, ZapPolicy};

use agora_common::ratelimit::{Limiter, RateLimit};
use agora_common::server::{
    answer, bind_router, recv_batch_wait, reply_frames, send_reply, Incoming, RouterOptions,
};
use agora_common::shutdown::{Shutdown, SHUTDOWN_POLL};
use agora_proto::action::{call, RegistryRequest};
use agora_proto::time::Timestamp;

mod cmd;
pub mod directory;
pub mod mailbox;
pub mod owners;
pub mod presence;
pub mod store;
pub mod users;

use store::{RegistryStore, StoreError, StoreSettings};

/// Default bind endpoint.
pub const DEFAULT_BIND: &str = "tcp://0.0.0.0:5555";
/// The file in the data directory where a running SQLite registry names the endpoint it
/// bound (one line, `tcp://IP:PORT`), so that `registry release` can ask it: the registry
/// holds its database alone while it runs ([`owners::VFS`]). Written at bind, removed at a
/// clean stop.
pub const ENDPOINT_FILE: &str = "registry.endpoint";

/// Registry requests are small; larger frames disconnect the peer (64 KiB).
pub const MAX_REQUEST_BYTES: i64 = 64 << 10;

/// Registry settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to bind the ROUTER (`tcp://IP:PORT`, port 0 for any); default
    /// [`DEFAULT_BIND`].
    pub bind: String,
    /// How often group nodes are expected to refresh (default 2 s).
    pub heartbeat: Duration,
    /// How many missed intervals expire an entry (default 3, so the TTL is 6 s).
    pub ttl_intervals: u32,
    /// The most groups held at once (default 10,000).
    pub max_groups: usize,
    /// Where the registry's key pair lives (`registry.key`, `registry.key_secret`, made on
    /// first start) and, without `store`, its SQLite file; default
    /// `~/.local/share/agora/registry`.
    pub data_dir: PathBuf,
    /// The PostgreSQL database to keep everything in (`postgres://…` or
    /// `postgresql://…`), shared with any other registry given the same one; default none:
    /// SQLite in `data_dir` and memory (see [`store`]).
    pub store: Option<String>,
    /// The files TLS to `store` is set up from: the CA certificates its server certificate
    /// must chain to (the connection is then TLS, checked against the URL's host name) and a
    /// client certificate with its key; default none: TLS only when the URL says
    /// `sslmode=require` ([`agora_common::pgtls`]).
    pub store_tls: agora_common::pgtls::PgTlsFiles,
    /// Serve without CURVE. Refused unless the bind endpoint is loopback.
    pub insecure: bool,
    /// Requests per second per peer (default 2,000, bursts of 4,000; rate 0 disables).
    pub rate_limit: RateLimit,
    /// How long a user session lives without a `connect` renewal (default 30 s).
    pub presence_ttl: Duration,
    /// Most direct messages waiting in one mailbox (default 1,000).
    pub max_mailbox: u64,
    /// Most user accounts (default 100,000).
    pub max_users: u64,
    /// How long a direct message waits unread before it expires to the sender's dead
    /// letters (default 7 days).
    pub dm_ttl: Duration,
    /// Where the plaintext key endpoint binds (see `agora_common::trust`); default: the bind
    /// endpoint's host and the next port (port 0 stays 0). None with `insecure`.
    pub key_bind: Option<String>,
    /// The operator's CURVE public key: the one key whose `stop` is accepted (default none:
    /// only SIGINT or SIGTERM stop the registry).
    pub operator: Option<PublicKey>,
    /// Accounts that may `broadcast` besides the operator (default none).
    pub admins: Vec<agora_proto::wire::UserName>,
    /// The share of a mailbox one sender may fill, in percent of `max_mailbox` (1 to 100,
    /// default 10: 100 of 1,000 messages; at least one message); past it, `share_full`.
    pub dm_share_percent: u8,
    /// Direct messages per second per sender key (`send_dm`, `multicast`, `broadcast`;
    /// default 10, bursts of 100; rate 0 disables); past it, `rate_limited`.
    pub dm_rate: RateLimit,
    /// The most group names one key may own (default 100: a group host serves many groups
    /// with one key); past it, `too_many_names`.
    pub max_names_per_key: u64,
    /// How long a group name stays bound to its key after its group last registered
    /// (default 30 days); then any key may claim it.
    pub name_lapse: Duration,
    /// Group hosts' keys (`--host-key`, default none): each may own up to `max_groups`
    /// names instead of `max_names_per_key`.
    pub host_keys: Vec<PublicKey>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: DEFAULT_BIND.to_owned(),
            heartbeat: Duration::from_secs(2),
            ttl_intervals: 3,
            max_groups: 10_000,
            data_dir: directories::ProjectDirs::from("", "", "agora")
                .map(|d| d.data_dir().join("registry"))
                .unwrap_or_else(|| PathBuf::from("agora-registry")),
            store: None,
            store_tls: Default::default(),
            insecure: false,
            rate_limit: RateLimit::default(),
            key_bind: None,
            presence_ttl: Duration::from_secs(30),
            max_mailbox: 1000,
            max_users: 100_000,
            dm_ttl: Duration::from_secs(7 * 24 * 3600),
            operator: None,
            admins: Vec::new(),
            dm_share_percent: 10,
            dm_rate: RateLimit {
                rate: 10.0,
                burst: 100.0,
                ..RateLimit::default()
            },
            max_names_per_key: 100,
            name_lapse: Duration::from_secs(30 * 24 * 3600),
            host_keys: Vec::new(),
        }
    }
}

impl Config {
    /// The time an entry lives without a refresh.
    pub fn ttl(&self) -> Duration {
        self.heartbeat * self.ttl_intervals.max(1)
    }

    /// [`Config::heartbeat`] in milliseconds, as replies carry it.
    pub fn heartbeat_ms(&self) -> u64 {
        u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX)
    }

    /// [`Config::ttl`] in milliseconds, as replies carry it.
    pub fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl().as_millis()).unwrap_or(u64::MAX)
    }

    /// The most group names `key` may own: `max_groups` for a host key
    /// ([`Config::host_keys`]), else `max_names_per_key`.
    pub fn max_names_for(&self, key: &PublicKey) -> u64 {
        if self.host_keys.contains(key) {
            u64::try_from(self.max_groups).unwrap_or(u64::MAX)
        } else {
            self.max_names_per_key
        }
    }

    /// The most messages one sender may have waiting in one mailbox: `dm_share_percent` of
    /// `max_mailbox`, rounded up, at least 1.
    pub fn dm_share(&self) -> u64 {
        let percent = u64::from(self.dm_share_percent.clamp(1, 100));
        self.max_mailbox
            .saturating_mul(percent)
            .div_ceil(100)
            .max(1)
    }

    /// The store's limits these settings give.
    pub fn store_settings(&self) -> StoreSettings {
        StoreSettings {
            group_ttl: self.ttl(),
            max_groups: self.max_groups,
            presence_ttl: self.presence_ttl,
            max_users: self.max_users,
            max_names_per_key: self.max_names_per_key,
            name_lapse: self.name_lapse,
            dm_share: self.dm_share(),
        }
    }
}

/// Registry failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The ROUTER could not be bound.
    #[error("cannot bind {endpoint}")]
    Bind {
        /// The endpoint asked for.
        endpoint: String,
        /// libzmq's error.
        source: zmq::Error,
    },
    /// libzmq failed while serving.
    #[error("zmq")]
    Zmq(#[from] zmq::Error),
    /// The key pair could not be loaded or made, or this libzmq has no CURVE.
    #[error("the registry's key pair")]
    Keys(#[from] KeyError),
    /// `--insecure` with an endpoint that is not loopback.
    #[error("--insecure is allowed only on loopback endpoints, not {0}")]
    InsecureNotLoopback(String),
    /// The store could not be opened, migrated, or give the key pair.
    #[error("store")]
    Store(#[from] StoreError),
}

/// A bound registry, ready to [`run`](Registry::run).
pub struct Registry {
    config: Config,
    socket: zmq::Socket,
    endpoint: String,
    public_key: Option<PublicKey>,
    /// Everything durable or shared: directory, owners, accounts, presence, mailboxes.
    store: Box<dyn RegistryStore>,
    /// Live connections that asked for DM pushes, by key, until their session's TTL.
    dm_subs: std::collections::HashMap<PublicKey, (agora_proto::codec::Frames, Instant)>,
    /// DMs stored by the request being served, to push once it is answered.
    pending_push: Vec<(PublicKey, agora_proto::wire::Dm)>,
    key_service: Option<agora_common::trust::KeyService>,
    limiter: Limiter<agora_common::server::Peer>,
    /// Direct messages per sender key ([`Config::dm_rate`]).
    dm_limiter: Limiter<PublicKey>,
    _zap: Option<Authenticator>,
    /// Set by the operator's `stop`: the loop ends and the registry exits.
    stopping: bool,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Opens the store ([`Config::store`]) and binds the registry's ROUTER and key endpoint.
    /// With SQLite, the sockets are bound first (a new key pair is made in memory for that
    /// and saved after), so a port that cannot be bound leaves no data directory and no key
    /// pair behind; with PostgreSQL, which holds the key pair, the store comes first. Either
    /// way the key endpoint hands out the public key only once the key pair is saved.
    ///
    /// # Errors
    /// [`RegistryError::Bind`], [`RegistryError::InsecureNotLoopback`],
    /// [`RegistryError::Keys`], [`RegistryError::Store`] (the store cannot be opened or
    /// migrated, or its schema is newer than this build).
    pub fn bind(ctx: &zmq::Context, config: Config) -> Result<Registry, RegistryError> {
        if config.insecure && !agora_proto::wire::is_loopback(&config.bind) {
            return Err(RegistryError::InsecureNotLoopback(config.bind.clone()));
        }
        let key_path = config.data_dir.join("registry.key");
        // SQLite keeps the key pair in files: read it, or make one in memory, and bind.
        let early = match (&config.store, config.insecure) {
            (None, false) => {
                agora_common::keys::require_curve()?;
                let pair = if agora_common::keys::secret_path(&key_path).exists() {
                    (Keypair::load(&key_path)?, false)
                } else {
                    (Keypair::generate()?, true)
                };
                let zap = Authenticator::start(ctx, ZapPolicy::default())?;
                let sockets = Registry::bind_sockets(ctx, &config, Some(pair.0.clone()))?;
                Some((Some(pair), Some(zap), sockets))
            }
            (None, true) => Some((None, None, Registry::bind_sockets(ctx, &config, None)?)),
            (Some(_), _) => None,
        };
        let settings = config.store_settings();
        let mut store = store::open(
            config.store.as_deref(),
            &config.store_tls,
            &config.data_dir,
            settings,
            !config.insecure,
        )?;
        tracing::info!(backend = store.backend(), "registry store open");
        if config.insecure {
            tracing::warn!("running WITHOUT encryption or authentication (--insecure)");
        }
        let (public_key, zap, (socket, endpoint, key_listener)) = match early {
            Some((None, _, sockets)) => (None, None, sockets),
            Some((Some((keys, new)), zap, sockets)) => {
                if new {
                    keys.save(&key_path)?;
                }
                // The store reads the pair just saved (or the one there before).
                let (stored, _) = store.key_pair(&config.data_dir)?;
                if stored.public != keys.public {
                    return Err(RegistryError::Keys(KeyError::Mismatch(key_path)));
                }
                if new {
                    tracing::info!(public_key = %keys.public, "made a new registry key pair");
                }
                (Some(keys.public), zap, sockets)
            }
            None if config.insecure => (None, None, Registry::bind_sockets(ctx, &config, None)?),
            None => {
                agora_common::keys::require_curve()?;
                let (keys, created) = store.key_pair(&config.data_dir)?;
                if created {
                    tracing::info!(public_key = %keys.public, "made a new registry key pair");
                }
                let zap = Authenticator::start(ctx, ZapPolicy::default())?;
                let public = keys.public;
                (
                    Some(public),
                    Some(zap),
                    Registry::bind_sockets(ctx, &config, Some(keys))?,
                )
            }
        };
        // The key pair is saved now (in files or in the database): hand out its public key.
        let key_service = match (key_listener, public_key) {
            (Some(listener), Some(key)) => {
                let bind = listener.endpoint().to_owned();
                Some(
                    listener
                        .serve(ctx, key)
                        .map_err(|source| RegistryError::Bind {
                            endpoint: bind,
                            source,
                        })?,
                )
            }
            _ => None,
        };
        if config.store.is_none() && public_key.is_some() {
            let path = config.data_dir.join(ENDPOINT_FILE);
            if let Err(e) =
                agora_common::fsmode::write_private(&path, format!("{endpoint}\n").as_bytes())
            {
                tracing::warn!(path = %path.display(), error = %e,
                    "could not write the endpoint file: `registry release` cannot reach this \
                     registry while it runs");
            }
        }
        let limiter = Limiter::new(config.rate_limit);
        let dm_limiter = Limiter::new(config.dm_rate);
        Ok(Registry {
            config,
            socket,
            endpoint,
            public_key,
            store,
            dm_subs: std::collections::HashMap::new(),
            pending_push: Vec::new(),
            key_service,
            limiter,
            dm_limiter,
            _zap: zap,
            stopping: false,
        })
    }

    /// Binds the ROUTER (a CURVE server with `curve`) and, with a key, the plaintext key
    /// endpoint ([`Config::key_bind`], default the next port), which does not answer until
    /// it is served ([`agora_common::trust::KeyListener::serve`]).
    fn bind_sockets(
        ctx: &zmq::Context,
        config: &Config,
        curve: Option<Keypair>,
    ) -> Result<
        (
            zmq::Socket,
            String,
            Option<agora_common::trust::KeyListener>,
        ),
        RegistryError,
    > {
        let with_key = curve.is_some();
        let options = RouterOptions {
            max_request_bytes: MAX_REQUEST_BYTES,
            hwm: 1000,
            heartbeat: Some(Duration::from_secs(1)),
            curve,
        };
        let (socket, endpoint) =
            bind_router(ctx, &config.bind, options).map_err(|source| RegistryError::Bind {
                endpoint: config.bind.clone(),
                source,
            })?;
        let key_listener = if with_key {
            {
                let bind = config.key_bind.clone().unwrap_or_else(|| {
                    match config.bind.strip_suffix(":0") {
                        Some(_) => config.bind.clone(),
                        None => agora_common::trust::default_key_endpoint(&config.bind)
                            .unwrap_or_else(|| config.bind.clone()),
                    }
                });
                Some(
                    agora_common::trust::KeyService::bind(ctx, &bind).map_err(|source| {
                        RegistryError::Bind {
                            endpoint: bind.clone(),
                            source,
                        }
                    })?,
                )
            }
        } else {
            None
        };
        Ok((socket, endpoint, key_listener))
    }

    /// Where the plaintext key endpoint listens (`None` with `--insecure`).
    pub fn key_endpoint(&self) -> Option<&str> {
        self.key_service.as_ref().map(|k| k.endpoint())
    }

    /// The registry's CURVE public key (`None` with `--insecure`): clients and group nodes
    /// need it to connect.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.public_key
    }

    /// The endpoint really bound (with the chosen port when bound to port 0).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Serves requests until `shutdown` is triggered or the operator's `stop` arrives; each
    /// request is committed before its reply, so stopping then only refuses (with
    /// `shutting_down`) what is already waiting.
    ///
    /// # Errors
    /// [`RegistryError::Zmq`] when the socket fails; a peer's bad request is answered and
    /// never ends the loop.
    pub fn run(mut self, shutdown: &Shutdown) -> Result<(), RegistryError> {
        tracing::info!(endpoint = %self.endpoint,
            ttl = %humantime::format_duration(self.config.ttl()), "registry serving");
        let mut batch = Vec::new();
        let mut next_sweep = Instant::now();
        let poll_ms = i32::try_from(SHUTDOWN_POLL.as_millis()).unwrap_or(100);
        while !shutdown.is_triggered() && !self.stopping {
            recv_batch_wait(&self.socket, 256, &mut batch, poll_ms)?;
            for frames in batch.drain(..) {
                self.serve_one(frames)?;
            }
            self.push_stored_elsewhere()?;
            if Instant::now() >= next_sweep {
                self.sweep();
                next_sweep = Instant::now() + self.config.heartbeat / 2;
            }
        }
        agora_common::metrics::set_draining();
        // Whatever is waiting gets `shutting_down` rather than silence.
        agora_common::server::recv_batch(&self.socket, 256, &mut batch)?;
        for frames in batch.drain(..) {
            if let Ok(incoming) = Incoming::<RegistryRequest>::from_received(frames) {
                send_reply(
                    &self.socket,
                    incoming.envelope,
                    reply_frames::<()>(Err(stopping())),
                )?;
            }
        }
        if self.config.store.is_none() && self.public_key.is_some() {
            let _ = std::fs::remove_file(self.config.data_dir.join(ENDPOINT_FILE));
        }
        tracing::info!("registry stopped");
        Ok(())
    }

    /// Frees what has expired (sessions, DMs to dead letters, groups, push subscriptions)
    /// and updates the gauges. A store failure is logged; the next sweep tries again.
    fn sweep(&mut self) {
        if let Err(e) = self.store.expire_sessions() {
            tracing::error!(error = %e, "expiring presence sessions failed");
        }
        if !self.config.insecure {
            match self.store.expire_dms(self.config.dm_ttl, Timestamp::now()) {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "direct messages expired to dead letters"),
                // An unwritable store logged its cause once already.
                Err(e) if e.is_logged() => {
                    tracing::debug!(error = %e, "expiring direct messages failed")
                }
                Err(e) => tracing::error!(error = %e, "expiring direct messages failed"),
            }
        }
        let now = Instant::now();
        self.dm_subs.retain(|_, (_, until)| *until > now);
        match self.store.expire_groups(Timestamp::now()) {
            Ok(names) => {
                for name in names {
                    tracing::info!(group = %name, "group expired: no heartbeat within TTL");
                }
            }
            Err(e) => tracing::error!(error = %e, "expiring groups failed"),
        }
        self.update_gauges();
    }

    /// Pushes the DMs that other registries sharing the store stored for recipients
    /// connected here (nothing with a store of this registry's own).
    fn push_stored_elsewhere(&mut self) -> Result<(), RegistryError> {
        let stored = match self.store.stored_elsewhere() {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(error = %e, "reading DMs stored by other registries failed");
                return Ok(());
            }
        };
        for (recipient, n) in stored {
            if !self.dm_subs.contains_key(&recipient) {
                continue;
            }
            match self.store.fetch_dms(&recipient, n.saturating_sub(1), 1) {
                Ok((dms, _)) => {
                    let dm = dms.into_iter().find(|dm| dm.n == n);
                    self.pending_push.extend(dm.map(|dm| (recipient, dm)));
                }
                Err(e) => tracing::error!(error = %e, "reading a DM to push failed"),
            }
        }
        self.push_dms()
    }

    fn serve_one(&mut self, frames: agora_common::server::Received) -> Result<(), RegistryError> {
        let incoming = match Incoming::from_received(frames) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "dropped unanswerable message");
                return Ok(());
            }
        };
        let limited =
            agora_common::server::rate_limit(&mut self.limiter, &incoming, Instant::now());
        // A `connect` with `push` makes this connection the one DMs are pushed to.
        match (&incoming.request, incoming.peer) {
            (Ok(RegistryRequest::Connect(c)), Some(key))
                if c.push
                    && limited.is_none()
                    && self.store.user_by_key(&key).ok().flatten().is_some() =>
            {
                let until = Instant::now() + self.config.presence_ttl;
                self.dm_subs.insert(key, (incoming.envelope.clone(), until));
            }
            (Ok(RegistryRequest::Disconnect(_)), Some(key)) => {
                self.dm_subs.remove(&key);
            }
            _ => {}
        }
        let reply = match incoming.request {
            _ if limited.is_some() => limited.unwrap_or_default(),
            // After a `stop` in the same batch: nothing more is done.
            Ok(_) if self.stopping => reply_frames::<()>(Err(stopping())),
            Ok(RegistryRequest::StopRegistry(_)) => {
                answer::<call::StopRegistry>(self.begin_stop(incoming.peer))
            }
            Ok(request) => self.dispatch(request, incoming.peer, Timestamp::now()),
            Err(e) => {
                tracing::warn!(error = %e, "rejected request");
                let wire = e.to_wire();
                agora_common::metrics::count("invalid", Some(wire.code));
                reply_frames::<()>(Err(wire))
            }
        };
        send_reply(&self.socket, incoming.envelope, reply)?;
        self.push_dms()?;
        Ok(())
    }

    /// Pushes the DMs just stored to their recipients' live connections. A push that cannot
    /// be sent is no loss: the message waits in the mailbox until it is read and acked.
    fn push_dms(&mut self) -> Result<(), RegistryError> {
        for (recipient, dm) in std::mem::take(&mut self.pending_push) {
            let Some((envelope, _)) = self.dm_subs.get(&recipient) else {
                continue;
            };
            let event = agora_proto::wire::DmEvent {
                event: "dm".into(),
                dm,
            };
            let body = serde_json::to_vec(&event).unwrap_or_default();
            let frames = envelope
                .iter()
                .map(Vec::as_slice)
                .chain([agora_proto::wire::PROTOCOL, body.as_slice()]);
            match self.socket.send_multipart(frames, zmq::DONTWAIT) {
                Ok(()) | Err(zmq::Error::EAGAIN) => {}
                Err(zmq::Error::EHOSTUNREACH) => {
                    self.dm_subs.remove(&recipient);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// `multicast` and `broadcast` ([`cmd::dm::fan_out`]); the stored copies are pushed to
    /// their recipients' live connections once the reply is sent.
    fn fan_out(
        &mut self,
        request: cmd::dm::FanOutRequest,
        peer: Option<PublicKey>,
        now: Timestamp,
    ) -> Result<agora_proto::wire::MulticastReply, agora_proto::wire::WireError> {
        let rules = cmd::dm::FanOut {
            operator: self.config.operator,
            admins: &self.config.admins,
            max: self.config.max_mailbox,
        };
        let (reply, push) = cmd::dm::fan_out(self.store.as_mut(), peer, request, now, rules)?;
        self.pending_push.extend(push);
        Ok(reply)
    }

    /// The gauges a scrape reads: groups, accounts, mailbox depth, presence (over every
    /// registry sharing the store).
    fn update_gauges(&mut self) {
        use agora_common::metrics::{ACCOUNTS, GROUPS, MAILBOX_DEPTH, PRESENCE};
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        if let Ok(groups) = self.store.count_groups(Timestamp::now()) {
            GROUPS.set(count(groups));
        }
        if !self.config.insecure {
            if let Ok(n) = self.store.count_users() {
                ACCOUNTS.set(count(n));
            }
            if let Ok(n) = self.store.waiting_dms() {
                MAILBOX_DEPTH.set(count(n));
            }
        }
        if let Ok((online, away)) = self.store.session_counts() {
            PRESENCE.with_label_values(&["online"]).set(count(online));
            PRESENCE.with_label_values(&["away"]).set(count(away));
        }
    }

    /// `stop`: accepted from the operator's key only.
    ///
    /// # Errors
    /// `forbidden` for any other key, with no `--operator`, or on an `--insecure` registry.
    fn begin_stop(
        &mut self,
        peer: Option<PublicKey>,
    ) -> Result<agora_proto::wire::StopReply, agora_proto::wire::WireError> {
        match (peer, self.config.operator) {
            (Some(peer), Some(operator)) if peer == operator => {
                tracing::info!(by = %peer, "stop requested");
                self.stopping = true;
                Ok(agora_proto::wire::StopReply { stopping: true })
            }
            _ => Err(agora_proto::wire::WireError::new(
                agora_proto::wire::ErrorCode::Forbidden,
                "only the operator's key (--operator) may stop the registry",
            )),
        }
    }

    /// The per-sender DM rate ([`Config::dm_rate`]): `Some(reply)`, a `rate_limited` error
    /// for `action`, when `peer` sent direct messages faster than it allows.
    fn dm_rate_limited(
        &mut self,
        request: &RegistryRequest,
        peer: Option<PublicKey>,
    ) -> Option<agora_proto::codec::Frames> {
        let action = match request {
            RegistryRequest::SendDm(_)
            | RegistryRequest::Multicast(_)
            | RegistryRequest::Broadcast(_) => agora_proto::action::ServerRequest::action(request),
            _ => return None,
        };
        let wait = self.dm_limiter.check(&peer?, Instant::now()).err()?;
        let mut error = agora_proto::wire::WireError::rate_limited(wait);
        error.message = format!(
            "too many direct messages (at most {}/s from one sender); nothing was sent: retry in {} ms",
            self.config.dm_rate.rate,
            error.retry_after_ms.unwrap_or(1)
        );
        agora_common::metrics::count(action.as_str(), Some(error.code));
        Some(reply_frames::<()>(Err(error)))
    }

    fn dispatch(
        &mut self,
        request: RegistryRequest,
        peer: Option<PublicKey>,
        now: Timestamp,
    ) -> agora_proto::codec::Frames {
        if let Some(limited) = self.dm_rate_limited(&request, peer) {
            return limited;
        }
        let store = self.store.as_mut();
        match request {
            RegistryRequest::Register(r) => {
                answer::<call::Register>(cmd::register::apply(store, &self.config, r, peer, now))
            }
            RegistryRequest::Unregister(r) => {
                answer::<call::Unregister>(cmd::unregister::apply(store, r, peer, now))
            }
            RegistryRequest::UserRegister(r) => {
                answer::<call::UserRegister>(cmd::users::register(store, peer, r, now))
            }
            RegistryRequest::UserUnregister(r) => {
                answer::<call::UserUnregister>(cmd::users::unregister(store, peer, r))
            }
            RegistryRequest::SendDm(r) => {
                let result = cmd::dm::send(store, peer, r, now, self.config.max_mailbox);
                answer::<call::SendDm>(result.map(|(ack, push)| {
                    self.pending_push.extend(push);
                    ack
                }))
            }
            RegistryRequest::Multicast(r) => answer::<call::Multicast>(self.fan_out(
                cmd::dm::FanOutRequest::Multicast(r),
                peer,
                now,
            )),
            RegistryRequest::Broadcast(r) => answer::<call::Broadcast>(self.fan_out(
                cmd::dm::FanOutRequest::Broadcast(r),
                peer,
                now,
            )),
            RegistryRequest::Mailbox(r) => {
                answer::<call::Mailbox>(cmd::dm::mailbox(store, peer, r))
            }
            RegistryRequest::AckDm(r) => answer::<call::AckDm>(cmd::dm::ack(store, peer, r)),
            // Answered in `serve_one`, which may end the loop.
            RegistryRequest::StopRegistry(_) => reply_frames::<()>(Err(stopping())),
            RegistryRequest::DeadLetters(_) => {
                answer::<call::DeadLetters>(cmd::dm::dead_letters(store, peer))
            }
            RegistryRequest::Users(_) => answer::<call::Users>(cmd::users::list(store, peer)),
            RegistryRequest::Whois(r) => answer::<call::Whois>(cmd::users::whois(store, peer, r)),
            RegistryRequest::Connect(r) => answer::<call::Connect>(cmd::users::connect(
                store,
                peer,
                r,
                now,
                self.config.presence_ttl,
            )),
            RegistryRequest::List(_) => answer::<call::List>(cmd::list::apply(store, now)),
            RegistryRequest::Lookup(r) => answer::<call::Lookup>(cmd::lookup::apply(store, r, now)),
            RegistryRequest::Owner(r) => answer::<call::Owner>(cmd::owner::apply(store, r)),
            RegistryRequest::Release(r) => {
                let allowed: Vec<PublicKey> = self
                    .public_key
                    .into_iter()
                    .chain(self.config.operator)
                    .collect();
                answer::<call::Release>(cmd::release::apply(store, r, peer, &allowed))
            }
            RegistryRequest::Disconnect(_) => {
                answer::<call::Disconnect>(cmd::users::disconnect(store, peer, now))
            }
            RegistryRequest::Block(r) => {
                answer::<call::Block>(cmd::block::block(store, peer, r, now))
            }
            RegistryRequest::Unblock(r) => {
                answer::<call::Unblock>(cmd::block::unblock(store, peer, r))
            }
            RegistryRequest::Blocked(_) => {
                answer::<call::Blocked>(cmd::block::blocked(store, peer))
            }
            RegistryRequest::RegisterGroups(r) => answer::<call::RegisterGroups>(
                cmd::register_groups::apply(store, &self.config, r, peer, now),
            ),
            RegistryRequest::HeartbeatHost(r) => answer::<call::HeartbeatHost>(
                cmd::heartbeat_host::apply(store, &self.config, r, peer, now),
            ),
        }
    }
}

/// The `shutting_down` error of a stopping registry.
fn stopping() -> agora_proto::wire::WireError {
    agora_proto::wire::WireError::new(
        agora_proto::wire::ErrorCode::ShuttingDown,
        "the registry is stopping; nothing was done: retry once it is back",
    )
}
