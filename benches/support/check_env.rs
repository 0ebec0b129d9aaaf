//! What benches/check.rs and benches/tradeoff.rs share to drive `POST /v1/check`: the
//! bench issuer (RSA-2048 and P-256 signing keys, its tokens, a JWKS server and its
//! `IssuerConfig`), the floor handler (an empty axum handler answering a static JSON body)
//! and how answers are judged.
//!
//! Tokens are signed with aws-lc-rs directly: jsonwebtoken re-parses an RSA private key on
//! every signature, which would make minting the first-seen pools far slower.
//!
//! Include with `#[path = "support/check_env.rs"] mod check_env;` beside
//! `#[path = "support/http_client.rs"] mod http_client;` (it uses `contains` from there).

#![allow(dead_code)]

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self as sig, EcdsaKeyPair, KeyPair as _, ParsedPublicKey};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use revsync::config::IssuerConfig;
use serde_json::json;

use crate::http_client::contains;

/// The audience of the bench issuer's tokens.
pub const AUD: &str = "bench-api";
/// What the floor handler answers.
pub const EMPTY_BODY: &str = r#"{"active":true}"#;
/// Thread names of the server's tokio runtime and of the load generator's clients.
pub const SERVER_THREADS: &str = "srv-worker";
pub const CLIENT_THREADS: &str = "bench-cli-";

// ---------------------------------------------------------------------------------------
// Keys and tokens

fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

enum SigningKey {
    Rsa(aws_lc_rs::rsa::KeyPair),
    Ec(EcdsaKeyPair),
}

/// A signing key with everything the benches need about its public half.
pub struct BenchKey {
    pub alg: Algorithm,
    pub name: &'static str,
    signing: SigningKey,
    /// base64url of `{"alg", "typ": "JWT", "kid"}`.
    header_b64: String,
    pub jwk: serde_json::Value,
    /// What revsync builds from the JWK (`token.rs`, `parse_jwk`).
    pub decoding: DecodingKey,
    /// The same public key parsed once by aws-lc-rs.
    pub parsed: ParsedPublicKey,
}

impl BenchKey {
    fn new(
        alg: Algorithm,
        name: &'static str,
        kid: &str,
        signing: SigningKey,
        jwk: serde_json::Value,
        decoding: DecodingKey,
        parsed: ParsedPublicKey,
    ) -> Self {
        let header = json!({"alg": name, "typ": "JWT", "kid": kid}).to_string();
        BenchKey {
            alg,
            name,
            signing,
            header_b64: b64url(header.as_bytes()),
            jwk,
            decoding,
            parsed,
        }
    }

    /// RSA-2048 for RS256.
    pub fn rsa(kid: &str) -> Self {
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let public = pair.public_key();
        let n = public.modulus().big_endian_without_leading_zero().to_vec();
        let e = public.exponent().big_endian_without_leading_zero().to_vec();
        let jwk = json!({
            "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": b64url(&n), "e": b64url(&e),
        });
        let parsed =
            ParsedPublicKey::new(&sig::RSA_PKCS1_2048_8192_SHA256, public.as_ref()).unwrap();
        let decoding = DecodingKey::from_rsa_raw_components(&n, &e);
        let signing = SigningKey::Rsa(pair);
        Self::new(
            Algorithm::RS256,
            "RS256",
            kid,
            signing,
            jwk,
            decoding,
            parsed,
        )
    }

