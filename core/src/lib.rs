//! # huddle-core
//!
//! What the Huddle delivery service and client share, and nothing that needs
//! a runtime: the wire protocol ([`proto`], framed by [`frame`]), connection
//! authentication proofs ([`auth`]), users' devices ([`devices`]), identifiers ([`ids`]), the MLS
//! policy both sides apply ([`mls`]), who may do what in a group ([`policy`]),
//! and the encrypted media format
//! ([`media`]).
//!
//! This crate does no I/O: no sockets, no files, no clock, no async runtime.
//! Bytes and the current time come in as arguments; values and bytes come
//! out. That keeps every decoder here fuzzable and every rule testable
//! without a network.
//!
//! It does not hold or handle keys that open content: MLS group state lives
//! in the client, and the delivery service only ever sees public MLS data.
#![forbid(unsafe_code)]

pub mod auth;
pub mod devices;
pub mod frame;
pub mod ids;
pub mod media;
pub mod mls;
pub mod policy;
pub mod proto;
pub mod welcome;

pub use ids::{GroupId, MediaId};
