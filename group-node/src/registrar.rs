//! A group host's registration with the registry: all its groups over one REQ socket, kept
//! live by one `heartbeat_host` per interval (PROTOCOL §4.1.1), so that the registry's load
//! grows with hosts, not groups.
//!
//! [`Registrar`] is an [`Actor`] owning one [`RegistryClient`] (Lazy Pirate: a request
//! without a reply in time closes the socket, and the next one opens a fresh one), so a
//! registry that is down or slow never delays members' requests. The serve loop tells it
//! which groups exist ([`Registrar::set`], [`Registrar::remove`]: a map insert and a wake,
//! no I/O), and asks it to register a new group before answering its `create`
//! ([`Registrar::register_now`]).
//!
//! # Every heartbeat interval
//! The interval is `--heartbeat`, or the registry's `heartbeat_ms` when its replies ask for
//! a shorter one, and never more than half its `ttl_ms` ([`beat_interval`]), counted from
//! the start of the last beat. A request waits for its reply as any client's does (5 s
//! over 3 attempts, [`REQUEST_OPTIONS`]), whatever the interval: a registry busy for longer
//! than one beat delays the next beat rather than failing the request.
//! 1. Names added since the last beat, changed member counts, and names the registry
//!    refused before go in `register_groups` requests of at most [`MAX_REGISTER_GROUPS`].
//! 2. `heartbeat_host` with the count of names the registry accepted. A different `known`
//!    (the registry restarted empty, or the host's entries expired) re-sends every name with
//!    `register_groups` at once: ⌈N/128⌉ requests, within the same beat.
//!
//! 3. Names removed since ([`Registrar::remove`]) are unregistered, one request each,
//!    after any `create`'s registration waiting; the first without an answer stops them
//!    until the next beat (at most [`MAX_PENDING_REMOVALS`] are kept; the others expire
//!    after the registry's TTL).
//!
//! A registry older than §4.1.1 answers `unknown_action`: the registrar then registers
//! each group with a plain `register` every interval (as a node of one does), after one
//! WARN. At a stop ([`Registrar`] dropped) a request in flight finishes first (up to its
//! 5 s), then every registered name is unregistered; a registry that does not answer then
//! costs one INFO line, and the entries expire after its TTL.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_common::actor::{Actor, Pipe, Wake};
use agora_common::client::{ClientCurve, ClientError, ClientOptions, RegistryClient};
use agora_common::keys::PublicKey;
use agora_proto::wire::{
    Endpoint, ErrorCode, GroupName, HostedGroup, RegisterGroupsRequest, WireError,
    MAX_REGISTER_GROUPS,
};

/// How long new names wait for others before they are sent (50 ms).
const GATHER: Duration = Duration::from_millis(50);

/// The most removed names kept to unregister, in the inbox and in the actor each
/// (10,000): while the registry does not answer, removals beyond it are dropped (logged
/// once) and their entries expire after the registry's TTL.
pub const MAX_PENDING_REMOVALS: usize = 10_000;

/// What a [`Registrar`] registers, and where.
#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    /// The registry's endpoint, or a comma-separated list of endpoints of one registry
    /// (`--registry`; [`agora_common::client::registry_endpoints`]).
    pub registry: String,
    /// CURVE towards the registry: the host's key pair (the key every name is bound to)
    /// and the registry's public key (`--registry-key`). `None` for an `--insecure`
    /// registry.
    pub curve: Option<ClientCurve>,
    /// The endpoint members reach the host at, as registered.
    pub endpoint: Endpoint,
    /// How often to send `heartbeat_host` (`--heartbeat`, default 2 s), unless the
    /// registry asks for a shorter interval ([`beat_interval`]).
    pub heartbeat: Duration,
}

/// How long one request to the registry may take: the client's default timeout (5 s over
/// 3 attempts, Lazy Pirate), whatever the heartbeat interval, so that a registry busy for
/// longer than one beat still answers a `create`'s registration.
pub const REQUEST_OPTIONS: ClientOptions = ClientOptions {
    timeout: Duration::from_secs(5),
    attempts: 3,
};

/// The shortest interval a registry's reply can make the registrar beat at (100 ms).
const MIN_BEAT: Duration = Duration::from_millis(100);

/// The interval to beat at: `own` (`--heartbeat`), or the registry's `heartbeat_ms` when
/// shorter, and never more than half its `ttl_ms`, so that the host's entries do not
/// expire between two beats; at least 100 ms unless `own` is shorter.
pub fn beat_interval(own: Duration, heartbeat_ms: u64, ttl_ms: u64) -> Duration {
    let asked = Duration::from_millis(heartbeat_ms.min(ttl_ms / 2)).max(MIN_BEAT);
    own.min(asked)
}

/// Why a name given to [`Registrar::register_now`] is not registered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistrarError {
    /// The registry refused the name (`name_taken`, `too_many_names`, `limit_reached`,
    /// `invalid_field`).
    #[error("the registry refused it: {0}")]
    Refused(WireError),
    /// The registry did not answer within [`REQUEST_OPTIONS`]' timeout (5 s), or the
    /// registrar stopped.
    #[error("the registry at {registry} did not answer: {error}")]
    Unreachable {
        /// The registry's endpoint (list).
        registry: String,
        /// What failed.
        error: String,
    },
}

/// The result of one name given to [`Registrar::register_now`].
pub type Registration = (GroupName, Result<(), RegistrarError>);

/// A change from the serve loop, coalesced per name until the actor takes it.
#[derive(Debug, Clone, Copy)]
enum Change {
    Set(u64),
    Remove,
}

/// What the owner hands the actor: bounded by the host's groups (one change per name),
/// [`MAX_PENDING_REMOVALS`] removed names, and the `create`s waiting.
#[derive(Debug, Default)]
struct Inbox {
    changes: HashMap<GroupName, Change>,
    now: Vec<(Vec<HostedGroup>, SyncSender<Registration>)>,
    /// How many of `changes` are [`Change::Remove`].
    removes: usize,
    /// Whether a removal was dropped since the actor last took the inbox (logged once).
    dropped: bool,
}

impl Inbox {
    /// Records `change` for `name`, unless it is a removal of a name not pending yet and
    /// [`MAX_PENDING_REMOVALS`] are pending already.
    fn put(&mut self, name: GroupName, change: Change) {
        let was_remove = matches!(self.changes.get(&name), Some(Change::Remove));
        match change {
            Change::Remove if !was_remove => {
                if self.removes >= MAX_PENDING_REMOVALS {
                    if !self.dropped {
                        self.dropped = true;
                        tracing::warn!(limit = MAX_PENDING_REMOVALS, group = %name,
                            "too many removed names waiting for the registrar; dropping them: \
                             their entries expire after the registry's TTL");
                    }
                    return;
                }
                self.removes += 1;
            }
            Change::Set(_) if was_remove => self.removes -= 1,
            _ => {}
        }
        self.changes.insert(name, change);
    }

    /// Forgets a pending removal of `name`, if any.
    fn unremove(&mut self, name: &GroupName) {
        if let Some(Change::Remove) = self.changes.get(name) {
            self.changes.remove(name);
            self.removes -= 1;
        }
    }
}

/// A running registrar; stops (and unregisters every name) when dropped.
#[derive(Debug)]
pub struct Registrar {
    inbox: Arc<Mutex<Inbox>>,
    actor: Actor,
}

