//! The chat commands, on top of `agora_common::client`. Each command writes its result to
//! the given output and returns a [`CliError`] naming the group and the cause when it fails.

use std::collections::HashMap;
use std::io::Write;

use agora_common::client::{ClientError, ClientOptions, GroupClient, RegistryClient};
use agora_common::proto::{
    Endpoint, ErrorCode, GroupName, HistoryQuery, UserName, REQUEST_OVERHEAD_BYTES,
};
use agora_common::time::parse_since_local;
use serde_json::value::RawValue;

use crate::render::{self, Format};

/// A command's failure: one line for stderr, and the process exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command or its arguments are malformed.
    #[error("{0}")]
    Usage(String),
    /// A group node or the registry failed the request.
    #[error("{target}: {}", cause(.source))]
    Remote {
        /// The group (or `registry ENDPOINT`) the request went to.
        target: String,
        /// What went wrong.
        source: ClientError,
    },
    /// The body is over the node's limit; nothing was sent.
    #[error("{target}: message too large: {len} bytes, the limit is {max} bytes")]
    TooLarge {
        /// The group.
        target: String,
        /// The body's size in bytes.
        len: usize,
        /// The node's limit in bytes.
        max: u64,
    },
    /// Writing output failed.
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
}

fn cause(e: &ClientError) -> String {
    match e {
        ClientError::Timeout { endpoint, waited } => format!(
            "unreachable: no reply from {endpoint} within {}",
            humantime::format_duration(std::time::Duration::from_millis(
                u64::try_from(waited.as_millis()).unwrap_or(u64::MAX)
            ))
        ),
        ClientError::Server(w) => match w.code {
            ErrorCode::UnknownGroup => format!("unknown group: {}", w.message),
            ErrorCode::NotMember => format!("not a member: {}", w.message),
            ErrorCode::TooLarge => format!("message too large: {}", w.message),
            code => format!("{code}: {}", w.message),
        },
        other => other.to_string(),
    }
}

/// Exit codes, documented in the README: 0 success, 1 refused by a server, 2 usage,
/// 3 unreachable (timeout), 4 other failures (bad reply, output).
impl CliError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Remote {
                source: ClientError::Timeout { .. },
                ..
            } => 3,
            CliError::Remote {
                source: ClientError::Server(_),
                ..
            }
            | CliError::TooLarge { .. } => 1,
            CliError::Remote { .. } | CliError::Io(_) => 4,
        }
    }
}

/// A group named on the command line: an address or a name to look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `IP:PORT`, `HOST:PORT` or `tcp://HOST:PORT`.
    Address(Endpoint),
    /// A group name, resolved through the registry.
    Name(GroupName),
}

impl Target {
    /// Reads a target: anything ending in `:PORT` (digits) is an address, the rest a name.
    ///
    /// # Errors
    /// [`CliError::Usage`] for an invalid address or name.
    pub fn parse(s: &str) -> Result<Target, CliError> {
        let looks_like_address = s.starts_with("tcp://")
            || s.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.contains(' ')
                    && !port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit())
            });
        if looks_like_address {
            Endpoint::from_host_port(s)
                .map(Target::Address)
                .map_err(|e| CliError::Usage(e.to_string()))
        } else {
            GroupName::new(s)
                .map(Target::Name)
                .map_err(|e| CliError::Usage(e.to_string()))
        }
    }
}

/// Which history to fetch.
#[derive(Debug, Clone, Default)]
pub struct HistoryArgs {
    /// RFC 3339 or `HH:MM:SS` (today, local time).
    pub since: Option<String>,
    /// Messages after this seq.
    pub after_seq: Option<u64>,
    /// One message by id.
    pub id: Option<String>,
    /// The newest N.
    pub latest: Option<u32>,
}

/// The client's state: the registry client and one group client per node.
pub struct App {
    ctx: zmq::Context,
    registry: RegistryClient,
    user: UserName,
    options: ClientOptions,
    /// How output is rendered.
    pub format: Format,
    nodes: HashMap<Endpoint, GroupClient>,
}

