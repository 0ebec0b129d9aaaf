//! A transactional publisher: its records are applied and revsync reports itself caught
//! up. Transaction markers (commit and abort) take offsets of their own that the
//! consumer never delivers, so a position of "last record + 1" would stay below the high
//! watermark forever and, under `on_stale = "deny"`, every check would be denied.
//!
//! Tansu 0.6 refuses EndTxn, so this runs on librdkafka's own mock cluster
//! (`rdkafka::mocking::MockCluster`), which takes transactional producers but does not
//! write markers itself: the test appends each marker as the real broker's transaction
//! coordinator would, a control record batch sent with a plain Produce request.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::jwt::{claims_with, now, JwksServer, TestKey};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use revsync::app::{self, Listener};
use revsync::config::{Config, TopicConfig};
use revsync::event::{encode_native, Event, Revocation};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "rev";
const AUD: &str = "https://api.example.com";

/// CRC-32C (Castagnoli), as record batches carry it.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zigzag varint, as record fields are encoded.
fn varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A v2 record batch holding one control record: the marker a transaction coordinator
/// writes when a transaction of `producer_id` commits (`commit`) or aborts.
fn marker_batch(producer_id: i64, epoch: i16, commit: bool) -> Vec<u8> {
    let mut record = Vec::new();
    record.push(0); // attributes
    varint(&mut record, 0); // timestamp delta
    varint(&mut record, 0); // offset delta
    let key = [0u8, 0, 0, u8::from(commit)]; // version 0, type 0 = abort, 1 = commit
    varint(&mut record, key.len() as i64);
    record.extend_from_slice(&key);
    let value = [0u8, 0, 0, 0, 0, 0]; // version 0, coordinator epoch 0
    varint(&mut record, value.len() as i64);
    record.extend_from_slice(&value);
    varint(&mut record, 0); // headers
    let mut body = Vec::new(); // from attributes on: what the CRC covers
    body.extend_from_slice(&0x30i16.to_be_bytes()); // control | transactional
    body.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
    let ts = revsync::unix_now_ms() as i64;
    body.extend_from_slice(&ts.to_be_bytes());
    body.extend_from_slice(&ts.to_be_bytes());
    body.extend_from_slice(&producer_id.to_be_bytes());
    body.extend_from_slice(&epoch.to_be_bytes());
    body.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    body.extend_from_slice(&1i32.to_be_bytes()); // records
    varint(&mut body, record.len() as i64);
    body.extend_from_slice(&record);
    let mut batch = Vec::new();
    batch.extend_from_slice(&0i64.to_be_bytes()); // base offset (the broker assigns it)
    batch.extend_from_slice(&((4 + 1 + 4 + body.len()) as i32).to_be_bytes());
    batch.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&crc32c(&body).to_be_bytes());
    batch.extend_from_slice(&body);
    batch
}

/// Appends `batch` to `topic`/0 with a Produce v3 request; the offset it was given.
fn produce_raw(bootstrap: &str, topic: &str, batch: &[u8]) -> i64 {
    let addr = bootstrap.split(',').next().unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(&0i16.to_be_bytes()); // Produce
    req.extend_from_slice(&3i16.to_be_bytes()); // v3
    req.extend_from_slice(&7i32.to_be_bytes()); // correlation id
    req.extend_from_slice(&4i16.to_be_bytes());
    req.extend_from_slice(b"test");
    req.extend_from_slice(&(-1i16).to_be_bytes()); // no transactional id
    req.extend_from_slice(&(-1i16).to_be_bytes()); // acks = all
    req.extend_from_slice(&10_000i32.to_be_bytes());
    req.extend_from_slice(&1i32.to_be_bytes()); // one topic
    req.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    req.extend_from_slice(topic.as_bytes());
    req.extend_from_slice(&1i32.to_be_bytes()); // one partition
    req.extend_from_slice(&0i32.to_be_bytes());
    req.extend_from_slice(&(batch.len() as i32).to_be_bytes());
    req.extend_from_slice(batch);
    s.write_all(&(req.len() as i32).to_be_bytes()).unwrap();
    s.write_all(&req).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut resp = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut resp).unwrap();
    // correlation id, topics [name, partitions [partition, error, base offset, …]]
    let mut at = 4 + 4;
    let name_len = i16::from_be_bytes([resp[at], resp[at + 1]]) as usize;
    at += 2 + name_len + 4 + 4;
    let error = i16::from_be_bytes([resp[at], resp[at + 1]]);
    assert_eq!(error, 0, "the mock broker refused the marker");
    at += 2;
    i64::from_be_bytes(resp[at..at + 8].try_into().unwrap())
}

