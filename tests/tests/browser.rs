//! The chat page in a real browser: headless Chromium, driven over WebDriver (chromedriver and
//! fantoccini), against the real registry, a group node, user-cli and `agora-web`.
//!
//! Written against the page's DOM contract:
//! - `#groups li[data-group=NAME]`, whose `.name` opens the group;
//! - `#messages .message[data-seq=N]` with `.sender`, `.text` (always text, never HTML) and
//!   `.state`; a line the page sent itself is `.message.pending` with the state `sending…`
//!   until it is stored, then carries its seq and the state `#N`;
//! - `#text` in the `#send` form (Enter submits); `#status` for errors;
//! - hosted mode's sign-in page: the form `#signin` with `#name`, `#password`,
//!   `#signin-button`, and `#message` saying why a sign-in was refused.
//!
//! Each test starts its own federation, gateways and chromedriver (whose process group, the
//! browsers included, is killed on drop), one test at a time: a Chromium per test at once on a
//! 2-core machine would make the latency measured the machine's. Chromium's own traffic is sent
//! to a dead loopback proxy, so the only connections it makes are to the gateways on 127.0.0.1.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_tests::{web_csrf, web_origin, Chromedriver, Federation, Server};
use fantoccini::elements::Element;
use fantoccini::key::Key;
use fantoccini::{Client, Locator};
use serde::Deserialize;

const GROUP: &str = "Cool Group";
/// The first message of every test's group, from carol: a page that shows it has the group
/// open and its history read.
const WELCOME: &str = "welcome, everyone";
/// How long the page may take to show what the test waits for (a group, a message, a page).
const SHOW_TIMEOUT: Duration = Duration::from_secs(10);
/// A message typed in one browser shows in another within this.
const LIVE_LATENCY: Duration = Duration::from_secs(2);
/// The whole of one test. Blocking steps (a user-cli run, a server start) have deadlines of
/// their own; this one catches a WebDriver call that hangs.
const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// Between two looks at the page.
const POLL: Duration = Duration::from_millis(20);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `test` alone (see the module's doc), on a tokio runtime, within [`TEST_DEADLINE`].
fn browser_test(test: impl Future<Output = ()>) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        if tokio::time::timeout(TEST_DEADLINE, test).await.is_err() {
            panic!("the test ran past {TEST_DEADLINE:?}");
        }
    });
}

/// A federation whose group [`GROUP`] alice, bob and carol joined, with carol's [`WELCOME`].
struct Chat {
    fed: Federation,
    _node: Server,
    /// The seq of [`WELCOME`].
    welcome: u64,
}

impl Chat {
    fn start() -> Chat {
        let fed = Federation::start("200ms");
        let node = fed.node(GROUP, "127.0.0.1:0", "cool", &[]);
        for user in ["alice", "bob", "carol"] {
            fed.join_when_listed(user, GROUP);
        }
        let welcome = cli_send(&fed, "carol", WELCOME);
        Chat {
            fed,
            _node: node,
            welcome,
        }
    }

    fn chromedriver(&self) -> Chromedriver {
        Chromedriver::start(self.fed.dir.path())
    }
}

