//! Getting queued frames to the driver: queueing a frame for a
//! connection within its budget, and the calls through which the driver
//! writes each connection's queue to its socket (the state never touches
//! one).

use std::io::IoSlice;
use std::net::Shutdown;

use bytes::Bytes;

use super::connections::Phase;
use super::form::CloseCause;
use super::State;
use crate::shard::outbound::Outbound;
use crate::shard::slab::ConnId;

impl State {
    /// Queues `frame` for the connection, within its outbound budget: a
    /// frame that would take the queue past `fanout.outbound_budget_bytes`
    /// closes the connection as a slow consumer (4001) instead. Every frame
    /// the server produces for one connection (replies, errors, pings,
    /// catch-up) comes through here; the shared fan-out applies the same
    /// rule ([`fits_budget`]). Nothing is queued once the close frame is:
    /// RFC 6455 §5.5.1 allows no data after it.
    pub(super) fn enqueue(&mut self, id: ConnId, frame: Bytes) {
        let budget = self.settings.outbound_budget;
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if matches!(conn.phase, Phase::Closing { .. }) {
            return;
        }
        if !fits_budget(conn.out.queued_bytes(), frame.len(), budget) {
            self.to_close
                .push((id, CloseCause::SlowConsumer("outbound budget exceeded")));
            return;
        }
        conn.out.push(frame);
        self.mark_dirty(id);
    }

    pub(super) fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    /// Hands the driver the connections with output to write, in the
    /// order they got it: swaps them into `into` (which must be empty). A
    /// write can mark more connections dirty (a failed one closes its
    /// connection, a drained one resumes a catch-up), so the driver calls
    /// this until it returns nothing.
    pub fn take_dirty(&mut self, into: &mut Vec<ConnId>) {
        debug_assert!(into.is_empty());
        std::mem::swap(into, &mut self.dirty);
    }

    /// Starts writing connection `id`'s queue: its socket's handle (as
    /// given to [`State::add_conn`]), or `None` if it is gone. The driver
    /// then alternates [`State::gather`] and [`State::wrote`] until
    /// the queue is empty ([`State::write_drained`]), the socket is full
    /// ([`State::write_blocked`]) or the write failed
    /// ([`State::write_failed`]).
    pub fn begin_write(&mut self, id: ConnId) -> Option<u32> {
        // Bus requests go out before the replies they caused: once a client
        // has seen a reply, whatever it does next (on any shard) reaches the
        // bus after the request behind that reply (see `bus::local`).
        if self.bus_pending {
            self.flush_bus();
        }
        let conn = self.conns.get_mut(id)?;
        conn.dirty = false;
        Some(conn.handle)
    }

    /// Lends connection `id`'s unwritten bytes as slices for one gathered
    /// write; returns how many slices it filled (0: nothing left to write).
    /// The pong owed for the client's latest ping joins the queue only
    /// when the queue is empty, i.e. while the socket takes what we write
    /// (on a blocked socket it waits in its slot, replaced by newer ones);
    /// never after our close frame.
    pub fn gather<'a>(&'a mut self, id: ConnId, iov: &mut [IoSlice<'a>]) -> usize {
        let Some(conn) = self.conns.get_mut(id) else {
            return 0;
        };
        if conn.out.queued_bytes() == 0 && matches!(conn.phase, Phase::Open { .. }) {
            if let Some(pong) = conn.pong.take() {
                conn.out.push(pong);
            }
        }
        conn.out.gather(iov)
    }

    /// The socket took `bytes` of what [`State::gather`] lent. Returns
    /// whether anything is left to write (queued bytes, or a pong owed);
    /// when not, the driver goes straight to [`State::write_drained`]
    /// (sparing the common case, where the kernel takes everything at
    /// once, a second round of lookups).
    pub fn wrote(&mut self, id: ConnId, bytes: usize) -> bool {
        let Some(conn) = self.conns.get_mut(id) else {
            return false;
        };
        conn.out.advance(bytes);
        self.counters.bytes_out += bytes as u64;
        conn.out.queued_bytes() > 0
            || (conn.pong.is_some() && matches!(conn.phase, Phase::Open { .. }))
    }

    /// Connection `id`'s queue is empty: a close frame that was queued is
    /// out, so its write side is shut; a catch-up paused for the queue to
    /// drain goes on.
    pub fn write_drained(&mut self, id: ConnId) -> Flushed {
        if let Some(conn) = self.conns.get_mut(id) {
            if conn.shutdown_after_flush {
                conn.shutdown_after_flush = false;
                self.shutdowns.push_back((id, Shutdown::Write));
            }
        }
        // Catch-up paused for this connection's queue to drain goes on
        // (it marks the connection dirty again).
        if !self.paced.is_empty() {
            self.resume_paced(id);
        }
        Flushed::All
    }

    /// Connection `id`'s socket is full: its oldest unsent byte starts
    /// ageing (`fanout.outbound_max_age_ms`), and it needs a writer that
    /// waits for writability ([`State::poll_writer`]) unless it has one.
    pub fn write_blocked(&mut self, id: ConnId) -> Flushed {
        let now = self.now;
        if let Some(conn) = self.conns.get_mut(id) {
            conn.out.blocked(now);
            if !conn.writer_active {
                conn.writer_active = true;
                self.need_writer.push(id);
                self.watched.push(id);
            }
        }
        Flushed::Blocked
    }

    /// Writing to connection `id` failed: the peer is gone and nothing
    /// queued can be delivered. Its socket is shut, which wakes its reader
    /// (the driver then removes the connection).
    pub fn write_failed(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        conn.out = Outbound::default();
        conn.pong = None;
        conn.shutdown_after_flush = false;
        self.shutdowns.push_back((id, Shutdown::Both));
        if !matches!(conn.phase, Phase::Closing { .. }) {
            self.begin_close(id);
        }
    }

    /// The next connection whose full socket needs a writer task.
    pub fn poll_writer(&mut self) -> Option<ConnId> {
        self.need_writer.pop()
    }

    /// The next socket to shut down, and how.
    pub fn poll_shutdown(&mut self) -> Option<(ConnId, Shutdown)> {
        self.shutdowns.pop_front()
    }

    /// Connection `id`'s writer task has ended (its socket drained, or the
    /// connection is closing or gone).
    pub fn writer_done(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id) {
            conn.writer_active = false;
        }
    }
}

/// What writing a connection's queue achieved.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Flushed {
    /// Everything queued was handed to the kernel.
    All,
    /// The socket buffer is full; wait for writability.
    Blocked,
}

/// Whether a frame of `frame_len` bytes may join a queue holding `queued`
/// bytes under `budget`: the queue stays within the budget, except that a
/// single frame larger than the budget still goes to a connection that has
/// nothing queued (one that keeps up). So a queue never holds more than
/// `max(budget, largest frame)`.
pub(super) fn fits_budget(queued: usize, frame_len: usize, budget: usize) -> bool {
    queued == 0 || queued + frame_len <= budget
}

#[cfg(test)]
mod tests {
    use super::fits_budget;

    #[test]
    fn the_budget_bounds_the_queue_but_never_starves_an_empty_one() {
        assert!(
            fits_budget(0, 10_000, 4096),
            "one large frame to an empty queue"
        );
        assert!(fits_budget(4000, 96, 4096), "exactly at the budget");
        assert!(!fits_budget(4000, 97, 4096), "one byte over");
        assert!(!fits_budget(1, 10_000, 4096));
    }
}
