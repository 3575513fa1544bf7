//! # huddle-client
//!
//! The Huddle client library and the `huddle` command line built on it.
//!
//! A [`Client`] is one device of one user. It keeps its identity and pinned
//! server certificate in a home directory ([`home`]), its MLS state and
//! history in one SQLite database ([`db`]), and talks to the delivery
//! service over QUIC ([`net`]). Everything that opens content (MLS group
//! secrets, media keys) lives here and nowhere else.
//!
//! What it does not do: it never sends plaintext or keys to the server, and
//! it never trusts the server for membership — every membership change is
//! an MLS commit it verifies itself.
#![forbid(unsafe_code)]

pub mod app;
pub mod client;
pub mod db;
pub mod error;
pub mod event;
pub mod follow;
pub mod home;
pub mod identity;
pub mod lock;
pub mod net;
pub mod preview;
pub mod web;

pub use client::media::{Progress, Quiet};
pub use client::roles::InviteJoin;
pub use client::Client;
pub use error::{ClientError, Result};
pub use event::{Event, EventKind};
pub use home::Home;
