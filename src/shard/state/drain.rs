//! Graceful drain: on shutdown every connection is closed with 1012, a
//! share at a time, so that the clients' reconnects are spread out.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::connections::{Conn, Phase};
use super::form::CloseCause;
use super::State;

/// A graceful shutdown in progress: connections are closed a few at a
/// time over the window so their reconnects do not arrive all at once.
pub(super) struct Drain {
    started: Instant,
    /// Closes are spread over this part of the window; the rest is left
    /// for flushing and the clients' close replies.
    spread: Duration,
    deadline: Instant,
    total: usize,
    closed: usize,
}

impl State {
    /// Starts draining: every connection gets 1012 within `window`.
    pub fn begin_drain(&mut self, window: Duration) {
        self.drain = Some(Drain {
            started: self.now,
            spread: window.mul_f32(0.8),
            deadline: self.now + window,
            total: self.conns.len(),
            closed: 0,
        });
        self.drain_step();
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_some()
    }

    /// Whether draining has finished: no connection left, or out of time.
    pub fn drained(&self) -> bool {
        self.drain
            .as_ref()
            .is_some_and(|d| self.conns.len() == 0 || self.now >= d.deadline)
    }

    /// Closes this step's share of the connections.
    pub(super) fn drain_step(&mut self) {
        let Some(d) = &self.drain else {
            return;
        };
        let elapsed = self.now.duration_since(d.started);
        let due = if elapsed >= d.spread || d.spread.is_zero() {
            usize::MAX
        } else {
            (d.total as f64 * elapsed.as_secs_f64() / d.spread.as_secs_f64()).ceil() as usize
        };
        let planned = due.saturating_sub(d.closed);
        let mut budget = planned;
        if budget == 0 {
            return;
        }
        let deadline = d.deadline;
        let mut victims = Vec::new();
        for (id, conn) in self.conns.iter_mut() {
            if budget == 0 {
                break;
            }
            match conn.phase {
                // Answered (and closed) once the bus has stored what it
                // publishes, within redis.command_timeout_ms.
                Phase::Closing { .. } | Phase::Http => continue,
                Phase::Handshake => self.shutdowns.push_back((id, Shutdown::Both)),
                Phase::Open { .. } => victims.push(id),
            }
            budget -= 1;
        }
        let why = CloseCause::Draining;
        let n = planned - budget;
        for id in victims {
            self.close(id, &why);
            if let Some(Conn {
                phase: Phase::Closing { deadline: d },
                ..
            }) = self.conns.get_mut(id)
            {
                *d = (*d).min(deadline);
            }
        }
        if let Some(d) = &mut self.drain {
            d.closed += n;
        }
    }
}
