//! The sled denylist: applies batches of revocations and then the Kafka positions they
//! were read up to (invariant 2: a durable position is never ahead of durable data);
//! answers "is this token revoked?" (the revocation model); drops entries that can no
//! longer matter (invariant 4).
//!
//! Everything lives in one sled tree. Keys start with a kind byte:
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `T` `S` `E` `C` | kind, issuer (u16 length-prefixed), identifier | primary u64, expiry u64 |
//! | `I` | kind, issuer | not_before u64, expiry u64 |
//! | `X` | bucket end (unix s) u64, sequence u64 | entry keys (u16 length-prefixed) expiring in that bucket |
//! | `P` | topic (length-prefixed), partition i32 | next offset i64 |
//!
//! `primary` is `not_before` for subject/client/issuer, the latest `event_time` for a
//! session, and the token's `exp` (0 when unknown) for a token. The expiry log groups a
//! batch's entries by time bucket of their expiry (`store.expiry_granularity`, keyed by
//! the bucket's end, so the width may change between runs) into one record, so an event costs
//! one key write rather than two; the GC walks only buckets that have wholly passed and
//! drops an entry only if its current expiry has passed too (an entry extended since is
//! listed again in its later bucket). Every merge is a `max`, so
//! apply is idempotent and commutative (invariant 1). Writers (apply, GC) are serialized by
//! a mutex because merges read before they write; readers never wait.
//!
//! sled 0.34's `Batch` is atomic across a crash but not across a failed write: it is
//! applied key by key in hash order, and a write failing midway (a full disk) leaves the
//! keys already written, which a restart recovers as ordinary writes. So nothing relies
//! on one batch being all or nothing: [`Denylist::apply`] writes the expiry log, then the
//! entries, flushes, and only then the positions; GC removes entries before the records
//! listing them; live-entry counts and the in-memory index are derived from what is
//! stored when the store is opened. After a failed write sled refuses every write until
//! the database is opened again, so the store reports itself failed
//! ([`Denylist::failure`]) until [`Denylist::reopen`].

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::event::{Event, Revocation};

const TOKEN: u8 = b'T';
const SUBJECT: u8 = b'S';
const SESSION: u8 = b'E';
const CLIENT: u8 = b'C';
const ISSUER: u8 = b'I';
const EXPIRY: u8 = b'X';
const POSITION: u8 = b'P';
const COUNT: u8 = b'N';

/// Default width of an expiry-log bucket: entries outlive their expiry by at most this.
pub const DEFAULT_EXPIRY_BUCKET: Duration = Duration::from_secs(600);
/// Expiry-log keys below this are bucket *numbers* of 600 s written by stores before
/// the key became the bucket's end time; [`Denylist::open`] rewrites them.
const LEGACY_BUCKET_LIMIT: u64 = 1_000_000_000;
const LEGACY_BUCKET: u64 = 600;
/// Largest expiry-log record, so no single value grows unbounded with the batch size.
const EXPIRY_RECORD_MAX: usize = 64 * 1024;

const KINDS: [(u8, &str); 5] = [
    (TOKEN, "token"),
    (SUBJECT, "subject"),
    (SESSION, "session"),
    (CLIENT, "client"),
    (ISSUER, "issuer"),
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: corrupt entry under key prefix {0:?}")]
    Corrupt(char),
    /// sled did not let go of the failed database: this process cannot open it again.
    #[error("store: sled did not release the failed database")]
    Stuck,
    /// A write failed earlier; the store takes none until it is reopened.
    #[error("store failed: {0}")]
    Failed(String),
}

/// How long entries of an issuer matter: its longest token lifetime and clock leeway.
#[derive(Debug, Clone)]
pub struct Retention {
    per_issuer: HashMap<String, (u64, u64)>,
    default: (u64, u64),
    /// Expiry-log bucket width in seconds (≥ 1).
    bucket: u64,
}

impl Retention {
    /// `default` applies to issuers revsync is not configured for.
    pub fn new(default_lifetime: Duration, default_leeway: Duration) -> Self {
        Self {
            per_issuer: HashMap::new(),
            default: (default_lifetime.as_secs(), default_leeway.as_secs()),
            bucket: DEFAULT_EXPIRY_BUCKET.as_secs(),
        }
    }

    /// Entries are dropped by the first GC after their expiry's `width`-wide time bucket
    /// ends (at most `width` late). Default [`DEFAULT_EXPIRY_BUCKET`]; at least 1 s.
    pub fn with_expiry_granularity(mut self, width: Duration) -> Self {
        self.bucket = width.as_secs().max(1);
        self
    }

    /// End (unix seconds, exclusive) of the expiry bucket holding `expiry`.
    fn bucket_end(&self, expiry: u64) -> u64 {
        (expiry - expiry % self.bucket).saturating_add(self.bucket)
    }

    pub fn with_issuer(mut self, iss: &str, lifetime: Duration, leeway: Duration) -> Self {
        self.per_issuer
            .insert(iss.to_string(), (lifetime.as_secs(), leeway.as_secs()));
        self
    }

    pub fn from_config(config: &crate::config::Config) -> Self {
        let mut r = Self::new(
            crate::config::DEFAULT_MAX_TOKEN_LIFETIME,
            crate::config::DEFAULT_LEEWAY,
        );
        for i in &config.issuers {
            r = r.with_issuer(&i.issuer, i.max_token_lifetime, i.leeway);
        }
        r.with_expiry_granularity(config.store.expiry_granularity)
    }

    fn of(&self, iss: &str) -> (u64, u64) {
        self.per_issuer.get(iss).copied().unwrap_or(self.default)
    }

    /// (kind byte, issuer, identifier, primary value, expiry) of a revocation. The
    /// expiry is the first second at which no token the entry covers can still be
    /// accepted, so dropping the entry then (or refusing a replay of it as lapsed) changes
    /// no answer. Token validation accepts a token while `now < exp + leeway`, and refuses
    /// one with `exp - iat > lifetime + leeway`. A token covered by a `not_before` has
    /// `iat <= not_before`, so `exp <= not_before + lifetime + leeway`, and is accepted
    /// until `not_before + lifetime + 2 * leeway`. A revoked session or a token revoked
    /// without its `exp` was issued by the event's time, which takes the place of
    /// `not_before`. (A token without `iat` cannot show its lifetime; the issuer's own
    /// limit is trusted for it.)
    fn entry<'a>(&self, event: &'a Event) -> (u8, &'a str, &'a str, u64, u64) {
        let r = &event.revocation;
        let (lifetime, leeway) = self.of(r.iss());
        let outlived = |from: u64| {
            from.saturating_add(lifetime)
                .saturating_add(leeway.saturating_mul(2))
        };
        match r {
            Revocation::Token { iss, jti, exp } => {
                let expiry = match exp {
                    Some(exp) => exp.saturating_add(leeway),
                    None => outlived(event.event_time),
                };
                (TOKEN, iss, jti, exp.unwrap_or(0), expiry)
            }
            Revocation::Subject {
                iss,
                sub,
                not_before,
            } => (SUBJECT, iss, sub, *not_before, outlived(*not_before)),
            Revocation::Session { iss, sid } => (
                SESSION,
                iss,
                sid,
                event.event_time,
                outlived(event.event_time),
            ),
            Revocation::Client {
                iss,
                client_id,
                not_before,
            } => (CLIENT, iss, client_id, *not_before, outlived(*not_before)),
            Revocation::Issuer { iss, not_before } => {
                (ISSUER, iss, "", *not_before, outlived(*not_before))
            }
        }
    }
}

