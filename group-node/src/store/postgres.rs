//! The host database in PostgreSQL ([`PgHost`], one schema per host, and its per-group view
//! [`PgGroup`]) and the [`GroupStore`] of a node of one group over it ([`PgStore`]), in a
//! database that several nodes share (one of them active, [`crate::lease`]), through the
//! synchronous `postgres` client on the node's loop thread.
//!
//! # Durability
//! A batch is one transaction; its commit returns once PostgreSQL has flushed its WAL
//! (`synchronous_commit` `on`, or stronger where the server asks for it: a server set to
//! `off` or `local` is raised to `on` for this session), so [`GroupStore::flusher`] is
//! [`Durable`] and acks leave right after the commit. Group commit stays: every
//! request in hand goes into one transaction.
//!
//! # Round trips
//! Each statement is a round trip to the server, which bounded the first version to one
//! `INSERT` per message. A batch now costs a fixed handful, whatever its size and however
//! many groups it touches, and a batch of sends two:
//! - appends of every group are held in the host and written at commit, or before any read
//!   that could see them, by one `INSERT … SELECT FROM unnest(…)` (PostgreSQL's array
//!   expansion, a `gid` array among the columns);
//! - the commit is one statement (`COMMIT_BATCH`): the fencing check, the held appends and
//!   the high-water marks of the groups whose newest rows retention deleted (in `groups`),
//!   in data-modifying `WITH` queries. `BEGIN` is sent only before
//!   the batch's first other statement (a join, a read after an append); a batch without
//!   one, such as a batch of sends, runs that statement alone, as its own transaction,
//!   and its `COMMIT` is that statement's (measured with `pgbench` on this machine's
//!   PostgreSQL, one client: 320–670 batches/s as `BEGIN`, four statements and `COMMIT`,
//!   610–1,260/s as the lookup and one statement);
//! - the client ids of a batch's sends are looked up together first
//!   ([`GroupLog::expect_appends`]), so that a retried send is still answered with its
//!   stored ack; an id not looked up that way takes the slow path (one `INSERT … ON
//!   CONFLICT` of its own);
//! - members are cached (the active node is the only writer, under its lease), so the
//!   membership check of a send is not a query: one LRU for every group of the host, keyed
//!   by (gid, principal), of [`DEFAULT_MEMBER_CACHE`] entries; it is dropped with a failed
//!   batch.
//! - Each group's seq, clock and member count are the host's [`LogState`], not queries.
//!
//! # Fencing
//! A store opened with an epoch ([`PgStore::open`]) checks, in every commit's transaction and
//! before the commit's own writes, that `lease.epoch` is still that epoch, reading it
//! `FOR SHARE` (a batch whose transaction began earlier for other writes is checked at its
//! commit, which keeps them all or none): a node that took the lease
//! since (which bumps the epoch, an `UPDATE` that waits for that row lock) makes the commit
//! fail with [`StoreError::Fenced`], and a commit that got the row lock first is wholly
//! before the takeover, which reads the log after it. A deposed node can never commit.
//!
//! # Schema
//! A group host's tables are in schema `agora_host_<16 hex digits>` (the first 8 bytes of
//! the SHA-256 of its host id, [`PgSchema::Host`]); a node of one group's in
//! `agora_group_<16 hex digits>` (of the group's name: names are Unicode up to 64
//! characters, PostgreSQL's identifiers 63 bytes, [`PgSchema::Group`]), where its standbys
//! find it, its group being gid 1. `schema_version(version)` holds the migration level
//! (version 4), applied under a transaction-level advisory lock so that nodes starting at
//! once do not race:
//! - `meta(key TEXT PRIMARY KEY, value TEXT)`: `group` (the full name, checked on open),
//!   `last_seq`, `last_time_us`, `mode`, as SQLite's `meta`.
//! - `messages(seq BIGINT PRIMARY KEY, id BYTEA UNIQUE, time_us, sender, body, kind,
//!   sender_key, attachment, attachment_sha256)`: as SQLite's; a BRIN index on `time_us`
//!   (time increases with seq) serves `since` and `--max-age`.
//! - `members(principal PRIMARY KEY, user_name UNIQUE, joined_at_us)`, `grants(principal,
//!   kind, at_us)`: as SQLite's.
//! - `lease(id = 1, epoch, holder, endpoint, since)`: the fencing epoch and who holds it.
//! - Version 2, attachments' complete blobs ([`crate::blobs`], so that any node of the group
//!   serves them after a failover): `blob_chunks(digest BYTEA, byte_offset BIGINT, data
//!   BYTEA, PRIMARY KEY (digest, byte_offset))`, the content in pieces of
//!   [`crate::blobs::PG_CHUNK_BYTES`] (1 MiB; the last one shorter), stored out of line
//!   without compression (`STORAGE EXTERNAL`: attachments are mostly compressed already, and
//!   a range read then fetches only the TOAST pieces it needs); `blobs(digest PRIMARY KEY,
//!   size, sealed_at)`, written in the same transaction after every chunk: a blob is there
//!   exactly when its row is.
//! - Version 3, who a blob's storage is charged to (the per-member `--upload-quota` counts
//!   kept contents, [`crate::blobs`] "Quota and reserve"): `blobs.uploader`, the principal
//!   whose upload completed it first (NULL for blobs sealed before: charged to nobody),
//!   with a partial index `blobs_uploader` for the per-member sum.
//! - Version 4, many groups per schema (`docs/design/group-host.md` §2.3): `groups(gid,
//!   name, state, owner, mode, last_seq, last_time_us, created_by, created_at_us,
//!   archived_at_us)` as SQLite's (gids from the sequence `groups_gid`, never reused; a
//!   name unique among groups not archived), made from `meta` (gid 1), which goes; a `gid`
//!   in `messages` (keys `(gid, seq)`, `(gid, id)`), `members` (`(gid, principal)`,
//!   `(gid, user_name)`), `grants` and the blob tables (`(gid, digest)`; `gid` defaults to
//!   1 in `messages` and the blob tables, the group of a node of one, for the blob code's
//!   statements that name no group).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use hashlink::LruCache;
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};
use serde_json::value::RawValue;
use sha2::Digest as _;

use agora_common::pgtls::{PgConnector, PgTlsFiles};
use agora_proto::id::MessageId;
use agora_proto::key::PublicKey;
use agora_proto::time::{MonotonicClock, Timestamp};
use agora_proto::wire::{
    Attachment, EntryKind, GroupMode, GroupName, HistoryQuery, Member, Message, SendAck,
    Sha256Digest, UserName,
};

use super::{
    attachment_json, Durable, Flush, Grant, GroupId, GroupLog, GroupRow, GroupState, GroupStore,
    LogState, NewGroup, NewMessage, Page, Principal, Retention, StoreError,
};

/// The migrations, in order: entry N-1 takes the schema from version N-1 to N.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE messages (
        seq BIGINT PRIMARY KEY,
        id BYTEA NOT NULL UNIQUE,
        time_us BIGINT NOT NULL,
        sender TEXT NOT NULL,
        body TEXT NOT NULL,
        kind TEXT NOT NULL,
        sender_key TEXT,
        attachment TEXT,
        attachment_sha256 BYTEA);
    CREATE INDEX messages_time ON messages USING brin (time_us);
    CREATE INDEX messages_attachment ON messages (attachment_sha256)
        WHERE attachment_sha256 IS NOT NULL;
    CREATE TABLE members (
        principal TEXT PRIMARY KEY,
        user_name TEXT NOT NULL UNIQUE,
        joined_at_us BIGINT NOT NULL);
    CREATE TABLE grants (
        principal TEXT NOT NULL,
        kind TEXT NOT NULL,
        at_us BIGINT NOT NULL,
        PRIMARY KEY (principal, kind));
    CREATE TABLE lease (
        id INT PRIMARY KEY CHECK (id = 1),
        epoch BIGINT NOT NULL,
        holder TEXT,
        endpoint TEXT,
        since TIMESTAMPTZ);
    INSERT INTO lease (id, epoch) VALUES (1, 0);
",
    "
    CREATE TABLE blob_chunks (
        digest BYTEA NOT NULL,
        byte_offset BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (digest, byte_offset));
    ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
    CREATE TABLE blobs (
        digest BYTEA PRIMARY KEY,
        size BIGINT NOT NULL,
        sealed_at TIMESTAMPTZ NOT NULL DEFAULT now());
",
    "
    ALTER TABLE blobs ADD COLUMN uploader TEXT;
    CREATE INDEX blobs_uploader ON blobs (uploader) WHERE uploader IS NOT NULL;
