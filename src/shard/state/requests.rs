//! Client requests: decoding a client's binary message, the per-connection
//! rate limit, dispatching each request, publishing, and the replies
//! (errors, acknowledgements) that go back to the requester.

use bytes::Bytes;

use super::connections::Phase;
use super::form::{self, CloseCause, Reply};
use super::State;
use std::sync::Arc;

use crate::bus::{BusError, Position, ReplyTo};
use crate::metrics::Limit;
use crate::protocol::wire::{ClientRequest, ErrorCode};
use crate::protocol::{body, channel};
use crate::shard::slab::ConnId;

impl State {
    /// Encodes `reply` to request `request` for connection `id`'s form.
    pub(super) fn reply_frame(
        &mut self,
        id: ConnId,
        request: u32,
        reply: Reply<'_>,
    ) -> Option<Bytes> {
        form::reply_frame(self.form_of(id), &mut self.encoder, request, reply)
    }

    /// Queues `reply` to request `request` for connection `id`: the one
    /// path every answer takes, whatever the connection speaks (a form
    /// whose protocol has no such answer queues nothing).
    pub(super) fn reply(&mut self, id: ConnId, request: u32, reply: Reply<'_>) {
        if let Reply::Subscribed { channel, .. } = &reply {
            // Pusher's answer to a presence subscription carries the
            // members: it waits for them.
            if self.form_of(id) == form::Form::Pusher && crate::bus::is_presence(channel) {
                return self.pusher_presence_members(id, channel);
            }
        }
        let cache = match &reply {
            Reply::Subscribed { channel, .. } if self.form_of(id) == form::Form::Pusher => {
                use crate::protocol::pusher::channel::{to_client, ChannelKind};
                ChannelKind::of(to_client(channel))
                    .cache
                    .then(|| Arc::<str>::from(*channel))
            }
            _ => None,
        };
        if let Some(frame) = self.reply_frame(id, request, reply) {
            self.enqueue(id, frame);
        }
        if let Some(channel) = cache {
            self.pusher_cache_read(id, &channel);
        }
    }

    pub(super) fn reply_error(&mut self, id: ConnId, request: u32, code: ErrorCode, message: &str) {
        self.reply(id, request, Reply::Error { code, message });
    }

    /// Handles one binary message from a client. An `Err` means the
    /// connection must be closed with that reason.
    pub fn on_client_message(&mut self, id: ConnId, data: &[u8]) -> Result<(), CloseCause> {
        let mut inflated = Vec::new();
        let requests = form::decode_requests(
            self.form_of(id),
            data,
            &mut self.decompressor,
            &self.settings.decode_limits,
            &mut inflated,
        )?;
        for (request, req) in requests {
            if !self.admit_message(id)? {
                let rate = self.settings.limits.messages_per_second;
                let msg = format!("over {rate} messages/s; this request was dropped");
                self.reply_error(id, request, ErrorCode::RateLimited, &msg);
                continue;
            }
            self.on_request(id, request, req)?;
        }
        Ok(())
    }

    /// Counts one message from connection `id` against
    /// `limits.messages_per_second` (burst `limits.message_burst`):
    /// `Ok(true)` to handle it, `Ok(false)` to drop it (over the rate), `Err`
    /// to close the connection after `limits.rate_limit_strikes` messages
    /// over the rate in a row. Every form's messages come through here.
    pub(super) fn admit_message(&mut self, id: ConnId) -> Result<bool, CloseCause> {
        self.counters.messages_in += 1;
        let limits = &self.settings.limits;
        let (rate, burst, max_strikes) = (
            limits.messages_per_second,
            limits.message_burst,
            limits.rate_limit_strikes,
        );
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else {
            return Ok(false);
        };
        if conn.bucket.take(now, rate, burst) {
            conn.strikes = 0;
            return Ok(true);
        }
        conn.strikes += 1;
        if conn.strikes >= max_strikes {
            self.counters.limit(Limit::Rate);
            return Err(CloseCause::RateLimited {
                per_second: rate,
                strikes: max_strikes,
            });
        }
        Ok(false)
    }

    fn on_request(
        &mut self,
        id: ConnId,
        request: u32,
        req: ClientRequest<'_>,
    ) -> Result<(), CloseCause> {
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
                    // Why, and from where; never the token (errors do not
                    // carry it).
                    tracing::debug!(
                        shard = self.shard,
                        peer = %conn.peer,
                        error = %e,
                        "connect refused"
                    );
                    CloseCause::AuthFailed(e.to_string())
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
                tracing::debug!(
                    shard = self.shard,
                    peer = %conn.peer,
                    client_id,
                    anonymous = conn.identity.is_none(),
                    "client connected"
                );
                let reply = Reply::Connected {
                    client_id,
                    shard: u32::from(self.shard),
                    server_ms: self.unix_ms(),
                };
                self.reply(id, request, reply);
            }
            _ if !connected => {
                self.reply_error(
                    id,
                    request,
                    ErrorCode::Unauthorized,
                    "send Connect before any other request",
                );
            }
            ClientRequest::Ping => self.reply(id, request, Reply::Pong),
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
            body::plain(payload),
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
        if self.api_waits.contains_key(&id) {
            return self.on_api_published(id, result);
        }
        match result {
            Ok(at) => {
                let reply = Reply::PublishAck {
                    channel: &channel,
                    at,
                };
                self.reply(id, reply_to.request, reply);
            }
            Err(e) => {
                self.reply_error(id, reply_to.request, ErrorCode::Unavailable, &e.to_string())
            }
        }
    }
}
