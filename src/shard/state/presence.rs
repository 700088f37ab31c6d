//! Presence: for each presence channel the shard counts its subscribed
//! connections per user and tells the bus only when a user's first
//! connection on this shard joins or its last one leaves; the bus merges
//! shards (and nodes) into one member list. This file holds the member
//! queries and the fan-out of join/leave events; the counting happens as
//! connections subscribe and leave (`subscriptions`).

use std::sync::Arc;

use super::connections::Conn;
use super::fanout::Fanout;
use super::form::{Broadcast, Form, Frames, Reply};
use super::subscriptions::ChannelState;
use super::State;
use crate::bus::{self, BusError};
use crate::protocol::channel;
use crate::protocol::wire::ErrorCode;
use crate::shard::slab::{ConnId, Slab};

impl State {
    /// Asks the bus who is present on a presence channel the connection is
    /// subscribed to.
    pub(super) fn presence_query(&mut self, id: ConnId, request: u32, name: &str) {
        if let Err(e) = channel::validate(name) {
            return self.reply_error(id, request, ErrorCode::InvalidChannel, &e.to_string());
        }
        if !bus::is_presence(name) {
            let msg = format!(
                "{name} is not a presence channel ({}*)",
                bus::PRESENCE_PREFIX
            );
            return self.reply_error(id, request, ErrorCode::InvalidChannel, &msg);
        }
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        if !self
            .settings
            .auth
            .may_subscribe(conn.identity.as_deref(), name)
        {
            let msg = format!("not allowed on {name}");
            return self.reply_error(id, request, ErrorCode::Unauthorized, &msg);
        }
        if !conn.subs.iter().any(|s| &**s == name) {
            let msg = format!("subscribe to {name} before asking who is present");
            return self.reply_error(id, request, ErrorCode::NotSubscribed, &msg);
        }
        self.next_presence_query += 1;
        let token = self.next_presence_query;
        self.presence_queries.insert(token, (id, request));
        self.bus.presence_members(name, token);
        self.bus_pending = true;
    }

    /// Encodes a presence change once and queues it for every live
    /// subscriber of the channel. Connections still catching up from
    /// history do not get it: presence is not part of history, and a client
    /// learns the current members with `PresenceQuery`.
    pub(super) fn deliver_presence(&mut self, name: &Arc<str>, user: &str, joined: bool) {
        let Some(ch) = self.channels.get(name) else {
            return;
        };
        if !matches!(ch.state, ChannelState::Active { .. }) {
            // From an earlier interest of this shard: the Subscribed answer
            // still to come starts the new one.
            return;
        }
        let what: Broadcast<'_, crate::bus::Publication> = Broadcast::Presence {
            channel: name,
            user,
            joined,
        };
        // Pusher sends member_added and member_removed to the other
        // members: the user's own connections know (they joined).
        let own: Vec<ConnId> = ch
            .subscribers
            .iter()
            .copied()
            .filter(|&c| {
                self.pusher_members
                    .get(&(c, name.clone()))
                    .is_some_and(|m| **m == *user)
            })
            .collect();
        let to: std::borrow::Cow<'_, [ConnId]> = if own.is_empty() {
            std::borrow::Cow::Borrowed(&ch.subscribers)
        } else {
            std::borrow::Cow::Owned(
                ch.subscribers
                    .iter()
                    .copied()
                    .filter(|c| !own.contains(c))
                    .collect(),
            )
        };
        let mut frames = Frames::new(&what, &mut self.encoder, &mut self.compressor);
        Fanout {
            conns: &mut self.conns,
            dirty: &mut self.dirty,
            to_close: &mut self.to_close,
            budget: self.settings.outbound_budget,
            socket_prefix: self.settings.socket_prefix,
        }
        .send(&to, None, &mut frames);
        self.counters.messages_out += to.len() as u64;
    }

    /// The bus answered a presence query.
    pub(super) fn on_members(
        &mut self,
        request: u64,
        channel: Arc<str>,
        result: Result<Vec<Arc<str>>, BusError>,
    ) {
        if self.on_api_members(request, channel.clone(), &result) {
            return;
        }
        let Some((id, request)) = self.presence_queries.remove(&request) else {
            return;
        };
        match result {
            Ok(users) => {
                if self.pusher_over_member_limit(id, &channel, &users) {
                    return;
                }
                let Some(frame) = self.reply_frame(
                    id,
                    request,
                    Reply::Members {
                        channel: &channel,
                        users: &users,
                    },
                ) else {
                    return;
                };
                // One answer may not exceed the connection's outbound
                // budget: a member list that large is refused, not queued
                // (README, "Memory per connection").
                let budget = self.settings.outbound_budget;
                if frame.len() > budget {
                    let msg = format!(
                        "the member list of {channel} is {} bytes ({} users), over this connection's outbound budget of {budget} bytes",
                        frame.len(),
                        users.len()
                    );
                    return self.reply_error(id, request, ErrorCode::PayloadTooLarge, &msg);
                }
                self.enqueue(id, frame);
                // A Pusher presence-cache subscription: the last event
                // follows the member list.
                if self.form_of(id) == Form::Pusher
                    && crate::protocol::pusher::channel::ChannelKind::of(
                        crate::protocol::pusher::channel::to_client(&channel),
                    )
                    .cache
                {
                    self.pusher_cache_read(id, &channel);
                }
            }
            Err(e) => self.reply_error(id, request, ErrorCode::Unavailable, &e.to_string()),
        }
    }
}

/// The user whose membership a subscription of connection `id` to
/// `channel` counts for: authenticated connections on presence channels
/// only (anonymous ones cannot subscribe to those anyway).
/// A Pusher connection's member on a presence channel is the one its
/// subscription's `channel_data` named (`pusher_members`).
pub(super) fn presence_user<'a>(
    conns: &'a Slab<Conn>,
    pusher_members: &'a PusherMembers,
    id: ConnId,
    channel: &str,
) -> Option<&'a str> {
    if !bus::is_presence(channel) {
        return None;
    }
    let conn = conns.get(id)?;
    if conn.form == Form::Pusher {
        return pusher_members.get(&(id, Arc::from(channel))).map(|m| &**m);
    }
    let user = conn.identity.as_deref()?.user.as_str();
    (!user.is_empty()).then_some(user)
}

/// The member key (`protocol::pusher::presence::member_key`) of each
/// Pusher connection subscribed to a presence channel.
pub(super) type PusherMembers = std::collections::HashMap<(ConnId, Arc<str>), Arc<str>>;
