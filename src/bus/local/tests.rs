//! The embedded bus's own tests, and the bus contract (`bus::contract`)
//! run against it.

use super::*;
use crate::bus::contract::presence as presence_of;
use std::task::Waker;

/// Two shards' handles on the embedded bus, for the bus contract.
struct Contract {
    buses: Vec<LocalBus>,
    events: Vec<Vec<BusEvent>>,
}

impl crate::bus::contract::Harness for Contract {
    fn bus(&mut self, shard: usize) -> &mut dyn Bus {
        &mut self.buses[shard]
    }

    fn pump(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for (bus, events) in self.buses.iter_mut().zip(&mut self.events) {
            bus.flush();
            let _ = bus.poll_events(&mut cx, events);
        }
    }

    fn events(&mut self, shard: usize) -> &mut Vec<BusEvent> {
        &mut self.events[shard]
    }
}

fn contract() -> Contract {
    let retention = Retention {
        size: 100,
        ttl: Duration::from_secs(60),
        max_bytes: usize::MAX,
        page_bytes: usize::MAX,
        idempotency_ttl: Duration::from_secs(3600),
    };
    Contract {
        buses: LocalBus::cluster(2, retention),
        events: vec![Vec::new(), Vec::new()],
    }
}

crate::bus::contract::bus_contract_tests!(contract());

fn drain(bus: &mut LocalBus) -> Vec<BusEvent> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    while bus.poll_events(&mut cx, &mut out).is_ready() {
        bus.flush();
    }
    bus.flush();
    out
}

/// Runs every shard until nobody has anything left to do.
fn settle(buses: &mut [LocalBus]) -> Vec<Vec<BusEvent>> {
    let mut events: Vec<Vec<BusEvent>> = buses.iter().map(|_| Vec::new()).collect();
    for _ in 0..16 {
        for (i, b) in buses.iter_mut().enumerate() {
            b.flush();
            events[i].extend(drain(b));
        }
    }
    events
}

const NO_HISTORY: Retention = Retention {
    size: 0,
    ttl: Duration::from_secs(60),
    max_bytes: usize::MAX,
    page_bytes: usize::MAX,
    idempotency_ttl: Duration::from_secs(3600),
};

fn history_of(events: &[BusEvent]) -> Vec<&History> {
    events
        .iter()
        .filter_map(|e| match e {
            BusEvent::History { result, .. } => Some(result),
            _ => None,
        })
        .collect()
}

