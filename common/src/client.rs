//! Clients for the registry and group nodes.
//!
//! [`ReqClient`] is the zguide's "Lazy Pirate" (chapter 4): a REQ socket that waits a bounded
//! time for each reply, and on a timeout closes the socket, opens a new one and tries again,
//! because a REQ that missed its reply cannot send again. Every Agora request is safe to
//! repeat (registration and membership are idempotent, and [`GroupClient::send`] always
//! sends a client-chosen message id), so retrying cannot duplicate anything.
//!
//! [`RegistryClient`] and [`HostClient`] wrap it with one typed method per action; a
//! [`HostClient`] is one connection to a group host (or node of one) for all its groups, each
//! group's calls in its [`GroupView`], always naming the group (PROTOCOL §6). [`HostPool`]
//! keeps one per host, bounded; [`GroupClient`] is a host client with one group, owned.
//! The typed views ([`HostView`], [`GroupView`]) work over any [`Exchange`]: a
//! [`ReqClient`], or a live feed's connection to the host ([`crate::live::FeedLink`]), which
//! the prompt uses to command the groups it follows over that one connection.

use std::time::Duration;

use serde_json::value::RawValue;

use agora_proto::action::{call, Call};
use agora_proto::codec::{
    decode_reply, decode_reply_data, encode_call, encode_call_data, CodecError, Frames,
};
use agora_proto::id::MessageId;
use agora_proto::wire::{
    Endpoint, GetMessagesRequest, GroupEntry, GroupName, HistoryQuery, InfoReply, InfoRequest,
    KeyTargetRequest, ListRequest, LookupRequest, MemberTargetRequest, MembersReply,
    MembersRequest, MembershipReply, MembershipRequest, MessagesPage, RegisterReply,
    RegisterRequest, SendAck, SendRequest, UnregisterRequest, UserName, WireError,
    REQUEST_OVERHEAD_BYTES,
};

/// Largest reply a client accepts, in bytes (64 MiB): far above the largest page a server
/// sends, and a bound on what a broken or hostile server can make a client buffer.
pub const MAX_REPLY_BYTES: i64 = 64 << 20;

/// Client failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No reply within the timeout, after every attempt.
    #[error("no reply from {endpoint} within {}", crate::human_duration(*.waited))]
    Timeout {
        /// Where the request went.
        endpoint: String,
        /// The time allowed (the configured timeout, [`ClientOptions::timeout`]), shown
        /// as people write it ([`crate::human_duration`]).
        waited: Duration,
    },
    /// The server answered with an error.
    #[error(transparent)]
    Server(#[from] WireError),
    /// The reply was not a well-formed reply of the expected type.
    #[error("bad reply: {0}")]
    BadReply(#[from] CodecError),
    /// Reading what was to be sent failed (an upload's source file).
    #[error("reading what to send: {0}")]
    Read(#[source] std::io::Error),
    /// libzmq failed (bad endpoint syntax, context terminated).
    #[error("zmq: {0}")]
    Zmq(#[from] zmq::Error),
}

/// How a client waits and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// The total time one call may take, over all attempts (default 5 s).
    pub timeout: Duration,
    /// How many attempts share that time (default 3, at least 1).
    pub attempts: u32,
}

impl ClientOptions {
    /// One attempt, with one attempt's share of the timeout: for a caller that asks where
    /// the server is now after an unanswered attempt, before the next (failover, PROTOCOL
    /// §11.2), rather than after all of them.
    pub fn one_attempt(self) -> ClientOptions {
        let attempts = self.attempts.max(1);
        ClientOptions {
            timeout: self.timeout / attempts,
            attempts: 1,
        }
    }

    /// The attempts left after [`ClientOptions::one_attempt`], with their share of the
    /// timeout; `None` when it was the only one.
    pub fn rest(self) -> Option<ClientOptions> {
        let attempts = self.attempts.max(1);
        (attempts > 1).then(|| ClientOptions {
            timeout: self.timeout - self.timeout / attempts,
            attempts: attempts - 1,
        })
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(5),
            attempts: 3,
        }
    }
}

/// A client's CURVE settings (RFC 26): its own key pair and the server's public key.
#[derive(Debug, Clone)]
pub struct ClientCurve {
    /// The client's key pair; the server knows the client by its public key.
    pub keypair: crate::keys::Keypair,
    /// The server's public key. With a wrong one, the handshake fails and no reply comes.
    pub server_key: crate::keys::PublicKey,
}

/// A Lazy Pirate request/reply client for one endpoint.
pub struct ReqClient {
    ctx: zmq::Context,
    endpoint: String,
    options: ClientOptions,
    curve: Option<ClientCurve>,
    socket: Option<zmq::Socket>,
}

impl std::fmt::Debug for ReqClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReqClient")
            .field("endpoint", &self.endpoint)
            .field("options", &self.options)
            .field("connected", &self.socket.is_some())
            .finish()
    }
}

impl ReqClient {
    /// A client for `endpoint` (any ZeroMQ endpoint string). Connects lazily.
    pub fn new(ctx: &zmq::Context, endpoint: impl Into<String>, options: ClientOptions) -> Self {
        ReqClient {
            ctx: ctx.clone(),
            endpoint: endpoint.into(),
            options,
            curve: None,
            socket: None,
        }
    }

