//! The Redis bus against a real `redis-server` (spawned per test on a free
//! loopback port, killed at the end). Each `Node` is one `RedisBus::cluster`
//! — what one shardcast process would build — driven by polling.

use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use super::*;
use crate::bus::contract::{delivered, presence as presence_events, subscribed};
use crate::bus::{unix_us, Bus, BusEvent, ChannelQuery, History, Position, ReplyTo};

const WAIT: Duration = Duration::from_secs(20);

#[path = "../../../tests/common/redis_server.rs"]
mod redis_server;
use redis_server::RedisServer;

/// One shardcast process' worth of bus handles.
struct Node {
    buses: Vec<RedisBus>,
    events: Vec<Vec<BusEvent>>,
}

impl Node {
    fn start(redis: &RedisServer, shards: usize, options: RedisOptions) -> Node {
        let buses = RedisBus::cluster(&redis.url(), shards, options).expect("connect");
        Node {
            events: buses.iter().map(|_| Vec::new()).collect(),
            buses,
        }
    }

    fn pump(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        for (i, b) in self.buses.iter_mut().enumerate() {
            b.flush();
            let mut out = Vec::new();
            let _ = b.poll_events(&mut cx, &mut out);
            self.events[i].extend(out);
        }
    }

    fn take(&mut self, shard: usize) -> Vec<BusEvent> {
        std::mem::take(&mut self.events[shard])
    }
}

/// One node with two shards on a real Redis, for the bus contract.
struct Contract {
    _redis: RedisServer,
    node: Node,
}

impl crate::bus::contract::Harness for Contract {
    fn bus(&mut self, shard: usize) -> &mut dyn Bus {
        &mut self.node.buses[shard]
    }

    fn pump(&mut self) {
        self.node.pump();
    }

    fn events(&mut self, shard: usize) -> &mut Vec<BusEvent> {
        &mut self.node.events[shard]
    }
}

fn contract() -> Contract {
    let redis = RedisServer::start(false);
    let node = Node::start(&redis, 2, options("contract"));
    Contract {
        _redis: redis,
        node,
    }
}

crate::bus::contract::bus_contract_tests!(contract());

fn options(node: &str) -> RedisOptions {
    RedisOptions {
        node_id: node.to_string(),
        ingest: false,
        ..RedisOptions::default()
    }
}

