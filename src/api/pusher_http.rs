//! The Pusher HTTP API on the main listener, as pure functions: reading one
//! request ([`RequestReader`], httparse for the head, `Content-Length` for
//! the body, both bounded), and deciding what it asks ([`handle`]): events
//! to publish, or an answer right away. The shard driver feeds the bytes,
//! publishes through the bus like any other publish (ordered per channel,
//! stored with positions) and answers once the bus has stored them.
//!
//! Endpoints (Pusher HTTP API reference): `POST /apps/{app_id}/events`
//! (`name`, `data`, `channel` or `channels`, optional `socket_id` to leave
//! out) and `POST /apps/{app_id}/batch_events` (`batch`: a list of such
//! events). Every request is signed (`auth_key`, `auth_timestamp`,
//! `auth_version`, `body_md5`, `auth_signature`; see
//! `protocol::pusher::sign`). Errors are JSON `{"error": "…"}` with 400
//! (malformed), 401 (signature), 404 (app or path), 405 (method), 413 (too
//! large), 503 (the bus could not store it).

#![forbid(unsafe_code)]

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::pusher::channel::{to_client, APP_PREFIX, SERVER_TO_USER_PREFIX};
use crate::protocol::pusher::message::{valid_socket_id, MAX_EVENT_NAME_BYTES};
use crate::protocol::pusher::sign::{self, ApiRequest};
use crate::protocol::{body, channel};
use crate::shard::PusherApp;

/// The event that `terminate_connections` publishes on a user's
/// `#server-to-user-` channel: every Pusher connection signed in as that
/// user that receives it, on any node, is closed (4009) instead. Clients
/// cannot send it (HTTP API event names may not start with `pusher`).
pub const TERMINATE_EVENT: &str = "pusher_internal:terminate_connections";

/// The path prefix of the HTTP API: `/apps/{app_id}/…`.
pub const API_PATH: &str = "/apps/";

/// `/users/{user_id}/terminate_connections` without the `/apps/{app_id}`
/// prefix, as the PyPI `pusher` SDK sends it; served for the app whose key
/// is its `auth_key` ([`App::Key`]).
pub const USERS_PATH: &str = "/users/";

/// Most header lines in a request head.
pub const MAX_HEADERS: usize = 64;

/// A complete request.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string after `?` (empty if none), as sent.
    pub query: String,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// The `Idempotency-Key` header (draft-ietf-httpapi-idempotency-key-header),
    /// if sent: a retried request with the same key publishes nothing twice.
    pub idempotency_key: Option<String>,
}

/// Longest `Idempotency-Key` accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// An HTTP answer: status and JSON body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: String,
}

impl Response {
    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Response {
        Response {
            status,
            body: serde_json::json!({ "error": message }).to_string(),
        }
    }

    /// The whole HTTP/1.1 response; the connection closes after it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Content Too Large",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.status,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

/// Reads one request from the bytes of a connection: the head with
/// httparse (at most `max_head` bytes and [`MAX_HEADERS`] lines), then
/// `Content-Length` bytes of body (at most `max_body`).
pub struct RequestReader {
    buf: Vec<u8>,
    max_head: usize,
    max_body: usize,
    /// `Expect: 100-continue` (RFC 9110 §10.1.1): the client (curl, for
    /// bodies over 1 KiB) waits for `100 Continue` before the body.
    continue_owed: Option<bool>,
}

impl RequestReader {
    /// A reader with the given bounds, in bytes.
    pub fn new(max_head: usize, max_body: usize) -> RequestReader {
        RequestReader {
            buf: Vec::new(),
            max_head,
            max_body,
            continue_owed: None,
        }
    }

    /// Whether the client waits for `HTTP/1.1 100 Continue` before its body
    /// (true once, after a head with `Expect: 100-continue` was read and
    /// accepted).
    pub fn take_continue(&mut self) -> bool {
        if self.continue_owed == Some(true) {
            self.continue_owed = Some(false);
            return true;
        }
        false
    }

