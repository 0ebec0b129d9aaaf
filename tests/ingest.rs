//! The ingest path against a real Kafka-protocol broker (Tansu): events of every type
//! reach the denylist, positions survive restarts and crashes, poison is skipped,
//! and partitions appearing later are read.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::broker::{eventually, Broker};
use common::daemon::{Daemon, DaemonConfig};
use common::ingest::Ingesting;
use revsync::config::{KafkaConfig, TopicConfig};
use revsync::denylist::{Denylist, Retention, TokenRef};
use revsync::event::{Event, Revocation};
use revsync::metrics::{MalformedLabels, TopicLabels};
use revsync::publish::Publisher;

const WAIT: Duration = Duration::from_secs(60);

fn kafka(broker: &Broker, topics: &[&str]) -> KafkaConfig {
    let mut k = KafkaConfig::new(broker.bootstrap());
    k.topics = topics
        .iter()
        .map(|t| TopicConfig {
            name: t.to_string(),
            format: Default::default(),
            issuer: None,
        })
        .collect();
    k.watermark_interval = Duration::from_millis(200);
    k.metadata_interval = Duration::from_millis(500);
    k
}

fn retention() -> Retention {
    Retention::new(Duration::from_secs(86400), Duration::from_secs(30))
}

impl Ingesting {
    /// An in-process ingest (tests/common/ingest.rs) over a store in `dir`.
    fn start(kafka: &KafkaConfig, dir: &Path) -> Self {
        Self::start_with(kafka, dir, retention(), None)
    }

    fn applied(&self, topic: &str) -> u64 {
        self.metrics
            .events_applied
            .get_or_create(&TopicLabels {
                topic: topic.into(),
                format: "native",
            })
            .get()
    }

    fn position_sum(&self) -> i64 {
        self.denylist
            .positions()
            .unwrap()
            .iter()
            .map(|p| p.next_offset)
            .sum()
    }
}

fn ev(revocation: Revocation) -> Event {
    Event {
        id: revsync::publish::new_event_id(),
        event_time: revsync::unix_now(),
        revocation,
        reason: None,
    }
}

fn publish(broker: &Broker, topic: &str, events: &[Event]) {
    let p = Publisher::new(&KafkaConfig::new(broker.bootstrap()), topic).unwrap();
    for e in events {
        p.send(e).unwrap();
    }
    p.finish(Duration::from_secs(30)).unwrap();
}

fn token_events(iss: &str, prefix: &str, n: usize) -> Vec<Event> {
    let exp = revsync::unix_now() + 3600;
    (0..n)
        .map(|i| {
            ev(Revocation::Token {
                iss: iss.into(),
                jti: format!("{prefix}{i}"),
                exp: Some(exp),
            })
        })
        .collect()
}