impl Registrar {
    /// Starts registering with `config.registry`, with no groups yet.
    ///
    /// # Errors
    /// The actor's thread or pipe could not be made.
    pub fn start(ctx: &zmq::Context, config: RegistrarConfig) -> std::io::Result<Registrar> {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let shared = Arc::clone(&inbox);
        let own_ctx = ctx.clone();
        let actor = Actor::start(ctx, "registrar", move |pipe| {
            Worker::new(&own_ctx, config, shared).run(&pipe);
        })?;
        Ok(Registrar { inbox, actor })
    }

    /// Registers `name` with `members` members from the next heartbeat on, or updates its
    /// member count (sent with the next heartbeat when it changed). Cheap: no I/O.
    pub fn set(&self, name: GroupName, members: u64) {
        self.change(name, Change::Set(members));
    }

    /// Stops registering `name` and unregisters it (a deleted or stopped group, or a
    /// `create` that gave up waiting). A [`Registrar::register_now`] of `name` the actor has
    /// not taken yet is withdrawn: its receiver gets no result for it (disconnected once
    /// nothing is left to answer). Cheap: no I/O on the caller's thread.
    pub fn remove(&self, name: GroupName) {
        let mut inbox = self.lock();
        for (groups, _) in &mut inbox.now {
            groups.retain(|g| g.name != name);
        }
        inbox.now.retain(|(groups, _)| !groups.is_empty());
        inbox.put(name, Change::Remove);
        drop(inbox);
        self.wake();
    }

    /// Registers `groups` at once (a `create`: the name is registered before the reply
    /// leaves); each name's result arrives on the receiver. The actor takes it as soon as
    /// the request it is waiting on ends (up to [`REQUEST_OPTIONS`]' 5 s, or a beat's
    /// requests to a registry that answers slowly), before any unregistering; the
    /// registration then takes up to one request's timeout (5 s) per 128 names, and is
    /// answered `Unreachable` at once when an earlier registration of the same turn found
    /// the registry not answering. A registered name is then kept live as
    /// [`Registrar::set`] keeps it; a refused one is forgotten. It overrides a
    /// [`Registrar::remove`] of the same name not taken yet.
    pub fn register_now(&self, groups: Vec<HostedGroup>) -> Receiver<Registration> {
        let (tx, rx) = sync_channel(groups.len().max(1));
        let mut inbox = self.lock();
        for g in &groups {
            inbox.unremove(&g.name);
        }
        inbox.now.push((groups, tx));
        drop(inbox);
        self.wake();
        rx
    }

    fn change(&self, name: GroupName, change: Change) {
        self.lock().put(name, change);
        self.wake();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the actor; a full pipe means it has wakes to read already.
    fn wake(&self) {
        let _ = self.actor.send(&[b"wake"]);
    }
}

/// The actor's state.
struct Worker {
    ctx: zmq::Context,
    config: RegistrarConfig,
    client: RegistryClient,
    public_key: Option<PublicKey>,
    inbox: Arc<Mutex<Inbox>>,
    /// Every group to keep registered, with its member count.
    groups: BTreeMap<GroupName, u64>,
    /// Names to send with the next beat: new, changed, or refused before.
    dirty: BTreeSet<GroupName>,
    /// Names the registry refused (kept in `groups`, retried each beat).
    refused: BTreeSet<GroupName>,
    /// Names to unregister (at most [`MAX_PENDING_REMOVALS`]).
    gone: BTreeSet<GroupName>,
    /// Whether a name was dropped from a full `gone` (logged once until it empties).
    gone_dropped: bool,
    /// Send everything at the next beat (first beat, lost requests, `known` differed).
    resend: bool,
    /// The registry is older than §4.1.1: plain `register` per group.
    fallback: bool,
    /// Whether the registry answered the last request (`None`: not asked yet), so that an
    /// outage is logged once.
    reachable: Option<bool>,
    /// The interval beaten at: `--heartbeat`, or the registry's when its replies ask for a
    /// shorter one ([`beat_interval`]).
    interval: Duration,
}

impl Worker {
    fn new(ctx: &zmq::Context, config: RegistrarConfig, inbox: Arc<Mutex<Inbox>>) -> Worker {
        Worker {
            ctx: ctx.clone(),
            client: client(ctx, &config.registry, config.curve.clone(), REQUEST_OPTIONS),
            interval: config.heartbeat,
            public_key: config.curve.as_ref().map(|c| c.keypair.public),
            config,
            inbox,
            groups: BTreeMap::new(),
            dirty: BTreeSet::new(),
            refused: BTreeSet::new(),
            gone: BTreeSet::new(),
            gone_dropped: false,
            resend: true,
            fallback: false,
            reachable: None,
        }
    }

    /// Follows the interval and TTL a registry's reply carries: a shorter interval than
    /// ours applies from the next beat on (logged once per change).
    fn heed(&mut self, heartbeat_ms: u64, ttl_ms: u64) {
        let interval = beat_interval(self.config.heartbeat, heartbeat_ms, ttl_ms);
        if interval != self.interval {
            tracing::info!(registry = %self.config.registry,
                heartbeat = %agora_common::human_duration(Duration::from_millis(heartbeat_ms)),
                ttl = %agora_common::human_duration(Duration::from_millis(ttl_ms)),
                every = %agora_common::human_duration(interval),
                "heartbeat interval set by the registry's reply");
            self.interval = interval;
        }
    }

    /// Beats every [`Worker::interval`], counted from the start of the last beat (a slow
    /// request does not push the next beat later), and serves the owner's wakes between.
    fn run(mut self, pipe: &Pipe) {
        let mut last_beat = Instant::now();
        let mut next_beat = last_beat + self.interval;
        'serve: loop {
            match pipe.wait_until(next_beat) {
                Wake::Term => break,
                Wake::Command(_) => {
                    // A burst of wakes is one turn (a stop among them ends the loop after
                    // it).
                    let stop = loop {
                        match pipe.take() {
                            Wake::Command(_) => {}
                            Wake::Timeout => break false,
                            Wake::Term => break true,
                        }
                    };
                    // During an outage, unregistering waits for the next beat: each wake
                    // would otherwise wait a request's timeout.
                    let unregister = self.reachable != Some(false);
                    if self.take_inbox(unregister) {
                        // New names go out soon, together: a host starting with 10,000
                        // groups sends ⌈10,000/128⌉ requests, not one per wake.
                        next_beat = next_beat.min(Instant::now() + GATHER);
                    }
                    if stop {
                        break 'serve;
                    }
                }
                Wake::Timeout => {
                    last_beat = Instant::now();
                    self.take_inbox(false);
                    self.beat();
                    // A beat the registry did not answer says the unregistering would
                    // wait too; with no groups, the beat asked nothing and this probes.
                    if self.groups.is_empty() || self.reachable != Some(false) {
                        self.unregister_gone();
                    }
                    next_beat = last_beat + self.interval;
                }
            }
            // A reply may have asked for a shorter interval.
            next_beat = next_beat.min(last_beat + self.interval);
        }
        self.take_inbox(false);
        self.unregister_all();
    }

    /// Applies the owner's changes and registers `create`s' names at once; then, when
    /// `unregister`, unregisters removed names ([`Worker::unregister_gone`]). True when
    /// names were added.
    fn take_inbox(&mut self, unregister: bool) -> bool {
        let mut added = false;
        let inbox = std::mem::take(&mut *self.inbox.lock().unwrap_or_else(PoisonError::into_inner));
        for (name, change) in inbox.changes {
            match change {
                Change::Set(members) => {
                    self.gone.remove(&name);
                    match self.groups.insert(name.clone(), members) {
                        Some(before) if before == members => {}
                        before => {
                            added |= before.is_none();
                            self.dirty.insert(name);
                        }
                    }
                }
                Change::Remove => {
                    self.groups.remove(&name);
                    self.dirty.remove(&name);
                    if !self.refused.remove(&name) {
                        self.forget(name);
                    }
                }
            }
        }
        // Creates first: each waits for its answer, a removal does not.
        let mut unreachable = None;
        for (groups, results) in inbox.now {
            unreachable = self.register_now(groups, &results, unreachable);
        }
        if unregister {
            self.unregister_gone();
        }
        added
    }

