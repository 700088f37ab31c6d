//! Everything one shard owns: its connections, its subscription table, its
//! bus handle and its encoder. Only the shard's own thread touches it, so
//! there are no locks; tasks borrow it briefly and never across an await.
//!
//! Fan-out lives here: a tick's publications for a channel are encoded once
//! into a WebSocket frame, and every subscriber's queue gets a refcount of
//! that frame. Presence events travel the same way.
//!
//! Presence: for each presence channel the shard counts its subscribed
//! connections per user and tells the bus only when a user's first
//! connection on this shard joins or its last one leaves; the bus merges
//! shards (and nodes) into one member list.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use monoio::net::TcpStream;

use super::admission::Verdict;
use super::outbound::{Flushed, Outbound};
use super::rate::TokenBucket;
use super::slab::{ConnId, Slab};
use super::Settings;
use crate::auth::Identity;
use crate::bus::{self, unix_us, Bus, BusEvent, History, Position, Publication, ReplyTo};
use crate::metrics::{Counters, Latencies, Limit, Registry};
use crate::protocol::channel;
use crate::protocol::compression::{self, Compressor, Decompressor};
use crate::protocol::wire::{self, ClientRequest, Encoder, ErrorCode};
use crate::protocol::ws::{self, OpCode};

/// A reason to close a connection: a WebSocket close code and its text.
#[derive(Debug, Clone)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
}

impl CloseReason {
    /// A slow consumer's backlog cannot get through, so it is dropped and
    /// the close frame goes next; for every other close, replies already
    /// queued are sent first.
    fn drops_backlog(&self) -> bool {
        self.code == wire::close::SLOW_CONSUMER
    }
}

impl CloseReason {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        CloseReason {
            code,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Upgrade request not complete yet.
    Handshake,
    /// WebSocket open; `connected` once the client sent `Connect`.
    Open { connected: bool },
    /// Close frame (or HTTP error) queued; the socket is shut down when it
    /// is flushed or at `deadline`, whichever comes first.
    Closing { deadline: Instant },
}

pub struct Conn {
    stream: Rc<TcpStream>,
    fd: RawFd,
    out: Outbound,
    subs: Vec<Arc<str>>,
    phase: Phase,
    /// Queued in `State::dirty` for this tick's flush.
    dirty: bool,
    /// A writer task is waiting for this socket to become writable.
    writer_active: bool,
    /// Shut the write side once `out` drains (after a close frame).
    shutdown_after_flush: bool,
    peer: IpAddr,
    /// Counted in the per-IP table; released when the connection ends.
    admitted: bool,
    /// Decided at accept: answer the upgrade request with this instead.
    refusal: Option<Box<Refusal>>,
    /// Last time anything arrived from the client.
    last_seen: Instant,
    /// A keepalive ping is out and unanswered.
    pinged: bool,
    bucket: TokenBucket,
    /// Rate-limited messages in a row.
    strikes: u32,
    /// Set by a Connect with a token; `None` for anonymous clients.
    identity: Option<Box<Identity>>,
    /// Negotiated `shardcast.v1+zstd`: every binary message carries a
    /// compression flag byte.
    zstd: bool,
}

/// An HTTP refusal of the upgrade (limits hit at accept).
pub struct Refusal {
    pub status: u16,
    pub message: String,
    pub retry_after_secs: Option<u32>,
}

/// Per-connection deadlines that are the same for everyone, so a FIFO
/// queue is also a deadline-ordered queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deadline {
    Handshake,
    Connect,
}

enum ChannelState {
    /// Asked the bus; waiting for its `Subscribed` answer.
    Pending {
        waiters: Vec<(ConnId, u32, Option<Position>)>,
    },
    /// Receiving publications; `last` is the newest position delivered.
    Active { last: Position },
}

struct LocalChannel {
    state: ChannelState,
    /// Connections receiving live publications.
    subscribers: Vec<ConnId>,
    /// Connections catching up from history; they join `subscribers` once
    /// they reach the live position.
    recovering: Vec<ConnId>,
    /// Presence channels only: subscribed connections per user on this
    /// shard (a user is listed while it has at least one).
    members: HashMap<Arc<str>, u32>,
}

impl LocalChannel {
    fn is_unused(&self) -> bool {
        let waiting = match &self.state {
            ChannelState::Pending { waiters } => !waiters.is_empty(),
            ChannelState::Active { .. } => false,
        };
        self.subscribers.is_empty() && self.recovering.is_empty() && !waiting
    }
}

/// A connection catching up on a channel from history.
struct Recovery {
    conn: ConnId,
    request: u32,
    channel: Arc<str>,
    /// The newest position the client has (advances as history arrives).
    at: Position,
    /// `Subscribed { recovered: true }` was sent.
    announced: bool,
}

pub struct State {
    shard: u16,
    settings: Rc<Settings>,
    conns: Slab<Conn>,
    channels: HashMap<Arc<str>, LocalChannel>,
    bus: Box<dyn Bus>,
    encoder: Encoder,
    /// Connections with something to flush this tick.
    dirty: Vec<ConnId>,
    /// Connections with a blocked writer or a pending close, for the sweeper.
    watched: Vec<ConnId>,
    /// Connections whose socket filled up and need a writer task.
    need_writer: Vec<(ConnId, Rc<TcpStream>)>,
    /// Requests were queued on the bus and need a flush.
    bus_pending: bool,
    dispatcher: Option<Waker>,
    next_client: u64,
    now: Instant,
    events: Vec<BusEvent>,
    to_close: Vec<(ConnId, CloseReason)>,
    deadlines: VecDeque<(Instant, ConnId, Deadline)>,
    /// When the last full scan (keepalive, idle, token expiry) ran.
    last_scan: Instant,
    pub counters: Counters,
    /// Latencies since the last publish to the registry.
    latencies: Latencies,
    /// (published_us, ingress_us, recipients) of this tick's deliveries,
    /// recorded once the tick's writes are done.
    delivered: Vec<(u64, u64, u64)>,
    /// The current tick put two or more publications of a channel in one
    /// frame: publications arrive faster than ticks, and a pause before
    /// the next tick would batch them further.
    batching: bool,
    registry: Arc<Registry>,
    drain: Option<Drain>,
    recoveries: HashMap<u64, Recovery>,
    next_recovery: u64,
    /// Presence queries waiting for the bus: token → (connection, request).
    presence_queries: HashMap<u64, (ConnId, u32)>,
    next_presence_query: u64,
    compressor: Compressor,
    decompressor: Decompressor,
}

