//! The chat commands, on top of `agora_common::client`. Each command produces its results
//! as [`crate::render::Item`]s (the renderer prints them) and returns a [`CliError`] naming
//! the group and the cause when it fails.
//!
//! - this module: [`App`], its errors, and finding a group's node (saved state first, the
//!   registry on a miss or a failure);
//! - [`groups`]: the group commands (`groups`, `join`, `leave`, `members`, `send`,
//!   `messages`, the policy commands);
//! - [`live`]: following groups (`subscribe`, `unsubscribe`, `check`, `watch`, the prompt's
//!   live stream);
//! - [`accounts`]: accounts, presence and direct messages;
//! - [`files`]: `send_file` and `get_file`, resumable, with progress.
//! - [`names`]: the group and user names tab completion offers.

mod accounts;
mod files;
mod groups;
mod live;
mod names;

pub use names::Names;

pub use groups::PolicyChange;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use agora_common::client::{
    ClientCurve, ClientError, ClientOptions, GroupClient, GroupView, HostPool, HostView,
    RegistryClient,
};
use agora_common::keys::{Keypair, PublicKey};
use agora_common::live::Feed;
use agora_proto::time::parse_since_local;
use agora_proto::wire::{Endpoint, ErrorCode, GroupEntry, GroupName, HistoryQuery, UserName};

use crate::render::Format;
use crate::state::StateFile;

