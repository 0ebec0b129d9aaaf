//! The command line: `run`, `publish`, `check`, `denylist …`, `config check`.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, KafkaConfig};
use crate::denylist::{Denylist, Retention};
use crate::event::{Event, Revocation};
use crate::publish::{new_event_id, Publisher};

#[derive(Parser, Debug)]
#[command(
    name = "revsync",
    version,
    about = "JWT revocation sidecar: Kafka revocation events → local denylist → localhost checks"
)]
pub struct Cli {
    /// Log JSON lines instead of text (level from RUST_LOG, default info).
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// JSON logs: `--log-json`, or `log.json` (file or `REVSYNC_LOG__JSON`) of the config
    /// `run` is given. Logging starts before `run` loads the config, which reports any
    /// error in it then.
    pub fn json_logs(&self) -> bool {
        self.log_json
            || matches!(&self.command, Command::Run(args)
                if load_config(&args.config).is_ok_and(|c| c.log.json))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Run(RunArgs),
    /// Try it on one machine: a local broker, a demo issuer and the daemon.
    Dev(crate::dev::DevArgs),
    /// Publish revocation events (native v1) to Kafka, as an authorization server would.
    Publish(PublishArgs),
    /// Ask a running daemon about a token (read from stdin, never from the command line).
    Check(CheckArgs),
    /// Exit 0 if URL answers 2xx, 1 otherwise (for exec probes: revsync listens on loopback).
    /// Sends the check API credential when one is configured (see `check`).
    Probe {
        #[arg(default_value = "http://127.0.0.1:8181/readyz")]
        url: String,
        /// Take the credential (http.credential or http.credential_file) from this config
        /// file; without one, from REVSYNC_HTTP__CREDENTIAL or REVSYNC_HTTP__CREDENTIAL_FILE.
        #[arg(long, short, env = "REVSYNC_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Inspect the denylist store of a stopped daemon.
    Denylist {
        #[command(subcommand)]
        command: DenylistCommand,
    },
    /// Validate a config file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Config file (TOML).
    #[arg(long, short, env = "REVSYNC_CONFIG")]
    pub config: PathBuf,
    /// Override `http.listen`.
    #[arg(long)]
    pub listen: Option<String>,
    /// Override `store.path`.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Override `kafka.brokers`.
    #[arg(long)]
    pub brokers: Option<String>,
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Bootstrap brokers (ignored when --config is given).
    #[arg(long, default_value = crate::config::DEFAULT_BROKERS, env = "REVSYNC_KAFKA__BROKERS")]
    pub brokers: String,
    /// Take brokers and librdkafka properties from this config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Topic to publish to.
    #[arg(long, default_value = "revocations")]
    pub topic: String,
    /// Free text for operators.
    #[arg(long, global = true)]
    pub reason: Option<String>,
    /// Event time (unix seconds); default now.
    #[arg(long, global = true)]
    pub event_time: Option<u64>,
    #[command(subcommand)]
    pub what: PublishWhat,
}

#[derive(Subcommand, Debug)]
pub enum PublishWhat {
    /// Revoke one token.
    Token {
        #[arg(long)]
        iss: String,
        #[arg(long)]
        jti: String,
        /// The token's exp (lets the entry be dropped then).
        #[arg(long)]
        exp: Option<u64>,
    },
    /// Revoke a subject's tokens issued at or before --not-before (default: now).
    Subject {
        #[arg(long)]
        iss: String,
        #[arg(long)]
        sub: String,
        #[arg(long)]
        not_before: Option<u64>,
    },
    /// Revoke every token of a session.
    Session {
        #[arg(long)]
        iss: String,
        #[arg(long)]
        sid: String,
    },
    /// Revoke a client's tokens issued at or before --not-before (default: now).
    Client {
        #[arg(long)]
        iss: String,
        #[arg(long)]
        client_id: String,
        #[arg(long)]
        not_before: Option<u64>,
    },
    /// Revoke every token of an issuer issued at or before --not-before (default: now).
    Issuer {
        #[arg(long)]
        iss: String,
        #[arg(long)]
        not_before: Option<u64>,
    },
    /// Publish native v1 events read as JSON lines from stdin.
    Lines,
    /// Publish a heartbeat for an issuer (proves the publishing path is alive; see
    /// `freshness.heartbeat_max_age`). With --every, keep publishing until interrupted.
    Heartbeat {
        #[arg(long)]
        iss: String,
        /// Publish again at this interval (e.g. "10s") until SIGINT/SIGTERM.
        #[arg(long, value_parser = humantime::parse_duration)]
        every: Option<Duration>,
    },
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Base URL of the daemon.
    #[arg(long, default_value = "http://127.0.0.1:8181")]
    pub url: String,
    /// Take the credential (http.credential or http.credential_file) from this config
    /// file; without one, from REVSYNC_HTTP__CREDENTIAL or REVSYNC_HTTP__CREDENTIAL_FILE.
    /// Sent as X-Revsync-Credential when one is configured.
    #[arg(long, short, env = "REVSYNC_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum DenylistCommand {
    /// Entry counts by kind and stored positions.
    Stats(StoreArgs),
    /// Every entry, one JSON line each.
    Dump(StoreArgs),
}

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// Store directory (default: store.path of --config).
    #[arg(long)]
    pub store: Option<PathBuf>,
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a config file and print the effective config, secrets redacted.
    Check { file: PathBuf },
}

fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with(crate::config::ENV_PREFIX))
}

