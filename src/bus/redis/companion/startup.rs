//! The companion thread's body: its tokio runtime, connecting the fred
//! clients (with clock measurement and script preloading), running the
//! main loop and closing the clients when the shard is gone.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, Value};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::NodeSeen;
use super::{Companion, Shared};
use crate::bus::redis::codec::u64_of;
use crate::bus::redis::scripts::scripts;
use crate::bus::redis::{ingest, RedisOptions, RedisStats, Request};
use crate::bus::{unix_us, BusEvent};

/// How long the first connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Setup {
    pub shard: usize,
    pub config: Config,
    pub options: RedisOptions,
    pub stats: Arc<RedisStats>,
    pub ingest: bool,
    /// Shared by every companion of this node.
    pub seen: Arc<NodeSeen>,
}

fn builder(config: &Config, timeout: Duration) -> Builder {
    let mut b = Builder::from_config(config.clone());
    b.with_connection_config(|c| {
        c.connection_timeout = CONNECT_TIMEOUT;
        c.internal_command_timeout = CONNECT_TIMEOUT;
        c.tcp = TcpConfig {
            nodelay: Some(true),
            ..Default::default()
        };
    })
    .with_performance_config(|p| {
        p.default_command_timeout = timeout;
        // Pub/Sub messages wait here between companion turns; a lagging
        // receiver loses messages (and then catches up from the streams).
        p.broadcast_channel_capacity = 8192;
    })
    .set_policy(ReconnectPolicy::new_exponential(0, 50, 2000, 2));
    b
}

async fn connect(b: &Builder) -> Result<Client, String> {
    let client = b.build().map_err(|e| e.to_string())?;
    match tokio::time::timeout(CONNECT_TIMEOUT, client.init()).await {
        Ok(Ok(_task)) => Ok(client),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Measures Redis' clock against ours.
pub(super) async fn measure_clock(shared: &Shared, cmd: &Client) {
    let before = unix_us();
    let reply = cmd
        .custom::<Value, Value>(
            CustomCommand::new_static("TIME", ClusterHash::Random, false),
            vec![],
        )
        .await;
    let after = unix_us();
    let Ok(Value::Array(parts)) = reply else {
        return;
    };
    let (Some(secs), Some(micros)) = (
        parts.first().and_then(u64_of),
        parts.get(1).and_then(u64_of),
    ) else {
        return;
    };
    let redis = secs.saturating_mul(1_000_000).saturating_add(micros);
    let local = before / 2 + after / 2;
    let offset = redis as i64 - local as i64;
    shared.clock_offset_us.store(offset, Ordering::Relaxed);
    if offset.unsigned_abs() > 1_000_000 {
        tracing::warn!(
            offset_us = offset,
            "redis clock differs from ours by over a second"
        );
    }
}

/// Loads the scripts, so `EVALSHA` rarely misses.
pub(super) async fn preload(cmd: &Client) {
    let s = scripts();
    for script in [&s.publish, &s.open, &s.read] {
        if let Err(e) = cmd.script_load::<Value, _>(script.source.as_str()).await {
            tracing::debug!(error = %e, "script load failed");
        }
    }
}

/// The thread body.
pub fn run(
    setup: Setup,
    requests: UnboundedReceiver<Vec<Request>>,
    events: UnboundedSender<Vec<BusEvent>>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    rt.block_on(async move {
        let shared = Arc::new(Shared {
            shard: setup.shard,
            options: setup.options.clone(),
            stats: setup.stats.clone(),
            random: RandomState::new(),
            counter: AtomicU64::new(0),
            clock_offset_us: AtomicI64::new(0),
            seen: setup.seen.clone(),
            instance: format!(
                "{}#{}#{:08x}",
                setup.options.node_id,
                setup.shard,
                RandomState::new().hash_one(unix_us()) as u32
            ),
        });
        let timeout = setup.options.command_timeout;
        let cmd = match connect(&builder(&setup.config, timeout)).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let sub = match connect(&builder(&setup.config, timeout)).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        // With redis.wait_replicas, WAIT holds its connection up to the
        // command timeout: the sequencer gets a connection of its own, so
        // that history reads and catch-ups do not queue behind it.
        let seq_client = if setup.options.wait_replicas > 0 {
            match connect(&builder(&setup.config, timeout)).await {
                Ok(c) => {
                    preload(&c).await;
                    Some(c)
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        } else {
            None
        };
        let ingest_client = if setup.ingest {
            // XREADGROUP BLOCK holds its connection: a client of its own,
            // with a timeout above the block time.
            let b = builder(
                &setup.config,
                ingest::BLOCK + timeout + Duration::from_secs(1),
            );
            match connect(&b).await {
                Ok(c) => Some(c),
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        } else {
            None
        };
        preload(&cmd).await;
        measure_clock(&shared, &cmd).await;
        let _ = ready.send(Ok(()));

        let ingest_task = ingest_client
            .as_ref()
            .map(|ic| tokio::spawn(ingest::run(shared.clone(), ic.clone(), cmd.clone())));
        let seq = seq_client.clone().unwrap_or_else(|| cmd.clone());
        let mut companion = Companion::new(shared, cmd.clone(), seq, sub.clone(), events);
        companion.run(requests).await;
        if let Some(t) = ingest_task {
            t.abort();
        }
        let _ = sub.quit().await;
        let _ = cmd.quit().await;
        if let Some(ic) = ingest_client {
            let _ = ic.quit().await;
        }
        if let Some(sc) = seq_client {
            let _ = sc.quit().await;
        }
    });
}