/// A graceful shutdown in progress: connections are closed a few at a
/// time over the window so their reconnects do not arrive all at once.
struct Drain {
    started: Instant,
    /// Closes are spread over this part of the window; the rest is left
    /// for flushing and the clients' close replies.
    spread: Duration,
    deadline: Instant,
    total: usize,
    closed: usize,
}

impl State {
    pub fn new(
        shard: u16,
        settings: Rc<Settings>,
        bus: Box<dyn Bus>,
        registry: Arc<Registry>,
    ) -> std::io::Result<Self> {
        let compressor = Compressor::new(
            settings.compression_level,
            settings.compression_min_bytes,
            settings.dictionary.as_ref(),
        )?;
        let decompressor = Decompressor::new(
            settings.frame_limits.max_message_bytes,
            settings.dictionary.as_ref(),
        )?;
        Ok(State {
            shard,
            settings,
            conns: Slab::default(),
            channels: HashMap::new(),
            bus,
            encoder: Encoder::new(),
            dirty: Vec::new(),
            watched: Vec::new(),
            need_writer: Vec::new(),
            bus_pending: false,
            dispatcher: None,
            next_client: 0,
            now: Instant::now(),
            events: Vec::new(),
            to_close: Vec::new(),
            deadlines: VecDeque::new(),
            last_scan: Instant::now(),
            counters: Counters::default(),
            latencies: Latencies::default(),
            delivered: Vec::new(),
            batching: false,
            registry,
            drain: None,
            recoveries: HashMap::new(),
            next_recovery: 0,
            presence_queries: HashMap::new(),
            next_presence_query: 0,
            compressor,
            decompressor,
        })
    }

    /// Starts draining: every connection gets 1012 within `window`.
    pub fn begin_drain(&mut self, window: Duration) {
        self.touch();
        self.drain = Some(Drain {
            started: self.now,
            spread: window.mul_f32(0.8),
            deadline: self.now + window,
            total: self.conns.len(),
            closed: 0,
        });
        self.drain_step();
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_some()
    }

    /// Whether draining has finished: no connection left, or out of time.
    pub fn drained(&self) -> bool {
        self.drain
            .as_ref()
            .is_some_and(|d| self.conns.len() == 0 || Instant::now() >= d.deadline)
    }

    /// Closes this step's share of the connections.
    fn drain_step(&mut self) {
        let Some(d) = &self.drain else {
            return;
        };
        let elapsed = self.now.duration_since(d.started);
        let due = if elapsed >= d.spread || d.spread.is_zero() {
            usize::MAX
        } else {
            (d.total as f64 * elapsed.as_secs_f64() / d.spread.as_secs_f64()).ceil() as usize
        };
        let planned = due.saturating_sub(d.closed);
        let mut budget = planned;
        if budget == 0 {
            return;
        }
        let deadline = d.deadline;
        let mut victims = Vec::new();
        for (id, conn) in self.conns.iter_mut() {
            if budget == 0 {
                break;
            }
            match conn.phase {
                Phase::Closing { .. } => continue,
                Phase::Handshake => shutdown(conn.fd, libc::SHUT_RDWR),
                Phase::Open { .. } => victims.push(id),
            }
            budget -= 1;
        }
        let why = CloseReason::new(
            ws::close::SERVICE_RESTART,
            "server restarting: reconnect and recover from your last position",
        );
        let n = planned - budget;
        for id in victims {
            self.close(id, &why);
            if let Some(Conn {
                phase: Phase::Closing { deadline: d },
                ..
            }) = self.conns.get_mut(id)
            {
                *d = (*d).min(deadline);
            }
        }
        if let Some(d) = &mut self.drain {
            d.closed += n;
        }
    }

    /// Publishes this shard's counters and latencies to the registry.
    pub fn report(&mut self) {
        self.counters.connections = self.conns.len() as u64;
        self.counters.channels = self.channels.len() as u64;
        self.registry
            .publish(usize::from(self.shard), &self.counters, &mut self.latencies);
    }

    /// Registers an accepted connection and decides whether it will be
    /// admitted; a refused one is answered once its request head arrives.
    pub fn add_conn(&mut self, stream: Rc<TcpStream>, fd: RawFd, peer: IpAddr) -> ConnId {
        self.touch();
        let now = self.now;
        let limits = &self.settings.limits;
        let mut admitted = false;
        self.counters.connections_accepted += 1;
        let refusal = if self.conns.len() >= limits.max_connections_per_shard as usize {
            self.counters.limit(Limit::Capacity);
            Some(Refusal {
                status: 503,
                message: "server at connection capacity; retry later".into(),
                retry_after_secs: Some(5),
            })
        } else {
            match self.settings.admission.admit(peer, now) {
                Verdict::Admit => {
                    admitted = true;
                    None
                }
                Verdict::TooManyConnections { limit } => {
                    self.counters.limit(Limit::PerIp);
                    Some(Refusal {
                        status: 503,
                        message: format!("too many connections from your address (limit {limit})"),
                        retry_after_secs: Some(5),
                    })
                }
                Verdict::TooFast { retry_after_secs } => {
                    self.counters.limit(Limit::AcceptRate);
                    Some(Refusal {
                        status: 503,
                        message: "connecting too fast from your address".into(),
                        retry_after_secs: Some(retry_after_secs),
                    })
                }
            }
        };
        let id = self.conns.insert(Conn {
            stream,
            fd,
            out: Outbound::default(),
            subs: Vec::new(),
            phase: Phase::Handshake,
            dirty: false,
            writer_active: false,
            shutdown_after_flush: false,
            peer,
            admitted,
            refusal: refusal.map(Box::new),
            last_seen: now,
            pinged: false,
            bucket: TokenBucket::new(limits.message_burst, now),
            strikes: 0,
            identity: None,
            zstd: false,
        });
        let deadline = now + Duration::from_millis(u64::from(limits.handshake_timeout_ms));
        self.deadlines
            .push_back((deadline, id, Deadline::Handshake));
        id
    }