",
    "
    CREATE SEQUENCE groups_gid AS INT;
    CREATE TABLE groups (
        gid INT PRIMARY KEY DEFAULT nextval('groups_gid'),
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT,
        mode TEXT NOT NULL DEFAULT 'open',
        last_seq BIGINT NOT NULL DEFAULT 0,
        last_time_us BIGINT NOT NULL DEFAULT 0,
        created_by TEXT,
        created_at_us BIGINT NOT NULL,
        archived_at_us BIGINT);
    ALTER SEQUENCE groups_gid OWNED BY groups.gid;
    CREATE UNIQUE INDEX groups_name ON groups (name) WHERE state <> 'archived';
    CREATE INDEX groups_creator ON groups (created_by) WHERE state <> 'archived';
    INSERT INTO groups (gid, name, state, mode, last_seq, last_time_us, created_at_us)
    SELECT 1, m.value, 'live',
           COALESCE((SELECT value FROM meta WHERE key = 'mode'), 'open'),
           COALESCE((SELECT value::BIGINT FROM meta WHERE key = 'last_seq'), 0),
           COALESCE((SELECT value::BIGINT FROM meta WHERE key = 'last_time_us'), 0),
           (extract(epoch FROM now()) * 1000000)::BIGINT
    FROM meta m WHERE m.key = 'group';
    SELECT setval('groups_gid', MAX(gid)) FROM groups HAVING MAX(gid) IS NOT NULL;
    DROP TABLE meta;
    ALTER TABLE messages ADD COLUMN gid INT NOT NULL DEFAULT 1;
    ALTER TABLE messages DROP CONSTRAINT messages_pkey, DROP CONSTRAINT messages_id_key,
        ADD PRIMARY KEY (gid, seq), ADD UNIQUE (gid, id);
    DROP INDEX messages_attachment;
    CREATE INDEX messages_attachment ON messages (gid, attachment_sha256)
        WHERE attachment_sha256 IS NOT NULL;
    ALTER TABLE members ADD COLUMN gid INT NOT NULL DEFAULT 1;
    ALTER TABLE members ALTER COLUMN gid DROP DEFAULT;
    ALTER TABLE members DROP CONSTRAINT members_pkey, DROP CONSTRAINT members_user_name_key,
        ADD PRIMARY KEY (gid, principal), ADD UNIQUE (gid, user_name);
    ALTER TABLE grants ADD COLUMN gid INT NOT NULL DEFAULT 1;
    ALTER TABLE grants ALTER COLUMN gid DROP DEFAULT;
    ALTER TABLE grants DROP CONSTRAINT grants_pkey, ADD PRIMARY KEY (gid, principal, kind);
    ALTER TABLE blobs ADD COLUMN gid INT NOT NULL DEFAULT 1;
    ALTER TABLE blobs DROP CONSTRAINT blobs_pkey, ADD PRIMARY KEY (gid, digest);
    DROP INDEX blobs_uploader;
    CREATE INDEX blobs_uploader ON blobs (gid, uploader) WHERE uploader IS NOT NULL;
    ALTER TABLE blob_chunks ADD COLUMN gid INT NOT NULL DEFAULT 1;
    ALTER TABLE blob_chunks DROP CONSTRAINT blob_chunks_pkey,
        ADD PRIMARY KEY (gid, digest, byte_offset);
",
];

/// The schema version this build makes and reads.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a PostgreSQL connection may leave sent data unacknowledged, or go without an
/// answer to keepalives, before the kernel drops it (2 s): both ends set it, so a node cut
/// off from the database notices, and the server frees the lease of a node it cannot reach.
pub const DEFAULT_NET_TIMEOUT: Duration = Duration::from_secs(2);

/// The schema that holds `group`'s tables: `agora_group_` and 16 hex digits of the SHA-256
/// of its name.
pub fn schema_name(group: &GroupName) -> String {
    let digest = sha2::Sha256::digest(group.as_str().as_bytes());
    format!("agora_group_{}", hex::encode(&digest[..8]))
}

/// The schema that holds a group host's tables: `agora_host_` and 16 hex digits of the
/// SHA-256 of its host id (default the host's public key, which its standbys share).
pub fn host_schema_name(host_id: &str) -> String {
    let digest = sha2::Sha256::digest(host_id.as_bytes());
    format!("agora_host_{}", hex::encode(&digest[..8]))
}

/// Which schema a [`PgHost`] (and its lease) lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgSchema {
    /// A node of one group: [`schema_name`] of its name, the group being gid 1 (its standbys,
    /// started with the same name, find it).
    Group(GroupName),
    /// A group host: [`host_schema_name`] of its host id.
    Host(String),
}

impl PgSchema {
    /// The schema's name (an SQL identifier: `agora_group_…` or `agora_host_…`).
    pub fn name(&self) -> String {
        match self {
            PgSchema::Group(group) => schema_name(group),
            PgSchema::Host(id) => host_schema_name(id),
        }
    }
}

impl std::fmt::Display for PgSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgSchema::Group(group) => write!(f, "group {group}"),
            PgSchema::Host(id) => write!(f, "host {id}"),
        }
    }
}

/// Whether `store` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(store: &str) -> bool {
    store.starts_with("postgres://") || store.starts_with("postgresql://")
}

/// A PostgreSQL database of the node's: its URL (`postgres://…`, which may carry a
/// password), the files its TLS is set up from (`--store-ca`, `--store-cert`,
/// `--store-key`, see [`agora_common::pgtls`]; none: plain unless the URL says
/// `sslmode=require`), and the
/// network timeout of [`connect`] (default [`DEFAULT_NET_TIMEOUT`]).
#[derive(Clone)]
pub struct PgTarget {
    url: String,
    tls: PgTlsFiles,
    net_timeout: Duration,
}

impl std::fmt::Debug for PgTarget {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("tls", &self.tls)
            .field("net_timeout", &self.net_timeout)
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// The database at `url`, plain unless the URL says `sslmode=require`, with the default
    /// network timeout.
    pub fn new(url: impl Into<String>) -> PgTarget {
        PgTarget {
            url: url.into(),
            tls: PgTlsFiles::default(),
            net_timeout: DEFAULT_NET_TIMEOUT,
        }
    }

    /// The URL as given (it may carry a password: for messages, use
    /// [`agora_common::pgtls::target`] or [`agora_common::pgtls::explain`]).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sets up TLS from `tls`: the server's certificate verified against its CA file, its
    /// client certificate presented ([`agora_common::pgtls`]). Default: no files, TLS only
    /// when the URL says `sslmode=require`.
    pub fn with_tls(mut self, tls: PgTlsFiles) -> PgTarget {
        self.tls = tls;
        self
    }

    /// Sets the network timeout of [`connect`].
    pub fn with_net_timeout(mut self, net_timeout: Duration) -> PgTarget {
        self.net_timeout = net_timeout;
        self
    }

    /// The connector for this database, with TLS or not.
    ///
    /// # Errors
    /// [`StoreError::Postgres`] for a bad URL, [`StoreError::PgTls`] for a bad CA,
    /// certificate or key file.
    pub fn connector(&self) -> Result<PgConnector, StoreError> {
        let config: postgres::Config = self.url.parse()?;
        Ok(PgConnector::new(config, &self.tls)?)
    }
}

/// Connects to `target` with the node's network settings: a connect timeout, TCP
/// keepalives and `TCP_USER_TIMEOUT` of its network timeout on both ends (the server's
/// through the session's `tcp_keepalives_*` and `tcp_user_timeout` settings), at most that
/// long spent idle inside a transaction, and TLS as [`agora_common::pgtls`] says. `role`
/// names the connection in `pg_stat_activity`.
///
/// # Errors
/// [`StoreError::Postgres`]: a bad URL, an unreachable or refusing server, a failed TLS
/// handshake; [`StoreError::PgTls`]: a bad CA file.
pub fn connect(target: &PgTarget, role: &str) -> Result<Client, StoreError> {
    let net_timeout = target.net_timeout;
    let mut connector = target.connector()?;
    let secs = net_timeout.as_secs().max(1);
    connector
        .config_mut()
        .application_name(&format!("agora-group-node {role}"))
        .connect_timeout(net_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(secs.div_ceil(2)))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(2)
        .tcp_user_timeout(net_timeout);
    let mut client = connector.connect()?;
    let ms = net_timeout.as_millis();
    client.batch_execute(&format!(
        "SET tcp_keepalives_idle = {half}; SET tcp_keepalives_interval = 1;
         SET tcp_keepalives_count = 2; SET tcp_user_timeout = {ms};
         SET idle_in_transaction_session_timeout = {idle};",
        half = secs.div_ceil(2),
        idle = ms.max(1000) * 2,
    ))?;
    Ok(client)
}

/// Creates or migrates `schema` in one transaction under an advisory lock (nodes starting at
/// once wait for each other), then points the session's `search_path` at it. A node of one
/// group ([`PgSchema::Group`]) also checks that the schema's gid 1 is its group, making it
/// if the schema has no group yet.
///
/// # Errors
/// [`StoreError::SchemaTooNew`], [`StoreError::WrongGroup`] (a hash collision of names),
/// [`StoreError::Postgres`].
pub fn prepare(client: &mut Client, schema: &PgSchema) -> Result<(), StoreError> {
    let name = schema.name();
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('agora-migrate:' || $1, 0))",
        &[&name],
    )?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {name};
         SET LOCAL search_path TO {name};
         CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);"
    ))?;
    let version: i64 = match tx.query_opt("SELECT version FROM schema_version", &[])? {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])?;
            0
        }
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    for (at, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tracing::info!(
            schema = name,
            to = at + 1,
            "migrating the PostgreSQL schema"
        );
        tx.batch_execute(migration)?;
    }
    tx.execute("UPDATE schema_version SET version = $1", &[&SCHEMA_VERSION])?;
    if let PgSchema::Group(group) = schema {
        let found: Option<String> = tx
            .query_opt("SELECT name FROM groups WHERE gid = 1", &[])?
            .map(|r| r.get(0));
        match found {
            Some(found) if found != group.as_str() => {
                return Err(StoreError::WrongGroup {
                    expected: group.to_string(),
                    found,
                })
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO groups (gid, name, state, mode, created_at_us)
                     VALUES (1, $1, 'live', 'open', $2)",
                    &[&group.as_str(), &Timestamp::now().as_micros()],
                )?;
                tx.batch_execute("SELECT setval('groups_gid', MAX(gid)) FROM groups")?;
            }
        }
    }
    tx.commit()?;
    client.batch_execute(&format!("SET search_path TO {name}"))?;
    Ok(())
}

