//! The chat commands, on top of `agora_common::client`. Each command writes its result to
//! the given output and returns a [`CliError`] naming the group and the cause when it fails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use agora_common::client::{ClientCurve, ClientError, ClientOptions, GroupClient, RegistryClient};
use agora_common::keys::{Keypair, PublicKey};
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_common::shutdown::Shutdown;
use agora_proto::time::parse_since_local;
use agora_proto::wire::{
    Endpoint, EntryKind, ErrorCode, GroupName, HistoryQuery, UserName, REQUEST_OVERHEAD_BYTES,
};
use serde_json::value::RawValue;

use crate::render::{self, Format, Item, Output};
use crate::state::{GroupState, StateFile};

/// A command's failure: one line for stderr, and the process exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command or its arguments are malformed.
    #[error("{0}")]
    Usage(String),
    /// A group node or the registry failed the request.
    #[error("{target}: {}", cause(.source))]
    Remote {
        /// The group (or `registry ENDPOINT`) the request went to.
        target: String,
        /// What went wrong.
        source: ClientError,
    },
    /// The body is over the node's limit; nothing was sent.
    #[error("{target}: message too large: {len} bytes, the limit is {max} bytes")]
    TooLarge {
        /// The group.
        target: String,
        /// The body's size in bytes.
        len: usize,
        /// The node's limit in bytes.
        max: u64,
    },
    /// Writing output failed.
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
}

fn cause(e: &ClientError) -> String {
    match e {
        ClientError::Timeout { endpoint, waited } => format!(
            "unreachable: no reply from {endpoint} within {} (server down, or its public key is not the one given)",
            humantime::format_duration(std::time::Duration::from_millis(
                u64::try_from(waited.as_millis()).unwrap_or(u64::MAX)
            ))
        ),
        ClientError::Server(w) => match w.code {
            ErrorCode::UnknownGroup => format!("unknown group: {}", w.message),
            ErrorCode::NotMember => format!("not a member: {}", w.message),
            ErrorCode::TooLarge => format!("message too large: {}", w.message),
            code => format!("{code}: {}", w.message),
        },
        other => other.to_string(),
    }
}

/// Exit codes, documented in the README: 0 success, 1 refused by a server, 2 usage,
/// 3 unreachable (timeout), 4 other failures (bad reply, output).
impl CliError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Remote {
                source: ClientError::Timeout { .. },
                ..
            } => 3,
            CliError::Remote {
                source: ClientError::Server(_),
                ..
            }
            | CliError::TooLarge { .. } => 1,
            CliError::Remote { .. } | CliError::Io(_) => 4,
        }
    }
}

/// A group named on the command line: an address or a name to look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `IP:PORT`, `HOST:PORT` or `tcp://HOST:PORT`.
    Address(Endpoint),
    /// A group name, resolved through the registry.
    Name(GroupName),
}

impl Target {
    /// Reads a target: anything ending in `:PORT` (digits) is an address, the rest a name.
    ///
    /// # Errors
    /// [`CliError::Usage`] for an invalid address or name.
    pub fn parse(s: &str) -> Result<Target, CliError> {
        let looks_like_address = s.starts_with("tcp://")
            || s.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.contains(' ')
                    && !port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit())
            });
        if looks_like_address {
            Endpoint::from_host_port(s)
                .map(Target::Address)
                .map_err(|e| CliError::Usage(e.to_string()))
        } else {
            GroupName::new(s)
                .map(Target::Name)
                .map_err(|e| CliError::Usage(e.to_string()))
        }
    }
}

/// Which history to fetch.
#[derive(Debug, Clone, Default)]
pub struct HistoryArgs {
    /// RFC 3339 or `HH:MM:SS` (today, local time).
    pub since: Option<String>,
    /// Messages after this seq.
    pub after_seq: Option<u64>,
    /// One message by id.
    pub id: Option<agora_proto::id::MessageId>,
    /// The newest N.
    pub latest: Option<u32>,
}

/// The client: the registry client, one group client per node, the saved state, and in
/// interactive mode the live feed.
pub struct App {
    ctx: zmq::Context,
    registry: RegistryClient,
    user: UserName,
    options: ClientOptions,
    /// How output is rendered.
    pub format: Format,
    nodes: HashMap<Endpoint, GroupClient>,
    state: Arc<Mutex<StateFile>>,
    feed: Option<Feed>,
    /// The user's CURVE key pair; `None` with `--insecure`.
    keypair: Option<Keypair>,
    /// Node public keys by endpoint, as resolved.
    node_keys: HashMap<String, PublicKey>,
    /// How to reach the registry from another thread (the presence heartbeat).
    registry_endpoint: String,
    registry_curve: Option<ClientCurve>,
}

