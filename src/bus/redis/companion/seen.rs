//! What this node has seen of each channel: the newest position any of its
//! shards delivered or had acknowledged. The Lua scripts compare it with
//! what Redis holds to detect acknowledged history that Redis lost (see
//! `scripts::ENSURE_EPOCH`, `rolled_back`): a shard that never saw a
//! channel (it opens it, or publishes to it, for the first time) still
//! brings the node's knowledge, so a position seen anywhere on the node is
//! never given again.
//!
//! Shared by the node's companion threads (never by the shards): one short
//! lock per delivered publication or acknowledgement.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::bus::Position;

/// Most channels remembered; beyond that the map starts over (forgetting
/// only weakens detection for channels nobody on the node subscribes to;
/// subscribed ones are recorded again with their next delivery).
const MAX_CHANNELS: usize = 65_536;

#[derive(Default)]
pub struct NodeSeen(Mutex<HashMap<Arc<str>, Position>>);

impl NodeSeen {
    /// Records `p` of `channel`: the newer offset within one epoch; a
    /// different epoch replaces the old one (it is the more recent news).
    pub fn record(&self, channel: &Arc<str>, p: Position) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CHANNELS && !map.contains_key(channel) {
            map.clear();
        }
        let e = map.entry(channel.clone()).or_insert(p);
        if p.epoch != e.epoch || p.offset > e.offset {
            *e = p;
        }
    }

    pub fn get(&self, channel: &str) -> Option<Position> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(channel).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_offset_of_the_latest_epoch() {
        let seen = NodeSeen::default();
        let ch: Arc<str> = Arc::from("c");
        let at = |epoch, offset| Position { epoch, offset };
        assert_eq!(seen.get("c"), None);
        seen.record(&ch, at(1, 5));
        seen.record(&ch, at(1, 3));
        assert_eq!(seen.get("c"), Some(at(1, 5)));
        seen.record(&ch, at(2, 1));
        assert_eq!(seen.get("c"), Some(at(2, 1)));
    }
}
