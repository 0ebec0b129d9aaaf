//! Keycloak user and admin events as JSON (the `keycloak` format): the shape Keycloak's
//! event listeners publish (`org.keycloak.events.Event` and `…admin.AdminEvent` serialized
//! by Jackson). Events carry no issuer, so the topic's `issuer` (the realm's issuer URL,
//! e.g. `https://kc.example.com/realms/main`) is the issuer of every revocation; put one
//! realm on one topic.
//!
//! A record with `operationType` is an admin event, otherwise a user event (`type`).
//! `time` (ms) is required; `event_time` and `not_before` are the second it falls in
//! (rounded down). A token is revoked iff its `iat <= not_before`, so one issued in the
//! event's own second is covered (which came first inside that second is unknown) and
//! one issued in the next second is not, as it must be: it was issued after the event.
//! Rounding up would revoke tokens of that next second too.
//! Events with a non-empty `error` (failed operations) revoke nothing.
//!
//! Only what names the revocation is required: `time`, `type` or `operationType`, and the
//! event's identifier (`sessionId`, `userId`, `resourcePath`). Other members that are
//! unusable (an empty `id`, `details` that is not an object, an `error` that is not a
//! string, a `representation` that is not JSON …) are ignored as if absent, and named in
//! the caller's [`Ignored`]: throwing the event away would lose its revocation.
//!
//! | event | revocation |
//! |---|---|
//! | user `LOGOUT` (`sessionId`) | session |
//! | user `REVOKE_GRANT` with `details.token_id` (an access token revoked at the revocation endpoint) | token |
//! | user `DELETE_ACCOUNT` (`userId`) | subject |
//! | admin `DELETE` `users/{id}` (resource `USER`) | subject |
//! | admin `ACTION` `users/{id}/logout` (resource `USER`) | subject |
//! | admin `DELETE` `sessions/{id}` (resource `USER_SESSION`) | session |
//! | admin `ACTION` `logout-all` (resource `REALM`) | issuer |
//! | admin `UPDATE` of the realm (`REALM`) whose representation has `notBefore` > 0 | issuer, `not_before` = `notBefore` |
//! | admin `UPDATE` of a client (`CLIENT`) whose representation has `clientId` and `notBefore` > 0 | client |
//! | anything else (`LOGIN`, `REVOKE_GRANT` of a refresh token, role changes …) | ignored |
//!
//! Admin representations are only present when the realm's admin events include them.
//! An event without `id` gets a stable one derived from its bytes, so replays dedupe.

use serde_json::{Map, Value};

use super::{json_object, opt_object, opt_str, opt_u64, optional, req_str, Decoded, FormatError};
use crate::event::{DecodeError, Event, Ignored, Revocation};

/// Decodes one Keycloak event attributed to `issuer`.
pub fn decode(payload: &[u8], issuer: &str) -> Decoded {
    decode_noting(payload, issuer, &mut Ignored::new())
}

/// [`decode`], naming the unusable optional members it ignored in `ignored`.
pub fn decode_noting(payload: &[u8], issuer: &str, ignored: &mut Ignored) -> Decoded {
    let obj = json_object(payload)?;
    let ms = opt_u64(&obj, "time")?.ok_or(DecodeError::MissingField("time"))?;
    let id = match optional(opt_str(&obj, "id"), "id", ignored) {
        Some(id) => id.to_string(),
        None => derived_id(payload),
    };
    // An error that cannot be read cannot show that the operation failed; taking it as
    // not failed can only revoke more, never let a revoked token through.
    let failed = match obj.get("error") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => {
            ignored.push("error");
            false
        }
    };
    let admin = obj.contains_key("operationType");
    if admin {
        req_str(&obj, "operationType")?;
        any_str(&obj, "resourcePath")?;
    } else {
        req_str(&obj, "type")?;
    }
    // A failed operation (wrong password, unknown session …) revoked nothing.
    if failed {
        return Ok(None);
    }
    let not_before = ms / 1000;
    let mapped = if admin {
        admin_event(&obj, issuer, not_before, ignored)?
    } else {
        user_event(&obj, issuer, not_before, ignored)?
    };
    Ok(mapped.map(|(revocation, reason)| Event {
        id,
        event_time: ms / 1000,
        revocation,
        reason: Some(reason.to_string()),
    }))
}

