//! The demo issuer: one ES256 key, its JWKS, a token mint, and a revocation endpoint that
//! publishes to Kafka as an authorization server does. Also used by the benchmarks and
//! the fuzz targets, which need a real issuer without a test-only key helper.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::config::{IssuerConfig, KafkaConfig};
use crate::event::{Event, Revocation};
use crate::publish::{new_event_id, Publisher};

pub const DEMO_AUDIENCE: &str = "revsync-demo";
const DEMO_KID: &str = "demo-es256";

pub struct DemoIssuer {
    issuer: String,
    key: EncodingKey,
    jwks: Value,
    /// Where `/revoke` publishes: brokers and topic. `None`: `/revoke` answers 503.
    revocations: Option<(KafkaConfig, String)>,
}

impl DemoIssuer {
    pub fn generate(issuer: String) -> anyhow::Result<Self> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("generating the demo key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|_| anyhow::anyhow!("loading the demo key"))?;
        let point = pair.public_key().as_ref();
        let b64 = |b: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        };
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": DEMO_KID, "use": "sig", "alg": "ES256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]});
        Ok(Self {
            issuer,
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwks,
            revocations: None,
        })
    }

    /// `/revoke` publishes native v1 events to `topic` through `kafka`.
    pub fn publishing_to(self, kafka: KafkaConfig, topic: impl Into<String>) -> Self {
        Self {
            revocations: Some((kafka, topic.into())),
            ..self
        }
    }

    /// An access token for `sub` with id `jti`, valid for an hour from now.
    pub fn token(&self, sub: &str, jti: &str) -> anyhow::Result<String> {
        self.mint(&TokenQuery {
            sub: Some(sub.into()),
            jti: Some(jti.into()),
            sid: None,
            client_id: None,
            ttl: None,
        })
    }

    /// The issuer's config: this issuer, the demo audience, ES256 only.
    pub fn config(&self) -> IssuerConfig {
        let mut iss = IssuerConfig::new(self.issuer.clone(), DEMO_AUDIENCE);
        iss.algorithms = vec!["ES256".into()];
        iss
    }

    fn mint(&self, q: &TokenQuery) -> anyhow::Result<String> {
        let now = crate::unix_now();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(DEMO_KID.into());
        header.typ = Some("at+jwt".into());
        let mut claims = json!({
            "iss": self.issuer, "aud": DEMO_AUDIENCE,
            "sub": q.sub.as_deref().unwrap_or("alice"),
            "client_id": q.client_id.as_deref().unwrap_or("demo-app"),
            "jti": q.jti.clone().unwrap_or_else(new_event_id),
            "scope": "read write",
            "iat": now, "exp": now + q.ttl.unwrap_or(3600),
        });
        // Only when asked: a default session shared by every token would make revoking
        // one session revoke them all.
        if let Some(sid) = &q.sid {
            claims["sid"] = json!(sid);
        }
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }

    /// The revocation `/revoke?…` asks for: exactly one of `jti`, `sub`, `sid`,
    /// `client_id`.
    fn revocation(&self, q: &RevokeQuery) -> Result<Revocation, &'static str> {
        let iss = self.issuer.clone();
        // "Every token issued until now", at the one-second granularity of `iat`: rounded
        // up, so a token minted earlier within this same second is covered too (the rule
        // revokes tokens with `iat` < `not_before`).
        let not_before = crate::unix_now_ms().div_ceil(1000);
        match (&q.jti, &q.sub, &q.sid, &q.client_id) {
            (Some(jti), None, None, None) => Ok(Revocation::Token {
                iss,
                jti: jti.clone(),
                exp: None,
            }),
            (None, Some(sub), None, None) => Ok(Revocation::Subject {
                iss,
                sub: sub.clone(),
                not_before,
            }),
            (None, None, Some(sid), None) => Ok(Revocation::Session {
                iss,
                sid: sid.clone(),
            }),
            (None, None, None, Some(client_id)) => Ok(Revocation::Client {
                iss,
                client_id: client_id.clone(),
                not_before,
            }),
            _ => Err("name exactly one of jti, sub, sid, client_id\n"),
        }
    }
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    sub: Option<String>,
    jti: Option<String>,
    sid: Option<String>,
    client_id: Option<String>,
    ttl: Option<u64>,
}

#[derive(serde::Deserialize)]
struct RevokeQuery {
    jti: Option<String>,
    sub: Option<String>,
    sid: Option<String>,
    client_id: Option<String>,
}

/// Publishes one event and waits for the broker's acknowledgement, as `revsync publish`
/// does: a fresh producer each time, so one failed delivery never taints the next.
fn publish(kafka: &KafkaConfig, topic: &str, event: &Event) -> anyhow::Result<()> {
    let publisher = Publisher::new(kafka, topic)?;
    publisher.send(event)?;
    publisher.finish(Duration::from_secs(10))?;
    Ok(())
}

async fn revoke(
    State(i): State<Arc<DemoIssuer>>,
    Query(q): Query<RevokeQuery>,
) -> (StatusCode, String) {
    let Some((kafka, topic)) = i.revocations.clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this issuer publishes no revocations\n".into(),
        );
    };
    let revocation = match i.revocation(&q) {
        Ok(r) => r,
        Err(usage) => return (StatusCode::BAD_REQUEST, usage.into()),
    };
    let event = Event {
        id: new_event_id(),
        event_time: crate::unix_now(),
        revocation,
        reason: Some("demo issuer /revoke".into()),
    };
    let line = crate::event::encode_native(&event);
    match tokio::task::spawn_blocking(move || publish(&kafka, &topic, &event)).await {
        Ok(Ok(())) => (StatusCode::OK, line + "\n"),
        Ok(Err(e)) => (
            StatusCode::BAD_GATEWAY,
            format!("publishing failed: {e:#}\n"),
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Serves discovery, `/jwks`, `GET /token?sub=&jti=&sid=&client_id=&ttl=` and
/// `POST /revoke?jti=|sub=|sid=|client_id=` (publishes one revocation event and answers
/// it once the broker acknowledged it).
pub fn issuer_router(issuer: Arc<DemoIssuer>) -> Router {
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(|State(i): State<Arc<DemoIssuer>>| async move {
                Json(json!({"issuer": i.issuer, "jwks_uri": format!("{}/jwks", i.issuer)}))
            }),
        )
        .route(
            "/jwks",
            get(|State(i): State<Arc<DemoIssuer>>| async move { Json(i.jwks.clone()) }),
        )
        .route(
            "/token",
            get(
                |State(i): State<Arc<DemoIssuer>>, Query(q): Query<TokenQuery>| async move {
                    match i.mint(&q) {
                        Ok(t) => t + "\n",
                        Err(e) => format!("error: {e}\n"),
                    }
                },
            ),
        )
        .route("/revoke", post(revoke))
        .with_state(issuer)
}
