//! Attacks on the web gateway (`agora-web`) as a page of another origin, a client that holds
//! connections, or one account that wants every slot: issue 22's findings 2, 3, 4, 10, 11,
//! 13 and 20, and what a review of their fixes found (HTTP/2 prior knowledge past the
//! connection caps, sessions kept alive by another origin, downloads never read). Each test
//! performs the attack against the real binary and checks it is
//! refused, and checks that the same request from the gateway's own page still works (so a
//! refusal is the guard's, not a broken route).
//!
//! "Another origin" is a page served from another port on the same host
//! (`http://127.0.0.1:OTHER`): `SameSite=Strict` does not separate ports, so its requests
//! carry the victim's cookie, as these do.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use agora_tests::{wait_for, web_csrf, web_origin, Federation, Server};

type Ws = tungstenite::WebSocket<TcpStream>;

/// Follows no redirect: the cookie comes with the redirect.
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(10))
        .build()
}

fn answer(result: Result<ureq::Response, ureq::Error>, what: &str) -> ureq::Response {
    match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// The `NAME=VALUE` of the `Set-Cookie` for `name` in `response`, if it sets one.
fn set_cookie(response: &ureq::Response, name: &str) -> Option<String> {
    response
        .all("Set-Cookie")
        .into_iter()
        .find(|c| c.starts_with(&format!("{name}=")) && !c.starts_with(&format!("{name}=;")))
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
}

/// A page of another origin on the same host: another port of 127.0.0.1.
fn other_origin(web: &Server) -> String {
    let origin = web_origin(web);
    let port: u16 = origin
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    format!("http://127.0.0.1:{}", port.wrapping_add(1).max(1))
}

/// Spends a personal gateway's one-time token: the session cookie (`agora_session=ID`).
fn personal_session(web: &Server) -> String {
    let signed_in = answer(agent().get(&web.endpoint).call(), "the token URL");
    set_cookie(&signed_in, "agora_session").expect("a session cookie")
}

/// The session's CSRF token, from the page it is served.
fn page_csrf(web: &Server, cookie: &str) -> String {
    let page = answer(
        agent()
            .get(&format!("{}/", web_origin(web)))
            .set("Cookie", cookie)
            .call(),
        "the page",
    );
    assert_eq!(page.status(), 200);
    web_csrf(&page.into_string().expect("html")).expect("the page carries its token")
}

/// The sign-in page's form token: (its cookie `agora_form=T`, the field's value).
fn form_token(web: &Server) -> (String, String) {
    let page = answer(
        agent().get(&format!("{}/", web_origin(web))).call(),
        "sign-in page",
    );
    let cookie = set_cookie(&page, "agora_form").expect("the form token's cookie");
    let field = web_csrf(&page.into_string().expect("html")).expect("the form's hidden field");
    (cookie, field)
}

/// Signs in to a hosted gateway as its own page does; the session cookie.
fn hosted_session(web: &Server, name: &str, password: &str) -> String {
    let (form_cookie, token) = form_token(web);
    let origin = web_origin(web);
    let signed_in = answer(
        agent()
            .post(&format!("{origin}/signin"))
            .set("Origin", &origin)
            .set("Cookie", &form_cookie)
            .send_form(&[("name", name), ("password", password), ("csrf", &token)]),
        "sign-in",
    );
    assert_eq!(signed_in.status(), 303, "{name} signs in");
    set_cookie(&signed_in, "agora_session").expect("a session cookie")
}

/// Opens `/ws` with `cookie` and the given extra headers: the WebSocket, or the HTTP status
/// of the refusal.
fn open_ws(web: &Server, cookie: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let origin = web_origin(web);
    let url = format!("{}/ws", origin.replacen("http://", "ws://", 1));
    let mut request =
        tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).expect("url");
    request
        .headers_mut()
        .insert("Cookie", cookie.parse().expect("header"));
    for (name, value) in headers {
        let name: tungstenite::http::HeaderName = name.parse().expect("name");
        request
            .headers_mut()
            .insert(name, value.parse().expect("header"));
    }
    let stream = TcpStream::connect(origin.trim_start_matches("http://")).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    match tungstenite::client::client(request, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("WebSocket handshake: {e}"),
    }
}

/// `/ws` as the gateway's own page opens it.
fn own_ws(web: &Server, cookie: &str) -> Result<Ws, u16> {
    let origin = web_origin(web);
    open_ws(web, cookie, &[("Origin", &origin)])
}

