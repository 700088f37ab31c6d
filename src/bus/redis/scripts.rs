//! The Lua scripts that make each channel operation atomic in Redis.
//!
//! Numbers in Redis Lua are doubles: offsets and microsecond timestamps
//! stay below 2^53 and are exact; epochs (up to 63 bits) are only ever
//! handled as 16-digit hex strings, and every number handed back to Redis
//! goes through `string.format('%d')` (plain `..` would print `1e+15`).

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use fred::prelude::*;
use fred::types::Value;

/// Shared prelude: the channel's epoch, creating a new one (and dropping
/// any stream left from an older life) when the meta hash is gone.
/// KEYS[1] = meta, KEYS[2] = stream; `fresh` = a new epoch to use.
///
/// `rolled_back(epoch, seen_epoch, seen_seq)`: a node has seen (delivered
/// or acknowledged) offset `seen_seq` of `seen_epoch`, and Redis now holds
/// fewer publications of that epoch: Redis lost acknowledged history (it
/// came back from an older snapshot, lost an AOF tail, or failed over to a
/// lagging replica). The next offsets were already given to publications
/// clients may have seen, so the channel must continue under a new epoch:
/// a position is never given to two publications.
const ENSURE_EPOCH: &str = r#"
local function new_epoch(fresh, ttl_ms)
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', fresh, 'seq', '0')
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  return fresh
end
local function ensure_epoch(fresh, ttl_ms)
  local epoch = redis.call('HGET', KEYS[1], 'epoch')
  if not epoch then
    epoch = new_epoch(fresh, ttl_ms)
  end
  return epoch
end
local function rolled_back(epoch, seen_epoch, seen_seq)
  if epoch ~= seen_epoch then return false end
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
  return seq < tonumber(seen_seq)
end
"#;

/// Publish. KEYS: meta, stream, idempotency key. ARGV: payload, fresh
/// epoch, history size, history ttl ms, idempotency ttl ms, ingress_us,
/// Pub/Sub channel, deadline_us (0 = none), then two (epoch hex, offset)
/// pairs the publishing node has seen on the channel ('' and '0' if none):
/// if Redis holds less of either's epoch, the channel gets a new epoch first
/// (see `rolled_back`).
/// Returns `{epoch_hex, offset, published_us, duplicate(0|1)}`.
const PUBLISH_BODY: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local deadline = tonumber(ARGV[8])
if deadline > 0 and now > deadline then
  return redis.error_reply('SCDEADLINE publish reached Redis after its deadline')
end
local prev = redis.call('GET', KEYS[3])
if prev then
  local sep = string.find(prev, ':', 1, true)
  if sep then
    -- A write even for a duplicate: a WAIT after it on this connection
    -- (redis.wait_replicas) then covers the original write, which the
    -- replication stream carries before it. It keeps the key's expiry: a
    -- key is remembered for the TTL after the publish that stored it, on
    -- both buses (the bus contract tests).
    -- (At least 1 ms, so a key in its last millisecond is still written.)
    local left = redis.call('PTTL', KEYS[3])
    if left >= 0 then
      redis.call('PEXPIRE', KEYS[3], math.max(left, 1))
    end
    return {string.sub(prev, 1, sep - 1), tonumber(string.sub(prev, sep + 1)), 0, 1}
  end
end
local epoch = ensure_epoch(ARGV[2], ARGV[4])
if rolled_back(epoch, ARGV[9], ARGV[10]) or rolled_back(epoch, ARGV[11], ARGV[12]) then
  epoch = new_epoch(ARGV[2], ARGV[4])
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local id = string.format('%d-1', seq)
local now_s = string.format('%d', now)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id, 'p', ARGV[1], 't', now_s, 'i', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], epoch .. ':' .. string.format('%d', seq), 'PX', ARGV[5])
local bin = string.gsub(epoch, '..', function(h) return string.char(tonumber(h, 16)) end)
redis.call('PUBLISH', ARGV[7], '\1' .. bin .. struct.pack('>I8>I8>I8', seq, now, tonumber(ARGV[6])) .. ARGV[1])
return {epoch, seq, now, 0}
"#;

/// Open (and read position). KEYS: meta, stream. ARGV: fresh epoch,
/// history ttl ms, and the (epoch hex, offset) the node has seen of the
/// channel ('' and '0' if none; see `rolled_back`). Returns
/// `{epoch_hex, seq}`.
const OPEN_BODY: &str = r#"
local epoch = ensure_epoch(ARGV[1], ARGV[2])
if rolled_back(epoch, ARGV[3], ARGV[4]) then
  epoch = new_epoch(ARGV[1], ARGV[2])
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
return {epoch, seq}
"#;

