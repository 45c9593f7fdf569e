//! agora-web's personal-mode sign-in links after the first one, and the registry key user-cli
//! pinned (issue 23, item 11): `agora-web link` asks the running gateway for a new one-time
//! link over its local socket (no restart), links expire, the `401` page names the command,
//! and a gateway started without `--registry-key` uses user-cli's pin.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agora_tests::{run, run_command, Federation, Server, START_TIMEOUT};

/// Follows no redirect: the cookie comes with the redirect.
fn get(url: &str, cookie: Option<&str>) -> ureq::Response {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(5))
        .build();
    let mut request = agent.get(url);
    if let Some(c) = cookie {
        request = request.set("Cookie", c);
    }
    match request.call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// Opens a sign-in link: the session cookie (`agora_session=…`) it sets, or `None` and the
/// status and body when it is refused.
fn sign_in(url: &str) -> Result<String, (u16, String)> {
    let response = get(url, None);
    let status = response.status();
    match response.header("Set-Cookie") {
        Some(set) if status == 303 => Ok(set.split(';').next().expect("name=value").to_owned()),
        _ => Err((status, response.into_string().unwrap_or_default())),
    }
}

/// The base URL (`http://127.0.0.1:PORT`) of a link.
fn base(url: &str) -> &str {
    url.split_once("/?token=").expect("a link").0
}

/// `agora-web link ARGS`: (exit code, stdout, stderr).
fn agora_web_link(args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["link"];
    all.extend_from_slice(args);
    let ran = run("agora-web", &all, "");
    (ran.code, ran.stdout, ran.stderr)
}

/// A personal gateway for `user` with its link socket at `socket` and `extra` arguments.
fn gateway(fed: &Federation, user: &str, socket: &Path, extra: &[&str]) -> Server {
    let mut command = fed.web_personal_command(user);
    command.arg("--link-socket").arg(socket).args(extra);
    Server::spawn_command(
        command,
        "agora-web",
        &fed.dir.path().join(format!("web-{user}.log")),
    )
    .wait_listening(START_TIMEOUT)
}

#[test]
fn a_spent_link_is_refused_with_the_command_that_mints_a_new_one_which_works_once() {
    let fed = Federation::start("200ms");
    let socket = fed.dir.path().join("run").join("link.sock");
    let web = gateway(&fed, "alice", &socket, &[]);
    let printed = web.endpoint.clone();

    // Only its user can reach the socket: 0600 in a 0700 directory.
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().expect("dir")), 0o700);

    let cookie = sign_in(&printed).expect("the printed link signs in");
    assert_eq!(
        get(&format!("{}/", base(&printed)), Some(&cookie)).status(),
        200
    );

    // The same link again in the same browser: the page, not a 401.
    let again = get(&printed, Some(&cookie));
    assert_eq!(again.status(), 303, "a signed-in browser goes to the page");
    assert_eq!(again.header("Location"), Some("/"));

    // Elsewhere (no cookie): refused, and the page says what to run.
    let (status, page) = sign_in(&printed).expect_err("the link works once");
    assert_eq!(status, 401);
    let command = page
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("agora-web link"))
        .unwrap_or_else(|| panic!("no command on the 401 page:\n{page}"))
        .to_owned();
    assert_eq!(
        command,
        format!("agora-web link --link-socket {}", socket.display()),
        "{page}"
    );
    assert!(page.contains("5m"), "it says how long a link works: {page}");

    // Run what the page says: a new link, without a restart.
    let args: Vec<&str> = command.split_whitespace().skip(2).collect();
    let (code, stdout, stderr) = agora_web_link(&args);
    assert_eq!(code, Some(0), "{stderr}");
    let fresh = stdout.trim().to_owned();
    assert_eq!(base(&fresh), base(&printed), "{fresh}");
    assert_ne!(fresh, printed);
    let second = sign_in(&fresh).expect("the new link signs in");
    assert_ne!(second, cookie, "a session of its own");
    assert_eq!(
        get(&format!("{}/", base(&fresh)), Some(&second)).status(),
        200
    );
    assert_eq!(
        sign_in(&fresh).expect_err("once").0,
        401,
        "the new link works once too"
    );
    // And again: each command gives a link of its own.
    let (code, stdout, stderr) = agora_web_link(&args);
    assert_eq!(code, Some(0), "{stderr}");
    assert_ne!(stdout.trim(), fresh);
    sign_in(stdout.trim()).expect("the third link signs in");

    // The first session is still live: minting takes nothing away.
    assert_eq!(
        get(&format!("{}/", base(&printed)), Some(&cookie)).status(),
        200
    );
}

