//! Soak: the real `revsync` binary under sustained check load at high concurrency while
//! a steady stream of revocations flows through a real broker and the GC keeps dropping
//! the ones that expired. It must give no wrong answer and no error, keep memory and the
//! denylist flat, and it reports latency percentiles.
//!
//! CI runs a short version (20 s, debug build) with the rest of the suite. The long one
//! (figures in BENCHMARKS.md):
//!
//! ```text
//! REVSYNC_SOAK_SECS=600 cargo test --release --test soak -- --nocapture
//! ```
//!
//! Knobs: `REVSYNC_SOAK_SECS` (default 20), `REVSYNC_SOAK_BROKER` (`sqlite`, the
//! default, or `memory`), `REVSYNC_SOAK_CONCURRENCY` (32 client
//! connections), `REVSYNC_SOAK_CHECKS_PER_SEC` (10000 checks per second over all of them,
//! latency counted from each request's scheduled start; 0: back to back, which on two
//! cores starves the broker the test runs beside), `REVSYNC_SOAK_EVENTS_PER_SEC` (2000
//! background revocations per second, each live for `REVSYNC_SOAK_EVENT_TTL_SECS`,
//! default 5).
//!
//! The store's page cache is set to 32 MiB (default 256 MiB) so that it is full early
//! and RSS growth after warm-up would be a leak, not the cache filling up.

mod common;

#[path = "../benches/support/http_client.rs"]
mod http_client;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::broker::{free_port, Broker};
use common::daemon::{Daemon, DaemonConfig};
use common::jwt::{claims_with, now, JwksServer, TestKey};
use http_client::{contains, run_load, Client, LoadSpec, Step};
use revsync::config::KafkaConfig;
use revsync::event::{Event, Revocation};
use revsync::publish::Publisher;
use serde_json::{json, Value};

const AUD: &str = "https://api.example.com";
const TOPIC: &str = "revocations";
/// A revocation published this long ago must be answered `revoked` (propagation is
/// ~15 ms at p99 on an idle machine; the margin absorbs a loaded 2-core CI box).
const GRACE: Duration = Duration::from_secs(5);
/// Distinct valid tokens cycled through (each first seen once, then cached).
const POOL: usize = 5_000;
/// Tokens every thread repeats (the cache-hit path).
const HOT: usize = 64;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A revocation of token `jti` of `iss`, sent now.
fn revoke_token(iss: &str, jti: String, exp: Option<u64>) -> Event {
    Event {
        id: jti.clone(),
        event_time: revsync::unix_now(),
        revocation: Revocation::Token {
            iss: iss.to_string(),
            jti,
            exp,
        },
        reason: None,
    }
}

/// Resident set size of `pid`, bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn get_json(client: &mut Client, path: &str) -> Option<Value> {
    match client.request("GET", path, &[], b"") {
        Ok((200, body)) => serde_json::from_slice(body).ok(),
        Ok(_) => None,
        Err(_) => {
            let _ = client.reconnect();
            None
        }
    }
}

/// One sample of the daemon's state during the run.
struct Sample {
    at: f64,
    rss: u64,
    entries: u64,
}

/// Median of the samples whose time falls in `[from, to)` seconds.
fn median_rss(samples: &[Sample], from: f64, to: f64) -> u64 {
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|s| s.at >= from && s.at < to)
        .map(|s| s.rss)
        .collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Least-squares slope of RSS over time for samples at or after `from`, MiB per minute.
fn rss_slope_mib_per_min(samples: &[Sample], from: f64) -> f64 {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.at >= from)
        .map(|s| (s.at, s.rss as f64 / 1048576.0))
        .collect();
    let n = pts.len() as f64;
    if n < 3.0 {
        return 0.0;
    }
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den * 60.0
    }
}

