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

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{Bus, BusEvent, History, Position, Publication, ReplyTo};

/// What one remembered idempotency key costs besides its bytes (its map
/// entry and its place in the channel's and the shard's order; measured
/// sizes, rounded up).
pub const KEY_OVERHEAD: usize = 96;

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
    // From the owner.
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

/// How much history the local bus keeps per channel.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Publications kept per channel (0 = none: recovery then only
    /// succeeds when nothing was missed).
    pub size: usize,
    /// A channel nobody subscribes to is forgotten this long after its last
    /// publication.
    pub ttl: Duration,
    /// Bytes of history this shard keeps over all the channels it owns
    /// (payloads plus [`ENTRY_OVERHEAD`] each); over it the oldest
    /// publications, whatever their channel, are dropped first.
    pub max_bytes: usize,
    /// Payload bytes one history answer carries at most (at least one
    /// publication): a recovering client reads its history in pages of
    /// about its outbound budget, so a catch-up never holds more of it.
    pub page_bytes: usize,
    /// How long an idempotency key is remembered after the publish that
    /// stored it (`history.idempotency_ttl_secs`, as on the Redis bus).
    /// Keys count against `max_bytes` with the history ([`KEY_OVERHEAD`]
    /// each) and go oldest first with it.
    pub idempotency_ttl: Duration,
}

/// What one retained publication costs besides its payload: the
/// `Publication` in its channel's history and its slot in the shard's
/// eviction order (measured sizes, rounded up).
pub const ENTRY_OVERHEAD: usize = 96;

/// The shard's retained history and idempotency keys in the order they
/// were stored, for evicting the oldest first across channels. Entries
/// whose publication or key already left its channel (trimmed to
/// `Retention::size`, expired, channel forgotten) are skipped when
/// reached, and compacted away once they outnumber the live ones.
#[derive(Default)]
struct Retained {
    bytes: usize,
    live: usize,
    order: VecDeque<Entry>,
}

/// A publication (or the idempotency key of one) in the eviction order.
struct Entry {
    channel: Arc<str>,
    epoch: u64,
    offset: u64,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Publication,
    Key,
}

fn key_cost(key: &str) -> usize {
    key.len() + KEY_OVERHEAD
}

fn cost(p: &Publication) -> usize {
    p.payload.len() + ENTRY_OVERHEAD
}

/// Sequencer state for a channel this shard owns.
struct Owned {
    epoch: u64,
    last_offset: u64,
    /// Shards with at least one subscriber.
    interested: Vec<u16>,
    /// Publications sequenced this tick, not yet forwarded.
    pending: Vec<Publication>,
    /// The newest `Retention::size` publications, oldest first.
    history: VecDeque<Publication>,
    last_publish: Instant,
    /// Idempotency keys and the offset each stored, remembered for
    /// `Retention::idempotency_ttl`.
    keys: HashMap<Box<str>, u64>,
    /// The same keys oldest first, with the offset and when.
    key_order: VecDeque<(Box<str>, u64, Instant)>,
    /// Presence: for each present user, the shards where it has at least
    /// one subscribed connection (never empty; a user whose last shard
    /// leaves is removed).
    members: HashMap<Arc<str>, Vec<u16>>,
}

impl Owned {
    /// Whether anything would be lost by forgetting the channel now.
    fn in_use(&self, ttl: Duration) -> bool {
        let history_live = !self.history.is_empty() && self.last_publish.elapsed() < ttl;
        !self.interested.is_empty()
            || !self.pending.is_empty()
            || !self.members.is_empty()
            || !self.keys.is_empty()
            || history_live
    }

    /// Forgets the idempotency keys older than `ttl`; the bytes and count
    /// they were accounted for.
    fn expire_keys(&mut self, ttl: Duration) -> (usize, usize) {
        let (mut bytes, mut n) = (0, 0);
        while let Some((_, _, at)) = self.key_order.front() {
            if at.elapsed() < ttl {
                break;
            }
            bytes += self.pop_key();
            n += 1;
        }
        (bytes, n)
    }

