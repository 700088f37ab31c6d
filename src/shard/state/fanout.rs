//! Fan-out: a tick's publications for a channel are encoded once into a
//! WebSocket frame, and every subscriber's queue gets a refcount of that
//! frame. Presence events travel the same way.

use std::sync::Arc;

use bytes::Bytes;

use super::connections::{slow_consumer, CloseReason, Conn};
use super::output::fits_budget;
use super::subscriptions::ChannelState;
use super::State;
use crate::bus::{Position, Publication};
use crate::protocol::compression::{self, Compressor};
use crate::protocol::wire::Encoder;
use crate::protocol::ws::{self, OpCode};
use crate::shard::slab::{ConnId, Slab};

impl State {
    /// Encodes the channel's new publications once per batch and queues the
    /// same frame for every subscriber.
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
            let data = encode_publications(&mut self.encoder, name, epoch, chunk);
            Fanout {
                conns: &mut self.conns,
                compressor: &mut self.compressor,
                dirty: &mut self.dirty,
                to_close: &mut self.to_close,
                budget: self.settings.outbound_budget,
            }
            .send(&ch.subscribers, data);
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
/// that the encoded bytes (borrowed from the encoder) and the recipients
/// (borrowed from a channel) can be used at the same time.
pub(super) struct Fanout<'a> {
    pub(super) conns: &'a mut Slab<Conn>,
    pub(super) compressor: &'a mut Compressor,
    pub(super) dirty: &'a mut Vec<ConnId>,
    pub(super) to_close: &'a mut Vec<(ConnId, CloseReason)>,
    pub(super) budget: usize,
}

impl Fanout<'_> {
    /// Queues the encoded `Frame` `data` for every connection in `to`. One
    /// WebSocket frame per form, each built at most once and shared by
    /// refcount: plain (shardcast.v1), and for zstd connections either
    /// compressed or flagged-uncompressed. A connection over its outbound
    /// budget is closed as a slow consumer instead.
    pub(super) fn send(&mut self, to: &[ConnId], data: &[u8]) {
        let mut plain: Option<Bytes> = None;
        let mut zstd: Option<Bytes> = None;
        for &id in to {
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            let frame = if conn.zstd {
                zstd.get_or_insert_with(|| match self.compressor.compress(data) {
                    Some(z) => ws::frame(OpCode::Binary, &z),
                    None => binary_frame(true, data),
                })
            } else {
                plain.get_or_insert_with(|| ws::frame(OpCode::Binary, data))
            };
            if !fits_budget(conn.out.queued_bytes(), frame.len(), self.budget) {
                self.to_close
                    .push((id, slow_consumer("outbound budget exceeded")));
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

/// One frame carrying `chunk` (consecutive publications of `channel` in
/// `epoch`): the live fan-out shares it, a catching-up connection gets its
/// own.
pub(super) fn encode_publications<'e, P: std::borrow::Borrow<Publication>>(
    encoder: &'e mut Encoder,
    channel: &str,
    epoch: u64,
    chunk: &[P],
) -> &'e [u8] {
    encoder.publications(
        channel,
        epoch,
        chunk.iter().map(|p| {
            let p = p.borrow();
            (p.offset, p.published_us / 1000, &p.payload[..])
        }),
    )
}

/// A binary frame carrying `data`; on zstd connections with the "plain"
/// flag byte in front. One allocation either way.
pub(super) fn binary_frame(zstd: bool, data: &[u8]) -> Bytes {
    if !zstd {
        return ws::frame(OpCode::Binary, data);
    }
    let len = data.len() + 1;
    let mut out = Vec::with_capacity(ws::header_len(len) + len);
    ws::write_header(&mut out, OpCode::Binary, true, len);
    out.push(compression::FLAG_PLAIN);
    out.extend_from_slice(data);
    Bytes::from(out)
}
