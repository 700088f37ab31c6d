//! One channel as its owner shard keeps it: the sequencer state (epoch,
//! offsets), interested shards, history, idempotency keys and presence
//! members, and reading its history.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::retention::{key_cost, Kind};
use crate::bus::{History, Position, Publication};

/// Sequencer state for a channel this shard owns.
pub(super) struct Owned {
    pub(super) epoch: u64,
    pub(super) last_offset: u64,
    /// Shards with at least one subscriber.
    pub(super) interested: Vec<u16>,
    /// Publications sequenced this tick, not yet forwarded.
    pub(super) pending: Vec<Publication>,
    /// The newest `Retention::size` publications, oldest first.
    pub(super) history: VecDeque<Publication>,
    pub(super) last_publish: Instant,
    /// Idempotency keys and the offset each stored, remembered for
    /// `Retention::idempotency_ttl`.
    pub(super) keys: HashMap<Box<str>, u64>,
    /// The same keys oldest first, with the offset and when.
    pub(super) key_order: VecDeque<(Box<str>, u64, Instant)>,
    /// Presence: for each present user, the shards where it has at least
    /// one subscribed connection (never empty; a user whose last shard
    /// leaves is removed).
    pub(super) members: HashMap<Arc<str>, Vec<u16>>,
}

impl Owned {
    /// Whether anything would be lost by forgetting the channel now.
    pub(super) fn in_use(&self, ttl: Duration) -> bool {
        let history_live = !self.history.is_empty() && self.last_publish.elapsed() < ttl;
        !self.interested.is_empty()
            || !self.pending.is_empty()
            || !self.members.is_empty()
            || !self.keys.is_empty()
            || history_live
    }

    /// Forgets the idempotency keys older than `ttl`; the bytes and count
    /// they were accounted for.
    pub(super) fn expire_keys(&mut self, ttl: Duration) -> (usize, usize) {
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
    pub(super) fn pop_key(&mut self) -> usize {
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
    pub(super) fn apply_presence(&mut self, user: &Arc<str>, from: u16, joined: bool) -> bool {
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
    pub(super) fn member_list(&self) -> Vec<Arc<str>> {
        let mut users: Vec<Arc<str>> = self.members.keys().cloned().collect();
        users.sort_unstable();
        users
    }
}

/// The offset of the oldest publication (or key) of `kind` the channel
/// still keeps.
pub(super) fn front_offset(ch: &Owned, kind: Kind) -> Option<u64> {
    match kind {
        Kind::Publication => ch.history.front().map(|p| p.offset),
        Kind::Key => ch.key_order.front().map(|k| k.1),
    }
}

/// Continues a channel's history after `after` (a page of at most
/// `page_bytes` of payload, at least one publication), or says it cannot.
pub(super) fn read_history(ch: &Owned, after: Position, page_bytes: usize) -> History {
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
