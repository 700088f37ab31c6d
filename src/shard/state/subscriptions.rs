//! The shard's channel table: one entry per channel any of its connections
//! subscribes to, the bus interest behind it, and subscribing and
//! unsubscribing connections (including presence membership counts, which
//! must be ordered against the bus interest).

use std::collections::HashMap;
use std::sync::Arc;

use super::form::Reply;
use super::presence::presence_user;
use super::recovery::Recovery;
use super::State;
use crate::bus::Position;
use crate::protocol::channel;
use crate::protocol::wire::ErrorCode;
use crate::shard::slab::ConnId;

pub(super) enum ChannelState {
    /// Asked the bus; waiting for its `Subscribed` answer.
    Pending {
        waiters: Vec<(ConnId, u32, Option<Position>)>,
    },
    /// Receiving publications; `last` is the newest position delivered.
    Active { last: Position },
}

pub(super) struct LocalChannel {
    pub(super) state: ChannelState,
    /// Connections receiving live publications.
    pub(super) subscribers: Vec<ConnId>,
    /// Connections catching up from history; they join `subscribers` once
    /// they reach the live position.
    pub(super) recovering: Vec<ConnId>,
    /// Connections subscribed here (live, catching up or waiting for the
    /// bus): what this shard reports to the bus as its subscription count.
    pub(super) subscribed: u64,
    /// The count changed since it was last reported (listed in
    /// `State::counts_dirty`).
    pub(super) count_dirty: bool,
    /// Presence channels only: subscribed connections per user on this
    /// shard (a user is listed while it has at least one).
    pub(super) members: HashMap<Arc<str>, u32>,
}

impl LocalChannel {
    fn is_unused(&self) -> bool {
        let waiting = match &self.state {
            ChannelState::Pending { waiters } => !waiters.is_empty(),
            ChannelState::Active { .. } => false,
        };
        self.subscribers.is_empty() && self.recovering.is_empty() && !waiting
    }
}

impl State {
    /// Removes the connection from every channel it is subscribed to.
    pub(super) fn detach(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        for name in std::mem::take(&mut conn.subs) {
            self.leave_channel(&name, id);
        }
    }