/// Sends `text` to [`GROUP`] with user-cli as `user`; the seq it was stored at.
fn cli_send(fed: &Federation, user: &str, text: &str) -> u64 {
    let sent = fed.cli(user, &["send", GROUP, text], "");
    assert_eq!(sent.code, Some(0), "{sent:?}");
    // "sent to GROUP: seq N at TIME"
    sent.stdout
        .split("seq ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|seq| seq.parse().ok())
        .unwrap_or_else(|| panic!("no seq in {sent:?}"))
}

/// What the test reads off the page in one look (one WebDriver call, [`SNAPSHOT`]).
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // Some fields are only read in a failure's Debug output.
struct Page {
    url: String,
    title: String,
    /// The start of the body's text (an error page's message, say).
    body: String,
    /// The chat page: `#messages` is there.
    chat: bool,
    /// The sign-in page: `#signin` is there.
    signin: bool,
    /// The sign-in page's `#message`.
    notice: Option<String>,
    /// `#status`.
    status: Option<String>,
    /// `data-group` of each `#groups li`.
    groups: Vec<String>,
    messages: Vec<Shown>,
    people: Vec<Person>,
    /// `img` elements in `#messages`.
    images: usize,
    /// Elements anywhere in the document with an `onerror` attribute.
    onerror: usize,
}

/// One `#messages .message`.
#[derive(Debug, Clone, Deserialize)]
struct Shown {
    seq: Option<u64>,
    pending: bool,
    sender: Option<String>,
    text: Option<String>,
    state: Option<String>,
    /// `img` elements inside it.
    images: usize,
    /// Those of them loaded (complete, with a width).
    loaded: usize,
}

/// One `#people li[data-user]`.
#[derive(Debug, Clone, Deserialize)]
struct Person {
    user: String,
    presence: Option<String>,
    unread: Option<String>,
}

impl Shown {
    /// The sender's name, without the page's punctuation (`alice: `).
    fn sender(&self) -> &str {
        self.sender
            .as_deref()
            .unwrap_or_default()
            .trim()
            .trim_end_matches(':')
    }

    /// Stored (it has its seq, and is no longer pending) with the text `text`.
    fn is_stored(&self, text: &str) -> bool {
        self.text.as_deref() == Some(text) && self.seq.is_some() && !self.pending
    }
}

impl Page {
    fn stored(&self, text: &str) -> Option<Shown> {
        self.messages.iter().find(|m| m.is_stored(text)).cloned()
    }

    fn person(&self, user: &str) -> Option<Person> {
        self.people.iter().find(|p| p.user == user).cloned()
    }
}

const SNAPSHOT: &str = r##"
const one = (selector) => document.querySelector(selector);
const text = (node) => (node ? node.textContent : null);
return {
  url: location.href,
  title: document.title,
  body: document.body ? document.body.innerText.slice(0, 400) : "",
  chat: one("#messages") !== null,
  signin: one("#signin") !== null,
  notice: text(one("#message")),
  status: text(one("#status")),
  groups: [...document.querySelectorAll("#groups li[data-group]")].map((li) => li.dataset.group),
  messages: [...document.querySelectorAll("#messages .message")].map((m) => ({
    seq: m.dataset.seq ? Number(m.dataset.seq) : null,
    pending: m.classList.contains("pending"),
    sender: text(m.querySelector(".sender")),
    text: text(m.querySelector(".text")),
    state: text(m.querySelector(".state")),
    images: m.querySelectorAll("img").length,
    loaded: [...m.querySelectorAll("img")].filter((i) => i.complete && i.naturalWidth > 0).length,
  })),
  people: [...document.querySelectorAll("#people li[data-user]")].map((li) => ({
    user: li.dataset.user,
    presence: text(li.querySelector(".presence")),
    unread: text(li.querySelector(".unread")),
  })),
  images: document.querySelectorAll("#messages img").length,
  onerror: document.querySelectorAll("[onerror]").length,
};
"##;

/// Records, for each `.message` added to `#messages`, how it looked when it was added (in
/// `window.agoraAdded`): a line that is pending only for a moment is still seen.
const RECORD_ADDED: &str = r##"
window.agoraAdded = [];
new MutationObserver((records) => {
  for (const record of records) {
    for (const node of record.addedNodes) {
      if (node.nodeType !== 1 || !node.matches(".message")) continue;
      const part = (selector) => {
        const found = node.querySelector(selector);
        return found ? found.textContent : null;
      };
      window.agoraAdded.push({
        seq: node.dataset.seq ? Number(node.dataset.seq) : null,
        pending: node.classList.contains("pending"),
        sender: part(".sender"),
        text: part(".text"),
        state: part(".state"),
        images: node.querySelectorAll("img").length,
        loaded: 0,
      });
    }
  }
}).observe(document.querySelector("#messages"), { childList: true, subtree: true });
"##;

/// One browser session: a Chromium with a fresh profile.
struct Browser {
    client: Client,
    /// Who uses it, for messages.
    name: &'static str,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(driver: &Chromedriver, name: &'static str) -> Browser {
        let profile = tempfile::tempdir().expect("a profile dir");
        let client = driver.session(profile.path(), 1100, 720).await;
        Browser {
            client,
            name,
            _profile: profile,
        }
    }

    async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("{}: opening {url}: {e}", self.name));
    }

    async fn page(&self) -> Result<Page, String> {
        let value = self
            .client
            .execute(SNAPSHOT, Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    /// Looks at the page every [`POLL`] until `done` finds something in it.
    ///
    /// # Panics
    /// If it has not within `timeout`, with `what` and the last look at the page.
    async fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Page) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let page = self.page().await;
            if let Some(found) = page.as_ref().ok().and_then(&mut done) {
                return found;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: {what}: not within {timeout:?}; the page: {page:#?}",
                    self.name
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Opens the personal-mode URL with the token, which signs in and leads to the chat page.
    async fn sign_in_with_token(&self, url: &str) {
        self.goto(url).await;
        self.wait("the chat page after the token", SHOW_TIMEOUT, |p| {
            p.chat.then_some(())
        })
        .await;
    }

    /// Clicks the group's `.name` in `#groups` and waits for its history: [`WELCOME`].
    async fn open_group(&self, group: &str) {
        self.wait(
            &format!("#groups li[data-group={group:?}] listed"),
            SHOW_TIMEOUT,
            |p| p.groups.iter().any(|g| g == group).then_some(()),
        )
        .await;
        let selector = format!("#groups li[data-group={group:?}] .name");
        self.find(&selector)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("{}: clicking {selector}: {e}", self.name));
        self.wait(
            &format!("{group}'s history (carol's {WELCOME:?}) shown"),
            SHOW_TIMEOUT,
            |p| p.stored(WELCOME),
        )
        .await;
    }

    async fn find(&self, selector: &str) -> Element {
        self.client
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("{}: the page has no {selector}: {e}", self.name))
    }

    /// Types `text` into `#text`, without sending it; the input, to press Enter in.
    async fn type_text(&self, text: &str) -> Element {
        let input = self.find("#text").await;
        input
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("{}: typing into #text: {e}", self.name));
        input
    }

    async fn press_enter(&self, input: &Element) {
        input
            .send_keys(&Key::Enter.to_string())
            .await
            .unwrap_or_else(|e| panic!("{}: pressing Enter in #text: {e}", self.name));
    }

    /// Waits until a stored message with `text` is shown, and returns it.
    async fn wait_stored(&self, text: &str) -> Shown {
        self.wait(
            &format!("a stored message {text:?} shown"),
            SHOW_TIMEOUT,
            |p| p.stored(text),
        )
        .await
    }

    async fn close(self) {
        let name = self.name;
        self.client
            .close()
            .await
            .unwrap_or_else(|e| panic!("{name}: closing the session: {e}"));
    }
}

