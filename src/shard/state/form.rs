//! What a connection speaks, and the one place where the state's neutral
//! replies, broadcasts and close causes become bytes for it, and where a
//! client's bytes become requests ([`decode_requests`]). The rest of the
//! state never names a wire format: it says *what* to send ([`Reply`],
//! [`Broadcast`], [`CloseCause`]) and this file encodes it for the
//! connection's [`Form`]. A new client protocol (Pusher Channels JSON,
//! Server-Sent Events) is a new `Form` and new arms here.

use std::borrow::Borrow;
use std::sync::Arc;

use bytes::Bytes;

use crate::api::pusher_http::TERMINATE_EVENT;
use crate::bus::{Position, Publication};
use crate::protocol::body;
use crate::protocol::compression::{self, CompressionError, Compressor, Decompressor};
use crate::protocol::pusher::channel::to_client;
use crate::protocol::pusher::message::{Data, Writer};
use crate::protocol::pusher::presence;
use crate::protocol::wire::{self, ClientRequest, DecodeLimits, Encoder, ErrorCode};
use crate::protocol::ws::{self, OpCode};

/// The protocol and encoding a connection speaks, fixed at its upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Form {
    /// `shardcast.v1`: FlatBuffers frames in binary WebSocket messages.
    #[default]
    Native,
    /// `shardcast.v1+zstd`: the same frames behind a compression flag byte
    /// (see `protocol::compression`).
    NativeZstd,
    /// Pusher Channels protocol 7: one JSON object per text frame (see
    /// `protocol::pusher`).
    Pusher,
}

impl Form {
    /// How many forms there are: a broadcast is built at most once per form.
    pub const COUNT: usize = 3;

    /// This form's slot among [`Form::COUNT`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The WebSocket close code and reason this form gives `cause`.
    /// Native codes: `schemas/README.md` and [`wire::close`]; the RFC 6455
    /// ones: [`ws::close`].
    pub fn close(self, cause: &CloseCause) -> (u16, String) {
        match self {
            Form::Native | Form::NativeZstd => native_close(cause),
            Form::Pusher => pusher_close(cause),
        }
    }
}

/// A Pusher `socket_id` as this server gives them: `<prefix>.<connection>`,
/// the prefix naming the shard of one process (random per process, so
/// unique across nodes with high probability), the connection its id on
/// that shard. Both are decimal, as the protocol's `\d+\.\d+` asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketId {
    /// The shard's prefix.
    pub prefix: u64,
    /// The connection's id on that shard.
    pub conn: u64,
}

impl SocketId {
    /// Parses `prefix.conn`; `None` for anything else.
    pub fn parse(s: &str) -> Option<SocketId> {
        let (a, b) = s.split_once('.')?;
        Some(SocketId {
            prefix: a.parse().ok()?,
            conn: b.parse().ok()?,
        })
    }
}

impl std::fmt::Display for SocketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.prefix, self.conn)
    }
}

