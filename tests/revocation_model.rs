//! A model-based oracle for the revocation rule. A plain reference model, written here
//! without any code of the product, says what a check of each token must answer after
//! any sequence of revocation events (native and Keycloak JSON, duplicated, reordered,
//! replayed long after they lapsed, with garbage in optional fields), garbage
//! collections and restarts of the store; a proptest drives the same steps through the
//! product (decoders, a sled `Denylist` reopened on restart, and `Checker::decide_at` with
//! a real `TokenValidator` against a real JWKS server, at a controlled clock) and compares
//! after every step.
//!
//! The model keeps every event forever and decides from first principles:
//! - a token is refused when it outlives the issuer's lifetime (`exp - iat` above
//!   lifetime + leeway; without `iat`, `exp` further ahead than that), is expired
//!   (`now >= exp + leeway`), or claims an `iat` more than the leeway in the future;
//! - a token that passes is revoked when some event really covers it: its `jti` or `sid`
//!   was revoked after it was issued, or its subject, client or issuer was revoked with a
//!   `not_before` at or after the second it was issued (the order inside one second is
//!   unknown, so the same second counts as before);
//! - a token without `iat` cannot show when it was issued, so every `not_before`
//!   revocation of its subject, client or issuer covers it as long as the revocation must
//!   be kept; once it may have been dropped, either answer is right.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use revsync::api::{Checker, Decision};
use revsync::config::FreshnessConfig;
use revsync::denylist::{Denylist, Retention};
use revsync::freshness::Freshness;
use revsync::ingest::IngestState;
use revsync::token::TokenValidator;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use common::jwt::{JwksServer, TestKey};

/// The issuer's `max_token_lifetime` and `leeway`, in seconds.
const LIFETIME: u64 = 60;
const LEEWAY: u64 = 5;
const AUD: &str = "https://api.example";
const SUBS: [&str; 2] = ["s1", "s2"];
const SIDS: [&str; 3] = ["x1", "x2", "x3"];
const CLIENTS: [&str; 2] = ["c1", "c2"];

// ---------------------------------------------------------------------------------------
// The reference model

/// A token as the model knows it: its claims, and when it was really issued (equal to
/// `iat` when it has one).
#[derive(Debug, Clone)]
struct ModelToken {
    sub: &'static str,
    sid: Option<&'static str>,
    client: Option<&'static str>,
    jti: Option<String>,
    iat: Option<u64>,
    issued: u64,
    exp: u64,
}

/// What one revocation names, with the times the model reasons with (unix seconds).
#[derive(Debug, Clone, PartialEq)]
enum Revoked {
    /// One token; `exp` when the event carried a usable one.
    Jti {
        jti: String,
        exp: Option<u64>,
    },
    /// A session, at `at` (the second the event happened in).
    Sid {
        sid: &'static str,
        at: u64,
    },
    /// Everything of the subject issued in or before second `nb`.
    Sub {
        sub: &'static str,
        nb: u64,
    },
    Client {
        client: &'static str,
        nb: u64,
    },
    Issuer {
        nb: u64,
    },
}

#[derive(Debug, Clone)]
struct ModelEvent {
    what: Revoked,
    /// The second the event happened in.
    at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Refused(&'static str),
    Active,
    Revoked,
    /// Covered only by the rule for tokens without `iat`, by an event that no longer
    /// needs to be kept: revoked while it is, active once it is dropped.
    Either,
}

impl ModelEvent {
    /// Whether the revocation applies to the token in truth (it was issued no later
    /// than the revoked point).
    fn truly_covers(&self, t: &ModelToken) -> bool {
        let issued = t.iat.unwrap_or(t.issued);
        match &self.what {
            Revoked::Jti { jti, .. } => t.jti.as_ref() == Some(jti) && t.issued <= self.at,
            Revoked::Sid { sid, at } => t.sid == Some(*sid) && t.issued <= *at,
            Revoked::Sub { sub, nb } => t.sub == *sub && issued <= *nb,
            Revoked::Client { client, nb } => t.client == Some(*client) && issued <= *nb,
            Revoked::Issuer { nb } => issued <= *nb,
        }
    }

