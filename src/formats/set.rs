//! RFC 8417 Security Event Tokens (the `set` format): OpenID CAEP `session-revoked` and
//! `credential-change`, and OpenID Connect Back-Channel Logout tokens. Each record value
//! (or SSF push body) is one compact JWS.
//!
//! Verification ([`TokenValidator::verify_jws`]): the signature must verify with a key of
//! the `iss`'s JWKS (a configured issuer, an allowed asymmetric `alg`); unsigned or badly
//! signed tokens are malformed (`unsigned`, `bad_signature`). No `exp` rule: a revocation
//! read again from the log long after it was issued must still apply.
//!
//! Mapping to the model ([`map_verified`]):
//!
//! | event (`events` member) | subject | revocation |
//! |---|---|---|
//! | CAEP `session-revoked` | `iss_sub` | subject (`not_before` = `event_timestamp`, else `iat`) |
//! | | `jwt_id` | token (`iss`, `jti` of the subject) |
//! | | `opaque` (`id`), or `complex` with an opaque `session` | session (`iss` of the SET) |
//! | | `complex` with only an `iss_sub` `user` | subject |
//! | CAEP `credential-change`, `change_type` `revoke`/`delete` | `iss_sub` (or `complex` `user`) | subject |
//! | CAEP `credential-change`, other `change_type` | | ignored |
//! | Back-Channel Logout | `sid` claim | session |
//! | | `sub` claim alone | subject (`not_before` = `iat`) |
//! | anything else (SSF verification, other CAEP events) | | ignored |
//!
//! The subject is the event's `subject` member (CAEP 1.0) or the SET's `sub_id` claim (SSF
//! 1.0), as an RFC 9493 subject identifier. `jti` is the event id; `event_timestamp`, else
//! `iat`, the event time. A logout token carrying `nonce` is rejected (it is an ID token,
//! not a logout token); header `typ` must be `secevent+jwt` (logout tokens: `logout+jwt`,
//! `secevent+jwt`, `JWT` or none). A token is revoked iff its `iat <= not_before`, so a
//! token issued in the event's own second is covered.
//!
//! Only what names the revocation is required (`events`, `jti`, `iat`, the subject or
//! `sid`/`sub`, `change_type`). Unusable optional members (`event_timestamp`, `txn`,
//! `reason_admin`, `reason_user`, `initiating_entity`) are ignored as if absent and named
//! in the caller's [`Ignored`]: throwing the event away would lose its revocation.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Map, Value};

use super::{opt_object, opt_str, opt_u64, optional, req_str, Decoded, FormatError};
use crate::event::{DecodeError, Event, Ignored, Revocation};
use crate::token::{Rejection, TokenValidator, VerifiedJws, MAX_TOKEN_BYTES};

pub const SESSION_REVOKED: &str =
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
pub const CREDENTIAL_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/credential-change";
pub const BACKCHANNEL_LOGOUT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// How long the ingest reader waits for one verification that needs a JWKS fetch before
/// it treats the record as not verifiable yet (the fetch carries on in the background).
pub const DEFAULT_VERIFY_WAIT: Duration = Duration::from_secs(2);

/// Verifies SETs for the ingest reader, a plain thread: each verification runs as a task
/// on the async runtime (JWKS refetches are async) and the reader waits for its answer on
/// a channel, at most `wait`. No `block_on`, so it is safe on any thread and never panics
/// when the runtime is shutting down (the answer is then "unverifiable").
#[derive(Clone)]
pub struct SetVerifier {
    validator: Arc<TokenValidator>,
    runtime: tokio::runtime::Handle,
    wait: Duration,
}

