//! The store's behaviour, run against both backends: each test runs once on SQLite (in a
//! temporary data directory) and once on PostgreSQL (a throwaway cluster,
//! [`agora_tests::pg::PgCluster`]). Tests of several registries sharing one database are
//! PostgreSQL only.

use std::time::{Duration, Instant};

use agora_common::keys::PublicKey;
use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::{Endpoint, ErrorCode, GroupName, Presence, UserEntry, UserName};
use agora_tests::pg::PgCluster;
use serde_json::value::RawValue;

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{GroupRegistration, RegistryStore, StoreError, StoreSettings};
use crate::mailbox::{copy_id, Copy, MailboxError, MAX_DEAD_LETTERS};

/// A store and what it lives in (removed on drop, the cluster stopped).
struct Backend {
    store: Box<dyn RegistryStore>,
    dir: tempfile::TempDir,
    url: Option<String>,
    _pg: Option<PgCluster>,
}

impl Backend {
    fn sqlite(settings: StoreSettings) -> Backend {
        let dir = tempfile::tempdir().expect("tmp");
        let store = SqliteStore::open(dir.path(), settings, true).expect("sqlite");
        Backend {
            store: Box::new(store),
            dir,
            url: None,
            _pg: None,
        }
    }

    fn postgres(settings: StoreSettings) -> Backend {
        let pg = PgCluster::start();
        let url = pg.database("agora");
        let store = PgStore::connect(&url, &Default::default(), settings).expect("postgres");
        Backend {
            store: Box::new(store),
            dir: tempfile::tempdir().expect("tmp"),
            url: Some(url),
            _pg: Some(pg),
        }
    }

    /// Another registry's store over the same database.
    fn another(&self, settings: StoreSettings) -> PgStore {
        PgStore::connect(
            self.url.as_deref().expect("postgres"),
            &Default::default(),
            settings,
        )
        .expect("connect")
    }
}

fn settings() -> StoreSettings {
    StoreSettings {
        group_ttl: Duration::from_secs(60),
        max_groups: 10,
        presence_ttl: Duration::from_secs(60),
        max_users: 100,
        max_names_per_key: 100,
        name_lapse: Duration::from_secs(3600),
        dm_share: u64::MAX,
    }
}

/// Runs `test` on SQLite, then on PostgreSQL, each with `settings`.
fn on_both(settings: StoreSettings, test: impl Fn(&mut dyn RegistryStore)) {
    for backend in [Backend::sqlite, Backend::postgres] {
        let mut b = backend(settings);
        let name = b.store.backend();
        eprintln!("on {name}");
        test(b.store.as_mut());
    }
}

fn now() -> Timestamp {
    Timestamp::now()
}
fn name(s: &str) -> GroupName {
    GroupName::new(s).expect("name")
}
fn ep(port: u16) -> Endpoint {
    Endpoint::new(format!("tcp://127.0.0.1:{port}")).expect("endpoint")
}
fn key(b: u8) -> PublicKey {
    PublicKey::from_bytes([b; 32])
}
fn user(s: &str) -> UserName {
    UserName::new(s).expect("user name")
}
fn body(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.into()).expect("json")
}
fn group(n: &str, port: u16, members: u64) -> GroupRegistration {
    GroupRegistration {
        name: name(n),
        endpoint: ep(port),
        members,
        public_key: None,
        host: false,
    }
}
fn account(n: &str, k: u8) -> UserEntry {
    UserEntry {
        name: user(n),
        key: key(k),
        registered_at: Timestamp::from_micros(1_000_000),
        presence: Presence::Offline,
        last_seen: None,
    }
}
fn refused<T: std::fmt::Debug>(r: super::Refusable<T>) -> ErrorCode {
    r.expect("store").expect_err("refused").code
}
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_directory_refreshes_refuses_takeover_moves_for_the_owner_and_is_bounded() {
    let small = StoreSettings {
        max_groups: 2,
        ..settings()
    };
    on_both(small, |s| {
        let first = s
            .register_group(group("Cool Group", 1, 0), false, now())
            .expect("store")
            .expect("first");
        let again = s
            .register_group(group("Cool Group", 1, 3), false, now())
            .expect("store")
            .expect("refresh");
        assert_eq!(again.registered_at, first.registered_at);
        assert!(again.last_heartbeat >= first.last_heartbeat);
        assert_eq!(again.members, 3);
        let taken = s.register_group(group("Cool Group", 2, 0), false, now());
        assert_eq!(refused(taken), ErrorCode::NameTaken);
        // Its owner moves it (a node restarted on another port).
        let moved = s
            .register_group(group("Cool Group", 2, 0), true, now())
            .expect("store")
            .expect("moved");
        assert_eq!(moved.endpoint, ep(2));
        // One endpoint is one node: a new name there replaces the old one.
        s.register_group(group("Renamed", 2, 0), false, now())
            .expect("store")
            .expect("renamed");
        let names: Vec<_> = s
            .list_groups(now())
            .expect("list")
            .into_iter()
            .map(|g| g.name)
            .collect();
        assert_eq!(names, vec![name("Renamed")]);
        s.register_group(group("b", 3, 0), false, now())
            .expect("store")
            .expect("b");
        let full = s.register_group(group("c", 4, 0), false, now());
        assert_eq!(refused(full), ErrorCode::LimitReached);
        assert_eq!(
            refused(s.unregister_group(&name("b"), &ep(9), now())),
            ErrorCode::NameTaken
        );
        assert_eq!(
            refused(s.unregister_group(&name("x"), &ep(3), now())),
            ErrorCode::UnknownGroup
        );
        s.unregister_group(&name("b"), &ep(3), now())
            .expect("store")
            .expect("unregister");
        assert!(s.lookup_group(&name("b"), now()).expect("lookup").is_none());
        assert!(s
            .lookup_group(&name("Renamed"), now())
            .expect("lookup")
            .is_some());
    });
}

