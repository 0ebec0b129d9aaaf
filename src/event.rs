//! The revocation model and the decoder of the native v1 wire format into it
//! (DESIGN.md, "Native event format v1"). Other formats decode into the same [`Event`].

use serde::Serialize;
use serde_json::{Map, Value};

/// Largest record value decoded; larger records are malformed (they are never legitimate
/// revocation events, and decoding them would let one record cost megabytes).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// What a revocation applies to. Every variant names the issuer whose tokens it affects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Revocation {
    /// One token: (`iss`, `jti`). `exp` lets the entry be dropped once the token expires.
    Token {
        iss: String,
        jti: String,
        exp: Option<u64>,
    },
    /// Every token of a subject issued at or before `not_before` (`iat <= not_before`).
    Subject {
        iss: String,
        sub: String,
        not_before: u64,
    },
    /// Every token carrying this session id.
    Session { iss: String, sid: String },
    /// Every token of a client issued at or before `not_before`.
    Client {
        iss: String,
        client_id: String,
        not_before: u64,
    },
    /// Every token of the issuer issued at or before `not_before` (mass revocation).
    Issuer { iss: String, not_before: u64 },
}

impl Revocation {
    pub fn iss(&self) -> &str {
        match self {
            Revocation::Token { iss, .. }
            | Revocation::Subject { iss, .. }
            | Revocation::Session { iss, .. }
            | Revocation::Client { iss, .. }
            | Revocation::Issuer { iss, .. } => iss,
        }
    }

    /// The stable word for the kind, as in the wire format's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Revocation::Token { .. } => "token",
            Revocation::Subject { .. } => "subject",
            Revocation::Session { .. } => "session",
            Revocation::Client { .. } => "client",
            Revocation::Issuer { .. } => "issuer",
        }
    }

    /// The Kafka record key publishers should use: `iss` + `\n` + the revoked identifier.
    pub fn record_key(&self) -> String {
        let id = match self {
            Revocation::Token { jti, .. } => jti.as_str(),
            Revocation::Subject { sub, .. } => sub,
            Revocation::Session { sid, .. } => sid,
            Revocation::Client { client_id, .. } => client_id,
            Revocation::Issuer { .. } => "",
        };
        format!("{}\n{}", self.iss(), id)
    }
}

/// One revocation event, whatever format it arrived in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Event {
    pub id: String,
    /// When the authorization server emitted it (unix seconds).
    pub event_time: u64,
    pub revocation: Revocation,
    pub reason: Option<String>,
}