/// A 401 page: its text, and no chat page.
fn refused(p: &Page) -> Option<()> {
    (p.body.starts_with("401") && !p.chat).then_some(())
}

/// `target/artifacts`, beside the tests' scratch space (`target/tmp`).
fn artifacts() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("artifacts")
}

#[test]
fn two_browsers_see_each_others_messages_within_two_seconds() {
    browser_test(async {
        let chat = Chat::start();
        let web_alice = chat.fed.web_personal("alice");
        let web_bob = chat.fed.web_personal("bob");
        let driver = chat.chromedriver();
        let alice = Browser::start(&driver, "alice").await;
        let bob = Browser::start(&driver, "bob").await;
        for (browser, web) in [(&alice, &web_alice), (&bob, &web_bob)] {
            browser.sign_in_with_token(&web.endpoint).await;
            browser.open_group(GROUP).await;
        }

        for (from, to, text) in [
            (&alice, &bob, "hello bob, typed in alice's browser"),
            (&bob, &alice, "hello alice, typed in bob's browser"),
        ] {
            let input = from.type_text(text).await;
            let sent = Instant::now();
            from.press_enter(&input).await;
            let shown = to.wait_stored(text).await;
            let latency = sent.elapsed();
            println!("{} -> {}: shown after {latency:?}", from.name, to.name);
            assert_eq!(shown.sender(), from.name, "{shown:?}");
            assert!(
                latency <= LIVE_LATENCY,
                "{} saw {text:?} only after {latency:?} (at most {LIVE_LATENCY:?})",
                to.name
            );
            // The sender's page has it stored too, at the same seq.
            let own = from.wait_stored(text).await;
            assert_eq!(own.seq, shown.seq, "{own:?} / {shown:?}");
        }
        alice.close().await;
        bob.close().await;
    });
}