#[test]
fn directory_entries_expire_after_the_ttl_and_the_name_is_free_again() {
    let short = StoreSettings {
        group_ttl: Duration::from_millis(300),
        ..settings()
    };
    on_both(short, |s| {
        s.register_group(group("g", 1, 0), false, now())
            .expect("store")
            .expect("g");
        assert!(s.lookup_group(&name("g"), now()).expect("lookup").is_some());
        wait_for("expiry", || {
            s.lookup_group(&name("g"), now()).expect("lookup").is_none()
        });
        assert!(s.list_groups(now()).expect("list").is_empty());
        assert_eq!(
            refused(s.unregister_group(&name("g"), &ep(1), now())),
            ErrorCode::UnknownGroup
        );
        // Another endpoint may take the name now, as a new entry.
        s.register_group(group("g", 2, 0), false, now())
            .expect("store")
            .expect("taken over after the TTL");
        wait_for("expiry", || {
            s.lookup_group(&name("g"), now()).expect("lookup").is_none()
        });
        assert_eq!(s.expire_groups(now()).expect("expire"), vec![name("g")]);
    });
}

#[test]
fn group_names_are_claimed_once_and_released_by_the_operator() {
    on_both(settings(), |s| {
        let g = name("Cool Group");
        assert_eq!(s.group_owner(&g).expect("owner"), None);
        assert_eq!(
            s.claim_group(&g, &key(1), now()).expect("claim"),
            Ok((key(1), true))
        );
        assert_eq!(
            s.claim_group(&g, &key(2), now()).expect("claim"),
            Ok((key(1), false))
        );
        assert_eq!(s.group_owner(&g).expect("owner"), Some(key(1)));
        assert!(s.release_group(&g).expect("release"));
        assert!(!s.release_group(&g).expect("release again"));
        assert_eq!(
            s.claim_group(&g, &key(2), now()).expect("claim"),
            Ok((key(2), true))
        );
    });
}

#[test]
fn accounts_are_unique_by_name_and_key_and_carry_presence() {
    on_both(settings(), |s| {
        assert!(s.insert_user(&account("bob", 2)).expect("bob"));
        assert!(s.insert_user(&account("alice", 1)).expect("alice"));
        assert!(!s.insert_user(&account("alice", 3)).expect("name taken"));
        assert!(!s.insert_user(&account("carol", 1)).expect("key taken"));
        assert_eq!(s.count_users().expect("count"), 2);
        let names: Vec<_> = s
            .all_users()
            .expect("all")
            .into_iter()
            .map(|u| u.name)
            .collect();
        assert_eq!(names, vec![user("alice"), user("bob")]);
        let alice = s.user_by_key(&key(1)).expect("by key").expect("alice");
        assert_eq!(
            (alice.name.clone(), alice.presence, alice.last_seen),
            (user("alice"), Presence::Offline, None)
        );
        assert_eq!(alice.registered_at, Timestamp::from_micros(1_000_000));
        let seen = s
            .renew_session(&key(1), Presence::Away, now())
            .expect("renew");
        let alice = s
            .user_by_name(&user("alice"))
            .expect("by name")
            .expect("alice");
        assert_eq!(
            (alice.presence, alice.last_seen),
            (Presence::Away, Some(seen))
        );
        s.renew_session(&key(2), Presence::Online, now())
            .expect("renew");
        assert_eq!(s.session_counts().expect("counts"), (1, 1));
        s.end_session(&key(1), now()).expect("end");
        let alice = s
            .user_by_name(&user("alice"))
            .expect("by name")
            .expect("alice");
        assert_eq!(alice.presence, Presence::Offline);
        assert!(alice.last_seen.is_some());
        assert_eq!(s.session_counts().expect("counts"), (1, 0));
        // Removing an account removes its mailbox and session.
        s.store_dm(
            &key(2),
            &user("alice"),
            &key(1),
            None,
            &body("1"),
            now(),
            10,
        )
        .expect("dm");
        assert!(s.remove_user(&user("bob"), &key(2)).expect("remove"));
        assert!(!s.remove_user(&user("bob"), &key(2)).expect("remove again"));
        assert_eq!(s.session_counts().expect("counts"), (0, 0));
        assert!(s.fetch_dms(&key(2), 0, 10).expect("fetch").0.is_empty());
        assert!(s.user_by_key(&key(2)).expect("by key").is_none());
    });
}

