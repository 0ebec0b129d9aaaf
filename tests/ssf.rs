//! The RFC 8935 push receiver: status codes and error bodies through the real router
//! (real JWKS server, real temporary denylist), and bridge mode end to end: a pushed
//! logout token goes through a real Kafka-protocol broker (Tansu) to another revsync,
//! whose `/v1/check` then denies the token.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use common::broker::{free_port, Broker};
use common::jwt::{claims_with, now, raw_token, JwksServer, TestKey};
use common::router::temporary_denylist;
use revsync::app::{self, Listener};
use revsync::config::{Config, EventFormat, IssuerConfig, SsfConfig, TopicConfig};
use revsync::denylist::{Denylist, TokenRef};
use revsync::formats::set::{BACKCHANNEL_LOGOUT, SESSION_REVOKED};
use revsync::metrics::{MalformedLabels, Metrics, TopicLabels};
use revsync::ssf::{self, Receiver, Sink};
use revsync::token::TokenValidator;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const SECRET: &str = "transmitter-secret-0123456789";
const PATH: &str = "/ssf/events";
const AUD: &str = "https://api.example.com";

struct Harness {
    app: Router,
    key: TestKey,
    iss: String,
    denylist: Arc<Denylist>,
    metrics: Arc<Metrics>,
    jwks: JwksServer,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Harness {
    async fn new(
        configure_ssf: impl FnOnce(&mut SsfConfig),
        configure_issuer: impl FnOnce(&mut IssuerConfig),
        jwks_down: bool,
    ) -> Self {
        let key = TestKey::ec_p256("k1");
        let jwks = JwksServer::with_keys(&[&key]).await;
        jwks.set_down(jwks_down);
        let mut issuer = jwks.issuer_config(AUD);
        configure_issuer(&mut issuer);
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let validator = TokenValidator::start(
            &[issuer],
            reqwest::Client::new(),
            metrics.clone(),
            100,
            stop.clone(),
        )
        .await;
        let denylist = temporary_denylist();
        let mut config = SsfConfig::new(SECRET);
        configure_ssf(&mut config);
        let receiver = Arc::new(Receiver::new(
            validator,
            &config,
            Sink::Local(denylist.clone()),
            metrics.clone(),
        ));
        Harness {
            app: ssf::router(receiver, &config.path, config.max_body_bytes),
            iss: jwks.issuer(),
            key,
            denylist,
            metrics,
            jwks,
            stop,
        }
    }

    async fn default() -> Self {
        Self::new(|_| {}, |_| {}, false).await
    }

    fn claims(&self, events: Value, extra: Value) -> Value {
        let mut c = json!({"iss": self.iss, "aud": "receiver", "iat": now(),
            "jti": revsync::publish::new_event_id(), "events": events});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn set(&self, events: Value, extra: Value) -> String {
        self.key
            .sign_with_header(&json!({"typ": "secevent+jwt"}), &self.claims(events, extra))
    }

    fn revoke_session(&self, sid: &str) -> String {
        self.set(
            json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": sid}}}),
            json!({}),
        )
    }

    async fn push(&self, token: &str) -> Resp {
        self.send(
            Method::POST,
            Some(&format!("Bearer {SECRET}")),
            Some("application/secevent+jwt"),
            token.to_string(),
        )
        .await
    }

    async fn send(
        &self,
        method: Method,
        authorization: Option<&str>,
        content_type: Option<&str>,
        body: String,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(PATH);
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        if let Some(c) = content_type {
            req = req.header(header::CONTENT_TYPE, c);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    fn session_revoked(&self, sid: &str) -> bool {
        self.denylist
            .revoked_by(&TokenRef {
                iss: &self.iss,
                sid: Some(sid),
                ..TokenRef::default()
            })
            .unwrap()
            .is_some()
    }

    fn applied(&self) -> u64 {
        self.metrics
            .events_applied
            .get_or_create(&TopicLabels {
                topic: "ssf".into(),
                format: "set",
            })
            .get()
    }

    fn malformed(&self, reason: &'static str) -> u64 {
        self.metrics
            .events_malformed
            .get_or_create(&MalformedLabels {
                topic: "ssf".into(),
                format: "set",
                reason,
            })
            .get()
    }
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Resp {
    /// Asserts a 400 with `{"err": err, "description": …}`.
    fn assert_error(&self, status: StatusCode, err: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        let body: Value = serde_json::from_str(&self.body).expect("JSON error body");
        assert_eq!(body["err"], json!(err), "{body}");
        assert!(body["description"].as_str().is_some_and(|d| !d.is_empty()));
        assert_eq!(
            self.headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_sets_are_applied_and_answered_202() {
    let h = Harness::default().await;
    let r = h.push(&h.revoke_session("s1")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert!(h.session_revoked("s1"));

    let logout = h.key.sign_with_header(
        &json!({"typ": "logout+jwt"}),
        &h.claims(json!({BACKCHANNEL_LOGOUT: {}}), json!({"sid": "s2"})),
    );
    assert_eq!(h.push(&logout).await.status, StatusCode::ACCEPTED);
    assert!(h.session_revoked("s2"));
    // Pushing it again is harmless (idempotent apply).
    assert_eq!(h.push(&logout).await.status, StatusCode::ACCEPTED);

    // A verification event (SSF) revokes nothing but is accepted.
    let verification = h.set(
        json!({"https://schemas.openid.net/secevent/ssf/event-type/verification": {"state": "abc"}}),
        json!({}),
    );
    let before = h.denylist.sizes().total();
    assert_eq!(h.push(&verification).await.status, StatusCode::ACCEPTED);
    assert_eq!(h.denylist.sizes().total(), before);
    assert_eq!(h.applied(), 3);

    // A trailing newline and a media type parameter are fine.
    let r = h
        .send(
            Method::POST,
            Some(&format!("bearer {SECRET}")),
            Some("application/secevent+jwt; charset=utf-8"),
            format!("{}\n", h.revoke_session("s3")),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert!(h.session_revoked("s3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmitters_authenticate_with_the_bearer_secret() {
    let h = Harness::default().await;
    let token = h.revoke_session("never");
    let ct = Some("application/secevent+jwt");
    let r = h.send(Method::POST, None, ct, token.clone()).await;
    r.assert_error(StatusCode::UNAUTHORIZED, "authentication_failed");
    assert_eq!(
        r.headers.get(header::WWW_AUTHENTICATE).unwrap(),
        r#"Bearer realm="revsync-ssf""#
    );
    for wrong in [
        "Bearer not-the-secret".to_string(),
        format!("Bearer {SECRET}x"),
        format!("Basic {SECRET}"),
        "Bearer ".to_string(),
        SECRET.to_string(),
    ] {
        let r = h.send(Method::POST, Some(&wrong), ct, token.clone()).await;
        r.assert_error(StatusCode::UNAUTHORIZED, "authentication_failed");
        assert!(r.headers[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains(r#"error="invalid_token""#));
        assert!(!r.body.contains(SECRET) && !r.body.contains(&token));
    }
    assert!(!h.session_revoked("never"));
    let r = h
        .send(
            Method::GET,
            Some(&format!("Bearer {SECRET}")),
            None,
            String::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sets_get_400_with_the_rfc_8935_error_code() {
    // Refetch at once on unknown kids, so an unknown key is known to be unknown.
    let h = Harness::new(
        |c| c.audience = Some("receiver".into()),
        |i| i.jwks_min_refetch = Duration::ZERO,
        false,
    )
    .await;
    let good = h.revoke_session("x");
    let auth = format!("Bearer {SECRET}");

    let r = h
        .send(
            Method::POST,
            Some(&auth),
            Some("application/json"),
            good.clone(),
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let r = h.send(Method::POST, Some(&auth), None, good.clone()).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.push("not a jwt")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.push("")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    // Signature trouble: the SET does not authenticate its transmitter.
    let (head, rest) = good.split_at(good.rfind('.').unwrap() + 1);
    let flipped = if rest.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{head}{flipped}{}", &rest[1..]);
    let r = h.push(&tampered).await;
    r.assert_error(StatusCode::BAD_REQUEST, "authentication_failed");
    assert!(!r.body.contains(&tampered), "the token is never echoed");
    let unsigned = raw_token(
        &json!({"alg": "none", "typ": "secevent+jwt"}),
        &h.claims(
            json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": "x"}}}),
            json!({}),
        ),
        b"",
    );
    h.push(&unsigned)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "authentication_failed");
    let rogue = TestKey::ec_p256("rogue");
    let t = rogue.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &h.claims(
            json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": "x"}}}),
            json!({}),
        ),
    );
    h.push(&t)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_key");

    // Issuer and audience.
    let t = h.key.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &h.claims(
            json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": "x"}}}),
            json!({"iss": "https://stranger.example"}),
        ),
    );
    h.push(&t)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_issuer");
    let t = h.set(
        json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": "x"}}}),
        json!({"aud": "someone-else"}),
    );
    h.push(&t)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_audience");

    // Well signed, but not a SET revsync can take.
    let t = h.key.sign_with_header(
        &json!({"typ": "JWT"}),
        &h.claims(
            json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": "x"}}}),
            json!({}),
        ),
    );
    h.push(&t)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let t = h.key.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &json!({"iss": h.iss, "aud": "receiver", "jti": "j", "iat": now()}),
    );
    h.push(&t)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let t = h.key.sign_with_header(
        &json!({"typ": "logout+jwt"}),
        &h.claims(
            json!({BACKCHANNEL_LOGOUT: {}}),
            json!({"sid": "x", "nonce": "n"}),
        ),
    );
    h.push(&t)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    // Too large.
    let r = h.push(&"a".repeat(70 * 1024)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

    assert!(!h.session_revoked("x"));
    assert_eq!(h.applied(), 0);
    assert_eq!(h.malformed("bad_signature"), 1);
    assert_eq!(h.malformed("unknown_key"), 1);
    assert_eq!(h.malformed("wrong_typ"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_issuer_refuses_other_configured_issuers() {
    let h = Harness::new(
        |c| c.issuer = Some("https://another.example".into()),
        |_| {},
        false,
    )
    .await;
    h.push(&h.revoke_session("x"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_issuer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_keys_get_503_and_a_retry_after() {
    let h = Harness::new(|_| {}, |i| i.jwks_min_refetch = Duration::ZERO, true).await;
    let token = h.revoke_session("later");
    let r = h.push(&token).await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");
    assert_eq!(r.headers.get(header::RETRY_AFTER).unwrap(), "5");
    assert!(!h.session_revoked("later"));
    // The transmitter retries once the JWKS is back: nothing was lost.
    h.jwks.set_down(false);
    let r = h.push(&token).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert!(h.session_revoked("later"));
}

// ---------------------------------------------------------------------------------------
// Bridge mode, end to end

async fn get_status(http: &reqwest::Client, url: &str) -> Option<u16> {
    http.get(url).send().await.ok().map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_feeds_another_revsync_through_kafka() {
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let iss = jwks.issuer();
    let broker = Broker::memory();
    broker.create_topic("revocations", 2);
    let dir = tempfile::tempdir().unwrap();
    let base = |name: &str| {
        let mut c = Config::new(broker.bootstrap(), dir.path().join(name));
        c.issuers.push(jwks.issuer_config(AUD));
        c.kafka.topics = vec![TopicConfig {
            name: "revocations".into(),
            format: EventFormat::Native,
            issuer: None,
        }];
        c.kafka.watermark_interval = Duration::from_millis(200);
        c
    };
    // The bridge: receives pushes and republishes them to the topic.
    let ssf_port = free_port();
    let mut bridge_config = base("bridge");
    bridge_config.ssf = Some(SsfConfig {
        listen: format!("127.0.0.1:{ssf_port}"),
        bridge_topic: Some("revocations".into()),
        ..SsfConfig::new(SECRET)
    });
    bridge_config.validate().unwrap();
    let stop = CancellationToken::new();
    let bridge = tokio::spawn(app::run(
        bridge_config,
        Listener::bind("127.0.0.1:0").await.unwrap(),
        stop.clone(),
    ));
    // Another instance, which only reads the topic.
    let listener = Listener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.describe());
    let instance = tokio::spawn(app::run(base("instance"), listener, stop.clone()));

    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_status(&http, &format!("{api}/readyz")).await != Some(200) {
        assert!(Instant::now() < deadline, "instance never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = key.sign(&claims_with(
        &iss,
        AUD,
        json!({"sid": "bridged-session", "iat": now() - 10}),
    ));
    let check = |token: String| {
        let http = http.clone();
        let url = format!("{api}/v1/check");
        async move {
            http.post(url)
                .json(&json!({ "token": token }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(check(token.clone()).await["active"], json!(true));

    // The transmitter pushes a Back-Channel Logout token for that session.
    let logout = key.sign_with_header(
        &json!({"typ": "logout+jwt"}),
        &json!({"iss": iss, "aud": "rp", "iat": now(), "jti": "bcl-1",
            "events": {BACKCHANNEL_LOGOUT: {}}, "sid": "bridged-session"}),
    );
    let push_url = format!("http://127.0.0.1:{ssf_port}{PATH}");
    let resp = http
        .post(&push_url)
        .bearer_auth(SECRET)
        .header(header::CONTENT_TYPE, "application/secevent+jwt")
        .body(logout)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());

    // 202 meant "in Kafka": the other instance reads it and denies the token.
    let start = Instant::now();
    loop {
        let body = check(token.clone()).await;
        if body == json!({"active": false, "reason": "revoked"}) {
            break;
        }
        assert_eq!(body["active"], json!(true), "{body}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not revoked in time"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A token of another session is untouched.
    let other = key.sign(&claims_with(
        &iss,
        AUD,
        json!({"sid": "other", "iat": now() - 10}),
    ));
    assert_eq!(check(other).await["active"], json!(true));

    stop.cancel();
    for task in [bridge, instance] {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("stops in time")
            .unwrap()
            .expect("clean shutdown");
    }
}
