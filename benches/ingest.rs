//! Ingest and lookup figures at a realistic denylist size. Prints numbers; asserts
//! nothing about timing.
//!
//! ```text
//! cargo bench --bench ingest                              # 1M entries, 1M replay
//! REVSYNC_BENCH_N=100000 cargo bench --bench ingest       # quick smoke run
//! ```
//!
//! Environment:
//! - `REVSYNC_BENCH_N` (default 1000000): preloaded entries, lookups, replayed events;
//! - `REVSYNC_BENCH_APPLY` (default N/5): fresh events applied on top of the preload;
//! - `REVSYNC_BENCH_LOOKUPS` (default N), `REVSYNC_BENCH_REPLAY` (default N; 0 skips
//!   the broker part);
//! - `REVSYNC_TANSU`: the Tansu binary (else the `.ci/run` cache, else `tansu` on PATH).
//!
//! Parts:
//! 1. apply rate into a store already holding N live token entries;
//! 2. `revoked_by` cost at that size (each call timed with `Instant`);
//! 3. RSS (VmRSS, VmHWM) and `size_on_disk` right after the preload;
//! 4. replay of N native events from the earliest offset of a real Tansu broker into a
//!    fresh store through `ingest::spawn`.

#[path = "../tests/common/broker.rs"]
#[allow(dead_code)]
mod broker;
#[path = "support/host.rs"]
mod host;
#[path = "support/workload.rs"]
mod workload;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::Broker;
use host::{child_pid, env_count, proc_status_kib, process_cpu_ns};
use revsync::config::KafkaConfig;
use revsync::denylist::Denylist;
use revsync::event::Event;
use revsync::ingest::{self, IngestState};
use revsync::metrics::Metrics;
use revsync::publish::Publisher;
use tokio_util::sync::CancellationToken;
use workload::{apply_batches, mixed_revocation, retention, token_event, LookupMix, BATCH, ISS};

const CACHE_BYTES: u64 = 256 << 20;
/// The default topic of `KafkaConfig::new`, which the replay reads.
const TOPIC: &str = "revocations";
const PARTITIONS: i32 = 4;
/// How long the replay may take before the bench gives up on it.
const REPLAY_LIMIT: Duration = Duration::from_secs(900);

/// A fresh token revocation for the preload.
fn preload_event(i: u64, now: u64) -> Event {
    token_event(i, now, now + 3600)
}

/// The mixed workload (see `workload::mixed_revocation`).
fn mixed_event(i: u64, now: u64) -> Event {
    Event {
        id: format!("e{i}"),
        event_time: now,
        revocation: mixed_revocation(ISS, i, 0, now),
        reason: None,
    }
}

/// Applies events `range` built by `make` in batches of `BATCH`. Returns time spent inside
/// `apply` (event construction excluded), (changed, unchanged, expired), and the slowest
/// batch.
fn apply_all(
    d: &Denylist,
    range: std::ops::Range<u64>,
    now: u64,
    make: impl Fn(u64, u64) -> Event,
) -> (Duration, [usize; 3], Duration) {
    let mut in_apply = Duration::ZERO;
    let mut slowest = Duration::ZERO;
    let mut outcome = [0usize; 3];
    apply_batches(d, range, now, make, |_, _, took, out| {
        in_apply += took;
        slowest = slowest.max(took);
        outcome[0] += out.changed;
        outcome[1] += out.unchanged;
        outcome[2] += out.already_expired;
    });
    (in_apply, outcome, slowest)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

struct LookupStats {
    mean_ns: f64,
    p50: u32,
    p99: u32,
    p999: u32,
    max: u32,
}

fn stats(mut ns: Vec<u32>) -> LookupStats {
    let mean_ns = ns.iter().map(|&v| v as f64).sum::<f64>() / ns.len().max(1) as f64;
    ns.sort_unstable();
    LookupStats {
        mean_ns,
        p50: percentile(&ns, 0.50),
        p99: percentile(&ns, 0.99),
        p999: percentile(&ns, 0.999),
        max: ns.last().copied().unwrap_or(0),
    }
}

// ---- replay --------------------------------------------------------------------------

/// The text of a caught panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// Ingest threads, stopped and joined on drop: librdkafka threads alive at process exit
/// crash the process.
struct Ingesting {
    stop: CancellationToken,
    handle: Option<ingest::IngestHandle>,
}

impl Drop for Ingesting {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.join();
        }
    }
}

