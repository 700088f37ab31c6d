//! The in-process bus: shards of one process, no Redis.
//!
//! Every channel has an *owner* shard (a hash of its name). The owner is the
//! channel's sequencer: it assigns offsets in arrival order, remembers which
//! shards have subscribers, and forwards each tick's publications for a
//! channel to those shards as one shared batch. Because every hop is a FIFO
//! channel, a shard sees a channel's `Subscribed` answer before any
//! publication sequenced after it, which is what makes "no gap, no
//! duplicate" hold without locks.
//!
//! The owner of a presence channel (`presence-*`) also keeps its member
//! list: for each user, the shards on which it has at least one subscribed
//! connection (shards report only their own first-joined / last-left
//! transitions). A user is announced as joined when its first shard
//! arrives and as left when its last shard goes, through the same hops and
//! after the publications sequenced before the change, so every shard sees
//! presence changes in order with the channel's publications. A channel
//! with members is never retired.
//!
//! Hops are `tokio::sync::mpsc` channels (they wake monoio tasks across
//! threads) carrying one `Vec` per destination per tick. A shard's requests
//! to the channels it owns itself take the same path, through its own
//! inbox: the owner then sequences every request in the order it was
//! flushed, whoever sent it. With shards flushing their requests before
//! writing the replies those requests caused, that order respects
//! causality across shards: a client that sees the reply to one request
//! and then sends another, on any shard, gets them sequenced in that order
//! (otherwise a shard's own later request could overtake an earlier one
//! from another shard waiting in its inbox — e.g. a user's leave on one
//! shard overtaking its join on another, announcing a leave and a join for
//! a user who never left).
//!
//! This file holds the shard's handle and how it handles each message;
//! `channel` is one owned channel's state (offsets, history, idempotency
//! keys, members), `retention` the bounds and the shard-wide eviction
//! order.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{Bus, BusEvent, ChannelQuery, History, Position, Publication, ReplyTo};

mod channel;
mod retention;

use channel::{front_offset, read_history, Owned};
use retention::{cost, key_cost, Entry, Kind, Retained};
pub use retention::{Retention, ENTRY_OVERHEAD, KEY_OVERHEAD};

enum Envelope {
    // To the owner.
    Publish {
        channel: Arc<str>,
        payload: Bytes,
        key: Option<Box<str>>,
        from: u16,
        reply_to: ReplyTo,
        ingress_us: u64,
    },
    Interest {
        channel: Arc<str>,
        from: u16,
        on: bool,
    },
    HistoryRead {
        channel: Arc<str>,
        after: Position,
        from: u16,
        request: u64,
    },
    /// `from`'s first connection of `user` joined, or its last one left.
    Presence {
        channel: Arc<str>,
        user: Arc<str>,
        from: u16,
        joined: bool,
    },
    MembersRead {
        channel: Arc<str>,
        from: u16,
        request: u64,
    },
    /// `from`'s subscription count of `channel` is now `count`.
    Count {
        channel: Arc<str>,
        from: u16,
        count: u64,
    },
    /// Asks a shard for the counts of the channels it owns that `query`
    /// names.
    CountRead {
        query: ChannelQuery,
        from: u16,
        request: u64,
    },
    // From the owner.
    CountAnswer {
        request: u64,
        channels: Vec<(Arc<str>, u64)>,
    },
    Deliver {
        channel: Arc<str>,
        epoch: u64,
        items: Arc<[Publication]>,
    },
    Subscribed {
        channel: Arc<str>,
        position: Position,
    },
    Published {
        reply_to: ReplyTo,
        channel: Arc<str>,
        position: Position,
    },
    HistoryAnswer {
        request: u64,
        channel: Arc<str>,
        result: History,
    },
    PresenceChanged {
        channel: Arc<str>,
        user: Arc<str>,
        joined: bool,
    },
    MembersAnswer {
        request: u64,
        channel: Arc<str>,
        users: Vec<Arc<str>>,
    },
}

/// Channels with their subscription counts, as [`BusEvent::Channels`]
/// carries them.
type ChannelCounts = Vec<(Arc<str>, u64)>;

/// One shard's handle on the in-process bus.
pub struct LocalBus {
    me: u16,
    peers: Vec<UnboundedSender<Vec<Envelope>>>,
    inbox: UnboundedReceiver<Vec<Envelope>>,
    outgoing: Vec<Vec<Envelope>>,
    owned: HashMap<Arc<str>, Owned>,
    /// Owned channels with publications pending this tick.
    dirty: Vec<Arc<str>>,
    epoch_seed: u64,
    epoch_counter: u64,
    retention: Retention,
    retained: Retained,
    last_expiry: Instant,
    /// Owned channels' subscription counts, per shard with subscribers.
    counts: HashMap<Arc<str>, HashMap<u16, u64>>,
    /// Channel queries this shard asked, waiting for every owner's answer:
    /// shards left to answer, what they answered so far.
    count_reads: HashMap<u64, (usize, ChannelCounts)>,
}

