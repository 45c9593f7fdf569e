//! Attack suite (docs/SECURITY.md): markup in every field another person controls reaches the
//! page as text, never as HTML, in a real headless Chromium; and an attachment comes back
//! from the gateway with headers that keep the browser from running it.
//!
//! The peer-controlled fields the page shows: a group's name (the group list and the title),
//! a message's text, a message whose body is a JSON object, an attachment's name, caption and
//! media type, and a direct message's text. (User names are restricted to letters, digits,
//! `.`, `_` and `-` by the protocol, so they cannot carry markup.) Each payload would run a
//! script if it were parsed as HTML: the test checks that no alert fired, that no element in
//! the document has an event-handler attribute, that the page has no script but its own, and
//! that each payload is shown literally.

use std::time::{Duration, Instant};

use agora_tests::{Chromedriver, Federation, Server};
use fantoccini::{Client, Locator};
use serde::Deserialize;

/// A group named with markup (64 characters at most, no control characters).
const GROUP: &str = "<img src=x onerror=alert(1)>";
const IMG: &str = "<img src=x onerror=alert(2)>";
const SVG: &str = "<svg onload=alert(3)>";
const SCRIPT: &str = "\"><script>alert(4)</script>";
const SHOW_TIMEOUT: Duration = Duration::from_secs(15);
const TEST_DEADLINE: Duration = Duration::from_secs(150);

/// What the test reads off the page in one look.
#[derive(Debug, Deserialize)]
struct Look {
    title: String,
    groups: Vec<String>,
    /// The group list's visible names.
    group_names: Vec<String>,
    /// `.text` of every `#messages .message`.
    texts: Vec<String>,
    /// The attachment links' text.
    files: Vec<String>,
    /// Elements anywhere with an attribute whose name starts with `on`.
    handlers: Vec<String>,
    /// `script` elements, by `src`.
    scripts: Vec<String>,
    /// `img`, `svg`, `iframe`, `object` and `embed` elements in `#messages`.
    embedded: Vec<String>,
    /// Whether a payload ran (each sets this as well as calling `alert`).
    pwned: bool,
}

const LOOK: &str = r##"
const all = (selector) => [...document.querySelectorAll(selector)];
return {
  title: document.querySelector("#title") ? document.querySelector("#title").textContent : "",
  groups: all("#groups li[data-group]").map((li) => li.dataset.group),
  group_names: all("#groups li[data-group] .name").map((n) => n.textContent),
  texts: all("#messages .message .text").map((n) => n.textContent),
  files: all("#messages a.file").map((n) => n.textContent),
  handlers: all("*").filter((e) => [...e.attributes].some((a) => a.name.startsWith("on")))
    .map((e) => e.outerHTML.slice(0, 200)),
  scripts: all("script").map((s) => s.src),
  embedded: all("#messages img, #messages svg, #messages iframe, #messages object, #messages embed")
    .map((e) => e.outerHTML.slice(0, 200)),
  pwned: window.agoraPwned === true,
};
"##;

async fn look(client: &Client) -> Look {
    let value = client
        .execute(LOOK, Vec::new())
        .await
        .unwrap_or_else(|e| panic!("looking at the page: {e}"));
    serde_json::from_value(value).unwrap_or_else(|e| panic!("the page's look: {e}"))
}