/// A link minted on a gateway's socket, and when: just before asking, just after the answer.
struct Minted {
    url: String,
    asked: Instant,
    answered: Instant,
}

/// Mints a link straight from the link socket (the protocol `agora-web link` speaks).
fn mint(socket: &Path) -> Minted {
    let asked = Instant::now();
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(b"link\n").expect("ask");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("answer");
    let url = line
        .trim()
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();
    Minted {
        url,
        asked,
        answered: Instant::now(),
    }
}

/// `d` in whole milliseconds, for messages (`3012 ms`).
fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// How many unused links a gateway keeps (agora-web's `auth::MAX_LINKS`): more, and the
/// oldest is dropped.
const MAX_LINKS: usize = 16;

#[test]
fn an_unused_link_expires_after_the_link_ttl() {
    let fed = Federation::start("200ms");
    let socket = fed.dir.path().join("run").join("link.sock");
    let ttl = Duration::from_secs(3);
    let _web = gateway(&fed, "alice", &socket, &["--link-ttl", "3s"]);

    // A link tried at once works. A refusal is a failure unless it came at least the ttl
    // after the link was asked for (a machine too loaded to try it in time proves nothing:
    // another is minted).
    let deadline = Instant::now() + ttl + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "no fresh link could be tried in time"
        );
        let link = mint(&socket);
        match sign_in(&link.url) {
            Ok(_) => break,
            Err((status, page)) => {
                let age = link.asked.elapsed();
                assert!(
                    age >= ttl,
                    "a fresh link was refused ({status}) {} after it was asked for: {page}",
                    ms(age)
                );
            }
        }
    }

    // Then the expiry. Every GET of a link spends it, so each probe spends the next of a
    // batch minted together, one every PROBE_EVERY, until one is refused: each accepted link
    // was tried within the ttl of its answer, the refused one no earlier than the ttl after
    // it was asked for. The batch outlasts the ttl (MAX_LINKS probes PROBE_EVERY apart), so
    // it cannot run out while links are young enough to be accepted.
    const PROBE_EVERY: Duration = Duration::from_millis(250);
    let links: Vec<Minted> = (0..MAX_LINKS).map(|_| mint(&socket)).collect();
    let deadline = links[0].asked + ttl + Duration::from_secs(20);
    let mut refused = None;
    let mut accepted = 0;
    for link in &links {
        let tried = Instant::now();
        assert!(
            tried < deadline,
            "no link was refused within {} of minting",
            ms(ttl + Duration::from_secs(20))
        );
        match sign_in(&link.url) {
            Ok(_) => {
                let age = tried.saturating_duration_since(link.answered);
                assert!(
                    age < ttl,
                    "a link was accepted {} after it was minted (ttl {})",
                    ms(age),
                    ms(ttl)
                );
                accepted += 1;
            }
            Err((status, page)) => {
                assert_eq!(status, 401, "{page}");
                let age = link.asked.elapsed();
                assert!(
                    age >= ttl,
                    "a link was refused {} after it was asked for (ttl {})",
                    ms(age),
                    ms(ttl)
                );
                refused = Some(age);
                break;
            }
        }
        std::thread::sleep((tried + PROBE_EVERY).saturating_duration_since(Instant::now()));
    }
    let refused = refused.unwrap_or_else(|| {
        panic!(
            "all {accepted} links were accepted, the last {} after minting",
            ms(links[0].answered.elapsed())
        )
    });
    eprintln!(
        "{accepted} links accepted, then one refused {} after it was asked for (ttl {})",
        ms(refused),
        ms(ttl)
    );
}

