//! `revsync dev`: everything a newcomer needs on one machine, in one command. It starts
//! a local Tansu broker (installing the pinned version once if it is missing), a demo
//! issuer (an ES256 key, its JWKS, and a `/token` endpoint that mints access tokens),
//! and the daemon wired to both. Not for production: the demo issuer hands out tokens to
//! anyone on loopback.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{Config, IssuerConfig};

pub const TANSU_VERSION: &str = "0.6.0";
pub const DEMO_AUDIENCE: &str = "revsync-demo";
const DEMO_KID: &str = "demo-es256";

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Working directory for the store (default: ./revsync-dev).
    #[arg(long, default_value = "revsync-dev")]
    pub dir: PathBuf,
    /// Port of the check API.
    #[arg(long, default_value_t = 8181)]
    pub port: u16,
    /// Port of the demo issuer (JWKS and /token).
    #[arg(long, default_value_t = 8182)]
    pub issuer_port: u16,
    /// Port of the local broker.
    #[arg(long, default_value_t = 9092)]
    pub broker_port: u16,
}

/// The pinned Tansu binary: `$REVSYNC_TANSU`, else the cache `.ci/run` installs into.
pub fn tansu_path() -> PathBuf {
    if let Some(p) = std::env::var_os("REVSYNC_TANSU") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(format!(".cache/revsync/tansu-{TANSU_VERSION}/bin/tansu"))
}

fn ensure_tansu() -> anyhow::Result<PathBuf> {
    let path = tansu_path();
    if path.exists() {
        return Ok(path);
    }
    let root = path
        .parent()
        .and_then(Path::parent)
        .context("tansu path has no root")?;
    eprintln!(
        "revsync dev: installing the Tansu broker {TANSU_VERSION} into {} (one time; ~20 min on 2 cores)",
        root.display()
    );
    let status = std::process::Command::new("cargo")
        .args(["install", "tansu", "--version", TANSU_VERSION, "--locked"])
        .args(["--features", "dynostore,libsql", "--root"])
        .arg(root)
        .status()
        .context("running cargo install tansu")?;
    if !status.success() || !path.exists() {
        bail!("installing tansu failed");
    }
    Ok(path)
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The demo issuer: one ES256 key, its JWKS, and a token mint. Also used by the
/// benchmarks, which need a real issuer without a test-only key helper.
pub struct DemoIssuer {
    issuer: String,
    key: EncodingKey,
    jwks: Value,
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
        })
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
        let claims = json!({
            "iss": self.issuer, "aud": DEMO_AUDIENCE,
            "sub": q.sub.as_deref().unwrap_or("alice"),
            "client_id": q.client_id.as_deref().unwrap_or("demo-app"),
            "sid": q.sid.as_deref().unwrap_or("demo-session"),
            "jti": q.jti.clone().unwrap_or_else(crate::publish::new_event_id),
            "scope": "read write",
            "iat": now, "exp": now + q.ttl.unwrap_or(3600),
        });
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
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

/// Serves discovery, `/jwks` and `/token?sub=&jti=&sid=&client_id=&ttl=`.
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
        .with_state(issuer)
}

pub async fn run(args: DevArgs) -> anyhow::Result<i32> {
    let tansu = tokio::task::spawn_blocking(ensure_tansu).await??;
    std::fs::create_dir_all(&args.dir)?;
    let broker_url = format!("tcp://127.0.0.1:{}", args.broker_port);
    if StdListener::bind(("127.0.0.1", args.broker_port)).is_err() {
        bail!(
            "port {} is taken (another broker?); pass --broker-port",
            args.broker_port
        );
    }
    let mut broker = tokio::process::Command::new(&tansu)
        .args(["broker", "--listener-url", &broker_url])
        .args(["--advertised-listener-url", &broker_url])
        .args(["--storage-engine", "memory://tansu/"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", tansu.display()))?;
    let port = args.broker_port;
    if !tokio::task::spawn_blocking(move || wait_for_port(port, Duration::from_secs(20))).await? {
        bail!("the local broker did not start");
    }
    let created = tokio::process::Command::new(&tansu)
        .args([
            "topic",
            "create",
            "revocations",
            "--partitions",
            "3",
            "--broker",
            &broker_url,
        ])
        .env("RUST_LOG", "warn")
        .status()
        .await?;
    if !created.success() {
        bail!("creating the revocations topic failed");
    }

    let issuer_url = format!("http://127.0.0.1:{}", args.issuer_port);
    let issuer = Arc::new(DemoIssuer::generate(issuer_url.clone())?);
    let issuer_listener = tokio::net::TcpListener::bind(("127.0.0.1", args.issuer_port))
        .await
        .with_context(|| format!("binding the demo issuer on port {}", args.issuer_port))?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let router = issuer_router(issuer.clone());
    tokio::spawn(async move {
        let _ = axum::serve(issuer_listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });

    let mut config = Config::new(
        format!("127.0.0.1:{}", args.broker_port),
        args.dir.join("store"),
    );
    config.http.listen = format!("127.0.0.1:{}", args.port);
    config.issuers.push(issuer.config());
    config.validate()?;
    std::fs::write(args.dir.join("revsync.toml"), config.to_redacted_toml())?;
    let listener = crate::app::Listener::bind(&config.http.listen).await?;
    tokio::spawn(crate::shutdown_signal(shutdown.clone()));
    let api = format!("http://127.0.0.1:{}", args.port);
    info!(
        "dev mode: broker 127.0.0.1:{}, issuer {issuer_url}, API {api}",
        args.broker_port
    );
    println!(
        r#"
revsync dev is running (Ctrl-C stops it). Try, in another shell:

  TOKEN=$(curl -s '{issuer_url}/token?sub=alice&jti=demo-1')
  curl -s -X POST -H "Authorization: Bearer $TOKEN" {api}/v1/check        # active
  cargo run -q -- publish --brokers 127.0.0.1:{bp} token --iss {issuer_url} --jti demo-1
  curl -s -X POST -H "Authorization: Bearer $TOKEN" {api}/v1/check        # revoked

Also: {api}/v1/status, {api}/metrics, {api}/readyz. Config written to {cfg}.
"#,
        bp = args.broker_port,
        cfg = args.dir.join("revsync.toml").display(),
    );
    let result = crate::app::run(config, listener, shutdown).await;
    let _ = broker.kill().await;
    result.map(|()| 0)
}
