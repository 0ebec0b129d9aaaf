//! Wire formats besides native v1, decoded into the same [`Event`] model. A topic's format
//! is configured (`format = native | set | keycloak`), never sniffed.
//!
//! | format | module | what it carries |
//! |---|---|---|
//! | `native` | [`crate::event`] | revsync's own v1 JSON |
//! | `set` | [`set`] | RFC 8417 Security Event Tokens (OpenID CAEP `session-revoked`, `credential-change`) and OpenID Connect Back-Channel Logout tokens, signature verified against the issuer's JWKS |
//! | `keycloak` | [`keycloak`] | Keycloak user and admin event JSON |
//!
//! Only a missing or unusable *required* field (what names the revocation and its time)
//! makes a record malformed. An unusable optional field is ignored as if absent and named
//! in an [`Ignored`](crate::event::Ignored) list (the `*_noting` decoders), which the reader counts: throwing the
//! record away would lose its revocation.
//!
//! Decoding a record has three outcomes besides an event:
//! - *ignored* (`Ok(None)`): well formed, but revokes nothing (a Keycloak `LOGIN`, a CAEP
//!   `credential-change` of type `create`): counted in `events_ignored`, offset advances;
//! - [`FormatError::Malformed`]: can never become an event (bad JSON, bad signature,
//!   unknown key after a fresh JWKS fetch): counted in `events_malformed` under its
//!   reason, offset advances (invariant 7);
//! - [`FormatError::Unverifiable`]: cannot be decided *now* (the issuer's signing keys
//!   are not available): the reader keeps the partition's position at that record and
//!   tries again later, because dropping it could lose a revocation.

pub mod keycloak;
pub mod set;

use serde_json::{Map, Value};

pub(crate) use crate::event::optional;
use crate::event::{DecodeError, Event, MAX_EVENT_BYTES};

/// Why a record did not become an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The record can never become an event: skip it, count it under `reason`.
    #[error("{detail}")]
    Malformed {
        /// Stable word: the `reason` label of `events_malformed`.
        reason: &'static str,
        detail: String,
    },
    /// The record cannot be verified now (its issuer's keys are unavailable): retry later,
    /// never skip it.
    #[error("cannot be verified now: {0}")]
    Unverifiable(String),
}

impl FormatError {
    pub fn malformed(reason: &'static str, detail: impl Into<String>) -> Self {
        FormatError::Malformed {
            reason,
            detail: detail.into(),
        }
    }

    /// The stable reason word (`unverifiable` for [`FormatError::Unverifiable`]).
    pub fn reason(&self) -> &'static str {
        match self {
            FormatError::Malformed { reason, .. } => reason,
            FormatError::Unverifiable(_) => "unverifiable",
        }
    }

    /// `true` when the record must be retried rather than skipped.
    pub fn retryable(&self) -> bool {
        matches!(self, FormatError::Unverifiable(_))
    }
}

impl From<DecodeError> for FormatError {
    fn from(e: DecodeError) -> Self {
        FormatError::Malformed {
            reason: e.reason(),
            detail: e.to_string(),
        }
    }
}

/// The decoding of one record: an event, or `None` when it is well formed but revokes
/// nothing.
pub type Decoded = Result<Option<Event>, FormatError>;

/// Parses a record value as one JSON object, with the size limits of the native format.
pub(crate) fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(DecodeError::TooLarge);
    }
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(DecodeError::NotObject),
        Err(e) => Err(DecodeError::NotJson(e.to_string())),
    }
}

/// An optional non-empty string member (`null` counts as absent).
pub(crate) fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, DecodeError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(DecodeError::EmptyValue(field)),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(DecodeError::WrongType(field)),
    }
}

/// A required non-empty string member.
pub(crate) fn req_str<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    opt_str(obj, field)?.ok_or(DecodeError::MissingField(field))
}

/// An optional object member (`null` counts as absent).
pub(crate) fn opt_object<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a Map<String, Value>>, DecodeError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(DecodeError::WrongType(field)),
    }
}

/// An optional non-negative number, fractions dropped (RFC 7519 NumericDate, or
/// Keycloak's milliseconds).
pub(crate) fn opt_u64(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<u64>, DecodeError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(u) => Ok(Some(u)),
            None => match n.as_f64() {
                Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
                _ => Err(DecodeError::WrongType(field)),
            },
        },
        Some(_) => Err(DecodeError::WrongType(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn field_helpers_name_their_problem() {
        let o = obj(json!({"s": "x", "e": "", "n": 5, "f": 7.9, "neg": -1, "nul": null, "o": {}}));
        assert_eq!(req_str(&o, "s"), Ok("x"));
        assert_eq!(req_str(&o, "e"), Err(DecodeError::EmptyValue("e")));
        assert_eq!(req_str(&o, "n"), Err(DecodeError::WrongType("n")));
        assert_eq!(req_str(&o, "nul"), Err(DecodeError::MissingField("nul")));
        assert_eq!(opt_u64(&o, "n"), Ok(Some(5)));
        assert_eq!(opt_u64(&o, "f"), Ok(Some(7)));
        assert_eq!(opt_u64(&o, "neg"), Err(DecodeError::WrongType("neg")));
        assert_eq!(opt_u64(&o, "s"), Err(DecodeError::WrongType("s")));
        assert!(opt_object(&o, "o").unwrap().is_some());
        assert_eq!(opt_object(&o, "s"), Err(DecodeError::WrongType("s")));
        assert_eq!(json_object(b"").unwrap_err().reason(), "empty");
        assert_eq!(json_object(b"[1]").unwrap_err().reason(), "not_object");
        assert_eq!(json_object(b"{").unwrap_err().reason(), "not_json");
    }

    #[test]
    fn errors_say_whether_to_retry() {
        let m = FormatError::malformed("bad_signature", "x");
        assert_eq!(m.reason(), "bad_signature");
        assert!(!m.retryable());
        let u = FormatError::Unverifiable("keys".into());
        assert_eq!(u.reason(), "unverifiable");
        assert!(u.retryable());
        let d: FormatError = DecodeError::MissingField("jti").into();
        assert_eq!(d.reason(), "missing_field");
    }
}
