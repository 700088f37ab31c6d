//! One contract for every bus: the same tests run against the embedded bus
//! (`bus::local`'s tests) and the Redis bus against a real `redis-server`
//! (`bus::redis`'s tests), so the two cannot drift apart. Each test takes a
//! [`Harness`] with two shards' handles on one bus and states a rule of the
//! [`Bus`] trait as both must keep it.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{unix_us, Bus, BusEvent, ChannelQuery, History, Position, Publication, ReplyTo};

/// Two shards' handles on one bus, driven by polling.
pub trait Harness {
    /// Shard `shard`'s handle.
    fn bus(&mut self, shard: usize) -> &mut dyn Bus;
    /// Flushes and polls every handle once, keeping what arrived.
    fn pump(&mut self);
    /// What shard `shard` received and no test took yet.
    fn events(&mut self, shard: usize) -> &mut Vec<BusEvent>;
}

/// How long a condition may take (a real Redis answers in milliseconds).
const WAIT: Duration = Duration::from_secs(20);

/// Pumps until `cond` holds for the harness.
fn until(h: &mut dyn Harness, what: &str, mut cond: impl FnMut(&mut dyn Harness) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        h.pump();
        if cond(h) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The position of the first `Subscribed` answer for `channel`.
pub(crate) fn subscribed(events: &[BusEvent], channel: &str) -> Option<Position> {
    events.iter().find_map(|e| match e {
        BusEvent::Subscribed {
            channel: c,
            position,
        } if &**c == channel => Some(*position),
        _ => None,
    })
}

/// (epoch, publication) of every publication of `channel`, in order.
pub(crate) fn delivered(events: &[BusEvent], channel: &str) -> Vec<(u64, Publication)> {
    events
        .iter()
        .filter_map(|e| match e {
            BusEvent::Publications {
                channel: c,
                epoch,
                items,
            } if &**c == channel => Some(
                items
                    .iter()
                    .map(|p| (*epoch, p.clone()))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect()
}

/// (request, position) of every acknowledged publish.
fn acks(events: &[BusEvent]) -> Vec<(u32, Position)> {
    events
        .iter()
        .filter_map(|e| match e {
            BusEvent::Published {
                reply_to, result, ..
            } => Some((
                reply_to.request,
                result.clone().expect("the publish is stored"),
            )),
            _ => None,
        })
        .collect()
}

fn publish_as(
    h: &mut dyn Harness,
    shard: usize,
    channel: &str,
    payload: &str,
    key: Option<&str>,
    request: u32,
) {
    h.bus(shard).publish(
        channel,
        Bytes::copy_from_slice(payload.as_bytes()),
        key,
        ReplyTo { conn: 1, request },
        unix_us(),
    );
}

/// Subscribes each of `shards` to `channel`; the position each got.
fn subscribe(h: &mut dyn Harness, shards: &[usize], channel: &str) -> Vec<Position> {
    for &s in shards {
        h.bus(s).subscribe(channel);
    }
    until(h, "Subscribed", |h| {
        shards
            .iter()
            .all(|&s| subscribed(h.events(s), channel).is_some())
    });
    shards
        .iter()
        .map(|&s| {
            let ev = std::mem::take(h.events(s));
            subscribed(&ev, channel).expect("checked above")
        })
        .collect()
}

/// Every shard with subscribers gets every publication once, in one order,
/// right after the position its `Subscribed` answer gave; every publish is
/// acknowledged with the position its publication got.
pub fn every_subscribed_shard_gets_every_publication_once_in_order(h: &mut dyn Harness) {
    const CH: &str = "contract-order";
    const N: u32 = 30;
    let start = subscribe(h, &[0, 1], CH);
    assert_eq!(start[0], start[1], "one position for both shards");
    for i in 0..N {
        publish_as(h, (i % 2) as usize, CH, &format!("m{i}"), None, i);
    }
    until(h, "every publication and ack", |h| {
        let got = |h: &mut dyn Harness, s| delivered(h.events(s), CH).len() as u32;
        let acked = |h: &mut dyn Harness, s| acks(h.events(s)).len() as u32;
        got(h, 0) == N && got(h, 1) == N && acked(h, 0) + acked(h, 1) == N
    });
    let seen = |h: &mut dyn Harness, s| -> Vec<(u64, u64, Bytes)> {
        delivered(h.events(s), CH)
            .into_iter()
            .map(|(epoch, p)| (epoch, p.offset, p.payload))
            .collect()
    };
    let first = seen(h, 0);
    assert_eq!(seen(h, 1), first, "the same order");
    let offsets: Vec<u64> = first.iter().map(|d| d.1).collect();
    let expected: Vec<u64> = (1..=u64::from(N)).map(|i| start[0].offset + i).collect();
    assert_eq!(
        offsets, expected,
        "consecutive after the Subscribed position"
    );
    let mut acked = acks(h.events(0));
    acked.extend(acks(h.events(1)));
    for (request, position) in acked {
        let (epoch, _, payload) = first
            .iter()
            .find(|d| d.1 == position.offset)
            .expect("an acknowledged position was delivered");
        assert_eq!(*epoch, position.epoch);
        assert_eq!(&payload[..], format!("m{request}").as_bytes());
    }
}

/// A publish repeating an idempotency key of its channel, from any shard,
/// is answered with the first one's position and stores nothing, however
/// many other keys were used meanwhile (the window is a time,
/// `history.idempotency_ttl_secs`, not a count).
pub fn a_repeated_idempotency_key_is_stored_once(h: &mut dyn Harness) {
    const CH: &str = "contract-idempotency";
    const OTHERS: u32 = 1_100;
    subscribe(h, &[0], CH);
    publish_as(h, 0, CH, "first", Some("k-first"), 1);
    h.bus(0).flush();
    until(h, "the first ack", |h| !acks(h.events(0)).is_empty());
    for i in 0..OTHERS {
        publish_as(h, 1, CH, &format!("o{i}"), Some(&format!("k{i}")), 100 + i);
        if i % 64 == 63 {
            h.bus(1).flush();
        }
    }
    publish_as(h, 1, CH, "retry", Some("k-first"), 2);
    publish_as(h, 0, CH, "retry", Some("k-first"), 3);
    until(h, "every ack", |h| {
        acks(h.events(0)).len() == 2 && acks(h.events(1)).len() as u32 == OTHERS + 1
    });
    let mut acked = acks(h.events(0));
    acked.extend(acks(h.events(1)));
    let of = |r: u32| acked.iter().find(|a| a.0 == r).expect("acked").1;
    assert_eq!(of(2), of(1), "a retry from another shard");
    assert_eq!(of(3), of(1), "a retry from the same shard");
    // Every acknowledged position is a stored publication: wait for all
    // of them, then check nothing else was stored.
    let mut stored: Vec<u64> = acked.iter().map(|a| a.1.offset).collect();
    stored.sort_unstable();
    stored.dedup();
    assert_eq!(stored.len() as u32, OTHERS + 1, "stored once");
    until(h, "the publications", |h| {
        delivered(h.events(0), CH).len() >= stored.len()
    });
    let got = delivered(h.events(0), CH);
    assert_eq!(got.iter().map(|d| d.1.offset).collect::<Vec<_>>(), stored);
    assert!(got.iter().all(|d| &d.1.payload[..] != b"retry"));
}

/// History after a kept position is exactly what followed it; a position
/// of another epoch is answered `Lost` with the newest position.
pub fn history_continues_a_position_exactly_or_says_lost(h: &mut dyn Harness) {
    const CH: &str = "contract-history";
    subscribe(h, &[0], CH);
    for i in 0..5 {
        publish_as(h, 0, CH, &format!("h{i}"), None, i);
    }
    until(h, "acks", |h| acks(h.events(0)).len() == 5);
    let mut acked = acks(h.events(0));
    acked.sort_by_key(|a| a.1.offset);
    let at: Vec<Position> = acked.iter().map(|a| a.1).collect();
    h.bus(1).history(CH, at[1], 41);
    h.bus(1).history(
        CH,
        Position {
            epoch: at[0].epoch ^ 1,
            offset: 1,
        },
        42,
    );
    until(h, "both answers", |h| {
        h.events(1)
            .iter()
            .filter(|e| matches!(e, BusEvent::History { .. }))
            .count()
            == 2
    });
    for e in std::mem::take(h.events(1)) {
        let BusEvent::History {
            request, result, ..
        } = e
        else {
            continue;
        };
        match (request, result) {
            (41, History::Items { epoch, items }) => {
                assert_eq!(epoch, at[0].epoch);
                let got: Vec<(u64, Bytes)> = items
                    .iter()
                    .map(|p| (p.offset, p.payload.clone()))
                    .collect();
                let want: Vec<(u64, Bytes)> = (2..5)
                    .map(|i| (at[i].offset, Bytes::from(format!("h{i}"))))
                    .collect();
                assert_eq!(got, want);
            }
            (42, History::Lost { current }) => assert_eq!(current, at[4]),
            (request, other) => panic!("history {request}: {other:?}"),
        }
    }
}

/// A user present through several shards is one member: joined once when
/// the first shard reports it, left once when the last one does.
pub fn presence_is_one_member_per_user_across_shards(h: &mut dyn Harness) {
    const CH: &str = "presence-contract";
    subscribe(h, &[0, 1], CH);
    h.bus(0).presence(CH, "u", true);
    h.bus(1).presence(CH, "u", true);
    h.bus(1).presence(CH, "v", true);
    until(h, "both joins", |h| presence(h.events(0), CH).len() == 2);
    assert_eq!(
        presence(h.events(0), CH),
        [("u".to_string(), true), ("v".to_string(), true)]
    );
    h.events(0).clear();
    h.bus(0).presence(CH, "u", false);
    h.bus(0).presence_members(CH, 7);
    until(h, "members", |h| members(h.events(0)).is_some());
    assert_eq!(
        members(h.events(0)),
        Some(vec!["u".to_string(), "v".to_string()]),
        "u is still present through shard 1"
    );
    h.bus(1).presence(CH, "u", false);
    until(h, "u leaves", |h| !presence(h.events(0), CH).is_empty());
    assert_eq!(presence(h.events(0), CH), [("u".to_string(), false)]);
}

/// (user, joined) presence events of `channel`, in arrival order.
pub(crate) fn presence(events: &[BusEvent], channel: &str) -> Vec<(String, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            BusEvent::Presence {
                channel: c,
                user,
                joined,
            } if &**c == channel => Some((user.to_string(), *joined)),
            _ => None,
        })
        .collect()
}

fn members(events: &[BusEvent]) -> Option<Vec<String>> {
    events.iter().find_map(|e| match e {
        BusEvent::Members { result, .. } => Some(
            result
                .clone()
                .expect("members")
                .iter()
                .map(|u| u.to_string())
                .collect(),
        ),
        _ => None,
    })
}

/// The answer to the channel query `request` of shard `shard`, once it
/// came (taken out of the shard's events): (channel, count) in order.
fn channels_answer(h: &mut dyn Harness, shard: usize, request: u64) -> Vec<(String, u64)> {
    let answered = |h: &mut dyn Harness| {
        h.events(shard)
            .iter()
            .position(|e| matches!(e, BusEvent::Channels { request: r, .. } if *r == request))
    };
    until(h, "a channel query's answer", |h| answered(h).is_some());
    let i = answered(h).expect("checked above");
    let BusEvent::Channels { result, .. } = h.events(shard).remove(i) else {
        unreachable!("matched above");
    };
    result
        .expect("channel counts")
        .into_iter()
        .map(|(c, n)| (c.to_string(), n))
        .collect()
}

/// Asks `query` from `shard` and waits for the answer.
fn ask(h: &mut dyn Harness, shard: usize, query: ChannelQuery) -> Vec<(String, u64)> {
    const REQUEST: u64 = 1 << 40;
    h.bus(shard).channels(query, REQUEST);
    channels_answer(h, shard, REQUEST)
}

fn one(name: &str) -> ChannelQuery {
    ChannelQuery::One(name.into())
}

fn prefix(p: &str) -> ChannelQuery {
    ChannelQuery::Prefix(p.into())
}

fn counted(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|&(c, n)| (c.to_string(), n)).collect()
}

/// `shard` reports `count` subscribers of `channel`, and waits until a
/// query it asks afterwards is answered: the count is then part of every
/// later answer, whichever shard asks (the contract orders a shard's
/// queries only after its own counts).
fn report(h: &mut dyn Harness, shard: usize, channel: &str, count: u64) {
    h.bus(shard).subscription_count(channel, count);
    ask(h, shard, one(channel));
}

/// Subscription counts are summed over shards: one channel (0 when it has
/// no subscriber anywhere or was never heard of) and every channel with a
/// subscriber whose name starts with a prefix, sorted by name; a new count
/// replaces the shard's previous one.
pub fn subscription_counts_are_summed_over_shards(h: &mut dyn Harness) {
    report(h, 0, "count-b", 1);
    report(h, 0, "count-a", 2);
    report(h, 1, "count-a", 3);
    report(h, 1, "count-ab", 4);
    report(h, 1, "count", 6);
    report(h, 0, "other", 5);
    report(h, 0, "count-zero", 0);
    for asker in [0, 1] {
        assert_eq!(ask(h, asker, one("count-a")), counted(&[("count-a", 5)]));
        assert_eq!(ask(h, asker, one("never")), counted(&[("never", 0)]));
        assert_eq!(
            ask(h, asker, one("count-zero")),
            counted(&[("count-zero", 0)])
        );
        assert_eq!(
            ask(h, asker, prefix("count-")),
            counted(&[("count-a", 5), ("count-ab", 4), ("count-b", 1)]),
            "the prefix's channels with a subscriber, sorted"
        );
        assert_eq!(
            ask(h, asker, prefix("")),
            counted(&[
                ("count", 6),
                ("count-a", 5),
                ("count-ab", 4),
                ("count-b", 1),
                ("other", 5)
            ]),
            "every channel with a subscriber"
        );
        assert_eq!(ask(h, asker, prefix("none-")), counted(&[]));
    }
    report(h, 1, "count-a", 1);
    assert_eq!(ask(h, 0, one("count-a")), counted(&[("count-a", 3)]));
}

/// A shard reporting 0 takes its share out; a channel with no share left
/// counts 0 and leaves prefix answers.
pub fn a_shard_reporting_zero_removes_its_share(h: &mut dyn Harness) {
    const CH: &str = "count-gone";
    report(h, 0, CH, 2);
    report(h, 1, CH, 3);
    report(h, 1, "count-stays", 1);
    assert_eq!(ask(h, 0, one(CH)), counted(&[(CH, 5)]));
    report(h, 1, CH, 0);
    assert_eq!(ask(h, 0, one(CH)), counted(&[(CH, 2)]));
    assert_eq!(
        ask(h, 1, prefix("count-")),
        counted(&[(CH, 2), ("count-stays", 1)])
    );
    report(h, 0, CH, 0);
    assert_eq!(ask(h, 1, one(CH)), counted(&[(CH, 0)]));
    assert_eq!(ask(h, 0, prefix("count-")), counted(&[("count-stays", 1)]));
}

/// A channel query is answered after every count its shard reported
/// before asking, however soon it asks: here each query follows a new
/// count in the same flush, without waiting for anything.
pub fn channels_are_answered_after_the_counts_reported_before_asking(h: &mut dyn Harness) {
    const CH: &str = "count-ordered";
    const N: u64 = 20;
    for i in 1..=N {
        h.bus(0).subscription_count(CH, i);
        h.bus(0).channels(one(CH), i);
        h.bus(0).channels(prefix("count-"), 100 + i);
        h.bus(0).flush();
    }
    h.bus(0).subscription_count(CH, 0);
    h.bus(0).channels(one(CH), 1000);
    h.bus(0).channels(prefix(""), 1001);
    for i in 1..=N {
        assert_eq!(channels_answer(h, 0, i), counted(&[(CH, i)]), "query {i}");
        assert_eq!(
            channels_answer(h, 0, 100 + i),
            counted(&[(CH, i)]),
            "prefix query {i}"
        );
    }
    assert_eq!(channels_answer(h, 0, 1000), counted(&[(CH, 0)]));
    assert_eq!(channels_answer(h, 0, 1001), counted(&[]));
}

/// Expands to one `#[test]` per contract rule, each on a fresh harness
/// from `$make` (an expression evaluating to a `Harness`).
macro_rules! bus_contract_tests {
    ($make:expr) => {
        #[test]
        fn contract_every_subscribed_shard_gets_every_publication_once_in_order() {
            let mut h = $make;
            $crate::bus::contract::every_subscribed_shard_gets_every_publication_once_in_order(
                &mut h,
            );
        }

        #[test]
        fn contract_a_repeated_idempotency_key_is_stored_once() {
            let mut h = $make;
            $crate::bus::contract::a_repeated_idempotency_key_is_stored_once(&mut h);
        }

        #[test]
        fn contract_history_continues_a_position_exactly_or_says_lost() {
            let mut h = $make;
            $crate::bus::contract::history_continues_a_position_exactly_or_says_lost(&mut h);
        }

        #[test]
        fn contract_presence_is_one_member_per_user_across_shards() {
            let mut h = $make;
            $crate::bus::contract::presence_is_one_member_per_user_across_shards(&mut h);
        }

        #[test]
        fn contract_subscription_counts_are_summed_over_shards() {
            let mut h = $make;
            $crate::bus::contract::subscription_counts_are_summed_over_shards(&mut h);
        }

        #[test]
        fn contract_a_shard_reporting_zero_removes_its_share() {
            let mut h = $make;
            $crate::bus::contract::a_shard_reporting_zero_removes_its_share(&mut h);
        }

        #[test]
        fn contract_channels_are_answered_after_the_counts_reported_before_asking() {
            let mut h = $make;
            $crate::bus::contract::channels_are_answered_after_the_counts_reported_before_asking(
                &mut h,
            );
        }
    };
}
pub(crate) use bus_contract_tests;
