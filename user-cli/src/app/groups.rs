//! The group commands: `groups`, `join`, `leave`, `members`, `send`, `messages`, and the
//! owner's and admins' policy commands.

use agora_common::client::GroupClient;
use agora_common::keys::PublicKey;
use agora_proto::wire::{UserName, REQUEST_OVERHEAD_BYTES};
use serde_json::value::RawValue;

use super::{history_query, lock, remote, App, CliError, HistoryArgs};
use crate::render::{Item, Output};
use crate::state::GroupState;

impl App {
    /// `get_group_list` / `groups`.
    ///
    /// # Errors
    /// The registry's failure.
    pub fn groups(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let groups = self.registry.list().map_err(|e| self.registry_error(e))?;
        self.session
            .names
            .add_groups(groups.iter().map(|g| g.name.to_string()));
        if groups.is_empty() {
            out.emit(Item::NoGroups)?;
        } else {
            out.emit(Item::Groups(&groups))?;
        }
        Ok(())
    }

    /// `join_group` / `join`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn join(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let label = target.to_owned();
        let (r, endpoint) = self.on_node(target, GroupClient::join)?;
        let key = self.node_keys.get(&endpoint).copied();
        let last_seen = {
            let mut state = lock(&self.state);
            state.joined(r.group.as_str());
            let g = state
                .state
                .groups
                .entry(r.group.to_string())
                .or_insert(GroupState {
                    endpoint: endpoint.clone(),
                    last_seen: r.last_seq,
                    subscribed: true,
                    public_key: key,
                });
            g.endpoint = endpoint.clone();
            g.public_key = key;
            g.subscribed = true;
            g.last_seen
        };
        self.save_state();
        self.follow(&label, &endpoint, &r.group, last_seen, key);
        out.emit(Item::Joined(&r))?;
        Ok(())
    }

    /// `leave_group` / `leave`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn leave(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (r, endpoint) = self.on_node(target, GroupClient::leave)?;
        lock(&self.state).state.groups.remove(r.group.as_str());
        self.save_state();
        if let Some(feed) = &self.feed {
            feed.remove(&endpoint);
        }
        out.emit(Item::Left(&r))?;
        Ok(())
    }

    /// `admin stop GROUP`: the node drains, unregisters and exits.
    ///
    /// # Errors
    /// `forbidden` for a key that is neither the owner's nor the node's; resolution or node
    /// failures.
    pub fn admin_stop(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        self.on_node(target, GroupClient::stop)?;
        out.emit(Item::Stopping(target))?;
        Ok(())
    }

    /// `members`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn members(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (r, _) = self.on_node(target, GroupClient::members)?;
        out.emit(Item::Members(&r.members))?;
        Ok(())
    }

    /// `send_message` / `send`: sends `body` (JSON text) to the group.
    ///
    /// # Errors
    /// [`CliError::TooLarge`] before sending when the body is over the node's limit;
    /// resolution or node failures.
    pub fn send(
        &mut self,
        target: &str,
        body: String,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let label = target.to_owned();
        let body = RawValue::from_string(body)
            .map_err(|e| CliError::Usage(format!("body is not JSON: {e}")))?;
        let len = body.get().len();
        // One id for every try, so that a retry at a moved node is stored once.
        let id = self.new_message_id();
        let (sent, _) = self.on_node(target, |node| {
            // Past the overhead room, libzmq would drop the connection instead of letting
            // the node answer `too_large`: ask for the limit first and refuse here.
            if len > REQUEST_OVERHEAD_BYTES {
                let max = node.info()?.max_message_bytes;
                if len as u64 > max {
                    return Ok(Err(max));
                }
            }
            node.send_with_id(body.clone(), id).map(Ok)
        })?;
        let ack = sent.map_err(|max| CliError::TooLarge {
            target: label.clone(),
            len: Some(len),
            max,
        })?;
        out.emit(Item::Sent {
            group: &label,
            ack: &ack,
        })?;
        Ok(())
    }

    /// The node's limit on a message body, in bytes (`info`), or `None` when it cannot be
    /// asked (the send that follows reports why). `send` asks only when its input passed
    /// [`crate::command::MAX_INPUT_BYTES`].
    pub fn max_message_bytes(&mut self, target: &str) -> Option<u64> {
        self.on_node(target, |node| node.info().map(|i| i.max_message_bytes))
            .ok()
            .map(|(max, _)| max)
    }

    /// `get_messages` / `messages`: every matching message, fetched page by page.
    ///
    /// # Errors
    /// [`CliError::Usage`] for a bad time or id, or two selectors; resolution or node
    /// failures.
    pub fn messages(
        &mut self,
        target: &str,
        args: &HistoryArgs,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let query = history_query(args)?;
        // A cheap request first, so that a stale saved endpoint is corrected before any
        // page is printed (a retry mid-stream would print pages twice).
        self.on_node(target, GroupClient::info)?;
        let (node, label) = self.node(target)?;
        let mut write_err = None;
        let mut count = 0usize;
        node.for_each_page(query, None, |page| {
            for m in &page.messages {
                count += 1;
                if let Err(e) = out.emit(Item::Message {
                    group: &page.group,
                    entry: m,
                }) {
                    write_err = Some(e);
                    return false;
                }
            }
            true
        })
        .map_err(|source| remote(&label, source))?;
        if let Some(e) = write_err {
            return Err(e.into());
        }
        if count == 0 {
            out.emit(Item::NoMessages)?;
        }
        Ok(())
    }
}

