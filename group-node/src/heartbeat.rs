//! Registration with the registry: register on start, repeat every heartbeat interval
//! (the registry's liveness signal), unregister on a clean stop.
//!
//! Runs on its own [`Actor`] with its own REQ socket, so a registry that is down or slow never
//! delays members' requests. When the registry comes back (or restarts empty), the next
//! heartbeat registers the group again. A stop wakes the actor between heartbeats at once; a
//! registration in flight finishes first (at most one interval, its timeout).
//!
//! At a clean stop the group is unregistered, within 1 s; a registry that does not answer
//! then (it is gone too) costs one INFO line, and the entry expires after its TTL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_common::actor::{Actor, Pipe, Wake};
use agora_common::client::{ClientCurve, ClientError, ClientOptions, RegistryClient};
use agora_proto::wire::{Endpoint, ErrorCode, GroupName};

/// A running heartbeat actor; stops (and unregisters) when dropped.
#[derive(Debug)]
pub struct Heartbeat {
    _actor: Actor,
}

impl Heartbeat {
    /// Starts heartbeating `name` at `endpoint` to the registry at `registry` every
    /// `interval` (over CURVE with `curve`), reporting the member count read from `members`
    /// and the node's public key.
    pub fn start(
        ctx: &zmq::Context,
        registry: String,
        curve: Option<ClientCurve>,
        name: GroupName,
        endpoint: Endpoint,
        interval: Duration,
        members: Arc<AtomicU64>,
    ) -> std::io::Result<Heartbeat> {
        let own_ctx = ctx.clone();
        let actor = Actor::start(ctx, "heartbeat", move |pipe| {
            beat(
                &pipe, &own_ctx, &registry, curve, &name, &endpoint, interval, &members,
            )
        })?;
        Ok(Heartbeat { _actor: actor })
    }
}

#[allow(clippy::too_many_arguments)]
fn beat(
    pipe: &Pipe,
    ctx: &zmq::Context,
    registry: &str,
    curve: Option<ClientCurve>,
    name: &GroupName,
    endpoint: &Endpoint,
    interval: Duration,
    members: &AtomicU64,
) {
    let options = ClientOptions {
        timeout: interval.max(Duration::from_millis(100)),
        attempts: 1,
    };
    let public_key = curve.as_ref().map(|c| c.keypair.public);
    let connect = |options| {
        let client = RegistryClient::new(ctx, registry, options);
        match &curve {
            Some(c) => client.with_curve(c.clone()),
            None => client,
        }
    };
    let mut client = connect(options);
    let mut registered = false;
    let mut warned = false;
    loop {
        let next = Instant::now() + interval;
        match client.register(name, endpoint, members.load(Ordering::Relaxed), public_key) {
            Ok(_) if !registered => {
                tracing::info!(%registry, group = %name, %endpoint, "registered");
                registered = true;
            }
            Ok(_) => {}
            Err(ClientError::Server(e)) if e.code == ErrorCode::NameTaken => {
                tracing::warn!(%registry, error = %e, "registration refused; retrying");
                registered = false;
            }
            Err(e) => {
                if registered {
                    tracing::warn!(%registry, error = %e, "registry unreachable; still serving");
                } else if !warned {
                    tracing::warn!(%registry, error = %e,
                        "cannot register: registry down, or --registry-key is not its key; retrying");
                    warned = true;
                }
                registered = false;
            }
        }
        match pipe.wait_until(next) {
            Wake::Term => break,
            // No commands are defined; the next heartbeat is due.
            Wake::Command(_) | Wake::Timeout => {}
        }
    }
    if registered {
        let mut quick = connect(ClientOptions {
            timeout: Duration::from_secs(1),
            attempts: 1,
        });
        match quick.unregister(name, endpoint) {
            Ok(()) => tracing::info!(group = %name, "unregistered"),
            // The registry is gone too (a whole federation stopping): nothing to warn about.
            Err(e) => tracing::info!(group = %name, %registry, error = %e,
                "not unregistered; the registry's entry expires after its TTL"),
        }
    }
}