/// Creates or migrates `group`'s schema (a node of one group) and checks that it belongs to
/// `group`: [`prepare`] of [`PgSchema::Group`].
///
/// # Errors
/// As [`prepare`].
pub fn prepare_schema(client: &mut Client, group: &GroupName) -> Result<(), StoreError> {
    prepare(client, &PgSchema::Group(group.clone()))
}

/// The most members [`PgHost`]'s member cache keeps by default (100,000 principals of all
/// its groups); past it the least recently used is dropped.
pub const DEFAULT_MEMBER_CACHE: usize = 100_000;

/// A message appended in the open batch and not yet written (see the module docs).
#[derive(Debug)]
struct Held {
    gid: i32,
    seq: i64,
    id: MessageId,
    time_us: i64,
    sender: String,
    body: String,
    kind: &'static str,
    sender_key: Option<String>,
    attachment: Option<String>,
    attachment_sha256: Option<Vec<u8>>,
}

/// What is stored under a client id looked up by [`GroupLog::expect_appends`].
#[derive(Debug)]
struct Stored {
    seq: i64,
    time_us: i64,
    sender: String,
    body: String,
    attachment: Option<String>,
}

/// The database of a host in a PostgreSQL schema: one client, one batch across its groups
/// (see the module docs). [`PgHost::group`] gives one group's view ([`PgGroup`]).
pub struct PgHost {
    /// `RefCell`: the client needs `&mut` for every query, reads included; the store is
    /// owned by one thread (it is `Send`, not `Sync`).
    client: RefCell<Client>,
    statements: RefCell<HashMap<&'static str, Statement>>,
    schema: PgSchema,
    epoch: Option<i64>,
    /// A statement of the open batch failed: PostgreSQL refuses the rest of it. A `Cell`, as
    /// reads (`&self`) write held appends first.
    aborted: Cell<bool>,
    /// Appends of the open batch not yet written, in the order appended (seq order per group).
    held: RefCell<Vec<Held>>,
    /// The client ids looked up for this batch, and the ones of them already stored.
    expected: HashSet<(GroupId, MessageId)>,
    stored: HashMap<(GroupId, MessageId), Stored>,
    /// (gid, principal) → user name, of members known to be members: one LRU for every
    /// group of the host ([`DEFAULT_MEMBER_CACHE`]).
    members: RefCell<LruCache<(GroupId, String), UserName>>,
    /// High-water marks (`last_seq`, `last_time_us`) to store at commit, of the groups whose
    /// newest rows retention may have deleted in this batch.
    marks: BTreeMap<GroupId, (i64, i64)>,
    /// Messages appended by this host, and that count when the batch id lookup was last
    /// prepared (see [`LOOKUP_IDS`]).
    appended: u64,
    lookup_prepared_at: u64,
    /// Where the batch stands: a `BEGIN` is sent only before its first statement that needs
    /// one (see the module docs). A `Cell`, as reads (`&self`) enter the transaction too.
    batch: Cell<Batch>,
}

/// Where [`PgHost`]'s batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// No batch: statements run on their own (autocommit).
    Closed,
    /// [`PgHost::begin`] was called, and no `BEGIN` sent yet.
    Open,
    /// The batch's transaction is open on the server.
    InTransaction,
}

/// A batch's commit as one statement: the fencing check (the lease row read `FOR SHARE`,
/// before anything is written), the held appends of every group (`$1`…`$10`, arrays of one
/// element per message, `$1` the gids) and the high-water marks (`$12`…`$14`: gids,
/// `last_seq`s and `last_time_us`s, one element per group whose marks changed), written only
/// if the epoch is still `$11` (or `$11` is NULL: no fencing). Returns the epoch read (no
/// row without a lease row; PostgreSQL runs every data-modifying `WITH` to completion
/// whether or not the result reads it). Alone, outside a transaction, it is its own durable
/// transaction: a batch of appends to any number of groups costs the server one round trip
/// and one WAL flush.
const COMMIT_BATCH: &str = "WITH fence AS (SELECT epoch FROM lease WHERE id = 1 FOR SHARE),
     allowed AS (SELECT $11::BIGINT IS NULL OR (SELECT epoch FROM fence) = $11 AS ok),
     appended AS (
         INSERT INTO messages (gid, seq, id, time_us, sender, body, kind, sender_key,
                               attachment, attachment_sha256)
         SELECT * FROM unnest($1::INT[], $2::BIGINT[], $3::BYTEA[], $4::BIGINT[], $5::TEXT[],
                              $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::BYTEA[])
         WHERE (SELECT ok FROM allowed)),
     marks AS (
         UPDATE groups g SET last_seq = m.last_seq, last_time_us = m.last_time_us
         FROM unnest($12::INT[], $13::BIGINT[], $14::BIGINT[]) AS m (gid, last_seq, last_time_us)
         WHERE g.gid = m.gid AND (SELECT ok FROM allowed))
     SELECT epoch FROM fence";

/// The statement that writes held appends (`$1`…`$10` as in [`COMMIT_BATCH`]) before a read
/// inside a batch.
const INSERT_HELD: &str = "INSERT INTO messages (gid, seq, id, time_us, sender, body, kind,
                                                 sender_key, attachment, attachment_sha256)
     SELECT * FROM unnest($1::INT[], $2::BIGINT[], $3::BYTEA[], $4::BIGINT[], $5::TEXT[],
                          $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::BYTEA[])";

/// The columns of held appends, as the arrays [`COMMIT_BATCH`] and [`INSERT_HELD`] take.
struct HeldColumns<'a> {
    gid: Vec<i32>,
    seq: Vec<i64>,
    id: Vec<&'a [u8]>,
    time_us: Vec<i64>,
    sender: Vec<&'a str>,
    body: Vec<&'a str>,
    kind: Vec<&'static str>,
    sender_key: Vec<Option<&'a str>>,
    attachment: Vec<Option<&'a str>>,
    attachment_sha256: Vec<Option<&'a [u8]>>,
}

impl<'a> HeldColumns<'a> {
    fn of(held: &'a [Held]) -> HeldColumns<'a> {
        HeldColumns {
            gid: held.iter().map(|h| h.gid).collect(),
            seq: held.iter().map(|h| h.seq).collect(),
            id: held.iter().map(|h| h.id.as_bytes().as_slice()).collect(),
            time_us: held.iter().map(|h| h.time_us).collect(),
            sender: held.iter().map(|h| h.sender.as_str()).collect(),
            body: held.iter().map(|h| h.body.as_str()).collect(),
            kind: held.iter().map(|h| h.kind).collect(),
            sender_key: held.iter().map(|h| h.sender_key.as_deref()).collect(),
            attachment: held.iter().map(|h| h.attachment.as_deref()).collect(),
            attachment_sha256: held
                .iter()
                .map(|h| h.attachment_sha256.as_deref())
                .collect(),
        }
    }

    /// `$1`…`$10`.
    fn params(&self) -> [&(dyn ToSql + Sync); 10] {
        [
            &self.gid,
            &self.seq,
            &self.id,
            &self.time_us,
            &self.sender,
            &self.body,
            &self.kind,
            &self.sender_key,
            &self.attachment,
            &self.attachment_sha256,
        ]
    }
}

/// The batch's id lookup of [`GroupLog::expect_appends`], for one group. Prepared again each
/// time the host's appends have doubled (and grown by 1,000): PostgreSQL caches a generic
/// plan after five executions, and one made while `messages` was small (a sequential scan)
/// stayed in use as the table grew, until an `ANALYZE` replaced it (measured: appends at
/// 100 in flight fell from 9,000/s to 2,000/s between 5,000 and 19,000 messages).
const LOOKUP_IDS: &str = "SELECT id, seq, time_us, sender, body, attachment FROM messages
                          WHERE gid = $1 AND id = ANY($2)";

impl std::fmt::Debug for PgHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHost")
            .field("schema", &self.schema)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

fn gid_param(gid: GroupId) -> i32 {
    // Gids come from an INT column: below 2^31.
    i32::try_from(gid.0).unwrap_or(i32::MAX)
}

fn gid_of(stored: i32) -> Result<GroupId, StoreError> {
    u32::try_from(stored)
        .map(GroupId)
        .map_err(|_| StoreError::Corrupt(format!("gid {stored}")))
}

impl PgHost {
    /// Connects to `target`, creates or migrates `schema` ([`prepare`]), and raises
    /// `synchronous_commit` to `on` if the server has it lower. With `epoch`, every commit is
    /// fenced by it (the epoch of a lease this node holds, [`crate::lease::Lease`]);
    /// without, there is no check (one node, no standby). No group's state is read:
    /// [`PgHost::load`] does, per group.
    ///
    /// # Errors
    /// As [`connect`] and [`prepare`].
    pub fn open(
        target: &PgTarget,
        schema: PgSchema,
        epoch: Option<i64>,
    ) -> Result<PgHost, StoreError> {
        let mut client = connect(target, "store")?;
        prepare(&mut client, &schema)?;
        let level: String = client.query_one("SHOW synchronous_commit", &[])?.get(0);
        if level == "off" || level == "local" {
            tracing::warn!(
                level,
                "raising synchronous_commit to on: acks wait for the commit to be durable"
            );
            client.batch_execute("SET synchronous_commit = on")?;
        }
        Ok(PgHost {
            client: RefCell::new(client),
            statements: RefCell::new(HashMap::new()),
            schema,
            epoch,
            aborted: Cell::new(false),
            held: RefCell::new(Vec::new()),
            expected: HashSet::new(),
            stored: HashMap::new(),
            members: RefCell::new(LruCache::new(DEFAULT_MEMBER_CACHE)),
            marks: BTreeMap::new(),
            appended: 0,
            lookup_prepared_at: 0,
            batch: Cell::new(Batch::Closed),
        })
    }

