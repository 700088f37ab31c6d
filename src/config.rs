//! Configuration: one TOML file, every key overridable by a `SHARDCAST_*`
//! environment variable and by a command-line flag (in that order of
//! precedence: file < environment < flag).
//!
//! Every key is a `section.key` pair. The environment variable is
//! `SHARDCAST_SECTION_KEY` and the flag is `--section-key` (underscores
//! become dashes), so operators can derive one name from another without a
//! table. Overrides are typed by the key's default value, and unknown keys
//! are errors: a typo in a systemd unit should stop the service, not be
//! ignored.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors found while loading or validating configuration. Each names the
/// key (or variable / flag) at fault so the operator knows what to fix.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file's path, as given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An environment file (`--env-file`) could not be read.
    #[error("cannot read environment file {path}: {source}")]
    ReadEnvFile {
        /// The file's path, as given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not TOML, or has an unknown section or key or a value of
    /// the wrong type (also for the merged result of the overrides, `path`
    /// `<overrides>`).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file's path, or `<overrides>`.
        path: String,
        /// The TOML or serde message (it points at the line).
        message: String,
    },
    /// An override (environment variable or flag) names no known key.
    #[error("unknown config key `{key}` (from {origin}); known keys: {known}")]
    UnknownKey {
        /// The key (or the environment variable's name) as given.
        key: String,
        /// Where it came from, e.g. `environment variable SHARDCAST_X`.
        origin: String,
        /// Every valid key (or variable name), comma-separated.
        known: String,
    },
    /// A key that was renamed is set (in the file, the environment or a
    /// flag).
    #[error("config key `{old}` (from {origin}) was renamed `{new}`: set that instead")]
    Renamed {
        /// The old `section.key`.
        old: &'static str,
        /// The `section.key` to set instead.
        new: &'static str,
        /// Where it was set.
        origin: String,
    },
    /// A key that was removed is set (in the file, the environment or a
    /// flag).
    #[error("config key `{key}` (from {origin}) was removed: {reason}")]
    Removed {
        /// The `section.key`.
        key: &'static str,
        /// Why, and what to do instead.
        reason: &'static str,
        /// Where it was set.
        origin: String,
    },
    /// An override's value does not parse as the key's type (the type of
    /// its default), or a config file's value for a boolean key is not one
    /// of the words of [`parse_bool`].
    #[error("config key `{key}` (from {origin}): cannot parse {value:?} as {expected}")]
    BadOverride {
        /// The `section.key`.
        key: String,
        /// Where it came from (environment variable, flag or config file).
        origin: String,
        /// The value as given.
        value: String,
        /// The type wanted, e.g. `"an integer"`.
        expected: &'static str,
    },
    /// A value is out of its allowed range or otherwise unusable.
    #[error("config key `{key}` = {value}: {reason}")]
    Invalid {
        /// The `section.key`.
        key: &'static str,
        /// The value (`(redacted)` for secrets and URLs).
        value: String,
        /// What is allowed, e.g. `must be between 1 and 1024 inclusive`.
        reason: String,
    },
}

/// The whole configuration, as validated.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: listen address, shards, drain.
    pub server: ServerConfig,
    /// `[websocket]`: frame and handshake caps.
    pub websocket: WebSocketConfig,
    /// `[fanout]`: outbound budgets, batching, publish and subscription caps.
    pub fanout: FanoutConfig,
    /// `[limits]`: connection, rate and keepalive limits.
    pub limits: LimitsConfig,
    /// `[history]`: what is kept for recovery.
    pub history: HistoryConfig,
    /// `[redis]`: the Redis bus (empty `url` = embedded bus).
    pub redis: RedisConfig,
    /// `[compression]`: zstd framing.
    pub compression: CompressionConfig,
    /// `[auth]`: connect tokens.
    pub auth: AuthConfig,
    /// `[admin]`: the admin HTTP endpoint.
    pub admin: AdminConfig,
    /// `[log]`: log level and format.
    pub log: LogConfig,
    /// `[pusher]`: the Pusher Channels app served on `/app/{key}`.
    pub pusher: PusherConfig,
}

/// The `[pusher]` section: one Pusher Channels app (protocol 7), served on
/// the main listener at `/app/{app_key}` (WebSocket) and `/apps/{app_id}/…`
/// (HTTP API). Empty `app_key` = no Pusher endpoint. Its channels share the
/// namespace of native clients: a Pusher `chat` and a native `chat` are one
/// channel.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PusherConfig {
    /// The app id of the HTTP API paths (`/apps/{app_id}/events`).
    pub app_id: String,
    /// The key clients connect with (`/app/{app_key}`) and that signs
    /// channel auth and HTTP API requests; empty disables Pusher.
    pub app_key: String,
    /// The secret that signs subscriptions, sign-ins and HTTP API requests
    /// (HMAC-SHA256).
    pub app_secret: String,
    /// Whether clients may send `client-*` events on private and presence
    /// channels.
    pub client_events: bool,
    /// Client events per second one connection may send (Pusher: 10);
    /// beyond it (after a burst of as many) the connection is closed with
    /// 4301.
    pub client_event_rate: u32,
    /// Seconds of silence after which a Pusher client pings (sent in
    /// `pusher:connection_established`).
    pub activity_timeout_secs: u32,
    /// Largest event `data`, in bytes, from the HTTP API or a client
    /// (Pusher: 10 KB); larger → HTTP 413 / `pusher:error`.
    pub max_event_bytes: u32,
    /// Most channels one HTTP API trigger may name (Pusher: 100).
    pub max_channels_per_trigger: u32,
    /// Most events in one `batch_events` request (Pusher: 10).
    pub max_batch_events: u32,
    /// Most members of one presence channel (Pusher: 100); a subscription
    /// beyond gets `pusher:subscription_error` (`LimitReached`).
    pub presence_max_members: u32,
    /// Largest `user_info` of a presence member, in bytes (Pusher: 1 KB).
    pub presence_max_user_info_bytes: u32,
    /// `[[pusher.apps]]` (config file only): more apps, each isolated in
    /// its own channel namespace (`#app-<id>/…` in the bus). Not in the
    /// flat key list (no flag or variable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<PusherAppConfig>,
}

/// One `[[pusher.apps]]` table: an app besides the default one of the
/// `pusher.*` keys, with its own limits (same defaults and ranges as the
/// default app's keys). `id`, `key` and `secret` are required (checked by
/// [`Config::validate`], which names the app's position).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PusherAppConfig {
    /// The app id of the HTTP API paths (`/apps/{id}/…`), at most 32 bytes.
    pub id: String,
    /// The key clients connect with (`/app/{key}`).
    pub key: String,
    /// The secret that signs its subscriptions, sign-ins and HTTP API
    /// requests.
    pub secret: String,
    /// As `pusher.client_events`.
    pub client_events: bool,
    /// As `pusher.client_event_rate`.
    pub client_event_rate: u32,
    /// As `pusher.activity_timeout_secs`.
    pub activity_timeout_secs: u32,
    /// As `pusher.max_event_bytes`.
    pub max_event_bytes: u32,
    /// As `pusher.max_channels_per_trigger`.
    pub max_channels_per_trigger: u32,
    /// As `pusher.max_batch_events`.
    pub max_batch_events: u32,
    /// As `pusher.presence_max_members`.
    pub presence_max_members: u32,
    /// As `pusher.presence_max_user_info_bytes`.
    pub presence_max_user_info_bytes: u32,
}

impl PusherConfig {
    /// The default app's settings in the shape of a `[[pusher.apps]]` table.
    pub fn default_app(&self) -> PusherAppConfig {
        PusherAppConfig {
            id: self.app_id.clone(),
            key: self.app_key.clone(),
            secret: self.app_secret.clone(),
            client_events: self.client_events,
            client_event_rate: self.client_event_rate,
            activity_timeout_secs: self.activity_timeout_secs,
            max_event_bytes: self.max_event_bytes,
            max_channels_per_trigger: self.max_channels_per_trigger,
            max_batch_events: self.max_batch_events,
            presence_max_members: self.presence_max_members,
            presence_max_user_info_bytes: self.presence_max_user_info_bytes,
        }
    }
}

impl Default for PusherAppConfig {
    /// The `pusher.*` keys' defaults (an empty id, key and secret).
    fn default() -> Self {
        PusherConfig::default().default_app()
    }
}

/// Longest `[[pusher.apps]]` id, in bytes (it becomes part of every
/// channel name of the app in the bus: `#app-<id>/…`).
pub const MAX_PUSHER_APP_ID_BYTES: usize = 32;

impl Default for PusherConfig {
    fn default() -> Self {
        PusherConfig {
            app_id: String::new(),
            app_key: String::new(),
            app_secret: String::new(),
            client_events: false,
            client_event_rate: 10,
            activity_timeout_secs: 120,
            max_event_bytes: 10_240,
            max_channels_per_trigger: 100,
            max_batch_events: 10,
            presence_max_members: 100,
            presence_max_user_info_bytes: 1024,
            apps: Vec::new(),
        }
    }
}