impl App {
    /// A client acting as `user`.
    pub fn new(registry: &str, user: UserName, options: ClientOptions, format: Format) -> App {
        let ctx = zmq::Context::new();
        App {
            registry: RegistryClient::new(&ctx, registry, options),
            ctx,
            user,
            options,
            format,
            nodes: HashMap::new(),
        }
    }

    fn registry_error(&self, source: ClientError) -> CliError {
        CliError::Remote {
            target: format!("registry {}", self.registry.endpoint()),
            source,
        }
    }

    /// The node client for `target` and the label used in messages.
    fn node(&mut self, target: &str) -> Result<(&mut GroupClient, String), CliError> {
        let (endpoint, name) = match Target::parse(target)? {
            Target::Address(e) => (e, None),
            Target::Name(name) => match self.registry.lookup(&name) {
                Ok(entry) => (entry.endpoint, Some(name)),
                Err(ClientError::Server(w)) if w.code == ErrorCode::UnknownGroup => {
                    return Err(CliError::Remote {
                        target: target.to_owned(),
                        source: ClientError::Server(w),
                    })
                }
                Err(e) => return Err(self.registry_error(e)),
            },
        };
        let (ctx, user, options) = (&self.ctx, &self.user, self.options);
        let client = self.nodes.entry(endpoint.clone()).or_insert_with(|| {
            GroupClient::new(ctx, endpoint.as_str(), user.clone(), name, options)
        });
        Ok((client, target.to_owned()))
    }

    /// `get_group_list` / `groups`.
    ///
    /// # Errors
    /// The registry's failure.
    pub fn groups(&mut self, out: &mut dyn Write) -> Result<(), CliError> {
        let groups = self.registry.list().map_err(|e| self.registry_error(e))?;
        for g in &groups {
            match self.format {
                Format::Human => writeln!(out, "{}", render::group_line(g))?,
                Format::Json => writeln!(out, "{}", render::json_line(g))?,
            }
        }
        if groups.is_empty() && self.format == Format::Human {
            writeln!(out, "no groups")?;
        }
        Ok(())
    }