/// Keeps the user's presence alive on a thread (a `connect` every third of the TTL) and
/// disconnects when dropped.
pub struct PresenceGuard {
    stop: Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where a group is, and how to talk to it.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The node's endpoint.
    pub endpoint: Endpoint,
    /// The group's name, when known.
    pub name: Option<GroupName>,
    /// The node's CURVE public key (`None` only with `--insecure`).
    pub key: Option<PublicKey>,
}

/// Prints one line for the user from the live stream (above the prompt).
pub type Printer = Box<dyn FnMut(String) + Send>;

fn lock(state: &Mutex<StateFile>) -> MutexGuard<'_, StateFile> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl App {
    /// A client acting as `user`, with its state loaded from `state`. With `curve` (the
    /// user's key pair and the registry's public key) every connection is CURVE; without,
    /// nothing is encrypted (`--insecure`).
    pub fn new(
        registry: &str,
        user: UserName,
        options: ClientOptions,
        format: Format,
        state: StateFile,
        curve: Option<ClientCurve>,
    ) -> App {
        let ctx = zmq::Context::new();
        let registry_endpoint = registry.to_owned();
        let mut registry = RegistryClient::new(&ctx, registry, options);
        let keypair = curve.as_ref().map(|c| c.keypair.clone());
        let registry_curve = curve.clone();
        if let Some(curve) = curve {
            registry = registry.with_curve(curve);
        }
        App {
            registry_endpoint,
            registry_curve,
            registry,
            ctx,
            user,
            options,
            format,
            nodes: HashMap::new(),
            state: Arc::new(Mutex::new(state)),
            feed: None,
            keypair,
            node_keys: HashMap::new(),
        }
    }

    /// The CURVE settings for a node with public key `key`.
    fn node_curve(
        &self,
        label: &str,
        key: Option<PublicKey>,
    ) -> Result<Option<ClientCurve>, CliError> {
        match (&self.keypair, key) {
            (None, _) => Ok(None),
            (Some(keypair), Some(server_key)) => Ok(Some(ClientCurve {
                keypair: keypair.clone(),
                server_key,
            })),
            (Some(_), None) => Err(CliError::Usage(format!(
                "{label}: no public key known for this node; reach the group by name through the registry"
            ))),
        }
    }

    fn save_state(&self) {
        if let Err(e) = lock(&self.state).save() {
            tracing::warn!(error = %e, "could not save the client state");
        }
    }

    /// Where `target` is: an address as given; a group joined from this client at its saved
    /// endpoint, with no registry round trip (so chatting in a joined group costs nothing
    /// extra while the registry is down); any other name looked up in the registry. A saved
    /// endpoint that turns out stale is corrected by [`App::on_node`].
    ///
    /// # Errors
    /// [`CliError::Usage`] for a bad target; `unknown_group`; the registry's failure.
    pub fn resolve(&mut self, target: &str) -> Result<Resolved, CliError> {
        let resolved = self.locate(target)?;
        if self.keypair.is_none() && !agora_proto::wire::is_loopback(resolved.endpoint.as_str()) {
            return Err(CliError::Usage(format!(
                "{target}: --insecure is allowed only on loopback endpoints, not {}",
                resolved.endpoint
            )));
        }
        Ok(resolved)
    }

    /// A node's key: saved from a group joined earlier (no registry round trip), else from
    /// the registry's listing.
    fn key_of(&mut self, endpoint: &Endpoint) -> Option<PublicKey> {
        self.keypair.as_ref()?;
        let saved = lock(&self.state)
            .state
            .groups
            .values()
            .find(|g| g.endpoint == endpoint.as_str())
            .and_then(|g| g.public_key);
        saved.or_else(|| {
            self.registry.list().ok().and_then(|groups| {
                groups
                    .into_iter()
                    .find(|g| g.endpoint == *endpoint)
                    .and_then(|g| g.public_key)
            })
        })
    }

    fn locate(&mut self, target: &str) -> Result<Resolved, CliError> {
        match Target::parse(target)? {
            Target::Address(endpoint) => {
                let key = self.key_of(&endpoint);
                Ok(Resolved {
                    endpoint,
                    name: None,
                    key,
                })
            }
            Target::Name(name) => {
                if let Some((endpoint, key)) = self.saved_location(&name) {
                    return Ok(Resolved {
                        endpoint,
                        name: Some(name),
                        key,
                    });
                }
                match self.registry.lookup(&name) {
                    Ok(entry) => Ok(Resolved {
                        endpoint: entry.endpoint,
                        name: Some(name),
                        key: entry.public_key,
                    }),
                    Err(ClientError::Server(w)) if w.code == ErrorCode::UnknownGroup => {
                        Err(CliError::Remote {
                            target: target.to_owned(),
                            source: ClientError::Server(w),
                        })
                    }
                    Err(e) => Err(self.registry_error(e)),
                }
            }
        }
    }

    /// Where the saved state says group `name` is: its node's endpoint and key, if it was
    /// joined from this client.
    fn saved_location(&self, name: &GroupName) -> Option<(Endpoint, Option<PublicKey>)> {
        let state = lock(&self.state);
        let g = state.state.groups.get(name.as_str())?;
        Endpoint::new(g.endpoint.clone())
            .ok()
            .map(|endpoint| (endpoint, g.public_key))
    }

    /// After `err` from the node at a saved endpoint of the group `target` names: when the
    /// node did not answer or no longer serves the group, asks the registry where the group
    /// is now; if somewhere else, saves that and returns true (the caller tries once more).
    fn relocated(&mut self, target: &str, err: &ClientError) -> bool {
        let stale = match err {
            ClientError::Timeout { .. } => true,
            ClientError::Server(w) => w.code == ErrorCode::UnknownGroup,
            _ => false,
        };
        let Ok(Target::Name(name)) = Target::parse(target) else {
            return false;
        };
        let Some((old, _)) = stale.then(|| self.saved_location(&name)).flatten() else {
            return false;
        };
        let entry = match self.registry.lookup(&name) {
            Ok(entry) if entry.endpoint != old => entry,
            _ => return false,
        };
        tracing::info!(group = %name, from = %old, to = %entry.endpoint,
            "the group moved; using the registry's endpoint");
        if let Some(g) = lock(&self.state).state.groups.get_mut(name.as_str()) {
            g.endpoint = entry.endpoint.to_string();
            g.public_key = entry.public_key;
        }
        self.save_state();
        self.nodes.remove(&old);
        true
    }

    /// Runs `op` against the node of `target` ([`App::resolve`]) and returns its result and
    /// the node's endpoint. If the endpoint was saved state and the node did not answer or no
    /// longer serves the group, the registry is asked for the current one and `op` runs there
    /// once more.
    ///
    /// # Errors
    /// Resolution failures; `op`'s, as [`CliError::Remote`] naming `target`.
    fn on_node<T>(
        &mut self,
        target: &str,
        mut op: impl FnMut(&mut GroupClient) -> Result<T, ClientError>,
    ) -> Result<(T, String), CliError> {
        let first = {
            let (node, _) = self.node(target)?;
            op(node).map(|t| (t, node.endpoint().to_owned()))
        };
        match first {
            Err(e) if self.relocated(target, &e) => {
                let (node, _) = self.node(target)?;
                let t = op(node).map_err(|source| remote(target, source))?;
                Ok((t, node.endpoint().to_owned()))
            }
            r => r.map_err(|source| remote(target, source)),
        }
    }

    fn registry_error(&self, source: ClientError) -> CliError {
        CliError::Remote {
            target: format!("registry {}", self.registry.endpoint()),
            source,
        }
    }

    /// The node client for `target` and the label used in messages.
    fn node(&mut self, target: &str) -> Result<(&mut GroupClient, String), CliError> {
        let r = self.resolve(target)?;
        let curve = self.node_curve(target, r.key)?;
        if let Some(key) = r.key {
            self.node_keys.insert(r.endpoint.to_string(), key);
        }
        let (ctx, user, options) = (&self.ctx, &self.user, self.options);
        let client = self.nodes.entry(r.endpoint.clone()).or_insert_with(|| {
            let c = GroupClient::new(ctx, r.endpoint.as_str(), user.clone(), r.name, options);
            match curve {
                Some(curve) => c.with_curve(curve),
                None => c,
            }
        });
        Ok((client, target.to_owned()))
    }

    /// `get_group_list` / `groups`.
    ///
    /// # Errors
    /// The registry's failure.
    pub fn groups(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let groups = self.registry.list().map_err(|e| self.registry_error(e))?;
        for g in &groups {
            out.emit(Item::Group(g))?;
        }
        if groups.is_empty() {
            out.emit(Item::NoGroups)?;
        }
        Ok(())
    }

    /// `join_group` / `join`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn join(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let label = target.to_owned();
        let (r, endpoint) = self.on_node(target, GroupClient::join)?;
        let key = self.node_keys.get(&endpoint).copied();
        let last_seen = {
            let mut state = lock(&self.state);
            let g = state
                .state
                .groups
                .entry(r.group.to_string())
                .or_insert(GroupState {
                    endpoint: endpoint.clone(),
                    last_seen: r.last_seq,
                    subscribed: true,
                    public_key: key,
                });
            g.endpoint = endpoint.clone();
            g.public_key = key;
            g.subscribed = true;
            g.last_seen
        };
        self.save_state();
        self.follow(&label, &endpoint, &r.group, last_seen, key);
        out.emit(Item::Joined(&r))?;
        Ok(())
    }

    /// `leave_group` / `leave`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn leave(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (r, endpoint) = self.on_node(target, GroupClient::leave)?;
        lock(&self.state).state.groups.remove(r.group.as_str());
        self.save_state();
        if let Some(feed) = &self.feed {
            feed.remove(&endpoint);
        }
        out.emit(Item::Left(&r))?;
        Ok(())
    }

    /// `members`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn members(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (r, _) = self.on_node(target, GroupClient::members)?;
        for m in &r.members {
            out.emit(Item::Member(m))?;
        }
        Ok(())
    }

    /// `send_message` / `send`: sends `body` (JSON text) to the group.
    ///
    /// # Errors
    /// [`CliError::TooLarge`] before sending when the body is over the node's limit;
    /// resolution or node failures.
    pub fn send(
        &mut self,
        target: &str,
        body: String,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let label = target.to_owned();
        let body = RawValue::from_string(body)
            .map_err(|e| CliError::Usage(format!("body is not JSON: {e}")))?;
        let len = body.get().len();
        // One id for every try, so that a retry at a moved node is stored once.
        let id = agora_proto::id::MessageId::new_v7();
        let (sent, _) = self.on_node(target, |node| {
            // Past the overhead room, libzmq would drop the connection instead of letting
            // the node answer `too_large`: ask for the limit first and refuse here.
            if len > REQUEST_OVERHEAD_BYTES {
                let max = node.info()?.max_message_bytes;
                if len as u64 > max {
                    return Ok(Err(max));
                }
            }
            node.send_with_id(body.clone(), id).map(Ok)
        })?;
        let ack = sent.map_err(|max| CliError::TooLarge {
            target: label.clone(),
            len,
            max,
        })?;
        out.emit(Item::Sent {
            group: &label,
            ack: &ack,
        })?;
        Ok(())
    }

    /// `get_messages` / `messages`: every matching message, fetched page by page.
    ///
    /// # Errors
    /// [`CliError::Usage`] for a bad time or id, or two selectors; resolution or node
    /// failures.
    pub fn messages(
        &mut self,
        target: &str,
        args: &HistoryArgs,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let query = history_query(args)?;
        // A cheap request first, so that a stale saved endpoint is corrected before any
        // page is printed (a retry mid-stream would print pages twice).
        self.on_node(target, GroupClient::info)?;
        let (node, label) = self.node(target)?;
        let mut write_err = None;
        let mut count = 0usize;
        node.for_each_page(query, None, |page| {
            for m in &page.messages {
                count += 1;
                if let Err(e) = out.emit(Item::Message {
                    group: &page.group,
                    entry: m,
                }) {
                    write_err = Some(e);
                    return false;
                }
            }
            true
        })
        .map_err(|source| remote(&label, source))?;
        if let Some(e) = write_err {
            return Err(e.into());
        }
        if count == 0 {
            out.emit(Item::NoMessages)?;
        }
        Ok(())
    }
}