type Mapped = Option<(Revocation, &'static str)>;

fn user_event(
    obj: &Map<String, Value>,
    iss: &str,
    not_before: u64,
    ignored: &mut Ignored,
) -> Result<Mapped, FormatError> {
    let iss = iss.to_string();
    let details = optional(opt_object(obj, "details"), "details", ignored);
    Ok(Some(match req_str(obj, "type")? {
        "LOGOUT" => (
            Revocation::Session {
                iss,
                sid: req_str(obj, "sessionId")?.to_string(),
            },
            "keycloak LOGOUT",
        ),
        "REVOKE_GRANT" => {
            // A token_id makes this an access-token revocation and is its identifier:
            // present but unusable, the event is malformed.
            let token_id = match details {
                Some(details) => opt_str(details, "token_id")?,
                None => None,
            };
            // Without token_id it revoked a refresh/offline token, i.e. one client's
            // consent of one user: the model has no (user, client) entry, and revoking
            // either alone would deny far more than Keycloak did.
            let Some(jti) = token_id else { return Ok(None) };
            (
                Revocation::Token {
                    iss,
                    jti: jti.to_string(),
                    exp: None,
                },
                "keycloak REVOKE_GRANT",
            )
        }
        "DELETE_ACCOUNT" => (
            Revocation::Subject {
                iss,
                sub: req_str(obj, "userId")?.to_string(),
                not_before,
            },
            "keycloak DELETE_ACCOUNT",
        ),
        _ => return Ok(None),
    }))
}

fn admin_event(
    obj: &Map<String, Value>,
    iss: &str,
    not_before: u64,
    ignored: &mut Ignored,
) -> Result<Mapped, FormatError> {
    let operation = req_str(obj, "operationType")?;
    let resource =
        optional(any_str(obj, "resourceType"), "resourceType", ignored).filter(|r| !r.is_empty());
    let path = any_str(obj, "resourcePath")?.unwrap_or("");
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Older Keycloak versions send no resourceType: the path alone decides then.
    let is = |kind: &str| resource.is_none_or(|r| r == kind);
    let iss = iss.to_string();
    let mapped = match (operation, segments.as_slice()) {
        ("DELETE", ["users", id]) if is("USER") && !id.is_empty() => (
            Revocation::Subject {
                iss,
                sub: id.to_string(),
                not_before,
            },
            "keycloak admin: user deleted",
        ),
        ("ACTION", ["users", id, "logout"]) if is("USER") && !id.is_empty() => (
            Revocation::Subject {
                iss,
                sub: id.to_string(),
                not_before,
            },
            "keycloak admin: user logged out",
        ),
        ("DELETE", ["sessions", id]) if is("USER_SESSION") && !id.is_empty() => (
            Revocation::Session {
                iss,
                sid: id.to_string(),
            },
            "keycloak admin: session deleted",
        ),
        ("ACTION", ["logout-all"]) if is("REALM") => (
            Revocation::Issuer { iss, not_before },
            "keycloak admin: logout-all",
        ),
        ("UPDATE", _) if resource == Some("REALM") => {
            let Some(rep) = optional(representation(obj), "representation", ignored) else {
                return Ok(None);
            };
            match optional(
                opt_u64(&rep, "notBefore"),
                "representation.notBefore",
                ignored,
            ) {
                Some(nb) if nb > 0 => (
                    Revocation::Issuer {
                        iss,
                        not_before: nb,
                    },
                    "keycloak admin: realm not-before",
                ),
                _ => return Ok(None),
            }
        }
        ("UPDATE", _) if resource == Some("CLIENT") => {
            let Some(rep) = optional(representation(obj), "representation", ignored) else {
                return Ok(None);
            };
            let client_id = optional(
                opt_str(&rep, "clientId"),
                "representation.clientId",
                ignored,
            );
            let nb = optional(
                opt_u64(&rep, "notBefore"),
                "representation.notBefore",
                ignored,
            );
            match (client_id, nb) {
                (Some(client_id), Some(nb)) if nb > 0 => (
                    Revocation::Client {
                        iss,
                        client_id: client_id.to_string(),
                        not_before: nb,
                    },
                    "keycloak admin: client not-before",
                ),
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(mapped))
}

/// An optional string member that may be empty (informational members Keycloak may
/// leave blank).
fn any_str<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, FormatError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(DecodeError::WrongType(field).into()),
    }
}

/// The admin event's `representation`: a JSON string (as Keycloak stores it) or an
/// object (as some listeners forward it).
fn representation(obj: &Map<String, Value>) -> Result<Option<Map<String, Value>>, FormatError> {
    match obj.get("representation") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o.clone())),
        Some(Value::String(s)) => match serde_json::from_str(s) {
            Ok(Value::Object(o)) => Ok(Some(o)),
            _ => Err(DecodeError::WrongType("representation").into()),
        },
        Some(_) => Err(DecodeError::WrongType("representation").into()),
    }
}

