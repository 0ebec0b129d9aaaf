//! Token validation: the JWKS of each configured issuer (fetched with reqwest, refreshed
//! periodically and on unknown `kid`s), JWT signature and claim checks, and the
//! verified-token cache.
//!
//! Order of a check (nothing from the token is trusted before its signature is verified):
//! 1. size and shape: three base64url parts, JSON objects, claim types → `Malformed`;
//! 2. `alg` must be one of the asymmetric algorithms (never `none`, never HS*) and in
//!    the issuer's allowlist → `BadSignature` (before any key lookup);
//! 3. the unverified `iss` picks the issuer config; unknown → `WrongIssuer` (no fetch);
//! 4. the key comes only from the issuer's JWKS, by `kid` (header `jku`, `x5u`, `jwk`,
//!    `x5c` are never read); an unknown `kid` triggers one rate-limited, single-flight
//!    refetch;
//! 5. signature, then `typ`, `aud`, the issuer's `max_token_lifetime` (`exp - iat`),
//!    `exp`, `nbf` and `iat` (with leeway, at the caller's `now`) and the issuer's required
//!    claims.
//!
//! The lifetime and `iat` rules are what lets the denylist forget: a `not_before` entry is
//! dropped a lifetime (and two leeways) after its `not_before`, which is safe only if no
//! token issued by then can still be accepted. So a token living longer than its issuer's
//! `max_token_lifetime` is refused (`lifetime_exceeded`), and so is one claiming an `iat`
//! in the future (`not_yet_valid`): it would escape every `not_before` revocation until
//! then. A token without `iat` cannot show its lifetime; it is refused while its `exp` is
//! further ahead than the lifetime allows, and otherwise the issuer's own limit is trusted.
//!
//! Tokens are secrets (invariant 6): nothing here logs a token, a header or a signature;
//! `iss` and a truncated `kid` may be logged.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{self as sig, ParsedPublicKey, RsaPublicKeyComponents};
use jsonwebtoken::Algorithm;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::config::IssuerConfig;
use crate::metrics::{IssuerLabels, Metrics};

/// Longest token accepted, in bytes; longer ones are `Malformed` without any work.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest header `kid` accepted, in bytes; longer ones are `Malformed` without a fetch.
pub const MAX_KID_BYTES: usize = 256;
/// Largest discovery document or JWKS accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Most keys kept from one JWKS.
const MAX_KEYS: usize = 256;
/// `kid`s are truncated to this many characters in logs.
const LOG_KID_CHARS: usize = 64;
/// Longest time an entry stays in the verified-token cache, whatever its `exp`.
const MAX_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shortest wait between periodic fetches.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Why a token is not accepted. [`Rejection::reason`] gives the stable word of the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("bad signature or algorithm")]
    BadSignature,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("issuer not accepted")]
    WrongIssuer,
    #[error("audience not accepted")]
    WrongAudience,
    #[error("wrong token type")]
    WrongType,
    #[error("malformed token")]
    Malformed,
    /// `exp - iat` is longer than the issuer's `max_token_lifetime` (plus leeway), or,
    /// without `iat`, `exp` is further ahead than that.
    #[error("token lives longer than its issuer allows")]
    LifetimeExceeded,
    /// The issuer's keys could not be loaded (never fetched successfully): no decision.
    #[error("signing keys unavailable")]
    KeysUnavailable,
}

impl Rejection {
    /// The stable `reason` word of the HTTP API.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::BadSignature => "bad_signature",
            Rejection::UnknownKey | Rejection::KeysUnavailable => "unknown_key",
            Rejection::WrongIssuer => "wrong_issuer",
            Rejection::WrongAudience => "wrong_audience",
            Rejection::WrongType => "wrong_type",
            Rejection::Malformed => "malformed",
            Rejection::LifetimeExceeded => "lifetime_exceeded",
        }
    }

    /// `true` when no decision could be made (the caller answers 503, not 401).
    pub fn undecidable(&self) -> bool {
        matches!(self, Rejection::KeysUnavailable)
    }
}

/// A token whose signature and claims were checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifiedToken {
    pub iss: String,
    pub sub: Option<String>,
    pub jti: Option<String>,
    pub sid: Option<String>,
    /// `client_id`, else `azp`.
    pub client_id: Option<String>,
    pub iat: Option<u64>,
    pub exp: u64,
    pub nbf: Option<u64>,
    /// `scope` string, else `scp` (array joined by spaces, or a string).
    pub scope: Option<String>,
    /// Every claim, for echoing in RFC 7662 answers.
    pub claims: Map<String, Value>,
    /// The HTTP API's answers about this token, serialized on first use and kept with it
    /// in the verified-token cache.
    #[serde(skip)]
    pub answers: AnswerCache,
}

/// Serialized answer bodies about one [`VerifiedToken`], each computed at most once (the
/// HTTP API decides what they hold). A clone starts empty, so a token copied and then
/// changed never serves the original's answers; it takes no part in comparisons.
#[derive(Default)]
pub struct AnswerCache {
    slots: [std::sync::OnceLock<axum::body::Bytes>; AnswerCache::SLOTS],
}

impl AnswerCache {
    /// How many distinct answers can be kept.
    pub const SLOTS: usize = 3;

    /// The answer in `slot` (below [`Self::SLOTS`]), made by `make` the first time.
    pub fn get_or_init(
        &self,
        slot: usize,
        make: impl FnOnce() -> axum::body::Bytes,
    ) -> axum::body::Bytes {
        self.slots[slot].get_or_init(make).clone()
    }
}

impl Clone for AnswerCache {
    fn clone(&self) -> Self {
        AnswerCache::default()
    }
}

impl PartialEq for AnswerCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnswerCache")
    }
}

/// A JWS that is not an access token (a Security Event Token, a logout token) whose
/// signature was verified with its issuer's JWKS by [`TokenValidator::verify_jws`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedJws {
    /// The `iss` claim: a configured issuer.
    pub iss: String,
    /// The JOSE header (`alg`, `kid`, `typ` …).
    pub header: Map<String, Value>,
    /// Every claim.
    pub claims: Map<String, Value>,
}

/// Key status of one issuer, for readiness and operators. Carries no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IssuerKeyStatus {
    pub issuer: String,
    /// The configured or discovered JWKS location, once known.
    pub jwks_uri: Option<String>,
    /// Usable signing keys currently loaded.
    pub keys: usize,
    /// `true` once a JWKS was loaded at least once.
    pub loaded: bool,
    /// Unix time of the last successful fetch.
    pub last_success: Option<u64>,
    /// Unix time of the last fetch attempt.
    pub last_attempt: Option<u64>,
    /// Error of the last fetch when it failed; `None` when it succeeded.
    pub last_error: Option<String>,
}

/// SHA-256 of the token: the key of the verified-token cache.
pub fn token_hash(token: &str) -> [u8; 32] {
    sha256(token.as_bytes())
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Algorithms and keys

/// The algorithms revsync can verify; `none` and HS* are not among them.
fn parse_alg(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The key type (and curve) of a JWK, as far as revsync supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this type can verify `alg` (`kty`, and `crv` for EC/OKP).
    fn fits(self, alg: Algorithm) -> bool {
        match self {
            KeyKind::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            KeyKind::EcP256 => alg == Algorithm::ES256,
            KeyKind::EcP384 => alg == Algorithm::ES384,
            KeyKind::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

/// Every algorithm revsync verifies, in the order of [`VerifyKey::parsed`].
const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The aws-lc-rs verification algorithm of a JWS `alg` (the ones jsonwebtoken uses).
fn rsa_params(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

/// The public key material of a JWK, as decoded from it.
enum KeyMaterial<'a> {
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa { n: &'a [u8], e: &'a [u8] },
    /// The uncompressed point `0x04 || x || y`.
    Ec(Vec<u8>),
    /// The 32-byte public key.
    Ed25519(&'a [u8]),
}

impl KeyMaterial<'_> {
    /// The key parsed for `alg`; `None` when aws-lc-rs rejects the material (a key that
    /// cannot verify anything, e.g. an EC point not on its curve).
    fn parse(&self, alg: Algorithm) -> Option<ParsedPublicKey> {
        match self {
            KeyMaterial::Rsa { n, e } => RsaPublicKeyComponents { n: *n, e: *e }
                .to_parsed_public_key(rsa_params(alg)?)
                .ok(),
            KeyMaterial::Ec(point) => {
                let algorithm = match alg {
                    Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
                    Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
                    _ => return None,
                };
                ParsedPublicKey::new(algorithm, point).ok()
            }
            KeyMaterial::Ed25519(x) => match alg {
                Algorithm::EdDSA => ParsedPublicKey::new(&sig::ED25519, x).ok(),
                _ => None,
            },
        }
    }
}

/// One usable signing key of an issuer, parsed once per fetch.
struct VerifyKey {
    kid: Option<String>,
    kind: KeyKind,
    /// The JWK's `alg`, when it has one: the token's `alg` must then equal it.
    alg: Option<Algorithm>,
    /// The key parsed for each algorithm it fits (indexed as [`ALGORITHMS`]); `None`
    /// for the others, and where aws-lc-rs rejected the key material: every signature
    /// then fails to verify, as it did when the key was parsed on each verification.
    parsed: [Option<ParsedPublicKey>; ALGORITHMS.len()],
    /// Identity of the key material, to notice keys removed or replaced by a fetch.
    fingerprint: String,
}

impl VerifyKey {
    fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }

    /// Whether `signature` (decoded) is a valid `alg` signature of `message` by this key.
    fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        let index = ALGORITHMS.iter().position(|a| *a == alg);
        match index.and_then(|i| self.parsed[i].as_ref()) {
            Some(key) => key.verify_sig(message, signature).is_ok(),
            None => false,
        }
    }
}

/// Why a JWK was skipped (logged with its kid).
type SkipReason = &'static str;

fn json_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, SkipReason> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err("a member has the wrong JSON type"),
    }
}

