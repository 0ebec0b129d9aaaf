//! The Kafka consumer: every partition of every configured topic, assigned by revsync
//! itself (invariant 3: no consumer group splits them between instances), read from the
//! positions kept in sled, decoded, and applied with those positions in one atomic write
//! (invariant 2). Kafka offsets are never committed: the store is the only truth.
//!
//! Two plain threads keep librdkafka's blocking calls off the async runtime:
//! - the *reader* polls messages, decodes them and applies batches;
//! - the *watcher* re-reads topic metadata (partitions added later are handed to the
//!   reader) and fetches high watermarks to measure lag and confirm catch-up.
//!
//! Records are decoded in their topic's configured format ([`decode`]). A record that
//! cannot be verified *yet* (a `set` record whose issuer's signing keys are not
//! available) is never skipped: its partition is *held* — the position stays at that
//! record, the partition is unassigned, and after a backoff it is assigned again at that
//! offset and the record retried — while every other partition keeps flowing. A held
//! partition shows as lag, so catch-up (and with it freshness) waits for it: revsync does
//! not vouch for a denylist that may be missing a revocation (invariant 5).
//!
//! A broker can lose the log under a stored position (memory storage restarted, data
//! lost, topic deleted and recreated): new revocations then get offsets revsync has
//! already passed. Real Kafka answers OFFSET_OUT_OF_RANGE and librdkafka restarts at the
//! earliest offset (the reader notices offsets going back); Tansu answers nothing, so the
//! watcher also judges every partition from its watermarks ([`Watch`]): a high watermark
//! below a position that has not moved is confirmed by reading the log's last records
//! (Tansu's memory engine reports the last batch's base offset + 1, so a lower high
//! watermark alone proves nothing), an empty log by two rounds in a row. A log that ends
//! before the position is read again from its start; a log that starts after it lost
//! revocations revsync never read, which is logged as an error. Either way the reader
//! moves the partition and its stored position to the log start, counts
//! `revsync_ingest_log_resets_total`, and freshness does not vouch until a watermark round
//! begun after the detection is reached.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{EventFormat, KafkaConfig, TopicConfig};
use crate::denylist::{Denylist, Position};
use crate::event::{self, Event, NativeRecord};
use crate::formats::set::SetVerifier;
use crate::formats::{keycloak, Decoded, FormatError};
use crate::metrics::{Metrics, PartitionLabels, TopicLabels};
use crate::{monotonic_ms, unix_now, unix_now_ms};

/// The group id librdkafka needs before it lets a consumer `assign`. revsync never joins
/// the group nor commits to it; positions live in the store.
const ASSIGN_ONLY_GROUP: &str = "revsync-assign-only";
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);
/// The watcher's metadata and watermark calls: short, so a dead broker delays neither
/// the next round nor shutdown by much; a missed round only postpones a confirmation.
const WATCH_TIMEOUT: Duration = Duration::from_secs(2);
/// First wait before reopening a failed store; doubles up to `STORE_RETRY_MAX`.
const STORE_RETRY: Duration = Duration::from_millis(500);
const STORE_RETRY_MAX: Duration = Duration::from_secs(10);
/// Exit status when a failed store cannot be reopened in this process (EX_TEMPFAIL).
pub const STORE_STUCK_EXIT: i32 = 75;
/// First wait before a held partition's record is retried; doubles up to `HOLD_MAX`.
const HOLD_MIN: Duration = Duration::from_millis(500);
const HOLD_MAX: Duration = Duration::from_secs(10);

/// What the reader and watcher know, shared with the HTTP side (status, readiness,
/// freshness).
#[derive(Default)]
pub struct IngestState {
    partitions: RwLock<BTreeMap<(String, i32), PartitionState>>,
    /// When a watermark round began that found every partition read up to its high
    /// watermark ([`crate::monotonic_ms`]); 0 = never. Everything published before then
    /// is applied.
    caught_up_at_ms: AtomicU64,
    /// Set when the store refuses writes: the denylist cannot be trusted to be complete.
    store_failing: AtomicBool,
    /// Newest heartbeat per issuer (unix ms of the record), for `freshness.heartbeat_max_age`.
    heartbeats: RwLock<BTreeMap<String, u64>>,
    /// Watermark rounds not yet reached: when positions pass a round's high watermarks,
    /// everything published before that round began is applied. Under a steady stream
    /// lag is never zero at the moment of a round, yet each round is reached moments
    /// later; confirming them one by one keeps the measured age at the true delay.
    targets: std::sync::Mutex<std::collections::VecDeque<Target>>,
    /// Partitions found with their log reset or truncated under them, and not yet read
    /// up to a watermark round begun after that: while any is here the denylist may be
    /// missing revocations, whatever the age of the last catch-up.
    recovering: std::sync::Mutex<BTreeMap<(String, i32), Recovery>>,
    /// `recovering` is not empty (read on every check, so kept apart from the lock).
    any_recovering: AtomicBool,
}

/// A partition being read again after a log reset.
#[derive(Debug, Clone, Copy)]
struct Recovery {
    /// Unix ms of the watermark round that found the reset (or of the reader noticing).
    since_ms: u64,
    /// The reader moved the partition to the log start (or found it already moved).
    reseeked: bool,
}

/// The high watermarks (and log starts) one watcher round saw, and when it began.
struct Target {
    at_ms: u64,
    marks: Vec<((String, i32), i64, i64)>,
}

/// Rounds kept waiting at most; older ones are dropped (a newer one implies them).
const MAX_TARGETS: usize = 256;

#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionState {
    /// Next offset to read, as applied to the store.
    pub position: Option<i64>,
    pub low_watermark: Option<i64>,
    pub high_watermark: Option<i64>,
    pub lag: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    #[serde(flatten)]
    pub state: PartitionState,
}

