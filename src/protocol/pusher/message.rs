//! Pusher protocol 7 messages: one JSON object per WebSocket text frame,
//! `{"event": NAME, "channel": CHANNEL?, "data": DATA?}`.
//!
//! Client → server ([`parse`]): `pusher:ping`, `pusher:pong`,
//! `pusher:subscribe` (`channel`, and for private/presence channels `auth`
//! and `channel_data`), `pusher:unsubscribe`, `pusher:signin` (`auth`,
//! `user_data`) and client events (`client-*` on a channel). `data` may be
//! an object or, as older clients send it, a string holding one.
//!
//! Server → client ([`Writer`]): `pusher:connection_established`,
//! `pusher:pong`, `pusher_internal:subscription_succeeded`,
//! `pusher:subscription_error`, `pusher:error`, `pusher:signin_success`,
//! `pusher:cache_miss`, `pusher_internal:member_added` / `_removed`, and
//! events. Where the protocol carries `data` as a JSON-encoded string
//! (connection_established, subscription_succeeded, member events, events
//! triggered through the HTTP API) it is written as one.

#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

/// Longest `event` name accepted from a client, in bytes (Pusher: 200).
pub const MAX_EVENT_NAME_BYTES: usize = 200;

/// A message from a client.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    /// `pusher:ping`: answer `pusher:pong`.
    Ping,
    /// `pusher:pong`: the answer to our `pusher:ping`.
    Pong,
    /// `pusher:subscribe`.
    Subscribe {
        /// The channel name.
        channel: String,
        /// `"<key>:<signature>"` for private and presence channels.
        auth: Option<String>,
        /// Presence channels: a JSON string `{"user_id": …, "user_info": …}`,
        /// exactly as signed.
        channel_data: Option<String>,
    },
    /// `pusher:unsubscribe`.
    Unsubscribe {
        /// The channel name.
        channel: String,
    },
    /// `pusher:signin`.
    Signin {
        /// `"<key>:<signature>"` over `socket_id::user::user_data`.
        auth: String,
        /// A JSON string with at least `id`, exactly as signed.
        user_data: String,
    },
    /// A client event (`client-*`) on `channel`; `data` is relayed as sent.
    ClientEvent {
        /// The event name, starting with `client-`.
        event: String,
        /// The channel it is sent on.
        channel: String,
        /// The event's data, as raw JSON.
        data: &'a RawValue,
    },
}

// `RawValue` has no `PartialEq`: client events compare by their JSON text.
impl PartialEq for ClientMessage<'_> {
    fn eq(&self, other: &Self) -> bool {
        use ClientMessage as M;
        match (self, other) {
            (M::Ping, M::Ping) | (M::Pong, M::Pong) => true,
            (
                M::Subscribe {
                    channel: a,
                    auth: b,
                    channel_data: c,
                },
                M::Subscribe {
                    channel: x,
                    auth: y,
                    channel_data: z,
                },
            ) => (a, b, c) == (x, y, z),
            (M::Unsubscribe { channel: a }, M::Unsubscribe { channel: x }) => a == x,
            (
                M::Signin {
                    auth: a,
                    user_data: b,
                },
                M::Signin {
                    auth: x,
                    user_data: y,
                },
            ) => (a, b) == (x, y),
            (
                M::ClientEvent {
                    event: a,
                    channel: b,
                    data: c,
                },
                M::ClientEvent {
                    event: x,
                    channel: y,
                    data: z,
                },
            ) => (a, b, c.get()) == (x, y, z.get()),
            _ => false,
        }
    }
}

/// Why a client message was refused; answered with `pusher:error` and the
/// connection stays open.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    /// Not a JSON object with a string `event`.
    #[error("invalid JSON message: {0}")]
    Json(String),
    /// An event this server does not know (not `pusher:*` it handles, not
    /// `client-*`).
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
    /// A required field is missing or of the wrong type.
    #[error("{event}: {why}")]
    Field {
        /// The event whose field is wrong.
        event: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

#[derive(Deserialize)]
struct Envelope<'a> {
    event: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    channel: Option<String>,
}

#[derive(Deserialize, Default)]
struct SubscribeData {
    channel: Option<String>,
    auth: Option<String>,
    channel_data: Option<String>,
}

