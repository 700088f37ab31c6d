//! The connection table's records and their life: what the shard keeps per
//! connection, the admission decision at accept, the upgrade, and closing
//! (close frame, linger, shutdown).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::form::{CloseCause, Form};
use super::State;
use crate::auth::Identity;
use crate::metrics::Limit;
use crate::protocol::ws;
use crate::shard::admission::Verdict;
use crate::shard::outbound::Outbound;
use crate::shard::rate::TokenBucket;
use crate::shard::slab::ConnId;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Upgrade request not complete yet.
    Handshake,
    /// WebSocket open; `connected` once the client sent `Connect`.
    Open { connected: bool },
    /// An HTTP API request read in full, waiting for the bus to store its
    /// publications; answered, then closed (no handshake deadline, no
    /// keepalive).
    Http,
    /// Close frame (or HTTP error) queued; the socket is shut down when it
    /// is flushed or at `deadline`, whichever comes first.
    Closing { deadline: Instant },
}

pub struct Conn {
    /// The driver's name for this connection's socket, handed back with
    /// each write ([`State::begin_write`]) so the driver's write path needs
    /// no table of its own. Opaque here: the state never uses it.
    pub(super) handle: u32,
    pub(super) out: Outbound,
    pub(super) subs: Vec<Arc<str>>,
    pub(super) phase: Phase,
    /// Queued in `State::dirty` for this tick's flush.
    pub(super) dirty: bool,
    /// A writer task is waiting for this socket to become writable.
    pub(super) writer_active: bool,
    /// Shut the write side once `out` drains (after a close frame).
    pub(super) shutdown_after_flush: bool,
    /// The client's address and port (for the per-address limits and the
    /// debug log lines of its life).
    pub(super) peer: SocketAddr,
    /// Counted in the per-IP table; released when the connection ends.
    admitted: bool,
    /// Decided at accept: answer the upgrade request with this instead.
    refusal: Option<Box<Refusal>>,
    /// Last time anything arrived from the client.
    pub(super) last_seen: Instant,
    /// A keepalive ping is out and unanswered.
    pub(super) pinged: bool,
    pub(super) bucket: TokenBucket,
    /// Rate-limited messages in a row.
    pub(super) strikes: u32,
    /// Set by a Connect with a token; `None` for anonymous clients.
    pub(super) identity: Option<Box<Identity>>,
    /// What the connection speaks (chosen at the upgrade).
    pub(super) form: Form,
    /// The pong owed for the client's most recent ping, held here while
    /// the socket is blocked: RFC 6455 §5.5.3 lets a server answer only the
    /// most recent ping, so a ping flood costs one slot, not a queue.
    pub(super) pong: Option<Bytes>,
}

/// An HTTP refusal of the upgrade (limits hit at accept).
pub struct Refusal {
    pub status: u16,
    pub message: String,
    pub retry_after_secs: Option<u32>,
}

/// Per-connection deadlines set when a connection enters a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Deadline {
    Handshake,
    Connect,
    /// An HTTP API request waiting for the bus.
    Http,
}

impl State {
    /// Registers an accepted connection from `peer` and decides whether it
    /// will be admitted; a refused one is answered once its request head
    /// arrives. `handle` is the driver's opaque name for its socket (see
    /// [`Conn::handle`]).
    pub fn add_conn(&mut self, peer: SocketAddr, handle: u32) -> ConnId {
        let now = self.now;
        let limits = &self.settings.limits;
        let mut admitted = false;
        self.counters.connections_accepted += 1;
        let refusal = if self.conns.len() >= limits.max_connections_per_shard as usize {
            self.counters.limit(Limit::Capacity);
            Some(Refusal {
                status: 503,
                message: "server at connection capacity; retry later".into(),
                retry_after_secs: Some(5),
            })
        } else {
            match self.settings.admission.admit(peer.ip(), now) {
                Verdict::Admit => {
                    admitted = true;
                    None
                }
                Verdict::TooManyConnections { limit } => {
                    self.counters.limit(Limit::PerIp);
                    Some(Refusal {
                        status: 503,
                        message: format!("too many connections from your address (limit {limit})"),
                        retry_after_secs: Some(5),
                    })
                }
                Verdict::TooFast { retry_after_secs } => {
                    self.counters.limit(Limit::AcceptRate);
                    Some(Refusal {
                        status: 503,
                        message: "connecting too fast from your address".into(),
                        retry_after_secs: Some(retry_after_secs),
                    })
                }
            }
        };
        let id = self.conns.insert(Conn {
            handle,
            out: Outbound::default(),
            subs: Vec::new(),
            phase: Phase::Handshake,
            dirty: false,
            writer_active: false,
            shutdown_after_flush: false,
            peer,
            admitted,
            refusal: refusal.map(Box::new),
            last_seen: now,
            pinged: false,
            bucket: TokenBucket::new(limits.message_burst, now),
            strikes: 0,
            identity: None,
            form: Form::default(),
            pong: None,
        });
        let deadline = now + Duration::from_millis(u64::from(limits.handshake_timeout_ms));
        self.deadlines.push(deadline, (id, Deadline::Handshake));
        tracing::debug!(shard = self.shard, %peer, "connection opened");
        id
    }

