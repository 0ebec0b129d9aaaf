//! The `set` and `keycloak` formats: real signed SETs and logout tokens verified against a
//! real JWKS server, Keycloak event samples of every mapped and some unmapped type
//! (`tests/data/keycloak/`), decoder/schema agreement, and both formats through a real
//! Kafka-protocol broker (Tansu) into the denylist, including a partition held while its
//! issuer's keys are unavailable.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::ingest::Ingesting;
use common::jwt::{hs256_token, now, raw_token, JwksServer, TestKey};
use jsonwebtoken::Algorithm;
use revsync::config::{EventFormat, IssuerConfig, KafkaConfig, TopicConfig};
use revsync::denylist::{Retention, TokenRef};
use revsync::event::{Event, Revocation};
use revsync::formats::set::{
    self, SetVerifier, BACKCHANNEL_LOGOUT, CREDENTIAL_CHANGE, SESSION_REVOKED,
};
use revsync::formats::{keycloak, Decoded, FormatError};
use revsync::metrics::{MalformedLabels, Metrics, TopicLabels};
use revsync::publish::Publisher;
use revsync::token::{TokenValidator, VerifiedJws};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const KC_ISS: &str = "https://kc.example.com/realms/main";
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Helpers

/// A JWKS server with an RS256 and an ES256 key, and a validator for its issuer.
struct Keys {
    rsa: TestKey,
    ec: TestKey,
    jwks: JwksServer,
    validator: Arc<TokenValidator>,
    _stop: CancellationToken,
}

impl Keys {
    async fn start(configure: impl FnOnce(&mut IssuerConfig)) -> Self {
        let rsa = TestKey::rsa("r1", Algorithm::RS256);
        let ec = TestKey::ec_p256("e1");
        let jwks = JwksServer::with_keys(&[&rsa, &ec]).await;
        let mut config = jwks.issuer_config("receiver");
        configure(&mut config);
        let stop = CancellationToken::new();
        let validator = TokenValidator::start(
            &[config],
            reqwest::Client::new(),
            Arc::new(Metrics::new()),
            1000,
            stop.clone(),
        )
        .await;
        Keys {
            rsa,
            ec,
            jwks,
            validator,
            _stop: stop,
        }
    }

    fn iss(&self) -> String {
        self.jwks.issuer()
    }

    /// A SET with typ `secevent+jwt`, signed with the EC key.
    fn set(&self, events: Value, extra: Value) -> String {
        self.ec.sign_with_header(
            &json!({"typ": "secevent+jwt"}),
            &set_claims(&self.iss(), events, extra),
        )
    }

    /// A logout token with typ `logout+jwt`, signed with the RSA key.
    fn logout(&self, extra: Value) -> String {
        let claims = set_claims(&self.iss(), json!({BACKCHANNEL_LOGOUT: {}}), extra);
        self.rsa
            .sign_with_header(&json!({"typ": "logout+jwt"}), &claims)
    }

    async fn decode(&self, token: &str) -> Decoded {
        set::decode(&self.validator, token, None, None, revsync::unix_now_ms()).await
    }
}

fn set_claims(iss: &str, events: Value, extra: Value) -> Value {
    let mut claims = json!({
        "iss": iss, "aud": "receiver", "iat": now(), "jti": revsync::publish::new_event_id(),
        "events": events,
    });
    merge(&mut claims, &extra);
    claims
}

fn merge(target: &mut Value, changes: &Value) {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            target.as_object_mut().unwrap().remove(k);
        } else {
            target[k] = v.clone();
        }
    }
}

fn iss_sub(iss: &str, sub: &str) -> Value {
    json!({"format": "iss_sub", "iss": iss, "sub": sub})
}

fn revocation(d: Decoded) -> Revocation {
    d.expect("decodes").expect("revokes something").revocation
}

fn reason(d: Decoded) -> &'static str {
    d.expect_err("refused").reason()
}

/// Changes the first signature character (all six of its bits are signature bits): the
/// JWS no longer verifies.
fn tamper_signature(token: &str) -> String {
    let at = token.rfind('.').unwrap() + 1;
    let c = token.as_bytes()[at];
    let flipped = if c == b'A' { 'B' } else { 'A' };
    format!("{}{}{}", &token[..at], flipped, &token[at + 1..])
}

/// Replaces the payload, keeping header and signature.
fn swap_payload(token: &str, claims: &Value) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = common::jwt::b64url(claims.to_string().as_bytes());
    parts.join(".")
}

