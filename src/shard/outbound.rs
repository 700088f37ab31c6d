//! A connection's outbound queue: shared frames waiting for the socket.
//!
//! Frames are `Bytes` handed out by the fan-out path (a broadcast frame is
//! one allocation shared by every recipient), so queueing costs a refcount,
//! not a copy. The queue does no I/O: [`Outbound::gather`] lends the queued
//! bytes as `IoSlice`s for the driver's one gathered write, and
//! [`Outbound::advance`] records how much of them the kernel took.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::Instant;

use bytes::Bytes;

/// Most slices lent for one write (well under `IOV_MAX`; a connection
/// rarely has more frames than this queued, and the rest go on the next
/// round).
pub const MAX_IOVECS: usize = 64;

#[derive(Default)]
pub struct Outbound {
    frames: VecDeque<Bytes>,
    /// Bytes of the front frame already written.
    front_written: usize,
    /// Bytes queued and not yet written.
    queued: usize,
    /// When the oldest unsent byte started waiting on a full socket.
    blocked_since: Option<Instant>,
    /// Something was queued since the last `release_if_idle`.
    recently_used: bool,
}

impl Outbound {
    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// When the oldest unsent byte started waiting on a full socket
    /// (`None` while the socket takes everything).
    pub fn blocked_since(&self) -> Option<Instant> {
        self.blocked_since
    }

    pub fn push(&mut self, frame: Bytes) {
        self.recently_used = true;
        self.queued += frame.len();
        self.frames.push_back(frame);
    }

    /// Frees the queue's buffer if nothing was queued since the previous
    /// call and nothing is waiting; called periodically, so only idle
    /// connections lose (and later reallocate) it.
    pub fn release_if_idle(&mut self) {
        if !self.recently_used && self.frames.is_empty() && self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
        self.recently_used = false;
    }

    /// Drops everything not yet started, keeping the rest of a frame that is
    /// half written: cutting a frame in the middle would corrupt the stream
    /// for the close frame that follows.
    pub fn discard_unstarted(&mut self) {
        let keep = usize::from(self.front_written > 0);
        while self.frames.len() > keep {
            if let Some(f) = self.frames.pop_back() {
                self.queued -= f.len();
            }
        }
    }

    /// Fills `iov` with the unwritten bytes, oldest first (at most
    /// `iov.len()` frames); returns how many slices it filled (0: nothing
    /// queued).
    pub fn gather<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, (f, slot)) in self.frames.iter().zip(iov.iter_mut()).enumerate() {
            let part = if i == 0 {
                &f[self.front_written..]
            } else {
                &f[..]
            };
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }

    /// The kernel took `written` bytes from the front of the queue.
    pub fn advance(&mut self, mut written: usize) {
        self.queued -= written;
        while written > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let left = front.len() - self.front_written;
            if written >= left {
                written -= left;
                self.front_written = 0;
                self.frames.pop_front();
            } else {
                self.front_written += written;
                written = 0;
            }
        }
        if self.queued == 0 {
            self.blocked_since = None;
        }
    }

    /// The socket is full at `now`; the oldest unsent byte waits from the
    /// first such moment until the queue empties.
    pub fn blocked(&mut self, now: Instant) {
        self.blocked_since.get_or_insert(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a socket that takes at most `window` bytes per call receives.
    fn write_all(out: &mut Outbound, window: usize, wire: &mut Vec<u8>) {
        loop {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let n = out.gather(&mut iov);
            if n == 0 {
                return;
            }
            let mut took = 0;
            for s in &iov[..n] {
                let k = s.len().min(window - took);
                wire.extend_from_slice(&s[..k]);
                took += k;
                if took == window {
                    break;
                }
            }
            out.advance(took);
        }
    }

    #[test]
    fn gathers_frames_into_one_stream_in_order() {
        let mut out = Outbound::default();
        for i in 0..100u8 {
            out.push(Bytes::from(vec![i; 10]));
        }
        assert_eq!(out.queued_bytes(), 1000);
        let mut wire = Vec::new();
        write_all(&mut out, usize::MAX, &mut wire);
        assert_eq!(out.queued_bytes(), 0);
        for (i, chunk) in wire.chunks(10).enumerate() {
            assert!(chunk.iter().all(|&x| x == i as u8));
        }
        assert_eq!(wire.len(), 1000);
    }

    #[test]
    fn partial_writes_resume_mid_frame_and_unblock_when_empty() {
        let mut out = Outbound::default();
        let frame = Bytes::from((0..=255u8).cycle().take(10_000).collect::<Vec<u8>>());
        out.push(frame.clone());
        out.push(frame.clone());
        let t0 = Instant::now();
        out.blocked(t0);
        out.blocked(t0 + std::time::Duration::from_secs(1));
        assert_eq!(out.blocked_since(), Some(t0), "the first moment counts");
        let mut wire = Vec::new();
        write_all(&mut out, 333, &mut wire);
        assert_eq!(out.queued_bytes(), 0);
        assert_eq!(out.blocked_since(), None);
        assert_eq!(&wire[..10_000], &frame[..]);
        assert_eq!(&wire[10_000..], &frame[..]);
    }

    #[test]
    fn discard_keeps_a_half_written_frame() {
        let mut out = Outbound::default();
        out.push(Bytes::from(vec![1u8; 4096]));
        out.push(Bytes::from(vec![2u8; 100]));
        out.advance(1000);
        let left = out.queued_bytes();
        assert_eq!(left, 4096 - 1000 + 100);
        out.discard_unstarted();
        assert_eq!(out.queued_bytes(), left - 100);
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        assert_eq!(out.gather(&mut iov), 1);
        assert_eq!(iov[0].len(), 4096 - 1000, "the rest of the started frame");
    }

    #[test]
    fn idle_queues_give_their_buffer_back() {
        let mut out = Outbound::default();
        out.push(Bytes::from_static(b"connected"));
        out.advance(9);
        out.release_if_idle();
        assert!(out.frames.capacity() > 0, "used since the last check: kept");
        out.release_if_idle();
        assert_eq!(out.frames.capacity(), 0, "idle for a whole interval: freed");
    }
}
