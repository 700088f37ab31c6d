//! The Pusher Channels (protocol 7) client, shared by the two targets that
//! speak it: Sockudo (`sockudo.rs`) and shardcast's own Pusher endpoint
//! (`shardcast-pusher`, see `target.rs`). Both servers are given the app
//! whose credentials are the constants below.
//!
//! * **Subscribers** speak Pusher protocol 7 over WebSocket at
//!   [`WS_PATH`]: the server opens with `pusher:connection_established`, the
//!   client sends `pusher:subscribe` per channel and waits for
//!   `pusher_internal:subscription_succeeded`; publications arrive as
//!   `{"event":"bench","channel":…,"data":"<string>"}`; `pusher:ping` is
//!   answered with `pusher:pong`.
//! * **Publishers** use the Pusher HTTP API (`POST /apps/<id>/events`,
//!   signed with HMAC-SHA256 as Pusher documents), one HTTP/1.1 request per
//!   TCP connection because both servers close every API connection after
//!   its response; one sender task per publisher sends its queue in order,
//!   batching what queued up meanwhile (see [`HttpPublisher`]). The
//!   response is the publisher's acknowledgement: its time goes into
//!   *publish → ack* like a native `PublishAck`.
//!
//! The bench payload (`<stream>:<seq>:<intended ns>:` padded with `.`, see
//! `payload.rs`) is ASCII without quotes or backslashes, so it travels as
//! the event's `data` string unchanged and comes back byte for byte.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::clock::now_ns;
use crate::net::io_error;
use crate::proto::Event;

/// The app the bench configures (in Sockudo and in shardcast) and uses.
pub const APP_ID: &str = "shardcast-bench";
pub const APP_KEY: &str = "shardcast-bench-key";
pub const APP_SECRET: &str = "shardcast-bench-secret";

/// WebSocket path (with the app key and protocol version) for subscribers.
pub const WS_PATH: &str = "/app/shardcast-bench-key?protocol=7&client=shardcast-bench&version=1";

/// Event name of bench publications.
pub const EVENT: &str = "bench";

// ---------------------------------------------------------------------------
// Subscriber side (WebSocket)

#[derive(Serialize)]
struct Subscribe<'a> {
    event: &'a str,
    data: SubscribeData<'a>,
}

#[derive(Serialize)]
struct SubscribeData<'a> {
    channel: &'a str,
}

/// The frames that subscribe to `channels`, and how many
/// [`Event::Ready`] confirm the session: `connection_established` plus one
/// `subscription_succeeded` per channel. Subscribes are sent right after the
/// handshake; both servers send `connection_established` before they read
/// any client message (shardcast queues it behind the 101 response), so the
/// order on the wire is the protocol's.
pub fn setup(channels: &[String]) -> (Vec<Message>, usize) {
    let frames = channels
        .iter()
        .map(|ch| {
            let j = serde_json::to_string(&Subscribe {
                event: "pusher:subscribe",
                data: SubscribeData { channel: ch },
            })
            .expect("serialisable");
            Message::Text(j.into())
        })
        .collect();
    (frames, 1 + channels.len())
}

/// `data` of a Pusher message: a string for events, an object for some
/// `pusher:` messages (errors); only strings are kept.
enum Data<'a> {
    Str(Cow<'a, str>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Data<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Data<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Data::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Data::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Data::Str(Cow::Owned(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                while m
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Data::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<Self::Value, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Data::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Data::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Data::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Data::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Data::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Data::Other)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<Data<'a>>,
}

/// The reply to a server `pusher:ping`.
pub const PONG: &str = r#"{"event":"pusher:pong","data":{}}"#;

/// Interprets one text frame from a Pusher server.
pub fn handle(text: &str, on: &mut dyn FnMut(Event<'_>)) {
    let m: Incoming<'_> = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            return on(Event::Error(format!(
                "bad JSON from the server: {e}: {text}"
            )))
        }
    };
    match m.event.as_ref() {
        "pusher:connection_established" | "pusher_internal:subscription_succeeded" => {
            on(Event::Ready)
        }
        "pusher:ping" => on(Event::Reply(Message::Text(PONG.into()))),
        "pusher:pong" => {}
        "pusher:error" | "pusher:subscription_error" | "pusher_internal:subscription_error" => {
            on(Event::Error(text.to_owned()))
        }
        e if e.starts_with("pusher:") || e.starts_with("pusher_internal:") => {}
        _ => match m.data {
            Some(Data::Str(d)) => on(Event::Delivery(d.as_bytes())),
            _ => on(Event::Error(format!("event without string data: {text}"))),
        },
    }
}