/// The identity claims of a verified token that the revocation model looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenRef<'a> {
    pub iss: &'a str,
    pub jti: Option<&'a str>,
    pub sub: Option<&'a str>,
    pub sid: Option<&'a str>,
    pub client_id: Option<&'a str>,
    /// `None` counts as issued at the beginning of time: a token without `iat` cannot
    /// prove it was issued after a `not_before`, so such revocations cover it.
    pub iat: Option<u64>,
}

/// A (topic, partition) and the next offset to read from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sizes {
    pub token: u64,
    pub subject: u64,
    pub session: u64,
    pub client: u64,
    pub issuer: u64,
}

impl Sizes {
    pub fn total(&self) -> u64 {
        self.token + self.subject + self.session + self.client + self.issuer
    }
}

/// One stored revocation, as `revsync denylist dump` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub kind: &'static str,
    pub iss: String,
    /// jti, sub, sid or client_id; empty for issuer entries.
    pub id: String,
    /// `not_before` (subject, client, issuer), latest `event_time` (session), `exp` or 0
    /// (token).
    pub value: u64,
    /// Unix time after which the entry can no longer affect a valid token.
    pub expires: u64,
}

/// What one GC pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcOutcome {
    /// Entries dropped, by kind.
    pub dropped: BTreeMap<&'static str, u64>,
    /// The pass stopped at its limit; more expired records may remain.
    pub more: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Entries created or extended.
    pub changed: usize,
    /// Revocations that were already covered by the store (duplicates, replays).
    pub unchanged: usize,
    /// Revocations that can no longer affect any valid token, so were not stored.
    pub already_expired: usize,
}

pub struct Denylist {
    /// The open database; `None` only between closing a failed one and opening it again.
    store: RwLock<Option<Store>>,
    /// Where the store lives and its page cache size, to reopen it; `None` for a
    /// temporary store.
    location: Option<(PathBuf, u64)>,
    retention: Retention,
    write: Mutex<()>,
    counts: [AtomicU64; 5],
    index: Index,
    /// Why the store stopped taking writes. sled 0.34 keeps an I/O error (a full disk)
    /// until the database is opened again, so nothing is written until [`Self::reopen`].
    failure: RwLock<Option<String>>,
    /// `failure` is set (read on every write, so kept apart from the lock).
    failing: AtomicBool,
}

struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

impl Store {
    fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        remove_unfinished_snapshots(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Self::new(db)
    }

    fn new(db: sled::Db) -> Result<Self, StoreError> {
        let tree = db.open_tree("denylist")?;
        Ok(Self { db, tree })
    }
}

/// The read side of the store, in memory: every live entry's 128-bit keyed hash and its
/// primary value. Checks never touch sled (a miss costs a few hashes and map probes
/// instead of five B-tree walks); sled stays the durable truth the index is rebuilt from
/// at open and updated after each successful write. 128 random bits make a collision
/// between two live keys (which could hide a revocation) practically impossible.
struct Index {
    shards: Box<[RwLock<HashMap<IndexKey, u64, IdentityBuild>>]>,
    k1: RandomState,
    k2: RandomState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct IndexKey(u64, u64);

impl std::hash::Hash for IndexKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: the map need not hash it again.
        state.write_u64(self.0);
    }
}

#[derive(Default, Clone, Copy)]
struct IdentityBuild;
#[derive(Default)]
struct IdentityHasher(u64);
impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}
impl BuildHasher for IdentityBuild {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher::default()
    }
}

const INDEX_SHARDS: usize = 16;

impl Index {
    fn new() -> Self {
        Self {
            shards: (0..INDEX_SHARDS)
                .map(|_| RwLock::new(HashMap::with_hasher(IdentityBuild)))
                .collect(),
            k1: RandomState::new(),
            k2: RandomState::new(),
        }
    }

    fn key(&self, entry: &[u8]) -> IndexKey {
        let mut a = self.k1.build_hasher();
        a.write(entry);
        let mut b = self.k2.build_hasher();
        b.write(entry);
        IndexKey(a.finish(), b.finish())
    }

    fn shard(&self, k: IndexKey) -> &RwLock<HashMap<IndexKey, u64, IdentityBuild>> {
        &self.shards[(k.1 % INDEX_SHARDS as u64) as usize]
    }

    fn get(&self, entry: &[u8]) -> Option<u64> {
        let k = self.key(entry);
        let shard = self.shard(k).read().unwrap_or_else(|p| p.into_inner());
        shard.get(&k).copied()
    }

    fn set(&self, entry: &[u8], primary: u64) {
        let k = self.key(entry);
        let mut shard = self.shard(k).write().unwrap_or_else(|p| p.into_inner());
        shard.insert(k, primary);
    }

    fn remove(&self, entry: &[u8]) {
        let k = self.key(entry);
        let mut shard = self.shard(k).write().unwrap_or_else(|p| p.into_inner());
        shard.remove(&k);
    }

    /// Replaces the whole index with `entries` (key, primary). The new maps are built
    /// first, so a lookup never waits for the scan.
    fn rebuild(
        &self,
        entries: impl Iterator<Item = (sled::IVec, u64)>,
    ) -> Vec<HashMap<IndexKey, u64, IdentityBuild>> {
        let mut fresh: Vec<HashMap<IndexKey, u64, IdentityBuild>> = (0..INDEX_SHARDS)
            .map(|_| HashMap::with_hasher(IdentityBuild))
            .collect();
        for (entry, primary) in entries {
            let k = self.key(&entry);
            fresh[(k.1 % INDEX_SHARDS as u64) as usize].insert(k, primary);
        }
        fresh
    }

    fn replace(&self, fresh: Vec<HashMap<IndexKey, u64, IdentityBuild>>) {
        for (shard, mut map) in self.shards.iter().zip(fresh) {
            std::mem::swap(
                &mut *shard.write().unwrap_or_else(|p| p.into_inner()),
                &mut map,
            );
        }
    }
}

