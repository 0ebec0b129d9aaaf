//! JWT test helpers shared by the integration tests: signing keys generated at run time
//! with aws-lc-rs (RSA 2048, EC P-256/P-384, Ed25519) with their public JWKs, token
//! signing, raw builders for attack tokens, and a real HTTP server (axum on 127.0.0.1:0)
//! serving an OpenID discovery document and a JWKS that tests can rotate, take down and
//! count requests to.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_FIXED_SIGNING,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey};
use revsync::config::IssuerConfig;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------
// Encoding

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const B64STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if pad {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// base64url without padding (JOSE).
pub fn b64url(bytes: &[u8]) -> String {
    b64(bytes, B64URL, false)
}

/// Standard base64 with padding (PEM).
pub fn b64std(bytes: &[u8]) -> String {
    b64(bytes, B64STD, true)
}

/// Current unix time in seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Reads one DER TLV: (tag, content, rest).
fn der_tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let (len, header) = if input[1] & 0x80 == 0 {
        (input[1] as usize, 2)
    } else {
        let n = (input[1] & 0x7f) as usize;
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    (tag, &input[header..header + len], &input[header + len..])
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (jsonwebtoken wants PKCS#1).
fn pkcs8_to_pkcs1(pkcs8: &[u8]) -> Vec<u8> {
    let (_, info, _) = der_tlv(pkcs8);
    let (_, _version, rest) = der_tlv(info);
    let (_, _algorithm, rest) = der_tlv(rest);
    let (tag, key, _) = der_tlv(rest);
    assert_eq!(tag, 0x04, "privateKey OCTET STRING");
    key.to_vec()
}

/// (n, e) of a PKCS#1 `RSAPublicKey`, without leading zero bytes.
fn rsa_public_components(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (_, seq, _) = der_tlv(der);
    let (_, n, rest) = der_tlv(seq);
    let (_, e, _) = der_tlv(rest);
    let strip = |b: &[u8]| b[b.iter().position(|x| *x != 0).unwrap_or(b.len())..].to_vec();
    (strip(n), strip(e))
}

// ---------------------------------------------------------------------------------------
// Keys

/// A signing key of a test issuer, with its public JWK.
pub struct TestKey {
    /// The algorithm this key signs with (also the JWK's `alg`).
    pub alg: Algorithm,
    pub kid: String,
    pub encoding: EncodingKey,
    /// Public JWK with `kid`, `use: sig` and `alg`.
    pub jwk: Value,
    /// Public key as X.509 `SubjectPublicKeyInfo` DER.
    pub public_der: Vec<u8>,
}

impl TestKey {
    /// A fresh key for `alg` (RS*/PS*: RSA 2048; ES256; ES384; EdDSA: Ed25519).
    pub fn generate(kid: &str, alg: Algorithm) -> Self {
        match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Self::rsa(kid, alg),
            Algorithm::ES256 => Self::ec_p256(kid),
            Algorithm::ES384 => Self::ec_p384(kid),
            Algorithm::EdDSA => Self::ed25519(kid),
            other => panic!("no test key for {other:?}"),
        }
    }

    /// RSA 2048 for an RS*/PS* algorithm.
    pub fn rsa(kid: &str, alg: Algorithm) -> Self {
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
        let encoding = EncodingKey::from_rsa_der(&pkcs8_to_pkcs1(pkcs8.as_ref()));
        let public = pair.public_key();
        let (n, e) = rsa_public_components(public.as_ref());
        let public_der = public.as_der().unwrap().as_ref().to_vec();
        let jwk = json!({
            "kty": "RSA", "kid": kid, "use": "sig", "alg": alg_name(alg),
            "n": b64url(&n), "e": b64url(&e),
        });
        TestKey {
            alg,
            kid: kid.to_string(),
            encoding,
            jwk,
            public_der,
        }
    }

    pub fn ec_p256(kid: &str) -> Self {
        Self::ec(kid, Algorithm::ES256)
    }

    pub fn ec_p384(kid: &str) -> Self {
        Self::ec(kid, Algorithm::ES384)
    }

    fn ec(kid: &str, alg: Algorithm) -> Self {
        let (signing, crv) = match alg {
            Algorithm::ES256 => (&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256"),
            _ => (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384"),
        };
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &SystemRandom::new()).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let half = (point.len() - 1) / 2;
        let public_der = pair.public_key().as_der().unwrap().as_ref().to_vec();
        let jwk = json!({
            "kty": "EC", "kid": kid, "use": "sig", "alg": alg_name(alg), "crv": crv,
            "x": b64url(&point[1..1 + half]), "y": b64url(&point[1 + half..]),
        });
        TestKey {
            alg,
            kid: kid.to_string(),
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk,
            public_der,
        }
    }

    pub fn ed25519(kid: &str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public_der = pair.public_key().as_der().unwrap().as_ref().to_vec();
        let jwk = json!({
            "kty": "OKP", "kid": kid, "use": "sig", "alg": "EdDSA", "crv": "Ed25519",
            "x": b64url(pair.public_key().as_ref()),
        });
        TestKey {
            alg: Algorithm::EdDSA,
            kid: kid.to_string(),
            encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk,
            public_der,
        }
    }

    /// The public key in PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_pem(&self) -> String {
        let body = b64std(&self.public_der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    /// The JWK with `changes` merged in; a `null` in `changes` removes that member.
    pub fn jwk_with(&self, changes: Value) -> Value {
        let mut jwk = self.jwk.clone();
        merge(&mut jwk, &changes);
        jwk
    }

    /// A token with header `{"alg", "typ": "JWT", "kid"}`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(&json!({}), claims)
    }

    /// A token whose header is the default one with `header` merged in (`null` removes).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        sign(self.alg, &self.encoding, Some(&self.kid), claims, header)
    }

    /// A correctly signed token from header and payload taken verbatim (any text, e.g.
    /// JSON with duplicate members, which `Value` cannot hold).
    pub fn sign_text(&self, header: &str, payload: &str) -> String {
        let message = format!(
            "{}.{}",
            b64url(header.as_bytes()),
            b64url(payload.as_bytes())
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &self.encoding, self.alg).unwrap();
        format!("{message}.{signature}")
    }
}

pub fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        other => panic!("unnamed algorithm {other:?}"),
    }
}

