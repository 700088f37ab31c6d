//! Client requests: decoding a client's binary message, the per-connection
//! rate limit, dispatching each request, publishing, and the replies
//! (errors, acknowledgements) that go back to the requester.

use bytes::Bytes;

use super::connections::{CloseReason, Phase};
use super::fanout::binary_frame;
use super::State;
use std::sync::Arc;

use crate::bus::{BusError, Position, ReplyTo};
use crate::metrics::Limit;
use crate::protocol::channel;
use crate::protocol::compression;
use crate::protocol::wire::{self, ClientRequest, ErrorCode};
use crate::shard::slab::ConnId;

impl State {
    pub(super) fn reply_error(&mut self, id: ConnId, request: u32, code: ErrorCode, message: &str) {
        let frame = binary_frame(self.is_zstd(id), self.encoder.error(request, code, message));
        self.enqueue(id, frame);
    }

    /// Handles one binary message from a client. An `Err` means the
    /// connection must be closed with that reason.
    pub fn on_client_message(&mut self, id: ConnId, data: &[u8]) -> Result<(), CloseReason> {
        let inflated;
        let data = if self.is_zstd(id) {
            match data.first() {
                Some(&compression::FLAG_PLAIN) => &data[1..],
                _ => {
                    let open = self
                        .decompressor
                        .open(data)
                        .map_err(|e| CloseReason::new(e.close_code(), e.to_string()))?;
                    // Copied out so the requests below do not borrow the
                    // shard's decompressor (compressed input is rare).
                    inflated = open.to_vec();
                    &inflated[..]
                }
            }
        } else {
            data
        };
        let requests = wire::decode_client_frame(data, &self.settings.decode_limits)
            .map_err(|e| CloseReason::new(wire::close::INVALID_ENVELOPE, e.reason()))?;
        let limits = &self.settings.limits;
        let (rate, burst, max_strikes) = (
            limits.messages_per_second,
            limits.message_burst,
            limits.rate_limit_strikes,
        );
        for (request, req) in requests {
            self.counters.messages_in += 1;
            let now = self.now;
            let Some(conn) = self.conns.get_mut(id) else {
                break;
            };
            if !conn.bucket.take(now, rate, burst) {
                conn.strikes += 1;
                if conn.strikes >= max_strikes {
                    self.counters.limit(Limit::Rate);
                    return Err(CloseReason::new(
                        wire::close::RATE_LIMITED,
                        format!("over {rate} messages/s {max_strikes} times in a row"),
                    ));
                }
                let msg = format!("over {rate} messages/s; this request was dropped");
                self.reply_error(id, request, ErrorCode::RateLimited, &msg);
                continue;
            }
            conn.strikes = 0;
            self.on_request(id, request, req)?;
        }
        Ok(())
    }

    fn on_request(
        &mut self,
        id: ConnId,
        request: u32,
        req: ClientRequest<'_>,
    ) -> Result<(), CloseReason> {
        let now_secs = self.unix_ms() / 1000;
        let Some(conn) = self.conns.get_mut(id) else {
            return Ok(());
        };
        let connected = match conn.phase {
            Phase::Open { connected } => connected,
            _ => return Ok(()),
        };
        match req {
            ClientRequest::Connect { token } => {
                let identity = self.settings.auth.connect(token, now_secs).map_err(|e| {
                    self.counters.auth_failures += 1;
                    tracing::debug!(error = %e, "connect refused");
                    CloseReason::new(wire::close::AUTH_FAILED, format!("connect refused: {e}"))
                })?;
                if connected {
                    // A second Connect refreshes the token, for the same user.
                    let same_user = match (&conn.identity, &identity) {
                        (Some(old), Some(new)) => old.user == new.user,
                        (None, _) => true,
                        (Some(_), None) => false,
                    };
                    if !same_user {
                        self.reply_error(
                            id,
                            request,
                            ErrorCode::BadRequest,
                            "a token refresh must be for the same user",
                        );
                        return Ok(());
                    }
                }
                conn.identity = identity.map(Box::new);
                conn.phase = Phase::Open { connected: true };
                self.next_client += 1;
                let client_id = (u64::from(self.shard) << 48) | self.next_client;
                let server_ms = self.unix_ms();
                let frame = binary_frame(
                    self.is_zstd(id),
                    self.encoder
                        .connected(request, client_id, u32::from(self.shard), server_ms),
                );
                self.enqueue(id, frame);
            }
            _ if !connected => {
                self.reply_error(
                    id,
                    request,
                    ErrorCode::Unauthorized,
                    "send Connect before any other request",
                );
            }
            ClientRequest::Ping => {
                let frame = binary_frame(self.is_zstd(id), self.encoder.pong(request));
                self.enqueue(id, frame);
            }
            ClientRequest::Subscribe { channel, recover } => {
                let recover = recover.map(|p| Position {
                    epoch: p.epoch,
                    offset: p.offset,
                });
                self.subscribe(id, request, channel, recover);
            }
            ClientRequest::Unsubscribe { channel } => self.unsubscribe(id, request, channel),
            ClientRequest::Publish {
                channel,
                payload,
                idempotency_key,
            } => self.publish(id, request, channel, payload, idempotency_key),
            ClientRequest::PresenceQuery { channel } => self.presence_query(id, request, channel),
        }
        Ok(())
    }

    fn publish(
        &mut self,
        id: ConnId,
        request: u32,
        name: &str,
        payload: &[u8],
        idempotency_key: Option<&str>,
    ) {
        if let Err(e) = channel::validate(name) {
            return self.reply_error(id, request, ErrorCode::InvalidChannel, &e.to_string());
        }
        let allowed = self
            .conns
            .get(id)
            .is_some_and(|c| self.settings.auth.may_publish(c.identity.as_deref(), name));
        if !allowed {
            let msg = format!("not allowed to publish to {name}");
            return self.reply_error(id, request, ErrorCode::Unauthorized, &msg);
        }
        let max = self.settings.max_publish_bytes;
        if payload.len() > max {
            let msg = format!("payload is {} bytes; the limit is {max}", payload.len());
            return self.reply_error(id, request, ErrorCode::PayloadTooLarge, &msg);
        }
        let reply_to = ReplyTo {
            conn: id.as_u64(),
            request,
        };
        self.bus.publish(
            name,
            Bytes::copy_from_slice(payload),
            idempotency_key,
            reply_to,
            self.unix_us,
        );
        self.bus_pending = true;
    }

    /// The bus answered a client's publish: acknowledge it or report why not.
    pub(super) fn on_published(
        &mut self,
        reply_to: ReplyTo,
        channel: Arc<str>,
        result: Result<Position, BusError>,
    ) {
        let id = ConnId::from_u64(reply_to.conn);
        match result {
            Ok(p) => {
                let pos = wire::Position {
                    epoch: p.epoch,
                    offset: p.offset,
                };
                let zstd = self.is_zstd(id);
                let data = self.encoder.publish_ack(reply_to.request, &channel, pos);
                let frame = binary_frame(zstd, data);
                self.enqueue(id, frame);
            }
            Err(e) => {
                self.reply_error(id, reply_to.request, ErrorCode::Unavailable, &e.to_string())
            }
        }
    }
}
