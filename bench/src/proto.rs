//! Client adapters: one per peer protocol the bench speaks. Each turns
//! "subscribe to these channels", "publish this payload" and "here is a
//! frame from the server" into protocol bytes and [`Event`]s, so scenarios
//! and measurement are written once.

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use shardcast::protocol::wire::{self, ClientEncoder, ClientRequest, DecodeLimits, ServerMessage};
use tokio_tungstenite::tungstenite::Message;

/// Which protocol a target speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proto {
    /// shardcast's native FlatBuffers protocol (`shardcast.v1`).
    Native,
    /// The bench-baseline JSON protocol (see `src/bin/bench-baseline.rs`).
    Baseline,
    /// NATS client protocol over WebSocket.
    Nats,
    /// Pusher Channels protocol 7 (Sockudo, shardcast-pusher); publishes go
    /// over the HTTP API, see `pusher.rs`.
    Pusher,
}

impl Proto {
    pub fn path(self) -> &'static str {
        match self {
            Proto::Native => "/ws",
            Proto::Baseline | Proto::Nats => "/",
            Proto::Pusher => crate::pusher::WS_PATH,
        }
    }

    /// How reports name it.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Native => "shardcast.v1",
            Proto::Baseline => "baseline JSON",
            Proto::Nats => "NATS",
            Proto::Pusher => "Pusher 7",
        }
    }

    /// The subprotocol to offer; `zstd` asks shardcast for compressed
    /// frames (native protocol only).
    pub fn subprotocol(self, zstd: bool) -> Option<&'static str> {
        match self {
            Proto::Native if zstd => Some(ZSTD_SUBPROTOCOL),
            Proto::Native => Some("shardcast.v1"),
            _ => None,
        }
    }
}

/// The subprotocol of shardcast's zstd framing (schemas/README.md,
/// "Compressed frames"): every binary message in both directions starts
/// with a flag byte.
pub const ZSTD_SUBPROTOCOL: &str = "shardcast.v1+zstd";
const FLAG_PLAIN: u8 = 0x00;
const FLAG_ZSTD: u8 = 0x01;
const FLAG_ZSTD_DICT: u8 = 0x02;

/// The client side of zstd framing: strips the flag byte and decompresses,
/// with the output capped. Frames are independent zstd frames, so one
/// `Inflater` (one zstd context, one output buffer) serves every connection
/// of a worker thread — a context per connection would cost ~100 KB each.
pub struct Inflater {
    plain: zstd::bulk::Decompressor<'static>,
    dict: Option<(u32, zstd::bulk::Decompressor<'static>)>,
    out: Vec<u8>,
    max_output: usize,
}

impl Inflater {
    /// `max_output`: largest decompressed frame accepted; `dict`: a
    /// dictionary and its id, for flag-0x02 frames.
    pub fn new(max_output: usize, dict: Option<(u32, &[u8])>) -> std::io::Result<Self> {
        Ok(Inflater {
            plain: zstd::bulk::Decompressor::new()?,
            dict: match dict {
                Some((id, bytes)) => Some((id, zstd::bulk::Decompressor::with_dictionary(bytes)?)),
                None => None,
            },
            out: Vec::new(),
            max_output,
        })
    }