    /// Takes more bytes: `Ok(Some)` once the request is complete (bytes
    /// after it are ignored: one request per connection), `Ok(None)` for
    /// more, `Err` for the answer to a request that cannot be read (400,
    /// 413, 431).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Request>, Response> {
        self.buf.extend_from_slice(bytes);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if self.buf.len() > self.max_head {
                    return Err(Response::error(431, "request head too large"));
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Response::error(431, "too many header lines"))
            }
            Err(e) => return Err(Response::error(400, &format!("malformed request: {e}"))),
        };
        if head_len > self.max_head {
            return Err(Response::error(431, "request head too large"));
        }
        let mut length = 0usize;
        let mut expect_continue = false;
        let mut idempotency_key = None;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("idempotency-key") {
                let key = std::str::from_utf8(h.value)
                    .ok()
                    .map(str::trim)
                    .filter(|k| {
                        !k.is_empty()
                            && k.len() <= MAX_IDEMPOTENCY_KEY_BYTES
                            && k.bytes().all(|b| b.is_ascii_graphic())
                    })
                    .ok_or_else(|| {
                        Response::error(
                            400,
                            "Idempotency-Key must be 1 to 128 printable ASCII characters",
                        )
                    })?;
                idempotency_key = Some(key.to_string());
            }
            if h.name.eq_ignore_ascii_case("expect")
                && h.value.eq_ignore_ascii_case(b"100-continue")
            {
                expect_continue = true;
            }
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Response::error(
                    400,
                    "chunked bodies are not accepted: send Content-Length",
                ));
            }
            if h.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| Response::error(400, "bad Content-Length"))?;
            }
        }
        if length > self.max_body {
            return Err(Response::error(
                413,
                &format!("body is {length} bytes; the limit is {}", self.max_body),
            ));
        }
        if self.buf.len() < head_len + length {
            if expect_continue && self.continue_owed.is_none() {
                self.continue_owed = Some(true);
            }
            return Ok(None);
        }
        let target = req.path.unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Ok(Some(Request {
            method: req.method.unwrap_or("").to_string(),
            path: path.to_string(),
            query: query.to_string(),
            body: self.buf[head_len..head_len + length].to_vec(),
            idempotency_key,
        }))
    }
}

/// One event to publish.
#[derive(Debug)]
pub struct Publish {
    /// The channel.
    pub channel: String,
    /// The publication body (`protocol::body::event`).
    pub body: Bytes,
    /// The bus's idempotency key: the request's `Idempotency-Key`, and for
    /// a batch the event's place in it (`<key>#<i>`), so a retried request
    /// stores each publication once.
    pub idempotency_key: Option<String>,
}

/// What a request asks.
#[derive(Debug)]
pub enum Outcome {
    /// Answer now.
    Respond(Response),
    /// Publish these, in order; answer `200 {}` once all are stored, 503
    /// if one could not be.
    Publish(Vec<Publish>),
    /// Answer from the bus's channel counts and member lists.
    Query(ChannelsQuery),
    /// Publish these (as `Publish`), then answer with the channels'
    /// attributes the trigger's `info` asked for.
    PublishThenCount(Vec<Publish>, TriggerInfo),
}

/// What a trigger's `info` asks to have returned once its events are
/// stored: `{"channels": {name: {…}}}` for `events`, `{"batch": [{…}, …]}`
/// (one per event, in order) for `batch_events`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TriggerInfo {
    /// `batch_events`: one answer per event, in order.
    pub batch: bool,
    /// For each event (or the one event's channels): its channel and the
    /// attributes asked, as (subscription_count, user_count).
    pub channels: Vec<(String, bool, bool)>,
}

impl TriggerInfo {
    /// The answer, from the channels' subscription counts and (presence
    /// channels) user counts.
    pub fn response(
        &self,
        counts: &std::collections::HashMap<String, u64>,
        users: &std::collections::HashMap<String, usize>,
    ) -> Response {
        let attrs = |(channel, subs, user_count): &(String, bool, bool)| {
            let mut info = serde_json::Map::new();
            if *subs {
                info.insert(
                    "subscription_count".into(),
                    counts.get(channel).copied().unwrap_or(0).into(),
                );
            }
            if *user_count && crate::bus::is_presence(channel) {
                info.insert(
                    "user_count".into(),
                    users.get(channel).copied().unwrap_or(0).into(),
                );
            }
            serde_json::Value::from(info)
        };
        if self.batch {
            let batch: Vec<serde_json::Value> = self.channels.iter().map(attrs).collect();
            ok(serde_json::json!({ "batch": batch }))
        } else {
            let mut out = serde_json::Map::new();
            for c in &self.channels {
                out.insert(to_client(&c.0).to_string(), attrs(c));
            }
            ok(serde_json::json!({ "channels": out }))
        }
    }
}

/// A channel-information request (`GET …/channels…`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelsQuery {
    /// `GET /apps/{id}/channels[?filter_by_prefix=P][&info=…]`: every
    /// channel with a subscriber.
    List {
        /// `filter_by_prefix`, or empty.
        prefix: String,
        /// `info` has `user_count` (only with a `presence-` prefix).
        user_count: bool,
        /// `info` has `subscription_count`.
        subscription_count: bool,
    },
    /// `GET /apps/{id}/channels/{name}[?info=…]`.
    One {
        /// The channel.
        channel: String,
        /// `info` has `user_count` (presence channels only).
        user_count: bool,
        /// `info` has `subscription_count`.
        subscription_count: bool,
    },
    /// `GET /apps/{id}/channels/{name}/users` (presence channels only).
    Users {
        /// The channel.
        channel: String,
    },
}

