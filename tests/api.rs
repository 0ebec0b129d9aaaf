//! The HTTP API (DESIGN.md, "HTTP API"; invariants 5-7) driven through the real router
//! with `oneshot` (tests/common/router.rs): no socket, but a real JWKS server, a real
//! (temporary) sled denylist, real token validation and real freshness state.

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::jwt::{claims_with, now, TestKey};
use common::router::{Harness, Opts, Resp, AUD, MAX_BODY};
use jsonwebtoken::Algorithm;
use revsync::config::OnStale;
use revsync::event::Revocation;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// Harness: the requests of these tests

const JSON: (&str, &str) = ("content-type", "application/json");

impl Harness {
    async fn get(&self, path: &str) -> Resp {
        self.request(Method::GET, path, &[], Body::empty()).await
    }

    /// `POST /v1/check` with JSON `{"token": …}`.
    async fn check(&self, token: &str) -> Resp {
        self.check_body(json!({ "token": token }).to_string()).await
    }

    async fn check_body(&self, body: impl Into<Body>) -> Resp {
        self.request(Method::POST, "/v1/check", &[JSON], body).await
    }

    /// `POST /v1/check` with no body and this `Authorization` header.
    async fn check_header(&self, authorization: &str) -> Resp {
        let headers = [("authorization", authorization)];
        self.request(Method::POST, "/v1/check", &headers, Body::empty())
            .await
    }

    /// `POST /introspect` with this form body.
    async fn introspect_form(&self, form: &str) -> Resp {
        let headers = [("content-type", "application/x-www-form-urlencoded")];
        self.request(Method::POST, "/introspect", &headers, form.to_string())
            .await
    }

    async fn introspect(&self, token: &str) -> Resp {
        let form = serde_urlencoded::to_string([("token", token)]).unwrap();
        self.introspect_form(&form).await
    }

    async fn authz(&self, method: Method, path: &str, authorization: Option<&str>) -> Resp {
        let header = authorization.map(|a| ("authorization", a));
        self.request(method, path, header.as_slice(), Body::empty())
            .await
    }

    /// `GET /v1/authz` with `Authorization: Bearer <token>`.
    async fn authz_bearer(&self, token: &str) -> Resp {
        self.authz(Method::GET, "/v1/authz", Some(&bearer(token)))
            .await
    }

    /// `/v1/check` answers `{"active":false,"reason":reason}`, exactly.
    async fn assert_inactive(&self, token: &str, reason: &str) {
        let r = self.check(token).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.json(),
            json!({"active": false, "reason": reason}),
            "expected reason {reason}"
        );
    }

    async fn assert_active(&self, token: &str) -> Value {
        let r = self.check(token).await;
        assert_eq!(r.status, StatusCode::OK);
        let body = r.json();
        assert_eq!(body["active"], json!(true), "expected active: {body}");
        assert!(r.headers.get("x-revsync-stale").is_none());
        body
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------
// POST /v1/check

#[tokio::test]
async fn check_active_from_body_and_from_bearer_header() {
    let h = Harness::new(Opts::default()).await;
    let exp = now() + 300;
    let token = h.token(json!({
        "sub": "alice", "client_id": "app-1", "scope": "read write", "exp": exp,
        "jti": "jti-active-1",
    }));

    let body = h.assert_active(&token).await;
    assert_eq!(body["iss"], json!(h.iss));
    assert_eq!(body["sub"], json!("alice"));
    assert_eq!(body["client_id"], json!("app-1"));
    assert_eq!(body["scope"], json!("read write"));
    assert_eq!(body["exp"], json!(exp));
    assert_eq!(body["jti"], json!("jti-active-1"));
    assert_eq!(body["aud"], json!(AUD));
    assert!(body.get("reason").is_none() && body.get("stale").is_none());

    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = h.check_header(&format!("{scheme} {token}")).await;
        assert_eq!(r.status, StatusCode::OK, "{scheme}");
        assert_eq!(r.json(), body, "{scheme}: same answer as from the body");
    }

    // `azp` and `scp` stand in for `client_id` and `scope`.
    let token = h.token(json!({"azp": "app-2", "scp": ["a", "b"]}));
    let body = h.assert_active(&token).await;
    assert_eq!(body["client_id"], json!("app-2"));
    assert_eq!(body["scope"], json!("a b"));

    // JSON body without `token` falls back to the header.
    let auth = bearer(&token);
    let r = h
        .request(Method::POST, "/v1/check", &[("authorization", &auth)], "{}")
        .await;
    assert_eq!(r.json()["active"], json!(true));
}