/// A base64url JWK member; it should be unpadded, but some publishers pad anyway.
fn jwk_b64<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, SkipReason> {
    let text = json_str(obj, name)?.ok_or("a required member is missing")?;
    Ok(text.trim_end_matches('='))
}

fn jwk_bytes(obj: &Map<String, Value>, name: &str) -> Result<Vec<u8>, SkipReason> {
    b64url_decode(jwk_b64(obj, name)?).ok_or("a member is not base64url")
}

/// Parses one JWK into a verification key, or says why it is not usable for signatures.
fn parse_jwk(value: &Value) -> Result<VerifyKey, SkipReason> {
    let obj = value.as_object().ok_or("not a JSON object")?;
    let kid = json_str(obj, "kid")?.map(str::to_string);
    if let Some(usage) = json_str(obj, "use")? {
        if usage != "sig" {
            return Err("use is not sig");
        }
    }
    match obj.get("key_ops") {
        None | Some(Value::Null) => {}
        Some(Value::Array(ops)) => {
            if !ops.iter().any(|op| op.as_str() == Some("verify")) {
                return Err("key_ops lacks verify");
            }
        }
        Some(_) => return Err("key_ops is not an array"),
    }
    let alg = match json_str(obj, "alg")? {
        None => None,
        Some(name) => Some(parse_alg(name).ok_or("alg is not a supported signature algorithm")?),
    };
    let kty = json_str(obj, "kty")?.ok_or("kty is missing")?;
    let (n, e, x, y);
    let (kind, material) = match kty {
        "RSA" => {
            n = jwk_bytes(obj, "n")?;
            e = jwk_bytes(obj, "e")?;
            let n = strip_leading_zeros(&n);
            let e = strip_leading_zeros(&e);
            if n.len() < 256 {
                return Err("RSA modulus shorter than 2048 bits");
            }
            if n.len() > 1024 {
                return Err("RSA modulus longer than 8192 bits");
            }
            if e.is_empty() || e.len() > 8 {
                return Err("RSA exponent out of range");
            }
            (KeyKind::Rsa, KeyMaterial::Rsa { n, e })
        }
        "EC" => {
            let (kind, len) = match json_str(obj, "crv")? {
                Some("P-256") => (KeyKind::EcP256, 32),
                Some("P-384") => (KeyKind::EcP384, 48),
                _ => return Err("EC curve not supported"),
            };
            x = jwk_bytes(obj, "x")?;
            y = jwk_bytes(obj, "y")?;
            if x.len() != len || y.len() != len {
                return Err("EC coordinates of the wrong length");
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (kind, KeyMaterial::Ec(point))
        }
        "OKP" => {
            if json_str(obj, "crv")? != Some("Ed25519") {
                return Err("OKP curve not supported");
            }
            x = jwk_bytes(obj, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 key of the wrong length");
            }
            (KeyKind::Ed25519, KeyMaterial::Ed25519(&x))
        }
        "oct" => return Err("symmetric keys are never used"),
        _ => return Err("kty not supported"),
    };
    if let Some(alg) = alg {
        if !kind.fits(alg) {
            return Err("alg does not fit kty/crv");
        }
    }
    let parsed = ALGORITHMS.map(|a| {
        if kind.fits(a) && alg.is_none_or(|only| only == a) {
            material.parse(a)
        } else {
            None
        }
    });
    let fingerprint = format!(
        "{kid:?}|{kind:?}|{alg:?}|{}|{}|{}|{}",
        obj.get("n").and_then(Value::as_str).unwrap_or(""),
        obj.get("e").and_then(Value::as_str).unwrap_or(""),
        obj.get("x").and_then(Value::as_str).unwrap_or(""),
        obj.get("y").and_then(Value::as_str).unwrap_or(""),
    );
    Ok(VerifyKey {
        kid,
        kind,
        alg,
        parsed,
        fingerprint,
    })
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Parses a JWKS document; keys that cannot serve for signatures are skipped (and logged).
fn parse_jwks(doc: &Value, issuer: &str) -> Result<Vec<VerifyKey>, String> {
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| "JWKS has no \"keys\" array".to_string())?;
    let mut out = Vec::new();
    for jwk in keys.iter().take(MAX_KEYS) {
        match parse_jwk(jwk) {
            Ok(key) => out.push(key),
            Err(why) => {
                let kid = jwk.get("kid").and_then(Value::as_str).unwrap_or("");
                tracing::debug!(issuer, kid = ?log_kid(kid), why, "JWK skipped");
            }
        }
    }
    if out.is_empty() {
        return Err(format!(
            "JWKS has no usable signing key ({} keys listed)",
            keys.len()
        ));
    }
    Ok(out)
}

/// The keys of one issuer, replaced whole by each successful fetch.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Vec<Arc<VerifyKey>>>,
    all: Vec<Arc<VerifyKey>>,
    /// `true` once a fetch succeeded.
    loaded: bool,
}

enum Lookup {
    Found(Arc<VerifyKey>),
    /// No key with this kid (or, without kid, no key fitting the alg).
    Missing,
    /// The kid names keys, but none fits the token's alg.
    Unfit,
    /// No kid, and several keys fit the alg.
    Ambiguous,
}

impl KeySet {
    fn new(keys: Vec<VerifyKey>) -> Self {
        let all: Vec<Arc<VerifyKey>> = keys.into_iter().map(Arc::new).collect();
        let mut by_kid: HashMap<String, Vec<Arc<VerifyKey>>> = HashMap::new();
        for key in &all {
            if let Some(kid) = &key.kid {
                by_kid.entry(kid.clone()).or_default().push(key.clone());
            }
        }
        KeySet {
            by_kid,
            all,
            loaded: true,
        }
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        match kid {
            Some(kid) => match self.by_kid.get(kid) {
                None => Lookup::Missing,
                Some(keys) => match keys.iter().find(|k| k.fits(alg)) {
                    Some(key) => Lookup::Found(key.clone()),
                    None => Lookup::Unfit,
                },
            },
            None => {
                let mut fitting = self.all.iter().filter(|k| k.fits(alg));
                match (fitting.next(), fitting.next()) {
                    (None, _) => Lookup::Missing,
                    (Some(key), None) => Lookup::Found(key.clone()),
                    (Some(_), Some(_)) => Lookup::Ambiguous,
                }
            }
        }
    }

