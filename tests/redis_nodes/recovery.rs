//! Recovery by position through the Redis streams: a client resuming on
//! either node gets exactly what it missed, then live; a catch-up is paced
//! by the socket; trimmed or expired history is not recovered.

use std::time::Duration;

use super::{assert_exactly, node, payloads, publish_all, receive};
use crate::common::{self, Client, RedisServer};

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