struct Replay {
    publish_secs: f64,
    first_position_secs: f64,
    replay_secs: f64,
    entries: u64,
    broker_cpu: Option<f64>,
    self_cpu: Option<f64>,
    rss_after_kib: Option<u64>,
}

fn replay(n: usize) -> Result<Replay, String> {
    // A Tansu broker with in-memory storage; one that cannot start skips the replay.
    let broker = std::panic::catch_unwind(Broker::memory).map_err(|e| panic_text(&*e))?;
    broker.create_topic(TOPIC, PARTITIONS);
    let kafka = KafkaConfig::new(broker.bootstrap());

    let now = revsync::unix_now();
    eprintln!("[replay] publishing {n} events to {TOPIC} ({PARTITIONS} partitions)");
    let t = Instant::now();
    {
        let publisher = Publisher::new(&KafkaConfig::new(broker.bootstrap()), TOPIC)
            .map_err(|e| e.to_string())?;
        for i in 0..n as u64 {
            publisher
                .send(&mixed_event(i, now))
                .map_err(|e| e.to_string())?;
        }
        publisher
            .finish(Duration::from_secs(600))
            .map_err(|e| e.to_string())?;
    }
    let publish_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "[replay] published in {publish_secs:.2} s ({:.0} events/s)",
        n as f64 / publish_secs
    );

    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let denylist =
        Arc::new(Denylist::open(dir.path(), CACHE_BYTES, retention()).map_err(|e| e.to_string())?);
    // tests/common/broker.rs keeps its process to itself: find it among this one's children.
    let broker_pid = child_pid("tansu");
    let cpu_secs = |pid: u32| process_cpu_ns(pid) as f64 / 1e9;
    let broker_cpu0 = broker_pid.map(cpu_secs);
    let self_cpu0 = cpu_secs(std::process::id());
    let stop = CancellationToken::new();
    let t = Instant::now();
    let handle = ingest::spawn(
        &kafka,
        denylist.clone(),
        Arc::new(Metrics::new()),
        IngestState::new(),
        stop.clone(),
    )
    .map_err(|e| e.to_string())?;
    let ingesting = Ingesting {
        stop,
        handle: Some(handle),
    };
    let mut first_position = None;
    let mut last_report = Instant::now();
    loop {
        let sum: i64 = denylist
            .positions()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|p| p.next_offset)
            .sum();
        if sum > 0 && first_position.is_none() {
            first_position = Some(t.elapsed());
        }
        if sum >= n as i64 {
            break;
        }
        if t.elapsed() > REPLAY_LIMIT {
            return Err(format!(
                "replay incomplete after {REPLAY_LIMIT:?}: {sum} of {n} positions applied"
            ));
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "[replay] {:.1} s: {sum} of {n} applied",
                t.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let replay_secs = t.elapsed().as_secs_f64();
    let broker_cpu = broker_pid
        .map(cpu_secs)
        .zip(broker_cpu0)
        .map(|(a, b)| a - b);
    let self_cpu = Some(cpu_secs(std::process::id()) - self_cpu0);
    drop(ingesting);
    let rss_after_kib = proc_status_kib("VmRSS:");
    eprintln!("[replay] {n} positions applied in {replay_secs:.2} s");
    Ok(Replay {
        publish_secs,
        first_position_secs: first_position.unwrap_or_default().as_secs_f64(),
        replay_secs,
        entries: denylist.sizes().total(),
        broker_cpu,
        self_cpu,
        rss_after_kib,
    })
}

// ---- main ----------------------------------------------------------------------------

