//! A broker that comes back with an empty log (memory storage restarted, SQLite file
//! lost, topic deleted and recreated): revsync's stored positions are then beyond the log
//! end, and new revocations land at offsets it has already passed. Tansu never answers
//! OFFSET_OUT_OF_RANGE, so revsync must notice on its own from the watermarks, count it,
//! refuse to vouch while it re-reads, and deny the new revocations.
//!
//! Only the SQLite test keeps the daemon running through the reset, with the broker
//! brought back from a snapshot of its empty log (same topic, same topic id): a consumer
//! whose topic id vanishes under it on Tansu can crash librdkafka 2.12.1 (see
//! `Broker::restart_from_snapshot`), so the cases with a topic created again stop
//! revsync meanwhile, as a crash and restart would.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::{eventually, free_port, get_json, get_text, Broker, Storage};
use common::daemon::{Daemon, DaemonConfig};
use common::ingest::Ingesting;
use common::jwt::{claims_with, JwksServer, TestKey};
use revsync::config::{KafkaConfig, TopicConfig};
use revsync::denylist::{Retention, TokenRef};
use revsync::metrics::PartitionLabels;
use revsync::publish::Publisher;
use serde_json::{json, Value};

const TOPIC: &str = "rev";
/// The issuer of `common::token_event`.
const ISS: &str = "A";
const AUD: &str = "api";
const WAIT: Duration = Duration::from_secs(45);

fn publish(broker: &Broker, prefix: &str, n: usize) {
    let p = Publisher::new(&KafkaConfig::new(broker.bootstrap()), TOPIC).unwrap();
    let exp = revsync::unix_now() + 3600;
    for i in 0..n {
        p.send(&common::token_event(format!("{prefix}-{i}"), exp))
            .unwrap();
    }
    p.finish(Duration::from_secs(30)).unwrap();
}