#[test]
fn sessions_end_after_the_presence_ttl_unless_renewed() {
    let short = StoreSettings {
        presence_ttl: Duration::from_millis(300),
        ..settings()
    };
    on_both(short, |s| {
        assert!(s.insert_user(&account("alice", 1)).expect("alice"));
        s.renew_session(&key(1), Presence::Online, now())
            .expect("renew");
        let presence = |s: &mut dyn RegistryStore| {
            s.user_by_key(&key(1))
                .expect("by key")
                .expect("alice")
                .presence
        };
        assert_eq!(presence(s), Presence::Online);
        wait_for("the session's end", || presence(s) == Presence::Offline);
        s.expire_sessions().expect("expire");
        assert_eq!(s.session_counts().expect("counts"), (0, 0));
    });
}

#[test]
fn messages_are_numbered_per_recipient_and_acks_never_reuse_numbers() {
    on_both(settings(), |s| {
        let alice = user("alice");
        let b = body("1");
        let store = |s: &mut dyn RegistryStore, to: u8| {
            s.store_dm(&key(to), &alice, &key(9), None, &b, now(), 10)
                .expect("store")
                .0
        };
        assert_eq!((store(s, 1), store(s, 1), store(s, 2)), (1, 2, 1));
        assert_eq!(s.waiting_dms().expect("waiting"), 3);
        assert_eq!(s.ack_dms(&key(1), 2).expect("ack"), 2);
        assert_eq!(store(s, 1), 3);
        let (waiting, more) = s.fetch_dms(&key(1), 0, 10).expect("fetch");
        assert_eq!(waiting.iter().map(|d| d.n).collect::<Vec<_>>(), vec![3]);
        assert!(!more);
        assert_eq!(
            (waiting[0].from.clone(), waiting[0].from_key),
            (alice.clone(), key(9))
        );
        assert_eq!(waiting[0].body.get(), "1");
        assert!(matches!(
            s.store_dm(&key(3), &alice, &key(9), None, &b, now(), 0),
            Err(MailboxError::Full)
        ));
        // Pages: `more` says whether more follow.
        store(s, 1);
        let (page, more) = s.fetch_dms(&key(1), 0, 1).expect("page");
        assert_eq!((page.len(), more), (1, true));
        let (page, more) = s.fetch_dms(&key(1), 3, 1).expect("page");
        assert_eq!((page[0].n, more), (4, false));
    });
}

/// A retry of a DM the recipient already acked is still a duplicate until the DM TTL expires
/// it; then it is forgotten without becoming a dead letter, while an unread one is.
#[test]
fn an_acked_id_stays_deduplicated_until_it_expires_to_dead_letters() {
    on_both(settings(), |s| {
        let alice = user("alice");
        assert!(s.insert_user(&account("bob", 1)).expect("bob"));
        let b = body("\"hi\"");
        let id = MessageId::new_v7();
        let first = s
            .store_dm(&key(1), &alice, &key(9), Some(id), &b, now(), 1)
            .expect("store");
        assert!(!first.3);
        assert_eq!(s.ack_dms(&key(1), first.0).expect("ack"), 1);
        let retry = s
            .store_dm(&key(1), &alice, &key(9), Some(id), &b, now(), 1)
            .expect("retry");
        assert_eq!(
            (retry.0, retry.1, retry.2, retry.3),
            (first.0, id, first.2, true)
        );
        // The same id for another body or recipient is a conflict.
        assert!(matches!(
            s.store_dm(&key(1), &alice, &key(9), Some(id), &body("2"), now(), 1),
            Err(MailboxError::IdConflict(_))
        ));
        assert!(matches!(
            s.store_dm(&key(2), &alice, &key(9), Some(id), &b, now(), 1),
            Err(MailboxError::IdConflict(_))
        ));
        // The acked one does not count against a mailbox of one.
        s.store_dm(&key(1), &alice, &key(9), None, &b, now(), 1)
            .expect("room for one more");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            s.expire_dms(Duration::ZERO, Timestamp::now())
                .expect("expire"),
            1
        );
        let dead = s.dead_letters(&key(9)).expect("dead");
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].to.as_str(), dead[0].reason.as_str()),
            ("bob", "expired")
        );
        let again = s
            .store_dm(&key(1), &alice, &key(9), Some(id), &b, now(), 1)
            .expect("after expiry");
        assert!(!again.3, "expired ids are new again");
    });
}

