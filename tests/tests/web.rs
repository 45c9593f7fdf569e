//! The web gateway (`agora-web`, personal mode) against the real registry and a node: the
//! token is exchanged once for a session cookie, nothing is served without it, the page
//! carries a CSP without inline scripts, and its WebSocket lists groups, sends and reads
//! history as the signed-in person.

use std::time::{Duration, Instant};

use agora_tests::{wait_for, web_csrf, Federation, Server};

/// Follows no redirect: the cookie comes with the redirect.
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(5))
        .build()
}

fn get(url: &str, cookie: Option<&str>) -> ureq::Response {
    let mut request = agent().get(url);
    if let Some(c) = cookie {
        request = request.set("Cookie", c);
    }
    match request.call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    }
}

#[test]
fn the_token_opens_a_session_and_the_websocket_chats_as_its_user() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    fed.join_when_listed("alice", "Cool Group");
    let web = fed.web_personal_with("alice", &[]);
    let url = web.endpoint.clone();
    let (base, token) = url.split_once("/?token=").expect("a URL with a token");
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "32 random bytes in hex: {token}"
    );

    // Nothing without a session.
    for path in ["/", "/app.js", "/app.css", "/ws"] {
        assert_eq!(get(&format!("{base}{path}"), None).status(), 401, "{path}");
    }
    assert_eq!(get(&format!("{base}/?token=wrong"), None).status(), 401);

    // The token, once: a session cookie and a redirect to the page.
    let signed_in = get(&url, None);
    assert!(
        (300..400).contains(&signed_in.status()),
        "{}",
        signed_in.status()
    );
    let set_cookie = signed_in.header("Set-Cookie").expect("a cookie").to_owned();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().expect("name=value").to_owned();
    assert_eq!(get(&url, None).status(), 401, "the token is spent");

    let page = get(&format!("{base}/"), Some(&cookie));
    assert_eq!(page.status(), 200);
    let csp = page
        .header("Content-Security-Policy")
        .expect("a CSP")
        .to_owned();
    let directive = |name: &str| {
        csp.split(';')
            .map(str::trim)
            .find(|d| d.starts_with(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(directive("script-src"), "script-src 'self'", "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let html = page.into_string().expect("html");
    assert!(
        html.contains(r#"<script src="/app.js"></script>"#),
        "{html}"
    );
    assert_eq!(get(&format!("{base}/app.js"), Some(&cookie)).status(), 200);

    // The WebSocket, as alice: the group list, a send acked with its seq, then history.
    let mut ws = websocket(base, &cookie);
    // Replies come in order; pushed events may come between them and are kept aside.
    let mut events: Vec<serde_json::Value> = Vec::new();
    let call = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
                events: &mut Vec<serde_json::Value>,
                request: serde_json::Value| {
        ws.send(tungstenite::Message::Text(request.to_string().into()))
            .expect("send");
        loop {
            let message = read_json(ws);
            if message.get("event").is_some() {
                events.push(message);
            } else {
                return message;
            }
        }
    };
    let groups = call(&mut ws, &mut events, serde_json::json!({"op": "groups"}));
    assert_eq!(groups["ok"], true, "{groups}");
    assert_eq!(groups["groups"][0]["name"], "Cool Group", "{groups}");
    // Membership: leave, then a send is refused as not_member, then join again.
    let left = call(
        &mut ws,
        &mut events,
        serde_json::json!({"op": "leave", "group": "Cool Group"}),
    );
    assert_eq!(left["membership"]["changed"], true, "{left}");
    let refused = call(
        &mut ws,
        &mut events,
        serde_json::json!({"op": "send", "group": "Cool Group", "text": "not a member"}),
    );
    assert_eq!(refused["error"], "not_member", "{refused}");
    let joined = call(
        &mut ws,
        &mut events,
        serde_json::json!({"op": "join", "group": "Cool Group"}),
    );
    assert_eq!(joined["membership"]["changed"], true, "{joined}");
    let xss = "<img src=x onerror=alert(1)>";
    let sent = call(
        &mut ws,
        &mut events,
        serde_json::json!({"op": "send", "group": "Cool Group", "text": xss}),
    );
    assert_eq!(sent["ok"], true, "{sent}");
    let seq = sent["ack"]["seq"].as_u64().expect("a seq");
    let history = call(
        &mut ws,
        &mut events,
        serde_json::json!({"op": "history", "group": "Cool Group"}),
    );
    let last = history["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (last["seq"].as_u64(), last["sender"].as_str()),
        (Some(seq), Some("alice"))
    );
    assert_eq!(last["body"], xss, "stored as text");
    // A bad message gets an error and the session goes on.
    let bad = call(&mut ws, &mut events, serde_json::json!({"op": "fly"}));
    assert_eq!(
        (bad["ok"].as_bool(), bad["error"].as_str()),
        (Some(false), Some("invalid_json"))
    );
    let again = call(&mut ws, &mut events, serde_json::json!({"op": "groups"}));
    assert_eq!(again["ok"], true, "{again}");
    // user-cli sees what the gateway sent.
    let shown = fed.cli("alice", &["messages", "Cool Group"], "");
    assert!(
        shown.stdout.contains(&format!("#{seq} alice: {xss}")),
        "{shown:?}"
    );

    // Following live from seq 0: the log so far, then what user-cli sends, each entry once
    // and in seq order.
    let followed = call(
        &mut ws,
        &mut events,
        serde_json::json!({"op": "follow", "group": "Cool Group", "after_seq": 0}),
    );
    assert_eq!(followed["ok"], true, "{followed}");
    let sent = fed.cli("alice", &["send", "Cool Group", "from the cli"], "");
    assert_eq!(sent.code, Some(0), "{sent:?}");
    let entries = |events: &[serde_json::Value]| -> Vec<(u64, serde_json::Value)> {
        events
            .iter()
            .filter(|e| e["event"] == "entry")
            .map(|e| {
                (
                    e["entry"]["seq"].as_u64().unwrap_or(0),
                    e["entry"]["body"].clone(),
                )
            })
            .collect()
    };
    while !entries(&events)
        .iter()
        .any(|(_, body)| body == "from the cli")
    {
        let message = read_json(&mut ws);
        events.push(message);
    }
    let seqs: Vec<u64> = entries(&events).iter().map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (1..=seq + 1).collect();
    assert_eq!(seqs, expected, "every entry once, in order: {events:?}");
}

/// A WebSocket to `base` (http://…) with `cookie`; 10 s read timeout.
fn websocket(base: &str, cookie: &str) -> tungstenite::WebSocket<std::net::TcpStream> {
    let ws_url = format!("{}/ws", base.replacen("http://", "ws://", 1));
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(ws_url.as_str())
        .expect("request");
    request
        .headers_mut()
        .insert("Cookie", cookie.parse().expect("header"));
    // The gateway's own page opens it: its origin.
    request
        .headers_mut()
        .insert("Origin", base.parse().expect("header"));
    let stream = std::net::TcpStream::connect(base.trim_start_matches("http://")).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    tungstenite::client::client(request, stream)
        .expect("websocket")
        .0
}

/// One request and its reply (events in between are skipped).
fn ask(
    ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
    request: serde_json::Value,
) -> serde_json::Value {
    ws.send(tungstenite::Message::Text(request.to_string().into()))
        .expect("send");
    loop {
        let message = read_json(ws);
        if message.get("event").is_none() {
            return message;
        }
    }
}

/// Posts the sign-in page's form as a browser does: from the gateway's origin, with the form
/// token the page sets (its cookie and its hidden field).
fn post_form(agent: &ureq::Agent, url: &str, fields: &[(&str, &str)]) -> ureq::Response {
    let (origin, _) = url
        .split_once("://")
        .and_then(|(scheme, rest)| {
            let authority = rest.split('/').next()?;
            Some((format!("{scheme}://{authority}"), ()))
        })
        .expect("a URL");
    let page = match agent.get(&format!("{origin}/")).call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {origin}/: {e}"),
    };
    let set_form_cookie = page
        .all("Set-Cookie")
        .into_iter()
        .find(|c| c.starts_with("agora_form="))
        .expect("the sign-in page sets its form token")
        .to_owned();
    assert_eq!(
        set_form_cookie.ends_with("; Secure"),
        origin.starts_with("https://"),
        "the form token's cookie is Secure exactly over TLS: {set_form_cookie}"
    );
    let form_cookie = set_form_cookie
        .split(';')
        .next()
        .expect("name=value")
        .to_owned();
    let token = web_csrf(&page.into_string().expect("page")).expect("a form token");
    let mut fields = fields.to_vec();
    fields.push(("csrf", &token));
    match agent
        .post(url)
        .set("Origin", &origin)
        .set("Cookie", &form_cookie)
        .send_form(&fields)
    {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    }
}

/// The session's CSRF token, from the page it is served.
fn page_csrf(base: &str, cookie: &str) -> String {
    web_csrf(
        &get(&format!("{base}/"), Some(cookie))
            .into_string()
            .expect("page"),
    )
    .expect("the page carries the session's token")
}

fn session_cookie(response: &ureq::Response) -> String {
    let set_cookie = response.header("Set-Cookie").expect("a cookie").to_owned();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    set_cookie.split(';').next().expect("name=value").to_owned()
}

#[test]
fn hosted_mode_signs_in_by_password_over_tls_and_refuses_wrong_ones_and_floods() {
    let fed = Federation::start("200ms");
    let data = fed.dir.path().join("web-data");
    let data = data.to_str().expect("utf-8");
    let made = std::process::Command::new(agora_tests::bin("agora-web"))
        .args(["add-user", "alice", "--data-dir", data])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(b"correct horse\n")?;
            child.wait_with_output()
        })
        .expect("add-user");
    assert!(made.status.success(), "{made:?}");
    let secret = std::fs::metadata(fed.dir.path().join("web-data/keys/alice.key_secret"))
        .expect("the account's secret key");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&secret.permissions()) & 0o777,
        0o600
    );

    // A self-signed certificate for 127.0.0.1.
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let (cert_path, key_path) = (
        fed.dir.path().join("cert.pem"),
        fed.dir.path().join("key.pem"),
    );
    std::fs::write(&cert_path, cert.cert.pem()).expect("cert");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("key");
    let registry_key = fed.registry_key();
    let web = Server::start(
        "agora-web",
        &[
            "--hosted",
            "--data-dir",
            data,
            "--bind",
            "127.0.0.1:0",
            "--tls-cert",
            cert_path.to_str().expect("utf-8"),
            "--tls-key",
            key_path.to_str().expect("utf-8"),
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &registry_key,
        ],
        &fed.dir.path().join("web.log"),
    );
    let base = web.endpoint.trim_end_matches('/').to_owned();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(10))
        .tls_config(std::sync::Arc::new(tls))
        .build();
    let fetch = |path: &str, cookie: Option<&str>| {
        let mut request = agent.get(&format!("{base}{path}"));
        if let Some(c) = cookie {
            request = request.set("Cookie", c);
        }
        match request.call() {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {path}: {e}"),
        }
    };

    // Signed out: the sign-in form, and nothing else.
    let form = fetch("/", None);
    assert_eq!(form.status(), 200);
    let html = form.into_string().expect("html");
    assert!(html.contains(r#"<form id="signin""#), "{html}");
    assert!(!html.contains("/signup"), "sign-up is closed: {html}");
    for path in ["/app.js", "/ws", "/files/g/1"] {
        assert_eq!(fetch(path, None).status(), 401, "{path}");
    }

    // A wrong password is refused; the right one opens a Secure session.
    let refused = post_form(
        &agent,
        &format!("{base}/signin"),
        &[("name", "alice"), ("password", "wrong horse")],
    );
    assert_eq!(refused.status(), 401);
    assert!(
        !refused
            .all("Set-Cookie")
            .iter()
            .any(|c| c.starts_with("agora_session=")),
        "no session"
    );
    assert!(refused
        .into_string()
        .expect("page")
        .contains("Wrong name or password."));
    let unknown = post_form(
        &agent,
        &format!("{base}/signin"),
        &[("name", "mallory"), ("password", "correct horse")],
    );
    assert_eq!(unknown.status(), 401, "an unknown name is refused alike");
    let signed_in = post_form(
        &agent,
        &format!("{base}/signin"),
        &[("name", "alice"), ("password", "correct horse")],
    );
    assert_eq!(signed_in.status(), 303);
    assert!(
        signed_in
            .header("Set-Cookie")
            .is_some_and(|c| c.contains("; Secure")),
        "{:?}",
        signed_in.header("Set-Cookie")
    );
    let cookie = session_cookie(&signed_in);
    let page = fetch("/", Some(&cookie));
    assert!(page
        .into_string()
        .expect("html")
        .contains(r#"<script src="/app.js"></script>"#));
    // The sign-in registered the account's key with the registry.
    // (whois needs an account of one's own.)
    let registered = fed.cli("carol", &["register", "carol"], "");
    assert_eq!(registered.code, Some(0), "{registered:?}");
    let whois = fed.cli("carol", &["whois", "alice"], "");
    assert_eq!(whois.code, Some(0), "{whois:?}");

    // A flood of guesses: past the burst (5 per address and per name) the answer is 429,
    // even for the right password.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            post_form(
                &agent,
                &format!("{base}/signin"),
                &[("name", "alice"), ("password", "guess guess")],
            )
            .status(),
        );
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let limited = post_form(
        &agent,
        &format!("{base}/signin"),
        &[("name", "alice"), ("password", "correct horse")],
    );
    assert_eq!(limited.status(), 429);

    // Signing out ends the session.
    let page = fetch("/", Some(&cookie)).into_string().expect("page");
    let csrf = web_csrf(&page).expect("the session's token");
    let out = match agent
        .post(&format!("{base}/signout"))
        .set("Cookie", &cookie)
        .set("Origin", &base)
        .set("X-Agora-CSRF", &csrf)
        .call()
    {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("signout: {e}"),
    };
    assert_eq!(out.status(), 303);
    assert_eq!(fetch("/app.js", Some(&cookie)).status(), 401);
}

#[test]
fn hosted_mode_with_open_signup_makes_an_account_that_chats_as_itself() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Open Group", "127.0.0.1:0", "open", &[]);
    let data = fed.dir.path().join("web-data");
    let registry_key = fed.registry_key();
    // Beyond loopback, plain HTTP needs --insecure-http.
    let refused = std::process::Command::new(agora_tests::bin("agora-web"))
        .args([
            "--hosted",
            "--bind",
            "0.0.0.0:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--registry-key",
            &registry_key,
        ])
        .output()
        .expect("agora-web");
    assert_eq!(refused.status.code(), Some(2), "a usage error: {refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--insecure-http"),
        "{refused:?}"
    );
    assert!(!data.exists(), "nothing is made for a refused start");
    // Personal mode serves loopback only, and needs whose key: usage errors too.
    for args in [
        &["--user", "alice", "--bind", "0.0.0.0:0"][..],
        &["--bind", "127.0.0.1:0"][..],
    ] {
        let refused = std::process::Command::new(agora_tests::bin("agora-web"))
            .args(args)
            .args(["--registry-key", &registry_key])
            .output()
            .expect("agora-web");
        assert_eq!(refused.status.code(), Some(2), "{args:?}: {refused:?}");
    }

    let web = Server::start(
        "agora-web",
        &[
            "--hosted",
            "--open-signup",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--bind",
            "127.0.0.1:0",
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &registry_key,
        ],
        &fed.dir.path().join("web.log"),
    );
    let base = web.endpoint.trim_end_matches('/').to_owned();
    let form = get(&format!("{base}/"), None).into_string().expect("html");
    assert!(form.contains(r#"formaction="/signup""#), "{form}");
    let short = post_form(
        &agent(),
        &format!("{base}/signup"),
        &[("name", "bob"), ("password", "short")],
    );
    assert_eq!(short.status(), 400);
    let made = post_form(
        &agent(),
        &format!("{base}/signup"),
        &[("name", "bob"), ("password", "bob's long password")],
    );
    assert_eq!(made.status(), 303);
    let cookie = session_cookie(&made);
    let taken = post_form(
        &agent(),
        &format!("{base}/signup"),
        &[("name", "bob"), ("password", "another long one")],
    );
    assert_eq!(taken.status(), 409);

    // The new account acts as itself: joins, sends, and user-cli sees bob's message.
    let mut ws = websocket(&base, &cookie);
    let who = ask(&mut ws, serde_json::json!({"op": "whoami"}));
    assert_eq!(
        (who["user"].as_str(), who["hosted"].as_bool()),
        (Some("bob"), Some(true))
    );
    let joined = ask(
        &mut ws,
        serde_json::json!({"op": "join", "group": "Open Group"}),
    );
    assert_eq!(joined["ok"], true, "{joined}");
    let sent = ask(
        &mut ws,
        serde_json::json!({"op": "send", "group": "Open Group", "text": "hello from bob"}),
    );
    assert_eq!(sent["ok"], true, "{sent}");
    fed.join_when_listed("carol", "Open Group");
    let shown = fed.cli("carol", &["messages", "Open Group"], "");
    assert!(shown.stdout.contains("bob: hello from bob"), "{shown:?}");
}

/// A personal-mode gateway for `user`, signed in: (gateway, base URL, session cookie).
fn personal(fed: &Federation, user: &str, extra: &[&str]) -> (Server, String, String) {
    let web = fed.web_personal_with(user, extra);
    let url = web.endpoint.clone();
    let base = url.split_once("/?token=").expect("a token").0.to_owned();
    let cookie = session_cookie(&get(&url, None));
    (web, base, cookie)
}

#[test]
fn the_websocket_pages_back_through_history_and_carries_direct_messages_and_presence() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Paged", "127.0.0.1:0", "paged", &[]);
    fed.join_when_listed("alice", "Paged");
    fed.join_when_listed("bob", "Paged");
    for user in ["alice", "bob"] {
        let registered = fed.cli(user, &["register", user], "");
        assert_eq!(registered.code, Some(0), "{registered:?}");
    }
    let (_web, base, cookie) = personal(&fed, "alice", &[]);
    let mut ws = websocket(&base, &cookie);
    for i in 1..=25 {
        let sent = ask(
            &mut ws,
            serde_json::json!({"op": "send", "group": "Paged", "text": format!("m{i}")}),
        );
        assert_eq!(sent["ok"], true, "{sent}");
    }
    let seqs = |reply: &serde_json::Value| -> Vec<u64> {
        reply["messages"]
            .as_array()
            .map(|m| m.iter().filter_map(|e| e["seq"].as_u64()).collect())
            .unwrap_or_default()
    };
    // The newest page, then the pages before it, down to seq 1.
    let newest = ask(
        &mut ws,
        serde_json::json!({"op": "history", "group": "Paged", "limit": 10}),
    );
    let mut shown = seqs(&newest);
    assert_eq!(shown.len(), 10, "{newest}");
    while shown[0] > 1 {
        let page = ask(
            &mut ws,
            serde_json::json!({"op": "history", "group": "Paged", "before_seq": shown[0], "limit": 10}),
        );
        let mut older = seqs(&page);
        assert!(!older.is_empty() && older.len() <= 10, "{page}");
        older.extend(shown);
        shown = older;
    }
    let last = *shown.last().expect("seqs");
    assert_eq!(
        shown,
        (1..=last).collect::<Vec<u64>>(),
        "every seq once, in order"
    );

    // Direct messages: bob's to alice, sent while her page was not online, is in the
    // mailbox; one sent after she went online is pushed; read ones leave the mailbox.
    let before = fed.cli("bob", &["send_dm", "alice", "while you were out"], "");
    assert_eq!(before.code, Some(0), "{before:?}");
    let inbox = ask(&mut ws, serde_json::json!({"op": "inbox"}));
    let mailbox = inbox["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(mailbox.len(), 1, "{inbox}");
    assert_eq!(
        (mailbox[0]["from"].as_str(), mailbox[0]["body"].as_str()),
        (Some("bob"), Some("while you were out"))
    );
    let users = ask(&mut ws, serde_json::json!({"op": "users"}));
    let presence = |users: &serde_json::Value, name: &str| {
        users["users"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["name"] == name).cloned())
            .map(|u| u["presence"].clone())
    };
    assert_eq!(
        presence(&users, "alice"),
        Some(serde_json::json!("online")),
        "{users}"
    );
    let live = fed.cli("bob", &["send_dm", "alice", "now live"], "");
    assert_eq!(live.code, Some(0), "{live:?}");
    let pushed = loop {
        let message = read_json(&mut ws);
        if message["event"] == "dm" {
            break message;
        }
    };
    assert_eq!(pushed["dm"]["body"], "now live", "{pushed}");
    let n = pushed["dm"]["n"].as_u64().expect("n");
    let read = ask(&mut ws, serde_json::json!({"op": "dm_read", "up_to": n}));
    assert_eq!(read["acked"]["removed"], 2, "{read}");
    let empty = ask(&mut ws, serde_json::json!({"op": "inbox"}));
    assert_eq!(empty["messages"], serde_json::json!([]), "{empty}");
    // alice answers; bob's mailbox holds it.
    let answered = ask(
        &mut ws,
        serde_json::json!({"op": "dm", "to": "bob", "text": "hi bob"}),
    );
    assert_eq!(answered["ok"], true, "{answered}");
    let bobs = fed.cli("bob", &["check"], "");
    assert!(bobs.stdout.contains("hi bob"), "{bobs:?}");
    let unknown = ask(
        &mut ws,
        serde_json::json!({"op": "dm", "to": "nobody", "text": "?"}),
    );
    assert_eq!(unknown["error"], "unknown_user", "{unknown}");
}

