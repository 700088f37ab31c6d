//! Pusher Channels protocol 7 on one node, with the real SDKs (issue 11):
//! pusher-js 8 and Laravel Echo 2 connect and subscribe to every channel
//! kind, events triggered with pusher-http-node 5 and the PyPI `pusher` SDK
//! reach them, client events, presence once per user, sign-in and
//! send-to-user, terminate_connections, drain; bad input gets its own clear
//! error while the other clients keep receiving.
//!
//! "Nothing else arrived" is shown without sleeping: events are delivered
//! in order per channel (presence events included), so a test triggers a
//! marker event and asserts it is the next event on that channel.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::sdk::{self, has, SdkClient, APP_KEY, APP_SECRET};
use common::{Server, Ws, WAIT};
use futures_util::{SinkExt, StreamExt};
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A `private-encrypted-` master key (32 bytes, base64), shared by the
/// app's backend (pusher-http-node, PyPI pusher) and the driver's
/// `authorizeChannel`, which derives each channel's shared secret from it.
const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn connect_encrypted(c: &mut SdkClient, port: u16) -> String {
    c.connect_with(json!({"port": port, "key": APP_KEY, "secret": APP_SECRET,
                          "encryptionMasterKeyBase64": MASTER_KEY}))
}

/// A presence member id as pusher-js reports it (a string, or the integer
/// Laravel signed), as text.
fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hmac_hex(secret: &str, data: &str) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(data.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `POST /apps/1/events` by hand, signed as the Pusher HTTP API reference
/// says, with the given `auth_timestamp` and `body_md5` (so a test can
/// make either wrong): (status, Content-Type, JSON body).
fn raw_post_events(
    addr: SocketAddr,
    body: &str,
    timestamp: u64,
    body_md5: &str,
) -> (u16, String, Value) {
    let path = format!("/apps/{}/events", sdk::APP_ID);
    let query = format!(
        "auth_key={APP_KEY}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={body_md5}"
    );
    let signature = hmac_hex(APP_SECRET, &format!("POST\n{path}\n{query}"));
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "POST {path}?{query}&auth_signature={signature} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head[9..12].parse().expect("a status");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    let json = serde_json::from_str(body).unwrap_or_else(|_| json!({"not json": body}));
    (status, content_type, json)
}

fn md5_hex(body: &str) -> String {
    format!("{:x}", md5::compute(body.as_bytes()))
}

/// Asserts a refused API call: `status` and a JSON `{"error": "…"}`
/// naming `mentions`.
fn assert_refused(r: &Value, status: u16, mentions: &str) {
    assert_eq!(r["status"], status, "{r}");
    let error = r["body"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no JSON error: {r}"));
    assert!(
        error.contains(mentions),
        "{error:?} should mention {mentions:?}: {r}"
    );
}

/// A raw WebSocket on the Pusher endpoint (`target`: path and query).
async fn pusher_ws(addr: SocketAddr, target: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{addr}{target}")),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake");
    ws
}

/// The next server message: `Ok(JSON of a text frame)` or `Err((close
/// code, reason))`.
async fn next_message(ws: &mut Ws) -> Result<Value, (u16, String)> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for the server")
            .expect("connection ended without a close frame")
            .expect("websocket error");
        match msg {
            Message::Text(t) => {
                return Ok(serde_json::from_str(t.as_str()).expect("a JSON text frame"))
            }
            Message::Close(Some(f)) => return Err((u16::from(f.code), f.reason.to_string())),
            Message::Close(None) => return Err((1005, String::new())),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    next_message(ws)
        .await
        .unwrap_or_else(|close| panic!("closed {close:?} instead of a message"))
}

async fn expect_close(ws: &mut Ws) -> (u16, String) {
    match next_message(ws).await {
        Err(close) => close,
        Ok(m) => panic!("expected a close, got {m}"),
    }
}

/// `data` of a server message: the protocol sends it as a JSON string or
/// an object.
fn data_of(m: &Value) -> Value {
    match &m["data"] {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| m["data"].clone()),
        other => other.clone(),
    }
}

/// A raw connection on the Pusher endpoint, past `connection_established`.
async fn established(addr: SocketAddr) -> (Ws, String) {
    let mut ws = pusher_ws(
        addr,
        &format!("/app/{APP_KEY}?protocol=7&client=rust&version=1"),
    )
    .await;
    let m = next_json(&mut ws).await;
    assert_eq!(m["event"], "pusher:connection_established", "{m}");
    let socket_id = data_of(&m)["socket_id"].as_str().unwrap_or("").to_string();
    assert!(sdk::is_socket_id(&socket_id), "{m}");
    (ws, socket_id)
}

async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.expect("send");
}

#[test]
fn pusher_js_gets_events_from_both_server_sdks_on_every_channel_kind() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut c = SdkClient::spawn();
    let socket_id = connect_encrypted(&mut c, port);
    assert!(sdk::is_socket_id(&socket_id), "socket_id {socket_id:?}");

    c.subscribe("orders");
    c.subscribe("private-orders");
    c.subscribe("private-encrypted-orders");
    let joined = c.join("presence-orders", json!("7"), json!({"name": "Ann"}));
    assert_eq!(joined["count"], 1, "{joined}");
    assert_eq!(
        joined["me"],
        json!({"id": "7", "info": {"name": "Ann"}}),
        "{joined}"
    );
    assert_eq!(joined["members"], json!({"7": {"name": "Ann"}}), "{joined}");

    let plain = ["orders", "private-orders", "presence-orders"];
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": plain, "event": "shipped", "data": {"id": 1}}),
    );
    sdk::trigger_py_ok(
        port,
        json!({"op": "trigger", "channels": plain, "event": "paid", "data": {"id": 2}}),
    );
    for channel in plain {
        let e = c.event(channel, "shipped");
        assert_eq!(e["data"], json!({"id": 1}), "{e}");
        let e = c.event(channel, "paid");
        assert_eq!(e["data"], json!({"id": 2}), "{e}");
    }

    // End-to-end encrypted: the backend encrypts with the channel's secret
    // derived from the master key, pusher-js decrypts with the one its
    // authorization gave it. Decryption (an authenticated secretbox)
    // succeeds only if nonce and ciphertext reached it byte for byte.
    for (who, event) in [("node", "card-node"), ("python", "card-py")] {
        let op = json!({"op": "trigger", "channels": ["private-encrypted-orders"],
                        "event": event, "data": {"card": who},
                        "encryptionMasterKeyBase64": MASTER_KEY});
        if who == "node" {
            sdk::trigger_ok(port, op);
        } else {
            sdk::trigger_py_ok(port, op);
        }
        let e = c.event("private-encrypted-orders", event);
        assert_eq!(e["data"], json!({"card": who}), "{e}");
    }
    c.assert_stayed_connected();
}