#[tokio::test]
async fn check_gives_each_validation_reason_word() {
    let h = Harness::new(Opts::default()).await;
    let t = now();

    h.assert_inactive(&h.token(json!({"exp": t - 120, "iat": t - 400})), "expired")
        .await;
    h.assert_inactive(&h.token(json!({"nbf": t + 120})), "not_yet_valid")
        .await;

    // Same kid, other key material: the signature does not verify.
    let impostor = TestKey::ec_p256("k1");
    let forged = impostor.sign(&claims_with(&h.iss, AUD, json!({})));
    h.assert_inactive(&forged, "bad_signature").await;
    // A tampered signature.
    let good = h.token(json!({}));
    let (head, sig) = good.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    h.assert_inactive(&format!("{head}.{flipped}{}", &sig[1..]), "bad_signature")
        .await;
    // An algorithm that is never accepted.
    let hs = common::jwt::hs256_token(
        b"secret",
        &json!({"kid": "k1", "typ": "JWT"}),
        &claims_with(&h.iss, AUD, json!({})),
    );
    h.assert_inactive(&hs, "bad_signature").await;

    let stranger = TestKey::ec_p256("not-published");
    h.assert_inactive(
        &stranger.sign(&claims_with(&h.iss, AUD, json!({}))),
        "unknown_key",
    )
    .await;
    h.assert_inactive(
        &h.key
            .sign(&claims_with("https://other.example.com", AUD, json!({}))),
        "wrong_issuer",
    )
    .await;
    h.assert_inactive(
        &h.token(json!({"aud": "https://elsewhere.example.com"})),
        "wrong_audience",
    )
    .await;

    for garbage in ["garbage", "a.b.c", "e30.e30.", "x"] {
        h.assert_inactive(garbage, "malformed").await;
    }
    h.assert_inactive("", "malformed").await;
    // No token anywhere: empty body, `{}`, `{"token": null}`, a non-Bearer scheme.
    for body in ["", "{}", r#"{"token":null}"#] {
        let r = h.check_body(body).await;
        assert_eq!(r.status, StatusCode::OK, "{body:?}");
        assert_eq!(r.json(), json!({"active": false, "reason": "malformed"}));
    }
    for authorization in [
        "Basic dXNlcjpwYXNz".to_string(),
        "Bearer".to_string(),
        format!("Token {good}"),
        good.clone(),
    ] {
        let r = h.check_header(&authorization).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.json(),
            json!({"active": false, "reason": "malformed"}),
            "Authorization: {authorization:.20}"
        );
    }
}

#[tokio::test]
async fn check_wrong_type_when_issuer_requires_at_jwt() {
    let h = Harness::new(Opts {
        require_typ: true,
        ..Opts::default()
    })
    .await;
    let claims = claims_with(&h.iss, AUD, json!({}));
    h.assert_inactive(&h.key.sign(&claims), "wrong_type").await;
    let no_typ = h.key.sign_with_header(&json!({"typ": null}), &claims);
    h.assert_inactive(&no_typ, "wrong_type").await;
    let at_jwt = h.key.sign_with_header(&json!({"typ": "at+jwt"}), &claims);
    h.assert_active(&at_jwt).await;
}

