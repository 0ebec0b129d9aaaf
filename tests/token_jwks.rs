//! Token validation against a real HTTP JWKS server (axum on loopback, in this process):
//! algorithms, discovery, key rotation, unknown-kid storms, JWKS outages, attacks, claim
//! checks and the verified-token cache. Nothing in the check path is mocked.

mod common;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use common::jwt::{
    b64url, claims, claims_with, hs256_token, now, raw_token, raw_token_text, JwksServer, TestKey,
};
use jsonwebtoken::Algorithm;
use revsync::config::IssuerConfig;
use revsync::metrics::{IssuerLabels, Metrics};
use revsync::token::{token_hash, Rejection, TokenValidator};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const AUD: &str = "https://api.example.com";

/// RSA key generation takes a while: one RS256 and one spare RSA key shared by the tests.
static RSA: LazyLock<TestKey> = LazyLock::new(|| TestKey::rsa("rsa-1", Algorithm::RS256));
static RSA_OTHER: LazyLock<TestKey> = LazyLock::new(|| TestKey::rsa("evil", Algorithm::RS256));

struct Env {
    v: Arc<TokenValidator>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Env {
    async fn start(issuers: Vec<IssuerConfig>) -> Self {
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let v = TokenValidator::start(
            &issuers,
            reqwest::Client::new(),
            metrics.clone(),
            10_000,
            shutdown.clone(),
        )
        .await;
        Env {
            v,
            metrics,
            shutdown,
        }
    }

    fn fetches(&self, issuer: &str) -> u64 {
        self.metrics
            .jwks_fetches
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_string(),
            })
            .get()
    }

    fn failures(&self, issuer: &str) -> u64 {
        self.metrics
            .jwks_failures
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_string(),
            })
            .get()
    }

    async fn check(&self, token: &str) -> Result<(), Rejection> {
        self.v.validate(token).await.map(|_| ())
    }

    /// `check` with the clock at `now`.
    async fn check_at(&self, token: &str, now: u64) -> Result<(), Rejection> {
        self.v.validate_at(token, now).await.map(|_| ())
    }

    /// Validates every token at once, each in its own task; the results in the order they
    /// finish.
    async fn check_concurrently(&self, tokens: Vec<String>) -> Vec<Result<(), Rejection>> {
        let mut tasks = tokio::task::JoinSet::new();
        for token in tokens {
            let v = self.v.clone();
            tasks.spawn(async move { v.validate(&token).await.map(|_| ()) });
        }
        let mut results = Vec::new();
        while let Some(result) = tasks.join_next().await {
            results.push(result.unwrap());
        }
        results
    }
}

/// `n` tokens of `key` for `iss`, each naming a kid that no JWKS has.
fn junk_kid_tokens(key: &TestKey, iss: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| key.sign_with_header(&json!({"kid": format!("junk-{i}")}), &claims(iss, AUD, 300)))
        .collect()
}

/// One issuer served by `server`, with `tweak` applied to its config.
async fn env_for(server: &JwksServer, tweak: impl FnOnce(&mut IssuerConfig)) -> Env {
    let mut config = server.issuer_config(AUD);
    tweak(&mut config);
    Env::start(vec![config]).await
}

#[tokio::test]
async fn every_supported_algorithm_is_accepted() {
    let keys = [
        TestKey::rsa("rs256", Algorithm::RS256),
        TestKey::rsa("ps256", Algorithm::PS256),
        TestKey::ec_p256("es256"),
        TestKey::ec_p384("es384"),
        TestKey::ed25519("eddsa"),
    ];
    let server = JwksServer::with_keys(&keys.iter().collect::<Vec<_>>()).await;
    let env = env_for(&server, |_| {}).await;
    assert!(env.v.keys_loaded());
    for key in &keys {
        let token = key.sign(&claims(&server.issuer(), AUD, 300));
        let verified = env
            .v
            .validate(&token)
            .await
            .unwrap_or_else(|e| panic!("{:?} rejected: {e:?}", key.alg));
        assert_eq!(verified.iss, server.issuer());
        assert_eq!(verified.sub.as_deref(), Some("alice"));
    }
    assert_eq!(
        server.jwks_requests(),
        1,
        "one fetch at start, none per token"
    );
    assert_eq!(env.fetches(&server.issuer()), 1);
}

#[tokio::test]
async fn rsa_key_without_jwk_alg_serves_every_rsa_algorithm() {
    let server = JwksServer::start().await;
    server.add_jwk(RSA.jwk_with(json!({"alg": null})));
    let env = env_for(&server, |_| {}).await;
    for alg in [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ] {
        let token = common::jwt::sign(
            alg,
            &RSA.encoding,
            Some(&RSA.kid),
            &claims(&server.issuer(), AUD, 300),
            &json!({}),
        );
        assert_eq!(env.check(&token).await, Ok(()), "{alg:?}");
    }
}