#[test]
fn socket_id_exclusion_and_batches_from_both_server_sdks() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut c1 = SdkClient::spawn();
    let mut c2 = SdkClient::spawn();
    let id1 = c1.connect(port);
    let id2 = c2.connect(port);
    assert_ne!(id1, id2);
    for c in [&mut c1, &mut c2] {
        c.subscribe("orders");
        c.subscribe("private-orders");
    }

    // Each SDK leaves one socket out; the marker after them reaches both.
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["orders"], "event": "not-c1",
               "data": {"n": 1}, "socket_id": id1}),
    );
    sdk::trigger_py_ok(
        port,
        json!({"op": "trigger", "channels": ["orders"], "event": "not-c2",
               "data": {"n": 2}, "socket_id": id2}),
    );
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["orders"], "event": "marker", "data": {}}),
    );
    assert_eq!(c1.next_events_on("orders", 2), ["not-c2", "marker"]);
    assert_eq!(c2.next_events_on("orders", 2), ["not-c1", "marker"]);

    // batch_events, from both SDKs: every event, on its channel, in order.
    sdk::trigger_ok(
        port,
        json!({"op": "trigger_batch", "batch": [
            {"channel": "orders", "name": "b1", "data": {"n": 1}},
            {"channel": "private-orders", "name": "b2", "data": "text"},
            {"channel": "orders", "name": "b3", "data": {"n": 3}}]}),
    );
    sdk::trigger_py_ok(
        port,
        json!({"op": "trigger_batch", "batch": [
            {"channel": "orders", "name": "p1", "data": {"n": 4}},
            {"channel": "private-orders", "name": "p2", "data": {"n": 5}}]}),
    );
    for c in [&mut c1, &mut c2] {
        let orders: Vec<Value> = (0..3).map(|_| c.next_event_on("orders")).collect();
        let names: Vec<&str> = orders
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["b1", "b3", "p1"]);
        assert_eq!(orders[0]["data"], json!({"n": 1}));
        assert_eq!(orders[2]["data"], json!({"n": 4}));
        let private: Vec<Value> = (0..2).map(|_| c.next_event_on("private-orders")).collect();
        assert_eq!(private[0]["event"], "b2");
        assert_eq!(private[0]["data"], "text");
        assert_eq!(private[1]["event"], "p2");
        assert_eq!(private[1]["data"], json!({"n": 5}));
    }
}

#[test]
fn client_events_reach_the_other_clients_never_the_sender() {
    let s = Server::start(&sdk::pusher_args(&["--pusher-client-events", "true"]));
    let port = s.addr.port();
    let mut c1 = SdkClient::spawn();
    let mut c2 = SdkClient::spawn();
    c1.connect(port);
    c2.connect(port);
    c1.subscribe("private-chat");
    c2.subscribe("private-chat");
    c1.join("presence-chat", json!("1"), json!({"name": "Ann"}));
    c2.join("presence-chat", json!("2"), json!({"name": "Bob"}));
    let added = c1.event("presence-chat", "pusher:member_added");
    assert_eq!(id_text(&added["data"]["id"]), "2", "{added}");

    for channel in ["private-chat", "presence-chat"] {
        let presence = channel.starts_with("presence-");
        c1.send(&json!({"op": "trigger_client", "channel": channel,
                        "event": "client-typing", "data": {"from": "c1"}}));
        let e = c2.next_event_on(channel);
        assert_eq!(e["event"], "client-typing", "{e}");
        assert_eq!(e["data"], json!({"from": "c1"}), "{e}");
        // The sender's user_id on presence channels only.
        let want_user = if presence { json!("1") } else { Value::Null };
        assert_eq!(e["user_id"], want_user, "{e}");

        // c2 answers after it got c1's event: had c1's been echoed, it
        // would come first.
        c2.send(&json!({"op": "trigger_client", "channel": channel,
                        "event": "client-typing", "data": {"from": "c2"}}));
        let e = c1.next_event_on(channel);
        assert_eq!(e["event"], "client-typing", "{e}");
        assert_eq!(e["data"], json!({"from": "c2"}), "{e}");
        let want_user = if presence { json!("2") } else { Value::Null };
        assert_eq!(e["user_id"], want_user, "{e}");
    }
    // And c2 got no echo of its own either.
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["private-chat", "presence-chat"],
               "event": "marker", "data": {}}),
    );
    for channel in ["private-chat", "presence-chat"] {
        assert_eq!(c2.next_event_on(channel)["event"], "marker");
        assert_eq!(c1.next_event_on(channel)["event"], "marker");
    }

    // Not on a public channel: the sender is told, nobody gets it.
    c1.subscribe("lobby");
    c2.subscribe("lobby");
    c1.send(&json!({"op": "trigger_client", "channel": "lobby",
                    "event": "client-typing", "data": {}}));
    let err = c1.next_matching(has(json!({"type": "pusher_error"})), WAIT);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or("")
            .contains("private and presence"),
        "{err}"
    );
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["lobby"], "event": "marker", "data": {}}),
    );
    assert_eq!(c2.next_event_on("lobby")["event"], "marker");
    c1.assert_stayed_connected();
    c2.assert_stayed_connected();
}

#[test]
fn client_events_are_refused_when_the_app_does_not_enable_them() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut c1 = SdkClient::spawn();
    let mut c2 = SdkClient::spawn();
    c1.connect(port);
    c2.connect(port);
    c1.subscribe("private-chat");
    c2.subscribe("private-chat");
    c1.send(&json!({"op": "trigger_client", "channel": "private-chat",
                    "event": "client-typing", "data": {"from": "c1"}}));
    let err = c1.next_matching(has(json!({"type": "pusher_error"})), WAIT);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or("")
            .contains("not enabled"),
        "{err}"
    );
    // The error came after the server handled the event: the marker
    // published next is the first thing c2 sees.
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["private-chat"], "event": "marker", "data": {}}),
    );
    assert_eq!(c2.next_event_on("private-chat")["event"], "marker");
    assert_eq!(c1.next_event_on("private-chat")["event"], "marker");
    c1.assert_stayed_connected();
}

