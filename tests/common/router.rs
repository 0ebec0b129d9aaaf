//! The real HTTP router of `revsync::api`, in process and driven with `oneshot`: no
//! socket, but a real JWKS server, a real (temporary) sled denylist, real token
//! validation and real freshness state. Tests add the request helpers they need in their
//! own `impl Harness` blocks.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use revsync::api::{router, AppState, Checker};
use revsync::config::{FreshnessConfig, IssuerConfig, OnStale};
use revsync::denylist::{Denylist, Retention};
use revsync::event::{Event, Revocation};
use revsync::freshness::Freshness;
use revsync::ingest::IngestState;
use revsync::metrics::Metrics;
use revsync::token::TokenValidator;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::jwt::{claims_with, now, JwksServer, TestKey};

/// The audience of the harness's issuer.
pub const AUD: &str = "https://api.example.com";
/// `max_body_bytes` of the router.
pub const MAX_BODY: usize = 16 * 1024;

#[derive(Clone, Copy)]
pub struct Opts {
    pub on_stale: OnStale,
    pub caught_up: bool,
    pub require_typ: bool,
    /// The JWKS server refuses every request from the start: keys never load.
    pub jwks_down: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            on_stale: OnStale::Deny,
            caught_up: true,
            require_typ: false,
            jwks_down: false,
        }
    }
}

impl Opts {
    /// Never caught up with the bus (so stale), answering by `on_stale`.
    pub fn never_caught_up(on_stale: OnStale) -> Self {
        Opts {
            caught_up: false,
            on_stale,
            ..Opts::default()
        }
    }
}

/// An empty denylist in a temporary sled store, keeping entries for a day.
pub fn temporary_denylist() -> Arc<Denylist> {
    Arc::new(
        Denylist::temporary(Retention::new(
            Duration::from_secs(24 * 3600),
            Duration::from_secs(30),
        ))
        .unwrap(),
    )
}

/// The router over one issuer (a JWKS server publishing the EC key `k1`) for [`AUD`].
pub struct Harness {
    pub app: Router,
    pub key: TestKey,
    pub iss: String,
    pub denylist: Arc<Denylist>,
    pub ingest: Arc<IngestState>,
    pub metrics: Arc<Metrics>,
    cancel: CancellationToken,
    _server: JwksServer,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Harness {
    pub async fn new(opts: Opts) -> Self {
        let key = TestKey::ec_p256("k1");
        let server = JwksServer::with_keys(&[&key]).await;
        server.set_down(opts.jwks_down);
        let mut issuer: IssuerConfig = server.issuer_config(AUD);
        issuer.require_typ = opts.require_typ;
        let iss = server.issuer();
        let metrics = Arc::new(Metrics::new());
        let cancel = CancellationToken::new();
        let validator = TokenValidator::start(
            &[issuer],
            reqwest::Client::new(),
            metrics.clone(),
            1000,
            cancel.clone(),
        )
        .await;
        let denylist = temporary_denylist();
        let ingest = IngestState::new();
        if opts.caught_up {
            ingest.record_caught_up(revsync::monotonic_ms());
        }
        let freshness = Freshness::new(
            FreshnessConfig {
                max_staleness: Duration::from_secs(30),
                on_stale: opts.on_stale,
                ..FreshnessConfig::default()
            },
            ingest.clone(),
        );
        let checker = Arc::new(Checker {
            validator,
            denylist: denylist.clone(),
            freshness,
            ingest: ingest.clone(),
            metrics: metrics.clone(),
        });
        let app = router(AppState {
            checker,
            max_body_bytes: MAX_BODY,
        });
        Harness {
            app,
            key,
            iss,
            denylist,
            ingest,
            metrics,
            cancel,
            _server: server,
        }
    }

    /// A token of this issuer for [`AUD`], `iat` 10 s ago, with `changes` set on top (a
    /// `null` stays, as a claim with a null value).
    pub fn token(&self, changes: Value) -> String {
        let mut c = claims_with(&self.iss, AUD, json!({"iat": now() - 10}));
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        self.key.sign(&c)
    }

    /// Stores `revocation` in the denylist, as if read from the bus.
    pub fn revoke(&self, revocation: Revocation) {
        let event = Event {
            id: format!("ev-{}", revsync::unix_now_ms()),
            event_time: now(),
            revocation,
            reason: None,
        };
        let outcome = self.denylist.apply(&[event], &[], now()).unwrap();
        assert_eq!(outcome.changed, 1, "revocation stored");
    }

    /// Revokes the token of this issuer with this `jti`.
    pub fn revoke_jti(&self, jti: &str) {
        self.revoke(Revocation::Token {
            iss: self.iss.clone(),
            jti: jti.into(),
            exp: None,
        });
    }

    pub async fn send(&self, req: Request<Body>) -> Resp {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec();
        Resp {
            status,
            headers,
            body,
        }
    }

    /// `METHOD uri` with these headers and body.
    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(body.into()).unwrap()).await
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Invariant 6: neither a header nor the body carries `secret`.
    pub fn assert_does_not_echo(&self, secret: &str) {
        assert!(
            !self.text().contains(secret),
            "body echoes a secret: {}",
            self.text()
        );
        for (name, value) in &self.headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains(secret),
                "header {name} echoes a secret"
            );
        }
    }
}

impl Harness {
    /// The same router behind `http.credential = secret`, as `revsync run` serves it.
    pub fn with_credential(mut self, secret: &str) -> Self {
        self.app = revsync::api::require_credential(
            self.app.clone(),
            revsync::api::Credential::new(secret),
            self.metrics.clone(),
        );
        self
    }
}
