//! Every acknowledgement revsync gives is followed here by `kill -9` and a restart, and
//! nothing acknowledged may be lost (invariant 2): a 202 from the push receiver in local
//! mode (the SET is on disk) and in bridge mode (the broker has it). The broker offset
//! kind of acknowledgement is tests/faults.rs. Also: the bridge answers 503 while the
//! broker cannot take the event, so the transmitter retries.

mod common;

use std::time::{Duration, Instant};

use common::broker::{eventually, free_port, get_json, wait_for_port, Broker};
use common::daemon::{Daemon, DaemonConfig};
use common::jwt::{claims_with, now, JwksServer, TestKey};
use revsync::formats::set::SESSION_REVOKED;
use serde_json::{json, Value};

const SECRET: &str = "transmitter-secret-0123456789";
const AUD: &str = "https://api.example.com";
const TOPIC: &str = "rev";

fn ssf_toml(port: u16, bridge: bool) -> String {
    let bridge = if bridge {
        format!("bridge_topic = \"{TOPIC}\"\n")
    } else {
        String::new()
    };
    format!("[ssf]\nlisten = \"127.0.0.1:{port}\"\nbearer_secret = \"{SECRET}\"\n{bridge}")
}

fn session_revoked(key: &TestKey, iss: &str, sid: &str) -> String {
    key.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &json!({"iss": iss, "aud": "receiver", "iat": now(),
            "jti": revsync::publish::new_event_id(),
            "events": {SESSION_REVOKED: {"subject": {"format": "opaque", "id": sid}}}}),
    )
}

/// Pushes one SET; the response.
async fn push(port: u16, set: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/ssf/events"))
        .bearer_auth(SECRET)
        .header("content-type", "application/secevent+jwt")
        .body(set.to_string())
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap()
}

async fn check(daemon: &Daemon, token: &str) -> Value {
    reqwest::Client::new()
        .post(daemon.url("/v1/check"))
        .json(&json!({ "token": token }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Runs blocking test plumbing (child processes, the broker) off the async workers'
/// hands, so the JWKS server keeps answering.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Tokens of sessions `{prefix}0..{prefix}{n}`, with their session ids.
fn session_tokens(key: &TestKey, iss: &str, prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let sid = format!("{prefix}{i}");
            let token = key.sign(&claims_with(
                iss,
                AUD,
                json!({"sid": sid, "iat": now() - 10}),
            ));
            (sid, token)
        })
        .collect()
}

/// Pushes a session-revoked SET for each session, one by one, each answered 202.
async fn push_all(ssf_port: u16, key: &TestKey, iss: &str, sessions: &[(String, String)]) {
    for (sid, _) in sessions {
        let resp = push(ssf_port, &session_revoked(key, iss, sid)).await;
        assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    }
}

/// Every session's token is answered revoked by `daemon`.
async fn assert_all_revoked(daemon: &Daemon, sessions: &[(String, String)], when: &str) {
    for (sid, token) in sessions {
        assert_eq!(
            check(daemon, token).await,
            json!({"active": false, "reason": "revoked"}),
            "{when}: session {sid} acknowledged with 202 was lost"
        );
    }
}

fn wait_ready(daemon: &Daemon) {
    blocking(|| {
        eventually(Duration::from_secs(60), "the daemon ready", || {
            (get_json(&daemon.url("/readyz"))?["ready"] == true).then_some(())
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_202_in_local_mode_survives_kill_9() {
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let iss = jwks.issuer();
    let broker = blocking(Broker::memory);
    blocking(|| broker.create_topic(TOPIC, 1));
    let dir = tempfile::tempdir().unwrap();
    let (port, ssf_port) = (free_port(), free_port());
    let config = DaemonConfig {
        extra_toml: ssf_toml(ssf_port, false),
        ..DaemonConfig::new(port, dir.path(), &broker, TOPIC).trusting(&jwks, AUD)
    }
    .write(&dir.path().join("revsync.toml"));
    for round in 0..3 {
        let sessions = session_tokens(&key, &iss, &format!("r{round}-s"), 5);
        let mut daemon = blocking(|| Daemon::spawn(&config, port));
        assert!(blocking(|| wait_for_port(
            ssf_port,
            Duration::from_secs(20)
        )));
        // Pushed one by one; the kill comes right after the last 202.
        push_all(ssf_port, &key, &iss, &sessions).await;
        blocking(|| daemon.kill9());
        let daemon = blocking(|| Daemon::spawn(&config, port));
        assert_all_revoked(&daemon, &sessions, &format!("round {round}: after kill -9")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_202_in_bridge_mode_survives_kill_9_of_the_bridge() {
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let iss = jwks.issuer();
    let broker = blocking(Broker::memory);
    blocking(|| broker.create_topic(TOPIC, 2));
    let dir = tempfile::tempdir().unwrap();
    let bridge_dir = dir.path().join("bridge");
    std::fs::create_dir_all(&bridge_dir).unwrap();
    let (port, ssf_port) = (free_port(), free_port());
    let bridge_config = DaemonConfig {
        extra_toml: ssf_toml(ssf_port, true),
        ..DaemonConfig::new(port, &bridge_dir, &broker, TOPIC).trusting(&jwks, AUD)
    }
    .write(&bridge_dir.join("revsync.toml"));
    let sessions = session_tokens(&key, &iss, "s", 5);
    let mut bridge = blocking(|| Daemon::spawn(&bridge_config, port));
    assert!(blocking(|| wait_for_port(
        ssf_port,
        Duration::from_secs(20)
    )));
    push_all(ssf_port, &key, &iss, &sessions).await;
    blocking(|| bridge.kill9());

    // A brand-new instance that only reads the topic has every acknowledged event.
    let reader_dir = dir.path().join("reader");
    std::fs::create_dir_all(&reader_dir).unwrap();
    let reader_port = free_port();
    let reader_config = DaemonConfig::new(reader_port, &reader_dir, &broker, TOPIC)
        .trusting(&jwks, AUD)
        .write(&reader_dir.join("revsync.toml"));
    let reader = blocking(|| Daemon::spawn(&reader_config, reader_port));
    wait_ready(&reader);
    assert_all_revoked(
        &reader,
        &sessions,
        "read from Kafka after the bridge's kill -9",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_answers_503_while_the_broker_cannot_take_the_event() {
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let iss = jwks.issuer();
    let mut broker = blocking(Broker::memory);
    blocking(|| broker.create_topic(TOPIC, 1));
    let dir = tempfile::tempdir().unwrap();
    let (port, ssf_port) = (free_port(), free_port());
    let config = DaemonConfig {
        extra_toml: ssf_toml(ssf_port, true),
        ..DaemonConfig::new(port, dir.path(), &broker, TOPIC).trusting(&jwks, AUD)
    }
    .write(&dir.path().join("revsync.toml"));
    let _bridge = blocking(|| Daemon::spawn(&config, port));
    assert!(blocking(|| wait_for_port(
        ssf_port,
        Duration::from_secs(20)
    )));
    let resp = push(ssf_port, &session_revoked(&key, &iss, "before")).await;
    assert_eq!(resp.status(), 202);
    blocking(|| broker.stop());
    let started = Instant::now();
    let resp = push(ssf_port, &session_revoked(&key, &iss, "during")).await;
    assert_eq!(resp.status(), 503, "answered after {:?}", started.elapsed());
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["err"], "temporarily_unavailable", "{body}");
}