#[test]
fn presence_lists_each_user_once_and_announces_it_once() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let room = "presence-room";
    let marker = |event: &str| {
        sdk::trigger_ok(
            port,
            json!({"op": "trigger", "channels": [room], "event": event, "data": {}}),
        )
    };
    let mut obs = SdkClient::spawn();
    obs.connect(port);
    obs.join(room, json!("9"), json!({"name": "Obs"}));

    // User 42 as Laravel signs it: an integer user_id.
    let ann = json!({"id": 42, "name": "Ann"});
    let mut a1 = SdkClient::spawn();
    let mut a2 = SdkClient::spawn();
    a1.connect(port);
    a2.connect(port);
    let first = a1.join(room, json!(42), ann.clone());
    let added = obs.next_event_on(room);
    assert_eq!(added["event"], "pusher:member_added", "{added}");
    assert_eq!(id_text(&added["data"]["id"]), "42", "{added}");
    assert_eq!(added["data"]["info"], ann, "{added}");

    // The same user's second connection: still two members, each once.
    let second = a2.join(room, json!(42), ann.clone());
    for joined in [&first, &second] {
        assert_eq!(joined["count"], 2, "{joined}");
        assert_eq!(
            joined["members"],
            json!({"9": {"name": "Obs"}, "42": ann}),
            "{joined}"
        );
        assert_eq!(joined["me"], json!({"id": 42, "info": ann}), "{joined}");
    }
    // No second member_added, to the others or to the user's own first
    // connection.
    marker("sync-join");
    assert_eq!(obs.next_event_on(room)["event"], "sync-join");
    assert_eq!(a1.next_event_on(room)["event"], "sync-join");
    assert_eq!(a2.next_event_on(room)["event"], "sync-join");

    // One of the user's connections leaves: the user stays.
    a1.send(&json!({"op": "unsubscribe", "channel": room}));
    a1.round_trip();
    marker("sync-leave");
    assert_eq!(obs.next_event_on(room)["event"], "sync-leave");
    assert_eq!(a2.next_event_on(room)["event"], "sync-leave");

    // Its last connection goes away: removed, once.
    a2.send(&json!({"op": "disconnect"}));
    let removed = obs.next_event_on(room);
    assert_eq!(removed["event"], "pusher:member_removed", "{removed}");
    assert_eq!(id_text(&removed["data"]["id"]), "42", "{removed}");
    marker("sync-gone");
    assert_eq!(obs.next_event_on(room)["event"], "sync-gone");
    obs.send(&json!({"op": "members", "channel": room}));
    let members = obs.next_matching(has(json!({"type": "members"})), WAIT);
    assert_eq!(members["count"], 1, "{members}");
    assert_eq!(
        members["members"],
        json!({"9": {"name": "Obs"}}),
        "{members}"
    );
}

#[test]
fn laravel_echo_listens_joins_and_whispers() {
    let s = Server::start(&sdk::pusher_args(&["--pusher-client-events", "true"]));
    let port = s.addr.port();
    let ann = json!({"id": 1, "name": "Ann"});
    let bob = json!({"id": 2, "name": "Bob"});
    let echo_line =
        |channel: &str, what: &str| has(json!({"type": "echo", "channel": channel, "what": what}));

    let mut e1 = SdkClient::spawn();
    e1.connect(port);
    e1.send(&json!({"op": "echo", "kind": "channel", "name": "orders",
                    "listen": [".shipped", "OrderShipped"]}));
    e1.send(&json!({"op": "echo", "kind": "private", "name": "chat",
                    "listen": [".paid"], "listen_whisper": ["typing"]}));
    e1.send(&json!({"op": "echo", "kind": "join", "name": "room",
                    "user": {"user_id": 1, "user_info": ann}}));
    e1.next_matching(echo_line("orders", "subscribed"), WAIT);
    e1.next_matching(echo_line("private-chat", "subscribed"), WAIT);
    let here = e1.next_matching(echo_line("presence-room", "here"), WAIT);
    assert_eq!(here["data"], json!([ann]), "{here}");

    let mut e2 = SdkClient::spawn();
    e2.connect(port);
    e2.send(&json!({"op": "echo", "kind": "private", "name": "chat"}));
    e2.send(&json!({"op": "echo", "kind": "join", "name": "room",
                    "user": {"user_id": 2, "user_info": bob}}));
    e2.next_matching(echo_line("private-chat", "subscribed"), WAIT);
    let here = e2.next_matching(echo_line("presence-room", "here"), WAIT);
    let mut infos = here["data"].as_array().cloned().unwrap_or_default();
    infos.sort_by_key(|i| i["id"].as_i64());
    assert_eq!(infos, [ann.clone(), bob.clone()], "{here}");
    let joining = e1.next_matching(echo_line("presence-room", "joining"), WAIT);
    assert_eq!(joining["data"], bob, "{joining}");

    // broadcast() of a Laravel event: its class name, namespaced.
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["orders"],
               "event": "App\\Events\\OrderShipped", "data": {"order": 7}}),
    );
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["orders"], "event": "shipped", "data": {"order": 8}}),
    );
    sdk::trigger_py_ok(
        port,
        json!({"op": "trigger", "channels": ["private-chat"], "event": "paid", "data": {"order": 9}}),
    );
    let got = e1.next_matching(echo_line("orders", "event"), WAIT);
    assert_eq!(
        (&got["listener"], &got["data"]),
        (&json!("OrderShipped"), &json!({"order": 7})),
        "{got}"
    );
    let got = e1.next_matching(echo_line("orders", "event"), WAIT);
    assert_eq!(
        (&got["listener"], &got["data"]),
        (&json!(".shipped"), &json!({"order": 8})),
        "{got}"
    );
    let got = e1.next_matching(echo_line("private-chat", "event"), WAIT);
    assert_eq!(
        (&got["listener"], &got["data"]),
        (&json!(".paid"), &json!({"order": 9})),
        "{got}"
    );

    e2.send(&json!({"op": "whisper", "kind": "private", "name": "chat",
                    "event": "typing", "data": {"typing": true}}));
    let got = e1.next_matching(echo_line("private-chat", "whisper"), WAIT);
    assert_eq!(
        (&got["listener"], &got["data"]),
        (&json!("typing"), &json!({"typing": true})),
        "{got}"
    );

    e2.send(&json!({"op": "echo_leave", "name": "room"}));
    let leaving = e1.next_matching(echo_line("presence-room", "leaving"), WAIT);
    assert_eq!(leaving["data"], bob, "{leaving}");
    e1.assert_stayed_connected();
    e2.assert_stayed_connected();
}