/// The `[server]` section: where shards listen and how they stop.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address every shard listens on (each shard binds its own
    /// `SO_REUSEPORT` socket). Port 0 picks a free port once and shares it.
    pub listen: String,
    /// Number of shards (threads); 0 means one per available core.
    pub shards: u32,
    /// Pin each shard thread to one core.
    pub pin_threads: bool,
    /// Listen backlog per shard socket.
    pub backlog: u32,
    /// On SIGTERM/SIGINT, connections are closed (1012) spread over this
    /// window, so clients do not all reconnect in the same instant.
    pub drain_window_ms: u32,
}

/// The `[websocket]` section: caps on what a client may send (over a frame
/// or message cap: close 1009; over a handshake cap: HTTP 431) and the
/// close timeout.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest single frame a client may send (payload bytes).
    pub max_frame_bytes: u32,
    /// Largest message (all fragments together) a client may send.
    pub max_message_bytes: u32,
    /// Most fragments one message may be split into.
    pub max_fragments: u32,
    /// Cap on the HTTP upgrade request head, in bytes.
    pub handshake_max_header_bytes: u32,
    /// Cap on the number of header lines in the upgrade request.
    pub handshake_max_headers: u32,
    /// After the server sends a close frame, how long the connection may
    /// take to flush it and answer before the socket is shut down anyway.
    pub close_timeout_ms: u32,
}

/// The `[fanout]` section: per-connection outbound budgets, batching, and
/// caps on publishes and subscriptions.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// Bytes that may wait in one connection's outbound queue (beyond what
    /// the kernel accepted). Over it the connection is closed as a slow
    /// consumer (close code 4001).
    pub outbound_budget_bytes: u32,
    /// How long the oldest queued byte may wait before the connection is
    /// closed as a slow consumer.
    pub outbound_max_age_ms: u32,
    /// Most publications of one channel carried by one outgoing frame.
    pub max_batch: u32,
    /// Pause after a tick that batched publications (two or more of a
    /// channel in one frame), so that what arrives meanwhile shares frames
    /// and writes; 0 never pauses (lowest latency, more sends per message
    /// under heavy load).
    pub tick_pause_ms: u32,
    /// Largest payload a client may publish.
    pub max_publish_bytes: u32,
    /// Most channels one connection may subscribe to.
    pub max_subscriptions_per_connection: u32,
}

/// Limits that protect the server from clients. 0 turns a limit off where
/// noted.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections one shard holds; beyond it new ones get 503.
    pub max_connections_per_shard: u32,
    /// Concurrent connections from one IP address (0 = no limit). Mind
    /// carrier-grade NAT: many mobile users can share one address.
    pub max_connections_per_ip: u32,
    /// New connections per second from one IP address (0 = no limit).
    pub accept_rate_per_ip: u32,
    /// Burst allowed above `accept_rate_per_ip`.
    pub accept_burst_per_ip: u32,
    /// Time allowed for the whole upgrade request (slowloris defence).
    pub handshake_timeout_ms: u32,
    /// Messages per second one connection may send (token bucket).
    pub messages_per_second: u32,
    /// Burst allowed above `messages_per_second`.
    pub message_burst: u32,
    /// Rate-limited messages in a row before the connection is closed.
    pub rate_limit_strikes: u32,
    /// A connection silent this long is pinged.
    pub ping_interval_ms: u32,
    /// A connection silent this long (no data, no pong) is closed (4002).
    pub idle_timeout_ms: u32,
    /// Comma-separated Origin values browsers may connect from; empty
    /// allows any (native clients send no Origin and are not affected).
    pub allowed_origins: String,
}

/// What is kept for recovery: clients that resubscribe with their last
/// position get what they missed, if it is still kept.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Publications kept per channel (0 = none).
    pub size: u32,
    /// How long a channel's history is kept after its last publication.
    pub ttl_secs: u32,
    /// Embedded bus: MiB of history and idempotency keys kept over all
    /// channels (payloads or keys plus 96 B each); over it the oldest go
    /// first.
    pub max_mib: u32,
    /// How long a publisher's idempotency key is remembered (both buses).
    pub idempotency_ttl_secs: u32,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: 1000,
            ttl_secs: 3600,
            max_mib: 256,
            idempotency_ttl_secs: 3600,
        }
    }
}

/// The Redis bus: several nodes, durable history. Empty `url` keeps the
/// embedded in-process bus.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`; empty = no Redis.
    pub url: String,
    /// Bound on every Redis command; a publish not stored within it fails
    /// with `Unavailable` instead of hanging.
    pub command_timeout_ms: u32,
    /// This node's name (its ingest consumer name); empty = hostname-pid.
    pub node_id: String,
    /// Consume the ingest stream `sc:ingest` on this node.
    pub ingest: bool,
    /// Ingest entries pending this long on another (dead) node are taken
    /// over.
    pub ingest_claim_idle_secs: u32,
    /// A node's presence entries expire this long after its last heartbeat
    /// (sent every third of it): a dead node's members are removed within
    /// 4/3 of it.
    pub presence_ttl_ms: u32,
    /// Replicas that must confirm a publish (Redis `WAIT`) before it is
    /// acknowledged; 0 = acknowledged once the primary stored it.
    pub wait_replicas: u32,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            command_timeout_ms: 1000,

            node_id: String::new(),
            ingest: true,
            ingest_claim_idle_secs: 30,
            presence_ttl_ms: 15_000,
            wait_replicas: 0,
        }
    }
}

/// zstd for connections that negotiate `shardcast.v1+zstd`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// zstd level for broadcasts (1 is fast and already gives most of the
    /// gain on batches).
    pub level: u32,
    /// Frames at least this long are compressed; shorter ones only with a
    /// dictionary.
    pub min_bytes: u32,
    /// Path of a trained dictionary (`shardcast zstd-train`); empty = none.
    /// Its id (carried by compressed frames, and what clients fetch it by:
    /// `GET /dictionaries/<id>` on `server.listen`) is derived from its
    /// content ([`crate::protocol::compression::dictionary_id`]).
    pub dictionary: String,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            level: 1,
            min_bytes: 512,
            dictionary: String::new(),
        }
    }
}

/// Connect-token verification. Tokens are JWTs; a key's algorithm is fixed
/// by configuration, never taken from the token.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether a client may connect without a token. Anonymous clients
    /// cannot use `private-`, `presence-` or `user:` channels.
    pub anonymous: bool,
    /// Whether anonymous clients may publish.
    pub anonymous_publish: bool,
    /// Shared secret for HS256 tokens (empty = HS256 not accepted); its
    /// UTF-8 bytes are the key, at least 32 of them (RFC 7518 §3.2).
    pub hs256_secret: String,
    /// Ed25519 public key for EdDSA tokens: PEM (SPKI), base64 of the 32
    /// raw bytes, or base64 of the 44-byte DER SPKI (a PEM's body) (empty =
    /// EdDSA not accepted).
    pub ed25519_public_key: String,
    /// Required `iss` claim (empty = not checked).
    pub issuer: String,
    /// Required `aud` claim (empty = not checked).
    pub audience: String,
    /// Refuse tokens without an `exp` claim (by default `exp` is optional:
    /// a token without it never expires).
    pub require_exp: bool,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u32,
    /// A connection must send Connect within this time.
    pub deadline_ms: u32,
}

/// The admin HTTP endpoint: health, readiness, Prometheus metrics.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin endpoint; empty disables it. Keep it off the
    /// public interface: it has no authentication.
    pub listen: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections_per_shard: 500_000,
            max_connections_per_ip: 0,
            accept_rate_per_ip: 0,
            accept_burst_per_ip: 100,
            handshake_timeout_ms: 5_000,
            messages_per_second: 200,
            message_burst: 400,
            rate_limit_strikes: 20,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            allowed_origins: String::new(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            anonymous: true,
            anonymous_publish: true,
            hs256_secret: String::new(),
            ed25519_public_key: String::new(),
            issuer: String::new(),
            audience: String::new(),
            require_exp: false,
            leeway_secs: 5,
            deadline_ms: 10_000,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

/// The `[log]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// One of error, warn, info, debug, trace.
    pub level: String,
    /// `text` (one human-readable line per event; ANSI colour only when
    /// stderr is a terminal) or `json` (one JSON object per line).
    pub format: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            shards: 0,
            pin_threads: true,
            backlog: 4096,
            drain_window_ms: 10_000,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
            max_fragments: 64,
            handshake_max_header_bytes: 8192,
            handshake_max_headers: 64,
            close_timeout_ms: 5000,
        }
    }
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            outbound_budget_bytes: 4 << 20,
            outbound_max_age_ms: 10_000,
            max_batch: 64,
            tick_pause_ms: 1,
            max_publish_bytes: 64 << 10,
            max_subscriptions_per_connection: 1024,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Where an override came from, for error messages.
#[derive(Clone, Debug)]
pub enum Origin {
    /// An environment variable (its name, `SHARDCAST_SECTION_KEY`).
    Env(String),
    /// A command-line flag (its name, `--section-key`).
    Flag(String),
    /// A variable of an environment file (`check-config --env-file`, read
    /// as systemd's `EnvironmentFile=` reads it).
    EnvFile {
        /// The file's path, as given.
        path: String,
        /// The variable's name, `SHARDCAST_SECTION_KEY`.
        name: String,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Flag(name) => write!(f, "flag {name}"),
            Origin::EnvFile { path, name } => write!(f, "{name} in environment file {path}"),
        }
    }
}

