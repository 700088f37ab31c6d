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
//!
//! This file holds what the tasks share (`Shared`) and the main loop
//! (`Companion`): its turn, the shard's requests and the presence
//! heartbeat (which also refreshes subscription counts). The rest lives
//! beside the job it does:
//! - `startup`: the thread body: runtime, clients, clock and scripts;
//! - `subscriptions`: the main loop's per-channel state machine (opening,
//!   ordering live announcements, catching up, resubscribing);
//! - `outbox`: the batch of events the shard gets at the end of a turn;
//! - `pubsub`: the subscription controller (`SUBSCRIBE`/`UNSUBSCRIBE`);
//! - `sequencer`: publishes, presence operations and subscription counts,
//!   in order;
//! - `counts`: subscription counts across nodes (what the main loop
//!   remembers and refreshes, the count scripts' calls and replies);
//! - `pipeline`: script calls sent as one pipeline;
//! - `history`: history reads and catch-up reads from the streams.

#![forbid(unsafe_code)]

mod counts;
mod history;
mod outbox;
mod pipeline;
mod pubsub;
mod seen;
mod sequencer;
mod startup;
mod subscriptions;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::codec::epoch_hex;
use super::keys::IdemKey;
use super::{RedisOptions, RedisStats, Request};
use crate::bus::{unix_us, BusEvent};
use history::read_history;
use outbox::Outbox;
use pubsub::{subscription_controller, SubOp};
use sequencer::{sequencer, Job, PublishJob};
use startup::{measure_clock, preload};
use subscriptions::{Internal, Sub};

pub use pipeline::run_pipelined;
pub use seen::NodeSeen;
pub use sequencer::{parse_published, publish_args};
pub use startup::{run, Setup, CONNECT_TIMEOUT};

/// Allowance for the error of the clock offset measurement.
const DEADLINE_SLACK: Duration = Duration::from_millis(250);

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
    /// What this node has seen of each channel (all its companions).
    pub seen: Arc<NodeSeen>,
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

    /// A publish deadline `timeout` after `since_us` (our clock), in
    /// Redis' clock.
    fn deadline_us(&self, since_us: u64) -> u64 {
        let offset = self.clock_offset_us.load(Ordering::Relaxed);
        let local = since_us + (self.options.command_timeout + DEADLINE_SLACK).as_micros() as u64;
        local.saturating_add_signed(offset)
    }

    fn ttl_ms(&self) -> u64 {
        self.options.history_ttl.as_millis().max(1) as u64
    }

    fn max_payload(&self) -> usize {
        self.options.max_payload_bytes
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
    /// To the sequencer: each job with the time (µs since the Unix epoch)
    /// its `command_timeout` counts from.
    jobs: UnboundedSender<(u64, Job)>,
    /// Users this shard reported present, per presence channel.
    present: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// This shard's non-zero subscription counts, rewritten by each
    /// heartbeat (see `counts`).
    counts: HashMap<Arc<str>, u64>,
    subctl_tx: UnboundedSender<SubOp>,
    key_seed: u64,
    key_counter: u64,
}

impl Companion {
    /// `seq` is the sequencer's connection (`cmd` itself unless
    /// `redis.wait_replicas` asks for one of its own).
    fn new(
        shared: Arc<Shared>,
        cmd: Client,
        seq: Client,
        sub: Client,
        events: UnboundedSender<Vec<BusEvent>>,
    ) -> Companion {
        let (internal_tx, internal_rx) = unbounded_channel();
        let (jobs, jobs_rx) = unbounded_channel();
        let (subctl_tx, subctl_rx) = unbounded_channel();
        tokio::spawn(sequencer(shared.clone(), seq, jobs_rx, events.clone()));
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
            counts: HashMap::new(),
            subctl_tx,
            key_seed,
            key_counter: 0,
        }
    }

    /// Hands a job to the sequencer. A publish's `redis.command_timeout_ms`
    /// counts from when it reached the server (its ingress time), any
    /// other job's from now.
    fn queue(&self, job: Job) {
        let since = match &job {
            Job::Publish(p) => p.ingress_us,
            _ => unix_us(),
        };
        let _ = self.jobs.send((since, job));
    }

    async fn run(&mut self, mut requests: UnboundedReceiver<Vec<Request>>) {
        let mut messages = self.sub.message_rx();
        let mut sub_reconnects = self.sub.reconnect_rx();
        let mut cmd_reconnects = self.cmd.reconnect_rx();
        let mut heartbeat = tokio::time::interval(self.shared.options.presence_ttl / 3);
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
                    let seen = self.subs.get(&channel).and_then(Sub::seen);
                    self.queue(Job::Publish(PublishJob {
                        channel,
                        payload,
                        key,
                        reply_to,
                        ingress_us,
                        seen,
                    }));
                }
                Request::Subscribe(channel) => self.subscribe(channel),
                Request::Unsubscribe(channel) => {
                    self.forget_count(&channel);
                    // Members the shard did not report as left leave now.
                    if let Some(users) = self.present.remove(&channel) {
                        self.queue(Job::Presence {
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
                        self.queue(Job::Presence {
                            channel,
                            op,
                            users: vec![user],
                        });
                    }
                }
                Request::Members { channel, request } => {
                    self.queue(Job::Members { channel, request });
                }
                Request::Count { channel, count } => self.on_count(channel, count),
                Request::Channels { query, request } => {
                    self.queue(Job::Channels { query, request });
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

    /// Refreshes this shard's presence entries (and sweeps out expired
    /// ones, a dead node's) on every presence channel it subscribes to, and
    /// its subscription counts.
    fn on_heartbeat(&mut self) {
        self.refresh_counts();
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
            self.queue(Job::Presence {
                channel,
                op: "refresh",
                users,
            });
        }
    }
}
