//! [`GroupStore`] in PostgreSQL: one schema per group in a database that several nodes of
//! the group share (one of them active, [`crate::lease`]), through the synchronous
//! `postgres` client on the node's loop thread.
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
//! `INSERT` per message. A batch now costs a fixed handful, whatever its size, and a batch
//! of sends two:
//! - appends are held in the store and written at commit, or before any read that could see
//!   them, by one `INSERT … SELECT FROM unnest(…)` (PostgreSQL's array expansion);
//! - the commit is one statement (`COMMIT_BATCH`): the fencing check, the held appends and
//!   the high-water marks, in data-modifying `WITH` queries. `BEGIN` is sent only before
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
//!   membership check of a send is not a query; the cache is dropped with a failed batch.
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
//! In schema `agora_group_<16 hex digits>` (the first 8 bytes of the SHA-256 of the group's
//! name: names are Unicode up to 64 characters, PostgreSQL's identifiers 63 bytes), with
//! `schema_version(version)` holding the migration level (version 3), applied under a
//! transaction-level advisory lock so that nodes starting at once do not race:
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

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

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
    attachment_json, Durable, Flush, Grant, GroupLog, GroupStore, NewMessage, Page, Principal,
    Retention, StoreError,
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

/// Creates or migrates `group`'s schema and checks that it belongs to `group`, in one
/// transaction under an advisory lock (nodes starting at once wait for each other), then
/// points the session's `search_path` at it.
///
/// # Errors
/// [`StoreError::SchemaTooNew`], [`StoreError::WrongGroup`] (a hash collision of names),
/// [`StoreError::Postgres`].
pub fn prepare_schema(client: &mut Client, group: &GroupName) -> Result<(), StoreError> {
    let schema = schema_name(group);
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('agora-migrate:' || $1, 0))",
        &[&schema],
    )?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         SET LOCAL search_path TO {schema};
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
        tracing::info!(schema, to = at + 1, "migrating the PostgreSQL schema");
        tx.batch_execute(migration)?;
    }
    tx.execute("UPDATE schema_version SET version = $1", &[&SCHEMA_VERSION])?;
    let found: Option<String> = tx
        .query_opt("SELECT value FROM meta WHERE key = 'group'", &[])?
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
                "INSERT INTO meta (key, value) VALUES ('group', $1)",
                &[&group.as_str()],
            )?;
        }
    }
    tx.commit()?;
    client.batch_execute(&format!("SET search_path TO {schema}"))?;
    Ok(())
}

/// The most members [`PgStore`] keeps in its cache (65,536); past it the cache starts over.
const MEMBER_CACHE: usize = 1 << 16;

/// A message appended in the open batch and not yet written (see the module docs).
#[derive(Debug)]
struct Held {
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

/// [`GroupStore`] in a PostgreSQL schema (see the module docs).
pub struct PgStore {
    /// `RefCell`: the client needs `&mut` for every query, reads included; the store is
    /// owned by one thread (it is `Send`, not `Sync`).
    client: RefCell<Client>,
    statements: RefCell<HashMap<&'static str, Statement>>,
    epoch: Option<i64>,
    last_seq: u64,
    clock: MonotonicClock,
    member_count: u64,
    meta_dirty: bool,
    /// A statement of the open batch failed: PostgreSQL refuses the rest of it. A `Cell`, as
    /// reads (`&self`) write held appends first.
    aborted: Cell<bool>,
    /// Appends of the open batch not yet written, in seq order.
    held: RefCell<Vec<Held>>,
    /// The client ids looked up for this batch, and the ones of them already stored.
    expected: HashSet<MessageId>,
    stored: HashMap<MessageId, Stored>,
    /// Principal → user name, of members known to be members (bounded, [`MEMBER_CACHE`]).
    members: RefCell<HashMap<String, UserName>>,
    /// `last_seq` when the batch id lookup was last prepared (see [`LOOKUP_IDS`]).
    lookup_prepared_at: u64,
    /// Where the batch stands: a `BEGIN` is sent only before its first statement that needs
    /// one (see the module docs). A `Cell`, as reads (`&self`) enter the transaction too.
    batch: Cell<Batch>,
}

/// Where [`PgStore`]'s batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// No batch: statements run on their own (autocommit).
    Closed,
    /// [`GroupStore::begin`] was called, and no `BEGIN` sent yet.
    Open,
    /// The batch's transaction is open on the server.
    InTransaction,
}

