//! Shared integration-test helpers: start the real `shardcast` binary on a
//! free loopback port and talk to it as a native client would.
//!
//! The driver under test follows the environment: `.ci/run` runs the suite
//! once as is (io_uring) and once with `MONOIO_FORCE_LEGACY_DRIVER=1`.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shardcast::protocol::wire::{self, ClientEncoder, DecodeLimits, Position, ServerMessage};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous bound for anything a test waits on; a hang fails instead of
/// blocking CI.
pub const WAIT: Duration = Duration::from_secs(20);

mod redis_server;
pub mod sdk;
#[allow(unused_imports)] // only the Redis test files use it
pub use redis_server::{free_port, RedisServer};

/// Lifts the per-connection message rate limit, for tests that publish in
/// bulk from one connection.
pub const BULK_PUBLISHER: [&str; 4] = [
    "--limits-messages-per-second",
    "1000000",
    "--limits-message-burst",
    "1000000",
];

/// Reads the first stdout line of a `shardcast serve` started with piped
/// stdout ("shardcast listening on 127.0.0.1:PORT shards=2 driver=…
/// admin=…"): the address, and the line for its other fields.
pub fn read_listening_line(child: &mut Child) -> (SocketAddr, String) {
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .parse()
        .expect("address");
    (addr, line)
}

/// A running `shardcast serve`, killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub driver: String,
    /// The admin endpoint's address.
    pub admin: Option<SocketAddr>,
}

impl Server {
    /// Starts the server with two shards on a free port, plus `args`.
    pub fn start(args: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardcast"));
        cmd.arg("serve")
            .args(["--server-listen", "127.0.0.1:0", "--server-shards", "2"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(args)
            .env("SHARDCAST_LOG_LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn shardcast");
        let (addr, line) = read_listening_line(&mut child);
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or("")
                .to_string()
        };
        let driver = field("driver=");
        let admin = field("admin=").parse().ok();
        Server {
            child,
            addr,
            driver,
            admin,
        }
    }

    /// Whether the process is still alive (it must survive bad input).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the server process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A native-protocol client over tokio-tungstenite.
pub struct Client {
    pub ws: Ws,
    enc: ClientEncoder,
    next_id: u32,
    inbox: VecDeque<(u32, ServerMessage)>,
    pub client_id: u64,
    pub shard: u32,
    /// Negotiated `shardcast.v1+zstd`.
    pub zstd: Option<Zstd>,
}

/// Client side of the zstd framing, with counters for assertions.
#[derive(Default)]
pub struct Zstd {
    pub dictionary: Option<(u32, Vec<u8>)>,
    /// Messages received per flag byte (plain, zstd, zstd+dictionary).
    pub received: [usize; 3],
    /// Bytes on the wire and after decompression, for ratios.
    pub wire_bytes: usize,
    pub plain_bytes: usize,
}

impl Zstd {
    fn open(&mut self, message: &[u8]) -> Vec<u8> {
        self.wire_bytes += message.len();
        let (flag, rest) = message.split_first().expect("flag byte");
        let out = match flag {
            0 => rest.to_vec(),
            1 => zstd::bulk::Decompressor::new()
                .unwrap()
                .decompress(rest, 16 << 20)
                .expect("valid zstd"),
            2 => {
                let id = u32::from_le_bytes(rest[..4].try_into().unwrap());
                let (have, dict) = self.dictionary.as_ref().expect("a dictionary");
                assert_eq!(*have, id, "dictionary id");
                zstd::bulk::Decompressor::with_dictionary(dict)
                    .unwrap()
                    .decompress(&rest[4..], 16 << 20)
                    .expect("valid zstd with dictionary")
            }
            other => panic!("unknown flag {other}"),
        };
        self.received[*flag as usize] += 1;
        self.plain_bytes += out.len();
        out
    }
}

/// Opens the WebSocket (offering `shardcast.v1`) without sending Connect.
pub async fn open_ws(addr: SocketAddr) -> Ws {
    open_ws_with(addr, "shardcast.v1").await
}

/// Opens the WebSocket offering `protocol`.
pub async fn open_ws_with(addr: SocketAddr, protocol: &str) -> Ws {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap()),
        Some(protocol)
    );
    ws
}

