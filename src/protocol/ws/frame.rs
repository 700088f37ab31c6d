//! RFC 6455 §5 framing, server side: a deframer for masked client frames and
//! encoders for unmasked server frames.
//!
//! # Why the deframer owns its partial state
//! The socket driver reads into one per-shard scratch buffer and keeps
//! nothing, so whatever part of a frame is still missing when a read ends
//! has to live here: up to 14 header bytes, a control payload (≤ 125 bytes,
//! held inline so pings never touch the heap), and the data message being
//! assembled. That last buffer is the only heap allocation and is handed
//! off (not copied) when the message completes, so an idle deframer owns
//! no heap memory at all.
//!
//! # Limits are enforced from the header
//! A frame's size is judged as soon as its length field is complete, before
//! any payload is buffered, and the message buffer grows only as bytes
//! actually arrive (never by the declared length up front), so a client
//! announcing a huge frame and then stalling costs nothing.
//!
//! # Decisions
//! - **Non-minimal length encodings are accepted** (e.g. a 5-byte payload
//!   announced with the 16-bit form). RFC 6455 says senders must use the
//!   minimal form but does not require receivers to fail; the length is
//!   checked against our limits either way, so strictness would buy nothing.
//! - **Too many fragments is 1009** (message too big), like the byte limits:
//!   it is a resource cap, not a policy. `max_fragments` counts every data
//!   frame of a message, the first included.
//! - Control frames are bounded by the protocol's 125 bytes regardless of
//!   `max_frame_bytes`.
//! - Errors are sticky: after one, every call returns the same error and the
//!   buffers are released.

use bytes::Bytes;

use super::close;

/// Longest possible client frame header: 2 + 8 (64-bit length) + 4 (mask key).
const MAX_HEADER: usize = 14;
/// RFC 6455 §5.5: control frame payloads are at most 125 bytes.
const MAX_CONTROL: usize = 125;
/// A close reason must leave room for the 2-byte code within a control payload.
const MAX_CLOSE_REASON: usize = MAX_CONTROL - 2;

/// A frame's opcode (RFC 6455 §5.2; the reserved values are not
/// representable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: a later fragment of the open data message.
    Continuation,
    /// 0x1: a text message (UTF-8), or its first fragment.
    Text,
    /// 0x2: a binary message, or its first fragment.
    Binary,
    /// 0x8: close (§5.5.1), optionally a 2-byte code and a UTF-8 reason.
    Close,
    /// 0x9: ping (§5.5.2), to be answered with a pong of the same payload.
    Ping,
    /// 0xA: pong (§5.5.3).
    Pong,
}

impl OpCode {
    /// The opcode for a wire value; `None` for the reserved ones (3–7, 0xB–0xF).
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0x0 => Some(Self::Continuation),
            0x1 => Some(Self::Text),
            0x2 => Some(Self::Binary),
            0x8 => Some(Self::Close),
            0x9 => Some(Self::Ping),
            0xA => Some(Self::Pong),
            _ => None,
        }
    }

    /// The 4-bit wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Close, Ping and Pong: at most 125 bytes, never fragmented, allowed between fragments.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Resource caps for inbound frames; exceeding any of them is close code 1009.
#[derive(Clone, Copy, Debug)]
pub struct FrameLimits {
    /// Largest payload of one data frame.
    pub max_frame_bytes: usize,
    /// Largest total payload of one (possibly fragmented) message.
    pub max_message_bytes: usize,
    /// Most data frames in one message, the first included.
    pub max_fragments: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
            max_fragments: 64,
        }
    }
}

/// A complete message or control frame from the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Validated UTF-8.
    Text(Bytes),
    /// The unmasked payload of a binary message, fragments joined.
    Binary(Bytes),
    /// A ping's payload (≤ 125 bytes), to echo in the pong.
    Ping(Bytes),
    /// A pong's payload (≤ 125 bytes).
    Pong(Bytes),
    /// `None` for an empty close payload, else the (wire-valid) code and the reason.
    Close(Option<(u16, String)>),
}

/// Why the client's byte stream was rejected. `Display` is short enough
/// (≤ 123 bytes) to be the reason of the close frame we answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// The MASK bit is clear (client frames must be masked, §5.1); 1002.
    #[error("client frame not masked")]
    Unmasked,
    /// Any of RSV1–3 set: no extension that defines them is supported
    /// (§5.2); 1002.
    #[error("reserved bits set")]
    ReservedBits,
    /// A reserved opcode (3–7, 0xB–0xF), the 4-bit value; 1002.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame with a payload over 125 bytes (§5.5); 1002.
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    /// A control frame without FIN (§5.5); 1002.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A continuation frame with no data message open (§5.4); 1002.
    #[error("continuation frame without a message")]
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is open (§5.4); 1002.
    #[error("new message before the previous one finished")]
    MessageInterleaved,
    /// A 64-bit payload length with its most significant bit set (§5.2); 1002.
    #[error("payload length has the most significant bit set")]
    InvalidLength,
    /// A data frame over [`FrameLimits::max_frame_bytes`]; 1009.
    #[error("frame too big")]
    FrameTooBig,
    /// A message over [`FrameLimits::max_message_bytes`]; 1009.
    #[error("message too big")]
    MessageTooBig,
    /// A message of more than [`FrameLimits::max_fragments`] data frames; 1009.
    #[error("too many fragments")]
    TooManyFragments,
    /// Invalid UTF-8 in a text message (§8.1); 1007.
    #[error("invalid UTF-8 in text message")]
    InvalidUtf8,
    /// A close payload of exactly 1 byte (§5.5.1); 1002.
    #[error("close frame with a 1-byte payload")]
    CloseTooShort,
    /// A close code not allowed on the wire (§7.4), the code; 1002.
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// Invalid UTF-8 in a close reason (§5.5.1); 1007.
    #[error("invalid UTF-8 in close reason")]
    InvalidCloseReason,
}

