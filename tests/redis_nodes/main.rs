//! The Redis bus against real processes: a `redis-server` spawned per test
//! on a free loopback port and two `shardcast` nodes (two shards each)
//! sharing it. One module per capability (below); this file holds the
//! helpers several of them use.

#[path = "../common/mod.rs"]
mod common;

mod delivery;
mod ingest;
mod outages;
mod presence;
mod publish;
mod recovery;
mod rollback;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{http_get, try_connect, Client, RedisServer, Server, BULK_PUBLISHER, WAIT};
use serde_json::json;
use shardcast::auth::jwt::mint;
use shardcast::protocol::wire::{ErrorCode, Position, ServerMessage};

const SECRET: &str = "redis-nodes-test-secret-of-32-bytes+";

/// A shardcast node on `redis`, with the publish rate limit lifted.
fn node(redis: &RedisServer, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str()];
    args.extend_from_slice(&BULK_PUBLISHER);
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A node that requires tokens.
fn auth_node(redis: &RedisServer, extra: &[&str]) -> Server {
    let mut args = vec!["--auth-anonymous", "false", "--auth-hs256-secret", SECRET];
    args.extend_from_slice(extra);
    node(redis, &args)
}

fn token(claims: serde_json::Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut claims = claims;
    claims["exp"] = json!(exp);
    mint::hs256(SECRET.as_bytes(), &claims)
}

async fn connect_token(s: &Server, token: &str) -> Client {
    try_connect(s.addr, Some(token))
        .await
        .unwrap_or_else(|close| panic!("token refused: {close:?}"))
}

/// The outcome of one publish.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Ack(Position),
    Error(u16, String),
}

/// Publishes and waits at most `bound` for the answer (a publish must never
/// hang, even with Redis down).
async fn publish_within(
    c: &mut Client,
    channel: &str,
    payload: &[u8],
    key: Option<&str>,
    bound: Duration,
) -> Outcome {
    let id = c
        .request(|e, id| e.publish(id, channel, payload, key))
        .await;
    let started = Instant::now();
    match tokio::time::timeout(bound, c.reply(id)).await {
        Ok(ServerMessage::PublishAck { position, .. }) => Outcome::Ack(position),
        Ok(ServerMessage::Error { code, message }) => Outcome::Error(code, message),
        Ok(other) => panic!("expected PublishAck or Error, got {other:?}"),
        Err(_) => panic!(
            "publish on {channel} not answered within {bound:?} (hung since {:?})",
            started.elapsed()
        ),
    }
}

/// Publishes with `key` until it is acknowledged, retrying (with the same
/// key, so it is stored once) while Redis is unavailable — as a client
/// does while Redis restarts; at most `WAIT` in all.
async fn publish_keyed_once_back(
    c: &mut Client,
    channel: &str,
    payload: &[u8],
    key: &str,
) -> Position {
    let until = Instant::now() + WAIT;
    loop {
        match publish_within(c, channel, payload, Some(key), WAIT).await {
            Outcome::Ack(pos) => return pos,
            Outcome::Error(code, _) => assert_eq!(code, ErrorCode::Unavailable as u16),
        }
        assert!(Instant::now() < until, "Redis never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pipelines `payloads` and returns their acknowledged positions in order.
async fn publish_all(c: &mut Client, channel: &str, payloads: &[Vec<u8>]) -> Vec<Position> {
    let mut ids = Vec::with_capacity(payloads.len());
    for p in payloads {
        ids.push(c.publish_nowait(channel, p).await);
    }
    let mut acks = Vec::with_capacity(ids.len());
    for id in ids {
        match c.reply(id).await {
            ServerMessage::PublishAck { position, .. } => acks.push(position),
            other => panic!("expected PublishAck, got {other:?}"),
        }
    }
    acks
}

/// The next `n` publications of `channel`: (epoch, offset, payload).
async fn receive(c: &mut Client, channel: &str, n: usize) -> Vec<(u64, u64, Vec<u8>)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let (ch, epoch, offset, payload) = c.publication().await;
        assert_eq!(ch, channel);
        got.push((epoch, offset, payload));
    }
    got
}

fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i}").into_bytes())
        .collect()
}

/// Asserts `got` is exactly `acks` with `sent` payloads, in order.
fn assert_exactly(got: &[(u64, u64, Vec<u8>)], acks: &[Position], sent: &[Vec<u8>], who: &str) {
    assert_eq!(got.len(), acks.len(), "{who}: count");
    for (k, ((epoch, offset, payload), (ack, sent))) in
        got.iter().zip(acks.iter().zip(sent)).enumerate()
    {
        assert_eq!(
            (*epoch, *offset, payload.as_slice()),
            (ack.epoch, ack.offset, sent.as_slice()),
            "{who}: publication #{k}"
        );
    }
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const ROOM: &str = "presence-lobby";

/// The next presence changes and publications on ROOM are `want` (see
/// [`common::next_channel_event`]).
async fn expect_events(c: &mut Client, want: &[&str]) {
    common::expect_channel_events(c, ROOM, want).await
}

/// `XADD sc:ingest` lines for redis-cli.
fn ingest_lines(channel: &str, range: std::ops::Range<usize>) -> String {
    range
        .map(|i| format!("XADD sc:ingest * channel {channel} payload e-{i}\n"))
        .collect()
}

/// Receives until every payload of `want` arrived; asserts each arrived
/// once, at consecutive offsets.
async fn receive_set(c: &mut Client, channel: &str, want: &HashSet<Vec<u8>>) {
    let mut got: HashSet<Vec<u8>> = HashSet::new();
    let mut last: Option<(u64, u64)> = None;
    while got.len() < want.len() {
        let (ch, epoch, offset, payload) = c.publication().await;
        assert_eq!(ch, channel);
        if let Some((e, o)) = last {
            assert_eq!((epoch, offset), (e, o + 1), "gap or duplicate offset");
        }
        last = Some((epoch, offset));
        assert!(
            want.contains(&payload),
            "unexpected payload {:?}",
            String::from_utf8_lossy(&payload)
        );
        assert!(
            got.insert(payload.clone()),
            "{:?} delivered twice",
            String::from_utf8_lossy(&payload)
        );
    }
}

/// A publish from `c` after everything else: the next publication every
/// subscriber sees must be this one (no late duplicates).
async fn assert_nothing_more(
    publisher: &mut Client,
    subscribers: &mut [&mut Client],
    channel: &str,
) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let marker = publisher.publish(channel, b"marker").await;
    for s in subscribers.iter_mut() {
        let (_, epoch, offset, payload) = s.publication().await;
        assert_eq!(
            (
                epoch,
                offset,
                String::from_utf8_lossy(&payload).into_owned()
            ),
            (marker.epoch, marker.offset, "marker".to_string()),
            "something arrived after the expected publications"
        );
    }
}

fn metric(s: &Server, name: &str) -> u64 {
    let (status, body) = http_get(s.admin.expect("admin address"), "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("{name} not in /metrics")) as u64
}
