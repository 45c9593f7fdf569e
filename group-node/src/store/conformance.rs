//! The behaviour every [`GroupStore`] backend must have, run against each: SQLite in a
//! temporary file, and PostgreSQL in a throwaway cluster ([`agora_tests::pg::PgCluster`]).

use std::time::Duration;

use serde_json::value::RawValue;

use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::{
    EntryKind, GroupMode, GroupName, HistoryQuery, SendAck, UserName, MAX_PAGE_BYTES,
};

use super::postgres::PgTarget;
use super::{
    Grant, GroupLog, GroupStore, NewMessage, Page, PgStore, Principal, Retention, SqliteStore,
    StoreError,
};

/// Where a test's store lives; `open` opens it again (a restart).
trait Backend {
    fn open(&self) -> Box<dyn GroupStore>;
}

struct Sqlite(tempfile::TempDir);

impl Backend for Sqlite {
    fn open(&self) -> Box<dyn GroupStore> {
        Box::new(SqliteStore::open(&self.0.path().join("g.sqlite3"), &group()).expect("open"))
    }
}

struct Postgres {
    url: String,
    _cluster: agora_tests::pg::PgCluster,
}

impl Postgres {
    fn start() -> Postgres {
        let cluster = agora_tests::pg::PgCluster::start();
        Postgres {
            url: cluster.database("agora"),
            _cluster: cluster,
        }
    }
}

impl Backend for Postgres {
    fn open(&self) -> Box<dyn GroupStore> {
        Box::new(PgStore::open(&PgTarget::new(&self.url), &group(), None).expect("open"))
    }
}

/// The group under test is gid 2 of a host (SQLite, or a PostgreSQL host schema) whose
/// gid 1 holds the same user names, client ids and grants, a private mode and a log: every
/// case must see its own group only.
enum Neighbours {
    Sqlite(tempfile::TempDir),
    Pg(Postgres),
}

impl Neighbours {
    /// The host database, opened again (a restart).
    fn open_db(&self) -> super::HostDb {
        match self {
            Neighbours::Sqlite(dir) => super::HostDb::Sqlite(
                super::SqliteHost::open_with(
                    &dir.path().join("host.sqlite3"),
                    super::Durability::Commit,
                )
                .expect("open"),
            ),
            Neighbours::Pg(pg) => super::HostDb::Pg(Box::new(
                super::PgHost::open(&PgTarget::new(&pg.url), host_schema(), None).expect("open"),
            )),
        }
    }
}

/// The schema of the PostgreSQL host under test.
fn host_schema() -> super::PgSchema {
    super::PgSchema::Host("test host".to_owned())
}

/// A [`GroupStore`] over one group of a [`HostDb`] (what a host does per request, here per
/// call; a `RefCell` as reads take `&self` and a view `&mut`).
struct OnHost(std::cell::RefCell<(super::HostDb, super::LogState)>);

