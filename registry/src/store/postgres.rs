//! The PostgreSQL backend: several registries over one database behave as one registry.
//!
//! Everything lives in the schema `agora_registry` (so that group nodes' schemas can share
//! the database): the directory, name owners, accounts, presence sessions, mailboxes, dead
//! letters, and the registry's key pair. One synchronous connection per registry, owned by
//! its socket thread (no async); it is opened again on the next call after it breaks.
//!
//! # Time
//! Every expiry is decided by the database's clock (`now()`, `clock_timestamp()`), never
//! a host's, so that registries on different hosts agree: a group entry stores its
//! `expires_at` (last heartbeat plus the TTL of the registry that took it), a session its
//! `expires_at`, a DM its `time`. The `now` arguments of [`RegistryStore`] are ignored.
//! Times are `timestamptz`, read back as microseconds since the Unix epoch (`us()`).
//!
//! # Schema
//! [`MIGRATIONS`], applied in order at connect, each recorded in `schema_version`, all in one
//! transaction under `pg_advisory_xact_lock(`[`MIGRATION_LOCK`]`)`, so that registries
//! starting at once never race; a database of a newer version than this build knows is
//! refused ([`StoreError::SchemaTooNew`]).
//!
//! # Key pair
//! Table `key_pair` holds one row: the public key and the secret certificate (the text of a
//! `registry.key_secret` file). The first registry on an empty database inserts its own
//! (`ON CONFLICT DO NOTHING`); every registry then serves the stored one, read from the row
//! (no copy of the secret is written to its data directory; the `store-key/` copy that
//! earlier builds wrote there is removed).
//!
//! # Concurrency between registries
//! - Mailbox numbers come from a per-recipient counter, `mailbox_next`, incremented with
//!   `INSERT … ON CONFLICT DO UPDATE … RETURNING` in the storing transaction: the row lock
//!   serializes the recipient's stores across registries, so numbers are never given twice,
//!   and the mailbox's maximum is counted under it.
//! - A directory change that is not a plain refresh takes a transaction-scoped advisory
//!   lock on the group's name.
//! - Group names and accounts are claimed with `INSERT … ON CONFLICT DO NOTHING`: of two
//!   registries claiming at once, one wins and the other sees the winner.
//! - A stored DM sends `NOTIFY agora_registry_dm, 'KEY N'` within its transaction (so on
//!   commit); every registry `LISTEN`s, and [`RegistryStore::stored_elsewhere`] hands it the
//!   messages that other registries stored, to push to recipients connected to it.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use agora_common::keys::{secret_path, KeyError, Keypair, PublicKey};
use agora_common::pgtls::{PgConnector, PgTlsFiles};
use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    BlockedEntry, DeadLetter, Dm, Endpoint, ErrorCode, GroupEntry, GroupName, Presence, UserEntry,
    UserName, WireError,
};
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, GenericClient, Row};
use serde_json::value::RawValue;

use super::{GroupRegistration, Refusable, RegistryStore, StoreError, StoreSettings};
use crate::mailbox::{Copy, MailboxError, Stored, MAX_DEAD_LETTERS};

/// The advisory lock key migrations hold (`pg_advisory_xact_lock`): "agorar" in ASCII.
pub const MIGRATION_LOCK: i64 = 0x6167_6f72_6172;
/// The advisory lock class of directory changes; the object is the group name's hash.
const DIRECTORY_LOCK: i32 = 0x6167_6f72;

/// The transaction-level advisory lock that account creations take, in registries sharing
/// the database, to count and insert without another coming between (`max_users`).
const ACCOUNTS_LOCK: i64 = 0x6167_6f72_6163;

/// The advisory lock class that name claims take, the object being the claiming key's
/// hash, to count a key's names and bind one without another registry coming between
/// (`max_names_per_key`).
const CLAIM_LOCK: i32 = 0x6167_6f6e;

/// The advisory lock class that `block` takes, the object being the blocker's hash, to
/// count and insert without another registry coming between ([`super::MAX_BLOCKS`]).
const BLOCK_LOCK: i32 = 0x6167_6f62;

/// The transaction-level advisory lock that new directory entries take, after their name's
/// lock, to count and insert without another coming between (`max_groups`).
const NEW_GROUP_LOCK: i64 = 0x6167_6f72_6764;
/// The channel of `NOTIFY` for stored DMs; the payload is `KEY N` (Z85 key, number).
pub const DM_CHANNEL: &str = "agora_registry_dm";
/// How long connecting may take (default of this backend: 10 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`RegistryStore::stored_elsewhere`] reads the database's notices (50 ms):
/// the longest a DM stored through another registry waits, beyond the loop's own turn,
/// before it is pushed from this one.
pub const NOTICE_POLL: Duration = Duration::from_millis(50);
/// How long each read of the notices may wait for the connection (1 ms). The synchronous
/// client reads what arrived on its socket only while it waits, so a read that never
/// waits sees only what other calls happened to read.
const NOTICE_WAIT: Duration = Duration::from_millis(1);
/// The most notices handed over by one call (the rest wait for the next).
const MAX_NOTICES: usize = 1000;
/// How long after a failed attempt to connect again the next is made (1 s): meanwhile calls
/// fail at once with [`StoreError::Disconnected`] rather than stall the loop.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// The longest any one statement may run before the server cancels it (10 s), so that a
/// stuck lock never stalls the registry's loop for good.
pub const STATEMENT_TIMEOUT: &str = "10s";

