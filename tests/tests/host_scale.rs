//! A group host at scale (issue 24, item 7): 500 groups made through `user-cli create` by
//! five users on one host started empty with `--creators any`, and then every group's send
//! (by its owner and by a second member), history, live push (each member's `watch` of the
//! 100 groups it joined, over one connection: five in all), a file up and down, and policy
//! (invite on every private group; kick, ban and an outsider's join on a sample), with
//! nothing of one group showing in another; then `kill -9` of the host while the owners send
//! across all 500 and its restart on its endpoint: every acked message back once, each log
//! gap-free, each watch given every message of the groups it still follows, once.
//!
//! Each user's commands run as stdin sessions (scripts) of up to 50 lines, not one process
//! per command, and the five users' sessions run side by side. Each phase's time goes to
//! stderr (`--nocapture`): about 25 s in all in a debug build on 2 cores, 500 files 8 s of
//! it.
//!
//! Beside it: a standby host on PostgreSQL taking over 500 groups made the same way, with
//! the watches following them (about 25 s); and two tests of defects these found: a create
//! failing after one `--heartbeat` of registry silence (fixed by 297e585), and, ignored, a
//! moved host costing a client one timeout per group.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use agora_common::client::{ClientOptions, HostClient};
use agora_common::keys::Keypair;
use agora_proto::wire::{EntryKind, GroupName, HistoryQuery, UserName};
use agora_tests::{
    connections_to, wait_for, CliRun, Federation, Pending, Server, Streaming, START_TIMEOUT,
};

/// Users creating groups; each creates [`PER_USER`].
const USERS: usize = 5;
/// Groups each user creates (the host's default `--max-groups-per-key`).
const PER_USER: usize = 100;
/// How long a watch may take to see what it waits for.
const WAIT: Duration = Duration::from_secs(60);
/// Most lines in one session: a session runs under the harness's 30 s limit.
const SESSION_LINES: usize = 50;

/// The registry's heartbeat and the host's. Until 297e585 the host's was also the timeout
/// of its requests to the registry, a create's registration included: at the harness's
/// 200 ms, a registry slowed by 500 creates on two busy cores made creates fail
/// (`internal: the registry did not take the name`; the last test but one).
const HEARTBEAT: &str = "1s";

/// Starts a group host (`--creators any`) at `addr` with `extra` flags (`--store URL`), its
/// data in the federation's `data-<tag>` (where its key pair is already), without waiting
/// for its `listening` line (a standby prints it when it takes over).
fn spawn(fed: &Federation, tag: &str, addr: &str, extra: &[&str]) -> Pending {
    let data = fed.node_data_dir(tag);
    let registry_key = fed.registry_key();
    let mut args = vec![
        "--host",
        addr,
        "--creators",
        "any",
        "--registry",
        &fed.registry.endpoint,
        "--registry-key",
        &registry_key,
        "--data-dir",
        &data,
        "--heartbeat",
        HEARTBEAT,
    ];
    args.extend_from_slice(extra);
    Server::spawn(
        "group-node",
        &args,
        Path::new(&fed.path(&format!("host-{tag}.log"))),
    )
}

/// The group host of tag `host` at `addr` (SQLite), once listening: as [`Federation::host`],
/// with [`HEARTBEAT`].
fn spawn_host(fed: &Federation, addr: &str) -> Server {
    spawn(fed, "host", addr, &[]).wait_listening(START_TIMEOUT)
}

/// Groups of each owner that user-cli sends to after the takeover (the rest, through the
/// library client).
const MOVED_SAMPLE: usize = 5;

/// Rounds of the load across the host's `kill -9`: each owner sends this many messages to
/// each of its groups.
const LOAD_ROUNDS: usize = 3;

/// A library client of `host` as user `u`.
fn host_client(fed: &Federation, host: &Server, u: usize) -> HostClient {
    let ctx = zmq::Context::new();
    HostClient::new(
        &ctx,
        &host.endpoint,
        UserName::new(user(u)).expect("user"),
        ClientOptions::default(),
    )
    .with_curve(fed.curve(&user(u), host))
}

/// The last seq of owner `o`'s group `i`, as its owner asks (0 if it does not answer).
fn last_seq(fed: &Federation, host: &Server, o: usize, i: usize) -> u64 {
    let name = GroupName::new(group(o, i)).expect("name");
    host_client(fed, host, o)
        .group(&name)
        .info()
        .map_or(0, |info| info.last_seq)
}

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