    fn fingerprints(&self) -> HashSet<&str> {
        self.all.iter().map(|k| k.fingerprint.as_str()).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Issuer state and fetching

#[derive(Default)]
struct FetchStatus {
    discovered_jwks_uri: Option<String>,
    /// The last fetch failed: discover the JWKS location again (it may have moved).
    rediscover: bool,
    last_success: Option<u64>,
    /// Unix ms at which the last successful fetch started (see [`TokenValidator::verify_jws`]).
    last_success_started_ms: Option<u64>,
    last_attempt: Option<u64>,
    last_error: Option<String>,
}

struct Issuer {
    iss: String,
    configured_jwks_uri: Option<String>,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    require_typ: bool,
    leeway: u64,
    /// `max_token_lifetime` in seconds.
    max_lifetime: u64,
    required_claims: Vec<String>,
    refresh: Duration,
    min_refetch: Duration,
    fetch_timeout: Duration,
    labels: IssuerLabels,
    keys: RwLock<Arc<KeySet>>,
    /// Held for the whole of a fetch: fetches of one issuer never overlap, and requests
    /// that find an unknown kid during a fetch wait for it instead of starting another.
    /// Holds the start of the last fetch, for the on-demand rate limit.
    fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Fetches completed (successful or not); lets waiters see that one just happened.
    fetches_done: AtomicU64,
    status: Mutex<FetchStatus>,
}

impl Issuer {
    fn new(config: &IssuerConfig) -> Self {
        let algorithms = config
            .algorithms
            .iter()
            .filter_map(|name| {
                let alg = parse_alg(name);
                if alg.is_none() {
                    tracing::warn!(issuer = %config.issuer, algorithm = %name, "algorithm ignored: not an accepted signature algorithm");
                }
                alg
            })
            .collect();
        Issuer {
            iss: config.issuer.clone(),
            configured_jwks_uri: config.jwks_uri.clone(),
            audiences: config.audiences.clone(),
            algorithms,
            require_typ: config.require_typ,
            leeway: config.leeway.as_secs(),
            max_lifetime: config.max_token_lifetime.as_secs(),
            required_claims: config.required_claims.clone(),
            refresh: config.jwks_refresh.max(MIN_REFRESH),
            min_refetch: config.jwks_min_refetch,
            fetch_timeout: config.jwks_timeout.max(Duration::from_millis(100)),
            labels: IssuerLabels {
                issuer: config.issuer.clone(),
            },
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetch: tokio::sync::Mutex::new(None),
            fetches_done: AtomicU64::new(0),
            status: Mutex::new(FetchStatus::default()),
        }
    }

    fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn status(&self) -> std::sync::MutexGuard<'_, FetchStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn discovery_url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.iss.trim_end_matches('/')
        )
    }
}

/// Describes a reqwest error without its URL (URLs are configuration, but keep it short).
fn describe(err: reqwest::Error) -> String {
    if err.is_timeout() {
        "timed out".to_string()
    } else {
        err.without_url().to_string()
    }
}

/// The client JWKS and discovery documents are fetched with. Redirects are not followed:
/// `jwks_uri` and the issuer are what the operator configured (and checked to be https),
/// and a redirect could send the fetch to plain http or to a host the operator never
/// named; a 3xx is a failed fetch.
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// GETs a JSON document of at most [`MAX_JWKS_BYTES`]; `timeout` bounds the whole
/// exchange, body included (a server trickling bytes is as down as one that never answers).
async fn get_json(http: &reqwest::Client, url: &str, timeout: Duration) -> Result<Value, String> {
    let mut resp = http
        .get(url)
        .timeout(timeout)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(describe)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("HTTP status {}", status.as_u16()));
    }
    if resp.content_length().unwrap_or(0) > MAX_JWKS_BYTES as u64 {
        return Err(format!("document larger than {MAX_JWKS_BYTES} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("document larger than {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("invalid JSON: {e}"))
}

// ---------------------------------------------------------------------------------------
// Token parsing

/// What is read from a token before its signature is checked.
struct Parsed<'t> {
    /// The base64url JOSE header (only signed-event verification looks past the fields
    /// below, and decodes it again).
    header_b64: &'t str,
    /// The header's `alg` (a string); `None` when it names no algorithm revsync verifies.
    alg: Option<Algorithm>,
    kid: Option<String>,
    /// Whether the header's `typ` is an RFC 9068 access-token type.
    access_token_typ: bool,
    /// `header.payload`, the signed bytes.
    message: &'t str,
    /// The signature, decoded.
    signature: Vec<u8>,
    claims: Map<String, Value>,
}

fn decode_json_object(part: &str) -> Result<Map<String, Value>, Rejection> {
    let bytes = b64url_decode(part).ok_or(Rejection::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Unique(Value::Object(map))) => Ok(map),
        _ => Err(Rejection::Malformed),
    }
}

/// A JSON value in which no object, at any depth, names a member twice.
///
/// RFC 7519 §4 and RFC 7515 §5.2 let a parser either reject duplicate member names or
/// keep the last; revsync rejects them (`malformed`), so no claim can mean one thing to
/// revsync and another to the resource server's own JSON parser (`{"sub":"a","sub":"b"}`).
struct Unique(Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json never yields a non-finite number; `Null` would be wrong, so refuse.
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| serde::de::Error::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Unique(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Unique(value) = map.next_value()?;
            if members.insert(key, value).is_some() {
                return Err(serde::de::Error::custom("duplicate member name"));
            }
        }
        Ok(Value::Object(members))
    }
}

fn opt_string(map: &Map<String, Value>, name: &str) -> Result<Option<String>, Rejection> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Rejection::Malformed),
    }
}

/// A NumericDate: a non-negative JSON number (fractions are truncated).
fn opt_numeric_date(map: &Map<String, Value>, name: &str) -> Result<Option<u64>, Rejection> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else {
                match n.as_f64() {
                    Some(f) if (0.0..1.8e19).contains(&f) => Ok(Some(f as u64)),
                    _ => Err(Rejection::Malformed),
                }
            }
        }
        Some(_) => Err(Rejection::Malformed),
    }
}

/// Splits and decodes a token; rejects anything that is not a well-formed JWS compact
/// serialization with JSON object header and claims.
fn parse_token(token: &str) -> Result<Parsed<'_>, Rejection> {
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Rejection::Malformed);
    };
    let message = &token[..header_b64.len() + 1 + payload_b64.len()];
    let signature = b64url_decode(signature).ok_or(Rejection::Malformed)?;
    let header = b64url_decode(header_b64).ok_or(Rejection::Malformed)?;
    let JoseHeader {
        alg,
        kid,
        access_token_typ,
    } = read_header(&header)?;
    let claims = decode_json_object(payload_b64)?;
    Ok(Parsed {
        header_b64,
        alg,
        kid,
        access_token_typ,
        message,
        signature,
        claims,
    })
}

/// The JOSE header members revsync reads.
struct JoseHeader {
    alg: Option<Algorithm>,
    kid: Option<String>,
    access_token_typ: bool,
}

impl JoseHeader {
    /// The rules on the members: `alg` a string, `kid` and `typ` strings or null, `kid`
    /// at most [`MAX_KID_BYTES`], no `crit`.
    fn new(alg: Member<'_>, kid: Member<'_>, typ: Member<'_>) -> Result<Self, Rejection> {
        let Member::Str(alg) = alg else {
            return Err(Rejection::Malformed);
        };
        let kid = kid.opt_str()?;
        if kid.is_some_and(|k| k.len() > MAX_KID_BYTES) {
            return Err(Rejection::Malformed);
        }
        Ok(JoseHeader {
            alg: parse_alg(&alg),
            kid: kid.map(str::to_string),
            access_token_typ: is_access_token_typ(typ.opt_str()?),
        })
    }
}

/// Reads the JOSE header (JSON text) without building a map of it. Every member is
/// parsed (the ones revsync does not read into a [`Unique`] value that is dropped); a
/// member named twice, a `crit` member, or a nested JWT (`cty: "JWT"`) is malformed.
fn read_header(json: &[u8]) -> Result<JoseHeader, Rejection> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let members = serde::Deserializer::deserialize_any(&mut de, HeaderVisitor)
        .and_then(|members| de.end().map(|()| members));
    match members {
        // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; none are.
        Ok(m) if m.crit => Err(Rejection::Malformed),
        // RFC 7519 §5.2: `cty: "JWT"` announces a nested JWT. Access tokens are not
        // nested; the outer signature would vouch for nothing revsync checks.
        Ok(m) if matches!(&m.cty, Member::Str(c) if c.eq_ignore_ascii_case("JWT")) => {
            Err(Rejection::Malformed)
        }
        Ok(m) => JoseHeader::new(m.alg, m.kid, m.typ),
        Err(_) => Err(Rejection::Malformed),
    }
}

/// The value of a header member, as far as revsync looks at it.
#[derive(Default)]
enum Member<'a> {
    #[default]
    Absent,
    Null,
    Str(std::borrow::Cow<'a, str>),
    /// Any other JSON value.
    Other,
}

impl<'a> Member<'a> {
    fn from_value(value: Value) -> Self {
        match value {
            Value::Null => Member::Null,
            Value::String(s) => Member::Str(s.into()),
            _ => Member::Other,
        }
    }

