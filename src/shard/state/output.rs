//! Getting queued frames onto sockets: queueing a frame for a connection,
//! the tick's flush of every dirty connection, and the writer task's
//! retries once a full socket becomes writable.

use bytes::Bytes;

use super::connections::{shutdown, Phase};
use super::State;
use crate::shard::outbound::{Flushed, Outbound};
use crate::shard::slab::ConnId;

impl State {
    pub(super) fn enqueue(&mut self, id: ConnId, frame: Bytes) {
        if let Some(conn) = self.conns.get_mut(id) {
            conn.out.push(frame);
            self.mark_dirty(id);
        }
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
        let before = conn.out.queued_bytes();
        let result = conn.out.flush(conn.fd, now);
        self.counters.bytes_out += (before - conn.out.queued_bytes()) as u64;
        match result {
            Ok(Flushed::All) => {
                if conn.shutdown_after_flush {
                    conn.shutdown_after_flush = false;
                    shutdown(conn.fd, libc::SHUT_WR);
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
