//! The body of a publication as the bus carries and stores it: the bytes a
//! publisher sent, and for publications that came from a Pusher client
//! event or the Pusher HTTP API, what Pusher subscribers need besides them
//! (event name, whether the data is raw JSON, the publisher's user id on a
//! presence channel, and the socket to leave out). The buses treat a body
//! as opaque bytes; each client form reads what it needs from it
//! ([`decode`]), so one stored publication serves native and Pusher
//! subscribers alike.
//!
//! Layout (internal to shardcast, not a client-facing format):
//! - `00 | data`: a plain publication (native publish, ingest);
//! - `01 | flags u8 | event_len u16 | event | user_len u16 | user |
//!   exclude_len u16 | exclude | data`: an event (big-endian lengths;
//!   flags bit 0: the data is raw JSON rather than a string).
//!
//! Bytes in neither layout (e.g. written into Redis by hand) decode as a
//! plain publication of all of them: a body never fails to decode.

#![forbid(unsafe_code)]

use bytes::{BufMut, Bytes, BytesMut};

const PLAIN: u8 = 0;
const EVENT: u8 = 1;
const FLAG_RAW_JSON: u8 = 1;

/// What a publication carries, borrowed from its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Body<'a> {
    /// The Pusher event name, if it has one.
    pub event: Option<&'a str>,
    /// Whether `data` is raw JSON (a client event's `data`) rather than a
    /// string (an HTTP API event's `data`, a native payload).
    pub raw_json: bool,
    /// The publisher's user id, on presence channels.
    pub user: Option<&'a str>,
    /// The Pusher `socket_id` that must not receive it (the sender of a
    /// client event, or the `socket_id` of an HTTP API trigger).
    pub exclude: Option<&'a str>,
    /// The data.
    pub data: &'a [u8],
}

/// The body of a plain publication of `data` (one allocation, as the
/// copy of the payload needed anyway).
pub fn plain(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(1 + data.len());
    out.put_u8(PLAIN);
    out.put_slice(data);
    out.freeze()
}

/// The body of an event. Names, user ids and socket ids are bounded far
/// below 64 KiB by their callers; longer ones are cut at 65,535 bytes (at a
/// character boundary).
pub fn event(
    event: &str,
    raw_json: bool,
    user: Option<&str>,
    exclude: Option<&str>,
    data: &[u8],
) -> Bytes {
    let fields = [event, user.unwrap_or(""), exclude.unwrap_or("")].map(cap);
    let mut out =
        BytesMut::with_capacity(2 + 6 + fields.iter().map(|f| f.len()).sum::<usize>() + data.len());
    out.put_u8(EVENT);
    out.put_u8(if raw_json { FLAG_RAW_JSON } else { 0 });
    for f in fields {
        out.put_u16(f.len() as u16);
        out.put_slice(f.as_bytes());
    }
    out.put_slice(data);
    out.freeze()
}

fn cap(s: &str) -> &str {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads a body (see the module doc for the layout).
pub fn decode(body: &[u8]) -> Body<'_> {
    let whole = Body {
        event: None,
        raw_json: false,
        user: None,
        exclude: None,
        data: body,
    };
    match body.first() {
        Some(&PLAIN) => Body {
            data: &body[1..],
            ..whole
        },
        Some(&EVENT) => decode_event(body).unwrap_or(whole),
        _ => whole,
    }
}

fn decode_event(body: &[u8]) -> Option<Body<'_>> {
    let flags = *body.get(1)?;
    let mut rest = &body[2..];
    let mut field = || -> Option<&str> {
        let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let text = rest.get(2..2 + len)?;
        rest = &rest[2 + len..];
        std::str::from_utf8(text).ok()
    };
    let event = field()?;
    let user = field()?;
    let exclude = field()?;
    Some(Body {
        event: (!event.is_empty()).then_some(event),
        raw_json: flags & FLAG_RAW_JSON != 0,
        user: (!user.is_empty()).then_some(user),
        exclude: (!exclude.is_empty()).then_some(exclude),
        data: rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bodies_carry_the_data() {
        let b = plain(b"hello");
        assert_eq!(&b[..], b"\0hello");
        let d = decode(&b);
        assert_eq!(d.data, b"hello");
        assert_eq!(d.event, None);
        assert_eq!(decode(&plain(b"")).data, b"");
    }

    #[test]
    fn events_round_trip() {
        let b = event(
            "client-typing",
            true,
            Some("7"),
            Some("12.34"),
            br#"{"a":1}"#,
        );
        let d = decode(&b);
        assert_eq!(d.event, Some("client-typing"));
        assert!(d.raw_json);
        assert_eq!(d.user, Some("7"));
        assert_eq!(d.exclude, Some("12.34"));
        assert_eq!(d.data, br#"{"a":1}"#);
        let b = event("ev", false, None, None, b"x");
        let d = decode(&b);
        assert_eq!(
            (d.event, d.raw_json, d.user, d.exclude, d.data),
            (Some("ev"), false, None, None, &b"x"[..])
        );
    }

    #[test]
    fn foreign_or_truncated_bytes_decode_as_plain_data() {
        for raw in [
            &b"silent"[..],
            b"",
            b"\x01",
            b"\x01\x00\x00",
            b"\x01\x00\x00\x05ab",
            b"\x07zz",
        ] {
            let d = decode(raw);
            assert_eq!(d.data, raw);
            assert_eq!(d.event, None);
        }
        // Not UTF-8 in a name: plain as well.
        let mut b = event("ev", false, None, None, b"x").to_vec();
        b[4] = 0xff;
        assert_eq!(decode(&b).event, None);
    }

    #[test]
    fn overlong_fields_are_cut_at_a_character_boundary() {
        let long = "é".repeat(40_000);
        let b = event(&long, false, None, None, b"x");
        let d = decode(&b).event.unwrap().to_string();
        assert!(d.len() <= u16::MAX as usize && long.starts_with(&d));
    }
}