impl SetVerifier {
    pub fn new(validator: Arc<TokenValidator>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            validator,
            runtime,
            wait: DEFAULT_VERIFY_WAIT,
        }
    }

    /// Sets how long one verification may block the caller.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Verifies and maps one record value. Blocks the calling thread for at most the
    /// configured wait; a verification still running then is [`FormatError::Unverifiable`].
    /// `expected_iss`: when set, the SET's `iss` must be exactly this.
    pub fn decode_blocking(
        &self,
        payload: &[u8],
        expected_iss: Option<&str>,
        seen_at_ms: u64,
    ) -> Decoded {
        self.decode_blocking_noting(payload, expected_iss, seen_at_ms, &mut Ignored::new())
    }

    /// [`Self::decode_blocking`], naming the unusable optional members it ignored.
    pub fn decode_blocking_noting(
        &self,
        payload: &[u8],
        expected_iss: Option<&str>,
        seen_at_ms: u64,
        ignored: &mut Ignored,
    ) -> Decoded {
        let token = token_text(payload)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let validator = self.validator.clone();
        let owned = token.to_string();
        self.runtime.spawn(async move {
            let result = validator.verify_jws(&owned, None, seen_at_ms).await;
            let _ = tx.send(result);
        });
        match rx.recv_timeout(self.wait) {
            Ok(result) => finish(result, token, expected_iss, ignored),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(FormatError::Unverifiable(
                "the signing key lookup is still running".into(),
            )),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(FormatError::Unverifiable(
                "the async runtime is not running".into(),
            )),
        }
    }
}

/// Verifies and maps one SET (the push receiver's path). `audience`: when set, `aud` must
/// name it; `expected_iss`: when set, `iss` must be exactly this.
pub async fn decode(
    validator: &TokenValidator,
    token: &str,
    audience: Option<&str>,
    expected_iss: Option<&str>,
    seen_at_ms: u64,
) -> Decoded {
    decode_noting(
        validator,
        token,
        audience,
        expected_iss,
        seen_at_ms,
        &mut Ignored::new(),
    )
    .await
}

/// [`decode`], naming the unusable optional members it ignored in `ignored`.
pub async fn decode_noting(
    validator: &TokenValidator,
    token: &str,
    audience: Option<&str>,
    expected_iss: Option<&str>,
    seen_at_ms: u64,
    ignored: &mut Ignored,
) -> Decoded {
    let result = validator.verify_jws(token, audience, seen_at_ms).await;
    finish(result, token, expected_iss, ignored)
}

/// The compact JWS in a record value: UTF-8, surrounding whitespace trimmed.
pub fn token_text(payload: &[u8]) -> Result<&str, FormatError> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| FormatError::malformed("malformed_jws", "not UTF-8"))?
        .trim();
    if text.is_empty() {
        return Err(DecodeError::Empty.into());
    }
    if text.len() > MAX_TOKEN_BYTES {
        return Err(FormatError::malformed(
            "too_large",
            format!("token is larger than {MAX_TOKEN_BYTES} bytes"),
        ));
    }
    Ok(text)
}

fn finish(
    result: Result<VerifiedJws, Rejection>,
    token: &str,
    expected_iss: Option<&str>,
    ignored: &mut Ignored,
) -> Decoded {
    let jws = result.map_err(|r| rejection_error(&r, token))?;
    if let Some(expected) = expected_iss {
        if jws.iss != expected {
            return Err(FormatError::malformed(
                "wrong_issuer",
                format!("issuer {:?} is not the one configured here", jws.iss),
            ));
        }
    }
    map_verified_noting(&jws, ignored)
}

/// The format error for a verification failure. Key unavailability is retryable; every
/// other failure is final.
pub fn rejection_error(rejection: &Rejection, token: &str) -> FormatError {
    let reason = match rejection {
        Rejection::KeysUnavailable => {
            return FormatError::Unverifiable(
                "the issuer's signing keys are not available (JWKS not loaded, or not re-fetched since this token was seen)"
                    .into(),
            )
        }
        Rejection::BadSignature if header_alg(token).as_deref() == Some("none") => "unsigned",
        Rejection::BadSignature => "bad_signature",
        Rejection::UnknownKey => "unknown_key",
        Rejection::WrongIssuer => "wrong_issuer",
        Rejection::WrongAudience => "wrong_audience",
        Rejection::Malformed => "malformed_jws",
        Rejection::Expired
        | Rejection::NotYetValid
        | Rejection::WrongType
        | Rejection::LifetimeExceeded => "invalid",
    };
    let detail = match reason {
        "unsigned" => "unsigned token (alg none)".to_string(),
        "wrong_issuer" => "issuer is not configured".to_string(),
        "malformed_jws" => "not a well-formed signed JWT with an iss claim".to_string(),
        _ => rejection.to_string(),
    };
    FormatError::malformed(reason, detail)
}

/// The unverified header `alg`, only to tell "unsigned" from "badly signed".
fn header_alg(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.get("alg")?.as_str().map(str::to_ascii_lowercase)
}

