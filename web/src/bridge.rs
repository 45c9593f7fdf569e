//! One thread per WebSocket session owns that session's ZeroMQ sockets (a registry client
//! and a client per group it touched), as libzmq wants; the session's task hands it requests
//! through a bounded channel and awaits each reply.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use agora_common::client::{ClientCurve, ClientError, ClientOptions, GroupClient, RegistryClient};
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_proto::id::MessageId;
use agora_proto::wire::{GroupName, HistoryQuery, UserName};
use serde_json::json;

use crate::wire::{Reply, Request};

/// How sessions reach the federation, as whom.
#[derive(Debug, Clone)]
pub struct Federation {
    /// The registry's endpoint.
    pub registry: String,
    /// The signed-in person's key pair and the registry's key (`None`: `--insecure`).
    pub curve: Option<ClientCurve>,
    /// The signed-in person's user name.
    pub user: UserName,
    /// How long one call to a server may take (over its attempts).
    pub timeout: Duration,
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
    /// Starts the thread; the live events of the groups the page follows arrive on the
    /// returned receiver, as JSON text (`{"event": "entry", "group", "entry", "live"}`,
    /// `{"event": "subscribed", "group", "last_seq"}` or `{"event": "error", "group",
    /// "message", "fatal"}`).
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(
        federation: &Federation,
    ) -> std::io::Result<(Session, tokio::sync::mpsc::Receiver<String>)> {
        let (jobs, incoming) = mpsc::sync_channel::<Job>(1);
        let (events, events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let federation = federation.clone();
        std::thread::Builder::new()
            .name("web-session".into())
            .spawn(move || serve(&federation, &incoming, &events))?;
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

fn serve(
    federation: &Federation,
    incoming: &mpsc::Receiver<Job>,
    events: &tokio::sync::mpsc::Sender<String>,
) {
    let ctx = zmq::Context::new();
    let options = ClientOptions {
        timeout: federation.timeout,
        ..ClientOptions::default()
    };
    let mut registry = RegistryClient::new(&ctx, &federation.registry, options);
    if let Some(curve) = &federation.curve {
        registry = registry.with_curve(curve.clone());
    }
    let mut groups: HashMap<GroupName, GroupClient> = HashMap::new();
    let mut feed: Option<Feed> = None;
    while let Ok((request, reply)) = incoming.recv() {
        let op = request.op();
        let answer = match request {
            Request::Follow { group, after_seq } => follow(
                federation,
                &ctx,
                &mut registry,
                &mut feed,
                events,
                group,
                after_seq,
            ),
            request => handle(
                federation,
                &ctx,
                options,
                &mut registry,
                &mut groups,
                request,
            ),
        }
        .unwrap_or_else(|e| failure(op, &e));
        let _ = reply.send(answer);
    }
}

/// `follow`: adds the group to the session's feed (started on the first one).
fn follow(
    federation: &Federation,
    ctx: &zmq::Context,
    registry: &mut RegistryClient,
    feed: &mut Option<Feed>,
    events: &tokio::sync::mpsc::Sender<String>,
    group: GroupName,
    after_seq: Option<u64>,
) -> Result<Reply, ClientError> {
    let entry = registry.lookup(&group)?;
    if feed.is_none() {
        let events = events.clone();
        let started = Feed::with_handler(
            ctx,
            federation.user.clone(),
            federation.curve.as_ref().map(|c| c.keypair.clone()),
            FeedOptions::default(),
            // On the feed's own thread: a full queue makes it wait, as the live stream wants.
            move |event| events.blocking_send(event_json(event)).is_ok(),
        )
        .map_err(ClientError::Read)?;
        *feed = Some(started);
    }
    if let Some(feed) = feed {
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

fn failure(op: &str, e: &ClientError) -> Reply {
    match e {
        ClientError::Server(w) => Reply::error(Some(op), w.code.as_str(), &w.message),
        ClientError::Timeout { .. } => Reply::error(Some(op), "timeout", &e.to_string()),
        _ => Reply::error(Some(op), "internal", &e.to_string()),
    }
}

fn handle(
    federation: &Federation,
    ctx: &zmq::Context,
    options: ClientOptions,
    registry: &mut RegistryClient,
    groups: &mut HashMap<GroupName, GroupClient>,
    request: Request,
) -> Result<Reply, ClientError> {
    match request {
        Request::Groups => {
            let list = registry.list()?;
            Ok(Reply::ok("groups", json!({ "groups": list })))
        }
        Request::History {
            group,
            after_seq,
            limit,
        } => {
            let client = group_client(federation, ctx, options, registry, groups, &group)?;
            let page = client.get_messages(HistoryQuery::AfterSeq(after_seq), limit)?;
            Ok(Reply::ok(
                "history",
                json!({"group": group, "messages": page.messages}),
            ))
        }
        Request::Join { group } => {
            let client = group_client(federation, ctx, options, registry, groups, &group)?;
            Ok(Reply::ok("join", json!({ "membership": client.join()? })))
        }
        Request::Leave { group } => {
            let client = group_client(federation, ctx, options, registry, groups, &group)?;
            Ok(Reply::ok("leave", json!({ "membership": client.leave()? })))
        }
        // Handled by `follow`, which holds the session's feed.
        Request::Follow { .. } => Ok(Reply::error(Some("follow"), "internal", "not here")),
        Request::Send { group, text, id } => {
            let client = group_client(federation, ctx, options, registry, groups, &group)?;
            let body =
                serde_json::value::RawValue::from_string(json!(text).to_string()).map_err(|e| {
                    ClientError::BadReply(agora_proto::codec::CodecError::Field(e.to_string()))
                })?;
            let ack = client.send_with_id(body, id.unwrap_or_else(MessageId::new_v7))?;
            Ok(Reply::ok("send", json!({"group": group, "ack": ack})))
        }
    }
}

/// The client of `group`'s node, looked up in the registry the first time.
fn group_client<'a>(
    federation: &Federation,
    ctx: &zmq::Context,
    options: ClientOptions,
    registry: &mut RegistryClient,
    groups: &'a mut HashMap<GroupName, GroupClient>,
    group: &GroupName,
) -> Result<&'a mut GroupClient, ClientError> {
    if !groups.contains_key(group) {
        let entry = registry.lookup(group)?;
        let mut client = GroupClient::new(
            ctx,
            entry.endpoint.as_str(),
            federation.user.clone(),
            Some(group.clone()),
            options,
        );
        if let (Some(curve), Some(key)) = (&federation.curve, entry.public_key) {
            client = client.with_curve(ClientCurve {
                keypair: curve.keypair.clone(),
                server_key: key,
            });
        }
        groups.insert(group.clone(), client);
    }
    groups.get_mut(group).ok_or_else(|| {
        ClientError::BadReply(agora_proto::codec::CodecError::Field("no client".into()))
    })
}