/// The schema's migrations: entry `i` takes the schema from version `i` to `i + 1`. Never
/// edit one that has shipped; append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: everything the registry keeps.
    r#"
    CREATE FUNCTION agora_registry.us(t timestamptz) RETURNS bigint
        LANGUAGE sql STABLE AS $$ SELECT (extract(epoch FROM t) * 1000000)::bigint $$;
    CREATE FUNCTION agora_registry.ts(us bigint) RETURNS timestamptz
        LANGUAGE sql IMMUTABLE AS $$
        SELECT timestamptz 'epoch' + (us / 1000000) * interval '1 second'
                                   + (us % 1000000) * interval '1 microsecond' $$;
    CREATE TABLE agora_registry.key_pair (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        public_key text NOT NULL,
        secret_certificate text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE agora_registry.groups (
        name text PRIMARY KEY,
        endpoint text NOT NULL,
        members bigint NOT NULL,
        public_key text,
        registered_at timestamptz NOT NULL,
        last_heartbeat timestamptz NOT NULL,
        expires_at timestamptz NOT NULL);
    CREATE INDEX groups_endpoint ON agora_registry.groups (endpoint);
    CREATE INDEX groups_expires_at ON agora_registry.groups (expires_at);
    CREATE TABLE agora_registry.owners (
        name text PRIMARY KEY,
        key text NOT NULL,
        bound_at timestamptz NOT NULL);
    CREATE TABLE agora_registry.users (
        name text PRIMARY KEY,
        key text NOT NULL UNIQUE,
        registered_at timestamptz NOT NULL,
        last_seen timestamptz);
    CREATE TABLE agora_registry.sessions (
        key text PRIMARY KEY,
        status text NOT NULL CHECK (status IN ('online', 'away')),
        expires_at timestamptz NOT NULL);
    CREATE TABLE agora_registry.mailbox (
        recipient text NOT NULL,
        n bigint NOT NULL,
        id bytea NOT NULL UNIQUE,
        sender text NOT NULL,
        sender_key text NOT NULL,
        time timestamptz NOT NULL,
        body text NOT NULL,
        acked boolean NOT NULL DEFAULT false,
        PRIMARY KEY (recipient, n));
    CREATE INDEX mailbox_time ON agora_registry.mailbox (time);
    CREATE TABLE agora_registry.mailbox_next (
        recipient text PRIMARY KEY,
        next_n bigint NOT NULL);
    CREATE TABLE agora_registry.dead_letters (
        sender_key text NOT NULL,
        n bigserial,
        time timestamptz NOT NULL,
        recipient text NOT NULL,
        reason text NOT NULL,
        body text NOT NULL,
        PRIMARY KEY (sender_key, n));
    "#,
    // 2: name bindings lapse (the owner's last registration) and are counted per key;
    // blocks between accounts.
    r#"
    ALTER TABLE agora_registry.owners ADD COLUMN seen_at timestamptz;
    CREATE INDEX owners_key ON agora_registry.owners (key);
    CREATE TABLE agora_registry.blocks (
        blocker text NOT NULL,
        blocked_key text NOT NULL,
        blocked_name text NOT NULL,
        since timestamptz NOT NULL,
        PRIMARY KEY (blocker, blocked_key));
    CREATE INDEX blocks_blocked ON agora_registry.blocks (blocked_key);
    "#,
    // 3: bindings made before lapsing existed (or under 2, which left them NULL) count as
    // seen at the migration, so that a name bound more than a lapse ago is not free at once.
    r#"
    UPDATE agora_registry.owners SET seen_at = now() WHERE seen_at IS NULL;
    "#,
    // 4: entries held by a group host (`register_groups`, PROTOCOL §4.1.1), refreshed
    // together by its `heartbeat_host`.
    r#"
    ALTER TABLE agora_registry.groups ADD COLUMN held boolean NOT NULL DEFAULT false;
    "#,
];

/// The schema version this build migrates to.
pub fn schema_version() -> i32 {
    i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)
}

/// All registry state in one PostgreSQL database (see the module docs).
pub struct PgStore {
    connector: PgConnector,
    client: Client,
    /// This connection's server process, to tell its own `NOTIFY`s from others'.
    backend_pid: i32,
    settings: StoreSettings,
    /// While the connection is broken: not before this instant is connecting tried again.
    retry_at: Option<Instant>,
    /// Not before this instant are notices read again ([`NOTICE_POLL`]).
    next_notice_read: Instant,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `url` (within [`CONNECT_TIMEOUT`]; over TLS set up from `tls`: verified
    /// against its CA file and presenting its client certificate if given, or when the URL
    /// says `sslmode=require`, as [`agora_common::pgtls`] says), migrates the schema `agora_registry` to
    /// [`schema_version`], and listens for DMs stored by other registries.
    ///
    /// # Errors
    /// [`StoreError::Postgres`] (a bad URL, no connection, a failed TLS handshake, a failed
    /// migration), [`StoreError::PgTls`] (a bad CA, certificate or key file), [`StoreError::SchemaTooNew`].
    pub fn connect(
        url: &str,
        tls: &PgTlsFiles,
        settings: StoreSettings,
    ) -> Result<PgStore, StoreError> {
        let mut config = postgres::Config::from_str(url)?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("agora-registry");
        let connector = PgConnector::new(config, tls)?;
        connector.warn_if_plain();
        let mut client = connector.connect()?;
        migrate(&mut client)?;
        let backend_pid = prepare_session(&mut client)?;
        Ok(PgStore {
            connector,
            client,
            backend_pid,
            settings,
            retry_at: None,
            next_notice_read: Instant::now(),
        })
    }

    /// The connection, opened again first if it broke (at most once per
    /// [`RECONNECT_INTERVAL`]; DM notices sent meanwhile are lost, the DMs are not).
    ///
    /// # Errors
    /// [`StoreError::Disconnected`] until the next attempt is due; [`StoreError::Postgres`]
    /// when the attempt fails.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.is_closed() {
            let now = Instant::now();
            if self.retry_at.is_some_and(|at| now < at) {
                return Err(StoreError::Disconnected);
            }
            self.retry_at = Some(now + RECONNECT_INTERVAL);
            tracing::warn!("the PostgreSQL connection broke; connecting again");
            let mut client = self.connector.connect()?;
            self.backend_pid = prepare_session(&mut client)?;
            self.client = client;
            self.retry_at = None;
            tracing::info!("connected to PostgreSQL again");
        }
        Ok(&mut self.client)
    }

    fn ttl_secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }
}

/// Sets the session up (search path, statement timeout, `LISTEN`); returns its backend pid.
fn prepare_session(client: &mut Client) -> Result<i32, StoreError> {
    client.batch_execute(&format!(
        "SET search_path TO agora_registry; SET statement_timeout = '{STATEMENT_TIMEOUT}'; \
         LISTEN {DM_CHANNEL};"
    ))?;
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])?
        .try_get(0)?)
}

/// Creates the schema and applies the missing [`MIGRATIONS`], in one transaction under
/// [`MIGRATION_LOCK`].
///
/// # Errors
/// [`StoreError::SchemaTooNew`], [`StoreError::Postgres`].
pub fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
         CREATE SCHEMA IF NOT EXISTS agora_registry;
         CREATE TABLE IF NOT EXISTS agora_registry.schema_version (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now());"
    ))?;
    let found: Option<i32> = tx
        .query_one(
            "SELECT max(version) FROM agora_registry.schema_version",
            &[],
        )?
        .try_get(0)?;
    let found = found.unwrap_or(0);
    let known = schema_version();
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (version, sql) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO agora_registry.schema_version (version) VALUES ($1)",
            &[&version],
        )?;
        tracing::info!(version, "registry schema migrated");
    }
    tx.commit()?;
    Ok(())
}