    /// The FlatBuffers `Frame` inside one flagged message: borrowed from
    /// `msg` when plain, else decompressed into the internal buffer.
    pub fn open<'a>(&'a mut self, msg: &'a [u8]) -> Result<&'a [u8], String> {
        let (&flag, rest) = msg
            .split_first()
            .ok_or("empty message on a zstd connection")?;
        let (ctx, body) = match flag {
            FLAG_PLAIN => return Ok(rest),
            FLAG_ZSTD => (&mut self.plain, rest),
            FLAG_ZSTD_DICT => {
                let id = rest
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or("truncated dictionary id")?;
                match &mut self.dict {
                    Some((have, ctx)) if *have == id => (ctx, &rest[4..]),
                    _ => {
                        return Err(format!(
                            "frame compressed with dictionary {id}, which this client does not have (--zstd-dict)"
                        ))
                    }
                }
            }
            other => return Err(format!("unknown compression flag {other:#04x}")),
        };
        if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(body) {
            if n > self.max_output as u64 {
                return Err(format!(
                    "compressed frame declares {n} bytes, over the {}-byte cap",
                    self.max_output
                ));
            }
        }
        self.out.clear();
        // The capacity is the cap: zstd fails rather than grow the Vec.
        self.out.reserve(self.max_output);
        let n = ctx
            .decompress_to_buffer(body, &mut self.out)
            .map_err(|e| format!("zstd (output capped at {} bytes): {e}", self.max_output))?;
        if n > self.max_output {
            return Err(format!(
                "decompressed {n} bytes, over the {}-byte cap",
                self.max_output
            ));
        }
        Ok(&self.out)
    }
}

/// Something a server frame meant.
#[derive(Debug, PartialEq)]
pub enum Event<'a> {
    /// A setup step was confirmed (connected, subscribed).
    Ready,
    /// A publication's payload.
    Delivery(&'a [u8]),
    /// A publish was acknowledged (native protocol: with its request id;
    /// 0 for protocols without ids).
    Ack(u32),
    /// The server reported an error.
    Error(String),
    /// The server refused request `id` (native protocol).
    Failed(u32, String),
    /// The protocol requires this answer (NATS `PING` → `PONG`).
    Reply(Message),
}

/// Per-connection protocol state.
pub struct Conn {
    proto: Proto,
    enc: ClientEncoder,
    limits: DecodeLimits,
    next_id: u32,
    /// NATS: bytes of an operation split across frames.
    buf: Vec<u8>,
    /// Native protocol with zstd framing: the (shared) decompressor.
    zstd: Option<Rc<RefCell<Inflater>>>,
}

#[derive(Deserialize)]
struct BaselineIn<'a> {
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<Cow<'a, str>>,
    #[serde(default)]
    msg: Option<String>,
}

#[derive(Serialize)]
struct BaselineOut<'a> {
    op: &'a str,
    ch: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
}

impl Conn {
    pub fn new(proto: Proto) -> Self {
        Self {
            proto,
            enc: ClientEncoder::new(),
            limits: DecodeLimits::default(),
            next_id: 100,
            buf: Vec::new(),
            zstd: None,
        }
    }

    /// A native connection that negotiated `shardcast.v1+zstd`: outgoing
    /// messages get the plain flag byte, incoming ones go through `inflater`.
    pub fn with_zstd(proto: Proto, inflater: Rc<RefCell<Inflater>>) -> Self {
        assert_eq!(proto, Proto::Native, "zstd framing is shardcast-only");
        Self {
            zstd: Some(inflater),
            ..Self::new(proto)
        }
    }

    /// The largest frame this connection decodes (the cap for decompression).
    pub fn max_frame_bytes() -> usize {
        DecodeLimits::default().max_bytes
    }

    /// A native binary message: with the plain flag byte on zstd
    /// connections (the server compresses only what it sends).
    fn native(&self, frame: Vec<u8>) -> Message {
        if self.zstd.is_none() {
            return Message::Binary(frame.into());
        }
        let mut v = Vec::with_capacity(frame.len() + 1);
        v.push(FLAG_PLAIN);
        v.extend_from_slice(&frame);
        Message::Binary(v.into())
    }

    /// The frames that start a session and subscribe to `channels`, and how
    /// many [`Event::Ready`] confirm all of it.
    pub fn setup(&mut self, channels: &[String]) -> (Vec<Message>, usize) {
        match self.proto {
            Proto::Native => {
                let mut reqs = vec![(1, ClientRequest::Connect { token: None })];
                for (i, ch) in channels.iter().enumerate() {
                    reqs.push((
                        2 + i as u32,
                        ClientRequest::Subscribe {
                            channel: ch,
                            recover: None,
                        },
                    ));
                }
                let frame = self.enc.frame(&reqs);
                (vec![self.native(frame)], reqs.len())
            }
            Proto::Baseline => {
                let msgs = channels
                    .iter()
                    .map(|ch| {
                        let j = serde_json::to_string(&BaselineOut {
                            op: "sub",
                            ch,
                            data: None,
                        })
                        .expect("serialisable");
                        Message::Text(j.into())
                    })
                    .collect();
                (msgs, channels.len())
            }
            Proto::Nats => {
                let mut s = String::from(
                    "CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":true,\"lang\":\"rust\",\"version\":\"bench\"}\r\n",
                );
                for (i, ch) in channels.iter().enumerate() {
                    s.push_str(&format!("SUB {ch} {}\r\n", i + 1));
                }
                s.push_str("PING\r\n");
                (vec![Message::Binary(s.into_bytes().into())], 1)
            }
            Proto::Pusher => crate::pusher::setup(channels),
        }
    }