    /// Whether the published rule covers the token: identifiers match outright, and a
    /// token without `iat` counts as issued before any `not_before`.
    fn rule_covers(&self, t: &ModelToken) -> bool {
        let before = |nb: u64| t.iat.is_none_or(|iat| iat <= nb);
        match &self.what {
            Revoked::Jti { jti, .. } => t.jti.as_ref() == Some(jti),
            Revoked::Sid { sid, .. } => t.sid == Some(*sid),
            Revoked::Sub { sub, nb } => t.sub == *sub && before(*nb),
            Revoked::Client { client, nb } => t.client == Some(*client) && before(*nb),
            Revoked::Issuer { nb } => before(*nb),
        }
    }

    /// Until when (exclusive) the revocation can still matter to a token that passes
    /// validation. A covered token was issued by `nb` (or by the event, for a session or a
    /// token without `exp`), so it expires by that + lifetime + leeway, and is accepted
    /// until a leeway after that. A token event's `exp` is the token's own.
    fn needed_until(&self) -> u64 {
        let window = LIFETIME + 2 * LEEWAY;
        match &self.what {
            Revoked::Jti { exp: Some(exp), .. } => exp + LEEWAY,
            Revoked::Jti { exp: None, .. } => self.at + window,
            Revoked::Sid { at, .. } => at + window,
            Revoked::Sub { nb, .. } | Revoked::Client { nb, .. } | Revoked::Issuer { nb } => {
                nb + window
            }
        }
    }
}

fn model_decision(events: &[ModelEvent], t: &ModelToken, now: u64) -> Expect {
    if let Some(iat) = t.iat {
        if t.exp > iat + LIFETIME + LEEWAY {
            return Expect::Refused("lifetime_exceeded");
        }
    }
    if now >= t.exp + LEEWAY {
        return Expect::Refused("expired");
    }
    if t.iat.is_some_and(|iat| iat > now + LEEWAY) {
        return Expect::Refused("not_yet_valid");
    }
    if t.iat.is_none() && t.exp > now + LIFETIME + LEEWAY {
        return Expect::Refused("lifetime_exceeded");
    }
    if events.iter().any(|e| e.truly_covers(t)) {
        return Expect::Revoked;
    }
    let by_rule = || events.iter().filter(|e| e.rule_covers(t));
    if by_rule().any(|e| e.needed_until() > now) {
        Expect::Revoked
    } else if by_rule().next().is_some() {
        Expect::Either
    } else {
        Expect::Active
    }
}

// ---------------------------------------------------------------------------------------
// The product, set up once per test process

struct World {
    rt: tokio::runtime::Runtime,
    validator: Arc<TokenValidator>,
    key: TestKey,
    iss: String,
    /// A whole-thousand unix second a little ahead of the clock: every case starts here.
    t0: u64,
    _server: JwksServer,
    _cancel: CancellationToken,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let key = TestKey::ec_p256("k1");
        let cancel = CancellationToken::new();
        let (server, validator) = rt.block_on(async {
            let server = JwksServer::with_keys(&[&key]).await;
            let mut issuer = server.issuer_config(AUD);
            issuer.max_token_lifetime = Duration::from_secs(LIFETIME);
            issuer.leeway = Duration::from_secs(LEEWAY);
            let validator = TokenValidator::start(
                &[issuer],
                reqwest::Client::new(),
                Arc::new(revsync::metrics::Metrics::new()),
                10_000,
                cancel.clone(),
            )
            .await;
            (server, validator)
        });
        assert!(validator.keys_loaded());
        let iss = server.issuer();
        // Ahead of the real clock, so verified tokens stay in the cache while a case runs
        // (the cache expires entries by the real clock).
        let t0 = (revsync::unix_now() / 1000 + 2) * 1000;
        World {
            rt,
            validator,
            key,
            iss,
            t0,
            _server: server,
            _cancel: cancel,
        }
    })
}