impl WsError {
    /// The close code to send back (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            Self::FrameTooBig | Self::MessageTooBig | Self::TooManyFragments => {
                close::MESSAGE_TOO_BIG
            }
            Self::InvalidUtf8 | Self::InvalidCloseReason => close::INVALID_PAYLOAD,
            _ => close::PROTOCOL_ERROR,
        }
    }

    /// The close frame to answer this error with: its code and its message as reason.
    pub fn close_frame(&self) -> Bytes {
        close_frame(self.close_code(), &self.to_string())
    }
}

/// The frame whose payload is being received.
#[derive(Clone, Copy, Debug)]
struct FrameState {
    opcode: OpCode,
    fin: bool,
    /// Payload bytes still to come.
    remaining: u64,
    mask: [u8; 4],
    /// Payload bytes already received, mod 4: where in the mask key we are.
    phase: usize,
}

/// The data message being assembled (its bytes live in `Deframer::data`).
#[derive(Clone, Copy, Debug)]
struct OpenMessage {
    text: bool,
    fragments: usize,
    /// Prefix of `data` known to be complete, valid UTF-8; at most 3 bytes of
    /// an unfinished sequence follow it. Validation resumes here, so each byte
    /// is checked about once however the message is chunked.
    utf8_valid: usize,
}

/// Incremental decoder for masked client frames.
pub struct Deframer {
    limits: FrameLimits,
    head: [u8; MAX_HEADER],
    head_len: usize,
    frame: Option<FrameState>,
    message: Option<OpenMessage>,
    /// Payload of the open data message; capacity 0 whenever none is open.
    data: Vec<u8>,
    control: [u8; MAX_CONTROL],
    control_len: usize,
    failed: Option<WsError>,
}