// ---------------------------------------------------------------------------
// Publisher side (HTTP API)

#[derive(Serialize)]
struct TriggerBody<'a> {
    name: &'a str,
    channel: &'a str,
    data: &'a str,
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Pusher's `auth_signature`: hex HMAC-SHA256 with the app secret over
/// `METHOD\nPATH\nQUERY`, where QUERY is every parameter except
/// `auth_signature`, keys lowercase, sorted by key, `k=v` joined by `&`,
/// not URL-escaped.
pub fn signature(secret: &str, method: &str, path: &str, params: &[(&str, &str)]) -> String {
    let mut sorted: Vec<(String, &str)> = params
        .iter()
        .map(|(k, v)| (k.to_lowercase(), *v))
        .filter(|(k, _)| k != "auth_signature")
        .collect();
    sorted.sort();
    let query: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let to_sign = format!("{}\n{path}\n{}", method.to_uppercase(), query.join("&"));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(to_sign.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// The signed query string (auth parameters and `body_md5`) for a POST of
/// `body` to `path` at `timestamp` (Unix seconds; the server accepts
/// ±600 s).
pub fn signed_query(key: &str, secret: &str, path: &str, body: &[u8], timestamp: u64) -> String {
    let md5 = format!("{:x}", md5::compute(body));
    let ts = timestamp.to_string();
    let params = [
        ("auth_key", key),
        ("auth_timestamp", ts.as_str()),
        ("auth_version", "1.0"),
        ("body_md5", md5.as_str()),
    ];
    let sig = signature(secret, "POST", path, &params);
    format!(
        "auth_key={key}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}&auth_signature={sig}"
    )
}

/// The JSON body that triggers `EVENT` on `channel` with `payload` as the
/// event's `data` string.
pub fn trigger_body(channel: &str, payload: &[u8]) -> String {
    // The bench payload is ASCII; anything else is carried lossily (and
    // then fails payload::decode, i.e. shows up as an error, not silently).
    let data = String::from_utf8_lossy(payload);
    serde_json::to_string(&TriggerBody {
        name: EVENT,
        channel,
        data: &data,
    })
    .expect("serialisable")
}

/// Status and body of complete HTTP responses at the start of `buf`;
/// returns how many bytes they used. Handles `Content-Length` and chunked
/// bodies; stops at the first incomplete response.
pub fn parse_responses(buf: &[u8], out: &mut Vec<(u16, String)>) -> Result<usize, String> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(hend) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(at);
        };
        let head = std::str::from_utf8(&rest[..hend]).map_err(|_| "non-UTF-8 HTTP head")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad HTTP status line {status_line:?}"))?;
        let mut len = None;
        let mut chunked = false;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                len = Some(v.parse::<usize>().map_err(|_| "bad Content-Length")?);
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
        let body_start = hend + 4;
        let (body, used) = if chunked {
            let mut p = body_start;
            let mut body = Vec::new();
            loop {
                let Some(nl) = rest[p..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(at);
                };
                let size_s = std::str::from_utf8(&rest[p..p + nl]).map_err(|_| "bad chunk size")?;
                let size = usize::from_str_radix(size_s.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| format!("bad chunk size {size_s:?}"))?;
                p += nl + 2;
                if size == 0 {
                    // Trailers (none expected), then the final CRLF.
                    let Some(end) = rest[p..].windows(2).position(|w| w == b"\r\n") else {
                        return Ok(at);
                    };
                    p += end + 2;
                    break;
                }
                if rest.len() < p + size + 2 {
                    return Ok(at);
                }
                body.extend_from_slice(&rest[p..p + size]);
                p += size + 2;
            }
            (body, p)
        } else {
            let len = len.unwrap_or(0);
            if rest.len() < body_start + len {
                return Ok(at);
            }
            (
                rest[body_start..body_start + len].to_vec(),
                body_start + len,
            )
        };
        out.push((status, String::from_utf8_lossy(&body).into_owned()));
        at += used;
    }
}