    /// Absent or null → `None`; a string → `Some`; anything else is malformed.
    fn opt_str(&self) -> Result<Option<&str>, Rejection> {
        match self {
            Member::Absent | Member::Null => Ok(None),
            Member::Str(s) => Ok(Some(s)),
            Member::Other => Err(Rejection::Malformed),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Member<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MemberVisitor)
    }
}

struct MemberVisitor;

impl<'de> serde::de::Visitor<'de> for MemberVisitor {
    type Value = Member<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Member::Str(v.into()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Member::Str(v.to_string().into()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Member::Str(v.into()))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Member::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Member::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Member::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Member::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Member::Other)
    }
    // Arrays and objects are read whole, with [`Unique`]'s rule on member names.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        UniqueVisitor.visit_seq(seq).map(Member::from_value)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        UniqueVisitor.visit_map(map).map(Member::from_value)
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct Key<'a>(std::borrow::Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_str(MemberVisitor)? {
            Member::Str(s) => Ok(Key(s)),
            _ => Err(serde::de::Error::custom("object key is not a string")),
        }
    }
}

/// The members of a JOSE header object that revsync reads.
#[derive(Default)]
struct HeaderMembers<'a> {
    alg: Member<'a>,
    kid: Member<'a>,
    typ: Member<'a>,
    cty: Member<'a>,
    crit: bool,
}

struct HeaderVisitor;

impl<'de> serde::de::Visitor<'de> for HeaderVisitor {
    type Value = HeaderMembers<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = HeaderMembers::default();
        // Headers have a handful of members: a linear scan beats hashing.
        let mut seen: Vec<std::borrow::Cow<'de, str>> = Vec::new();
        while let Some(Key(key)) = map.next_key()? {
            if seen.contains(&key) {
                return Err(serde::de::Error::custom("duplicate member name"));
            }
            match &*key {
                "alg" => members.alg = map.next_value()?,
                "kid" => members.kid = map.next_value()?,
                "typ" => members.typ = map.next_value()?,
                "cty" => members.cty = map.next_value()?,
                other => {
                    map.next_value::<Unique>()?;
                    if other == "crit" {
                        members.crit = true;
                    }
                }
            }
            seen.push(key);
        }
        Ok(members)
    }
}

/// Reads the typed claims; a claim of the wrong JSON type makes the token `Malformed`.
fn extract_claims(claims: Map<String, Value>) -> Result<VerifiedToken, Rejection> {
    let iss = opt_string(&claims, "iss")?.ok_or(Rejection::Malformed)?;
    let sub = opt_string(&claims, "sub")?;
    let jti = opt_string(&claims, "jti")?;
    let sid = opt_string(&claims, "sid")?;
    let client_id = match opt_string(&claims, "client_id")? {
        Some(c) => Some(c),
        None => opt_string(&claims, "azp")?,
    };
    let exp = opt_numeric_date(&claims, "exp")?.ok_or(Rejection::Malformed)?;
    let nbf = opt_numeric_date(&claims, "nbf")?;
    let iat = opt_numeric_date(&claims, "iat")?;
    let scope = match opt_string(&claims, "scope")? {
        Some(s) => Some(s),
        None => scope_from_scp(claims.get("scp"))?,
    };
    // aud must be a string or an array of strings when present.
    names_audience(&claims, |_| false)?;
    Ok(VerifiedToken {
        iss,
        sub,
        jti,
        sid,
        client_id,
        iat,
        exp,
        nbf,
        scope,
        claims,
        answers: AnswerCache::default(),
    })
}

/// `scp` as an array of strings (joined by spaces) or a space-separated string.
fn scope_from_scp(scp: Option<&Value>) -> Result<Option<String>, Rejection> {
    match scp {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                parts.push(item.as_str().ok_or(Rejection::Malformed)?);
            }
            Ok(Some(parts.join(" ")))
        }
        Some(_) => Err(Rejection::Malformed),
    }
}

/// Whether the token's `aud` names an audience that `accepted` accepts (`false` when
/// absent); `Malformed` unless `aud` is absent, null, a string or an array of strings.
fn names_audience(
    claims: &Map<String, Value>,
    accepted: impl Fn(&str) -> bool,
) -> Result<bool, Rejection> {
    match claims.get("aud") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::String(s)) => Ok(accepted(s)),
        Some(Value::Array(items)) => {
            let mut found = false;
            for item in items {
                let aud = item.as_str().ok_or(Rejection::Malformed)?;
                found = found || accepted(aud);
            }
            Ok(found)
        }
        Some(_) => Err(Rejection::Malformed),
    }
}

/// RFC 9068 §2.1: `at+jwt`, optionally with the `application/` prefix, any case.
fn is_access_token_typ(typ: Option<&str>) -> bool {
    typ.is_some_and(|t| {
        t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt")
    })
}

/// Whether the token lives longer than `lifetime` (plus `leeway`) by its own `exp - iat`.
/// A fixed property of the token, so checked once, before it is cached; tokens without
/// `iat` are bounded by [`Window`] instead.
fn exceeds_lifetime(token: &VerifiedToken, lifetime: u64, leeway: u64) -> bool {
    token
        .iat
        .is_some_and(|iat| token.exp.saturating_sub(iat) > lifetime.saturating_add(leeway))
}

/// The times at which a token is accepted: from `max(nbf, iat) - leeway` until
/// `exp + leeway` (exclusive) and, for a token without `iat`, not while `exp` is more than
/// the lifetime (plus leeway) ahead. It depends on the clock, so it is kept in the
/// verified-token cache and checked again on every hit.
#[derive(Clone, Copy)]
struct Window {
    not_before: u64,
    not_after: u64,
    /// Without `iat`: `exp - lifetime - leeway`; 0 otherwise.
    lifetime_from: u64,
}

impl Window {
    fn new(token: &VerifiedToken, leeway: u64, lifetime: u64) -> Self {
        // An `iat` in the future is as good as a `nbf` there: such a token would escape
        // every `not_before` revocation made before its `iat`.
        let starts = token.nbf.max(token.iat).unwrap_or(0);
        let lifetime_from = match token.iat {
            Some(_) => 0,
            None => token.exp.saturating_sub(lifetime.saturating_add(leeway)),
        };
        Window {
            not_before: starts.saturating_sub(leeway),
            not_after: token.exp.saturating_add(leeway),
            lifetime_from,
        }
    }

    fn check(self, now: u64) -> Result<(), Rejection> {
        if now >= self.not_after {
            Err(Rejection::Expired)
        } else if now < self.not_before {
            Err(Rejection::NotYetValid)
        } else if now < self.lifetime_from {
            Err(Rejection::LifetimeExceeded)
        } else {
            Ok(())
        }
    }
}

fn log_kid(kid: &str) -> &str {
    match kid.char_indices().nth(LOG_KID_CHARS) {
        Some((i, _)) => &kid[..i],
        None => kid,
    }
}

// ---------------------------------------------------------------------------------------
// Verified-token cache

#[derive(Clone)]
struct Cached {
    token: Arc<VerifiedToken>,
    window: Window,
}

/// Expires each entry when its token does (`exp + leeway`), capped at [`MAX_CACHE_TTL`].
struct ExpireWithToken;

impl moka::Expiry<[u8; 32], Cached> for ExpireWithToken {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Cached,
        _created_at: Instant,
    ) -> Option<Duration> {
        let left = value.window.not_after.saturating_sub(unix_now());
        Some(Duration::from_secs(left).min(MAX_CACHE_TTL))
    }
}

// ---------------------------------------------------------------------------------------
// The validator

/// Validates tokens of the configured issuers. Shared as `Arc`.
pub struct TokenValidator {
    issuers: HashMap<String, Arc<Issuer>>,
    /// In configuration order, for status.
    ordered: Vec<Arc<Issuer>>,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    cache: moka::sync::Cache<[u8; 32], Cached>,
    /// Bumped (before the cache is cleared) whenever a fetch removes or replaces a key,
    /// so a verification that raced with the removal does not stay cached.
    cache_epoch: AtomicU64,
}