/// Read history. KEYS: meta, stream. ARGV: fresh epoch, history ttl ms,
/// the reader's epoch hex, the reader's offset, page size, and `restart`
/// ('1': a node's catch-up: if the epoch differs, read the current epoch
/// from offset 1; '0': a client's recovery: return no entries). Returns
/// `{epoch_hex, seq, entries}`, where entries start at the first ID at or
/// after the requested offset + 1. A catch-up's position is one the node
/// saw in Redis, so one that Redis no longer reaches means Redis lost
/// acknowledged history: the channel gets a new epoch (`rolled_back`). A
/// client's position is not trusted with that: it could be made up.
/// ARGV[7]: most payload bytes to return (0 = no limit; at least one entry
/// is returned), so that a client's catch-up is sent a page of about its
/// outbound budget rather than up to `page size` large entries.
const READ_BODY: &str = r#"
local epoch = ensure_epoch(ARGV[1], ARGV[2])
if ARGV[6] == '1' and rolled_back(epoch, ARGV[3], ARGV[4]) then
  epoch = new_epoch(ARGV[1], ARGV[2])
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local from = tonumber(ARGV[4]) + 1
if epoch ~= ARGV[3] then
  if ARGV[6] ~= '1' then
    return {epoch, seq, {}}
  end
  from = 1
end
if from > seq then
  return {epoch, seq, {}}
