//! Check-path figures over real HTTP on loopback (keep-alive), against the issue's goals:
//! (a) a cache hit costs within 1.5× of an empty handler on the same axum stack (c);
//! (b) a first-seen token costs within 1.3× of the raw signature verification plus (c).
//! Prints numbers and goal verdicts; fails only when an answer is wrong (a broken path
//! must not produce a fast figure).
//!
//! ```text
//! cargo bench --bench check                                          # 1 s warm-up + 5 s per run
//! REVSYNC_BENCH_SECS=1 REVSYNC_BENCH_WARMUP=0.2 cargo bench --bench check   # smoke run
//! ```
//!
//! Environment:
//! - `REVSYNC_BENCH_SECS` (default 5): measured seconds per run;
//! - `REVSYNC_BENCH_WARMUP` (default 1): warm-up seconds per run (not recorded);
//! - `REVSYNC_BENCH_TOKENS` (default: from a probe): unique tokens minted per algorithm
//!   for the first-seen runs; by default a 0.5 s probe at concurrency 16 measures the
//!   rate and enough tokens are minted for every run of that algorithm (+30%);
//! - `REVSYNC_BENCH_REVOKED` (default 10000): token revocations in the denylist;
//! - `REVSYNC_BENCH_RAW_ITERS` (default 20000): iterations of the raw verification;
//! - `REVSYNC_BENCH_CONCURRENCY` (default `1,16`): client connections per run;
//! - `REVSYNC_BENCH_SCENARIOS` (default `c,a,d,b1,b2`): which scenarios to run.
//!
//! Set-up, all in this process: a tokio multi-thread runtime (one worker per CPU, threads
//! named `srv-worker`) runs a JWKS server (RSA-2048 for RS256, P-256 for ES256) and the
//! real `revsync::api::router` with one issuer, a temporary sled denylist, the ingest
//! state marked caught up (max staleness 24 h) and a verified-token cache of 100k, plus
//! `POST /empty` (a static JSON answer) on the same router and listener: the floor (c).
//! Clients are plain threads (`bench-cli-N`), one keep-alive connection each, speaking
//! minimal HTTP/1.1 over `std::net::TcpStream` (benches/support/http_client.rs); every
//! answer's status and body are checked. Besides latency and throughput, the CPU time of the server threads and of
//! the client threads (`/proc/<tid>/schedstat`) over the measured window is divided by
//! the requests measured, which separates the server's cost from the client's on a
//! machine where both share the cores.

#[path = "support/check_env.rs"]
mod check_env;
#[path = "support/host.rs"]
mod host;
#[path = "support/http_client.rs"]
mod http_client;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use check_env::{
    claims, judge, mint, serve_jwks, BenchKey, Expect, CLIENT_THREADS, SERVER_THREADS,
};
use host::{cpu_model, env_count, env_f64, env_list, loadavg};
use http_client::{run_load, Client, LoadSpec, Step};
use revsync::api::{AppState, Checker, Decision};
use revsync::config::{FreshnessConfig, OnStale};
use revsync::denylist::{Denylist, Retention};
use revsync::event::{Event, Revocation};
use revsync::freshness::Freshness;
use revsync::ingest::IngestState;
use revsync::metrics::Metrics;
use revsync::token::TokenValidator;
use tokio_util::sync::CancellationToken;

const CACHE_CAPACITY: u64 = 100_000;
const PROBE_TOKENS: usize = 5_000;
const PROBE_SECS: f64 = 0.5;
/// Lifetime of the minted tokens.
const TOKEN_SECS: u64 = 3600;

struct Settings {
    warmup: Duration,
    measure: Duration,
    tokens: Option<usize>,
    revoked: usize,
    raw_iters: usize,
    concurrency: Vec<usize>,
    scenarios: Vec<String>,
    cores: usize,
}

impl Settings {
    fn wants(&self, scenario: &str) -> bool {
        // "(b1) first-seen RS256" → "b1"
        let tag = scenario[1..].split(')').next().unwrap_or("");
        self.scenarios.iter().any(|s| s == tag)
    }
}

// ---------------------------------------------------------------------------------------
// Raw signature verification