impl App {
    /// Adds a group to the live feed, if one runs (interactive mode).
    fn follow(
        &self,
        label: &str,
        endpoint: &str,
        group: &GroupName,
        after_seq: u64,
        server_key: Option<PublicKey>,
    ) {
        if let Some(feed) = &self.feed {
            feed.add(GroupSpec {
                label: label.to_owned(),
                endpoint: endpoint.to_owned(),
                group: Some(group.clone()),
                after_seq: Some(after_seq),
                server_key,
            });
        }
    }

    /// The saved state of the group `target` names, after asking its node for its name.
    fn joined(&mut self, target: &str) -> Result<(GroupName, GroupState, String), CliError> {
        let label = target.to_owned();
        let (info, _) = self.on_node(target, GroupClient::info)?;
        let saved = lock(&self.state)
            .state
            .groups
            .get(info.group.as_str())
            .cloned();
        match saved {
            Some(g) => Ok((info.group, g, label)),
            None => Err(CliError::Usage(format!(
                "{label}: not joined from this client; join it first"
            ))),
        }
    }

    /// `subscribe`: follow a joined group live (the default after `join`).
    ///
    /// # Errors
    /// [`CliError::Usage`] if the group was not joined from this client; node failures.
    pub fn subscribe(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (group, saved, label) = self.joined(target)?;
        if let Some(g) = lock(&self.state).state.groups.get_mut(group.as_str()) {
            g.subscribed = true;
        }
        self.save_state();
        self.follow(
            &label,
            &saved.endpoint,
            &group,
            saved.last_seen,
            saved.public_key,
        );
        out.emit(Item::Following {
            group: &group,
            on: true,
        })?;
        Ok(())
    }

