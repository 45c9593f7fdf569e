//! A user's live presence and direct-message inbox, for clients and bots.
//!
//! [`Inbox`] is an [`Actor`] that owns a DEALER to the registry (over CURVE), one to each
//! registry of a list. It sends `connect {push: true}` on each at once and then every third
//! of the session TTL (the presence heartbeat), and hands each direct message the registries
//! push to the consumer's callback, on the actor's thread, in number order, each number once:
//! a second registry's push of a message is skipped, and a push past the next number (one
//! missed while a registry died) first reads the gap with `mailbox`. A message is acked (removed from
//! the mailbox) when the callback says it was handled, or later through [`Inbox::ack`]; until
//! then it stays in the mailbox, so a crash loses nothing. Dropping the inbox wakes the actor
//! at once; it sends `disconnect` and stops.
//!
//! The heartbeat says `online` until [`Inbox::set_status`] says `away` (a prompt's `away`,
//! which a heartbeat saying `online` would otherwise undo at its next renewal). An inbox
//! told [`Inbox::lapse`] stops without `disconnect`: the presence then lapses at the TTL, as
//! after a one-shot `connect` (a script that said `connect` and ended).
//!
//! The first `connect` reply (the push session is then open: a message stored from then on
//! is pushed) is told to the owner, for [`Inbox::wait_ready`].
//!
//! # Pipe commands
//! `["ack", N]` (N a big-endian u64): ack the messages numbered up to N.
//! `["status", S]` (S `online` or `away`): the presence the heartbeats say from now on (sent
//! at once).
//! `["lapse"]`: at the stop, send no `disconnect`.
//!
//! # Pipe events
//! `["ready"]`, once: a registry answered the first `connect`.

use std::time::{Duration, Instant};

use crate::actor::{poll_ms_until, Actor, Pipe, Wake};
use crate::client::ClientCurve;
use agora_proto::action::RegistryRequest;
use agora_proto::codec::encode_request;
use agora_proto::wire::{
    AckDmRequest, ConnectReply, ConnectRequest, Dm, DmEvent, ListRequest, MailboxRequest, Presence,
};

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

    /// Waits up to `timeout` for a registry to answer the inbox's first `connect`: from then
    /// on, a direct message stored for the user is pushed. Returns whether one did (at most
    /// once: later calls wait the whole `timeout` and return false).
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.actor.recv(Some(left)) {
                Ok(Some(frames)) if frames.first().is_some_and(|f| f == b"ready") => return true,
                Ok(Some(_)) if !left.is_zero() => continue,
                _ => return false,
            }
        }
    }

    /// Removes the messages numbered up to `n` from the mailbox (they were handled).
    pub fn ack(&self, n: u64) {
        let _ = self.actor.send(&[b"ack", &n.to_be_bytes()]);
    }

    /// Says `status` from now on: at once, and in every heartbeat after (default `online`).
    /// `offline` is not a status a heartbeat says: drop the inbox instead.
    pub fn set_status(&self, status: Presence) {
        let word: &[u8] = match status {
            Presence::Away => b"away",
            _ => b"online",
        };
        let _ = self.actor.send(&[b"status", word]);
    }

    /// Stops without `disconnect` when dropped: the presence lapses at the TTL instead of
    /// ending at once.
    pub fn lapse(&self) {
        let _ = self.actor.send(&[b"lapse"]);
    }
}

/// One registry of the list: its DEALER and when its next heartbeat is due.
struct Link {
    socket: zmq::Socket,
    next: Instant,
}

