//! Pusher HTTP API requests on a shard: a request read in full by the
//! driver is decided by `api::pusher_http`; its events go through the bus
//! like any publish (ordered per channel, stored with a position), and the
//! answer (`200 {}`, or 503 if the bus could not store one) is written once
//! the bus has answered every one of them. One request per connection.

use bytes::Bytes;

use super::connections::Phase;
use super::State;
use crate::api::pusher_http::{self, Outcome, Response};
use crate::bus::{BusError, Position, ReplyTo};
use crate::shard::slab::ConnId;

/// An HTTP API request waiting for the bus.
pub(super) struct ApiWait {
    /// Publications not answered yet.
    remaining: usize,
    /// Why one could not be stored, if one could not.
    failed: Option<String>,
}

impl State {
    /// An HTTP API request arrived complete on connection `id`.
    pub fn on_api_request(&mut self, id: ConnId, request: &pusher_http::Request) {
        self.counters.messages_in += 1;
        let Some(app) = self.settings.pusher.clone() else {
            return self.respond_http(
                id,
                &Response::error(404, "no Pusher app is configured on this server"),
            );
        };
        let now_secs = self.unix_ms() / 1000;
        match pusher_http::handle(request, &app, now_secs) {
            Outcome::Respond(r) => self.respond_http(id, &r),
            Outcome::Publish(publishes) => {
                if let Some(conn) = self.conns.get_mut(id) {
                    conn.phase = Phase::Http;
                }
                self.api_waits.insert(
                    id,
                    ApiWait {
                        remaining: publishes.len(),
                        failed: None,
                    },
                );
                for (i, p) in publishes.into_iter().enumerate() {
                    let reply_to = ReplyTo {
                        conn: id.as_u64(),
                        request: i as u32,
                    };
                    self.bus
                        .publish(&p.channel, p.body, None, reply_to, self.unix_us);
                }
                self.bus_pending = true;
            }
        }
    }

    /// The bus answered one publication of an HTTP API request.
    pub(super) fn on_api_published(&mut self, id: ConnId, result: Result<Position, BusError>) {
        let Some(wait) = self.api_waits.get_mut(&id) else {
            return;
        };
        wait.remaining -= 1;
        if let Err(e) = result {
            wait.failed.get_or_insert(e.to_string());
        }
        if wait.remaining > 0 {
            return;
        }
        let wait = self.api_waits.remove(&id).expect("looked up above");
        let response = match wait.failed {
            None => Response {
                status: 200,
                body: "{}".into(),
            },
            Some(why) => Response::error(503, &format!("not stored: {why}; retry")),
        };
        self.respond_http(id, &response);
    }

    /// Queues bytes for an HTTP connection as they are (an interim
    /// `100 Continue`).
    pub fn send_raw(&mut self, id: ConnId, bytes: &'static [u8]) {
        self.enqueue(id, Bytes::from_static(bytes));
    }

    /// Answers an HTTP request and closes the connection after it.
    pub fn respond_http(&mut self, id: ConnId, response: &Response) {
        if let Some(conn) = self.conns.get(id) {
            tracing::debug!(
                shard = self.shard,
                peer = %conn.peer,
                status = response.status,
                "http api request answered"
            );
        }
        self.enqueue(id, Bytes::from(response.to_bytes()));
        self.begin_close(id);
    }
}