impl Client {
    /// Opens a connection and completes Connect/Connected.
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::connect_with(addr, None).await
    }

    /// Like `connect`; with `Some` it negotiates zstd framing.
    pub async fn connect_with(addr: SocketAddr, zstd: Option<Zstd>) -> Client {
        let protocol = if zstd.is_some() {
            "shardcast.v1+zstd"
        } else {
            "shardcast.v1"
        };
        let ws = open_ws_with(addr, protocol).await;
        let mut c = Client {
            ws,
            enc: ClientEncoder::new(),
            next_id: 1,
            inbox: VecDeque::new(),
            client_id: 0,
            shard: 0,
            zstd,
        };
        let id = c.next_id();
        let frame = c.enc.connect(id, None);
        c.send_raw(frame).await;
        match c.reply(id).await {
            ServerMessage::Connected {
                client_id, shard, ..
            } => {
                c.client_id = client_id;
                c.shard = shard;
            }
            other => panic!("expected Connected, got {other:?}"),
        }
        c
    }

    fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub async fn send_raw(&mut self, frame: Vec<u8>) {
        let frame = match self.zstd {
            Some(_) => [&[0u8][..], &frame].concat(),
            None => frame,
        };
        self.send_wire(frame).await;
    }

    /// Sends bytes exactly as given (no zstd flag added).
    pub async fn send_wire(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send");
    }

    fn unwrap_frame(&mut self, b: &[u8]) -> Vec<u8> {
        match &mut self.zstd {
            Some(z) => z.open(b),
            None => b.to_vec(),
        }
    }

    /// The next server message, in order.
    pub async fn next(&mut self) -> (u32, ServerMessage) {
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return m;
            }
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a server message")
                .expect("connection ended")
                .expect("websocket error");
            match msg {
                Message::Binary(b) => {
                    let b = self.unwrap_frame(&b);
                    let msgs = wire::decode_server_frame(&b, &DecodeLimits::default())
                        .expect("server sent an invalid frame");
                    assert!(!msgs.is_empty(), "empty frame from server");
                    self.inbox.extend(msgs);
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Waits for the reply to request `id`, keeping other messages queued
    /// in order.
    pub async fn reply(&mut self, id: u32) -> ServerMessage {
        let mut skipped = VecDeque::new();
        let found = loop {
            let (rid, msg) = self.next().await;
            if rid == id && !matches!(msg, ServerMessage::Publication { .. }) {
                break msg;
            }
            skipped.push_back((rid, msg));
        };
        while let Some(m) = skipped.pop_back() {
            self.inbox.push_front(m);
        }
        found
    }

    pub async fn subscribe(&mut self, channel: &str) -> Position {
        self.subscribe_from(channel, None).await.0
    }

    /// Subscribes, optionally recovering; returns (position, recovered).
    pub async fn subscribe_from(
        &mut self,
        channel: &str,
        recover: Option<Position>,
    ) -> (Position, bool) {
        let id = self.next_id();
        let frame = self.enc.subscribe(id, channel, recover);
        self.send_raw(frame).await;
        match self.reply(id).await {
            ServerMessage::Subscribed {
                channel: c,
                position,
                recovered,
            } => {
                assert_eq!(c, channel);
                (position, recovered)
            }
            other => panic!("expected Subscribed, got {other:?}"),
        }
    }

    /// Publishes without waiting for the acknowledgement; returns the
    /// request id.
    pub async fn publish_nowait(&mut self, channel: &str, payload: &[u8]) -> u32 {
        let id = self.next_id();
        let frame = self.enc.publish(id, channel, payload, None);
        self.send_raw(frame).await;
        id
    }

    pub async fn publish(&mut self, channel: &str, payload: &[u8]) -> Position {
        let id = self.publish_nowait(channel, payload).await;
        match self.reply(id).await {
            ServerMessage::PublishAck { position, .. } => position,
            other => panic!("expected PublishAck, got {other:?}"),
        }
    }

    /// The next publication (skipping acknowledgements and other replies).
    pub async fn publication(&mut self) -> (String, u64, u64, Vec<u8>) {
        loop {
            if let (
                _,
                ServerMessage::Publication {
                    channel,
                    epoch,
                    offset,
                    payload,
                    ..
                },
            ) = self.next().await
            {
                return (channel, epoch, offset, payload);
            }
        }
    }
}

/// Opens clients until both shards are represented, keeping them all.
pub async fn clients_on_both_shards(addr: SocketAddr, want_each: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    let mut per_shard = [0usize; 2];
    for _ in 0..200 {
        let c = Client::connect(addr).await;
        per_shard[c.shard as usize] += 1;
        clients.push(c);
        if per_shard.iter().all(|&n| n >= want_each) {
            return clients;
        }
    }
    panic!("200 connections never reached both shards: {per_shard:?}");
}

/// A hand-driven WebSocket client over a blocking std socket, for sending
/// what a well-behaved library never would.
pub struct RawClient {
    pub sock: std::net::TcpStream,
}

pub const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: shardcast.v1\r\n\r\n";

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let sock = std::net::TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(WAIT)).unwrap();
        RawClient { sock }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.sock.write_all(bytes).expect("write");
    }

    /// Reads the HTTP response head (up to the blank line).
    pub fn read_http_head(&mut self) -> String {
        use std::io::Read;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = self.sock.read(&mut b).expect("read response");
            assert!(
                n == 1,
                "connection closed inside the response head: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(b[0]);
        }
        String::from_utf8(head).expect("ascii head")
    }

    /// Performs the upgrade and asserts 101.
    pub fn upgrade(addr: SocketAddr) -> RawClient {
        let mut c = RawClient::connect(addr);
        c.write(UPGRADE.as_bytes());
        let head = c.read_http_head();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        c
    }

    /// Sends a masked frame.
    pub fn send(&mut self, opcode: shardcast::protocol::ws::OpCode, fin: bool, payload: &[u8]) {
        let f = shardcast::protocol::ws::encode_client_frame(opcode, fin, payload, [1, 2, 3, 4]);
        self.write(&f);
    }

    /// Reads one server frame: (opcode byte, payload). `None` at EOF.
    pub fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        use std::io::Read;
        let mut h = [0u8; 2];
        if let Err(e) = self.sock.read_exact(&mut h) {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "read error {e}"
            );
            return None;
        }
        assert_eq!(h[1] & 0x80, 0, "server frames must not be masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.sock.read_exact(&mut b).unwrap();
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                self.sock.read_exact(&mut b).unwrap();
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        self.sock.read_exact(&mut payload).unwrap();
        Some((h[0] & 0x0f, payload))
    }

    /// Reads frames until a close frame; returns its code and reason.
    pub fn expect_close(&mut self) -> (u16, String) {
        while let Some((op, payload)) = self.read_frame() {
            if op == 0x8 {
                assert!(payload.len() >= 2, "close frame without a code");
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (
                    code,
                    String::from_utf8(payload[2..].to_vec()).expect("utf-8 reason"),
                );
            }
        }
        panic!("connection ended without a close frame");
    }
}