impl Denylist {
    /// Opens (or creates) the store at `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64, retention: Retention) -> Result<Self, StoreError> {
        let store = Store::open(path, cache_bytes)?;
        Self::with_store(store, Some((path.to_path_buf(), cache_bytes)), retention)
    }

    /// A store that lives in memory only (tests, benchmarks); it cannot be reopened.
    pub fn temporary(retention: Retention) -> Result<Self, StoreError> {
        let store = Store::new(sled::Config::new().temporary(true).open()?)?;
        Self::with_store(store, None, retention)
    }

    fn with_store(
        store: Store,
        location: Option<(PathBuf, u64)>,
        retention: Retention,
    ) -> Result<Self, StoreError> {
        let denylist = Self {
            store: RwLock::new(None),
            location,
            retention,
            write: Mutex::new(()),
            counts: Default::default(),
            index: Index::new(),
            failure: RwLock::new(None),
            failing: AtomicBool::new(false),
        };
        denylist.load(store)?;
        Ok(denylist)
    }

    /// Makes `store` the one in use, with the counts and the index taken from what it
    /// holds: after a failed write it may hold part of a batch, and the in-memory view
    /// must follow what is stored, not what a write believed it changed.
    fn load(&self, store: Store) -> Result<(), StoreError> {
        migrate_legacy_buckets(&store.tree)?;
        drop_legacy_counts(&store.tree)?;
        let mut counts = [0u64; 5];
        let mut entries = Vec::new();
        for (i, (kind, _)) in KINDS.iter().enumerate() {
            for item in store.tree.scan_prefix([*kind]) {
                let (k, v) = item?;
                entries.push((k, decode_entry(&v)?[0]));
                counts[i] += 1;
            }
        }
        let fresh = self.index.rebuild(entries.into_iter());
        self.index.replace(fresh);
        for (count, n) in self.counts.iter().zip(counts) {
            count.store(n, Ordering::Relaxed);
        }
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(store);
        Ok(())
    }

    /// Why the store refuses writes, if it does: nothing is written until [`Self::reopen`]
    /// succeeds.
    pub fn failure(&self) -> Option<String> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        self.failure
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records that a write failed: sled keeps its I/O error until the database is
    /// opened again, so every later write would fail too, and what the failed write
    /// left in memory may differ from what reached the disk.
    fn fail(&self, error: StoreError) -> StoreError {
        let mut failure = self.failure.write().unwrap_or_else(|p| p.into_inner());
        if failure.is_none() {
            tracing::error!(error = %error, "the store refused a write: no more writes until it is reopened");
            *failure = Some(error.to_string());
        }
        self.failing.store(true, Ordering::Release);
        error
    }

    /// Closes the failed database and opens it again from disk (sled clears its I/O
    /// error only then), recounting the entries and rebuilding the index from what is
    /// stored. Whatever was written but not flushed may be gone: positions are only
    /// ever stored after the data they cover was flushed, so reading on from the stored
    /// positions applies it again.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let Some((path, cache_bytes)) = &self.location else {
            return Err(StoreError::Failed(
                "a temporary store cannot be reopened".into(),
            ));
        };
        // sled locks its directory: the old handle must be gone before it opens again.
        let old = self.store.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(old) = old {
            if !close(old) {
                return Err(StoreError::Stuck);
            }
        }
        self.load(Store::open(path, *cache_bytes)?)?;
        *self.failure.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.failing.store(false, Ordering::Release);
        tracing::info!(store = %path.display(), "store reopened");
        Ok(())
    }

    /// The open store, unless a write failed since it was opened.
    fn usable<'a>(
        &self,
        store: &'a std::sync::RwLockReadGuard<'_, Option<Store>>,
    ) -> Result<&'a Store, StoreError> {
        match (store.as_ref(), self.failure()) {
            (Some(s), None) => Ok(s),
            (_, Some(why)) => Err(StoreError::Failed(why)),
            (None, None) => Err(StoreError::Failed("store closed".into())),
        }
    }

    fn read_store(&self) -> std::sync::RwLockReadGuard<'_, Option<Store>> {
        self.store.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `events` durably, then records `positions` (invariant 2: a durable
    /// position is never ahead of durable data). Three writes, in this order:
    /// 1. the expiry-log records of the changed entries;
    /// 2. the entries themselves — sled 0.34 applies a batch key by key, in hash order,
    ///    and a write that fails midway (a full disk) leaves the keys already written;
    ///    with the expiry log first, an entry that landed is always listed in it;
    /// 3. after a flush made 1 and 2 durable, the positions. They need no flush of their
    ///    own: lost in a crash, the batch is read again, and applying is idempotent.
    ///
    /// Returns once the events are on disk, so callers may acknowledge them (a 202 from
    /// the push receiver). Events whose effect has already lapsed at `now` are not
    /// stored. Any error leaves the store failed until [`Self::reopen`].
    pub fn apply(
        &self,
        events: &[Event],
        positions: &[Position],
        now: u64,
    ) -> Result<ApplyOutcome, StoreError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let guard = self.read_store();
        let store = self.usable(&guard)?;
        self.apply_to(store, events, positions, now)
            .map_err(|e| self.fail(e))
    }

    fn apply_to(
        &self,
        store: &Store,
        events: &[Event],
        positions: &[Position],
        now: u64,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut outcome = ApplyOutcome::default();
        // Later events in the same batch must merge with earlier ones, not with the
        // stored value, so pending writes are tracked here.
        let mut pending: HashMap<Vec<u8>, [u64; 2]> = HashMap::new();
        let mut entries = sled::Batch::default();
        let mut count_delta = [0i64; 5];
        let mut expiring: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for event in events {
            let (kind, iss, id, primary, expiry) = self.retention.entry(event);
            if expiry <= now {
                outcome.already_expired += 1;
                continue;
            }
            let key = entry_key(kind, iss, id);
            let old = match pending.get(&key) {
                Some(v) => Some(*v),
                None => store
                    .tree
                    .get(&key)?
                    .map(|v| decode_entry(&v))
                    .transpose()?,
            };
            let new = match old {
                Some([p, x]) => [p.max(primary), x.max(expiry)],
                None => [primary, expiry],
            };
            if old == Some(new) {
                outcome.unchanged += 1;
                continue;
            }
            if old.is_none() {
                count_delta[kind_index(kind)] += 1;
            }
            if old.map(|[_, x]| x) != Some(new[1]) {
                let list = expiring
                    .entry(self.retention.bucket_end(new[1]))
                    .or_default();
                push_prefixed(list, &key);
            }
            entries.insert(key.clone(), &encode_entry(new)[..]);
            pending.insert(key, new);
            outcome.changed += 1;
        }
        if !expiring.is_empty() {
            let mut log = sled::Batch::default();
            for (bucket, list) in expiring {
                for chunk in split_prefixed_list(&list, EXPIRY_RECORD_MAX) {
                    log.insert(expiry_key(bucket, store.db.generate_id()?), chunk);
                }
            }
            store.tree.apply_batch(log)?;
        }
        if !pending.is_empty() {
            store.tree.apply_batch(entries)?;
        }
        flush_db(&store.db)?;
        // Only now do checks and counts see the batch: whatever revsync acts on or
        // reports is on disk.
        self.commit_counts(&count_delta);
        for (key, [primary, _]) in &pending {
            self.index.set(key, *primary);
        }
        if !positions.is_empty() {
            let mut batch = sled::Batch::default();
            for p in positions {
                batch.insert(
                    position_key(&p.topic, p.partition),
                    &p.next_offset.to_be_bytes()[..],
                );
            }
            store.tree.apply_batch(batch)?;
        }
        Ok(outcome)
    }

    /// Drops entries whose expiry has passed, walking at most `limit` expiry-log records
    /// of buckets that ended at or before `now`.
    pub fn gc(&self, now: u64, limit: usize) -> Result<GcOutcome, StoreError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let guard = self.read_store();
        let store = self.usable(&guard)?;
        self.gc_in(store, now, limit).map_err(|e| self.fail(e))
    }

    fn gc_in(&self, store: &Store, now: u64, limit: usize) -> Result<GcOutcome, StoreError> {
        let mut entries = sled::Batch::default();
        let mut records = sled::Batch::default();
        let mut count_delta = [0i64; 5];
        let mut removed: HashSet<Vec<u8>> = HashSet::new();
        let end = expiry_key(now.saturating_add(1), 0);
        let mut walked = 0;
        for item in store.tree.range(vec![EXPIRY]..end).take(limit) {
            let (xkey, list) = item?;
            let bucket_end = read_u64(&xkey, 1).ok_or(StoreError::Corrupt('X'))?;
            records.remove(xkey);
            walked += 1;
            let mut rest = &list[..];
            while !rest.is_empty() {
                let (entry, tail) = split_prefixed(rest).ok_or(StoreError::Corrupt('X'))?;
                rest = tail;
                if removed.contains(entry) {
                    continue;
                }
                let Some(v) = store.tree.get(entry)? else {
                    continue;
                };
                // Extended past this bucket since it was listed here: the bucket of its
                // current expiry drops it. (Not `> now`: an entry listed in several
                // buckets must go at the same moment whichever record is walked first,
                // so that how events were batched never shows; bucket_end <= now.)
                if decode_entry(&v)?[1] >= bucket_end {
                    continue;
                }
                entries.remove(entry);
                count_delta[kind_index(entry[0])] -= 1;
                removed.insert(entry.to_vec());
            }
        }
        // The entries first, then the records listing them: a write failing midway must
        // never leave an entry that no record lists (it would never be dropped).
        if !removed.is_empty() {
            store.tree.apply_batch(entries)?;
            self.commit_counts(&count_delta);
            for entry in &removed {
                self.index.remove(entry);
            }
        }
        if walked > 0 {
            store.tree.apply_batch(records)?;
        }
        Ok(GcOutcome {
            dropped: KINDS
                .iter()
                .enumerate()
                .filter(|(i, _)| count_delta[*i] != 0)
                .map(|(i, (_, name))| (*name, count_delta[i].unsigned_abs()))
                .collect(),
            more: walked == limit,
        })
    }

    fn commit_counts(&self, delta: &[i64; 5]) {
        for (i, d) in delta.iter().enumerate() {
            if *d != 0 {
                let v = (self.counts[i].load(Ordering::Relaxed) as i64 + d).max(0) as u64;
                self.counts[i].store(v, Ordering::Relaxed);
            }
        }
    }

    /// The first rule of the model that revokes `token`, or `None` if it is not revoked.
    /// Returns the kind word (`token`, `session`, `subject`, `client`, `issuer`).
    pub fn revoked_by(&self, token: &TokenRef<'_>) -> Result<Option<&'static str>, StoreError> {
        let iat = token.iat.unwrap_or(0);
        let mut key = Vec::with_capacity(64);
        let checks = [
            (TOKEN, token.jti, "token"),
            (SESSION, token.sid, "session"),
            (SUBJECT, token.sub, "subject"),
            (CLIENT, token.client_id, "client"),
            (ISSUER, Some(""), "issuer"),
        ];
        for (kind, id, word) in checks {
            let Some(id) = id else { continue };
            fill_entry_key(&mut key, kind, token.iss, id);
            let Some(primary) = self.index.get(&key) else {
                continue;
            };
            // Token and session entries revoke outright; the others by not_before. Times
            // are whole seconds and the order of a token and a revocation inside one
            // second is unknown, so a token issued in the revocation's second is revoked
            // (the safe side): iat <= not_before.
            if kind == TOKEN || kind == SESSION || primary >= iat {
                return Ok(Some(word));
            }
        }
        Ok(None)
    }

    /// Sets one stored position as is, with no data: the one way to move a position
    /// without applying what lies before it, for a log that was reset or truncated under
    /// it (see `ingest`). Serialized with [`Self::apply`] and [`Self::gc`], so it never
    /// lands inside a batch; returns the position it replaced.
    pub fn reset_position(&self, position: &Position) -> Result<Option<i64>, StoreError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let guard = self.read_store();
        let store = self.usable(&guard)?;
        let old = store
            .tree
            .insert(
                position_key(&position.topic, position.partition),
                &position.next_offset.to_be_bytes()[..],
            )
            .map_err(|e| self.fail(e.into()))?;
        old.map(|v| {
            (&v[..])
                .try_into()
                .map(i64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt('P'))
        })
        .transpose()
    }

    /// Stored positions: the next offset of each (topic, partition).
    pub fn positions(&self) -> Result<Vec<Position>, StoreError> {
        let guard = self.read_store();
        let store = self.usable(&guard)?;
        let mut out = Vec::new();
        for item in store.tree.scan_prefix([POSITION]) {
            let (k, v) = item?;
            let (topic, rest) = split_prefixed(&k[1..]).ok_or(StoreError::Corrupt('P'))?;
            let partition =
                i32::from_be_bytes(rest.try_into().map_err(|_| StoreError::Corrupt('P'))?);
            let next_offset =
                i64::from_be_bytes((&v[..]).try_into().map_err(|_| StoreError::Corrupt('P'))?);
            out.push(Position {
                topic: String::from_utf8_lossy(topic).into_owned(),
                partition,
                next_offset,
            });
        }
        Ok(out)
    }

    /// Live entries by kind.
    pub fn sizes(&self) -> Sizes {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        Sizes {
            token: c(0),
            subject: c(1),
            session: c(2),
            client: c(3),
            issuer: c(4),
        }
    }

    /// Forces everything written so far to disk ([`Self::apply`] already flushes its
    /// data; this is for GC's writes and the last positions, at shutdown).
    pub fn flush(&self) -> Result<usize, StoreError> {
        let guard = self.read_store();
        let store = self.usable(&guard)?;
        flush_db(&store.db).map_err(|e| self.fail(e))
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.read_store()
            .as_ref()
            .and_then(|s| s.db.size_on_disk().ok())
            .unwrap_or(0)
    }

    /// Every entry in key order: for `revsync denylist dump` and for tests comparing
    /// whole stores.
    pub fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let guard = self.read_store();
        let store = guard
            .as_ref()
            .ok_or_else(|| StoreError::Failed("store closed".into()))?;
        let mut out = Vec::new();
        for (kind, word) in KINDS {
            for item in store.tree.scan_prefix([kind]) {
                let (k, v) = item?;
                let (iss, id) = split_prefixed(&k[1..]).ok_or(StoreError::Corrupt(kind as char))?;
                let [value, expires] = decode_entry(&v)?;
                out.push(Entry {
                    kind: word,
                    iss: String::from_utf8_lossy(iss).into_owned(),
                    id: String::from_utf8_lossy(id).into_owned(),
                    value,
                    expires,
                });
            }
        }
        Ok(out)
    }

    /// The tree itself, for unit tests that look at the layout.
    #[cfg(test)]
    fn tree(&self) -> sled::Tree {
        self.read_store().as_ref().expect("open").tree.clone()
    }

    /// Entries the expiry log does not list (each should be listed, or GC would never
    /// drop it): for tests of what a failed write leaves behind. Walks the whole store.
    pub fn unlisted_entries(&self) -> Result<Vec<Entry>, StoreError> {
        let guard = self.read_store();
        let store = guard
            .as_ref()
            .ok_or_else(|| StoreError::Failed("store closed".into()))?;
        let mut listed: HashSet<Vec<u8>> = HashSet::new();
        for item in store.tree.scan_prefix([EXPIRY]) {
            let (_, list) = item?;
            let mut rest = &list[..];
            while !rest.is_empty() {
                let (entry, tail) = split_prefixed(rest).ok_or(StoreError::Corrupt('X'))?;
                listed.insert(entry.to_vec());
                rest = tail;
            }
        }
        let all = self.entries()?;
        Ok(all
            .into_iter()
            .filter(|e| {
                let kind = KINDS.iter().find(|(_, w)| *w == e.kind).map(|(k, _)| *k);
                kind.is_some_and(|k| !listed.contains(&entry_key(k, &e.iss, &e.id)))
            })
            .collect())
    }
}

