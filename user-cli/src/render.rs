//! The one renderer: commands produce [`Item`]s (data), and [`line()`] turns each into a line
//! for people or, with `--json`, one JSON object. [`Output`] writes them.

use std::io::Write;

use agora_proto::time::Timestamp;
use agora_proto::wire::{
    ConnectReply, DeadLetter, Dm, DmAck, EntryKind, GroupName, Member, MembershipReply, Message,
    PolicyReply, Presence, SendAck, UserEntry, UserName, UserReply,
};
use chrono::Local;
use serde::Serialize;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Lines for people.
    Human,
    /// One JSON object per line.
    Json,
}

/// A timestamp in the local zone, `YYYY-MM-DD HH:MM:SS`.
pub fn local_time(t: Timestamp) -> String {
    t.to_datetime()
        .with_timezone(&Local)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// `text` safe to put on a terminal: every control character (C0, DEL and C1: ESC, CR,
/// BEL, backspace, CSI …) but newline and tab as its Rust escape (`\u{1b}`, `\r`), so a peer's
/// words cannot move the cursor, rewrite a line, set the clipboard (OSC 52) or fake the
/// `(you)` marker. Human output only; JSON escapes its own way.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A body for people: a JSON string as its text, anything else as compact JSON.
pub fn body_text(body: &serde_json::value::RawValue) -> String {
    match serde_json::from_str::<serde_json::Value>(body.get()) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => body.get().to_owned(),
    }
}

/// One log entry: `[2026-11-22 10:00:00] Cool Group #3 alice: hello`, or for events
/// `[…] Cool Group #4 * bob joined`. The lines of a multi-line text after the first are
/// indented by four spaces.
pub fn message_line(group: &str, m: &Message) -> String {
    let time = local_time(m.time);
    match m.kind {
        EntryKind::Join => format!("[{time}] {group} #{} * {} joined", m.seq, m.sender),
        EntryKind::Leave => format!("[{time}] {group} #{} * {} left", m.seq, m.sender),
        EntryKind::Policy => {
            let v: serde_json::Value =
                serde_json::from_str(m.body.get()).unwrap_or(serde_json::Value::Null);
            let what = v["action"].as_str().unwrap_or("changed policy");
            let target = v["target"]
                .as_str()
                .or_else(|| v["mode"].as_str())
                .unwrap_or("");
            format!("[{time}] {group} #{} * {} {what} {target}", m.seq, m.sender)
                .trim_end()
                .to_owned()
        }
        _ => match &m.attachment {
            Some(a) => {
                let caption = match m.body.get() {
                    "null" => String::new(),
                    _ => format!(" {}", body_text(&m.body).replace('\n', "\n    ")),
                };
                format!(
                    "[{time}] {group} #{} {}: [file {}, {}, {}]{caption}",
                    m.seq,
                    m.sender,
                    a.name,
                    human_bytes(a.size),
                    a.media_type
                )
            }
            None => format!(
                "[{time}] {group} #{} {}: {}",
                m.seq,
                m.sender,
                body_text(&m.body).replace('\n', "\n    ")
            ),
        },
    }
}

/// A size for people: `812 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB` (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `n` and the noun, singular for one: `1 member`, `3 members`, `0 members`.
pub fn count(n: u64, singular: &str, plural: &str) -> String {
    if n == 1 {
        format!("1 {singular}")
    } else {
        format!("{n} {plural}")
    }
}