#[test]
fn a_multicast_retried_stores_no_copy_twice_and_full_mailboxes_are_dead_lettered() {
    on_both(settings(), |s| {
        let b = body("\"hi all\"");
        let id = MessageId::new_v7();
        let copies: Vec<(PublicKey, UserName, MessageId)> = (2..5)
            .map(|k| (key(k), user(&format!("u{k}")), copy_id(&id, &key(k))))
            .collect();
        s.store_dm(&key(4), &user("x"), &key(9), None, &b, now(), 1)
            .expect("fill u4");
        let unknown = vec![("nobody".to_owned(), "unknown_user")];
        let store = |s: &mut dyn RegistryStore| {
            s.store_dms(&copies, &unknown, &user("alice"), &key(1), &b, now(), 1)
                .expect("store_dms")
        };
        let count = |copies: &[Copy], dup: bool| {
            copies
                .iter()
                .filter(|c| matches!(c, Copy::Stored { duplicate, .. } if *duplicate == dup))
                .count()
        };
        let first = store(s);
        assert_eq!((count(&first, false), count(&first, true)), (2, 0));
        assert!(first.contains(&Copy::Full(user("u4"))));
        let again = store(s);
        assert_eq!((count(&again, false), count(&again, true)), (0, 2));
        assert_eq!(s.fetch_dms(&key(2), 0, 10).expect("u2").0.len(), 1);
        assert!(matches!(
            s.store_dms(&copies, &[], &user("alice"), &key(1), &body("1"), now(), 10),
            Err(MailboxError::IdConflict(_))
        ));
        let reasons: Vec<(String, String)> = s
            .dead_letters(&key(1))
            .expect("dead")
            .into_iter()
            .map(|d| (d.to, d.reason))
            .collect();
        assert!(reasons.contains(&("nobody".into(), "unknown_user".into())));
        assert!(reasons.contains(&("u4".into(), "mailbox_full".into())));
    });
}

#[test]
fn dead_letters_are_bounded_per_sender_keeping_the_newest() {
    on_both(settings(), |s| {
        let b = body("\"x\"");
        for i in 0..(MAX_DEAD_LETTERS + 5) {
            s.dead_letter(&key(1), &format!("u{i}"), "unknown_user", &b, now())
                .expect("dead");
        }
        s.dead_letter(&key(2), "other", "unknown_user", &b, now())
            .expect("dead");
        let letters = s.dead_letters(&key(1)).expect("list");
        assert_eq!(letters.len() as i64, MAX_DEAD_LETTERS);
        assert_eq!(letters[0].to, "u5");
        assert_eq!(s.dead_letters(&key(2)).expect("list").len(), 1);
    });
}

#[test]
fn the_sqlite_key_pair_is_the_data_directorys() {
    agora_common::keys::require_curve().expect("curve");
    let mut b = Backend::sqlite(settings());
    let (pair, created) = b.store.key_pair(b.dir.path()).expect("keys");
    assert!(created);
    let (again, created) = b.store.key_pair(b.dir.path()).expect("keys");
    assert_eq!((again.public, created), (pair.public, false));
}

/// Two registries over one database: the first stores its key pair, the second uses it
/// (not the one in its own data directory); the directory, accounts, presence and
/// mailboxes are the same through either.
#[test]
fn registries_sharing_a_database_share_keys_directory_presence_and_mailboxes() {
    agora_common::keys::require_curve().expect("curve");
    let mut a = Backend::postgres(settings());
    let mut b = a.another(settings());
    let dir_b = tempfile::tempdir().expect("tmp");
    // B's data directory has a pair of its own, which the stored one overrides.
    let (own_b, _) =
        agora_common::keys::Keypair::load_or_generate(&dir_b.path().join("registry.key"))
            .expect("b's own pair");
    // And the copy of the stored secret that earlier builds kept there, which goes.
    std::fs::create_dir_all(dir_b.path().join("store-key")).expect("old copy");
    let (pair_a, created) = a.store.key_pair(a.dir.path()).expect("a keys");
    assert!(created);
    let (pair_b, created) = b.key_pair(dir_b.path()).expect("b keys");
    assert!(!created);
    assert_eq!(pair_b.public, pair_a.public);
    assert_ne!(pair_b.public, own_b.public);
    assert_eq!(pair_b.secret_bytes(), pair_a.secret_bytes());
    assert!(!dir_b.path().join("store-key").exists());
    // The directory.
    a.store
        .register_group(group("g", 1, 2), false, now())
        .expect("store")
        .expect("register via a");
    assert_eq!(
        b.lookup_group(&name("g"), now())
            .expect("lookup")
            .map(|g| g.members),
        Some(2)
    );
    assert_eq!(
        refused(b.register_group(group("g", 2, 0), false, now())),
        ErrorCode::NameTaken
    );
    // Accounts and presence.
    assert!(a.store.insert_user(&account("alice", 1)).expect("alice"));
    assert!(!b
        .insert_user(&account("alice", 2))
        .expect("taken through b"));
    a.store
        .renew_session(&key(1), Presence::Away, now())
        .expect("renew");
    assert_eq!(
        b.user_by_name(&user("alice"))
            .expect("whois")
            .map(|u| u.presence),
        Some(Presence::Away)
    );
    // Mailboxes: stored via A, read and acked via B, which is told of it.
    let (n, ..) = a
        .store
        .store_dm(
            &key(1),
            &user("bob"),
            &key(2),
            None,
            &body("\"hi\""),
            now(),
            10,
        )
        .expect("store via a");
    let (dms, _) = b.fetch_dms(&key(1), 0, 10).expect("fetch via b");
    assert_eq!(dms.iter().map(|d| d.n).collect::<Vec<_>>(), vec![n]);
    let mut told = Vec::new();
    wait_for("b's notice of a's DM", || {
        told.extend(b.stored_elsewhere().expect("notices"));
        !told.is_empty()
    });
    assert_eq!(told, vec![(key(1), n)]);
    assert!(
        a.store.stored_elsewhere().expect("own").is_empty(),
        "a is not told of its own"
    );
    assert_eq!(b.ack_dms(&key(1), n).expect("ack via b"), 1);
    assert!(a
        .store
        .fetch_dms(&key(1), 0, 10)
        .expect("fetch via a")
        .0
        .is_empty());
}

