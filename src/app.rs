//! Start-up and shutdown of the daemon: open the store, start ingest, load keys, serve
//! the API on an already-bound listener, and on shutdown drain requests, stop the
//! consumer and flush the store, each within a bound.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::response::IntoResponse;
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

    /// Serves `app` until `stop` is cancelled, then lets in-flight requests finish
    /// (the caller bounds how long). Unlike `axum::serve`, a client that trickles its
    /// headers is cut off after `limits.header_read_timeout`, and a request that takes
    /// longer than `limits.request_timeout` (a body sent slowly, say) is answered 408.
    pub async fn serve(
        self,
        app: axum::Router,
        limits: &crate::config::HttpConfig,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let deadline = limits.request_timeout;
        let max_body = limits.max_body_bytes as u64;
        let app = app.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| async move {
                // A declared length over the limit is refused before any byte is read.
                let declared = req
                    .headers()
                    .get(axum::http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if declared.is_some_and(|n| n > max_body) {
                    return axum::http::StatusCode::PAYLOAD_TOO_LARGE.into_response();
                }
                match tokio::time::timeout(deadline, next.run(req)).await {
                    Ok(resp) => resp,
                    Err(_) => axum::http::StatusCode::REQUEST_TIMEOUT.into_response(),
                }
            },
        ));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_headers(128);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = self.accept() => a,
            };
            let io = match accepted {
                Ok(io) => io,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let conn = graceful.watch(http.serve_connection(io, service));
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        // Dropping the listener refuses new connections at once.
        drop(self);
        graceful.shutdown().await;
        Ok(())
    }

    async fn accept(&self) -> std::io::Result<hyper_util::rt::TokioIo<Conn>> {
        Ok(hyper_util::rt::TokioIo::new(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
            Listener::Unix(l, _) => Conn::Unix(l.accept().await?.0),
        }))
    }

    /// Whether only this host can connect: a Unix socket, or a TCP socket bound to a
    /// loopback address.
    pub fn is_local(&self) -> bool {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .is_ok_and(|a| a.ip().to_canonical().is_loopback()),
            Listener::Unix(..) => true,
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

/// An accepted connection of either listener kind.
pub enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Read before anything starts: a credential file that cannot be read stops start-up.
    let credential = config
        .http
        .credential()
        .context("the check API credential")?;
    // `Config::validate` refuses a non-loopback `http.listen` without a credential; this
    // holds the socket actually bound to the same rule (a host name that resolved
    // elsewhere, a config built in code).
    if credential.is_none() && !listener.is_local() {
        anyhow::bail!(
            "http.listen = {} is not a loopback address: set http.credential or http.credential_file (clients send it in {})",
            listener.describe(),
            crate::config::CREDENTIAL_HEADER
        );
    }
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

    let http = crate::token::http_client().context("building the HTTP client")?;
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
            let limits = crate::config::HttpConfig {
                max_body_bytes: ssf_config.max_body_bytes,
                ..config.http.clone()
            };
            let stop = shutdown.clone();
            let task = tokio::spawn(async move { listener.serve(app, &limits, stop).await });
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
        metrics: metrics.clone(),
    });
    let mut app = api::router(AppState {
        checker,
        max_body_bytes: config.http.max_body_bytes,
    });
    if let Some(secret) = &credential {
        app = api::require_credential(app, api::Credential::new(secret), metrics);
    } else if let Listener::Tcp(tcp) = &listener {
        // Loopback without a credential: only this host's names (DNS rebinding).
        let hosts = api::LocalHosts::new(
            tcp.local_addr().ok(),
            &config.http.listen,
            &config.http.allowed_hosts,
        );
        app = api::require_local_host(app, hosts);
    }
    let sizes = denylist.sizes();
    info!(
        listen = %listener.describe(),
        brokers = %config.kafka.brokers,
        topics = ?config.kafka.topics.iter().map(|t| format!("{}({})", t.name, t.format.as_str())).collect::<Vec<_>>(),
        issuers = ?config.issuers.iter().map(|i| i.issuer.as_str()).collect::<Vec<_>>(),
        store = %config.store.path.display(),
        denylist_entries = sizes.total(),
        credential = credential.is_some(),
        "revsync started"
    );

    let grace = config.http.shutdown_grace;
    let stop = shutdown.clone();
    let http_limits = config.http.clone();
    let server = tokio::spawn(async move { listener.serve(app, &http_limits, stop).await });
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
