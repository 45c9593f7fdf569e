//! Following groups: `subscribe`, `unsubscribe`, `check`, `watch`, and the prompt's live
//! stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_common::keys::PublicKey;
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_common::shutdown::Shutdown;
use agora_proto::wire::{EntryKind, ErrorCode, GroupName, HistoryQuery};

use super::{cause, lock, remote, App, CliError, Printer};
use crate::render::{self, Item, Output};
use crate::state::GroupState;

impl App {
    /// Adds a group to the live feed, if one runs (interactive mode).
    pub(super) fn follow(
        &self,
        label: &str,
        endpoint: &str,
        group: &GroupName,
        after_seq: u64,
        server_key: Option<PublicKey>,
    ) {
        if let Some(feed) = &self.feed {
            feed.add(GroupSpec {
                label: label.to_owned(),
                endpoint: endpoint.to_owned(),
                group: Some(group.clone()),
                after_seq: Some(after_seq),
                server_key,
            });
        }
    }

    /// The saved state of the group `target` names, after asking its node for its name.
    fn joined(&mut self, target: &str) -> Result<(GroupName, GroupState, String), CliError> {
        let label = target.to_owned();
        let (info, _) = self.on_node(target, GroupClient::info)?;
        let saved = lock(&self.state)
            .state
            .groups
            .get(info.group.as_str())
            .cloned();
        match saved {
            Some(g) => Ok((info.group, g, label)),
            None => Err(CliError::Usage(format!(
                "{label}: not joined from this client; join it first"
            ))),
        }
    }

    /// `subscribe`: follow a joined group live (the default after `join`).
    ///
    /// # Errors
    /// [`CliError::Usage`] if the group was not joined from this client; node failures.
    pub fn subscribe(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (group, saved, label) = self.joined(target)?;
        if let Some(g) = lock(&self.state).state.groups.get_mut(group.as_str()) {
            g.subscribed = true;
        }
        self.save_state();
        self.follow(
            &label,
            &saved.endpoint,
            &group,
            saved.last_seen,
            saved.public_key,
        );
        out.emit(Item::Following {
            group: &group,
            on: true,
        })?;
        Ok(())
    }

    /// `unsubscribe`: stop following a group live, without leaving it.
    ///
    /// # Errors
    /// [`CliError::Usage`] if the group was not joined from this client; node failures.
    pub fn unsubscribe(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (group, saved, _) = self.joined(target)?;
        if let Some(g) = lock(&self.state).state.groups.get_mut(group.as_str()) {
            g.subscribed = false;
        }
        self.save_state();
        if let Some(feed) = &self.feed {
            feed.remove(&saved.endpoint);
        }
        out.emit(Item::Following {
            group: &group,
            on: false,
        })?;
        Ok(())
    }

    /// `check`: for every group joined from this client, the number of entries not yet
    /// shown and the entries themselves; then they count as seen.
    ///
    /// # Errors
    /// The first group's failure (the others are still checked).
    pub fn check(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let groups: Vec<(String, GroupState)> = lock(&self.state)
            .state
            .groups
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if groups.is_empty() {
            out.emit(Item::NoGroupsJoined)?;
        }
        // Direct messages, when this key has an account (seed 003's !check).
        if self.keypair.is_some() {
            match self.show_mailbox(out) {
                Ok(n) => out.emit(Item::DmsShown(n))?,
                Err(CliError::Remote {
                    source: ClientError::Server(w),
                    ..
                }) if w.code == ErrorCode::UnknownUser => {}
                Err(e) => tracing::debug!(error = %e, "no mailbox"),
            }
        }
        let mut first_error = None;
        for (name, saved) in groups {
            if let Err(e) = self.check_one(&name, &saved, out) {
                if first_error.is_none() {
                    first_error = Some(e);
                } else {
                    eprintln!("user-cli: {e}");
                }
            }
        }
        self.save_state();
        first_error.map_or(Ok(()), Err)
    }

    fn check_one(
        &mut self,
        name: &str,
        saved: &GroupState,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let group = GroupName::new(name).map_err(|e| CliError::Usage(e.to_string()))?;
        let after = saved.last_seen;
        let (entries, endpoint) = self.on_node(name, |node| {
            let mut entries = Vec::new();
            node.for_each_page(HistoryQuery::AfterSeq(after), None, |page| {
                entries.extend(page.messages.iter().cloned());
                entries.len() < 10_000
            })
            .map(|()| entries)
        })?;
        out.emit(Item::Unread {
            group: name,
            count: entries.len(),
        })?;
        for m in &entries {
            out.emit(Item::Entry {
                group: &group,
                entry: m,
            })?;
        }
        let mut state = lock(&self.state);
        if let Some(last) = entries.last() {
            state.seen(name, last.seq);
        }
        if let Some(g) = state.state.groups.get_mut(name) {
            g.endpoint = endpoint;
        }
        Ok(())
    }

