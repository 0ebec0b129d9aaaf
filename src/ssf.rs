//! The RFC 8935 push receiver: an SSF transmitter POSTs one Security Event Token per
//! request (`Content-Type: application/secevent+jwt`) to the configured path, with
//! `Authorization: Bearer <bearer_secret>`. The SET is verified and mapped exactly as
//! on a `set` topic ([`crate::formats::set`]), then either applied to this instance's
//! denylist or, in bridge mode, republished to Kafka as a native v1 event so that every
//! revsync reading that topic gets it.
//!
//! Answers (RFC 8935 §2.2–2.4):
//! - `202 Accepted`: verified, and applied and flushed to disk (or acknowledged by the
//!   broker in bridge mode), or well formed but revoking nothing. A transmitter never
//!   sends again what got a 202, so nothing is acknowledged before it is durable;
//! - `400` with `{"err", "description"}` when the SET cannot be parsed, validated or
//!   authenticated: `invalid_request` (not a SET, wrong `typ`, missing `events`, `nonce` in
//!   a logout token, unmappable subject, wrong media type), `invalid_key` (unknown signing
//!   key), `invalid_issuer`, `invalid_audience`, `authentication_failed` (unsigned or bad
//!   signature: the transmitter is not authenticated by the SET);
//! - `401` with `WWW-Authenticate: Bearer` when the bearer secret is missing or wrong: an
//!   HTTP authentication failure is a "general HTTP error condition", answered with its
//!   own status code (§2.3, RFC 6750 §3); the body still carries
//!   `{"err": "authentication_failed"}`;
//! - `503` with `Retry-After` when the SET cannot be decided now (the issuer's keys are
//!   unavailable) or the store or broker refused it: the transmitter retries, nothing is
//!   lost. Applying is idempotent, so a retried SET is harmless.
//!
//! Tokens and the bearer secret are never logged (invariant 6); `iss` and `jti` are.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use tracing::{debug, error, info, warn};

use crate::config::{KafkaConfig, SsfConfig};
use crate::denylist::Denylist;
use crate::event::Event;
use crate::formats::{set, FormatError};
use crate::metrics::{Metrics, TopicLabels};
use crate::publish::{PublishError, Publisher};
use crate::token::TokenValidator;

/// The `topic` label of the receiver's metrics.
pub const METRICS_TOPIC: &str = "ssf";
/// The media type of a SET transmission (RFC 8417 §2.3, RFC 8935 §2).
pub const SET_MEDIA_TYPE: &str = "application/secevent+jwt";
/// How long a bridged event may wait for the broker's acknowledgement.
const BRIDGE_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Most events published together before one wait for acknowledgements.
const BRIDGE_BATCH: usize = 512;
/// `Retry-After` of a 503, in seconds.
const RETRY_AFTER_SECS: &str = "5";

/// Where verified events go.
pub enum Sink {
    /// This instance's denylist.
    Local(Arc<Denylist>),
    /// A Kafka topic, as native v1 events.
    Bridge(Bridge),
}

/// The receiver's state, shared by its handlers.
pub struct Receiver {
    validator: Arc<TokenValidator>,
    secret_digest: [u8; 32],
    audience: Option<String>,
    issuer: Option<String>,
    sink: Sink,
    metrics: Arc<Metrics>,
}

impl Receiver {
    pub fn new(
        validator: Arc<TokenValidator>,
        config: &SsfConfig,
        sink: Sink,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            validator,
            secret_digest: digest(&config.bearer_secret),
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            sink,
            metrics,
        }
    }

    /// Stops the bridge (if any) after every queued event was answered.
    pub fn shutdown(&self) {
        if let Sink::Bridge(bridge) = &self.sink {
            bridge.shutdown();
        }
    }

    fn labels(&self) -> TopicLabels {
        TopicLabels {
            topic: METRICS_TOPIC.to_string(),
            format: "set",
        }
    }

    /// Constant time in the secret: both sides are hashed first, so neither the content
    /// nor the length of the secret leaks through timing.
    fn authorized(&self, headers: &HeaderMap) -> Result<(), Unauthorized> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(Unauthorized::Missing);
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .unwrap_or("");
        let ok = aws_lc_rs::constant_time::verify_slices_are_equal(
            &digest(presented),
            &self.secret_digest,
        )
        .is_ok();
        if ok && !presented.is_empty() {
            Ok(())
        } else {
            Err(Unauthorized::Invalid)
        }
    }
}

