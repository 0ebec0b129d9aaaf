//! The assembled daemon in-process: the API over a Unix socket, and a clean shutdown.

mod common;

use std::time::Duration;

use common::jwt::{claims, JwksServer, TestKey};
use jsonwebtoken::Algorithm;
use revsync::app::{self, Listener};
use revsync::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

async fn unix_request(path: &std::path::Path, request: &str) -> String {
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_checks_over_a_unix_socket_and_shuts_down_cleanly() {
    let key = TestKey::rsa("k1", Algorithm::RS256);
    let jwks = JwksServer::with_keys(&[&key]).await;
    let dir = tempfile::tempdir().unwrap();
    // No broker listens there: the API must still serve, and say it is not ready.
    let mut config = Config::new("127.0.0.1:1", dir.path().join("store"));
    config.issuers.push(jwks.issuer_config("api"));
    let sock = dir.path().join("check.sock");
    let listener = Listener::bind(&format!("unix:{}", sock.display()))
        .await
        .unwrap();
    assert_eq!(listener.describe(), format!("unix:{}", sock.display()));
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(app::run(config, listener, shutdown.clone()));

    let health = unix_request(
        &sock,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    let token = key.sign(&claims(&jwks.issuer(), "api", 300));
    let request = format!(
        "POST /v1/check HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let answer = unix_request(&sock, &request).await;
    // Never caught up with the (absent) broker: valid signature, but no vouching.
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""reason":"stale""#), "{answer}");
    assert!(!answer.contains(&token), "the token is never echoed");

    let ready = unix_request(
        &sock,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");

    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(15), daemon)
        .await
        .expect("daemon stops within the grace period")
        .unwrap();
    result.expect("clean shutdown");

    // The store was flushed and released: it opens again.
    let d = revsync::denylist::Denylist::open(
        &dir.path().join("store"),
        1 << 20,
        revsync::denylist::Retention::new(Duration::from_secs(60), Duration::ZERO),
    );
    assert!(d.is_ok(), "store reopens after shutdown");
}

#[test]
fn the_example_config_in_deploy_is_valid_and_secrets_are_redacted() {
    let text = include_str!("../deploy/revsync.example.toml");
    let config = Config::parse(text, Vec::new()).expect("deploy/revsync.example.toml parses");
    assert_eq!(config.issuers.len(), 1);
    let shown = config.to_redacted_toml();
    assert!(!shown.contains("change-me"), "{shown}");
    assert!(shown.contains("SASL_SSL"));
}
