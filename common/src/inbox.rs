//! A user's live presence and direct-message inbox, for clients and bots.
//!
//! [`Inbox`] runs one thread that owns a DEALER to the registry (over CURVE). It sends
//! `connect {push: true}` at once and then every third of the session TTL (the presence
//! heartbeat), and hands each direct message the registry pushes to the consumer through a
//! bounded channel, in number order, each number once. The consumer calls [`Inbox::ack`]
//! after it has handled a message; until then the message stays in the mailbox, so a crash
//! loses nothing. Dropping the inbox sends `disconnect`.

use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::ClientCurve;
use crate::shutdown::Shutdown;
use agora_proto::action::RegistryRequest;
use agora_proto::codec::encode_request;
use agora_proto::wire::{AckDmRequest, ConnectRequest, Dm, DmEvent, ListRequest, Presence};

/// A running presence heartbeat and DM inbox; stops (and disconnects) when dropped.
#[derive(Debug)]
pub struct Inbox {
    stop: Shutdown,
    acks: SyncSender<u64>,
    thread: Option<JoinHandle<()>>,
}

impl Inbox {
    /// Starts the heartbeat to the registry at `endpoint`, renewing every `every` (a third
    /// of the TTL the registry's `connect` reply gives). Pushed messages arrive on the
    /// returned receiver (capacity 1024).
    ///
    /// # Errors
    /// The thread could not start.
    pub fn start(
        ctx: &zmq::Context,
        endpoint: &str,
        curve: ClientCurve,
        every: Duration,
    ) -> std::io::Result<(Inbox, Receiver<Dm>)> {
        let (tx, rx) = mpsc::sync_channel(1024);
        let (acks, acks_rx) = mpsc::sync_channel(1024);
        let stop = Shutdown::new();
        let flag = stop.clone();
        let (ctx, endpoint) = (ctx.clone(), endpoint.to_owned());
        let thread = std::thread::Builder::new()
            .name("inbox".into())
            .spawn(move || {
                if let Err(e) = run(&ctx, &endpoint, &curve, every, &tx, &acks_rx, &flag) {
                    tracing::warn!(error = %e, "inbox stopped");
                }
            })?;
        Ok((
            Inbox {
                stop,
                acks,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// Removes the messages numbered up to `n` from the mailbox (they were handled).
    pub fn ack(&self, n: u64) {
        let _ = self.acks.try_send(n);
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    ctx: &zmq::Context,
    endpoint: &str,
    curve: &ClientCurve,
    every: Duration,
    out: &SyncSender<Dm>,
    acks: &Receiver<u64>,
    stop: &Shutdown,
) -> Result<(), zmq::Error> {
    let socket = ctx.socket(zmq::DEALER)?;
    socket.set_linger(200)?;
    socket.set_curve_serverkey(curve.server_key.as_bytes())?;
    socket.set_curve_publickey(curve.keypair.public.as_bytes())?;
    socket.set_curve_secretkey(curve.keypair.secret_bytes())?;
    socket.connect(endpoint)?;
    let send = |request: RegistryRequest| {
        // A DEALER adds the empty delimiter a REQ would. EAGAIN (no connection yet) is
        // harmless: the next heartbeat goes out soon.
        let frames = encode_request(&request);
        let _ = socket.send_multipart(std::iter::once(Vec::new()).chain(frames), zmq::DONTWAIT);
    };
    let mut next = Instant::now();
    let mut last = 0u64;
    while !stop.is_triggered() {
        if Instant::now() >= next {
            send(RegistryRequest::Connect(ConnectRequest {
                status: Some(Presence::Online),
                push: true,
            }));
            next = Instant::now() + every;
        }
        loop {
            match acks.try_recv() {
                Ok(n) => send(RegistryRequest::AckDm(AckDmRequest { up_to: n })),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
        if socket.poll(zmq::POLLIN, 50).unwrap_or(0) == 0 {
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
            if out.send(event.dm).is_err() {
                return Ok(());
            }
        }
    }
    send(RegistryRequest::Disconnect(ListRequest {}));
    Ok(())
}