    /// Takes the refusal decided at accept, if any.
    pub fn take_refusal(&mut self, id: ConnId) -> Option<Box<Refusal>> {
        self.conns.get_mut(id).and_then(|c| c.refusal.take())
    }

    /// Records that `bytes` arrived (keepalive bookkeeping and metrics).
    pub fn received(&mut self, id: ConnId, bytes: usize) {
        self.counters.bytes_in += bytes as u64;
        let now = self.now;
        if let Some(c) = self.conns.get_mut(id) {
            c.last_seen = now;
            c.pinged = false;
        }
    }

    /// Forgets a connection whose reader has finished. Shuts the socket down
    /// so a writer task still waiting on it wakes up and exits.
    pub fn remove_conn(&mut self, id: ConnId) {
        self.detach(id);
        if let Some(conn) = self.conns.remove(id) {
            shutdown(conn.fd, libc::SHUT_RDWR);
            if conn.admitted {
                self.settings.admission.release(conn.peer);
            }
        }
        // Leaving its channels may have queued unsubscribes for the bus.
        self.wake_if_needed();
    }

    pub fn touch(&mut self) {
        self.now = Instant::now();
    }

    /// The handshake succeeded: queue the 101 response.
    pub fn accept_upgrade(&mut self, id: ConnId, response: Vec<u8>, zstd: bool) {
        if let Some(conn) = self.conns.get_mut(id) {
            conn.phase = Phase::Open { connected: false };
            conn.zstd = zstd;
        }
        let deadline = self.now + Duration::from_millis(u64::from(self.settings.auth_deadline_ms));
        self.deadlines.push_back((deadline, id, Deadline::Connect));
        self.enqueue(id, Bytes::from(response));
    }

    /// The handshake failed: queue the HTTP error and close after it.
    pub fn reject_upgrade(&mut self, id: ConnId, response: Vec<u8>) {
        self.enqueue(id, Bytes::from(response));
        self.begin_close(id);
    }

