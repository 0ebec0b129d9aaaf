//! Generated revocations and lookups for the denylist figures of benches/ingest.rs and of
//! the scale and mixed parts of benches/tradeoff.rs: UUID-shaped identifiers in random key
//! order (sequential keys would flatter the B-tree), the mixed event workload, batched
//! `Denylist::apply` with a position per batch as the real reader writes, and the lookup
//! mix of hits and misses.
//!
//! Include with `#[path = "support/workload.rs"] mod workload;`.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::ops::Range;
use std::time::{Duration, Instant};

use revsync::denylist::{ApplyOutcome, Denylist, Position, Retention, TokenRef};
use revsync::event::{Event, Revocation};

/// The issuer of generated revocations.
pub const ISS: &str = "https://issuer.example.com/realms/bench";
/// Events per `Denylist::apply` call.
pub const BATCH: usize = 10_000;
/// The topic and number of partitions the positions of [`apply_batches`] name.
const TOPIC: &str = "revocations";
const PARTITIONS: u64 = 4;

// Identifier namespaces.
pub const NS_TOKEN: u64 = 1;
pub const NS_SUB: u64 = 2;
pub const NS_SID: u64 = 3;
pub const NS_MISS: u64 = 9;

/// Revoked entries kept 24 h, expired ones dropped after 30 s.
pub fn retention() -> Retention {
    Retention::new(Duration::from_secs(24 * 3600), Duration::from_secs(30))
}

/// splitmix64: a well-mixed 64-bit value for each index.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A UUID-shaped identifier (36 characters, like most `jti`/`sid` values) for index `i`
/// in namespace `ns`.
pub fn ident(ns: u64, i: u64, out: &mut String) {
    out.clear();
    let a = mix(i ^ (ns << 56));
    let b = mix(a ^ ns);
    let _ = write!(
        out,
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    );
}

pub fn id_of(ns: u64, i: u64) -> String {
    let mut s = String::with_capacity(36);
    ident(ns, i, &mut s);
    s
}

/// Event `e{i}`: [`ISS`] revokes token `id_of(NS_TOKEN, i)`, expiring at `exp`.
pub fn token_event(i: u64, now: u64, exp: u64) -> Event {
    Event {
        id: format!("e{i}"),
        event_time: now,
        revocation: Revocation::Token {
            iss: ISS.into(),
            jti: id_of(NS_TOKEN, i),
            exp: Some(exp),
        },
        reason: None,
    }
}

/// Revocation `i` of the mixed workload: 85% token, 5% each subject, session and client.
/// Identifiers are fresh except clients, which are few in real life (500 here), so client
/// events mostly merge into an existing entry. Token jtis are `id_of(NS_TOKEN,
/// token_base | i)`, valid for an hour.
pub fn mixed_revocation(iss: &str, i: u64, token_base: u64, now: u64) -> Revocation {
    match i % 20 {
        0 => Revocation::Subject {
            iss: iss.into(),
            sub: id_of(NS_SUB, i),
            not_before: now,
        },
        1 => Revocation::Session {
            iss: iss.into(),
            sid: id_of(NS_SID, i),
        },
        2 => Revocation::Client {
            iss: iss.into(),
            client_id: format!("client-{}", (i / 20) % 500),
            not_before: now,
        },
        _ => Revocation::Token {
            iss: iss.into(),
            jti: id_of(NS_TOKEN, token_base | i),
            exp: Some(now + 3600),
        },
    }
}

/// Applies events `range` built by `make(i, now)` in batches of [`BATCH`], with a position
/// per batch as the real reader writes. After each batch, calls `each(batch, events,
/// took, outcome)`: the batch's index and event range, the time spent inside `apply`
/// (event construction excluded), and what it changed.
pub fn apply_batches(
    d: &Denylist,
    range: Range<u64>,
    now: u64,
    make: impl Fn(u64, u64) -> Event,
    mut each: impl FnMut(u64, Range<u64>, Duration, ApplyOutcome),
) {
    let mut start = range.start;
    let mut batch = 0u64;
    while start < range.end {
        let end = (start + BATCH as u64).min(range.end);
        let events: Vec<Event> = (start..end).map(|i| make(i, now)).collect();
        let positions = [Position {
            topic: TOPIC.into(),
            partition: (batch % PARTITIONS) as i32,
            next_offset: end as i64,
        }];
        let t = Instant::now();
        let outcome = d.apply(&events, &positions, now).expect("apply");
        each(batch, start..end, t.elapsed(), outcome);
        start = end;
        batch += 1;
    }
}

/// The lookup mix: half hits on one of `n` preloaded token jtis (`id_of(NS_TOKEN, i)`,
/// answered by the first check), half misses carrying jti, sid, sub and client_id (every
/// rule consulted), in a fixed pseudo-random order.
pub struct LookupMix {
    rng: u64,
    n: u64,
    jti: String,
    sid: String,
    sub: String,
}

impl LookupMix {
    pub fn new(n: usize) -> Self {
        LookupMix {
            rng: 0x2545_F491_4F6C_DD1D,
            n: n.max(1) as u64,
            jti: String::new(),
            sid: String::new(),
            sub: String::new(),
        }
    }

    /// xorshift64.
    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// The next token to look up (of [`ISS`], issued at `iat`), and whether it is revoked.
    pub fn next(&mut self, iat: u64) -> (TokenRef<'_>, bool) {
        let r = self.random();
        let hit = r & 1 == 0;
        if hit {
            ident(NS_TOKEN, (r >> 1) % self.n, &mut self.jti);
        } else {
            let k = self.random();
            ident(NS_MISS, k, &mut self.jti);
            ident(NS_MISS, k ^ 1, &mut self.sid);
            ident(NS_MISS, k ^ 2, &mut self.sub);
        }
        let token = TokenRef {
            iss: ISS,
            jti: Some(&self.jti),
            sub: Some(&self.sub),
            sid: Some(&self.sid),
            client_id: Some("client-not-revoked"),
            iat: Some(iat),
        };
        (token, hit)
    }
}