fn corrupt(what: &'static str, value: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what,
        value: value.into(),
    }
}

fn parse_key(text: String) -> Result<PublicKey, StoreError> {
    text.parse().map_err(|_| corrupt("key", text))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The columns [`group_row`] reads.
const GROUP_COLUMNS: &str =
    "name, endpoint, members, public_key, us(registered_at), us(last_heartbeat)";

fn group_row(row: &Row) -> Result<GroupEntry, StoreError> {
    let name: String = row.try_get(0)?;
    let endpoint: String = row.try_get(1)?;
    let key: Option<String> = row.try_get(3)?;
    Ok(GroupEntry {
        name: GroupName::new(name.clone()).map_err(|_| corrupt("group name", name))?,
        endpoint: Endpoint::new(endpoint.clone()).map_err(|_| corrupt("endpoint", endpoint))?,
        members: to_u64(row.try_get(2)?),
        registered_at: Timestamp::from_micros(row.try_get(4)?),
        last_heartbeat: Timestamp::from_micros(row.try_get(5)?),
        public_key: key.map(parse_key).transpose()?,
    })
}

/// An account with its presence: users `u` joined to sessions `s`.
const USER_QUERY: &str = "SELECT u.name, u.key, us(u.registered_at), us(u.last_seen),
        CASE WHEN s.expires_at > now() THEN s.status ELSE 'offline' END
    FROM users u LEFT JOIN sessions s ON s.key = u.key";

fn user_row(row: &Row) -> Result<UserEntry, StoreError> {
    let name: String = row.try_get(0)?;
    let presence: String = row.try_get(4)?;
    Ok(UserEntry {
        name: UserName::new(name.clone()).map_err(|_| corrupt("user name", name))?,
        key: parse_key(row.try_get(1)?)?,
        registered_at: Timestamp::from_micros(row.try_get(2)?),
        presence: match presence.as_str() {
            "online" => Presence::Online,
            "away" => Presence::Away,
            _ => Presence::Offline,
        },
        last_seen: row
            .try_get::<_, Option<i64>>(3)?
            .map(Timestamp::from_micros),
    })
}

fn presence_text(status: Presence) -> &'static str {
    match status {
        Presence::Away => "away",
        _ => "online",
    }
}

/// Records a dead letter and trims the sender's to the newest [`MAX_DEAD_LETTERS`].
fn dead_letter(
    client: &mut impl GenericClient,
    sender_key: &str,
    to: &str,
    reason: &str,
    body: &RawValue,
) -> Result<(), StoreError> {
    client.execute(
        "INSERT INTO dead_letters (sender_key, time, recipient, reason, body)
         VALUES ($1, clock_timestamp(), $2, $3, $4)",
        &[&sender_key, &to, &reason, &body.get()],
    )?;
    client.execute(
        "DELETE FROM dead_letters WHERE sender_key = $1 AND n <= (
             SELECT n FROM dead_letters WHERE sender_key = $1
             ORDER BY n DESC OFFSET $2 LIMIT 1)",
        &[&sender_key, &MAX_DEAD_LETTERS],
    )?;
    Ok(())
}

/// What [`store_one`] did with one copy.
enum StoreOne {
    Stored(Stored),
    Full,
    ShareFull,
}

/// Stores one message for `to` inside `tx` (see [`RegistryStore::store_dm`]): locks the
/// recipient's counter row first, so the id check, the count and the number are exact
/// under concurrent registries. The caller commits or drops (rolls back) `tx`.
#[allow(clippy::too_many_arguments)]
fn store_one(
    tx: &mut postgres::Transaction<'_>,
    to: &str,
    sender: &UserName,
    from: &str,
    id: Option<MessageId>,
    body: &RawValue,
    max: u64,
    share: u64,
) -> Result<StoreOne, MailboxError> {
    let n: i64 = tx
        .query_one(
            "INSERT INTO mailbox_next (recipient, next_n) VALUES ($1, 2)
             ON CONFLICT (recipient) DO UPDATE SET next_n = mailbox_next.next_n + 1
             RETURNING next_n - 1",
            &[&to],
        )
        .map_err(StoreError::from)?
        .try_get(0)
        .map_err(StoreError::from)?;
    if let Some(id) = id {
        let found = tx
            .query_opt(
                "SELECT n, us(time), recipient, sender_key, body FROM mailbox WHERE id = $1",
                &[&id.as_bytes().as_slice()],
            )
            .map_err(StoreError::from)?;
        if let Some(row) = found {
            let get = |row: &Row| -> Result<(i64, i64, String, String, String), StoreError> {
                Ok((
                    row.try_get(0)?,
                    row.try_get(1)?,
                    row.try_get(2)?,
                    row.try_get(3)?,
                    row.try_get(4)?,
                ))
            };
            let (n, t, r, k, b) = get(&row)?;
            if r == to && k == from && b == body.get() {
                return Ok(StoreOne::Stored((
                    to_u64(n),
                    id,
                    Timestamp::from_micros(t),
                    true,
                )));
            }
            return Err(MailboxError::IdConflict(id));
        }
    }
    let counts = tx
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE sender_key = $2) FROM mailbox
             WHERE recipient = $1 AND NOT acked",
            &[&to, &from],
        )
        .map_err(StoreError::from)?;
    let waiting: i64 = counts.try_get(0).map_err(StoreError::from)?;
    let mine: i64 = counts.try_get(1).map_err(StoreError::from)?;
    if to_u64(waiting) >= max {
        return Ok(StoreOne::Full);
    }
    if to_u64(mine) >= share {
        return Ok(StoreOne::ShareFull);
    }
    let id = id.unwrap_or_else(MessageId::new_v7);
    let inserted = tx.query_one(
        "INSERT INTO mailbox (recipient, n, id, sender, sender_key, time, body)
         VALUES ($1, $2, $3, $4, $5, clock_timestamp(), $6) RETURNING us(time)",
        &[
            &to,
            &n,
            &id.as_bytes().as_slice(),
            &sender.as_str(),
            &from,
            &body.get(),
        ],
    );
    let time: i64 = match inserted {
        Ok(row) => row.try_get(0).map_err(StoreError::from)?,
        // The id is another recipient's message, stored meanwhile.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(MailboxError::IdConflict(id))
        }
        Err(e) => return Err(StoreError::from(e).into()),
    };
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&DM_CHANNEL, &format!("{to} {n}")],
    )
    .map_err(StoreError::from)?;
    Ok(StoreOne::Stored((
        to_u64(n),
        id,
        Timestamp::from_micros(time),
        false,
    )))
}