#[tokio::test]
async fn check_revoked_for_each_kind_and_only_the_matching_tokens() {
    let h = Harness::new(Opts::default()).await;
    let iss = h.iss.clone();
    let t = now();

    // token: (iss, jti)
    let hit = h.token(json!({"jti": "jti-r1"}));
    let miss = h.token(json!({"jti": "jti-r2"}));
    h.assert_active(&hit).await;
    h.revoke(Revocation::Token {
        iss: iss.clone(),
        jti: "jti-r1".into(),
        exp: Some(t + 300),
    });
    h.assert_inactive(&hit, "revoked").await;
    h.assert_active(&miss).await;

    // subject: (iss, sub) with not_before >= iat
    let hit = h.token(json!({"sub": "sub-bob"}));
    let other_subject = h.token(json!({"sub": "sub-carol"}));
    let issued_after = h.token(json!({"sub": "sub-bob", "iat": t + 5}));
    h.revoke(Revocation::Subject {
        iss: iss.clone(),
        sub: "sub-bob".into(),
        not_before: t,
    });
    h.assert_inactive(&hit, "revoked").await;
    h.assert_active(&other_subject).await;
    h.assert_active(&issued_after).await;
    // A subject of another issuer does not touch this issuer's tokens.
    h.revoke(Revocation::Subject {
        iss: "https://other.example.com".into(),
        sub: "sub-carol".into(),
        not_before: t,
    });
    h.assert_active(&other_subject).await;

    // session: (iss, sid)
    let hit = h.token(json!({"sid": "sid-1"}));
    let miss = h.token(json!({"sid": "sid-2"}));
    h.revoke(Revocation::Session {
        iss: iss.clone(),
        sid: "sid-1".into(),
    });
    h.assert_inactive(&hit, "revoked").await;
    h.assert_active(&miss).await;

    // client: (iss, client_id), also when the token names it as `azp`
    let hit = h.token(json!({"client_id": "client-1"}));
    let hit_azp = h.token(json!({"azp": "client-1"}));
    let miss = h.token(json!({"client_id": "client-2"}));
    h.revoke(Revocation::Client {
        iss: iss.clone(),
        client_id: "client-1".into(),
        not_before: t,
    });
    h.assert_inactive(&hit, "revoked").await;
    h.assert_inactive(&hit_azp, "revoked").await;
    h.assert_active(&miss).await;

    // issuer: every token of the issuer issued at or before not_before
    let hit = h.token(json!({"sub": "sub-dave"}));
    let issued_after = h.token(json!({"sub": "sub-dave", "iat": t + 1}));
    h.revoke(Revocation::Issuer {
        iss: "https://other.example.com".into(),
        not_before: t,
    });
    h.assert_active(&hit).await;
    h.revoke(Revocation::Issuer {
        iss: iss.clone(),
        not_before: t,
    });
    h.assert_inactive(&hit, "revoked").await;
    h.assert_active(&issued_after).await;
    // A token without `iat` cannot prove it was issued after the mass revocation.
    let mut claims = claims_with(&iss, AUD, json!({}));
    claims.as_object_mut().unwrap().remove("iat");
    h.assert_inactive(&h.key.sign(&claims), "revoked").await;

    // The other routes agree.
    let r = h.introspect(&hit).await;
    assert_eq!(r.json(), json!({"active": false}));
    let r = h.authz_bearer(&hit).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains(r#"error="invalid_token""#));
}

#[tokio::test]
async fn a_cached_verification_is_still_checked_against_the_denylist() {
    let h = Harness::new(Opts::default()).await;
    let token = h.token(json!({"jti": "jti-cached"}));
    h.assert_active(&token).await;
    h.assert_active(&token).await;
    let hits_before = h.metrics.cache_hits.get();
    assert!(hits_before >= 1, "second check was a cache hit");
    h.revoke_jti("jti-cached");
    h.assert_inactive(&token, "revoked").await;
    assert_eq!(
        h.metrics.cache_hits.get(),
        hits_before + 1,
        "the revoked answer came from a cache hit"
    );
    let r = h.check_header(&bearer(&token)).await;
    assert_eq!(r.json(), json!({"active": false, "reason": "revoked"}));
}

#[tokio::test]
async fn check_stale_denies_or_allows_by_policy() {
    let deny = Harness::new(Opts::never_caught_up(OnStale::Deny)).await;
    let token = deny.token(json!({}));
    let r = deny.check(&token).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        json!({"active": false, "reason": "stale", "undecided": true})
    );
    assert!(r.header("x-revsync-stale").is_none());
    // Invalid tokens are still told why: staleness only matters for valid ones.
    deny.assert_inactive("garbage", "malformed").await;
    // Caught up long ago is as stale as never.
    deny.ingest
        .record_caught_up(revsync::monotonic_ms() - 60_000);
    assert_eq!(
        deny.check(&token).await.json(),
        json!({"active": false, "reason": "stale", "undecided": true})
    );
    deny.ingest.record_caught_up(revsync::monotonic_ms());
    deny.assert_active(&token).await;

    // `introspect` has no client yet: it must not answer active.
    let intro = Harness::new(Opts::never_caught_up(OnStale::Introspect)).await;
    let r = intro.check(&intro.token(json!({}))).await;
    assert_eq!(
        r.json(),
        json!({"active": false, "reason": "stale", "undecided": true})
    );

    let allow = Harness::new(Opts::never_caught_up(OnStale::Allow)).await;
    let token = allow.token(json!({"sub": "alice"}));
    let r = allow.check(&token).await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["active"], json!(true));
    assert_eq!(body["stale"], json!(true));
    assert_eq!(body["sub"], json!("alice"));
    assert_eq!(r.header("x-revsync-stale"), Some("true"));
    // Allowed while stale, but the denylist is still consulted.
    allow.revoke(Revocation::Subject {
        iss: allow.iss.clone(),
        sub: "alice".into(),
        not_before: now(),
    });
    allow.assert_inactive(&token, "revoked").await;
}