/// Mailbox numbers stay unique and gapless when several registries store to one recipient
/// at once (the per-recipient counter row serializes them).
#[test]
fn concurrent_registries_never_give_a_mailbox_number_twice() {
    let a = Backend::postgres(settings());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let mut store = a.another(settings());
            std::thread::spawn(move || {
                (0..25)
                    .map(|i| {
                        store
                            .store_dm(
                                &key(1),
                                &user("alice"),
                                &key(2),
                                None,
                                &body(&format!("\"{t}-{i}\"")),
                                now(),
                                1000,
                            )
                            .expect("store")
                            .0
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut numbers: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=100).collect::<Vec<u64>>());
}

/// Registries creating accounts at once never go past `max_users` together (each counts
/// and inserts under an advisory lock); both backends refuse the account past it.
#[test]
fn the_account_limit_holds_across_concurrent_registries() {
    let limited = StoreSettings {
        max_users: 30,
        ..settings()
    };
    on_both(
        StoreSettings {
            max_users: 2,
            ..settings()
        },
        |s| {
            assert!(s.insert_user(&account("alice", 1)).expect("alice"));
            assert!(s.insert_user(&account("bob", 2)).expect("bob"));
            assert!(matches!(
                s.insert_user(&account("carol", 3)),
                Err(StoreError::TooManyUsers(2))
            ));
        },
    );
    let a = Backend::postgres(limited);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let mut store = a.another(limited);
            std::thread::spawn(move || {
                (0..20u8)
                    .map(
                        |i| match store.insert_user(&account(&format!("u{t}-{i}"), t * 20 + i)) {
                            Ok(true) => 1,
                            Err(StoreError::TooManyUsers(30)) => 0,
                            other => panic!("{other:?}"),
                        },
                    )
                    .sum::<u64>()
            })
        })
        .collect();
    let made: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(made, 30);
    let mut store = a.another(limited);
    assert_eq!(store.count_users().expect("count"), 30);
}

/// Registries listing new groups at once never go past `max_groups` together.
#[test]
fn the_group_limit_holds_across_concurrent_registries() {
    let a = Backend::postgres(settings());
    let threads: Vec<_> = (0..4u16)
        .map(|t| {
            let mut store = a.another(settings());
            std::thread::spawn(move || {
                (0..5u16)
                    .filter(|i| {
                        let port = 1000 + t * 10 + i;
                        match store.register_group(
                            group(&format!("g{port}"), port, 0),
                            false,
                            now(),
                        ) {
                            Ok(Ok(_)) => true,
                            Ok(Err(e)) if e.code == ErrorCode::LimitReached => false,
                            other => panic!("{other:?}"),
                        }
                    })
                    .count()
            })
        })
        .collect();
    let listed: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(listed, 10, "max_groups is 10");
    let mut store = a.another(settings());
    assert_eq!(store.list_groups(now()).expect("list").len(), 10);
}

/// Migrations are applied once however many registries connect, and a database migrated by
/// a newer registry is refused.
#[test]
fn a_schema_newer_than_this_build_is_refused() {
    let a = Backend::postgres(settings());
    let url = a.url.clone().expect("url");
    drop(a.another(settings()));
    let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM agora_registry.schema_version ORDER BY version",
            &[],
        )
        .expect("versions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        versions,
        (1..=super::postgres::schema_version()).collect::<Vec<_>>()
    );
    client
        .execute(
            "INSERT INTO agora_registry.schema_version (version) VALUES (999)",
            &[],
        )
        .expect("a newer version");
    match PgStore::connect(&url, &Default::default(), settings()) {
        Err(StoreError::SchemaTooNew { found: 999, .. }) => {}
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

/// A registry whose database connection broke (a database restart, a killed backend)
/// connects again on a later call, and listens for DM notices again.
#[test]
fn a_broken_connection_is_opened_again() {
    let b = Backend::postgres(settings());
    let mut s = b.another(settings());
    assert!(s.insert_user(&account("alice", 1)).expect("alice"));
    let url = b.url.clone().expect("url");
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let killed = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'agora-registry'",
            &[],
        )
        .expect("terminate");
    assert!(killed >= 1);
    wait_for("a working connection", || s.count_users().is_ok());
    assert_eq!(s.count_users().expect("count"), 1);
    let mut other = b.another(settings());
    other
        .store_dm(&key(1), &user("bob"), &key(2), None, &body("1"), now(), 10)
        .expect("store");
    let mut told = Vec::new();
    wait_for("the notice", || {
        told.extend(s.stored_elsewhere().expect("notices"));
        !told.is_empty()
    });
    assert_eq!(told, vec![(key(1), 1)]);
}

