//! The group commands: `groups`, `join`, `leave`, `create`, `delete`, `members`, `send`,
//! `messages`, and the owner's and admins' policy commands.

use agora_common::keys::PublicKey;
use agora_proto::action::call;
use agora_proto::wire::{Endpoint, GroupMode, GroupName, UserName, REQUEST_OVERHEAD_BYTES};
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
        let (r, endpoint) = self.on_node(target, |g| g.join())?;
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
        let (r, endpoint) = self.on_node(target, |g| g.leave())?;
        lock(&self.state).state.groups.remove(r.group.as_str());
        self.save_state();
        self.unfollow(&endpoint, &r.group);
        out.emit(Item::Left(&r))?;
        Ok(())
    }

    /// `create NAME [--mode M] [--host ENDPOINT] [--host-key KEY]`: a new group on a group
    /// host, owned by this key; it is saved as joined and followed live, as after `join`.
    /// The host is `host` (`--host`, or `AGORA_HOST`), else the one endpoint every group
    /// joined from this client is at; its key `host_key`, else one known for that endpoint
    /// (a joined group's, or the registry's listing).
    ///
    /// # Errors
    /// [`CliError::Usage`] for no host or a bad one, or no key for it; the host's refusal
    /// (`forbidden`, `limit_reached`, `name_taken`, `invalid_field`; exit 1) or silence
    /// (exit 3), naming the group.
    pub fn create(
        &mut self,
        name: &GroupName,
        mode: GroupMode,
        host: Option<&str>,
        host_key: Option<PublicKey>,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let endpoint = match host {
            Some(host) => Endpoint::from_host_port(host)
                .map_err(|e| CliError::Usage(format!("--host {host:?}: {e}")))?,
            None => self.only_host(name)?,
        };
        let key = match host_key {
            Some(key) => Some(key),
            None => self.key_of(&endpoint),
        };
        self.check_host(name.as_str(), &endpoint, key)?;
        let options = self.options;
        let created = self
            .over_host(&endpoint, key, options, |host| host.create(name, mode))
            .map_err(|source| remote(name.as_str(), source))?;
        {
            let mut state = lock(&self.state);
            state.joined(created.group.as_str());
            state.state.groups.insert(
                created.group.to_string(),
                GroupState {
                    endpoint: endpoint.to_string(),
                    last_seen: created.last_seq,
                    subscribed: true,
                    public_key: key,
                },
            );
        }
        self.save_state();
        self.session.names.add_groups([created.group.to_string()]);
        self.follow(
            created.group.as_str(),
            endpoint.as_str(),
            &created.group,
            created.last_seq,
            key,
        );
        out.emit(Item::Created {
            reply: &created,
            host: &endpoint,
        })?;
        Ok(())
    }

    /// The one endpoint every group joined from this client is at: where `create` goes
    /// without `--host`.
    ///
    /// # Errors
    /// [`CliError::Usage`] naming `--host` when no group is joined, or they are at several.
    fn only_host(&self, name: &GroupName) -> Result<Endpoint, CliError> {
        let endpoints: std::collections::BTreeSet<String> = lock(&self.state)
            .state
            .groups
            .values()
            .map(|g| g.endpoint.clone())
            .collect();
        let mut endpoints = endpoints.into_iter();
        match (endpoints.next(), endpoints.next()) {
            (Some(only), None) => Endpoint::new(only).map_err(|e| CliError::Usage(e.to_string())),
            (None, _) => Err(CliError::Usage(format!(
                "create {name}: which group host? Pass --host IP:PORT (or set AGORA_HOST)"
            ))),
            (Some(_), Some(_)) => Err(CliError::Usage(format!(
                "create {name}: your groups are on several hosts; pass --host IP:PORT (or set \
                 AGORA_HOST)"
            ))),
        }
    }

    /// `delete GROUP` (confirmed by the caller): the host archives the group and frees its
    /// name; it is forgotten here and no longer followed.
    ///
    /// # Errors
    /// `forbidden` (not the owner, or a node of one group), `unknown_group`; resolution
    /// failures; the host's silence (exit 3).
    pub fn delete(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (deleted, endpoint) = self.on_node(target, |g| g.delete())?;
        lock(&self.state)
            .state
            .groups
            .remove(deleted.group.as_str());
        self.save_state();
        self.unfollow(&endpoint, &deleted.group);
        out.emit(Item::Deleted(&deleted))?;
        Ok(())
    }

    /// `admin stop GROUP`: the node drains, unregisters and exits.
    ///
    /// # Errors
    /// `forbidden` for a key that is neither the owner's nor the node's; resolution or node
    /// failures.
    pub fn admin_stop(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        self.on_node(target, |g| g.stop())?;
        out.emit(Item::Stopping(target))?;
        Ok(())
    }

    /// `members`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn members(&mut self, target: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let (r, _) = self.on_node(target, |g| g.members())?;
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
        self.on_node(target, |g| g.info())?;
        let (endpoint, key, group) = self.node(target)?;
        let mut write_err = None;
        let mut count = 0usize;
        let options = self.options;
        self.over_host(&endpoint, key, options, |host| {
            host.group(&group).for_each_page(query, None, |page| {
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
        })
        .map_err(|source| remote(target, source))?;
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
