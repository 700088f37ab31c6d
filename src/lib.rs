//! shardcast: a thread-per-core WebSocket push server.
//!
//! Layers point one way: [`protocol`] is pure (no I/O, no clock), [`shard`]
//! drives sockets on monoio and depends on `protocol` and on the [`bus`]
//! trait, and [`bus`] is the only place that moves publications between
//! shards (and, later, nodes).

// No unsafe code but where a module allows it (and says why): the
// syscalls the driver and systemd need, and the generated FlatBuffers
// code. Every unsafe block carries a `SAFETY:` comment.
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
pub mod metrics;
pub mod preflight;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod systemd;
