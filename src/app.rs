//! Start-up and shutdown of the daemon: open the store, start ingest, load keys, serve
//! the API on an already-bound listener, and on shutdown drain requests, stop the
//! consumer and flush the store, each within a bound.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, AppState, Checker};
use crate::config::Config;
use crate::denylist::{Denylist, Retention};
use crate::formats::set::SetVerifier;
use crate::freshness::{Freshness, Introspector};
use crate::ingest::{self, IngestState};
use crate::metrics::{CheckLabels, IssuerLabels, KindLabels, Metrics, TopicLabels};
use crate::ssf::{self, Bridge, Receiver, Sink};
use crate::token::TokenValidator;

/// How many expiry-log records one GC write walks; GC repeats until none are left.
const GC_BATCH: usize = 64;
const VERIFIED_CACHE_ENTRIES: u64 = 100_000;

/// A listener bound before start-up (tests bind port 0 and hand it in).
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    /// Binds `host:port` or `unix:/path`.
    pub async fn bind(spec: &str) -> anyhow::Result<Self> {
        if let Some(path) = spec.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            // A socket file left by a previous run would make bind fail.
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing stale socket {}", path.display()))?;
            }
            let l = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("binding unix socket {}", path.display()))?;
            Ok(Listener::Unix(l, path))
        } else {
            let l = tokio::net::TcpListener::bind(spec)
                .await
                .with_context(|| format!("binding {spec}"))?;
            Ok(Listener::Tcp(l))
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    // Counters of rare events whose labels are known now start at 0: a series born at 1
    // on its first increment is invisible to rate()/increase(), and absent from /metrics.
    for kind in ["token", "subject", "session", "client", "issuer"] {
        let _ = metrics.entries_expired.get_or_create(&KindLabels { kind });
    }
    for t in &config.kafka.topics {
        let labels = TopicLabels {
            topic: t.name.clone(),
            format: t.format.as_str(),
        };
        let _ = metrics.events_applied.get_or_create(&labels);
        let _ = metrics.events_ignored.get_or_create(&labels);
    }
    for (outcome, reason) in [
        ("active", "none"),
        ("inactive", "revoked"),
        ("error", "stale"),
    ] {
        let _ = metrics.introspections.get_or_create(&CheckLabels {
            route: "stale_policy",
            outcome,
            reason,
        });
    }
    for i in &config.issuers {
        let labels = IssuerLabels {
            issuer: i.issuer.clone(),
        };
        let _ = metrics.jwks_fetches.get_or_create(&labels);
        let _ = metrics.jwks_failures.get_or_create(&labels);
    }
    std::fs::create_dir_all(&config.store.path)
        .with_context(|| format!("creating store directory {}", config.store.path.display()))?;
    let denylist = Arc::new(
        Denylist::open(
            &config.store.path,
            config.store.cache_bytes,
            Retention::from_config(&config),
        )
        .with_context(|| format!("opening store {}", config.store.path.display()))?,
    );
    let ssf_listener = match &config.ssf {
        Some(ssf) => Some(
            Listener::bind(&ssf.listen)
                .await
                .context("binding the SSF push receiver")?,
        ),
        None => None,
    };

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    let background = CancellationToken::new();
    let validator = TokenValidator::start(
        &config.issuers,
        http,
        metrics.clone(),
        VERIFIED_CACHE_ENTRIES,
        background.clone(),
    )
    .await;
    // After the validator: `set` records are verified with its keys. The reader is a
    // plain thread; it hands each verification to this runtime (see `SetVerifier`).
    let ingest_state = IngestState::new();
    let ingest_stop = CancellationToken::new();
    let ingest = ingest::spawn_with(
        &config.kafka,
        denylist.clone(),
        metrics.clone(),
        ingest_state.clone(),
        ingest_stop.clone(),
        Some(SetVerifier::new(
            validator.clone(),
            tokio::runtime::Handle::current(),
        )),
    )
    .context("creating the Kafka consumer")?;
    let ssf = match (&config.ssf, ssf_listener) {
        (Some(ssf_config), Some(listener)) => {
            let sink = match &ssf_config.bridge_topic {
                Some(topic) => Sink::Bridge(
                    Bridge::start(&config.kafka, topic)
                        .context("creating the SSF bridge's Kafka producer")?,
                ),
                None => Sink::Local(denylist.clone()),
            };
            let receiver = Arc::new(Receiver::new(
                validator.clone(),
                ssf_config,
                sink,
                metrics.clone(),
            ));
            info!(
                listen = %listener.describe(),
                path = %ssf_config.path,
                bridge_topic = ?ssf_config.bridge_topic,
                "SSF push receiver started"
            );
            let app = ssf::router(
                receiver.clone(),
                &ssf_config.path,
                ssf_config.max_body_bytes,
            );
            let task = tokio::spawn(ssf::serve(listener, app, shutdown.clone()));
            Some((receiver, task))
        }
        _ => None,
    };
    let gc = tokio::spawn(gc_loop(
        denylist.clone(),
        metrics.clone(),
        config.store.gc_interval,
        background.clone(),
    ));

    let mut freshness = Freshness::new(config.freshness.clone(), ingest_state.clone())
        .with_heartbeats(config.issuers.iter().map(|i| i.issuer.clone()).collect());
    if config.freshness.on_stale == crate::config::OnStale::Introspect {
        freshness = freshness.with_introspector(
            Introspector::new(&config.issuers, &config.freshness)
                .context("building the introspection client")?,
        );
    }
    let checker = Arc::new(Checker {
        validator,
        denylist: denylist.clone(),
        freshness,
        ingest: ingest_state,
        metrics,
    });
    let app = api::router(AppState {
        checker,
        max_body_bytes: config.http.max_body_bytes,
    });
    let sizes = denylist.sizes();
    info!(
        listen = %listener.describe(),
        brokers = %config.kafka.brokers,
        topics = ?config.kafka.topics.iter().map(|t| format!("{}({})", t.name, t.format.as_str())).collect::<Vec<_>>(),
        issuers = ?config.issuers.iter().map(|i| i.issuer.as_str()).collect::<Vec<_>>(),
        store = %config.store.path.display(),
        denylist_entries = sizes.total(),
        "revsync started"
    );

    let grace = config.http.shutdown_grace;
    let stop = shutdown.clone();
    let serve = async move {
        match listener {
            Listener::Tcp(l) => {
                axum::serve(l, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            }
            Listener::Unix(l, _) => {
                axum::serve(l, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            }
        }
    };
    let server = tokio::spawn(serve);
    shutdown.cancelled().await;
    info!(grace = ?grace, "shutting down: draining requests");
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => error!(error = %e, "server error"),
        Ok(Err(e)) => error!(error = %e, "server task failed"),
        Err(_) => warn!("in-flight requests did not finish within the grace period"),
    }
    if let Some((receiver, task)) = ssf {
        match tokio::time::timeout(grace, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => error!(error = %e, "SSF receiver error"),
            Ok(Err(e)) => error!(error = %e, "SSF receiver task failed"),
            Err(_) => warn!("pushed SETs did not finish within the grace period"),
        }
        tokio::task::spawn_blocking(move || receiver.shutdown())
            .await
            .ok();
    }
    background.cancel();
    let _ = gc.await;
    ingest_stop.cancel();
    tokio::task::spawn_blocking(move || ingest.join())
        .await
        .ok();
    let flushed = tokio::task::spawn_blocking(move || denylist.flush())
        .await
        .context("flush task")?;
    flushed.context("final store flush")?;
    info!("stopped");
    Ok(())
}

/// Drops entries that can no longer matter (invariant 4), every `interval`.
pub async fn gc_loop(
    denylist: Arc<Denylist>,
    metrics: Arc<Metrics>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let d = denylist.clone();
        let m = metrics.clone();
        // GC walks sled and writes: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || loop {
            let pass = d.gc(crate::unix_now(), GC_BATCH)?;
            for (kind, count) in pass.dropped {
                m.entries_expired
                    .get_or_create(&KindLabels { kind })
                    .inc_by(count);
            }
            if !pass.more {
                return Ok::<_, crate::denylist::StoreError>(());
            }
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                metrics.store_errors.inc();
                error!(error = %e, "denylist GC failed");
            }
            Err(e) => error!(error = %e, "denylist GC task failed"),
        }
    }
}