#[tokio::test]
async fn claims_are_extracted() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |_| {}).await;
    let iss = server.issuer();

    let token = key.sign(&claims_with(
        &iss,
        AUD,
        json!({"azp": "web-app", "sid": "s-1", "scp": ["read", "write"], "tenant": "t1",
               "aud": ["other", AUD], "nbf": now() - 5}),
    ));
    let t = env.v.validate(&token).await.unwrap();
    assert_eq!(
        t.client_id.as_deref(),
        Some("web-app"),
        "client_id from azp"
    );
    assert_eq!(t.scope.as_deref(), Some("read write"), "scp joined");
    assert_eq!(t.sid.as_deref(), Some("s-1"));
    assert_eq!(t.sub.as_deref(), Some("alice"));
    assert!(t.jti.as_deref().unwrap().starts_with("jti-"));
    assert!(t.iat.is_some() && t.nbf.is_some() && t.exp > now());
    assert_eq!(t.claims["tenant"], json!("t1"));
    assert_eq!(t.claims["aud"], json!(["other", AUD]));

    let token = key.sign(&claims_with(
        &iss,
        AUD,
        json!({"client_id": "svc", "azp": "ignored", "scope": "a b", "sid": null}),
    ));
    let t = env.v.validate(&token).await.unwrap();
    assert_eq!(
        t.client_id.as_deref(),
        Some("svc"),
        "client_id wins over azp"
    );
    assert_eq!(t.scope.as_deref(), Some("a b"));
    assert_eq!(t.sid, None);
}

#[tokio::test]
async fn jwks_is_discovered_from_openid_configuration() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| c.jwks_uri = None).await;
    assert_eq!(server.discovery_requests(), 1);
    assert_eq!(server.jwks_requests(), 1);
    assert!(env.v.keys_loaded());
    let token = key.sign(&claims(&server.issuer(), AUD, 300));
    assert_eq!(env.check(&token).await, Ok(()));

    let status = env.v.status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].issuer, server.issuer());
    assert_eq!(
        status[0].jwks_uri.as_deref(),
        Some(server.jwks_uri().as_str())
    );
    assert_eq!(status[0].keys, 1);
    assert!(status[0].loaded);
    assert!(status[0].last_success.is_some());
    assert_eq!(status[0].last_error, None);
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json[0]["keys"], json!(1));
}

#[tokio::test]
async fn discovery_naming_another_issuer_is_refused() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    server.set_discovery_issuer(Some("https://impostor.example".to_string()));
    let env = env_for(&server, |c| c.jwks_uri = None).await;
    assert!(!env.v.keys_loaded());
    assert_eq!(server.jwks_requests(), 0);
    let status = env.v.status();
    assert!(status[0].last_error.as_deref().unwrap().contains("issuer"));
    let token = key.sign(&claims(&server.issuer(), AUD, 300));
    assert_eq!(env.check(&token).await, Err(Rejection::KeysUnavailable));
}

