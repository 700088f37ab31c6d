//! Shards: one monoio runtime per core, each on its own pinned thread with
//! its own `SO_REUSEPORT` listener. A shard owns its connections end to end
//! (accept, handshake, reads, writes, subscriptions); shards talk only
//! through the [`Bus`].
//!
//! Inside a shard there are three kinds of task: the accept loop, one reader
//! per connection (plus a writer while its socket is full), and the
//! dispatcher, which runs a *tick* whenever the bus or a reader left work:
//! apply bus events, send the tick's bus requests in one batch per
//! destination, and flush every connection with output in one write each.

mod admission;
mod conn;
mod listener;
mod outbound;
mod rate;
mod requeue;
mod slab;
mod state;
mod sys;
mod timers;
mod transmit;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use monoio::net::TcpListener;
use thiserror::Error;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::bus::Bus;
use crate::config::{Config, LimitsConfig};
use crate::metrics::Registry;
use crate::protocol::compression::Dictionary;
use crate::protocol::wire::DecodeLimits;
use crate::protocol::ws::{FrameLimits, HandshakeLimits};
use slab::ConnId;
use state::{State, Time};

pub use conn::{NATIVE_PATH, NATIVE_SUBPROTOCOL};

/// Bytes read from a socket per `recv`. One buffer per shard, shared by all
/// its connections.
const SCRATCH_BYTES: usize = 64 * 1024;

/// How often time budgets (slow consumers, close lingering) are enforced.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Why [`start`] failed; no shard is left serving.
#[derive(Debug, Error)]
pub enum StartError {
    /// Binding a shard's listener (or reading its local address) failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured `server.listen` address.
        addr: SocketAddr,
        /// The OS error (e.g. address in use, permission denied).
        source: std::io::Error,
    },
    /// Another process (another shardcast, say) already listens on
    /// `server.listen`. With `SO_REUSEPORT` the kernel would split new
    /// connections between the two processes, whose buses do not know each
    /// other, so publishes would be lost between them: refuse instead.
    #[error(
        "cannot listen on {addr}: another process already listens there (a second shardcast \
         would split connections with it and lose publishes between the two), so stop that \
         process or set server.listen to a free address"
    )]
    AddressInUse {
        /// The configured `server.listen` address.
        addr: SocketAddr,
    },
    /// A shard could not start: invalid listen address, thread spawn,
    /// runtime or listener registration failed, or its thread exited.
    #[error("shard {shard} failed to start: {message}")]
    Shard {
        /// The shard's index (0 when not specific to one).
        shard: usize,
        /// What failed.
        message: String,
    },
    /// The `[auth]` keys are unusable (see [`crate::auth::KeyError`]).
    #[error("{0}")]
    Auth(#[from] crate::auth::KeyError),
}

