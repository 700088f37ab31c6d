//! Fan-out: a tick's publications for a channel are encoded once per form
//! into a WebSocket frame, and every subscriber's queue gets a refcount of
//! that frame. Presence events travel the same way.

use std::sync::Arc;

use super::connections::Conn;
use bytes::Bytes;

use super::form::{Broadcast, CloseCause, Form, Frames, SocketId};
use super::output::fits_budget;
use super::subscriptions::ChannelState;
use super::State;
use crate::bus::{Position, Publication};
use crate::shard::slab::{ConnId, Slab};

impl State {
    /// Encodes the channel's new publications once per batch and form and
    /// queues the same frame for every subscriber.
    pub(super) fn deliver(&mut self, name: &Arc<str>, epoch: u64, items: &[Publication]) {
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        let ChannelState::Active { last } = &mut ch.state else {
            // Sequenced before our interest took effect: the Subscribed
            // answer that follows covers it.
            return;
        };
        let fresh = if epoch == last.epoch {
            let start = items.partition_point(|p| p.offset <= last.offset);
            &items[start..]
        } else {
            items
        };
        let Some(newest) = fresh.last() else {
            return;
        };
        self.batching |= fresh.len() > 1;
        *last = Position {
            epoch,
            offset: newest.offset,
        };
        for chunk in fresh.chunks(self.settings.max_batch) {
            let what = Broadcast::Publications {
                channel: name,
                epoch,
                items: chunk,
            };
            let mut frames = Frames::new(&what, &mut self.encoder, &mut self.compressor);
            Fanout {
                conns: &mut self.conns,
                dirty: &mut self.dirty,
                to_close: &mut self.to_close,
                budget: self.settings.outbound_budget,
                socket_prefix: self.settings.socket_prefix,
            }
            .send(&ch.subscribers, None, &mut frames);
            let recipients = ch.subscribers.len() as u64;
            self.counters.messages_out += recipients * chunk.len() as u64;
            for p in chunk {
                self.delivered
                    .push((p.published_us, p.ingress_us, recipients));
            }
        }
        if !self.ahead.is_empty() {
            self.release_ahead(name, epoch, fresh);
        }
    }
}

/// What a broadcast touches, borrowed field by field from [`State`] so
/// that the frames (which borrow the encoder) and the recipients
/// (borrowed from a channel) can be used at the same time.
pub(super) struct Fanout<'a> {
    pub(super) conns: &'a mut Slab<Conn>,
    pub(super) dirty: &'a mut Vec<ConnId>,
    pub(super) to_close: &'a mut Vec<(ConnId, CloseCause)>,
    pub(super) budget: usize,
    /// This shard's Pusher `socket_id` prefix (see [`SocketId`]).
    pub(super) socket_prefix: u64,
}

impl Fanout<'_> {
    /// Queues the broadcast's frame for every connection in `to` but
    /// `skip` (e.g. the publisher itself: no re-encoding, just not queued
    /// for it). Each connection gets its form's frame, built at most once
    /// and shared by refcount. A connection over its outbound budget is
    /// closed as a slow consumer instead.
    pub(super) fn send<P: std::borrow::Borrow<Publication>>(
        &mut self,
        to: &[ConnId],
        skip: Option<ConnId>,
        frames: &mut Frames<'_, '_, P>,
    ) {
        for &id in to {
            if Some(id) == skip {
                continue;
            }
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            if conn.form == Form::Pusher && frames.pusher_terminates() {
                self.to_close.push((id, CloseCause::Terminated));
            }
            if conn.form == Form::Pusher {
                let socket = SocketId {
                    prefix: self.socket_prefix,
                    conn: id.as_u64(),
                };
                // A Pusher socket some publications leave out (a client
                // event's sender) gets the rest as slices of the shared
                // frames.
                if let Some(parts) = frames.pusher_parts_without(socket) {
                    let len = parts.iter().map(Bytes::len).sum();
                    if !fits_budget(conn.out.queued_bytes(), len, self.budget) {
                        self.to_close
                            .push((id, CloseCause::SlowConsumer("outbound budget exceeded")));
                        continue;
                    }
                    if parts.is_empty() {
                        continue;
                    }
                    for part in parts {
                        conn.out.push(part);
                    }
                    if !conn.dirty {
                        conn.dirty = true;
                        self.dirty.push(id);
                    }
                    continue;
                }
            }
            let frame = frames.get(conn.form);
            if frame.is_empty() {
                // Nothing for this form (a Pusher broadcast that only
                // terminates its recipients).
                continue;
            }
            if !fits_budget(conn.out.queued_bytes(), frame.len(), self.budget) {
                self.to_close
                    .push((id, CloseCause::SlowConsumer("outbound budget exceeded")));
                continue;
            }
            conn.out.push(frame.clone());
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
        }
    }
}