impl ChannelsQuery {
    /// The answer to a `List`: `channels` with their subscription counts
    /// (sorted), and for `user_count` each one's number of users.
    pub fn list_response(
        subscription_count: bool,
        channels: &[(std::sync::Arc<str>, u64)],
        users: &std::collections::HashMap<std::sync::Arc<str>, usize>,
        user_count: bool,
    ) -> Response {
        let mut out = serde_json::Map::new();
        for (name, subs) in channels {
            let mut info = serde_json::Map::new();
            if user_count {
                info.insert(
                    "user_count".into(),
                    users.get(name).copied().unwrap_or(0).into(),
                );
            }
            if subscription_count {
                info.insert("subscription_count".into(), (*subs).into());
            }
            out.insert(to_client(name).to_string(), info.into());
        }
        ok(serde_json::json!({ "channels": out }))
    }

    /// The answer to a `One`.
    pub fn one_response(subscription_count: bool, subs: u64, users: Option<usize>) -> Response {
        let mut info = serde_json::Map::new();
        info.insert("occupied".into(), (subs > 0).into());
        if let Some(n) = users {
            info.insert("user_count".into(), n.into());
        }
        if subscription_count {
            info.insert("subscription_count".into(), subs.into());
        }
        ok(info.into())
    }

    /// The answer to `Users`: each user id once.
    pub fn users_response(ids: &[&str]) -> Response {
        let users: Vec<serde_json::Value> = ids
            .iter()
            .map(|id| serde_json::json!({ "id": id }))
            .collect();
        ok(serde_json::json!({ "users": users }))
    }
}

fn ok(body: serde_json::Value) -> Response {
    Response {
        status: 200,
        body: body.to_string(),
    }
}

/// Reads `info=a,b` of a query string: (user_count, subscription_count),
/// or the name of an attribute this server does not know.
fn info_of(query: &str) -> Result<(bool, bool), String> {
    let mut user_count = false;
    let mut subscription_count = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k != "info" {
            continue;
        }
        for attr in v.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match attr {
                "user_count" => user_count = true,
                "subscription_count" => subscription_count = true,
                other => return Err(other.to_string()),
            }
        }
    }
    Ok((user_count, subscription_count))
}

fn param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The user of a `users/{user_id}/terminate_connections` endpoint (slices
/// that cannot overlap: `users/terminate_connections` is no user's).
fn terminate_user(endpoint: &str) -> Option<&str> {
    endpoint
        .strip_prefix("users/")?
        .strip_suffix("/terminate_connections")
}

/// The channel-information endpoints (`GET`).
fn channels_query(app: &PusherApp, endpoint: &str, query: &str) -> Outcome {
    let reply = |status, msg: &str| Outcome::Respond(Response::error(status, msg));
    let (user_count, subscription_count) = match info_of(query) {
        Ok(i) => i,
        Err(attr) => {
            return reply(
                400,
                &format!(
                    "info attribute {attr:?} is not known: use user_count, subscription_count"
                ),
            )
        }
    };
    if endpoint == "channels" {
        let prefix = param(query, "filter_by_prefix").unwrap_or_default();
        if user_count && !prefix.starts_with("presence-") {
            return reply(
                400,
                "info=user_count needs filter_by_prefix=presence- (user counts are for presence channels)",
            );
        }
        return Outcome::Query(ChannelsQuery::List {
            // The bus lists the app's channels by their namespace.
            prefix: format!("{}{prefix}", app.namespace),
            user_count,
            subscription_count,
        });
    }
    let Some(rest) = endpoint.strip_prefix("channels/") else {
        return reply(404, &format!("no endpoint {endpoint:?}"));
    };
    let (name, users) = match rest.strip_suffix("/users") {
        Some(name) => (name, true),
        None => (rest, false),
    };
    let name = match percent_decode(name) {
        Some(n) => n,
        None => return reply(400, "channel name is not valid percent-encoding"),
    };
    let presence = crate::bus::is_presence(&name);
    let name = match bus_channel(app, &name) {
        Ok(n) => n,
        Err(e) => return reply(400, &e),
    };
    if users {
        if !presence {
            return reply(400, "users are listed for presence channels only");
        }
        return Outcome::Query(ChannelsQuery::Users { channel: name });
    }
    if user_count && !presence {
        return reply(400, "info=user_count is for presence channels only");
    }
    Outcome::Query(ChannelsQuery::One {
        channel: name,
        user_count,
        subscription_count,
    })
}

/// Decodes `%XX` escapes of a path segment (channel names may carry `#`,
/// which clients send as `%23`).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Deserialize)]
struct Event<'a> {
    name: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    channel: Option<String>,
    channels: Option<Vec<String>>,
    socket_id: Option<String>,
    /// Attributes to return once stored: `subscription_count`,
    /// `user_count`.
    info: Option<String>,
}