/// Why a request was not authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unauthorized {
    Missing,
    Invalid,
}

fn digest(secret: &str) -> [u8; 32] {
    crate::token::token_hash(secret)
}

/// The receiver's routes: `POST path`, bodies up to `max_body_bytes`.
pub fn router(receiver: Arc<Receiver>, path: &str, max_body_bytes: usize) -> Router {
    Router::new()
        .route(path, post(receive))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(receiver)
}

fn error_body(status: StatusCode, err: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"err": err, "description": description})),
    )
        .into_response()
}

fn unauthorized(why: Unauthorized) -> Response {
    let (challenge, description) = match why {
        Unauthorized::Missing => (r#"Bearer realm="revsync-ssf""#, "missing bearer token"),
        Unauthorized::Invalid => (
            r#"Bearer realm="revsync-ssf", error="invalid_token""#,
            "invalid bearer token",
        ),
    };
    let mut resp = error_body(
        StatusCode::UNAUTHORIZED,
        "authentication_failed",
        description,
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    resp
}

fn unavailable(description: &str) -> Response {
    let mut resp = error_body(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        description,
    );
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    resp
}

/// The RFC 8935 error code of a malformed-SET reason.
pub fn error_code(reason: &str) -> &'static str {
    match reason {
        "unknown_key" => "invalid_key",
        "wrong_issuer" => "invalid_issuer",
        "wrong_audience" => "invalid_audience",
        "unsigned" | "bad_signature" => "authentication_failed",
        _ => "invalid_request",
    }
}

fn is_set_media_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .is_some_and(|m| m.eq_ignore_ascii_case(SET_MEDIA_TYPE))
}