/// Where a value of the effective configuration came from
/// (`check-config --print`).
#[derive(Clone, Debug)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The config file (its path).
    File(String),
    /// An environment variable, an environment file's variable or a flag.
    Override(Origin),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(path) => write!(f, "config file {path}"),
            Source::Override(origin) => origin.fmt(f),
        }
    }
}

/// One key of the effective configuration, for display: never a secret in
/// clear.
#[derive(Clone, Debug)]
pub struct Setting {
    /// The `section.key`.
    pub key: String,
    /// The value as TOML would write it, with `auth.hs256_secret` replaced
    /// by its length and the password of `redis.url` by `***`.
    pub value: String,
    /// Where the value came from.
    pub source: Source,
}

/// One key as `shardcast keys` lists it.
#[derive(Clone, Debug)]
pub struct KeyInfo {
    /// The `section.key`.
    pub key: String,
    /// The default, as TOML writes it (strings quoted).
    pub default: String,
    /// What it accepts: an integer range (`1–4096`, a bound may name
    /// another key), `bool`, the allowed words, or the form of a string.
    pub accepts: String,
    /// The flag, `--section-key`.
    pub flag: String,
    /// The environment variable, `SHARDCAST_SECTION_KEY`.
    pub env: String,
}

/// One `section.key = value` override, not yet typed.
#[derive(Clone, Debug)]
pub struct Override {
    /// The `section.key` it sets.
    pub key: String,
    /// The value as given; typed by the key's default when applied.
    pub value: String,
    /// Where it came from.
    pub origin: Origin,
}

impl Config {
    /// Loads the file (if any), applies overrides in order, and validates.
    pub fn load(path: Option<&str>, overrides: &[Override]) -> Result<Config, ConfigError> {
        let mut table = default_table();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_string(),
                source,
            })?;
            let mut file: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        path: path.to_string(),
                        message: e.to_string(),
                    })?;
            reject_renamed(&file, &format!("config file {path}"))?;
            file_booleans(&mut file, path)?;
            // Going through `Config` first rejects unknown sections and keys
            // with serde's message, which points at the offending line.
            Config::deserialize(toml::Value::Table(file.clone())).map_err(|e| {
                ConfigError::Parse {
                    path: path.to_string(),
                    message: e.to_string(),
                }
            })?;
            merge(&mut table, file);
        }
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
                path: "<overrides>".into(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value against its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        // Every integer key against its range ([`RANGES`]).
        let values = self.table();
        for &(key, min, max) in RANGES {
            let min = min.resolve(&values);
            check(key, value_of(&values, key), min..=max.resolve(&values))?;
        }
        if !self.redis.url.is_empty() {
            // TLS (rediss://) is not built in: refuse it rather than fail
            // to connect later.
            if !self.redis.url.starts_with("redis://") {
                return Err(ConfigError::Invalid {
                    key: "redis.url",
                    value: "(redacted)".into(),
                    reason: "expected redis://[user:password@]host:port[/db] (TLS is not supported), or empty for the embedded bus".into(),
                });
            }
            if self.history.size == 0 {
                return Err(ConfigError::Invalid {
                    key: "history.size",
                    value: "0".into(),
                    reason: "must be between 1 and 1000000 with the Redis bus".into(),
                });
            }
        }
        // The keys as the server will use them: one rule, here and at start.
        crate::auth::Auth::from_config(&self.auth).map_err(|e| ConfigError::Invalid {
            key: e.key(),
            value: "(redacted)".into(),
            reason: e.reason(),
        })?;
        self.admin_addr()?;
        if !LOG_LEVELS.contains(&self.log.level.as_str()) {
            return Err(ConfigError::Invalid {
                key: "log.level",
                value: format!("{:?}", self.log.level),
                reason: format!("allowed: {}", LOG_LEVELS.join(", ")),
            });
        }
        self.check_pusher()?;
        if !LOG_FORMATS.contains(&self.log.format.as_str()) {
            return Err(ConfigError::Invalid {
                key: "log.format",
                value: format!("{:?}", self.log.format),
                reason: format!("allowed: {}", LOG_FORMATS.join(", ")),
            });
        }
        Ok(())
    }

    fn check_pusher(&self) -> Result<(), ConfigError> {
        self.check_pusher_apps()?;
        let p = &self.pusher;
        if p.app_key.is_empty() {
            return Ok(());
        }
        for (key, value) in [("pusher.app_key", &p.app_key), ("pusher.app_id", &p.app_id)] {
            if !url_safe(value) {
                return Err(ConfigError::Invalid {
                    key,
                    value: format!("{value:?}"),
                    reason: "must be 1 or more of A-Z a-z 0-9 - _ . ~ when pusher.app_key is set"
                        .into(),
                });
            }
        }
        if p.app_secret.is_empty() {
            return Err(ConfigError::Invalid {
                key: "pusher.app_secret",
                value: "(redacted)".into(),
                reason: "must be set when pusher.app_key is set: it signs channel auth and HTTP API requests".into(),
            });
        }
        Ok(())
    }

    /// Checks each `[[pusher.apps]]` table: id and key URL-safe (the id at
    /// most [`MAX_PUSHER_APP_ID_BYTES`]), a secret, each value of the
    /// integer keys in the range of the default app's key of that name, and
    /// ids and keys unique across all apps (the default one included). The
    /// error names `pusher.apps`, the app's position (1-based) and the
    /// field.
    fn check_pusher_apps(&self) -> Result<(), ConfigError> {
        let p = &self.pusher;
        let invalid = |n: usize, field: &str, value: String, reason: String| ConfigError::Invalid {
            key: "pusher.apps",
            value,
            reason: format!(
                "[[pusher.apps]] table {n} (counting from 1), field `{field}`: {reason}"
            ),
        };
        let mut ids: Vec<&str> = Vec::new();
        let mut keys: Vec<&str> = Vec::new();
        if !p.app_key.is_empty() {
            ids.push(&p.app_id);
            keys.push(&p.app_key);
        }
        let values = self.table();
        for (i, app) in p.apps.iter().enumerate() {
            let n = i + 1;
            for (field, value) in [("id", &app.id), ("key", &app.key)] {
                if value.is_empty() {
                    return Err(invalid(n, field, "\"\"".into(), "is required".into()));
                }
                if !url_safe(value) {
                    return Err(invalid(
                        n,
                        field,
                        format!("{value:?}"),
                        "must be 1 or more of A-Z a-z 0-9 - _ . ~".into(),
                    ));
                }
            }
            if app.id.len() > MAX_PUSHER_APP_ID_BYTES {
                return Err(invalid(
                    n,
                    "id",
                    format!("{:?}", app.id),
                    format!("must be at most {MAX_PUSHER_APP_ID_BYTES} bytes"),
                ));
            }
            if app.secret.is_empty() {
                return Err(invalid(
                    n,
                    "secret",
                    "(redacted)".into(),
                    "is required: it signs channel auth and HTTP API requests".into(),
                ));
            }
            let ints = [
                ("client_event_rate", app.client_event_rate),
                ("activity_timeout_secs", app.activity_timeout_secs),
                ("max_event_bytes", app.max_event_bytes),
                ("max_channels_per_trigger", app.max_channels_per_trigger),
                ("max_batch_events", app.max_batch_events),
                ("presence_max_members", app.presence_max_members),
                (
                    "presence_max_user_info_bytes",
                    app.presence_max_user_info_bytes,
                ),
            ];
            for (field, value) in ints {
                let key = format!("pusher.{field}");
                let (_, min, max) = RANGES
                    .iter()
                    .find(|(k, _, _)| *k == key)
                    .expect("every [[pusher.apps]] integer has a pusher.* range");
                let (min, max) = (min.resolve(&values), max.resolve(&values));
                if !(min..=max).contains(&value) {
                    return Err(invalid(
                        n,
                        field,
                        value.to_string(),
                        format!("must be between {min} and {max} inclusive"),
                    ));
                }
            }
            if ids.contains(&app.id.as_str()) {
                return Err(invalid(
                    n,
                    "id",
                    format!("{:?}", app.id),
                    "another app (pusher.app_id or an earlier [[pusher.apps]]) has this id".into(),
                ));
            }
            if keys.contains(&app.key.as_str()) {
                return Err(invalid(
                    n,
                    "key",
                    format!("{:?}", app.key),
                    "another app (pusher.app_key or an earlier [[pusher.apps]]) has this key"
                        .into(),
                ));
            }
            ids.push(&app.id);
            keys.push(&app.key);
        }
        Ok(())
    }

    /// The parsed listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|e| ConfigError::Invalid {
                key: "server.listen",
                value: format!("{:?}", self.server.listen),
                reason: format!("{e}; expected IP:PORT such as 127.0.0.1:8080"),
            })
    }

    /// The admin endpoint's address, if enabled.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.admin.listen.is_empty() {
            return Ok(None);
        }
        self.admin
            .listen
            .parse()
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                key: "admin.listen",
                value: format!("{:?}", self.admin.listen),
                reason: format!("{e}; expected IP:PORT, or \"\" to disable"),
            })
    }

    /// The number of shards to run: the configured value, or one per core.
    pub fn shard_count(&self) -> usize {
        match self.server.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        }
    }

    /// Every key as `section.key`, for help text and error messages.
    pub fn keys() -> Vec<String> {
        let mut keys = Vec::new();
        for (section, value) in default_table() {
            if let toml::Value::Table(t) = value {
                for key in t.keys() {
                    keys.push(format!("{section}.{key}"));
                }
            }
        }
        keys
    }

    /// This configuration as a TOML table of sections.
    fn table(&self) -> toml::Table {
        match toml::Value::try_from(self) {
            Ok(toml::Value::Table(t)) => t,
            // Plain structs of strings, integers and booleans.
            other => unreachable!("config did not serialise to a table: {other:?}"),
        }
    }

    /// Every key with its default, what it accepts, its flag and its
    /// variable (`shardcast keys`), in [`Config::keys`] order.
    pub fn key_info() -> Vec<KeyInfo> {
        let defaults = default_table();
        Config::keys()
            .into_iter()
            .map(|key| {
                let (section, name) = key.split_once('.').expect("section.key");
                let default = &defaults[section][name];
                let accepts = match (key.as_str(), default) {
                    (_, toml::Value::Integer(_)) => RANGES
                        .iter()
                        .find(|(k, _, _)| *k == key)
                        .map(|(_, min, max)| format!("{min}–{max}")),
                    (_, toml::Value::Boolean(_)) => Some("bool".to_string()),
                    ("log.level", _) => Some(LOG_LEVELS.join("|")),
                    ("log.format", _) => Some(LOG_FORMATS.join("|")),
                    _ => STRING_FORMS
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, form)| form.to_string()),
                };
                KeyInfo {
                    default: default.to_string(),
                    accepts: accepts.unwrap_or_else(|| "any".into()),
                    flag: Config::flag_name(&key),
                    env: Config::env_name(&key),
                    key,
                }
            })
            .collect()
    }

    /// The environment variable that overrides `key`.
    pub fn env_name(key: &str) -> String {
        format!("SHARDCAST_{}", key.replace('.', "_").to_ascii_uppercase())
    }

    /// The flag that overrides `key`.
    pub fn flag_name(key: &str) -> String {
        format!("--{}", key.replace(['.', '_'], "-"))
    }

    /// Collects `SHARDCAST_*` variables as overrides. An unknown one is an
    /// error, so a misspelt variable in a unit file is caught at start.
    pub fn env_overrides(
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<Vec<Override>, ConfigError> {
        Config::variable_overrides(vars, |name| Origin::Env(name.to_string()))
    }

    /// The `SHARDCAST_*` variables of an environment file as overrides,
    /// read as systemd reads `EnvironmentFile=` (see [`parse_env_file`]);
    /// other variables are ignored, an unknown `SHARDCAST_*` one is an
    /// error (as it is for `serve` started with that file).
    pub fn env_file_overrides(path: &str) -> Result<Vec<Override>, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadEnvFile {
            path: path.to_string(),
            source,
        })?;
        Config::variable_overrides(parse_env_file(&text).into_iter(), |name| Origin::EnvFile {
            path: path.to_string(),
            name: name.to_string(),
        })
    }

    fn variable_overrides(
        vars: impl Iterator<Item = (String, String)>,
        origin: impl Fn(&str) -> Origin,
    ) -> Result<Vec<Override>, ConfigError> {
        let keys = Config::keys();
        let mut out = Vec::new();
        for (name, value) in vars {
            if !name.starts_with("SHARDCAST_") {
                continue;
            }
            let key = keys
                .iter()
                .map(String::as_str)
                .chain(retired_keys())
                .find(|k| Config::env_name(k) == name)
                .ok_or_else(|| ConfigError::UnknownKey {
                    key: name.clone(),
                    origin: origin(&name).to_string(),
                    known: keys
                        .iter()
                        .map(|k| Config::env_name(k))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            out.push(Override {
                key: key.to_string(),
                value,
                origin: origin(&name),
            });
        }
        Ok(out)
    }

    /// Maps a flag (`--section-key`) to its key, if it is one.
    /// A renamed key's old flag maps to the old key, which loading then
    /// refuses with [`ConfigError::Renamed`] naming the new one.
    pub fn key_for_flag(flag: &str) -> Option<String> {
        Config::keys()
            .into_iter()
            .chain(retired_keys().map(str::to_string))
            .find(|k| Config::flag_name(k) == flag)
    }
}

impl Config {
    /// Valid settings that leave a server nobody can use (or a part of it
    /// nobody can reach), one sentence each. `check-config` prints them on
    /// stderr and `serve` logs them; neither refuses to run.
    pub fn warnings(&self) -> Vec<String> {
        let a = &self.auth;
        let keys = !a.hs256_secret.is_empty() || !a.ed25519_public_key.trim().is_empty();
        let mut out = Vec::new();
        if !a.anonymous && !keys {
            out.push(
                "auth.anonymous = false and no key is configured (auth.hs256_secret, auth.ed25519_public_key): every Connect will be refused, so no client can use this server".to_string(),
            );
        } else if !keys && (!a.issuer.is_empty() || !a.audience.is_empty()) {
            out.push(
                "auth.issuer or auth.audience is set but no key is configured (auth.hs256_secret, auth.ed25519_public_key): every token will be refused; only anonymous clients on public channels can connect".to_string(),
            );
        }
        out
    }

    /// Every key of this (loaded) configuration with its value and where
    /// it came from: the last override that set it, else the config file
    /// `path` if it sets it, else the default. `overrides` are those given
    /// to [`Config::load`]. Secrets are masked (see [`Setting::value`]).
    pub fn settings(
        &self,
        path: Option<&str>,
        overrides: &[Override],
    ) -> Result<Vec<Setting>, ConfigError> {
        let file: toml::Table = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read {
                    path: path.to_string(),
                    source,
                })?
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.to_string(),
                    message: e.to_string(),
                })?,
            None => toml::Table::new(),
        };
        let values = match toml::Value::try_from(self) {
            Ok(toml::Value::Table(t)) => t,
            other => unreachable!("config did not serialise to a table: {other:?}"),
        };
        let mut out = Vec::new();
        for key in Config::keys() {
            let (section, name) = key.split_once('.').expect("section.key");
            let value = &values[section][name];
            let value = match (key.as_str(), value) {
                ("auth.hs256_secret" | "pusher.app_secret", toml::Value::String(s))
                    if !s.is_empty() =>
                {
                    format!("(secret, {} bytes)", s.len())
                }
                ("redis.url", toml::Value::String(s)) => {
                    toml::Value::String(redact_url(s)).to_string()
                }
                (_, v) => v.to_string(),
            };
            let source = match overrides.iter().rev().find(|o| o.key == key) {
                Some(o) => Source::Override(o.origin.clone()),
                None if file
                    .get(section)
                    .and_then(toml::Value::as_table)
                    .is_some_and(|t| t.contains_key(name)) =>
                {
                    Source::File(path.unwrap_or_default().to_string())
                }
                None => Source::Default,
            };
            out.push(Setting { key, value, source });
        }
        Ok(out)
    }
}

