//! zstd framing for connections that negotiated `shardcast.v1+zstd`.
//!
//! On such a connection every binary WebSocket message starts with one
//! flag byte:
//!
//! | flag | rest of the message |
//! |------|---------------------|
//! | `0x00` | a plain FlatBuffers `Frame` |
//! | `0x01` | one zstd frame (no dictionary) whose content is a `Frame` |
//! | `0x02` | a little-endian `u32` dictionary id, then one zstd frame compressed with that dictionary |
//!
//! The server compresses a broadcast once per shard (never per connection)
//! when it is at least `min_bytes` long, or with a trained dictionary when
//! it is smaller and one is configured; per-message zstd on ~120-byte
//! messages gains nothing without one. Connections that did not negotiate
//! zstd never see a flag byte.
//!
//! Whatever the server decompresses (clients may send flagged frames too) is
//! capped on output size and window size before the FlatBuffers verifier
//! sees it.

#![forbid(unsafe_code)]

use std::io;

use thiserror::Error;

/// The subprotocol that opts a connection into zstd framing.
pub const SUBPROTOCOL: &str = "shardcast.v1+zstd";

/// Flag byte: a plain FlatBuffers `Frame` follows.
pub const FLAG_PLAIN: u8 = 0x00;
/// Flag byte: one zstd frame (no dictionary) follows.
pub const FLAG_ZSTD: u8 = 0x01;
/// Flag byte: a little-endian `u32` dictionary id, then one zstd frame
/// compressed with that dictionary, follow.
pub const FLAG_ZSTD_DICT: u8 = 0x02;

/// Largest zstd window (as log2) the server accepts from clients: 1 MiB,
/// plenty for messages of at most a few MiB and a bound on the memory one
/// decompression can demand.
pub const MAX_WINDOW_LOG: u32 = 20;

/// Why [`Decompressor::open`] refused a message. The shard closes the
/// connection with 1009 for [`TooLarge`](Self::TooLarge) and 4000 for the
/// others.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CompressionError {
    /// The message is 0 bytes: no flag byte.
    #[error("empty message: a flag byte is required on zstd connections")]
    Empty,
    /// A flag byte other than 0x00, 0x01 or 0x02 (the byte).
    #[error("unknown compression flag {0:#04x}")]
    UnknownFlag(u8),
    /// Flag 0x02 with a dictionary id this server does not have (the id).
    #[error("unknown dictionary id {0}")]
    UnknownDictionary(u32),
    /// The content (declared or decompressed) exceeds the output cap, in
    /// bytes (the cap).
    #[error("decompressed size exceeds the {0}-byte limit")]
    TooLarge(usize),
    /// The zstd frame header declares a window over 1 MiB
    /// ([`MAX_WINDOW_LOG`]); the declared window, in bytes.
    #[error("zstd window of {0} bytes exceeds the limit of 1 MiB")]
    WindowTooLarge(u64),
    /// zstd rejected the frame, or the dictionary id is truncated (zstd's
    /// error text).
    #[error("zstd frame rejected: {0}")]
    Corrupt(String),
}

/// A trained dictionary and its id.
#[derive(Clone, Debug)]
pub struct Dictionary {
    /// The id carried after flag 0x02 and served at `/dictionaries/<id>`:
    /// [`dictionary_id`] of `bytes` (see [`Dictionary::new`]).
    pub id: u32,
    /// The raw zstd dictionary (as written by [`train`]).
    pub bytes: Vec<u8>,
}

impl Dictionary {
    /// The dictionary `bytes` with the id derived from them
    /// ([`dictionary_id`]).
    pub fn new(bytes: Vec<u8>) -> Self {
        Dictionary {
            id: dictionary_id(&bytes),
            bytes,
        }
    }
}

/// The id of a dictionary, derived from its content: the first four bytes
/// of the SHA-256 of the file, read as a big-endian `u32` (the first eight
/// hex digits of `sha256sum`), with 0 taken as 1. Any change to the file
/// (a retrained dictionary) gives a new id, so a client's cached copy,
/// served as immutable, is never stale.
pub fn dictionary_id(bytes: &[u8]) -> u32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    id.max(1)
}