    /// The request id of the last publish, if the server answers each
    /// publish on this connection with an ack or an error carrying it (the
    /// native protocol does; the others send no acks over the WebSocket).
    pub fn last_publish_id(&self) -> Option<u32> {
        matches!(self.proto, Proto::Native).then_some(self.next_id)
    }

    /// One publication of `payload` (ASCII) on `channel`.
    pub fn publish(&mut self, channel: &str, payload: &[u8]) -> Message {
        match self.proto {
            Proto::Native => {
                self.next_id = self.next_id.wrapping_add(1).max(100);
                let frame = self.enc.publish(self.next_id, channel, payload, None);
                self.native(frame)
            }
            Proto::Baseline => {
                let data = std::str::from_utf8(payload).unwrap_or("");
                let j = serde_json::to_string(&BaselineOut {
                    op: "pub",
                    ch: channel,
                    data: Some(data),
                })
                .expect("serialisable");
                Message::Text(j.into())
            }
            Proto::Nats => {
                let mut v = Vec::with_capacity(payload.len() + channel.len() + 24);
                v.extend_from_slice(format!("PUB {channel} {}\r\n", payload.len()).as_bytes());
                v.extend_from_slice(payload);
                v.extend_from_slice(b"\r\n");
                Message::Binary(v.into())
            }
            Proto::Pusher => unreachable!("Pusher publishes over HTTP (pusher::HttpPublisher)"),
        }
    }

    /// Interprets one message from the server. Returns the size of its
    /// content (for the native protocol: the FlatBuffers frame after
    /// decompression), or `None` for control frames (ping/pong/close),
    /// which carry nothing.
    pub fn handle(&mut self, msg: &Message, on: &mut dyn FnMut(Event<'_>)) -> Option<usize> {
        match (self.proto, msg) {
            (Proto::Native, Message::Binary(b)) => match &self.zstd {
                None => {
                    native_frame(b, &self.limits, on);
                    Some(b.len())
                }
                Some(z) => {
                    let mut z = z.borrow_mut();
                    match z.open(b) {
                        Ok(frame) => {
                            native_frame(frame, &self.limits, on);
                            Some(frame.len())
                        }
                        Err(e) => {
                            on(Event::Error(format!("undecompressable frame: {e}")));
                            Some(0)
                        }
                    }
                }
            },
            (Proto::Baseline, Message::Text(t)) => {
                match serde_json::from_str::<BaselineIn<'_>>(t.as_str()) {
                    Ok(m) => match (m.op.as_deref(), m.data) {
                        (Some("subok"), _) => on(Event::Ready),
                        (Some("err"), _) => on(Event::Error(m.msg.unwrap_or_default())),
                        (None, Some(d)) => on(Event::Delivery(d.as_bytes())),
                        _ => on(Event::Error(format!("unexpected message {t}"))),
                    },
                    Err(e) => on(Event::Error(format!("bad JSON from baseline: {e}"))),
                }
                Some(t.len())
            }
            (Proto::Nats, Message::Binary(b)) => {
                self.nats_bytes(b, on);
                Some(b.len())
            }
            (Proto::Nats, Message::Text(t)) => {
                self.nats_bytes(t.as_bytes(), on);
                Some(t.len())
            }
            (Proto::Pusher, Message::Text(t)) => {
                crate::pusher::handle(t.as_str(), on);
                Some(t.len())
            }
            (_, Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => {
                None
            }
            (p, m) => {
                on(Event::Error(format!(
                    "unexpected {p:?} frame of {} bytes",
                    m.len()
                )));
                Some(m.len())
            }
        }
    }

    /// NATS operations may span frames and a frame may hold several.
    fn nats_bytes(&mut self, data: &[u8], on: &mut dyn FnMut(Event<'_>)) {
        self.buf.extend_from_slice(data);
        let buf = &self.buf;
        let mut at = 0;
        while let Some(nl) = find_crlf(&buf[at..]) {
            let line = &buf[at..at + nl];
            if let Some(rest) = line.strip_prefix(b"MSG ") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let len = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|s| s.split(' ').next_back())
                    .and_then(|n| n.parse::<usize>().ok());
                let Some(len) = len else {
                    on(Event::Error("bad NATS MSG line".into()));
                    at += nl + 2;
                    continue;
                };
                let start = at + nl + 2;
                if buf.len() < start + len + 2 {
                    break; // payload not complete yet
                }
                on(Event::Delivery(&buf[start..start + len]));
                at = start + len + 2;
                continue;
            }
            if line == b"PING" {
                on(Event::Reply(Message::Binary(b"PONG\r\n".to_vec().into())));
            } else if line == b"PONG" {
                on(Event::Ready);
            } else if line.starts_with(b"-ERR") {
                on(Event::Error(String::from_utf8_lossy(line).into_owned()));
            }
            // INFO and +OK need no action.
            at += nl + 2;
        }
        self.buf.drain(..at);
    }
}