    /// `unsubscribe`: stop following a group live, without leaving it.
    ///
    /// # Errors
    /// [`CliError::Usage`] if the group was not joined from this client; node failures.
    pub fn unsubscribe(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (group, saved, _) = self.joined(target)?;
        if let Some(g) = lock(&self.state).state.groups.get_mut(group.as_str()) {
            g.subscribed = false;
        }
        self.save_state();
        if let Some(feed) = &self.feed {
            feed.remove(&saved.endpoint);
        }
        out.emit(Item::Following {
            group: &group,
            on: false,
        })?;
        Ok(())
    }

    /// `check`: for every group joined from this client, the number of entries not yet
    /// shown and the entries themselves; then they count as seen.
    ///
    /// # Errors
    /// The first group's failure (the others are still checked).
    pub fn check(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let groups: Vec<(String, GroupState)> = lock(&self.state)
            .state
            .groups
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if groups.is_empty() {
            out.emit(Item::NoGroupsJoined)?;
        }
        // Direct messages, when this key has an account (seed 003's !check).
        if self.keypair.is_some() {
            match self.show_mailbox(out) {
                Ok(n) => out.emit(Item::DmsShown(n))?,
                Err(CliError::Remote {
                    source: ClientError::Server(w),
                    ..
                }) if w.code == ErrorCode::UnknownUser => {}
                Err(e) => tracing::debug!(error = %e, "no mailbox"),
            }
        }
        let mut first_error = None;
        for (name, saved) in groups {
            if let Err(e) = self.check_one(&name, &saved, out) {
                if first_error.is_none() {
                    first_error = Some(e);
                } else {
                    eprintln!("user-cli: {e}");
                }
            }
        }
        self.save_state();
        first_error.map_or(Ok(()), Err)
    }