    /// The client's address of connection `id`, if it is still there.
    pub fn peer(&self, id: ConnId) -> Option<SocketAddr> {
        self.conns.get(id).map(|c| c.peer)
    }

    /// Takes the refusal decided at accept, if any.
    pub fn take_refusal(&mut self, id: ConnId) -> Option<Box<Refusal>> {
        self.conns.get_mut(id).and_then(|c| c.refusal.take())
    }

    /// Records that `bytes` arrived (keepalive bookkeeping and metrics).
    pub fn received(&mut self, id: ConnId, bytes: usize) {
        self.counters.bytes_in += bytes as u64;
        let now = self.now;
        if let Some(c) = self.conns.get_mut(id) {
            c.last_seen = now;
            c.pinged = false;
        }
    }

    /// Forgets a connection whose socket is done (the driver shuts it, so
    /// a writer still waiting on it wakes up and exits).
    pub fn remove_conn(&mut self, id: ConnId) {
        self.detach(id);
        self.api_waits.remove(&id);
        self.client_event_buckets.remove(&id);
        self.pusher_conn_apps.remove(&id);
        if let Some(conn) = self.conns.remove(id) {
            tracing::debug!(shard = self.shard, peer = %conn.peer, "connection ended");
            if conn.admitted {
                self.settings.admission.release(conn.peer.ip());
            }
        }
        // Leaving its channels may have queued unsubscribes for the bus.
        self.wake_if_needed();
    }

    /// The handshake succeeded: queue the 101 response.
    pub fn accept_upgrade(&mut self, id: ConnId, response: Vec<u8>, form: Form) {
        if let Some(conn) = self.conns.get_mut(id) {
            conn.phase = Phase::Open { connected: false };
            conn.form = form;
        }
        let deadline = self.now + Duration::from_millis(u64::from(self.settings.auth_deadline_ms));
        self.deadlines.push(deadline, (id, Deadline::Connect));
        self.enqueue(id, Bytes::from(response));
    }

    /// The handshake failed: queue the HTTP error and close after it.
    pub fn reject_upgrade(&mut self, id: ConnId, response: Vec<u8>) {
        if let Some(conn) = self.conns.get(id) {
            tracing::debug!(
                shard = self.shard,
                peer = %conn.peer,
                // "HTTP/1.1 404 ...": read only when debug is on.
                status = %response
                    .get(9..12)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .unwrap_or("?"),
                "upgrade answered with HTTP; closing"
            );
        }
        self.enqueue(id, Bytes::from(response));
        self.begin_close(id);
    }

    /// Sends a close frame (the code and reason the connection's form
    /// gives `why`) and starts closing.
    pub fn close(&mut self, id: ConnId, why: &CloseCause) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if matches!(conn.phase, Phase::Closing { .. }) {
            return;
        }
        if why.drops_backlog() {
            conn.out.discard_unstarted();
            self.counters.slow_consumer_closes += 1;
        }
        let (code, reason) = conn.form.close(why);
        // The peer's own close (and reason) is logged where it arrives.
        if !matches!(why, CloseCause::PeerClosed(_)) {
            tracing::debug!(
                shard = self.shard,
                peer = %conn.peer,
                code,
                reason = %reason,
                "closing connection"
            );
        }
        conn.out.push(ws::close_frame(code, &reason));
        self.mark_dirty(id);
        self.begin_close(id);
    }

    /// Owes the client `pong` (the answer to its latest ping), replacing a
    /// pong not yet queued: see [`Conn::pong`]. It is queued by the next
    /// flush that finds the socket writable.
    pub fn owe_pong(&mut self, id: ConnId, pong: Bytes) {
        if let Some(conn) = self.conns.get_mut(id) {
            conn.pong = Some(pong);
            self.mark_dirty(id);
        }
    }

    pub(super) fn begin_close(&mut self, id: ConnId) {
        let deadline = self.now + self.settings.close_timeout;
        if let Some(conn) = self.conns.get_mut(id) {
            conn.phase = Phase::Closing { deadline };
            conn.shutdown_after_flush = true;
            // Nothing may follow the close frame (RFC 6455 §5.5.1).
            conn.pong = None;
        }
        self.detach(id);
        self.watched.push(id);
        self.mark_dirty(id);
    }

    /// What connection `id` speaks (the default form once it is gone:
    /// whatever is encoded for it then is dropped anyway).
    pub(super) fn form_of(&self, id: ConnId) -> Form {
        self.conns.get(id).map_or(Form::default(), |c| c.form)
    }
}
