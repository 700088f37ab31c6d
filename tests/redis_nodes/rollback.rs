//! Redis back with less than it acknowledged (restarted from an older
//! snapshot): a lost position is never given again, the channel goes on in
//! a new epoch, and recovery into the lost one is refused.

use std::time::{Duration, Instant};

use shardcast::protocol::wire::Position;

use super::{assert_exactly, node, payloads, publish_all, publish_keyed_once_back, receive};
use crate::common::{connect_on_shard, Client, RedisServer, WAIT};

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
