//! Faults while events stream in, with revsync as a child process and a real broker:
//! repeated kill -9 at random moments, and the broker going away and coming back.
//! Afterwards every event must be in the store and the positions must cover the log.

mod common;

use std::path::Path;
use std::time::Duration;

use common::broker::{eventually, get_json, get_text, Broker, Storage};
use common::daemon::{Daemon, DaemonConfig};
use revsync::config::KafkaConfig;
use revsync::denylist::{Denylist, Retention, TokenRef};
use revsync::event::{Event, Revocation};
use revsync::publish::Publisher;

fn events(prefix: &str, n: usize) -> Vec<Event> {
    let exp = revsync::unix_now() + 3600;
    (0..n)
        .map(|i| Event {
            id: format!("{prefix}-{i}"),
            event_time: revsync::unix_now(),
            revocation: Revocation::Token {
                iss: "A".into(),
                jti: format!("{prefix}-{i}"),
                exp: Some(exp),
            },
            reason: None,
        })
        .collect()
}

/// Publishes `events` in `chunks` slices with `pause` between them, from a thread.
fn stream(
    broker: &Broker,
    events: Vec<Event>,
    chunks: usize,
    pause: Duration,
) -> std::thread::JoinHandle<()> {
    let bootstrap = broker.bootstrap();
    std::thread::spawn(move || {
        let p = Publisher::new(&KafkaConfig::new(bootstrap), "rev").unwrap();
        let size = events.len().div_ceil(chunks);
        for chunk in events.chunks(size) {
            for e in chunk {
                p.send(e).unwrap();
            }
            p.finish(Duration::from_secs(120)).unwrap();
            std::thread::sleep(pause);
        }
    })
}

fn tokens_applied(daemon: &Daemon) -> Option<u64> {
    get_json(&daemon.url("/v1/status"))?["denylist"]["token"].as_u64()
}