/// A Redis URL with its password (the user-info part when it has no `:`)
/// replaced by `***`, for display.
pub fn redact_url(url: &str) -> String {
    let Some(scheme) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    match url[scheme..].rfind('@').map(|i| scheme + i) {
        Some(at) => {
            let user = match url[scheme..at].split_once(':') {
                Some((user, _)) => format!("{user}:"),
                None => String::new(),
            };
            format!("{}{user}***{}", &url[..scheme], &url[at..])
        }
        None => url.to_string(),
    }
}

/// The assignments of an environment file, read as systemd reads
/// `EnvironmentFile=` (systemd.exec(5)): `KEY=VALUE` lines; empty lines and
/// lines starting with `#` or `;` are ignored, as are lines without `=`;
/// whitespace around the key and the value is dropped; a value may be
/// quoted, `'…'` literally or `"…"` where `\` escapes `"`, `\`, `` ` `` and
/// `$` (and is kept before anything else); outside quotes `\` escapes the
/// next character; a `\` at the end of a line, outside quotes or within
/// `"…"`, continues the value on the next line. A later assignment of a
/// name replaces an earlier one (both are returned, in order).
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    #[derive(Clone, Copy, PartialEq)]
    enum S {
        PreKey,
        Key,
        PreValue,
        Value,
        ValueEscape,
        Single,
        Double,
        DoubleEscape,
        Comment,
        CommentEscape,
    }
    let newline = |c: char| c == '\n' || c == '\r';
    let white = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r');
    let mut out = Vec::new();
    let (mut key, mut value) = (String::new(), String::new());
    // Byte lengths up to the first of the trailing whitespace, if any.
    let (mut key_ws, mut value_ws): (Option<usize>, Option<usize>) = (None, None);
    let mut state = S::PreKey;
    let finish = |out: &mut Vec<(String, String)>,
                  key: &mut String,
                  value: &mut String,
                  key_ws: Option<usize>,
                  value_ws: Option<usize>| {
        if let Some(n) = key_ws {
            key.truncate(n);
        }
        if let Some(n) = value_ws {
            value.truncate(n);
        }
        out.push((std::mem::take(key), std::mem::take(value)));
    };
    for c in text.chars() {
        state = match state {
            S::PreKey if c == '#' || c == ';' => S::Comment,
            S::PreKey if white(c) => S::PreKey,
            S::PreKey => {
                key_ws = None;
                key.push(c);
                S::Key
            }
            S::Key if newline(c) => {
                key.clear();
                S::PreKey
            }
            S::Key if c == '=' => {
                value_ws = None;
                S::PreValue
            }
            S::Key => {
                if !white(c) {
                    key_ws = None;
                } else if key_ws.is_none() {
                    key_ws = Some(key.len());
                }
                key.push(c);
                S::Key
            }
            S::PreValue if newline(c) => {
                finish(&mut out, &mut key, &mut value, key_ws, None);
                S::PreKey
            }
            S::PreValue if c == '\'' => S::Single,
            S::PreValue if c == '"' => S::Double,
            S::PreValue if c == '\\' => S::ValueEscape,
            S::PreValue if white(c) => S::PreValue,
            S::PreValue => {
                value.push(c);
                S::Value
            }
            S::Value if newline(c) => {
                finish(&mut out, &mut key, &mut value, key_ws, value_ws);
                S::PreKey
            }
            S::Value if c == '\\' => {
                value_ws = None;
                S::ValueEscape
            }
            S::Value => {
                if !white(c) {
                    value_ws = None;
                } else if value_ws.is_none() {
                    value_ws = Some(value.len());
                }
                value.push(c);
                S::Value
            }
            S::ValueEscape => {
                if !newline(c) {
                    value.push(c);
                }
                S::Value
            }
            S::Single if c == '\'' => S::PreValue,
            S::Single => {
                value.push(c);
                S::Single
            }
            S::Double if c == '"' => S::PreValue,
            S::Double if c == '\\' => S::DoubleEscape,
            S::Double => {
                value.push(c);
                S::Double
            }
            S::DoubleEscape => {
                if matches!(c, '"' | '\\' | '`' | '$') {
                    value.push(c);
                } else if c != '\n' {
                    value.push('\\');
                    value.push(c);
                }
                S::Double
            }
            S::Comment if c == '\\' => S::CommentEscape,
            S::Comment if newline(c) => S::PreKey,
            S::Comment => S::Comment,
            S::CommentEscape if newline(c) => S::PreKey,
            S::CommentEscape => S::Comment,
        };
    }
    match state {
        S::Value => finish(&mut out, &mut key, &mut value, key_ws, value_ws),
        S::PreValue | S::ValueEscape | S::Single | S::Double | S::DoubleEscape => {
            finish(&mut out, &mut key, &mut value, key_ws, None)
        }
        S::PreKey | S::Key | S::Comment | S::CommentEscape => {}
    }
    out
}

