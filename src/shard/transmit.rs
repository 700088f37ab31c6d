//! Performing what the shard state asks for: writing each connection with
//! output (one gathered `sendmsg` per round), shutting sockets, starting a
//! writer task for each full socket. The state decides; this file only
//! does what it says, on the sockets it keeps.
//!
//! A write reaches its socket through the handle the state hands back
//! (the descriptor, given at `add_conn`) rather than through [`Sockets`]:
//! the connection's record is in cache during its write anyway, a second
//! table is not (measured: the extra lookup per delivery cost more user
//! CPU than the rest of the write path). The descriptor is valid whenever
//! the state still has the connection: the reader removes the connection
//! from the state in the same turn as it drops its socket, and a writer
//! task keeps its own reference to the socket.

#![forbid(unsafe_code)]

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use monoio::net::TcpStream;

use super::outbound::MAX_IOVECS;
use super::slab::ConnId;
use super::state::{Flushed, State};
use super::sys;
use super::{conn, Shard};

/// The shard's sockets by connection id: the state knows connections by
/// id only. Indexed by the id's slot, so a lookup is two bounds checks and
/// one comparison (a stale id finds nothing). Stored in fixed chunks of
/// [`CHUNK`] slots that are never reallocated: a table grown by doubling
/// left its outgrown copies in the allocator's pages (measured: ~20 % more
/// RSS per idle connection in `shardcast-bench idle`).
#[derive(Default)]
pub struct Sockets {
    chunks: Vec<Box<[Slot; CHUNK]>>,
}

type Slot = Option<(ConnId, Rc<TcpStream>)>;

/// Slots per chunk (16 KiB each).
const CHUNK: usize = 1024;

impl Sockets {
    pub fn insert(&mut self, id: ConnId, stream: Rc<TcpStream>) {
        let (chunk, i) = (id.slot() / CHUNK, id.slot() % CHUNK);
        while self.chunks.len() <= chunk {
            self.chunks.push(Box::new([const { None }; CHUNK]));
        }
        self.chunks[chunk][i] = Some((id, stream));
    }

    fn slot(&self, id: ConnId) -> Option<&Slot> {
        self.chunks
            .get(id.slot() / CHUNK)
            .map(|c| &c[id.slot() % CHUNK])
    }

    pub fn get(&self, id: ConnId) -> Option<&Rc<TcpStream>> {
        match self.slot(id) {
            Some(Some((owner, stream))) if *owner == id => Some(stream),
            _ => None,
        }
    }

    pub fn remove(&mut self, id: ConnId) {
        let (chunk, i) = (id.slot() / CHUNK, id.slot() % CHUNK);
        if let Some(slot) = self.chunks.get_mut(chunk).map(|c| &mut c[i]) {
            if slot.as_ref().is_some_and(|(owner, _)| *owner == id) {
                *slot = None;
            }
        }
    }
}

/// Does everything the state left to do after a turn: writes, shutdowns,
/// writers to start.
pub fn perform(shard: &Rc<Shard>, state: &mut State) {
    let sockets = shard.sockets.borrow();
    let mut batch = shard.write_batch.borrow_mut();
    loop {
        state.take_dirty(&mut batch);
        if batch.is_empty() {
            break;
        }
        for id in batch.drain(..) {
            write(state, id);
        }
    }
    while let Some((id, how)) = state.poll_shutdown() {
        if let Some(stream) = sockets.get(id) {
            sys::shutdown(stream.as_raw_fd(), how);
        }
    }
    while let Some(id) = state.poll_writer() {
        match sockets.get(id) {
            Some(stream) => {
                monoio::spawn(conn::writer(shard.clone(), id, stream.clone()));
            }
            None => state.writer_done(id),
        }
    }
}

/// Writes connection `id`'s queue to its socket until it is empty, the
/// socket is full or the write fails; `None` if the connection is gone or
/// failed.
pub fn write(state: &mut State, id: ConnId) -> Option<Flushed> {
    write_with(state, id, |handle, iov| sys::send(handle as RawFd, iov))
}

/// The write loop of [`write`] over any `send`, which gets the socket's
/// handle and the slices to write and answers how many bytes the socket
/// took (`WouldBlock` when it is full, any other error when it failed).
/// The state tests run the same loop against fake sockets.
pub fn write_with(
    state: &mut State,
    id: ConnId,
    mut send: impl FnMut(u32, &[IoSlice<'_>]) -> io::Result<usize>,
) -> Option<Flushed> {
    let handle = state.begin_write(id)?;
    loop {
        let sent = {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let n = state.gather(id, &mut iov);
            if n == 0 {
                return Some(state.write_drained(id));
            }
            send(handle, &iov[..n])
        };
        match sent {
            Ok(n) => {
                if !state.wrote(id, n) {
                    return Some(state.write_drained(id));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Some(state.write_blocked(id));
            }
            Err(_) => {
                state.write_failed(id);
                return None;
            }
        }
    }
}
