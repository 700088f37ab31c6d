//! What shardcast writes to and reads back from Redis. Everything read back
//! is untrusted input (another process, an operator or an attacker with
//! access to Redis may have written it): it is decoded with bounds checks,
//! and anything malformed is rejected with a reason, never a panic.

#![forbid(unsafe_code)]

use bytes::{Buf, Bytes};
use fred::types::Value;
use thiserror::Error;

use crate::bus::{Position, Publication};

/// Version byte opening every Pub/Sub announcement.
pub const ANNOUNCEMENT_V1: u8 = 1;
/// version + epoch + offset + published_us + ingress_us.
pub const ANNOUNCEMENT_HEADER: usize = 1 + 8 * 4;

/// Why bytes read from Redis were rejected (Redis payloads are untrusted
/// input); counted in `shardcast_redis_malformed_total` and dropped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Malformed {
    /// An announcement shorter than `ANNOUNCEMENT_HEADER` (its length in bytes).
    #[error("announcement shorter than its header ({0} bytes)")]
    Short(usize),
    /// An announcement whose first byte is not `ANNOUNCEMENT_V1`.
    #[error("unknown announcement version {0}")]
    Version(u8),
    /// Epoch 0, which no channel is given.
    #[error("epoch 0")]
    ZeroEpoch,
    /// Offset 0, which no publication is given (offsets count from 1).
    #[error("offset 0")]
    ZeroOffset,
    /// A payload over the largest message a client may send (its length in bytes).
    #[error("payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// An epoch field that is not a non-zero decimal u64.
    #[error("bad epoch {0:?}")]
    Epoch(String),
    /// A stream entry missing a field or with a field of the wrong type.
    #[error("bad stream entry: {0}")]
    Entry(&'static str),
    /// A script reply of an unexpected shape.
    #[error("bad reply: {0}")]
    Reply(&'static str),
}

/// A publication as announced on Pub/Sub.
#[derive(Clone, Debug)]
pub struct Announcement {
    /// The channel's epoch the publication belongs to.
    pub epoch: u64,
    /// The publication, its payload sharing the announcement's buffer.
    pub publication: Publication,
}

/// The announcement format (the Lua publish script builds the same bytes):
/// `01 | epoch u64 | offset u64 | published_us u64 | ingress_us u64 |
/// payload`, integers big-endian.
pub fn encode_announcement(epoch: u64, p: &Publication) -> Vec<u8> {
    let mut out = Vec::with_capacity(ANNOUNCEMENT_HEADER + p.payload.len());
    out.push(ANNOUNCEMENT_V1);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&p.offset.to_be_bytes());
    out.extend_from_slice(&p.published_us.to_be_bytes());
    out.extend_from_slice(&p.ingress_us.to_be_bytes());
    out.extend_from_slice(&p.payload);
    out
}

/// Decodes an announcement; the payload shares `bytes`' buffer.
pub fn decode_announcement(
    mut bytes: Bytes,
    max_payload: usize,
) -> Result<Announcement, Malformed> {
    if bytes.len() < ANNOUNCEMENT_HEADER {
        return Err(Malformed::Short(bytes.len()));
    }
    let version = bytes.get_u8();
    if version != ANNOUNCEMENT_V1 {
        return Err(Malformed::Version(version));
    }
    let epoch = bytes.get_u64();
    let offset = bytes.get_u64();
    let published_us = bytes.get_u64();
    let ingress_us = bytes.get_u64();
    if epoch == 0 {
        return Err(Malformed::ZeroEpoch);
    }
    if offset == 0 {
        return Err(Malformed::ZeroOffset);
    }
    if bytes.len() > max_payload {
        return Err(Malformed::TooLarge(bytes.len()));
    }
    Ok(Announcement {
        epoch,
        publication: Publication {
            offset,
            published_us,
            ingress_us,
            payload: bytes,
        },
    })
}

/// Version byte of a presence announcement: `02 | joined (0|1) | user`.
pub const PRESENCE_V1: u8 = 2;
/// Longest user id accepted in a presence announcement.
pub const MAX_USER_BYTES: usize = 1024;

/// What arrives on a channel's Pub/Sub.
#[derive(Clone, Debug)]
pub enum Announced {
    Publication(Announcement),
    Presence {
        user: std::sync::Arc<str>,
        joined: bool,
    },
}