/// Issue 22, finding 17: a key owns at most `max_names_per_key` names, and a binding whose
/// group has not registered for `name_lapse` is free for another key.
#[test]
fn name_claims_are_capped_per_key_and_lapse_once_their_group_stops_registering() {
    let capped = StoreSettings {
        max_names_per_key: 2,
        name_lapse: Duration::from_secs(2),
        ..settings()
    };
    on_both(capped, |s| {
        let (a, b, c) = (name("a"), name("b"), name("c"));
        assert_eq!(
            s.claim_group(&a, &key(1), now()).expect("a"),
            Ok((key(1), true))
        );
        assert_eq!(
            s.claim_group(&b, &key(1), now()).expect("b"),
            Ok((key(1), true))
        );
        assert_eq!(
            refused(s.claim_group(&c, &key(1), now())),
            ErrorCode::TooManyNames
        );
        assert_eq!(
            s.claim_group(&c, &key(2), now()).expect("c"),
            Ok((key(2), true))
        );
        // Held while it is fresh; free for another key once the lapse has passed.
        assert_eq!(
            s.claim_group(&a, &key(3), now()).expect("a"),
            Ok((key(1), false))
        );
        wait_for("the binding of a to lapse", || {
            s.claim_group(&a, &key(3), now()).expect("claim") == Ok((key(3), true))
        });
        // Key 1's lapsed names no longer count: it may claim a new one.
        assert_eq!(
            s.claim_group(&name("d"), &key(1), now()).expect("d"),
            Ok((key(1), true))
        );
    });
}

/// Issue 22, finding 8: one sender holds at most `dm_share` waiting messages of a mailbox.
#[test]
fn one_sender_fills_at_most_its_share_of_a_mailbox() {
    let shared = StoreSettings {
        dm_share: 2,
        ..settings()
    };
    on_both(shared, |s| {
        let b = body("1");
        for _ in 0..2 {
            s.store_dm(&key(1), &user("m"), &key(9), None, &b, now(), 10)
                .expect("within the share");
        }
        assert!(matches!(
            s.store_dm(&key(1), &user("m"), &key(9), None, &b, now(), 10),
            Err(MailboxError::ShareFull)
        ));
        s.store_dm(&key(1), &user("c"), &key(8), None, &b, now(), 10)
            .expect("another sender");
        let id = MessageId::new_v7();
        let copies = vec![(key(1), user("bob"), copy_id(&id, &key(1)))];
        assert_eq!(
            s.store_dms(&copies, &[], &user("m"), &key(9), &b, now(), 10)
                .expect("store_dms"),
            vec![Copy::ShareFull(user("bob"))]
        );
        // Acked messages no longer count.
        s.ack_dms(&key(1), 1).expect("ack");
        s.store_dm(&key(1), &user("m"), &key(9), None, &b, now(), 10)
            .expect("room again");
    });
}

/// Issue 22, finding 8: blocks are the blocker's, listed by name, and go with its account.
#[test]
fn blocks_are_kept_per_blocker_and_removed_with_its_account() {
    on_both(settings(), |s| {
        for (n, k) in [("bob", 2), ("mallory", 3)] {
            assert!(s.insert_user(&account(n, k)).expect("account"));
        }
        let mallory = account("mallory", 3);
        assert_eq!(s.block(&key(2), &mallory, now()).expect("block"), Ok(true));
        assert_eq!(s.block(&key(2), &mallory, now()).expect("again"), Ok(false));
        assert!(s.blocks(&key(2), &key(3)).expect("blocks"));
        assert!(!s.blocks(&key(3), &key(2)).expect("not the other way"));
        assert_eq!(
            s.blockers_of(&key(3)).expect("blockers"),
            std::collections::HashSet::from([key(2)])
        );
        let listed: Vec<(String, PublicKey)> = s
            .blocked(&key(2))
            .expect("blocked")
            .into_iter()
            .map(|b| (b.name.as_str().to_owned(), b.key))
            .collect();
        assert_eq!(listed, vec![("mallory".to_owned(), key(3))]);
        assert!(s.unblock(&key(2), &user("mallory"), None).expect("unblock"));
        assert!(!s.unblock(&key(2), &user("mallory"), None).expect("again"));
        assert!(!s.blocks(&key(2), &key(3)).expect("lifted"));
        assert_eq!(s.block(&key(2), &mallory, now()).expect("block"), Ok(true));
        assert!(s.remove_user(&user("bob"), &key(2)).expect("remove"));
        assert!(s.blocked(&key(2)).expect("blocked").is_empty());
    });
}