/// One end of an integer key's allowed range.
#[derive(Clone, Copy, Debug)]
enum Bound {
    /// A fixed value.
    At(u32),
    /// Another key's value plus this much.
    Key(&'static str, u32),
}

use Bound::{At, Key};

impl Bound {
    /// The bound's value in a configuration (as a [`Config::table`]).
    fn resolve(self, values: &toml::Table) -> u32 {
        match self {
            At(n) => n,
            Key(key, plus) => value_of(values, key).saturating_add(plus),
        }
    }
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At(n) => write!(f, "{n}"),
            Key(key, 0) => write!(f, "{key}"),
            Key(key, plus) => write!(f, "({key}+{plus})"),
        }
    }
}

/// The allowed range, inclusive, of every integer key: what
/// [`Config::validate`] checks and `shardcast keys` shows. A test holds it
/// to the keys.
const RANGES: &[(&str, Bound, Bound)] = &[
    ("server.shards", At(0), At(1024)),
    ("server.backlog", At(1), At(65_535)),
    ("server.drain_window_ms", At(0), At(600_000)),
    ("websocket.max_frame_bytes", At(125), At(64 << 20)),
    ("websocket.max_message_bytes", At(125), At(64 << 20)),
    ("websocket.max_fragments", At(1), At(65_536)),
    (
        "websocket.handshake_max_header_bytes",
        At(512),
        At(64 << 10),
    ),
    ("websocket.handshake_max_headers", At(8), At(256)),
    ("websocket.close_timeout_ms", At(10), At(120_000)),
    ("fanout.outbound_budget_bytes", At(4096), At(1 << 30)),
    ("fanout.outbound_max_age_ms", At(100), At(600_000)),
    ("fanout.max_batch", At(1), At(4096)),
    ("fanout.tick_pause_ms", At(0), At(100)),
    (
        "fanout.max_publish_bytes",
        At(1),
        Key("websocket.max_message_bytes", 0),
    ),
    (
        "fanout.max_subscriptions_per_connection",
        At(1),
        At(1_000_000),
    ),
    ("limits.max_connections_per_shard", At(1), At(10_000_000)),
    ("limits.max_connections_per_ip", At(0), At(10_000_000)),
    ("limits.accept_rate_per_ip", At(0), At(1_000_000)),
    ("limits.accept_burst_per_ip", At(1), At(1_000_000)),
    ("limits.handshake_timeout_ms", At(100), At(120_000)),
    ("limits.messages_per_second", At(1), At(1_000_000)),
    ("limits.message_burst", At(1), At(1_000_000)),
    ("limits.rate_limit_strikes", At(1), At(1_000_000)),
    ("limits.ping_interval_ms", At(100), At(3_600_000)),
    (
        "limits.idle_timeout_ms",
        Key("limits.ping_interval_ms", 1),
        At(7_200_000),
    ),
    ("history.size", At(0), At(1_000_000)),
    ("history.ttl_secs", At(1), At(30 * 86_400)),
    ("history.max_mib", At(1), At(1 << 20)),
    ("history.idempotency_ttl_secs", At(1), At(30 * 86_400)),
    ("redis.command_timeout_ms", At(10), At(60_000)),
    ("redis.ingest_claim_idle_secs", At(1), At(86_400)),
    ("redis.presence_ttl_ms", At(300), At(600_000)),
    ("redis.wait_replicas", At(0), At(64)),
    ("compression.level", At(1), At(19)),
    ("compression.min_bytes", At(16), At(64 << 20)),
    ("auth.leeway_secs", At(0), At(300)),
    ("auth.deadline_ms", At(100), At(600_000)),
    ("pusher.client_event_rate", At(1), At(10_000)),
    ("pusher.activity_timeout_secs", At(1), At(3600)),
    ("pusher.max_event_bytes", At(1), At(1 << 20)),
    ("pusher.max_channels_per_trigger", At(1), At(1000)),
    ("pusher.max_batch_events", At(1), At(1000)),
    ("pusher.presence_max_members", At(1), At(100_000)),
    ("pusher.presence_max_user_info_bytes", At(2), At(65_536)),
];

/// Whether `v` is 1 or more of A-Z a-z 0-9 - _ . ~: Pusher app keys and ids
/// appear in URL paths.
fn url_safe(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
}

/// The allowed values of `log.level`.
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// The allowed values of `log.format`.
const LOG_FORMATS: [&str; 2] = ["text", "json"];

/// What each string key accepts, as `shardcast keys` shows it (the checks
/// are in [`Config::validate`]; `log.level` and `log.format` show
/// [`LOG_LEVELS`] and [`LOG_FORMATS`]). A test holds it to the keys.
const STRING_FORMS: &[(&str, &str)] = &[
    ("server.listen", "IP:PORT"),
    (
        "limits.allowed_origins",
        "comma-separated origins; empty = any",
    ),
    ("redis.url", "redis://… or empty"),
    ("redis.node_id", "any; empty = hostname-pid"),
    ("compression.dictionary", "file path or empty"),
    ("auth.hs256_secret", "≥ 32 bytes or empty"),
    ("auth.ed25519_public_key", "PEM, base64 or empty"),
    ("auth.issuer", "any; empty = not checked"),
    ("auth.audience", "any; empty = not checked"),
    ("admin.listen", "IP:PORT or empty"),
    ("pusher.app_id", "A-Z a-z 0-9 - _ . ~"),
    ("pusher.app_key", "A-Z a-z 0-9 - _ . ~; empty = off"),
    ("pusher.app_secret", "any; required with app_key"),
];

/// The one rule for boolean values, whatever their source (config file,
/// environment variable, environment file, flag): `true`, `yes`, `on`,
/// `1` are true and `false`, `no`, `off`, `0` false, in any case, with
/// surrounding blanks ignored. In the TOML file a bare `true` / `false`
/// is a TOML boolean; the other words are written as strings
/// (`pin_threads = "yes"`) or, for 1/0, integers.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// An integer key's value in a [`Config::table`] (0 if absent, which the
/// tests rule out for every key of [`RANGES`]).
fn value_of(values: &toml::Table, key: &str) -> u32 {
    let (section, name) = key.split_once('.').expect("section.key");
    values
        .get(section)
        .and_then(|s| s.get(name))
        .and_then(toml::Value::as_integer)
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0)
}