/// `whoami` over `ws`: the reply (events in between are skipped), or `None` once the
/// gateway has closed the WebSocket.
fn whoami(ws: &mut Ws) -> Option<serde_json::Value> {
    ws.send(tungstenite::Message::Text(
        serde_json::json!({"op": "whoami"}).to_string().into(),
    ))
    .ok()?;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(text)) => {
                let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
                if value.get("event").is_none() {
                    return Some(value);
                }
            }
            Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Whether the gateway closes `ws` within `timeout` (a Close frame, or the connection
/// ends).
fn closed_within(ws: &mut Ws, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    while Instant::now() < deadline {
        match ws.read() {
            Ok(tungstenite::Message::Close(_)) => return true,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A POST to the gateway with `headers`; the response.
fn post(web: &Server, path: &str, headers: &[(&str, &str)], body: &[u8]) -> ureq::Response {
    let mut request = agent().post(&format!("{}{path}", web_origin(web)));
    for (name, value) in headers {
        request = request.set(name, value);
    }
    answer(request.send_bytes(body), path)
}

fn error_code(response: ureq::Response) -> String {
    let body = response.into_string().expect("body");
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => v["error"].as_str().unwrap_or_default().to_owned(),
        Err(_) => body,
    }
}

/// Finding 2: a page on another port of the same host opened the victim's `/ws` and uploaded
/// as the victim. Now the upgrade and the upload need the gateway's own Origin (and
/// `Sec-Fetch-Site: same-origin` where sent), and the upload the session's token.
#[test]
fn a_page_of_another_origin_can_neither_open_the_websocket_nor_upload_as_the_victim() {
    let fed = Federation::start("200ms");
    let web = fed.web_personal("alice");
    let cookie = personal_session(&web);
    let (own, foreign) = (web_origin(&web), other_origin(&web));

    // The WebSocket: refused from another port, without an Origin, or cross-site.
    assert_eq!(
        open_ws(&web, &cookie, &[("Origin", &foreign)]).err(),
        Some(403),
        "another port's page"
    );
    assert_eq!(
        open_ws(&web, &cookie, &[]).err(),
        Some(403),
        "no Origin at all"
    );
    assert_eq!(
        open_ws(&web, &cookie, &[("Origin", "null")]).err(),
        Some(403)
    );
    assert_eq!(
        open_ws(
            &web,
            &cookie,
            &[("Origin", &own), ("Sec-Fetch-Site", "same-site")]
        )
        .err(),
        Some(403),
        "Sec-Fetch-Site: same-site"
    );
    // The gateway's own page opens it and is answered.
    let mut ws = own_ws(&web, &cookie).expect("the page's own WebSocket");
    let me = whoami(&mut ws).expect("whoami");
    assert_eq!(me["user"], "alice", "{me}");

    // The upload: another origin, no token, a wrong token are all refused before the body.
    let csrf = page_csrf(&web, &cookie);
    let path = "/files/Nowhere?name=x.txt";
    let foreign_post = post(
        &web,
        path,
        &[
            ("Cookie", &cookie),
            ("Origin", &foreign),
            ("X-Agora-CSRF", &csrf),
        ],
        b"payload",
    );
    assert_eq!(foreign_post.status(), 403);
    assert_eq!(error_code(foreign_post), "forbidden_origin");
    let no_origin = post(
        &web,
        path,
        &[("Cookie", &cookie), ("X-Agora-CSRF", &csrf)],
        b"x",
    );
    assert_eq!(no_origin.status(), 403);
    let no_token = post(
        &web,
        path,
        &[("Cookie", &cookie), ("Origin", &own)],
        b"payload",
    );
    assert_eq!(no_token.status(), 403);
    assert_eq!(error_code(no_token), "bad_csrf");
    let wrong = "0".repeat(64);
    let wrong_token = post(
        &web,
        path,
        &[
            ("Cookie", &cookie),
            ("Origin", &own),
            ("X-Agora-CSRF", &wrong),
        ],
        b"payload",
    );
    assert_eq!(error_code(wrong_token), "bad_csrf");
    // A form post of another origin, token and all, is refused too (text/plain forms).
    let form = post(
        &web,
        path,
        &[
            ("Cookie", &cookie),
            ("Origin", &foreign),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("csrf={csrf}").as_bytes(),
    );
    assert_eq!(form.status(), 403);
    // The page's own upload passes the guard (the group does not exist: 404 from the route).
    let own_post = post(
        &web,
        path,
        &[
            ("Cookie", &cookie),
            ("Origin", &own),
            ("X-Agora-CSRF", &csrf),
        ],
        b"payload",
    );
    assert_eq!(own_post.status(), 404, "past the guard, to the route");
    assert_eq!(error_code(own_post), "unknown_group");
}

/// Finding 3: a cross-site form posting to `/signin` signed the victim in as the attacker.
/// Now it is refused and sets no session cookie, even with a valid form token of the
/// attacker's own.
#[test]
fn login_csrf_a_form_of_another_origin_cannot_sign_anyone_in() {
    let fed = Federation::start("200ms");
    fed.web_add_user("web-data", "mallory", "mallory's password");
    let web = fed.web_hosted("web-data");
    let (own, foreign) = (web_origin(&web), other_origin(&web));
    let (form_cookie, token) = form_token(&web);
    let fields = [
        ("name", "mallory"),
        ("password", "mallory's password"),
        ("csrf", token.as_str()),
    ];
    let signin = format!("{own}/signin");

    let cross = answer(
        agent()
            .post(&signin)
            .set("Origin", &foreign)
            .set("Cookie", &form_cookie)
            .send_form(&fields),
        "cross-origin sign-in",
    );
    assert_eq!(cross.status(), 403);
    assert_eq!(set_cookie(&cross, "agora_session"), None, "no session");
    let without_origin = answer(
        agent()
            .post(&signin)
            .set("Cookie", &form_cookie)
            .send_form(&fields),
        "sign-in without Origin",
    );
    assert_eq!(without_origin.status(), 403);
    assert_eq!(set_cookie(&without_origin, "agora_session"), None);
    // Same origin but without the form token (a cookie the attacker could not set).
    let tokenless = answer(
        agent()
            .post(&signin)
            .set("Origin", &own)
            .send_form(&fields[..2]),
        "sign-in without a token",
    );
    assert_eq!(tokenless.status(), 403);
    assert_eq!(set_cookie(&tokenless, "agora_session"), None);
    let mismatched = answer(
        agent()
            .post(&signin)
            .set("Origin", &own)
            .set("Cookie", &form_cookie)
            .send_form(&[
                ("name", "mallory"),
                ("password", "mallory's password"),
                ("csrf", &"f".repeat(64)),
            ]),
        "sign-in with another token",
    );
    assert_eq!(mismatched.status(), 403);
    assert_eq!(set_cookie(&mismatched, "agora_session"), None);
    // The sign-up route is guarded alike.
    let signup = answer(
        agent()
            .post(&format!("{own}/signup"))
            .set("Origin", &foreign)
            .set("Cookie", &form_cookie)
            .send_form(&fields),
        "cross-origin sign-up",
    );
    assert_eq!(signup.status(), 403);

    // A second sign-in tab keeps the browser's token, so the first tab's form still posts.
    let again = answer(
        agent()
            .get(&format!("{own}/"))
            .set("Cookie", &form_cookie)
            .call(),
        "a second sign-in page",
    );
    assert_eq!(
        web_csrf(&again.into_string().expect("html")).as_deref(),
        Some(token.as_str())
    );
    // The sign-in page itself signs in.
    let session = hosted_session(&web, "mallory", "mallory's password");
    assert!(session.starts_with("agora_session="), "{session}");
}

/// Findings 4 and 13: a cross-site form posting to `/signout` cleared the cookie (and spent
/// personal mode's only token) without ending the session, and an open WebSocket kept
/// working after sign-out. Now a cross-origin sign-out is refused and changes nothing, and
/// the page's own sign-out ends the session on the server and closes its WebSockets.
#[test]
fn sign_out_is_same_origin_only_and_closes_the_sessions_websockets() {
    let fed = Federation::start("200ms");
    let web = fed.web_personal("alice");
    let cookie = personal_session(&web);
    let (own, foreign) = (web_origin(&web), other_origin(&web));
    let csrf = page_csrf(&web, &cookie);
    let mut ws = own_ws(&web, &cookie).expect("the page's WebSocket");
    let mut other_tab = own_ws(&web, &cookie).expect("another tab");
    assert!(whoami(&mut ws).is_some());

    let form = "application/x-www-form-urlencoded";
    let body = format!("csrf={csrf}");
    let cross = post(
        &web,
        "/signout",
        &[
            ("Cookie", &cookie),
            ("Origin", &foreign),
            ("Content-Type", form),
        ],
        body.as_bytes(),
    );
    assert_eq!(cross.status(), 403, "a cross-origin sign-out");
    assert_eq!(set_cookie(&cross, "agora_session"), None);
    let tokenless = post(
        &web,
        "/signout",
        &[
            ("Cookie", &cookie),
            ("Origin", &own),
            ("Content-Type", form),
        ],
        b"",
    );
    assert_eq!(tokenless.status(), 403, "a sign-out without the token");
    assert_eq!(
        whoami(&mut ws).map(|v| v["user"].clone()),
        Some(serde_json::json!("alice")),
        "the session goes on"
    );
    let page = answer(
        agent()
            .get(&format!("{own}/"))
            .set("Cookie", &cookie)
            .call(),
        "page",
    );
    assert_eq!(page.status(), 200);

    // The page's own sign-out (its form: Origin, the hidden token).
    let started = Instant::now();
    let out = post(
        &web,
        "/signout",
        &[
            ("Cookie", &cookie),
            ("Origin", &own),
            ("Content-Type", form),
        ],
        body.as_bytes(),
    );
    assert_eq!(out.status(), 303);
    assert!(
        closed_within(&mut ws, Duration::from_secs(10)),
        "the session's WebSocket is closed"
    );
    assert!(
        closed_within(&mut other_tab, Duration::from_secs(10)),
        "and every other one of it"
    );
    eprintln!("WebSockets closed {:?} after sign-out", started.elapsed());
    assert!(whoami(&mut ws).is_none(), "whoami no longer answers");
    let after = answer(
        agent()
            .get(&format!("{own}/"))
            .set("Cookie", &cookie)
            .call(),
        "page",
    );
    assert_eq!(after.status(), 401, "the session ended on the server");
    assert_eq!(own_ws(&web, &cookie).err(), Some(401));
}

/// Finding 10: one account could take every WebSocket slot (the cap was global). Now one
/// identity and one address hold at most their caps, and another account still gets in.
#[test]
fn one_account_or_one_address_cannot_take_every_websocket() {
    let fed = Federation::start("200ms");
    fed.web_add_user("web-data", "alice", "alice's password");
    fed.web_add_user("web-data", "bob", "bob's password");
    let web = fed.web_hosted_with(
        "web-data",
        &[
            "--max-websockets-per-identity",
            "3",
            "--max-websockets-per-address",
            "5",
        ],
    );
    let alice = hosted_session(&web, "alice", "alice's password");
    let bob = hosted_session(&web, "bob", "bob's password");

    let mut alices: Vec<Ws> = (0..3)
        .map(|i| own_ws(&web, &alice).unwrap_or_else(|s| panic!("alice's page {i}: {s}")))
        .collect();
    assert_eq!(
        own_ws(&web, &alice).err(),
        Some(429),
        "alice's fourth page is past her cap"
    );
    let mut bobs = vec![own_ws(&web, &bob).expect("bob still gets in")];
    assert_eq!(
        whoami(&mut bobs[0]).map(|v| v["user"].clone()),
        Some(serde_json::json!("bob"))
    );
    bobs.push(own_ws(&web, &bob).expect("bob's second"));
    // Five from this address now: bob's third is past the address's cap.
    assert_eq!(own_ws(&web, &bob).err(), Some(429), "per address");
    // A slot is given back when its page closes.
    let mut closed = alices.pop().expect("one");
    closed.close(None).expect("close");
    let mut reopened = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            reopened = own_ws(&web, &alice).ok();
            reopened.is_some()
        }),
        "alice's slot comes back once a page closes"
    );
    assert!(whoami(reopened.as_mut().expect("open")).is_some());
    assert!(whoami(&mut alices[0]).is_some(), "the others go on");
}

/// Reads what the gateway sends on `stream` until it closes it or `timeout` passes: the
/// bytes, and whether it closed.
fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (got, true),
        }
    }
    (got, false)
}