#[test]
fn signed_in_users_get_what_is_sent_to_them_and_can_be_terminated() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut u = SdkClient::spawn();
    u.connect_with(json!({"port": port, "key": APP_KEY, "secret": APP_SECRET,
                          "signin_user": {"id": "u1", "user_info": {"name": "Ann"}}}));
    u.send(&json!({"op": "signin"}));
    let signed = u.next_matching(has(json!({"type": "signed_in"})), WAIT);
    assert_eq!(signed["user_data"]["id"], "u1", "{signed}");
    // pusher-js subscribes itself to its server-to-user channel.
    let sub = u.next_matching(
        |l| {
            l["channel"] == "#server-to-user-u1"
                && (l["type"] == "subscribed" || l["type"] == "subscription_error")
        },
        WAIT,
    );
    assert_eq!(sub["type"], "subscribed", "{sub}");

    // A sign-in the app did not sign (another secret) is refused: 4009.
    let mut forger = SdkClient::spawn();
    forger.connect_with(
        json!({"port": port, "key": APP_KEY, "secret": "not-the-secret",
                               "signin_user": {"id": "u1", "user_info": {}}}),
    );
    forger.send(&json!({"op": "signin"}));
    let closed = forger.closed();
    assert_eq!(closed["code"], 4009, "{closed}");
    assert!(
        !forger.seen.iter().any(|l| l["type"] == "signed_in"),
        "{:#?}",
        forger.seen
    );

    // Another client may not take that channel (pusher-js refuses '#'
    // channels itself: sent raw).
    let mut other = SdkClient::spawn();
    other.connect_with(json!({"port": port, "key": APP_KEY, "secret": APP_SECRET, "raw": true}));
    other.subscribe("orders");
    other.send(
        &json!({"op": "send_raw", "data": json!({"event": "pusher:subscribe",
        "data": {"auth": "", "channel": "#server-to-user-u1"}}).to_string()}),
    );
    let refused = other.next_matching(has(json!({"type": "subscription_error"})), WAIT);
    assert_eq!(refused["channel"], "#server-to-user-u1", "{refused}");
    assert_eq!(refused["status"], 403, "{refused}");

    sdk::trigger_ok(
        port,
        json!({"op": "send_to_user", "user_id": "u1", "event": "note", "data": {"text": "hi"}}),
    );
    sdk::trigger_py_ok(
        port,
        json!({"op": "send_to_user", "user_id": "u1", "event": "note-py", "data": {"text": "py"}}),
    );
    let e = u.next_matching(has(json!({"type": "user_event", "event": "note"})), WAIT);
    assert_eq!(e["data"], json!({"text": "hi"}), "{e}");
    let e = u.next_matching(has(json!({"type": "user_event", "event": "note-py"})), WAIT);
    assert_eq!(e["data"], json!({"text": "py"}), "{e}");

    sdk::trigger_ok(port, json!({"op": "terminate", "user_id": "u1"}));
    let closed = u.closed();
    assert_eq!(closed["code"], 4009, "{closed}");

    // The other client was unaffected and never got the user's events.
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["orders"], "event": "marker", "data": {}}),
    );
    assert_eq!(other.next_event_on("orders")["event"], "marker");
    other.assert_stayed_connected();
    let leaked: Vec<&Value> = other
        .seen
        .iter()
        .filter(|l| {
            let data = l["data"].as_str().unwrap_or("");
            l["type"] == "frame"
                && l["dir"] == "in"
                && data.contains("#server-to-user-u1")
                && !data.contains("pusher:subscription_error")
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "another client got the user's events: {leaked:?}"
    );
}

#[test]
fn drain_closes_pusher_js_with_4200_and_it_reconnects_by_itself() {
    let mut s = Server::start(&sdk::pusher_args(&["--server-drain-window-ms", "200"]));
    let port = s.addr.port();
    let mut c = SdkClient::spawn();
    c.connect(port);
    c.subscribe("orders");
    s.signal(libc::SIGTERM);
    let closed = c.closed();
    assert_eq!(closed["code"], 4200, "{closed}");
    // 4200 means "reconnect now": pusher-js goes straight back to
    // connecting (the server is gone, so it goes no further).
    let next = c.next_matching(has(json!({"type": "state", "previous": "connected"})), WAIT);
    assert_eq!(next["current"], "connecting", "{next}");
    let status = s.wait_exit(WAIT).expect("the server did not exit");
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_http_api_requests_get_json_errors_while_clients_keep_receiving() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut watcher = SdkClient::spawn();
    watcher.connect(port);
    watcher.subscribe("orders");

    // The hand-made signature is right: a control request is accepted.
    let body = json!({"name": "raw-ok", "data": "{}", "channels": ["orders"]}).to_string();
    let (status, content_type, answer) =
        raw_post_events(s.addr, &body, now_secs(), &md5_hex(&body));
    assert_eq!((status, &answer), (200, &json!({})), "{content_type}");
    assert_eq!(watcher.next_event_on("orders")["event"], "raw-ok");

    // Wrong secret, from both SDKs.
    let op = json!({"op": "trigger", "channels": ["orders"], "event": "bad", "data": {}});
    let wrong = sdk::merged(&sdk::api(port, op), json!({"secret": "not-the-secret"}));
    assert_refused(&sdk::trigger(&wrong), 401, "signature");
    assert_refused(&sdk::trigger_py(&wrong), 401, "signature");

    // Stale timestamp, correctly signed otherwise.
    let body = json!({"name": "bad", "data": "{}", "channels": ["orders"]}).to_string();
    let (status, content_type, answer) =
        raw_post_events(s.addr, &body, now_secs() - 3600, &md5_hex(&body));
    assert_eq!(content_type, "application/json");
    assert_refused(
        &json!({"status": status, "body": answer}),
        401,
        "auth_timestamp",
    );

    // body_md5 (signed) of another body.
    let other = json!({"name": "bad", "data": "{}", "channels": ["elsewhere"]}).to_string();
    let (status, content_type, answer) =
        raw_post_events(s.addr, &body, now_secs(), &md5_hex(&other));
    assert_eq!(content_type, "application/json");
    assert_refused(&json!({"status": status, "body": answer}), 401, "body_md5");

    // Over pusher.max_event_bytes (10240).
    let big = "x".repeat(10241);
    assert_refused(
        &sdk::trigger(&sdk::api(
            port,
            json!({"op": "trigger", "channels": ["orders"], "event": "bad", "data": big}),
        )),
        413,
        "10240",
    );

    // 101 channels (the SDK refuses more than 100 itself: its signed POST).
    let mut channels: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    channels.push("orders".into());
    assert_refused(
        &sdk::trigger(&sdk::api(
            port,
            json!({"op": "post", "path": "/events",
                   "body": {"name": "bad", "data": "{}", "channels": channels}}),
        )),
        400,
        "channels",
    );

    // None of them published anything; the watcher still receives.
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["orders"], "event": "marker", "data": {}}),
    );
    assert_eq!(watcher.next_event_on("orders")["event"], "marker");
    watcher.assert_stayed_connected();
}