/// µs per `jsonwebtoken::crypto::verify` (what `token.rs` calls) and per
/// `ParsedPublicKey::verify_sig` (key parsed once), over `iters` iterations each.
fn raw_verify(key: &BenchKey, token: &str, iters: usize) -> (f64, f64) {
    let (message, signature) = token.rsplit_once('.').unwrap();
    let iters = iters.max(1);
    for _ in 0..iters.min(200) {
        assert!(jsonwebtoken::crypto::verify(
            signature,
            message.as_bytes(),
            &key.decoding,
            key.alg
        )
        .unwrap());
    }
    let t = Instant::now();
    for _ in 0..iters {
        let ok = jsonwebtoken::crypto::verify(
            std::hint::black_box(signature),
            std::hint::black_box(message.as_bytes()),
            &key.decoding,
            key.alg,
        );
        assert!(ok.unwrap(), "raw verification failed");
    }
    let jwt_us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
    let t = Instant::now();
    for _ in 0..iters {
        let bytes = URL_SAFE_NO_PAD
            .decode(std::hint::black_box(signature))
            .unwrap();
        key.parsed
            .verify_sig(std::hint::black_box(message.as_bytes()), &bytes)
            .expect("raw verification failed");
    }
    let parsed_us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
    (jwt_us, parsed_us)
}

/// µs per `Checker::decide` (validation, freshness, denylist; no HTTP) on one thread, over
/// `tokens`, each presented `repeat` times in a row (the first presentation untimed when
/// `repeat` > 1, so a repeated token is timed as a cache hit).
async fn decide_cost(checker: &Checker, tokens: &[String], repeat: usize) -> f64 {
    let check = |d: Decision| {
        assert!(
            matches!(d, Decision::Active { stale: false, .. }),
            "in-process decision: {d:?}"
        );
    };
    if repeat > 1 {
        for token in tokens {
            check(checker.decide(Some(token)).await);
        }
    }
    let t = Instant::now();
    for token in tokens {
        for _ in 0..repeat {
            check(checker.decide(Some(std::hint::black_box(token))).await);
        }
    }
    t.elapsed().as_secs_f64() * 1e6 / (tokens.len() * repeat).max(1) as f64
}

// ---------------------------------------------------------------------------------------
// Server side

struct Server {
    addr: SocketAddr,
    iss: String,
    checker: Arc<Checker>,
    metrics: Arc<Metrics>,
    sizes: revsync::denylist::Sizes,
}

async fn start_server(keys: &[&BenchKey], revoked_jtis: &[String]) -> (Server, CancellationToken) {
    let issuer = serve_jwks(keys).await;
    let iss = issuer.issuer.clone();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let validator = TokenValidator::start(
        &[issuer],
        http,
        metrics.clone(),
        CACHE_CAPACITY,
        shutdown.clone(),
    )
    .await;
    assert!(validator.keys_loaded(), "JWKS not loaded");

    let denylist = Arc::new(
        Denylist::temporary(Retention::new(
            Duration::from_secs(24 * 3600),
            Duration::from_secs(30),
        ))
        .unwrap(),
    );
    let now = revsync::unix_now();
    let token_events = revoked_jtis.iter().map(|jti| Revocation::Token {
        iss: iss.clone(),
        jti: jti.clone(),
        exp: Some(now + 3600),
    });
    // A few subject revocations of other users, so the `sub` lookup meets a populated
    // key range.
    let subject_events = (0..100).map(|i| Revocation::Subject {
        iss: iss.clone(),
        sub: format!("user-{i}"),
        not_before: now,
    });
    let events: Vec<Event> = token_events
        .chain(subject_events)
        .enumerate()
        .map(|(i, revocation)| Event {
            id: format!("ev-{i}"),
            event_time: now,
            revocation,
            reason: None,
        })
        .collect();
    for chunk in events.chunks(10_000) {
        let outcome = denylist.apply(chunk, &[], now).unwrap();
        assert_eq!(outcome.changed, chunk.len());
    }
    let sizes = denylist.sizes();

    let ingest = IngestState::new();
    ingest.record_caught_up(revsync::monotonic_ms());
    let freshness = Freshness::new(
        FreshnessConfig {
            max_staleness: Duration::from_secs(24 * 3600),
            on_stale: OnStale::Deny,
            ..FreshnessConfig::default()
        },
        ingest.clone(),
    );
    let checker = Arc::new(Checker {
        validator,
        denylist,
        freshness,
        ingest,
        metrics: metrics.clone(),
    });
    let app = revsync::api::router(AppState {
        checker: checker.clone(),
        max_body_bytes: 16 * 1024,
    })
    .route("/empty", post(check_env::empty));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (
        Server {
            addr,
            iss,
            checker,
            metrics,
            sizes,
        },
        shutdown,
    )
}