fn subject_event(iss: &str, sub: &str) -> String {
    encode_native(&Event {
        id: format!("e-{sub}"),
        event_time: now(),
        revocation: Revocation::Subject {
            iss: iss.into(),
            sub: sub.into(),
            not_before: now(),
        },
        reason: None,
    })
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_publisher_is_applied_and_revsync_catches_up() {
    let key = TestKey::ec_p256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let iss = jwks.issuer();
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("transactional.id", "revsync-test-publisher")
        .create()
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    let send_in_transaction = |subs: &[&str], commit: bool| {
        producer.begin_transaction().unwrap();
        for sub in subs {
            producer
                .send(
                    BaseRecord::to(TOPIC)
                        .key(*sub)
                        .payload(&subject_event(&iss, sub)),
                )
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        if commit {
            producer
                .commit_transaction(Duration::from_secs(30))
                .unwrap();
        } else {
            producer.abort_transaction(Duration::from_secs(30)).unwrap();
        }
    };

    // revsync reads the topic; deny when stale (the default), so a revsync that can
    // never catch up would deny every token.
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(bootstrap.clone(), dir.path().join("store"));
    config.kafka.topics = vec![TopicConfig {
        name: TOPIC.into(),
        format: Default::default(),
        issuer: None,
    }];
    config.kafka.watermark_interval = Duration::from_millis(100);
    config.freshness.max_staleness = Duration::from_secs(2);
    config.issuers.push(jwks.issuer_config(AUD));
    let listener = Listener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.describe());
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(app::run(config, listener, stop.clone()));
    let http = reqwest::Client::new();

    let token = |sub: &str| {
        key.sign(&claims_with(
            &iss,
            AUD,
            json!({"sub": sub, "iat": now() - 60}),
        ))
    };
    let check = |token: String| {
        let http = http.clone();
        let url = format!("{base}/v1/check");
        async move {
            http.post(url)
                .json(&json!({ "token": token }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };

    // Two committed transactions, each followed by its marker, then one aborted.
    let mut markers = Vec::new();
    for (subs, commit) in [
        (&["alice", "bob"][..], true),
        (&["carol"][..], true),
        (&["dave"][..], false),
    ] {
        tokio::task::block_in_place(|| send_in_transaction(subs, commit));
        markers.push(produce_raw(&bootstrap, TOPIC, &marker_batch(1, 0, commit)));
    }
    assert_eq!(markers, vec![2, 4, 6], "markers take offsets of their own");

    // Caught up past the last marker: ready, and the committed revocations apply.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let (ready, _) = get(&http, &format!("{base}/readyz")).await;
        let (_, status) = get(&http, &format!("{base}/v1/status")).await;
        if ready == 200 && status["partitions"][0]["position"] == 7 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "never caught up past the transaction markers: /readyz {ready}, {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["partitions"][0]["lag"], 0, "{status}");
    for sub in ["alice", "bob", "carol"] {
        assert_eq!(
            check(token(sub)).await,
            json!({"active": false, "reason": "revoked"}),
            "{sub}"
        );
    }
    // Read uncommitted (README, "Transactions"): a revocation in an aborted
    // transaction was applied as it was written; it only ever revokes more.
    assert_eq!(check(token("dave")).await["reason"], "revoked");
    // And stays fresh: every check of an unrevoked subject is answered, not denied.
    let fresh = check(token("erin")).await;
    assert_eq!(fresh["active"], true, "{fresh}");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), daemon)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
}
