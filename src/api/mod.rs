//! HTTP endpoints outside the WebSocket path.

#![forbid(unsafe_code)]

pub mod admin;
pub mod pusher_http;
