//! TLS between the servers and PostgreSQL (`--store-ca`, `agora_common::pgtls`): a cluster
//! that accepts TLS only, on the loopback, with a self-signed certificate for `localhost`.
//! A registry and a group node given that certificate store through it, every connection
//! of theirs is encrypted (`pg_stat_ssl`), and a certificate not signed by the given CA is
//! refused, as is a connection without TLS. A role that the server lets in only by client
//! certificate (`cert` in `pg_hba.conf`) is reached with `--store-cert` and `--store-key`,
//! and refused without them.
//!
//! These tests always store in PostgreSQL (a throwaway cluster), whatever
//! `AGORA_TEST_STORE` says.

use std::time::Duration;

use agora_tests::pg::{PgCluster, CERT_ROLE};
use agora_tests::{run, CliRun, Federation, Server};

const WAIT: Duration = Duration::from_secs(20);

fn ok(run: CliRun) -> CliRun {
    assert_eq!(run.code, Some(0), "user-cli failed: {run:?}");
    run
}

/// `(application_name, ssl, client_dn)` of the cluster's client connections named `agora-…`
/// (`client_dn` empty without a client certificate).
fn agora_sessions(cluster: &PgCluster) -> Vec<(String, bool, String)> {
    let url = cluster.url("agora");
    std::thread::spawn(move || {
        let mut db = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        db.query(
            "SELECT a.application_name, s.ssl, coalesce(s.client_dn, '') FROM pg_stat_activity a
             JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name LIKE 'agora-%' ORDER BY 1",
            &[],
        )
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    })
    .join()
    .expect("query thread")
}

/// [`agora_sessions`], after checking that the registry's and the node's store and lease
/// connections are among them.
fn every_servers_sessions(cluster: &PgCluster) -> Vec<(String, bool, String)> {
    let sessions = agora_sessions(cluster);
    for name in [
        "agora-registry",
        "agora-group-node store",
        "agora-group-node lease",
    ] {
        assert!(
            sessions.iter().any(|(n, _, _)| n == name),
            "no {name} session: {sessions:?}"
        );
    }
    sessions
}

/// The arguments of a registry with data directory `tag` in `fed`, storing at `url`, with
/// `extra` flags (the TLS files).
fn registry_args(fed: &Federation, tag: &str, url: &str, extra: &[&str]) -> Vec<String> {
    let data = fed.path(tag);
    [
        "--bind",
        "tcp://127.0.0.1:0",
        "--data-dir",
        &data,
        "--store",
        url,
    ]
    .iter()
    .chain(extra)
    .map(|a| (*a).to_owned())
    .collect()
}

/// `args` as `&str`s, for [`run`] and [`Server::start`].
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn servers_store_over_verified_tls_and_refuse_a_wrong_certificate_or_none() {
    let cluster = PgCluster::start_tls();
    cluster.database("agora");
    let url = cluster.tls_url("agora");
    let ca = cluster.tls_ca();
    let ca = ca.to_str().expect("utf-8 path");
    let fed = Federation::start("200ms");

    // A registry storing over TLS starts: it migrated its schema and keeps its key pair
    // there.
    let args = registry_args(&fed, "registry-tls", &url, &["--store-ca", ca]);
    let registry = Server::start(
        "registry",
        &strs(&args),
        &fed.dir.path().join("registry-tls.log"),
    );
    assert!(registry.key.is_some(), "{}", registry.log());

    // A group node storing over TLS serves, its lease and store connections both.
    let _node = fed.node(
        "Sealed",
        "127.0.0.1:0",
        "n",
        &["--store", &url, "--store-ca", ca],
    );
    fed.join_when_listed("alice", "Sealed");
    ok(fed.cli("alice", &["send", "Sealed", "over tls"], ""));
    let shown = ok(fed.cli("alice", &["messages", "Sealed"], ""));
    assert!(shown.stdout.contains("over tls"), "{shown:?}");

    let sessions = every_servers_sessions(&cluster);
    assert!(
        sessions.iter().all(|(_, ssl, _)| *ssl),
        "a session without TLS: {sessions:?}"
    );

    // A certificate the given CA did not sign is refused: the registry stops and says why.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let wrong = fed.path("other-ca.pem");
    std::fs::write(&wrong, other.cert.pem()).expect("write");
    let registry = |tag: &str, extra: &[&str]| {
        run(
            "registry",
            &strs(&registry_args(&fed, tag, &url, extra)),
            "",
        )
    };
    let refused = registry("registry-wrong", &["--store-ca", &wrong]);
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(
        refused.stderr.contains("certificate"),
        "not said why: {refused:?}"
    );

    // Without TLS, this server refuses the connection (its pg_hba.conf has `hostssl` only).
    let plain = registry("registry-plain", &[]);
    assert_ne!(plain.code, Some(0), "{plain:?}");
    assert!(
        plain.stderr.contains("no encryption"),
        "not said why: {plain:?}"
    );

    // A node given the wrong CA never takes the lease: at start the database cannot be
    // used, so it stops (exit 3, the README's table) with a line naming the certificate and
    // --store-ca. (It has the group's key pair: one without it stops before it tries the
    // database, issue 23.)
    fed.share_node_keys("n", "wrong");
    let mut standby = fed.spawn_node(
        "Sealed",
        "127.0.0.1:0",
        "wrong",
        &["--store", &url, "--store-ca", &wrong],
    );
    assert_eq!(standby.wait_exit(WAIT), Some(Some(3)), "{}", standby.log());
    let log = standby.log();
    assert!(
        log.contains("certificate") && log.contains("--store-ca"),
        "{log}"
    );
    assert!(!log.contains("took the lease"), "{log}");
}

#[test]
fn servers_authenticate_by_client_certificate_and_are_refused_without_it() {
    let cluster = PgCluster::start_tls();
    cluster.database("agora");
    let url = cluster.tls_cert_url("agora");
    let ca = cluster.tls_ca();
    let ca = ca.to_str().expect("utf-8 path");
    let (cert, key) = cluster.tls_client_cert();
    let (cert, key) = (
        cert.to_str().expect("utf-8 path"),
        key.to_str().expect("utf-8 path"),
    );
    let fed = Federation::start("200ms");
    let with_cert = ["--store-ca", ca, "--store-cert", cert, "--store-key", key];

    // Without the certificate the server refuses the role, and the registry says so.
    let args = registry_args(&fed, "registry-nocert", &url, &["--store-ca", ca]);
    let refused = run("registry", &strs(&args), "");
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(
        refused.stderr.contains("certificate"),
        "not said why: {refused:?}"
    );

    // With it, a registry and a group node store as that role.
    let args = registry_args(&fed, "registry-cert", &url, &with_cert);
    let registry = Server::start(
        "registry",
        &strs(&args),
        &fed.dir.path().join("registry-cert.log"),
    );
    assert!(registry.key.is_some(), "{}", registry.log());
    let mut node_args = vec!["--store", url.as_str()];
    node_args.extend(with_cert);
    let _node = fed.node("Signed", "127.0.0.1:0", "n", &node_args);
    fed.join_when_listed("alice", "Signed");
    ok(fed.cli("alice", &["send", "Signed", "by certificate"], ""));
    let shown = ok(fed.cli("alice", &["messages", "Signed"], ""));
    assert!(shown.stdout.contains("by certificate"), "{shown:?}");

    let sessions = every_servers_sessions(&cluster);
    let want = format!("CN={CERT_ROLE}");
    assert!(
        sessions
            .iter()
            .all(|(_, ssl, dn)| *ssl && dn.contains(&want)),
        "a session without the client certificate: {sessions:?}"
    );
}
