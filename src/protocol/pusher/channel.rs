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

/// The start of every channel of a non-default Pusher app inside the bus:
/// app `<id>`'s channel `chat` is `#app-<id>/chat` there (see [`to_bus`]).
///
/// It starts with `#` because no channel a Pusher app names for itself
/// does: Pusher's channel names are `A-Z a-z 0-9 _ - = @ , . ;`, and `#` is
/// only the server's own `#server-to-user-` prefix. So a prefixed name can
/// never be the name of a default-app or native channel by accident, and
/// stripping it ([`to_client`]) is unambiguous. Native clients cannot open
/// such channels without a token claim (`auth::PROTECTED_PREFIXES`), nor
/// can a Pusher client of another app (the name it asks for is checked as
/// given, and `#app-` is protected).
pub const APP_PREFIX: &str = "#app-";

/// The prefix of app `id`'s channels in the bus: `#app-<id>/`.
pub fn app_namespace(id: &str) -> String {
    format!("{APP_PREFIX}{id}/")
}

/// The bus name of channel `name` of the app whose namespace is
/// `namespace` (empty for the default app, which shares the native
/// namespace; else [`app_namespace`]). `name` is the client's name, already
/// checked as such; the bus name too must fit the channel name limit, else
/// [`ChannelError::TooLong`](crate::protocol::channel::ChannelError::TooLong) with its length.
pub fn to_bus<'a>(
    namespace: &str,
    name: &'a str,
) -> Result<std::borrow::Cow<'a, str>, crate::protocol::channel::ChannelError> {
    use crate::protocol::channel::{ChannelError, MAX_CHANNEL_BYTES};
    if namespace.is_empty() {
        return Ok(std::borrow::Cow::Borrowed(name));
    }
    let len = namespace.len() + name.len();
    if len > MAX_CHANNEL_BYTES {
        return Err(ChannelError::TooLong(len));
    }
    Ok(std::borrow::Cow::Owned(format!("{namespace}{name}")))
}

/// The name the clients of a bus channel's app know it by: `bus` without
/// its `#app-<id>/` namespace, if it has one (the inverse of [`to_bus`]).
pub fn to_client(bus: &str) -> &str {
    match bus.strip_prefix(APP_PREFIX).and_then(|r| r.split_once('/')) {
        Some((_, name)) => name,
        None => bus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_channels_map_to_the_bus_and_back() {
        let ns = app_namespace("2");
        assert_eq!(ns, "#app-2/");
        for name in ["chat", "presence-room", "#server-to-user-u1", "a/b"] {
            let bus = to_bus(&ns, name).unwrap();
            assert_eq!(bus, format!("#app-2/{name}"));
            assert_eq!(to_client(&bus), name);
            // The default app's names are the bus's.
            assert_eq!(to_bus("", name).unwrap(), name);
            assert_eq!(to_client(name), name);
        }
        assert!(crate::bus::is_presence(
            &to_bus(&ns, "presence-room").unwrap()
        ));
        // The limit holds after prefixing.
        let max = crate::protocol::channel::MAX_CHANNEL_BYTES;
        let fits = "a".repeat(max - ns.len());
        assert_eq!(to_bus(&ns, &fits).unwrap().len(), max);
        let over = "a".repeat(max - ns.len() + 1);
        assert_eq!(
            to_bus(&ns, &over),
            Err(crate::protocol::channel::ChannelError::TooLong(max + 1))
        );
        assert!(to_bus("", &"a".repeat(max)).is_ok());
    }

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
