//! `schemas/openapi.json` tells the truth about the HTTP API: the real router (the harness
//! of tests/common/router.rs, as in tests/api.rs: driven with `oneshot`, real JWKS server,
//! real sled denylist) is sent a representative set of requests, and every answer is
//! checked against the spec: its status is declared for that path and method, its JSON
//! body validates against the declared schema, its headers are declared (and the required
//! ones present). Every route of the router is in the spec and every path and method of
//! the spec is routed; every declared status and every reason word is produced by some
//! request.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::jwt::{claims_with, hs256_token, now, TestKey};
use common::router::{Harness, Opts, Resp, AUD, MAX_BODY};
use revsync::config::OnStale;
use serde_json::{json, Value};

const SPEC: &str = include_str!("../schemas/openapi.json");
/// `http.credential` of the harness that has one.
const CREDENTIAL: &str = "openapi-test-credential";
const API_SOURCE: &str = include_str!("../src/api.rs");
/// Methods an OpenAPI path item can describe.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
/// Response headers of revsync's own; any of them in an answer must be declared.
const OWN_HEADERS: [&str; 7] = [
    "x-auth-subject",
    "x-auth-client-id",
    "x-auth-scope",
    "x-auth-issuer",
    "x-revsync-stale",
    "x-revsync-reason",
    "www-authenticate",
];

// ---------------------------------------------------------------------------------------
// The spec

struct Spec {
    doc: Value,
    /// (spec path, method, status) seen so far.
    seen: BTreeSet<(String, String, String)>,
    /// Reason words seen in `/v1/check` answers.
    reasons: BTreeSet<String>,
}

impl Spec {
    fn load() -> Self {
        let doc: Value = serde_json::from_str(SPEC).expect("schemas/openapi.json is JSON");
        Spec {
            doc,
            seen: BTreeSet::new(),
            reasons: BTreeSet::new(),
        }
    }