/// Maps a verified SET (or logout token) to an event: `Ok(None)` when it carries no event
/// revsync maps (it revokes nothing).
pub fn map_verified(jws: &VerifiedJws) -> Decoded {
    map_verified_noting(jws, &mut Ignored::new())
}

/// [`map_verified`], naming the unusable optional members it ignored in `ignored`.
pub fn map_verified_noting(jws: &VerifiedJws, ignored: &mut Ignored) -> Decoded {
    let claims = &jws.claims;
    let events = match claims.get("events") {
        None | Some(Value::Null) => {
            return Err(FormatError::malformed(
                "missing_events",
                "no events claim: not a security event token",
            ))
        }
        Some(Value::Object(events)) if !events.is_empty() => events,
        Some(Value::Object(_)) => {
            return Err(FormatError::malformed(
                "missing_events",
                "the events claim is empty",
            ))
        }
        Some(_) => return Err(DecodeError::WrongType("events").into()),
    };
    let logout = events.contains_key(BACKCHANNEL_LOGOUT);
    check_typ(&jws.header, logout)?;
    let jti = req_str(claims, "jti")?;
    let iat = opt_u64(claims, "iat")?.ok_or(DecodeError::MissingField("iat"))?;
    let known: Vec<(&String, &Value)> = events
        .iter()
        .filter(|(uri, _)| {
            matches!(
                uri.as_str(),
                SESSION_REVOKED | CREDENTIAL_CHANGE | BACKCHANNEL_LOGOUT
            )
        })
        .collect();
    let (uri, payload) = match known.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        _ => {
            return Err(FormatError::malformed(
                "multiple_events",
                "more than one revocation event in one token",
            ))
        }
    };
    let Value::Object(payload) = payload else {
        return Err(DecodeError::WrongType("events").into());
    };
    // Read by nothing here; only counted when unusable, as the optional members they are.
    check_shape(claims, "txn", Value::is_string, ignored);
    let mapped = match uri.as_str() {
        SESSION_REVOKED => session_revoked(jws, payload, iat, ignored)?,
        CREDENTIAL_CHANGE => credential_change(jws, payload, iat, ignored)?,
        _ => backchannel_logout(jws, iat)?,
    };
    Ok(mapped.map(|(revocation, event_time, reason)| Event {
        id: jti.to_string(),
        event_time,
        revocation,
        reason: Some(reason.to_string()),
    }))
}

/// RFC 8417 §2.3 explicit typing; logout tokens may be `logout+jwt` (OpenID Connect
/// Back-Channel Logout 1.0 §2.4) and older ones are plain `JWT` or untyped.
fn check_typ(header: &Map<String, Value>, logout: bool) -> Result<(), FormatError> {
    let typ = match header.get("typ") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.to_ascii_lowercase()),
        Some(_) => return Err(FormatError::malformed("wrong_typ", "typ is not a string")),
    };
    let typ = typ
        .as_deref()
        .map(|t| t.strip_prefix("application/").unwrap_or(t));
    let ok = match typ {
        Some("secevent+jwt") => true,
        Some("logout+jwt") | Some("jwt") | None => logout,
        Some(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(FormatError::malformed(
            "wrong_typ",
            if logout {
                "header typ must be logout+jwt, secevent+jwt or JWT"
            } else {
                "header typ must be secevent+jwt"
            },
        ))
    }
}

type Mapped = Option<(Revocation, u64, &'static str)>;

/// Names `field` in `ignored` when it is present (not null) but not of the expected shape.
fn check_shape(
    obj: &Map<String, Value>,
    field: &'static str,
    ok: fn(&Value) -> bool,
    ignored: &mut Ignored,
) {
    if obj.get(field).is_some_and(|v| !v.is_null() && !ok(v)) {
        ignored.push(field);
    }
}

/// The members of a CAEP event payload that only inform: counted when unusable.
fn check_caep_optional(payload: &Map<String, Value>, ignored: &mut Ignored) {
    check_shape(payload, "reason_admin", Value::is_object, ignored);
    check_shape(payload, "reason_user", Value::is_object, ignored);
    check_shape(payload, "initiating_entity", Value::is_string, ignored);
}

/// The event's `event_timestamp`, else (absent or unusable) the SET's `iat`.
fn event_time(payload: &Map<String, Value>, iat: u64, ignored: &mut Ignored) -> u64 {
    optional(
        opt_u64(payload, "event_timestamp"),
        "event_timestamp",
        ignored,
    )
    .unwrap_or(iat)
}

/// What an RFC 9493 subject identifier names, as far as the model can use it.
#[derive(Debug, Default, PartialEq)]
struct Subject<'a> {
    /// `iss_sub`, or the `user` of a `complex` one.
    user: Option<(&'a str, &'a str)>,
    /// `jwt_id`.
    token: Option<(&'a str, &'a str)>,
    /// `opaque`, or the opaque `session` of a `complex` one.
    session: Option<&'a str>,
}