/// Why the server closes a connection, whatever it speaks; each [`Form`]
/// maps it to its own close code ([`Form::close`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// Its queue went over `fanout.outbound_budget_bytes`, or its oldest
    /// queued byte waited over `fanout.outbound_max_age_ms`.
    SlowConsumer(&'static str),
    /// Nothing arrived for `ms` milliseconds (`limits.idle_timeout_ms`).
    Idle { ms: u64 },
    /// Its token expired and no fresh one came.
    TokenExpired,
    /// No Connect within `ms` milliseconds (`auth.deadline_ms`).
    AuthDeadline { ms: u32 },
    /// Connect was refused; why.
    AuthFailed(String),
    /// Over `per_second` messages/s `strikes` times in a row.
    RateLimited { per_second: u32, strikes: u32 },
    /// The peer broke RFC 6455 (or a size limit): the codec's close code
    /// and its reason.
    WebSocket { code: u16, reason: String },
    /// A message that is not valid in the connection's protocol.
    InvalidMessage(String),
    /// A kind of WebSocket message the protocol does not take (1003).
    UnsupportedData(&'static str),
    /// The server is draining for a restart.
    Draining,
    /// The peer sent a Close: its code is echoed (RFC 6455 §5.5.1).
    PeerClosed(Option<u16>),
    /// Pusher: the app key in the URL names no app (the key).
    UnknownApp(String),
    /// Pusher: the app ended this signed-in user's connections (HTTP API
    /// `terminate_connections`).
    Terminated,
    /// Pusher: more client events than `pusher.client_event_rate` per
    /// second.
    ClientEventRate {
        /// The limit, per second.
        per_second: u32,
    },
    /// Pusher: `?protocol=` missing (`None`) or a version this server does
    /// not speak.
    ProtocolVersion(Option<String>),
}

impl CloseCause {
    /// A slow consumer's backlog cannot get through, so it is dropped and
    /// the close frame goes next; for every other close, replies already
    /// queued are sent first.
    pub fn drops_backlog(&self) -> bool {
        matches!(self, CloseCause::SlowConsumer(_))
    }
}

fn native_close(cause: &CloseCause) -> (u16, String) {
    use wire::close as c;
    match cause {
        CloseCause::SlowConsumer(why) => (
            c::SLOW_CONSUMER,
            format!("slow consumer: {why}; reconnect and recover from your last position"),
        ),
        CloseCause::Idle { ms } => (c::IDLE_TIMEOUT, format!("nothing received for {ms} ms")),
        CloseCause::TokenExpired => (
            c::TOKEN_EXPIRED,
            "token expired; reconnect, or send Connect with a fresh token before expiry".into(),
        ),
        CloseCause::AuthDeadline { ms } => (c::AUTH_DEADLINE, format!("no Connect within {ms} ms")),
        CloseCause::AuthFailed(why) => (c::AUTH_FAILED, format!("connect refused: {why}")),
        CloseCause::RateLimited {
            per_second,
            strikes,
        } => (
            c::RATE_LIMITED,
            format!("over {per_second} messages/s {strikes} times in a row"),
        ),
        CloseCause::WebSocket { code, reason } => (*code, reason.clone()),
        CloseCause::InvalidMessage(why) => (c::INVALID_ENVELOPE, why.clone()),
        CloseCause::UnsupportedData(why) => (ws::close::UNSUPPORTED_DATA, (*why).into()),
        CloseCause::Draining => (
            ws::close::SERVICE_RESTART,
            "server restarting: reconnect and recover from your last position".into(),
        ),
        CloseCause::PeerClosed(code) => (code.unwrap_or(ws::close::NORMAL), String::new()),
        // Pusher-only causes; a native connection never gets them.
        CloseCause::UnknownApp(_)
        | CloseCause::ProtocolVersion(_)
        | CloseCause::Terminated
        | CloseCause::ClientEventRate { .. } => {
            (ws::close::POLICY_VIOLATION, "not a Pusher endpoint".into())
        }
    }
}

/// Close codes of the Pusher protocol (4000–4099 do not reconnect,
/// 4100–4199 reconnect after a back-off, 4200–4299 reconnect now).
fn pusher_close(cause: &CloseCause) -> (u16, String) {
    use crate::protocol::pusher::{close as c, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
    match cause {
        CloseCause::SlowConsumer(why) => (
            c::RECONNECT,
            format!("slow consumer: {why}; reconnect"),
        ),
        CloseCause::Idle { ms } => (
            c::PONG_NOT_RECEIVED,
            format!("nothing received for {ms} ms"),
        ),
        CloseCause::TokenExpired | CloseCause::AuthDeadline { .. } => {
            (c::UNAUTHORIZED, "not authorized".into())
        }
        CloseCause::AuthFailed(why) => (c::UNAUTHORIZED, why.clone()),
        CloseCause::RateLimited {
            per_second,
            strikes,
        } => (
            c::CLIENT_EVENT_RATE,
            format!("over {per_second} messages/s {strikes} times in a row"),
        ),
        CloseCause::WebSocket { code, reason } => (*code, reason.clone()),
        CloseCause::InvalidMessage(why) => (ws::close::POLICY_VIOLATION, why.clone()),
        CloseCause::UnsupportedData(why) => (ws::close::UNSUPPORTED_DATA, (*why).into()),
        CloseCause::Draining => (c::RECONNECT, "server restarting: reconnect".into()),
        CloseCause::PeerClosed(code) => (code.unwrap_or(ws::close::NORMAL), String::new()),
        CloseCause::ClientEventRate { per_second } => (
            c::CLIENT_EVENT_RATE,
            format!("over {per_second} client events per second"),
        ),
        CloseCause::Terminated => (
            c::UNAUTHORIZED,
            "connection terminated by the app".into(),
        ),
        CloseCause::UnknownApp(key) => (
            c::APP_NOT_FOUND,
            format!("no app with key {key:?}"),
        ),
        CloseCause::ProtocolVersion(None) => (
            c::NO_PROTOCOL_VERSION,
            format!("no protocol version given; connect with ?protocol={PROTOCOL_VERSION}"),
        ),
        CloseCause::ProtocolVersion(Some(v)) => (
            c::UNSUPPORTED_PROTOCOL,
            format!(
                "protocol version {v} is not supported; {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION} are"
            ),
        ),
    }
}

/// Decodes one binary message from a connection of `form` into its
/// requests, in order. A compressed message is inflated into `inflated`
/// (bounded by the decompressor's limit), which the requests then borrow.
/// An error is why the connection closes: a message over the size limit
/// gets 1009 as any message too big; anything undecodable is
/// [`CloseCause::InvalidMessage`] (native: 4000).
pub fn decode_requests<'a>(
    form: Form,
    data: &'a [u8],
    decompressor: &mut Decompressor,
    limits: &DecodeLimits,
    inflated: &'a mut Vec<u8>,
) -> Result<Vec<(u32, ClientRequest<'a>)>, CloseCause> {
    let data: &'a [u8] = match (form, data.first()) {
        (Form::Pusher, _) => {
            return Err(CloseCause::UnsupportedData(
                "binary frames are not accepted on /app/: the Pusher protocol sends JSON in text frames",
            ))
        }
        (Form::Native, _) => data,
        (Form::NativeZstd, Some(&compression::FLAG_PLAIN)) => &data[1..],
        (Form::NativeZstd, _) => {
            let open = decompressor.open(data).map_err(|e| match e {
                CompressionError::TooLarge(_) => CloseCause::WebSocket {
                    code: ws::close::MESSAGE_TOO_BIG,
                    reason: e.to_string(),
                },
                _ => CloseCause::InvalidMessage(e.to_string()),
            })?;
            // Copied out so the requests do not borrow the shard's
            // decompressor (compressed input is rare).
            inflated.extend_from_slice(open);
            inflated
        }
    };
    wire::decode_client_frame(data, limits)
        .map_err(|e| CloseCause::InvalidMessage(e.reason().to_string()))
}