    fn check_one(
        &mut self,
        name: &str,
        saved: &GroupState,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let group = GroupName::new(name).map_err(|e| CliError::Usage(e.to_string()))?;
        let after = saved.last_seen;
        let (entries, endpoint) = self.on_node(name, |node| {
            let mut entries = Vec::new();
            node.for_each_page(HistoryQuery::AfterSeq(after), None, |page| {
                entries.extend(page.messages.iter().cloned());
                entries.len() < 10_000
            })
            .map(|()| entries)
        })?;
        out.emit(Item::Unread {
            group: name,
            count: entries.len(),
        })?;
        for m in &entries {
            out.emit(Item::Entry {
                group: &group,
                entry: m,
            })?;
        }
        let mut state = lock(&self.state);
        if let Some(last) = entries.last() {
            state.seen(name, last.seq);
        }
        if let Some(g) = state.state.groups.get_mut(name) {
            g.endpoint = endpoint;
        }
        Ok(())
    }

    /// Starts the live feed for every subscribed group (interactive mode); entries are
    /// printed through `printer` (the user's own messages are not: their ack was) and
    /// counted as seen.
    ///
    /// # Errors
    /// The feed thread could not start.
    pub fn start_live(&mut self, mut printer: Printer) -> std::io::Result<()> {
        let (feed, rx) = Feed::start(
            &self.ctx,
            self.user.clone(),
            self.keypair.clone(),
            feed_options(self.options),
        )?;
        let state = Arc::clone(&self.state);
        let me = self.user.clone();
        let format = self.format;
        std::thread::Builder::new()
            .name("live-printer".into())
            .spawn(move || {
                let mut last_save = Instant::now();
                for event in rx {
                    match event {
                        FeedEvent::Entry { group, entry, .. } => {
                            let mine = entry.sender == me && entry.kind == EntryKind::Message;
                            let mut s = lock(&state);
                            s.seen(group.as_str(), entry.seq);
                            if last_save.elapsed() > Duration::from_millis(500) {
                                let _ = s.save();
                                last_save = Instant::now();
                            }
                            drop(s);
                            let item = Item::Entry {
                                group: &group,
                                entry: &entry,
                            };
                            if let Some(line) = render::line(format, &item).filter(|_| !mine) {
                                printer(line);
                            }
                        }
                        FeedEvent::Error {
                            label,
                            error,
                            fatal,
                        } => {
                            if fatal {
                                printer(format!("user-cli: {label}: {}", cause(&error)));
                            } else {
                                tracing::debug!(%label, %error, "live stream trouble");
                            }
                        }
                        FeedEvent::Subscribed { .. } => {}
                    }
                }
                let _ = lock(&state).save();
            })?;
        let subscribed: Vec<(String, GroupState)> = lock(&self.state)
            .state
            .groups
            .iter()
            .filter(|(_, g)| g.subscribed)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, g) in subscribed {
            let (endpoint, server_key) = GroupName::new(name.clone())
                .ok()
                .and_then(|n| self.registry.lookup(&n).ok())
                .map_or((g.endpoint.clone(), g.public_key), |e| {
                    (e.endpoint.to_string(), e.public_key)
                });
            feed.add(GroupSpec {
                label: name.clone(),
                endpoint,
                group: GroupName::new(name).ok(),
                after_seq: Some(g.last_seen),
                server_key,
            });
        }
        self.feed = Some(feed);
        Ok(())
    }

    /// `watch GROUP...`: prints every new entry of the groups until `stop` is set, or every
    /// group refused the subscription. Starts after `after_seq` (default: from now).
    ///
    /// # Errors
    /// Resolution failures; the last refusal when every group refused.
    pub fn watch(
        &mut self,
        targets: &[String],
        after_seq: Option<u64>,
        out: &mut Output<'_>,
        stop: &Shutdown,
    ) -> Result<(), CliError> {
        let (feed, rx) = Feed::start(
            &self.ctx,
            self.user.clone(),
            self.keypair.clone(),
            feed_options(self.options),
        )?;
        for target in targets {
            let r = self.resolve(target)?;
            self.node_curve(target, r.key)?;
            feed.add(GroupSpec {
                label: target.clone(),
                endpoint: r.endpoint.to_string(),
                group: r.name,
                after_seq,
                server_key: r.key,
            });
        }
        let mut active = targets.len();
        while !stop.is_triggered() {
            let event = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(e) => e,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            match event {
                FeedEvent::Entry { group, entry, .. } => {
                    out.emit(Item::Entry {
                        group: &group,
                        entry: &entry,
                    })?;
                    out.flush()?;
                }
                FeedEvent::Subscribed {
                    label, last_seq, ..
                } => {
                    eprintln!("watching {label} from seq {last_seq}");
                }
                FeedEvent::Error {
                    label,
                    error,
                    fatal,
                } => {
                    eprintln!("user-cli: {label}: {}", cause(&error));
                    if fatal {
                        active -= 1;
                        if active == 0 {
                            return Err(remote(&label, error));
                        }
                    }
                }
            }
        }
        drop(feed);
        Ok(())
    }
}