impl Deframer {
    /// An idle deframer (no heap memory) enforcing `limits`.
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            head: [0; MAX_HEADER],
            head_len: 0,
            frame: None,
            message: None,
            data: Vec::new(),
            control: [0; MAX_CONTROL],
            control_len: 0,
            failed: None,
        }
    }

    /// Consume from `input` up to the end of the next complete message or control frame.
    ///
    /// Returns `(consumed, Some(msg))`, or `(input.len(), None)` when the input
    /// ended mid-frame (partial state, even a partial header, is kept inside).
    /// The caller loops on the remainder. Checks fail as early as the bytes
    /// allow: a bad first header byte fails before the second arrives, an
    /// oversize length before any payload, invalid UTF-8 at the first bad
    /// sequence. The same bytes give the same messages and the same error
    /// however they are chunked.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Message>), WsError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        let result = self.decode_inner(input);
        if let Err(err) = result {
            self.failed = Some(err);
            self.head_len = 0;
            self.frame = None;
            self.message = None;
            self.data = Vec::new();
            self.control_len = 0;
        }
        result
    }

    /// True when nothing partial is buffered. An idle deframer owns no heap memory.
    pub fn is_idle(&self) -> bool {
        self.head_len == 0 && self.frame.is_none() && self.message.is_none()
    }

    fn decode_inner(&mut self, input: &[u8]) -> Result<(usize, Option<Message>), WsError> {
        let mut pos = 0;
        loop {
            let frame = match self.frame {
                Some(frame) => frame,
                None => {
                    pos += self.read_header(&input[pos..])?;
                    match self.frame {
                        Some(frame) => frame,
                        None => return Ok((pos, None)),
                    }
                }
            };
            let available = input.len() - pos;
            let take = usize::try_from(frame.remaining).map_or(available, |r| r.min(available));
            self.absorb(frame, &input[pos..pos + take])?;
            pos += take;
            if take as u64 != frame.remaining {
                return Ok((pos, None));
            }
            self.frame = None;
            if let Some(message) = self.finish_frame(frame)? {
                return Ok((pos, Some(message)));
            }
        }
    }

    /// Copies header bytes until the header is complete (then `self.frame` is
    /// set) or the input runs out. Returns bytes consumed.
    fn read_header(&mut self, input: &[u8]) -> Result<usize, WsError> {
        let mut used = 0;
        loop {
            let needed = self.check_head()?;
            if self.head_len == needed {
                self.begin_frame(needed);
                return Ok(used);
            }
            let n = (needed - self.head_len).min(input.len() - used);
            if n == 0 {
                return Ok(used);
            }
            self.head[self.head_len..self.head_len + n].copy_from_slice(&input[used..used + n]);
            self.head_len += n;
            used += n;
        }
    }

    /// Validates the header bytes received so far, in a fixed order, and returns
    /// the header's full length (2 until the second byte is known).
    fn check_head(&self) -> Result<usize, WsError> {
        let head = &self.head[..self.head_len];
        let Some(&b0) = head.first() else {
            return Ok(2);
        };
        let opcode = self.check_first_byte(b0)?;
        let Some(&b1) = head.get(1) else {
            return Ok(2);
        };
        if b1 & 0x80 == 0 {
            return Err(WsError::Unmasked);
        }
        let len7 = b1 & 0x7f;
        if opcode.is_control() && usize::from(len7) > MAX_CONTROL {
            return Err(WsError::ControlTooLong);
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if head.len() >= 2 + ext {
            let len = payload_len(head)?;
            self.check_size(opcode, len)?;
        }
        Ok(2 + ext + 4)
    }

    /// FIN, RSV and opcode rules, and whether this frame may start or continue a message.
    fn check_first_byte(&self, b0: u8) -> Result<OpCode, WsError> {
        if b0 & 0x70 != 0 {
            return Err(WsError::ReservedBits);
        }
        let raw = b0 & 0x0f;
        let opcode = OpCode::from_u8(raw).ok_or(WsError::UnknownOpcode(raw))?;
        let fin = b0 & 0x80 != 0;
        match opcode {
            _ if opcode.is_control() => {
                if !fin {
                    return Err(WsError::FragmentedControl);
                }
            }
            OpCode::Continuation => {
                let open = self.message.ok_or(WsError::UnexpectedContinuation)?;
                if open.fragments >= self.limits.max_fragments {
                    return Err(WsError::TooManyFragments);
                }
            }
            _ => {
                if self.message.is_some() {
                    return Err(WsError::MessageInterleaved);
                }
            }
        }
        Ok(opcode)
    }

    fn check_size(&self, opcode: OpCode, len: u64) -> Result<(), WsError> {
        if opcode.is_control() {
            return Ok(()); // bounded by the 7-bit length check already
        }
        if len > self.limits.max_frame_bytes as u64 {
            return Err(WsError::FrameTooBig);
        }
        // `data` is empty unless a message is open, so this is right for first frames too.
        if (self.data.len() as u64).saturating_add(len) > self.limits.max_message_bytes as u64 {
            return Err(WsError::MessageTooBig);
        }
        Ok(())
    }

    /// The validated header of `header_len` bytes is complete: start its payload.
    fn begin_frame(&mut self, header_len: usize) {
        let head = &self.head[..header_len];
        let opcode = OpCode::from_u8(head[0] & 0x0f).unwrap_or(OpCode::Binary);
        let remaining = payload_len(head).unwrap_or(0);
        let mut mask = [0; 4];
        mask.copy_from_slice(&head[header_len - 4..]);
        self.frame = Some(FrameState {
            opcode,
            fin: head[0] & 0x80 != 0,
            remaining,
            mask,
            phase: 0,
        });
        self.head_len = 0;
        match opcode {
            OpCode::Text | OpCode::Binary => {
                self.message = Some(OpenMessage {
                    text: opcode == OpCode::Text,
                    fragments: 1,
                    utf8_valid: 0,
                });
            }
            OpCode::Continuation => {
                if let Some(open) = self.message.as_mut() {
                    open.fragments += 1;
                }
            }
            _ => self.control_len = 0,
        }
    }

    /// Unmasks a piece of the current frame's payload into its destination.
    fn absorb(&mut self, frame: FrameState, chunk: &[u8]) -> Result<(), WsError> {
        if frame.opcode.is_control() {
            // remaining ≤ 125 was checked, so this stays inside `control`.
            let dst = &mut self.control[self.control_len..self.control_len + chunk.len()];
            dst.copy_from_slice(chunk);
            apply_mask(dst, frame.mask, frame.phase);
            self.control_len += chunk.len();
        } else {
            self.grow_for(chunk.len(), frame.remaining);
            let start = self.data.len();
            self.data.extend_from_slice(chunk);
            apply_mask(&mut self.data[start..], frame.mask, frame.phase);
            if let Some(open) = self.message.as_mut().filter(|m| m.text) {
                check_utf8(&self.data, &mut open.utf8_valid)?;
            }
        }
        if let Some(f) = self.frame.as_mut() {
            f.remaining -= chunk.len() as u64;
            f.phase = (f.phase + chunk.len()) % 4;
        }
        Ok(())
    }

    /// Grows `data` by doubling, but never past the end of the current frame:
    /// memory follows bytes received, and a message that completes in one read
    /// ends with `len == capacity`, so it becomes `Bytes` without reallocation.
    fn grow_for(&mut self, incoming: usize, frame_remaining: u64) {
        let needed = self.data.len() + incoming;
        if needed <= self.data.capacity() {
            return;
        }
        let frame_end = (self.data.len() as u64).saturating_add(frame_remaining);
        let doubled = (self.data.capacity() * 2).max(needed) as u64;
        let target = usize::try_from(doubled.min(frame_end))
            .unwrap_or(needed)
            .max(needed);
        self.data.reserve_exact(target - self.data.len());
    }

    /// A frame's payload is complete; returns the message it finishes, if any.
    fn finish_frame(&mut self, frame: FrameState) -> Result<Option<Message>, WsError> {
        let control = &self.control[..self.control_len];
        let message = match frame.opcode {
            OpCode::Close => parse_close(control)?,
            OpCode::Ping => Message::Ping(Bytes::copy_from_slice(control)),
            OpCode::Pong => Message::Pong(Bytes::copy_from_slice(control)),
            _ if !frame.fin => return Ok(None),
            _ => {
                let open = self.message.take();
                let payload = std::mem::take(&mut self.data);
                match open {
                    Some(open) if open.text => {
                        if open.utf8_valid != payload.len() {
                            return Err(WsError::InvalidUtf8);
                        }
                        Message::Text(Bytes::from(payload))
                    }
                    _ => Message::Binary(Bytes::from(payload)),
                }
            }
        };
        Ok(Some(message))
    }
}

/// The payload length from a header with at least its length field present.
fn payload_len(head: &[u8]) -> Result<u64, WsError> {
    let len = match head[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        127 => {
            let mut be = [0; 8];
            be.copy_from_slice(&head[2..10]);
            u64::from_be_bytes(be)
        }
        short => u64::from(short),
    };
    if len >> 63 != 0 {
        return Err(WsError::InvalidLength);
    }
    Ok(len)
}

/// Extends the validated prefix of `data`. Fails at the first byte that can no
/// longer start or continue a valid sequence; an unfinished sequence at the end
/// is fine (more may follow, even in the next fragment).
fn check_utf8(data: &[u8], valid: &mut usize) -> Result<(), WsError> {
    match std::str::from_utf8(&data[*valid..]) {
        Ok(_) => *valid = data.len(),
        Err(e) if e.error_len().is_some() => return Err(WsError::InvalidUtf8),
        Err(e) => *valid += e.valid_up_to(),
    }
    Ok(())
}