#[tokio::test]
async fn check_rejects_bad_bodies_with_4xx() {
    let h = Harness::new(Opts::default()).await;
    let token = h.token(json!({}));
    for body in [
        "not json".to_string(),
        format!("token={token}"),
        r#"{"token": 5}"#.to_string(),
        r#""a string""#.to_string(),
        "42".to_string(),
        format!("{{\"token\": \"{token}\""),
        // serde would read the struct from an array; the contract is an object.
        format!("[\"{token}\"]"),
        format!(" \n[\"{token}\"]"),
        format!("{{\"token\": \"{token}\", \"token\": \"x\"}}"),
    ] {
        let r = h.check_body(body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body:.30}");
        let json = r.json();
        assert_eq!(json["error"], json!("invalid_request"));
        assert!(json["error_description"].is_string());
        r.assert_does_not_echo(&token);
        r.assert_does_not_echo("not json");
    }

    let big = json!({ "token": "x".repeat(20 * 1024) }).to_string();
    let r = h.check_body(big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Just under the limit is read (and is a malformed token, not a 413).
    let near = json!({ "token": "x".repeat(MAX_BODY - 100) }).to_string();
    let r = h.check_body(near).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"active": false, "reason": "malformed"}));
    // The router survives all of it.
    h.assert_active(&token).await;

    let r = h.get("/v1/check").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

// ---------------------------------------------------------------------------------------
// POST /introspect

#[tokio::test]
async fn introspect_answers_rfc7662() {
    let h = Harness::new(Opts::default()).await;
    let exp = now() + 300;
    let token = h.token(json!({
        "sub": "alice", "client_id": "app-1", "scope": "read", "exp": exp, "jti": "jti-i1",
    }));
    let r = h.introspect(&token).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let body = r.json();
    assert_eq!(body["active"], json!(true));
    assert_eq!(body["token_type"], json!("Bearer"));
    assert_eq!(body["iss"], json!(h.iss));
    assert_eq!(body["sub"], json!("alice"));
    assert_eq!(body["client_id"], json!("app-1"));
    assert_eq!(body["scope"], json!("read"));
    assert_eq!(body["exp"], json!(exp));
    assert_eq!(body["aud"], json!(AUD));
    assert!(body.get("stale").is_none() && body.get("reason").is_none());
    // Other form fields (token_type_hint, client credentials) are ignored.
    let form = serde_urlencoded::to_string([
        ("token_type_hint", "access_token"),
        ("token", &token),
        ("client_id", "rs"),
    ])
    .unwrap();
    assert_eq!(h.introspect_form(&form).await.json(), body);

    let inactive = json!({"active": false});
    h.revoke(Revocation::Token {
        iss: h.iss.clone(),
        jti: "jti-i1".into(),
        exp: Some(exp),
    });
    let t = now();
    for bad in [
        token.clone(),
        h.token(json!({"exp": t - 120, "iat": t - 400})),
        h.token(json!({"aud": "nope"})),
        "garbage".to_string(),
        String::new(),
    ] {
        let r = h.introspect(&bad).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json(), inactive, "{bad:.20}");
    }

    // A repeated `token` is ambiguous (RFC 6749 §3.1), whichever comes first.
    let fresh = h.token(json!({}));
    for form in [
        format!("token=garbage&token={fresh}"),
        format!("token={fresh}&token=garbage"),
        format!("token={fresh}&token={fresh}"),
    ] {
        let r = h.introspect_form(&form).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"], json!("invalid_request"));
        r.assert_does_not_echo(&fresh);
    }
    for form in ["", "token_type_hint=access_token", "tok=abc", "%%%"] {
        let r = h.introspect_form(form).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{form:?}");
        assert_eq!(r.json()["error"], json!("invalid_request"));
    }
}