fn machine() -> (usize, String, String) {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    (nproc, host::cpu_model(), host::loadavg())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not meaningful here.
    let n = env_count("REVSYNC_BENCH_N").unwrap_or(1_000_000);
    assert!(n > 0, "REVSYNC_BENCH_N must be positive");
    let n_apply = env_count("REVSYNC_BENCH_APPLY").unwrap_or(n / 5);
    let n_lookups = env_count("REVSYNC_BENCH_LOOKUPS").unwrap_or(n);
    let n_replay = env_count("REVSYNC_BENCH_REPLAY").unwrap_or(n);
    let (nproc, model, load_start) = machine();
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut row = |what: &str, value: String, target: &str| {
        rows.push((what.to_string(), value, target.to_string()));
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let d = Denylist::open(dir.path(), CACHE_BYTES, retention()).expect("open store");
    let now = revsync::unix_now();

    // 1a. Preload.
    eprintln!("[apply] preloading {n} token revocations in batches of {BATCH}");
    let wall = Instant::now();
    let (in_apply, out, slowest) = apply_all(&d, 0..n as u64, now, preload_event);
    let wall = wall.elapsed();
    assert_eq!(d.sizes().token, n as u64, "every preloaded token is live");
    row(
        &format!("preload {n} tokens"),
        format!(
            "{:.0} ev/s ({:.2} s in apply; {:.2} s wall incl. building events; slowest batch {:.0} ms)",
            n as f64 / in_apply.as_secs_f64(),
            in_apply.as_secs_f64(),
            wall.as_secs_f64(),
            slowest.as_secs_f64() * 1e3
        ),
        "",
    );
    debug_assert_eq!(out[0], n);

    // 3. Memory and disk right after the preload.
    let rss = proc_status_kib("VmRSS:");
    let hwm = proc_status_kib("VmHWM:");
    let t = Instant::now();
    d.flush().expect("flush");
    let flush = t.elapsed();
    let disk = d.size_on_disk();
    let kib = |v: Option<u64>| {
        v.map_or("n/a".to_string(), |k| {
            format!("{:.0} MiB", k as f64 / 1024.0)
        })
    };
    row(
        &format!("RSS at {n} live entries"),
        format!("VmRSS {} / VmHWM {}", kib(rss), kib(hwm)),
        "< 512 MiB",
    );
    row(
        "size_on_disk after flush",
        format!(
            "{:.0} MiB (flush took {:.2} s)",
            mib(disk),
            flush.as_secs_f64()
        ),
        "",
    );

    // 1b. Fresh mixed events on top.
    eprintln!("[apply] applying {n_apply} fresh mixed events");
    let base = n as u64;
    let (in_apply, out, slowest) = apply_all(&d, base..base + n_apply as u64, now, mixed_event);
    row(
        &format!("apply {n_apply} mixed into {n}"),
        format!(
            "{:.0} ev/s ({:.2} s; slowest batch {:.0} ms; changed {} unchanged {})",
            n_apply as f64 / in_apply.as_secs_f64(),
            in_apply.as_secs_f64(),
            slowest.as_secs_f64() * 1e3,
            out[0],
            out[1]
        ),
        ">= 50000 ev/s",
    );

    // 2. Lookups: half hits on a preloaded jti (answered by the first check), half
    // misses carrying jti, sid, sub and client_id (every rule consulted: 5 tree reads).
    if n_lookups > 0 {
        eprintln!("[lookup] {n_lookups} revoked_by calls");
        let overhead = {
            let mut v = Vec::with_capacity(10_000);
            for _ in 0..10_000 {
                let t = Instant::now();
                v.push(t.elapsed().as_nanos() as u32);
            }
            stats(v).p50
        };
        let mut mix = LookupMix::new(n);
        let mut hit_ns = Vec::with_capacity(n_lookups / 2 + 1);
        let mut miss_ns = Vec::with_capacity(n_lookups / 2 + 1);
        let mut wrong = 0usize;
        let loop_start = Instant::now();
        for _ in 0..n_lookups {
            let (token, hit) = mix.next(now);
            let t = Instant::now();
            let r = d.revoked_by(&token).expect("lookup");
            let ns = t.elapsed().as_nanos().min(u32::MAX as u128) as u32;
            if r.is_some() != hit {
                wrong += 1;
            }
            if hit {
                hit_ns.push(ns);
            } else {
                miss_ns.push(ns);
            }
        }
        let loop_secs = loop_start.elapsed().as_secs_f64();
        assert_eq!(wrong, 0, "lookups answered wrongly");
        let all: Vec<u32> = hit_ns.iter().chain(miss_ns.iter()).copied().collect();
        let fmt = |s: &LookupStats| {
            format!(
                "mean {:.0} ns, p50 {} ns, p99 {} ns, p99.9 {} ns, max {:.1} us",
                s.mean_ns,
                s.p50,
                s.p99,
                s.p999,
                s.max as f64 / 1e3
            )
        };
        row(
            &format!("revoked_by x{n_lookups} (all)"),
            fmt(&stats(all)),
            "",
        );
        row("  hits (token rule)", fmt(&stats(hit_ns)), "");
        row("  misses (5 rules)", fmt(&stats(miss_ns)), "");
        row(
            "  timing method",
            format!(
                "each call timed with Instant (overhead ~{overhead} ns, included); loop incl. id building {:.0} ns/call",
                loop_secs * 1e9 / n_lookups.max(1) as f64
            ),
            "",
        );
    } else {
        row("revoked_by", "skipped (REVSYNC_BENCH_LOOKUPS=0)".into(), "");
    }
    drop(d);
    drop(dir);

    // 4. Replay through a real broker.
    if n_replay > 0 {
        match replay(n_replay) {
            Ok(r) => {
                row(
                    &format!("publish {n_replay} native events"),
                    format!(
                        "{:.0} ev/s ({:.2} s, Publisher send + finish)",
                        n_replay as f64 / r.publish_secs,
                        r.publish_secs
                    ),
                    "",
                );
                let cpu = |c: Option<f64>| c.map_or("n/a".into(), |c| format!("{c:.1} s"));
                row(
                    &format!("replay {n_replay} from earliest"),
                    format!(
                        "{:.2} s = {:.0} ev/s (first position after {:.2} s; {} live entries)",
                        r.replay_secs,
                        n_replay as f64 / r.replay_secs,
                        r.first_position_secs,
                        r.entries
                    ),
                    "< 30 s",
                );
                row(
                    "  CPU during replay",
                    format!(
                        "tansu {}, bench process {} (over {:.1} s wall, {nproc} cores)",
                        cpu(r.broker_cpu),
                        cpu(r.self_cpu),
                        r.replay_secs
                    ),
                    "",
                );
                row(
                    "  VmRSS after replay",
                    format!(
                        "{} (both stores have lived in this process)",
                        kib(r.rss_after_kib)
                    ),
                    "",
                );
            }
            Err(e) => row("replay", format!("FAILED/SKIPPED: {e}"), "< 30 s"),
        }
    } else {
        row("replay", "skipped (REVSYNC_BENCH_REPLAY=0)".into(), "");
    }

    let (_, _, load_end) = machine();
    let mut command = String::new();
    for var in [
        "REVSYNC_BENCH_N",
        "REVSYNC_BENCH_APPLY",
        "REVSYNC_BENCH_LOOKUPS",
        "REVSYNC_BENCH_REPLAY",
    ] {
        if let Ok(v) = std::env::var(var) {
            let _ = write!(command, "{var}={v} ");
        }
    }
    command.push_str("cargo bench --bench ingest");

    println!();
    println!("revsync ingest bench");
    println!("command : {command}");
    println!("machine : {nproc} cpus, {model}; loadavg {load_start} at start, {load_end} at end");
    println!(
        "store   : sled, cache {} MiB, batches of {BATCH}, retention 24h/30s",
        CACHE_BYTES >> 20
    );
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    for (what, value, target) in &rows {
        if target.is_empty() {
            println!("{what:<w0$}  {value}");
        } else {
            println!("{what:<w0$}  {value:<w1$}  target {target}");
        }
    }
}