/// A batch's commit as one statement: the fencing check (the lease row read `FOR SHARE`,
/// before anything is written), the held appends (`$1`…`$9`, arrays of one element per
/// message) and the high-water marks (`$11`, `$12`: `last_seq` and `last_time_us` as text,
/// or NULL when unchanged), written only if the epoch is still `$10` (or `$10` is NULL: no
/// fencing). Returns the epoch read (no row without a lease row; PostgreSQL runs every
/// data-modifying `WITH` to completion whether or not the result reads it). Alone, outside a
/// transaction, it is its own durable transaction: a batch of appends costs the server one
/// round trip and one WAL flush.
const COMMIT_BATCH: &str = "WITH fence AS (SELECT epoch FROM lease WHERE id = 1 FOR SHARE),
     allowed AS (SELECT $10::BIGINT IS NULL OR (SELECT epoch FROM fence) = $10 AS ok),
     appended AS (
         INSERT INTO messages
             (seq, id, time_us, sender, body, kind, sender_key, attachment, attachment_sha256)
         SELECT * FROM unnest($1::BIGINT[], $2::BYTEA[], $3::BIGINT[], $4::TEXT[],
                              $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::BYTEA[])
         WHERE (SELECT ok FROM allowed)),
     marks AS (
         INSERT INTO meta (key, value)
         SELECT * FROM (VALUES ('last_seq', $11::TEXT), ('last_time_us', $12::TEXT)) v
         WHERE $11::TEXT IS NOT NULL AND (SELECT ok FROM allowed)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value)
     SELECT epoch FROM fence";

/// The statement that writes held appends (`$1`…`$9` as in [`COMMIT_BATCH`]) before a read
/// inside a batch.
const INSERT_HELD: &str = "INSERT INTO messages
         (seq, id, time_us, sender, body, kind, sender_key, attachment, attachment_sha256)
     SELECT * FROM unnest($1::BIGINT[], $2::BYTEA[], $3::BIGINT[], $4::TEXT[],
                          $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::BYTEA[])";

