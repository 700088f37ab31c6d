//! What a Pusher channel's name says about it: who may subscribe, whether
//! a subscription carries presence data, whether client events are
//! allowed, and whether the last event is replayed to new subscribers.

#![forbid(unsafe_code)]

/// The server-to-user channel prefix: `#server-to-user-<user id>` carries
/// what the HTTP API sends to one signed-in user. Clients can never
/// subscribe to it themselves.
pub const SERVER_TO_USER_PREFIX: &str = "#server-to-user-";

/// The kind of a Pusher channel, from its name's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No prefix: anyone may subscribe.
    Public,
    /// `private-`: a subscription needs a signature from the app's backend.
    Private,
    /// `private-encrypted-`: as private; payloads are end-to-end encrypted
    /// by the clients and passed through untouched; no client events.
    PrivateEncrypted,
    /// `presence-`: as private, plus `channel_data` naming the user; the
    /// members are announced to every subscriber.
    Presence,
    /// `#server-to-user-`: only the server subscribes a signed-in user.
    ServerToUser,
}

/// A channel's kind and whether it is a cache channel (`cache-`,
/// `private-cache-`, `private-encrypted-cache-`, `presence-cache-`: the
/// last event is replayed to each new subscriber, else
/// `pusher:cache_miss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelKind {
    /// Who may subscribe and what a subscription carries.
    pub kind: Kind,
    /// Whether the last event is replayed on subscribe.
    pub cache: bool,
}

impl ChannelKind {
    /// The kind of `name`.
    pub fn of(name: &str) -> ChannelKind {
        let (kind, rest) = if let Some(rest) = name.strip_prefix("private-encrypted-") {
            (Kind::PrivateEncrypted, rest)
        } else if let Some(rest) = name.strip_prefix("private-") {
            (Kind::Private, rest)
        } else if let Some(rest) = name.strip_prefix("presence-") {
            (Kind::Presence, rest)
        } else if name.starts_with(SERVER_TO_USER_PREFIX) {
            (Kind::ServerToUser, "")
        } else {
            (Kind::Public, name)
        };
        ChannelKind {
            kind,
            cache: rest.starts_with("cache-"),
        }
    }

    /// Whether a subscription needs a signature (`auth`).
    pub fn needs_auth(self) -> bool {
        matches!(
            self.kind,
            Kind::Private | Kind::PrivateEncrypted | Kind::Presence
        )
    }

    /// Whether clients may send `client-*` events on it (Pusher: private
    /// and presence channels only; never encrypted ones, whose payloads
    /// the server cannot see).
    pub fn allows_client_events(self) -> bool {
        matches!(self.kind, Kind::Private | Kind::Presence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_give_kinds() {
        let k = |n: &str| ChannelKind::of(n);
        assert_eq!(k("chat").kind, Kind::Public);
        assert_eq!(k("private-room").kind, Kind::Private);
        assert_eq!(k("private-encrypted-room").kind, Kind::PrivateEncrypted);
        assert_eq!(k("presence-room").kind, Kind::Presence);
        assert_eq!(k("#server-to-user-42").kind, Kind::ServerToUser);
        // A prefix must be at the start.
        assert_eq!(k("my-private-room").kind, Kind::Public);
    }

    #[test]
    fn cache_channels_are_recognised_under_every_prefix() {
        for name in [
            "cache-x",
            "private-cache-x",
            "private-encrypted-cache-x",
            "presence-cache-x",
        ] {
            assert!(ChannelKind::of(name).cache, "{name}");
        }
        for name in ["x", "private-x", "cachex", "presence-x-cache-y"] {
            assert!(!ChannelKind::of(name).cache, "{name}");
        }
    }

    #[test]
    fn auth_and_client_events_follow_the_kind() {
        assert!(!ChannelKind::of("chat").needs_auth());
        assert!(ChannelKind::of("private-a").needs_auth());
        assert!(ChannelKind::of("presence-a").needs_auth());
        assert!(ChannelKind::of("private-encrypted-a").needs_auth());
        assert!(ChannelKind::of("private-a").allows_client_events());
        assert!(ChannelKind::of("presence-a").allows_client_events());
        assert!(!ChannelKind::of("chat").allows_client_events());
        assert!(!ChannelKind::of("private-encrypted-a").allows_client_events());
    }
}
