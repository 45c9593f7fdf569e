//! Attacks on a gateway's accounts and uploads (issue 22, findings 1, 6, 12, 14, 16 and the
//! gateway's part of 19), each performed against the real `agora-web`, registry and group
//! node:
//!
//! - a flood of sign-ins and sign-ups with long, distinct names does not grow the gateway;
//! - guesses from one address never lock the account's owner out on another;
//! - a refusal reads the same for a missing account as for an existing one;
//! - a sign-up for a name the registry gives another key leaves no account behind;
//! - an upload to a group the caller is not in is refused before its body is read, and
//!   uploads in progress are bounded per identity and in spooled bytes;
//! - a hosted data directory others can read is tightened at start; a password of spaces
//!   is refused.
//!
//! Requests go over raw HTTP/1.1 from a chosen loopback source address (any 127/8 address
//! works on Linux), so that the gateway sees distinct clients. Every request carries the
//! gateway's own `Origin`, and a sign-in form carries whatever token the sign-in page gives.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use agora_tests::{wait_for, web_origin, Federation, Server};

/// How long a reply may take (a sign-in pays for Argon2 in a debug build).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    /// The `name=value` parts of every `Set-Cookie`.
    fn cookies(&self) -> Vec<String> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .filter_map(|(_, v)| v.trim().split(';').next().map(str::to_owned))
            .collect()
    }
}

/// A TCP connection to `to` from the loopback address `from` (bound before connecting).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let from: IpAddr = from.parse().expect("a source address");
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    });
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        stream.into_std()
    });
    let stream = stream.expect("connect");
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("write timeout");
    stream
}

/// Reads one answer (the connection is `Connection: close`); `None` when none came (the
/// read timed out or the connection was reset before a status line).
fn read_reply(stream: &mut TcpStream) -> Option<Reply> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// A client of one gateway from one source address, keeping the cookies it is given.
struct Client {
    from: String,
    addr: SocketAddr,
    origin: String,
    cookies: Vec<String>,
    /// The form token the last sign-in page carried (`<input name="csrf" value="…">`,
    /// with the same value in a cookie).
    csrf: Option<String>,
    /// A session's token for what it posts (`<meta name="agora-csrf" content="…">` on the
    /// page), sent as `X-Agora-CSRF`.
    session_csrf: Option<String>,
}