    /// Keeps `name` to unregister, unless [`MAX_PENDING_REMOVALS`] are kept already (then
    /// its entry expires after the registry's TTL; logged once until they are done).
    fn forget(&mut self, name: GroupName) {
        if self.gone.len() >= MAX_PENDING_REMOVALS && !self.gone.contains(&name) {
            if !self.gone_dropped {
                self.gone_dropped = true;
                tracing::warn!(limit = MAX_PENDING_REMOVALS, group = %name,
                    "too many removed names not unregistered yet; dropping them: their \
                     entries expire after the registry's TTL");
            }
            return;
        }
        self.gone.insert(name);
    }

    /// Unregisters removed names, one request each; stops at the first the registry does
    /// not answer and keeps the rest for a later beat (as [`Worker::unregister_all`]
    /// stops), so that an outage costs one request's timeout, not one per name.
    fn unregister_gone(&mut self) {
        while let Some(name) = self.gone.pop_first() {
            match self.client.unregister(&name, &self.config.endpoint) {
                Ok(()) => {
                    self.answered();
                    tracing::info!(group = %name, "unregistered");
                }
                Err(ClientError::Server(e)) => {
                    self.answered();
                    tracing::info!(group = %name, error = %e, "not unregistered");
                }
                Err(e) => {
                    self.unanswered(&e);
                    tracing::info!(group = %name, left = self.gone.len() + 1,
                        "not unregistered; retrying at the next beat (the registry's entries \
                         expire after its TTL)");
                    self.gone.insert(name);
                    // Still counted there until then: compare afresh.
                    self.resend = true;
                    return;
                }
            }
        }
        self.gone_dropped = false;
    }

    /// Registers `groups` now; each result goes to `results`. When `unreachable` (an
    /// earlier registration of the same turn found the registry not answering), answers
    /// each name with it at once. Returns the error of a registry that did not answer.
    fn register_now(
        &mut self,
        groups: Vec<HostedGroup>,
        results: &SyncSender<Registration>,
        unreachable: Option<RegistrarError>,
    ) -> Option<RegistrarError> {
        for g in &groups {
            // Registered again: not to be unregistered after.
            self.gone.remove(&g.name);
        }
        let answered = if let Some(error) = &unreachable {
            groups
                .into_iter()
                .map(|g| (g, Err(error.clone())))
                .collect()
        } else if self.fallback {
            groups
                .into_iter()
                .map(|g| {
                    let result = self.register_plain(&g.name, g.members);
                    (g, result)
                })
                .collect()
        } else {
            self.register_batch(groups)
        };
        let mut failed = unreachable;
        for (g, result) in answered {
            if let Err(e @ RegistrarError::Unreachable { .. }) = &result {
                failed.get_or_insert_with(|| e.clone());
            }
            if result.is_ok() {
                self.groups.insert(g.name.clone(), g.members);
                self.dirty.remove(&g.name);
                self.refused.remove(&g.name);
            }
            // The receiver may be gone (the create was abandoned): the name stays
            // registered, as `set` would keep it, or not.
            let _ = results.try_send((g.name, result));
        }
        failed
    }

    /// `register_groups` for `groups`, in requests of at most [`MAX_REGISTER_GROUPS`];
    /// every name with its result. Switches to the fallback on `unknown_action`.
    fn register_batch(
        &mut self,
        groups: Vec<HostedGroup>,
    ) -> Vec<(HostedGroup, Result<(), RegistrarError>)> {
        let mut answered = Vec::with_capacity(groups.len());
        let mut rest = groups.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<HostedGroup> = rest.by_ref().take(MAX_REGISTER_GROUPS).collect();
            let request = RegisterGroupsRequest {
                endpoint: self.config.endpoint.clone(),
                public_key: self.public_key,
                groups: chunk.clone(),
            };
            match self.client.register_groups(&request) {
                Ok(reply) => {
                    self.answered();
                    self.heed(reply.heartbeat_ms, reply.ttl_ms);
                    let mut refusals: HashMap<GroupName, WireError> = reply
                        .refused
                        .into_iter()
                        .filter_map(|e| Some((e.group.clone()?, e)))
                        .collect();
                    for g in chunk {
                        let result = match refusals.remove(&g.name) {
                            Some(e) => Err(RegistrarError::Refused(e)),
                            None => Ok(()),
                        };
                        answered.push((g, result));
                    }
                }
                Err(ClientError::Server(e)) if e.code == ErrorCode::UnknownAction => {
                    tracing::warn!(registry = %self.config.registry,
                        "the registry does not know register_groups (older than PROTOCOL \
                         §4.1.1): registering each group on its own, every heartbeat");
                    self.fallback = true;
                    let left: Vec<HostedGroup> = chunk.into_iter().chain(rest).collect();
                    for g in left {
                        let result = self.register_plain(&g.name, g.members);
                        answered.push((g, result));
                    }
                    return answered;
                }
                Err(ClientError::Server(e)) => {
                    self.answered();
                    tracing::warn!(registry = %self.config.registry, error = %e,
                        "register_groups refused whole; retrying its names each heartbeat");
                    answered.extend(
                        chunk
                            .into_iter()
                            .map(|g| (g, Err(RegistrarError::Refused(e.clone())))),
                    );
                }
                Err(e) => {
                    let error = self.unanswered(&e);
                    answered.extend(
                        chunk
                            .into_iter()
                            .chain(rest.by_ref())
                            .map(|g| (g, Err(error.clone()))),
                    );
                }
            }
        }
        answered
    }

    /// A plain `register` of one group (the fallback).
    fn register_plain(&mut self, name: &GroupName, members: u64) -> Result<(), RegistrarError> {
        match self
            .client
            .register(name, &self.config.endpoint, members, self.public_key)
        {
            Ok(reply) => {
                self.answered();
                self.heed(reply.heartbeat_ms, reply.ttl_ms);
                Ok(())
            }
            Err(ClientError::Server(e)) => {
                self.answered();
                Err(RegistrarError::Refused(e))
            }
            Err(e) => Err(self.unanswered(&e)),
        }
    }

    /// One heartbeat: pending names, then `heartbeat_host`, then everything again if the
    /// registry's count differs.
    fn beat(&mut self) {
        if self.fallback {
            let groups: Vec<(GroupName, u64)> =
                self.groups.iter().map(|(n, m)| (n.clone(), *m)).collect();
            for (name, members) in groups {
                let result = self.register_plain(&name, members);
                self.note(&name, &result);
                if matches!(result, Err(RegistrarError::Unreachable { .. })) {
                    return;
                }
            }
            return;
        }
        if self.groups.is_empty() {
            return;
        }
        if !self.resend {
            self.dirty.extend(self.refused.iter().cloned());
            let dirty = std::mem::take(&mut self.dirty);
            let pending = self.hosted(dirty);
            self.register_and_note(pending);
            if self.fallback || self.resend {
                return;
            }
            let accepted = self.accepted();
            match self
                .client
                .heartbeat_host(&self.config.endpoint, self.public_key, accepted)
            {
                Ok(reply) if reply.known == accepted => {
                    self.answered();
                    self.heed(reply.heartbeat_ms, reply.ttl_ms);
                    return;
                }
                Ok(reply) => {
                    self.answered();
                    self.heed(reply.heartbeat_ms, reply.ttl_ms);
                    tracing::info!(registry = %self.config.registry, known = reply.known,
                        groups = accepted, "the registry's count differs: registering every group again");
                }
                Err(ClientError::Server(e)) if e.code == ErrorCode::UnknownAction => {
                    tracing::warn!(registry = %self.config.registry,
                        "the registry does not know heartbeat_host (older than PROTOCOL \
                         §4.1.1): registering each group on its own, every heartbeat");
                    self.fallback = true;
                    self.beat();
                    return;
                }
                Err(e) => {
                    self.unanswered(&e);
                    return;
                }
            }
        }
        self.resend = false;
        self.dirty.clear();
        let all = self.hosted(self.groups.keys().cloned().collect());
        self.register_and_note(all);
        if !self.fallback && !self.resend {
            tracing::info!(registry = %self.config.registry, groups = self.accepted(),
                refused = self.refused.len(), "registered");
        }
    }

    /// `register_groups` of `groups`; records each result.
    fn register_and_note(&mut self, groups: Vec<HostedGroup>) {
        if groups.is_empty() {
            return;
        }
        for (g, result) in self.register_batch(groups) {
            self.note(&g.name, &result);
        }
    }

    /// Records one name's result: refused names are retried each beat (logged once), and
    /// a name left unanswered makes the next beat send everything.
    fn note(&mut self, name: &GroupName, result: &Result<(), RegistrarError>) {
        match result {
            Ok(()) => {
                self.refused.remove(name);
            }
            Err(RegistrarError::Refused(e)) => {
                if self.refused.insert(name.clone()) {
                    tracing::warn!(group = %name, error = %e, "registration refused; retrying");
                }
            }
            Err(RegistrarError::Unreachable { .. }) => self.resend = true,
        }
    }

    /// How many names the registry should hold for this host.
    fn accepted(&self) -> u64 {
        let refused = self
            .refused
            .iter()
            .filter(|n| self.groups.contains_key(*n))
            .count();
        (self.groups.len() - refused) as u64
    }

    /// `names` (those still kept) with their member counts.
    fn hosted(&self, names: BTreeSet<GroupName>) -> Vec<HostedGroup> {
        names
            .into_iter()
            .filter_map(|name| {
                let members = *self.groups.get(&name)?;
                Some(HostedGroup { name, members })
            })
            .collect()
    }

    fn answered(&mut self) {
        self.reachable = Some(true);
    }

    /// Logs a request without an answer (once per outage) and makes the next beat send
    /// everything.
    fn unanswered(&mut self, e: &ClientError) -> RegistrarError {
        if self.reachable != Some(false) {
            tracing::warn!(registry = %self.config.registry, error = %e,
                "cannot reach the registry (down, or --registry-key is not its key); still serving, retrying");
        }
        self.reachable = Some(false);
        self.resend = true;
        RegistrarError::Unreachable {
            registry: self.config.registry.clone(),
            error: e.to_string(),
        }
    }

    /// At a stop: unregisters every name, 1 s per request; stops at the first without an
    /// answer (the registry is gone too: the entries expire after its TTL).
    fn unregister_all(&mut self) {
        let mut quick = client(
            &self.ctx,
            &self.config.registry,
            self.config.curve.clone(),
            ClientOptions {
                timeout: Duration::from_secs(1),
                attempts: 1,
            },
        );
        let mut names: Vec<GroupName> = std::mem::take(&mut self.groups).into_keys().collect();
        names.extend(std::mem::take(&mut self.gone));
        let total = names.len();
        let mut done = 0;
        for name in names.iter().filter(|n| !self.refused.contains(*n)) {
            match quick.unregister(name, &self.config.endpoint) {
                Ok(()) => done += 1,
                Err(ClientError::Server(_)) => {}
                Err(e) => {
                    tracing::info!(registry = %self.config.registry, error = %e, left = total - done,
                        "not unregistered; the registry's entries expire after its TTL");
                    return;
                }
            }
        }
        if total > 0 {
            tracing::info!(groups = done, "unregistered");
        }
    }
}