/// Per-shard settings derived from the configuration.
pub struct Settings {
    /// Inbound frame caps (`websocket.max_frame_bytes`,
    /// `max_message_bytes`, `max_fragments`); over one: close 1009.
    pub frame_limits: FrameLimits,
    /// Cap on the upgrade request head, in bytes
    /// (`websocket.handshake_max_header_bytes`); over it: HTTP 431.
    pub handshake_max_header_bytes: usize,
    /// Cap on the upgrade request's header lines
    /// (`websocket.handshake_max_headers`); over it: HTTP 431.
    pub handshake_max_headers: usize,
    /// Native frame decoding limits: `max_bytes` =
    /// `websocket.max_message_bytes`, `max_messages` the default 256.
    pub decode_limits: DecodeLimits,
    /// Most publications of one channel per outgoing frame
    /// (`fanout.max_batch`).
    pub max_batch: usize,
    /// Pause after a tick that batched publications (zero: never).
    pub tick_pause: Duration,
    /// Bytes that may wait in one connection's outbound queue
    /// (`fanout.outbound_budget_bytes`); over it: native close 4001.
    pub outbound_budget: usize,
    /// How long the oldest queued byte may wait
    /// (`fanout.outbound_max_age_ms`); over it: native close 4001.
    pub outbound_max_age: Duration,
    /// Largest publish payload, in bytes (`fanout.max_publish_bytes`); over
    /// it: `Error PayloadTooLarge`.
    pub max_publish_bytes: usize,
    /// Most channels per connection
    /// (`fanout.max_subscriptions_per_connection`); over it:
    /// `Error TooManySubscriptions`.
    pub max_subscriptions: usize,
    /// How long a connection the server closed may take to flush and answer
    /// before its socket is shut (`websocket.close_timeout_ms`).
    pub close_timeout: Duration,
    /// The `[limits]` section as configured.
    pub limits: LimitsConfig,
    /// Browser origins allowed to connect; empty allows any.
    pub allowed_origins: Vec<String>,
    /// The connect policy and token verifier (`[auth]`).
    pub auth: Auth,
    /// Time allowed for Connect after the upgrade, in ms
    /// (`auth.deadline_ms`); over it: native close 4005.
    pub auth_deadline_ms: u32,
    /// Clock skew tolerated on token `exp`, in seconds (`auth.leeway_secs`).
    pub leeway_secs: u32,
    /// Shared by all shards: one address's connections land on any shard.
    pub admission: Arc<admission::Admission>,
    /// zstd level for broadcasts (`compression.level`, 1–19).
    pub compression_level: i32,
    /// Broadcast frames at least this many bytes are zstd-compressed; shorter
    /// ones only with a dictionary (`compression.min_bytes`).
    pub compression_min_bytes: usize,
    /// The trained zstd dictionary, if one is configured.
    pub dictionary: Option<Dictionary>,
    /// The Pusher app served on `/app/{key}`, if `pusher.app_key` is set.
    pub pusher: Option<Arc<PusherApp>>,
    /// The other Pusher apps (`[[pusher.apps]]`), each in its own channel
    /// namespace (see [`PusherApp::namespace`]).
    pub pusher_apps: Vec<Arc<PusherApp>>,
    /// The first number of this shard's Pusher `socket_id`s: random per
    /// process (so unique across nodes with high probability) times 1,000
    /// plus the shard index (see `state::SocketId`).
    pub socket_prefix: u64,
}

/// The Pusher app of `[pusher]`, as the shards use it.
#[derive(Debug)]
pub struct PusherApp {
    /// `pusher.app_id`: the id in HTTP API paths.
    pub id: String,
    /// `pusher.app_key`: the key in `/app/{key}` and in signatures.
    pub key: String,
    /// `pusher.app_secret`, its UTF-8 bytes: the HMAC-SHA256 key.
    pub secret: Vec<u8>,
    /// `pusher.client_events`.
    pub client_events: bool,
    /// `pusher.client_event_rate`, per second (and the burst).
    pub client_event_rate: u32,
    /// `pusher.activity_timeout_secs`.
    pub activity_timeout_secs: u32,
    /// `pusher.max_event_bytes`, in bytes.
    pub max_event_bytes: usize,
    /// `pusher.max_channels_per_trigger`.
    pub max_channels_per_trigger: usize,
    /// `pusher.max_batch_events`.
    pub max_batch_events: usize,
    /// `pusher.presence_max_members`.
    pub presence_max_members: usize,
    /// `pusher.presence_max_user_info_bytes`, in bytes.
    pub presence_max_user_info_bytes: usize,
    /// What its channels' names start with in the bus: empty for the
    /// default app (it shares the native namespace), `#app-<id>/` for a
    /// `[[pusher.apps]]` one (see `protocol::pusher::channel::to_bus`).
    pub namespace: String,
}

impl PusherApp {
    /// The default app of `c` (the `pusher.*` keys), if `pusher.app_key`
    /// is set: it shares the native namespace.
    pub fn from_config(c: &crate::config::PusherConfig) -> Option<PusherApp> {
        (!c.app_key.is_empty()).then(|| PusherApp::new(&c.default_app(), String::new()))
    }

    /// A `[[pusher.apps]]` app, isolated in its namespace `#app-<id>/`.
    pub fn from_app_config(c: &crate::config::PusherAppConfig) -> PusherApp {
        PusherApp::new(c, crate::protocol::pusher::channel::app_namespace(&c.id))
    }

