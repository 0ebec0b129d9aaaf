//! revsync: introspection-grade JWT revocation at local-validation cost.
//!
//! The authorization server publishes revocation events to Kafka; every revsync instance
//! reads all of them into a local sled denylist; the resource server asks revsync over
//! localhost HTTP whether a token is good, and revsync answers from local state.
//!
//! ```text
//!  AS ──events──► Kafka ──[ingest]──► batch + positions ──► [denylist] (sled)
//!                                                                ▲
//!  resource server ──HTTP──► [api] ──► [token] (JWKS, JWT) ──────┘
//!                                └──► [freshness] (how stale may the answer be)
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the typed config: TOML, `REVSYNC_*` overrides, defaults |
//! | [`event`] | the revocation model and the native v1 decoder |
//! | [`formats`] | the other wire formats: RFC 8417 SETs (CAEP, Back-Channel Logout), Keycloak events |
//! | [`denylist`] | the sled store: atomic apply with positions, lookups, expiry |
//! | [`ingest`] | the Kafka reader and watermark watcher threads |
//! | [`token`] | JWKS fetch/refresh, JWT validation, the verified-token cache |
//! | [`freshness`] | how old the denylist is, and whether that is too old |
//! | [`api`] | the axum router; maps decisions to HTTP answers |
//! | [`publish`] | the reference publisher (`revsync publish`) |
//! | [`ssf`] | the RFC 8935 push receiver for SETs (local apply, or bridge to Kafka) |
//! | [`metrics`] | the Prometheus registry |
//! | [`app`] | start-up, GC, graceful shutdown |
//! | [`cli`] | the command line; `main.rs` only calls it |
//! | [`dev`] | `revsync dev`: local broker + demo issuer + daemon |

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod denylist;
pub mod dev;
pub mod event;
pub mod formats;
pub mod freshness;
pub mod ingest;
pub mod metrics;
pub mod publish;
pub mod ssf;
pub mod token;

use tokio_util::sync::CancellationToken;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// Milliseconds on a monotonic clock that reads the wall clock's value when the process
/// started. Freshness ages are measured on it: a wall clock stepped back (NTP, a VM
/// resumed) must not make an old catch-up look recent.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    let (at, unix_ms) = START.get_or_init(|| (std::time::Instant::now(), unix_now_ms()));
    unix_ms + at.elapsed().as_millis() as u64
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Cancels `token` on SIGTERM or SIGINT.
pub async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
    token.cancel();
}