#[test]
fn events_of_every_type_reach_the_denylist_and_decide_correctly() {
    let broker = Broker::memory();
    broker.create_topic("rev", 3);
    let dir = tempfile::tempdir().unwrap();
    let ing = Ingesting::start(&kafka(&broker, &["rev"]), dir.path());

    let n = 100;
    let now = revsync::unix_now();
    let mut events = Vec::new();
    for i in 0..n {
        events.push(ev(Revocation::Token {
            iss: "A".into(),
            jti: format!("j{i}"),
            exp: Some(now + 3600),
        }));
        events.push(ev(Revocation::Subject {
            iss: "A".into(),
            sub: format!("s{i}"),
            not_before: now,
        }));
        events.push(ev(Revocation::Session {
            iss: "A".into(),
            sid: format!("x{i}"),
        }));
        events.push(ev(Revocation::Client {
            iss: "A".into(),
            client_id: format!("c{i}"),
            not_before: now,
        }));
    }
    events.push(ev(Revocation::Issuer {
        iss: "B".into(),
        not_before: now,
    }));
    publish(&broker, "rev", &events);

    eventually(WAIT, "every event applied", || {
        (ing.denylist.sizes().total() == 4 * n as u64 + 1).then_some(())
    });
    let sizes = ing.denylist.sizes();
    assert_eq!(
        (
            sizes.token,
            sizes.subject,
            sizes.session,
            sizes.client,
            sizes.issuer
        ),
        (100, 100, 100, 100, 1)
    );
    assert_eq!(ing.applied("rev"), events.len() as u64);

    let d = &ing.denylist;
    let clean = TokenRef {
        iss: "A",
        jti: Some("other"),
        sub: Some("other"),
        sid: Some("other"),
        client_id: Some("other"),
        iat: Some(now - 10),
    };
    for i in (0..n).step_by(7) {
        let (j, s, x, c) = (
            format!("j{i}"),
            format!("s{i}"),
            format!("x{i}"),
            format!("c{i}"),
        );
        assert_eq!(
            d.revoked_by(&TokenRef {
                jti: Some(&j),
                ..clean
            })
            .unwrap(),
            Some("token")
        );
        assert_eq!(
            d.revoked_by(&TokenRef {
                sid: Some(&x),
                ..clean
            })
            .unwrap(),
            Some("session")
        );
        assert_eq!(
            d.revoked_by(&TokenRef {
                sub: Some(&s),
                ..clean
            })
            .unwrap(),
            Some("subject")
        );
        assert_eq!(
            d.revoked_by(&TokenRef {
                client_id: Some(&c),
                ..clean
            })
            .unwrap(),
            Some("client")
        );
        // Tokens issued after not_before survive subject and client revocations (one
        // issued in its second, iat == not_before, is revoked).
        let fresh = TokenRef {
            sub: Some(&s),
            client_id: Some(&c),
            iat: Some(now + 1),
            ..clean
        };
        assert_eq!(d.revoked_by(&fresh).unwrap(), None);
        // The same identifiers under another issuer are untouched.
        let other = TokenRef {
            iss: "C",
            jti: Some(&j),
            sub: Some(&s),
            sid: Some(&x),
            client_id: Some(&c),
            iat: Some(now - 10),
        };
        assert_eq!(d.revoked_by(&other).unwrap(), None);
    }
    assert_eq!(d.revoked_by(&clean).unwrap(), None);
    assert_eq!(
        d.revoked_by(&TokenRef { iss: "B", ..clean }).unwrap(),
        Some("issuer")
    );
    assert_eq!(
        d.revoked_by(&TokenRef {
            iss: "B",
            iat: Some(now + 1),
            ..clean
        })
        .unwrap(),
        None
    );

    // Lag is known and reaches zero; catch-up is confirmed.
    eventually(WAIT, "caught up", || ing.state.caught_up_at_ms());
    let parts = ing.state.partitions();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|p| p.state.lag == Some(0)), "{parts:?}");
    ing.stop();
}

#[test]
fn restart_resumes_from_stored_positions_without_rereading() {
    let broker = Broker::memory();
    broker.create_topic("rev", 2);
    let dir = tempfile::tempdir().unwrap();
    let k = kafka(&broker, &["rev"]);

    let ing = Ingesting::start(&k, dir.path());
    publish(&broker, "rev", &token_events("A", "first-", 150));
    eventually(WAIT, "first batch", || {
        (ing.denylist.sizes().token == 150).then_some(())
    });
    eventually(WAIT, "positions stored", || {
        (ing.position_sum() == 150).then_some(())
    });
    ing.stop();

    // Published while revsync is down.
    publish(&broker, "rev", &token_events("A", "second-", 70));

    let ing = Ingesting::start(&k, dir.path());
    eventually(WAIT, "second batch", || {
        (ing.denylist.sizes().token == 220).then_some(())
    });
    eventually(WAIT, "positions", || {
        (ing.position_sum() == 220).then_some(())
    });
    // Only the events published while down were read again: nothing re-read.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ing.applied("rev"), 70);
    for i in [0, 149] {
        let j = format!("first-{i}");
        assert_eq!(
            ing.denylist
                .revoked_by(&TokenRef {
                    iss: "A",
                    jti: Some(&j),
                    ..Default::default()
                })
                .unwrap(),
            Some("token")
        );
    }
    ing.stop();
}