    fn new(c: &crate::config::PusherAppConfig, namespace: String) -> PusherApp {
        PusherApp {
            id: c.id.clone(),
            key: c.key.clone(),
            secret: c.secret.as_bytes().to_vec(),
            client_events: c.client_events,
            client_event_rate: c.client_event_rate,
            activity_timeout_secs: c.activity_timeout_secs,
            max_event_bytes: c.max_event_bytes as usize,
            max_channels_per_trigger: c.max_channels_per_trigger as usize,
            max_batch_events: c.max_batch_events as usize,
            presence_max_members: c.presence_max_members as usize,
            presence_max_user_info_bytes: c.presence_max_user_info_bytes as usize,
            namespace,
        }
    }

    /// The bus name of this app's channel `name` (the client's name,
    /// checked as such), or why it cannot have one (too long with the
    /// namespace).
    pub fn bus_name<'a>(
        &self,
        name: &'a str,
    ) -> Result<std::borrow::Cow<'a, str>, crate::protocol::channel::ChannelError> {
        crate::protocol::pusher::channel::to_bus(&self.namespace, name)
    }
}

impl Settings {
    /// The settings of `c` for one shard. Errors: the `[auth]` key errors
    /// of [`Auth::from_config`].
    pub fn from_config(
        c: &Config,
        admission: Arc<admission::Admission>,
        dictionary: Option<Dictionary>,
    ) -> Result<Self, crate::auth::KeyError> {
        Ok(Settings {
            frame_limits: FrameLimits {
                max_frame_bytes: c.websocket.max_frame_bytes as usize,
                max_message_bytes: c.websocket.max_message_bytes as usize,
                max_fragments: c.websocket.max_fragments as usize,
            },
            handshake_max_header_bytes: c.websocket.handshake_max_header_bytes as usize,
            handshake_max_headers: c.websocket.handshake_max_headers as usize,
            decode_limits: DecodeLimits {
                max_bytes: c.websocket.max_message_bytes as usize,
                ..DecodeLimits::default()
            },
            max_batch: c.fanout.max_batch as usize,
            tick_pause: Duration::from_millis(u64::from(c.fanout.tick_pause_ms)),
            outbound_budget: c.fanout.outbound_budget_bytes as usize,
            outbound_max_age: Duration::from_millis(u64::from(c.fanout.outbound_max_age_ms)),
            max_publish_bytes: c.fanout.max_publish_bytes as usize,
            max_subscriptions: c.fanout.max_subscriptions_per_connection as usize,
            close_timeout: Duration::from_millis(u64::from(c.websocket.close_timeout_ms)),
            limits: c.limits.clone(),
            allowed_origins: c
                .limits
                .allowed_origins
                .split(',')
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            auth: Auth::from_config(&c.auth)?,
            auth_deadline_ms: c.auth.deadline_ms,
            leeway_secs: c.auth.leeway_secs,
            admission,
            compression_level: c.compression.level as i32,
            compression_min_bytes: c.compression.min_bytes as usize,
            dictionary,
            pusher: PusherApp::from_config(&c.pusher).map(Arc::new),
            pusher_apps: c
                .pusher
                .apps
                .iter()
                .map(|a| Arc::new(PusherApp::from_app_config(a)))
                .collect(),
            socket_prefix: 0,
        })
    }

    fn handshake_limits(&self) -> HandshakeLimits {
        HandshakeLimits {
            max_header_bytes: self.handshake_max_header_bytes,
            max_headers: self.handshake_max_headers,
        }
    }
}

/// One shard's world, shared by its tasks (all on one thread).
struct Shard {
    id: usize,
    registry: Arc<Registry>,
    settings: Rc<Settings>,
    state: RefCell<State>,
    /// The connections' sockets; the state knows them by id only.
    sockets: RefCell<transmit::Sockets>,
    /// Reused by every turn's writes (no allocation per tick).
    write_batch: RefCell<Vec<ConnId>>,
    scratch: RefCell<Box<[u8]>>,
}

/// The time now, for the state (which reads no clock itself).
fn now() -> Time {
    Time {
        mono: Instant::now(),
        unix_us: crate::bus::unix_us(),
    }
}

