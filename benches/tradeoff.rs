//! The trade-off benchmark (issue 7): one command, one machine, one run, side by side.
//!
//! ```text
//! cargo bench --bench tradeoff                      # full run (~10 min; 10M preload ~3 min)
//! REVSYNC_BENCH_SECS=1 REVSYNC_BENCH_WARMUP=0.3 REVSYNC_BENCH_MIXED_SECS=10 \
//!   REVSYNC_BENCH_REVOCATIONS=200 REVSYNC_BENCH_SCALE=100000,1000000 \
//!   REVSYNC_BENCH_LOOKUPS=200000 cargo bench --bench tradeoff          # short run
//! ```
//!
//! Parts (`REVSYNC_BENCH_PARTS`, default `check,introspection,propagation,mixed,scale`):
//!
//! - **check**: HTTP/1.1 keep-alive on loopback, concurrency 1 and 16, fixed duration per
//!   run: the floor (an empty axum handler on the same runtime), and the real daemon
//!   (`revsync::app::run`, fed by a real Tansu broker) answering `POST /v1/check` for a
//!   repeated token, first-seen RS256 and ES256 tokens (single use, minted before the
//!   run), and a revoked token.
//! - **introspection**: the RFC 7662 endpoint of a real authorization server,
//!   `oidc-provider` pinned in `benches/introspection/` (`npm ci` there when
//!   `node_modules` is missing), with a pool of valid opaque client_credentials tokens
//!   minted through its token endpoint; each answer must say `"active":true`.
//! - **propagation**: publish a revocation → the check answers `revoked`, one at a time.
//! - **mixed**: checks at concurrency 16 while events are published at ≥ 10k/s through the
//!   broker into the same daemon: check latency, errors, achieved ingest rate.
//! - **scale**: in a child process per size (so sizes don't pollute each other's RSS):
//!   preload N live token entries through `Denylist::apply` in batches of 10k, then
//!   `Denylist::revoked_by` per-call cost and VmRSS; then start-up time of
//!   `Denylist::open` on a 1M-entry store written by a previous child.
//!
//! Environment (all optional):
//! - `REVSYNC_BENCH_SECS` (5), `REVSYNC_BENCH_WARMUP` (1): seconds per check run;
//! - `REVSYNC_BENCH_CONCURRENCY` (`1,16`);
//! - `REVSYNC_BENCH_REVOKED` (10000): token revocations published before the check runs;
//! - `REVSYNC_BENCH_INTROSPECTION_TOKENS` (1000): opaque tokens minted for introspection;
//! - `REVSYNC_BENCH_REVOCATIONS` (1000): propagation samples;
//! - `REVSYNC_BENCH_MIXED_SECS` (60), `REVSYNC_BENCH_INGEST_RATE` (11000 events/s);
//! - `REVSYNC_BENCH_SCALE` (`100000,1000000,10000000`), `REVSYNC_BENCH_LOOKUPS`
//!   (1000000 per size), `REVSYNC_BENCH_STARTUP` (1000000; 0 skips);
//! - `REVSYNC_BENCH_NODE` (`node`), `REVSYNC_TANSU` (else the `.ci/run` cache, else `tansu`
//!   on PATH).
//!
//! Prints a Markdown report (machine, exact command, tables, each issue target met or
//! missed and by how much) and writes it to `target/tradeoff-results.md`. Fails only when
//! an answer is wrong (a broken path must not produce a fast figure), except in the mixed
//! part, where wrong answers are what is being counted.

#[path = "../tests/common/broker.rs"]
#[allow(dead_code)]
mod broker;
#[path = "support/check_env.rs"]
mod check_env;
#[path = "support/host.rs"]
mod host;
#[path = "support/http_client.rs"]
mod http_client;
#[path = "support/workload.rs"]
mod workload;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use broker::Broker;
use check_env::{
    claims, judge, mint, serve_jwks, BenchKey, Expect, CLIENT_THREADS, SERVER_THREADS,
};
use host::{cpu_model, env_count, env_f64, env_list, loadavg, proc_status_kib};
use http_client::{contains, run_load, Client, Load, LoadSpec, Step};
use revsync::app::{self, Listener};
use revsync::config::{Config, KafkaConfig, StoreConfig};
use revsync::denylist::{Denylist, TokenRef};
use revsync::dev::{issuer_router, DemoIssuer};
use revsync::event::{Event, Revocation};
use revsync::publish::Publisher;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use workload::{
    apply_batches, id_of, mixed_revocation, retention, token_event, LookupMix, BATCH, NS_TOKEN,
};

/// The default topic of `KafkaConfig::new`, which the daemon reads.
const TOPIC: &str = "revocations";
const PARTITIONS: i32 = 3;
/// Lifetime of the bench issuer's tokens.
const TOKEN_SECS: u64 = 7200;
const CHILD_ENV: &str = "REVSYNC_TRADEOFF_CHILD";
const PROBE_TOKENS: usize = 2_000;
const PROBE_SECS: f64 = 0.5;
const MIXED_TOKENS: usize = 1_000;
const ALL_PARTS: &str = "check,introspection,propagation,mixed,scale";

// ---------------------------------------------------------------------------------------
// Environment

struct Settings {
    parts: Vec<String>,
    warmup: Duration,
    measure: Duration,
    concurrency: Vec<usize>,
    revoked: usize,
    introspection_tokens: usize,
    revocations: usize,
    mixed: Duration,
    ingest_rate: f64,
    scale: Vec<usize>,
    lookups: usize,
    startup: usize,
    node: String,
    cores: usize,
}

impl Settings {
    fn from_env() -> Self {
        Settings {
            parts: std::env::var("REVSYNC_BENCH_PARTS")
                .unwrap_or_else(|_| ALL_PARTS.into())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            warmup: Duration::from_secs_f64(env_f64("REVSYNC_BENCH_WARMUP", 1.0)),
            measure: Duration::from_secs_f64(env_f64("REVSYNC_BENCH_SECS", 5.0)),
            concurrency: env_list("REVSYNC_BENCH_CONCURRENCY", &[1, 16]),
            revoked: env_count("REVSYNC_BENCH_REVOKED").unwrap_or(10_000).max(1),
            introspection_tokens: env_count("REVSYNC_BENCH_INTROSPECTION_TOKENS")
                .unwrap_or(1_000)
                .max(1),
            revocations: env_count("REVSYNC_BENCH_REVOCATIONS").unwrap_or(1_000),
            mixed: Duration::from_secs_f64(env_f64("REVSYNC_BENCH_MIXED_SECS", 60.0)),
            ingest_rate: env_f64("REVSYNC_BENCH_INGEST_RATE", 11_000.0),
            scale: env_list("REVSYNC_BENCH_SCALE", &[100_000, 1_000_000, 10_000_000]),
            lookups: env_count("REVSYNC_BENCH_LOOKUPS").unwrap_or(1_000_000),
            startup: env_count("REVSYNC_BENCH_STARTUP").unwrap_or(1_000_000),
            node: std::env::var("REVSYNC_BENCH_NODE").unwrap_or_else(|_| "node".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    fn wants(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }

    fn max_concurrency(&self) -> usize {
        self.concurrency.iter().copied().max().unwrap_or(1)
    }
}

fn command_line() -> String {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("REVSYNC_BENCH_") || k == "REVSYNC_TANSU")
        .collect();
    vars.sort();
    let mut s = String::new();
    for (k, v) in vars {
        let _ = write!(s, "{k}={v} ");
    }
    s.push_str("cargo bench --bench tradeoff");
    s
}

fn read_file_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn mem_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0 / 1024.0)
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target"))
}

