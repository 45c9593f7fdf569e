//! `agora-web`: the chat page and its WebSocket gateway, for one person (personal mode).
//!
//! Prints `listening URL` on stdout once bound, the URL carrying the one-time token; logs go
//! to stderr (RUST_LOG). Exit codes: 0 after SIGINT or SIGTERM, 1 when starting fails, 2 for
//! invalid arguments.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agora_proto::wire::UserName;
use agora_web::{auth, bridge, router, AppState};
use anyhow::Context;
use clap::Parser;

/// Agora in the browser, for one person: serves the chat page on loopback and speaks to the
/// federation with that person's key.
#[derive(Debug, Parser)]
#[command(name = "agora-web", version, about)]
struct Args {
    /// Whose key to use (USER.key in the key directory, made by user-cli on first use).
    #[arg(long, env = "AGORA_USER")]
    user: UserName,
    /// Where to listen, IP:PORT (port 0 picks one). Personal mode serves loopback only.
    #[arg(long, env = "AGORA_WEB_BIND", default_value = "127.0.0.1:8080")]
    bind: std::net::SocketAddr,
    /// The registry's endpoint.
    #[arg(long, env = "AGORA_REGISTRY", default_value = "tcp://127.0.0.1:5555")]
    registry: String,
    /// The registry's CURVE public key (40 Z85 characters).
    #[arg(long, env = "AGORA_REGISTRY_KEY", allow_hyphen_values = true)]
    registry_key: Option<agora_common::keys::PublicKey>,
    /// Where key pairs live [default: ~/.config/agora].
    #[arg(long, env = "AGORA_KEY_DIR")]
    key_dir: Option<std::path::PathBuf>,
    /// How long to wait for a server, per call.
    #[arg(long, env = "AGORA_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agora-web: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if !args.bind.ip().is_loopback() {
        anyhow::bail!(
            "personal mode serves loopback only, not {}: the page acts with your key",
            args.bind
        );
    }
    let dir = match &args.key_dir {
        Some(d) => d.clone(),
        None => directories::ProjectDirs::from("", "", "agora")
            .map(|d| d.config_dir().to_owned())
            .context("no home directory; pass --key-dir")?,
    };
    let (keypair, _) =
        agora_common::keys::Keypair::load_or_generate(&dir.join(format!("{}.key", args.user)))?;
    let server_key = args
        .registry_key
        .context("no registry key: pass --registry-key (the registry prints it at start)")?;
    let federation = bridge::Federation {
        registry: args.registry.clone(),
        curve: Some(agora_common::client::ClientCurve {
            keypair,
            server_key,
        }),
        user: args.user.clone(),
        timeout: args.timeout,
    };
    let auth = Arc::new(auth::Auth::new().context("no randomness for the token")?);
    let state = AppState {
        auth: Arc::clone(&auth),
        federation: Arc::new(federation),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.bind)
            .await
            .with_context(|| format!("binding {}", args.bind))?;
        let addr = listener.local_addr()?;
        let token = auth.token().unwrap_or_default();
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening http://{addr}/?token={token}")?;
        out.flush()?;
        drop(out);
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
