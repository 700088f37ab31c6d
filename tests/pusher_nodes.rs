//! Pusher Channels across two nodes sharing one real `redis-server`, with
//! the real SDKs (issue 11): HTTP API events, presence once per user,
//! client events, send-to-user and terminate reach clients on the other
//! node, native and Pusher clients share channels, and the channel
//! information endpoints count subscribers and users on every node.
//!
//! As in `tests/pusher.rs`, "nothing else arrived" is shown by a marker
//! event that must be the next one on the channel (events, presence
//! events included, are delivered in order per channel).

mod common;

use common::sdk::{self, has, SdkClient, APP_KEY, APP_SECRET};
use std::time::{Duration, Instant};

use common::{Client, RedisServer, Server, WAIT};
use serde_json::{json, Value};

/// Two nodes of the test app on `redis`, with `extra` arguments.
fn nodes(redis: &RedisServer, extra: &[&str]) -> (Server, Server) {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str()];
    args.extend_from_slice(extra);
    let args = sdk::pusher_args(&args);
    (Server::start(&args), Server::start(&args))
}

fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn marker(port: u16, channel: &str, event: &str) {
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": [channel], "event": event, "data": {}}),
    );
}

#[test]
fn an_event_triggered_on_one_node_reaches_pusher_js_on_both() {
    let redis = RedisServer::start(false);
    let (a, b) = nodes(&redis, &[]);
    let mut ca = SdkClient::spawn();
    let mut cb = SdkClient::spawn();
    let id_a = ca.connect(a.addr.port());
    let id_b = cb.connect(b.addr.port());
    // socket_ids are unique across nodes.
    assert_ne!(id_a, id_b);
    for c in [&mut ca, &mut cb] {
        c.subscribe("orders");
        c.subscribe("private-orders");
    }
    let channels = ["orders", "private-orders"];
    sdk::trigger_ok(
        a.addr.port(),
        json!({"op": "trigger", "channels": channels, "event": "shipped", "data": {"id": 1}}),
    );
    sdk::trigger_py_ok(
        b.addr.port(),
        json!({"op": "trigger", "channels": channels, "event": "paid", "data": {"id": 2}}),
    );
    for c in [&mut ca, &mut cb] {
        for channel in channels {
            let got: Vec<Value> = (0..2).map(|_| c.next_event_on(channel)).collect();
            assert_eq!(got[0]["event"], "shipped", "{got:?}");
            assert_eq!(got[0]["data"], json!({"id": 1}), "{got:?}");
            assert_eq!(got[1]["event"], "paid", "{got:?}");
            assert_eq!(got[1]["data"], json!({"id": 2}), "{got:?}");
        }
    }
    // socket_id exclusion works for a socket on the other node.
    sdk::trigger_ok(
        a.addr.port(),
        json!({"op": "trigger", "channels": ["orders"], "event": "not-b",
               "data": {}, "socket_id": id_b}),
    );
    marker(a.addr.port(), "orders", "marker");
    assert_eq!(ca.next_events_on("orders", 2), ["not-b", "marker"]);
    assert_eq!(cb.next_events_on("orders", 1), ["marker"]);
}