/// Compresses broadcasts, one per shard (it keeps zstd contexts and a
/// scratch buffer, so steady-state compression does not allocate contexts).
pub struct Compressor {
    plain: zstd::bulk::Compressor<'static>,
    dict: Option<(u32, zstd::bulk::Compressor<'static>)>,
    min_bytes: usize,
    scratch: Vec<u8>,
}

impl Compressor {
    /// A compressor at zstd `level` that compresses frames of at least
    /// `min_bytes` bytes plainly and shorter ones only with `dict`. Errors
    /// are zstd's (invalid level, unusable dictionary).
    pub fn new(level: i32, min_bytes: usize, dict: Option<&Dictionary>) -> io::Result<Self> {
        Ok(Compressor {
            plain: zstd::bulk::Compressor::new(level)?,
            dict: match dict {
                Some(d) => Some((
                    d.id,
                    zstd::bulk::Compressor::with_dictionary(level, &d.bytes)?,
                )),
                None => None,
            },
            min_bytes,
            scratch: Vec::new(),
        })
    }

    /// The compressed message (flag byte included) for `data`, or `None`
    /// when compressing would not pay (small and no dictionary, or the
    /// output is not smaller). `data` is a FlatBuffers `Frame`.
    pub fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let (flag, ctx, dict_id) = if data.len() >= self.min_bytes {
            (FLAG_ZSTD, &mut self.plain, None)
        } else {
            let (id, ctx) = self.dict.as_mut()?;
            (FLAG_ZSTD_DICT, ctx, Some(*id))
        };
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        let n = ctx.compress_to_buffer(data, &mut self.scratch).ok()?;
        let header = if dict_id.is_some() { 5 } else { 1 };
        // Not worth it unless smaller than the plain form (data + flag).
        if n + header > data.len() {
            return None;
        }
        let mut out = Vec::with_capacity(header + n);
        out.push(flag);
        if let Some(id) = dict_id {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&self.scratch[..n]);
        Some(out)
    }
}

/// Reads flagged messages, with hard caps.
pub struct Decompressor {
    plain: zstd::bulk::Decompressor<'static>,
    dict: Option<(u32, zstd::bulk::Decompressor<'static>)>,
    out: Vec<u8>,
    max_output: usize,
}

impl Decompressor {
    /// A decompressor whose output is capped at `max_output` bytes and whose
    /// window is capped at 1 MiB; `dict` is the one dictionary it accepts
    /// with flag 0x02. Errors are zstd's (unusable dictionary).
    pub fn new(max_output: usize, dict: Option<&Dictionary>) -> io::Result<Self> {
        let bounded = |mut d: zstd::bulk::Decompressor<'static>| -> io::Result<_> {
            d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(MAX_WINDOW_LOG))?;
            Ok(d)
        };
        Ok(Decompressor {
            plain: bounded(zstd::bulk::Decompressor::new()?)?,
            dict: match dict {
                Some(d) => Some((
                    d.id,
                    bounded(zstd::bulk::Decompressor::with_dictionary(&d.bytes)?)?,
                )),
                None => None,
            },
            out: Vec::new(),
            max_output,
        })
    }

    /// The FlatBuffers bytes inside a flagged message. Borrows `message`
    /// for plain ones; decompressed ones live in an internal buffer until
    /// the next call.
    pub fn open<'a>(&'a mut self, message: &'a [u8]) -> Result<&'a [u8], CompressionError> {
        let (&flag, rest) = message.split_first().ok_or(CompressionError::Empty)?;
        let (ctx, body) = match flag {
            FLAG_PLAIN => return Ok(rest),
            FLAG_ZSTD => (&mut self.plain, rest),
            FLAG_ZSTD_DICT => {
                let id_bytes: [u8; 4] = rest
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| CompressionError::Corrupt("truncated dictionary id".into()))?;
                let id = u32::from_le_bytes(id_bytes);
                match &mut self.dict {
                    Some((have, ctx)) if *have == id => (ctx, &rest[4..]),
                    _ => return Err(CompressionError::UnknownDictionary(id)),
                }
            }
            other => return Err(CompressionError::UnknownFlag(other)),
        };
        // A frame that declares its size lets us refuse a bomb before
        // decompressing anything.
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(body) {
            if size > self.max_output as u64 {
                return Err(CompressionError::TooLarge(self.max_output));
            }
        }
        // One-shot decompression needs no window buffer (the output buffer
        // is the window), but a frame demanding a huge window is not
        // something a well-behaved client sends: refuse it explicitly.
        if let Some(window) = declared_window(body) {
            if window > 1u64 << MAX_WINDOW_LOG {
                return Err(CompressionError::WindowTooLarge(window));
            }
        }
        self.out.clear();
        // The Vec's capacity is the output cap: zstd stops with an error
        // rather than grow it. One extra byte tells "exactly at the limit"
        // from "over it".
        self.out.reserve(self.max_output + 1);
        match ctx.decompress_to_buffer(body, &mut self.out) {
            Ok(n) if n > self.max_output => Err(CompressionError::TooLarge(self.max_output)),
            Ok(_) => Ok(&self.out),
            Err(e) => Err(decompress_error(&e, self.max_output)),
        }
    }
}