    /// Follows local `$ref`s (`#/a/b`) until a non-reference is reached.
    fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(r) = v.get("$ref").and_then(Value::as_str) else {
                return v;
            };
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local refs: {r}"));
            v = self
                .doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {r}"));
        }
        panic!("$ref loop")
    }

    fn paths(&self) -> Vec<String> {
        self.doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    fn path_item(&self, path: &str) -> &Value {
        let item = self.doc["paths"]
            .get(path)
            .unwrap_or_else(|| panic!("path {path} is not in the spec"));
        self.resolve(item)
    }

    fn operation(&self, path: &str, method: &str) -> Option<&Value> {
        self.path_item(path).get(method)
    }

    /// A validator for `schema`, an inline schema or a `$ref` into `components`: the
    /// spec's `components` ride along so every `$ref` resolves.
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let mut doc = schema.clone();
        doc.as_object_mut()
            .expect("schema is an object")
            .insert("components".into(), self.doc["components"].clone());
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&doc)
            .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
    }

    fn validate_value(&self, schema: &Value, value: &Value, what: &str) {
        let validator = self.validator(schema);
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what}: {value} does not validate against {schema}:\n{}",
            errors.join("\n")
        );
    }

    /// Checks one exchange against the spec (see the module doc) and records it.
    fn check(&mut self, path: &str, method: &Method, request_body: Option<&Value>, r: &Resp) {
        let m = method.as_str().to_ascii_lowercase();
        let what = format!("{} {path} -> {}", method, r.status.as_u16());
        let op = self
            .operation(path, &m)
            .unwrap_or_else(|| panic!("{what}: no operation in the spec"));
        if let Some(body) = request_body {
            let content = &self.resolve(&op["requestBody"])["content"];
            let (_, media) = content
                .as_object()
                .and_then(|c| c.iter().next())
                .unwrap_or_else(|| panic!("{what}: no request body declared"));
            self.validate_value(&media["schema"], body, &format!("{what}: request"));
        }
        let status = r.status.as_u16().to_string();
        let declared = op["responses"]
            .get(&status)
            .unwrap_or_else(|| panic!("{what}: status {status} is not declared"));
        let declared = self.resolve(declared);

        // Body: the declared media type, and its schema.
        let mut reason = None;
        // `x-body-optional`: the declared body is one of two answers under this status,
        // the other being empty (`/v1/authz` 401: a denied token, or no credential).
        let content = declared
            .get("content")
            .and_then(Value::as_object)
            .filter(|_| {
                !(declared["x-body-optional"] == json!(true)
                    && r.body.is_empty()
                    && r.header("content-type").is_none())
            });
        match content {
            None => assert!(
                r.body.is_empty(),
                "{what}: the spec declares no body, got {:?}",
                r.text()
            ),
            Some(content) => {
                let ct = r
                    .header("content-type")
                    .unwrap_or_else(|| panic!("{what}: no content-type"));
                let essence = ct.split(';').next().unwrap().trim();
                let media = content.get(essence).unwrap_or_else(|| {
                    panic!("{what}: content-type {ct} is not declared ({content:?})")
                });
                let instance = if essence == "application/json" {
                    r.json()
                } else {
                    Value::String(r.text())
                };
                self.validate_value(&media["schema"], &instance, &what);
                if path == "/v1/check" {
                    reason = instance["reason"].as_str().map(str::to_string);
                }
            }
        }

        // Headers: required ones present, present ones declared and valid.
        let declared_headers: BTreeMap<String, &Value> = declared
            .get("headers")
            .and_then(Value::as_object)
            .map(|h| {
                h.iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), self.resolve(v)))
                    .collect()
            })
            .unwrap_or_default();
        for (name, h) in &declared_headers {
            let value = r.header(name);
            if h["required"] == json!(true) {
                assert!(value.is_some(), "{what}: required header {name} is missing");
            }
            if let Some(value) = value {
                self.validate_value(
                    &h["schema"],
                    &Value::String(value.to_string()),
                    &format!("{what}: header {name}"),
                );
            }
        }
        for name in OWN_HEADERS {
            if r.headers.contains_key(name) {
                assert!(
                    declared_headers.contains_key(name),
                    "{what}: header {name} is sent but not declared"
                );
            }
        }
        self.reasons.extend(reason);
        self.seen.insert((path.to_string(), m, status));
    }
}