/// Reads an event's `info` (comma-separated attributes): (subscription_count,
/// user_count), or the unknown attribute.
fn trigger_info(info: Option<&str>) -> Result<(bool, bool), Response> {
    let mut subs = false;
    let mut users = false;
    for attr in info
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        match attr {
            "subscription_count" => subs = true,
            "user_count" => users = true,
            other => {
                return Err(Response::error(
                    400,
                    &format!(
                        "info attribute {other:?} is not known: use subscription_count, user_count"
                    ),
                ))
            }
        }
    }
    Ok((subs, users))
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<Event<'a>>,
}

/// Which app a request is for, as its path (or query) names it.
#[derive(Debug, PartialEq, Eq)]
pub enum App<'a> {
    /// `/apps/{id}/…`: by id.
    Id(&'a str),
    /// `/users/…` (no app in the path): by the `auth_key` parameter.
    Key(String),
    /// Neither (an unsigned `/users/…` request, or another path).
    None,
}

/// The app `request` is for ([`handle`] then checks it against the app's
/// id and signature).
pub fn app_of(request: &Request) -> App<'_> {
    if let Some(rest) = request.path.strip_prefix(API_PATH) {
        App::Id(rest.split_once('/').map_or(rest, |(id, _)| id))
    } else if request.path.starts_with(USERS_PATH) {
        param(&request.query, "auth_key").map_or(App::None, App::Key)
    } else {
        App::None
    }
}

/// The bus name of channel `name` as an HTTP API request of `app` names
/// it (checked as that app's clients name it: `#app-` names are other
/// apps' and refused), or the 400 message.
fn bus_channel(app: &PusherApp, name: &str) -> Result<String, String> {
    channel::validate(name).map_err(|e| format!("channel {name:?}: {e}"))?;
    if name.starts_with(APP_PREFIX) {
        return Err(format!(
            "channel {name:?}: names starting with {APP_PREFIX} are reserved"
        ));
    }
    app.bus_name(name)
        .map(std::borrow::Cow::into_owned)
        .map_err(|e| format!("channel {name:?}: {e}"))
}