/// Turns a config file's values for boolean keys into TOML booleans by
/// [`parse_bool`] (strings and integers; other types are left for serde to
/// refuse), so the file accepts what flags and variables accept.
fn file_booleans(file: &mut toml::Table, path: &str) -> Result<(), ConfigError> {
    let defaults = default_table();
    for (section, keys) in file.iter_mut() {
        let (Some(toml::Value::Table(defaults)), toml::Value::Table(keys)) =
            (defaults.get(section), keys)
        else {
            continue;
        };
        for (key, value) in keys.iter_mut() {
            if !matches!(defaults.get(key), Some(toml::Value::Boolean(_))) {
                continue;
            }
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                _ => continue,
            };
            *value = toml::Value::Boolean(parse_bool(&text).ok_or_else(|| {
                ConfigError::BadOverride {
                    key: format!("{section}.{key}"),
                    origin: format!("config file {path}"),
                    value: text,
                    expected: BOOL_EXPECTED,
                }
            })?);
        }
    }
    Ok(())
}

/// What a boolean must be, in [`ConfigError::BadOverride`].
const BOOL_EXPECTED: &str = "a boolean (true/false, yes/no, on/off or 1/0, in any case)";

fn check(key: &'static str, value: u32, range: RangeInclusive<u32>) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            value: value.to_string(),
            reason: format!(
                "must be between {} and {} inclusive",
                range.start(),
                range.end()
            ),
        })
    }
}

fn default_table() -> toml::Table {
    match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        // The defaults are plain structs of strings, integers and booleans:
        // serialising them cannot fail.
        other => unreachable!("default config did not serialise to a table: {other:?}"),
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (section, value) in over {
        match (base.get_mut(&section), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => {
                for (k, v) in o {
                    b.insert(k, v);
                }
            }
            (_, v) => {
                base.insert(section, v);
            }
        }
    }
}

/// Keys that were renamed: (old, new). Setting an old one is an error that
/// names the new one, rather than "unknown key" or a silent default.
const RENAMED: &[(&str, &str)] = &[("redis.idempotency_ttl_secs", "history.idempotency_ttl_secs")];

/// Keys that were removed: (key, why and what to do instead). Setting one
/// is an error that says so, rather than "unknown key".
const REMOVED: &[(&str, &str)] = &[(
    "compression.dictionary_id",
    "a dictionary's id is now derived from its content (`shardcast check-config` prints it): delete this setting",
)];