#[derive(Deserialize, Default)]
struct SigninData {
    auth: Option<String>,
    user_data: Option<String>,
}

/// `data` as an object of type `T`: either the object itself or a string
/// holding its JSON (clients differ). Absent or `null` gives `T::default()`.
fn data_object<T: for<'de> Deserialize<'de> + Default>(
    data: Option<&RawValue>,
    event: &'static str,
) -> Result<T, MessageError> {
    let Some(raw) = data else {
        return Ok(T::default());
    };
    let text = raw.get();
    if text == "null" {
        return Ok(T::default());
    }
    let parsed = if text.starts_with('"') {
        serde_json::from_str::<String>(text).and_then(|inner| serde_json::from_str::<T>(&inner))
    } else {
        serde_json::from_str::<T>(text)
    };
    parsed.map_err(|_| MessageError::Field {
        event,
        why: "data is not an object of the expected fields",
    })
}

/// Parses one text frame from a client.
pub fn parse(text: &str) -> Result<ClientMessage<'_>, MessageError> {
    let envelope: Envelope<'_> =
        serde_json::from_str(text).map_err(|e| MessageError::Json(e.to_string()))?;
    match envelope.event.as_str() {
        "pusher:ping" => Ok(ClientMessage::Ping),
        "pusher:pong" => Ok(ClientMessage::Pong),
        "pusher:subscribe" => {
            let d: SubscribeData = data_object(envelope.data, "pusher:subscribe")?;
            let channel = d.channel.ok_or(MessageError::Field {
                event: "pusher:subscribe",
                why: "data.channel is missing",
            })?;
            Ok(ClientMessage::Subscribe {
                channel,
                auth: d.auth,
                channel_data: d.channel_data,
            })
        }
        "pusher:unsubscribe" => {
            let d: SubscribeData = data_object(envelope.data, "pusher:unsubscribe")?;
            let channel = d.channel.ok_or(MessageError::Field {
                event: "pusher:unsubscribe",
                why: "data.channel is missing",
            })?;
            Ok(ClientMessage::Unsubscribe { channel })
        }
        "pusher:signin" => {
            let d: SigninData = data_object(envelope.data, "pusher:signin")?;
            match (d.auth, d.user_data) {
                (Some(auth), Some(user_data)) => Ok(ClientMessage::Signin { auth, user_data }),
                _ => Err(MessageError::Field {
                    event: "pusher:signin",
                    why: "data.auth and data.user_data are required",
                }),
            }
        }
        name if name.starts_with("client-") => {
            if name.len() > MAX_EVENT_NAME_BYTES {
                return Err(MessageError::Field {
                    event: "client event",
                    why: "event name is longer than 200 bytes",
                });
            }
            let channel = envelope.channel.ok_or(MessageError::Field {
                event: "client event",
                why: "channel is missing",
            })?;
            let data = envelope.data.ok_or(MessageError::Field {
                event: "client event",
                why: "data is missing",
            })?;
            Ok(ClientMessage::ClientEvent {
                event: envelope.event,
                channel,
                data,
            })
        }
        _ => Err(MessageError::UnknownEvent(envelope.event)),
    }
}

