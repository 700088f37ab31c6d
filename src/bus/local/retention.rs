//! What the embedded bus keeps and how it is bounded: the retention
//! settings, and the shard-wide order in which retained publications and
//! idempotency keys are evicted, oldest first, to stay within
//! `Retention::max_bytes`.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::bus::Publication;

/// What one remembered idempotency key costs besides its bytes (its map
/// entry and its place in the channel's and the shard's order; measured
/// sizes, rounded up).
pub const KEY_OVERHEAD: usize = 96;

/// How much history the local bus keeps per channel.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Publications kept per channel (0 = none: recovery then only
    /// succeeds when nothing was missed).
    pub size: usize,
    /// A channel nobody subscribes to is forgotten this long after its last
    /// publication.
    pub ttl: Duration,
    /// Bytes of history this shard keeps over all the channels it owns
    /// (payloads plus [`ENTRY_OVERHEAD`] each); over it the oldest
    /// publications, whatever their channel, are dropped first.
    pub max_bytes: usize,
    /// Payload bytes one history answer carries at most (at least one
    /// publication): a recovering client reads its history in pages of
    /// about its outbound budget, so a catch-up never holds more of it.
    pub page_bytes: usize,
    /// How long an idempotency key is remembered after the publish that
    /// stored it (`history.idempotency_ttl_secs`, as on the Redis bus).
    /// Keys count against `max_bytes` with the history ([`KEY_OVERHEAD`]
    /// each) and go oldest first with it.
    pub idempotency_ttl: Duration,
}

/// What one retained publication costs besides its payload: the
/// `Publication` in its channel's history and its slot in the shard's
/// eviction order (measured sizes, rounded up).
pub const ENTRY_OVERHEAD: usize = 96;

/// The shard's retained history and idempotency keys in the order they
/// were stored, for evicting the oldest first across channels. Entries
/// whose publication or key already left its channel (trimmed to
/// `Retention::size`, expired, channel forgotten) are skipped when
/// reached, and compacted away once they outnumber the live ones.
#[derive(Default)]
pub(super) struct Retained {
    pub(super) bytes: usize,
    pub(super) live: usize,
    pub(super) order: VecDeque<Entry>,
}

/// A publication (or the idempotency key of one) in the eviction order.
pub(super) struct Entry {
    pub(super) channel: Arc<str>,
    pub(super) epoch: u64,
    pub(super) offset: u64,
    pub(super) kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Publication,
    Key,
}

pub(super) fn key_cost(key: &str) -> usize {
    key.len() + KEY_OVERHEAD
}

pub(super) fn cost(p: &Publication) -> usize {
    p.payload.len() + ENTRY_OVERHEAD
}
