//! Pusher HTTP API requests on a shard: a request read in full by the
//! driver is decided by `api::pusher_http`; its events go through the bus
//! like any publish (ordered per channel, stored with a position), and the
//! answer (`200 {}`, or 503 if the bus could not store one) is written once
//! the bus has answered every one of them. One request per connection.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::connections::{Deadline, Phase};
use super::State;
use crate::api::pusher_http::{self, ChannelsQuery, Outcome, Publish, Response, TriggerInfo};
use crate::bus::{BusError, ChannelQuery, Position, ReplyTo};
use crate::protocol::pusher::channel::to_client;
use crate::protocol::pusher::presence::parse_member_key;
use crate::shard::slab::ConnId;

/// An HTTP API request waiting for the bus.
pub(super) enum ApiWait {
    /// Events being published.
    Publish {
        /// Publications not answered yet.
        remaining: usize,
        /// Why one could not be stored, if one could not.
        failed: Option<String>,
        /// The trigger's `info`, answered once all are stored.
        info: Option<TriggerInfo>,
    },
    /// A trigger's events are stored; its `info` is being counted.
    Count {
        info: TriggerInfo,
        /// Subscription counts by channel, as they came.
        counts: HashMap<String, u64>,
        /// User counts of presence channels, as they came.
        users: HashMap<String, usize>,
        /// Answers still to come.
        left: usize,
    },
    /// A channel-information request.
    Query {
        query: ChannelsQuery,
        /// The app's namespace (`PusherApp::namespace`): a list keeps its
        /// channels only.
        namespace: String,
        /// The bus's subscription counts, once answered.
        channels: Option<Vec<(Arc<str>, u64)>>,
        /// Member-list answers still to come.
        members_left: usize,
        /// Users per presence channel, as the member lists came.
        users: HashMap<Arc<str>, Vec<Arc<str>>>,
    },
}

impl State {
    /// An HTTP API request arrived complete on connection `id`.
    pub fn on_api_request(&mut self, id: ConnId, request: &pusher_http::Request) {
        self.counters.messages_in += 1;
        let apps = || {
            self.settings
                .pusher
                .iter()
                .chain(&self.settings.pusher_apps)
        };
        let app = match pusher_http::app_of(request) {
            pusher_http::App::Id(app_id) => apps().find(|a| a.id == app_id),
            pusher_http::App::Key(key) => apps().find(|a| a.key == key),
            // Unsigned (no auth_key): the default app refuses it (401).
            pusher_http::App::None => self.settings.pusher.as_ref(),
        };
        let Some(app) = app.cloned() else {
            let msg = match pusher_http::app_of(request) {
                pusher_http::App::Id(app_id) => format!("no app with id {app_id:?}"),
                pusher_http::App::Key(key) => format!("no app with key {key:?}"),
                pusher_http::App::None => "no Pusher app is configured on this server".into(),
            };
            return self.respond_http(id, &Response::error(404, &msg));
        };
        let now_secs = self.unix_ms() / 1000;
        match pusher_http::handle(request, &app, now_secs) {
            Outcome::Respond(r) => self.respond_http(id, &r),
            Outcome::Query(query) => {
                self.wait_for_bus(id);
                let mut members_left = 0;
                match &query {
                    ChannelsQuery::List { prefix, .. } => {
                        let token = self.api_token(id);
                        self.bus
                            .channels(ChannelQuery::Prefix(Arc::from(prefix.as_str())), token);
                    }
                    ChannelsQuery::One {
                        channel,
                        user_count,
                        ..
                    } => {
                        let token = self.api_token(id);
                        self.bus
                            .channels(ChannelQuery::One(Arc::from(channel.as_str())), token);
                        if *user_count {
                            members_left += 1;
                            let token = self.api_token(id);
                            self.bus.presence_members(channel, token);
                        }
                    }
                    ChannelsQuery::Users { channel } => {
                        members_left += 1;
                        let token = self.api_token(id);
                        self.bus.presence_members(channel, token);
                    }
                }
                let channels = match &query {
                    // Answered by member lists alone.
                    ChannelsQuery::Users { .. } => Some(Vec::new()),
                    _ => None,
                };
                self.api_waits.insert(
                    id,
                    ApiWait::Query {
                        query,
                        namespace: app.namespace.clone(),
                        channels,
                        members_left,
                        users: HashMap::new(),
                    },
                );
                self.bus_pending = true;
            }
            Outcome::Publish(publishes) => self.api_publish(id, publishes, None),
            Outcome::PublishThenCount(publishes, info) => {
                self.api_publish(id, publishes, Some(info))
            }
        }
    }

