//! The ingest consumer: executes backend publish commands added to the
//! stream `sc:ingest` (format in the module docs of `bus::redis`), each
//! once across all nodes, through the consumer group `shardcast`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::*;
use fred::types::Value;

use super::codec::{bytes_of, ingest_id_us};
use super::companion::{parse_published, publish_args, run_pipelined, Shared};
use super::keys::{IdemKey, INGEST_GROUP, INGEST_STREAM};
use super::RedisStats;
use crate::bus::unix_us;

/// How long one `XREADGROUP` waits for new entries.
pub const BLOCK: Duration = Duration::from_secs(2);
/// Entries per read.
const COUNT: u64 = 100;
/// Pause after a failure.
const BACKOFF: Duration = Duration::from_millis(500);
/// A command that keeps failing (not for lack of Redis) is dropped after
/// this many attempts by this node.
const MAX_ATTEMPTS: u32 = 5;
/// Longest idempotency key accepted in an entry.
const MAX_KEY_BYTES: usize = 256;

/// One parsed ingest command.
struct Command {
    channel: String,
    payload: Bytes,
    key: IdemKey,
    ingress_us: u64,
}

/// Why an entry was rejected.
fn parse_command(
    id: &str,
    fields: Option<Vec<Value>>,
    max_payload: usize,
) -> Result<Command, &'static str> {
    let fields = fields.ok_or("entry was deleted")?;
    if fields.len() % 2 != 0 || fields.len() > 16 {
        return Err("odd or too many fields");
    }
    let (mut channel, mut payload, mut key) = (None, None, None);
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = bytes_of(k).ok_or("field name")?;
        let v = bytes_of(v).ok_or("field value")?;
        match &k[..] {
            b"channel" => channel = Some(v),
            b"payload" => payload = Some(v),
            b"idempotency_key" => key = Some(v),
            _ => {}
        }
    }
    let channel = channel.ok_or("no channel")?;
    let channel = std::str::from_utf8(&channel).map_err(|_| "channel is not UTF-8")?;
    crate::protocol::channel::validate(channel).map_err(|_| "invalid channel name")?;
    let payload = payload.ok_or("no payload")?;
    if payload.len() > max_payload {
        return Err("payload too large");
    }
    let key = match key {
        Some(k) if k.is_empty() || k.len() > MAX_KEY_BYTES => {
            return Err("idempotency_key empty or too long")
        }
        Some(k) => IdemKey::Client(
            std::str::from_utf8(&k)
                .map_err(|_| "idempotency_key is not UTF-8")?
                .into(),
        ),
        None => IdemKey::IngestEntry(id.into()),
    };
    Ok(Command {
        channel: channel.to_string(),
        payload,
        key,
        ingress_us: ingest_id_us(id).unwrap_or_else(unix_us),
    })
}

/// `[id, [field, value, ...] | nil]` entries.
fn parse_entries(v: Value) -> Vec<(String, Option<Vec<Value>>)> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(mut parts) = e else { continue };
        if parts.len() != 2 {
            continue;
        }
        let fields = match parts.pop().expect("2") {
            Value::Array(f) => Some(f),
            _ => None,
        };
        let Some(id) = bytes_of(parts.pop().expect("2")) else {
            continue;
        };
        let Ok(id) = String::from_utf8(id.to_vec()) else {
            continue;
        };
        out.push((id, fields));
    }
    out
}