    /// Talks CURVE to the server from now on (the next socket this client opens).
    pub fn with_curve(mut self, curve: ClientCurve) -> Self {
        self.curve = Some(curve);
        self.socket = None;
        self
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Waits and retries as `options` says from the next call on (the open socket is kept).
    pub fn set_options(&mut self, options: ClientOptions) {
        self.options = options;
        if let Some(socket) = &self.socket {
            let per_attempt = options.timeout / options.attempts.max(1);
            let _ = socket.set_rcvtimeo(i32::try_from(per_attempt.as_millis()).unwrap_or(i32::MAX));
        }
    }

    fn socket(&mut self) -> Result<&zmq::Socket, ClientError> {
        if self.socket.is_none() {
            let s = self.ctx.socket(zmq::REQ)?;
            s.set_linger(0)?;
            s.set_maxmsgsize(MAX_REPLY_BYTES)?;
            // Each attempt waits in the receive itself (one call, no separate poll).
            let per_attempt = self.options.timeout / self.options.attempts.max(1);
            s.set_rcvtimeo(i32::try_from(per_attempt.as_millis()).unwrap_or(i32::MAX))?;
            if let Some(curve) = &self.curve {
                s.set_curve_serverkey(curve.server_key.as_bytes())?;
                s.set_curve_publickey(curve.keypair.public.as_bytes())?;
                s.set_curve_secretkey(curve.keypair.secret_bytes())?;
            }
            s.connect(&self.endpoint)?;
            self.socket = Some(s);
        }
        match &self.socket {
            Some(s) => Ok(s),
            None => unreachable!("socket was just set"),
        }
    }

    /// Sends `frames` and returns the reply's frames.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when no attempt got a reply; [`ClientError::Zmq`].
    pub fn request_frames(&mut self, frames: &Frames) -> Result<Frames, ClientError> {
        let attempts = self.options.attempts.max(1);
        for attempt in 1..=attempts {
            let socket = self.socket()?;
            socket.send_multipart(frames.iter(), 0)?;
            match socket.recv_multipart(0) {
                Ok(reply) => return Ok(reply),
                Err(zmq::Error::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::debug!(endpoint = %self.endpoint, attempt, "no reply, reconnecting");
            // Lazy Pirate: a REQ that lost its reply is stuck; close it and start afresh.
            self.socket = None;
        }
        Err(ClientError::Timeout {
            endpoint: self.endpoint.clone(),
            // The timeout as configured (`2s`), not the time measured (`2.002584094s`).
            waited: self.options.timeout,
        })
    }

    /// Sends action `C`'s request and decodes the reply as that action's reply type:
    /// `call::<call::Info>(&InfoRequest { .. })` returns an [`InfoReply`].
    ///
    /// # Errors
    /// [`ClientError::Server`] for an error reply, [`ClientError::BadReply`] for an
    /// undecodable one, and those of [`ReqClient::request_frames`].
    pub fn call<C: Call>(&mut self, request: &C::Request) -> Result<C::Reply, ClientError> {
        (self as &mut dyn Exchange).call::<C>(request)
    }

    /// As [`ReqClient::call`], for an action with data frames: `data` goes after the
    /// request's body (`upload_chunk`), and the reply's data frame, if any, comes back with
    /// its fields (`download`).
    ///
    /// # Errors
    /// As [`ReqClient::call`].
    pub fn call_data<C: Call>(
        &mut self,
        request: &C::Request,
        data: Option<Vec<u8>>,
    ) -> Result<(C::Reply, Option<Vec<u8>>), ClientError> {
        (self as &mut dyn Exchange).call_data::<C>(request, data)
    }
}

/// How a request's frames reach a server and the reply's come back: a [`ReqClient`]'s own
/// REQ socket, or the connection a [`crate::live::Feed`] holds to a host
/// ([`crate::live::FeedLink`], the prompt's: one connection per host for following and
/// commanding). The typed views ([`HostView`], [`GroupView`]) work over either.
pub trait Exchange: std::fmt::Debug {
    /// The server's endpoint, as errors name it.
    fn endpoint(&self) -> &str;

    /// Sends `frames` (signature, body, and for `upload_chunk` the data frame) and returns
    /// the reply's (signature, body, and for `download` the data frame).
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when no reply came in time (after every attempt);
    /// [`ClientError::Zmq`].
    fn request_frames(&mut self, frames: &Frames) -> Result<Frames, ClientError>;
}

impl Exchange for ReqClient {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn request_frames(&mut self, frames: &Frames) -> Result<Frames, ClientError> {
        ReqClient::request_frames(self, frames)
    }
}

impl dyn Exchange + '_ {
    /// Sends action `C`'s request and decodes the reply as that action's reply type.
    ///
    /// # Errors
    /// [`ClientError::Server`] for an error reply, [`ClientError::BadReply`] for an
    /// undecodable one, and those of [`Exchange::request_frames`].
    pub fn call<C: Call>(&mut self, request: &C::Request) -> Result<C::Reply, ClientError> {
        let reply = self.request_frames(&encode_call::<C>(request))?;
        Ok(decode_reply::<C::Reply>(&reply)??)
    }

    /// As `call`, for an action with data frames: `data` goes after the request's body
    /// (`upload_chunk`), and the reply's data frame, if any, comes back with its fields
    /// (`download`).
    ///
    /// # Errors
    /// As `call`.
    pub fn call_data<C: Call>(
        &mut self,
        request: &C::Request,
        data: Option<Vec<u8>>,
    ) -> Result<(C::Reply, Option<Vec<u8>>), ClientError> {
        let frames = match data {
            Some(data) => encode_call_data::<C>(request, data),
            None => encode_call::<C>(request),
        };
        let reply = self.request_frames(&frames)?;
        if reply.len() == 3 {
            let (fields, data) = decode_reply_data::<C::Reply>(&reply)??;
            Ok((fields, Some(data)))
        } else {
            Ok((decode_reply::<C::Reply>(&reply)??, None))
        }
    }
}

/// The endpoints of a registry list: `tcp://A:P,tcp://B:P` (commas, spaces around them
/// ignored), as `--registry` takes it. Several registries over one PostgreSQL database are
/// one registry with several endpoints.
pub fn registry_endpoints(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A typed client for the registry, at one endpoint or a list of them
/// ([`registry_endpoints`]): a call that times out at one endpoint is made again at the
/// next, which is used from then on (failover; calls are safe to repeat: registrations,
/// lookups and reads are idempotent, and DMs carry their id).
pub struct RegistryClient {
    req: ReqClient,
    ctx: zmq::Context,
    endpoints: Vec<String>,
    current: usize,
    options: ClientOptions,
    curve: Option<ClientCurve>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("endpoints", &self.endpoints)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client for the registry at `endpoint`, or at any of a comma-separated list of
    /// endpoints, tried in order.
    pub fn new(ctx: &zmq::Context, endpoint: &str, options: ClientOptions) -> Self {
        let mut endpoints = registry_endpoints(endpoint);
        if endpoints.is_empty() {
            endpoints.push(endpoint.to_owned());
        }
        RegistryClient {
            req: ReqClient::new(ctx, &endpoints[0], options),
            ctx: ctx.clone(),
            endpoints,
            current: 0,
            options,
            curve: None,
        }
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &str {
        self.req.endpoint()
    }

    /// Talks CURVE to the registry (see [`ReqClient::with_curve`]); every endpoint of the
    /// list has the same key.
    pub fn with_curve(self, curve: ClientCurve) -> Self {
        RegistryClient {
            req: self.req.with_curve(curve.clone()),
            curve: Some(curve),
            ..self
        }
    }

    /// Calls the registry; on a timeout, the next endpoint of the list, until each was
    /// tried once.
    fn call<C: Call>(&mut self, request: &C::Request) -> Result<C::Reply, ClientError> {
        let mut left = self.endpoints.len();
        loop {
            match self.req.call::<C>(request) {
                Err(ClientError::Timeout { .. }) if left > 1 => {
                    left -= 1;
                    self.current = (self.current + 1) % self.endpoints.len();
                    let endpoint = &self.endpoints[self.current];
                    tracing::warn!(from = %self.req.endpoint(), to = %endpoint,
                        "the registry did not answer; trying the next one");
                    let req = ReqClient::new(&self.ctx, endpoint, self.options);
                    self.req = match &self.curve {
                        Some(curve) => req.with_curve(curve.clone()),
                        None => req,
                    };
                }
                result => return result,
            }
        }
    }

    /// Registers or refreshes a group (the heartbeat), with the node's public key.
    ///
    /// # Errors
    /// [`ClientError::Server`] with `name_taken` when another live endpoint holds the name;
    /// see [`ReqClient::call`].
    pub fn register(
        &mut self,
        name: &GroupName,
        endpoint: &Endpoint,
        members: u64,
        public_key: Option<crate::keys::PublicKey>,
    ) -> Result<RegisterReply, ClientError> {
        self.call::<call::Register>(&RegisterRequest {
            name: name.clone(),
            endpoint: endpoint.clone(),
            members,
            public_key,
        })
    }

    /// `register_groups` (PROTOCOL §4.1.1): a group host registers or refreshes up to
    /// [`agora_proto::wire::MAX_REGISTER_GROUPS`] groups at once; each refused one comes
    /// back in the reply's `refused`, naming its group.
    ///
    /// # Errors
    /// [`ClientError::Server`] for the whole request (`invalid_field`, `internal`, or
    /// `unknown_action` from a registry older than §4.1.1); see [`ReqClient::call`].
    pub fn register_groups(
        &mut self,
        request: &agora_proto::wire::RegisterGroupsRequest,
    ) -> Result<agora_proto::wire::RegisterGroupsReply, ClientError> {
        self.call::<call::RegisterGroups>(request)
    }

    /// `heartbeat_host` (PROTOCOL §4.1.1): one refresh for every group the host at
    /// `endpoint` registered with [`RegistryClient::register_groups`]; `groups` is how many
    /// the host believes the registry holds, and the reply's `known` how many it does.
    ///
    /// # Errors
    /// As [`RegistryClient::register_groups`].
    pub fn heartbeat_host(
        &mut self,
        endpoint: &Endpoint,
        public_key: Option<crate::keys::PublicKey>,
        groups: u64,
    ) -> Result<agora_proto::wire::HeartbeatHostReply, ClientError> {
        self.call::<call::HeartbeatHost>(&agora_proto::wire::HeartbeatHostRequest {
            endpoint: endpoint.clone(),
            public_key,
            groups,
        })
    }

    /// Removes a group registered from `endpoint`.
    ///
    /// # Errors
    /// `unknown_group` if not registered, `name_taken` if held by another endpoint; see
    /// [`ReqClient::call`].
    pub fn unregister(&mut self, name: &GroupName, endpoint: &Endpoint) -> Result<(), ClientError> {
        self.call::<call::Unregister>(&UnregisterRequest {
            name: name.clone(),
            endpoint: endpoint.clone(),
        })
        .map(|_| ())
    }

    /// Every live group, sorted by name.
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn list(&mut self) -> Result<Vec<GroupEntry>, ClientError> {
        Ok(self.call::<call::List>(&ListRequest {})?.groups)
    }

    /// Binds the user name `name` to this client's key (an account).
    ///
    /// # Errors
    /// `name_taken`, `forbidden` (no CURVE); see [`ReqClient::call`].
    pub fn user_register(
        &mut self,
        name: &UserName,
    ) -> Result<agora_proto::wire::UserReply, ClientError> {
        self.call::<call::UserRegister>(&agora_proto::wire::UserNameRequest { name: name.clone() })
    }

    /// Removes this client's account `name`; `confirm` must be true.
    ///
    /// # Errors
    /// `invalid_field` (not confirmed), `unknown_user`, `forbidden`; see [`ReqClient::call`].
    pub fn user_unregister(
        &mut self,
        name: &UserName,
        confirm: bool,
    ) -> Result<agora_proto::wire::UserReply, ClientError> {
        self.call::<call::UserUnregister>(&agora_proto::wire::UserUnregisterRequest {
            name: name.clone(),
            confirm,
        })
    }

    /// Starts or renews this client's session (`status` online or away): the presence
    /// heartbeat, to repeat within the returned TTL.
    ///
    /// # Errors
    /// `unknown_user` (no account for this key), `forbidden`; see [`ReqClient::call`].
    pub fn connect(
        &mut self,
        status: agora_proto::wire::Presence,
    ) -> Result<agora_proto::wire::ConnectReply, ClientError> {
        self.call::<call::Connect>(&agora_proto::wire::ConnectRequest {
            status: Some(status),
            push: false,
        })
    }

    /// Ends this client's session.
    ///
    /// # Errors
    /// `unknown_user`, `forbidden`; see [`ReqClient::call`].
    pub fn disconnect(&mut self) -> Result<agora_proto::wire::UserReply, ClientError> {
        self.call::<call::Disconnect>(&ListRequest {})
    }

    /// Sends a direct message to `to` (a retry with the same `id` is stored once).
    ///
    /// # Errors
    /// `unknown_user`, `limit_reached` (mailbox full; both dead-lettered), `too_large`; see
    /// [`ReqClient::call`].
    pub fn send_dm(
        &mut self,
        to: &UserName,
        body: Box<serde_json::value::RawValue>,
        id: MessageId,
    ) -> Result<agora_proto::wire::DmAck, ClientError> {
        self.call::<call::SendDm>(&agora_proto::wire::SendDmRequest {
            to: to.clone(),
            body,
            id: Some(id),
        })
    }

    /// One direct message to several users, a copy in each mailbox (PROTOCOL §4.6); the
    /// same `id` again stores no copy twice.
    ///
    /// # Errors
    /// `invalid_field` (no recipient, or over 1,000), `too_large`, `id_conflict`; see
    /// [`ReqClient::call`]. Recipients that do not exist or whose mailbox is full are in the
    /// reply's `undelivered` (and the sender's dead letters), not errors.
    pub fn multicast(
        &mut self,
        to: Vec<UserName>,
        body: Box<serde_json::value::RawValue>,
        id: MessageId,
    ) -> Result<agora_proto::wire::MulticastReply, ClientError> {
        self.call::<call::Multicast>(&agora_proto::wire::MulticastRequest {
            to,
            body,
            id: Some(id),
        })
    }

    /// One direct message to every account but the sender's (the operator and admins
    /// only); the same `id` again stores no copy twice.
    ///
    /// # Errors
    /// `forbidden`, `too_large`, `id_conflict`; see [`ReqClient::call`].
    pub fn broadcast(
        &mut self,
        body: Box<serde_json::value::RawValue>,
        id: MessageId,
    ) -> Result<agora_proto::wire::MulticastReply, ClientError> {
        self.call::<call::Broadcast>(&agora_proto::wire::BroadcastRequest { body, id: Some(id) })
    }

    /// This client's mailbox after number `after_n`.
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn mailbox(
        &mut self,
        after_n: u64,
        limit: Option<u32>,
    ) -> Result<agora_proto::wire::MailboxReply, ClientError> {
        self.call::<call::Mailbox>(&agora_proto::wire::MailboxRequest { after_n, limit })
    }

    /// Removes this client's messages up to `up_to` (once shown).
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn ack_dm(&mut self, up_to: u64) -> Result<agora_proto::wire::AckDmReply, ClientError> {
        self.call::<call::AckDm>(&agora_proto::wire::AckDmRequest { up_to })
    }

    /// This client's dead letters.
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn dead_letters(&mut self) -> Result<Vec<agora_proto::wire::DeadLetter>, ClientError> {
        Ok(self.call::<call::DeadLetters>(&ListRequest {})?.letters)
    }

    /// Asks the registry to stop (PROTOCOL §4.7). Only the operator's key is obeyed.
    ///
    /// # Errors
    /// `forbidden`; see [`ReqClient::call`].
    pub fn stop(&mut self) -> Result<agora_proto::wire::StopReply, ClientError> {
        self.call::<call::StopRegistry>(&ListRequest {})
    }

    /// Every user account (for account holders only).
    ///
    /// # Errors
    /// `no_account` (this key has no account: register first), `forbidden` (no CURVE); see
    /// [`ReqClient::call`].
    pub fn users(&mut self) -> Result<Vec<agora_proto::wire::UserEntry>, ClientError> {
        Ok(self.call::<call::Users>(&ListRequest {})?.users)
    }

    /// One user account (for account holders only).
    ///
    /// # Errors
    /// `no_account` (this key has no account: register first), `unknown_user`; see
    /// [`ReqClient::call`].
    pub fn whois(&mut self, name: &UserName) -> Result<agora_proto::wire::UserReply, ClientError> {
        self.call::<call::Whois>(&agora_proto::wire::UserNameRequest { name: name.clone() })
    }

    /// Refuses direct messages from the user `name` from now on (PROTOCOL §4.6.2); the
    /// reply says whether anything changed.
    ///
    /// # Errors
    /// `no_account` (this key has none), `unknown_user`, `invalid_field` (one's own name),
    /// `limit_reached`; see [`ReqClient::call`].
    pub fn block(&mut self, name: &UserName) -> Result<agora_proto::wire::BlockReply, ClientError> {
        self.call::<call::Block>(&agora_proto::wire::UserNameRequest { name: name.clone() })
    }

    /// Accepts direct messages from the blocked user `name` again.
    ///
    /// # Errors
    /// `no_account`; see [`ReqClient::call`].
    pub fn unblock(
        &mut self,
        name: &UserName,
    ) -> Result<agora_proto::wire::BlockReply, ClientError> {
        self.call::<call::Unblock>(&agora_proto::wire::UserNameRequest { name: name.clone() })
    }

    /// The users this client's account blocks, sorted by name.
    ///
    /// # Errors
    /// `no_account`; see [`ReqClient::call`].
    pub fn blocked(&mut self) -> Result<Vec<agora_proto::wire::BlockedEntry>, ClientError> {
        Ok(self.call::<call::Blocked>(&ListRequest {})?.blocked)
    }

    /// One live group by name.
    ///
    /// # Errors
    /// `unknown_group`; see [`ReqClient::call`].
    pub fn lookup(&mut self, name: &GroupName) -> Result<GroupEntry, ClientError> {
        Ok(self
            .call::<call::Lookup>(&LookupRequest { name: name.clone() })?
            .group)
    }

    /// `owner`: the key the group name `name` is bound to, live or not; `None` when it is
    /// free.
    ///
    /// # Errors
    /// As [`RegistryClient::lookup`], without `unknown_group`.
    pub fn owner(
        &mut self,
        name: &GroupName,
    ) -> Result<Option<crate::keys::PublicKey>, ClientError> {
        Ok(self
            .call::<call::Owner>(&LookupRequest { name: name.clone() })?
            .owner)
    }

    /// `release`: frees the group name `name` from the key it is bound to (PROTOCOL §4.4.2);
    /// true if it was bound. Only the registry's own key pair and the operator's key are
    /// obeyed: `registry release` sends it with the registry's key pair from its data
    /// directory.
    ///
    /// # Errors
    /// `forbidden` for any other key; see [`ReqClient::call`].
    pub fn release(&mut self, name: &GroupName) -> Result<bool, ClientError> {
        Ok(self
            .call::<call::Release>(&LookupRequest { name: name.clone() })?
            .released)
    }
}

/// A typed client for one group host (or node of one), acting as one user: one REQ socket
/// for every group at that endpoint. Each group's calls go through its view,
/// [`HostClient::group`], and every request names its group (PROTOCOL §6: required on a
/// group host).
#[derive(Debug)]
pub struct HostClient {
    req: ReqClient,
    user: UserName,
    server_key: Option<crate::keys::PublicKey>,
}

impl HostClient {
    /// A client for the host at `endpoint`, as `user`. Connects lazily.
    pub fn new(ctx: &zmq::Context, endpoint: &str, user: UserName, options: ClientOptions) -> Self {
        HostClient {
            req: ReqClient::new(ctx, endpoint, options),
            user,
            server_key: None,
        }
    }

    /// Talks CURVE to the host (see [`ReqClient::with_curve`]).
    pub fn with_curve(self, curve: ClientCurve) -> Self {
        HostClient {
            server_key: Some(curve.server_key),
            req: self.req.with_curve(curve),
            ..self
        }
    }

    /// The host's endpoint.
    pub fn endpoint(&self) -> &str {
        self.req.endpoint()
    }

    /// The user this client acts as.
    pub fn user(&self) -> &UserName {
        &self.user
    }

    /// Waits and retries as `options` says from the next call on.
    pub fn set_options(&mut self, options: ClientOptions) {
        self.req.set_options(options);
    }

    /// The calls of `group` at this host; each request names it.
    pub fn group<'h>(&'h mut self, group: &'h GroupName) -> GroupView<'h> {
        GroupView::new(&mut self.req, &self.user, group)
    }

    /// The host's own calls (`create`, `renew`) and its groups' views, over this client's
    /// REQ socket.
    pub fn view(&mut self) -> HostView<'_> {
        HostView::new(&mut self.req, &self.user)
    }

    /// `create` (PROTOCOL §6.11): see [`HostView::create`].
    ///
    /// # Errors
    /// As [`HostView::create`].
    pub fn create(
        &mut self,
        group: &GroupName,
        mode: agora_proto::wire::GroupMode,
    ) -> Result<agora_proto::wire::CreateReply, ClientError> {
        self.view().create(group, mode)
    }

    /// `renew` (PROTOCOL §6.7.1): see [`HostView::renew`].
    ///
    /// # Errors
    /// As [`HostView::renew`].
    pub fn renew(
        &mut self,
        groups: Vec<agora_proto::wire::RenewEntry>,
    ) -> Result<agora_proto::wire::RenewReply, ClientError> {
        self.view().renew(groups)
    }
}

/// One host's calls as one user, over any [`Exchange`]: a [`HostClient`]'s REQ socket
/// ([`HostClient::view`]) or a live feed's connection ([`crate::live::FeedLink`]).
#[derive(Debug)]
pub struct HostView<'h> {
    req: &'h mut dyn Exchange,
    user: &'h UserName,
}

impl<'h> HostView<'h> {
    /// The calls of the host `req` reaches, as `user`.
    pub fn new(req: &'h mut dyn Exchange, user: &'h UserName) -> HostView<'h> {
        HostView { req, user }
    }

    /// The calls of `group` at this host; each request names it.
    pub fn group<'g>(&'g mut self, group: &'g GroupName) -> GroupView<'g> {
        GroupView::new(&mut *self.req, self.user, group)
    }

    /// `create` (PROTOCOL §6.11): makes the group `group` on this host, in `mode`; the
    /// caller becomes its owner and first member.
    ///
    /// # Errors
    /// `forbidden` (not an allowed creator, or a node of one), `limit_reached` (the host's
    /// or the caller's group cap), `name_taken`, `invalid_field`; see [`ReqClient::call`].
    pub fn create(
        &mut self,
        group: &GroupName,
        mode: agora_proto::wire::GroupMode,
    ) -> Result<agora_proto::wire::CreateReply, ClientError> {
        self.req
            .call::<call::Create>(&agora_proto::wire::CreateRequest {
                group: group.clone(),
                user: self.user.clone(),
                mode,
            })
    }

    /// `renew` (PROTOCOL §6.7.1): `subscribe` for up to
    /// [`agora_proto::wire::MAX_RENEW_GROUPS`] groups of this host at once. Over a REQ
    /// socket the pushes that follow are not read; the live stream's own client is
    /// [`crate::live::Feed`], which sends it over its DEALER.
    ///
    /// # Errors
    /// `invalid_field` (no entry, or too many), `unknown_action` (a node older than
    /// §6.7.1); see [`ReqClient::call`].
    pub fn renew(
        &mut self,
        groups: Vec<agora_proto::wire::RenewEntry>,
    ) -> Result<agora_proto::wire::RenewReply, ClientError> {
        self.req
            .call::<call::Renew>(&agora_proto::wire::RenewRequest {
                user: self.user.clone(),
                groups,
            })
    }
}

/// One group's calls at a host, borrowed from a [`HostClient`] ([`HostClient::group`]), a
/// [`HostView`] or a [`GroupClient`] ([`GroupClient::view`]).
#[derive(Debug)]
pub struct GroupView<'h> {
    req: &'h mut dyn Exchange,
    user: &'h UserName,
    /// `None` only for a [`GroupClient`] made without a group (a node of one names it).
    group: Option<&'h GroupName>,
}

