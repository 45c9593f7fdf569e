//! Output: human lines by default, one JSON object per line with `--json`.

use agora_proto::time::Timestamp;
use agora_proto::wire::{EntryKind, Member, Message};
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
        _ => format!(
            "[{time}] {group} #{} {}: {}",
            m.seq,
            m.sender,
            body_text(&m.body).replace('\n', "\n    ")
        ),
    }
}

/// One group of a listing: `Cool Group<TAB>tcp://…<TAB>3 members`.
pub fn group_line(g: &agora_proto::wire::GroupEntry) -> String {
    format!("{}\t{}\t{} members", g.name, g.endpoint, g.members)
}

/// One member: `alice<TAB>joined 2026-11-22 10:00:00`.
pub fn member_line(m: &Member) -> String {
    format!("{}\tjoined {}", m.user, local_time(m.joined_at))
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

/// One account: `alice<TAB>online`, or `bob<TAB>offline, last seen 2026-11-22 10:00:00`.
pub fn user_line(u: &agora_proto::wire::UserEntry) -> String {
    match (u.presence, u.last_seen) {
        (agora_proto::wire::Presence::Offline, Some(seen)) => {
            format!("{}\toffline, last seen {}", u.name, local_time(seen))
        }
        (p, _) => format!("{}\t{}", u.name, presence(p)),
    }
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