/// `XREADGROUP` reply: nil, or `[[stream, entries]]` (a map in RESP3).
fn parse_read(v: Value) -> Vec<(String, Option<Vec<Value>>)> {
    let streams = match v {
        Value::Array(a) => a,
        Value::Map(_) => v.into_array(),
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    // Either [[name, entries], ...] or the flattened [name, entries, ...].
    let mut it = streams.into_iter();
    while let Some(s) = it.next() {
        match s {
            Value::Array(mut pair) if pair.len() == 2 => {
                out.extend(parse_entries(pair.pop().expect("2")));
            }
            Value::Array(_) => {}
            _ => {
                if let Some(entries) = it.next() {
                    out.extend(parse_entries(entries));
                }
            }
        }
    }
    out
}

struct Consumer {
    shared: Arc<Shared>,
    cmd: Client,
    failures: HashMap<String, u32>,
}

impl Consumer {
    /// Executes entries in order; acknowledges the executed and the
    /// malformed ones. False if some must be retried.
    async fn process(&mut self, entries: Vec<(String, Option<Vec<Value>>)>) -> bool {
        if entries.is_empty() {
            return true;
        }
        let stats = &self.shared.stats;
        let mut ack: Vec<String> = Vec::new();
        let mut calls = Vec::new();
        let mut ids = Vec::new();
        for (id, fields) in entries {
            match parse_command(&id, fields, self.shared.options.max_payload_bytes) {
                Ok(c) => {
                    calls.push(publish_args(
                        &self.shared,
                        &c.channel,
                        // Stored as a plain publication body, as a native
                        // publish is (see `protocol::body`).
                        crate::protocol::body::plain(&c.payload),
                        &c.key,
                        c.ingress_us,
                        0,
                        // What this node saw of the channel: Redis holding
                        // less of it means lost history (see `publish_args`).
                        [None, self.shared.seen.get(&c.channel)],
                    ));
                    ids.push((id, std::sync::Arc::<str>::from(c.channel)));
                }
                Err(why) => {
                    RedisStats::bump(&stats.malformed);
                    tracing::warn!(entry = %id, reason = why, "malformed ingest entry dropped");
                    ack.push(id);
                }
            }
        }
        let mut all_ok = true;
        let results = run_pipelined(&self.cmd, calls).await;
        for ((id, channel), r) in ids.into_iter().zip(results) {
            match r
                .map_err(|e| e.to_string())
                .and_then(|v| parse_published(v).map_err(|e| e.to_string()))
            {
                Ok(position) => {
                    self.shared.seen.record(&channel, position);
                    RedisStats::bump(&stats.ingest_executed);
                    self.failures.remove(&id);
                    ack.push(id);
                }
                Err(e) => {
                    let n = self.failures.entry(id.clone()).or_insert(0);
                    *n += 1;
                    if *n >= MAX_ATTEMPTS {
                        tracing::error!(entry = %id, error = %e, "ingest entry failed {MAX_ATTEMPTS} times; dropped");
                        self.failures.remove(&id);
                        ack.push(id);
                    } else {
                        tracing::debug!(entry = %id, error = %e, "ingest entry failed; will retry");
                        all_ok = false;
                    }
                }
            }
        }
        if self.failures.len() > 10_000 {
            self.failures.clear();
        }
        if !ack.is_empty() {
            if let Err(e) = self
                .cmd
                .xack::<Value, _, _, _>(INGEST_STREAM, INGEST_GROUP, ack)
                .await
            {
                tracing::debug!(error = %e, "ingest XACK failed; entries will be retried");
                all_ok = false;
            }
        }
        all_ok
    }

    /// Takes over entries another consumer left pending too long.
    async fn claim(&mut self) {
        let node = self.shared.options.node_id.clone();
        let idle = self.shared.options.ingest_claim_idle.as_millis() as u64;
        let mut start = "0-0".to_string();
        for _ in 0..16 {
            let reply = self
                .cmd
                .xautoclaim::<Value, _, _, _, _>(
                    INGEST_STREAM,
                    INGEST_GROUP,
                    node.as_str(),
                    idle,
                    start.as_str(),
                    Some(COUNT),
                    false,
                )
                .await;
            let Ok(Value::Array(parts)) = reply else {
                return;
            };
            let mut it = parts.into_iter();
            let next = it.next().and_then(bytes_of);
            let entries = parse_entries(it.next().unwrap_or(Value::Null));
            for _ in &entries {
                RedisStats::bump(&self.shared.stats.ingest_claimed);
            }
            if !entries.is_empty() {
                tracing::info!(count = entries.len(), "took over pending ingest entries");
            }
            if !self.process(entries).await {
                return;
            }
            match next {
                Some(n) if &n[..] != b"0-0" => start = String::from_utf8_lossy(&n).into_owned(),
                _ => return,
            }
        }
    }
}

async fn ensure_group(cmd: &Client) {
    loop {
        match cmd
            .xgroup_create::<Value, _, _, _>(INGEST_STREAM, INGEST_GROUP, "0", true)
            .await
        {
            Ok(_) => return,
            Err(e) if e.details().starts_with("BUSYGROUP") => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the ingest consumer group; retrying");
                tokio::time::sleep(BACKOFF * 2).await;
            }
        }
    }
}

