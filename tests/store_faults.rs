//! Store failures injected at random points (sled's own failpoints, compiled in for
//! tests: a write-out of the log fails as on a full disk), followed by a crash and a
//! restart, many times over random event streams. After every restart:
//! - every event below each stored position is in the store (invariant 2: a durable
//!   position is never ahead of durable data), by the tree and by the index;
//! - the live-entry counts match the entries stored;
//! - the index answers like the tree, and every entry is listed in the expiry log
//!   (else GC would never drop it).
//!
//! The reader here is the test's own: it reads each partition from the stored position
//! on, as `ingest` does, so the assertions do not depend on the product's reader.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;
use revsync::denylist::{Denylist, Position, Retention, TokenRef};
use revsync::event::{Event, Revocation};

/// sled's failpoints are process-wide: one test at a time.
static FAILPOINTS: Mutex<()> = Mutex::new(());

const LIFETIME: u64 = 3600;
const NOW: u64 = 1_800_000_000;
const PARTITIONS: i32 = 2;
const TOPIC: &str = "rev";

/// The write-outs sled can be told to fail (see sled 0.34's `io_fail!` sites): the
/// log buffer write itself, and the moment after it (written, but reported failed).
const FAILPOINT_NAMES: [&str; 2] = ["buffer write", "buffer write post"];

fn retention() -> Retention {
    Retention::new(Duration::from_secs(LIFETIME), Duration::ZERO)
        .with_expiry_granularity(Duration::from_secs(60))
}

/// Opens the store, as a restarted process would. sled lets go of its directory lock
/// from background threads a moment after the old handle is dropped (sled's own tests
/// wait for it too), so this tries again for a while; the product's reopen does the
/// same with a backoff.
fn open(dir: &Path) -> Denylist {
    let started = std::time::Instant::now();
    loop {
        match Denylist::open(dir, 1 << 20, retention()) {
            Ok(d) => return d,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                assert!(e.to_string().contains("lock"), "cannot open: {e}");
                std::thread::yield_now();
            }
            Err(e) => panic!("the store does not open after a failure: {e}"),
        }
    }
}

/// [`Denylist::reopen`], tried again while the old handle's lock is let go.
fn reopen(d: &Denylist, context: &str) {
    let started = std::time::Instant::now();
    while let Err(e) = d.reopen() {
        assert!(
            e.to_string().contains("lock") && started.elapsed() < Duration::from_secs(30),
            "{context}: reopen: {e}"
        );
        std::thread::yield_now();
    }
}

/// A token of issuer `iss` that `event` revokes: without `iat`, so every not_before
/// rule covers it whatever the exact comparison.
fn victim(event: &Event) -> TokenRef<'_> {
    let mut t = TokenRef {
        iss: event.revocation.iss(),
        ..Default::default()
    };
    match &event.revocation {
        Revocation::Token { jti, .. } => t.jti = Some(jti),
        Revocation::Subject { sub, .. } => t.sub = Some(sub),
        Revocation::Session { sid, .. } => t.sid = Some(sid),
        Revocation::Client { client_id, .. } => t.client_id = Some(client_id),
        Revocation::Issuer { .. } => {}
    }
    t
}

fn arb_event() -> impl Strategy<Value = Event> {
    // Long identifiers make batches span several log buffers, so a failure can land
    // in the middle of one.
    let id = "[a-f]{1,3}".prop_map(|s| format!("{s:>120}"));
    let iss = "[AB]";
    let r = prop_oneof![
        (iss, id.clone(), proptest::option::of(1u64..LIFETIME)).prop_map(|(iss, jti, exp)| {
            Revocation::Token {
                iss: iss.to_string(),
                jti,
                exp: exp.map(|e| NOW + e),
            }
        }),
        (iss, id.clone(), 0u64..100).prop_map(|(iss, sub, nb)| Revocation::Subject {
            iss: iss.to_string(),
            sub,
            not_before: NOW - nb,
        }),
        (iss, id.clone()).prop_map(|(iss, sid)| Revocation::Session {
            iss: iss.to_string(),
            sid
        }),
        (iss, id, 0u64..100).prop_map(|(iss, client_id, nb)| Revocation::Client {
            iss: iss.to_string(),
            client_id,
            not_before: NOW - nb,
        }),
        (iss, 0u64..100).prop_map(|(iss, nb)| Revocation::Issuer {
            iss: iss.to_string(),
            not_before: NOW - nb,
        }),
    ];
    (r, 0u64..100).prop_map(|(revocation, age)| Event {
        id: "e".into(),
        event_time: NOW - age,
        revocation,
        reason: None,
    })
}

