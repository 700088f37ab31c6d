//! Redis outages and reconnects: Redis killed and restarted (with and
//! without persistence), down for a while, restarted empty, or dropping a
//! node's Pub/Sub connection; nothing acknowledged is lost and clients are
//! told of a new epoch.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shardcast::protocol::wire::{ErrorCode, Position, ServerMessage};

use super::{
    assert_exactly, assert_nothing_more, auth_node, connect_token, expect_events, ingest_lines,
    metric, node, payloads, publish_all, publish_keyed_once_back, publish_within, receive,
    receive_set, token, wait_until, Outcome, ROOM,
};
use crate::common::{self, connect_on_shard, Client, RedisServer, Server, WAIT};

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

/// Answers `GET path` on `addr` with (status, body), or `None` while
/// nothing listens there yet.
fn try_http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    std::net::TcpStream::connect(addr).ok()?;
    Some(common::http_get(addr, path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_redis_is_not_ready_until_redis_comes_then_serves() {
    use std::io::Read;
    use std::process::{Command, Stdio};

    let mut redis = RedisServer::reserve(false);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .arg("serve")
        .args(["--server-listen", "127.0.0.1:0", "--server-shards", "2"])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--redis-url", &redis.url()])
        .env("SHARDCAST_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardcast");
    let mut stderr = child.stderr.take().expect("stderr");
    let logs = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // The admin endpoint answers while Redis is down: alive, not ready.
    let until = Instant::now() + WAIT;
    let (status, body) = loop {
        if let Some(answer) = try_http_get(admin, "/readyz") {
            break answer;
        }
        assert!(Instant::now() < until, "the admin endpoint never answered");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((status, body.trim()), (503, "starting"));
    assert_eq!(common::http_get(admin, "/healthz").0, 200);
    // It keeps trying (several attempts in a second and a half) and stays
    // up, not ready.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "the process exited");
    assert_eq!(common::http_get(admin, "/readyz").0, 503);

    redis.start_now();
    // Then it serves: the listening line, ready, and a publish is stored.
    let (addr, _) = common::read_listening_line(&mut child);
    assert_eq!(common::http_get(admin, "/readyz").0, 200);
    let mut c = Client::connect(addr).await;
    let at = c.publish("late-redis", b"hello").await;
    assert_eq!(at.offset, 1);

    let _ = child.kill();
    let _ = child.wait();
    let logs = logs.join().expect("stderr reader");
    // Each failed attempt is one readable sentence naming the URL and the
    // operating system's reason, never a debug dump.
    let attempts: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("trying again in"))
        .collect();
    assert!(attempts.len() >= 2, "retries logged:\n{logs}");
    for l in &attempts {
        assert!(
            l.contains(&format!("redis.url {}", redis.url())) && l.contains("Connection refused"),
            "{l}"
        );
    }
    assert!(!logs.contains("Os {"), "a debug dump in the logs:\n{logs}");
}

#[test]
fn a_signal_while_waiting_for_redis_stops_the_node_at_once() {
    let redis = RedisServer::reserve(false);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .arg("serve")
        .args(["--server-listen", "127.0.0.1:0", "--admin-listen", ""])
        .args(["--redis-url", &redis.url()])
        .env("SHARDCAST_LOG_LEVEL", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn shardcast");
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let until = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "still running 5 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
}