#[test]
fn a_message_sent_with_user_cli_shows_in_the_browser() {
    browser_test(async {
        let chat = Chat::start();
        let web = chat.fed.web_personal("alice");
        let driver = chat.chromedriver();
        let alice = Browser::start(&driver, "alice").await;
        alice.sign_in_with_token(&web.endpoint).await;
        alice.open_group(GROUP).await;

        // From the history...
        let welcome = alice.wait_stored(WELCOME).await;
        assert_eq!(
            (welcome.seq, welcome.sender()),
            (Some(chat.welcome), "carol"),
            "{welcome:?}"
        );
        // ...and live.
        let text = "sent with user-cli while the page is open";
        let seq = cli_send(&chat.fed, "carol", text);
        let shown = alice.wait_stored(text).await;
        assert_eq!(
            (shown.seq, shown.sender()),
            (Some(seq), "carol"),
            "{shown:?}"
        );
        alice.close().await;
    });
}

#[test]
fn a_message_typed_in_the_browser_is_pending_then_stored_and_user_cli_reads_it() {
    browser_test(async {
        let chat = Chat::start();
        let web = chat.fed.web_personal("alice");
        let driver = chat.chromedriver();
        let alice = Browser::start(&driver, "alice").await;
        alice.sign_in_with_token(&web.endpoint).await;
        alice.open_group(GROUP).await;
        alice
            .client
            .execute(RECORD_ADDED, Vec::new())
            .await
            .expect("a MutationObserver on #messages");

        let text = "typed in the browser, read with user-cli";
        let input = alice.type_text(text).await;
        alice.press_enter(&input).await;
        let stored = alice.wait_stored(text).await;
        let seq = stored.seq.expect("a seq");
        assert_eq!(stored.sender(), "alice", "{stored:?}");
        assert_eq!(
            stored.state.as_deref(),
            Some(format!("#{seq}").as_str()),
            "{stored:?}"
        );
        let added = alice
            .client
            .execute("return window.agoraAdded;", Vec::new())
            .await
            .expect("what the observer saw");
        let added: Vec<Shown> = serde_json::from_value(added).expect("lines");
        let first = added
            .iter()
            .find(|m| m.text.as_deref() == Some(text))
            .unwrap_or_else(|| panic!("the line was never added: {added:?}"));
        assert!(
            first.pending && first.seq.is_none() && first.state.as_deref() == Some("sending…"),
            "first shown as pending with `sending…`: {first:?}"
        );

        let read = chat.fed.cli("bob", &["messages", GROUP], "");
        assert_eq!(read.code, Some(0), "{read:?}");
        assert!(
            read.stdout.contains(&format!("#{seq} alice: {text}")),
            "user-cli shows #{seq}: {read:?}"
        );
        alice.close().await;
    });
}

#[test]
fn markup_in_a_message_renders_as_text() {
    browser_test(async {
        let chat = Chat::start();
        let xss = "<img src=x onerror=alert(1)>";
        // One read from the history, one pushed live.
        let before = cli_send(&chat.fed, "carol", xss);
        let web = chat.fed.web_personal("alice");
        let driver = chat.chromedriver();
        let alice = Browser::start(&driver, "alice").await;
        alice.sign_in_with_token(&web.endpoint).await;
        alice.open_group(GROUP).await;
        let live = cli_send(&chat.fed, "carol", xss);

        alice
            .wait("both markup messages shown", SHOW_TIMEOUT, |p| {
                let seqs: Vec<u64> = p
                    .messages
                    .iter()
                    .filter(|m| m.is_stored(xss))
                    .filter_map(|m| m.seq)
                    .collect();
                (seqs == [before, live]).then_some(())
            })
            .await;
        let page = alice.page().await.expect("a look at the page");
        for shown in page.messages.iter().filter(|m| m.is_stored(xss)) {
            assert_eq!(shown.text.as_deref(), Some(xss), "literally: {shown:?}");
            assert_eq!(shown.images, 0, "no img element: {shown:?}");
        }
        assert_eq!(page.images, 0, "no img in #messages: {page:#?}");
        assert_eq!(page.onerror, 0, "no onerror attribute anywhere: {page:#?}");
        match alice.client.get_alert_text().await {
            Err(e) if e.is_no_such_alert() => {}
            Ok(text) => panic!("an alert fired: {text:?}"),
            Err(e) => panic!("asking for an alert: {e}"),
        }
        alice.close().await;
    });
}