#[test]
fn attachments_go_up_and_come_back_byte_for_byte_and_only_raster_images_are_inline() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Files", "127.0.0.1:0", "files", &[]);
    fed.join_when_listed("alice", "Files");
    let (_web, base, cookie) = personal(&fed, "alice", &["--max-upload-bytes", "4000000"]);
    // 3 MiB and a bit: several chunks and a short last one.
    let data: Vec<u8> = (0..(3 << 20) + 12_345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let csrf = page_csrf(&base, &cookie);
    let upload = |name: &str, media_type: &str, bytes: &[u8], cookie: Option<&str>| {
        let mut request = agent()
            .post(&format!("{base}/files/Files"))
            .set("Origin", &base)
            .set("X-Agora-CSRF", &csrf)
            .query("name", name)
            .query("type", media_type)
            .query("caption", "see attached");
        if let Some(c) = cookie {
            request = request.set("Cookie", c);
        }
        match request.send_bytes(bytes) {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("upload: {e}"),
        }
    };
    assert_eq!(
        upload("x.bin", "application/octet-stream", b"x", None).status(),
        401
    );
    let stored = upload("data.bin", "application/octet-stream", &data, Some(&cookie));
    assert_eq!(stored.status(), 200);
    let stored: serde_json::Value =
        serde_json::from_str(&stored.into_string().expect("body")).expect("JSON");
    let seq = stored["ack"]["seq"].as_u64().expect("a seq");
    let png = b"\x89PNG\r\n\x1a\nnot really a picture";
    let picture: serde_json::Value = serde_json::from_str(
        &upload("pic.png", "image/png", png, Some(&cookie))
            .into_string()
            .expect("body"),
    )
    .expect("JSON");
    let svg = b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>";
    let drawing: serde_json::Value = serde_json::from_str(
        &upload("x.svg", "image/svg+xml", svg, Some(&cookie))
            .into_string()
            .expect("body"),
    )
    .expect("JSON");
    // Past --max-upload-bytes: refused from the headers, before a byte is spooled.
    let mut raw =
        std::net::TcpStream::connect(base.trim_start_matches("http://")).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    std::io::Write::write_all(
        &mut raw,
        format!(
            "POST /files/Files?name=huge.bin HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\
             Origin: http://x\r\nX-Agora-CSRF: {csrf}\r\nContent-Length: 4000001\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut raw, &mut head).expect("a status line within 10 s");
    assert_eq!(&head, b"HTTP/1.1 413", "past --max-upload-bytes");
    let bad = upload("a/b", "text/plain", b"x", Some(&cookie));
    assert_eq!(bad.status(), 400);
    assert!(bad.into_string().expect("body").contains("invalid_field"));

    // user-cli sees the file message and gets the same bytes.
    let shown = fed.cli("alice", &["messages", "Files"], "");
    assert!(
        shown.stdout.contains("[file data.bin, 3.0 MiB"),
        "{shown:?}"
    );

    let download = |seq: u64| match agent()
        .get(&format!("{base}/files/Files/{seq}"))
        .set("Cookie", &cookie)
        .call()
    {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("download: {e}"),
    };
    let got = download(seq);
    assert_eq!(got.status(), 200);
    assert_eq!(got.header("Content-Type"), Some("application/octet-stream"));
    assert!(got
        .header("Content-Disposition")
        .is_some_and(|d| d.starts_with("attachment") && d.contains("data.bin")));
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut got.into_reader(), &mut bytes).expect("body");
    assert!(bytes == data, "byte for byte ({} bytes)", bytes.len());
    let inline = download(picture["ack"]["seq"].as_u64().expect("seq"));
    assert_eq!(inline.header("Content-Type"), Some("image/png"));
    // A page on another port is same site and has the cookie: its <img src> of a file must
    // not load (nor tell a file's size by it).
    assert_eq!(
        inline.header("Cross-Origin-Resource-Policy"),
        Some("same-origin")
    );
    assert!(inline
        .header("Content-Disposition")
        .is_some_and(|d| d.starts_with("inline")));
    let script = download(drawing["ack"]["seq"].as_u64().expect("seq"));
    assert_eq!(
        script.header("Content-Type"),
        Some("application/octet-stream"),
        "an SVG can carry script: never inline"
    );
    assert!(script
        .header("Content-Disposition")
        .is_some_and(|d| d.starts_with("attachment")));
    assert_eq!(download(1).status(), 404, "a join entry carries no file");
    assert_eq!(download(999).status(), 404);
}

#[test]
fn an_oversized_websocket_message_gets_an_error_and_never_touches_other_sessions() {
    let fed = Federation::start("200ms");
    let (_web, base, cookie) = personal(&fed, "alice", &[]);
    let mut other = websocket(&base, &cookie);
    let mut ws = websocket(&base, &cookie);
    // Over 64 KiB: a too_large reply, and the session goes on.
    let big = serde_json::json!({"op": "send", "group": "g", "text": "x".repeat(100 << 10)});
    let refused = ask(&mut ws, big);
    assert_eq!(refused["error"], "too_large", "{refused}");
    let again = ask(&mut ws, serde_json::json!({"op": "whoami"}));
    assert_eq!(again["user"], "alice", "{again}");
    // Past the 1 MiB read limit: closed with 1009, this session only.
    ws.send(tungstenite::Message::Text("y".repeat(2 << 20).into()))
        .expect("send");
    let closed = loop {
        match read_message(&mut ws) {
            Ok(tungstenite::Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("a close frame, not {e}"),
        }
    };
    assert_eq!(
        closed.map(|f| u16::from(f.code)),
        Some(1009),
        "message too big"
    );
    let fine = ask(&mut other, serde_json::json!({"op": "whoami"}));
    assert_eq!(fine["ok"], true, "{fine}");
}

#[test]
fn a_page_that_stops_reading_loses_nothing_and_slows_no_one() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Busy", "127.0.0.1:0", "busy", &[]);
    fed.join_when_listed("alice", "Busy");
    let (_web, base, cookie) = personal(&fed, "alice", &[]);
    // Two pages of one person follow from seq 0; `slow` then reads nothing while more
    // entries are sent than its queues hold: 256 events, 1,024 in the group's channel, and
    // the sockets' buffers (2,500 entries of 16 KiB are 39 MiB, well past them).
    let mut slow = websocket(&base, &cookie);
    let mut quick = websocket(&base, &cookie);
    for ws in [&mut slow, &mut quick] {
        let followed = ask(
            ws,
            serde_json::json!({"op": "follow", "group": "Busy", "after_seq": 0}),
        );
        assert_eq!(followed["ok"], true, "{followed}");
    }
    let total = 2500u64;
    let mut seen_quick = Vec::new();
    for i in 0..total {
        quick
            .send(tungstenite::Message::Text(
                serde_json::json!({"op": "send", "group": "Busy", "text": format!("{i:>16384}")})
                    .to_string()
                    .into(),
            ))
            .expect("send");
        // The quick page reads its acks and entries as they come.
        loop {
            let message = read_json(&mut quick);
            if message["event"] == "entry" {
                seen_quick.push(message["entry"]["seq"].as_u64().unwrap_or(0));
            } else if message.get("event").is_none() {
                assert_eq!(message["ok"], true, "{message}");
                break;
            }
        }
    }
    let last = 1 + total; // the join, then the messages
    while seen_quick.last() != Some(&last) {
        let message = read_json(&mut quick);
        if message["event"] == "entry" {
            seen_quick.push(message["entry"]["seq"].as_u64().unwrap_or(0));
        }
    }
    assert_eq!(
        seen_quick,
        (1..=last).collect::<Vec<u64>>(),
        "the quick page"
    );
    // The slow page reads now: every seq once, in order, the gap read back from the log.
    let mut seen_slow = Vec::new();
    let mut from_log = 0;
    while seen_slow.last() != Some(&last) {
        let message = read_json(&mut slow);
        if message["event"] == "entry" {
            seen_slow.push(message["entry"]["seq"].as_u64().unwrap_or(0));
            if message["live"] == false {
                from_log += 1;
            }
        }
    }
    assert_eq!(seen_slow, (1..=last).collect::<Vec<u64>>(), "the slow page");
    assert!(
        from_log > 1,
        "the lag was read back from the log ({from_log} entries)"
    );
}

/// The next JSON message (10 s read timeout).
fn read_json(ws: &mut tungstenite::WebSocket<std::net::TcpStream>) -> serde_json::Value {
    loop {
        if let tungstenite::Message::Text(t) = read_message(ws).expect("a message within 10 s") {
            return serde_json::from_str(t.as_str()).expect("JSON");
        }
    }
}

/// The next WebSocket message, within 10 s. A read interrupted by a signal (`EINTR`: a read
/// with `SO_RCVTIMEO` is never restarted, and the test process has children exiting) is
/// read again, as tungstenite keeps what it had buffered.
fn read_message(
    ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
) -> tungstenite::Result<tungstenite::Message> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ws.read() {
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::Interrupted && Instant::now() < deadline => {}
            other => return other,
        }
    }
}