    /// Publishes an HTTP API request's events; the answer follows once the
    /// bus has stored them all (and, with `info`, counted the channels).
    fn api_publish(&mut self, id: ConnId, publishes: Vec<Publish>, info: Option<TriggerInfo>) {
        self.wait_for_bus(id);
        self.api_waits.insert(
            id,
            ApiWait::Publish {
                remaining: publishes.len(),
                failed: None,
                info,
            },
        );
        for (i, p) in publishes.into_iter().enumerate() {
            let reply_to = ReplyTo {
                conn: id.as_u64(),
                request: i as u32,
            };
            self.bus.publish(
                &p.channel,
                p.body,
                p.idempotency_key.as_deref(),
                reply_to,
                self.unix_us,
            );
        }
        self.bus_pending = true;
    }

    /// The request is read; its answer waits for the bus, at most
    /// `limits.handshake_timeout_ms` (then 503, see `http_timed_out`).
    fn wait_for_bus(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id) {
            conn.phase = Phase::Http;
        }
        let ms = u64::from(self.settings.limits.handshake_timeout_ms);
        let at = self.now + std::time::Duration::from_millis(ms);
        self.deadlines.push(at, (id, Deadline::Http));
    }

    /// An HTTP API request the bus did not answer in time: 503, closed.
    pub(super) fn http_timed_out(&mut self, id: ConnId) {
        self.api_waits.remove(&id);
        let ms = self.settings.limits.handshake_timeout_ms;
        let msg =
            format!("the bus did not answer within {ms} ms (limits.handshake_timeout_ms); retry");
        self.respond_http(id, &Response::error(503, &msg));
    }

    /// A token for one bus answer to connection `id`'s request.
    fn api_token(&mut self, id: ConnId) -> u64 {
        self.next_presence_query += 1;
        let token = self.next_presence_query;
        self.api_tokens.insert(token, id);
        token
    }

    /// The bus answered one publication of an HTTP API request.
    pub(super) fn on_api_published(&mut self, id: ConnId, result: Result<Position, BusError>) {
        let Some(ApiWait::Publish {
            remaining,
            failed,
            info,
        }) = self.api_waits.get_mut(&id)
        else {
            return;
        };
        *remaining -= 1;
        if let Err(e) = result {
            failed.get_or_insert(e.to_string());
        }
        if *remaining > 0 {
            return;
        }
        let (failed, info) = (failed.take(), info.take());
        self.api_waits.remove(&id);
        match (failed, info) {
            (Some(why), _) => {
                let msg = format!("not stored: {why}; retry");
                self.respond_http(id, &Response::error(503, &msg));
            }
            (None, None) => self.respond_http(
                id,
                &Response {
                    status: 200,
                    body: "{}".into(),
                },
            ),
            (None, Some(info)) => self.count_trigger_info(id, info),
        }
    }

    /// Asks the bus the figures a trigger's `info` wants, once per channel.
    fn count_trigger_info(&mut self, id: ConnId, info: TriggerInfo) {
        let mut left = 0;
        let mut asked: Vec<&str> = Vec::new();
        let mut queries = Vec::new();
        for (channel, _, users) in &info.channels {
            if asked.contains(&channel.as_str()) {
                continue;
            }
            asked.push(channel);
            // The subscription count is asked even when only user_count
            // is wanted: one answer shape per channel keeps this simple.
            queries.push((channel.clone(), true));
            left += 1;
            if *users && crate::bus::is_presence(channel) {
                queries.push((channel.clone(), false));
                left += 1;
            }
        }
        self.api_waits.insert(
            id,
            ApiWait::Count {
                info,
                counts: HashMap::new(),
                users: HashMap::new(),
                left,
            },
        );
        for (channel, count) in queries {
            let token = self.api_token(id);
            if count {
                self.bus
                    .channels(ChannelQuery::One(Arc::from(channel.as_str())), token);
            } else {
                self.bus.presence_members(&channel, token);
            }
        }
        self.bus_pending = true;
    }

    /// The bus answered a channel query (`Bus::channels`); `false` if it
    /// was not an HTTP API request's.
    pub(super) fn on_api_channels(
        &mut self,
        token: u64,
        result: Result<Vec<(Arc<str>, u64)>, BusError>,
    ) -> bool {
        let Some(id) = self.api_tokens.remove(&token) else {
            return false;
        };
        let channels = match result {
            Ok(c) => c,
            Err(e) => {
                self.api_waits.remove(&id);
                let msg = format!("channel counts unavailable: {e}; retry");
                self.respond_http(id, &Response::error(503, &msg));
                return true;
            }
        };
        if let Some(ApiWait::Count { counts, left, .. }) = self.api_waits.get_mut(&id) {
            for (name, n) in channels {
                counts.insert(name.to_string(), n);
            }
            *left -= 1;
            self.finish_trigger_info(id);
            return true;
        }
        let Some(ApiWait::Query {
            query,
            namespace,
            channels: slot,
            members_left,
            ..
        }) = self.api_waits.get_mut(&id)
        else {
            return true;
        };
        // Only the app's own channels: the default app's list leaves out
        // the `#app-<id>/` ones of the others.
        let mut channels = channels;
        channels.retain(|(c, _)| c.len() - to_client(c).len() == namespace.len());
        // A list with user counts asks each presence channel's members.
        let wanted: Vec<Arc<str>> = match query {
            ChannelsQuery::List {
                user_count: true, ..
            } => channels.iter().map(|(c, _)| c.clone()).collect(),
            _ => Vec::new(),
        };
        *members_left += wanted.len();
        *slot = Some(channels);
        for channel in wanted {
            let token = self.api_token(id);
            self.bus.presence_members(&channel, token);
            self.bus_pending = true;
        }
        self.finish_api_query(id);
        true
    }

    /// The bus answered a member list; `false` if it was not an HTTP API
    /// request's.
    pub(super) fn on_api_members(
        &mut self,
        token: u64,
        channel: Arc<str>,
        result: &Result<Vec<Arc<str>>, BusError>,
    ) -> bool {
        let Some(id) = self.api_tokens.remove(&token) else {
            return false;
        };
        let users = match result {
            Ok(u) => u.clone(),
            Err(e) => {
                self.api_waits.remove(&id);
                let msg = format!("member list unavailable: {e}; retry");
                self.respond_http(id, &Response::error(503, &msg));
                return true;
            }
        };
        match self.api_waits.get_mut(&id) {
            Some(ApiWait::Query {
                members_left,
                users: got,
                ..
            }) => {
                *members_left -= 1;
                got.insert(channel, users);
                self.finish_api_query(id);
            }
            Some(ApiWait::Count {
                users: got, left, ..
            }) => {
                got.insert(channel.to_string(), distinct_users(&users).len());
                *left -= 1;
                self.finish_trigger_info(id);
            }
            _ => {}
        }
        true
    }

    /// Answers a trigger's `info` once every figure came.
    fn finish_trigger_info(&mut self, id: ConnId) {
        if !matches!(
            self.api_waits.get(&id),
            Some(ApiWait::Count { left: 0, .. })
        ) {
            return;
        }
        let Some(ApiWait::Count {
            info,
            counts,
            users,
            ..
        }) = self.api_waits.remove(&id)
        else {
            return;
        };
        self.respond_http(id, &info.response(&counts, &users));
    }

    /// Answers a channel query once every part of it came.
    fn finish_api_query(&mut self, id: ConnId) {
        let ready = matches!(
            self.api_waits.get(&id),
            Some(ApiWait::Query {
                channels: Some(_),
                members_left: 0,
                ..
            })
        );
        if !ready {
            return;
        }
        let Some(ApiWait::Query {
            query,
            channels: Some(channels),
            users,
            ..
        }) = self.api_waits.remove(&id)
        else {
            return;
        };
        let ids = distinct_users;
        let response = match query {
            ChannelsQuery::List {
                user_count,
                subscription_count,
                ..
            } => {
                let counts: HashMap<Arc<str>, usize> = users
                    .iter()
                    .map(|(c, m)| (c.clone(), ids(m).len()))
                    .collect();
                ChannelsQuery::list_response(subscription_count, &channels, &counts, user_count)
            }
            ChannelsQuery::One {
                channel,
                subscription_count,
                ..
            } => {
                let subs = channels.first().map_or(0, |(_, n)| *n);
                let user_count = users.get(channel.as_str()).map(|m| ids(m).len());
                ChannelsQuery::one_response(subscription_count, subs, user_count)
            }
            ChannelsQuery::Users { channel } => {
                let list = users
                    .get(channel.as_str())
                    .map(|m| ids(m))
                    .unwrap_or_default();
                let refs: Vec<&str> = list.iter().map(String::as_str).collect();
                ChannelsQuery::users_response(&refs)
            }
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

/// Each user of a member list once (a Pusher member key holds id and info;
/// a native client's user is its id), sorted.
fn distinct_users(members: &[Arc<str>]) -> Vec<String> {
    let mut ids: Vec<String> = members
        .iter()
        .map(|m| {
            parse_member_key(m)
                .map_or(&**m, |(user_id, _)| user_id)
                .to_string()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}
