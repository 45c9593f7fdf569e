//! One session's following of one group: the hub's shared events, made exactly-once and
//! gap-free for this page.
//!
//! A [`Forwarder`] first reads the log after the page's `after_seq` (if it gave one), then
//! passes on the hub's events, skipping entries it already sent. When the hub's channel
//! dropped events for it (the page read slowly: [`broadcast::error::RecvError::Lagged`]), or
//! an entry arrives past the next seq, it reads the gap back from the log before going on.
//! The same when the feed (re)subscribes at the node past what the page has (a
//! `subscribed` event). So the page sees each seq once, in order, whatever its speed.

use std::sync::Arc;

use agora_proto::wire::GroupName;
use axum::extract::ws::Utf8Bytes;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use crate::bridge::{Identity, Session};
use crate::hub::{Event, Hub};
use crate::wire::Request;

/// Entries read from the log per request while catching up: 1,000.
const CATCH_UP_PAGE: u32 = 1000;

/// One session following one group.
pub struct Forwarder {
    /// Where the shared feeds are (released when this ends).
    pub hub: Arc<Hub>,
    /// Whom the session acts as.
    pub identity: Arc<Identity>,
    /// The session's bridge, to read gaps from the log.
    pub bridge: Session,
    /// The group.
    pub group: GroupName,
    /// The session's outgoing events.
    pub out: mpsc::Sender<Utf8Bytes>,
}

/// Hands the hub its receiver back when the forwarder ends (or is aborted).
struct Release {
    hub: Arc<Hub>,
    identity: Arc<Identity>,
    group: GroupName,
    receiver: Option<broadcast::Receiver<Event>>,
}

impl Drop for Release {
    fn drop(&mut self) {
        // The receiver first, so the hub sees it gone.
        drop(self.receiver.take());
        self.hub.release(&self.identity, &self.group);
    }
}

impl Forwarder {
    /// Runs until the session unfollows or ends, or the group's feed fails for good.
    /// `subscribed` is the feed's `subscribed` event when it came before this receiver.
    pub async fn run(
        self,
        receiver: broadcast::Receiver<Event>,
        subscribed: Option<Event>,
        after_seq: Option<u64>,
    ) {
        let mut release = Release {
            hub: Arc::clone(&self.hub),
            identity: Arc::clone(&self.identity),
            group: self.group.clone(),
            receiver: Some(receiver),
        };
        let mut last = after_seq;
        if let Some(from) = after_seq {
            match self.catch_up(from, None).await {
                Some(now) => last = Some(now),
                None => return,
            }
        }
        let Some(receiver) = release.receiver.as_mut() else {
            return;
        };
        let mut first = subscribed;
        loop {
            let received = match first.take() {
                Some(event) => Ok(event),
                None => receiver.recv().await,
            };
            let event = match received {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(group = %self.group, missed, "a page lagged; reading the log");
                    if let Some(from) = last {
                        match self.catch_up(from, None).await {
                            Some(now) => last = Some(now),
                            None => return,
                        }
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if let Some(at) = event.subscribed {
                // The node pushes what comes after `at`; what this page lacks up to it is
                // read from the log. A page following "from now on" starts there.
                last = match last {
                    Some(l) if l < at => match self.catch_up(l, Some(at)).await {
                        Some(now) => Some(now),
                        None => return,
                    },
                    Some(l) => Some(l),
                    None => Some(at),
                };
            }
            let Some(seq) = event.seq else {
                if self.out.send(event.text).await.is_err() || event.fatal {
                    return;
                }
                continue;
            };
            match last {
                Some(l) if seq <= l => continue,
                Some(l) if seq > l + 1 => match self.catch_up(l, Some(seq - 1)).await {
                    Some(now) => last = Some(now),
                    None => return,
                },
                _ => {}
            }
            if last.is_some_and(|l| seq <= l) {
                continue;
            }
            if self.out.send(event.text).await.is_err() {
                return;
            }
            last = Some(seq);
        }
    }

    /// Sends the log's entries after `from` (up to `until`, or to the end) as `entry` events
    /// with `live: false`; returns the last seq sent (or `from`), `None` when the session is
    /// gone or the log cannot be read (an `error` event then says why).
    async fn catch_up(&self, mut from: u64, until: Option<u64>) -> Option<u64> {
        loop {
            let reply = self
                .bridge
                .call(Request::History {
                    group: self.group.clone(),
                    after_seq: Some(from),
                    before_seq: None,
                    limit: Some(CATCH_UP_PAGE),
                })
                .await;
            let Some(messages) = reply.0.get("messages").and_then(|m| m.as_array()) else {
                let message = reply.0.get("message").cloned().unwrap_or_default();
                let error = json!({"event": "error", "group": self.group, "message": message, "fatal": true});
                let _ = self.out.send(error.to_string().into()).await;
                return None;
            };
            if messages.is_empty() {
                return Some(from);
            }
            for entry in messages {
                let Some(seq) = entry.get("seq").and_then(serde_json::Value::as_u64) else {
                    continue;
                };
                if seq <= from {
                    continue;
                }
                if until.is_some_and(|u| seq > u) {
                    return Some(from);
                }
                let text =
                    json!({"event": "entry", "group": self.group, "entry": entry, "live": false});
                self.out.send(text.to_string().into()).await.ok()?;
                from = seq;
            }
            if until.is_some_and(|u| from >= u) {
                return Some(from);
            }
        }
    }
}
