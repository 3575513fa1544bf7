//! # huddle-server
//!
//! The Huddle delivery service (DS): a QUIC endpoint that authenticates
//! clients, keeps a directory of MLS key packages, orders every group's
//! messages in one durable log, pushes new entries to online members and
//! keeps them for offline ones.
//!
//! How it is put together:
//! - [`server`] owns the quinn endpoint: one task per connection, one per
//!   stream; it reads a request frame and writes the response.
//! - [`service`] is the request logic, free of any transport.
//! - [`group`] is the sequencer: one task per group validates handshakes
//!   with openmls `PublicGroup`, numbers entries and pushes them.
//! - [`writer`] batches the writes of all groups into one durable
//!   transaction; [`store`] is the storage trait and its redb backend.
//! - [`push`] runs a connection's push stream; [`hub`] routes Welcomes to
//!   online users.
//! - [`bus`] joins the nodes of a cluster (several DS processes on one
//!   PostgreSQL database): a round one node commits wakes the others.
//!
//! What it does not do: it never holds a key that decrypts an application
//! message or media, and it never links the client's MLS group code.
#![forbid(unsafe_code)]

pub mod budget;
pub mod bus;
pub mod clock;
pub mod config;
pub mod error;
pub mod group;
pub mod hub;
pub mod media;
pub mod metrics;
pub mod push;
pub mod server;
pub mod service;
pub mod store;
pub mod subscriber;
pub mod tls;
pub mod writer;

#[cfg(test)]
mod fault_tests;

pub use config::ServerConfig;
pub use server::{start, Running, Stats};