/// A connection from `source` (a loopback address other than 127.0.0.1, say) to `to`.
fn connect_from(source: &str, to: &str) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{source}:0").parse().expect("address"))?;
        socket.connect(to.parse().expect("address")).await
    });
    let stream = stream.expect("connect").into_std().expect("std");
    stream.set_nonblocking(false).expect("blocking");
    stream
}

/// Polls `conns` until the gateway answers or closes one of them, for at most `timeout`,
/// then a little longer (a second refusal already on its way is seen too): each one it
/// answered or closed, with what it read. A loaded machine may take seconds to accept: the
/// wait is for the first refusal, not a fixed window.
fn refused_among(conns: &mut [TcpStream], timeout: Duration) -> Vec<(usize, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut grace: Option<Instant> = None;
    let mut refused: Vec<(usize, Vec<u8>)> = Vec::new();
    loop {
        for (i, s) in conns.iter_mut().enumerate() {
            if refused.iter().any(|(r, _)| *r == i) {
                continue;
            }
            s.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                Ok(n) => refused.push((i, buf[..n].to_vec())),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => refused.push((i, Vec::new())),
            }
        }
        let now = Instant::now();
        if !refused.is_empty() && grace.is_none() {
            grace = Some(now + Duration::from_millis(300));
        }
        if now >= deadline || grace.is_some_and(|g| now >= g) {
            return refused;
        }
    }
}