/// The value of the attribute `value_attr` in the first element `marker` is part of.
fn attribute(html: &str, marker: &str, value_attr: &str) -> Option<String> {
    html.split(marker)
        .nth(1)
        .and_then(|rest| rest.split(&format!(r#"{value_attr}=""#)).nth(1))
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned)
}

/// `application/x-www-form-urlencoded` value.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn base_addr(web: &Server) -> SocketAddr {
    let origin = web_origin(web);
    origin
        .split_once("://")
        .expect("a URL")
        .1
        .parse()
        .expect("IP:PORT")
}

impl Client {
    fn new(web: &Server, from: &str) -> Client {
        Client {
            from: from.to_owned(),
            addr: base_addr(web),
            origin: web_origin(web),
            cookies: Vec::new(),
            csrf: None,
            session_csrf: None,
        }
    }

    /// Sends a request whose body is `body_len` bytes, the first `body.len()` of them
    /// given; the connection stays open for the caller.
    fn start(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body_len: u64,
        body: &[u8],
    ) -> TcpStream {
        let mut stream = connect_from(&self.from, self.addr);
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nOrigin: {}\r\nSec-Fetch-Site: \
             same-origin\r\nConnection: close\r\nContent-Length: {body_len}\r\n",
            self.addr, self.origin
        );
        if !self.cookies.is_empty() {
            head.push_str(&format!("Cookie: {}\r\n", self.cookies.join("; ")));
        }
        if let Some(token) = &self.session_csrf {
            head.push_str(&format!("X-Agora-CSRF: {token}\r\n"));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
        stream
    }

    /// A whole exchange; `None` when no answer came.
    fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<Reply> {
        let mut stream = self.start(method, path, headers, body.len() as u64, body);
        let reply = read_reply(&mut stream)?;
        for cookie in reply.cookies() {
            let name = cookie.split('=').next().unwrap_or_default().to_owned();
            self.cookies
                .retain(|c| c.split('=').next() != Some(name.as_str()));
            if !cookie.ends_with('=') {
                self.cookies.push(cookie);
            }
        }
        // Each sign-in page comes with a new form token (and its cookie).
        if let Some(token) = attribute(&reply.body, r#"name="csrf""#, "value") {
            self.csrf = Some(token);
        }
        Some(reply)
    }

    /// `GET /` for the sign-in page's cookies and form token.
    fn prime(&mut self) {
        let page = self.call("GET", "/", &[], b"").expect("the sign-in page");
        assert_eq!(page.status, 200, "{page:?}");
    }

    /// The sign-in form's body for `name` and `password`.
    fn form(&self, name: &str, password: &str) -> String {
        let token = self.csrf.as_deref().unwrap_or_default();
        format!(
            "csrf={}&password={}&name={}",
            form_encode(token),
            form_encode(password),
            form_encode(name)
        )
    }

    /// `POST /signin` (or `/signup`) with `name` and `password`.
    fn sign(&mut self, route: &str, name: &str, password: &str) -> Reply {
        let form = self.form(name, password);
        self.call(
            "POST",
            route,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            form.as_bytes(),
        )
        .unwrap_or_else(|| panic!("no answer to {route} as {name} from {}", self.from))
    }
}

/// The resident memory of process `pid`, in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A request carrying a form of `len` bytes whose name is `name_len` bytes of a distinct
/// pattern, from `client`: the answer's status, or `None` if the gateway closed the
/// connection without one while the body was still being sent.
fn post_long_name(client: &Client, route: &str, i: usize, len: usize) -> Option<u16> {
    let mut form = client.form(&format!("{i}-"), "whatever it is").into_bytes();
    form.resize(len, b'n');
    let mut stream = client.start(
        "POST",
        route,
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form.len() as u64,
        b"",
    );
    // The body from another thread: an answer given before it is read comes back here.
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&form);
    });
    let reply = read_reply(&mut stream);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    reply.map(|r| r.status)
}

#[test]
fn a_flood_of_sign_ins_with_long_distinct_names_does_not_grow_the_gateway() {
    let fed = Federation::start("200ms");
    fed.web_add_user("web-data", "alice", "correct horse");
    let web = fed.web_hosted_with("web-data", &["--open-signup"]);
    let mut client = Client::new(&web, "127.0.0.1");
    client.prime();
    // Warm up: a few refused sign-ins (Argon2's memory is part of the baseline).
    for _ in 0..3 {
        assert_eq!(client.sign("/signin", "alice", "wrong horse").status, 401);
    }
    let before = rss_kib(web.pid());
    let started = Instant::now();

    // 160 forms of 1.5 MB, each with a new name (the issue's reproduction).
    let mut huge = Vec::new();
    for i in 0..160 {
        let route = if i % 2 == 0 { "/signin" } else { "/signup" };
        huge.push(post_long_name(&client, route, i, 1_500_000));
    }
    let after_huge = rss_kib(web.pid());
    // 2,000 forms of 12 kB (under what any layer reads whole, over a form's 4 KiB), each
    // with a new name.
    let mut long = Vec::new();
    for i in 0..2000 {
        let route = if i % 2 == 0 { "/signin" } else { "/signup" };
        long.push(post_long_name(&client, route, i, 12_000));
    }
    let after_long = rss_kib(web.pid());
    // Names that fit a form but are no names.
    let short: Vec<Option<u16>> = (0..200)
        .map(|i| post_long_name(&client, "/signin", i, 3_000))
        .collect();
    // Distinct valid names from one address.
    let valid: Vec<u16> = (0..200)
        .map(|i| {
            client
                .sign("/signin", &format!("{i:0>32}"), "wrong horse")
                .status
        })
        .collect();
    let after = rss_kib(web.pid());
    eprintln!(
        "RSS {before} KiB, after the 1.5 MB forms {after_huge} KiB, after the 12 kB forms \
         {after_long} KiB, at the end {after} KiB; 2,560 requests in {:?}",
        started.elapsed()
    );
    assert!(
        after < before + 20 * 1024,
        "the gateway grew from {before} KiB to {after} KiB"
    );
    // Each refused before its name is kept anywhere: too large (413), no name (400), or
    // the address's limit (429) once its burst is spent.
    let answered: Vec<u16> = huge.iter().flatten().copied().collect();
    assert!(
        answered.iter().all(|s| *s == 413) && answered.len() >= 80,
        "every 1.5 MB form is refused as too large: {huge:?}"
    );
    assert!(
        long.iter().all(|s| *s == Some(413)),
        "every 12 kB form is refused as too large"
    );
    assert!(
        short.iter().all(|s| *s == Some(400)),
        "3 kB names: {short:?}"
    );
    // (The address's burst is 10, refilled one every 6 s: a slow run earns a few more.)
    let limited = valid.iter().filter(|s| **s == 429).count();
    assert!(
        valid.iter().all(|s| *s == 401 || *s == 429) && limited >= 150,
        "{limited} of 200 rate-limited: {valid:?}"
    );
    // It still serves its owner.
    let mut owner = Client::new(&web, "127.0.0.5");
    owner.prime();
    assert_eq!(owner.sign("/signin", "alice", "correct horse").status, 303);
}