// ---------------------------------------------------------------------------------------
// Runs

#[derive(Clone, Copy)]
enum Tokens<'a> {
    /// The same `Authorization` value every time.
    Same(&'a str),
    /// Each request takes the next unused value of the pool.
    Pool(&'a [String], &'a AtomicUsize),
}

struct Run {
    scenario: &'static str,
    concurrency: usize,
    /// Requests started inside the measured window.
    requests: usize,
    /// Every request of the run, warm-up included.
    issued: usize,
    window: Duration,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    srv_us: f64,
    cli_us: f64,
    /// Seconds into the measured window at which the token pool ran out.
    exhausted_at: Option<f64>,
    cache_misses: u64,
}

fn srv_cpu() -> u64 {
    host::threads_cpu_ns(SERVER_THREADS)
}

/// One run of `concurrency` clients (benches/support/http_client.rs) sending `POST path`
/// with `tokens`; panics on a wrong answer or a failed request.
#[allow(clippy::too_many_arguments)]
fn run(
    server: &Server,
    scenario: &'static str,
    path: &str,
    expect: Expect,
    tokens: Tokens<'_>,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
) -> Run {
    let misses_before = server.metrics.cache_misses.get();
    let spec = LoadSpec::new(server.addr, concurrency, warmup, measure, CLIENT_THREADS)
        .server_cpu(&srv_cpu)
        .client_cpu(host::thread_cpu_ns);
    let load = run_load(&spec, &|client: &mut Client, _, _| {
        let bearer = match tokens {
            Tokens::Same(t) => t,
            Tokens::Pool(pool, next) => match pool.get(next.fetch_add(1, Ordering::Relaxed)) {
                Some(t) => t.as_str(),
                None => return Step::Exhausted,
            },
        };
        match client.request("POST", path, &[("Authorization", bearer)], b"") {
            Ok((status, body)) => {
                if let Err(e) = judge(expect, status, body) {
                    panic!("unexpected answer: {e}");
                }
                Step::Ok
            }
            Err(e) => Step::Err(e.to_string()),
        }
    });
    assert_eq!(
        load.errors,
        0,
        "{scenario} c={concurrency}: {}",
        load.first_error.as_deref().unwrap_or("-")
    );
    Run {
        scenario,
        concurrency,
        requests: load.ok,
        issued: load.issued,
        window: load.window,
        rps: load.rps(),
        p50_us: load.pct_us(0.50),
        p99_us: load.pct_us(0.99),
        srv_us: load.server_cpu_us().unwrap_or(f64::NAN),
        cli_us: load.client_cpu_us().unwrap_or(f64::NAN),
        exhausted_at: load.exhausted_at,
        cache_misses: server.metrics.cache_misses.get() - misses_before,
    }
}

fn print_run(r: &Run) {
    println!(
        "{:<34} {:>4} {:>9} {:>10.0} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>6.2}{}",
        r.scenario,
        r.concurrency,
        r.requests,
        r.rps,
        r.p50_us,
        r.p99_us,
        r.srv_us,
        r.cli_us,
        (r.srv_us + r.cli_us) * r.rps / 1e6,
        match r.exhausted_at {
            Some(t) => format!("  (token pool ran out {t:.2} s into the window)"),
            None => String::new(),
        }
    );
}

