//! The localhost HTTP API (DESIGN.md, "HTTP API"). Handlers only extract the token and
//! shape answers; the decision itself is [`Checker::decide`], and every mapping from a
//! decision to a status code lives in this file.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::config::OnStale;
use crate::denylist::{Denylist, TokenRef};
use crate::freshness::{Freshness, FreshnessView};
use crate::ingest::{IngestState, PartitionStatus};
use crate::metrics::{CheckLabels, Metrics, RouteLabels};
use crate::token::{Rejection, TokenValidator, VerifiedToken};

/// Everything the handlers need, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub checker: Arc<Checker>,
    pub max_body_bytes: usize,
}

/// The decision procedure shared by every route: validate, mind freshness, consult the
/// denylist.
pub struct Checker {
    pub validator: Arc<TokenValidator>,
    pub denylist: Arc<Denylist>,
    pub freshness: Freshness,
    pub ingest: Arc<IngestState>,
    pub metrics: Arc<Metrics>,
}

/// The outcome of a check.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Valid and not revoked. `stale`: the denylist is older than allowed and the policy
    /// said to answer from local state anyway.
    Active {
        token: Arc<VerifiedToken>,
        stale: bool,
    },
    /// Not valid, or revoked: `reason` is one of the stable words.
    Inactive { reason: &'static str },
    /// revsync cannot vouch for an answer (stale denylist under `deny`, store failure,
    /// keys never loaded); the reason word says which.
    Undecided { reason: &'static str },
}

impl Decision {
    fn outcome(&self) -> (&'static str, &'static str) {
        match self {
            Decision::Active { stale: false, .. } => ("active", "none"),
            Decision::Active { stale: true, .. } => ("active", "stale"),
            Decision::Inactive { reason } => ("inactive", reason),
            Decision::Undecided { reason } => ("undecided", reason),
        }
    }
}

impl Checker {
    pub async fn decide(&self, token: Option<&str>) -> Decision {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Decision::Inactive {
                reason: "malformed",
            };
        };
        let verified = match self.validator.validate(token).await {
            Ok(v) => v,
            Err(Rejection::KeysUnavailable) => {
                return Decision::Undecided {
                    reason: Rejection::KeysUnavailable.reason(),
                }
            }
            Err(r) => return Decision::Inactive { reason: r.reason() },
        };
        let r = TokenRef {
            iss: &verified.iss,
            jti: verified.jti.as_deref(),
            sub: verified.sub.as_deref(),
            sid: verified.sid.as_deref(),
            client_id: verified.client_id.as_deref(),
            iat: verified.iat,
        };
        // A revocation found is definitive however stale the store is: revocations only
        // ever add. Staleness only matters for a token the denylist does not cover.
        match self.denylist.revoked_by(&r) {
            Ok(None) => {}
            Ok(Some(by)) => {
                tracing::debug!(iss = %verified.iss, jti = ?verified.jti, revoked_by = by, "revoked token presented");
                return Decision::Inactive { reason: "revoked" };
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "denylist read failed");
                return Decision::Undecided { reason: "stale" };
            }
        }
        if !self.freshness.view().stale {
            return Decision::Active {
                token: verified,
                stale: false,
            };
        }
        match self.freshness.policy() {
            OnStale::Allow => Decision::Active {
                token: verified,
                stale: true,
            },
            OnStale::Deny => Decision::Undecided { reason: "stale" },
            OnStale::Introspect => self.introspect(token, verified).await,
        }
    }

    /// The `introspect` policy: the issuer decides; any failure falls back to `deny`.
    async fn introspect(&self, token: &str, verified: Arc<VerifiedToken>) -> Decision {
        let Some(introspector) = self.freshness.introspector() else {
            return Decision::Undecided { reason: "stale" };
        };
        let (decision, outcome, reason) = match introspector.is_active(&verified.iss, token).await {
            Ok(true) => (
                Decision::Active {
                    token: verified,
                    stale: false,
                },
                "active",
                "none",
            ),
            Ok(false) => (
                Decision::Inactive { reason: "revoked" },
                "inactive",
                "revoked",
            ),
            Err(e) => {
                tracing::warn!(iss = %verified.iss, error = %e, "introspection failed; denying");
                (Decision::Undecided { reason: "stale" }, "error", "stale")
            }
        };
        self.metrics
            .introspections
            .get_or_create(&CheckLabels {
                route: "stale_policy",
                outcome,
                reason,
            })
            .inc();
        decision
    }

    fn record(&self, route: &'static str, decision: &Decision, started: Instant) {
        let (outcome, reason) = decision.outcome();
        self.metrics
            .checks
            .get_or_create(&CheckLabels {
                route,
                outcome,
                reason,
            })
            .inc();
        self.metrics
            .check_latency
            .get_or_create(&RouteLabels { route })
            .observe(started.elapsed().as_secs_f64());
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/check", post(check))
        .route("/introspect", post(introspect))
        .route("/v1/authz", any(authz))
        // A proxy that appends the original path (Envoy `path_prefix`) sends `/` as
        // `/v1/authz/`, which `{*rest}` does not match.
        .route("/v1/authz/", any(authz))
        .route("/v1/authz/{*rest}", any(authz))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A 400 in the OAuth error shape. Never echoes the request.
fn invalid_request(description: &'static str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "invalid_request", "error_description": description})),
    )
        .into_response()
}