impl OnHost {
    fn with<T>(&self, f: impl FnOnce(&mut super::GroupDb<'_>) -> T) -> T {
        let mut inner = self.0.borrow_mut();
        let (db, st) = &mut *inner;
        f(&mut db.group(st))
    }
}

impl GroupLog for OnHost {
    fn member(&self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        self.with(|g| g.member(who))
    }
    fn add_member(
        &mut self,
        who: &Principal,
        user: &UserName,
        at: Timestamp,
    ) -> Result<(UserName, bool), StoreError> {
        self.with(|g| g.add_member(who, user, at))
    }
    fn remove_member(&mut self, who: &Principal) -> Result<Option<UserName>, StoreError> {
        self.with(|g| g.remove_member(who))
    }
    fn member_named(&self, user: &UserName) -> Result<Option<Principal>, StoreError> {
        self.with(|g| g.member_named(user))
    }
    fn grant(&mut self, who: &Principal, grant: Grant, at: Timestamp) -> Result<bool, StoreError> {
        self.with(|g| g.grant(who, grant, at))
    }
    fn revoke(&mut self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.with(|g| g.revoke(who, grant))
    }
    fn has(&self, who: &Principal, grant: Grant) -> Result<bool, StoreError> {
        self.with(|g| g.has(who, grant))
    }
    fn mode(&self) -> Result<GroupMode, StoreError> {
        self.with(|g| g.mode())
    }
    fn set_mode(&mut self, mode: GroupMode) -> Result<bool, StoreError> {
        self.with(|g| g.set_mode(mode))
    }
    fn members(&self) -> Result<Vec<agora_proto::wire::Member>, StoreError> {
        self.with(|g| g.members())
    }
    fn member_count(&self) -> u64 {
        self.with(|g| g.member_count())
    }
    fn expect_appends(&mut self, ids: &[MessageId]) -> Result<(), StoreError> {
        self.with(|g| g.expect_appends(ids))
    }
    fn append(&mut self, msg: NewMessage<'_>) -> Result<SendAck, StoreError> {
        self.with(|g| g.append(msg))
    }
    fn stored_ack(
        &self,
        id: MessageId,
        sender: &UserName,
        body: &RawValue,
        attachment: Option<&str>,
    ) -> Result<Option<SendAck>, StoreError> {
        self.with(|g| g.stored_ack(id, sender, body, attachment))
    }
    fn references(&self, digest: &agora_proto::wire::Sha256Digest) -> Result<bool, StoreError> {
        self.with(|g| g.references(digest))
    }
    fn page(&self, query: HistoryQuery, limit: u32, max_bytes: usize) -> Result<Page, StoreError> {
        self.with(|g| g.page(query, limit, max_bytes))
    }
    fn last_seq(&self) -> u64 {
        self.with(|g| g.last_seq())
    }
    fn apply_retention(&mut self, policy: Retention, now: Timestamp) -> Result<u64, StoreError> {
        self.with(|g| g.apply_retention(policy, now))
    }
}

impl GroupStore for OnHost {
    fn begin(&mut self) -> Result<(), StoreError> {
        self.0.get_mut().0.begin()
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        let (db, st) = self.0.get_mut();
        let result = db.commit();
        if result.is_err() {
            db.reload(st)?;
        }
        result
    }
    fn flusher(&self) -> Box<dyn super::Flush> {
        self.0.borrow().0.flusher()
    }
    fn stored_bytes(&self) -> u64 {
        self.0.borrow().0.stored_bytes()
    }
}

impl Backend for Neighbours {
    fn open(&self) -> Box<dyn GroupStore> {
        use super::{GroupState, NewGroup};
        let mut db = self.open_db();
        let live = db.live_groups().expect("live");
        let gid = match live.iter().find(|g| g.name == group()) {
            Some(g) => g.gid,
            None => {
                let noise = GroupName::new("neighbour").expect("name");
                let new = |name| NewGroup {
                    name,
                    owner: None,
                    created_by: None,
                    mode: GroupMode::Open,
                    state: GroupState::Live,
                    at: Timestamp::from_micros(1),
                };
                db.begin().expect("begin");
                let n = db.insert_group(new(&noise)).expect("neighbour");
                let gid = db.insert_group(new(&group())).expect("group");
                let mut st = db.load(n).expect("load");
                let mut g = db.group(&mut st);
                let at = Timestamp::from_micros(1);
                for name in ["alice", "bob", "robert"] {
                    let who = Principal::name(&user(name));
                    g.add_member(&who, &user(name), at).expect("member");
                    g.grant(&who, Grant::Invite, at).expect("grant");
                    g.grant(&who, Grant::Admin, at).expect("grant");
                }
                g.set_mode(GroupMode::Private).expect("mode");
                for t in 1..=20 {
                    let b = body("\"neighbour\"");
                    let alice = user("alice");
                    g.append(NewMessage {
                        sender: &alice,
                        kind: EntryKind::Message,
                        sender_key: None,
                        body: &b,
                        id: None,
                        now: Timestamp::from_micros(t * 100),
                        attachment: None,
                    })
                    .expect("append");
                }
                db.commit().expect("commit");
                gid
            }
        };
        let st = db.load(gid).expect("load");
        Box::new(OnHost(std::cell::RefCell::new((db, st))))
    }
}

/// One `#[test]` per backend for each conformance test.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(&super::Sqlite(tempfile::tempdir().expect("tmp")));
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                super::$name(&super::Postgres::start());
            })*
        }
        mod sqlite_host {
            $(#[test]
            fn $name() {
                super::$name(&super::Neighbours::Sqlite(tempfile::tempdir().expect("tmp")));
            })*
        }
        mod pg_host {
            $(#[test]
            fn $name() {
                super::$name(&super::Neighbours::Pg(super::Postgres::start()));
            })*
        }
    };
}

