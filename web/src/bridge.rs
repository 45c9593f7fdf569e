//! One thread per WebSocket session owns that session's ZeroMQ sockets (a registry client
//! and one client per group host it touched, in a [`HostPool`], whatever the number of that
//! host's groups), as libzmq wants; the session's tasks hand it requests
//! through a bounded channel and await each reply. The session's inbox (`common::inbox`) is
//! an actor of its own; live group entries come from the shared [`crate::hub`].
//!
//! ZeroMQ contexts come from a [`ContextPool`]: libzmq caps one context at 1,023 sockets
//! (`ZMQ_MAX_SOCKETS`), so every [`SESSIONS_PER_CONTEXT`] sessions share one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_common::client::{
    ClientCurve, ClientError, ClientOptions, GroupView, HostPool, RegistryClient,
};
use agora_common::inbox::Inbox;
use agora_proto::id::MessageId;
use agora_proto::wire::{GroupEntry, GroupName, HistoryQuery, UserName, MAX_PAGE_LIMIT};
use serde_json::json;

use crate::wire::{Reply, Request};

/// Sessions (or feeds, or transfers) that share one ZeroMQ context: 150. Each holds a few
/// sockets (a registry client, a group client or two, the inbox's DEALER and pipe), well
/// under libzmq's 1,023 per context.
pub const SESSIONS_PER_CONTEXT: usize = 150;

/// ZeroMQ contexts handed out [`SESSIONS_PER_CONTEXT`] users at a time; each context has
/// one I/O thread.
#[derive(Default)]
pub struct ContextPool {
    contexts: Mutex<Vec<(zmq::Context, Arc<()>)>>,
}

impl std::fmt::Debug for ContextPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.contexts.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("ContextPool").field("contexts", &n).finish()
    }
}

/// A context from the pool; its slot is free again when this is dropped.
#[derive(Clone)]
pub struct PooledContext {
    ctx: zmq::Context,
    _slot: Arc<()>,
}

impl std::fmt::Debug for PooledContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledContext").finish_non_exhaustive()
    }
}

impl PooledContext {
    /// The context.
    pub fn context(&self) -> &zmq::Context {
        &self.ctx
    }
}

impl ContextPool {
    /// The least used context with a free slot, or a new one.
    pub fn take(&self) -> PooledContext {
        let Ok(mut contexts) = self.contexts.lock() else {
            return PooledContext {
                ctx: zmq::Context::new(),
                _slot: Arc::new(()),
            };
        };
        let free = contexts
            .iter()
            .filter(|(_, slot)| Arc::strong_count(slot) <= SESSIONS_PER_CONTEXT)
            .min_by_key(|(_, slot)| Arc::strong_count(slot))
            .map(|(ctx, slot)| (ctx.clone(), Arc::clone(slot)));
        let (ctx, slot) = free.unwrap_or_else(|| {
            let made = (zmq::Context::new(), Arc::new(()));
            contexts.push((made.0.clone(), Arc::clone(&made.1)));
            made
        });
        PooledContext { ctx, _slot: slot }
    }
}

/// How sessions reach the federation: shared by every session.
#[derive(Clone)]
pub struct Federation {
    /// The gateway's ZeroMQ contexts.
    pub contexts: Arc<ContextPool>,
    /// The registry's endpoint.
    pub registry: String,
    /// The registry's CURVE public key.
    pub registry_key: agora_common::keys::PublicKey,
    /// How long one call to a server may take (over its attempts).
    pub timeout: Duration,
    /// Whether people sign in with a password (hosted mode): the page then offers sign-out.
    pub hosted: bool,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("registry", &self.registry)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// Client options for one call: `timeout` over the default attempts.
    pub fn options(&self) -> ClientOptions {
        ClientOptions {
            timeout: self.timeout,
            ..ClientOptions::default()
        }
    }

    /// A registry client acting as `identity`, on `ctx`.
    pub fn registry_client(&self, ctx: &zmq::Context, identity: &Identity) -> RegistryClient {
        RegistryClient::new(ctx, &self.registry, self.options()).with_curve(self.curve(identity))
    }