/// A store opened on a registry database of schema `version` (1: before names lapsed; 2:
/// lapsing, with the seen time left NULL by the migration), in which the statements
/// `prepare` (SQLite's or PostgreSQL's SQL, for `backend`) ran first: an `owners` row, say.
fn upgraded_from(version: i32, backend: &str, settings: StoreSettings, prepare: &str) -> Backend {
    if backend == "sqlite" {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let conn =
                rusqlite::Connection::open(dir.path().join("registry.sqlite3")).expect("sqlite");
            conn.execute_batch(
                "CREATE TABLE owners (
                     name TEXT PRIMARY KEY,
                     key TEXT NOT NULL,
                     bound_at_us INTEGER NOT NULL) WITHOUT ROWID;",
            )
            .expect("version 1");
            if version >= 2 {
                conn.execute_batch(
                    "ALTER TABLE owners ADD COLUMN seen_at_us INTEGER;
                     CREATE INDEX owners_key ON owners(key);",
                )
                .expect("version 2");
            }
            conn.execute_batch(&format!("PRAGMA user_version = {version};"))
                .expect("version");
            conn.execute_batch(prepare).expect("prepare");
        }
        let store = SqliteStore::open(dir.path(), settings, true).expect("sqlite");
        return Backend {
            store: Box::new(store),
            dir,
            url: None,
            _pg: None,
        };
    }
    let pg = PgCluster::start();
    let url = pg.database("agora");
    {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        client
            .batch_execute(
                "CREATE SCHEMA agora_registry;
                 CREATE TABLE agora_registry.schema_version (
                     version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now());",
            )
            .expect("schema");
        for (v, sql) in (1..=version).zip(super::postgres::MIGRATIONS) {
            client.batch_execute(sql).expect("migration");
            client
                .execute(
                    "INSERT INTO agora_registry.schema_version (version) VALUES ($1)",
                    &[&v],
                )
                .expect("version");
        }
        client.batch_execute(prepare).expect("prepare");
    }
    let store = PgStore::connect(&url, &Default::default(), settings).expect("postgres");
    Backend {
        store: Box::new(store),
        dir: tempfile::tempdir().expect("tmp"),
        url: Some(url),
        _pg: Some(pg),
    }
}

/// Issue 22 review, C1: a name bound long before the registry learnt to lapse bindings
/// (schema 1, no seen time; or schema 2, whose migration left it NULL) is not free to
/// another key the moment the registry is upgraded: the migration counts it as seen then.
#[test]
fn names_bound_before_the_lapse_migration_do_not_lapse_at_once() {
    let lapse = settings().name_lapse;
    let ago = Duration::from_secs(10 * lapse.as_secs());
    let owner = key(1).to_string();
    for version in [1, 2] {
        for backend in ["sqlite", "postgres"] {
            eprintln!("from version {version} on {backend}");
            let sql = if backend == "sqlite" {
                let bound = now().saturating_sub(ago).as_micros();
                format!(
                    "INSERT INTO owners (name, key, bound_at_us) VALUES ('old', '{owner}', {bound})"
                )
            } else {
                format!(
                    "INSERT INTO agora_registry.owners (name, key, bound_at)
                     VALUES ('old', '{owner}', now() - interval '{} seconds')",
                    ago.as_secs()
                )
            };
            let mut b = upgraded_from(version, backend, settings(), &sql);
            let s = b.store.as_mut();
            assert_eq!(
                s.claim_group(&name("old"), &key(2), now()).expect("claim"),
                Ok((key(1), false)),
                "another key took a name bound before the upgrade"
            );
            assert_eq!(
                s.claim_group(&name("old"), &key(1), now()).expect("owner"),
                Ok((key(1), false))
            );
        }
    }
}

/// Issue 22 review, C1: a claim refused for the key's cap leaves a lapsed binding as it
/// was (the owner's re-claim used to release its own name first, then fail).
#[test]
fn a_claim_refused_for_the_cap_does_not_release_a_lapsed_name() {
    let capped = StoreSettings {
        max_names_per_key: 1,
        name_lapse: Duration::from_secs(3),
        ..settings()
    };
    on_both(capped, |s| {
        let (a, b) = (name("a"), name("b"));
        assert_eq!(
            s.claim_group(&a, &key(1), now()).expect("a"),
            Ok((key(1), true))
        );
        // Once a has lapsed, key 1 has room for b (refused until then).
        wait_for("the binding of a to lapse", || {
            s.claim_group(&b, &key(1), now()).expect("b") == Ok((key(1), true))
        });
        assert_eq!(
            s.claim_group(&name("c"), &key(2), now()).expect("c"),
            Ok((key(2), true))
        );
        // At their caps, neither the owner nor another key frees the lapsed a.
        for k in [key(1), key(2)] {
            assert_eq!(
                refused(s.claim_group(&a, &k, now())),
                ErrorCode::TooManyNames
            );
            assert_eq!(s.group_owner(&a).expect("owner"), Some(key(1)));
        }
        // With room again, the owner gets it back.
        assert!(s.release_group(&b).expect("release b"));
        assert_eq!(
            s.claim_group(&a, &key(1), now()).expect("a again"),
            Ok((key(1), true))
        );
    });
}

