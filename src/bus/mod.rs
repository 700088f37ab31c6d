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

/// Whether `channel` is a presence channel (a non-default Pusher app's
/// `#app-<id>/presence-…` too).
pub fn is_presence(channel: &str) -> bool {
    crate::protocol::pusher::channel::to_client(channel).starts_with(PRESENCE_PREFIX)
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
    /// The history this position belongs to; nonzero for a channel the bus
    /// knows (0 only in `{0, 0}`, "no history at all").
    pub epoch: u64,
    /// Publications counted from 1 within `epoch`; 0 = none yet.
    pub offset: u64,
}

/// One sequenced publication. The payload is shared, never copied, between
/// shards.
#[derive(Clone, Debug)]
pub struct Publication {
    /// The publication's offset in its channel's current epoch (the epoch
    /// travels with the batch, see [`BusEvent::Publications`]).
    pub offset: u64,
    /// When the publication was sequenced (Unix time, microseconds).
    pub published_us: u64,
    /// When the publisher's frame was read by its shard (Unix time,
    /// microseconds); for the ingress→write latency metric.
    pub ingress_us: u64,
    /// The application bytes, as published.
    pub payload: Bytes,
}

/// Who asked for a publish, so the result can be routed back to the
/// connection and request that sent it. Opaque to the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    /// The publishing connection's id within its shard.
    pub conn: u64,
    /// The id of the client's `Publish` message (0 = none), echoed on the
    /// reply.
    pub request: u32,
}

/// Why a publish was not stored.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The bus could not store or answer (e.g. Redis unreachable or timed
    /// out, the bus stopped); the text says why. Clients get
    /// `ErrorCode::Unavailable`.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// What the bus hands back to a shard.
#[derive(Clone, Debug)]
pub enum BusEvent {
    /// Consecutive publications of one channel, in offset order. The same
    /// `Arc` is handed to every interested shard.
    Publications {
        /// The channel published on.
        channel: Arc<str>,
        /// The epoch every item belongs to.
        epoch: u64,
        /// The publications, offsets ascending by 1.
        items: Arc<[Publication]>,
    },
    /// This shard's interest in `channel` took effect; every later
    /// publication has an offset above `position.offset`. Sent again, with
    /// a new epoch, when a bus finds the channel's history lost before any
    /// publication of the new epoch reached this shard.
    Subscribed {
        /// The channel subscribed to.
        channel: Arc<str>,
        /// The channel's newest position when the interest took effect.
        position: Position,
    },
    /// The outcome of a publish this shard asked for.
    Published {
        /// The connection and request that published, as given to
        /// [`Bus::publish`].
        reply_to: ReplyTo,
        /// The channel published on.
        channel: Arc<str>,
        /// Where the publication was stored (for a retried idempotency key,
        /// where the first one was), or why it was not.
        result: Result<Position, BusError>,
    },
    /// The answer to [`Bus::history`].
    History {
        /// The `request` given to [`Bus::history`].
        request: u64,
        /// The channel read.
        channel: Arc<str>,
        /// What the read found.
        result: History,
    },
    /// `user` became present on the presence channel `channel` (its first
    /// connection anywhere joined: `joined`) or stopped being present (its
    /// last one left). Sent to every shard with subscribers, in order with
    /// the channel's publications.
    Presence {
        /// The presence channel.
        channel: Arc<str>,
        /// The user id (its token's `sub`).
        user: Arc<str>,
        /// True: the user became present; false: it left.
        joined: bool,
    },
    /// The answer to [`Bus::channels`]: each channel asked about with its
    /// number of subscribed connections over all shards (and nodes), sorted
    /// by name.
    Channels {
        /// The `request` given to [`Bus::channels`].
        request: u64,
        /// The channels and their subscription counts.
        result: Result<Vec<(Arc<str>, u64)>, BusError>,
    },
    /// The answer to [`Bus::presence_members`]: every user present on
    /// `channel`, sorted, each once.
    Members {
        /// The `request` given to [`Bus::presence_members`].
        request: u64,
        /// The presence channel asked about.
        channel: Arc<str>,
        /// The user ids, sorted, or why the bus could not answer.
        result: Result<Vec<Arc<str>>, BusError>,
    },
}

/// Which channels a [`Bus::channels`] query asks about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelQuery {
    /// One channel (answered even when it has no subscriber: count 0).
    One(Arc<str>),
    /// Every channel with at least one subscriber anywhere whose name
    /// starts with this (empty: all of them).
    Prefix(Arc<str>),
}

/// What a history read found.
#[derive(Clone, Debug)]
pub enum History {
    /// Publications after the requested position, in order: one page (at
    /// most about the history page size in payload bytes, so that a reader
    /// is fed as its socket drains) of what was stored when the read ran,
    /// possibly none; read again from the last one for the next page.
    /// Offsets are consecutive and start right after the requested one.
    Items {
        /// The epoch of the items (that of the requested position).
        epoch: u64,
        /// The publications, offsets ascending by 1.
        items: Vec<Publication>,
    },
    /// The requested position cannot be continued: the epoch changed
    /// (history lost) or the next publication was trimmed or expired.
    /// `current` is the newest position, from which live delivery goes on.
    Lost {
        /// The channel's newest position (the local bus answers `{0, 0}` for
        /// a channel it has no record of).
        current: Position,
    },
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
    /// This shard's number of connections subscribed to `channel` is now
    /// `count` (0: none left). Shards report at most once per channel per
    /// tick; the bus sums shards (and nodes) for [`Bus::channels`].
    fn subscription_count(&mut self, channel: &str, count: u64);
    /// Asks the subscription counts of `query`'s channels. Answered by
    /// [`BusEvent::Channels`] carrying `request`, after every count this
    /// shard reported before asking.
    fn channels(&mut self, query: ChannelQuery, request: u64);
    /// Sends everything queued since the last flush, one batch per
    /// destination.
    fn flush(&mut self);
    /// Appends ready events to `out`; `Pending` (with the waker registered)
    /// when there were none.
    fn poll_events(&mut self, cx: &mut Context<'_>, out: &mut Vec<BusEvent>) -> Poll<()>;
}