/// `revsync_ingest_log_resets_total` of every partition, after a few more watermark
/// rounds (200 ms each) than catching up took: an intact log must never be taken for a
/// reset one, neither after kill -9 (positions inside a batch, below Tansu memory's
/// lagging high watermark) nor after a broker restart.
fn log_resets_after_a_while(daemon: &Daemon) -> Vec<u64> {
    std::thread::sleep(Duration::from_secs(2));
    let text = get_text(&daemon.url("/metrics")).expect("GET /metrics");
    let counts: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("revsync_ingest_log_resets_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    assert!(!counts.is_empty(), "no log reset counter in\n{text}");
    counts
}

fn assert_all_present(store: &Path, events: &[Event]) {
    let d = Denylist::open(
        store,
        64 << 20,
        Retention::new(Duration::from_secs(86400), Duration::from_secs(30)),
    )
    .unwrap();
    let missing: Vec<&str> = events
        .iter()
        .filter_map(|e| {
            let Revocation::Token { jti, .. } = &e.revocation else {
                unreachable!()
            };
            let t = TokenRef {
                iss: "A",
                jti: Some(jti),
                ..Default::default()
            };
            (d.revoked_by(&t).unwrap() != Some("token")).then_some(jti.as_str())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} events missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(d.sizes().token, events.len() as u64);
    assert_eq!(
        d.positions()
            .unwrap()
            .iter()
            .map(|p| p.next_offset)
            .sum::<i64>(),
        events.len() as i64
    );
}

/// `revsync denylist`-free look at a stopped daemon's store: the tokens it holds.
fn tokens_stored(store: &Path) -> u64 {
    Denylist::open(
        store,
        16 << 20,
        Retention::new(Duration::from_secs(86400), Duration::from_secs(30)),
    )
    .unwrap()
    .sizes()
    .token
}

#[test]
fn kill_9_right_after_progress_loses_nothing_acknowledged() {
    // Killed mid-stream, the daemon resumes inside a record batch: see Broker::sqlite.
    let log = tempfile::tempdir().unwrap();
    let broker = Broker::sqlite(log.path());
    broker.create_topic("rev", 3);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let port = common::broker::free_port();
    let config = DaemonConfig {
        issuer: "A".into(),
        audience: "api".into(),
        ..DaemonConfig::new(port, dir.path(), &broker, "rev")
    }
    .write(&dir.path().join("revsync.toml"));
    let all = events("k", 30_000);
    let publisher = stream(&broker, all.clone(), 10, Duration::from_millis(150));

    // A cheap xorshift seeded from the clock: the kill moments differ run to run, and
    // the seed is printed so a failure can be replayed.
    let mut seed = revsync::unix_now_ms() | 1;
    println!("kill schedule seed {seed}");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut acknowledged = 0;
    for round in 0..5 {
        let mut daemon = Daemon::spawn(&config, port);
        // Kill only after this run applied something (a kill before any work proves
        // nothing), a random number of status polls later.
        let before = eventually(Duration::from_secs(60), "progress after a restart", || {
            tokens_applied(&daemon).filter(|n| *n > acknowledged)
        });
        let mut seen = before;
        for _ in 0..next() % 8 {
            seen = tokens_applied(&daemon).unwrap_or(seen);
        }
        daemon.kill9();
        // What the daemon reported applied was durable when it said so.
        let stored = tokens_stored(&store);
        assert!(
            stored >= seen,
            "round {round}: {seen} tokens reported applied, {stored} stored after kill -9"
        );
        acknowledged = stored;
        if acknowledged == all.len() as u64 {
            break;
        }
    }
    publisher.join().unwrap();

    let mut daemon = Daemon::spawn(&config, port);
    eventually(
        Duration::from_secs(120),
        "every event after the last restart",
        || (tokens_applied(&daemon)? == all.len() as u64).then_some(()),
    );
    assert_eq!(log_resets_after_a_while(&daemon), vec![0, 0, 0]);
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    assert_all_present(&store, &all);
}

#[test]
fn broker_stopped_and_restarted_mid_stream_loses_nothing() {
    let log = tempfile::tempdir().unwrap();
    // SQLite storage: the log survives the broker's restart, as a real cluster's would.
    let mut broker = Broker::start(Storage::Sqlite(log.path().join("log.db")));
    broker.create_topic("rev", 2);
    let dir = tempfile::tempdir().unwrap();
    let port = common::broker::free_port();
    let config = DaemonConfig {
        issuer: "A".into(),
        audience: "api".into(),
        ..DaemonConfig::new(port, dir.path(), &broker, "rev")
    }
    .write(&dir.path().join("revsync.toml"));
    let mut daemon = Daemon::spawn(&config, port);

    // One publisher streams throughout: a first part, then (while the broker is down,
    // queued in librdkafka) the rest, delivered once the broker is back.
    let all = events("stream", 6_000);
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    let (paused_tx, paused_rx) = std::sync::mpsc::channel::<()>();
    let bootstrap = broker.bootstrap();
    let to_send = all.clone();
    let publisher = std::thread::spawn(move || {
        let p = Publisher::new(&KafkaConfig::new(bootstrap), "rev").unwrap();
        for (i, e) in to_send.iter().enumerate() {
            if i == 2_000 {
                p.finish(Duration::from_secs(60)).unwrap();
                paused_tx.send(()).unwrap();
                resume_rx.recv().unwrap();
            }
            p.send(e).unwrap();
        }
        p.finish(Duration::from_secs(120)).unwrap();
    });
    paused_rx.recv().unwrap();
    // Mid-stream: the daemon has applied part of what was published when the broker
    // goes away.
    let applied = eventually(Duration::from_secs(60), "some events applied", || {
        tokens_applied(&daemon).filter(|n| *n > 0)
    });
    broker.stop();
    resume_tx.send(()).unwrap();
    // revsync keeps serving while the broker is gone, and forgets nothing.
    let during = eventually(
        Duration::from_secs(10),
        "status while the broker is down",
        || tokens_applied(&daemon),
    );
    assert!(during >= applied, "{during} < {applied}");
    assert!(
        during < all.len() as u64,
        "the stream was not cut: {during}"
    );
    broker.restart();
    publisher.join().unwrap();
    eventually(
        Duration::from_secs(60),
        "every event after the outage",
        || (tokens_applied(&daemon)? == all.len() as u64).then_some(()),
    );
    assert_eq!(log_resets_after_a_while(&daemon), vec![0, 0]);
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    assert_all_present(&dir.path().join("store"), &all);
}