end
local count, limit = tonumber(ARGV[5]), tonumber(ARGV[7])
local start = string.format('%d-0', from)
if limit <= 0 then
  return {epoch, seq, redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', count)}
end
-- Read in small chunks so that a page of a few large entries does not
-- copy a thousand of them.
local entries, bytes = {}, 0
while #entries < count do
  local chunk = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', 16)
  for _, e in ipairs(chunk) do
    local size = 0
    local f = e[2]
    for j = 1, #f, 2 do
      if f[j] == 'p' then size = #f[j + 1] end
    end
    if #entries > 0 and bytes + size > limit then
      return {epoch, seq, entries}
    end
    bytes = bytes + size
    entries[#entries + 1] = e
    start = '(' .. e[1]
  end
  if #chunk < 16 then break end
end
return {epoch, seq, entries}
"#;

/// Presence. KEYS: entries zset (member `<len(instance)>|<instance><user>`,
/// score = expiry in Redis ms), users hash (user → live entries). ARGV:
/// op (`join`, `leave`, `refresh`, `members`), entry ttl ms, Pub/Sub
/// channel, instance, users... Expired entries (a dead node's) are swept
/// first. Joins and leaves that change a user's overall presence are
/// announced on the channel's Pub/Sub as `02 | joined(0|1) | user`.
/// Returns the sorted member list for `members`, else the number of
/// announcements.
const PRESENCE_BODY: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, ttl, pch, inst = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local announced = 0
local function announce(user, joined)
  redis.call('PUBLISH', pch, '\2' .. joined .. user)
  announced = announced + 1
end
local function drop(user)
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
    redis.call('HDEL', KEYS[2], user)
    announce(user, '\0')
  end
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
for _, m in ipairs(expired) do
  redis.call('ZREM', KEYS[1], m)
  local n, rest = string.match(m, '^(%d+)|(.*)$')
  if n then drop(string.sub(rest, tonumber(n) + 1)) end
end
local prefix = string.format('%d|', #inst) .. inst
local expiry = string.format('%d', now + ttl)
for i = 5, #ARGV do
  local user = ARGV[i]
  if op == 'join' or op == 'refresh' then
    if redis.call('ZADD', KEYS[1], expiry, prefix .. user) == 1 then
      if redis.call('HINCRBY', KEYS[2], user, 1) == 1 then announce(user, '\1') end
    end
  elseif op == 'leave' then
    if redis.call('ZREM', KEYS[1], prefix .. user) == 1 then drop(user) end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl * 4)
  redis.call('PEXPIRE', KEYS[2], ttl * 4)
else
  redis.call('DEL', KEYS[2])
end
if op == 'members' then
  local users = redis.call('HKEYS', KEYS[2])
  table.sort(users)
  return users
end
return announced
"#;

/// Shared by the subscription count scripts. A channel `C` has a hash
/// `sc:{C}:n` (instance → count) and a sorted set `sc:{C}:nz` (instance
/// scored by the expiry of its count, Redis ms); `KEYS[1]` is the index of
/// counted channels (`keys::COUNTED_CHANNELS`, channel scored by the latest
/// expiry of its counts). `now`/`now_s`: Redis' clock in ms.
///
/// `sweep` drops a channel's expired counts (a dead node's: a live one
/// refreshes its counts every third of their life). `settle` keeps the
/// index exact: a channel's score is the latest expiry of its counts, so
/// sweeping the index by score drops exactly the channels none of whose
/// counts is live; a channel with no count left loses its keys and its
/// index entry. A channel's keys expire after twice a count's life, so a
/// dead node's counts leave nothing behind even if nobody touches the
/// channel again; their index entries go with the next count update or
/// prefix read of any node (both sweep the index by score first).
const COUNT_HELPERS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = string.format('%d', now)
local function sweep(n, nz)
  local dead = redis.call('ZRANGEBYSCORE', nz, '-inf', now_s)
  if #dead > 0 then
    redis.call('ZREMRANGEBYSCORE', nz, '-inf', now_s)
    for _, inst in ipairs(dead) do redis.call('HDEL', n, inst) end
  end
end
local function forget_if_empty(n, nz, channel)
  if redis.call('EXISTS', nz) == 0 then
    redis.call('DEL', n)
    redis.call('ZREM', KEYS[1], channel)
    return true
  end
  return false
end
local function settle(n, nz, channel, keep_ms)
  if forget_if_empty(n, nz, channel) then return end
  local last = redis.call('ZRANGE', nz, -1, -1, 'WITHSCORES')
  redis.call('ZADD', KEYS[1], last[2], channel)
  redis.call('PEXPIRE', n, keep_ms)
  redis.call('PEXPIRE', nz, keep_ms)
end
"#;

/// Subscription counts of one instance (a shard's companion). KEYS: the
/// index, then each channel's counts hash and expiries set. ARGV: count
/// ttl ms, instance, then each channel's name and count (decimal; 0 = none
/// left). A count > 0 is set (or refreshed) with expiry now + ttl; 0
/// removes the instance's count. Several channels in one call are the
/// heartbeat's refresh; their keys are in different hash slots (see
/// `keys::COUNTED_CHANNELS`). Returns 0.
const COUNT_BODY: &str = r#"
local ttl, inst = tonumber(ARGV[1]), ARGV[2]
local expiry = string.format('%d', now + ttl)
local keep = string.format('%d', ttl * 2)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_s)
for i = 1, math.floor((#ARGV - 2) / 2) do
  local n, nz, channel = KEYS[2 * i], KEYS[2 * i + 1], ARGV[2 * i + 1]
  local count = tonumber(ARGV[2 * i + 2]) or 0
  sweep(n, nz)
  if count > 0 then
    redis.call('HSET', n, inst, ARGV[2 * i + 2])
    redis.call('ZADD', nz, expiry, inst)
  else
    redis.call('HDEL', n, inst)
    redis.call('ZREM', nz, inst)
  end
  settle(n, nz, channel, keep)
end
return 0
"#;

/// Reads subscription counts, summing the live counts of every instance
/// (expired ones are swept out first). KEYS: the index, and for `one` the
/// channel's counts hash and expiries set. ARGV: op (`one` or `prefix`),
/// the channel or the prefix. `one` returns the channel's total (0 if
/// none); `prefix` returns a flat array `name, total, ...` of every
/// indexed channel starting with the prefix whose total is above 0,
/// unsorted. A prefix read walks the whole index (Pusher's channel list
/// has no paging either) and reads keys it cannot declare, in other hash
/// slots (see `keys::COUNTED_CHANNELS`); it builds them as
/// `keys::counts`/`keys::count_expiries` do. Counts are read as Redis holds
/// them: anything that is not a whole number from 1 to 2^53 counts 0.
const COUNTS_READ_BODY: &str = r#"
local function total(n, nz, channel)
  sweep(n, nz)
  local sum = 0
  for _, inst in ipairs(redis.call('ZRANGE', nz, 0, -1)) do
    local c = tonumber(redis.call('HGET', n, inst))
    if c and c >= 1 and c <= 2^53 then sum = sum + math.floor(c) end
  end
  forget_if_empty(n, nz, channel)
  return sum
end
local op, arg = ARGV[1], ARGV[2]
if op == 'one' then
  return total(KEYS[2], KEYS[3], arg)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_s)
local out = {}
for _, c in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_s, '+inf')) do
  if string.sub(c, 1, #arg) == arg then
    local sum = total('sc:{' .. c .. '}:n', 'sc:{' .. c .. '}:nz', c)
    if sum > 0 then
      out[#out + 1] = c
      out[#out + 1] = sum
    end
  end
end
return out
"#;

/// A script with its SHA-1, run by `EVALSHA` with a fallback to `EVAL`
/// (which also caches it) when Redis answers `NOSCRIPT` (first use, or
/// after a restart).
pub struct Script {
    pub source: String,
    pub sha: String,
}

impl Script {
    fn new(body: &str) -> Script {
        let source = format!("{ENSURE_EPOCH}{body}");
        let sha = sha1_smol::Sha1::from(source.as_bytes())
            .digest()
            .to_string();
        Script { source, sha }
    }

    /// Runs the script, loading it on `NOSCRIPT`.
    pub async fn run(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, Error> {
        match client
            .evalsha::<Value, _, _, _>(self.sha.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(e) if is_noscript(&e) => client.eval(self.source.as_str(), keys, args).await,
            other => other,
        }
    }
}

pub fn is_noscript(e: &Error) -> bool {
    e.details().starts_with("NOSCRIPT")
}

pub struct Scripts {
    pub publish: Script,
    pub open: Script,
    pub read: Script,
    pub presence: Script,
    pub count: Script,
    pub counts_read: Script,
}

pub fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        publish: Script::new(PUBLISH_BODY),
        open: Script::new(OPEN_BODY),
        read: Script::new(READ_BODY),
        presence: Script::new(PRESENCE_BODY),
        count: Script::new(&format!("{COUNT_HELPERS}{COUNT_BODY}")),
        counts_read: Script::new(&format!("{COUNT_HELPERS}{COUNTS_READ_BODY}")),
    })
}