impl<'h> GroupView<'h> {
    /// The calls of `group` at the host `req` reaches, as `user`; each request names it.
    pub fn new(
        req: &'h mut dyn Exchange,
        user: &'h UserName,
        group: &'h GroupName,
    ) -> GroupView<'h> {
        GroupView {
            req,
            user,
            group: Some(group),
        }
    }
}

impl GroupView<'_> {
    fn group(&self) -> Option<GroupName> {
        self.group.cloned()
    }

    fn membership(&self) -> MembershipRequest {
        MembershipRequest {
            group: self.group(),
            user: self.user.clone(),
        }
    }

    /// The group's name, last seq and member count.
    ///
    /// # Errors
    /// `unknown_group` (not served there); see [`ReqClient::call`].
    pub fn info(&mut self) -> Result<InfoReply, ClientError> {
        let request = InfoRequest {
            group: self.group(),
        };
        self.req.call::<call::Info>(&request)
    }

    /// Joins the group (idempotent).
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn join(&mut self) -> Result<MembershipReply, ClientError> {
        let request = self.membership();
        self.req.call::<call::Join>(&request)
    }

    /// Leaves the group (idempotent).
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn leave(&mut self) -> Result<MembershipReply, ClientError> {
        let request = self.membership();
        self.req.call::<call::Leave>(&request)
    }

    /// Asks the group to stop (PROTOCOL §6.10): a node of one drains, unregisters and
    /// exits; a group host stops that group. Only the group owner's key or the node's own
    /// is obeyed.
    ///
    /// # Errors
    /// `forbidden`; see [`ReqClient::call`].
    pub fn stop(&mut self) -> Result<agora_proto::wire::StopReply, ClientError> {
        let request = self.membership();
        self.req.call::<call::Stop>(&request)
    }

    /// `delete` (PROTOCOL §6.11): archives the group and frees its name; its owner or the
    /// host's key only.
    ///
    /// # Errors
    /// `forbidden` (another key, or a node of one); see [`ReqClient::call`].
    pub fn delete(&mut self) -> Result<agora_proto::wire::DeleteReply, ClientError> {
        let request = self.membership();
        self.req.call::<call::Delete>(&request)
    }

    /// The member list.
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn members(&mut self) -> Result<MembersReply, ClientError> {
        let request = MembersRequest {
            group: self.group(),
        };
        self.req.call::<call::Members>(&request)
    }

    /// Declares, or resumes, the upload of a content of `size` bytes named `sha256`: where
    /// it stands (`complete` if the node already holds it).
    ///
    /// # Errors
    /// `not_member`, `too_large`; see [`ReqClient::call`].
    pub fn upload(
        &mut self,
        sha256: agora_proto::wire::Sha256Digest,
        size: u64,
    ) -> Result<agora_proto::wire::UploadReply, ClientError> {
        let request = agora_proto::wire::UploadRequest {
            group: self.group(),
            user: self.user.clone(),
            sha256,
            size,
        };
        self.req.call::<call::Upload>(&request)
    }

    /// Sends one chunk of an upload: `bytes` at `offset`.
    ///
    /// # Errors
    /// `bad_offset` (ask [`GroupView::upload`] where to resume), `digest_mismatch`,
    /// `too_large`; see [`ReqClient::call`].
    pub fn upload_chunk(
        &mut self,
        sha256: agora_proto::wire::Sha256Digest,
        offset: u64,
        bytes: Vec<u8>,
    ) -> Result<agora_proto::wire::UploadReply, ClientError> {
        let request = agora_proto::wire::UploadChunkRequest {
            group: self.group(),
            user: self.user.clone(),
            sha256,
            offset,
        };
        self.req
            .call_data::<call::UploadChunk>(&request, Some(bytes))
            .map(|(reply, _)| reply)
    }

    /// Up to `length` bytes (at most 1 MiB) of the content `sha256` from `offset`.
    ///
    /// # Errors
    /// `not_found` (no complete content), `not_member`; [`ClientError::BadReply`] when the
    /// reply has no data frame; see [`ReqClient::call`].
    pub fn download(
        &mut self,
        sha256: agora_proto::wire::Sha256Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<(agora_proto::wire::DownloadReply, Vec<u8>), ClientError> {
        let request = agora_proto::wire::DownloadRequest {
            group: self.group(),
            user: self.user.clone(),
            sha256,
            offset,
            length,
        };
        match self.req.call_data::<call::Download>(&request, None)? {
            (reply, Some(bytes)) => Ok((reply, bytes)),
            (_, None) => Err(ClientError::BadReply(CodecError::FrameCount(2))),
        }
    }

    /// Sends a message carrying a file whose content is already complete on the node
    /// ([`GroupView::upload`]), with `caption` as its body, under the client-chosen `id`.
    ///
    /// # Errors
    /// `not_found` (the content is not complete there), `invalid_field`; see
    /// [`GroupView::send_with_id`].
    pub fn send_attachment(
        &mut self,
        attachment: agora_proto::wire::Attachment,
        caption: Box<RawValue>,
        id: MessageId,
    ) -> Result<SendAck, ClientError> {
        let request = SendRequest {
            group: self.group(),
            user: self.user.clone(),
            body: caption,
            id: Some(id),
            attachment: Some(attachment),
        };
        self.req.call::<call::Send>(&request)
    }

    /// Sends a message with a fresh client-chosen id, so that the client's own retries are
    /// stored once. Returns once the node has committed it.
    ///
    /// # Errors
    /// `not_member`, `too_large`; see [`ReqClient::call`].
    pub fn send(&mut self, body: Box<RawValue>) -> Result<SendAck, ClientError> {
        self.send_with_id(body, MessageId::new_v7())
    }

    /// Sends a message with the given id; repeating a call with the same id and body is safe.
    ///
    /// # Errors
    /// `not_member`, `too_large`, `id_conflict`; see [`ReqClient::call`].
    pub fn send_with_id(
        &mut self,
        body: Box<RawValue>,
        id: MessageId,
    ) -> Result<SendAck, ClientError> {
        let request = SendRequest {
            group: self.group(),
            user: self.user.clone(),
            body,
            id: Some(id),
            attachment: None,
        };
        self.req.call::<call::Send>(&request)
    }

    /// A policy action on a key, `C` one of [`call::Invite`], [`call::Ban`] and
    /// [`call::Unban`] (owner and admins).
    ///
    /// # Errors
    /// `forbidden`; see [`ReqClient::call`].
    pub fn key_policy<C>(
        &mut self,
        key: crate::keys::PublicKey,
    ) -> Result<agora_proto::wire::PolicyReply, ClientError>
    where
        C: Call<Request = KeyTargetRequest, Reply = agora_proto::wire::PolicyReply>,
    {
        let request = KeyTargetRequest {
            group: self.group(),
            user: self.user.clone(),
            key,
        };
        self.req.call::<C>(&request)
    }

    /// A policy action on a member by name, `C` one of [`call::Kick`] (owner and admins)
    /// and [`call::Promote`] (owner).
    ///
    /// # Errors
    /// `forbidden`, `not_found`; see [`ReqClient::call`].
    pub fn member_policy<C>(
        &mut self,
        member: UserName,
    ) -> Result<agora_proto::wire::PolicyReply, ClientError>
    where
        C: Call<Request = MemberTargetRequest, Reply = agora_proto::wire::PolicyReply>,
    {
        let request = MemberTargetRequest {
            group: self.group(),
            user: self.user.clone(),
            member,
        };
        self.req.call::<C>(&request)
    }

    /// Makes the group open or private (owner and admins).
    ///
    /// # Errors
    /// `forbidden`; see [`ReqClient::call`].
    pub fn set_mode(
        &mut self,
        mode: agora_proto::wire::GroupMode,
    ) -> Result<agora_proto::wire::PolicyReply, ClientError> {
        let request = agora_proto::wire::SetModeRequest {
            group: self.group(),
            user: self.user.clone(),
            mode,
        };
        self.req.call::<call::SetMode>(&request)
    }

    /// One page of history.
    ///
    /// # Errors
    /// `not_member`, `not_found` (by id), `invalid_field`; see [`ReqClient::call`].
    pub fn get_messages(
        &mut self,
        query: HistoryQuery,
        limit: Option<u32>,
    ) -> Result<MessagesPage, ClientError> {
        let request = get_messages_request(self.group(), self.user.clone(), query, limit);
        self.req.call::<call::GetMessages>(&request)
    }

    /// Every message matching `query`, following `more` page by page (each page is one
    /// request, at most `page_limit` messages). `visit` sees each page's messages in seq
    /// order; return `false` from it to stop early.
    ///
    /// # Errors
    /// As [`GroupView::get_messages`].
    pub fn for_each_page(
        &mut self,
        mut query: HistoryQuery,
        page_limit: Option<u32>,
        mut visit: impl FnMut(&MessagesPage) -> bool,
    ) -> Result<(), ClientError> {
        loop {
            let page = self.get_messages(query, page_limit)?;
            if !visit(&page) || !page.more {
                return Ok(());
            }
            match page.messages.last() {
                Some(last) => query = HistoryQuery::AfterSeq(last.seq),
                None => return Ok(()),
            }
        }
    }
}