/// An answer to one client request, before it is encoded for a form.
pub enum Reply<'a> {
    Connected {
        client_id: u64,
        shard: u32,
        server_ms: u64,
    },
    Pong,
    Subscribed {
        channel: &'a str,
        at: Position,
        recovered: bool,
    },
    /// Request 0: the server ended the subscription.
    Unsubscribed {
        channel: &'a str,
    },
    PublishAck {
        channel: &'a str,
        at: Position,
    },
    Members {
        channel: &'a str,
        users: &'a [Arc<str>],
    },
    Error {
        code: ErrorCode,
        message: &'a str,
    },
}

/// Encodes `reply` (to request `request`) as one frame for `form`; `None`
/// where the form's protocol has no answer for it (Pusher acknowledges no
/// unsubscribe or client event, and its connection is established at the
/// upgrade).
pub fn reply_frame(
    form: Form,
    encoder: &mut Encoder,
    request: u32,
    reply: Reply<'_>,
) -> Option<Bytes> {
    match form {
        Form::Pusher => pusher_reply(reply),
        Form::Native | Form::NativeZstd => {
            let data = match reply {
                Reply::Connected {
                    client_id,
                    shard,
                    server_ms,
                } => encoder.connected(request, client_id, shard, server_ms),
                Reply::Pong => encoder.pong(request),
                Reply::Subscribed {
                    channel,
                    at,
                    recovered,
                } => encoder.subscribed(request, channel, wire_position(at), recovered),
                Reply::Unsubscribed { channel } => encoder.unsubscribed(request, channel),
                Reply::PublishAck { channel, at } => {
                    encoder.publish_ack(request, channel, wire_position(at))
                }
                Reply::Members { channel, users } => {
                    encoder.presence_members(request, channel, users.iter().map(|u| &**u))
                }
                Reply::Error { code, message } => encoder.error(request, code, message),
            };
            Some(binary_frame(form == Form::NativeZstd, data))
        }
    }
}

