//! Clients for the registry and group nodes.
//!
//! [`ReqClient`] is the zguide's "Lazy Pirate" (chapter 4): a REQ socket that waits a bounded
//! time for each reply, and on a timeout closes the socket, opens a new one and tries again,
//! because a REQ that missed its reply cannot send again. Every Agora request is safe to
//! repeat (registration and membership are idempotent, and [`GroupClient::send`] always
//! sends a client-chosen message id), so retrying cannot duplicate anything.
//!
//! [`RegistryClient`] and [`GroupClient`] wrap it with one typed method per action.

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
        let reply = self.request_frames(&encode_call::<C>(request))?;
        Ok(decode_reply::<C::Reply>(&reply)??)
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

/// A typed client for one group node, acting as one user.
#[derive(Debug)]
pub struct GroupClient {
    req: ReqClient,
    user: UserName,
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
            req: ReqClient::new(ctx, endpoint, options),
            user,
            group,
        }
    }

    /// The node's endpoint.
    pub fn endpoint(&self) -> &str {
        self.req.endpoint()
    }

    /// Waits and retries as `options` says from the next call on.
    pub fn set_options(&mut self, options: ClientOptions) {
        self.req.set_options(options);
    }

    /// Talks CURVE to the node (see [`ReqClient::with_curve`]).
    pub fn with_curve(self, curve: ClientCurve) -> Self {
        GroupClient {
            req: self.req.with_curve(curve),
            ..self
        }
    }

    /// The node's group name, last seq and member count.
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn info(&mut self) -> Result<InfoReply, ClientError> {
        self.req.call::<call::Info>(&InfoRequest {
            group: self.group.clone(),
        })
    }

    fn membership(&self) -> MembershipRequest {
        MembershipRequest {
            group: self.group.clone(),
            user: self.user.clone(),
        }
    }

    /// Joins the group (idempotent).
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn join(&mut self) -> Result<MembershipReply, ClientError> {
        self.req.call::<call::Join>(&self.membership())
    }

    /// Leaves the group (idempotent).
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn leave(&mut self) -> Result<MembershipReply, ClientError> {
        self.req.call::<call::Leave>(&self.membership())
    }

    /// Asks the node to stop: it drains, unregisters and exits (PROTOCOL §6.10). Only the
    /// group owner's key or the node's own is obeyed.
    ///
    /// # Errors
    /// `forbidden`; see [`ReqClient::call`].
    pub fn stop(&mut self) -> Result<agora_proto::wire::StopReply, ClientError> {
        self.req.call::<call::Stop>(&self.membership())
    }

    /// The member list.
    ///
    /// # Errors
    /// See [`ReqClient::call`].
    pub fn members(&mut self) -> Result<MembersReply, ClientError> {
        self.req.call::<call::Members>(&MembersRequest {
            group: self.group.clone(),
        })
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
        self.req
            .call::<call::Upload>(&agora_proto::wire::UploadRequest {
                group: self.group.clone(),
                user: self.user.clone(),
                sha256,
                size,
            })
    }

    /// Sends one chunk of an upload: `bytes` at `offset`.
    ///
    /// # Errors
    /// `bad_offset` (ask [`GroupClient::upload`] where to resume), `digest_mismatch`,
    /// `too_large`; see [`ReqClient::call`].
    pub fn upload_chunk(
        &mut self,
        sha256: agora_proto::wire::Sha256Digest,
        offset: u64,
        bytes: Vec<u8>,
    ) -> Result<agora_proto::wire::UploadReply, ClientError> {
        let request = agora_proto::wire::UploadChunkRequest {
            group: self.group.clone(),
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
            group: self.group.clone(),
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
    /// ([`GroupClient::upload`]), with `caption` as its body, under the client-chosen `id`.
    ///
    /// # Errors
    /// `not_found` (the content is not complete there), `invalid_field`; see
    /// [`GroupClient::send_with_id`].
    pub fn send_attachment(
        &mut self,
        attachment: agora_proto::wire::Attachment,
        caption: Box<RawValue>,
        id: MessageId,
    ) -> Result<SendAck, ClientError> {
        self.req.call::<call::Send>(&SendRequest {
            group: self.group.clone(),
            user: self.user.clone(),
            body: caption,
            id: Some(id),
            attachment: Some(attachment),
        })
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
        self.req.call::<call::Send>(&SendRequest {
            group: self.group.clone(),
            user: self.user.clone(),
            body,
            id: Some(id),
            attachment: None,
        })
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
        self.req.call::<C>(&KeyTargetRequest {
            group: self.group.clone(),
            user: self.user.clone(),
            key,
        })
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
        self.req.call::<C>(&MemberTargetRequest {
            group: self.group.clone(),
            user: self.user.clone(),
            member,
        })
    }

    /// Makes the group open or private (owner and admins).
    ///
    /// # Errors
    /// `forbidden`; see [`ReqClient::call`].
    pub fn set_mode(
        &mut self,
        mode: agora_proto::wire::GroupMode,
    ) -> Result<agora_proto::wire::PolicyReply, ClientError> {
        self.req
            .call::<call::SetMode>(&agora_proto::wire::SetModeRequest {
                group: self.group.clone(),
                user: self.user.clone(),
                mode,
            })
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
        let mut req = GetMessagesRequest {
            group: self.group.clone(),
            user: self.user.clone(),
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
        self.req.call::<call::GetMessages>(&req)
    }

    /// Every message matching `query`, following `more` page by page (each page is one
    /// request, at most `page_limit` messages). `visit` sees each page's messages in seq
    /// order; return `false` from it to stop early.
    ///
    /// # Errors
    /// As [`GroupClient::get_messages`].
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
}