/// The `get_messages` request of `group` for `query`, as `user`.
pub(crate) fn get_messages_request(
    group: Option<GroupName>,
    user: UserName,
    query: HistoryQuery,
    limit: Option<u32>,
) -> GetMessagesRequest {
    let mut req = GetMessagesRequest {
        group,
        user,
        after_seq: None,
        since: None,
        id: None,
        latest: None,
        limit,
    };
    match query {
        HistoryQuery::AfterSeq(s) => req.after_seq = Some(s),
        HistoryQuery::Since(t) => req.since = Some(t),
        HistoryQuery::ById(id) => req.id = Some(id),
        HistoryQuery::Latest(n) => req.latest = Some(n),
    }
    req
}

/// The most hosts a [`HostPool`] keeps a client for (256): past it, the least recently
/// used one is closed.
pub const MAX_POOLED_HOSTS: usize = 256;

/// One [`HostClient`] per host endpoint, for one user: a caller that talks to many groups
/// holds one connection per host, not per group. Bounded: at most `capacity` hosts
/// (default [`MAX_POOLED_HOSTS`]), the least recently used closed first.
pub struct HostPool {
    ctx: zmq::Context,
    user: UserName,
    keypair: Option<crate::keys::Keypair>,
    options: ClientOptions,
    capacity: usize,
    clock: u64,
    hosts: std::collections::HashMap<String, (HostClient, u64)>,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("user", &self.user)
            .field("hosts", &self.hosts.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl HostPool {
    /// An empty pool acting as `user`, talking CURVE with `keypair` to every host whose key
    /// is given ([`HostPool::host`]).
    pub fn new(
        ctx: &zmq::Context,
        user: UserName,
        keypair: Option<crate::keys::Keypair>,
        options: ClientOptions,
    ) -> Self {
        HostPool {
            ctx: ctx.clone(),
            user,
            keypair,
            options,
            capacity: MAX_POOLED_HOSTS,
            clock: 0,
            hosts: std::collections::HashMap::new(),
        }
    }

    /// Keeps at most `capacity` hosts (at least 1) from now on.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// The options each client waits and retries with.
    pub fn options(&self) -> ClientOptions {
        self.options
    }

    /// How many hosts have a client now.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether no host has a client.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Whether the host at `endpoint` has a client now.
    pub fn contains(&self, endpoint: &str) -> bool {
        self.hosts.contains_key(endpoint)
    }

    /// The client of the host at `endpoint`, made on first use (CURVE when the pool has a
    /// key pair and `server_key` is given); a client made with another server key is made
    /// anew.
    pub fn host(
        &mut self,
        endpoint: &str,
        server_key: Option<crate::keys::PublicKey>,
    ) -> &mut HostClient {
        self.clock += 1;
        let stale = self
            .hosts
            .get(endpoint)
            .is_some_and(|(client, _)| client.server_key != server_key && server_key.is_some());
        if stale {
            self.hosts.remove(endpoint);
        }
        if !self.hosts.contains_key(endpoint) && self.hosts.len() >= self.capacity {
            let oldest = self
                .hosts
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(endpoint, _)| endpoint.clone());
            if let Some(oldest) = oldest {
                self.hosts.remove(&oldest);
            }
        }
        let (ctx, user, options) = (&self.ctx, &self.user, self.options);
        let keypair = &self.keypair;
        let entry = self.hosts.entry(endpoint.to_owned()).or_insert_with(|| {
            let client = HostClient::new(ctx, endpoint, user.clone(), options);
            let client = match (keypair, server_key) {
                (Some(keypair), Some(server_key)) => client.with_curve(ClientCurve {
                    keypair: keypair.clone(),
                    server_key,
                }),
                _ => client,
            };
            (client, 0)
        });
        entry.1 = self.clock;
        &mut entry.0
    }

    /// The calls of `group` at the host at `endpoint` (see [`HostPool::host`]).
    pub fn group<'p>(
        &'p mut self,
        endpoint: &str,
        server_key: Option<crate::keys::PublicKey>,
        group: &'p GroupName,
    ) -> GroupView<'p> {
        self.host(endpoint, server_key).group(group)
    }

    /// Closes the client of the host at `endpoint`, if any (it moved, or it failed).
    pub fn remove(&mut self, endpoint: &str) {
        self.hosts.remove(endpoint);
    }
}