#[test]
fn history_continues_a_position_or_says_it_is_lost() {
    let retention = Retention {
        size: 5,
        ttl: Duration::from_secs(60),
        max_bytes: usize::MAX,
        page_bytes: usize::MAX,
        idempotency_ttl: Duration::from_secs(3600),
    };
    let mut buses = LocalBus::cluster(2, retention);
    for i in 0..8u32 {
        buses[0].publish("h", Bytes::from(vec![i as u8]), None, reply(i), 0);
    }
    let ev = settle(&mut buses);
    let epoch = ev[0]
        .iter()
        .find_map(|e| match e {
            BusEvent::Published { result: Ok(p), .. } => Some(p.epoch),
            _ => None,
        })
        .unwrap();
    // Nobody subscribes, but the channel is kept for its history.
    let at = |offset| Position { epoch, offset };
    buses[1].history("h", at(5), 1);
    buses[1].history("h", at(8), 2);
    buses[1].history("h", at(2), 3); // 3 was trimmed (keeps 4..=8)
    buses[1].history(
        "h",
        Position {
            epoch: epoch ^ 1,
            offset: 5,
        },
        4,
    );
    let ev = settle(&mut buses);
    let answers = history_of(&ev[1]);
    assert_eq!(answers.len(), 4);
    match answers[0] {
        History::Items { items, .. } => {
            assert_eq!(
                items.iter().map(|p| p.offset).collect::<Vec<_>>(),
                vec![6, 7, 8]
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(answers[1], History::Items { items, .. } if items.is_empty()));
    assert!(matches!(answers[2], History::Lost { current } if current.offset == 8));
    assert!(matches!(answers[3], History::Lost { .. }));
}

/// `history.max_mib`: over the shard's byte bound the oldest
/// publications go first, whatever their channel; recovery from a
/// dropped one says `Lost`, never a silent gap.
#[test]
fn retained_history_is_bounded_in_bytes_oldest_first() {
    let one = 100 + ENTRY_OVERHEAD;
    let retention = Retention {
        size: 1000,
        ttl: Duration::from_secs(60),
        max_bytes: 10 * one,
        page_bytes: usize::MAX,
        idempotency_ttl: Duration::from_secs(3600),
    };
    let mut buses = LocalBus::cluster(1, retention);
    let mut positions = HashMap::new();
    for (ch, n) in [("old", 5u32), ("new", 8), ("old", 2)] {
        for i in 0..n {
            buses[0].publish(ch, Bytes::from(vec![i as u8; 100]), None, reply(i), 0);
            for e in settle(&mut buses).remove(0) {
                if let BusEvent::Published {
                    channel,
                    result: Ok(p),
                    ..
                } = e
                {
                    positions
                        .entry(channel.to_string())
                        .or_insert_with(Vec::new)
                        .push(p);
                }
            }
        }
    }
    // 15 stored, 10 fit: the first five (all of "old"'s first batch)
    // went, "new" and the two newer of "old" stayed.
    assert_eq!(buses[0].retained.bytes, 10 * one);
    assert_eq!(buses[0].retained.live, 10);
    let old = &positions["old"];
    let new = &positions["new"];
    buses[0].history("old", old[0], 1); // wants 2..: 2..=5 were dropped
    buses[0].history("old", old[4], 2); // wants 6..=7: kept
    buses[0].history(
        "new",
        Position {
            epoch: new[0].epoch,
            offset: 0,
        },
        3,
    );
    let ev = settle(&mut buses);
    let answers = history_of(&ev[0]);
    assert!(matches!(answers[0], History::Lost { current } if current.offset == 7));
    let offsets = |h: &History| match h {
        History::Items { items, .. } => items.iter().map(|p| p.offset).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(offsets(answers[1]), vec![6, 7]);
    assert_eq!(offsets(answers[2]), (1..=8).collect::<Vec<_>>());
}

fn reply(request: u32) -> ReplyTo {
    ReplyTo { conn: 7, request }
}

fn delivered(events: &[BusEvent], channel: &str) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            BusEvent::Publications {
                channel: c, items, ..
            } if &**c == channel => Some(items.iter().map(|p| p.offset).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn publications_reach_interested_shards_in_order() {
    let mut buses = LocalBus::cluster(3, NO_HISTORY);
    buses[1].subscribe("room");
    buses[2].subscribe("room");
    let ev = settle(&mut buses);
    for shard in [1, 2] {
        assert!(ev[shard].iter().any(|e| matches!(e,
            BusEvent::Subscribed { channel, position } if &**channel == "room" && position.offset == 0)));
    }
    for i in 0..50u32 {
        let from = (i % 3) as usize;
        buses[from].publish("room", Bytes::from(vec![i as u8]), None, reply(i), 0);
        if i % 7 == 0 {
            settle(&mut buses);
        }
    }
    let ev2 = settle(&mut buses);
    // Shard 0 has no subscriber and must not receive the channel.
    assert!(delivered(&ev2[0], "room").is_empty());
    for shard in [1, 2] {
        let mut all = delivered(&ev[shard], "room");
        all.extend(delivered(&ev2[shard], "room"));
        // settle() between publishes already drained some events; gather
        // both rounds' worth and check the whole sequence.
        assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
    }
}

#[test]
fn every_publish_is_acknowledged_with_its_position() {
    let mut buses = LocalBus::cluster(2, NO_HISTORY);
    for i in 0..10 {
        buses[(i % 2) as usize].publish("c", Bytes::from_static(b"x"), None, reply(i), 0);
    }
    let ev = settle(&mut buses);
    let mut offsets: Vec<u64> = ev
        .iter()
        .flatten()
        .filter_map(|e| match e {
            BusEvent::Published { result: Ok(p), .. } => Some(p.offset),
            _ => None,
        })
        .collect();
    offsets.sort_unstable();
    // Without subscribers the channel is retired after each tick, so
    // offsets may restart under a new epoch; none may be missing.
    assert_eq!(offsets.len(), 10);
}

/// The offset each publish in `events` was acknowledged with, by request.
fn acked(events: &[BusEvent]) -> Vec<(u32, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            BusEvent::Published {
                reply_to,
                result: Ok(p),
                ..
            } => Some((reply_to.request, p.offset)),
            _ => None,
        })
        .collect()
}

// (That a repeated key stores once, from any shard, is in the bus
// contract above, which the Redis bus passes too.)
#[test]
fn idempotency_keys_expire_after_their_ttl_and_count_against_the_byte_bound() {
    let one = key_cost("k00");
    let retention = Retention {
        size: 0, // no history: only the keys are kept
        ttl: Duration::from_secs(60),
        max_bytes: 10 * one,
        page_bytes: usize::MAX,
        idempotency_ttl: Duration::from_secs(1),
    };
    let mut buses = LocalBus::cluster(1, retention);
    let key = |i: u32| format!("k{i:02}");
    for i in 0..12 {
        buses[0].publish("c", Bytes::from_static(b"x"), Some(&key(i)), reply(i), 0);
    }
    settle(&mut buses);
    // Only the newest ten keys fit the bound: k00 and k01 went.
    assert_eq!(buses[0].retained.bytes, 10 * one);
    assert_eq!(buses[0].retained.live, 10);
    buses[0].publish("c", Bytes::from_static(b"x"), Some(&key(0)), reply(100), 0);
    buses[0].publish("c", Bytes::from_static(b"x"), Some(&key(5)), reply(101), 0);
    assert_eq!(
        acked(&settle(&mut buses).remove(0)),
        [(100, 13), (101, 6)],
        "an evicted key is stored anew, a kept one answered with its offset"
    );
    // Every key older than the TTL is forgotten.
    let long_ago = Instant::now()
        .checked_sub(Duration::from_secs(2))
        .expect("uptime");
    for k in buses[0].owned.get_mut("c").unwrap().key_order.iter_mut() {
        k.2 = long_ago;
    }
    buses[0].publish("c", Bytes::from_static(b"x"), Some(&key(5)), reply(102), 0);
    assert_eq!(acked(&settle(&mut buses).remove(0)), [(102, 14)]);
    assert_eq!(buses[0].retained.bytes, one, "only the new key is kept");
    assert_eq!(buses[0].retained.live, 1);
}

#[test]
fn subscribe_answer_separates_old_from_new() {
    let mut buses = LocalBus::cluster(2, NO_HISTORY);
    buses[0].subscribe("c");
    settle(&mut buses);
    buses[0].publish("c", Bytes::from_static(b"1"), None, reply(1), 0);
    buses[0].publish("c", Bytes::from_static(b"2"), None, reply(2), 0);
    // Shard 1 subscribes in the same tick as the publishes.
    buses[1].subscribe("c");
    buses[0].publish("c", Bytes::from_static(b"3"), None, reply(3), 0);
    let ev = settle(&mut buses);
    let pos = ev[1]
        .iter()
        .find_map(|e| match e {
            BusEvent::Subscribed { position, .. } => Some(position.offset),
            _ => None,
        })
        .expect("subscribed");
    let got = delivered(&ev[1], "c");
    // Everything shard 1 receives is after its subscribe position, and
    // together they leave no gap.
    assert!(got.iter().all(|&o| o > pos), "pos {pos} got {got:?}");
    assert_eq!(got.len() as u64, 3 - pos);
    assert_eq!(delivered(&ev[0], "c"), vec![1, 2, 3]);
}

fn members_of(events: &[BusEvent], request: u64) -> Vec<String> {
    let found: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            BusEvent::Members {
                request: r, result, ..
            } if *r == request => Some(result.clone().expect("local members never fail")),
            _ => None,
        })
        .collect();
    assert_eq!(found.len(), 1, "one answer to request {request}");
    found[0].iter().map(|u| u.to_string()).collect()
}

