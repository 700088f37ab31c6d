//! Decoding untrusted frames through the FlatBuffers verifier.

use flatbuffers::{Vector, VerifierOptions};

use super::{fb, ClientRequest, DecodeLimits, Position, ServerMessage, WireError};

/// Deepest table nesting the verifier accepts. The schema's deepest path is
/// Frame → Message → PublicationBatch → BatchItem (4); the schema is not
/// recursive, so this only guards against verifier changes.
const MAX_DEPTH: usize = 8;

/// Tables allowed per permitted message. A client message is 2 tables
/// (Message + body), a server message 2 plus its batch items (which count
/// as messages themselves), so 8 leaves room for a frame with a few times
/// too many messages to verify and be reported as `TooManyMessages`, while
/// still bounding the verifier's work.
const TABLES_PER_MESSAGE: usize = 8;

/// Verifier work allowed per table on top of `max_bytes`: the verifier's
/// "apparent size" counts a shared vtable once per table using it, so a
/// legitimate frame of exactly `max_bytes` looks slightly larger than it is.
/// Real vtables here are at most 16 bytes; sharing one big vector between
/// many tables (a DAG amplification) still exceeds the limit.
const APPARENT_BYTES_PER_TABLE: usize = 64;

fn verify<'a>(
    buf: &'a [u8],
    limits: &DecodeLimits,
) -> Result<Vector<'a, flatbuffers::ForwardsUOffset<fb::Message<'a>>>, WireError> {
    if buf.len() > limits.max_bytes {
        return Err(WireError::TooLarge {
            len: buf.len(),
            max: limits.max_bytes,
        });
    }
    // Checked before calling the generated helper, which asserts on length.
    if buf.len() < 8 || !fb::frame_buffer_has_identifier(buf) {
        return Err(WireError::FileIdentifier);
    }
    let max_tables = limits
        .max_messages
        .saturating_mul(TABLES_PER_MESSAGE)
        .saturating_add(1);
    let opts = VerifierOptions {
        max_depth: MAX_DEPTH,
        max_tables,
        max_apparent_size: limits
            .max_bytes
            .saturating_add(max_tables.saturating_mul(APPARENT_BYTES_PER_TABLE)),
        ignore_missing_null_terminator: false,
    };
    let frame = fb::root_as_frame_with_opts(&opts, buf)?;
    let messages = match frame.messages() {
        Some(m) if !m.is_empty() => m,
        _ => return Err(WireError::EmptyFrame),
    };
    if messages.len() > limits.max_messages {
        return Err(WireError::TooManyMessages);
    }
    Ok(messages)
}

/// The error for a body that is valid but not expected in this direction.
fn unexpected(body: fb::Body) -> WireError {
    match body {
        fb::Body::NONE => WireError::MissingBody,
        other => match other.variant_name() {
            Some(name) => WireError::UnexpectedMessage(name),
            None => WireError::UnknownBody(other.0),
        },
    }
}

/// Decode one client → server frame into `(request id, request)` pairs, in
/// order. The bytes are verified first (bounded by `limits`); strings and
/// payloads borrow from `buf`. Server-only messages give
/// [`WireError::UnexpectedMessage`]. All or nothing: on error nothing of the
/// frame should be acted upon.
pub fn decode_client_frame<'a>(
    buf: &'a [u8],
    limits: &DecodeLimits,
) -> Result<Vec<(u32, ClientRequest<'a>)>, WireError> {
    let messages = verify(buf, limits)?;
    let mut out = Vec::with_capacity(messages.len());
    for msg in messages.iter() {
        let req = match msg.body_type() {
            fb::Body::Connect => {
                let b = msg.body_as_connect().ok_or(WireError::MissingBody)?;
                ClientRequest::Connect { token: b.token() }
            }
            fb::Body::Subscribe => {
                let b = msg.body_as_subscribe().ok_or(WireError::MissingBody)?;
                ClientRequest::Subscribe {
                    channel: b.channel(),
                    recover: b.recover().map(Position::from),
                }
            }
            fb::Body::Unsubscribe => {
                let b = msg.body_as_unsubscribe().ok_or(WireError::MissingBody)?;
                ClientRequest::Unsubscribe {
                    channel: b.channel(),
                }
            }
            fb::Body::Publish => {
                let b = msg.body_as_publish().ok_or(WireError::MissingBody)?;
                ClientRequest::Publish {
                    channel: b.channel(),
                    payload: b.payload().map(|p| p.bytes()).unwrap_or(&[]),
                    idempotency_key: b.idempotency_key(),
                }
            }
            fb::Body::Ping => {
                msg.body_as_ping().ok_or(WireError::MissingBody)?;
                ClientRequest::Ping
            }
            fb::Body::PresenceQuery => {
                let b = msg.body_as_presence_query().ok_or(WireError::MissingBody)?;
                ClientRequest::PresenceQuery {
                    channel: b.channel(),
                }
            }
            other => return Err(unexpected(other)),
        };
        out.push((msg.id(), req));
    }
    Ok(out)
}

