//! A user's live presence and direct-message inbox, for clients and bots.
//!
//! [`Inbox`] is an [`Actor`] that owns a DEALER to the registry (over CURVE). It sends
//! `connect {push: true}` at once and then every third of the session TTL (the presence
//! heartbeat), and hands each direct message the registry pushes to the consumer's callback,
//! on the actor's thread, in number order, each number once. A message is acked (removed from
//! the mailbox) when the callback says it was handled, or later through [`Inbox::ack`]; until
//! then it stays in the mailbox, so a crash loses nothing. Dropping the inbox wakes the actor
//! at once; it sends `disconnect` and stops.
//!
//! # Pipe commands
//! `["ack", N]` (N a big-endian u64): ack the messages numbered up to N.

use std::time::{Duration, Instant};

use crate::actor::{poll_ms_until, Actor, Pipe, Wake};
use crate::client::ClientCurve;
use agora_proto::action::RegistryRequest;
use agora_proto::codec::encode_request;
use agora_proto::wire::{AckDmRequest, ConnectRequest, Dm, DmEvent, ListRequest, Presence};

/// How soon a heartbeat that found no registry connected is tried again.
const RETRY_UNCONNECTED: Duration = Duration::from_millis(100);

/// A running presence heartbeat and DM inbox; stops (and disconnects) when dropped.
#[derive(Debug)]
pub struct Inbox {
    actor: Actor,
}

impl Inbox {
    /// Starts the heartbeat to the registry at `endpoint`, renewing every `every` (a third
    /// of the TTL the registry's `connect` reply gives). Each pushed message goes to
    /// `on_dm`, on the inbox's thread; it returns true when the message was handled (it is
    /// then acked), false to ack it later with [`Inbox::ack`].
    ///
    /// # Errors
    /// The actor could not start.
    pub fn start(
        ctx: &zmq::Context,
        endpoint: &str,
        curve: ClientCurve,
        every: Duration,
        on_dm: impl FnMut(Dm) -> bool + Send + 'static,
    ) -> std::io::Result<Inbox> {
        let (own_ctx, endpoint) = (ctx.clone(), endpoint.to_owned());
        let actor = Actor::start(ctx, "inbox", move |pipe| {
            if let Err(e) = run(&pipe, &own_ctx, &endpoint, &curve, every, on_dm) {
                tracing::warn!(error = %e, "inbox stopped");
            }
        })?;
        Ok(Inbox { actor })
    }

    /// Removes the messages numbered up to `n` from the mailbox (they were handled).
    pub fn ack(&self, n: u64) {
        let _ = self.actor.send(&[b"ack", &n.to_be_bytes()]);
    }
}

fn run(
    pipe: &Pipe,
    ctx: &zmq::Context,
    endpoint: &str,
    curve: &ClientCurve,
    every: Duration,
    mut on_dm: impl FnMut(Dm) -> bool,
) -> Result<(), zmq::Error> {
    let socket = ctx.socket(zmq::DEALER)?;
    socket.set_linger(200)?;
    socket.set_curve_serverkey(curve.server_key.as_bytes())?;
    socket.set_curve_publickey(curve.keypair.public.as_bytes())?;
    socket.set_curve_secretkey(curve.keypair.secret_bytes())?;
    // Every registry of a list: the DEALER sends each heartbeat to one connected registry
    // (round robin; they share presence and mailboxes through their database), a dead one
    // is dropped by the ZMTP heartbeat, and pushes come from any.
    socket.set_immediate(true)?;
    socket.set_heartbeat_ivl(1000)?;
    socket.set_heartbeat_timeout(3000)?;
    for endpoint in crate::client::registry_endpoints(endpoint) {
        socket.connect(&endpoint)?;
    }
    // Whether the request was queued: with `immediate`, not while no registry is connected
    // (EAGAIN). A DEALER adds the empty delimiter a REQ would.
    let send = |request: RegistryRequest| -> bool {
        let frames = encode_request(&request);
        socket
            .send_multipart(std::iter::once(Vec::new()).chain(frames), zmq::DONTWAIT)
            .is_ok()
    };
    // A lost ack is covered by the next: acks are cumulative.
    let ack = |n: u64| {
        let _ = send(RegistryRequest::AckDm(AckDmRequest { up_to: n }));
    };
    let mut next = Instant::now();
    let mut last = 0u64;
    loop {
        if Instant::now() >= next {
            let sent = send(RegistryRequest::Connect(ConnectRequest {
                status: Some(Presence::Online),
                push: true,
            }));
            // Not connected yet (or every registry is down): try again shortly.
            next = Instant::now() + if sent { every } else { RETRY_UNCONNECTED };
        }
        let mut items = [pipe.as_poll_item(), socket.as_poll_item(zmq::POLLIN)];
        match zmq::poll(&mut items, poll_ms_until(next)) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(e),
        }
        if items[0].is_readable() {
            match pipe.take() {
                Wake::Term => break,
                Wake::Command(frames) => match frames.as_slice() {
                    [verb, n] if verb == b"ack" => {
                        if let Ok(n) = <[u8; 8]>::try_from(n.as_slice()) {
                            ack(u64::from_be_bytes(n));
                        }
                    }
                    _ => tracing::warn!("inbox: unknown command"),
                },
                Wake::Timeout => {}
            }
        }
        if !items[1].is_readable() {
            continue;
        }
        while let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) {
            let Some(body) = frames.last() else { continue };
            let Ok(event) = serde_json::from_slice::<DmEvent>(body) else {
                continue; // a reply to a heartbeat or an ack
            };
            if event.event != "dm" || event.dm.n <= last {
                continue;
            }
            last = event.dm.n;
            if on_dm(event.dm) {
                ack(last);
            }
        }
    }
    let _ = send(RegistryRequest::Disconnect(ListRequest {}));
    Ok(())
}