/// Pumps every node until `cond` holds (or panics after `WAIT`).
fn until(nodes: &mut [&mut Node], what: &str, mut cond: impl FnMut(&[&mut Node]) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        for n in nodes.iter_mut() {
            n.pump();
        }
        if cond(nodes) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Pumps for a while, for "nothing more arrives" checks.
fn idle(nodes: &mut [&mut Node], d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        for n in nodes.iter_mut() {
            n.pump();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn reply(request: u32) -> ReplyTo {
    ReplyTo { conn: 1, request }
}

fn offsets(events: &[BusEvent], channel: &str) -> Vec<u64> {
    delivered(events, channel)
        .into_iter()
        .map(|(_, p)| p.offset)
        .collect()
}

fn acks(events: &[BusEvent]) -> Vec<(u32, Result<Position, BusError>)> {
    events
        .iter()
        .filter_map(|e| match e {
            BusEvent::Published {
                reply_to, result, ..
            } => Some((reply_to.request, result.clone())),
            _ => None,
        })
        .collect()
}

fn histories(events: &[BusEvent]) -> Vec<(u64, History)> {
    events
        .iter()
        .filter_map(|e| match e {
            BusEvent::History {
                request, result, ..
            } => Some((*request, result.clone())),
            _ => None,
        })
        .collect()
}

/// Subscribes `node`'s shard 0 to `channel` and returns the position.
fn subscribe(node: &mut Node, channel: &str) -> Position {
    node.buses[0].subscribe(channel);
    until(&mut [node], "subscribed", |n| {
        subscribed(&n[0].events[0], channel).is_some()
    });
    let ev = node.take(0);
    subscribed(&ev, channel).expect("subscribed")
}

/// Publishes on one shard's bus, now (its ingress time).
fn publish(bus: &mut RedisBus, channel: &str, payload: Bytes, key: Option<&str>, request: u32) {
    bus.publish(channel, payload, key, reply(request), unix_us());
}

/// Publishes `payloads` from `node`'s shard 0 and waits for every ack.
fn publish_all(node: &mut Node, channel: &str, payloads: &[String]) -> Vec<Position> {
    for (i, p) in payloads.iter().enumerate() {
        publish(
            &mut node.buses[0],
            channel,
            Bytes::from(p.clone()),
            None,
            i as u32,
        );
        if i % 10 == 9 {
            node.buses[0].flush();
        }
    }
    let n = payloads.len();
    until(&mut [node], "acks", |nodes| {
        acks(&nodes[0].events[0]).len() >= n
    });
    let ev = node.take(0);
    acks(&ev)
        .into_iter()
        .map(|(_, r)| r.expect("publish ok"))
        .collect()
}

fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[test]
fn publish_on_one_node_reaches_the_other_in_order() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(&redis, 2, options("a"));
    let mut b = Node::start(&redis, 1, options("b"));
    let at = subscribe(&mut b, "room");
    assert_eq!(at.offset, 0);
    assert_ne!(at.epoch, 0);
    let sent = payloads("m", 100);
    let t0 = unix_us();
    let positions = publish_all(&mut a, "room", &sent);
    let t1 = unix_us();
    assert_eq!(
        positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    assert!(positions.iter().all(|p| p.epoch == at.epoch));
    until(&mut [&mut b], "delivery", |n| {
        offsets(&n[0].events[0], "room").len() >= 100
    });
    idle(&mut [&mut b], Duration::from_millis(100));
    let got = delivered(&b.events[0], "room");
    assert_eq!(got.len(), 100, "no duplicates");
    for (i, (epoch, p)) in got.iter().enumerate() {
        assert_eq!(*epoch, at.epoch);
        assert_eq!(p.offset, i as u64 + 1);
        assert_eq!(&p.payload[..], sent[i].as_bytes());
        assert!((t0..=t1).contains(&p.ingress_us), "ingress time carried");
        assert!(p.published_us > 0);
    }
    // Shard 1 of node a never subscribed: it gets nothing.
    a.pump();
    assert!(offsets(&a.events[1], "room").is_empty());
}

#[test]
fn subscribing_during_a_stream_of_publishes_leaves_no_gap_and_no_duplicate() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(&redis, 1, options("a"));
    let mut b = Node::start(&redis, 1, options("b"));
    let mut sent = 0u32;
    let mut asked = false;
    let deadline = Instant::now() + WAIT;
    // Publish 300 in small batches; subscribe after the first 20.
    while sent < 300 {
        for _ in 0..5 {
            publish(
                &mut a.buses[0],
                "c",
                Bytes::from(format!("{sent}")),
                None,
                sent,
            );
            sent += 1;
        }
        if sent >= 20 && !asked {
            b.buses[0].subscribe("c");
            asked = true;
        }
        a.pump();
        b.pump();
        std::thread::sleep(Duration::from_micros(300));
        assert!(Instant::now() < deadline);
    }
    until(&mut [&mut a, &mut b], "all acked and delivered", |n| {
        let done = subscribed(&n[1].events[0], "c").is_some_and(|p| p.offset == 300)
            || offsets(&n[1].events[0], "c").last() == Some(&300);
        acks(&n[0].events[0]).len() == 300 && done
    });
    let pos = subscribed(&b.events[0], "c").unwrap();
    let got = offsets(&b.events[0], "c");
    let want: Vec<u64> = (pos.offset + 1..=300).collect();
    assert_eq!(got, want, "subscribed at {pos:?}");
}

#[test]
fn an_idempotency_key_stores_once() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(&redis, 1, options("a"));
    let mut b = Node::start(&redis, 1, options("b"));
    subscribe(&mut b, "c");
    publish(
        &mut a.buses[0],
        "c",
        Bytes::from_static(b"x"),
        Some("k1"),
        1,
    );
    publish(
        &mut a.buses[0],
        "c",
        Bytes::from_static(b"x"),
        Some("k1"),
        2,
    );
    publish(
        &mut a.buses[0],
        "c",
        Bytes::from_static(b"y"),
        Some("k2"),
        3,
    );
    until(&mut [&mut a], "acks", |n| acks(&n[0].events[0]).len() == 3);
    // A retry from another node, later, is still recognised.
    publish(
        &mut b.buses[0],
        "c",
        Bytes::from_static(b"x"),
        Some("k1"),
        4,
    );
    until(&mut [&mut b], "ack", |n| acks(&n[0].events[0]).len() == 1);
    idle(&mut [&mut a, &mut b], Duration::from_millis(100));
    let offsets_of = |ev: &[BusEvent]| -> Vec<(u32, u64)> {
        acks(ev)
            .into_iter()
            .map(|(r, p)| (r, p.unwrap().offset))
            .collect()
    };
    assert_eq!(offsets_of(&a.events[0]), vec![(1, 1), (2, 1), (3, 2)]);
    assert_eq!(offsets_of(&b.events[0]), vec![(4, 1)]);
    assert_eq!(offsets(&b.events[0], "c"), vec![1, 2]);
    assert_eq!(redis.cli(&["XLEN", "sc:{c}:s"]).trim(), "2");
}

#[test]
fn history_continues_a_position_or_says_it_is_lost() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(&redis, 1, options("a"));
    let pos = publish_all(&mut a, "h", &payloads("h", 10));
    let epoch = pos[0].epoch;
    let at = |offset| Position { epoch, offset };
    a.buses[0].history("h", at(5), 1);
    a.buses[0].history("h", at(10), 2);
    a.buses[0].history("h", at(0), 3);
    a.buses[0].history("h", at(11), 4);
    a.buses[0].history(
        "h",
        Position {
            epoch: epoch ^ 1,
            offset: 5,
        },
        5,
    );
    a.buses[0].history("never-published", at(0), 6);
    until(&mut [&mut a], "history", |n| {
        histories(&n[0].events[0]).len() == 6
    });
    let mut answers = histories(&a.take(0));
    answers.sort_by_key(|(r, _)| *r);
    let items = |h: &History| match h {
        History::Items { epoch: e, items } => {
            assert_eq!(*e, epoch);
            items.iter().map(|p| p.offset).collect::<Vec<_>>()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(items(&answers[0].1), vec![6, 7, 8, 9, 10]);
    match &answers[0].1 {
        History::Items { items, .. } => assert_eq!(&items[0].payload[..], b"h5"),
        _ => unreachable!(),
    }
    assert_eq!(items(&answers[1].1), Vec::<u64>::new());
    assert_eq!(items(&answers[2].1), (1..=10).collect::<Vec<_>>());
    assert!(matches!(answers[3].1, History::Lost { current } if current == at(10)));
    assert!(matches!(answers[4].1, History::Lost { current } if current == at(10)));
    assert!(matches!(answers[5].1, History::Lost { current } if current.offset == 0));

    // History lost in Redis: a new epoch.
    redis.cli(&["FLUSHALL"]);
    a.buses[0].history("h", at(10), 7);
    until(&mut [&mut a], "history", |n| {
        histories(&n[0].events[0]).len() == 1
    });
    match &histories(&a.take(0))[0].1 {
        History::Lost { current } => {
            assert_ne!(current.epoch, epoch);
            assert_eq!(current.offset, 0);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn trimmed_history_is_lost_and_kept_history_is_exact() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(
        &redis,
        1,
        RedisOptions {
            history_size: 10,
            ..options("a")
        },
    );
    let pos = publish_all(&mut a, "t", &payloads("t", 350));
    let epoch = pos[0].epoch;
    let len: u64 = redis.cli(&["XLEN", "sc:{t}:s"]).trim().parse().unwrap();
    assert!((10..350).contains(&len), "XLEN {len}");
    let first_kept = 350 - len + 1;
    a.buses[0].history("t", Position { epoch, offset: 1 }, 1);
    a.buses[0].history(
        "t",
        Position {
            epoch,
            offset: first_kept - 1,
        },
        2,
    );
    until(&mut [&mut a], "history", |n| {
        histories(&n[0].events[0]).len() == 2
    });
    let mut answers = histories(&a.take(0));
    answers.sort_by_key(|(r, _)| *r);
    assert!(
        matches!(answers[0].1, History::Lost { current } if current == Position { epoch, offset: 350 })
    );
    match &answers[1].1 {
        History::Items { items, .. } => {
            assert_eq!(items.len() as u64, len);
            assert_eq!(items[0].offset, first_kept);
            assert_eq!(items.last().unwrap().offset, 350);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn redis_down_fails_publishes_fast_and_a_restart_resumes_with_gap_fill() {
    let mut redis = RedisServer::start(true);
    let mut a = Node::start(&redis, 1, options("a"));
    let mut b = Node::start(&redis, 1, options("b"));
    let at = subscribe(&mut b, "d");
    publish_all(&mut a, "d", &payloads("d", 10));
    until(&mut [&mut b], "first ten", |n| {
        offsets(&n[0].events[0], "d").len() == 10
    });

    redis.kill();
    let started = Instant::now();
    // Failed publishes may still be stored (fred resends what was in
    // flight once it reconnects), which is why they are keyed: each is
    // stored at most once.
    publish(
        &mut a.buses[0],
        "d",
        Bytes::from_static(b"lost"),
        Some("lost"),
        99,
    );
    until(&mut [&mut a], "failure", |n| {
        !acks(&n[0].events[0]).is_empty()
    });
    let failed_after = started.elapsed();
    match &acks(&a.take(0))[0].1 {
        Err(BusError::Unavailable(msg)) => assert!(!msg.is_empty()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        failed_after < Duration::from_millis(2500),
        "failed after {failed_after:?}"
    );

    // Back with its append-only file: same epoch, history intact.
    redis.restart();
    let deadline = Instant::now() + WAIT;
    // Publish as soon as the command connection is back; the subscriber's
    // Pub/Sub connection may come back later and must fill the gap.
    let mut acked = Vec::new();
    let mut next = 0u32;
    while acked.len() < 20 {
        if next as usize == acked.len() {
            let body = format!("r{next}");
            publish(
                &mut a.buses[0],
                "d",
                Bytes::from(body.clone()),
                Some(&body),
                next,
            );
            next += 1;
        }
        a.pump();
        b.pump();
        for (_, r) in acks(&a.take(0)) {
            match r {
                Ok(p) => acked.push(p),
                Err(_) => next -= 1, // still reconnecting: send again
            }
        }
        assert!(Instant::now() < deadline, "publishes never succeeded again");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(acked.iter().all(|p| p.epoch == at.epoch), "{acked:?}");
    let last = acked.last().unwrap().offset;
    // Thirty, or thirty-one if the failed publish was stored after all.
    assert!(last == 30 || last == 31, "{acked:?}");
    until(&mut [&mut b], "everything stored", |n| {
        offsets(&n[0].events[0], "d").last() == Some(&last)
    });
    idle(&mut [&mut b], Duration::from_millis(100));
    let got = delivered(&b.events[0], "d");
    assert_eq!(
        got.iter().map(|(_, p)| p.offset).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "the gap is filled, nothing twice"
    );
    assert!(got.iter().all(|(e, _)| *e == at.epoch));
    let after: Vec<&[u8]> = got[10..]
        .iter()
        .map(|(_, p)| &p.payload[..])
        .filter(|p| *p != b"lost")
        .collect();
    let want: Vec<String> = payloads("r", 20);
    assert_eq!(after, want.iter().map(|w| w.as_bytes()).collect::<Vec<_>>());
    assert_eq!(got.len() - 10 - after.len(), (last - 30) as usize);
    b.take(0);

    // Restart without persistence: the history is gone, a new epoch.
    redis.restart_empty();
    let deadline = Instant::now() + WAIT;
    let mut new_epoch = None;
    while new_epoch.is_none() {
        publish(&mut a.buses[0], "d", Bytes::from_static(b"n"), None, 500);
        until(&mut [&mut a], "ack", |n| !acks(&n[0].events[0]).is_empty());
        if let Some((_, Ok(p))) = acks(&a.take(0)).pop() {
            new_epoch = Some(p);
        }
        assert!(Instant::now() < deadline);
    }
    let p = new_epoch.unwrap();
    assert_ne!(p.epoch, at.epoch);
    assert_eq!(p.offset, 1);
    until(&mut [&mut b], "new epoch delivered", |n| {
        delivered(&n[0].events[0], "d")
            .iter()
            .any(|(e, q)| *e == p.epoch && q.offset == 1)
    });
}

#[test]
fn a_dropped_pubsub_connection_is_caught_up_from_the_stream() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(&redis, 1, options("a"));
    let mut b = Node::start(&redis, 1, options("b"));
    subscribe(&mut b, "g");
    publish_all(&mut a, "g", &payloads("g", 5));
    until(&mut [&mut b], "five", |n| {
        offsets(&n[0].events[0], "g").len() == 5
    });
    // Cut every Pub/Sub connection and publish while b reconnects.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    publish_all(&mut a, "g", &payloads("x", 20));
    until(&mut [&mut b], "caught up", |n| {
        offsets(&n[0].events[0], "g").last() == Some(&25)
    });
    idle(&mut [&mut b], Duration::from_millis(100));
    assert_eq!(offsets(&b.events[0], "g"), (1..=25).collect::<Vec<_>>());
    assert!(RedisStats::get(&b.buses[0].stats().reconnects) >= 1);
}

#[test]
fn an_offset_jump_is_filled_from_the_stream_and_garbage_is_dropped() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(&redis, 1, options("a"));
    let mut b = Node::start(&redis, 1, options("b"));
    subscribe(&mut b, "j");
    publish_all(&mut a, "j", &payloads("j", 2));
    until(&mut [&mut b], "two", |n| {
        offsets(&n[0].events[0], "j").len() == 2
    });
    // Offset 3 is stored but its announcement never arrives (as if Pub/Sub
    // dropped it); garbage arrives instead.
    redis.cli(&["HINCRBY", "sc:{j}:m", "seq", "1"]);
    redis.cli(&["XADD", "sc:{j}:s", "3-1", "p", "silent", "t", "1", "i", "0"]);
    redis.cli(&["PUBLISH", "sc:{j}:p", "garbage"]);
    redis.cli(&["PUBLISH", "sc:{j}:p", ""]);
    publish_all(&mut a, "j", &payloads("k", 1));
    until(&mut [&mut b], "four", |n| {
        offsets(&n[0].events[0], "j").last() == Some(&4)
    });
    let got = delivered(&b.events[0], "j");
    assert_eq!(
        got.iter().map(|(_, p)| p.offset).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(&got[2].1.payload[..], b"silent");
    assert!(RedisStats::get(&b.buses[0].stats().malformed) >= 2);
}

#[test]
fn unsubscribe_stops_delivery_and_resubscribe_starts_again() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(&redis, 1, options("a"));
    let mut b = Node::start(&redis, 1, options("b"));
    subscribe(&mut b, "u");
    publish_all(&mut a, "u", &payloads("u", 3));
    until(&mut [&mut b], "three", |n| {
        offsets(&n[0].events[0], "u").len() == 3
    });
    b.buses[0].unsubscribe("u");
    b.pump();
    idle(&mut [&mut b], Duration::from_millis(50));
    b.take(0);
    publish_all(&mut a, "u", &payloads("v", 3));
    idle(&mut [&mut b], Duration::from_millis(100));
    assert!(offsets(&b.take(0), "u").is_empty());
    let at = subscribe(&mut b, "u");
    assert_eq!(at.offset, 6);
    publish_all(&mut a, "u", &payloads("w", 1));
    until(&mut [&mut b], "seventh", |n| {
        offsets(&n[0].events[0], "u") == vec![7]
    });
}

fn ingest_options(node: &str) -> RedisOptions {
    RedisOptions {
        node_id: node.to_string(),
        ingest: true,
        ingest_claim_idle: Duration::from_millis(500),
        ..RedisOptions::default()
    }
}

#[test]
fn ingest_runs_each_command_once_across_nodes_and_reclaims_a_dead_consumers_entries() {
    let redis = RedisServer::start(false);
    let mut watcher = Node::start(&redis, 1, options("w"));
    subscribe(&mut watcher, "ing");
    // A publish that a dead node made for an ingest entry it never
    // acknowledged (same idempotency key as the entry below).
    publish(
        &mut watcher.buses[0],
        "ing",
        Bytes::from_static(b"dup"),
        Some("ik1"),
        1,
    );
    until(&mut [&mut watcher], "ack", |n| {
        acks(&n[0].events[0]).len() == 1
    });

    // A consumer ("ghost") takes six entries and dies.
    let mut cmds = String::from("XGROUP CREATE sc:ingest shardcast 0 MKSTREAM\n");
    for i in 0..5 {
        cmds.push_str(&format!("XADD sc:ingest * channel ing payload dead{i}\n"));
    }
    cmds.push_str("XADD sc:ingest * channel ing payload dup idempotency_key ik1\n");
    cmds.push_str("XREADGROUP GROUP shardcast ghost COUNT 1000 STREAMS sc:ingest >\n");
    for i in 0..200 {
        cmds.push_str(&format!("XADD sc:ingest * channel ing payload p{i}\n"));
    }
    // Malformed entries are acknowledged and skipped.
    cmds.push_str("XADD sc:ingest * payload nochannel\n");
    cmds.push_str("XADD sc:ingest * channel bad|name payload x\n");
    redis.cli_batch(&cmds);
    assert!(redis
        .cli(&["XPENDING", "sc:ingest", "shardcast"])
        .starts_with("6\n"));

    let mut n1 = Node::start(&redis, 2, ingest_options("n1"));
    let mut n2 = Node::start(&redis, 2, ingest_options("n2"));
    until(&mut [&mut watcher, &mut n1, &mut n2], "all ingested", |n| {
        offsets(&n[0].events[0], "ing").len() >= 206
    });
    idle(
        &mut [&mut watcher, &mut n1, &mut n2],
        Duration::from_millis(1500),
    );
    let got = delivered(&watcher.events[0], "ing");
    assert_eq!(
        got.iter().map(|(_, p)| p.offset).collect::<Vec<_>>(),
        (1..=206).collect::<Vec<_>>()
    );
    let mut payloads: Vec<String> = got
        .iter()
        .map(|(_, p)| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), 206, "every command exactly once");
    let pending = redis.cli(&["XPENDING", "sc:ingest", "shardcast"]);
    assert!(pending.starts_with("0\n"), "pending: {pending}");
    let malformed = RedisStats::get(&n1.buses[0].stats().malformed)
        + RedisStats::get(&n2.buses[0].stats().malformed);
    assert_eq!(malformed, 2);
    let claimed = RedisStats::get(&n1.buses[0].stats().ingest_claimed)
        + RedisStats::get(&n2.buses[0].stats().ingest_claimed);
    assert_eq!(claimed, 6);
}

fn members(node: &mut Node, shard: usize, channel: &str, request: u64) -> Vec<String> {
    node.buses[shard].presence_members(channel, request);
    until(&mut [node], "members", |n| {
        n[0].events[shard]
            .iter()
            .any(|e| matches!(e, BusEvent::Members { request: r, .. } if *r == request))
    });
    let found = node.events[shard].iter().find_map(|e| match e {
        BusEvent::Members {
            request: r, result, ..
        } if *r == request => Some(result.clone()),
        _ => None,
    });
    found
        .expect("answered")
        .expect("members ok")
        .iter()
        .map(|u| u.to_string())
        .collect()
}

#[test]
fn presence_is_one_list_across_nodes_and_a_dead_nodes_members_expire() {
    let redis = RedisServer::start(false);
    let ch = "presence-room";
    // A short presence TTL, for these nodes only.
    let short = |node: &str| RedisOptions {
        presence_ttl: Duration::from_millis(900),
        ..options(node)
    };
    let mut a = Node::start(&redis, 2, short("a"));
    let mut b = Node::start(&redis, 1, short("b"));
    for shard in 0..2 {
        a.buses[shard].subscribe(ch);
    }
    b.buses[0].subscribe(ch);
    until(&mut [&mut a, &mut b], "subscribed", |n| {
        subscribed(&n[0].events[0], ch).is_some()
            && subscribed(&n[0].events[1], ch).is_some()
            && subscribed(&n[1].events[0], ch).is_some()
    });
    // u1 has connections on both shards of node a, u2 on node b.
    a.buses[0].presence(ch, "u1", true);
    a.buses[1].presence(ch, "u1", true);
    b.buses[0].presence(ch, "u2", true);
    until(&mut [&mut a, &mut b], "joins", |n| {
        presence_events(&n[1].events[0], ch).len() == 2
            && presence_events(&n[0].events[1], ch).len() == 2
    });
    assert_eq!(members(&mut a, 0, ch, 1), vec!["u1", "u2"]);
    assert_eq!(members(&mut b, 0, ch, 2), vec!["u1", "u2"]);
    let mut joins = presence_events(&b.events[0], ch);
    joins.sort();
    assert_eq!(
        joins,
        vec![("u1".to_string(), true), ("u2".to_string(), true)]
    );

    // u1 leaves one shard: still present; then the other: gone.
    a.buses[1].presence(ch, "u1", false);
    idle(&mut [&mut a, &mut b], Duration::from_millis(100));
    assert_eq!(presence_events(&b.events[0], ch).len(), 2);
    assert_eq!(members(&mut b, 0, ch, 3), vec!["u1", "u2"]);
    a.buses[0].presence(ch, "u1", false);
    until(&mut [&mut a, &mut b], "leave", |n| {
        presence_events(&n[1].events[0], ch).last() == Some(&("u1".to_string(), false))
    });
    assert_eq!(members(&mut b, 0, ch, 4), vec!["u2"]);

    // u1 comes back on node a, and node a dies without a word.
    a.buses[0].presence(ch, "u1", true);
    until(&mut [&mut a, &mut b], "rejoin", |n| {
        presence_events(&n[1].events[0], ch).last() == Some(&("u1".to_string(), true))
    });
    drop(a);
    let died = Instant::now();
    until(&mut [&mut b], "expiry", |n| {
        presence_events(&n[0].events[0], ch).last() == Some(&("u1".to_string(), false))
    });
    assert!(
        died.elapsed() < Duration::from_secs(3),
        "{:?}",
        died.elapsed()
    );
    assert_eq!(members(&mut b, 0, ch, 5), vec!["u2"]);
}

/// Asks `query` from `node`'s shard `shard` and waits for the answer.
fn channels(
    node: &mut Node,
    shard: usize,
    query: ChannelQuery,
) -> Result<Vec<(String, u64)>, BusError> {
    const REQUEST: u64 = 77;
    node.buses[shard].channels(query, REQUEST);
    until(&mut [node], "a channel query's answer", |n| {
        n[0].events[shard].iter().any(|e| {
            matches!(
                e,
                BusEvent::Channels {
                    request: REQUEST,
                    ..
                }
            )
        })
    });
    let i = node.events[shard]
        .iter()
        .position(|e| {
            matches!(
                e,
                BusEvent::Channels {
                    request: REQUEST,
                    ..
                }
            )
        })
        .expect("checked above");
    let BusEvent::Channels { result, .. } = node.events[shard].remove(i) else {
        unreachable!("matched above");
    };
    result.map(|list| list.into_iter().map(|(c, n)| (c.to_string(), n)).collect())
}

fn one(channel: &str) -> ChannelQuery {
    ChannelQuery::One(channel.into())
}

fn everything() -> ChannelQuery {
    ChannelQuery::Prefix("".into())
}

fn counted(list: &[(&str, u64)]) -> Result<Vec<(String, u64)>, BusError> {
    Ok(list.iter().map(|&(c, n)| (c.to_string(), n)).collect())
}

/// Queries `node`'s shard 0 until the answer to `query` is `want` (errors
/// while Redis comes back are asked again), within `WAIT`.
fn until_counted(node: &mut Node, query: ChannelQuery, want: &[(&str, u64)], what: &str) {
    let deadline = Instant::now() + WAIT;
    let want = counted(want);
    loop {
        let got = channels(node, 0, query.clone());
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {got:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_dead_nodes_subscription_counts_stop_counting_within_the_ttl() {
    let redis = RedisServer::start(false);
    let ttl = Duration::from_millis(900);
    let short = |node: &str| RedisOptions {
        presence_ttl: ttl,
        ..options(node)
    };
    let mut a = Node::start(&redis, 2, short("a"));
    let mut b = Node::start(&redis, 1, short("b"));
    a.buses[0].subscription_count("room", 2);
    a.buses[1].subscription_count("room", 3);
    a.buses[1].subscription_count("only-a", 1);
    b.buses[0].subscription_count("room", 4);
    // Each shard's query comes after its own counts.
    channels(&mut a, 0, one("room")).expect("counts");
    channels(&mut a, 1, one("room")).expect("counts");
    assert_eq!(channels(&mut b, 0, one("room")), counted(&[("room", 9)]));
    let both = [("only-a", 1), ("room", 9)];
    assert_eq!(channels(&mut b, 0, everything()), counted(&both));

    // Alive, a node's counts outlive their TTL: its heartbeat rewrites them.
    std::thread::sleep(ttl * 3);
    assert_eq!(channels(&mut b, 0, everything()), counted(&both));

    // Node a dies without a word (its companions stop as a SIGKILL would
    // stop them: nothing is taken back).
    drop(a);
    let died = Instant::now();
    until_counted(&mut b, everything(), &[("room", 4)], "a's counts expire");
    let took = died.elapsed();
    assert!(
        took < ttl * 4 / 3 + Duration::from_secs(1),
        "a dead node's counts counted for {took:?}"
    );
    assert_eq!(
        channels(&mut b, 0, one("only-a")),
        counted(&[("only-a", 0)])
    );
    // Reads swept the dead node's entries out of Redis.
    assert_eq!(redis.cli_checked(&["EXISTS", "sc:{only-a}:n"]).trim(), "0");
    assert_eq!(redis.cli_checked(&["EXISTS", "sc:{only-a}:nz"]).trim(), "0");
    assert_eq!(redis.cli_checked(&["HLEN", "sc:{room}:n"]).trim(), "1");
    assert_eq!(
        redis
            .cli_checked(&["ZRANGE", "sc:channels", "0", "-1"])
            .trim(),
        "room"
    );
}

#[test]
fn with_redis_down_a_channel_query_fails_within_the_command_timeout() {
    let mut redis = RedisServer::start(false);
    let timeout = Duration::from_millis(500);
    let mut a = Node::start(
        &redis,
        1,
        RedisOptions {
            command_timeout: timeout,
            ..options("a")
        },
    );
    a.buses[0].subscription_count("room", 2);
    assert_eq!(channels(&mut a, 0, one("room")), counted(&[("room", 2)]));
    redis.kill();
    for round in 0..2 {
        let started = Instant::now();
        a.buses[0].subscription_count("room", 3 + round);
        a.buses[0].channels(one("room"), 1);
        a.buses[0].channels(everything(), 2);
        until(&mut [&mut a], "both answers", |n| {
            n[0].events[0]
                .iter()
                .filter(|e| matches!(e, BusEvent::Channels { .. }))
                .count()
                == 2
        });
        let took = started.elapsed();
        for e in a.take(0) {
            if let BusEvent::Channels { request, result } = e {
                match result {
                    Err(BusError::Unavailable(why)) => assert!(!why.is_empty()),
                    other => panic!("query {request} in round {round}: {other:?}"),
                }
            }
        }
        assert!(
            took < timeout + Duration::from_millis(700),
            "round {round}: answered after {took:?}"
        );
    }
}

#[test]
fn counts_reported_while_redis_was_down_count_once_it_is_back() {
    let mut redis = RedisServer::start(true);
    let ttl = Duration::from_millis(900);
    let mut a = Node::start(
        &redis,
        2,
        RedisOptions {
            presence_ttl: ttl,
            ..options("a")
        },
    );
    a.buses[0].subscription_count("kept", 2);
    a.buses[1].subscription_count("dropped", 5);
    channels(&mut a, 1, one("kept")).expect("counts");
    let before = [("dropped", 5), ("kept", 2)];
    assert_eq!(channels(&mut a, 0, everything()), counted(&before));

    redis.kill();
    a.buses[0].subscription_count("new", 3);
    a.buses[1].subscription_count("dropped", 0);
    a.buses[1].subscription_count("kept", 1);
    a.pump();
    // Longer than the command timeout: the writes failed.
    std::thread::sleep(Duration::from_millis(1500));

    // Back with its append-only file, so with the counts of before Redis
    // went down: the new ones are written again by the heartbeat, and the
    // 0 that never reached Redis lets the old count expire.
    redis.restart();
    let after = [("kept", 3), ("new", 3)];
    until_counted(&mut a, everything(), &after, "after a restart");
    assert_eq!(
        channels(&mut a, 0, one("dropped")),
        counted(&[("dropped", 0)])
    );

    // Back empty: everything is written again.
    redis.restart_empty();
    until_counted(&mut a, everything(), &after, "after an empty restart");
    assert_eq!(channels(&mut a, 0, one("kept")), counted(&[("kept", 3)]));
}

#[test]
fn garbage_in_the_count_keys_is_skipped() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(&redis, 1, options("a"));
    a.buses[0].subscription_count("room", 2);
    assert_eq!(channels(&mut a, 0, one("room")), counted(&[("room", 2)]));
    // Live entries (far in the future) that are not counts, and an indexed
    // name that is not a channel name.
    let far = "99999999999999";
    redis.cli_checked(&["HSET", "sc:{room}:n", "x", "many", "y", "-3", "z", "inf"]);
    redis.cli_checked(&["ZADD", "sc:{room}:nz", far, "x", far, "y", far, "z"]);
    redis.cli_checked(&["ZADD", "sc:channels", far, "bad name"]);
    redis.cli_checked(&["HSET", "sc:{bad name}:n", "x", "4"]);
    redis.cli_checked(&["ZADD", "sc:{bad name}:nz", far, "x"]);
    assert_eq!(channels(&mut a, 0, one("room")), counted(&[("room", 2)]));
    assert_eq!(channels(&mut a, 0, everything()), counted(&[("room", 2)]));
    assert!(RedisStats::get(&a.buses[0].stats().malformed) >= 1);
}