thread_local! {
    /// The shard's Pusher message writer, reused (a shard is one thread):
    /// building a message allocates nothing but its frame.
    static PUSHER_WRITER: std::cell::RefCell<Writer> = std::cell::RefCell::new(Writer::new());
}

/// Runs `f` with this shard's reusable Pusher writer. `f` must not call
/// back into this function.
pub(super) fn with_pusher_writer<R>(f: impl FnOnce(&mut Writer) -> R) -> R {
    PUSHER_WRITER.with(|w| f(&mut w.borrow_mut()))
}

/// A reply's Pusher frame, if the protocol has one.
fn pusher_reply(reply: Reply<'_>) -> Option<Bytes> {
    with_pusher_writer(|w| {
        pusher_reply_with(w, reply).map(|text| ws::frame(OpCode::Text, text.as_bytes()))
    })
}

fn pusher_reply_with<'w>(w: &'w mut Writer, reply: Reply<'_>) -> Option<&'w str> {
    let text = match reply {
        Reply::Pong => w.pong(),
        // Every channel name a Pusher client reads is its app's name for
        // it (`to_client`): a `[[pusher.apps]]` app's channels carry their
        // `#app-<id>/` namespace only inside the bus.
        Reply::Subscribed { channel, .. } => w.subscription_succeeded(to_client(channel)),
        Reply::Error { code, message } => {
            // Pusher clients read `message`; the native code names the
            // kind of failure.
            w.error(None, &format!("{code:?}: {message}"))
        }
        // Only asked for a presence subscription's answer (see
        // `State::reply`): subscription_succeeded with the members, each
        // user once.
        Reply::Members { channel, users } => {
            let mut members: Vec<(&str, &str)> = users
                .iter()
                .filter_map(|k| presence::parse_member_key(k))
                .collect();
            members.sort_unstable_by_key(|m| m.0);
            members.dedup_by_key(|m| m.0);
            w.presence_succeeded(to_client(channel), members.iter().copied())
        }
        Reply::Connected { .. } | Reply::Unsubscribed { .. } | Reply::PublishAck { .. } => {
            return None
        }
    };
    Some(text)
}

/// The Pusher event name a publication without one (a native publish, an
/// ingest entry) is delivered under.
pub const PUSHER_DEFAULT_EVENT: &str = "publication";
/// The event name of a publication without one whose data is not UTF-8:
/// its data is sent base64-encoded (RFC 4648 §4), as JSON text cannot
/// carry raw bytes.
pub const PUSHER_BASE64_EVENT: &str = "publication.base64";

/// Appends the text frame of one publication on `channel` for Pusher
/// clients to `out`.
fn pusher_publication(out: &mut Vec<u8>, w: &mut Writer, channel: &str, p: &Publication) {
    let b = body::decode(&p.payload);
    let encoded;
    let (event, data) = match (b.event, std::str::from_utf8(b.data)) {
        (Some(event), Ok(data)) if b.raw_json => (event, Data::Json(data)),
        (Some(event), Ok(data)) => (event, Data::Str(data)),
        (None, Ok(data)) => (PUSHER_DEFAULT_EVENT, Data::Str(data)),
        (_, Err(_)) => {
            use base64::Engine;
            encoded = base64::engine::general_purpose::STANDARD.encode(b.data);
            (PUSHER_BASE64_EVENT, Data::Str(&encoded))
        }
    };
    let text = w.event(event, to_client(channel), data, b.user);
    ws::write_header(out, OpCode::Text, true, text.len());
    out.extend_from_slice(text.as_bytes());
}

