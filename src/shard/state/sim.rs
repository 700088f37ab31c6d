//! A simulated world for the shard state, in the style of quinn-proto's
//! two-endpoint test harness: several [`State`]s joined by the real local
//! bus, a fake socket per connection that records every byte the state had
//! written to it, and one clock that moves only when a test moves it. The
//! harness performs the state's requests (writes, shutdowns, writers)
//! exactly as the monoio driver does, so every rule above the socket is
//! tested here without a socket, a thread or a sleep.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use super::{Flushed, Form, State, Time};
use crate::bus::local::{LocalBus, Retention};
use crate::config::Config;
use crate::metrics::Registry;
use crate::protocol::wire::{self, ClientEncoder, DecodeLimits, ServerMessage};
use crate::protocol::ws::OpCode;
use crate::shard::admission::Admission;
use crate::shard::slab::ConnId;
use crate::shard::transmit::write_with;
use crate::shard::Settings;

/// How often the simulated sweeper runs (the driver's `SWEEP_INTERVAL`).
pub const SWEEP: Duration = Duration::from_millis(100);

/// One simulated connection's socket and the client reading it.
#[derive(Default)]
struct FakeSocket {
    /// Bytes the kernel would buffer for a client that does not read;
    /// `None`: the client reads everything at once.
    capacity: Option<usize>,
    /// Written and not yet read by the client (in the kernel's buffer).
    unread: Vec<u8>,
    /// Read by the client, not yet a whole frame.
    partial: Vec<u8>,
    shut: Option<Shutdown>,
    /// The state asked for a writer (the socket was full).
    writer: bool,
    /// Messages the client decoded, not yet taken by the test.
    inbox: Vec<ServerMessage>,
    /// Close code of the close frame the client read, if any.
    close: Option<u16>,
    pings: usize,
    /// Payloads of the pongs the client read.
    pongs: Vec<Vec<u8>>,
}

/// A connection: the shard it is on and its id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub shard: usize,
    pub id: ConnId,
}

pub struct Sim {
    start: Instant,
    elapsed: Duration,
    unix_start_us: u64,
    pub shards: Vec<State>,
    sockets: Vec<HashMap<ConnId, FakeSocket>>,
    encoder: ClientEncoder,
    next_request: u32,
}

impl Sim {
    /// `shards` shard states on one local bus keeping `history` publications
    /// per channel, configured by `config`.
    pub fn new(shards: usize, history: usize, config: &Config) -> Sim {
        let retention = Retention {
            size: history,
            ttl: Duration::from_secs(300),
            max_bytes: 256 << 20,
            page_bytes: config.fanout.outbound_budget_bytes as usize / 4,
            idempotency_ttl: Duration::from_secs(3600),
        };
        let admission = Arc::new(Admission::new(u32::MAX, u32::MAX, u32::MAX));
        let registry = Arc::new(Registry::new(shards));
        let start = Instant::now();
        let unix_start_us = 1_800_000_000_000_000;
        let time = Time {
            mono: start,
            unix_us: unix_start_us,
        };
        let states = LocalBus::cluster(shards, retention)
            .into_iter()
            .enumerate()
            .map(|(i, bus)| {
                let settings = Settings::from_config(config, admission.clone(), None).unwrap();
                State::new(
                    i as u16,
                    Rc::new(settings),
                    Box::new(bus),
                    registry.clone(),
                    time,
                )
                .unwrap()
            })
            .collect();
        Sim {
            start,
            elapsed: Duration::ZERO,
            unix_start_us,
            shards: states,
            sockets: (0..shards).map(|_| HashMap::new()).collect(),
            encoder: ClientEncoder::new(),
            next_request: 0,
        }
    }

    /// The simulated time now.
    pub fn time(&self) -> Time {
        Time {
            mono: self.start + self.elapsed,
            unix_us: self.unix_start_us + self.elapsed.as_micros() as u64,
        }
    }

    /// Unix seconds now (for token claims).
    pub fn unix_secs(&self) -> u64 {
        self.time().unix_us / 1_000_000
    }

    /// Runs every shard until none has anything left to do: bus events,
    /// ticks, writes. Time does not move.
    pub fn settle(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..10_000 {
            let mut busy = false;
            for s in 0..self.shards.len() {
                let t = self.time();
                let state = &mut self.shards[s];
                state.touch(t);
                if state.poll_work(&mut cx).is_ready() {
                    busy = true;
                    state.tick();
                    self.perform(s);
                    self.shards[s].transmitted();
                }
            }
            if !busy {
                return;
            }
        }
        panic!("the shards never settled");
    }