/// A policy change a user can ask for.
#[derive(Debug, Clone)]
pub enum PolicyChange {
    /// `invite GROUP KEY`.
    Invite(PublicKey),
    /// `ban GROUP KEY`.
    Ban(PublicKey),
    /// `unban GROUP KEY`.
    Unban(PublicKey),
    /// `kick GROUP USER`.
    Kick(UserName),
    /// `promote GROUP USER`.
    Promote(UserName),
    /// `set_mode GROUP open|private`.
    SetMode(agora_proto::wire::GroupMode),
}

/// What a change does, in the command's words, a key or name last (`invite KEY`): a Z85
/// key holds brackets of its own, so none is printed next to it.
impl std::fmt::Display for PolicyChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyChange::Invite(k) => write!(f, "invite {k}"),
            PolicyChange::Ban(k) => write!(f, "ban {k}"),
            PolicyChange::Unban(k) => write!(f, "unban {k}"),
            PolicyChange::Kick(u) => write!(f, "kick {u}"),
            PolicyChange::Promote(u) => write!(f, "promote {u}"),
            PolicyChange::SetMode(m) => write!(f, "set_mode {}", m.as_str()),
        }
    }
}

impl App {
    /// `invite`, `ban`, `unban`, `kick`, `promote`, `set_mode`.
    ///
    /// # Errors
    /// `forbidden` and the like from the node; resolution failures.
    pub fn policy(
        &mut self,
        target: &str,
        change: PolicyChange,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        use agora_proto::action::call;
        let label = target.to_owned();
        let what = change.to_string();
        let (r, _) = self.on_node(target, |node| match &change {
            PolicyChange::Invite(k) => node.key_policy::<call::Invite>(*k),
            PolicyChange::Ban(k) => node.key_policy::<call::Ban>(*k),
            PolicyChange::Unban(k) => node.key_policy::<call::Unban>(*k),
            PolicyChange::Kick(u) => node.member_policy::<call::Kick>(u.clone()),
            PolicyChange::Promote(u) => node.member_policy::<call::Promote>(u.clone()),
            PolicyChange::SetMode(m) => node.set_mode(*m),
        })?;
        out.emit(Item::Policy {
            group: &label,
            what: &what,
            reply: &r,
        })?;
        Ok(())
    }
}