impl App {
    /// `register NAME` (seed 004's `REGISTER`): binds NAME to your key.
    ///
    /// # Errors
    /// `name_taken` and the like from the registry.
    pub fn user_register(&mut self, name: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let name = UserName::new(name).map_err(|e| CliError::Usage(e.to_string()))?;
        let r = self
            .registry
            .user_register(&name)
            .map_err(|e| self.registry_error(e))?;
        out.emit(Item::Registered(&r))?;
        Ok(())
    }

    /// `unregister NAME` (seed 004's `UNREGISTER`), once confirmed.
    ///
    /// # Errors
    /// `unknown_user`, `forbidden` and the like from the registry.
    pub fn user_unregister(
        &mut self,
        name: &str,
        confirmed: bool,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let name = UserName::new(name).map_err(|e| CliError::Usage(e.to_string()))?;
        let r = self
            .registry
            .user_unregister(&name, confirmed)
            .map_err(|e| self.registry_error(e))?;
        out.emit(Item::Unregistered(&r))?;
        Ok(())
    }

    /// `connect` (seed 004's `CONNECT`) and `away`: marks you online or away until the
    /// session's TTL passes. `connect` then shows the direct messages waiting for you, in
    /// order and numbered, and acks them once shown.
    ///
    /// # Errors
    /// `unknown_user` (register first) and the like from the registry.
    pub fn connect(
        &mut self,
        status: agora_proto::wire::Presence,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let r = self
            .registry
            .connect(status)
            .map_err(|e| self.registry_error(e))?;
        out.emit(Item::Presence(&r))?;
        // Seed 004: "once they reconnect they will receive all pending messages". Shown in
        // order, numbered, then acked, in scripts as at the prompt.
        if status == agora_proto::wire::Presence::Online && self.show_mailbox(out)? == 0 {
            out.emit(Item::NoneWaiting)?;
        }
        Ok(())
    }