/// A client for the registry at `registry` (an endpoint or a list), over CURVE when
/// `curve` is given: the connection a group node's heartbeat and a host's registrar both
/// use.
pub fn client(
    ctx: &zmq::Context,
    registry: &str,
    curve: Option<ClientCurve>,
    options: ClientOptions,
) -> RegistryClient {
    let client = RegistryClient::new(ctx, registry, options);
    match curve {
        Some(c) => client.with_curve(c),
        None => client,
    }
}

#[cfg(test)]
mod tests {
    //! Against the real registry binary ([`agora_tests::Federation`]), except the fallback,
    //! which needs a registry that does not know §4.1.1 (a fake ROUTER here).

    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use agora_common::keys::Keypair;
    use agora_tests::{wait_for, Federation};

    use super::*;

    const N: usize = 1000;

    fn name(i: usize) -> GroupName {
        GroupName::new(format!("hosted-{i:04}")).expect("name")
    }

    /// A federation whose registry expects a heartbeat every `heartbeat`, serves metrics,
    /// and lets `host` own up to --max-groups names.
    /// A registry on SQLite whatever `AGORA_TEST_STORE` says: these tests time the
    /// registrar's batching and beats. On PostgreSQL a debug registry binds about 50 new
    /// names a second (several statements per name), too slow for
    /// their windows; its claims are tested on both stores in registry/src/store/tests.rs.
    fn federation(heartbeat: &str, host: &Keypair) -> Federation {
        let host_key = host.public.to_string();
        Federation::start_on_sqlite(
            heartbeat,
            &["--metrics", "127.0.0.1:0", "--host-key", &host_key],
        )
    }

    fn registrar(
        fed: &Federation,
        ctx: &zmq::Context,
        host: &Keypair,
        beat: Duration,
    ) -> Registrar {
        let config = RegistrarConfig {
            registry: fed.registry.endpoint.clone(),
            curve: Some(ClientCurve {
                keypair: host.clone(),
                server_key: fed.registry_key().parse().expect("registry key"),
            }),
            endpoint: Endpoint::new("tcp://127.0.0.1:7").expect("endpoint"),
            heartbeat: beat,
        };
        Registrar::start(ctx, config).expect("registrar")
    }

    /// How many names the registry lists now (a user's view, over CURVE).
    fn listed(fed: &Federation, ctx: &zmq::Context) -> usize {
        let user = Keypair::generate().expect("keys");
        let mut client = client(
            ctx,
            &fed.registry.endpoint,
            Some(ClientCurve {
                keypair: user,
                server_key: fed.registry_key().parse().expect("registry key"),
            }),
            ClientOptions {
                timeout: Duration::from_secs(2),
                attempts: 1,
            },
        );
        client.list().map_or(0, |groups| groups.len())
    }

