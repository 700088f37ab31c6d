//! Recovery: a connection that subscribes with a position the shard has
//! moved past catches up from the bus's history before it joins the live
//! subscribers, without gaps or duplicates. One whose position is *ahead*
//! of the shard (it saw publications on another shard or node that have
//! not reached this one yet) waits until the shard catches up, then joins
//! without duplicates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fanout::{binary_frame, encode_publications};
use super::subscriptions::ChannelState;
use super::State;
use crate::bus::{History, Position, Publication};
use crate::protocol::wire::ErrorCode;
use crate::shard::slab::ConnId;

/// A connection catching up on a channel from history.
pub(super) struct Recovery {
    pub(super) conn: ConnId,
    pub(super) request: u32,
    pub(super) channel: Arc<str>,
    /// The newest position the client has (advances as history arrives).
    pub(super) at: Position,
    /// `Subscribed { recovered: true }` was sent.
    pub(super) announced: bool,
}

/// How long a connection ahead of the shard may wait for it: far longer
/// than a hop between shards or nodes; a position still ahead after that
/// is not one this channel will reach (a client error or lost history).
const AHEAD_WAIT: Duration = Duration::from_secs(5);

/// A connection whose position is ahead of the shard's live position.
pub(super) struct Ahead {
    conn: ConnId,
    request: u32,
    channel: Arc<str>,
    at: Position,
    deadline: Instant,
}

impl Ahead {
    pub(super) fn is(&self, id: ConnId, channel: &str) -> bool {
        self.conn == id && *self.channel == *channel
    }
}

impl State {
    pub(super) fn wait_for_live(
        &mut self,
        id: ConnId,
        request: u32,
        name: &Arc<str>,
        at: Position,
    ) {
        self.ahead.push(Ahead {
            conn: id,
            request,
            channel: name.clone(),
            at,
            deadline: self.now + AHEAD_WAIT,
        });
    }

    /// The shard delivered `fresh` (of `epoch`) on `name`: connections that
    /// waited for it to reach their position join now, each sent only the
    /// publications after its position.
    pub(super) fn release_ahead(&mut self, name: &Arc<str>, epoch: u64, fresh: &[Publication]) {
        let Some(newest) = fresh.last().map(|p| p.offset) else {
            return;
        };
        let mut i = 0;
        while i < self.ahead.len() {
            let w = &self.ahead[i];
            if w.channel != *name || (w.at.epoch == epoch && w.at.offset > newest) {
                i += 1;
                continue;
            }
            let w = self.ahead.swap_remove(i);
            let recovered = w.at.epoch == epoch;
            let at = if recovered {
                w.at
            } else {
                // History was lost meanwhile: continue from here.
                Position {
                    epoch,
                    offset: newest,
                }
            };
            if !self.join_live(w.conn, w.request, name, at, recovered) {
                continue;
            }
            if recovered {
                let rest: Vec<&Publication> =
                    fresh.iter().filter(|p| p.offset > at.offset).collect();
                self.send_to(w.conn, name, epoch, &rest);
            }
        }
    }

    /// Connections still ahead at their deadline cannot be continued: they
    /// join at the shard's live position with `recovered = false`.
    pub(super) fn expire_ahead(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.ahead.len() {
            if self.ahead[i].deadline > now {
                i += 1;
                continue;
            }
            let w = self.ahead.swap_remove(i);
            let live = match self.channels.get(&w.channel).map(|c| &c.state) {
                Some(ChannelState::Active { last }) => *last,
                _ => continue,
            };
            self.join_live(w.conn, w.request, &w.channel, live, false);
        }
    }

    /// Sends `items` of `name` to one catching-up connection (encoded for
    /// it alone: this is the rare path, the live fan-out shares frames).
    fn send_to(&mut self, id: ConnId, name: &str, epoch: u64, items: &[&Publication]) {
        let zstd = self.is_zstd(id);
        for chunk in items.chunks(self.settings.max_batch) {
            let data = encode_publications(&mut self.encoder, name, epoch, chunk);
            let frame = binary_frame(zstd, data);
            self.enqueue(id, frame);
            self.counters.messages_out += chunk.len() as u64;
        }
    }

    /// Moves a waiting connection to the live subscribers and answers its
    /// subscribe; false if it unsubscribed or left meanwhile.
    fn join_live(
        &mut self,
        id: ConnId,
        request: u32,
        name: &Arc<str>,
        at: Position,
        recovered: bool,
    ) -> bool {
        let Some(ch) = self.channels.get_mut(name) else {
            return false;
        };
        if !ch.recovering.contains(&id) {
            return false;
        }
        ch.recovering.retain(|&c| c != id);
        ch.subscribers.push(id);
        self.reply_subscribed(id, request, name, at, recovered);
        true
    }

    /// A history read for a recovering connection came back.
    pub(super) fn on_history(&mut self, token: u64, result: History) {
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
        let wanted: Vec<&Publication> = items
            .iter()
            .filter(|p| p.offset > rec.at.offset && p.offset <= live.offset)
            .collect();
        self.send_to(id, &name, live.epoch, &wanted);
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
}