fn claims_body(token: &VerifiedToken, stale: bool) -> Map<String, Value> {
    let mut body = Map::with_capacity(token.claims.len() + 2);
    body.insert("active".into(), Value::Bool(true));
    for (k, v) in &token.claims {
        if k != "active" {
            body.insert(k.clone(), v.clone());
        }
    }
    if let Some(client_id) = &token.client_id {
        body.entry("client_id")
            .or_insert_with(|| Value::String(client_id.clone()));
    }
    if let Some(scope) = &token.scope {
        body.insert("scope".into(), Value::String(scope.clone()));
    }
    if stale {
        body.insert("stale".into(), Value::Bool(true));
    }
    body
}

async fn check(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let from_body;
    let token = if body.is_empty() {
        bearer(&headers)
    } else {
        #[derive(serde::Deserialize)]
        struct CheckRequest {
            token: Option<String>,
        }
        match serde_json::from_slice::<CheckRequest>(&body) {
            Ok(req) => {
                from_body = req.token;
                from_body.as_deref().or_else(|| bearer(&headers))
            }
            Err(_) => return invalid_request("body must be JSON {\"token\": \"...\"}"),
        }
    };
    let decision = s.checker.decide(token).await;
    s.checker.record("check", &decision, started);
    let body = match &decision {
        Decision::Active { token, stale } => Value::Object(claims_body(token, *stale)),
        Decision::Inactive { reason } => json!({"active": false, "reason": reason}),
        Decision::Undecided { reason } => {
            json!({"active": false, "reason": reason, "undecided": true})
        }
    };
    let mut resp = Json(body).into_response();
    if matches!(decision, Decision::Active { stale: true, .. }) {
        resp.headers_mut()
            .insert("x-revsync-stale", HeaderValue::from_static("true"));
    }
    resp
}

async fn introspect(State(s): State<AppState>, body: Bytes) -> Response {
    let started = Instant::now();
    let mut token = None;
    for (k, v) in form_urlencoded_pairs(&body) {
        if k == "token" {
            // RFC 6749 §3.1: parameters must not be repeated; never pick one silently.
            if token.replace(v).is_some() {
                return invalid_request("form parameter `token` must appear once");
            }
        }
    }
    let Some(token) = token else {
        return invalid_request("form parameter `token` is required");
    };
    let decision = s.checker.decide(Some(&token)).await;
    s.checker.record("introspect", &decision, started);
    match decision {
        Decision::Active { token, stale } => {
            let mut body = claims_body(&token, stale);
            body.remove("stale");
            body.entry("token_type")
                .or_insert_with(|| Value::String("Bearer".into()));
            let mut resp = Json(Value::Object(body)).into_response();
            if stale {
                resp.headers_mut()
                    .insert("x-revsync-stale", HeaderValue::from_static("true"));
            }
            resp
        }
        // RFC 7662 §2.2: an inactive answer says nothing more.
        Decision::Inactive { .. } | Decision::Undecided { .. } => {
            Json(json!({"active": false})).into_response()
        }
    }
}

