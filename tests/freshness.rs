//! Freshness against a real broker: when revsync cannot confirm it is caught up for
//! longer than `max_staleness`, each policy does what it declares; when the broker comes
//! back it is fresh again without a restart; a backlog at start-up keeps it unready.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Form, Json, Router};
use common::broker::{Broker, Storage};
use common::jwt::{claims_with, JwksServer, TestKey};
use jsonwebtoken::Algorithm;
use revsync::app::{self, Listener};
use revsync::config::{Config, IntrospectionConfig, OnStale, TopicConfig};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A real RFC 7662 endpoint: tokens in `inactive` are inactive, `failing` makes it 500.
#[derive(Default)]
struct AsState {
    inactive: Mutex<HashSet<String>>,
    failing: Mutex<bool>,
    calls: Mutex<usize>,
}

async fn introspect(
    State(s): State<Arc<AsState>>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Json<Value>, StatusCode> {
    *s.calls.lock().unwrap() += 1;
    // Basic rs:secret
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Basic cnM6c2VjcmV0") {
        return Err(StatusCode::UNAUTHORIZED);
    }
    if *s.failing.lock().unwrap() {
        return Err(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let token = form
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let active = !s.inactive.lock().unwrap().contains(&token);
    Ok(Json(json!({ "active": active })))
}

async fn start_as() -> (Arc<AsState>, String) {
    let state = Arc::new(AsState::default());
    let app = Router::new()
        .route("/introspect", post(introspect))
        .with_state(state.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (state, format!("http://{addr}/introspect"))
}

struct Running {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn start(
    broker: &Broker,
    jwks: &JwksServer,
    policy: OnStale,
    introspect_url: &str,
) -> Running {
    start_with(broker, jwks, policy, introspect_url, |_| {}).await
}

async fn start_with(
    broker: &Broker,
    jwks: &JwksServer,
    policy: OnStale,
    introspect_url: &str,
    adjust: impl FnOnce(&mut Config),
) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(broker.bootstrap(), dir.path().join("store"));
    config.kafka.topics = vec![TopicConfig {
        name: "rev".into(),
        format: Default::default(),
        issuer: None,
    }];
    config.kafka.watermark_interval = Duration::from_millis(100);
    config.kafka.metadata_interval = Duration::from_millis(500);
    let mut iss = jwks.issuer_config("api");
    iss.introspection = Some(IntrospectionConfig {
        endpoint: introspect_url.into(),
        client_id: "rs".into(),
        client_secret: "secret".into(),
    });
    config.issuers.push(iss);
    config.freshness.max_staleness = Duration::from_millis(1500);
    config.freshness.on_stale = policy;
    config.freshness.introspection_timeout = Duration::from_millis(500);
    adjust(&mut config);
    config.validate().unwrap();
    let listener = Listener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.describe().parse().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app::run(config, listener, stop.clone()));
    Running {
        addr,
        stop,
        task,
        _dir: dir,
    }
}

async fn check(r: &Running, token: &str) -> (StatusCode, Value, bool) {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/check", r.addr))
        .json(&json!({ "token": token }))
        .send()
        .await
        .unwrap();
    let stale_header = resp.headers().get("x-revsync-stale").is_some();
    (resp.status(), resp.json().await.unwrap(), stale_header)
}

async fn authz(r: &Running, token: &str) -> StatusCode {
    reqwest::Client::new()
        .get(format!("http://{}/v1/authz", r.addr))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

async fn ready(r: &Running) -> bool {
    match reqwest::get(format!("http://{}/readyz", r.addr)).await {
        Ok(resp) => resp.status() == StatusCode::OK,
        Err(_) => false,
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_stale_policy_holds_while_the_broker_is_down_and_freshness_returns_with_it() {
    let dir = tempfile::tempdir().unwrap();
    // SQLite storage: the log survives the broker's restart, as a real cluster's would.
    let mut broker = Broker::start(Storage::Sqlite(dir.path().join("log.db")));
    broker.create_topic("rev", 2);
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let (as_state, as_url) = start_as().await;
    let deny = start(&broker, &jwks, OnStale::Deny, &as_url).await;
    let allow = start(&broker, &jwks, OnStale::Allow, &as_url).await;
    let intro = start(&broker, &jwks, OnStale::Introspect, &as_url).await;
    let token = |sub: &str| key.sign(&claims_with(&jwks.issuer(), "api", json!({ "sub": sub })));
    let fresh = token("fresh");
    for r in [&deny, &allow, &intro] {
        wait_until("ready", Duration::from_secs(30), || ready(r)).await;
        let (status, body, stale) = check(r, &fresh).await;
        assert_eq!(
            (status, body["active"].clone(), stale),
            (StatusCode::OK, json!(true), false)
        );
    }
    assert_eq!(
        *as_state.calls.lock().unwrap(),
        0,
        "no introspection while fresh"
    );

    broker.stop();
    for r in [&deny, &allow, &intro] {
        wait_until(
            "stale after max_staleness",
            Duration::from_secs(20),
            || async { !ready(r).await },
        )
        .await;
    }

    // deny: inactive "stale", and 503 for proxies so they can tell it from "revoked".
    let t = token("deny");
    let (_, body, _) = check(&deny, &t).await;
    assert_eq!(
        body,
        json!({"active": false, "reason": "stale", "undecided": true})
    );
    assert_eq!(authz(&deny, &t).await, StatusCode::SERVICE_UNAVAILABLE);

    // allow: answers from local state, marked stale.
    let (status, body, header) = check(&allow, &t).await;
    assert_eq!(
        (
            status,
            body["active"].clone(),
            body["stale"].clone(),
            header
        ),
        (StatusCode::OK, json!(true), json!(true), true)
    );
    assert_eq!(authz(&allow, &t).await, StatusCode::OK);

    // introspect: the issuer decides…
    let (_, body, _) = check(&intro, &t).await;
    assert_eq!(body["active"], json!(true), "{body}");
    let revoked_at_as = token("revoked-at-as");
    as_state
        .inactive
        .lock()
        .unwrap()
        .insert(revoked_at_as.clone());
    let (_, body, _) = check(&intro, &revoked_at_as).await;
    assert_eq!(body, json!({"active": false, "reason": "revoked"}));
    assert!(*as_state.calls.lock().unwrap() >= 2);
    // …and when it cannot, the answer falls back to deny.
    *as_state.failing.lock().unwrap() = true;
    let (_, body, _) = check(&intro, &token("as-down")).await;
    assert_eq!(
        body,
        json!({"active": false, "reason": "stale", "undecided": true})
    );
    assert_eq!(
        authz(&intro, &token("as-down-2")).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    *as_state.failing.lock().unwrap() = false;

    // The broker returns: fresh again without restarting revsync.
    broker.restart();
    for r in [&deny, &allow, &intro] {
        wait_until("fresh again", Duration::from_secs(30), || ready(r)).await;
    }
    let calls = *as_state.calls.lock().unwrap();
    let t = token("after");
    for r in [&deny, &allow, &intro] {
        let (_, body, stale) = check(r, &t).await;
        assert_eq!(
            (body["active"].clone(), body.get("stale").cloned(), stale),
            (json!(true), None, false)
        );
    }
    assert_eq!(
        *as_state.calls.lock().unwrap(),
        calls,
        "no introspection once fresh"
    );
    for r in [deny, allow, intro] {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_at_start_up_keeps_revsync_unready_until_it_is_applied() {
    let broker = Broker::memory();
    broker.create_topic("rev", 2);
    let n = 60_000u64;
    let exp = revsync::unix_now() + 3600;
    let bootstrap = broker.bootstrap();
    tokio::task::spawn_blocking(move || {
        let p =
            revsync::publish::Publisher::new(&revsync::config::KafkaConfig::new(bootstrap), "rev")
                .unwrap();
        for i in 0..n {
            p.send(&common::token_event(format!("j{i}"), exp)).unwrap();
        }
        p.finish(Duration::from_secs(60)).unwrap();
    })
    .await
    .unwrap();

    let key = TestKey::rsa("k1", Algorithm::RS256);
    let jwks = JwksServer::with_keys(&[&key]).await;
    let r = start(&broker, &jwks, OnStale::Deny, "http://127.0.0.1:1/unused").await;
    let client = reqwest::Client::new();
    let mut saw_unready = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let resp = match client.get(format!("http://{}/readyz", r.addr)).send().await {
            Ok(resp) => resp,
            Err(_) => continue,
        };
        let is_ready = resp.status() == StatusCode::OK;
        let status: Value = client
            .get(format!("http://{}/v1/status", r.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let applied = status["denylist"]["token"].as_u64().unwrap();
        if is_ready {
            // Ready means every event published before start-up is applied.
            assert_eq!(applied, n, "ready before the backlog was applied");
            break;
        }
        saw_unready = true;
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became ready ({applied} of {n} applied)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        saw_unready,
        "a {n}-event backlog is not applied before the first readiness probe"
    );
    r.stop().await;
}

fn heartbeats(broker: &Broker, iss: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_revsync"))
        .args([
            "publish",
            "--brokers",
            &broker.bootstrap(),
            "--topic",
            "rev",
            "heartbeat",
            "--iss",
            iss,
            "--every",
            "200ms",
        ])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_publisher_makes_the_denylist_stale_even_with_the_broker_up() {
    let broker = Broker::memory();
    broker.create_topic("rev", 2);
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let r = start_with(
        &broker,
        &jwks,
        OnStale::Deny,
        "http://127.0.0.1:1/unused",
        |c| {
            c.freshness.heartbeat_max_age = Some(Duration::from_millis(1500));
        },
    )
    .await;
    let token = key.sign(&claims_with(&jwks.issuer(), "api", json!({ "sub": "hb" })));
    let client = reqwest::Client::new();
    let status = || async {
        let s: Value = client
            .get(format!("http://{}/v1/status", r.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        s
    };

    // Caught up with the bus, but no heartbeat yet: not ready, and it says why.
    wait_until("caught up", Duration::from_secs(30), || async {
        status().await["freshness"]["age_ms"].is_u64()
    })
    .await;
    assert!(!ready(&r).await);
    assert_eq!(
        status().await["freshness"]["heartbeat_missing"],
        json!(true)
    );
    assert_eq!(check(&r, &token).await.1["reason"], json!("stale"));

    let mut publisher = heartbeats(&broker, &jwks.issuer());
    wait_until("ready with heartbeats", Duration::from_secs(30), || {
        ready(&r)
    })
    .await;
    assert_eq!(check(&r, &token).await.1["active"], json!(true));

    // The publisher stops; the broker and revsync are fine, the answer is not vouched for.
    let _ = publisher.kill();
    let _ = publisher.wait();
    wait_until(
        "stale without heartbeats",
        Duration::from_secs(10),
        || async { !ready(&r).await },
    )
    .await;
    assert_eq!(
        status().await["freshness"]["heartbeat_missing"],
        json!(true)
    );
    assert!(
        status().await["freshness"]["age_ms"].as_u64().unwrap() < 1500,
        "the bus itself is fresh"
    );
    assert_eq!(
        check(&r, &token).await.1,
        json!({"active": false, "reason": "stale", "undecided": true})
    );

    let mut publisher = heartbeats(&broker, &jwks.issuer());
    wait_until("fresh again", Duration::from_secs(30), || ready(&r)).await;
    assert_eq!(check(&r, &token).await.1["active"], json!(true));
    let _ = publisher.kill();
    let _ = publisher.wait();
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_steady_stream_never_makes_revsync_stale() {
    let broker = Broker::memory();
    broker.create_topic("rev", 2);
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let r = start(&broker, &jwks, OnStale::Deny, "http://127.0.0.1:1/unused").await;
    wait_until("ready", Duration::from_secs(30), || ready(&r)).await;

    // ~3,000 events/s for 5 s: lag is almost never exactly zero at a watermark round.
    let bootstrap = broker.bootstrap();
    let stream = tokio::task::spawn_blocking(move || {
        let p =
            revsync::publish::Publisher::new(&revsync::config::KafkaConfig::new(bootstrap), "rev")
                .unwrap();
        let exp = revsync::unix_now() + 3600;
        for i in 0..250 {
            for j in 0..60 {
                p.send(&common::token_event(format!("s{i}-{j}"), exp))
                    .unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        p.finish(Duration::from_secs(30)).unwrap();
    });
    let client = reqwest::Client::new();
    let mut worst_age = 0;
    while !stream.is_finished() {
        let s: Value = client
            .get(format!("http://{}/v1/status", r.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let age = s["freshness"]["age_ms"]
            .as_u64()
            .expect("caught up before the stream");
        worst_age = worst_age.max(age);
        assert_eq!(
            s["ready"],
            json!(true),
            "went unready under a steady stream: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stream.await.unwrap();
    // max_staleness is 1.5 s here; rounds run every 100 ms.
    assert!(
        worst_age < 1_500,
        "freshness age reached {worst_age} ms under load"
    );
    r.stop().await;
}