#[tokio::test]
async fn bad_websocket_input_gets_its_own_error_while_clients_keep_receiving() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut watcher = SdkClient::spawn();
    watcher.connect(port);
    watcher.subscribe("orders");

    // Unknown app key, missing protocol: the upgrade succeeds and the close
    // code says why (pusher-js reads it from the close frame).
    let mut ws = pusher_ws(s.addr, "/app/no-such-key?protocol=7").await;
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, 4001, "{reason}");
    assert!(reason.contains("no-such-key"), "{reason}");
    let mut ws = pusher_ws(s.addr, &format!("/app/{APP_KEY}?client=js")).await;
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, 4007, "{reason}");
    assert!(reason.contains("protocol"), "{reason}");

    // Malformed JSON: pusher:error, and the connection stays.
    let (mut ws, _) = established(s.addr).await;
    send_text(&mut ws, "{\"event\": \"pusher:subscribe\", ").await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["event"], "pusher:error", "{err}");
    assert!(
        data_of(&err)["message"]
            .as_str()
            .unwrap_or("")
            .contains("JSON"),
        "{err}"
    );
    send_text(
        &mut ws,
        r#"{"event":"pusher:subscribe","data":{"auth":"","channel":"orders"}}"#,
    )
    .await;
    let ok = next_json(&mut ws).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    assert_eq!(ok["channel"], "orders", "{ok}");

    // A binary frame: 1003.
    let (mut binary, _) = established(s.addr).await;
    binary
        .send(Message::Binary(
            b"{\"event\":\"pusher:ping\"}".to_vec().into(),
        ))
        .await
        .expect("send");
    let (code, reason) = expect_close(&mut binary).await;
    assert_eq!(code, 1003, "{reason}");

    // Through pusher-js: a private channel with a bad signature (401) and
    // a native protected channel (403).
    let mut bad = SdkClient::spawn();
    bad.connect(port);
    let r = bad.subscribe_with(
        "private-orders",
        json!({"auth": format!("{APP_KEY}:{}", "0".repeat(64))}),
    );
    assert_eq!(r["type"], "subscription_error", "{r}");
    assert_eq!(r["status"], 401, "{r}");
    let r = bad.subscribe_with("user:x", json!({}));
    assert_eq!(r["type"], "subscription_error", "{r}");
    assert_eq!(r["status"], 403, "{r}");

    // Everyone else, the client that sent bad JSON included, still gets
    // events.
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["orders"], "event": "marker", "data": {"n": 1}}),
    );
    assert_eq!(watcher.next_event_on("orders")["event"], "marker");
    watcher.assert_stayed_connected();
    let e = next_json(&mut ws).await;
    assert_eq!(
        (&e["event"], &e["channel"]),
        (&json!("marker"), &json!("orders")),
        "{e}"
    );
    assert_eq!(data_of(&e), json!({"n": 1}), "{e}");
    bad.assert_stayed_connected();
}

#[test]
fn a_cache_channel_gives_a_new_subscriber_its_last_event_or_a_cache_miss() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut first = SdkClient::spawn();
    first.connect(port);
    // Nothing published yet: a miss, right after the subscription.
    first.subscribe("cache-prices");
    assert_eq!(
        first.next_event_on("cache-prices")["event"],
        "pusher:cache_miss"
    );
    for v in [1, 2] {
        sdk::trigger_ok(
            port,
            json!({"op": "trigger", "channels": ["cache-prices"], "event": "price", "data": {"v": v}}),
        );
        let e = first.event("cache-prices", "price");
        assert_eq!(e["data"], json!({"v": v}), "{e}");
    }
    // A later subscriber gets the last one, and nothing before it: its
    // next event is the next live one.
    let mut later = SdkClient::spawn();
    later.connect(port);
    later.subscribe("cache-prices");
    let e = later.next_event_on("cache-prices");
    assert_eq!(
        (&e["event"], &e["data"]),
        (&json!("price"), &json!({"v": 2})),
        "{e}"
    );
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["cache-prices"], "event": "price", "data": {"v": 3}}),
    );
    assert_eq!(later.next_event_on("cache-prices")["data"], json!({"v": 3}));
    // The same on a private cache channel.
    later.subscribe("private-cache-quotes");
    assert_eq!(
        later.next_event_on("private-cache-quotes")["event"],
        "pusher:cache_miss"
    );
    first.assert_stayed_connected();
    later.assert_stayed_connected();
}

#[test]
fn a_client_over_its_client_event_rate_is_closed_with_4301_and_others_stay() {
    let s = Server::start(&sdk::pusher_args(&[
        "--pusher-client-events",
        "true",
        "--pusher-client-event-rate",
        "3",
    ]));
    let port = s.addr.port();
    let mut fast = SdkClient::spawn();
    let mut other = SdkClient::spawn();
    fast.connect(port);
    other.connect(port);
    fast.subscribe("private-chat");
    other.subscribe("private-chat");
    // A burst of 3 is allowed; the fourth within the same second closes.
    for i in 0..10 {
        fast.send(&json!({"op": "trigger_client", "channel": "private-chat",
                          "event": "client-typing", "data": {"i": i}}));
    }
    let closed = fast.closed();
    assert_eq!(closed["code"], 4301, "{closed}");
    // The other client got the burst, in order, and nothing after the
    // close: then the marker. (A token comes back every 333 ms, so a sender
    // stalled that long between two events gets one more through: the
    // count is at least the burst and short of all ten.)
    sdk::trigger_ok(
        port,
        json!({"op": "trigger", "channels": ["private-chat"], "event": "marker", "data": {}}),
    );
    let mut got = Vec::new();
    loop {
        let e = other.next_event_on("private-chat");
        if e["event"] == "marker" {
            break;
        }
        assert_eq!(e["event"], "client-typing", "{e}");
        got.push(e["data"]["i"].as_u64().expect("i"));
    }
    assert!((3..10).contains(&got.len()), "{got:?}");
    assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>());
    other.assert_stayed_connected();
}