/// Decodes one native FlatBuffers `Frame` into events.
fn native_frame(b: &[u8], limits: &DecodeLimits, on: &mut dyn FnMut(Event<'_>)) {
    match wire::decode_server_frame(b, limits) {
        Ok(msgs) => {
            for (id, m) in msgs {
                match m {
                    ServerMessage::Connected { .. } | ServerMessage::Subscribed { .. } => {
                        on(Event::Ready)
                    }
                    ServerMessage::Publication { payload, .. } => on(Event::Delivery(&payload)),
                    ServerMessage::PublishAck { .. } => on(Event::Ack(id)),
                    ServerMessage::Error { code, message } => {
                        on(Event::Failed(id, format!("error {code}: {message}")))
                    }
                    _ => {} // Unsubscribed, Pong, and anything newer
                }
            }
        }
        Err(e) => on(Event::Error(format!("undecodable frame: {e}"))),
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(c: &mut Conn, m: Message) -> Vec<String> {
        let mut out = Vec::new();
        c.handle(&m, &mut |e| {
            out.push(match e {
                Event::Delivery(d) => format!("D:{}", String::from_utf8_lossy(d)),
                other => format!("{other:?}"),
            })
        });
        out
    }

    #[test]
    fn nats_parser_handles_split_and_batched_operations() {
        let mut c = Conn::new(Proto::Nats);
        let first = b"INFO {}\r\nPONG\r\nMSG a 1 5\r\nhel".to_vec();
        assert_eq!(events(&mut c, Message::Binary(first.into())), ["Ready"]);
        let second = b"lo\r\nPING\r\nMSG b 2 r 2\r\nhi\r\n".to_vec();
        let ev = events(&mut c, Message::Binary(second.into()));
        assert_eq!(ev[0], "D:hello");
        assert!(ev[1].starts_with("Reply"));
        assert_eq!(ev[2], "D:hi");
        assert!(c.buf.is_empty());
    }

    #[test]
    fn baseline_messages() {
        let mut c = Conn::new(Proto::Baseline);
        let (setup, want) = c.setup(&["a".into(), "b".into()]);
        assert_eq!((setup.len(), want), (2, 2));
        assert_eq!(
            events(&mut c, Message::Text(r#"{"op":"subok","ch":"a"}"#.into())),
            ["Ready"]
        );
        assert_eq!(
            events(
                &mut c,
                Message::Text(r#"{"ch":"a","data":"1:2:3:.."}"#.into())
            ),
            ["D:1:2:3:.."]
        );
        let p = c.publish("a", b"xyz");
        assert_eq!(
            p.to_text().unwrap(),
            r#"{"op":"pub","ch":"a","data":"xyz"}"#
        );
    }

    /// A server frame of `n` publications on channel `c`, as shardcast
    /// encodes a tick's batch.
    fn server_batch(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut enc = shardcast::protocol::wire::Encoder::new();
        enc.publications(
            "c",
            1,
            payloads
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64, 0, p.as_slice())),
        )
        .to_vec()
    }

    fn json_payloads(n: u64) -> Vec<Vec<u8>> {
        (0..n)
            .map(|seq| {
                let mut b = Vec::new();
                crate::payload::encode_json(
                    crate::payload::Stamp {
                        stream: 1,
                        seq,
                        intended_ns: 1_000 + seq,
                    },
                    200,
                    &mut b,
                );
                b
            })
            .collect()
    }

    fn zstd_conn(dict: Option<(u32, &[u8])>) -> Conn {
        let inf = Inflater::new(Conn::max_frame_bytes(), dict).unwrap();
        Conn::with_zstd(Proto::Native, Rc::new(RefCell::new(inf)))
    }

    #[test]
    fn zstd_frames_decode_to_the_same_events() {
        let payloads = json_payloads(16);
        let frame = server_batch(&payloads);
        let want: Vec<String> = payloads
            .iter()
            .map(|p| format!("D:{}", String::from_utf8_lossy(p)))
            .collect();
        // Without zstd: the frame as is.
        let mut plain = Conn::new(Proto::Native);
        let mut got = Vec::new();
        let n = plain.handle(&Message::Binary(frame.clone().into()), &mut |e| {
            got.push(match e {
                Event::Delivery(d) => format!("D:{}", String::from_utf8_lossy(d)),
                other => format!("{other:?}"),
            })
        });
        assert_eq!((got, n), (want.clone(), Some(frame.len())));

        // Flag 0x01: compressed; the content size is the decompressed frame.
        let mut z = zstd_conn(None);
        let mut msg = vec![FLAG_ZSTD];
        msg.extend_from_slice(&zstd::bulk::compress(&frame, 1).unwrap());
        assert!(
            msg.len() * 2 < frame.len(),
            "{} -> {}",
            frame.len(),
            msg.len()
        );
        let mut got = Vec::new();
        let n = z.handle(&Message::Binary(msg.into()), &mut |e| {
            got.push(match e {
                Event::Delivery(d) => format!("D:{}", String::from_utf8_lossy(d)),
                other => format!("{other:?}"),
            })
        });
        assert_eq!((got, n), (want.clone(), Some(frame.len())));

        // Flag 0x00: plain behind the flag byte.
        let mut msg = vec![FLAG_PLAIN];
        msg.extend_from_slice(&frame);
        assert_eq!(events(&mut z, Message::Binary(msg.into())), want);

        // Outgoing messages carry the plain flag.
        let Message::Binary(p) = z.publish("c", b"x") else {
            panic!("binary expected")
        };
        assert_eq!(p[0], FLAG_PLAIN);
        assert!(wire::decode_client_frame(&p[1..], &DecodeLimits::default()).is_ok());
    }

    #[test]
    fn zstd_dictionary_frames_bombs_and_garbage() {
        let samples = json_payloads(2000);
        let dict = zstd::dict::from_samples(&samples, 8 * 1024).unwrap();
        let frame = server_batch(&json_payloads(1));
        let mut msg = vec![FLAG_ZSTD_DICT];
        msg.extend_from_slice(&7u32.to_le_bytes());
        msg.extend_from_slice(
            &zstd::bulk::Compressor::with_dictionary(1, &dict)
                .unwrap()
                .compress(&frame)
                .unwrap(),
        );
        let msg = Message::Binary(msg.into());
        let mut with = zstd_conn(Some((7, &dict)));
        let ev = events(&mut with, msg.clone());
        assert_eq!(ev.len(), 1);
        assert!(ev[0].starts_with("D:1:0:3e8:{"), "{ev:?}");
        let mut without = zstd_conn(None);
        let ev = events(&mut without, msg);
        assert!(ev[0].contains("dictionary 7"), "{ev:?}");

        // Over the cap: refused, not allocated.
        let mut bomb = vec![FLAG_ZSTD];
        bomb.extend_from_slice(&zstd::bulk::compress(&vec![0u8; 4 << 20], 3).unwrap());
        let ev = events(&mut without, Message::Binary(bomb.into()));
        assert!(ev[0].contains("cap"), "{ev:?}");
        for bad in [vec![], vec![9u8, 1, 2], vec![FLAG_ZSTD, 1, 2, 3]] {
            let ev = events(&mut without, Message::Binary(bad.into()));
            assert!(ev[0].starts_with("Error"), "{ev:?}");
        }
    }

    #[test]
    fn native_setup_is_one_frame_with_connect_and_subscribes() {
        let mut c = Conn::new(Proto::Native);
        let (frames, want) = c.setup(&["x".into()]);
        assert_eq!((frames.len(), want), (1, 2));
        let Message::Binary(b) = &frames[0] else {
            panic!("binary expected")
        };
        let reqs = wire::decode_client_frame(b, &DecodeLimits::default()).unwrap();
        assert_eq!(reqs.len(), 2);
    }
}
