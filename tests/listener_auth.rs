//! The check API's credential (`http.credential`, README "Security"): with one configured,
//! every route but `/healthz` and `/readyz` refuses a request that does not present it
//! (401, counted in `revsync_http_unauthorized_total`) and answers normally one that does;
//! a listener beyond loopback without one is refused at start-up.
//!
//! The routes are driven in process (tests/common/router.rs: the real router, real JWKS
//! server, real sled denylist) behind the same layer `revsync run` adds; start-up, the
//! `check`/`probe` CLI and the logs are tested against the real binary, with a real broker.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, StatusCode};
use base64::Engine;
use common::broker::{free_port, Broker};
use common::daemon::{cli as revsync, Daemon, DaemonConfig};
use common::jwt::{claims_with, now, JwksServer, TestKey};
use common::router::{Harness, Opts, Resp};
use serde_json::{json, Value};

/// Printable ASCII with characters a form-urlencoded Basic password escapes.
const SECRET: &str = "revsync-test-credential+42/%=";
const AUD: &str = "https://api.example.com";
const TOPIC: &str = "revocations";
const BIN: &str = env!("CARGO_BIN_EXE_revsync");

fn basic(client_id: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{password}"))
    )
}

/// The exposed value of `revsync_http_unauthorized_total`, read with the credential.
async fn unauthorized_total(h: &Harness) -> u64 {
    let r = h
        .request(
            Method::GET,
            "/metrics",
            &[("x-revsync-credential", SECRET)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    exposed_unauthorized(&r.text())
}

fn exposed_unauthorized(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("revsync_http_unauthorized_total "))
        .unwrap_or_else(|| panic!("revsync_http_unauthorized_total missing from\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// A 401 of the credential layer: the JSON body and challenge of `route`'s kind, and
/// nothing of what was sent echoed.
fn assert_refused(r: &Resp, what: &str, sent: &str) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text());
    let (error, challenge) = if what.contains("/introspect") {
        ("invalid_client", r#"Basic realm="revsync""#)
    } else if what.contains("/metrics") {
        ("unauthorized", r#"Bearer realm="revsync""#)
    } else {
        ("unauthorized", r#"X-Revsync-Credential realm="revsync""#)
    };
    assert_eq!(r.json()["error"], json!(error), "{what}");
    assert!(r.json()["error_description"].is_string(), "{what}");
    assert_eq!(r.header("www-authenticate"), Some(challenge), "{what}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
    r.assert_does_not_echo(SECRET);
    if !sent.is_empty() {
        r.assert_does_not_echo(sent);
    }
}

/// Every guarded (method, path) of the router, with a body where it reads one.
fn guarded_requests(token: &str) -> Vec<(Method, &'static str, &'static str, String)> {
    let form = serde_urlencoded::to_string([("token", token)]).unwrap();
    vec![
        (
            Method::POST,
            "/v1/check",
            "application/json",
            json!({ "token": token }).to_string(),
        ),
        (
            Method::POST,
            "/introspect",
            "application/x-www-form-urlencoded",
            form,
        ),
        (Method::GET, "/v1/authz", "", String::new()),
        (Method::POST, "/v1/authz/", "", String::new()),
        (Method::GET, "/v1/authz/some/path?q=1", "", String::new()),
        (Method::GET, "/metrics", "", String::new()),
        (Method::GET, "/v1/status", "", String::new()),
        // Not routed: refused before the 404, so nothing about the routes leaks.
        (Method::GET, "/v1/nope", "", String::new()),
        (Method::GET, "/healthz/", "", String::new()),
    ]
}

async fn send(
    h: &Harness,
    (method, uri, content_type, body): &(Method, &str, &str, String),
    extra: &[(&str, &str)],
) -> Resp {
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if !content_type.is_empty() {
        headers.push(("content-type", content_type));
    }
    h.request(method.clone(), uri, &headers, body.clone()).await
}

// ---------------------------------------------------------------------------------------
// The routes, in process

#[tokio::test]
async fn without_the_credential_every_guarded_route_is_refused_and_counted() {
    let h = Harness::new(Opts::default()).await.with_credential(SECRET);
    let token = h.token(json!({"sub": "alice"}));
    assert_eq!(h.metrics.http_unauthorized.get(), 0);
    assert_eq!(unauthorized_total(&h).await, 0, "born at zero");
    let auth = format!("Bearer {token}");
    let requests = guarded_requests(&token);
    let mut refused = 0;
    for req in &requests {
        let what = format!("{} {}", req.0, req.1);
        // Nothing, and a checked token in Authorization (the token, not a credential).
        for extra in [vec![], vec![("authorization", auth.as_str())]] {
            let r = send(&h, req, &extra).await;
            assert_refused(&r, &what, &token);
            refused += 1;
        }
    }
    assert_eq!(h.metrics.http_unauthorized.get(), refused);
    assert_eq!(unauthorized_total(&h).await, refused);
    // No handler ran: no check was recorded.
    let r = h
        .request(
            Method::GET,
            "/metrics",
            &[("x-revsync-credential", SECRET)],
            Body::empty(),
        )
        .await;
    assert!(
        !r.text().contains("revsync_checks_total{"),
        "a refused request reached a handler:\n{}",
        r.text()
    );
}

#[tokio::test]
async fn a_wrong_credential_is_refused() {
    let h = Harness::new(Opts::default()).await.with_credential(SECRET);
    let token = h.token(json!({}));
    let longer = format!("{SECRET}x");
    let upper = SECRET.to_ascii_uppercase();
    let bearer_secret = format!("Bearer {SECRET}");
    let basic_secret = basic("rs", SECRET);
    let wrong: Vec<Vec<(&str, &str)>> = vec![
        vec![("x-revsync-credential", "")],
        vec![("x-revsync-credential", "wrong")],
        vec![("x-revsync-credential", &SECRET[..SECRET.len() - 1])],
        vec![("x-revsync-credential", &longer)],
        vec![("x-revsync-credential", &upper)],
        // Twice, once right: which one counts is not guessed.
        vec![
            ("x-revsync-credential", SECRET),
            ("x-revsync-credential", "wrong"),
        ],
        // Elsewhere than the header.
        vec![("authorization", SECRET)],
        vec![("x-revsync-credentials", SECRET)],
    ];
    let mut refused = 0;
    for req in guarded_requests(&token) {
        for extra in &wrong {
            let what = format!("{} {} with {extra:?}", req.0, req.1);
            let r = send(&h, &req, extra).await;
            assert_refused(&r, &what, "");
            refused += 1;
        }
    }
    // Where the checked token rides in Authorization, only the header counts.
    for req in guarded_requests(&token) {
        if ["/introspect", "/metrics"].contains(&req.1) {
            continue;
        }
        for extra in [
            vec![("authorization", bearer_secret.as_str())],
            vec![("authorization", basic_secret.as_str())],
        ] {
            let what = format!("{} {} with {extra:?}", req.0, req.1);
            let r = send(&h, &req, &extra).await;
            assert_refused(&r, &what, "");
            refused += 1;
        }
    }
    assert_eq!(unauthorized_total(&h).await, refused);
}

#[tokio::test]
async fn the_right_credential_gets_the_normal_answers() {
    let h = Harness::new(Opts::default()).await.with_credential(SECRET);
    let cred = ("x-revsync-credential", SECRET);
    let active = h.token(json!({"sub": "alice", "client_id": "app-1", "scope": "read"}));
    let json_body = ("content-type", "application/json");

    // /v1/check: a valid token is active, garbage is not; the token from the body or
    // from Authorization.
    let r = h
        .request(
            Method::POST,
            "/v1/check",
            &[cred, json_body],
            json!({ "token": active }).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["active"], json!(true));
    assert_eq!(r.json()["sub"], json!("alice"));
    r.assert_does_not_echo(SECRET);
    let auth = format!("Bearer {active}");
    let r = h
        .request(
            Method::POST,
            "/v1/check",
            &[cred, ("authorization", &auth)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["active"], json!(true));
    let r = h
        .request(
            Method::POST,
            "/v1/check",
            &[cred, json_body],
            json!({"token": "garbage"}).to_string(),
        )
        .await;
    assert_eq!(r.json(), json!({"active": false, "reason": "malformed"}));
    h.revoke_jti("listener-auth-revoked");
    let revoked = h.token(json!({"jti": "listener-auth-revoked"}));
    let r = h
        .request(
            Method::POST,
            "/v1/check",
            &[cred, json_body],
            json!({ "token": revoked }).to_string(),
        )
        .await;
    assert_eq!(r.json(), json!({"active": false, "reason": "revoked"}));

    // /v1/authz: identity headers for an active token, never the credential; the token's
    // own 401 (Bearer challenge, empty body) without one.
    for uri in ["/v1/authz", "/v1/authz/", "/v1/authz/deep/path"] {
        let r = h
            .request(
                Method::GET,
                uri,
                &[cred, ("authorization", &auth)],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert_eq!(r.header("x-auth-subject"), Some("alice"));
        assert_eq!(r.header("x-auth-client-id"), Some("app-1"));
        assert!(r.header("x-revsync-credential").is_none());
        r.assert_does_not_echo(SECRET);
        let r = h.request(Method::GET, uri, &[cred], Body::empty()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="revsync""#)
        );
        assert!(r.body.is_empty());
        let r = h
            .request(
                Method::GET,
                uri,
                &[cred, ("authorization", "Bearer garbage")],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r
            .header("www-authenticate")
            .unwrap()
            .contains("invalid_token"));
    }

    // Operations.
    let r = h
        .request(Method::GET, "/v1/status", &[cred], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["ready"], json!(true));
    let r = h
        .request(Method::GET, "/metrics", &[cred], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().contains("revsync_checks_total{route=\"check\""));
    // Past the credential, an unknown path is the router's 404.
    let r = h
        .request(Method::GET, "/v1/nope", &[cred], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(h.metrics.http_unauthorized.get(), 0, "nothing refused");
}

#[tokio::test]
async fn probes_are_open() {
    let h = Harness::new(Opts::default()).await.with_credential(SECRET);
    for (path, body) in [("/healthz", Some("ok\n")), ("/readyz", None)] {
        for extra in [vec![], vec![("x-revsync-credential", "wrong")]] {
            let r = h.request(Method::GET, path, &extra, Body::empty()).await;
            assert_eq!(r.status, StatusCode::OK, "{path} {extra:?}");
            if let Some(body) = body {
                assert_eq!(r.text(), body);
            } else {
                assert_eq!(r.json()["ready"], json!(true));
            }
            let r = h.request(Method::HEAD, path, &extra, Body::empty()).await;
            assert_eq!(r.status, StatusCode::OK, "HEAD {path}");
        }
    }
    assert_eq!(h.metrics.http_unauthorized.get(), 0);
}

#[tokio::test]
async fn introspect_takes_basic_and_bearer_and_metrics_takes_bearer() {
    let h = Harness::new(Opts::default()).await.with_credential(SECRET);
    let active = h.token(json!({"sub": "alice"}));
    let form = serde_urlencoded::to_string([("token", active.as_str())]).unwrap();
    let garbage = serde_urlencoded::to_string([("token", "garbage")]).unwrap();
    let introspect = |authorization: String, form: String| {
        let h = &h;
        async move {
            h.request(
                Method::POST,
                "/introspect",
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("authorization", &authorization),
                ],
                form,
            )
            .await
        }
    };
    // RFC 6749 §2.3.1: client id and secret form-urlencoded before Basic; many clients
    // skip that, so the secret as it is counts too. Any client id.
    let encoded: String = serde_urlencoded::to_string([("p", SECRET)]).unwrap()[2..].to_string();
    assert_ne!(encoded, SECRET, "the test secret has characters to escape");
    for authorization in [
        basic("resource-server", SECRET),
        basic("", SECRET),
        basic("resource-server", &encoded),
        // A client id with a colon is form-urlencoded (RFC 7617 §2 forbids a raw one).
        basic("client%3Aid", SECRET).replace("Basic", "basic"),
        format!("Bearer {SECRET}"),
        format!("bearer  {SECRET}"),
    ] {
        let r = introspect(authorization.clone(), form.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{authorization}: {}", r.text());
        assert_eq!(r.json()["active"], json!(true));
        assert_eq!(r.json()["sub"], json!("alice"));
        let r = introspect(authorization.clone(), garbage.clone()).await;
        assert_eq!(r.json(), json!({"active": false}), "{authorization}");
    }
    let r = h
        .request(
            Method::POST,
            "/introspect",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("x-revsync-credential", SECRET),
            ],
            form.clone(),
        )
        .await;
    assert_eq!(r.json()["active"], json!(true));
    let before = h.metrics.http_unauthorized.get();
    for authorization in [
        basic("resource-server", "wrong-secret-of-some-length"),
        basic(SECRET, ""),
        basic(SECRET, "x"),
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(SECRET)
        ),
        "Basic !!!not-base64".to_string(),
        format!("Bearer {SECRET}x"),
        format!("Digest {SECRET}"),
        SECRET.to_string(),
    ] {
        let r = introspect(authorization.clone(), form.clone()).await;
        assert_refused(&r, &format!("POST /introspect with {authorization}"), "");
        assert_eq!(
            r.json(),
            json!({
                "error": "invalid_client",
                "error_description": "missing or wrong credential (X-Revsync-Credential, HTTP Basic password or Bearer)"
            })
        );
    }
    assert_eq!(h.metrics.http_unauthorized.get(), before + 8);

    // /metrics: Bearer (Prometheus `authorization`) or the header; Basic is not taken.
    for authorization in [format!("Bearer {SECRET}"), format!("BEARER {SECRET}")] {
        let r = h
            .request(
                Method::GET,
                "/metrics",
                &[("authorization", &authorization)],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{authorization}");
        assert_eq!(exposed_unauthorized(&r.text()), before + 8);
        r.assert_does_not_echo(SECRET);
    }
    // The header, when sent, decides: a wrong or doubled one is not rescued by a right
    // Authorization.
    let bearer = format!("Bearer {SECRET}");
    for extra in [
        vec![
            ("x-revsync-credential", "wrong"),
            ("authorization", bearer.as_str()),
        ],
        vec![
            ("x-revsync-credential", SECRET),
            ("x-revsync-credential", SECRET),
            ("authorization", bearer.as_str()),
        ],
    ] {
        for uri in ["/metrics", "/introspect"] {
            let method = if uri == "/metrics" {
                Method::GET
            } else {
                Method::POST
            };
            let r = h.request(method, uri, &extra, form.clone()).await;
            assert_refused(&r, &format!("{uri} with {extra:?}"), "");
        }
    }
    for authorization in [basic("prometheus", SECRET), "Bearer wrong".to_string()] {
        let r = h
            .request(
                Method::GET,
                "/metrics",
                &[("authorization", &authorization)],
                Body::empty(),
            )
            .await;
        assert_refused(&r, &format!("GET /metrics with {authorization}"), "");
    }
}

#[tokio::test]
async fn without_a_configured_credential_nothing_changes() {
    let h = Harness::new(Opts::default()).await;
    let token = h.token(json!({}));
    for req in guarded_requests(&token) {
        let r = send(&h, &req, &[]).await;
        let what = format!("{} {}", req.0, req.1);
        // /v1/authz without a token is the token's 401 (Bearer challenge, empty body).
        if r.status == StatusCode::UNAUTHORIZED {
            assert!(req.1.starts_with("/v1/authz"), "{what}");
            assert_eq!(
                r.header("www-authenticate"),
                Some(r#"Bearer realm="revsync""#)
            );
            assert!(r.body.is_empty(), "{what}");
        }
    }
    let r = h.request(Method::GET, "/metrics", &[], Body::empty()).await;
    assert_eq!(exposed_unauthorized(&r.text()), 0);
}

// ---------------------------------------------------------------------------------------
// The daemon

/// `revsync run` that must exit by itself within 20 s: its exit code and stderr.
fn run_expecting_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = common::daemon::cli_command(&[])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn revsync");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("revsync {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config on `listen`, its store in `dir`, a broker nothing answers at.
fn config_listening_on(dir: &Path, listen: &str, http_extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!(
        "revsync-{}.toml",
        listen.replace([':', '.', '[', ']'], "_")
    ));
    std::fs::write(
        &path,
        format!(
            "[http]\nlisten = \"{listen}\"\n{http_extra}\n\n[store]\npath = \"{}\"\n\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\n[[issuers]]\nissuer = \"https://as.example.com\"\njwks_uri = \"http://127.0.0.1:1/jwks\"\naudiences = [\"{AUD}\"]\n",
            dir.join("store").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_daemon_beyond_loopback_without_a_credential_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    for listen in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        let config = config_listening_on(dir.path(), &listen, "");
        let (code, stderr) = run_expecting_exit(&["run", "--config", config.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{listen}: {stderr}");
        assert!(
            stderr.contains(&format!("{listen} is not a loopback address: set http.credential or http.credential_file (clients send it in X-Revsync-Credential)")),
            "{listen}: {stderr}"
        );
        assert!(stderr.contains("http.listen"), "{stderr}");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nothing listens"
        );
        assert!(!dir.path().join("store").exists(), "nothing was started");
        // `config check` says the same.
        let out = revsync(&["config", "check", config.to_str().unwrap()], &[], None);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("is not a loopback address"));
    }
    // `--listen` and the environment are held to the same rule.
    let loopback = config_listening_on(dir.path(), &format!("127.0.0.1:{port}"), "");
    let wide = format!("0.0.0.0:{port}");
    let (code, stderr) = run_expecting_exit(&[
        "run",
        "--config",
        loopback.to_str().unwrap(),
        "--listen",
        &wide,
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not a loopback address"), "{stderr}");
    let out = Command::new(BIN)
        .args(["config", "check", loopback.to_str().unwrap()])
        .env("REVSYNC_HTTP__LISTEN", &wide)
        .env_remove("REVSYNC_HTTP__CREDENTIAL")
        .env_remove("REVSYNC_HTTP__CREDENTIAL_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a loopback address"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_beyond_loopback_with_a_credential_serves_it() {
    let broker = Broker::memory();
    broker.create_topic(TOPIC, 1);
    let key = TestKey::ec_p256("la-k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let iss = jwks.issuer();
    let dir = tempfile::tempdir().unwrap();
    // A Kubernetes-style secret file: the credential and a newline.
    let secret_file = dir.path().join("credential");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let port = free_port();
    let text = DaemonConfig {
        http_extra: format!("credential_file = \"{}\"\n", secret_file.display()),
        ..DaemonConfig::new(port, dir.path(), &broker, TOPIC).trusting(&jwks, AUD)
    }
    .toml();
    let loopback = format!("listen = \"127.0.0.1:{port}\"");
    assert_eq!(text.matches(&loopback).count(), 1);
    let text = text.replace(&loopback, &format!("listen = \"0.0.0.0:{port}\""));
    let config = dir.path().join("revsync.toml");
    std::fs::write(&config, &text).unwrap();
    let log = dir.path().join("stderr.log");
    let mut daemon = Daemon::spawn_with(&config, port, &[("RUST_LOG", "debug")], &log);

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // Probes are open: ready once caught up and keys loaded.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http.get(daemon.url("/readyz")).send().await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "revsync never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        http.get(daemon.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let token = key.sign(&claims_with(
        &iss,
        AUD,
        json!({"iat": now() - 5, "sub": "alice"}),
    ));
    let check = |credential: Option<&'static str>, token: String| {
        let http = http.clone();
        let url = daemon.url("/v1/check");
        async move {
            let mut req = http.post(url).json(&json!({ "token": token }));
            if let Some(c) = credential {
                req = req.header("x-revsync-credential", c);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let challenge = r
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_string());
            (status, challenge, r.json::<Value>().await.unwrap())
        }
    };
    let (status, challenge, body) = check(None, token.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"error": "unauthorized", "error_description": "missing or wrong X-Revsync-Credential"})
    );
    assert_eq!(
        challenge.as_deref(),
        Some(r#"X-Revsync-Credential realm="revsync""#)
    );
    let (status, _, _) = check(Some("revsync-wrong-credential"), token.clone()).await;
    assert_eq!(status, 401);
    let (status, _, body) = check(Some(SECRET), token.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(body["active"], json!(true), "{body}");
    assert_eq!(body["sub"], json!("alice"));
    let (_, _, body) = check(Some(SECRET), "garbage".into()).await;
    assert_eq!(body, json!({"active": false, "reason": "malformed"}));

    // Prometheus with a bearer token; the two refusals are counted.
    let r = http
        .get(daemon.url("/metrics"))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(exposed_unauthorized(&r.text().await.unwrap()), 2);
    let r = http.get(daemon.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // RFC 7662 client authentication.
    let r = http
        .post(daemon.url("/introspect"))
        .basic_auth("resource-server", Some(SECRET))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["active"], json!(true));

    // The CLI sends the credential it finds in the config file or the environment.
    let base = format!("http://127.0.0.1:{port}");
    let cfg = config.to_str().unwrap();
    let secret_path = secret_file.to_str().unwrap();
    let with_config: &[&str] = &["check", "--url", &base, "--config", cfg];
    let plain: &[&str] = &["check", "--url", &base];
    for (args, env) in [
        (with_config, vec![]),
        (plain, vec![("REVSYNC_CONFIG", cfg)]),
        (plain, vec![("REVSYNC_HTTP__CREDENTIAL", SECRET)]),
        (plain, vec![("REVSYNC_HTTP__CREDENTIAL_FILE", secret_path)]),
    ] {
        let out = revsync(args, &env, Some(&token));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} {env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = revsync(&["check", "--url", &base], &[], Some(&token));
    assert_eq!(out.status.code(), Some(2), "refused without the credential");
    assert!(String::from_utf8_lossy(&out.stdout).contains("unauthorized"));
    let status = format!("{base}/v1/status");
    let out = revsync(&["probe", &status, "--config", cfg], &[], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = revsync(&["probe", &status], &[], None);
    assert_eq!(out.status.code(), Some(1));
    let out = revsync(&["probe", &format!("{base}/readyz")], &[], None);
    assert_eq!(out.status.code(), Some(0), "the readiness probe needs none");
    for out in [
        revsync(
            &["check", "--url", &base, "--config", cfg],
            &[],
            Some(&token),
        ),
        revsync(&["probe", &status, "--config", cfg], &[], None),
    ] {
        assert!(!String::from_utf8_lossy(&out.stdout).contains(SECRET));
        assert!(!String::from_utf8_lossy(&out.stderr).contains(SECRET));
    }
    // `config check` shows the file, never its content.
    let out = revsync(&["config", "check", cfg], &[], None);
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(SECRET));

    assert_eq!(daemon.terminate(Duration::from_secs(15)), Some(0));
    // Debug logs of every request, refused or not: never the credential.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("request refused: missing or wrong credential"),
        "refusals are logged (at debug):\n{log}"
    );
    assert!(!log.contains(SECRET), "a log line carries the credential");
    assert!(!log.contains(&token), "a log line carries a token");
}

/// `app::run` holds the socket it is handed to the rule too (a config built in code is
/// never validated; a host name may resolve anywhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_checks_the_socket_it_is_given() {
    use revsync::app::{self, Listener};
    use tokio_util::sync::CancellationToken;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let config = revsync::config::Config::new("127.0.0.1:1", &store);
    let listener = Listener::bind("0.0.0.0:0").await.unwrap();
    assert!(!listener.is_local());
    let described = listener.describe();
    let err = app::run(config.clone(), listener, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("http.listen = {described} is not a loopback address: set http.credential or http.credential_file (clients send it in X-Revsync-Credential)")
    );
    assert!(!store.exists(), "refused before the store was opened");
    assert!(Listener::bind("127.0.0.1:0").await.unwrap().is_local());

    // With a credential it runs (and stops when told).
    let mut config = config;
    config.http.credential = Some(SECRET.to_string());
    let listener = Listener::bind("0.0.0.0:0").await.unwrap();
    let port: u16 = listener
        .describe()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app::run(config, listener, stop.clone()));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/status");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match http.get(&url).send().await {
            Ok(r) => break r.status(),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(status, 401);
    let r = http
        .get(&url)
        .header("x-revsync-credential", SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    stop.cancel();
    task.await.unwrap().unwrap();
}
