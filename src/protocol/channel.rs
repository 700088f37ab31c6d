//! Channel names. Kept to a conservative alphabet so names are safe to use
//! as Redis keys, in URLs and in logs without escaping.

use thiserror::Error;

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 200;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {0} bytes; the limit is {MAX_CHANNEL_BYTES}")]
    TooLong(usize),
    #[error("channel name contains {0:?}; allowed: A-Z a-z 0-9 and _ - = @ , . ; : / #")]
    BadChar(char),
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
        .find(|&c| !(c.is_ascii_alphanumeric() || "_-=@,.;:/#".contains(c)))
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
    fn rejects_empty_long_and_odd_characters() {
        assert_eq!(validate(""), Err(ChannelError::Empty));
        assert_eq!(validate(&"a".repeat(201)), Err(ChannelError::TooLong(201)));
        assert_eq!(validate("a b"), Err(ChannelError::BadChar(' ')));
        assert_eq!(validate("é"), Err(ChannelError::BadChar('é')));
    }
}