/// Issue 23: the SQLite backend keeps its WAL index in memory (`unix-excl`): no `-shm` file
/// is made, so none can be mapped and fault with SIGBUS when the disk refuses writes, and
/// its three connections (owners, accounts, mailboxes) still see one another's commits
/// through the shared index, also after a reopen.
#[test]
fn sqlite_keeps_its_wal_index_in_memory_shared_by_its_connections() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("registry.sqlite3");
    let shm = dir.path().join("registry.sqlite3-shm");
    {
        let mut s = SqliteStore::open(dir.path(), settings(), true).expect("sqlite");
        assert!(s.insert_user(&account("alice", 1)).expect("insert"));
        s.store_dm(&key(1), &user("bob"), &key(2), None, &body("1"), now(), 10)
            .expect("store");
        // Written by the users' connection, read by the mailbox's and back.
        assert_eq!(s.waiting_dms().expect("waiting"), 1);
        assert_eq!(s.count_users().expect("count"), 1);
        assert!(s
            .claim_group(&name("G"), &key(3), now())
            .expect("claim")
            .is_ok());
        assert!(db.exists());
        assert!(!shm.exists(), "{} exists", shm.display());
    }
    let mut s = SqliteStore::open(dir.path(), settings(), true).expect("reopen");
    assert_eq!(s.group_owner(&name("G")).expect("owner"), Some(key(3)));
    assert_eq!(s.fetch_dms(&key(1), 0, 10).expect("fetch").0.len(), 1);
    assert!(!shm.exists(), "{} exists", shm.display());
}

/// PROTOCOL §4.1.1 on both backends: a host's entries are all kept at its one endpoint
/// (even without owners), its `heartbeat_host` refreshes them and counts them, a plain
/// `register` there keeps today's "one endpoint is one node", and the host's silence
/// expires every one of its names.
#[test]
fn a_hosts_names_live_on_its_heartbeat_and_expire_with_it() {
    let short = StoreSettings {
        group_ttl: Duration::from_millis(600),
        ..settings()
    };
    on_both(short, |s| {
        let hosted = |n: &str| GroupRegistration {
            host: true,
            public_key: Some(key(7)),
            ..group(n, 1, 1)
        };
        for n in ["a", "b", "c"] {
            s.register_group(hosted(n), false, now())
                .expect("store")
                .expect(n);
        }
        assert_eq!(s.list_groups(now()).expect("list").len(), 3);
        assert_eq!(
            s.heartbeat_host(&ep(1), Some(key(7)), now()).expect("beat"),
            3
        );
        assert_eq!(
            s.heartbeat_host(&ep(1), Some(key(8)), now()).expect("beat"),
            0
        );
        // Kept alive past several TTLs by the host's heartbeat alone.
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            assert_eq!(
                s.heartbeat_host(&ep(1), Some(key(7)), now()).expect("beat"),
                3
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(s.lookup_group(&name("b"), now()).expect("lookup").is_some());
        s.unregister_group(&name("c"), &ep(1), now())
            .expect("store")
            .expect("unregister");
        assert_eq!(
            s.heartbeat_host(&ep(1), Some(key(7)), now()).expect("beat"),
            2
        );
        wait_for("the host's expiry", || {
            s.list_groups(now()).expect("list").is_empty()
        });
        assert_eq!(
            s.heartbeat_host(&ep(1), Some(key(7)), now()).expect("beat"),
            0
        );
        // (SQLite dropped them at that heartbeat; PostgreSQL drops them at the sweep.)
        s.expire_groups(now()).expect("expire");
        assert!(s.lookup_group(&name("a"), now()).expect("lookup").is_none());
        // A plain register at a host's endpoint replaces its names (no owners).
        s.register_group(hosted("a"), false, now())
            .expect("store")
            .expect("a");
        s.register_group(group("solo", 1, 0), false, now())
            .expect("store")
            .expect("solo");
        let names: Vec<_> = s
            .list_groups(now())
            .expect("list")
            .into_iter()
            .map(|g| g.name)
            .collect();
        assert_eq!(names, vec![name("solo")]);
    });
}

/// `register_groups`' claims in one call: the per-key cap holds within the batch (the
/// count is read once and kept), and names already the key's do not count twice.
#[test]
fn a_batch_of_claims_keeps_the_per_key_cap() {
    on_both(settings(), |s| {
        let claims = s
            .claim_groups_up_to(&[name("a"), name("b")], &key(1), 3, now())
            .expect("store");
        assert_eq!(claims, vec![Ok((key(1), true)), Ok((key(1), true))]);
        let claims = s
            .claim_groups_up_to(
                &[name("a"), name("c"), name("d"), name("b")],
                &key(1),
                3,
                now(),
            )
            .expect("store");
        assert_eq!(claims[0], Ok((key(1), false)));
        assert_eq!(claims[1], Ok((key(1), true)));
        assert_eq!(
            claims[2].as_ref().map_err(|e| e.code),
            Err(ErrorCode::TooManyNames)
        );
        assert_eq!(claims[3], Ok((key(1), false)));
        assert_eq!(s.group_owner(&name("d")).expect("owner"), None);
        assert_eq!(s.group_owner(&name("c")).expect("owner"), Some(key(1)));
    });
}