#[test]
fn the_page_rides_through_a_failover_of_its_group() {
    let fed = Federation::start("200ms");
    let (_cluster, store) = fed.shared_store();
    let mut active = fed.node("Moving", "127.0.0.1:0", "a", &["--store", &store]);
    fed.share_node_keys("a", "b");
    let standby = fed.spawn_node("Moving", "127.0.0.1:0", "b", &["--store", &store]);
    assert!(wait_for(Duration::from_secs(20), || standby
        .log()
        .contains("waiting for it")));
    fed.join_when_listed("alice", "Moving");
    let (_web, base, cookie) = personal(&fed, "alice", &[]);
    let mut ws = websocket(&base, &cookie);
    ask(
        &mut ws,
        serde_json::json!({"op": "follow", "group": "Moving", "after_seq": 0}),
    );
    // Entries pushed while a reply is awaited are kept.
    let mut seen = Vec::new();
    let mut ask = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
                   request: serde_json::Value| {
        ws.send(tungstenite::Message::Text(request.to_string().into()))
            .expect("send");
        loop {
            let message = read_json(ws);
            if message["event"] == "entry" {
                seen.push(message["entry"]["seq"].as_u64().unwrap_or(0));
            } else if message.get("event").is_none() {
                return message;
            }
        }
    };
    let sent = ask(
        &mut ws,
        serde_json::json!({"op": "send", "group": "Moving", "text": "before"}),
    );
    assert_eq!(sent["ack"]["seq"], 2, "{sent}");

    active.kill9();
    // The gateway's first attempt goes unanswered; it looks the group up again and sends
    // the same message to the node that took over.
    let after = ask(
        &mut ws,
        serde_json::json!({"op": "send", "group": "Moving", "text": "after"}),
    );
    assert_eq!(after["ack"]["seq"], 3, "{after}");
    let _new_active = standby.wait_listening(Duration::from_secs(10));

    // The page's live stream moved too: every entry once, in order.
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.last() != Some(&3) {
        assert!(Instant::now() < deadline, "entries so far: {seen:?}");
        let message = read_json(&mut ws);
        if message["event"] == "entry" {
            seen.push(message["entry"]["seq"].as_u64().unwrap_or(0));
        }
    }
    assert_eq!(seen, vec![1, 2, 3]);
}

