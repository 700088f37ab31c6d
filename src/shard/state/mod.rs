//! Everything one shard owns: its connections, its subscription table, its
//! bus handle and its encoder. Only the shard's own thread touches it, so
//! there are no locks; tasks borrow it briefly and never across an await.
//!
//! The state does no I/O and reads no clock (quinn-proto is the model):
//! every call runs at the [`Time`] the driver last gave [`State::touch`],
//! and what the state wants done it leaves for the driver to take —
//! connections with bytes to write ([`State::take_dirty`], then
//! [`State::gather`] / [`State::wrote`] per connection), sockets to shut
//! ([`State::poll_shutdown`]), connections whose full socket needs a
//! writer ([`State::poll_writer`]). The driver in `shard/` owns the
//! sockets and performs those; tests drive the same calls on simulated
//! time with fake sockets.
//!
//! This file holds the [`State`] struct and the tick that drives it: poll
//! the bus, apply its events, flush the bus. The rest of `State`'s methods
//! live beside the job they do:
//! - `connections`: the connection table, admission at accept, upgrade
//!   and close;
//! - `requests`: decoding, rate limiting and answering client requests;
//! - `subscriptions`: the channel table, subscribe and unsubscribe;
//! - `recovery`: catching a subscriber up from history;
//! - `presence`: per-user membership counts, queries and events;
//! - `fanout`: encoding a channel's publications once for every subscriber;
//! - `output`: queueing frames and lending them to the driver's writes;
//! - `sweep`: time budgets (deadlines, keepalive, idle, token expiry);
//! - `drain`: closing connections gradually on shutdown.

#![forbid(unsafe_code)]

mod api;
mod connections;
mod drain;
mod fanout;
mod form;
mod output;
mod presence;
mod pusher;
mod recovery;
mod requests;
#[cfg(test)]
mod sim;
mod subscriptions;
mod sweep;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::net::Shutdown;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use super::slab::{ConnId, Slab};
use super::timers::Deadlines;
use super::Settings;
use crate::bus::{Bus, BusEvent};
use crate::metrics::{Counters, Latencies, Registry};
use crate::protocol::compression::{Compressor, Decompressor};
use crate::protocol::wire::Encoder;

use connections::{Conn, Deadline};
use drain::Drain;
pub use form::{CloseCause, Form};
pub use output::Flushed;
pub use pusher::PUSHER_PATH;
use recovery::{Ahead, Recovery};
use subscriptions::LocalChannel;

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
    need_writer: Vec<ConnId>,
    /// Sockets to shut down, in order.
    shutdowns: VecDeque<(ConnId, Shutdown)>,
    /// Requests were queued on the bus and need a flush.
    bus_pending: bool,
    dispatcher: Option<Waker>,
    next_client: u64,
    /// The time of the current call (see [`State::touch`]).
    now: Instant,
    unix_us: u64,
    events: Vec<BusEvent>,
    to_close: Vec<(ConnId, CloseCause)>,
    /// Handshake and Connect deadlines (of different lengths).
    deadlines: Deadlines<(ConnId, Deadline)>,
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
    /// Recoveries paused until their connection's queue drains (tokens
    /// into `recoveries`).
    paced: HashMap<ConnId, Vec<u64>>,
    /// Connections whose position is ahead of this shard, waiting for it.
    ahead: Vec<Ahead>,
    next_recovery: u64,
    /// Presence queries waiting for the bus: token → (connection, request).
    presence_queries: HashMap<u64, (ConnId, u32)>,
    /// HTTP API requests waiting for the bus, by connection.
    api_waits: HashMap<ConnId, api::ApiWait>,
    /// Which connection each bus query of the HTTP API is for.
    api_tokens: HashMap<u64, ConnId>,
    /// Channels whose subscription count changed since the last flush.
    counts_dirty: Vec<Arc<str>>,
    /// Pusher connections' members on presence channels.
    pusher_members: presence::PusherMembers,
    /// Pusher cache channels: history reads of the last event for a new
    /// subscriber, by token (shared with `recoveries`' counter).
    cache_reads: HashMap<u64, (ConnId, Arc<str>, crate::bus::Position)>,
    /// Client-event rate of the Pusher connections that sent any (kept
    /// here, not in every connection's record).
    client_event_buckets: HashMap<ConnId, crate::shard::rate::TokenBucket>,
    /// The `[[pusher.apps]]` app (index in `Settings::pusher_apps`) of each
    /// Pusher connection of one; the default app's connections are not
    /// here (so they cost nothing more).
    pusher_conn_apps: HashMap<ConnId, u32>,
    next_presence_query: u64,
    compressor: Compressor,
    decompressor: Decompressor,
}

