//! The attack suite, registry part (issue 22, findings 5, 7, 8, 17 and 18): each test
//! performs the attack against the real `registry` binary (and group nodes and user-cli
//! where the attack needs them) and checks that it is refused. Each would pass the attack
//! on the registry before the fix. They run on SQLite, and on PostgreSQL with
//! `AGORA_TEST_STORE=postgres`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use agora_common::client::{ClientError, ClientOptions, RegistryClient};
use agora_proto::id::MessageId;
use agora_proto::wire::{Endpoint, ErrorCode, GroupName, UserName};
use agora_tests::{wait_for, Federation, Server};
use serde_json::value::RawValue;

const WAIT: Duration = Duration::from_secs(20);

/// A library client of the federation's registry acting with `who`'s key pair (made on
/// first use, in the federation's key directory, shared with user-cli runs as `who`).
fn client(fed: &Federation, ctx: &zmq::Context, who: &str) -> RegistryClient {
    RegistryClient::new(ctx, &fed.registry.endpoint, ClientOptions::default())
        .with_curve(fed.curve(who, &fed.registry))
}

fn group(name: &str) -> GroupName {
    GroupName::new(name).expect("group name")
}

fn user(name: &str) -> UserName {
    UserName::new(name).expect("user name")
}

fn text(s: &str) -> Box<RawValue> {
    RawValue::from_string(serde_json::json!(s).to_string()).expect("json")
}

