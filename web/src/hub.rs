//! Live entries fanned out: one `common::live` feed per identity, subscribed once per group
//! at the node, shared by every session of that identity (in personal mode, every tab). The
//! feed holds one connection per group host, whatever the number of its groups followed.
//!
//! The feed's handler encodes each event once, as the page receives it, and hands the same
//! bytes to each following session through a bounded [`tokio::sync::broadcast`] channel per
//! group ([`GROUP_CHANNEL`] events). A session that falls behind (its page reads slowly)
//! loses the oldest events of its channel, never anyone else's, and reads the gap back from
//! the log (`history after_seq`) before it goes on: entries still reach each page in seq
//! order, exactly once. This is the zguide's Clone pattern again, one level up: live pushes
//! plus a catch-up from the sequenced log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_proto::wire::{GroupName, UserName};
use axum::extract::ws::Utf8Bytes;
use serde_json::json;
use tokio::sync::broadcast;

use crate::bridge::{Federation, Identity, PooledContext};

/// Events a group's channel holds for its slowest session: 1,024.
pub const GROUP_CHANNEL: usize = 1024;

/// One event of a group's live stream, encoded once for every session.
#[derive(Debug, Clone)]
pub struct Event {
    /// The entry's seq; `None` for `subscribed` and `error` events.
    pub seq: Option<u64>,
    /// The event as the page receives it (docs/WEB.md §4).
    pub text: Utf8Bytes,
    /// An `error` event after which the group is no longer followed.
    pub fatal: bool,
    /// A `subscribed` event: the node's last seq when the feed subscribed (entries up to it
    /// are not pushed; a session behind it reads them from the log).
    pub subscribed: Option<u64>,
}

/// A group's channel and its feed's latest `subscribed` event (a session that follows later
/// gets it too).
struct Channel {
    tx: broadcast::Sender<Event>,
    subscribed: Option<Event>,
}

type Channels = Arc<Mutex<HashMap<GroupName, Channel>>>;

/// One identity's feed and its groups.
struct Follower {
    feed: Feed,
    channels: Channels,
    endpoints: HashMap<GroupName, String>,
    _ctx: PooledContext,
}

/// Every identity's live feed.
#[derive(Default)]
pub struct Hub {
    followers: Mutex<HashMap<(UserName, agora_common::keys::PublicKey), Follower>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.followers.lock().map(|f| f.len()).unwrap_or(0);
        f.debug_struct("Hub").field("identities", &n).finish()
    }
}

fn key(identity: &Identity) -> (UserName, agora_common::keys::PublicKey) {
    (identity.user.clone(), identity.keypair.public)
}

/// A feed event as the page receives it.
fn encode(event: FeedEvent) -> Option<(GroupName, Event)> {
    Some(match event {
        FeedEvent::Entry {
            group, entry, live, ..
        } => {
            let seq = entry.seq;
            let text = json!({"event": "entry", "group": group, "entry": entry, "live": live});
            (
                group,
                Event {
                    seq: Some(seq),
                    text: text.to_string().into(),
                    fatal: false,
                    subscribed: None,
                },
            )
        }
        FeedEvent::Subscribed {
            group, last_seq, ..
        } => {
            let text = json!({"event": "subscribed", "group": group, "last_seq": last_seq});
            (
                group,
                Event {
                    seq: None,
                    text: text.to_string().into(),
                    fatal: false,
                    subscribed: Some(last_seq),
                },
            )
        }
        FeedEvent::Error {
            label,
            error,
            fatal,
        } => {
            let text = json!({"event": "error", "group": label, "message": error.to_string(), "fatal": fatal});
            // The label is the group's name (see `follow`).
            let group = label.parse().ok()?;
            (
                group,
                Event {
                    seq: None,
                    text: text.to_string().into(),
                    fatal,
                    subscribed: None,
                },
            )
        }
    })
}

