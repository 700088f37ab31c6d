//! What a publish acknowledgement means across nodes: a retry with the
//! same idempotency key is stored once, and a publish Redis refuses (out of
//! memory) or cannot replicate (`redis.wait_replicas`) is never acknowledged.

use std::time::Duration;

use shardcast::protocol::wire::{ErrorCode, Position, ServerMessage};

use super::{
    assert_exactly, assert_nothing_more, node, publish_within, receive, wait_until, Outcome,
};
use crate::common::{Client, RedisServer, WAIT};

async fn publish_keyed(c: &mut Client, channel: &str, payload: &[u8], key: &str) -> Position {
    match publish_within(c, channel, payload, Some(key), WAIT).await {
        Outcome::Ack(p) => p,
        other => panic!("publish with key {key} failed: {other:?}"),
    }
}

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
