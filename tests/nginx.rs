//! `deploy/nginx/revsync.conf` works as documented, with a real nginx (Debian's, as
//! `.ci/run` installs it) in front of a tiny upstream that echoes what it received, the
//! real `revsync` binary, a real JWKS server and a real Tansu broker. The config is the
//! deploy file itself, with only its three ports replaced and its X-Revsync-Credential
//! line uncommented: revsync runs with `http.credential`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::any;
use axum::{Json, Router};
use common::broker::{free_port, wait_for_port, Broker};
use common::daemon::{self, Daemon, DaemonConfig};
use common::jwt::{claims_with, now, JwksServer, TestKey};
use serde_json::{json, Value};

const AUD: &str = "https://api.example.com";
const TOPIC: &str = "revocations";
const DEPLOY_CONF: &str = include_str!("../deploy/nginx/revsync.conf");
/// `http.credential` of the daemon, put in the deploy file's commented line.
const CREDENTIAL: &str = "nginx-test-credential-0123";

fn nginx_bin() -> PathBuf {
    std::env::var_os("REVSYNC_NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// A real nginx serving the deploy config, run in the foreground; stopped on drop.
struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
}

impl Nginx {
    /// `deploy/nginx/revsync.conf` with revsync at `revsync_port`, the upstream API at
    /// `upstream_port`, listening on 127.0.0.1:`port`, sending [`CREDENTIAL`]; wrapped in
    /// the `events`/`http` blocks of a main config whose logs and temp paths all live in
    /// `dir`.
    fn start(dir: &Path, port: u16, revsync_port: u16, upstream_port: u16) -> Self {
        let mut site = DEPLOY_CONF.to_string();
        for (from, to) in [
            (
                "server 127.0.0.1:8181;",
                format!("server 127.0.0.1:{revsync_port};"),
            ),
            ("listen 8080;", format!("listen 127.0.0.1:{port};")),
            (
                "proxy_pass http://127.0.0.1:9000;",
                format!("proxy_pass http://127.0.0.1:{upstream_port};"),
            ),
            (
                "# proxy_set_header X-Revsync-Credential \"REPLACE-WITH-http.credential\";",
                format!("proxy_set_header X-Revsync-Credential \"{CREDENTIAL}\";"),
            ),
        ] {
            assert_eq!(
                site.matches(from).count(),
                1,
                "deploy/nginx/revsync.conf has `{from}` exactly once"
            );
            site = site.replace(from, &to);
        }
        let d = dir.display();
        // Workers run as root only when the test does (as in CI); otherwise nginx warns
        // that `user` is ignored and runs them as the current user. Either way they can
        // reach the temp paths inside the test's private directory.
        let conf = format!(
            "user root;\n\
             worker_processes 1;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             access_log {d}/access.log;\n\
             client_body_temp_path {d}/client_body;\n\
             proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             {site}\n\
             }}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let error_log = dir.join("error.log");
        let globals = format!(
            "daemon off; pid {d}/nginx.pid; error_log {} info;",
            error_log.display()
        );
        let command = || {
            let mut cmd = Command::new(nginx_bin());
            cmd.arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(&error_log)
                .arg("-c")
                .arg(&conf_path)
                .args(["-g", &globals]);
            cmd
        };
        let test = command().arg("-t").output().unwrap_or_else(|e| {
            panic!(
                "cannot run {} (run .ci/run, or apt-get install nginx): {e}",
                nginx_bin().display()
            )
        });
        assert!(
            test.status.success(),
            "nginx -t refuses the config: {}",
            String::from_utf8_lossy(&test.stderr)
        );
        let child = command().stdin(Stdio::null()).spawn().expect("spawn nginx");
        let nginx = Nginx {
            child: Some(child),
            dir: dir.to_path_buf(),
        };
        if !wait_for_port(port, Duration::from_secs(10)) {
            panic!("nginx did not listen on {port}:\n{}", nginx.error_log());
        }
        nginx
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // TERM: the master stops its workers (a KILLed master would leave them).
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The protected API: answers every request with the identity headers it received.
struct Upstream {
    port: u16,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        async fn echo(State(hits): State<Arc<AtomicUsize>>, headers: HeaderMap) -> Json<Value> {
            hits.fetch_add(1, Ordering::SeqCst);
            let h = |name: &str| {
                headers
                    .get(name)
                    .map(|v| json!(v.to_str().unwrap()))
                    .unwrap_or(Value::Null)
            };
            Json(json!({
                "upstream": true,
                "x-auth-subject": h("x-auth-subject"),
                "x-auth-client-id": h("x-auth-client-id"),
                "x-auth-scope": h("x-auth-scope"),
                "x-auth-issuer": h("x-auth-issuer"),
                "x-revsync-credential": h("x-revsync-credential"),
            }))
        }
        let app = Router::new().fallback(any(echo)).with_state(hits.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { port, hits, task }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    body: Value,
}

async fn request(http: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Answer {
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
async fn request_as(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_with_the_deploy_config() {
    let started = Instant::now();
    let broker = Broker::memory();
    broker.create_topic(TOPIC, 1);
    let key = TestKey::ec_p256("nginx-k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let iss = jwks.issuer();
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let revsync_port = free_port();
    let config = DaemonConfig {
        http_extra: format!("credential = \"{CREDENTIAL}\""),
        ..DaemonConfig::new(revsync_port, dir.path(), &broker, TOPIC).trusting(&jwks, AUD)
    }
    .write(&dir.path().join("revsync.toml"));
    let mut daemon = Daemon::spawn(&config, revsync_port);
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir(&nginx_dir).unwrap();
    let port = free_port();
    let nginx = Nginx::start(&nginx_dir, port, revsync_port, upstream.port);
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/api/orders?x=1");

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

    let token = |changes: Value| {
        let mut c = claims_with(&iss, AUD, json!({"iat": now() - 5}));
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        key.sign(&c)
    };

    // A valid token reaches the upstream, with the identity headers of its claims.
    let alice = token(json!({
        "sub": "alice", "client_id": "app-1", "scope": "read write", "jti": "nginx-jti-1",
    }));
    let a = request_as(&http, &url, &alice, &[]).await;
    assert_eq!(a.status, 200, "valid token: {}", a.body);
    assert_eq!(
        a.body,
        json!({
            "upstream": true,
            "x-auth-subject": "alice",
            "x-auth-client-id": "app-1",
            "x-auth-scope": "read write",
            "x-auth-issuer": iss,
            "x-revsync-credential": null,
        })
    );
    // revsync refuses a request without the credential: nginx is what sends it.
    let direct = http
        .get(daemon.url("/v1/authz"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401);
    // A client's own X-Revsync-Credential is replaced on the way to revsync (the request
    // still passes) and reaches the upstream as the client sent it, never as the secret.
    let a = request_as(
        &http,
        &url,
        &alice,
        &[("x-revsync-credential", "client-guess")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["x-revsync-credential"], json!("client-guess"));
    // Identity headers the client sends itself are replaced, or dropped when the token
    // has no such claim: the upstream can trust them.
    let spoofed = [
        ("x-auth-subject", "mallory"),
        ("X-Auth-Issuer", "https://evil.example.com"),
    ];
    let a = request_as(&http, &url, &alice, &spoofed).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["x-auth-subject"], json!("alice"));
    assert_eq!(a.body["x-auth-issuer"], json!(iss));
    let anonymous_client = token(json!({"sub": "bob", "client_id": null}));
    let spoofed = [
        ("x-auth-client-id", "spoofed-client"),
        ("x-auth-scope", "admin"),
    ];
    let a = request_as(&http, &url, &anonymous_client, &spoofed).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["x-auth-subject"], json!("bob"));
    assert_eq!(a.body["x-auth-client-id"], Value::Null);
    assert_eq!(a.body["x-auth-scope"], Value::Null);
    let allowed = upstream.hits();
    assert_eq!(allowed, 4);

    // No token: 401 with revsync's challenge, upstream untouched.
    let a = request(&http, &url, &[]).await;
    assert_eq!(a.status, 401);
    assert_eq!(
        a.www_authenticate.as_deref(),
        Some(r#"Bearer realm="revsync""#)
    );
    let a = request(&http, &url, &[("authorization", "Basic dXNlcjpwYXNz")]).await;
    assert_eq!(a.status, 401);

    // Garbage, expired, foreign audience: 401 invalid_token.
    let t = now();
    for (bad, reason) in [
        ("garbage".to_string(), "malformed"),
        ("a.b.c".to_string(), "malformed"),
        (token(json!({"exp": t - 120, "iat": t - 400})), "expired"),
        (token(json!({"aud": "https://elsewhere"})), "wrong_audience"),
    ] {
        let a = request_as(&http, &url, &bad, &[]).await;
        assert_eq!(a.status, 401, "{reason}");
        let challenge = a.www_authenticate.expect("WWW-Authenticate passed through");
        assert!(
            challenge.contains(r#"error="invalid_token""#) && challenge.contains(reason),
            "{challenge}"
        );
    }
    assert_eq!(
        upstream.hits(),
        allowed,
        "denied requests never reach upstream"
    );

    // Revoked with the CLI: 401 once the event is applied (polled through nginx).
    daemon::publish(
        &broker,
        TOPIC,
        &["token", "--iss", &iss, "--jti", "nginx-jti-1"],
    );
    let published = Instant::now();
    let revoked_after = loop {
        let a = request_as(&http, &url, &alice, &[]).await;
        if a.status == 401 {
            let challenge = a.www_authenticate.unwrap();
            assert!(
                challenge.contains(r#"error_description="revoked""#),
                "{challenge}"
            );
            break published.elapsed();
        }
        assert_eq!(a.status, 200, "before revocation: {}", a.body);
        assert!(
            published.elapsed() < Duration::from_secs(20),
            "the revocation never reached nginx"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let hits = upstream.hits();
    let a = request_as(&http, &url, &alice, &[]).await;
    assert_eq!(a.status, 401);
    // Other tokens are unaffected.
    let a = request_as(&http, &url, &anonymous_client, &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(upstream.hits(), hits + 1);

    // revsync gone: nginx fails closed with 503, the upstream is not reached.
    assert_eq!(daemon.terminate(Duration::from_secs(15)), Some(0));
    let a = request_as(&http, &url, &anonymous_client, &[]).await;
    assert_eq!(a.status, 503, "revsync down: {}", a.body);
    assert_eq!(upstream.hits(), hits + 1);

    let log = nginx.error_log();
    assert!(!log.contains("[emerg]"), "{log}");
    eprintln!(
        "nginx: revoked through nginx {revoked_after:?} after publish; total {:?}",
        started.elapsed()
    );
}