/// What the responses read so far said.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub acks: u64,
    pub errors: Vec<String>,
    /// (intended send, response received), ns, for every event of every
    /// request that was answered (2xx or not): the publisher's
    /// acknowledgement. Shardcast answers once the events are stored,
    /// Sockudo once it has fanned them out.
    pub answered: Vec<(u64, u64)>,
}

/// Most events per HTTP request: the default limit of both servers
/// (Sockudo's `max_batch_size`, shardcast's `pusher.max_batch_events`).
pub const MAX_BATCH: usize = 10;

#[derive(Serialize)]
struct Batch<'a> {
    batch: Vec<TriggerBody<'a>>,
}

/// The body and API path that trigger `events` (channel, payload) in
/// order: `/events` for one, `/batch_events` for several.
pub fn trigger_request(events: &[(String, Vec<u8>)]) -> (String, String) {
    if let [(channel, payload)] = events {
        return (
            format!("/apps/{APP_ID}/events"),
            trigger_body(channel, payload),
        );
    }
    let data: Vec<Cow<'_, str>> = events
        .iter()
        .map(|(_, p)| String::from_utf8_lossy(p))
        .collect();
    let batch = events
        .iter()
        .zip(&data)
        .map(|((channel, _), data)| TriggerBody {
            name: EVENT,
            channel,
            data,
        })
        .collect();
    (
        format!("/apps/{APP_ID}/batch_events"),
        serde_json::to_string(&Batch { batch }).expect("serialisable"),
    )
}

/// Triggers events through the HTTP API, in order.
///
/// Both servers answer every HTTP API request with `Connection: close`
/// (Sockudo 5: a layer on its API routes, "prevent idle HTTP connection
/// buildup"; shardcast: one request per connection by design), so
/// keep-alive and pipelining are not available: every request is its own
/// TCP connection. Requests on separate connections may be handled out of
/// order, so each publisher has one sender task that sends its queue one
/// request at a time; whatever queued up meanwhile goes in the next
/// request as a batch (`/batch_events`, up to [`MAX_BATCH`] events, kept
/// in order). The publisher's schedule stays open-loop: [`Self::queue`]
/// never waits, and time spent queued shows up as latency because it is
/// measured from the intended send time carried in the payload. Must be
/// used inside a tokio `LocalSet` (the worker's runtime).
pub struct HttpPublisher {
    shared: Rc<SenderState>,
}

/// One event to trigger: (channel, payload).
type Trigger = (String, Vec<u8>);

struct SenderState {
    /// Events and their intended send times, ns.
    queue: RefCell<VecDeque<(Trigger, u64)>>,
    outcome: RefCell<Outcome>,
    wake: Notify,
    closed: Cell<bool>,
}

async fn open_tcp(addr: SocketAddr, src: Ipv4Addr) -> Result<TcpStream, String> {
    crate::net::connect_from(addr, src, "HTTP API connect").await
}

/// One request on a fresh connection; the response's status and body.
async fn request(addr: SocketAddr, src: Ipv4Addr, req: &[u8]) -> Result<(u16, String), String> {
    let mut stream = open_tcp(addr, src).await?;
    stream
        .write_all(req)
        .await
        .map_err(|e| io_error("HTTP API write", &e))?;
    let mut buf = Vec::with_capacity(512);
    let mut got = Vec::new();
    loop {
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| io_error("HTTP API read", &e))?;
        parse_responses(&buf, &mut got)?;
        if let Some(r) = got.pop() {
            return Ok(r);
        }
        if n == 0 {
            return Err("the server closed the HTTP API connection without a response".into());
        }
    }
}