impl State {
    pub fn new(
        shard: u16,
        settings: Rc<Settings>,
        bus: Box<dyn Bus>,
        registry: Arc<Registry>,
        time: Time,
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
            shutdowns: VecDeque::new(),
            bus_pending: false,
            dispatcher: None,
            next_client: 0,
            now: time.mono,
            unix_us: time.unix_us,
            events: Vec::new(),
            to_close: Vec::new(),
            deadlines: Deadlines::default(),
            last_scan: time.mono,
            counters: Counters::default(),
            latencies: Latencies::default(),
            delivered: Vec::new(),
            batching: false,
            registry,
            drain: None,
            recoveries: HashMap::new(),
            paced: HashMap::new(),
            ahead: Vec::new(),
            next_recovery: 0,
            presence_queries: HashMap::new(),
            api_waits: HashMap::new(),
            api_tokens: HashMap::new(),
            pusher_members: HashMap::new(),
            counts_dirty: Vec::new(),
            cache_reads: HashMap::new(),
            client_event_buckets: HashMap::new(),
            pusher_conn_apps: HashMap::new(),
            next_presence_query: 0,
            compressor,
            decompressor,
        })
    }

    /// Publishes this shard's counters and latencies to the registry.
    pub fn report(&mut self) {
        self.counters.connections = self.conns.len() as u64;
        self.counters.channels = self.channels.len() as u64;
        self.registry
            .publish(usize::from(self.shard), &self.counters, &mut self.latencies);
    }

    /// Sets the time the following calls run at. The driver calls it at
    /// the start of every turn; time never goes back.
    pub fn touch(&mut self, time: Time) {
        self.now = self.now.max(time.mono);
        self.unix_us = time.unix_us;
    }

    /// Milliseconds since the Unix epoch, at the current call's time.
    fn unix_ms(&self) -> u64 {
        self.unix_us / 1000
    }

    /// Whether this turn left anything for the dispatcher: bus requests to
    /// send, connections to write or close, sockets to shut, writers to
    /// start.
    fn has_work(&self) -> bool {
        self.bus_pending
            || !self.dirty.is_empty()
            || !self.to_close.is_empty()
            || !self.shutdowns.is_empty()
            || !self.need_writer.is_empty()
    }

    /// Wakes the dispatcher if this turn left anything to do.
    pub fn wake_if_needed(&mut self) {
        if self.has_work() {
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
        if bus_ready || !self.events.is_empty() || self.has_work() {
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

    /// One tick: apply bus events and send queued bus requests. The
    /// connections with output are then the driver's to write
    /// ([`State::take_dirty`]), after which it calls
    /// [`State::transmitted`].
    pub fn tick(&mut self) {
        self.batching = false;
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            self.on_bus_event(ev);
        }
        self.events = events;
        self.close_pending();
        // Always flush: besides our own requests, handling events as a
        // channel owner queues deliveries and acknowledgements for others.
        self.flush_bus();
    }

    /// Reports the subscription counts that changed (once per channel per
    /// flush), then sends the bus everything queued.
    pub(super) fn flush_bus(&mut self) {
        for name in self.counts_dirty.drain(..) {
            // A channel gone meanwhile reported its 0 when it went.
            if let Some(ch) = self.channels.get_mut(&name) {
                ch.count_dirty = false;
                self.bus.subscription_count(&name, ch.subscribed);
            }
        }
        self.bus_pending = false;
        self.bus.flush();
    }

    /// The driver wrote this tick's output: the tick's deliveries count as
    /// written at the current time (publish→write latency).
    pub fn transmitted(&mut self) {
        let now = self.unix_us;
        for (published, ingress, n) in self.delivered.drain(..) {
            self.latencies.record(
                now.saturating_sub(published),
                now.saturating_sub(ingress),
                n,
            );
        }
    }

    pub(super) fn close_pending(&mut self) {
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
            BusEvent::Subscribed { channel, position } => self.on_subscribed(channel, position),
            BusEvent::History {
                request, result, ..
            } => self.on_history(request, result),
            BusEvent::Presence {
                channel,
                user,
                joined,
            } => self.deliver_presence(&channel, &user, joined),
            BusEvent::Channels { request, result } => {
                self.on_api_channels(request, result);
            }
            BusEvent::Members {
                request,
                channel,
                result,
            } => self.on_members(request, channel, result),
            BusEvent::Published {
                reply_to,
                channel,
                result,
            } => self.on_published(reply_to, channel, result),
        }
    }
}

/// A moment as the driver read it from the OS: monotonic for deadlines
/// and budgets, Unix time (µs) for tokens and timestamps on the wire.
#[derive(Clone, Copy, Debug)]
pub struct Time {
    pub mono: Instant,
    pub unix_us: u64,
}
