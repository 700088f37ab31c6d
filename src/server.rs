//! `shardcast serve`: builds the buses (embedded or Redis), starts the
//! shards and the admin endpoint, tells the service manager (systemd) when
//! it is ready, and drains on SIGTERM/SIGINT. The CLI (`src/main.rs`) only
//! parses arguments and calls [`serve`].

// Unsafe only for the signal mask and `sigwait` (marked where allowed).

use std::io::Write;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::bus::local::Retention;
use crate::bus::redis::{self, RedisBus, RedisOptions, RedisStats, SetupError};
use crate::bus::{Bus, LocalBus};
use crate::config::Config;
use crate::metrics::{Collector, Registry};
use crate::systemd;

/// Logs to stderr at `log.level`, as text or JSON lines (`log.format`).
/// Text is coloured only on a terminal: files and the journal get no ANSI
/// codes.
fn init_logging(log: &crate::config::LogConfig) {
    let level = log.level.parse().unwrap_or(tracing::Level::INFO);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false);
    if log.format == "json" {
        // {"timestamp":…,"level":…,"message":…,<fields>}: one object per
        // line, the event's fields at the top level.
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_ansi(false)
            .init();
    } else {
        builder.with_ansi(colour_on_stderr()).init();
    }
}

/// ANSI colour on stderr: only when it is a terminal, and not when
/// `NO_COLOR` is set to anything (<https://no-color.org>).
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread
/// it starts afterwards) and returns the set, for `sigwait` on one thread.
#[allow(unsafe_code)]
fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask manipulation on a local set, done before
    // any other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Forwards each shutdown signal to a channel, from a dedicated thread.
