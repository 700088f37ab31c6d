//! Presence channels against the real binary: a user with several
//! connections, on either shard, is one member; joins are announced for
//! its first connection and leaves for its last; every connection reads
//! the same member list.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{connect_on_shard, try_connect, Client, Server};
use serde_json::json;
use shardcast::auth::jwt::mint;
use shardcast::protocol::wire::{ErrorCode, ServerMessage};

const SECRET: &str = "presence-test-secret-of-at-least-32-bytes";
const ROOM: &str = "presence-room";

fn server() -> Server {
    Server::start(&["--auth-anonymous", "false", "--auth-hs256-secret", SECRET])
}

fn token(user: &str, channels: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    mint::hs256(
        SECRET.as_bytes(),
        &json!({"sub": user, "exp": exp, "channels": channels}),
    )
}

/// The next presence changes and publications on ROOM are `want` (see
/// [`common::next_channel_event`]).
async fn expect_events(c: &mut Client, want: &[&str]) {
    common::expect_channel_events(c, ROOM, want).await
}

/// Answer to a PresenceQuery: the member list, or the error code.
async fn query(c: &mut Client, channel: &str) -> Result<Vec<String>, u16> {
    let ch = channel.to_string();
    let id = c.request(|e, id| e.presence_query(id, &ch)).await;
    match c.reply(id).await {
        ServerMessage::PresenceMembers {
            channel: got,
            users,
        } => {
            assert_eq!(got, channel);
            Ok(users)
        }
        ServerMessage::Error { code, .. } => Err(code),
        other => panic!("expected PresenceMembers, got {other:?}"),
    }
}

async fn members(c: &mut Client) -> Vec<String> {
    query(c, ROOM).await.expect("member list")
}

