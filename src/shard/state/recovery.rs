//! Recovery: a connection that subscribes with a position the shard has
//! moved past catches up from the bus's history before it joins the live
//! subscribers, without gaps or duplicates. One whose position is *ahead*
//! of the shard (it saw publications on another shard or node that have
//! not reached this one yet) waits until the shard catches up, then joins
//! without duplicates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::form::{publications_frame, Reply};
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
    /// Publications read from history (a page of about one outbound budget)
    /// and not yet queued (`pending[next..]`). They are queued while they fit
    /// the budget; when the next does not, the rest is dropped and read again
    /// from `at` once the socket drained, so a catch-up never takes its queue
    /// past the budget nor keeps history in memory while it waits.
    pub(super) pending: Vec<Publication>,
    pub(super) next: usize,
}

impl Recovery {
    pub(super) fn new(conn: ConnId, request: u32, channel: Arc<str>, at: Position) -> Self {
        Recovery {
            conn,
            request,
            channel,
            at,
            announced: false,
            pending: Vec::new(),
            next: 0,
        }
    }
}

/// How long a connection ahead of the shard may wait for it: far longer
/// than a hop between shards or nodes; a position still ahead after that
/// is not one this channel will reach (a client error or lost history).
const AHEAD_WAIT: Duration = Duration::from_secs(5);

/// Bytes a publications frame adds besides the channel name and the
/// items (WebSocket header, FlatBuffers root and tables), and bytes each
/// item adds besides its payload: upper bounds, used to size catch-up
/// frames before encoding them (the encoded length is checked after).
const FRAME_OVERHEAD: usize = 96;
const ITEM_OVERHEAD: usize = 48;

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
        let form = self.form_of(id);
        for chunk in items.chunks(self.settings.max_batch) {
            let frame = publications_frame(form, &mut self.encoder, name, epoch, chunk);
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
        if let Some((id, channel, last)) = self.cache_reads.remove(&token) {
            return self.on_cache_read(id, &channel, last, result);
        }
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
        // What the client lacks, up to what this shard delivers live;
        // anything newer reaches it live once it joins. A page with none of
        // it while the client is behind means the next publication is gone
        // from history (Redis lost it): that is `Lost`, not a page to ask
        // for again and again.
        let behind = rec.at.offset < live.offset;
        let result = match result {
            History::Items { epoch, mut items } if epoch == live.epoch => {
                items.retain(|p| p.offset > rec.at.offset && p.offset <= live.offset);
                if items.is_empty() && behind {
                    History::Lost { current: live }
                } else {
                    History::Items { epoch, items }
                }
            }
            other => other,
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
                return self.abandon_recovery(&rec);
            }
        };
        if !rec.announced {
            rec.announced = true;
            self.reply_subscribed(id, rec.request, &name, rec.at, true);
        }
        rec.pending = items;
        rec.next = 0;
        self.pump_recovery(token, rec);
    }

    /// History vanished halfway through a recovery already announced: never
    /// leave a silent gap — end the subscription and let the client
    /// resubscribe.
    fn abandon_recovery(&mut self, rec: &Recovery) {
        let (id, name) = (rec.conn, &rec.channel);
        self.reply(id, 0, Reply::Unsubscribed { channel: name });
        self.reply_error(
            id,
            rec.request,
            ErrorCode::Unavailable,
            "history was lost during recovery; subscribe again",
        );
        self.drop_subscription(id, name);
    }

    /// Queues the recovery's pending publications while they fit the
    /// connection's outbound budget; pauses (see `paced`) when the next
    /// frame does not, to go on once the queue has drained. With nothing
    /// pending the connection joins the live subscribers, or reads the next
    /// page of history if live moved on meanwhile.
    fn pump_recovery(&mut self, token: u64, mut rec: Recovery) {
        let id = rec.conn;
        let budget = self.settings.outbound_budget;
        let form = self.form_of(id);
        while rec.next < rec.pending.len() {
            let Some(conn) = self.conns.get(id) else {
                return;
            };
            let queued = conn.out.queued_bytes();
            // As many publications as the room left is estimated to take
            // (encoding is a copy of every payload: pick `n` before it).
            let room = budget.saturating_sub(queued);
            let mut n = 0;
            let mut estimate = FRAME_OVERHEAD + rec.channel.len();
            for p in rec.pending[rec.next..].iter().take(self.settings.max_batch) {
                let add = p.payload.len() + ITEM_OVERHEAD;
                if n > 0 && estimate + add > room {
                    break;
                }
                estimate += add;
                n += 1;
            }
            let frame = loop {
                let chunk = &rec.pending[rec.next..rec.next + n];
                let frame =
                    publications_frame(form, &mut self.encoder, &rec.channel, rec.at.epoch, chunk);
                // Stricter than `fits_budget`: only a single publication
                // larger than the budget may go over it (to an empty queue).
                if queued + frame.len() <= budget || (n == 1 && queued == 0) {
                    break Some(frame);
                }
                if n == 1 {
                    break None;
                }
                n /= 2;
            };
            let Some(frame) = frame else {
                // Keep only the position: what is left is read again once
                // the socket drained, so a paused catch-up pins no history.
                rec.pending = Vec::new();
                rec.next = 0;
                self.paced.entry(id).or_default().push(token);
                self.recoveries.insert(token, rec);
                return;
            };
            self.enqueue(id, frame);
            self.counters.messages_out += n as u64;
            rec.next += n;
            rec.at.offset = rec.pending[rec.next - 1].offset;
        }
        rec.pending = Vec::new();
        rec.next = 0;
        let Some(ch) = self.channels.get_mut(&rec.channel) else {
            return;
        };
        if !ch.recovering.contains(&id) {
            return;
        }
        let ChannelState::Active { last: live } = ch.state else {
            return;
        };
        if live.epoch != rec.at.epoch {
            return self.abandon_recovery(&rec);
        }
        if rec.at.offset >= live.offset {
            ch.recovering.retain(|&c| c != id);
            ch.subscribers.push(id);
        } else {
            // Live moved on while history was read: read the rest.
            self.next_recovery += 1;
            let token = self.next_recovery;
            self.bus.history(&rec.channel, rec.at, token);
            self.bus_pending = true;
            self.recoveries.insert(token, rec);
        }
    }

    /// `id`'s queue drained: its paused recoveries go on.
    pub(super) fn resume_paced(&mut self, id: ConnId) {
        let Some(mine) = self.paced.remove(&id) else {
            return;
        };
        for token in mine {
            let Some(rec) = self.recoveries.remove(&token) else {
                continue;
            };
            let still_recovering = self
                .channels
                .get(&rec.channel)
                .is_some_and(|ch| ch.recovering.contains(&id));
            if still_recovering {
                self.pump_recovery(token, rec);
            }
        }
    }
}