impl IngestState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Unix ms of the last confirmed catch-up, if any.
    pub fn caught_up_at_ms(&self) -> Option<u64> {
        match self.caught_up_at_ms.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// Records that everything published before `at_ms` is applied.
    pub fn record_caught_up(&self, at_ms: u64) {
        let before = self.caught_up_at_ms.fetch_max(at_ms, Ordering::AcqRel);
        if before == 0 {
            info!("caught up with every partition");
        }
    }

    /// Records a heartbeat from `iss` sent at `sent_unix_ms` (the producer's clock). It
    /// is kept on the monotonic clock as "now minus its age", the age never below zero:
    /// a heartbeat dated in the future (a publisher's clock ahead) counts as sent now,
    /// else it would keep `heartbeat_max_age` satisfied long after its publisher died.
    pub fn record_heartbeat(&self, iss: &str, sent_unix_ms: u64) {
        let age = unix_now_ms().saturating_sub(sent_unix_ms);
        let at_ms = monotonic_ms().saturating_sub(age);
        let mut map = self.heartbeats.write().unwrap_or_else(|p| p.into_inner());
        let t = map.entry(iss.to_string()).or_insert(0);
        *t = (*t).max(at_ms);
    }

    /// Monotonic ms ([`crate::monotonic_ms`]) of the newest heartbeat from `iss`, if any.
    pub fn last_heartbeat_ms(&self, iss: &str) -> Option<u64> {
        let map = self.heartbeats.read().unwrap_or_else(|p| p.into_inner());
        map.get(iss).copied()
    }

    fn push_target(&self, target: Target) {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.push_back(target);
        while targets.len() > MAX_TARGETS {
            targets.pop_front();
        }
    }

    /// Records a catch-up for the newest watermark round every partition has reached.
    fn confirm_targets(&self) {
        if self.store_failing() {
            return;
        }
        let reached_at = {
            let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
            let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            let mut recovering = self.recovering.lock().unwrap_or_else(|p| p.into_inner());
            let mut reached = None;
            while let Some(t) = targets.front() {
                let all = t.marks.iter().all(|(key, high, low)| {
                    // Not moved to the log start yet: its position counts the lost log.
                    let moved = recovering.get(key).is_none_or(|r| r.reseeked);
                    moved
                        && parts
                            .get(key)
                            .is_some_and(|p| p.position.unwrap_or(0).max(*low) >= *high)
                });
                if !all {
                    break;
                }
                reached = Some(t.at_ms);
                targets.pop_front();
            }
            if let Some(at) = reached {
                recovering.retain(|(topic, partition), r| {
                    let done = r.reseeked && r.since_ms <= at;
                    if done {
                        info!(topic, partition, "read again after a log reset; caught up");
                    }
                    !done
                });
                self.any_recovering
                    .store(!recovering.is_empty(), Ordering::Release);
            }
            reached
        };
        if let Some(at) = reached_at {
            self.record_caught_up(at);
        }
    }

    /// `true` while a partition is being read again after a log reset: the denylist may
    /// be missing revocations however recent the last catch-up.
    pub fn recovering(&self) -> bool {
        self.any_recovering.load(Ordering::Acquire)
    }

    /// A log reset was found at `since_ms` (unix ms): no catch-up counts until a
    /// watermark round begun then is reached. Older rounds are dropped: they may hold
    /// the lost log's watermarks, and a newer round implies them.
    pub(crate) fn begin_recovery(&self, key: &(String, i32), since_ms: u64) {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.retain(|t| t.at_ms >= since_ms);
        let mut recovering = self.recovering.lock().unwrap_or_else(|p| p.into_inner());
        recovering.insert(
            key.clone(),
            Recovery {
                since_ms,
                reseeked: false,
            },
        );
        self.any_recovering.store(true, Ordering::Release);
    }

    /// The reader has moved a recovering partition to its log start.
    fn reseeked(&self, key: &(String, i32)) {
        let mut recovering = self.recovering.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = recovering.get_mut(key) {
            r.reseeked = true;
        }
    }

    /// Partitions a topic no longer has: out of the status, the recovery set and the
    /// watermark rounds still waiting (which could otherwise never be reached).
    fn forget_partitions(&self, keys: &[(String, i32)]) {
        let mut parts = self.partitions.write().unwrap_or_else(|p| p.into_inner());
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let mut recovering = self.recovering.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            parts.remove(key);
            recovering.remove(key);
        }
        self.any_recovering
            .store(!recovering.is_empty(), Ordering::Release);
        for t in targets.iter_mut() {
            t.marks.retain(|(key, _, _)| !keys.contains(key));
        }
    }

    fn position(&self, key: &(String, i32)) -> Option<i64> {
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        parts.get(key).and_then(|p| p.position)
    }

    pub fn store_failing(&self) -> bool {
        self.store_failing.load(Ordering::Acquire)
    }

    /// Sets whether the store refuses writes (the reader sets it while it reopens the
    /// store): the denylist is then stale, and `/healthz` answers 503.
    pub fn set_store_failing(&self, failing: bool) {
        self.store_failing.store(failing, Ordering::Release);
    }

    pub fn partitions(&self) -> Vec<PartitionStatus> {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((topic, partition), state)| PartitionStatus {
                topic: topic.clone(),
                partition: *partition,
                state: state.clone(),
            })
            .collect()
    }

    /// Sets a partition's position to what the store holds (none: read from the start).
    fn replace_position(&self, key: &(String, i32), next: Option<i64>) {
        let mut map = self.partitions.write().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(key.clone()).or_default();
        entry.position = next;
        entry.lag = lag_of(entry);
    }

    fn set_position(&self, topic: &str, partition: i32, next: i64) {
        let mut map = self.partitions.write().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry((topic.to_string(), partition)).or_default();
        entry.position = Some(next);
        entry.lag = lag_of(entry);
    }
}

/// Lag of a partition: what is between the readable start and the high watermark that
/// has not been applied. Never negative: Tansu's in-memory engine reports a high
/// watermark behind the true log end after multi-record batches.
fn lag_of(p: &PartitionState) -> Option<i64> {
    let hw = p.high_watermark?;
    let from = p.position.unwrap_or(0).max(p.low_watermark.unwrap_or(0));
    Some((hw - from).max(0))
}

/// The running consumer threads; `join` after cancelling the shutdown token.
pub struct IngestHandle {
    threads: Vec<JoinHandle<()>>,
}

impl IngestHandle {
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// librdkafka settings for a client of `kafka`.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(kafka);
    c.set("group.id", ASSIGN_ONLY_GROUP)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // A stored position outside the log (truncated under it, or a broker that lost
        // its log) restarts at the earliest offset; the reader notices and warns.
        .set("auto.offset.reset", "earliest")
        .set(
            "fetch.wait.max.ms",
            kafka.fetch_wait_max.as_millis().max(1).to_string(),
        );
    // librdkafka prefetches up to 100k records / 64 MiB per partition by default; the
    // reader applies at most `batch_max` at a time, so a burst (a broker catching up, a
    // replay) would sit in that queue and in RSS. A few batches ahead keep the reader
    // busy; an explicit property still wins.
    for (key, value) in CONSUMER_QUEUE_DEFAULTS {
        if !kafka.properties.contains_key(*key) {
            c.set(*key, *value);
        }
    }
    c
}

/// Prefetch bounds per partition (see [`consumer_config`]).
const CONSUMER_QUEUE_DEFAULTS: &[(&str, &str)] = &[
    ("queued.min.messages", "20000"),
    ("queued.max.messages.kbytes", "16384"),
    // Default 1000 ms: with a bounded queue, a reader draining it would wait that long
    // for the next fetch (measured: replay of 300k at 20k/s instead of 68k/s).
    ("fetch.queue.backoff.ms", "5"),
    // Every record the broker acknowledged is readable at once, so a watermark round
    // proves everything published before it is applied. Under `read_committed` the
    // consumer stops at the first open transaction (the last stable offset), and a
    // revocation acknowledged after it stays unread until that transaction ends while
    // the reported watermark (the LSO) says revsync is caught up. Records of a
    // transaction that is later aborted are applied too: they only ever revoke more.
    ("isolation.level", "read_uncommitted"),
];

/// Starts the reader and watcher threads, for topics of the `native` and `keycloak`
/// formats (a `set` topic needs [`spawn_with`] and a verifier).
pub fn spawn(
    kafka: &KafkaConfig,
    denylist: Arc<Denylist>,
    metrics: Arc<Metrics>,
    state: Arc<IngestState>,
    shutdown: CancellationToken,
) -> Result<IngestHandle, KafkaError> {
    spawn_with(kafka, denylist, metrics, state, shutdown, None)
}

/// [`spawn`], with the verifier of `set` records (required when a topic has that
/// format: without keys they could never be verified).
pub fn spawn_with(
    kafka: &KafkaConfig,
    denylist: Arc<Denylist>,
    metrics: Arc<Metrics>,
    state: Arc<IngestState>,
    shutdown: CancellationToken,
    sets: Option<SetVerifier>,
) -> Result<IngestHandle, KafkaError> {
    for t in &kafka.topics {
        if t.format == EventFormat::Set && sets.is_none() {
            return Err(KafkaError::ClientCreation(format!(
                "topic {}: format \"set\" needs a SET verifier (the issuers' JWKS)",
                t.name
            )));
        }
        if t.format == EventFormat::Keycloak && t.issuer.is_none() {
            return Err(KafkaError::ClientCreation(format!(
                "topic {}: format \"keycloak\" needs the realm's issuer",
                t.name
            )));
        }
    }
    let reader_consumer: BaseConsumer = consumer_config(kafka).create()?;
    let watcher_consumer: BaseConsumer = consumer_config(kafka).create()?;
    let stored: HashMap<(String, i32), i64> = match denylist.positions() {
        Ok(ps) => ps
            .into_iter()
            .map(|p| ((p.topic, p.partition), p.next_offset))
            .collect(),
        Err(e) => {
            error!(error = %e, "cannot read stored positions");
            HashMap::new()
        }
    };
    for ((topic, partition), next) in &stored {
        state.set_position(topic, *partition, *next);
    }
    let (commands_tx, commands_rx) = mpsc::channel();
    let topics: HashMap<String, TopicConfig> = kafka
        .topics
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    let reader = Reader {
        consumer: reader_consumer,
        topics: topics.clone(),
        denylist,
        metrics: metrics.clone(),
        state: state.clone(),
        shutdown: shutdown.clone(),
        commands: commands_rx,
        stored,
        batch_max: kafka.batch_max,
        expected: HashMap::new(),
        sets,
        holds: Holds::default(),
        store_failures: 0,
    };
    let watcher = Watcher {
        consumer: watcher_consumer,
        topics: kafka.topics.iter().map(|t| t.name.clone()).collect(),
        metrics,
        state,
        shutdown,
        commands: commands_tx,
        known: HashMap::new(),
        watch: HashMap::new(),
        probe_quiet: probe_quiet(kafka.fetch_wait_max),
        watermark_interval: kafka.watermark_interval,
        metadata_interval: kafka.metadata_interval,
    };
    let threads = vec![
        std::thread::Builder::new()
            .name("revsync-reader".into())
            .spawn(move || reader.run())
            .expect("spawn reader thread"),
        std::thread::Builder::new()
            .name("revsync-watcher".into())
            .spawn(move || watcher.run())
            .expect("spawn watcher thread"),
    ];
    Ok(IngestHandle { threads })
}

