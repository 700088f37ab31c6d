//! The Redis bus: several shardcast nodes share channels through Redis.
//!
//! # Shape
//! Each shard owns a [`RedisBus`] handle that talks to the shard's own
//! *companion* OS thread. The companion runs a tokio current-thread runtime
//! that owns the shard's fred clients (fred's `monoio` feature does not
//! compile): one command client (scripts, history reads), one subscriber
//! client (Pub/Sub) and, on the shard that runs the ingest consumer, one
//! client for the blocking `XREADGROUP`. Shard and companion exchange
//! batches (`Vec<Request>` one way, `Vec<BusEvent>` the other) over
//! `tokio::sync::mpsc` channels, which wake the shard's monoio task across
//! threads.
//!
//! # Data in Redis
//! For a channel `C` (every key hash-tagged with the channel name):
//! - `sc:{C}:m` — hash: `epoch` (16 lowercase hex digits), `seq` (newest
//!   offset);
//! - `sc:{C}:s` — stream: the history, entry ID `<offset>-1`, fields `p`
//!   (payload), `t` (published_us), `i` (ingress_us); trimmed with
//!   `MAXLEN ~ history_size`, and expiring with the meta hash after
//!   `history_ttl` without publications;
//! - `sc:{C}:i:k:<key>` / `sc:{C}:i:x:<ingest id>` / `sc:{C}:i:g:<generated>`
//!   — the outcome (`<epoch>:<offset>`) of a publish with that idempotency
//!   key;
//! - `sc:{C}:p` — the Pub/Sub channel announcing publications (binary: see
//!   [`codec::encode_announcement`]);
//! - `sc:{C}:pz` / `sc:{C}:pu` — presence entries (per instance and user,
//!   scored by expiry) and present users;
//! - `sc:{C}:n` / `sc:{C}:nz` — subscription counts: instance → its number
//!   of subscribed connections, and instance scored by that count's expiry.
//!
//! Besides the ingest stream (below), one key spans channels, so it is in
//! no channel's hash slot (Redis Cluster is not supported yet):
//! `sc:channels`, the channels with a live subscription count, scored by
//! the latest expiry among their counts (for the prefix query of
//! `Bus::channels`).
//!
//! An *instance* is one shard's companion in one process start. Its
//! presence entries and counts expire `presence_ttl` after it last wrote
//! them and it rewrites them every third of that, so a dead node's users
//! and subscribers stop counting without anyone cleaning up after it (see
//! [`RedisOptions::presence_ttl`]).
//!
//! A publish is one Lua script: it creates a new epoch if the channel has
//! none (history lost or never kept), returns the stored position for a
//! known idempotency key, else increments `seq`, appends to the stream,
//! refreshes expiries, remembers the key and announces on Pub/Sub — all
//! before the publisher is acknowledged.
//!
//! # Delivery
//! A shard subscribes in Redis only to channels it has local subscribers
//! for. After `SUBSCRIBE` is confirmed (a `PING` round trip on the same
//! connection) it reads the channel's position, answers `Subscribed`, and
//! from then on delivers announcements above that position in order. A
//! jump in offsets, an unknown epoch, a dropped Pub/Sub connection or a
//! lagging receiver make it read the missing publications from the stream
//! (buffering live ones meanwhile) before going on; a new epoch is
//! delivered as such (the "history was lost" signal).
//!
//! # Ingest
//! Backends publish by adding an entry to the stream `sc:ingest`:
//!
//! ```text
//! XADD sc:ingest * channel <name> payload <bytes> [idempotency_key <key>]
//! ```
//!
//! - `channel` (required): a valid channel name;
//! - `payload` (required): the publication's bytes, at most the configured
//!   payload limit;
//! - `idempotency_key` (optional): publishes with the same key on the same
//!   channel are stored once, whether they come from clients or backends;
//!   without one, the entry ID is the key (so a reclaimed entry is not
//!   published twice).
//!
//! Every node reads the stream through the consumer group `shardcast`
//! (created at the stream's start if missing) as consumer `<node id>`, so
//! each entry is executed by one node; it is acknowledged (`XACK`) once
//! stored. Entries a node took but did not acknowledge (the node died) are
//! taken over by another node with `XAUTOCLAIM` after `ingest_claim_idle`.
//! Malformed entries are acknowledged and counted, never retried. Backends
//! should bound the stream themselves (`XADD sc:ingest MAXLEN ~ 100000 *
//! ...`); shardcast does not delete entries.