#[allow(unsafe_code)]
fn signal_channel(set: libc::sigset_t) -> mpsc::Receiver<i32> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` holds signals blocked in every thread.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 && tx.send(sig).is_err() {
                return;
            }
        })
        .expect("spawn the signal thread");
    rx
}

/// One bus handle per shard, which bus it is, and its metrics (if any).
type Buses = (Vec<Box<dyn Bus>>, &'static str, Option<Collector>);

/// The embedded bus, or the Redis bus when `redis.url` is set.
/// Payload bytes per history page for a catching-up client: a quarter of
/// its outbound budget, so that a page nearly always fits the room left in
/// its queue and is sent whole (a page that does not fit is dropped and
/// read again once the socket drained).
fn history_page_bytes(config: &Config) -> usize {
    (config.fanout.outbound_budget_bytes as usize / 4).max(1)
}

/// Why the buses could not be built.
enum BusStart {
    /// Redis could not be reached (or did not answer in time): worth
    /// another try. The sentence names the URL (without its password) and
    /// the reason.
    Unreachable(String),
    /// A configuration error no retry fixes.
    Fatal(String),
}

/// How long the TCP probe of Redis may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// First delay between attempts to reach Redis at start; it doubles up to
/// [`REDIS_RETRY_MAX`].
const REDIS_RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest delay between attempts to reach Redis at start.
const REDIS_RETRY_MAX: Duration = Duration::from_secs(5);

/// The buses, once they can be built: with the Redis bus, a Redis that is
/// not reachable yet (late at boot, restarting) is tried again with an
/// exponential back-off (250 ms doubling to 5 s), each failure logged as a
/// sentence, the service manager told why it is not ready yet (and given
/// more start time, `EXTEND_TIMEOUT_USEC`), and `/readyz` answering 503
/// meanwhile. `Ok(None)`: a shutdown signal came first.
fn connect_buses(
    config: &Config,
    shards: usize,
    signals: &mpsc::Receiver<i32>,
) -> Result<Option<Buses>, String> {
    let mut delay = REDIS_RETRY_FIRST;
    loop {
        match build_buses(config, shards) {
            Ok(buses) => return Ok(Some(buses)),
            Err(BusStart::Fatal(message)) => return Err(message),
            Err(BusStart::Unreachable(message)) => {
                tracing::warn!(
                    "{message}; trying again in {} ms (not ready until then)",
                    delay.as_millis()
                );
                notify(&format!(
                    "{}\n{}",
                    systemd::status(&format!("waiting for Redis: {message}")),
                    systemd::extend_timeout(delay + Duration::from_secs(10))
                ));
                match signals.recv_timeout(delay) {
                    Ok(_) => return Ok(None),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err("signal thread stopped".into())
                    }
                }
                delay = (delay * 2).min(REDIS_RETRY_MAX);
            }
        }
    }
}

fn build_buses(config: &Config, shards: usize) -> Result<Buses, BusStart> {
    let secs = |s: u32| Duration::from_secs(u64::from(s));
    if config.redis.url.is_empty() {
        let retention = Retention {
            size: config.history.size as usize,
            ttl: secs(config.history.ttl_secs),
            // Each shard owns a share of the channels: it gets the same
            // share of the bound.
            max_bytes: (config.history.max_mib as usize) * (1 << 20) / shards,
            page_bytes: history_page_bytes(config),
            idempotency_ttl: secs(config.history.idempotency_ttl_secs),
        };
        let buses = LocalBus::cluster(shards, retention)
            .into_iter()
            .map(|b| Box::new(b) as Box<dyn Bus>)
            .collect();
        return Ok((buses, "local", None));
    }
    let options = RedisOptions {
        history_size: u64::from(config.history.size),
        history_ttl: secs(config.history.ttl_secs),
        idempotency_ttl: secs(config.history.idempotency_ttl_secs),
        command_timeout: Duration::from_millis(u64::from(config.redis.command_timeout_ms)),
        node_id: if config.redis.node_id.is_empty() {
            crate::bus::redis::default_node_id()
        } else {
            config.redis.node_id.clone()
        },
        ingest: config.redis.ingest,
        ingest_claim_idle: secs(config.redis.ingest_claim_idle_secs),
        max_payload_bytes: config.websocket.max_message_bytes as usize,
        presence_ttl: Duration::from_millis(u64::from(config.redis.presence_ttl_ms)),
        wait_replicas: config.redis.wait_replicas,
        history_page_bytes: history_page_bytes(config),
    };
    let url = redact(&config.redis.url);
    let classify = |e: SetupError| match e {
        SetupError::Connect(why) => BusStart::Unreachable(format!("redis.url {url}: {why}")),
        other => BusStart::Fatal(format!("redis.url {url}: {other}")),
    };
    // A TCP probe first: its reason is the operating system's sentence
    // ("Connection refused"), where fred's is a debug dump.
    redis::probe(&config.redis.url, PROBE_TIMEOUT).map_err(classify)?;
    let handles = RedisBus::cluster(&config.redis.url, shards, options).map_err(classify)?;
    let stats = handles.first().map(RedisBus::stats);
    let collector: Option<Collector> = stats.map(|s| -> Collector {
        Box::new(move || {
            let get = RedisStats::get;
            vec![
                (
                    "shardcast_redis_malformed_total",
                    "Entries read from Redis rejected as malformed.",
                    get(&s.malformed),
                ),
                (
                    "shardcast_redis_catch_ups_total",
                    "Catch-up reads from a stream after a gap, reconnect or lag.",
                    get(&s.catch_ups),
                ),
                (
                    "shardcast_redis_caught_up_total",
                    "Publications delivered by catch-up reads.",
                    get(&s.caught_up),
                ),
                (
                    "shardcast_redis_unfillable_gaps_total",
                    "Gaps that history could no longer fill.",
                    get(&s.unfillable_gaps),
                ),
                (
                    "shardcast_redis_reconnects_total",
                    "Reconnects of the Pub/Sub connection.",
                    get(&s.reconnects),
                ),
                (
                    "shardcast_redis_publish_errors_total",
                    "Publishes that failed (unreachable, timeout, script error).",
                    get(&s.publish_errors),
                ),
                (
                    "shardcast_redis_ingest_executed_total",
                    "Ingest entries published.",
                    get(&s.ingest_executed),
                ),
                (
                    "shardcast_redis_ingest_claimed_total",
                    "Ingest entries taken over from another node.",
                    get(&s.ingest_claimed),
                ),
            ]
        })
    });
    let buses = handles
        .into_iter()
        .map(|b| Box::new(b) as Box<dyn Bus>)
        .collect();
    Ok((buses, "redis", collector))
}

/// A Redis URL without its password, for messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Pings the service manager's watchdog while every shard is alive: a
/// wedged shard stops its heartbeat, the pings stop, and systemd restarts
/// the service.
fn spawn_watchdog(registry: Arc<Registry>, every: Duration) {
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut last = registry.heartbeats();
            loop {
                std::thread::sleep(every);
                let now = registry.heartbeats();
                if now.iter().zip(&last).all(|(n, l)| n > l) {
                    if let Err(e) = systemd::notify(systemd::WATCHDOG) {
                        tracing::warn!(error = %e, "watchdog notification failed");
                    }
                } else {
                    tracing::error!("a shard missed its heartbeat; withholding the watchdog ping");
                }
                last = now;
            }
        });
}

fn notify(state: &str) {
    if let Err(e) = systemd::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Runs the server until a shutdown signal, then drains (connections closed
/// with 1012 spread over `server.drain_window_ms`) and returns. `Err` is a
/// sentence for the operator: a listener, Redis or dictionary that cannot be
/// set up.
pub fn serve(config: Config) -> Result<(), String> {
    // Socket activation must be read before any thread starts: it edits
    // the environment.
    let inherited: Vec<std::net::TcpListener> = systemd::listen_fds_with_names()
        .map_err(|e| format!("socket activation: {e}"))?
        .into_iter()
        .map(|(fd, name)| {
            systemd::tcp_listener(fd).map_err(|e| format!("socket activation ({name}): {e}"))
        })
        .collect::<Result<_, _>>()?;
    let signals = signal_channel(block_shutdown_signals());
    init_logging(&config.log);
    if !inherited.is_empty() {
        tracing::info!(
            sockets = inherited.len(),
            "using sockets passed by the service manager; server.listen is ignored"
        );
    }
    let shards = config.shard_count();
    // The same checks as `check-config`, before anything is bound.
    let checked = crate::preflight::check(&config)?;
    for warning in &checked.warnings {
        tracing::warn!("{warning}");
    }
    let dictionary = checked.dictionary;
    // The admin endpoint comes first: while the bus is not connected,
    // `/readyz` answers 503 and `/healthz` 200.
    let registry = Arc::new(Registry::new(shards));
    let admin = match config.admin_addr().map_err(|e| e.to_string())? {
        Some(addr) => Some(
            crate::api::admin::spawn(addr, registry.clone())
                .map_err(|e| format!("cannot listen on admin.listen {addr}: {e}"))?,
        ),
        None => None,
    };
    let Some((buses, bus_kind, bus_metrics)) = connect_buses(&config, shards, &signals)? else {
        tracing::info!("stopped by a signal before Redis could be reached");
        return Ok(());
    };
    let server = crate::shard::start(&config, registry, buses, dictionary, inherited)
        .map_err(|e| e.to_string())?;
    if let Some(c) = bus_metrics {
        server.registry.add_collector(c);
    }
    // One machine-readable line on stdout: tests and scripts read the
    // address from it (useful with port 0).
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "shardcast listening on {} shards={} driver={} admin={}",
        server.local_addr,
        server.shards,
        server.driver,
        admin.map_or("off".to_string(), |a| a.to_string())
    );
    let _ = out.flush();
    drop(out);
    tracing::info!(
        addr = %server.local_addr,
        shards = server.shards,
        driver = server.driver,
        bus = bus_kind,
        "serving"
    );
    notify(&format!(
        "{}\n{}",
        systemd::READY,
        systemd::status(&format!(
            "serving on {} with {} shards",
            server.local_addr, server.shards
        ))
    ));
    match systemd::try_watchdog_interval() {
        Ok(Some(every)) => spawn_watchdog(server.registry.clone(), every),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "ignoring the watchdog settings"),
    }
    let sig = signals
        .recv()
        .map_err(|_| "signal thread stopped".to_string())?;
    let window = server.drain_window();
    tracing::info!(
        signal = sig,
        window_ms = window.as_millis() as u64,
        "draining: closing connections with 1012; a second signal exits at once"
    );
    notify(&format!(
        "{}\n{}",
        systemd::STOPPING,
        systemd::status("draining connections")
    ));
    server.drain();
    // Shards finish when their connections are gone or the window is over;
    // the margin only covers thread teardown.
    let deadline = Instant::now() + window + Duration::from_millis(500);
    while !server.is_finished() {
        match signals.recv_timeout(Duration::from_millis(20)) {
            Ok(_) => {
                eprintln!("shardcast: second signal, exiting without finishing the drain");
                std::process::exit(1);
            }
            Err(_) if Instant::now() >= deadline => {
                tracing::warn!("drain window over with connections left; exiting");
                break;
            }
            Err(_) => {}
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}