#[test]
fn sustained_load_with_a_steady_event_stream_and_gc() {
    let secs = env_u64("REVSYNC_SOAK_SECS", 20);
    let concurrency = env_u64("REVSYNC_SOAK_CONCURRENCY", 32) as usize;
    let rate = env_u64("REVSYNC_SOAK_EVENTS_PER_SEC", 2000);
    let check_rate = env_u64("REVSYNC_SOAK_CHECKS_PER_SEC", 10_000);
    let ttl = env_u64("REVSYNC_SOAK_EVENT_TTL_SECS", 5);
    let duration = Duration::from_secs(secs);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let key = TestKey::ec_p256("soak-k1");
    let jwks = rt.block_on(JwksServer::with_keys(&[&key]));
    let iss = jwks.issuer();
    // SQLite storage by default: Tansu's memory engine slows down as its log grows (past
    // ~800k records it fell behind 2000 records/s on this machine), which turns the
    // steady stream into bursts. REVSYNC_SOAK_BROKER=memory for the faster engine.
    let log_dir = tempfile::tempdir().unwrap();
    let broker = match std::env::var("REVSYNC_SOAK_BROKER").as_deref() {
        Ok("memory") => Broker::memory(),
        _ => Broker::sqlite(log_dir.path()),
    };
    broker.create_topic(TOPIC, 3);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = DaemonConfig {
        topic_extra: r#"format = "native""#.into(),
        // Entries outlive the token's exp by the leeway: keep it small so they expire
        // within the run.
        issuer_extra: "algorithms = [\"ES256\"]\nleeway = \"1s\"".into(),
        extra_toml: "[freshness]\nmax_staleness = \"30s\"\non_stale = \"deny\"\n".into(),
        ..DaemonConfig::new(port, dir.path(), &broker, TOPIC).trusting(&jwks, AUD)
    }
    .toml()
    // Entries expire ttl after publication; a fine expiry log and a frequent GC keep the
    // denylist at its plateau.
    .replace(
        "[store]\n",
        "[store]\ngc_interval = \"1s\"\nexpiry_granularity = \"1s\"\ncache_bytes = 33554432\n",
    );
    let config_path = dir.path().join("revsync.toml");
    std::fs::write(&config_path, config).unwrap();
    let daemon = Daemon::spawn(&config_path, port);
    let pid = daemon.pid().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Tokens: a hot set, a pool (victims are drawn from it), and garbage.
    let sign = |i: usize, kind: &str| {
        key.sign(&claims_with(
            &iss,
            AUD,
            json!({"jti": format!("soak-{kind}-{i}"), "sub": format!("user-{i}"), "exp": now() + 7200}),
        ))
    };
    let hot: Vec<String> = (0..HOT).map(|i| sign(i, "hot")).collect();
    let pool: Vec<String> = (0..POOL).map(|i| sign(i, "pool")).collect();
    let garbage = [
        "not-a-token".to_string(),
        format!("{}x", &hot[0]),
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.".to_string(),
    ];
    let bodies = |tokens: &[String]| -> Vec<Vec<u8>> {
        tokens
            .iter()
            .map(|t| serde_json::to_vec(&json!({ "token": t })).unwrap())
            .collect()
    };
    let (hot_bodies, pool_bodies, garbage_bodies) = (bodies(&hot), bodies(&pool), bodies(&garbage));

    // Wait for ready.
    let mut probe = Client::connect(addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_json(&mut probe, "/readyz").is_none() {
        assert!(Instant::now() < deadline, "revsync never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Victims: pool index → when the broker acknowledged its revocation (`None` while
    // that is pending: revsync may apply it before the acknowledgement arrives here).
    let victims: Mutex<HashMap<usize, Option<Instant>>> = Mutex::new(HashMap::new());
    let stop = AtomicBool::new(false);
    let published = AtomicU64::new(0);
    let backlog = AtomicU64::new(0);
    let mut samples: Vec<Sample> = Vec::new();
    let run_start = Instant::now();

    let load = std::thread::scope(|s| {
        // The steady stream: `rate` token revocations per second in 10 ms slices, plus
        // one victim from the pool every 100 ms.
        let stream = s.spawn(|| {
            let publisher = Publisher::new(&KafkaConfig::new(broker.bootstrap()), TOPIC).unwrap();
            // Victims go through a producer of their own, each acknowledged before its
            // grace period starts: the assertion is about revsync, not the test's queue.
            let victim_publisher =
                Publisher::new(&KafkaConfig::new(broker.bootstrap()), TOPIC).unwrap();
            let start = Instant::now();
            let mut sent = 0u64;
            let mut victim = 0usize;
            let mut tick = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick += 1;
                let due = rate * tick / 100;
                let now_s = revsync::unix_now();
                while sent < due {
                    let jti = format!("bg-{sent}");
                    publisher
                        .send(&revoke_token(&iss, jti, Some(now_s + ttl)))
                        .unwrap();
                    sent += 1;
                }
                if tick % 10 == 0 && victim < POOL / 2 {
                    let jti = format!("soak-pool-{victim}");
                    victims.lock().unwrap().insert(victim, None);
                    victim_publisher
                        .send(&revoke_token(&iss, jti, None))
                        .unwrap();
                    victim_publisher.finish(Duration::from_secs(60)).unwrap();
                    victims.lock().unwrap().insert(victim, Some(Instant::now()));
                    victim += 1;
                }
                published.store(sent, Ordering::Relaxed);
                backlog.store(publisher.in_flight() as u64, Ordering::Relaxed);
                let next = start + Duration::from_millis(10 * tick);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            published.store(sent, Ordering::Relaxed);
            publisher.finish(Duration::from_secs(120))
        });

        // Samples RSS and the denylist once a second.
        let sampler = s.spawn(|| {
            let mut client = Client::connect(addr).unwrap();
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let entries = get_json(&mut client, "/v1/status")
                    .and_then(|st| {
                        st["denylist"]
                            .as_object()
                            .map(|m| m.values().filter_map(Value::as_u64).sum())
                    })
                    .unwrap_or(0);
                if let Some(rss) = rss_bytes(pid) {
                    let at = run_start.elapsed().as_secs_f64();
                    // A line a minute on long runs, to watch them go.
                    if secs >= 120 && out.len() % 60 == 59 {
                        eprintln!(
                            "soak {at:.0} s: RSS {:.1} MiB, {entries} entries, {} published, {} unacknowledged",
                            rss as f64 / 1048576.0,
                            published.load(Ordering::Relaxed),
                            backlog.load(Ordering::Relaxed),
                        );
                    }
                    out.push(Sample { at, rss, entries });
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            out
        });

        let step = |c: &mut Client, thread: usize, n: u64| -> Step {
            let pick = (n as usize)
                .wrapping_mul(7919)
                .wrapping_add(thread * 104_729);
            let (body, expect): (&[u8], Expect) = match n % 20 {
                0 => (
                    &garbage_bodies[pick % garbage_bodies.len()],
                    Expect::Malformed,
                ),
                1..=6 => {
                    let i = pick % POOL;
                    let revoked_at = victims.lock().unwrap().get(&i).copied();
                    let expect = match revoked_at {
                        None => Expect::Active,
                        Some(Some(t)) if t.elapsed() > GRACE => Expect::Revoked,
                        Some(_) => Expect::Either,
                    };
                    (&pool_bodies[i], expect)
                }
                _ => (&hot_bodies[pick % HOT], Expect::Active),
            };
            match c.request(
                "POST",
                "/v1/check",
                &[("content-type", "application/json")],
                body,
            ) {
                Ok((200, answer)) => {
                    let active = contains(answer, br#""active":true"#);
                    let revoked = contains(answer, br#""reason":"revoked""#);
                    let ok = match expect {
                        Expect::Active => active,
                        Expect::Revoked => revoked,
                        Expect::Either => active || revoked,
                        Expect::Malformed => contains(answer, br#""reason":"malformed""#),
                    };
                    if ok {
                        Step::Ok
                    } else {
                        Step::Err(format!(
                            "expected {expect:?}, got {}",
                            String::from_utf8_lossy(answer)
                        ))
                    }
                }
                Ok((status, answer)) => Step::Err(format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(answer)
                )),
                Err(e) => Step::Err(format!("I/O: {e}")),
            }
        };
        let warmup = Duration::from_secs(2);
        let spec = LoadSpec::new(
            addr,
            concurrency,
            warmup,
            duration.saturating_sub(warmup),
            "soak-client-",
        );
        let load = run_load(
            &spec.rate((check_rate > 0).then_some(check_rate as f64)),
            &step,
        );
        stop.store(true, Ordering::Relaxed);
        samples = sampler.join().unwrap();
        (load, stream.join().unwrap())
    });
    let (load, stream) = load;
    assert!(
        stream.is_ok(),
        "the broker did not acknowledge the event stream: {stream:?}"
    );

    // After the run: every victim is revoked within GRACE of the end, and the daemon
    // still answers.
    let mut client = Client::connect(addr).unwrap();
    let victims = victims.into_inner().unwrap();
    let revoked = |client: &mut Client, i: usize| {
        let body = serde_json::to_vec(&json!({ "token": pool[i] })).unwrap();
        let (status, answer) = client
            .request(
                "POST",
                "/v1/check",
                &[("content-type", "application/json")],
                &body,
            )
            .unwrap();
        status == 200 && contains(answer, br#""reason":"revoked""#)
    };
    let ended = Instant::now();
    let mut late: Vec<usize> = victims.keys().copied().collect();
    while !late.is_empty() && ended.elapsed() < GRACE {
        late.retain(|i| !revoked(&mut client, *i));
        std::thread::sleep(Duration::from_millis(50));
    }
    if !late.is_empty() {
        // Say whether they are late or lost before failing.
        let mut arrived = Vec::new();
        while ended.elapsed() < Duration::from_secs(60) && arrived.len() < late.len() {
            for i in &late {
                if !arrived.iter().any(|(j, _)| j == i) && revoked(&mut client, *i) {
                    arrived.push((*i, ended.elapsed()));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "victims not revoked within {GRACE:?} after the run: {late:?}; arrived later: {arrived:?}; status {}",
            get_json(&mut client, "/v1/status").unwrap_or_default()
        );
    }
    let status = get_json(&mut client, "/v1/status").unwrap();
    let metrics = String::from_utf8_lossy(client.request("GET", "/metrics", &[], b"").unwrap().1)
        .into_owned();
    let metric = |name: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    let elapsed = run_start.elapsed().as_secs_f64();
    let published = published.load(Ordering::Relaxed);
    let entries_max = samples.iter().map(|s| s.entries).max().unwrap_or(0);
    let entries_end = samples.last().map(|s| s.entries).unwrap_or(0);
    let warm = (elapsed * 0.25).max(5.0);
    let rss_warm = median_rss(&samples, warm, (elapsed * 0.5).max(warm + 1.0));
    let rss_end = median_rss(&samples, elapsed * 0.75, f64::MAX);
    let rss_max = samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let slope = rss_slope_mib_per_min(&samples, warm);
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "soak: {secs} s, {concurrency} connections, {} checks/s offered, {rate} events/s (ttl {ttl} s)\n\
         checks: {} ok, {} errors, {:.0} req/s; latency µs p50 {:.0} p99 {:.0} p99.9 {:.0} max {:.0}\n\
         events: {published} published + {} victims, {} applied, {} malformed; \
         denylist max {entries_max}, end {entries_end}; GC dropped {}\n\
         daemon RSS MiB: after warm-up {:.1}, last quarter {:.1}, max {:.1}, slope {slope:+.2} MiB/min",
        if check_rate > 0 { check_rate.to_string() } else { "max".into() },
        load.ok,
        load.errors,
        load.rps(),
        load.pct_us(0.5),
        load.pct_us(0.99),
        load.pct_us(0.999),
        load.pct_us(1.0),
        victims.len(),
        metric("revsync_events_applied_total"),
        metric("revsync_events_malformed_total"),
        metric("revsync_denylist_expired_total"),
        mib(rss_warm),
        mib(rss_end),
        mib(rss_max),
    );

    assert_eq!(load.errors, 0, "first error: {:?}", load.first_error);
    assert!(load.ok > 0, "no check succeeded");
    assert!(
        late.is_empty(),
        "victims not revoked after the run: {late:?}"
    );
    assert_eq!(status["freshness"]["stale"], json!(false), "{status}");
    // The GC keeps up: live entries stay near rate × (ttl + expiry bucket + GC interval),
    // far below what was published once the run outlasts a few ttls.
    let plateau = rate * (ttl + 5) + victims.len() as u64;
    assert!(
        entries_max <= plateau * 2,
        "denylist grew to {entries_max} (plateau ~{plateau})"
    );
    if secs >= 2 * (ttl + 5) {
        // Events that arrive after their expiry are never stored, so only "some" holds
        // for any broker speed; the plateau above bounds the rest.
        assert!(
            metric("revsync_denylist_expired_total") > 0,
            "the GC dropped nothing: {metrics}"
        );
    }
    // Flat memory: what the daemon holds at the end is what it held after warm-up,
    // within allocator noise.
    assert!(
        rss_end <= rss_warm + rss_warm / 4 + 24 * 1048576,
        "RSS grew from {:.1} MiB to {:.1} MiB",
        mib(rss_warm),
        mib(rss_end)
    );
    drop(daemon);
    drop(rt);
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Active,
    Revoked,
    /// Revoked less than [`GRACE`] ago: either answer is right.
    Either,
    Malformed,
}