/// Every key that was renamed or removed: accepted as a name by flags and
/// variables, then refused with the reason when loading.
fn retired_keys<'a>() -> impl Iterator<Item = &'a str> {
    RENAMED
        .iter()
        .map(|(old, _)| -> &'a str { old })
        .chain(REMOVED.iter().map(|(key, _)| -> &'a str { key }))
}

/// Refuses a renamed or removed key in a config file's table.
fn reject_renamed(file: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    for (key, reason) in REMOVED {
        let (section, name) = key.split_once('.').expect("section.key");
        if file
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key(name))
        {
            return Err(ConfigError::Removed {
                key,
                reason,
                origin: origin.to_string(),
            });
        }
    }
    for (old, new) in RENAMED {
        let (section, key) = old.split_once('.').expect("section.key");
        if file
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key(key))
        {
            return Err(ConfigError::Renamed {
                old,
                new,
                origin: origin.to_string(),
            });
        }
    }
    Ok(())
}

fn apply_override(table: &mut toml::Table, o: &Override) -> Result<(), ConfigError> {
    if let Some((key, reason)) = REMOVED.iter().find(|(key, _)| *key == o.key) {
        return Err(ConfigError::Removed {
            key,
            reason,
            origin: o.origin.to_string(),
        });
    }
    if let Some((old, new)) = RENAMED.iter().find(|(old, _)| *old == o.key) {
        return Err(ConfigError::Renamed {
            old,
            new,
            origin: o.origin.to_string(),
        });
    }
    let unknown = || ConfigError::UnknownKey {
        key: o.key.clone(),
        origin: o.origin.to_string(),
        known: Config::keys().join(", "),
    };
    let (section, key) = o.key.split_once('.').ok_or_else(unknown)?;
    let slot = table
        .get_mut(section)
        .and_then(|s| s.as_table_mut())
        .and_then(|s| s.get_mut(key))
        .ok_or_else(unknown)?;
    let bad = |expected| ConfigError::BadOverride {
        key: o.key.clone(),
        origin: o.origin.to_string(),
        value: o.value.clone(),
        expected,
    };
    *slot = match slot {
        toml::Value::Integer(_) => {
            toml::Value::Integer(o.value.trim().parse().map_err(|_| bad("an integer"))?)
        }
        toml::Value::Boolean(_) => {
            toml::Value::Boolean(parse_bool(&o.value).ok_or_else(|| bad(BOOL_EXPECTED))?)
        }
        toml::Value::Float(_) => {
            toml::Value::Float(o.value.trim().parse().map_err(|_| bad("a number"))?)
        }
        _ => toml::Value::String(o.value.clone()),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(key: &str, value: &str) -> Override {
        Override {
            key: key.into(),
            value: value.into(),
            origin: Origin::Flag(Config::flag_name(key)),
        }
    }

    /// Loads `text` as a config file.
    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let path = std::env::temp_dir().join(format!(
            "shardcast-apps-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, text).unwrap();
        let loaded = Config::load(path.to_str(), &[]);
        std::fs::remove_file(&path).unwrap();
        loaded
    }

    #[test]
    fn pusher_apps_are_read_and_checked() {
        let base = "[pusher]\napp_id = \"1\"\napp_key = \"k1\"\napp_secret = \"s1\"\n";
        let c = load_text(&format!(
            "{base}[[pusher.apps]]\nid = \"2\"\nkey = \"k2\"\nsecret = \"s2\"\nclient_events = true\n\
             [[pusher.apps]]\nid = \"3\"\nkey = \"k3\"\nsecret = \"s3\"\nmax_batch_events = 5\n"
        ))
        .unwrap();
        assert_eq!(c.pusher.apps.len(), 2);
        assert!(c.pusher.apps[0].client_events);
        assert_eq!(c.pusher.apps[0].max_event_bytes, 10_240);
        assert_eq!(c.pusher.apps[1].max_batch_events, 5);
        // Without a default app too.
        assert!(load_text("[[pusher.apps]]\nid = \"2\"\nkey = \"k2\"\nsecret = \"s\"\n").is_ok());
        // The flat key list does not grow.
        assert!(!Config::keys().iter().any(|k| k.contains("apps")));
        let bad = |app: &str, field: &str, n: usize| {
            let text = format!("{base}[[pusher.apps]]\nid = \"2\"\nkey = \"k2\"\nsecret = \"s2\"\n[[pusher.apps]]\n{app}");
            let msg = load_text(&text).unwrap_err().to_string();
            assert!(msg.contains("pusher.apps"), "{msg}");
            assert!(msg.contains(&format!("table {n} ")), "{msg}");
            assert!(msg.contains(&format!("`{field}`")), "{msg}");
        };
        bad("id = \"3\"\nkey = \"k3\"\n", "secret", 2);
        bad("key = \"k3\"\nsecret = \"s\"\n", "id", 2);
        bad("id = \"3\"\nsecret = \"s\"\n", "key", 2);
        bad("id = \"3\"\nkey = \"k2\"\nsecret = \"s\"\n", "key", 2);
        bad("id = \"3\"\nkey = \"k1\"\nsecret = \"s\"\n", "key", 2);
        bad("id = \"1\"\nkey = \"k3\"\nsecret = \"s\"\n", "id", 2);
        bad("id = \"2\"\nkey = \"k3\"\nsecret = \"s\"\n", "id", 2);
        bad("id = \"a/b\"\nkey = \"k3\"\nsecret = \"s\"\n", "id", 2);
        bad("id = \"3\"\nkey = \"k 3\"\nsecret = \"s\"\n", "key", 2);
        bad(
            &format!(
                "id = \"{}\"\nkey = \"k3\"\nsecret = \"s\"\n",
                "x".repeat(33)
            ),
            "id",
            2,
        );
        bad(
            "id = \"3\"\nkey = \"k3\"\nsecret = \"s\"\nmax_batch_events = 0\n",
            "max_batch_events",
            2,
        );
        bad(
            "id = \"3\"\nkey = \"k3\"\nsecret = \"s\"\npresence_max_user_info_bytes = 1\n",
            "presence_max_user_info_bytes",
            2,
        );
        assert!(load_text(&format!(
            "{base}[[pusher.apps]]\nid = \"{}\"\nkey = \"k3\"\nsecret = \"s\"\n",
            "x".repeat(32)
        ))
        .is_ok());
        // An unknown field is refused with serde's message.
        let msg =
            load_text("[[pusher.apps]]\nid = \"2\"\nkey = \"k\"\nsecret = \"s\"\ncolour = 1\n")
                .unwrap_err()
                .to_string();
        assert!(msg.contains("colour"), "{msg}");
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert!(c.shard_count() >= 1);
    }

    #[test]
    fn override_types_follow_the_default() {
        let c = Config::load(
            None,
            &[
                flag("server.shards", "3"),
                flag("server.pin_threads", "false"),
                flag("server.listen", "0.0.0.0:9000"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.shards, 3);
        assert!(!c.server.pin_threads);
        assert_eq!(c.listen_addr().unwrap().port(), 9000);
    }

    #[test]
    fn out_of_range_names_key_and_range() {
        let err = Config::load(None, &[flag("fanout.max_batch", "0")]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("fanout.max_batch"), "{msg}");
        assert!(msg.contains("between 1 and 4096"), "{msg}");
    }

    #[test]
    fn bad_type_names_flag() {
        let err = Config::load(None, &[flag("server.shards", "many")]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--server-shards"), "{msg}");
        assert!(msg.contains("integer"), "{msg}");
    }

    #[test]
    fn unknown_env_var_is_rejected() {
        let err = Config::env_overrides(
            vec![("SHARDCAST_SERVER_LISTN".to_string(), "x".to_string())].into_iter(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("SHARDCAST_SERVER_LISTN"));
    }

    #[test]
    fn env_and_flag_names_round_trip() {
        for key in Config::keys() {
            assert_eq!(
                Config::key_for_flag(&Config::flag_name(&key)),
                Some(key.clone())
            );
            let o =
                Config::env_overrides(vec![(Config::env_name(&key), "1".to_string())].into_iter())
                    .unwrap();
            assert_eq!(o[0].key, key);
        }
    }

    #[test]
    fn file_then_override_precedence_and_unknown_file_key() {
        let dir = std::env::temp_dir().join(format!("shardcast-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[server]\nshards = 2\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let c = Config::load(good.to_str(), &[flag("server.shards", "4")]).unwrap();
        assert_eq!(c.server.shards, 4);
        assert_eq!(c.server.listen, "127.0.0.1:1");

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[server]\nshardz = 2\n").unwrap();
        let msg = Config::load(bad.to_str(), &[]).unwrap_err().to_string();
        assert!(msg.contains("shardz"), "{msg}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn short_hs256_secret_is_refused_without_echoing_it() {
        let short = "31-byte-secret-xxxxxxxxxxxxxxxx";
        assert_eq!(short.len(), 31);
        let msg = Config::load(None, &[flag("auth.hs256_secret", short)])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("auth.hs256_secret"), "{msg}");
        assert!(msg.contains("at least 32 bytes"), "{msg}");
        assert!(msg.contains("31"), "{msg}");
        assert!(!msg.contains(short), "the secret leaked: {msg}");
        // Multi-byte characters count as their UTF-8 bytes, which are the key.
        let eleven_chars = "ééééééééééé";
        assert!(Config::load(None, &[flag("auth.hs256_secret", eleven_chars)]).is_err());
        let c = Config::load(None, &[flag("auth.hs256_secret", &format!("{short}y"))]).unwrap();
        assert_eq!(c.auth.hs256_secret.len(), 32);
        assert!(
            Config::load(None, &[flag("auth.hs256_secret", "")]).is_ok(),
            "empty turns HS256 off"
        );
    }

    #[test]
    fn bad_listen_address_is_named() {
        let msg = Config::load(None, &[flag("server.listen", "localhost")])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("server.listen"), "{msg}");
    }

    #[test]
    fn a_renamed_key_is_refused_naming_its_new_name() {
        let path =
            std::env::temp_dir().join(format!("shardcast-renamed-{}.toml", std::process::id()));
        std::fs::write(&path, "[redis]\nidempotency_ttl_secs = 60\n").unwrap();
        let err = Config::load(path.to_str(), &[]).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("`history.idempotency_ttl_secs`"), "{err}");
        let env = Config::env_overrides(
            [(
                "SHARDCAST_REDIS_IDEMPOTENCY_TTL_SECS".to_string(),
                "60".to_string(),
            )]
            .into_iter(),
        )
        .unwrap();
        let err = Config::load(None, &env).unwrap_err().to_string();
        assert!(
            err.contains("renamed `history.idempotency_ttl_secs`"),
            "{err}"
        );
        let flag = Config::key_for_flag("--redis-idempotency-ttl-secs").expect("known");
        let over = Override {
            key: flag,
            value: "60".into(),
            origin: Origin::Flag("--redis-idempotency-ttl-secs".into()),
        };
        let err = Config::load(None, &[over]).unwrap_err().to_string();
        assert!(err.contains("flag --redis-idempotency-ttl-secs"), "{err}");
    }

    #[test]
    fn the_removed_dictionary_id_is_refused_saying_why() {
        let path =
            std::env::temp_dir().join(format!("shardcast-removed-{}.toml", std::process::id()));
        std::fs::write(&path, "[compression]\ndictionary_id = 1\n").unwrap();
        let err = Config::load(path.to_str(), &[]).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            err.contains("compression.dictionary_id") && err.contains("derived from its content"),
            "{err}"
        );
        let env = Config::env_overrides(
            [(
                "SHARDCAST_COMPRESSION_DICTIONARY_ID".to_string(),
                "1".to_string(),
            )]
            .into_iter(),
        )
        .unwrap();
        let err = Config::load(None, &env).unwrap_err().to_string();
        assert!(err.contains("was removed"), "{err}");
        let key = Config::key_for_flag("--compression-dictionary-id").expect("known");
        let err = Config::load(None, &[flag(&key, "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("flag --compression-dictionary-id"), "{err}");
        assert!(!Config::keys().contains(&key));
    }

    #[test]
    fn environment_files_are_read_as_systemd_reads_them() {
        // Trailing blanks are dropped (written with escapes: no trailing
        // whitespace in the source).
        let text = "SHARDCAST_A=plain value \t \n".to_string()
            + r#"# a comment
; another comment
  SHARDCAST_B = spaced
SHARDCAST_C="double \"quoted\" \$HOME \n kept"
SHARDCAST_D='single \ "literal"'
SHARDCAST_E=con\
tinued
SHARDCAST_F="a"b 'c'
SHARDCAST_G=
no equals sign here
SHARDCAST_H=esc\ aped\\
# comment \
SHARDCAST_I=after a continued comment
SHARDCAST_A=later wins"#;
        let vars = parse_env_file(&text);
        let get = |k: &str| {
            vars.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("SHARDCAST_A"), Some("later wins"));
        assert_eq!(vars[0], ("SHARDCAST_A".into(), "plain value".into()));
        assert_eq!(get("SHARDCAST_B"), Some("spaced"));
        assert_eq!(get("SHARDCAST_C"), Some("double \"quoted\" $HOME \\n kept"));
        assert_eq!(get("SHARDCAST_D"), Some("single \\ \"literal\""));
        assert_eq!(get("SHARDCAST_E"), Some("continued"));
        assert_eq!(
            get("SHARDCAST_F"),
            Some("ab 'c'"),
            "quotes only open a value"
        );
        assert_eq!(get("SHARDCAST_G"), Some(""));
        assert_eq!(get("SHARDCAST_H"), Some("esc aped\\"));
        assert_eq!(get("SHARDCAST_I"), Some("after a continued comment"));
        assert!(
            vars.iter().all(|(n, _)| n.starts_with("SHARDCAST_")),
            "{vars:?}"
        );
    }

    #[test]
    fn env_file_overrides_name_the_file_and_refuse_unknown_variables() {
        let dir = std::env::temp_dir().join(format!("shardcast-envfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.env");
        std::fs::write(&good, "PATH=/ignored\nSHARDCAST_SERVER_SHARDS=\"3\"\n").unwrap();
        let o = Config::env_file_overrides(good.to_str().unwrap()).unwrap();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].key, "server.shards");
        let origin = o[0].origin.to_string();
        assert!(
            origin.contains("SHARDCAST_SERVER_SHARDS") && origin.contains("good.env"),
            "{origin}"
        );
        assert_eq!(Config::load(None, &o).unwrap().server.shards, 3);
        let bad = dir.join("bad.env");
        std::fs::write(&bad, "SHARDCAST_SERVER_SHARDZ=3\n").unwrap();
        let err = Config::env_file_overrides(bad.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SHARDCAST_SERVER_SHARDZ") && err.contains("bad.env"),
            "{err}"
        );
        let err = Config::env_file_overrides(dir.join("missing.env").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read environment file"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn settings_show_every_key_its_source_and_no_secret() {
        let path =
            std::env::temp_dir().join(format!("shardcast-settings-{}.toml", std::process::id()));
        std::fs::write(&path, "[server]\nshards = 2\nbacklog = 100\n").unwrap();
        let secret = "a-secret-of-at-least-32-bytes-xxxx";
        let overrides = [
            Override {
                key: "server.backlog".into(),
                value: "200".into(),
                origin: Origin::Env("SHARDCAST_SERVER_BACKLOG".into()),
            },
            flag("auth.hs256_secret", secret),
            flag("redis.url", "redis://app:hunter2@redis.local:6379/1"),
        ];
        let c = Config::load(path.to_str(), &overrides).unwrap();
        let settings = c.settings(path.to_str(), &overrides).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(settings.len(), Config::keys().len());
        let get = |k: &str| settings.iter().find(|s| s.key == k).unwrap();
        assert_eq!(get("server.shards").value, "2");
        assert!(matches!(get("server.shards").source, Source::File(_)));
        assert_eq!(get("server.backlog").value, "200");
        assert_eq!(
            get("server.backlog").source.to_string(),
            "environment variable SHARDCAST_SERVER_BACKLOG"
        );
        assert_eq!(get("server.listen").value, "\"127.0.0.1:8080\"");
        assert_eq!(get("server.listen").source.to_string(), "default");
        assert_eq!(get("auth.hs256_secret").value, "(secret, 34 bytes)");
        assert_eq!(
            get("auth.hs256_secret").source.to_string(),
            "flag --auth-hs256-secret"
        );
        assert_eq!(
            get("redis.url").value,
            "\"redis://app:***@redis.local:6379/1\""
        );
        for s in &settings {
            assert!(
                !s.value.contains(secret) && !s.value.contains("hunter2"),
                "{s:?}"
            );
        }
    }

    #[test]
    fn every_key_says_what_it_accepts() {
        let defaults = default_table();
        for &(key, min, max) in RANGES {
            let (section, name) = key.split_once('.').unwrap();
            assert!(
                matches!(defaults[section].get(name), Some(toml::Value::Integer(_))),
                "RANGES names {key}, which is not an integer key"
            );
            let d = Config::default().table();
            let v = value_of(&d, key);
            assert!(
                (min.resolve(&d)..=max.resolve(&d)).contains(&v),
                "the default of {key} is out of its range"
            );
        }
        for (key, _) in STRING_FORMS {
            let (section, name) = key.split_once('.').unwrap();
            assert!(
                matches!(defaults[section].get(name), Some(toml::Value::String(_))),
                "STRING_FORMS names {key}, which is not a string key"
            );
        }
        let info = Config::key_info();
        assert_eq!(info.len(), Config::keys().len());
        for k in &info {
            assert_ne!(k.accepts, "any", "{} has no range or form", k.key);
        }
        let get = |key: &str| info.iter().find(|k| k.key == key).unwrap();
        let batch = get("fanout.max_batch");
        assert_eq!(
            (batch.default.as_str(), batch.accepts.as_str()),
            ("64", "1–4096")
        );
        assert_eq!(batch.flag, "--fanout-max-batch");
        assert_eq!(batch.env, "SHARDCAST_FANOUT_MAX_BATCH");
        assert_eq!(get("server.listen").default, "\"127.0.0.1:8080\"");
        assert_eq!(
            get("fanout.max_publish_bytes").accepts,
            "1–websocket.max_message_bytes"
        );
        assert_eq!(
            get("limits.idle_timeout_ms").accepts,
            "(limits.ping_interval_ms+1)–7200000"
        );
        assert_eq!(get("auth.require_exp").accepts, "bool");
        assert_eq!(get("log.level").accepts, "error|warn|info|debug|trace");
    }

    #[test]
    fn ranges_that_follow_another_key_are_checked_against_its_value() {
        let msg = Config::load(
            None,
            &[
                flag("websocket.max_message_bytes", "1000"),
                flag("fanout.max_publish_bytes", "1001"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("fanout.max_publish_bytes") && msg.contains("between 1 and 1000"),
            "{msg}"
        );
        let msg = Config::load(
            None,
            &[
                flag("limits.ping_interval_ms", "5000"),
                flag("limits.idle_timeout_ms", "5000"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("between 5001 and 7200000"), "{msg}");
        let msg = Config::load(None, &[flag("pusher.max_batch_events", "0")])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("pusher.max_batch_events"), "{msg}");
    }

    #[test]
    fn booleans_are_one_rule() {
        for (text, want) in [
            ("true", true),
            ("TRUE", true),
            (" Yes ", true),
            ("on", true),
            ("1", true),
            ("False", false),
            ("NO", false),
            ("off", false),
            ("0", false),
        ] {
            assert_eq!(parse_bool(text), Some(want), "{text:?}");
        }
        for text in ["", "2", "y", "enabled", "truee"] {
            assert_eq!(parse_bool(text), None, "{text:?}");
        }
    }

    #[test]
    fn booleans_from_flags() {
        let c = Config::load(None, &[flag("server.pin_threads", "FALSE")]).unwrap();
        assert!(!c.server.pin_threads);
        let c = Config::load(None, &[flag("auth.require_exp", "Yes")]).unwrap();
        assert!(c.auth.require_exp);
        let msg = Config::load(None, &[flag("server.pin_threads", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("--server-pin-threads") && msg.contains("yes/no, on/off or 1/0"),
            "{msg}"
        );
    }

    #[test]
    fn booleans_from_the_environment() {
        let vars = |v: &str| {
            Config::env_overrides(
                [("SHARDCAST_SERVER_PIN_THREADS".to_string(), v.to_string())].into_iter(),
            )
            .unwrap()
        };
        assert!(!Config::load(None, &vars("OFF")).unwrap().server.pin_threads);
        assert!(
            Config::load(None, &vars("TRUE"))
                .unwrap()
                .server
                .pin_threads
        );
        let msg = Config::load(None, &vars("nope")).unwrap_err().to_string();
        assert!(
            msg.contains("SHARDCAST_SERVER_PIN_THREADS") && msg.contains("a boolean"),
            "{msg}"
        );
    }

    #[test]
    fn booleans_from_the_file() {
        let path =
            std::env::temp_dir().join(format!("shardcast-bools-{}.toml", std::process::id()));
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load(path.to_str(), &[])
        };
        let c = load("[server]\npin_threads = false\n[redis]\ningest = \"OFF\"\n[auth]\nrequire_exp = 1\nanonymous = \"No\"\n").unwrap();
        assert!(!c.server.pin_threads && !c.redis.ingest && c.auth.require_exp);
        assert!(!c.auth.anonymous);
        let msg = load("[server]\npin_threads = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("server.pin_threads")
                && msg.contains("config file")
                && msg.contains("a boolean"),
            "{msg}"
        );
        let msg = load("[server]\npin_threads = 2\n").unwrap_err().to_string();
        assert!(msg.contains("server.pin_threads"), "{msg}");
        // Strings stay strings for string keys.
        let c = load("[log]\nlevel = \"debug\"\n").unwrap();
        assert_eq!(c.log.level, "debug");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn redis_urls_lose_their_password() {
        assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://:p@h:1"), "redis://:***@h:1");
        assert_eq!(redact_url("redis://p@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(redact_url(""), "");
    }
}

/// README's configuration table against the keys and defaults the server
/// really has: a key added, renamed or re-defaulted without its row (or
/// the other way round) fails here.
#[cfg(test)]
mod readme_table {
    use super::{default_table, Config};

    /// (key, default) of every row of README's key table.
    fn rows() -> Vec<(String, String)> {
        include_str!("../README.md")
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let key = cells[1].trim_matches('`').to_string();
                // The default is the first `code` span of its cell.
                let default = cells[2]
                    .split('`')
                    .nth(1)
                    .unwrap_or_else(|| panic!("README row {key}: no `default`"))
                    .to_string();
                (key, default)
            })
            .collect()
    }

    /// A default as README writes it: strings bare, the empty one as `""`.
    fn shown(v: &toml::Value) -> String {
        match v {
            toml::Value::String(s) if s.is_empty() => "\"\"".into(),
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    #[test]
    fn every_key_has_its_row_with_the_real_default() {
        let table = default_table();
        let mut real: Vec<(String, String)> = Vec::new();
        for (section, keys) in &table {
            for (key, value) in keys.as_table().expect("sections are tables") {
                real.push((format!("{section}.{key}"), shown(value)));
            }
        }
        real.sort();
        let mut documented = rows();
        documented.sort();
        assert_eq!(documented, real, "README's key table vs the config");
        assert_eq!(Config::keys().len(), real.len());
    }
}

/// The example config (`shardcast.example.toml`, what the systemd unit's
/// `/etc/shardcast/shardcast.toml` starts from) against the keys: every
/// key appears, set or as a `#key = default` line with the real default.
/// CI also runs `shardcast check-config` on it.
#[cfg(test)]
mod example_file {
    use super::{default_table, Config};

    const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/shardcast.example.toml");

    #[test]
    fn it_names_every_key_and_its_commented_values_are_the_defaults() {
        let text = std::fs::read_to_string(PATH).unwrap();
        // The file with its `#key = value` lines uncommented.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let all: toml::Table = uncommented.parse().expect("uncommented example is TOML");
        let set: toml::Table = text.parse().expect("example is TOML");
        let defaults = default_table();
        let mut seen = 0;
        for (section, keys) in &all {
            for (key, value) in keys.as_table().expect("sections are tables") {
                let name = format!("{section}.{key}");
                let default = defaults
                    .get(section)
                    .and_then(|s| s.get(key))
                    .unwrap_or_else(|| panic!("{name} is not a key"));
                let is_set = set.get(section).and_then(|s| s.get(key)).is_some();
                if !is_set {
                    assert_eq!(value, default, "#{key} in [{section}] is not the default");
                }
                seen += 1;
            }
        }
        assert_eq!(seen, Config::keys().len(), "a key is missing");
        assert!(
            Config::load(Some(PATH), &[]).is_ok(),
            "the example as shipped"
        );
        let all_path =
            std::env::temp_dir().join(format!("shardcast-example-{}.toml", std::process::id()));
        std::fs::write(&all_path, &uncommented).unwrap();
        let loaded = Config::load(all_path.to_str(), &[]);
        std::fs::remove_file(&all_path).unwrap();
        assert!(loaded.is_ok(), "every line uncommented: {loaded:?}");
    }
}