/// What a failed one-shot decompression into a buffer of `max_output + 1`
/// bytes means, decided by zstd's error code (the `zstd::Error` the crate
/// wraps in its `io::Error`), never by the wording of its message:
/// `ZSTD_error_dstSize_tooSmall` (the buffer filled up) is content over the
/// cap; any other error is the client's bad frame, described by zstd's
/// error name.
fn decompress_error(e: &io::Error, max_output: usize) -> CompressionError {
    use zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode;
    let code = e.get_ref().and_then(|e| e.downcast_ref::<zstd::Error>());
    match code {
        Some(z) if z.is(ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall) => {
            CompressionError::TooLarge(max_output)
        }
        _ => CompressionError::Corrupt(e.to_string()),
    }
}

/// The window size a zstd frame header declares (RFC 8878 §3.1.1.1), if
/// the header is readable and has a window descriptor. Single-segment
/// frames have none: their window is their content size, checked
/// separately.
fn declared_window(frame: &[u8]) -> Option<u64> {
    const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    if frame.get(..4)? != MAGIC {
        return None;
    }
    let descriptor = *frame.get(4)?;
    let single_segment = descriptor & 0x20 != 0;
    if single_segment {
        return None;
    }
    let w = *frame.get(5)?;
    let log = 10 + u64::from(w >> 3);
    let base = 1u64 << log;
    Some(base + (base / 8) * u64::from(w & 7))
}

