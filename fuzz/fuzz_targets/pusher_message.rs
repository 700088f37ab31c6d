//! Arbitrary text frames from a Pusher client through
//! `protocol::pusher::message::parse`, and the publication bodies the
//! server makes of what it accepts through `protocol::body`.
//!
//! Checked: no panic; the same text parses the same way twice; an accepted
//! client event keeps its data as valid JSON and its name under 200 bytes
//! with the `client-` prefix; the body made of it decodes back to the same
//! name, data and excluded socket; a body decoded from arbitrary bytes
//! never panics and its data is a suffix of those bytes; refusals have a
//! message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::protocol::body;
use shardcast::protocol::pusher::message::{parse, ClientMessage, MAX_EVENT_NAME_BYTES};

fuzz_target!(|data: &[u8]| {
    let decoded = body::decode(data);
    assert!(data.ends_with(decoded.data), "body data is a suffix");

    let text = String::from_utf8_lossy(data);
    let first = parse(&text);
    let again = parse(&text);
    match (&first, &again) {
        (Ok(a), Ok(b)) => assert!(a == b, "same text, same message"),
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            assert!(!a.to_string().is_empty());
        }
        _ => panic!("parse is not deterministic"),
    }
    if let Ok(ClientMessage::ClientEvent {
        event,
        channel,
        data,
    }) = first
    {
        assert!(event.starts_with("client-") && event.len() <= MAX_EVENT_NAME_BYTES);
        let raw = data.get();
        serde_json::from_str::<serde_json::Value>(raw).expect("client data is JSON");
        let b = body::event(&event, true, None, Some("1.2"), raw.as_bytes());
        let d = body::decode(&b);
        assert_eq!(d.event, Some(event.as_str()));
        assert_eq!(d.data, raw.as_bytes());
        assert_eq!(d.exclude, Some("1.2"));
        assert!(d.raw_json);
        let _ = channel;
    }
});
