//! How stale the denylist may be, and what a check does when it is staler than allowed
//! (invariant 5: a decision is never a guess).
//!
//! The age is measured from the start of the last watermark round that found every
//! partition applied up to its high watermark: every event published before that moment
//! is in the store. Before the first such round the denylist is stale by definition.
//!
//! While a partition is read again after its log was reset or truncated under the
//! stored position (see `ingest`), the denylist is stale too, however young the last
//! catch-up: revocations published to the new log may not be applied yet. It is fresh
//! again once a watermark round begun after the reset was found is reached.

use std::sync::Arc;

use serde::Serialize;

use crate::config::{FreshnessConfig, OnStale};
use crate::ingest::IngestState;

#[derive(Clone)]
pub struct Freshness {
    config: FreshnessConfig,
    ingest: Arc<IngestState>,
    introspector: Option<Arc<Introspector>>,
    /// Issuers whose heartbeats must be fresh, when `heartbeat_max_age` is set.
    heartbeat_issuers: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FreshnessView {
    /// Milliseconds since the last confirmed catch-up; `None` = never caught up.
    pub age_ms: Option<u64>,
    pub max_staleness_ms: u64,
    pub stale: bool,
    /// The store refuses writes, so revocations may be missing however young `age_ms` is.
    pub store_failing: bool,
    /// `heartbeat_max_age` is set and some issuer's newest heartbeat is older (or none
    /// was seen): its publisher may be down, so the denylist may be missing revocations.
    pub heartbeat_missing: bool,
}

impl Freshness {
    pub fn new(config: FreshnessConfig, ingest: Arc<IngestState>) -> Self {
        Self {
            config,
            ingest,
            introspector: None,
            heartbeat_issuers: Vec::new(),
        }
    }

    /// Requires a heartbeat from each of `issuers` within `heartbeat_max_age` (if set).
    pub fn with_heartbeats(mut self, issuers: Vec<String>) -> Self {
        self.heartbeat_issuers = issuers;
        self
    }

    /// Adds the RFC 7662 client the `introspect` policy asks.
    pub fn with_introspector(mut self, introspector: Introspector) -> Self {
        self.introspector = Some(Arc::new(introspector));
        self
    }

    /// The RFC 7662 client, when the policy is `introspect` and one was configured.
    pub fn introspector(&self) -> Option<&Introspector> {
        match self.config.on_stale {
            OnStale::Introspect => self.introspector.as_deref(),
            _ => None,
        }
    }

    pub fn policy(&self) -> OnStale {
        self.config.on_stale
    }

    /// The state at `now_ms` ([`crate::monotonic_ms`]).
    pub fn view_at(&self, now_ms: u64) -> FreshnessView {
        let max = self.config.max_staleness.as_millis() as u64;
        let age_ms = self
            .ingest
            .caught_up_at_ms()
            .map(|t| now_ms.saturating_sub(t));
        let store_failing = self.ingest.store_failing();
        let heartbeat_missing = self.config.heartbeat_max_age.is_some_and(|limit| {
            let limit = limit.as_millis() as u64;
            self.heartbeat_issuers.iter().any(|iss| {
                self.ingest
                    .last_heartbeat_ms(iss)
                    .is_none_or(|t| now_ms.saturating_sub(t) > limit)
            })
        });
        // A partition read again after a log reset: its new revocations may be missing.
        let recovering = self.ingest.recovering();
        FreshnessView {
            age_ms,
            max_staleness_ms: max,
            stale: store_failing
                || heartbeat_missing
                || recovering
                || age_ms.is_none_or(|a| a > max),
            store_failing,
            heartbeat_missing,
        }
    }

    pub fn view(&self) -> FreshnessView {
        self.view_at(crate::monotonic_ms())
    }
}

/// Largest introspection answer read. An RFC 7662 answer is a handful of claims; a
/// bigger one (a broken or hostile endpoint) is a failed call, not memory held per check.
pub const MAX_INTROSPECTION_BYTES: usize = 64 * 1024;

/// The body of `resp`, refused once it exceeds `limit` bytes (declared or received).
async fn read_bounded(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, IntrospectError> {
    let too_large = || IntrospectError::Request(format!("answer larger than {limit} bytes"));
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| IntrospectError::Request(e.without_url().to_string()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// RFC 7662 client used under `on_stale = "introspect"`: asks the token's issuer whether
/// a locally valid token is still active while the denylist cannot vouch for it.
pub struct Introspector {
    http: reqwest::Client,
    endpoints: std::collections::HashMap<String, crate::config::IntrospectionConfig>,
    /// Answers by token hash; lives no longer than `max_staleness` so a cached
    /// "active" can never hide a revocation for longer than the bound the operator set.
    cache: moka::sync::Cache<[u8; 32], bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    #[error("no introspection endpoint configured for this issuer")]
    NotConfigured,
    #[error("introspection request failed: {0}")]
    Request(String),
    #[error("introspection endpoint answered HTTP {0}")]
    Status(u16),
    #[error("introspection answer is not RFC 7662 JSON")]
    BadAnswer,
}

impl Introspector {
    pub fn new(
        issuers: &[crate::config::IssuerConfig],
        freshness: &FreshnessConfig,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(freshness.introspection_timeout)
            // A redirect would re-send the token (307/308 keep the form body) to wherever
            // the endpoint points; only the configured endpoint is asked.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let ttl = freshness
            .introspection_cache_ttl
            .min(freshness.max_staleness)
            .max(std::time::Duration::from_millis(1));
        Ok(Self {
            http,
            endpoints: issuers
                .iter()
                .filter_map(|i| Some((i.issuer.clone(), i.introspection.clone()?)))
                .collect(),
            cache: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ttl)
                .build(),
        })
    }

    /// Whether the issuer says `token` is active.
    pub async fn is_active(&self, iss: &str, token: &str) -> Result<bool, IntrospectError> {
        let key = crate::token::token_hash(token);
        if let Some(active) = self.cache.get(&key) {
            return Ok(active);
        }
        let cfg = self
            .endpoints
            .get(iss)
            .ok_or(IntrospectError::NotConfigured)?;
        let resp = self
            .http
            .post(&cfg.endpoint)
            .basic_auth(&cfg.client_id, Some(&cfg.client_secret))
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await
            // reqwest errors may carry the URL, never the form body: safe to show.
            .map_err(|e| IntrospectError::Request(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(IntrospectError::Status(resp.status().as_u16()));
        }
        let body = read_bounded(resp, MAX_INTROSPECTION_BYTES).await?;
        let body: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| IntrospectError::BadAnswer)?;
        let active = body
            .get("active")
            .and_then(|v| v.as_bool())
            .ok_or(IntrospectError::BadAnswer)?;
        self.cache.insert(key, active);
        Ok(active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_read_again_after_a_log_reset_makes_the_denylist_stale() {
        let ingest = IngestState::new();
        let f = Freshness::new(FreshnessConfig::default(), ingest.clone());
        ingest.record_caught_up(1_000);
        assert!(!f.view_at(2_000).stale);
        ingest.begin_recovery(&("t".to_string(), 0), 1_500);
        let view = f.view_at(2_000);
        assert!(view.stale, "{view:?}");
        assert_eq!(view.age_ms, Some(1_000), "the age alone would vouch");
    }
}