    /// `disconnect` (seed 004's `DISCONNECT`): marks you offline.
    ///
    /// # Errors
    /// The registry's failure.
    pub fn disconnect(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let r = self
            .registry
            .disconnect()
            .map_err(|e| self.registry_error(e))?;
        out.emit(Item::Offline(&r))?;
        Ok(())
    }

    /// Keeps your presence alive while the returned guard lives (for long-running modes:
    /// the prompt, `watch`), if your key has an account; `None` otherwise.
    ///
    /// The heartbeat runs on a DEALER that asks the registry to push new direct messages to
    /// it. With a `printer`, each pushed message is printed and then acked (removed from the
    /// mailbox); without one, nothing is acked, so nothing unseen is lost.
    pub fn keep_present(&mut self, printer: Option<Printer>) -> Option<PresenceGuard> {
        let curve = self.registry_curve.clone()?;
        let first = self
            .registry
            .connect(agora_proto::wire::Presence::Online)
            .ok()?;
        let every = Duration::from_millis(first.ttl_ms / 3).max(Duration::from_millis(100));
        let (inbox, dms) =
            agora_common::inbox::Inbox::start(&self.ctx, &self.registry_endpoint, curve, every)
                .ok()?;
        let stop = Shutdown::new();
        let flag = stop.clone();
        let format = self.format;
        let mut printer = printer;
        let thread = std::thread::Builder::new()
            .name("presence".into())
            .spawn(move || {
                while !flag.is_triggered() {
                    let Ok(dm) = dms.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    // Acked only once shown: without a printer, pushed messages stay in the
                    // mailbox for the next `check`.
                    let Some(print) = printer.as_mut() else {
                        continue;
                    };
                    if let Some(line) = render::line(
                        format,
                        &Item::Dm {
                            dm: &dm,
                            stored: false,
                        },
                    ) {
                        print(line);
                    }
                    inbox.ack(dm.n);
                }
            })
            .ok()?;
        Some(PresenceGuard {
            stop,
            thread: Some(thread),
        })
    }

    /// `send_dm NAME TEXT` (also `NAME: text` at the prompt, and seed 004's `SEND u text`).
    ///
    /// # Errors
    /// `unknown_user` / `limit_reached` (the message went to your dead letters) and the like.
    pub fn send_dm(
        &mut self,
        to: &str,
        body: String,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let to = UserName::new(to).map_err(|e| CliError::Usage(e.to_string()))?;
        let body = RawValue::from_string(body)
            .map_err(|e| CliError::Usage(format!("body is not JSON: {e}")))?;
        let ack = match self
            .registry
            .send_dm(&to, body, agora_proto::id::MessageId::new_v7())
        {
            Ok(a) => a,
            Err(ClientError::Server(w)) => {
                return Err(CliError::Remote {
                    target: to.to_string(),
                    source: ClientError::Server(w),
                })
            }
            Err(e) => return Err(self.registry_error(e)),
        };
        out.emit(Item::DmSent { to: &to, ack: &ack })?;
        Ok(())
    }

    /// The direct messages waiting for you: shown, then acked (removed) up to the last one
    /// shown, so a crash before display loses nothing. Returns how many were shown.
    ///
    /// # Errors
    /// The registry's failure.
    fn show_mailbox(&mut self, out: &mut Output<'_>) -> Result<u64, CliError> {
        let mut after = 0;
        let mut shown = 0;
        loop {
            let page = self
                .registry
                .mailbox(after, Some(1000))
                .map_err(|e| self.registry_error(e))?;
            for dm in &page.messages {
                out.emit(Item::Dm { dm, stored: true })?;
                after = dm.n;
                shown += 1;
            }
            out.flush()?;
            if after > 0 {
                self.registry
                    .ack_dm(after)
                    .map_err(|e| self.registry_error(e))?;
            }
            if !page.more {
                return Ok(shown);
            }
        }
    }

    /// `dead_letters`: your messages that could not be delivered, with the reasons.
    ///
    /// # Errors
    /// The registry's failure.
    pub fn dead_letters(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let letters = self
            .registry
            .dead_letters()
            .map_err(|e| self.registry_error(e))?;
        for l in &letters {
            out.emit(Item::DeadLetter(l))?;
        }
        if letters.is_empty() {
            out.emit(Item::NoDeadLetters)?;
        }
        Ok(())
    }

    /// `users`: every account.
    ///
    /// # Errors
    /// The registry's failure.
    pub fn users(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let users = self.registry.users().map_err(|e| self.registry_error(e))?;
        for u in &users {
            out.emit(Item::User(u))?;
        }
        if users.is_empty() {
            out.emit(Item::NoAccounts)?;
        }
        Ok(())
    }

