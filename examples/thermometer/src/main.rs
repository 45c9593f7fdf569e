//! `thermometer`: an Agora service bot, written only against `agora-proto` and
//! `agora-common`.
//!
//! It holds an account (`--user`, default `thermometer1`), stays online, publishes a
//! simulated temperature reading to each `--group` (repeatable; one connection per host,
//! every request naming its group) every `--every`, and answers direct messages:
//! - `subscribe` / `unsubscribe`: readings also come to you by direct message, or stop;
//! - `range`: the range of values it produces;
//! - `reboot`: restarts its series.
//!
//! Anything else gets the list of commands. Prints `listening USER` once ready. Exits 0 on
//! SIGINT/SIGTERM, 2 on a bad argument (clap names it: `--registry 127.0.0.1:99999`,
//! `--beacon-port 0`), 1 on any other failure.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agora_common::client::{ClientCurve, ClientError, ClientOptions, HostClient, RegistryClient};
use agora_common::inbox::Inbox;
use agora_common::keys::{Keypair, PublicKey};
use agora_common::shutdown::Shutdown;
use agora_proto::id::MessageId;
use agora_proto::wire::{Endpoint, ErrorCode, GroupName, UserName};
use anyhow::Context;
use clap::Parser;
use serde_json::value::RawValue;

/// The readings' range, in °C.
const LOW: f64 = 15.0;
const HIGH: f64 = 30.0;

/// A thermometer bot for Agora: it keeps an account online, posts a simulated temperature
/// reading to a group every few seconds, and answers direct messages (`subscribe`,
/// `unsubscribe`, `range`, `reboot`). Prints `listening USER` once ready.
#[derive(Debug, Parser)]
#[command(name = "thermometer")]
struct Args {
    /// The registry's endpoint, or `auto`: the registry heard on the LAN by its beacon
    /// (PROTOCOL §10; its key is then pinned in the key directory on first use).
    /// IP:PORT is taken too.
    #[arg(long, env = "AGORA_REGISTRY", default_value = "tcp://127.0.0.1:5555",
          value_parser = agora_common::server::args::registry)]
    registry: String,
    /// The registry's public key; required unless --registry auto hears it.
    #[arg(long, env = "AGORA_REGISTRY_KEY", allow_hyphen_values = true)]
    registry_key: Option<PublicKey>,
    /// With --registry auto: the name of the registry to use when several are heard.
    #[arg(long, env = "AGORA_REGISTRY_NAME")]
    registry_name: Option<String>,
    /// The UDP port registries' beacons arrive on (--registry auto); 1-65535.
    #[arg(long, env = "AGORA_BEACON_PORT", default_value_t = agora_proto::beacon::BEACON_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    beacon_port: u16,
    /// How long --registry auto listens for beacons (sent every second).
    #[arg(long, env = "AGORA_DISCOVER_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    discover_wait: Duration,
    /// The bot's account name.
    #[arg(long, default_value = "thermometer1")]
    user: UserName,
    /// Where its key pair lives (USER.key, made on first start).
    #[arg(long, env = "AGORA_KEY_DIR")]
    key_dir: Option<std::path::PathBuf>,
    /// A group to publish readings to (joined on start); repeat it for several. The groups
    /// of one host (`group-node --host`) share one connection.
    #[arg(long = "group", value_name = "GROUP")]
    groups: Vec<GroupName>,
    /// How often to take a reading.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    every: Duration,
}

/// A simulated series: a slow wave plus a little noise from a linear congruential
/// generator (simulation only, nothing secret), always within [`LOW`, `HIGH`].
struct Series {
    step: u64,
    noise: u64,
}

impl Series {
    fn new() -> Series {
        Series { step: 0, noise: 1 }
    }