impl TokenValidator {
    /// Builds state for the issuers, fetches each JWKS once (a failure is logged and
    /// counted, not fatal: that issuer has no keys yet), and spawns one periodic refresh
    /// task per issuer (every `jwks_refresh`; faster while no key set ever loaded) that
    /// stops when `shutdown` is cancelled or the validator is dropped.
    pub async fn start(
        issuers: &[IssuerConfig],
        http: reqwest::Client,
        metrics: Arc<Metrics>,
        cache_capacity: u64,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let mut by_iss = HashMap::new();
        let mut ordered = Vec::new();
        for config in issuers {
            if by_iss.contains_key(&config.issuer) {
                tracing::warn!(issuer = %config.issuer, "issuer configured twice; the first entry is used");
                continue;
            }
            let issuer = Arc::new(Issuer::new(config));
            by_iss.insert(config.issuer.clone(), issuer.clone());
            ordered.push(issuer);
        }
        let cache = moka::sync::Cache::builder()
            .max_capacity(cache_capacity)
            .expire_after(ExpireWithToken)
            .build();
        let validator = Arc::new(TokenValidator {
            issuers: by_iss,
            ordered,
            http,
            metrics,
            cache,
            cache_epoch: AtomicU64::new(0),
        });

        let mut initial = tokio::task::JoinSet::new();
        for issuer in validator.ordered.clone() {
            let v = validator.clone();
            initial.spawn(async move {
                let mut last = issuer.fetch.lock().await;
                v.fetch_locked(&issuer, &mut last).await;
            });
        }
        while initial.join_next().await.is_some() {}

        for issuer in &validator.ordered {
            tokio::spawn(refresh_loop(
                Arc::downgrade(&validator),
                issuer.clone(),
                shutdown.clone(),
            ));
        }
        validator
    }

    /// Validates `token` at the current time.
    pub async fn validate(&self, token: &str) -> Result<Arc<VerifiedToken>, Rejection> {
        self.validate_at(token, unix_now()).await
    }

    /// Validates `token` at `now` (unix seconds).
    pub async fn validate_at(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Arc<VerifiedToken>, Rejection> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(Rejection::Malformed);
        }
        let hash = token_hash(token);
        if let Some(hit) = self.cache.get(&hash) {
            self.metrics.cache_hits.inc();
            hit.window.check(now)?;
            return Ok(hit.token);
        }
        self.metrics.cache_misses.inc();

        let parsed = parse_token(token)?;
        let verified = extract_claims(parsed.claims)?;
        let alg = parsed.alg.ok_or(Rejection::BadSignature)?;
        let issuer = self
            .issuers
            .get(&verified.iss)
            .ok_or(Rejection::WrongIssuer)?;
        if !issuer.algorithms.contains(&alg) {
            return Err(Rejection::BadSignature);
        }

        let epoch = self.cache_epoch.load(Ordering::Acquire);
        let key = self.find_key(issuer, parsed.kid.as_deref(), alg).await?;
        if !key.verify(alg, parsed.message.as_bytes(), &parsed.signature) {
            return Err(Rejection::BadSignature);
        }

        // The claims are trusted from here on.
        if issuer.require_typ && !parsed.access_token_typ {
            return Err(Rejection::WrongType);
        }
        if !names_audience(&verified.claims, |a| {
            issuer.audiences.iter().any(|ours| ours == a)
        })? {
            return Err(Rejection::WrongAudience);
        }
        if exceeds_lifetime(&verified, issuer.max_lifetime, issuer.leeway) {
            return Err(Rejection::LifetimeExceeded);
        }
        let window = Window::new(&verified, issuer.leeway, issuer.max_lifetime);
        window.check(now)?;
        for claim in &issuer.required_claims {
            if matches!(verified.claims.get(claim), None | Some(Value::Null)) {
                return Err(Rejection::Malformed);
            }
        }

        let verified = Arc::new(verified);
        self.cache.insert(
            hash,
            Cached {
                token: verified.clone(),
                window,
            },
        );
        if self.cache_epoch.load(Ordering::Acquire) != epoch {
            // Keys were removed while this token was being checked.
            self.cache.invalidate(&hash);
        }
        Ok(verified)
    }

    /// Verifies a signed JWS that is not an access token (an RFC 8417 Security Event
    /// Token, an OpenID Connect logout token): compact shape, `alg` (asymmetric and in the
    /// issuer's allowlist), `iss` (a configured issuer), the key (from that issuer's JWKS
    /// only, refetched once on an unknown `kid` as for access tokens), the signature, and,
    /// when `audience` is given, that `aud` names it. Unlike [`Self::validate`] it applies
    /// no `typ`, `exp`, `nbf` or required-claim rule (the caller applies the rules of the
    /// token's own type) and caches nothing.
    ///
    /// `seen_at_ms` is when the caller first held the token (unix ms). A key that is not in
    /// the issuer's JWKS is [`Rejection::UnknownKey`] only when a fetch *started* at or
    /// after that time succeeded and still lacks it: the token was signed before we held
    /// it, so a key that exists was published by then. Otherwise (keys never loaded, last
    /// refetch failed or was rate-limited) the answer is [`Rejection::KeysUnavailable`]:
    /// not decidable now, ask again later.
    pub async fn verify_jws(
        &self,
        token: &str,
        audience: Option<&str>,
        seen_at_ms: u64,
    ) -> Result<VerifiedJws, Rejection> {
        let parsed = parse_token(token)?;
        let iss = opt_string(&parsed.claims, "iss")?.ok_or(Rejection::Malformed)?;
        let alg = parsed.alg.ok_or(Rejection::BadSignature)?;
        let issuer = self.issuers.get(&iss).ok_or(Rejection::WrongIssuer)?;
        if !issuer.algorithms.contains(&alg) {
            return Err(Rejection::BadSignature);
        }
        let key = self
            .find_event_key(issuer, parsed.kid.as_deref(), alg, seen_at_ms)
            .await?;
        if !key.verify(alg, parsed.message.as_bytes(), &parsed.signature) {
            return Err(Rejection::BadSignature);
        }
        if let Some(audience) = audience {
            if !names_audience(&parsed.claims, |a| a == audience)? {
                return Err(Rejection::WrongAudience);
            }
        }
        Ok(VerifiedJws {
            iss,
            header: decode_json_object(parsed.header_b64)?,
            claims: parsed.claims,
        })
    }

    /// [`Self::find_key`] for signed events, where a missing key is final only when a fetch
    /// started at or after `seen_at_ms` succeeded (see [`Self::verify_jws`]). A fetch in the
    /// same millisecond counts: for its snapshot to miss a key the event was signed with,
    /// the key would have to be published, used, and the event read, all within it.
    async fn find_event_key(
        &self,
        issuer: &Issuer,
        kid: Option<&str>,
        alg: Algorithm,
        seen_at_ms: u64,
    ) -> Result<Arc<VerifyKey>, Rejection> {
        let fetches_seen = issuer.fetches_done.load(Ordering::Acquire);
        match issuer.keys().lookup(kid, alg) {
            Lookup::Found(key) => return Ok(key),
            Lookup::Unfit => return Err(Rejection::BadSignature),
            Lookup::Ambiguous => return Err(Rejection::UnknownKey),
            Lookup::Missing => {}
        }
        tracing::debug!(issuer = %issuer.iss, kid = ?kid.map(log_kid), "unknown key id in a signed event");
        self.refetch_for_unknown(issuer, fetches_seen).await;
        // Status before keys: a fetch replaces the keys before it records its success, so
        // keys read after a fresh success are at least that fresh.
        let fresh = issuer
            .status()
            .last_success_started_ms
            .is_some_and(|started| started >= seen_at_ms);
        match issuer.keys().lookup(kid, alg) {
            Lookup::Found(key) => Ok(key),
            Lookup::Unfit => Err(Rejection::BadSignature),
            Lookup::Ambiguous => Err(Rejection::UnknownKey),
            Lookup::Missing if fresh => Err(Rejection::UnknownKey),
            Lookup::Missing => Err(Rejection::KeysUnavailable),
        }
    }

    /// `true` when every configured issuer has a loaded key set.
    pub fn keys_loaded(&self) -> bool {
        self.ordered.iter().all(|i| i.keys().loaded)
    }

    /// Key status per issuer, in configuration order.
    pub fn status(&self) -> Vec<IssuerKeyStatus> {
        self.ordered
            .iter()
            .map(|issuer| {
                let keys = issuer.keys();
                let st = issuer.status();
                IssuerKeyStatus {
                    issuer: issuer.iss.clone(),
                    jwks_uri: issuer
                        .configured_jwks_uri
                        .clone()
                        .or_else(|| st.discovered_jwks_uri.clone()),
                    keys: keys.all.len(),
                    loaded: keys.loaded,
                    last_success: st.last_success,
                    last_attempt: st.last_attempt,
                    last_error: st.last_error.clone(),
                }
            })
            .collect()
    }

    /// The key for (`kid`, `alg`), refetching the JWKS once (rate-limited) when unknown.
    async fn find_key(
        &self,
        issuer: &Issuer,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<VerifyKey>, Rejection> {
        // Read the fetch count before the keys: a fetch that completes after this point
        // is seen below and spares us another.
        let fetches_seen = issuer.fetches_done.load(Ordering::Acquire);
        match issuer.keys().lookup(kid, alg) {
            Lookup::Found(key) => return Ok(key),
            Lookup::Unfit => return Err(Rejection::BadSignature),
            Lookup::Ambiguous => return Err(Rejection::UnknownKey),
            Lookup::Missing => {}
        }
        tracing::debug!(issuer = %issuer.iss, kid = ?kid.map(log_kid), "unknown key id");
        self.refetch_for_unknown(issuer, fetches_seen).await;
        let keys = issuer.keys();
        match keys.lookup(kid, alg) {
            Lookup::Found(key) => Ok(key),
            Lookup::Unfit => Err(Rejection::BadSignature),
            Lookup::Ambiguous => Err(Rejection::UnknownKey),
            Lookup::Missing if !keys.loaded => Err(Rejection::KeysUnavailable),
            Lookup::Missing => Err(Rejection::UnknownKey),
        }
    }

    /// Fetches the issuer's JWKS unless a fetch completed since `fetches_seen` (single
    /// flight) or one started less than `jwks_min_refetch` ago (rate limit).
    async fn refetch_for_unknown(&self, issuer: &Issuer, fetches_seen: u64) {
        let mut last = issuer.fetch.lock().await;
        if issuer.fetches_done.load(Ordering::Acquire) != fetches_seen {
            return;
        }
        if last.is_some_and(|at| at.elapsed() < issuer.min_refetch) {
            return;
        }
        self.fetch_locked(issuer, &mut last).await;
    }

    /// One fetch of the issuer's JWKS; the caller holds `issuer.fetch`. On success the
    /// key set is replaced; on failure the last good keys keep serving.
    async fn fetch_locked(&self, issuer: &Issuer, last: &mut Option<Instant>) {
        *last = Some(Instant::now());
        let started_ms = crate::unix_now_ms();
        self.metrics
            .jwks_fetches
            .get_or_create(&issuer.labels)
            .inc();
        let attempt_at = unix_now();
        let result = self.download(issuer).await;
        let mut st = issuer.status();
        st.last_attempt = Some(attempt_at);
        match result {
            Ok(keys) => {
                let count = keys.len();
                let new = Arc::new(KeySet::new(keys));
                let old = {
                    let mut slot = issuer.keys.write().unwrap_or_else(|e| e.into_inner());
                    std::mem::replace(&mut *slot, new.clone())
                };
                // A key removed or replaced may be compromised: drop every cached
                // verification rather than serve tokens it signed.
                let kept = new.fingerprints();
                if old.fingerprints().iter().any(|f| !kept.contains(f)) {
                    tracing::info!(issuer = %issuer.iss, "signing key removed from JWKS; verified-token cache cleared");
                    self.cache_epoch.fetch_add(1, Ordering::AcqRel);
                    self.cache.invalidate_all();
                }
                st.last_success = Some(attempt_at);
                st.last_success_started_ms = Some(started_ms);
                st.last_error = None;
                tracing::debug!(issuer = %issuer.iss, keys = count, "JWKS loaded");
            }
            Err(error) => {
                self.metrics
                    .jwks_failures
                    .get_or_create(&issuer.labels)
                    .inc();
                st.rediscover = true;
                tracing::warn!(issuer = %issuer.iss, %error, "JWKS fetch failed; last good keys keep serving");
                st.last_error = Some(error);
            }
        }
        drop(st);
        issuer.fetches_done.fetch_add(1, Ordering::Release);
    }

    async fn download(&self, issuer: &Issuer) -> Result<Vec<VerifyKey>, String> {
        let uri = match &issuer.configured_jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let cached = {
                    let st = issuer.status();
                    st.discovered_jwks_uri.clone().filter(|_| !st.rediscover)
                };
                match cached {
                    Some(uri) => uri,
                    None => {
                        let uri = self.discover(issuer).await?;
                        let mut st = issuer.status();
                        st.discovered_jwks_uri = Some(uri.clone());
                        st.rediscover = false;
                        uri
                    }
                }
            }
        };
        let doc = get_json(&self.http, &uri, issuer.fetch_timeout)
            .await
            .map_err(|e| format!("JWKS: {e}"))?;
        parse_jwks(&doc, &issuer.iss)
    }

    /// `jwks_uri` from `{issuer}/.well-known/openid-configuration`.
    async fn discover(&self, issuer: &Issuer) -> Result<String, String> {
        let doc = get_json(&self.http, &issuer.discovery_url(), issuer.fetch_timeout)
            .await
            .map_err(|e| format!("discovery: {e}"))?;
        // OpenID Connect Discovery §4.3: the document must name the same issuer.
        if let Some(named) = doc.get("issuer").and_then(Value::as_str) {
            if named != issuer.iss {
                return Err(format!(
                    "discovery: document names issuer {named:?}, expected {:?}",
                    issuer.iss
                ));
            }
        }
        doc.get("jwks_uri")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| "discovery: document has no jwks_uri".to_string())
    }
}