#[test]
fn the_python_sdk_terminates_a_signed_in_user_by_its_own_path() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut u = SdkClient::spawn();
    u.connect_with(json!({"port": port, "key": APP_KEY, "secret": APP_SECRET,
                          "signin_user": {"id": "u9", "user_info": {}}}));
    u.send(&json!({"op": "signin"}));
    u.next_matching(has(json!({"type": "signed_in"})), WAIT);
    u.next_matching(
        has(json!({"type": "subscribed", "channel": "#server-to-user-u9"})),
        WAIT,
    );
    // PyPI pusher 3.3 posts to /users/u9/terminate_connections (no /apps/1).
    let r = sdk::trigger_py(&sdk::api(port, json!({"op": "terminate", "user_id": "u9"})));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(u.closed()["code"], 4009);
}

#[test]
fn channel_information_counts_subscriptions_and_users_from_both_server_sdks() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    // Two connections of user 1 and one of user 2 (over both shards:
    // `Server::start` runs two), all on `chat` and `presence-room`.
    let mut clients: Vec<SdkClient> = (0..3).map(|_| SdkClient::spawn()).collect();
    for (c, user) in clients.iter_mut().zip(["1", "1", "2"]) {
        c.connect(port);
        c.subscribe("chat");
        c.join("presence-room", json!(user), json!({}));
    }
    let get = |op: Value| -> Value {
        let r = sdk::trigger(&sdk::api(port, op.clone()));
        assert_eq!(r["status"], 200, "{op}: {r}");
        r["body"].clone()
    };
    assert_eq!(
        get(json!({"op": "channels"})),
        json!({"channels": {"chat": {}, "presence-room": {}}})
    );
    assert_eq!(
        get(json!({"op": "channels", "filter_by_prefix": "presence-",
                   "info": "user_count,subscription_count"})),
        json!({"channels": {"presence-room": {"user_count": 2, "subscription_count": 3}}})
    );
    assert_eq!(
        get(json!({"op": "channel", "channel": "chat", "info": "subscription_count"})),
        json!({"occupied": true, "subscription_count": 3})
    );
    assert_eq!(
        get(json!({"op": "channel", "channel": "nobody-here"})),
        json!({"occupied": false})
    );
    assert_eq!(
        get(json!({"op": "users", "channel": "presence-room"})),
        json!({"users": [{"id": "1"}, {"id": "2"}]})
    );
    // The PyPI SDK reads the same.
    let r = sdk::trigger_py(&sdk::api(
        port,
        json!({"op": "channel", "channel": "presence-room", "info": "user_count"}),
    ));
    assert_eq!(r["body"], json!({"occupied": true, "user_count": 2}), "{r}");
    // A user count of a channel that has no users is refused with a reason.
    let r = sdk::trigger(&sdk::api(
        port,
        json!({"op": "channel", "channel": "chat", "info": "user_count"}),
    ));
    assert_eq!(r["status"], 400, "{r}");
    assert!(
        r["body"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("presence"),
        "{r}"
    );

    // Leaving changes the figures: user 1's connections go.
    for c in clients.iter_mut().take(2) {
        c.send(&json!({"op": "disconnect"}));
    }
    for c in clients.iter_mut().take(2) {
        c.closed();
    }
    let until = std::time::Instant::now() + WAIT;
    loop {
        let users = get(json!({"op": "users", "channel": "presence-room"}));
        let chat = get(json!({"op": "channel", "channel": "chat", "info": "subscription_count"}));
        if users == json!({"users": [{"id": "2"}]})
            && chat == json!({"occupied": true, "subscription_count": 1})
        {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "after two left: {users} {chat}"
        );
    }
}

/// `POST /apps/1/{endpoint}` signed with the SDKs' scheme
/// (`protocol::pusher::sign`), with an `Idempotency-Key` header: the
/// status.
fn post_with_key(addr: SocketAddr, endpoint: &str, body: &str, key: &str) -> u16 {
    let path = format!("/apps/{}/{endpoint}", sdk::APP_ID);
    let query = shardcast::protocol::pusher::sign::sign_api_request(
        "POST",
        &path,
        &[],
        body.as_bytes(),
        APP_KEY,
        APP_SECRET.as_bytes(),
        now_secs(),
    );
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "POST {path}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the response");
    text[9..12].parse().expect("a status")
}

#[test]
fn a_request_retried_with_its_idempotency_key_publishes_once() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let mut c = SdkClient::spawn();
    c.connect(s.addr.port());
    c.subscribe("orders");
    let event = r#"{"name":"paid","channel":"orders","data":"{\"n\":1}"}"#;
    let batch = r#"{"batch":[{"name":"b","channel":"orders","data":"1"},{"name":"b","channel":"orders","data":"2"}]}"#;
    // Each sent twice (a client retrying after a lost answer): stored and
    // delivered once, the retry answered 200 as well.
    for _ in 0..2 {
        assert_eq!(post_with_key(s.addr, "events", event, "order-1-paid"), 200);
        assert_eq!(post_with_key(s.addr, "batch_events", batch, "batch-7"), 200);
    }
    // Another key is another publication.
    assert_eq!(post_with_key(s.addr, "events", event, "order-2-paid"), 200);
    sdk::trigger_ok(
        s.addr.port(),
        json!({"op": "trigger", "channels": ["orders"], "event": "marker", "data": {}}),
    );
    let mut got = Vec::new();
    loop {
        let e = c.next_event_on("orders");
        if e["event"] == "marker" {
            break;
        }
        got.push((e["event"].as_str().unwrap().to_string(), e["data"].clone()));
    }
    assert_eq!(
        got,
        vec![
            ("paid".to_string(), json!({"n": 1})),
            ("b".to_string(), json!(1)),
            ("b".to_string(), json!(2)),
            ("paid".to_string(), json!({"n": 1})),
        ]
    );
    // A key that is no key is refused with the reason.
    assert_eq!(
        post_with_key(s.addr, "events", event, &"k".repeat(129)),
        400
    );
    c.assert_stayed_connected();
}