/// First-seen runs of one algorithm: probe (unless the pool size is given), mint, run
/// every concurrency; asserts every request of these runs was a cache miss.
fn first_seen(
    server: &Server,
    settings: &Settings,
    key: &BenchKey,
    scenario: &'static str,
    notes: &mut Vec<String>,
) -> Vec<Run> {
    let cores = settings.cores;
    let prefix = format!("{}-{}", key.name, std::process::id());
    let per_run = settings.warmup + settings.measure;
    let bearers = |prefix: &str, n| mint(key, &server.iss, prefix, n, TOKEN_SECS, cores, "Bearer ");
    let pool_run = |pool: &[String], next: &AtomicUsize, c, warmup, measure| {
        let tokens = Tokens::Pool(pool, next);
        run(
            server,
            scenario,
            "/v1/check",
            Expect::Active,
            tokens,
            c,
            warmup,
            measure,
        )
    };
    let (count, why) = match settings.tokens {
        Some(n) => (n, "REVSYNC_BENCH_TOKENS".to_string()),
        None => {
            let t = Instant::now();
            let probe_pool = bearers(&format!("{prefix}-probe"), PROBE_TOKENS);
            let sign_rate = PROBE_TOKENS as f64 / t.elapsed().as_secs_f64();
            let probe_concurrency = settings.concurrency.iter().copied().max().unwrap_or(1);
            let (next, probe_secs) = (AtomicUsize::new(0), Duration::from_secs_f64(PROBE_SECS));
            let probe = pool_run(
                &probe_pool,
                &next,
                probe_concurrency,
                Duration::ZERO,
                probe_secs,
            );
            assert_eq!(
                probe.cache_misses, probe.issued as u64,
                "probe requests were not all cache misses"
            );
            let need = (probe.rps * per_run.as_secs_f64() * 1.3).ceil() as usize
                * settings.concurrency.len();
            let need = need.max(1000);
            (
                need,
                format!(
                    "probe: {:.0} req/s at concurrency {probe_concurrency} over {:.2} s; signing rate {:.0}/s on {cores} threads",
                    probe.rps,
                    probe.window.as_secs_f64(),
                    sign_rate
                ),
            )
        }
    };
    let t = Instant::now();
    let pool = bearers(&prefix, count);
    notes.push(format!(
        "{scenario}: minted {count} unique {} tokens in {:.1} s ({why})",
        key.name,
        t.elapsed().as_secs_f64()
    ));
    let next = AtomicUsize::new(0);
    settings
        .concurrency
        .iter()
        .map(|&c| {
            let r = pool_run(&pool, &next, c, settings.warmup, settings.measure);
            assert_eq!(
                r.cache_misses, r.issued as u64,
                "{scenario}: not every request was a cache miss"
            );
            print_run(&r);
            r
        })
        .collect()
}

fn verdict(ratio: f64, goal: f64) -> String {
    if ratio <= goal {
        format!("{ratio:.2}x  met (goal <= {goal}x)")
    } else {
        format!(
            "{ratio:.2}x  MISSED (goal <= {goal}x, {:.0}% over)",
            (ratio / goal - 1.0) * 100.0
        )
    }
}