/// The event's `subject` member, else the SET's `sub_id` claim.
fn subject_of<'a>(
    payload: &'a Map<String, Value>,
    claims: &'a Map<String, Value>,
) -> Result<Subject<'a>, FormatError> {
    let id = match opt_object(payload, "subject")? {
        Some(s) => s,
        None => opt_object(claims, "sub_id")?.ok_or(DecodeError::MissingField("sub_id"))?,
    };
    let format = req_str(id, "format")?;
    if format == "complex" {
        let mut out = Subject::default();
        if let Some(user) = opt_object(id, "user")? {
            out.user = simple_subject(user)?.user;
        }
        if let Some(session) = opt_object(id, "session")? {
            out.session = simple_subject(session)?.session;
        }
        return Ok(out);
    }
    simple_subject(id)
}

fn simple_subject(id: &Map<String, Value>) -> Result<Subject<'_>, FormatError> {
    let mut out = Subject::default();
    match req_str(id, "format")? {
        "iss_sub" => out.user = Some((req_str(id, "iss")?, req_str(id, "sub")?)),
        "jwt_id" => out.token = Some((req_str(id, "iss")?, req_str(id, "jti")?)),
        "opaque" => out.session = Some(req_str(id, "id")?),
        _ => {}
    }
    Ok(out)
}

fn unsupported_subject(what: &str) -> FormatError {
    FormatError::malformed(
        "unsupported_subject",
        format!("{what}: the subject identifier names nothing revsync can revoke"),
    )
}

fn session_revoked(
    jws: &VerifiedJws,
    payload: &Map<String, Value>,
    iat: u64,
    ignored: &mut Ignored,
) -> Result<Mapped, FormatError> {
    let at = event_time(payload, iat, ignored);
    check_caep_optional(payload, ignored);
    let subject = subject_of(payload, &jws.claims)?;
    let revocation = if let Some(sid) = subject.session {
        Revocation::Session {
            iss: jws.iss.clone(),
            sid: sid.to_string(),
        }
    } else if let Some((iss, jti)) = subject.token {
        Revocation::Token {
            iss: iss.to_string(),
            jti: jti.to_string(),
            exp: None,
        }
    } else if let Some((iss, sub)) = subject.user {
        Revocation::Subject {
            iss: iss.to_string(),
            sub: sub.to_string(),
            not_before: at,
        }
    } else {
        return Err(unsupported_subject("session-revoked"));
    };
    Ok(Some((revocation, at, "CAEP session-revoked")))
}

fn credential_change(
    jws: &VerifiedJws,
    payload: &Map<String, Value>,
    iat: u64,
    ignored: &mut Ignored,
) -> Result<Mapped, FormatError> {
    let change = req_str(payload, "change_type")?;
    if !matches!(change, "revoke" | "delete") {
        return Ok(None);
    }
    let at = event_time(payload, iat, ignored);
    check_caep_optional(payload, ignored);
    let Some((iss, sub)) = subject_of(payload, &jws.claims)?.user else {
        return Err(unsupported_subject("credential-change"));
    };
    let revocation = Revocation::Subject {
        iss: iss.to_string(),
        sub: sub.to_string(),
        not_before: at,
    };
    let reason = if change == "revoke" {
        "CAEP credential-change (revoke)"
    } else {
        "CAEP credential-change (delete)"
    };
    Ok(Some((revocation, at, reason)))
}