/// What the watcher asks of the reader.
enum Command {
    /// Partitions to read (seen for the first time, or added to their topic).
    Assign(Vec<(String, i32)>),
    /// Partitions their topic no longer has.
    Unassign(Vec<(String, i32)>),
    /// A partition whose log no longer holds its stored position.
    Reset(LogReset),
}

/// A log found reset or truncated under a stored position.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LogReset {
    topic: String,
    partition: i32,
    kind: ResetKind,
    /// The position the watcher judged; the reader acts only if it is still there.
    stored: i64,
    /// Log start and end (watermarks) the watcher saw.
    low: i64,
    high: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResetKind {
    /// The log ends before the position: the broker lost its log or the topic was
    /// recreated. Everything in it is read again.
    BehindEnd,
    /// The log starts after the position: records were deleted before revsync read them.
    Truncated,
}

struct Reader {
    consumer: BaseConsumer,
    topics: HashMap<String, TopicConfig>,
    denylist: Arc<Denylist>,
    metrics: Arc<Metrics>,
    state: Arc<IngestState>,
    shutdown: CancellationToken,
    commands: mpsc::Receiver<Command>,
    /// Where a partition is assigned from: the stored position read at start, updated
    /// by resets and when a partition is given up.
    stored: HashMap<(String, i32), i64>,
    batch_max: usize,
    /// Next offset each assigned partition should deliver; a different offset means the
    /// log moved under us (see `check_continuity`).
    expected: HashMap<(String, i32), i64>,
    /// Verifies `set` records.
    sets: Option<SetVerifier>,
    holds: Holds,
    /// Store failures since the last successful write.
    store_failures: u32,
}

/// Partitions held at a record that cannot be verified yet.
#[derive(Default)]
struct Holds {
    held: HashMap<(String, i32), Held>,
    /// When the reader first held each record of a held `set` partition (unix ms): a
    /// signing key missing from a JWKS fetched after that is missing for good.
    first_seen: HashMap<(String, i32), BTreeMap<i64, u64>>,
}

/// A partition whose record at `offset` could not be verified yet.
struct Held {
    offset: i64,
    backoff: Duration,
    retry_at: Instant,
    /// `true` until the partition is read again from `offset`: records that still arrive
    /// meanwhile are not decoded and do not move the position.
    waiting: bool,
    /// The partition was unassigned (else only a seek can bring it back to `offset`).
    unassigned: bool,
}

/// Where a decoded record came from, kept beside it until the batch is written.
struct Origin {
    topic_idx: usize,
    /// Record timestamp (ms), or the event's own `event_time`.
    sent_ms: i64,
}

impl Reader {
    /// After a failed write: stops reading (not ready, no `active` answers), reopens the
    /// store until that succeeds, then reads every partition again from the positions
    /// the store holds. The store keeps a position only once the data before it is
    /// flushed, so what the failure lost is read again; freshness does not vouch until
    /// a watermark round begun after the reopen is reached. Returns `false` if shutdown
    /// came first.
    fn recover_store(&mut self) -> bool {
        let cause = self.denylist.failure().unwrap_or_default();
        self.state.set_store_failing(true);
        self.metrics.store_failing.set(1);
        error!(error = %cause, "the store failed: ingest stopped and the denylist is not vouched for; reopening the store");
        // A store that fails again right after each reopen (a disk still full) is
        // reopened less and less often.
        self.store_failures = self.store_failures.saturating_add(1);
        let mut backoff =
            (STORE_RETRY * (1 << (self.store_failures - 1).min(5))).min(STORE_RETRY_MAX);
        let stored = loop {
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                if self.shutdown.is_cancelled() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
            }
            let reopened = self
                .denylist
                .reopen()
                .and_then(|()| self.denylist.positions());
            match reopened {
                Ok(stored) => break stored,
                Err(crate::denylist::StoreError::Stuck) => {
                    // Safe: everything acknowledged is on disk (positions follow their
                    // data), and a restarted process opens the store afresh.
                    error!(exit_code = STORE_STUCK_EXIT, "sled did not release the failed store, so this process cannot reopen it: exiting for the supervisor to restart revsync");
                    std::process::exit(STORE_STUCK_EXIT);
                }
                Err(e) => {
                    self.metrics.store_errors.inc();
                    warn!(error = %e, retry_in = ?backoff, "cannot reopen the store yet");
                    backoff = (backoff * 2).min(STORE_RETRY_MAX);
                }
            }
        };
        self.metrics.store_reopens.inc();
        self.stored = stored
            .into_iter()
            .map(|p| ((p.topic, p.partition), p.next_offset))
            .collect();
        // Every partition read so far is read again from its stored position.
        let assigned: Vec<(String, i32)> = self.expected.keys().cloned().collect();
        let mut tpl = TopicPartitionList::new();
        for key in &assigned {
            if !self.holds.held.get(key).is_some_and(|h| h.unassigned) {
                tpl.add_partition(&key.0, key.1);
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.incremental_unassign(&tpl) {
                error!(error = %e, "cannot unassign partitions after reopening the store");
            }
        }
        self.expected.clear();
        self.holds = Holds::default();
        let now_ms = monotonic_ms();
        for status in self.state.partitions() {
            let key = (status.topic, status.partition);
            self.state
                .replace_position(&key, self.stored.get(&key).copied());
            self.state.begin_recovery(&key, now_ms);
            self.state.reseeked(&key);
        }
        self.assign(assigned);
        self.state.set_store_failing(false);
        self.metrics.store_failing.set(0);
        info!(
            "store reopened: reading again from the stored positions; not vouching until caught up"
        );
        true
    }