/// Decodes a Pub/Sub message of either kind.
pub fn decode_announced(bytes: Bytes, max_payload: usize) -> Result<Announced, Malformed> {
    match bytes.first() {
        Some(&PRESENCE_V1) => {
            if bytes.len() < 3 {
                return Err(Malformed::Short(bytes.len()));
            }
            let joined = match bytes[1] {
                0 => false,
                1 => true,
                _ => return Err(Malformed::Reply("presence flag")),
            };
            let user = &bytes[2..];
            if user.len() > MAX_USER_BYTES {
                return Err(Malformed::TooLarge(user.len()));
            }
            let user =
                std::str::from_utf8(user).map_err(|_| Malformed::Reply("user is not UTF-8"))?;
            Ok(Announced::Presence {
                user: user.into(),
                joined,
            })
        }
        _ => decode_announcement(bytes, max_payload).map(Announced::Publication),
    }
}

/// Epochs are stored as exactly 16 lowercase hex digits (so Lua, whose
/// numbers are doubles, never does arithmetic on them).
pub fn epoch_hex(epoch: u64) -> String {
    format!("{epoch:016x}")
}

/// A position the node has seen, as the two script arguments the
/// `rolled_back` check takes (`scripts::ENSURE_EPOCH`): epoch hex and
/// offset, or `''` and `0` for none.
pub fn seen_args(p: Option<Position>) -> [Value; 2] {
    [
        Value::from(p.map_or(String::new(), |p| epoch_hex(p.epoch))),
        Value::from(p.map_or(0, |p| p.offset).to_string()),
    ]
}

pub fn parse_epoch(s: &[u8]) -> Result<u64, Malformed> {
    let bad = || Malformed::Epoch(String::from_utf8_lossy(&s[..s.len().min(40)]).into_owned());
    if s.len() != 16 || !s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    let text = std::str::from_utf8(s).map_err(|_| bad())?;
    match u64::from_str_radix(text, 16) {
        Ok(0) | Err(_) => Err(bad()),
        Ok(e) => Ok(e),
    }
}

/// A bulk string reply as bytes (fred hands back valid UTF-8 as `String`).
pub fn bytes_of(v: Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        _ => None,
    }
}