// ---------------------------------------------------------------------------------------
// Signed SETs and logout tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caep_and_logout_tokens_map_to_the_model() {
    let k = Keys::start(|_| {}).await;
    let iss = k.iss();

    let t = k.set(
        json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "alice"), "event_timestamp": 1_700_000_000}}),
        json!({}),
    );
    let event = k.decode(&t).await.unwrap().unwrap();
    assert_eq!(
        event.revocation,
        Revocation::Subject {
            iss: iss.clone(),
            sub: "alice".into(),
            not_before: 1_700_000_000
        }
    );
    assert_eq!(event.event_time, 1_700_000_000);

    // SSF 1.0 puts the subject in `sub_id`.
    let t = k.set(
        json!({SESSION_REVOKED: {}}),
        json!({"sub_id": {"format": "jwt_id", "iss": iss, "jti": "tok-1"}}),
    );
    assert_eq!(
        revocation(k.decode(&t).await),
        Revocation::Token {
            iss: iss.clone(),
            jti: "tok-1".into(),
            exp: None
        }
    );
    let t = k.set(
        json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": "sess-1"}}}),
        json!({}),
    );
    assert_eq!(
        revocation(k.decode(&t).await),
        Revocation::Session {
            iss: iss.clone(),
            sid: "sess-1".into()
        }
    );
    let t = k.set(
        json!({SESSION_REVOKED: {"subject": {"format": "complex", "user": iss_sub(&iss, "alice"),
            "session": {"format": "opaque", "id": "sess-2"}}}}),
        json!({}),
    );
    assert_eq!(
        revocation(k.decode(&t).await),
        Revocation::Session {
            iss: iss.clone(),
            sid: "sess-2".into()
        }
    );
    let iat = now() - 5;
    let t = k.set(
        json!({CREDENTIAL_CHANGE: {"credential_type": "password", "change_type": "revoke",
            "subject": iss_sub(&iss, "bob")}}),
        json!({"iat": iat}),
    );
    assert_eq!(
        revocation(k.decode(&t).await),
        Revocation::Subject {
            iss: iss.clone(),
            sub: "bob".into(),
            not_before: iat
        }
    );
    let t = k.set(
        json!({CREDENTIAL_CHANGE: {"change_type": "update", "subject": iss_sub(&iss, "bob")}}),
        json!({}),
    );
    assert_eq!(k.decode(&t).await, Ok(None), "an update revokes nothing");

    let t = k.logout(json!({"sid": "sess-3", "sub": "carol"}));
    assert_eq!(
        revocation(k.decode(&t).await),
        Revocation::Session {
            iss: iss.clone(),
            sid: "sess-3".into()
        }
    );
    let t = k.logout(json!({"sub": "carol", "iat": iat}));
    assert_eq!(
        revocation(k.decode(&t).await),
        Revocation::Subject {
            iss: iss.clone(),
            sub: "carol".into(),
            not_before: iat
        }
    );
    // Untyped logout tokens (older OPs) are accepted; the jti is the event id.
    let claims = set_claims(
        &iss,
        json!({BACKCHANNEL_LOGOUT: {}}),
        json!({"sid": "s4", "jti": "lt-1"}),
    );
    let t = k.rsa.sign_with_header(&json!({"typ": null}), &claims);
    assert_eq!(k.decode(&t).await.unwrap().unwrap().id, "lt-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sets_are_refused_with_distinct_reasons() {
    // No rate limit on refetches: an unknown kid is checked against a fresh JWKS at once.
    let k = Keys::start(|c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = k.iss();
    let good = k.set(
        json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "alice")}}),
        json!({}),
    );
    assert!(k.decode(&good).await.is_ok());

    assert_eq!(
        reason(k.decode(&tamper_signature(&good)).await),
        "bad_signature"
    );
    let forged = swap_payload(
        &good,
        &set_claims(
            &iss,
            json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "mallory")}}),
            json!({}),
        ),
    );
    assert_eq!(reason(k.decode(&forged).await), "bad_signature");
    let unsigned = raw_token(
        &json!({"alg": "none", "typ": "secevent+jwt"}),
        &set_claims(
            &iss,
            json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "alice")}}),
            json!({}),
        ),
        b"",
    );
    assert_eq!(reason(k.decode(&unsigned).await), "unsigned");
    // HS256 keyed with the public key (algorithm confusion).
    let confused = hs256_token(
        k.rsa.public_pem().as_bytes(),
        &json!({"typ": "secevent+jwt", "kid": "r1"}),
        &set_claims(
            &iss,
            json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "alice")}}),
            json!({}),
        ),
    );
    assert_eq!(reason(k.decode(&confused).await), "bad_signature");

    // An issuer that is not configured.
    let stranger = k.ec.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &set_claims(
            "https://stranger.example",
            json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "a")}}),
            json!({}),
        ),
    );
    assert_eq!(reason(k.decode(&stranger).await), "wrong_issuer");
    // A configured issuer, but not the one the topic names.
    let d = set::decode(
        &k.validator,
        &good,
        None,
        Some("https://other"),
        revsync::unix_now_ms(),
    )
    .await;
    assert_eq!(reason(d), "wrong_issuer");
    // Audience, when asked for.
    let d = set::decode(
        &k.validator,
        &good,
        Some("someone-else"),
        None,
        revsync::unix_now_ms(),
    )
    .await;
    assert_eq!(reason(d), "wrong_audience");
    let d = set::decode(
        &k.validator,
        &good,
        Some("receiver"),
        None,
        revsync::unix_now_ms(),
    )
    .await;
    assert!(d.is_ok());

    // A key the JWKS does not have, after a fresh fetch: final.
    let rogue = TestKey::ec_p256("rogue");
    let t = rogue.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &set_claims(
            &iss,
            json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "a")}}),
            json!({}),
        ),
    );
    assert_eq!(reason(k.decode(&t).await), "unknown_key");

    // Shape.
    let t = k.ec.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &json!({"iss": iss, "jti": "x", "iat": now()}),
    );
    assert_eq!(reason(k.decode(&t).await), "missing_events");
    let t = k.ec.sign_with_header(
        &json!({"typ": "JWT"}),
        &set_claims(
            &iss,
            json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "a")}}),
            json!({}),
        ),
    );
    assert_eq!(reason(k.decode(&t).await), "wrong_typ");
    let t = k.ec.sign_with_header(
        &json!({"typ": "at+jwt"}),
        &set_claims(&iss, json!({BACKCHANNEL_LOGOUT: {}}), json!({"sid": "s"})),
    );
    assert_eq!(reason(k.decode(&t).await), "wrong_typ");
    assert_eq!(
        reason(
            k.decode(&k.logout(json!({"sid": "s", "nonce": "n-0S6_WzA2Mj"})))
                .await
        ),
        "nonce_present"
    );
    assert_eq!(
        reason(k.decode(&k.logout(json!({}))).await),
        "missing_field"
    );
    let t = k.set(
        json!({SESSION_REVOKED: {"subject": {"format": "email", "email": "a@example.com"}}}),
        json!({}),
    );
    assert_eq!(reason(k.decode(&t).await), "unsupported_subject");
    assert_eq!(reason(k.decode("not-a-jwt").await), "malformed_jws");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_is_never_dropped_while_its_keys_cannot_be_had() {
    // Keys fetched once at start; refetches on unknown kids at most every minute.
    let k = Keys::start(|c| c.jwks_min_refetch = Duration::from_secs(60)).await;
    // The event is held strictly after the start-up fetch: a fetch in the same
    // millisecond counts as fresh (see TokenValidator::verify_jws).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let iss = k.iss();
    // The issuer rotates to a new key after revsync loaded its JWKS.
    let next = TestKey::ec_p256("e2");
    k.jwks.publish(&next);
    let t = next.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &set_claims(
            &iss,
            json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "alice")}}),
            json!({}),
        ),
    );
    // The refetch is rate-limited: the key may exist, so the answer is "not now", not
    // "malformed".
    let d = k.decode(&t).await;
    assert!(matches!(d, Err(FormatError::Unverifiable(_))), "{d:?}");

    // The reader's path: a plain thread, answers through the runtime.
    let verifier = SetVerifier::new(k.validator.clone(), tokio::runtime::Handle::current());
    let token = t.clone();
    let d = tokio::task::spawn_blocking(move || {
        verifier.decode_blocking(token.as_bytes(), None, revsync::unix_now_ms())
    })
    .await
    .unwrap();
    assert!(matches!(d, Err(FormatError::Unverifiable(_))), "{d:?}");

    // An issuer whose JWKS never loaded: also not decidable.
    let down = JwksServer::start().await;
    down.set_down(true);
    let stop = CancellationToken::new();
    let v = TokenValidator::start(
        &[down.issuer_config("receiver")],
        reqwest::Client::new(),
        Arc::new(Metrics::new()),
        10,
        stop.clone(),
    )
    .await;
    let t = next.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &set_claims(
            &down.issuer(),
            json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": "s"}}}),
            json!({}),
        ),
    );
    let d = set::decode(&v, &t, None, None, revsync::unix_now_ms()).await;
    assert!(matches!(d, Err(FormatError::Unverifiable(_))), "{d:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_verifier_gives_up_waiting_but_the_fetch_completes() {
    let k = Keys::start(|c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = k.iss();
    let next = TestKey::ec_p256("e3");
    k.jwks.publish(&next);
    k.jwks.set_delay(Duration::from_millis(800));
    let t = next.sign_with_header(
        &json!({"typ": "secevent+jwt"}),
        &set_claims(
            &iss,
            json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": "s"}}}),
            json!({}),
        ),
    );
    let verifier = SetVerifier::new(k.validator.clone(), tokio::runtime::Handle::current())
        .with_wait(Duration::from_millis(100));
    let seen = revsync::unix_now_ms();
    let (v1, t1) = (verifier.clone(), t.clone());
    let d = tokio::task::spawn_blocking(move || v1.decode_blocking(t1.as_bytes(), None, seen))
        .await
        .unwrap();
    assert!(
        matches!(d, Err(FormatError::Unverifiable(_))),
        "slow fetch: {d:?}"
    );
    // The fetch went on in the background; the retry finds the key.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    k.jwks.set_delay(Duration::ZERO);
    let d = tokio::task::spawn_blocking(move || verifier.decode_blocking(t.as_bytes(), None, seen))
        .await
        .unwrap();
    assert_eq!(
        revocation(d),
        Revocation::Session {
            iss,
            sid: "s".into()
        }
    );
}

// ---------------------------------------------------------------------------------------
// Schema agreement

fn compile(schema: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(schema).unwrap();
    jsonschema::validator_for(&schema).expect("schema compiles")
}

#[test]
fn keycloak_samples_decode_as_expected_and_agree_with_the_schema() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/keycloak");
    let expected: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let schema = compile(include_str!("../schemas/keycloak-event.schema.json"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json") && n != "expected.json")
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        expected.len(),
        "every sample has an expectation"
    );
    let mut kinds = BTreeMap::<String, usize>::new();
    for file in &files {
        let want = expected
            .get(file)
            .unwrap_or_else(|| panic!("{file}: no expectation"));
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let decoded = keycloak::decode(&bytes, KC_ISS);
        let kind = want["kind"].as_str().unwrap();
        *kinds.entry(kind.to_string()).or_default() += 1;
        match (kind, &decoded) {
            ("ignored", Ok(None)) => {}
            ("malformed", Err(e)) => assert_eq!(e.reason(), want["reason"], "{file}"),
            (kind, Ok(Some(event))) => {
                let r = &event.revocation;
                assert_eq!(r.kind(), kind, "{file}");
                assert_eq!(r.iss(), KC_ISS, "{file}");
                let id = r.record_key().split_once('\n').unwrap().1.to_string();
                assert_eq!(id, want["id"].as_str().unwrap(), "{file}");
                if let Some(nb) = want.get("not_before") {
                    let got = match r {
                        Revocation::Subject { not_before, .. }
                        | Revocation::Client { not_before, .. }
                        | Revocation::Issuer { not_before, .. } => *not_before,
                        _ => panic!("{file}: no not_before"),
                    };
                    assert_eq!(got, nb.as_u64().unwrap(), "{file}");
                }
                if let Some(t) = want.get("event_time") {
                    assert_eq!(event.event_time, t.as_u64().unwrap(), "{file}");
                }
            }
            (kind, other) => panic!("{file}: expected {kind}, got {other:?}"),
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            schema.is_valid(&value),
            kind != "malformed",
            "{file}: schema and decoder disagree ({decoded:?})"
        );
    }
    for kind in [
        "session",
        "token",
        "subject",
        "issuer",
        "client",
        "ignored",
        "malformed",
    ] {
        assert!(
            kinds.get(kind).is_some_and(|n| *n >= 1),
            "samples cover {kind}: {kinds:?}"
        );
    }
}

#[test]
fn set_claims_and_the_schema_agree() {
    let schema = compile(include_str!("../schemas/security-event-token.schema.json"));
    let i = "https://as.example";
    let sr = |payload: Value| json!({"iss": i, "jti": "j", "iat": 10, "events": {SESSION_REVOKED: payload}});
    let cc = |payload: Value| json!({"iss": i, "jti": "j", "iat": 10, "events": {CREDENTIAL_CHANGE: payload}});
    let bcl = |extra: Value| {
        let mut c = json!({"iss": i, "jti": "j", "iat": 10, "aud": "rp", "events": {BACKCHANNEL_LOGOUT: {}}});
        merge(&mut c, &extra);
        c
    };
    let user = json!({"format": "iss_sub", "iss": i, "sub": "u"});
    let cases: Vec<(Value, bool)> = vec![
        (sr(json!({"subject": user})), true),
        (
            sr(
                json!({"subject": {"format": "jwt_id", "iss": i, "jti": "t"}, "event_timestamp": 5}),
            ),
            true,
        ),
        (
            sr(json!({"subject": {"format": "opaque", "id": "s"}})),
            true,
        ),
        (
            sr(
                json!({"subject": {"format": "complex", "session": {"format": "opaque", "id": "s"}}}),
            ),
            true,
        ),
        (
            sr(
                json!({"subject": {"format": "complex", "user": user, "tenant": {"format": "opaque", "id": "t"}}}),
            ),
            true,
        ),
        (
            sr(
                json!({"subject": {"format": "complex", "user": {"format": "email", "email": "e"}, "session": {"format": "opaque", "id": "s"}}}),
            ),
            true,
        ),
        (
            json!({"iss": i, "jti": "j", "iat": 10, "sub_id": user, "events": {SESSION_REVOKED: {}}}),
            true,
        ),
        (
            json!({"iss": i, "jti": "j", "iat": 10, "sub_id": user, "events": {SESSION_REVOKED: {"subject": null}}}),
            true,
        ),
        (
            cc(json!({"change_type": "delete", "subject": user, "event_timestamp": 3})),
            true,
        ),
        (
            cc(json!({"change_type": "create", "subject": {"format": "email", "email": "e"}})),
            true,
        ),
        (
            cc(json!({"change_type": "revoke", "subject": {"format": "complex", "user": user}})),
            true,
        ),
        (bcl(json!({"sid": "s"})), true),
        (bcl(json!({"sub": "u"})), true),
        (bcl(json!({"sid": null, "sub": "u"})), true),
        (
            json!({"iss": i, "jti": "j", "iat": 10, "events": {"https://schemas.openid.net/secevent/ssf/event-type/verification": {"state": "x"}}}),
            true,
        ),
        (
            json!({"iss": i, "jti": "j", "iat": 10.5, "events": {SESSION_REVOKED: {"subject": user}, "https://example.com/ext": 1}}),
            true,
        ),
        // Invalid.
        (json!({"iss": i, "jti": "j", "iat": 10}), false),
        (
            json!({"iss": i, "jti": "j", "iat": 10, "events": {}}),
            false,
        ),
        (
            json!({"iss": i, "jti": "j", "iat": 10, "events": []}),
            false,
        ),
        (
            json!({"iss": i, "iat": 10, "events": {SESSION_REVOKED: {"subject": user}}}),
            false,
        ),
        (
            json!({"iss": i, "jti": "", "iat": 10, "events": {SESSION_REVOKED: {"subject": user}}}),
            false,
        ),
        (
            json!({"iss": i, "jti": "j", "events": {SESSION_REVOKED: {"subject": user}}}),
            false,
        ),
        (
            json!({"iss": i, "jti": "j", "iat": "10", "events": {SESSION_REVOKED: {"subject": user}}}),
            false,
        ),
        (sr(json!({})), false),
        (sr(json!({"subject": "alice"})), false),
        (
            sr(json!({"subject": {"format": "email", "email": "e"}})),
            false,
        ),
        (
            sr(json!({"subject": {"format": "iss_sub", "iss": i}})),
            false,
        ),
        (
            sr(json!({"subject": {"format": "opaque", "id": ""}})),
            false,
        ),
        (
            sr(
                json!({"subject": {"format": "complex", "user": {"format": "email", "email": "e"}}}),
            ),
            false,
        ),
        (
            sr(json!({"subject": {"format": "complex", "user": "u"}})),
            false,
        ),
        (
            sr(json!({"subject": user, "event_timestamp": "now"})),
            false,
        ),
        (
            json!({"iss": i, "jti": "j", "iat": 10, "events": {SESSION_REVOKED: "x"}}),
            false,
        ),
        (cc(json!({"subject": user})), false),
        (
            cc(json!({"change_type": "revoke", "subject": {"format": "opaque", "id": "s"}})),
            false,
        ),
        (cc(json!({"change_type": "revoke"})), false),
        (bcl(json!({})), false),
        (bcl(json!({"sid": "s", "nonce": "n"})), false),
        (bcl(json!({"sid": ""})), false),
        (bcl(json!({"sid": 5})), false),
        (
            json!({"iss": i, "jti": "j", "iat": 10, "sid": "s", "events": {BACKCHANNEL_LOGOUT: {}, SESSION_REVOKED: {"subject": user}}}),
            false,
        ),
    ];
    let (mut valid, mut invalid) = (0, 0);
    for (claims, expected) in cases {
        let typ = if claims["events"].get(BACKCHANNEL_LOGOUT).is_some() {
            "logout+jwt"
        } else {
            "secevent+jwt"
        };
        let jws = VerifiedJws {
            iss: i.to_string(),
            header: json!({"alg": "ES256", "typ": typ})
                .as_object()
                .unwrap()
                .clone(),
            claims: claims.as_object().unwrap().clone(),
        };
        // The schema is what issuers must send; the decoder also takes a SET whose only
        // faults are unusable optional members (ignoring them, so the revocation is not
        // lost), and names them.
        let mut ignored = revsync::event::Ignored::new();
        let decoded = set::map_verified_noting(&jws, &mut ignored);
        assert_eq!(schema.is_valid(&claims), expected, "schema on {claims}");
        assert_eq!(
            decoded.is_ok() && ignored.is_empty(),
            expected,
            "decoder on {claims}: {decoded:?}, ignored {ignored:?}"
        );
        if expected {
            valid += 1
        } else {
            invalid += 1
        }
    }
    assert!(valid >= 15 && invalid >= 20);
}

// ---------------------------------------------------------------------------------------
// Through the broker

impl Ingesting {
    /// An in-process ingest (tests/common/ingest.rs) over a store in `dir`.
    fn start(kafka: &KafkaConfig, dir: &Path, sets: SetVerifier) -> Self {
        // The Keycloak samples are from 2024: keep entries for decades so they are stored.
        let retention = Retention::new(
            Duration::from_secs(30 * 365 * 86400),
            Duration::from_secs(30),
        );
        Self::start_with(kafka, dir, retention, Some(sets))
    }

    fn revoked(&self, token: TokenRef<'_>) -> Option<&'static str> {
        self.denylist.revoked_by(&token).unwrap()
    }

    fn malformed(&self, topic: &str, format: &'static str, reason: &'static str) -> u64 {
        self.metrics
            .events_malformed
            .get_or_create(&MalformedLabels {
                topic: topic.into(),
                format,
                reason,
            })
            .get()
    }

    fn counted(
        &self,
        family: &prometheus_client::metrics::family::Family<
            TopicLabels,
            prometheus_client::metrics::counter::Counter,
        >,
        topic: &str,
        format: &'static str,
    ) -> u64 {
        family
            .get_or_create(&TopicLabels {
                topic: topic.into(),
                format,
            })
            .get()
    }

    fn position(&self, topic: &str) -> i64 {
        self.denylist
            .positions()
            .unwrap()
            .iter()
            .filter(|p| p.topic == topic)
            .map(|p| p.next_offset)
            .sum()
    }
}

fn kafka(broker: &Broker, topics: Vec<TopicConfig>) -> KafkaConfig {
    let mut k = KafkaConfig::new(broker.bootstrap());
    k.topics = topics;
    k.watermark_interval = Duration::from_millis(200);
    k.metadata_interval = Duration::from_millis(500);
    k
}

fn topic(name: &str, format: EventFormat, issuer: Option<&str>) -> TopicConfig {
    TopicConfig {
        name: name.into(),
        format,
        issuer: issuer.map(str::to_string),
    }
}

fn publish_raw(broker: &Broker, topic: &str, records: &[Vec<u8>]) {
    let p = Publisher::new(&KafkaConfig::new(broker.bootstrap()), topic).unwrap();
    for (i, r) in records.iter().enumerate() {
        p.send_raw(&format!("k{i}"), r).unwrap();
    }
    p.finish(Duration::from_secs(30)).unwrap();
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn tok<'a>(iss: &'a str) -> TokenRef<'a> {
    TokenRef {
        iss,
        jti: Some("clean"),
        sub: Some("clean"),
        sid: Some("clean"),
        client_id: Some("clean"),
        iat: Some(now() - 60),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_and_keycloak_topics_reach_the_denylist_through_the_broker() {
    let k = Keys::start(|_| {}).await;
    let iss = k.iss();
    let broker = Broker::memory();
    broker.create_topic("sets", 2);
    broker.create_topic("kc", 1);
    let dir = tempfile::tempdir().unwrap();
    let ing = Ingesting::start(
        &kafka(
            &broker,
            vec![
                topic("sets", EventFormat::Set, None),
                topic("kc", EventFormat::Keycloak, Some(KC_ISS)),
            ],
        ),
        dir.path(),
        SetVerifier::new(k.validator.clone(), tokio::runtime::Handle::current()),
    );

    let sets: Vec<Vec<u8>> = vec![
        k.set(
            json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "alice")}}),
            json!({}),
        ),
        k.set(
            json!({SESSION_REVOKED: {"subject": {"format": "jwt_id", "iss": iss, "jti": "tok-1"}}}),
            json!({}),
        ),
        k.logout(json!({"sid": "sess-9"})),
        k.set(
            json!({CREDENTIAL_CHANGE: {"change_type": "delete", "subject": iss_sub(&iss, "bob")}}),
            json!({}),
        ),
        // Revokes nothing.
        k.set(
            json!({CREDENTIAL_CHANGE: {"change_type": "create", "subject": iss_sub(&iss, "dan")}}),
            json!({}),
        ),
        // Refused.
        tamper_signature(&k.set(
            json!({SESSION_REVOKED: {"subject": iss_sub(&iss, "eve")}}),
            json!({}),
        )),
        k.logout(json!({"sid": "sess-10", "nonce": "n"})),
        format!("{}\n", k.logout(json!({"sub": "frank"}))),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    publish_raw(&broker, "sets", &sets);

    let dir_kc = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/keycloak");
    let mut names: Vec<String> = std::fs::read_dir(&dir_kc)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "expected.json")
        .collect();
    names.sort();
    let kc: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(dir_kc.join(n)).unwrap())
        .collect();
    publish_raw(&broker, "kc", &kc);

    eventually("every record read", || {
        (ing.position("sets") == sets.len() as i64 && ing.position("kc") == kc.len() as i64)
            .then_some(())
    })
    .await;

    // SETs.
    let i = iss.as_str();
    assert_eq!(
        ing.revoked(TokenRef {
            sub: Some("alice"),
            ..tok(i)
        }),
        Some("subject")
    );
    assert_eq!(
        ing.revoked(TokenRef {
            jti: Some("tok-1"),
            ..tok(i)
        }),
        Some("token")
    );
    assert_eq!(
        ing.revoked(TokenRef {
            sid: Some("sess-9"),
            ..tok(i)
        }),
        Some("session")
    );
    assert_eq!(
        ing.revoked(TokenRef {
            sub: Some("bob"),
            ..tok(i)
        }),
        Some("subject")
    );
    assert_eq!(
        ing.revoked(TokenRef {
            sub: Some("frank"),
            ..tok(i)
        }),
        Some("subject")
    );
    assert_eq!(
        ing.revoked(TokenRef {
            sub: Some("dan"),
            ..tok(i)
        }),
        None
    );
    assert_eq!(
        ing.revoked(TokenRef {
            sub: Some("eve"),
            ..tok(i)
        }),
        None,
        "tampered"
    );
    assert_eq!(
        ing.revoked(TokenRef {
            sid: Some("sess-10"),
            ..tok(i)
        }),
        None,
        "nonce"
    );
    assert_eq!(ing.revoked(tok(i)), None);
    assert_eq!(ing.counted(&ing.metrics.events_applied, "sets", "set"), 5);
    assert_eq!(ing.counted(&ing.metrics.events_ignored, "sets", "set"), 1);
    assert_eq!(ing.malformed("sets", "set", "bad_signature"), 1);
    assert_eq!(ing.malformed("sets", "set", "nonce_present"), 1);

    // Keycloak: user and admin events of every mapped kind.
    // Tokens issued after the realm's logout-all and not-before (1718000014) but at the
    // client's not-before (1718000015: iat <= not_before is revoked); session and token
    // entries hold at any iat.
    let after = |t: TokenRef<'static>| TokenRef {
        iat: Some(1_718_000_015),
        ..t
    };
    let base = tok(KC_ISS);
    assert_eq!(
        ing.revoked(after(TokenRef {
            sid: Some("b3a4c5d6-e7f8-4a9b-8c0d-1e2f3a4b5c6d"),
            client_id: None,
            ..base
        })),
        Some("session")
    );
    assert_eq!(
        ing.revoked(after(TokenRef {
            jti: Some("onrtac:2c1f9a7e-3b5d-4c8e-a9f0-1b2c3d4e5f60"),
            client_id: None,
            ..base
        })),
        Some("token")
    );
    assert_eq!(
        ing.revoked(after(TokenRef {
            sid: Some("e5f6a7b8-c9d0-4e1f-8a2b-3c4d5e6f7a8b"),
            client_id: None,
            ..base
        })),
        Some("session")
    );
    assert_eq!(
        ing.revoked(after(TokenRef {
            client_id: Some("web-app"),
            ..base
        })),
        Some("client")
    );
    assert_eq!(
        ing.revoked(after(TokenRef {
            client_id: None,
            ..base
        })),
        None
    );
    // User deletion (not_before 1718000010) and the realm's not-before (1718000014).
    let early = |t: TokenRef<'static>| TokenRef {
        iat: Some(1_718_000_010),
        client_id: None,
        ..t
    };
    assert_eq!(
        ing.revoked(early(TokenRef {
            sub: Some("0f8d7c2e-4b1a-4f6e-9c3d-7a5b2e1d0c9f"),
            ..base
        })),
        Some("subject")
    );
    assert_eq!(ing.revoked(early(base)), Some("issuer"));
    let expected: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(dir_kc.join("expected.json")).unwrap())
            .unwrap();
    let count = |kind: &str| expected.values().filter(|v| v["kind"] == kind).count() as u64;
    assert_eq!(
        ing.counted(&ing.metrics.events_ignored, "kc", "keycloak"),
        count("ignored")
    );
    assert_eq!(
        ing.counted(&ing.metrics.events_applied, "kc", "keycloak"),
        kc.len() as u64 - count("ignored") - count("malformed")
    );
    assert_eq!(ing.malformed("kc", "keycloak", "missing_field"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_waits_for_its_issuers_keys_and_loses_nothing() {
    // The issuer's JWKS is down when revsync starts.
    let key = TestKey::ec_p256("e1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    jwks.set_down(true);
    let mut config = jwks.issuer_config("receiver");
    config.jwks_min_refetch = Duration::from_millis(500);
    let stop = CancellationToken::new();
    let validator = TokenValidator::start(
        &[config],
        reqwest::Client::new(),
        Arc::new(Metrics::new()),
        10,
        stop.clone(),
    )
    .await;
    assert!(!validator.keys_loaded());
    let iss = jwks.issuer();

    let broker = Broker::memory();
    broker.create_topic("sets", 1);
    broker.create_topic("native", 1);
    let dir = tempfile::tempdir().unwrap();
    let ing = Ingesting::start(
        &kafka(
            &broker,
            vec![
                topic("sets", EventFormat::Set, Some(&iss)),
                topic("native", EventFormat::Native, None),
            ],
        ),
        dir.path(),
        SetVerifier::new(validator.clone(), tokio::runtime::Handle::current())
            .with_wait(Duration::from_millis(200)),
    );
    let sign = |sid: &str| {
        key.sign_with_header(
            &json!({"typ": "secevent+jwt"}),
            &set_claims(
                &iss,
                json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": sid}}}),
                json!({}),
            ),
        )
        .into_bytes()
    };
    publish_raw(&broker, "sets", &[sign("held-1"), sign("held-2")]);
    let native = Event {
        id: "n1".into(),
        event_time: now(),
        revocation: Revocation::Session {
            iss: "https://other".into(),
            sid: "flows".into(),
        },
        reason: None,
    };
    let p = Publisher::new(&KafkaConfig::new(broker.bootstrap()), "native").unwrap();
    p.send(&native).unwrap();
    p.finish(Duration::from_secs(30)).unwrap();

    // Other partitions flow; the SET partition stays at its first record.
    eventually("the native event applied", || {
        (ing.revoked(TokenRef {
            sid: Some("flows"),
            ..tok("https://other")
        }) == Some("session"))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ing.position("sets"),
        0,
        "no position past an unverified SET"
    );
    assert_eq!(
        ing.revoked(TokenRef {
            sid: Some("held-1"),
            ..tok(&iss)
        }),
        None
    );
    assert_eq!(ing.malformed("sets", "set", "unknown_key"), 0);
    assert_eq!(ing.malformed("sets", "set", "unverifiable"), 0);

    // The JWKS comes back: both SETs are applied and the position moves.
    jwks.set_down(false);
    eventually("held SETs applied", || {
        (ing.position("sets") == 2).then_some(())
    })
    .await;
    assert_eq!(
        ing.revoked(TokenRef {
            sid: Some("held-1"),
            ..tok(&iss)
        }),
        Some("session")
    );
    assert_eq!(
        ing.revoked(TokenRef {
            sid: Some("held-2"),
            ..tok(&iss)
        }),
        Some("session")
    );
    assert_eq!(ing.counted(&ing.metrics.events_applied, "sets", "set"), 2);
    stop.cancel();
}
