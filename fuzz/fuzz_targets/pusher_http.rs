//! Arbitrary bytes, arbitrarily chunked, as a Pusher HTTP API request on
//! the main port: `api::pusher_http::RequestReader::feed`, then `handle`
//! for a fixed app at a fixed time (so signatures are checked for real:
//! byte 1 odd signs the request here with the app's secret, so what lies
//! behind the signature check is reached too).
//!
//! Input layout: byte 0 is the number `n % 16` of chunk-size bytes that
//! follow (each `s` a chunk of `s + 1` bytes, cycled); then the mode byte;
//! the rest is the data.
//!
//! Checked: no panic; chunked and one-piece reads give the same request or
//! the same refusal; the buffer never holds more than the head and body
//! limits allow; every answer is JSON with a status the API documents;
//! publications have valid channel names and at most the configured
//! number of channels and events.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::api::pusher_http::{handle, Outcome, Request, RequestReader};
use shardcast::protocol::channel;
use shardcast::protocol::pusher::sign::sign_api_request;
use shardcast::shard::PusherApp;

const MAX_HEAD: usize = 1024;
const MAX_BODY: usize = 4096;
const NOW: u64 = 1_800_000_000;

fn app() -> PusherApp {
    PusherApp {
        id: "1".into(),
        key: "key".into(),
        secret: b"secret".to_vec(),
        client_events: true,
        client_event_rate: 10,
        activity_timeout_secs: 120,
        max_event_bytes: 512,
        max_channels_per_trigger: 4,
        max_batch_events: 3,
        presence_max_members: 100,
        presence_max_user_info_bytes: 1024,
        namespace: String::new(),
    }
}

fn read(chunks: &[usize], data: &[u8]) -> Result<Option<Request>, u16> {
    let mut r = RequestReader::new(MAX_HEAD, MAX_BODY);
    let mut at = 0;
    let mut i = 0;
    while at < data.len() {
        let n = if chunks.is_empty() {
            data.len()
        } else {
            chunks[i % chunks.len()]
        };
        let end = (at + n).min(data.len());
        match r.feed(&data[at..end]) {
            Ok(Some(req)) => return Ok(Some(req)),
            Ok(None) => {}
            Err(resp) => return Err(resp.status),
        }
        at = end;
        i += 1;
    }
    Ok(None)
}

fuzz_target!(|input: &[u8]| {
    let Some((&n, rest)) = input.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let chunks: Vec<usize> = rest[..n].iter().map(|&s| usize::from(s) + 1).collect();
    let Some((&mode, data)) = rest[n..].split_first() else {
        return;
    };
    let whole = read(&[], data);
    let pieces = read(&chunks, data);
    match (&whole, &pieces) {
        (Ok(Some(a)), Ok(Some(b))) => {
            assert_eq!((&a.method, &a.path, &a.query, &a.body), (&b.method, &b.path, &b.query, &b.body));
            assert!(a.body.len() <= MAX_BODY);
        }
        (Ok(None), Ok(None)) => {}
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            assert!([400, 413, 431].contains(a), "status {a}");
        }
        _ => panic!("chunking changed the outcome: {whole:?} vs {pieces:?}"),
    }
    let Ok(Some(mut request)) = whole else {
        return;
    };
    if mode % 2 == 1 {
        // Signed here: the checks behind the signature are reached.
        request.query = sign_api_request(
            &request.method,
            &request.path,
            &[],
            &request.body,
            "key",
            b"secret",
            NOW,
        );
    }
    let app = app();
    match handle(&request, &app, NOW) {
        Outcome::Respond(r) => {
            assert!([200, 400, 401, 404, 405, 413].contains(&r.status), "status {}", r.status);
            serde_json::from_str::<serde_json::Value>(&r.body).expect("JSON answer");
        }
        Outcome::Publish(p) | Outcome::PublishThenCount(p, _) => {
            assert!(!p.is_empty());
            assert!(p.len() <= app.max_channels_per_trigger * app.max_batch_events);
            for publish in &p {
                channel::validate(&publish.channel).expect("a valid channel");
            }
        }
        Outcome::Query(_) => {}
    }
});