    /// Forgets the oldest idempotency key; its cost.
    fn pop_key(&mut self) -> usize {
        let Some((key, offset, _)) = self.key_order.pop_front() else {
            return 0;
        };
        if self.keys.get(&key) == Some(&offset) {
            self.keys.remove(&key);
        }
        key_cost(&key)
    }

    /// Applies one shard's report; true when the user's overall presence
    /// changed (first shard joined, or last shard left).
    fn apply_presence(&mut self, user: &Arc<str>, from: u16, joined: bool) -> bool {
        if joined {
            let shards = self.members.entry(user.clone()).or_default();
            if shards.contains(&from) {
                return false; // a repeated report changes nothing
            }
            shards.push(from);
            shards.len() == 1
        } else {
            let Some(shards) = self.members.get_mut(user) else {
                return false;
            };
            shards.retain(|&s| s != from);
            if shards.is_empty() {
                self.members.remove(user);
                return true;
            }
            false
        }
    }

    /// Present users, sorted, so every shard gets the same list.
    fn member_list(&self) -> Vec<Arc<str>> {
        let mut users: Vec<Arc<str>> = self.members.keys().cloned().collect();
        users.sort_unstable();
        users
    }
}

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

/// The offset of the oldest publication (or key) of `kind` the channel
/// still keeps.
fn front_offset(ch: &Owned, kind: Kind) -> Option<u64> {
    match kind {
        Kind::Publication => ch.history.front().map(|p| p.offset),
        Kind::Key => ch.key_order.front().map(|k| k.1),
    }
}

/// Continues a channel's history after `after` (a page of at most
/// `page_bytes` of payload, at least one publication), or says it cannot.
fn read_history(ch: &Owned, after: Position, page_bytes: usize) -> History {
    let current = Position {
        epoch: ch.epoch,
        offset: ch.last_offset,
    };
    if after.epoch != ch.epoch || after.offset > ch.last_offset {
        return History::Lost { current };
    }
    if after.offset == ch.last_offset {
        return History::Items {
            epoch: ch.epoch,
            items: Vec::new(),
        };
    }
    match ch.history.front() {
        Some(first) if first.offset <= after.offset + 1 => {
            let skip = (after.offset + 1 - first.offset) as usize;
            let mut bytes = 0;
            let items = ch
                .history
                .iter()
                .skip(skip)
                .take_while(|p| {
                    let first = bytes == 0;
                    bytes += p.payload.len().max(1);
                    first || bytes <= page_bytes
                })
                .cloned()
                .collect();
            History::Items {
                epoch: ch.epoch,
                items,
            }
        }
        _ => History::Lost { current },
    }
}

#[cfg(test)]
mod tests {

    /// Two shards' handles on the embedded bus, for the bus contract.
    struct Contract {
        buses: Vec<LocalBus>,
        events: Vec<Vec<BusEvent>>,
    }

    impl crate::bus::contract::Harness for Contract {
        fn bus(&mut self, shard: usize) -> &mut dyn Bus {
            &mut self.buses[shard]
        }

        fn pump(&mut self) {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            for (bus, events) in self.buses.iter_mut().zip(&mut self.events) {
                bus.flush();
                let _ = bus.poll_events(&mut cx, events);
            }
        }

        fn events(&mut self, shard: usize) -> &mut Vec<BusEvent> {
            &mut self.events[shard]
        }
    }

    fn contract() -> Contract {
        let retention = Retention {
            size: 100,
            ttl: Duration::from_secs(60),
            max_bytes: usize::MAX,
            page_bytes: usize::MAX,
            idempotency_ttl: Duration::from_secs(3600),
        };
        Contract {
            buses: LocalBus::cluster(2, retention),
            events: vec![Vec::new(), Vec::new()],
        }
    }

