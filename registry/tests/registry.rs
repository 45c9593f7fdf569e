//! In-process tests: a real [`Registry`] on an ephemeral loopback port.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agora_common::client::{ClientError, ClientOptions, RegistryClient};
use agora_common::shutdown::Shutdown;
use agora_proto::wire::{Endpoint, ErrorCode, GroupName};
use agora_registry::{Config, Registry};

struct Running {
    endpoint: String,
    shutdown: Shutdown,
    thread: Option<JoinHandle<()>>,
    ctx: zmq::Context,
    _data: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            t.join().expect("registry thread");
        }
    }
}

fn start(heartbeat: Duration) -> Running {
    start_on(heartbeat, None)
}

/// A registry storing in `store` (a PostgreSQL URL), or in memory and SQLite.
fn start_on(heartbeat: Duration, store: Option<String>) -> Running {
    let ctx = zmq::Context::new();
    let data = tempfile::tempdir().expect("tmp");
    let config = Config {
        bind: "tcp://127.0.0.1:0".into(),
        heartbeat,
        data_dir: data.path().to_owned(),
        store,
        // These tests check the directory logic; CURVE is tested in common and end to end.
        insecure: true,
        ..Config::default()
    };
    let registry = Registry::bind(&ctx, config).expect("bind");
    let endpoint = registry.endpoint().to_owned();
    let shutdown = Shutdown::new();
    let flag = shutdown.clone();
    let thread = std::thread::spawn(move || registry.run(&flag).expect("run"));
    Running {
        endpoint,
        shutdown,
        thread: Some(thread),
        ctx,
        _data: data,
    }
}

fn code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Server(w) => w.code,
        other => panic!("expected a server error, got {other}"),
    }
}

#[test]
fn register_lookup_refuse_takeover_and_expire() {
    register_lookup_refuse_takeover_and_expire_on(start(Duration::from_millis(100)));
}

#[test]
fn register_lookup_refuse_takeover_and_expire_on_postgres() {
    let pg = agora_tests::pg::PgCluster::start();
    let url = pg.database("agora");
    register_lookup_refuse_takeover_and_expire_on(start_on(Duration::from_millis(100), Some(url)));
}

fn register_lookup_refuse_takeover_and_expire_on(r: Running) {
    let mut c = RegistryClient::new(&r.ctx, &r.endpoint, ClientOptions::default());
    let name = GroupName::new("Cool Group").expect("name");
    let a = Endpoint::new("tcp://127.0.0.1:7001").expect("endpoint");
    let b = Endpoint::new("tcp://127.0.0.1:7002").expect("endpoint");

    let reply = c.register(&name, &a, 2, None).expect("register");
    assert_eq!(reply.ttl_ms, 300);
    assert_eq!(c.lookup(&name).expect("lookup").endpoint, a);
    assert_eq!(
        code(c.register(&name, &b, 0, None).expect_err("taken")),
        ErrorCode::NameTaken
    );
    assert_eq!(
        code(c.unregister(&name, &b).expect_err("not holder")),
        ErrorCode::NameTaken
    );

    // No heartbeat: gone after the TTL (3 × 100 ms).
    let started = Instant::now();
    while c.lookup(&name).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "entry never expired"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.list().expect("list").is_empty());
    assert_eq!(
        code(c.lookup(&name).expect_err("expired")),
        ErrorCode::UnknownGroup
    );

    // Now the name is free for another endpoint; its holder can unregister it.
    c.register(&name, &b, 0, None).expect("register b");
    c.unregister(&name, &b).expect("unregister");
    assert_eq!(
        code(c.lookup(&name).expect_err("gone")),
        ErrorCode::UnknownGroup
    );
}

#[test]
fn group_node_actions_are_refused_by_the_registry() {
    let r = start(Duration::from_secs(2));
    let s = r.ctx.socket(zmq::REQ).expect("socket");
    s.set_linger(0).expect("linger");
    s.set_rcvtimeo(5000).expect("rcvtimeo");
    s.connect(&r.endpoint).expect("connect");
    s.send_multipart(
        [
            b"AGORA/1".to_vec(),
            br#"{"action":"join","user":"a"}"#.to_vec(),
        ],
        0,
    )
    .expect("send");
    let reply = s.recv_multipart(0).expect("reply");
    let v: serde_json::Value = serde_json::from_slice(&reply[1]).expect("json");
    assert_eq!(v["error"], "unknown_action");
}

/// Issue 23: a port that cannot be bound leaves no data directory, database or key pair
/// behind (SQLite: the sockets are bound before the store is opened), for the ROUTER's
/// port and the key endpoint's.
#[test]
fn a_bind_that_fails_leaves_no_data_directory_and_no_key_pair() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = format!("tcp://{}", busy.local_addr().expect("addr"));
    let parent = tempfile::tempdir().expect("tmp");
    let cases = [
        (taken.clone(), None, true),
        (taken.clone(), None, false),
        ("tcp://127.0.0.1:0".to_owned(), Some(taken.clone()), false),
    ];
    for (i, (bind, key_bind, insecure)) in cases.into_iter().enumerate() {
        let dir = parent.path().join(format!("data-{i}"));
        // A context per case, as a process each: the ZAP handler of a failed CURVE case
        // unbinds its inproc endpoint asynchronously, and the next case's would find it
        // taken (EADDRINUSE, "zmq").
        let ctx = zmq::Context::new();
        let config = Config {
            bind,
            key_bind,
            data_dir: dir.clone(),
            insecure,
            ..Config::default()
        };
        let err = Registry::bind(&ctx, config).expect_err("a busy port");
        assert_eq!(err.to_string(), format!("cannot bind {taken}"), "case {i}");
        assert!(!dir.exists(), "case {i}: {} was made", dir.display());
    }
}
