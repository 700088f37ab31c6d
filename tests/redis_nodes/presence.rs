//! Presence across nodes: the same member list from every node, and a
//! killed node's members leave within the heartbeat window.

use std::time::{Duration, Instant};

use serde_json::json;
use shardcast::protocol::wire::ServerMessage;

use super::{auth_node, connect_token, expect_events, token, ROOM};
use crate::common::{connect_on_shard, Client, RedisServer};

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