#[test]
fn poison_records_are_skipped_counted_and_do_not_stall_the_partition() {
    let broker = Broker::memory();
    broker.create_topic("rev", 1);
    let dir = tempfile::tempdir().unwrap();
    let ing = Ingesting::start(&kafka(&broker, &["rev"]), dir.path());

    let p = Publisher::new(&KafkaConfig::new(broker.bootstrap()), "rev").unwrap();
    let good = token_events("A", "g", 60);
    let big = format!("{{\"v\":1,\"pad\":\"{}\"}}", "x".repeat(70_000));
    let poison: [&[u8]; 5] = [
        b"not json",
        b"",
        br#"{"v":1,"id":"e","type":"token","iss":"A","event_time":1}"#,
        br#"{"v":9,"id":"e","type":"token","iss":"A","jti":"j","event_time":1}"#,
        big.as_bytes(),
    ];
    for (i, e) in good.iter().enumerate() {
        p.send(e).unwrap();
        if i % 4 == 0 {
            p.send_raw("A\nx", poison[(i / 4) % poison.len()]).unwrap();
        }
    }
    // The last record of the partition is poison too: the position must still pass it.
    p.send_raw("A\nx", b"{]").unwrap();
    p.finish(Duration::from_secs(30)).unwrap();

    eventually(WAIT, "good events applied", || {
        (ing.denylist.sizes().token == 60).then_some(())
    });
    eventually(WAIT, "position past the last poison record", || {
        (ing.position_sum() == 60 + 15 + 1).then_some(())
    });
    let count = |reason| {
        ing.metrics
            .events_malformed
            .get_or_create(&MalformedLabels {
                topic: "rev".into(),
                format: "native",
                reason,
            })
            .get()
    };
    assert_eq!(count("not_json"), 3 + 1);
    assert_eq!(count("empty"), 3);
    assert_eq!(count("missing_field"), 3);
    assert_eq!(count("unsupported_version"), 3);
    assert_eq!(count("too_large"), 3);
    assert_eq!(ing.applied("rev"), 60);
    eventually(WAIT, "caught up despite poison", || {
        ing.state.caught_up_at_ms()
    });
    ing.stop();
}

#[test]
fn partitions_of_many_topics_and_topics_created_later_are_all_read() {
    let broker = Broker::memory();
    broker.create_topic("first", 4);
    let dir = tempfile::tempdir().unwrap();
    let ing = Ingesting::start(&kafka(&broker, &["first", "later"]), dir.path());

    publish(&broker, "first", &token_events("A", "f", 200));
    eventually(WAIT, "first topic", || {
        (ing.denylist.sizes().token == 200).then_some(())
    });
    let per_partition: HashMap<i32, i64> = ing
        .denylist
        .positions()
        .unwrap()
        .into_iter()
        .map(|p| (p.partition, p.next_offset))
        .collect();
    assert_eq!(
        per_partition.len(),
        4,
        "records spread over every partition: {per_partition:?}"
    );
    assert!(
        ing.state.caught_up_at_ms().is_none(),
        "not caught up while a configured topic is missing"
    );

    // A topic (and so its partitions) appearing while revsync runs is picked up.
    broker.create_topic("later", 3);
    publish(&broker, "later", &token_events("A", "l", 90));
    eventually(WAIT, "later topic", || {
        (ing.denylist.sizes().token == 290).then_some(())
    });
    eventually(WAIT, "caught up", || ing.state.caught_up_at_ms());
    assert_eq!(ing.state.partitions().len(), 7);
    ing.stop();
}

fn status(daemon: &Daemon) -> Option<serde_json::Value> {
    common::broker::get_json(&daemon.url("/v1/status"))
}