// ---------------------------------------------------------------------------------------
// Verdicts

/// `value` must be at most `goal`.
fn at_most(value: f64, goal: f64) -> String {
    if !value.is_finite() {
        "not measured".into()
    } else if value <= goal {
        format!("met ({:.0}% below the goal)", (1.0 - value / goal) * 100.0)
    } else {
        format!("**MISSED** by {:.0}%", (value / goal - 1.0) * 100.0)
    }
}

/// `value` must be at least `goal`.
fn at_least(value: f64, goal: f64) -> String {
    if !value.is_finite() {
        "not measured".into()
    } else if value >= goal {
        format!("met ({:.2}x the goal)", value / goal)
    } else {
        format!(
            "**MISSED** by {:.0}% ({:.2}x the goal)",
            (1.0 - value / goal) * 100.0,
            value / goal
        )
    }
}

fn fmt_us(us: f64) -> String {
    if !us.is_finite() {
        "-".into()
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("-".into(), f)
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process killed (by its own id) and reaped on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The daemon environment: broker, issuers, floor, revsync::app::run

struct Daemon {
    floor: SocketAddr,
    api: SocketAddr,
    bench_iss: String,
    rsa: BenchKey,
    ec: BenchKey,
    demo: Arc<DemoIssuer>,
    demo_iss: String,
    publisher: Publisher,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _broker: Broker,
    _dir: tempfile::TempDir,
}

async fn serve_floor() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/empty", post(check_env::empty));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn revocation_event(id: String, revocation: Revocation) -> Event {
    Event {
        id,
        event_time: revsync::unix_now(),
        revocation,
        reason: None,
    }
}

/// GET `path` on `addr` as JSON.
fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let mut c = Client::connect(addr).map_err(|e| e.to_string())?;
    let (status, body) = c
        .request("GET", path, &[], b"")
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{path}: status {status}"));
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Sum of the applied positions of the revocations topic, from `/v1/status`.
fn applied(status: &Value) -> i64 {
    status["partitions"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["topic"] == TOPIC)
                .map(|p| p["position"].as_i64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

fn total_lag(status: &Value) -> i64 {
    status["partitions"]
        .as_array()
        .map(|ps| ps.iter().map(|p| p["lag"].as_i64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

/// One check of `bearer` on the daemon: status and body.
fn check_once(c: &mut Client, bearer: &str) -> Result<(u16, Vec<u8>), String> {
    c.request("POST", "/v1/check", &[("Authorization", bearer)], b"")
        .map(|(s, b)| (s, b.to_vec()))
        .map_err(|e| e.to_string())
}

impl Daemon {
    fn start(rt: &tokio::runtime::Runtime, s: &Settings) -> Daemon {
        let t = Instant::now();
        // Tansu with in-memory storage on a free loopback port, topic `revocations`.
        let broker = Broker::memory();
        broker.create_topic(TOPIC, PARTITIONS);
        let brokers = broker.bootstrap();
        let rsa = BenchKey::rsa("bench-rsa");
        let ec = BenchKey::p256("bench-ec");
        let (floor, bench, demo, demo_iss) = rt.block_on(async {
            let floor = serve_floor().await;
            let bench = serve_jwks(&[&rsa, &ec]).await;
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let demo_iss = format!("http://{}", l.local_addr().unwrap());
            let demo = Arc::new(DemoIssuer::generate(demo_iss.clone()).unwrap());
            let router = issuer_router(demo.clone());
            tokio::spawn(async move { axum::serve(l, router).await });
            (floor, bench, demo, demo_iss)
        });
        let bench_iss = bench.issuer.clone();

        // Background revocations (the revoked scenario's jti among them), published before
        // the daemon starts: it reads them from the earliest offset.
        let publisher =
            Publisher::new(&KafkaConfig::new(brokers.clone()), TOPIC).expect("publisher");
        let exp = revsync::unix_now() + 7200;
        for i in 0..s.revoked {
            let jti = if i == 0 {
                "revoked-0".to_string()
            } else {
                id_of(NS_TOKEN, i as u64)
            };
            publisher
                .send(&revocation_event(
                    format!("bg-{i}"),
                    Revocation::Token {
                        iss: bench_iss.clone(),
                        jti,
                        exp: Some(exp),
                    },
                ))
                .expect("publish");
        }
        publisher
            .finish(Duration::from_secs(60))
            .expect("background revocations acknowledged");

        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(brokers, dir.path().join("store"));
        config.issuers = vec![bench, demo.config()];
        let stop = CancellationToken::new();
        let (api, task) = rt.block_on(async {
            let listener = Listener::bind("127.0.0.1:0").await.unwrap();
            let api: SocketAddr = listener.describe().parse().unwrap();
            (api, tokio::spawn(app::run(config, listener, stop.clone())))
        });

        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = Client::connect(api)
                .ok()
                .and_then(|mut c| c.request("GET", "/readyz", &[], b"").ok().map(|r| r.0))
                == Some(200);
            if ready {
                if let Ok(st) = get_json(api, "/v1/status") {
                    if applied(&st) >= s.revoked as i64 {
                        break;
                    }
                }
            }
            assert!(!task.is_finished(), "the daemon stopped during start-up");
            assert!(
                Instant::now() < deadline,
                "daemon not ready with {} revocations applied after 120 s",
                s.revoked
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "[set-up] Tansu on {}, daemon on {api}, {} background revocations applied, in {:.1} s",
            broker.port,
            s.revoked,
            t.elapsed().as_secs_f64()
        );
        Daemon {
            floor,
            api,
            bench_iss,
            rsa,
            ec,
            demo,
            demo_iss,
            publisher,
            stop,
            task: Some(task),
            _broker: broker,
            _dir: dir,
        }
    }

    fn shutdown(mut self, rt: &tokio::runtime::Runtime) {
        let _ = self.publisher.finish(Duration::from_secs(10));
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await });
        }
    }

    /// The value of the first `/metrics` sample whose name contains `name` (soft: the
    /// metric names belong to src/metrics.rs).
    fn metric(&self, name: &str) -> Option<f64> {
        let mut c = Client::connect(self.api).ok()?;
        let (status, body) = c.request("GET", "/metrics", &[], b"").ok()?;
        if status != 200 {
            return None;
        }
        String::from_utf8_lossy(body)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|n| n.contains(name))
            })
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    }
}

// ---------------------------------------------------------------------------------------
// Results

struct Row {
    part: &'static str,
    scenario: String,
    load: Load,
    note: String,
}

