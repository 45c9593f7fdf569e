//! Standby failover of a group host on PostgreSQL (issue 24 §5, item 7): two `group-node
//! --host` processes share one database (the host's schema, `agora_host_<hash>` of its
//! public key) and the host's key pair; one holds the host's one lease and serves every
//! group, the other waits, and takes all of them over when the first is killed.

use std::path::Path;
use std::time::{Duration, Instant};

use agora_common::client::{ClientOptions, HostClient};
use agora_proto::wire::{GroupName, HistoryQuery, UserName};
use agora_tests::{Federation, Pending, Server};
use serde_json::value::RawValue;
use sha2::Digest as _;

const GROUPS: usize = 20;

fn g(name: &str) -> GroupName {
    GroupName::new(name).expect("group name")
}

fn body(text: &str) -> Box<RawValue> {
    RawValue::from_string(serde_json::to_string(text).expect("json")).expect("raw")
}

/// Starts `group-node --host 127.0.0.1:0 --store URL` registered with the federation's
/// registry, its data in `DIR/data-<tag>`, without waiting for its `listening` line (a
/// standby prints it when it takes over).
fn spawn_host(fed: &Federation, tag: &str, url: &str, extra: &[&str]) -> Pending {
    let data = fed.node_data_dir(tag);
    let registry_key = fed.registry_key();
    let mut args = vec![
        "--host",
        "127.0.0.1:0",
        "--store",
        url,
        "--registry",
        &fed.registry.endpoint,
        "--registry-key",
        &registry_key,
        "--data-dir",
        &data,
        "--heartbeat",
        "200ms",
    ];
    args.extend_from_slice(extra);
    Server::spawn(
        "group-node",
        &args,
        Path::new(&fed.path(&format!("host-{tag}.log"))),
    )
}

/// A client of `host` as `user`, each request with a timeout of `timeout` and one attempt.
fn client(fed: &Federation, host: &Server, user: &str, timeout: Duration) -> HostClient {
    let ctx = zmq::Context::new();
    HostClient::new(
        &ctx,
        &host.endpoint,
        UserName::new(user).expect("user"),
        ClientOptions {
            timeout,
            ..ClientOptions::default()
        }
        .one_attempt(),
    )
    .with_curve(fed.curve(user, host))
}

/// Every seq and body of `group`'s log, as `client` reads it.
fn read_log(client: &mut HostClient, group: &str) -> (Vec<u64>, Vec<String>) {
    let mut seqs = Vec::new();
    let mut bodies = Vec::new();
    client
        .group(&g(group))
        .for_each_page(HistoryQuery::AfterSeq(0), None, |page| {
            for m in &page.messages {
                seqs.push(m.seq);
                bodies.push(m.body.get().to_owned());
            }
            true
        })
        .expect("history");
    (seqs, bodies)
}