    /// Moves the clock by `d`, running the sweeper every [`SWEEP`] and
    /// settling after each.
    pub fn advance(&mut self, d: Duration) {
        let end = self.elapsed + d;
        while self.elapsed < end {
            self.elapsed = (self.elapsed + SWEEP).min(end);
            for s in 0..self.shards.len() {
                let t = self.time();
                self.shards[s].touch(t);
                self.shards[s].sweep();
            }
            self.settle();
        }
    }

    /// Performs what shard `s` asked for, as the driver does.
    fn perform(&mut self, s: usize) {
        let mut batch = Vec::new();
        loop {
            self.shards[s].take_dirty(&mut batch);
            if batch.is_empty() {
                break;
            }
            for id in batch.drain(..) {
                self.write(s, id);
            }
        }
        while let Some((id, how)) = self.shards[s].poll_shutdown() {
            if let Some(sock) = self.sockets[s].get_mut(&id) {
                sock.shut = match (sock.shut, how) {
                    (Some(Shutdown::Both), _) => Some(Shutdown::Both),
                    _ => Some(how),
                };
            }
        }
        while let Some(id) = self.shards[s].poll_writer() {
            if let Some(sock) = self.sockets[s].get_mut(&id) {
                sock.writer = true;
            }
        }
    }

    /// The driver's write loop (`transmit::write_with`) against the fake
    /// socket: it takes what its buffer has room for, `WouldBlock` when
    /// full, and fails once shut.
    fn write(&mut self, s: usize, id: ConnId) -> Option<Flushed> {
        let state = &mut self.shards[s];
        let Some(sock) = self.sockets[s].get_mut(&id) else {
            state.write_failed(id);
            return None;
        };
        write_with(state, id, |_, iov| {
            if sock.shut == Some(Shutdown::Both) {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let room = sock
                .capacity
                .map_or(usize::MAX, |c| c.saturating_sub(sock.unread.len()));
            let mut took = 0;
            for slice in iov {
                let k = slice.len().min(room - took);
                sock.unread.extend_from_slice(&slice[..k]);
                took += k;
                if took == room {
                    break;
                }
            }
            if took == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(took)
        })
    }

    /// A client connects to shard `shard` and completes the upgrade (the
    /// 101 response is skipped).
    pub fn open(&mut self, shard: usize) -> Peer {
        self.open_unread(shard, None)
    }

    /// Like [`Sim::open`], for a client whose socket buffers at most
    /// `capacity` bytes until it reads.
    pub fn open_unread(&mut self, shard: usize, capacity: Option<usize>) -> Peer {
        let t = self.time();
        let state = &mut self.shards[shard];
        state.touch(t);
        let id = state.add_conn(SocketAddr::from((Ipv4Addr::LOCALHOST, 40000)), 0);
        self.sockets[shard].insert(
            id,
            FakeSocket {
                capacity,
                ..FakeSocket::default()
            },
        );
        self.shards[shard].accept_upgrade(id, b"HTTP/1.1 101 \r\n\r\n".to_vec(), Form::Native);
        self.settle();
        let sock = self.sockets[shard].get_mut(&id).unwrap();
        assert!(sock.unread.starts_with(b"HTTP/1.1 101"));
        sock.unread.clear();
        Peer { shard, id }
    }

    /// A connection that has not sent its upgrade request yet.
    pub fn accept_only(&mut self, shard: usize) -> Peer {
        let t = self.time();
        self.shards[shard].touch(t);
        let id = self.shards[shard].add_conn(SocketAddr::from((Ipv4Addr::LOCALHOST, 40000)), 0);
        self.sockets[shard].insert(id, FakeSocket::default());
        Peer { shard, id }
    }

    /// The client sends one binary message (already encoded); a close the
    /// state decides on is performed as the driver does. Then settles.
    pub fn send(&mut self, p: Peer, message: &[u8]) {
        let t = self.time();
        let state = &mut self.shards[p.shard];
        state.touch(t);
        state.received(p.id, message.len());
        if let Err(why) = state.on_client_message(p.id, message) {
            state.close(p.id, &why);
        }
        self.settle();
    }

    fn request_id(&mut self) -> u32 {
        self.next_request += 1;
        self.next_request
    }

    /// Sends `Connect` (with `token`, if any); returns its request id.
    pub fn connect(&mut self, p: Peer, token: Option<&str>) -> u32 {
        let id = self.request_id();
        let m = self.encoder.connect(id, token);
        self.send(p, &m);
        id
    }

    /// An anonymous client on `shard`, connected; its `Connected` reply taken.
    pub fn client(&mut self, shard: usize) -> Peer {
        let p = self.open(shard);
        self.connect(p, None);
        let got = self.take(p);
        assert!(
            matches!(got[..], [ServerMessage::Connected { .. }]),
            "{got:?}"
        );
        p
    }

    pub fn subscribe(&mut self, p: Peer, channel: &str, recover: Option<wire::Position>) -> u32 {
        let id = self.request_id();
        let m = self.encoder.subscribe(id, channel, recover);
        self.send(p, &m);
        id
    }

    pub fn publish(&mut self, p: Peer, channel: &str, payload: &[u8]) -> u32 {
        let id = self.request_id();
        let m = self.encoder.publish(id, channel, payload, None);
        self.send(p, &m);
        id
    }

    pub fn presence_query(&mut self, p: Peer, channel: &str) -> u32 {
        let id = self.request_id();
        let m = self.encoder.presence_query(id, channel);
        self.send(p, &m);
        id
    }

    pub fn ping(&mut self, p: Peer) -> u32 {
        let id = self.request_id();
        let m = self.encoder.ping(id);
        self.send(p, &m);
        id
    }

    /// The client goes away (its reader ends): the driver removes it.
    pub fn disconnect(&mut self, p: Peer) {
        let t = self.time();
        self.shards[p.shard].touch(t);
        self.shards[p.shard].remove_conn(p.id);
        self.sockets[p.shard].remove(&p.id);
        self.settle();
    }

    /// The client reads everything its socket holds; a writer the state
    /// asked for then gets its turn, as the driver's writer task would.
    /// Returns the messages decoded so far (taking them).
    pub fn take(&mut self, p: Peer) -> Vec<ServerMessage> {
        loop {
            let sock = self.sockets[p.shard].get_mut(&p.id).expect("connection");
            read_frames(sock);
            if !sock.writer {
                break;
            }
            let t = self.time();
            self.shards[p.shard].touch(t);
            let flushed = self.write(p.shard, p.id);
            if flushed != Some(Flushed::Blocked) {
                self.shards[p.shard].writer_done(p.id);
                if let Some(sock) = self.sockets[p.shard].get_mut(&p.id) {
                    sock.writer = false;
                }
            }
            self.shards[p.shard].wake_if_needed();
            self.settle();
            if flushed == Some(Flushed::Blocked) {
                // Read again: the socket filled up once more.
                continue;
            }
        }
        let sock = self.sockets[p.shard].get_mut(&p.id).expect("connection");
        std::mem::take(&mut sock.inbox)
    }

    /// The close code the client has read (after [`Sim::take`]).
    pub fn close_code(&mut self, p: Peer) -> Option<u16> {
        self.take(p);
        self.sockets[p.shard][&p.id].close
    }

    /// How the state had the socket shut, if it did.
    pub fn shut(&self, p: Peer) -> Option<Shutdown> {
        self.sockets[p.shard][&p.id].shut
    }

    /// Keepalive pings the client has read.
    pub fn pings(&mut self, p: Peer) -> usize {
        self.take(p);
        self.sockets[p.shard][&p.id].pings
    }

    /// Payloads of the pongs the client has read.
    pub fn pongs(&mut self, p: Peer) -> Vec<Vec<u8>> {
        self.take(p);
        self.sockets[p.shard][&p.id].pongs.clone()
    }

    /// Bytes written to the client and not read yet.
    pub fn unread(&self, p: Peer) -> usize {
        self.sockets[p.shard][&p.id].unread.len()
    }
}

/// The client reads everything the socket holds and parses the complete
/// server frames (unmasked, RFC 6455 §5.2) into its inbox.
fn read_frames(sock: &mut FakeSocket) {
    let mut at = 0;
    let mut buf = std::mem::take(&mut sock.partial);
    buf.append(&mut sock.unread);
    while buf.len() - at >= 2 {
        let op = buf[at] & 0x0F;
        let (len, head) = match buf[at + 1] & 0x7F {
            126 if buf.len() - at >= 4 => {
                (u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize, 4)
            }
            127 if buf.len() - at >= 10 => (
                u64::from_be_bytes(buf[at + 2..at + 10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if buf.len() - at < head + len {
            break;
        }
        let payload = &buf[at + head..at + head + len];
        match OpCode::from_u8(op) {
            Some(OpCode::Binary) => {
                let limits = DecodeLimits {
                    max_bytes: usize::MAX,
                    max_messages: usize::MAX,
                };
                let msgs = wire::decode_server_frame(payload, &limits).expect("a valid frame");
                sock.inbox.extend(msgs.into_iter().map(|(_, m)| m));
            }
            Some(OpCode::Close) => {
                sock.close = Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
            Some(OpCode::Ping) => sock.pings += 1,
            Some(OpCode::Pong) => sock.pongs.push(payload.to_vec()),
            other => panic!("unexpected frame {other:?}"),
        }
        at += head + len;
    }
    sock.partial = buf[at..].to_vec();
}
