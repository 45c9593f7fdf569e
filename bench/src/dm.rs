//! Direct-message benchmarks against a real `registry` process: a reconnecting user
//! fetching stored messages, and send→deliver latency to an online user (pushed through
//! `common::inbox`, the code user-cli and bots run).

use std::process::Child;
use std::time::{Duration, Instant};

use agora_common::client::{ClientCurve, ClientOptions, RegistryClient};
use agora_common::inbox::Inbox;
use agora_common::keys::{Keypair, PublicKey};
use agora_proto::id::MessageId;
use agora_proto::wire::UserName;
use anyhow::{bail, Context};

use crate::body;

/// A running `registry` process (killed on drop).
pub(crate) struct RegistryProc {
    child: Child,
    endpoint: String,
    key: PublicKey,
    _dir: tempfile::TempDir,
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RegistryProc {
    /// A client with a fresh key pair, and its CURVE settings (the key pair and the
    /// registry's key).
    pub(crate) fn client(
        &self,
        ctx: &zmq::Context,
    ) -> anyhow::Result<(RegistryClient, ClientCurve)> {
        self.client_as(ctx, Keypair::generate()?)
    }

    /// As [`RegistryProc::client`], with the key pair `keypair` (a group host's, say).
    pub(crate) fn client_as(
        &self,
        ctx: &zmq::Context,
        keypair: Keypair,
    ) -> anyhow::Result<(RegistryClient, ClientCurve)> {
        let curve = ClientCurve {
            keypair,
            server_key: self.key,
        };
        let options = ClientOptions {
            timeout: Duration::from_secs(30),
            attempts: 1,
        };
        let client = RegistryClient::new(ctx, &self.endpoint, options).with_curve(curve.clone());
        Ok((client, curve))
    }

    /// Where clients connect.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The registry's CURVE public key.
    pub(crate) fn key(&self) -> PublicKey {
        self.key
    }

    /// The registry's resident memory, KiB.
    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        crate::servers::rss_kib(self.child.id())
    }