    /// Sends a close frame and starts closing.
    pub fn close(&mut self, id: ConnId, why: &CloseReason) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if matches!(conn.phase, Phase::Closing { .. }) {
            return;
        }
        if why.drops_backlog() {
            conn.out.discard_unstarted();
            self.counters.slow_consumer_closes += 1;
        }
        conn.out.push(ws::close_frame(why.code, &why.reason));
        self.mark_dirty(id);
        self.begin_close(id);
    }

    /// Queues a pong (or any ready-made control frame).
    pub fn send_frame(&mut self, id: ConnId, frame: Bytes) {
        self.enqueue(id, frame);
    }

    fn begin_close(&mut self, id: ConnId) {
        let deadline = self.now + self.settings.close_timeout;
        if let Some(conn) = self.conns.get_mut(id) {
            conn.phase = Phase::Closing { deadline };
            conn.shutdown_after_flush = true;
        }
        self.detach(id);
        self.watched.push(id);
        self.mark_dirty(id);
    }

    /// Removes the connection from every channel it is subscribed to.
    fn detach(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        for name in std::mem::take(&mut conn.subs) {
            self.leave_channel(&name, id);
        }
    }

    fn leave_channel(&mut self, name: &Arc<str>, id: ConnId) {
        self.counters.subscriptions -= 1;
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        if let Some(i) = ch.subscribers.iter().position(|&c| c == id) {
            ch.subscribers.swap_remove(i);
        }
        ch.recovering.retain(|&c| c != id);
        if let ChannelState::Pending { waiters } = &mut ch.state {
            waiters.retain(|w| w.0 != id);
        }
        // Before any unsubscribe below: the bus expects a shard's members
        // to leave before its interest does.
        if let Some(user) = presence_user(&self.conns, id, name) {
            if let Some(n) = ch.members.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    ch.members.remove(user);
                    self.bus.presence(name, user, false);
                    self.bus_pending = true;
                }
            }
        }
        if ch.is_unused() {
            self.channels.remove(name);
            self.bus.unsubscribe(name);
            self.bus_pending = true;
        }
    }

    fn enqueue(&mut self, id: ConnId, frame: Bytes) {
        if let Some(conn) = self.conns.get_mut(id) {
            conn.out.push(frame);
            self.mark_dirty(id);
        }
    }

    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn is_zstd(&self, id: ConnId) -> bool {
        self.conns.get(id).is_some_and(|c| c.zstd)
    }

    fn reply_error(&mut self, id: ConnId, request: u32, code: ErrorCode, message: &str) {
        let frame = binary_frame(self.is_zstd(id), self.encoder.error(request, code, message));
        self.enqueue(id, frame);
    }

    /// Handles one binary message from a client. An `Err` means the
    /// connection must be closed with that reason.
    pub fn on_client_message(&mut self, id: ConnId, data: &[u8]) -> Result<(), CloseReason> {
        let inflated;
        let data = if self.is_zstd(id) {
            match data.first() {
                Some(&compression::FLAG_PLAIN) => &data[1..],
                _ => {
                    let open = self
                        .decompressor
                        .open(data)
                        .map_err(|e| CloseReason::new(e.close_code(), e.to_string()))?;
                    // Copied out so the requests below do not borrow the
                    // shard's decompressor (compressed input is rare).
                    inflated = open.to_vec();
                    &inflated[..]
                }
            }
        } else {
            data
        };
        let requests = wire::decode_client_frame(data, &self.settings.decode_limits)
            .map_err(|e| CloseReason::new(wire::close::INVALID_ENVELOPE, e.reason()))?;
        let limits = &self.settings.limits;
        let (rate, burst, max_strikes) = (
            limits.messages_per_second,
            limits.message_burst,
            limits.rate_limit_strikes,
        );
        for (request, req) in requests {
            self.counters.messages_in += 1;
            let now = self.now;
            let Some(conn) = self.conns.get_mut(id) else {
                break;
            };
            if !conn.bucket.take(now, rate, burst) {
                conn.strikes += 1;
                if conn.strikes >= max_strikes {
                    self.counters.limit(Limit::Rate);
                    return Err(CloseReason::new(
                        wire::close::RATE_LIMITED,
                        format!("over {rate} messages/s {max_strikes} times in a row"),
                    ));
                }
                let msg = format!("over {rate} messages/s; this request was dropped");
                self.reply_error(id, request, ErrorCode::RateLimited, &msg);
                continue;
            }
            conn.strikes = 0;
            self.on_request(id, request, req)?;
        }
        Ok(())
    }

    fn on_request(
        &mut self,
        id: ConnId,
        request: u32,
        req: ClientRequest<'_>,
    ) -> Result<(), CloseReason> {
        let Some(conn) = self.conns.get_mut(id) else {
            return Ok(());
        };
        let connected = match conn.phase {
            Phase::Open { connected } => connected,
            _ => return Ok(()),
        };
        match req {
            ClientRequest::Connect { token } => {
                let identity = self
                    .settings
                    .auth
                    .connect(token, unix_ms() / 1000)
                    .map_err(|e| {
                        self.counters.auth_failures += 1;
                        tracing::debug!(error = %e, "connect refused");
                        CloseReason::new(wire::close::AUTH_FAILED, format!("connect refused: {e}"))
                    })?;
                if connected {
                    // A second Connect refreshes the token, for the same user.
                    let same_user = match (&conn.identity, &identity) {
                        (Some(old), Some(new)) => old.user == new.user,
                        (None, _) => true,
                        (Some(_), None) => false,
                    };
                    if !same_user {
                        self.reply_error(
                            id,
                            request,
                            ErrorCode::BadRequest,
                            "a token refresh must be for the same user",
                        );
                        return Ok(());
                    }
                }
                conn.identity = identity.map(Box::new);
                conn.phase = Phase::Open { connected: true };
                self.next_client += 1;
                let client_id = (u64::from(self.shard) << 48) | self.next_client;
                let frame = binary_frame(
                    self.is_zstd(id),
                    self.encoder
                        .connected(request, client_id, u32::from(self.shard), unix_ms()),
                );
                self.enqueue(id, frame);
            }
            _ if !connected => {
                self.reply_error(
                    id,
                    request,
                    ErrorCode::Unauthorized,
                    "send Connect before any other request",
                );
            }
            ClientRequest::Ping => {
                let frame = binary_frame(self.is_zstd(id), self.encoder.pong(request));
                self.enqueue(id, frame);
            }
            ClientRequest::Subscribe { channel, recover } => {
                let recover = recover.map(|p| Position {
                    epoch: p.epoch,
                    offset: p.offset,
                });
                self.subscribe(id, request, channel, recover);
            }
            ClientRequest::Unsubscribe { channel } => self.unsubscribe(id, request, channel),
            ClientRequest::Publish {
                channel,
                payload,
                idempotency_key,
            } => self.publish(id, request, channel, payload, idempotency_key),
            ClientRequest::PresenceQuery { channel } => self.presence_query(id, request, channel),
        }
        Ok(())
    }

    /// Asks the bus who is present on a presence channel the connection is
    /// subscribed to.
    fn presence_query(&mut self, id: ConnId, request: u32, name: &str) {
        if let Err(e) = channel::validate(name) {
            return self.reply_error(id, request, ErrorCode::InvalidChannel, &e.to_string());
        }
        if !bus::is_presence(name) {
            let msg = format!(
                "{name} is not a presence channel ({}*)",
                bus::PRESENCE_PREFIX
            );
            return self.reply_error(id, request, ErrorCode::InvalidChannel, &msg);
        }
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        if !self
            .settings
            .auth
            .may_subscribe(conn.identity.as_deref(), name)
        {
            let msg = format!("not allowed on {name}");
            return self.reply_error(id, request, ErrorCode::Unauthorized, &msg);
        }
        if !conn.subs.iter().any(|s| &**s == name) {
            let msg = format!("subscribe to {name} before asking who is present");
            return self.reply_error(id, request, ErrorCode::NotSubscribed, &msg);
        }
        self.next_presence_query += 1;
        let token = self.next_presence_query;
        self.presence_queries.insert(token, (id, request));
        self.bus.presence_members(name, token);
        self.bus_pending = true;
    }

    fn subscribe(&mut self, id: ConnId, request: u32, name: &str, recover: Option<Position>) {
        if let Err(e) = channel::validate(name) {
            return self.reply_error(id, request, ErrorCode::InvalidChannel, &e.to_string());
        }
        let max = self.settings.max_subscriptions;
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if !self
            .settings
            .auth
            .may_subscribe(conn.identity.as_deref(), name)
        {
            let msg = format!("not allowed to subscribe to {name}");
            return self.reply_error(id, request, ErrorCode::Unauthorized, &msg);
        }
        if conn.subs.iter().any(|s| &**s == name) {
            return self.reply_error(id, request, ErrorCode::AlreadySubscribed, name);
        }
        if conn.subs.len() >= max {
            let msg = format!("at most {max} subscriptions per connection");
            return self.reply_error(id, request, ErrorCode::TooManySubscriptions, &msg);
        }
        let key: Arc<str> = match self.channels.get_key_value(name) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        };
        conn.subs.push(key.clone());
        self.counters.subscriptions += 1;
        let ch = self
            .channels
            .entry(key.clone())
            .or_insert_with(|| LocalChannel {
                state: ChannelState::Pending {
                    waiters: Vec::new(),
                },
                subscribers: Vec::new(),
                recovering: Vec::new(),
                members: HashMap::new(),
            });
        match &mut ch.state {
            ChannelState::Pending { waiters } => {
                waiters.push((id, request, recover));
                if waiters.len() == 1 && ch.subscribers.is_empty() && ch.recovering.is_empty() {
                    self.bus.subscribe(&key);
                    self.bus_pending = true;
                }
            }
            ChannelState::Active { last } => {
                let last = *last;
                self.start_subscription(id, request, &key, last, recover);
            }
        }
        // After the bus subscribe above: a shard's members join after its
        // interest.
        if let Some(user) = presence_user(&self.conns, id, &key) {
            if let Some(ch) = self.channels.get_mut(&key) {
                match ch.members.get_mut(user) {
                    Some(n) => *n += 1,
                    None => {
                        ch.members.insert(Arc::from(user), 1);
                        self.bus.presence(&key, user, true);
                        self.bus_pending = true;
                    }
                }
            }
        }
    }

    /// The channel is live on this shard at `live`: the connection either
    /// joins at once or first catches up from history.
    fn start_subscription(
        &mut self,
        id: ConnId,
        request: u32,
        name: &Arc<str>,
        live: Position,
        recover: Option<Position>,
    ) {
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        match recover {
            Some(from) if from.epoch == live.epoch && from.offset < live.offset => {
                ch.recovering.push(id);
                self.next_recovery += 1;
                let token = self.next_recovery;
                self.recoveries.insert(
                    token,
                    Recovery {
                        conn: id,
                        request,
                        channel: name.clone(),
                        at: from,
                        announced: false,
                    },
                );
                self.bus.history(name, from, token);
                self.bus_pending = true;
            }
            _ => {
                ch.subscribers.push(id);
                // Recovered only if the client already has everything; a
                // different epoch or a position from the future cannot be
                // continued.
                let recovered = recover == Some(live);
                self.reply_subscribed(id, request, name, live, recovered);
            }
        }
    }

    fn reply_subscribed(
        &mut self,
        id: ConnId,
        request: u32,
        name: &str,
        at: Position,
        recovered: bool,
    ) {
        let pos = wire::Position {
            epoch: at.epoch,
            offset: at.offset,
        };
        let frame = binary_frame(
            self.is_zstd(id),
            self.encoder.subscribed(request, name, pos, recovered),
        );
        self.enqueue(id, frame);
    }

    /// A history read for a recovering connection came back.
    fn on_history(&mut self, token: u64, result: History) {
        let Some(mut rec) = self.recoveries.remove(&token) else {
            return;
        };
        let id = rec.conn;
        let name = rec.channel.clone();
        let Some(ch) = self.channels.get_mut(&name) else {
            return;
        };
        if !ch.recovering.contains(&id) {
            return; // unsubscribed or gone meanwhile
        }
        let ChannelState::Active { last: live } = ch.state else {
            return;
        };
        let items = match result {
            History::Items { epoch, items } if epoch == live.epoch => items,
            History::Items { .. } | History::Lost { .. } if !rec.announced => {
                // Cannot continue the client's position: say so, go live.
                ch.recovering.retain(|&c| c != id);
                ch.subscribers.push(id);
                return self.reply_subscribed(id, rec.request, &name, live, false);
            }
            History::Unavailable(msg) if !rec.announced => {
                self.reply_error(id, rec.request, ErrorCode::Unavailable, &msg);
                return self.drop_subscription(id, &name);
            }
            History::Items { .. } | History::Lost { .. } | History::Unavailable(_) => {
                // History vanished halfway through a recovery we already
                // announced: never leave a silent gap — end the
                // subscription and let the client resubscribe.
                let frame = binary_frame(self.is_zstd(id), self.encoder.unsubscribed(0, &name));
                self.enqueue(id, frame);
                self.reply_error(
                    id,
                    rec.request,
                    ErrorCode::Unavailable,
                    "history was lost during recovery; subscribe again",
                );
                return self.drop_subscription(id, &name);
            }
        };
        if !rec.announced {
            rec.announced = true;
            self.reply_subscribed(id, rec.request, &name, rec.at, true);
        }
        // Send what the client lacks, up to what this shard delivers live;
        // anything newer reaches it live once it joins.
        let zstd = self.is_zstd(id);
        let wanted: Vec<&Publication> = items
            .iter()
            .filter(|p| p.offset > rec.at.offset && p.offset <= live.offset)
            .collect();
        for chunk in wanted.chunks(self.settings.max_batch) {
            let data = self.encoder.publications(
                &name,
                live.epoch,
                chunk
                    .iter()
                    .map(|p| (p.offset, p.published_us / 1000, &p.payload[..])),
            );
            let frame = binary_frame(zstd, data);
            self.enqueue(id, frame);
            self.counters.messages_out += chunk.len() as u64;
        }
        if let Some(p) = wanted.last() {
            rec.at.offset = p.offset;
        }
        let Some(ch) = self.channels.get_mut(&name) else {
            return;
        };
        if rec.at.offset >= live.offset {
            ch.recovering.retain(|&c| c != id);
            ch.subscribers.push(id);
        } else {
            // Live moved on while history was read: read the rest.
            self.next_recovery += 1;
            let token = self.next_recovery;
            self.bus.history(&name, rec.at, token);
            self.bus_pending = true;
            self.recoveries.insert(token, rec);
        }
    }

    /// Ends one subscription of a connection (server side).
    fn drop_subscription(&mut self, id: ConnId, name: &Arc<str>) {
        if let Some(conn) = self.conns.get_mut(id) {
            if let Some(i) = conn.subs.iter().position(|s| s == name) {
                conn.subs.swap_remove(i);
                self.leave_channel(name, id);
            }
        }
    }

    fn unsubscribe(&mut self, id: ConnId, request: u32, name: &str) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let Some(i) = conn.subs.iter().position(|s| &**s == name) else {
            return self.reply_error(id, request, ErrorCode::NotSubscribed, name);
        };
        let key = conn.subs.swap_remove(i);
        self.leave_channel(&key, id);
        let frame = binary_frame(self.is_zstd(id), self.encoder.unsubscribed(request, name));
        self.enqueue(id, frame);
    }

    fn publish(
        &mut self,
        id: ConnId,
        request: u32,
        name: &str,
        payload: &[u8],
        idempotency_key: Option<&str>,
    ) {
        if let Err(e) = channel::validate(name) {
            return self.reply_error(id, request, ErrorCode::InvalidChannel, &e.to_string());
        }
        let allowed = self
            .conns
            .get(id)
            .is_some_and(|c| self.settings.auth.may_publish(c.identity.as_deref(), name));
        if !allowed {
            let msg = format!("not allowed to publish to {name}");
            return self.reply_error(id, request, ErrorCode::Unauthorized, &msg);
        }
        let max = self.settings.max_publish_bytes;
        if payload.len() > max {
            let msg = format!("payload is {} bytes; the limit is {max}", payload.len());
            return self.reply_error(id, request, ErrorCode::PayloadTooLarge, &msg);
        }
        let reply_to = ReplyTo {
            conn: id.as_u64(),
            request,
        };
        self.bus.publish(
            name,
            Bytes::copy_from_slice(payload),
            idempotency_key,
            reply_to,
            unix_us(),
        );
        self.bus_pending = true;
    }

    /// Wakes the dispatcher if this turn left anything to send.
    pub fn wake_if_needed(&mut self) {
        if self.bus_pending || !self.dirty.is_empty() {
            if let Some(w) = self.dispatcher.take() {
                w.wake();
            }
        }
    }

    /// Polls the bus for events; registers the dispatcher's waker for both
    /// the bus and local work. Ready when there is something to do.
    pub fn poll_work(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let mut events = std::mem::take(&mut self.events);
        let bus_ready = self.bus.poll_events(cx, &mut events).is_ready();
        self.events = events;
        if bus_ready || !self.events.is_empty() || self.bus_pending || !self.dirty.is_empty() {
            std::task::Poll::Ready(())
        } else {
            self.dispatcher = Some(cx.waker().clone());
            std::task::Poll::Pending
        }
    }

    /// Whether the last tick batched publications (see `batching`).
    pub fn batching(&self) -> bool {
        self.batching
    }

    /// One tick: apply bus events, send queued bus requests, flush every
    /// connection that has output. Returns the writers to start.
    pub fn tick(&mut self) -> Vec<(ConnId, Rc<TcpStream>)> {
        self.touch();
        self.batching = false;
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            self.on_bus_event(ev);
        }
        self.events = events;
        self.close_pending();
        // Always flush: besides our own requests, handling events as a
        // channel owner queues deliveries and acknowledgements for others.
        self.bus_pending = false;
        self.bus.flush();
        self.flush_dirty();
        if !self.delivered.is_empty() {
            let now = unix_us();
            for (published, ingress, n) in self.delivered.drain(..) {
                self.latencies.record(
                    now.saturating_sub(published),
                    now.saturating_sub(ingress),
                    n,
                );
            }
        }
        std::mem::take(&mut self.need_writer)
    }

    fn close_pending(&mut self) {
        let closes = std::mem::take(&mut self.to_close);
        for (id, why) in &closes {
            self.close(*id, why);
        }
        self.to_close = closes;
        self.to_close.clear();
    }

    fn on_bus_event(&mut self, ev: BusEvent) {
        match ev {
            BusEvent::Publications {
                channel,
                epoch,
                items,
            } => self.deliver(&channel, epoch, &items),
            BusEvent::Subscribed { channel, position } => {
                let Some(ch) = self.channels.get_mut(&channel) else {
                    return;
                };
                let waiters = match &mut ch.state {
                    ChannelState::Pending { waiters } => std::mem::take(waiters),
                    ChannelState::Active { last } => {
                        // The bus found the channel's history lost (a new
                        // epoch before any publication in it): resubscribes
                        // from the old epoch are no longer recoverable.
                        if position.epoch != last.epoch {
                            *last = position;
                        }
                        return;
                    }
                };
                ch.state = ChannelState::Active { last: position };
                for (id, request, recover) in waiters {
                    self.start_subscription(id, request, &channel, position, recover);
                }
            }
            BusEvent::History {
                request, result, ..
            } => self.on_history(request, result),
            BusEvent::Presence {
                channel,
                user,
                joined,
            } => self.deliver_presence(&channel, &user, joined),
            BusEvent::Members {
                request,
                channel,
                result,
            } => {
                let Some((id, request)) = self.presence_queries.remove(&request) else {
                    return;
                };
                match result {
                    Ok(users) => {
                        let zstd = self.is_zstd(id);
                        let data = self.encoder.presence_members(
                            request,
                            &channel,
                            users.iter().map(|u| &**u),
                        );
                        let frame = binary_frame(zstd, data);
                        self.enqueue(id, frame);
                    }
                    Err(e) => self.reply_error(id, request, ErrorCode::Unavailable, &e.to_string()),
                }
            }
            BusEvent::Published {
                reply_to,
                channel,
                result,
            } => {
                let id = ConnId::from_u64(reply_to.conn);
                match result {
                    Ok(p) => {
                        let pos = wire::Position {
                            epoch: p.epoch,
                            offset: p.offset,
                        };
                        let zstd = self.is_zstd(id);
                        let data = self.encoder.publish_ack(reply_to.request, &channel, pos);
                        let frame = binary_frame(zstd, data);
                        self.enqueue(id, frame);
                    }
                    Err(e) => self.reply_error(
                        id,
                        reply_to.request,
                        ErrorCode::Unavailable,
                        &e.to_string(),
                    ),
                }
            }
        }
    }

    /// Encodes the channel's new publications once per batch and queues the
    /// same frame for every subscriber.
    fn deliver(&mut self, name: &Arc<str>, epoch: u64, items: &[Publication]) {
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        let ChannelState::Active { last } = &mut ch.state else {
            // Sequenced before our interest took effect: the Subscribed
            // answer that follows covers it.
            return;
        };
        let fresh = if epoch == last.epoch {
            let start = items.partition_point(|p| p.offset <= last.offset);
            &items[start..]
        } else {
            items
        };
        let Some(newest) = fresh.last() else {
            return;
        };
        self.batching |= fresh.len() > 1;
        *last = Position {
            epoch,
            offset: newest.offset,
        };
        for chunk in fresh.chunks(self.settings.max_batch) {
            let data = self.encoder.publications(
                name,
                epoch,
                chunk
                    .iter()
                    .map(|p| (p.offset, p.published_us / 1000, &p.payload[..])),
            );
            Fanout {
                conns: &mut self.conns,
                compressor: &mut self.compressor,
                dirty: &mut self.dirty,
                to_close: &mut self.to_close,
                budget: self.settings.outbound_budget,
            }
            .send(&ch.subscribers, data);
            let recipients = ch.subscribers.len() as u64;
            self.counters.messages_out += recipients * chunk.len() as u64;
            for p in chunk {
                self.delivered
                    .push((p.published_us, p.ingress_us, recipients));
            }
        }
    }

    /// Encodes a presence change once and queues it for every live
    /// subscriber of the channel. Connections still catching up from
    /// history do not get it: presence is not part of history, and a client
    /// learns the current members with `PresenceQuery`.
    fn deliver_presence(&mut self, name: &Arc<str>, user: &str, joined: bool) {
        let Some(ch) = self.channels.get(name) else {
            return;
        };
        if !matches!(ch.state, ChannelState::Active { .. }) {
            // From an earlier interest of this shard: the Subscribed answer
            // still to come starts the new one.
            return;
        }
        let data = self.encoder.presence_event(name, user, joined);
        Fanout {
            conns: &mut self.conns,
            compressor: &mut self.compressor,
            dirty: &mut self.dirty,
            to_close: &mut self.to_close,
            budget: self.settings.outbound_budget,
        }
        .send(&ch.subscribers, data);
        self.counters.messages_out += ch.subscribers.len() as u64;
    }

    fn flush_dirty(&mut self) {
        // Flushing can mark more connections dirty (a failed write closes
        // its connection), so keep going until nothing is left.
        let mut batch = std::mem::take(&mut self.dirty);
        loop {
            for id in batch.drain(..) {
                self.flush_conn(id);
            }
            if self.dirty.is_empty() {
                break;
            }
            std::mem::swap(&mut batch, &mut self.dirty);
        }
        self.dirty = batch;
    }

    /// Writes what the connection has queued; called by the tick and by the
    /// connection's writer task once the socket is writable again.
    pub fn flush_conn(&mut self, id: ConnId) -> Option<Flushed> {
        // Bus requests go out before the replies they caused: once a client
        // has seen a reply, whatever it does next (on any shard) reaches the
        // bus after the request behind that reply (see `bus::local`).
        if self.bus_pending {
            self.bus_pending = false;
            self.bus.flush();
        }
        let now = self.now;
        let conn = self.conns.get_mut(id)?;
        conn.dirty = false;
        let before = conn.out.queued_bytes();
        let result = conn.out.flush(conn.fd, now);
        self.counters.bytes_out += (before - conn.out.queued_bytes()) as u64;
        match result {
            Ok(Flushed::All) => {
                if conn.shutdown_after_flush {
                    conn.shutdown_after_flush = false;
                    shutdown(conn.fd, libc::SHUT_WR);
                }
                Some(Flushed::All)
            }
            Ok(Flushed::Blocked) => {
                if !conn.writer_active {
                    conn.writer_active = true;
                    self.need_writer.push((id, conn.stream.clone()));
                    self.watched.push(id);
                }
                Some(Flushed::Blocked)
            }
            Err(_) => {
                // The peer is gone: nothing queued can be delivered.
                // Shutting down wakes the reader, which removes the
                // connection.
                conn.out = Outbound::default();
                conn.shutdown_after_flush = false;
                shutdown(conn.fd, libc::SHUT_RDWR);
                if !matches!(conn.phase, Phase::Closing { .. }) {
                    self.begin_close(id);
                }
                None
            }
        }
    }

    /// Called by a writer task when its socket became writable. Returns
    /// whether the writer should keep waiting.
    pub fn writable(&mut self, id: ConnId) -> bool {
        self.touch();
        let keep_waiting = match self.flush_conn(id) {
            Some(Flushed::Blocked) => true,
            _ => {
                if let Some(conn) = self.conns.get_mut(id) {
                    conn.writer_active = false;
                }
                false
            }
        };
        self.wake_if_needed();
        keep_waiting
    }

    /// Enforces the time budgets: slow consumers whose oldest queued byte is
    /// too old, and closing connections past their linger deadline.
    pub fn sweep(&mut self) -> Vec<(ConnId, Rc<TcpStream>)> {
        self.touch();
        let now = self.now;
        self.expire_deadlines(now);
        self.drain_step();
        if now.duration_since(self.last_scan) >= SCAN_INTERVAL {
            self.last_scan = now;
            self.scan(now);
        }
        let max_age = self.settings.outbound_max_age;
        let mut watched = std::mem::take(&mut self.watched);
        watched.retain(|&id| {
            let Some(conn) = self.conns.get(id) else {
                return false;
            };
            match conn.phase {
                Phase::Closing { deadline } => {
                    if now >= deadline {
                        shutdown(conn.fd, libc::SHUT_RDWR);
                        return false;
                    }
                    true
                }
                _ if conn.writer_active => {
                    if conn
                        .out
                        .blocked_since()
                        .is_some_and(|t| now.duration_since(t) > max_age)
                    {
                        self.to_close
                            .push((id, slow_consumer("oldest queued message too old")));
                    }
                    true
                }
                _ => false,
            }
        });
        watched.append(&mut self.watched);
        self.watched = watched;
        self.close_pending();
        self.flush_dirty();
        self.wake_if_needed();
        std::mem::take(&mut self.need_writer)
    }
}