/// One step of the test's reader.
#[derive(Debug, Clone)]
struct Step {
    partition: i32,
    batch: usize,
    /// Arm a failpoint before this write: (which, after how many evaluations).
    fail: Option<(usize, u32)>,
}

fn arb_step() -> impl Strategy<Value = Step> {
    (
        0..PARTITIONS,
        1usize..40,
        proptest::option::weighted(0.3, (0usize..FAILPOINT_NAMES.len(), 0u32..4)),
    )
        .prop_map(|(partition, batch, fail)| Step {
            partition,
            batch,
            fail,
        })
}

fn stored_positions(d: &Denylist) -> BTreeMap<i32, usize> {
    d.positions()
        .unwrap()
        .into_iter()
        .filter(|p| p.topic == TOPIC)
        .map(|p| (p.partition, p.next_offset as usize))
        .collect()
}

/// Everything the store must hold given its stored positions.
fn assert_consistent(d: &Denylist, logs: &[Vec<Event>], context: &str) {
    let positions = stored_positions(d);
    let entries = d.entries().unwrap();
    for (partition, log) in logs.iter().enumerate() {
        let pos = positions.get(&(partition as i32)).copied().unwrap_or(0);
        assert!(pos <= log.len(), "{context}: position {pos} beyond the log");
        for (offset, event) in log[..pos].iter().enumerate() {
            assert!(
                d.revoked_by(&victim(event)).unwrap().is_some(),
                "{context}: partition {partition} offset {offset} is below the stored position {pos} but not in the index: {event:?}"
            );
            let kind = event.revocation.kind();
            let id = victim(event);
            let id = id.jti.or(id.sub).or(id.sid).or(id.client_id).unwrap_or("");
            assert!(
                entries
                    .iter()
                    .any(|e| e.kind == kind && e.iss == event.revocation.iss() && e.id == id),
                "{context}: partition {partition} offset {offset} below position {pos} is not stored"
            );
        }
    }
    let sizes = d.sizes();
    let count = |kind: &str| entries.iter().filter(|e| e.kind == kind).count() as u64;
    assert_eq!(
        (
            sizes.token,
            sizes.subject,
            sizes.session,
            sizes.client,
            sizes.issuer
        ),
        (
            count("token"),
            count("subject"),
            count("session"),
            count("client"),
            count("issuer")
        ),
        "{context}: counts differ from the entries stored"
    );
    // The index answers like the tree for every stored entry.
    for e in &entries {
        let t = TokenRef {
            iss: &e.iss,
            jti: (e.kind == "token").then_some(e.id.as_str()),
            sub: (e.kind == "subject").then_some(e.id.as_str()),
            sid: (e.kind == "session").then_some(e.id.as_str()),
            client_id: (e.kind == "client").then_some(e.id.as_str()),
            iat: None,
        };
        assert!(
            d.revoked_by(&t).unwrap().is_some(),
            "{context}: stored entry missing from the index: {e:?}"
        );
    }
    let unlisted = d.unlisted_entries().unwrap();
    assert!(
        unlisted.is_empty(),
        "{context}: entries no expiry-log record lists: {unlisted:?}"
    );
}