/// The running server: shard threads and the address they listen on.
pub struct Server {
    /// The address the shards listen on (with port 0 configured, the port
    /// the OS picked).
    pub local_addr: SocketAddr,
    /// Number of shard threads.
    pub shards: usize,
    /// "io_uring" or "epoll".
    pub driver: &'static str,
    /// Metrics and readiness, shared with the admin endpoint.
    pub registry: Arc<Registry>,
    drain: watch::Sender<bool>,
    drain_window: Duration,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts a graceful drain: every shard stops accepting and closes its
    /// connections with 1012, spread over the drain window.
    pub fn drain(&self) {
        self.registry.set_draining();
        let _ = self.drain.send(true);
    }

    /// The configured drain window.
    pub fn drain_window(&self) -> Duration {
        self.drain_window
    }

    /// Whether every shard thread has exited.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }
}

/// Binds every shard's listener and starts the shard threads. Returns once
/// every shard is accepting, so the caller can announce readiness.
///
/// `inherited` are listening sockets handed over by the service manager
/// (socket activation); shard `i` takes socket `i % len`, and
/// `server.listen` is not bound. `registry` (made with one slot per bus)
/// may already serve the admin endpoint: it is marked ready here.
pub fn start(
    config: &Config,
    registry: Arc<Registry>,
    buses: Vec<Box<dyn Bus>>,
    dictionary: Option<Dictionary>,
    inherited: Vec<std::net::TcpListener>,
) -> Result<Server, StartError> {
    let shards = buses.len();
    let addr = config.listen_addr().map_err(|e| StartError::Shard {
        shard: 0,
        message: e.to_string(),
    })?;
    // Sockets passed by the service manager are not bound here, so they
    // are not checked for another process either: systemd owns them.
    let listeners = if inherited.is_empty() {
        listener::bind_all(addr, shards, config.server.backlog as i32)
    } else {
        (0..shards)
            .map(|i| inherited[i % inherited.len()].try_clone())
            .collect()
    }
    .map_err(|source| match source.kind() {
        std::io::ErrorKind::AddrInUse => StartError::AddressInUse { addr },
        _ => StartError::Listen { addr, source },
    })?;
    let local_addr = listeners[0]
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })?;
    let admission = Arc::new(admission::Admission::new(
        config.limits.max_connections_per_ip,
        config.limits.accept_rate_per_ip,
        config.limits.accept_burst_per_ip,
    ));
    let (drain_tx, drain_rx) = watch::channel(false);
    let drain_window = Duration::from_millis(u64::from(config.server.drain_window_ms));
    let cpus = listener::allowed_cpus();
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(shards);
    // Pusher socket ids: a random number per process, then the shard.
    let node_token = {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(std::process::id()) % 1_000_000
    };
    for (i, (std_listener, bus)) in listeners.into_iter().zip(buses).enumerate() {
        let mut settings = Settings::from_config(config, admission.clone(), dictionary.clone())?;
        settings.socket_prefix = (node_token + 1) * 1000 + i as u64;
        let ready = ready_tx.clone();
        let registry = registry.clone();
        let drain = drain_rx.clone();
        let cpu = (config.server.pin_threads && !cpus.is_empty()).then(|| cpus[i % cpus.len()]);
        let handle = std::thread::Builder::new()
            .name(format!("shard-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    listener::pin_to_cpu(cpu);
                }
                let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build();
                let mut rt = match rt {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err((i, format!("cannot build runtime: {e}"))));
                        return;
                    }
                };
                rt.block_on(run_shard(
                    i as u16,
                    settings,
                    std_listener,
                    bus,
                    registry,
                    Draining {
                        signal: drain,
                        window: drain_window,
                    },
                    ready,
                ));
            })
            .map_err(|e| StartError::Shard {
                shard: i,
                message: e.to_string(),
            })?;
        threads.push(handle);
    }
    drop(ready_tx);
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err((shard, message))) => return Err(StartError::Shard { shard, message }),
            Err(_) => {
                return Err(StartError::Shard {
                    shard: 0,
                    message: "a shard thread exited during start".into(),
                })
            }
        }
    }
    registry.set_ready();
    Ok(Server {
        local_addr,
        shards,
        registry,
        drain: drain_tx,
        drain_window,
        driver: if monoio::utils::detect_uring() {
            "io_uring"
        } else {
            "epoll"
        },
        threads,
    })
}

type Ready = mpsc::Sender<Result<(), (usize, String)>>;