/// A publication from `c` on the room, awaited through its ack: a marker
/// that orders what came before it in every subscriber's stream.
async fn mark(c: &mut Client, text: &str) {
    c.publish(ROOM, text.as_bytes()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_per_user_across_shards() {
    let s = server();
    let alice = token("alice", &["presence-*"]);
    let bob = token("bob", &[ROOM]);
    // alice on both shards, bob on shard 0 (next to alice's first).
    let mut a0 = connect_on_shard(s.addr, &alice, 0, false).await;
    let mut a1 = connect_on_shard(s.addr, &alice, 1, false).await;
    let mut b0 = connect_on_shard(s.addr, &bob, 0, false).await;

    a0.subscribe(ROOM).await;
    expect_events(&mut a0, &["+alice"]).await;
    assert_eq!(members(&mut a0).await, ["alice"]);

    // alice's second connection (other shard): no second join.
    a1.subscribe(ROOM).await;
    assert_eq!(members(&mut a1).await, ["alice"]);
    b0.subscribe(ROOM).await;
    expect_events(&mut a0, &["+bob"]).await;
    expect_events(&mut a1, &["+bob"]).await;
    expect_events(&mut b0, &["+bob"]).await;
    for c in [&mut a0, &mut a1, &mut b0] {
        assert_eq!(members(c).await, ["alice", "bob"], "from shard {}", c.shard);
    }

    // alice closes one connection: she is still present, nobody is told
    // otherwise. (A graceful close; the server detaches it before it
    // answers the close, and bob's marker then comes from the same shard.)
    a0.ws.close(None).await.unwrap();
    while a0.next_or_close().await.is_ok() {}
    mark(&mut b0, "after a0 closed").await;
    expect_events(&mut a1, &["pub:after a0 closed"]).await;
    expect_events(&mut b0, &["pub:after a0 closed"]).await;
    assert_eq!(members(&mut a1).await, ["alice", "bob"]);
    assert_eq!(members(&mut b0).await, ["alice", "bob"]);

    // Her last connection goes away without a close handshake.
    drop(a1);
    expect_events(&mut b0, &["-alice"]).await;
    assert_eq!(members(&mut b0).await, ["bob"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_the_last_connection_leaves() {
    let s = server();
    let alice = token("alice", &[ROOM]);
    let bob = token("bob", &[ROOM]);
    let mut b = connect_on_shard(s.addr, &bob, 1, false).await;
    b.subscribe(ROOM).await;
    expect_events(&mut b, &["+bob"]).await;
    let mut a0 = connect_on_shard(s.addr, &alice, 0, false).await;
    let mut a1 = connect_on_shard(s.addr, &alice, 1, false).await;
    a0.subscribe(ROOM).await;
    a1.subscribe(ROOM).await;
    expect_events(&mut b, &["+alice"]).await;

    // One of alice's connections unsubscribes: still a member. The marker
    // comes from a0's shard, after its unsubscribe was answered.
    let id = a0.request(|e, id| e.unsubscribe(id, ROOM)).await;
    assert!(matches!(
        a0.reply(id).await,
        ServerMessage::Unsubscribed { .. }
    ));
    assert_eq!(
        query(&mut a0, ROOM).await,
        Err(ErrorCode::NotSubscribed.as_u16())
    );
    mark(&mut a0, "one left").await;
    expect_events(&mut b, &["pub:one left"]).await;
    assert_eq!(members(&mut b).await, ["alice", "bob"]);

    // The other one too: now she has left, and she can come back.
    let id = a1.request(|e, id| e.unsubscribe(id, ROOM)).await;
    a1.reply(id).await;
    expect_events(&mut b, &["-alice"]).await;
    assert_eq!(members(&mut b).await, ["bob"]);
    a0.subscribe(ROOM).await;
    expect_events(&mut b, &["+alice"]).await;
    expect_events(&mut a0, &["+alice"]).await;
    assert_eq!(members(&mut a0).await, ["alice", "bob"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_publications_keep_one_order() {
    let s = server();
    let alice = token("alice", &[ROOM]);
    let bob = token("bob", &[ROOM]);
    // The watcher and the publisher on different shards from alice.
    let mut w = connect_on_shard(s.addr, &bob, 1, false).await;
    w.subscribe(ROOM).await;
    expect_events(&mut w, &["+bob"]).await;
    let mut a = connect_on_shard(s.addr, &alice, 0, false).await;
    // alice publishes, joins, publishes, leaves and publishes, all in one
    // frame: her shard hands them to the channel's owner in this order.
    let frame = {
        use shardcast::protocol::wire::{ClientEncoder, ClientRequest};
        let mut e = ClientEncoder::new();
        let publish = |payload: &'static [u8]| ClientRequest::Publish {
            channel: ROOM,
            payload,
            idempotency_key: None,
        };
        e.frame(&[
            (101, publish(b"1")),
            (
                102,
                ClientRequest::Subscribe {
                    channel: ROOM,
                    recover: None,
                },
            ),
            (103, publish(b"2")),
            (104, ClientRequest::Unsubscribe { channel: ROOM }),
            (105, publish(b"3")),
        ])
    };
    a.send_raw(frame).await;
    expect_events(&mut w, &["pub:1", "+alice", "pub:2", "-alice", "pub:3"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_subscribers_get_presence_events() {
    let s = server();
    let alice = token("alice", &[ROOM]);
    let bob = token("bob", &[ROOM]);
    let mut plain = connect_on_shard(s.addr, &bob, 0, false).await;
    let mut z = connect_on_shard(s.addr, &alice, 0, true).await;
    plain.subscribe(ROOM).await;
    expect_events(&mut plain, &["+bob"]).await;
    z.subscribe(ROOM).await;
    expect_events(&mut z, &["+alice"]).await;
    expect_events(&mut plain, &["+alice"]).await;
    assert_eq!(members(&mut z).await, ["alice", "bob"]);
    assert!(z.zstd.as_ref().unwrap().received.iter().sum::<usize>() > 0);
}

#[tokio::test]
async fn queries_need_permission_a_subscription_and_a_presence_channel() {
    let s = server();
    let mut nobody = try_connect(s.addr, Some(&token("mallory", &[])))
        .await
        .unwrap();
    let id = nobody.request(|e, id| e.subscribe(id, ROOM, None)).await;
    assert!(matches!(
        nobody.reply(id).await,
        ServerMessage::Error { code, .. } if code == ErrorCode::Unauthorized.as_u16()
    ));
    assert_eq!(
        query(&mut nobody, ROOM).await,
        Err(ErrorCode::Unauthorized.as_u16())
    );
    let mut bob = try_connect(s.addr, Some(&token("bob", &["presence-*"])))
        .await
        .unwrap();
    assert_eq!(
        query(&mut bob, ROOM).await,
        Err(ErrorCode::NotSubscribed.as_u16())
    );
    bob.subscribe("news").await;
    assert_eq!(
        query(&mut bob, "news").await,
        Err(ErrorCode::InvalidChannel.as_u16())
    );
    assert_eq!(
        query(&mut bob, "presence room").await,
        Err(ErrorCode::InvalidChannel.as_u16())
    );
    bob.subscribe(ROOM).await;
    assert_eq!(members(&mut bob).await, ["bob"]);
}

/// A member list larger than the asking connection's outbound budget is
/// refused with `PayloadTooLarge`, never queued past the budget (README,
/// "Memory per connection"); a smaller one is answered in full.
#[tokio::test]
async fn a_member_list_over_the_outbound_budget_is_refused() {
    let s = Server::start(&[
        "--auth-anonymous",
        "false",
        "--auth-hs256-secret",
        SECRET,
        "--fanout-outbound-budget-bytes",
        "4096",
    ]);
    // 40 users with 150-byte ids: about 6 KB of member list.
    let mut conns = Vec::new();
    let mut users = Vec::new();
    for i in 0..40 {
        let user = format!("{i:03}{}", "u".repeat(147));
        let mut c = try_connect(s.addr, Some(&token(&user, &[ROOM])))
            .await
            .unwrap();
        c.subscribe(ROOM).await;
        users.push(user);
        conns.push(c);
        if i == 19 {
            // 20 users, about 3 KB: within the budget.
            let asker = conns.last_mut().unwrap();
            assert_eq!(members(asker).await, users);
        }
    }
    let asker = conns.last_mut().unwrap();
    assert_eq!(
        query(asker, ROOM).await,
        Err(ErrorCode::PayloadTooLarge.as_u16())
    );
    // The connection is fine afterwards.
    let id = asker.request(|e, id| e.ping(id)).await;
    assert!(matches!(asker.reply(id).await, ServerMessage::Pong));
}
