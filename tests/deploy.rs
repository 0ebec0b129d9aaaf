//! What `deploy/` depends on in revsync, checked without the proxies that cannot run here,
//! and the hardening that keeps those deployments safe:
//! - the identity-header contract of `/v1/authz` (all four headers on every 200);
//! - every shipped proxy config names the four headers and strips a client's own
//!   (Envoy and Traefik by a line-based reading of their YAML: neither runs in CI, and a
//!   YAML parser would be a new dependency for these few fields);
//! - every metric the alerting rules and the dashboard use is one revsync exports;
//! - the `Host` rule of a loopback listener without a credential;
//! - `https` for issuer, JWKS and introspection URLs; JWKS redirects not followed;
//!   introspection answers bounded.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use common::jwt::{JwksServer, TestKey};
use common::router::{Harness, Opts};
use revsync::api::{require_local_host, LocalHosts, IDENTITY_HEADERS};
use revsync::config::{Config, ConfigError, FreshnessConfig, IntrospectionConfig, IssuerConfig};
use serde_json::{json, Value};

const NGINX: &str = include_str!("../deploy/nginx/revsync.conf");
const CADDY: &str = include_str!("../deploy/caddy/Caddyfile");
const ENVOY: &str = include_str!("../deploy/envoy/envoy.yaml");
const TRAEFIK: &str = include_str!("../deploy/traefik/dynamic.yaml");
const ISTIO: &str = include_str!("../deploy/istio/ext-authz.yaml");
const ALERTS: &str = include_str!("../deploy/monitoring/revsync-alerts.yml");
const ALERT_TESTS: &str = include_str!("../deploy/monitoring/revsync-alerts.test.yml");
const DASHBOARD: &str = include_str!("../deploy/monitoring/revsync-dashboard.json");

// ---------------------------------------------------------------------------------------
// The identity-header contract