conformance!(
    seq_is_gap_free_and_survives_reopen_and_retention,
    max_age_deletes_old_messages_only,
    retried_client_id_is_stored_once_and_conflicts_are_refused,
    expected_ids_answer_retries_and_the_batch_reads_its_own_appends,
    pages_by_seq_time_id_and_latest,
    membership_is_by_principal_with_one_name_each,
    grants_and_mode_persist,
);

pub(super) fn group() -> GroupName {
    GroupName::new("Cool Group").expect("name")
}

pub(super) fn user(n: &str) -> UserName {
    UserName::new(n).expect("name")
}

pub(super) fn body(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_owned()).expect("json")
}

/// A chat message from `sender` with the client id `id`, now.
fn with_id<'a>(sender: &'a UserName, body: &'a RawValue, id: MessageId) -> NewMessage<'a> {
    NewMessage {
        sender,
        kind: EntryKind::Message,
        sender_key: None,
        body,
        id: Some(id),
        attachment: None,
        now: Timestamp::now(),
    }
}

pub(super) fn append(store: &mut dyn GroupStore, text: &str, now: i64) -> SendAck {
    let alice = user("alice");
    let b = body(text);
    store.begin().expect("begin");
    let ack = store
        .append(NewMessage {
            sender: &alice,
            kind: EntryKind::Message,
            sender_key: None,
            body: &b,
            id: None,
            now: Timestamp::from_micros(now),
            attachment: None,
        })
        .expect("append");
    store.commit().expect("commit");
    ack
}

fn seq_is_gap_free_and_survives_reopen_and_retention(backend: &dyn Backend) {
    {
        let mut s = backend.open();
        for i in 1..=5 {
            assert_eq!(append(s.as_mut(), &format!("{i}"), 1000).seq, i);
        }
        s.begin().expect("begin");
        let deleted = s
            .apply_retention(
                Retention {
                    max_messages: Some(2),
                    max_age: None,
                },
                Timestamp::from_micros(0),
            )
            .expect("retention");
        s.commit().expect("commit");
        assert_eq!(deleted, 3);
    }
    let mut s = backend.open();
    assert_eq!(s.last_seq(), 5);
    let ack = append(s.as_mut(), "6", 0);
    assert_eq!(ack.seq, 6);
    // The clock stepped back to 0; time still increases.
    assert!(ack.time.as_micros() > 1000);
    let page = s
        .page(HistoryQuery::AfterSeq(0), 100, MAX_PAGE_BYTES)
        .expect("page");
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![4, 5, 6]);
}

fn max_age_deletes_old_messages_only(backend: &dyn Backend) {
    let mut s = backend.open();
    for t in [1_000_000, 2_000_000, 9_000_000] {
        append(s.as_mut(), "1", t);
    }
    s.begin().expect("begin");
    let policy = Retention {
        max_messages: None,
        max_age: Some(Duration::from_secs(5)),
    };
    let deleted = s
        .apply_retention(policy, Timestamp::from_micros(10_000_000))
        .expect("retention");
    s.commit().expect("commit");
    assert_eq!(deleted, 2);
    let page = s
        .page(HistoryQuery::AfterSeq(0), 10, MAX_PAGE_BYTES)
        .expect("page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3]
    );
}

