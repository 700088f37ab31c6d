//! Channel names. Kept to a conservative alphabet so names are safe to use
//! as Redis keys, in URLs and in logs without escaping.

#![forbid(unsafe_code)]

use thiserror::Error;

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 200;

/// Why [`validate`] (or [`personal`]) refused a channel name.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChannelError {
    /// The name is 0 bytes long.
    #[error("channel name is empty")]
    Empty,
    /// The name's length in bytes, over [`MAX_CHANNEL_BYTES`].
    #[error("channel name is {0} bytes; the limit is {MAX_CHANNEL_BYTES}")]
    TooLong(usize),
    /// The first character outside A-Z a-z 0-9 and `_ - = @ , . ; : / # %`.
    #[error("channel name contains {0:?}; allowed: A-Z a-z 0-9 and _ - = @ , . ; : / # %")]
    BadChar(char),
}

/// Characters allowed in channel names besides ASCII letters and digits.
const PUNCTUATION: &str = "_-=@,.;:/#%";

/// Prefix of a user's personal channel (see [`personal`]).
pub const PERSONAL_PREFIX: &str = "user:";

/// The personal channel of the user whose token says `"sub": user`:
/// `user:` followed by the id with every byte outside A-Z a-z 0-9 and
/// `_ - = @ , . ; : / #` percent-encoded as `%XX` (upper-case hex; RFC 3986
/// §2.1), `%` itself included, so two ids never share a channel. Identity
/// providers issue ids such as `auth0|5f2b9c0e` (channel
/// `user:auth0%7C5f2b9c0e`). Fails when the encoded name is longer than
/// [`MAX_CHANNEL_BYTES`].
pub fn personal(user: &str) -> Result<String, ChannelError> {
    let mut name = String::with_capacity(PERSONAL_PREFIX.len() + user.len());
    name.push_str(PERSONAL_PREFIX);
    for b in user.bytes() {
        if b.is_ascii_alphanumeric() || (b != b'%' && PUNCTUATION.as_bytes().contains(&b)) {
            name.push(char::from(b));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            name.push('%');
            name.push(char::from(HEX[usize::from(b >> 4)]));
            name.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    validate(&name)?;
    Ok(name)
}

/// Checks a channel name.
pub fn validate(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_BYTES {
        return Err(ChannelError::TooLong(name.len()));
    }
    match name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || PUNCTUATION.contains(c)))
    {
        Some(c) => Err(ChannelError::BadChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_typical_names() {
        for n in [
            "room:42",
            "private-user.7",
            "presence-a_b",
            "dash/metrics#cpu",
        ] {
            assert_eq!(validate(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn personal_channels_encode_any_id() {
        assert_eq!(personal("42").unwrap(), "user:42");
        assert_eq!(personal("auth0|5f2b9c0e").unwrap(), "user:auth0%7C5f2b9c0e");
        assert_eq!(personal("a b%").unwrap(), "user:a%20b%25");
        assert_eq!(personal("é").unwrap(), "user:%C3%A9");
        // `%` is always encoded, so an id that looks encoded stays distinct.
        assert_ne!(personal("a|b").unwrap(), personal("a%7Cb").unwrap());
        for id in ["auth0|5f2b9c0e", "google-oauth2|1093", "x y\t\"z\"", "用户"] {
            assert_eq!(validate(&personal(id).unwrap()), Ok(()), "{id}");
        }
        assert_eq!(personal(&"|".repeat(65)).map(|n| n.len()), Ok(200));
        assert_eq!(
            personal(&"|".repeat(66)),
            Err(ChannelError::TooLong(5 + 66 * 3))
        );
    }

    #[test]
    fn rejects_empty_long_and_odd_characters() {
        assert_eq!(validate(""), Err(ChannelError::Empty));
        assert_eq!(validate(&"a".repeat(201)), Err(ChannelError::TooLong(201)));
        assert_eq!(validate("a b"), Err(ChannelError::BadChar(' ')));
        assert_eq!(validate("é"), Err(ChannelError::BadChar('é')));
    }
}