mod codec;
mod companion;
mod ingest;
mod keys;
mod scripts;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{Bus, BusError, BusEvent, ChannelQuery, History, Position, ReplyTo};

pub use codec::{decode_announcement, encode_announcement, Announcement, Malformed};
pub use keys::{INGEST_GROUP, INGEST_STREAM};

/// Settings of the Redis bus (config keys `redis.*`).
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Publications kept per channel (`XADD MAXLEN ~`; Redis may keep a
    /// few more). At least 1.
    pub history_size: u64,
    /// A channel's history and epoch expire this long after its last
    /// publication.
    pub history_ttl: Duration,
    /// How long an idempotency key given by a publisher (client, HTTP or
    /// ingest) is remembered.
    pub idempotency_ttl: Duration,
    /// Bound on every Redis command; a publish that cannot be stored within
    /// it fails with `Unavailable`.
    pub command_timeout: Duration,
    /// This node's name: its ingest consumer name.
    pub node_id: String,
    /// Run the ingest consumer (on shard 0).
    pub ingest: bool,
    /// Ingest entries pending longer than this on another consumer are
    /// taken over.
    pub ingest_claim_idle: Duration,
    /// Largest payload accepted from Redis (announcements, history,
    /// ingest entries); larger ones are rejected as malformed.
    pub max_payload_bytes: usize,
    /// A node's presence entries and subscription counts live this long
    /// without a heartbeat; each shard refreshes its own, and sweeps out
    /// expired ones (a dead node's), every third of it. So a dead node's
    /// members are removed within `presence_ttl × 4/3` of its death (the
    /// entry may have just been refreshed, and the sweep that finds it
    /// expired comes at most a third later), plus one Redis round trip; its
    /// subscription counts stop counting within `presence_ttl` (a read
    /// ignores expired counts without waiting for a sweep).
    pub presence_ttl: Duration,
    /// Replicas that must confirm a publish (Redis `WAIT`) before it is
    /// acknowledged; 0 = none (acknowledged once the primary ran it).
    pub wait_replicas: u32,
    /// Payload bytes one history answer carries at most (at least one
    /// publication; see `local::Retention::page_bytes`).
    pub history_page_bytes: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            history_size: 1000,
            history_ttl: Duration::from_secs(86_400),
            idempotency_ttl: Duration::from_secs(3600),
            command_timeout: Duration::from_millis(1000),
            node_id: default_node_id(),
            ingest: true,
            ingest_claim_idle: Duration::from_secs(30),
            max_payload_bytes: 1 << 20,
            presence_ttl: Duration::from_secs(15),
            wait_replicas: 0,
            history_page_bytes: 4 << 20,
        }
    }
}

/// `hostname-pid`.
pub fn default_node_id() -> String {
    let mut buf = [0u8; 256];
    #[allow(unsafe_code)]
    // SAFETY: gethostname writes at most `len` bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "node".to_string()
    };
    format!("{host}-{}", std::process::id())
}

/// Counters shared by all companions of a process (rare events only; the
/// hot path keeps its counts per shard).
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Announcements, stream entries or ingest entries rejected as
    /// malformed.
    pub malformed: AtomicU64,
    /// Catch-up reads from the stream (after a jump, reconnect or lag).
    pub catch_ups: AtomicU64,
    /// Publications delivered from the stream by catch-up reads.
    pub caught_up: AtomicU64,
    /// Gaps that could not be filled (history trimmed or expired) within
    /// an epoch; delivery went on after the gap.
    pub unfillable_gaps: AtomicU64,
    /// Reconnects of the Pub/Sub connection.
    pub reconnects: AtomicU64,
    /// Publishes that failed (Redis unreachable, timeout, script error).
    pub publish_errors: AtomicU64,
    /// Ingest entries published (including deduplicated retries).
    pub ingest_executed: AtomicU64,
    /// Ingest entries taken over from another consumer.
    pub ingest_claimed: AtomicU64,
}