fn parse_close(payload: &[u8]) -> Result<Message, WsError> {
    match payload {
        [] => Ok(Message::Close(None)),
        [_] => Err(WsError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close::is_valid_on_wire(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidCloseReason)?;
            Ok(Message::Close(Some((code, reason.to_owned()))))
        }
    }
}

/// XORs `buf` with the mask key, starting `phase` bytes into it.
fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) {
    let key = [
        mask[phase % 4],
        mask[(phase + 1) % 4],
        mask[(phase + 2) % 4],
        mask[(phase + 3) % 4],
    ];
    let word = u32::from_ne_bytes(key);
    let mut chunks = buf.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (b, k) in chunks.into_remainder().iter_mut().zip(key) {
        *b ^= k;
    }
}

/// Size of an unmasked (server) frame header for a payload of this length.
pub fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

fn write_header_inner(out: &mut Vec<u8>, opcode: OpCode, fin: bool, len: usize, masked: bool) {
    let b0 = if fin { 0x80 } else { 0 } | opcode.as_u8();
    let mask_bit = if masked { 0x80 } else { 0 };
    out.push(b0);
    match len {
        0..=125 => out.push(mask_bit | len as u8),
        126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Appends an unmasked server frame header (minimal length encoding).
pub fn write_header(out: &mut Vec<u8>, opcode: OpCode, fin: bool, payload_len: usize) {
    write_header_inner(out, opcode, fin, payload_len, false);
}

/// A complete, final, unmasked server frame in one allocation, ready to be
/// shared by refcount among every recipient. Control opcodes need a payload of
/// at most 125 bytes; that is the caller's promise.
pub fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut out, opcode, true, payload.len());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A Close frame; `reason` is cut at a char boundary so the payload fits in 125 bytes.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    frame(OpCode::Close, &payload[..2 + end])
}

