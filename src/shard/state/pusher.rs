//! Pusher Channels connections (protocol 7) on the neutral state: the
//! connection is established at the upgrade (`pusher:connection_established`
//! with its `socket_id`), a channel's kind and the app's signature decide
//! who may subscribe, and client events are publications that carry their
//! event name and their sender's `socket_id` (so the sender is left out of
//! the fan-out without re-encoding). Messages are read and written by
//! `protocol::pusher`; replies to the neutral requests go through
//! [`super::form`] like every other form's.

use std::sync::Arc;

use bytes::Bytes;

use super::connections::Phase;
use super::form::{self, with_pusher_writer, CloseCause, Form, Reply, SocketId};
use super::subscriptions::ChannelState;
use super::State;
use crate::bus::{History, ReplyTo};
use crate::metrics::Limit;
use crate::protocol::pusher::channel::{to_client, ChannelKind, Kind, SERVER_TO_USER_PREFIX};
use crate::protocol::pusher::message::{self, ClientMessage};
use crate::protocol::pusher::{presence, sign};
use crate::protocol::ws::{self, OpCode};
use crate::protocol::{body, channel};
use crate::shard::slab::ConnId;
use crate::shard::PusherApp;

/// The path prefix of the Pusher WebSocket endpoint: `/app/{key}`.
pub const PUSHER_PATH: &str = "/app/";

impl State {
    /// This connection's Pusher `socket_id`.
    pub(super) fn socket_id(&self, id: ConnId) -> SocketId {
        SocketId {
            prefix: self.settings.socket_prefix,
            conn: id.as_u64(),
        }
    }

    /// The Pusher app whose key is `key`: `None` for the default app
    /// (`pusher.*`), `Some(i)` for `[[pusher.apps]]` `i`; `Err` if none.
    fn pusher_app_index(&self, key: &str) -> Result<Option<u32>, ()> {
        if self.settings.pusher.as_ref().is_some_and(|a| a.key == key) {
            return Ok(None);
        }
        match self.settings.pusher_apps.iter().position(|a| a.key == key) {
            Some(i) => Ok(Some(i as u32)),
            None => Err(()),
        }
    }

    /// The Pusher app of connection `id`: its `[[pusher.apps]]` app if it
    /// has one (`pusher_conn_apps`), else the default app.
    pub(super) fn pusher_app(&self, id: ConnId) -> Option<Arc<PusherApp>> {
        match self.pusher_conn_apps.get(&id) {
            Some(&i) => self.settings.pusher_apps.get(i as usize).cloned(),
            None => self.settings.pusher.clone(),
        }
    }