#[test]
fn a_trigger_with_info_is_answered_with_the_channels_figures() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut clients: Vec<SdkClient> = (0..3).map(|_| SdkClient::spawn()).collect();
    for (c, user) in clients.iter_mut().zip(["1", "1", "2"]) {
        c.connect(port);
        c.subscribe("chat");
        c.join("presence-room", json!(user), json!({}));
    }
    // Counts reach the bus a tick after a subscription is answered: wait
    // until the channel query agrees, then trigger.
    let until = std::time::Instant::now() + WAIT;
    while sdk::trigger(&sdk::api(
        port,
        json!({"op": "channel", "channel": "chat", "info": "subscription_count"}),
    ))["body"]["subscription_count"]
        != 3
    {
        assert!(std::time::Instant::now() < until, "counts never reached 3");
    }
    let r = sdk::trigger(&sdk::api(
        port,
        json!({"op": "trigger", "channels": ["chat", "presence-room"], "event": "e",
               "data": {}, "info": "subscription_count,user_count"}),
    ));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(
        r["body"],
        json!({"channels": {"chat": {"subscription_count": 3},
                            "presence-room": {"subscription_count": 3, "user_count": 2}}})
    );
    let r = sdk::trigger(&sdk::api(
        port,
        json!({"op": "trigger_batch", "batch": [
            {"channel": "chat", "name": "e", "data": {}, "info": "subscription_count"},
            {"channel": "presence-room", "name": "e", "data": {}, "info": "user_count"},
            {"channel": "chat", "name": "e", "data": {}}]}),
    ));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(
        r["body"],
        json!({"batch": [{"subscription_count": 3}, {"user_count": 2}, {}]})
    );
    // The events themselves went out as any trigger's.
    for c in clients.iter_mut() {
        assert_eq!(c.event("chat", "e")["channel"], "chat");
    }
}

/// The second app of [`two_apps`], from a `[[pusher.apps]]` table.
const APP2_ID: &str = "2";
const APP2_KEY: &str = "app2-key";
const APP2_SECRET: &str = "app2-secret";

