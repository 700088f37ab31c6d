//! The bench's publication payload: which stream it belongs to, its
//! sequence number within that stream and the time it was *meant* to be
//! sent. Plain ASCII so that every peer protocol (binary FlatBuffers, JSON
//! strings, NATS text) carries it unchanged.
//!
//! Layout: `<stream hex>:<seq hex>:<intended ns hex>:` padded with `.` to the
//! requested size.

use std::io::Write;

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
    fn rejects_foreign_payloads() {
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"hello"), None);
        assert_eq!(decode(b"1:2:3"), None);
        assert_eq!(decode(b"1:zz:3:"), None);
    }
}
