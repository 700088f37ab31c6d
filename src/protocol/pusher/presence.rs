//! Presence members of Pusher presence channels: the `channel_data` a
//! subscription carries (`{"user_id": …, "user_info": …}`, `user_id` a
//! string or, as Laravel sends it, an integer), and the member key under
//! which the bus counts a user: the id and its info together, so every
//! node can render `member_added` and the member list without asking the
//! app again. A user is one member however many connections it has, as
//! long as its app gives it the same `user_info` each time (what Pusher's
//! own auth endpoints do).

#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

/// Longest `user_id`, in bytes (Pusher: 128).
pub const MAX_USER_ID_BYTES: usize = 128;

/// Why a presence subscription's `channel_data` was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChannelDataError {
    /// Missing, not JSON, or without a `user_id`.
    #[error("channel_data must be a JSON object with a user_id (string or integer)")]
    Malformed,
    /// `user_id` over [`MAX_USER_ID_BYTES`] or empty.
    #[error("user_id must be 1 to 128 bytes")]
    UserId,
    /// `user_info` over the app's limit (its size and the limit, bytes).
    #[error("user_info is {size} bytes; the limit is {limit}")]
    UserInfo {
        /// Its size, in bytes.
        size: usize,
        /// The limit, in bytes.
        limit: usize,
    },
}

#[derive(Deserialize)]
struct ChannelData<'a> {
    #[serde(borrow)]
    user_id: &'a RawValue,
    #[serde(borrow)]
    user_info: Option<&'a RawValue>,
}

/// A presence member: the user id (as a string) and its `user_info` as raw
/// JSON (`null` if none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The user id.
    pub user_id: String,
    /// The user info, raw JSON.
    pub user_info: String,
}

/// Reads `channel_data`; `user_info` may be at most `max_info` bytes.
pub fn parse_channel_data(data: &str, max_info: usize) -> Result<Member, ChannelDataError> {
    let d: ChannelData<'_> = serde_json::from_str(data).map_err(|_| ChannelDataError::Malformed)?;
    let raw = d.user_id.get();
    let user_id = if raw.starts_with('"') {
        serde_json::from_str::<String>(raw).map_err(|_| ChannelDataError::Malformed)?
    } else if raw.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        raw.to_string()
    } else {
        return Err(ChannelDataError::Malformed);
    };
    if user_id.is_empty() || user_id.len() > MAX_USER_ID_BYTES {
        return Err(ChannelDataError::UserId);
    }
    let user_info = d.user_info.map_or("null", |i| i.get()).to_string();
    if user_info.len() > max_info {
        return Err(ChannelDataError::UserInfo {
            size: user_info.len(),
            limit: max_info,
        });
    }
    Ok(Member { user_id, user_info })
}

/// The key a member is counted under: `<len of id>:<id><info>`.
pub fn member_key(m: &Member) -> String {
    format!("{}:{}{}", m.user_id.len(), m.user_id, m.user_info)
}

/// The member a key names; `None` for keys not made by [`member_key`]
/// (e.g. a native client's user on the same channel).
pub fn parse_member_key(key: &str) -> Option<(&str, &str)> {
    let (len, rest) = key.split_once(':')?;
    let len: usize = len.parse().ok()?;
    if !rest.is_char_boundary(len.min(rest.len())) || rest.len() < len {
        return None;
    }
    let (id, info) = rest.split_at(len);
    let info = if info.is_empty() { "null" } else { info };
    // A native client's user id may look like a key (`1:ab`): only valid
    // JSON info makes one, so nothing but JSON is pasted into messages.
    serde_json::from_str::<&serde_json::value::RawValue>(info).ok()?;
    Some((id, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_may_be_strings_or_integers() {
        let m = parse_channel_data(r#"{"user_id":"u1","user_info":{"name":"A"}}"#, 1024).unwrap();
        assert_eq!(m.user_id, "u1");
        assert_eq!(m.user_info, r#"{"name":"A"}"#);
        let m = parse_channel_data(r#"{"user_id":42}"#, 1024).unwrap();
        assert_eq!((m.user_id.as_str(), m.user_info.as_str()), ("42", "null"));
    }

    #[test]
    fn bad_channel_data_is_refused() {
        for bad in [
            "",
            "x",
            "{}",
            r#"{"user_id":null}"#,
            r#"{"user_id":1.5}"#,
            r#"{"user_id":{}}"#,
        ] {
            assert_eq!(
                parse_channel_data(bad, 1024),
                Err(ChannelDataError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            parse_channel_data(r#"{"user_id":""}"#, 1024),
            Err(ChannelDataError::UserId)
        );
        let long = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(129));
        assert_eq!(
            parse_channel_data(&long, 1024),
            Err(ChannelDataError::UserId)
        );
        assert_eq!(
            parse_channel_data(r#"{"user_id":"a","user_info":"0123456789"}"#, 8),
            Err(ChannelDataError::UserInfo { size: 12, limit: 8 })
        );
    }

    #[test]
    fn member_keys_round_trip_whatever_the_id_holds() {
        for (id, info) in [("1", r#"{"n":1}"#), ("a:b", "null"), ("12", r#""x:y""#)] {
            let key = member_key(&Member {
                user_id: id.into(),
                user_info: info.into(),
            });
            assert_eq!(parse_member_key(&key), Some((id, info)));
        }
        assert_eq!(parse_member_key("auth0|123"), None);
        assert_eq!(parse_member_key("1:ab"), None, "info that is not JSON");
        assert_eq!(parse_member_key("9:ab"), None);
    }
}