fn kind_index(kind: u8) -> usize {
    KINDS
        .iter()
        .position(|(k, _)| *k == kind)
        .expect("known kind")
}

fn fill_entry_key(key: &mut Vec<u8>, kind: u8, iss: &str, id: &str) {
    key.clear();
    key.push(kind);
    push_prefixed(key, iss.as_bytes());
    key.extend_from_slice(id.as_bytes());
}

fn entry_key(kind: u8, iss: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + iss.len() + id.len());
    fill_entry_key(&mut k, kind, iss, id);
    k
}

/// How long a flush may wait before another one is started to wake it (see [`flush_db`]).
const FLUSH_KICK: Duration = Duration::from_millis(500);

/// Runs `work` (a flush, or dropping the last handle, which flushes) so that it cannot
/// hang. sled 0.34 can lose the wake-up of a flush waiting for its log to become stable
/// when a write-out fails (a full disk): the waiter then sleeps forever, holding
/// whatever lock its caller holds. Another flush that finds sled's error wakes every
/// waiter, so while `work` has not returned, one more flush of `db` is started every
/// [`FLUSH_KICK`]; work that is merely slow is unharmed (the extra flushes return with it).
fn kicked<T: Send + 'static>(
    db: &sled::Db,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("revsync-store".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| StoreError::Sled(e.into()))?;
    loop {
        match rx.recv_timeout(FLUSH_KICK) {
            Ok(out) => return Ok(out),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let db = db.clone();
                let _ = std::thread::Builder::new()
                    .name("revsync-flush-kick".into())
                    .spawn(move || {
                        let _ = db.flush();
                    });
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(StoreError::Failed("a store thread died".into()))
            }
        }
    }
}

