//! Following groups: `subscribe`, `unsubscribe`, `check`, `watch`, and the prompt's live
//! stream; and what a session adds to the client ([`Session`]): where it prints what arrives
//! live, the presence it keeps ([`super::accounts`]), and the messages it sent itself.
//!
//! # Your own messages
//! A message of yours sent from another client (a second terminal, the web page, a one-shot
//! `user-cli send`) shows in the prompt's live stream marked as yours
//! (`[…] G #7 alice (you): hi`; in JSON with `"mine": true`); one sent from this prompt is
//! not shown again (its ack was). Your own messages never count as unread: `check` counts
//! and shows only others' entries, and marks yours seen.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_common::client::{ClientError, ClientOptions, HostPool};
use agora_common::keys::PublicKey;
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_common::shutdown::Shutdown;
use agora_proto::id::MessageId;
use agora_proto::wire::{EntryKind, ErrorCode, GroupName, HistoryQuery, Message, UserName};

use super::accounts::PresenceGuard;
use super::names::Names;
use super::{cause, lock, remote, App, CliError, Printer};
use crate::render::{self, Format, Item, Output};
use crate::state::GroupState;

/// How many ids of messages sent from this process are remembered, not to echo them.
const SENT_HERE: usize = 1024;

/// What a session (the prompt, or a script on stdin) adds to the client. Outside a session
/// (a one-shot command, `watch`) it stays empty.
#[derive(Default)]
pub(super) struct Session {
    /// Where what arrives live is printed (above the prompt, or to a script's stdout).
    printer: Option<Arc<Mutex<Printer>>>,
    /// At the prompt, presence ends with the session (`disconnect`); in a script it lapses at
    /// the TTL, as after a one-shot `connect`.
    pub(super) prompt: bool,
    /// The running presence heartbeat and direct-message inbox.
    pub(super) presence: Option<PresenceGuard>,
    /// Ids of the last [`SENT_HERE`] messages sent from this process.
    sent_here: Arc<Mutex<VecDeque<MessageId>>>,
    /// The names tab completion offers.
    pub(super) names: Names,
}

impl App {
    /// Makes this client a session's: what arrives live (group entries once
    /// [`App::start_live`] runs, direct messages once you are present) is printed through
    /// `printer`. `prompt`: an interactive prompt, whose presence ends with it; otherwise a
    /// script, whose presence (after `register` or `connect`) lapses at the TTL.
    pub fn print_live(&mut self, printer: Printer, prompt: bool) {
        self.session.printer = Some(Arc::new(Mutex::new(printer)));
        self.session.prompt = prompt;
    }

    /// Whether this client is a session's ([`App::print_live`]).
    pub(super) fn in_session(&self) -> bool {
        self.session.printer.is_some()
    }

    /// The session's printer, shared (group entries and direct messages print through one).
    pub(super) fn live_printer(&self) -> Option<Printer> {
        let shared = Arc::clone(self.session.printer.as_ref()?);
        Some(Box::new(move |line: String| {
            let mut print = shared.lock().unwrap_or_else(PoisonError::into_inner);
            (*print)(line);
        }))
    }