#[test]
fn presence_announces_a_user_once_whatever_node_its_connections_are_on() {
    let redis = RedisServer::start(false);
    let (a, b) = nodes(&redis, &[]);
    let room = "presence-room";
    let mut obs = SdkClient::spawn();
    obs.connect(a.addr.port());
    obs.join(room, json!("9"), json!({"name": "Obs"}));

    // User 7 on node A, then on node B.
    let info = json!({"name": "Sam"});
    let mut u7a = SdkClient::spawn();
    let mut u7b = SdkClient::spawn();
    u7a.connect(a.addr.port());
    u7b.connect(b.addr.port());
    u7a.join(room, json!(7), info.clone());
    let added = obs.next_event_on(room);
    assert_eq!(added["event"], "pusher:member_added", "{added}");
    assert_eq!(id_text(&added["data"]["id"]), "7", "{added}");
    assert_eq!(added["data"]["info"], info, "{added}");

    // Node B lists the same two members, each once, with their info.
    let joined = u7b.join(room, json!(7), info.clone());
    assert_eq!(joined["count"], 2, "{joined}");
    assert_eq!(
        joined["members"],
        json!({"9": {"name": "Obs"}, "7": info}),
        "{joined}"
    );
    // No second member_added, on either node.
    marker(b.addr.port(), room, "sync-join");
    assert_eq!(obs.next_event_on(room)["event"], "sync-join");
    assert_eq!(u7a.next_event_on(room)["event"], "sync-join");
    assert_eq!(u7b.next_event_on(room)["event"], "sync-join");

    // A user 8 on node B is announced to both nodes.
    let mut u8b = SdkClient::spawn();
    u8b.connect(b.addr.port());
    let joined = u8b.join(room, json!("8"), json!(null));
    assert_eq!(joined["count"], 3, "{joined}");
    for c in [&mut obs, &mut u7a, &mut u7b] {
        let added = c.next_event_on(room);
        assert_eq!(added["event"], "pusher:member_added", "{added}");
        assert_eq!(id_text(&added["data"]["id"]), "8", "{added}");
    }

    // User 7 leaves node A but is still on node B: no member_removed.
    u7a.send(&json!({"op": "unsubscribe", "channel": room}));
    u7a.round_trip();
    marker(a.addr.port(), room, "sync-leave");
    assert_eq!(obs.next_event_on(room)["event"], "sync-leave");
    assert_eq!(u8b.next_event_on(room)["event"], "sync-leave");

    // Its last connection goes: removed once, on both nodes.
    u7b.send(&json!({"op": "disconnect"}));
    for c in [&mut obs, &mut u8b] {
        let removed = c.next_event_on(room);
        assert_eq!(removed["event"], "pusher:member_removed", "{removed}");
        assert_eq!(id_text(&removed["data"]["id"]), "7", "{removed}");
    }
    marker(b.addr.port(), room, "sync-gone");
    assert_eq!(obs.next_event_on(room)["event"], "sync-gone");
    assert_eq!(u8b.next_event_on(room)["event"], "sync-gone");
}

#[test]
fn client_events_cross_nodes_and_never_come_back() {
    let redis = RedisServer::start(false);
    let (a, b) = nodes(&redis, &["--pusher-client-events", "true"]);
    let mut c1 = SdkClient::spawn();
    let mut c2 = SdkClient::spawn();
    c1.connect(a.addr.port());
    c2.connect(b.addr.port());
    c1.subscribe("private-chat");
    c2.subscribe("private-chat");
    c1.join("presence-chat", json!("1"), json!({"name": "Ann"}));
    c2.join("presence-chat", json!("2"), json!({"name": "Bob"}));
    let added = c1.next_event_on("presence-chat");
    assert_eq!(added["event"], "pusher:member_added", "{added}");

    for channel in ["private-chat", "presence-chat"] {
        let presence = channel.starts_with("presence-");
        c1.send(&json!({"op": "trigger_client", "channel": channel,
                        "event": "client-typing", "data": {"from": "c1"}}));
        let e = c2.next_event_on(channel);
        assert_eq!(e["event"], "client-typing", "{e}");
        assert_eq!(e["data"], json!({"from": "c1"}), "{e}");
        assert_eq!(
            e["user_id"],
            if presence { json!("1") } else { Value::Null },
            "{e}"
        );
        // Had c1's own event come back, it would be before c2's answer.
        c2.send(&json!({"op": "trigger_client", "channel": channel,
                        "event": "client-typing", "data": {"from": "c2"}}));
        let e = c1.next_event_on(channel);
        assert_eq!(e["data"], json!({"from": "c2"}), "{e}");
        assert_eq!(
            e["user_id"],
            if presence { json!("2") } else { Value::Null },
            "{e}"
        );
        marker(a.addr.port(), channel, "marker");
        assert_eq!(c1.next_event_on(channel)["event"], "marker");
        assert_eq!(c2.next_event_on(channel)["event"], "marker");
    }
}