/// A masked client frame, for tests, fuzz seeds and a test client. No
/// validation: it will happily build frames the deframer must reject.
pub fn encode_client_frame(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(payload.len()) + 4 + payload.len());
    write_header_inner(&mut out, opcode, fin, payload.len(), true);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn client(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        encode_client_frame(opcode, fin, payload, MASK)
    }

    /// Decodes all of `bytes`, collecting messages until the first error.
    fn decode_all(d: &mut Deframer, bytes: &[u8]) -> (Vec<Message>, Option<WsError>) {
        let mut out = Vec::new();
        let mut rest = bytes;
        loop {
            match d.decode(rest) {
                Ok((n, msg)) => {
                    assert!(n <= rest.len());
                    rest = &rest[n..];
                    match msg {
                        Some(m) => out.push(m),
                        None => {
                            assert!(rest.is_empty(), "None before the input ended");
                            return (out, None);
                        }
                    }
                }
                Err(e) => return (out, Some(e)),
            }
        }
    }

    fn decode_default(bytes: &[u8]) -> (Vec<Message>, Option<WsError>) {
        decode_all(&mut Deframer::new(FrameLimits::default()), bytes)
    }

    fn error_of(bytes: &[u8]) -> WsError {
        decode_default(bytes).1.expect("stream should be rejected")
    }

    fn text(s: &str) -> Message {
        Message::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn rfc_masked_hello() {
        // RFC 6455 §5.7: a single-frame masked text message.
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(decode_default(&bytes), (vec![text("Hello")], None));
        assert_eq!(client(OpCode::Text, true, b"Hello"), bytes);
    }

    #[test]
    fn decode_stops_after_each_message() {
        let mut bytes = client(OpCode::Text, true, b"a");
        bytes.extend(client(OpCode::Binary, true, b"bc"));
        let mut d = Deframer::new(FrameLimits::default());
        let (n, m) = d.decode(&bytes).unwrap();
        assert_eq!((n, m), (7, Some(text("a"))));
        let (n, m) = d.decode(&bytes[7..]).unwrap();
        assert_eq!(
            (n, m),
            (8, Some(Message::Binary(Bytes::from_static(b"bc"))))
        );
        assert_eq!(d.decode(&[]).unwrap(), (0, None));
    }

    #[test]
    fn unmasked_client_frame_is_1002() {
        let e = error_of(&[0x81, 0x01, b'a']);
        assert_eq!(e, WsError::Unmasked);
        assert_eq!(e.close_code(), 1002);
    }

    #[test]
    fn reserved_bits_are_1002() {
        for rsv in [0x40, 0x20, 0x10] {
            let mut bytes = client(OpCode::Text, true, b"a");
            bytes[0] |= rsv;
            let e = error_of(&bytes);
            assert_eq!(e, WsError::ReservedBits);
            assert_eq!(e.close_code(), 1002);
        }
    }

    #[test]
    fn unknown_opcodes_are_1002() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            let mut bytes = client(OpCode::Binary, true, b"");
            bytes[0] = 0x80 | op;
            let e = error_of(&bytes);
            assert_eq!(e, WsError::UnknownOpcode(op));
            assert_eq!(e.close_code(), 1002);
        }
    }

    #[test]
    fn control_frame_over_125_is_1002() {
        for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            let e = error_of(&client(op, true, &[0; 126]));
            assert_eq!(e, WsError::ControlTooLong);
            assert_eq!(e.close_code(), 1002);
        }
        let (msgs, err) = decode_default(&client(OpCode::Ping, true, &[7; 125]));
        assert_eq!(
            (msgs, err),
            (vec![Message::Ping(Bytes::from(vec![7; 125]))], None)
        );
    }

    #[test]
    fn fragmented_control_frame_is_1002() {
        for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            let e = error_of(&client(op, false, b""));
            assert_eq!(e, WsError::FragmentedControl);
            assert_eq!(e.close_code(), 1002);
        }
    }

    #[test]
    fn continuation_without_message_is_1002() {
        let e = error_of(&client(OpCode::Continuation, true, b"x"));
        assert_eq!(e, WsError::UnexpectedContinuation);
        assert_eq!(e.close_code(), 1002);
    }

    #[test]
    fn new_message_inside_fragmented_one_is_1002() {
        for op in [OpCode::Text, OpCode::Binary] {
            let mut bytes = client(OpCode::Text, false, b"a");
            bytes.extend(client(op, true, b"b"));
            let e = error_of(&bytes);
            assert_eq!(e, WsError::MessageInterleaved);
            assert_eq!(e.close_code(), 1002);
        }
    }

    #[test]
    fn length_with_msb_set_is_1002() {
        let mut bytes = vec![0x82, 0xff];
        bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
        let mut d = Deframer::new(FrameLimits::default());
        // Rejected as soon as the length field is complete, before the mask key.
        let e = d.decode(&bytes).unwrap_err();
        assert_eq!(e, WsError::InvalidLength);
        assert_eq!(e.close_code(), 1002);
    }

    #[test]
    fn non_minimal_lengths_are_accepted() {
        // "hi" announced with the 16-bit and the 64-bit length forms.
        let masked = client(OpCode::Text, true, b"hi");
        let payload = &masked[6..];
        let mut sixteen = vec![0x81, 0xfe, 0, 2];
        sixteen.extend_from_slice(&MASK);
        sixteen.extend_from_slice(payload);
        let mut sixty_four = vec![0x81, 0xff, 0, 0, 0, 0, 0, 0, 0, 2];
        sixty_four.extend_from_slice(&MASK);
        sixty_four.extend_from_slice(payload);
        assert_eq!(decode_default(&sixteen), (vec![text("hi")], None));
        assert_eq!(decode_default(&sixty_four), (vec![text("hi")], None));
    }

    #[test]
    fn frame_over_limit_is_1009_before_payload() {
        let limits = FrameLimits {
            max_frame_bytes: 100,
            max_message_bytes: 1000,
            max_fragments: 64,
        };
        let mut d = Deframer::new(limits);
        let bytes = client(OpCode::Binary, true, &[0; 101]);
        // Only the header (2 + 4 bytes) is offered: the verdict needs no payload.
        let e = d.decode(&bytes[..6]).unwrap_err();
        assert_eq!(e, WsError::FrameTooBig);
        assert_eq!(e.close_code(), 1009);
        let mut d = Deframer::new(limits);
        assert!(decode_all(&mut d, &client(OpCode::Binary, true, &[0; 100]))
            .1
            .is_none());
    }

    #[test]
    fn huge_declared_length_fails_from_the_length_field() {
        let mut d = Deframer::new(FrameLimits::default());
        let mut header = vec![0x82, 0xff];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(d.decode(&header).unwrap_err(), WsError::FrameTooBig);
    }

    #[test]
    fn message_over_limit_is_1009_before_payload() {
        let limits = FrameLimits {
            max_frame_bytes: 100,
            max_message_bytes: 150,
            max_fragments: 64,
        };
        let mut d = Deframer::new(limits);
        let mut bytes = client(OpCode::Binary, false, &[1; 100]);
        let second = client(OpCode::Continuation, true, &[2; 51]);
        bytes.extend_from_slice(&second[..6]); // header only
        let (msgs, err) = decode_all(&mut d, &bytes);
        assert!(msgs.is_empty());
        assert_eq!(err, Some(WsError::MessageTooBig));
        assert_eq!(WsError::MessageTooBig.close_code(), 1009);
        // Exactly at the limit is fine.
        let mut d = Deframer::new(limits);
        let mut bytes = client(OpCode::Binary, false, &[1; 100]);
        bytes.extend(client(OpCode::Continuation, true, &[2; 50]));
        let (msgs, err) = decode_all(&mut d, &bytes);
        assert_eq!(err, None);
        assert_eq!(msgs.len(), 1);
    }

    #[test]
    fn single_frame_over_message_limit_is_1009() {
        let limits = FrameLimits {
            max_frame_bytes: 1000,
            max_message_bytes: 10,
            max_fragments: 64,
        };
        let mut d = Deframer::new(limits);
        let (_, err) = decode_all(&mut d, &client(OpCode::Text, true, &[b'a'; 11]));
        assert_eq!(err, Some(WsError::MessageTooBig));
    }

    #[test]
    fn too_many_fragments_is_1009() {
        let limits = FrameLimits {
            max_frame_bytes: 100,
            max_message_bytes: 100,
            max_fragments: 3,
        };
        let build = |frames: usize| {
            let mut bytes = client(OpCode::Binary, false, b"");
            for i in 1..frames {
                bytes.extend(client(OpCode::Continuation, i + 1 == frames, b""));
            }
            bytes
        };
        let (msgs, err) = decode_all(&mut Deframer::new(limits), &build(3));
        assert_eq!((msgs, err), (vec![Message::Binary(Bytes::new())], None));
        let (msgs, err) = decode_all(&mut Deframer::new(limits), &build(4));
        assert!(msgs.is_empty());
        assert_eq!(err, Some(WsError::TooManyFragments));
        assert_eq!(WsError::TooManyFragments.close_code(), 1009);
    }

    #[test]
    fn fragmented_text_with_interleaved_control_frames() {
        let mut bytes = client(OpCode::Text, false, b"Hel");
        bytes.extend(client(OpCode::Ping, true, b"p1"));
        bytes.extend(client(OpCode::Continuation, false, b"lo, "));
        bytes.extend(client(OpCode::Pong, true, b""));
        bytes.extend(client(OpCode::Continuation, true, "wörld".as_bytes()));
        let (msgs, err) = decode_default(&bytes);
        assert_eq!(err, None);
        assert_eq!(
            msgs,
            vec![
                Message::Ping(Bytes::from_static(b"p1")),
                Message::Pong(Bytes::new()),
                text("Hello, wörld"),
            ]
        );
    }

    #[test]
    fn close_during_fragmented_message_is_delivered() {
        let mut bytes = client(OpCode::Binary, false, b"abc");
        bytes.extend(client(OpCode::Close, true, &[0x03, 0xe8]));
        let (msgs, err) = decode_default(&bytes);
        assert_eq!(
            (msgs, err),
            (vec![Message::Close(Some((1000, String::new())))], None)
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_fine() {
        let euro = "€".as_bytes(); // 3 bytes
        let mut bytes = client(OpCode::Text, false, &euro[..1]);
        bytes.extend(client(OpCode::Continuation, false, &euro[1..2]));
        bytes.extend(client(OpCode::Continuation, true, &euro[2..]));
        assert_eq!(decode_default(&bytes), (vec![text("€")], None));
    }

    #[test]
    fn invalid_utf8_fails_fast_mid_frame() {
        // A 1 MiB text frame whose third byte is invalid: rejected after seeing
        // only the first few payload bytes, without waiting for the rest.
        let mut payload = vec![b'a'; 1 << 19];
        payload[2] = 0xff;
        let bytes = client(OpCode::Text, true, &payload);
        let mut d = Deframer::new(FrameLimits::default());
        let e = d.decode(&bytes[..14 + 3]).unwrap_err();
        assert_eq!(e, WsError::InvalidUtf8);
        assert_eq!(e.close_code(), 1007);
    }

    #[test]
    fn invalid_utf8_fails_fast_across_fragments() {
        // First fragment ends in the lead byte of a 3-byte sequence; the next
        // fragment's first byte cannot continue it: fail there, before the final frame.
        let mut d = Deframer::new(FrameLimits::default());
        let mut bytes = client(OpCode::Text, false, &[b'a', 0xe2]);
        bytes.extend(client(OpCode::Continuation, false, b"("));
        let (msgs, err) = decode_all(&mut d, &bytes);
        assert!(msgs.is_empty());
        assert_eq!(err, Some(WsError::InvalidUtf8));
    }

    #[test]
    fn surrogate_and_overlong_are_invalid() {
        for bad in [
            &[0xed, 0xa0, 0x80][..],
            &[0xc0, 0xaf],
            &[0xf4, 0x90, 0x80, 0x80],
        ] {
            assert_eq!(
                error_of(&client(OpCode::Text, true, bad)),
                WsError::InvalidUtf8,
                "{bad:x?}"
            );
        }
    }

    #[test]
    fn incomplete_utf8_at_message_end_is_1007() {
        let mut bytes = client(OpCode::Text, false, b"ok");
        bytes.extend(client(OpCode::Continuation, true, &[0xe2, 0x82]));
        let e = error_of(&bytes);
        assert_eq!(e, WsError::InvalidUtf8);
        assert_eq!(e.close_code(), 1007);
    }

    #[test]
    fn binary_is_not_utf8_checked() {
        let bytes = client(OpCode::Binary, true, &[0xff, 0xfe]);
        assert_eq!(
            decode_default(&bytes),
            (
                vec![Message::Binary(Bytes::from_static(&[0xff, 0xfe]))],
                None
            )
        );
    }

    #[test]
    fn close_payload_rules() {
        let close = |p: &[u8]| decode_default(&client(OpCode::Close, true, p));
        assert_eq!(close(b""), (vec![Message::Close(None)], None));
        assert_eq!(close(&[0x03]).1, Some(WsError::CloseTooShort));
        assert_eq!(WsError::CloseTooShort.close_code(), 1002);
        assert_eq!(
            close(b"\x03\xe9bye"),
            (vec![Message::Close(Some((1001, "bye".into())))], None)
        );
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            let (_, err) = close(&code.to_be_bytes());
            assert_eq!(err, Some(WsError::InvalidCloseCode(code)), "{code}");
            assert_eq!(WsError::InvalidCloseCode(code).close_code(), 1002);
        }
        for code in [1000u16, 1003, 1007, 1014, 3000, 4999] {
            assert_eq!(close(&code.to_be_bytes()).1, None, "{code}");
        }
        let (_, err) = close(b"\x03\xe8\xff");
        assert_eq!(err, Some(WsError::InvalidCloseReason));
        assert_eq!(WsError::InvalidCloseReason.close_code(), 1007);
    }

    #[test]
    fn partial_header_is_kept_across_calls() {
        let mut bytes = vec![0x82, 0xfe];
        bytes.extend_from_slice(&300u16.to_be_bytes());
        bytes.extend_from_slice(&MASK);
        let frame = client(OpCode::Binary, true, &[9; 300]);
        assert_eq!(&frame[..8], &bytes[..]);
        let mut d = Deframer::new(FrameLimits::default());
        for i in 0..7 {
            assert_eq!(d.decode(&frame[i..i + 1]).unwrap(), (1, None));
            assert!(!d.is_idle());
        }
        let (n, msg) = d.decode(&frame[7..]).unwrap();
        assert_eq!(n, frame.len() - 7);
        assert_eq!(msg, Some(Message::Binary(Bytes::from(vec![9; 300]))));
        assert!(d.is_idle());
    }

    #[test]
    fn idle_deframer_owns_no_heap() {
        let mut d = Deframer::new(FrameLimits::default());
        assert!(d.is_idle());
        assert_eq!(d.data.capacity(), 0);
        let bytes = client(OpCode::Text, true, &[b'x'; 5000]);
        assert_eq!(d.decode(&bytes[..2000]).unwrap(), (2000, None));
        assert!(!d.is_idle());
        assert!(d.data.capacity() >= 1990 && d.data.capacity() <= 5000);
        let (_, msg) = d.decode(&bytes[2000..]).unwrap();
        assert!(matches!(msg, Some(Message::Text(ref t)) if t.len() == 5000));
        assert!(d.is_idle());
        assert_eq!(d.data.capacity(), 0);
        // A fragmented message's buffer is released too.
        let mut bytes = client(OpCode::Binary, false, b"abc");
        bytes.extend(client(OpCode::Continuation, true, b"def"));
        let (msgs, _) = decode_all(&mut d, &bytes);
        assert_eq!(msgs.len(), 1);
        assert!(d.is_idle());
        assert_eq!(d.data.capacity(), 0);
        // A ping never touches the heap.
        d.decode(&client(OpCode::Ping, true, b"xyz")[..5]).unwrap();
        assert_eq!(d.data.capacity(), 0);
    }

    #[test]
    fn buffer_grows_with_received_bytes_not_declared_length() {
        let mut d = Deframer::new(FrameLimits::default());
        let bytes = client(OpCode::Binary, true, &[0; 1 << 20]);
        d.decode(&bytes[..14 + 10]).unwrap();
        assert!(d.data.capacity() < 1024, "{}", d.data.capacity());
    }

    #[test]
    fn capacity_doubles_but_stops_at_frame_end() {
        let mut d = Deframer::new(FrameLimits::default());
        let bytes = client(OpCode::Binary, true, &[3; 777]);
        let (header, payload) = bytes.split_at(8);
        d.decode(header).unwrap();
        for chunk in payload[..700].chunks(10) {
            d.decode(chunk).unwrap();
        }
        // Doubling from 640 would give 1280; the frame ends at 777.
        assert_eq!(d.data.capacity(), 777);
        let (_, msg) = d.decode(&payload[700..]).unwrap();
        assert_eq!(msg, Some(Message::Binary(Bytes::from(vec![3; 777]))));
    }

    #[test]
    fn errors_are_sticky_and_release_buffers() {
        let mut d = Deframer::new(FrameLimits::default());
        let mut bytes = client(OpCode::Binary, false, &[1; 500]);
        bytes.push(0x8f); // unknown opcode 0xF
        let (_, err) = decode_all(&mut d, &bytes);
        assert_eq!(err, Some(WsError::UnknownOpcode(0xf)));
        assert_eq!(d.data.capacity(), 0);
        let fine = client(OpCode::Text, true, b"ok");
        assert_eq!(d.decode(&fine), Err(WsError::UnknownOpcode(0xf)));
    }

    #[test]
    fn first_byte_fails_before_second_arrives() {
        let mut d = Deframer::new(FrameLimits::default());
        assert_eq!(d.decode(&[0xc1]), Err(WsError::ReservedBits));
    }

    #[test]
    fn error_reasons_fit_a_close_frame() {
        let all = [
            WsError::Unmasked,
            WsError::ReservedBits,
            WsError::UnknownOpcode(0xf),
            WsError::ControlTooLong,
            WsError::FragmentedControl,
            WsError::UnexpectedContinuation,
            WsError::MessageInterleaved,
            WsError::InvalidLength,
            WsError::FrameTooBig,
            WsError::MessageTooBig,
            WsError::TooManyFragments,
            WsError::InvalidUtf8,
            WsError::CloseTooShort,
            WsError::InvalidCloseCode(65535),
            WsError::InvalidCloseReason,
        ];
        for e in all {
            let reason = e.to_string();
            assert!(!reason.is_empty() && reason.len() <= 123, "{reason}");
            let f = e.close_frame();
            assert_eq!(&f[2..4], &e.close_code().to_be_bytes());
            assert_eq!(&f[4..], reason.as_bytes());
        }
    }

    #[test]
    fn server_frame_headers() {
        for (len, hl) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            assert_eq!(header_len(len), hl);
            let mut out = Vec::new();
            write_header(&mut out, OpCode::Binary, true, len);
            assert_eq!(out.len(), hl);
            assert_eq!(out[0], 0x82);
            assert_eq!(out[1] & 0x80, 0, "server frames are unmasked");
        }
        let mut out = Vec::new();
        write_header(&mut out, OpCode::Text, false, 300);
        assert_eq!(out, [0x01, 126, 0x01, 0x2c]);
        let mut out = Vec::new();
        write_header(&mut out, OpCode::Binary, true, 70000);
        assert_eq!(out, [0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn frame_is_one_exact_allocation() {
        let f = frame(OpCode::Text, b"Hello");
        assert_eq!(&f[..], b"\x81\x05Hello");
        let big = frame(OpCode::Binary, &[5; 200]);
        assert_eq!(big.len(), 204);
        assert_eq!(&big[..4], &[0x82, 126, 0, 200]);
    }

    #[test]
    fn close_frame_truncates_reason_at_char_boundary() {
        let f = close_frame(1000, "bye");
        assert_eq!(&f[..], b"\x88\x05\x03\xe8bye");
        let long = "é".repeat(100); // 200 bytes, 2 per char
        let f = close_frame(1001, &long);
        assert_eq!(f[1] as usize, f.len() - 2);
        assert!(f.len() - 2 <= 125);
        let reason = std::str::from_utf8(&f[4..]).unwrap();
        assert_eq!(reason, "é".repeat(61)); // 122 bytes: 123 would split a char
    }

    #[test]
    fn server_frames_decode_once_masked() {
        // Our own encoders and the deframer agree on every length form.
        for len in [0, 1, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bytes = encode_client_frame(OpCode::Binary, true, &payload, [1, 2, 3, 4]);
            assert_eq!(
                decode_default(&bytes),
                (vec![Message::Binary(Bytes::from(payload))], None),
                "{len}"
            );
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Item {
            /// A data message split into fragments (sizes), with controls between some.
            Data {
                text: bool,
                payload: Vec<u8>,
                cuts: Vec<usize>,
                ping_between: bool,
            },
            Ping(Vec<u8>),
            Pong(Vec<u8>),
        }

        fn item() -> impl Strategy<Value = Item> {
            prop_oneof![
                (
                    any::<bool>(),
                    prop_oneof![
                        proptest::collection::vec(any::<u8>(), 0..300),
                        ".{0,80}".prop_map(String::into_bytes),
                    ],
                    proptest::collection::vec(0usize..300, 0..5),
                    any::<bool>(),
                )
                    .prop_map(|(text, payload, cuts, ping_between)| Item::Data {
                        text,
                        payload,
                        cuts,
                        ping_between,
                    }),
                proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Item::Ping),
                proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Item::Pong),
            ]
        }

        /// Encodes items into a client byte stream plus the messages it must yield.
        fn encode(items: &[Item], mask: [u8; 4]) -> (Vec<u8>, Vec<Message>) {
            let mut bytes = Vec::new();
            let mut expected = Vec::new();
            for item in items {
                match item {
                    Item::Ping(p) => {
                        bytes.extend(encode_client_frame(OpCode::Ping, true, p, mask));
                        expected.push(Message::Ping(Bytes::from(p.clone())));
                    }
                    Item::Pong(p) => {
                        bytes.extend(encode_client_frame(OpCode::Pong, true, p, mask));
                        expected.push(Message::Pong(Bytes::from(p.clone())));
                    }
                    Item::Data {
                        text,
                        payload,
                        cuts,
                        ping_between,
                    } => {
                        let text = *text && std::str::from_utf8(payload).is_ok();
                        let mut points: Vec<usize> =
                            cuts.iter().map(|c| c % (payload.len() + 1)).collect();
                        points.sort_unstable();
                        points.push(payload.len());
                        let mut start = 0;
                        for (i, &end) in points.iter().enumerate() {
                            let op = match (i, text) {
                                (0, true) => OpCode::Text,
                                (0, false) => OpCode::Binary,
                                _ => OpCode::Continuation,
                            };
                            let fin = i + 1 == points.len();
                            bytes.extend(encode_client_frame(op, fin, &payload[start..end], mask));
                            start = end;
                            if *ping_between && !fin {
                                bytes.extend(encode_client_frame(OpCode::Ping, true, b"", mask));
                                expected.push(Message::Ping(Bytes::new()));
                            }
                        }
                        let body = Bytes::from(payload.clone());
                        expected.push(if text {
                            Message::Text(body)
                        } else {
                            Message::Binary(body)
                        });
                    }
                }
            }
            (bytes, expected)
        }

        fn decode_chunked(bytes: &[u8], sizes: &[usize]) -> (Vec<Message>, Option<WsError>) {
            let mut d = Deframer::new(FrameLimits::default());
            let mut out = Vec::new();
            let mut pos = 0;
            let mut sizes = sizes.iter().cycle();
            while pos < bytes.len() {
                let end = (pos + sizes.next().copied().unwrap_or(1)).min(bytes.len());
                let mut rest = &bytes[pos..end];
                loop {
                    match d.decode(rest) {
                        Ok((n, msg)) => {
                            assert!(n <= rest.len());
                            rest = &rest[n..];
                            match msg {
                                Some(m) => out.push(m),
                                None => break,
                            }
                        }
                        Err(e) => return (out, Some(e)),
                    }
                }
                pos = end;
            }
            (out, None)
        }

        proptest! {
            #[test]
            fn round_trip(items in proptest::collection::vec(item(), 0..8), mask in any::<[u8; 4]>()) {
                let (bytes, expected) = encode(&items, mask);
                let mut d = Deframer::new(FrameLimits::default());
                prop_assert_eq!(decode_all(&mut d, &bytes), (expected, None));
                prop_assert!(d.is_idle());
            }

            #[test]
            fn round_trip_chunked(
                items in proptest::collection::vec(item(), 0..8),
                mask in any::<[u8; 4]>(),
                sizes in proptest::collection::vec(1usize..50, 1..10),
            ) {
                let (bytes, expected) = encode(&items, mask);
                prop_assert_eq!(decode_chunked(&bytes, &sizes), (expected, None));
            }

            #[test]
            fn chunking_never_changes_the_outcome(
                items in proptest::collection::vec(item(), 0..6),
                noise in proptest::collection::vec(any::<u8>(), 0..16),
                at in any::<usize>(),
                sizes in proptest::collection::vec(1usize..40, 1..10),
            ) {
                // A valid stream with arbitrary bytes spliced in somewhere: whatever
                // happens (messages, error) must not depend on the chunking.
                let (mut bytes, _) = encode(&items, [9, 8, 7, 6]);
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, noise);
                let whole = decode_default(&bytes);
                prop_assert_eq!(decode_chunked(&bytes, &sizes), whole);
            }

            #[test]
            fn arbitrary_bytes_never_panic(
                data in proptest::collection::vec(any::<u8>(), 0..512),
                sizes in proptest::collection::vec(1usize..64, 1..8),
            ) {
                let limits = FrameLimits { max_frame_bytes: 64, max_message_bytes: 128, max_fragments: 4 };
                let mut d = Deframer::new(limits);
                let mut pos = 0;
                let mut sizes = sizes.iter().cycle();
                'outer: while pos < data.len() {
                    let end = (pos + sizes.next().copied().unwrap_or(1)).min(data.len());
                    let mut rest = &data[pos..end];
                    while !rest.is_empty() {
                        match d.decode(rest) {
                            Ok((n, _)) => {
                                prop_assert!(n <= rest.len());
                                prop_assert!(n > 0);
                                rest = &rest[n..];
                            }
                            Err(_) => break 'outer,
                        }
                    }
                    pos = end;
                }
            }
        }
    }
}