/// Decides what `request` asks of the app `app` at `now_secs` (Unix time,
/// seconds; for the signature's timestamp).
pub fn handle(request: &Request, app: &PusherApp, now_secs: u64) -> Outcome {
    let reply = |status, msg: &str| Outcome::Respond(Response::error(status, msg));
    let (app_id, endpoint) = if let Some(rest) = request.path.strip_prefix(API_PATH) {
        rest.split_once('/').unwrap_or((rest, ""))
    } else if request.path.starts_with(USERS_PATH) {
        // The PyPI SDK (3.3) posts terminate_connections to
        // `/users/{id}/…` without the app: the one of its `auth_key`.
        (app.id.as_str(), &request.path[1..])
    } else {
        return reply(404, "no such endpoint");
    };
    if app_id != app.id {
        return reply(404, &format!("no app with id {app_id:?}"));
    }
    let signed = ApiRequest {
        method: &request.method,
        path: &request.path,
        query: &request.query,
        body: &request.body,
    };
    if let Err(e) = sign::verify_api_request(&signed, &app.key, &app.secret, now_secs) {
        return reply(401, &e.to_string());
    }
    match (request.method.as_str(), endpoint) {
        ("POST", "events") => match serde_json::from_slice::<Event<'_>>(&request.body) {
            Ok(event) => {
                let (subs, users) = match trigger_info(event.info.as_deref()) {
                    Ok(i) => i,
                    Err(r) => return Outcome::Respond(r),
                };
                match publishes(&event, app, request.idempotency_key.clone()) {
                    Ok(p) if subs || users => {
                        let mut channels: Vec<(String, bool, bool)> = Vec::new();
                        for publish in &p {
                            if !channels.iter().any(|c| c.0 == publish.channel) {
                                channels.push((publish.channel.clone(), subs, users));
                            }
                        }
                        Outcome::PublishThenCount(
                            p,
                            TriggerInfo {
                                batch: false,
                                channels,
                            },
                        )
                    }
                    Ok(p) => Outcome::Publish(p),
                    Err(r) => Outcome::Respond(r),
                }
            }
            Err(e) => reply(400, &format!("body is not an event: {e}")),
        },
        ("POST", "batch_events") => match serde_json::from_slice::<Batch<'_>>(&request.body) {
            Ok(batch) if batch.batch.is_empty() => reply(400, "batch has no events"),
            Ok(batch) if batch.batch.len() > app.max_batch_events => reply(
                400,
                &format!(
                    "{} events in one batch; the limit is {}",
                    batch.batch.len(),
                    app.max_batch_events
                ),
            ),
            Ok(batch) => {
                let mut all = Vec::new();
                let mut info = Vec::new();
                let mut any_info = false;
                for (i, event) in batch.batch.iter().enumerate() {
                    let key = request.idempotency_key.as_ref().map(|k| format!("{k}#{i}"));
                    let (subs, users) = match trigger_info(event.info.as_deref()) {
                        Ok(i) => i,
                        Err(r) => return Outcome::Respond(r),
                    };
                    any_info |= subs || users;
                    match publishes(event, app, key) {
                        Ok(p) => {
                            // A batch event names one channel.
                            let channel = p.first().map(|p| p.channel.clone()).unwrap_or_default();
                            info.push((channel, subs, users));
                            all.extend(p);
                        }
                        Err(r) => return Outcome::Respond(r),
                    }
                }
                if any_info {
                    Outcome::PublishThenCount(
                        all,
                        TriggerInfo {
                            batch: true,
                            channels: info,
                        },
                    )
                } else {
                    Outcome::Publish(all)
                }
            }
            Err(e) => reply(400, &format!("body is not a batch of events: {e}")),
        },
        ("POST", e) if terminate_user(e).is_some() => {
            let user = terminate_user(e).unwrap_or_default();
            let channel = match bus_channel(app, &format!("{SERVER_TO_USER_PREFIX}{user}")) {
                Ok(c) if !user.is_empty() => c,
                _ => return reply(400, &format!("user id {user:?} is not valid")),
            };
            Outcome::Publish(vec![Publish {
                idempotency_key: request.idempotency_key.clone(),
                channel,
                body: body::event(TERMINATE_EVENT, false, None, None, b""),
            }])
        }
        ("GET", e) if e == "channels" || e.starts_with("channels/") => {
            channels_query(app, e, &request.query)
        }
        (_, "events" | "batch_events") => reply(405, "use POST"),
        _ => reply(
            404,
            &format!(
                "no endpoint {endpoint:?}: this server serves events, batch_events, channels, channels/<name>, channels/<name>/users and users/<id>/terminate_connections"
            ),
        ),
    }
}