/// `(path, methods)` of every `.route(…)` in src/api.rs, with axum's `{*rest}` written
/// as OpenAPI's `{rest}`.
fn router_routes() -> BTreeMap<String, BTreeSet<String>> {
    let mut routes = BTreeMap::new();
    let mut rest = API_SOURCE;
    while let Some(i) = rest.find(".route(\"") {
        rest = &rest[i + ".route(\"".len()..];
        let end = rest.find('"').unwrap();
        let path = rest[..end].replace("{*", "{");
        // The method router: up to the `)` closing `.route(`.
        let mut depth = 1;
        let mut close = 0;
        for (j, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call = &rest[end + 1..close];
        let mut methods = BTreeSet::new();
        for m in METHODS.iter().chain(&["any"]) {
            let word = format!("{m}(");
            let found = call.match_indices(&word).any(|(k, _)| {
                k == 0 || !call[..k].ends_with(|c: char| c.is_alphanumeric() || c == '_')
            });
            if found && *m == "any" {
                methods.extend(METHODS.iter().map(|m| m.to_string()));
            } else if found {
                methods.insert(m.to_string());
                if *m == "get" {
                    // axum answers HEAD for every GET route.
                    methods.insert("head".to_string());
                }
            }
        }
        assert!(!methods.is_empty(), "no method router for {path}: {call}");
        routes.insert(path, methods);
        rest = &rest[close..];
    }
    routes
}

// ---------------------------------------------------------------------------------------
// The router (common::router, as in tests/api.rs): requests checked against the spec

impl Harness {
    /// `POST /v1/check` with a JSON body, checked against the spec.
    async fn check(&self, spec: &mut Spec, body: Value) -> Resp {
        let r = self
            .request(
                Method::POST,
                "/v1/check",
                &[("content-type", "application/json")],
                body.to_string(),
            )
            .await;
        spec.check("/v1/check", &Method::POST, Some(&body), &r);
        r
    }

    /// `POST /v1/check` with a raw body (not necessarily valid), checked against the spec.
    async fn check_raw(&self, spec: &mut Spec, headers: &[(&str, &str)], body: String) -> Resp {
        let r = self.request(Method::POST, "/v1/check", headers, body).await;
        spec.check("/v1/check", &Method::POST, None, &r);
        r
    }

    async fn introspect(&self, spec: &mut Spec, form: &str) -> Resp {
        let r = self
            .request(
                Method::POST,
                "/introspect",
                &[("content-type", "application/x-www-form-urlencoded")],
                form.to_string(),
            )
            .await;
        let parsed: Vec<(String, String)> = serde_urlencoded::from_str(form).unwrap_or_default();
        let as_json = (r.status == StatusCode::OK)
            .then(|| Value::Object(parsed.into_iter().map(|(k, v)| (k, json!(v))).collect()));
        spec.check("/introspect", &Method::POST, as_json.as_ref(), &r);
        r
    }

    /// The authz route at each of its three paths, checked against the spec; returns the
    /// answer at `/v1/authz`.
    async fn authz(&self, spec: &mut Spec, method: Method, token: Option<&str>) -> Resp {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        self.authz_with(spec, method, &headers).await
    }

    /// `/v1/authz` (and its subpaths) with these headers.
    async fn authz_with(&self, spec: &mut Spec, method: Method, headers: &[(&str, &str)]) -> Resp {
        let mut first = None;
        for (uri, path) in [
            ("/v1/authz", "/v1/authz"),
            ("/v1/authz/", "/v1/authz/"),
            ("/v1/authz/some/deep/path?q=1", "/v1/authz/{rest}"),
        ] {
            let r = self
                .request(method.clone(), uri, headers, Body::empty())
                .await;
            spec.check(path, &method, None, &r);
            first.get_or_insert(r);
        }
        first.unwrap()
    }

    async fn get(&self, spec: &mut Spec, path: &str) -> Resp {
        let r = self.request(Method::GET, path, &[], Body::empty()).await;
        spec.check(path, &Method::GET, None, &r);
        r
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn the_spec_is_openapi_3_1_with_sound_schemas_and_refs() {
    let spec = Spec::load();
    assert!(spec.doc["openapi"].as_str().unwrap().starts_with("3.1."));
    assert_eq!(
        spec.doc["info"]["version"],
        json!(env!("CARGO_PKG_VERSION"))
    );
    // Every component schema is a valid JSON Schema 2020-12 and compiles with its refs.
    let schemas = spec.doc["components"]["schemas"].as_object().unwrap();
    for (name, schema) in schemas {
        jsonschema::meta::validate(schema)
            .unwrap_or_else(|e| panic!("components.schemas.{name} is not a JSON Schema: {e}"));
        spec.validator(&json!({ "$ref": format!("#/components/schemas/{name}") }));
    }
    for name in [
        "CheckActive",
        "CheckInactive",
        "IntrospectActive",
        "IntrospectInactive",
        "Readiness",
        "Status",
        "OAuthError",
    ] {
        assert!(schemas.contains_key(name), "components.schemas.{name}");
    }
    // Every $ref anywhere resolves.
    fn walk(spec: &Spec, v: &Value, at: &str) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    let p = r.strip_prefix('#').expect("local ref");
                    assert!(spec.doc.pointer(p).is_some(), "dangling {r} at {at}");
                }
                for (k, v) in m {
                    walk(spec, v, &format!("{at}/{k}"));
                }
            }
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(spec, v, &format!("{at}/{i}"));
                }
            }
            _ => {}
        }
    }
    walk(&spec, &spec.doc, "#");
    // The reason words are the stable ones of DESIGN.md / README.md.
    assert_eq!(
        schemas["ReasonWord"]["enum"],
        json!([
            "revoked",
            "expired",
            "not_yet_valid",
            "bad_signature",
            "unknown_key",
            "wrong_issuer",
            "wrong_audience",
            "wrong_type",
            "malformed",
            "lifetime_exceeded",
            "stale"
        ])
    );
    // The inactive introspection answer is exactly {"active": false}.
    let v = spec.validator(&json!({"$ref": "#/components/schemas/IntrospectInactive"}));
    assert!(v.is_valid(&json!({"active": false})));
    assert!(!v.is_valid(&json!({"active": false, "reason": "revoked"})));
    assert!(!v.is_valid(&json!({"active": true})));
    assert!(!v.is_valid(&json!({})));
    // Templated path parameters are declared.
    for path in spec.paths() {
        if let Some(start) = path.find('{') {
            let name = &path[start + 1..path.find('}').unwrap()];
            let params = spec.doc["paths"][&path]["parameters"]
                .as_array()
                .unwrap_or_else(|| panic!("{path}: parameters"));
            assert!(
                params
                    .iter()
                    .any(|p| p["name"] == json!(name) && p["in"] == json!("path")),
                "{path}: path parameter {name} is not declared"
            );
        }
    }
}