/// A server with the test app (the default one, sharing channels with
/// native clients) and app 2 from the config file, client events on in
/// both (the config file is written to a per-process temporary directory).
fn two_apps() -> Server {
    let dir = std::env::temp_dir().join(format!("shardcast-pusher-apps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("two-apps.toml");
    std::fs::write(
        &path,
        format!(
            "[[pusher.apps]]\nid = \"{APP2_ID}\"\nkey = \"{APP2_KEY}\"\n\
             secret = \"{APP2_SECRET}\"\nclient_events = true\n"
        ),
    )
    .unwrap();
    let path = path.to_str().unwrap().to_string();
    Server::start(&sdk::pusher_args(&[
        "--pusher-client-events",
        "true",
        "--config",
        &path,
    ]))
}

/// [`sdk::api`] for app 2.
fn api2(port: u16, op: Value) -> Value {
    sdk::merged(
        &json!({"port": port, "appId": APP2_ID, "key": APP2_KEY, "secret": APP2_SECRET}),
        op,
    )
}

fn connect2(c: &mut SdkClient, port: u16) -> String {
    c.connect_with(json!({"port": port, "key": APP2_KEY, "secret": APP2_SECRET, "appId": APP2_ID}))
}

/// An event on `channel` of app 1 (`app2`: false) or app 2 through
/// pusher-http-node, asserting 200.
fn trigger_on(port: u16, app2: bool, channel: &str, event: &str, data: &str) {
    let op = json!({"op": "trigger", "channels": [channel], "event": event, "data": data});
    let r = sdk::trigger(&if app2 {
        api2(port, op)
    } else {
        sdk::api(port, op)
    });
    assert_eq!(r["status"], 200, "{r}");
}

#[tokio::test]
async fn two_apps_on_one_server_are_isolated_from_each_other_and_from_native_clients() {
    let s = two_apps();
    let port = s.addr.port();
    let mut native = common::Client::connect(s.addr).await;
    native.subscribe("chat").await;
    let mut a1 = SdkClient::spawn();
    a1.connect(port);
    a1.subscribe("chat");
    let mut a2 = SdkClient::spawn();
    let id2 = connect2(&mut a2, port);
    assert!(sdk::is_socket_id(&id2), "{id2}");
    a2.subscribe("chat");

    // The same name in both apps is two channels: app 2's event reaches
    // neither app 1's subscriber nor the native one; app 1's reaches both
    // of those and not app 2's.
    trigger_on(port, true, "chat", "from-app2", "two");
    assert_eq!(a2.next_event_on("chat")["event"], "from-app2");
    trigger_on(port, false, "chat", "from-app1", "one");
    assert_eq!(a1.next_event_on("chat")["event"], "from-app1");
    let (channel, _, _, payload) = native.publication().await;
    assert_eq!(
        (channel.as_str(), payload.as_slice()),
        ("chat", &b"one"[..])
    );
    trigger_on(port, true, "chat", "marker2", "m");
    let e = a2.next_event_on("chat");
    assert_eq!(e["event"], "marker2", "app 1's event reached app 2: {e}");
    assert_eq!(e["channel"], "chat", "{e}");
    // A native publish stays with the default app.
    let mut publisher = common::Client::connect(s.addr).await;
    publisher.publish("chat", b"from native").await;
    assert_eq!(a1.next_event_on("chat")["data"], "from native");
    trigger_on(port, true, "chat", "marker2b", "m");
    assert_eq!(a2.next_event_on("chat")["event"], "marker2b");

    // A native client cannot open app 2's channel by its bus name.
    let id = native
        .request(|e, id| e.subscribe(id, "#app-2/chat", None))
        .await;
    match native.reply(id).await {
        shardcast::protocol::wire::ServerMessage::Error { code, .. } => {
            assert_eq!(
                code,
                shardcast::protocol::wire::ErrorCode::Unauthorized.as_u16()
            )
        }
        other => panic!("a native client opened #app-2/chat: {other:?}"),
    }

    // A private subscription signed with app 1's secret is refused on app 2.
    let mut forger = SdkClient::spawn();
    forger.connect_with(json!({"port": port, "key": APP2_KEY, "secret": APP_SECRET}));
    let refused = forger.subscribe_with("private-room", json!({}));
    assert_eq!(refused["type"], "subscription_error", "{refused}");
    assert_eq!(refused["status"], 401, "{refused}");
    forger.assert_stayed_connected();

    // Presence and client events stay inside their app.
    a1.join("presence-room", json!("1"), json!({"app": 1}));
    let mut b2 = SdkClient::spawn();
    connect2(&mut b2, port);
    let joined = a2.join("presence-room", json!("2"), json!({"app": 2}));
    assert_eq!(
        joined["count"], 1,
        "app 1's member is not app 2's: {joined}"
    );
    assert_eq!(joined["channel"], "presence-room", "{joined}");
    let joined = b2.join("presence-room", json!("3"), json!({"app": 2}));
    assert_eq!(joined["count"], 2, "{joined}");
    let added = a2.event("presence-room", "pusher:member_added");
    assert_eq!(id_text(&added["data"]["id"]), "3", "{added}");
    b2.send(&json!({"op": "trigger_client", "channel": "presence-room",
                    "event": "client-typing", "data": {"from": "b2"}}));
    let e = a2.next_event_on("presence-room");
    assert_eq!(
        (&e["event"], &e["user_id"]),
        (&json!("client-typing"), &json!("3")),
        "{e}"
    );
    // Had app 2's joins or client event reached app 1's presence-room,
    // they would come before this marker.
    trigger_on(port, false, "presence-room", "marker1", "m");
    let e = a1.next_event_on("presence-room");
    assert_eq!(e["event"], "marker1", "app 2 leaked into app 1: {e}");

    // The channels API of each app lists its own channels by their names.
    let until = std::time::Instant::now() + WAIT;
    loop {
        let r = sdk::trigger(&api2(port, json!({"op": "channels"})));
        assert_eq!(r["status"], 200, "{r}");
        if r["body"] == json!({"channels": {"chat": {}, "presence-room": {}}}) {
            break;
        }
        assert!(std::time::Instant::now() < until, "app 2's channels: {r}");
    }
    let r = sdk::trigger(&api2(
        port,
        json!({"op": "channels", "filter_by_prefix": "presence-", "info": "user_count"}),
    ));
    assert_eq!(
        r["body"],
        json!({"channels": {"presence-room": {"user_count": 2}}}),
        "{r}"
    );
    let r = sdk::trigger(&api2(
        port,
        json!({"op": "users", "channel": "presence-room"}),
    ));
    assert_eq!(
        r["body"],
        json!({"users": [{"id": "2"}, {"id": "3"}]}),
        "{r}"
    );
    let r = sdk::trigger(&sdk::api(port, json!({"op": "channels"})));
    let listed: Vec<&String> = r["body"]["channels"]
        .as_object()
        .unwrap_or_else(|| panic!("{r}"))
        .keys()
        .collect();
    assert!(
        listed.iter().all(|c| !c.starts_with("#app-")),
        "app 1 lists app 2's channels: {r}"
    );
    let r = sdk::trigger(&api2(
        port,
        json!({"op": "trigger", "channels": ["chat"], "event": "e", "data": "x",
               "info": "subscription_count"}),
    ));
    assert_eq!(
        r["body"],
        json!({"channels": {"chat": {"subscription_count": 1}}}),
        "{r}"
    );

    // A name that fits alone but not with app 2's namespace (`#app-2/`,
    // 7 bytes) is refused: subscription_error 400, HTTP 400; app 1 takes it.
    let long = "x".repeat(195);
    let mut ws = pusher_ws(s.addr, &format!("/app/{APP2_KEY}?protocol=7")).await;
    let m = next_json(&mut ws).await;
    assert_eq!(m["event"], "pusher:connection_established", "{m}");
    send_text(
        &mut ws,
        &json!({"event": "pusher:subscribe", "data": {"channel": long}}).to_string(),
    )
    .await;
    let m = next_json(&mut ws).await;
    assert_eq!(m["event"], "pusher:subscription_error", "{m}");
    assert_eq!(m["channel"], long.as_str(), "{m}");
    assert_eq!(data_of(&m)["status"], 400, "{m}");
    let r = sdk::trigger(&api2(
        port,
        json!({"op": "trigger", "channels": [long], "event": "e", "data": "x"}),
    ));
    assert_eq!(r["status"], 400, "{r}");
    trigger_on(port, false, &long, "e", "x");

    // Unknown key: 4001; unknown id: 404.
    let mut ws = pusher_ws(s.addr, "/app/no-such-key?protocol=7").await;
    assert_eq!(expect_close(&mut ws).await.0, 4001);
    let r = sdk::trigger(&sdk::merged(
        &api2(
            port,
            json!({"op": "trigger", "channels": ["chat"], "event": "e", "data": "x"}),
        ),
        json!({"appId": "9"}),
    ));
    assert_eq!(r["status"], 404, "{r}");

    // The PyPI SDK's /users/… path finds app 2 by its key: only app 2's
    // user is terminated.
    let mut u1 = SdkClient::spawn();
    u1.connect_with(json!({"port": port, "key": APP_KEY, "secret": APP_SECRET,
                           "signin_user": {"id": "u1", "user_info": {}}}));
    let mut u2 = SdkClient::spawn();
    u2.connect_with(json!({"port": port, "key": APP2_KEY, "secret": APP2_SECRET,
                           "appId": APP2_ID, "signin_user": {"id": "u1", "user_info": {}}}));
    for u in [&mut u1, &mut u2] {
        u.send(&json!({"op": "signin"}));
        u.next_matching(
            has(json!({"type": "subscribed", "channel": "#server-to-user-u1"})),
            WAIT,
        );
    }
    let r = sdk::trigger_py(&api2(port, json!({"op": "terminate", "user_id": "u1"})));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(u2.closed()["code"], 4009);
    u1.round_trip();
    u1.assert_stayed_connected();
    a1.assert_stayed_connected();
    a2.assert_stayed_connected();
}

#[test]
fn a_connection_signed_in_as_one_user_cannot_sign_in_as_another() {
    let s = Server::start(&sdk::pusher_args(&[]));
    let port = s.addr.port();
    let mut u = SdkClient::spawn();
    let socket_id = u.connect_with(json!({"port": port, "key": APP_KEY, "secret": APP_SECRET,
                                          "signin_user": {"id": "u1", "user_info": {}}}));
    u.send(&json!({"op": "signin"}));
    u.next_matching(has(json!({"type": "signed_in"})), WAIT);
    // A valid signature for u2 on the same socket (the app's backend made
    // it): refused, the connection stays u1.
    let signed = sdk::trigger(&sdk::api(
        port,
        json!({"op": "authenticate_user", "socket_id": socket_id, "user": {"id": "u2"}}),
    ));
    let frame = json!({"event": "pusher:signin", "data": signed["body"]});
    u.send(&json!({"op": "send_raw", "data": frame.to_string()}));
    let err = u.next_matching(has(json!({"type": "pusher_error"})), WAIT);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or("")
            .contains("another user"),
        "{err}"
    );
    // u1's messages still reach it; u2's do not.
    sdk::trigger_ok(
        port,
        json!({"op": "send_to_user", "user_id": "u2", "event": "for-u2", "data": {}}),
    );
    sdk::trigger_ok(
        port,
        json!({"op": "send_to_user", "user_id": "u1", "event": "for-u1", "data": {}}),
    );
    let got = u.next_matching(has(json!({"type": "user_event"})), WAIT);
    assert_eq!(got["event"], "for-u1", "{got}");
    u.assert_stayed_connected();
}
