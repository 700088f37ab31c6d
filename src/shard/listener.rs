//! Listening sockets and thread placement.

// sched_getaffinity / sched_setaffinity and socket options: libc calls,
// each block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Socket, Type};

/// Binds one `SO_REUSEPORT` listener per shard, so the kernel spreads
/// incoming connections over the shards without an acceptor thread. With
/// port 0 the first bind picks a free port and the others join it.
///
/// Before that, [`probe_unserved`] makes sure no other process listens on
/// `addr`: `SO_REUSEPORT` would otherwise let this process join that
/// process's group, and the kernel would split new connections between two
/// servers whose buses do not know each other.
pub fn bind_all(addr: SocketAddr, shards: usize, backlog: i32) -> io::Result<Vec<TcpListener>> {
    probe_unserved(addr)?;
    let mut addr = addr;
    let mut out = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        // The epoll driver would otherwise block the whole shard in accept().
        socket.set_nonblocking(true)?;
        let listener: TcpListener = socket.into();
        if addr.port() == 0 {
            addr = listener.local_addr()?;
        }
        out.push(listener);
    }
    Ok(out)
}

/// Binds `addr` once *without* `SO_REUSEPORT` and lets go at once: the
/// bind fails with `AddrInUse` if any socket listens there (ours with
/// `SO_REUSEPORT` or not), which `bind_all`'s own binds would not notice.
/// `SO_REUSEADDR` keeps connections in `TIME_WAIT` from a process that
/// exited from counting, and a listener that is only shut down (a server
/// draining for a restart) no longer listens, so the next one may start.
/// Port 0 always gets a fresh port: nothing to check.
///
/// Two processes starting in the same instant can both pass; the check is
/// for the common mistake of a second start, not a lock.
pub fn probe_unserved(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bitmask that sched_getaffinity fills in.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to one CPU, so a shard keeps its caches and
/// never migrates. Failure (e.g. a restricted cpuset) is logged, not fatal.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: as above; 0 means the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::warn!(cpu, error = %io::Error::last_os_error(), "cannot pin shard thread");
    }
}