    /// `agora_requests_total{action=ACTION,code="ok"}` from the registry's /metrics.
    fn requests(addr: &str, action: &str) -> u64 {
        let mut stream = std::net::TcpStream::connect(addr).expect("metrics");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("response");
        let series = format!("agora_requests_total{{action=\"{action}\",code=\"ok\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// Issue 24: 1,000 groups of one host are registered in ⌈1000/128⌉ = 8 requests and
    /// stay listed through several TTLs on `heartbeat_host` alone (no `register`, no more
    /// `register_groups`); a changed member count goes out in one small batch.
    #[test]
    fn a_thousand_groups_register_in_eight_requests_and_live_on_heartbeat_host_alone() {
        let host = Keypair::generate().expect("keys");
        let fed = federation("500ms", &host);
        let metrics = fed.registry.metrics_addr();
        let ctx = zmq::Context::new();
        let registrar = registrar(&fed, &ctx, &host, Duration::from_millis(500));
        for i in 0..N {
            registrar.set(name(i), 1);
        }
        assert!(
            wait_for(Duration::from_secs(10), || listed(&fed, &ctx) == N),
            "{} of {N} listed; registry log:\n{}",
            listed(&fed, &ctx),
            fed.registry.log()
        );
        let batches = requests(&metrics, "register_groups");
        // ⌈1000/128⌉ = 8 when every name is queued before the first request leaves; on a
        // slower store (PostgreSQL under CI) names queued while a batch is in flight go in
        // partial batches: at most twice that, against 1,000 requests unbatched.
        assert!(
            batches <= 16,
            "{batches} register_groups requests for {N} groups"
        );
        // Six heartbeats (3 s: two TTLs of 1.5 s) later, all still listed, and nothing
        // but heartbeat_host was sent.
        let beats = requests(&metrics, "heartbeat_host");
        assert!(
            wait_for(Duration::from_secs(10), || requests(
                &metrics,
                "heartbeat_host"
            ) >= beats + 6),
            "no heartbeat_host"
        );
        assert_eq!(listed(&fed, &ctx), N);
        assert_eq!(requests(&metrics, "register_groups"), batches);
        assert_eq!(requests(&metrics, "register"), 0);
        // Member counts: one batch of the changed names at the next beat.
        for i in 0..3 {
            registrar.set(name(i), 5);
        }
        assert!(wait_for(Duration::from_secs(5), || {
            requests(&metrics, "register_groups") == batches + 1
        }));
        // A stop unregisters every name.
        drop(registrar);
        assert_eq!(listed(&fed, &ctx), 0);
    }

    /// Issue 24: after a registry restart (empty directory), the host's next
    /// `heartbeat_host` sees `known` 0 and registers every group again at once.
    #[test]
    fn a_registry_restart_relists_every_host_group_within_one_heartbeat() {
        let host = Keypair::generate().expect("keys");
        let mut fed = federation("1s", &host);
        let ctx = zmq::Context::new();
        let registrar = registrar(&fed, &ctx, &host, Duration::from_secs(1));
        for i in 0..N {
            registrar.set(name(i), 1);
        }
        assert!(wait_for(Duration::from_secs(10), || listed(&fed, &ctx) == N));
        fed.restart_registry("1s");
        let restarted = Instant::now();
        assert!(
            wait_for(Duration::from_secs(10), || listed(&fed, &ctx) == N),
            "not relisted; registry log:\n{}",
            fed.registry.log()
        );
        let took = restarted.elapsed();
        eprintln!("relisted {N} groups {took:?} after the registry restarted");
        // One interval for the next beat, plus one attempt's share of a request's timeout
        // (5 s / 3) when that beat went to the registry while it was down: 2.7 s, with
        // room for a loaded machine; relisting only as names are used again, or at a later
        // beat's full resend, would take longer.
        assert!(
            took < Duration::from_millis(6000),
            "relisted after {took:?}"
        );
        drop(registrar);
    }

    /// PROTOCOL §4.1.1: a host that goes silent (no heartbeat, no unregister: killed)
    /// loses every name once its TTL passes, and holds 0 when it comes back.
    #[test]
    fn a_silent_hosts_groups_expire_together() {
        let host = Keypair::generate().expect("keys");
        let fed = federation("500ms", &host);
        let ctx = zmq::Context::new();
        let mut raw = client(
            &ctx,
            &fed.registry.endpoint,
            Some(ClientCurve {
                keypair: host.clone(),
                server_key: fed.registry_key().parse().expect("registry key"),
            }),
            ClientOptions::default(),
        );
        let endpoint = Endpoint::new("tcp://127.0.0.1:7").expect("endpoint");
        let reply = raw
            .register_groups(&RegisterGroupsRequest {
                endpoint: endpoint.clone(),
                public_key: Some(host.public),
                groups: (0..MAX_REGISTER_GROUPS)
                    .map(|i| HostedGroup {
                        name: name(i),
                        members: 1,
                    })
                    .collect(),
            })
            .expect("register_groups");
        assert_eq!(
            (reply.registered.len(), reply.refused.len()),
            (MAX_REGISTER_GROUPS, 0)
        );
        let beat = raw
            .heartbeat_host(&endpoint, Some(host.public), 128)
            .expect("heartbeat_host");
        assert_eq!(beat.known, 128);
        assert_eq!(listed(&fed, &ctx), 128);
        let silent = Instant::now();
        assert!(wait_for(Duration::from_secs(5), || listed(&fed, &ctx) == 0));
        assert!(
            silent.elapsed() >= Duration::from_millis(1000),
            "expired {:?} after the last heartbeat, before the 1.5 s TTL",
            silent.elapsed()
        );
        let beat = raw
            .heartbeat_host(&endpoint, Some(host.public), 128)
            .expect("heartbeat_host");
        assert_eq!(beat.known, 0);
    }

    /// `register_groups` of another key's name: refused for that name only, named in the
    /// error; 129 names: `invalid_field`.
    #[test]
    fn register_groups_refuses_per_name_and_bounds_the_request() {
        let host = Keypair::generate().expect("keys");
        let fed = federation("500ms", &host);
        let ctx = zmq::Context::new();
        let server_key: PublicKey = fed.registry_key().parse().expect("registry key");
        let other = Keypair::generate().expect("keys");
        let mut theirs = client(
            &ctx,
            &fed.registry.endpoint,
            Some(ClientCurve {
                keypair: other.clone(),
                server_key,
            }),
            ClientOptions::default(),
        );
        theirs
            .register(
                &name(1),
                &Endpoint::new("tcp://127.0.0.1:9").expect("ep"),
                1,
                Some(other.public),
            )
            .expect("their group");
        let mut ours = client(
            &ctx,
            &fed.registry.endpoint,
            Some(ClientCurve {
                keypair: host.clone(),
                server_key,
            }),
            ClientOptions::default(),
        );
        let request = |n: usize| RegisterGroupsRequest {
            endpoint: Endpoint::new("tcp://127.0.0.1:7").expect("endpoint"),
            public_key: Some(host.public),
            groups: (0..n)
                .map(|i| HostedGroup {
                    name: name(i),
                    members: 1,
                })
                .collect(),
        };
        let reply = ours.register_groups(&request(3)).expect("register_groups");
        assert_eq!(reply.registered, vec![name(0), name(2)]);
        assert_eq!(reply.refused.len(), 1);
        assert_eq!(reply.refused[0].code, ErrorCode::NameTaken);
        assert_eq!(reply.refused[0].group, Some(name(1)));
        match ours.register_groups(&request(MAX_REGISTER_GROUPS + 1)) {
            Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::InvalidField),
            other => panic!("129 names: {other:?}"),
        }
        // Another key cannot heartbeat this host's names.
        let beat = theirs
            .heartbeat_host(
                &Endpoint::new("tcp://127.0.0.1:7").expect("endpoint"),
                Some(other.public),
                2,
            )
            .expect("heartbeat_host");
        assert_eq!(beat.known, 0);
        match theirs.heartbeat_host(
            &Endpoint::new("tcp://127.0.0.1:7").expect("endpoint"),
            Some(host.public),
            2,
        ) {
            Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::InvalidField),
            other => panic!("someone else's key: {other:?}"),
        }
    }