/// How a shard learns that the server is draining.
struct Draining {
    signal: watch::Receiver<bool>,
    window: Duration,
}

async fn run_shard(
    id: u16,
    settings: Settings,
    std_listener: std::net::TcpListener,
    bus: Box<dyn Bus>,
    registry: Arc<Registry>,
    draining: Draining,
    ready: Ready,
) {
    let listener = match TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err((id as usize, format!("cannot register listener: {e}"))));
            return;
        }
    };
    let settings = Rc::new(settings);
    let state = match State::new(id, settings.clone(), bus, registry.clone(), now()) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err((id as usize, format!("cannot set up zstd: {e}"))));
            return;
        }
    };
    let shard = Rc::new(Shard {
        id: usize::from(id),
        registry,
        state: RefCell::new(state),
        sockets: RefCell::new(transmit::Sockets::default()),
        write_batch: RefCell::new(Vec::new()),
        settings,
        scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
    });
    let requeue = Rc::new(requeue::Requeue::default());
    monoio::spawn(requeue.clone().relay());
    monoio::spawn(dispatcher(shard.clone(), requeue));
    monoio::spawn(sweeper(shard.clone()));
    let listener_fd = listener.as_raw_fd();
    monoio::spawn(watch_drain(shard.clone(), draining, listener_fd));
    let _ = ready.send(Ok(()));
    tracing::debug!(shard = id, "accepting");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Small pushes must leave at once, not wait for Nagle.
                let _ = stream.set_nodelay(true);
                monoio::spawn(conn::run(shard.clone(), stream, peer));
            }
            Err(_) if shard.state.borrow().is_draining() => break,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning;
                // existing connections keep being served meanwhile.
                tracing::warn!(shard = id, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Draining: the sweeper closes connections over the window; this shard
    // is done when they are gone or the window is over.
    while !{
        let mut state = shard.state.borrow_mut();
        state.touch(now());
        state.drained()
    } {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::debug!(shard = id, "drained");
}

/// Waits for the drain signal, then starts draining and stops accepting.
async fn watch_drain(shard: Rc<Shard>, mut draining: Draining, listener_fd: RawFd) {
    if draining.signal.wait_for(|&d| d).await.is_err() {
        return;
    }
    {
        let mut state = shard.state.borrow_mut();
        state.touch(now());
        state.begin_drain(draining.window);
        state.wake_if_needed();
    }
    // Shutting the listening socket down wakes the pending accept with an
    // error, which ends the accept loop (racing accept against a signal in
    // `select!` could leak an accepted descriptor).
    // The listener outlives this call (it lives in run_shard, which only
    // returns after draining began).
    sys::shutdown(listener_fd, std::net::Shutdown::Both);
}

/// Runs a tick whenever there is work; see the module docs.
///
/// Between ticks the readers and the accept loop get their turn. Normally
/// the next tick runs as soon as the tasks that were ready have run, so a
/// publication waits for no timer. When a tick found publications arriving
/// faster than that (two or more of a channel in one frame), the shard
/// pauses `fanout.tick_pause_ms` first (monoio timers have millisecond
/// resolution): what arrives meanwhile shares frames and writes, which
/// under heavy load halves the CPU per message for a millisecond more
/// latency. A light load never pays that millisecond.
async fn dispatcher(shard: Rc<Shard>, requeue: Rc<requeue::Requeue>) {
    let pause = shard.settings.tick_pause;
    loop {
        std::future::poll_fn(|cx| shard.state.borrow_mut().poll_work(cx)).await;
        let batching = {
            let mut state = shard.state.borrow_mut();
            state.touch(now());
            state.tick();
            transmit::perform(&shard, &mut state);
            state.touch(now());
            state.transmitted();
            state.batching()
        };
        if batching && !pause.is_zero() {
            monoio::time::sleep(pause).await;
        } else {
            requeue.yield_back().await;
        }
    }
}

async fn sweeper(shard: Rc<Shard>) {
    loop {
        monoio::time::sleep(SWEEP_INTERVAL).await;
        {
            let mut state = shard.state.borrow_mut();
            state.touch(now());
            state.report();
            state.sweep();
        }
        // Proof of life for the service watchdog: this shard's loop runs.
        shard.registry.heartbeat(shard.id);
    }
}