/// The signed HTTP request that triggers `events`.
fn signed_request(host: SocketAddr, events: &[(String, Vec<u8>)]) -> Vec<u8> {
    let (path, body) = trigger_request(events);
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let query = signed_query(APP_KEY, APP_SECRET, &path, body.as_bytes(), ts);
    let mut req = Vec::with_capacity(body.len() + query.len() + 160);
    let _ = write!(
        VecWriter(&mut req),
        "POST {path}?{query} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    req
}

async fn sender(st: Rc<SenderState>, addr: SocketAddr, src: Ipv4Addr, timeout: Duration) {
    loop {
        let (events, intended): (Vec<Trigger>, Vec<u64>) = {
            let mut q = st.queue.borrow_mut();
            let n = q.len().min(MAX_BATCH);
            q.drain(..n).unzip()
        };
        if events.is_empty() {
            if st.closed.get() {
                return;
            }
            st.wake.notified().await;
            continue;
        }
        let req = signed_request(addr, &events);
        let r = tokio::time::timeout(timeout, request(addr, src, &req))
            .await
            .unwrap_or_else(|_| Err(format!("HTTP API request timed out after {timeout:?}")));
        let at = now_ns();
        let mut o = st.outcome.borrow_mut();
        if r.is_ok() {
            o.answered.extend(intended.iter().map(|&i| (i, at)));
        }
        match r {
            Ok((status, _)) if (200..300).contains(&status) => o.acks += events.len() as u64,
            Ok((status, body)) => o
                .errors
                .push(format!("HTTP API answered {status}: {}", body.trim())),
            Err(e) => o.errors.push(e),
        }
    }
}

impl HttpPublisher {
    /// A publisher to the server's HTTP API at `addr`, from source address
    /// `src`; checks once that the API port accepts connections, then
    /// starts its sender task.
    pub async fn connect(
        addr: SocketAddr,
        src: Ipv4Addr,
        timeout: Duration,
    ) -> Result<Self, String> {
        tokio::time::timeout(timeout, open_tcp(addr, src))
            .await
            .map_err(|_| format!("HTTP API connect timed out after {timeout:?}"))??;
        let shared = Rc::new(SenderState {
            queue: RefCell::new(VecDeque::new()),
            outcome: RefCell::new(Outcome::default()),
            wake: Notify::new(),
            closed: Cell::new(false),
        });
        tokio::task::spawn_local(sender(shared.clone(), addr, src, timeout));
        Ok(Self { shared })
    }

    /// Queues one trigger of `payload` on `channel`, due at `intended_ns`
    /// (for publish → ack); [`Self::flush`] hands the queue to the sender.
    pub fn queue(&mut self, channel: &str, payload: &[u8], intended_ns: u64) {
        self.shared
            .queue
            .borrow_mut()
            .push_back(((channel.to_owned(), payload.to_vec()), intended_ns));
    }

    /// Wakes the sender and returns what the responses that arrived since
    /// the last call said. Never waits for the server.
    pub async fn flush(&mut self) -> Result<Outcome, String> {
        self.shared.wake.notify_one();
        Ok(self.take_outcome())
    }

    /// What the responses that arrived since the last call said, without
    /// waking the sender.
    pub fn take_outcome(&mut self) -> Outcome {
        std::mem::take(&mut *self.shared.outcome.borrow_mut())
    }
}

impl Drop for HttpPublisher {
    fn drop(&mut self) {
        // The sender finishes what is queued, then stops.
        self.shared.closed.set(true);
        self.shared.wake.notify_one();
    }
}

/// `fmt::Write` into a byte vector.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{self, Stamp};

    fn events(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        handle(text, &mut |e| {
            out.push(match e {
                Event::Delivery(d) => format!("D:{}", String::from_utf8_lossy(d)),
                Event::Reply(Message::Text(t)) => format!("R:{}", t.as_str()),
                other => format!("{other:?}"),
            })
        });
        out
    }

    /// The worked example of Pusher's HTTP API reference ("Worked
    /// authentication example"): app 3, key 278d425bdf160c739803, secret
    /// 7ad3773142a6692b25b8, timestamp 1353088179.
    #[test]
    fn signature_matches_pushers_worked_example() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let q = signed_query(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "/apps/3/events",
            body,
            1353088179,
        );
        assert_eq!(
            q,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn signature_sorts_and_lowercases_keys_and_skips_itself() {
        let a = signature("s", "post", "/p", &[("b", "2"), ("A", "1")]);
        let b = signature(
            "s",
            "POST",
            "/p",
            &[("a", "1"), ("b", "2"), ("auth_signature", "x")],
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn session_messages() {
        let (frames, want) = setup(&["room.1".into(), "room.2".into()]);
        assert_eq!(want, 3);
        assert_eq!(
            frames[0].to_text().unwrap(),
            r#"{"event":"pusher:subscribe","data":{"channel":"room.1"}}"#
        );
        assert_eq!(
            events(
                r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"123.456\",\"activity_timeout\":120}"}"#
            ),
            ["Ready"]
        );
        assert_eq!(
            events(
                r#"{"event":"pusher_internal:subscription_succeeded","channel":"room.1","data":"{}"}"#
            ),
            ["Ready"]
        );
        assert_eq!(
            events(r#"{"event":"pusher:ping","data":{}}"#),
            [format!("R:{PONG}")]
        );
        assert!(events(r#"{"event":"pusher:pong","data":"{}"}"#).is_empty());
        let e = events(
            r#"{"event":"pusher:error","data":{"code":4001,"message":"App key not in use"}}"#,
        );
        assert!(e[0].starts_with("Error(") && e[0].contains("4001"), "{e:?}");
        assert!(events("not json")[0].starts_with("Error("));
        assert!(
            events(r#"{"event":"bench","channel":"c","data":{"x":1}}"#)[0].starts_with("Error(")
        );
    }

    #[test]
    fn data_events_are_deliveries() {
        assert_eq!(
            events(r#"{"event":"bench","channel":"fanout","data":"1:2:3:...."}"#),
            ["D:1:2:3:...."]
        );
        // Escaped strings are unescaped.
        assert_eq!(
            events(r#"{"channel":"c","event":"bench","data":"a\"b"}"#),
            ["D:a\"b"]
        );
    }

    #[test]
    fn payload_round_trips_through_the_data_string() {
        let stamp = Stamp {
            stream: 0xabc_0001,
            seq: 41,
            intended_ns: 1_700_000_000_123_456_789,
        };
        let mut buf = Vec::new();
        payload::encode(stamp, 64, &mut buf);
        let body = trigger_body("room.7", &buf);
        // What the server relays: the body's `data` string as the event's.
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["name"].as_str(), v["channel"].as_str()),
            (Some(EVENT), Some("room.7"))
        );
        let relayed =
            serde_json::json!({"event": EVENT, "channel": "room.7", "data": v["data"]}).to_string();
        let mut got = None;
        handle(&relayed, &mut |e| {
            if let Event::Delivery(d) = e {
                got = payload::decode(d);
            }
        });
        assert_eq!(got, Some(stamp));
    }

    #[test]
    fn batches_keep_order_and_single_events_use_events() {
        let one = vec![("c".to_string(), b"1:0:5:".to_vec())];
        let (path, body) = trigger_request(&one);
        assert_eq!(path, format!("/apps/{APP_ID}/events"));
        assert_eq!(body, trigger_body("c", b"1:0:5:"));
        let many: Vec<(String, Vec<u8>)> = (0..3)
            .map(|i| (format!("room.{i}"), format!("1:{i}:5:").into_bytes()))
            .collect();
        let (path, body) = trigger_request(&many);
        assert_eq!(path, format!("/apps/{APP_ID}/batch_events"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let b = v["batch"].as_array().unwrap();
        assert_eq!(b.len(), 3);
        for (i, e) in b.iter().enumerate() {
            assert_eq!(e["name"], EVENT);
            assert_eq!(e["channel"], format!("room.{i}"));
            assert_eq!(e["data"], format!("1:{i}:5:"));
        }
    }

    /// One request as a stand-in API server reads it: (path, query, body).
    async fn read_request(s: &mut TcpStream) -> Option<(String, String, String)> {
        let mut buf = Vec::new();
        loop {
            if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..h]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if buf.len() >= h + 4 + len {
                    let target = head.split(' ').nth(1).unwrap_or("");
                    let (path, query) = target.split_once('?').unwrap_or((target, ""));
                    let body = String::from_utf8_lossy(&buf[h + 4..h + 4 + len]).into_owned();
                    return Some((path.into(), query.into(), body));
                }
            }
            if s.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    /// The sender against a stand-in API server that answers `200 {}` and
    /// closes, as both servers do: one request at a time, in queue order,
    /// what queued up meanwhile as one `batch_events`, each signed so the
    /// server can check it, and every event answered with its intended
    /// time.
    #[test]
    fn publisher_sends_in_order_and_reports_answers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::task::spawn_local(async move {
                let mut seen = Vec::new();
                while seen.len() < 2 {
                    let (mut s, _) = l.accept().await.unwrap();
                    // `connect` probes the port once and sends nothing.
                    let Some((path, query, body)) = read_request(&mut s).await else {
                        continue;
                    };
                    let params: Vec<(&str, &str)> = query
                        .split('&')
                        .filter_map(|kv| kv.split_once('='))
                        .collect();
                    let sig = params.iter().find(|(k, _)| *k == "auth_signature").unwrap().1;
                    assert_eq!(sig, signature(APP_SECRET, "POST", &path, &params));
                    let md5 = params.iter().find(|(k, _)| *k == "body_md5").unwrap().1;
                    assert_eq!(md5, format!("{:x}", md5::compute(&body)));
                    s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                    )
                    .await
                    .unwrap();
                    seen.push((path, body));
                }
                seen
            });
            let src = Ipv4Addr::LOCALHOST;
            let mut p = HttpPublisher::connect(addr, src, Duration::from_secs(10))
                .await
                .unwrap();
            let mut got = Outcome::default();
            // Waits (without a deadline of its own: the test harness has
            // one) until `n` events were answered.
            async fn until(p: &mut HttpPublisher, got: &mut Outcome, n: usize) {
                while got.answered.len() < n {
                    let o = p.flush().await.unwrap();
                    got.acks += o.acks;
                    got.errors.extend(o.errors);
                    got.answered.extend(o.answered);
                    tokio::task::yield_now().await;
                }
            }
            p.queue("room.1", b"1:0:10:", 10);
            until(&mut p, &mut got, 1).await;
            p.queue("room.1", b"1:1:11:", 11);
            p.queue("room.2", b"2:0:12:", 12);
            until(&mut p, &mut got, 3).await;
            assert_eq!(got.acks, 3);
            assert!(got.errors.is_empty(), "{:?}", got.errors);
            let intended: Vec<u64> = got.answered.iter().map(|a| a.0).collect();
            assert_eq!(intended, [10, 11, 12]);
            assert!(got.answered.iter().all(|&(i, at)| at > i));
            let seen = server.await.unwrap();
            let one = [("room.1".to_string(), b"1:0:10:".to_vec())];
            let two = [
                ("room.1".to_string(), b"1:1:11:".to_vec()),
                ("room.2".to_string(), b"2:0:12:".to_vec()),
            ];
            assert_eq!(seen, [trigger_request(&one), trigger_request(&two)]);
        });
    }

    #[test]
    fn http_responses_pipelined_and_split() {
        let one = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
        let chunked = b"HTTP/1.1 401 Unauthorized\r\ntransfer-encoding: chunked\r\n\r\n5\r\nbad s\r\n3\r\nig.\r\n0\r\n\r\n";
        let mut all = Vec::new();
        all.extend_from_slice(one);
        all.extend_from_slice(chunked);
        all.extend_from_slice(&one[..20]);
        let mut out = Vec::new();
        let used = parse_responses(&all, &mut out).unwrap();
        assert_eq!(used, one.len() + chunked.len());
        assert_eq!(
            out,
            [
                (200, "{\"ok\":true}".to_string()),
                (401, "bad sig.".to_string())
            ]
        );
        // An incomplete chunked response is left for later.
        let mut out = Vec::new();
        assert_eq!(parse_responses(&chunked[..60], &mut out).unwrap(), 0);
        assert!(out.is_empty());
        assert!(parse_responses(b"garbage\r\n\r\n", &mut out).is_err());
    }
}
