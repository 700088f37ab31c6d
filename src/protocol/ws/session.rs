//! The per-connection WebSocket rules above framing: answer pings, notice the
//! peer's close, and stop reading afterwards. Sans-IO: the driver feeds bytes
//! and asks what it owes the peer.
//!
//! # Why at most one pong
//! RFC 6455 §5.5.3 lets an endpoint answer only the most recent ping when
//! several arrive before it could reply. Keeping one pending pong means a
//! client flooding pings to a slow-to-write connection cannot grow our queue:
//! a newer ping simply replaces the unsent answer.
//!
//! # After the end
//! - After a [`Event::Close`] the session discards further input: `decode`
//!   returns `Ok((input.len(), None))`, so a caller looping "until the input is
//!   consumed" always terminates. Peers must not send after Close, and nothing
//!   they send then can change what we do. Any pending pong is dropped, because
//!   nothing may follow our Close reply on the wire.
//! - After an error every call returns the same error (the deframer's errors
//!   are sticky); answer with [`WsError::close_frame`] and close.

use bytes::Bytes;

use super::frame::{close_frame, frame, Deframer, FrameLimits, Message, OpCode, WsError};

/// A pong with an empty payload (the common heartbeat answer), without allocating.
const EMPTY_PONG: &[u8] = &[0x8A, 0x00];
/// A close frame with no status code: the reply to a close that carried none.
const EMPTY_CLOSE: &[u8] = &[0x88, 0x00];

/// What the client said, once pings have been absorbed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete text message, validated UTF-8.
    Text(Bytes),
    /// A complete binary message, fragments joined.
    Binary(Bytes),
    /// A pong (answer to our ping, or unsolicited heartbeat); the payload as sent.
    Pong(Bytes),
    /// The client closed; `code` is `None` when its Close frame had no payload.
    Close {
        /// The close code (valid on the wire, RFC 6455 §7.4), if any.
        code: Option<u16>,
        /// The close reason (valid UTF-8, ≤ 123 bytes); empty if none.
        reason: String,
    },
}

/// Deframer plus the ping/pong/close rules for one connection.
pub struct Session {
    deframer: Deframer,
    /// Payload of the most recent unanswered ping.
    pong: Option<Bytes>,
    /// `Some(code)` once the peer's Close arrived.
    peer_close: Option<Option<u16>>,
}