pub fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path, process_env())?)
}

/// The check API credential a client command sends: from the config file when given
/// (environment overrides included), else from `REVSYNC_HTTP__CREDENTIAL` or
/// `REVSYNC_HTTP__CREDENTIAL_FILE`; none when neither configures one.
fn client_credential(config: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let http = match config {
        Some(path) => load_config(path)?.http,
        None => crate::config::HttpConfig::from_env(process_env())?,
    };
    Ok(http.credential()?)
}

/// `request` with `X-Revsync-Credential` when there is a credential, marked sensitive
/// (never shown by a `Debug` of the request).
fn with_credential(
    request: reqwest::RequestBuilder,
    credential: Option<&str>,
) -> anyhow::Result<reqwest::RequestBuilder> {
    let Some(secret) = credential else {
        return Ok(request);
    };
    let mut value = reqwest::header::HeaderValue::from_str(secret)
        .context("the credential is not a valid header value")?;
    value.set_sensitive(true);
    Ok(request.header(crate::config::CREDENTIAL_HEADER, value))
}

pub async fn execute(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => {
            let mut config = load_config(&args.config)?;
            if let Some(l) = args.listen {
                config.http.listen = l;
            }
            if let Some(s) = args.store {
                config.store.path = s;
            }
            if let Some(b) = args.brokers {
                config.kafka.brokers = b;
            }
            config.validate()?;
            if config.issuers.is_empty() {
                tracing::warn!("no issuers configured: every check will answer wrong_issuer");
            }
            let listener = crate::app::Listener::bind(&config.http.listen).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(crate::shutdown_signal(shutdown.clone()));
            crate::app::run(config, listener, shutdown).await?;
            Ok(0)
        }
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Publish(args) => publish(args).await,
        Command::Check(args) => check(args).await,
        Command::Probe { url, config } => {
            let credential = client_credential(config.as_deref())?;
            let request = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?
                .get(&url);
            let ok = with_credential(request, credential.as_deref())?
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            Ok(if ok { 0 } else { 1 })
        }
        Command::Denylist { command } => denylist(command),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let config = load_config(&file)?;
            print!("{}", config.to_redacted_toml());
            eprintln!("config OK: {}", file.display());
            Ok(0)
        }
    }
}

