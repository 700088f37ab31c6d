//! The ingest stream with its consumer group: each entry executed once
//! with two nodes consuming, even when a node is killed mid-batch.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{assert_nothing_more, ingest_lines, metric, node, payloads, receive_set};
use crate::common::{Client, RedisServer, Server, WAIT};

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