/// Rows aligned in columns under a header (comfy-table, no borders), two spaces between
/// columns, no trailing spaces; no header line when `header` is empty.
pub fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_content_arrangement(comfy_table::ContentArrangement::Disabled);
    if !header.is_empty() {
        t.set_header(header.iter().copied());
    }
    for row in rows {
        t.add_row(row);
    }
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t.lines()
        .map(|l| l.trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The registry's groups as a table: `GROUP`, `ENDPOINT`, `MEMBERS` (`1 member`).
pub fn groups_table(groups: &[agora_proto::wire::GroupEntry]) -> String {
    table(
        &["GROUP", "ENDPOINT", "MEMBERS"],
        groups.iter().map(|g| {
            vec![
                g.name.to_string(),
                g.endpoint.to_string(),
                count(g.members, "member", "members"),
            ]
        }),
    )
}

/// A group's members as a table: `MEMBER`, `JOINED`, then a count line (`1 member`).
pub fn members_table(members: &[Member]) -> String {
    let rows = table(
        &["MEMBER", "JOINED"],
        members
            .iter()
            .map(|m| vec![m.user.to_string(), local_time(m.joined_at)]),
    );
    format!(
        "{rows}\n{}",
        count(members.len() as u64, "member", "members")
    )
}

/// A direct message, as seeds 003 and 004 showed them:
/// `MESSAGE 3 FROM alice [Stored] [2026-11-22 10:00:00]: hello`, with `[Stored]` only for
/// one that waited in the mailbox (not for one pushed live).
pub fn dm_line(dm: &agora_proto::wire::Dm, stored: bool) -> String {
    format!(
        "MESSAGE {} FROM {}{} [{}]: {}",
        dm.n,
        dm.from,
        if stored { " [Stored]" } else { "" },
        local_time(dm.time),
        body_text(&dm.body).replace('\n', "\n    ")
    )
}

/// A presence for people: `online`, `away`, `offline`.
pub fn presence(p: agora_proto::wire::Presence) -> &'static str {
    match p {
        agora_proto::wire::Presence::Online => "online",
        agora_proto::wire::Presence::Away => "away",
        agora_proto::wire::Presence::Offline => "offline",
    }
}

/// An account's presence in words: `online`, `away`, or `offline, last seen 2026-11-22
/// 10:00:00` (local time) when the registry knows when.
pub fn presence_text(u: &agora_proto::wire::UserEntry) -> String {
    match (u.presence, u.last_seen) {
        (agora_proto::wire::Presence::Offline, Some(seen)) => {
            format!("offline, last seen {}", local_time(seen))
        }
        (p, _) => presence(p).to_owned(),
    }
}

/// Accounts as a table: `USER`, `PRESENCE` (see [`presence_text`]).
pub fn users_table(users: &[agora_proto::wire::UserEntry]) -> String {
    table(
        &["USER", "PRESENCE"],
        users
            .iter()
            .map(|u| vec![u.name.to_string(), presence_text(u)]),
    )
}

/// One account, a field per line, aligned: `user`, `presence`, `key`, `registered`.
pub fn whois_table(u: &agora_proto::wire::UserEntry) -> String {
    table(
        &[],
        [
            vec!["user".to_owned(), u.name.to_string()],
            vec!["presence".to_owned(), presence_text(u)],
            vec!["key".to_owned(), u.key.to_string()],
            vec!["registered".to_owned(), local_time(u.registered_at)],
        ],
    )
}

/// The users you block as a table: `USER`, `KEY`, `SINCE`.
pub fn blocked_table(blocked: &[agora_proto::wire::BlockedEntry]) -> String {
    table(
        &["USER", "KEY", "SINCE"],
        blocked
            .iter()
            .map(|b| vec![b.name.to_string(), b.key.to_string(), local_time(b.since)]),
    )
}

/// A log entry with its group, as `watch --json` and `check --json` print it:
/// `{"group": G, "seq": …, "id": …, "time": …, "sender": …, "kind": …, "body": …}`.
#[derive(Debug, Serialize)]
pub struct GroupEntry<'a> {
    group: &'a agora_proto::wire::GroupName,
    #[serde(flatten)]
    entry: &'a Message,
}

impl<'a> GroupEntry<'a> {
    /// `entry` of `group`.
    pub fn new(group: &'a agora_proto::wire::GroupName, entry: &'a Message) -> Self {
        GroupEntry { group, entry }
    }
}