#[test]
fn without_the_token_or_a_session_the_gateway_answers_401() {
    browser_test(async {
        let fed = Federation::start("200ms");
        let web = fed.web_personal("alice");
        let url = web.endpoint.clone();
        let (base, _token) = url.split_once("/?token=").expect("a URL with a token");
        let status = |url: &str| {
            let agent = ureq::AgentBuilder::new()
                .redirects(0)
                .timeout(Duration::from_secs(5))
                .build();
            match agent.get(url).call() {
                Ok(r) | Err(ureq::Error::Status(_, r)) => r.status(),
                Err(e) => panic!("GET {url}: {e}"),
            }
        };
        assert_eq!(status(&format!("{base}/")), 401);
        assert_eq!(status(&format!("{base}/?token=wrong")), 401);

        let driver = Chromedriver::start(fed.dir.path());
        let stranger = Browser::start(&driver, "a stranger").await;
        stranger.goto(&format!("{base}/")).await;
        stranger
            .wait("401 without the token", SHOW_TIMEOUT, refused)
            .await;
        stranger.goto(&format!("{base}/?token=wrong")).await;
        stranger
            .wait("401 with a wrong token", SHOW_TIMEOUT, refused)
            .await;

        let alice = Browser::start(&driver, "alice").await;
        alice.sign_in_with_token(&url).await;
        // The token is spent; alice's cookie is hers alone.
        stranger.goto(&url).await;
        stranger
            .wait("401 with the spent token", SHOW_TIMEOUT, refused)
            .await;
        stranger.goto(&format!("{base}/")).await;
        stranger.wait("401 still", SHOW_TIMEOUT, refused).await;
        alice.goto(&format!("{base}/")).await;
        alice
            .wait("the chat page with the session", SHOW_TIMEOUT, |p| {
                p.chat.then_some(())
            })
            .await;
        assert_eq!(status(&format!("{base}/")), 401);
        assert_eq!(status(&url), 401, "spent");
        stranger.close().await;
        alice.close().await;
    });
}

#[test]
fn a_hosted_sign_in_refuses_a_wrong_password_and_takes_the_right_one() {
    browser_test(async {
        let fed = Federation::start("200ms");
        let _node = fed.node(GROUP, "127.0.0.1:0", "cool", &[]);
        let password = "correct horse battery staple";
        fed.web_add_user("web-data", "dora", password);
        let web = fed.web_hosted("web-data");
        let base = web.endpoint.trim_end_matches('/').to_owned();

        let driver = Chromedriver::start(fed.dir.path());
        let dora = Browser::start(&driver, "dora").await;
        dora.goto(&format!("{base}/")).await;
        dora.wait("the sign-in page", SHOW_TIMEOUT, |p| {
            (p.signin && !p.chat).then_some(())
        })
        .await;
        let sign_in = |password: &'static str| {
            let dora = &dora;
            async move {
                for (selector, value) in [("#name", "dora"), ("#password", password)] {
                    let input = dora.find(selector).await;
                    input.clear().await.expect("clear");
                    input.send_keys(value).await.expect("typing");
                }
                dora.find("#signin-button")
                    .await
                    .click()
                    .await
                    .expect("clicking #signin-button");
            }
        };

        sign_in("not the password").await;
        let (chat, signin) = dora
            .wait("the refusal", SHOW_TIMEOUT, |p| {
                (p.notice.as_deref() == Some("Wrong name or password."))
                    .then_some((p.chat, p.signin))
            })
            .await;
        assert!(
            !chat && signin,
            "refused: the sign-in page again, no chat page"
        );
        // The same refusal as a script gets it, posting as the page does: from the
        // gateway's origin, with the form token the page sets.
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout(Duration::from_secs(10))
            .build();
        let form = agent
            .get(&format!("{base}/"))
            .call()
            .expect("the sign-in page");
        let form_cookie = form
            .all("Set-Cookie")
            .into_iter()
            .find(|c| c.starts_with("agora_form="))
            .and_then(|c| c.split(';').next())
            .expect("the form token's cookie")
            .to_owned();
        let token = web_csrf(&form.into_string().expect("html")).expect("the form token");
        let refused = agent
            .post(&format!("{base}/signin"))
            .set("Origin", &web_origin(&web))
            .set("Cookie", &form_cookie)
            .send_form(&[
                ("name", "dora"),
                ("password", "not the password"),
                ("csrf", &token),
            ]);
        match refused {
            Err(ureq::Error::Status(status, _)) => assert_eq!(status, 401),
            other => panic!("a wrong password is refused with 401: {other:?}"),
        }

        sign_in(password).await;
        dora.wait("the chat page", SHOW_TIMEOUT, |p| {
            (p.chat && !p.signin).then_some(())
        })
        .await;
        // The page's WebSocket works as dora: it lists the federation's group.
        dora.wait(&format!("{GROUP} listed"), SHOW_TIMEOUT, |p| {
            p.groups.iter().any(|g| g == GROUP).then_some(())
        })
        .await;
        // Its sign-out form (same origin, with the session's token) ends the session: the
        // sign-in page again, also after a reload.
        dora.find("#signout button")
            .await
            .click()
            .await
            .expect("clicking Sign out");
        dora.wait("the sign-in page after signing out", SHOW_TIMEOUT, |p| {
            (p.signin && !p.chat).then_some(())
        })
        .await;
        dora.goto(&format!("{base}/")).await;
        dora.wait("still signed out", SHOW_TIMEOUT, |p| {
            (p.signin && !p.chat).then_some(())
        })
        .await;
        dora.close().await;
    });
}