    fn leave_channel(&mut self, name: &Arc<str>, id: ConnId) {
        self.counters.subscriptions -= 1;
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        ch.subscribed = ch.subscribed.saturating_sub(1);
        if !ch.count_dirty {
            ch.count_dirty = true;
            self.counts_dirty.push(name.clone());
        }
        if let Some(i) = ch.subscribers.iter().position(|&c| c == id) {
            ch.subscribers.swap_remove(i);
        }
        if ch.recovering.contains(&id) {
            ch.recovering.retain(|&c| c != id);
            self.ahead.retain(|w| !w.is(id, name));
            // Forget its catch-up there: a paused one would be kept forever,
            // and the answer to one in flight must not feed a later
            // subscription of this connection to the channel. (Rare: only
            // connections leaving while they catch up get here.)
            self.recoveries
                .retain(|_, r| !(r.conn == id && r.channel == *name));
            if let Some(tokens) = self.paced.get_mut(&id) {
                let recoveries = &self.recoveries;
                tokens.retain(|t| recoveries.contains_key(t));
                if tokens.is_empty() {
                    self.paced.remove(&id);
                }
            }
        }
        if let ChannelState::Pending { waiters } = &mut ch.state {
            waiters.retain(|w| w.0 != id);
        }
        // Before any unsubscribe below: the bus expects a shard's members
        // to leave before its interest does.
        if let Some(user) = presence_user(&self.conns, &self.pusher_members, id, name) {
            if let Some(n) = ch.members.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    ch.members.remove(user);
                    self.bus.presence(name, user, false);
                    self.bus_pending = true;
                }
            }
        }
        if !self.pusher_members.is_empty() {
            self.pusher_members.remove(&(id, name.clone()));
        }
        if ch.is_unused() {
            // Its last count (0) goes before the interest ends.
            self.bus.subscription_count(name, 0);
            self.channels.remove(name);
            self.bus.unsubscribe(name);
            self.bus_pending = true;
        }
    }

    pub(super) fn subscribe(
        &mut self,
        id: ConnId,
        request: u32,
        name: &str,
        recover: Option<Position>,
    ) {
        self.subscribe_as(id, request, name, recover, false);
    }

    /// Subscribes; `authorized`: the caller has checked the connection may
    /// (a Pusher connection whose subscription carries a valid signature),
    /// so the token's claims are not consulted.
    pub(super) fn subscribe_as(
        &mut self,
        id: ConnId,
        request: u32,
        name: &str,
        recover: Option<Position>,
        authorized: bool,
    ) {
        if let Err(e) = channel::validate(name) {
            return self.reply_error(id, request, ErrorCode::InvalidChannel, &e.to_string());
        }
        let max = self.settings.max_subscriptions;
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if !authorized
            && !self
                .settings
                .auth
                .may_subscribe(conn.identity.as_deref(), name)
        {
            let msg = format!("not allowed to subscribe to {name}");
            return self.reply_error(id, request, ErrorCode::Unauthorized, &msg);
        }
        if conn.subs.iter().any(|s| &**s == name) {
            return self.reply_error(id, request, ErrorCode::AlreadySubscribed, name);
        }
        if conn.subs.len() >= max {
            let msg = format!("at most {max} subscriptions per connection");
            return self.reply_error(id, request, ErrorCode::TooManySubscriptions, &msg);
        }
        let key: Arc<str> = match self.channels.get_key_value(name) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        };
        conn.subs.push(key.clone());
        self.counters.subscriptions += 1;
        let ch = self
            .channels
            .entry(key.clone())
            .or_insert_with(|| LocalChannel {
                state: ChannelState::Pending {
                    waiters: Vec::new(),
                },
                subscribers: Vec::new(),
                recovering: Vec::new(),
                subscribed: 0,
                count_dirty: false,
                members: HashMap::new(),
            });
        ch.subscribed += 1;
        if !ch.count_dirty {
            ch.count_dirty = true;
            self.counts_dirty.push(key.clone());
        }
        let live = match &mut ch.state {
            ChannelState::Pending { waiters } => {
                waiters.push((id, request, recover));
                if waiters.len() == 1 && ch.subscribers.is_empty() && ch.recovering.is_empty() {
                    self.bus.subscribe(&key);
                    self.bus_pending = true;
                }
                None
            }
            ChannelState::Active { last } => Some(*last),
        };
        // After the bus subscribe above: a shard's members join after its
        // interest. Before the answer below: a member list asked for with
        // it (Pusher presence) includes this member.
        if let Some(user) = presence_user(&self.conns, &self.pusher_members, id, &key) {
            if let Some(ch) = self.channels.get_mut(&key) {
                match ch.members.get_mut(user) {
                    Some(n) => *n += 1,
                    None => {
                        ch.members.insert(Arc::from(user), 1);
                        self.bus.presence(&key, user, true);
                        self.bus_pending = true;
                    }
                }
            }
        }
        if let Some(last) = live {
            self.start_subscription(id, request, &key, last, recover);
        }
    }

    /// The channel is live on this shard at `live`: the connection either
    /// joins at once or first catches up from history.
    fn start_subscription(
        &mut self,
        id: ConnId,
        request: u32,
        name: &Arc<str>,
        live: Position,
        recover: Option<Position>,
    ) {
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        match recover {
            Some(from) if from.epoch == live.epoch && from.offset < live.offset => {
                ch.recovering.push(id);
                self.next_recovery += 1;
                let token = self.next_recovery;
                self.recoveries
                    .insert(token, Recovery::new(id, request, name.clone(), from));
                self.bus.history(name, from, token);
                self.bus_pending = true;
            }
            Some(from) if from.epoch == live.epoch && from.offset > live.offset => {
                // The client has seen publications this shard has not
                // delivered yet (from another shard or node): it joins when
                // this shard catches up.
                ch.recovering.push(id);
                self.wait_for_live(id, request, name, from);
            }
            _ => {
                ch.subscribers.push(id);
                // Recovered only if the client already has everything; a
                // different epoch cannot be continued.
                let recovered = recover == Some(live);
                self.reply_subscribed(id, request, name, live, recovered);
            }
        }
    }

    pub(super) fn reply_subscribed(
        &mut self,
        id: ConnId,
        request: u32,
        name: &str,
        at: Position,
        recovered: bool,
    ) {
        let reply = Reply::Subscribed {
            channel: name,
            at,
            recovered,
        };
        self.reply(id, request, reply);
    }

    /// Ends one subscription of a connection (server side).
    pub(super) fn drop_subscription(&mut self, id: ConnId, name: &Arc<str>) {
        if let Some(conn) = self.conns.get_mut(id) {
            if let Some(i) = conn.subs.iter().position(|s| s == name) {
                conn.subs.swap_remove(i);
                self.leave_channel(name, id);
            }
        }
    }

    pub(super) fn unsubscribe(&mut self, id: ConnId, request: u32, name: &str) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let Some(i) = conn.subs.iter().position(|s| &**s == name) else {
            return self.reply_error(id, request, ErrorCode::NotSubscribed, name);
        };
        let key = conn.subs.swap_remove(i);
        self.leave_channel(&key, id);
        self.reply(id, request, Reply::Unsubscribed { channel: name });
    }

    /// The bus answered this shard's interest in `channel` (or, for an
    /// active channel, announced a new epoch).
    pub(super) fn on_subscribed(&mut self, channel: Arc<str>, position: Position) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let waiters = match &mut ch.state {
            ChannelState::Pending { waiters } => std::mem::take(waiters),
            ChannelState::Active { last } => {
                // The bus found the channel's history lost (a new
                // epoch before any publication in it): resubscribes
                // from the old epoch are no longer recoverable.
                if position.epoch != last.epoch {
                    *last = position;
                }
                return;
            }
        };
        ch.state = ChannelState::Active { last: position };
        for (id, request, recover) in waiters {
            self.start_subscription(id, request, &channel, position, recover);
        }
    }
}