impl LocalBus {
    /// Builds one connected handle per shard.
    pub fn cluster(shards: usize, retention: Retention) -> Vec<LocalBus> {
        assert!(
            (1..=u16::MAX as usize).contains(&shards),
            "shard count out of range"
        );
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| unbounded_channel()).unzip();
        // std's RandomState is seeded from the OS; it gives each process a
        // different epoch space without pulling in a random number crate.
        let seed = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        receivers
            .into_iter()
            .enumerate()
            .map(|(i, inbox)| LocalBus {
                me: i as u16,
                peers: senders.clone(),
                inbox,
                outgoing: (0..shards).map(|_| Vec::new()).collect(),
                owned: HashMap::new(),
                dirty: Vec::new(),
                epoch_seed: seed ^ ((i as u64) << 48),
                epoch_counter: 0,
                retention,
                retained: Retained::default(),
                last_expiry: Instant::now(),
                counts: HashMap::new(),
                count_reads: HashMap::new(),
            })
            .collect()
    }

    fn owner_of(&self, channel: &str) -> u16 {
        // A fixed-key hasher: every shard must agree on the owner.
        let mut h = std::hash::DefaultHasher::new();
        channel.hash(&mut h);
        (h.finish() % self.peers.len() as u64) as u16
    }

    /// Queues a request for `to` (possibly this shard: see the module
    /// docs) until the next flush.
    fn send(&mut self, to: u16, env: Envelope) {
        self.outgoing[to as usize].push(env);
    }

    /// Sends to a shard from inside `poll_events`: messages for this shard
    /// become events at once.
    fn route(&mut self, to: u16, env: Envelope, out: &mut Vec<BusEvent>) {
        if to == self.me {
            self.handle(env, out);
        } else {
            self.outgoing[to as usize].push(env);
        }
    }

    fn next_epoch(&mut self) -> u64 {
        self.epoch_counter += 1;
        // Mixing keeps epochs of successive channel lifetimes far apart.
        let x = self
            .epoch_seed
            .wrapping_add(self.epoch_counter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let x = (x ^ (x >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (x ^ (x >> 29)) | 1
    }

    fn owned_mut(&mut self, channel: &Arc<str>) -> &mut Owned {
        if !self.owned.contains_key(channel) {
            let epoch = self.next_epoch();
            self.owned.insert(
                channel.clone(),
                Owned {
                    epoch,
                    last_offset: 0,
                    interested: Vec::new(),
                    pending: Vec::new(),
                    history: VecDeque::new(),
                    last_publish: Instant::now(),
                    keys: HashMap::new(),
                    key_order: VecDeque::new(),
                    members: HashMap::new(),
                },
            );
        }
        self.owned.get_mut(channel).expect("inserted above")
    }

    fn handle(&mut self, env: Envelope, out: &mut Vec<BusEvent>) {
        match env {
            Envelope::Publish {
                channel,
                payload,
                key,
                from,
                reply_to,
                ingress_us,
            } => {
                let now = super::unix_us();
                if key.is_some() {
                    let ttl = self.retention.idempotency_ttl;
                    let (bytes, n) = self.owned_mut(&channel).expire_keys(ttl);
                    self.retained.bytes -= bytes;
                    self.retained.live -= n;
                }
                let ch = self.owned_mut(&channel);
                let offset = match key.as_deref().and_then(|k| ch.keys.get(k)) {
                    // A retry of a publish we already stored: answer with the
                    // original position and store nothing.
                    Some(&offset) => offset,
                    None => {
                        ch.last_offset += 1;
                        ch.last_publish = Instant::now();
                        let offset = ch.last_offset;
                        ch.pending.push(Publication {
                            offset,
                            published_us: now,
                            ingress_us,
                            payload,
                        });
                        let epoch = ch.epoch;
                        let first = ch.pending.len() == 1;
                        if let Some(key) = key {
                            let cost = key_cost(&key);
                            ch.keys.insert(key.clone(), offset);
                            ch.key_order.push_back((key, offset, Instant::now()));
                            self.retained.bytes += cost;
                            self.retained.live += 1;
                            self.retained.order.push_back(Entry {
                                channel: channel.clone(),
                                epoch,
                                offset,
                                kind: Kind::Key,
                            });
                        }
                        if first {
                            self.dirty.push(channel.clone());
                        }
                        self.evict_over_budget();
                        offset
                    }
                };
                let epoch = self.owned[&channel].epoch;
                self.route(
                    from,
                    Envelope::Published {
                        reply_to,
                        channel,
                        position: Position { epoch, offset },
                    },
                    out,
                );
            }
            Envelope::Interest { channel, from, on } => {
                // Forward what was sequenced before this interest change to
                // the shards interested until now, so the answer below
                // separates old from new exactly.
                self.forward(&channel, out);
                let ch = self.owned_mut(&channel);
                if on {
                    if !ch.interested.contains(&from) {
                        ch.interested.push(from);
                    }
                    let position = Position {
                        epoch: ch.epoch,
                        offset: ch.last_offset,
                    };
                    self.route(from, Envelope::Subscribed { channel, position }, out);
                } else {
                    ch.interested.retain(|&s| s != from);
                    // A shard without subscribers has no members either:
                    // whatever it did not report as left is gone now.
                    let stale: Vec<Arc<str>> = ch
                        .members
                        .iter()
                        .filter(|(_, shards)| shards.contains(&from))
                        .map(|(user, _)| user.clone())
                        .collect();
                    for user in stale {
                        self.handle(
                            Envelope::Presence {
                                channel: channel.clone(),
                                user,
                                from,
                                joined: false,
                            },
                            out,
                        );
                    }
                    self.retire_if_unused(&channel);
                }
            }
            Envelope::HistoryRead {
                channel,
                after,
                from,
                request,
            } => {
                // Everything sequenced so far goes out first, so the answer
                // reaches `from` after every publication it covers.
                self.forward(&channel, out);
                let result = match self.owned.get(&channel) {
                    Some(ch) => read_history(ch, after, self.retention.page_bytes),
                    // Never published or forgotten: nothing to continue from.
                    None => History::Lost {
                        current: Position {
                            epoch: 0,
                            offset: 0,
                        },
                    },
                };
                self.route(
                    from,
                    Envelope::HistoryAnswer {
                        request,
                        channel,
                        result,
                    },
                    out,
                );
            }
            Envelope::Presence {
                channel,
                user,
                from,
                joined,
            } => {
                if !joined && !self.owned.contains_key(&channel) {
                    return; // nothing known: nobody to announce a leave to
                }
                // Publications sequenced before this change go out first,
                // so the event keeps its place in the channel's order.
                self.forward(&channel, out);
                let ch = self.owned_mut(&channel);
                if ch.apply_presence(&user, from, joined) {
                    let targets = ch.interested.clone();
                    for to in targets {
                        self.route(
                            to,
                            Envelope::PresenceChanged {
                                channel: channel.clone(),
                                user: user.clone(),
                                joined,
                            },
                            out,
                        );
                    }
                }
                if !joined {
                    self.retire_if_unused(&channel);
                }
            }
            Envelope::MembersRead {
                channel,
                from,
                request,
            } => {
                let users = self
                    .owned
                    .get(&channel)
                    .map(Owned::member_list)
                    .unwrap_or_default();
                self.route(
                    from,
                    Envelope::MembersAnswer {
                        request,
                        channel,
                        users,
                    },
                    out,
                );
            }
            Envelope::Count {
                channel,
                from,
                count,
            } => {
                if count == 0 {
                    if let Some(per_shard) = self.counts.get_mut(&channel) {
                        per_shard.remove(&from);
                        if per_shard.is_empty() {
                            self.counts.remove(&channel);
                        }
                    }
                } else {
                    self.counts.entry(channel).or_default().insert(from, count);
                }
            }
            Envelope::CountRead {
                query,
                from,
                request,
            } => {
                let total = |per_shard: &HashMap<u16, u64>| per_shard.values().sum::<u64>();
                let channels = match &query {
                    ChannelQuery::One(name) => {
                        vec![(name.clone(), self.counts.get(name).map_or(0, total))]
                    }
                    ChannelQuery::Prefix(prefix) => self
                        .counts
                        .iter()
                        .filter(|(name, _)| name.starts_with(&**prefix))
                        .map(|(name, per_shard)| (name.clone(), total(per_shard)))
                        .collect(),
                };
                self.route(from, Envelope::CountAnswer { request, channels }, out);
            }
            Envelope::CountAnswer { request, channels } => {
                let Some((left, got)) = self.count_reads.get_mut(&request) else {
                    return;
                };
                got.extend(channels);
                *left -= 1;
                if *left == 0 {
                    let (_, mut got) = self.count_reads.remove(&request).expect("looked up");
                    got.sort_by(|a, b| a.0.cmp(&b.0));
                    out.push(BusEvent::Channels {
                        request,
                        result: Ok(got),
                    });
                }
            }
            Envelope::PresenceChanged {
                channel,
                user,
                joined,
            } => out.push(BusEvent::Presence {
                channel,
                user,
                joined,
            }),
            Envelope::MembersAnswer {
                request,
                channel,
                users,
            } => out.push(BusEvent::Members {
                request,
                channel,
                result: Ok(users),
            }),
            Envelope::HistoryAnswer {
                request,
                channel,
                result,
            } => out.push(BusEvent::History {
                request,
                channel,
                result,
            }),
            Envelope::Deliver {
                channel,
                epoch,
                items,
            } => out.push(BusEvent::Publications {
                channel,
                epoch,
                items,
            }),
            Envelope::Subscribed { channel, position } => {
                out.push(BusEvent::Subscribed { channel, position })
            }
            Envelope::Published {
                reply_to,
                channel,
                position,
            } => out.push(BusEvent::Published {
                reply_to,
                channel,
                result: Ok(position),
            }),
        }
    }

    /// Sends a channel's pending publications to every interested shard as
    /// one shared batch.
    fn forward(&mut self, channel: &Arc<str>, out: &mut Vec<BusEvent>) {
        let Some(ch) = self.owned.get_mut(channel) else {
            return;
        };
        if ch.pending.is_empty() {
            return;
        }
        let keep = self.retention.size;
        if keep > 0 {
            for p in &ch.pending {
                ch.history.push_back(p.clone());
                self.retained.bytes += cost(p);
                self.retained.live += 1;
                self.retained.order.push_back(Entry {
                    channel: channel.clone(),
                    epoch: ch.epoch,
                    offset: p.offset,
                    kind: Kind::Publication,
                });
            }
            while ch.history.len() > keep {
                if let Some(p) = ch.history.pop_front() {
                    self.retained.bytes -= cost(&p);
                    self.retained.live -= 1;
                }
            }
        }
        let items: Arc<[Publication]> = ch.pending.drain(..).collect();
        let epoch = ch.epoch;
        let targets = ch.interested.clone();
        for to in targets {
            self.route(
                to,
                Envelope::Deliver {
                    channel: channel.clone(),
                    epoch,
                    items: items.clone(),
                },
                out,
            );
        }
        self.evict_over_budget();
    }

    /// Drops the oldest retained publications, across channels, until the
    /// shard is within `Retention::max_bytes`. A channel keeps its epoch and
    /// offsets: recovery from a dropped position answers `Lost` (the next
    /// publication is gone), never a silent gap.
    fn evict_over_budget(&mut self) {
        let r = &mut self.retained;
        while r.bytes > self.retention.max_bytes {
            let Some(e) = r.order.pop_front() else {
                break;
            };
            let Some(ch) = self.owned.get_mut(&e.channel) else {
                continue;
            };
            if ch.epoch != e.epoch || front_offset(ch, e.kind) != Some(e.offset) {
                continue; // already gone
            }
            match e.kind {
                Kind::Publication => {
                    if let Some(p) = ch.history.pop_front() {
                        r.bytes -= cost(&p);
                    }
                }
                Kind::Key => r.bytes -= ch.pop_key(),
            }
            r.live -= 1;
        }
        if r.order.len() > 1024 && r.order.len() > 2 * r.live {
            let owned = &self.owned;
            r.order.retain(|e| {
                owned.get(&e.channel).is_some_and(|ch| {
                    ch.epoch == e.epoch && front_offset(ch, e.kind).is_some_and(|f| f <= e.offset)
                })
            });
        }
    }

    /// Accounts for a channel's history and keys leaving with the channel.
    fn forget(retained: &mut Retained, ch: &Owned) {
        retained.bytes -= ch.history.iter().map(cost).sum::<usize>();
        retained.bytes -= ch.key_order.iter().map(|k| key_cost(&k.0)).sum::<usize>();
        retained.live -= ch.history.len() + ch.key_order.len();
    }

    /// A channel nobody listens to and without history worth keeping needs
    /// no state: the next publish starts a new epoch, which tells recovering
    /// clients honestly that what came before is gone.
    fn retire_if_unused(&mut self, channel: &Arc<str>) {
        let ttl = self.retention.ttl;
        if self.owned.get(channel).is_some_and(|ch| !ch.in_use(ttl)) {
            if let Some(ch) = self.owned.remove(channel) {
                Self::forget(&mut self.retained, &ch);
            }
        }
    }

    /// Forgets unwatched channels whose history expired; at most once a
    /// second, so the cost does not grow with the publish rate.
    fn expire(&mut self) {
        if self.last_expiry.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_expiry = Instant::now();
        let ttl = self.retention.ttl;
        let key_ttl = self.retention.idempotency_ttl;
        let retained = &mut self.retained;
        self.owned.retain(|_, ch| {
            let (bytes, n) = ch.expire_keys(key_ttl);
            retained.bytes -= bytes;
            retained.live -= n;
            let keep = !ch.interested.is_empty()
                || !ch.pending.is_empty()
                || !ch.members.is_empty()
                || !ch.keys.is_empty()
                || ch.last_publish.elapsed() < ttl;
            if !keep {
                Self::forget(retained, ch);
            }
            keep
        });
    }
}

impl Bus for LocalBus {
    fn publish(
        &mut self,
        channel: &str,
        payload: Bytes,
        idempotency_key: Option<&str>,
        reply_to: ReplyTo,
        ingress_us: u64,
    ) {
        let owner = self.owner_of(channel);
        let env = Envelope::Publish {
            channel: Arc::from(channel),
            payload,
            key: idempotency_key.map(Box::from),
            from: self.me,
            reply_to,
            ingress_us,
        };
        self.send(owner, env);
    }

    fn subscribe(&mut self, channel: &str) {
        let owner = self.owner_of(channel);
        let env = Envelope::Interest {
            channel: Arc::from(channel),
            from: self.me,
            on: true,
        };
        self.send(owner, env);
    }

    fn history(&mut self, channel: &str, after: Position, request: u64) {
        let owner = self.owner_of(channel);
        let env = Envelope::HistoryRead {
            channel: Arc::from(channel),
            after,
            from: self.me,
            request,
        };
        self.send(owner, env);
    }

    fn unsubscribe(&mut self, channel: &str) {
        let owner = self.owner_of(channel);
        let env = Envelope::Interest {
            channel: Arc::from(channel),
            from: self.me,
            on: false,
        };
        self.send(owner, env);
    }

    fn presence(&mut self, channel: &str, user: &str, joined: bool) {
        let owner = self.owner_of(channel);
        let env = Envelope::Presence {
            channel: Arc::from(channel),
            user: Arc::from(user),
            from: self.me,
            joined,
        };
        self.send(owner, env);
    }

    fn presence_members(&mut self, channel: &str, request: u64) {
        let owner = self.owner_of(channel);
        let env = Envelope::MembersRead {
            channel: Arc::from(channel),
            from: self.me,
            request,
        };
        self.send(owner, env);
    }

    fn subscription_count(&mut self, channel: &str, count: u64) {
        let owner = self.owner_of(channel);
        let env = Envelope::Count {
            channel: Arc::from(channel),
            from: self.me,
            count,
        };
        self.send(owner, env);
    }

    fn channels(&mut self, query: ChannelQuery, request: u64) {
        // One channel: its owner answers. A prefix: every shard answers for
        // the channels it owns, and this shard merges the answers.
        let owners: Vec<u16> = match &query {
            ChannelQuery::One(name) => vec![self.owner_of(name)],
            ChannelQuery::Prefix(_) => (0..self.peers.len() as u16).collect(),
        };
        self.count_reads.insert(request, (owners.len(), Vec::new()));
        for owner in owners {
            let env = Envelope::CountRead {
                query: query.clone(),
                from: self.me,
                request,
            };
            self.send(owner, env);
        }
    }

    fn flush(&mut self) {
        for to in 0..self.outgoing.len() {
            if self.outgoing[to].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.outgoing[to]);
            // A closed inbox means that shard has stopped (process exit);
            // there is nobody left to deliver to.
            let _ = self.peers[to].send(batch);
        }
    }

    fn poll_events(&mut self, cx: &mut Context<'_>, out: &mut Vec<BusEvent>) -> Poll<()> {
        let mut progressed = false;
        while let Poll::Ready(Some(batch)) = self.inbox.poll_recv(cx) {
            progressed = true;
            for env in batch {
                self.handle(env, out);
            }
        }
        let dirty = std::mem::take(&mut self.dirty);
        for channel in &dirty {
            self.forward(channel, out);
            self.retire_if_unused(channel);
        }
        self.dirty = dirty;
        self.dirty.clear();
        self.expire();
        if progressed {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests;