#[tokio::test]
async fn rotated_key_is_accepted_after_the_refetch_it_triggers() {
    let old = TestKey::ec_p256("old");
    let server = JwksServer::with_keys(&[&old]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = server.issuer();
    assert_eq!(env.check(&old.sign(&claims(&iss, AUD, 300))).await, Ok(()));

    let new = TestKey::ed25519("new");
    server.publish(&new);
    assert_eq!(env.check(&new.sign(&claims(&iss, AUD, 300))).await, Ok(()));
    assert_eq!(server.jwks_requests(), 2, "start + one refetch");
    assert_eq!(env.fetches(&iss), 2);
    // Known now: no further fetch.
    assert_eq!(env.check(&new.sign(&claims(&iss, AUD, 300))).await, Ok(()));
    assert_eq!(server.jwks_requests(), 2);
    assert_eq!(env.v.status()[0].keys, 2);
}

#[tokio::test]
async fn retracted_key_stops_serving_even_for_cached_tokens() {
    let old = TestKey::ec_p256("old");
    let new = TestKey::ec_p256("new");
    let server = JwksServer::with_keys(&[&old]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = server.issuer();
    let old_token = old.sign(&claims(&iss, AUD, 300));
    assert_eq!(env.check(&old_token).await, Ok(()));
    assert_eq!(env.check(&old_token).await, Ok(()));
    assert_eq!(env.metrics.cache_hits.get(), 1);

    server.set_keys(vec![new.jwk.clone()]);
    assert_eq!(env.check(&new.sign(&claims(&iss, AUD, 300))).await, Ok(()));
    assert_eq!(
        env.check(&old_token).await,
        Err(Rejection::UnknownKey),
        "the cache was cleared when the old key disappeared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_unknown_kids_fetches_at_most_once() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |_| {}).await; // jwks_min_refetch: default 10s
    let iss = server.issuer();
    let before = server.jwks_requests();
    assert_eq!(before, 1);

    let results = env
        .check_concurrently(junk_kid_tokens(&key, &iss, 200))
        .await;
    assert_eq!(results.len(), 200);
    for result in results {
        assert_eq!(result, Err(Rejection::UnknownKey));
    }
    let refetches = server.jwks_requests() - before;
    assert!(refetches <= 1, "{refetches} refetches");
    assert_eq!(env.fetches(&iss), 1 + refetches as u64);
    // The real key still works without another fetch.
    assert_eq!(env.check(&key.sign(&claims(&iss, AUD, 300))).await, Ok(()));
    assert_eq!(server.jwks_requests() - before, refetches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unknown_kids_share_one_fetch_without_rate_limit() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = server.issuer();
    server.set_delay(Duration::from_millis(300));
    let before = server.jwks_requests();

    let results = env
        .check_concurrently(junk_kid_tokens(&key, &iss, 100))
        .await;
    for result in results {
        assert_eq!(result, Err(Rejection::UnknownKey));
    }
    let refetches = server.jwks_requests() - before;
    assert!(
        (1..=2).contains(&refetches),
        "{refetches} fetches for 100 concurrent unknown kids"
    );
}

#[tokio::test]
async fn jwks_outage_keeps_last_good_keys() {
    let key = TestKey::ec_p256("k1");
    let stranger = TestKey::ec_p256("k2");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = server.issuer();
    server.set_down(true);

    assert_eq!(env.check(&key.sign(&claims(&iss, AUD, 300))).await, Ok(()));
    let unknown = env
        .check(&stranger.sign(&claims(&iss, AUD, 300)))
        .await
        .unwrap_err();
    assert_eq!(unknown, Rejection::UnknownKey);
    assert!(!unknown.undecidable());
    assert_eq!(server.jwks_requests(), 2, "the unknown kid tried a refetch");
    assert_eq!(env.failures(&iss), 1);
    assert_eq!(env.check(&key.sign(&claims(&iss, AUD, 300))).await, Ok(()));
    assert!(env.v.keys_loaded());
    let status = &env.v.status()[0];
    assert_eq!(status.keys, 1);
    assert!(status.last_error.as_deref().unwrap().contains("503"));

    server.set_down(false);
    server.publish(&stranger);
    assert_eq!(
        env.check(&stranger.sign(&claims(&iss, AUD, 300))).await,
        Ok(())
    );
    assert_eq!(env.v.status()[0].last_error, None);
}

#[tokio::test]
async fn slow_jwks_counts_as_down_and_known_keys_keep_working() {
    let key = TestKey::ec_p256("k1");
    let stranger = TestKey::ec_p256("k2");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| {
        c.jwks_min_refetch = Duration::ZERO;
        c.jwks_timeout = Duration::from_millis(300);
    })
    .await;
    let iss = server.issuer();
    // Slower than the fetch timeout by far: the check must not wait for the server.
    server.set_delay(Duration::from_secs(8));

    let started = std::time::Instant::now();
    let unknown = env
        .check(&stranger.sign(&claims(&iss, AUD, 300)))
        .await
        .unwrap_err();
    assert_eq!(unknown, Rejection::UnknownKey);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the check waited for the slow server: {:?}",
        started.elapsed()
    );
    assert_eq!(env.failures(&iss), 1);
    assert_eq!(
        env.v.status()[0].last_error.as_deref(),
        Some("JWKS: timed out")
    );
    assert_eq!(env.check(&key.sign(&claims(&iss, AUD, 300))).await, Ok(()));
    assert!(env.v.keys_loaded());
}

#[tokio::test]
async fn garbage_jwks_keeps_last_good_keys() {
    let key = TestKey::ec_p256("k1");
    let stranger = TestKey::ec_p256("k2");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = server.issuer();
    let bodies: Vec<(Vec<u8>, &str)> = vec![
        (b"<html>oops</html>".to_vec(), "invalid JSON"),
        (b"".to_vec(), "invalid JSON"),
        (b"\xff\xfe{}".to_vec(), "invalid JSON"),
        (b"[]".to_vec(), "no \"keys\" array"),
        (br#"{"keys":"k1"}"#.to_vec(), "no \"keys\" array"),
        (br#"{"keys":[]}"#.to_vec(), "no usable signing key"),
        (
            br#"{"keys":[{"kty":"EC","kid":"k2","crv":"P-256","x":"!!","y":"??"},7,null]}"#
                .to_vec(),
            "no usable signing key",
        ),
        (
            format!(
                r#"{{"keys":[{{"kty":"oct","kid":"k2","k":"{}"}}]}}"#,
                "A".repeat(43)
            )
            .into_bytes(),
            "no usable signing key",
        ),
        (vec![b' '; 2 * 1024 * 1024], "larger than"),
    ];
    for (round, (body, why)) in bodies.into_iter().enumerate() {
        server.set_raw_jwks(Some(body));
        let unknown = env
            .check(&stranger.sign(&claims(&iss, AUD, 300)))
            .await
            .unwrap_err();
        assert_eq!(unknown, Rejection::UnknownKey, "round {round}");
        assert_eq!(env.failures(&iss), round as u64 + 1, "round {round}");
        let error = env.v.status()[0].last_error.clone().unwrap();
        assert!(error.contains(why), "round {round}: {error}");
        assert_eq!(
            env.check(&key.sign(&claims(&iss, AUD, 300))).await,
            Ok(()),
            "round {round}: the last good key stops serving"
        );
        assert_eq!(env.v.status()[0].keys, 1, "round {round}");
    }
    server.set_raw_jwks(None);
    server.publish(&stranger);
    assert_eq!(
        env.check(&stranger.sign(&claims(&iss, AUD, 300))).await,
        Ok(())
    );
}

#[tokio::test]
async fn duplicate_claims_and_nested_tokens_are_malformed() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |_| {}).await;
    let iss = server.issuer();
    let exp = now() + 300;
    // Correctly signed, so only the JSON rule can reject them.
    let header = r#"{"alg":"ES256","kid":"k1"}"#;
    let payloads = [
        format!(r#"{{"iss":"{iss}","aud":"{AUD}","exp":{exp},"sub":"alice","sub":"admin"}}"#),
        format!(r#"{{"iss":"{iss}","aud":"{AUD}","exp":{exp},"exp":{exp}}}"#),
        format!(r#"{{"iss":"{iss}","aud":"{AUD}","aud":"other","exp":{exp}}}"#),
        format!(r#"{{"iss":"{iss}","aud":"{AUD}","exp":{exp},"cnf":{{"jkt":"a","jkt":"b"}}}}"#),
    ];
    for payload in &payloads {
        let token = key.sign_text(header, payload);
        assert_eq!(
            env.check(&token).await,
            Err(Rejection::Malformed),
            "{payload}"
        );
    }
    let fine = format!(r#"{{"iss":"{iss}","aud":"{AUD}","exp":{exp},"sub":"alice"}}"#);
    assert_eq!(env.check(&key.sign_text(header, &fine)).await, Ok(()));
    for header in [
        r#"{"alg":"ES256","kid":"k1","kid":"k1"}"#,
        r#"{"alg":"ES256","alg":"ES256","kid":"k1"}"#,
        r#"{"alg":"ES256","kid":"k1","cty":"JWT"}"#,
    ] {
        let token = key.sign_text(header, &fine);
        assert_eq!(
            env.check(&token).await,
            Err(Rejection::Malformed),
            "{header}"
        );
    }
    // A nested JWT: the payload is itself a signed token, announced by cty.
    let inner = key.sign(&claims(&iss, AUD, 300));
    let nested = key.sign_text(r#"{"alg":"ES256","kid":"k1","cty":"JWT"}"#, &inner);
    assert_eq!(env.check(&nested).await, Err(Rejection::Malformed));
}

#[tokio::test]
async fn issuer_whose_jwks_never_loaded_is_undecidable() {
    let key = TestKey::ec_p256("k1");
    let healthy_key = TestKey::ec_p256("h1");
    let down = JwksServer::with_keys(&[&key]).await;
    down.set_down(true);
    let healthy = JwksServer::with_keys(&[&healthy_key]).await;
    let mut down_config = down.issuer_config(AUD);
    down_config.jwks_min_refetch = Duration::ZERO;
    let env = Env::start(vec![down_config, healthy.issuer_config(AUD)]).await;
    assert!(!env.v.keys_loaded(), "one issuer has no keys");
    let status = env.v.status();
    assert!(!status[0].loaded && status[1].loaded);
    assert_eq!(env.failures(&down.issuer()), 1);

    let token = key.sign(&claims(&down.issuer(), AUD, 300));
    let rejection = env.check(&token).await.unwrap_err();
    assert_eq!(rejection, Rejection::KeysUnavailable);
    assert!(rejection.undecidable());
    assert_eq!(rejection.reason(), "unknown_key");
    assert!(
        env.failures(&down.issuer()) >= 2,
        "the check tried a refetch"
    );
    // The other issuer is unaffected.
    let other = healthy_key.sign(&claims(&healthy.issuer(), AUD, 300));
    assert_eq!(env.check(&other).await, Ok(()));

    down.set_down(false);
    assert_eq!(env.check(&token).await, Ok(()), "recovers once reachable");
    assert!(env.v.keys_loaded());
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let server = JwksServer::with_keys(&[&*RSA]).await;
    let env = env_for(&server, |_| {}).await;
    let payload = claims(&server.issuer(), AUD, 300);
    for alg in ["none", "None", "NONE", "nOnE"] {
        for header in [
            json!({"alg": alg, "kid": RSA.kid, "typ": "JWT"}),
            json!({"alg": alg}),
        ] {
            let token = raw_token(&header, &payload, b"");
            assert_eq!(
                env.check(&token).await,
                Err(Rejection::BadSignature),
                "{alg}"
            );
        }
    }
    assert_eq!(server.jwks_requests(), 1);
}

#[tokio::test]
async fn hmac_with_the_rsa_public_key_is_rejected() {
    let server = JwksServer::with_keys(&[&*RSA]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let payload = claims(&server.issuer(), AUD, 300);
    let header = json!({"kid": RSA.kid, "typ": "JWT"});
    let n = RSA.jwk["n"].as_str().unwrap().to_string();
    let secrets: Vec<Vec<u8>> = vec![
        RSA.public_der.clone(),
        n.into_bytes(),
        RSA.public_pem().into_bytes(),
        serde_json::to_vec(&RSA.jwk).unwrap(),
    ];
    for secret in &secrets {
        let token = hs256_token(secret, &header, &payload);
        assert_eq!(env.check(&token).await, Err(Rejection::BadSignature));
        for alg in ["HS384", "HS512"] {
            let mut forged: Vec<&str> = token.split('.').collect();
            let h = b64url(json!({"alg": alg, "kid": RSA.kid}).to_string().as_bytes());
            forged[0] = &h;
            assert_eq!(
                env.check(&forged.join(".")).await,
                Err(Rejection::BadSignature)
            );
        }
    }
    assert_eq!(server.jwks_requests(), 1, "rejected before any key lookup");
}

#[tokio::test]
async fn hostile_kids_are_rejected() {
    let server = JwksServer::with_keys(&[&*RSA]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = server.issuer();

    let path = RSA.sign_with_header(&json!({"kid": "../../etc/passwd"}), &claims(&iss, AUD, 300));
    assert_eq!(env.check(&path).await, Err(Rejection::UnknownKey));
    assert_eq!(
        server.jwks_requests(),
        2,
        "an ordinary unknown kid refetches"
    );

    let long_kid = "A".repeat(10 * 1024);
    let long = RSA.sign_with_header(&json!({"kid": long_kid}), &claims(&iss, AUD, 300));
    assert!(long.len() < 16 * 1024, "below the token size limit");
    assert_eq!(env.check(&long).await, Err(Rejection::Malformed));
    let just_over = RSA.sign_with_header(&json!({"kid": "k".repeat(257)}), &claims(&iss, AUD, 300));
    assert_eq!(env.check(&just_over).await, Err(Rejection::Malformed));
    assert_eq!(server.jwks_requests(), 2, "no fetch for an oversized kid");
    assert_eq!(env.fetches(&iss), 2);

    let numeric = RSA.sign_with_header(&json!({"kid": 7}), &claims(&iss, AUD, 300));
    assert_eq!(env.check(&numeric).await, Err(Rejection::Malformed));
}

#[tokio::test]
async fn key_material_from_token_headers_is_never_used() {
    let attacker_server = JwksServer::with_keys(&[&*RSA_OTHER]).await;
    let server = JwksServer::with_keys(&[&*RSA]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let payload = claims(&server.issuer(), AUD, 300);
    let evil_jwk = RSA_OTHER.jwk.clone();

    // jku / x5u pointing at the attacker's JWKS, attacker's kid.
    let jku = RSA_OTHER.sign_with_header(
        &json!({"jku": attacker_server.jwks_uri(), "x5u": attacker_server.jwks_uri()}),
        &payload,
    );
    assert_eq!(env.check(&jku).await, Err(Rejection::UnknownKey));
    // jku with the issuer's own kid: the issuer's key is used, and does not match.
    let jku_own_kid = RSA_OTHER.sign_with_header(
        &json!({"kid": RSA.kid, "jku": attacker_server.jwks_uri()}),
        &payload,
    );
    assert_eq!(env.check(&jku_own_kid).await, Err(Rejection::BadSignature));
    assert_eq!(attacker_server.jwks_requests(), 0, "jku never fetched");
    assert_eq!(attacker_server.discovery_requests(), 0);

    // Embedded jwk of the key that signed the token.
    let embedded = RSA_OTHER.sign_with_header(&json!({"kid": RSA.kid, "jwk": evil_jwk}), &payload);
    assert_eq!(env.check(&embedded).await, Err(Rejection::BadSignature));
    let embedded_own_kid = RSA_OTHER.sign_with_header(&json!({"jwk": evil_jwk}), &payload);
    assert_eq!(
        env.check(&embedded_own_kid).await,
        Err(Rejection::UnknownKey)
    );
    let embedded_no_kid =
        RSA_OTHER.sign_with_header(&json!({"kid": null, "jwk": evil_jwk}), &payload);
    assert_eq!(
        env.check(&embedded_no_kid).await,
        Err(Rejection::BadSignature)
    );
    // Embedded certificate chain.
    let x5c = RSA_OTHER.sign_with_header(
        &json!({"kid": RSA.kid, "x5c": [common::jwt::b64std(&RSA_OTHER.public_der)]}),
        &payload,
    );
    assert_eq!(env.check(&x5c).await, Err(Rejection::BadSignature));
}

#[tokio::test]
async fn token_without_kid_needs_exactly_one_fitting_key() {
    let ec = TestKey::ec_p256("ec");
    let server = JwksServer::with_keys(&[&*RSA, &ec]).await;
    let env = env_for(&server, |_| {}).await;
    let iss = server.issuer();
    let no_kid =
        |key: &TestKey| key.sign_with_header(&json!({"kid": null}), &claims(&iss, AUD, 300));
    assert_eq!(env.check(&no_kid(&RSA)).await, Ok(()));
    assert_eq!(env.check(&no_kid(&ec)).await, Ok(()));

    let second_rsa = RSA_OTHER.jwk_with(json!({"kid": "rsa-2"}));
    server.add_jwk(second_rsa);
    let env = env_for(&server, |_| {}).await;
    assert_eq!(
        env.check(&no_kid(&RSA)).await,
        Err(Rejection::UnknownKey),
        "two RSA keys: ambiguous"
    );
    assert_eq!(env.check(&no_kid(&ec)).await, Ok(()));
}

#[tokio::test]
async fn key_must_fit_the_token_algorithm() {
    let ec = TestKey::ec_p256("ec");
    let ps_only = RSA_OTHER.jwk_with(json!({"kid": "ps-only", "alg": "PS256"}));
    let enc = RSA_OTHER.jwk_with(json!({"kid": "enc", "alg": null, "use": "enc"}));
    let server = JwksServer::with_keys(&[&*RSA, &ec]).await;
    server.add_jwk(ps_only);
    server.add_jwk(enc);
    let env = env_for(&server, |_| {}).await;
    let payload = claims(&server.issuer(), AUD, 300);

    let sign = |alg, key: &TestKey, kid: &str| {
        common::jwt::sign(alg, &key.encoding, Some(kid), &payload, &json!({}))
    };

    // EC key named by an RS256 token.
    let token = sign(Algorithm::RS256, &RSA, "ec");
    assert_eq!(env.check(&token).await, Err(Rejection::BadSignature));
    // RSA key named by an ES256 token.
    let token = sign(Algorithm::ES256, &ec, &RSA.kid);
    assert_eq!(env.check(&token).await, Err(Rejection::BadSignature));
    // JWK alg PS256, token RS256 signed by that very key.
    let token = sign(Algorithm::RS256, &RSA_OTHER, "ps-only");
    assert_eq!(env.check(&token).await, Err(Rejection::BadSignature));
    let token = sign(Algorithm::PS256, &RSA_OTHER, "ps-only");
    assert_eq!(env.check(&token).await, Ok(()));
    // A JWK with use=enc is not a signing key.
    let token = sign(Algorithm::RS256, &RSA_OTHER, "enc");
    assert_eq!(env.check(&token).await, Err(Rejection::UnknownKey));
}

#[tokio::test]
async fn algorithm_outside_the_issuer_allowlist_is_rejected() {
    let ec = TestKey::ec_p256("ec");
    let server = JwksServer::with_keys(&[&*RSA, &ec]).await;
    let env = env_for(&server, |c| c.algorithms = vec!["ES256".to_string()]).await;
    let iss = server.issuer();
    assert_eq!(
        env.check(&RSA.sign(&claims(&iss, AUD, 300))).await,
        Err(Rejection::BadSignature)
    );
    assert_eq!(env.check(&ec.sign(&claims(&iss, AUD, 300))).await, Ok(()));
    assert_eq!(server.jwks_requests(), 1);
}

#[tokio::test]
async fn typ_is_enforced_when_required() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| c.require_typ = true).await;
    let iss = server.issuer();
    for (typ, expected) in [
        (json!("JWT"), Err(Rejection::WrongType)),
        (json!(null), Err(Rejection::WrongType)),
        (json!("jwt+at"), Err(Rejection::WrongType)),
        (json!("at+jwt"), Ok(())),
        (json!("AT+JWT"), Ok(())),
        (json!("application/at+jwt"), Ok(())),
    ] {
        let token = key.sign_with_header(&json!({"typ": typ}), &claims(&iss, AUD, 300));
        assert_eq!(env.check(&token).await, expected, "typ {typ}");
    }
    let relaxed = env_for(&server, |_| {}).await;
    let token = key.sign_with_header(&json!({"typ": "JWT"}), &claims(&iss, AUD, 300));
    assert_eq!(relaxed.check(&token).await, Ok(()));
}

#[tokio::test]
async fn audience_must_contain_ours() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| {
        c.audiences.push("https://second.example".into())
    })
    .await;
    let iss = server.issuer();
    for (aud, expected) in [
        (
            json!(["https://a.example", "https://b.example"]),
            Err(Rejection::WrongAudience),
        ),
        (json!("https://a.example"), Err(Rejection::WrongAudience)),
        (json!([]), Err(Rejection::WrongAudience)),
        (json!(null), Err(Rejection::WrongAudience)),
        (json!(["https://a.example", AUD]), Ok(())),
        (json!(AUD), Ok(())),
        (json!("https://second.example"), Ok(())),
        (json!(42), Err(Rejection::Malformed)),
    ] {
        let token = key.sign(&claims_with(&iss, AUD, json!({"aud": aud})));
        assert_eq!(env.check(&token).await, expected, "aud {aud}");
    }
}

#[tokio::test]
async fn exp_and_nbf_apply_the_leeway() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| c.leeway = Duration::from_secs(30)).await;
    let iss = server.issuer();
    let exp = now() + 100;
    let token = |extra: Value| key.sign(&claims_with(&iss, AUD, extra));

    let t = token(json!({"exp": exp}));
    assert_eq!(env.check_at(&t, exp + 31).await, Err(Rejection::Expired));
    let t = token(json!({"exp": exp}));
    assert_eq!(env.check_at(&t, exp + 30).await, Err(Rejection::Expired));
    let t = token(json!({"exp": exp}));
    assert_eq!(env.check_at(&t, exp + 29).await, Ok(()));

    let nbf = now() + 60;
    let t = token(json!({"nbf": nbf}));
    assert_eq!(
        env.check_at(&t, nbf - 31).await,
        Err(Rejection::NotYetValid)
    );
    let t = token(json!({"nbf": nbf}));
    assert_eq!(env.check_at(&t, nbf - 30).await, Ok(()));
    let t = token(json!({"nbf": nbf}));
    assert_eq!(
        env.check(&t).await,
        Err(Rejection::NotYetValid),
        "60 s ahead at the real clock"
    );

    assert_eq!(
        env.check(&token(json!({"exp": null}))).await,
        Err(Rejection::Malformed)
    );
    assert_eq!(
        env.check(&token(json!({"exp": exp.to_string()}))).await,
        Err(Rejection::Malformed)
    );
    assert_eq!(
        env.check(&token(json!({"nbf": "soon"}))).await,
        Err(Rejection::Malformed)
    );
    assert_eq!(
        env.check(&token(json!({"iat": {"t": 1}}))).await,
        Err(Rejection::Malformed)
    );
}

#[tokio::test]
async fn issuer_must_be_configured_exactly() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = server.issuer();
    for other in [
        "https://evil.example".to_string(),
        format!("{iss}/"),
        iss.to_uppercase(),
    ] {
        let token = key.sign(&claims(&other, AUD, 300));
        assert_eq!(
            env.check(&token).await,
            Err(Rejection::WrongIssuer),
            "{other}"
        );
    }
    assert_eq!(
        env.check(&key.sign(&claims_with(&iss, AUD, json!({"iss": null}))))
            .await,
        Err(Rejection::Malformed)
    );
    assert_eq!(server.jwks_requests(), 1, "no fetch for unknown issuers");
}

#[tokio::test]
async fn required_claims_must_be_present() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| {
        c.required_claims = vec!["jti".into(), "sub".into()]
    })
    .await;
    let iss = server.issuer();
    assert_eq!(env.check(&key.sign(&claims(&iss, AUD, 300))).await, Ok(()));
    assert_eq!(
        env.check(&key.sign(&claims_with(&iss, AUD, json!({"jti": null}))))
            .await,
        Err(Rejection::Malformed)
    );
}

#[tokio::test]
async fn tampering_breaks_the_signature() {
    let server = JwksServer::with_keys(&[&*RSA]).await;
    let env = env_for(&server, |_| {}).await;
    let iss = server.issuer();
    let token = RSA.sign(&claims(&iss, AUD, 300));
    let parts: Vec<&str> = token.split('.').collect();

    let forged_payload = b64url(
        claims_with(&iss, AUD, json!({"sub": "admin"}))
            .to_string()
            .as_bytes(),
    );
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_eq!(env.check(&tampered).await, Err(Rejection::BadSignature));

    let mut sig = parts[2].as_bytes().to_vec();
    sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        String::from_utf8(sig).unwrap()
    );
    assert_eq!(env.check(&tampered).await, Err(Rejection::BadSignature));

    let truncated = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..100]);
    assert_eq!(env.check(&truncated).await, Err(Rejection::BadSignature));
    let unsigned = format!("{}.{}.", parts[0], parts[1]);
    assert_eq!(env.check(&unsigned).await, Err(Rejection::BadSignature));

    let rs512_header = b64url(
        json!({"alg": "RS512", "kid": RSA.kid})
            .to_string()
            .as_bytes(),
    );
    let swapped = format!("{}.{}.{}", rs512_header, parts[1], parts[2]);
    assert_eq!(env.check(&swapped).await, Err(Rejection::BadSignature));

    assert_eq!(env.check(&token).await, Ok(()));
}