#[test]
fn send_to_user_and_terminate_through_node_a_reach_the_user_on_both_nodes() {
    let redis = RedisServer::start(false);
    let (a, b) = nodes(&redis, &[]);
    // User u1 signed in on node B, and on node A too.
    let mut on_b = SdkClient::spawn();
    let mut on_a = SdkClient::spawn();
    for (c, node) in [(&mut on_b, &b), (&mut on_a, &a)] {
        c.connect_with(
            json!({"port": node.addr.port(), "key": APP_KEY, "secret": APP_SECRET,
                              "signin_user": {"id": "u1", "user_info": {}}}),
        );
        c.send(&json!({"op": "signin"}));
        let sub = c.next_matching(
            |l| {
                l["channel"] == "#server-to-user-u1"
                    && (l["type"] == "subscribed" || l["type"] == "subscription_error")
            },
            WAIT,
        );
        assert_eq!(sub["type"], "subscribed", "{sub}");
    }
    // Another user on node B, who gets none of it.
    let mut u2 = SdkClient::spawn();
    u2.connect_with(
        json!({"port": b.addr.port(), "key": APP_KEY, "secret": APP_SECRET,
                           "signin_user": {"id": "u2", "user_info": {}}}),
    );
    u2.send(&json!({"op": "signin"}));
    u2.next_matching(
        has(json!({"type": "subscribed", "channel": "#server-to-user-u2"})),
        WAIT,
    );

    sdk::trigger_ok(
        a.addr.port(),
        json!({"op": "send_to_user", "user_id": "u1", "event": "note", "data": {"text": "hi"}}),
    );
    for c in [&mut on_b, &mut on_a] {
        let e = c.next_matching(has(json!({"type": "user_event"})), WAIT);
        assert_eq!(
            (&e["event"], &e["data"]),
            (&json!("note"), &json!({"text": "hi"})),
            "{e}"
        );
    }

    sdk::trigger_ok(a.addr.port(), json!({"op": "terminate", "user_id": "u1"}));
    for c in [&mut on_b, &mut on_a] {
        let closed = c.closed();
        assert_eq!(closed["code"], 4009, "{closed}");
    }

    // u2 is still connected; the first thing sent to it is the first
    // thing it gets.
    sdk::trigger_ok(
        a.addr.port(),
        json!({"op": "send_to_user", "user_id": "u2", "event": "for-u2", "data": {}}),
    );
    let e = u2.next_matching(has(json!({"type": "user_event"})), WAIT);
    assert_eq!(e["event"], "for-u2", "{e}");
    u2.assert_stayed_connected();
}

#[tokio::test]
async fn native_and_pusher_clients_share_channels_across_nodes() {
    let redis = RedisServer::start(false);
    let (a, b) = nodes(&redis, &[]);
    let mut native_sub = Client::connect(b.addr).await;
    native_sub.subscribe("news").await;
    let mut publisher = Client::connect(a.addr).await;
    let mut p = SdkClient::spawn();
    p.connect(b.addr.port());
    p.subscribe("news");

    // Native publishes on A: pusher-js on B gets event `publication` with
    // the payload as data (base64 under `publication.base64` when it is
    // not UTF-8).
    publisher.publish("news", b"hello from native").await;
    publisher.publish("news", &[0xff, 0x00, 0x01]).await;
    let e = p.next_event_on("news");
    assert_eq!(
        (&e["event"], &e["data"]),
        (&json!("publication"), &json!("hello from native")),
        "{e}"
    );
    let e = p.next_event_on("news");
    assert_eq!(
        (&e["event"], &e["data"]),
        (&json!("publication.base64"), &json!("/wAB")),
        "{e}"
    );

    // An HTTP API event through A: the native subscriber on B gets its
    // data as the payload.
    sdk::trigger_ok(
        a.addr.port(),
        json!({"op": "trigger", "channels": ["news"], "event": "headline", "data": "plain text"}),
    );
    sdk::trigger_py_ok(
        a.addr.port(),
        json!({"op": "trigger", "channels": ["news"], "event": "headline", "data": {"a": 1}}),
    );
    let mut got = Vec::new();
    while got.len() < 4 {
        let (channel, _, _, payload) = native_sub.publication().await;
        assert_eq!(channel, "news");
        got.push(payload);
    }
    assert_eq!(
        got,
        [
            b"hello from native".to_vec(),
            vec![0xff, 0x00, 0x01],
            b"plain text".to_vec(),
            // PyPI pusher JSON-encodes with Python's default separators.
            br#"{"a": 1}"#.to_vec(),
        ]
    );
    let e = p.next_event_on("news");
    assert_eq!(
        (&e["event"], &e["data"]),
        (&json!("headline"), &json!("plain text")),
        "{e}"
    );
    let e = p.next_event_on("news");
    assert_eq!(
        (&e["event"], &e["data"]),
        (&json!("headline"), &json!({"a": 1})),
        "{e}"
    );
}