/// Why a record could not be decoded. `reason()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value")]
    Empty,
    #[error("record is larger than {MAX_EVENT_BYTES} bytes")]
    TooLarge,
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    #[error("field `{0}` has the wrong type")]
    WrongType(&'static str),
    #[error("field `{0}` must not be empty")]
    EmptyValue(&'static str),
    #[error("unsupported format version (expected v = 1)")]
    UnsupportedVersion,
    #[error("unknown event type")]
    UnknownType,
    #[error("{0}")]
    Invalid(&'static str),
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge => "too_large",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::NotObject => "not_object",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::WrongType(_) => "wrong_type",
            DecodeError::EmptyValue(_) => "empty_value",
            DecodeError::UnsupportedVersion => "unsupported_version",
            DecodeError::UnknownType => "unknown_type",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

/// The optional fields of a record that a decoder could not use and ignored, named as on
/// the wire (`reason`, `exp`, `details.token_id` …). A bad optional field never makes a
/// record malformed: throwing the record away would lose its revocation, so the field is
/// treated as absent, and the reader counts it (`revsync_event_fields_ignored_total`).
pub type Ignored = Vec<&'static str>;

/// A native v1 record: a revocation, or a publisher's heartbeat (`type: "heartbeat"`),
/// which revokes nothing but proves the publisher → Kafka → revsync path is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NativeRecord {
    Event(Event),
    Heartbeat { iss: String, event_time: u64 },
}

/// Decodes one native v1 revocation. A heartbeat is an error here: it revokes nothing.
pub fn decode_native(bytes: &[u8]) -> Result<Event, DecodeError> {
    decode_native_noting(bytes, &mut Ignored::new())
}

/// [`decode_native`], naming the unusable optional fields it ignored in `ignored`.
pub fn decode_native_noting(bytes: &[u8], ignored: &mut Ignored) -> Result<Event, DecodeError> {
    match decode_native_record_noting(bytes, ignored)? {
        NativeRecord::Event(e) => Ok(e),
        NativeRecord::Heartbeat { .. } => Err(DecodeError::Invalid("a heartbeat revokes nothing")),
    }
}

/// Decodes one native v1 record value. Unknown fields are ignored (forward compatible).
pub fn decode_native_record(bytes: &[u8]) -> Result<NativeRecord, DecodeError> {
    decode_native_record_noting(bytes, &mut Ignored::new())
}

/// [`decode_native_record`], naming the unusable optional fields it ignored in `ignored`.
/// Only a missing or unusable required field (`v`, `id`, `type`, `iss`, `event_time`, the
/// type's identifier) makes a record malformed; an unusable `reason`, `exp` or
/// `not_before` is treated as absent (so `exp` unknown, `not_before` the event time).
pub fn decode_native_record_noting(
    bytes: &[u8],
    ignored: &mut Ignored,
) -> Result<NativeRecord, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(DecodeError::TooLarge);
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(DecodeError::NotObject);
    };
    decode_native_object(&obj, ignored)
}

fn decode_native_object(
    obj: &Map<String, Value>,
    ignored: &mut Ignored,
) -> Result<NativeRecord, DecodeError> {
    match obj.get("v") {
        None => return Err(DecodeError::MissingField("v")),
        Some(v) if v.as_u64() == Some(1) => {}
        Some(Value::Number(_)) => return Err(DecodeError::UnsupportedVersion),
        Some(_) => return Err(DecodeError::WrongType("v")),
    }
    let id = req_str(obj, "id")?;
    let kind = req_str(obj, "type")?;
    let iss = req_str(obj, "iss")?;
    let event_time =
        numeric_date(obj, "event_time")?.ok_or(DecodeError::MissingField("event_time"))?;
    let reason = optional(opt_str(obj, "reason"), "reason", ignored);
    let not_before =
        |ignored: &mut Ignored| optional(numeric_date(obj, "not_before"), "not_before", ignored);
    let revocation = match kind.as_str() {
        "token" => Revocation::Token {
            iss,
            jti: req_str(obj, "jti")?,
            exp: optional(numeric_date(obj, "exp"), "exp", ignored),
        },
        "subject" => Revocation::Subject {
            iss,
            sub: req_str(obj, "sub")?,
            not_before: not_before(ignored).unwrap_or(event_time),
        },
        "session" => Revocation::Session {
            iss,
            sid: req_str(obj, "sid")?,
        },
        "client" => Revocation::Client {
            iss,
            client_id: req_str(obj, "client_id")?,
            not_before: not_before(ignored).unwrap_or(event_time),
        },
        "issuer" => Revocation::Issuer {
            iss,
            not_before: not_before(ignored).unwrap_or(event_time),
        },
        "heartbeat" => return Ok(NativeRecord::Heartbeat { iss, event_time }),
        _ => return Err(DecodeError::UnknownType),
    };
    Ok(NativeRecord::Event(Event {
        id,
        event_time,
        revocation,
        reason,
    }))
}

/// The native v1 JSON of a heartbeat from `iss` (record key: `iss` + `\n`).
pub fn encode_heartbeat(id: &str, iss: &str, event_time: u64) -> String {
    serde_json::json!({"v": 1, "id": id, "type": "heartbeat", "iss": iss, "event_time": event_time})
        .to_string()
}

