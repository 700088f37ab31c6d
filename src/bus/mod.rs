//! The bus moves publications between shards (and, with Redis, between
//! nodes). It is the only code that knows where a channel's order is
//! decided; shards only say what they publish and which channels they have
//! subscribers for, and receive ordered publications back.
//!
//! The interface is message-shaped rather than `async fn`: a shard queues
//! requests while it handles one tick's input, calls [`Bus::flush`] once at
//! the end of the tick (so each destination gets one batch), and drains
//! events with [`Bus::poll_events`]. That keeps cross-shard traffic batched
//! and lets a shard never wait on another shard.

#[cfg(test)]
pub(crate) mod contract;
pub mod local;
pub mod redis;

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use thiserror::Error;

pub use local::LocalBus;

/// Channels with this prefix are presence channels: every authenticated
/// connection subscribed to one makes its user a member.
pub const PRESENCE_PREFIX: &str = "presence-";

/// Whether `channel` is a presence channel.
pub fn is_presence(channel: &str) -> bool {
    channel.starts_with(PRESENCE_PREFIX)
}

/// Now, as microseconds since the Unix epoch (the unit of publication
/// timestamps, comparable across threads and, with synced clocks, nodes).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A position in a channel's history: `offset` counts publications from 1
/// and `epoch` names the history they belong to. A new epoch means earlier
/// offsets are gone (history lost or never kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: u64,
    pub offset: u64,
}

/// One sequenced publication. The payload is shared, never copied, between
/// shards.
#[derive(Clone, Debug)]
pub struct Publication {
    pub offset: u64,
    /// When the publication was sequenced (Unix time, microseconds).
    pub published_us: u64,
    /// When the publisher's frame was read by its shard (Unix time,
    /// microseconds); for the ingress→write latency metric.
    pub ingress_us: u64,
    pub payload: Bytes,
}

/// Who asked for a publish, so the result can be routed back to the
/// connection and request that sent it. Opaque to the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    pub conn: u64,
    pub request: u32,
}

/// Why a publish was not stored.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// What the bus hands back to a shard.
#[derive(Clone, Debug)]
pub enum BusEvent {
    /// Consecutive publications of one channel, in offset order. The same
    /// `Arc` is handed to every interested shard.
    Publications {
        channel: Arc<str>,
        epoch: u64,
        items: Arc<[Publication]>,
    },
    /// This shard's interest in `channel` took effect; every later
    /// publication has an offset above `position.offset`. Sent again, with
    /// a new epoch, when a bus finds the channel's history lost before any
    /// publication of the new epoch reached this shard.
    Subscribed {
        channel: Arc<str>,
        position: Position,
    },
    /// The outcome of a publish this shard asked for.
    Published {
        reply_to: ReplyTo,
        channel: Arc<str>,
        result: Result<Position, BusError>,
    },
    /// The answer to [`Bus::history`].
    History {
        request: u64,
        channel: Arc<str>,
        result: History,
    },
    /// `user` became present on the presence channel `channel` (its first
    /// connection anywhere joined: `joined`) or stopped being present (its
    /// last one left). Sent to every shard with subscribers, in order with
    /// the channel's publications.
    Presence {
        channel: Arc<str>,
        user: Arc<str>,
        joined: bool,
    },
    /// The answer to [`Bus::presence_members`]: every user present on
    /// `channel`, sorted, each once.
    Members {
        request: u64,
        channel: Arc<str>,
        result: Result<Vec<Arc<str>>, BusError>,
    },
}

/// What a history read found.
#[derive(Clone, Debug)]
pub enum History {
    /// Every publication after the requested position, in order, up to the
    /// newest stored when the read ran (possibly none). Offsets are
    /// consecutive and start right after the requested one.
    Items { epoch: u64, items: Vec<Publication> },
    /// The requested position cannot be continued: the epoch changed
    /// (history lost) or the next publication was trimmed or expired.
    /// `current` is the newest position, from which live delivery goes on.
    Lost { current: Position },
    /// The history store could not be reached.
    Unavailable(String),
}

/// One shard's handle on the bus. Each shard owns its own handle; handles
/// are `Send` so they can be built before the shard threads start.
pub trait Bus: Send {
    /// Queues a publish. The result arrives later as [`BusEvent::Published`].
    /// `ingress_us` is when the publish reached the server (µs since the
    /// Unix epoch, this host's clock): latencies are measured from it, and
    /// the Redis bus's `redis.command_timeout_ms` counts from it.
    fn publish(
        &mut self,
        channel: &str,
        payload: Bytes,
        idempotency_key: Option<&str>,
        reply_to: ReplyTo,
        ingress_us: u64,
    );
    /// This shard now has at least one subscriber for `channel`. Answered by
    /// [`BusEvent::Subscribed`]; publications follow it.
    fn subscribe(&mut self, channel: &str);
    /// This shard has no subscriber for `channel` any more.
    fn unsubscribe(&mut self, channel: &str);
    /// Reads what was published on `channel` after `after`. Answered by
    /// [`BusEvent::History`] carrying `request`.
    fn history(&mut self, channel: &str, after: Position, request: u64);
    /// This shard's first connection of `user` subscribed to the presence
    /// channel `channel` (`joined`), or its last one left. Shards report
    /// only these transitions; the bus merges them across shards (and
    /// nodes) and emits [`BusEvent::Presence`] when the user's overall
    /// presence changes. Call it after [`Bus::subscribe`] and before
    /// [`Bus::unsubscribe`] of the same channel.
    fn presence(&mut self, channel: &str, user: &str, joined: bool);
    /// Asks who is present on `channel`. Answered by [`BusEvent::Members`]
    /// carrying `request`, after every presence change this shard reported
    /// before asking.
    fn presence_members(&mut self, channel: &str, request: u64);
    /// Sends everything queued since the last flush, one batch per
    /// destination.
    fn flush(&mut self);
    /// Appends ready events to `out`; `Pending` (with the waker registered)
    /// when there were none.
    fn poll_events(&mut self, cx: &mut Context<'_>, out: &mut Vec<BusEvent>) -> Poll<()>;
}