/// The columns of held appends, as the arrays [`COMMIT_BATCH`] and [`INSERT_HELD`] take.
struct HeldColumns<'a> {
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

    /// `$1`…`$9`.
    fn params(&self) -> [&(dyn ToSql + Sync); 9] {
        [
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

/// The batch's id lookup of [`GroupLog::expect_appends`]. Prepared again each time the
/// log has doubled (and grown by 1,000): PostgreSQL caches a generic plan after five
/// executions, and one made while `messages` was small (a sequential scan) stayed in use as
/// the table grew, until an `ANALYZE` replaced it (measured: appends at 100 in flight fell
/// from 9,000/s to 2,000/s between 5,000 and 19,000 messages).
const LOOKUP_IDS: &str = "SELECT id, seq, time_us, sender, body, attachment FROM messages
                          WHERE id = ANY($1)";

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("epoch", &self.epoch)
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl PgStore {
    /// Connects to `target`, creates or migrates `group`'s schema, and reads the log's state.
    /// With `epoch`, every commit is fenced by it (the epoch of a lease this node holds,
    /// [`crate::lease::Lease`]); without, there is no check (one node, no standby).
    ///
    /// # Errors
    /// As [`connect`] and [`prepare_schema`].
    pub fn open(
        target: &PgTarget,
        group: &GroupName,
        epoch: Option<i64>,
    ) -> Result<PgStore, StoreError> {
        let mut client = connect(target, "store")?;
        prepare_schema(&mut client, group)?;
        let level: String = client.query_one("SHOW synchronous_commit", &[])?.get(0);
        if level == "off" || level == "local" {
            tracing::warn!(
                level,
                "raising synchronous_commit to on: acks wait for the commit to be durable"
            );
            client.batch_execute("SET synchronous_commit = on")?;
        }
        let mut store = PgStore {
            client: RefCell::new(client),
            statements: RefCell::new(HashMap::new()),
            epoch,
            last_seq: 0,
            clock: MonotonicClock::after(Timestamp::EPOCH),
            member_count: 0,
            meta_dirty: false,
            aborted: Cell::new(false),
            held: RefCell::new(Vec::new()),
            expected: HashSet::new(),
            stored: HashMap::new(),
            members: RefCell::new(HashMap::new()),
            lookup_prepared_at: 0,
            batch: Cell::new(Batch::Closed),
        };
        store.reload()?;
        Ok(store)
    }

    /// The fencing epoch this store commits under, if any.
    pub fn epoch(&self) -> Option<i64> {
        self.epoch
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
        write: impl FnOnce(&mut PgStore) -> Result<T, StoreError>,
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

    /// Writes the held appends, in one statement, so that what follows sees them.
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
        self.members.get_mut().clear();
    }

    /// Reads the cached high-water marks and counts back from the database.
    fn reload(&mut self) -> Result<(), StoreError> {
        let meta = |key: &'static str| -> Result<i64, StoreError> {
            let row = self.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])?;
            row.map(|r| {
                let v: String = r.get(0);
                v.parse::<i64>()
                    .map_err(|_| StoreError::Corrupt(format!("meta {key}: {v:?}")))
            })
            .transpose()
            .map(|v| v.unwrap_or(0))
        };
        let last_seq_meta = meta("last_seq")?;
        let last_time_meta = meta("last_time_us")?;
        let row = self
            .query_opt(
                "SELECT (SELECT MAX(seq) FROM messages), (SELECT MAX(time_us) FROM messages),
                        (SELECT COUNT(*) FROM members)",
                &[],
            )?
            .ok_or_else(|| StoreError::Corrupt("no row from the state query".into()))?;
        let max_seq: Option<i64> = row.get(0);
        let max_time: Option<i64> = row.get(1);
        let members: i64 = row.get(2);
        self.last_seq = u64::try_from(last_seq_meta.max(max_seq.unwrap_or(0))).unwrap_or(0);
        self.clock = MonotonicClock::after(Timestamp::from_micros(
            last_time_meta.max(max_time.unwrap_or(0)),
        ));
        self.member_count = u64::try_from(members).unwrap_or(0);
        Ok(())
    }

    /// The first stored seq whose time is at or after `time_us` (the BRIN index on time).
    fn first_seq_at(&self, time_us: i64) -> Result<Option<i64>, StoreError> {
        self.write_held()?;
        let row = self.query_opt(
            "SELECT MIN(seq) FROM messages WHERE time_us >= $1",
            &[&time_us],
        )?;
        Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
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
            if messages.len() as u64 >= u64::from(limit)
                || (bytes >= max_bytes && !messages.is_empty())
            {
                more = true;
                break;
            }
            let m = Self::row_to_message(row)?;
            bytes += m.body.get().len();
            messages.push(m);
        }
        Ok(Page { messages, more })
    }

    fn after(&self, after: i64, limit: u32, max_bytes: usize) -> Result<Page, StoreError> {
        self.write_held()?;
        let rows = self.query(
            "SELECT seq, id, time_us, sender, body, kind, sender_key, attachment
             FROM messages WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&after, &(i64::from(limit) + 1)],
        )?;
        Self::to_page(&rows, limit, max_bytes)
    }
}