/// A typed client for one group node, acting as one user, owning its socket: a
/// [`HostClient`] with one group. With a group, every request names it; without (`None`)
/// requests name none, which only a node of one accepts. A caller of several groups at one
/// host uses a [`HostClient`] (or a [`HostPool`]) instead, for one connection.
#[derive(Debug)]
pub struct GroupClient {
    host: HostClient,
    group: Option<GroupName>,
}

impl GroupClient {
    /// A client for the node at `endpoint`, as `user`. With `group` set, every request names
    /// it and a node serving another group answers `unknown_group`.
    pub fn new(
        ctx: &zmq::Context,
        endpoint: &str,
        user: UserName,
        group: Option<GroupName>,
        options: ClientOptions,
    ) -> Self {
        GroupClient {
            host: HostClient::new(ctx, endpoint, user, options),
            group,
        }
    }

    /// The node's endpoint.
    pub fn endpoint(&self) -> &str {
        self.host.endpoint()
    }

    /// Waits and retries as `options` says from the next call on.
    pub fn set_options(&mut self, options: ClientOptions) {
        self.host.set_options(options);
    }

    /// Talks CURVE to the node (see [`ReqClient::with_curve`]).
    pub fn with_curve(self, curve: ClientCurve) -> Self {
        GroupClient {
            host: self.host.with_curve(curve),
            ..self
        }
    }