/// The index of the one connection in `conns` that the gateway refuses within `timeout`,
/// with `503` ([`refused_among`]).
///
/// # Panics
/// If it refuses none or more than one (`what` says which were expected), or says anything
/// but `503`.
fn the_one_refused(conns: &mut [TcpStream], timeout: Duration, what: &str) -> usize {
    let mut refused = refused_among(conns, timeout);
    assert_eq!(refused.len(), 1, "{what}: {refused:?}");
    let (index, said) = refused.remove(0);
    assert!(
        said.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&said)
    );
    index
}

/// Finding 11: a request that sent its headers slowly was held for 70 s and more, and 200
/// trickling connections all stayed open. Now a trickler is cut off at
/// `--header-read-timeout`, a silent or idle keep-alive connection too, and one address
/// holds at most `--max-connections-per-address` while another client still gets the page.
#[test]
fn a_client_that_trickles_headers_is_cut_off_and_one_address_cannot_hold_every_connection() {
    let fed = Federation::start("200ms");
    let web = fed.web_personal_with(
        "alice",
        &[
            "--header-read-timeout",
            "6s",
            "--max-connections-per-address",
            "4",
        ],
    );
    let header_read_timeout = Duration::from_secs(6);
    let addr = web_origin(&web).trim_start_matches("http://").to_owned();
    // The session from another address, on a connection closed at once: 127.0.0.1 holds
    // nothing when the attack starts.
    let cookie = {
        let token = web.endpoint.split_once("/?").expect("a token URL").1;
        let mut s = connect_from("127.0.0.7", &addr);
        write!(
            s,
            "GET /?{token} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let (said, _) = read_until_closed(&mut s, Duration::from_secs(10));
        let said = String::from_utf8_lossy(&said).into_owned();
        said.lines()
            .find_map(|l| {
                l.strip_prefix("set-cookie: ")
                    .or(l.strip_prefix("Set-Cookie: "))
            })
            .and_then(|c| c.split(';').next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("a session cookie: {said}"))
    };

    // Five connections from 127.0.0.1 start a request, to trickle it a header line at a
    // time. The gateway accepts them concurrently: any one of the five is the one too many,
    // closed at once with a 503; the other four are held.
    let opened = Instant::now();
    let mut conns: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\n").expect("start");
            s
        })
        .collect();
    // (Well before the held ones are cut off at the header-read timeout.)
    let index = the_one_refused(
        &mut conns,
        header_read_timeout - Duration::from_secs(1),
        "exactly one of five connections from one address is refused",
    );
    conns.remove(index);
    let mut tricklers = conns;
    // Another address still gets the page while the four are held.
    let mut other = connect_from("127.0.0.2", &addr);
    write!(
        other,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let (page, _) = read_until_closed(&mut other, Duration::from_secs(10));
    assert!(
        page.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&page[..page.len().min(200)])
    );

    // The tricklers go on sending a header every 300 ms; each is cut off at the
    // header-read timeout (a loaded machine notices later, never sooner).
    let mut cut_at = vec![None; tricklers.len()];
    let deadline = opened + header_read_timeout + Duration::from_secs(15);
    while cut_at.iter().any(Option::is_none) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        for (i, s) in tricklers.iter_mut().enumerate() {
            if cut_at[i].is_some() {
                continue;
            }
            let wrote = s.write_all(b"X-Slow: 1\r\n");
            s.set_read_timeout(Some(Duration::from_millis(1)))
                .expect("timeout");
            let mut byte = [0u8; 512];
            let ended = match s.read(&mut byte) {
                Ok(_) => true,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            };
            if wrote.is_err() || ended {
                cut_at[i] = Some(opened.elapsed());
            }
        }
    }
    let cut: Vec<Duration> = cut_at
        .iter()
        .map(|c| c.expect("every trickler is cut off"))
        .collect();
    eprintln!("tricklers cut off after {cut:?}");
    for at in &cut {
        assert!(
            *at >= header_read_timeout - Duration::from_millis(500)
                && *at <= header_read_timeout + Duration::from_secs(8),
            "cut off near --header-read-timeout ({header_read_timeout:?}): {at:?}"
        );
    }

    // A connection that sends nothing at all is closed too, and so is one that idles after
    // a request it was answered (keep-alive).
    let started = Instant::now();
    let mut silent = TcpStream::connect(&addr).expect("connect");
    let mut kept = TcpStream::connect(&addr).expect("connect");
    write!(
        kept,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n"
    )
    .expect("request");
    let (_, closed) = read_until_closed(&mut silent, header_read_timeout * 3);
    assert!(closed, "a silent connection is closed");
    let silent_for = started.elapsed();
    let (answered, closed) = read_until_closed(&mut kept, header_read_timeout * 3);
    assert!(
        answered.starts_with(b"HTTP/1.1 200"),
        "the request was answered"
    );
    assert!(closed, "an idle keep-alive connection is closed");
    let kept_for = started.elapsed();
    eprintln!("silent connection closed after {silent_for:?}, idle keep-alive after {kept_for:?}");
    let bound = header_read_timeout + Duration::from_secs(8);
    assert!(silent_for <= bound && kept_for <= bound);

    // Once they are gone, 127.0.0.1 gets the page again.
    let page = answer(
        agent()
            .get(&format!("http://{addr}/"))
            .set("Cookie", &cookie)
            .call(),
        "page",
    );
    assert_eq!(page.status(), 200);
}