    /// Sets how many members the member cache keeps, over all groups (default
    /// [`DEFAULT_MEMBER_CACHE`]; at least 1).
    pub fn with_member_cache(self, members: usize) -> PgHost {
        self.members.replace(LruCache::new(members.max(1)));
        self
    }

    /// The fencing epoch this host commits under, if any.
    pub fn epoch(&self) -> Option<i64> {
        self.epoch
    }

    /// The schema this host's tables are in.
    pub fn schema(&self) -> &PgSchema {
        &self.schema
    }

    /// The view of the group `state` belongs to, for this batch.
    pub fn group<'a>(&'a mut self, state: &'a mut LogState) -> PgGroup<'a> {
        PgGroup { host: self, state }
    }

    fn statement(&self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let prepared = self.client.borrow_mut().prepare(sql)?;
        self.statements.borrow_mut().insert(sql, prepared.clone());
        Ok(prepared)
    }

    /// Sends the open batch's `BEGIN`, if it has not been sent.
    fn enter_transaction(&self) -> Result<(), StoreError> {
        if self.batch.get() == Batch::Open {
            self.client.borrow_mut().batch_execute("BEGIN")?;
            self.batch.set(Batch::InTransaction);
        }
        Ok(())
    }

    /// Runs `sql`, inside the batch's transaction if a batch is open.
    fn query(&self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        self.enter_transaction()?;
        self.query_alone(sql, params)
    }

    /// Runs `sql` without opening the batch's transaction (inside it if it is open): for a
    /// read whose answer a transaction would not change, the node being the only writer,
    /// and for [`COMMIT_BATCH`].
    fn query_alone(&self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.client.borrow_mut().query(&statement, params)?)
    }

    fn query_opt(&self, sql: &'static str, params: Params<'_>) -> Result<Option<Row>, StoreError> {
        self.enter_transaction()?;
        let statement = self.statement(sql)?;
        Ok(self.client.borrow_mut().query_opt(&statement, params)?)
    }

    fn execute(&self, sql: &'static str, params: Params<'_>) -> Result<u64, StoreError> {
        self.enter_transaction()?;
        let statement = self.statement(sql)?;
        Ok(self.client.borrow_mut().execute(&statement, params)?)
    }

    /// Runs `write` unless the batch is already aborted; if it fails with a database error,
    /// PostgreSQL has aborted the transaction, so the batch is marked aborted.
    fn write<T>(
        &mut self,
        write: impl FnOnce(&mut PgHost) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.aborted.get() {
            return Err(StoreError::Aborted);
        }
        let result = write(self);
        self.note_failure(&result);
        result
    }

    /// Marks the batch aborted if `result` is a database error (PostgreSQL has aborted the
    /// transaction).
    fn note_failure<T>(&self, result: &Result<T, StoreError>) {
        if let Err(StoreError::Postgres(e)) = result {
            tracing::error!(error = %e, "PostgreSQL aborted the batch; its later writes are refused");
            self.aborted.set(true);
        }
    }

    /// Writes the held appends of every group, in one statement, so that what follows sees
    /// them.
    ///
    /// # Errors
    /// [`StoreError::Aborted`] after an earlier failure; [`StoreError::Postgres`], which
    /// aborts the batch (a unique violation here is a writer other than this node, which
    /// the lease rules out: the batch is then retried whole by its clients).
    fn write_held(&self) -> Result<(), StoreError> {
        if self.held.borrow().is_empty() {
            return Ok(());
        }
        if self.aborted.get() {
            return Err(StoreError::Aborted);
        }
        let held = std::mem::take(&mut *self.held.borrow_mut());
        let result = self.execute(INSERT_HELD, &HeldColumns::of(&held).params());
        self.note_failure(&result);
        result.map(|_| ())
    }

    /// Forgets what the open batch held and cached, after it failed.
    fn forget_batch(&mut self) {
        self.held.get_mut().clear();
        self.expected.clear();
        self.stored.clear();
        self.marks.clear();
        self.members.get_mut().clear();
    }

    /// Starts a write batch for every group of the turn.
    ///
    /// # Errors
    /// None today (the `BEGIN` is sent with the batch's first statement that needs one).
    pub fn begin(&mut self) -> Result<(), StoreError> {
        if self.batch.get() == Batch::InTransaction {
            // A batch left without commit (an error between begin and commit).
            let _ = self.client.get_mut().batch_execute("ROLLBACK");
        }
        self.aborted.set(false);
        self.held.get_mut().clear();
        self.expected.clear();
        self.stored.clear();
        self.marks.clear();
        self.batch.set(Batch::Open);
        Ok(())
    }

    /// Commits the batch of every group, durably, in one statement when nothing opened a
    /// transaction (see the module docs). On error nothing of it is stored, the caches are
    /// dropped, and the caller reloads the [`LogState`] of each group it touched
    /// ([`PgHost::load`]).
    ///
    /// # Errors
    /// [`StoreError::Fenced`] when another node took the lease; [`StoreError::Aborted`];
    /// [`StoreError::Postgres`].
    pub fn commit(&mut self) -> Result<(), StoreError> {
        let in_transaction = self.batch.get() == Batch::InTransaction;
        self.batch.set(Batch::Closed);
        let result = (|| -> Result<(), StoreError> {
            if self.aborted.get() {
                return Err(StoreError::Aborted);
            }
            let held = std::mem::take(self.held.get_mut());
            let marks = std::mem::take(&mut self.marks);
            if in_transaction || !held.is_empty() || !marks.is_empty() {
                let mark_gids: Vec<i32> = marks.keys().map(|g| gid_param(*g)).collect();
                let mark_seqs: Vec<i64> = marks.values().map(|m| m.0).collect();
                let mark_times: Vec<i64> = marks.values().map(|m| m.1).collect();
                let columns = HeldColumns::of(&held);
                let mut params = columns.params().to_vec();
                params.extend([
                    &self.epoch as &(dyn ToSql + Sync),
                    &mark_gids,
                    &mark_seqs,
                    &mark_times,
                ]);
                let rows = self.query_alone(COMMIT_BATCH, &params)?;
                if let Some(held) = self.epoch {
                    let current: i64 = rows
                        .first()
                        .ok_or_else(|| StoreError::Corrupt("no lease row".into()))?
                        .get(0);
                    if current != held {
                        return Err(StoreError::Fenced { held, current });
                    }
                }
            }
            if in_transaction {
                self.client.get_mut().batch_execute("COMMIT")?;
            }
            self.expected.clear();
            self.stored.clear();
            Ok(())
        })();
        if let Err(e) = result {
            // Leave the connection usable and the caches true to what is stored. A ROLLBACK
            // outside a transaction (a batch whose one statement failed on its own) is not
            // sent; one after a failed COMMIT (the transaction is already over) only warns.
            if in_transaction {
                let _ = self.client.get_mut().batch_execute("ROLLBACK");
            }
            self.aborted.set(false);
            self.forget_batch();
            return Err(e);
        }
        Ok(())
    }

    /// What makes a committed batch durable: nothing more, the commit is ([`Durable`]).
    pub fn flusher(&self) -> Box<dyn Flush> {
        Box::new(Durable)
    }

    /// The bytes the log and members take (their relations and indexes), 0 if unknown.
    pub fn stored_bytes(&self) -> u64 {
        if self.write_held().is_err() {
            return 0;
        }
        self.query_opt(
            "SELECT pg_total_relation_size('messages') + pg_total_relation_size('members')",
            &[],
        )
        .ok()
        .flatten()
        .and_then(|r| u64::try_from(r.get::<_, i64>(0)).ok())
        .unwrap_or(0)
    }