#[test]
fn the_link_socket_is_one_gateways_and_a_link_without_a_gateway_is_unreachable() {
    let fed = Federation::start("200ms");
    let socket = fed.dir.path().join("run").join("link.sock");
    let socket_arg = socket.to_str().expect("utf-8");

    // The test's directory is 0755 (tempfile's): the sockets go in a directory of their own.
    // No gateway: exit 3 (unreachable), naming the socket.
    let (code, _, stderr) = agora_web_link(&["--link-socket", socket_arg]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("no agora-web answers") && stderr.contains(socket_arg),
        "{stderr}"
    );

    // A gateway killed with SIGKILL leaves its socket; the next one takes it over.
    let mut first = gateway(&fed, "alice", &socket, &[]);
    first.kill9();
    assert!(socket.exists(), "left behind");
    let web = gateway(&fed, "alice", &socket, &[]);
    let (code, stdout, stderr) = agora_web_link(&["--link-socket", socket_arg]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(base(stdout.trim()), base(&web.endpoint));

    // While it runs, a second gateway does not take its socket: exit 4, saying so. (Run with
    // a deadline, as every refusal here: a gateway that serves instead fails the test.)
    let mut second = fed.web_personal_command("bob");
    second.args(["--link-socket", socket_arg]);
    let second = run_command(second, "");
    assert_eq!(second.code, Some(4), "{second:?}");
    assert!(
        second.stderr.contains("another agora-web answers"),
        "{second:?}"
    );

    // A directory others can enter is refused for the socket.
    let shared = fed.dir.path().join("shared");
    std::fs::create_dir(&shared).expect("dir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut refused = fed.web_personal_command("carol");
    refused.arg("--link-socket").arg(shared.join("link.sock"));
    let refused = run_command(refused, "");
    assert_eq!(refused.code, Some(4), "{refused:?}");
    assert!(
        refused.stderr.contains("other users can enter"),
        "{refused:?}"
    );

    // Stopped cleanly, the gateway removes its socket.
    let mut web = web;
    assert!(web.terminate().success());
    assert!(!socket.exists(), "removed at stop");
}

#[test]
fn another_local_user_gets_no_link_even_where_the_socket_is_left_open() {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        eprintln!("skipped: running a command as another user needs root (CI runs as root)");
        return;
    }
    let fed = Federation::start("200ms");
    let socket = fed.dir.path().join("run").join("link.sock");
    let web = gateway(&fed, "alice", &socket, &[]);
    let as_nobody = || {
        let mut command = Command::new(agora_tests::bin("agora-web"));
        std::os::unix::process::CommandExt::uid(&mut command, 65534);
        std::os::unix::process::CommandExt::gid(&mut command, 65534);
        command.args(["link", "--link-socket"]).arg(&socket);
        run_command(command, "")
    };

    // The socket's directory is 0700: another user cannot even reach the socket.
    let denied = as_nobody();
    assert_eq!(denied.code, Some(4), "{denied:?}");
    assert!(denied.stderr.contains("Permission denied"), "{denied:?}");
    assert!(denied.stdout.is_empty(), "{denied:?}");

    // Left open by mistake (the directory enterable, the socket writable by all), the
    // gateway still answers only its own user: no link, nothing said.
    let dir = socket.parent().expect("dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let refused = as_nobody();
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(!refused.stdout.contains("token"), "{refused:?}");
    assert!(
        agora_tests::wait_for(Duration::from_secs(5), || web
            .log()
            .contains("refused another user")),
        "{}",
        web.log()
    );

    // Its own user still gets one.
    let (code, stdout, stderr) =
        agora_web_link(&["--link-socket", socket.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{stderr}");
    sign_in(stdout.trim()).expect("the owner's link signs in");
}

/// A personal gateway started without `--registry-key` (its pins in `state`), its link
/// socket `DIR/<tag>.sock`.
fn keyless(fed: &Federation, tag: &str, state: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(agora_tests::bin("agora-web"));
    for (key, _) in std::env::vars() {
        if key.starts_with("AGORA_") {
            command.env_remove(key);
        }
    }
    command
        .args([
            "--user",
            "alice",
            "--bind",
            "127.0.0.1:0",
            "--registry",
            &fed.registry.endpoint,
            "--key-dir",
            &fed.key_dir(),
            "--state-dir",
            state,
            "--link-socket",
            &fed.path(&format!("run/{tag}.sock")),
        ])
        .args(extra);
    command
}

#[test]
fn without_registry_key_agora_web_uses_the_key_user_cli_pinned() {
    let fed = Federation::start("200ms");
    let state = fed.state_dir();
    let keys = fed.key_dir();
    let key_endpoint = fed
        .registry
        .key_endpoint
        .clone()
        .expect("the registry's key endpoint");
    // user-cli without a key pins the registry's on first use.
    let pinned = agora_tests::cli(
        &[
            "--registry",
            &fed.registry.endpoint,
            "--registry-key-endpoint",
            &key_endpoint,
            "--user",
            "alice",
            "groups",
        ],
        "",
        &[
            ("AGORA_STATE_DIR", state.as_str()),
            ("AGORA_KEY_DIR", keys.as_str()),
        ],
    );
    assert_eq!(pinned.code, Some(0), "{pinned:?}");
    let pins = std::fs::read_to_string(Path::new(&state).join("known_servers.json"))
        .expect("user-cli's pins");
    assert!(pins.contains(&fed.registry_key()), "{pins}");

    // The gateway with no key and a key endpoint that does not answer: only the pin can
    // give it the key. It serves, and its WebSocket reaches the registry with it.
    let web = Server::spawn_command(
        keyless(
            &fed,
            "pinned",
            &state,
            &["--registry-key-endpoint", "tcp://127.0.0.1:1"],
        ),
        "agora-web",
        &fed.dir.path().join("web-keyless.log"),
    )
    .wait_listening(START_TIMEOUT);
    let cookie = sign_in(&web.endpoint).expect("signed in");
    let base = base(&web.endpoint);
    let ws_url = format!("{}/ws", base.replacen("http://", "ws://", 1));
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(ws_url.as_str())
        .expect("request");
    request
        .headers_mut()
        .insert("Cookie", cookie.parse().expect("header"));
    request
        .headers_mut()
        .insert("Origin", base.parse().expect("header"));
    let stream = std::net::TcpStream::connect(base.trim_start_matches("http://")).expect("tcp");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (mut ws, _) = tungstenite::client::client(request, stream).expect("websocket");
    ws.send(tungstenite::Message::Text(
        serde_json::json!({"op": "groups"}).to_string().into(),
    ))
    .expect("send");
    let reply = loop {
        if let tungstenite::Message::Text(t) = ws.read().expect("a reply within 10 s") {
            let message: serde_json::Value = serde_json::from_str(t.as_str()).expect("JSON");
            if message.get("event").is_none() {
                break message;
            }
        }
    };
    assert_eq!(reply["ok"], true, "the registry answered: {reply}");
    drop(web);

    // A pin that is not the registry's key: refused at start (exit 1), saying what to do.
    let other_state = fed.path("other-state");
    std::fs::create_dir(&other_state).expect("dir");
    let stranger = agora_common::keys::Keypair::generate()
        .expect("keys")
        .public;
    std::fs::write(
        Path::new(&other_state).join("known_servers.json"),
        serde_json::json!({ fed.registry.endpoint.clone(): stranger.to_string() }).to_string(),
    )
    .expect("pin");
    let changed = run_command(
        keyless(
            &fed,
            "changed",
            &other_state,
            &["--registry-key-endpoint", &key_endpoint],
        ),
        "",
    );
    assert_eq!(changed.code, Some(1), "{changed:?}");
    assert!(
        changed.stderr.contains("KEY HAS CHANGED") && changed.stderr.contains("forget-registry"),
        "{changed:?}"
    );

    // Nothing pinned and no key endpoint: unreachable (exit 3), naming what to pass.
    let empty = fed.path("empty-state");
    let unknown = run_command(
        keyless(
            &fed,
            "unknown",
            &empty,
            &[
                "--registry-key-endpoint",
                "tcp://127.0.0.1:1",
                "--timeout",
                "1s",
            ],
        ),
        "",
    );
    assert_eq!(unknown.code, Some(3), "{unknown:?}");
    assert!(unknown.stderr.contains("--registry-key"), "{unknown:?}");
}