/// A connection that opened with the HTTP/2 preface (RFC 9113 §3.4, "prior knowledge")
/// was served HTTP/2 even over plain TCP, where hyper has no header-read or idle timeout:
/// one that sent the preface and then nothing held its connection slot for ever. Now the
/// gateway serves HTTP/1.1 only: it closes such a connection at once, and the address's one
/// slot (`--max-connections-per-address 1`) serves the next client.
#[test]
fn an_http2_preface_then_silence_is_closed_and_holds_no_connection_slot() {
    let fed = Federation::start("200ms");
    let web = fed.web_personal_with(
        "alice",
        &[
            "--header-read-timeout",
            "2s",
            "--max-connections-per-address",
            "1",
        ],
    );
    let addr = web_origin(&web).trim_start_matches("http://").to_owned();
    let started = Instant::now();
    let mut h2 = TcpStream::connect(&addr).expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .expect("the preface");
    // Within the header-read timeout and then some: on a gateway that serves HTTP/2 the
    // connection stays open (hyper answers the preface with its SETTINGS and waits).
    let (said, closed) = read_until_closed(&mut h2, Duration::from_secs(10));
    let closed_after = started.elapsed();
    eprintln!(
        "HTTP/2 preface: closed {closed} after {closed_after:?}, {} bytes answered",
        said.len()
    );
    assert!(
        closed,
        "a connection that speaks HTTP/2 and then nothing is closed ({} bytes answered)",
        said.len()
    );
    // The same address's only slot comes back: a request is served (401 without a session),
    // not refused (503).
    let mut next = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let Ok(mut s) = TcpStream::connect(&addr) else {
                return false;
            };
            let _ = write!(
                s,
                "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            );
            next = read_until_closed(&mut s, Duration::from_secs(5)).0;
            next.starts_with(b"HTTP/1.1 401")
        }),
        "the address's slot serves the next connection: {}",
        String::from_utf8_lossy(&next)
    );
    drop(h2);
}

