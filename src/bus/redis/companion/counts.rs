//! Subscription counts across nodes (`Bus::subscription_count`,
//! `Bus::channels`), kept like presence: each shard's companion writes its
//! own count per channel as an entry that expires `redis.presence_ttl_ms`
//! after it was last written, and rewrites every non-zero one with its
//! presence heartbeat (every third of that). A dead node's counts therefore
//! stop counting within the TTL (reads ignore expired entries and sweep
//! them out), and counts whose write failed while Redis was unreachable, or
//! that Redis lost, are back with the next heartbeat after it returns.
//!
//! Updates and queries are sequencer jobs (`sequencer::Job::Count`,
//! `Job::Channels`), so a query runs after every count this shard reported
//! before asking, and fails with the other jobs at `redis.command_timeout_ms`
//! when Redis does not answer. The keys and scripts: `keys::counts`,
//! `keys::count_expiries`, `keys::COUNTED_CHANNELS`, `scripts::COUNT_BODY`,
//! `scripts::COUNTS_READ_BODY`.

use std::sync::Arc;

use fred::types::Value;

use super::pipeline::Call;
use super::sequencer::Job;
use super::{Companion, Shared};
use crate::bus::redis::codec::{self, bytes_of, u64_of};
use crate::bus::redis::scripts::scripts;
use crate::bus::redis::{keys, RedisStats};
use crate::bus::ChannelQuery;

/// Most channels one heartbeat refresh call carries: bounds the time one
/// script holds Redis, while a shard with many channels still refreshes
/// them in few round trips.
const REFRESH_CHUNK: usize = 128;

impl Companion {
    /// The shard's count of `channel` is now `count`.
    pub(super) fn on_count(&mut self, channel: Arc<str>, count: u64) {
        if count == 0 {
            self.counts.remove(&channel);
        } else {
            self.counts.insert(channel.clone(), count);
        }
        self.queue(Job::Count {
            counts: vec![(channel, count)],
        });
    }

    /// The shard lost interest in `channel`: a count it did not take back
    /// (it reports 0 first; this covers a shard that did not) goes now.
    pub(super) fn forget_count(&mut self, channel: &Arc<str>) {
        if self.counts.remove(channel).is_some() {
            self.queue(Job::Count {
                counts: vec![(channel.clone(), 0)],
            });
        }
    }

    /// Rewrites every non-zero count of this shard with a new expiry (the
    /// presence heartbeat).
    pub(super) fn refresh_counts(&mut self) {
        let all: Vec<(Arc<str>, u64)> = self.counts.iter().map(|(c, n)| (c.clone(), *n)).collect();
        for chunk in all.chunks(REFRESH_CHUNK) {
            self.queue(Job::Count {
                counts: chunk.to_vec(),
            });
        }
    }
}

fn ttl_ms(shared: &Shared) -> String {
    (shared.options.presence_ttl.as_millis().max(1) as u64).to_string()
}

/// The count script's keys and arguments for `counts` of this instance.
pub(super) fn count_call(shared: &Shared, counts: &[(Arc<str>, u64)]) -> Call {
    let mut keys = Vec::with_capacity(1 + 2 * counts.len());
    keys.push(keys::COUNTED_CHANNELS.to_string());
    let mut args = Vec::with_capacity(2 + 2 * counts.len());
    args.push(Value::from(ttl_ms(shared)));
    args.push(Value::from(shared.instance.as_str()));
    for (channel, count) in counts {
        keys.push(keys::counts(channel));
        keys.push(keys::count_expiries(channel));
        args.push(Value::from(&**channel));
        args.push(Value::from(count.to_string()));
    }
    (&scripts().count, keys, args)
}

/// The read script's keys and arguments for `query`.
pub(super) fn read_call(query: &ChannelQuery) -> Call {
    let index = keys::COUNTED_CHANNELS.to_string();
    let (keys, args) = match query {
        ChannelQuery::One(channel) => (
            vec![index, keys::counts(channel), keys::count_expiries(channel)],
            vec![Value::from("one"), Value::from(&**channel)],
        ),
        ChannelQuery::Prefix(prefix) => (
            vec![index],
            vec![Value::from("prefix"), Value::from(&**prefix)],
        ),
    };
    (&scripts().counts_read, keys, args)
}

/// The read script's reply as the answer to `query`: channels sorted by
/// name, each once. Redis payloads are untrusted: in a prefix answer, an
/// entry whose name is not a valid channel name starting with the prefix,
/// or whose total is not a positive number, is dropped and counted as
/// malformed.
pub(super) fn parse_channels(
    shared: &Shared,
    query: &ChannelQuery,
    v: Value,
) -> Result<Vec<(Arc<str>, u64)>, codec::Malformed> {
    let prefix = match query {
        ChannelQuery::One(channel) => {
            let total = u64_of(&v).ok_or(codec::Malformed::Reply("channel count"))?;
            return Ok(vec![(channel.clone(), total)]);
        }
        ChannelQuery::Prefix(prefix) => prefix,
    };
    let list = match v {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        _ => return Err(codec::Malformed::Reply("channel list")),
    };
    let mut out: Vec<(Arc<str>, u64)> = Vec::with_capacity(list.len() / 2);
    let mut it = list.into_iter();
    while let (Some(name), Some(total)) = (it.next(), it.next()) {
        let total = u64_of(&total).filter(|&n| n > 0);
        let name = bytes_of(name).and_then(|b| String::from_utf8(b.to_vec()).ok());
        match (name, total) {
            (Some(name), Some(total))
                if name.starts_with(&**prefix)
                    && crate::protocol::channel::validate(&name).is_ok() =>
            {
                out.push((Arc::from(name), total));
            }
            _ => {
                RedisStats::bump(&shared.stats.malformed);
                tracing::warn!(prefix = %prefix, "malformed subscription count in redis skipped");
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}
