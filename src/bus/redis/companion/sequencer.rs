//! The sequencer task: publishes, presence operations and subscription
//! counts run in order, one pipeline of script calls at a time, and their
//! answers go to the shard. Also the publish script's arguments and reply
//! (shared with the ingest consumer).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::Value;
use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::counts::{count_call, parse_channels, read_call};
use super::pipeline::{run_pipelined, Call};
use super::Shared;
use crate::bus::redis::codec::{self, bytes_of, parse_epoch, u64_of};
use crate::bus::redis::keys::{self, IdemKey};
use crate::bus::redis::scripts::scripts;
use crate::bus::redis::RedisStats;
use crate::bus::{unix_us, BusError, BusEvent, ChannelQuery, Position, ReplyTo};

/// Most publishes in one pipeline.
const MAX_PIPELINE: usize = 256;
/// Extra life of a generated idempotency key beyond the command timeout
/// (covers clock skew between this host and Redis).
const GENERATED_KEY_SLACK: Duration = Duration::from_secs(5);

pub(super) struct PublishJob {
    pub(super) channel: Arc<str>,
    pub(super) payload: Bytes,
    pub(super) key: IdemKey,
    pub(super) reply_to: ReplyTo,
    pub(super) ingress_us: u64,
    /// The newest position this node's subscription to the channel has
    /// seen, if it has one (see `publish_args`).
    pub(super) seen: Option<Position>,
}