impl GroupStore for PgStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        if self.batch.get() == Batch::InTransaction {
            // A batch left without commit (an error between begin and commit).
            let _ = self.client.get_mut().batch_execute("ROLLBACK");
        }
        self.aborted.set(false);
        self.held.get_mut().clear();
        self.expected.clear();
        self.stored.clear();
        self.batch.set(Batch::Open);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let in_transaction = self.batch.get() == Batch::InTransaction;
        self.batch.set(Batch::Closed);
        let result = (|| -> Result<(), StoreError> {
            if self.aborted.get() {
                return Err(StoreError::Aborted);
            }
            let held = std::mem::take(self.held.get_mut());
            if in_transaction || !held.is_empty() || self.meta_dirty {
                let marks = self.meta_dirty.then(|| {
                    (
                        (self.last_seq as i64).to_string(),
                        self.clock.last().as_micros().to_string(),
                    )
                });
                let (last_seq, last_time) = marks.unzip();
                let columns = HeldColumns::of(&held);
                let mut params = columns.params().to_vec();
                params.extend([&self.epoch as &(dyn ToSql + Sync), &last_seq, &last_time]);
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
            self.meta_dirty = false;
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
            self.meta_dirty = false;
            self.aborted.set(false);
            self.forget_batch();
            if !matches!(e, StoreError::Fenced { .. }) {
                self.reload()?;
            }
            return Err(e);
        }
        Ok(())
    }

    fn flusher(&self) -> Box<dyn Flush> {
        Box::new(Durable)
    }

    fn stored_bytes(&self) -> u64 {
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
}

impl GroupLog for PgStore {
    fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        if let Some(name) = self.members.borrow().get(who.as_str()) {
            return Ok(Some(name.clone()));
        }
        let row = self.query_opt(
            "SELECT user_name FROM members WHERE principal = $1",
            &[&who.as_str()],
        )?;
        let name = row
            .map(|r| UserName::new(r.get::<_, String>(0)))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if let Some(name) = &name {
            let mut members = self.members.borrow_mut();
            if members.len() >= MEMBER_CACHE {
                members.clear();
            }
            members.insert(who.as_str().to_owned(), name.clone());
        }
        Ok(name)
    }

    fn add_member(
        &mut self,
        who: &Principal,
        user: &UserName,
        at: Timestamp,
    ) -> Result<(UserName, bool), StoreError> {
        self.write(|s| {
            if let Some(bound) = s.member(who)? {
                return Ok((bound, false));
            }
            if s.query_opt(
                "SELECT 1 FROM members WHERE user_name = $1",
                &[&user.as_str()],
            )?
            .is_some()
            {
                return Err(StoreError::LabelTaken(user.clone()));
            }
            s.execute(
                "INSERT INTO members (principal, user_name, joined_at_us) VALUES ($1, $2, $3)",
                &[&who.as_str(), &user.as_str(), &at.as_micros()],
            )?;
            s.member_count += 1;
            Ok((user.clone(), true))
        })
    }

    fn remove_member(&mut self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        self.write(|s| {
            let Some(bound) = s.member(who)? else {
                return Ok(None);
            };
            s.execute("DELETE FROM members WHERE principal = $1", &[&who.as_str()])?;
            s.members.get_mut().remove(who.as_str());
            s.member_count = s.member_count.saturating_sub(1);
            Ok(Some(bound))
        })
    }

    fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError> {
        let row = self.query_opt(
            "SELECT principal FROM members WHERE user_name = $1",
            &[&user.as_str()],
        )?;
        Ok(row.map(|r| Principal::from_stored(r.get(0))))
    }

    fn grant(&mut self, who: &Principal, grant: Grant, at: Timestamp) -> Result<bool, StoreError> {
        self.write(|s| {
            Ok(s.execute(
                "INSERT INTO grants (principal, kind, at_us) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&who.as_str(), &grant.as_str(), &at.as_micros()],
            )? == 1)
        })
    }

    fn revoke(&mut self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.write(|s| {
            Ok(s.execute(
                "DELETE FROM grants WHERE principal = $1 AND kind = $2",
                &[&who.as_str(), &grant.as_str()],
            )? == 1)
        })
    }

    fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        Ok(self
            .query_opt(
                "SELECT 1 FROM grants WHERE principal = $1 AND kind = $2",
                &[&who.as_str(), &grant.as_str()],
            )?
            .is_some())
    }

    fn mode(&self) -> Result<GroupMode, StoreError> {
        let row = self.query_opt("SELECT value FROM meta WHERE key = 'mode'", &[])?;
        Ok(match row.map(|r| r.get::<_, String>(0)).as_deref() {
            Some("private") => GroupMode::Private,
            _ => GroupMode::Open,
        })
    }

    fn set_mode(&mut self, mode: GroupMode) -> Result<bool, StoreError> {
        self.write(|s| {
            if s.mode()? == mode {
                return Ok(false);
            }
            s.execute(
                "INSERT INTO meta (key, value) VALUES ('mode', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&mode.as_str()],
            )?;
            Ok(true)
        })
    }

    fn members(&self) -> Result<Vec<Member>, StoreError> {
        let rows = self.query(
            "SELECT user_name, joined_at_us, principal FROM members ORDER BY user_name COLLATE \"C\"",
            &[],
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

    fn member_count(&self) -> u64 {
        self.member_count
    }

    fn expect_appends(&mut self, ids: &[MessageId]) -> Result<(), StoreError> {
        let ids: Vec<MessageId> = ids
            .iter()
            .filter(|id| !self.expected.contains(id))
            .copied()
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        if self.last_seq >= self.lookup_prepared_at.saturating_mul(2) + 1000 {
            self.statements.get_mut().remove(LOOKUP_IDS);
            self.lookup_prepared_at = self.last_seq;
        }
        self.write(|s| {
            let rows = s.query_alone(
                LOOKUP_IDS,
                &[&ids
                    .iter()
                    .map(|id| id.as_bytes().as_slice())
                    .collect::<Vec<_>>()],
            )?;
            for row in rows {
                let id: [u8; 16] = row
                    .get::<_, Vec<u8>>(0)
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("a message id is not 16 bytes".into()))?;
                s.stored.insert(
                    MessageId::from_bytes(id),
                    Stored {
                        seq: row.get(1),
                        time_us: row.get(2),
                        sender: row.get(3),
                        body: row.get(4),
                        attachment: row.get(5),
                    },
                );
            }
            s.expected.extend(ids);
            Ok(())
        })
    }

    fn append(&mut self, msg: NewMessage<'_>) -> Result<SendAck, StoreError> {
        self.write(|s| {
            let attachment = msg.attachment.map(attachment_json).transpose()?;
            let id = match msg.id {
                Some(id) if !s.expected.contains(&id) => {
                    // Not looked up with the batch: find out now, in order with what is held.
                    s.write_held()?;
                    if let Some(ack) =
                        s.stored_ack(id, msg.sender, msg.body, attachment.as_deref())?
                    {
                        return Ok(ack);
                    }
                    id
                }
                Some(id) => {
                    let earlier = s.stored.get(&id).map(|st| {
                        (
                            st.seq,
                            st.time_us,
                            st.sender == msg.sender.as_str()
                                && st.body == msg.body.get()
                                && st.attachment == attachment,
                        )
                    });
                    let earlier = earlier.or_else(|| {
                        s.held.borrow().iter().find(|h| h.id == id).map(|h| {
                            (
                                h.seq,
                                h.time_us,
                                h.sender == msg.sender.as_str()
                                    && h.body == msg.body.get()
                                    && h.attachment == attachment,
                            )
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
            let seq = s.last_seq + 1;
            let time = s.clock.tick(msg.now);
            s.held.get_mut().push(Held {
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
            s.last_seq = seq;
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
        id: MessageId,
        sender: &UserName,
        body: &RawValue,
        attachment: Option<&str>,
    ) -> Result<Option<SendAck>, StoreError> {
        self.write_held()?;
        let Some(row) = self.query_opt(
            "SELECT seq, time_us, sender, body, attachment FROM messages WHERE id = $1",
            &[&id.as_bytes().as_slice()],
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

    fn references(&self, digest: &Sha256Digest) -> Result<bool, StoreError> {
        self.write_held()?;
        Ok(self
            .query_opt(
                "SELECT 1 FROM messages WHERE attachment_sha256 = $1 LIMIT 1",
                &[&digest.as_bytes().as_slice()],
            )?
            .is_some())
    }

    fn page(&self, query: HistoryQuery, limit: u32, max_bytes: usize) -> Result<Page, StoreError> {
        match query {
            HistoryQuery::AfterSeq(after) => {
                self.after(i64::try_from(after).unwrap_or(i64::MAX), limit, max_bytes)
            }
            HistoryQuery::Since(t) => match self.first_seq_at(t.as_micros())? {
                Some(first) => self.after(first - 1, limit, max_bytes),
                None => Ok(Page {
                    messages: Vec::new(),
                    more: false,
                }),
            },
            HistoryQuery::ById(id) => {
                self.write_held()?;
                let rows = self.query(
                    "SELECT seq, id, time_us, sender, body, kind, sender_key, attachment
                     FROM messages WHERE id = $1",
                    &[&id.as_bytes().as_slice()],
                )?;
                Self::to_page(&rows, 1, usize::MAX)
            }
            HistoryQuery::Latest(n) => {
                // As SQLite's: `latest` is its own bound; `more` only when bytes cut it.
                self.write_held()?;
                let rows = self.query(
                    "SELECT seq, id, time_us, sender, body, kind, sender_key, attachment
                     FROM messages ORDER BY seq DESC LIMIT $1",
                    &[&i64::from(n)],
                )?;
                let mut page = Self::to_page(&rows, n, max_bytes)?;
                page.messages.reverse();
                Ok(page)
            }
        }
    }

    fn last_seq(&self) -> u64 {
        self.last_seq
    }

    fn apply_retention(&mut self, policy: Retention, now: Timestamp) -> Result<u64, StoreError> {
        self.write(|s| {
            s.write_held()?;
            let mut deleted = 0;
            if let Some(max) = policy.max_messages {
                let keep_from = i64::try_from(s.last_seq.saturating_sub(max)).unwrap_or(i64::MAX);
                deleted += s.execute("DELETE FROM messages WHERE seq <= $1", &[&keep_from])?;
            }
            if let Some(age) = policy.max_age {
                let cutoff = now.saturating_sub(age);
                let keep_from = s.first_seq_at(cutoff.as_micros())?.unwrap_or(i64::MAX);
                deleted += s.execute("DELETE FROM messages WHERE seq < $1", &[&keep_from])?;
            }
            if deleted > 0 {
                s.meta_dirty = true;
            }
            Ok(deleted)
        })
    }
}