#[test]
fn kill_9_during_a_large_stream_loses_nothing() {
    // Killed mid-stream, the daemon resumes inside a record batch: see Broker::sqlite.
    let log = tempfile::tempdir().unwrap();
    let broker = Broker::sqlite(log.path());
    broker.create_topic("rev", 2);
    let dir = tempfile::tempdir().unwrap();
    let port = common::broker::free_port();
    let config = DaemonConfig {
        issuer: "A".into(),
        audience: "api".into(),
        ..DaemonConfig::new(port, dir.path(), &broker, "rev")
    }
    .write(&dir.path().join("revsync.toml"));
    let n = 40_000usize;
    let events = token_events("A", "k", n);

    let mut daemon = Daemon::spawn(&config, port);
    let publisher = {
        let bootstrap = broker.bootstrap();
        let events = events.clone();
        std::thread::spawn(move || {
            let p = Publisher::new(&KafkaConfig::new(bootstrap), "rev").unwrap();
            for e in &events {
                p.send(e).unwrap();
            }
            p.finish(Duration::from_secs(60)).unwrap();
        })
    };
    let applied_before_kill = eventually(WAIT, "part of the stream applied", || {
        let n = status(&daemon)?["denylist"]["token"].as_u64()?;
        (n >= 2_000).then_some(n)
    });
    daemon.kill9();
    publisher.join().unwrap();
    assert!((applied_before_kill as usize) < n, "killed mid-stream");

    let mut daemon = Daemon::spawn(&config, port);
    eventually(
        Duration::from_secs(120),
        "every event after restart",
        || {
            let s = status(&daemon)?;
            (s["denylist"]["token"].as_u64()? == n as u64).then_some(())
        },
    );
    assert_eq!(
        daemon.terminate(Duration::from_secs(20)),
        Some(0),
        "clean exit on SIGTERM"
    );

    let d = Denylist::open(&dir.path().join("store"), 64 << 20, retention()).unwrap();
    for e in &events {
        let Revocation::Token { jti, .. } = &e.revocation else {
            unreachable!()
        };
        assert_eq!(
            d.revoked_by(&TokenRef {
                iss: "A",
                jti: Some(jti),
                ..Default::default()
            })
            .unwrap(),
            Some("token"),
            "{jti} missing after kill -9 and restart"
        );
    }
    assert_eq!(
        d.positions()
            .unwrap()
            .iter()
            .map(|p| p.next_offset)
            .sum::<i64>(),
        n as i64
    );
}

/// A broker that never delivers some offsets inside the log (here Tansu memory://, which
/// loses the rest of a record batch when a fetch starts inside it, as a kill -9 leaves
/// a position) cannot be helped by revsync, but it must show: the offsets are counted.
#[test]
fn offsets_the_broker_never_delivers_are_counted() {
    let broker = Broker::memory();
    broker.create_topic("rev", 1);
    let dir = tempfile::tempdir().unwrap();
    publish(&broker, "rev", &token_events("A", "first-", 300));
    {
        let d = Denylist::open(dir.path(), 64 << 20, retention()).unwrap();
        let inside = revsync::denylist::Position {
            topic: "rev".into(),
            partition: 0,
            next_offset: 150,
        };
        d.apply(&[], &[inside], revsync::unix_now()).unwrap();
        d.flush().unwrap();
    }
    publish(&broker, "rev", &token_events("A", "second-", 10));

    let ing = Ingesting::start(&kafka(&broker, &["rev"]), dir.path());
    eventually(WAIT, "the later batch", || {
        (ing.position_sum() == 310).then_some(())
    });
    let labels = revsync::metrics::PartitionLabels {
        topic: "rev".into(),
        partition: 0,
    };
    let skipped = ing.metrics.skipped_offsets.get_or_create(&labels).get();
    let first_applied = ing.denylist.sizes().token - 10;
    assert_eq!(
        skipped + first_applied,
        150,
        "offsets 150..300 are either applied or counted as skipped"
    );
    assert!(
        skipped > 0,
        "Tansu memory:// delivered from inside a batch: if an upgrade fixed that, this test \
         needs another way to make the broker skip offsets"
    );
}