#[tokio::test]
async fn introspect_stale_is_plainly_inactive() {
    let h = Harness::new(Opts::never_caught_up(OnStale::Deny)).await;
    let r = h.introspect(&h.token(json!({}))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"active": false}));

    let down = Harness::new(Opts {
        jwks_down: true,
        ..Opts::default()
    })
    .await;
    let r = down.introspect(&down.token(json!({}))).await;
    assert_eq!(r.json(), json!({"active": false}));

    let allow = Harness::new(Opts::never_caught_up(OnStale::Allow)).await;
    let r = allow.introspect(&allow.token(json!({}))).await;
    let body = r.json();
    assert_eq!(body["active"], json!(true));
    assert!(body.get("stale").is_none(), "RFC 7662 body has no stale");
    assert_eq!(r.header("x-revsync-stale"), Some("true"));
}

// ---------------------------------------------------------------------------------------
// /v1/authz

#[tokio::test]
async fn authz_active_sets_identity_headers_for_any_method_and_subpath() {
    let h = Harness::new(Opts::default()).await;
    let token = h.token(json!({"sub": "alice", "client_id": "app-1", "scope": "read write"}));
    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
    ] {
        for path in [
            "/v1/authz",
            "/v1/authz/",
            "/v1/authz/some/path",
            "/v1/authz/x?y=z",
        ] {
            for scheme in ["Bearer", "bearer"] {
                let r = h
                    .authz(method.clone(), path, Some(&format!("{scheme} {token}")))
                    .await;
                assert_eq!(r.status, StatusCode::OK, "{method} {path}");
                assert_eq!(r.header("x-auth-subject"), Some("alice"));
                assert_eq!(r.header("x-auth-client-id"), Some("app-1"));
                assert_eq!(r.header("x-auth-scope"), Some("read write"));
                assert_eq!(r.header("x-auth-issuer"), Some(h.iss.as_str()));
                assert!(r.header("www-authenticate").is_none());
                assert!(r.header("x-revsync-stale").is_none());
                assert!(r.body.is_empty());
            }
        }
    }
}