/// A command's failure: one line for stderr, and the process exit code (the README's
/// table: 0 ok, 1 refused by a server, 2 usage, 3 unreachable, 4 local input/output).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command or its arguments are malformed (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A server answered, but not with what was asked: a message that does not exist, a
    /// message that carries no file (exit 1).
    #[error("{0}")]
    Refused(String),
    /// A group node or the registry failed the request (exit 1 for a refusal, 3 when it did
    /// not answer or answered something that could not be read, 2 for an endpoint libzmq
    /// refused, 4 for a local file that could not be read).
    #[error("{}", remote_line(.target, .source))]
    Remote {
        /// The group (or `registry ENDPOINT`) the request went to.
        target: String,
        /// What went wrong.
        source: ClientError,
    },
    /// The body is over the node's limit, or the input it is read from over user-cli's
    /// ([`crate::command::MAX_INPUT_BYTES`]); nothing was sent (exit 1).
    #[error("{target}: message too large: {}the limit is {max} bytes", .len.map(|n| format!("{n} bytes, ")).unwrap_or_default())]
    TooLarge {
        /// The group.
        target: String,
        /// The body's size in bytes (`None`: input refused part way, at the limit).
        len: Option<usize>,
        /// The node's limit in bytes.
        max: u64,
    },
    /// What the user gave could not be read: not UTF-8 (`input line 3: not UTF-8`), or
    /// reading failed (exit 4, local input). The error's text names the input and the line.
    #[error("{0}")]
    Input(std::io::Error),
    /// A local file or directory could not be read or written (exit 4).
    #[error("{}: {source}", .path.display())]
    Local {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A transfer (`send_file`, `get_file`) stopped part way; what was done is kept (the exit
    /// code is the cause's).
    #[error("{0}; run the same command again to resume")]
    Interrupted(Box<CliError>),
    /// Writing output failed (exit 4).
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
}

pub use agora_common::human_duration;

/// `target: cause`, with the target left out when the cause already names it (the node's
/// `alice is not a member of "Cool Group"`).
fn remote_line(target: &str, source: &ClientError) -> String {
    if let ClientError::Timeout { endpoint, waited } = source {
        if target.ends_with(endpoint.as_str()) {
            // `registry tcp://…`: the endpoint is said once.
            return format!(
                "{target}: unreachable: no reply within {} (server down, or its public key \
                 is not the one given)",
                human_duration(*waited)
            );
        }
    }
    let cause = cause(source);
    // The server's text names the target already: quoted (a group), or as its subject (a
    // user: `alice does not accept direct messages from you`).
    let named = match source {
        ClientError::Server(w) => w.message.starts_with(&format!("{target} ")),
        _ => false,
    };
    if named || cause.contains(&format!("\"{target}\"")) {
        cause
    } else {
        format!("{target}: {cause}")
    }
}

fn cause(e: &ClientError) -> String {
    match e {
        ClientError::Timeout { endpoint, waited } => format!(
            "unreachable: no reply from {endpoint} within {} (server down, or its public key is not the one given)",
            human_duration(*waited)
        ),
        ClientError::Server(w) => match w.code {
            // The server's text says the same in the protocol's words; this says what to run.
            ErrorCode::NoAccount => {
                "no account: your key has none yet; run `user-cli register NAME` to make one".into()
            }
            code => {
                // Each cause once: the code in words, unless the server's text says it.
                // Scripts match the stable code (`not_found`); three have had words.
                let words = match code {
                    ErrorCode::NotMember => "not a member".to_owned(),
                    ErrorCode::UnknownGroup => "unknown group".to_owned(),
                    ErrorCode::TooLarge => "message too large".to_owned(),
                    code => code.as_str().to_owned(),
                };
                let said = w.message.to_ascii_lowercase();
                if w.message.is_empty() {
                    words
                } else if said.contains(&words) {
                    w.message.clone()
                } else {
                    format!("{words}: {}", w.message)
                }
            }
        },
        other => other.to_string(),
    }
}

impl CliError {
    /// The process exit code for this failure: 1 refused by a server, 2 usage, 3 a server
    /// unreachable, 4 local input or output.
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
            | CliError::Refused(_)
            | CliError::TooLarge { .. } => 1,
            // No usable answer: as good as none.
            CliError::Remote {
                source: ClientError::BadReply(_),
                ..
            } => 3,
            // libzmq refused the endpoint (connect, option): the argument's fault.
            CliError::Remote {
                source: ClientError::Zmq(_),
                ..
            } => 2,
            CliError::Interrupted(inner) => inner.exit_code(),
            CliError::Remote { .. }
            | CliError::Input(_)
            | CliError::Local { .. }
            | CliError::Io(_) => 4,
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
    /// One client per host endpoint, shared by the groups it serves, each request naming its
    /// group (a client per endpoint made for the first group named there sent a second
    /// group's requests to the first; issue 24). Bounded (least recently used closed).
    /// Not used while the live feed runs (the prompt): requests then go over the feed's
    /// connection to the host ([`App::over_host`]).
    hosts: HostPool,
    /// The group served at an endpoint named by address (`join 127.0.0.1:5000`), as its node
    /// answered `info`: asked once, then every request names it.
    served_at: HashMap<Endpoint, GroupName>,
    state: Arc<Mutex<StateFile>>,
    feed: Option<Feed>,
    /// What a session adds: its live printer, presence, own sent ids, completion names.
    session: live::Session,
    /// The user's CURVE key pair; `None` with `--insecure`.
    keypair: Option<Keypair>,
    /// Node public keys by endpoint, as resolved.
    node_keys: HashMap<String, PublicKey>,
    /// How to reach the registry from another thread (the presence heartbeat).
    registry_endpoint: String,
    registry_curve: Option<ClientCurve>,
}

/// The most endpoints named by address whose group is remembered (256); past it they are
/// forgotten and asked again.
const MAX_SERVED_AT: usize = 256;

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

impl Drop for App {
    /// Stops the live feed (its actor saves nothing itself), then saves what it saw and the
    /// registry that answered.
    fn drop(&mut self) {
        drop(self.feed.take());
        self.remember_registry();
        self.save_state();
    }
}

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
        let registry_endpoint = answered_first(registry, state.state.registry.as_deref());
        let mut registry = RegistryClient::new(&ctx, &registry_endpoint, options);
        let keypair = curve.as_ref().map(|c| c.keypair.clone());
        let registry_curve = curve.clone();
        if let Some(curve) = curve {
            registry = registry.with_curve(curve);
        }
        let hosts = HostPool::new(&ctx, user.clone(), keypair.clone(), options);
        App {
            registry_endpoint,
            registry_curve,
            registry,
            ctx,
            user,
            options,
            format,
            hosts,
            served_at: HashMap::new(),
            state: Arc::new(Mutex::new(state)),
            feed: None,
            session: live::Session::default(),
            keypair,
            node_keys: HashMap::new(),
        }
    }

    /// Where the registry says a group is now, for a feed that follows groups across a
    /// failover.
    fn locator(&self) -> agora_common::live::Locate {
        agora_common::live::registry_locator(
            &self.ctx,
            &self.registry_endpoint,
            self.registry_curve.clone(),
            self.options,
        )
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

    /// Notes, in the state, the registry endpoint in use, to try first next time (with a
    /// list of them only).
    fn remember_registry(&self) {
        if agora_common::client::registry_endpoints(&self.registry_endpoint).len() > 1 {
            lock(&self.state).state.registry = Some(self.registry.endpoint().to_owned());
        }
    }

    fn save_state(&self) {
        crate::state::save_shared(&self.state);
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
    /// node did not answer, is stopping, or no longer serves the group, asks the registry where
    /// the group is now; if somewhere else, saves that and returns true (the caller tries once
    /// more).
    ///
    /// When the host itself is gone (it did not answer, or is stopping), so is every other
    /// group saved at its endpoint: each is looked up too and the ones the registry places
    /// elsewhere are moved now, so that the session waits at the dead endpoint once, not once
    /// per group of that host (a standby took over all of them).
    fn relocated(&mut self, target: &str, err: &ClientError) -> bool {
        let host_gone = match err {
            ClientError::Timeout { .. } => true,
            // A node that stops (drains, or lost its lease to a standby) says so.
            ClientError::Server(w) => w.code == ErrorCode::ShuttingDown,
            _ => false,
        };
        let stale =
            host_gone || matches!(err, ClientError::Server(w) if w.code == ErrorCode::UnknownGroup);
        let Ok(Target::Name(name)) = Target::parse(target) else {
            return false;
        };
        let Some((old, _)) = stale.then(|| self.saved_location(&name)).flatten() else {
            return false;
        };
        let moved = match self.registry.lookup(&name) {
            Ok(entry) if entry.endpoint != old => {
                self.move_group(&name, &old, &entry);
                true
            }
            _ => false,
        };
        let others = if host_gone {
            self.move_others_from(&old, &name)
        } else {
            0
        };
        if moved || others > 0 {
            self.save_state();
            self.hosts.remove(old.as_str());
        }
        moved
    }

    /// Re-points the saved group `name` from `old` to the registry's `entry` (the state is
    /// saved by the caller).
    fn move_group(&mut self, name: &GroupName, old: &Endpoint, entry: &GroupEntry) {
        tracing::info!(group = %name, from = %old, to = %entry.endpoint,
            "the group moved; using the registry's endpoint");
        if let Some(g) = lock(&self.state).state.groups.get_mut(name.as_str()) {
            g.endpoint = entry.endpoint.to_string();
            g.public_key = entry.public_key;
        }
    }

    /// The host at `old` is gone: looks up every group saved there but `except` and moves the
    /// ones the registry places elsewhere; returns how many moved. A group the registry still
    /// places at `old` (its new host has not registered it yet) stays, and is looked up again
    /// when used. Stops at the first lookup the registry does not answer (each would wait out
    /// `--timeout` again).
    fn move_others_from(&mut self, old: &Endpoint, except: &GroupName) -> usize {
        let names: Vec<GroupName> = lock(&self.state)
            .state
            .groups
            .iter()
            .filter(|(n, g)| g.endpoint == old.as_str() && n.as_str() != except.as_str())
            .filter_map(|(n, _)| GroupName::new(n.clone()).ok())
            .collect();
        let mut moved = 0;
        for name in names {
            match self.registry.lookup(&name) {
                Ok(entry) if entry.endpoint != *old => {
                    self.move_group(&name, old, &entry);
                    moved += 1;
                }
                Err(ClientError::Timeout { .. }) => break,
                _ => {}
            }
        }
        moved
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
        mut op: impl FnMut(&mut GroupView<'_>) -> Result<T, ClientError>,
    ) -> Result<(T, String), CliError> {
        // The first attempt alone: if it goes unanswered the group may have moved (a
        // standby took over), which the registry tells before the other attempts are spent
        // on a dead node (PROTOCOL §11.2).
        let options = self.options;
        let first = self.attempt(target, options.one_attempt(), &mut op)?;
        match first {
            Err(e) if self.relocated(target, &e) => self
                .attempt(target, options, &mut op)?
                .map_err(|source| remote(target, source)),
            Err(ClientError::Timeout { .. }) if options.rest().is_some() => {
                // Not moved: the rest of the attempts at the same node.
                let rest = options.rest().unwrap_or(options);
                self.attempt(target, rest, &mut op)?
                    .map_err(|source| match source {
                        // The first attempt's share and the rest: the whole --timeout was
                        // spent.
                        ClientError::Timeout { endpoint, .. } => remote(
                            target,
                            ClientError::Timeout {
                                endpoint,
                                waited: options.timeout,
                            },
                        ),
                        source => remote(target, source),
                    })
            }
            r => r.map_err(|source| remote(target, source)),
        }
    }

    /// Runs `op` once against the group `target` names, its host's client waiting and
    /// retrying as `options` says for this call only; returns `op`'s result and the host's
    /// endpoint.
    ///
    /// # Errors
    /// Resolution failures (the outer result).
    fn attempt<T>(
        &mut self,
        target: &str,
        options: ClientOptions,
        op: &mut impl FnMut(&mut GroupView<'_>) -> Result<T, ClientError>,
    ) -> Result<Result<(T, String), ClientError>, CliError> {
        let (endpoint, key, group) = self.node(target)?;
        let r = self.over_host(&endpoint, key, options, |host| op(&mut host.group(&group)));
        Ok(r.map(|t| (t, endpoint.to_string())))
    }

    /// Runs `op` with the calls of the host at `endpoint` (CURVE with `key`), waiting and
    /// retrying as `options` says: over the live feed's connection to it when a feed runs
    /// (the prompt: one connection per host, for following and commanding its groups),
    /// else over the pool's client for it (one-shot commands, scripts).
    fn over_host<T>(
        &mut self,
        endpoint: &Endpoint,
        key: Option<PublicKey>,
        options: ClientOptions,
        op: impl FnOnce(&mut HostView<'_>) -> T,
    ) -> T {
        if let Some(feed) = &self.feed {
            let mut link = feed.link(endpoint.as_str(), key, options);
            return op(&mut HostView::new(&mut link, &self.user));
        }
        let usual = self.options;
        let host = self.hosts.host(endpoint.as_str(), key);
        host.set_options(options);
        let r = op(&mut host.view());
        host.set_options(usual);
        r
    }

    fn registry_error(&self, source: ClientError) -> CliError {
        CliError::Remote {
            target: format!("registry {}", self.registry.endpoint()),
            source,
        }
    }

    /// The host of `target` (its endpoint and key) and the group's name, which every
    /// request names. A target given by address is asked its group's name first (`info`
    /// without a group, answered by a node of one; a group host answers `invalid_field`:
    /// name the group instead).
    fn node(&mut self, target: &str) -> Result<(Endpoint, Option<PublicKey>, GroupName), CliError> {
        let r = self.resolve(target)?;
        let curve = self.node_curve(target, r.key)?;
        if let Some(key) = r.key {
            self.node_keys.insert(r.endpoint.to_string(), key);
        }
        let name = match r.name {
            Some(name) => name,
            None => self.served_group(target, &r.endpoint, curve)?,
        };
        Ok((r.endpoint, r.key, name))
    }

    /// Checks that the host at `endpoint` (CURVE with `key`) can be asked for its own
    /// actions (`create`); `label` names it in errors.
    ///
    /// # Errors
    /// [`CliError::Usage`] when no key is known for it (and the client is not `--insecure`),
    /// or it is not on loopback with `--insecure`.
    fn check_host(
        &self,
        label: &str,
        endpoint: &Endpoint,
        key: Option<PublicKey>,
    ) -> Result<(), CliError> {
        if self.keypair.is_none() && !agora_proto::wire::is_loopback(endpoint.as_str()) {
            return Err(CliError::Usage(format!(
                "{label}: --insecure is allowed only on loopback endpoints, not {endpoint}"
            )));
        }
        if self.keypair.is_some() && key.is_none() {
            return Err(CliError::Usage(format!(
                "{label}: no public key known for the host {endpoint}; pass --host-key KEY \
                 (the host prints it at start)"
            )));
        }
        Ok(())
    }

    /// The group the node at `endpoint` serves (`target` names it by address), asked once.
    ///
    /// # Errors
    /// The node's failure, naming `target`.
    fn served_group(
        &mut self,
        target: &str,
        endpoint: &Endpoint,
        curve: Option<ClientCurve>,
    ) -> Result<GroupName, CliError> {
        if let Some(name) = self.served_at.get(endpoint) {
            return Ok(name.clone());
        }
        let mut probe = GroupClient::new(
            &self.ctx,
            endpoint.as_str(),
            self.user.clone(),
            None,
            self.options,
        );
        if let Some(curve) = curve {
            probe = probe.with_curve(curve);
        }
        let info = probe.info().map_err(|source| remote(target, source))?;
        if self.served_at.len() >= MAX_SERVED_AT {
            self.served_at.clear();
        }
        self.served_at.insert(endpoint.clone(), info.group.clone());
        Ok(info.group)
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

/// The registry list `list` (`A,B,…`) starting at `answered` when it is one of its endpoints
/// (the rest after it, in order, then those before), else as given.
fn answered_first(list: &str, answered: Option<&str>) -> String {
    let mut endpoints = agora_common::client::registry_endpoints(list);
    match answered.and_then(|a| endpoints.iter().position(|e| e == a)) {
        Some(at) => {
            endpoints.rotate_left(at);
            endpoints.join(",")
        }
        None => list.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_that_answered_comes_first() {
        assert_eq!(
            answered_first("tcp://a:1,tcp://b:2,tcp://c:3", Some("tcp://b:2")),
            "tcp://b:2,tcp://c:3,tcp://a:1"
        );
        assert_eq!(
            answered_first("tcp://a:1, tcp://b:2", Some("tcp://a:1")),
            "tcp://a:1,tcp://b:2"
        );
        assert_eq!(
            answered_first("tcp://a:1,tcp://b:2", Some("tcp://gone:9")),
            "tcp://a:1,tcp://b:2"
        );
        assert_eq!(answered_first("tcp://a:1", None), "tcp://a:1");
    }

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
    fn durations_read_as_people_write_them() {
        use std::time::Duration;
        assert_eq!(human_duration(Duration::from_nanos(1_001_396_117)), "1s");
        assert_eq!(human_duration(Duration::from_millis(3334)), "3s 300ms");
        assert_eq!(human_duration(Duration::from_millis(5000)), "5s");
        assert_eq!(human_duration(Duration::from_micros(250_400)), "250ms");
    }

    #[test]
    fn each_cause_is_said_once() {
        use agora_proto::wire::WireError;
        let refused = |code, message: &str| CliError::Remote {
            target: "Cool Group".into(),
            source: ClientError::Server(WireError::new(code, message)),
        };
        assert_eq!(
            refused(
                ErrorCode::NotMember,
                "mallory is not a member of \"Cool Group\""
            )
            .to_string(),
            "mallory is not a member of \"Cool Group\""
        );
        assert_eq!(
            refused(ErrorCode::Forbidden, "only the owner may").to_string(),
            "Cool Group: forbidden: only the owner may"
        );
        let blocked = CliError::Remote {
            target: "alice".into(),
            source: ClientError::Server(WireError::new(
                ErrorCode::Blocked,
                "alice does not accept direct messages from you",
            )),
        };
        assert_eq!(
            blocked.to_string(),
            "blocked: alice does not accept direct messages from you"
        );
        let timeout = CliError::Remote {
            target: "Cool Group".into(),
            source: ClientError::Timeout {
                endpoint: "tcp://127.0.0.1:5560".into(),
                waited: std::time::Duration::from_nanos(5_000_396_117),
            },
        };
        assert!(timeout
            .to_string()
            .contains("no reply from tcp://127.0.0.1:5560 within 5s"));
        let registry = CliError::Remote {
            target: "registry tcp://127.0.0.1:5555".into(),
            source: ClientError::Timeout {
                endpoint: "tcp://127.0.0.1:5555".into(),
                waited: std::time::Duration::from_millis(1500),
            },
        };
        assert_eq!(
            registry.to_string(),
            "registry tcp://127.0.0.1:5555: unreachable: no reply within 1s 500ms (server \
             down, or its public key is not the one given)"
        );
        let cut = CliError::Interrupted(Box::new(timeout));
        assert!(cut
            .to_string()
            .ends_with("; run the same command again to resume"));
        assert_eq!(cut.exit_code(), 3);
    }

    /// Review of issue 23: a malformed reply exited 4 (local I/O) and a zmq endpoint error
    /// 4; input that is not UTF-8 exited 2 (usage). The README's table: 3, 2 and 4.
    #[test]
    fn exit_codes_follow_the_readme_table() {
        let remote = |source| CliError::Remote {
            target: "Cool Group".into(),
            source,
        };
        let bad_reply = remote(ClientError::BadReply(
            agora_proto::codec::CodecError::FrameCount(3),
        ));
        assert_eq!(bad_reply.exit_code(), 3, "{bad_reply}");
        let zmq = remote(ClientError::Zmq(zmq::Error::EINVAL));
        assert_eq!(zmq.exit_code(), 2, "{zmq}");
        let not_utf8 = CliError::Input(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "input line 2: not UTF-8",
        ));
        assert_eq!(not_utf8.exit_code(), 4);
        let read = remote(ClientError::Read(std::io::Error::other("gone")));
        assert_eq!(read.exit_code(), 4);
        let too_large = CliError::TooLarge {
            target: "G".into(),
            len: None,
            max: 1_048_576,
        };
        assert_eq!(
            too_large.to_string(),
            "G: message too large: the limit is 1048576 bytes"
        );
        assert_eq!(too_large.exit_code(), 1);
        assert_eq!(
            CliError::Usage("nothing to send: the text is empty".into()).exit_code(),
            2
        );
    }

    /// A ROUTER at one endpoint that serves `groups` as a group node does: with several, as
    /// a group host, `send` and `info` must name one of them (else `invalid_field` or
    /// `unknown_group`); with one, a request naming none is that group's (a node of one).
    /// Answers until `requests` requests came, and returns the group each named, in order.
    fn fake_host(
        ctx: &zmq::Context,
        groups: &[&str],
        requests: usize,
    ) -> (String, std::thread::JoinHandle<Vec<Option<GroupName>>>) {
        use agora_proto::action::NodeRequest;
        use agora_proto::codec::{decode_request, encode_error, encode_ok, split_envelope};
        use agora_proto::wire::{InfoReply, SendAck, WireError};
        let router = ctx.socket(zmq::ROUTER).expect("router");
        router.set_rcvtimeo(10_000).expect("timeout");
        router.bind("tcp://127.0.0.1:*").expect("bind");
        let endpoint = router
            .get_last_endpoint()
            .expect("endpoint")
            .expect("utf-8");
        let groups: Vec<GroupName> = groups.iter().map(|g| g.parse().expect("name")).collect();
        let serve = std::thread::spawn(move || {
            let mut named = Vec::new();
            let mut seq = 0;
            while named.len() < requests {
                let Ok(frames) = router.recv_multipart(0) else {
                    break;
                };
                let (envelope, body) = split_envelope(frames).expect("envelope");
                let request = decode_request::<NodeRequest>(&body).expect("request");
                let group = request.group().cloned();
                named.push(group.clone());
                let reply = match group.or_else(|| (groups.len() == 1).then(|| groups[0].clone())) {
                    None => encode_error(&WireError::new(
                        ErrorCode::InvalidField,
                        "group: required on a group host",
                    )),
                    Some(g) if !groups.contains(&g) => encode_error(
                        &WireError::new(ErrorCode::UnknownGroup, "not served here")
                            .with_group(Some(g)),
                    ),
                    Some(g) => match request {
                        NodeRequest::Send(r) => {
                            seq += 1;
                            encode_ok(&SendAck {
                                seq,
                                id: r.id.unwrap_or_else(agora_proto::id::MessageId::new_v7),
                                time: agora_proto::time::Timestamp::now(),
                                duplicate: false,
                            })
                        }
                        NodeRequest::Info(_) => encode_ok(&InfoReply {
                            group: g,
                            last_seq: seq,
                            members: 1,
                            max_message_bytes: 1 << 20,
                            mode: agora_proto::wire::GroupMode::Open,
                        }),
                        other => panic!("unexpected {other:?}"),
                    },
                };
                let mut out = envelope;
                out.extend(reply);
                router.send_multipart(out, 0).expect("reply");
            }
            named
        });
        (endpoint, serve)
    }

    /// An app acting as alice, `--insecure`, with `joined` saved as joined at `endpoint` (no
    /// registry: saved groups are reached without one).
    fn app_with_saved(dir: &std::path::Path, endpoint: &str, joined: &[&str]) -> App {
        let user = UserName::new("alice").expect("name");
        let mut state = StateFile::open(Some(dir.to_owned()), &user);
        for g in joined {
            state.state.groups.insert(
                (*g).to_owned(),
                crate::state::GroupState {
                    endpoint: endpoint.to_owned(),
                    last_seen: 0,
                    subscribed: false,
                    public_key: None,
                },
            );
        }
        let options = ClientOptions {
            timeout: std::time::Duration::from_secs(5),
            ..ClientOptions::default()
        };
        App::new(
            "tcp://127.0.0.1:9",
            user,
            options,
            Format::Json,
            state,
            None,
        )
    }

    /// Issue 24 (docs/design/group-host.md §0): the client for a node was kept per endpoint,
    /// made with the first group's name, so on a group host a second group's messages went
    /// to the first. Each group at one endpoint gets its own requests now.
    #[test]
    fn two_groups_at_one_endpoint_each_get_their_own_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = zmq::Context::new();
        let (endpoint, host) = fake_host(&ctx, &["ops", "dev"], 4);
        let mut app = app_with_saved(dir.path(), &endpoint, &["ops", "dev"]);
        let mut printed = Vec::new();
        for (group, text) in [
            ("ops", "to ops"),
            ("dev", "to dev"),
            ("ops", "again"),
            ("dev", "again"),
        ] {
            let mut out = crate::render::Output::new(Format::Json, &mut printed);
            app.send(group, crate::command::json_string(text), &mut out)
                .unwrap_or_else(|e| panic!("send to {group}: {e}"));
        }
        drop(app);
        let named: Vec<String> = host
            .join()
            .expect("host")
            .into_iter()
            .map(|g| g.map(|g| g.to_string()).unwrap_or_default())
            .collect();
        assert_eq!(named, ["ops", "dev", "ops", "dev"]);
    }

    /// A group named by address is asked its name once (`info`, as a node of one answers
    /// it), and every request after names it; a group host asked so says to name the group.
    #[test]
    fn a_group_named_by_address_is_asked_its_name_once_then_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = zmq::Context::new();
        let (endpoint, node) = fake_host(&ctx, &["ops"], 3);
        let mut app = app_with_saved(dir.path(), &endpoint, &[]);
        let mut printed = Vec::new();
        let address = endpoint.trim_start_matches("tcp://").to_owned();
        for text in ["one", "two"] {
            let mut out = crate::render::Output::new(Format::Json, &mut printed);
            app.send(&address, crate::command::json_string(text), &mut out)
                .expect("send by address");
        }
        drop(app);
        let named = node.join().expect("node");
        let named: Vec<Option<&str>> = named
            .iter()
            .map(|g| g.as_ref().map(GroupName::as_str))
            .collect();
        assert_eq!(named, [None, Some("ops"), Some("ops")]);

        let (endpoint, host) = fake_host(&ctx, &["ops", "dev"], 1);
        let mut app = app_with_saved(dir.path(), &endpoint, &[]);
        let mut out = crate::render::Output::new(Format::Json, &mut printed);
        let address = endpoint.trim_start_matches("tcp://").to_owned();
        let err = app
            .send(&address, crate::command::json_string("hi"), &mut out)
            .expect_err("a host needs the group named");
        assert_eq!(err.exit_code(), 1, "{err}");
        assert!(err.to_string().contains("group: required"), "{err}");
        drop(app);
        assert_eq!(host.join().expect("host"), [None]);
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
