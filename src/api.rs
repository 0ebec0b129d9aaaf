//! The localhost HTTP API (DESIGN.md, "HTTP API"). Handlers only extract the token and
//! shape answers; the decision itself is [`Checker::decide`], and every mapping from a
//! decision to a status code lives in this file.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::config::OnStale;
use crate::denylist::{Denylist, TokenRef};
use crate::freshness::{Freshness, FreshnessView};
use crate::ingest::{IngestState, PartitionStatus};
use crate::metrics::{CheckLabels, Metrics};
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
    /// [`Self::decide_at`] the current time.
    pub async fn decide(&self, token: Option<&str>) -> Decision {
        self.decide_at(token, crate::unix_now()).await
    }

    /// The decision about `token` with its validity judged at `now` (unix seconds); the
    /// denylist and freshness are as they are.
    pub async fn decide_at(&self, token: Option<&str>, now: u64) -> Decision {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Decision::Inactive {
                reason: "malformed",
            };
        };
        let verified = match self.validator.validate_at(token, now).await {
            Ok(v) => v,
            Err(Rejection::KeysUnavailable) => {
                return Decision::Undecided {
                    reason: Rejection::KeysUnavailable.reason(),
                }
            }
            Err(r) => return Decision::Inactive { reason: r.reason() },
        };
        // How fresh the store is, taken before it is read: a view taken after the lookup
        // could report a catch-up that happened after it, and vouch for a lookup that
        // did not see what that catch-up applied.
        let view = self.freshness.view();
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
        if !view.stale {
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
            .record_check(route, outcome, reason, started.elapsed().as_secs_f64());
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

/// The header that carries `http.credential` on every protected route.
pub const CREDENTIAL_HEADER: header::HeaderName =
    header::HeaderName::from_static("x-revsync-credential");

/// `http.credential`, kept only as its SHA-256 digest. Presented values are hashed and the
/// digests compared in constant time, so neither the content nor the length of the
/// secret leaks through timing.
#[derive(Clone)]
pub struct Credential {
    digest: [u8; 32],
}

impl Credential {
    pub fn new(secret: &str) -> Self {
        Credential {
            digest: crate::token::sha256(secret.as_bytes()),
        }
    }

    fn matches(&self, presented: &[u8]) -> bool {
        let equal = aws_lc_rs::constant_time::verify_slices_are_equal(
            &crate::token::sha256(presented),
            &self.digest,
        )
        .is_ok();
        equal && !presented.is_empty()
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

/// What a path needs of a client when a credential is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guarded {
    /// `/healthz`, `/readyz`: probes, open to all.
    Open,
    /// `X-Revsync-Credential` only: `/v1/check` and `/v1/authz` carry the checked token in
    /// `Authorization`; `/v1/status` and unknown paths follow the same rule.
    Header,
    /// `/introspect`: also HTTP Basic (any client id, the credential as password) or
    /// Bearer, as RFC 7662 §2.1 clients authenticate.
    Introspect,
    /// `/metrics`: also Bearer (Prometheus `authorization` scrape config).
    Metrics,
}

impl Guarded {
    /// By the raw request path, exactly as the router matches it: anything not exactly an
    /// open route is guarded.
    fn of(path: &str) -> Self {
        match path {
            "/healthz" | "/readyz" => Guarded::Open,
            "/introspect" => Guarded::Introspect,
            "/metrics" => Guarded::Metrics,
            _ => Guarded::Header,
        }
    }
}

struct Guard {
    credential: Credential,
    metrics: Arc<Metrics>,
}

impl Guard {
    fn admits(&self, route: Guarded, headers: &header::HeaderMap) -> bool {
        // When the header is there it decides, and it must be there once: of two values,
        // which one counts is never guessed.
        let mut presented = headers.get_all(&CREDENTIAL_HEADER).iter();
        if let Some(value) = presented.next() {
            return presented.next().is_none() && self.credential.matches(value.as_bytes());
        }
        if route == Guarded::Header {
            return false;
        }
        let Some(authorization) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let Some((scheme, rest)) = authorization.to_str().ok().and_then(|v| v.split_once(' '))
        else {
            return false;
        };
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self.credential.matches(rest.as_bytes());
        }
        if route == Guarded::Introspect && scheme.eq_ignore_ascii_case("basic") {
            return self.basic_password_matches(rest);
        }
        false
    }

    /// `base64(client_id ":" password)`, the password as sent or, per RFC 6749 §2.3.1,
    /// form-urlencoded first.
    fn basic_password_matches(&self, encoded: &str) -> bool {
        use base64::Engine;
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return false;
        };
        let password = &decoded[colon + 1..];
        if self.credential.matches(password) {
            return true;
        }
        let unescaped = form_urlencoded_decode(password);
        unescaped != password && self.credential.matches(&unescaped)
    }
}