#[tokio::test]
async fn authz_unauthorized_and_undecided() {
    let h = Harness::new(Opts::default()).await;
    let no_credentials = r#"Bearer realm="revsync""#;
    for method in [Method::GET, Method::POST] {
        for path in ["/v1/authz", "/v1/authz/", "/v1/authz/some/path"] {
            let r = h.authz(method.clone(), path, None).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(r.header("www-authenticate"), Some(no_credentials));
            // A scheme other than Bearer is no bearer credential either (RFC 6750 §3.1).
            let r = h
                .authz(method.clone(), path, Some("Basic dXNlcjpwYXNz"))
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            assert_eq!(r.header("www-authenticate"), Some(no_credentials));
        }
    }

    let t = now();
    let revoked = h.token(json!({"jti": "jti-az"}));
    h.revoke_jti("jti-az");
    for (token, reason) in [
        ("garbage".to_string(), "malformed"),
        (String::new(), "malformed"),
        (h.token(json!({"exp": t - 120, "iat": t - 400})), "expired"),
        (h.token(json!({"aud": "nope"})), "wrong_audience"),
        (revoked, "revoked"),
    ] {
        for path in ["/v1/authz", "/v1/authz/a/b"] {
            let r = h.authz(Method::GET, path, Some(&bearer(&token))).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{reason}");
            let challenge = r.header("www-authenticate").unwrap();
            assert!(challenge.starts_with("Bearer "), "{challenge}");
            assert!(
                challenge.contains(r#"error="invalid_token""#),
                "{challenge}"
            );
            assert!(challenge.contains(reason), "{challenge}");
            assert!(r.header("x-auth-subject").is_none());
        }
    }

    let stale = Harness::new(Opts::never_caught_up(OnStale::Deny)).await;
    let r = stale.authz_bearer(&stale.token(json!({}))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("x-revsync-reason"), Some("stale"));
    assert!(r.header("x-auth-subject").is_none());

    let allow = Harness::new(Opts::never_caught_up(OnStale::Allow)).await;
    let r = allow
        .authz_bearer(&allow.token(json!({"sub": "alice"})))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-auth-subject"), Some("alice"));
    assert_eq!(r.header("x-revsync-stale"), Some("true"));
}

#[tokio::test]
async fn keys_never_loaded_is_undecided_not_inactive() {
    let h = Harness::new(Opts {
        jwks_down: true,
        ..Opts::default()
    })
    .await;
    let token = h.token(json!({}));
    let r = h.authz_bearer(&token).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("x-revsync-reason"), Some("unknown_key"));
    let r = h.check(&token).await;
    assert_eq!(
        r.json(),
        json!({"active": false, "reason": "unknown_key", "undecided": true})
    );
    let r = h.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["keys_loaded"], json!(false));
    let status = h.get("/v1/status").await.json();
    assert_eq!(status["issuers"][0]["loaded"], json!(false));
    assert!(status["issuers"][0]["last_error"].is_string());
    // A token of an unconfigured issuer is decidable without keys.
    h.assert_inactive(
        &h.key
            .sign(&claims_with("https://other.example.com", AUD, json!({}))),
        "wrong_issuer",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Operations endpoints

#[tokio::test]
async fn health_and_readiness() {
    let h = Harness::new(Opts::never_caught_up(OnStale::Deny)).await;
    let r = h.get("/healthz").await;
    assert_eq!(r.status, StatusCode::OK);

    let r = h.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = r.json();
    assert_eq!(body["ready"], json!(false));
    assert_eq!(body["caught_up_once"], json!(false));
    assert_eq!(body["keys_loaded"], json!(true));
    assert_eq!(body["freshness"]["stale"], json!(true));
    assert_eq!(body["freshness"]["age_ms"], Value::Null);

    h.ingest.record_caught_up(revsync::monotonic_ms());
    let r = h.get("/readyz").await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["ready"], json!(true));
    assert_eq!(body["caught_up_once"], json!(true));
    assert_eq!(body["keys_loaded"], json!(true));
    assert_eq!(body["freshness"]["stale"], json!(false));
    assert_eq!(body["freshness"]["max_staleness_ms"], json!(30_000));

    let r = h.request(Method::POST, "/readyz", &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h.get("/nope").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn metrics_count_checks_and_never_carry_secrets() {
    let h = Harness::new(Opts::default()).await;
    let sub = "sub-metrics-secret-4711";
    let jti = "jti-metrics-secret-4712";
    let token = h.token(json!({"sub": sub, "jti": jti, "sid": "sid-metrics-4713"}));
    h.assert_active(&token).await;
    h.revoke_jti(jti);
    h.assert_inactive(&token, "revoked").await;
    h.introspect(&token).await;
    h.authz_bearer(&token).await;
    h.assert_inactive("garbage-metrics-token", "malformed")
        .await;

    let r = h.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = r.text();
    for line in [
        r#"revsync_checks_total{route="check",outcome="inactive",reason="revoked"} 1"#,
        r#"revsync_checks_total{route="check",outcome="active",reason="none"} 1"#,
        r#"revsync_checks_total{route="check",outcome="inactive",reason="malformed"} 1"#,
        r#"revsync_checks_total{route="introspect",outcome="inactive",reason="revoked"} 1"#,
        r#"revsync_checks_total{route="authz",outcome="inactive",reason="revoked"} 1"#,
        r#"revsync_denylist_entries{kind="token"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(text.trim_end().ends_with("# EOF"));
    let (_, _, signature) = split3(&token);
    for secret in [
        token.as_str(),
        signature,
        sub,
        jti,
        "sid-metrics-4713",
        "garbage-metrics-token",
    ] {
        assert!(!text.contains(secret), "metrics carry {secret:.20}");
    }
}

#[tokio::test]
async fn status_reports_freshness_partitions_denylist_and_issuers() {
    let h = Harness::new(Opts::default()).await;
    h.revoke(Revocation::Session {
        iss: h.iss.clone(),
        sid: "sid-status".into(),
    });
    let r = h.get("/v1/status").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let body = r.json();
    assert_eq!(body["ready"], json!(true));
    assert_eq!(body["freshness"]["stale"], json!(false));
    assert!(body["freshness"]["age_ms"].as_u64().is_some());
    assert_eq!(body["partitions"], json!([]));
    assert_eq!(
        body["denylist"],
        json!({"token": 0, "subject": 0, "session": 1, "client": 0, "issuer": 0})
    );
    let issuers = body["issuers"].as_array().unwrap();
    assert_eq!(issuers.len(), 1);
    assert_eq!(issuers[0]["issuer"], json!(h.iss));
    assert_eq!(issuers[0]["loaded"], json!(true));
    assert_eq!(issuers[0]["keys"], json!(1));
    assert_eq!(issuers[0]["last_error"], Value::Null);
}

// ---------------------------------------------------------------------------------------
// Invariant 6: tokens are secrets

fn split3(token: &str) -> (&str, &str, &str) {
    let mut parts = token.splitn(3, '.');
    (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    )
}

#[tokio::test]
async fn no_answer_echoes_the_token() {
    let h = Harness::new(Opts::default()).await;
    let t = now();
    let revoked = h.token(json!({"jti": "jti-echo"}));
    h.revoke_jti("jti-echo");
    let tokens = [
        h.token(json!({})),
        revoked,
        h.token(json!({"exp": t - 120, "iat": t - 400})),
        h.token(json!({"aud": "nope"})),
        TestKey::ec_p256("k1").sign(&claims_with(&h.iss, AUD, json!({}))),
        TestKey::rsa("kr", Algorithm::RS256).sign(&claims_with(&h.iss, AUD, json!({}))),
        "garbage.token.text-that-is-secret".to_string(),
    ];
    for token in &tokens {
        let (_, _, signature) = split3(token);
        let mut answers = vec![
            h.check(token).await,
            h.check_header(&bearer(token)).await,
            h.check_header(&format!("Basic {token}")).await,
            h.check_body(format!("{{\"token\": \"{token}\" oops")).await,
            h.check_body(format!("{{\"token\": \"{token}{}\"}}", "x".repeat(20_000)))
                .await,
            h.introspect(token).await,
            h.authz_bearer(token).await,
            h.authz(Method::POST, "/v1/authz/p", Some(&format!("Basic {token}")))
                .await,
        ];
        answers.push(h.get("/metrics").await);
        answers.push(h.get("/v1/status").await);
        for (i, r) in answers.iter().enumerate() {
            assert!(r.status.is_success() || r.status.is_client_error() || r.status == 503);
            assert!(
                !r.text().contains(token.as_str()) && !r.text().contains(signature),
                "answer {i} echoes the token"
            );
            r.assert_does_not_echo(token);
            r.assert_does_not_echo(signature);
        }
    }
}

/// Two `Authorization` headers on a check: which one counts is never guessed.
#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let h = Harness::new(Opts::default()).await;
    let good = bearer(&h.token(json!({})));
    let revoked_jti = "two-headers";
    let revoked = bearer(&h.token(json!({"jti": revoked_jti})));
    h.revoke_jti(revoked_jti);
    for pair in [[&good, &revoked], [&revoked, &good], [&good, &good]] {
        let headers = [
            ("authorization", pair[0].as_str()),
            ("authorization", pair[1].as_str()),
        ];
        let r = h
            .request(Method::POST, "/v1/check", &headers, Body::empty())
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "/v1/check");
        assert_eq!(r.json()["error"], json!("invalid_request"));
        let r = h
            .request(Method::GET, "/v1/authz", &headers, Body::empty())
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "/v1/authz");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|c| c.contains("invalid_request")),
            "{:?}",
            r.header("www-authenticate")
        );
    }
    // One header is answered as always.
    h.assert_active(&h.token(json!({}))).await;
    let r = h.check_header(&good).await;
    assert_eq!(r.json()["active"], json!(true));
}
