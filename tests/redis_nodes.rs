//! The Redis bus against real processes: a `redis-server` spawned per test
//! on a free loopback port and two `shardcast` nodes (two shards each)
//! sharing it. Fan-out across nodes, exact recovery through the streams,
//! Redis killed and restarted (with and without persistence), presence
//! across nodes and after a node's death, user-addressed push, the ingest
//! stream with its consumer group, and idempotent publishes.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    connect_on_shard, http_get, try_connect, Client, RedisServer, Server, BULK_PUBLISHER, WAIT,
};
use serde_json::json;
use shardcast::auth::jwt::mint;
use shardcast::protocol::wire::{ErrorCode, Position, ServerMessage};

const SECRET: &str = "redis-nodes-test-secret-of-32-bytes+";

/// A shardcast node on `redis`, with the publish rate limit lifted.
fn node(redis: &RedisServer, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str()];
    args.extend_from_slice(&BULK_PUBLISHER);
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A node that requires tokens.
fn auth_node(redis: &RedisServer, extra: &[&str]) -> Server {
    let mut args = vec!["--auth-anonymous", "false", "--auth-hs256-secret", SECRET];
    args.extend_from_slice(extra);
    node(redis, &args)
}

fn token(claims: serde_json::Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut claims = claims;
    claims["exp"] = json!(exp);
    mint::hs256(SECRET.as_bytes(), &claims)
}

async fn connect_token(s: &Server, token: &str) -> Client {
    try_connect(s.addr, Some(token))
        .await
        .unwrap_or_else(|close| panic!("token refused: {close:?}"))
}

/// The outcome of one publish.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Ack(Position),
    Error(u16, String),
}

/// Publishes and waits at most `bound` for the answer (a publish must never
/// hang, even with Redis down).
async fn publish_within(
    c: &mut Client,
    channel: &str,
    payload: &[u8],
    key: Option<&str>,
    bound: Duration,
) -> Outcome {
    let id = c
        .request(|e, id| e.publish(id, channel, payload, key))
        .await;
    let started = Instant::now();
    match tokio::time::timeout(bound, c.reply(id)).await {
        Ok(ServerMessage::PublishAck { position, .. }) => Outcome::Ack(position),
        Ok(ServerMessage::Error { code, message }) => Outcome::Error(code, message),
        Ok(other) => panic!("expected PublishAck or Error, got {other:?}"),
        Err(_) => panic!(
            "publish on {channel} not answered within {bound:?} (hung since {:?})",
            started.elapsed()
        ),
    }
}

async fn publish_keyed(c: &mut Client, channel: &str, payload: &[u8], key: &str) -> Position {
    match publish_within(c, channel, payload, Some(key), WAIT).await {
        Outcome::Ack(p) => p,
        other => panic!("publish with key {key} failed: {other:?}"),
    }
}

/// Publishes with `key` until it is acknowledged, retrying (with the same
/// key, so it is stored once) while Redis is unavailable — as a client
/// does while Redis restarts; at most `WAIT` in all.
async fn publish_keyed_once_back(
    c: &mut Client,
    channel: &str,
    payload: &[u8],
    key: &str,
) -> Position {
    let until = Instant::now() + WAIT;
    loop {
        match publish_within(c, channel, payload, Some(key), WAIT).await {
            Outcome::Ack(pos) => return pos,
            Outcome::Error(code, _) => assert_eq!(code, ErrorCode::Unavailable as u16),
        }
        assert!(Instant::now() < until, "Redis never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pipelines `payloads` and returns their acknowledged positions in order.
async fn publish_all(c: &mut Client, channel: &str, payloads: &[Vec<u8>]) -> Vec<Position> {
    let mut ids = Vec::with_capacity(payloads.len());
    for p in payloads {
        ids.push(c.publish_nowait(channel, p).await);
    }
    let mut acks = Vec::with_capacity(ids.len());
    for id in ids {
        match c.reply(id).await {
            ServerMessage::PublishAck { position, .. } => acks.push(position),
            other => panic!("expected PublishAck, got {other:?}"),
        }
    }
    acks
}

/// The next `n` publications of `channel`: (epoch, offset, payload).
async fn receive(c: &mut Client, channel: &str, n: usize) -> Vec<(u64, u64, Vec<u8>)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let (ch, epoch, offset, payload) = c.publication().await;
        assert_eq!(ch, channel);
        got.push((epoch, offset, payload));
    }
    got
}

fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i}").into_bytes())
        .collect()
}

/// Asserts `got` is exactly `acks` with `sent` payloads, in order.
fn assert_exactly(got: &[(u64, u64, Vec<u8>)], acks: &[Position], sent: &[Vec<u8>], who: &str) {
    assert_eq!(got.len(), acks.len(), "{who}: count");
    for (k, ((epoch, offset, payload), (ack, sent))) in
        got.iter().zip(acks.iter().zip(sent)).enumerate()
    {
        assert_eq!(
            (*epoch, *offset, payload.as_slice()),
            (ack.epoch, ack.offset, sent.as_slice()),
            "{who}: publication #{k}"
        );
    }
}

