//! Server-side WebSocket (RFC 6455), sans-IO: bytes in, bytes and events out.
//!
//! No sockets, threads or clocks live here, so every rule is unit-tested and
//! fuzzed without a network, and the shard driver stays a thin loop:
//!
//! 1. Feed the first reads to a [`HandshakeParser`] until it yields a
//!    [`Request`] (or a [`HandshakeError`], answered with
//!    [`error_response`]`(err.status(), &err.to_string())`). Reply with
//!    [`accept_response`], then feed [`Request::leftover`] to the session.
//! 2. Feed every later read to [`Session::decode`] in a loop on the
//!    remainder; after each batch write out [`Session::take_pong`]. On
//!    [`Event::Close`] write [`Session::close_reply`] and shut down; on a
//!    [`WsError`] write [`WsError::close_frame`] and shut down.
//! 3. Outbound frames are built once with [`frame()`] and shared as `Bytes`.
//!
//! Module map: [`handshake`] (HTTP upgrade), [`mod@frame`] (codec and limits),
//! [`session`] (ping/pong/close rules), [`close`] (status codes).

#![forbid(unsafe_code)]

pub mod close;
pub mod frame;
pub mod handshake;
pub mod session;

pub use frame::{
    close_frame, encode_client_frame, frame, header_len, write_header, Deframer, FrameLimits,
    Message, OpCode, WsError,
};
pub use handshake::{
    accept_key, accept_response, error_response, error_response_with, ok_response, HandshakeError,
    HandshakeLimits, HandshakeParser, Request,
};
pub use session::{Event, Session};