struct Target {
    goal: String,
    measured: String,
    verdict: String,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    ratios: Vec<(String, String)>,
    propagation: Vec<(String, String)>,
    mixed: Vec<(String, String)>,
    scale: Vec<Value>,
    startup: Option<Value>,
    targets: Vec<Target>,
    notes: Vec<String>,
    versions: Vec<String>,
}

impl Report {
    fn find(&self, part: &str, scenario: &str, c: usize) -> Option<&Load> {
        self.rows
            .iter()
            .find(|r| r.part == part && r.scenario == scenario && r.load.concurrency == c)
            .map(|r| &r.load)
    }

    fn target(&mut self, goal: impl Into<String>, measured: impl Into<String>, verdict: String) {
        self.targets.push(Target {
            goal: goal.into(),
            measured: measured.into(),
            verdict,
        });
    }

    /// Prints a measured run, asserts it had no error, and adds it to the table.
    fn add_run(&mut self, part: &'static str, scenario: &str, load: Load, note: String) {
        print_load(part, scenario, &load);
        assert_clean(part, scenario, &load);
        self.rows.push(Row {
            part,
            scenario: scenario.into(),
            load,
            note,
        });
    }
}

fn print_load(part: &str, scenario: &str, l: &Load) {
    eprintln!(
        "[{part}] {scenario:<34} c={:<3} {:>9.0} req/s  p50 {:>9}  p99 {:>9}  ({} ok, {} errors{})",
        l.concurrency,
        l.rps(),
        fmt_us(l.pct_us(0.50)),
        fmt_us(l.pct_us(0.99)),
        l.ok,
        l.errors,
        l.exhausted_at.map_or(String::new(), |t| format!(
            ", pool ran out {t:.2} s into the window"
        ))
    );
}

fn assert_clean(part: &str, scenario: &str, l: &Load) {
    assert!(
        l.errors == 0 && l.ok > 0,
        "{part} / {scenario} c={}: {} ok, {} errors; first error: {}",
        l.concurrency,
        l.ok,
        l.errors,
        l.first_error.as_deref().unwrap_or("-")
    );
}

// ---------------------------------------------------------------------------------------
// Part: check

fn http_step(c: &mut Client, path: &str, bearer: &str, expect: Expect) -> Step {
    match c.request("POST", path, &[("Authorization", bearer)], b"") {
        Ok((status, body)) => judge(expect, status, body).map_or_else(Step::Err, |()| Step::Ok),
        Err(e) => Step::Err(e.to_string()),
    }
}

fn srv_cpu() -> u64 {
    host::threads_cpu_ns(SERVER_THREADS)
}

/// A closed-loop run of the bench's clients, measuring the server threads' CPU.
fn check_load(
    addr: SocketAddr,
    c: usize,
    warmup: Duration,
    measure: Duration,
) -> LoadSpec<'static> {
    LoadSpec::new(addr, c, warmup, measure, CLIENT_THREADS).server_cpu(&srv_cpu)
}

/// `Bearer …` values of `n` unique tokens of the bench issuer.
fn mint_bearers(d: &Daemon, key: &BenchKey, prefix: &str, n: usize, cores: usize) -> Vec<String> {
    mint(key, &d.bench_iss, prefix, n, TOKEN_SECS, cores, "Bearer ")
}

fn part_check(d: &Daemon, s: &Settings, report: &mut Report) {
    let bearer = |jti: &str| {
        format!(
            "Bearer {}",
            d.rsa.sign(&claims(&d.bench_iss, jti, TOKEN_SECS))
        )
    };
    let (repeated, revoked) = (bearer("repeated-1"), bearer("revoked-0"));
    {
        let mut c = Client::connect(d.api).unwrap();
        let (st, body) = check_once(&mut c, &revoked).unwrap();
        assert!(
            judge(Expect::Revoked, st, &body).is_ok(),
            "revoked token not revoked: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let fixed: [(&str, SocketAddr, &str, &str, Expect); 3] = [
        (
            "floor: empty axum handler",
            d.floor,
            "/empty",
            &repeated,
            Expect::Empty,
        ),
        (
            "revsync: repeated token",
            d.api,
            "/v1/check",
            &repeated,
            Expect::Active,
        ),
        (
            "revsync: revoked token",
            d.api,
            "/v1/check",
            &revoked,
            Expect::Revoked,
        ),
    ];
    for (scenario, addr, path, bearer, expect) in fixed {
        for &c in &s.concurrency {
            let load = run_load(
                &check_load(addr, c, s.warmup, s.measure),
                &|cl: &mut Client, _, _| http_step(cl, path, bearer, expect),
            );
            report.add_run("check", scenario, load, String::new());
        }
    }

    // First-seen: every request a token never presented before.
    let per_run = (s.warmup + s.measure).as_secs_f64();
    for key in [&d.rsa, &d.ec] {
        let scenario = format!("revsync: first-seen {}", key.name);
        let t = Instant::now();
        let probe_pool = mint_bearers(
            d,
            key,
            &format!("probe-{}", key.name),
            PROBE_TOKENS,
            s.cores,
        );
        let sign_rate = PROBE_TOKENS as f64 / t.elapsed().as_secs_f64();
        let next = AtomicUsize::new(0);
        let pool_step = |pool: &[String], next: &AtomicUsize, cl: &mut Client| -> Step {
            match pool.get(next.fetch_add(1, Ordering::Relaxed)) {
                Some(bearer) => http_step(cl, "/v1/check", bearer, Expect::Active),
                None => Step::Exhausted,
            }
        };
        let probe = LoadSpec::new(
            d.api,
            s.max_concurrency(),
            Duration::ZERO,
            Duration::from_secs_f64(PROBE_SECS),
            CLIENT_THREADS,
        );
        let probe = run_load(&probe, &|cl: &mut Client, _, _| {
            pool_step(&probe_pool, &next, cl)
        });
        assert_clean("check", &scenario, &probe);
        let need = ((probe.rps() * per_run * 1.3).ceil() as usize * s.concurrency.len()).max(1000);
        let t = Instant::now();
        let pool = mint_bearers(d, key, &format!("fresh-{}", key.name), need, s.cores);
        eprintln!(
            "[check] {scenario}: probe {:.0} req/s; minted {need} tokens in {:.1} s ({sign_rate:.0}/s)",
            probe.rps(),
            t.elapsed().as_secs_f64()
        );
        let misses0 = d.metric("cache_misses");
        let next = AtomicUsize::new(0);
        let mut issued = 0;
        for &c in &s.concurrency {
            let load = run_load(
                &check_load(d.api, c, s.warmup, s.measure),
                &|cl: &mut Client, _, _| pool_step(&pool, &next, cl),
            );
            issued += load.issued;
            let note = load.exhausted_at.map_or(String::new(), |t| {
                format!("token pool ran out {t:.2} s into the window")
            });
            report.add_run("check", &scenario, load, note);
        }
        if let (Some(a), Some(b)) = (misses0, d.metric("cache_misses")) {
            report.notes.push(format!(
                "{scenario}: {} verified-token cache misses for {issued} requests (every request a first presentation)",
                b - a
            ));
        }
    }

    // Ratios against the floor.
    let floor = "floor: empty axum handler";
    let rep = "revsync: repeated token";
    for &c in &s.concurrency {
        let (Some(f), Some(a)) = (report.find("check", floor, c), report.find("check", rep, c))
        else {
            continue;
        };
        let by_p50 = a.pct_us(0.5) / f.pct_us(0.5);
        let by_rps = f.rps() / a.rps();
        let by_cpu = match (a.server_cpu_us(), f.server_cpu_us()) {
            (Some(x), Some(y)) => x / y,
            _ => f64::NAN,
        };
        let (a_p50, f_p50, a_rps, f_rps) = (a.pct_us(0.5), f.pct_us(0.5), a.rps(), f.rps());
        report.ratios.push((
            format!("repeated token ÷ floor, c={c}"),
            format!("p50 {by_p50:.2}x · cost by req/s {by_rps:.2}x · server CPU/req {by_cpu:.2}x"),
        ));
        let goal = "repeated-token check within 1.5x of the empty handler";
        if c == 1 {
            report.target(
                format!("{goal} (c=1, p50 latency)"),
                format!("{by_p50:.2}x ({} vs {})", fmt_us(a_p50), fmt_us(f_p50)),
                at_most(by_p50, 1.5),
            );
        } else {
            report.target(
                format!("{goal} (c={c}, req/s)"),
                format!("{by_rps:.2}x ({a_rps:.0} vs {f_rps:.0} req/s)"),
                at_most(by_rps, 1.5),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Part: introspection (oidc-provider)

struct Introspection {
    addr: SocketAddr,
    basic: String,
    pid: u32,
    _child: Guard,
}

fn start_introspection(s: &Settings, report: &mut Report) -> Result<Introspection, String> {
    let dir = manifest_dir().join("benches/introspection");
    if !dir.join("node_modules/oidc-provider").exists() {
        eprintln!(
            "[introspection] npm ci --no-audit --no-fund in {}",
            dir.display()
        );
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("npm: {e}"))?
            .success();
        if !ok {
            return Err("npm ci failed".into());
        }
    }
    let mut child = Command::new(&s.node)
        .arg(dir.join("server.mjs"))
        .arg("0")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", s.node))?;
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let guard = Guard(child);
    let warnings = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let warnings = warnings.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[oidc-provider] {line}");
                warnings.lock().unwrap().push(line);
            }
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "oidc-provider printed no ready line in 60 s".to_string())?;
        if let Some(rest) = line.strip_prefix("ready ") {
            break serde_json::from_str::<Value>(rest).map_err(|e| e.to_string())?;
        }
    };
    std::thread::sleep(Duration::from_millis(200));
    for w in warnings.lock().unwrap().iter() {
        report.notes.push(format!("oidc-provider said: `{w}`"));
    }
    report.versions.push(format!(
        "oidc-provider {} on Node.js {} (benches/introspection/package-lock.json)",
        ready["oidc_provider"].as_str().unwrap_or("?"),
        ready["node"].as_str().unwrap_or("?")
    ));
    let issuer = ready["issuer"].as_str().ok_or("no issuer")?;
    let addr: SocketAddr = issuer
        .trim_start_matches("http://")
        .parse()
        .map_err(|e| format!("{issuer}: {e}"))?;
    let id = ready["client_id"].as_str().ok_or("no client_id")?;
    let secret = ready["client_secret"].as_str().ok_or("no client_secret")?;
    // RFC 6749 §2.3.1: form-encode, then Basic.
    let enc = |v: &str| serde_urlencoded::to_string([("", v)]).unwrap()[1..].to_string();
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    );
    Ok(Introspection {
        addr,
        basic,
        pid,
        _child: guard,
    })
}

