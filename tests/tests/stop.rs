//! Authenticated stop and drain (PROTOCOL §6.10, §4.7), through the real binaries: a node
//! stopped under load acks what it committed, refuses the rest with `shutting_down` (or
//! never answers it), unregisters and exits 0; a retry after the restart is stored once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_common::client::{ClientError, ClientOptions, GroupClient};
use agora_proto::id::MessageId;
use agora_proto::wire::{ErrorCode, HistoryQuery, UserName};
use agora_tests::{wait_for, Federation, Server};
use serde_json::value::RawValue;

fn client(fed: &Federation, node: &Server, user: &str) -> GroupClient {
    GroupClient::new(
        &zmq::Context::new(),
        &node.endpoint,
        UserName::new(user).expect("name"),
        None,
        ClientOptions {
            timeout: Duration::from_secs(2),
            attempts: 1,
        },
    )
    .with_curve(fed.curve(user, node))
}

fn body(n: usize) -> Box<RawValue> {
    RawValue::from_string(format!("\"message {n}\"")).expect("json")
}

/// What became of one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked(u64),
    ShuttingDown,
    NoReply,
}

/// Every entry of the log, by message id: how many times each id is there.
fn ids_in_log(c: &mut GroupClient) -> HashMap<MessageId, usize> {
    let mut seen = HashMap::new();
    let mut after = 0;
    loop {
        let page = c
            .get_messages(HistoryQuery::AfterSeq(after), Some(1000))
            .expect("history");
        for m in &page.messages {
            *seen.entry(m.id).or_insert(0) += 1;
            after = m.seq;
        }
        if page.messages.is_empty() {
            return seen;
        }
    }
}

#[test]
fn a_node_stopped_under_load_acks_what_it_committed_and_a_retry_is_stored_once() {
    let fed = Federation::start("200ms");
    let alice = fed.user_key("alice");
    let mut node = fed.node("Cool Group", "127.0.0.1:0", "cool", &["--owner", &alice]);
    let addr = node.host_port().to_owned();
    fed.join_when_listed("alice", "Cool Group");
    fed.join_when_listed("bob", "Cool Group");

    // Not the owner: refused, and the node goes on.
    let refused = fed.cli("bob", &["admin", "stop", "Cool Group"], "");
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("forbidden"), "{refused:?}");

    // Two senders keep the node busy; each records what became of every id it sent.
    let outcomes: Arc<Mutex<Vec<(MessageId, usize, Outcome)>>> = Arc::default();
    let senders: Vec<_> = (0..2)
        .map(|s| {
            let mut c = client(&fed, &node, "bob");
            let outcomes = Arc::clone(&outcomes);
            std::thread::spawn(move || {
                for n in 0..100_000 {
                    let n = s * 1_000_000 + n;
                    let id = MessageId::new_v7();
                    let outcome = match c.send_with_id(body(n), id) {
                        Ok(ack) => Outcome::Acked(ack.seq),
                        Err(ClientError::Server(e)) if e.code == ErrorCode::ShuttingDown => {
                            Outcome::ShuttingDown
                        }
                        Err(ClientError::Timeout { .. }) => Outcome::NoReply,
                        Err(e) => panic!("send {n}: {e}"),
                    };
                    let done = !matches!(outcome, Outcome::Acked(_));
                    outcomes.lock().expect("lock").push((id, n, outcome));
                    if done {
                        return;
                    }
                }
            })
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(20), || outcomes
            .lock()
            .expect("lock")
            .len()
            > 200),
        "the senders never got going"
    );
    let stop = fed.cli("alice", &["admin", "stop", "Cool Group"], "");
    assert_eq!(stop.code, Some(0), "{stop:?}");
    assert!(stop.stdout.contains("Cool Group is stopping"), "{stop:?}");
    let status = node.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the node exited {status:?}"
    );
    for s in senders {
        s.join().expect("sender");
    }
    assert!(
        node.log().contains("unregistered"),
        "the node did not unregister: {}",
        node.log()
    );

    // Back on the same data: every acked send is in the log at its seq, once.
    let node = fed.node("Cool Group", &addr, "cool", &["--owner", &alice]);
    let mut reader = client(&fed, &node, "bob");
    let outcomes = outcomes.lock().expect("lock").clone();
    let in_log = ids_in_log(&mut reader);
    let (mut acked, mut refused, mut silent) = (0, 0, 0);
    for (id, _, outcome) in &outcomes {
        match outcome {
            Outcome::Acked(seq) => {
                acked += 1;
                assert_eq!(in_log.get(id), Some(&1), "acked {id} at {seq}");
                let page = reader
                    .get_messages(HistoryQuery::ById(*id), Some(1))
                    .expect("by id");
                assert_eq!(page.messages.first().map(|m| m.seq), Some(*seq));
            }
            Outcome::ShuttingDown => refused += 1,
            Outcome::NoReply => silent += 1,
        }
    }
    eprintln!("{acked} acked, {refused} refused with shutting_down, {silent} unanswered");
    assert!(
        acked > 200 && refused + silent == 2,
        "{acked} {refused} {silent}"
    );
    // Every unacked send, retried with its id, is stored once.
    for (id, n, outcome) in &outcomes {
        if !matches!(outcome, Outcome::Acked(_)) {
            reader.send_with_id(body(*n), *id).expect("retry");
        }
    }
    let in_log = ids_in_log(&mut reader);
    for (id, _, _) in &outcomes {
        assert_eq!(in_log.get(id), Some(&1), "{id} is in the log once");
    }
}

#[test]
fn sigterm_drains_a_node_and_only_the_operator_stops_the_registry() {
    // The operator's key pair, saved as alice's where user-cli looks for it.
    let operator = agora_common::keys::Keypair::generate().expect("key pair");
    let fed = Federation::start_with("200ms", &["--operator", &operator.public.to_string()]);
    operator
        .save(&std::path::Path::new(&fed.key_dir()).join("alice.key"))
        .expect("save the operator's key");
    let mut node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("bob", "Cool Group");
    let status = node.terminate();
    assert!(status.success(), "SIGTERM: {status:?}");
    assert!(node.log().contains("draining") && node.log().contains("unregistered"));

    let refused = fed.cli("bob", &["admin", "stop-registry"], "");
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("forbidden"), "{refused:?}");
    let stop = fed.cli("alice", &["admin", "stop-registry"], "");
    assert_eq!(stop.code, Some(0), "{stop:?}");
    let mut registry = fed.registry;
    let status = registry.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