/// Re-fetches one issuer's JWKS every `jwks_refresh` (every `max(jwks_min_refetch, 1s)`
/// while it never loaded) until shutdown or until the validator is dropped.
async fn refresh_loop(
    validator: Weak<TokenValidator>,
    issuer: Arc<Issuer>,
    shutdown: CancellationToken,
) {
    loop {
        let wait = if issuer.keys().loaded {
            issuer.refresh
        } else {
            issuer.min_refetch.max(MIN_REFRESH).min(issuer.refresh)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(v) = validator.upgrade() else { return };
        let mut last = issuer.fetch.lock().await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = v.fetch_locked(&issuer, &mut last) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// base64url (RFC 4648 §5, no padding), strict: no padding, no stray bits.

fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    // `URL_SAFE_NO_PAD` rejects padding, impossible lengths and non-zero trailing bits.
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..chunk.len() + 1 {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn base64url_round_trips_and_is_strict() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(b64url_decode(&b64(&data)).unwrap(), data);
        }
        assert_eq!(b64url_decode("").unwrap(), Vec::<u8>::new());
        assert!(b64url_decode("QQ==").is_none(), "padding");
        assert!(b64url_decode("Q").is_none(), "impossible length");
        assert!(b64url_decode("QR").is_none(), "stray bits");
        assert!(b64url_decode("QUJ").is_none(), "stray bits after two bytes");
        assert_eq!(b64url_decode("QUI").unwrap(), b"AB");
        assert!(b64url_decode("QUI=").is_none(), "padding after two bytes");
        assert!(b64url_decode("QUJD\n").is_none(), "whitespace");
        assert!(b64url_decode("a+b/").is_none(), "standard alphabet");
        assert!(b64url_decode("ab c").is_none());
    }

    #[test]
    fn only_asymmetric_algorithms_parse() {
        for name in [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
        ] {
            assert!(parse_alg(name).is_some(), "{name}");
        }
        for name in [
            "none", "None", "HS256", "HS384", "HS512", "ES512", "rs256", "",
        ] {
            assert!(parse_alg(name).is_none(), "{name}");
        }
    }

    #[test]
    fn key_kinds_fit_only_their_algorithms() {
        use Algorithm::*;
        let all = [
            RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256,
        ];
        let fitting = |kind: KeyKind| -> Vec<Algorithm> {
            all.iter().copied().filter(|a| kind.fits(*a)).collect()
        };
        assert_eq!(
            fitting(KeyKind::Rsa),
            vec![RS256, RS384, RS512, PS256, PS384, PS512]
        );
        assert_eq!(fitting(KeyKind::EcP256), vec![ES256]);
        assert_eq!(fitting(KeyKind::EcP384), vec![ES384]);
        assert_eq!(fitting(KeyKind::Ed25519), vec![EdDSA]);
    }

    fn rsa_jwk() -> Value {
        json!({"kty": "RSA", "kid": "r1", "n": b64(&[0xc5; 256]), "e": "AQAB"})
    }

    #[test]
    fn jwk_alg_and_use_limit_a_key() {
        let key = parse_jwk(&rsa_jwk()).unwrap();
        assert!(key.fits(Algorithm::RS256) && key.fits(Algorithm::PS512));
        assert!(!key.fits(Algorithm::ES256));

        let mut with_alg = rsa_jwk();
        with_alg["alg"] = json!("PS256");
        let key = parse_jwk(&with_alg).unwrap();
        assert!(key.fits(Algorithm::PS256));
        assert!(!key.fits(Algorithm::RS256));

        let mut enc = rsa_jwk();
        enc["use"] = json!("enc");
        assert!(parse_jwk(&enc).is_err());
        let mut sig = rsa_jwk();
        sig["use"] = json!("sig");
        assert!(parse_jwk(&sig).is_ok());
        let mut ops = rsa_jwk();
        ops["key_ops"] = json!(["encrypt"]);
        assert!(parse_jwk(&ops).is_err());
        let mut oaep = rsa_jwk();
        oaep["alg"] = json!("RSA-OAEP");
        assert!(parse_jwk(&oaep).is_err());
        let mut mismatched = rsa_jwk();
        mismatched["alg"] = json!("ES256");
        assert!(parse_jwk(&mismatched).is_err());
    }

    #[test]
    fn unusable_jwks_are_skipped() {
        let short_rsa = json!({"kty": "RSA", "n": b64(&[0xc5; 128]), "e": "AQAB"});
        assert!(parse_jwk(&short_rsa).is_err());
        let hmac = json!({"kty": "oct", "k": "c2VjcmV0"});
        assert!(parse_jwk(&hmac).is_err());
        let p521 = json!({"kty": "EC", "crv": "P-521", "x": b64(&[1; 66]), "y": b64(&[1; 66])});
        assert!(parse_jwk(&p521).is_err());
        let bad_len = json!({"kty": "EC", "crv": "P-256", "x": b64(&[1; 31]), "y": b64(&[1; 32])});
        assert!(parse_jwk(&bad_len).is_err());
        let p256 = json!({"kty": "EC", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[2; 32])});
        assert_eq!(parse_jwk(&p256).unwrap().kind, KeyKind::EcP256);
        let ed = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&[3; 32])});
        assert_eq!(parse_jwk(&ed).unwrap().kind, KeyKind::Ed25519);
        let x25519 = json!({"kty": "OKP", "crv": "X25519", "x": b64(&[3; 32])});
        assert!(parse_jwk(&x25519).is_err());

        let doc = json!({"keys": [hmac, short_rsa]});
        assert!(
            parse_jwks(&doc, "iss").is_err(),
            "no usable key is a failed fetch"
        );
        let doc = json!({"keys": [p256, rsa_jwk()]});
        assert_eq!(parse_jwks(&doc, "iss").unwrap().len(), 2);
        assert!(parse_jwks(&json!({"nokeys": []}), "iss").is_err());
    }

    #[test]
    fn keys_are_parsed_once_for_each_fitting_algorithm() {
        let parsed_for = |key: &VerifyKey| -> Vec<Algorithm> {
            ALGORITHMS
                .iter()
                .zip(&key.parsed)
                .filter(|(_, k)| k.is_some())
                .map(|(a, _)| *a)
                .collect()
        };
        use Algorithm::*;
        let any_rsa = parse_jwk(&rsa_jwk()).unwrap();
        assert_eq!(
            parsed_for(&any_rsa),
            vec![RS256, RS384, RS512, PS256, PS384, PS512]
        );
        let mut ps256 = rsa_jwk();
        ps256["alg"] = json!("PS256");
        assert_eq!(parsed_for(&parse_jwk(&ps256).unwrap()), vec![PS256]);
        // A point that is not on the curve: kept (as before), but verifies nothing.
        let off_curve =
            json!({"kty": "EC", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[2; 32])});
        let key = parse_jwk(&off_curve).unwrap();
        assert!(parsed_for(&key).is_empty());
        assert!(!key.verify(ES256, b"message", &[7; 64]));
        assert!(!any_rsa.verify(RS256, b"message", &[7; 256]));
        assert!(!any_rsa.verify(ES256, b"message", &[7; 64]));
    }

    #[test]
    fn lookup_by_kid_and_without_kid() {
        let p256 = json!({"kty": "EC", "crv": "P-256", "kid": "e1", "x": b64(&[1; 32]), "y": b64(&[2; 32])});
        let set = KeySet::new(vec![
            parse_jwk(&rsa_jwk()).unwrap(),
            parse_jwk(&p256).unwrap(),
        ]);
        assert!(matches!(
            set.lookup(Some("r1"), Algorithm::RS256),
            Lookup::Found(_)
        ));
        assert!(matches!(
            set.lookup(Some("r1"), Algorithm::ES256),
            Lookup::Unfit
        ));
        assert!(matches!(
            set.lookup(Some("zz"), Algorithm::RS256),
            Lookup::Missing
        ));
        // Without kid: exactly one fitting key is used.
        assert!(matches!(
            set.lookup(None, Algorithm::ES256),
            Lookup::Found(_)
        ));
        assert!(matches!(
            set.lookup(None, Algorithm::EdDSA),
            Lookup::Missing
        ));
        let mut r2 = rsa_jwk();
        r2["kid"] = json!("r2");
        let set = KeySet::new(vec![
            parse_jwk(&rsa_jwk()).unwrap(),
            parse_jwk(&r2).unwrap(),
        ]);
        assert!(matches!(
            set.lookup(None, Algorithm::RS256),
            Lookup::Ambiguous
        ));
    }

    #[test]
    fn reasons_are_the_stable_words() {
        use Rejection::*;
        let words: Vec<_> = [
            Expired,
            NotYetValid,
            BadSignature,
            UnknownKey,
            WrongIssuer,
            WrongAudience,
            WrongType,
            Malformed,
            KeysUnavailable,
            LifetimeExceeded,
        ]
        .iter()
        .map(|r| (r.reason(), r.undecidable()))
        .collect();
        assert_eq!(
            words,
            vec![
                ("expired", false),
                ("not_yet_valid", false),
                ("bad_signature", false),
                ("unknown_key", false),
                ("wrong_issuer", false),
                ("wrong_audience", false),
                ("wrong_type", false),
                ("malformed", false),
                ("unknown_key", true),
                ("lifetime_exceeded", false),
            ]
        );
    }

    #[test]
    fn claims_are_extracted_with_fallbacks() {
        let t = extract_claims(obj(json!({
            "iss": "https://as", "sub": "alice", "jti": "j1", "sid": "s1", "azp": "app",
            "iat": 100, "exp": 200.7, "nbf": 90, "scp": ["read", "write"], "aud": ["a", "b"],
            "extra": {"x": 1}
        })))
        .unwrap();
        assert_eq!(t.iss, "https://as");
        assert_eq!(t.sub.as_deref(), Some("alice"));
        assert_eq!(t.jti.as_deref(), Some("j1"));
        assert_eq!(t.sid.as_deref(), Some("s1"));
        assert_eq!(t.client_id.as_deref(), Some("app"));
        assert_eq!((t.iat, t.exp, t.nbf), (Some(100), 200, Some(90)));
        assert_eq!(t.scope.as_deref(), Some("read write"));
        assert_eq!(t.claims["extra"], json!({"x": 1}));

        let t = extract_claims(obj(json!({
            "iss": "i", "exp": 1, "client_id": "c", "azp": "a", "scope": "s1 s2", "scp": ["x"]
        })))
        .unwrap();
        assert_eq!(t.client_id.as_deref(), Some("c"));
        assert_eq!(t.scope.as_deref(), Some("s1 s2"));
        let t = extract_claims(obj(json!({"iss": "i", "exp": 1, "scp": "a b"}))).unwrap();
        assert_eq!(t.scope.as_deref(), Some("a b"));
    }

    #[test]
    fn claims_of_the_wrong_type_are_malformed() {
        for claims in [
            json!({"exp": 1}),
            json!({"iss": 1, "exp": 1}),
            json!({"iss": "i"}),
            json!({"iss": "i", "exp": "1"}),
            json!({"iss": "i", "exp": -5}),
            json!({"iss": "i", "exp": 1, "nbf": true}),
            json!({"iss": "i", "exp": 1, "iat": [1]}),
            json!({"iss": "i", "exp": 1, "sub": 7}),
            json!({"iss": "i", "exp": 1, "aud": 7}),
            json!({"iss": "i", "exp": 1, "aud": ["a", 7]}),
            json!({"iss": "i", "exp": 1, "scp": ["a", 7]}),
            json!({"iss": "i", "exp": 1, "scope": ["a"]}),
        ] {
            assert_eq!(
                extract_claims(obj(claims.clone())).unwrap_err(),
                Rejection::Malformed,
                "{claims}"
            );
        }
    }

    #[test]
    fn token_shape_is_checked() {
        let header = b64(br#"{"alg":"RS256","kid":"k"}"#);
        let payload = b64(br#"{"iss":"i","exp":1}"#);
        let ok = format!("{header}.{payload}.AAAA");
        let parsed = parse_token(&ok).unwrap();
        assert_eq!(parsed.alg, Some(Algorithm::RS256));
        assert_eq!(parsed.kid.as_deref(), Some("k"));
        assert_eq!(parsed.message, format!("{header}.{payload}"));
        assert_eq!(parsed.signature, [0, 0, 0], "AAAA, decoded");
        for bad in [
            String::new(),
            "a.b".to_string(),
            "a.b.c.d".to_string(),
            format!("{header}.{payload}.A"),
            format!("{header}.{payload}.AA+A"),
            format!("{}.{payload}.AAAA", b64(b"[1]")),
            format!("{}.{payload}.AAAA", b64(br#"{"kid":"k"}"#)),
            format!("{}.{payload}.AAAA", b64(br#"{"alg":"RS256","kid":5}"#)),
            format!(
                "{}.{payload}.AAAA",
                b64(br#"{"alg":"RS256","crit":["b64"]}"#)
            ),
            format!("{header}.{}.AAAA", b64(b"not json")),
            format!("{header}.{}.AAAA", b64(b"\"str\"")),
            // Claims naming a member twice, at the top or deeper (RFC 7519 §4).
            format!(
                "{header}.{}.AAAA",
                b64(br#"{"iss":"i","sub":"a","sub":"b"}"#)
            ),
            format!("{header}.{}.AAAA", b64(br#"{"iss":"i","iss":"i"}"#)),
            format!(
                "{header}.{}.AAAA",
                b64(br#"{"iss":"i","cnf":{"jkt":"a","jkt":"b"}}"#)
            ),
            format!(
                "{header}.{}.AAAA",
                b64(br#"{"iss":"i","x":[{"a":1,"a":2}]}"#)
            ),
            format!(
                "{}.{payload}.AAAA",
                b64(format!(r#"{{"alg":"RS256","kid":"{}"}}"#, "k".repeat(257)).as_bytes())
            ),
            "x".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert_eq!(
                parse_token(&bad).err(),
                Some(Rejection::Malformed),
                "{bad:.80}"
            );
        }
    }

    #[test]
    fn header_members_are_read_as_from_a_json_object() {
        use Algorithm::*;
        let read =
            |json: &str| read_header(json.as_bytes()).map(|h| (h.alg, h.kid, h.access_token_typ));
        assert_eq!(
            read(r#"{"alg":"RS256","kid":"k","typ":"at+jwt","x5t":[1,{"a":null}]}"#),
            Ok((Some(RS256), Some("k".to_string()), true))
        );
        // `cty` other than a nested JWT is ignored.
        assert_eq!(
            read(r#"{"alg":"ES256","cty":"json"}"#),
            Ok((Some(ES256), None, false))
        );
        // Escapes are decoded, in keys and values.
        assert_eq!(
            read(r#"{"\u0061lg":"RS\u0032\u0035\u0036","typ":"AT+JWT"}"#),
            Ok((Some(RS256), None, true))
        );
        // An algorithm revsync does not verify is not malformed (it is a bad signature).
        assert_eq!(read(r#"{"alg":"HS256"}"#), Ok((None, None, false)));
        let deep = format!(
            r#"{{"alg":"RS256","x":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for bad in [
            r#"{"alg":"RS256","crit":null}"#,
            r#"{"alg":"RS256","kid":{}}"#,
            r#"{"alg":"RS256","typ":1}"#,
            r#"{"alg":"RS256","x":1e400}"#,
            r#"{"alg":"RS256"} x"#,
            r#"{"alg":"RS256",}"#,
            r#"[{"alg":"RS256"}]"#,
            r#"{"alg":null}"#,
            // A member named twice, wherever it is (RFC 7515 §5.2 allows rejecting).
            r#"{"alg":"ES256","alg":"ES256"}"#,
            r#"{"alg":5,"alg":"ES256"}"#,
            r#"{"alg":"ES256","kid":"a","kid":"b"}"#,
            r#"{"alg":"ES256","x":1,"x":2}"#,
            r#"{"alg":"ES256","\u0078":1,"x":2}"#,
            r#"{"alg":"ES256","x":{"a":1,"a":1}}"#,
            r#"{"alg":"ES256","kid":{"a":[{"b":1,"b":2}]}}"#,
            // Nested JWTs (RFC 7519 §5.2), any case.
            r#"{"alg":"ES256","cty":"JWT"}"#,
            r#"{"alg":"ES256","cty":"jwt"}"#,
            deep.as_str(),
        ] {
            assert_eq!(read(bad), Err(Rejection::Malformed), "{bad:.80}");
        }
    }

    #[test]
    fn typ_check_accepts_rfc9068_forms() {
        assert!(is_access_token_typ(Some("at+jwt")));
        assert!(is_access_token_typ(Some("AT+JWT")));
        assert!(is_access_token_typ(Some("application/at+jwt")));
        assert!(!is_access_token_typ(Some("JWT")));
        assert!(!is_access_token_typ(None));
    }

    #[test]
    fn time_window_applies_leeway() {
        let t = extract_claims(obj(json!({"iss": "i", "exp": 1000, "nbf": 500}))).unwrap();
        let w = Window::new(&t, 30, 3600);
        assert_eq!(w.check(1029), Ok(()));
        assert_eq!(w.check(1030), Err(Rejection::Expired));
        assert_eq!(w.check(470), Ok(()));
        assert_eq!(w.check(469), Err(Rejection::NotYetValid));
        let t = extract_claims(obj(
            json!({"iss": "i", "iat": 5, "exp": u64::MAX, "nbf": 5}),
        ))
        .unwrap();
        assert_eq!(Window::new(&t, 30, 3600).check(0), Ok(()));
    }

    #[test]
    fn an_iat_in_the_future_is_not_yet_valid() {
        let t = extract_claims(obj(json!({"iss": "i", "iat": 500, "exp": 1000}))).unwrap();
        let w = Window::new(&t, 30, 3600);
        assert_eq!(w.check(470), Ok(()));
        assert_eq!(w.check(469), Err(Rejection::NotYetValid));
        // The later of nbf and iat counts.
        let t = extract_claims(obj(
            json!({"iss": "i", "iat": 500, "nbf": 600, "exp": 1000}),
        ))
        .unwrap();
        assert_eq!(
            Window::new(&t, 0, 3600).check(599),
            Err(Rejection::NotYetValid)
        );
        let t = extract_claims(obj(
            json!({"iss": "i", "iat": 600, "nbf": 500, "exp": 1000}),
        ))
        .unwrap();
        assert_eq!(
            Window::new(&t, 0, 3600).check(599),
            Err(Rejection::NotYetValid)
        );
        assert_eq!(Window::new(&t, 0, 3600).check(600), Ok(()));
    }

    #[test]
    fn lifetimes_are_bounded_by_the_issuers() {
        let token = |claims: Value| extract_claims(obj(claims)).unwrap();
        let t = token(json!({"iss": "i", "iat": 1000, "exp": 1000 + 3630}));
        assert!(!exceeds_lifetime(&t, 3600, 30));
        let t = token(json!({"iss": "i", "iat": 1000, "exp": 1000 + 3631}));
        assert!(exceeds_lifetime(&t, 3600, 30));
        let t = token(json!({"iss": "i", "iat": 2000, "exp": 1000}));
        assert!(
            !exceeds_lifetime(&t, 3600, 30),
            "exp before iat is not long"
        );
        // Without iat: exp at most lifetime + leeway ahead of the clock.
        let t = token(json!({"iss": "i", "exp": 10_000}));
        assert!(!exceeds_lifetime(&t, 3600, 30));
        let w = Window::new(&t, 30, 3600);
        assert_eq!(w.check(10_000 - 3631), Err(Rejection::LifetimeExceeded));
        assert_eq!(w.check(10_000 - 3630), Ok(()));
        let t = token(json!({"iss": "i", "exp": 100}));
        assert_eq!(Window::new(&t, 30, 3600).check(0), Ok(()));
    }

    #[test]
    fn kids_are_truncated_in_logs() {
        assert_eq!(log_kid("short"), "short");
        assert_eq!(log_kid(&"é".repeat(100)).chars().count(), LOG_KID_CHARS);
    }

    #[test]
    fn token_hash_is_sha256() {
        assert_eq!(
            token_hash("abc")[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256(\"abc\") starts ba7816bf"
        );
    }
}