/// An optional field's value from `read`; an unusable one counts as absent and is named
/// in `ignored`. (In the native format `null` is unusable too: the schema allows none.)
pub(crate) fn optional<T, E>(
    read: Result<Option<T>, E>,
    field: &'static str,
    ignored: &mut Ignored,
) -> Option<T> {
    read.unwrap_or_else(|_| {
        ignored.push(field);
        None
    })
}

fn req_str(obj: &Map<String, Value>, field: &'static str) -> Result<String, DecodeError> {
    opt_str(obj, field)?.ok_or(DecodeError::MissingField(field))
}

fn opt_str(obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, DecodeError> {
    match obj.get(field) {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(DecodeError::EmptyValue(field)),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(DecodeError::WrongType(field)),
    }
}

/// RFC 7519 NumericDate: seconds since the epoch, possibly fractional; fractions are
/// dropped (the comparisons revsync makes are at second granularity).
fn numeric_date(obj: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, DecodeError> {
    match obj.get(field) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                        Ok(Some(f as u64))
                    }
                    _ => Err(DecodeError::WrongType(field)),
                }
            }
        }
        Some(_) => Err(DecodeError::WrongType(field)),
    }
}

/// The native v1 JSON of an event: what `revsync publish` produces.
pub fn encode_native(event: &Event) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        v: u8,
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        iss: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        jti: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sub: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sid: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        not_before: Option<u64>,
        event_time: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    }
    let mut w = Wire {
        v: 1,
        id: &event.id,
        kind: event.revocation.kind(),
        iss: event.revocation.iss(),
        jti: None,
        exp: None,
        sub: None,
        sid: None,
        client_id: None,
        not_before: None,
        event_time: event.event_time,
        reason: event.reason.as_deref(),
    };
    match &event.revocation {
        Revocation::Token { jti, exp, .. } => {
            w.jti = Some(jti);
            w.exp = *exp;
        }
        Revocation::Subject {
            sub, not_before, ..
        } => {
            w.sub = Some(sub);
            w.not_before = Some(*not_before);
        }
        Revocation::Session { sid, .. } => w.sid = Some(sid),
        Revocation::Client {
            client_id,
            not_before,
            ..
        } => {
            w.client_id = Some(client_id);
            w.not_before = Some(*not_before);
        }
        Revocation::Issuer { not_before, .. } => w.not_before = Some(*not_before),
    }
    serde_json::to_string(&w).expect("event serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(s: &str) -> Result<Event, DecodeError> {
        decode_native(s.as_bytes())
    }

    #[test]
    fn decodes_every_type() {
        let e = decode(r#"{"v":1,"id":"e1","type":"token","iss":"I","jti":"J","exp":200,"event_time":100,"reason":"logout"}"#).unwrap();
        assert_eq!(
            e.revocation,
            Revocation::Token {
                iss: "I".into(),
                jti: "J".into(),
                exp: Some(200)
            }
        );
        assert_eq!(e.reason.as_deref(), Some("logout"));
        let e =
            decode(r#"{"v":1,"id":"e2","type":"subject","iss":"I","sub":"S","event_time":100}"#)
                .unwrap();
        assert_eq!(
            e.revocation,
            Revocation::Subject {
                iss: "I".into(),
                sub: "S".into(),
                not_before: 100
            }
        );
        let e =
            decode(r#"{"v":1,"id":"e3","type":"session","iss":"I","sid":"X","event_time":100}"#)
                .unwrap();
        assert_eq!(
            e.revocation,
            Revocation::Session {
                iss: "I".into(),
                sid: "X".into()
            }
        );
        let e = decode(r#"{"v":1,"id":"e4","type":"client","iss":"I","client_id":"C","not_before":90,"event_time":100}"#).unwrap();
        assert_eq!(
            e.revocation,
            Revocation::Client {
                iss: "I".into(),
                client_id: "C".into(),
                not_before: 90
            }
        );
        let e = decode(
            r#"{"v":1,"id":"e5","type":"issuer","iss":"I","event_time":100.7,"future":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(
            e.revocation,
            Revocation::Issuer {
                iss: "I".into(),
                not_before: 100
            }
        );
    }

    #[test]
    fn malformed_events_name_their_problem() {
        let cases = [
            ("", "empty"),
            ("{", "not_json"),
            ("[1]", "not_object"),
            (
                r#"{"id":"e","type":"token","iss":"I","jti":"J","event_time":1}"#,
                "missing_field",
            ),
            (
                r#"{"v":2,"id":"e","type":"token","iss":"I","jti":"J","event_time":1}"#,
                "unsupported_version",
            ),
            (
                r#"{"v":"1","id":"e","type":"token","iss":"I","jti":"J","event_time":1}"#,
                "wrong_type",
            ),
            (
                r#"{"v":1,"id":"e","type":"token","iss":"I","event_time":1}"#,
                "missing_field",
            ),
            (
                r#"{"v":1,"id":"e","type":"token","iss":"I","jti":7,"event_time":1}"#,
                "wrong_type",
            ),
            (
                r#"{"v":1,"id":"e","type":"token","iss":"","jti":"J","event_time":1}"#,
                "empty_value",
            ),
            (
                r#"{"v":1,"id":"e","type":"grant","iss":"I","event_time":1}"#,
                "unknown_type",
            ),
            (
                r#"{"v":1,"id":"e","type":"subject","iss":"I","sub":"S","event_time":-1}"#,
                "wrong_type",
            ),
            (
                r#"{"v":1,"id":"e","type":"subject","iss":"I","sub":"S"}"#,
                "missing_field",
            ),
            (
                r#"{"v":1,"id":"e","type":"token","iss":"I","jti":"","event_time":1}"#,
                "empty_value",
            ),
            (
                r#"{"v":1,"id":7,"type":"session","iss":"I","sid":"X","event_time":1}"#,
                "wrong_type",
            ),
        ];
        for (input, reason) in cases {
            let err = decode(input).unwrap_err();
            assert_eq!(err.reason(), reason, "{input}: {err}");
        }
        let big = format!(r#"{{"v":1,"pad":"{}"}}"#, "x".repeat(MAX_EVENT_BYTES));
        assert_eq!(decode(&big).unwrap_err().reason(), "too_large");
    }

    #[test]
    fn bad_optional_fields_are_ignored_and_the_revocation_kept() {
        let token = |extra: &str| {
            decode(&format!(
                r#"{{"v":1,"id":"e","type":"token","iss":"I","jti":"J","event_time":100{extra}}}"#
            ))
        };
        let kept = Revocation::Token {
            iss: "I".into(),
            jti: "J".into(),
            exp: None,
        };
        for extra in [
            r#","exp":null"#,
            r#","exp":"soon""#,
            r#","exp":-1"#,
            r#","exp":1e300"#,
            r#","reason":"""#,
            r#","reason":7"#,
            r#","reason":null"#,
        ] {
            let e = token(extra).unwrap_or_else(|err| panic!("{extra}: {err}"));
            assert_eq!(e.revocation, kept, "{extra}");
            assert_eq!(e.reason, None, "{extra}");
        }
        // An unusable not_before is the event time, as if it were absent.
        for kind in [
            r#""subject","sub":"S""#,
            r#""client","client_id":"S""#,
            r#""issuer""#,
        ] {
            for bad in [r#""x""#, "null", "-5", "[1]"] {
                let e = decode(&format!(
                    r#"{{"v":1,"id":"e","type":{kind},"iss":"I","event_time":100,"not_before":{bad}}}"#
                ))
                .unwrap_or_else(|err| panic!("{kind} {bad}: {err}"));
                let nb = match e.revocation {
                    Revocation::Subject { not_before, .. }
                    | Revocation::Client { not_before, .. }
                    | Revocation::Issuer { not_before, .. } => not_before,
                    other => panic!("{other:?}"),
                };
                assert_eq!(nb, 100, "{kind} {bad}");
            }
        }
    }

    #[test]
    fn ignored_fields_are_named() {
        let mut ignored = Ignored::new();
        let e = decode_native_noting(
            br#"{"v":1,"id":"e","type":"token","iss":"I","jti":"J","event_time":5,"reason":"","exp":null,"not_before":"x"}"#,
            &mut ignored,
        )
        .unwrap();
        assert_eq!(
            ignored,
            ["reason", "exp"],
            "not_before is not read for tokens"
        );
        assert_eq!(e.event_time, 5);
        let mut ignored = Ignored::new();
        decode_native_noting(
            br#"{"v":1,"id":"e","type":"subject","iss":"I","sub":"S","event_time":5,"reason":"r","not_before":-1}"#,
            &mut ignored,
        )
        .unwrap();
        assert_eq!(ignored, ["not_before"]);
        let mut ignored = Ignored::new();
        decode_native_noting(
            br#"{"v":1,"id":"e","type":"subject","iss":"I","sub":"S","event_time":5,"not_before":4}"#,
            &mut ignored,
        )
        .unwrap();
        assert!(ignored.is_empty());
    }

    #[test]
    fn heartbeats_decode_as_records_but_not_as_revocations() {
        let hb = encode_heartbeat("h1", "I", 1234);
        assert_eq!(
            decode_native_record(hb.as_bytes()).unwrap(),
            NativeRecord::Heartbeat {
                iss: "I".into(),
                event_time: 1234
            }
        );
        assert_eq!(
            decode_native(hb.as_bytes()).unwrap_err().reason(),
            "invalid"
        );
        let no_iss = r#"{"v":1,"id":"h","type":"heartbeat","event_time":1}"#;
        assert_eq!(
            decode_native_record(no_iss.as_bytes())
                .unwrap_err()
                .reason(),
            "missing_field"
        );
    }

    #[test]
    fn record_keys_follow_the_design() {
        let r = Revocation::Subject {
            iss: "I".into(),
            sub: "S".into(),
            not_before: 1,
        };
        assert_eq!(r.record_key(), "I\nS");
        assert_eq!(
            Revocation::Issuer {
                iss: "I".into(),
                not_before: 1
            }
            .record_key(),
            "I\n"
        );
    }

    pub fn arb_revocation() -> impl Strategy<Value = Revocation> {
        let s = "[a-c]{1,2}";
        prop_oneof![
            (s, s, proptest::option::of(0u64..1000))
                .prop_map(|(iss, jti, exp)| Revocation::Token { iss, jti, exp }),
            (s, s, 0u64..1000).prop_map(|(iss, sub, not_before)| Revocation::Subject {
                iss,
                sub,
                not_before
            }),
            (s, s).prop_map(|(iss, sid)| Revocation::Session { iss, sid }),
            (s, s, 0u64..1000).prop_map(|(iss, client_id, not_before)| Revocation::Client {
                iss,
                client_id,
                not_before
            }),
            (s, 0u64..1000).prop_map(|(iss, not_before)| Revocation::Issuer { iss, not_before }),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(r in arb_revocation(), t in 0u64..2000, reason in proptest::option::of("[ -~]{1,10}")) {
            let e = Event { id: "x".into(), event_time: t, revocation: r, reason };
            prop_assert_eq!(decode_native(encode_native(&e).as_bytes()).unwrap(), e);
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_native(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_near_valid_json(
            v in prop_oneof![Just("1".to_string()), Just("\"1\"".to_string()), Just("null".to_string())],
            kind in prop_oneof![Just("token"), Just("subject"), Just("session"), Just("client"), Just("issuer"), Just("x")],
            field in prop_oneof![Just("jti"), Just("sub"), Just("sid"), Just("client_id"), Just("exp"), Just("not_before")],
            val in prop_oneof![Just("\"a\"".to_string()), Just("1e400".to_string()), Just("-5".to_string()), Just("{}".to_string()), Just("1.5".to_string())],
        ) {
            let s = format!(r#"{{"v":{v},"id":"e","type":"{kind}","iss":"I","{field}":{val},"event_time":5}}"#);
            let _ = decode_native(s.as_bytes());
        }
    }
}