    /// `join_group` / `join`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn join(&mut self, target: &str, out: &mut dyn Write) -> Result<(), CliError> {
        let format = self.format;
        let (node, label) = self.node(target)?;
        let r = node.join().map_err(|source| remote(&label, source))?;
        match format {
            Format::Json => writeln!(out, "{}", render::json_line(&r))?,
            Format::Human if r.changed => {
                writeln!(out, "joined {} (last seq {})", r.group, r.last_seq)?
            }
            Format::Human => writeln!(out, "already a member of {}", r.group)?,
        }
        Ok(())
    }

    /// `leave_group` / `leave`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn leave(&mut self, target: &str, out: &mut dyn Write) -> Result<(), CliError> {
        let format = self.format;
        let (node, label) = self.node(target)?;
        let r = node.leave().map_err(|source| remote(&label, source))?;
        match format {
            Format::Json => writeln!(out, "{}", render::json_line(&r))?,
            Format::Human if r.changed => writeln!(out, "left {}", r.group)?,
            Format::Human => writeln!(out, "not a member of {}", r.group)?,
        }
        Ok(())
    }

    /// `members`.
    ///
    /// # Errors
    /// Resolution or node failures.
    pub fn members(&mut self, target: &str, out: &mut dyn Write) -> Result<(), CliError> {
        let format = self.format;
        let (node, label) = self.node(target)?;
        let r = node.members().map_err(|source| remote(&label, source))?;
        for m in &r.members {
            match format {
                Format::Human => writeln!(out, "{}", render::member_line(m))?,
                Format::Json => writeln!(out, "{}", render::json_line(m))?,
            }
        }
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
        out: &mut dyn Write,
    ) -> Result<(), CliError> {
        let format = self.format;
        let (node, label) = self.node(target)?;
        let body = RawValue::from_string(body)
            .map_err(|e| CliError::Usage(format!("body is not JSON: {e}")))?;
        let len = body.get().len();
        // Past the overhead room, libzmq would drop the connection instead of letting the
        // node answer `too_large`: ask for the limit first and refuse here.
        if len > REQUEST_OVERHEAD_BYTES {
            let info = node.info().map_err(|source| remote(&label, source))?;
            if len as u64 > info.max_message_bytes {
                return Err(CliError::TooLarge {
                    target: label,
                    len,
                    max: info.max_message_bytes,
                });
            }
        }
        let ack = node.send(body).map_err(|source| remote(&label, source))?;
        match format {
            Format::Json => writeln!(out, "{}", render::json_line(&ack))?,
            Format::Human => writeln!(
                out,
                "sent to {label}: seq {} at {}",
                ack.seq,
                render::local_time(ack.time)
            )?,
        }
        Ok(())
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
        out: &mut dyn Write,
    ) -> Result<(), CliError> {
        let query = history_query(args)?;
        let format = self.format;
        let (node, label) = self.node(target)?;
        let mut write_err = None;
        let mut count = 0usize;
        node.for_each_page(query, None, |page| {
            for m in &page.messages {
                count += 1;
                let line = match format {
                    Format::Human => render::message_line(page.group.as_str(), m),
                    Format::Json => render::json_line(m),
                };
                if let Err(e) = writeln!(out, "{line}") {
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
        if count == 0 && format == Format::Human {
            writeln!(out, "no messages")?;
        }
        Ok(())
    }
}

fn remote(label: &str, source: ClientError) -> CliError {
    CliError::Remote {
        target: label.to_owned(),
        source,
    }
}

/// The protocol query for the CLI's history options.
///
/// # Errors
/// [`CliError::Usage`] for more than one selector, a bad time or a bad id.
pub fn history_query(args: &HistoryArgs) -> Result<HistoryQuery, CliError> {
    let given = [
        args.since.is_some(),
        args.after_seq.is_some(),
        args.id.is_some(),
        args.latest.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(CliError::Usage(
            "give at most one of --since, --after-seq, --id and --latest".into(),
        ));
    }
    if let Some(since) = &args.since {
        let t = parse_since_local(since).map_err(|e| CliError::Usage(e.to_string()))?;
        return Ok(HistoryQuery::Since(t));
    }
    if let Some(id) = &args.id {
        let id = id
            .parse()
            .map_err(|e| CliError::Usage(format!("invalid message id {id:?}: {e}")))?;
        return Ok(HistoryQuery::ById(id));
    }
    if let Some(n) = args.latest {
        return Ok(HistoryQuery::Latest(n));
    }
    Ok(HistoryQuery::AfterSeq(args.after_seq.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_with_a_numeric_port_are_addresses() {
        assert!(matches!(
            Target::parse("127.0.0.1:5560"),
            Ok(Target::Address(_))
        ));
        assert!(matches!(
            Target::parse("tcp://host:1"),
            Ok(Target::Address(_))
        ));
        assert!(matches!(Target::parse("Cool Group"), Ok(Target::Name(_))));
        assert!(matches!(Target::parse("news: today"), Ok(Target::Name(_))));
        assert!(matches!(
            Target::parse("127.0.0.1:0"),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn history_args_allow_one_selector() {
        let two = HistoryArgs {
            since: Some("10:00:00".into()),
            latest: Some(3),
            ..Default::default()
        };
        assert!(matches!(history_query(&two), Err(CliError::Usage(_))));
        let bad = HistoryArgs {
            since: Some("noon".into()),
            ..Default::default()
        };
        assert!(matches!(history_query(&bad), Err(CliError::Usage(_))));
        assert_eq!(
            history_query(&HistoryArgs::default()).ok(),
            Some(HistoryQuery::AfterSeq(0))
        );
    }
}