    /// The live groups by gid, with their member counts (one query).
    ///
    /// # Errors
    /// [`StoreError::Postgres`], [`StoreError::Corrupt`].
    pub fn live_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        let rows = self.query(
            "SELECT g.gid, g.name, g.owner, g.mode, g.state, g.created_by, COALESCE(c.n, 0)
             FROM groups g
             LEFT JOIN (SELECT gid, COUNT(*) AS n FROM members GROUP BY gid) c USING (gid)
             WHERE g.state = 'live' ORDER BY g.gid",
            &[],
        )?;
        rows.iter()
            .map(|row| {
                let gid = gid_of(row.get(0))?;
                let state: String = row.get(4);
                Ok(GroupRow {
                    gid,
                    name: GroupName::new(row.get::<_, String>(1))
                        .map_err(|e| StoreError::Corrupt(format!("group {gid}: {e}")))?,
                    owner: row.get::<_, Option<String>>(2).map(Principal::from_stored),
                    mode: parse_mode(row.get(3)),
                    state: GroupState::from_stored(&state).ok_or_else(|| {
                        StoreError::Corrupt(format!("group {gid}: state {state:?}"))
                    })?,
                    created_by: row.get::<_, Option<String>>(5).map(Principal::from_stored),
                    members: u64::try_from(row.get::<_, i64>(6)).unwrap_or(0),
                })
            })
            .collect()
    }

    /// The gid and state of the group named `name` that is not archived, if any.
    ///
    /// # Errors
    /// [`StoreError::Postgres`], [`StoreError::Corrupt`].
    pub fn find_group(
        &self,
        name: &GroupName,
    ) -> Result<Option<(GroupId, GroupState)>, StoreError> {
        let row = self.query_opt(
            "SELECT gid, state FROM groups WHERE name = $1 AND state <> 'archived'",
            &[&name.as_str()],
        )?;
        row.map(|r| {
            let gid = gid_of(r.get(0))?;
            let state: String = r.get(1);
            let state = GroupState::from_stored(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("group {gid}: state {state:?}")))?;
            Ok((gid, state))
        })
        .transpose()
    }

    /// Deletes the pending groups and their rows, in a transaction of its own; returns how
    /// many. Call it at start, outside a batch.
    ///
    /// # Errors
    /// [`StoreError::Postgres`].
    pub fn remove_pending_groups(&mut self) -> Result<u64, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        let removed = tx.query(
            "WITH gone AS (DELETE FROM groups WHERE state = 'pending' RETURNING gid),
                  m AS (DELETE FROM messages WHERE gid IN (SELECT gid FROM gone)),
                  s AS (DELETE FROM members WHERE gid IN (SELECT gid FROM gone)),
                  r AS (DELETE FROM grants WHERE gid IN (SELECT gid FROM gone))
             SELECT gid FROM gone",
            &[],
        )?;
        tx.commit()?;
        self.members.get_mut().clear();
        Ok(removed.len() as u64)
    }

    /// How many groups not archived `created_by` created, and how many the host has in all.
    ///
    /// # Errors
    /// [`StoreError::Postgres`].
    pub fn group_counts(&self, created_by: &Principal) -> Result<(u64, u64), StoreError> {
        let row = self
            .query_opt(
                "SELECT COUNT(*) FILTER (WHERE created_by = $1), COUNT(*)
                 FROM groups WHERE state <> 'archived'",
                &[&created_by.as_str()],
            )?
            .ok_or_else(|| StoreError::Corrupt("no row from the count".into()))?;
        Ok((
            u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        ))
    }

    /// Inserts a group in the open batch; returns its gid (from a sequence: never one the
    /// host had, removed pending groups included).
    ///
    /// # Errors
    /// [`StoreError::NameTaken`], [`StoreError::Aborted`], [`StoreError::Postgres`].
    pub fn insert_group(&mut self, g: NewGroup<'_>) -> Result<GroupId, StoreError> {
        self.write(|h| {
            if h.find_group(g.name)?.is_some() {
                return Err(StoreError::NameTaken(g.name.to_string()));
            }
            let row = h
                .query_opt(
                    "INSERT INTO groups (name, state, owner, mode, created_by, created_at_us)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING gid",
                    &[
                        &g.name.as_str(),
                        &g.state.as_str(),
                        &g.owner.map(Principal::as_str),
                        &g.mode.as_str(),
                        &g.created_by.map(Principal::as_str),
                        &g.at.as_micros(),
                    ],
                )?
                .ok_or_else(|| StoreError::Corrupt("no gid returned".into()))?;
            gid_of(row.get(0))
        })
    }

    /// Sets a group's state in the open batch; archiving records `at`.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if there is no such group; [`StoreError::NameTaken`] if it is
    /// made pending or live while another group has its name (checked first, so the batch
    /// goes on); [`StoreError::Aborted`], [`StoreError::Postgres`].
    pub fn set_group_state(
        &mut self,
        gid: GroupId,
        state: GroupState,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(|h| {
            let Some(row) = h.query_opt(
                "SELECT name, state FROM groups WHERE gid = $1",
                &[&gid_param(gid)],
            )?
            else {
                return Err(StoreError::Corrupt(format!("no group {gid}")));
            };
            let name: String = row.get(0);
            let was: String = row.get(1);
            if state != GroupState::Archived && was == GroupState::Archived.as_str() {
                let taken = h.query_opt(
                    "SELECT 1 FROM groups WHERE name = $1 AND state <> 'archived' AND gid <> $2",
                    &[&name, &gid_param(gid)],
                )?;
                if taken.is_some() {
                    return Err(StoreError::NameTaken(name));
                }
            }
            h.execute(
                "UPDATE groups SET state = $2,
                     archived_at_us = CASE WHEN $2 = 'archived' THEN $3::BIGINT END
                 WHERE gid = $1",
                &[&gid_param(gid), &state.as_str(), &at.as_micros()],
            )?;
            Ok(())
        })
    }

    /// Reads group `gid`'s [`LogState`]: its stored high-water marks, its newest message (one
    /// descent of the `(gid, seq)` index) and its member count, in one query.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if there is no such group; [`StoreError::Postgres`].
    pub fn load(&self, gid: GroupId) -> Result<LogState, StoreError> {
        let Some(row) = self.query_opt(
            "SELECT g.last_seq, g.last_time_us, n.seq, n.time_us,
                    (SELECT COUNT(*) FROM members WHERE gid = $1)
             FROM groups g
             LEFT JOIN LATERAL (SELECT seq, time_us FROM messages WHERE gid = $1
                                ORDER BY seq DESC LIMIT 1) n ON true
             WHERE g.gid = $1",
            &[&gid_param(gid)],
        )?
        else {
            return Err(StoreError::Corrupt(format!("no group {gid}")));
        };
        let (stored_seq, stored_time): (i64, i64) = (row.get(0), row.get(1));
        let max_seq: Option<i64> = row.get(2);
        let max_time: Option<i64> = row.get(3);
        let members: i64 = row.get(4);
        Ok(LogState {
            gid,
            last_seq: u64::try_from(stored_seq.max(max_seq.unwrap_or(0))).unwrap_or(0),
            clock: MonotonicClock::after(Timestamp::from_micros(
                stored_time.max(max_time.unwrap_or(0)),
            )),
            member_count: u64::try_from(members).unwrap_or(0),
        })
    }

    // One group's reads and writes, for `PgGroup` and `PgStore`.

    fn member(&self, st: &LogState, who: &Principal) -> Result<Option<UserName>, StoreError> {
        let key = (st.gid, who.as_str().to_owned());
        if let Some(name) = self.members.borrow_mut().get(&key) {
            return Ok(Some(name.clone()));
        }
        let row = self.query_opt(
            "SELECT user_name FROM members WHERE gid = $1 AND principal = $2",
            &[&gid_param(st.gid), &who.as_str()],
        )?;
        let name = row
            .map(|r| UserName::new(r.get::<_, String>(0)))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if let Some(name) = &name {
            self.members.borrow_mut().insert(key, name.clone());
        }
        Ok(name)
    }

    fn add_member(
        &mut self,
        st: &mut LogState,
        who: &Principal,
        user: &UserName,
        at: Timestamp,
    ) -> Result<(UserName, bool), StoreError> {
        self.write(|h| {
            if let Some(bound) = h.member(st, who)? {
                return Ok((bound, false));
            }
            if h.member_named(st, user)?.is_some() {
                return Err(StoreError::LabelTaken(user.clone()));
            }
            h.execute(
                "INSERT INTO members (gid, principal, user_name, joined_at_us)
                 VALUES ($1, $2, $3, $4)",
                &[
                    &gid_param(st.gid),
                    &who.as_str(),
                    &user.as_str(),
                    &at.as_micros(),
                ],
            )?;
            st.member_count += 1;
            Ok((user.clone(), true))
        })
    }

    fn remove_member(
        &mut self,
        st: &mut LogState,
        who: &Principal,
    ) -> Result<Option<UserName>, StoreError> {
        self.write(|h| {
            let Some(bound) = h.member(st, who)? else {
                return Ok(None);
            };
            h.execute(
                "DELETE FROM members WHERE gid = $1 AND principal = $2",
                &[&gid_param(st.gid), &who.as_str()],
            )?;
            h.members
                .get_mut()
                .remove(&(st.gid, who.as_str().to_owned()));
            st.member_count = st.member_count.saturating_sub(1);
            Ok(Some(bound))
        })
    }

    fn member_named(
        &self,
        st: &LogState,
        user: &UserName,
    ) -> Result<Option<Principal>, StoreError> {
        let row = self.query_opt(
            "SELECT principal FROM members WHERE gid = $1 AND user_name = $2",
            &[&gid_param(st.gid), &user.as_str()],
        )?;
        Ok(row.map(|r| Principal::from_stored(r.get(0))))
    }

    fn grant(
        &mut self,
        st: &LogState,
        who: &Principal,
        grant: Grant,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        self.write(|h| {
            Ok(h.execute(
                "INSERT INTO grants (gid, principal, kind, at_us) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[
                    &gid_param(st.gid),
                    &who.as_str(),
                    &grant.as_str(),
                    &at.as_micros(),
                ],
            )? == 1)
        })
    }

    fn revoke(&mut self, st: &LogState, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.write(|h| {
            Ok(h.execute(
                "DELETE FROM grants WHERE gid = $1 AND principal = $2 AND kind = $3",
                &[&gid_param(st.gid), &who.as_str(), &grant.as_str()],
            )? == 1)
        })
    }

    fn has(&self, st: &LogState, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        Ok(self
            .query_opt(
                "SELECT 1 FROM grants WHERE gid = $1 AND principal = $2 AND kind = $3",
                &[&gid_param(st.gid), &who.as_str(), &grant.as_str()],
            )?
            .is_some())
    }

    fn mode(&self, st: &LogState) -> Result<GroupMode, StoreError> {
        let row = self.query_opt(
            "SELECT mode FROM groups WHERE gid = $1",
            &[&gid_param(st.gid)],
        )?;
        Ok(parse_mode(row.map(|r| r.get::<_, String>(0)).as_deref()))
    }

    fn set_mode(&mut self, st: &LogState, mode: GroupMode) -> Result<bool, StoreError> {
        self.write(|h| {
            Ok(h.execute(
                "UPDATE groups SET mode = $2 WHERE gid = $1 AND mode <> $2",
                &[&gid_param(st.gid), &mode.as_str()],
            )? == 1)
        })
    }

    fn members(&self, st: &LogState) -> Result<Vec<Member>, StoreError> {
        let rows = self.query(
            "SELECT user_name, joined_at_us, principal FROM members WHERE gid = $1
             ORDER BY user_name COLLATE \"C\"",
            &[&gid_param(st.gid)],
        )?;
        rows.iter()
            .map(|row| {
                Ok(Member {
                    user: UserName::new(row.get::<_, String>(0))
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    joined_at: Timestamp::from_micros(row.get(1)),
                    key: Principal::from_stored(row.get(2)).public_key(),
                })
            })
            .collect()
    }

    fn expect_appends(&mut self, st: &LogState, ids: &[MessageId]) -> Result<(), StoreError> {
        let gid = st.gid;
        let ids: Vec<MessageId> = ids
            .iter()
            .filter(|id| !self.expected.contains(&(gid, **id)))
            .copied()
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        if self.appended >= self.lookup_prepared_at.saturating_mul(2) + 1000 {
            self.statements.get_mut().remove(LOOKUP_IDS);
            self.lookup_prepared_at = self.appended;
        }
        self.write(|h| {
            let rows = h.query_alone(
                LOOKUP_IDS,
                &[
                    &gid_param(gid),
                    &ids.iter()
                        .map(|id| id.as_bytes().as_slice())
                        .collect::<Vec<_>>(),
                ],
            )?;
            for row in rows {
                let id: [u8; 16] = row
                    .get::<_, Vec<u8>>(0)
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("a message id is not 16 bytes".into()))?;
                h.stored.insert(
                    (gid, MessageId::from_bytes(id)),
                    Stored {
                        seq: row.get(1),
                        time_us: row.get(2),
                        sender: row.get(3),
                        body: row.get(4),
                        attachment: row.get(5),
                    },
                );
            }
            h.expected.extend(ids.into_iter().map(|id| (gid, id)));
            Ok(())
        })
    }

    fn append(&mut self, st: &mut LogState, msg: NewMessage<'_>) -> Result<SendAck, StoreError> {
        let gid = st.gid;
        self.write(|h| {
            let attachment = msg.attachment.map(attachment_json).transpose()?;
            let id = match msg.id {
                Some(id) if !h.expected.contains(&(gid, id)) => {
                    // Not looked up with the batch: find out now, in order with what is held.
                    h.write_held()?;
                    if let Some(ack) =
                        h.stored_ack(st, id, msg.sender, msg.body, attachment.as_deref())?
                    {
                        return Ok(ack);
                    }
                    id
                }
                Some(id) => {
                    let same = |sender: &str, body: &str, att: &Option<String>| {
                        sender == msg.sender.as_str()
                            && body == msg.body.get()
                            && *att == attachment
                    };
                    let earlier = h
                        .stored
                        .get(&(gid, id))
                        .map(|s| (s.seq, s.time_us, same(&s.sender, &s.body, &s.attachment)))
                        .or_else(|| {
                            h.held
                                .borrow()
                                .iter()
                                .find(|m| m.gid == gid_param(gid) && m.id == id)
                                .map(|m| {
                                    (m.seq, m.time_us, same(&m.sender, &m.body, &m.attachment))
                                })
                        });
                    match earlier {
                        Some((_, _, false)) => return Err(StoreError::IdConflict(id)),
                        Some((seq, time_us, true)) => {
                            return Ok(SendAck {
                                seq: u64::try_from(seq).unwrap_or(0),
                                id,
                                time: Timestamp::from_micros(time_us),
                                duplicate: true,
                            })
                        }
                        None => id,
                    }
                }
                None => MessageId::new_v7(),
            };
            let seq = st.last_seq + 1;
            let time = st.clock.tick(msg.now);
            h.held.get_mut().push(Held {
                gid: gid_param(gid),
                seq: seq as i64,
                id,
                time_us: time.as_micros(),
                sender: msg.sender.as_str().to_owned(),
                body: msg.body.get().to_owned(),
                kind: msg.kind.as_str(),
                sender_key: msg.sender_key.map(|k| k.to_string()),
                attachment_sha256: msg.attachment.map(|a| a.sha256.as_bytes().to_vec()),
                attachment,
            });
            h.appended += 1;
            st.last_seq = seq;
            Ok(SendAck {
                seq,
                id,
                time,
                duplicate: false,
            })
        })
    }

    fn stored_ack(
        &self,
        st: &LogState,
        id: MessageId,
        sender: &UserName,
        body: &RawValue,
        attachment: Option<&str>,
    ) -> Result<Option<SendAck>, StoreError> {
        self.write_held()?;
        let Some(row) = self.query_opt(
            "SELECT seq, time_us, sender, body, attachment FROM messages
             WHERE gid = $1 AND id = $2",
            &[&gid_param(st.gid), &id.as_bytes().as_slice()],
        )?
        else {
            return Ok(None);
        };
        let (seq, time_us): (i64, i64) = (row.get(0), row.get(1));
        if row.get::<_, &str>(2) != sender.as_str()
            || row.get::<_, &str>(3) != body.get()
            || row.get::<_, Option<&str>>(4) != attachment
        {
            return Err(StoreError::IdConflict(id));
        }
        Ok(Some(SendAck {
            seq: u64::try_from(seq).unwrap_or(0),
            id,
            time: Timestamp::from_micros(time_us),
            duplicate: true,
        }))
    }

    fn references(&self, st: &LogState, digest: &Sha256Digest) -> Result<bool, StoreError> {
        self.write_held()?;
        Ok(self
            .query_opt(
                "SELECT 1 FROM messages WHERE gid = $1 AND attachment_sha256 = $2 LIMIT 1",
                &[&gid_param(st.gid), &digest.as_bytes().as_slice()],
            )?
            .is_some())
    }

    fn page(
        &self,
        st: &LogState,
        query: HistoryQuery,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let gid = gid_param(st.gid);
        match query {
            HistoryQuery::AfterSeq(after) => self.after(
                gid,
                i64::try_from(after).unwrap_or(i64::MAX),
                limit,
                max_bytes,
            ),
            HistoryQuery::Since(t) => match self.first_seq_at(gid, t.as_micros())? {
                Some(first) => self.after(gid, first - 1, limit, max_bytes),
                None => Ok(Page {
                    messages: Vec::new(),
                    more: false,
                }),
            },
            HistoryQuery::ById(id) => {
                self.write_held()?;
                let rows = self.query(
                    "SELECT seq, id, time_us, sender, body, kind, sender_key, attachment
                     FROM messages WHERE gid = $1 AND id = $2",
                    &[&gid, &id.as_bytes().as_slice()],
                )?;
                to_page(&rows, 1, usize::MAX)
            }
            HistoryQuery::Latest(n) => {
                // As SQLite's: `latest` is its own bound; `more` only when bytes cut it.
                self.write_held()?;
                let rows = self.query(
                    "SELECT seq, id, time_us, sender, body, kind, sender_key, attachment
                     FROM messages WHERE gid = $1 ORDER BY seq DESC LIMIT $2",
                    &[&gid, &i64::from(n)],
                )?;
                let mut page = to_page(&rows, n, max_bytes)?;
                page.messages.reverse();
                Ok(page)
            }
        }
    }

    fn apply_retention(
        &mut self,
        st: &LogState,
        policy: Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let gid = gid_param(st.gid);
        self.write(|h| {
            h.write_held()?;
            let mut deleted = 0;
            if let Some(max) = policy.max_messages {
                let keep_from = i64::try_from(st.last_seq.saturating_sub(max)).unwrap_or(i64::MAX);
                deleted += h.execute(
                    "DELETE FROM messages WHERE gid = $1 AND seq <= $2",
                    &[&gid, &keep_from],
                )?;
            }
            if let Some(age) = policy.max_age {
                let cutoff = now.saturating_sub(age);
                let keep_from = h.first_seq_at(gid, cutoff.as_micros())?.unwrap_or(i64::MAX);
                deleted += h.execute(
                    "DELETE FROM messages WHERE gid = $1 AND seq < $2",
                    &[&gid, &keep_from],
                )?;
            }
            if deleted > 0 {
                // The newest rows may be gone: keep the marks, so seqs and times go on.
                h.marks.insert(
                    st.gid,
                    (
                        i64::try_from(st.last_seq).unwrap_or(i64::MAX),
                        st.clock.last().as_micros(),
                    ),
                );
            }
            Ok(deleted)
        })
    }

    /// The first stored seq of group `gid` whose time is at or after `time_us`.
    fn first_seq_at(&self, gid: i32, time_us: i64) -> Result<Option<i64>, StoreError> {
        self.write_held()?;
        let row = self.query_opt(
            "SELECT MIN(seq) FROM messages WHERE gid = $1 AND time_us >= $2",
            &[&gid, &time_us],
        )?;
        Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
    }

    fn after(
        &self,
        gid: i32,
        after: i64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        self.write_held()?;
        let rows = self.query(
            "SELECT seq, id, time_us, sender, body, kind, sender_key, attachment
             FROM messages WHERE gid = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            &[&gid, &after, &(i64::from(limit) + 1)],
        )?;
        to_page(&rows, limit, max_bytes)
    }
}