fn merge(target: &mut Value, changes: &Value) {
    if let (Some(t), Some(c)) = (target.as_object_mut(), changes.as_object()) {
        for (k, v) in c {
            if v.is_null() {
                t.remove(k);
            } else {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tokens

/// Signs `claims` with `key` under `alg`. The header is `{"alg", "typ": "JWT", "kid"}`
/// with `extra_header` merged in (a `null` member removes that field).
pub fn sign(
    alg: Algorithm,
    key: &EncodingKey,
    kid: Option<&str>,
    claims: &Value,
    extra_header: &Value,
) -> String {
    let mut header = json!({"alg": alg_name(alg), "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    merge(&mut header, extra_header);
    let message = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{signature}")
}

/// A token from arbitrary header and payload JSON and arbitrary signature bytes.
pub fn raw_token(header: &Value, payload: &Value, signature: &[u8]) -> String {
    raw_token_text(&header.to_string(), &payload.to_string(), signature)
}

/// A token from arbitrary header and payload text (need not be JSON).
pub fn raw_token_text(header: &str, payload: &str, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64url(header.as_bytes()),
        b64url(payload.as_bytes()),
        b64url(signature)
    )
}

/// An HS256 token with `secret` as HMAC key (for algorithm-confusion attacks).
pub fn hs256_token(secret: &[u8], header: &Value, payload: &Value) -> String {
    let mut header = header.clone();
    header["alg"] = json!("HS256");
    let message = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(payload.to_string().as_bytes())
    );
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{message}.{signature}")
}

/// Typical access-token claims: `iss`, `aud`, `sub`, `jti`, `iat`, and `exp` in
/// `lifetime` seconds.
pub fn claims(iss: &str, aud: &str, lifetime: u64) -> Value {
    let now = now();
    json!({
        "iss": iss, "aud": aud, "sub": "alice", "jti": format!("jti-{now}-{}", next_id()),
        "iat": now, "exp": now + lifetime,
    })
}

/// `claims(…)` with `changes` merged in (`null` removes a claim).
pub fn claims_with(iss: &str, aud: &str, changes: Value) -> Value {
    let mut c = claims(iss, aud, 300);
    merge(&mut c, &changes);
    c
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------
// JWKS server

struct ServerState {
    base_url: String,
    keys: Mutex<Vec<Value>>,
    /// `issuer` named in the discovery document (default: the base URL).
    discovery_issuer: Mutex<Option<String>>,
    down: AtomicBool,
    delay_ms: AtomicU64,
    /// When set, `/jwks` answers 200 with this body (content type JSON) instead of the keys.
    raw_jwks: Mutex<Option<Vec<u8>>>,
    jwks_requests: AtomicUsize,
    discovery_requests: AtomicUsize,
}

/// A real HTTP server on 127.0.0.1 serving `/.well-known/openid-configuration` and
/// `/jwks` from a mutable key list. Its issuer identifier is its base URL. Stops on drop.
pub struct JwksServer {
    pub addr: SocketAddr,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    /// Starts a server with an empty key list.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState {
            base_url: format!("http://{addr}"),
            keys: Mutex::new(Vec::new()),
            discovery_issuer: Mutex::new(None),
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            raw_jwks: Mutex::new(None),
            jwks_requests: AtomicUsize::new(0),
            discovery_requests: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        JwksServer { addr, state, task }
    }

    /// Starts a server publishing the JWKs of `keys`.
    pub async fn with_keys(keys: &[&TestKey]) -> Self {
        let server = Self::start().await;
        server.set_keys(keys.iter().map(|k| k.jwk.clone()).collect());
        server
    }

    pub fn url(&self) -> String {
        self.state.base_url.clone()
    }

    /// The issuer identifier (the base URL, so discovery works).
    pub fn issuer(&self) -> String {
        self.url()
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.url())
    }

    /// Replaces the published JWKs.
    pub fn set_keys(&self, jwks: Vec<Value>) {
        *self.state.keys.lock().unwrap() = jwks;
    }

    /// Publishes one more key.
    pub fn publish(&self, key: &TestKey) {
        self.add_jwk(key.jwk.clone());
    }

    pub fn add_jwk(&self, jwk: Value) {
        self.state.keys.lock().unwrap().push(jwk);
    }

    /// Removes the keys with this kid.
    pub fn retract(&self, kid: &str) {
        self.state
            .keys
            .lock()
            .unwrap()
            .retain(|k| k.get("kid").and_then(Value::as_str) != Some(kid));
    }

    /// `true`: every request gets 503.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Delays every answer (to hold a fetch open).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// `Some(body)`: `/jwks` answers 200 `application/json` with exactly `body` (garbage
    /// of any kind); `None`: back to the key list.
    pub fn set_raw_jwks(&self, body: Option<Vec<u8>>) {
        *self.state.raw_jwks.lock().unwrap() = body;
    }

    /// Makes the discovery document name another issuer.
    pub fn set_discovery_issuer(&self, issuer: Option<String>) {
        *self.state.discovery_issuer.lock().unwrap() = issuer;
    }

    /// Requests to `/jwks` so far (including refused ones).
    pub fn jwks_requests(&self) -> usize {
        self.state.jwks_requests.load(Ordering::SeqCst)
    }

    /// Requests to the discovery document so far (including refused ones).
    pub fn discovery_requests(&self) -> usize {
        self.state.discovery_requests.load(Ordering::SeqCst)
    }

    /// An issuer config for this server: `jwks_uri` set, every asymmetric algorithm
    /// allowed, `audience` accepted, other keys at their defaults.
    pub fn issuer_config(&self, audience: &str) -> IssuerConfig {
        let mut config = IssuerConfig::new(self.issuer(), audience);
        config.jwks_uri = Some(self.jwks_uri());
        config.algorithms = [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        config
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pause_or_refuse(state: &ServerState) -> Option<Response> {
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if state.down.load(Ordering::SeqCst) {
        return Some((StatusCode::SERVICE_UNAVAILABLE, "down").into_response());
    }
    None
}

async fn discovery(State(state): State<Arc<ServerState>>) -> Response {
    state.discovery_requests.fetch_add(1, Ordering::SeqCst);
    if let Some(refused) = pause_or_refuse(&state).await {
        return refused;
    }
    let issuer = state
        .discovery_issuer
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| state.base_url.clone());
    Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{}/jwks", state.base_url),
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
    .into_response()
}

async fn jwks(State(state): State<Arc<ServerState>>) -> Response {
    state.jwks_requests.fetch_add(1, Ordering::SeqCst);
    if let Some(refused) = pause_or_refuse(&state).await {
        return refused;
    }
    if let Some(body) = state.raw_jwks.lock().unwrap().clone() {
        return (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
    }
    let keys = state.keys.lock().unwrap().clone();
    let mut doc = Map::new();
    doc.insert("keys".into(), Value::Array(keys));
    Json(Value::Object(doc)).into_response()
}