    /// This client's calls, as a [`GroupView`].
    pub fn view(&mut self) -> GroupView<'_> {
        GroupView {
            req: &mut self.host.req,
            user: &self.host.user,
            group: self.group.as_ref(),
        }
    }

    /// As [`GroupView::info`].
    ///
    /// # Errors
    /// See [`GroupView::info`].
    pub fn info(&mut self) -> Result<InfoReply, ClientError> {
        self.view().info()
    }

    /// As [`GroupView::join`].
    ///
    /// # Errors
    /// See [`GroupView::join`].
    pub fn join(&mut self) -> Result<MembershipReply, ClientError> {
        self.view().join()
    }

    /// As [`GroupView::leave`].
    ///
    /// # Errors
    /// See [`GroupView::leave`].
    pub fn leave(&mut self) -> Result<MembershipReply, ClientError> {
        self.view().leave()
    }

    /// As [`GroupView::stop`].
    ///
    /// # Errors
    /// See [`GroupView::stop`].
    pub fn stop(&mut self) -> Result<agora_proto::wire::StopReply, ClientError> {
        self.view().stop()
    }

    /// As [`GroupView::members`].
    ///
    /// # Errors
    /// See [`GroupView::members`].
    pub fn members(&mut self) -> Result<MembersReply, ClientError> {
        self.view().members()
    }

    /// As [`GroupView::upload`].
    ///
    /// # Errors
    /// See [`GroupView::upload`].
    pub fn upload(
        &mut self,
        sha256: agora_proto::wire::Sha256Digest,
        size: u64,
    ) -> Result<agora_proto::wire::UploadReply, ClientError> {
        self.view().upload(sha256, size)
    }

    /// As [`GroupView::upload_chunk`].
    ///
    /// # Errors
    /// See [`GroupView::upload_chunk`].
    pub fn upload_chunk(
        &mut self,
        sha256: agora_proto::wire::Sha256Digest,
        offset: u64,
        bytes: Vec<u8>,
    ) -> Result<agora_proto::wire::UploadReply, ClientError> {
        self.view().upload_chunk(sha256, offset, bytes)
    }

    /// As [`GroupView::download`].
    ///
    /// # Errors
    /// See [`GroupView::download`].
    pub fn download(
        &mut self,
        sha256: agora_proto::wire::Sha256Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<(agora_proto::wire::DownloadReply, Vec<u8>), ClientError> {
        self.view().download(sha256, offset, length)
    }

    /// As [`GroupView::send_attachment`].
    ///
    /// # Errors
    /// See [`GroupView::send_attachment`].
    pub fn send_attachment(
        &mut self,
        attachment: agora_proto::wire::Attachment,
        caption: Box<RawValue>,
        id: MessageId,
    ) -> Result<SendAck, ClientError> {
        self.view().send_attachment(attachment, caption, id)
    }

    /// As [`GroupView::send`].
    ///
    /// # Errors
    /// See [`GroupView::send`].
    pub fn send(&mut self, body: Box<RawValue>) -> Result<SendAck, ClientError> {
        self.view().send(body)
    }

    /// As [`GroupView::send_with_id`].
    ///
    /// # Errors
    /// See [`GroupView::send_with_id`].
    pub fn send_with_id(
        &mut self,
        body: Box<RawValue>,
        id: MessageId,
    ) -> Result<SendAck, ClientError> {
        self.view().send_with_id(body, id)
    }

    /// As [`GroupView::key_policy`].
    ///
    /// # Errors
    /// See [`GroupView::key_policy`].
    pub fn key_policy<C>(
        &mut self,
        key: crate::keys::PublicKey,
    ) -> Result<agora_proto::wire::PolicyReply, ClientError>
    where
        C: Call<Request = KeyTargetRequest, Reply = agora_proto::wire::PolicyReply>,
    {
        self.view().key_policy::<C>(key)
    }

    /// As [`GroupView::member_policy`].
    ///
    /// # Errors
    /// See [`GroupView::member_policy`].
    pub fn member_policy<C>(
        &mut self,
        member: UserName,
    ) -> Result<agora_proto::wire::PolicyReply, ClientError>
    where
        C: Call<Request = MemberTargetRequest, Reply = agora_proto::wire::PolicyReply>,
    {
        self.view().member_policy::<C>(member)
    }

    /// As [`GroupView::set_mode`].
    ///
    /// # Errors
    /// See [`GroupView::set_mode`].
    pub fn set_mode(
        &mut self,
        mode: agora_proto::wire::GroupMode,
    ) -> Result<agora_proto::wire::PolicyReply, ClientError> {
        self.view().set_mode(mode)
    }

    /// As [`GroupView::get_messages`].
    ///
    /// # Errors
    /// See [`GroupView::get_messages`].
    pub fn get_messages(
        &mut self,
        query: HistoryQuery,
        limit: Option<u32>,
    ) -> Result<MessagesPage, ClientError> {
        self.view().get_messages(query, limit)
    }

    /// As [`GroupView::for_each_page`].
    ///
    /// # Errors
    /// See [`GroupView::for_each_page`].
    pub fn for_each_page(
        &mut self,
        query: HistoryQuery,
        page_limit: Option<u32>,
        visit: impl FnMut(&MessagesPage) -> bool,
    ) -> Result<(), ClientError> {
        self.view().for_each_page(query, page_limit, visit)
    }
}

