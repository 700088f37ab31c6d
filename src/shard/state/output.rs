//! Getting queued frames onto sockets: queueing a frame for a connection,
//! the tick's flush of every dirty connection, and the writer task's
//! retries once a full socket becomes writable.

use bytes::Bytes;

use super::connections::{shutdown, slow_consumer, Phase};
use super::State;
use crate::shard::outbound::{Flushed, Outbound};
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
                .push((id, slow_consumer("outbound budget exceeded")));
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

    pub(super) fn flush_dirty(&mut self) {
        // Flushing can mark more connections dirty (a failed write closes
        // its connection), so keep going until nothing is left.
        let mut batch = std::mem::take(&mut self.dirty);
        loop {
            for id in batch.drain(..) {
                self.flush_conn(id);
            }
            if self.dirty.is_empty() {
                break;
            }
            std::mem::swap(&mut batch, &mut self.dirty);
        }
        self.dirty = batch;
    }

    /// Writes what the connection has queued; called by the tick and by the
    /// connection's writer task once the socket is writable again.
    pub fn flush_conn(&mut self, id: ConnId) -> Option<Flushed> {
        // Bus requests go out before the replies they caused: once a client
        // has seen a reply, whatever it does next (on any shard) reaches the
        // bus after the request behind that reply (see `bus::local`).
        if self.bus_pending {
            self.bus_pending = false;
            self.bus.flush();
        }
        let now = self.now;
        let conn = self.conns.get_mut(id)?;
        conn.dirty = false;
        let mut before = conn.out.queued_bytes();
        // The owed pong joins the queue only while the socket takes what we
        // write (on a blocked socket it waits in its slot, replaced by newer
        // ones); a flush that empties the queue makes room for it, so at
        // most one more round. Never after our close frame.
        let mut result = conn.out.flush(conn.fd, now);
        if matches!(result, Ok(Flushed::All)) && matches!(conn.phase, Phase::Open { .. }) {
            if let Some(pong) = conn.pong.take() {
                before += pong.len();
                conn.out.push(pong);
                result = conn.out.flush(conn.fd, now);
            }
        }
        self.counters.bytes_out += (before - conn.out.queued_bytes()) as u64;
        match result {
            Ok(Flushed::All) => {
                if conn.shutdown_after_flush {
                    conn.shutdown_after_flush = false;
                    shutdown(conn.fd, libc::SHUT_WR);
                }
                // Catch-up paused for this connection's queue to drain
                // goes on (it marks the connection dirty again).
                if !self.paced.is_empty() {
                    self.resume_paced(id);
                }
                Some(Flushed::All)
            }
            Ok(Flushed::Blocked) => {
                if !conn.writer_active {
                    conn.writer_active = true;
                    self.need_writer.push((id, conn.stream.clone()));
                    self.watched.push(id);
                }
                Some(Flushed::Blocked)
            }
            Err(_) => {
                // The peer is gone: nothing queued can be delivered.
                // Shutting down wakes the reader, which removes the
                // connection.
                conn.out = Outbound::default();
                conn.pong = None;
                conn.shutdown_after_flush = false;
                shutdown(conn.fd, libc::SHUT_RDWR);
                if !matches!(conn.phase, Phase::Closing { .. }) {
                    self.begin_close(id);
                }
                None
            }
        }
    }

    /// Called by a writer task when its socket became writable. Returns
    /// whether the writer should keep waiting.
    pub fn writable(&mut self, id: ConnId) -> bool {
        self.touch();
        let keep_waiting = match self.flush_conn(id) {
            Some(Flushed::Blocked) => true,
            _ => {
                if let Some(conn) = self.conns.get_mut(id) {
                    conn.writer_active = false;
                }
                false
            }
        };
        self.wake_if_needed();
        keep_waiting
    }
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