/// Trains a dictionary from sample messages (for `shardcast zstd-train`).
pub fn train(samples: &[Vec<u8>], max_bytes: usize) -> io::Result<Vec<u8>> {
    zstd::dict::from_samples(samples, max_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_like(i: usize) -> Vec<u8> {
        format!(
            r#"{{"type":"message","room":"lobby-{}","user":{{"id":{},"name":"user{}"}},"text":"hello there number {}","ts":{}}}"#,
            i % 7,
            i % 100,
            i % 100,
            i,
            1_700_000_000 + i
        )
        .into_bytes()
    }

    #[test]
    fn round_trip_plain_and_compressed() {
        let mut c = Compressor::new(1, 256, None).unwrap();
        let mut d = Decompressor::new(1 << 20, None).unwrap();
        let big: Vec<u8> = (0..64).flat_map(json_like).collect();
        let z = c.compress(&big).expect("a 64-message batch compresses");
        assert_eq!(z[0], FLAG_ZSTD);
        assert!(
            z.len() * 4 < big.len(),
            "ratio {}",
            big.len() as f64 / z.len() as f64
        );
        assert_eq!(d.open(&z).unwrap(), &big[..]);
        assert_eq!(
            c.compress(&json_like(1)),
            None,
            "small without a dictionary"
        );
        let mut plain = vec![FLAG_PLAIN];
        plain.extend_from_slice(b"abc");
        assert_eq!(d.open(&plain).unwrap(), b"abc");
    }

    #[test]
    fn dictionary_compresses_small_messages() {
        let samples: Vec<Vec<u8>> = (0..2000).map(json_like).collect();
        let dict = Dictionary {
            id: 7,
            bytes: train(&samples, 8 * 1024).unwrap(),
        };
        let mut c = Compressor::new(1, 4096, Some(&dict)).unwrap();
        let msg = json_like(5000);
        let z = c.compress(&msg).expect("dictionary pays on small messages");
        assert_eq!(z[0], FLAG_ZSTD_DICT);
        assert_eq!(u32::from_le_bytes(z[1..5].try_into().unwrap()), 7);
        assert!(z.len() * 2 < msg.len(), "{} -> {}", msg.len(), z.len());
        let mut d = Decompressor::new(1 << 20, Some(&dict)).unwrap();
        assert_eq!(d.open(&z).unwrap(), &msg[..]);
        let mut no_dict = Decompressor::new(1 << 20, None).unwrap();
        assert_eq!(
            no_dict.open(&z),
            Err(CompressionError::UnknownDictionary(7))
        );
    }

    #[test]
    fn a_dictionary_id_follows_its_content() {
        // `printf '' | sha256sum` starts e3b0c442.
        assert_eq!(dictionary_id(b""), 0xe3b0_c442);
        let samples: Vec<Vec<u8>> = (0..2000).map(json_like).collect();
        let a = train(&samples, 8 * 1024).unwrap();
        let b = train(&samples[..1000], 4 * 1024).unwrap();
        assert_ne!(a, b);
        let (da, db) = (Dictionary::new(a.clone()), Dictionary::new(b));
        assert_eq!(da.id, dictionary_id(&a));
        assert_eq!(Dictionary::new(a.clone()).id, da.id, "same bytes, same id");
        assert_ne!(da.id, db.id, "a retrained dictionary gets a new id");
        let mut edited = a;
        *edited.last_mut().unwrap() ^= 1;
        assert_ne!(dictionary_id(&edited), da.id, "one byte changes the id");
        assert_ne!(da.id, 0);
    }

    #[test]
    fn decompression_errors_are_classified_by_zstd_error_code() {
        use zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode;
        let zstd_error = |e: &io::Error| {
            *e.get_ref()
                .and_then(|e| e.downcast_ref::<zstd::Error>())
                .expect("the zstd crate wraps its errors")
        };
        let frame = zstd::bulk::compress(&[7u8; 100], 1).unwrap();

        // A real "output buffer full" from zstd: over the cap.
        let mut small = Vec::with_capacity(10);
        let full = zstd::bulk::decompress_to_buffer(&frame, &mut small).unwrap_err();
        assert!(zstd_error(&full).is(ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall));
        assert_eq!(decompress_error(&full, 10), CompressionError::TooLarge(10));

        // A real bad frame (wrong magic number): rejected, with zstd's
        // description.
        let mut bad = frame.clone();
        bad[0] ^= 0xff;
        let mut out = Vec::with_capacity(1000);
        let corrupt = zstd::bulk::decompress_to_buffer(&bad, &mut out).unwrap_err();
        assert!(zstd_error(&corrupt).is(ZSTD_ErrorCode::ZSTD_error_prefix_unknown));
        assert!(matches!(
            decompress_error(&corrupt, 1000),
            CompressionError::Corrupt(m) if m == corrupt.to_string()
        ));

        // The words in a message decide nothing: only zstd's code does.
        let lookalike = io::Error::other("Destination buffer is too small");
        assert_eq!(
            decompress_error(&lookalike, 10),
            CompressionError::Corrupt("Destination buffer is too small".into())
        );
    }

    #[test]
    fn bombs_and_huge_windows_are_refused() {
        let mut d = Decompressor::new(64 * 1024, None).unwrap();
        // 16 MiB of zeros compresses to a few hundred bytes.
        let bomb = zstd::bulk::compress(&vec![0u8; 16 << 20], 3).unwrap();
        let mut msg = vec![FLAG_ZSTD];
        msg.extend_from_slice(&bomb);
        assert_eq!(d.open(&msg), Err(CompressionError::TooLarge(64 * 1024)));

        // The same without a declared size (and an allowed window): caught
        // by the output cap.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        enc.window_log(MAX_WINDOW_LOG).unwrap();
        std::io::Write::write_all(&mut enc, &vec![0u8; 1 << 20]).unwrap();
        let mut msg = vec![FLAG_ZSTD];
        msg.extend_from_slice(&enc.finish().unwrap());
        assert_eq!(d.open(&msg), Err(CompressionError::TooLarge(64 * 1024)));

        // A frame that demands a 128 MiB window.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        enc.window_log(27).unwrap();
        std::io::Write::write_all(&mut enc, &[1u8; 1000]).unwrap();
        let mut msg = vec![FLAG_ZSTD];
        msg.extend_from_slice(&enc.finish().unwrap());
        assert_eq!(d.open(&msg), Err(CompressionError::WindowTooLarge(1 << 27)));

        assert_eq!(d.open(&[9]), Err(CompressionError::UnknownFlag(9)));
        assert_eq!(d.open(&[]), Err(CompressionError::Empty));
        assert!(matches!(
            d.open(&[FLAG_ZSTD, 1, 2, 3]),
            Err(CompressionError::Corrupt(_))
        ));
    }
}
