//! `revsync dev`: everything a newcomer needs on one machine, in one command, with nothing
//! to install beyond the build. It starts a Kafka-protocol broker inside the process
//! (librdkafka's mock cluster; or Tansu with `--tansu`, or an existing broker with
//! `--brokers`), a demo issuer (an ES256 key, its JWKS, `/token` to mint access tokens and
//! `/revoke` to publish revocations), and the daemon wired to both. Not for production:
//! the demo issuer hands out and revokes tokens for anyone on loopback.

mod broker;
mod issuer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use broker::{tansu_path, EmbeddedBroker, TANSU_VERSION};
pub use issuer::{issuer_router, DemoIssuer, DEMO_AUDIENCE};

use crate::config::{Config, KafkaConfig};

/// Partitions of the revocation topic `dev` creates: more than one, as in production.
const PARTITIONS: i32 = 3;

/// First line of the config `dev` writes. `dev` deletes `<dir>/store` only under a config
/// that starts with it, so pointing `--dir` at a real daemon's directory deletes nothing.
const WRITTEN_BY: &str = "# Written by `revsync dev` at each start.\n";

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Working directory: the config dev writes (revsync.toml) and the store.
    #[arg(long, default_value = "revsync-dev")]
    pub dir: PathBuf,
    /// Port of the check API.
    #[arg(long, default_value_t = 8181)]
    pub port: u16,
    /// Port of the demo issuer (JWKS, /token, /revoke).
    #[arg(long, default_value_t = 8182)]
    pub issuer_port: u16,
    /// Port of the local broker (embedded, or Tansu with --tansu).
    #[arg(long, default_value_t = 9092)]
    pub broker_port: u16,
    /// Use this running Kafka-protocol broker (HOST:PORT[,…]) instead of starting one. Its
    /// `revocations` topic is read as it is (create it first unless the broker auto-creates
    /// topics), and the store is kept between runs, as the broker keeps its log.
    #[arg(long, conflicts_with_all = ["tansu", "broker_port"])]
    pub brokers: Option<String>,
    /// Start the pinned Tansu broker (REVSYNC_TANSU, else ~/.cache/revsync/tansu-0.6.0,
    /// which `bash .ci/run` installs) instead of the embedded one.
    #[arg(long)]
    pub tansu: bool,
}

/// The broker `dev` runs on; whatever it started stops when this is dropped.
enum DevBroker {
    Embedded { _broker: EmbeddedBroker },
    Tansu { _child: tokio::process::Child },
    External,
}