impl State {
    /// Handshakes and Connects that did not arrive in time.
    fn expire_deadlines(&mut self, now: Instant) {
        if self.deadlines.is_empty() && self.deadlines.capacity() > 64 {
            // A connection storm grew it; give the memory back once drained.
            self.deadlines = VecDeque::new();
        }
        while let Some(&(at, id, kind)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(conn) = self.conns.get(id) else {
                continue;
            };
            match (kind, &conn.phase) {
                (Deadline::Handshake, Phase::Handshake) => {
                    // A slowloris: no response is owed, just the socket.
                    tracing::debug!("handshake timed out");
                    self.counters.limit(Limit::Handshake);
                    shutdown(conn.fd, libc::SHUT_RDWR);
                }
                (Deadline::Connect, Phase::Open { connected: false }) => {
                    self.counters.limit(Limit::AuthDeadline);
                    let ms = self.settings.auth_deadline_ms;
                    self.to_close.push((
                        id,
                        CloseReason::new(
                            wire::close::AUTH_DEADLINE,
                            format!("no Connect within {ms} ms"),
                        ),
                    ));
                }
                _ => {}
            }
        }
    }

    /// Keepalive pings, idle timeouts and token expiry: one pass over every
    /// connection per `SCAN_INTERVAL` (cheap next to the per-message work,
    /// and no per-connection timers to keep).
    fn scan(&mut self, now: Instant) {
        let ping_after = Duration::from_millis(u64::from(self.settings.limits.ping_interval_ms));
        let idle_after = Duration::from_millis(u64::from(self.settings.limits.idle_timeout_ms));
        let now_secs = unix_ms() / 1000;
        let mut pings = Vec::new();
        for (id, conn) in self.conns.iter_mut() {
            if !matches!(conn.phase, Phase::Open { .. }) {
                continue;
            }
            // A connection that received nothing for a whole scan interval
            // gives its queue's buffer back: idle connections should cost
            // almost nothing, busy ones keep theirs (no allocation per
            // delivery).
            conn.out.release_if_idle();
            let silent = now.duration_since(conn.last_seen);
            if silent >= idle_after {
                self.counters.limit(Limit::Idle);
                let ms = idle_after.as_millis();
                self.to_close.push((
                    id,
                    CloseReason::new(
                        wire::close::IDLE_TIMEOUT,
                        format!("nothing received for {ms} ms"),
                    ),
                ));
            } else if silent >= ping_after && !conn.pinged {
                conn.pinged = true;
                pings.push(id);
            }
            if conn
                .identity
                .as_ref()
                .and_then(|i| i.expires)
                .is_some_and(|exp| now_secs > exp + u64::from(self.settings.leeway_secs))
            {
                self.counters.limit(Limit::TokenExpired);
                self.to_close.push((
                    id,
                    CloseReason::new(
                        wire::close::TOKEN_EXPIRED,
                        "token expired; reconnect, or send Connect with a fresh token before expiry",
                    ),
                ));
            }
        }
        let ping = ws::frame(OpCode::Ping, b"");
        for id in pings {
            self.enqueue(id, ping.clone());
        }
    }
}