fn joined(user: &str) -> (String, bool) {
    (user.to_string(), true)
}

fn left(user: &str) -> (String, bool) {
    (user.to_string(), false)
}

#[test]
fn a_user_on_several_shards_is_one_member() {
    const P: &str = "presence-room";
    let mut buses = LocalBus::cluster(3, NO_HISTORY);
    for b in buses.iter_mut() {
        b.subscribe(P);
    }
    settle(&mut buses);
    // alice on shards 0 and 2, bob on shard 1.
    buses[0].presence(P, "alice", true);
    buses[1].presence(P, "bob", true);
    buses[2].presence(P, "alice", true);
    let ev = settle(&mut buses);
    for (shard, events) in ev.iter().enumerate() {
        let mut got = presence_of(events, P);
        got.sort();
        assert_eq!(got, vec![joined("alice"), joined("bob")], "shard {shard}");
    }
    for (i, b) in buses.iter_mut().enumerate() {
        b.presence_members(P, 10 + i as u64);
    }
    let ev = settle(&mut buses);
    for (i, events) in ev.iter().enumerate() {
        assert_eq!(members_of(events, 10 + i as u64), vec!["alice", "bob"]);
    }
    // alice leaves shard 0: still present on shard 2, nothing announced.
    buses[0].presence(P, "alice", false);
    buses[1].presence_members(P, 20);
    let ev = settle(&mut buses);
    assert!(ev.iter().all(|e| presence_of(e, P).is_empty()), "{ev:?}");
    assert_eq!(members_of(&ev[1], 20), vec!["alice", "bob"]);
    // Her last shard leaves: announced once, everywhere.
    buses[2].presence(P, "alice", false);
    let ev = settle(&mut buses);
    for events in &ev {
        assert_eq!(presence_of(events, P), vec![left("alice")]);
    }
    buses[0].presence_members(P, 21);
    let ev = settle(&mut buses);
    assert_eq!(members_of(&ev[0], 21), vec!["bob"]);
}