#[test]
fn the_chat_page_with_messages_is_saved_as_a_screenshot_and_fits_a_phone() {
    browser_test(async {
        let chat = Chat::start();
        // Accounts, for #people; bob online.
        for (user, args) in [
            ("alice", &["register", "alice"][..]),
            ("bob", &["register", "bob"]),
            ("carol", &["register", "carol"]),
            ("bob", &["connect"]),
        ] {
            let run = chat.fed.cli(user, args, "");
            assert_eq!(run.code, Some(0), "{run:?}");
        }
        cli_send(&chat.fed, "bob", "Has anyone tried the browser yet?");
        cli_send(
            &chat.fed,
            "carol",
            "Not yet. Does it keep the history when I reload?",
        );
        let web = chat.fed.web_personal("alice");
        let driver = chat.chromedriver();
        let alice = Browser::start(&driver, "alice").await;
        alice.sign_in_with_token(&web.endpoint).await;
        alice.open_group(GROUP).await;
        let typed = "It does: this one was typed in Chromium.";
        let input = alice.type_text(typed).await;
        alice.press_enter(&input).await;
        alice.wait_stored(typed).await;
        cli_send(&chat.fed, "bob", "Nice, it showed up here at once.");
        alice.wait_stored("Nice, it showed up here at once.").await;

        let png = alice.client.screenshot().await.expect("a screenshot");
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
            "a PNG of the page ({} bytes)",
            png.len()
        );
        let dir = artifacts();
        std::fs::create_dir_all(&dir).expect("target/artifacts");
        let path = dir.join("web-page.png");
        std::fs::write(&path, &png).expect("writing the screenshot");
        println!("screenshot: {}", path.display());

        // At phone width the lists stack above the conversation, nothing scrolls sideways,
        // and the message box stays on screen.
        alice
            .client
            .set_window_size(390, 844)
            .await
            .expect("a phone-sized window");
        let layout = alice
            .client
            .execute(
                "const side = document.getElementById('side').getBoundingClientRect();
                 const chat = document.getElementById('chat').getBoundingClientRect();
                 const text = document.getElementById('text').getBoundingClientRect();
                 return [innerWidth, document.documentElement.scrollWidth,
                         side.bottom <= chat.top + 1, text.right <= innerWidth,
                         text.bottom <= innerHeight, text.width];",
                Vec::new(),
            )
            .await
            .expect("the layout");
        assert!(
            layout[0].as_f64().is_some_and(|w| w <= 400.0),
            "a phone-width viewport: {layout}"
        );
        assert_eq!(layout[1], layout[0], "no sideways scrolling: {layout}");
        assert_eq!(
            (&layout[2], &layout[3], &layout[4]),
            (
                &serde_json::json!(true),
                &serde_json::json!(true),
                &serde_json::json!(true)
            ),
            "stacked, and the message box on screen: {layout}"
        );
        assert!(
            layout[5].as_f64().is_some_and(|w| w > 150.0),
            "a usable message box: {layout}"
        );
        let phone = alice.client.screenshot().await.expect("a screenshot");
        let path = dir.join("web-page-phone.png");
        std::fs::write(&path, &phone).expect("writing the screenshot");
        println!("screenshot at phone width: {}", path.display());
        alice.close().await;
    });
}