async fn publish(args: PublishArgs) -> anyhow::Result<i32> {
    let kafka = match &args.config {
        Some(path) => load_config(path)?.kafka,
        None => KafkaConfig::new(args.brokers.clone()),
    };
    let topic = args.topic.clone();
    let now = crate::unix_now();
    let event_time = args.event_time.unwrap_or(now);
    if let PublishWhat::Heartbeat { iss, every } = args.what {
        return heartbeat(kafka, topic, iss, every).await;
    }
    let revocation = match args.what {
        PublishWhat::Token { iss, jti, exp } => Some(Revocation::Token { iss, jti, exp }),
        PublishWhat::Subject {
            iss,
            sub,
            not_before,
        } => Some(Revocation::Subject {
            iss,
            sub,
            not_before: not_before.unwrap_or(event_time),
        }),
        PublishWhat::Session { iss, sid } => Some(Revocation::Session { iss, sid }),
        PublishWhat::Client {
            iss,
            client_id,
            not_before,
        } => Some(Revocation::Client {
            iss,
            client_id,
            not_before: not_before.unwrap_or(event_time),
        }),
        PublishWhat::Issuer { iss, not_before } => Some(Revocation::Issuer {
            iss,
            not_before: not_before.unwrap_or(event_time),
        }),
        PublishWhat::Lines => None,
        PublishWhat::Heartbeat { .. } => unreachable!("handled above"),
    };
    let reason = args.reason;
    tokio::task::spawn_blocking(move || -> anyhow::Result<i32> {
        let publisher = Publisher::new(&kafka, &topic)?;
        let n = match revocation {
            Some(revocation) => {
                let event = Event {
                    id: new_event_id(),
                    event_time,
                    revocation,
                    reason,
                };
                publisher.send(&event)?;
                println!("{}", crate::event::encode_native(&event));
                1
            }
            None => publisher.send_lines(std::io::stdin().lock())?,
        };
        publisher.finish(Duration::from_secs(30))?;
        eprintln!("published {n} event(s) to {topic}");
        Ok(0)
    })
    .await?
}

async fn heartbeat(
    kafka: KafkaConfig,
    topic: String,
    iss: String,
    every: Option<Duration>,
) -> anyhow::Result<i32> {
    let publisher = std::sync::Arc::new(Publisher::new(&kafka, &topic)?);
    let stop = CancellationToken::new();
    if every.is_some() {
        tokio::spawn(crate::shutdown_signal(stop.clone()));
    }
    let mut n = 0u64;
    loop {
        let p = publisher.clone();
        let iss = iss.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let body = crate::event::encode_heartbeat(&new_event_id(), &iss, crate::unix_now());
            p.send_raw(&format!("{iss}\n"), body.as_bytes())?;
            p.finish(Duration::from_secs(10))?;
            Ok(())
        })
        .await??;
        n += 1;
        let Some(every) = every else { break };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    eprintln!("published {n} heartbeat(s) for {iss} to {topic}");
    Ok(0)
}

async fn check(args: CheckArgs) -> anyhow::Result<i32> {
    let mut token = String::new();
    std::io::stdin()
        .read_to_string(&mut token)
        .context("reading the token from stdin")?;
    let token = token.trim();
    if token.is_empty() {
        bail!("no token on stdin (usage: revsync check < token.txt)");
    }
    let credential = client_credential(args.config.as_deref())?;
    let url = format!("{}/v1/check", args.url.trim_end_matches('/'));
    let request = reqwest::Client::new()
        .post(&url)
        .json(&serde_json::json!({ "token": token }));
    let resp = with_credential(request, credential.as_deref())?
        .send()
        .await
        .with_context(|| format!("asking {url}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("reading the answer")?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    if !status.is_success() {
        return Ok(2);
    }
    Ok(if body["active"] == serde_json::Value::Bool(true) {
        0
    } else {
        1
    })
}

fn denylist(command: DenylistCommand) -> anyhow::Result<i32> {
    let (DenylistCommand::Stats(args) | DenylistCommand::Dump(args)) = &command;
    let (path, retention) = match (&args.store, &args.config) {
        (Some(p), _) => (
            p.clone(),
            Retention::new(
                crate::config::DEFAULT_MAX_TOKEN_LIFETIME,
                crate::config::DEFAULT_LEEWAY,
            ),
        ),
        (None, Some(c)) => {
            let config = load_config(c)?;
            (config.store.path.clone(), Retention::from_config(&config))
        }
        (None, None) => bail!("name the store with --store DIR or --config FILE"),
    };
    let d = Denylist::open(&path, 64 << 20, retention)
        .with_context(|| format!("opening {} (is the daemon still running?)", path.display()))?;
    match command {
        DenylistCommand::Stats(_) => {
            let out = serde_json::json!({
                "entries": d.sizes(),
                "positions": d.positions()?,
                "bytes_on_disk": d.size_on_disk(),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        DenylistCommand::Dump(_) => {
            for entry in d.entries()? {
                println!("{}", serde_json::to_string(&entry)?);
            }
        }
    }
    Ok(0)
}