/// Starts a normal client, subscribes, publishes and receives: the server
/// still serves.
pub async fn assert_serving(addr: SocketAddr) {
    let mut c = Client::connect(addr).await;
    c.subscribe("health").await;
    let pos = c.publish("health", b"ok").await;
    let (ch, _, offset, payload) = c.publication().await;
    assert_eq!(
        (ch.as_str(), offset, payload.as_slice()),
        ("health", pos.offset, &b"ok"[..])
    );
}

/// Connects with an optional token. `Err((code, reason))` when the server
/// closes the connection instead of answering Connected.
pub async fn try_connect(addr: SocketAddr, token: Option<&str>) -> Result<Client, (u16, String)> {
    try_connect_with(addr, token, None).await
}

impl Client {
    /// The next message, or the close code and reason if the server closed.
    pub async fn next_or_close(&mut self) -> Result<(u32, ServerMessage), (u16, String)> {
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return Ok(m);
            }
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for the server")
                .expect("connection ended without a close frame")
                .expect("websocket error");
            match msg {
                Message::Binary(b) => {
                    let b = self.unwrap_frame(&b);
                    self.inbox.extend(
                        wire::decode_server_frame(&b, &DecodeLimits::default())
                            .expect("valid frame"),
                    )
                }
                Message::Close(Some(f)) => return Err((f.code.into(), f.reason.to_string())),
                Message::Close(None) => return Err((1005, String::new())),
                _ => {}
            }
        }
    }

    /// Sends a request built by the caller with the given id.
    pub async fn request(&mut self, build: impl FnOnce(&mut ClientEncoder, u32) -> Vec<u8>) -> u32 {
        let id = self.next_id();
        let frame = build(&mut self.enc, id);
        self.send_raw(frame).await;
        id
    }
}

