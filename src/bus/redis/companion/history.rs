//! Reading a channel's history from its stream, a page at a time: history
//! answers for the shard and catch-up reads for the main loop.

use fred::prelude::*;
use fred::types::Value;

use super::Shared;
use crate::bus::redis::codec::{bytes_of, epoch_hex, parse_entry, parse_epoch, u64_of};
use crate::bus::redis::keys;
use crate::bus::redis::scripts::scripts;
use crate::bus::redis::RedisStats;
use crate::bus::{History, Position, Publication};

/// Entries per `XRANGE` page.
const PAGE: u64 = 1000;
/// Most publications in one history answer (the shard asks again for the
/// rest).
const MAX_HISTORY_ITEMS: usize = 10_000;

/// One page of a channel's history.
struct Page {
    epoch: u64,
    seq: u64,
    entries: Vec<Publication>,
    /// Entries the page held before malformed ones were dropped.
    raw_len: usize,
}

async fn read_page(
    shared: &Shared,
    cmd: &Client,
    channel: &str,
    epoch: u64,
    after: u64,
    restart: bool,
    max_bytes: usize,
) -> Result<Page, String> {
    let keys = vec![keys::meta(channel), keys::stream(channel)];
    let args = vec![
        Value::from(shared.fresh_epoch()),
        Value::from(shared.ttl_ms().to_string()),
        Value::from(epoch_hex(epoch)),
        Value::from(after.to_string()),
        Value::from(PAGE.to_string()),
        Value::from(if restart { "1" } else { "0" }),
        Value::from(max_bytes.to_string()),
    ];
    let v = scripts()
        .read
        .run(cmd, keys, args)
        .await
        .map_err(|e| e.to_string())?;
    let Value::Array(parts) = v else {
        return Err("history reply is not an array".into());
    };
    let mut it = parts.into_iter();
    let (Some(e), Some(seq), Some(entries), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return Err("history reply length".into());
    };
    let epoch = bytes_of(e)
        .ok_or_else(|| "history epoch".to_string())
        .and_then(|b| parse_epoch(&b).map_err(|e| e.to_string()))?;
    let seq = u64_of(&seq).ok_or_else(|| "history seq".to_string())?;
    let raw = match entries {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        _ => return Err("history entries".into()),
    };
    let raw_len = raw.len();
    let mut entries = Vec::with_capacity(raw_len);
    for v in raw {
        match parse_entry(v, shared.max_payload()) {
            Ok(p) => entries.push(p),
            Err(e) => {
                RedisStats::bump(&shared.stats.malformed);
                tracing::warn!(channel, error = %e, "malformed history entry in redis skipped");
            }
        }
    }
    Ok(Page {
        epoch,
        seq,
        entries,
        raw_len,
    })
}

/// Answers a history read: what follows `after`, up to the newest
/// publication when the read started and about
/// `RedisOptions::history_page_bytes` of payload (at least one), or `Lost`.
pub(super) async fn read_history(
    shared: &Shared,
    cmd: &Client,
    channel: &str,
    after: Position,
) -> History {
    let mut items: Vec<Publication> = Vec::new();
    let mut bytes = 0;
    let page_bytes = shared.options.history_page_bytes;
    let mut at = after.offset;
    let mut target: Option<u64> = None;
    'pages: loop {
        let left = page_bytes.saturating_sub(bytes).max(1);
        let page = match read_page(shared, cmd, channel, after.epoch, at, false, left).await {
            Ok(p) => p,
            Err(e) if items.is_empty() => return History::Unavailable(e),
            // Keep what was read; the shard asks again for the rest.
            Err(_) => break,
        };
        let current = Position {
            epoch: page.epoch,
            offset: page.seq,
        };
        if page.epoch != after.epoch {
            if items.is_empty() {
                return History::Lost { current };
            }
            break;
        }
        let target = *target.get_or_insert(page.seq);
        if items.is_empty() && at > page.seq {
            return History::Lost { current };
        }
        if at >= target {
            break;
        }
        let before = items.len();
        for p in page.entries {
            if p.offset <= at {
                continue;
            }
            if p.offset != at + 1 || p.offset > target {
                break;
            }
            if !items.is_empty() && bytes + p.payload.len() > page_bytes {
                break 'pages; // the caller reads on as its socket drains
            }
            bytes += p.payload.len();
            at = p.offset;
            items.push(p);
        }
        if items.len() == before {
            // The next publication is gone (trimmed, expired, malformed).
            if items.is_empty() {
                return History::Lost { current };
            }
            break;
        }
        if at >= target || (page.raw_len as u64) < PAGE || items.len() >= MAX_HISTORY_ITEMS {
            break;
        }
    }
    History::Items {
        epoch: after.epoch,
        items,
    }
}

/// What a catch-up read found.
pub(super) struct CatchUp {
    pub(super) epoch: u64,
    /// The newest offset when the read ran.
    pub(super) seq: u64,
    pub(super) items: Vec<Publication>,
    /// Everything up to `seq` was read (else read again).
    pub(super) complete: bool,
}

/// Reads what a channel's subscription missed after (`epoch`, `last`): the
/// rest of that epoch, or the current epoch from its start.
pub(super) async fn catch_up(
    shared: &Shared,
    cmd: &Client,
    channel: &str,
    epoch: u64,
    last: u64,
) -> Result<CatchUp, String> {
    let mut cur_epoch = epoch;
    let mut at = last;
    let mut items = Vec::new();
    let mut target = None;
    loop {
        let page = read_page(shared, cmd, channel, cur_epoch, at, true, 0).await;
        let page = match page {
            Ok(p) => p,
            Err(e) if target.is_none() => return Err(e),
            Err(_) => {
                return Ok(CatchUp {
                    epoch: cur_epoch,
                    seq: target.unwrap_or(at),
                    items,
                    complete: false,
                })
            }
        };
        if page.epoch != cur_epoch {
            if target.is_some() {
                // Changed again between pages: deliver this much, go on.
                return Ok(CatchUp {
                    epoch: cur_epoch,
                    seq: target.unwrap_or(at),
                    items,
                    complete: false,
                });
            }
            cur_epoch = page.epoch;
            at = 0;
        }
        let seq = *target.get_or_insert(page.seq);
        let before = at;
        for p in page.entries {
            if p.offset > at && p.offset <= seq {
                at = p.offset;
                items.push(p);
            }
        }
        // No progress on a full page: everything left is malformed; the
        // caller counts the rest as an unfillable gap.
        let done = at >= seq || (page.raw_len as u64) < PAGE || at == before;
        if done || items.len() >= MAX_HISTORY_ITEMS {
            return Ok(CatchUp {
                epoch: cur_epoch,
                seq,
                items,
                complete: done,
            });
        }
    }
}