/// Runs `lines` as `u`'s session(s) (`--json`, then `args`), [`SESSION_LINES`] at a time;
/// returns the
/// stdout lines and the stderr lines of them all.
fn session(
    fed: &Federation,
    u: usize,
    args: &[&str],
    lines: &[String],
) -> (Vec<String>, Vec<String>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for chunk in lines.chunks(SESSION_LINES) {
        let mut stdin = chunk.join("\n");
        stdin.push('\n');
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let run: CliRun = fed.cli(&user(u), &all, &stdin);
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
    // A generous --timeout: these check what is stored, not how fast, and CI's two cores
    // run this beside other tests (a create under load once took past the default 5 s).
    sessions_with(fed, &["--timeout", "20s"], lines)
}

/// As [`sessions`], with global `args` for user-cli.
fn sessions_with(
    fed: &Federation,
    args: &[&str],
    lines: impl Fn(usize) -> Vec<String> + Sync,
) -> Vec<(Vec<String>, Vec<String>)> {
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..USERS)
            .map(|u| {
                let lines = &lines;
                s.spawn(move || session(fed, u, args, &lines(u)))
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

/// A federation whose registry takes the group host's key as `--host-key` (so the host may
/// own more than the 100 names of another key), the host's key pair made first and copied
/// into the data directory of each of `tags` (an active and its standby share it). Returns
/// the federation and the host's public key. `sqlite`: the registry stores in SQLite
/// whatever `AGORA_TEST_STORE` says (a debug registry on PostgreSQL binds about 50 new names
/// a second, so 500 creates side by side outlast a create's 2 s wait for its name: that
/// test is about the host, and the PostgreSQL registry is the standby test's).
fn federation(tags: &[&str], sqlite: bool) -> (Federation, String) {
    let made = tempfile::tempdir().expect("tempdir");
    let (pair, _) =
        Keypair::load_or_generate(&made.path().join("node.key")).expect("the host's key pair");
    let host_key = pair.public.to_string();
    let extra = ["--host-key", host_key.as_str()];
    let fed = if sqlite {
        Federation::start_on_sqlite(HEARTBEAT, &extra)
    } else {
        Federation::start_with(HEARTBEAT, &extra)
    };
    for tag in tags {
        let data = fed.node_data_dir(tag);
        std::fs::create_dir_all(&data).expect("the host's data directory");
        for file in ["node.key", "node.key_secret"] {
            std::fs::copy(made.path().join(file), format!("{data}/{file}")).expect("copy key");
        }
    }
    (fed, host_key)
}

/// Each user creates 100 groups on `host` (its key `host_key`), every 5th private, and
/// invites the groups' second member (the next user) to the private ones; a 101st is past
/// the host's `--max-groups-per-key` (100). `keys`: the users' public keys.
fn create_groups(fed: &Federation, host: &Server, host_key: &str, keys: &[String]) {
    let runs = sessions(fed, |o| {
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
}

/// Each owner's groups get a second member: the next user joins all 100.
fn join_groups(fed: &Federation) {
    let runs = sessions(fed, |m| {
        let o = (m + USERS - 1) % USERS;
        (0..PER_USER)
            .map(|i| format!("join {}", group(o, i)))
            .collect()
    });
    no_errors("joins", &runs);
}

/// Each member follows the 100 groups it joined with one `watch --json`, over one
/// connection to `host`: returned once each watches all of them and the host has just
/// these five clients.
fn watch_groups(fed: &Federation, host: &Server) -> Vec<Streaming> {
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
    watches
}

/// The module's scenario, in one federation: 500 groups, five users, one host.
#[test]
fn five_hundred_created_groups_send_read_push_files_policy_and_survive_kill_9() {
    let start = Instant::now();
    let mut phase = Instant::now();
    let mut took = |what: &str| {
        eprintln!("{what}: {} ms", phase.elapsed().as_millis());
        phase = Instant::now();
    };
    let (fed, host_key) = federation(&["host"], true);
    let mut host = spawn_host(&fed, "127.0.0.1:0");
    assert_eq!(host.key.as_deref(), Some(host_key.as_str()));
    let keys: Vec<String> = (0..USERS).map(|u| fed.user_key(&user(u))).collect();
    took("start");
    create_groups(&fed, &host, &host_key, &keys);
    took("500 creates");
    join_groups(&fed);
    took("500 joins");
    let mut watches = watch_groups(&fed, &host);
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

    // Files, on every group: its owner sends one, its member downloads it.
    let files = fed.path("files");
    std::fs::create_dir_all(&files).expect("files dir");
    let sample: Vec<usize> = (0..PER_USER).collect();
    // Small files, but every 50th one of two chunks (CHUNK_BYTES, 256 KiB).
    let content = |i: usize, name: &str| -> Vec<u8> {
        let lines = if i.is_multiple_of(50) { 22_000 } else { 100 };
        format!("{name}'s file\n").repeat(lines).into_bytes()
    };
    for o in 0..USERS {
        for &i in &sample {
            let name = group(o, i);
            std::fs::write(format!("{files}/{name}.txt"), content(i, &name)).expect("write file");
        }
    }
    let runs = sessions(&fed, |o| {
        sample
            .iter()
            .map(|&i| format!("send_file {0} {files}/{0}.txt", group(o, i)))
            .collect()
    });
    let mut file_seqs: Vec<Vec<u64>> = Vec::new();
    for (o, (out, err)) in runs.iter().enumerate() {
        let seqs: Vec<u64> = json(out).iter().filter_map(|v| v["seq"].as_u64()).collect();
        assert_eq!(seqs.len(), sample.len(), "{}: {out:#?} {err:#?}", user(o));
        file_seqs.push(seqs);
    }
    let runs = sessions(&fed, |m| {
        let o = (m + USERS - 1) % USERS;
        sample
            .iter()
            .zip(&file_seqs[o])
            .map(|(&i, seq)| format!("get_file {0} {seq} --out {files}/{0}.got", group(o, i)))
            .collect()
    });
    no_errors("get_file", &runs);
    for o in 0..USERS {
        for &i in &sample {
            let name = group(o, i);
            let got = std::fs::read(format!("{files}/{name}.got")).expect("downloaded");
            assert!(
                got == content(i, &name),
                "{name}'s file came back different"
            );
        }
    }
    took("500 files up and down");

    // Policy on a sample of each owner's groups: its member kicked from some, banned from
    // others; an outsider (the user after the member) refused by private groups and let
    // into open ones. Nothing changes in the other groups.
    let kicked = |i: usize| i % 25 == 1 || i % 25 == 4;
    let banned = |i: usize| i % 25 == 2 || i % 25 == 9;
    let closed = |i: usize| i % 25 == 14;
    let opened = |i: usize| i % 25 == 13;
    assert!((0..PER_USER).any(|i| kicked(i) && private(i)));
    assert!((0..PER_USER).any(|i| banned(i) && private(i)));
    assert!((0..PER_USER).all(|i| !closed(i) || private(i)));
    assert!((0..PER_USER).all(|i| !opened(i) || !private(i)));
    let outsider = |o: usize| (o + 2) % USERS;
    let runs = sessions(&fed, |o| {
        let m = member_of(o);
        let mut lines: Vec<String> = (0..PER_USER)
            .filter(|&i| kicked(i))
            .map(|i| format!("kick {} {}", group(o, i), user(m)))
            .collect();
        lines.extend(
            (0..PER_USER)
                .filter(|&i| banned(i))
                .map(|i| format!("ban {} '{}'", group(o, i), keys[m])),
        );
        lines
    });
    no_errors("kicks and bans", &runs);
    // The member: refused where kicked or banned (banned: joining again too), still a
    // member of the rest.
    let runs = sessions(&fed, |m| {
        let o = (m + USERS - 1) % USERS;
        let mut lines: Vec<String> = (0..PER_USER)
            .map(|i| format!("send {0} after the policy in {0}", group(o, i)))
            .collect();
        lines.extend(
            (0..PER_USER)
                .filter(|&i| banned(i))
                .map(|i| format!("join {}", group(o, i))),
        );
        lines
    });
    for (m, (_, err)) in runs.iter().enumerate() {
        let o = (m + USERS - 1) % USERS;
        let refused: Vec<usize> = (0..PER_USER)
            .filter(|&i| kicked(i) || banned(i))
            .chain((0..PER_USER).filter(|&i| banned(i)))
            .collect();
        assert_eq!(err.len(), refused.len(), "{}: {err:#?}", user(m));
        let sends = refused.len() - (0..PER_USER).filter(|&i| banned(i)).count();
        for (n, (line, i)) in err.iter().zip(refused).enumerate() {
            let why = if n < sends {
                format!("{} is not a member of \"{}\"", user(m), group(o, i))
            } else {
                format!("this key is banned from \"{}\"", group(o, i))
            };
            assert!(line.contains(&why), "{}: {line}", user(m));
        }
    }
    // The outsider of owner o's groups is user o + 2.
    let runs = sessions(&fed, |u| {
        let o = (u + USERS - 2) % USERS;
        (0..PER_USER)
            .filter(|&i| closed(i) || opened(i))
            .map(|i| format!("join {}", group(o, i)))
            .collect()
    });
    for (u, (_, err)) in runs.iter().enumerate() {
        let o = (u + USERS - 2) % USERS;
        let refused: Vec<usize> = (0..PER_USER).filter(|&i| closed(i)).collect();
        assert_eq!(err.len(), refused.len(), "{}: {err:#?}", user(u));
        for (line, i) in err.iter().zip(refused) {
            let why = format!("not_invited: \"{}\" is private", group(o, i));
            assert!(line.contains(&why), "{}: {line}", user(u));
        }
    }
    // Each owner lists its groups' members: itself everywhere, its member where neither
    // kicked nor banned, the outsider where let in, no one else.
    let runs = sessions(&fed, |o| {
        (0..PER_USER)
            .map(|i| format!("members {}", group(o, i)))
            .collect()
    });
    no_errors("members", &runs);
    for (o, (out, _)) in runs.iter().enumerate() {
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for v in json(out) {
            *count
                .entry(v["user"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        let stays = (0..PER_USER).filter(|&i| !kicked(i) && !banned(i)).count();
        let let_in = (0..PER_USER).filter(|&i| opened(i)).count();
        let expected = BTreeMap::from([
            (user(o), PER_USER),
            (user(member_of(o)), stays),
            (user(outsider(o)), let_in),
        ]);
        assert_eq!(count, expected, "{}'s groups' members", user(o));
    }
    took("policy");

    // Under load: every owner sends to each of its groups, round after round, and the host
    // is killed (-9) early in the first round and started again on its endpoint. Every
    // acked message is back once, in its group, each group's log gap-free; each watch gets
    // what was sent to the groups it still follows, each message once.
    let addr = host.host_port().to_owned();
    let before = last_seq(&fed, &host, 0, 20);
    let (runs, restarted) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            sessions_with(&fed, &["--timeout", "1s"], |o| {
                (0..LOAD_ROUNDS)
                    .flat_map(|r| {
                        (0..PER_USER).map(move |i| format!("send {0} load {r} to {0}", group(o, i)))
                    })
                    .collect()
            })
        });
        let sending = wait_for(WAIT, || last_seq(&fed, &host, 0, 20) > before);
        assert!(sending, "no load message reached {}", group(0, 20));
        host.kill9();
        let killed = Instant::now();
        let restarted = spawn_host(&fed, &addr);
        eprintln!("host restarted in {} ms", killed.elapsed().as_millis());
        (load.join().expect("the load's sessions"), restarted)
    });
    let host = restarted;
    let mut acked: Vec<String> = Vec::new();
    for (u, (out, err)) in runs.iter().enumerate() {
        let ids: Vec<String> = json(out)
            .iter()
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .collect();
        eprintln!(
            "{}: {} acked, {} refused or lost",
            user(u),
            ids.len(),
            err.len()
        );
        assert_eq!(ids.len() + err.len(), LOAD_ROUNDS * PER_USER, "{err:#?}");
        acked.extend(ids);
    }
    assert!(
        acked.len() > USERS * PER_USER,
        "too few sends acked: {}",
        acked.len()
    );
    took("load across a kill -9");

    let mut logged: HashMap<String, usize> = HashMap::new();
    // Each load message logged: its id, and its group.
    let mut load: HashMap<String, String> = HashMap::new();
    for o in 0..USERS {
        let mut client = host_client(&fed, &host, o);
        for i in 0..PER_USER {
            let name = group(o, i);
            let mut seqs = Vec::new();
            client
                .group(&GroupName::new(name.as_str()).expect("name"))
                .for_each_page(HistoryQuery::AfterSeq(0), None, |page| {
                    for m in &page.messages {
                        seqs.push(m.seq);
                        *logged.entry(m.id.to_string()).or_default() += 1;
                        if let Some(text) = m.body.get().strip_prefix("\"load ") {
                            assert!(text.ends_with(&format!(" to {name}\"")), "{name}: {text}");
                            load.insert(m.id.to_string(), name.clone());
                        }
                    }
                    true
                })
                .unwrap_or_else(|e| panic!("{name}'s history after the restart: {e}"));
            let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, expected, "{name}: a gap or a duplicate in the log");
        }
    }
    for id in &acked {
        assert_eq!(logged.get(id), Some(&1), "acked message {id} in the logs");
    }
    took("500 logs checked");

    // The watches, through the restart: each load message of a group its member still
    // follows, once, under that group.
    for (m, watch) in watches.iter_mut().enumerate() {
        let o = (m + USERS - 1) % USERS;
        let followed: Vec<String> = (0..PER_USER)
            .filter(|&i| !kicked(i) && !banned(i))
            .map(|i| group(o, i))
            .collect();
        let expected: BTreeMap<&String, &String> =
            load.iter().filter(|(_, g)| followed.contains(g)).collect();
        assert_eq!(expected.len(), LOAD_ROUNDS * followed.len(), "{}", user(m));
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let all = watch.wait_lines(WAIT, |lines| {
            seen.clear();
            for v in json(lines) {
                let (Some(id), Some(g)) = (v["id"].as_str(), v["group"].as_str()) else {
                    continue;
                };
                if v["body"].as_str().is_some_and(|b| b.starts_with("load ")) {
                    seen.entry(id.to_owned()).or_default().push(g.to_owned());
                }
            }
            seen.len() >= expected.len()
        });
        assert!(
            all,
            "{}'s watch got {} of the {} load messages; stderr {:#?}",
            user(m),
            seen.len(),
            expected.len(),
            watch.errors
        );
        for (id, groups) in &seen {
            let want = expected.get(id).map(|g| vec![(*g).clone()]);
            assert_eq!(Some(groups), want.as_ref(), "{}'s watch: {id}", user(m));
        }
    }
    let mut held = 0;
    assert!(
        wait_for(WAIT, || {
            held = connections_to(&host.endpoint);
            held == USERS
        }),
        "after the restart {USERS} watches hold {held} connections to the host"
    );
    took("5 watches through the restart");

    drop(watches);
    eprintln!("total: {} s", start.elapsed().as_secs_f64());
}

/// A standby host on PostgreSQL takes over 500 groups made through `user-cli create` on the
/// active (same key pair, same database) after its `kill -9`: every group answers on the
/// standby with its log, the owners' sessions find it through the registry and send again,
/// and each member's `watch` of 100 groups follows the groups to it and gets those
/// messages once. Prints the takeover times (the 3 s target is the bench's to measure).
#[test]
fn a_postgres_standby_takes_over_500_created_groups_and_the_watches_follow() {
    let start = Instant::now();
    let mut phase = Instant::now();
    let mut took = |what: &str| {
        eprintln!("{what}: {} ms", phase.elapsed().as_millis());
        phase = Instant::now();
    };
    let (fed, host_key) = federation(&["a", "b"], false);
    let (_cluster, url) = fed.shared_store();
    let mut active =
        spawn(&fed, "a", "127.0.0.1:0", &["--store", &url]).wait_listening(START_TIMEOUT);
    let standby = spawn(&fed, "b", "127.0.0.1:0", &["--store", &url]);
    assert!(
        wait_for(START_TIMEOUT, || standby.log().contains("waiting for it")),
        "the second host did not become a standby: {}",
        standby.log()
    );
    let keys: Vec<String> = (0..USERS).map(|u| fed.user_key(&user(u))).collect();
    took("start (PostgreSQL)");
    create_groups(&fed, &active, &host_key, &keys);
    took("500 creates");
    join_groups(&fed);
    took("500 joins");
    let mut watches = watch_groups(&fed, &active);
    took("5 watches of 100 groups");
    let runs = sessions(&fed, |o| {
        (0..PER_USER)
            .map(|i| format!("send {0} before the takeover of {0}", group(o, i)))
            .collect()
    });
    no_errors("sends before", &runs);
    took("500 sends");

    active.kill9();
    let killed = Instant::now();
    let standby = standby.wait_listening(START_TIMEOUT);
    let listening = killed.elapsed();
    let mut pending: Vec<(usize, usize)> = (0..USERS)
        .flat_map(|o| (0..PER_USER).map(move |i| (o, i)))
        .collect();
    let mut clients: Vec<HostClient> = (0..USERS).map(|o| host_client(&fed, &standby, o)).collect();
    let served = wait_for(WAIT, || {
        pending.retain(|&(o, i)| {
            let name = GroupName::new(group(o, i)).expect("name");
            clients[o]
                .group(&name)
                .info()
                .map_or(true, |info| info.last_seq < 3)
        });
        pending.is_empty()
    });
    assert!(
        served,
        "groups not served by the standby: {pending:?}\n{}",
        standby.log()
    );
    eprintln!(
        "PostgreSQL host failover of 500 created groups: kill -9 to the standby listening in \
         {} ms, to every group answering in {} ms",
        listening.as_millis(),
        killed.elapsed().as_millis()
    );
    took("takeover");
    // The registry lists all 500 at the standby (its registration may trail its serving).
    let mut elsewhere = 0;
    let moved = wait_for(WAIT, || {
        let run = fed.cli(&user(0), &["--json", "groups"], "");
        let listed: Vec<String> = run.stdout.lines().map(str::to_owned).collect();
        let there = json(&listed)
            .iter()
            .filter(|g| g["endpoint"] == standby.endpoint)
            .count();
        elsewhere = (USERS * PER_USER).saturating_sub(there);
        elsewhere == 0
    });
    assert!(moved, "{elsewhere} groups not listed at the standby");
    took("registry lists the standby");

    // The owners: the groups' saved endpoint is gone, the registry names the standby's.
    // user-cli finds it for a sample of 5 groups each (each group of a moved host costs its
    // first attempt's share of --timeout: see the ignored test below); the library client,
    // at the standby, sends to the rest.
    let runs = sessions_with(&fed, &["--timeout", "1s"], |o| {
        (0..MOVED_SAMPLE)
            .map(|i| format!("send {0} after the takeover of {0}", group(o, i)))
            .collect()
    });
    no_errors("sends after, by user-cli", &runs);
    for (o, client) in clients.iter_mut().enumerate() {
        for i in MOVED_SAMPLE..PER_USER {
            let name = group(o, i);
            let text = format!("\"after the takeover of {name}\"");
            client
                .group(&GroupName::new(name.as_str()).expect("name"))
                .send(RawValue::from_string(text).expect("JSON"))
                .unwrap_or_else(|e| panic!("{name} on the standby: {e}"));
        }
    }
    took("500 sends after the takeover");

    for (m, watch) in watches.iter_mut().enumerate() {
        let o = (m + USERS - 1) % USERS;
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        let all = watch.wait_lines(WAIT, |lines| {
            seen.clear();
            for v in json(lines) {
                let body = v["body"].as_str().unwrap_or_default();
                if body.starts_with("after the takeover") {
                    seen.entry(v["group"].as_str().unwrap_or_default().to_owned())
                        .or_default()
                        .push(body.to_owned());
                }
            }
            seen.len() == PER_USER
        });
        assert!(
            all,
            "{}'s watch saw {} groups after the takeover: {:#?}",
            user(m),
            seen.len(),
            watch.errors
        );
        for i in 0..PER_USER {
            let name = group(o, i);
            assert_eq!(
                seen[&name],
                [format!("after the takeover of {name}")],
                "{}'s watch",
                user(m)
            );
        }
    }
    took("5 watches followed");

    for (o, client) in clients.iter_mut().enumerate() {
        for i in 0..PER_USER {
            let name = group(o, i);
            let (mut seqs, mut bodies) = (Vec::new(), Vec::new());
            client
                .group(&GroupName::new(name.as_str()).expect("name"))
                .for_each_page(HistoryQuery::AfterSeq(0), None, |page| {
                    for m in &page.messages {
                        seqs.push(m.seq);
                        if m.kind == EntryKind::Message {
                            bodies.push(m.body.get().to_owned());
                        }
                    }
                    true
                })
                .unwrap_or_else(|e| panic!("{name}'s history on the standby: {e}"));
            let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, expected, "{name}: a gap or a duplicate in the log");
            assert_eq!(
                bodies,
                [
                    format!("\"before the takeover of {name}\""),
                    format!("\"after the takeover of {name}\"")
                ],
                "{name}"
            );
        }
    }
    took("500 logs checked");
    drop(clients);
    let mut held = 0;
    assert!(
        wait_for(WAIT, || {
            held = connections_to(&standby.endpoint);
            held == USERS
        }),
        "{USERS} watches hold {held} connections to the standby"
    );
    drop(watches);
    eprintln!("total: {} s", start.elapsed().as_secs_f64());
}

/// A `create` on a host waits up to 2 s for the registry to take the name
/// (group-node/src/host/create.rs, `REGISTER_WAIT`), but the registrar's request gave up
/// after one heartbeat (group-node/src/registrar.rs, `Worker::new`: each request's timeout
/// was `--heartbeat`, one attempt): on a host beating every 200 ms, a registry busy for
/// 600 ms failed the create (`internal: the registry did not take the name (... no reply
/// ... within 200ms)`) long before its 2 s. The scale test above met it under load. A
/// registrar's request now waits as any client's does (5 s over 3 attempts), whatever the
/// heartbeat.
#[test]
fn a_create_waits_its_two_seconds_for_a_registry_slower_than_one_heartbeat() {
    let fed = Federation::start("200ms");
    // The harness's host beats every 200 ms.
    let host = fed.host("host", &["--creators", "any"]);
    let key = host.key.clone().expect("the host's key");
    let registry = fed.registry.pid().to_string();
    let signal = |sig: &str| {
        let sent = std::process::Command::new("kill")
            .args([sig, &registry])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {sig} {registry}");
    };
    // The registry is busy (stopped) for 600 ms while a create waits on it.
    signal("-STOP");
    let run = std::thread::scope(|s| {
        let create = s.spawn(|| {
            fed.cli(
                "alice",
                &[
                    "create",
                    "Slow",
                    "--host",
                    host.host_port(),
                    "--host-key",
                    &key,
                ],
                "",
            )
        });
        std::thread::sleep(Duration::from_millis(600));
        signal("-CONT");
        create.join().expect("the create")
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("created Slow"), "{run:?}");
}

/// After a standby took its host's groups over, a user-cli process paid the first attempt's
/// share of `--timeout` at the dead endpoint once per group of that host, not once: on
/// `Timeout`, `App::relocated` (user-cli/src/app/mod.rs) asks the registry and re-points the
/// one group that failed, and the next group saved at the same endpoint times out there
/// again. Measured by the standby test above: 5 sends after the takeover took 8.5 s at the
/// default 5 s timeout, 1.8 s at 1 s; an owner's 100 groups would take about 170 s. Here 20
/// groups at `--timeout 2s`: 14.8 s today; the registry's answer for the first group
/// could serve the others (or the dead endpoint be skipped for the session).
#[test]
fn a_session_finds_a_moved_host_once_not_once_per_group() {
    const GROUPS: usize = 20;
    let (fed, host_key) = federation(&["a", "b"], false);
    let (_cluster, url) = fed.shared_store();
    let mut active =
        spawn(&fed, "a", "127.0.0.1:0", &["--store", &url]).wait_listening(START_TIMEOUT);
    let standby = spawn(&fed, "b", "127.0.0.1:0", &["--store", &url]);
    assert!(
        wait_for(START_TIMEOUT, || standby.log().contains("waiting for it")),
        "the second host did not become a standby: {}",
        standby.log()
    );
    fed.user_key(&user(0));
    let creates: Vec<String> = (0..GROUPS)
        .map(|i| {
            format!(
                "create {} --host {} --host-key '{host_key}'",
                group(0, i),
                active.host_port()
            )
        })
        .collect();
    let (_, err) = session(&fed, 0, &[], &creates);
    assert!(err.is_empty(), "{err:#?}");

    active.kill9();
    let standby = standby.wait_listening(START_TIMEOUT);
    let mut client = host_client(&fed, &standby, 0);
    let served = wait_for(WAIT, || {
        (0..GROUPS).all(|i| {
            let name = GroupName::new(group(0, i)).expect("name");
            client.group(&name).info().is_ok()
        })
    });
    assert!(served, "the standby did not serve them: {}", standby.log());

    let sends: Vec<String> = (0..GROUPS)
        .map(|i| format!("send {} moved", group(0, i)))
        .collect();
    let started = Instant::now();
    let (_, err) = session(&fed, 0, &["--timeout", "2s"], &sends);
    let took = started.elapsed();
    assert!(err.is_empty(), "{err:#?}");
    assert!(
        took < Duration::from_secs(8),
        "{GROUPS} sends to the groups of a moved host took {} ms at --timeout 2s",
        took.as_millis()
    );
}