fn part_introspection(s: &Settings, report: &mut Report) {
    let srv = match start_introspection(s, report) {
        Ok(srv) => srv,
        Err(e) => {
            eprintln!("[introspection] SKIPPED: {e}");
            report
                .notes
                .push(format!("introspection part skipped: {e}"));
            return;
        }
    };
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let headers = [("Authorization", srv.basic.as_str()), form[0]];
    // Mint the pool through the token endpoint.
    let t = Instant::now();
    let mut c = Client::connect(srv.addr).unwrap();
    let mut bodies = Vec::with_capacity(s.introspection_tokens);
    for _ in 0..s.introspection_tokens {
        let (status, body) = c
            .request(
                "POST",
                "/token",
                &headers,
                b"grant_type=client_credentials&scope=api%3Aread",
            )
            .expect("token endpoint");
        let v: Value = serde_json::from_slice(body).expect("token answer is JSON");
        assert_eq!(status, 200, "token endpoint: {v}");
        let token = v["access_token"].as_str().expect("access_token");
        assert!(
            !token.contains('.'),
            "expected an opaque access token, got a structured one: {token}"
        );
        bodies.push(serde_urlencoded::to_string([("token", token)]).unwrap());
    }
    eprintln!(
        "[introspection] minted {} opaque tokens in {:.1} s",
        bodies.len(),
        t.elapsed().as_secs_f64()
    );
    // The endpoint must tell a valid token from a bogus one.
    let (status, body) = c
        .request(
            "POST",
            "/token/introspection",
            &headers,
            bodies[0].as_bytes(),
        )
        .unwrap();
    assert!(
        status == 200 && contains(body, br#""active":true"#),
        "introspection of a valid token: {status} {}",
        String::from_utf8_lossy(body)
    );
    let sample = String::from_utf8_lossy(body).to_string();
    let (status, body) = c
        .request(
            "POST",
            "/token/introspection",
            &headers,
            b"token=not-a-token",
        )
        .unwrap();
    assert!(
        status == 200 && contains(body, br#""active":false"#),
        "introspection of a bogus token: {status} {}",
        String::from_utf8_lossy(body)
    );
    drop(c);
    report.notes.push(format!(
        "introspection: {} opaque client_credentials tokens (client_secret_basic, form `token=…`), used round-robin; a valid answer looks like `{sample}`",
        bodies.len()
    ));
    let node_cpu = || host::process_cpu_ns(srv.pid);
    let scenario = "oidc-provider: RFC 7662 introspection";
    // V8 compiles hot code only after a while: a fresh process gets a longer warm-up
    // (unrecorded) than the runs' own, so a short run does not measure the interpreter.
    let jit_warmup = s.warmup.max(Duration::from_secs(3));
    for (conc, warmup, measure) in
        std::iter::once((s.max_concurrency(), jit_warmup, Duration::ZERO))
            .chain(s.concurrency.iter().map(|&c| (c, s.warmup, s.measure)))
    {
        let next = AtomicUsize::new(0);
        let spec = LoadSpec::new(srv.addr, conc, warmup, measure, CLIENT_THREADS);
        let load = run_load(&spec.server_cpu(&node_cpu), &|cl: &mut Client, _, _| {
            let body = &bodies[next.fetch_add(1, Ordering::Relaxed) % bodies.len()];
            match cl.request("POST", "/token/introspection", &headers, body.as_bytes()) {
                Ok((200, b)) if contains(b, br#""active":true"#) => Step::Ok,
                Ok((st, b)) => {
                    Step::Err(format!("status {st}, body {}", String::from_utf8_lossy(b)))
                }
                Err(e) => Step::Err(e.to_string()),
            }
        });
        if measure.is_zero() {
            assert!(
                load.issued > 0 && load.first_error.is_none(),
                "introspection warm-up: {}",
                load.first_error.as_deref().unwrap_or("no request")
            );
            eprintln!(
                "[introspection] JIT warm-up: {} requests in {:.1} s at c={conc}",
                load.issued,
                warmup.as_secs_f64()
            );
            continue;
        }
        report.add_run("introspection", scenario, load, String::new());
    }
    // Ratios against introspection.
    for &c in &s.concurrency {
        let Some(i) = report.find("introspection", scenario, c) else {
            continue;
        };
        let (irps, ip50, icpu) = (i.rps(), i.pct_us(0.5), i.server_cpu_us());
        let mut line = Vec::new();
        for rs in [
            "revsync: repeated token",
            "revsync: first-seen RS256",
            "revsync: first-seen ES256",
            "revsync: revoked token",
        ] {
            if let Some(r) = report.find("check", rs, c) {
                let cpu = match (icpu, r.server_cpu_us()) {
                    (Some(a), Some(b)) => format!(", server CPU/req {:.1}x less", a / b),
                    _ => String::new(),
                };
                line.push(format!(
                    "{}: {:.1}x req/s, p50 {:.1}x lower{cpu}",
                    rs.trim_start_matches("revsync: "),
                    r.rps() / irps,
                    ip50 / r.pct_us(0.5)
                ));
            }
        }
        report
            .ratios
            .push((format!("revsync ÷ introspection, c={c}"), line.join(" · ")));
    }
    let c16 = s.max_concurrency();
    if let (Some(i), Some(r)) = (
        report.find("introspection", scenario, c16),
        report.find("check", "revsync: repeated token", c16),
    ) {
        let ratio = r.rps() / i.rps();
        report.target(
            format!(">= 10x the introspection endpoint's req/s at c={c16} (repeated token)"),
            format!("{ratio:.1}x ({:.0} vs {:.0} req/s)", r.rps(), i.rps()),
            at_least(ratio, 10.0),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Part: propagation

fn part_propagation(d: &Daemon, s: &Settings, report: &mut Report) {
    let n = s.revocations;
    if n == 0 {
        return;
    }
    let tokens: Vec<(String, String)> = (0..n)
        .map(|i| {
            let jti = format!("prop-{}-{i}", std::process::id());
            (
                format!("Bearer {}", d.demo.token("alice", &jti).unwrap()),
                jti,
            )
        })
        .collect();
    let mut c = Client::connect(d.api).unwrap();
    let mut delays_ms = Vec::with_capacity(n);
    let mut polls = 0u64;
    let t = Instant::now();
    for (i, (bearer, jti)) in tokens.iter().enumerate() {
        let (st, body) = check_once(&mut c, bearer).unwrap();
        assert!(
            judge(Expect::Active, st, &body).is_ok(),
            "token active before its revocation: {}",
            String::from_utf8_lossy(&body)
        );
        let event = revocation_event(
            format!("prop-{i}"),
            Revocation::Token {
                iss: d.demo_iss.clone(),
                jti: jti.clone(),
                exp: None,
            },
        );
        let started = Instant::now();
        d.publisher.send(&event).expect("publish");
        loop {
            polls += 1;
            let (st, body) = check_once(&mut c, bearer).unwrap();
            if judge(Expect::Revoked, st, &body).is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "revocation not seen in 10 s"
            );
        }
        delays_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let wall = t.elapsed().as_secs_f64();
    delays_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        delays_ms[((delays_ms.len() as f64 * p).ceil() as usize).clamp(1, delays_ms.len()) - 1]
    };
    let (p50, p90, p99, max) = (pct(0.5), pct(0.9), pct(0.99), pct(1.0));
    eprintln!("[propagation] {n}: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
    report.propagation = vec![
        (
            "revocations".into(),
            format!("{n}, one at a time ({wall:.1} s)"),
        ),
        (
            "publish → check answers revoked".into(),
            format!("p50 {p50:.1} ms · p90 {p90:.1} ms · p99 {p99:.1} ms · max {max:.1} ms"),
        ),
        (
            "checks polled".into(),
            format!("{polls} (back to back on one keep-alive connection)"),
        ),
    ];
    report.target(
        format!("propagation p99 < 100 ms ({n} revocations)"),
        format!("p99 {p99:.1} ms (max {max:.1} ms)"),
        at_most(p99, 100.0),
    );
}

// ---------------------------------------------------------------------------------------
// Part: mixed load

fn part_mixed(d: &Daemon, s: &Settings, report: &mut Report) {
    let conc = s.max_concurrency();
    let bearers: Vec<String> = (0..MIXED_TOKENS)
        .map(|i| {
            format!(
                "Bearer {}",
                d.demo.token("alice", &format!("mixed-{i}")).unwrap()
            )
        })
        .collect();
    let st0 = get_json(d.api, "/v1/status").expect("status");
    let base = applied(&st0);
    let total = s.warmup + s.mixed;
    let done = AtomicBool::new(false);
    let rate = s.ingest_rate;
    let iss = d.demo_iss.clone();
    struct Sample {
        at: f64,
        applied: i64,
        lag: i64,
        age_ms: u64,
        stale: bool,
    }
    // One clock for the producer, the monitor and (within a millisecond) the checks.
    let t0 = Instant::now();
    let (load, published, pub_secs, samples) = std::thread::scope(|scope| {
        // The producer: paced to `rate` events/s (85% token, 5% each subject, session,
        // client; none of them covers the checked tokens).
        let producer = scope.spawn(|| {
            let now = revsync::unix_now();
            let mut sent = 0u64;
            while t0.elapsed() < total {
                let due = (t0.elapsed().as_secs_f64() * rate) as u64;
                while sent < due {
                    let i = sent;
                    // Token jtis apart from the background revocations' (`id_of(NS_TOKEN, i)`).
                    let revocation = mixed_revocation(&iss, i, 1 << 40, now);
                    d.publisher
                        .send(&revocation_event(format!("mixed-{i}"), revocation))
                        .expect("publish");
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (sent, t0.elapsed().as_secs_f64())
        });
        // The monitor: /v1/status twice a second.
        let monitor = scope.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                if let Ok(st) = get_json(d.api, "/v1/status") {
                    samples.push(Sample {
                        at: t0.elapsed().as_secs_f64(),
                        applied: applied(&st) - base,
                        lag: total_lag(&st),
                        age_ms: st["freshness"]["age_ms"].as_u64().unwrap_or(u64::MAX),
                        stale: st["freshness"]["stale"].as_bool().unwrap_or(true),
                    });
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            samples
        });
        let load = run_load(
            &check_load(d.api, conc, s.warmup, s.mixed),
            &|cl: &mut Client, thread, n| {
                let bearer = &bearers[(thread * 7919 + n as usize) % bearers.len()];
                http_step(cl, "/v1/check", bearer, Expect::Active)
            },
        );
        let (published, pub_secs) = producer.join().unwrap();
        done.store(true, Ordering::Relaxed);
        (load, published, pub_secs, monitor.join().unwrap())
    });
    // Drain: until everything published is applied.
    let t = Instant::now();
    let mut drained = None;
    while t.elapsed() < Duration::from_secs(120) {
        if let Ok(st) = get_json(d.api, "/v1/status") {
            if applied(&st) - base >= published as i64 {
                drained = Some(t.elapsed().as_secs_f64());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    print_load("mixed", "revsync: checks under ingest", &load);
    // Applied rate over the measured window, from the samples inside it.
    let w0 = s.warmup.as_secs_f64();
    let w1 = w0 + s.mixed.as_secs_f64();
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|x| x.at >= w0 && x.at <= w1)
        .collect();
    let stale_samples = samples.iter().filter(|x| x.stale).count();
    if stale_samples > 0 {
        report.notes.push(format!(
            "mixed: the denylist counted as stale in {stale_samples} of {} status samples (freshness age up to {} ms): \
             checks then answer `stale` (undecided) under the default `on_stale = deny`; these are the errors counted",
            samples.len(),
            samples.iter().map(|x| x.age_ms).filter(|a| *a != u64::MAX).max().unwrap_or(0)
        ));
    }
    let applied_rate = match (inside.first(), inside.last()) {
        (Some(a), Some(b)) if b.at > a.at => (b.applied - a.applied) as f64 / (b.at - a.at),
        _ => f64::NAN,
    };
    let max_lag = samples.iter().map(|x| x.lag).max().unwrap_or(0);
    let max_age = samples
        .iter()
        .map(|x| x.age_ms)
        .filter(|a| *a != u64::MAX)
        .max()
        .unwrap_or(0);
    let quiet = report
        .find("check", "revsync: repeated token", conc)
        .map(|q| q.pct_us(0.99));
    report.mixed = vec![
        (
            "checks".into(),
            format!(
                "c={conc}, {} distinct cached tokens round-robin, {:.0} s measured: {:.0} req/s · p50 {} · p99 {} · p99.9 {} · max {}",
                bearers.len(),
                s.mixed.as_secs_f64(),
                load.rps(),
                fmt_us(load.pct_us(0.5)),
                fmt_us(load.pct_us(0.99)),
                fmt_us(load.pct_us(0.999)),
                fmt_us(load.pct_us(1.0)),
            ),
        ),
        (
            "check errors".into(),
            format!(
                "{} of {}{}",
                load.errors,
                load.ok + load.errors,
                load.first_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (first: `{e}`)"))
            ),
        ),
        (
            "p99 vs quiet repeated-token run".into(),
            fmt_opt(quiet, |q| format!("{:.1}x ({} quiet)", load.pct_us(0.99) / q, fmt_us(q))),
        ),
        (
            "published".into(),
            format!(
                "{published} events in {pub_secs:.1} s = {:.0} events/s (goal rate {rate:.0}/s; 85% token, 5% subject/session/client)",
                published as f64 / pub_secs
            ),
        ),
        (
            "applied during the measured window".into(),
            format!("{applied_rate:.0} events/s (from /v1/status positions, sampled every 0.5 s)"),
        ),
        (
            "max lag / max freshness age seen".into(),
            format!(
                "{max_lag} records / {max_age} ms (max_staleness {} s); {stale_samples} of {} status samples stale",
                revsync::config::FreshnessConfig::default().max_staleness.as_secs(),
                samples.len()
            ),
        ),
        (
            "all published events applied".into(),
            fmt_opt(drained, |t| format!("{t:.2} s after publishing stopped")),
        ),
    ];
    report.target(
        format!(
            "mixed: ingest >= 10k events/s for {:.0} s while checking at c={conc}",
            s.mixed.as_secs_f64()
        ),
        format!(
            "{applied_rate:.0} events/s applied; check p99 {}",
            fmt_us(load.pct_us(0.99))
        ),
        at_least(applied_rate, 10_000.0),
    );
    report.target(
        "mixed: no check errors",
        format!("{} errors of {}", load.errors, load.ok + load.errors),
        if load.errors == 0 {
            "met".into()
        } else {
            format!(
                "**MISSED** ({:.3}% errors)",
                100.0 * load.errors as f64 / (load.ok + load.errors) as f64
            )
        },
    );
}

// ---------------------------------------------------------------------------------------
// Part: scale (children)

fn cache_bytes() -> u64 {
    StoreConfig::default().cache_bytes
}

/// Child: preload `n` live token entries into a store at `dir`, time lookups, report RSS.
fn child_scale(n: usize, dir: &Path, lookups: usize) -> Value {
    let rss0 = proc_status_kib("VmRSS:");
    let d = Denylist::open(dir, cache_bytes(), retention()).expect("open store");
    let now = revsync::unix_now();
    let batches = n.div_ceil(BATCH) as u64;
    let tail_from = batches - (batches / 10).max(1);
    let (mut in_apply, mut tail, mut slowest) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut tail_events = 0usize;
    let wall = Instant::now();
    let mut last_report = Instant::now();
    let preload_event = |i, now| token_event(i, now, now + 3 * 3600);
    apply_batches(
        &d,
        0..n as u64,
        now,
        preload_event,
        |b, events, took, out| {
            let (count, end) = ((events.end - events.start) as usize, events.end);
            assert_eq!(out.changed, count, "every preloaded token is new");
            in_apply += took;
            slowest = slowest.max(took);
            if b >= tail_from {
                tail += took;
                tail_events += count;
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!(
                    "[scale {n}] {end} applied, {:.0} ev/s so far",
                    end as f64 / in_apply.as_secs_f64()
                );
                last_report = Instant::now();
            }
        },
    );
    let wall = wall.elapsed();
    assert_eq!(d.sizes().token, n as u64, "every preloaded token is live");
    let t = Instant::now();
    d.flush().expect("flush");
    let flush = t.elapsed();
    let rss = proc_status_kib("VmRSS:");
    let hwm = proc_status_kib("VmHWM:");

    // Lookups: half hits (a preloaded jti), half misses carrying jti, sid, sub, client_id.
    let mut mix = LookupMix::new(n);
    let mut all = Vec::with_capacity(lookups);
    let mut wrong = 0usize;
    for _ in 0..lookups {
        let (token, hit) = mix.next(now);
        let t = Instant::now();
        let found = d.revoked_by(std::hint::black_box(&token)).expect("lookup");
        all.push(t.elapsed().as_nanos() as u64);
        if found.is_some() != hit {
            wrong += 1;
        }
    }
    assert_eq!(wrong, 0, "lookups answered wrongly");
    all.sort_unstable();
    let q = |p: f64| http_client::percentile_us(&all, p) * 1000.0;
    let rss_after = proc_status_kib("VmRSS:");
    json!({
        "n": n,
        "preload_rate": n as f64 / in_apply.as_secs_f64(),
        "preload_secs": in_apply.as_secs_f64(),
        "preload_wall_secs": wall.as_secs_f64(),
        "tail_rate": tail_events as f64 / tail.as_secs_f64(),
        "tail_events": tail_events,
        "slowest_batch_ms": slowest.as_secs_f64() * 1e3,
        "flush_secs": flush.as_secs_f64(),
        "rss0_kib": rss0,
        "rss_kib": rss,
        "hwm_kib": hwm,
        "rss_after_lookups_kib": rss_after,
        "disk_bytes": d.size_on_disk(),
        "lookups": lookups,
        "p50_ns": q(0.5),
        "p99_ns": q(0.99),
        "p999_ns": q(0.999),
        "max_ns": q(1.0),
    })
}

/// Child: time `Denylist::open` on the store at `dir` (expected to hold `n` tokens).
fn child_startup(n: usize, dir: &Path) -> Value {
    let rss0 = proc_status_kib("VmRSS:");
    let t = Instant::now();
    let d = Denylist::open(dir, cache_bytes(), retention()).expect("open store");
    let open = t.elapsed();
    let rss = proc_status_kib("VmRSS:");
    assert_eq!(d.sizes().token, n as u64, "entries after reopening");
    let jti = id_of(NS_TOKEN, (n / 2) as u64);
    let token = TokenRef {
        iss: workload::ISS,
        jti: Some(&jti),
        ..TokenRef::default()
    };
    assert!(d.revoked_by(&token).unwrap().is_some(), "index rebuilt");
    json!({"n": n, "open_secs": open.as_secs_f64(), "rss0_kib": rss0, "rss_kib": rss,
        "disk_bytes": d.size_on_disk()})
}

fn child_main(role: &str) {
    let n = env_count("REVSYNC_TRADEOFF_N").unwrap_or(0);
    let dir = PathBuf::from(std::env::var("REVSYNC_TRADEOFF_DIR").expect("REVSYNC_TRADEOFF_DIR"));
    let out = match role {
        "scale" => child_scale(n, &dir, env_count("REVSYNC_TRADEOFF_LOOKUPS").unwrap_or(0)),
        "startup" => child_startup(n, &dir),
        other => panic!("{CHILD_ENV}={other}: unknown role"),
    };
    println!("RESULT {out}");
}

fn run_child(role: &str, n: usize, dir: &Path, lookups: usize) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .env(CHILD_ENV, role)
        .env("REVSYNC_TRADEOFF_N", n.to_string())
        .env("REVSYNC_TRADEOFF_DIR", dir)
        .env("REVSYNC_TRADEOFF_LOOKUPS", lookups.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) {
        Some(r) if out.status.success() => serde_json::from_str(r).map_err(|e| e.to_string()),
        _ => Err(format!("child {role} {n} failed: {}", out.status)),
    }
}

fn kib_gib(v: &Value) -> f64 {
    v.as_f64().map_or(f64::NAN, |k| k / 1024.0 / 1024.0)
}

fn part_scale(s: &Settings, report: &mut Report) {
    let mut sizes = s.scale.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let mut startup_dir = None;
    for &n in &sizes {
        let dir =
            tempfile::tempdir_in(target_dir()).unwrap_or_else(|_| tempfile::tempdir().unwrap());
        eprintln!(
            "[scale] child: preload {n} live entries, {} lookups",
            s.lookups
        );
        let t = Instant::now();
        match run_child("scale", n, dir.path(), s.lookups) {
            Ok(v) => {
                eprintln!(
                    "[scale] {n}: done in {:.1} s: {v}",
                    t.elapsed().as_secs_f64()
                );
                report.scale.push(v);
            }
            Err(e) => report.notes.push(format!("scale {n}: {e}")),
        }
        if n == s.startup {
            startup_dir = Some(dir);
        }
    }
    if s.startup > 0 {
        let dir = match startup_dir {
            Some(d) => d,
            None => {
                let dir = tempfile::tempdir_in(target_dir())
                    .unwrap_or_else(|_| tempfile::tempdir().unwrap());
                eprintln!(
                    "[scale] child: write a {}-entry store for start-up",
                    s.startup
                );
                if let Err(e) = run_child("scale", s.startup, dir.path(), 0) {
                    report.notes.push(format!("start-up store: {e}"));
                }
                dir
            }
        };
        match run_child("startup", s.startup, dir.path(), 0) {
            Ok(v) => {
                eprintln!("[scale] start-up: {v}");
                report.startup = Some(v);
            }
            Err(e) => report.notes.push(format!("start-up: {e}")),
        }
    }
    // Targets.
    let scale = report.scale.clone();
    let at = |n: usize| {
        scale
            .iter()
            .find(|v| v["n"].as_u64() == Some(n as u64))
            .cloned()
    };
    match at(1_000_000).or_else(|| scale.last().cloned()) {
        Some(v) => {
            let rate = v["tail_rate"].as_f64().unwrap_or(f64::NAN);
            report.target(
                format!(
                    ">= 50k events/s ingest (Denylist::apply, last {} events into ~{} live)",
                    v["tail_events"], v["n"]
                ),
                format!("{rate:.0} events/s"),
                at_least(rate, 50_000.0),
            );
        }
        None => report.target(">= 50k events/s ingest", "-", "not measured".into()),
    }
    let big = at(10_000_000);
    let (lookup, rss, label) = match &big {
        Some(v) => (
            v["p99_ns"].as_f64().unwrap_or(f64::NAN),
            kib_gib(&v["rss_kib"]),
            "10M".to_string(),
        ),
        None => (
            f64::NAN,
            f64::NAN,
            "10M (not in REVSYNC_BENCH_SCALE)".to_string(),
        ),
    };
    report.target(
        format!("{label} live entries: lookup p99 < 10 µs"),
        if lookup.is_finite() {
            format!("p99 {:.2} µs", lookup / 1000.0)
        } else {
            "-".into()
        },
        at_most(lookup / 1000.0, 10.0),
    );
    report.target(
        format!("{label} live entries: RSS < 1.5 GiB"),
        if rss.is_finite() {
            format!(
                "VmRSS {rss:.2} GiB (peak {:.2} GiB)",
                kib_gib(&big.as_ref().unwrap()["hwm_kib"])
            )
        } else {
            "-".into()
        },
        at_most(rss, 1.5),
    );
}

// ---------------------------------------------------------------------------------------
// Output

fn render(s: &Settings, report: &Report, started: &str, load_start: &str, elapsed: f64) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# revsync trade-off benchmark\n");
    let _ = writeln!(o, "Command: `{}`\n", command_line());
    let _ = writeln!(
        o,
        "Machine: nproc {}, {}, {:.1} GiB RAM, Linux {}; load average {} at start, {} at end; started {started}, took {:.0} s.\n",
        s.cores,
        cpu_model(),
        mem_total_gib(),
        read_file_trim("/proc/sys/kernel/osrelease"),
        load_start,
        loadavg(),
        elapsed
    );
    let daemon_parts = ["check", "propagation", "mixed"].iter().any(|p| s.wants(p));
    let http_parts = ["check", "introspection", "mixed"]
        .iter()
        .any(|p| s.wants(p));
    let mut versions = vec![format!(
        "revsync {} (release profile)",
        env!("CARGO_PKG_VERSION")
    )];
    if daemon_parts {
        versions.push(format!(
            "Tansu {} (memory storage, {PARTITIONS} partitions)",
            revsync::dev::TANSU_VERSION
        ));
    }
    versions.extend(report.versions.iter().cloned());
    let _ = writeln!(o, "Software: {}.\n", versions.join("; "));
    let busy = |l: &str| {
        l.split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 0.5 * s.cores as f64)
    };
    if busy(load_start) {
        let _ = writeln!(
            o,
            "**Warning:** the 1-minute load average was {load_start} at the start on {} cores: other work \
             was competing for the CPU, so these figures understate what this machine can do.\n",
            s.cores
        );
    }
    if http_parts {
        let _ = writeln!(
        o,
        "Set-up: everything on this one machine over loopback; servers and bench clients share the {} cores. \
         The clients are plain threads with one HTTP/1.1 keep-alive connection each. The floor and the revsync \
         daemon (`revsync::app::run`, in-process, fed by Tansu, {} tokio workers) run on one runtime; \
         oidc-provider is one Node.js process. Check runs: {:.1} s warm-up + {:.1} s measured each. \
         'server CPU' is the CPU time of the server's threads (node: the whole process) per request over the \
         measured window.\n",
        s.cores,
        s.cores,
        s.warmup.as_secs_f64(),
        s.measure.as_secs_f64()
    );
    }

    if !report.targets.is_empty() {
        let _ = writeln!(o, "## Targets (issue 7)\n");
        let _ = writeln!(o, "| target | measured | verdict |\n|---|---|---|");
        for t in &report.targets {
            let _ = writeln!(o, "| {} | {} | {} |", t.goal, t.measured, t.verdict);
        }
        let _ = writeln!(o);
    }

    if !report.rows.is_empty() {
        let _ = writeln!(o, "## Check cost: HTTP/1.1 keep-alive on loopback\n");
        let _ = writeln!(
            o,
            "| scenario | conc | req/s | p50 | p99 | server CPU/req | requests | note |\n|---|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in &report.rows {
            let l = &r.load;
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
                r.scenario,
                l.concurrency,
                l.rps(),
                fmt_us(l.pct_us(0.5)),
                fmt_us(l.pct_us(0.99)),
                fmt_opt(l.server_cpu_us(), fmt_us),
                l.ok,
                r.note
            );
        }
        let _ = writeln!(o);
    }
    for (title, kv) in [
        ("Ratios", &report.ratios),
        (
            "Propagation: publish → the check denies (real broker)",
            &report.propagation,
        ),
        (
            "Mixed load: checks while ingesting through the broker",
            &report.mixed,
        ),
    ] {
        if kv.is_empty() {
            continue;
        }
        let _ = writeln!(o, "## {title}\n\n| | |\n|---|---|");
        for (k, v) in kv {
            let _ = writeln!(o, "| {k} | {v} |");
        }
        let _ = writeln!(o);
    }
    if !report.scale.is_empty() || report.startup.is_some() {
        let _ = writeln!(
            o,
            "## Scale: `Denylist` at N live token entries (one child process per size)\n"
        );
        let _ = writeln!(
            o,
            "| live entries | preload (apply) | apply at size (last 10%) | lookup p50 / p99 / p99.9 / max | VmRSS after preload | VmHWM | on disk |\n|---:|---:|---:|---|---:|---:|---:|"
        );
        for v in &report.scale {
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                o,
                "| {} | {:.0} ev/s ({:.1} s) | {:.0} ev/s | {:.0} ns / {:.0} ns / {:.0} ns / {:.1} µs ({} calls) | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
                v["n"],
                f("preload_rate"),
                f("preload_secs"),
                f("tail_rate"),
                f("p50_ns"),
                f("p99_ns"),
                f("p999_ns"),
                f("max_ns") / 1000.0,
                v["lookups"],
                f("rss_kib") / 1024.0,
                f("hwm_kib") / 1024.0,
                f("disk_bytes") / 1048576.0,
            );
        }
        if let Some(v) = &report.startup {
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                o,
                "\nStart-up: `Denylist::open` on a store of {} entries written by a previous child (rebuilds the in-memory index): **{:.2} s**, VmRSS {:.0} MiB after open, {:.0} MiB on disk.",
                v["n"],
                f("open_secs"),
                f("rss_kib") / 1024.0,
                f("disk_bytes") / 1048576.0
            );
        }
        let _ = writeln!(
            o,
            "\nPreload: `Denylist::apply` in batches of {BATCH} token revocations with UUID-shaped jtis in random key order, one position per batch; sled page cache {} MiB. Lookups: `revoked_by`, each call timed with `Instant`, half hits on a preloaded jti, half misses carrying jti, sid, sub and client_id.\n",
            cache_bytes() >> 20
        );
    }
    if !report.notes.is_empty() {
        let _ = writeln!(o, "## Notes\n");
        for n in &report.notes {
            let _ = writeln!(o, "- {n}");
        }
        let _ = writeln!(o);
    }
    o
}

fn main() {
    if let Ok(role) = std::env::var(CHILD_ENV) {
        child_main(&role);
        return;
    }
    let s = Settings::from_env();
    let started_at = Instant::now();
    let started = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("unix time {}", revsync::unix_now()));
    let load_start = loadavg();
    eprintln!("revsync trade-off benchmark: {}", command_line());
    eprintln!("parts: {}", s.parts.join(","));
    for p in &s.parts {
        assert!(
            ALL_PARTS.split(',').any(|a| a == p),
            "REVSYNC_BENCH_PARTS: unknown part {p} (known: {ALL_PARTS})"
        );
    }
    let mut report = Report::default();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(s.cores)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let needs_daemon = ["check", "propagation", "mixed"].iter().any(|p| s.wants(p));
    let daemon = needs_daemon.then(|| Daemon::start(&rt, &s));
    if let Some(d) = &daemon {
        if s.wants("check") {
            part_check(d, &s, &mut report);
        }
    }
    if s.wants("introspection") {
        part_introspection(&s, &mut report);
    }
    if let Some(d) = &daemon {
        if s.wants("propagation") {
            part_propagation(d, &s, &mut report);
        }
        if s.wants("mixed") {
            part_mixed(d, &s, &mut report);
        }
    }
    if let Some(d) = daemon {
        d.shutdown(&rt);
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    if s.wants("scale") {
        part_scale(&s, &mut report);
    }

    let out = render(
        &s,
        &report,
        &started,
        &load_start,
        started_at.elapsed().as_secs_f64(),
    );
    println!("\n{out}");
    let path = target_dir().join("tradeoff-results.md");
    match std::fs::write(&path, &out) {
        Ok(()) => eprintln!("written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