    /// Starts the live feed for every subscribed group (interactive mode); entries are
    /// printed through `printer` (the user's own messages are not: their ack was) and
    /// counted as seen.
    ///
    /// # Errors
    /// The feed thread could not start.
    pub fn start_live(&mut self, mut printer: Printer) -> std::io::Result<()> {
        let state = Arc::clone(&self.state);
        let me = self.user.clone();
        let format = self.format;
        let mut last_save = Instant::now();
        // Printed on the feed's own thread: no relay thread between the feed and the screen.
        let locate = self.locator();
        let feed = Feed::with_locator(
            &self.ctx,
            self.user.clone(),
            self.keypair.clone(),
            feed_options(self.options),
            Some(locate),
            move |event| {
                match event {
                    FeedEvent::Entry { group, entry, .. } => {
                        let mine = entry.sender == me && entry.kind == EntryKind::Message;
                        let mut s = lock(&state);
                        s.seen(group.as_str(), entry.seq);
                        if last_save.elapsed() > Duration::from_millis(500) {
                            let _ = s.save();
                            last_save = Instant::now();
                        }
                        drop(s);
                        let item = Item::Entry {
                            group: &group,
                            entry: &entry,
                        };
                        if let Some(line) = render::line(format, &item).filter(|_| !mine) {
                            printer(line);
                        }
                    }
                    FeedEvent::Error {
                        label,
                        error,
                        fatal,
                    } => {
                        if fatal {
                            printer(format!("user-cli: {label}: {}", cause(&error)));
                        } else {
                            tracing::debug!(%label, %error, "live stream trouble");
                        }
                    }
                    FeedEvent::Subscribed { .. } => {}
                }
                true
            },
        )?;
        let subscribed: Vec<(String, GroupState)> = lock(&self.state)
            .state
            .groups
            .iter()
            .filter(|(_, g)| g.subscribed)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, g) in subscribed {
            // The saved endpoint, with no registry round trip: the session's opening `check`
            // has just corrected any that went stale.
            feed.add(GroupSpec {
                label: name.clone(),
                endpoint: g.endpoint.clone(),
                group: GroupName::new(name).ok(),
                after_seq: Some(g.last_seen),
                server_key: g.public_key,
            });
        }
        self.feed = Some(feed);
        Ok(())
    }

    /// `watch GROUP...`: prints every new entry of the groups until `stop` is set, or every
    /// group refused the subscription. Starts after `after_seq` (default: from now).
    ///
    /// # Errors
    /// Resolution failures; the last refusal when every group refused.
    pub fn watch(
        &mut self,
        targets: &[String],
        after_seq: Option<u64>,
        out: &mut Output<'_>,
        stop: &Shutdown,
    ) -> Result<(), CliError> {
        let (events, receiver) = std::sync::mpsc::sync_channel(1024);
        let feed = Feed::with_locator(
            &self.ctx,
            self.user.clone(),
            self.keypair.clone(),
            feed_options(self.options),
            Some(self.locator()),
            move |event| events.send(event).is_ok(),
        )?;
        // Declared after the feed, so dropped before it (see `Feed::start`).
        let rx = receiver;
        for target in targets {
            let r = self.resolve(target)?;
            self.node_curve(target, r.key)?;
            feed.add(GroupSpec {
                label: target.clone(),
                endpoint: r.endpoint.to_string(),
                group: r.name,
                after_seq,
                server_key: r.key,
            });
        }
        let mut active = targets.len();
        while !stop.is_triggered() {
            let event = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(e) => e,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            match event {
                FeedEvent::Entry { group, entry, .. } => {
                    out.emit(Item::Entry {
                        group: &group,
                        entry: &entry,
                    })?;
                    out.flush()?;
                }
                FeedEvent::Subscribed {
                    label, last_seq, ..
                } => {
                    eprintln!("watching {label} from seq {last_seq}");
                }
                FeedEvent::Error {
                    label,
                    error,
                    fatal,
                } => {
                    eprintln!("user-cli: {label}: {}", cause(&error));
                    if fatal {
                        active -= 1;
                        if active == 0 {
                            return Err(remote(&label, error));
                        }
                    }
                }
            }
        }
        // The receiver first: a feed waiting on a full channel then sees it closed and
        // stops, so dropping the feed cannot wait on this thread.
        drop(rx);
        drop(feed);
        Ok(())
    }
}

fn feed_options(client: ClientOptions) -> FeedOptions {
    FeedOptions {
        client,
        ..FeedOptions::default()
    }
}