    fn next(&mut self) -> f64 {
        self.step += 1;
        self.noise = self
            .noise
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let wave = (self.step as f64 / 10.0).sin();
        let jitter = ((self.noise >> 33) % 100) as f64 / 100.0 - 0.5;
        let mid = (LOW + HIGH) / 2.0;
        let t = mid + wave * (HIGH - mid - 1.0) + jitter;
        (t.clamp(LOW, HIGH) * 10.0).round() / 10.0
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thermometer: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn text(s: &str) -> Box<RawValue> {
    RawValue::from_string(serde_json::Value::String(s.to_owned()).to_string())
        .unwrap_or_else(|_| unreachable!("a JSON string is JSON"))
}

/// The hosts the readings go to: one [`HostClient`] per endpoint, shared by the groups it
/// serves (a group host serves many at one endpoint), each request naming its group.
#[derive(Default)]
struct Hosts {
    /// Endpoint -> its client and the groups published to there.
    by_endpoint: BTreeMap<String, (HostClient, Vec<GroupName>)>,
}

impl Hosts {
    /// Joins `group` at `endpoint` (talking CURVE with `curve`), through the endpoint's
    /// client: the first group's curve makes it, the others at that endpoint share it.
    ///
    /// # Errors
    /// The node's refusal or silence, naming the group and the endpoint.
    fn join(
        &mut self,
        ctx: &zmq::Context,
        endpoint: &Endpoint,
        curve: ClientCurve,
        group: &GroupName,
        user: &UserName,
        options: ClientOptions,
    ) -> anyhow::Result<()> {
        let (host, groups) = self
            .by_endpoint
            .entry(endpoint.to_string())
            .or_insert_with(|| {
                let client = HostClient::new(ctx, endpoint.as_str(), user.clone(), options)
                    .with_curve(curve);
                (client, Vec::new())
            });
        host.group(group)
            .join()
            .with_context(|| format!("joining {group} at {endpoint}"))?;
        if !groups.contains(group) {
            groups.push(group.clone());
        }
        Ok(())
    }

    /// Sends `body` to every group, each with an id of its own; a failure is logged and the
    /// others go on.
    fn publish(&mut self, body: &RawValue) {
        for (endpoint, (host, groups)) in &mut self.by_endpoint {
            for group in groups.iter() {
                if let Err(e) = host.group(group).send(body.to_owned()) {
                    tracing::warn!(error = %e, %group, %endpoint, "could not publish a reading");
                }
            }
        }
    }
}

fn run(mut args: Args) -> anyhow::Result<()> {
    let stop = Shutdown::on_signals()?;
    let dir = match args.key_dir {
        Some(d) => d,
        None => directories::ProjectDirs::from("", "", "agora")
            .map(|d| d.config_dir().to_owned())
            .context("no home directory; pass --key-dir")?,
    };
    if args.registry == "auto" {
        let (chosen, key) = agora_common::beacon::auto(
            args.beacon_port,
            args.discover_wait,
            args.registry_name.as_deref(),
            &dir.join("known_servers.json"),
            args.registry_key,
            false,
        )?;
        args.registry = chosen.endpoint;
        args.registry_key = key;
    }
    let server_key = args
        .registry_key
        .context("no registry key: pass --registry-key, or --registry auto")?;
    let (keypair, _) = Keypair::load_or_generate(&dir.join(format!("{}.key", args.user)))?;
    let curve = ClientCurve {
        keypair,
        server_key,
    };
    let ctx = zmq::Context::new();
    let options = ClientOptions::default();
    let mut registry = RegistryClient::new(&ctx, &args.registry, options).with_curve(curve.clone());
    registry.user_register(&args.user)?;
    let ttl = registry
        .connect(agora_proto::wire::Presence::Online)?
        .ttl_ms;
    let mut hosts = Hosts::default();
    for name in &args.groups {
        let entry = registry.lookup(name)?;
        let server_key = entry
            .public_key
            .with_context(|| format!("{name}: its node has no key"))?;
        let node_curve = ClientCurve {
            keypair: curve.keypair.clone(),
            server_key,
        };
        hosts.join(&ctx, &entry.endpoint, node_curve, name, &args.user, options)?;
    }
    // Commands are answered on this thread, which owns the clients: the inbox hands them
    // over and they are acked once answered.
    let (to_main, dms) = std::sync::mpsc::sync_channel(1024);
    let inbox = Inbox::start(
        &ctx,
        &args.registry,
        curve,
        Duration::from_millis(ttl / 3).max(Duration::from_millis(100)),
        move |dm| {
            let _ = to_main.send(dm);
            false
        },
    )?;
    println!("listening {}", args.user);
    std::io::stdout().flush()?;

    let mut series = Series::new();
    let mut subscribers: BTreeSet<UserName> = BTreeSet::new();
    let mut next = Instant::now();
    while !stop.is_triggered() {
        if Instant::now() >= next {
            let t = series.next();
            let body = serde_json::json!({"temperature": t, "unit": "C"}).to_string();
            hosts.publish(&RawValue::from_string(body)?);
            for user in &subscribers {
                let reading = text(&format!("temperature {t:.1} C"));
                if let Err(e) = registry.send_dm(user, reading, MessageId::new_v7()) {
                    tracing::warn!(error = %e, %user, "could not send a reading");
                }
            }
            next = Instant::now() + args.every;
        }
        let Ok(dm) = dms.recv_timeout(Duration::from_millis(50)) else {
            continue;
        };
        let command = match serde_json::from_str::<serde_json::Value>(dm.body.get()) {
            Ok(serde_json::Value::String(s)) => s.trim().to_ascii_lowercase(),
            _ => String::new(),
        };
        let answer = match command.as_str() {
            "subscribe" => {
                subscribers.insert(dm.from.clone());
                "subscribed: readings will come by direct message".to_owned()
            }
            "unsubscribe" => {
                subscribers.remove(&dm.from);
                "unsubscribed".to_owned()
            }
            "range" => format!("range {LOW:.1}..{HIGH:.1} C"),
            "reboot" => {
                series = Series::new();
                "rebooted".to_owned()
            }
            _ => "commands: subscribe, unsubscribe, range, reboot".to_owned(),
        };
        match registry.send_dm(&dm.from, text(&answer), MessageId::new_v7()) {
            Ok(_) => {}
            Err(ClientError::Server(e)) if e.code == ErrorCode::UnknownUser => {}
            Err(e) => tracing::warn!(error = %e, "could not answer"),
        }
        inbox.ack(dm.n);
    }
    drop(inbox);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_stay_in_range_and_reboot_restarts_the_series() {
        let mut s = Series::new();
        let first: Vec<f64> = (0..200).map(|_| s.next()).collect();
        assert!(first.iter().all(|t| (LOW..=HIGH).contains(t)), "{first:?}");
        let mut again = Series::new();
        assert_eq!(again.next(), first[0]);
    }
}
