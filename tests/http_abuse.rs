//! Hostile HTTP clients against the real server loop: every abuse gets a 4xx or a
//! closed connection within a bound, never a 5xx or a hang.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::jwt::{claims, JwksServer, TestKey};
use revsync::app::{self, Listener};
use revsync::config::Config;
use tokio_util::sync::CancellationToken;

struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(jwks: &JwksServer) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:1", dir.path().join("store"));
    config.issuers.push(jwks.issuer_config("api"));
    config.http.header_read_timeout = Duration::from_millis(500);
    config.http.request_timeout = Duration::from_millis(800);
    let listener = Listener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.describe().parse().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app::run(config, listener, stop.clone()));
    Server {
        addr,
        stop,
        task,
        _dir: dir,
    }
}

/// Sends `parts` with `pause` between them and returns whatever comes back (status
/// line first) and how long until the server answered or closed.
fn exchange(addr: SocketAddr, parts: &[&[u8]], pause: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(pause);
        }
        if s.write_all(p).is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_clients_get_4xx_or_a_closed_connection_never_a_hang_or_5xx() {
    let key = TestKey::rsa("k1", jsonwebtoken::Algorithm::RS256);
    let jwks = JwksServer::with_keys(&[&key]).await;
    let server = start(&jwks).await;
    let addr = server.addr;
    let token = key.sign(&claims(&jwks.issuer(), "api", 300));

    let results = tokio::task::spawn_blocking(move || {
        let mut r = Vec::new();
        // Slowloris: headers never finish. Closed after the header timeout, not held.
        let (resp, took) = exchange(addr, &[b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"], Duration::ZERO);
        r.push(("slowloris", resp, took));
        // A body trickled byte by byte, slower than the request timeout allows: 408.
        let head = b"POST /v1/check HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 40\r\nConnection: close\r\n\r\n";
        let (resp, took) = exchange(addr, &[head, b"{", b"\"", b"t", b"o", b"k"], Duration::from_millis(300));
        r.push(("slow body", resp, took));
        // Thousands of headers: refused outright.
        let mut many = String::from("GET /v1/authz HTTP/1.1\r\nHost: localhost\r\n");
        for i in 0..3000 {
            many.push_str(&format!("X-H{i}: v\r\n"));
        }
        many.push_str("Connection: close\r\n\r\n");
        let (resp, took) = exchange(addr, &[many.as_bytes()], Duration::ZERO);
        r.push(("3000 headers", resp, took));
        // Invalid UTF-8 and wrong content types in the check body.
        let bad = b"POST /v1/check HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nConnection: close\r\n\r\n\xff\xfe\xfd\xfc";
        let (resp, took) = exchange(addr, &[bad], Duration::ZERO);
        r.push(("invalid utf-8 body", resp, took));
        let form = b"POST /v1/check HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\nConnection: close\r\n\r\ntoken=x";
        let (resp, took) = exchange(addr, &[form], Duration::ZERO);
        r.push(("form body on /v1/check", resp, took));
        let bad_form = b"POST /introspect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoken=%ff";
        let (resp, took) = exchange(addr, &[bad_form], Duration::ZERO);
        r.push(("non-UTF-8 form token", resp, took));
        // Non-Bearer schemes and header values that are not text.
        let basic = b"GET /v1/authz HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic dXNlcjpwYXNz\r\nConnection: close\r\n\r\n";
        let (resp, took) = exchange(addr, &[basic], Duration::ZERO);
        r.push(("basic scheme", resp, took));
        let binary = b"GET /v1/authz HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n";
        let (resp, took) = exchange(addr, &[binary], Duration::ZERO);
        r.push(("binary bearer", resp, took));
        // Not HTTP at all.
        let (resp, took) = exchange(addr, &[b"\x16\x03\x01\x02\x00garbage\r\n\r\n"], Duration::ZERO);
        r.push(("tls hello / garbage", resp, took));
        // A huge declared body: refused without reading it.
        let huge = b"POST /v1/check HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n{";
        let (resp, took) = exchange(addr, &[huge], Duration::ZERO);
        r.push(("100 MB declared body", resp, took));
        r
    })
    .await
    .unwrap();

    for (what, resp, took) in &results {
        let code = status(resp);
        assert!(took < &Duration::from_secs(5), "{what}: took {took:?}");
        assert!(code < 500, "{what}: got a 5xx: {resp}");
        assert!(!resp.contains(&token), "{what}: echoed a token");
    }
    let by = |w: &str| {
        results
            .iter()
            .find(|(what, _, _)| *what == w)
            .map(|(_, r, t)| (status(r), *t))
            .unwrap()
    };
    let (code, took) = by("slowloris");
    assert!(code == 0 || code == 408, "slowloris: {code}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "slowloris cut after {took:?}"
    );
    assert_eq!(by("slow body").0, 408);
    assert_eq!(by("3000 headers").0, 431);
    assert_eq!(by("invalid utf-8 body").0, 400);
    assert_eq!(by("form body on /v1/check").0, 400);
    assert_eq!(
        by("non-UTF-8 form token").0,
        200,
        "introspect answers inactive"
    );
    assert_eq!(by("basic scheme").0, 401);
    assert_eq!(by("binary bearer").0, 401);
    assert!(
        matches!(by("tls hello / garbage").0, 0 | 400),
        "garbage: {:?}",
        by("tls hello / garbage")
    );
    assert_eq!(by("100 MB declared body").0, 413);

    // And the server still answers normally afterwards.
    let answer = reqwest::Client::new()
        .post(format!("http://{addr}/v1/check"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    server.stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