fn run(
    pipe: &Pipe,
    ctx: &zmq::Context,
    endpoint: &str,
    curve: &ClientCurve,
    every: Duration,
    mut on_dm: impl FnMut(Dm) -> bool,
) -> Result<(), zmq::Error> {
    // One DEALER per registry of the list, each with its own `connect {push}` session: every
    // registry then knows where to push, whichever stored the message (registries over one
    // database notify each other). A dead one is dropped by the ZMTP heartbeat.
    let mut links = Vec::new();
    for endpoint in crate::client::registry_endpoints(endpoint) {
        let socket = ctx.socket(zmq::DEALER)?;
        socket.set_linger(200)?;
        // Not `immediate`: the first `connect` waits in the pipe and goes out the moment the
        // connection is up, so the push session starts as soon as it can (a DM stored
        // before it is not pushed). Each DEALER has one peer, so nothing queues for a dead
        // registry but its own heartbeats, up to the HWM.
        socket.set_heartbeat_ivl(1000)?;
        socket.set_heartbeat_timeout(3000)?;
        socket.set_curve_serverkey(curve.server_key.as_bytes())?;
        socket.set_curve_publickey(curve.keypair.public.as_bytes())?;
        socket.set_curve_secretkey(curve.keypair.secret_bytes())?;
        socket.connect(&endpoint)?;
        links.push(Link {
            socket,
            next: Instant::now(),
        });
    }
    // Whether the request was queued (not past the HWM). A DEALER adds the empty delimiter
    // a REQ would.
    let send = |socket: &zmq::Socket, request: RegistryRequest| -> bool {
        let frames = encode_request(&request);
        socket
            .send_multipart(std::iter::once(Vec::new()).chain(frames), zmq::DONTWAIT)
            .is_ok()
    };
    // Acks are cumulative and the mailbox shared: any registry will do, and a lost ack is
    // covered by the next.
    let ack = |links: &[Link], n: u64| {
        for link in links {
            if send(
                &link.socket,
                RegistryRequest::AckDm(AckDmRequest { up_to: n }),
            ) {
                return;
            }
        }
    };
    let mut delivery = Delivery::default();
    let mut status = Presence::Online;
    let mut disconnect_at_end = true;
    let mut ready = false;
    loop {
        let now = Instant::now();
        for link in &mut links {
            if now >= link.next {
                let sent = send(
                    &link.socket,
                    RegistryRequest::Connect(ConnectRequest {
                        status: Some(status),
                        push: true,
                    }),
                );
                // Refused (the pipe is full: the registry is long gone): try again shortly.
                link.next = now + if sent { every } else { RETRY_UNCONNECTED };
            }
        }
        let next = links.iter().map(|l| l.next).min().unwrap_or(now + every);
        let mut items: Vec<zmq::PollItem<'_>> = std::iter::once(pipe.as_poll_item())
            .chain(links.iter().map(|l| l.socket.as_poll_item(zmq::POLLIN)))
            .collect();
        match zmq::poll(&mut items, poll_ms_until(next)) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(e),
        }
        let readable: Vec<bool> = items[1..].iter().map(zmq::PollItem::is_readable).collect();
        if items[0].is_readable() {
            match pipe.take() {
                Wake::Term => break,
                Wake::Command(frames) => match frames.as_slice() {
                    [verb, n] if verb == b"ack" => {
                        if let Ok(n) = <[u8; 8]>::try_from(n.as_slice()) {
                            ack(&links, u64::from_be_bytes(n));
                        }
                    }
                    [verb, word] if verb == b"status" => {
                        status = match word.as_slice() {
                            b"away" => Presence::Away,
                            _ => Presence::Online,
                        };
                        // Said at once: the next heartbeat of every link is due now.
                        for link in &mut links {
                            link.next = Instant::now();
                        }
                    }
                    [verb] if verb == b"lapse" => disconnect_at_end = false,
                    _ => tracing::warn!("inbox: unknown command"),
                },
                Wake::Timeout => {}
            }
        }
        for (link, readable) in links.iter().zip(readable) {
            if !readable {
                continue;
            }
            while let Ok(frames) = link.socket.recv_multipart(zmq::DONTWAIT) {
                let Some(body) = frames.last() else { continue };
                let dms = if let Ok(event) = serde_json::from_slice::<DmEvent>(body) {
                    if event.event != "dm" {
                        continue;
                    }
                    match delivery.pushed(event.dm) {
                        Pushed::Deliver(dm) => vec![dm],
                        Pushed::Skip => continue,
                        Pushed::Gap(after_n) => {
                            // Read what was missed (and the pushed one) from the mailbox.
                            let _ = send(
                                &link.socket,
                                RegistryRequest::Mailbox(MailboxRequest {
                                    after_n,
                                    limit: Some(1000),
                                }),
                            );
                            continue;
                        }
                    }
                } else if let Ok(page) = serde_json::from_slice::<MailboxPage>(body) {
                    delivery.backfilled(page.messages)
                } else if !ready && serde_json::from_slice::<ConnectReply>(body).is_ok() {
                    ready = true;
                    let _ = pipe.send(&[b"ready"]);
                    continue;
                } else {
                    continue; // a reply to a heartbeat or an ack
                };
                for dm in dms {
                    let n = dm.n;
                    if on_dm(dm) {
                        ack(&links, n);
                    }
                }
            }
        }
    }
    if disconnect_at_end {
        for link in &links {
            let _ = send(&link.socket, RegistryRequest::Disconnect(ListRequest {}));
        }
    }
    Ok(())
}