fn retention(iss: &str) -> Retention {
    // Buckets of one second: an entry is dropped by the first GC after its expiry, so the
    // model's "no longer needed" and the store's "dropped" differ by at most a second
    // (during which nothing it covers can validate).
    Retention::new(Duration::from_secs(3600), Duration::from_secs(30))
        .with_issuer(
            iss,
            Duration::from_secs(LIFETIME),
            Duration::from_secs(LEEWAY),
        )
        .with_expiry_granularity(Duration::from_secs(1))
}

/// The product's decision procedure over `store`, caught up with the bus (and allowed to
/// stay so for a day), so that only validation and the denylist decide.
fn checker(w: &World, store: Arc<Denylist>) -> Checker {
    let ingest = IngestState::new();
    ingest.record_caught_up(revsync::monotonic_ms());
    let freshness = Freshness::new(
        FreshnessConfig {
            max_staleness: Duration::from_secs(24 * 3600),
            ..FreshnessConfig::default()
        },
        ingest.clone(),
    );
    Checker {
        validator: w.validator.clone(),
        denylist: store,
        freshness,
        ingest,
        metrics: Arc::new(revsync::metrics::Metrics::new()),
    }
}

/// The product's answer for a token at `now` (`Checker::decide_at`): a rejection's reason
/// word, `revoked` or `active`.
fn product_decision(w: &World, checker: &Checker, token: &str, now: u64) -> String {
    match w.rt.block_on(checker.decide_at(Some(token), now)) {
        Decision::Active { stale: false, .. } => "active".into(),
        Decision::Inactive { reason } => reason.to_string(),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Steps

/// How a `not_before`-style event picks its `not_before`.
#[derive(Debug, Clone)]
enum NotBefore {
    /// No `not_before`: the event time.
    Absent,
    /// The event time plus this.
    Offset(i64),
    /// The second a token was issued in (the same-second case).
    IssuedOf(usize),
    /// `"not_before": "x"`: unusable, so the event time.
    Garbage,
}

#[derive(Debug, Clone)]
enum Step {
    /// The clock moves on.
    Advance(u64),
    /// A token is issued `ahead` seconds from now (negative: in the past), living `life`.
    Mint {
        sub: usize,
        sid: Option<usize>,
        client: Option<usize>,
        jti: bool,
        iat: bool,
        ahead: i64,
        life: u64,
    },
    /// A native event, `back` seconds ago. `kind`: 0 token, 1 subject, 2 session,
    /// 3 client, 4 issuer. `exp`: 0 the token's, 1 absent, 2 `null`, 3 `"soon"`.
    Native {
        kind: u8,
        target: usize,
        back: u64,
        nb: NotBefore,
        exp: u8,
        empty_reason: bool,
    },
    /// A Keycloak event `back_ms` ms ago. `kind`: 0 LOGOUT, 1 DELETE_ACCOUNT, 2 admin
    /// user logout, 3 admin logout-all, 4 admin client notBefore, 5 REVOKE_GRANT.
    Keycloak {
        kind: u8,
        target: usize,
        back_ms: u64,
        garbage: bool,
    },
    /// An earlier record read again now (a replay, a duplicate, a late partition).
    Replay(usize),
    Gc,
    Restart,
}

fn arb_step() -> impl Strategy<Value = Step> {
    let nb = prop_oneof![
        2 => Just(NotBefore::Absent),
        2 => (-10i64..=3).prop_map(NotBefore::Offset),
        3 => (0usize..16).prop_map(NotBefore::IssuedOf),
        1 => Just(NotBefore::Garbage),
    ];
    let life = prop_oneof![
        4 => 1u64..=LIFETIME + LEEWAY + 15,
        1 => Just(LIFETIME + LEEWAY),
        1 => Just(LIFETIME + LEEWAY + 1),
    ];
    prop_oneof![
        4 => prop_oneof![0u64..=3, 4u64..=40, Just(LIFETIME + LEEWAY)].prop_map(Step::Advance),
        4 => (
            0..SUBS.len(),
            proptest::option::of(0..SIDS.len()),
            proptest::option::of(0..CLIENTS.len()),
            any::<bool>(),
            prop_oneof![4 => Just(true), 1 => Just(false)],
            prop_oneof![4 => -10i64..=0, 1 => 1i64..=20],
            life,
        )
            .prop_map(|(sub, sid, client, jti, iat, ahead, life)| Step::Mint {
                sub,
                sid,
                client,
                jti,
                iat,
                ahead,
                life
            }),
        5 => (
            prop_oneof![3 => 0u8..=3, 1 => Just(4u8)],
            0usize..16,
            prop_oneof![Just(0u64), 1u64..=20, Just(LIFETIME)],
            nb,
            0u8..=3,
            any::<bool>(),
        )
            .prop_map(|(kind, target, back, nb, exp, empty_reason)| Step::Native {
                kind,
                target,
                back,
                nb,
                exp,
                empty_reason
            }),
        3 => (
            0u8..=5,
            0usize..16,
            prop_oneof![Just(0u64), Just(1000u64), 0u64..5000],
            any::<bool>(),
        )
            .prop_map(|(kind, target, back_ms, garbage)| Step::Keycloak {
                kind,
                target,
                back_ms,
                garbage
            }),
        2 => (0usize..64).prop_map(Step::Replay),
        2 => Just(Step::Gc),
        1 => Just(Step::Restart),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Native,
    Keycloak,
}

/// One case: the model, the product and the records sent so far.
struct Case {
    w: &'static World,
    dir: tempfile::TempDir,
    /// Over the store; replaced on restart.
    checker: Option<Checker>,
    now: u64,
    tokens: Vec<(ModelToken, String)>,
    events: Vec<ModelEvent>,
    records: Vec<(Format, Vec<u8>, ModelEvent)>,
    next_id: u64,
}

impl Case {
    fn new() -> Self {
        let w = world();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Denylist::open(dir.path(), 1 << 20, retention(&w.iss)).unwrap());
        Case {
            w,
            dir,
            checker: Some(checker(w, store)),
            now: w.t0,
            tokens: Vec::new(),
            events: Vec::new(),
            records: Vec::new(),
            next_id: 0,
        }
    }

    fn store(&self) -> &Denylist {
        &self.checker.as_ref().unwrap().denylist
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn token(&self, i: usize) -> Option<&ModelToken> {
        (!self.tokens.is_empty()).then(|| &self.tokens[i % self.tokens.len()].0)
    }

    fn mint(&mut self, m: ModelToken) {
        let mut claims = json!({"iss": self.w.iss, "aud": AUD, "sub": m.sub, "exp": m.exp});
        if let Some(sid) = m.sid {
            claims["sid"] = json!(sid);
        }
        if let Some(client) = m.client {
            claims["client_id"] = json!(client);
        }
        if let Some(jti) = &m.jti {
            claims["jti"] = json!(jti);
        }
        if let Some(iat) = m.iat {
            claims["iat"] = json!(iat);
        }
        let token = self.w.key.sign(&claims);
        self.tokens.push((m, token));
    }

    /// Sends one record: the product decodes and applies it; the model takes the event
    /// it means.
    fn send(&mut self, format: Format, payload: Vec<u8>, meant: ModelEvent) {
        self.deliver(format, &payload);
        self.events.push(meant.clone());
        self.records.push((format, payload, meant));
    }

    fn deliver(&mut self, format: Format, payload: &[u8]) {
        let decoded = match format {
            Format::Native => revsync::event::decode_native(payload).ok(),
            Format::Keycloak => revsync::formats::keycloak::decode(payload, &self.w.iss)
                .ok()
                .flatten(),
        };
        // A record the product cannot decode is skipped, as the reader skips it; the
        // model still holds the event, so a lost revocation shows as a wrong answer.
        if let Some(event) = decoded {
            self.store().apply(&[event], &[], self.now).unwrap();
        }
    }

    fn native(
        &mut self,
        kind: u8,
        target: usize,
        back: u64,
        nb: NotBefore,
        exp: u8,
        empty_reason: bool,
    ) {
        let at = self.now - back;
        let id = self.id();
        let mut v = json!({"v": 1, "id": format!("n{id}"), "iss": self.w.iss, "event_time": at});
        if empty_reason {
            v["reason"] = json!("");
        }
        let not_before = |v: &mut Value| -> u64 {
            match nb {
                NotBefore::Absent => at,
                NotBefore::Offset(d) => {
                    let nb = (at as i64 + d) as u64;
                    v["not_before"] = json!(nb);
                    nb
                }
                NotBefore::IssuedOf(i) => match self.token(i) {
                    Some(t) => {
                        let nb = t.iat.unwrap_or(t.issued);
                        v["not_before"] = json!(nb);
                        nb
                    }
                    None => at,
                },
                NotBefore::Garbage => {
                    v["not_before"] = json!("x");
                    at
                }
            }
        };
        let what = match kind {
            0 => {
                let (jti, token_exp) = match self.token(target) {
                    Some(ModelToken {
                        jti: Some(jti),
                        exp,
                        ..
                    }) => (jti.clone(), *exp),
                    _ => (format!("unknown-{target}"), at + LIFETIME),
                };
                v["type"] = json!("token");
                v["jti"] = json!(jti);
                let exp = match exp {
                    0 => {
                        v["exp"] = json!(token_exp);
                        Some(token_exp)
                    }
                    1 => None,
                    2 => {
                        v["exp"] = Value::Null;
                        None
                    }
                    _ => {
                        v["exp"] = json!("soon");
                        None
                    }
                };
                Revoked::Jti { jti, exp }
            }
            1 => {
                let sub = SUBS[target % SUBS.len()];
                v["type"] = json!("subject");
                v["sub"] = json!(sub);
                Revoked::Sub {
                    sub,
                    nb: not_before(&mut v),
                }
            }
            2 => {
                let sid = SIDS[target % SIDS.len()];
                v["type"] = json!("session");
                v["sid"] = json!(sid);
                Revoked::Sid { sid, at }
            }
            3 => {
                let client = CLIENTS[target % CLIENTS.len()];
                v["type"] = json!("client");
                v["client_id"] = json!(client);
                Revoked::Client {
                    client,
                    nb: not_before(&mut v),
                }
            }
            _ => {
                v["type"] = json!("issuer");
                Revoked::Issuer {
                    nb: not_before(&mut v),
                }
            }
        };
        self.send(
            Format::Native,
            v.to_string().into_bytes(),
            ModelEvent { what, at },
        );
    }

    fn keycloak(&mut self, kind: u8, target: usize, back_ms: u64, garbage: bool) {
        let ms = self.now * 1000 - back_ms;
        // The model's own reading of Keycloak's millisecond `time`: a token issued in the
        // same second may have been issued before the event, so the event covers the
        // whole second it happened in.
        let at = ms / 1000;
        let id = self.id();
        let sub = SUBS[target % SUBS.len()];
        let mut v = match kind {
            0 => {
                json!({"type": "LOGOUT", "realmId": "r", "userId": sub, "sessionId": SIDS[target % SIDS.len()]})
            }
            1 => json!({"type": "DELETE_ACCOUNT", "realmId": "r", "userId": sub}),
            2 => {
                json!({"operationType": "ACTION", "resourceType": "USER", "resourcePath": format!("users/{sub}/logout")})
            }
            3 => {
                json!({"operationType": "ACTION", "resourceType": "REALM", "resourcePath": "logout-all"})
            }
            4 => {
                json!({"operationType": "UPDATE", "resourceType": "CLIENT", "resourcePath": "clients/0f1e",
                    "representation": {"clientId": CLIENTS[target % CLIENTS.len()], "notBefore": at}})
            }
            _ => {
                let jti = match self.token(target) {
                    Some(ModelToken { jti: Some(j), .. }) => j.clone(),
                    _ => format!("unknown-{target}"),
                };
                json!({"type": "REVOKE_GRANT", "realmId": "r", "clientId": "app", "details": {"token_id": jti}})
            }
        };
        v["time"] = json!(ms);
        v["id"] = json!(format!("k{id}"));
        if garbage {
            // Optional members of the wrong shape: the revocation must still apply.
            v["id"] = json!("");
            if v.get("details").is_none() && v.get("operationType").is_none() {
                v["details"] = json!("n/a");
            }
        }
        let what = match kind {
            0 => Revoked::Sid {
                sid: SIDS[target % SIDS.len()],
                at,
            },
            1 | 2 => Revoked::Sub { sub, nb: at },
            3 => Revoked::Issuer { nb: at },
            4 => Revoked::Client {
                client: CLIENTS[target % CLIENTS.len()],
                nb: at,
            },
            _ => Revoked::Jti {
                jti: v["details"]["token_id"].as_str().unwrap().to_string(),
                exp: None,
            },
        };
        self.send(
            Format::Keycloak,
            v.to_string().into_bytes(),
            ModelEvent { what, at },
        );
    }

    fn step(&mut self, step: &Step) {
        match step {
            Step::Advance(dt) => self.now += dt,
            Step::Mint {
                sub,
                sid,
                client,
                jti,
                iat,
                ahead,
                life,
            } => {
                let issued = (self.now as i64 + ahead) as u64;
                let id = self.id();
                // An issuer honours its own lifetime for tokens without iat: revsync
                // cannot check it there, and relies on it.
                let life = if *iat {
                    *life
                } else {
                    (*life).min(LIFETIME + LEEWAY)
                };
                self.mint(ModelToken {
                    sub: SUBS[*sub],
                    sid: sid.map(|i| SIDS[i]),
                    client: client.map(|i| CLIENTS[i]),
                    jti: jti.then(|| format!("j{id}")),
                    iat: iat.then_some(issued),
                    issued,
                    exp: issued + life,
                });
            }
            Step::Native {
                kind,
                target,
                back,
                nb,
                exp,
                empty_reason,
            } => self.native(*kind, *target, *back, nb.clone(), *exp, *empty_reason),
            Step::Keycloak {
                kind,
                target,
                back_ms,
                garbage,
            } => self.keycloak(*kind, *target, *back_ms, *garbage),
            Step::Replay(i) => {
                if !self.records.is_empty() {
                    let (format, payload, meant) = self.records[i % self.records.len()].clone();
                    self.deliver(format, &payload);
                    self.events.push(meant);
                }
            }
            Step::Gc => {
                self.store().gc(self.now, usize::MAX).unwrap();
            }
            Step::Restart => {
                let old = self.checker.take().unwrap();
                old.denylist.flush().unwrap();
                // The only holder of the store: dropping it closes the store.
                drop(old);
                let store = Denylist::open(self.dir.path(), 1 << 20, retention(&self.w.iss));
                self.checker = Some(checker(self.w, Arc::new(store.unwrap())));
            }
        }
    }

    /// Every token's answer, product against model.
    fn compare(&self) -> Result<(), String> {
        for (model, token) in &self.tokens {
            let want = model_decision(&self.events, model, self.now);
            let got = product_decision(self.w, self.checker.as_ref().unwrap(), token, self.now);
            let ok = match want {
                Expect::Refused(word) => got == word,
                Expect::Active => got == "active",
                Expect::Revoked => got == "revoked",
                Expect::Either => got == "active" || got == "revoked",
            };
            if !ok {
                let covering: Vec<&ModelEvent> = self
                    .events
                    .iter()
                    .filter(|e| e.rule_covers(model))
                    .collect();
                return Err(format!(
                    "at t0+{}: token {model:?} (times relative to t0: iat {:?}, exp {}) \
                     expected {want:?}, product answered {got:?}; events the rule applies to: {covering:?}",
                    self.now - self.w.t0,
                    model.iat.map(|i| i as i64 - self.w.t0 as i64),
                    model.exp as i64 - self.w.t0 as i64,
                ));
            }
        }
        Ok(())
    }
}

fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let mut case = Case::new();
    // Two tokens from the start, one with and one without iat.
    case.step(&Step::Mint {
        sub: 0,
        sid: Some(0),
        client: Some(0),
        jti: true,
        iat: true,
        ahead: -5,
        life: LIFETIME,
    });
    case.step(&Step::Mint {
        sub: 1,
        sid: Some(1),
        client: Some(1),
        jti: true,
        iat: false,
        ahead: -5,
        life: LIFETIME,
    });
    for (i, step) in steps.iter().enumerate() {
        case.step(step);
        if let Err(e) = case.compare() {
            return Err(TestCaseError::fail(format!("after step {i} {step:?}: {e}")));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_product_answers_as_the_model(steps in proptest::collection::vec(arb_step(), 1..40)) {
        run(&steps)?;
    }
}

// ---------------------------------------------------------------------------------------
// One plain test per rule, for the record of what each one guards

fn sign(claims: Value) -> String {
    world().key.sign(&claims)
}

fn validate(token: &str, now: u64) -> Result<(), &'static str> {
    let w = world();
    w.rt.block_on(w.validator.validate_at(token, now))
        .map(|_| ())
        .map_err(|r| r.reason())
}

/// A token that lives longer than its issuer allows would outlive every `not_before`
/// entry that covers it (they are dropped a lifetime after `not_before`).
#[test]
fn tokens_outliving_the_issuers_lifetime_are_refused() {
    let w = world();
    let iat = w.t0;
    let longest = sign(
        json!({"iss": w.iss, "aud": AUD, "sub": "a", "iat": iat, "exp": iat + LIFETIME + LEEWAY}),
    );
    assert_eq!(validate(&longest, iat), Ok(()));
    let too_long = sign(
        json!({"iss": w.iss, "aud": AUD, "sub": "a", "iat": iat, "exp": iat + LIFETIME + LEEWAY + 1}),
    );
    assert_eq!(validate(&too_long, iat), Err("lifetime_exceeded"));
    // Without iat only `exp` can be bounded: at most a lifetime (and leeway) ahead.
    let exp = iat + 1000;
    let no_iat = sign(json!({"iss": w.iss, "aud": AUD, "sub": "a", "exp": exp}));
    assert_eq!(
        validate(&no_iat, exp - LIFETIME - LEEWAY - 1),
        Err("lifetime_exceeded")
    );
    assert_eq!(validate(&no_iat, exp - LIFETIME - LEEWAY), Ok(()));
    assert_eq!(
        validate(&no_iat, exp - LIFETIME - LEEWAY - 1),
        Err("lifetime_exceeded"),
        "also when the token is in the verified-token cache"
    );
}

/// A covered token is accepted until `exp + leeway`, and `exp <= iat + lifetime + leeway`
/// with `iat <= not_before`: the entry must outlive `not_before + lifetime + 2 * leeway`.
#[test]
fn a_not_before_entry_lasts_as_long_as_a_token_it_covers() {
    let w = world();
    let nb = w.t0 + 100;
    let token = sign(
        json!({"iss": w.iss, "aud": AUD, "sub": "longest", "iat": nb, "exp": nb + LIFETIME + LEEWAY}),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Denylist::open(dir.path(), 1 << 20, retention(&w.iss)).unwrap());
    let event = format!(
        r#"{{"v":1,"id":"e","type":"subject","iss":"{}","sub":"longest","event_time":{nb}}}"#,
        w.iss
    );
    let event = revsync::event::decode_native(event.as_bytes()).unwrap();
    store.apply(&[event], &[], nb).unwrap();
    let last = nb + LIFETIME + 2 * LEEWAY - 1;
    store.gc(last, usize::MAX).unwrap();
    assert_eq!(
        product_decision(w, &checker(w, store.clone()), &token, last),
        "revoked",
        "the last second the token validates"
    );
    store.gc(last + 2, usize::MAX).unwrap();
    assert_eq!(
        product_decision(w, &checker(w, store.clone()), &token, last + 1),
        "expired"
    );
    assert_eq!(
        store.sizes().subject,
        0,
        "dropped once nothing it covers validates"
    );
}

/// The order of a token and a revocation inside one second is unknown: a token issued in
/// the revocation's second is revoked.
#[test]
fn a_token_issued_in_the_revocations_second_is_revoked() {
    let w = world();
    let t = w.t0 + 200;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Denylist::open(dir.path(), 1 << 20, retention(&w.iss)).unwrap());
    let same = sign(
        json!({"iss": w.iss, "aud": AUD, "sub": "same", "client_id": "same", "iat": t, "exp": t + 30}),
    );
    let next = sign(
        json!({"iss": w.iss, "aud": AUD, "sub": "same", "client_id": "same", "iat": t + 1, "exp": t + 30}),
    );
    let native = format!(
        r#"{{"v":1,"id":"e","type":"subject","iss":"{}","sub":"same","not_before":{t},"event_time":{t}}}"#,
        w.iss
    );
    let event = revsync::event::decode_native(native.as_bytes()).unwrap();
    store.apply(&[event], &[], t).unwrap();
    assert_eq!(
        product_decision(w, &checker(w, store.clone()), &same, t),
        "revoked",
        "native"
    );
    assert_eq!(
        product_decision(w, &checker(w, store.clone()), &next, t + 1),
        "active"
    );

    // Keycloak's millisecond time, on the second and inside it.
    for ms in [t * 1000, t * 1000 + 999] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Denylist::open(dir.path(), 1 << 20, retention(&w.iss)).unwrap());
        let kc = json!({"type": "DELETE_ACCOUNT", "time": ms, "userId": "same"}).to_string();
        let event = revsync::formats::keycloak::decode(kc.as_bytes(), &w.iss)
            .unwrap()
            .unwrap();
        store.apply(&[event], &[], t).unwrap();
        assert_eq!(
            product_decision(w, &checker(w, store.clone()), &same, t),
            "revoked",
            "keycloak time {ms}"
        );
        assert_eq!(
            product_decision(w, &checker(w, store.clone()), &next, t + 1),
            "active",
            "keycloak time {ms}: issued the next second"
        );
    }
}