impl Hub {
    /// A receiver of `group`'s live events for `identity`, subscribing the identity's feed
    /// (started on its first group) at `endpoint` if no session of it follows the group yet;
    /// and the feed's latest `subscribed` event for the group, if it subscribed already.
    /// Release it with [`Hub::release`] once dropped.
    ///
    /// # Errors
    /// The feed's thread could not start.
    pub fn follow(
        &self,
        federation: &Federation,
        identity: &Identity,
        group: &GroupName,
        endpoint: &str,
        server_key: Option<agora_common::keys::PublicKey>,
    ) -> std::io::Result<(broadcast::Receiver<Event>, Option<Event>)> {
        let mut followers = self
            .followers
            .lock()
            .map_err(|_| std::io::Error::other("the hub's lock is poisoned"))?;
        let follower = match followers.entry(key(identity)) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let ctx = federation.contexts.take();
                let channels: Channels = Arc::default();
                let senders = Arc::clone(&channels);
                // On the feed's thread: never blocks (a broadcast drops the oldest for a
                // session that lags).
                // Following a group that moves to a standby (PROTOCOL §11.2).
                let locate = agora_common::live::registry_locator(
                    ctx.context(),
                    &federation.registry,
                    Some(federation.curve(identity)),
                    federation.options(),
                );
                let feed = Feed::with_locator(
                    ctx.context(),
                    identity.user.clone(),
                    Some(identity.keypair.clone()),
                    FeedOptions::default(),
                    Some(locate),
                    move |event| {
                        let Some((group, event)) = encode(event) else {
                            return true;
                        };
                        if let Ok(mut channels) = senders.lock() {
                            let fatal = event.fatal;
                            if let Some(channel) = channels.get_mut(&group) {
                                if event.subscribed.is_some() {
                                    channel.subscribed = Some(event.clone());
                                }
                                let _ = channel.tx.send(event);
                            }
                            // The feed dropped the group: the next follow starts afresh.
                            if fatal {
                                channels.remove(&group);
                            }
                        }
                        true
                    },
                )?;
                v.insert(Follower {
                    feed,
                    channels,
                    endpoints: HashMap::new(),
                    _ctx: ctx,
                })
            }
        };
        let mut channels = follower
            .channels
            .lock()
            .map_err(|_| std::io::Error::other("the hub's lock is poisoned"))?;
        if let Some(channel) = channels.get(group) {
            return Ok((channel.tx.subscribe(), channel.subscribed.clone()));
        }
        let (tx, rx) = broadcast::channel(GROUP_CHANNEL);
        channels.insert(
            group.clone(),
            Channel {
                tx,
                subscribed: None,
            },
        );
        drop(channels);
        follower
            .endpoints
            .insert(group.clone(), endpoint.to_owned());
        follower.feed.add(GroupSpec {
            label: group.as_str().to_owned(),
            endpoint: endpoint.to_owned(),
            group: Some(group.clone()),
            after_seq: None,
            server_key,
        });
        Ok((rx, None))
    }

    /// A session stopped following `group` (its receiver is dropped): when no session of
    /// `identity` follows it any more, the feed unsubscribes; with no group left, the feed
    /// stops.
    pub fn release(&self, identity: &Identity, group: &GroupName) {
        let Ok(mut followers) = self.followers.lock() else {
            return;
        };
        let k = key(identity);
        let Some(follower) = followers.get_mut(&k) else {
            return;
        };
        if let Ok(mut channels) = follower.channels.lock() {
            if channels
                .get(group)
                .is_some_and(|channel| channel.tx.receiver_count() == 0)
            {
                channels.remove(group);
            }
            if !channels.contains_key(group) {
                if let Some(endpoint) = follower.endpoints.remove(group) {
                    // This group only: the host's other groups keep its connection.
                    follower.feed.remove_group(&endpoint, group);
                }
            }
        }
        let idle = follower
            .channels
            .lock()
            .map(|c| c.is_empty())
            .unwrap_or(true);
        let stopped = if idle { followers.remove(&k) } else { None };
        drop(followers);
        // Joining the feed's thread happens outside the hub's lock.
        drop(stopped);
    }
}
