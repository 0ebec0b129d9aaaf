//! The store's disk fills up while events stream in: revsync must stop vouching
//! (not ready, no `active` answers), keep the process alive, and never move a position
//! past data it could not write. Needs root for a small tmpfs, as CI runs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::broker::Broker;
use common::jwt::{claims, JwksServer, TestKey};
use revsync::config::KafkaConfig;
use revsync::event::{Event, Revocation};
use revsync::publish::Publisher;
use serde_json::Value;

struct Tmpfs(std::path::PathBuf);
impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a tmpfs needs root (CI and .ci/run run as root)"
        );
        Tmpfs(path.to_path_buf())
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Publishes `n` token revocations to topic `rev` whose 200-byte ids make each stored
/// entry ~300 bytes, and waits until the broker has them all.
async fn publish_bulky(broker: &Broker, n: usize) {
    let bootstrap = broker.bootstrap();
    tokio::task::spawn_blocking(move || {
        let p = Publisher::new(&KafkaConfig::new(bootstrap), "rev").unwrap();
        let exp = revsync::unix_now() + 3600;
        for i in 0..n {
            p.send(&Event {
                id: format!("e{i}"),
                event_time: revsync::unix_now(),
                revocation: Revocation::Token {
                    iss: "A".into(),
                    jti: format!("{i:0>200}"),
                    exp: Some(exp),
                },
                reason: None,
            })
            .unwrap();
        }
        p.finish(Duration::from_secs(60)).unwrap();
    })
    .await
    .unwrap();
}