/// An `iat` in the future would escape every `not_before` revocation until it arrives.
#[test]
fn tokens_issued_in_the_future_are_not_yet_valid_even_when_cached() {
    let w = world();
    let iat = w.t0 + 300;
    let token = sign(json!({"iss": w.iss, "aud": AUD, "sub": "f", "iat": iat, "exp": iat + 30}));
    assert_eq!(validate(&token, iat - LEEWAY), Ok(()), "within the leeway");
    assert_eq!(
        validate(&token, iat - LEEWAY - 1),
        Err("not_yet_valid"),
        "from the verified-token cache"
    );
    let other = sign(json!({"iss": w.iss, "aud": AUD, "sub": "g", "iat": iat, "exp": iat + 30}));
    assert_eq!(validate(&other, iat - LEEWAY - 1), Err("not_yet_valid"));
}

/// A bad optional field is ignored: the revocation in the record still applies.
#[test]
fn bad_optional_fields_do_not_lose_the_revocation() {
    let w = world();
    for record in [
        r#"{"v":1,"id":"e","type":"token","iss":"I","jti":"J","event_time":5,"reason":""}"#,
        r#"{"v":1,"id":"e","type":"token","iss":"I","jti":"J","event_time":5,"exp":null}"#,
        r#"{"v":1,"id":"e","type":"token","iss":"I","jti":"J","event_time":5,"exp":"soon"}"#,
        r#"{"v":1,"id":"e","type":"subject","iss":"I","sub":"S","event_time":5,"not_before":"x"}"#,
        r#"{"v":1,"id":"e","type":"subject","iss":"I","sub":"S","event_time":5,"reason":7}"#,
    ] {
        let decoded = revsync::event::decode_native(record.as_bytes());
        assert!(decoded.is_ok(), "{record}: {decoded:?}");
    }
    for record in [
        json!({"id": "", "type": "LOGOUT", "time": 1000, "sessionId": "s"}),
        json!({"type": "LOGOUT", "time": 1000, "sessionId": "s", "details": "n/a"}),
        json!({"type": "LOGOUT", "time": 1000, "sessionId": "s", "error": 5}),
    ] {
        let decoded = revsync::formats::keycloak::decode(record.to_string().as_bytes(), &w.iss);
        assert!(matches!(decoded, Ok(Some(_))), "{record}: {decoded:?}");
    }
}