/// A stored mode: `private`, else open.
fn parse_mode(mode: Option<&str>) -> GroupMode {
    match mode {
        Some("private") => GroupMode::Private,
        _ => GroupMode::Open,
    }
}

fn row_to_message(row: &Row) -> Result<Message, StoreError> {
    let seq: i64 = row.get(0);
    let id: Vec<u8> = row.get(1);
    let kind: String = row.get(5);
    let kind = EntryKind::from_name(&kind)
        .ok_or_else(|| StoreError::Corrupt(format!("seq {seq}: kind {kind:?}")))?;
    let sender_key = row
        .get::<_, Option<String>>(6)
        .map(|k| k.parse::<PublicKey>())
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("seq {seq}: sender_key: {e}")))?;
    let id: [u8; 16] = id
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("seq {seq}: id is not 16 bytes")))?;
    let attachment = row
        .get::<_, Option<String>>(7)
        .map(|json| serde_json::from_str::<Attachment>(&json))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("seq {seq}: attachment: {e}")))?;
    Ok(Message {
        seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("seq {seq}")))?,
        id: MessageId::from_bytes(id),
        time: Timestamp::from_micros(row.get(2)),
        sender: UserName::new(row.get::<_, String>(3))
            .map_err(|e| StoreError::Corrupt(format!("seq {seq}: {e}")))?,
        kind,
        body: RawValue::from_string(row.get(4))
            .map_err(|e| StoreError::Corrupt(format!("seq {seq}: body: {e}")))?,
        sender_key,
        attachment,
    })
}