    /// `whois NAME`.
    ///
    /// # Errors
    /// `unknown_user`; the registry's failure.
    pub fn whois(&mut self, name: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let name = UserName::new(name).map_err(|e| CliError::Usage(e.to_string()))?;
        let r = match self.registry.whois(&name) {
            Ok(r) => r,
            Err(ClientError::Server(w)) if w.code == ErrorCode::UnknownUser => {
                return Err(CliError::Remote {
                    target: name.to_string(),
                    source: ClientError::Server(w),
                })
            }
            Err(e) => return Err(self.registry_error(e)),
        };
        out.emit(Item::Whois(&r.user))?;
        Ok(())
    }
}

/// A policy change a user can ask for.
#[derive(Debug, Clone)]
pub enum PolicyChange {
    /// `invite GROUP KEY`.
    Invite(PublicKey),
    /// `ban GROUP KEY`.
    Ban(PublicKey),
    /// `unban GROUP KEY`.
    Unban(PublicKey),
    /// `kick GROUP USER`.
    Kick(UserName),
    /// `promote GROUP USER`.
    Promote(UserName),
    /// `set_mode GROUP open|private`.
    SetMode(agora_proto::wire::GroupMode),
}

impl App {
    /// `invite`, `ban`, `unban`, `kick`, `promote`, `set_mode`.
    ///
    /// # Errors
    /// `forbidden` and the like from the node; resolution failures.
    pub fn policy(
        &mut self,
        target: &str,
        change: PolicyChange,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        use agora_proto::action::call;
        let label = target.to_owned();
        let what = format!("{change:?}");
        let (r, _) = self.on_node(target, |node| match &change {
            PolicyChange::Invite(k) => node.key_policy::<call::Invite>(*k),
            PolicyChange::Ban(k) => node.key_policy::<call::Ban>(*k),
            PolicyChange::Unban(k) => node.key_policy::<call::Unban>(*k),
            PolicyChange::Kick(u) => node.member_policy::<call::Kick>(u.clone()),
            PolicyChange::Promote(u) => node.member_policy::<call::Promote>(u.clone()),
            PolicyChange::SetMode(m) => node.set_mode(*m),
        })?;
        out.emit(Item::Policy {
            group: &label,
            what: &what,
            reply: &r,
        })?;
        Ok(())
    }
}

fn feed_options(client: ClientOptions) -> FeedOptions {
    FeedOptions {
        client,
        ..FeedOptions::default()
    }
}

fn remote(label: &str, source: ClientError) -> CliError {
    CliError::Remote {
        target: label.to_owned(),
        source,
    }
}

/// The protocol query for the CLI's history options.
///
/// # Errors
/// [`CliError::Usage`] for more than one selector, a bad time or a bad id.
pub fn history_query(args: &HistoryArgs) -> Result<HistoryQuery, CliError> {
    let given = [
        args.since.is_some(),
        args.after_seq.is_some(),
        args.id.is_some(),
        args.latest.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(CliError::Usage(
            "give at most one of --since, --after-seq, --id and --latest".into(),
        ));
    }
    if let Some(since) = &args.since {
        let t = parse_since_local(since).map_err(|e| CliError::Usage(e.to_string()))?;
        return Ok(HistoryQuery::Since(t));
    }
    if let Some(id) = args.id {
        return Ok(HistoryQuery::ById(id));
    }
    if let Some(n) = args.latest {
        return Ok(HistoryQuery::Latest(n));
    }
    Ok(HistoryQuery::AfterSeq(args.after_seq.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_with_a_numeric_port_are_addresses() {
        assert!(matches!(
            Target::parse("127.0.0.1:5560"),
            Ok(Target::Address(_))
        ));
        assert!(matches!(
            Target::parse("tcp://host:1"),
            Ok(Target::Address(_))
        ));
        assert!(matches!(Target::parse("Cool Group"), Ok(Target::Name(_))));
        assert!(matches!(Target::parse("news: today"), Ok(Target::Name(_))));
        assert!(matches!(
            Target::parse("127.0.0.1:0"),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn history_args_allow_one_selector() {
        let two = HistoryArgs {
            since: Some("10:00:00".into()),
            latest: Some(3),
            ..Default::default()
        };
        assert!(matches!(history_query(&two), Err(CliError::Usage(_))));
        let bad = HistoryArgs {
            since: Some("noon".into()),
            ..Default::default()
        };
        assert!(matches!(history_query(&bad), Err(CliError::Usage(_))));
        assert_eq!(
            history_query(&HistoryArgs::default()).ok(),
            Some(HistoryQuery::AfterSeq(0))
        );
    }
}
