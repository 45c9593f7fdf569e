//! Accounts, presence and direct messages.
//!
//! # Presence in a session
//! A session is present while it runs and your key has an account: the prompt from its
//! start, and any session (the prompt or a script on stdin) from the moment `register NAME`
//! or `connect` succeeds in it, with no restart. Present means a heartbeat (`connect` every
//! third of the TTL, [`agora_common::inbox`]) and the live direct-message stream: each
//! message pushed is printed (above the prompt, or to a script's stdout between the
//! commands' output, as `watch` prints) and then acked. `away` and `connect --away` change
//! what the heartbeat says; `disconnect` stops it. Leaving the prompt disconnects; a script
//! that ends leaves its presence to lapse at the TTL, as a one-shot `connect` does.

use std::time::Duration;

use agora_common::client::ClientError;
use agora_proto::wire::{ErrorCode, Presence, UserName, WireError};
use serde_json::value::RawValue;

use super::{App, CliError, Printer};
use crate::render::{self, Item, Output};

/// How long starting presence waits for the registry to open the push session, so that a
/// direct message sent right after `register` or `connect` printed its line is pushed.
const PUSH_READY: Duration = Duration::from_secs(2);

/// Keeps the user's presence alive (the inbox's `connect` every third of the TTL); when
/// dropped, disconnects, or with `lapse` leaves the presence to lapse at the TTL.
pub struct PresenceGuard {
    inbox: agora_common::inbox::Inbox,
    lapse: bool,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        if self.lapse {
            self.inbox.lapse();
        }
    }
}

impl App {
    /// `register NAME` (seed 004's `REGISTER`): binds NAME to your key.
    ///
    /// # Errors
    /// `name_taken` and the like from the registry.
    pub fn user_register(&mut self, name: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let name = UserName::new(name).map_err(|e| CliError::Usage(e.to_string()))?;
        let r = self
            .registry
            .user_register(&name)
            .map_err(|e| self.account_error(e))?;
        // In a session: present at once, with the live direct-message stream, before the
        // line says so.
        self.stay_present(Presence::Online, None);
        out.emit(Item::Registered(&r))?;
        Ok(())
    }

    /// `unregister NAME` (seed 004's `UNREGISTER`), once confirmed.
    ///
    /// # Errors
    /// `unknown_user`, `forbidden` and the like from the registry.
    pub fn user_unregister(
        &mut self,
        name: &str,
        confirmed: bool,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let name = UserName::new(name).map_err(|e| CliError::Usage(e.to_string()))?;
        let r = self
            .registry
            .user_unregister(&name, confirmed)
            .map_err(|e| self.account_error(e))?;
        // No account, no presence: the heartbeat stops (its `connect`s would be refused).
        if let Some(mut present) = self.session.presence.take() {
            present.lapse = false;
            drop(present);
        }
        out.emit(Item::Unregistered(&r))?;
        Ok(())
    }

    /// `connect` (seed 004's `CONNECT`) and `away`: marks you online or away until the
    /// session's TTL passes. `connect` then shows the direct messages waiting for you, in
    /// order and numbered, and acks them once shown. In a session, you then stay present
    /// (the module's "Presence in a session").
    ///
    /// # Errors
    /// `unknown_user` (register first) and the like from the registry.
    pub fn connect(&mut self, status: Presence, out: &mut Output<'_>) -> Result<(), CliError> {
        let r = self
            .registry
            .connect(status)
            .map_err(|e| self.account_error(e))?;
        out.emit(Item::Presence(&r))?;
        // Seed 004: "once they reconnect they will receive all pending messages". Shown in
        // order, numbered, then acked, in scripts as at the prompt.
        if status == Presence::Online && self.show_waiting(out)? == 0 {
            out.emit(Item::NoneWaiting)?;
        }
        out.flush()?;
        self.stay_present(status, Some(r.ttl_ms));
        Ok(())
    }