/// `db.flush()`, which cannot hang (see [`kicked`]).
fn flush_db(db: &sled::Db) -> Result<usize, StoreError> {
    let handle = db.clone();
    Ok(kicked(db, move || handle.flush())??)
}

/// How long closing a database may take once its other handles are gone.
const CLOSE_LAST: Duration = Duration::from_secs(10);

/// Closes a database without hanging: sled flushes when its last handle goes (see
/// [`kicked`]). Kicking needs a handle of its own, dropped last, where nothing can kick:
/// that last drop gets [`CLOSE_LAST`] on a thread of its own. `false` if it is still
/// stuck then: sled keeps the directory locked, so this process can never open the
/// store again (see [`StoreError::Stuck`]).
fn close(store: Store) -> bool {
    let kick = store.db.clone();
    let _ = kicked(&kick, move || drop(store));
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("revsync-store-close".into())
        .spawn(move || {
            drop(kick);
            let _ = tx.send(());
        });
    spawned.is_ok() && rx.recv_timeout(CLOSE_LAST).is_ok()
}

impl Drop for Denylist {
    fn drop(&mut self) {
        let store = self
            .store
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(store) = store {
            close(store);
        }
    }
}

/// Removes snapshot files sled began and never finished. sled 0.34 writes a snapshot to
/// `snap.<lsn>.generating` and renames it when complete, but when it looks for the
/// newest snapshot it also takes the unfinished ones: one left by a write that failed
/// (a full disk) is read as corrupt, and the store no longer opens. Without it sled
/// recovers from an older snapshot and the log.
fn remove_unfinished_snapshots(path: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::Sled(e.into())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing an unfinished sled snapshot");
            std::fs::remove_file(entry.path()).map_err(|e| StoreError::Sled(e.into()))?;
        }
    }
    Ok(())
}

/// Removes the live-entry counts stores kept before counting at open: they were
/// written with each batch, and a batch that failed midway could leave them wrong.
fn drop_legacy_counts(tree: &sled::Tree) -> Result<(), StoreError> {
    for (kind, _) in KINDS {
        if tree.contains_key([COUNT, kind])? {
            tree.remove([COUNT, kind])?;
        }
    }
    Ok(())
}

/// Rewrites expiry-log keys holding a bucket number of the old fixed 600 s width into
/// the bucket's end time, in one batch. A no-op on stores written since.
fn migrate_legacy_buckets(tree: &sled::Tree) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut moved = 0usize;
    for item in tree.range(vec![EXPIRY]..expiry_key(LEGACY_BUCKET_LIMIT, 0)) {
        let (key, list) = item?;
        let bucket = read_u64(&key, 1).ok_or(StoreError::Corrupt('X'))?;
        let seq = read_u64(&key, 9).ok_or(StoreError::Corrupt('X'))?;
        batch.remove(key);
        batch.insert(expiry_key((bucket + 1) * LEGACY_BUCKET, seq), list);
        moved += 1;
    }
    if moved > 0 {
        tree.apply_batch(batch)?;
        tracing::info!(records = moved, "expiry log rewritten to bucket end times");
    }
    Ok(())
}

