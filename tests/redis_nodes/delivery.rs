//! Delivery across nodes: a publication on one node reaches every
//! subscriber on every node, in order with its offsets, and a
//! user-addressed message reaches its user on whichever node it reconnects.

use serde_json::json;

use super::{
    assert_exactly, auth_node, connect_token, node, payloads, publish_all, receive, token,
};
use crate::common::{self, Client, RedisServer};

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