/// Finding 20: sessions never expired and the table refused every sign-in once full. Now a
/// session unused past `--session-idle` is refused (401), one past `--session-lifetime`
/// ends and closes its WebSocket, and at `--max-sessions` a sign-in evicts the session
/// unused longest instead of being refused.
///
/// Each limit runs on a gateway of its own, with the others long, so that only the one under
/// test can explain a 401, and every bound leaves seconds for a loaded machine: a sign-in
/// (Argon2) can take hundreds of milliseconds there.
#[test]
fn sessions_expire_when_idle_or_old_and_a_full_table_evicts() {
    let fed = Federation::start("200ms");
    // Personal: the lifetime ends a session even with its WebSocket open.
    let lifetime = Duration::from_secs(6);
    let web = fed.web_personal_with(
        "alice",
        &["--session-idle", "1s", "--session-lifetime", "6s"],
    );
    // (Before the session opens: it cannot end before `opened + lifetime`.)
    let opened = Instant::now();
    let cookie = personal_session(&web);
    let base = web_origin(&web);
    let page = |cookie: &str| {
        answer(
            agent()
                .get(&format!("{base}/"))
                .set("Cookie", cookie)
                .call(),
            "page",
        )
        .status()
    };
    let mut ws = own_ws(&web, &cookie).expect("a WebSocket");
    // Past the idle time, the open WebSocket keeps the session in use...
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        whoami(&mut ws).is_some(),
        "a page with its WebSocket open is in use"
    );
    let in_use = page(&cookie);
    assert!(
        opened.elapsed() < lifetime,
        "the machine is too slow for this test: {:?} before the first check",
        opened.elapsed()
    );
    assert_eq!(in_use, 200, "in use past --session-idle");
    // ...until its lifetime ends it, and the WebSocket with it.
    assert!(
        closed_within(&mut ws, Duration::from_secs(20)),
        "closed at --session-lifetime"
    );
    assert!(
        opened.elapsed() >= lifetime,
        "closed after {:?}, before its lifetime",
        opened.elapsed()
    );
    assert_eq!(page(&cookie), 401);

    // Hosted, idle: a session unused past --session-idle is refused.
    fed.web_add_user("web-data", "bob", "bob's password");
    let idle_web = fed.web_hosted_with("web-data", &["--session-idle", "2s"]);
    let status = |web: &Server, cookie: &str| {
        answer(
            agent()
                .get(&format!("{}/app.js", web_origin(web)))
                .set("Cookie", cookie)
                .call(),
            "app.js",
        )
        .status()
    };
    let idle = hosted_session(&idle_web, "bob", "bob's password");
    assert_eq!(status(&idle_web, &idle), 200);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(status(&idle_web, &idle), 401, "unused past --session-idle");
    drop(idle_web);

    // Hosted, full: nothing idles out within the test (--session-idle 60s), so a 401 is an
    // eviction: at --max-sessions a sign-in evicts the session unused longest.
    let full = fed.web_hosted_with(
        "web-data",
        &["--session-idle", "60s", "--max-sessions", "2"],
    );
    let first = hosted_session(&full, "bob", "bob's password");
    let second = hosted_session(&full, "bob", "bob's password");
    assert_eq!(status(&full, &second), 200);
    assert_eq!(status(&full, &first), 200, "first is used after second");
    let third = hosted_session(&full, "bob", "bob's password");
    assert_eq!(
        status(&full, &third),
        200,
        "a sign-in at the cap is not refused"
    );
    assert_eq!(
        status(&full, &second),
        401,
        "the session unused longest was evicted"
    );
    assert_eq!(status(&full, &first), 200);
}

