//! Time budgets, enforced by the sweeper every `SWEEP_INTERVAL`: handshake
//! and Connect deadlines, slow consumers and lingering closes, and once per
//! `SCAN_INTERVAL` keepalive pings, idle timeouts and token expiry.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::connections::{Deadline, Phase};
use super::form::CloseCause;
use super::State;
use crate::metrics::Limit;
use crate::protocol::ws::{self, OpCode};

impl State {
    /// Enforces the time budgets: slow consumers whose oldest queued byte is
    /// too old, and closing connections past their linger deadline.
    pub fn sweep(&mut self) {
        let now = self.now;
        self.expire_deadlines(now);
        self.expire_ahead(now);
        self.drain_step();
        if now.duration_since(self.last_scan) >= SCAN_INTERVAL {
            self.last_scan = now;
            self.scan(now);
        }
        let max_age = self.settings.outbound_max_age;
        let mut watched = std::mem::take(&mut self.watched);
        watched.retain(|&id| {
            let Some(conn) = self.conns.get(id) else {
                return false;
            };
            match conn.phase {
                Phase::Closing { deadline } => {
                    if now >= deadline {
                        self.shutdowns.push_back((id, Shutdown::Both));
                        return false;
                    }
                    true
                }
                _ if conn.writer_active => {
                    if conn
                        .out
                        .blocked_since()
                        .is_some_and(|t| now.duration_since(t) > max_age)
                    {
                        self.to_close.push((
                            id,
                            CloseCause::SlowConsumer("oldest queued message too old"),
                        ));
                    }
                    true
                }
                _ => false,
            }
        });
        watched.append(&mut self.watched);
        self.watched = watched;
        self.close_pending();
        self.wake_if_needed();
    }

    /// Handshakes and Connects that did not arrive in time.
    fn expire_deadlines(&mut self, now: Instant) {
        self.deadlines.shrink_if_empty();
        let mut http = Vec::new();
        while let Some((id, kind)) = self.deadlines.pop_due(now) {
            let Some(conn) = self.conns.get(id) else {
                continue;
            };
            match (kind, &conn.phase) {
                (Deadline::Http, Phase::Http) => http.push(id),
                (Deadline::Handshake, Phase::Handshake) => {
                    // A slowloris: no response is owed, just the socket.
                    tracing::debug!(shard = self.shard, peer = %conn.peer, "handshake timed out");
                    self.counters.limit(Limit::Handshake);
                    self.shutdowns.push_back((id, Shutdown::Both));
                }
                (Deadline::Connect, Phase::Open { connected: false }) => {
                    self.counters.limit(Limit::AuthDeadline);
                    let ms = self.settings.auth_deadline_ms;
                    self.to_close.push((id, CloseCause::AuthDeadline { ms }));
                }
                _ => {}
            }
        }
        for id in http {
            self.http_timed_out(id);
        }
    }

    /// Keepalive pings, idle timeouts and token expiry: one pass over every
    /// connection per `SCAN_INTERVAL` (cheap next to the per-message work,
    /// and no per-connection timers to keep).
    fn scan(&mut self, now: Instant) {
        let ping_after = Duration::from_millis(u64::from(self.settings.limits.ping_interval_ms));
        let idle_after = Duration::from_millis(u64::from(self.settings.limits.idle_timeout_ms));
        let now_secs = self.unix_ms() / 1000;
        let mut pings = Vec::new();
        for (id, conn) in self.conns.iter_mut() {
            if !matches!(conn.phase, Phase::Open { .. }) {
                continue;
            }
            // A connection that received nothing for a whole scan interval
            // gives its queue's buffer back: idle connections should cost
            // almost nothing, busy ones keep theirs (no allocation per
            // delivery).
            conn.out.release_if_idle();
            let silent = now.duration_since(conn.last_seen);
            if silent >= idle_after {
                self.counters.limit(Limit::Idle);
                let ms = idle_after.as_millis() as u64;
                self.to_close.push((id, CloseCause::Idle { ms }));
            } else if silent >= ping_after && !conn.pinged {
                conn.pinged = true;
                pings.push(id);
            }
            if conn
                .identity
                .as_ref()
                .and_then(|i| i.expires)
                .is_some_and(|exp| now_secs > exp + u64::from(self.settings.leeway_secs))
            {
                self.counters.limit(Limit::TokenExpired);
                self.to_close.push((id, CloseCause::TokenExpired));
            }
        }
        let ping = ws::frame(OpCode::Ping, b"");
        for id in pings {
            self.enqueue(id, ping.clone());
        }
    }
}

/// How often the keepalive / idle / expiry scan runs.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