#[tokio::test]
async fn garbage_is_malformed() {
    let server = JwksServer::with_keys(&[&*RSA]).await;
    let env = env_for(&server, |c| c.jwks_min_refetch = Duration::ZERO).await;
    let iss = server.issuer();
    let valid = RSA.sign(&claims(&iss, AUD, 300));
    let huge_claims = RSA.sign(&claims_with(&iss, AUD, json!({"pad": "x".repeat(20_000)})));
    let header = json!({"alg": "RS256", "kid": RSA.kid});
    let garbage = vec![
        String::new(),
        "a".to_string(),
        "a.b".to_string(),
        "a.b.c".to_string(),
        "a.b.c.d".to_string(),
        "..".to_string(),
        "!!!.@@@.###".to_string(),
        format!("{valid}.extra"),
        format!(" {valid}"),
        format!("Bearer {valid}"),
        valid.replace('-', "+").replace('_', "/") + "+",
        "x".repeat(20_000),
        huge_claims,
        raw_token_text("not json", &claims(&iss, AUD, 300).to_string(), b"sig"),
        raw_token_text(&header.to_string(), "not json", b"sig"),
        raw_token_text("[1,2]", &claims(&iss, AUD, 300).to_string(), b"sig"),
        raw_token_text(&header.to_string(), "\"a string\"", b"sig"),
        raw_token(&json!({"alg": 256}), &claims(&iss, AUD, 300), b"sig"),
        raw_token(&json!({"kid": RSA.kid}), &claims(&iss, AUD, 300), b"sig"),
    ];
    for token in &garbage {
        assert_eq!(
            env.check(token).await,
            Err(Rejection::Malformed),
            "{:.60}",
            token
        );
    }
    assert_eq!(server.jwks_requests(), 1, "garbage never fetches");
}