/// `kill -9` of a PostgreSQL-backed host of 20 groups while a client sends across them: the
/// standby host (same key pair, same database) takes every group over, each log holds every
/// acked message exactly once and no gap, each group takes sends again, and the registry
/// sends newcomers to the standby. Prints the
/// takeover time (kill to every group answering); the 3 s target is the bench's to
/// measure, not a timed assert here.
#[test]
fn a_standby_host_takes_all_20_groups_over_after_kill_9_and_loses_no_acked_message() {
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let names: Vec<String> = (0..GROUPS).map(|i| format!("pg{i:02}")).collect();
    let mut flags = Vec::new();
    for n in &names {
        flags.push("--group");
        flags.push(n.as_str());
    }
    let mut active = spawn_host(&fed, "a", &url, &flags).wait_listening(Duration::from_secs(30));
    fed.share_node_keys("a", "b");
    let standby = spawn_host(&fed, "b", &url, &[]);
    assert!(
        agora_tests::wait_for(Duration::from_secs(20), || standby
            .log()
            .contains("waiting for it")),
        "the second host did not become a standby: {}",
        standby.log()
    );

    let mut alice = client(&fed, &active, "alice", Duration::from_secs(5));
    for n in &names {
        alice.group(&g(n)).join().expect("join");
    }
    let endpoint = active.endpoint.clone();
    let curve = fed.curve("alice", &active);
    let (tx, rx) = std::sync::mpsc::channel::<(String, String)>();
    let sender_names = names.clone();
    let sender = std::thread::spawn(move || {
        let ctx = zmq::Context::new();
        let options = ClientOptions {
            timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        }
        .one_attempt();
        let mut client = HostClient::new(
            &ctx,
            &endpoint,
            UserName::new("alice").expect("user"),
            options,
        )
        .with_curve(curve);
        for i in 0.. {
            let group = &sender_names[i % sender_names.len()];
            let text = format!("m{i}");
            match client.group(&g(group)).send(body(&text)) {
                Ok(_) => {
                    if tx.send((group.clone(), text)).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let mut acked: Vec<(String, String)> = Vec::new();
    while acked.len() < 300 {
        acked.push(
            rx.recv_timeout(Duration::from_secs(20))
                .expect("sends are acked"),
        );
    }
    active.kill9();
    let killed = Instant::now();
    let standby = standby.wait_listening(Duration::from_secs(20));
    let listening = killed.elapsed();
    assert!(
        standby.log().contains("took the lease"),
        "{}",
        standby.log()
    );

    // Every group answers on the standby: the takeover is done when the last one does.
    let mut alice = client(&fed, &standby, "alice", Duration::from_secs(2));
    let mut pending: Vec<&String> = names.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut first = None;
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "groups not served by the standby: {pending:?}\n{}",
            standby.log()
        );
        pending.retain(|n| {
            let answered = alice
                .group(&g(n))
                .get_messages(HistoryQuery::Latest(1), None)
                .is_ok();
            if answered && first.is_none() {
                first = Some(killed.elapsed());
            }
            !answered
        });
    }
    let served = killed.elapsed();
    eprintln!(
        "host failover: kill -9 to the standby listening in {listening:?}, to the first group \
         answering in {first:?}, to all {GROUPS} in {served:?} ({} sends acked before the kill)",
        acked.len()
    );
    sender
        .join()
        .expect("the sender ends when the host is gone");
    acked.extend(rx.try_iter());

    for n in &names {
        let (seqs, bodies) = read_log(&mut alice, n);
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{n}: a gap or a duplicate in the log");
        for (group, text) in acked.iter().filter(|(group, _)| group == n) {
            let quoted = format!("\"{text}\"");
            let count = bodies.iter().filter(|b| **b == quoted).count();
            assert_eq!(count, 1, "{group}: acked {text} is there {count} times");
        }
        let after = alice
            .group(&g(n))
            .send(body("after"))
            .expect("a send to the standby");
        assert_eq!(after.seq, seqs.len() as u64 + 1, "{n}: numbering goes on");
    }

    // Someone new finds a group through the registry: the standby's registration moved it.
    fed.join_when_listed("bob", "pg07");
    let sent = fed.cli("bob", &["send", "pg07", "found it"], "");
    assert_eq!(sent.code, Some(0), "{sent:?}");
    let (_, bodies) = read_log(&mut alice, "pg07");
    assert_eq!(bodies.last().map(String::as_str), Some("\"found it\""));
}

/// Measures (run by hand: `cargo test -p agora-tests --test host_failover -- --ignored
/// --nocapture`) a PostgreSQL host's takeover at `AGORA_TAKEOVER_GROUPS` groups (default
/// 1,000): `kill -9` of the idle active host to the standby listening, and to every group
/// answering one client asking them in turn. A measurement, not a timed assert.
#[test]
#[ignore]
fn measure_host_takeover() {
    let groups: usize = std::env::var("AGORA_TAKEOVER_GROUPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let names: Vec<String> = (0..groups).map(|i| format!("m{i:05}")).collect();
    let mut flags = Vec::new();
    for n in &names {
        flags.push("--group");
        flags.push(n.as_str());
    }
    let started = Instant::now();
    let mut active = spawn_host(&fed, "a", &url, &flags).wait_listening(Duration::from_secs(600));
    eprintln!("{groups} groups made at start in {:?}", started.elapsed());
    fed.share_node_keys("a", "b");
    let standby = spawn_host(&fed, "b", &url, &[]);
    assert!(agora_tests::wait_for(Duration::from_secs(20), || standby
        .log()
        .contains("waiting for it")));
    let mut alice = client(&fed, &active, "alice", Duration::from_secs(5));
    alice.group(&g(&names[0])).join().expect("join");
    active.kill9();
    let killed = Instant::now();
    let standby = standby.wait_listening(Duration::from_secs(60));
    let listening = killed.elapsed();
    let mut alice = client(&fed, &standby, "alice", Duration::from_secs(5));
    for n in &names {
        let answered = alice
            .group(&g(n))
            .get_messages(HistoryQuery::Latest(1), None);
        // Not a member of the others: `not_member` is an answer from the group's engine.
        if let Err(e) = answered {
            assert!(
                matches!(&e, agora_common::client::ClientError::Server(w)
                    if w.code == agora_proto::wire::ErrorCode::NotMember),
                "{n}: {e}"
            );
        }
    }
    eprintln!(
        "host takeover at {groups} groups: kill -9 to the standby listening in {listening:?}, \
         to all answering (one client, in turn) in {:?}",
        killed.elapsed()
    );
}

/// Groups people create on a PostgreSQL host (`create`, stored by the host's one batch in
/// its schema) are its standby's too: after `kill -9` the standby serves a created group
/// with its log, its owner (who alone may `delete` it) and its mode; a delete there frees
/// the name, and a create takes it again.
#[test]
fn a_group_created_on_a_postgres_host_is_its_standbys_with_owner_and_mode() {
    use agora_proto::wire::{ErrorCode, GroupMode};
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let mut active =
        spawn_host(&fed, "a", &url, &["--creators", "any"]).wait_listening(Duration::from_secs(30));
    fed.share_node_keys("a", "b");
    let standby = spawn_host(&fed, "b", &url, &["--creators", "any"]);
    assert!(
        agora_tests::wait_for(Duration::from_secs(20), || standby
            .log()
            .contains("waiting for it")),
        "{}",
        standby.log()
    );
    let mut alice = client(&fed, &active, "alice", Duration::from_secs(15));
    let made = alice
        .create(&g("made"), GroupMode::Private)
        .unwrap_or_else(|e| panic!("create: {e}\n{}", active.log()));
    assert_eq!(made.last_seq, 1);
    alice.group(&g("made")).send(body("hello")).expect("send");
    let open = alice.create(&g("open"), GroupMode::Open).expect("create");
    assert_eq!(open.mode, GroupMode::Open);

    active.kill9();
    let standby = standby.wait_listening(Duration::from_secs(20));
    let mut alice = client(&fed, &standby, "alice", Duration::from_secs(5));
    let (seqs, bodies) = read_log(&mut alice, "made");
    assert_eq!(seqs, vec![1, 2]);
    assert_eq!(bodies.last().map(String::as_str), Some("\"hello\""));
    // Private: bob, not invited, may not join; open: he may.
    let mut bob = client(&fed, &standby, "bob", Duration::from_secs(5));
    match bob.group(&g("made")).join() {
        Err(agora_common::client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::NotInvited, "{e:?}")
        }
        other => panic!("bob joined a private group: {other:?}"),
    }
    bob.group(&g("open")).join().expect("an open group");
    // The owner is alice's key, stored: bob may not delete, she may.
    match bob.group(&g("open")).delete() {
        Err(agora_common::client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}")
        }
        other => panic!("bob deleted alice's group: {other:?}"),
    }
    assert!(alice.group(&g("made")).delete().expect("delete").deleted);
    let again = bob
        .create(&g("made"), GroupMode::Open)
        .expect("the name is free again");
    assert_eq!(again.last_seq, 1, "a new group, a new log");
}

/// `--host --store --insecure` has no key to name the host's schema by: a usage error (exit
/// 2) naming `--host-id`, before anything is made; `--host-id` without `--host` is refused
/// by the argument parser.
#[test]
fn an_insecure_postgres_host_needs_a_host_id_and_makes_nothing_without_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data_s = data.to_string_lossy().into_owned();
    let base = [
        "--host",
        "127.0.0.1:0",
        "--data-dir",
        data_s.as_str(),
        "--store",
        "postgres://agora@127.0.0.1:1/agora",
        "--insecure",
        "--no-registry",
    ];
    let out = agora_tests::run("group-node", &base, "");
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--host-id"), "{}", out.stderr);
    assert!(!data.exists(), "a usage error made {}", data.display());
    let out = agora_tests::run(
        "group-node",
        &[
            "G",
            "127.0.0.1:0",
            "--store",
            "postgres://a@127.0.0.1:1/b",
            "--host-id",
            "x",
        ],
        "",
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--host"), "{}", out.stderr);

    // With --host-id, it serves from the schema that id names.
    let cluster = agora_tests::pg::PgCluster::start();
    let url = cluster.database("agora");
    let mut args = base.to_vec();
    args[5] = url.as_str();
    args.extend(["--host-id", "night shift", "--group", "g"]);
    let host = Server::spawn("group-node", &args, &dir.path().join("host.log"))
        .wait_listening(Duration::from_secs(30));
    let mut db = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let schemas: Vec<String> = db
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'agora_%' ORDER BY 1",
            &[],
        )
        .expect("schemas")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        schemas,
        vec![format!(
            "agora_host_{}",
            sha2::Sha256::digest(b"night shift")[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )],
        "{}",
        host.log()
    );
}

/// A file uploaded to one group of a PostgreSQL host is in the host's schema, under that
/// group: its standby (whose data directory has no copy) serves it after `kill -9`, and
/// only in that group.
#[test]
fn a_file_uploaded_on_a_postgres_host_downloads_from_its_standby_in_its_group_only() {
    use agora_proto::wire::{ErrorCode, Sha256Digest};
    let fed = Federation::start("200ms");
    let (_cluster, url) = fed.shared_store();
    let mut active = spawn_host(&fed, "a", &url, &["--group", "alpha", "--group", "beta"])
        .wait_listening(Duration::from_secs(30));
    fed.share_node_keys("a", "b");
    let standby = spawn_host(&fed, "b", &url, &[]);
    assert!(
        agora_tests::wait_for(Duration::from_secs(20), || standby
            .log()
            .contains("waiting for it")),
        "{}",
        standby.log()
    );
    let mut alice = client(&fed, &active, "alice", Duration::from_secs(15));
    for n in ["alpha", "beta"] {
        alice.group(&g(n)).join().expect("join");
    }
    // Two pieces in the database (1 MiB each, the last shorter).
    let bytes: Vec<u8> = (0..(1 << 20) + 4321).map(|i| (i % 251) as u8).collect();
    let digest = Sha256Digest::from_bytes(sha2::Sha256::digest(&bytes).into());
    alice
        .group(&g("alpha"))
        .upload(digest, bytes.len() as u64)
        .expect("upload");
    for (i, piece) in bytes.chunks(1 << 20).enumerate() {
        alice
            .group(&g("alpha"))
            .upload_chunk(digest, (i << 20) as u64, piece.to_vec())
            .unwrap_or_else(|e| panic!("chunk {i}: {e}\n{}", active.log()));
    }

    active.kill9();
    let standby = standby.wait_listening(Duration::from_secs(20));
    let mut alice = client(&fed, &standby, "alice", Duration::from_secs(15));
    let mut got = Vec::new();
    while got.len() < bytes.len() {
        let (_, piece) = alice
            .group(&g("alpha"))
            .download(digest, got.len() as u64, None)
            .unwrap_or_else(|e| panic!("download from the standby: {e}\n{}", standby.log()));
        assert!(!piece.is_empty(), "an empty range before the end");
        got.extend(piece);
    }
    assert!(got == bytes, "the standby served other bytes");
    match alice.group(&g("beta")).download(digest, 0, None) {
        Err(agora_common::client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::NotFound, "{e:?}")
        }
        other => panic!("beta served alpha's file: {:?}", other.map(|(s, _)| s)),
    }
}