#[test]
fn every_route_of_the_router_is_in_the_spec_and_vice_versa() {
    let spec = Spec::load();
    let routes = router_routes();
    assert!(
        routes.len() >= 9,
        "parsed the routes of src/api.rs: {routes:?}"
    );
    let in_spec: BTreeMap<String, BTreeSet<String>> = spec
        .paths()
        .into_iter()
        .map(|p| {
            let item = spec.path_item(&p);
            let methods = METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(|m| m.to_string())
                .collect();
            (p, methods)
        })
        .collect();
    for (path, methods) in &routes {
        let declared = in_spec
            .get(path)
            .unwrap_or_else(|| panic!("route {path} is not in the spec"));
        // A GET route also answers HEAD; the spec need not say so.
        let mut expected = methods.clone();
        if methods.contains("get") && !declared.contains("head") {
            expected.remove("head");
        }
        assert_eq!(declared, &expected, "methods of {path}");
    }
    for path in in_spec.keys() {
        assert!(
            routes.contains_key(path),
            "{path} is in the spec, not routed"
        );
    }
}

#[tokio::test]
async fn routed_methods_match_the_spec() {
    let spec = Spec::load();
    let h = Harness::new(Opts::default()).await;
    for path in spec.paths() {
        let uri = path.replace("{rest}", "a/b");
        let item = spec.path_item(&path);
        for m in ["get", "post", "put", "delete", "patch"] {
            let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes()).unwrap();
            let r = h.request(method, &uri, &[], Body::empty()).await;
            if item.get(m).is_some() {
                assert!(
                    r.status != StatusCode::NOT_FOUND && r.status != StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {uri}: declared, but {}",
                    r.status
                );
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {uri}: not declared"
                );
            }
        }
    }
    let r = h.request(Method::GET, "/v1/nope", &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_answer_matches_the_spec() {
    let mut spec = Spec::load();
    let t = now();

    // --- a fresh, caught-up instance
    let h = Harness::new(Opts::default()).await;
    let active = h.token(json!({
        "sub": "alice", "client_id": "app-1", "scope": "read write", "jti": "jti-oa-1",
        "sid": "sid-1", "aud": [AUD, "other"], "custom": {"nested": [1, 2]},
    }));
    let r = h.check(&mut spec, json!({ "token": active })).await;
    assert_eq!(r.json()["active"], json!(true));
    let bare = h.token(json!({"sub": null, "jti": null}));
    assert_eq!(
        h.check(&mut spec, json!({ "token": bare })).await.json()["active"],
        json!(true)
    );
    let auth = format!("Bearer {active}");
    let r = h
        .check_raw(&mut spec, &[("authorization", &auth)], String::new())
        .await;
    assert_eq!(r.json()["active"], json!(true));
    let r = h.check(&mut spec, json!({"token": null, "extra": 1})).await;
    assert_eq!(r.json()["reason"], json!("malformed"));

    let stranger = TestKey::ec_p256("not-published");
    let impostor = TestKey::ec_p256("k1");
    let hs = hs256_token(
        b"secret",
        &json!({"kid": "k1", "typ": "JWT"}),
        &claims_with(&h.iss, AUD, json!({})),
    );
    h.revoke_jti("jti-oa-revoked");
    for (token, reason) in [
        (h.token(json!({"jti": "jti-oa-revoked"})), "revoked"),
        (h.token(json!({"exp": t - 120, "iat": t - 400})), "expired"),
        (h.token(json!({"nbf": t + 120})), "not_yet_valid"),
        (
            h.token(json!({"iat": t - 10, "exp": t + 2 * 86_400})),
            "lifetime_exceeded",
        ),
        (
            impostor.sign(&claims_with(&h.iss, AUD, json!({}))),
            "bad_signature",
        ),
        (hs, "bad_signature"),
        (
            stranger.sign(&claims_with(&h.iss, AUD, json!({}))),
            "unknown_key",
        ),
        (
            h.key
                .sign(&claims_with("https://other.example.com", AUD, json!({}))),
            "wrong_issuer",
        ),
        (
            h.token(json!({"aud": "https://elsewhere"})),
            "wrong_audience",
        ),
        ("garbage".to_string(), "malformed"),
        (String::new(), "malformed"),
    ] {
        let r = h.check(&mut spec, json!({ "token": token })).await;
        assert_eq!(r.json(), json!({"active": false, "reason": reason}));
        let form = serde_urlencoded::to_string([("token", &token)]).unwrap();
        let r = h.introspect(&mut spec, &form).await;
        assert_eq!(r.json(), json!({"active": false}));
        let r = h
            .authz(
                &mut spec,
                Method::GET,
                Some(token.as_str()).filter(|t| !t.is_empty()),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{reason}");
    }

    // 400 and 413
    for body in [
        "not json".to_string(),
        r#"{"token": 5}"#.into(),
        "[]".into(),
    ] {
        let r = h
            .check_raw(&mut spec, &[("content-type", "application/json")], body)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }
    let big = json!({ "token": "x".repeat(MAX_BODY + 1) }).to_string();
    let r = h.check_raw(&mut spec, &[], big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    for form in ["", "token=a&token=b", "token_type_hint=access_token"] {
        let r = h.introspect(&mut spec, form).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{form:?}");
    }
    let big = format!("token={}", "x".repeat(MAX_BODY + 1));
    assert_eq!(
        h.introspect(&mut spec, &big).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // introspect active, authz 200 for every method, 401 without credentials
    let form = serde_urlencoded::to_string([
        ("token", active.as_str()),
        ("token_type_hint", "access_token"),
    ])
    .unwrap();
    let r = h.introspect(&mut spec, &form).await;
    assert_eq!(r.json()["active"], json!(true));
    for m in METHODS {
        let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes()).unwrap();
        let r = h.authz(&mut spec, method.clone(), Some(&active)).await;
        assert_eq!(r.status, StatusCode::OK, "{m}");
        assert_eq!(r.header("x-auth-subject"), Some("alice"));
        let r = h.authz(&mut spec, method.clone(), None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{m}");
        let bearer = format!("Bearer {active}");
        let twice = [
            ("authorization", bearer.as_str()),
            ("authorization", bearer.as_str()),
        ];
        let r = h.authz_with(&mut spec, method, &twice).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{m}: two Authorization headers"
        );
    }
    // An active token with no sub/client_id/scope: those headers are present and empty
    // (a proxy copying them then always overwrites a client's own).
    let r = h.authz(&mut spec, Method::GET, Some(&bare)).await;
    assert_eq!(r.status, StatusCode::OK);
    for name in ["x-auth-subject", "x-auth-client-id", "x-auth-scope"] {
        assert_eq!(r.header(name), Some(""), "{name}");
    }

    // operations
    assert_eq!(h.get(&mut spec, "/healthz").await.status, StatusCode::OK);
    assert_eq!(h.get(&mut spec, "/readyz").await.status, StatusCode::OK);
    assert_eq!(h.get(&mut spec, "/metrics").await.status, StatusCode::OK);
    assert_eq!(h.get(&mut spec, "/v1/status").await.status, StatusCode::OK);

    // --- RFC 9068 typ required
    let typ = Harness::new(Opts {
        require_typ: true,
        ..Opts::default()
    })
    .await;
    let r = typ
        .check(&mut spec, json!({"token": typ.token(json!({}))}))
        .await;
    assert_eq!(r.json()["reason"], json!("wrong_type"));

    // --- never caught up, on_stale = deny: undecided
    let stale = Harness::new(Opts::never_caught_up(OnStale::Deny)).await;
    let token = stale.token(json!({}));
    let r = stale.check(&mut spec, json!({ "token": token })).await;
    assert_eq!(
        r.json(),
        json!({"active": false, "reason": "stale", "undecided": true})
    );
    let r = stale.authz(&mut spec, Method::GET, Some(&token)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let form = serde_urlencoded::to_string([("token", &token)]).unwrap();
    assert_eq!(
        stale.introspect(&mut spec, &form).await.json(),
        json!({"active": false})
    );
    let r = stale.get(&mut spec, "/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    stale.get(&mut spec, "/v1/status").await;

    // --- stale, on_stale = allow: active, marked stale
    let allow = Harness::new(Opts::never_caught_up(OnStale::Allow)).await;
    let token = allow.token(json!({"sub": "bob"}));
    let r = allow.check(&mut spec, json!({ "token": token })).await;
    assert_eq!(r.json()["stale"], json!(true));
    assert_eq!(r.header("x-revsync-stale"), Some("true"));
    let form = serde_urlencoded::to_string([("token", &token)]).unwrap();
    let r = allow.introspect(&mut spec, &form).await;
    assert_eq!(r.header("x-revsync-stale"), Some("true"));
    let r = allow.authz(&mut spec, Method::POST, Some(&token)).await;
    assert_eq!(r.header("x-revsync-stale"), Some("true"));

    // --- the store refuses writes: not live, not ready
    let failing = Harness::new(Opts::default()).await;
    failing.ingest.set_store_failing(true);
    assert_eq!(
        failing.get(&mut spec, "/healthz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        failing.get(&mut spec, "/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // --- keys never loaded: undecided unknown_key, not ready
    let down = Harness::new(Opts {
        jwks_down: true,
        ..Opts::default()
    })
    .await;
    let token = down.token(json!({}));
    let r = down.check(&mut spec, json!({ "token": token })).await;
    assert_eq!(
        r.json(),
        json!({"active": false, "reason": "unknown_key", "undecided": true})
    );
    let r = down.authz(&mut spec, Method::GET, Some(&token)).await;
    assert_eq!(r.header("x-revsync-reason"), Some("unknown_key"));
    assert_eq!(
        down.get(&mut spec, "/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    down.get(&mut spec, "/v1/status").await;

    // --- a credential configured (`http.credential`): 401 on every route but the probes
    let guarded = Harness::new(Opts::default())
        .await
        .with_credential(CREDENTIAL);
    let token = guarded.token(json!({"sub": "carol"}));
    for headers in [vec![], vec![("x-revsync-credential", "wrong")]] {
        let r = guarded
            .check_raw(&mut spec, &headers, json!({ "token": token }).to_string())
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = guarded
            .introspect(&mut spec, &format!("token={token}"))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.json()["error"], json!("invalid_client"));
        for m in [Method::GET, Method::POST] {
            let r = guarded.authz(&mut spec, m, Some(&token)).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            assert_eq!(r.json()["error"], json!("unauthorized"));
        }
        for path in ["/metrics", "/v1/status"] {
            let r = guarded.get(&mut spec, path).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        }
        assert_eq!(
            guarded.get(&mut spec, "/healthz").await.status,
            StatusCode::OK
        );
        assert_eq!(
            guarded.get(&mut spec, "/readyz").await.status,
            StatusCode::OK
        );
    }
    // With it, the normal answers.
    let cred = ("x-revsync-credential", CREDENTIAL);
    let r = guarded
        .check_raw(&mut spec, &[cred], json!({ "token": token }).to_string())
        .await;
    assert_eq!(r.json()["active"], json!(true));
    let bearer = format!("Bearer {CREDENTIAL}");
    for (path, auth) in [
        ("/metrics", ("authorization", bearer.as_str())),
        ("/metrics", cred),
        ("/v1/status", cred),
    ] {
        let r = guarded
            .request(Method::GET, path, &[auth], Body::empty())
            .await;
        spec.check(path, &Method::GET, None, &r);
        assert_eq!(r.status, StatusCode::OK, "{path}");
    }
    let form = serde_urlencoded::to_string([("token", token.as_str())]).unwrap();
    let r = guarded
        .request(
            Method::POST,
            "/introspect",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("authorization", &bearer),
            ],
            form.clone(),
        )
        .await;
    spec.check(
        "/introspect",
        &Method::POST,
        Some(&json!({ "token": token })),
        &r,
    );
    assert_eq!(r.json()["active"], json!(true));
    let auth = format!("Bearer {token}");
    let r = guarded
        .request(
            Method::GET,
            "/v1/authz",
            &[cred, ("authorization", &auth)],
            Body::empty(),
        )
        .await;
    spec.check("/v1/authz", &Method::GET, None, &r);
    assert_eq!(r.status, StatusCode::OK);

    // Every reason word of the spec was produced, and every declared status.
    let words: BTreeSet<String> = spec.doc["components"]["schemas"]["ReasonWord"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    assert_eq!(spec.reasons, words, "reason words produced");
    for path in spec.paths() {
        let item = spec.path_item(&path);
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            for status in op["responses"].as_object().unwrap().keys() {
                // HEAD, OPTIONS, TRACE … of /v1/authz are covered for 200 and 401
                // by the loop over methods; 503 is the same handler.
                if path.starts_with("/v1/authz") && m != "get" && status == "503" {
                    continue;
                }
                assert!(
                    spec.seen
                        .contains(&(path.clone(), m.to_string(), status.clone())),
                    "no request produced {status} for {m} {path}"
                );
            }
        }
    }
}

/// The spec declares the credential exactly where the router asks for it: every
/// operation but the probes' lists `credential` among its security alternatives (besides
/// `{}`: none configured) and a 401; and a router with a credential refuses exactly those
/// without it.
#[tokio::test]
async fn the_credential_is_declared_where_it_is_required() {
    let spec = Spec::load();
    let scheme = &spec.doc["components"]["securitySchemes"]["credential"];
    assert_eq!(scheme["type"], json!("apiKey"));
    assert_eq!(scheme["in"], json!("header"));
    assert_eq!(scheme["name"], json!("X-Revsync-Credential"));
    let h = Harness::new(Opts::default())
        .await
        .with_credential(CREDENTIAL);
    for path in spec.paths() {
        let item = spec.path_item(&path);
        let open = path == "/healthz" || path == "/readyz";
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let what = format!("{m} {path}");
            let security = op["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{what}: no security declared"));
            assert!(
                security.contains(&json!({})),
                "{what}: {{}} (no credential configured)"
            );
            let mentions = security.iter().any(|s| s.get("credential").is_some());
            assert_eq!(mentions, !open, "{what}: credential among {security:?}");
            assert_eq!(op["responses"].get("401").is_some(), !open, "{what}: 401");
            let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes()).unwrap();
            let uri = path.replace("{rest}", "a/b");
            let r = h.request(method, &uri, &[], Body::empty()).await;
            if open {
                assert_ne!(r.status, StatusCode::UNAUTHORIZED, "{what}");
            } else {
                assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
            }
        }
    }
}
