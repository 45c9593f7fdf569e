//! The web gateway (`agora-web`, personal mode) against the real registry and a node: the
//! token is exchanged once for a session cookie, nothing is served without it, the page
//! carries a CSP without inline scripts, and its WebSocket lists groups, sends and reads
//! history as the signed-in person.

use std::time::Duration;

use agora_tests::{Federation, Server};

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
    let (keys, registry_key) = (fed.key_dir(), fed.registry_key());
    let web = Server::start(
        "agora-web",
        &[
            "--user",
            "alice",
            "--bind",
            "127.0.0.1:0",
            "--registry",
            &fed.registry.endpoint,
            "--registry-key",
            &registry_key,
            "--key-dir",
            &keys,
        ],
        &fed.dir.path().join("web.log"),
    );
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
    let ws_url = format!("{}/ws", base.replacen("http://", "ws://", 1));
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(ws_url.as_str())
        .expect("request");
    request
        .headers_mut()
        .insert("Cookie", cookie.parse().expect("header"));
    let stream = std::net::TcpStream::connect(base.trim_start_matches("http://")).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (mut ws, _) = tungstenite::client::client(request, stream).expect("websocket");
    // Replies come in order; pushed events may come between them and are kept aside.
    let mut events: Vec<serde_json::Value> = Vec::new();
    let next = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>| loop {
        if let tungstenite::Message::Text(t) = ws.read().expect("a message within 10 s") {
            return serde_json::from_str::<serde_json::Value>(t.as_str()).expect("JSON");
        }
    };
    let call = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
                events: &mut Vec<serde_json::Value>,
                request: serde_json::Value| {
        ws.send(tungstenite::Message::Text(request.to_string().into()))
            .expect("send");
        loop {
            let message = next(ws);
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
        let message = next(&mut ws);
        events.push(message);
    }
    let seqs: Vec<u64> = entries(&events).iter().map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (1..=seq + 1).collect();
    assert_eq!(seqs, expected, "every entry once, in order: {events:?}");
}