/// How often the keepalive / idle / expiry scan runs.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// What a broadcast touches, borrowed field by field from [`State`] so
/// that the encoded bytes (borrowed from the encoder) and the recipients
/// (borrowed from a channel) can be used at the same time.
struct Fanout<'a> {
    conns: &'a mut Slab<Conn>,
    compressor: &'a mut Compressor,
    dirty: &'a mut Vec<ConnId>,
    to_close: &'a mut Vec<(ConnId, CloseReason)>,
    budget: usize,
}

impl Fanout<'_> {
    /// Queues the encoded `Frame` `data` for every connection in `to`. One
    /// WebSocket frame per form, each built at most once and shared by
    /// refcount: plain (shardcast.v1), and for zstd connections either
    /// compressed or flagged-uncompressed. A connection over its outbound
    /// budget is closed as a slow consumer instead.
    fn send(&mut self, to: &[ConnId], data: &[u8]) {
        let mut plain: Option<Bytes> = None;
        let mut zstd: Option<Bytes> = None;
        for &id in to {
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            let frame = if conn.zstd {
                zstd.get_or_insert_with(|| match self.compressor.compress(data) {
                    Some(z) => ws::frame(OpCode::Binary, &z),
                    None => binary_frame(true, data),
                })
            } else {
                plain.get_or_insert_with(|| ws::frame(OpCode::Binary, data))
            };
            // The budget bounds the backlog: a single frame larger than the
            // budget still goes to a connection that keeps up.
            let queued = conn.out.queued_bytes();
            if queued > 0 && queued + frame.len() > self.budget {
                self.to_close
                    .push((id, slow_consumer("outbound budget exceeded")));
                continue;
            }
            conn.out.push(frame.clone());
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
        }
    }
}

