//! One thread per WebSocket session owns that session's ZeroMQ sockets (a registry client
//! and a client per group it touched), as libzmq wants; the session's task hands it requests
//! through a bounded channel and awaits each reply. The session's live feed
//! (`common::live`) and inbox (`common::inbox`) are actors of their own; their events reach
//! the page through one bounded queue.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use agora_common::client::{ClientCurve, ClientError, ClientOptions, GroupClient, RegistryClient};
use agora_common::inbox::Inbox;
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_proto::id::MessageId;
use agora_proto::wire::{GroupName, HistoryQuery, UserName, MAX_PAGE_LIMIT};
use serde_json::json;

use crate::wire::{Reply, Request};

/// How sessions reach the federation: shared by every session.
#[derive(Clone)]
pub struct Federation {
    /// The one ZeroMQ context of the gateway (its I/O threads serve every session).
    pub ctx: zmq::Context,
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

    /// A registry client acting as `identity`.
    pub fn registry_client(&self, identity: &Identity) -> RegistryClient {
        RegistryClient::new(&self.ctx, &self.registry, self.options())
            .with_curve(self.curve(identity))
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

type Job = (Request, tokio::sync::oneshot::Sender<Reply>);

/// Pushed events a session holds before the feed waits for the page (the node then stops
/// pushing and the feed catches up from the log later): 256.
pub const EVENT_QUEUE: usize = 256;

/// A session's bridge thread; it ends when the session is dropped.
#[derive(Debug)]
pub struct Session {
    jobs: mpsc::SyncSender<Job>,
}

impl Session {
    /// Starts the thread; the events of the groups the page follows and of its inbox arrive
    /// on the returned receiver, as JSON text (docs/WEB.md "Events").
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(
        federation: &Federation,
        identity: &Identity,
    ) -> std::io::Result<(Session, tokio::sync::mpsc::Receiver<String>)> {
        let (jobs, incoming) = mpsc::sync_channel::<Job>(1);
        let (events, events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let mut bridge = Bridge {
            registry: federation.registry_client(identity),
            federation: federation.clone(),
            identity: identity.clone(),
            groups: HashMap::new(),
            feed: None,
            inbox: None,
            events,
        };
        std::thread::Builder::new()
            .name("web-session".into())
            .spawn(move || {
                while let Ok((request, reply)) = incoming.recv() {
                    let op = request.op();
                    let answer = bridge.handle(request).unwrap_or_else(|e| failure(op, &e));
                    let _ = reply.send(answer);
                }
            })?;
        Ok((Session { jobs }, events_rx))
    }

    /// Asks the thread, and waits for its reply.
    pub async fn call(&mut self, request: Request) -> Reply {
        let op = request.op();
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.jobs.try_send((request, reply)).is_err() {
            return Reply::error(Some(op), "internal", "the session's bridge is gone");
        }
        answer
            .await
            .unwrap_or_else(|_| Reply::error(Some(op), "internal", "the session's bridge is gone"))
    }
}

/// What a session's thread owns.
struct Bridge {
    federation: Federation,
    identity: Identity,
    registry: RegistryClient,
    groups: HashMap<GroupName, GroupClient>,
    feed: Option<Feed>,
    inbox: Option<Inbox>,
    events: tokio::sync::mpsc::Sender<String>,
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
                let client = self.group_client(&group)?;
                Ok(Reply::ok("join", json!({ "membership": client.join()? })))
            }
            Request::Leave { group } => {
                let client = self.group_client(&group)?;
                let membership = client.leave()?;
                Ok(Reply::ok("leave", json!({ "membership": membership })))
            }
            Request::Follow { group, after_seq } => self.follow(group, after_seq),
            Request::Unfollow { group } => {
                let entry = self.registry.lookup(&group)?;
                if let Some(feed) = &self.feed {
                    feed.remove(entry.endpoint.as_str());
                }
                Ok(Reply::ok("unfollow", json!({ "group": group })))
            }
            Request::Send { group, text, id } => {
                let body = text_body(&text)?;
                let client = self.group_client(&group)?;
                let ack = client.send_with_id(body, id.unwrap_or_else(MessageId::new_v7))?;
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
        let client = self.group_client(&group)?;
        let messages = match (after_seq, before_seq) {
            (Some(after), _) => {
                client
                    .get_messages(HistoryQuery::AfterSeq(after), Some(limit))?
                    .messages
            }
            // Seqs are dense from 1: the page before N starts after N - 1 - limit.
            (None, Some(before)) => {
                let from = before.saturating_sub(u64::from(limit) + 1);
                let mut page = client
                    .get_messages(HistoryQuery::AfterSeq(from), Some(limit))?
                    .messages;
                page.retain(|m| m.seq < before);
                page
            }
            (None, None) => {
                client
                    .get_messages(HistoryQuery::Latest(limit), None)?
                    .messages
            }
        };
        Ok(Reply::ok(
            "history",
            json!({"group": group, "messages": messages}),
        ))
    }

    /// `follow`: adds the group to the session's feed (started on the first one).
    fn follow(&mut self, group: GroupName, after_seq: Option<u64>) -> Result<Reply, ClientError> {
        let entry = self.registry.lookup(&group)?;
        if self.feed.is_none() {
            let events = self.events.clone();
            let started = Feed::with_handler(
                &self.federation.ctx,
                self.identity.user.clone(),
                Some(self.identity.keypair.clone()),
                FeedOptions::default(),
                // On the feed's own thread: a full queue makes it wait, as the live stream
                // wants.
                move |event| events.blocking_send(event_json(event)).is_ok(),
            )
            .map_err(ClientError::Read)?;
            self.feed = Some(started);
        }
        if let Some(feed) = &self.feed {
            feed.add(GroupSpec {
                label: group.as_str().to_owned(),
                endpoint: entry.endpoint.as_str().to_owned(),
                group: Some(group.clone()),
                after_seq,
                server_key: entry.public_key,
            });
        }
        Ok(Reply::ok("follow", json!({ "group": group })))
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
                &self.federation.ctx,
                &self.federation.registry,
                self.federation.curve(&self.identity),
                every,
                move |dm| {
                    let _ = events.blocking_send(json!({"event": "dm", "dm": dm}).to_string());
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

    /// The client of `group`'s node, looked up in the registry the first time.
    fn group_client(&mut self, group: &GroupName) -> Result<&mut GroupClient, ClientError> {
        if !self.groups.contains_key(group) {
            let entry = self.registry.lookup(group)?;
            let mut client = GroupClient::new(
                &self.federation.ctx,
                entry.endpoint.as_str(),
                self.identity.user.clone(),
                Some(group.clone()),
                self.federation.options(),
            );
            if let Some(key) = entry.public_key {
                client = client.with_curve(ClientCurve {
                    keypair: self.identity.keypair.clone(),
                    server_key: key,
                });
            }
            self.groups.insert(group.clone(), client);
        }
        self.groups.get_mut(group).ok_or_else(|| {
            ClientError::BadReply(agora_proto::codec::CodecError::Field("no client".into()))
        })
    }
}

/// A feed event as the page receives it.
fn event_json(event: FeedEvent) -> String {
    let value = match event {
        FeedEvent::Entry {
            group, entry, live, ..
        } => json!({"event": "entry", "group": group, "entry": entry, "live": live}),
        FeedEvent::Subscribed {
            group, last_seq, ..
        } => json!({"event": "subscribed", "group": group, "last_seq": last_seq}),
        FeedEvent::Error {
            label,
            error,
            fatal,
        } => {
            json!({"event": "error", "group": label, "message": error.to_string(), "fatal": fatal})
        }
    };
    value.to_string()
}