/// Looks until `done` holds, or panics with the last look after [`SHOW_TIMEOUT`].
async fn wait(client: &Client, what: &str, done: impl Fn(&Look) -> bool) -> Look {
    let deadline = Instant::now() + SHOW_TIMEOUT;
    loop {
        let seen = look(client).await;
        if done(&seen) {
            return seen;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not within {SHOW_TIMEOUT:?}; the page: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nothing ran and nothing was parsed as markup.
async fn assert_inert(client: &Client, seen: &Look) {
    assert!(!seen.pwned, "a payload ran: {seen:#?}");
    assert!(seen.handlers.is_empty(), "event handlers: {seen:#?}");
    assert!(
        seen.scripts.iter().all(|s| s.ends_with("/app.js")),
        "scripts other than the page's: {seen:#?}"
    );
    assert!(seen.embedded.is_empty(), "embedded elements: {seen:#?}");
    match client.get_alert_text().await {
        Err(e) if e.is_no_such_alert() => {}
        Ok(text) => panic!("an alert fired: {text:?}"),
        Err(e) => panic!("asking for an alert: {e}"),
    }
}

fn ok(run: agora_tests::CliRun) -> agora_tests::CliRun {
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

/// The session cookie a personal gateway's token buys, over plain HTTP.
fn redeem(web: &Server) -> String {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(5))
        .build();
    let response = match agent.get(&web.endpoint).call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {}: {e}", web.endpoint),
    };
    response
        .header("Set-Cookie")
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie from {}", web.endpoint))
        .to_owned()
}

#[test]
fn markup_in_every_peer_controlled_field_is_shown_as_text_and_runs_nothing() {
    let fed = Federation::start("200ms");
    let _node = fed.node(GROUP, "127.0.0.1:0", "xss", &[]);
    for user in ["alice", "carol"] {
        fed.join_when_listed(user, GROUP);
        ok(fed.cli(user, &["register", user], ""));
    }
    // Every payload also sets a flag, in case an alert were swallowed.
    let flagged = |p: &str| p.replace("alert(", "window.agoraPwned=true,alert(");
    let (img, svg, script) = (flagged(IMG), flagged(SVG), flagged(SCRIPT));
    // From history: a text, an object body, a file with a markup name, caption and type.
    ok(fed.cli("carol", &["send", GROUP, &img], ""));
    let object = serde_json::json!({ svg.clone(): script.clone() }).to_string();
    ok(fed.cli("carol", &["send", GROUP, "--json-body", &object], ""));
    let dir = tempfile::tempdir().expect("a directory");
    let file_name = format!("{svg}.svg");
    let file = dir.path().join(&file_name);
    std::fs::write(
        &file,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"window.agoraPwned=true\"/>",
    )
    .expect("the file");
    let path = file.to_string_lossy().into_owned();
    let sent = ok(fed.cli(
        "carol",
        &[
            "send_file",
            GROUP,
            &path,
            "--caption",
            &script,
            "--media-type",
            "image/svg+xml",
        ],
        "",
    ));
    ok(fed.cli("carol", &["send_dm", "alice", &img], ""));

    // The attachment over HTTP: never inline, never sniffed, sandboxed if opened.
    let fetcher = fed.web_personal("alice");
    let cookie = redeem(&fetcher);
    let base = fetcher
        .endpoint
        .split("/?")
        .next()
        .expect("a base URL")
        .to_owned();
    // "sent to GROUP: seq N at TIME"
    let seq: u64 = sent
        .stdout
        .split("seq ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|seq| seq.parse().ok())
        .unwrap_or_else(|| panic!("no seq in {sent:?}"));
    let encoded = percent_encoding::utf8_percent_encode(GROUP, percent_encoding::NON_ALPHANUMERIC);
    let url = format!("{base}/files/{encoded}/{seq}");
    let response = match ureq::get(&url).set("Cookie", &cookie).call() {
        Ok(r) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    assert_eq!(
        response.header("Content-Type"),
        Some("application/octet-stream"),
        "an SVG is not served as an image"
    );
    let disposition = response.header("Content-Disposition").unwrap_or_default();
    assert!(disposition.starts_with("attachment;"), "{disposition}");
    assert!(
        !disposition.contains('<') && !disposition.contains('"'),
        "{disposition}"
    );
    assert_eq!(response.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(
        response.header("Cross-Origin-Resource-Policy"),
        Some("same-origin"),
        "no page of another origin (another port is same site) may load it"
    );
    let csp = response
        .header("Content-Security-Policy")
        .unwrap_or_default();
    assert!(
        csp.contains("sandbox") && csp.contains("default-src 'none'"),
        "{csp}"
    );

    let web = fed.web_personal("alice");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let profile = tempfile::tempdir().expect("a profile");
    let driver = Chromedriver::start(fed.dir.path());
    runtime.block_on(async {
        let run = async {
            let client = driver.session(profile.path(), 1100, 720).await;
            client.goto(&web.endpoint).await.expect("the page");
            let seen = wait(&client, "the group listed with its literal name", |l| {
                l.groups.iter().any(|g| g == GROUP) && l.group_names.iter().any(|g| g == GROUP)
            })
            .await;
            assert_inert(&client, &seen).await;
            let selector = "#groups li[data-group] .name";
            client
                .find(Locator::Css(selector))
                .await
                .expect("the group in the list")
                .click()
                .await
                .expect("opening the group");
            let seen = wait(&client, "the history, literally", |l| {
                l.texts.iter().any(|t| t == &img)
                    && l.texts.iter().any(|t| t == &object)
                    && l.texts.iter().any(|t| t == &script)
                    && l.files.iter().any(|f| f.starts_with(&file_name))
            })
            .await;
            assert!(
                seen.title.contains(GROUP),
                "the title, literally: {seen:#?}"
            );
            assert_inert(&client, &seen).await;

            // One more, pushed live.
            let live = flagged("<iframe srcdoc='<script>alert(5)</script>'>");
            ok(fed.cli("carol", &["send", GROUP, &live], ""));
            let seen = wait(&client, "the live message, literally", |l| {
                l.texts.iter().any(|t| t == &live)
            })
            .await;
            assert_inert(&client, &seen).await;

            // The direct message, in carol's conversation.
            client
                .find(Locator::Css(r#"#people li[data-user="carol"]"#))
                .await
                .expect("carol in #people")
                .click()
                .await
                .expect("opening carol's conversation");
            let seen = wait(&client, "the direct message, literally", |l| {
                l.texts.iter().any(|t| t == &img) && !l.texts.iter().any(|t| t == &object)
            })
            .await;
            assert_inert(&client, &seen).await;
            client.close().await.expect("closing the session");
        };
        if tokio::time::timeout(TEST_DEADLINE, run).await.is_err() {
            panic!("the test ran past {TEST_DEADLINE:?}");
        }
    });
}