/// The user whose membership a subscription of connection `id` to
/// `channel` counts for: authenticated connections on presence channels
/// only (anonymous ones cannot subscribe to those anyway).
fn presence_user<'a>(conns: &'a Slab<Conn>, id: ConnId, channel: &str) -> Option<&'a str> {
    if !bus::is_presence(channel) {
        return None;
    }
    let user = conns.get(id)?.identity.as_deref()?.user.as_str();
    (!user.is_empty()).then_some(user)
}

/// A binary frame carrying `data`; on zstd connections with the "plain"
/// flag byte in front. One allocation either way.
fn binary_frame(zstd: bool, data: &[u8]) -> Bytes {
    if !zstd {
        return ws::frame(OpCode::Binary, data);
    }
    let len = data.len() + 1;
    let mut out = Vec::with_capacity(ws::header_len(len) + len);
    ws::write_header(&mut out, OpCode::Binary, true, len);
    out.push(compression::FLAG_PLAIN);
    out.extend_from_slice(data);
    Bytes::from(out)
}

fn slow_consumer(why: &str) -> CloseReason {
    CloseReason::new(
        wire::close::SLOW_CONSUMER,
        format!("slow consumer: {why}; reconnect and recover from your last position"),
    )
}

fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: `fd` belongs to a live TcpStream held by the connection; an
    // error (already shut down, peer gone) needs no handling.
    unsafe {
        libc::shutdown(fd, how);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
