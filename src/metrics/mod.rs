//! Metrics: plain per-shard counters and histograms (no atomics on the hot
//! path), published by each shard into its own slot of a [`Registry`] a few
//! times a second, and rendered by the admin endpoint.

#![forbid(unsafe_code)]

mod prometheus;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

pub use prometheus::render;

/// Highest latency a histogram tracks, in microseconds (60 s); larger
/// values are clamped into the top bucket.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Why a connection was refused before the upgrade or closed by a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The shard holds `limits.max_connections_per_shard`; HTTP 503.
    Capacity,
    /// The address holds `limits.max_connections_per_ip`; HTTP 503.
    PerIp,
    /// The address connects faster than `limits.accept_rate_per_ip`; HTTP 503.
    AcceptRate,
    /// `Origin` not in `limits.allowed_origins`; HTTP 403.
    Origin,
    /// The upgrade request did not complete within
    /// `limits.handshake_timeout_ms`; cut without a response.
    Handshake,
    /// No Connect within `auth.deadline_ms`; native close 4005.
    AuthDeadline,
    /// `limits.rate_limit_strikes` messages in a row over
    /// `limits.messages_per_second`; native close 4008.
    Rate,
    /// Nothing received for `limits.idle_timeout_ms`; native close 4002.
    Idle,
    /// The token's `exp` (plus leeway) passed without a refresh; native close 4003.
    TokenExpired,
}

impl Limit {
    /// Every limit, in the order of [`Counters::limit_hits`].
    pub const ALL: [Limit; 9] = [
        Limit::Capacity,
        Limit::PerIp,
        Limit::AcceptRate,
        Limit::Origin,
        Limit::Handshake,
        Limit::AuthDeadline,
        Limit::Rate,
        Limit::Idle,
        Limit::TokenExpired,
    ];

    /// The `limit` label value of `shardcast_limit_hits_total`, e.g.
    /// `"shard_capacity"`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Capacity => "shard_capacity",
            Limit::PerIp => "connections_per_ip",
            Limit::AcceptRate => "accept_rate_per_ip",
            Limit::Origin => "origin",
            Limit::Handshake => "handshake_timeout",
            Limit::AuthDeadline => "auth_deadline",
            Limit::Rate => "message_rate",
            Limit::Idle => "idle_timeout",
            Limit::TokenExpired => "token_expired",
        }
    }
}

/// Counters one shard keeps. Gauges are filled in when published.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Gauge: open connections (filled in when published).
    pub connections: u64,
    /// Gauge: subscriptions held by this shard's connections.
    pub subscriptions: u64,
    /// Gauge: channels with at least one subscriber on this shard (filled in
    /// when published).
    pub channels: u64,
    /// Connections accepted, refused ones included.
    pub connections_accepted: u64,
    /// Client requests decoded (one per message of a frame, rate-limited
    /// ones included).
    pub messages_in: u64,
    /// Publications and presence events delivered, one per recipient.
    pub messages_out: u64,
    /// Bytes read from client sockets.
    pub bytes_in: u64,
    /// Bytes written to client sockets.
    pub bytes_out: u64,
    /// Connections closed for exceeding their outbound budget (native close 4001).
    pub slow_consumer_closes: u64,
    /// Connect requests refused (native close 4004).
    pub auth_failures: u64,
    /// Hits per [`Limit`], indexed by `Limit as usize` (the order of
    /// [`Limit::ALL`]).
    pub limit_hits: [u64; Limit::ALL.len()],
}

impl Counters {
    /// Counts one hit of `l`.
    pub fn limit(&mut self, l: Limit) {
        self.limit_hits[l as usize] += 1;
    }
}

/// Latency histograms in microseconds.
#[derive(Clone, Debug)]
pub struct Latencies {
    /// From the moment a publication was sequenced to the write that
    /// handed it to the kernel, per delivered message.
    pub publish_to_write: Histogram<u64>,
    /// From the moment the publishing client's frame was read to that
    /// write, per delivered message.
    pub ingress_to_write: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        let h =
            || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static bounds are valid");
        Latencies {
            publish_to_write: h(),
            ingress_to_write: h(),
        }
    }
}