/// An event's `data` as the server writes it.
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    /// A string (HTTP API events): written as a JSON string.
    Str(&'a str),
    /// Raw JSON (client events): written as is.
    Json(&'a str),
}

/// Writes server messages into a reusable buffer; each method returns the
/// JSON text of one message (valid until the next call).
#[derive(Default)]
pub struct Writer {
    buf: String,
}

impl Writer {
    /// A writer with an empty buffer.
    pub fn new() -> Writer {
        Writer::default()
    }

    fn start(&mut self, event: &str, channel: Option<&str>) {
        self.buf.clear();
        self.buf.push_str("{\"event\":");
        self.string(event);
        if let Some(c) = channel {
            self.buf.push_str(",\"channel\":");
            self.string(c);
        }
        self.buf.push_str(",\"data\":");
    }

    /// Writes `s` as a JSON string (RFC 8259 §7) straight into the buffer:
    /// a reused writer then builds a message with no allocation of its own.
    fn string(&mut self, s: &str) {
        self.buf.push('"');
        escape_into(&mut self.buf, s);
        self.buf.push('"');
    }

    fn finish(&mut self) -> &str {
        self.buf.push('}');
        &self.buf
    }

    /// `pusher:connection_established` with the connection's `socket_id`
    /// and the activity timeout in seconds (the client pings after that
    /// long without traffic).
    pub fn connection_established(&mut self, socket_id: &str, activity_timeout_secs: u32) -> &str {
        use std::fmt::Write as _;
        self.start("pusher:connection_established", None);
        // `data` is a JSON string holding the object: escaped twice.
        self.buf.push_str("\"{\\\"socket_id\\\":\\\"");
        if socket_id.chars().all(|c| c != '"' && c != '\\' && c >= ' ') {
            // Ours (digits and a dot): nothing to escape, no temporary.
            self.buf.push_str(socket_id);
        } else {
            let mut once = String::new();
            escape_into(&mut once, socket_id);
            escape_into(&mut self.buf, &once);
        }
        let _ = write!(
            self.buf,
            "\\\",\\\"activity_timeout\\\":{activity_timeout_secs}}}\""
        );
        self.finish()
    }

    /// `pusher:pong`.
    pub fn pong(&mut self) -> &str {
        self.start("pusher:pong", None);
        self.buf.push_str("{}");
        self.finish()
    }

    /// `pusher:ping` (the server asks for a sign of life).
    pub fn ping(&mut self) -> &str {
        self.start("pusher:ping", None);
        self.buf.push_str("{}");
        self.finish()
    }

    /// `pusher_internal:subscription_succeeded` on a channel without
    /// presence data.
    pub fn subscription_succeeded(&mut self, channel: &str) -> &str {
        self.start("pusher_internal:subscription_succeeded", Some(channel));
        self.string("{}");
        self.finish()
    }

    /// `pusher_internal:subscription_succeeded` on a presence channel:
    /// `members` are (user_id, user_info as raw JSON), each user once.
    pub fn presence_succeeded<'m>(
        &mut self,
        channel: &str,
        members: impl ExactSizeIterator<Item = (&'m str, &'m str)> + Clone,
    ) -> &str {
        self.start("pusher_internal:subscription_succeeded", Some(channel));
        let mut ids = Vec::with_capacity(members.len());
        let mut hash = String::from("{");
        for (i, (id, info)) in members.clone().enumerate() {
            ids.push(id);
            if i > 0 {
                hash.push(',');
            }
            hash.push_str(&serde_json::to_string(id).expect("a string serialises"));
            hash.push(':');
            hash.push_str(info);
        }
        hash.push('}');
        let data = format!(
            "{{\"presence\":{{\"ids\":{},\"hash\":{hash},\"count\":{}}}}}",
            serde_json::to_string(&ids).expect("strings serialise"),
            ids.len()
        );
        self.string(&data);
        self.finish()
    }

    /// `pusher:subscription_error`: `kind` is Pusher's error type
    /// (`AuthError`, `LimitReached`, `InvalidChannel`…), `status` an HTTP
    /// status (401, 403, 400…).
    pub fn subscription_error(
        &mut self,
        channel: &str,
        kind: &str,
        error: &str,
        status: u16,
    ) -> &str {
        self.start("pusher:subscription_error", Some(channel));
        self.buf.push_str("{\"type\":");
        self.string(kind);
        self.buf.push_str(",\"error\":");
        self.string(error);
        self.buf.push_str(&format!(",\"status\":{status}}}"));
        self.finish()
    }

    /// `pusher:error` with a protocol error code (4000–4399), or none.
    pub fn error(&mut self, code: Option<u16>, message: &str) -> &str {
        self.start("pusher:error", None);
        self.buf.push_str("{\"code\":");
        match code {
            Some(c) => self.buf.push_str(&c.to_string()),
            None => self.buf.push_str("null"),
        }
        self.buf.push_str(",\"message\":");
        self.string(message);
        self.buf.push('}');
        self.finish()
    }

    /// `pusher:signin_success` with the signed `user_data` string.
    pub fn signin_success(&mut self, user_data: &str) -> &str {
        self.start("pusher:signin_success", None);
        self.buf.push_str("{\"user_data\":");
        self.string(user_data);
        self.buf.push('}');
        self.finish()
    }

    /// `pusher:cache_miss` on a cache channel with nothing cached.
    pub fn cache_miss(&mut self, channel: &str) -> &str {
        self.start("pusher:cache_miss", Some(channel));
        self.buf.push_str("{}");
        self.finish()
    }

    /// `pusher_internal:member_added` (`user_info` raw JSON) or
    /// `pusher_internal:member_removed`.
    pub fn member(&mut self, channel: &str, user_id: &str, user_info: Option<&str>) -> &str {
        let event = if user_info.is_some() {
            "pusher_internal:member_added"
        } else {
            "pusher_internal:member_removed"
        };
        self.start(event, Some(channel));
        let id = serde_json::to_string(user_id).expect("a string serialises");
        let data = match user_info {
            Some(info) => format!("{{\"user_id\":{id},\"user_info\":{info}}}"),
            None => format!("{{\"user_id\":{id}}}"),
        };
        self.string(&data);
        self.finish()
    }

    /// An event on `channel`; `user_id` is added for client events on
    /// presence channels.
    pub fn event(
        &mut self,
        event: &str,
        channel: &str,
        data: Data<'_>,
        user_id: Option<&str>,
    ) -> &str {
        self.start(event, Some(channel));
        match data {
            Data::Str(s) => self.string(s),
            Data::Json(raw) => self.buf.push_str(raw),
        }
        if let Some(u) = user_id {
            self.buf.push_str(",\"user_id\":");
            self.string(u);
        }
        self.finish()
    }
}