/// Cuts rows (in the order wanted) into a page of at most `limit` messages and about
/// `max_bytes` of bodies; `rows` holds up to `limit + 1`.
fn to_page(rows: &[Row], limit: u32, max_bytes: usize) -> Result<Page, StoreError> {
    let mut messages = Vec::new();
    let mut bytes = 0usize;
    let mut more = false;
    for row in rows {
        if messages.len() as u64 >= u64::from(limit) || (bytes >= max_bytes && !messages.is_empty())
        {
            more = true;
            break;
        }
        let m = row_to_message(row)?;
        bytes += m.body.get().len();
        messages.push(m);
    }
    Ok(Page { messages, more })
}

/// One group's rows in a [`PgHost`], for one batch ([`GroupLog`]): every statement names the
/// group's gid, so a view never reads nor writes another group's rows.
pub struct PgGroup<'a> {
    host: &'a mut PgHost,
    state: &'a mut LogState,
}

impl std::fmt::Debug for PgGroup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgGroup")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// [`GroupLog`] for a type with a `host: PgHost`-like field and a `state: LogState` one.
macro_rules! pg_group_log {
    ($t:ty) => {
        impl GroupLog for $t {
            fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError> {
                self.host.member(&self.state, who)
            }
            fn add_member(
                &mut self,
                who: &Principal,
                user: &UserName,
                at: Timestamp,
            ) -> Result<(UserName, bool), StoreError> {
                self.host.add_member(&mut self.state, who, user, at)
            }
            fn remove_member(&mut self, who: &Principal) -> Result<Option<UserName>, StoreError> {
                self.host.remove_member(&mut self.state, who)
            }
            fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError> {
                self.host.member_named(&self.state, user)
            }
            fn grant(
                &mut self,
                who: &Principal,
                grant: Grant,
                at: Timestamp,
            ) -> Result<bool, StoreError> {
                self.host.grant(&self.state, who, grant, at)
            }
            fn revoke(&mut self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
                self.host.revoke(&self.state, who, grant)
            }
            fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
                self.host.has(&self.state, who, grant)
            }
            fn mode(&self) -> Result<GroupMode, StoreError> {
                self.host.mode(&self.state)
            }
            fn set_mode(&mut self, mode: GroupMode) -> Result<bool, StoreError> {
                self.host.set_mode(&self.state, mode)
            }
            fn members(&self) -> Result<Vec<Member>, StoreError> {
                self.host.members(&self.state)
            }
            fn member_count(&self) -> u64 {
                self.state.member_count
            }
            fn expect_appends(&mut self, ids: &[MessageId]) -> Result<(), StoreError> {
                self.host.expect_appends(&self.state, ids)
            }
            fn append(&mut self, msg: NewMessage<'_>) -> Result<SendAck, StoreError> {
                self.host.append(&mut self.state, msg)
            }
            fn stored_ack(
                &self,
                id: MessageId,
                sender: &UserName,
                body: &RawValue,
                attachment: Option<&str>,
            ) -> Result<Option<SendAck>, StoreError> {
                self.host
                    .stored_ack(&self.state, id, sender, body, attachment)
            }
            fn references(&self, digest: &Sha256Digest) -> Result<bool, StoreError> {
                self.host.references(&self.state, digest)
            }
            fn page(
                &self,
                query: HistoryQuery,
                limit: u32,
                max_bytes: usize,
            ) -> Result<Page, StoreError> {
                self.host.page(&self.state, query, limit, max_bytes)
            }
            fn last_seq(&self) -> u64 {
                self.state.last_seq
            }
            fn apply_retention(
                &mut self,
                policy: Retention,
                now: Timestamp,
            ) -> Result<u64, StoreError> {
                self.host.apply_retention(&self.state, policy, now)
            }
        }
    };
}