    /// P-256 for ES256.
    pub fn p256(kid: &str) -> Self {
        let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new()).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let (x, y) = (b64url(&point[1..33]), b64url(&point[33..65]));
        let jwk = json!({
            "kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
            "x": x, "y": y,
        });
        let parsed = ParsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, &point).unwrap();
        let decoding = DecodingKey::from_ec_components(&x, &y).unwrap();
        let signing = SigningKey::Ec(pair);
        Self::new(
            Algorithm::ES256,
            "ES256",
            kid,
            signing,
            jwk,
            decoding,
            parsed,
        )
    }

    /// A compact JWS over `claims` (JSON text).
    pub fn sign(&self, claims: &str) -> String {
        let mut token = String::with_capacity(self.header_b64.len() + claims.len() * 4 / 3 + 400);
        token.push_str(&self.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims.as_bytes(), &mut token);
        let signature = match &self.signing {
            SigningKey::Rsa(pair) => {
                let mut s = vec![0; pair.public_modulus_len()];
                pair.sign(
                    &sig::RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    token.as_bytes(),
                    &mut s,
                )
                .unwrap();
                s
            }
            SigningKey::Ec(pair) => pair
                .sign(&SystemRandom::new(), token.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
        };
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
        token
    }
}

/// Access-token claims of a typical shape, issued now by `iss` for [`AUD`] and valid for
/// `lifetime_secs`.
pub fn claims(iss: &str, jti: &str, lifetime_secs: u64) -> String {
    let now = revsync::unix_now();
    format!(
        r#"{{"iss":"{iss}","aud":"{AUD}","sub":"alice","client_id":"bench-app","scope":"read write","jti":"{jti}","iat":{now},"exp":{}}}"#,
        now + lifetime_secs
    )
}

/// `n` unique tokens (jti `{prefix}-{i:09}`, [`claims`] valid for `lifetime_secs`), signed
/// on `cores` threads; with `scheme` `"Bearer "`, ready to send as `Authorization` values.
pub fn mint(
    key: &BenchKey,
    iss: &str,
    prefix: &str,
    n: usize,
    lifetime_secs: u64,
    cores: usize,
    scheme: &str,
) -> Vec<String> {
    let per = n.div_ceil(cores.max(1)).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| {
                let end = (start + per).min(n);
                s.spawn(move || {
                    (start..end)
                        .map(|i| {
                            let jti = format!("{prefix}-{i:09}");
                            scheme.to_string() + &key.sign(&claims(iss, &jti, lifetime_secs))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().expect("minting thread"))
            .collect()
    })
}

/// Serves the JWKS of `keys` at `GET /jwks` on a free loopback port (on the current tokio
/// runtime) and returns the config of an issuer named after that server (`http://addr`)
/// that accepts RS256 and ES256 tokens for [`AUD`].
pub async fn serve_jwks(keys: &[&BenchKey]) -> IssuerConfig {
    let jwks: &'static str = Box::leak(
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
            .to_string()
            .into_boxed_str(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let iss = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new().route(
        "/jwks",
        get(move || async move { ([(header::CONTENT_TYPE, "application/json")], jwks) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut issuer = IssuerConfig::new(iss.clone(), AUD);
    issuer.jwks_uri = Some(format!("{iss}/jwks"));
    issuer.algorithms = vec!["RS256".into(), "ES256".into()];
    issuer
}

// ---------------------------------------------------------------------------------------
// The floor and the answers

/// The floor: an empty handler answering [`EMPTY_BODY`] (mount it with `post(empty)`).
pub async fn empty() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], EMPTY_BODY)
}

/// The answer a request must get.
#[derive(Clone, Copy)]
pub enum Expect {
    /// The floor's static body.
    Empty,
    /// `POST /v1/check` of a valid token of subject `alice`.
    Active,
    /// `POST /v1/check` of a revoked token.
    Revoked,
}

/// Whether (`status`, `body`) is the answer `expect` asks for; if not, a description.
pub fn judge(expect: Expect, status: u16, body: &[u8]) -> Result<(), String> {
    let ok = status == 200
        && match expect {
            Expect::Empty => body == EMPTY_BODY.as_bytes(),
            Expect::Active => {
                contains(body, br#""active":true"#) && contains(body, br#""sub":"alice""#)
            }
            Expect::Revoked => {
                contains(body, br#""active":false"#) && contains(body, br#""reason":"revoked""#)
            }
        };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "status {status}, body {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    }
}
