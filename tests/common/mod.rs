//! Helpers shared by the integration tests. Each test binary includes this with
//! `mod common;` and uses what it needs.
#![allow(dead_code)]

pub mod broker;
pub mod daemon;
pub mod ingest;
pub mod jwt;
pub mod router;

/// A token revocation by issuer "A" of `jti`, expiring at `exp`, sent now.
pub fn token_event(jti: String, exp: u64) -> revsync::event::Event {
    revsync::event::Event {
        id: jti.clone(),
        event_time: revsync::unix_now(),
        revocation: revsync::event::Revocation::Token {
            iss: "A".into(),
            jti,
            exp: Some(exp),
        },
        reason: None,
    }
}
