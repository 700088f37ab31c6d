//! The Pusher Channels protocol, version 7, as pure functions: the JSON
//! messages a pusher-js or Laravel Echo client sends and receives over a
//! WebSocket text frame ([`message`]), the kinds of channel and what each
//! requires ([`channel`]), and the HMAC-SHA256 signatures that authorise a
//! private or presence subscription, a user sign-in, and an HTTP API
//! request ([`sign`]). Nothing here touches a socket or reads the clock:
//! the time an API request is checked against arrives as an argument.
//!
//! Source: the Pusher Channels protocol and HTTP API references (message
//! names, close and error codes, string-to-sign layouts), checked against
//! what the official SDKs send (pusher-js 8, pusher-http-node 5, PyPI
//! `pusher`).

#![forbid(unsafe_code)]

pub mod channel;
pub mod message;
pub mod presence;
pub mod sign;

/// The protocol version this server speaks (`?protocol=7` in the
/// connection URL); pusher-js 8 sends 7.
pub const PROTOCOL_VERSION: u32 = 7;

/// Lowest `?protocol=` accepted: versions before 5 framed events
/// differently.
pub const MIN_PROTOCOL_VERSION: u32 = 5;

/// WebSocket close codes of the Pusher protocol (4000–4099: do not
/// reconnect as is; 4100–4199: reconnect after a back-off; 4200–4299:
/// reconnect now).
pub mod close {
    /// The connection must use TLS (4000); never sent: TLS is a proxy's job.
    pub const SSL_ONLY: u16 = 4000;
    /// The app key in the URL names no app.
    pub const APP_NOT_FOUND: u16 = 4001;
    /// The app is disabled.
    pub const APP_DISABLED: u16 = 4003;
    /// The app is over its connection quota.
    pub const OVER_QUOTA: u16 = 4004;
    /// `?protocol=` is missing or not a number.
    pub const NO_PROTOCOL_VERSION: u16 = 4007;
    /// `?protocol=` names a version this server does not speak.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4008;
    /// The connection is not authorised (e.g. no sign-in within the
    /// deadline).
    pub const UNAUTHORIZED: u16 = 4009;
    /// Over capacity: reconnect after a back-off.
    pub const OVER_CAPACITY: u16 = 4100;
    /// A generic "reconnect now" (used on drain and for slow consumers).
    pub const RECONNECT: u16 = 4200;
    /// No pong (or anything) received within the activity timeout.
    pub const PONG_NOT_RECEIVED: u16 = 4201;
    /// Closed after the connection stayed idle.
    pub const CLOSED_AFTER_INACTIVITY: u16 = 4202;
    /// Over the client-event rate limit.
    pub const CLIENT_EVENT_RATE: u16 = 4301;
}