/// The disk fills under a running daemon: revsync stops vouching (not ready, no
/// `active` answers, `/healthz` 503, `revsync_store_failing` 1), keeps serving, and
/// never stores a position past data it could not write. Once the volume is grown it
/// recovers: it reopens the store itself, or, when sled will not let go of the failed
/// database, exits with status 75 for its supervisor (this test) to restart it. Either
/// way it reads again what it could not write and is ready with everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_vouching_and_revsync_recovers_once_space_returns() {
    use common::daemon::{Daemon, DaemonConfig};
    // Reopened, revsync resumes inside a record batch: see Broker::sqlite.
    let log = tempfile::tempdir().unwrap();
    let broker = Broker::sqlite(log.path());
    broker.create_topic("rev", 1);
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("small");
    let _fs = Tmpfs::mount(&disk, "12m");
    let port = common::broker::free_port();
    let config = DaemonConfig {
        store: disk.join("store"),
        watermark_interval: Some("100ms"),
        ..DaemonConfig::new(port, dir.path(), &broker, "rev").trusting(&jwks, "api")
    }
    .toml()
    .replace("[store]\n", "[store]\ncache_bytes = 1048576\n")
    .replace("[kafka]\n", "[kafka]\nbatch_max = 500\n");
    let config = {
        let path = dir.path().join("revsync.toml");
        std::fs::write(&path, config).unwrap();
        path
    };
    // A hung daemon fails the test instead of hanging it.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut daemon = Daemon::spawn(&config, port);
    let mut restarts = 0;
    // GETs `path`, restarting the daemon as a supervisor would if it exited with 75.
    macro_rules! get {
        ($path:expr) => {
            loop {
                if let Some(code) = daemon.exited() {
                    assert_eq!(code, Some(75), "revsync exited unexpectedly");
                    restarts += 1;
                    daemon = Daemon::spawn(&config, port);
                }
                match client.get(daemon.url($path)).send().await {
                    Ok(r) => break r,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        };
    }
    let token = key.sign(&claims(&jwks.issuer(), "api", 300));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while get!("/readyz").status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Far more than 12 MiB of revocations (long ids make each entry ~300 bytes).
    const N: u64 = 60_000;
    publish_bulky(&broker, N as usize).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s: Value = get!("/v1/status").json().await.unwrap();
        if s["freshness"]["store_failing"] == true {
            assert_eq!(s["ready"], false);
            // The stored position never passed what was written.
            let applied = s["denylist"]["token"].as_u64().unwrap();
            let position = s["partitions"][0]["position"].as_i64();
            assert!(applied < N, "the disk filled before all landed: {applied}");
            assert!(
                position.is_none_or(|p| p as u64 <= applied),
                "position {position:?} ran ahead of {applied} applied entries"
            );
            // No active answers while revsync cannot vouch for its denylist, and the
            // process says its store is failing (one daemon answers all of these
            // unless it exits in between, when they are asked of the next).
            let answer: Value = client
                .post(daemon.url("/v1/check"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let health = get!("/healthz");
            let metrics = get!("/metrics").text().await.unwrap();
            if answer["reason"] == "stale" && health.status() == 503 {
                assert_eq!(answer["active"], false, "{answer}");
                assert!(
                    metrics.lines().any(|l| l == "revsync_store_failing 1"),
                    "{metrics}"
                );
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never reported failing: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Space returns: revsync recovers and reads on.
    remount(&disk, "size=512m");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s: Value = get!("/v1/status").json().await.unwrap();
        if s["ready"] == true && s["denylist"]["token"] == N {
            assert_eq!(s["partitions"][0]["position"], N, "{s}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered after the disk was grown ({restarts} restarts): {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get!("/healthz").status(), 200);
    let metrics = get!("/metrics").text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "revsync_store_failing 0"),
        "{metrics}"
    );
    println!("recovered with {restarts} supervisor restarts");
    assert_eq!(daemon.terminate(Duration::from_secs(30)), Some(0));
    let d = revsync::denylist::Denylist::open(
        &disk.join("store"),
        1 << 20,
        revsync::denylist::Retention::new(Duration::from_secs(86400), Duration::ZERO),
    )
    .unwrap();
    assert_eq!(d.sizes().token, N);
    assert_eq!(d.entries().unwrap().len() as u64, N);
}

fn remount(path: &Path, options: &str) {
    let ok = Command::new("mount")
        .args(["-o", &format!("remount,{options}")])
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "remount {options} {}", path.display());
}

#[test]
fn an_unwritable_store_at_start_is_a_clear_error() {
    let broker = Broker::memory();
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    let _fs = Tmpfs::mount(&ro, "1m");
    // Nothing is open on it yet, so it can turn read-only.
    remount(&ro, "ro");
    let port = common::broker::free_port();
    let config = common::daemon::DaemonConfig {
        store: ro.join("store"),
        ..common::daemon::DaemonConfig::new(port, dir.path(), &broker, "rev")
    }
    .write(&dir.path().join("revsync.toml"));
    let out = Command::new(env!("CARGO_BIN_EXE_revsync"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on a read-only store: {stderr}"
    );
    assert!(
        stderr.contains(&ro.join("store").display().to_string())
            && stderr.to_lowercase().contains("read-only"),
        "the error names the store and the cause: {stderr}"
    );
}

/// The disk fills under a running daemon, then space is freed and the daemon is killed
/// (as a supervisor would restart it): restarted, revsync re-reads what it could not
/// write and loses nothing. Once failed this used to come back ready with position 60000
/// and 55851 token entries: sled 0.34 had landed part of a batch, positions included,
/// before the disk filled (a batch is written key by key in hash order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_full_disk_is_grown_a_restart_loses_nothing() {
    use common::daemon::{Daemon, DaemonConfig};
    // Restarted mid-stream, the daemon resumes inside a record batch: see Broker::sqlite.
    let log = tempfile::tempdir().unwrap();
    let broker = Broker::sqlite(log.path());
    broker.create_topic("rev", 1);
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let _fs = Tmpfs::mount(&disk, "12m");
    let port = common::broker::free_port();
    let config = DaemonConfig {
        store: disk.join("store"),
        ..DaemonConfig::new(port, dir.path(), &broker, "rev").trusting(&jwks, "api")
    }
    .toml()
    .replace("[store]\n", "[store]\ncache_bytes = 1048576\n");
    let config = {
        let path = dir.path().join("revsync.toml");
        std::fs::write(&path, config).unwrap();
        path
    };
    // A hung daemon fails the test instead of hanging it.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let status = |daemon: &Daemon| {
        let client = client.clone();
        let url = daemon.url("/v1/status");
        async move {
            let v: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            v
        }
    };
    let mut daemon = Daemon::spawn(&config, port);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while status(&daemon).await["ready"] != true {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    const N: usize = 60_000;
    publish_bulky(&broker, N).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&daemon).await;
        if s["freshness"]["store_failing"] == true {
            assert_eq!(s["ready"], false);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never reported failing: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Space freed (the volume grown), the daemon restarted by its supervisor.
    remount(&disk, "size=512m");
    daemon.kill9();
    let daemon = Daemon::spawn(&config, port);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(&daemon).await;
        if s["ready"] == true && s["denylist"]["token"] == N {
            assert_eq!(s["partitions"][0]["position"], N, "{s}");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            drop(daemon);
            let d = revsync::denylist::Denylist::open(
                &disk.join("store"),
                1 << 20,
                revsync::denylist::Retention::new(Duration::from_secs(86400), Duration::ZERO),
            )
            .unwrap();
            let real = d.entries().unwrap().len();
            panic!("revocations lost across the full disk: {s}; entries actually stored: {real}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
