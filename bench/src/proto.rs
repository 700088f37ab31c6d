//! Client adapters: one per peer protocol the bench speaks. Each turns
//! "subscribe to these channels", "publish this payload" and "here is a
//! frame from the server" into protocol bytes and [`Event`]s, so scenarios
//! and measurement are written once.

use std::borrow::Cow;

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
    /// Pusher Channels protocol 7 (Sockudo); publishes go over the HTTP
    /// API, see `pusher.rs`.
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

    pub fn subprotocol(self) -> Option<&'static str> {
        match self {
            Proto::Native => Some("shardcast.v1"),
            _ => None,
        }
    }
}

/// Something a server frame meant.
#[derive(Debug, PartialEq)]
pub enum Event<'a> {
    /// A setup step was confirmed (connected, subscribed).
    Ready,
    /// A publication's payload.
    Delivery(&'a [u8]),
    /// A publish was acknowledged.
    Ack,
    /// The server reported an error.
    Error(String),
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
        }
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
                (vec![Message::Binary(frame.into())], reqs.len())
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

    /// One publication of `payload` (ASCII) on `channel`.
    pub fn publish(&mut self, channel: &str, payload: &[u8]) -> Message {
        match self.proto {
            Proto::Native => {
                self.next_id = self.next_id.wrapping_add(1).max(100);
                Message::Binary(
                    self.enc
                        .publish(self.next_id, channel, payload, None)
                        .into(),
                )
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

    /// Interprets one message from the server. Returns whether it carried
    /// anything (ping/pong control frames do not).
    pub fn handle(&mut self, msg: &Message, on: &mut dyn FnMut(Event<'_>)) -> bool {
        match (self.proto, msg) {
            (Proto::Native, Message::Binary(b)) => {
                match wire::decode_server_frame(b, &self.limits) {
                    Ok(msgs) => {
                        for (_, m) in msgs {
                            match m {
                                ServerMessage::Connected { .. }
                                | ServerMessage::Subscribed { .. } => on(Event::Ready),
                                ServerMessage::Publication { payload, .. } => {
                                    on(Event::Delivery(&payload))
                                }
                                ServerMessage::PublishAck { .. } => on(Event::Ack),
                                ServerMessage::Error { code, message } => {
                                    on(Event::Error(format!("error {code}: {message}")))
                                }
                                _ => {} // Unsubscribed, Pong, and anything newer
                            }
                        }
                    }
                    Err(e) => on(Event::Error(format!("undecodable frame: {e}"))),
                }
                true
            }
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
                true
            }
            (Proto::Nats, Message::Binary(b)) => {
                self.nats_bytes(b, on);
                true
            }
            (Proto::Nats, Message::Text(t)) => {
                self.nats_bytes(t.as_bytes(), on);
                true
            }
            (Proto::Pusher, Message::Text(t)) => {
                crate::pusher::handle(t.as_str(), on);
                true
            }
            (_, Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => {
                false
            }
            (p, m) => {
                on(Event::Error(format!(
                    "unexpected {p:?} frame of {} bytes",
                    m.len()
                )));
                true
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
