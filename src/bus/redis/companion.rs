//! A shard's companion thread: a tokio current-thread runtime owning the
//! shard's fred clients.
//!
//! Tasks inside the runtime:
//! - the *main loop* owns the subscription state: it takes the shard's
//!   request batches, Pub/Sub messages and results of the other tasks, and
//!   sends the shard one batch of events per turn;
//! - the *publisher* sends queued publishes as one pipeline of script calls
//!   at a time (group commit: while one pipeline is in flight the next one
//!   fills), which also keeps a shard's publishes in order;
//! - the *subscription controller* sends `SUBSCRIBE`/`UNSUBSCRIBE` in
//!   request order, confirms each with a `PING` on the same connection and
//!   then reads the channel's position;
//! - history reads and catch-up reads run as short tasks of their own;
//! - on the ingest shard, the ingest consumer (see `ingest.rs`).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, Message, Value};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::codec::{self, bytes_of, epoch_hex, parse_entry, parse_epoch, u64_of};
use super::keys::{self, IdemKey};
use super::scripts::{is_noscript, scripts, Script};
use super::{RedisOptions, RedisStats, Request};
use crate::bus::{unix_us, BusError, BusEvent, History, Position, Publication, ReplyTo};

/// How long the first connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before retrying a failed subscription or catch-up read.
const RETRY_DELAY: Duration = Duration::from_millis(250);
/// Most publishes in one pipeline.
const MAX_PIPELINE: usize = 256;
/// Entries per `XRANGE` page.
const PAGE: u64 = 1000;
/// Most publications in one history answer (the shard asks again for the
/// rest).
const MAX_HISTORY_ITEMS: usize = 10_000;
/// Most live announcements buffered per channel while it catches up;
/// beyond that they are dropped and read from the stream instead.
const MAX_BUFFER: usize = 10_000;
/// Retired epochs remembered per channel (to drop late announcements).
const DEAD_EPOCHS: usize = 8;
/// Allowance for the error of the clock offset measurement.
const DEADLINE_SLACK: Duration = Duration::from_millis(250);
/// Extra life of a generated idempotency key beyond the command timeout
/// (covers clock skew between this host and Redis).
const GENERATED_KEY_SLACK: Duration = Duration::from_secs(5);

pub struct Setup {
    pub shard: usize,
    pub config: Config,
    pub options: RedisOptions,
    pub stats: Arc<RedisStats>,
    pub ingest: bool,
}

/// Everything the companion's tasks share (read-only).
pub struct Shared {
    pub shard: usize,
    pub options: RedisOptions,
    pub stats: Arc<RedisStats>,
    random: RandomState,
    counter: AtomicU64,
    /// Redis' clock minus ours (µs), measured at each (re)connect; publish
    /// deadlines are expressed in Redis' time.
    clock_offset_us: AtomicI64,
    /// This companion's name in presence entries (unique per start).
    pub instance: String,
}

impl Shared {
    /// A random value (different on every call).
    pub fn random(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.random.hash_one((n, unix_us()))
    }

    /// A new epoch: random, 63 bits, nonzero.
    pub fn fresh_epoch(&self) -> String {
        epoch_hex((self.random() >> 1).max(1))
    }

    /// A publish deadline `timeout` from now, in Redis' clock.
    fn deadline_us(&self) -> u64 {
        let offset = self.clock_offset_us.load(Ordering::Relaxed);
        let local = unix_us() + (self.options.command_timeout + DEADLINE_SLACK).as_micros() as u64;
        local.saturating_add_signed(offset)
    }

    fn ttl_ms(&self) -> u64 {
        self.options.history_ttl.as_millis().max(1) as u64
    }

    fn max_payload(&self) -> usize {
        self.options.max_payload_bytes
    }
}

fn builder(config: &Config, timeout: Duration) -> Builder {
    let mut b = Builder::from_config(config.clone());
    b.with_connection_config(|c| {
        c.connection_timeout = CONNECT_TIMEOUT;
        c.internal_command_timeout = CONNECT_TIMEOUT;
        c.tcp = TcpConfig {
            nodelay: Some(true),
            ..Default::default()
        };
    })
    .with_performance_config(|p| {
        p.default_command_timeout = timeout;
        // Pub/Sub messages wait here between companion turns; a lagging
        // receiver loses messages (and then catches up from the streams).
        p.broadcast_channel_capacity = 8192;
    })
    .set_policy(ReconnectPolicy::new_exponential(0, 50, 2000, 2));
    b
}

