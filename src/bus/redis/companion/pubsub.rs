//! The subscription controller task: `SUBSCRIBE`/`UNSUBSCRIBE` on the
//! Pub/Sub connection in request order, each confirmed with a `PING`, then
//! the subscribed channels' positions read.

use std::sync::Arc;

use fred::prelude::*;
use fred::types::Value;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::pipeline::run_pipelined;
use super::subscriptions::Internal;
use super::Shared;
use crate::bus::redis::codec::{self, bytes_of, parse_epoch, u64_of};
use crate::bus::redis::keys;
use crate::bus::redis::scripts::scripts;
use crate::bus::Position;

pub(super) enum SubOp {
    Subscribe(Arc<str>, u64),
    Unsubscribe(Arc<str>),
    ResubscribeAll(Vec<Arc<str>>),
}

/// Sends `SUBSCRIBE`/`UNSUBSCRIBE` in order and opens subscribed channels.
pub(super) async fn subscription_controller(
    shared: Arc<Shared>,
    cmd: Client,
    sub: Client,
    mut ops: UnboundedReceiver<SubOp>,
    internal: UnboundedSender<Internal>,
) {
    let mut batch: Vec<SubOp> = Vec::new();
    while let Some(op) = ops.recv().await {
        batch.push(op);
        while let Ok(op) = ops.try_recv() {
            batch.push(op);
        }
        let mut ops_iter = batch.drain(..).peekable();
        while let Some(op) = ops_iter.next() {
            match op {
                SubOp::Subscribe(channel, gen) => {
                    let mut group = vec![(channel, gen)];
                    while let Some(SubOp::Subscribe(..)) = ops_iter.peek() {
                        if let Some(SubOp::Subscribe(c, g)) = ops_iter.next() {
                            group.push((c, g));
                        }
                    }
                    let names: Vec<String> = group.iter().map(|(c, _)| keys::pubsub(c)).collect();
                    match confirm_subscribe(&sub, names).await {
                        Ok(()) => {
                            let results = open_channels(&shared, &cmd, &group).await;
                            for ((channel, gen), result) in group.into_iter().zip(results) {
                                let _ = internal.send(Internal::Opened {
                                    channel,
                                    gen,
                                    result,
                                });
                            }
                        }
                        Err(e) => {
                            for (channel, gen) in group {
                                let _ = internal.send(Internal::Opened {
                                    channel,
                                    gen,
                                    result: Err(e.clone()),
                                });
                            }
                        }
                    }
                }
                SubOp::Unsubscribe(channel) => {
                    let mut names = vec![keys::pubsub(&channel)];
                    while let Some(SubOp::Unsubscribe(..)) = ops_iter.peek() {
                        if let Some(SubOp::Unsubscribe(c)) = ops_iter.next() {
                            names.push(keys::pubsub(&c));
                        }
                    }
                    // A failure means the connection dropped, which ends
                    // every subscription anyway (the reconnect resubscribes
                    // only channels still wanted).
                    if let Err(e) = sub.unsubscribe(names).await {
                        tracing::debug!(error = %e, "redis unsubscribe failed");
                    }
                }
                SubOp::ResubscribeAll(channels) => {
                    let names: Vec<String> = channels.iter().map(|c| keys::pubsub(c)).collect();
                    let result = if names.is_empty() {
                        Ok(())
                    } else {
                        confirm_subscribe(&sub, names).await
                    };
                    let _ = internal.send(Internal::Resubscribed(result));
                }
            }
        }
    }
}

/// `SUBSCRIBE`, then a `PING` on the same connection. fred 10.1.0 resolves
/// `subscribe` as soon as the command is queued on the connection (its
/// replies arrive out of band), before it is even written; the `PING` reply
/// proves Redis processed what was queued ahead of it on that connection.
/// If the connection drops in between, the `SUBSCRIBE` may be lost and a
/// retried `PING` answered on the new connection proves nothing about it —
/// that is still sound because every Pub/Sub reconnect raises
/// `on_sub_reconnect`, which resubscribes every channel this shard wants
/// (those still opening too) through this function, then catches them all
/// up from the streams.
async fn confirm_subscribe(sub: &Client, names: Vec<String>) -> Result<(), String> {
    for chunk in names.chunks(512) {
        sub.subscribe(chunk.to_vec())
            .await
            .map_err(|e| e.to_string())?;
    }
    sub.ping::<Value>(None).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Reads (creating if needed) the position of each channel.
async fn open_channels(
    shared: &Shared,
    cmd: &Client,
    group: &[(Arc<str>, u64)],
) -> Vec<Result<Position, String>> {
    let calls = group
        .iter()
        .map(|(c, _)| {
            let mut args = vec![
                Value::from(shared.fresh_epoch()),
                Value::from(shared.ttl_ms().to_string()),
            ];
            // What the node saw of the channel: Redis holding less of that
            // epoch means it lost acknowledged history.
            args.extend(codec::seen_args(shared.seen.get(c)));
            (&scripts().open, vec![keys::meta(c), keys::stream(c)], args)
        })
        .collect();
    run_pipelined(cmd, calls)
        .await
        .into_iter()
        .map(|r| {
            let v = r.map_err(|e| e.to_string())?;
            parse_position(v).map_err(|e| e.to_string())
        })
        .collect()
}

fn parse_position(v: Value) -> Result<Position, codec::Malformed> {
    let Value::Array(parts) = v else {
        return Err(codec::Malformed::Reply("open reply is not an array"));
    };
    let mut it = parts.into_iter();
    let (Some(epoch), Some(seq), None) = (it.next(), it.next(), it.next()) else {
        return Err(codec::Malformed::Reply("open reply length"));
    };
    let epoch = parse_epoch(&bytes_of(epoch).ok_or(codec::Malformed::Reply("epoch"))?)?;
    let offset = u64_of(&seq).ok_or(codec::Malformed::Reply("seq"))?;
    Ok(Position { epoch, offset })
}