/// `application/x-www-form-urlencoded` decoding of one value: `+` is a space, `%XX` a byte.
fn form_urlencoded_decode(value: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        match value[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < value.len() => match (hex(value[i + 1]), hex(value[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// `app` with every route but the probes behind `credential` (DESIGN.md "HTTP API";
/// README "Security"). A refusal is a 401, counted in `revsync_http_unauthorized_total`;
/// an admitted request reaches its handler without the credential header.
pub fn require_credential(app: Router, credential: Credential, metrics: Arc<Metrics>) -> Router {
    let guard = Arc::new(Guard {
        credential,
        metrics,
    });
    app.layer(axum::middleware::from_fn_with_state(
        guard,
        check_credential,
    ))
}

async fn check_credential(
    State(guard): State<Arc<Guard>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = Guarded::of(req.uri().path());
    if route == Guarded::Open {
        return next.run(req).await;
    }
    if guard.admits(route, req.headers()) {
        let headers = req.headers_mut();
        headers.remove(&CREDENTIAL_HEADER);
        if route != Guarded::Header {
            // It may have carried the credential; neither handler reads it.
            headers.remove(header::AUTHORIZATION);
        }
        return next.run(req).await;
    }
    guard.metrics.http_unauthorized.inc();
    // Neither the credential nor any Authorization header is ever logged (invariant 6).
    tracing::debug!(route = ?route, "request refused: missing or wrong credential");
    credential_refused(route)
}

/// The 401 of a request without the credential. `/introspect` answers as an RFC 6749
/// §5.2 token endpoint does to a client that failed to authenticate.
fn credential_refused(route: Guarded) -> Response {
    let (challenge, body) = match route {
        Guarded::Introspect => (
            r#"Basic realm="revsync""#,
            json!({
                "error": "invalid_client",
                "error_description": "missing or wrong credential (X-Revsync-Credential, HTTP Basic password or Bearer)",
            }),
        ),
        Guarded::Metrics => (
            r#"Bearer realm="revsync""#,
            json!({
                "error": "unauthorized",
                "error_description": "missing or wrong X-Revsync-Credential (or Authorization: Bearer)",
            }),
        ),
        Guarded::Header | Guarded::Open => (
            r#"X-Revsync-Credential realm="revsync""#,
            json!({
                "error": "unauthorized",
                "error_description": "missing or wrong X-Revsync-Credential",
            }),
        ),
    };
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        )],
        Json(body),
    )
        .into_response()
}

/// The `Host` values a loopback listener without a credential answers on its guarded
/// routes: loopback names and addresses (any port), the listener's own address, and
/// `http.allowed_hosts`.
///
/// Such a listener trusts whatever can reach it, and a browser on the same host can: a
/// page whose DNS name is re-pointed at 127.0.0.1 (DNS rebinding) reads the answers as
/// same-origin, with its own name in `Host`. Refusing names that are not this host keeps
/// `/v1/status`, `/metrics`, `/introspect` and `/v1/check` out of its reach.
#[derive(Debug, Clone)]
pub struct LocalHosts {
    /// Lowercased `host` or `host:port` entries.
    allowed: Vec<String>,
}

impl LocalHosts {
    /// For a listener bound to `bound`, configured as `listen`, also accepting `extra`.
    pub fn new(bound: Option<std::net::SocketAddr>, listen: &str, extra: &[String]) -> Self {
        let mut allowed: Vec<String> = extra.iter().map(|h| h.to_ascii_lowercase()).collect();
        allowed.push(listen.to_ascii_lowercase());
        if let Some(addr) = bound {
            allowed.push(addr.to_string());
        }
        LocalHosts { allowed }
    }

    /// Whether `host` (a `Host` header value) names this host.
    pub fn admits(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        if self.allowed.contains(&host) {
            return true;
        }
        // Without its port: `[::1]:8181` -> `[::1]`, `localhost:8181` -> `localhost`.
        let name = match host.rsplit_once(':') {
            Some((name, port))
                if !port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && (!name.contains(':') || name.ends_with(']')) =>
            {
                name
            }
            _ => host.as_str(),
        };
        if self.allowed.iter().any(|a| a == name) {
            return true;
        }
        let name = name.trim_end_matches('.');
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        let bare = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        bare.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
    }
}

/// Whether a path is checked against [`LocalHosts`]. `/v1/authz` is not: proxies call it
/// with the client's own `Host` (Envoy ext_authz always does; Caddy `forward_auth` and
/// Traefik `forwardAuth` copy it), and its answer tells the caller nothing beyond the
/// claims of a token it already holds. Neither are the probes, whose callers
/// (orchestrators) use whatever address they reached the pod on.
fn host_checked(path: &str) -> bool {
    !(path == "/v1/authz"
        || path.starts_with("/v1/authz/")
        || path == "/healthz"
        || path == "/readyz")
}

/// `app` answering its guarded routes only when `Host` names this host: others get 421
/// Misdirected Request. For a loopback TCP listener without a credential (see
/// [`LocalHosts`]); a request without `Host` (HTTP/1.0, not a browser) passes.
pub fn require_local_host(app: Router, hosts: LocalHosts) -> Router {
    app.layer(axum::middleware::from_fn_with_state(
        Arc::new(hosts),
        check_host,
    ))
}

async fn check_host(
    State(hosts): State<Arc<LocalHosts>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !host_checked(req.uri().path()) {
        return next.run(req).await;
    }
    let mut presented = req.headers().get_all(header::HOST).iter();
    let admitted = match (presented.next(), presented.next()) {
        (None, _) => true,
        (Some(host), None) => host.to_str().is_ok_and(|h| hosts.admits(h)),
        // Two Host headers: which one a browser meant is never guessed.
        (Some(_), Some(_)) => false,
    };
    if admitted {
        return next.run(req).await;
    }
    // The Host value is not logged: it is whatever a web page chose.
    tracing::debug!(
        path = req.uri().path(),
        "request refused: Host is not this host"
    );
    (
        StatusCode::MISDIRECTED_REQUEST,
        Json(json!({
            "error": "misdirected_request",
            "error_description": "Host does not name this host (loopback, the listen address or http.allowed_hosts)",
        })),
    )
        .into_response()
}

/// The `Authorization` header of a request; unlike the `HeaderMap` extractor it copies
/// no other header.
enum Authorization {
    Absent,
    One(HeaderValue),
    /// Sent more than once: which one counts is never guessed (a proxy and the
    /// application might each pick a different one), so the request is refused.
    Repeated,
}

impl<S: Send + Sync> FromRequestParts<S> for Authorization {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
        Ok(match (values.next(), values.next()) {
            (None, _) => Authorization::Absent,
            (Some(value), None) => Authorization::One(value.clone()),
            (Some(_), Some(_)) => Authorization::Repeated,
        })
    }
}

/// The 400 of a request with more than one `Authorization` header.
const REPEATED_AUTHORIZATION: &str = "the Authorization header must appear at most once";

fn bearer(authorization: &Authorization) -> Option<&str> {
    let Authorization::One(value) = authorization else {
        return None;
    };
    let value = value.to_str().ok()?;
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

/// Slots of a token's [`crate::token::AnswerCache`]: the `/v1/check` answer, the same
/// when stale, and the `/introspect` answer.
const CHECK_ANSWER: usize = 0;
const CHECK_STALE_ANSWER: usize = 1;
const INTROSPECT_ANSWER: usize = 2;
const _: () = assert!(INTROSPECT_ANSWER < crate::token::AnswerCache::SLOTS);

/// A JSON body already serialized, answered as [`Json`] would answer it.
fn json_bytes(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn serialize(body: &impl Serialize) -> Bytes {
    let mut out = Vec::with_capacity(256);
    serde_json::to_writer(&mut out, body).expect("a JSON object always serializes");
    // Kept with the token in the cache: no spare capacity.
    out.shrink_to_fit();
    out.into()
}

/// The `/v1/check` answer for an active token, serialized once per token.
fn check_answer(token: &VerifiedToken, stale: bool) -> Bytes {
    let slot = if stale {
        CHECK_STALE_ANSWER
    } else {
        CHECK_ANSWER
    };
    token.answers.get_or_init(slot, || {
        if !map_is_sorted() {
            return serialize(&claims_body(token, stale));
        }
        let mut extra = Extra::for_token(token);
        if stale {
            extra.push("stale", Member::Set(Value::Bool(true)));
        }
        serialize(&extra.over(&token.claims))
    })
}

/// The `/introspect` answer for an active token (the same whether stale or not),
/// serialized once per token.
fn introspect_answer(token: &VerifiedToken) -> Bytes {
    token.answers.get_or_init(INTROSPECT_ANSWER, || {
        if !map_is_sorted() {
            let mut body = claims_body(token, false);
            body.remove("stale");
            body.entry("token_type")
                .or_insert_with(|| Value::String("Bearer".into()));
            return serialize(&body);
        }
        let mut extra = Extra::for_token(token);
        extra.push("stale", Member::Drop);
        extra.push(
            "token_type",
            Member::IfAbsent(Value::String("Bearer".into())),
        );
        serialize(&extra.over(&token.claims))
    })
}

/// Whether `serde_json::Map` iterates in key order (its default), not in insertion order
/// (its `preserve_order` feature). The answers are serialized straight from the claims
/// only in the first case, where the order of the members is simply the key order.
fn map_is_sorted() -> bool {
    static SORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SORTED.get_or_init(|| {
        let mut map = Map::new();
        map.insert("b".into(), Value::Null);
        map.insert("a".into(), Value::Null);
        map.keys().next().is_some_and(|k| k == "a")
    })
}

/// How an answer treats one member besides the claims.
enum Member {
    /// This value, whether or not the claims have the member.
    Set(Value),
    /// This value when the claims lack the member; else the claim.
    IfAbsent(Value),
    /// Not in the answer, whatever the claims say.
    Drop,
}

/// The members an active answer sets, adds or drops over the token's claims: the same
/// object as [`claims_body`] builds (and as it is changed for `/introspect`), without
/// copying the claims into a map of its own.
struct Extra(Vec<(&'static str, Member)>);

impl Extra {
    /// `active`, `client_id` (when the claims lack it) and `scope` (always: it may stand
    /// for `scp`).
    fn for_token(token: &VerifiedToken) -> Self {
        let mut extra = Extra(Vec::with_capacity(5));
        extra.push("active", Member::Set(Value::Bool(true)));
        if let Some(client_id) = &token.client_id {
            extra.push(
                "client_id",
                Member::IfAbsent(Value::String(client_id.clone())),
            );
        }
        if let Some(scope) = &token.scope {
            extra.push("scope", Member::Set(Value::String(scope.clone())));
        }
        extra
    }

    fn push(&mut self, name: &'static str, member: Member) {
        debug_assert!(self.0.iter().all(|(n, _)| *n != name));
        self.0.push((name, member));
    }

    fn over<'a>(mut self, claims: &'a Map<String, Value>) -> ExtraOver<'a> {
        self.0.sort_by_key(|(name, _)| *name);
        ExtraOver {
            extra: self.0,
            claims,
        }
    }
}

/// Serializes `claims` merged with `extra` in key order (see [`map_is_sorted`]).
struct ExtraOver<'a> {
    /// Sorted by name.
    extra: Vec<(&'static str, Member)>,
    claims: &'a Map<String, Value>,
}

impl Serialize for ExtraOver<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        let mut extra = self.extra.iter().peekable();
        let put_extra = |map: &mut S::SerializeMap, name: &str, member: &Member| match member {
            Member::Set(v) | Member::IfAbsent(v) => map.serialize_entry(name, v),
            Member::Drop => Ok(()),
        };
        for (key, value) in self.claims {
            while let Some((name, member)) = extra.next_if(|(name, _)| *name < key.as_str()) {
                put_extra(&mut map, name, member)?;
            }
            match extra.next_if(|(name, _)| *name == key.as_str()) {
                None | Some((_, Member::IfAbsent(_))) => map.serialize_entry(key, value)?,
                Some((name, member)) => put_extra(&mut map, name, member)?,
            }
        }
        for (name, member) in extra {
            put_extra(&mut map, name, member)?;
        }
        map.end()
    }
}

/// A `/v1/check` answer for a token that is not active.
#[derive(Serialize)]
struct NotActive {
    active: bool,
    reason: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    undecided: bool,
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

async fn check(State(s): State<AppState>, headers: Authorization, body: Bytes) -> Response {
    let started = Instant::now();
    if matches!(headers, Authorization::Repeated) {
        return invalid_request(REPEATED_AUTHORIZATION);
    }
    let from_body;
    let token = if body.is_empty() {
        bearer(&headers)
    } else {
        #[derive(serde::Deserialize)]
        struct CheckRequest {
            token: Option<String>,
        }
        // serde reads a struct from a JSON array too (`["…"]`); the contract is an object.
        let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        match serde_json::from_slice::<CheckRequest>(&body) {
            Ok(req) if object => {
                from_body = req.token;
                from_body.as_deref().or_else(|| bearer(&headers))
            }
            _ => return invalid_request("body must be JSON {\"token\": \"...\"}"),
        }
    };
    let decision = s.checker.decide(token).await;
    s.checker.record("check", &decision, started);
    let mut resp = match &decision {
        Decision::Active { token, stale } => json_bytes(check_answer(token, *stale)),
        Decision::Inactive { reason } => Json(NotActive {
            active: false,
            reason,
            undecided: false,
        })
        .into_response(),
        Decision::Undecided { reason } => Json(NotActive {
            active: false,
            reason,
            undecided: true,
        })
        .into_response(),
    };
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
            let mut resp = json_bytes(introspect_answer(&token));
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

/// The identity headers of a 200 from `/v1/authz`, every one of them always: a claim the
/// token lacks (or one no header can carry) is an empty value, never a missing header.
/// Proxies copy these over the client's request, and some copy only the headers an auth
/// answer carries (Envoy's `allowed_upstream_headers`, Caddy's `copy_headers`): a header
/// left out would let a client's own `X-Auth-Scope: admin` through to the upstream.
pub const IDENTITY_HEADERS: [&str; 4] = [
    "x-auth-subject",
    "x-auth-client-id",
    "x-auth-scope",
    "x-auth-issuer",
];

fn identity_headers(token: &VerifiedToken) -> [(&'static str, HeaderValue); 4] {
    let value = |claim: Option<&str>| {
        claim
            .and_then(|v| HeaderValue::from_str(v).ok())
            .unwrap_or_else(|| HeaderValue::from_static(""))
    };
    let [subject, client_id, scope, issuer] = IDENTITY_HEADERS;
    [
        (subject, value(token.sub.as_deref())),
        (client_id, value(token.client_id.as_deref())),
        (scope, value(token.scope.as_deref())),
        (issuer, value(Some(&token.iss))),
    ]
}

async fn authz(State(s): State<AppState>, headers: Authorization) -> Response {
    let started = Instant::now();
    if matches!(headers, Authorization::Repeated) {
        // RFC 6750 §3.1: a malformed request is a 400 with `invalid_request`.
        return (
            StatusCode::BAD_REQUEST,
            [(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "Bearer realm=\"revsync\", error=\"invalid_request\", error_description=\"malformed\"",
                ),
            )],
        )
            .into_response();
    }
    let token = bearer(&headers);
    let decision = s.checker.decide(token).await;
    s.checker.record("authz", &decision, started);
    match decision {
        Decision::Active { token, stale } => {
            let mut resp = StatusCode::OK.into_response();
            let h = resp.headers_mut();
            for (name, claim) in identity_headers(&token) {
                h.insert(name, claim);
            }
            if stale {
                h.insert("x-revsync-stale", HeaderValue::from_static("true"));
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

/// Live while the process serves and its store takes writes: a store that failed and
/// cannot be reopened leaves the process up but useless, and a supervisor that restarts
/// it on this answer may get it back (the cause is in the log, never in the body).
async fn healthz(State(s): State<AppState>) -> Response {
    if s.checker.denylist.failure().is_some() || s.checker.ingest.store_failing() {
        return (StatusCode::SERVICE_UNAVAILABLE, "store failing\n").into_response();
    }
    "ok\n".into_response()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn token(claims: Value, client_id: Option<&str>, scope: Option<&str>) -> VerifiedToken {
        VerifiedToken {
            iss: "https://as".into(),
            sub: Some("alice".into()),
            jti: None,
            sid: None,
            client_id: client_id.map(str::to_string),
            iat: None,
            exp: 2_000_000_000,
            nbf: None,
            scope: scope.map(str::to_string),
            claims: claims.as_object().unwrap().clone(),
            answers: Default::default(),
        }
    }

    /// The answers as they were built for every request before they were cached.
    fn uncached(token: &VerifiedToken, stale: bool) -> (Vec<u8>, Vec<u8>) {
        let check = serde_json::to_vec(&Value::Object(claims_body(token, stale))).unwrap();
        let mut body = claims_body(token, stale);
        body.remove("stale");
        body.entry("token_type")
            .or_insert_with(|| Value::String("Bearer".into()));
        (check, serde_json::to_vec(&Value::Object(body)).unwrap())
    }

    #[test]
    fn cached_answers_are_the_uncached_ones() {
        let tokens = [
            token(
                json!({"iss": "https://as", "sub": "alice", "aud": ["a", "b"], "exp": 2_000_000_000}),
                None,
                None,
            ),
            token(
                json!({"iss": "https://as", "azp": "app", "scp": ["r", "w"], "nested": {"x": [1, 2.5, null]}}),
                Some("app"),
                Some("r w"),
            ),
            // Claims that collide with the answer's own members.
            token(
                json!({"active": false, "stale": "no", "token_type": "DPoP", "client_id": "c1", "scope": ["odd"], "é": "ü\n"}),
                Some("c1"),
                Some("s"),
            ),
            token(json!({"client_id": 5, "zzz": true}), Some("azp"), None),
        ];
        for t in &tokens {
            let filled = t.clone();
            filled
                .answers
                .get_or_init(CHECK_ANSWER, || Bytes::from_static(b"x"));
            assert!(
                filled
                    .clone()
                    .answers
                    .get_or_init(CHECK_ANSWER, Bytes::new)
                    .is_empty(),
                "a clone starts with no answers"
            );
            for order in [[false, true], [true, false]] {
                let t = t.clone();
                for stale in order {
                    let (check, introspect) = uncached(&t, stale);
                    for _ in 0..2 {
                        assert_eq!(check_answer(&t, stale), check, "stale {stale}");
                        assert_eq!(introspect_answer(&t), introspect, "stale {stale}");
                    }
                }
            }
        }
    }

    #[test]
    fn answers_match_the_map_built_ones_for_any_claims() {
        assert!(map_is_sorted(), "serde_json without preserve_order");
        let keys = [
            "",
            "a",
            "aa",
            "acti",
            "active",
            "activez",
            "b",
            "client",
            "client_id",
            "client_idz",
            "exp",
            "iss",
            "scope",
            "scop",
            "scopez",
            "sid",
            "stal",
            "stale",
            "stalez",
            "sub",
            "token",
            "token_type",
            "token_typez",
            "zz",
            "é",
            "Active",
            "\u{0}",
        ];
        let values = [
            json!(true),
            json!(false),
            json!(null),
            json!("s"),
            json!(7),
            json!(-1.5),
            json!(["x", {"y": null}]),
            json!({"k": "v", "a": [1]}),
        ];
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..5000 {
            let mut claims = Map::new();
            for _ in 0..rnd(8) {
                claims.insert(
                    keys[rnd(keys.len())].into(),
                    values[rnd(values.len())].clone(),
                );
            }
            let client_id = ["app", "c\"q"][rnd(2)];
            let scope = ["read write", "é"][rnd(2)];
            let t = token(
                Value::Object(claims),
                (rnd(2) == 0).then_some(client_id),
                (rnd(2) == 0).then_some(scope),
            );
            for stale in [false, true] {
                let (check, introspect) = uncached(&t, stale);
                assert_eq!(
                    check_answer(&t, stale),
                    check,
                    "{:?} stale {stale}",
                    t.claims
                );
                assert_eq!(introspect_answer(&t), introspect, "{:?}", t.claims);
            }
        }
    }

    #[test]
    fn every_decision_has_a_preresolved_metric() {
        use Rejection::*;
        let token = Arc::new(token(json!({}), None, None));
        let mut decisions = vec![
            Decision::Active {
                token: token.clone(),
                stale: false,
            },
            Decision::Active { token, stale: true },
            Decision::Inactive { reason: "revoked" },
            Decision::Undecided { reason: "stale" },
        ];
        for r in [
            Expired,
            NotYetValid,
            BadSignature,
            UnknownKey,
            WrongIssuer,
            WrongAudience,
            WrongType,
            Malformed,
            KeysUnavailable,
            LifetimeExceeded,
        ] {
            decisions.push(if r.undecidable() {
                Decision::Undecided { reason: r.reason() }
            } else {
                Decision::Inactive { reason: r.reason() }
            });
        }
        for route in ["check", "introspect", "authz"] {
            for d in &decisions {
                let (outcome, reason) = d.outcome();
                assert!(
                    Metrics::check_labels_preresolved(route, outcome, reason),
                    "{route} {outcome} {reason}"
                );
            }
        }
    }

    #[test]
    fn the_credential_matches_only_itself_and_never_shows() {
        let c = Credential::new("0123456789abcdef");
        assert!(c.matches(b"0123456789abcdef"));
        for other in [
            &b""[..],
            b"0123456789abcde",
            b"0123456789abcdef ",
            b"0123456789ABCDEF",
        ] {
            assert!(!c.matches(other), "{other:?}");
        }
        assert!(!Credential::new("").matches(b""), "empty never matches");
        assert_eq!(format!("{c:?}"), "Credential(<redacted>)");
    }

    #[test]
    fn only_the_probes_are_open() {
        for (path, guarded) in [
            ("/healthz", Guarded::Open),
            ("/readyz", Guarded::Open),
            ("/introspect", Guarded::Introspect),
            ("/metrics", Guarded::Metrics),
            ("/v1/check", Guarded::Header),
            ("/v1/authz/healthz", Guarded::Header),
            ("/healthz/", Guarded::Header),
            ("/%68ealthz", Guarded::Header),
            ("/introspect/", Guarded::Header),
            ("", Guarded::Header),
        ] {
            assert_eq!(Guarded::of(path), guarded, "{path:?}");
        }
    }

    #[test]
    fn basic_passwords_are_form_urlencoded_decoded() {
        for (encoded, decoded) in [
            ("abc", "abc"),
            ("a+b", "a b"),
            ("%2B%2f%25", "+/%"),
            ("100%", "100%"),
            ("%4", "%4"),
            ("%zz1", "%zz1"),
            ("%41%", "A%"),
        ] {
            assert_eq!(
                form_urlencoded_decode(encoded.as_bytes()),
                decoded.as_bytes(),
                "{encoded}"
            );
        }
    }

    #[test]
    fn inactive_answers_are_the_json_objects() {
        for reason in ["revoked", "expired", "stale", "unknown_key"] {
            for undecided in [false, true] {
                let expected = if undecided {
                    json!({"active": false, "reason": reason, "undecided": true})
                } else {
                    json!({"active": false, "reason": reason})
                };
                let body = NotActive {
                    active: false,
                    reason,
                    undecided,
                };
                assert_eq!(
                    serde_json::to_vec(&body).unwrap(),
                    serde_json::to_vec(&expected).unwrap()
                );
            }
        }
    }
}