/// Runs the reader over `logs`, failing writes where `steps` say, crashing (dropping
/// the store) or reopening in place after each failure. Returns how many failures were
/// injected and seen.
fn run(dir: &Path, logs: &[Vec<Event>], steps: &[Step], reopen_in_place: bool) -> usize {
    let mut d = open(dir);
    let mut failures = 0;
    for (i, step) in steps.iter().enumerate() {
        let log = &logs[step.partition as usize];
        let from = stored_positions(&d)
            .get(&step.partition)
            .copied()
            .unwrap_or(0);
        // The reader's own position can be ahead of the stored one (positions are
        // written after the flush and may be lost); it reads on from the stored one
        // only after a restart, which is the harder case, so use that.
        let to = (from + step.batch).min(log.len());
        if from == to {
            continue;
        }
        if let Some((which, after)) = step.fail {
            sled::fail::set(FAILPOINT_NAMES[which], 1 << after);
        }
        let result = d.apply(
            &log[from..to],
            &[Position {
                topic: TOPIC.into(),
                partition: step.partition,
                next_offset: to as i64,
            }],
            NOW,
        );
        sled::fail::reset();
        if result.is_ok() {
            continue;
        }
        failures += 1;
        assert!(
            d.failure().is_some(),
            "a failed write marks the store failed"
        );
        assert!(
            d.apply(&log[from..to], &[], NOW).is_err(),
            "no write is taken until the store is reopened"
        );
        let context = format!("step {i} (failure {failures}, reopen_in_place {reopen_in_place})");
        if reopen_in_place {
            reopen(&d, &context);
        } else {
            drop(d);
            d = open(dir);
        }
        assert!(d.failure().is_none());
        assert_consistent(&d, logs, &context);
    }
    // Read everything that is left, then everything must be there. A write-out armed
    // for the last step may fail after that write returned, in sled's background
    // flusher: its error shows on the next write, which the store then reopens for.
    for (partition, log) in logs.iter().enumerate() {
        loop {
            let from = stored_positions(&d)
                .get(&(partition as i32))
                .copied()
                .unwrap_or(0);
            let result = d.apply(
                &log[from..],
                &[Position {
                    topic: TOPIC.into(),
                    partition: partition as i32,
                    next_offset: log.len() as i64,
                }],
                NOW,
            );
            if result.is_ok() {
                break;
            }
            failures += 1;
            reopen(&d, "reading what is left");
            assert_consistent(&d, logs, "reopened while reading what is left");
        }
    }
    assert_consistent(&d, logs, "after reading everything");
    drop(d);
    assert_consistent(&open(dir), logs, "after reading everything and reopening");
    failures
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn failed_writes_never_leave_a_position_ahead_of_its_data(
        logs in proptest::collection::vec(
            proptest::collection::vec(arb_event(), 50..200),
            PARTITIONS as usize,
        ),
        steps in proptest::collection::vec(arb_step(), 10..60),
        reopen_in_place in any::<bool>(),
    ) {
        let _one = FAILPOINTS.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), &logs, &steps, reopen_in_place);
    }
}

/// The injection really injects: a fixed stream with a failure armed on every write
/// sees failures (a property that never fails a write would prove nothing).
#[test]
fn failpoints_fail_writes() {
    let _one = FAILPOINTS.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let log: Vec<Event> = (0..300)
        .map(|i| Event {
            id: format!("e{i}"),
            event_time: NOW,
            revocation: Revocation::Token {
                iss: "A".into(),
                jti: format!("{i:0>150}"),
                exp: Some(NOW + 600),
            },
            reason: None,
        })
        .collect();
    let logs = vec![log, Vec::new()];
    let steps: Vec<Step> = (0..20)
        .map(|i| Step {
            partition: 0,
            batch: 25,
            fail: Some((i % 2, 0)),
        })
        .collect();
    let failures = run(dir.path(), &logs, &steps, false);
    assert!(failures >= 10, "only {failures} of 20 armed writes failed");
}
