//! Group hosts (issue 24): requests routed by `group`, errors naming it, `renew`; the real
//! binaries over CURVE, request bodies written by hand.

use std::path::Path;

use agora_common::client::{ClientCurve, ClientError, ClientOptions, HostClient, ReqClient};
use agora_common::keys::Keypair;
use agora_proto::codec::{decode_reply, Frames};
use agora_proto::wire::{
    Attachment, CreateReply, Empty, ErrorCode, GroupMode, GroupName, HistoryQuery, RenewReply,
    Sha256Digest, UserName, WireError, PROTOCOL,
};
use agora_tests::{Federation, Server};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// Sends `body` to `server` as `user`; returns the decoded reply.
fn ask<T: DeserializeOwned>(
    fed: &Federation,
    server: &Server,
    user: &str,
    body: &str,
) -> Result<T, WireError> {
    let ctx = zmq::Context::new();
    let mut client = ReqClient::new(&ctx, server.endpoint.clone(), ClientOptions::default())
        .with_curve(fed.curve(user, server));
    let frames: Frames = vec![PROTOCOL.to_vec(), body.as_bytes().to_vec()];
    let reply = client.request_frames(&frames).expect("a reply");
    decode_reply::<T>(&reply).expect("a well-formed reply")
}

#[test]
fn a_node_of_one_renews_in_one_request_and_names_the_group_in_errors() {
    let fed = Federation::start("200ms");
    let node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");

    // `renew`: its own group renewed (batched pushes), another refused by name.
    let renewed: RenewReply = ask(
        &fed,
        &node,
        "alice",
        r#"{"action":"renew","user":"alice","groups":[
            {"group":"Cool Group","acked_seq":0},{"group":"Elsewhere"}]}"#,
    )
    .expect("renew answered");
    assert_eq!(renewed.groups.len(), 1, "{renewed:?}");
    assert_eq!(renewed.groups[0].group.as_str(), "Cool Group");
    assert!(renewed.groups[0].lease_ms > 0);
    assert_eq!(renewed.refused.len(), 1, "{renewed:?}");
    assert_eq!(renewed.refused[0].code, ErrorCode::UnknownGroup);
    assert_eq!(
        renewed.refused[0].group.as_ref().map(|g| g.as_str()),
        Some("Elsewhere")
    );

    // A non-member's renew of the group: refused, naming it.
    let bob: RenewReply = ask(
        &fed,
        &node,
        "bob",
        r#"{"action":"renew","user":"bob","groups":[{"group":"Cool Group"}]}"#,
    )
    .expect("renew answered");
    assert!(bob.groups.is_empty());
    assert_eq!(bob.refused[0].code, ErrorCode::NotMember);
    assert_eq!(
        bob.refused[0].group.as_ref().map(|g| g.as_str()),
        Some("Cool Group")
    );

    // No entries, or too many: invalid_field naming `groups`.
    let e = ask::<RenewReply>(
        &fed,
        &node,
        "alice",
        r#"{"action":"renew","user":"alice","groups":[]}"#,
    )
    .expect_err("no entries");
    assert_eq!(e.code, ErrorCode::InvalidField);
    assert!(e.message.starts_with("groups:"), "{e}");

    // An error to a request naming a group carries it; one naming none, none.
    let e = ask::<Empty>(
        &fed,
        &node,
        "bob",
        r#"{"action":"send","group":"Cool Group","user":"bob","body":"hi"}"#,
    )
    .expect_err("bob is no member");
    assert_eq!(e.code, ErrorCode::NotMember);
    assert_eq!(e.group.as_ref().map(|g| g.as_str()), Some("Cool Group"));
    let e = ask::<Empty>(
        &fed,
        &node,
        "bob",
        r#"{"action":"send","user":"bob","body":"hi"}"#,
    )
    .expect_err("bob is no member");
    assert_eq!(e.code, ErrorCode::NotMember);
    assert_eq!(e.group, None);
    let e = ask::<Empty>(
        &fed,
        &node,
        "alice",
        r#"{"action":"get_messages","group":"Elsewhere","user":"alice"}"#,
    )
    .expect_err("another group");
    assert_eq!(e.code, ErrorCode::UnknownGroup);
    assert_eq!(e.group.as_ref().map(|g| g.as_str()), Some("Elsewhere"));
}