    /// A registry older than §4.1.1 answers `unknown_action`: the registrar registers each
    /// group with a plain `register`, every heartbeat, after one WARN.
    #[test]
    fn an_old_registry_gets_one_register_per_group() {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).expect("router");
        router.set_linger(0).expect("linger");
        router.bind("tcp://127.0.0.1:*").expect("bind");
        let endpoint = router
            .get_last_endpoint()
            .expect("endpoint")
            .expect("utf-8");
        let stop = Arc::new(AtomicBool::new(false));
        let registers = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(AtomicU64::new(0));
        let fake = {
            let (stop, registers, batches) = (
                Arc::clone(&stop),
                Arc::clone(&registers),
                Arc::clone(&batches),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if router.poll(zmq::POLLIN, 50).expect("poll") == 0 {
                        continue;
                    }
                    let frames = router.recv_multipart(0).expect("recv");
                    let split = frames.iter().position(Vec::is_empty).expect("delimiter");
                    let body: serde_json::Value =
                        serde_json::from_slice(frames.last().expect("body")).expect("json");
                    let reply = match body["action"].as_str() {
                        Some("register") => {
                            registers.fetch_add(1, Ordering::Relaxed);
                            let r: agora_proto::wire::RegisterRequest =
                                serde_json::from_value(body).expect("register");
                            agora_proto::codec::encode_ok(&agora_proto::wire::RegisterReply {
                                group: agora_proto::wire::GroupEntry {
                                    name: r.name,
                                    endpoint: r.endpoint,
                                    members: r.members,
                                    registered_at: agora_proto::time::Timestamp::now(),
                                    last_heartbeat: agora_proto::time::Timestamp::now(),
                                    public_key: r.public_key,
                                },
                                heartbeat_ms: 200,
                                ttl_ms: 600,
                            })
                        }
                        Some("register_groups") => {
                            batches.fetch_add(1, Ordering::Relaxed);
                            agora_proto::codec::encode_error(&WireError::new(
                                ErrorCode::UnknownAction,
                                "unknown action",
                            ))
                        }
                        _ => agora_proto::codec::encode_ok(&serde_json::json!({})),
                    };
                    let out = frames[..=split].iter().chain(reply.iter());
                    router.send_multipart(out, 0).expect("send");
                }
            })
        };
        let registrar = Registrar::start(
            &ctx,
            RegistrarConfig {
                registry: endpoint,
                curve: None,
                endpoint: Endpoint::new("tcp://127.0.0.1:7").expect("endpoint"),
                heartbeat: Duration::from_millis(200),
            },
        )
        .expect("registrar");
        for i in 0..3 {
            registrar.set(name(i), 1);
        }
        // At least two beats of three registers each after the one refused batch.
        assert!(wait_for(Duration::from_secs(10), || registers
            .load(Ordering::Relaxed)
            >= 6));
        assert_eq!(
            batches.load(Ordering::Relaxed),
            1,
            "register_groups tried once"
        );
        let rx = registrar.register_now(vec![HostedGroup {
            name: name(9),
            members: 1,
        }]);
        let (got, result) = rx.recv_timeout(Duration::from_secs(5)).expect("a result");
        assert_eq!((got, result), (name(9), Ok(())));
        drop(registrar);
        stop.store(true, Ordering::Relaxed);
        fake.join().expect("fake registry");
    }

    /// Issue 24 (H3b): the registrar kept its own `--heartbeat` and ignored the
    /// `heartbeat_ms`/`ttl_ms` of the registry's replies, so under a registry beating every
    /// 500 ms (TTL 1.5 s) a host at 2 s let its groups expire between beats and registered
    /// all of them again on every beat (`known` 0). Now it beats at the registry's interval,
    /// and at half the TTL when the TTL is one interval (`--ttl-intervals 1`, TTL 1 s): the
    /// groups stay listed through two of the host's own intervals, with no
    /// `register_groups` after the first.
    #[test]
    fn groups_expired_between_beats_under_a_registry_asking_for_a_shorter_heartbeat() {
        const GROUPS: usize = 200;
        for (heartbeat, extra) in [("500ms", &[][..]), ("1s", &["--ttl-intervals", "1"][..])] {
            let host = Keypair::generate().expect("keys");
            let host_key = host.public.to_string();
            let mut args = vec!["--metrics", "127.0.0.1:0", "--host-key", &host_key];
            args.extend_from_slice(extra);
            let fed = Federation::start_with(heartbeat, &args);
            let metrics = fed.registry.metrics_addr();
            let ctx = zmq::Context::new();
            let registrar = registrar(&fed, &ctx, &host, Duration::from_secs(2));
            for i in 0..GROUPS {
                registrar.set(name(i), 1);
            }
            assert!(
                wait_for(Duration::from_secs(10), || listed(&fed, &ctx) == GROUPS),
                "registry --heartbeat {heartbeat} {extra:?}: {} of {GROUPS} listed",
                listed(&fed, &ctx)
            );
            let batches = requests(&metrics, "register_groups");
            let beats = requests(&metrics, "heartbeat_host");
            let user = Keypair::generate().expect("keys");
            let mut lister = client(
                &ctx,
                &fed.registry.endpoint,
                Some(ClientCurve {
                    keypair: user,
                    server_key: fed.registry_key().parse().expect("registry key"),
                }),
                ClientOptions {
                    timeout: Duration::from_secs(2),
                    attempts: 1,
                },
            );
            // Two of the host's own intervals (several of the registry's TTLs), and on
            // until 10 lists and 6 heartbeats are seen (a loaded machine answers fewer in
            // 4 s), up to 20 s.
            let start = Instant::now();
            let mut lists = 0;
            let mut beaten = 0;
            while start.elapsed() < Duration::from_secs(4) || lists < 10 || beaten < 6 {
                if start.elapsed() > Duration::from_secs(20) {
                    break;
                }
                // A list the registry is too busy to answer says nothing about the host.
                if let Ok(groups) = lister.list() {
                    assert_eq!(
                        groups.len(),
                        GROUPS,
                        "registry --heartbeat {heartbeat} {extra:?}: groups expired between \
                         the host's beats"
                    );
                    lists += 1;
                }
                beaten = requests(&metrics, "heartbeat_host") - beats;
                // Sampling the directory, not waiting for a condition.
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                lists >= 10,
                "only {lists} lists answered in {}",
                agora_common::human_duration(start.elapsed())
            );
            assert_eq!(
                requests(&metrics, "register_groups"),
                batches,
                "registry --heartbeat {heartbeat} {extra:?}: groups registered again"
            );
            assert!(
                beaten >= 6,
                "registry --heartbeat {heartbeat} {extra:?}: {beaten} heartbeat_host in {}",
                agora_common::human_duration(start.elapsed())
            );
            drop(registrar);
        }
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the process `pid`.
    fn signal(pid: u32, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// A process stopped (SIGSTOP) until this is dropped (SIGCONT), a failed assertion
    /// included.
    struct Stopped(u32);

    impl Stopped {
        fn new(pid: u32) -> Stopped {
            signal(pid, "-STOP");
            Stopped(pid)
        }
    }

    impl Drop for Stopped {
        fn drop(&mut self) {
            signal(self.0, "-CONT");
        }
    }

    /// Issue 24 (H3b): each request's timeout was one `--heartbeat`, so a host beating
    /// every 200 ms gave up on a `create`'s registration when the registry was busy for
    /// 600 ms, well inside the create's 2 s. A request now waits as long as any client's
    /// (5 s over 3 attempts): no answer while the registry is stopped, then `Ok`.
    #[test]
    fn a_registration_gave_up_after_one_heartbeat_on_a_busy_registry() {
        let host = Keypair::generate().expect("keys");
        let fed = federation("200ms", &host);
        let ctx = zmq::Context::new();
        let registrar = registrar(&fed, &ctx, &host, Duration::from_millis(200));
        registrar.set(name(0), 1);
        assert!(wait_for(Duration::from_secs(5), || listed(&fed, &ctx) == 1));
        let busy = Stopped::new(fed.registry.pid());
        let rx = registrar.register_now(vec![HostedGroup {
            name: name(1),
            members: 1,
        }]);
        // Busy for 600 ms: three of the host's heartbeats.
        match rx.recv_timeout(Duration::from_millis(600)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            other => panic!("an answer while the registry was stopped: {other:?}"),
        }
        drop(busy);
        let (got, result) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("an answer once the registry answers");
        assert_eq!((got, result), (name(1), Ok(())));
        assert!(wait_for(Duration::from_secs(5), || listed(&fed, &ctx) == 2));
    }

    /// A `create` that gave up (its 2 s passed while the registrar waited on a busy
    /// registry) removes its name; its `register_now`, still waiting behind that request,
    /// was then applied after the removal and the registry kept listing a group the host
    /// had archived. The removal withdraws it now: no result, and only the host's group
    /// listed once the registry answers.
    #[test]
    fn a_name_removed_while_its_registration_waited_was_registered_after_all() {
        let host = Keypair::generate().expect("keys");
        let fed = federation("200ms", &host);
        let ctx = zmq::Context::new();
        let registrar = registrar(&fed, &ctx, &host, Duration::from_millis(200));
        registrar.set(name(0), 1);
        assert!(wait_for(Duration::from_secs(5), || listed(&fed, &ctx) == 1));
        let busy = Stopped::new(fed.registry.pid());
        // A registration the actor takes and waits on (the registry stopped); the next
        // one and its removal both wait behind it.
        let first = registrar.register_now(vec![HostedGroup {
            name: name(2),
            members: 1,
        }]);
        assert!(wait_for(Duration::from_secs(5), || registrar
            .lock()
            .now
            .is_empty()));
        let answer = registrar.register_now(vec![HostedGroup {
            name: name(1),
            members: 1,
        }]);
        registrar.remove(name(1));
        drop(busy);
        let (got, result) = first.recv_timeout(Duration::from_secs(5)).expect("first");
        assert_eq!((got, result), (name(2), Ok(())));
        match answer.recv_timeout(Duration::from_secs(5)) {
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            other => panic!("a withdrawn registration answered: {other:?}"),
        }
        let user = Keypair::generate().expect("keys");
        let mut lister = client(
            &ctx,
            &fed.registry.endpoint,
            Some(ClientCurve {
                keypair: user,
                server_key: fed.registry_key().parse().expect("registry key"),
            }),
            ClientOptions::default(),
        );
        let mut names = Vec::new();
        assert!(
            wait_for(Duration::from_secs(5), || {
                names = lister
                    .list()
                    .map(|groups| groups.into_iter().map(|g| g.name).collect())
                    .unwrap_or_default();
                names.len() == 2
            }),
            "{names:?}"
        );
        names.sort();
        assert_eq!(
            names,
            vec![name(0), name(2)],
            "only the host's groups listed"
        );
    }

    /// Issue 24 (H13): removed names were unregistered one request each before the waiting
    /// `create`s' registrations, each waiting a request's full timeout (5 s) while the
    /// registry did not answer: 20 deletes held a create's registration for 100 s (and
    /// the heartbeats with it). Now creates go first, and unregistering stops at the first
    /// name without an answer: the create is answered within two requests' timeouts, and
    /// once the registry answers again the removed names are unregistered.
    #[test]
    fn removed_names_unregistered_one_timeout_each_held_a_create_behind_them() {
        const GONE: usize = 20;
        let host = Keypair::generate().expect("keys");
        let host_key = host.public.to_string();
        // A TTL of 30 s: the removed names cannot expire while the test runs.
        let fed = Federation::start_with("1s", &["--host-key", &host_key, "--ttl-intervals", "30"]);
        let ctx = zmq::Context::new();
        let registrar = registrar(&fed, &ctx, &host, Duration::from_secs(1));
        for i in 0..GONE {
            registrar.set(name(i), 1);
        }
        assert!(wait_for(Duration::from_secs(10), || listed(&fed, &ctx) == GONE));
        let busy = Stopped::new(fed.registry.pid());
        let stopped = Instant::now();
        for i in 0..GONE {
            registrar.remove(name(i));
        }
        let rx = registrar.register_now(vec![HostedGroup {
            name: name(100),
            members: 1,
        }]);
        // At most one unregister and this registration wait their 5 s each.
        let (got, result) = rx
            .recv_timeout(Duration::from_secs(14))
            .expect("a create's registration answered behind 20 removed names");
        assert_eq!(got, name(100));
        assert!(
            matches!(result, Err(RegistrarError::Unreachable { .. })),
            "{result:?}"
        );
        eprintln!(
            "answered {} after the registry stopped",
            agora_common::human_duration(stopped.elapsed())
        );
        drop(busy);
        let again = registrar.register_now(vec![HostedGroup {
            name: name(100),
            members: 1,
        }]);
        let (_, result) = again
            .recv_timeout(Duration::from_secs(10))
            .expect("answered once the registry answers");
        assert_eq!(result, Ok(()));
        // The kept removals go at the next beat (1 s), long before the 30 s TTL.
        assert!(
            wait_for(Duration::from_secs(8), || listed(&fed, &ctx) == 1),
            "{} listed",
            listed(&fed, &ctx)
        );
    }

    /// The inbox keeps at most [`MAX_PENDING_REMOVALS`] removed names; a removal overridden
    /// by a `set` or a `register_now` frees its place.
    #[test]
    fn pending_removals_are_capped() {
        let mut inbox = Inbox::default();
        for i in 0..MAX_PENDING_REMOVALS + 5 {
            inbox.put(name_of(i), Change::Remove);
        }
        assert_eq!(inbox.changes.len(), MAX_PENDING_REMOVALS);
        assert_eq!(inbox.removes, MAX_PENDING_REMOVALS);
        assert!(inbox.dropped);
        // A name already pending is not counted twice; a set frees its place.
        inbox.put(name_of(0), Change::Remove);
        assert_eq!(inbox.removes, MAX_PENDING_REMOVALS);
        inbox.put(name_of(0), Change::Set(1));
        inbox.unremove(&name_of(1));
        assert_eq!(inbox.removes, MAX_PENDING_REMOVALS - 2);
        inbox.put(name_of(MAX_PENDING_REMOVALS + 9), Change::Remove);
        assert!(inbox
            .changes
            .contains_key(&name_of(MAX_PENDING_REMOVALS + 9)));
        // Sets are bounded by the host's groups, not by this cap.
        inbox.put(name_of(MAX_PENDING_REMOVALS + 20), Change::Set(1));
        assert!(inbox
            .changes
            .contains_key(&name_of(MAX_PENDING_REMOVALS + 20)));
    }

    /// `register_now` answers per name: a name another key owns is refused with its code.
    #[test]
    fn register_now_answers_each_name() {
        let host = Keypair::generate().expect("keys");
        let fed = federation("500ms", &host);
        let ctx = zmq::Context::new();
        let other = Keypair::generate().expect("keys");
        let mut theirs = client(
            &ctx,
            &fed.registry.endpoint,
            Some(ClientCurve {
                keypair: other.clone(),
                server_key: fed.registry_key().parse().expect("registry key"),
            }),
            ClientOptions::default(),
        );
        theirs
            .register(
                &name(1),
                &Endpoint::new("tcp://127.0.0.1:9").expect("ep"),
                1,
                Some(other.public),
            )
            .expect("their group");
        let registrar = registrar(&fed, &ctx, &host, Duration::from_millis(500));
        let rx = registrar.register_now(
            (0..2)
                .map(|i| HostedGroup {
                    name: name(i),
                    members: 1,
                })
                .collect(),
        );
        let mut results: Vec<Registration> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).expect("a result"))
            .collect();
        results.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(results[0], (name(0), Ok(())));
        match &results[1] {
            (n, Err(RegistrarError::Refused(e))) => {
                assert_eq!((n, e.code), (&name(1), ErrorCode::NameTaken));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(listed(&fed, &ctx), 2, "ours and theirs");
    }

    /// The registry's CPU time so far (user + system), from `/proc/PID/stat`.
    fn cpu(pid: u32) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // Fields after the command's closing parenthesis: state is field 3, utime 14.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // /proc counts in USER_HZ, 100 per second on Linux whatever the kernel's HZ.
        let hz = 100;
        Duration::from_micros(ticks * 1_000_000 / hz)
    }

    /// Issue 24, item 5 (a measurement, not a test: nothing is asserted about time). The
    /// registry holding 10,000 groups, heartbeat 2 s: its CPU at rest over 20 s when one
    /// host holds them all (`heartbeat_host`), against 10,000 plain `register`s every 2 s
    /// (four connections); its RSS; and `list` latency. Set `AGORA_MEASURE_REGISTRY` to a
    /// release build's `registry` to measure that one.
    ///
    /// `cargo test -p agora-group-node --lib registrar::tests::measure -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, run by hand (--ignored --nocapture)"]
    fn measure_registry_at_10000_groups() {
        const GROUPS: usize = 10_000;
        let window = Duration::from_secs(20);
        for single in [false, true] {
            let host = Keypair::generate().expect("keys");
            let dir = tempfile::tempdir().expect("tmp");
            let data = dir.path().join("data");
            let host_key = host.public.to_string();
            let program = std::env::var("AGORA_MEASURE_REGISTRY")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|_| agora_tests::bin("registry"));
            let mut command = std::process::Command::new(program);
            command.args([
                "--bind",
                "tcp://127.0.0.1:0",
                "--heartbeat",
                "2s",
                "--max-groups",
                "10000",
                "--host-key",
                &host_key,
                // One key stands for 10,000 nodes' here: no per-peer rate limit.
                "--rate-limit",
                "0",
                "--data-dir",
            ]);
            command.arg(&data);
            let registry = agora_tests::Server::spawn_command(
                command,
                "registry",
                &dir.path().join("registry.log"),
            )
            .wait_listening(Duration::from_secs(20));
            let server_key: PublicKey = registry.key.clone().expect("key").parse().expect("key");
            let curve = ClientCurve {
                keypair: host.clone(),
                server_key,
            };
            let ctx = zmq::Context::new();
            let endpoint = Endpoint::new("tcp://127.0.0.1:7").expect("endpoint");
            let stop = Arc::new(AtomicBool::new(false));
            let mut load = Vec::new();
            let mut _registrar = None;
            if single {
                for t in 0..4 {
                    let (ctx, curve, endpoint, stop, registry) = (
                        ctx.clone(),
                        curve.clone(),
                        endpoint.clone(),
                        Arc::clone(&stop),
                        registry.endpoint.clone(),
                    );
                    load.push(std::thread::spawn(move || {
                        let key = curve.keypair.public;
                        // Encoded once: this debug build's JSON must not be the bottleneck.
                        let requests: Vec<_> =
                            (t..GROUPS)
                                .step_by(4)
                                .map(|i| {
                                    agora_proto::codec::encode_call::<
                                        agora_proto::action::call::Register,
                                    >(
                                        &agora_proto::wire::RegisterRequest {
                                            name: name_of(i),
                                            endpoint: endpoint.clone(),
                                            members: 1,
                                            public_key: Some(key),
                                        },
                                    )
                                })
                                .collect();
                        let mut c = agora_common::client::ReqClient::new(
                            &ctx,
                            registry,
                            ClientOptions::default(),
                        )
                        .with_curve(curve);
                        while !stop.load(Ordering::Relaxed) {
                            let next = Instant::now() + Duration::from_secs(2);
                            for r in &requests {
                                let _ = c.request_frames(r);
                            }
                            while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }));
                }
            } else {
                let r = Registrar::start(
                    &ctx,
                    RegistrarConfig {
                        registry: registry.endpoint.clone(),
                        curve: Some(curve.clone()),
                        endpoint: endpoint.clone(),
                        heartbeat: Duration::from_secs(2),
                    },
                )
                .expect("registrar");
                for i in 0..GROUPS {
                    r.set(name_of(i), 1);
                }
                _registrar = Some(r);
            }
            let user = Keypair::generate().expect("keys");
            let mut lister = client(
                &ctx,
                &registry.endpoint,
                Some(ClientCurve {
                    keypair: user,
                    server_key,
                }),
                ClientOptions {
                    timeout: Duration::from_secs(10),
                    attempts: 1,
                },
            );
            let started = Instant::now();
            // Polled every second: a list of 10,000 takes the registry's thread for a while.
            let mut count = 0;
            while count != GROUPS {
                assert!(
                    started.elapsed() < Duration::from_secs(300),
                    "{count} of {GROUPS} listed"
                );
                std::thread::sleep(Duration::from_secs(1));
                count = lister.list().map_or(0, |g| g.len());
            }
            let listed_after = started.elapsed();
            // One TTL to settle, then the window.
            std::thread::sleep(Duration::from_secs(6));
            let (cpu0, t0) = (cpu(registry.pid()), Instant::now());
            std::thread::sleep(window);
            let (cpu1, wall) = (cpu(registry.pid()), t0.elapsed());
            assert_eq!(
                lister.list().map(|g| g.len()).ok(),
                Some(GROUPS),
                "all listed through the window"
            );
            // The round trip only: the reply's frames, not this debug build's decoding.
            let mut raw = agora_common::client::ReqClient::new(
                &ctx,
                registry.endpoint.clone(),
                ClientOptions {
                    timeout: Duration::from_secs(10),
                    attempts: 1,
                },
            )
            .with_curve(ClientCurve {
                keypair: Keypair::generate().expect("keys"),
                server_key,
            });
            let list = agora_proto::codec::encode_call::<agora_proto::action::call::List>(
                &agora_proto::wire::ListRequest {},
            );
            let mut lists = Vec::new();
            let mut bytes = 0;
            for _ in 0..20 {
                let t = Instant::now();
                let reply = raw.request_frames(&list).expect("list");
                lists.push(t.elapsed());
                bytes = reply.iter().map(Vec::len).sum::<usize>();
            }
            lists.sort();
            let status = std::fs::read_to_string(format!("/proc/{}/status", registry.pid()))
                .expect("status");
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .unwrap_or("VmRSS: ?")
                .to_owned();
            eprintln!(
                "{}: all {GROUPS} listed {listed_after:.1?} after start; registry CPU at rest \
                 {:.2}% of a core over {wall:.1?}; {rss}; list p50 {:.1?} max {:.1?} ({bytes} bytes)",
                if single {
                    "10,000 plain registers every 2 s"
                } else {
                    "1 host, heartbeat_host every 2 s"
                },
                100.0 * (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64(),
                lists[lists.len() / 2],
                lists[lists.len() - 1],
            );
            stop.store(true, Ordering::Relaxed);
            for t in load {
                t.join().expect("load");
            }
        }
    }

    fn name_of(i: usize) -> GroupName {
        GroupName::new(format!("measured-{i:05}")).expect("name")
    }
}