/// Decode one server → client frame into owned `(message id, message)`
/// pairs, in order. A `PublicationBatch` becomes one
/// [`ServerMessage::Publication`] per item (same id), and each item counts
/// against [`DecodeLimits::max_messages`]. Client-only messages give
/// [`WireError::UnexpectedMessage`].
pub fn decode_server_frame(
    buf: &[u8],
    limits: &DecodeLimits,
) -> Result<Vec<(u32, ServerMessage)>, WireError> {
    let messages = verify(buf, limits)?;
    let mut out = Vec::with_capacity(messages.len());
    let push = |out: &mut Vec<_>, id: u32, m: ServerMessage| {
        if out.len() >= limits.max_messages {
            return Err(WireError::TooManyMessages);
        }
        out.push((id, m));
        Ok(())
    };
    for msg in messages.iter() {
        let id = msg.id();
        let m = match msg.body_type() {
            fb::Body::Connected => {
                let b = msg.body_as_connected().ok_or(WireError::MissingBody)?;
                ServerMessage::Connected {
                    client_id: b.client_id(),
                    shard: b.shard(),
                    server_time_ms: b.server_time_ms(),
                }
            }
            fb::Body::Subscribed => {
                let b = msg.body_as_subscribed().ok_or(WireError::MissingBody)?;
                ServerMessage::Subscribed {
                    channel: b.channel().to_owned(),
                    position: Position::from(b.position()),
                    recovered: b.recovered(),
                }
            }
            fb::Body::Unsubscribed => {
                let b = msg.body_as_unsubscribed().ok_or(WireError::MissingBody)?;
                ServerMessage::Unsubscribed {
                    channel: b.channel().to_owned(),
                }
            }
            fb::Body::Publication => {
                let b = msg.body_as_publication().ok_or(WireError::MissingBody)?;
                ServerMessage::Publication {
                    channel: b.channel().to_owned(),
                    epoch: b.epoch(),
                    offset: b.offset(),
                    timestamp_ms: b.timestamp_ms(),
                    payload: b.payload().map(|p| p.bytes().to_vec()).unwrap_or_default(),
                }
            }
            fb::Body::PublicationBatch => {
                let b = msg
                    .body_as_publication_batch()
                    .ok_or(WireError::MissingBody)?;
                for item in b.items().into_iter().flatten() {
                    push(
                        &mut out,
                        id,
                        ServerMessage::Publication {
                            channel: b.channel().to_owned(),
                            epoch: b.epoch(),
                            offset: item.offset(),
                            timestamp_ms: item.timestamp_ms(),
                            payload: item
                                .payload()
                                .map(|p| p.bytes().to_vec())
                                .unwrap_or_default(),
                        },
                    )?;
                }
                continue;
            }
            fb::Body::PublishAck => {
                let b = msg.body_as_publish_ack().ok_or(WireError::MissingBody)?;
                ServerMessage::PublishAck {
                    channel: b.channel().unwrap_or_default().to_owned(),
                    position: Position::from(b.position()),
                }
            }
            fb::Body::Error => {
                let b = msg.body_as_error().ok_or(WireError::MissingBody)?;
                ServerMessage::Error {
                    code: b.code().0,
                    message: b.message().unwrap_or_default().to_owned(),
                }
            }
            fb::Body::Pong => {
                msg.body_as_pong().ok_or(WireError::MissingBody)?;
                ServerMessage::Pong
            }
            fb::Body::PresenceEvent => {
                let b = msg.body_as_presence_event().ok_or(WireError::MissingBody)?;
                ServerMessage::PresenceEvent {
                    channel: b.channel().to_owned(),
                    user: b.user().to_owned(),
                    joined: b.joined(),
                }
            }
            fb::Body::PresenceMembers => {
                let b = msg
                    .body_as_presence_members()
                    .ok_or(WireError::MissingBody)?;
                ServerMessage::PresenceMembers {
                    channel: b.channel().to_owned(),
                    users: b
                        .users()
                        .map(|v| v.iter().map(str::to_owned).collect())
                        .unwrap_or_default(),
                }
            }
            other => return Err(unexpected(other)),
        };
        push(&mut out, id, m)?;
    }
    Ok(out)
}