/// `kc-` + the first 128 bits of the record's SHA-256, hex.
fn derived_id(payload: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, payload);
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("kc-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ISS: &str = "https://kc.example/realms/main";

    fn dec(v: Value) -> Decoded {
        decode(v.to_string().as_bytes(), ISS)
    }

    fn revocation(v: Value) -> Revocation {
        dec(v).unwrap().expect("an event").revocation
    }

    #[test]
    fn user_events_map_to_session_token_and_subject() {
        assert_eq!(
            revocation(
                json!({"type": "LOGOUT", "time": 1700000000123u64, "realmId": "r", "userId": "u1", "sessionId": "s1"})
            ),
            Revocation::Session {
                iss: ISS.into(),
                sid: "s1".into()
            }
        );
        assert_eq!(
            revocation(
                json!({"type": "REVOKE_GRANT", "time": 1700000000000u64, "clientId": "app", "details": {"token_id": "t1"}})
            ),
            Revocation::Token {
                iss: ISS.into(),
                jti: "t1".into(),
                exp: None
            }
        );
        assert_eq!(
            revocation(json!({"type": "DELETE_ACCOUNT", "time": 1700000000001u64, "userId": "u1"})),
            Revocation::Subject {
                iss: ISS.into(),
                sub: "u1".into(),
                not_before: 1700000000
            }
        );
    }

    #[test]
    fn admin_events_map_to_subject_session_and_issuer() {
        let admin = |op: &str, res: &str, path: &str| json!({"time": 1700000000500u64, "realmId": "r", "operationType": op, "resourceType": res, "resourcePath": path});
        let sub = Revocation::Subject {
            iss: ISS.into(),
            sub: "u1".into(),
            not_before: 1700000000,
        };
        assert_eq!(revocation(admin("DELETE", "USER", "users/u1")), sub);
        assert_eq!(revocation(admin("ACTION", "USER", "users/u1/logout")), sub);
        assert_eq!(
            revocation(admin("DELETE", "USER_SESSION", "sessions/s9")),
            Revocation::Session {
                iss: ISS.into(),
                sid: "s9".into()
            }
        );
        assert_eq!(
            revocation(admin("ACTION", "REALM", "logout-all")),
            Revocation::Issuer {
                iss: ISS.into(),
                not_before: 1700000000
            }
        );
        // Without resourceType (old Keycloak) the path decides.
        let mut old = admin("DELETE", "USER", "/users/u1");
        old.as_object_mut().unwrap().remove("resourceType");
        assert_eq!(revocation(old), sub);
        // Not revocations.
        for (op, res, path) in [
            ("UPDATE", "USER", "users/u1"),
            ("CREATE", "USER", "users/u1"),
            ("DELETE", "CLIENT", "clients/c1"),
            ("ACTION", "REALM", "push-revocation"),
            ("DELETE", "USER", "users/u1/role-mappings/realm"),
            ("DELETE", "GROUP", "users/u1"),
        ] {
            assert_eq!(dec(admin(op, res, path)), Ok(None), "{op} {res} {path}");
        }
    }

    #[test]
    fn not_before_pushes_come_from_representations() {
        let realm = json!({"time": 1700000000000u64, "operationType": "UPDATE", "resourceType": "REALM",
            "representation": "{\"realm\":\"main\",\"notBefore\":1699999990}"});
        assert_eq!(
            revocation(realm),
            Revocation::Issuer {
                iss: ISS.into(),
                not_before: 1699999990
            }
        );
        let client = json!({"time": 1700000000000u64, "operationType": "UPDATE", "resourceType": "CLIENT",
            "resourcePath": "clients/abc", "representation": {"clientId": "web", "notBefore": 1699999991}});
        assert_eq!(
            revocation(client),
            Revocation::Client {
                iss: ISS.into(),
                client_id: "web".into(),
                not_before: 1699999991
            }
        );
        let zero = json!({"time": 1, "operationType": "UPDATE", "resourceType": "REALM", "representation": "{\"notBefore\":0}"});
        assert_eq!(dec(zero), Ok(None));
        let absent = json!({"time": 1, "operationType": "UPDATE", "resourceType": "REALM"});
        assert_eq!(dec(absent), Ok(None));
        // An unreadable representation is ignored like an absent one.
        let broken = json!({"time": 1, "operationType": "UPDATE", "resourceType": "REALM", "representation": "{"});
        assert_eq!(dec(broken), Ok(None));
    }

    #[test]
    fn unmapped_and_failed_events_are_ignored() {
        for v in [
            json!({"type": "LOGIN", "time": 1, "sessionId": "s"}),
            json!({"type": "CODE_TO_TOKEN", "time": 1}),
            json!({"type": "REVOKE_GRANT", "time": 1, "details": {"revoked_client": "app"}}),
            json!({"type": "LOGOUT", "time": 1, "sessionId": "s", "error": "invalid_user_credentials"}),
            json!({"type": "LOGOUT_ERROR", "time": 1, "error": "x"}),
        ] {
            assert_eq!(dec(v.clone()), Ok(None), "{v}");
        }
        // An empty error string is not a failure.
        assert!(
            dec(json!({"type": "LOGOUT", "time": 1, "sessionId": "s", "error": ""}))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn malformed_events_name_their_problem() {
        for (v, reason) in [
            (json!({"type": "LOGOUT", "sessionId": "s"}), "missing_field"),
            (
                json!({"type": "LOGOUT", "time": "soon", "sessionId": "s"}),
                "wrong_type",
            ),
            (json!({"type": "LOGOUT", "time": 1}), "missing_field"),
            (
                json!({"type": "LOGOUT", "time": 1, "sessionId": ""}),
                "empty_value",
            ),
            (json!({"time": 1}), "missing_field"),
            (json!({"type": 5, "time": 1}), "wrong_type"),
            (json!({"time": 1, "operationType": 3}), "wrong_type"),
        ] {
            assert_eq!(dec(v.clone()).unwrap_err().reason(), reason, "{v}");
        }
        assert_eq!(decode(b"[]", ISS).unwrap_err().reason(), "not_object");
        assert_eq!(decode(b"", ISS).unwrap_err().reason(), "empty");
    }

    #[test]
    fn not_before_is_the_second_the_event_happened_in() {
        // Revoked iff iat <= not_before: a token issued in the event's own second may
        // precede it (covered), one issued in the next second cannot (spared).
        for (ms, nb) in [
            (1700000000000u64, 1700000000),
            (1700000000001, 1700000000),
            (1700000000999, 1700000000),
            (1700000001000, 1700000001),
        ] {
            assert_eq!(
                revocation(json!({"type": "DELETE_ACCOUNT", "time": ms, "userId": "u1"})),
                Revocation::Subject {
                    iss: ISS.into(),
                    sub: "u1".into(),
                    not_before: nb
                },
                "{ms}"
            );
        }
    }

    #[test]
    fn bad_optional_members_are_ignored_and_the_revocation_kept() {
        let session = Revocation::Session {
            iss: ISS.into(),
            sid: "s".into(),
        };
        for v in [
            json!({"id": "", "type": "LOGOUT", "time": 1000, "sessionId": "s"}),
            json!({"id": 5, "type": "LOGOUT", "time": 1000, "sessionId": "s"}),
            json!({"type": "LOGOUT", "time": 1000, "sessionId": "s", "details": "n/a"}),
            json!({"type": "LOGOUT", "time": 1000, "sessionId": "s", "details": [1]}),
            // An unreadable error cannot show the operation failed: the safe reading is
            // that it did not.
            json!({"type": "LOGOUT", "time": 1000, "sessionId": "s", "error": 5}),
        ] {
            assert_eq!(revocation(v.clone()), session, "{v}");
        }
        let user_logout = json!({"time": 1000, "operationType": "ACTION", "resourceType": 7,
            "resourcePath": "users/u1/logout"});
        assert_eq!(
            revocation(user_logout),
            Revocation::Subject {
                iss: ISS.into(),
                sub: "u1".into(),
                not_before: 1
            }
        );
        // Unusable details of a REVOKE_GRANT name no token: nothing to revoke. A token_id
        // that is there but unusable is the identifier of a token revocation: malformed.
        let v = json!({"type": "REVOKE_GRANT", "time": 1, "details": "x"});
        assert_eq!(dec(v), Ok(None));
        for (token_id, reason) in [(json!(5), "wrong_type"), (json!(""), "empty_value")] {
            let v = json!({"type": "REVOKE_GRANT", "time": 1, "details": {"token_id": token_id}});
            assert_eq!(dec(v.clone()).unwrap_err().reason(), reason, "{v}");
        }
    }

    #[test]
    fn ids_are_kept_or_derived_stably() {
        let with_id = json!({"id": "ev-1", "type": "LOGOUT", "time": 1000, "sessionId": "s"});
        assert_eq!(dec(with_id).unwrap().unwrap().id, "ev-1");
        let bytes = br#"{"type":"LOGOUT","time":1999,"sessionId":"s"}"#;
        let a = decode(bytes, ISS).unwrap().unwrap();
        let b = decode(bytes, ISS).unwrap().unwrap();
        assert_eq!(a.id, b.id);
        assert!(a.id.starts_with("kc-") && a.id.len() == 35, "{}", a.id);
        assert_eq!(a.event_time, 1);
    }
}