impl RawClient {
    /// Connects from a chosen loopback source address (per-IP limits).
    pub fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> RawClient {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::new(source, 0).into()).unwrap();
        sock.connect(&addr.into()).unwrap();
        let sock: std::net::TcpStream = sock.into();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        RawClient { sock }
    }

    /// Sends the upgrade request and returns the response head.
    pub fn request_upgrade(&mut self) -> String {
        self.write(UPGRADE.as_bytes());
        self.read_http_head()
    }

    /// True once the server has closed the TCP connection.
    pub fn is_closed_by_peer(&mut self) -> bool {
        use std::io::Read;
        let mut b = [0u8; 256];
        loop {
            match self.sock.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A plain HTTP GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read response");
    let status = text[9..12].parse().expect("status");
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// A plain HTTP GET returning (status, body bytes).
pub fn http_get_bytes(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let status = std::str::from_utf8(&raw[9..12]).unwrap().parse().unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    (status, raw[split..].to_vec())
}

/// Like [`try_connect`], optionally negotiating zstd framing (`Some`).
pub async fn try_connect_with(
    addr: SocketAddr,
    token: Option<&str>,
    zstd: Option<Zstd>,
) -> Result<Client, (u16, String)> {
    let protocol = if zstd.is_some() {
        "shardcast.v1+zstd"
    } else {
        "shardcast.v1"
    };
    let ws = open_ws_with(addr, protocol).await;
    let mut c = Client {
        ws,
        enc: ClientEncoder::new(),
        next_id: 2,
        inbox: VecDeque::new(),
        client_id: 0,
        shard: 0,
        zstd,
    };
    let frame = c.enc.connect(1, token);
    c.send_raw(frame).await;
    match c.next_or_close().await {
        Ok((
            1,
            ServerMessage::Connected {
                client_id, shard, ..
            },
        )) => {
            c.client_id = client_id;
            c.shard = shard;
            Ok(c)
        }
        Ok(other) => panic!("expected Connected, got {other:?}"),
        Err(close) => Err(close),
    }
}

/// Connects with `token` until a connection lands on `shard` (the kernel
/// picks a shard per connection); the connections that landed elsewhere
/// are closed again. `zstd` as in [`try_connect_with`].
pub async fn connect_on_shard(addr: SocketAddr, token: &str, shard: u32, zstd: bool) -> Client {
    for _ in 0..200 {
        let z = zstd.then(Zstd::default);
        let c = try_connect_with(addr, Some(token), z)
            .await
            .unwrap_or_else(|close| panic!("token refused: {close:?}"));
        if c.shard == shard {
            return c;
        }
    }
    panic!("200 connections never reached shard {shard}");
}

/// What a subscriber sees next on `channel`, in order: a presence change
/// ("+user" / "-user") or a publication ("pub:<payload>"). Replies to
/// requests are skipped; any other notice fails the test.
pub async fn next_channel_event(c: &mut Client, channel: &str) -> String {
    loop {
        match c.next().await {
            (
                0,
                ServerMessage::PresenceEvent {
                    channel: ch,
                    user,
                    joined,
                },
            ) => {
                assert_eq!(ch, channel);
                return format!("{}{user}", if joined { '+' } else { '-' });
            }
            (
                0,
                ServerMessage::Publication {
                    channel: ch,
                    payload,
                    ..
                },
            ) => {
                assert_eq!(ch, channel);
                return format!("pub:{}", String::from_utf8(payload).unwrap());
            }
            (0, other) => panic!("unexpected notice {other:?}"),
            _ => {}
        }
    }
}

/// The next `want.len()` events of [`next_channel_event`] are `want`.
pub async fn expect_channel_events(c: &mut Client, channel: &str, want: &[&str]) {
    let mut got = Vec::new();
    for _ in want {
        got.push(next_channel_event(c, channel).await);
    }
    assert_eq!(got, want, "events of client {:#x}", c.client_id);
}

/// A raw client whose receive buffer is 4 KiB (no autotuning), so the
/// server's writes block as soon as the kernel's small buffers fill.
pub fn raw_small_window(addr: SocketAddr) -> RawClient {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let sock: std::net::TcpStream = sock.into();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut c = RawClient { sock };
    c.write(UPGRADE.as_bytes());
    let head = c.read_http_head();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let connect = ClientEncoder::new().connect(1, None);
    c.send(shardcast::protocol::ws::OpCode::Binary, true, &connect);
    c
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Reads Subscribed and then `n` publications of `size` bytes numbered 0..n
/// from a raw native connection.
pub fn read_catch_up(mut c: RawClient, n: usize, size: usize) {
    let mut next = 0u64;
    while next < n as u64 {
        let (op, payload) = c.read_frame().expect("closed during catch-up");
        if op == 0x9 {
            continue; // keepalive ping
        }
        assert_eq!(op, 0x2, "binary frames only, got {op}: {payload:?}");
        let msgs = wire::decode_server_frame(&payload, &DecodeLimits::default()).unwrap();
        for (_, m) in msgs {
            if let ServerMessage::Publication { payload, .. } = m {
                assert_eq!(payload.len(), size);
                let i = u64::from_be_bytes(payload[..8].try_into().unwrap());
                assert_eq!(i, next, "publication out of order or repeated");
                next += 1;
            }
        }
    }
    let mut rest = [0u8; 1];
    c.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        std::io::Read::read(&mut c.sock, &mut rest).is_err(),
        "nothing may follow the last publication"
    );
}

/// The server flags [`check_paced_catch_up`] needs (a 64 KiB outbound
/// budget, no age limit in the way, publishers not throttled, no keepalive
/// ping to the silent readers).
pub const PACED_CATCH_UP: [&str; 12] = [
    "--limits-ping-interval-ms",
    "3600000",
    "--limits-idle-timeout-ms",
    "7200000",
    "--fanout-outbound-budget-bytes",
    "65536",
    "--fanout-outbound-max-age-ms",
    "60000",
    "--limits-messages-per-second",
    "100000",
    "--limits-message-burst",
    "100000",
];

/// Catch-up from history is produced as the socket drains: 300 × 32 KiB are
/// published, then ten clients (4 KiB windows) resubscribe from before the
/// first and do not read. The server must not grow by the history per
/// client (96 MB in all), only by about a budget each; once they read they
/// get every publication, in order, exactly once. `s` runs with
/// [`PACED_CATCH_UP`].
pub async fn check_paced_catch_up(s: &Server) {
    use shardcast::protocol::ws::OpCode;
    use std::time::Instant;
    const N: usize = 300;
    const SIZE: usize = 32 << 10;
    let mut publisher = Client::connect(s.addr).await;
    let mut acks = Vec::new();
    for i in 0..N {
        let mut p = vec![b'x'; SIZE];
        p[..8].copy_from_slice(&(i as u64).to_be_bytes());
        // Acknowledged one by one: the acks (small) stay within the budget.
        acks.push(publisher.publish("big", &p).await);
    }
    let start = Position {
        epoch: acks[0].epoch,
        offset: acks[0].offset - 1,
    };
    drop(publisher);
    let before = rss_kib(s.pid());
    // Ten clients ask for the whole 9.6 MB history and do not read.
    const READERS: usize = 10;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut c = raw_small_window(s.addr);
        let sub = ClientEncoder::new().subscribe(
            2,
            "big",
            Some(Position {
                epoch: start.epoch,
                offset: start.offset,
            }),
        );
        c.send(OpCode::Binary, true, &sub);
        readers.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut grown = 0;
    while Instant::now() < deadline {
        grown = grown.max(rss_kib(s.pid()).saturating_sub(before));
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("RSS grew {grown} KiB for {READERS} idle catch-ups");
    // Queued all at once, each would hold ~9.6 MB (96 MB in all); paced,
    // each holds the 64 KiB budget plus what the kernel buffers.
    assert!(
        grown < 30 << 10,
        "server RSS grew {grown} KiB for {READERS} idle catch-ups"
    );
    // Now they read: every publication, in order, exactly once.
    let t0 = Instant::now();
    let mut threads = Vec::new();
    for c in readers {
        threads.push(std::thread::spawn(move || read_catch_up(c, N, SIZE)));
    }
    for t in threads {
        t.join().unwrap();
    }
    eprintln!("caught up in {:?}", t0.elapsed());
}
