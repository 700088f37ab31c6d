//! The shard's rules on simulated time (see `sim`): ordering across
//! shards, recovery, budgets, every expiry, drain spread, presence counts
//! and rate limits. Each test runs in well under a second: the clock moves
//! only when a test moves it.

use std::net::Shutdown;
use std::time::Duration;

use super::sim::{Peer, Sim};
use crate::auth::jwt::mint;
use crate::config::Config;
use crate::protocol::wire::{close, ErrorCode, Position, ServerMessage};
use crate::protocol::ws;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

fn config() -> Config {
    Config::default()
}

/// (offset, payload) of every publication of `channel` in `msgs`.
fn publications(msgs: &[ServerMessage], channel: &str) -> Vec<(u64, Vec<u8>)> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMessage::Publication {
                channel: c,
                offset,
                payload,
                ..
            } if c == channel => Some((*offset, payload.clone())),
            _ => None,
        })
        .collect()
}

fn subscribed(msgs: &[ServerMessage]) -> (Position, bool) {
    msgs.iter()
        .find_map(|m| match m {
            ServerMessage::Subscribed {
                position,
                recovered,
                ..
            } => Some((*position, *recovered)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Subscribed in {msgs:?}"))
}

fn acks(msgs: &[ServerMessage]) -> Vec<Position> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMessage::PublishAck { position, .. } => Some(*position),
            _ => None,
        })
        .collect()
}

/// A subscriber of `channel` on `shard`, its Subscribed answer taken.
fn subscriber(sim: &mut Sim, shard: usize, channel: &str) -> (Peer, Position) {
    let p = sim.client(shard);
    sim.subscribe(p, channel, None);
    let got = sim.take(p);
    (p, subscribed(&got).0)
}

/// Publishes `n` payloads `"{tag}{i}"` from `p`; their acknowledged
/// positions, in order.
fn publish_n(sim: &mut Sim, p: Peer, channel: &str, tag: &str, n: usize) -> Vec<Position> {
    for i in 0..n {
        sim.publish(p, channel, format!("{tag}{i}").as_bytes());
    }
    acks(&sim.take(p))
}

#[test]
fn publications_reach_every_shard_once_in_the_same_order() {
    let mut sim = Sim::new(3, 100, &config());
    let subs: Vec<Peer> = (0..3).map(|s| subscriber(&mut sim, s, "room").0).collect();
    // Publishers on every shard, interleaved.
    let pubs: Vec<Peer> = (0..3).map(|s| sim.client(s)).collect();
    for round in 0..5 {
        for (s, &p) in pubs.iter().enumerate() {
            sim.publish(p, "room", format!("{s}-{round}").as_bytes());
        }
    }
    let mut acked = Vec::new();
    for &p in &pubs {
        acked.extend(acks(&sim.take(p)));
    }
    assert_eq!(acked.len(), 15);
    let epoch = acked[0].epoch;
    let mut offsets: Vec<u64> = acked.iter().map(|a| a.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=15).collect::<Vec<_>>(), "one offset each");
    let first = publications(&sim.take(subs[0]), "room");
    assert_eq!(
        first.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=15).collect::<Vec<_>>()
    );
    for &s in &subs[1..] {
        assert_eq!(publications(&sim.take(s), "room"), first, "same order");
    }
    assert!(acked.iter().all(|a| a.epoch == epoch));
}