    /// At the start of the prompt: present from now on if your key has an account (else from
    /// `register` or `connect`).
    pub fn present_if_registered(&mut self) {
        self.stay_present(Presence::Online, None);
    }

    /// In a session ([`App::print_live`]), keeps you present saying `status` (the heartbeat
    /// and the live direct-message stream), starting it if it does not run: waits (up to
    /// 2 s) for the push session to open, so that a message sent from then on is pushed.
    /// `ttl_ms`: from a `connect` reply just received (else one is sent first). Outside a
    /// session, or without an account (the first `connect` refused), nothing starts.
    pub(super) fn stay_present(&mut self, status: Presence, ttl_ms: Option<u64>) {
        if !self.in_session() {
            return;
        }
        if let Some(present) = &self.session.presence {
            present.inbox.set_status(status);
            return;
        }
        let printer = self.live_printer();
        let lapse = !self.session.prompt;
        if let Some(mut guard) = self.present(printer, status, ttl_ms) {
            if !guard.inbox.wait_ready(PUSH_READY) {
                tracing::debug!("the registry did not open the push session in time");
            }
            guard.lapse = lapse;
            self.session.presence = Some(guard);
        }
    }

    /// `disconnect` (seed 004's `DISCONNECT`): marks you offline (a session's heartbeat
    /// stops first, so that it does not mark you online again).
    ///
    /// # Errors
    /// The registry's failure.
    pub fn disconnect(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        if let Some(mut present) = self.session.presence.take() {
            present.lapse = false;
            drop(present);
        }
        let r = self
            .registry
            .disconnect()
            .map_err(|e| self.account_error(e))?;
        out.emit(Item::Offline(&r))?;
        Ok(())
    }

    /// Keeps your presence alive while the returned guard lives (for long-running modes:
    /// the prompt, `watch`), if your key has an account; `None` otherwise.
    ///
    /// The heartbeat runs on a DEALER that asks the registry to push new direct messages to
    /// it. With a `printer`, each pushed message is printed and then acked (removed from the
    /// mailbox); without one, nothing is acked, so nothing unseen is lost.
    pub fn keep_present(&mut self, printer: Option<Printer>) -> Option<PresenceGuard> {
        self.present(printer, Presence::Online, None)
    }

    /// The heartbeat saying `status`, pushed messages printed through `printer` (and noted
    /// for completion); `ttl_ms` from a `connect` reply just received, else one is sent.
    fn present(
        &mut self,
        printer: Option<Printer>,
        status: Presence,
        ttl_ms: Option<u64>,
    ) -> Option<PresenceGuard> {
        let curve = self.registry_curve.clone()?;
        let ttl_ms = match ttl_ms {
            Some(ttl) => ttl,
            None => self.registry.connect(status).ok()?.ttl_ms,
        };
        let every = Duration::from_millis(ttl_ms / 3).max(Duration::from_millis(100));
        let format = self.format;
        let names = self.session.names.clone();
        let mut printer = printer;
        // Printed on the inbox's own thread, then acked; without a printer nothing is acked,
        // so pushed messages stay in the mailbox for the next `check`.
        let inbox = agora_common::inbox::Inbox::start(
            &self.ctx,
            &self.registry_endpoint,
            curve,
            every,
            move |dm| {
                let Some(print) = printer.as_mut() else {
                    return false;
                };
                names.add_users([dm.from.to_string()]);
                let item = Item::Dm {
                    dm: &dm,
                    stored: false,
                };
                if let Some(line) = render::line(format, &item) {
                    print(line);
                }
                true
            },
        )
        .ok()?;
        if status != Presence::Online {
            inbox.set_status(status);
        }
        Some(PresenceGuard {
            inbox,
            lapse: false,
        })
    }