fn find<'a>(runs: &'a [Run], scenario: &str, c: usize) -> Option<&'a Run> {
    runs.iter()
        .find(|r| r.scenario == scenario && r.concurrency == c)
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let settings = Settings {
        warmup: Duration::from_secs_f64(env_f64("REVSYNC_BENCH_WARMUP", 1.0)),
        measure: Duration::from_secs_f64(env_f64("REVSYNC_BENCH_SECS", 5.0)),
        tokens: env_count("REVSYNC_BENCH_TOKENS"),
        revoked: env_count("REVSYNC_BENCH_REVOKED").unwrap_or(10_000).max(1),
        raw_iters: env_count("REVSYNC_BENCH_RAW_ITERS").unwrap_or(20_000),
        concurrency: env_list("REVSYNC_BENCH_CONCURRENCY", &[1, 16]),
        scenarios: std::env::var("REVSYNC_BENCH_SCENARIOS")
            .unwrap_or_else(|_| "c,a,d,b1,b2".into())
            .split(',')
            .map(|s| s.trim().to_string())
            .collect(),
        cores,
    };

    println!("revsync check-path benchmark: cargo bench --bench check");
    println!(
        "machine: nproc {cores}, CPU {}, load average at start {}",
        cpu_model(),
        loadavg()
    );
    println!(
        "runs: {:.1} s warm-up + {:.1} s measured each; concurrency {:?} (one keep-alive connection per client thread)",
        settings.warmup.as_secs_f64(),
        settings.measure.as_secs_f64(),
        settings.concurrency
    );
    println!(
        "note: server ({cores} tokio workers) and all client threads share the same {cores} cores, so \
         concurrency 16 is CPU-bound and its throughput includes the clients' own CPU; \
         'srv CPU' is the server threads' CPU time per request, 'cli CPU' the clients', \
         'cores used' their sum times req/s (below {cores} = idle time or CPU taken by other processes)."
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()
        .unwrap();

    let t = Instant::now();
    let rsa = BenchKey::rsa("bench-rsa");
    let ec = BenchKey::p256("bench-ec");
    let revoked_jti = "revoked-0".to_string();
    let revoked: Vec<String> = std::iter::once(revoked_jti.clone())
        .chain((1..settings.revoked).map(|i| format!("revoked-{i}")))
        .collect();
    let (server, shutdown) = rt.block_on(start_server(&[&rsa, &ec], &revoked));
    println!(
        "set-up: RSA-2048 (RS256) and P-256 (ES256) keys, JWKS loaded over HTTP, denylist {} token + {} subject revocations, cache capacity {CACHE_CAPACITY}, in {:.1} s",
        server.sizes.token,
        server.sizes.subject,
        t.elapsed().as_secs_f64()
    );

    // Raw verification, single thread, no HTTP.
    let rs_token = rsa.sign(&claims(&server.iss, "raw-rs", TOKEN_SECS));
    let es_token = ec.sign(&claims(&server.iss, "raw-es", TOKEN_SECS));
    let (rs_raw, rs_parsed) = raw_verify(&rsa, &rs_token, settings.raw_iters);
    let (es_raw, es_parsed) = raw_verify(&ec, &es_token, settings.raw_iters);
    println!();
    println!(
        "raw signature verification, one thread, {} iterations each:",
        settings.raw_iters
    );
    println!(
        "  RS256  jsonwebtoken::crypto::verify {rs_raw:>7.2} µs/op   (aws-lc-rs ParsedPublicKey, key parsed once: {rs_parsed:.2} µs/op)"
    );
    println!(
        "  ES256  jsonwebtoken::crypto::verify {es_raw:>7.2} µs/op   (aws-lc-rs ParsedPublicKey, key parsed once: {es_parsed:.2} µs/op)"
    );

    // The same decision in-process: revsync's own cost without HTTP.
    let fresh = (settings.raw_iters / 4).clamp(100, 5_000);
    let pid = std::process::id();
    let tokens = |key, prefix: &str| mint(key, &server.iss, prefix, fresh, TOKEN_SECS, cores, "");
    let rs_fresh = tokens(&rsa, &format!("inproc-rs-{pid}"));
    let es_fresh = tokens(&ec, &format!("inproc-es-{pid}"));
    let hit_token = vec![ec.sign(&claims(&server.iss, "inproc-hit", TOKEN_SECS))];
    let (hit_us, rs_miss_us, es_miss_us) = rt.block_on(async {
        (
            decide_cost(&server.checker, &hit_token, settings.raw_iters.max(1)).await,
            decide_cost(&server.checker, &rs_fresh, 1).await,
            decide_cost(&server.checker, &es_fresh, 1).await,
        )
    });
    println!(
        "in-process Checker::decide (validation + freshness + denylist, no HTTP), one thread:"
    );
    println!(
        "  repeated token (cache hit)   {hit_us:>7.2} µs/op   ({} iterations)",
        settings.raw_iters.max(1)
    );
    println!(
        "  first-seen RS256             {rs_miss_us:>7.2} µs/op   ({fresh} tokens; {:+.2} µs over the raw verification)",
        rs_miss_us - rs_raw
    );
    println!(
        "  first-seen ES256             {es_miss_us:>7.2} µs/op   ({fresh} tokens; {:+.2} µs over the raw verification)",
        es_miss_us - es_raw
    );

    println!();
    println!(
        "{:<34} {:>4} {:>9} {:>10} {:>9} {:>9} {:>10} {:>10} {:>6}",
        "scenario", "conc", "requests", "req/s", "p50 µs", "p99 µs", "srv CPU", "cli CPU", "cores"
    );
    println!(
        "{:<34} {:>4} {:>9} {:>10} {:>9} {:>9} {:>10} {:>10} {:>6}",
        "", "", "", "", "", "", "µs/req", "µs/req", "used"
    );
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let rs_bearer = format!("Bearer {rs_token}");
    let fixed = [
        (
            "(c) empty handler POST /empty",
            "/empty",
            Expect::Empty,
            rs_bearer.as_str(),
        ),
        (
            "(a) repeated token (cache hit)",
            "/v1/check",
            Expect::Active,
            rs_bearer.as_str(),
        ),
    ];
    let revoked_bearer = format!(
        "Bearer {}",
        rsa.sign(&claims(&server.iss, &revoked_jti, TOKEN_SECS))
    );
    for (scenario, path, expect, token) in fixed.into_iter().chain([(
        "(d) revoked token (cache hit)",
        "/v1/check",
        Expect::Revoked,
        revoked_bearer.as_str(),
    )]) {
        if !settings.wants(scenario) {
            continue;
        }
        for &c in &settings.concurrency {
            let r = run(
                &server,
                scenario,
                path,
                expect,
                Tokens::Same(token),
                c,
                settings.warmup,
                settings.measure,
            );
            assert!(
                r.cache_misses <= 1,
                "{scenario}: repeated token missed the cache"
            );
            print_run(&r);
            runs.push(r);
        }
    }
    for (key, scenario) in [
        (&rsa, "(b1) first-seen RS256"),
        (&ec, "(b2) first-seen ES256"),
    ] {
        if settings.wants(scenario) {
            runs.extend(first_seen(&server, &settings, key, scenario, &mut notes));
        }
    }
    for n in &notes {
        println!("{n}");
    }
    println!(
        "every answer was checked (status 200; active, revoked or the static body); every first-seen request was a cache miss (metric revsync_cache_misses)"
    );

    println!();
    println!("goals (issue): (a) cache hit within 1.5x of (c)'s cost; (b) first-seen within 1.3x of raw signature cost + (c)");
    let c_name = "(c) empty handler POST /empty";
    for &c in &settings.concurrency {
        let (Some(base), Some(a)) = (
            find(&runs, c_name, c),
            find(&runs, "(a) repeated token (cache hit)", c),
        ) else {
            continue;
        };
        println!("concurrency {c}:");
        println!(
            "  (a)/(c) by p50 latency          {}",
            verdict(a.p50_us / base.p50_us, 1.5)
        );
        println!(
            "  (a)/(c) by throughput           {}",
            verdict(base.rps / a.rps, 1.5)
        );
        println!(
            "  (a)/(c) by server CPU per req   {}",
            verdict(a.srv_us / base.srv_us, 1.5)
        );
        for (scenario, raw) in [
            ("(b1) first-seen RS256", rs_raw),
            ("(b2) first-seen ES256", es_raw),
        ] {
            let Some(b) = find(&runs, scenario, c) else {
                continue;
            };
            let tag = &scenario[..4];
            println!(
                "  {tag}/(raw + c) by p50          {}   [{:.1} / ({raw:.1} + {:.1})]",
                verdict(b.p50_us / (raw + base.p50_us), 1.3),
                b.p50_us,
                base.p50_us
            );
            // Whole-machine cost per request: all cores busy (CPU-bound at high
            // concurrency), so cores / throughput core-µs, clients included.
            let cost = |r: &Run| cores as f64 * 1e6 / r.rps;
            println!(
                "  {tag}/(raw + c) by throughput   {}   [{:.1} / ({raw:.1} + {:.1}) core-µs/req]",
                verdict(cost(b) / (raw + cost(base)), 1.3),
                cost(b),
                cost(base)
            );
            println!(
                "  {tag}/(raw + c) by server CPU   {}   [{:.1} / ({raw:.1} + {:.1}) µs/req]",
                verdict(b.srv_us / (raw + base.srv_us), 1.3),
                b.srv_us,
                base.srv_us
            );
        }
    }
    println!(
        "(throughput cost = {cores} cores / req/s, meaningful when the run is CPU-bound, i.e. at concurrency 16; \
         at concurrency 1 the p50 is the better measure. load average at end {})",
        loadavg()
    );
    shutdown.cancel();
    rt.shutdown_timeout(Duration::from_secs(1));
}