    fn run(mut self) {
        let mut topic_labels: Vec<TopicLabels> = Vec::new();
        while !self.shutdown.is_cancelled() {
            if self.denylist.failure().is_some() && !self.recover_store() {
                break;
            }
            while let Ok(command) = self.commands.try_recv() {
                match command {
                    Command::Assign(new) => self.assign(new),
                    Command::Unassign(gone) => self.unassign(gone),
                    Command::Reset(reset) => self.reset(reset),
                }
            }
            self.retry_held();
            if self.expected.is_empty() {
                std::thread::sleep(POLL_TIMEOUT);
                continue;
            }
            let mut events: Vec<Event> = Vec::new();
            let mut origins: Vec<Origin> = Vec::new();
            let mut positions: HashMap<(String, i32), i64> = HashMap::new();
            let mut newly_held: Vec<(String, i32, i64)> = Vec::new();
            let mut polled = 0usize;
            let mut timeout = POLL_TIMEOUT;
            while polled < self.batch_max {
                let Some(result) = self.consumer.poll(timeout) else {
                    break;
                };
                // Drain what librdkafka already holds without waiting again.
                timeout = Duration::ZERO;
                let msg = match result {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "consumer error; librdkafka retries on its own");
                        continue;
                    }
                };
                polled += 1;
                let topic = msg.topic();
                let partition = msg.partition();
                let offset = msg.offset();
                if !self.holds.held.is_empty() {
                    let is_set = self
                        .topics
                        .get(topic)
                        .is_some_and(|t| t.format == EventFormat::Set);
                    if self.holds.is_waiting(topic, partition, offset, is_set) {
                        continue;
                    }
                }
                check_continuity(
                    &self.consumer,
                    &mut self.expected,
                    &self.metrics,
                    &self.state,
                    topic,
                    partition,
                    offset,
                );
                let Some(cfg) = self.topics.get(topic) else {
                    positions.insert((topic.to_string(), partition), offset + 1);
                    continue;
                };
                let format = cfg.format;
                let topic_idx = label_index(&mut topic_labels, topic, format);
                // Only SET verification needs to know when a record was first held.
                let seen_at_ms = if format == EventFormat::Set {
                    self.holds.seen_at_ms(topic, partition, offset)
                } else {
                    0
                };
                let payload = msg.payload().unwrap_or_default();
                let mut ignored = event::Ignored::new();
                let decoded = match format {
                    // Native topics may carry heartbeats, which feed freshness, not the store.
                    EventFormat::Native => {
                        match event::decode_native_record_noting(payload, &mut ignored) {
                            Ok(NativeRecord::Event(e)) => Ok(Some(e)),
                            Ok(NativeRecord::Heartbeat { iss, event_time }) => {
                                let sent = msg.timestamp().to_millis().map(|t| t.max(0) as u64);
                                self.state
                                    .record_heartbeat(&iss, sent.unwrap_or(event_time * 1000));
                                Ok(None)
                            }
                            Err(e) => Err(FormatError::from(e)),
                        }
                    }
                    _ => decode(cfg, payload, self.sets.as_ref(), seen_at_ms, &mut ignored),
                };
                if decoded.is_ok() {
                    self.metrics
                        .fields_ignored(topic, format.as_str(), &ignored);
                }
                match decoded {
                    Ok(Some(event)) => {
                        origins.push(Origin {
                            topic_idx,
                            sent_ms: msg
                                .timestamp()
                                .to_millis()
                                .unwrap_or(event.event_time as i64 * 1000),
                        });
                        events.push(event);
                    }
                    Ok(None) => {
                        debug!(topic, partition, offset, "record revokes nothing; ignored");
                        self.metrics
                            .events_ignored
                            .get_or_create(&topic_labels[topic_idx])
                            .inc();
                    }
                    Err(e) if e.retryable() => {
                        // Not decidable now: the position stays at this record.
                        positions.insert((topic.to_string(), partition), offset);
                        self.holds.hold(topic, partition, offset, seen_at_ms, &e);
                        newly_held.push((topic.to_string(), partition, offset));
                        continue;
                    }
                    Err(e) => {
                        // The payload may carry anything, secrets included: never logged.
                        warn!(topic, partition, offset, reason = e.reason(), error = %e, "skipping malformed record");
                        self.metrics.malformed(topic, format.as_str(), e.reason());
                    }
                }
                positions.insert((topic.to_string(), partition), offset + 1);
                if !self.holds.is_empty() {
                    self.holds.settled(topic, partition, offset);
                }
            }
            self.skip_undelivered(&mut positions);
            if positions.is_empty() {
                continue;
            }
            self.write(&events, &origins, positions, &topic_labels);
            for (topic, partition, offset) in newly_held {
                self.rewind(&topic, partition, offset);
            }
        }
        debug!("reader stopping");
        if let Err(e) = self.denylist.flush() {
            error!(error = %e, "final store flush failed");
        }
    }

    /// Moves positions past offsets the consumer passed without delivering a record:
    /// transaction markers (and, under `read_committed`, aborted records) take offsets of
    /// their own, so "last record + 1" would stay below the high watermark for good and
    /// revsync would never count itself caught up. librdkafka's consumer position is the
    /// offset after the last record or marker it handed over; every record it handed
    /// over was decoded above, so nothing is skipped unread. Held partitions keep their
    /// held offset: records polled past it were dropped, not decoded.
    fn skip_undelivered(&mut self, positions: &mut HashMap<(String, i32), i64>) {
        let Ok(tpl) = self.consumer.position() else {
            return;
        };
        for elem in tpl.elements() {
            let Offset::Offset(at) = elem.offset() else {
                continue;
            };
            let key = (elem.topic().to_string(), elem.partition());
            if !self.expected.contains_key(&key) || self.holds.held.contains_key(&key) {
                continue;
            }
            let ours = positions
                .get(&key)
                .copied()
                .or_else(|| self.state.position(&key));
            if ours.is_none_or(|p| at > p) {
                debug!(topic = key.0, partition = key.1, from = ?ours, to = at, "position moved past offsets never delivered");
                self.expected.insert(key.clone(), at);
                positions.insert(key, at);
            }
        }
    }

    /// Applies a batch: the data durably first, then its positions (see
    /// [`Denylist::apply`]). On a failure nothing moves: the store is reopened and the
    /// batch read again.
    fn write(
        &mut self,
        events: &[Event],
        origins: &[Origin],
        positions: HashMap<(String, i32), i64>,
        labels: &[TopicLabels],
    ) {
        let positions: Vec<Position> = positions
            .into_iter()
            .map(|((topic, partition), next_offset)| Position {
                topic,
                partition,
                next_offset,
            })
            .collect();
        let outcome = match self.denylist.apply(events, &positions, unix_now()) {
            Ok(outcome) => {
                self.store_failures = 0;
                outcome
            }
            Err(e) => {
                // The store is failed now; the loop reopens it and reads this batch again.
                self.metrics.store_errors.inc();
                error!(error = %e, events = events.len(), "cannot write a batch to the store");
                return;
            }
        };
        debug!(
            events = events.len(),
            changed = outcome.changed,
            "applied batch"
        );
        self.metrics.batches_applied.inc();
        let now_ms = unix_now_ms() as i64;
        let mut per_topic = vec![0u64; labels.len()];
        for o in origins {
            per_topic[o.topic_idx] += 1;
            self.metrics
                .propagation_delay
                .observe((now_ms - o.sent_ms).max(0) as f64 / 1000.0);
        }
        for (label, n) in labels.iter().zip(per_topic) {
            if n > 0 {
                self.metrics.events_applied.get_or_create(label).inc_by(n);
            }
        }
        for p in &positions {
            self.state
                .set_position(&p.topic, p.partition, p.next_offset);
            self.metrics
                .position
                .get_or_create(&PartitionLabels {
                    topic: p.topic.clone(),
                    partition: p.partition,
                })
                .set(p.next_offset);
        }
        self.state.confirm_targets();
    }

    /// Stops reading a newly held partition; it is read again from `offset` after its
    /// backoff (see `retry_held`).
    fn rewind(&mut self, topic: &str, partition: i32, offset: i64) {
        let key = (topic.to_string(), partition);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let unassigned = match self.consumer.incremental_unassign(&tpl) {
            Ok(()) => true,
            Err(e) => {
                error!(topic, partition, error = %e, "cannot unassign a held partition; it will be sought back instead");
                false
            }
        };
        if let Some(h) = self.holds.held.get_mut(&key) {
            h.unassigned = unassigned;
        }
        self.expected.insert(key, offset);
    }

    /// Reads held partitions again from their held record once their backoff is over.
    fn retry_held(&mut self) {
        if self.holds.held.is_empty() {
            return;
        }
        let now = Instant::now();
        for ((topic, partition), h) in self.holds.held.iter_mut() {
            if !h.waiting || h.retry_at > now {
                continue;
            }
            let result = if h.unassigned {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, *partition, Offset::Offset(h.offset))
                    .and_then(|()| self.consumer.incremental_assign(&tpl))
            } else {
                self.consumer
                    .seek(topic, *partition, Offset::Offset(h.offset), BROKER_TIMEOUT)
            };
            match result {
                Ok(()) => {
                    debug!(topic, partition, offset = h.offset, "retrying held record");
                    h.waiting = false;
                    h.unassigned = false;
                    self.expected.insert((topic.clone(), *partition), h.offset);
                }
                Err(e) => {
                    error!(topic, partition, error = %e, "cannot read a held partition again; retrying later");
                    h.retry_at = now + h.backoff;
                }
            }
        }
    }

    fn assign(&mut self, partitions: Vec<(String, i32)>) {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in &partitions {
            let key = (topic.clone(), *partition);
            if self.expected.contains_key(&key) {
                continue;
            }
            let offset = match self.stored.get(&key) {
                Some(next) => Offset::Offset(*next),
                None => Offset::Beginning,
            };
            if let Err(e) = tpl.add_partition_offset(topic, *partition, offset) {
                error!(topic, partition, error = %e, "cannot build assignment");
                continue;
            }
            self.expected.insert(
                key,
                self.stored
                    .get(&(topic.clone(), *partition))
                    .copied()
                    .unwrap_or(-1),
            );
            info!(topic, partition, ?offset, "assigned partition");
            let labels = PartitionLabels {
                topic: topic.clone(),
                partition: *partition,
            };
            let _ = self.metrics.offset_resets.get_or_create(&labels);
            let _ = self.metrics.log_resets.get_or_create(&labels);
            let _ = self.metrics.skipped_offsets.get_or_create(&labels);
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.incremental_assign(&tpl) {
            error!(error = %e, "cannot assign partitions");
            for (topic, partition) in partitions {
                self.expected.remove(&(topic, partition));
            }
        }
    }

    /// Stops reading partitions their topic no longer has; if they come back they are
    /// read from where they were.
    fn unassign(&mut self, partitions: Vec<(String, i32)>) {
        let mut tpl = TopicPartitionList::new();
        for key in partitions {
            if let Some(position) = self.state.position(&key) {
                self.stored.insert(key.clone(), position);
            }
            let held_off = self.holds.held.get(&key).is_some_and(|h| h.unassigned);
            self.holds.forget(&key);
            if self.expected.remove(&key).is_some() && !held_off {
                tpl.add_partition(&key.0, key.1);
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.incremental_unassign(&tpl) {
                error!(error = %e, "cannot unassign partitions");
            }
        }
    }

    /// Reads a partition again from its log start after its log was reset or truncated
    /// under the stored position, and stores that lower position (never with data: what
    /// is read again is applied as usual, and applying twice changes nothing).
    fn reset(&mut self, r: LogReset) {
        let key = (r.topic.clone(), r.partition);
        if self.state.position(&key) != Some(r.stored) {
            // Read on (or restarted by librdkafka) since the watcher looked.
            debug!(
                topic = r.topic,
                partition = r.partition,
                "partition moved since the log reset was found; nothing to do"
            );
            self.state.reseeked(&key);
            return;
        }
        let to = r.low;
        if self.expected.contains_key(&key) {
            // The consumer first: a stored position the consumer does not follow would
            // leave the partition waiting at the lost one.
            if let Err(e) = self.seek_to(&r.topic, r.partition, to) {
                error!(topic = r.topic, partition = r.partition, error = %e, "cannot move the partition to its log start; trying again when the watcher next finds the reset");
                return;
            }
            self.expected.insert(key.clone(), to);
        }
        self.holds.forget(&key);
        let position = Position {
            topic: r.topic.clone(),
            partition: r.partition,
            next_offset: to,
        };
        if let Err(e) = self.denylist.reset_position(&position) {
            // The watcher finds the reset again once the store is back.
            self.metrics.store_errors.inc();
            error!(topic = r.topic, partition = r.partition, error = %e, "cannot store the reset position");
            return;
        }
        self.stored.insert(key.clone(), to);
        self.state.set_position(&r.topic, r.partition, to);
        let labels = PartitionLabels {
            topic: r.topic.clone(),
            partition: r.partition,
        };
        self.metrics.position.get_or_create(&labels).set(to);
        self.metrics.log_resets.get_or_create(&labels).inc();
        match r.kind {
            ResetKind::BehindEnd => warn!(
                topic = r.topic,
                partition = r.partition,
                stored = r.stored,
                log_start = r.low,
                log_end = r.high,
                "the log ends before the stored position (broker lost its log, or the topic was recreated): reading it again from its start; not vouching for the denylist until it has"
            ),
            ResetKind::Truncated => error!(
                topic = r.topic,
                partition = r.partition,
                stored = r.stored,
                log_start = r.low,
                log_end = r.high,
                "the log starts after the stored position: revocations were deleted before revsync read them and are lost; continuing from the log start (raise the topic's retention above the longest token lifetime)"
            ),
        }
        self.state.reseeked(&key);
    }

    /// Points an assigned partition's consumer at `offset`.
    fn seek_to(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError> {
        let key = (topic.to_string(), partition);
        if !self.holds.held.get(&key).is_some_and(|h| h.unassigned) {
            match self
                .consumer
                .seek(topic, partition, Offset::Offset(offset), BROKER_TIMEOUT)
            {
                Ok(()) => return Ok(()),
                Err(e) => {
                    debug!(topic, partition, error = %e, "seek failed; assigning the partition again instead")
                }
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, partition);
            self.consumer.incremental_unassign(&tpl)?;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        self.consumer.incremental_assign(&tpl)
    }
}

impl Holds {
    fn is_empty(&self) -> bool {
        self.held.is_empty() && self.first_seen.is_empty()
    }

    /// Drops whatever is held for a partition that is read again from elsewhere.
    fn forget(&mut self, key: &(String, i32)) {
        self.held.remove(key);
        self.first_seen.remove(key);
    }

    /// `true` when the partition is held and waiting to be read again from its held
    /// record: the message is dropped (it will be delivered again).
    fn is_waiting(&mut self, topic: &str, partition: i32, offset: i64, is_set: bool) -> bool {
        let key = (topic.to_string(), partition);
        if !self.held.get(&key).is_some_and(|h| h.waiting) {
            return false;
        }
        if is_set {
            self.first_seen
                .entry(key)
                .or_default()
                .entry(offset)
                .or_insert_with(unix_now_ms);
        }
        true
    }

    /// When the reader first held this record (now, unless it was held before).
    fn seen_at_ms(&self, topic: &str, partition: i32, offset: i64) -> u64 {
        if !self.first_seen.is_empty() {
            if let Some(at) = self
                .first_seen
                .get(&(topic.to_string(), partition))
                .and_then(|m| m.get(&offset))
            {
                return *at;
            }
        }
        unix_now_ms()
    }

    /// Holds the partition at `offset`: no position past it until it verifies.
    fn hold(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        seen_at_ms: u64,
        why: &FormatError,
    ) {
        let key = (topic.to_string(), partition);
        let backoff = match self.held.get(&key) {
            Some(h) if h.offset == offset => (h.backoff * 2).min(HOLD_MAX),
            _ => {
                warn!(topic, partition, offset, error = %why, "record cannot be verified yet; holding the partition at it and retrying");
                HOLD_MIN
            }
        };
        debug!(
            topic,
            partition,
            offset,
            ?backoff,
            "record still unverifiable"
        );
        self.held.insert(
            key.clone(),
            Held {
                offset,
                backoff,
                retry_at: Instant::now() + backoff,
                waiting: true,
                unassigned: false,
            },
        );
        self.first_seen
            .entry(key)
            .or_default()
            .entry(offset)
            .or_insert(seen_at_ms);
    }

    /// The record at `offset` was decided (applied, ignored or skipped): forget what was
    /// kept for it and, once past the held record, the hold itself.
    fn settled(&mut self, topic: &str, partition: i32, offset: i64) {
        let key = (topic.to_string(), partition);
        if let Some(seen) = self.first_seen.get_mut(&key) {
            *seen = seen.split_off(&(offset + 1));
            if seen.is_empty() {
                self.first_seen.remove(&key);
            }
        }
        if self
            .held
            .get(&key)
            .is_some_and(|h| !h.waiting && offset >= h.offset)
        {
            info!(
                topic,
                partition, offset, "held record decided; partition flows again"
            );
            self.held.remove(&key);
        }
    }
}

/// Notices when the log moved under a stored position: offsets going back mean the
/// broker lost its log (the position was past its end; a broker that answers
/// OFFSET_OUT_OF_RANGE made librdkafka restart at the earliest offset); a jump forward
/// past the log's start means records were deleted before revsync read them. Either is
/// a log reset, which freshness waits out like one the watcher finds.
fn check_continuity(
    consumer: &BaseConsumer,
    expected: &mut HashMap<(String, i32), i64>,
    metrics: &Metrics,
    state: &IngestState,
    topic: &str,
    partition: i32,
    offset: i64,
) {
    let key = (topic.to_string(), partition);
    let Some(expected) = expected.get_mut(&key) else {
        return;
    };
    let want = *expected;
    *expected = offset + 1;
    if want < 0 || offset == want {
        return;
    }
    let labels = PartitionLabels {
        topic: topic.to_string(),
        partition,
    };
    let log_reset = || {
        metrics.log_resets.get_or_create(&labels).inc();
        state.begin_recovery(&key, monotonic_ms());
        state.reseeked(&key);
    };
    if offset < want {
        metrics.offset_resets.get_or_create(&labels).inc();
        log_reset();
        warn!(
            topic,
            partition,
            stored = want,
            restarted_at = offset,
            "stored position was beyond the log end (broker log lost or recreated?); reading again from the earliest offset"
        );
        return;
    }
    // Gaps are normal with compaction and transaction markers; only a log start past
    // our position means revocations were deleted unread.
    match consumer.fetch_watermarks(topic, partition, BROKER_TIMEOUT) {
        Ok((low, _)) if low > want => {
            metrics.offset_resets.get_or_create(&labels).inc();
            log_reset();
            error!(
                topic,
                partition,
                stored = want,
                log_start = low,
                "log was truncated under the stored position: revocations in between are lost; raise the topic's retention above the longest token lifetime"
            );
        }
        Ok(_) => {
            metrics
                .skipped_offsets
                .get_or_create(&labels)
                .inc_by((offset - want) as u64);
            debug!(
                topic,
                partition,
                from = want,
                to = offset,
                "offsets skipped by the broker"
            );
        }
        Err(e) => debug!(topic, partition, error = %e, "cannot confirm offset gap"),
    }
}

fn label_index(labels: &mut Vec<TopicLabels>, topic: &str, format: EventFormat) -> usize {
    if let Some(i) = labels.iter().position(|l| l.topic == topic) {
        return i;
    }
    labels.push(TopicLabels {
        topic: topic.to_string(),
        format: format.as_str(),
    });
    labels.len() - 1
}

/// Decodes a record in its topic's configured format (never sniffed): an event,
/// `Ok(None)` for a record that revokes nothing, or why not. `sets` verifies `set`
/// records; `seen_at_ms` is when the reader first held the record (unix ms). Unusable
/// optional fields it ignored are named in `ignored`.
pub fn decode(
    topic: &TopicConfig,
    payload: &[u8],
    sets: Option<&SetVerifier>,
    seen_at_ms: u64,
    ignored: &mut event::Ignored,
) -> Decoded {
    match topic.format {
        EventFormat::Native => event::decode_native_noting(payload, ignored)
            .map(Some)
            .map_err(FormatError::from),
        EventFormat::Keycloak => match topic.issuer.as_deref() {
            Some(issuer) => keycloak::decode_noting(payload, issuer, ignored),
            None => Err(FormatError::Unverifiable(
                "keycloak topic without an issuer".into(),
            )),
        },
        EventFormat::Set => match sets {
            Some(verifier) => verifier.decode_blocking_noting(
                payload,
                topic.issuer.as_deref(),
                seen_at_ms,
                ignored,
            ),
            None => Err(FormatError::Unverifiable(
                "no verifier for SETs is configured".into(),
            )),
        },
    }
}

/// Rounds in a row a log must look empty below a position, or start after it, before
/// it counts as reset: neither can be confirmed by reading, so a broker's odd answer
/// while it starts up must repeat.
const SUSPECT_ROUNDS: u32 = 2;
/// Rounds to leave the reader to act on a reset before judging the partition again.
const PENDING_ROUNDS: u32 = 5;
/// Longest a probe of one partition may take.
const PROBE_MAX: Duration = Duration::from_secs(5);

/// How long a probe waits after the last record it read before taking it for the
/// log's end: several fetches, since Tansu holds each for `fetch.wait.max.ms`.
fn probe_quiet(fetch_wait_max: Duration) -> Duration {
    (fetch_wait_max * 5).max(Duration::from_millis(300))
}

/// The watcher's judgement of one partition, from the stored position and watermarks of
/// each round ([`Watch::assess`]).
#[derive(Debug, Default)]
struct Watch {
    /// Position at the previous round.
    last_position: Option<i64>,
    /// (position, high watermark) for which a probe found the log reaching the position.
    verified: Option<(i64, i64)>,
    /// Rounds in a row the log looked empty below the position, or starting after it.
    suspect_rounds: u32,
    /// A reset was sent to the reader for this position, this many rounds ago.
    pending: Option<(i64, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Nothing wrong: the round may vouch for this partition.
    Fine,
    /// Maybe wrong: the round does not vouch; look again next round.
    Suspect,
    /// The high watermark is below a position that has not moved: read from `from` to
    /// learn whether the log still reaches offset `need` (the last one read).
    Probe { from: i64, need: i64 },
    /// The log no longer holds the position.
    Reset(ResetKind),
}

/// What a probe read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probed {
    /// A record at or past the offset it needed: the log is intact.
    Reaches,
    /// Records, then nothing, all before that offset: the log ends before the position.
    EndsBefore,
    /// Nothing conclusive (broker slow or away).
    Unknown,
}

impl Watch {
    /// Judges a round's `low` and `high` watermarks against the stored `position`.
    ///
    /// A position that moved since the last round is being read: fine, whatever the
    /// watermarks say (Tansu's memory engine reports a high watermark behind the true
    /// end). A log whose position is stuck above its high watermark needs a probe
    /// (in a reset log nothing can be read at the position, so it never moves); an empty
    /// log, or one starting after the position, is a reset once seen twice in a row.
    fn assess(&mut self, position: Option<i64>, low: i64, high: i64) -> Verdict {
        let Some(pos) = position else {
            *self = Watch::default();
            return Verdict::Fine;
        };
        let moved = self.last_position.is_some_and(|last| last != pos);
        self.last_position = Some(pos);
        if let Some((at, rounds)) = self.pending {
            if at == pos && rounds < PENDING_ROUNDS {
                self.pending = Some((at, rounds + 1));
                return Verdict::Suspect;
            }
            self.pending = None;
        }
        if moved || (low <= pos && pos <= high) || self.verified == Some((pos, high)) {
            self.suspect_rounds = 0;
            return Verdict::Fine;
        }
        if low > pos || high <= low {
            self.suspect_rounds += 1;
            if self.suspect_rounds < SUSPECT_ROUNDS {
                return Verdict::Suspect;
            }
            let kind = if low > pos {
                ResetKind::Truncated
            } else {
                ResetKind::BehindEnd
            };
            return self.reset(pos, kind);
        }
        self.suspect_rounds = 0;
        Verdict::Probe {
            from: high - 1,
            need: pos - 1,
        }
    }

    /// The verdict after a probe asked for by [`Self::assess`] for `position` and `high`.
    fn probed(&mut self, position: i64, high: i64, found: Probed) -> Verdict {
        match found {
            Probed::Reaches => {
                self.verified = Some((position, high));
                Verdict::Fine
            }
            Probed::EndsBefore => self.reset(position, ResetKind::BehindEnd),
            Probed::Unknown => Verdict::Suspect,
        }
    }

    fn reset(&mut self, position: i64, kind: ResetKind) -> Verdict {
        *self = Watch {
            last_position: Some(position),
            pending: Some((position, 0)),
            ..Watch::default()
        };
        Verdict::Reset(kind)
    }
}

/// Reads a partition from `from` with the watcher's own consumer until a record at
/// `need` or later shows up (the log reaches it), or records stop coming for `quiet`
/// (the log ends before it).
fn probe(
    consumer: &BaseConsumer,
    shutdown: &CancellationToken,
    quiet: Duration,
    topic: &str,
    partition: i32,
    from: i64,
    need: i64,
) -> Probed {
    let mut tpl = TopicPartitionList::new();
    if let Err(e) = tpl
        .add_partition_offset(topic, partition, Offset::Offset(from))
        .and_then(|()| consumer.assign(&tpl))
    {
        debug!(topic, partition, error = %e, "cannot probe the partition");
        return Probed::Unknown;
    }
    let started = Instant::now();
    let mut last_read: Option<Instant> = None;
    let found = loop {
        if shutdown.is_cancelled() || started.elapsed() >= PROBE_MAX {
            break Probed::Unknown;
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) if m.topic() == topic && m.partition() == partition => {
                if m.offset() >= need {
                    break Probed::Reaches;
                }
                last_read = Some(Instant::now());
            }
            Some(Err(e)) => debug!(topic, partition, error = %e, "probe read failed"),
            _ => {}
        }
        match last_read {
            Some(at) if at.elapsed() >= quiet => break Probed::EndsBefore,
            None if started.elapsed() >= WATCH_TIMEOUT => break Probed::Unknown,
            _ => {}
        }
    };
    if let Err(e) = consumer.unassign() {
        debug!(error = %e, "cannot end the probe's assignment");
    }
    debug!(topic, partition, from, need, ?found, elapsed = ?started.elapsed(), "probed the log end");
    found
}

struct Watcher {
    consumer: BaseConsumer,
    topics: Vec<String>,
    metrics: Arc<Metrics>,
    state: Arc<IngestState>,
    shutdown: CancellationToken,
    commands: mpsc::Sender<Command>,
    /// Partitions known per topic.
    known: HashMap<String, i32>,
    /// Each partition's judgement from round to round.
    watch: HashMap<(String, i32), Watch>,
    probe_quiet: Duration,
    watermark_interval: Duration,
    metadata_interval: Duration,
}

impl Watcher {
    fn run(mut self) {
        let mut next_metadata = Instant::now();
        while !self.shutdown.is_cancelled() {
            let round = Instant::now();
            if round >= next_metadata {
                self.refresh_metadata();
                // Until every topic has been seen, look again at the watermark pace.
                next_metadata = round
                    + if self.known.len() < self.topics.len() {
                        self.watermark_interval
                    } else {
                        self.metadata_interval
                    };
            }
            self.refresh_watermarks();
            let elapsed = round.elapsed();
            let wait = self.watermark_interval.saturating_sub(elapsed);
            // Sleep in short steps so shutdown is prompt.
            let until = Instant::now() + wait;
            while Instant::now() < until && !self.shutdown.is_cancelled() {
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
            }
        }
        debug!("watcher stopping");
    }

    fn refresh_metadata(&mut self) {
        for topic in &self.topics.clone() {
            let md = match self.consumer.fetch_metadata(Some(topic), WATCH_TIMEOUT) {
                Ok(md) => md,
                Err(e) => {
                    warn!(topic, error = %e, "cannot read topic metadata");
                    continue;
                }
            };
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                continue;
            };
            if let Some(err) = t.error() {
                warn!(topic, error = ?err, "topic metadata error (does the topic exist?)");
                continue;
            }
            let count = t.partitions().len() as i32;
            let before = self.known.get(topic).copied().unwrap_or(0);
            self.forget_partitions_beyond(topic, count);
            if count < before {
                self.known.insert(topic.clone(), count);
            }
            if count > before {
                let new: Vec<(String, i32)> = t
                    .partitions()
                    .iter()
                    .map(|p| p.id())
                    .filter(|id| *id >= before)
                    .map(|id| (topic.clone(), id))
                    .collect();
                if before > 0 {
                    info!(topic, from = before, to = count, "partitions added");
                }
                {
                    let mut map = self
                        .state
                        .partitions
                        .write()
                        .unwrap_or_else(|p| p.into_inner());
                    for key in &new {
                        map.entry(key.clone()).or_default();
                    }
                }
                self.known.insert(topic.clone(), count);
                let _ = self.commands.send(Command::Assign(new));
            }
        }
    }

    /// Stops watching and reading partitions of `topic` from `count` on (a topic deleted
    /// and created again with fewer, or stored positions of a topic that has shrunk):
    /// they would never report watermarks, and freshness would wait for them forever.
    fn forget_partitions_beyond(&mut self, topic: &str, count: i32) {
        let gone: Vec<(String, i32)> = {
            let map = self
                .state
                .partitions
                .read()
                .unwrap_or_else(|p| p.into_inner());
            map.keys()
                .filter(|(t, p)| t == topic && *p >= count)
                .cloned()
                .collect()
        };
        if gone.is_empty() {
            return;
        }
        warn!(
            topic,
            partitions = count,
            gone = gone.len(),
            "the topic has fewer partitions than revsync read (deleted and created again?): no longer reading the others; their stored positions are kept"
        );
        self.state.forget_partitions(&gone);
        for key in &gone {
            self.watch.remove(key);
        }
        let _ = self.commands.send(Command::Unassign(gone));
    }

    fn refresh_watermarks(&mut self) {
        let started_ms = monotonic_ms();
        let keys: Vec<(String, i32)> = {
            let map = self
                .state
                .partitions
                .read()
                .unwrap_or_else(|p| p.into_inner());
            map.keys().cloned().collect()
        };
        let every_topic_known = self.topics.iter().all(|t| self.known.contains_key(t));
        let mut complete = every_topic_known && !keys.is_empty();
        let mut marks = Vec::with_capacity(keys.len());
        for (topic, partition) in keys {
            if !self.known.contains_key(&topic) {
                // Stored position of a topic no longer configured.
                continue;
            }
            let fetched = self
                .consumer
                .fetch_watermarks(&topic, partition, WATCH_TIMEOUT);
            let mut map = self
                .state
                .partitions
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let entry = map.entry((topic.clone(), partition)).or_default();
            let (low, high) = match fetched {
                Ok(marks) => marks,
                Err(e) => {
                    debug!(topic, partition, error = %e, "cannot fetch watermarks");
                    complete = false;
                    continue;
                }
            };
            entry.low_watermark = Some(low);
            entry.high_watermark = Some(high);
            entry.lag = lag_of(entry);
            self.metrics
                .lag
                .get_or_create(&PartitionLabels {
                    topic: topic.clone(),
                    partition,
                })
                .set(entry.lag.unwrap_or(0));
            let position = entry.position;
            // A probe takes a while: the reader must not wait for the map meanwhile.
            drop(map);
            let key = (topic, partition);
            let watch = self.watch.entry(key.clone()).or_default();
            let mut verdict = watch.assess(position, low, high);
            if let (Verdict::Probe { from, need }, Some(pos)) = (verdict, position) {
                let found = probe(
                    &self.consumer,
                    &self.shutdown,
                    self.probe_quiet,
                    &key.0,
                    partition,
                    from,
                    need,
                );
                verdict = watch.probed(pos, high, found);
            }
            match (verdict, position) {
                (Verdict::Fine, _) => marks.push((key, high, low)),
                (Verdict::Reset(kind), Some(stored)) => {
                    complete = false;
                    self.state.begin_recovery(&key, started_ms);
                    let _ = self.commands.send(Command::Reset(LogReset {
                        topic: key.0,
                        partition,
                        kind,
                        stored,
                        low,
                        high,
                    }));
                }
                _ => complete = false,
            }
        }
        // A round that saw every partition becomes a target; the reader confirms it the
        // moment its positions pass these marks (often right here, when idle).
        if complete {
            self.state.push_target(Target {
                at_ms: started_ms,
                marks,
            });
        }
        self.state.confirm_targets();
        if let Some(at) = self.state.caught_up_at_ms() {
            self.metrics
                .seconds_since_caught_up
                .set(monotonic_ms().saturating_sub(at) as f64 / 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_dated_in_the_future_counts_as_sent_now() {
        let state = IngestState::new();
        let before = monotonic_ms();
        state.record_heartbeat("I", unix_now_ms() + 3_600_000);
        let at = state.last_heartbeat_ms("I").unwrap();
        assert!(
            at >= before && at <= monotonic_ms(),
            "a heartbeat from an hour ahead would keep heartbeat_max_age satisfied for an hour: {at} vs {before}"
        );
        // An old one keeps its age.
        state.record_heartbeat("J", unix_now_ms().saturating_sub(60_000));
        let j = state.last_heartbeat_ms("J").unwrap();
        assert!(monotonic_ms() - j >= 59_000, "{j}");
    }

    #[test]
    fn a_round_is_confirmed_when_positions_pass_it_even_if_lag_never_hits_zero() {
        let state = IngestState::new();
        let key = ("t".to_string(), 0);
        state.set_position("t", 0, 100);
        state.push_target(Target {
            at_ms: 1_000,
            marks: vec![(key.clone(), 150, 0)],
        });
        state.push_target(Target {
            at_ms: 2_000,
            marks: vec![(key.clone(), 220, 0)],
        });
        state.confirm_targets();
        assert_eq!(
            state.caught_up_at_ms(),
            None,
            "position 100 reached neither round"
        );
        // More arrived meanwhile (lag is not zero), but the first round is passed.
        state.set_position("t", 0, 180);
        state.confirm_targets();
        assert_eq!(state.caught_up_at_ms(), Some(1_000));
        state.set_position("t", 0, 260);
        state.confirm_targets();
        assert_eq!(state.caught_up_at_ms(), Some(2_000));
        // A failing store confirms nothing.
        state.push_target(Target {
            at_ms: 3_000,
            marks: vec![(key, 260, 0)],
        });
        state.store_failing.store(true, Ordering::Release);
        state.confirm_targets();
        assert_eq!(state.caught_up_at_ms(), Some(2_000));
    }

    #[test]
    fn a_high_watermark_below_a_resting_position_is_probed_once() {
        let mut w = Watch::default();
        // Tansu memory://: one batch of 21 records reports a high watermark of 1.
        assert_eq!(
            w.assess(Some(21), 0, 1),
            Verdict::Probe { from: 0, need: 20 }
        );
        assert_eq!(w.probed(21, 1, Probed::Reaches), Verdict::Fine);
        assert_eq!(w.assess(Some(21), 0, 1), Verdict::Fine, "verified");
        // A moving position is being read, whatever the watermarks say.
        assert_eq!(w.assess(Some(30), 0, 1), Verdict::Fine);
        assert_eq!(w.assess(Some(45), 0, 22), Verdict::Fine);
        // At rest again with a new high watermark: probed again.
        assert_eq!(
            w.assess(Some(45), 0, 22),
            Verdict::Probe { from: 21, need: 44 }
        );
        assert_eq!(w.probed(45, 22, Probed::Unknown), Verdict::Suspect);
        assert_eq!(
            w.assess(Some(45), 0, 22),
            Verdict::Probe { from: 21, need: 44 },
            "an inconclusive probe is tried again"
        );
        // Within the log: nothing to probe.
        assert_eq!(w.assess(Some(45), 0, 45), Verdict::Fine);
        assert_eq!(w.assess(Some(45), 40, 60), Verdict::Fine);
        assert_eq!(w.assess(None, 0, 0), Verdict::Fine, "nothing stored");
    }

    #[test]
    fn a_log_ending_before_the_position_is_reset_once_and_judged_again_later() {
        let mut w = Watch::default();
        assert_eq!(
            w.assess(Some(40), 0, 3),
            Verdict::Probe { from: 2, need: 39 }
        );
        assert_eq!(
            w.probed(40, 3, Probed::EndsBefore),
            Verdict::Reset(ResetKind::BehindEnd)
        );
        // The reader has not moved it yet: no second reset meanwhile.
        for _ in 0..PENDING_ROUNDS {
            assert_eq!(w.assess(Some(40), 0, 3), Verdict::Suspect);
        }
        // Still there after that (the reader could not move it): judged again.
        assert_eq!(
            w.assess(Some(40), 0, 3),
            Verdict::Probe { from: 2, need: 39 }
        );
        assert_eq!(
            w.probed(40, 3, Probed::EndsBefore),
            Verdict::Reset(ResetKind::BehindEnd)
        );
        // Moved to the log start and read on: fine.
        assert_eq!(w.assess(Some(0), 0, 3), Verdict::Fine);
        assert_eq!(w.assess(Some(3), 0, 3), Verdict::Fine);
    }

    #[test]
    fn an_empty_or_truncated_log_must_be_seen_twice_in_a_row() {
        let mut w = Watch::default();
        // An empty log (or a topic the broker no longer knows: Tansu answers 0, 0).
        assert_eq!(w.assess(Some(12), 0, 0), Verdict::Suspect);
        assert_eq!(w.assess(Some(12), 0, 12), Verdict::Fine, "a blip");
        assert_eq!(w.assess(Some(12), 0, 0), Verdict::Suspect);
        assert_eq!(
            w.assess(Some(12), 0, 0),
            Verdict::Reset(ResetKind::BehindEnd)
        );
        // Retention deleted records never read: the log starts after the position.
        let mut w = Watch::default();
        assert_eq!(w.assess(Some(12), 50, 80), Verdict::Suspect);
        assert_eq!(
            w.assess(Some(12), 50, 80),
            Verdict::Reset(ResetKind::Truncated)
        );
        // Real Kafka answers OFFSET_OUT_OF_RANGE: librdkafka restarts the reader at the
        // log start before the second round, and nothing is reset twice.
        let mut w = Watch::default();
        assert_eq!(w.assess(Some(12), 50, 80), Verdict::Suspect);
        assert_eq!(w.assess(Some(57), 50, 80), Verdict::Fine);
    }

    #[test]
    fn a_log_reset_keeps_freshness_off_until_a_later_round_is_reached() {
        let state = IngestState::new();
        let key = ("t".to_string(), 0);
        state.set_position("t", 0, 40);
        state.push_target(Target {
            at_ms: 1_000,
            marks: vec![(key.clone(), 40, 0)],
        });
        state.confirm_targets();
        assert_eq!(state.caught_up_at_ms(), Some(1_000));
        // A round of the lost log, still waiting: it is dropped by the reset.
        state.push_target(Target {
            at_ms: 1_500,
            marks: vec![(key.clone(), 60, 0)],
        });
        state.begin_recovery(&key, 2_000);
        assert!(state.recovering());
        // The new log ends at 5: the stale position 40 must not count as past it.
        state.push_target(Target {
            at_ms: 2_000,
            marks: vec![(key.clone(), 5, 0)],
        });
        state.confirm_targets();
        assert_eq!(state.caught_up_at_ms(), Some(1_000));
        // Moved to the log start, not yet read to the end.
        state.set_position("t", 0, 0);
        state.reseeked(&key);
        state.confirm_targets();
        assert!(state.recovering());
        assert_eq!(state.caught_up_at_ms(), Some(1_000));
        state.set_position("t", 0, 5);
        state.confirm_targets();
        assert!(!state.recovering());
        assert_eq!(state.caught_up_at_ms(), Some(2_000));
    }

    #[test]
    fn forgotten_partitions_no_longer_hold_rounds_back() {
        let state = IngestState::new();
        let (a, b) = (("t".to_string(), 0), ("t".to_string(), 1));
        state.set_position("t", 0, 10);
        state.set_position("t", 1, 3);
        state.push_target(Target {
            at_ms: 1_000,
            marks: vec![(a.clone(), 10, 0), (b.clone(), 9, 0)],
        });
        state.begin_recovery(&b, 500);
        state.confirm_targets();
        assert_eq!(state.caught_up_at_ms(), None);
        state.forget_partitions(std::slice::from_ref(&b));
        assert!(!state.recovering());
        state.confirm_targets();
        assert_eq!(state.caught_up_at_ms(), Some(1_000));
        let keys: Vec<i32> = state.partitions().iter().map(|p| p.partition).collect();
        assert_eq!(keys, vec![0]);
    }

    #[test]
    fn a_probe_waits_several_fetches_for_the_next_record() {
        assert_eq!(
            probe_quiet(Duration::from_millis(10)),
            Duration::from_millis(300)
        );
        assert_eq!(
            probe_quiet(Duration::from_millis(500)),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn lag_never_goes_negative_and_starts_at_the_log_start() {
        let p = |pos, low, high| PartitionState {
            position: pos,
            low_watermark: Some(low),
            high_watermark: Some(high),
            lag: None,
        };
        assert_eq!(lag_of(&p(Some(10), 0, 15)), Some(5));
        // Tansu memory:// reports a high watermark behind the true end.
        assert_eq!(lag_of(&p(Some(20), 0, 15)), Some(0));
        // Nothing read yet, log truncated to [100, 150).
        assert_eq!(lag_of(&p(None, 100, 150)), Some(50));
        assert_eq!(lag_of(&p(None, 150, 150)), Some(0));
        assert_eq!(lag_of(&PartitionState::default()), None);
    }
}