/// What the fan-out sends to every subscriber of a channel.
pub enum Broadcast<'a, P> {
    /// Consecutive publications of `channel` in `epoch`.
    Publications {
        channel: &'a str,
        epoch: u64,
        items: &'a [P],
    },
    /// `user` joined or left presence channel `channel`.
    Presence {
        channel: &'a str,
        user: &'a str,
        joined: bool,
    },
}

/// Builds a broadcast's frame for each form at most once, when the first
/// recipient of that form needs it; every recipient of a form shares the
/// same frame by refcount. The two native forms share one FlatBuffers
/// encoding; the zstd one is compressed once for all its recipients.
/// Holds the shard's encoder while it lives: build a broadcast's frames
/// before encoding anything else.
pub struct Frames<'b, 'e, P> {
    what: &'b Broadcast<'b, P>,
    encoder: &'e mut Encoder,
    compressor: &'e mut Compressor,
    built: [Option<Bytes>; Form::COUNT],
    /// The native encoding is in the encoder's buffer.
    encoded: bool,
    /// Pusher: the byte range of each publication's frame in the built
    /// Pusher frames that one socket must not get (Pusher's `socket_id`
    /// exclusion: a client event's sender, an HTTP API trigger's
    /// `socket_id`), and that socket.
    pusher_excluded: Vec<(std::ops::Range<usize>, SocketId)>,
    /// Pusher: the broadcast ends its recipients' connections (a user's
    /// `terminate_connections`).
    pusher_terminate: bool,
}

impl<'b, 'e, P: Borrow<Publication>> Frames<'b, 'e, P> {
    pub fn new(
        what: &'b Broadcast<'b, P>,
        encoder: &'e mut Encoder,
        compressor: &'e mut Compressor,
    ) -> Self {
        Frames {
            what,
            encoder,
            compressor,
            built: Default::default(),
            encoded: false,
            pusher_excluded: Vec::new(),
            pusher_terminate: false,
        }
    }

    /// Whether Pusher recipients of this broadcast are to be closed
    /// ([`CloseCause::Terminated`]) after what it carries for them.
    pub fn pusher_terminates(&mut self) -> bool {
        self.get(Form::Pusher);
        self.pusher_terminate
    }

    /// For a Pusher connection `socket` that some publications of this
    /// broadcast exclude: the parts of the shared Pusher frames it gets
    /// (refcounted slices, no copy); `None` when it gets them all (the
    /// common case, a scan of a usually empty list).
    pub fn pusher_parts_without(&mut self, socket: SocketId) -> Option<Vec<Bytes>> {
        // The exclusions are found while the frames are built; the shared
        // buffer is only touched (refcount) for a socket that has some.
        self.get(Form::Pusher);
        if !self.pusher_excluded.iter().any(|(_, s)| *s == socket) {
            return None;
        }
        let all = self.get(Form::Pusher).clone();
        let mut parts = Vec::new();
        let mut at = 0;
        for (range, s) in &self.pusher_excluded {
            if *s != socket {
                continue;
            }
            if range.start > at {
                parts.push(all.slice(at..range.start));
            }
            at = range.end;
        }
        if at < all.len() {
            parts.push(all.slice(at..));
        }
        Some(parts)
    }

    /// The frame for `form`.
    pub fn get(&mut self, form: Form) -> &Bytes {
        let slot = form.index();
        if self.built[slot].is_none() {
            let frame = self.build(form);
            self.built[slot] = Some(frame);
        }
        self.built[slot].as_ref().expect("built above")
    }

    fn build(&mut self, form: Form) -> Bytes {
        if form == Form::Pusher {
            return self.build_pusher();
        }
        // Both native forms carry the same FlatBuffers `Frame`: encoded
        // once, then read back from the encoder (nothing else encodes
        // while these frames are built).
        if !self.encoded {
            encode_broadcast(self.encoder, self.what);
            self.encoded = true;
        }
        let data = self.encoder.last();
        match form {
            Form::Native => ws::frame(OpCode::Binary, data),
            Form::NativeZstd => match self.compressor.compress(data) {
                Some(z) => ws::frame(OpCode::Binary, &z),
                None => binary_frame(true, data),
            },
            Form::Pusher => unreachable!("built by build_pusher"),
        }
    }