/// An integer reply, also accepting its decimal text form.
pub fn u64_of(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        Value::String(s) => s.parse().ok(),
        Value::Bytes(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The offset in a history entry ID (`<offset>-1`).
pub fn offset_of_id(id: &[u8]) -> Option<u64> {
    let dash = id.iter().position(|&c| c == b'-')?;
    let offset = parse_decimal(&id[..dash])?;
    (offset > 0 && &id[dash + 1..] == b"1").then_some(offset)
}

/// Decodes one history stream entry: `[id, [field, value, ...]]` with
/// fields `p` (payload), `t` (published_us) and `i` (ingress_us).
pub fn parse_entry(v: Value, max_payload: usize) -> Result<Publication, Malformed> {
    let Value::Array(mut parts) = v else {
        return Err(Malformed::Entry("not an array"));
    };
    if parts.len() != 2 {
        return Err(Malformed::Entry("not [id, fields]"));
    }
    let fields = parts.pop().expect("two parts");
    let id = bytes_of(parts.pop().expect("two parts")).ok_or(Malformed::Entry("id"))?;
    let offset = offset_of_id(&id).ok_or(Malformed::Entry("id is not <offset>-1"))?;
    let fields = match fields {
        Value::Array(f) => f,
        _ => return Err(Malformed::Entry("fields")),
    };
    if fields.len() % 2 != 0 || fields.len() > 16 {
        return Err(Malformed::Entry("field count"));
    }
    let (mut payload, mut published_us, mut ingress_us) = (None, None, None);
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = bytes_of(k).ok_or(Malformed::Entry("field name"))?;
        let v = bytes_of(v).ok_or(Malformed::Entry("field value"))?;
        match &k[..] {
            b"p" => payload = Some(v),
            b"t" => published_us = Some(parse_decimal(&v).ok_or(Malformed::Entry("t"))?),
            b"i" => ingress_us = Some(parse_decimal(&v).ok_or(Malformed::Entry("i"))?),
            _ => {}
        }
    }
    let payload = payload.ok_or(Malformed::Entry("no payload"))?;
    if payload.len() > max_payload {
        return Err(Malformed::TooLarge(payload.len()));
    }
    Ok(Publication {
        offset,
        published_us: published_us.ok_or(Malformed::Entry("no t"))?,
        ingress_us: ingress_us.unwrap_or(0),
        payload,
    })
}

/// The ingest stream entry ID's millisecond part, as microseconds: when
/// the backend added the command.
pub fn ingest_id_us(id: &str) -> Option<u64> {
    let ms = parse_decimal(id.split('-').next()?.as_bytes())?;
    ms.checked_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn publication(offset: u64, payload: &'static [u8]) -> Publication {
        Publication {
            offset,
            published_us: 1_700_000_000_000_001,
            ingress_us: 1_700_000_000_000_000,
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn announcement_round_trips() {
        let p = publication(42, b"hello");
        let bytes = Bytes::from(encode_announcement(0xdead_beef, &p));
        let a = decode_announcement(bytes, 1024).unwrap();
        assert_eq!(a.epoch, 0xdead_beef);
        assert_eq!(a.publication.offset, 42);
        assert_eq!(a.publication.published_us, p.published_us);
        assert_eq!(a.publication.ingress_us, p.ingress_us);
        assert_eq!(&a.publication.payload[..], b"hello");
    }

    #[test]
    fn announcement_rejects_bad_input() {
        let good = encode_announcement(7, &publication(1, b"xyz"));
        assert_eq!(
            decode_announcement(Bytes::from(good[..10].to_vec()), 1024).unwrap_err(),
            Malformed::Short(10)
        );
        let mut v = good.clone();
        v[0] = 9;
        assert_eq!(
            decode_announcement(Bytes::from(v), 1024).unwrap_err(),
            Malformed::Version(9)
        );
        assert_eq!(
            decode_announcement(Bytes::from(good.clone()), 2).unwrap_err(),
            Malformed::TooLarge(3)
        );
        let zero_epoch = encode_announcement(0, &publication(1, b""));
        assert_eq!(
            decode_announcement(Bytes::from(zero_epoch), 9).unwrap_err(),
            Malformed::ZeroEpoch
        );
        let zero_offset = encode_announcement(3, &publication(0, b""));
        assert_eq!(
            decode_announcement(Bytes::from(zero_offset), 9).unwrap_err(),
            Malformed::ZeroOffset
        );
    }

    #[test]
    fn epochs_are_strict_hex() {
        assert_eq!(parse_epoch(epoch_hex(0x1234).as_bytes()), Ok(0x1234));
        assert_eq!(
            parse_epoch(epoch_hex(u64::MAX >> 1).as_bytes()),
            Ok(u64::MAX >> 1)
        );
        for bad in [
            &b""[..],
            b"0000000000000000",
            b"000000000000000G",
            b"00000000000000AB",
            b"123",
            b"+000000000000001",
        ] {
            assert!(parse_epoch(bad).is_err(), "{bad:?}");
        }
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        let mut f = Vec::new();
        for (k, v) in fields {
            f.push(Value::from(*k));
            f.push(Value::from(*v));
        }
        Value::Array(vec![Value::from(id), Value::Array(f)])
    }

    #[test]
    fn entries_decode_or_are_rejected() {
        let p = parse_entry(entry("5-1", &[("p", "abc"), ("t", "17"), ("i", "16")]), 100).unwrap();
        assert_eq!((p.offset, p.published_us, p.ingress_us), (5, 17, 16));
        assert_eq!(&p.payload[..], b"abc");
        for bad in [
            entry("5-0", &[("p", "abc"), ("t", "17")]),
            entry("0-1", &[("p", "abc"), ("t", "17")]),
            entry("x-1", &[("p", "abc"), ("t", "17")]),
            entry("5-1", &[("t", "17")]),
            entry("5-1", &[("p", "abc")]),
            entry("5-1", &[("p", "abc"), ("t", "-1")]),
            entry("5-1", &[("p", "abc"), ("t", "99999999999999999999999")]),
            Value::Array(vec![Value::from("5-1")]),
            Value::Array(vec![Value::from("5-1"), Value::Null]),
            Value::Integer(3),
        ] {
            assert!(parse_entry(bad.clone(), 100).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_entry(entry("5-1", &[("p", "abc"), ("t", "1")]), 2).unwrap_err(),
            Malformed::TooLarge(3)
        );
    }

    #[test]
    fn ingest_ids_give_their_time() {
        assert_eq!(ingest_id_us("1700000000000-0"), Some(1_700_000_000_000_000));
        assert_eq!(ingest_id_us("junk"), None);
    }

    #[test]
    fn presence_announcements_decode() {
        match decode_announced(Bytes::from_static(b"\x02\x01alice"), 10).unwrap() {
            Announced::Presence { user, joined } => assert_eq!((&*user, joined), ("alice", true)),
            other => panic!("{other:?}"),
        }
        for bad in [&b"\x02\x01"[..], b"\x02\x05bob", b"\x02\x00\xff"] {
            assert!(decode_announced(Bytes::from_static(bad), 10).is_err());
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode_announcement(Bytes::from(data.clone()), 16);
            let _ = decode_announced(Bytes::from(data.clone()), 16);
            let _ = parse_epoch(&data);
            let _ = offset_of_id(&data);
        }
    }
}