#[test]
fn direct_messages_between_the_browser_and_user_cli() {
    browser_test(async {
        let chat = Chat::start();
        for user in ["alice", "bob"] {
            let registered = chat.fed.cli(user, &["register", user], "");
            assert_eq!(registered.code, Some(0), "{registered:?}");
        }
        let web = chat.fed.web_personal("alice");
        let driver = chat.chromedriver();
        let alice = Browser::start(&driver, "alice").await;
        alice.sign_in_with_token(&web.endpoint).await;
        alice
            .wait("bob in #people", SHOW_TIMEOUT, |p| p.person("bob"))
            .await;

        // Presence: bob goes online (the page refreshes #people every few seconds).
        let online = chat.fed.cli("bob", &["connect"], "");
        assert_eq!(online.code, Some(0), "{online:?}");
        alice
            .wait("bob's .presence online", SHOW_TIMEOUT, |p| {
                p.person("bob")
                    .filter(|b| b.presence.as_deref().map(str::trim) == Some("online"))
            })
            .await;

        // A direct message from user-cli: counted unread, then read in the conversation.
        let from_bob = "psst, alice: a direct one";
        let sent = chat.fed.cli("bob", &["send_dm", "alice", from_bob], "");
        assert_eq!(sent.code, Some(0), "{sent:?}");
        alice
            .wait("bob's .unread at 1", SHOW_TIMEOUT, |p| {
                p.person("bob")
                    .filter(|b| b.unread.as_deref().map(str::trim) == Some("1"))
            })
            .await;
        alice
            .find(r#"#people li[data-user="bob"]"#)
            .await
            .click()
            .await
            .expect("clicking bob in #people");
        let shown = alice
            .wait("bob's direct message in #messages", SHOW_TIMEOUT, |p| {
                p.messages
                    .iter()
                    .find(|m| m.text.as_deref() == Some(from_bob))
                    .cloned()
            })
            .await;
        assert_eq!(shown.sender(), "bob", "{shown:?}");
        alice
            .wait("bob's .unread cleared once read", SHOW_TIMEOUT, |p| {
                p.person("bob")
                    .filter(|b| b.unread.as_deref().unwrap_or_default().trim().is_empty())
            })
            .await;

        // And back: #send in the open conversation sends a direct message.
        let to_bob = "hello bob, directly from the browser";
        let input = alice.type_text(to_bob).await;
        alice.press_enter(&input).await;
        alice
            .wait("the reply no longer pending", SHOW_TIMEOUT, |p| {
                p.messages
                    .iter()
                    .find(|m| m.text.as_deref() == Some(to_bob) && !m.pending)
                    .cloned()
            })
            .await;
        let read = chat.fed.cli("bob", &["connect"], "");
        assert!(
            read.stdout
                .lines()
                .any(|l| l.contains("FROM alice") && l.ends_with(to_bob)),
            "bob's mailbox has alice's reply: {read:?}"
        );
        alice.close().await;
    });
}

#[test]
fn an_image_attached_in_the_browser_shows_inline_and_user_cli_lists_it() {
    browser_test(async {
        let chat = Chat::start();
        let web = chat.fed.web_personal("alice");
        let driver = chat.chromedriver();
        let alice = Browser::start(&driver, "alice").await;
        alice.sign_in_with_token(&web.endpoint).await;
        alice.open_group(GROUP).await;

        // A real PNG: the page itself.
        let png = alice.client.screenshot().await.expect("a screenshot");
        let picture = chat.fed.dir.path().join("picture.png");
        std::fs::write(&picture, &png).expect("writing picture.png");
        alice
            .find("#file")
            .await
            .send_keys(picture.to_str().expect("a UTF-8 path"))
            .await
            .expect("choosing a file in #file");
        let shown = alice
            .wait("the image shown inline and loaded", SHOW_TIMEOUT, |p| {
                p.messages
                    .iter()
                    .find(|m| m.seq.is_some() && m.loaded > 0)
                    .cloned()
            })
            .await;
        assert_eq!(shown.sender(), "alice", "{shown:?}");
        let seq = shown.seq.expect("a seq");

        let listed = chat.fed.cli("bob", &["messages", GROUP], "");
        assert!(
            listed
                .stdout
                .lines()
                .any(|l| l.contains(&format!("#{seq} alice: [file picture.png"))
                    && l.contains("image/png")),
            "user-cli lists the attachment at #{seq}: {listed:?}"
        );
        alice.close().await;
    });
}