fn retried_client_id_is_stored_once_and_conflicts_are_refused(backend: &dyn Backend) {
    let mut s = backend.open();
    let (alice, bob) = (user("alice"), user("bob"));
    let id = MessageId::new_v7();
    let b = body(r#"{"k":1}"#);
    let msg = |sender, b| with_id(sender, b, id);
    s.begin().expect("begin");
    let first = s.append(msg(&alice, &b)).expect("first");
    let again = s.append(msg(&alice, &b)).expect("retry");
    assert_eq!(
        (again.seq, again.id, again.time),
        (first.seq, first.id, first.time)
    );
    assert!(again.duplicate && !first.duplicate);
    assert!(matches!(
        s.append(msg(&bob, &b)),
        Err(StoreError::IdConflict(i)) if i == id
    ));
    let other = body("2");
    assert!(matches!(
        s.append(msg(&alice, &other)),
        Err(StoreError::IdConflict(_))
    ));
    s.commit().expect("commit");
    assert_eq!(s.last_seq(), 1);
}

fn expected_ids_answer_retries_and_the_batch_reads_its_own_appends(backend: &dyn Backend) {
    let mut s = backend.open();
    let (alice, bob) = (user("alice"), user("bob"));
    let ids: Vec<MessageId> = (0..4).map(|_| MessageId::new_v7()).collect();
    let (one, two) = (body("1"), body("2"));
    let msg = with_id;
    let seqs = |p: Page| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    s.begin().expect("begin");
    s.expect_appends(&ids[..2]).expect("expect");
    let a = s.append(msg(&alice, &one, ids[0])).expect("a");
    let b = s.append(msg(&alice, &one, ids[1])).expect("b");
    assert_eq!((a.seq, b.seq), (1, 2));
    // A retry in the same batch gets the first ack; another sender or body is refused.
    let again = s.append(msg(&alice, &one, ids[0])).expect("again");
    assert!(again.duplicate);
    assert_eq!((again.seq, again.time), (a.seq, a.time));
    assert!(matches!(
        s.append(msg(&bob, &one, ids[0])),
        Err(StoreError::IdConflict(i)) if i == ids[0]
    ));
    // An event (no client id) and an unexpected id go in order with the rest.
    let null = body("null");
    let event = s
        .append(NewMessage {
            id: None,
            kind: EntryKind::Join,
            ..msg(&bob, &null, ids[0])
        })
        .expect("event");
    let unexpected = s.append(msg(&alice, &two, ids[2])).expect("unexpected");
    assert_eq!((event.seq, unexpected.seq), (3, 4));
    // Reads in the batch see its appends.
    let p = s
        .page(HistoryQuery::AfterSeq(0), 100, MAX_PAGE_BYTES)
        .expect("page");
    assert_eq!(seqs(p), vec![1, 2, 3, 4]);
    let c = s.append(msg(&alice, &two, ids[3])).expect("c");
    assert_eq!(c.seq, 5);
    s.commit().expect("commit");

    // The next batch: expected retries of stored messages get their acks, once.
    s.begin().expect("begin");
    s.expect_appends(&[ids[1], ids[3], ids[1]]).expect("expect");
    let b_again = s.append(msg(&alice, &one, ids[1])).expect("b again");
    assert!(b_again.duplicate);
    assert_eq!((b_again.seq, b_again.time), (b.seq, b.time));
    assert!(matches!(
        s.append(msg(&alice, &one, ids[3])),
        Err(StoreError::IdConflict(_))
    ));
    s.commit().expect("commit");
    drop(s);
    let s = backend.open();
    assert_eq!(s.last_seq(), 5);
    let p = s
        .page(HistoryQuery::AfterSeq(0), 100, MAX_PAGE_BYTES)
        .expect("page");
    let stored: Vec<(u64, MessageId)> = p.messages.iter().map(|m| (m.seq, m.id)).collect();
    assert_eq!(
        stored,
        vec![
            (1, ids[0]),
            (2, ids[1]),
            (3, event.id),
            (4, ids[2]),
            (5, ids[3])
        ]
    );
}

/// PostgreSQL: a batch fenced at commit (another node took the lease) stores none of the
/// appends it held, and the store's state is the database's again; both for a batch of
/// sends alone (its commit one statement) and for one whose transaction a join opened.
#[test]
fn a_fenced_batch_stores_nothing() {
    let pg = Postgres::start();
    let mut other = ::postgres::Client::connect(&pg.url, ::postgres::NoTls).expect("connect");
    let mut take_lease = || {
        other
            .batch_execute(&format!(
                "UPDATE {}.lease SET epoch = epoch + 1",
                super::postgres::schema_name(&group())
            ))
            .expect("take the lease");
    };
    let alice = user("alice");
    let lost = body("2");
    for (epoch, join) in [(0, false), (1, true)] {
        let mut s = PgStore::open(&PgTarget::new(&pg.url), &group(), Some(epoch)).expect("open");
        if epoch == 0 {
            append(&mut s, "1", 100);
        }
        s.begin().expect("begin");
        let bob = Principal::name(&user("bob"));
        if join {
            s.add_member(&bob, &user("bob"), Timestamp::from_micros(150))
                .expect("join");
        }
        let id = MessageId::new_v7();
        s.expect_appends(&[id]).expect("expect");
        let ack = s.append(with_id(&alice, &lost, id)).expect("append");
        assert_eq!(ack.seq, 2);
        take_lease();
        assert!(
            matches!(
                s.commit(),
                Err(StoreError::Fenced { held, current }) if held == epoch && current == epoch + 1
            ),
            "join {join}"
        );
        let s = pg.open();
        assert_eq!(s.last_seq(), 1);
        let p = s
            .page(HistoryQuery::ById(id), 1, MAX_PAGE_BYTES)
            .expect("page");
        assert!(p.messages.is_empty(), "the fenced append is not stored");
        assert_eq!(s.member(&bob).expect("member"), None, "the fenced join");
    }
}

/// PostgreSQL host: one batch appending to two groups and making a third, fenced at commit
/// (another host took the host's one lease), stores nothing of any of them, and each
/// group's state reloads to what is stored.
#[test]
fn a_fenced_batch_of_two_groups_stores_nothing_of_either() {
    use super::{GroupId, GroupState, HostDb, NewGroup, PgHost};
    let pg = Postgres::start();
    let open = |epoch| {
        HostDb::Pg(Box::new(
            PgHost::open(&PgTarget::new(&pg.url), host_schema(), epoch).expect("open"),
        ))
    };
    let names: Vec<GroupName> = ["red", "blue", "green"]
        .iter()
        .map(|n| GroupName::new(*n).expect("name"))
        .collect();
    let new = |name| NewGroup {
        name,
        owner: None,
        created_by: None,
        mode: GroupMode::Open,
        state: GroupState::Live,
        at: Timestamp::from_micros(1),
    };
    let mut db = open(None);
    db.begin().expect("begin");
    let (r, b) = (
        db.insert_group(new(&names[0])).expect("red"),
        db.insert_group(new(&names[1])).expect("blue"),
    );
    db.commit().expect("commit");
    let alice = user("alice");
    let one = body("1");
    let (mut rs, mut bs) = (db.load(r).expect("red"), db.load(b).expect("blue"));
    db.begin().expect("begin");
    for st in [&mut rs, &mut bs] {
        db.group(st)
            .append(at(&alice, &one, MessageId::new_v7(), 100))
            .expect("append");
    }
    db.commit().expect("commit");
    drop(db);

    let mut db = open(Some(0));
    let (mut rs, mut bs) = (db.load(r).expect("red"), db.load(b).expect("blue"));
    db.begin().expect("begin");
    let lost = body("2");
    for st in [&mut rs, &mut bs] {
        let ack = db
            .group(st)
            .append(at(&alice, &lost, MessageId::new_v7(), 200))
            .expect("append");
        assert_eq!(ack.seq, 2);
    }
    db.insert_group(new(&names[2])).expect("green");
    let mut other = ::postgres::Client::connect(&pg.url, ::postgres::NoTls).expect("connect");
    other
        .batch_execute(&format!(
            "UPDATE {}.lease SET epoch = epoch + 1",
            host_schema().name()
        ))
        .expect("take the lease");
    assert!(matches!(
        db.commit(),
        Err(StoreError::Fenced {
            held: 0,
            current: 1
        })
    ));
    for st in [&mut rs, &mut bs] {
        db.reload(st).expect("reload");
        assert_eq!(st.last_seq(), 1, "group {}", st.gid());
        let page = db
            .group(st)
            .page(HistoryQuery::AfterSeq(0), 10, MAX_PAGE_BYTES)
            .expect("page");
        assert_eq!(
            page.messages.len(),
            1,
            "the fenced append of group {}",
            st.gid()
        );
    }
    assert_eq!(
        db.find_group(&names[2]).expect("find"),
        None,
        "the fenced group"
    );
    assert_eq!(
        db.live_groups()
            .expect("live")
            .iter()
            .map(|g| g.gid)
            .collect::<Vec<_>>(),
        vec![r, b]
    );
    assert_eq!((r, b), (GroupId(1), GroupId(2)));
}

fn pages_by_seq_time_id_and_latest(backend: &dyn Backend) {
    let mut s = backend.open();
    let acks: Vec<SendAck> = (1..=10).map(|i| append(s.as_mut(), "1", i * 100)).collect();
    let seqs = |p: Page| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();

    let p = s
        .page(HistoryQuery::AfterSeq(0), 4, MAX_PAGE_BYTES)
        .expect("p");
    assert!(p.more);
    assert_eq!(seqs(p), vec![1, 2, 3, 4]);
    let p = s
        .page(HistoryQuery::AfterSeq(8), 4, MAX_PAGE_BYTES)
        .expect("p");
    assert!(!p.more);
    assert_eq!(seqs(p), vec![9, 10]);

    let p = s
        .page(
            HistoryQuery::Since(Timestamp::from_micros(750)),
            100,
            MAX_PAGE_BYTES,
        )
        .expect("p");
    assert_eq!(seqs(p), vec![8, 9, 10]);
    let p = s
        .page(
            HistoryQuery::Since(Timestamp::from_micros(5000)),
            100,
            MAX_PAGE_BYTES,
        )
        .expect("p");
    assert_eq!(seqs(p), Vec::<u64>::new());

    let p = s
        .page(HistoryQuery::ById(acks[4].id), 100, MAX_PAGE_BYTES)
        .expect("p");
    assert_eq!(seqs(p), vec![5]);
    let p = s
        .page(HistoryQuery::ById(MessageId::new_v7()), 100, MAX_PAGE_BYTES)
        .expect("p");
    assert!(p.messages.is_empty());

    let p = s
        .page(HistoryQuery::Latest(3), 100, MAX_PAGE_BYTES)
        .expect("p");
    assert_eq!(seqs(p), vec![8, 9, 10]);

    // The byte cap ends a page early but always returns one message.
    let p = s.page(HistoryQuery::AfterSeq(0), 100, 1).expect("p");
    assert!(p.more);
    assert_eq!(seqs(p), vec![1]);
}

fn membership_is_by_principal_with_one_name_each(backend: &dyn Backend) {
    let mut s = backend.open();
    let bob_key = agora_common::keys::Keypair::generate()
        .expect("keys")
        .public;
    let bob = Principal::key(&bob_key);
    let mallory = Principal::key(
        &agora_common::keys::Keypair::generate()
            .expect("keys")
            .public,
    );
    let alice = Principal::name(&user("alice"));
    let now = Timestamp::now();
    s.begin().expect("begin");
    assert_eq!(
        s.add_member(&bob, &user("bob"), now).expect("add"),
        (user("bob"), true)
    );
    // A repeated join keeps the name the member joined with.
    assert_eq!(
        s.add_member(&bob, &user("robert"), now).expect("add"),
        (user("bob"), false)
    );
    // Another key cannot take bob's name.
    assert!(matches!(
        s.add_member(&mallory, &user("bob"), now),
        Err(StoreError::LabelTaken(n)) if n == user("bob")
    ));
    assert_eq!(
        s.add_member(&alice, &user("alice"), now).expect("add"),
        (user("alice"), true)
    );
    assert_eq!(s.remove_member(&alice).expect("rm"), Some(user("alice")));
    assert_eq!(s.remove_member(&alice).expect("rm"), None);
    s.commit().expect("commit");
    drop(s);
    let s = backend.open();
    assert_eq!(s.member_count(), 1);
    assert_eq!(s.member(&bob).expect("q"), Some(user("bob")));
    assert_eq!(s.member(&mallory).expect("q"), None);
    let members = s.members().expect("list");
    assert_eq!(
        (members[0].user.clone(), members[0].key),
        (user("bob"), Some(bob_key))
    );
}

fn grants_and_mode_persist(backend: &dyn Backend) {
    let bob = Principal::name(&user("bob"));
    {
        let mut s = backend.open();
        s.begin().expect("begin");
        assert_eq!(s.mode().expect("mode"), GroupMode::Open);
        assert!(s.set_mode(GroupMode::Private).expect("set"));
        assert!(!s.set_mode(GroupMode::Private).expect("set again"));
        assert!(s.grant(&bob, Grant::Ban, Timestamp::now()).expect("grant"));
        assert!(!s.grant(&bob, Grant::Ban, Timestamp::now()).expect("again"));
        assert!(s
            .grant(&bob, Grant::Invite, Timestamp::now())
            .expect("grant"));
        assert!(s.revoke(&bob, Grant::Invite).expect("revoke"));
        s.commit().expect("commit");
    }
    let s = backend.open();
    assert_eq!(s.mode().expect("mode"), GroupMode::Private);
    assert!(s.has(&bob, Grant::Ban).expect("has"));
    assert!(!s.has(&bob, Grant::Invite).expect("has"));
    assert!(!s.has(&bob, Grant::Admin).expect("has"));
}

/// A chat message from `sender` with the client id `id` at `now` µs.
fn at<'a>(sender: &'a UserName, body: &'a RawValue, id: MessageId, now: i64) -> NewMessage<'a> {
    NewMessage {
        now: Timestamp::from_micros(now),
        ..with_id(sender, body, id)
    }
}

/// Two groups of one host (SQLite; a PostgreSQL host schema) written in one batch,
/// interleaved, with the same client ids, the same member (same principal, same user name)
/// and the same kind of grants: each group's seqs start at 1, its pages, retention, history
/// by time, members, grants and mode are its own, before and after a reopen.
#[test]
fn two_groups_interleaved_in_one_batch_stay_apart() {
    two_groups_interleaved(&Neighbours::Sqlite(tempfile::tempdir().expect("tmp")));
}

/// [`two_groups_interleaved_in_one_batch_stay_apart`] on a PostgreSQL host schema: the
/// held appends of both groups go in one `COMMIT_BATCH`, and retention's high-water marks
/// are red's only.
#[test]
fn two_groups_interleaved_in_one_batch_stay_apart_on_postgres() {
    two_groups_interleaved(&Neighbours::Pg(Postgres::start()));
}

fn two_groups_interleaved(host: &Neighbours) {
    use super::{GroupId, GroupState, HostDb, NewGroup};
    let open = || host.open_db();
    let mut db = open();
    let (red, blue) = (
        GroupName::new("red").expect("name"),
        GroupName::new("blue").expect("name"),
    );
    db.begin().expect("begin");
    let new = |name| NewGroup {
        name,
        owner: None,
        created_by: None,
        mode: GroupMode::Open,
        state: GroupState::Live,
        at: Timestamp::from_micros(1),
    };
    let (r, b) = (
        db.insert_group(new(&red)).expect("red"),
        db.insert_group(new(&blue)).expect("blue"),
    );
    assert_eq!((r, b), (GroupId(1), GroupId(2)));
    assert!(matches!(
        db.insert_group(new(&red)),
        Err(StoreError::NameTaken(_))
    ));
    db.commit().expect("commit");
    let (mut rs, mut bs) = (db.load(r).expect("load"), db.load(b).expect("load"));

    let alice = user("alice");
    let key = Principal::name(&alice);
    let ids: Vec<MessageId> = (0..6).map(|_| MessageId::new_v7()).collect();
    let (rb, bb) = (body(r#""red""#), body(r#""blue""#));
    db.begin().expect("begin");
    for st in [&mut rs, &mut bs] {
        let mut g = db.group(st);
        assert_eq!(
            g.add_member(&key, &alice, Timestamp::from_micros(5))
                .expect("join"),
            (alice.clone(), true)
        );
    }
    db.group(&mut bs)
        .grant(&key, Grant::Admin, Timestamp::from_micros(5))
        .expect("grant");
    db.group(&mut rs)
        .set_mode(GroupMode::Private)
        .expect("mode");
    // Red at 100, 200, …; blue at 150, 250, …; the same ids in both.
    for (n, id) in ids.iter().enumerate() {
        let t = 100 * (n as i64 + 1);
        let ra = db
            .group(&mut rs)
            .append(at(&alice, &rb, *id, t))
            .expect("red");
        let ba = db
            .group(&mut bs)
            .append(at(&alice, &bb, *id, t + 50))
            .expect("blue");
        assert_eq!((ra.seq, ba.seq), (n as u64 + 1, n as u64 + 1));
        assert!(!ra.duplicate && !ba.duplicate, "an id is per group");
    }
    let deleted = db
        .group(&mut rs)
        .apply_retention(
            Retention {
                max_messages: Some(2),
                max_age: None,
            },
            Timestamp::from_micros(0),
        )
        .expect("retention");
    assert_eq!(deleted, 4);
    db.commit().expect("commit");

    let check = |db: &mut HostDb, rs: &mut super::LogState, bs: &mut super::LogState| {
        let seqs = |p: Page| {
            p.messages
                .iter()
                .map(|m| (m.seq, m.body.get().to_owned()))
                .collect::<Vec<_>>()
        };
        let red_page = seqs(
            db.group(rs)
                .page(HistoryQuery::AfterSeq(0), 100, MAX_PAGE_BYTES)
                .expect("page"),
        );
        assert_eq!(
            red_page,
            vec![(5, r#""red""#.to_owned()), (6, r#""red""#.to_owned())]
        );
        let blue_page = seqs(
            db.group(bs)
                .page(HistoryQuery::AfterSeq(0), 100, MAX_PAGE_BYTES)
                .expect("page"),
        );
        assert_eq!(blue_page.len(), 6, "retention of red kept blue whole");
        assert!(blue_page.iter().all(|(_, b)| b == r#""blue""#));
        // History by time: blue's entries at 350 and later (150, 250, 350, …) are seqs
        // 3..6; red's (100, 200, …) from 350 are 4..6, and retention deleted its 4.
        let since = |db: &mut HostDb, st: &mut super::LogState| {
            seqs(
                db.group(st)
                    .page(
                        HistoryQuery::Since(Timestamp::from_micros(350)),
                        100,
                        MAX_PAGE_BYTES,
                    )
                    .expect("since"),
            )
            .into_iter()
            .map(|(s, _)| s)
            .collect::<Vec<_>>()
        };
        assert_eq!(since(db, bs), vec![3, 4, 5, 6]);
        assert_eq!(since(db, rs), vec![5, 6]);
        let latest = seqs(
            db.group(bs)
                .page(HistoryQuery::Latest(2), 100, MAX_PAGE_BYTES)
                .expect("latest"),
        );
        assert_eq!(
            latest.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![5, 6]
        );
        // The same id names each group's own message.
        let by_id = |db: &mut HostDb, st: &mut super::LogState| {
            seqs(
                db.group(st)
                    .page(HistoryQuery::ById(ids[5]), 1, MAX_PAGE_BYTES)
                    .expect("by id"),
            )
        };
        assert_eq!(by_id(db, rs), vec![(6, r#""red""#.to_owned())]);
        assert_eq!(by_id(db, bs), vec![(6, r#""blue""#.to_owned())]);
        assert!(db
            .group(rs)
            .page(HistoryQuery::ById(ids[0]), 1, MAX_PAGE_BYTES)
            .expect("by id")
            .messages
            .is_empty());
        assert_eq!(
            db.group(bs)
                .stored_ack(ids[0], &alice, &bb, None)
                .expect("ack")
                .map(|a| a.seq),
            Some(1)
        );
        assert!(matches!(
            db.group(bs).stored_ack(ids[5], &alice, &rb, None),
            Err(StoreError::IdConflict(_))
        ));
        assert_eq!(db.group(rs).mode().expect("mode"), GroupMode::Private);
        assert_eq!(db.group(bs).mode().expect("mode"), GroupMode::Open);
        assert!(db.group(bs).has(&key, Grant::Admin).expect("has"));
        assert!(!db.group(rs).has(&key, Grant::Admin).expect("has"));
        for st in [&mut *rs, &mut *bs] {
            let g = db.group(st);
            assert_eq!(g.member_count(), 1);
            assert_eq!(g.last_seq(), 6);
            assert_eq!(g.member_named(&alice).expect("named"), Some(key.clone()));
        }
    };
    check(&mut db, &mut rs, &mut bs);

    // Leaving red leaves blue's membership alone; both survive a reopen.
    db.begin().expect("begin");
    assert_eq!(
        db.group(&mut rs).remove_member(&key).expect("leave"),
        Some(alice.clone())
    );
    db.commit().expect("commit");
    db.begin().expect("begin");
    db.group(&mut rs)
        .add_member(&key, &alice, Timestamp::from_micros(9))
        .expect("again");
    db.commit().expect("commit");
    drop(db);
    let mut db = open();
    let mut rs = db.load(r).expect("red");
    let mut bs = db.load(b).expect("blue");
    check(&mut db, &mut rs, &mut bs);
    let live: Vec<(GroupId, String, u64)> = db
        .live_groups()
        .expect("live")
        .into_iter()
        .map(|g| (g.gid, g.name.to_string(), g.members))
        .collect();
    assert_eq!(
        live,
        vec![(r, "red".to_owned(), 1), (b, "blue".to_owned(), 1)]
    );
}