    /// Whether `key` names a Pusher app this server serves, and the
    /// `?protocol=` of `query` is one it speaks: the close cause if not.
    pub fn pusher_refusal(&self, key: &str, query: Option<&str>) -> Option<CloseCause> {
        use crate::protocol::pusher::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
        if self.pusher_app_index(key).is_err() {
            return Some(CloseCause::UnknownApp(key.to_string()));
        }
        let version = query.and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "protocol")
                .map(|(_, v)| v.into_owned())
        });
        match version {
            None => Some(CloseCause::ProtocolVersion(None)),
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&n) => None,
                _ => Some(CloseCause::ProtocolVersion(Some(v))),
            },
        }
    }

    /// The upgrade on `/app/{key}` succeeded: queue the 101 `response`,
    /// then `pusher:connection_established`, or, with `refuse`, the close
    /// the Pusher protocol gives it (4001 unknown app, 4007/4008 protocol
    /// version: pusher-js reads them from the close frame, so the upgrade
    /// itself is accepted).
    pub fn accept_pusher(
        &mut self,
        id: ConnId,
        key: &str,
        response: Vec<u8>,
        refuse: Option<CloseCause>,
    ) {
        // Only a `[[pusher.apps]]` connection is remembered: the default
        // app's cost nothing more than before.
        match self.pusher_app_index(key) {
            Ok(Some(i)) => {
                self.pusher_conn_apps.insert(id, i);
            }
            _ => {
                self.pusher_conn_apps.remove(&id);
            }
        }
        if let Some(conn) = self.conns.get_mut(id) {
            // No Connect step: the app key was the credential.
            conn.phase = Phase::Open { connected: true };
            conn.form = Form::Pusher;
        }
        self.enqueue(id, Bytes::from(response));
        if let Some(cause) = refuse {
            self.close(id, &cause);
            return;
        }
        let timeout = self.pusher_app(id).map_or(120, |a| a.activity_timeout_secs);
        let socket_id = self.socket_id(id).to_string();
        let frame =
            with_pusher_writer(|w| text_frame(w.connection_established(&socket_id, timeout)));
        if let Some(conn) = self.conns.get(id) {
            tracing::debug!(
                shard = self.shard,
                peer = %conn.peer,
                socket_id = %socket_id,
                "pusher connection established"
            );
        }
        self.enqueue(id, frame);
    }

    /// Handles one text message. Pusher connections speak JSON in text
    /// frames; the native endpoint refuses them (1003). A message that is
    /// not valid Pusher JSON is answered with `pusher:error` and the
    /// connection stays.
    pub fn on_client_text(&mut self, id: ConnId, text: &[u8]) -> Result<(), CloseCause> {
        if self.form_of(id) != Form::Pusher {
            return Err(CloseCause::UnsupportedData(
                "text frames are not accepted on /ws: send binary FlatBuffers frames",
            ));
        }
        if !self.admit_message(id)? {
            let rate = self.settings.limits.messages_per_second;
            let msg = format!("over {rate} messages/s; this message was dropped");
            self.pusher_error(
                id,
                Some(crate::protocol::pusher::close::CLIENT_EVENT_RATE),
                &msg,
            );
            return Ok(());
        }
        // The session validated UTF-8 (RFC 6455 §8.1); 1007 otherwise.
        let Ok(text) = std::str::from_utf8(text) else {
            return Err(CloseCause::InvalidMessage("text is not UTF-8".into()));
        };
        match message::parse(text) {
            Err(e) => self.pusher_error(id, None, &e.to_string()),
            Ok(ClientMessage::Ping) => self.reply(id, 0, Reply::Pong),
            // Any traffic counts as a sign of life (`received`).
            Ok(ClientMessage::Pong) => {}
            Ok(ClientMessage::Subscribe {
                channel,
                auth,
                channel_data,
            }) => self.pusher_subscribe(id, &channel, auth.as_deref(), channel_data.as_deref()),
            Ok(ClientMessage::Unsubscribe { channel }) => {
                let Some(Ok(channel)) = self
                    .pusher_app(id)
                    .map(|app| app.bus_name(&channel).map(|c| c.into_owned()))
                else {
                    return Ok(());
                };
                let subscribed = self
                    .conns
                    .get(id)
                    .is_some_and(|c| c.subs.iter().any(|s| **s == *channel));
                // Pusher answers no unsubscribe, and one of a channel not
                // subscribed is no error there.
                if subscribed {
                    self.unsubscribe(id, 0, &channel);
                }
            }
            Ok(ClientMessage::Signin { auth, user_data }) => {
                self.pusher_signin(id, &auth, &user_data)?
            }
            Ok(ClientMessage::ClientEvent {
                event,
                channel,
                data,
            }) => self.pusher_client_event(id, &event, &channel, data.get())?,
        }
        Ok(())
    }

    fn pusher_subscribe(
        &mut self,
        id: ConnId,
        name: &str,
        auth: Option<&str>,
        channel_data: Option<&str>,
    ) {
        let Some(app) = self.pusher_app(id) else {
            return;
        };
        // `name` is the client's: checked, signed and answered as such;
        // `bus` is the channel's name in the bus (the app's namespace).
        if let Err(e) = channel::validate(name) {
            return self.subscription_error(id, name, "InvalidChannel", &e.to_string(), 400);
        }
        let bus = match app.bus_name(name) {
            Ok(b) => b,
            Err(e) => {
                return self.subscription_error(id, name, "InvalidChannel", &e.to_string(), 400)
            }
        };
        let kind = ChannelKind::of(name);
        match kind.kind {
            Kind::ServerToUser => {
                // pusher-js subscribes its own after pusher:signin; nobody
                // else may.
                let user = &name[SERVER_TO_USER_PREFIX.len()..];
                let own = self
                    .conns
                    .get(id)
                    .and_then(|c| c.identity.as_deref())
                    .is_some_and(|who| who.user == user);
                if !own {
                    return self.subscription_error(
                        id,
                        name,
                        "AuthError",
                        "only a connection signed in as this user may subscribe to its #server-to-user- channel",
                        403,
                    );
                }
                return self.subscribe_as(id, 0, &bus, None, true);
            }
            Kind::Public if crate::auth::is_protected(name) => {
                // A native protected channel (`user:…`) has no Pusher
                // signature that could open it.
                return self.subscription_error(
                    id,
                    name,
                    "AuthError",
                    "this channel is only for native clients with a token that grants it",
                    403,
                );
            }
            _ => {}
        }
        let member = if kind.kind == Kind::Presence {
            let parsed = channel_data
                .ok_or(presence::ChannelDataError::Malformed)
                .and_then(|d| presence::parse_channel_data(d, app.presence_max_user_info_bytes));
            match parsed {
                Ok(m) => Some(presence::member_key(&m)),
                Err(e) => {
                    return self.subscription_error(
                        id,
                        name,
                        "InvalidChannelData",
                        &e.to_string(),
                        400,
                    )
                }
            }
        } else {
            None
        };
        if kind.needs_auth() {
            let Some(auth) = auth else {
                return self.subscription_error(
                    id,
                    name,
                    "AuthError",
                    "auth is required for private and presence channels",
                    401,
                );
            };
            let socket_id = self.socket_id(id).to_string();
            let data = (kind.kind == Kind::Presence)
                .then_some(channel_data)
                .flatten();
            let signed = sign::channel_string_to_sign(&socket_id, name, data);
            if let Err(e) = sign::verify_auth(&app.key, &app.secret, &signed, auth) {
                return self.subscription_error(id, name, "AuthError", &e.to_string(), 401);
            }
        }
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        if conn.subs.iter().any(|s| **s == *bus) {
            // Subscribed already: pusher-js only waits for the answer.
            return self.reply(
                id,
                0,
                Reply::Subscribed {
                    channel: &bus,
                    at: crate::bus::Position {
                        epoch: 0,
                        offset: 0,
                    },
                    recovered: false,
                },
            );
        }
        let max = self.settings.max_subscriptions;
        if conn.subs.len() >= max {
            let msg = format!("at most {max} subscriptions per connection");
            return self.subscription_error(id, name, "LimitReached", &msg, 403);
        }
        if let Some(member) = member {
            // Counted as this member from the subscription on (see
            // `presence_user`), until it leaves the channel.
            self.pusher_members
                .insert((id, Arc::from(&*bus)), Arc::from(member));
        }
        self.subscribe_as(id, 0, &bus, None, true);
    }

    /// `pusher:signin`: the app's backend signed `user_data` (a JSON object
    /// with a string `id`) for this `socket_id`; the connection is that user
    /// from now on (its `#server-to-user-<id>` channel opens to it, and the
    /// HTTP API's `terminate_connections` reaches it). A bad signature or
    /// user data closes the connection with 4009, as Pusher does.
    fn pusher_signin(&mut self, id: ConnId, auth: &str, user_data: &str) -> Result<(), CloseCause> {
        let Some(app) = self.pusher_app(id) else {
            return Ok(());
        };
        let socket_id = self.socket_id(id).to_string();
        let signed = sign::signin_string_to_sign(&socket_id, user_data);
        sign::verify_auth(&app.key, &app.secret, &signed, auth)
            .map_err(|e| CloseCause::AuthFailed(format!("pusher:signin refused: {e}")))?;
        #[derive(serde::Deserialize)]
        struct UserData {
            id: String,
        }
        let user = serde_json::from_str::<UserData>(user_data)
            .ok()
            .map(|u| u.id)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                CloseCause::AuthFailed(
                    "pusher:signin user_data must be a JSON object with a non-empty string id"
                        .into(),
                )
            })?;
        let own = format!("{SERVER_TO_USER_PREFIX}{user}");
        channel::validate(&own)
            .and_then(|()| app.bus_name(&own).map(drop))
            .map_err(|e| {
                CloseCause::AuthFailed(format!(
                    "pusher:signin user id {user:?} cannot name a channel: {e}"
                ))
            })?;
        let other = self
            .conns
            .get(id)
            .and_then(|c| c.identity.as_deref())
            .is_some_and(|who| who.user != user);
        if other {
            // Its #server-to-user- subscription and terminate_connections
            // belong to the first user: a connection is one user.
            self.pusher_error(
                id,
                None,
                "this connection is signed in as another user; reconnect to sign in as this one",
            );
            return Ok(());
        }
        if let Some(conn) = self.conns.get_mut(id) {
            tracing::debug!(shard = self.shard, peer = %conn.peer, user = %user, "pusher sign-in");
            conn.identity = Some(Box::new(crate::auth::Identity::signed_in(user)));
        }
        let frame = with_pusher_writer(|w| text_frame(w.signin_success(user_data)));
        self.enqueue(id, frame);
        Ok(())
    }

    /// A Pusher subscription to a cache channel was answered: the last
    /// event published on it follows (read from the channel's history, so
    /// it is there for `history.ttl_secs` after it was published and while
    /// `history.size` keeps it), or `pusher:cache_miss`.
    pub(super) fn pusher_cache_read(&mut self, id: ConnId, channel: &Arc<str>) {
        let live = match self.channels.get(channel).map(|c| &c.state) {
            Some(ChannelState::Active { last }) => *last,
            _ => return self.cache_miss(id, channel),
        };
        if live.offset == 0 {
            return self.cache_miss(id, channel);
        }
        self.next_recovery += 1;
        let token = self.next_recovery;
        self.cache_reads.insert(token, (id, channel.clone(), live));
        let after = crate::bus::Position {
            epoch: live.epoch,
            offset: live.offset - 1,
        };
        self.bus.history(channel, after, token);
        self.bus_pending = true;
    }

    /// The history read of a cache channel answered.
    /// `last` is the channel's position when the subscriber joined: that
    /// publication is the one it is owed. If a newer one was delivered live
    /// meanwhile, the client has something fresher and gets nothing more
    /// (neither the older event after the newer, nor the newer twice).
    pub(super) fn on_cache_read(
        &mut self,
        id: ConnId,
        channel: &Arc<str>,
        last: crate::bus::Position,
        result: History,
    ) {
        let subscribed = self
            .conns
            .get(id)
            .is_some_and(|c| c.subs.iter().any(|s| s == channel));
        if !subscribed {
            return;
        }
        let moved_on = match self.channels.get(channel).map(|c| &c.state) {
            Some(ChannelState::Active { last: now }) => *now != last,
            _ => false,
        };
        if moved_on {
            return;
        }
        match result {
            History::Items { epoch, items } if epoch == last.epoch => {
                match items.iter().position(|p| p.offset == last.offset) {
                    Some(i) => {
                        let frame = form::publications_frame(
                            Form::Pusher,
                            &mut self.encoder,
                            channel,
                            epoch,
                            &items[i..=i],
                        );
                        if !frame.is_empty() {
                            self.enqueue(id, frame);
                        }
                    }
                    None => self.cache_miss(id, channel),
                }
            }
            _ => self.cache_miss(id, channel),
        }
    }

    fn cache_miss(&mut self, id: ConnId, channel: &str) {
        let frame = with_pusher_writer(|w| text_frame(w.cache_miss(to_client(channel))));
        self.enqueue(id, frame);
    }

    /// A Pusher presence subscription took effect: its answer
    /// (`subscription_succeeded` with the members) waits for the member
    /// list.
    pub(super) fn pusher_presence_members(&mut self, id: ConnId, channel: &str) {
        self.next_presence_query += 1;
        let token = self.next_presence_query;
        self.presence_queries.insert(token, (id, 0));
        self.bus.presence_members(channel, token);
        self.bus_pending = true;
    }

    /// For a Pusher connection that just joined `channel`: whether the
    /// channel has more members than the app allows
    /// (`pusher.presence_max_members`); if so the subscription is undone
    /// and refused (`LimitReached`).
    pub(super) fn pusher_over_member_limit(
        &mut self,
        id: ConnId,
        channel: &Arc<str>,
        members: &[Arc<str>],
    ) -> bool {
        if self.form_of(id) != Form::Pusher {
            return false;
        }
        let Some(max) = self.pusher_app(id).map(|a| a.presence_max_members) else {
            return false;
        };
        let mut ids: Vec<&str> = members
            .iter()
            .filter_map(|m| presence::parse_member_key(m).map(|(id, _)| id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() <= max {
            return false;
        }
        let subscribed = self
            .conns
            .get(id)
            .is_some_and(|c| c.subs.iter().any(|s| s == channel));
        if subscribed {
            self.unsubscribe(id, 0, channel);
        }
        let name = to_client(channel);
        let msg = format!("{name} has more than {max} members");
        self.subscription_error(id, name, "LimitReached", &msg, 403);
        true
    }

    fn pusher_client_event(
        &mut self,
        id: ConnId,
        event: &str,
        name: &str,
        data: &str,
    ) -> Result<(), CloseCause> {
        let Some(app) = self.pusher_app(id) else {
            return Ok(());
        };
        if !app.client_events {
            self.pusher_error(id, None, "client events are not enabled for this app");
            return Ok(());
        }
        let rate = app.client_event_rate;
        let now = self.now;
        let bucket = self
            .client_event_buckets
            .entry(id)
            .or_insert_with(|| crate::shard::rate::TokenBucket::new(rate, now));
        if !bucket.take(now, rate, rate) {
            self.counters.limit(Limit::Rate);
            return Err(CloseCause::ClientEventRate { per_second: rate });
        }
        self.pusher_client_event_checked(id, event, name, data, &app);
        Ok(())
    }

    fn pusher_client_event_checked(
        &mut self,
        id: ConnId,
        event: &str,
        name: &str,
        data: &str,
        app: &PusherApp,
    ) {
        if !ChannelKind::of(name).allows_client_events() {
            let msg = format!(
                "client events are only allowed on private and presence channels, not on {name}"
            );
            return self.pusher_error(id, None, &msg);
        }
        let bus = match app.bus_name(name) {
            Ok(b) => b,
            Err(e) => return self.pusher_error(id, None, &format!("channel {name:?}: {e}")),
        };
        let subscribed = self
            .conns
            .get(id)
            .is_some_and(|c| c.subs.iter().any(|s| **s == *bus));
        if !subscribed {
            let msg = format!("subscribe to {name} before sending client events on it");
            return self.pusher_error(id, None, &msg);
        }
        if data.len() > app.max_event_bytes {
            let msg = format!(
                "client event data is {} bytes; the limit is {}",
                data.len(),
                app.max_event_bytes
            );
            return self.pusher_error(id, None, &msg);
        }
        let socket_id = self.socket_id(id).to_string();
        // On presence channels the event says who sent it (the member the
        // sender's signed channel_data named).
        let user = self
            .pusher_members
            .get(&(id, Arc::from(&*bus)))
            .and_then(|m| presence::parse_member_key(m))
            .map(|(user_id, _)| user_id);
        let body = body::event(event, true, user, Some(&socket_id), data.as_bytes());
        let reply_to = ReplyTo {
            conn: id.as_u64(),
            request: 0,
        };
        self.bus.publish(&bus, body, None, reply_to, self.unix_us);
        self.bus_pending = true;
    }

    fn subscription_error(
        &mut self,
        id: ConnId,
        channel: &str,
        kind: &str,
        error: &str,
        status: u16,
    ) {
        let frame =
            with_pusher_writer(|w| text_frame(w.subscription_error(channel, kind, error, status)));
        self.enqueue(id, frame);
    }

    fn pusher_error(&mut self, id: ConnId, code: Option<u16>, message: &str) {
        let frame = with_pusher_writer(|w| text_frame(w.error(code, message)));
        self.enqueue(id, frame);
    }
}

fn text_frame(text: &str) -> Bytes {
    ws::frame(OpCode::Text, text.as_bytes())
}