/// The frame-size limit (`ZMQ_MAXMSGSIZE`, bytes) a server should set for a body limit of
/// `max_body_bytes`: room for the rest of the request beside the body.
pub fn max_request_bytes(max_body_bytes: usize) -> i64 {
    i64::try_from(max_body_bytes.saturating_add(REQUEST_OVERHEAD_BYTES)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review of issue 23: a timeout read `within 2.002584094s` (the time measured); it
    /// says the configured timeout, as people write it.
    #[test]
    fn a_timeout_names_the_configured_wait_as_people_write_it() {
        let ctx = zmq::Context::new();
        // A ROUTER that never answers.
        let (_silent, endpoint) = crate::server::bind_router(
            &ctx,
            "tcp://127.0.0.1:0",
            crate::server::RouterOptions {
                max_request_bytes: 1 << 16,
                hwm: 10,
                heartbeat: None,
                curve: None,
            },
        )
        .expect("bind");
        let options = ClientOptions {
            timeout: Duration::from_millis(300),
            attempts: 2,
        };
        let mut client = ReqClient::new(&ctx, endpoint.clone(), options);
        let error = client
            .request_frames(&vec![b"x".to_vec()])
            .expect_err("no reply");
        assert_eq!(
            error.to_string(),
            format!("no reply from {endpoint} within 300ms")
        );
    }

    /// One host client, two groups: both groups' requests go over one connection, each
    /// naming its own group (the user-cli reuse bug of issue 24: a second group's
    /// requests went to the first).
    #[test]
    fn a_host_client_names_each_groups_request_over_one_connection() {
        use agora_proto::action::NodeRequest;
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).expect("router");
        router.set_linger(0).expect("linger");
        router.bind("tcp://127.0.0.1:*").expect("bind");
        let endpoint = router
            .get_last_endpoint()
            .expect("endpoint")
            .expect("utf-8");
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..2 {
                assert!(
                    router.poll(zmq::POLLIN, 5000).expect("poll") > 0,
                    "no request"
                );
                let frames = router.recv_multipart(0).expect("recv");
                let request = agora_proto::codec::decode_request::<NodeRequest>(&frames[2..])
                    .expect("request");
                let group = request.group().cloned().expect("names its group");
                let reply = agora_proto::codec::encode_ok(&InfoReply {
                    group: group.clone(),
                    last_seq: 0,
                    members: 1,
                    max_message_bytes: 1024,
                    mode: agora_proto::wire::GroupMode::Open,
                });
                let mut out = vec![frames[0].clone(), Vec::new()];
                out.extend(reply);
                router.send_multipart(out, 0).expect("send");
                seen.push((frames[0].clone(), group));
            }
            seen
        });
        let mut host = HostClient::new(
            &ctx,
            &endpoint,
            "bob".parse().expect("user"),
            ClientOptions::default(),
        );
        let (a, b): (GroupName, GroupName) =
            ("Alpha".parse().expect("a"), "Beta".parse().expect("b"));
        assert_eq!(host.group(&a).info().expect("info").group, a);
        assert_eq!(host.group(&b).info().expect("info").group, b);
        let seen = server.join().expect("server");
        assert_eq!(seen[0].1, a);
        assert_eq!(seen[1].1, b);
        assert_eq!(seen[0].0, seen[1].0, "one connection");
    }

    /// The pool keeps one client per endpoint and, past its capacity, closes the least
    /// recently used.
    #[test]
    fn a_host_pool_is_bounded_and_closes_the_least_recently_used_host() {
        let ctx = zmq::Context::new();
        let mut pool = HostPool::new(
            &ctx,
            "bob".parse().expect("user"),
            None,
            ClientOptions::default(),
        )
        .with_capacity(2);
        let (a, b, c) = (
            "tcp://127.0.0.1:1",
            "tcp://127.0.0.1:2",
            "tcp://127.0.0.1:3",
        );
        pool.host(a, None);
        pool.host(b, None);
        pool.host(a, None);
        assert_eq!(pool.len(), 2);
        pool.host(c, None);
        assert_eq!(pool.len(), 2);
        assert!(pool.contains(a) && pool.contains(c) && !pool.contains(b));
        pool.remove(a);
        assert!(!pool.contains(a));
    }
}
