//! Who a connection is and what it may do. Pure: the clock arrives as an
//! argument.
//!
//! Channels are public unless their name starts with a protected prefix:
//! `private-`, `presence-` or `user:`. A protected channel needs a token:
//! the personal channel `user:<sub>` (the id percent-encoded, see
//! [`channel::personal`]) is always open to its own user; others must match a pattern
//! in the token's `channels` claim. A token's `publish` claim, when present,
//! is the complete list of channels its holder may publish to.

#![forbid(unsafe_code)]

pub mod jwt;

use crate::config::AuthConfig;
use crate::protocol::channel::{self, ChannelError};
pub use jwt::{Claims, KeyError, TokenError, Verifier};

/// Prefixes of channels that need a token.
pub const PROTECTED_PREFIXES: [&str; 5] = [
    "private-",
    "presence-",
    channel::PERSONAL_PREFIX,
    // A Pusher user's server-to-user channel: only that signed-in user's
    // connections (or a token that grants it) may subscribe.
    crate::protocol::pusher::channel::SERVER_TO_USER_PREFIX,
    // The channels of the Pusher apps other than the default one
    // (`[[pusher.apps]]`): only their own Pusher clients (or a token that
    // grants them) reach them.
    crate::protocol::pusher::channel::APP_PREFIX,
];

/// An authenticated connection's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id: the token's `sub` (never empty for a verified token).
    pub user: String,
    /// The user's personal channel (`None` for a token without `sub`).
    personal: Option<String>,
    /// Token expiry (seconds since the Unix epoch), if any.
    pub expires: Option<u64>,
    channels: Vec<String>,
    publish: Option<Vec<String>>,
}

impl Identity {
    /// A Pusher connection that signed in (`pusher:signin`) as `user`: no
    /// personal channel, no channel or publish claims, no expiry.
    pub fn signed_in(user: String) -> Identity {
        Identity {
            user,
            personal: None,
            expires: None,
            channels: Vec::new(),
            publish: None,
        }
    }

    /// Fails when the token's `sub` has no valid personal channel (its
    /// encoded name would be too long).
    pub fn from_claims(c: Claims) -> Result<Self, ChannelError> {
        let user = c.sub.unwrap_or_default();
        let personal = if user.is_empty() {
            None
        } else {
            Some(channel::personal(&user)?)
        };
        Ok(Identity {
            user,
            personal,
            expires: c.exp,
            channels: c.channels,
            publish: c.publish,
        })
    }
}

/// The connect policy, from configuration.
pub struct Auth {
    verifier: Verifier,
    /// Whether a Connect without a token is allowed (`auth.anonymous`).
    pub anonymous: bool,
    /// Whether anonymous connections may publish to unprotected channels
    /// (`auth.anonymous_publish`).
    pub anonymous_publish: bool,
}

/// Why a Connect was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    /// No (or an empty) token while `auth.anonymous` is off.
    #[error("a token is required")]
    TokenRequired,
    /// The token did not verify.
    #[error("{0}")]
    Token(#[from] TokenError),
    /// The token's `sub` gives a personal channel name over
    /// [`channel::MAX_CHANNEL_BYTES`] once encoded.
    #[error("the token's sub has no personal channel: {0}")]
    Subject(#[from] ChannelError),
}

impl Auth {
    /// The policy of the `[auth]` section. Errors: the key errors of
    /// [`Verifier::new`] (HS256 secret under 32 bytes, unparsable Ed25519
    /// key).
    pub fn from_config(c: &AuthConfig) -> Result<Self, KeyError> {
        Ok(Auth {
            verifier: Verifier::new(
                &c.hs256_secret,
                &c.ed25519_public_key,
                &c.issuer,
                &c.audience,
                c.leeway_secs,
            )?
            .require_exp(c.require_exp),
            anonymous: c.anonymous,
            anonymous_publish: c.anonymous_publish,
        })
    }

    /// Checks a Connect: `Ok(None)` for an allowed anonymous client.
    pub fn connect(&self, token: Option<&str>, now: u64) -> Result<Option<Identity>, ConnectError> {
        match token.filter(|t| !t.is_empty()) {
            None if self.anonymous => Ok(None),
            None => Err(ConnectError::TokenRequired),
            Some(t) => Ok(Some(Identity::from_claims(self.verifier.verify(t, now)?)?)),
        }
    }

    /// Whether `who` (`None` = anonymous) may subscribe to `channel`:
    /// always for an unprotected channel; for a protected one, only its own
    /// personal channel or a match of the token's `channels` patterns.
    pub fn may_subscribe(&self, who: Option<&Identity>, channel: &str) -> bool {
        if !is_protected(channel) {
            return true;
        }
        let Some(id) = who else {
            return false;
        };
        id.personal.as_deref() == Some(channel) || matches_any(&id.channels, channel)
    }

    /// Whether `who` (`None` = anonymous) may publish to `channel`.
    /// Anonymous: only unprotected channels, and only if
    /// `anonymous_publish`. With a `publish` claim: exactly its patterns.
    /// Otherwise: unprotected channels and matches of `channels`.
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

/// Whether `channel` starts with one of [`PROTECTED_PREFIXES`] (so needs a
/// token).
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
        Identity::from_claims(Claims {
            sub: Some(user.into()).filter(|u: &String| !u.is_empty()),
            channels: channels.iter().map(|s| s.to_string()).collect(),
            publish: publish.map(|p| p.iter().map(|s| s.to_string()).collect()),
            ..Claims::default()
        })
        .unwrap()
    }

    fn auth(anonymous: bool, anonymous_publish: bool) -> Auth {
        Auth::from_config(&AuthConfig {
            anonymous,
            anonymous_publish,
            hs256_secret: "auth-unit-test-secret-of-32-bytes".into(),
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
    fn require_exp_refuses_tokens_without_exp() {
        let secret = "auth-unit-test-secret-of-32-bytes";
        let config = |require_exp| AuthConfig {
            hs256_secret: secret.into(),
            require_exp,
            ..AuthConfig::default()
        };
        let forever = jwt::mint::hs256(secret.as_bytes(), &serde_json::json!({"sub": "u"}));
        let lax = Auth::from_config(&config(false)).unwrap();
        assert!(lax.connect(Some(&forever), 100).unwrap().is_some());
        let strict = Auth::from_config(&config(true)).unwrap();
        assert_eq!(
            strict.connect(Some(&forever), 100),
            Err(ConnectError::Token(TokenError::NoExpiry))
        );
        let expiring = jwt::mint::hs256(
            secret.as_bytes(),
            &serde_json::json!({"sub": "u", "exp": 200}),
        );
        let who = strict.connect(Some(&expiring), 100).unwrap().unwrap();
        assert_eq!(who.expires, Some(200));
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
        let idp = id("auth0|5f2b9c0e", &[], None);
        assert!(a.may_subscribe(Some(&idp), "user:auth0%7C5f2b9c0e"));
        assert!(!a.may_subscribe(Some(&idp), "user:auth0|5f2b9c0e"));
        let no_sub = id("", &[], None);
        assert!(
            !a.may_subscribe(Some(&no_sub), "user:"),
            "no sub, no personal channel"
        );
        let limited = id("7", &[], Some(&["chat:*"]));
        assert!(a.may_publish(Some(&limited), "chat:1"));
        assert!(!a.may_publish(Some(&limited), "news"));
    }
}
