//! What every forward-auth proxy test shares: the real `revsync` daemon with a real
//! broker and JWKS server behind it, a protected upstream that echoes what it received,
//! and [`forward_auth_contract`], the behaviour each shipped proxy config must show
//! (tests/nginx.rs, tests/caddy.rs). Included by those alone, next to `mod common;`:
//! `#[path = "common/proxy.rs"] mod proxy;`.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::common::broker::{free_port, Broker};
use crate::common::daemon::{self, Daemon, DaemonConfig};
use crate::common::jwt::{claims_with, now, JwksServer, TestKey};

pub const AUD: &str = "https://api.example.com";
pub const TOPIC: &str = "revocations";
/// The identity headers revsync answers a 200 with, as the upstream sees them.
pub const IDENTITY_HEADERS: [&str; 4] = [
    "x-auth-subject",
    "x-auth-client-id",
    "x-auth-scope",
    "x-auth-issuer",
];

/// The protected API: answers every request with the identity headers it received
/// (`null` when absent) and the `Host` it was asked for.
pub struct Upstream {
    pub port: u16,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        async fn echo(State(hits): State<Arc<AtomicUsize>>, headers: HeaderMap) -> Json<Value> {
            hits.fetch_add(1, Ordering::SeqCst);
            let h = |name: &str| {
                let mut values = headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => Value::Null,
                    (Some(v), None) => json!(v.to_str().unwrap()),
                    // Two copies would let the upstream pick either: report both.
                    (Some(a), Some(b)) => json!([a.to_str().unwrap(), b.to_str().unwrap()]),
                }
            };
            Json(json!({
                "upstream": true,
                "x-auth-subject": h("x-auth-subject"),
                "x-auth-client-id": h("x-auth-client-id"),
                "x-auth-scope": h("x-auth-scope"),
                "x-auth-issuer": h("x-auth-issuer"),
                "x-auth-role": h("x-auth-role"),
                "x-revsync-credential": h("x-revsync-credential"),
            }))
        }
        let app = Router::new().fallback(any(echo)).with_state(hits.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { port, hits, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Answer {
    pub status: u16,
    pub www_authenticate: Option<String>,
    pub body: Value,
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

pub async fn request(http: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = http.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let www_authenticate = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        www_authenticate,
        body,
    }
}

/// `request` with `Authorization: Bearer <token>` besides `headers`.
pub async fn request_as(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let authorization = format!("Bearer {token}");
    let mut all = vec![("authorization", authorization.as_str())];
    all.extend_from_slice(headers);
    request(http, url, &all).await
}

/// Everything behind the proxy: broker, issuer, the revsync daemon (ready), upstream.
pub struct Stack {
    pub broker: Broker,
    pub key: TestKey,
    pub jwks: JwksServer,
    pub iss: String,
    pub upstream: Upstream,
    pub daemon: Daemon,
    pub revsync_port: u16,
    pub http: reqwest::Client,
    /// Holds the daemon's store and config; a proxy may use a subdirectory.
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// The daemon on 127.0.0.1, with `http_extra` in its `[http]` table (a credential,
    /// say); returns once `/readyz` is 200.
    pub async fn start(http_extra: &str) -> Self {
        let broker = Broker::memory();
        broker.create_topic(TOPIC, 1);
        let key = TestKey::ec_p256("proxy-k1");
        let jwks = JwksServer::with_keys(&[&key]).await;
        let iss = jwks.issuer();
        let upstream = Upstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let revsync_port = free_port();
        let config = DaemonConfig {
            http_extra: http_extra.to_string(),
            ..DaemonConfig::new(revsync_port, dir.path(), &broker, TOPIC).trusting(&jwks, AUD)
        }
        .write(&dir.path().join("revsync.toml"));
        let daemon = Daemon::spawn(&config, revsync_port);
        let http = http_client();
        // Ready: caught up with the broker and keys loaded.
        let deadline = Instant::now() + Duration::from_secs(20);
        while http
            .get(daemon.url("/readyz"))
            .send()
            .await
            .map_or(true, |r| r.status() != 200)
        {
            assert!(Instant::now() < deadline, "revsync never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Stack {
            broker,
            key,
            jwks,
            iss,
            upstream,
            daemon,
            revsync_port,
            http,
            dir,
        }
    }

    /// A directory for the proxy's config, logs and temp files.
    pub fn proxy_dir(&self, name: &str) -> std::path::PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A token of the issuer: `sub`, `jti`, `iat`, `exp`, no `scope`, no `client_id`, with
    /// `changes` merged in (`null` removes a claim).
    pub fn token(&self, changes: Value) -> String {
        let mut changes = changes;
        changes
            .as_object_mut()
            .unwrap()
            .entry("iat")
            .or_insert(json!(now() - 5));
        self.key.sign(&claims_with(&self.iss, AUD, changes))
    }

    pub fn config_path(&self) -> &Path {
        self.dir.path()
    }
}

/// An identity header the upstream saw: absent or empty both mean "no such claim".
fn is_empty_or_absent(v: &Value) -> bool {
    v.is_null() || *v == json!("")
}

/// The forward-auth contract every shipped proxy config keeps, checked through the proxy
/// at `url` in front of `stack`:
/// - good token: the upstream gets the request with the token's identity headers;
/// - spoofed: identity headers the client sends never reach the upstream, whether the
///   token has that claim (replaced) or not (empty or absent, never the client's value);
/// - missing token: 401 `WWW-Authenticate: Bearer realm="revsync"`, upstream untouched;
/// - revoked (published to the broker): 401 `error_description="revoked"` once applied,
///   upstream untouched.
///
/// `proxy` names the proxy in failure messages.
pub async fn forward_auth_contract(stack: &Stack, proxy: &str, url: &str) {
    let http = &stack.http;
    let iss = &stack.iss;
    let upstream = &stack.upstream;

    // Good: every claim present, every identity header passed on.
    let jti = format!("{proxy}-contract-jti");
    let alice = stack.token(json!({
        "sub": "alice", "client_id": "app-1", "scope": "read write", "jti": jti,
    }));
    let hits = upstream.hits();
    let a = request_as(http, url, &alice, &[]).await;
    assert_eq!(a.status, 200, "{proxy}: good token: {}", a.body);
    for (name, want) in IDENTITY_HEADERS
        .iter()
        .zip(["alice", "app-1", "read write", iss])
    {
        assert_eq!(a.body[*name], json!(want), "{proxy}: {name}: {}", a.body);
    }
    assert_eq!(upstream.hits(), hits + 1);

    // Spoofed, the token having the claims: revsync's values replace the client's.
    let spoofed = [
        ("X-Auth-Subject", "mallory"),
        ("x-auth-client-id", "spoofed-client"),
        ("X-Auth-Scope", "admin"),
        ("x-auth-issuer", "https://evil.example.com"),
    ];
    let a = request_as(http, url, &alice, &spoofed).await;
    assert_eq!(a.status, 200, "{proxy}: spoofed, good token: {}", a.body);
    for (name, want) in IDENTITY_HEADERS
        .iter()
        .zip(["alice", "app-1", "read write", iss])
    {
        assert_eq!(
            a.body[*name],
            json!(want),
            "{proxy}: spoofed {name}: {}",
            a.body
        );
    }

    // Spoofed, the token lacking `scope` and `client_id`: the upstream sees none of the
    // client's values (the hole an answer without the header would leave).
    let bob = stack.token(json!({"sub": "bob"}));
    let a = request_as(http, url, &bob, &spoofed).await;
    assert_eq!(a.status, 200, "{proxy}: spoofed, no scope: {}", a.body);
    assert_eq!(
        a.body["x-auth-subject"],
        json!("bob"),
        "{proxy}: {}",
        a.body
    );
    assert_eq!(a.body["x-auth-issuer"], json!(iss), "{proxy}: {}", a.body);
    for name in ["x-auth-client-id", "x-auth-scope"] {
        assert!(
            is_empty_or_absent(&a.body[name]),
            "{proxy}: the client's own {name} reached the upstream: {}",
            a.body
        );
    }
    let after_good = upstream.hits();
    assert_eq!(after_good, hits + 3);

    // Missing token: 401 with revsync's challenge, no error code (RFC 6750 §3.1).
    let a = request(http, url, &[("x-auth-subject", "mallory")]).await;
    assert_eq!(a.status, 401, "{proxy}: no token: {}", a.body);
    assert_eq!(
        a.www_authenticate.as_deref(),
        Some(r#"Bearer realm="revsync""#),
        "{proxy}: no token"
    );
    // Invalid: 401 invalid_token.
    let a = request_as(http, url, "a.b.c", &[]).await;
    assert_eq!(a.status, 401, "{proxy}: malformed token");
    let challenge = a.www_authenticate.expect("WWW-Authenticate passed through");
    assert!(
        challenge.contains(r#"error="invalid_token""#) && challenge.contains("malformed"),
        "{proxy}: {challenge}"
    );
    assert_eq!(
        upstream.hits(),
        after_good,
        "{proxy}: denied requests reached upstream"
    );

    // Revoked with the CLI: 401 once the event is applied (polled through the proxy).
    daemon::publish(
        &stack.broker,
        TOPIC,
        &["token", "--iss", iss, "--jti", &jti],
    );
    let published = Instant::now();
    loop {
        let a = request_as(http, url, &alice, &[]).await;
        if a.status == 401 {
            let challenge = a.www_authenticate.expect("WWW-Authenticate passed through");
            assert!(
                challenge.contains(r#"error="invalid_token""#)
                    && challenge.contains(r#"error_description="revoked""#),
                "{proxy}: {challenge}"
            );
            break;
        }
        assert_eq!(a.status, 200, "{proxy}: before revocation: {}", a.body);
        assert!(
            published.elapsed() < Duration::from_secs(20),
            "{proxy}: the revocation never reached the proxy"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let hits = upstream.hits();
    let a = request_as(http, url, &alice, &[]).await;
    assert_eq!(a.status, 401, "{proxy}: revoked stays revoked");
    assert_eq!(
        upstream.hits(),
        hits,
        "{proxy}: a revoked token reached upstream"
    );
    // Other tokens are unaffected.
    let a = request_as(http, url, &bob, &[]).await;
    assert_eq!(a.status, 200, "{proxy}: another token after the revocation");
    assert_eq!(upstream.hits(), hits + 1);
}