/// A value as one JSON line.
pub fn json_line<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// What a command produced: one result, or one element of a listing.
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    /// `groups`: the whole listing (a table for people, a JSON line per group).
    Groups(&'a [agora_proto::wire::GroupEntry]),
    /// `members`: the whole list (a table for people, a JSON line per member).
    Members(&'a [Member]),
    /// `groups` found none.
    NoGroups,
    /// `join`.
    Joined(&'a MembershipReply),
    /// `leave`.
    Left(&'a MembershipReply),
    /// `create`: the host's reply, and the host.
    Created {
        /// The host's reply.
        reply: &'a agora_proto::wire::CreateReply,
        /// Where the group is.
        host: &'a agora_proto::wire::Endpoint,
    },
    /// `delete`.
    Deleted(&'a agora_proto::wire::DeleteReply),
    /// `send`: the ack of the node of `group`.
    Sent {
        /// The group as the user named it.
        group: &'a str,
        /// The ack.
        ack: &'a SendAck,
    },
    /// `messages`: one log entry (in JSON, with its `group`, as `check` and `watch`).
    Message {
        /// The group's name.
        group: &'a GroupName,
        /// The entry.
        entry: &'a Message,
    },
    /// `messages` found none.
    NoMessages,
    /// `check`, `watch` and the live stream: one log entry (in JSON, with its `group`).
    Entry {
        /// The group's name.
        group: &'a GroupName,
        /// The entry.
        entry: &'a Message,
    },
    /// `check`: how many entries of a group were not seen yet.
    Unread {
        /// The group's name.
        group: &'a str,
        /// How many.
        count: usize,
    },
    /// `check` with no group joined from this client.
    NoGroupsJoined,
    /// `check`: how many direct messages it showed.
    DmsShown(u64),
    /// `multicast`, `broadcast`: copies stored, and recipients not reached.
    FannedOut(&'a agora_proto::wire::MulticastReply),
    /// `admin stop`, `admin stop-registry`: the server (a group, or "the registry") drains
    /// and exits.
    Stopping(&'a str),
    /// `subscribe` (`on`) and `unsubscribe`.
    Following {
        /// The group.
        group: &'a GroupName,
        /// Whether it is followed live now.
        on: bool,
    },
    /// `invite`, `ban`, `unban`, `kick`, `promote`, `set_mode`.
    Policy {
        /// The group as the user named it.
        group: &'a str,
        /// The change, for people.
        what: &'a str,
        /// The node's reply.
        reply: &'a PolicyReply,
    },
    /// `register`.
    Registered(&'a UserReply),
    /// `unregister`.
    Unregistered(&'a UserReply),
    /// `connect` and `away`.
    Presence(&'a ConnectReply),
    /// `disconnect`.
    Offline(&'a UserReply),
    /// `connect` found no direct message waiting.
    NoneWaiting,
    /// A direct message: `stored` when it waited in the mailbox (not pushed live).
    Dm {
        /// The message.
        dm: &'a Dm,
        /// Whether it waited in the mailbox.
        stored: bool,
    },
    /// `send_dm`: the registry's ack.
    DmSent {
        /// The recipient.
        to: &'a UserName,
        /// The ack.
        ack: &'a DmAck,
    },
    /// `dead_letters`: one.
    DeadLetter(&'a DeadLetter),
    /// `dead_letters` found none.
    NoDeadLetters,
    /// `users`: every account (a table; JSON, one object per account).
    Users(&'a [UserEntry]),
    /// `users` found none.
    NoAccounts,
    /// `whois`.
    Whois(&'a UserEntry),
    /// `block` (`on`) and `unblock`.
    Block {
        /// The registry's reply.
        reply: &'a agora_proto::wire::BlockReply,
        /// Whether the user is blocked now.
        on: bool,
    },
    /// `blocked`: the users you block (a table; JSON, one object per user).
    Blocked(&'a [agora_proto::wire::BlockedEntry]),
    /// `blocked` found none.
    NoneBlocked,
    /// `get_file`: the file saved, verified.
    FileSaved {
        /// Where it was written.
        path: &'a std::path::Path,
        /// The file.
        attachment: &'a agora_proto::wire::Attachment,
    },
}

/// `item` as one line in `format`; `None` when the format shows nothing for it (the
/// "none found" notes are for people only).
pub fn line(format: Format, item: &Item<'_>) -> Option<String> {
    match format {
        // Everything a peer controls (bodies, captions, file names, names, DMs) is in it.
        Format::Human => human(item).map(|l| escape_controls(&l).into_owned()),
        Format::Json => json(item),
    }
}

fn human(item: &Item<'_>) -> Option<String> {
    Some(match *item {
        Item::Groups(groups) => groups_table(groups),
        Item::Members(members) => members_table(members),
        Item::NoGroups => "no groups".into(),
        Item::Joined(r) if r.changed => format!("joined {} (last seq {})", r.group, r.last_seq),
        Item::Joined(r) => format!("already a member of {}", r.group),
        Item::Left(r) if r.changed => format!("left {}", r.group),
        Item::Left(r) => format!("not a member of {}", r.group),
        Item::Created { reply, host } => format!(
            "created {} ({}) on {host}; you own it",
            reply.group,
            reply.mode.as_str()
        ),
        Item::Deleted(r) => format!(
            "deleted {}: its messages are archived and its name is free",
            r.group
        ),
        Item::Sent { group, ack } => format!(
            "sent to {group}: seq {} at {}",
            ack.seq,
            local_time(ack.time)
        ),
        Item::Message { group, entry } | Item::Entry { group, entry } => {
            message_line(group.as_str(), entry)
        }
        Item::NoMessages => "no messages".into(),
        Item::Unread { group, count } => format!("{group}: {count} unread"),
        Item::NoGroupsJoined => "no groups joined yet".into(),
        Item::DmsShown(n) => format!("direct messages: {n} new"),
        Item::FannedOut(r) => {
            let mut line = format!(
                "sent to {}",
                count(r.stored + r.duplicates, "user", "users")
            );
            if r.duplicates > 0 {
                line.push_str(&format!(" ({} had it already)", r.duplicates));
            }
            if !r.undelivered.is_empty() {
                let missed: Vec<String> = r
                    .undelivered
                    .iter()
                    .map(|u| format!("{} ({})", u.to, u.reason))
                    .collect();
                line.push_str(&format!(
                    "; not delivered (in your dead letters): {}",
                    missed.join(", ")
                ));
            }
            line
        }
        Item::Stopping(what) => format!("{what} is stopping: it drains and exits"),
        Item::Following { group, on: true } => format!("subscribed to {group}"),
        Item::Following { group, on: false } => format!("unsubscribed from {group}"),
        // `what` ends with a key: nothing printed after it (Z85 has brackets of its own).
        Item::Policy { group, what, reply } if reply.changed => format!("{group}: done: {what}"),
        Item::Policy { group, what, .. } => format!("{group}: nothing to change: {what}"),
        Item::Registered(r) if r.changed => format!("registered {}", r.user.name),
        Item::Registered(r) => format!("{} is already yours", r.user.name),
        Item::Unregistered(r) => format!("unregistered {}", r.user.name),
        Item::Presence(r) => format!("{} is {}", r.user.name, presence(r.user.presence)),
        Item::Offline(r) => format!("{} is offline", r.user.name),
        Item::NoneWaiting => "no messages waiting".into(),
        Item::Dm { dm, stored } => dm_line(dm, stored),
        Item::DmSent { to, ack } if ack.recipient == Presence::Offline => {
            format!("{to} is offline; message saved (#{})", ack.n)
        }
        Item::DmSent { to, ack } => format!("sent to {to} (#{})", ack.n),
        Item::DeadLetter(l) => format!(
            "[{}] to {}: {} ({})",
            local_time(l.time),
            l.to,
            body_text(&l.body),
            l.reason
        ),
        Item::NoDeadLetters => "no dead letters".into(),
        Item::Users(users) => users_table(users),
        Item::NoAccounts => "no accounts yet (user-cli register NAME makes one)".into(),
        Item::FileSaved { path, attachment } => format!(
            "saved {} ({}) to {}",
            attachment.name,
            human_bytes(attachment.size),
            path.display()
        ),
        Item::Whois(u) => whois_table(u),
        Item::Block { reply, on: true } if reply.changed => {
            format!("blocked {}: their direct messages are refused", reply.name)
        }
        Item::Block { reply, on: true } => format!("{} is already blocked", reply.name),
        Item::Block { reply, on: false } if reply.changed => format!("unblocked {}", reply.name),
        Item::Block { reply, on: false } => format!("{} was not blocked", reply.name),
        Item::Blocked(blocked) => blocked_table(blocked),
        Item::NoneBlocked => "you block no one".into(),
    })
}

fn json(item: &Item<'_>) -> Option<String> {
    Some(match *item {
        Item::Groups(groups) => groups.iter().map(json_line).collect::<Vec<_>>().join("\n"),
        Item::Members(members) => members.iter().map(json_line).collect::<Vec<_>>().join("\n"),
        Item::Joined(r) | Item::Left(r) => json_line(r),
        Item::Created { reply, host } => json_line(&serde_json::json!({
            "group": reply.group,
            "mode": reply.mode,
            "owner": reply.owner,
            "last_seq": reply.last_seq,
            "host": host,
        })),
        Item::Deleted(r) => json_line(r),
        Item::Sent { ack, .. } => json_line(ack),
        Item::Message { group, entry } | Item::Entry { group, entry } => {
            json_line(&GroupEntry::new(group, entry))
        }
        Item::Unread { group, count } => {
            json_line(&serde_json::json!({"group": group, "unread": count}))
        }
        Item::Following { group, on } => {
            json_line(&serde_json::json!({"group": group, "subscribed": on}))
        }
        Item::Policy { reply, .. } => json_line(reply),
        Item::Registered(r) | Item::Unregistered(r) | Item::Offline(r) => json_line(r),
        Item::Presence(r) => json_line(r),
        Item::Dm { dm, .. } => json_line(dm),
        Item::DmSent { ack, .. } => json_line(ack),
        Item::DeadLetter(l) => json_line(l),
        Item::Users(users) => users.iter().map(json_line).collect::<Vec<_>>().join("\n"),
        Item::Whois(u) => json_line(u),
        Item::Block { reply, on } => json_line(
            &serde_json::json!({"name": reply.name, "blocked": on, "changed": reply.changed}),
        ),
        Item::Blocked(blocked) => blocked.iter().map(json_line).collect::<Vec<_>>().join("\n"),
        Item::Stopping(what) => json_line(&serde_json::json!({"stopping": what})),
        Item::FannedOut(r) => json_line(r),
        Item::FileSaved { path, attachment } => json_line(
            &serde_json::json!({"saved": path.display().to_string(), "attachment": attachment}),
        ),
        Item::NoGroups
        | Item::NoMessages
        | Item::NoGroupsJoined
        | Item::DmsShown(_)
        | Item::NoneWaiting
        | Item::NoDeadLetters
        | Item::NoAccounts
        | Item::NoneBlocked => return None,
    })
}

/// Where a command's items go: rendered in one format, one line each.
pub struct Output<'w> {
    format: Format,
    out: &'w mut dyn Write,
}

impl<'w> Output<'w> {
    /// Items rendered in `format` to `out`.
    pub fn new(format: Format, out: &'w mut dyn Write) -> Output<'w> {
        Output { format, out }
    }

    /// Renders and writes one item (nothing, if the format shows nothing for it).
    ///
    /// # Errors
    /// Writing failed.
    pub fn emit(&mut self, item: Item<'_>) -> std::io::Result<()> {
        match line(self.format, &item) {
            Some(l) => writeln!(self.out, "{l}"),
            None => Ok(()),
        }
    }

    /// Flushes what was written.
    ///
    /// # Errors
    /// Writing failed.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(count(0, "member", "members"), "0 members");
        assert_eq!(count(1, "member", "members"), "1 member");
        assert_eq!(count(2, "member", "members"), "2 members");
    }

    #[test]
    fn tables_are_aligned_without_borders_or_trailing_spaces() {
        let t = table(
            &["GROUP", "ENDPOINT"],
            [
                vec!["Cool Group".to_owned(), "tcp://127.0.0.1:5560".to_owned()],
                vec!["news".to_owned(), "tcp://127.0.0.1:5561".to_owned()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        let at = lines[0].find("ENDPOINT");
        assert!(lines[1..].iter().all(|l| l.find("tcp://") == at), "{t}");
        assert!(
            lines
                .iter()
                .all(|l| !l.ends_with(' ') && !l.starts_with(' ')),
            "{t}"
        );
        assert!(
            !t.contains('|') && !t.contains('-') && !t.contains('+'),
            "{t}"
        );
    }

    fn account(name: &str, presence: &str) -> UserEntry {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "key": "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
            "registered_at": "2026-11-22T10:00:00.000000Z",
            "presence": presence,
        }))
        .expect("a user entry")
    }

    #[test]
    fn users_whois_and_blocked_are_tables_not_tab_separated() {
        let users = [account("alice", "online"), account("bartholomew", "away")];
        let t = users_table(&users);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(!t.contains('\t'), "{t}");
        let at = lines[0].find("PRESENCE");
        assert_eq!(lines[1].find("online"), at, "{t}");
        assert_eq!(lines[2].find("away"), at, "{t}");
        let w = whois_table(&users[0]);
        assert!(!w.contains('\t'), "{w}");
        let rows: Vec<Vec<&str>> = w.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["user", "alice"], "{w}");
        assert_eq!(rows[1], ["presence", "online"], "{w}");
        assert_eq!(rows[2][0], "key", "{w}");
        let at = w
            .lines()
            .map(|l| l.find("alice").or(l.find("online")))
            .next();
        assert_eq!(
            w.lines().nth(1).and_then(|l| l.find("online")),
            at.flatten(),
            "{w}"
        );
    }

    /// Review of issue 23: a peer's body reached the terminal raw: an OSC 52 sequence (sets
    /// the clipboard), a carriage return that rewrites the line (a fake `(you)`), C1 codes.
    /// In human output every control character but newline and tab is escaped; JSON is as
    /// serde writes it.
    #[test]
    fn a_peers_control_characters_are_escaped_in_human_output() {
        assert_eq!(escape_controls("plain\ttext\nnext"), "plain\ttext\nnext");
        assert_eq!(
            escape_controls("a\u{1b}]52;c;aGk=\u{7}b\rc\u{9b}d\u{7f}"),
            "a\\u{1b}]52;c;aGk=\\u{7}b\\rc\\u{9b}d\\u{7f}"
        );
        let m: Message = serde_json::from_value(serde_json::json!({
            "seq": 7,
            "id": "0190f5d2-8f3e-7c3a-9a2b-1c2d3e4f5a6b",
            "time": "2026-11-22T10:00:00Z",
            "sender": "mallory",
            "body": "hi\u{1b}]52;c;aGk=\u{7}\r[2026-11-22 10:00:00] G #8 alice (you): fake",
            "attachment": {
                "name": "x\u{1b}[2J.txt",
                "size": 3,
                "media_type": "text/plain",
                "sha256": "0000000000000000000000000000000000000000000000000000000000000000"
            }
        }))
        .expect("a message");
        let group = GroupName::new("G").expect("group");
        let human = line(
            Format::Human,
            &Item::Entry {
                group: &group,
                entry: &m,
            },
        )
        .expect("a line");
        assert!(!human.chars().any(|c| c.is_control()), "{human:?}");
        assert!(human.contains("x\\u{1b}[2J.txt"), "{human}");
        assert!(
            human.contains("hi\\u{1b}]52;c;aGk=\\u{7}\\r[2026"),
            "{human}"
        );
        let json = line(
            Format::Json,
            &Item::Entry {
                group: &group,
                entry: &m,
            },
        )
        .expect("a line");
        let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        assert!(v["body"].as_str().is_some_and(|b| b.contains('\u{1b}')));
    }

    /// Issue 24: `create` and `delete` say what happened in words, and in JSON the host's
    /// reply (with the host, for `create`).
    #[test]
    fn create_and_delete_results_in_words_and_json() {
        use agora_proto::wire::{CreateReply, DeleteReply, Endpoint, GroupMode};
        let created = CreateReply {
            group: "Night Shift".parse().expect("name"),
            mode: GroupMode::Private,
            owner: "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
                .parse()
                .expect("key"),
            last_seq: 1,
        };
        let host = Endpoint::from_host_port("127.0.0.1:7000").expect("endpoint");
        let item = Item::Created {
            reply: &created,
            host: &host,
        };
        assert_eq!(
            line(Format::Human, &item).as_deref(),
            Some("created Night Shift (private) on tcp://127.0.0.1:7000; you own it")
        );
        let v: serde_json::Value =
            serde_json::from_str(&line(Format::Json, &item).expect("json")).expect("JSON");
        assert_eq!(v["group"], "Night Shift");
        assert_eq!(v["mode"], "private");
        assert_eq!(v["last_seq"], 1);
        assert_eq!(v["host"], "tcp://127.0.0.1:7000");
        assert_eq!(v["owner"], "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7");

        let deleted = DeleteReply {
            group: "Night Shift".parse().expect("name"),
            deleted: true,
        };
        assert_eq!(
            line(Format::Human, &Item::Deleted(&deleted)).as_deref(),
            Some("deleted Night Shift: its messages are archived and its name is free")
        );
        let v: serde_json::Value =
            serde_json::from_str(&line(Format::Json, &Item::Deleted(&deleted)).expect("json"))
                .expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({"group": "Night Shift", "deleted": true})
        );
    }
}