    crate::bus::contract::bus_contract_tests!(contract());
    use super::*;
    use crate::bus::contract::presence as presence_of;
    use std::task::Waker;

    fn drain(bus: &mut LocalBus) -> Vec<BusEvent> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        while bus.poll_events(&mut cx, &mut out).is_ready() {
            bus.flush();
        }
        bus.flush();
        out
    }

    /// Runs every shard until nobody has anything left to do.
    fn settle(buses: &mut [LocalBus]) -> Vec<Vec<BusEvent>> {
        let mut events: Vec<Vec<BusEvent>> = buses.iter().map(|_| Vec::new()).collect();
        for _ in 0..16 {
            for (i, b) in buses.iter_mut().enumerate() {
                b.flush();
                events[i].extend(drain(b));
            }
        }
        events
    }

    const NO_HISTORY: Retention = Retention {
        size: 0,
        ttl: Duration::from_secs(60),
        max_bytes: usize::MAX,
        page_bytes: usize::MAX,
        idempotency_ttl: Duration::from_secs(3600),
    };

    fn history_of(events: &[BusEvent]) -> Vec<&History> {
        events
            .iter()
            .filter_map(|e| match e {
                BusEvent::History { result, .. } => Some(result),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn history_continues_a_position_or_says_it_is_lost() {
        let retention = Retention {
            size: 5,
            ttl: Duration::from_secs(60),
            max_bytes: usize::MAX,
            page_bytes: usize::MAX,
            idempotency_ttl: Duration::from_secs(3600),
        };
        let mut buses = LocalBus::cluster(2, retention);
        for i in 0..8u32 {
            buses[0].publish("h", Bytes::from(vec![i as u8]), None, reply(i), 0);
        }
        let ev = settle(&mut buses);
        let epoch = ev[0]
            .iter()
            .find_map(|e| match e {
                BusEvent::Published { result: Ok(p), .. } => Some(p.epoch),
                _ => None,
            })
            .unwrap();
        // Nobody subscribes, but the channel is kept for its history.
        let at = |offset| Position { epoch, offset };
        buses[1].history("h", at(5), 1);
        buses[1].history("h", at(8), 2);
        buses[1].history("h", at(2), 3); // 3 was trimmed (keeps 4..=8)
        buses[1].history(
            "h",
            Position {
                epoch: epoch ^ 1,
                offset: 5,
            },
            4,
        );
        let ev = settle(&mut buses);
        let answers = history_of(&ev[1]);
        assert_eq!(answers.len(), 4);
        match answers[0] {
            History::Items { items, .. } => {
                assert_eq!(
                    items.iter().map(|p| p.offset).collect::<Vec<_>>(),
                    vec![6, 7, 8]
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(answers[1], History::Items { items, .. } if items.is_empty()));
        assert!(matches!(answers[2], History::Lost { current } if current.offset == 8));
        assert!(matches!(answers[3], History::Lost { .. }));
    }

    /// `history.max_mib`: over the shard's byte bound the oldest
    /// publications go first, whatever their channel; recovery from a
    /// dropped one says `Lost`, never a silent gap.
    #[test]
    fn retained_history_is_bounded_in_bytes_oldest_first() {
        let one = 100 + ENTRY_OVERHEAD;
        let retention = Retention {
            size: 1000,
            ttl: Duration::from_secs(60),
            max_bytes: 10 * one,
            page_bytes: usize::MAX,
            idempotency_ttl: Duration::from_secs(3600),
        };
        let mut buses = LocalBus::cluster(1, retention);
        let mut positions = HashMap::new();
        for (ch, n) in [("old", 5u32), ("new", 8), ("old", 2)] {
            for i in 0..n {
                buses[0].publish(ch, Bytes::from(vec![i as u8; 100]), None, reply(i), 0);
                for e in settle(&mut buses).remove(0) {
                    if let BusEvent::Published {
                        channel,
                        result: Ok(p),
                        ..
                    } = e
                    {
                        positions
                            .entry(channel.to_string())
                            .or_insert_with(Vec::new)
                            .push(p);
                    }
                }
            }
        }
        // 15 stored, 10 fit: the first five (all of "old"'s first batch)
        // went, "new" and the two newer of "old" stayed.
        assert_eq!(buses[0].retained.bytes, 10 * one);
        assert_eq!(buses[0].retained.live, 10);
        let old = &positions["old"];
        let new = &positions["new"];
        buses[0].history("old", old[0], 1); // wants 2..: 2..=5 were dropped
        buses[0].history("old", old[4], 2); // wants 6..=7: kept
        buses[0].history(
            "new",
            Position {
                epoch: new[0].epoch,
                offset: 0,
            },
            3,
        );
        let ev = settle(&mut buses);
        let answers = history_of(&ev[0]);
        assert!(matches!(answers[0], History::Lost { current } if current.offset == 7));
        let offsets = |h: &History| match h {
            History::Items { items, .. } => items.iter().map(|p| p.offset).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(offsets(answers[1]), vec![6, 7]);
        assert_eq!(offsets(answers[2]), (1..=8).collect::<Vec<_>>());
    }

    fn reply(request: u32) -> ReplyTo {
        ReplyTo { conn: 7, request }
    }

    fn delivered(events: &[BusEvent], channel: &str) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                BusEvent::Publications {
                    channel: c, items, ..
                } if &**c == channel => Some(items.iter().map(|p| p.offset).collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn publications_reach_interested_shards_in_order() {
        let mut buses = LocalBus::cluster(3, NO_HISTORY);
        buses[1].subscribe("room");
        buses[2].subscribe("room");
        let ev = settle(&mut buses);
        for shard in [1, 2] {
            assert!(ev[shard].iter().any(|e| matches!(e,
                BusEvent::Subscribed { channel, position } if &**channel == "room" && position.offset == 0)));
        }
        for i in 0..50u32 {
            let from = (i % 3) as usize;
            buses[from].publish("room", Bytes::from(vec![i as u8]), None, reply(i), 0);
            if i % 7 == 0 {
                settle(&mut buses);
            }
        }
        let ev2 = settle(&mut buses);
        // Shard 0 has no subscriber and must not receive the channel.
        assert!(delivered(&ev2[0], "room").is_empty());
        for shard in [1, 2] {
            let mut all = delivered(&ev[shard], "room");
            all.extend(delivered(&ev2[shard], "room"));
            // settle() between publishes already drained some events; gather
            // both rounds' worth and check the whole sequence.
            assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
        }
    }

    #[test]
    fn every_publish_is_acknowledged_with_its_position() {
        let mut buses = LocalBus::cluster(2, NO_HISTORY);
        for i in 0..10 {
            buses[(i % 2) as usize].publish("c", Bytes::from_static(b"x"), None, reply(i), 0);
        }
        let ev = settle(&mut buses);
        let mut offsets: Vec<u64> = ev
            .iter()
            .flatten()
            .filter_map(|e| match e {
                BusEvent::Published { result: Ok(p), .. } => Some(p.offset),
                _ => None,
            })
            .collect();
        offsets.sort_unstable();
        // Without subscribers the channel is retired after each tick, so
        // offsets may restart under a new epoch; none may be missing.
        assert_eq!(offsets.len(), 10);
    }

    /// The offset each publish in `events` was acknowledged with, by request.
    fn acked(events: &[BusEvent]) -> Vec<(u32, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                BusEvent::Published {
                    reply_to,
                    result: Ok(p),
                    ..
                } => Some((reply_to.request, p.offset)),
                _ => None,
            })
            .collect()
    }

    // (That a repeated key stores once, from any shard, is in the bus
    // contract above, which the Redis bus passes too.)
    #[test]
    fn idempotency_keys_expire_after_their_ttl_and_count_against_the_byte_bound() {
        let one = key_cost("k00");
        let retention = Retention {
            size: 0, // no history: only the keys are kept
            ttl: Duration::from_secs(60),
            max_bytes: 10 * one,
            page_bytes: usize::MAX,
            idempotency_ttl: Duration::from_secs(1),
        };
        let mut buses = LocalBus::cluster(1, retention);
        let key = |i: u32| format!("k{i:02}");
        for i in 0..12 {
            buses[0].publish("c", Bytes::from_static(b"x"), Some(&key(i)), reply(i), 0);
        }
        settle(&mut buses);
        // Only the newest ten keys fit the bound: k00 and k01 went.
        assert_eq!(buses[0].retained.bytes, 10 * one);
        assert_eq!(buses[0].retained.live, 10);
        buses[0].publish("c", Bytes::from_static(b"x"), Some(&key(0)), reply(100), 0);
        buses[0].publish("c", Bytes::from_static(b"x"), Some(&key(5)), reply(101), 0);
        assert_eq!(
            acked(&settle(&mut buses).remove(0)),
            [(100, 13), (101, 6)],
            "an evicted key is stored anew, a kept one answered with its offset"
        );
        // Every key older than the TTL is forgotten.
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(2))
            .expect("uptime");
        for k in buses[0].owned.get_mut("c").unwrap().key_order.iter_mut() {
            k.2 = long_ago;
        }
        buses[0].publish("c", Bytes::from_static(b"x"), Some(&key(5)), reply(102), 0);
        assert_eq!(acked(&settle(&mut buses).remove(0)), [(102, 14)]);
        assert_eq!(buses[0].retained.bytes, one, "only the new key is kept");
        assert_eq!(buses[0].retained.live, 1);
    }

    #[test]
    fn subscribe_answer_separates_old_from_new() {
        let mut buses = LocalBus::cluster(2, NO_HISTORY);
        buses[0].subscribe("c");
        settle(&mut buses);
        buses[0].publish("c", Bytes::from_static(b"1"), None, reply(1), 0);
        buses[0].publish("c", Bytes::from_static(b"2"), None, reply(2), 0);
        // Shard 1 subscribes in the same tick as the publishes.
        buses[1].subscribe("c");
        buses[0].publish("c", Bytes::from_static(b"3"), None, reply(3), 0);
        let ev = settle(&mut buses);
        let pos = ev[1]
            .iter()
            .find_map(|e| match e {
                BusEvent::Subscribed { position, .. } => Some(position.offset),
                _ => None,
            })
            .expect("subscribed");
        let got = delivered(&ev[1], "c");
        // Everything shard 1 receives is after its subscribe position, and
        // together they leave no gap.
        assert!(got.iter().all(|&o| o > pos), "pos {pos} got {got:?}");
        assert_eq!(got.len() as u64, 3 - pos);
        assert_eq!(delivered(&ev[0], "c"), vec![1, 2, 3]);
    }

    fn members_of(events: &[BusEvent], request: u64) -> Vec<String> {
        let found: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                BusEvent::Members {
                    request: r, result, ..
                } if *r == request => Some(result.clone().expect("local members never fail")),
                _ => None,
            })
            .collect();
        assert_eq!(found.len(), 1, "one answer to request {request}");
        found[0].iter().map(|u| u.to_string()).collect()
    }

    fn joined(user: &str) -> (String, bool) {
        (user.to_string(), true)
    }

    fn left(user: &str) -> (String, bool) {
        (user.to_string(), false)
    }

    #[test]
    fn a_user_on_several_shards_is_one_member() {
        const P: &str = "presence-room";
        let mut buses = LocalBus::cluster(3, NO_HISTORY);
        for b in buses.iter_mut() {
            b.subscribe(P);
        }
        settle(&mut buses);
        // alice on shards 0 and 2, bob on shard 1.
        buses[0].presence(P, "alice", true);
        buses[1].presence(P, "bob", true);
        buses[2].presence(P, "alice", true);
        let ev = settle(&mut buses);
        for (shard, events) in ev.iter().enumerate() {
            let mut got = presence_of(events, P);
            got.sort();
            assert_eq!(got, vec![joined("alice"), joined("bob")], "shard {shard}");
        }
        for (i, b) in buses.iter_mut().enumerate() {
            b.presence_members(P, 10 + i as u64);
        }
        let ev = settle(&mut buses);
        for (i, events) in ev.iter().enumerate() {
            assert_eq!(members_of(events, 10 + i as u64), vec!["alice", "bob"]);
        }
        // alice leaves shard 0: still present on shard 2, nothing announced.
        buses[0].presence(P, "alice", false);
        buses[1].presence_members(P, 20);
        let ev = settle(&mut buses);
        assert!(ev.iter().all(|e| presence_of(e, P).is_empty()), "{ev:?}");
        assert_eq!(members_of(&ev[1], 20), vec!["alice", "bob"]);
        // Her last shard leaves: announced once, everywhere.
        buses[2].presence(P, "alice", false);
        let ev = settle(&mut buses);
        for events in &ev {
            assert_eq!(presence_of(events, P), vec![left("alice")]);
        }
        buses[0].presence_members(P, 21);
        let ev = settle(&mut buses);
        assert_eq!(members_of(&ev[0], 21), vec!["bob"]);
    }

    #[test]
    fn repeated_reports_change_nothing() {
        const P: &str = "presence-x";
        let mut buses = LocalBus::cluster(2, NO_HISTORY);
        buses[0].subscribe(P);
        buses[0].presence(P, "u", true);
        buses[0].presence(P, "u", true);
        let ev = settle(&mut buses);
        assert_eq!(presence_of(&ev[0], P), vec![joined("u")]);
        // A leave from a shard that never joined is ignored.
        buses[1].presence(P, "u", false);
        buses[1].presence(P, "nobody", false);
        buses[0].presence_members(P, 1);
        let ev = settle(&mut buses);
        assert!(presence_of(&ev[0], P).is_empty());
        assert_eq!(members_of(&ev[0], 1), vec!["u"]);
    }

    #[test]
    fn presence_keeps_its_place_among_publications() {
        const P: &str = "presence-order";
        let mut buses = LocalBus::cluster(2, NO_HISTORY);
        buses[0].subscribe(P);
        buses[1].subscribe(P);
        settle(&mut buses);
        // One tick of shard 1: publish, join, publish, leave, publish.
        buses[1].publish(P, Bytes::from_static(b"1"), None, reply(1), 0);
        buses[1].presence(P, "u", true);
        buses[1].publish(P, Bytes::from_static(b"2"), None, reply(2), 0);
        buses[1].presence(P, "u", false);
        buses[1].publish(P, Bytes::from_static(b"3"), None, reply(3), 0);
        let ev = settle(&mut buses);
        for (shard, events) in ev.iter().enumerate() {
            let seq: Vec<String> = events
                .iter()
                .filter_map(|e| match e {
                    BusEvent::Publications { items, .. } => Some(
                        items
                            .iter()
                            .map(|p| format!("p{}", p.offset))
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                    BusEvent::Presence { user, joined, .. } => {
                        Some(format!("{}{user}", if *joined { "+" } else { "-" }))
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(seq, vec!["p1", "+u", "p2", "-u", "p3"], "shard {shard}");
        }
    }

    #[test]
    fn members_keep_a_channel_from_retirement() {
        const P: &str = "presence-keep";
        let mut buses = LocalBus::cluster(1, NO_HISTORY);
        let epoch = |ev: &[BusEvent]| {
            ev.iter()
                .find_map(|e| match e {
                    BusEvent::Subscribed { position, .. } => Some(position.epoch),
                    _ => None,
                })
                .unwrap()
        };
        // A member without any listener (the bus does not require one):
        // neither retirement nor the expiry sweep may forget it.
        buses[0].presence(P, "u", true);
        buses[0].publish(P, Bytes::from_static(b"x"), None, reply(1), 0);
        settle(&mut buses);
        buses[0].retention.ttl = Duration::ZERO;
        buses[0].last_expiry = Instant::now() - Duration::from_secs(5);
        buses[0].presence_members(P, 1);
        let ev = settle(&mut buses);
        assert_eq!(members_of(&ev[0], 1), vec!["u"]);
        buses[0].subscribe(P);
        let first = settle(&mut buses);
        let kept = first[0]
            .iter()
            .any(|e| matches!(e, BusEvent::Subscribed { position, .. } if position.offset == 1));
        assert!(kept, "channel state (offset 1) survived: {first:?}");
        // Once nobody listens and the last member is gone, it is retired.
        buses[0].presence(P, "u", false);
        buses[0].unsubscribe(P);
        buses[0].subscribe(P);
        let again = settle(&mut buses);
        assert_ne!(epoch(&first[0]), epoch(&again[0]));
    }

    #[test]
    fn a_shard_that_stops_listening_takes_its_members_with_it() {
        const P: &str = "presence-gone";
        let mut buses = LocalBus::cluster(2, NO_HISTORY);
        buses[0].subscribe(P);
        buses[1].subscribe(P);
        buses[0].presence(P, "a", true);
        buses[1].presence(P, "a", true);
        buses[1].presence(P, "b", true);
        settle(&mut buses);
        // Shard 1 unsubscribes without reporting its users as left.
        buses[1].unsubscribe(P);
        let ev = settle(&mut buses);
        assert_eq!(presence_of(&ev[0], P), vec![left("b")]);
        buses[0].presence_members(P, 1);
        let ev = settle(&mut buses);
        assert_eq!(members_of(&ev[0], 1), vec!["a"]);
    }

    #[test]
    fn an_owner_sequences_its_own_requests_after_earlier_ones_of_others() {
        let mut buses = LocalBus::cluster(2, NO_HISTORY);
        let p: String = (0..)
            .map(|i| format!("presence-{i}"))
            .find(|c| buses[0].owner_of(c) == 0)
            .unwrap();
        let p = p.as_str();
        buses[0].subscribe(p);
        buses[1].subscribe(p);
        buses[0].presence(p, "u", true);
        settle(&mut buses);
        // Shard 1's join is flushed (its client may have seen the answer)
        // before the owner's own shard reports its leave: the join must be
        // sequenced first, so the user never appears to leave.
        buses[1].presence(p, "u", true);
        buses[1].flush();
        buses[0].presence(p, "u", false);
        let ev = settle(&mut buses);
        assert!(ev.iter().all(|e| presence_of(e, p).is_empty()), "{ev:?}");
        buses[0].presence_members(p, 1);
        let ev = settle(&mut buses);
        assert_eq!(members_of(&ev[0], 1), vec!["u"]);
    }

    #[test]
    fn members_of_an_unknown_channel_is_empty() {
        let mut buses = LocalBus::cluster(2, NO_HISTORY);
        buses[1].presence_members("presence-none", 5);
        let ev = settle(&mut buses);
        assert!(members_of(&ev[1], 5).is_empty());
    }

    #[test]
    fn last_unsubscribe_retires_the_channel_with_a_new_epoch() {
        let mut buses = LocalBus::cluster(1, NO_HISTORY);
        buses[0].subscribe("c");
        let first = settle(&mut buses);
        buses[0].unsubscribe("c");
        buses[0].subscribe("c");
        let second = settle(&mut buses);
        let epoch = |ev: &[BusEvent]| {
            ev.iter()
                .find_map(|e| match e {
                    BusEvent::Subscribed { position, .. } => Some(position.epoch),
                    _ => None,
                })
                .unwrap()
        };
        assert_ne!(epoch(&first[0]), epoch(&second[0]));
    }
}