async fn connect(b: &Builder) -> Result<Client, String> {
    let client = b.build().map_err(|e| e.to_string())?;
    match tokio::time::timeout(CONNECT_TIMEOUT, client.init()).await {
        Ok(Ok(_task)) => Ok(client),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Measures Redis' clock against ours.
async fn measure_clock(shared: &Shared, cmd: &Client) {
    let before = unix_us();
    let reply = cmd
        .custom::<Value, Value>(
            CustomCommand::new_static("TIME", ClusterHash::Random, false),
            vec![],
        )
        .await;
    let after = unix_us();
    let Ok(Value::Array(parts)) = reply else {
        return;
    };
    let (Some(secs), Some(micros)) = (
        parts.first().and_then(u64_of),
        parts.get(1).and_then(u64_of),
    ) else {
        return;
    };
    let redis = secs.saturating_mul(1_000_000).saturating_add(micros);
    let local = before / 2 + after / 2;
    let offset = redis as i64 - local as i64;
    shared.clock_offset_us.store(offset, Ordering::Relaxed);
    if offset.unsigned_abs() > 1_000_000 {
        tracing::warn!(
            offset_us = offset,
            "redis clock differs from ours by over a second"
        );
    }
}

/// Loads the scripts, so `EVALSHA` rarely misses.
async fn preload(cmd: &Client) {
    let s = scripts();
    for script in [&s.publish, &s.open, &s.read] {
        if let Err(e) = cmd.script_load::<Value, _>(script.source.as_str()).await {
            tracing::debug!(error = %e, "script load failed");
        }
    }
}

/// The thread body.
pub fn run(
    setup: Setup,
    requests: UnboundedReceiver<Vec<Request>>,
    events: UnboundedSender<Vec<BusEvent>>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    rt.block_on(async move {
        let shared = Arc::new(Shared {
            shard: setup.shard,
            options: setup.options.clone(),
            stats: setup.stats.clone(),
            random: RandomState::new(),
            counter: AtomicU64::new(0),
            clock_offset_us: AtomicI64::new(0),
            instance: format!(
                "{}#{}#{:08x}",
                setup.options.node_id,
                setup.shard,
                RandomState::new().hash_one(unix_us()) as u32
            ),
        });
        let timeout = setup.options.command_timeout;
        let cmd = match connect(&builder(&setup.config, timeout)).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let sub = match connect(&builder(&setup.config, timeout)).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let ingest_client = if setup.ingest {
            // XREADGROUP BLOCK holds its connection: a client of its own,
            // with a timeout above the block time.
            let b = builder(
                &setup.config,
                super::ingest::BLOCK + timeout + Duration::from_secs(1),
            );
            match connect(&b).await {
                Ok(c) => Some(c),
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        } else {
            None
        };
        preload(&cmd).await;
        measure_clock(&shared, &cmd).await;
        let _ = ready.send(Ok(()));

        let ingest_task = ingest_client
            .as_ref()
            .map(|ic| tokio::spawn(super::ingest::run(shared.clone(), ic.clone(), cmd.clone())));
        let mut companion = Companion::new(shared, cmd.clone(), sub.clone(), events);
        companion.run(requests).await;
        if let Some(t) = ingest_task {
            t.abort();
        }
        let _ = sub.quit().await;
        let _ = cmd.quit().await;
        if let Some(ic) = ingest_client {
            let _ = ic.quit().await;
        }
    });
}

struct PublishJob {
    channel: Arc<str>,
    payload: Bytes,
    key: IdemKey,
    reply_to: ReplyTo,
    ingress_us: u64,
    deadline_us: u64,
}

enum SubOp {
    Subscribe(Arc<str>, u64),
    Unsubscribe(Arc<str>),
    ResubscribeAll(Vec<Arc<str>>),
}

/// Results of the helper tasks, for the main loop.
enum Internal {
    Opened {
        channel: Arc<str>,
        gen: u64,
        result: Result<Position, String>,
    },
    CaughtUp {
        channel: Arc<str>,
        gen: u64,
        result: Result<CatchUp, String>,
    },
    Resubscribed(Result<(), String>),
    /// Retry opening (after a failure).
    Reopen {
        channel: Arc<str>,
        gen: u64,
    },
    /// Retry a catch-up read (after a failure).
    Recatch {
        channel: Arc<str>,
        gen: u64,
    },
    /// Retry resubscribing everything.
    Resubscribe,
}

/// One live announcement waiting to be placed.
enum Live {
    Pub {
        epoch: u64,
        publication: Publication,
    },
    Presence {
        user: Arc<str>,
        joined: bool,
    },
}

/// This shard's view of one channel it has subscribers for.
struct Sub {
    gen: u64,
    /// Waiting for `SUBSCRIBE` + the position read.
    opening: bool,
    /// A catch-up read is in flight.
    catching_up: bool,
    /// Run another catch-up once the current step is done (something may
    /// have been missed meanwhile).
    recheck: bool,
    epoch: u64,
    /// The newest offset delivered (or covered by `Subscribed`).
    last: u64,
    buffer: Vec<Live>,
    /// Epochs seen in the buffer when the current catch-up started: the
    /// catch-up's read ran after they were announced, so any of them that
    /// is not its epoch is dead.
    pending_epochs: Vec<u64>,
    dead: VecDeque<u64>,
}

impl Sub {
    fn retire(&mut self, epoch: u64) {
        if !self.dead.contains(&epoch) {
            if self.dead.len() == DEAD_EPOCHS {
                self.dead.pop_front();
            }
            self.dead.push_back(epoch);
        }
    }
}

/// What the shard gets at the end of a turn, in order; publications of a
/// channel are merged into one event per turn.
enum Out {
    Event(BusEvent),
    Pubs {
        channel: Arc<str>,
        epoch: u64,
        items: Vec<Publication>,
    },
}

#[derive(Default)]
struct Outbox {
    items: Vec<Out>,
    open: HashMap<Arc<str>, usize>,
}

impl Outbox {
    fn event(&mut self, ev: BusEvent) {
        // Later publications of the channel must follow this event.
        if let BusEvent::Subscribed { channel, .. } | BusEvent::Presence { channel, .. } = &ev {
            self.open.remove(channel);
        }
        self.items.push(Out::Event(ev));
    }

    fn publication(&mut self, channel: &Arc<str>, epoch: u64, p: Publication) {
        if let Some(&i) = self.open.get(channel) {
            if let Out::Pubs {
                epoch: e, items, ..
            } = &mut self.items[i]
            {
                if *e == epoch {
                    items.push(p);
                    return;
                }
            }
        }
        self.open.insert(channel.clone(), self.items.len());
        self.items.push(Out::Pubs {
            channel: channel.clone(),
            epoch,
            items: vec![p],
        });
    }

    fn take(&mut self) -> Vec<BusEvent> {
        self.open.clear();
        self.items
            .drain(..)
            .map(|o| match o {
                Out::Event(e) => e,
                Out::Pubs {
                    channel,
                    epoch,
                    items,
                } => BusEvent::Publications {
                    channel,
                    epoch,
                    items: Arc::from(items),
                },
            })
            .collect()
    }
}

struct Companion {
    shared: Arc<Shared>,
    cmd: Client,
    sub: Client,
    events: UnboundedSender<Vec<BusEvent>>,
    out: Outbox,
    subs: HashMap<Arc<str>, Sub>,
    next_gen: u64,
    internal_tx: UnboundedSender<Internal>,
    internal_rx: UnboundedReceiver<Internal>,
    jobs: UnboundedSender<Job>,
    /// Users this shard reported present, per presence channel.
    present: HashMap<Arc<str>, HashSet<Arc<str>>>,
    subctl_tx: UnboundedSender<SubOp>,
    key_seed: u64,
    key_counter: u64,
}

impl Companion {
    fn new(
        shared: Arc<Shared>,
        cmd: Client,
        sub: Client,
        events: UnboundedSender<Vec<BusEvent>>,
    ) -> Companion {
        let (internal_tx, internal_rx) = unbounded_channel();
        let (jobs, jobs_rx) = unbounded_channel();
        let (subctl_tx, subctl_rx) = unbounded_channel();
        tokio::spawn(sequencer(
            shared.clone(),
            cmd.clone(),
            jobs_rx,
            events.clone(),
        ));
        tokio::spawn(subscription_controller(
            shared.clone(),
            cmd.clone(),
            sub.clone(),
            subctl_rx,
            internal_tx.clone(),
        ));
        let key_seed = shared.random();
        Companion {
            shared,
            cmd,
            sub,
            events,
            out: Outbox::default(),
            subs: HashMap::new(),
            next_gen: 0,
            internal_tx,
            internal_rx,
            jobs,
            present: HashMap::new(),
            subctl_tx,
            key_seed,
            key_counter: 0,
        }
    }

    async fn run(&mut self, mut requests: UnboundedReceiver<Vec<Request>>) {
        let mut messages = self.sub.message_rx();
        let mut sub_reconnects = self.sub.reconnect_rx();
        let mut cmd_reconnects = self.cmd.reconnect_rx();
        let mut heartbeat = tokio::time::interval(super::presence_ttl() / 3);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => self.on_heartbeat(),
                batch = requests.recv() => match batch {
                    Some(batch) => self.on_requests(batch),
                    None => return,
                },
                Some(ev) = self.internal_rx.recv() => self.on_internal(ev),
                m = messages.recv() => match m {
                    Ok(m) => self.on_message(m),
                    Err(RecvError::Lagged(n)) => self.on_lagged(n),
                    Err(RecvError::Closed) => return,
                },
                r = sub_reconnects.recv() => match r {
                    Ok(_) | Err(RecvError::Lagged(_)) => self.on_sub_reconnect(),
                    Err(RecvError::Closed) => return,
                },
                r = cmd_reconnects.recv() => match r {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        let cmd = self.cmd.clone();
                        let shared = self.shared.clone();
                        tokio::spawn(async move {
                            preload(&cmd).await;
                            measure_clock(&shared, &cmd).await;
                        });
                    }
                    Err(RecvError::Closed) => return,
                },
            }
            // Take everything else that is ready, so one turn sends the
            // shard one batch.
            for _ in 0..64 {
                let mut any = false;
                while let Ok(batch) = requests.try_recv() {
                    any = true;
                    self.on_requests(batch);
                }
                while let Ok(ev) = self.internal_rx.try_recv() {
                    any = true;
                    self.on_internal(ev);
                }
                loop {
                    match messages.try_recv() {
                        Ok(m) => {
                            any = true;
                            self.on_message(m);
                        }
                        Err(TryRecvError::Lagged(n)) => {
                            any = true;
                            self.on_lagged(n);
                        }
                        Err(_) => break,
                    }
                }
                if !any {
                    break;
                }
            }
            let batch = self.out.take();
            if !batch.is_empty() && self.events.send(batch).is_err() {
                return; // the shard is gone
            }
        }
    }

    fn on_requests(&mut self, batch: Vec<Request>) {
        for r in batch {
            match r {
                Request::Publish {
                    channel,
                    payload,
                    key,
                    reply_to,
                    ingress_us,
                } => {
                    let key = match key {
                        Some(k) => IdemKey::Client(k),
                        None => {
                            self.key_counter += 1;
                            IdemKey::Generated(
                                format!("{:016x}{:x}", self.key_seed, self.key_counter).into(),
                            )
                        }
                    };
                    let deadline_us = self.shared.deadline_us();
                    let _ = self.jobs.send(Job::Publish(PublishJob {
                        channel,
                        payload,
                        key,
                        reply_to,
                        ingress_us,
                        deadline_us,
                    }));
                }
                Request::Subscribe(channel) => self.subscribe(channel),
                Request::Unsubscribe(channel) => {
                    // Members the shard did not report as left leave now.
                    if let Some(users) = self.present.remove(&channel) {
                        let _ = self.jobs.send(Job::Presence {
                            channel: channel.clone(),
                            op: "leave",
                            users: users.into_iter().collect(),
                        });
                    }
                    if self.subs.remove(&channel).is_some() {
                        let _ = self.subctl_tx.send(SubOp::Unsubscribe(channel));
                    }
                }
                Request::Presence {
                    channel,
                    user,
                    joined,
                } => {
                    let set = self.present.entry(channel.clone()).or_default();
                    let changed = if joined {
                        set.insert(user.clone())
                    } else {
                        set.remove(&user)
                    };
                    if set.is_empty() {
                        self.present.remove(&channel);
                    }
                    if changed {
                        let op = if joined { "join" } else { "leave" };
                        let _ = self.jobs.send(Job::Presence {
                            channel,
                            op,
                            users: vec![user],
                        });
                    }
                }
                Request::Members { channel, request } => {
                    let _ = self.jobs.send(Job::Members { channel, request });
                }

                Request::History {
                    channel,
                    after,
                    request,
                } => {
                    let shared = self.shared.clone();
                    let cmd = self.cmd.clone();
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        let result = read_history(&shared, &cmd, &channel, after).await;
                        let _ = events.send(vec![BusEvent::History {
                            request,
                            channel,
                            result,
                        }]);
                    });
                }
            }
        }
    }

    fn subscribe(&mut self, channel: Arc<str>) {
        if let Some(s) = self.subs.get(&channel) {
            // The shard asked twice without unsubscribing: answer again.
            if !s.opening {
                let position = Position {
                    epoch: s.epoch,
                    offset: s.last,
                };
                self.out.event(BusEvent::Subscribed { channel, position });
            }
            return;
        }
        self.next_gen += 1;
        let gen = self.next_gen;
        self.subs.insert(
            channel.clone(),
            Sub {
                gen,
                opening: true,
                catching_up: false,
                recheck: false,
                epoch: 0,
                last: 0,
                buffer: Vec::new(),
                pending_epochs: Vec::new(),
                dead: VecDeque::new(),
            },
        );
        let _ = self.subctl_tx.send(SubOp::Subscribe(channel, gen));
    }

    fn current(&self, channel: &Arc<str>, gen: u64) -> bool {
        self.subs.get(channel).is_some_and(|s| s.gen == gen)
    }

    fn later(&self, ev: Internal) {
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RETRY_DELAY).await;
            let _ = tx.send(ev);
        });
    }

    fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Opened {
                channel,
                gen,
                result,
            } => {
                if !self.current(&channel, gen) {
                    return;
                }
                match result {
                    Ok(position) => self.opened(&channel, position),
                    Err(e) => {
                        tracing::debug!(channel = %channel, error = %e, "redis subscribe failed; retrying");
                        self.later(Internal::Reopen { channel, gen });
                    }
                }
            }
            Internal::Reopen { channel, gen } => {
                if self.current(&channel, gen) && self.subs[&channel].opening {
                    let _ = self.subctl_tx.send(SubOp::Subscribe(channel, gen));
                }
            }
            Internal::CaughtUp {
                channel,
                gen,
                result,
            } => {
                if self.current(&channel, gen) {
                    self.caught_up(&channel, result);
                }
            }
            Internal::Recatch { channel, gen } => {
                if self.current(&channel, gen) {
                    self.start_catch_up(&channel);
                }
            }
            Internal::Resubscribed(result) => match result {
                Ok(()) => {
                    // Everything announced while the connection was down is
                    // in the streams.
                    let channels: Vec<Arc<str>> = self.subs.keys().cloned().collect();
                    for ch in channels {
                        let s = self.subs.get_mut(&ch).expect("listed");
                        if s.opening || s.catching_up {
                            s.recheck = true;
                        } else {
                            self.start_catch_up(&ch);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "redis resubscribe failed; retrying");
                    self.later(Internal::Resubscribe);
                }
            },
            Internal::Resubscribe => self.resubscribe_all(),
        }
    }

    /// Refreshes this shard's presence entries (and sweeps out expired
    /// ones, a dead node's) on every presence channel it subscribes to.
    fn on_heartbeat(&mut self) {
        let mut channels: Vec<Arc<str>> = self
            .subs
            .keys()
            .filter(|c| crate::bus::is_presence(c))
            .cloned()
            .collect();
        for c in self.present.keys() {
            if !self.subs.contains_key(c) {
                channels.push(c.clone());
            }
        }
        for channel in channels {
            let users = self
                .present
                .get(&channel)
                .map(|u| u.iter().cloned().collect())
                .unwrap_or_default();
            let _ = self.jobs.send(Job::Presence {
                channel,
                op: "refresh",
                users,
            });
        }
    }

    fn resubscribe_all(&mut self) {
        let all: Vec<Arc<str>> = self.subs.keys().cloned().collect();
        let _ = self.subctl_tx.send(SubOp::ResubscribeAll(all));
    }

    fn on_sub_reconnect(&mut self) {
        RedisStats::bump(&self.shared.stats.reconnects);
        tracing::info!(
            shard = self.shared.shard,
            "redis pub/sub reconnected; resubscribing"
        );
        self.resubscribe_all();
    }

    fn on_lagged(&mut self, n: u64) {
        tracing::warn!(
            shard = self.shared.shard,
            missed = n,
            "redis pub/sub receiver lagged; catching up from streams"
        );
        let channels: Vec<Arc<str>> = self.subs.keys().cloned().collect();
        for ch in channels {
            let s = self.subs.get_mut(&ch).expect("listed");
            if s.opening || s.catching_up {
                s.recheck = true;
            } else {
                self.start_catch_up(&ch);
            }
        }
    }

    fn opened(&mut self, channel: &Arc<str>, position: Position) {
        let s = self.subs.get_mut(channel).expect("current");
        s.opening = false;
        s.epoch = position.epoch;
        s.last = position.offset;
        self.out.event(BusEvent::Subscribed {
            channel: channel.clone(),
            position,
        });
        self.replay_buffer(channel);
        let s = self.subs.get_mut(channel).expect("current");
        if s.recheck && !s.catching_up {
            s.recheck = false;
            self.start_catch_up(channel);
        }
    }

    fn on_message(&mut self, m: Message) {
        let Some(name) = keys::channel_of_pubsub(&m.channel) else {
            return;
        };
        let Some((channel, _)) = self.subs.get_key_value(name) else {
            return; // unsubscribed meanwhile
        };
        let channel = channel.clone();
        let decoded = match bytes_of(m.value) {
            Some(b) => codec::decode_announced(b, self.shared.max_payload()),
            None => Err(codec::Malformed::Reply("announcement is not a string")),
        };
        match decoded {
            Ok(codec::Announced::Publication(a)) => self.accept(
                &channel,
                Live::Pub {
                    epoch: a.epoch,
                    publication: a.publication,
                },
            ),
            Ok(codec::Announced::Presence { user, joined }) => {
                self.accept(&channel, Live::Presence { user, joined })
            }
            Err(e) => {
                RedisStats::bump(&self.shared.stats.malformed);
                tracing::warn!(channel = %channel, error = %e, "malformed announcement from redis dropped");
            }
        }
    }

    /// Places one live announcement: deliver, drop, or buffer and catch up.
    fn accept(&mut self, channel: &Arc<str>, live: Live) {
        let s = self.subs.get_mut(channel).expect("caller checked");
        if s.opening || s.catching_up {
            if s.buffer.len() < MAX_BUFFER {
                s.buffer.push(live);
            } else {
                s.recheck = true;
            }
            return;
        }
        let (epoch, offset) = match &live {
            Live::Presence { user, joined } => {
                self.out.event(BusEvent::Presence {
                    channel: channel.clone(),
                    user: user.clone(),
                    joined: *joined,
                });
                return;
            }
            Live::Pub { epoch, publication } => (*epoch, publication.offset),
        };
        if epoch == s.epoch {
            if offset <= s.last {
                return; // already delivered (or covered by Subscribed)
            }
            if offset == s.last + 1 {
                s.last = offset;
                if let Live::Pub { publication, .. } = live {
                    self.out.publication(channel, epoch, publication);
                }
                return;
            }
        } else if s.dead.contains(&epoch) {
            return;
        }
        // A jump or an unknown epoch: read what is missing first.
        s.buffer.push(live);
        self.start_catch_up(channel);
    }

    fn replay_buffer(&mut self, channel: &Arc<str>) {
        let s = self.subs.get_mut(channel).expect("caller checked");
        let buffer = std::mem::take(&mut s.buffer);
        let mut rest = buffer.into_iter();
        for live in rest.by_ref() {
            self.accept(channel, live);
            if self.subs[channel].catching_up {
                break;
            }
        }
        // A catch-up started: whatever is left waits for it.
        let s = self.subs.get_mut(channel).expect("caller checked");
        s.buffer.extend(rest);
    }

    fn start_catch_up(&mut self, channel: &Arc<str>) {
        let s = self.subs.get_mut(channel).expect("caller checked");
        s.catching_up = true;
        s.recheck = false;
        s.pending_epochs.clear();
        for l in &s.buffer {
            if let Live::Pub { epoch, .. } = l {
                if *epoch != s.epoch && !s.pending_epochs.contains(epoch) {
                    s.pending_epochs.push(*epoch);
                }
            }
        }
        RedisStats::bump(&self.shared.stats.catch_ups);
        let (epoch, last, gen) = (s.epoch, s.last, s.gen);
        let shared = self.shared.clone();
        let cmd = self.cmd.clone();
        let tx = self.internal_tx.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            let result = catch_up(&shared, &cmd, &channel, epoch, last).await;
            let _ = tx.send(Internal::CaughtUp {
                channel,
                gen,
                result,
            });
        });
    }

    fn caught_up(&mut self, channel: &Arc<str>, result: Result<CatchUp, String>) {
        let stats = self.shared.stats.clone();
        let s = self.subs.get_mut(channel).expect("current");
        let cu = match result {
            Ok(cu) => cu,
            Err(e) => {
                tracing::debug!(channel = %channel, error = %e, "catch-up read failed; retrying");
                let gen = s.gen;
                self.later(Internal::Recatch {
                    channel: channel.clone(),
                    gen,
                });
                return;
            }
        };
        s.catching_up = false;
        let new_epoch = cu.epoch != s.epoch;
        if new_epoch {
            let old = s.epoch;
            s.retire(old);
            s.epoch = cu.epoch;
            s.last = 0;
            tracing::info!(channel = %channel, "channel history was lost in redis; new epoch");
        }
        for e in std::mem::take(&mut s.pending_epochs) {
            if e != s.epoch {
                s.retire(e);
            }
        }
        let epoch = s.epoch;
        for p in cu.items {
            if p.offset <= s.last {
                continue;
            }
            if p.offset != s.last + 1 {
                RedisStats::bump(&stats.unfillable_gaps);
                tracing::warn!(channel = %channel, from = s.last + 1, to = p.offset - 1,
                    "publications trimmed or expired before they could be delivered");
            }
            s.last = p.offset;
            RedisStats::bump(&stats.caught_up);
            self.out.publication(channel, epoch, p);
        }
        let s = self.subs.get_mut(channel).expect("current");
        if cu.complete && cu.seq > s.last {
            // The stream lacks its newest entries (deleted by hand).
            RedisStats::bump(&stats.unfillable_gaps);
            s.last = cu.seq;
        }
        if new_epoch && s.last == 0 {
            // Nothing published in the new epoch yet: tell the shard now,
            // so that it stops offering recovery in the lost one.
            let position = Position {
                epoch: s.epoch,
                offset: 0,
            };
            self.out.event(BusEvent::Subscribed {
                channel: channel.clone(),
                position,
            });
        }
        if !cu.complete {
            self.start_catch_up(channel);
            return;
        }
        self.replay_buffer(channel);
        let s = self.subs.get_mut(channel).expect("current");
        if s.recheck && !s.catching_up {
            self.start_catch_up(channel);
        }
    }
}