// ---------------------------------------------------------------------------
// 1. Fan-out across nodes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_on_a_reaches_subscribers_on_b_in_order_with_offsets() {
    let redis = RedisServer::start(false);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    // Subscribers on both shards of B, and one on A.
    let mut subs = common::clients_on_both_shards(b.addr, 1).await;
    subs.push(Client::connect(a.addr).await);
    for s in subs.iter_mut() {
        s.subscribe("fanout").await;
    }
    let mut publisher = Client::connect(a.addr).await;
    let sent = payloads("fanout", 300);
    let acks = publish_all(&mut publisher, "fanout", &sent).await;
    for w in acks.windows(2) {
        assert_eq!(w[1].epoch, w[0].epoch, "one epoch");
        assert_eq!(w[1].offset, w[0].offset + 1, "acked offsets step by 1");
    }
    for s in subs.iter_mut() {
        let got = receive(s, "fanout", sent.len()).await;
        let who = format!("subscriber on shard {}", s.shard);
        assert_exactly(&got, &acks, &sent, &who);
    }
    // Nothing more: the next one is the marker.
    let marker = publisher.publish("fanout", b"marker").await;
    for s in subs.iter_mut() {
        let (_, epoch, offset, payload) = s.publication().await;
        assert_eq!(
            (epoch, offset, &payload[..]),
            (marker.epoch, marker.offset, &b"marker"[..])
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Recovery by position through the stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_position_on_either_node_gets_exactly_the_missed_then_live() {
    let redis = RedisServer::start(false);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut publisher = Client::connect(a.addr).await;
    let mut c = Client::connect(b.addr).await;
    c.subscribe("feed").await;
    let first = publisher.publish("feed", b"before").await;
    let (_, epoch, offset, _) = c.publication().await;
    assert_eq!((epoch, offset), (first.epoch, first.offset));
    drop(c);

    let missed = payloads("missed", 100);
    let missed_acks = publish_all(&mut publisher, "feed", &missed).await;
    // Back on A (the publisher's node) and on B.
    let mut back = [Client::connect(a.addr).await, Client::connect(b.addr).await];
    for c in back.iter_mut() {
        let (pos, recovered) = c.subscribe_from("feed", Some(first)).await;
        assert!(recovered, "recovery within retention must succeed");
        assert_eq!(pos, first, "position echoes where the client resumes");
    }
    for (c, name) in back.iter_mut().zip(["on A", "on B"]) {
        let got = receive(c, "feed", 100).await;
        assert_exactly(&got, &missed_acks, &missed, name);
    }
    // Then live, with no duplicate and no gap.
    let live = payloads("live", 5);
    let live_acks = publish_all(&mut publisher, "feed", &live).await;
    assert_eq!(live_acks[0].offset, first.offset + 101);
    for (c, name) in back.iter_mut().zip(["on A", "on B"]) {
        let got = receive(c, "feed", 5).await;
        assert_exactly(&got, &live_acks, &live, name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_on_b_while_a_keeps_publishing_has_no_gap_and_no_duplicate() {
    let redis = RedisServer::start(false);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    // Keep the channel live on both shards of B while clients recover.
    let mut keepers = common::clients_on_both_shards(b.addr, 1).await;
    for k in keepers.iter_mut() {
        k.subscribe("busy").await;
    }
    let mut publisher = Client::connect(a.addr).await;
    let start = publisher.publish("busy", b"start").await;
    let sent = payloads("busy", 400);
    let stop = sent.len();
    let task = tokio::spawn(async move {
        let acks = publish_all(&mut publisher, "busy", &sent).await;
        (publisher, acks)
    });
    // Recover from `start` on B while publications keep arriving.
    let mut recovering = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(b.addr).await;
        let (_, recovered) = c.subscribe_from("busy", Some(start)).await;
        assert!(recovered);
        recovering.push(c);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, acks) = task.await.unwrap();
    let last = acks.last().unwrap().offset;
    assert_eq!(last, start.offset + stop as u64);
    for (i, c) in recovering.iter_mut().enumerate() {
        let got = receive(c, "busy", stop).await;
        for (k, (epoch, offset, payload)) in got.iter().enumerate() {
            assert_eq!(*epoch, start.epoch, "client {i}");
            assert_eq!(
                *offset,
                start.offset + 1 + k as u64,
                "client {i}: gap or duplicate"
            );
            assert_eq!(payload, format!("busy-{k}").as_bytes(), "client {i}");
        }
    }
}

// ---------------------------------------------------------------------------
// 3. Redis killed and restarted.

/// Publishes `<tag>-<i>` on `channel` until `stop`, each answered within a
/// few seconds, pausing a little between publishes.
fn spawn_publisher(
    mut c: Client,
    channel: &'static str,
    tag: &'static str,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<(Vec<u8>, Outcome)>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let payload = format!("{tag}-{i}").into_bytes();
            i += 1;
            let started = Instant::now();
            let outcome =
                publish_within(&mut c, channel, &payload, None, Duration::from_secs(5)).await;
            match &outcome {
                Outcome::Ack(_) => acked.fetch_add(1, Ordering::Relaxed),
                Outcome::Error(..) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(5),
                        "a failing publish must fail fast"
                    );
                    failed.fetch_add(1, Ordering::Relaxed)
                }
            };
            let failing = matches!(outcome, Outcome::Error(..));
            out.push((payload, outcome));
            tokio::time::sleep(Duration::from_millis(if failing { 50 } else { 4 })).await;
        }
        out
    })
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_loses_nothing_acknowledged_then_a_new_epoch_without_persistence(
) {
    const CH: &str = "durable";
    let mut redis = RedisServer::start(true);
    let extra = ["--history-size", "100000"];
    let a = node(&redis, &extra);
    let b = node(&redis, &extra);
    let mut watcher = Client::connect(b.addr).await;
    let (p0, _) = watcher.subscribe_from(CH, None).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut publishers = Vec::new();
    for (s, tag) in [(&a, "a"), (&b, "b")] {
        let c = Client::connect(s.addr).await;
        publishers.push(spawn_publisher(
            c,
            CH,
            tag,
            stop.clone(),
            acked.clone(),
            failed.clone(),
        ));
    }
    wait_until("100 acks before the kill", WAIT, || {
        acked.load(Ordering::Relaxed) >= 100
    })
    .await;
    redis.kill();
    let killed = Instant::now();
    let acked_at_kill = acked.load(Ordering::Relaxed);
    wait_until("publishes failing during the outage", WAIT, || {
        failed.load(Ordering::Relaxed) >= 4
    })
    .await;
    let outage = killed.elapsed();
    redis.restart();
    wait_until("100 acks after the restart", WAIT, || {
        acked.load(Ordering::Relaxed) >= acked_at_kill + 100
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for p in publishers {
        outcomes.extend(p.await.expect("publisher task"));
    }
    println!(
        "redis down for {outage:?}: {} publishes acked, {} failed",
        acked.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );

    // Every failure is Unavailable; every ack has a distinct offset in the
    // channel's one epoch (the append-only file kept it).
    let mut by_offset: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for (payload, outcome) in &outcomes {
        match outcome {
            Outcome::Ack(pos) => {
                assert_eq!(pos.epoch, p0.epoch, "persistence keeps the epoch");
                let dup = by_offset.insert(pos.offset, payload.clone());
                assert!(dup.is_none(), "two acks for offset {}", pos.offset);
            }
            Outcome::Error(code, message) => assert_eq!(
                *code,
                ErrorCode::Unavailable as u16,
                "publish failed with {message:?}"
            ),
        }
    }
    let (&first, _) = by_offset.first_key_value().unwrap();
    let (&last, _) = by_offset.last_key_value().unwrap();

    // The watcher stayed connected; after the gap fill it has seen every
    // offset, each once, in order, and each acked one with its payload.
    let mut seen: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut expect = p0.offset + 1;
    while expect <= last {
        let (ch, epoch, offset, payload) = watcher.publication().await;
        assert_eq!((ch.as_str(), epoch), (CH, p0.epoch));
        assert_eq!(offset, expect, "the watcher saw a gap or a duplicate");
        seen.insert(offset, payload);
        expect += 1;
    }
    for (offset, payload) in &by_offset {
        assert_eq!(
            seen.get(offset),
            Some(payload),
            "acked offset {offset} at the watcher"
        );
    }

    // A client resubscribing (on A) with the position before the first
    // ack recovers everything, acked or not, in order.
    let mut late = Client::connect(a.addr).await;
    let from = Position {
        epoch: p0.epoch,
        offset: first - 1,
    };
    let (pos, recovered) = late.subscribe_from(CH, Some(from)).await;
    assert!(recovered, "history survived the restart: must recover");
    assert_eq!(pos, from);
    let got = receive(&mut late, CH, (last - first + 1) as usize).await;
    for (k, (epoch, offset, payload)) in got.iter().enumerate() {
        assert_eq!((*epoch, *offset), (p0.epoch, first + k as u64));
        assert_eq!(Some(payload), seen.get(offset));
    }

    // Now a restart that loses everything: a new epoch, and clients told.
    redis.restart_empty();
    let mut publisher = Client::connect(a.addr).await;
    let until = Instant::now() + WAIT;
    let after = loop {
        match publish_within(
            &mut publisher,
            CH,
            b"after-loss",
            None,
            Duration::from_secs(5),
        )
        .await
        {
            Outcome::Ack(pos) => break pos,
            Outcome::Error(code, _) => assert_eq!(code, ErrorCode::Unavailable as u16),
        }
        assert!(
            Instant::now() < until,
            "no publish succeeded after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(after.epoch, p0.epoch, "history was lost: a new epoch");
    // The connected watcher learns it through a publication of the new
    // epoch.
    loop {
        let (_, epoch, offset, payload) = watcher.publication().await;
        if epoch == after.epoch && offset == after.offset {
            assert_eq!(payload, b"after-loss");
            break;
        }
        assert_eq!(epoch, p0.epoch, "an unexpected epoch");
    }
    // Resubscribing with an old position: not recovered, on either node.
    // A shard learns of the new epoch from Redis (its Pub/Sub reconnect,
    // then the new epoch's publication), so a shard that has not heard yet
    // still answers from the old epoch's head; that view must turn within
    // the wait, on both shards of both nodes.
    let old = Position {
        epoch: p0.epoch,
        offset: last,
    };
    for s in [&a, &b] {
        for pos in not_recovered_on_both_shards(s, CH, old).await {
            assert_eq!(pos.epoch, after.epoch, "the client is told the new epoch");
        }
    }
}

/// Subscribes to `channel` from `old` (a position in a lost epoch) until
/// both shards of `node` answer `recovered = false`; a shard that has not
/// heard of the loss yet may answer `recovered = true` at `old` until then.
/// The positions the two shards answered with.
async fn not_recovered_on_both_shards(
    node: &Server,
    channel: &str,
    old: Position,
) -> [Position; 2] {
    let until = Instant::now() + WAIT;
    let mut told: [Option<Position>; 2] = [None, None];
    while told.iter().any(Option::is_none) {
        let mut c = Client::connect(node.addr).await;
        let (pos, recovered) = c.subscribe_from(channel, Some(old)).await;
        if recovered {
            assert_eq!(pos, old, "recovered only at the old head");
            assert!(
                Instant::now() < until,
                "shard {} still claims the lost history is recoverable",
                c.shard
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        told[c.shard as usize] = Some(pos);
    }
    told.map(Option::unwrap)
}

/// Redis restarted empty and nobody publishes: shards that follow the
/// channel still learn of the new epoch (from their catch-up after the
/// Pub/Sub reconnect) and stop offering recovery in the lost one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_history_is_noticed_without_a_new_publication() {
    const CH: &str = "quiet";
    let mut redis = RedisServer::start(false);
    let a = node(&redis, &[]);
    let mut followers = common::clients_on_both_shards(a.addr, 1).await;
    for f in followers.iter_mut() {
        f.subscribe(CH).await;
    }
    let mut publisher = Client::connect(a.addr).await;
    let old = publisher.publish(CH, b"before the loss").await;
    for f in followers.iter_mut() {
        let (_, epoch, offset, _) = f.publication().await;
        assert_eq!((epoch, offset), (old.epoch, old.offset));
    }

    redis.restart_empty();
    for pos in not_recovered_on_both_shards(&a, CH, old).await {
        assert_ne!(pos.epoch, old.epoch, "the client is told the new epoch");
        assert_eq!(pos.offset, 0, "nothing was published in the new epoch");
    }
}

// ---------------------------------------------------------------------------
// 4. Presence across nodes.

const ROOM: &str = "presence-lobby";

/// The next presence changes and publications on ROOM are `want` (see
/// [`common::next_channel_event`]).
async fn expect_events(c: &mut Client, want: &[&str]) {
    common::expect_channel_events(c, ROOM, want).await
}

async fn members(c: &mut Client) -> Vec<String> {
    let id = c.request(|e, id| e.presence_query(id, ROOM)).await;
    match c.reply(id).await {
        ServerMessage::PresenceMembers { channel, users } => {
            assert_eq!(channel, ROOM);
            users
        }
        other => panic!("expected PresenceMembers, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_the_same_from_both_nodes_and_a_killed_node_leaves() {
    let redis = RedisServer::start(false);
    // README: a dead node's members are removed within
    // redis.presence_ttl_ms × 4/3 (here 2 s).
    let ttl = ["--redis-presence-ttl-ms", "1500"];
    let a = auth_node(&redis, &ttl);
    let b = auth_node(&redis, &ttl);
    let alice = token(json!({"sub": "alice", "channels": ["presence-*"]}));
    let bob = token(json!({"sub": "bob", "channels": [ROOM]}));
    // alice on A and on B, bob on B.
    let mut alice_a = connect_on_shard(a.addr, &alice, 1, false).await;
    let mut alice_b = connect_token(&b, &alice).await;
    let mut bob_b = connect_token(&b, &bob).await;

    alice_a.subscribe(ROOM).await;
    expect_events(&mut alice_a, &["+alice"]).await;
    alice_b.subscribe(ROOM).await;
    bob_b.subscribe(ROOM).await;
    expect_events(&mut bob_b, &["+bob"]).await;
    // alice's second connection is no second join.
    expect_events(&mut alice_a, &["+bob"]).await;
    expect_events(&mut alice_b, &["+bob"]).await;
    for c in [&mut alice_a, &mut alice_b, &mut bob_b] {
        assert_eq!(
            members(c).await,
            ["alice", "bob"],
            "member list of {:#x}",
            c.client_id
        );
    }

    // B dies without a word: bob (only on B) goes within the heartbeat
    // window; alice stays (still connected to A).
    b.signal(libc::SIGKILL);
    let killed = Instant::now();
    // 4/3 of the TTL, plus slack for a Redis round trip on a loaded machine.
    let limit = Duration::from_millis(2000 + 1000);
    loop {
        let m = members(&mut alice_a).await;
        if m == ["alice"] {
            break;
        }
        assert_eq!(m, ["alice", "bob"], "only bob may leave");
        assert!(
            killed.elapsed() < limit,
            "bob still a member {:?} after node B was killed",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "a killed node's member was gone after {:?}",
        killed.elapsed()
    );
    // The survivor was told, and nothing else (no leave for alice).
    expect_events(&mut alice_a, &["-bob"]).await;
    alice_a.publish(ROOM, b"after").await;
    expect_events(&mut alice_a, &["pub:after"]).await;
    assert_eq!(members(&mut alice_a).await, ["alice"]);
    // A new connection on A reads the same list.
    let mut alice_a2 = connect_token(&a, &alice).await;
    alice_a2.subscribe(ROOM).await;
    assert_eq!(members(&mut alice_a2).await, ["alice"]);
}

// ---------------------------------------------------------------------------
// 5. User-addressed push.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_an_offline_user_arrives_when_it_reconnects_with_its_position() {
    let redis = RedisServer::start(false);
    let a = auth_node(&redis, &[]);
    let b = auth_node(&redis, &[]);
    let backend = token(json!({"sub": "backend", "publish": ["user:*"]}));
    let carol = token(json!({"sub": "carol"}));
    let mut sender = connect_token(&a, &backend).await;

    // carol's first subscription (a channel nobody used yet), then she goes.
    let mut c = connect_token(&b, &carol).await;
    let (fresh, _) = c.subscribe_from("user:carol", None).await;
    drop(c);
    let sent = payloads("while-offline", 3);
    let acks = publish_all(&mut sender, "user:carol", &sent).await;
    // Back, on the other node.
    let mut c = connect_token(&a, &carol).await;
    let (pos, recovered) = c.subscribe_from("user:carol", Some(fresh)).await;
    assert!(
        recovered,
        "within retention the offline messages are recovered"
    );
    assert_eq!(pos, fresh);
    let got = receive(&mut c, "user:carol", 3).await;
    assert_exactly(&got, &acks, &sent, "carol back on A");

    // Live, then offline again, then back on B.
    let live = sender.publish("user:carol", b"live").await;
    let got = receive(&mut c, "user:carol", 1).await;
    assert_exactly(&got, &[live], &[b"live".to_vec()], "carol live");
    drop(c);
    let sent = payloads("second-absence", 2);
    let acks = publish_all(&mut sender, "user:carol", &sent).await;
    let mut c = connect_token(&b, &carol).await;
    let (_, recovered) = c.subscribe_from("user:carol", Some(live)).await;
    assert!(recovered);
    let got = receive(&mut c, "user:carol", 2).await;
    assert_exactly(&got, &acks, &sent, "carol back on B");
}

// ---------------------------------------------------------------------------
// 6. Ingest: each entry executed once across nodes.

/// `XADD sc:ingest` lines for redis-cli.
fn ingest_lines(channel: &str, range: std::ops::Range<usize>) -> String {
    range
        .map(|i| format!("XADD sc:ingest * channel {channel} payload e-{i}\n"))
        .collect()
}

/// Receives until every payload of `want` arrived; asserts each arrived
/// once, at consecutive offsets.
async fn receive_set(c: &mut Client, channel: &str, want: &HashSet<Vec<u8>>) {
    let mut got: HashSet<Vec<u8>> = HashSet::new();
    let mut last: Option<(u64, u64)> = None;
    while got.len() < want.len() {
        let (ch, epoch, offset, payload) = c.publication().await;
        assert_eq!(ch, channel);
        if let Some((e, o)) = last {
            assert_eq!((epoch, offset), (e, o + 1), "gap or duplicate offset");
        }
        last = Some((epoch, offset));
        assert!(
            want.contains(&payload),
            "unexpected payload {:?}",
            String::from_utf8_lossy(&payload)
        );
        assert!(
            got.insert(payload.clone()),
            "{:?} delivered twice",
            String::from_utf8_lossy(&payload)
        );
    }
}

/// A publish from `c` after everything else: the next publication every
/// subscriber sees must be this one (no late duplicates).
async fn assert_nothing_more(
    publisher: &mut Client,
    subscribers: &mut [&mut Client],
    channel: &str,
) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let marker = publisher.publish(channel, b"marker").await;
    for s in subscribers.iter_mut() {
        let (_, epoch, offset, payload) = s.publication().await;
        assert_eq!(
            (
                epoch,
                offset,
                String::from_utf8_lossy(&payload).into_owned()
            ),
            (marker.epoch, marker.offset, "marker".to_string()),
            "something arrived after the expected publications"
        );
    }
}

/// Pending entries of the group (total), from `XPENDING`.
/// Entries pending in the ingest group. An error reply (no stream, no
/// group) fails the test: it must never read as "0 pending".
fn pending(redis: &RedisServer) -> u64 {
    let out = redis.cli_checked(&["XPENDING", "sc:ingest", "shardcast"]);
    let first = out.lines().next().unwrap_or("").trim();
    first
        .parse()
        .unwrap_or_else(|_| panic!("XPENDING answered {out:?}"))
}

fn pending_of(redis: &RedisServer, consumer: &str) -> usize {
    redis
        .cli_checked(&[
            "XPENDING",
            "sc:ingest",
            "shardcast",
            "-",
            "+",
            "100000",
            consumer,
        ])
        .lines()
        .filter(|l| {
            // Entry IDs (`<ms>-<seq>`), not the consumer names or numbers.
            l.trim()
                .split_once('-')
                .is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok())
        })
        .count()
}

fn metric(s: &Server, name: &str) -> u64 {
    let (status, body) = http_get(s.admin.expect("admin address"), "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("{name} not in /metrics")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_entries_are_executed_once_with_two_nodes_consuming() {
    const CH: &str = "ingest-feed";
    const N: usize = 500;
    let redis = RedisServer::start(false);
    let a = node(&redis, &["--redis-node-id", "node-a"]);
    let b = node(&redis, &["--redis-node-id", "node-b"]);
    let mut sub_a = Client::connect(a.addr).await;
    let mut sub_b = Client::connect(b.addr).await;
    sub_a.subscribe(CH).await;
    sub_b.subscribe(CH).await;
    // Both consumers registered in the group before entries flow.
    let until = Instant::now() + WAIT;
    loop {
        let info = redis.cli_checked(&["XINFO", "CONSUMERS", "sc:ingest", "shardcast"]);
        if info.contains("node-a") && info.contains("node-b") {
            break;
        }
        assert!(
            Instant::now() < until,
            "both nodes never joined the group: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut lines = ingest_lines(CH, 0..N);
    // Some commands sent twice with one idempotency key: stored once.
    for j in 0..20 {
        for _ in 0..2 {
            lines.push_str(&format!(
                "XADD sc:ingest * channel {CH} payload dup-{j} idempotency_key k-{j}\n"
            ));
        }
    }
    redis.cli_batch(&lines);
    let mut want: HashSet<Vec<u8>> = payloads("e", N).into_iter().collect();
    want.extend(payloads("dup", 20));
    receive_set(&mut sub_a, CH, &want).await;
    receive_set(&mut sub_b, CH, &want).await;
    let mut publisher = Client::connect(a.addr).await;
    assert_nothing_more(&mut publisher, &mut [&mut sub_a, &mut sub_b], CH).await;
    let until = Instant::now() + WAIT;
    while pending(&redis) != 0 {
        assert!(Instant::now() < until, "entries left pending");
        std::thread::sleep(Duration::from_millis(50));
    }
    let executed = metric(&a, "shardcast_redis_ingest_executed_total")
        + metric(&b, "shardcast_redis_ingest_executed_total");
    println!("ingest: {executed} entries executed by the two nodes");
    assert_eq!(executed, (N + 40) as u64, "each entry executed once");
}

/// SIGKILLs `node` at a moment it holds ingest entries it has not
/// acknowledged: it is stopped (SIGSTOP) while entries keep flowing, so
/// Redis hands its outstanding read a batch, and killed once `XPENDING`
/// shows entries on it. Returns how many it held.
async fn kill_holding_entries(node: &Server, redis: &RedisServer, consumer: &str) -> usize {
    for _ in 0..10 {
        node.signal(libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let held = pending_of(redis, consumer);
        if held > 0 {
            node.signal(libc::SIGKILL);
            return held;
        }
        node.signal(libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.signal(libc::SIGKILL);
    0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_entries_are_executed_once_after_a_node_is_killed_mid_batch() {
    const CH: &str = "ingest-kill";
    const N: usize = 3000;
    let redis = RedisServer::start(false);
    let claim = ["--redis-ingest-claim-idle-secs", "1"];
    let a = node(
        &redis,
        &[&claim[..], &["--redis-node-id", "node-a"]].concat(),
    );
    let b = node(
        &redis,
        &[&claim[..], &["--redis-node-id", "node-b"]].concat(),
    );
    let mut sub = Client::connect(a.addr).await;
    sub.subscribe(CH).await;
    let until = Instant::now() + WAIT;
    while !redis
        .cli_checked(&["XINFO", "CONSUMERS", "sc:ingest", "shardcast"])
        .contains("node-b")
    {
        assert!(Instant::now() < until, "node B never joined the group");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Entries flow in chunks from a backend thread.
    let port = redis.port;
    let writer = std::thread::spawn(move || {
        let cli = |lines: String| {
            use std::io::Write;
            let mut child = std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-cli");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(lines.as_bytes())
                .unwrap();
            child.wait().unwrap();
        };
        for chunk in 0..N / 50 {
            // One transaction per chunk: a blocked reader gets it whole.
            let lines = ingest_lines(CH, chunk * 50..(chunk + 1) * 50);
            cli(format!("MULTI\n{lines}EXEC\n"));
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    let want: HashSet<Vec<u8>> = payloads("e", N).into_iter().collect();
    // Receive a third, then kill B while entries keep flowing.
    let mut got: HashSet<Vec<u8>> = HashSet::new();
    let mut last: Option<(u64, u64)> = None;
    let mut killed = None;
    while got.len() < N {
        let (_, epoch, offset, payload) = sub.publication().await;
        if let Some((e, o)) = last {
            assert_eq!((epoch, offset), (e, o + 1), "gap or duplicate offset");
        }
        last = Some((epoch, offset));
        assert!(want.contains(&payload), "unexpected payload");
        assert!(
            got.insert(payload.clone()),
            "{:?} delivered twice",
            String::from_utf8_lossy(&payload)
        );
        if killed.is_none() && got.len() >= N / 3 {
            killed = Some(kill_holding_entries(&b, &redis, "node-b").await);
        }
    }
    writer.join().unwrap();
    let left_on_b = killed.expect("B was killed");
    let mut publisher = Client::connect(a.addr).await;
    assert_nothing_more(&mut publisher, &mut [&mut sub], CH).await;
    let until = Instant::now() + WAIT;
    while pending(&redis) != 0 {
        assert!(Instant::now() < until, "entries left pending");
        std::thread::sleep(Duration::from_millis(50));
    }
    let claimed = metric(&a, "shardcast_redis_ingest_claimed_total");
    println!(
        "ingest: node B held {left_on_b} pending entries when killed; node A claimed {claimed}"
    );
    assert!(left_on_b > 0, "node B was never caught holding entries");
    assert!(
        claimed as usize >= left_on_b,
        "B's pending entries were taken over"
    );
}

// ---------------------------------------------------------------------------
// 7. Idempotent publishes across nodes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_retried_with_the_same_key_on_another_node_is_stored_once() {
    const CH: &str = "idem";
    let redis = RedisServer::start(false);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut sub_a = Client::connect(a.addr).await;
    let mut sub_b = Client::connect(b.addr).await;
    sub_a.subscribe(CH).await;
    sub_b.subscribe(CH).await;
    let mut pa = Client::connect(a.addr).await;
    let mut pb = Client::connect(b.addr).await;

    let first = publish_keyed(&mut pa, CH, b"once", "key-1").await;
    let retry = publish_keyed(&mut pb, CH, b"once", "key-1").await;
    assert_eq!(
        retry, first,
        "the retry is acknowledged with the stored position"
    );
    // And again on A, even with another payload: still stored once.
    assert_eq!(publish_keyed(&mut pa, CH, b"other", "key-1").await, first);

    // Both at the same time on both nodes.
    let id_a = pa
        .request(|e, id| e.publish(id, CH, b"twice", Some("key-2")))
        .await;
    let id_b = pb
        .request(|e, id| e.publish(id, CH, b"twice", Some("key-2")))
        .await;
    let ack = |m: ServerMessage| match m {
        ServerMessage::PublishAck { position, .. } => position,
        other => panic!("expected PublishAck, got {other:?}"),
    };
    let second_a = ack(pa.reply(id_a).await);
    let second_b = ack(pb.reply(id_b).await);
    assert_eq!(second_a, second_b, "concurrent retries store once");
    assert_eq!(second_a.offset, first.offset + 1);

    for s in [&mut sub_a, &mut sub_b] {
        let got = receive(s, CH, 2).await;
        assert_exactly(
            &got,
            &[first, second_a],
            &[b"once".to_vec(), b"twice".to_vec()],
            "subscriber",
        );
    }
    assert_nothing_more(&mut pa, &mut [&mut sub_a, &mut sub_b], CH).await;
    // The history holds it once too.
    let mut late = Client::connect(b.addr).await;
    let before = Position {
        epoch: first.epoch,
        offset: first.offset - 1,
    };
    let (_, recovered) = late.subscribe_from(CH, Some(before)).await;
    assert!(recovered);
    let got = receive(&mut late, CH, 3).await;
    assert_eq!(
        got.iter().map(|x| (x.1, x.2.clone())).collect::<Vec<_>>(),
        [
            (first.offset, b"once".to_vec()),
            (first.offset + 1, b"twice".to_vec()),
            (first.offset + 2, b"marker".to_vec())
        ]
    );
}

// ---------------------------------------------------------------------------
// More Redis trouble: a dropped Pub/Sub connection, requests while Redis is
// down, trimmed and expired history, everything lost.

/// Waits until at least `want` connections are subscribed (the nodes
/// reconnected after an earlier kill), then kills every subscribed
/// connection; returns how many Redis reports killed. If `want` are not
/// subscribed within `WAIT`, panics with what it saw: the count, the full
/// `CLIENT LIST`, whether each node is running and whose Redis answers.
fn kill_pubsub_connections(redis: &RedisServer, nodes: &mut [&mut Server], want: usize) -> usize {
    let until = Instant::now() + WAIT;
    let ids = loop {
        let list = redis.cli_checked(&["CLIENT", "LIST"]);
        let ids = subscribed_ids(&list);
        if ids.len() >= want {
            break ids;
        }
        if Instant::now() >= until {
            no_subscribed_connections(redis, nodes, want, ids.len(), &list);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    ids.iter().map(|id| kill_client(redis, id)).sum()
}

/// The ids of the `CLIENT LIST` connections subscribed to a channel.
fn subscribed_ids(list: &str) -> Vec<String> {
    list.lines()
        .filter(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("sub="))
                .is_some_and(|n| n != "0")
        })
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("id="))
                .map(str::to_string)
        })
        .collect()
}

/// `CLIENT KILL ID`; how many it killed (0 if the connection was gone).
fn kill_client(redis: &RedisServer, id: &str) -> usize {
    let out = redis.cli_checked(&["CLIENT", "KILL", "ID", id]);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("CLIENT KILL ID {id} answered {out:?}"))
}

/// The failure report of `kill_pubsub_connections`.
fn no_subscribed_connections(
    redis: &RedisServer,
    nodes: &mut [&mut Server],
    want: usize,
    found: usize,
    list: &str,
) -> ! {
    let nodes: Vec<String> = nodes
        .iter_mut()
        .map(|n| {
            let state = if n.is_running() { "running" } else { "exited" };
            format!("pid {} {state}", n.pid())
        })
        .collect();
    panic!(
        "{found} of {want} Pub/Sub connections subscribed after {WAIT:?}; \
         nodes: {}; redis-server pid {:?}, answering on port {}: pid {:?}\n\
         CLIENT LIST:\n{list}",
        nodes.join(", "),
        redis.child_pid(),
        redis.port,
        redis.serving_pid()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pubsub_connection_is_caught_up_from_the_stream() {
    const CH: &str = "pubsub-drop";
    let redis = RedisServer::start(false);
    let mut a = node(&redis, &[]);
    let mut b = node(&redis, &[]);
    let mut subs = common::clients_on_both_shards(b.addr, 1).await;
    subs.push(Client::connect(a.addr).await);
    for s in subs.iter_mut() {
        s.subscribe(CH).await;
    }
    let mut publisher = Client::connect(a.addr).await;
    let mut sent = Vec::new();
    let mut acks = Vec::new();
    for round in 0..10 {
        let batch = payloads(&format!("r{round}"), 50);
        acks.extend(publish_all(&mut publisher, CH, &batch).await);
        sent.extend(batch);
        if round % 3 == 1 {
            // Every node's Pub/Sub connections go (B's two shards and
            // A's one); publications go on.
            let killed = kill_pubsub_connections(&redis, &mut [&mut a, &mut b], 3);
            assert!(killed >= 3, "{killed} Pub/Sub connections killed");
        }
    }
    for s in subs.iter_mut() {
        let got = receive(s, CH, sent.len()).await;
        assert_exactly(
            &got,
            &acks,
            &sent,
            &format!("subscriber {:#x}", s.client_id),
        );
    }
    assert_nothing_more(&mut publisher, &mut subs.iter_mut().collect::<Vec<_>>(), CH).await;
    let catch_ups = metric(&b, "shardcast_redis_catch_ups_total");
    let reconnects = metric(&b, "shardcast_redis_reconnects_total");
    println!("node B: {reconnects} Pub/Sub reconnects, {catch_ups} catch-up reads");
    assert!(
        reconnects >= 3 && catch_ups >= 3,
        "the gap-fill path was taken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_requests_fail_fast_clients_stay_and_a_keyed_retry_is_stored_once() {
    const CH: &str = "outage";
    let mut redis = RedisServer::start(true);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut watcher = Client::connect(b.addr).await;
    let (p0, _) = watcher.subscribe_from(CH, None).await;
    let mut publisher = Client::connect(a.addr).await;
    let before = publisher.publish(CH, b"before").await;
    // Node b has delivered it before Redis goes: its live position is
    // `before`, which the recovering subscribe below starts from.
    let got = receive(&mut watcher, CH, 1).await;
    assert_exactly(&got, &[before], &[b"before".to_vec()], "watcher");

    redis.kill();
    // A keyed publish fails fast (it may or may not have been stored).
    let bound = Duration::from_secs(5);
    let out = publish_within(&mut publisher, CH, b"keyed", Some("retry-me"), bound).await;
    assert!(
        matches!(&out, Outcome::Error(code, _) if *code == ErrorCode::Unavailable as u16),
        "{out:?}"
    );
    // Several publishes in flight on one shard: each fails within
    // redis.command_timeout_ms (1 s) of reaching the server, not after the
    // ones queued ahead of it (they waited 2.0-2.6 s before).
    let mut sent = BTreeMap::new();
    for i in 0..5u8 {
        let id = publisher.publish_nowait("outage-burst", &[i]).await;
        sent.insert(id, Instant::now());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while !sent.is_empty() {
        let (id, m) = tokio::time::timeout(bound, publisher.next())
            .await
            .expect("every publish is answered");
        let Some(at) = sent.remove(&id) else {
            continue;
        };
        let took = at.elapsed();
        assert!(
            matches!(&m, ServerMessage::Error { code, .. } if *code == ErrorCode::Unavailable as u16),
            "{m:?}"
        );
        // 1 s, plus slack for a loaded machine; far below the 2 s it took.
        assert!(
            took < Duration::from_millis(1500),
            "a publish failed {took:?} after it was sent; redis.command_timeout_ms is 1 s"
        );
    }
    // README: a subscribe to a channel the node does not follow yet is held
    // while Redis is down, and answered once it is back; a subscribe whose
    // position is the node's live one needs no history and is answered now
    // (on the watcher's shard, which follows CH).
    let mut newcomer = connect_on_shard(b.addr, "", watcher.shard, false).await;
    let plain = newcomer
        .request(|e, id| e.subscribe(id, "elsewhere", None))
        .await;
    let recovering = newcomer
        .request(|e, id| e.subscribe(id, CH, Some(before)))
        .await;
    match newcomer.reply(recovering).await {
        ServerMessage::Subscribed {
            position,
            recovered,
            ..
        } => {
            assert!(recovered);
            assert_eq!(position, before);
        }
        other => panic!("subscribe from the live position: {other:?}"),
    }
    let held = tokio::time::timeout(Duration::from_secs(2), newcomer.next()).await;
    assert!(
        held.is_err(),
        "a subscribe during the outage must be held, got {held:?}"
    );
    // Connected clients stay connected.
    for c in [&mut watcher, &mut publisher] {
        let id = c.request(|e, id| e.ping(id)).await;
        assert!(matches!(c.reply(id).await, ServerMessage::Pong));
    }

    redis.restart();
    // The held subscribe is answered once Redis is back.
    match newcomer.reply(plain).await {
        ServerMessage::Subscribed { recovered, .. } => assert!(!recovered),
        other => panic!("the held subscribe: {other:?}"),
    }
    // The retry (same key) until Redis is back: stored once.
    let keyed = publish_keyed_once_back(&mut publisher, CH, b"keyed", "retry-me").await;
    assert_eq!(keyed.epoch, p0.epoch);
    assert_eq!(keyed.offset, before.offset + 1, "stored once, right after");
    let again = publish_within(&mut publisher, CH, b"keyed", Some("retry-me"), bound).await;
    assert_eq!(again, Outcome::Ack(keyed));
    let got = receive(&mut watcher, CH, 1).await;
    assert_exactly(&got, &[keyed], &[b"keyed".to_vec()], "watcher");
    let marker = {
        tokio::time::sleep(Duration::from_millis(300)).await;
        publisher.publish(CH, b"marker").await
    };
    let got = receive(&mut watcher, CH, 1).await;
    assert_exactly(&got, &[marker], &[b"marker".to_vec()], "watcher");
    // The newcomer gets what it subscribed to: on CH everything after
    // `before`, on the other channel a publication made now.
    let hello = publisher.publish("elsewhere", b"hello").await;
    let mut want: Vec<(String, u64, Vec<u8>)> = vec![
        (CH.into(), keyed.offset, b"keyed".to_vec()),
        (CH.into(), marker.offset, b"marker".to_vec()),
        ("elsewhere".into(), hello.offset, b"hello".to_vec()),
    ];
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let (ch, _, offset, payload) = newcomer.publication().await;
        got.push((ch, offset, payload));
    }
    got.sort();
    want.sort();
    assert_eq!(got, want, "what the newcomer received");
}

/// Redis comes back with less than it acknowledged (restarted from an
/// older snapshot): the lost offsets are never given again. The channel
/// continues under a new epoch, live subscribers get the new publications
/// in it, and recovery from a lost position answers `recovered = false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_from_an_older_snapshot_never_reuses_a_position() {
    const CH: &str = "rollback";
    let mut redis = RedisServer::start(false);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut watch_a = Client::connect(a.addr).await;
    let mut watch_b = Client::connect(b.addr).await;
    let (p0, _) = watch_a.subscribe_from(CH, None).await;
    watch_b.subscribe_from(CH, None).await;
    let mut publisher = Client::connect(a.addr).await;
    let first = payloads("kept", 10);
    let kept = publish_all(&mut publisher, CH, &first).await;
    assert_eq!(redis.cli_checked(&["SAVE"]).trim(), "OK");
    let second = payloads("lost", 5);
    let lost = publish_all(&mut publisher, CH, &second).await;
    let all_acks: Vec<Position> = kept.iter().chain(&lost).copied().collect();
    let all_sent: Vec<Vec<u8>> = first.iter().chain(&second).cloned().collect();
    for (w, who) in [(&mut watch_a, "a"), (&mut watch_b, "b")] {
        let got = receive(w, CH, 15).await;
        assert_exactly(&got, &all_acks, &all_sent, who);
    }
    let last_lost = *lost.last().unwrap();
    assert_eq!(last_lost.offset, p0.offset + 15);

    // SIGKILL, and back from the snapshot taken after the 10th.
    redis.kill();
    redis.restart();
    let third = payloads("after", 5);
    let mut after = Vec::new();
    for (i, p) in third.iter().enumerate() {
        let key = format!("after-{i}");
        after.push(publish_keyed_once_back(&mut publisher, CH, p, &key).await);
    }
    let new_epoch = after[0].epoch;
    assert_ne!(
        new_epoch, p0.epoch,
        "offsets 11-15 of the old epoch were given away"
    );
    assert_eq!(
        after
            .iter()
            .map(|p| (p.epoch, p.offset))
            .collect::<Vec<_>>(),
        (1..=5).map(|o| (new_epoch, o)).collect::<Vec<_>>()
    );
    // Live subscribers on both nodes see the new epoch's publications.
    for (w, who) in [(&mut watch_a, "a"), (&mut watch_b, "b")] {
        let got = receive(w, CH, 5).await;
        assert_exactly(&got, &after, &third, who);
    }
    // Recovery from a position in the lost tail, or in the kept part, of
    // the old epoch is not recovered: never a silent gap.
    for from in [last_lost, kept[9]] {
        let mut c = Client::connect(b.addr).await;
        let (at, recovered) = c.subscribe_from(CH, Some(from)).await;
        assert!(!recovered, "recovered from {from:?} after the rollback");
        assert_eq!(at, *after.last().unwrap());
    }
}

/// Publishes 3 on `ch`, snapshots Redis, publishes 2 more (the `watcher`
/// sees all 5), then SIGKILLs Redis and restarts it from the snapshot: the
/// last 2 acknowledged publications are lost. Returns the last one's
/// position.
async fn roll_back(
    redis: &mut RedisServer,
    publisher: &mut Client,
    watcher: &mut Client,
    ch: &str,
) -> Position {
    publish_all(publisher, ch, &payloads("kept", 3)).await;
    assert_eq!(redis.cli_checked(&["SAVE"]).trim(), "OK");
    let lost = publish_all(publisher, ch, &payloads("lost", 2)).await;
    receive(watcher, ch, 5).await;
    redis.kill();
    redis.restart();
    *lost.last().unwrap()
}

/// The same loss with no publish afterwards: the subscribed nodes notice it
/// when they catch up after reconnecting, so a resubscribe from the lost
/// tail is answered `recovered = false` at once, and the next publication
/// opens the new epoch at offset 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_is_noticed_by_subscribed_nodes_without_a_publish() {
    const CH: &str = "rollback-quiet";
    let mut redis = RedisServer::start(false);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut watch_b = Client::connect(b.addr).await;
    watch_b.subscribe_from(CH, None).await;
    let mut publisher = Client::connect(a.addr).await;
    let lost = roll_back(&mut redis, &mut publisher, &mut watch_b, CH).await;
    // Node b's shards hear of the new epoch asynchronously (after their
    // Pub/Sub reconnect and catch-up): wait until a resubscribe from the
    // lost tail is answered not-recovered on every shard.
    let from = lost;
    let until = Instant::now() + WAIT;
    for shard in 0..2 {
        loop {
            let mut c = connect_on_shard(b.addr, "", shard, false).await;
            let (at, recovered) = c.subscribe_from(CH, Some(from)).await;
            // A shard that opened the channel before the node's catch-up
            // noticed the rollback still sees the old epoch (and answers
            // not-recovered once the 5 s wait for the position ends): not
            // yet what is checked.
            if !recovered && at.epoch != from.epoch {
                assert_eq!(at.offset, 0);
                break;
            }
            assert!(
                Instant::now() < until,
                "shard {shard} never noticed the rollback"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let next = publisher.publish(CH, b"next").await;
    assert_ne!(next.epoch, from.epoch);
    assert_eq!(next.offset, 1);
}

/// After a rollback, a shard that never saw the channel (no subscriber
/// there, no publish of its own) still does not reuse a lost position: it
/// brings what another shard of its node saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_never_saw_the_channel_does_not_reuse_a_lost_position() {
    const CH: &str = "rollback-other-shard";
    let mut redis = RedisServer::start(false);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut watcher = connect_on_shard(b.addr, "", 0, false).await;
    watcher.subscribe_from(CH, None).await;
    let mut publisher = Client::connect(a.addr).await;
    let last = roll_back(&mut redis, &mut publisher, &mut watcher, CH).await;
    // Node b's shard 1 publishes as soon as Redis answers.
    let mut other = connect_on_shard(b.addr, "", 1, false).await;
    let pos = publish_keyed_once_back(&mut other, CH, b"next", "next").await;
    assert_ne!(
        pos.epoch, last.epoch,
        "offset {} of the old epoch was given again",
        pos.offset
    );
    assert_eq!(pos.offset, 1);
}

/// Redis at `maxmemory` with `noeviction` refuses the publish script: the
/// publisher gets `Error Unavailable` with Redis' reason, never an ack, and
/// subscribers get nothing for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_redis_refuses_for_memory_fails_and_is_not_delivered() {
    const CH: &str = "full";
    let redis = RedisServer::start(false);
    let used: u64 = redis
        .cli_checked(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory");
    let limit = (used + (4 << 20)).to_string();
    assert_eq!(
        redis
            .cli_checked(&["CONFIG", "SET", "maxmemory", &limit])
            .trim(),
        "OK"
    );
    assert_eq!(
        redis
            .cli_checked(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
            .trim(),
        "OK"
    );
    let a = node(&redis, &["--history-size", "100000"]);
    let mut watcher = Client::connect(a.addr).await;
    watcher.subscribe_from(CH, None).await;
    let mut publisher = Client::connect(a.addr).await;
    let mut acked = Vec::new();
    let mut sent = Vec::new();
    let refused = loop {
        assert!(acked.len() < 1000, "64 MB stored under a 4 MB maxmemory");
        let mut p = vec![b'm'; 60 << 10];
        p[..8].copy_from_slice(&(acked.len() as u64).to_be_bytes());
        match publish_within(&mut publisher, CH, &p, None, WAIT).await {
            Outcome::Ack(pos) => {
                acked.push(pos);
                sent.push(p);
            }
            Outcome::Error(code, message) => break (code, message),
        }
    };
    assert_eq!(refused.0, ErrorCode::Unavailable as u16, "{}", refused.1);
    assert!(refused.1.contains("OOM"), "Redis' reason: {}", refused.1);
    // The watcher gets exactly the acknowledged ones, and nothing after.
    let got = receive(&mut watcher, CH, acked.len()).await;
    assert_exactly(&got, &acked, &sent, "watcher");
    let more = tokio::time::timeout(Duration::from_millis(500), watcher.publication()).await;
    assert!(more.is_err(), "a refused publish was delivered: {more:?}");
}

/// `redis.wait_replicas`: a publish is acknowledged only once that many
/// replicas confirmed it; without them it fails with `Unavailable`, saying
/// it may still be kept, and a retry with the same key after the replica
/// caught up is acknowledged at the same position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_a_publish_is_acked_only_once_replicated() {
    const CH: &str = "replicated";
    let primary = RedisServer::start(false);
    let a = node(&primary, &["--redis-wait-replicas", "1"]);
    let mut publisher = Client::connect(a.addr).await;
    // No replica yet: not confirmed within the command timeout.
    let out = publish_within(&mut publisher, CH, b"one", Some("k1"), WAIT).await;
    match &out {
        Outcome::Error(code, message) => {
            assert_eq!(*code, ErrorCode::Unavailable as u16);
            assert!(message.contains("replicas"), "{message}");
        }
        other => panic!("acknowledged without a replica: {other:?}"),
    }
    // A replica joins; once it is in sync the retry is confirmed, stored once.
    let replica = RedisServer::start(false);
    let port = primary.port.to_string();
    assert_eq!(
        replica
            .cli_checked(&["REPLICAOF", "127.0.0.1", &port])
            .trim(),
        "OK"
    );
    wait_until("the replica in sync", WAIT, || {
        primary
            .cli_checked(&["INFO", "replication"])
            .lines()
            .any(|l| l.starts_with("slave0:") && l.contains("state=online"))
    })
    .await;
    let retried = publish_within(&mut publisher, CH, b"one", Some("k1"), WAIT).await;
    let Outcome::Ack(first) = retried else {
        panic!("not acknowledged with a replica in sync: {retried:?}");
    };
    assert_eq!(
        first.offset, 1,
        "the first try was stored; the retry is that publish"
    );
    let second = publisher.publish(CH, b"two").await;
    assert_eq!((second.epoch, second.offset), (first.epoch, 2));
    // The replica has both.
    let len = replica.cli_checked(&["XLEN", &format!("sc:{{{CH}}}:s")]);
    assert_eq!(len.trim(), "2", "stream on the replica");
}

/// Through Redis too, a catch-up is read a page (about one outbound
/// budget) at a time as the client's socket drains: idle recovering
/// clients do not make the node hold the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_through_redis_is_read_as_the_socket_drains() {
    let redis = RedisServer::start(false);
    let mut args = vec!["--server-shards", "1"];
    args.extend_from_slice(&common::PACED_CATCH_UP);
    let a = node(&redis, &args);
    common::check_paced_catch_up(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_or_expired_history_is_not_recovered() {
    let redis = RedisServer::start(false);
    let a = node(&redis, &["--history-size", "10", "--history-ttl-secs", "1"]);
    let b = node(&redis, &["--history-size", "10", "--history-ttl-secs", "1"]);
    let mut publisher = Client::connect(a.addr).await;

    // Trimmed: 500 publications, 10 kept (about: Redis trims whole nodes).
    let sent = payloads("trim", 500);
    let acks = publish_all(&mut publisher, "trimmed", &sent).await;
    let mut c = Client::connect(b.addr).await;
    let (pos, recovered) = c.subscribe_from("trimmed", Some(acks[0])).await;
    assert!(!recovered, "offset {} was trimmed away", acks[0].offset);
    assert_eq!(pos.epoch, acks[0].epoch, "same epoch, later position");
    assert!(pos.offset >= acks[499].offset, "{pos:?}");
    // The newest ones are still there.
    let mut c = Client::connect(b.addr).await;
    let (_, recovered) = c.subscribe_from("trimmed", Some(acks[494])).await;
    assert!(recovered);
    let got = receive(&mut c, "trimmed", 5).await;
    assert_exactly(&got, &acks[495..], &sent[495..], "recent history");

    // Expired: a second without publications and the history is gone.
    let old = publisher.publish("expiring", b"soon gone").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut c = Client::connect(b.addr).await;
    let (pos, recovered) = c.subscribe_from("expiring", Some(old)).await;
    assert!(!recovered, "expired history cannot be recovered");
    assert_ne!(
        pos.epoch, old.epoch,
        "a new epoch after the history expired"
    );
    let next = publisher.publish("expiring", b"new").await;
    assert_eq!(next.epoch, pos.epoch);
    let got = receive(&mut c, "expiring", 1).await;
    assert_exactly(&got, &[next], &[b"new".to_vec()], "after expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_lost_everything_presence_comes_back_and_ingest_resumes() {
    let mut redis = RedisServer::start(false);
    let a = auth_node(&redis, &[]);
    let b = auth_node(&redis, &[]);
    let alice = token(json!({"sub": "alice", "channels": ["presence-*", "feed"]}));
    let bob = token(json!({"sub": "bob", "channels": [ROOM]}));
    let mut alice_a = connect_token(&a, &alice).await;
    let mut bob_b = connect_token(&b, &bob).await;
    alice_a.subscribe(ROOM).await;
    expect_events(&mut alice_a, &["+alice"]).await;
    bob_b.subscribe(ROOM).await;
    expect_events(&mut alice_a, &["+bob"]).await;
    let mut feed = connect_token(&a, &alice).await;
    feed.subscribe("feed").await;

    redis.restart_empty();
    let restarted = Instant::now();
    for c in [&mut alice_a, &mut bob_b] {
        loop {
            let id = c.request(|e, id| e.presence_query(id, ROOM)).await;
            match c.reply(id).await {
                ServerMessage::PresenceMembers { users, .. } if users == ["alice", "bob"] => break,
                ServerMessage::PresenceMembers { .. } | ServerMessage::Error { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(22),
                "presence did not come back after Redis lost it"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    println!(
        "presence back {:?} after Redis restarted empty",
        restarted.elapsed()
    );

    // Ingest: the group is gone with everything else; new entries are
    // still executed, once.
    redis.cli_batch(&ingest_lines("feed", 0..20));
    let want: HashSet<Vec<u8>> = payloads("e", 20).into_iter().collect();
    receive_set(&mut feed, "feed", &want).await;
}