pg_group_log!(PgGroup<'_>);
pg_group_log!(PgStore);

/// [`GroupStore`] for a node of one group: a [`PgHost`] in the group's own schema
/// ([`PgSchema::Group`]) serving gid 1, with its [`LogState`].
pub struct PgStore {
    host: PgHost,
    state: LogState,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("epoch", &self.host.epoch)
            .field("last_seq", &self.state.last_seq)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `target`, creates or migrates `group`'s schema, and reads the log's state.
    /// With `epoch`, every commit is fenced by it (the epoch of a lease this node holds,
    /// [`crate::lease::Lease`]); without, there is no check (one node, no standby).
    ///
    /// # Errors
    /// As [`connect`] and [`prepare`].
    pub fn open(
        target: &PgTarget,
        group: &GroupName,
        epoch: Option<i64>,
    ) -> Result<PgStore, StoreError> {
        let host = PgHost::open(target, PgSchema::Group(group.clone()), epoch)?;
        let state = host.load(GroupId::ONE)?;
        Ok(PgStore { host, state })
    }

    /// The fencing epoch this store commits under, if any.
    pub fn epoch(&self) -> Option<i64> {
        self.host.epoch
    }

    /// The host database and gid 1's state, for a caller that serves the schema as a host.
    pub fn into_parts(self) -> (PgHost, LogState) {
        (self.host, self.state)
    }
}

impl GroupStore for PgStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        self.host.begin()
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let result = self.host.commit();
        if let Err(e) = &result {
            if !matches!(e, StoreError::Fenced { .. }) {
                // Keep the cache true to what is stored.
                self.state = self.host.load(GroupId::ONE)?;
            }
        }
        result
    }

    fn flusher(&self) -> Box<dyn Flush> {
        self.host.flusher()
    }

    fn stored_bytes(&self) -> u64 {
        self.host.stored_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::{append, group, user};
    use super::*;
    use agora_proto::wire::MAX_PAGE_BYTES;

    fn cluster() -> (agora_tests::pg::PgCluster, PgTarget) {
        let cluster = agora_tests::pg::PgCluster::start();
        let target = PgTarget::new(cluster.database("agora"));
        (cluster, target)
    }

    /// As SQLite's: a pending group is removed at start with its rows, an archived group's
    /// name is free at once, and gids come from a sequence (never reused) in a host schema.
    #[test]
    fn pending_groups_are_removed_archived_names_freed_gids_never_reused_on_postgres() {
        let (_cluster, target) = cluster();
        let mut h = PgHost::open(&target, PgSchema::Host("h".into()), None).expect("open");
        let (a, b) = (
            GroupName::new("a").expect("name"),
            GroupName::new("b").expect("name"),
        );
        let creator = Principal::name(&user("carol"));
        let new = |name, state| NewGroup {
            name,
            owner: Some(&creator),
            created_by: Some(&creator),
            mode: GroupMode::Open,
            state,
            at: Timestamp::from_micros(1),
        };
        h.begin().expect("begin");
        let ga = h.insert_group(new(&a, GroupState::Live)).expect("a");
        let gb = h.insert_group(new(&b, GroupState::Pending)).expect("b");
        assert_eq!((ga, gb), (GroupId(1), GroupId(2)));
        assert!(matches!(
            h.insert_group(new(&a, GroupState::Pending)),
            Err(StoreError::NameTaken(n)) if n == "a"
        ));
        let mut st = h.load(gb).expect("load");
        h.group(&mut st)
            .add_member(&creator, &user("carol"), Timestamp::from_micros(2))
            .expect("join");
        h.commit().expect("commit");
        append(&mut OneOf(&mut h, &mut st), "1", 3);
        assert_eq!(h.group_counts(&creator).expect("counts"), (2, 2));
        assert_eq!(
            h.find_group(&b).expect("find"),
            Some((gb, GroupState::Pending))
        );
        assert_eq!(h.remove_pending_groups().expect("remove"), 1);
        assert_eq!(h.find_group(&b).expect("find"), None);
        assert!(h.load(gb).is_err(), "its row is gone");
        let left: i64 = h
            .client
            .get_mut()
            .query_one(
                "SELECT (SELECT COUNT(*) FROM messages) + (SELECT COUNT(*) FROM members)",
                &[],
            )
            .expect("count")
            .get(0);
        assert_eq!(left, 0, "b's message and member went with it");
        h.begin().expect("begin");
        h.set_group_state(ga, GroupState::Archived, Timestamp::from_micros(3))
            .expect("archive");
        let again = h.insert_group(new(&a, GroupState::Live)).expect("a again");
        assert!(matches!(
            h.set_group_state(ga, GroupState::Live, Timestamp::from_micros(4)),
            Err(StoreError::NameTaken(n)) if n == "a"
        ));
        h.commit().expect("the batch goes on after a refused state");
        assert_eq!(again, GroupId(3), "gid 2 was b's: never reused");
        let live: Vec<GroupId> = h
            .live_groups()
            .expect("live")
            .into_iter()
            .map(|g| g.gid)
            .collect();
        assert_eq!(live, vec![again]);
    }

    /// A [`GroupStore`] over one group of a [`PgHost`], for [`append`].
    struct OneOf<'a>(&'a mut PgHost, &'a mut LogState);

    impl OneOf<'_> {
        fn view(&mut self) -> PgGroup<'_> {
            self.0.group(self.1)
        }
    }

    impl GroupLog for OneOf<'_> {
        fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError> {
            self.0.member(self.1, who)
        }
        fn add_member(
            &mut self,
            who: &Principal,
            user: &UserName,
            at: Timestamp,
        ) -> Result<(UserName, bool), StoreError> {
            self.view().add_member(who, user, at)
        }
        fn remove_member(&mut self, who: &Principal) -> Result<Option<UserName>, StoreError> {
            self.view().remove_member(who)
        }
        fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError> {
            self.0.member_named(self.1, user)
        }
        fn grant(
            &mut self,
            who: &Principal,
            grant: Grant,
            at: Timestamp,
        ) -> Result<bool, StoreError> {
            self.view().grant(who, grant, at)
        }
        fn revoke(&mut self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
            self.view().revoke(who, grant)
        }
        fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
            self.0.has(self.1, who, grant)
        }
        fn mode(&self) -> Result<GroupMode, StoreError> {
            self.0.mode(self.1)
        }
        fn set_mode(&mut self, mode: GroupMode) -> Result<bool, StoreError> {
            self.view().set_mode(mode)
        }
        fn members(&self) -> Result<Vec<Member>, StoreError> {
            self.0.members(self.1)
        }
        fn member_count(&self) -> u64 {
            self.1.member_count
        }
        fn append(&mut self, msg: NewMessage<'_>) -> Result<SendAck, StoreError> {
            self.view().append(msg)
        }
        fn stored_ack(
            &self,
            id: MessageId,
            sender: &UserName,
            body: &RawValue,
            attachment: Option<&str>,
        ) -> Result<Option<SendAck>, StoreError> {
            self.0.stored_ack(self.1, id, sender, body, attachment)
        }
        fn references(&self, digest: &Sha256Digest) -> Result<bool, StoreError> {
            self.0.references(self.1, digest)
        }
        fn page(
            &self,
            query: HistoryQuery,
            limit: u32,
            max_bytes: usize,
        ) -> Result<Page, StoreError> {
            self.0.page(self.1, query, limit, max_bytes)
        }
        fn last_seq(&self) -> u64 {
            self.1.last_seq
        }
        fn apply_retention(
            &mut self,
            policy: Retention,
            now: Timestamp,
        ) -> Result<u64, StoreError> {
            self.view().apply_retention(policy, now)
        }
    }

    impl GroupStore for OneOf<'_> {
        fn begin(&mut self) -> Result<(), StoreError> {
            self.0.begin()
        }
        fn commit(&mut self) -> Result<(), StoreError> {
            self.0.commit()
        }
        fn flusher(&self) -> Box<dyn Flush> {
            self.0.flusher()
        }
        fn stored_bytes(&self) -> u64 {
            self.0.stored_bytes()
        }
    }

    /// A node of one's schema at version 3 (as a node before the host database left it:
    /// `meta`, no gid) is migrated to 4 in place: the group becomes gid 1 with its mode and
    /// high-water marks (above the newest row, after retention), and its messages (ids,
    /// seqs, times), members, grants and blobs are gid 1's; the next append numbers on.
    #[test]
    fn a_version_3_schema_is_migrated_to_4_and_keeps_seq_ids_members_grants_mode() {
        let (_cluster, target) = cluster();
        let schema = schema_name(&group());
        let mut client = connect(&target, "test").expect("connect");
        let mut v3 = format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema};
             CREATE TABLE schema_version (version BIGINT NOT NULL);
             INSERT INTO schema_version VALUES (3);"
        );
        for m in &MIGRATIONS[..3] {
            v3.push_str(m);
        }
        v3.push_str(
            "INSERT INTO meta VALUES ('group', 'Cool Group'), ('mode', 'private'),
                 ('last_seq', '9'), ('last_time_us', '9000');
             INSERT INTO messages (seq, id, time_us, sender, body, kind) VALUES
                 (5, '\\x05050505050505050505050505050505', 500, 'alice', '\"five\"', 'message'),
                 (6, '\\x06060606060606060606060606060606', 600, 'bob', '\"six\"', 'message');
             INSERT INTO members VALUES ('name:alice', 'alice', 1), ('name:bob', 'bob', 2);
             INSERT INTO grants VALUES ('name:bob', 'admin', 3);
             INSERT INTO blobs (digest, size) VALUES ('\\x01', 1);",
        );
        client.batch_execute(&v3).expect("a version 3 schema");
        drop(client);

        let mut s = PgStore::open(&target, &group(), None).expect("migrate");
        assert_eq!(s.last_seq(), 9, "the stored mark, above the newest row");
        assert_eq!(s.member_count(), 2);
        assert_eq!(s.mode().expect("mode"), GroupMode::Private);
        let bob = Principal::name(&user("bob"));
        assert!(s.has(&bob, Grant::Admin).expect("grant"));
        assert_eq!(s.member(&bob).expect("member"), Some(user("bob")));
        let page = s
            .page(
                HistoryQuery::ById(MessageId::from_bytes([6; 16])),
                1,
                MAX_PAGE_BYTES,
            )
            .expect("by id");
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.messages[0].seq, 6);
        assert_eq!(page.messages[0].time.as_micros(), 600);
        let next = append(&mut s, "\"ten\"", 100);
        assert_eq!(next.seq, 10);
        assert!(
            next.time.as_micros() > 9000,
            "the clock goes on from the mark"
        );
        let (mut host, _) = s.into_parts();
        let live = host.live_groups().expect("live");
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].gid, live[0].name.clone()), (GroupId::ONE, group()));
        let blobs: i64 = host
            .client
            .get_mut()
            .query_one("SELECT COUNT(*) FROM blobs WHERE gid = 1", &[])
            .expect("blobs")
            .get(0);
        assert_eq!(blobs, 1);
        drop(host);
        // A node of another group finds the schema is not its own.
        let other = GroupName::new("Other").expect("name");
        let mut client = connect(&target, "test").expect("connect");
        client
            .batch_execute(&format!("UPDATE {schema}.groups SET name = 'Other'"))
            .expect("rename");
        assert!(matches!(
            PgStore::open(&target, &group(), None),
            Err(StoreError::WrongGroup { found, .. }) if found == other.as_str()
        ));
    }
}