#[test]
fn recovery_continues_exactly_from_the_position() {
    let mut sim = Sim::new(2, 100, &config());
    let (_watcher, _) = subscriber(&mut sim, 1, "news");
    let publisher = sim.client(0);
    let acked = publish_n(&mut sim, publisher, "news", "m", 10);
    let late = sim.client(1);
    sim.subscribe(late, "news", Some(acked[2]));
    sim.publish(publisher, "news", b"live");
    let got = sim.take(late);
    assert_eq!(subscribed(&got), (acked[2], true));
    let offsets: Vec<u64> = publications(&got, "news").iter().map(|p| p.0).collect();
    assert_eq!(
        offsets,
        (4..=11).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
}

#[test]
fn a_trimmed_history_or_another_epoch_is_not_recovered() {
    let mut sim = Sim::new(2, 3, &config());
    let (_watcher, _) = subscriber(&mut sim, 1, "news");
    let publisher = sim.client(0);
    let acked = publish_n(&mut sim, publisher, "news", "m", 10);
    let live = *acked.last().unwrap();
    // Only the last 3 are kept: offset 2 cannot be continued.
    let trimmed = sim.client(1);
    sim.subscribe(trimmed, "news", Some(acked[1]));
    let got = sim.take(trimmed);
    assert_eq!(subscribed(&got), (live, false));
    assert!(publications(&got, "news").is_empty());
    let other = sim.client(1);
    sim.subscribe(
        other,
        "news",
        Some(Position::new(live.epoch ^ 1, live.offset)),
    );
    assert_eq!(subscribed(&sim.take(other)), (live, false));
}

#[test]
fn a_position_ahead_joins_when_the_shard_reaches_it() {
    let mut sim = Sim::new(2, 100, &config());
    let (_watcher, _) = subscriber(&mut sim, 1, "ticks");
    let publisher = sim.client(0);
    let acked = publish_n(&mut sim, publisher, "ticks", "t", 2);
    // The client saw offset 4 elsewhere; this shard is at 2.
    let ahead = sim.client(1);
    sim.subscribe(ahead, "ticks", Some(Position::new(acked[0].epoch, 4)));
    assert!(sim.take(ahead).is_empty(), "waits for the shard");
    publish_n(&mut sim, publisher, "ticks", "u", 3);
    let got = sim.take(ahead);
    assert_eq!(subscribed(&got), (Position::new(acked[0].epoch, 4), true));
    assert_eq!(
        publications(&got, "ticks"),
        vec![(5, b"u2".to_vec())],
        "only what follows its position"
    );
}

#[test]
fn a_position_ahead_never_reached_joins_live_unrecovered_after_five_seconds() {
    let mut sim = Sim::new(1, 100, &config());
    let publisher = sim.client(0);
    let (_watcher, _) = subscriber(&mut sim, 0, "ticks");
    let acked = publish_n(&mut sim, publisher, "ticks", "t", 2);
    let ahead = sim.client(0);
    sim.subscribe(ahead, "ticks", Some(Position::new(acked[0].epoch, 100)));
    sim.advance(Duration::from_millis(4900));
    assert!(sim.take(ahead).is_empty(), "still waiting at 4.9 s");
    sim.advance(Duration::from_millis(200));
    assert_eq!(subscribed(&sim.take(ahead)), (acked[1], false));
}

#[test]
fn a_subscriber_over_the_byte_budget_is_closed_as_a_slow_consumer() {
    let mut c = config();
    c.fanout.outbound_budget_bytes = 8 << 10;
    let mut sim = Sim::new(1, 100, &c);
    let slow = sim.open_unread(0, Some(1024));
    sim.connect(slow, None);
    sim.subscribe(slow, "firehose", None);
    let fast = sim.client(0);
    sim.subscribe(fast, "firehose", None);
    let publisher = sim.client(0);
    for i in 0..100 {
        sim.publish(publisher, "firehose", &[i; 200]);
    }
    assert!(sim.unread(slow) <= 1024);
    assert_eq!(sim.close_code(slow), Some(close::SLOW_CONSUMER));
    let got = sim.take(fast);
    assert_eq!(
        publications(&got, "firehose").len(),
        100,
        "others unaffected"
    );
}

#[test]
fn a_subscriber_whose_oldest_byte_waits_too_long_is_closed() {
    let mut c = config();
    c.fanout.outbound_max_age_ms = 2000;
    let mut sim = Sim::new(1, 100, &c);
    let stuck = sim.open_unread(0, Some(512));
    sim.connect(stuck, None);
    sim.subscribe(stuck, "slow", None);
    let publisher = sim.client(0);
    for i in 0..10 {
        sim.publish(publisher, "slow", &[i; 100]);
    }
    sim.advance(Duration::from_millis(1900));
    assert_eq!(sim.shut(stuck), None, "within the age limit");
    sim.advance(Duration::from_millis(300));
    assert_eq!(sim.close_code(stuck), Some(close::SLOW_CONSUMER));
}

#[test]
fn a_ping_flood_on_a_full_socket_owes_one_pong() {
    let mut sim = Sim::new(1, 100, &config());
    let p = sim.open_unread(0, Some(64));
    sim.connect(p, None);
    let t = sim.time();
    for i in 0..1000u32 {
        let state = &mut sim.shards[0];
        state.touch(t);
        state.owe_pong(p.id, ws::frame(ws::OpCode::Pong, &i.to_be_bytes()));
        sim.settle();
    }
    assert!(sim.unread(p) <= 64);
    // RFC 6455 §5.5.3: only the most recent ping is answered.
    assert_eq!(sim.pongs(p), vec![999u32.to_be_bytes().to_vec()]);
    assert!(
        sim.shards[0].counters.bytes_out < 200,
        "nothing else queued"
    );
}

#[test]
fn a_silent_handshake_is_shut_without_an_answer() {
    let mut c = config();
    c.limits.handshake_timeout_ms = 1000;
    let mut sim = Sim::new(1, 100, &c);
    let p = sim.accept_only(0);
    sim.advance(Duration::from_millis(900));
    assert_eq!(sim.shut(p), None);
    sim.advance(Duration::from_millis(200));
    assert_eq!(sim.shut(p), Some(Shutdown::Both));
    assert_eq!(sim.unread(p), 0, "no response is owed");
}

#[test]
fn deadlines_of_different_lengths_fire_each_on_time() {
    // A long Connect deadline set first, then a short handshake deadline.
    let mut c = config();
    c.auth.deadline_ms = 20_000;
    c.limits.handshake_timeout_ms = 1000;
    let mut sim = Sim::new(1, 100, &c);
    let waiting = sim.open(0);
    sim.advance(Duration::from_millis(500));
    let half = sim.accept_only(0);
    sim.advance(Duration::from_millis(1000));
    assert_eq!(sim.shut(half), Some(Shutdown::Both), "handshake cut at 1 s");
    assert_eq!(sim.close_code(waiting), None);
    // A long handshake deadline set first, then a short Connect deadline.
    let mut c = config();
    c.auth.deadline_ms = 1000;
    c.limits.handshake_timeout_ms = 20_000;
    let mut sim = Sim::new(1, 100, &c);
    let half = sim.accept_only(0);
    sim.advance(Duration::from_millis(500));
    let silent = sim.open(0);
    sim.advance(Duration::from_millis(1000));
    assert_eq!(sim.close_code(silent), Some(close::AUTH_DEADLINE));
    assert_eq!(sim.shut(half), None);
}

#[test]
fn no_connect_within_the_deadline_closes_with_4005() {
    let mut c = config();
    c.auth.deadline_ms = 1500;
    let mut sim = Sim::new(1, 100, &c);
    let p = sim.open(0);
    sim.advance(Duration::from_millis(1400));
    assert_eq!(sim.close_code(p), None);
    sim.advance(Duration::from_millis(200));
    assert_eq!(sim.close_code(p), Some(close::AUTH_DEADLINE));
    let connected = sim.client(0);
    sim.advance(Duration::from_millis(2000));
    assert_eq!(sim.close_code(connected), None, "Connect in time");
}

#[test]
fn a_silent_client_is_pinged_then_closed_as_idle() {
    let mut c = config();
    c.limits.ping_interval_ms = 2000;
    c.limits.idle_timeout_ms = 5000;
    let mut sim = Sim::new(1, 100, &c);
    let quiet = sim.client(0);
    let chatty = sim.client(0);
    for _ in 0..6 {
        sim.advance(Duration::from_secs(1));
        sim.ping(chatty);
    }
    assert_eq!(sim.pings(quiet), 1, "one keepalive ping, not one per scan");
    assert_eq!(sim.close_code(quiet), Some(close::IDLE_TIMEOUT));
    assert_eq!(sim.close_code(chatty), None);
    assert_eq!(sim.pings(chatty), 0);
}

#[test]
fn an_expired_token_closes_with_4003_after_the_leeway() {
    let mut c = config();
    c.auth.hs256_secret = SECRET.into();
    c.auth.leeway_secs = 2;
    let mut sim = Sim::new(1, 100, &c);
    let exp = sim.unix_secs() + 10;
    let token = mint::hs256(
        SECRET.as_bytes(),
        &serde_json::json!({"sub": "ann", "exp": exp}),
    );
    let p = sim.open(0);
    sim.connect(p, Some(&token));
    assert!(matches!(sim.take(p)[..], [ServerMessage::Connected { .. }]));
    sim.advance(Duration::from_secs(12));
    assert_eq!(sim.close_code(p), None, "within the leeway");
    sim.advance(Duration::from_secs(2));
    assert_eq!(sim.close_code(p), Some(close::TOKEN_EXPIRED));
}

#[test]
fn a_drain_spreads_its_closes_over_the_window() {
    let mut sim = Sim::new(1, 100, &config());
    let clients: Vec<Peer> = (0..20).map(|_| sim.client(0)).collect();
    let t = sim.time();
    sim.shards[0].touch(t);
    sim.shards[0].begin_drain(Duration::from_secs(10));
    sim.settle();
    let mut closed_by = Vec::new();
    for _ in 0..10 {
        sim.advance(Duration::from_secs(1));
        let n = clients
            .iter()
            .filter(|&&p| sim.close_code(p) == Some(ws::close::SERVICE_RESTART))
            .count();
        closed_by.push(n);
    }
    // Spread over 80 % of the window: 2.5 per second, all by 8 s.
    assert!(closed_by[0] <= 4, "{closed_by:?}");
    assert!((8..=12).contains(&closed_by[3]), "{closed_by:?}");
    assert_eq!(closed_by[7], 20, "{closed_by:?}");
    assert!(closed_by.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn presence_counts_a_user_once_across_connections_and_shards() {
    let mut c = config();
    c.auth.hs256_secret = SECRET.into();
    let mut sim = Sim::new(2, 100, &c);
    let token = |user: &str| {
        mint::hs256(
            SECRET.as_bytes(),
            &serde_json::json!({"sub": user, "channels": ["presence-*"]}),
        )
    };
    let join = |sim: &mut Sim, shard: usize, user: &str| {
        let p = sim.open(shard);
        sim.connect(p, Some(&token(user)));
        sim.subscribe(p, "presence-lobby", None);
        p
    };
    let watcher = join(&mut sim, 0, "watcher");
    sim.take(watcher);
    let ann = [join(&mut sim, 0, "ann"), join(&mut sim, 1, "ann")];
    let ann3 = join(&mut sim, 1, "ann");
    let events = |sim: &mut Sim| -> Vec<(String, bool)> {
        sim.take(watcher)
            .into_iter()
            .filter_map(|m| match m {
                ServerMessage::PresenceEvent { user, joined, .. } => Some((user, joined)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(events(&mut sim), [("ann".to_string(), true)]);
    sim.presence_query(watcher, "presence-lobby");
    let members: Vec<ServerMessage> = sim.take(watcher);
    assert!(
        matches!(&members[..], [ServerMessage::PresenceMembers { users, .. }] if users == &["ann", "watcher"]),
        "{members:?}"
    );
    sim.disconnect(ann[0]);
    sim.disconnect(ann3);
    assert!(events(&mut sim).is_empty(), "ann is still on shard 1");
    sim.disconnect(ann[1]);
    assert_eq!(events(&mut sim), [("ann".to_string(), false)]);
}

#[test]
fn requests_over_the_rate_are_refused_then_the_connection_is_closed() {
    let mut c = config();
    c.limits.messages_per_second = 10;
    c.limits.message_burst = 5;
    c.limits.rate_limit_strikes = 3;
    let mut sim = Sim::new(1, 100, &c);
    let p = sim.client(0); // Connect took one token
    for _ in 0..4 {
        sim.ping(p);
    }
    let got = sim.take(p);
    assert_eq!(got, vec![ServerMessage::Pong; 4], "within the burst");
    sim.ping(p);
    let got = sim.take(p);
    assert!(
        matches!(&got[..], [ServerMessage::Error { code, .. }] if *code == ErrorCode::RateLimited as u16),
        "{got:?}"
    );
    // Tokens come back at 10/s.
    sim.advance(Duration::from_millis(100));
    sim.ping(p);
    assert_eq!(sim.take(p), vec![ServerMessage::Pong]);
    for _ in 0..3 {
        sim.ping(p);
    }
    assert_eq!(sim.close_code(p), Some(close::RATE_LIMITED));
}

#[test]
fn a_broadcast_skips_an_excluded_recipient_and_shares_one_frame_per_form() {
    use super::fanout::Fanout;
    use super::form::{Broadcast, Form, Frames};
    use crate::bus::Publication;

    let mut sim = Sim::new(1, 100, &config());
    let [a, b, c] = [sim.client(0), sim.client(0), sim.client(0)];
    let items = [Publication {
        offset: 7,
        published_us: 0,
        ingress_us: 0,
        payload: bytes::Bytes::from_static(b"hello"),
    }];
    let what = Broadcast::Publications {
        channel: "room",
        epoch: 1,
        items: &items[..],
    };
    let state = &mut sim.shards[0];
    let mut frames = Frames::new(&what, &mut state.encoder, &mut state.compressor);
    Fanout {
        conns: &mut state.conns,
        dirty: &mut state.dirty,
        to_close: &mut state.to_close,
        budget: 1 << 20,
        socket_prefix: 0,
    }
    .send(&[a.id, b.id, c.id], Some(b.id), &mut frames);
    // The frame the recipients got is the one built for their form.
    let native = frames.get(Form::Native).clone();
    let queued = |p: Peer| state.conns.get(p.id).unwrap().out.queued_bytes();
    assert_eq!(queued(a), native.len());
    assert_eq!(queued(b), 0, "excluded");
    assert_eq!(queued(c), native.len());
    sim.settle();
    for p in [a, c] {
        assert_eq!(
            publications(&sim.take(p), "room"),
            vec![(7, b"hello".to_vec())]
        );
    }
    assert!(sim.take(b).is_empty());
}

#[test]
fn a_pusher_broadcast_leaves_out_each_events_excluded_socket_without_reencoding() {
    use super::fanout::Fanout;
    use super::form::{Broadcast, Form, Frames, SocketId};
    use crate::bus::Publication;
    use crate::protocol::body;

    let mut sim = Sim::new(1, 100, &config());
    let [s, t, n] = [sim.client(0), sim.client(0), sim.client(0)];
    for p in [s, t] {
        sim.shards[0].conns.get_mut(p.id).unwrap().form = Form::Pusher;
    }
    let prefix = 42;
    let socket = |p: Peer| SocketId {
        prefix,
        conn: p.id.as_u64(),
    };
    let publication = |offset, body| Publication {
        offset,
        published_us: 0,
        ingress_us: 0,
        payload: body,
    };
    let excluded = socket(s).to_string();
    let items = [
        publication(1, body::event("a", false, None, None, b"1")),
        // A client event from `s`: everyone else gets it.
        publication(
            2,
            body::event("client-b", true, None, Some(&excluded), b"{}"),
        ),
        publication(3, body::plain(b"3")),
    ];
    let what = Broadcast::Publications {
        channel: "private-room",
        epoch: 1,
        items: &items[..],
    };
    let state = &mut sim.shards[0];
    let mut frames = Frames::new(&what, &mut state.encoder, &mut state.compressor);
    Fanout {
        conns: &mut state.conns,
        dirty: &mut state.dirty,
        to_close: &mut state.to_close,
        budget: 1 << 20,
        socket_prefix: prefix,
    }
    .send(&[s.id, t.id, n.id], None, &mut frames);
    let all = frames.get(Form::Pusher).clone();
    let text = String::from_utf8_lossy(&all).into_owned();
    assert!(text.contains(r#""event":"a""#) && text.contains(r#""event":"client-b""#));
    assert!(
        text.contains(r#""event":"publication""#),
        "a plain body's default name"
    );
    // `t` shares the whole buffer; `s` gets refcounted slices of it, without
    // the frame of the event it sent; the native client its own frame.
    let queued = |p: Peer| state.conns.get(p.id).unwrap().out.queued_bytes();
    assert_eq!(queued(t), all.len());
    let middle = text.find(r#"{"event":"client-b""#).unwrap();
    let client_b_frame = 2 + r#"{"event":"client-b","channel":"private-room","data":{}}"#.len();
    assert!(middle > 0);
    assert_eq!(queued(s), all.len() - client_b_frame);
    assert_eq!(queued(n), frames.get(Form::Native).len());
    // No frame was built for anyone else: the parts are slices of `all`.
    assert_eq!(
        frames.pusher_parts_without(socket(s)).unwrap().len(),
        2,
        "before and after the excluded frame"
    );
    assert!(frames.pusher_parts_without(socket(t)).is_none());
}
