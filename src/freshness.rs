//! How stale the denylist may be, and what a check does when it is staler than allowed
//! (invariant 5: a decision is never a guess).
//!
//! The age is measured from the start of the last watermark round that found every
//! partition applied up to its high watermark: every event published before that moment
//! is in the store. Before the first such round the denylist is stale by definition.

use std::sync::Arc;

use serde::Serialize;

use crate::config::{FreshnessConfig, OnStale};
use crate::ingest::IngestState;

#[derive(Clone)]
pub struct Freshness {
    config: FreshnessConfig,
    ingest: Arc<IngestState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FreshnessView {
    /// Milliseconds since the last confirmed catch-up; `None` = never caught up.
    pub age_ms: Option<u64>,
    pub max_staleness_ms: u64,
    pub stale: bool,
    /// The store refuses writes, so revocations may be missing however young `age_ms` is.
    pub store_failing: bool,
}

impl Freshness {
    pub fn new(config: FreshnessConfig, ingest: Arc<IngestState>) -> Self {
        Self { config, ingest }
    }

    pub fn policy(&self) -> OnStale {
        self.config.on_stale
    }

    /// The state at `now_ms` (unix ms).
    pub fn view_at(&self, now_ms: u64) -> FreshnessView {
        let max = self.config.max_staleness.as_millis() as u64;
        let age_ms = self
            .ingest
            .caught_up_at_ms()
            .map(|t| now_ms.saturating_sub(t));
        let store_failing = self.ingest.store_failing();
        FreshnessView {
            age_ms,
            max_staleness_ms: max,
            stale: store_failing || age_ms.is_none_or(|a| a > max),
            store_failing,
        }
    }

    pub fn view(&self) -> FreshnessView {
        self.view_at(crate::unix_now_ms())
    }
}