impl RedisStats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value of one of these counters.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Why the Redis bus could not start.
#[derive(Debug, Error)]
pub enum SetupError {
    /// `redis.url` does not parse as a Redis URL (fred's reason).
    #[error("bad redis url: {0}")]
    Url(String),
    /// An option fred refused (its reason).
    #[error("bad redis option: {0}")]
    Option(String),
    /// The first connection failed or took over 5 s (fred's reason).
    #[error("cannot connect to redis: {0}")]
    Connect(String),
    /// A companion thread could not be spawned (the OS's reason).
    #[error("cannot start the redis companion thread: {0}")]
    Thread(String),
}

/// What a shard asks of its companion.
pub(crate) enum Request {
    Publish {
        channel: Arc<str>,
        payload: Bytes,
        key: Option<Box<str>>,
        reply_to: ReplyTo,
        ingress_us: u64,
    },
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
    History {
        channel: Arc<str>,
        after: Position,
        request: u64,
    },
    Presence {
        channel: Arc<str>,
        user: Arc<str>,
        joined: bool,
    },
    Members {
        channel: Arc<str>,
        request: u64,
    },
    Count {
        channel: Arc<str>,
        count: u64,
    },
    Channels {
        query: ChannelQuery,
        request: u64,
    },
}

/// One shard's handle on the Redis bus.
pub struct RedisBus {
    requests: UnboundedSender<Vec<Request>>,
    events: UnboundedReceiver<Vec<BusEvent>>,
    queued: Vec<Request>,
    /// Answers made up locally when the companion is gone.
    local: Vec<BusEvent>,
    waker: Option<Waker>,
    stats: Arc<RedisStats>,
}

/// Whether `url` is a Redis URL the bus can use (parsed as the bus will
/// parse it, nothing connected): `Err` is the parser's reason.
pub fn check_url(url: &str) -> Result<(), String> {
    fred_config(url).map(drop).map_err(|e| match e {
        SetupError::Url(why) => why,
        other => other.to_string(),
    })
}

fn fred_config(url: &str) -> Result<fred::types::config::Config, SetupError> {
    fred::types::config::Config::from_url(url).map_err(|e| SetupError::Url(e.to_string()))
}

/// Whether Redis at `url` accepts a TCP connection within `timeout`
/// (any of its listed hosts). `Err` says why in a sentence: a URL that
/// does not parse ([`SetupError::Url`], a configuration error that no
/// retry fixes), or the operating system's reason for the last host that
/// failed ([`SetupError::Connect`], e.g. "Connection refused (os error
/// 111)"). fred reports a refused connection as a debug dump of
/// `io::Error`; probing first gives the operator a readable reason.
pub fn probe(url: &str, timeout: Duration) -> Result<(), SetupError> {
    use std::net::ToSocketAddrs;
    let config = fred_config(url)?;
    let mut last = String::from("no host in the URL");
    for server in config.server.hosts() {
        let host = format!("{}:{}", server.host, server.port);
        let addrs = match host.to_socket_addrs() {
            Ok(a) => a,
            Err(e) => {
                last = format!("cannot resolve {host}: {e}");
                continue;
            }
        };
        for addr in addrs {
            match std::net::TcpStream::connect_timeout(&addr, timeout) {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("cannot connect to {addr}: {e}"),
            }
        }
    }
    Err(SetupError::Connect(last))
}

impl RedisBus {
    /// Starts one companion thread per shard, connects each to Redis at
    /// `url` (`redis://[user:pass@]host:port[/db]`), and returns the
    /// shards' handles once all are connected. Fails if Redis cannot be
    /// reached at start.
    pub fn cluster(
        url: &str,
        shards: usize,
        options: RedisOptions,
    ) -> Result<Vec<RedisBus>, SetupError> {
        if options.history_size == 0 {
            return Err(SetupError::Option("history_size must be at least 1".into()));
        }
        if options.command_timeout.is_zero() {
            return Err(SetupError::Option(
                "command_timeout must be positive".into(),
            ));
        }
        let config = fred_config(url)?;
        let stats = Arc::new(RedisStats::default());
        let mut buses = Vec::with_capacity(shards);
        let mut readies = Vec::with_capacity(shards);
        let seen = Arc::new(companion::NodeSeen::default());
        for shard in 0..shards {
            let (req_tx, req_rx) = unbounded_channel();
            let (ev_tx, ev_rx) = unbounded_channel();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let setup = companion::Setup {
                shard,
                config: config.clone(),
                options: options.clone(),
                stats: stats.clone(),
                ingest: options.ingest && shard == 0,
                seen: seen.clone(),
            };
            std::thread::Builder::new()
                .name(format!("sc-redis-{shard}"))
                .spawn(move || companion::run(setup, req_rx, ev_tx, ready_tx))
                .map_err(|e| SetupError::Thread(e.to_string()))?;
            readies.push(ready_rx);
            buses.push(RedisBus {
                requests: req_tx,
                events: ev_rx,
                queued: Vec::new(),
                local: Vec::new(),
                waker: None,
                stats: stats.clone(),
            });
        }
        for ready in readies {
            match ready.recv_timeout(companion::CONNECT_TIMEOUT + Duration::from_secs(2)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(SetupError::Connect(e)),
                Err(_) => return Err(SetupError::Connect("timed out".into())),
            }
        }
        Ok(buses)
    }