    /// A new message id, remembered as sent from this process: the live stream does not
    /// print that message again.
    pub(super) fn new_message_id(&self) -> MessageId {
        let id = MessageId::new_v7();
        let mut sent = self
            .session
            .sent_here
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if sent.len() == SENT_HERE {
            sent.pop_front();
        }
        sent.push_back(id);
        id
    }
}

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

    /// Stops following `group` at `endpoint` live, if a feed runs.
    pub(super) fn unfollow(&self, endpoint: &str, group: &GroupName) {
        if let Some(feed) = &self.feed {
            // That group only: the others of its host stay followed on the same connection.
            feed.remove_group(endpoint, group);
        }
    }

    /// The saved state of the group `target` names, after asking its node for its name.
    fn joined(&mut self, target: &str) -> Result<(GroupName, GroupState, String), CliError> {
        let label = target.to_owned();
        let (info, _) = self.on_node(target, |g| g.info())?;
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
        self.unfollow(&saved.endpoint, &group);
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
        // Your own messages (from this client or another) are not unread: not counted, not
        // shown, and seen with the rest.
        let me = self.user.clone();
        let theirs: Vec<&Message> = entries.iter().filter(|m| !is_mine(&me, m)).collect();
        out.emit(Item::Unread {
            group: name,
            count: theirs.len(),
        })?;
        for m in &theirs {
            out.emit(Item::Entry {
                group: &group,
                entry: m,
            })?;
        }
        self.session
            .names
            .add_users(theirs.iter().map(|m| m.sender.to_string()));
        let mut state = lock(&self.state);
        if let Some(last) = entries.last() {
            state.seen(name, last.seq);
        }
        if let Some(g) = state.state.groups.get_mut(name) {
            g.endpoint = endpoint;
        }
        Ok(())
    }

    /// Starts the live feed for every subscribed group (the prompt); entries are printed
    /// through the session's printer ([`App::print_live`]; without one nothing starts) and
    /// counted as seen. Your own messages are printed marked as yours, except those sent
    /// from this process (their ack was printed).
    ///
    /// # Errors
    /// The feed thread could not start.
    pub fn start_live(&mut self) -> std::io::Result<()> {
        let Some(mut printer) = self.live_printer() else {
            return Ok(());
        };
        let state = Arc::clone(&self.state);
        let me = self.user.clone();
        let format = self.format;
        let sent_here = Arc::clone(&self.session.sent_here);
        let names = self.session.names.clone();
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
                        let mine = is_mine(&me, &entry);
                        lock(&state).seen(group.as_str(), entry.seq);
                        let here = mine
                            && sent_here
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .contains(&entry.id);
                        if !mine {
                            names.add_users([entry.sender.to_string()]);
                        }
                        if let Some(line) =
                            live_line(format, &group, &entry, mine).filter(|_| !here)
                        {
                            printer(line);
                        }
                        // After the line is shown (a save may wait up to 2 s for another
                        // process's lock), and not under the mutex: the prompt's commands
                        // and completion go on while the file is locked, read and synced.
                        if last_save.elapsed() > Duration::from_millis(500) {
                            crate::state::save_shared(&state);
                            last_save = Instant::now();
                        }
                    }
                    FeedEvent::Error {
                        label,
                        error,
                        fatal,
                    } => {
                        if fatal {
                            printer(
                                render::escape_controls(&format!(
                                    "user-cli: {label}: {}",
                                    cause(&error)
                                ))
                                .into_owned(),
                            );
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
        // From now on requests go over the feed's connections (one per host): the pool's,
        // opened by the session's opening `check`, are closed.
        self.hosts = HostPool::new(
            &self.ctx,
            self.user.clone(),
            self.keypair.clone(),
            self.options,
        );
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
            let curve = self.node_curve(target, r.key)?;
            // Every spec names its group: on a group host the endpoint alone does not.
            let group = match r.name {
                Some(name) => name,
                None => self.served_group(target, &r.endpoint, curve)?,
            };
            feed.add(GroupSpec {
                label: target.clone(),
                endpoint: r.endpoint.to_string(),
                group: Some(group),
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
                    let said = format!("user-cli: {label}: {}", cause(&error));
                    eprintln!("{}", render::escape_controls(&said));
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

/// Whether `entry` is a message `me` sent (from any client).
fn is_mine(me: &UserName, entry: &Message) -> bool {
    entry.sender == *me && entry.kind == EntryKind::Message
}

/// The live stream's line for `entry`: as [`render::line`] prints it, and for one of your own
/// (`mine`) marked as yours: `[…] G #7 alice (you): hi`, or in JSON with `"mine": true`.
fn live_line(format: Format, group: &GroupName, entry: &Message, mine: bool) -> Option<String> {
    let line = render::line(format, &Item::Entry { group, entry })?;
    if !mine {
        return Some(line);
    }
    match format {
        Format::Human => {
            let head = format!(
                "[{}] {group} #{} {}",
                render::local_time(entry.time),
                entry.seq,
                entry.sender
            );
            let head = render::escape_controls(&head);
            Some(match line.strip_prefix(head.as_ref()) {
                Some(rest) => format!("{head} (you){rest}"),
                None => line,
            })
        }
        Format::Json => Some(match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(serde_json::Value::Object(mut object)) => {
                object.insert("mine".into(), serde_json::Value::Bool(true));
                serde_json::Value::Object(object).to_string()
            }
            _ => line,
        }),
    }
}

fn feed_options(client: ClientOptions) -> FeedOptions {
    FeedOptions {
        client,
        ..FeedOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn entry(sender: &str, kind: EntryKind) -> Message {
        Message {
            seq: 7,
            id: MessageId::new_v7(),
            time: agora_proto::time::Timestamp::now(),
            sender: UserName::new(sender).expect("name"),
            kind,
            body: RawValue::from_string("\"hi there\"".into()).expect("json"),
            sender_key: None,
            attachment: None,
        }
    }

    /// Issue 23: your own message from another client shows in the prompt marked as yours;
    /// others' lines are as `render` prints them.
    #[test]
    fn your_own_messages_are_marked_as_yours() {
        let me = UserName::new("alice").expect("name");
        let group = GroupName::new("Cool Group").expect("group");
        let own = entry("alice", EntryKind::Message);
        let other = entry("bob", EntryKind::Message);
        assert!(is_mine(&me, &own));
        assert!(!is_mine(&me, &other));
        assert!(!is_mine(&me, &entry("alice", EntryKind::Join)));

        let line = live_line(Format::Human, &group, &own, true).expect("line");
        assert!(
            line.ends_with(" Cool Group #7 alice (you): hi there"),
            "{line}"
        );
        let line = live_line(Format::Human, &group, &other, false).expect("line");
        assert!(line.ends_with(" Cool Group #7 bob: hi there"), "{line}");

        let json: serde_json::Value =
            serde_json::from_str(&live_line(Format::Json, &group, &own, true).expect("line"))
                .expect("json");
        assert_eq!(json["mine"], true);
        assert_eq!(json["sender"], "alice");
        assert_eq!(json["group"], "Cool Group");
        let json: serde_json::Value =
            serde_json::from_str(&live_line(Format::Json, &group, &other, false).expect("line"))
                .expect("json");
        assert!(json.get("mine").is_none());
    }
}