#[test]
fn guesses_from_one_address_never_lock_the_owner_out_on_another() {
    let fed = Federation::start("200ms");
    fed.web_add_user("web-data", "alice", "correct horse");
    let web = fed.web_hosted_with("web-data", &[]);

    // The attacker guesses alice's password from 127.0.0.2 until it is refused.
    let mut attacker = Client::new(&web, "127.0.0.2");
    attacker.prime();
    let started = Instant::now();
    let statuses: Vec<u16> = (0..8)
        .map(|_| attacker.sign("/signin", "alice", "guess guess").status)
        .collect();
    let with_password = attacker.sign("/signin", "alice", "correct horse").status;
    // The pair's burst is 5, refilled one every 12 s: a run slower than that (each refused
    // guess pays for Argon2) earns one more guess per 12 s, never the owner's lock-out.
    let refills = (started.elapsed().as_secs() / 12) as usize;
    eprintln!("9 sign-ins in {:?}", started.elapsed());
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    let limited = statuses[5..].iter().filter(|s| **s == 429).count();
    assert!(
        statuses[5..].iter().all(|s| *s == 401 || *s == 429) && limited + refills >= 3,
        "{statuses:?} in {:?}",
        started.elapsed()
    );
    if refills == 0 {
        assert_eq!(
            with_password, 429,
            "that address is done with alice, even with her password"
        );
    }
    // Other names from the same address run into the address's own limit.
    let others: Vec<u16> = (0..10)
        .map(|i| {
            attacker
                .sign("/signin", &format!("user{i}"), "guess guess")
                .status
        })
        .collect();
    assert_eq!(others.last(), Some(&429), "{others:?}");

    // Alice, from her own address, signs in at once.
    let mut owner = Client::new(&web, "127.0.0.3");
    owner.prime();
    let signed_in = owner.sign("/signin", "alice", "correct horse");
    assert_eq!(signed_in.status, 303, "{signed_in:?}");
    assert!(
        signed_in
            .cookies()
            .iter()
            .any(|c| c.starts_with("agora_session=")),
        "{signed_in:?}"
    );
}