impl DevBroker {
    fn describe(&self) -> &'static str {
        match self {
            DevBroker::Embedded { .. } => "embedded (librdkafka mock cluster; log in memory)",
            DevBroker::Tansu { .. } => "Tansu (log in memory)",
            DevBroker::External => "external",
        }
    }

    /// Whether the log starts empty at each run (so the store must too).
    fn log_is_new(&self) -> bool {
        !matches!(self, DevBroker::External)
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let api_addr = format!("127.0.0.1:{}", args.port);
    let listener = crate::app::Listener::bind(&api_addr)
        .await
        .with_context(|| format!("binding the check API on {api_addr}; pass --port"))?;
    let issuer_listener = tokio::net::TcpListener::bind(("127.0.0.1", args.issuer_port))
        .await
        .with_context(|| {
            format!(
                "binding the demo issuer on port {}; pass --issuer-port",
                args.issuer_port
            )
        })?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::shutdown_signal(shutdown.clone()));

    let store = args.dir.join("store");
    let mut config = Config::new(String::new(), &store);
    let topic = config.kafka.topics[0].name.clone();
    let (broker, brokers) = match (&args.brokers, args.tansu) {
        (Some(brokers), _) => (DevBroker::External, brokers.clone()),
        (None, true) => {
            let child = broker::start_tansu(args.broker_port, &topic, PARTITIONS).await?;
            (
                DevBroker::Tansu { _child: child },
                format!("127.0.0.1:{}", args.broker_port),
            )
        }
        (None, false) => {
            let addr = SocketAddr::from(([127, 0, 0, 1], args.broker_port));
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("binding the broker on {addr} (another broker?); pass --broker-port")
            })?;
            let b = EmbeddedBroker::start(l, &topic, PARTITIONS)?;
            let brokers = b.bootstrap();
            (DevBroker::Embedded { _broker: b }, brokers)
        }
    };
    if broker.log_is_new() {
        // The store holds positions in, and revocations from, the log of an earlier run,
        // which died with it. Kept, it would answer `revoked` for events this broker
        // never had (re-running the walkthrough would find demo-1 revoked before it is),
        // and revsync would first have to notice the log reset. So each run starts empty.
        fresh_store(&args.dir)?;
    }

    let issuer_url = format!("http://127.0.0.1:{}", args.issuer_port);
    let issuer = Arc::new(
        DemoIssuer::generate(issuer_url.clone())?
            .publishing_to(KafkaConfig::new(brokers.clone()), topic.clone()),
    );
    let router = issuer_router(issuer.clone());
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(issuer_listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });

    config.kafka.brokers = brokers.clone();
    config.http.listen = api_addr;
    config.issuers.push(issuer.config());
    config.validate()?;
    let config_path = args.dir.join("revsync.toml");
    std::fs::write(
        &config_path,
        format!("{WRITTEN_BY}{}", config.to_redacted_toml()),
    )
    .with_context(|| format!("writing {}", config_path.display()))?;
    info!(
        brokers = %brokers,
        issuer = %issuer_url,
        api = %config.http.listen,
        "dev mode"
    );
    println!(
        "\nrevsync dev is running (Ctrl-C stops it).\n\
         \n  broker  {brokers}  {}\n  issuer  {issuer_url}  (/token, /revoke, /jwks)\n  API     http://{}  (/v1/check, /v1/status, /readyz, /metrics)\n  config  {}\n\
         \nTry, in another shell:\n",
        broker.describe(),
        config.http.listen,
        config_path.display(),
    );
    let exe = shown_exe();
    for line in walkthrough(README).unwrap_or_default() {
        println!(
            "  {}",
            localize(line, args.port, args.issuer_port, &brokers, &exe)
        );
    }
    println!();
    let result = crate::app::run(config, listener, shutdown).await;
    drop(broker);
    result.map(|()| 0)
}

/// Deletes `<dir>/store` when the config beside it was written by `dev`.
fn fresh_store(dir: &Path) -> anyhow::Result<()> {
    let store = dir.join("store");
    if !store.exists() {
        return Ok(());
    }
    let config = dir.join("revsync.toml");
    let ours = std::fs::read_to_string(&config).is_ok_and(|t| t.starts_with(WRITTEN_BY));
    if !ours {
        bail!(
            "{} exists but {} was not written by revsync dev: not deleting it; pass another --dir",
            store.display(),
            config.display()
        );
    }
    std::fs::remove_dir_all(&store).with_context(|| format!("deleting {}", store.display()))
}

const README: &str = include_str!("../../README.md");

/// The line before the README's walkthrough block: `dev` prints that block, and
/// tests/walkthrough.rs runs it, so the README cannot drift from what works.
pub const WALKTHROUGH_MARKER: &str =
    "<!-- walkthrough: tests/walkthrough.rs runs these lines as written -->";

/// The lines of the first fenced block after [`WALKTHROUGH_MARKER`] in `readme`.
pub fn walkthrough(readme: &str) -> Option<Vec<&str>> {
    let after = &readme[readme.find(WALKTHROUGH_MARKER)? + WALKTHROUGH_MARKER.len()..];
    let mut lines = after.lines().skip_while(|l| !l.starts_with("```"));
    lines.next()?;
    let block: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    (!block.is_empty()).then_some(block)
}

/// A walkthrough line with the default addresses replaced by these ports and brokers, and
/// the release binary (`./target/release/revsync`, `cargo run --release --`) by `exe`.
pub fn localize(line: &str, port: u16, issuer_port: u16, brokers: &str, exe: &str) -> String {
    line.replace("127.0.0.1:8181", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:8182", &format!("127.0.0.1:{issuer_port}"))
        .replace("127.0.0.1:9092", brokers)
        .replace("./target/release/revsync", exe)
        .replace("cargo run --release --", exe)
}

/// How to name this binary in the printed walkthrough: as the README does when it is the
/// release build in `./target`, else by its full path.
fn shown_exe() -> String {
    const RELEASE: &str = "./target/release/revsync";
    let here = std::env::current_exe().ok();
    let release = std::fs::canonicalize(RELEASE).ok();
    match here {
        Some(h) if release.is_none_or(|r| r != h) => h.display().to_string(),
        _ => RELEASE.to_string(),
    }
}
