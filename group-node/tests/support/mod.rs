//! Shared harness for the in-process node tests: a real [`Node`] on an ephemeral loopback
//! port in a temporary data directory, stopped and joined on drop. With
//! `AGORA_TEST_STORE=postgres` its store is a throwaway PostgreSQL cluster's database.

use std::thread::JoinHandle;

use agora_common::client::{ClientOptions, GroupClient};
use agora_common::shutdown::Shutdown;
use agora_group_node::{Config, Node};
use agora_proto::wire::{GroupName, UserName};

/// A node serving on its own thread.
pub struct Running {
    /// The endpoint it bound.
    pub endpoint: String,
    /// The context tests create their sockets in.
    pub ctx: zmq::Context,
    shutdown: Shutdown,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
    /// With `AGORA_TEST_STORE=postgres`, the cluster holding the node's store; stopped after
    /// the node (fields drop in order, after `drop`).
    _pg: Option<agora_tests::pg::PgCluster>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            t.join().expect("node thread");
        }
    }
}

/// Starts a node for group `name`, its config adjusted by `tune`.
pub fn start(name: &str, tune: impl FnOnce(&mut Config)) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(
        GroupName::new(name).expect("name"),
        "tcp://127.0.0.1:0",
        dir.path().to_owned(),
    );
    // These tests check the node's logic; CURVE is tested in common and end to end.
    config.insecure = true;
    let pg = agora_tests::test_store_is_postgres().then(|| {
        let cluster = agora_tests::pg::PgCluster::start();
        config.store = Some(agora_group_node::store::postgres::PgTarget::new(
            cluster.database("agora"),
        ));
        cluster
    });
    tune(&mut config);
    let ctx = zmq::Context::new();
    let node = Node::bind(&ctx, config).expect("bind");
    let endpoint = node.endpoint().to_string();
    let shutdown = Shutdown::new();
    let flag = shutdown.clone();
    let thread = std::thread::spawn(move || node.run(&flag).expect("run"));
    Running {
        endpoint,
        ctx,
        shutdown,
        thread: Some(thread),
        _dir: dir,
        _pg: pg,
    }
}

/// A client of the node acting as `user`.
pub fn client(n: &Running, user: &str) -> GroupClient {
    GroupClient::new(
        &n.ctx,
        &n.endpoint,
        UserName::new(user).expect("name"),
        None,
        ClientOptions::default(),
    )
}