#[test]
fn a_refused_sign_in_reads_the_same_for_a_missing_account_as_for_an_existing_one() {
    // How long each takes is checked structurally (accounts.rs: both pay one Argon2
    // check, or none for an over-long password); here, what the answer says.
    let fed = Federation::start("200ms");
    fed.web_add_user("web-data", "alice", "correct horse");
    let web = fed.web_hosted_with("web-data", &[]);
    let long = "x".repeat(1100);
    for (i, password) in ["wrong horse", long.as_str()].into_iter().enumerate() {
        let mut answers = Vec::new();
        for (j, name) in ["alice", "nobody"].into_iter().enumerate() {
            // A fresh address each: the limiter is not what answers.
            let mut client = Client::new(&web, &format!("127.0.1.{}", 10 + 2 * i + j));
            client.prime();
            let reply = client.sign("/signin", name, password);
            // Each page carries a fresh form token: everything else must match.
            let body = match attribute(&reply.body, r#"name="csrf""#, "value") {
                Some(token) => reply.body.replace(&token, "TOKEN"),
                None => reply.body,
            };
            answers.push((reply.status, body));
        }
        assert_eq!(answers[0].0, 401, "{answers:?}");
        assert_eq!(answers[0], answers[1], "the answers tell the names apart");
    }
}

#[test]
fn a_sign_up_for_a_name_the_registry_gives_another_key_leaves_no_account() {
    let fed = Federation::start("200ms");
    let registered = fed.cli("mallory", &["register", "mallory"], "");
    assert_eq!(registered.code, Some(0), "{registered:?}");
    let web = fed.web_hosted_with("web-data", &["--open-signup"]);
    let mut client = Client::new(&web, "127.0.0.1");
    client.prime();

    let refused = client.sign("/signup", "mallory", "mallory's password");
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(
        refused.body.contains("belongs to another key"),
        "{}",
        refused.body
    );
    assert!(refused
        .cookies()
        .iter()
        .all(|c| !c.starts_with("agora_session=")));
    for file in [
        "accounts/mallory",
        "keys/mallory.key",
        "keys/mallory.key_secret",
    ] {
        let path = std::path::Path::new(&fed.path("web-data")).join(file);
        assert!(!path.exists(), "{file} was left behind");
    }
    let signed_in = client.sign("/signin", "mallory", "mallory's password");
    assert_eq!(signed_in.status, 401, "{signed_in:?}");
    // The registry still binds mallory to the first key only.
    let whois = fed.cli("mallory", &["whois", "mallory"], "");
    assert!(whois.stdout.contains(&fed.user_key("mallory")), "{whois:?}");

    // An account made by add-user whose name someone else registered meanwhile cannot
    // sign in under it.
    fed.web_add_user("web-data", "trudy", "trudy's password");
    let taken = fed.cli("trudy", &["register", "trudy"], "");
    assert_eq!(taken.code, Some(0), "{taken:?}");
    let mut trudy = Client::new(&web, "127.0.0.3");
    trudy.prime();
    let refused = trudy.sign("/signin", "trudy", "trudy's password");
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(
        refused.body.contains("belongs to another key"),
        "{}",
        refused.body
    );

    // A free name is registered, then kept.
    let mut bob = Client::new(&web, "127.0.0.2");
    bob.prime();
    assert_eq!(
        bob.sign("/signup", "bob", "bob's long password").status,
        303
    );
    let whois = fed.cli("mallory", &["whois", "bob"], "");
    assert_eq!(whois.code, Some(0), "{whois:?}");
}

/// The session cookie a personal gateway's token URL buys.
fn personal_session(web: &Server, client: &mut Client) {
    let path = web
        .endpoint
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_owned()))
        .expect("a path with the token");
    let redeemed = client.call("GET", &path, &[], b"").expect("token");
    assert_eq!(redeemed.status, 303, "{redeemed:?}");
    assert!(
        client
            .cookies
            .iter()
            .any(|c| c.starts_with("agora_session=")),
        "{redeemed:?}"
    );
    let page = client.call("GET", "/", &[], b"").expect("the page");
    client.session_csrf = attribute(&page.body, r#"name="agora-csrf""#, "content");
}

/// An upload to `group` declaring `len` bytes with the first `first` of them sent.
fn upload_start(client: &Client, group: &str, len: u64, first: usize) -> TcpStream {
    client.start(
        "POST",
        &format!("/files/{group}?name=f.bin&type=application/octet-stream"),
        &[("Content-Type", "application/octet-stream")],
        len,
        &vec![7u8; first],
    )
}