#[test]
fn repeated_reports_change_nothing() {
    const P: &str = "presence-x";
    let mut buses = LocalBus::cluster(2, NO_HISTORY);
    buses[0].subscribe(P);
    buses[0].presence(P, "u", true);
    buses[0].presence(P, "u", true);
    let ev = settle(&mut buses);
    assert_eq!(presence_of(&ev[0], P), vec![joined("u")]);
    // A leave from a shard that never joined is ignored.
    buses[1].presence(P, "u", false);
    buses[1].presence(P, "nobody", false);
    buses[0].presence_members(P, 1);
    let ev = settle(&mut buses);
    assert!(presence_of(&ev[0], P).is_empty());
    assert_eq!(members_of(&ev[0], 1), vec!["u"]);
}

#[test]
fn presence_keeps_its_place_among_publications() {
    const P: &str = "presence-order";
    let mut buses = LocalBus::cluster(2, NO_HISTORY);
    buses[0].subscribe(P);
    buses[1].subscribe(P);
    settle(&mut buses);
    // One tick of shard 1: publish, join, publish, leave, publish.
    buses[1].publish(P, Bytes::from_static(b"1"), None, reply(1), 0);
    buses[1].presence(P, "u", true);
    buses[1].publish(P, Bytes::from_static(b"2"), None, reply(2), 0);
    buses[1].presence(P, "u", false);
    buses[1].publish(P, Bytes::from_static(b"3"), None, reply(3), 0);
    let ev = settle(&mut buses);
    for (shard, events) in ev.iter().enumerate() {
        let seq: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                BusEvent::Publications { items, .. } => Some(
                    items
                        .iter()
                        .map(|p| format!("p{}", p.offset))
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                BusEvent::Presence { user, joined, .. } => {
                    Some(format!("{}{user}", if *joined { "+" } else { "-" }))
                }
                _ => None,
            })
            .collect();
        assert_eq!(seq, vec!["p1", "+u", "p2", "-u", "p3"], "shard {shard}");
    }
}

