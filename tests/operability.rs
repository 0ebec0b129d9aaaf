//! What an operator relies on, against the real `revsync` binary (with a real Tansu
//! broker and a real JWKS server where it runs the daemon): `config check`, environment
//! overrides, JSON logs that never carry a token, a clean SIGTERM under load, and the
//! metrics README.md promises.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::{free_port, wait_for_port, Broker};
use common::daemon::{cli as revsync, cli_command as command, DaemonConfig};
use common::jwt::{claims_with, now, JwksServer, TestKey};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const AUD: &str = "https://api.example.com";
const TOPIC: &str = "revocations";

// ---------------------------------------------------------------------------------------
// Helpers

/// A minimal valid config for `config check`, with `extra` appended.
fn config_text(extra: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "127.0.0.1:9092"

[[issuers]]
issuer = "https://as.example.com"
audiences = ["https://api.example.com"]
{extra}
"#
    )
}

/// The daemon as a child process: `revsync [--log-json] run --config FILE`, with extra
/// environment, its stderr going to a file. SIGKILLed on drop if still running.
struct Revsync {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Revsync {
    fn spawn(
        config: &Path,
        json_logs: bool,
        env: &[(&str, &str)],
        stderr: &Path,
        listen_port: u16,
    ) -> Self {
        let mut cmd = command(&[("RUST_LOG", "info")]);
        if json_logs {
            cmd.arg("--log-json");
        }
        cmd.args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(stderr).unwrap());
        let child = cmd.spawn().expect("spawn revsync");
        let mut r = Revsync {
            child: Some(child),
            stderr: stderr.to_path_buf(),
        };
        if !wait_for_port(listen_port, Duration::from_secs(20)) {
            r.kill();
            panic!("revsync did not listen on {listen_port}:\n{}", r.log());
        }
        r
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn sigterm(&self) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the exit; `None` if still running after `timeout`.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Revsync {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A broker with the topic, a JWKS server and a config file for the daemon.
struct Setup {
    broker: Broker,
    key: TestKey,
    jwks: JwksServer,
    dir: tempfile::TempDir,
    config: PathBuf,
    http: reqwest::Client,
}

impl Setup {
    async fn new(listen_port: u16, extra_http: &str) -> Self {
        let broker = Broker::memory();
        broker.create_topic(TOPIC, 2);
        let key = TestKey::ec_p256("ops-k1");
        let jwks = JwksServer::with_keys(&[&key]).await;
        let dir = tempfile::tempdir().unwrap();
        let config = DaemonConfig {
            http_extra: extra_http.into(),
            ..DaemonConfig::new(listen_port, dir.path(), &broker, TOPIC).trusting(&jwks, AUD)
        }
        .write(&dir.path().join("revsync.toml"));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        Setup {
            broker,
            key,
            jwks,
            dir,
            config,
            http,
        }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A token of the issuer, issued 5 s ago, with `changes` merged in.
    fn token(&self, changes: Value) -> String {
        let mut c = claims_with(&self.jwks.issuer(), AUD, json!({"iat": now() - 5}));
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        self.key.sign(&c)
    }

    /// `revsync publish KIND --iss <the issuer> WHAT…`; panics unless it exits 0.
    fn publish(&self, kind: &str, what: &[&str]) {
        let bootstrap = self.broker.bootstrap();
        let issuer = self.jwks.issuer();
        let mut args = vec!["publish", "--brokers", &bootstrap, "--topic", TOPIC];
        args.extend_from_slice(&[kind, "--iss", &issuer]);
        args.extend_from_slice(what);
        let out = revsync(&args, &[], None);
        assert!(
            out.status.success(),
            "publish: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn wait_ready(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self
                .http
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "revsync never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn check(&self, port: u16, token: &str) -> Value {
        let r = self
            .http
            .post(format!("http://127.0.0.1:{port}/v1/check"))
            .json(&json!({ "token": token }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    async fn get(&self, port: u16, path: &str) -> reqwest::Response {
        self.http
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap()
    }

    async fn get_json(&self, port: u16, path: &str) -> Value {
        self.get(port, path).await.json().await.unwrap()
    }

    /// Polls `/v1/check` until `token` is revoked.
    async fn await_revoked(&self, port: u16, token: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.check(port, token).await != json!({"active": false, "reason": "revoked"}) {
            assert!(Instant::now() < deadline, "revocation not applied");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Validates `value` against `#/components/schemas/NAME` of schemas/openapi.json.
fn assert_matches_openapi(name: &str, value: &Value) {
    let spec: Value = serde_json::from_str(include_str!("../schemas/openapi.json")).unwrap();
    let schema = json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": spec["components"],
    });
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{name}: {value}: {errors:?}");
}

// ---------------------------------------------------------------------------------------
// revsync config check

#[test]
fn config_check_prints_the_effective_config_redacted_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("revsync.toml");
    let path = file.to_str().unwrap();
    let password = "hunter2-do-not-print";
    std::fs::write(
        &file,
        config_text(&format!(
            "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.username\" = \"revsync\"\n\"sasl.password\" = \"{password}\"\n"
        )),
    )
    .unwrap();
    let out = revsync(
        &["config", "check", path],
        &[("REVSYNC_FRESHNESS__ON_STALE", "allow")],
        None,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "config check failed: {stderr}");
    assert!(
        !stdout.contains(password) && !stderr.contains(password),
        "the password is printed"
    );
    assert!(stderr.contains("config OK"), "{stderr}");
    // The output is the effective config: TOML, defaults filled in, env applied, and the
    // secret replaced.
    let effective: toml::Table = stdout.parse().expect("config check prints TOML");
    assert_eq!(
        effective["kafka"]["properties"]["sasl.password"].as_str(),
        Some("<redacted>")
    );
    assert_eq!(
        effective["kafka"]["properties"]["sasl.username"].as_str(),
        Some("revsync")
    );
    assert_eq!(effective["http"]["listen"].as_str(), Some("127.0.0.1:8181"));
    assert_eq!(effective["kafka"]["fetch_wait_max"].as_str(), Some("10ms"));
    assert_eq!(effective["freshness"]["on_stale"].as_str(), Some("allow"));
    assert_eq!(
        effective["kafka"]["topics"][0]["name"].as_str(),
        Some("revocations")
    );
    // What it prints is itself a valid config.
    let again = dir.path().join("effective.toml");
    std::fs::write(&again, stdout.as_bytes()).unwrap();
    let out = revsync(&["config", "check", again.to_str().unwrap()], &[], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Each broken config exits non-zero with a message naming the key.
    for (what, text, env, names) in [
        (
            "unknown key",
            config_text("[store]\npaht = \"/var/lib/revsync\"\n"),
            None,
            vec!["paht"],
        ),
        (
            "bad duration",
            config_text("[freshness]\nmax_staleness = \"soon\"\n"),
            None,
            vec!["max_staleness", "soon"],
        ),
        (
            "missing kafka.brokers",
            config_text("").replace("brokers = \"127.0.0.1:9092\"\n", ""),
            None,
            vec!["brokers", "kafka"],
        ),
        (
            "empty kafka.brokers",
            config_text("").replace("\"127.0.0.1:9092\"", "\"\""),
            None,
            vec!["kafka.brokers"],
        ),
        (
            "unknown key from the environment",
            config_text(""),
            Some(("REVSYNC_STORE__PAHT", "/x")),
            vec!["paht", "store"],
        ),
    ] {
        std::fs::write(&file, &text).unwrap();
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let out = revsync(&["config", "check", path], &env, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(out.stdout.is_empty(), "{what}: printed a config");
        for name in names {
            assert!(
                stderr.contains(name),
                "{what}: {name} not named in {stderr}"
            );
        }
    }
    let out = revsync(&["config", "check", "/nonexistent/revsync.toml"], &[], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/revsync.toml"));
}

// ---------------------------------------------------------------------------------------
// Environment overrides, JSON logs, no token in any log line

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_override_json_logs_and_no_token_in_the_logs() {
    // The file says one port, the environment another: the environment wins.
    let file_port = free_port();
    let port = free_port();
    let setup = Setup::new(file_port, "").await;
    let stderr = setup.dir.path().join("stderr.log");
    let listen = format!("127.0.0.1:{port}");
    let mut daemon = Revsync::spawn(
        &setup.config,
        true,
        &[
            ("REVSYNC_HTTP__LISTEN", listen.as_str()),
            // Debug everywhere: no dependency may log a token either.
            ("RUST_LOG", "debug"),
        ],
        &stderr,
        port,
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", file_port)).is_err(),
        "the port of the file is not used"
    );
    setup.wait_ready(port).await;

    // Checks of every kind, through every route and the `check` CLI.
    let active = setup.token(json!({"sub": "log-sub", "jti": "log-jti-1"}));
    let revoked = setup.token(json!({"jti": "log-jti-revoked"}));
    let forged =
        TestKey::ec_p256("ops-k1").sign(&claims_with(&setup.jwks.issuer(), AUD, json!({})));
    let unknown_kid =
        TestKey::ec_p256("nope").sign(&claims_with(&setup.jwks.issuer(), AUD, json!({})));
    let garbage = "garbage-token-4f1d9c".to_string();
    setup.publish("token", &["--jti", "log-jti-revoked"]);
    setup.await_revoked(port, &revoked).await;
    let tokens = [&active, &revoked, &forged, &unknown_kid, &garbage];
    let base = format!("http://127.0.0.1:{port}");
    for token in tokens {
        setup.check(port, token).await;
        let r = setup
            .http
            .post(format!("{base}/v1/check"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = setup
            .http
            .post(format!("{base}/introspect"))
            .form(&[("token", token.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = setup
            .http
            .get(format!("{base}/v1/authz/x"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(r.status() == 200 || r.status() == 401);
        // A bad body containing the token.
        let r = setup
            .http
            .post(format!("{base}/v1/check"))
            .body(format!("{{\"token\": \"{token}\""))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let out = revsync(&["check", "--url", &base], &[], Some(token));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(token.as_str())
                && !String::from_utf8_lossy(&out.stderr).contains(token.as_str()),
            "revsync check echoes the token"
        );
    }
    let out = revsync(&["check", "--url", &base], &[], Some(&active));
    assert_eq!(out.status.code(), Some(0), "check CLI: active");
    let out = revsync(&["check", "--url", &base], &[], Some(&revoked));
    assert_eq!(out.status.code(), Some(1), "check CLI: inactive");

    daemon.sigterm();
    let status = daemon.wait(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status:?}");

    let log = daemon.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    let mut started = None;
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["fields"]["message"] == json!("revsync started") {
            started = Some(v);
        }
    }
    let started = started.unwrap_or_else(|| panic!("no start-up line in\n{log}"));
    let fields = &started["fields"];
    assert_eq!(fields["listen"], json!(listen), "{started}");
    assert!(
        fields["topics"].to_string().contains(TOPIC),
        "topics: {started}"
    );
    assert!(
        fields["issuers"].to_string().contains(&setup.jwks.issuer()),
        "issuers: {started}"
    );
    assert!(
        log.contains("SIGTERM received") && log.contains("\"stopped\""),
        "shutdown is logged"
    );
    for token in tokens {
        assert!(!log.contains(token.as_str()), "a log line carries a token");
        if let Some((_, signature)) = token.rsplit_once('.') {
            assert!(
                signature.len() < 16 || !log.contains(signature),
                "a log line carries a signature"
            );
        }
    }
}

/// `log.json` from the file or from `REVSYNC_LOG__JSON` switches to JSON like
/// `--log-json`; text logs to a file carry no terminal colour codes.
#[test]
fn log_format_follows_the_config_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    // With no broker there, stopping would wait for ingest's metadata timeout (5 s).
    let broker = Broker::memory();
    broker.create_topic(TOPIC, 1);
    for (case, log_section, env, json_expected) in [
        ("file", "[log]\njson = true\n", None, true),
        ("env", "", Some(("REVSYNC_LOG__JSON", "true")), true),
        ("default", "", None, false),
    ] {
        let port = free_port();
        // No JWKS server there: the API serves all the same.
        let config = DaemonConfig {
            store: dir.path().join(format!("store-{case}")),
            watermark_interval: None,
            topic: None,
            extra_toml: log_section.into(),
            ..DaemonConfig::new(port, dir.path(), &broker, TOPIC)
        }
        .write(&dir.path().join(format!("{case}.toml")));
        let stderr = dir.path().join(format!("{case}.log"));
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let mut daemon = Revsync::spawn(&config, false, &env, &stderr, port);
        daemon.sigterm();
        let status = daemon.wait(Duration::from_secs(15)).expect("exits");
        assert!(status.success(), "{case}: {status:?}");
        let log = daemon.log();
        assert!(log.contains("revsync started"), "{case}: {log}");
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let is_json = serde_json::from_str::<Value>(line).is_ok();
            assert_eq!(is_json, json_expected, "{case}: {line}");
            assert!(
                !line.contains('\u{1b}'),
                "{case}: colour codes in a file: {line:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// SIGTERM under load

/// One answer read off a raw HTTP/1.1 keep-alive connection.
enum Answer {
    /// A complete response.
    Complete {
        status: u16,
        close: bool,
        body: Vec<u8>,
    },
    /// The connection ended before a single byte of a response: the server did not
    /// take the request (an idle keep-alive connection closed by the drain).
    Nothing(String),
    /// The connection ended in the middle of a response.
    Partial(String),
}

async fn read_answer(conn: &mut BufReader<TcpStream>) -> Answer {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        match conn.read_until(b'\n', &mut head).await {
            Ok(0) if head.is_empty() => return Answer::Nothing("EOF".into()),
            Ok(0) => return Answer::Partial("EOF in the head".into()),
            Err(e) if head.is_empty() => return Answer::Nothing(e.to_string()),
            Err(e) => return Answer::Partial(e.to_string()),
            Ok(_) => {}
        }
        if &head[before..] == b"\r\n" {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let close = header("connection").is_some_and(|v| v == "close");
    let mut body = vec![0; len];
    if let Err(e) = conn.read_exact(&mut body).await {
        return Answer::Partial(format!("body: {e}"));
    }
    Answer::Complete {
        status,
        close,
        body,
    }
}

fn check_request(token: &str) -> Vec<u8> {
    let body = json!({ "token": token }).to_string();
    format!(
        "POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[derive(Default, Debug)]
struct Tally {
    ok_before: usize,
    ok_after: usize,
    /// Requests the server never took (no byte of answer).
    not_taken: Vec<String>,
    /// Anything else: a non-200, an inactive answer, a cut response.
    bad: Vec<String>,
    /// The client ended because connecting was refused (the listener is closed).
    refused: bool,
}

/// Sends checks over one keep-alive connection (reconnecting when the server says
/// `Connection: close` or drops it) until connecting is refused or `deadline`.
async fn load(port: u16, token: String, term: Arc<AtomicBool>, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let request = check_request(&token);
    let mut conn: Option<BufReader<TcpStream>> = None;
    while Instant::now() < deadline {
        if conn.is_none() {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => conn = Some(BufReader::new(s)),
                Err(_) if term.load(Ordering::SeqCst) => {
                    t.refused = true;
                    return t;
                }
                Err(e) => {
                    t.bad.push(format!("connect before SIGTERM: {e}"));
                    return t;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        let after = term.load(Ordering::SeqCst);
        let answer = match c.get_mut().write_all(&request).await {
            Ok(()) => read_answer(c).await,
            Err(e) => Answer::Nothing(format!("write: {e}")),
        };
        match answer {
            Answer::Complete {
                status,
                close,
                body,
            } => {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if status != 200 || v["active"] != json!(true) {
                    t.bad.push(format!("{status} {v}"));
                } else if after {
                    t.ok_after += 1;
                } else {
                    t.ok_before += 1;
                }
                if close {
                    conn = None;
                }
            }
            Answer::Nothing(why) => {
                t.not_taken.push(format!("after SIGTERM: {after}: {why}"));
                conn = None;
            }
            Answer::Partial(why) => {
                t.bad.push(format!("cut response: {why}"));
                conn = None;
            }
        }
    }
    t.bad.push("still served at the deadline".into());
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_answers_and_exits_clean() {
    let started = Instant::now();
    let port = free_port();
    let setup = Setup::new(port, "shutdown_grace = \"5s\"").await;
    let stderr = setup.dir.path().join("stderr.log");
    let mut daemon = Revsync::spawn(&setup.config, false, &[], &stderr, port);
    setup.wait_ready(port).await;
    // One revocation applied, to find in the store afterwards.
    let revoked = setup.token(json!({"jti": "term-jti"}));
    setup.publish("token", &["--jti", "term-jti"]);
    setup.await_revoked(port, &revoked).await;

    let token = setup.token(json!({"sub": "load"}));
    let term = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(15);
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(load(port, token.clone(), term.clone(), deadline)))
        .collect();

    // Two requests in flight across the signal: head and half of the body sent before
    // SIGTERM, the rest after. The drain must wait for them and answer them.
    let body = json!({ "token": token }).to_string();
    let (first, second) = body.split_at(body.len() / 2);
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(
            format!(
                "POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{first}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        slow.push(s);
    }

    tokio::time::sleep(Duration::from_millis(1000)).await;
    term.store(true, Ordering::SeqCst);
    daemon.sigterm();
    let signalled = Instant::now();

    // While the drain waits for the slow requests, new connections are refused.
    let refused_after = loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            break signalled.elapsed();
        }
        assert!(
            signalled.elapsed() < Duration::from_millis(400),
            "still accepting connections 400 ms after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_millis(600).saturating_sub(signalled.elapsed())).await;
    for s in &mut slow {
        s.write_all(second.as_bytes()).await.unwrap();
    }
    for s in slow {
        let mut conn = BufReader::new(s);
        match read_answer(&mut conn).await {
            Answer::Complete {
                status,
                close,
                body,
            } => {
                assert_eq!(status, 200, "in-flight request");
                let v: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["active"], json!(true), "in-flight request: {v}");
                assert_eq!(v["sub"], json!("load"));
                assert!(
                    close,
                    "a draining server closes the connection after answering"
                );
            }
            Answer::Nothing(why) | Answer::Partial(why) => {
                panic!("an in-flight request was dropped: {why}")
            }
        }
    }

    let mut total = Tally::default();
    for c in clients {
        let t = c.await.unwrap();
        total.ok_before += t.ok_before;
        total.ok_after += t.ok_after;
        total.not_taken.extend(t.not_taken);
        total.bad.extend(t.bad);
        assert!(t.refused, "each client ends on a refused connection");
    }
    let status = daemon
        .wait(Duration::from_secs(5))
        .expect("exits within shutdown_grace (5s) of SIGTERM");
    let exited_after = signalled.elapsed();
    let log = daemon.log();
    assert!(status.success(), "exit {status:?}\n{log}");

    assert!(total.bad.is_empty(), "failed requests: {:?}", total.bad);
    assert!(total.ok_before >= 50, "the load was real: {total:?}");
    // A request without any answer was never taken by the server: had it been taken and
    // not answered, the drain would have hit its bound, which the daemon logs.
    assert!(
        !log.contains("did not finish within the grace period"),
        "{log}"
    );
    assert!(total.not_taken.len() <= 16, "{:?}", total.not_taken);

    // The store was flushed and released: it opens again, with the revocation and the
    // positions.
    let out = revsync(
        &[
            "denylist",
            "stats",
            "--store",
            setup.store().to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["entries"]["token"], json!(1), "{stats}");
    assert!(
        stats["positions"].to_string().contains(TOPIC),
        "positions kept: {stats}"
    );
    eprintln!(
        "SIGTERM under load: {} ok before, {} ok after, {} not taken ({:?}); refused after {refused_after:?}, exited after {exited_after:?}; total {:?}",
        total.ok_before,
        total.ok_after,
        total.not_taken.len(),
        total.not_taken,
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// /metrics

/// `name → label names` of every metric in README.md's Metrics section, without the
/// `revsync_` prefix.
fn readme_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("## Metrics")
        .expect("README has a Metrics section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut out = BTreeMap::new();
    for (i, piece) in section.split('`').enumerate() {
        if i % 2 == 0 {
            continue;
        }
        let (name, labels) = match piece.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (piece, ""),
        };
        if !name.contains('_') || name.ends_with('_') {
            continue; // `revsync_`, `sub`, `jti`
        }
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        out.insert(name.to_string(), labels);
    }
    out
}

/// OpenMetrics text → (family → type, sample name → label-name sets).
type Exposition = (
    BTreeMap<String, String>,
    BTreeMap<String, Vec<BTreeSet<String>>>,
);

fn parse_exposition(text: &str) -> Exposition {
    let mut types = BTreeMap::new();
    let mut samples: BTreeMap<String, Vec<BTreeSet<String>>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), ty.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap();
            let name = &line[..name_end];
            let mut labels = BTreeSet::new();
            if line[name_end..].starts_with('{') {
                let close = line.find('}').unwrap();
                for pair in line[name_end + 1..close].split("\",") {
                    if let Some((k, _)) = pair.split_once('=') {
                        labels.insert(k.to_string());
                    }
                }
            }
            samples.entry(name.to_string()).or_default().push(labels);
        }
    }
    (types, samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_the_readme_names_and_no_secrets() {
    let port = free_port();
    let setup = Setup::new(port, "").await;
    let stderr = setup.dir.path().join("stderr.log");
    let mut daemon = Revsync::spawn(&setup.config, false, &[], &stderr, port);
    setup.wait_ready(port).await;

    let sub = "metrics-sub-5e1a";
    let jti = "metrics-jti-77c0";
    let sid = "metrics-sid-3b9d";
    let token = setup.token(json!({"sub": sub, "jti": jti, "sid": sid}));
    assert_eq!(setup.check(port, &token).await["active"], json!(true));
    assert_eq!(setup.check(port, &token).await["active"], json!(true));
    setup.publish("token", &["--jti", jti]);
    setup.publish("subject", &["--sub", "metrics-sub-other"]);
    setup.await_revoked(port, &token).await;
    setup.check(port, "garbage-metrics-token-0d2e").await;
    // A malformed record (carrying a jti, which must not reach a label either).
    let kafka = revsync::config::KafkaConfig::new(setup.broker.bootstrap());
    tokio::task::spawn_blocking(move || {
        let p = revsync::publish::Publisher::new(&kafka, TOPIC).unwrap();
        // A revocation with an unusable optional field (applied; the field is counted),
        // then a malformed one, on the same key: counted in that order.
        p.send_raw(
            "k",
            br#"{"v":1,"id":"m1","type":"token","iss":"https://other.example","jti":"metrics-jti-lenient","event_time":1,"reason":""}"#,
        )
        .unwrap();
        p.send_raw(
            "k",
            br#"{"v":1,"type":"token","jti":"metrics-jti-malformed"}"#,
        )
        .unwrap();
        p.finish(Duration::from_secs(10)).unwrap();
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let malformed = loop {
        let text = setup.get(port, "/metrics").await.text().await.unwrap();
        if text.contains("revsync_events_malformed_total{") {
            break text;
        }
        assert!(Instant::now() < deadline, "malformed record not counted");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(!malformed.contains("metrics-jti-malformed"));

    let resp = setup.get(port, "/metrics").await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    let (types, samples) = parse_exposition(&text);

    let documented = readme_metrics();
    assert!(documented.len() >= 17, "parsed README: {documented:?}");
    // Only at its first occurrence, which Tansu never causes (README, Known limitations):
    // its labels (topic, partition) are not known before the partitions are assigned.
    let on_first_occurrence = ["offset_resets_total"];
    for (name, labels) in &documented {
        let full = format!("revsync_{name}");
        let family = full.strip_suffix("_total").unwrap_or(&full);
        let Some(ty) = types.get(family) else {
            assert!(
                on_first_occurrence.contains(&name.as_str()),
                "{full} (README) is not exposed:\n{text}"
            );
            continue;
        };
        let sample_names: Vec<String> = if ty == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{full}{s}"))
                .collect()
        } else {
            vec![full.clone()]
        };
        if name.ends_with("_total") {
            assert_eq!(ty, "counter", "{full}");
        }
        let seen: Vec<&BTreeSet<String>> = sample_names
            .iter()
            .filter_map(|s| samples.get(s))
            .flatten()
            .collect();
        // After an applied event, a malformed one and a check, every one has a sample.
        assert!(!seen.is_empty(), "{full} has no sample:\n{text}");
        for set in seen {
            let mut set = set.clone();
            set.remove("le");
            assert_eq!(&set, labels, "labels of {full}");
        }
    }
    assert!(text
        .contains(r#"revsync_checks_total{route="check",outcome="inactive",reason="revoked"} 1"#));
    // Two revocations, and the one with an unusable reason (its entry already lapsed).
    assert!(text.contains(&format!(
        "revsync_events_applied_total{{topic=\"{TOPIC}\",format=\"native\"}} 3"
    )));
    assert!(text.contains(&format!(
        "revsync_event_fields_ignored_total{{topic=\"{TOPIC}\",format=\"native\",field=\"reason\"}} 1"
    )));
    assert!(text.contains(r#"revsync_denylist_entries{kind="token"} 1"#));
    for secret in [token.as_str(), sub, jti, sid, "garbage-metrics-token-0d2e"] {
        assert!(!text.contains(secret), "/metrics carries {secret:.24}");
    }
    let signature = token.rsplit_once('.').unwrap().1;
    assert!(!text.contains(signature));

    // The real daemon's status and readiness (with real partitions) match the OpenAPI spec.
    let status = setup.get_json(port, "/v1/status").await;
    assert_eq!(
        status["partitions"].as_array().unwrap().len(),
        2,
        "{status}"
    );
    assert_matches_openapi("Status", &status);
    assert_matches_openapi("Readiness", &setup.get_json(port, "/readyz").await);

    daemon.sigterm();
    assert!(daemon
        .wait(Duration::from_secs(15))
        .is_some_and(|s| s.success()));
}