/// Appends `s` with JSON's string escapes (RFC 8259 §7): `"`, `\\` and
/// the control characters; everything else as it is (UTF-8 is valid JSON).
fn escape_into(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Whether `socket_id` has the form Pusher gives it (`\d+\.\d+`): the HTTP
/// API's `socket_id` exclusion and the signatures use it.
pub fn valid_socket_id(socket_id: &str) -> bool {
    match socket_id.split_once('.') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json(s: &str) -> Value {
        serde_json::from_str(s).expect("valid JSON")
    }

    #[test]
    fn parses_what_pusher_js_sends() {
        assert_eq!(
            parse(r#"{"event":"pusher:ping","data":{}}"#),
            Ok(ClientMessage::Ping)
        );
        assert_eq!(
            parse(r#"{"event":"pusher:subscribe","data":{"channel":"chat"}}"#),
            Ok(ClientMessage::Subscribe {
                channel: "chat".into(),
                auth: None,
                channel_data: None
            })
        );
        let presence = r#"{"event":"pusher:subscribe","data":{"auth":"k:s","channel_data":"{\"user_id\":1}","channel":"presence-a"}}"#;
        assert_eq!(
            parse(presence),
            Ok(ClientMessage::Subscribe {
                channel: "presence-a".into(),
                auth: Some("k:s".into()),
                channel_data: Some(r#"{"user_id":1}"#.into())
            })
        );
        assert_eq!(
            parse(r#"{"event":"pusher:unsubscribe","data":{"channel":"chat"}}"#),
            Ok(ClientMessage::Unsubscribe {
                channel: "chat".into()
            })
        );
        // Data as a string holding the object (older clients).
        assert_eq!(
            parse(r#"{"event":"pusher:subscribe","data":"{\"channel\":\"c\"}"}"#),
            Ok(ClientMessage::Subscribe {
                channel: "c".into(),
                auth: None,
                channel_data: None
            })
        );
        match parse(r#"{"event":"client-typing","channel":"private-a","data":{"x":[1,2]}}"#) {
            Ok(ClientMessage::ClientEvent {
                event,
                channel,
                data,
            }) => {
                assert_eq!(event, "client-typing");
                assert_eq!(channel, "private-a");
                assert_eq!(data.get(), r#"{"x":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(
                r#"{"event":"pusher:signin","data":{"auth":"k:s","user_data":"{\"id\":\"1\"}"}}"#
            ),
            Ok(ClientMessage::Signin {
                auth: "k:s".into(),
                user_data: r#"{"id":"1"}"#.into()
            })
        );
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        assert!(matches!(parse("not json"), Err(MessageError::Json(_))));
        assert!(matches!(
            parse(r#"{"data":{}}"#),
            Err(MessageError::Json(_))
        ));
        assert_eq!(
            parse(r#"{"event":"pusher:subscribe","data":{}}"#),
            Err(MessageError::Field {
                event: "pusher:subscribe",
                why: "data.channel is missing"
            })
        );
        assert!(matches!(
            parse(r#"{"event":"pusher:subscribe","data":{"channel":5}}"#),
            Err(MessageError::Field { .. })
        ));
        assert_eq!(
            parse(r#"{"event":"hello","data":{}}"#),
            Err(MessageError::UnknownEvent("hello".into()))
        );
        assert!(matches!(
            parse(r#"{"event":"client-x","data":{}}"#),
            Err(MessageError::Field { .. })
        ));
        let long = format!(
            r#"{{"event":"client-{}","channel":"private-a","data":1}}"#,
            "x".repeat(200)
        );
        assert!(matches!(parse(&long), Err(MessageError::Field { .. })));
    }

    #[test]
    fn server_messages_have_the_shapes_clients_read() {
        let mut w = Writer::new();
        let m = json(w.connection_established("12.34", 120));
        assert_eq!(m["event"], "pusher:connection_established");
        let data = json(m["data"].as_str().expect("data is a JSON string"));
        assert_eq!(data["socket_id"], "12.34");
        assert_eq!(data["activity_timeout"], 120);

        let m = json(w.subscription_succeeded("chat"));
        assert_eq!(m["event"], "pusher_internal:subscription_succeeded");
        assert_eq!(m["channel"], "chat");
        assert_eq!(m["data"], "{}");

        let members = [("1", r#"{"name":"a"}"#), ("2", "null")];
        let m = json(w.presence_succeeded("presence-a", members.iter().copied()));
        let data = json(m["data"].as_str().unwrap());
        assert_eq!(data["presence"]["ids"], json(r#"["1","2"]"#));
        assert_eq!(data["presence"]["hash"]["1"]["name"], "a");
        assert_eq!(data["presence"]["count"], 2);

        let m = json(w.subscription_error("private-a", "AuthError", "bad \"sig\"", 401));
        assert_eq!(m["data"]["type"], "AuthError");
        assert_eq!(m["data"]["error"], "bad \"sig\"");
        assert_eq!(m["data"]["status"], 401);

        let m = json(w.error(Some(4301), "slow down"));
        assert_eq!(m["data"]["code"], 4301);
        let m = json(w.error(None, "x"));
        assert!(m["data"]["code"].is_null());

        let m = json(w.event("ev", "chat", Data::Str("{\"a\":1}"), None));
        assert_eq!(m["data"], "{\"a\":1}");
        let m = json(w.event(
            "client-x",
            "presence-a",
            Data::Json(r#"{"a":1}"#),
            Some("7"),
        ));
        assert_eq!(m["data"]["a"], 1);
        assert_eq!(m["user_id"], "7");

        let m = json(w.member("presence-a", "7", Some(r#"{"n":1}"#)));
        assert_eq!(m["event"], "pusher_internal:member_added");
        assert_eq!(json(m["data"].as_str().unwrap())["user_info"]["n"], 1);
        let m = json(w.member("presence-a", "7", None));
        assert_eq!(m["event"], "pusher_internal:member_removed");

        let m = json(w.signin_success(r#"{"id":"1"}"#));
        assert_eq!(m["data"]["user_data"], r#"{"id":"1"}"#);
        let m = json(w.cache_miss("cache-a"));
        assert_eq!(m["event"], "pusher:cache_miss");
        assert_eq!(json(w.pong())["event"], "pusher:pong");
    }

    #[test]
    fn strings_are_escaped_as_json_parses_them() {
        let mut w = Writer::new();
        let tricky = "q\"b\\n\nt\tc\u{1}é😀";
        let m = json(w.event("e", "c", Data::Str(tricky), None));
        assert_eq!(m["data"], tricky);
        let m = json(w.connection_established("1.2\"x", 5));
        let data = json(m["data"].as_str().unwrap());
        assert_eq!(data["socket_id"], "1.2\"x");
    }

    #[test]
    fn socket_ids_have_two_numbers() {
        assert!(valid_socket_id("123.456"));
        for bad in ["", "1", "1.", ".1", "a.1", "1.2.3", "1.-2"] {
            assert!(!valid_socket_id(bad), "{bad}");
        }
    }
}
