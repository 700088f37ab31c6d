//! The driver's socket syscalls, issued directly as non-blocking calls on
//! a socket monoio has registered: the common case is that the kernel
//! takes a whole gathered write (or has the whole read) at once, and then
//! no io_uring submission or owned buffer is needed at all. Only a full
//! socket waits for writability (a writer task) and only an empty one for
//! readability (the reader task). This is the only file in `shard/` that
//! makes syscalls on connections.

// The syscalls themselves; each block says why it is sound.
#![allow(unsafe_code)]

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::RawFd;

/// `recv` without blocking: `Ok(0)` at end of stream, `WouldBlock` when
/// nothing is waiting. `fd` must be an open socket the caller keeps open.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the buffer is valid for `len` bytes and exclusively
        // borrowed; the caller keeps `fd` open for the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One gathered `sendmsg` without blocking; how many bytes the kernel took.
/// A peer that went away gives `EPIPE` (`MSG_NOSIGNAL`), never `SIGPIPE`.
pub fn send(fd: RawFd, iov: &[IoSlice<'_>]) -> io::Result<usize> {
    loop {
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix (std
        // documents it); `msg` points at `iov.len()` of them, borrowed for
        // the call; the caller keeps `fd` open for the call.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len() as _;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `shutdown(2)`; an error (already shut, peer gone) needs no handling.
pub fn shutdown(fd: RawFd, how: Shutdown) {
    let how = match how {
        Shutdown::Read => libc::SHUT_RD,
        Shutdown::Write => libc::SHUT_WR,
        Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: plain syscall on a descriptor the caller keeps open.
    unsafe {
        libc::shutdown(fd, how);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_gathered_send_writes_the_slices_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let parts = [&b"hello "[..], b"gathered ", b"world"];
        let iov: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        assert_eq!(send(a.as_raw_fd(), &iov).unwrap(), 20);
        let mut got = [0u8; 20];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello gathered world");
    }

    #[test]
    fn a_full_socket_would_block() {
        let (a, _b) = UnixStream::pair().unwrap();
        let big = vec![7u8; 1 << 20];
        let iov = [IoSlice::new(&big)];
        let mut total = 0;
        let err = loop {
            match send(a.as_raw_fd(), &iov) {
                Ok(n) => total += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(total > 0);
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(send(a.as_raw_fd(), &[IoSlice::new(b"hello")]).is_err());
    }

    #[test]
    fn recv_reports_end_of_stream_and_would_block() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 16];
        let e = recv(a.as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        shutdown(b.as_raw_fd(), Shutdown::Write);
        assert_eq!(recv(a.as_raw_fd(), &mut buf).unwrap(), 0);
    }
}