    /// Pusher has one event per text frame: a broadcast of several
    /// publications is their frames back to back in one buffer, shared by
    /// every Pusher recipient and written in one go.
    fn build_pusher(&mut self) -> Bytes {
        with_pusher_writer(|w| self.build_pusher_with(w))
    }

    fn build_pusher_with(&mut self, w: &mut Writer) -> Bytes {
        let mut out = Vec::new();
        match *self.what {
            Broadcast::Publications { channel, items, .. } => {
                for p in items {
                    let p = p.borrow();
                    if body::decode(&p.payload).event == Some(TERMINATE_EVENT) {
                        self.pusher_terminate = true;
                        continue;
                    }
                    let start = out.len();
                    pusher_publication(&mut out, w, channel, p);
                    if let Some(socket) = body::decode(&p.payload).exclude.and_then(SocketId::parse)
                    {
                        self.pusher_excluded.push((start..out.len(), socket));
                    }
                }
            }
            Broadcast::Presence {
                channel,
                user,
                joined,
            } => {
                // A native client's user (not a Pusher member key) shows
                // as its name with no info.
                let (id, info) = presence::parse_member_key(user).unwrap_or((user, "null"));
                let text = w.member(to_client(channel), id, joined.then_some(info));
                ws::write_header(&mut out, OpCode::Text, true, text.len());
                out.extend_from_slice(text.as_bytes());
            }
        }
        Bytes::from(out)
    }
}

/// The native FlatBuffers encoding of a broadcast.
fn encode_broadcast<'e, P: Borrow<Publication>>(
    encoder: &'e mut Encoder,
    what: &Broadcast<'_, P>,
) -> &'e [u8] {
    match *what {
        Broadcast::Publications {
            channel,
            epoch,
            items,
        } => encode_publications(encoder, channel, epoch, items),
        Broadcast::Presence {
            channel,
            user,
            joined,
        } => encoder.presence_event(channel, user, joined),
    }
}

/// One frame carrying `items` (consecutive publications of `channel` in
/// `epoch`) for a single connection of `form` (a catching-up one: the live
/// fan-out shares frames through [`Frames`]).
pub fn publications_frame<P: Borrow<Publication>>(
    form: Form,
    encoder: &mut Encoder,
    channel: &str,
    epoch: u64,
    items: &[P],
) -> Bytes {
    match form {
        Form::Native | Form::NativeZstd => binary_frame(
            form == Form::NativeZstd,
            encode_publications(encoder, channel, epoch, items),
        ),
        Form::Pusher => with_pusher_writer(|w| {
            let mut out = Vec::new();
            for p in items {
                let p = p.borrow();
                if body::decode(&p.payload).event != Some(TERMINATE_EVENT) {
                    pusher_publication(&mut out, w, channel, p);
                }
            }
            Bytes::from(out)
        }),
    }
}

fn encode_publications<'e, P: Borrow<Publication>>(
    encoder: &'e mut Encoder,
    channel: &str,
    epoch: u64,
    chunk: &[P],
) -> &'e [u8] {
    encoder.publications(
        channel,
        epoch,
        chunk.iter().map(|p| {
            let p = p.borrow();
            // Native clients get the data; an event's name and the rest
            // are for Pusher clients (see `protocol::body`).
            (
                p.offset,
                p.published_us / 1000,
                body::decode(&p.payload).data,
            )
        }),
    )
}

fn wire_position(p: Position) -> wire::Position {
    wire::Position {
        epoch: p.epoch,
        offset: p.offset,
    }
}

/// A binary frame carrying `data`; on zstd connections with the "plain"
/// flag byte in front. One allocation either way.
fn binary_frame(zstd: bool, data: &[u8]) -> Bytes {
    if !zstd {
        return ws::frame(OpCode::Binary, data);
    }
    let len = data.len() + 1;
    let mut out = Vec::with_capacity(ws::header_len(len) + len);
    ws::write_header(&mut out, OpCode::Binary, true, len);
    out.push(compression::FLAG_PLAIN);
    out.extend_from_slice(data);
    Bytes::from(out)
}