    /// `identity`'s key pair towards the registry.
    pub fn curve(&self, identity: &Identity) -> ClientCurve {
        ClientCurve {
            keypair: identity.keypair.clone(),
            server_key: self.registry_key,
        }
    }
}

/// Who a session acts as: a user name and its key pair.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user name.
    pub user: UserName,
    /// Its CURVE key pair.
    pub keypair: agora_common::keys::Keypair,
}

/// What a session's thread is asked to do.
enum Job {
    /// A request of the page.
    Request(Request, tokio::sync::oneshot::Sender<Reply>),
    /// A group's registry entry (for following it).
    Lookup(
        GroupName,
        tokio::sync::oneshot::Sender<Result<GroupEntry, Reply>>,
    ),
}

/// Events a session holds for a page that reads slowly (its inbox's wait, its groups' lag
/// and catch up from the log): 256.
pub const EVENT_QUEUE: usize = 256;

/// The group hosts one session keeps a client for: 64 (the least recently used is closed
/// past it).
pub const MAX_SESSION_HOSTS: usize = 64;

/// The groups whose host one session remembers: 1,024 (a group forgotten is looked up
/// again).
pub const MAX_GROUP_HOSTS: usize = 1024;

/// Requests a session's thread holds: 8.
const JOB_QUEUE: usize = 8;

/// A session's bridge thread; it ends when every handle to it is dropped.
#[derive(Debug, Clone)]
pub struct Session {
    jobs: tokio::sync::mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Request(r, _) => write!(f, "Request({})", r.op()),
            Job::Lookup(g, _) => write!(f, "Lookup({g})"),
        }
    }
}

impl Session {
    /// Starts the thread; the events of its inbox arrive on `events`, as JSON text
    /// (docs/WEB.md §4).
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(
        federation: &Federation,
        identity: &Identity,
        events: tokio::sync::mpsc::Sender<axum::extract::ws::Utf8Bytes>,
    ) -> std::io::Result<Session> {
        let (jobs, mut incoming) = tokio::sync::mpsc::channel::<Job>(JOB_QUEUE);
        let ctx = federation.contexts.take();
        let mut bridge = Bridge {
            registry: federation.registry_client(ctx.context(), identity),
            hosts: HostPool::new(
                ctx.context(),
                identity.user.clone(),
                Some(identity.keypair.clone()),
                federation.options(),
            )
            .with_capacity(MAX_SESSION_HOSTS),
            ctx,
            federation: federation.clone(),
            identity: identity.clone(),
            group_hosts: HashMap::new(),
            inbox: None,
            events,
        };
        std::thread::Builder::new()
            .name("web-session".into())
            .spawn(move || {
                while let Some(job) = incoming.blocking_recv() {
                    match job {
                        Job::Request(request, reply) => {
                            let op = request.op();
                            let answer = bridge.handle(request).unwrap_or_else(|e| failure(op, &e));
                            let _ = reply.send(answer);
                        }
                        Job::Lookup(group, reply) => {
                            let entry = bridge
                                .registry
                                .lookup(&group)
                                .map_err(|e| failure("follow", &e));
                            let _ = reply.send(entry);
                        }
                    }
                }
            })?;
        Ok(Session { jobs })
    }

    /// Asks the thread, and waits for its reply.
    pub async fn call(&self, request: Request) -> Reply {
        let op = request.op();
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.jobs.send(Job::Request(request, reply)).await.is_err() {
            return Reply::error(Some(op), "internal", "the session's bridge is gone");
        }
        answer
            .await
            .unwrap_or_else(|_| Reply::error(Some(op), "internal", "the session's bridge is gone"))
    }