fn form_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).unwrap_or_default()
}

async fn authz(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let token = bearer(&headers);
    let decision = s.checker.decide(token).await;
    s.checker.record("authz", &decision, started);
    match decision {
        Decision::Active { token, stale } => {
            let mut resp = StatusCode::OK.into_response();
            let h = resp.headers_mut();
            let mut set = |name: &'static str, v: Option<&str>| {
                if let Some(v) = v.and_then(|v| HeaderValue::from_str(v).ok()) {
                    h.insert(name, v);
                }
            };
            set("x-auth-subject", token.sub.as_deref());
            set("x-auth-client-id", token.client_id.as_deref());
            set("x-auth-scope", token.scope.as_deref());
            set("x-auth-issuer", Some(&token.iss));
            if stale {
                set("x-revsync-stale", Some("true"));
            }
            resp
        }
        Decision::Inactive { reason } => {
            // RFC 6750 §3.1: a request without credentials gets no error code.
            let challenge = if token.is_none() {
                HeaderValue::from_static("Bearer realm=\"revsync\"")
            } else {
                HeaderValue::from_str(&format!(
                    "Bearer realm=\"revsync\", error=\"invalid_token\", error_description=\"{reason}\""
                ))
                .expect("reason words are header-safe")
            };
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, challenge)],
            )
                .into_response()
        }
        Decision::Undecided { reason } => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                header::HeaderName::from_static("x-revsync-reason"),
                HeaderValue::from_static(reason),
            )],
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    caught_up_once: bool,
    keys_loaded: bool,
    freshness: FreshnessView,
}

fn readiness(c: &Checker) -> Readiness {
    let freshness = c.freshness.view();
    let caught_up_once = c.ingest.caught_up_at_ms().is_some();
    let keys_loaded = c.validator.keys_loaded();
    Readiness {
        ready: caught_up_once && keys_loaded && !freshness.stale,
        caught_up_once,
        keys_loaded,
        freshness,
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    let r = readiness(&s.checker);
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let c = &s.checker;
    let sizes = c.denylist.sizes();
    for (kind, n) in [
        ("token", sizes.token),
        ("subject", sizes.subject),
        ("session", sizes.session),
        ("client", sizes.client),
        ("issuer", sizes.issuer),
    ] {
        c.metrics
            .denylist_entries
            .get_or_create(&crate::metrics::KindLabels { kind })
            .set(n as i64);
    }
    if let Some(age) = c.freshness.view().age_ms {
        c.metrics.seconds_since_caught_up.set(age as f64 / 1000.0);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        c.metrics.encode(),
    )
        .into_response()
}

#[derive(Serialize)]
struct Status {
    ready: bool,
    freshness: FreshnessView,
    partitions: Vec<PartitionStatus>,
    denylist: crate::denylist::Sizes,
    store_bytes_on_disk: u64,
    issuers: Vec<crate::token::IssuerKeyStatus>,
}

async fn status(State(s): State<AppState>) -> Response {
    let c = &s.checker;
    let r = readiness(c);
    Json(Status {
        ready: r.ready,
        freshness: r.freshness,
        partitions: c.ingest.partitions(),
        denylist: c.denylist.sizes(),
        store_bytes_on_disk: c.denylist.size_on_disk(),
        issuers: c.validator.status(),
    })
    .into_response()
}
