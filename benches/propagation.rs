//! Publish → the check denies: end-to-end revocation delay through a real broker.
//!
//! Starts Tansu (memory engine) on a free loopback port, the demo issuer, and the daemon
//! in-process; then, one at a time, publishes a revocation for a token that is active
//! and polls `POST /v1/check` over keep-alive until it answers `revoked`.
//!
//! `cargo bench --bench propagation` (REVSYNC_BENCH_REVOCATIONS=N, default 1000;
//! `REVSYNC_TANSU`: the Tansu binary, else the `.ci/run` cache, else `tansu` on PATH).

#[path = "../tests/common/broker.rs"]
#[allow(dead_code)]
mod broker;
#[path = "support/host.rs"]
mod host;

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::Broker;
use revsync::app::{self, Listener};
use revsync::config::{Config, KafkaConfig};
use revsync::dev::{issuer_router, DemoIssuer};
use revsync::event::{Event, Revocation};
use revsync::publish::Publisher;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// `POST /v1/check` of `body` at `api`: the JSON answer.
async fn check(client: &reqwest::Client, api: &str, body: &Value) -> Value {
    let response = client.post(api).json(body).send().await.unwrap();
    response.json().await.unwrap()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("REVSYNC_BENCH_REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // Tansu (memory engine) on a free loopback port; the daemon reads the default topic.
    let broker = Broker::memory();
    broker.create_topic("revocations", 3);
    let brokers = broker.bootstrap();

    let issuer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer_url = format!("http://{}", issuer_listener.local_addr().unwrap());
    let issuer = Arc::new(DemoIssuer::generate(issuer_url).unwrap());
    let router = issuer_router(issuer.clone());
    tokio::spawn(async move { axum::serve(issuer_listener, router).await });

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(brokers.clone(), dir.path().join("store"));
    config.issuers.push(issuer.config());
    let fetch_wait = config.kafka.fetch_wait_max;
    let listener = Listener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}/v1/check", listener.describe());
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(app::run(config, listener, stop.clone()));

    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .get(api.replace("/v1/check", "/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "daemon never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let iss = issuer.config().issuer;
    let tokens: Vec<(String, String)> = (0..n)
        .map(|i| {
            let jti = format!("prop-{i}");
            (issuer.token("alice", &jti).unwrap(), jti)
        })
        .collect();
    let publisher = Publisher::new(&KafkaConfig::new(brokers), "revocations").unwrap();
    let publisher = Arc::new(publisher);
    let mut delays_ms = Vec::with_capacity(n);
    let mut polls = 0u64;
    for (token, jti) in &tokens {
        let body = serde_json::json!({ "token": token });
        let answer = check(&client, &api, &body).await;
        assert_eq!(answer["active"], true, "token active before its revocation");
        let event = Event {
            id: revsync::publish::new_event_id(),
            event_time: revsync::unix_now(),
            revocation: Revocation::Token {
                iss: iss.clone(),
                jti: jti.clone(),
                exp: None,
            },
            reason: None,
        };
        let started = Instant::now();
        let p = publisher.clone();
        // send() only queues; the record leaves within linger.ms (1 ms).
        tokio::task::spawn_blocking(move || p.send(&event).unwrap())
            .await
            .unwrap();
        loop {
            polls += 1;
            if check(&client, &api, &body).await["reason"] == "revoked" {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "revocation not seen in 10 s"
            );
        }
        delays_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    publisher.finish(Duration::from_secs(10)).unwrap();
    stop.cancel();
    let _ = daemon.await;

    let mut sorted = delays_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
    let cpu = host::cpu_model();
    println!("revsync propagation bench");
    println!("command : cargo bench --bench propagation");
    println!(
        "machine : {} cpus, {cpu}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("setup   : Tansu 0.6.0 memory://, 3 partitions, loopback; fetch_wait_max {fetch_wait:?}; publisher linger.ms 1");
    println!(
        "measure : publish (queue) -> POST /v1/check answers revoked, one revocation at a time"
    );
    println!(
        "publish -> check denies, {n} revocations: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, mean {:.1} ms ({} checks polled)",
        pct(&sorted, 0.50),
        pct(&sorted, 0.90),
        pct(&sorted, 0.99),
        sorted[sorted.len() - 1],
        mean,
        polls
    );
    println!("target  : p99 < 100 ms");
}
