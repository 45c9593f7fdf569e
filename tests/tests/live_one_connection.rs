//! One connection per host on the client side (issue 24, item 3): a live feed following many
//! groups of one group host holds one TCP connection to it, and gets every group's entries
//! (backfill included) over it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use agora_common::client::{ClientOptions, HostClient};
use agora_common::live::{Feed, FeedEvent, FeedOptions, GroupSpec};
use agora_proto::wire::{EntryKind, GroupName, UserName};
use agora_tests::{connections_to, wait_for, Federation};

const GROUPS: usize = 50;

/// Each group's entries delivered: seq and kind, in delivery order.
type Entries = HashMap<GroupName, Vec<(u64, EntryKind)>>;

#[test]
fn a_feed_of_fifty_groups_on_one_host_holds_one_connection_and_gets_every_groups_entries() {
    let fed = Federation::start("200ms");
    let names: Vec<GroupName> = (0..GROUPS)
        .map(|i| GroupName::new(format!("Room {i:02}")).expect("name"))
        .collect();
    let mut args: Vec<&str> = Vec::new();
    for name in &names {
        args.extend(["--group", name.as_str()]);
    }
    let host = fed.host("host", &args);
    let ctx = zmq::Context::new();
    let curve = fed.curve("alice", &host);
    let alice: UserName = "alice".parse().expect("user");
    let mut client = HostClient::new(
        &ctx,
        &host.endpoint,
        alice.clone(),
        ClientOptions::default(),
    )
    .with_curve(curve.clone());
    let mut joined_at: HashMap<GroupName, u64> = HashMap::new();
    for name in &names {
        let joined = client
            .group(name)
            .join()
            .unwrap_or_else(|e| panic!("join {name}: {e}; log:\n{}", host.log()));
        joined_at.insert(name.clone(), joined.last_seq);
    }

    // From seq 0: each group's entries so far (alice's join) come back from the log, over
    // the feed's connection.
    let (feed, rx) = Feed::start(
        &ctx,
        alice,
        Some(curve.keypair.clone()),
        FeedOptions::default(),
    )
    .expect("feed");
    for name in &names {
        feed.add(GroupSpec {
            label: name.to_string(),
            endpoint: host.endpoint.clone(),
            group: Some(name.clone()),
            after_seq: Some(0),
            server_key: Some(curve.server_key),
        });
    }
    let mut subscribed: HashSet<GroupName> = HashSet::new();
    let mut entries: Entries = HashMap::new();
    let mut take = |until: &dyn Fn(&HashSet<GroupName>, &Entries) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !until(&subscribed, &entries) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "subscribed {}, entries {entries:?}",
                subscribed.len()
            );
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(FeedEvent::Subscribed { group, .. }) => {
                    subscribed.insert(group);
                }
                Ok(FeedEvent::Entry { group, entry, .. }) => {
                    entries
                        .entry(group)
                        .or_default()
                        .push((entry.seq, entry.kind));
                }
                Ok(FeedEvent::Error { label, error, .. }) => panic!("{label}: {error}"),
                Err(_) => {}
            }
        }
    };
    take(&|s, e| s.len() == GROUPS && e.len() == GROUPS);

    for (i, name) in names.iter().enumerate() {
        let body =
            serde_json::value::RawValue::from_string(format!("\"hello {i}\"")).expect("body");
        client.group(name).send(body).expect("send");
    }
    take(&|_, e| {
        e.values()
            .all(|got| got.iter().any(|(_, kind)| *kind == EntryKind::Message))
    });
    for name in &names {
        let got = &entries[name];
        let seqs: Vec<u64> = got.iter().map(|(seq, _)| *seq).collect();
        let expected: Vec<u64> = (1..=joined_at[name] + 1).collect();
        assert_eq!(seqs, expected, "{name}: each entry once, in order");
    }

    // The host's clients: the feed's one connection, and the sender's until it goes.
    assert!(
        connections_to(&host.endpoint) <= 2,
        "{} connections",
        connections_to(&host.endpoint)
    );
    drop(client);
    assert!(
        wait_for(Duration::from_secs(5), || connections_to(&host.endpoint)
            == 1),
        "the feed of {GROUPS} groups holds {} connections to their host",
        connections_to(&host.endpoint)
    );
    // And it was the feed's: stopped, the host has no client left.
    drop(rx);
    drop(feed);
    assert!(
        wait_for(Duration::from_secs(5), || connections_to(&host.endpoint)
            == 0),
        "{} connections after the feed stopped",
        connections_to(&host.endpoint)
    );
}