/// The wire code of a refused call.
fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Sends `body` from `from` to `to` until it is not `rate_limited` (the per-sender DM
/// rate refills within a second), within [`WAIT`].
fn send_past_the_rate(
    from: &mut RegistryClient,
    to: &UserName,
    body: &str,
) -> Result<agora_proto::wire::DmAck, ClientError> {
    let deadline = Instant::now() + WAIT;
    loop {
        match from.send_dm(to, text(body), MessageId::new_v7()) {
            Err(ClientError::Server(e))
                if e.code == ErrorCode::RateLimited && Instant::now() < deadline =>
            {
                let wait = e.retry_after_ms.unwrap_or(100).min(1000);
                std::thread::sleep(Duration::from_millis(wait));
            }
            other => return other,
        }
    }
}

/// Finding 5: `register` of a new name at another group's endpoint dropped that group's
/// entry ("one endpoint is one node"), so any CURVE key could take any group out of the
/// directory (30 of 30 lookups failed when repeated every 0.2 s). Now an entry is kept:
/// another key's registration at its endpoint never removes it, and one key may hold many
/// names at one endpoint (a group host).
#[test]
fn another_key_registering_at_a_groups_endpoint_does_not_remove_it() {
    let fed = Federation::start("200ms");
    let victim = fed.node("victim", "127.0.0.1:0", "victim", &[]);
    let ctx = zmq::Context::new();
    let mut looker = client(&fed, &ctx, "looker");
    assert!(
        wait_for(WAIT, || looker
            .lookup(&group("victim"))
            .is_ok_and(|g| g.endpoint.as_str() == victim.endpoint)),
        "the victim's group was never listed"
    );

    let attacker = fed.curve("attacker", &fed.registry);
    let attacker_key = attacker.keypair.public;
    let mut attacker = RegistryClient::new(&ctx, &fed.registry.endpoint, ClientOptions::default())
        .with_curve(attacker);
    let at_victim = Endpoint::new(victim.endpoint.clone()).expect("endpoint");
    let mut failed = 0;
    for round in 0..30 {
        let name = group(if round % 2 == 0 { "evil" } else { "evil too" });
        attacker
            .register(&name, &at_victim, 0, Some(attacker_key))
            .expect("a free name is the attacker's to register");
        match looker.lookup(&group("victim")) {
            Ok(g) if g.endpoint.as_str() == victim.endpoint => {}
            _ => failed += 1,
        }
    }
    assert_eq!(
        failed, 0,
        "lookups of the victim failed {failed} of 30 times"
    );
    // One key, two names, one endpoint: both are listed (the group host's case).
    let listed: Vec<String> = looker
        .list()
        .expect("list")
        .into_iter()
        .filter(|g| g.endpoint.as_str() == victim.endpoint)
        .map(|g| g.name.to_string())
        .collect();
    assert_eq!(listed, ["evil", "evil too", "victim"], "{listed:?}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Finding 7: a fresh `--data-dir` was 0755 with `registry.sqlite3`, `-wal` and `-shm` at
/// 0644, and any local user read DM bodies from the WAL. Now the directory is 0700 and every
/// file in it 0600 from creation (the public certificate `registry.key` aside, which is
/// public, in a directory no one else may enter); a looser existing one is tightened, with a
/// log line.
#[test]
fn the_registry_database_is_private_from_creation_and_a_loose_one_is_tightened() {
    let fed = Federation::start("200ms");
    for who in ["alice", "bob"] {
        let run = fed.cli(who, &["register", who], "");
        assert_eq!(run.code, Some(0), "{run:?}");
    }
    let run = fed.cli("alice", &["send_dm", "bob", "a secret"], "");
    assert_eq!(run.code, Some(0), "{run:?}");
    let data = fed.path("registry-data");
    let data = Path::new(&data);
    assert_eq!(mode(data), 0o700, "the data directory");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(data).expect("data dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let m = mode(&path);
        if name != "registry.key" {
            assert_eq!(m & 0o077, 0, "{name} is {m:o}");
        }
        files.push(format!("{name} {m:o}"));
    }
    if fed.store.is_none() {
        // The DM is in the WAL (not yet checkpointed), which SQLite created itself.
        for name in ["registry.sqlite3", "registry.sqlite3-wal"] {
            assert_eq!(mode(&data.join(name)), 0o600, "{name}: {files:?}");
        }
        // The WAL index is in the registry's memory (issue 23): no -shm file at all.
        let shm = data.join("registry.sqlite3-shm");
        assert!(!shm.exists(), "{}: {files:?}", shm.display());
    }
    eprintln!("data directory 700: {files:?}");

    // A directory and database left readable by an older registry are tightened.
    let loose = fed.path("loose-data");
    let loose = Path::new(&loose);
    std::fs::create_dir(loose).expect("mkdir");
    std::fs::set_permissions(loose, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let db = loose.join("registry.sqlite3");
    std::fs::write(&db, b"").expect("db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let old = Server::start(
        "registry",
        &[
            "--bind",
            "tcp://127.0.0.1:0",
            "--data-dir",
            loose.to_str().expect("utf-8"),
        ],
        Path::new(&fed.path("loose-registry.log")),
    );
    assert_eq!((mode(loose), mode(&db)), (0o700, 0o600));
    assert!(
        old.log().contains("tightened permissions of private data"),
        "{}",
        old.log()
    );
}

/// Finding 8: 1,000 `send_dm` in 0.5 s filled bob's mailbox, and every other sender then got
/// `limit_reached`. Now one sender holds at most its share of a mailbox (`--dm-share`, 10 %
/// of `--max-mailbox`: 100 of 1,000) and sends at most `--dm-rate` per second (10, bursts of
/// 100), so carol still reaches bob; and bob can block mallory (`user-cli block`), after
/// which her messages are refused with `blocked` and go to her dead letters, until he
/// unblocks her.
#[test]
fn one_account_cannot_fill_a_mailbox_and_a_user_can_block_a_sender() {
    let fed = Federation::start("200ms");
    let ctx = zmq::Context::new();
    let mut clients: Vec<RegistryClient> = ["mallory", "bob", "carol"]
        .iter()
        .map(|who| {
            let mut c = client(&fed, &ctx, who);
            c.user_register(&user(who)).expect("register");
            c
        })
        .collect();
    let mut carol = clients.pop().expect("carol");
    let mut bob = clients.pop().expect("bob");
    let mut mallory = clients.pop().expect("mallory");
    let to_bob = user("bob");

    let (mut stored, mut share_full, mut rate_limited) = (0, 0, 0);
    let started = Instant::now();
    for n in 0..1000 {
        match mallory.send_dm(&to_bob, text(&format!("flood {n}")), MessageId::new_v7()) {
            Ok(_) => stored += 1,
            Err(ClientError::Server(e)) if e.code == ErrorCode::ShareFull => share_full += 1,
            Err(ClientError::Server(e)) if e.code == ErrorCode::RateLimited => {
                assert!(e.retry_after_ms.is_some_and(|ms| ms >= 1), "{e}");
                rate_limited += 1
            }
            Err(e) => panic!("flood message {n}: unexpected {e}"),
        }
    }
    eprintln!(
        "1,000 DMs in {:?}: {stored} stored, {share_full} share_full, {rate_limited} rate_limited",
        started.elapsed()
    );
    assert!((1..=100).contains(&stored), "{stored} stored");
    assert_eq!(stored + share_full + rate_limited, 1000);

    // Another sender still gets through.
    let ack = carol
        .send_dm(&to_bob, text("hi bob"), MessageId::new_v7())
        .expect("carol's DM is stored");
    let mut from_mallory = 0;
    let mut after = 0;
    loop {
        let page = bob.mailbox(after, Some(1000)).expect("mailbox");
        from_mallory += page
            .messages
            .iter()
            .filter(|m| m.from.as_str() == "mallory")
            .count();
        if let Some(last) = page.messages.last() {
            after = last.n;
        }
        if !page.more {
            break;
        }
    }
    assert_eq!(from_mallory, stored);
    assert!(after >= ack.n);
    // Once bob reads his mail, mallory's share is free again.
    bob.ack_dm(after).expect("ack");

    // bob blocks mallory; her next message is refused, and in her dead letters.
    let run = fed.cli("bob", &["block", "mallory"], "");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("blocked mallory"), "{run:?}");
    let run = fed.cli("bob", &["--json", "blocked"], "");
    assert_eq!(run.code, Some(0), "{run:?}");
    let listed: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("json line");
    assert_eq!(listed["name"], "mallory", "{run:?}");
    assert_eq!(
        code(send_past_the_rate(&mut mallory, &to_bob, "let me in")),
        ErrorCode::Blocked
    );
    let dead = mallory.dead_letters().expect("dead letters");
    assert!(
        dead.iter()
            .any(|d| d.reason == "blocked" && d.body.get() == "\"let me in\""),
        "{dead:?}"
    );
    // user-cli says so (once mallory's rate allows her to ask).
    let mut last = None;
    let told = wait_for(WAIT, || {
        let run = fed.cli("mallory", &["send_dm", "bob", "still me"], "");
        let refused = run.code == Some(1) && run.stderr.contains("blocked: ");
        last = Some(run);
        refused
    });
    assert!(told, "{last:?}");
    // A multicast does not get around it either.
    let fanned = mallory.multicast(
        vec![to_bob.clone(), user("carol")],
        text("to all"),
        MessageId::new_v7(),
    );
    if let Ok(reply) = &fanned {
        assert!(
            reply
                .undelivered
                .iter()
                .any(|u| u.to == "bob" && u.reason == ErrorCode::Blocked),
            "{reply:?}"
        );
    } else {
        assert_eq!(code(fanned), ErrorCode::RateLimited);
    }
    // carol is not affected.
    carol
        .send_dm(&to_bob, text("still here"), MessageId::new_v7())
        .expect("carol is not blocked");

    // Unblocking restores delivery.
    let run = fed.cli("bob", &["unblock", "mallory"], "");
    assert_eq!(run.code, Some(0), "{run:?}");
    let run = fed.cli("bob", &["blocked"], "");
    assert!(run.stdout.contains("you block no one"), "{run:?}");
    send_past_the_rate(&mut mallory, &to_bob, "sorry").expect("delivered again");
}

/// Finding 17: names could be squatted cheaply and forever. Now a key owns at most
/// `--max-names-per-key` names (`too_many_names` past it), and a binding whose group has not
/// registered for `--name-lapse` is free for another key.
#[test]
fn name_claims_are_capped_per_key_and_a_silent_binding_lapses() {
    let fed = Federation::start_with("200ms", &["--max-names-per-key", "2", "--name-lapse", "2s"]);
    let ctx = zmq::Context::new();
    let squatter = fed.curve("squatter", &fed.registry);
    let squatter_key = squatter.keypair.public;
    let mut squatter = RegistryClient::new(&ctx, &fed.registry.endpoint, ClientOptions::default())
        .with_curve(squatter);
    let nowhere = Endpoint::new("tcp://127.0.0.1:9").expect("endpoint");
    for name in ["squat 1", "squat 2"] {
        squatter
            .register(&group(name), &nowhere, 0, Some(squatter_key))
            .expect("within the cap");
    }
    assert_eq!(
        code(squatter.register(&group("squat 3"), &nowhere, 0, Some(squatter_key))),
        ErrorCode::TooManyNames
    );

    // A group whose node stops: its name is held for the lapse, then free.
    let mut owner = fed.node("Lapsing", "127.0.0.1:0", "owner", &[]);
    let mut looker = client(&fed, &ctx, "looker");
    assert!(wait_for(WAIT, || looker
        .lookup(&group("Lapsing"))
        .is_ok_and(|g| g.endpoint.as_str() == owner.endpoint)));
    owner.kill9();
    let stopped = Instant::now();
    let intruder = fed.curve("intruder", &fed.registry);
    let intruder_key = intruder.keypair.public;
    let mut intruder = RegistryClient::new(&ctx, &fed.registry.endpoint, ClientOptions::default())
        .with_curve(intruder);
    let elsewhere = Endpoint::new("tcp://127.0.0.1:10").expect("endpoint");
    assert_eq!(
        code(intruder.register(&group("Lapsing"), &elsewhere, 0, Some(intruder_key))),
        ErrorCode::NameTaken,
        "held right after its group stopped"
    );
    assert!(wait_for(WAIT, || intruder
        .register(&group("Lapsing"), &elsewhere, 0, Some(intruder_key))
        .is_ok()));
    let freed = stopped.elapsed();
    eprintln!("the name was free {freed:?} after its node stopped (lapse 2 s)");
    // Not at once: the lapse runs from the group's last registration (recorded at most
    // every tenth of the lapse), which may precede the kill by a heartbeat or more.
    assert!(freed >= Duration::from_secs(1), "freed after {freed:?}");
    assert_eq!(
        looker.lookup(&group("Lapsing")).expect("lookup").endpoint,
        elsewhere
    );
    // The squatter's names lapsed too: they no longer count against its cap.
    squatter
        .register(&group("squat 3"), &nowhere, 0, Some(squatter_key))
        .expect("lapsed names no longer count");
}

/// Finding 18: `users` and `whois` answered any key, exposing every account's key and
/// presence. Now they need an account (`no_account`), and user-cli says to register.
#[test]
fn users_and_whois_need_an_account() {
    let fed = Federation::start("200ms");
    let run = fed.cli("alice", &["register", "alice"], "");
    assert_eq!(run.code, Some(0), "{run:?}");
    let ctx = zmq::Context::new();
    let mut stranger = client(&fed, &ctx, "stranger");
    assert_eq!(code(stranger.users()), ErrorCode::NoAccount);
    assert_eq!(code(stranger.whois(&user("alice"))), ErrorCode::NoAccount);
    assert_eq!(code(stranger.blocked()), ErrorCode::NoAccount);

    let run = fed.cli("stranger", &["users"], "");
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("user-cli register NAME"), "{run:?}");
    assert!(!run.stdout.contains("alice"), "{run:?}");
    let run = fed.cli("stranger", &["whois", "alice"], "");
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("user-cli register NAME"), "{run:?}");

    stranger.user_register(&user("stranger")).expect("register");
    let names: Vec<String> = stranger
        .users()
        .expect("users")
        .into_iter()
        .map(|u| u.name.to_string())
        .collect();
    assert_eq!(names, ["alice", "stranger"]);
    let run = fed.cli("stranger", &["whois", "alice"], "");
    assert_eq!(run.code, Some(0), "{run:?}");
}

/// One request over the gateway's WebSocket and its reply (events in between are skipped;
/// each read times out after 10 s).
fn ask(
    ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
    request: serde_json::Value,
) -> serde_json::Value {
    ws.send(tungstenite::Message::Text(request.to_string().into()))
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let message = match ws.read() {
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::Interrupted && Instant::now() < deadline =>
            {
                continue
            }
            other => other.expect("a reply within 10 s"),
        };
        if let tungstenite::Message::Text(t) = message {
            let value: serde_json::Value = serde_json::from_str(t.as_str()).expect("JSON");
            if value.get("event").is_none() {
                return value;
            }
        }
    }
}