/// A page on another port has the victim's cookie (same site): its refused posts and its
/// loads of the gateway's GET routes used to count as uses of the session, so it could keep
/// a session from ever idling out. Now only the gateway's own requests do.
#[test]
fn another_origins_requests_do_not_keep_a_session_from_idling_out() {
    let fed = Federation::start("200ms");
    let web = fed.web_personal_with("alice", &["--session-idle", "2s"]);
    let cookie = personal_session(&web);
    let (own, foreign) = (web_origin(&web), other_origin(&web));
    let csrf = page_csrf(&web, &cookie);
    let idle = Duration::from_secs(2);
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < idle + Duration::from_millis(1500) {
        let refused = post(
            &web,
            "/signout",
            &[
                ("Cookie", &cookie),
                ("Origin", &foreign),
                ("Sec-Fetch-Site", "same-site"),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            format!("csrf={csrf}").as_bytes(),
        );
        // Refused while the session lives; once it has idled out, the sign-out finds no
        // session and only clears the cookie (303), as for anyone without one.
        let ended = started.elapsed() + Duration::from_secs(1) >= idle;
        assert!(
            refused.status() == 403 || (ended && refused.status() == 303),
            "a post of another origin after {:?}: {}",
            started.elapsed(),
            refused.status()
        );
        let loaded = answer(
            agent()
                .get(&format!("{own}/app.css"))
                .set("Cookie", &cookie)
                .set("Sec-Fetch-Site", "same-site")
                .call(),
            "app.css",
        );
        // Answered while the session lives; never a use of it. And never readable by the
        // page that asked: Cross-Origin-Resource-Policy.
        assert!(matches!(loaded.status(), 200 | 401), "{}", loaded.status());
        assert_eq!(
            loaded.header("Cross-Origin-Resource-Policy"),
            Some("same-origin")
        );
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let page = answer(
        agent()
            .get(&format!("{own}/"))
            .set("Cookie", &cookie)
            .call(),
        "page",
    );
    assert_eq!(
        page.status(),
        401,
        "{rounds} rounds of another origin's requests kept the session past --session-idle"
    );
}

/// A page of another origin, served from another port of 127.0.0.1 (what the attack used: a
/// dev server, a notebook, another local user's listener). Answers every request with
/// `html`, until dropped.
struct AttackerSite {
    origin: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AttackerSite {
    fn serve(html: String) -> AttackerSite {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let origin = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                );
            }
        });
        AttackerSite {
            origin,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for AttackerSite {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Polls `script`'s value in the page until `done` takes it, within `timeout`.
async fn poll_page<T>(
    client: &fantoccini::Client,
    script: &str,
    timeout: Duration,
    mut done: impl FnMut(&serde_json::Value) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(value) = client.execute(script, Vec::new()).await {
            if let Some(found) = done(&value) {
                return Some(found);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Finding 2, 4 and 13 as the attack ran them, in Chromium: the victim signs in to their
/// gateway, then opens a page on another port of 127.0.0.1. Its script opens the victim's
/// `/ws` (Chromium sends the victim's cookie: `SameSite=Strict` is per site, not per port),
/// posts an upload, and submits a sign-out form. The WebSocket never opens, and the victim's
/// session goes on: their page still answers as them.
#[test]
fn in_chromium_a_page_on_another_port_gets_nothing_from_the_victims_gateway() {
    let fed = Federation::start("200ms");
    let web = fed.web_personal("alice");
    let gateway = web_origin(&web);
    let ws_url = format!("{}/ws", gateway.replacen("http://", "ws://", 1));
    let attack = format!(
        r#"<!doctype html><title>cute cats</title>
<iframe name="sink"></iframe>
<form id="out" method="post" action="{gateway}/signout" target="sink"></form>
<script>
window.results = {{ ws: "pending", messages: [] }};
const ws = new WebSocket("{ws_url}");
ws.onopen = () => {{ results.ws = "open"; ws.send(JSON.stringify({{op: "whoami"}})); }};
ws.onmessage = (e) => results.messages.push(e.data);
ws.onclose = () => {{ if (results.ws === "pending") results.ws = "refused"; }};
fetch("{gateway}/files/Anything?name=stolen.txt", {{
  method: "POST", credentials: "include", mode: "no-cors", body: "exfiltrated"
}}).then(() => results.upload = "sent", () => results.upload = "failed");
document.getElementById("out").submit();
results.signout = "submitted";
</script>"#
    );
    let site = AttackerSite::serve(attack);
    let driver = agora_tests::Chromedriver::start(fed.dir.path());
    let profile = tempfile::tempdir().expect("profile");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = driver.session(profile.path(), 1100, 720).await;
        // The victim signs in (the token URL) and has the chat page.
        client.goto(&web.endpoint).await.expect("the token URL");
        let me = poll_page(
            &client,
            r#"return document.getElementById("whoami")?.textContent ?? "";"#,
            Duration::from_secs(30),
            |v| {
                v.as_str()
                    .filter(|s| s.contains("alice"))
                    .map(str::to_owned)
            },
        )
        .await;
        assert!(me.is_some(), "the victim's page works");

        // The attacker's page, in the same browser.
        client
            .goto(&format!("{}/", site.origin))
            .await
            .expect("the attacker's page");
        let ws = poll_page(
            &client,
            "return window.results ? window.results.ws : null;",
            Duration::from_secs(30),
            |v| v.as_str().filter(|s| *s != "pending").map(str::to_owned),
        )
        .await;
        let results = client
            .execute("return window.results;", Vec::new())
            .await
            .expect("results");
        assert_eq!(ws.as_deref(), Some("refused"), "{results}");
        assert_eq!(results["messages"], serde_json::json!([]), "{results}");
        assert_eq!(results["signout"], "submitted", "{results}");

        // The victim's session goes on: their page opens as them again.
        client
            .goto(&format!("{gateway}/"))
            .await
            .expect("the gateway");
        let me = poll_page(
            &client,
            r#"return document.getElementById("whoami")?.textContent ?? "";"#,
            Duration::from_secs(30),
            |v| {
                v.as_str()
                    .filter(|s| s.contains("alice"))
                    .map(str::to_owned)
            },
        )
        .await;
        assert!(me.is_some(), "the cross-site sign-out changed nothing");
        let _ = client.close().await;
    });
    // The guard checks a request's Origin only when it carries a live session: each of these
    // lines shows Chromium sent the victim's cookie and the gateway refused the origin.
    // (Polled: the attacker's fetch may still be on its way when the page moved on.)
    let paths = ["/ws", "/signout", "/files/Anything"];
    let mut log = String::new();
    let all_refused = wait_for(Duration::from_secs(10), || {
        log = web.log();
        let refused: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("request refused") && l.contains("forbidden_origin"))
            .collect();
        paths
            .iter()
            .all(|path| refused.iter().any(|l| l.contains(&format!("\"{path}\""))))
    });
    assert!(all_refused, "{paths:?} each refused for its origin:\n{log}");
}

/// Finding 11, the total: past `--max-connections` a new connection is refused from any
/// address, and once one closes the next gets in.
#[test]
fn connections_past_max_connections_are_refused_from_any_address() {
    let fed = Federation::start("200ms");
    let web = fed.web_personal_with("alice", &["--max-connections", "3"]);
    let addr = web_origin(&web).trim_start_matches("http://").to_owned();
    // Four connections from four addresses, each starting a request. The gateway accepts
    // them concurrently: any one of them is the one too many, closed at once with a 503.
    let mut held: Vec<TcpStream> = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
        .iter()
        .map(|source| {
            let mut s = connect_from(source, &addr);
            s.write_all(b"GET / HTTP/1.1\r\n").expect("start");
            s
        })
        .collect();
    // (Well before the held ones are cut off at the default header-read timeout, 10 s.)
    let index = the_one_refused(
        &mut held,
        Duration::from_secs(8),
        "one of four connections, whatever its address, is refused",
    );
    held.remove(index);
    drop(held.pop());
    let mut next = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            let mut s = connect_from("127.0.0.6", &addr);
            let _ = write!(
                s,
                "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            );
            let (said, _) = read_until_closed(&mut s, Duration::from_secs(2));
            next = Some(said.clone());
            said.starts_with(b"HTTP/1.1 401")
        }),
        "a closed connection's slot comes back: {:?}",
        next.map(|n| String::from_utf8_lossy(&n).into_owned())
    );
}

/// A download held a blocking thread for as long as its client left it unread, and there
/// was no cap on downloads: a few clients that request a large file and never read took
/// the gateway's blocking threads for good. Now one identity has at most
/// `--max-downloads-per-user` in progress (and one address `--max-downloads-per-address`),
/// and a client that takes nothing for `--download-stall-timeout` loses its download, and
/// gives its slot back.
#[test]
fn downloads_are_capped_per_identity_and_one_never_read_is_ended_at_the_stall_timeout() {
    let fed = Federation::start("200ms");
    let _node = fed.node("Files", "127.0.0.1:0", "files", &[]);
    fed.join_when_listed("alice", "Files");
    let web = fed.web_personal_with(
        "alice",
        &[
            "--max-downloads-per-user",
            "2",
            "--download-stall-timeout",
            "3s",
        ],
    );
    let cookie = personal_session(&web);
    let csrf = page_csrf(&web, &cookie);
    let own = web_origin(&web);
    let addr = own.trim_start_matches("http://").to_owned();
    // Larger than what the socket buffers and the gateway's queue hold: a client that reads
    // nothing leaves most of it unsent.
    let size = 32usize << 20;
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let stored = answer(
        agent()
            .post(&format!("{own}/files/Files"))
            .set("Cookie", &cookie)
            .set("Origin", &own)
            .set("X-Agora-CSRF", &csrf)
            .query("name", "big.bin")
            .send_bytes(&data),
        "upload",
    );
    assert_eq!(stored.status(), 200);
    let stored: serde_json::Value =
        serde_json::from_str(&stored.into_string().expect("body")).expect("JSON");
    let seq = stored["ack"]["seq"].as_u64().expect("a seq");
    let path = format!("/files/Files/{seq}");

    // Two downloads whose client reads the status line, then nothing more.
    let mut stalled: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n"
            )
            .expect("request");
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut status = [0u8; 12];
            s.read_exact(&mut status).expect("a status line");
            assert_eq!(&status, b"HTTP/1.1 200");
            s
        })
        .collect();
    let stalled_at = Instant::now();
    let download = || {
        answer(
            agent()
                .get(&format!("{own}{path}"))
                .set("Cookie", &cookie)
                .call(),
            "download",
        )
    };
    let third = download();
    assert_eq!(third.status(), 429, "past --max-downloads-per-user");
    assert_eq!(error_code(third), "limit_reached");

    // At the stall timeout both end and give their slots back: a download goes through.
    let mut got = 0;
    assert!(
        wait_for(Duration::from_secs(30), || {
            let response = download();
            if response.status() != 200 {
                return false;
            }
            let mut body = Vec::new();
            let read = response.into_reader().read_to_end(&mut body);
            got = body.len();
            read.is_ok() && body == data
        }),
        "a download after the stalled ones ended ({got} bytes)"
    );
    let freed_after = stalled_at.elapsed();
    eprintln!("slots back after {freed_after:?}");
    assert!(
        freed_after >= Duration::from_millis(2500),
        "not before the stall timeout: {freed_after:?}"
    );
    // The stalled downloads were cut short, not sent whole.
    for s in &mut stalled {
        let (rest, closed) = read_until_closed(s, Duration::from_secs(30));
        assert!(closed, "the stalled download's connection is closed");
        assert!(
            rest.len() < size,
            "{} bytes of {size}: the download was ended",
            rest.len()
        );
    }
}