    /// `send_dm NAME TEXT` (also `NAME: text` at the prompt, and seed 004's `SEND u text`).
    ///
    /// # Errors
    /// `unknown_user` / `limit_reached` (the message went to your dead letters) and the like.
    pub fn send_dm(
        &mut self,
        to: &str,
        body: String,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let to = UserName::new(to).map_err(|e| CliError::Usage(e.to_string()))?;
        let body = RawValue::from_string(body)
            .map_err(|e| CliError::Usage(format!("body is not JSON: {e}")))?;
        let ack = match self
            .registry
            .send_dm(&to, body, agora_proto::id::MessageId::new_v7())
        {
            Ok(a) => a,
            Err(e) => return Err(self.user_error(&to, e)),
        };
        self.session.names.add_users([to.to_string()]);
        out.emit(Item::DmSent { to: &to, ack: &ack })?;
        Ok(())
    }

    /// `multicast TO,TO TEXT` (`to`) and `broadcast TEXT` (no `to`).
    ///
    /// # Errors
    /// [`CliError::Usage`] for a body that is not JSON; the registry's refusals
    /// (`forbidden` for a broadcast from neither the operator nor an admin).
    pub fn fan_out(
        &mut self,
        to: Option<Vec<UserName>>,
        body: String,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let body = RawValue::from_string(body)
            .map_err(|e| CliError::Usage(format!("body is not JSON: {e}")))?;
        let id = agora_proto::id::MessageId::new_v7();
        if let Some(to) = &to {
            self.session
                .names
                .add_users(to.iter().map(ToString::to_string));
        }
        let reply = match to {
            Some(to) => self.registry.multicast(to, body, id),
            None => self.registry.broadcast(body, id),
        }
        .map_err(|e| self.account_error(e))?;
        out.emit(Item::FannedOut(&reply))?;
        Ok(())
    }

    /// The direct messages waiting for you: shown, then acked (removed) up to the last one
    /// shown, so a crash before display loses nothing. Returns how many were shown.
    ///
    /// # Errors
    /// The registry's failure.
    pub(super) fn show_mailbox(&mut self, out: &mut Output<'_>) -> Result<u64, CliError> {
        let shown = self.show_waiting(out)?;
        if shown == 0 {
            // The mailbox is the key's, account or not: an empty one says nothing about
            // direct messages to a key with no account (`check`, the prompt's greeting).
            if let Err(e) = self.registry.blocked() {
                return Err(self.account_error(e));
            }
        }
        Ok(shown)
    }

    /// The direct messages waiting, shown and acked ([`App::show_mailbox`] without the
    /// account check: `connect` just proved there is one).
    fn show_waiting(&mut self, out: &mut Output<'_>) -> Result<u64, CliError> {
        let mut after = 0;
        let mut shown = 0;
        loop {
            let page = self
                .registry
                .mailbox(after, Some(1000))
                .map_err(|e| self.account_error(e))?;
            self.session
                .names
                .add_users(page.messages.iter().map(|dm| dm.from.to_string()));
            for dm in &page.messages {
                out.emit(Item::Dm { dm, stored: true })?;
                after = dm.n;
                shown += 1;
            }
            out.flush()?;
            if after > 0 {
                self.registry
                    .ack_dm(after)
                    .map_err(|e| self.account_error(e))?;
            }
            if !page.more {
                return Ok(shown);
            }
        }
    }

    /// `admin stop-registry`: the registry stops.
    ///
    /// # Errors
    /// `forbidden` unless this is the key the registry names as `--operator`.
    pub fn admin_stop_registry(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        self.registry.stop().map_err(|e| self.account_error(e))?;
        out.emit(Item::Stopping("the registry"))?;
        Ok(())
    }

    /// `dead_letters`: your messages that could not be delivered, with the reasons.
    ///
    /// # Errors
    /// The registry's failure.
    pub fn dead_letters(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let letters = self
            .registry
            .dead_letters()
            .map_err(|e| self.account_error(e))?;
        for l in &letters {
            out.emit(Item::DeadLetter(l))?;
        }
        if letters.is_empty() {
            out.emit(Item::NoDeadLetters)?;
        }
        Ok(())
    }