/// Finding 8, in the page: bob blocks mallory from the people list of his personal gateway
/// (the `block` operation its *Block* button sends), and mallory's direct messages are
/// refused until he unblocks her.
#[test]
fn a_user_blocks_a_sender_from_the_web_page() {
    let fed = Federation::start("200ms");
    let ctx = zmq::Context::new();
    let mut mallory = client(&fed, &ctx, "mallory");
    mallory.user_register(&user("mallory")).expect("register");
    let web = fed.web_personal("bob");
    let base = web
        .endpoint
        .split_once("/?token=")
        .expect("a token URL")
        .0
        .to_owned();
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(5))
        .build();
    let signed_in = match agent.get(&web.endpoint).call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET the token URL: {e}"),
    };
    let cookie = signed_in
        .header("Set-Cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned();
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(
        format!("{}/ws", base.replacen("http://", "ws://", 1)).as_str(),
    )
    .expect("request");
    request
        .headers_mut()
        .insert("Cookie", cookie.parse().expect("header"));
    request
        .headers_mut()
        .insert("Origin", base.parse().expect("header"));
    let stream = std::net::TcpStream::connect(base.trim_start_matches("http://")).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut ws = tungstenite::client::client(request, stream)
        .expect("websocket")
        .0;

    let blocked = ask(
        &mut ws,
        serde_json::json!({"op": "block", "name": "mallory"}),
    );
    assert_eq!(
        (&blocked["ok"], &blocked["blocked"], &blocked["changed"]),
        (
            &serde_json::json!(true),
            &serde_json::json!(true),
            &serde_json::json!(true)
        ),
        "{blocked}"
    );
    let listed = ask(&mut ws, serde_json::json!({"op": "blocked"}));
    assert_eq!(listed["blocked"][0]["name"], "mallory", "{listed}");
    assert_eq!(
        code(mallory.send_dm(&user("bob"), text("hi bob"), MessageId::new_v7())),
        ErrorCode::Blocked
    );
    let unblocked = ask(
        &mut ws,
        serde_json::json!({"op": "unblock", "name": "mallory"}),
    );
    assert_eq!(unblocked["blocked"], false, "{unblocked}");
    mallory
        .send_dm(&user("bob"), text("hi again"), MessageId::new_v7())
        .expect("delivered once unblocked");
    // A name with no account is refused with the protocol's code.
    let nobody = ask(
        &mut ws,
        serde_json::json!({"op": "block", "name": "nobody"}),
    );
    assert_eq!(nobody["error"], "unknown_user", "{nobody}");
}