    /// The registry's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts the release `registry` beside this binary on a free loopback port, over CURVE,
/// with no rate limits (requests, DMs), room for 100,000 DMs per mailbox, all of them from
/// one sender if it likes, and `extra` arguments.
pub(crate) fn start_registry(extra: &[&str]) -> anyhow::Result<RegistryProc> {
    let mut args = vec![
        "--bind",
        "tcp://127.0.0.1:0",
        "--rate-limit",
        "0",
        "--max-mailbox",
        "100000",
        "--dm-share",
        "100",
        "--dm-rate",
        "0",
    ];
    args.extend_from_slice(extra);
    let (child, words, dir) = crate::spawn_server("registry", &args)?;
    let [_, endpoint, _, key, ..] = words.as_slice() else {
        bail!("registry printed {words:?}");
    };
    Ok(RegistryProc {
        endpoint: (*endpoint).to_owned(),
        key: key.parse()?,
        child,
        _dir: dir,
    })
}

fn user(
    ctx: &zmq::Context,
    reg: &RegistryProc,
    name: &str,
) -> anyhow::Result<(RegistryClient, ClientCurve)> {
    let (mut client, curve) = reg.client(ctx)?;
    client.user_register(&UserName::new(name)?)?;
    Ok((client, curve))
}

/// `stored` DMs sent to an offline user, then fetched and acked as a reconnecting client
/// does (pages of 1000). Prints the send rate and the time to receive them all.
pub fn stored(count: u64, bytes: usize) -> anyhow::Result<()> {
    let ctx = zmq::Context::new();
    let reg = start_registry(&[])?;
    let (mut alice, _) = user(&ctx, &reg, "alice")?;
    let (mut bob, _) = user(&ctx, &reg, "bob")?;
    let to = UserName::new("bob")?;
    let started = Instant::now();
    for n in 0..count {
        alice.send_dm(&to, body(n, bytes), MessageId::new_v7())?;
    }
    let sent = started.elapsed();
    let started = Instant::now();
    let (mut after, mut got) = (0, 0u64);
    loop {
        let page = bob.mailbox(after, Some(1000))?;
        got += page.messages.len() as u64;
        if let Some(last) = page.messages.last() {
            after = last.n;
            bob.ack_dm(after)?;
        }
        if !page.more {
            break;
        }
    }
    let received = started.elapsed();
    if got != count {
        bail!("received {got} of {count} stored messages");
    }
    println!(
        "{:<52} {:>10.0} /s",
        format!("DM sends to an offline user, acked ({count} msgs)"),
        count as f64 / sent.as_secs_f64()
    );
    println!(
        "{:<52} {:>10.0} ms",
        format!("reconnecting user receives {count} stored DMs"),
        received.as_secs_f64() * 1e3
    );
    Ok(())
}

/// Send→deliver latency of `count` sequential DMs to an online user (pushed).
pub fn latency(count: u64, bytes: usize) -> anyhow::Result<()> {
    let ctx = zmq::Context::new();
    let reg = start_registry(&[])?;
    let (mut alice, _) = user(&ctx, &reg, "alice")?;
    let (_, bob_curve) = user(&ctx, &reg, "bob")?;
    let (to_bench, dms) = std::sync::mpsc::sync_channel(1024);
    let inbox = Inbox::start(
        &ctx,
        &reg.endpoint,
        bob_curve,
        Duration::from_secs(5),
        move |dm| {
            let _ = to_bench.send(dm);
            false
        },
    )?;
    // Online once the first heartbeat went through.
    let started = Instant::now();
    loop {
        let presence = alice.whois(&UserName::new("bob")?)?.user.presence;
        if presence != agora_proto::wire::Presence::Offline {
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("bob never came online");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let to = UserName::new("bob")?;
    let mut samples = Vec::with_capacity(count as usize);
    for n in 0..count {
        let t = Instant::now();
        let ack = alice.send_dm(&to, body(n, bytes), MessageId::new_v7())?;
        loop {
            let dm = dms
                .recv_timeout(Duration::from_secs(10))
                .context("a DM was not pushed within 10 s")?;
            if dm.n == ack.n {
                samples.push(t.elapsed());
                inbox.ack(dm.n);
                break;
            }
        }
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "{:<52} {:>7.0} µs / {:>6.0} µs",
        "DM send→deliver p50 / p99, online user",
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6
    );
    Ok(())
}

/// A broadcast from the operator to `accounts` accounts, each registered with its own key:
/// the time to store every copy (one transaction, one commit), as recipients per second;
/// then the same broadcast again, which must store nothing twice.
pub fn broadcast(accounts: u64, bytes: usize) -> anyhow::Result<()> {
    let ctx = zmq::Context::new();
    let operator = Keypair::generate()?;
    let max = (accounts + 10).to_string();
    let reg = start_registry(&[
        "--operator",
        &operator.public.to_string(),
        "--max-users",
        &max,
    ])?;
    for n in 0..accounts {
        user(&ctx, &reg, &format!("user-{n}"))?;
    }
    let options = ClientOptions {
        timeout: Duration::from_secs(60),
        attempts: 1,
    };
    let mut op = RegistryClient::new(&ctx, &reg.endpoint, options).with_curve(ClientCurve {
        keypair: operator,
        server_key: reg.key,
    });
    op.user_register(&UserName::new("operator")?)?;
    let id = MessageId::new_v7();
    let started = Instant::now();
    let reply = op.broadcast(body(0, bytes), id)?;
    let took = started.elapsed();
    if reply.stored != accounts || !reply.undelivered.is_empty() {
        bail!(
            "the broadcast stored {} of {accounts} copies ({} undelivered)",
            reply.stored,
            reply.undelivered.len()
        );
    }
    let again = op.broadcast(body(0, bytes), id)?;
    if again.stored != 0 || again.duplicates != accounts {
        bail!("the retried broadcast stored {} copies again", again.stored);
    }
    println!(
        "{:<52} {:>10.0} /s ({:.0} ms)",
        format!("broadcast to {accounts} accounts, recipients"),
        accounts as f64 / took.as_secs_f64(),
        took.as_secs_f64() * 1e3
    );
    Ok(())
}