#[test]
fn members_keep_a_channel_from_retirement() {
    const P: &str = "presence-keep";
    let mut buses = LocalBus::cluster(1, NO_HISTORY);
    let epoch = |ev: &[BusEvent]| {
        ev.iter()
            .find_map(|e| match e {
                BusEvent::Subscribed { position, .. } => Some(position.epoch),
                _ => None,
            })
            .unwrap()
    };
    // A member without any listener (the bus does not require one):
    // neither retirement nor the expiry sweep may forget it.
    buses[0].presence(P, "u", true);
    buses[0].publish(P, Bytes::from_static(b"x"), None, reply(1), 0);
    settle(&mut buses);
    buses[0].retention.ttl = Duration::ZERO;
    buses[0].last_expiry = Instant::now() - Duration::from_secs(5);
    buses[0].presence_members(P, 1);
    let ev = settle(&mut buses);
    assert_eq!(members_of(&ev[0], 1), vec!["u"]);
    buses[0].subscribe(P);
    let first = settle(&mut buses);
    let kept = first[0]
        .iter()
        .any(|e| matches!(e, BusEvent::Subscribed { position, .. } if position.offset == 1));
    assert!(kept, "channel state (offset 1) survived: {first:?}");
    // Once nobody listens and the last member is gone, it is retired.
    buses[0].presence(P, "u", false);
    buses[0].unsubscribe(P);
    buses[0].subscribe(P);
    let again = settle(&mut buses);
    assert_ne!(epoch(&first[0]), epoch(&again[0]));
}

#[test]
fn a_shard_that_stops_listening_takes_its_members_with_it() {
    const P: &str = "presence-gone";
    let mut buses = LocalBus::cluster(2, NO_HISTORY);
    buses[0].subscribe(P);
    buses[1].subscribe(P);
    buses[0].presence(P, "a", true);
    buses[1].presence(P, "a", true);
    buses[1].presence(P, "b", true);
    settle(&mut buses);
    // Shard 1 unsubscribes without reporting its users as left.
    buses[1].unsubscribe(P);
    let ev = settle(&mut buses);
    assert_eq!(presence_of(&ev[0], P), vec![left("b")]);
    buses[0].presence_members(P, 1);
    let ev = settle(&mut buses);
    assert_eq!(members_of(&ev[0], 1), vec!["a"]);
}

#[test]
fn an_owner_sequences_its_own_requests_after_earlier_ones_of_others() {
    let mut buses = LocalBus::cluster(2, NO_HISTORY);
    let p: String = (0..)
        .map(|i| format!("presence-{i}"))
        .find(|c| buses[0].owner_of(c) == 0)
        .unwrap();
    let p = p.as_str();
    buses[0].subscribe(p);
    buses[1].subscribe(p);
    buses[0].presence(p, "u", true);
    settle(&mut buses);
    // Shard 1's join is flushed (its client may have seen the answer)
    // before the owner's own shard reports its leave: the join must be
    // sequenced first, so the user never appears to leave.
    buses[1].presence(p, "u", true);
    buses[1].flush();
    buses[0].presence(p, "u", false);
    let ev = settle(&mut buses);
    assert!(ev.iter().all(|e| presence_of(e, p).is_empty()), "{ev:?}");
    buses[0].presence_members(p, 1);
    let ev = settle(&mut buses);
    assert_eq!(members_of(&ev[0], 1), vec!["u"]);
}

#[test]
fn members_of_an_unknown_channel_is_empty() {
    let mut buses = LocalBus::cluster(2, NO_HISTORY);
    buses[1].presence_members("presence-none", 5);
    let ev = settle(&mut buses);
    assert!(members_of(&ev[1], 5).is_empty());
}

#[test]
fn last_unsubscribe_retires_the_channel_with_a_new_epoch() {
    let mut buses = LocalBus::cluster(1, NO_HISTORY);
    buses[0].subscribe("c");
    let first = settle(&mut buses);
    buses[0].unsubscribe("c");
    buses[0].subscribe("c");
    let second = settle(&mut buses);
    let epoch = |ev: &[BusEvent]| {
        ev.iter()
            .find_map(|e| match e {
                BusEvent::Subscribed { position, .. } => Some(position.epoch),
                _ => None,
            })
            .unwrap()
    };
    assert_ne!(epoch(&first[0]), epoch(&second[0]));
}