impl Latencies {
    /// Records one publication delivered to `recipients` connections.
    pub fn record(&mut self, publish_us: u64, ingress_us: u64, recipients: u64) {
        let clamp = |v: u64| v.clamp(1, MAX_LATENCY_US);
        // Bounds are fixed and values clamped, so recording cannot fail.
        let _ = self
            .publish_to_write
            .record_n(clamp(publish_us), recipients);
        let _ = self
            .ingress_to_write
            .record_n(clamp(ingress_us), recipients);
    }

    fn add(&mut self, other: &Latencies) {
        let _ = self.publish_to_write.add(&other.publish_to_write);
        let _ = self.ingress_to_write.add(&other.ingress_to_write);
    }

    fn reset(&mut self) {
        self.publish_to_write.reset();
        self.ingress_to_write.reset();
    }
}

/// What one shard last published.
#[derive(Clone, Debug, Default)]
pub struct ShardReport {
    /// The counters as of the shard's last publish.
    pub counters: Counters,
    /// Cumulative since start.
    pub latencies: Latencies,
}

/// Reads counters kept elsewhere (e.g. by the Redis bus) at scrape time:
/// (metric name, help, value).
pub type Collector = Box<dyn Fn() -> Vec<(&'static str, &'static str, u64)> + Send + Sync>;

/// Shared between the shards (writers, one slot each) and the admin
/// endpoint (reader). Each slot's lock is taken a few times a second by its
/// shard and on each scrape; never per message.
pub struct Registry {
    shards: Vec<Mutex<ShardReport>>,
    collectors: Mutex<Vec<Collector>>,
    /// Bumped by each shard's periodic task; the service watchdog pings
    /// only while every shard's counter moves.
    heartbeats: Vec<AtomicU64>,
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Registry {
    /// A registry with `shards` empty slots, not ready, not draining.
    pub fn new(shards: usize) -> Self {
        Registry {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            collectors: Mutex::new(Vec::new()),
            heartbeats: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// Shard `i` publishes its counters and this interval's latencies
    /// (which it then resets).
    pub fn publish(&self, shard: usize, counters: &Counters, interval: &mut Latencies) {
        let mut slot = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        slot.counters = counters.clone();
        slot.latencies.add(interval);
        interval.reset();
    }

    /// A copy of every shard's last report, indexed by shard.
    pub fn snapshot(&self) -> Vec<ShardReport> {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Shard `shard` is alive: bumps its heartbeat counter.
    pub fn heartbeat(&self, shard: usize) {
        self.heartbeats[shard].fetch_add(1, Ordering::Relaxed);
    }

    /// Every shard's heartbeat counter, for comparing over time.
    pub fn heartbeats(&self) -> Vec<u64> {
        self.heartbeats
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .collect()
    }

    /// Adds counters read at every scrape.
    pub fn add_collector(&self, c: Collector) {
        self.collectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c);
    }

    /// Every collector's counters, now.
    pub fn collected(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.collectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|c| c())
            .collect()
    }

    /// Marks the process ready (every shard accepting).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Marks the process draining; [`Registry::is_ready`] is false from now
    /// on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether [`Registry::set_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ready: every shard accepting and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_accumulates_latencies_and_replaces_counters() {
        let r = Registry::new(2);
        let mut c = Counters::default();
        let mut l = Latencies::default();
        c.messages_out = 5;
        l.record(100, 200, 5);
        r.publish(1, &c, &mut l);
        assert_eq!(l.publish_to_write.len(), 0, "interval reset");
        c.messages_out = 7;
        l.record(300, 400, 2);
        r.publish(1, &c, &mut l);
        let snap = r.snapshot();
        assert_eq!(snap[1].counters.messages_out, 7);
        assert_eq!(snap[1].latencies.publish_to_write.len(), 7);
        assert_eq!(snap[0].latencies.publish_to_write.len(), 0);
    }

    #[test]
    fn readiness_ends_with_draining() {
        let r = Registry::new(1);
        assert!(!r.is_ready());
        r.set_ready();
        assert!(r.is_ready());
        r.set_draining();
        assert!(!r.is_ready());
    }
}
