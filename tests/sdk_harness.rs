//! The SDK harness itself (tests/sdk/, tests/common/sdk.rs) works, whatever
//! the server answers on its Pusher endpoints: the drivers start, speak
//! their JSON lines, report a refused connection as such, sign as the
//! protocol says, and pusher-js reports the server's answer in the shape
//! the tests rely on. Keeps the harness from rotting.

mod common;

use common::sdk::{self, SdkClient};
use common::{free_port, Server, WAIT};
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};

fn hmac_hex(secret: &str, data: &str) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(data.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn is_socket_id(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    let mut parts = s.split('.');
    let digits =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    digits(parts.next()) && digits(parts.next()) && parts.next().is_none()
}

#[test]
fn trigger_js_reports_a_refused_connection() {
    let port = free_port();
    let r = sdk::trigger(&sdk::api(
        port,
        json!({"op": "trigger", "channels": ["a"], "event": "e", "data": {"x": 1}, "socket_id": null}),
    ));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["status"], Value::Null, "{r}");
    assert!(
        r["cause"].as_str().unwrap_or("").contains("ECONNREFUSED"),
        "{r}"
    );
    // The signed URL went to the port asked for, on the app's path.
    let url = r["url"].as_str().unwrap_or("");
    assert!(
        url.starts_with(&format!("http://127.0.0.1:{port}/apps/1/events?")),
        "{r}"
    );

    // What the SDK refuses itself is reported as thrown, nothing sent.
    let r = sdk::trigger(&sdk::api(
        port,
        json!({"op": "trigger", "channels": ["not a channel"], "event": "e", "data": {}}),
    ));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["thrown"], true, "{r}");
}

#[test]
fn trigger_py_reports_a_refused_connection() {
    let port = free_port();
    for op in [
        json!({"op": "trigger", "channels": ["a"], "event": "e", "data": {"x": 1}}),
        json!({"op": "channels", "filter_by_prefix": "presence-", "info": "user_count"}),
    ] {
        let r = sdk::trigger_py(&sdk::api(port, op));
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["status"], Value::Null, "{r}");
        assert_eq!(r["thrown"], false, "{r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap_or("")
                .starts_with("ConnectionError"),
            "{r}"
        );
    }
}

/// Both server SDKs sign channel subscriptions as `key:HMAC-SHA256(secret,
/// socket_id:channel[:channel_data])`, the rule the server checks: the
/// harness's auth path (client.js signs with pusher-http-node) is sound.
#[test]
fn sdk_channel_signatures_follow_the_protocol() {
    let socket_id = "123.456";
    let user = json!({"user_id": "7", "user_info": {"name": "Ann"}});
    for channel in ["private-orders", "presence-room"] {
        let presence = channel.starts_with("presence-");
        let js = sdk::trigger(&sdk::api(
            0,
            json!({"op": "authorize_channel", "socket_id": socket_id, "channel": channel,
                   "user": if presence { user.clone() } else { Value::Null }}),
        ));
        let py = sdk::trigger_py(&sdk::api(
            0,
            json!({"op": "authenticate", "socket_id": socket_id, "channel": channel,
                   "user": if presence { user.clone() } else { Value::Null }}),
        ));
        for (sdk_name, r) in [("pusher-http-node", &js), ("pusher (PyPI)", &py)] {
            assert_eq!(r["ok"], true, "{sdk_name}: {r}");
            let body = &r["body"];
            let mut signed = format!("{socket_id}:{channel}");
            if presence {
                let data = body["channel_data"].as_str().expect("channel_data");
                let parsed: Value = serde_json::from_str(data).expect("channel_data is JSON");
                assert_eq!(parsed, user, "{sdk_name}");
                signed = format!("{signed}:{data}");
            } else {
                assert!(body.get("channel_data").is_none(), "{sdk_name}: {r}");
            }
            let want = format!("{}:{}", sdk::APP_KEY, hmac_hex(sdk::APP_SECRET, &signed));
            assert_eq!(body["auth"], want.as_str(), "{sdk_name}");
        }
    }
}

/// pusher-js against today's server: whether /app/KEY answers 404 (no
/// Pusher endpoint yet) or a real connection, the driver reports it in the
/// documented shape. Only the shape is asserted.
#[test]
fn client_js_reports_what_the_server_answers() {
    let s = Server::start(&[]);
    let port = s.addr.port();
    let mut c = SdkClient::spawn();

    // The locked SDK majors.
    for (field, major) in [
        ("pusher_js", "8."),
        ("laravel_echo", "2."),
        ("pusher_http_node", "5."),
    ] {
        let v = c.ready[field].as_str().unwrap_or("");
        assert!(v.starts_with(major), "{field} {v:?}: {}", c.ready);
    }

    c.send(
        &json!({"op": "connect", "port": port, "key": sdk::APP_KEY, "secret": sdk::APP_SECRET,
                   "options": {"unavailableTimeout": 5000}}),
    );
    // The state right after construction.
    let first = c.next_matching(sdk::has(json!({"type": "state"})), WAIT);
    assert_eq!(first["previous"], Value::Null, "{first}");
    assert_eq!(first["current"], "connecting", "{first}");

    // The server's answer: a socket closed with a code, or a new state.
    let answer = c.next_matching(
        |l| l["type"] == "closed" || (l["type"] == "state" && l["current"] != "connecting"),
        WAIT,
    );
    match answer["type"].as_str() {
        Some("closed") => {
            assert!(answer["code"].is_u64(), "{answer}");
            assert!(answer["reason"].is_string(), "{answer}");
            assert!(answer["was_clean"].is_boolean(), "{answer}");
        }
        Some("state") => {
            let current = answer["current"].as_str().unwrap_or("");
            assert!(
                ["connected", "unavailable", "failed", "disconnected"].contains(&current),
                "{answer}"
            );
            assert!(answer["previous"].is_string(), "{answer}");
            if current == "connected" {
                assert!(is_socket_id(&answer["socket_id"]), "{answer}");
            } else {
                assert_eq!(answer["socket_id"], Value::Null, "{answer}");
            }
        }
        _ => unreachable!(),
    }

    // Commands answer in order; a bad one is reported, not fatal.
    c.send(&json!({"op": "no-such-op"}));
    let err = c.next_matching(sdk::has(json!({"type": "op_error"})), WAIT);
    assert_eq!(err["op"], "no-such-op", "{err}");
    c.send(&json!({"op": "disconnect"}));
    c.send(&json!({"op": "info"}));
    let info = c.next_matching(sdk::has(json!({"type": "info"})), WAIT);
    assert_eq!(info["state"], "disconnected", "{info}");
    assert!(info["channels"].is_array(), "{info}");
}
