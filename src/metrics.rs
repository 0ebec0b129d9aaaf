//! Prometheus metrics, one registry per process (or per test). Labels never carry a
//! token, `sub` or `jti` (invariant 6): only topics, partitions, issuers, formats,
//! routes and the stable reason words.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
    pub format: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MalformedLabels {
    pub topic: String,
    pub format: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IgnoredFieldLabels {
    pub topic: String,
    pub format: &'static str,
    /// The field as named on the wire (`reason`, `exp`, `details.token_id` …).
    pub field: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub route: &'static str,
    pub outcome: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

fn latency_histogram() -> Histogram {
    // 5 µs … ~5 s: the check path lives in microseconds, introspection in milliseconds.
    Histogram::new(exponential_buckets(5e-6, 2.0, 20))
}

fn delay_histogram() -> Histogram {
    // 1 ms … ~65 s: publish → applied delay.
    Histogram::new(exponential_buckets(1e-3, 2.0, 17))
}

/// The routes that record checks, in the order of [`CheckChildren`].
const CHECK_ROUTES: [&str; 3] = ["check", "introspect", "authz"];

/// Every (outcome, reason) a check records, in the order of [`CheckChildren`].
const CHECK_OUTCOMES: [(&str, &str); 14] = [
    ("active", "none"),
    ("active", "stale"),
    ("inactive", "expired"),
    ("inactive", "not_yet_valid"),
    ("inactive", "bad_signature"),
    ("inactive", "unknown_key"),
    ("inactive", "wrong_issuer"),
    ("inactive", "wrong_audience"),
    ("inactive", "wrong_type"),
    ("inactive", "malformed"),
    ("inactive", "lifetime_exceeded"),
    ("inactive", "revoked"),
    ("undecided", "unknown_key"),
    ("undecided", "stale"),
];

/// Children of `checks` and `check_latency`, each resolved (hashed and looked up) once,
/// on first use: a label set still appears in the exposition only once it was recorded.
struct CheckChildren {
    counts: [[OnceLock<Counter>; CHECK_OUTCOMES.len()]; CHECK_ROUTES.len()],
    latency: [OnceLock<Histogram>; CHECK_ROUTES.len()],
}

impl Default for CheckChildren {
    fn default() -> Self {
        CheckChildren {
            counts: [const { [const { OnceLock::new() }; CHECK_OUTCOMES.len()] };
                CHECK_ROUTES.len()],
            latency: [const { OnceLock::new() }; CHECK_ROUTES.len()],
        }
    }
}

pub struct Metrics {
    registry: Registry,
    check_children: CheckChildren,
    pub events_applied: Family<TopicLabels, Counter>,
    pub events_malformed: Family<MalformedLabels, Counter>,
    pub events_ignored: Family<TopicLabels, Counter>,
    /// Unusable optional fields of decoded events, ignored as if absent.
    pub event_fields_ignored: Family<IgnoredFieldLabels, Counter>,
    pub batches_applied: Counter,
    pub lag: Family<PartitionLabels, Gauge>,
    pub position: Family<PartitionLabels, Gauge>,
    pub offset_resets: Family<PartitionLabels, Counter>,
    /// Logs found reset or truncated under a stored position (see `ingest`).
    pub log_resets: Family<PartitionLabels, Counter>,
    /// Offsets the broker skipped inside the log (compaction, transaction markers).
    pub skipped_offsets: Family<PartitionLabels, Counter>,
    pub seconds_since_caught_up: Gauge<f64, AtomicU64>,
    pub propagation_delay: Histogram,
    pub denylist_entries: Family<KindLabels, Gauge>,
    pub entries_expired: Family<KindLabels, Counter>,
    pub store_errors: Counter,
    /// 1 while the store refuses writes (ingest stopped, not vouching), else 0.
    pub store_failing: Gauge,
    pub store_reopens: Counter,
    pub checks: Family<CheckLabels, Counter>,
    pub check_latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub jwks_fetches: Family<IssuerLabels, Counter>,
    pub jwks_failures: Family<IssuerLabels, Counter>,
    pub introspections: Family<CheckLabels, Counter>,
    /// Requests refused for a missing or wrong `http.credential` (a plain counter: it is
    /// exposed at 0 from the start).
    pub http_unauthorized: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("revsync");
        let m = Self {
            events_applied: Family::default(),
            events_malformed: Family::default(),
            events_ignored: Family::default(),
            event_fields_ignored: Family::default(),
            batches_applied: Counter::default(),
            lag: Family::default(),
            position: Family::default(),
            offset_resets: Family::default(),
            log_resets: Family::default(),
            skipped_offsets: Family::default(),
            seconds_since_caught_up: Gauge::default(),
            propagation_delay: delay_histogram(),
            denylist_entries: Family::default(),
            entries_expired: Family::default(),
            store_errors: Counter::default(),
            store_failing: Gauge::default(),
            store_reopens: Counter::default(),
            checks: Family::default(),
            check_latency: Family::new_with_constructor(latency_histogram),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            jwks_fetches: Family::default(),
            jwks_failures: Family::default(),
            introspections: Family::default(),
            http_unauthorized: Counter::default(),
            check_children: CheckChildren::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_applied",
            "Revocation events applied to the denylist",
            m.events_applied.clone(),
        );
        registry.register(
            "events_malformed",
            "Records skipped because they could not be decoded",
            m.events_malformed.clone(),
        );
        registry.register(
            "events_ignored",
            "Well-formed records that revoke nothing (e.g. unmapped Keycloak events)",
            m.events_ignored.clone(),
        );
        registry.register(
            "event_fields_ignored",
            "Unusable optional fields of decoded events, ignored as if absent (the revocation still applies)",
            m.event_fields_ignored.clone(),
        );
        registry.register(
            "batches_applied",
            "Atomic store writes made by the consumer",
            m.batches_applied.clone(),
        );
        registry.register(
            "partition_lag",
            "High watermark minus applied position, per partition",
            m.lag.clone(),
        );
        registry.register(
            "partition_position",
            "Next offset to read, per partition (as stored)",
            m.position.clone(),
        );
        registry.register(
            "offset_resets",
            "Times a stored position was out of the log's range and reading restarted at the earliest offset",
            m.offset_resets.clone(),
        );
        registry.register(
            "ingest_log_resets",
            "Times a partition's log was found reset or truncated under the stored position (broker lost its log, topic recreated, retention deleted unread records); reading restarted at the log start",
            m.log_resets.clone(),
        );
        registry.register(
            "ingest_skipped_offsets",
            "Offsets inside the log that the broker never delivered: normal for compacted topics and transaction markers; on a plain topic written without transactions, records the broker lost",
            m.skipped_offsets.clone(),
        );
        registry.register(
            "seconds_since_caught_up",
            "Age of the last confirmation that every partition was read up to its high watermark",
            m.seconds_since_caught_up.clone(),
        );
        registry.register(
            "propagation_delay_seconds",
            "Applied time minus the event's event_time",
            m.propagation_delay.clone(),
        );
        registry.register(
            "denylist_entries",
            "Live denylist entries by kind",
            m.denylist_entries.clone(),
        );
        registry.register(
            "denylist_expired",
            "Entries dropped because they can no longer affect a valid token",
            m.entries_expired.clone(),
        );
        registry.register(
            "store_errors",
            "Failed denylist reads or writes",
            m.store_errors.clone(),
        );
        registry.register(
            "store_failing",
            "1 while the store refuses writes: ingest is stopped and checks are not vouched for",
            m.store_failing.clone(),
        );
        registry.register(
            "store_reopens",
            "Times the store was reopened after a failed write",
            m.store_reopens.clone(),
        );
        registry.register(
            "checks",
            "Token checks by route, outcome and reason",
            m.checks.clone(),
        );
        registry.register(
            "check_duration_seconds",
            "Time to answer a check, by route",
            m.check_latency.clone(),
        );
        registry.register(
            "verified_cache_hits",
            "Checks that skipped signature verification",
            m.cache_hits.clone(),
        );
        registry.register(
            "verified_cache_misses",
            "Checks that verified a signature",
            m.cache_misses.clone(),
        );
        registry.register(
            "jwks_fetches",
            "JWKS fetches per issuer",
            m.jwks_fetches.clone(),
        );
        registry.register(
            "jwks_fetch_failures",
            "Failed JWKS fetches per issuer",
            m.jwks_failures.clone(),
        );
        registry.register(
            "introspections",
            "RFC 7662 introspection calls made under the stale policy",
            m.introspections.clone(),
        );
        registry.register(
            "http_unauthorized",
            "Check API requests refused for a missing or wrong credential (http.credential)",
            m.http_unauthorized.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts one answered check (`checks`) and observes its duration (`check_latency`),
    /// without hashing labels once each label set has been used.
    pub fn record_check(
        &self,
        route: &'static str,
        outcome: &'static str,
        reason: &'static str,
        seconds: f64,
    ) {
        let labels = || CheckLabels {
            route,
            outcome,
            reason,
        };
        let route_index = CHECK_ROUTES.iter().position(|r| *r == route);
        let outcome_index = CHECK_OUTCOMES
            .iter()
            .position(|(o, r)| *o == outcome && *r == reason);
        let children = &self.check_children;
        match (route_index, outcome_index) {
            (Some(r), Some(o)) => children.counts[r][o]
                .get_or_init(|| self.checks.get_or_create_owned(&labels()))
                .inc(),
            _ => self.checks.get_or_create(&labels()).inc(),
        };
        match route_index {
            Some(r) => children.latency[r]
                .get_or_init(|| {
                    self.check_latency
                        .get_or_create_owned(&RouteLabels { route })
                })
                .observe(seconds),
            None => self
                .check_latency
                .get_or_create(&RouteLabels { route })
                .observe(seconds),
        }
    }

    /// Whether [`Self::record_check`] keeps a resolved child for these labels.
    #[cfg(test)]
    pub(crate) fn check_labels_preresolved(route: &str, outcome: &str, reason: &str) -> bool {
        CHECK_ROUTES.contains(&route) && CHECK_OUTCOMES.contains(&(outcome, reason))
    }

    /// Counts each of `fields`: optional fields of one event from `topic` that were
    /// unusable and ignored.
    pub fn fields_ignored(&self, topic: &str, format: &'static str, fields: &[&'static str]) {
        for field in fields {
            self.event_fields_ignored
                .get_or_create(&IgnoredFieldLabels {
                    topic: topic.to_string(),
                    format,
                    field,
                })
                .inc();
        }
    }

    pub fn malformed(&self, topic: &str, format: &'static str, reason: &'static str) {
        self.events_malformed
            .get_or_create(&MalformedLabels {
                topic: topic.to_string(),
                format,
                reason,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_are_prefixed_and_labelled() {
        let m = Metrics::new();
        m.malformed("revocations", "native", "missing_field");
        m.fields_ignored("revocations", "native", &["reason", "exp"]);
        m.checks
            .get_or_create(&CheckLabels {
                route: "check",
                outcome: "inactive",
                reason: "revoked",
            })
            .inc();
        let text = m.encode();
        assert!(text.contains(
            "revsync_events_malformed_total{topic=\"revocations\",format=\"native\",reason=\"missing_field\"} 1"
        ));
        assert!(text.contains(
            "revsync_checks_total{route=\"check\",outcome=\"inactive\",reason=\"revoked\"} 1"
        ));
        assert!(text.contains(
            "revsync_event_fields_ignored_total{topic=\"revocations\",format=\"native\",field=\"exp\"} 1"
        ));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn recorded_checks_reach_the_families() {
        let m = Metrics::new();
        assert!(
            !m.encode().contains("revsync_checks_total{"),
            "nothing before use"
        );
        for _ in 0..3 {
            m.record_check("check", "inactive", "revoked", 1e-5);
        }
        m.record_check("authz", "active", "none", 2e-5);
        // Labels outside the resolved table still count.
        m.record_check("other", "inactive", "revoked", 1e-5);
        m.record_check("check", "inactive", "new_reason", 1e-5);
        let text = m.encode();
        for line in [
            "revsync_checks_total{route=\"check\",outcome=\"inactive\",reason=\"revoked\"} 3",
            "revsync_checks_total{route=\"authz\",outcome=\"active\",reason=\"none\"} 1",
            "revsync_checks_total{route=\"other\",outcome=\"inactive\",reason=\"revoked\"} 1",
            "revsync_checks_total{route=\"check\",outcome=\"inactive\",reason=\"new_reason\"} 1",
            "revsync_check_duration_seconds_count{route=\"check\"} 4",
            "revsync_check_duration_seconds_count{route=\"authz\"} 1",
            "revsync_check_duration_seconds_count{route=\"other\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains("route=\"introspect\""),
            "unused label sets stay absent"
        );
    }
}