fn backchannel_logout(jws: &VerifiedJws, iat: u64) -> Result<Mapped, FormatError> {
    let claims = &jws.claims;
    if claims.contains_key("nonce") {
        return Err(FormatError::malformed(
            "nonce_present",
            "a logout token must not carry nonce",
        ));
    }
    let revocation = if let Some(sid) = opt_str(claims, "sid")? {
        Revocation::Session {
            iss: jws.iss.clone(),
            sid: sid.to_string(),
        }
    } else if let Some(sub) = opt_str(claims, "sub")? {
        Revocation::Subject {
            iss: jws.iss.clone(),
            sub: sub.to_string(),
            not_before: iat,
        }
    } else {
        return Err(DecodeError::MissingField("sid").into());
    };
    Ok(Some((revocation, iat, "OIDC back-channel logout")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ISS: &str = "https://as.example";

    fn jws(header: Value, claims: Value) -> VerifiedJws {
        VerifiedJws {
            iss: claims["iss"].as_str().unwrap_or(ISS).to_string(),
            header: header.as_object().unwrap().clone(),
            claims: claims.as_object().unwrap().clone(),
        }
    }

    fn set(events: Value, extra: Value) -> VerifiedJws {
        let mut claims =
            json!({"iss": ISS, "jti": "e1", "iat": 1000, "aud": "rx", "events": events});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        jws(json!({"alg": "ES256", "typ": "secevent+jwt"}), claims)
    }

    fn revocation(d: Decoded) -> Revocation {
        d.unwrap().expect("an event").revocation
    }

    fn reason(d: Decoded) -> &'static str {
        d.unwrap_err().reason()
    }

    #[test]
    fn session_revoked_maps_each_subject_format() {
        let ev = |subject: Value| {
            set(
                json!({SESSION_REVOKED: {"subject": subject, "event_timestamp": 900}}),
                json!({}),
            )
        };
        assert_eq!(
            revocation(map_verified(&ev(
                json!({"format": "iss_sub", "iss": "https://other", "sub": "alice"})
            ))),
            Revocation::Subject {
                iss: "https://other".into(),
                sub: "alice".into(),
                not_before: 900
            }
        );
        assert_eq!(
            revocation(map_verified(&ev(
                json!({"format": "jwt_id", "iss": ISS, "jti": "t1"})
            ))),
            Revocation::Token {
                iss: ISS.into(),
                jti: "t1".into(),
                exp: None
            }
        );
        assert_eq!(
            revocation(map_verified(&ev(json!({"format": "opaque", "id": "s1"})))),
            Revocation::Session {
                iss: ISS.into(),
                sid: "s1".into()
            }
        );
        let complex = json!({"format": "complex",
            "user": {"format": "iss_sub", "iss": ISS, "sub": "alice"},
            "session": {"format": "opaque", "id": "s2"}});
        assert_eq!(
            revocation(map_verified(&ev(complex))),
            Revocation::Session {
                iss: ISS.into(),
                sid: "s2".into()
            }
        );
        let user_only =
            json!({"format": "complex", "user": {"format": "iss_sub", "iss": ISS, "sub": "bob"}});
        assert_eq!(
            revocation(map_verified(&ev(user_only))),
            Revocation::Subject {
                iss: ISS.into(),
                sub: "bob".into(),
                not_before: 900
            }
        );
        for unsupported in [
            json!({"format": "email", "email": "a@example.com"}),
            json!({"format": "complex", "tenant": {"format": "opaque", "id": "t"}}),
        ] {
            assert_eq!(
                reason(map_verified(&ev(unsupported))),
                "unsupported_subject"
            );
        }
        assert_eq!(
            reason(map_verified(&ev(json!({"format": "iss_sub", "iss": ISS})))),
            "missing_field"
        );
    }

    #[test]
    fn event_time_and_id_come_from_the_set() {
        let e = map_verified(&set(
            json!({SESSION_REVOKED: {}}),
            json!({"sub_id": {"format": "iss_sub", "iss": ISS, "sub": "alice"}}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(e.id, "e1");
        assert_eq!(e.event_time, 1000, "iat without event_timestamp");
        assert_eq!(
            e.revocation,
            Revocation::Subject {
                iss: ISS.into(),
                sub: "alice".into(),
                not_before: 1000
            }
        );
        let e = map_verified(&set(
            json!({SESSION_REVOKED: {"event_timestamp": 950.5, "subject": {"format": "opaque", "id": "s"}}}),
            json!({}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(e.event_time, 950);
    }

    #[test]
    fn bad_optional_members_are_ignored_and_the_revocation_kept() {
        let subject = json!({"format": "iss_sub", "iss": ISS, "sub": "alice"});
        let alice = Revocation::Subject {
            iss: ISS.into(),
            sub: "alice".into(),
            not_before: 1000,
        };
        for (payload, extra) in [
            (
                json!({"subject": subject, "event_timestamp": "now"}),
                json!({}),
            ),
            (
                json!({"subject": subject, "event_timestamp": -1}),
                json!({}),
            ),
            (json!({"subject": subject, "reason_admin": 5}), json!({})),
            (json!({"subject": subject, "reason_user": "x"}), json!({})),
            (
                json!({"subject": subject, "initiating_entity": 1}),
                json!({}),
            ),
            (json!({"subject": subject}), json!({"txn": 42})),
        ] {
            let t = set(json!({SESSION_REVOKED: payload.clone()}), extra.clone());
            let e = map_verified(&t).unwrap_or_else(|err| panic!("{payload} {extra}: {err}"));
            let e = e.expect("an event");
            assert_eq!(e.revocation, alice, "{payload} {extra}");
            assert_eq!(e.event_time, 1000, "{payload} {extra}: the SET's iat");
        }
        let change = set(
            json!({CREDENTIAL_CHANGE: {"change_type": "revoke", "subject": subject, "event_timestamp": {}}}),
            json!({}),
        );
        assert_eq!(revocation(map_verified(&change)), alice);
    }

    #[test]
    fn credential_change_revokes_the_subject_only_for_revoke_and_delete() {
        let ev = |change: &str| {
            set(
                json!({CREDENTIAL_CHANGE: {"credential_type": "password", "change_type": change,
                    "subject": {"format": "iss_sub", "iss": ISS, "sub": "alice"}, "event_timestamp": 990}}),
                json!({}),
            )
        };
        for change in ["revoke", "delete"] {
            assert_eq!(
                revocation(map_verified(&ev(change))),
                Revocation::Subject {
                    iss: ISS.into(),
                    sub: "alice".into(),
                    not_before: 990
                }
            );
        }
        for change in ["create", "update"] {
            assert_eq!(map_verified(&ev(change)), Ok(None), "{change}");
        }
        let opaque = set(
            json!({CREDENTIAL_CHANGE: {"change_type": "revoke", "subject": {"format": "opaque", "id": "x"}}}),
            json!({}),
        );
        assert_eq!(reason(map_verified(&opaque)), "unsupported_subject");
        let no_change = set(
            json!({CREDENTIAL_CHANGE: {"subject": {"format": "opaque", "id": "x"}}}),
            json!({}),
        );
        assert_eq!(reason(map_verified(&no_change)), "missing_field");
    }

    #[test]
    fn backchannel_logout_maps_sid_then_sub_and_refuses_nonce() {
        let logout = |extra: Value| {
            let mut claims = json!({"iss": ISS, "jti": "l1", "iat": 1000, "aud": "rp",
                "events": {BACKCHANNEL_LOGOUT: {}}});
            for (k, v) in extra.as_object().unwrap() {
                claims[k] = v.clone();
            }
            jws(json!({"alg": "RS256", "typ": "logout+jwt"}), claims)
        };
        assert_eq!(
            revocation(map_verified(&logout(json!({"sid": "s1", "sub": "alice"})))),
            Revocation::Session {
                iss: ISS.into(),
                sid: "s1".into()
            }
        );
        assert_eq!(
            revocation(map_verified(&logout(json!({"sub": "alice"})))),
            Revocation::Subject {
                iss: ISS.into(),
                sub: "alice".into(),
                not_before: 1000
            }
        );
        assert_eq!(reason(map_verified(&logout(json!({})))), "missing_field");
        assert_eq!(
            reason(map_verified(&logout(json!({"sid": "s", "nonce": "n"})))),
            "nonce_present"
        );
        // Logout tokens may be untyped or plain JWT; other SETs may not.
        for typ in [
            json!("JWT"),
            json!("application/logout+jwt"),
            json!("secevent+jwt"),
            Value::Null,
        ] {
            let mut t = logout(json!({"sid": "s"}));
            t.header.insert("typ".into(), typ.clone());
            assert!(map_verified(&t).is_ok(), "{typ}");
        }
        let mut t = logout(json!({"sid": "s"}));
        t.header.insert("typ".into(), json!("at+jwt"));
        assert_eq!(reason(map_verified(&t)), "wrong_typ");
    }

    #[test]
    fn shape_errors_are_malformed_and_unknown_events_are_ignored() {
        let sub = json!({"sub_id": {"format": "iss_sub", "iss": ISS, "sub": "a"}});
        // Missing or empty events claim.
        let mut t = set(json!({}), json!({}));
        assert_eq!(reason(map_verified(&t)), "missing_events");
        t.claims.remove("events");
        assert_eq!(reason(map_verified(&t)), "missing_events");
        t.claims.insert("events".into(), json!([1]));
        assert_eq!(reason(map_verified(&t)), "wrong_type");
        // Wrong typ for a CAEP SET.
        for typ in [json!("JWT"), json!("at+jwt"), json!(5)] {
            let mut t = set(json!({SESSION_REVOKED: {}}), sub.clone());
            t.header.insert("typ".into(), typ.clone());
            assert_eq!(reason(map_verified(&t)), "wrong_typ", "{typ}");
        }
        let mut t = set(json!({SESSION_REVOKED: {}}), sub.clone());
        t.header.remove("typ");
        assert_eq!(reason(map_verified(&t)), "wrong_typ", "untyped CAEP SET");
        t.header
            .insert("typ".into(), json!("Application/SecEvent+JWT"));
        assert!(
            map_verified(&t).is_ok(),
            "media type compare is case-insensitive"
        );
        // jti and iat are required.
        let mut t = set(json!({SESSION_REVOKED: {}}), sub.clone());
        t.claims.remove("jti");
        assert_eq!(reason(map_verified(&t)), "missing_field");
        let mut t = set(json!({SESSION_REVOKED: {}}), sub.clone());
        t.claims.insert("iat".into(), json!("yesterday"));
        assert_eq!(reason(map_verified(&t)), "wrong_type");
        // Two revocation events in one token.
        let t = set(
            json!({SESSION_REVOKED: {}, CREDENTIAL_CHANGE: {"change_type": "revoke"}}),
            sub.clone(),
        );
        assert_eq!(reason(map_verified(&t)), "multiple_events");
        // An event payload that is not an object.
        let t = set(json!({SESSION_REVOKED: "now"}), sub.clone());
        assert_eq!(reason(map_verified(&t)), "wrong_type");
        // Unknown event types (SSF verification, other CAEP events) revoke nothing.
        let t = set(
            json!({"https://schemas.openid.net/secevent/ssf/event-type/verification": {"state": "x"}}),
            json!({}),
        );
        assert_eq!(map_verified(&t), Ok(None));
        // Extension members beside a known event are ignored.
        let t = set(
            json!({SESSION_REVOKED: {}, "https://example.com/ext": {"x": 1}}),
            sub,
        );
        assert!(map_verified(&t).unwrap().is_some());
    }

    #[test]
    fn rejections_map_to_distinct_reasons_and_key_trouble_is_retryable() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let unsigned = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64("{}"));
        let signed = format!("{}.{}.AAAA", b64(r#"{"alg":"RS256"}"#), b64("{}"));
        assert_eq!(
            rejection_error(&Rejection::BadSignature, &unsigned).reason(),
            "unsigned"
        );
        assert_eq!(
            rejection_error(&Rejection::BadSignature, &signed).reason(),
            "bad_signature"
        );
        assert_eq!(
            rejection_error(&Rejection::UnknownKey, &signed).reason(),
            "unknown_key"
        );
        assert_eq!(
            rejection_error(&Rejection::WrongIssuer, &signed).reason(),
            "wrong_issuer"
        );
        assert_eq!(
            rejection_error(&Rejection::WrongAudience, &signed).reason(),
            "wrong_audience"
        );
        assert_eq!(
            rejection_error(&Rejection::Malformed, &signed).reason(),
            "malformed_jws"
        );
        assert!(rejection_error(&Rejection::KeysUnavailable, &signed).retryable());
        assert_eq!(token_text(b"  a.b.c\n"), Ok("a.b.c"));
        assert_eq!(token_text(b" \n").unwrap_err().reason(), "empty");
        assert_eq!(
            token_text(&[0xff, 0xfe]).unwrap_err().reason(),
            "malformed_jws"
        );
    }
}