fn expiry_key(bucket: u64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(EXPIRY);
    k.extend_from_slice(&bucket.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Splits a list of length-prefixed items into runs of at most `max` bytes, never
/// cutting an item.
fn split_prefixed_list(list: &[u8], max: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut start, mut at) = (0, 0);
    while at < list.len() {
        let len = u16::from_be_bytes([list[at], list[at + 1]]) as usize;
        let next = at + 2 + len;
        if next - start > max && at > start {
            out.push(&list[start..at]);
            start = at;
        }
        at = next;
    }
    if start < list.len() {
        out.push(&list[start..]);
    }
    out
}

fn position_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = vec![POSITION];
    push_prefixed(&mut k, topic.as_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Issuers and topics are length-prefixed so no byte in them can be confused with a
/// separator. Longer ones are truncated to 65535 bytes, which no real issuer reaches.
fn push_prefixed(k: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    k.extend_from_slice(&(s.len() as u16).to_be_bytes());
    k.extend_from_slice(s);
}

fn split_prefixed(k: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u16::from_be_bytes(k.get(..2)?.try_into().ok()?) as usize;
    let s = k.get(2..2 + len)?;
    Some((s, &k[2 + len..]))
}

fn read_u64(v: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(at..at + 8)?.try_into().ok()?))
}

fn encode_entry(v: [u64; 2]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&v[0].to_be_bytes());
    out[8..].copy_from_slice(&v[1].to_be_bytes());
    out
}

