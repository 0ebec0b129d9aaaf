//! End to end: the real `revsync` binary against a real Kafka-protocol broker (Tansu)
//! and a real JWKS server. Revocations go in through the `revsync publish` CLI, exactly
//! as an operator or an authorization server would send them, and come out of
//! `POST /v1/check`.

mod common;

use std::time::{Duration, Instant};

use common::broker::{free_port, Broker};
use common::daemon::{self, Daemon, DaemonConfig};
use common::jwt::{claims_with, now, JwksServer, TestKey};
use serde_json::{json, Value};

const AUD: &str = "https://api.example.com";
const TOPIC: &str = "revocations";
const PROPAGATION: Duration = Duration::from_secs(20);

/// `revsync publish --brokers … --topic revocations <what…>`; panics unless it exits 0.
fn publish(broker: &Broker, what: &[&str]) {
    let out = daemon::publish(broker, TOPIC, what);
    // It prints the event it sent, in the native format.
    let event: Value = serde_json::from_slice(&out.stdout).expect("publish prints the event");
    assert_eq!(event["v"], json!(1));
    assert_eq!(event["type"], json!(what[0]));
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn check(&self, token: &str) -> Value {
        let resp = self
            .http
            .post(format!("{}/v1/check", self.base))
            .json(&json!({ "token": token }))
            .send()
            .await
            .expect("POST /v1/check");
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    async fn assert_active(&self, token: &str, what: &str) {
        let body = self.check(token).await;
        assert_eq!(body["active"], json!(true), "{what}: {body}");
    }

    /// Polls until `token` is revoked; returns how long that took.
    async fn await_revoked(&self, token: &str, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            let body = self.check(token).await;
            if body == json!({"active": false, "reason": "revoked"}) {
                return start.elapsed();
            }
            assert_eq!(body["active"], json!(true), "{what}: unexpected {body}");
            assert!(
                start.elapsed() < PROPAGATION,
                "{what}: not revoked within {PROPAGATION:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn status(&self) -> Value {
        let resp = self.get("/v1/status").await;
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_published_with_the_cli_reach_the_check_api() {
    let started = Instant::now();
    let mut broker = Broker::memory();
    broker.create_topic(TOPIC, 3);
    let key = TestKey::ec_p256("e2e-k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let iss = jwks.issuer();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = DaemonConfig {
        topic_extra: r#"format = "native""#.into(),
        issuer_extra: r#"algorithms = ["RS256", "ES256"]"#.into(),
        extra_toml: r#"
[freshness]
max_staleness = "30s"
on_stale = "deny"
"#
        .into(),
        ..DaemonConfig::new(port, dir.path(), &broker, TOPIC).trusting(&jwks, AUD)
    }
    .write(&dir.path().join("revsync.toml"));
    let mut daemon = Daemon::spawn(&config, port);
    let client = Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
        base: format!("http://127.0.0.1:{port}"),
    };

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = client.get("/readyz").await;
        if resp.status() == 200 {
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["keys_loaded"], json!(true));
            assert_eq!(body["caught_up_once"], json!(true));
            break;
        }
        assert!(Instant::now() < deadline, "revsync never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_after = started.elapsed();

    // Subject, client and issuer revocations cover tokens issued before `not_before`
    // (default: the publish time), so tokens are minted as issued a few seconds ago.
    let token = |changes: Value| {
        let mut c = claims_with(&iss, AUD, json!({"iat": now() - 5}));
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        key.sign(&c)
    };
    let mut delays = Vec::new();
    // Every token revoked, by kind, to replay after a restart.
    let mut revoked: Vec<(&str, String)> = Vec::new();

    // token
    let hit = token(json!({"jti": "e2e-jti-1"}));
    let miss = token(json!({"jti": "e2e-jti-2"}));
    client.assert_active(&hit, "token before").await;
    client.assert_active(&miss, "other token before").await;
    publish(&broker, &["token", "--iss", &iss, "--jti", "e2e-jti-1"]);
    delays.push(("token", client.await_revoked(&hit, "token").await));
    revoked.push(("token", hit.clone()));
    client.assert_active(&miss, "other jti").await;

    // subject
    let hit = token(json!({"sub": "e2e-bob"}));
    let miss = token(json!({"sub": "e2e-carol"}));
    client.assert_active(&hit, "subject before").await;
    publish(&broker, &["subject", "--iss", &iss, "--sub", "e2e-bob"]);
    delays.push(("subject", client.await_revoked(&hit, "subject").await));
    revoked.push(("subject", hit.clone()));
    client.assert_active(&miss, "other subject").await;
    let later = token(json!({"sub": "e2e-bob", "iat": now() + 2}));
    client.assert_active(&later, "subject, issued after").await;

    // session
    let hit = token(json!({"sid": "e2e-sid-1"}));
    let miss = token(json!({"sid": "e2e-sid-2"}));
    client.assert_active(&hit, "session before").await;
    publish(&broker, &["session", "--iss", &iss, "--sid", "e2e-sid-1"]);
    delays.push(("session", client.await_revoked(&hit, "session").await));
    revoked.push(("session", hit.clone()));
    client.assert_active(&miss, "other session").await;

    // client
    let hit = token(json!({"client_id": "e2e-client-1"}));
    let miss = token(json!({"client_id": "e2e-client-2"}));
    client.assert_active(&hit, "client before").await;
    publish(
        &broker,
        &["client", "--iss", &iss, "--client-id", "e2e-client-1"],
    );
    delays.push(("client", client.await_revoked(&hit, "client").await));
    revoked.push(("client", hit.clone()));
    client.assert_active(&miss, "other client").await;

    // issuer: last, since it revokes every token issued before it. Another issuer's
    // mass revocation first, which must change nothing here.
    let hit = token(json!({"sub": "e2e-dave"}));
    let later = token(json!({"sub": "e2e-dave", "iat": now() + 2}));
    publish(&broker, &["issuer", "--iss", "https://other.example.com"]);
    let deadline = Instant::now() + PROPAGATION;
    while client.status().await["denylist"]["issuer"] != json!(1) {
        assert!(
            Instant::now() < deadline,
            "other issuer's revocation not applied"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    client.assert_active(&hit, "other issuer revoked").await;
    publish(&broker, &["issuer", "--iss", &iss]);
    delays.push(("issuer", client.await_revoked(&hit, "issuer").await));
    revoked.push(("issuer", hit.clone()));
    revoked.push(("issuer, earlier survivor", miss.clone()));
    client
        .assert_active(&later, "issued after the mass revocation")
        .await;
    assert_eq!(
        client.check(&miss).await,
        json!({"active": false, "reason": "revoked"}),
        "an earlier survivor is covered by the mass revocation"
    );

    // The other routes answer from the same state, over the real socket.
    let form = [("token", later.as_str())];
    let body: Value = client
        .http
        .post(format!("{}/introspect", client.base))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["active"], json!(true));
    assert_eq!(body["sub"], json!("e2e-dave"));
    let form = [("token", hit.as_str())];
    let resp = client
        .http
        .post(format!("{}/introspect", client.base))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"active": false})
    );
    let resp = client
        .http
        .get(format!("{}/v1/authz/some/path", client.base))
        .bearer_auth(&later)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-auth-subject"], "e2e-dave");
    let resp = client
        .http
        .get(format!("{}/v1/authz", client.base))
        .bearer_auth(&hit)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains(r#"error="invalid_token""#));

    let status = client.status().await;
    assert_eq!(
        status["denylist"],
        json!({"token": 1, "subject": 1, "session": 1, "client": 1, "issuer": 2})
    );
    let partitions = status["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3, "{status}");
    for p in partitions {
        assert_eq!(p["topic"], json!(TOPIC));
        assert_eq!(p["lag"], json!(0), "{p}");
    }
    assert_eq!(status["freshness"]["stale"], json!(false));
    let metrics = client.get("/metrics").await.text().await.unwrap();
    assert!(metrics
        .contains(r#"revsync_checks_total{route="check",outcome="inactive",reason="revoked"}"#));
    assert!(
        !metrics.contains(&hit) && !metrics.contains("e2e-dave") && !metrics.contains("e2e-jti-1")
    );

    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));

    // Replayed after a restart, with the broker gone (its memory log with it): every
    // revoked token is still refused, from the store alone.
    broker.stop();
    let daemon = Daemon::spawn(&config, port);
    for (kind, token) in &revoked {
        assert_eq!(
            client.check(token).await,
            json!({"active": false, "reason": "revoked"}),
            "{kind}: replayed after restart"
        );
        let resp = client
            .http
            .get(format!("{}/v1/authz", client.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{kind}: authz after restart");
    }
    // Tokens nobody revoked are not vouched for while the bus is out of reach.
    let body = client.check(&later).await;
    assert_ne!(body["active"], json!(true), "{body}");
    drop(daemon);
    eprintln!(
        "ready after {ready_after:?}; publish CLI exit -> revoked: {delays:?}; total {:?}",
        started.elapsed()
    );
}