impl Session {
    /// A session with no pending pong, whose deframer enforces `limits`.
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            deframer: Deframer::new(limits),
            pong: None,
            peer_close: None,
        }
    }

    /// Like [`Deframer::decode`], but pings are absorbed (they set the pending
    /// pong, see [`Session::take_pong`]) and decoding goes on past them, so
    /// `Ok((n, None))` still means all of the input was consumed.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Event>), WsError> {
        if self.peer_close.is_some() {
            return Ok((input.len(), None));
        }
        let mut pos = 0;
        loop {
            let (n, message) = self.deframer.decode(&input[pos..])?;
            pos += n;
            let event = match message {
                None => return Ok((pos, None)),
                Some(Message::Ping(payload)) => {
                    self.pong = Some(payload);
                    continue;
                }
                Some(Message::Pong(payload)) => Event::Pong(payload),
                Some(Message::Text(text)) => Event::Text(text),
                Some(Message::Binary(data)) => Event::Binary(data),
                Some(Message::Close(close)) => {
                    self.pong = None;
                    let (code, reason) = match close {
                        Some((code, reason)) => (Some(code), reason),
                        None => (None, String::new()),
                    };
                    self.peer_close = Some(code);
                    Event::Close { code, reason }
                }
            };
            return Ok((pos, Some(event)));
        }
    }

    /// The encoded pong frame owed to the client, if any. At most one is ever
    /// kept: a newer ping replaces an unsent pong.
    pub fn take_pong(&mut self) -> Option<Bytes> {
        let payload = self.pong.take()?;
        Some(if payload.is_empty() {
            Bytes::from_static(EMPTY_PONG)
        } else {
            frame(OpCode::Pong, &payload)
        })
    }

    /// True when no partial frame or message is buffered. A pending pong does
    /// not count: it is output owed, not input held.
    pub fn is_idle(&self) -> bool {
        self.deframer.is_idle()
    }

    /// True once the client's Close has been decoded.
    pub fn is_closed(&self) -> bool {
        self.peer_close.is_some()
    }

    /// The Close frame to answer the client's Close with (echoing its code, as
    /// RFC 6455 §5.5.1 suggests); `None` until the client has closed.
    pub fn close_reply(&self) -> Option<Bytes> {
        self.peer_close.map(|code| match code {
            Some(code) => close_frame(code, ""),
            None => Bytes::from_static(EMPTY_CLOSE),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::encode_client_frame;
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn client(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        encode_client_frame(opcode, true, payload, MASK)
    }

    fn session() -> Session {
        Session::new(FrameLimits::default())
    }

    #[test]
    fn ping_is_absorbed_and_answered() {
        let mut s = session();
        let bytes = client(OpCode::Ping, b"hb");
        assert_eq!(s.decode(&bytes).unwrap(), (bytes.len(), None));
        assert_eq!(s.take_pong().unwrap(), frame(OpCode::Pong, b"hb"));
        assert_eq!(s.take_pong(), None);
    }

    #[test]
    fn empty_ping_gets_empty_pong() {
        let mut s = session();
        s.decode(&client(OpCode::Ping, b"")).unwrap();
        assert_eq!(&s.take_pong().unwrap()[..], &[0x8A, 0x00]);
    }

    #[test]
    fn newer_ping_replaces_unsent_pong() {
        let mut s = session();
        let mut bytes = Vec::new();
        for i in 0..100u8 {
            bytes.extend(client(OpCode::Ping, &[i]));
        }
        assert_eq!(s.decode(&bytes).unwrap(), (bytes.len(), None));
        assert_eq!(s.take_pong().unwrap(), frame(OpCode::Pong, &[99]));
        assert_eq!(s.take_pong(), None);
    }

    #[test]
    fn decoding_continues_past_a_ping() {
        let mut s = session();
        let mut bytes = client(OpCode::Ping, b"p");
        bytes.extend(client(OpCode::Text, b"hi"));
        let (n, ev) = s.decode(&bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(ev, Some(Event::Text(Bytes::from_static(b"hi"))));
        assert!(s.take_pong().is_some());
    }

    #[test]
    fn data_and_pong_events() {
        let mut s = session();
        let mut bytes = client(OpCode::Binary, &[0, 1]);
        bytes.extend(client(OpCode::Pong, b"t=1"));
        let (n, ev) = s.decode(&bytes).unwrap();
        assert_eq!(ev, Some(Event::Binary(Bytes::from_static(&[0, 1]))));
        let (_, ev) = s.decode(&bytes[n..]).unwrap();
        assert_eq!(ev, Some(Event::Pong(Bytes::from_static(b"t=1"))));
        assert_eq!(s.take_pong(), None, "a pong is not answered");
    }

    #[test]
    fn close_event_then_input_is_discarded() {
        let mut s = session();
        let mut bytes = client(OpCode::Ping, b"late");
        bytes.extend(client(OpCode::Close, b"\x03\xe8done"));
        let close_end = bytes.len();
        bytes.extend(client(OpCode::Text, b"after close"));
        let (n, ev) = s.decode(&bytes).unwrap();
        assert_eq!(n, close_end);
        assert_eq!(
            ev,
            Some(Event::Close {
                code: Some(1000),
                reason: "done".into()
            })
        );
        assert!(s.is_closed());
        assert_eq!(s.take_pong(), None, "nothing may follow the close reply");
        let rest = &bytes[n..];
        assert_eq!(s.decode(rest).unwrap(), (rest.len(), None));
        assert_eq!(s.close_reply().unwrap(), close_frame(1000, ""));
    }

    #[test]
    fn close_without_code() {
        let mut s = session();
        assert_eq!(s.close_reply(), None);
        let (_, ev) = s.decode(&client(OpCode::Close, b"")).unwrap();
        assert_eq!(
            ev,
            Some(Event::Close {
                code: None,
                reason: String::new()
            })
        );
        assert_eq!(&s.close_reply().unwrap()[..], &[0x88, 0x00]);
    }

    #[test]
    fn errors_are_sticky() {
        let mut s = session();
        let err = s.decode(&[0x81, 0x00]).unwrap_err();
        assert_eq!(err, WsError::Unmasked);
        assert_eq!(
            s.decode(&client(OpCode::Text, b"ok")),
            Err(WsError::Unmasked)
        );
        assert_eq!(&err.close_frame()[2..4], &1002u16.to_be_bytes());
    }

    #[test]
    fn idle_tracks_partial_frames() {
        let mut s = session();
        assert!(s.is_idle());
        let bytes = client(OpCode::Text, b"hello");
        s.decode(&bytes[..3]).unwrap();
        assert!(!s.is_idle());
        s.decode(&bytes[3..]).unwrap();
        assert!(s.is_idle());
    }

    #[test]
    fn idle_session_is_small() {
        // Inline state only (no heap when idle): comfortably inside the
        // 2.5 KB-per-idle-connection budget.
        let size = std::mem::size_of::<Session>();
        assert!(size <= 320, "Session is {size} bytes");
    }
}
