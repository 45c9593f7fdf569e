//! In-process tests of the live stream: a real [`Node`] and the `common::live` feed.

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_proto::wire::{EntryKind, UserName};
use serde_json::value::RawValue;

mod support;

use support::{client, start, Running};

fn user(n: &str) -> UserName {
    UserName::new(n).expect("name")
}

fn feed(n: &Running, name: &str, after_seq: Option<u64>) -> (Feed, Receiver<FeedEvent>) {
    let options = FeedOptions {
        renew: Duration::from_millis(200),
        ..FeedOptions::default()
    };
    let (feed, rx) = Feed::start(&n.ctx, user(name), None, options).expect("feed");
    feed.add(GroupSpec {
        label: "live".into(),
        endpoint: n.endpoint.clone(),
        group: None,
        after_seq,
        server_key: None,
    });
    (feed, rx)
}

/// Collects entry seqs until `last` is seen or 20 s pass; fails on a fatal error.
fn seqs_until(rx: &Receiver<FeedEvent>, last: u64) -> (Vec<u64>, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut seqs, mut live) = (Vec::new(), 0);
    while seqs.last() != Some(&last) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(FeedEvent::Entry { entry, live: l, .. }) => {
                seqs.push(entry.seq);
                live += u64::from(l);
            }
            Ok(FeedEvent::Error {
                error, fatal: true, ..
            }) => panic!("feed gave up: {error}"),
            Ok(_) => {}
            Err(_) => panic!("timed out at {:?}, waiting for seq {last}", seqs.last()),
        }
    }
    (seqs, live)
}

#[test]
fn dropped_pushes_are_backfilled_and_every_seq_arrives_once_in_order() {
    let n = start("live", |c| c.fault_drop_push_every = 25);
    let mut alice = client(&n, "alice");
    alice.join().expect("join");
    let (_feed, rx) = feed(&n, "alice", Some(0));
    let mut last = 0;
    for i in 0..300 {
        last = alice
            .send(RawValue::from_string(i.to_string()).expect("json"))
            .expect("send")
            .seq;
    }
    let (seqs, live) = seqs_until(&rx, last);
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    eprintln!("{live} of {last} entries came live, the rest from backfill");
}

fn wait_subscribed(rx: &Receiver<FeedEvent>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(FeedEvent::Subscribed { .. }) => return,
            Ok(_) => {}
            Err(_) => panic!("never subscribed"),
        }
    }
}

#[test]
fn without_drops_every_entry_after_subscribing_arrives_live() {
    let n = start("live", |_| {});
    let mut alice = client(&n, "alice");
    let joined = alice.join().expect("join");
    let (_feed, rx) = feed(&n, "alice", None);
    wait_subscribed(&rx);
    let mut last = 0;
    for i in 0..100 {
        last = alice
            .send(RawValue::from_string(i.to_string()).expect("json"))
            .expect("send")
            .seq;
    }
    let (seqs, live) = seqs_until(&rx, last);
    assert_eq!(seqs, (joined.last_seq + 1..=last).collect::<Vec<_>>());
    assert_eq!(live, 100);
}

#[test]
fn joins_and_leaves_are_pushed_and_a_leaver_gets_nothing_more() {
    let n = start("live", |_| {});
    let (mut alice, mut bob) = (client(&n, "alice"), client(&n, "bob"));
    alice.join().expect("join");
    bob.join().expect("join");
    let (_bob_feed, bob_rx) = feed(&n, "bob", None);
    // Wait until bob's subscription is live.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match bob_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(FeedEvent::Subscribed { .. }) => break,
            Ok(_) => {}
            Err(_) => panic!("bob never subscribed"),
        }
    }
    let mut carol = client(&n, "carol");
    carol.join().expect("join");
    let ack = alice
        .send(RawValue::from_string("\"hi\"".into()).expect("json"))
        .expect("send");
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match bob_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(FeedEvent::Entry { entry, .. }) => {
                kinds.push((entry.kind, entry.sender.to_string()))
            }
            Ok(_) => {}
            Err(_) => panic!("bob missed entries: {kinds:?}"),
        }
    }
    assert_eq!(
        kinds,
        vec![
            (EntryKind::Join, "carol".into()),
            (EntryKind::Message, "alice".into())
        ]
    );
    bob.leave().expect("leave");
    alice
        .send(RawValue::from_string("\"after bob left\"".into()).expect("json"))
        .expect("send");
    // Bob's renewal is refused (not a member) and nothing after his leave reaches him.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match bob_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(FeedEvent::Entry { entry, .. }) => {
                assert!(entry.seq <= ack.seq + 1, "bob got {entry:?} after leaving")
            }
            Ok(FeedEvent::Error { fatal: true, .. }) => break,
            Ok(_) => {}
            Err(_) => panic!("bob's feed was never refused"),
        }
    }
}