/// `revsync_ingest_log_resets_total` per partition of `TOPIC`, from a `/metrics` text.
fn log_resets(metrics: &str) -> Vec<(i32, u64)> {
    let prefix = format!("revsync_ingest_log_resets_total{{topic=\"{TOPIC}\",partition=\"");
    let mut out: Vec<(i32, u64)> = metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (partition, value) = rest.split_once("\"} ")?;
            Some((partition.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

fn positions(status: &Value) -> Vec<(i32, i64)> {
    status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == TOPIC)
        .map(|p| {
            (
                p["partition"].as_i64().unwrap() as i32,
                p["position"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

struct Sidecar {
    http: reqwest::Client,
    port: u16,
    key: TestKey,
}

impl Sidecar {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn token(&self, jti: &str) -> String {
        self.key.sign(&claims_with(ISS, AUD, json!({ "jti": jti })))
    }

    async fn check(&self, jti: &str) -> Value {
        let resp = self
            .http
            .post(self.url("/v1/check"))
            .json(&json!({ "token": self.token(jti) }))
            .send()
            .await
            .expect("POST /v1/check");
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// Polls until the token with `jti` is denied as revoked (not merely stale).
    async fn await_revoked(&self, jti: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let body = self.check(jti).await;
            if body == json!({"active": false, "reason": "revoked"}) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{jti} not denied as revoked within {WAIT:?}; last answer {body}; status {}",
                get_json(&self.url("/v1/status")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn await_ready(&self) {
        let deadline = Instant::now() + WAIT;
        while get_json(&self.url("/readyz")).is_none_or(|r| r["ready"] != json!(true)) {
            assert!(Instant::now() < deadline, "not ready within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn metrics(&self) -> String {
        get_text(&self.url("/metrics")).expect("GET /metrics")
    }

    fn status(&self) -> Value {
        get_json(&self.url("/v1/status")).expect("GET /v1/status")
    }
}

/// A daemon trusting `key` for issuer "A", watermarks every 500 ms, `on_stale = deny`
/// with a bound (30 s) far longer than any test outage: a stale answer here means
/// revsync itself refused to vouch.
async fn setup(broker: &Broker, dir: &Path) -> (Sidecar, std::path::PathBuf, JwksServer) {
    let key = TestKey::ec_p256("reset-k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let port = free_port();
    let config = DaemonConfig {
        issuer: ISS.into(),
        jwks_uri: jwks.jwks_uri(),
        audience: AUD.into(),
        watermark_interval: Some("500ms"),
        issuer_extra: r#"algorithms = ["ES256"]"#.into(),
        extra_toml: "[freshness]\nmax_staleness = \"30s\"\non_stale = \"deny\"\n".into(),
        ..DaemonConfig::new(port, dir, broker, TOPIC)
    }
    .write(&dir.join("revsync.toml"));
    let sidecar = Sidecar {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
        port,
        key,
    };
    (sidecar, config, jwks)
}

/// Samples `/readyz` every 20 ms from a thread until dropped.
struct ReadinessLog {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Value>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReadinessLog {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = get_json(&url) {
                        samples.lock().unwrap().push(r);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Self {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Value> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

impl Drop for ReadinessLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_log_lost_under_a_running_daemon() {
    let log = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(Storage::Sqlite(log.path().join("log.db")));
    broker.create_topic(TOPIC, 2);
    let empty = log.path().join("empty.db");
    broker.snapshot(&empty);
    let dir = tempfile::tempdir().unwrap();
    let (s, config, _jwks) = setup(&broker, dir.path()).await;
    let mut daemon = Daemon::spawn(&config, s.port);

    const K: usize = 40;
    publish(&broker, "before", K);
    s.await_revoked("before-0").await;
    eventually(WAIT, "every event before the reset", || {
        (s.status()["denylist"]["token"] == json!(K)).then_some(())
    });
    s.await_ready().await;
    let before = positions(&s.status());
    assert_eq!(before.iter().map(|(_, o)| o).sum::<i64>(), K as i64);
    assert!(before.iter().all(|(_, o)| *o > 0), "{before:?}");
    assert_eq!(
        log_resets(&s.metrics()),
        vec![(0, 0), (1, 0)],
        "the counter is born at zero"
    );

    // The broker comes back on the same port with its log as it was before any record
    // (say, its storage restored from an old backup): the new revocations get offsets
    // revsync has passed.
    let readiness = ReadinessLog::start(s.url("/readyz"));
    broker.restart_from_snapshot(&empty);
    const M: usize = 5;
    publish(&broker, "after", M);
    for i in 0..M {
        s.await_revoked(&format!("after-{i}")).await;
    }
    s.await_ready().await;
    let samples = readiness.finish();

    // Counted once per partition.
    assert_eq!(log_resets(&s.metrics()), vec![(0, 1), (1, 1)]);
    // It refused to vouch while it read again: stale by its own account, not by age.
    assert!(
        samples.iter().any(|r| r["ready"] == json!(false)
            && r["freshness"]["stale"] == json!(true)
            && r["freshness"]["age_ms"]
                .as_u64()
                .is_some_and(|a| a < 30_000)
            && r["freshness"]["store_failing"] == json!(false)),
        "/readyz never reported the recovery: {samples:?}"
    );
    eventually(WAIT, "positions at the new log end", || {
        let p = positions(&s.status());
        (p.iter().map(|(_, o)| o).sum::<i64>() == M as i64).then_some(())
    });
    // What was revoked before stays revoked.
    assert_eq!(
        s.check("before-7").await,
        json!({"active": false, "reason": "revoked"})
    );

    // A restart resumes from the lowered positions kept in the store: it neither
    // finds another reset nor misses what comes next.
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    publish(&broker, "later", 3);
    let _daemon = Daemon::spawn(&config, s.port);
    for i in 0..3 {
        s.await_revoked(&format!("later-{i}")).await;
    }
    s.await_ready().await;
    assert_eq!(log_resets(&s.metrics()), vec![(0, 0), (1, 0)]);
    let after = positions(&s.status());
    assert_eq!(
        after.iter().map(|(_, o)| o).sum::<i64>(),
        (M + 3) as i64,
        "{after:?}"
    );
}

/// Memory storage: its high watermark lags the log end after multi-record batches, so a
/// high watermark below the position proves nothing by itself; and the broker comes back
/// without the topic (a consumer assigned to a vanished topic may crash librdkafka on
/// Tansu, see `Broker::restart_from_snapshot`), so the daemon is down meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_log_lost_while_the_daemon_was_down() {
    let mut broker = Broker::memory();
    broker.create_topic(TOPIC, 1);
    let dir = tempfile::tempdir().unwrap();
    let (s, config, _jwks) = setup(&broker, dir.path()).await;
    let mut daemon = Daemon::spawn(&config, s.port);
    publish(&broker, "before", 30);
    s.await_revoked("before-29").await;
    s.await_ready().await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));

    broker.restart_empty();
    broker.create_topic(TOPIC, 1);
    // One batch: the high watermark says 1 while the log ends at 4.
    publish(&broker, "after", 4);
    let mut daemon = Daemon::spawn(&config, s.port);
    for i in 0..4 {
        s.await_revoked(&format!("after-{i}")).await;
    }
    s.await_ready().await;
    assert_eq!(log_resets(&s.metrics()), vec![(0, 1)]);
    assert_eq!(positions(&s.status()), vec![(0, 4)]);

    // Started again on an intact log whose high watermark (1) is below the stored
    // position (4): no reset.
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    let _daemon = Daemon::spawn(&config, s.port);
    s.await_ready().await;
    // Long enough for the watcher to have judged the partition (rounds of 500 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(log_resets(&s.metrics()), vec![(0, 0)]);
    let status = s.status();
    assert_eq!(positions(&status), vec![(0, 4)]);
    assert_eq!(status["partitions"][0]["high_watermark"], json!(1));
    assert_eq!(status["ready"], json!(true));
}

fn revoked(ingest: &Ingesting, jti: &str) -> bool {
    ingest
        .denylist
        .revoked_by(&TokenRef {
            iss: ISS,
            jti: Some(jti),
            ..Default::default()
        })
        .unwrap()
        .is_some()
}

#[test]
fn topic_recreated_with_fewer_partitions_while_stopped() {
    let broker = Broker::memory();
    broker.create_topic(TOPIC, 3);
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    kafka.topics = vec![TopicConfig {
        name: TOPIC.into(),
        format: Default::default(),
        issuer: None,
    }];
    kafka.watermark_interval = Duration::from_millis(200);
    kafka.metadata_interval = Duration::from_millis(500);
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        Ingesting::start_with(
            &kafka,
            dir.path(),
            Retention::new(Duration::from_secs(86400), Duration::from_secs(30)),
            None,
        )
    };
    let ingest = start();
    publish(&broker, "before", 30);
    eventually(WAIT, "events before", || {
        (ingest.denylist.sizes().token == 30 && ingest.state.caught_up_at_ms().is_some())
            .then_some(())
    });
    let stored = ingest.denylist.positions().unwrap();
    assert_eq!(stored.len(), 3);
    // All 3 new events go to the one partition left: it must have been past them.
    assert!(
        stored[0].partition == 0 && stored[0].next_offset > 3,
        "{stored:?}"
    );
    // Stopped meanwhile: a consumer assigned to a vanished topic may crash librdkafka
    // on Tansu (see `Broker::restart_from_snapshot`).
    ingest.stop();
    broker.delete_topic(TOPIC);
    broker.create_topic(TOPIC, 1);
    publish(&broker, "after", 3);
    let recreated_ms = revsync::unix_now_ms();

    let ingest = start();
    eventually(WAIT, "events after", || {
        (0..3)
            .all(|i| revoked(&ingest, &format!("after-{i}")))
            .then_some(())
    });
    let resets = ingest.metrics.log_resets.get_or_create(&PartitionLabels {
        topic: TOPIC.into(),
        partition: 0,
    });
    eventually(WAIT, "the reset of partition 0 counted", || {
        (resets.get() == 1).then_some(())
    });
    // The partitions that went away neither block freshness nor linger in the status,
    // and are not taken for resets.
    eventually(WAIT, "caught up with the recreated topic", || {
        ingest
            .state
            .caught_up_at_ms()
            .is_some_and(|t| t > recreated_ms)
            .then_some(())
    });
    let parts: Vec<i32> = ingest
        .state
        .partitions()
        .iter()
        .map(|p| p.partition)
        .collect();
    assert_eq!(parts, vec![0]);
    let text = ingest.metrics.encode();
    assert!(
        !text.contains(&format!(
            "revsync_ingest_log_resets_total{{topic=\"{TOPIC}\",partition=\"1\"}}"
        )),
        "{text}"
    );
    assert_eq!(ingest.denylist.sizes().token, 33);
    assert!(revoked(&ingest, "before-0"));
}
