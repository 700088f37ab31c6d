//! The main loop's view of each channel it subscribes to: opening a
//! subscription, placing live announcements in order (deliver, drop, or
//! buffer and catch up from the stream), retiring lost epochs, and
//! resubscribing after the Pub/Sub connection dropped or lagged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use fred::types::Message;

use super::history::{catch_up, CatchUp};
use super::pubsub::SubOp;
use super::Companion;
use crate::bus::redis::codec::{self, bytes_of};
use crate::bus::redis::{keys, RedisStats};
use crate::bus::{BusEvent, Position, Publication};

/// Pause before retrying a failed subscription or catch-up read.
const RETRY_DELAY: Duration = Duration::from_millis(250);
/// Most live announcements buffered per channel while it catches up;
/// beyond that they are dropped and read from the stream instead.
const MAX_BUFFER: usize = 10_000;
/// Retired epochs remembered per channel (to drop late announcements).
const DEAD_EPOCHS: usize = 8;

/// Results of the helper tasks, for the main loop.
pub(super) enum Internal {
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
pub(super) struct Sub {
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
    /// The newest position delivered on this channel (or covered by its
    /// `Subscribed`), once it is open.
    pub(super) fn seen(&self) -> Option<Position> {
        (!self.opening).then_some(Position {
            epoch: self.epoch,
            offset: self.last,
        })
    }

    fn retire(&mut self, epoch: u64) {
        if !self.dead.contains(&epoch) {
            if self.dead.len() == DEAD_EPOCHS {
                self.dead.pop_front();
            }
            self.dead.push_back(epoch);
        }
    }
}

impl Companion {
    pub(super) fn subscribe(&mut self, channel: Arc<str>) {
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

    pub(super) fn on_internal(&mut self, ev: Internal) {
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
                // Everything announced while the connection was down is in
                // the streams.
                Ok(()) => self.catch_up_all(),
                Err(e) => {
                    tracing::debug!(error = %e, "redis resubscribe failed; retrying");
                    self.later(Internal::Resubscribe);
                }
            },
            Internal::Resubscribe => self.resubscribe_all(),
        }
    }

    /// Reads every channel's stream for what live delivery may have
    /// missed (a channel still opening or catching up re-checks after).
    fn catch_up_all(&mut self) {
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

    fn resubscribe_all(&mut self) {
        let all: Vec<Arc<str>> = self.subs.keys().cloned().collect();
        let _ = self.subctl_tx.send(SubOp::ResubscribeAll(all));
    }

    pub(super) fn on_sub_reconnect(&mut self) {
        RedisStats::bump(&self.shared.stats.reconnects);
        tracing::info!(
            shard = self.shared.shard,
            "redis pub/sub reconnected; resubscribing"
        );
        self.resubscribe_all();
    }

    pub(super) fn on_lagged(&mut self, n: u64) {
        tracing::warn!(
            shard = self.shared.shard,
            missed = n,
            "redis pub/sub receiver lagged; catching up from streams"
        );
        self.catch_up_all();
    }

    fn opened(&mut self, channel: &Arc<str>, position: Position) {
        let s = self.subs.get_mut(channel).expect("current");
        s.opening = false;
        s.epoch = position.epoch;
        s.last = position.offset;
        self.shared.seen.record(channel, position);
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

    pub(super) fn on_message(&mut self, m: Message) {
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
                self.shared.seen.record(channel, Position { epoch, offset });
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
        self.shared.seen.record(
            channel,
            Position {
                epoch: s.epoch,
                offset: s.last,
            },
        );
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