#[test]
fn an_upload_is_refused_before_its_body_unless_the_caller_is_a_member_with_a_free_slot() {
    let fed = Federation::start("200ms");
    let _closed = fed.node("Closed", "127.0.0.1:0", "closed", &[]);
    let _open = fed.node("Open", "127.0.0.1:0", "open", &[]);
    fed.join_when_listed("alice", "Open");
    // The spool's bound through its variable (AGORA_WEB_MAX_SPOOL_BYTES), as a deployment
    // may set it.
    let mut command = fed.web_personal_command("alice");
    command.env("AGORA_WEB_MAX_SPOOL_BYTES", "3000000");
    let web = Server::spawn_command(command, "agora-web", &fed.dir.path().join("web-alice.log"))
        .wait_listening(agora_tests::START_TIMEOUT);
    let mut client = Client::new(&web, "127.0.0.1");
    personal_session(&web, &mut client);

    // A 1 GiB upload to a group alice is not in: refused after its first 64 KiB, while the
    // rest is never sent.
    let started = Instant::now();
    let mut stream = upload_start(&client, "Closed", 1 << 30, 64 << 10);
    let refused = read_reply(&mut stream).expect("an answer before the body");
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(refused.body.contains("not_member"), "{refused:?}");
    eprintln!("refused in {:?}", started.elapsed());
    let mut stream = upload_start(&client, "No%20Such%20Group", 1 << 30, 64 << 10);
    let unknown = read_reply(&mut stream).expect("an answer before the body");
    assert_eq!(unknown.status, 404, "{unknown:?}");

    // More than the spool's share for one identity: refused before the body.
    let mut stream = upload_start(&client, "Open", 2_000_000, 1 << 10);
    let full = read_reply(&mut stream).expect("an answer before the body");
    assert_eq!(full.status, 507, "{full:?}");

    // Uploads in progress (their bodies trickling): four are held (no answer in 3 s: the
    // gateway waits for the rest of the body), and the fifth is refused. Its answer may take
    // a while on a loaded machine, so it is read with the usual reply timeout.
    let mut hanging = Vec::new();
    for i in 0..4 {
        let mut stream = upload_start(&client, "Open", 100_000, 1 << 10);
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let reply = read_reply(&mut stream);
        assert!(reply.is_none(), "upload {i} is in progress: {reply:?}");
        hanging.push(stream);
    }
    let mut stream = upload_start(&client, "Open", 100_000, 1 << 10);
    let busy = read_reply(&mut stream).expect("the fifth upload is answered");
    assert_eq!(busy.status, 429, "{busy:?}");
    assert!(busy.body.contains("limit_reached"), "{busy:?}");

    // One given up frees its slot: a whole upload goes through.
    drop(hanging.pop());
    let mut sent = None;
    let through = wait_for(Duration::from_secs(10), || {
        let reply = client.call(
            "POST",
            "/files/Open?name=hello.txt&type=text/plain",
            &[("Content-Type", "text/plain")],
            b"hello",
        );
        let ok = reply.as_ref().is_some_and(|r| r.status == 200);
        sent = reply;
        ok
    });
    assert!(through, "{sent:?}");
    assert!(
        sent.is_some_and(|r| r.body.contains(r#""ok":true"#)),
        "the upload was sent"
    );
}

#[test]
fn one_address_cannot_hold_every_upload_slot_whatever_its_accounts() {
    let fed = Federation::start("200ms");
    let _open = fed.node("Open", "127.0.0.1:0", "open", &[]);
    fed.join_when_listed("carol", "Open");
    for name in ["u1", "u2"] {
        fed.web_add_user("web-data", name, "correct horse");
        // user-cli with the account's key pair (the gateway keeps it) joins for it.
        let keys = format!("{}/keys", fed.path("web-data"));
        let state = fed.path(&format!("state-{name}"));
        let registry_key = fed.registry_key();
        let joined = agora_tests::cli(
            &[
                "--registry",
                &fed.registry.endpoint,
                "--user",
                name,
                "join",
                "Open",
            ],
            "",
            &[
                ("AGORA_KEY_DIR", keys.as_str()),
                ("AGORA_STATE_DIR", state.as_str()),
                ("AGORA_REGISTRY_KEY", registry_key.as_str()),
            ],
        );
        assert_eq!(joined.code, Some(0), "{joined:?}");
    }
    let mut command = fed.web_hosted_command("web-data");
    command.env("AGORA_WEB_MAX_UPLOADS_PER_ADDRESS", "3");
    let web = Server::spawn_command(command, "agora-web", &fed.dir.path().join("web.log"))
        .wait_listening(agora_tests::START_TIMEOUT);
    // Two accounts signed in from one address.
    let mut sessions = Vec::new();
    for name in ["u1", "u2"] {
        let mut client = Client::new(&web, "127.0.0.1");
        client.prime();
        assert_eq!(client.sign("/signin", name, "correct horse").status, 303);
        let page = client.call("GET", "/", &[], b"").expect("the page");
        client.session_csrf = attribute(&page.body, r#"name="agora-csrf""#, "content");
        sessions.push(client);
    }
    // An upload started, and its answer within `wait` (none: it is in progress).
    let answer = |client: &Client, wait: Duration| {
        let mut stream = upload_start(client, "Open", 100_000, 1 << 10);
        stream.set_read_timeout(Some(wait)).expect("timeout");
        (read_reply(&mut stream), stream)
    };
    let in_progress = Duration::from_secs(3);
    // Three uploads in progress from 127.0.0.1: two of u1's, one of u2's.
    let mut hanging = Vec::new();
    for i in [0, 0, 1] {
        let (reply, stream) = answer(&sessions[i], in_progress);
        assert!(reply.is_none(), "an upload in progress: {reply:?}");
        hanging.push(stream);
    }
    // u2 has slots left, 127.0.0.1 has not (the refusal read with the usual reply timeout:
    // a loaded machine may take more than 3 s to answer).
    let (busy, _) = answer(&sessions[1], REPLY_TIMEOUT);
    let busy = busy.expect("an answer before the body");
    assert_eq!(busy.status, 429, "{busy:?}");
    assert!(busy.body.contains("limit_reached"), "{busy:?}");
    // The same session from another address goes on.
    sessions[1].from = "127.0.0.2".to_owned();
    let (elsewhere, _stream) = answer(&sessions[1], in_progress);
    assert!(elsewhere.is_none(), "refused from 127.0.0.2: {elsewhere:?}");
}

#[test]
fn a_hosted_data_directory_others_can_read_is_tightened_and_a_password_of_spaces_refused() {
    let fed = Federation::start("200ms");
    fed.web_add_user("web-data", "alice", "correct horse");
    let data = std::path::PathBuf::from(fed.path("web-data"));
    std::fs::create_dir_all(data.join("spool")).expect("spool");
    for (path, loose) in [
        ("", 0o755),
        ("accounts", 0o755),
        ("keys", 0o755),
        ("spool", 0o777),
        ("accounts/alice", 0o644),
        ("keys/alice.key_secret", 0o644),
    ] {
        std::fs::set_permissions(data.join(path), std::fs::Permissions::from_mode(loose))
            .expect("chmod");
    }
    let web = fed.web_hosted_with("web-data", &["--open-signup"]);
    for (path, tight) in [
        ("", 0o700),
        ("accounts", 0o700),
        ("keys", 0o700),
        ("spool", 0o700),
        ("accounts/alice", 0o600),
        ("keys/alice.key_secret", 0o600),
    ] {
        let mode = std::fs::metadata(data.join(path))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, tight, "{path}: {mode:o}");
    }
    assert!(web.log().contains("tightened permissions"), "{}", web.log());

    // Eight spaces are no password, on the command line or on the page.
    let spaces = agora_tests::run(
        "agora-web",
        &["add-user", "bob", "--data-dir", &fed.path("web-data")],
        "        \n",
    );
    assert_eq!(spaces.code, Some(2), "a usage error: {spaces:?}");
    let mut client = Client::new(&web, "127.0.0.1");
    client.prime();
    let refused = client.sign("/signup", "carol", "        ");
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(!data.join("accounts/carol").exists());
    assert!(!data.join("accounts/bob").exists());
}