/// The publications of one event, or why it is refused.
fn publishes(
    event: &Event<'_>,
    app: &PusherApp,
    idempotency_key: Option<String>,
) -> Result<Vec<Publish>, Response> {
    let bad = |msg: String| Response::error(400, &msg);
    let name = event
        .name
        .as_deref()
        .ok_or_else(|| bad("name is required".into()))?;
    if name.starts_with("pusher:") || name.starts_with("pusher_internal:") {
        return Err(bad(format!(
            "event name {name:?}: names starting with pusher: or pusher_internal: are reserved"
        )));
    }
    if name.is_empty() || name.len() > MAX_EVENT_NAME_BYTES {
        return Err(bad(format!(
            "name must be 1 to {MAX_EVENT_NAME_BYTES} bytes"
        )));
    }
    let raw = event.data.ok_or_else(|| bad("data is required".into()))?;
    // The SDKs send data as a string (JSON-encoded by them); any other
    // JSON value is taken as its text.
    let data: String =
        serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_string());
    if data.len() > app.max_event_bytes {
        return Err(Response::error(
            413,
            &format!(
                "data is {} bytes; the limit is {}",
                data.len(),
                app.max_event_bytes
            ),
        ));
    }
    let channels: Vec<&str> = match (&event.channel, &event.channels) {
        (Some(c), None) => vec![c.as_str()],
        (None, Some(cs)) => cs.iter().map(String::as_str).collect(),
        (Some(_), Some(_)) => return Err(bad("give channel or channels, not both".into())),
        (None, None) => return Err(bad("channel or channels is required".into())),
    };
    if channels.is_empty() || channels.len() > app.max_channels_per_trigger {
        return Err(bad(format!(
            "{} channels; 1 to {} are allowed",
            channels.len(),
            app.max_channels_per_trigger
        )));
    }
    if let Some(s) = &event.socket_id {
        if !valid_socket_id(s) {
            return Err(bad(format!("socket_id {s:?} is not of the form 123.456")));
        }
    }
    let mut out = Vec::with_capacity(channels.len());
    for c in channels {
        let channel = bus_channel(app, c).map_err(bad)?;
        out.push(Publish {
            // One key per channel is enough: the bus keeps keys per channel.
            idempotency_key: idempotency_key.clone(),
            channel,
            body: body::event(
                name,
                false,
                None,
                event.socket_id.as_deref(),
                data.as_bytes(),
            ),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> PusherApp {
        PusherApp {
            id: "1".into(),
            key: "k".into(),
            secret: b"s".to_vec(),
            client_events: false,
            client_event_rate: 10,
            activity_timeout_secs: 120,
            max_event_bytes: 100,
            max_channels_per_trigger: 3,
            max_batch_events: 2,
            presence_max_members: 100,
            presence_max_user_info_bytes: 1024,
            namespace: String::new(),
        }
    }

    fn signed(method: &str, path: &str, body: &str) -> Request {
        let query = sign::sign_api_request(method, path, &[], body.as_bytes(), "k", b"s", 1000);
        Request {
            method: method.into(),
            path: path.into(),
            query,
            body: body.as_bytes().to_vec(),
            idempotency_key: None,
        }
    }

    fn status(o: Outcome) -> u16 {
        match o {
            Outcome::Respond(r) => r.status,
            Outcome::Publish(_) | Outcome::Query(_) | Outcome::PublishThenCount(..) => 200,
        }
    }

    fn query(path_and_query: &str) -> Outcome {
        let (path, q) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let owned: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let params: Vec<(&str, &str)> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let query = sign::sign_api_request("GET", path, &params, b"", "k", b"s", 1000);
        handle(
            &Request {
                method: "GET".into(),
                path: path.into(),
                query,
                body: Vec::new(),
                idempotency_key: None,
            },
            &app(),
            1000,
        )
    }

    #[test]
    fn channel_queries_are_read_and_checked() {
        let want = |o: Outcome| match o {
            Outcome::Query(q) => q,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            want(query(
                "/apps/1/channels?filter_by_prefix=presence-&info=user_count,subscription_count"
            )),
            ChannelsQuery::List {
                prefix: "presence-".into(),
                user_count: true,
                subscription_count: true
            }
        );
        assert_eq!(
            want(query(
                "/apps/1/channels/%23server-to-user-1?info=subscription_count"
            )),
            ChannelsQuery::One {
                channel: "#server-to-user-1".into(),
                user_count: false,
                subscription_count: true
            }
        );
        assert_eq!(
            want(query("/apps/1/channels/presence-a/users")),
            ChannelsQuery::Users {
                channel: "presence-a".into()
            }
        );
        for bad in [
            "/apps/1/channels?info=user_count",
            "/apps/1/channels?info=colour",
            "/apps/1/channels/chat?info=user_count",
            "/apps/1/channels/chat/users",
            "/apps/1/channels/a%2",
            "/apps/1/channels/a b",
        ] {
            assert_eq!(status(query(bad)), 400, "{bad}");
        }
    }

    #[test]
    fn channel_answers_have_pushers_shapes() {
        use std::collections::HashMap;
        use std::sync::Arc;
        let chans: Vec<(Arc<str>, u64)> =
            vec![(Arc::from("presence-a"), 3), (Arc::from("presence-b"), 1)];
        let users: HashMap<Arc<str>, usize> = [(Arc::from("presence-a"), 2)].into_iter().collect();
        let r = ChannelsQuery::list_response(true, &chans, &users, true);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            v["channels"]["presence-a"],
            serde_json::json!({"user_count": 2, "subscription_count": 3})
        );
        assert_eq!(v["channels"]["presence-b"]["user_count"], 0);
        let r = ChannelsQuery::list_response(false, &chans, &users, false);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["channels"]["presence-b"], serde_json::json!({}));
        let v: serde_json::Value =
            serde_json::from_str(&ChannelsQuery::one_response(true, 0, None).body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"occupied": false, "subscription_count": 0})
        );
        let v: serde_json::Value =
            serde_json::from_str(&ChannelsQuery::users_response(&["1", "2"]).body).unwrap();
        assert_eq!(v, serde_json::json!({"users": [{"id": "1"}, {"id": "2"}]}));
    }

    #[test]
    fn reads_a_request_in_pieces_and_bounds_it() {
        let raw = b"POST /apps/1/events?a=b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let mut r = RequestReader::new(1024, 100);
        assert!(r.feed(&raw[..20]).unwrap().is_none());
        assert!(r.feed(&raw[20..raw.len() - 2]).unwrap().is_none());
        let req = r.feed(&raw[raw.len() - 2..]).unwrap().unwrap();
        assert_eq!(
            (
                req.method.as_str(),
                req.path.as_str(),
                req.query.as_str(),
                &req.body[..]
            ),
            ("POST", "/apps/1/events", "a=b", &b"hello"[..])
        );
        let big = b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n";
        assert_eq!(
            RequestReader::new(1024, 100).feed(big).unwrap_err().status,
            413
        );
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            RequestReader::new(1024, 100)
                .feed(chunked)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            RequestReader::new(16, 100)
                .feed(b"POST /aaaaaaaaaaaaaaaaaaaaaa")
                .unwrap_err()
                .status,
            431
        );
        assert_eq!(
            RequestReader::new(1024, 100)
                .feed(b"\x01\x02 x\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn a_client_that_expects_100_continue_is_told_once() {
        let head =
            b"POST /apps/1/events HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        let mut r = RequestReader::new(1024, 100);
        assert!(r.feed(head).unwrap().is_none());
        assert!(r.take_continue());
        assert!(!r.take_continue());
        assert!(r.feed(b"{}").unwrap().is_some());
        // Without the header, nothing is owed.
        let mut r = RequestReader::new(1024, 100);
        assert!(r
            .feed(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
            .unwrap()
            .is_none());
        assert!(!r.take_continue());
    }

    #[test]
    fn an_event_becomes_one_publication_per_channel() {
        let body = r#"{"name":"ev","data":"{\"a\":1}","channels":["a","b"],"socket_id":"1.2"}"#;
        let Outcome::Publish(p) = handle(&signed("POST", "/apps/1/events", body), &app(), 1000)
        else {
            panic!("not published");
        };
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].channel, "b");
        let b = body::decode(&p[0].body);
        assert_eq!(b.event, Some("ev"));
        assert_eq!(b.data, br#"{"a":1}"#);
        assert_eq!(b.exclude, Some("1.2"));
        assert!(!b.raw_json);
    }

    #[test]
    fn a_namespaced_app_reads_and_answers_its_clients_names() {
        let app2 = PusherApp {
            namespace: "#app-2/".into(),
            ..app()
        };
        let body = r#"{"name":"ev","data":"x","channels":["a","presence-b"]}"#;
        let Outcome::Publish(p) = handle(&signed("POST", "/apps/1/events", body), &app2, 1000)
        else {
            panic!("not published");
        };
        let names: Vec<&str> = p.iter().map(|p| p.channel.as_str()).collect();
        assert_eq!(names, ["#app-2/a", "#app-2/presence-b"]);
        // Names that are other apps' are refused, for every app.
        for a in [&app(), &app2] {
            let body = r##"{"name":"ev","data":"x","channel":"#app-3/a"}"##;
            assert_eq!(
                status(handle(&signed("POST", "/apps/1/events", body), a, 1000)),
                400
            );
        }
        // Too long with the namespace only.
        let long = "a".repeat(195);
        let body = format!(r#"{{"name":"ev","data":"x","channel":"{long}"}}"#);
        assert_eq!(
            status(handle(
                &signed("POST", "/apps/1/events", &body),
                &app2,
                1000
            )),
            400
        );
        assert_eq!(
            status(handle(
                &signed("POST", "/apps/1/events", &body),
                &app(),
                1000
            )),
            200
        );
        // The answers name the channels as the clients do.
        let info = TriggerInfo {
            batch: false,
            channels: vec![("#app-2/a".into(), true, false)],
        };
        let counts = [("#app-2/a".to_string(), 2)].into_iter().collect();
        let r = info.response(&counts, &Default::default());
        assert_eq!(r.body, r#"{"channels":{"a":{"subscription_count":2}}}"#);
        let list = [(std::sync::Arc::from("#app-2/a"), 1)];
        let r = ChannelsQuery::list_response(false, &list, &Default::default(), false);
        assert_eq!(r.body, r#"{"channels":{"a":{}}}"#);
        // Which app a request is for.
        let r = signed("POST", "/users/u/terminate_connections", "");
        assert_eq!(app_of(&r), App::Key("k".into()));
        assert_eq!(app_of(&signed("GET", "/apps/7/channels", "")), App::Id("7"));
    }

    #[test]
    fn an_idempotency_key_reaches_every_publication() {
        let raw = b"POST /apps/1/batch_events HTTP/1.1\r\nIdempotency-Key: k-1\r\nContent-Length: 0\r\n\r\n";
        let req = RequestReader::new(1024, 100).feed(raw).unwrap().unwrap();
        assert_eq!(req.idempotency_key.as_deref(), Some("k-1"));
        let body = r#"{"batch":[{"name":"e","data":"1","channel":"a"},{"name":"e","data":"2","channels":["a","b"]}]}"#;
        let mut req = signed("POST", "/apps/1/batch_events", body);
        req.idempotency_key = Some("k-1".into());
        let Outcome::Publish(p) = handle(&req, &app(), 1000) else {
            panic!("not published");
        };
        let keys: Vec<_> = p
            .iter()
            .map(|p| (p.channel.as_str(), p.idempotency_key.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [
                ("a", Some("k-1#0")),
                ("a", Some("k-1#1")),
                ("b", Some("k-1#1"))
            ]
        );
        let bad = b"POST / HTTP/1.1\r\nIdempotency-Key: \r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            RequestReader::new(1024, 100).feed(bad).unwrap_err().status,
            400
        );
    }

    #[test]
    fn a_batch_publishes_every_event_in_order() {
        let body = r#"{"batch":[{"name":"e1","data":"1","channel":"a"},{"name":"e2","data":"2","channel":"b"}]}"#;
        let Outcome::Publish(p) =
            handle(&signed("POST", "/apps/1/batch_events", body), &app(), 1000)
        else {
            panic!("not published");
        };
        assert_eq!(
            p.iter().map(|p| p.channel.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let three = r#"{"batch":[{"name":"e","data":"1","channel":"a"},{"name":"e","data":"1","channel":"a"},{"name":"e","data":"1","channel":"a"}]}"#;
        assert_eq!(
            status(handle(
                &signed("POST", "/apps/1/batch_events", three),
                &app(),
                1000
            )),
            400
        );
    }

    #[test]
    fn bad_requests_get_their_status() {
        let ok = r#"{"name":"ev","data":"x","channel":"a"}"#;
        let cases: [(Request, u16); 11] = [
            (signed("POST", "/apps/2/events", ok), 404),
            (signed("GET", "/apps/1/events", ""), 405),
            (signed("POST", "/apps/1/nothing", ok), 404),
            (signed("POST", "/apps/1/events", "not json"), 400),
            (
                signed("POST", "/apps/1/events", r#"{"data":"x","channel":"a"}"#),
                400,
            ),
            (
                signed("POST", "/apps/1/events", r#"{"name":"e","channel":"a"}"#),
                400,
            ),
            (
                signed("POST", "/apps/1/events", r#"{"name":"e","data":"x"}"#),
                400,
            ),
            (
                signed(
                    "POST",
                    "/apps/1/events",
                    r#"{"name":"e","data":"x","channels":["a","b","c","d"]}"#,
                ),
                400,
            ),
            (
                signed(
                    "POST",
                    "/apps/1/events",
                    &format!(
                        r#"{{"name":"e","data":"{}","channel":"a"}}"#,
                        "x".repeat(101)
                    ),
                ),
                413,
            ),
            (
                signed(
                    "POST",
                    "/apps/1/events",
                    r#"{"name":"e","data":"x","channel":"a b"}"#,
                ),
                400,
            ),
            (
                signed(
                    "POST",
                    "/apps/1/events",
                    r#"{"name":"e","data":"x","channel":"a","socket_id":"nope"}"#,
                ),
                400,
            ),
        ];
        for (req, want) in cases {
            let body = String::from_utf8_lossy(&req.body).into_owned();
            assert_eq!(
                status(handle(&req, &app(), 1000)),
                want,
                "{} {} {body}",
                req.method,
                req.path
            );
        }
        // Signature problems are 401, before the body is looked at.
        let mut stale = signed("POST", "/apps/1/events", ok);
        assert_eq!(status(handle(&stale, &app(), 5000)), 401);
        stale.body = br#"{"name":"ev","data":"y","channel":"a"}"#.to_vec();
        assert_eq!(status(handle(&stale, &app(), 1000)), 401);
    }

    #[test]
    fn odd_terminate_paths_and_empty_batches_are_refused() {
        // Once a panic (the two suffixes overlapped), now no endpoint.
        let overlap = signed("POST", "/apps/1/users/terminate_connections", "");
        assert_eq!(status(handle(&overlap, &app(), 1000)), 404);
        let no_user = signed("POST", "/apps/1/users//terminate_connections", "");
        assert_eq!(status(handle(&no_user, &app(), 1000)), 400);
        let empty = signed("POST", "/apps/1/batch_events", r#"{"batch":[]}"#);
        assert_eq!(status(handle(&empty, &app(), 1000)), 400);
    }

    #[test]
    fn responses_are_json_and_close_the_connection() {
        let r = Response::error(401, "invalid signature").to_bytes();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with(r#"{"error":"invalid signature"}"#));
    }
}
