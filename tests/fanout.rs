//! Fan-out on the local bus: cross-shard delivery, per-channel order with
//! offsets, many subscribers receiving the same broadcasts.

mod common;

use common::{clients_on_both_shards, Client, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_delivery_keeps_per_channel_order() {
    cross_shard_order(&[]).await;
}

/// Without a tick pause, ticks follow each other as soon as there is work
/// (the dispatcher requeues itself behind the readers): same guarantees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_delivery_keeps_per_channel_order_without_a_tick_pause() {
    cross_shard_order(&["--fanout-tick-pause-ms", "0"]).await;
}

async fn cross_shard_order(extra: &[&str]) {
    let mut args = common::BULK_PUBLISHER.to_vec();
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    // Two subscribers and two publishers, with both shards represented.
    let mut clients = clients_on_both_shards(server.addr, 2).await;
    clients.sort_by_key(|c| c.shard);
    let mut subs = [clients.remove(0), clients.pop().unwrap()];
    let mut pubs = [clients.remove(0), clients.pop().unwrap()];
    assert_ne!(subs[0].shard, subs[1].shard);
    assert_ne!(pubs[0].shard, pubs[1].shard);

    let mut start = Vec::new();
    for s in subs.iter_mut() {
        start.push(s.subscribe("room:order").await);
    }
    assert_eq!(start[0], start[1], "both shards see the same position");

    const N: usize = 1000;
    for i in 0..N {
        let p = &mut pubs[i % 2];
        let body = format!("{}:{}", i % 2, i / 2);
        p.publish_nowait("room:order", body.as_bytes()).await;
    }
    // Every publish is acknowledged with a distinct offset.
    let mut acked = Vec::new();
    for p in pubs.iter_mut() {
        for _ in 0..N / 2 {
            match p.next().await.1 {
                shardcast::protocol::wire::ServerMessage::PublishAck { position, .. } => {
                    acked.push(position.offset)
                }
                other => panic!("expected an ack, got {other:?}"),
            }
        }
    }
    acked.sort_unstable();
    let expected: Vec<u64> = (start[0].offset + 1..=start[0].offset + N as u64).collect();
    assert_eq!(acked, expected);

    let mut seen = Vec::new();
    for s in subs.iter_mut() {
        let mut got = Vec::with_capacity(N);
        let mut next_per_publisher = [0usize; 2];
        for k in 0..N {
            let (ch, epoch, offset, payload) = s.publication().await;
            assert_eq!(ch, "room:order");
            assert_eq!(epoch, start[0].epoch);
            assert_eq!(
                offset,
                start[0].offset + 1 + k as u64,
                "offsets strictly +1"
            );
            let text = String::from_utf8(payload).unwrap();
            let (who, n) = text.split_once(':').unwrap();
            let who: usize = who.parse().unwrap();
            // Each publisher's messages arrive in the order it sent them.
            assert_eq!(n.parse::<usize>().unwrap(), next_per_publisher[who]);
            next_per_publisher[who] += 1;
            got.push(text);
        }
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1], "every shard delivers the same sequence");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_receive_a_burst() {
    let server = Server::start(&[]);
    const SUBS: usize = 1000;
    const BURST: usize = 50;
    let addr = server.addr;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(SUBS);
    let mut tasks = Vec::new();
    for _ in 0..SUBS {
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let start = c.subscribe("broadcast").await;
            ready.send(c.shard).await.unwrap();
            let mut offsets = Vec::with_capacity(BURST);
            for i in 0..BURST {
                let (_, _, offset, payload) = c.publication().await;
                assert_eq!(payload, format!("msg-{i}").into_bytes());
                offsets.push(offset - start.offset);
            }
            offsets
        }));
    }
    let mut shards = [0usize; 2];
    for _ in 0..SUBS {
        shards[ready_rx.recv().await.unwrap() as usize] += 1;
    }
    assert!(
        shards[0] > 0 && shards[1] > 0,
        "subscribers on both shards: {shards:?}"
    );
    let mut publisher = Client::connect(addr).await;
    for i in 0..BURST {
        publisher
            .publish_nowait("broadcast", format!("msg-{i}").as_bytes())
            .await;
    }
    let expected: Vec<u64> = (1..=BURST as u64).collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), expected);
    }
}