/// Runs queued publishes and presence operations in order, one pipeline
/// at a time (group commit: the next batch fills while one is in flight).
async fn sequencer(
    shared: Arc<Shared>,
    cmd: Client,
    mut jobs: UnboundedReceiver<Job>,
    events: UnboundedSender<Vec<BusEvent>>,
) {
    let mut batch = Vec::new();
    while let Some(job) = jobs.recv().await {
        batch.push(job);
        while batch.len() < MAX_PIPELINE {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let calls: Vec<Call> = batch.iter().map(|j| job_call(&shared, j)).collect();
        let results = run_pipelined(&cmd, calls).await;
        let mut out = Vec::with_capacity(batch.len());
        for (job, r) in batch.drain(..).zip(results) {
            match job {
                Job::Publish(job) => {
                    let result = r
                        .map_err(|e| e.to_string())
                        .and_then(|v| parse_published(v).map_err(|e| e.to_string()));
                    if let Err(e) = &result {
                        RedisStats::bump(&shared.stats.publish_errors);
                        tracing::debug!(channel = %job.channel, error = %e, "publish failed");
                    }
                    out.push(BusEvent::Published {
                        reply_to: job.reply_to,
                        channel: job.channel,
                        result: result.map_err(BusError::Unavailable),
                    });
                }
                Job::Presence { channel, op, .. } => {
                    // A failed join is redone by the next heartbeat; a
                    // failed leave expires with its entry.
                    if let Err(e) = r {
                        tracing::debug!(channel = %channel, op, error = %e, "presence update failed");
                    }
                }
                Job::Members { channel, request } => {
                    let result = r
                        .map_err(|e| e.to_string())
                        .and_then(|v| parse_members(v).map_err(|e| e.to_string()))
                        .map_err(BusError::Unavailable);
                    out.push(BusEvent::Members {
                        request,
                        channel,
                        result,
                    });
                }
            }
        }
        if !out.is_empty() && events.send(out).is_err() {
            return;
        }
    }
}

/// What the sequencer runs, in order.
enum Job {
    Publish(PublishJob),
    Presence {
        channel: Arc<str>,
        op: &'static str,
        users: Vec<Arc<str>>,
    },
    Members {
        channel: Arc<str>,
        request: u64,
    },
}

fn job_call(shared: &Shared, job: &Job) -> Call {
    match job {
        Job::Publish(p) => publish_call(shared, p),
        Job::Presence { channel, op, users } => presence_call(shared, channel, op, users),
        Job::Members { channel, .. } => presence_call(shared, channel, "members", &[]),
    }
}

fn presence_call(shared: &Shared, channel: &str, op: &str, users: &[Arc<str>]) -> Call {
    let keys = vec![
        keys::presence_entries(channel),
        keys::presence_users(channel),
    ];
    let mut args = Vec::with_capacity(4 + users.len());
    args.push(Value::from(op));
    args.push(Value::from(
        (super::presence_ttl().as_millis().max(1) as u64).to_string(),
    ));
    args.push(Value::from(keys::pubsub(channel)));
    args.push(Value::from(shared.instance.as_str()));
    args.extend(users.iter().map(|u| Value::from(&**u)));
    (&scripts().presence, keys, args)
}

/// The member list of the presence script, sorted.
fn parse_members(v: Value) -> Result<Vec<Arc<str>>, codec::Malformed> {
    let list = match v {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        _ => return Err(codec::Malformed::Reply("members reply")),
    };
    let mut users = Vec::with_capacity(list.len());
    for u in list {
        let b = bytes_of(u).ok_or(codec::Malformed::Reply("member"))?;
        if b.len() > codec::MAX_USER_BYTES {
            return Err(codec::Malformed::TooLarge(b.len()));
        }
        let u =
            std::str::from_utf8(&b).map_err(|_| codec::Malformed::Reply("member is not UTF-8"))?;
        users.push(Arc::from(u));
    }
    users.sort_unstable();
    users.dedup();
    Ok(users)
}

/// The keys and arguments of the publish script.
fn publish_call(shared: &Shared, job: &PublishJob) -> Call {
    publish_args(
        shared,
        &job.channel,
        job.payload.clone(),
        &job.key,
        job.ingress_us,
        job.deadline_us,
    )
}

pub fn publish_args(
    shared: &Shared,
    channel: &str,
    payload: Bytes,
    key: &IdemKey,
    ingress_us: u64,
    deadline_us: u64,
) -> Call {
    let o = &shared.options;
    let key_ttl = match key {
        IdemKey::Generated(_) => o.command_timeout + GENERATED_KEY_SLACK,
        _ => o.idempotency_ttl,
    };
    let keys = vec![
        keys::meta(channel),
        keys::stream(channel),
        keys::idempotency(channel, key),
    ];
    let args = vec![
        Value::Bytes(payload),
        Value::from(shared.fresh_epoch()),
        Value::from(o.history_size.to_string()),
        Value::from(shared.ttl_ms().to_string()),
        Value::from((key_ttl.as_millis().max(1) as u64).to_string()),
        Value::from(ingress_us.to_string()),
        Value::from(keys::pubsub(channel)),
        Value::from(deadline_us.to_string()),
    ];
    (&scripts().publish, keys, args)
}

/// One script call: the script, its keys, its arguments.
pub type Call = (&'static Script, Vec<String>, Vec<Value>);

/// `EVALSHA` as a custom command: fred's pipelines have no Lua interface.
/// In a cluster it is routed by its first key (argument 2).
fn evalsha() -> CustomCommand {
    CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false)
}

fn evalsha_args(script: &Script, keys: &[String], args: &[Value]) -> Vec<Value> {
    let mut v = Vec::with_capacity(2 + keys.len() + args.len());
    v.push(Value::from(script.sha.as_str()));
    v.push(Value::from(keys.len() as i64));
    v.extend(keys.iter().map(|k| Value::from(k.as_str())));
    v.extend(args.iter().cloned());
    v
}

/// Sends script calls as one pipeline and returns one result per call, in
/// order. Calls that missed the script cache are loaded and re-sent, in
/// order.
pub async fn run_pipelined(cmd: &Client, calls: Vec<Call>) -> Vec<Result<Value, Error>> {
    let n = calls.len();
    if n == 0 {
        return Vec::new();
    }
    let pipeline = cmd.pipeline();
    for (script, keys, args) in &calls {
        let queued: Result<Value, Error> = pipeline
            .custom(evalsha(), evalsha_args(script, keys, args))
            .await;
        if let Err(e) = queued {
            return (0..n).map(|_| Err(e.clone())).collect();
        }
    }
    let mut results: Vec<Result<Value, Error>> = pipeline.try_all::<Value>().await;
    if results.len() != n {
        // The whole pipeline failed (timeout, connection): one error.
        let e = results
            .pop()
            .and_then(Result::err)
            .unwrap_or_else(|| Error::new(ErrorKind::Unknown, "pipeline lost its replies"));
        return (0..n).map(|_| Err(e.clone())).collect();
    }
    let missed: Vec<usize> = (0..n)
        .filter(|&i| matches!(&results[i], Err(e) if is_noscript(e)))
        .collect();
    if !missed.is_empty() {
        let mut loaded: Vec<&str> = Vec::new();
        for &i in &missed {
            let script = calls[i].0;
            if loaded.contains(&script.sha.as_str()) {
                continue;
            }
            loaded.push(script.sha.as_str());
            if let Err(e) = cmd.script_load::<Value, _>(script.source.as_str()).await {
                for &i in &missed {
                    results[i] = Err(e.clone());
                }
                return results;
            }
        }
        let again = cmd.pipeline();
        for &i in &missed {
            let (script, keys, args) = &calls[i];
            let _: Result<Value, Error> = again
                .custom(evalsha(), evalsha_args(script, keys, args))
                .await;
        }
        let retried = again.try_all::<Value>().await;
        if retried.len() == missed.len() {
            for (&i, r) in missed.iter().zip(retried) {
                results[i] = r;
            }
        } else {
            let e = retried
                .into_iter()
                .next()
                .and_then(Result::err)
                .unwrap_or_else(|| Error::new(ErrorKind::Unknown, "pipeline lost its replies"));
            for &i in &missed {
                results[i] = Err(e.clone());
            }
        }
    }
    results
}

/// `{epoch_hex, offset, published_us, duplicate}` → the position.
pub fn parse_published(v: Value) -> Result<Position, codec::Malformed> {
    let Value::Array(parts) = v else {
        return Err(codec::Malformed::Reply("publish reply is not an array"));
    };
    if parts.len() != 4 {
        return Err(codec::Malformed::Reply("publish reply length"));
    }
    let mut it = parts.into_iter();
    let epoch = bytes_of(it.next().expect("4")).ok_or(codec::Malformed::Reply("epoch"))?;
    let epoch = parse_epoch(&epoch)?;
    let offset = u64_of(&it.next().expect("4")).ok_or(codec::Malformed::Reply("offset"))?;
    if offset == 0 {
        return Err(codec::Malformed::ZeroOffset);
    }
    Ok(Position { epoch, offset })
}

/// Sends `SUBSCRIBE`/`UNSUBSCRIBE` in order and opens subscribed channels.
async fn subscription_controller(
    shared: Arc<Shared>,
    cmd: Client,
    sub: Client,
    mut ops: UnboundedReceiver<SubOp>,
    internal: UnboundedSender<Internal>,
) {
    let mut batch: Vec<SubOp> = Vec::new();
    while let Some(op) = ops.recv().await {
        batch.push(op);
        while let Ok(op) = ops.try_recv() {
            batch.push(op);
        }
        let mut ops_iter = batch.drain(..).peekable();
        while let Some(op) = ops_iter.next() {
            match op {
                SubOp::Subscribe(channel, gen) => {
                    let mut group = vec![(channel, gen)];
                    while let Some(SubOp::Subscribe(..)) = ops_iter.peek() {
                        if let Some(SubOp::Subscribe(c, g)) = ops_iter.next() {
                            group.push((c, g));
                        }
                    }
                    let names: Vec<String> = group.iter().map(|(c, _)| keys::pubsub(c)).collect();
                    match confirm_subscribe(&sub, names).await {
                        Ok(()) => {
                            let results = open_channels(&shared, &cmd, &group).await;
                            for ((channel, gen), result) in group.into_iter().zip(results) {
                                let _ = internal.send(Internal::Opened {
                                    channel,
                                    gen,
                                    result,
                                });
                            }
                        }
                        Err(e) => {
                            for (channel, gen) in group {
                                let _ = internal.send(Internal::Opened {
                                    channel,
                                    gen,
                                    result: Err(e.clone()),
                                });
                            }
                        }
                    }
                }
                SubOp::Unsubscribe(channel) => {
                    let mut names = vec![keys::pubsub(&channel)];
                    while let Some(SubOp::Unsubscribe(..)) = ops_iter.peek() {
                        if let Some(SubOp::Unsubscribe(c)) = ops_iter.next() {
                            names.push(keys::pubsub(&c));
                        }
                    }
                    // A failure means the connection dropped, which ends
                    // every subscription anyway (the reconnect resubscribes
                    // only channels still wanted).
                    if let Err(e) = sub.unsubscribe(names).await {
                        tracing::debug!(error = %e, "redis unsubscribe failed");
                    }
                }
                SubOp::ResubscribeAll(channels) => {
                    let names: Vec<String> = channels.iter().map(|c| keys::pubsub(c)).collect();
                    let result = if names.is_empty() {
                        Ok(())
                    } else {
                        confirm_subscribe(&sub, names).await
                    };
                    let _ = internal.send(Internal::Resubscribed(result));
                }
            }
        }
    }
}

/// `SUBSCRIBE`, then a `PING` on the same connection: fred resolves
/// `subscribe` when the command is written, the `PING` reply proves Redis
/// has processed it.
async fn confirm_subscribe(sub: &Client, names: Vec<String>) -> Result<(), String> {
    for chunk in names.chunks(512) {
        sub.subscribe(chunk.to_vec())
            .await
            .map_err(|e| e.to_string())?;
    }
    sub.ping::<Value>(None).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Reads (creating if needed) the position of each channel.
async fn open_channels(
    shared: &Shared,
    cmd: &Client,
    group: &[(Arc<str>, u64)],
) -> Vec<Result<Position, String>> {
    let calls = group
        .iter()
        .map(|(c, _)| {
            (
                &scripts().open,
                vec![keys::meta(c), keys::stream(c)],
                vec![
                    Value::from(shared.fresh_epoch()),
                    Value::from(shared.ttl_ms().to_string()),
                ],
            )
        })
        .collect();
    run_pipelined(cmd, calls)
        .await
        .into_iter()
        .map(|r| {
            let v = r.map_err(|e| e.to_string())?;
            parse_position(v).map_err(|e| e.to_string())
        })
        .collect()
}

fn parse_position(v: Value) -> Result<Position, codec::Malformed> {
    let Value::Array(parts) = v else {
        return Err(codec::Malformed::Reply("open reply is not an array"));
    };
    let mut it = parts.into_iter();
    let (Some(epoch), Some(seq), None) = (it.next(), it.next(), it.next()) else {
        return Err(codec::Malformed::Reply("open reply length"));
    };
    let epoch = parse_epoch(&bytes_of(epoch).ok_or(codec::Malformed::Reply("epoch"))?)?;
    let offset = u64_of(&seq).ok_or(codec::Malformed::Reply("seq"))?;
    Ok(Position { epoch, offset })
}

/// One page of a channel's history.
struct Page {
    epoch: u64,
    seq: u64,
    entries: Vec<Publication>,
    /// Entries the page held before malformed ones were dropped.
    raw_len: usize,
}

async fn read_page(
    shared: &Shared,
    cmd: &Client,
    channel: &str,
    epoch: u64,
    after: u64,
    restart: bool,
) -> Result<Page, String> {
    let keys = vec![keys::meta(channel), keys::stream(channel)];
    let args = vec![
        Value::from(shared.fresh_epoch()),
        Value::from(shared.ttl_ms().to_string()),
        Value::from(epoch_hex(epoch)),
        Value::from(after.to_string()),
        Value::from(PAGE.to_string()),
        Value::from(if restart { "1" } else { "0" }),
    ];
    let v = scripts()
        .read
        .run(cmd, keys, args)
        .await
        .map_err(|e| e.to_string())?;
    let Value::Array(parts) = v else {
        return Err("history reply is not an array".into());
    };
    let mut it = parts.into_iter();
    let (Some(e), Some(seq), Some(entries), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return Err("history reply length".into());
    };
    let epoch = bytes_of(e)
        .ok_or_else(|| "history epoch".to_string())
        .and_then(|b| parse_epoch(&b).map_err(|e| e.to_string()))?;
    let seq = u64_of(&seq).ok_or_else(|| "history seq".to_string())?;
    let raw = match entries {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        _ => return Err("history entries".into()),
    };
    let raw_len = raw.len();
    let mut entries = Vec::with_capacity(raw_len);
    for v in raw {
        match parse_entry(v, shared.max_payload()) {
            Ok(p) => entries.push(p),
            Err(e) => {
                RedisStats::bump(&shared.stats.malformed);
                tracing::warn!(channel, error = %e, "malformed history entry in redis skipped");
            }
        }
    }
    Ok(Page {
        epoch,
        seq,
        entries,
        raw_len,
    })
}

/// Answers a history read: everything after `after` up to the newest
/// publication when the read started, or `Lost`.
async fn read_history(shared: &Shared, cmd: &Client, channel: &str, after: Position) -> History {
    let mut items: Vec<Publication> = Vec::new();
    let mut at = after.offset;
    let mut target: Option<u64> = None;
    loop {
        let page = match read_page(shared, cmd, channel, after.epoch, at, false).await {
            Ok(p) => p,
            Err(e) if items.is_empty() => return History::Unavailable(e),
            // Keep what was read; the shard asks again for the rest.
            Err(_) => break,
        };
        let current = Position {
            epoch: page.epoch,
            offset: page.seq,
        };
        if page.epoch != after.epoch {
            if items.is_empty() {
                return History::Lost { current };
            }
            break;
        }
        let target = *target.get_or_insert(page.seq);
        if items.is_empty() && at > page.seq {
            return History::Lost { current };
        }
        if at >= target {
            break;
        }
        let before = items.len();
        for p in page.entries {
            if p.offset <= at {
                continue;
            }
            if p.offset != at + 1 || p.offset > target {
                break;
            }
            at = p.offset;
            items.push(p);
        }
        if items.len() == before {
            // The next publication is gone (trimmed, expired, malformed).
            if items.is_empty() {
                return History::Lost { current };
            }
            break;
        }
        if at >= target || (page.raw_len as u64) < PAGE || items.len() >= MAX_HISTORY_ITEMS {
            break;
        }
    }
    History::Items {
        epoch: after.epoch,
        items,
    }
}

/// What a catch-up read found.
struct CatchUp {
    epoch: u64,
    /// The newest offset when the read ran.
    seq: u64,
    items: Vec<Publication>,
    /// Everything up to `seq` was read (else read again).
    complete: bool,
}

/// Reads what a channel's subscription missed after (`epoch`, `last`): the
/// rest of that epoch, or the current epoch from its start.
async fn catch_up(
    shared: &Shared,
    cmd: &Client,
    channel: &str,
    epoch: u64,
    last: u64,
) -> Result<CatchUp, String> {
    let mut cur_epoch = epoch;
    let mut at = last;
    let mut items = Vec::new();
    let mut target = None;
    loop {
        let page = read_page(shared, cmd, channel, cur_epoch, at, true).await;
        let page = match page {
            Ok(p) => p,
            Err(e) if target.is_none() => return Err(e),
            Err(_) => {
                return Ok(CatchUp {
                    epoch: cur_epoch,
                    seq: target.unwrap_or(at),
                    items,
                    complete: false,
                })
            }
        };
        if page.epoch != cur_epoch {
            if target.is_some() {
                // Changed again between pages: deliver this much, go on.
                return Ok(CatchUp {
                    epoch: cur_epoch,
                    seq: target.unwrap_or(at),
                    items,
                    complete: false,
                });
            }
            cur_epoch = page.epoch;
            at = 0;
        }
        let seq = *target.get_or_insert(page.seq);
        let before = at;
        for p in page.entries {
            if p.offset > at && p.offset <= seq {
                at = p.offset;
                items.push(p);
            }
        }
        // No progress on a full page: everything left is malformed; the
        // caller counts the rest as an unfillable gap.
        let done = at >= seq || (page.raw_len as u64) < PAGE || at == before;
        if done || items.len() >= MAX_HISTORY_ITEMS {
            return Ok(CatchUp {
                epoch: cur_epoch,
                seq,
                items,
                complete: done,
            });
        }
    }
}