impl RegistryStore for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn key_pair(&mut self, data_dir: &Path) -> Result<(Keypair, bool), StoreError> {
        let select = "SELECT public_key, secret_certificate FROM key_pair";
        let read = |row: Row| -> Result<(String, String), StoreError> {
            Ok((row.try_get(0)?, row.try_get(1)?))
        };
        let local = data_dir.join("registry.key");
        let client = self.client()?;
        let mut created = false;
        let (public, certificate) = match client.query_opt(select, &[])? {
            Some(row) => read(row)?,
            None => {
                // An empty database: offer this registry's pair (made now if it has none).
                let (pair, made) = Keypair::load_or_generate(&local)?;
                let secret = secret_path(&local);
                let text = std::fs::read_to_string(&secret).map_err(|source| KeyError::Io {
                    path: secret,
                    source,
                })?;
                client.execute(
                    "INSERT INTO key_pair (public_key, secret_certificate) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[&pair.public.to_string(), &text],
                )?;
                let stored = read(client.query_one(select, &[])?)?;
                created = made && stored.0 == pair.public.to_string();
                stored
            }
        };
        let pair = Keypair::from_certificate(
            &certificate,
            Path::new("the PostgreSQL table agora_registry.key_pair"),
        )?;
        if pair.public.to_string() != public {
            return Err(corrupt("key pair", public));
        }
        // Earlier builds wrote a copy of the stored secret here; nothing reads it now.
        let copy = data_dir.join("store-key");
        if copy.exists() {
            match std::fs::remove_dir_all(&copy) {
                Ok(()) => {
                    tracing::info!(path = %copy.display(), "removed the old copy of the stored key pair")
                }
                Err(e) => {
                    tracing::warn!(path = %copy.display(), error = %e, "could not remove the old copy of the stored key pair")
                }
            }
        }
        Ok((pair, created))
    }

    fn register_group(
        &mut self,
        group: GroupRegistration,
        owner_verified: bool,
        _now: Timestamp,
    ) -> Refusable<GroupEntry> {
        let ttl = Self::ttl_secs(self.settings.group_ttl);
        let max = i64::try_from(self.settings.max_groups).unwrap_or(i64::MAX);
        let name = group.name.as_str();
        let endpoint = group.endpoint.as_str();
        let members = to_i64(group.members);
        let key = group.public_key.map(|k| k.to_string());
        let by_host = group.host;
        let client = self.client()?;
        // The heartbeat: a live entry refreshed from its own endpoint, one statement.
        let refreshed = client.query_opt(
            &format!(
                "UPDATE groups SET last_heartbeat = now(),
                     expires_at = now() + $5 * interval '1 second', members = $3, public_key = $4,
                     held = $6
                 WHERE name = $1 AND endpoint = $2 AND expires_at > now()
                 RETURNING {GROUP_COLUMNS}"
            ),
            &[&name, &endpoint, &members, &key, &ttl, &by_host],
        )?;
        if let Some(row) = refreshed {
            return Ok(Ok(group_row(&row)?));
        }
        let mut tx = client.transaction()?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&DIRECTORY_LOCK, &name],
        )?;
        let held = tx.query_opt(
            "SELECT endpoint FROM groups WHERE name = $1 AND expires_at > now() FOR UPDATE",
            &[&name],
        )?;
        if let Some(row) = held {
            let holder: String = row.try_get(0)?;
            if holder != endpoint && !owner_verified {
                return Ok(Err(WireError::new(
                    ErrorCode::NameTaken,
                    format!("group \"{name}\" is held by {holder}"),
                )));
            }
            if holder == endpoint {
                // Refreshed by another registry meanwhile: refresh it again.
                let row = tx.query_one(
                    &format!(
                        "UPDATE groups SET last_heartbeat = now(),
                             expires_at = now() + $4 * interval '1 second',
                             members = $2, public_key = $3, held = $5
                         WHERE name = $1 RETURNING {GROUP_COLUMNS}"
                    ),
                    &[&name, &members, &key, &ttl, &by_host],
                )?;
                let entry = group_row(&row)?;
                tx.commit()?;
                return Ok(Ok(entry));
            }
        } else {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&NEW_GROUP_LOCK])?;
            tx.execute("DELETE FROM groups WHERE expires_at <= now()", &[])?;
            // Without ownership, entries at this endpoint are dropped below: not counted.
            let live: i64 = tx
                .query_one(
                    "SELECT count(*) FROM groups WHERE name <> $1 AND ($3 OR endpoint <> $2)",
                    &[&name, &endpoint, &owner_verified],
                )?
                .try_get(0)?;
            if live >= max {
                return Ok(Err(WireError::new(
                    ErrorCode::LimitReached,
                    format!("the registry holds its maximum of {max} groups"),
                )));
            }
        }
        // Without ownership (--insecure) one endpoint is one node: an entry of another name
        // there is dropped. With it, one endpoint may serve many groups, and another key's
        // entry is not the caller's to drop; a host's names (`register_groups`) are kept.
        if !owner_verified && !by_host {
            tx.execute(
                "DELETE FROM groups WHERE endpoint = $2 AND name <> $1",
                &[&name, &endpoint],
            )?;
        }
        let row = tx.query_one(
            &format!(
                "INSERT INTO groups (name, endpoint, members, public_key, registered_at,
                     last_heartbeat, expires_at, held)
                 VALUES ($1, $2, $3, $4, now(), now(), now() + $5 * interval '1 second', $6)
                 ON CONFLICT (name) DO UPDATE SET endpoint = excluded.endpoint,
                     members = excluded.members, public_key = excluded.public_key,
                     registered_at = excluded.registered_at,
                     last_heartbeat = excluded.last_heartbeat, expires_at = excluded.expires_at,
                     held = excluded.held
                 RETURNING {GROUP_COLUMNS}"
            ),
            &[&name, &endpoint, &members, &key, &ttl, &by_host],
        )?;
        let entry = group_row(&row)?;
        tx.commit()?;
        Ok(Ok(entry))
    }

    /// One statement over the host's rows (the `groups_endpoint` index): every registry
    /// sharing the database sees their new `expires_at`.
    fn heartbeat_host(
        &mut self,
        endpoint: &Endpoint,
        public_key: Option<PublicKey>,
        _now: Timestamp,
    ) -> Result<u64, StoreError> {
        let ttl = Self::ttl_secs(self.settings.group_ttl);
        let key = public_key.map(|k| k.to_string());
        let n = self.client()?.execute(
            "UPDATE groups SET last_heartbeat = now(), expires_at = now() + $3 * interval '1 second'
             WHERE endpoint = $1 AND public_key IS NOT DISTINCT FROM $2 AND held
                 AND expires_at > now()",
            &[&endpoint.as_str(), &key, &ttl],
        )?;
        Ok(n)
    }

    fn unregister_group(
        &mut self,
        name: &GroupName,
        endpoint: &Endpoint,
        _now: Timestamp,
    ) -> Refusable<()> {
        let mut tx = self.client()?.transaction()?;
        let held = tx.query_opt(
            "SELECT endpoint FROM groups WHERE name = $1 AND expires_at > now() FOR UPDATE",
            &[&name.as_str()],
        )?;
        let holder: String = match held {
            None => {
                return Ok(Err(WireError::new(
                    ErrorCode::UnknownGroup,
                    format!("no live group named \"{name}\""),
                )))
            }
            Some(row) => row.try_get(0)?,
        };
        if holder != endpoint.as_str() {
            return Ok(Err(WireError::new(
                ErrorCode::NameTaken,
                format!("group \"{name}\" is held by {holder}, not {endpoint}"),
            )));
        }
        tx.execute("DELETE FROM groups WHERE name = $1", &[&name.as_str()])?;
        tx.commit()?;
        Ok(Ok(()))
    }

    fn list_groups(&mut self, _now: Timestamp) -> Result<Vec<GroupEntry>, StoreError> {
        let rows = self.client()?.query(
            &format!(
                "SELECT {GROUP_COLUMNS} FROM groups WHERE expires_at > now()
                 ORDER BY name COLLATE \"C\""
            ),
            &[],
        )?;
        rows.iter().map(group_row).collect()
    }

    fn count_groups(&mut self, _now: Timestamp) -> Result<u64, StoreError> {
        let row = self
            .client()?
            .query_one("SELECT count(*) FROM groups WHERE expires_at > now()", &[])?;
        Ok(to_u64(row.try_get(0)?))
    }

    fn lookup_group(
        &mut self,
        name: &GroupName,
        _now: Timestamp,
    ) -> Result<Option<GroupEntry>, StoreError> {
        let row = self.client()?.query_opt(
            &format!("SELECT {GROUP_COLUMNS} FROM groups WHERE name = $1 AND expires_at > now()"),
            &[&name.as_str()],
        )?;
        row.as_ref().map(group_row).transpose()
    }

    fn expire_groups(&mut self, _now: Timestamp) -> Result<Vec<GroupName>, StoreError> {
        let rows = self.client()?.query(
            "DELETE FROM groups WHERE expires_at <= now() RETURNING name",
            &[],
        )?;
        rows.iter()
            .map(|row| {
                let name: String = row.try_get(0)?;
                GroupName::new(name.clone()).map_err(|_| corrupt("group name", name))
            })
            .collect()
    }

    fn claim_group(
        &mut self,
        name: &GroupName,
        key: &PublicKey,
        now: Timestamp,
    ) -> Refusable<(PublicKey, bool)> {
        let max = self.settings.max_names_per_key;
        self.claim_group_up_to(name, key, max, now)
    }

    fn claim_group_up_to(
        &mut self,
        name: &GroupName,
        key: &PublicKey,
        max: u64,
        _now: Timestamp,
    ) -> Refusable<(PublicKey, bool)> {
        let lapse = Self::ttl_secs(self.settings.name_lapse);
        let touch = Self::ttl_secs(super::seen_interval(self.settings.name_lapse));
        let client = self.client()?;
        let (name, key) = (name.as_str(), key.to_string());
        // The heartbeat: a binding that has not lapsed, one statement (and a write only
        // when the owner's last registration is older than a tenth of the lapse).
        let held = client.query_opt(
            "WITH b AS (
                 SELECT key, COALESCE(seen_at, bound_at) AS seen FROM owners WHERE name = $1),
             touched AS (
                 UPDATE owners SET seen_at = now()
                 WHERE name = $1 AND key = $2
                     AND COALESCE(seen_at, bound_at) > now() - $3 * interval '1 second'
                     AND COALESCE(seen_at, bound_at) <= now() - $4 * interval '1 second')
             SELECT key FROM b WHERE seen > now() - $3 * interval '1 second'",
            &[&name, &key, &lapse, &touch],
        )?;
        if let Some(row) = held {
            return Ok(Ok((parse_key(row.try_get(0)?)?, false)));
        }
        // Unbound, or lapsed: claim it, counting the key's names under its lock.
        let mut tx = client.transaction()?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&CLAIM_LOCK, &key],
        )?;
        // The cap before a lapsed binding is deleted: a refused claim changes nothing (a
        // lapsed name's own binding does not count, being lapsed).
        let owned: i64 = tx
            .query_one(
                "SELECT count(*) FROM owners
                 WHERE key = $1 AND COALESCE(seen_at, bound_at) > now() - $2 * interval '1 second'",
                &[&key, &lapse],
            )?
            .try_get(0)?;
        let within = to_u64(owned) < max;
        let lapsed = tx.query_opt(
            "DELETE FROM owners
             WHERE $3 AND name = $1
                 AND COALESCE(seen_at, bound_at) <= now() - $2 * interval '1 second'
             RETURNING key",
            &[&name, &lapse, &within],
        )?;
        if let Some(row) = lapsed {
            let owner: String = row.try_get(0)?;
            tracing::info!(group = %name, %owner, "group name lapsed: its group did not register within the lapse");
        }
        let bound = tx.query_opt(
            "INSERT INTO owners (name, key, bound_at, seen_at)
             SELECT $1, $2, now(), now() WHERE $3
             ON CONFLICT (name) DO NOTHING RETURNING key",
            &[&name, &key, &within],
        )?;
        if let Some(row) = bound {
            let owner = parse_key(row.try_get(0)?)?;
            tx.commit()?;
            return Ok(Ok((owner, true)));
        }
        // Another registry bound it meanwhile, or the key is at its maximum (and a lapsed
        // binding, kept, is no one's).
        let row = tx.query_opt(
            "SELECT key FROM owners
             WHERE name = $1 AND COALESCE(seen_at, bound_at) > now() - $2 * interval '1 second'",
            &[&name, &lapse],
        )?;
        tx.commit()?;
        match row {
            Some(row) => Ok(Ok((parse_key(row.try_get(0)?)?, false))),
            None => Ok(Err(super::too_many_names(max))),
        }
    }

    /// One `register_groups`' claims in one transaction under the key's claim lock: one
    /// commit for the batch, not one per name (a host of 128 names per request would
    /// otherwise outlast its registrar's request timeout on a busy database). Each name
    /// follows [`RegistryStore::claim_group_up_to`]'s rules, the key's count kept as the
    /// batch binds.
    fn claim_groups_up_to(
        &mut self,
        names: &[GroupName],
        key: &PublicKey,
        max: u64,
        _now: Timestamp,
    ) -> Result<Vec<super::Claim>, StoreError> {
        let lapse = Self::ttl_secs(self.settings.name_lapse);
        let touch = Self::ttl_secs(super::seen_interval(self.settings.name_lapse));
        let key = key.to_string();
        let mut tx = self.client()?.transaction()?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&CLAIM_LOCK, &key],
        )?;
        let mut owned: i64 = tx
            .query_one(
                "SELECT count(*) FROM owners
                 WHERE key = $1 AND COALESCE(seen_at, bound_at) > now() - $2 * interval '1 second'",
                &[&key, &lapse],
            )?
            .try_get(0)?;
        let mut claims = Vec::with_capacity(names.len());
        for name in names {
            let name = name.as_str();
            // Held and not lapsed (by this key or another): as a single claim's heartbeat.
            let held = tx.query_opt(
                "WITH b AS (
                     SELECT key, COALESCE(seen_at, bound_at) AS seen FROM owners WHERE name = $1),
                 touched AS (
                     UPDATE owners SET seen_at = now()
                     WHERE name = $1 AND key = $2
                         AND COALESCE(seen_at, bound_at) > now() - $3 * interval '1 second'
                         AND COALESCE(seen_at, bound_at) <= now() - $4 * interval '1 second')
                 SELECT key FROM b WHERE seen > now() - $3 * interval '1 second'",
                &[&name, &key, &lapse, &touch],
            )?;
            if let Some(row) = held {
                claims.push(Ok((parse_key(row.try_get(0)?)?, false)));
                continue;
            }
            let within = to_u64(owned) < max;
            let lapsed = tx.query_opt(
                "DELETE FROM owners
                 WHERE $3 AND name = $1
                     AND COALESCE(seen_at, bound_at) <= now() - $2 * interval '1 second'
                 RETURNING key",
                &[&name, &lapse, &within],
            )?;
            if let Some(row) = lapsed {
                let owner: String = row.try_get(0)?;
                tracing::info!(group = %name, %owner, "group name lapsed: its group did not register within the lapse");
            }
            let bound = tx.query_opt(
                "INSERT INTO owners (name, key, bound_at, seen_at)
                 SELECT $1, $2, now(), now() WHERE $3
                 ON CONFLICT (name) DO NOTHING RETURNING key",
                &[&name, &key, &within],
            )?;
            if let Some(row) = bound {
                owned += 1;
                claims.push(Ok((parse_key(row.try_get(0)?)?, true)));
                continue;
            }
            let row = tx.query_opt(
                "SELECT key FROM owners
                 WHERE name = $1 AND COALESCE(seen_at, bound_at) > now() - $2 * interval '1 second'",
                &[&name, &lapse],
            )?;
            claims.push(match row {
                Some(row) => Ok((parse_key(row.try_get(0)?)?, false)),
                None => Err(super::too_many_names(max)),
            });
        }
        tx.commit()?;
        Ok(claims)
    }

    fn group_owner(&mut self, name: &GroupName) -> Result<Option<PublicKey>, StoreError> {
        let row = self
            .client()?
            .query_opt("SELECT key FROM owners WHERE name = $1", &[&name.as_str()])?;
        row.map(|row| parse_key(row.try_get(0)?)).transpose()
    }

    fn release_group(&mut self, name: &GroupName) -> Result<bool, StoreError> {
        Ok(self
            .client()?
            .execute("DELETE FROM owners WHERE name = $1", &[&name.as_str()])?
            == 1)
    }

    fn user_by_name(&mut self, name: &UserName) -> Result<Option<UserEntry>, StoreError> {
        let row = self.client()?.query_opt(
            &format!("{USER_QUERY} WHERE u.name = $1"),
            &[&name.as_str()],
        )?;
        row.as_ref().map(user_row).transpose()
    }

    fn user_by_key(&mut self, key: &PublicKey) -> Result<Option<UserEntry>, StoreError> {
        let row = self.client()?.query_opt(
            &format!("{USER_QUERY} WHERE u.key = $1"),
            &[&key.to_string()],
        )?;
        row.as_ref().map(user_row).transpose()
    }

    fn insert_user(&mut self, entry: &UserEntry) -> Result<bool, StoreError> {
        let max = self.settings.max_users;
        let mut tx = self.client()?.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ACCOUNTS_LOCK])?;
        let count: i64 = tx
            .query_one("SELECT count(*) FROM users", &[])?
            .try_get(0)?;
        if to_u64(count) >= max {
            return Err(StoreError::TooManyUsers(max));
        }
        let inserted = tx.execute(
            "INSERT INTO users (name, key, registered_at) VALUES ($1, $2, ts($3))
             ON CONFLICT DO NOTHING",
            &[
                &entry.name.as_str(),
                &entry.key.to_string(),
                &entry.registered_at.as_micros(),
            ],
        )?;
        tx.commit()?;
        Ok(inserted == 1)
    }

    fn remove_user(&mut self, name: &UserName, key: &PublicKey) -> Result<bool, StoreError> {
        let key = key.to_string();
        let mut tx = self.client()?.transaction()?;
        tx.execute("DELETE FROM mailbox WHERE recipient = $1", &[&key])?;
        tx.execute("DELETE FROM mailbox_next WHERE recipient = $1", &[&key])?;
        tx.execute("DELETE FROM sessions WHERE key = $1", &[&key])?;
        tx.execute("DELETE FROM blocks WHERE blocker = $1", &[&key])?;
        let removed = tx.execute("DELETE FROM users WHERE name = $1", &[&name.as_str()])?;
        tx.commit()?;
        Ok(removed == 1)
    }

    fn count_users(&mut self) -> Result<u64, StoreError> {
        let n: i64 = self
            .client()?
            .query_one("SELECT count(*) FROM users", &[])?
            .try_get(0)?;
        Ok(to_u64(n))
    }

    fn all_users(&mut self) -> Result<Vec<UserEntry>, StoreError> {
        let rows = self
            .client()?
            .query(&format!("{USER_QUERY} ORDER BY u.name COLLATE \"C\""), &[])?;
        rows.iter().map(user_row).collect()
    }

    fn renew_session(
        &mut self,
        key: &PublicKey,
        status: Presence,
        now: Timestamp,
    ) -> Result<Timestamp, StoreError> {
        let ttl = Self::ttl_secs(self.settings.presence_ttl);
        let row = self.client()?.query_opt(
            "WITH s AS (
                 INSERT INTO sessions (key, status, expires_at)
                 VALUES ($1, $2, now() + $3 * interval '1 second')
                 ON CONFLICT (key) DO UPDATE
                     SET status = excluded.status, expires_at = excluded.expires_at)
             UPDATE users SET last_seen = now() WHERE key = $1 RETURNING us(last_seen)",
            &[&key.to_string(), &presence_text(status), &ttl],
        )?;
        match row {
            Some(row) => Ok(Timestamp::from_micros(row.try_get(0)?)),
            None => Ok(now),
        }
    }

    fn end_session(&mut self, key: &PublicKey, now: Timestamp) -> Result<Timestamp, StoreError> {
        let row = self.client()?.query_opt(
            "WITH s AS (DELETE FROM sessions WHERE key = $1)
             UPDATE users SET last_seen = now() WHERE key = $1 RETURNING us(last_seen)",
            &[&key.to_string()],
        )?;
        match row {
            Some(row) => Ok(Timestamp::from_micros(row.try_get(0)?)),
            None => Ok(now),
        }
    }

    fn session_counts(&mut self) -> Result<(u64, u64), StoreError> {
        let row = self.client()?.query_one(
            "SELECT count(*) FILTER (WHERE status = 'online'),
                    count(*) FILTER (WHERE status = 'away')
             FROM sessions WHERE expires_at > now()",
            &[],
        )?;
        Ok((to_u64(row.try_get(0)?), to_u64(row.try_get(1)?)))
    }

    fn expire_sessions(&mut self) -> Result<(), StoreError> {
        self.client()?
            .execute("DELETE FROM sessions WHERE expires_at <= now()", &[])?;
        Ok(())
    }

    fn store_dm(
        &mut self,
        recipient: &PublicKey,
        sender: &UserName,
        sender_key: &PublicKey,
        id: Option<MessageId>,
        body: &RawValue,
        _now: Timestamp,
        max: u64,
    ) -> Result<Stored, MailboxError> {
        let (to, from) = (recipient.to_string(), sender_key.to_string());
        let share = self.settings.dm_share;
        let mut tx = self.client()?.transaction().map_err(StoreError::from)?;
        match store_one(&mut tx, &to, sender, &from, id, body, max, share)? {
            StoreOne::Stored(stored) => {
                tx.commit().map_err(StoreError::from)?;
                Ok(stored)
            }
            StoreOne::Full => Err(MailboxError::Full),
            StoreOne::ShareFull => Err(MailboxError::ShareFull),
        }
    }

    fn store_dms(
        &mut self,
        copies: &[(PublicKey, UserName, MessageId)],
        refused: &[(String, &'static str)],
        sender: &UserName,
        sender_key: &PublicKey,
        body: &RawValue,
        _now: Timestamp,
        max: u64,
    ) -> Result<Vec<Copy>, MailboxError> {
        let from = sender_key.to_string();
        let share = self.settings.dm_share;
        // Counter rows are locked in key order, so two fan-outs never deadlock.
        let mut sorted: Vec<(String, &(PublicKey, UserName, MessageId))> =
            copies.iter().map(|c| (c.0.to_string(), c)).collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tx = self.client()?.transaction().map_err(StoreError::from)?;
        let mut out = Vec::with_capacity(copies.len());
        let mut dead: Vec<(&str, &str)> = refused
            .iter()
            .map(|(n, reason)| (n.as_str(), *reason))
            .collect();
        for (to, (recipient, name, id)) in &sorted {
            match store_one(&mut tx, to, sender, &from, Some(*id), body, max, share)? {
                StoreOne::Stored((n, id, time, duplicate)) => out.push(Copy::Stored {
                    recipient: *recipient,
                    n,
                    id,
                    time,
                    duplicate,
                }),
                StoreOne::Full => {
                    out.push(Copy::Full(name.clone()));
                    dead.push((name.as_str(), "mailbox_full"));
                }
                StoreOne::ShareFull => {
                    out.push(Copy::ShareFull(name.clone()));
                    dead.push((name.as_str(), "share_full"));
                }
            }
        }
        for (to, reason) in dead {
            dead_letter(&mut tx, &from, to, reason, body)?;
        }
        tx.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    fn block(
        &mut self,
        blocker: &PublicKey,
        blocked: &UserEntry,
        _now: Timestamp,
    ) -> Refusable<bool> {
        let (by, key) = (blocker.to_string(), blocked.key.to_string());
        let mut tx = self.client()?.transaction()?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&BLOCK_LOCK, &by],
        )?;
        let held = tx.query_opt(
            "SELECT 1 FROM blocks WHERE blocker = $1 AND blocked_key = $2",
            &[&by, &key],
        )?;
        if held.is_some() {
            return Ok(Ok(false));
        }
        let n: i64 = tx
            .query_one("SELECT count(*) FROM blocks WHERE blocker = $1", &[&by])?
            .try_get(0)?;
        if to_u64(n) >= super::MAX_BLOCKS {
            return Ok(Err(super::too_many_blocks()));
        }
        tx.execute(
            "INSERT INTO blocks (blocker, blocked_key, blocked_name, since)
             VALUES ($1, $2, $3, now())",
            &[&by, &key, &blocked.name.as_str()],
        )?;
        tx.commit()?;
        Ok(Ok(true))
    }

    fn unblock(
        &mut self,
        blocker: &PublicKey,
        name: &UserName,
        key: Option<&PublicKey>,
    ) -> Result<bool, StoreError> {
        let key = key.map(|k| k.to_string()).unwrap_or_default();
        Ok(self.client()?.execute(
            "DELETE FROM blocks WHERE blocker = $1 AND (blocked_name = $2 OR blocked_key = $3)",
            &[&blocker.to_string(), &name.as_str(), &key],
        )? > 0)
    }

    fn blocked(&mut self, blocker: &PublicKey) -> Result<Vec<BlockedEntry>, StoreError> {
        let rows = self.client()?.query(
            "SELECT blocked_name, blocked_key, us(since) FROM blocks WHERE blocker = $1
             ORDER BY blocked_name COLLATE \"C\", blocked_key",
            &[&blocker.to_string()],
        )?;
        rows.iter()
            .map(|row| {
                let name: String = row.try_get(0)?;
                Ok(BlockedEntry {
                    name: UserName::new(name.clone()).map_err(|_| corrupt("user name", name))?,
                    key: parse_key(row.try_get(1)?)?,
                    since: Timestamp::from_micros(row.try_get(2)?),
                })
            })
            .collect()
    }

    fn blockers_of(
        &mut self,
        sender: &PublicKey,
    ) -> Result<std::collections::HashSet<PublicKey>, StoreError> {
        let rows = self.client()?.query(
            "SELECT blocker FROM blocks WHERE blocked_key = $1",
            &[&sender.to_string()],
        )?;
        rows.iter().map(|row| parse_key(row.try_get(0)?)).collect()
    }

    fn blocks(&mut self, blocker: &PublicKey, sender: &PublicKey) -> Result<bool, StoreError> {
        Ok(self
            .client()?
            .query_opt(
                "SELECT 1 FROM blocks WHERE blocker = $1 AND blocked_key = $2",
                &[&blocker.to_string(), &sender.to_string()],
            )?
            .is_some())
    }

    fn fetch_dms(
        &mut self,
        recipient: &PublicKey,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<Dm>, bool), StoreError> {
        let rows = self.client()?.query(
            "SELECT n, id, us(time), sender, sender_key, body FROM mailbox
             WHERE recipient = $1 AND n > $2 AND NOT acked ORDER BY n LIMIT $3",
            &[
                &recipient.to_string(),
                &to_i64(after),
                &(i64::from(limit) + 1),
            ],
        )?;
        let mut out = Vec::new();
        let mut more = false;
        for row in &rows {
            if out.len() >= limit as usize {
                more = true;
                break;
            }
            let id: Vec<u8> = row.try_get(1)?;
            let from: String = row.try_get(3)?;
            let body: String = row.try_get(5)?;
            out.push(Dm {
                n: to_u64(row.try_get(0)?),
                id: MessageId::from_bytes(
                    id.as_slice()
                        .try_into()
                        .map_err(|_| corrupt("message id", format!("{id:?}")))?,
                ),
                time: Timestamp::from_micros(row.try_get(2)?),
                from: UserName::new(from.clone()).map_err(|_| corrupt("user name", from))?,
                from_key: parse_key(row.try_get(4)?)?,
                body: RawValue::from_string(body.clone())
                    .map_err(|_| corrupt("message body", body))?,
            });
        }
        Ok((out, more))
    }

    fn ack_dms(&mut self, recipient: &PublicKey, up_to: u64) -> Result<u64, StoreError> {
        Ok(self.client()?.execute(
            "UPDATE mailbox SET acked = true WHERE recipient = $1 AND n <= $2 AND NOT acked",
            &[&recipient.to_string(), &to_i64(up_to)],
        )?)
    }

    fn dead_letter(
        &mut self,
        sender_key: &PublicKey,
        to: &str,
        reason: &str,
        body: &RawValue,
        _now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut tx = self.client()?.transaction()?;
        dead_letter(&mut tx, &sender_key.to_string(), to, reason, body)?;
        tx.commit()?;
        Ok(())
    }

    fn dead_letters(&mut self, sender_key: &PublicKey) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = self.client()?.query(
            "SELECT us(time), recipient, reason, body FROM dead_letters
             WHERE sender_key = $1 ORDER BY n",
            &[&sender_key.to_string()],
        )?;
        rows.iter()
            .map(|row| {
                let body: String = row.try_get(3)?;
                Ok(DeadLetter {
                    time: Timestamp::from_micros(row.try_get(0)?),
                    to: row.try_get(1)?,
                    reason: row.try_get(2)?,
                    body: RawValue::from_string(body.clone())
                        .map_err(|_| corrupt("message body", body))?,
                })
            })
            .collect()
    }

    fn waiting_dms(&mut self) -> Result<u64, StoreError> {
        let n: i64 = self
            .client()?
            .query_one("SELECT count(*) FROM mailbox WHERE NOT acked", &[])?
            .try_get(0)?;
        Ok(to_u64(n))
    }

    fn expire_dms(&mut self, ttl: Duration, _now: Timestamp) -> Result<u64, StoreError> {
        // One statement: concurrent sweeps of several registries never dead-letter a
        // message twice (the second finds it deleted).
        let n: i64 = self
            .client()?
            .query_one(
                "WITH gone AS (
                     DELETE FROM mailbox WHERE time < now() - $1 * interval '1 second'
                     RETURNING sender_key, recipient, body, acked, time),
                 dead AS (
                     INSERT INTO dead_letters (sender_key, time, recipient, reason, body)
                     SELECT g.sender_key, now(), COALESCE(u.name, g.recipient), 'expired', g.body
                     FROM gone g LEFT JOIN users u ON u.key = g.recipient
                     WHERE NOT g.acked ORDER BY g.time
                     RETURNING 1)
                 SELECT count(*) FROM dead",
                &[&Self::ttl_secs(ttl)],
            )?
            .try_get(0)?;
        Ok(to_u64(n))
    }

    fn stored_elsewhere(&mut self) -> Result<Vec<(PublicKey, u64)>, StoreError> {
        // Called every turn of the loop: it never waits for a connection (requests and
        // sweeps connect again).
        let now = Instant::now();
        if self.client.is_closed() || now < self.next_notice_read {
            return Ok(Vec::new());
        }
        self.next_notice_read = now + NOTICE_POLL;
        let own = self.backend_pid;
        let client = self.client()?;
        let mut out = Vec::new();
        let mut notifications = client.notifications();
        let mut pending = notifications.timeout_iter(NOTICE_WAIT);
        while out.len() < MAX_NOTICES {
            let Some(note) = pending.next()? else { break };
            if note.process_id() == own || note.channel() != DM_CHANNEL {
                continue;
            }
            let parsed = note.payload().split_once(' ').and_then(|(key, n)| {
                Some((key.parse::<PublicKey>().ok()?, n.parse::<u64>().ok()?))
            });
            match parsed {
                Some(stored) => out.push(stored),
                None => tracing::warn!(payload = note.payload(), "ignored a malformed DM notice"),
            }
        }
        Ok(out)
    }
}
