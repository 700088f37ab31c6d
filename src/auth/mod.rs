//! Who a connection is and what it may do. Pure: the clock arrives as an
//! argument.
//!
//! Channels are public unless their name starts with a protected prefix:
//! `private-`, `presence-` or `user:`. A protected channel needs a token:
//! `user:<sub>` is always open to its own user; others must match a pattern
//! in the token's `channels` claim. A token's `publish` claim, when present,
//! is the complete list of channels its holder may publish to.

pub mod jwt;

use crate::config::AuthConfig;
pub use jwt::{Claims, KeyError, TokenError, Verifier};

/// Prefixes of channels that need a token.
pub const PROTECTED_PREFIXES: [&str; 3] = ["private-", "presence-", "user:"];

/// An authenticated connection's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// Token expiry (seconds since the Unix epoch), if any.
    pub expires: Option<u64>,
    channels: Vec<String>,
    publish: Option<Vec<String>>,
}

impl Identity {
    pub fn from_claims(c: Claims) -> Self {
        Identity {
            user: c.sub.unwrap_or_default(),
            expires: c.exp,
            channels: c.channels,
            publish: c.publish,
        }
    }
}

/// The connect policy, from configuration.
pub struct Auth {
    verifier: Verifier,
    pub anonymous: bool,
    pub anonymous_publish: bool,
}

/// Why a Connect was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    #[error("a token is required")]
    TokenRequired,
    #[error("{0}")]
    Token(#[from] TokenError),
}

impl Auth {
    pub fn from_config(c: &AuthConfig) -> Result<Self, KeyError> {
        Ok(Auth {
            verifier: Verifier::new(
                &c.hs256_secret,
                &c.ed25519_public_key,
                &c.issuer,
                &c.audience,
                c.leeway_secs,
            )?,
            anonymous: c.anonymous,
            anonymous_publish: c.anonymous_publish,
        })
    }

    /// Checks a Connect: `Ok(None)` for an allowed anonymous client.
    pub fn connect(&self, token: Option<&str>, now: u64) -> Result<Option<Identity>, ConnectError> {
        match token.filter(|t| !t.is_empty()) {
            None if self.anonymous => Ok(None),
            None => Err(ConnectError::TokenRequired),
            Some(t) => Ok(Some(Identity::from_claims(self.verifier.verify(t, now)?))),
        }
    }

    pub fn may_subscribe(&self, who: Option<&Identity>, channel: &str) -> bool {
        if !is_protected(channel) {
            return true;
        }
        let Some(id) = who else {
            return false;
        };
        channel.strip_prefix("user:") == Some(id.user.as_str())
            || matches_any(&id.channels, channel)
    }

    pub fn may_publish(&self, who: Option<&Identity>, channel: &str) -> bool {
        match who {
            None => self.anonymous_publish && !is_protected(channel),
            Some(id) => match &id.publish {
                Some(patterns) => matches_any(patterns, channel),
                None => !is_protected(channel) || matches_any(&id.channels, channel),
            },
        }
    }
}

pub fn is_protected(channel: &str) -> bool {
    PROTECTED_PREFIXES.iter().any(|p| channel.starts_with(p))
}

fn matches_any(patterns: &[String], channel: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => p == channel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(user: &str, channels: &[&str], publish: Option<&[&str]>) -> Identity {
        Identity {
            user: user.into(),
            expires: None,
            channels: channels.iter().map(|s| s.to_string()).collect(),
            publish: publish.map(|p| p.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn auth(anonymous: bool, anonymous_publish: bool) -> Auth {
        Auth::from_config(&AuthConfig {
            anonymous,
            anonymous_publish,
            hs256_secret: "k".into(),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn anonymous_clients_only_get_public_channels() {
        let a = auth(true, false);
        assert_eq!(a.connect(None, 0), Ok(None));
        assert!(a.may_subscribe(None, "news"));
        assert!(!a.may_subscribe(None, "private-x"));
        assert!(!a.may_subscribe(None, "user:1"));
        assert!(!a.may_publish(None, "news"), "anonymous_publish is off");
        assert_eq!(
            auth(false, false).connect(None, 0),
            Err(ConnectError::TokenRequired)
        );
    }

    #[test]
    fn protected_channels_follow_the_claims() {
        let a = auth(false, false);
        let u = id("7", &["private-team-*", "presence-lobby"], None);
        assert!(a.may_subscribe(Some(&u), "user:7"));
        assert!(!a.may_subscribe(Some(&u), "user:8"));
        assert!(a.may_subscribe(Some(&u), "private-team-blue"));
        assert!(!a.may_subscribe(Some(&u), "private-other"));
        assert!(a.may_subscribe(Some(&u), "presence-lobby"));
        assert!(a.may_publish(Some(&u), "news"));
        assert!(a.may_publish(Some(&u), "private-team-blue"));
        assert!(!a.may_publish(Some(&u), "user:8"));
        let limited = id("7", &[], Some(&["chat:*"]));
        assert!(a.may_publish(Some(&limited), "chat:1"));
        assert!(!a.may_publish(Some(&limited), "news"));
    }
}