    /// `group`'s registry entry, or the error reply for `follow`.
    pub async fn lookup(&self, group: GroupName) -> Result<GroupEntry, Reply> {
        let gone = || Reply::error(Some("follow"), "internal", "the session's bridge is gone");
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.jobs.send(Job::Lookup(group, reply)).await.is_err() {
            return Err(gone());
        }
        answer.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// What a session's thread owns.
struct Bridge {
    ctx: PooledContext,
    federation: Federation,
    identity: Identity,
    registry: RegistryClient,
    /// One client per host.
    hosts: HostPool,
    /// Where each group touched is (its host's endpoint and key), from the registry; at
    /// most [`MAX_GROUP_HOSTS`].
    group_hosts: HashMap<GroupName, (String, Option<agora_common::keys::PublicKey>)>,
    inbox: Option<Inbox>,
    events: tokio::sync::mpsc::Sender<axum::extract::ws::Utf8Bytes>,
}

fn failure(op: &str, e: &ClientError) -> Reply {
    match e {
        ClientError::Server(w) => Reply::error(Some(op), w.code.as_str(), &w.message),
        ClientError::Timeout { .. } => Reply::error(Some(op), "timeout", &e.to_string()),
        _ => Reply::error(Some(op), "internal", &e.to_string()),
    }
}

/// A text as a JSON string body.
fn text_body(text: &str) -> Result<Box<serde_json::value::RawValue>, ClientError> {
    serde_json::value::RawValue::from_string(json!(text).to_string())
        .map_err(|e| ClientError::BadReply(agora_proto::codec::CodecError::Field(e.to_string())))
}

impl Bridge {
    fn handle(&mut self, request: Request) -> Result<Reply, ClientError> {
        match request {
            Request::Whoami => Ok(Reply::ok(
                "whoami",
                json!({
                    "user": self.identity.user,
                    "key": self.identity.keypair.public,
                    "hosted": self.federation.hosted,
                }),
            )),
            Request::Groups => {
                let list = self.registry.list()?;
                Ok(Reply::ok("groups", json!({ "groups": list })))
            }
            Request::Users => {
                let users = self.registry.users()?;
                Ok(Reply::ok("users", json!({ "users": users })))
            }
            Request::History {
                group,
                after_seq,
                before_seq,
                limit,
            } => self.history(group, after_seq, before_seq, limit),
            Request::Join { group } => {
                let membership = self.on_group(&group, |c| c.join())?;
                Ok(Reply::ok("join", json!({ "membership": membership })))
            }
            Request::Leave { group } => {
                let membership = self.on_group(&group, |c| c.leave())?;
                Ok(Reply::ok("leave", json!({ "membership": membership })))
            }
            // The session's task follows through the hub (`crate::hub`), not this thread.
            Request::Follow { .. } | Request::Unfollow { .. } => Ok(Reply::error(
                Some("follow"),
                "internal",
                "following is the session's, not the bridge's",
            )),
            Request::Send { group, text, id } => {
                let body = text_body(&text)?;
                // One id for every try: a retry at a node that took over is stored once.
                let id = id.unwrap_or_else(MessageId::new_v7);
                let ack = self.on_group(&group, |c| c.send_with_id(body.clone(), id))?;
                Ok(Reply::ok("send", json!({"group": group, "ack": ack})))
            }
            Request::Inbox => self.inbox(),
            Request::Dm { to, text, id } => {
                let body = text_body(&text)?;
                let ack = self
                    .registry
                    .send_dm(&to, body, id.unwrap_or_else(MessageId::new_v7))?;
                Ok(Reply::ok("dm", json!({"to": to, "ack": ack})))
            }
            Request::DmRead { up_to } => {
                let acked = self.registry.ack_dm(up_to)?;
                Ok(Reply::ok("dm_read", json!({ "acked": acked })))
            }
            Request::Block { name } => {
                let r = self.registry.block(&name)?;
                Ok(Reply::ok(
                    "block",
                    json!({"name": r.name, "changed": r.changed, "blocked": true}),
                ))
            }
            Request::Unblock { name } => {
                let r = self.registry.unblock(&name)?;
                Ok(Reply::ok(
                    "unblock",
                    json!({"name": r.name, "changed": r.changed, "blocked": false}),
                ))
            }
            Request::Blocked => {
                let blocked = self.registry.blocked()?;
                Ok(Reply::ok("blocked", json!({ "blocked": blocked })))
            }
        }
    }

    /// `history`: after `after_seq`, or the page before `before_seq`, or the newest.
    fn history(
        &mut self,
        group: GroupName,
        after_seq: Option<u64>,
        before_seq: Option<u64>,
        limit: Option<u32>,
    ) -> Result<Reply, ClientError> {
        let limit = limit.unwrap_or(100).clamp(1, MAX_PAGE_LIMIT);
        let messages = match (after_seq, before_seq) {
            (Some(after), _) => {
                self.on_group(&group, |c| {
                    c.get_messages(HistoryQuery::AfterSeq(after), Some(limit))
                })?
                .messages
            }
            // Seqs are dense from 1: the page before N starts after N - 1 - limit.
            (None, Some(before)) => {
                let from = before.saturating_sub(u64::from(limit) + 1);
                let mut page = self
                    .on_group(&group, |c| {
                        c.get_messages(HistoryQuery::AfterSeq(from), Some(limit))
                    })?
                    .messages;
                page.retain(|m| m.seq < before);
                page
            }
            (None, None) => {
                self.on_group(&group, |c| {
                    c.get_messages(HistoryQuery::Latest(limit), None)
                })?
                .messages
            }
        };
        Ok(Reply::ok(
            "history",
            json!({"group": group, "messages": messages}),
        ))
    }

    /// `inbox`: presence online and direct messages pushed from now on (once per session),
    /// and the mailbox as it stands.
    fn inbox(&mut self) -> Result<Reply, ClientError> {
        if self.inbox.is_none() {
            // The presence heartbeat: a third of the registry's session TTL (PROTOCOL §4.5).
            let ttl = self.registry.connect(agora_proto::wire::Presence::Online)?;
            let every = Duration::from_millis(ttl.ttl_ms / 3).max(Duration::from_millis(100));
            let events = self.events.clone();
            let started = Inbox::start(
                self.ctx.context(),
                &self.federation.registry,
                self.federation.curve(&self.identity),
                every,
                move |dm| {
                    let text = json!({"event": "dm", "dm": dm}).to_string();
                    let _ = events.blocking_send(text.into());
                    // Acked when the page shows it (`dm_read`), so a closed tab loses nothing.
                    false
                },
            )
            .map_err(ClientError::Read)?;
            self.inbox = Some(started);
        }
        let mailbox = self.registry.mailbox(0, Some(MAX_PAGE_LIMIT))?;
        Ok(Reply::ok(
            "inbox",
            json!({"messages": mailbox.messages, "more": mailbox.more}),
        ))
    }

    /// Runs `op` against `group`'s node: its first attempt alone, and if that goes unanswered
    /// or the node says it is stopping or serves no such group, the group is looked up again (a standby may have
    /// taken over, PROTOCOL §11.2) and `op` runs at the node the registry names, with every
    /// attempt. The node's client is its host's, shared by the host's groups.
    ///
    /// # Errors
    /// `op`'s, or the lookup's.
    fn on_group<T>(
        &mut self,
        group: &GroupName,
        mut op: impl FnMut(&mut GroupView<'_>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let options = self.federation.options();
        let (endpoint, key) = self.group_host(group)?;
        let host = self.hosts.host(&endpoint, key);
        host.set_options(options.one_attempt());
        let first = op(&mut host.group(group));
        host.set_options(options);
        match first {
            Err(ClientError::Timeout { .. }) => {}
            // Stopping, or no longer serving the group (it moved to another host, or was
            // deleted): ask the registry where it is now.
            Err(ClientError::Server(e))
                if matches!(
                    e.code,
                    agora_proto::wire::ErrorCode::ShuttingDown
                        | agora_proto::wire::ErrorCode::UnknownGroup
                ) => {}
            result => return result,
        }
        self.group_hosts.remove(group);
        let (endpoint, key) = self.group_host(group)?;
        op(&mut self.hosts.group(&endpoint, key, group))
    }

    /// Where `group`'s node is, looked up in the registry the first time.
    fn group_host(
        &mut self,
        group: &GroupName,
    ) -> Result<(String, Option<agora_common::keys::PublicKey>), ClientError> {
        if let Some(found) = self.group_hosts.get(group) {
            return Ok(found.clone());
        }
        let entry = self.registry.lookup(group)?;
        let found = (entry.endpoint.as_str().to_owned(), entry.public_key);
        if self.group_hosts.len() >= MAX_GROUP_HOSTS {
            // A cache: a group forgotten is looked up again.
            let forget = self.group_hosts.keys().next().cloned();
            if let Some(forget) = forget {
                self.group_hosts.remove(&forget);
            }
        }
        self.group_hosts.insert(group.clone(), found.clone());
        Ok(found)
    }
}