/// Asks node `port` through pusher-http-node until the answer is `200`
/// with body `want`, within `WAIT`: a node reports a count to Redis right
/// after its client is told it subscribed, so the first answer may miss
/// the newest one.
fn until_answer(port: u16, op: Value, want: Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = sdk::trigger(&sdk::api(port, op.clone()));
        if r["status"] == 200 && r["body"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{op} on port {port}: {r}; want {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn channel_information_through_one_node_counts_subscribers_on_both() {
    let redis = RedisServer::start(false);
    let (a, b) = nodes(&redis, &[]);
    let (pa, pb) = (a.addr.port(), b.addr.port());
    let room = "presence-room";
    // Node A: user 1 in the room, also subscribed to `orders`.
    let mut a1 = SdkClient::spawn();
    a1.connect(pa);
    a1.join(room, json!("1"), json!({"name": "Ann"}));
    a1.subscribe("orders");
    // Node B: user 1 again, user 2 (also on `orders`), user 3 in the lobby.
    let mut b1 = SdkClient::spawn();
    b1.connect(pb);
    b1.join(room, json!("1"), json!({"name": "Ann"}));
    let mut b2 = SdkClient::spawn();
    b2.connect(pb);
    b2.join(room, json!("2"), json!({"name": "Bob"}));
    b2.subscribe("orders");
    let mut b3 = SdkClient::spawn();
    b3.connect(pb);
    b3.join("presence-lobby", json!("3"), json!(null));

    until_answer(
        pa,
        json!({"op": "channels", "filter_by_prefix": "presence-",
               "info": "user_count,subscription_count"}),
        json!({"channels": {
            "presence-lobby": {"user_count": 1, "subscription_count": 1},
            "presence-room": {"user_count": 2, "subscription_count": 3},
        }}),
    );
    until_answer(
        pa,
        json!({"op": "channels"}),
        json!({"channels": {"orders": {}, "presence-lobby": {}, "presence-room": {}}}),
    );
    until_answer(
        pa,
        json!({"op": "channel", "channel": "orders", "info": "subscription_count"}),
        json!({"occupied": true, "subscription_count": 2}),
    );
    until_answer(
        pa,
        json!({"op": "channel", "channel": room, "info": "user_count,subscription_count"}),
        json!({"occupied": true, "user_count": 2, "subscription_count": 3}),
    );
    until_answer(
        pa,
        json!({"op": "channel", "channel": "nobody", "info": "subscription_count"}),
        json!({"occupied": false, "subscription_count": 0}),
    );
    until_answer(
        pa,
        json!({"op": "users", "channel": room}),
        json!({"users": [{"id": "1"}, {"id": "2"}]}),
    );
    // Node B answers the same.
    until_answer(
        pb,
        json!({"op": "channel", "channel": room, "info": "user_count,subscription_count"}),
        json!({"occupied": true, "user_count": 2, "subscription_count": 3}),
    );

    // User 2 leaves node B, and user 1 its connection there: node A's
    // answers follow.
    b2.send(&json!({"op": "disconnect"}));
    b1.send(&json!({"op": "unsubscribe", "channel": room}));
    b1.round_trip();
    until_answer(
        pa,
        json!({"op": "channels", "filter_by_prefix": "presence-",
               "info": "user_count,subscription_count"}),
        json!({"channels": {
            "presence-lobby": {"user_count": 1, "subscription_count": 1},
            "presence-room": {"user_count": 1, "subscription_count": 1},
        }}),
    );
    until_answer(
        pa,
        json!({"op": "channel", "channel": "orders", "info": "subscription_count"}),
        json!({"occupied": true, "subscription_count": 1}),
    );
    until_answer(
        pa,
        json!({"op": "users", "channel": room}),
        json!({"users": [{"id": "1"}]}),
    );
}

#[test]
fn an_http_api_request_the_bus_does_not_answer_in_time_gets_503() {
    let redis = RedisServer::start(false);
    // Redis commands may take a minute, but an HTTP API request must be
    // answered within 600 ms of being read.
    let node = Server::start(&sdk::pusher_args(&[
        "--redis-url",
        &redis.url(),
        "--redis-command-timeout-ms",
        "60000",
        "--limits-handshake-timeout-ms",
        "600",
    ]));
    let port = node.addr.port();
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["orders"], "event": "first", "data": {}}),
    );
    // Redis stops answering every client for 3 s.
    assert_eq!(
        redis
            .cli_checked(&["CLIENT", "PAUSE", "3000", "ALL"])
            .trim(),
        "OK"
    );
    let r = sdk::trigger(&sdk::api(
        port,
        json!({"op": "trigger", "channels": ["orders"], "event": "stuck", "data": {}}),
    ));
    // Only the deadline answers so: Redis would answer after the pause,
    // and then 200.
    assert_eq!(r["status"], 503, "{r}");
    assert!(
        r["body"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("limits.handshake_timeout_ms"),
        "{r}"
    );
}