/// Issue 24: a page following five groups of one group host, and sending to each, reaches
/// that host over two connections whatever the number of groups: the identity's live feed
/// (one DEALER) and the session's requests (one REQ); before, three per group.
#[test]
fn a_page_of_five_groups_on_one_host_reaches_it_over_two_connections() {
    let fed = Federation::start("200ms");
    let names: Vec<String> = (1..=5).map(|i| format!("Room {i}")).collect();
    let mut args: Vec<&str> = Vec::new();
    for name in &names {
        args.extend(["--group", name.as_str()]);
    }
    let host = fed.host("host", &args);
    for name in &names {
        fed.join_when_listed("alice", name);
    }
    let (_web, base, cookie) = personal(&fed, "alice", &[]);
    let mut ws = websocket(&base, &cookie);
    for name in &names {
        let followed = ask(
            &mut ws,
            serde_json::json!({"op": "follow", "group": name, "after_seq": 0}),
        );
        assert_eq!(followed["ok"], true, "{followed}");
    }
    // Sent without waiting for each ack (`ask` would skip the entries coming meanwhile).
    for name in &names {
        let send =
            serde_json::json!({"op": "send", "group": name, "text": format!("hello {name}")});
        ws.send(tungstenite::Message::Text(send.to_string().into()))
            .expect("send");
    }
    // Each group's message comes back live, to its group.
    let mut heard: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while heard.len() < names.len() {
        assert!(Instant::now() < deadline, "heard only {heard:?}");
        let message = read_json(&mut ws);
        if message.get("event").is_none() {
            assert_eq!(message["ok"], true, "{message}");
        } else if message["event"] == "entry" && message["entry"]["kind"] != "join" {
            let group = message["group"].as_str().unwrap_or_default().to_owned();
            assert_eq!(
                message["entry"]["body"],
                format!("hello {group}"),
                "{message}"
            );
            heard.push(group);
        }
    }
    heard.sort();
    assert_eq!(heard, names);
    assert!(
        wait_for(Duration::from_secs(5), || agora_tests::connections_to(
            &host.endpoint
        ) == 2),
        "{} connections from the gateway to the host of its {} groups",
        agora_tests::connections_to(&host.endpoint),
        names.len()
    );
}