fn decode_entry(v: &[u8]) -> Result<[u64; 2], StoreError> {
    match (read_u64(v, 0), read_u64(v, 8)) {
        (Some(a), Some(b)) => Ok([a, b]),
        _ => Err(StoreError::Corrupt('?')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: u64 = 3600;

    fn store() -> Denylist {
        Denylist::temporary(Retention::new(
            Duration::from_secs(HOUR),
            Duration::from_secs(0),
        ))
        .unwrap()
    }

    fn ev(t: u64, r: Revocation) -> Event {
        Event {
            id: format!("{t}"),
            event_time: t,
            revocation: r,
            reason: None,
        }
    }

    fn tok<'a>(iat: u64) -> TokenRef<'a> {
        TokenRef {
            iss: "I",
            jti: Some("J"),
            sub: Some("S"),
            sid: Some("X"),
            client_id: Some("C"),
            iat: Some(iat),
        }
    }

    #[test]
    fn each_rule_of_the_model_matches_only_its_tokens() {
        let cases: Vec<(Revocation, &str)> = vec![
            (
                Revocation::Token {
                    iss: "I".into(),
                    jti: "J".into(),
                    exp: Some(5000),
                },
                "token",
            ),
            (
                Revocation::Session {
                    iss: "I".into(),
                    sid: "X".into(),
                },
                "session",
            ),
            (
                Revocation::Subject {
                    iss: "I".into(),
                    sub: "S".into(),
                    not_before: 1000,
                },
                "subject",
            ),
            (
                Revocation::Client {
                    iss: "I".into(),
                    client_id: "C".into(),
                    not_before: 1000,
                },
                "client",
            ),
            (
                Revocation::Issuer {
                    iss: "I".into(),
                    not_before: 1000,
                },
                "issuer",
            ),
        ];
        for (r, word) in cases {
            let d = store();
            d.apply(&[ev(1000, r.clone())], &[], 1000).unwrap();
            assert_eq!(d.revoked_by(&tok(999)).unwrap(), Some(word), "{r:?}");
            let other_iss = TokenRef {
                iss: "I2",
                ..tok(999)
            };
            assert_eq!(
                d.revoked_by(&other_iss).unwrap(),
                None,
                "{r:?} other issuer"
            );
            let unrelated = TokenRef {
                jti: Some("J2"),
                sub: Some("S2"),
                sid: Some("X2"),
                client_id: Some("C2"),
                ..tok(999)
            };
            let expect_unrelated = if word == "issuer" {
                Some("issuer")
            } else {
                None
            };
            assert_eq!(
                d.revoked_by(&unrelated).unwrap(),
                expect_unrelated,
                "{r:?} unrelated"
            );
            // not_before rules cover tokens issued in the revocation's own second (which
            // came first is unknown) and spare those issued after it.
            assert_eq!(
                d.revoked_by(&tok(1000)).unwrap(),
                Some(word),
                "{r:?} same-second token"
            );
            let later = d.revoked_by(&tok(1001)).unwrap();
            match word {
                "token" | "session" => assert_eq!(later, Some(word)),
                _ => assert_eq!(later, None, "{r:?} later token"),
            }
            // A token without iat cannot prove it is newer.
            let no_iat = TokenRef {
                iat: None,
                ..tok(0)
            };
            assert_eq!(d.revoked_by(&no_iat).unwrap(), Some(word));
        }
    }

    #[test]
    fn entries_live_until_nothing_they_cover_can_validate() {
        // lifetime 3600, leeway 30: a covered token has iat <= not_before and
        // exp <= iat + 3600 + 30, and is accepted while now < exp + 30.
        let d = Denylist::temporary(Retention::new(
            Duration::from_secs(HOUR),
            Duration::from_secs(30),
        ))
        .unwrap();
        let iss = || "I".to_string();
        let events = [
            ev(
                1000,
                Revocation::Subject {
                    iss: iss(),
                    sub: "S".into(),
                    not_before: 900,
                },
            ),
            ev(
                1000,
                Revocation::Client {
                    iss: iss(),
                    client_id: "C".into(),
                    not_before: 900,
                },
            ),
            ev(
                1000,
                Revocation::Issuer {
                    iss: iss(),
                    not_before: 900,
                },
            ),
            ev(
                1000,
                Revocation::Session {
                    iss: iss(),
                    sid: "X".into(),
                },
            ),
            ev(
                1000,
                Revocation::Token {
                    iss: iss(),
                    jti: "J".into(),
                    exp: Some(2000),
                },
            ),
            ev(
                1000,
                Revocation::Token {
                    iss: iss(),
                    jti: "K".into(),
                    exp: None,
                },
            ),
        ];
        d.apply(&events, &[], 1000).unwrap();
        let expires: Vec<(&str, String, u64)> = d
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.id, e.expires))
            .collect();
        let want = |kind, id: &str, expires| (kind, id.to_string(), expires);
        for entry in [
            want("subject", "S", 900 + 3600 + 60),
            want("client", "C", 900 + 3600 + 60),
            want("issuer", "", 900 + 3600 + 60),
            want("session", "X", 1000 + 3600 + 60),
            want("token", "J", 2000 + 30),
            want("token", "K", 1000 + 3600 + 60),
        ] {
            assert!(expires.contains(&entry), "{entry:?} in {expires:?}");
        }
        // A replay is dropped as lapsed exactly when its entry would have expired.
        let replay = |now| d.apply(&events[..1], &[], now).unwrap();
        let fresh = Denylist::temporary(Retention::new(
            Duration::from_secs(HOUR),
            Duration::from_secs(30),
        ))
        .unwrap();
        assert_eq!(fresh.apply(&events[..1], &[], 4559).unwrap().changed, 1);
        assert_eq!(replay(4560).already_expired, 1);
    }

    #[test]
    fn not_before_only_moves_forward() {
        let d = store();
        let sub = |nb| {
            ev(
                nb,
                Revocation::Subject {
                    iss: "I".into(),
                    sub: "S".into(),
                    not_before: nb,
                },
            )
        };
        d.apply(&[sub(2000)], &[], 0).unwrap();
        let out = d.apply(&[sub(1500)], &[], 0).unwrap();
        assert_eq!(out.unchanged, 1);
        assert_eq!(d.revoked_by(&tok(1999)).unwrap(), Some("subject"));
        assert_eq!(d.sizes().subject, 1);
    }

    #[test]
    fn a_reset_position_moves_back_and_apply_carries_on_from_it() {
        let d = store();
        let p = |o| Position {
            topic: "t".into(),
            partition: 1,
            next_offset: o,
        };
        let other = Position {
            topic: "t".into(),
            partition: 0,
            next_offset: 7,
        };
        assert_eq!(d.reset_position(&p(5)).unwrap(), None);
        d.apply(&[], &[p(40), other.clone()], 0).unwrap();
        assert_eq!(d.reset_position(&p(0)).unwrap(), Some(40));
        assert_eq!(d.positions().unwrap(), vec![other.clone(), p(0)]);
        d.apply(&[], &[p(3)], 0).unwrap();
        assert_eq!(d.positions().unwrap(), vec![other, p(3)]);
    }

    #[test]
    fn gc_drops_exactly_the_entries_that_no_longer_matter() {
        let d = store();
        d.apply(
            &[
                ev(
                    100,
                    Revocation::Token {
                        iss: "I".into(),
                        jti: "a".into(),
                        exp: Some(500),
                    },
                ),
                ev(
                    100,
                    Revocation::Token {
                        iss: "I".into(),
                        jti: "b".into(),
                        exp: None,
                    },
                ),
                ev(
                    100,
                    Revocation::Subject {
                        iss: "I".into(),
                        sub: "s".into(),
                        not_before: 800,
                    },
                ),
            ],
            &[],
            100,
        )
        .unwrap();
        assert_eq!(d.sizes().total(), 3);
        // a expires at 500, in the bucket [0, 600): dropped once that bucket has passed.
        assert!(d.gc(500, 1000).unwrap().dropped.is_empty());
        assert!(d.gc(599, 1000).unwrap().dropped.is_empty());
        let a = TokenRef {
            iss: "I",
            jti: Some("a"),
            ..Default::default()
        };
        assert_eq!(d.revoked_by(&a).unwrap(), Some("token"));
        assert_eq!(d.gc(600, 1000).unwrap().dropped.get("token"), Some(&1));
        assert_eq!(d.sizes().token, 1);
        assert_eq!(
            d.revoked_by(&a).unwrap(),
            None,
            "dropped from the index too"
        );
        // b: event_time + lifetime = 3700, bucket ends 4200.
        assert!(d.gc(4199, 1000).unwrap().dropped.is_empty());
        d.gc(4200, 1000).unwrap();
        assert_eq!(d.sizes().token, 0);
        // s: not_before + lifetime = 4400, bucket ends 4800.
        assert_eq!(d.sizes().subject, 1);
        d.gc(4800, 1000).unwrap();
        assert_eq!(d.sizes().total(), 0);
        assert!(d.entries().unwrap().is_empty());
        assert_eq!(d.tree().scan_prefix([EXPIRY]).count(), 0);
    }

    #[test]
    fn extending_an_entry_moves_its_expiry_index() {
        let d = store();
        let sub = |nb| {
            ev(
                nb,
                Revocation::Subject {
                    iss: "I".into(),
                    sub: "S".into(),
                    not_before: nb,
                },
            )
        };
        d.apply(&[sub(100), sub(1000)], &[], 0).unwrap();
        assert_eq!(d.apply(&[sub(200)], &[], 0).unwrap().unchanged, 1);
        // Listed under 3700's bucket, then under 4600's after the extension.
        assert_eq!(d.tree().scan_prefix([EXPIRY]).count(), 2);
        d.gc(4200, 10).unwrap();
        assert_eq!(d.sizes().subject, 1, "still covered by not_before 1000");
        d.gc(4800, 10).unwrap();
        assert_eq!(d.sizes().subject, 0);
        assert_eq!(d.tree().scan_prefix([EXPIRY]).count(), 0);
    }

    #[test]
    fn expiry_granularity_bounds_how_late_an_entry_is_dropped() {
        let d = Denylist::temporary(
            Retention::new(Duration::from_secs(HOUR), Duration::ZERO)
                .with_expiry_granularity(Duration::from_secs(5)),
        )
        .unwrap();
        let token = |jti: &str, exp| {
            ev(
                100,
                Revocation::Token {
                    iss: "I".into(),
                    jti: jti.into(),
                    exp: Some(exp),
                },
            )
        };
        d.apply(
            &[token("a", 1001), token("b", 1004), token("c", 1005)],
            &[],
            100,
        )
        .unwrap();
        // a and b share the bucket [1000, 1005); c is in [1005, 1010).
        assert!(d.gc(1004, 100).unwrap().dropped.is_empty());
        assert_eq!(d.gc(1005, 100).unwrap().dropped.get("token"), Some(&2));
        assert_eq!(d.sizes().token, 1);
        assert!(d.gc(1009, 100).unwrap().dropped.is_empty());
        assert_eq!(d.gc(1010, 100).unwrap().dropped.get("token"), Some(&1));
        assert_eq!(d.tree().scan_prefix([EXPIRY]).count(), 0);
    }

    #[test]
    fn width_changes_between_runs_and_legacy_bucket_numbers_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let base = Retention::new(Duration::from_secs(HOUR), Duration::ZERO);
        let t = |jti: &'static str| TokenRef {
            iss: "I",
            jti: Some(jti),
            ..Default::default()
        };
        let now = 1_700_000_000;
        {
            let d = Denylist::open(dir.path(), 1 << 20, base.clone()).unwrap();
            let token = |jti: &str, exp| {
                ev(
                    now,
                    Revocation::Token {
                        iss: "I".into(),
                        jti: jti.into(),
                        exp: Some(exp),
                    },
                )
            };
            d.apply(&[token("new", now + 30)], &[], now).unwrap();
            // A record as stores before the bucket-end keys wrote it: bucket number
            // expiry / 600 (here 2_833_333, covering [now - 200, now + 400)).
            d.apply(&[token("old", now + 60)], &[], now).unwrap();
            let old_key = entry_key(TOKEN, "I", "old");
            for item in d.tree().scan_prefix([EXPIRY]) {
                let (k, list) = item.unwrap();
                if list.windows(3).any(|w| w == b"old") {
                    d.tree().remove(&k).unwrap();
                }
            }
            let mut list = Vec::new();
            push_prefixed(&mut list, &old_key);
            d.tree()
                .insert(expiry_key((now + 60) / LEGACY_BUCKET, 7), list)
                .unwrap();
            d.flush().unwrap();
        }
        // Reopened with a 10 s width: both entries go once their buckets end.
        let d = Denylist::open(
            dir.path(),
            1 << 20,
            base.with_expiry_granularity(Duration::from_secs(10)),
        )
        .unwrap();
        assert!(d
            .tree()
            .range(vec![EXPIRY]..expiry_key(LEGACY_BUCKET_LIMIT, 0))
            .next()
            .is_none());
        assert!(
            d.gc(now + 60, 100).unwrap().dropped.is_empty(),
            "600 s bucket not over"
        );
        assert_eq!(d.revoked_by(&t("new")).unwrap(), Some("token"));
        assert_eq!(d.gc(now + 400, 100).unwrap().dropped.get("token"), Some(&2));
        assert_eq!(d.revoked_by(&t("old")).unwrap(), None);
        assert_eq!(d.sizes().total(), 0);
    }

    #[test]
    fn long_expiry_lists_are_split_without_cutting_an_item() {
        let mut list = Vec::new();
        for i in 0..1000u32 {
            push_prefixed(&mut list, format!("entry-{i:04}").as_bytes());
        }
        let chunks = split_prefixed_list(&list, 100);
        assert!(chunks.len() > 100);
        assert!(chunks.iter().all(|c| c.len() <= 100));
        assert_eq!(chunks.concat(), list);
        let mut n = 0;
        for c in chunks {
            let mut rest = c;
            while let Some((_, tail)) = split_prefixed(rest) {
                rest = tail;
                n += 1;
                if rest.is_empty() {
                    break;
                }
            }
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn lapsed_revocations_are_not_stored() {
        let d = store();
        let out = d
            .apply(
                &[ev(
                    10,
                    Revocation::Token {
                        iss: "I".into(),
                        jti: "J".into(),
                        exp: Some(20),
                    },
                )],
                &[],
                100,
            )
            .unwrap();
        assert_eq!(out.already_expired, 1);
        assert_eq!(d.sizes().total(), 0);
    }

    #[test]
    fn counts_and_lookups_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let r = Retention::new(Duration::from_secs(HOUR), Duration::ZERO);
        {
            let d = Denylist::open(dir.path(), 1 << 20, r.clone()).unwrap();
            d.apply(
                &[ev(
                    1,
                    Revocation::Session {
                        iss: "I".into(),
                        sid: "x".into(),
                    },
                )],
                &[],
                1,
            )
            .unwrap();
            d.flush().unwrap();
        }
        let d = Denylist::open(dir.path(), 1 << 20, r).unwrap();
        assert_eq!(d.sizes().session, 1);
        let t = TokenRef {
            iss: "I",
            sid: Some("x"),
            ..Default::default()
        };
        assert_eq!(
            d.revoked_by(&t).unwrap(),
            Some("session"),
            "index rebuilt at open"
        );
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let s = "[a-c]{1,2}";
        let r = prop_oneof![
            (s, s, proptest::option::of(0u64..3000))
                .prop_map(|(iss, jti, exp)| Revocation::Token { iss, jti, exp }),
            (s, s, 0u64..3000).prop_map(|(iss, sub, not_before)| Revocation::Subject {
                iss,
                sub,
                not_before
            }),
            (s, s).prop_map(|(iss, sid)| Revocation::Session { iss, sid }),
            (s, s, 0u64..3000).prop_map(|(iss, client_id, not_before)| Revocation::Client {
                iss,
                client_id,
                not_before
            }),
            (s, 0u64..3000).prop_map(|(iss, not_before)| Revocation::Issuer { iss, not_before }),
        ];
        (r, 0u64..3000).prop_map(|(revocation, t)| Event {
            id: "e".into(),
            event_time: t,
            revocation,
            reason: None,
        })
    }

    proptest! {
        /// Applies and resets of positions, in any mix: each
        /// position ends at the last value written to it, and resets touch no entry.
        #[test]
        fn positions_end_at_the_last_write_and_resets_touch_no_entry(
            ops in proptest::collection::vec(
                (any::<bool>(), 0i32..3, 0i64..1000, proptest::option::of(arb_event())),
                1..40,
            ),
        ) {
            let d = store();
            let mut want: BTreeMap<i32, i64> = BTreeMap::new();
            let mut events = Vec::new();
            for (reset, partition, next_offset, event) in ops {
                let p = Position { topic: "t".into(), partition, next_offset };
                if reset {
                    let old = d.reset_position(&p).unwrap();
                    prop_assert_eq!(old, want.get(&partition).copied());
                } else {
                    let batch: Vec<Event> = event.into_iter().collect();
                    d.apply(&batch, &[p], 1000).unwrap();
                    events.extend(batch);
                }
                want.insert(partition, next_offset);
            }
            let got: BTreeMap<i32, i64> = d
                .positions()
                .unwrap()
                .into_iter()
                .map(|p| (p.partition, p.next_offset))
                .collect();
            prop_assert_eq!(got, want);
            let only_applies = store();
            only_applies.apply(&events, &[], 1000).unwrap();
            prop_assert_eq!(d.entries().unwrap(), only_applies.entries().unwrap());
        }

        /// Invariant 1: any order, any duplicates, any batching → the same denylist.
        #[test]
        fn apply_is_idempotent_and_commutative(
            events in proptest::collection::vec(arb_event(), 0..40),
            seed in any::<u64>(),
            split in 1usize..8,
        ) {
            let now = 1000;
            let a = store();
            a.apply(&events, &[], now).unwrap();

            let mut shuffled: Vec<Event> = events.iter().chain(events.iter()).cloned().collect();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let b = store();
            for chunk in shuffled.chunks(split) {
                b.apply(chunk, &[], now).unwrap();
            }
            prop_assert_eq!(a.entries().unwrap(), b.entries().unwrap());
            prop_assert_eq!(a.sizes(), b.sizes());
            // GC at the same moments leaves the same stores, however they were batched.
            for t in [1200, 3600, 4800, 9000] {
                a.gc(t, usize::MAX).unwrap();
                b.gc(t, usize::MAX).unwrap();
                prop_assert_eq!(a.entries().unwrap(), b.entries().unwrap());
                prop_assert_eq!(a.sizes(), b.sizes());
            }
        }
    }
}