#[tokio::test]
async fn authz_answers_every_identity_header_empty_when_the_claim_is_absent() {
    let h = Harness::new(Opts::default()).await;
    // No scope, no client_id: those two are empty, not missing.
    let token = h.token(json!({"sub": "bob"}));
    let r = h
        .request(
            Method::GET,
            "/v1/authz",
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let got: Vec<(&str, Option<&str>)> = IDENTITY_HEADERS
        .iter()
        .map(|name| (*name, r.header(name)))
        .collect();
    assert_eq!(
        got,
        [
            ("x-auth-subject", Some("bob")),
            ("x-auth-client-id", Some("")),
            ("x-auth-scope", Some("")),
            ("x-auth-issuer", Some(h.iss.as_str())),
        ]
    );
    for name in IDENTITY_HEADERS {
        assert_eq!(r.headers.get_all(name).iter().count(), 1, "{name} once");
    }

    // Every claim present: every header carries it.
    let token = h.token(json!({"sub": "alice", "client_id": "app-1", "scope": "read"}));
    let r = h
        .request(
            Method::GET,
            "/v1/authz/any/path",
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-auth-client-id"), Some("app-1"));
    assert_eq!(r.header("x-auth-scope"), Some("read"));

    // A claim no header can carry (a control character) is empty too, never left out.
    let token = h.token(json!({"sub": "bob\u{7}", "scope": "read"}));
    let r = h
        .request(
            Method::GET,
            "/v1/authz",
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-auth-subject"), Some(""));
    assert_eq!(r.header("x-auth-scope"), Some("read"));

    // Denials carry none.
    let r = h.request(Method::GET, "/v1/authz", &[], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    for name in IDENTITY_HEADERS {
        assert_eq!(r.header(name), None, "{name} on a 401");
    }
}

/// The lines of `text` that are not comments (`#` first, after indentation).
fn config_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn has_line(text: &str, line: &str) -> bool {
    config_lines(text)
        .iter()
        .any(|l| l.eq_ignore_ascii_case(line))
}

/// Canonical capitalisation of an identity header (`X-Auth-Client-Id`).
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[test]
fn nginx_sets_every_identity_header_from_the_auth_answer() {
    for name in IDENTITY_HEADERS {
        let var = name.replace('-', "_");
        let set = config_lines(NGINX)
            .iter()
            .find(|l| {
                l.starts_with("auth_request_set") && l.ends_with(&format!("$upstream_http_{var};"))
            })
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
            .unwrap_or_else(|| panic!("nginx: no auth_request_set from {name}"));
        assert!(
            has_line(
                NGINX,
                &format!("proxy_set_header {} {set};", canonical(name))
            ),
            "nginx: {name} not replaced with {set}"
        );
    }
}

#[test]
fn caddy_strips_and_copies_every_identity_header() {
    let lines = config_lines(CADDY);
    let strip = lines
        .iter()
        .position(|l| *l == "request_header -X-Auth-*")
        .expect("caddy: request_header -X-Auth-*");
    let auth = lines
        .iter()
        .position(|l| l.starts_with("forward_auth "))
        .expect("caddy: forward_auth");
    let route = lines.iter().position(|l| *l == "route {").expect("route");
    assert!(
        route < strip && strip < auth,
        "caddy: strip inside route, before forward_auth"
    );
    let copy = lines
        .iter()
        .find(|l| l.starts_with("copy_headers "))
        .expect("caddy: copy_headers");
    let copied: BTreeSet<String> = copy
        .split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect();
    let want: BTreeSet<String> = IDENTITY_HEADERS.iter().map(|n| canonical(n)).collect();
    assert_eq!(copied, want);
    assert!(has_line(CADDY, "uri /v1/authz"));
}

/// The YAML list items (`- x` or `- { exact: x }`) right under the line `key:` at the
/// indentation they share: a line-based reading of the few fields revsync depends on.
fn yaml_list_after(text: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == key)
        .unwrap_or_else(|| panic!("no `{key}` line"));
    let mut items = Vec::new();
    let mut indent = None;
    for l in &lines[start + 1..] {
        let trimmed = l.trim_start();
        if trimmed.starts_with('#') {
            continue;
        }
        let this = l.len() - trimmed.len();
        let Some(item) = trimmed.strip_prefix("- ") else {
            break;
        };
        if *indent.get_or_insert(this) != this {
            break;
        }
        let item = item.trim();
        let item = item
            .strip_prefix("{ exact:")
            .and_then(|i| i.strip_suffix('}'))
            .or_else(|| item.strip_prefix("remove:"))
            .unwrap_or(item);
        items.push(item.trim().trim_matches('"').to_string());
    }
    items
}

#[test]
fn envoy_strips_then_copies_every_identity_header() {
    let want: Vec<String> = IDENTITY_HEADERS.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        yaml_list_after(ENVOY, "patterns:"),
        want,
        "allowed_upstream_headers"
    );
    assert_eq!(
        yaml_list_after(ENVOY, "request_mutations:"),
        want,
        "header_mutation"
    );
    let position = |needle: &str| {
        ENVOY
            .find(needle)
            .unwrap_or_else(|| panic!("envoy: no `{needle}`"))
    };
    // Filters run in order: the strip must come before ext_authz, ext_authz before router.
    assert!(
        position("- name: envoy.filters.http.header_mutation")
            < position("- name: envoy.filters.http.ext_authz")
    );
    assert!(
        position("- name: envoy.filters.http.ext_authz")
            < position("- name: envoy.filters.http.router")
    );
    assert!(position("allowed_upstream_headers:") > position("authorization_response:"));
    let lines = config_lines(ENVOY);
    for line in [
        "failure_mode_allow: false",
        "path_prefix: /v1/authz",
        "allowed_headers: { patterns: [{ exact: authorization }] }",
    ] {
        assert!(lines.contains(&line), "envoy: `{line}`");
    }
    // The revsync cluster is revsync's default listen address.
    let cluster = &ENVOY[position("- name: revsync")..];
    let cluster = &cluster[..cluster.find("- name: api").unwrap_or(cluster.len())];
    assert!(
        cluster.contains("address: 127.0.0.1, port_value: 8181"),
        "{cluster}"
    );
    assert!(ENVOY.contains(r#"uri: "http://127.0.0.1:8181""#));
}

#[test]
fn traefik_strips_then_copies_every_identity_header() {
    let canon: Vec<String> = IDENTITY_HEADERS.iter().map(|n| canonical(n)).collect();
    assert_eq!(yaml_list_after(TRAEFIK, "authResponseHeaders:"), canon);
    for name in &canon {
        assert!(
            config_lines(TRAEFIK).contains(&format!("{name}: \"\"").as_str()),
            "traefik: customRequestHeaders must empty {name}"
        );
    }
    assert!(config_lines(TRAEFIK).contains(&"middlewares: [revsync-strip-identity, revsync]"));
    assert!(config_lines(TRAEFIK).contains(&r#"address: "http://127.0.0.1:8181/v1/authz""#));
}

#[test]
fn istio_provider_copies_every_identity_header_and_fails_closed() {
    // The mesh-config half is a commented block (it goes in another resource): read it
    // without its `#`.
    let mesh: Vec<&str> = ISTIO
        .lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .map(str::trim)
        .collect();
    let headers = format!(
        "headersToUpstreamOnAllow: [{}]",
        IDENTITY_HEADERS
            .iter()
            .map(|h| format!("\"{h}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for line in [
        "- name: revsync",
        "service: revsync.local            # the ServiceEntry below: this pod's loopback",
        "port: 8181",
        "pathPrefix: /v1/authz",
        "includeRequestHeadersInCheck: [\"authorization\"]",
        headers.as_str(),
        "headersToDownstreamOnDeny: [\"www-authenticate\"]",
        "failOpen: false",
    ] {
        assert!(mesh.contains(&line), "istio mesh config: `{line}`");
    }
    let lines = config_lines(ISTIO);
    for line in [
        "hosts: [\"revsync.local\"]",
        "endpoints: [{ address: \"127.0.0.1\" }]",
        "ports: [{ name: http, number: 8181, protocol: HTTP }]",
        "action: CUSTOM",
        "name: revsync",
    ] {
        assert!(lines.contains(&line), "istio: `{line}`");
    }
}

// ---------------------------------------------------------------------------------------
// Monitoring

/// Every sample name a real `/metrics` can carry: from its `# TYPE` lines, a counter `x`
/// as `x_total`, a histogram as `x_bucket`/`x_count`/`x_sum`, anything else as itself.
/// A labelled family shows only once it has a series, so each gets one first, as
/// ingest, checks and fetches would make them.
async fn exported_names() -> BTreeSet<String> {
    use revsync::metrics::*;
    let h = Harness::new(Opts::default()).await;
    let m = &h.metrics;
    let topic = TopicLabels {
        topic: "t".into(),
        format: "native",
    };
    let partition = PartitionLabels {
        topic: "t".into(),
        partition: 0,
    };
    let check = CheckLabels {
        route: "authz",
        outcome: "active",
        reason: "none",
    };
    let issuer = IssuerLabels { issuer: "i".into() };
    m.events_applied.get_or_create(&topic).inc();
    m.events_ignored.get_or_create(&topic).inc();
    m.events_malformed
        .get_or_create(&MalformedLabels {
            topic: "t".into(),
            format: "native",
            reason: "r",
        })
        .inc();
    for family in [&m.lag, &m.position] {
        family.get_or_create(&partition).set(1);
    }
    for family in [&m.offset_resets, &m.log_resets, &m.skipped_offsets] {
        family.get_or_create(&partition).inc();
    }
    m.entries_expired
        .get_or_create(&KindLabels { kind: "token" })
        .inc();
    m.checks.get_or_create(&check).inc();
    m.introspections.get_or_create(&check).inc();
    m.check_latency
        .get_or_create(&RouteLabels { route: "authz" })
        .observe(0.001);
    m.jwks_fetches.get_or_create(&issuer).inc();
    m.jwks_failures.get_or_create(&issuer).inc();
    let r = h.request(Method::GET, "/metrics", &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    let mut names = BTreeSet::new();
    for line in r.text().lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_count", "_sum"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    assert!(names.contains("revsync_checks_total"), "{names:?}");
    assert!(
        names.contains("revsync_check_duration_seconds_bucket"),
        "{names:?}"
    );
    names
}

/// The `revsync_*` names in a PromQL expression.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("revsync_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            into.insert(expr[start..end].to_string());
        }
        i = end;
    }
}

fn rule_exprs(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect()
}

fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

#[tokio::test]
async fn the_rules_and_the_dashboard_use_only_metrics_revsync_exports() {
    let exported = exported_names().await;
    for (what, exprs) in [
        ("deploy/monitoring/revsync-alerts.yml", rule_exprs(ALERTS)),
        (
            "deploy/monitoring/revsync-dashboard.json",
            dashboard_exprs(),
        ),
    ] {
        assert!(exprs.len() >= 10, "{what}: {exprs:?}");
        let mut used = BTreeSet::new();
        for e in &exprs {
            metric_names(e, &mut used);
        }
        let unknown: Vec<&String> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{what} uses metrics revsync does not export: {unknown:?}"
        );
    }
    // The checker itself: a misspelt name is caught.
    let mut used = BTreeSet::new();
    metric_names("rate(revsync_check_total[5m]) + x_revsync_no", &mut used);
    assert_eq!(used, BTreeSet::from(["revsync_check_total".to_string()]));
    assert!(!exported.contains("revsync_check_total"));
}

#[test]
fn the_key_alerts_exist_and_are_unit_tested() {
    for alert in [
        "RevsyncDenylistStale",
        "RevsyncDenylistApproachingStale",
        "RevsyncLagGrowing",
        "RevsyncPartitionHeld",
        "RevsyncMalformedEvents",
        "RevsyncStoreErrors",
        "RevsyncJwksFetchFailing",
        "RevsyncUnauthorizedRequests",
    ] {
        assert!(
            config_lines(ALERTS).contains(&format!("- alert: {alert}").as_str()),
            "no alert {alert}"
        );
        assert!(
            config_lines(ALERT_TESTS).contains(&format!("alertname: {alert}").as_str()),
            "{alert} has no promtool test"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The Host rule

#[test]
fn local_hosts_admits_this_host_only() {
    let bound: std::net::SocketAddr = "127.0.0.1:8181".parse().unwrap();
    let hosts = LocalHosts::new(Some(bound), "127.0.0.1:8181", &["revsync.internal".into()]);
    for ok in [
        "127.0.0.1:8181",
        "127.0.0.1",
        "127.3.2.1:9",
        "localhost",
        "LOCALHOST:8181",
        "localhost.",
        "app.localhost:8181",
        "[::1]",
        "[::1]:8181",
        "[::ffff:127.0.0.1]:8181",
        "revsync.internal",
        "revsync.internal:8181",
    ] {
        assert!(hosts.admits(ok), "{ok} refused");
    }
    for refused in [
        "evil.example.com",
        "evil.example.com:8181",
        "127.0.0.1.evil.example.com",
        "localhost.evil.example.com",
        "10.0.0.1:8181",
        "[::2]:8181",
        "",
        "0.0.0.0:8181",
    ] {
        assert!(!hosts.admits(refused), "{refused} admitted");
    }
}

#[tokio::test]
async fn a_loopback_listener_answers_its_guarded_routes_for_this_host_only() {
    let h = Harness::new(Opts::default()).await;
    let app = require_local_host(h.app.clone(), LocalHosts::new(None, "127.0.0.1:8181", &[]));
    let send = |path: &'static str, method: Method, host: Option<&'static str>| {
        let app = app.clone();
        let token = h.token(json!({"sub": "alice"}));
        async move {
            use tower::ServiceExt;
            let mut req = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Bearer {token}"));
            if let Some(host) = host {
                req = req.header("host", host);
            }
            app.oneshot(req.body(axum::body::Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        }
    };
    let rebound = Some("rebound.example.com");
    for (path, method) in [
        ("/v1/status", Method::GET),
        ("/metrics", Method::GET),
        ("/v1/check", Method::POST),
        ("/introspect", Method::POST),
        ("/nowhere", Method::GET),
    ] {
        assert_eq!(
            send(path, method.clone(), rebound).await,
            StatusCode::MISDIRECTED_REQUEST,
            "{path}"
        );
        assert_ne!(
            send(path, method.clone(), Some("127.0.0.1:8181")).await,
            StatusCode::MISDIRECTED_REQUEST,
            "{path}"
        );
        assert_ne!(
            send(path, method, None).await,
            StatusCode::MISDIRECTED_REQUEST,
            "{path}"
        );
    }
    // Proxies forward-auth with the client's Host; probes come from orchestrators.
    for path in ["/v1/authz", "/v1/authz/orders/1", "/healthz", "/readyz"] {
        let status = send(path, Method::GET, rebound).await;
        assert_ne!(status, StatusCode::MISDIRECTED_REQUEST, "{path}");
    }
    assert_eq!(
        send("/v1/authz", Method::GET, rebound).await,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------
// Config: https and allowed_hosts

fn config_with_issuer(issuer_toml: &str) -> Result<Config, ConfigError> {
    Config::parse(
        &format!(
            "[kafka]\nbrokers = \"k:9092\"\n[[issuers]]\naudiences = [\"https://api\"]\n{issuer_toml}\n"
        ),
        std::iter::empty(),
    )
}

fn invalid_key(result: Result<Config, ConfigError>) -> String {
    match result {
        Err(ConfigError::Invalid { key, problem }) => {
            assert!(problem.contains("allow_http"), "{problem}");
            key
        }
        other => panic!("expected an invalid key, got {other:?}"),
    }
}

#[test]
fn issuer_jwks_and_introspection_urls_must_be_https_off_loopback() {
    for ok in [
        "issuer = \"https://as.example.com\"",
        "issuer = \"http://127.0.0.1:8080\"",
        "issuer = \"http://localhost:8080/realms/x\"",
        "issuer = \"http://[::1]/\"",
        "issuer = \"urn:example:issuer\"",
        "issuer = \"https://as.example.com\"\njwks_uri = \"http://127.0.0.1:1/jwks\"",
        "issuer = \"http://as.example.com\"\nallow_http = true",
        "issuer = \"https://as\"\njwks_uri = \"http://keys.internal/jwks\"\nallow_http = true",
    ] {
        config_with_issuer(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let bad = [
        ("issuer = \"http://as.example.com\"", "issuers[0].issuer"),
        ("issuer = \"HTTP://as.example.com\"", "issuers[0].issuer"),
        ("issuer = \"http://127.0.0.1.nip.io\"", "issuers[0].issuer"),
        ("issuer = \"http://localhost@evil.example\"", "issuers[0].issuer"),
        (
            "issuer = \"https://as\"\njwks_uri = \"http://keys.example.com/jwks\"",
            "issuers[0].jwks_uri",
        ),
        (
            "issuer = \"https://as\"\n[issuers.introspection]\nendpoint = \"http://as.example.com/introspect\"\nclient_id = \"c\"\nclient_secret = \"s\"",
            "issuers[0].introspection.endpoint",
        ),
    ];
    for (toml, key) in bad {
        assert_eq!(invalid_key(config_with_issuer(toml)), key, "{toml}");
    }
}

#[test]
fn allowed_hosts_must_be_host_names() {
    let parse = |hosts: &str| {
        Config::parse(
            &format!("[http]\nallowed_hosts = {hosts}\n[kafka]\nbrokers = \"k:9092\"\n"),
            std::iter::empty(),
        )
    };
    let c = parse("[\"revsync.internal\", \"revsync.internal:8181\"]").unwrap();
    assert_eq!(c.http.allowed_hosts.len(), 2);
    for bad in ["[\"\"]", "[\"http://x/\"]", "[\"a b\"]"] {
        match parse(bad) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "http.allowed_hosts[0]"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fetches: no JWKS redirects, bounded introspection answers

/// A server on loopback: `/moved` redirects to `to`, `/big` answers `big` bytes of JSON,
/// `/small` an RFC 7662 answer.
async fn serve(to: String, big: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let padding = "x".repeat(big);
    let app = Router::new()
        .route(
            "/moved",
            get(move || async move { axum::response::Redirect::temporary(&to) }),
        )
        .route(
            "/big",
            post(move || {
                let body = format!("{{\"active\":true,\"pad\":\"{padding}\"}}");
                async move { ([("content-type", "application/json")], body) }
            }),
        )
        .route(
            "/small",
            post(|| async { axum::Json(json!({"active": true})) }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

#[tokio::test]
async fn jwks_redirects_are_not_followed() {
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let base = serve(jwks.jwks_uri(), 0).await;
    let metrics = Arc::new(revsync::metrics::Metrics::new());
    let start = |jwks_uri: String| {
        let mut issuer = IssuerConfig::new(jwks.issuer(), "https://api");
        issuer.jwks_uri = Some(jwks_uri);
        let metrics = metrics.clone();
        async move {
            revsync::token::TokenValidator::start(
                &[issuer],
                revsync::token::http_client().unwrap(),
                metrics,
                10,
                tokio_util::sync::CancellationToken::new(),
            )
            .await
        }
    };
    // The direct address loads; the redirect to it does not.
    assert!(start(jwks.jwks_uri()).await.keys_loaded());
    let redirected = start(format!("{base}/moved")).await;
    assert!(!redirected.keys_loaded());
    let status = serde_json::to_value(redirected.status()).unwrap();
    assert!(
        status.to_string().contains("307"),
        "the 3xx is the error: {status}"
    );
}

#[tokio::test]
async fn introspection_answers_are_bounded() {
    let limit = revsync::freshness::MAX_INTROSPECTION_BYTES;
    let base = serve(String::new(), limit).await;
    let introspector = |path: &str| {
        let mut issuer = IssuerConfig::new("https://as", "https://api");
        issuer.introspection = Some(IntrospectionConfig {
            endpoint: format!("{base}{path}"),
            client_id: "c".into(),
            client_secret: "s".into(),
        });
        revsync::freshness::Introspector::new(&[issuer], &FreshnessConfig::default()).unwrap()
    };
    assert!(introspector("/small")
        .is_active("https://as", "t")
        .await
        .unwrap());
    let err = introspector("/big")
        .is_active("https://as", "t")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}