#[tokio::test]
async fn verified_tokens_are_cached_until_exp() {
    let key = TestKey::ec_p256("k1");
    let server = JwksServer::with_keys(&[&key]).await;
    let env = env_for(&server, |c| c.leeway = Duration::from_secs(30)).await;
    let iss = server.issuer();
    let exp = now() + 120;
    let token = key.sign(&claims_with(&iss, AUD, json!({"exp": exp})));

    let first = env.v.validate(&token).await.unwrap();
    assert_eq!(
        (env.metrics.cache_hits.get(), env.metrics.cache_misses.get()),
        (0, 1)
    );
    let second = env.v.validate(&token).await.unwrap();
    assert_eq!(
        (env.metrics.cache_hits.get(), env.metrics.cache_misses.get()),
        (1, 1)
    );
    assert!(Arc::ptr_eq(&first, &second), "served from the cache");

    assert_eq!(
        env.check_at(&token, exp + 30).await,
        Err(Rejection::Expired)
    );
    assert_eq!(env.metrics.cache_hits.get(), 2, "a hit, yet expired");
    assert_eq!(env.check_at(&token, exp + 29).await, Ok(()));

    // Rejections are not cached.
    let bad = key.sign(&claims_with(&iss, "https://other.example", json!({})));
    for _ in 0..2 {
        assert_eq!(env.check(&bad).await, Err(Rejection::WrongAudience));
    }
    assert_eq!(env.metrics.cache_hits.get(), 3);
    assert_eq!(env.metrics.cache_misses.get(), 3);

    assert_eq!(token_hash(&token), token_hash(&token));
    assert_ne!(token_hash(&token), token_hash(&bad));
}
