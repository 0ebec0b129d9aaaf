//! Helpers shared by the integration tests. Each test binary includes this with
//! `mod common;` and uses what it needs.
#![allow(dead_code)]

pub mod broker;
pub mod daemon;
pub mod ingest;
pub mod jwt;
pub mod router;