/// The consumer loop (runs until the companion stops it).
pub async fn run(shared: Arc<Shared>, reader: Client, cmd: Client) {
    ensure_group(&cmd).await;
    let node = shared.options.node_id.clone();
    let claim_every = (shared.options.ingest_claim_idle / 2).max(Duration::from_millis(100));
    let mut consumer = Consumer {
        shared,
        cmd,
        failures: HashMap::new(),
    };
    // First our own pending entries (a restart under the same node id),
    // then new ones.
    let mut own_pending = true;
    let mut last_claim: Option<Instant> = None;
    loop {
        if last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
            consumer.claim().await;
            last_claim = Some(Instant::now());
        }
        let (id, block) = if own_pending {
            ("0", None)
        } else {
            (">", Some(BLOCK.as_millis() as u64))
        };
        let reply = reader
            .xreadgroup::<Value, _, _, _, _>(
                INGEST_GROUP,
                node.as_str(),
                Some(COUNT),
                block,
                false,
                INGEST_STREAM,
                id,
            )
            .await;
        match reply {
            Ok(v) => {
                let entries = parse_read(v);
                if own_pending && entries.is_empty() {
                    own_pending = false;
                }
                if !consumer.process(entries).await {
                    own_pending = true;
                    tokio::time::sleep(BACKOFF).await;
                }
            }
            Err(e) => {
                if e.details().starts_with("NOGROUP") {
                    ensure_group(&consumer.cmd).await;
                } else {
                    tracing::debug!(error = %e, "ingest read failed");
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(kv: &[(&str, &str)]) -> Option<Vec<Value>> {
        Some(
            kv.iter()
                .flat_map(|(k, v)| [Value::from(*k), Value::from(*v)])
                .collect(),
        )
    }

    #[test]
    fn commands_parse_or_are_rejected() {
        let c = parse_command(
            "1700000000000-3",
            fields(&[("channel", "room:1"), ("payload", "hi")]),
            100,
        )
        .unwrap();
        assert_eq!(c.channel, "room:1");
        assert_eq!(&c.payload[..], b"hi");
        assert_eq!(c.key, IdemKey::IngestEntry("1700000000000-3".into()));
        assert_eq!(c.ingress_us, 1_700_000_000_000_000);
        let c = parse_command(
            "1-0",
            fields(&[("channel", "a"), ("payload", ""), ("idempotency_key", "k")]),
            100,
        )
        .unwrap();
        assert_eq!(c.key, IdemKey::Client("k".into()));
        for bad in [
            None,
            fields(&[("payload", "x")]),
            fields(&[("channel", "a")]),
            fields(&[("channel", "bad name"), ("payload", "x")]),
            fields(&[("channel", "a"), ("payload", "x"), ("idempotency_key", "")]),
            fields(&[("channel", "a"), ("payload", &"x".repeat(101))]),
            Some(vec![Value::from("channel")]),
        ] {
            assert!(parse_command("1-0", bad.clone(), 100).is_err(), "{bad:?}");
        }
    }
}
