//! `deploy/nginx/revsync.conf` works as documented, with a real nginx (Debian's, as
//! `.ci/run` installs it) in front of a tiny upstream that echoes what it received, the
//! real `revsync` binary, a real JWKS server and a real Tansu broker. The config is the
//! deploy file itself, with only its three ports replaced and its X-Revsync-Credential
//! line uncommented: revsync runs with `http.credential`. It keeps the same forward-auth
//! contract as Caddy (tests/common/proxy.rs), then what is nginx's own.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::{free_port, wait_for_port};
use common::jwt::now;
use proxy::{forward_auth_contract, request, request_as, Stack};
use serde_json::json;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_with_the_deploy_config() {
    let started = Instant::now();
    let mut stack = Stack::start(&format!("credential = \"{CREDENTIAL}\"")).await;
    let port = free_port();
    let nginx = Nginx::start(
        &stack.proxy_dir("nginx"),
        port,
        stack.revsync_port,
        stack.upstream.port,
    );
    let url = format!("http://127.0.0.1:{port}/api/orders?x=1");

    // Good, spoofed, missing, revoked: the contract every proxy config keeps.
    forward_auth_contract(&stack, "nginx", &url).await;

    let http = stack.http.clone();
    let alice = stack.token(json!({"sub": "alice", "client_id": "app-1"}));
    // revsync refuses a request without the credential: nginx is what sends it.
    let direct = http
        .get(stack.daemon.url("/v1/authz"))
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
    assert_eq!(a.body["x-auth-subject"], json!("alice"));
    let allowed = stack.upstream.hits();

    // Not a bearer token: 401.
    let a = request(&http, &url, &[("authorization", "Basic dXNlcjpwYXNz")]).await;
    assert_eq!(a.status, 401);
    // Garbage, expired, foreign audience: 401 invalid_token.
    let t = now();
    for (bad, reason) in [
        ("garbage".to_string(), "malformed"),
        (
            stack.token(json!({"exp": t - 120, "iat": t - 400})),
            "expired",
        ),
        (
            stack.token(json!({"aud": "https://elsewhere"})),
            "wrong_audience",
        ),
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
        stack.upstream.hits(),
        allowed,
        "denied requests never reach upstream"
    );

    // revsync gone: nginx fails closed with 503, the upstream is not reached.
    assert_eq!(stack.daemon.terminate(Duration::from_secs(15)), Some(0));
    let a = request_as(&http, &url, &alice, &[]).await;
    assert_eq!(a.status, 503, "revsync down: {}", a.body);
    assert_eq!(stack.upstream.hits(), allowed);

    let log = nginx.error_log();
    assert!(!log.contains("[emerg]"), "{log}");
    eprintln!("nginx: total {:?}", started.elapsed());
}