/// A `mailbox` reply, as it arrives on a DEALER.
#[derive(serde::Deserialize)]
struct MailboxPage {
    #[allow(dead_code)] // only a reply with `ok: true` has messages
    ok: bool,
    messages: Vec<Dm>,
}

/// What to do with a pushed message.
#[derive(Debug, PartialEq)]
enum Pushed {
    /// The next one: hand it on.
    Deliver(Dm),
    /// Handed on already (a second registry's push of it, or a backfill's).
    Skip,
    /// Messages after this number are missing: read them from the mailbox first.
    Gap(u64),
}

/// Exactly-once, in-order delivery of pushed messages that may come from several registries
/// and may be missed (a registry that died before pushing): the numbers of one mailbox are
/// consecutive, so a push past the next number reveals a gap, read back with `mailbox`.
#[derive(Debug, Default)]
struct Delivery {
    /// The last number handed on; `None` before the first push, which sets the baseline
    /// (messages stored before the inbox started are the mailbox's to show, not pushes).
    last: Option<u64>,
}

impl Delivery {
    fn pushed(&mut self, dm: Dm) -> Pushed {
        match self.last {
            None => {
                self.last = Some(dm.n);
                Pushed::Deliver(dm)
            }
            Some(last) if dm.n <= last => Pushed::Skip,
            Some(last) if dm.n == last + 1 => {
                self.last = Some(dm.n);
                Pushed::Deliver(dm)
            }
            Some(last) => Pushed::Gap(last),
        }
    }

    /// The messages of a `mailbox` page not handed on yet, in order.
    fn backfilled(&mut self, messages: Vec<Dm>) -> Vec<Dm> {
        let mut out = Vec::new();
        for dm in messages {
            if self.last.is_some_and(|last| dm.n <= last) {
                continue;
            }
            self.last = Some(dm.n);
            out.push(dm);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_proto::id::MessageId;
    use agora_proto::time::Timestamp;
    use agora_proto::wire::UserName;
    use serde_json::value::RawValue;

    fn dm(n: u64) -> Dm {
        Dm {
            n,
            id: MessageId::new_v7(),
            time: Timestamp::now(),
            from: UserName::new("alice").expect("name"),
            from_key: crate::keys::Keypair::generate().expect("keys").public,
            body: RawValue::from_string("\"hi\"".to_owned()).expect("json"),
        }
    }

    fn numbers(dms: &[Dm]) -> Vec<u64> {
        dms.iter().map(|d| d.n).collect()
    }

    #[test]
    fn pushes_from_two_registries_are_handed_on_once_in_order_and_gaps_are_read_back() {
        let mut d = Delivery::default();
        // The first push sets the baseline.
        assert!(matches!(d.pushed(dm(7)), Pushed::Deliver(m) if m.n == 7));
        // The other registry's push of the same message.
        assert_eq!(d.pushed(dm(7)), Pushed::Skip);
        assert!(matches!(d.pushed(dm(8)), Pushed::Deliver(m) if m.n == 8));
        // 9 and 10 were missed (their registry died): 11 reveals the gap.
        assert_eq!(d.pushed(dm(11)), Pushed::Gap(8));
        // The mailbox page from after 8, with 11 in it; a late push of 9 is then a duplicate.
        assert_eq!(
            numbers(&d.backfilled(vec![dm(9), dm(10), dm(11)])),
            vec![9, 10, 11]
        );
        assert_eq!(d.pushed(dm(9)), Pushed::Skip);
        assert_eq!(
            numbers(&d.backfilled(vec![dm(10), dm(11), dm(12)])),
            vec![12]
        );
    }
}