    /// `block NAME` (`on`) and `unblock NAME`.
    ///
    /// # Errors
    /// `no_account`, `unknown_user`; the registry's failure.
    pub fn block(
        &mut self,
        name: &UserName,
        on: bool,
        out: &mut Output<'_>,
    ) -> Result<(), CliError> {
        let reply = match on {
            true => self.registry.block(name),
            false => self.registry.unblock(name),
        };
        let reply = reply.map_err(|e| self.user_error(name, e))?;
        out.emit(Item::Block { reply: &reply, on })?;
        Ok(())
    }

    /// `blocked`: the users you block.
    ///
    /// # Errors
    /// `no_account`; the registry's failure.
    pub fn blocked(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let blocked = self.registry.blocked().map_err(|e| self.account_error(e))?;
        if blocked.is_empty() {
            out.emit(Item::NoneBlocked)?;
        } else {
            out.emit(Item::Blocked(&blocked))?;
        }
        Ok(())
    }

    /// `users`: every account.
    ///
    /// # Errors
    /// The registry's failure.
    pub fn users(&mut self, out: &mut Output<'_>) -> Result<(), CliError> {
        let users = self.registry.users().map_err(|e| self.account_error(e))?;
        self.session
            .names
            .add_users(users.iter().map(|u| u.name.to_string()));
        if users.is_empty() {
            out.emit(Item::NoAccounts)?;
        } else {
            out.emit(Item::Users(&users))?;
        }
        Ok(())
    }

    /// `whois NAME`.
    ///
    /// # Errors
    /// `unknown_user`; the registry's failure.
    pub fn whois(&mut self, name: &str, out: &mut Output<'_>) -> Result<(), CliError> {
        let name = UserName::new(name).map_err(|e| CliError::Usage(e.to_string()))?;
        let r = self
            .registry
            .whois(&name)
            .map_err(|e| self.user_error(&name, e))?;
        self.session.names.add_users([r.user.name.to_string()]);
        out.emit(Item::Whois(&r.user))?;
        Ok(())
    }

    /// The one line for a key with no account, naming what to run where the user is: in a
    /// session `register NAME`, alone `user-cli register NAME`. No protocol code in it.
    fn no_account(&self) -> CliError {
        let run = if self.in_session() {
            "type `register NAME`"
        } else {
            "run `user-cli register NAME`"
        };
        CliError::Refused(format!(
            "no account: your key has none yet; {run} to make one"
        ))
    }

    /// A registry failure of an account command: a key with no account as
    /// [`App::no_account`] says, anything else as [`App::registry_error`].
    fn account_error(&self, e: ClientError) -> CliError {
        match e {
            ClientError::Server(w) if is_no_account(&w) => self.no_account(),
            e => self.registry_error(e),
        }
    }

    /// A failure of a command about the user `name` (`send_dm`, `whois`, `block`): no
    /// account of yours as [`App::account_error`]; an unknown `name` with its stable code,
    /// naming it once (`unknown_user: no user named nosuch; the message is in your dead
    /// letters`); another refusal after the name.
    fn user_error(&self, name: &UserName, e: ClientError) -> CliError {
        match e {
            ClientError::Server(w) if is_no_account(&w) => self.no_account(),
            ClientError::Server(w)
                if w.code == ErrorCode::UnknownUser && w.message.contains(name.as_str()) =>
            {
                CliError::Refused(super::cause(&ClientError::Server(w)))
            }
            ClientError::Server(w) => CliError::Remote {
                target: name.to_string(),
                source: ClientError::Server(w),
            },
            e => self.registry_error(e),
        }
    }
}

/// Whether the registry's refusal is about the caller's key having no account:
/// `no_account` (`users`, `whois`, blocks), or `unknown_user` with the registry's "this key
/// has no account" (`connect`, `disconnect` and the direct-message actions answer so; an
/// unknown *other* user is "no user named NAME").
fn is_no_account(w: &WireError) -> bool {
    w.code == ErrorCode::NoAccount
        || (w.code == ErrorCode::UnknownUser && w.message.starts_with("this key has no account"))
}