    /// The process-wide Redis bus counters.
    pub fn stats(&self) -> Arc<RedisStats> {
        self.stats.clone()
    }

    fn push(&mut self, r: Request) {
        self.queued.push(r);
    }
}

impl Bus for RedisBus {
    fn publish(
        &mut self,
        channel: &str,
        payload: Bytes,
        idempotency_key: Option<&str>,
        reply_to: ReplyTo,
        ingress_us: u64,
    ) {
        self.push(Request::Publish {
            channel: Arc::from(channel),
            payload,
            key: idempotency_key.map(Box::from),
            reply_to,
            ingress_us,
        });
    }

    fn subscribe(&mut self, channel: &str) {
        self.push(Request::Subscribe(Arc::from(channel)));
    }

    fn unsubscribe(&mut self, channel: &str) {
        self.push(Request::Unsubscribe(Arc::from(channel)));
    }

    fn history(&mut self, channel: &str, after: Position, request: u64) {
        self.push(Request::History {
            channel: Arc::from(channel),
            after,
            request,
        });
    }

    fn presence(&mut self, channel: &str, user: &str, joined: bool) {
        self.push(Request::Presence {
            channel: Arc::from(channel),
            user: Arc::from(user),
            joined,
        });
    }

    fn presence_members(&mut self, channel: &str, request: u64) {
        self.push(Request::Members {
            channel: Arc::from(channel),
            request,
        });
    }

    fn subscription_count(&mut self, channel: &str, count: u64) {
        self.push(Request::Count {
            channel: Arc::from(channel),
            count,
        });
    }

    fn channels(&mut self, query: ChannelQuery, request: u64) {
        self.push(Request::Channels { query, request });
    }

    fn flush(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.queued);
        if let Err(err) = self.requests.send(batch) {
            // The companion is gone (it only stops when this handle is
            // dropped, or on a bug): answer what can be answered.
            for r in err.0 {
                match r {
                    Request::Publish {
                        channel, reply_to, ..
                    } => self.local.push(BusEvent::Published {
                        reply_to,
                        channel,
                        result: Err(BusError::Unavailable("redis bus stopped".into())),
                    }),
                    Request::History {
                        channel, request, ..
                    } => self.local.push(BusEvent::History {
                        request,
                        channel,
                        result: History::Unavailable("redis bus stopped".into()),
                    }),
                    Request::Members { channel, request } => self.local.push(BusEvent::Members {
                        request,
                        channel,
                        result: Err(BusError::Unavailable("redis bus stopped".into())),
                    }),
                    Request::Channels { request, .. } => self.local.push(BusEvent::Channels {
                        request,
                        result: Err(BusError::Unavailable("redis bus stopped".into())),
                    }),
                    Request::Subscribe(_)
                    | Request::Unsubscribe(_)
                    | Request::Presence { .. }
                    | Request::Count { .. } => {}
                }
            }
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }

    fn poll_events(&mut self, cx: &mut Context<'_>, out: &mut Vec<BusEvent>) -> Poll<()> {
        let mut ready = !self.local.is_empty();
        out.append(&mut self.local);
        while let Poll::Ready(Some(mut batch)) = self.events.poll_recv(cx) {
            ready = true;
            out.append(&mut batch);
        }
        if ready {
            Poll::Ready(())
        } else {
            match &self.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => self.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
    }
}