/// A client of `host` as `user`.
fn host_client(fed: &Federation, host: &Server, user: &str) -> HostClient {
    let ctx = zmq::Context::new();
    HostClient::new(
        &ctx,
        &host.endpoint,
        UserName::new(user).expect("user"),
        ClientOptions::default(),
    )
    .with_curve(fed.curve(user, host))
}

/// A client of `host` with the host's own key (the owner of the operator's groups).
fn operator(fed: &Federation, host: &Server, tag: &str) -> HostClient {
    let keypair =
        Keypair::load(&Path::new(&fed.node_data_dir(tag)).join("node.key")).expect("host key");
    let server_key = host.key.as_deref().expect("CURVE").parse().expect("a key");
    let ctx = zmq::Context::new();
    HostClient::new(
        &ctx,
        &host.endpoint,
        UserName::new("operator").expect("user"),
        ClientOptions::default(),
    )
    .with_curve(ClientCurve {
        keypair,
        server_key,
    })
}

fn g(name: &str) -> GroupName {
    GroupName::new(name).expect("group name")
}

fn body(text: &str) -> Box<RawValue> {
    RawValue::from_string(serde_json::to_string(text).expect("json")).expect("raw")
}

fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> WireError {
    match result {
        Err(ClientError::Server(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A DEALER of `user` subscribed to `group` on `host`: its pushes arrive on it.
fn follower(fed: &Federation, host: &Server, user: &str, group: &str) -> zmq::Socket {
    let ctx = zmq::Context::new();
    let curve = fed.curve(user, host);
    let d = ctx.socket(zmq::DEALER).expect("dealer");
    d.set_curve_serverkey(curve.server_key.as_bytes())
        .expect("server key");
    d.set_curve_publickey(curve.keypair.public.as_bytes())
        .expect("public key");
    d.set_curve_secretkey(curve.keypair.secret_bytes())
        .expect("secret key");
    d.set_rcvtimeo(10_000).expect("timeout");
    d.set_linger(0).expect("linger");
    d.connect(&host.endpoint).expect("connect");
    let request = serde_json::json!({"action": "subscribe", "group": group, "user": user});
    d.send_multipart([&b""[..], PROTOCOL, request.to_string().as_bytes()], 0)
        .expect("subscribe");
    let reply = d.recv_multipart(0).expect("the subscribe reply");
    let text = String::from_utf8_lossy(reply.last().expect("a body")).into_owned();
    assert!(
        text.contains(r#""ok":true"#) || !text.contains("error"),
        "{text}"
    );
    d
}

#[test]
fn a_host_serves_each_group_on_its_own() {
    let fed = Federation::start("200ms");
    let host = fed.host(
        "h",
        &["--group", "alpha", "--group", "beta", "--group", "gamma"],
    );
    let mut alice = host_client(&fed, &host, "alice");
    for name in ["alpha", "beta", "gamma"] {
        alice.group(&g(name)).join().expect("join");
    }

    // Send and history per group: each log numbers on its own and holds only its messages.
    let follower_beta = follower(&fed, &host, "alice", "beta");
    for name in ["alpha", "beta", "gamma"] {
        let ack = alice
            .group(&g(name))
            .send(body(&format!("hello {name}")))
            .expect("send");
        assert_eq!(ack.seq, 2, "{name}: the join is seq 1, the message 2");
    }
    for name in ["alpha", "beta", "gamma"] {
        let page = alice
            .group(&g(name))
            .get_messages(HistoryQuery::AfterSeq(0), None)
            .expect("history");
        let bodies: Vec<String> = page
            .messages
            .iter()
            .map(|m| m.body.get().to_owned())
            .collect();
        assert_eq!(
            bodies,
            ["null".to_owned(), format!("\"hello {name}\"")],
            "{name}"
        );
    }

    // Push: beta's follower gets beta's message, named beta.
    let push = follower_beta.recv_multipart(0).expect("a push");
    let event: serde_json::Value =
        serde_json::from_slice(push.last().expect("a body")).expect("json");
    assert_eq!(event["group"], "beta", "{event}");
    assert_eq!(event["entry"]["body"], "hello beta", "{event}");

    // Files: a content uploaded in alpha is not in beta.
    let bytes = b"a file of alpha".to_vec();
    let digest = Sha256Digest::from_bytes(Sha256::digest(&bytes).into());
    let size = bytes.len() as u64;
    alice
        .group(&g("alpha"))
        .upload(digest, size)
        .expect("upload");
    alice
        .group(&g("alpha"))
        .upload_chunk(digest, 0, bytes.clone())
        .expect("chunk");
    let (_, got) = alice
        .group(&g("alpha"))
        .download(digest, 0, None)
        .expect("download in alpha");
    assert_eq!(got, bytes);
    let e = refusal(alice.group(&g("beta")).download(digest, 0, None));
    assert_eq!(e.code, ErrorCode::NotFound, "{e}");
    assert_eq!(e.group, Some(g("beta")));
    alice
        .group(&g("alpha"))
        .send_attachment(
            Attachment {
                sha256: digest,
                size,
                name: "a.txt".into(),
                media_type: "text/plain".into(),
            },
            body("see"),
            agora_proto::id::MessageId::new_v7(),
        )
        .expect("send the file in alpha");

    // Policy: the groups are the host key's; a member may not change the mode.
    let e = refusal(alice.group(&g("gamma")).set_mode(GroupMode::Private));
    assert_eq!(e.code, ErrorCode::Forbidden, "{e}");
    assert_eq!(e.group, Some(g("gamma")));
    let mut op = operator(&fed, &host, "h");
    op.group(&g("gamma"))
        .set_mode(GroupMode::Private)
        .expect("the owner makes gamma private");
    let mut bob = host_client(&fed, &host, "bob");
    let e = refusal(bob.group(&g("gamma")).members());
    assert_eq!(e.code, ErrorCode::NotMember, "{e}");
    bob.group(&g("alpha"))
        .members()
        .expect("alpha is still open");

    // Routing: no group is invalid_field naming group; a group not here is unknown_group.
    let e = ask::<Empty>(&fed, &host, "alice", r#"{"action":"info"}"#).expect_err("no group");
    assert_eq!(e.code, ErrorCode::InvalidField);
    assert!(e.message.starts_with("group:"), "{e}");
    let e = ask::<Empty>(&fed, &host, "alice", r#"{"action":"info","group":"delta"}"#)
        .expect_err("not here");
    assert_eq!(e.code, ErrorCode::UnknownGroup);
    assert_eq!(e.group, Some(g("delta")));

    // renew over the host's groups: two renewed, the missing one refused by name.
    let renewed: RenewReply = ask(
        &fed,
        &host,
        "alice",
        r#"{"action":"renew","user":"alice","groups":[{"group":"alpha"},{"group":"beta"},{"group":"delta"}]}"#,
    )
    .expect("renew");
    assert_eq!(renewed.groups.len(), 2, "{renewed:?}");
    assert_eq!(renewed.refused[0].group, Some(g("delta")));

    // stop of one group (its owner, the host key): it answers shutting_down, the others serve.
    let e = refusal(bob.group(&g("beta")).stop());
    assert_eq!(e.code, ErrorCode::Forbidden, "{e}");
    op.group(&g("beta")).stop().expect("stop beta");
    let e = refusal(alice.group(&g("beta")).info());
    assert_eq!(e.code, ErrorCode::ShuttingDown, "{e}");
    assert_eq!(e.group, Some(g("beta")));
    alice.group(&g("alpha")).info().expect("alpha still serves");

    // The groups and their logs come back after a restart.
    drop(host);
    let host = fed.host("h", &[]);
    let mut alice = host_client(&fed, &host, "alice");
    for name in ["alpha", "beta", "gamma"] {
        let info = alice.group(&g(name)).info().expect("info after restart");
        assert!(info.last_seq >= 2, "{name}: {info:?}");
    }
}

/// `kill -9` of a host while one client sends across 20 groups: after the restart every
/// acked message is in its group's log exactly once, and each log is gap-free.
#[test]
fn kill_9_under_load_across_20_groups_loses_no_acked_message() {
    let fed = Federation::start("200ms");
    let names: Vec<String> = (0..20).map(|i| format!("g{i:02}")).collect();
    let mut flags = Vec::new();
    for n in &names {
        flags.push("--group");
        flags.push(n.as_str());
    }
    let mut host = fed.host("k", &flags);
    let mut alice = host_client(&fed, &host, "alice");
    for n in &names {
        alice.group(&g(n)).join().expect("join");
    }
    let endpoint = host.endpoint.clone();
    let curve = fed.curve("alice", &host);
    let (tx, rx) = std::sync::mpsc::channel::<(String, String)>();
    let sender_names = names.clone();
    let sender = std::thread::spawn(move || {
        let ctx = zmq::Context::new();
        let options = ClientOptions {
            timeout: std::time::Duration::from_secs(2),
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
            rx.recv_timeout(std::time::Duration::from_secs(20))
                .expect("sends are acked"),
        );
    }
    host.kill9();
    sender
        .join()
        .expect("the sender ends when the host is gone");
    acked.extend(rx.try_iter());
    let host = fed.host("k", &[]);
    let mut alice = host_client(&fed, &host, "alice");
    for n in &names {
        let mut seqs = Vec::new();
        let mut bodies = Vec::new();
        alice
            .group(&g(n))
            .for_each_page(HistoryQuery::AfterSeq(0), None, |page| {
                for m in &page.messages {
                    seqs.push(m.seq);
                    bodies.push(m.body.get().to_owned());
                }
                true
            })
            .expect("history after the restart");
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{n}: a gap or a duplicate in the log");
        for (group, text) in acked.iter().filter(|(group, _)| group == n) {
            let quoted = format!("\"{text}\"");
            let count = bodies.iter().filter(|b| **b == quoted).count();
            assert_eq!(count, 1, "{group}: acked {text} is there {count} times");
        }
    }
}

/// `create {group, user, mode}` as `user`.
fn create(
    fed: &Federation,
    host: &Server,
    user: &str,
    group: &str,
    mode: &str,
) -> Result<CreateReply, WireError> {
    let request =
        serde_json::json!({"action": "create", "group": group, "user": user, "mode": mode});
    ask(fed, host, user, &request.to_string())
}

#[test]
fn create_and_delete_on_a_host_with_every_refusal() {
    let fed = Federation::start("200ms");
    let creators = format!("{},{}", fed.user_key("alice"), fed.user_key("carol"));
    let host = fed.host(
        "c",
        &[
            "--group",
            "alpha",
            "--creators",
            &creators,
            "--max-groups",
            "4",
            "--max-groups-per-key",
            "2",
        ],
    );
    let code = |r: Result<CreateReply, WireError>| r.expect_err("refused").code;

    // Not a creator: forbidden. A bad name: invalid_field.
    assert_eq!(
        code(create(&fed, &host, "bob", "b1", "open")),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(create(&fed, &host, "alice", "", "open")),
        ErrorCode::InvalidField
    );

    // alice creates: she owns it, her join is seq 1, she sends, bob joins (open).
    let made = create(&fed, &host, "alice", "made1", "open").expect("create");
    assert_eq!(made.group, g("made1"));
    assert_eq!(made.last_seq, 1);
    assert_eq!(made.owner.to_string(), fed.user_key("alice"));
    let mut alice = host_client(&fed, &host, "alice");
    alice.group(&g("made1")).send(body("first")).expect("send");
    let mut bob = host_client(&fed, &host, "bob");
    bob.group(&g("made1"))
        .join()
        .expect("bob joins an open group");

    // The registry lists it at once: a user-cli user finds it by name and joins.
    fed.join_when_listed("dave", "made1");

    // Taken names: one another node holds at the registry, one she made, the operator's.
    let _elsewhere = fed.node("elsewhere", "127.0.0.1:0", "elsewhere", &[]);
    fed.join_when_listed("erin", "elsewhere");
    assert_eq!(
        code(create(&fed, &host, "alice", "elsewhere", "open")),
        ErrorCode::NameTaken
    );
    assert_eq!(
        code(create(&fed, &host, "alice", "made1", "open")),
        ErrorCode::NameTaken
    );
    assert_eq!(
        code(create(&fed, &host, "carol", "alpha", "open")),
        ErrorCode::NameTaken
    );

    // --max-groups-per-key 2, then --max-groups 4.
    let private = create(&fed, &host, "alice", "made2", "private").expect("second");
    assert_eq!(private.mode, GroupMode::Private);
    assert_eq!(
        code(create(&fed, &host, "alice", "made3", "open")),
        ErrorCode::LimitReached
    );
    create(&fed, &host, "carol", "c1", "open").expect("carol's first");
    assert_eq!(
        code(create(&fed, &host, "carol", "c2", "open")),
        ErrorCode::LimitReached
    );
    let e = refusal(bob.group(&g("made2")).join());
    assert_ne!(
        e.code,
        ErrorCode::UnknownGroup,
        "made2 is private, not missing: {e}"
    );

    // delete: not by a member, by the owner; the name is free at once.
    let e = refusal(bob.group(&g("made1")).delete());
    assert_eq!(e.code, ErrorCode::Forbidden, "{e}");
    assert_eq!(e.group, Some(g("made1")));
    alice
        .group(&g("made1"))
        .delete()
        .expect("the owner deletes");
    let e = refusal(alice.group(&g("made1")).info());
    assert_eq!(e.code, ErrorCode::UnknownGroup, "{e}");
    let again = create(&fed, &host, "alice", "made1", "open").expect("the name is free");
    assert_eq!(again.last_seq, 1, "a new group, a new log");

    // After a restart the created groups serve; the deleted one stays gone.
    drop(host);
    let host = fed.host("c", &[]);
    let mut alice = host_client(&fed, &host, "alice");
    for name in ["alpha", "made1", "made2", "c1"] {
        alice
            .group(&g(name))
            .info()
            .expect("served after the restart");
    }
    let page = alice
        .group(&g("made1"))
        .get_messages(HistoryQuery::AfterSeq(0), None)
        .expect("history");
    assert_eq!(
        page.messages.len(),
        1,
        "only the new made1's join: {page:?}"
    );
}

/// A process stopped with `SIGSTOP` while this lives (`SIGCONT` on drop): it holds its
/// sockets and answers nothing.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        signal("-STOP", pid);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(which: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {which} {pid}");
}

/// A registry that does not answer (its process stopped) holds up a `create` alone: the
/// host's other groups answer sends while it waits, and after 2 s it gets `internal` with
/// nothing created (the name free for a retry). The create used to wait on the host's loop,
/// stalling every group of the host for those 2 s.
#[test]
fn a_silent_registry_delays_a_create_not_the_other_groups() {
    let fed = Federation::start("200ms");
    let creators = fed.user_key("alice");
    // A heartbeat of 5 s: the registrar gives up on a silent registry after that, so the
    // create's own 2 s bound is what answers it.
    let registry_key = fed.registry_key();
    let data = fed.node_data_dir("s");
    let host = Server::spawn(
        "group-node",
        &[
            "--host",
            "127.0.0.1:0",
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &registry_key,
            "--data-dir",
            &data,
            "--heartbeat",
            "5s",
            "--group",
            "alpha",
            "--creators",
            &creators,
        ],
        &fed.dir.path().join("host-s.log"),
    )
    .wait_listening(agora_tests::START_TIMEOUT);
    let mut bob = host_client(&fed, &host, "bob");
    bob.group(&g("alpha")).join().expect("join");

    let frozen = Frozen::new(fed.registry.pid());
    let (created, waited, sends, slowest) = std::thread::scope(|s| {
        let started = std::time::Instant::now();
        let creating = s.spawn(|| create(&fed, &host, "alice", "new1", "open"));
        let (mut sends, mut slowest) = (0u32, std::time::Duration::ZERO);
        while !creating.is_finished() {
            let at = std::time::Instant::now();
            bob.group(&g("alpha"))
                .send(body("while a create waits"))
                .expect("send");
            slowest = slowest.max(at.elapsed());
            sends += 1;
        }
        let created = creating.join().expect("the create's thread");
        (created, started.elapsed(), sends, slowest)
    });
    let e = created.expect_err("no registry answer: not created");
    assert_eq!(e.code, ErrorCode::Internal, "{e}");
    assert!(e.message.contains("nothing was created"), "{e}");
    assert_eq!(e.group, Some(g("new1")));
    assert!(
        waited >= std::time::Duration::from_millis(1900),
        "the create waited for the registry: {waited:?}"
    );
    assert!(
        sends >= 5,
        "alpha answered while the create waited: {sends} sends"
    );
    assert!(
        slowest < std::time::Duration::from_millis(1000),
        "no send waited for the create: slowest {slowest:?}"
    );
    let e = refusal(bob.group(&g("new1")).info());
    assert_eq!(e.code, ErrorCode::UnknownGroup, "{e}");

    // The registry answers again: the same name is created (it was left free).
    drop(frozen);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let made = loop {
        match create(&fed, &host, "alice", "new1", "open") {
            Ok(made) => break made,
            Err(e) if e.code == ErrorCode::Internal && std::time::Instant::now() < deadline => {}
            Err(e) => panic!("create after the registry came back: {e}"),
        }
    };
    assert_eq!(made.last_seq, 1);
    fed.join_when_listed("dave", "new1");
}

/// A host restarted with `--max-age` ages out a group nobody touches after the restart:
/// every group is due for its age sweep at start, loaded or not (sweeps used to run over
/// the groups loaded since the start only, so an idle group kept its old messages).
#[test]
fn a_restarted_host_ages_out_a_group_nobody_touches() {
    let fed = Federation::start("200ms");
    let host = fed.host("r", &["--group", "alpha", "--group", "idle"]);
    let mut alice = host_client(&fed, &host, "alice");
    alice.group(&g("idle")).join().expect("join");
    for i in 0..3 {
        alice
            .group(&g("idle"))
            .send(body(&format!("old {i}")))
            .expect("send");
    }
    let sent = std::time::Instant::now();
    drop(alice);
    drop(host);
    // The entries are older than --max-age 1s by the time the host is back.
    while sent.elapsed() < std::time::Duration::from_millis(1500) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let host = fed.host("r", &["--max-age", "1s"]);
    let log = fed.dir.path().join("host-r.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Nobody sends the host a request until its sweep deleted idle's four entries (its
    // gid is 2).
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("retention") && l.contains("gid=2") && l.contains("deleted=4"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no age sweep of the idle group after the restart; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut alice = host_client(&fed, &host, "alice");
    let page = alice
        .group(&g("idle"))
        .get_messages(HistoryQuery::AfterSeq(0), None)
        .expect("history");
    assert!(page.messages.is_empty(), "aged out: {page:?}");
}

/// After a restart the registry listed a host's groups with 0 members until each was used
/// (the registrar read counts only from loaded groups). Now the counts the store gives at
/// start are registered.
#[test]
fn a_restarted_host_registers_its_idle_groups_member_counts() {
    let fed = Federation::start("200ms");
    let host = fed.host("m", &["--group", "counted"]);
    for user in ["alice", "bob"] {
        host_client(&fed, &host, user)
            .group(&g("counted"))
            .join()
            .expect("join");
    }
    drop(host);
    // Restarted on another port: the entry shows the new endpoint once the new host
    // registered it, and then its count.
    let host = fed.host("m", &[]);
    let ctx = zmq::Context::new();
    let mut registry = agora_common::client::RegistryClient::new(
        &ctx,
        &fed.registry.endpoint,
        ClientOptions::default(),
    )
    .with_curve(fed.curve("carol", &fed.registry));
    let mut entry = None;
    let listed = agora_tests::wait_for(std::time::Duration::from_secs(10), || {
        entry = registry
            .list()
            .ok()
            .and_then(|l| l.into_iter().find(|e| e.name == g("counted")));
        entry
            .as_ref()
            .is_some_and(|e| e.endpoint.to_string() == host.endpoint && e.members == 2)
    });
    assert!(
        listed,
        "the registry should list counted at {} with 2 members: {entry:?}",
        host.endpoint
    );
}
