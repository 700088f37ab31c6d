//! The bench's publication payload: which stream it belongs to, its
//! sequence number within that stream and the time it was *meant* to be
//! sent. Plain ASCII so that every peer protocol (binary FlatBuffers, JSON
//! strings, NATS text) carries it unchanged.
//!
//! Layout: `<stream hex>:<seq hex>:<intended ns hex>:` followed by the
//! body. The body is either `.` padding to the requested size ([`Kind::Pad`],
//! the default: trivially compressible) or a chat-message-like JSON object
//! with varying fields ([`Kind::Json`], for measuring compression on
//! something realistic).

use std::io::Write;

use serde::{Deserialize, Serialize};

/// What follows the stamp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `.` padding up to the requested size.
    #[default]
    Pad,
    /// A chat message as JSON (`{"type":"message","room":…,"user":{…},
    /// "text":…,"ts":…,"id":…}`), user, room, text and ids varying per
    /// message; the text grows word by word until the payload reaches the
    /// requested size (so at least ~150 bytes).
    Json,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind, String> {
        match s {
            "pad" => Ok(Kind::Pad),
            "json" => Ok(Kind::Json),
            other => Err(format!("unknown payload kind {other:?} (pad, json)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pad => "pad",
            Kind::Json => "json",
        }
    }
}

/// Writes the payload of `kind` for `stamp` into `out` (cleared first).
pub fn write(kind: Kind, stamp: Stamp, size: usize, out: &mut Vec<u8>) {
    match kind {
        Kind::Pad => encode(stamp, size, out),
        Kind::Json => encode_json(stamp, size, out),
    }
}

/// What a payload says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// A publisher-side stream: one (connection, channel) pair. Sequence
    /// numbers count up by one within a stream from 0.
    pub stream: u64,
    pub seq: u64,
    /// Intended send time, [`crate::clock::now_ns`] scale.
    pub intended_ns: u64,
}

/// Writes the payload for `stamp` into `out` (cleared first), at least
/// `size` bytes long.
pub fn encode(stamp: Stamp, size: usize, out: &mut Vec<u8>) {
    out.clear();
    let _ = write!(
        out,
        "{:x}:{:x}:{:x}:",
        stamp.stream, stamp.seq, stamp.intended_ns
    );
    if out.len() < size {
        out.resize(size, b'.');
    }
}

const NAMES: [&str; 24] = [
    "maria.k", "jdoe", "alex_w", "priya", "tomasz", "lena.m", "chen.li", "omar", "sofia_r",
    "dev-bot", "kenji", "amara", "lucas.b", "ines", "noah", "yuki.t", "fatima", "oliver", "zoe_h",
    "mateo", "anya.p", "sam", "grace.o", "ravi",
];

const WORDS: [&str; 64] = [
    "the", "deploy", "is", "done", "can", "you", "check", "staging", "again", "please", "meeting",
    "moved", "to", "three", "thanks", "looks", "good", "to", "me", "merged", "build", "failed",
    "on", "main", "retrying", "now", "lunch", "anyone", "coffee", "in", "five", "minutes", "I",
    "will", "review", "your", "PR", "after", "standup", "the", "tests", "are", "flaky", "again",
    "ship", "it", "customer", "reported", "a", "bug", "with", "login", "fixed", "in", "latest",
    "release", "see", "ticket", "update", "docs", "later", "today", "ok", "sure",
];

/// A small deterministic generator (splitmix64), so runs are reproducible.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The stamp, then a chat message as JSON, at least `size` bytes.
pub fn encode_json(stamp: Stamp, size: usize, out: &mut Vec<u8>) {
    out.clear();
    let _ = write!(
        out,
        "{:x}:{:x}:{:x}:",
        stamp.stream, stamp.seq, stamp.intended_ns
    );
    let mut r = mix(stamp.stream.wrapping_mul(0x1_0000_0001) ^ stamp.seq);
    let mut next = || {
        r = mix(r);
        r
    };
    let user = (next() % 5000) as usize;
    let _ = write!(
        out,
        r#"{{"type":"message","room":"room-{}","user":{{"id":{},"name":"{}"}},"ts":{},"id":"{:016x}","text":""#,
        next() % 100,
        user,
        NAMES[user % NAMES.len()],
        1_700_000_000_000 + stamp.intended_ns / 1_000_000,
        next()
    );
    let mut first = true;
    // At least a few words; more until the whole payload reaches `size`.
    let mut words = 0;
    while words < 3 || out.len() + 2 < size {
        if !first {
            out.push(b' ');
        }
        first = false;
        out.extend_from_slice(WORDS[(next() % WORDS.len() as u64) as usize].as_bytes());
        words += 1;
    }
    out.extend_from_slice(b"\"}");
}

/// Reads a payload written by [`encode`]; `None` for anything else.
pub fn decode(payload: &[u8]) -> Option<Stamp> {
    let mut parts = payload.splitn(4, |&b| b == b':');
    let mut field = || -> Option<u64> {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 16 {
            return None;
        }
        u64::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok()
    };
    let stream = field()?;
    let seq = field()?;
    let intended_ns = field()?;
    parts.next()?;
    Some(Stamp {
        stream,
        seq,
        intended_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads() {
        let s = Stamp {
            stream: 0x1234_0001,
            seq: 99,
            intended_ns: 1_700_000_000_123_456_789,
        };
        let mut buf = Vec::new();
        encode(s, 100, &mut buf);
        assert_eq!(buf.len(), 100);
        assert!(buf.is_ascii());
        assert_eq!(decode(&buf), Some(s));
        encode(s, 4, &mut buf);
        assert!(buf.len() > 4);
        assert_eq!(decode(&buf), Some(s));
    }

    #[test]
    fn json_payloads_carry_the_stamp_and_vary() {
        let s = Stamp {
            stream: 3,
            seq: 41,
            intended_ns: 5_000_000_000,
        };
        let mut a = Vec::new();
        write(Kind::Json, s, 200, &mut a);
        assert!(a.len() >= 200 && a.len() < 230, "{}", a.len());
        assert_eq!(decode(&a), Some(s));
        let body = std::str::from_utf8(&a)
            .unwrap()
            .splitn(4, ':')
            .nth(3)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "message");
        let mut b = Vec::new();
        write(Kind::Json, Stamp { seq: 42, ..s }, 200, &mut b);
        assert_ne!(a[10..], b[10..]);
        // Small sizes still give a complete message.
        write(Kind::Json, s, 1, &mut b);
        assert!(serde_json::from_str::<serde_json::Value>(
            std::str::from_utf8(&b)
                .unwrap()
                .splitn(4, ':')
                .nth(3)
                .unwrap()
        )
        .is_ok());
    }

    #[test]
    fn rejects_foreign_payloads() {
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"hello"), None);
        assert_eq!(decode(b"1:2:3"), None);
        assert_eq!(decode(b"1:zz:3:"), None);
    }
}
