//! A connection's outbound queue: shared frames waiting for the socket.
//!
//! Frames are `Bytes` handed out by the fan-out path (a broadcast frame is
//! one allocation shared by every recipient), so queueing costs a refcount,
//! not a copy. Everything queued goes out with one `sendmsg` per wake-up
//! (gathered I/O), issued directly as a non-blocking syscall: the common case
//! is that the kernel takes the whole write at once, and then no io_uring
//! submission or owned buffer is needed at all. Only a connection whose
//! socket buffer is full waits for writability.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

use bytes::Bytes;

/// Most iovecs passed to one `sendmsg` (well under `IOV_MAX`; a connection
/// rarely has more frames than this queued, and the rest go on the next
/// round).
const MAX_IOVECS: usize = 64;

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued was handed to the kernel.
    All,
    /// The socket buffer is full; wait for writability.
    Blocked,
}

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
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

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

    /// Writes as much as the socket takes without blocking.
    pub fn flush(&mut self, fd: RawFd, now: Instant) -> io::Result<Flushed> {
        while !self.frames.is_empty() {
            let mut iov: [libc::iovec; MAX_IOVECS] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOVECS];
            let mut n = 0;
            for (i, f) in self.frames.iter().take(MAX_IOVECS).enumerate() {
                let part = if i == 0 {
                    &f[self.front_written..]
                } else {
                    &f[..]
                };
                iov[i] = libc::iovec {
                    iov_base: part.as_ptr() as *mut libc::c_void,
                    iov_len: part.len(),
                };
                n += 1;
            }
            // SAFETY: `msg` points at `n` iovecs that borrow frames owned by
            // `self.frames`, which is not touched until the call returns.
            let written = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = n as _;
                // MSG_NOSIGNAL: a peer that went away must give EPIPE, not
                // kill the process with SIGPIPE.
                libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if written < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => {
                        self.blocked_since.get_or_insert(now);
                        return Ok(Flushed::Blocked);
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(err),
                }
            }
            self.advance(written as usize);
        }
        self.blocked_since = None;
        Ok(Flushed::All)
    }

    fn advance(&mut self, mut written: usize) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn gathers_frames_into_one_stream_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut out = Outbound::default();
        for i in 0..100u8 {
            out.push(Bytes::from(vec![i; 10]));
        }
        assert_eq!(out.queued_bytes(), 1000);
        assert_eq!(
            out.flush(a.as_raw_fd(), Instant::now()).unwrap(),
            Flushed::All
        );
        assert_eq!(out.queued_bytes(), 0);
        let mut got = vec![0u8; 1000];
        b.read_exact(&mut got).unwrap();
        for (i, chunk) in got.chunks(10).enumerate() {
            assert!(chunk.iter().all(|&x| x == i as u8));
        }
    }

    #[test]
    fn a_full_socket_blocks_and_resumes_mid_frame() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut out = Outbound::default();
        let frame = Bytes::from((0..=255u8).cycle().take(1 << 20).collect::<Vec<u8>>());
        out.push(frame.clone());
        out.push(frame.clone());
        let t0 = Instant::now();
        assert_eq!(out.flush(a.as_raw_fd(), t0).unwrap(), Flushed::Blocked);
        assert_eq!(out.blocked_since(), Some(t0));
        let mut received = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while received.len() < 2 << 20 {
            let n = b.read(&mut buf).unwrap();
            received.extend_from_slice(&buf[..n]);
            out.flush(a.as_raw_fd(), Instant::now()).unwrap();
        }
        assert_eq!(out.queued_bytes(), 0);
        assert_eq!(out.blocked_since(), None);
        assert_eq!(&received[..1 << 20], &frame[..]);
        assert_eq!(&received[1 << 20..], &frame[..]);
    }

    #[test]
    fn discard_keeps_a_half_written_frame() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut out = Outbound::default();
        out.push(Bytes::from(vec![1u8; 4 << 20]));
        out.push(Bytes::from(vec![2u8; 100]));
        assert_eq!(
            out.flush(a.as_raw_fd(), Instant::now()).unwrap(),
            Flushed::Blocked
        );
        let left = out.queued_bytes();
        assert!(left > 100 && left < (4 << 20) + 100);
        out.discard_unstarted();
        assert_eq!(out.queued_bytes(), left - 100);
    }

    #[test]
    fn idle_queues_give_their_buffer_back() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut out = Outbound::default();
        out.push(Bytes::from_static(b"connected"));
        out.flush(a.as_raw_fd(), Instant::now()).unwrap();
        out.release_if_idle();
        assert!(out.frames.capacity() > 0, "used since the last check: kept");
        out.release_if_idle();
        assert_eq!(out.frames.capacity(), 0, "idle for a whole interval: freed");
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut out = Outbound::default();
        out.push(Bytes::from_static(b"hello"));
        assert!(out.flush(a.as_raw_fd(), Instant::now()).is_err());
    }
}