/// Runs queued publishes and presence operations in order, one pipeline
/// at a time (group commit: the next batch fills while one is in flight).
///
/// Every job carries the time its `redis.command_timeout_ms` counts from
/// (a publish: when it reached the server). A job already past its deadline
/// when its turn comes fails without being sent, and each job of a
/// pipeline is answered at its own deadline if the pipeline (or, with
/// `redis.wait_replicas`, the WAIT after it) has not answered by then,
/// while the others wait on ([`Waiting::until`]): jobs queued behind a
/// pipeline stuck on a dead Redis fail at their own deadline, not at the
/// stuck pipeline's plus their own. A publish that failed this way may
/// still have been stored (the error says so: retry with the same
/// idempotency key); the publish script refuses it once its deadline, plus
/// a slack for the measured clock offset, has passed in Redis' clock.
pub(super) async fn sequencer(
    shared: Arc<Shared>,
    cmd: Client,
    mut jobs: UnboundedReceiver<(u64, Job)>,
    events: UnboundedSender<Vec<BusEvent>>,
) {
    let timeout = shared.options.command_timeout;
    let late = timed_out(timeout);
    // WAIT counts only writes made on its own connection: a reconnect
    // between a pipeline and its WAIT would confirm nothing.
    let mut reconnects = cmd.reconnect_rx();
    let mut batch = Vec::new();
    while let Some(job) = jobs.recv().await {
        batch.push(job);
        while batch.len() < MAX_PIPELINE {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let now_us = unix_us();
        let now = Instant::now();
        let mut out = Vec::with_capacity(batch.len());
        let mut live = Vec::with_capacity(batch.len());
        let mut deadlines = Vec::with_capacity(batch.len());
        for (since_us, job) in batch.drain(..) {
            let waited = Duration::from_micros(now_us.saturating_sub(since_us));
            match timeout.checked_sub(waited).filter(|left| !left.is_zero()) {
                Some(left) => {
                    deadlines.push(now + left);
                    live.push(Some(job));
                }
                None => answer(&shared, job, Err(late.clone()), &mut out),
            }
        }
        if !live.is_empty() {
            let calls: Vec<Call> = live
                .iter()
                .flatten()
                .map(|j| job_call(&shared, j))
                .collect();
            // Each job is answered by its own deadline; the pipeline (and
            // the WAIT) is awaited for the others while any is waiting.
            let mut waiting = Waiting::new(live, deadlines);
            drain_reconnects(&mut reconnects);
            let pipeline = run_pipelined(&cmd, calls);
            let Ok(results) = waiting
                .until(pipeline, &late, &shared, &mut out, &events)
                .await
            else {
                return;
            };
            if let Some(results) = results {
                let mut results: Vec<Result<Value, String>> = results
                    .into_iter()
                    .map(|r| r.map_err(|e| e.to_string()))
                    .collect();
                let replicas = shared.options.wait_replicas;
                if replicas > 0 && waiting.any_stored(&results) {
                    // Only stored publishes wait for the replicas: answer
                    // the rest (presence, failed publishes) now.
                    for (slot, r) in waiting.live.iter_mut().zip(results.iter_mut()) {
                        if !stored(slot, r) {
                            if let Some(job) = slot.take() {
                                let r = std::mem::replace(r, Err(String::new()));
                                answer(&shared, job, r, &mut out);
                            }
                        }
                    }
                    let wait = wait_for_replicas(&cmd, replicas, waiting.last_deadline());
                    let unsure = not_confirmed(replicas, "none known (WAIT still running)");
                    let Ok(confirmed) = waiting
                        .until(wait, &unsure, &shared, &mut out, &events)
                        .await
                    else {
                        return;
                    };
                    let reconnected = drain_reconnects(&mut reconnects);
                    let failed = match confirmed {
                        // The writes and the WAIT may not share a connection.
                        Some(Ok(())) if reconnected => {
                            Some("none known (reconnected to Redis meanwhile)".to_string())
                        }
                        Some(Ok(())) => None,
                        Some(Err(confirmed)) => Some(confirmed),
                        None => None, // every job timed out meanwhile
                    };
                    if let Some(confirmed) = failed {
                        unconfirmed(replicas, &confirmed, &waiting.live, &mut results);
                    }
                }
                let live = std::mem::take(&mut waiting.live);
                for (job, r) in live.into_iter().zip(results) {
                    if let Some(job) = job {
                        answer(&shared, job, r, &mut out);
                    }
                }
            }
        }
        if !out.is_empty() && events.send(out).is_err() {
            return;
        }
    }
}

/// Jobs of one pipeline still waiting for their answer, each with its
/// deadline.
struct Waiting {
    live: Vec<Option<Job>>,
    deadlines: Vec<Instant>,
    /// Indices into `live` by deadline; `order[next..]` may still wait.
    order: Vec<usize>,
    next: usize,
}

impl Waiting {
    fn new(live: Vec<Option<Job>>, deadlines: Vec<Instant>) -> Self {
        let mut order: Vec<usize> = (0..live.len()).collect();
        order.sort_by_key(|&i| deadlines[i]);
        Waiting {
            live,
            deadlines,
            order,
            next: 0,
        }
    }

    /// Awaits `fut`, answering each waiting job whose deadline passes
    /// meanwhile with the error `late` (the answers go to the shard at
    /// once). `Ok(None)` when every job was answered that way first; `Err`
    /// when the shard is gone.
    async fn until<F: std::future::Future>(
        &mut self,
        fut: F,
        late: &str,
        shared: &Shared,
        out: &mut Vec<BusEvent>,
        events: &UnboundedSender<Vec<BusEvent>>,
    ) -> Result<Option<F::Output>, ()> {
        tokio::pin!(fut);
        loop {
            let now = Instant::now();
            while self.next < self.order.len() && self.deadlines[self.order[self.next]] <= now {
                if let Some(job) = self.live[self.order[self.next]].take() {
                    answer(shared, job, Err(late.to_string()), out);
                }
                self.next += 1;
            }
            if self.next == self.order.len() {
                return Ok(None);
            }
            if !out.is_empty() && events.send(std::mem::take(out)).is_err() {
                return Err(());
            }
            tokio::select! {
                r = &mut fut => return Ok(Some(r)),
                _ = tokio::time::sleep_until(self.deadlines[self.order[self.next]]) => {}
            }
        }
    }

    /// Whether a publish still waiting was stored.
    fn any_stored(&self, results: &[Result<Value, String>]) -> bool {
        self.live.iter().zip(results).any(|(j, r)| stored(j, r))
    }

    /// The latest deadline of a job still waiting.
    fn last_deadline(&self) -> Instant {
        self.order[self.next..]
            .iter()
            .map(|&i| self.deadlines[i])
            .max()
            .unwrap_or_else(Instant::now)
    }
}

/// `redis.wait_replicas`: the publishes of a pipeline are acknowledged
/// only once `replicas` replicas confirm them (Redis `WAIT`, which covers
/// every write sent before it on this connection), by `deadline` (jobs
/// whose own deadline comes first are answered then, see
/// [`Waiting::until`]). `Err` says how many did. Costs the replication
/// round trip per pipeline.
async fn wait_for_replicas(cmd: &Client, replicas: u32, deadline: Instant) -> Result<(), String> {
    // A tenth early, so that the count reaches us before the deadline.
    let left = deadline.saturating_duration_since(Instant::now());
    let left_ms = (left.as_millis() * 9 / 10).max(1) as i64;
    match cmd.wait::<i64>(i64::from(replicas), left_ms).await {
        Ok(n) if n >= i64::from(replicas) => Ok(()),
        Ok(n) => Err(n.to_string()),
        Err(e) => Err(format!("none known ({e})")),
    }
}

/// Fails the stored publishes of a pipeline that `replicas` replicas did
/// not confirm (`confirmed` says how many did).
fn unconfirmed(
    replicas: u32,
    confirmed: &str,
    jobs: &[Option<Job>],
    results: &mut [Result<Value, String>],
) {
    let why = not_confirmed(replicas, confirmed);
    for (j, r) in jobs.iter().zip(results.iter_mut()) {
        if stored(j, r) {
            *r = Err(why.clone());
        }
    }
}

/// A publish still waiting whose script stored it (it waits for WAIT).
fn stored(job: &Option<Job>, r: &Result<Value, String>) -> bool {
    matches!(job, Some(Job::Publish(_))) && r.is_ok()
}

/// Empties the reconnect notices; whether there was any.
fn drain_reconnects<T: Clone>(rx: &mut tokio::sync::broadcast::Receiver<T>) -> bool {
    let mut any = false;
    while !matches!(
        rx.try_recv(),
        Err(TryRecvError::Empty | TryRecvError::Closed)
    ) {
        any = true;
    }
    any
}

fn not_confirmed(replicas: u32, confirmed: &str) -> String {
    format!(
        "stored on the Redis primary but confirmed by {confirmed} of the {replicas} replicas redis.wait_replicas asks for within redis.command_timeout_ms; it may still be kept: retry with the same idempotency_key"
    )
}

fn timed_out(timeout: Duration) -> String {
    format!(
        "Redis did not answer within redis.command_timeout_ms ({} ms); a publish may still be stored: retry with the same idempotency_key",
        timeout.as_millis()
    )
}

/// Turns a job's result into what the shard is told (publishes, member
/// and channel queries are answered; presence and count updates are not).
fn answer(shared: &Shared, job: Job, r: Result<Value, String>, out: &mut Vec<BusEvent>) {
    match job {
        Job::Publish(job) => {
            let result = r.and_then(|v| parse_published(v).map_err(|e| e.to_string()));
            match &result {
                Ok(p) => shared.seen.record(&job.channel, *p),
                Err(e) => {
                    RedisStats::bump(&shared.stats.publish_errors);
                    tracing::debug!(channel = %job.channel, error = %e, "publish failed");
                }
            }
            out.push(BusEvent::Published {
                reply_to: job.reply_to,
                channel: job.channel,
                result: result.map_err(BusError::Unavailable),
            });
        }
        Job::Presence { channel, op, .. } => {
            // A failed join is redone by the next heartbeat; a failed
            // leave expires with its entry.
            if let Err(e) = r {
                tracing::debug!(channel = %channel, op, error = %e, "presence update failed");
            }
        }
        Job::Members { channel, request } => {
            let result = r
                .and_then(|v| parse_members(v).map_err(|e| e.to_string()))
                .map_err(BusError::Unavailable);
            out.push(BusEvent::Members {
                request,
                channel,
                result,
            });
        }
        Job::Count { counts } => {
            // A failed non-zero count is rewritten by the next heartbeat;
            // a failed 0 expires with the entry it meant to remove.
            if let Err(e) = r {
                tracing::debug!(channels = counts.len(), error = %e, "subscription count update failed");
            }
        }
        Job::Channels { query, request } => {
            let result = r
                .and_then(|v| parse_channels(shared, &query, v).map_err(|e| e.to_string()))
                .map_err(BusError::Unavailable);
            out.push(BusEvent::Channels { request, result });
        }
    }
}

/// What the sequencer runs, in order.
pub(super) enum Job {
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
    /// This shard's subscription counts (0: remove), one channel's or a
    /// heartbeat's refresh of many.
    Count {
        counts: Vec<(Arc<str>, u64)>,
    },
    Channels {
        query: ChannelQuery,
        request: u64,
    },
}

fn job_call(shared: &Shared, job: &Job) -> Call {
    match job {
        // This shard's subscription and what the node saw (which of two
        // epochs is the current one is not known here: the script checks
        // each against Redis).
        Job::Publish(p) => publish_call(shared, p, [p.seen, shared.seen.get(&p.channel)]),
        Job::Presence { channel, op, users } => presence_call(shared, channel, op, users),
        Job::Members { channel, .. } => presence_call(shared, channel, "members", &[]),
        Job::Count { counts } => count_call(shared, counts),
        Job::Channels { query, .. } => read_call(query),
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
        (shared.options.presence_ttl.as_millis().max(1) as u64).to_string(),
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
fn publish_call(shared: &Shared, job: &PublishJob, seen: [Option<Position>; 2]) -> Call {
    publish_args(
        shared,
        &job.channel,
        job.payload.clone(),
        &job.key,
        job.ingress_us,
        // The bound counts from when the publish reached the server.
        shared.deadline_us(job.ingress_us),
        seen,
    )
}

/// The publish script's keys and arguments. `seen` are positions of the
/// channel this node has seen (delivered, acknowledged): if Redis holds
/// less of either's epoch, it lost acknowledged publications, and the
/// script starts a new epoch instead of giving their offsets again.
pub fn publish_args(
    shared: &Shared,
    channel: &str,
    payload: Bytes,
    key: &IdemKey,
    ingress_us: u64,
    deadline_us: u64,
    seen: [Option<Position>; 2],
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
    let mut args = vec![
        Value::Bytes(payload),
        Value::from(shared.fresh_epoch()),
        Value::from(o.history_size.to_string()),
        Value::from(shared.ttl_ms().to_string()),
        Value::from((key_ttl.as_millis().max(1) as u64).to_string()),
        Value::from(ingress_us.to_string()),
        Value::from(keys::pubsub(channel)),
        Value::from(deadline_us.to_string()),
    ];
    for p in seen {
        args.extend(codec::seen_args(p));
    }
    (&scripts().publish, keys, args)
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