async fn receive(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(why) = rx.authorized(&headers) {
        return unauthorized(why);
    }
    if !is_set_media_type(&headers) {
        rx.metrics
            .malformed(METRICS_TOPIC, "set", "wrong_media_type");
        return error_body(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Content-Type must be application/secevent+jwt",
        );
    }
    let seen_at_ms = crate::unix_now_ms();
    let mut ignored = crate::event::Ignored::new();
    let decoded = match set::token_text(&body) {
        Ok(token) => {
            set::decode_noting(
                &rx.validator,
                token,
                rx.audience.as_deref(),
                rx.issuer.as_deref(),
                seen_at_ms,
                &mut ignored,
            )
            .await
        }
        Err(e) => Err(e),
    };
    if decoded.is_ok() {
        rx.metrics.fields_ignored(METRICS_TOPIC, "set", &ignored);
    }
    let event = match decoded {
        Ok(Some(event)) => event,
        Ok(None) => {
            debug!("pushed SET revokes nothing; accepted and ignored");
            rx.metrics.events_ignored.get_or_create(&rx.labels()).inc();
            return StatusCode::ACCEPTED.into_response();
        }
        Err(FormatError::Unverifiable(why)) => {
            warn!(%why, "pushed SET cannot be verified now; asking the transmitter to retry");
            return unavailable("the SET cannot be verified now; retry later");
        }
        Err(e) => {
            let reason = e.reason();
            warn!(reason, error = %e, "pushed SET refused");
            rx.metrics.malformed(METRICS_TOPIC, "set", reason);
            return error_body(StatusCode::BAD_REQUEST, error_code(reason), &e.to_string());
        }
    };
    let (iss, jti, kind) = (
        event.revocation.iss().to_string(),
        event.id.clone(),
        event.revocation.kind(),
    );
    let stored = match &rx.sink {
        Sink::Local(denylist) => {
            let denylist = denylist.clone();
            tokio::task::spawn_blocking(move || {
                denylist
                    .apply(std::slice::from_ref(&event), &[], crate::unix_now())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
        }
        Sink::Bridge(bridge) => bridge.publish(event).await,
    };
    match stored {
        Ok(()) => {
            info!(%iss, %jti, kind, bridged = matches!(rx.sink, Sink::Bridge(_)), "pushed SET applied");
            rx.metrics.events_applied.get_or_create(&rx.labels()).inc();
            StatusCode::ACCEPTED.into_response()
        }
        Err(e) => {
            if matches!(rx.sink, Sink::Local(_)) {
                rx.metrics.store_errors.inc();
            }
            error!(%iss, %jti, error = %e, "pushed SET could not be stored; asking the transmitter to retry");
            unavailable("the event could not be stored; retry later")
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bridge

type Job = (Event, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Publishes bridged events from one plain thread (librdkafka's flush blocks): events
/// that arrive together are sent together, then one flush waits for the broker's
/// acknowledgements, and each request is answered only then, so a 202 means the event is
/// in Kafka.
pub struct Bridge {
    tx: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Bridge {
    /// A bridge to `topic` on the brokers of `kafka`.
    pub fn start(kafka: &KafkaConfig, topic: &str) -> Result<Self, PublishError> {
        let publisher = Publisher::new(kafka, topic)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("revsync-ssf-bridge".into())
            .spawn(move || bridge_loop(publisher, rx))
            .expect("spawn bridge thread");
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Publishes `event` and waits for the broker's acknowledgement.
    pub async fn publish(&self, event: Event) -> Result<(), String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        {
            let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            let Some(tx) = tx.as_ref() else {
                return Err("bridge stopped".into());
            };
            tx.send((event, reply))
                .map_err(|_| "bridge stopped".to_string())?;
        }
        match tokio::time::timeout(BRIDGE_ACK_TIMEOUT * 2, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("bridge stopped".into()),
            Err(_) => Err("no acknowledgement from the broker in time".into()),
        }
    }

    /// Stops accepting events and waits for the thread to answer the queued ones.
    pub fn shutdown(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn bridge_loop(publisher: Publisher, rx: std::sync::mpsc::Receiver<Job>) {
    // `finish` reports the total of undelivered records since the producer started;
    // an increase over what was already seen is this group's failure.
    let mut failures_seen = 0u64;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < BRIDGE_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut waiting = Vec::with_capacity(jobs.len());
        for (event, reply) in jobs {
            match publisher.send(&event) {
                Ok(()) => waiting.push(reply),
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
        let result = match publisher.finish(BRIDGE_ACK_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(PublishError::Undelivered(total)) if total <= failures_seen => Ok(()),
            Err(PublishError::Undelivered(total)) => {
                failures_seen = total;
                Err("the broker did not acknowledge the event".to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        for reply in waiting {
            let _ = reply.send(result.clone());
        }
    }
    debug!("ssf bridge stopping");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_follow_rfc_8935() {
        assert_eq!(error_code("unknown_key"), "invalid_key");
        assert_eq!(error_code("wrong_issuer"), "invalid_issuer");
        assert_eq!(error_code("wrong_audience"), "invalid_audience");
        assert_eq!(error_code("bad_signature"), "authentication_failed");
        assert_eq!(error_code("unsigned"), "authentication_failed");
        for other in [
            "wrong_typ",
            "missing_events",
            "nonce_present",
            "malformed_jws",
            "unsupported_subject",
        ] {
            assert_eq!(error_code(other), "invalid_request", "{other}");
        }
    }

    #[test]
    fn media_type_allows_parameters_and_any_case() {
        let mut h = HeaderMap::new();
        assert!(!is_set_media_type(&h));
        for ok in [
            "application/secevent+jwt",
            "Application/SecEvent+JWT",
            "application/secevent+jwt; charset=utf-8",
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ok).unwrap());
            assert!(is_set_media_type(&h), "{ok}");
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/jwt"),
        );
        assert!(!is_set_media_type(&h));
    }
}
