//! Per-IP admission: concurrent connections and accept rate per address.
//!
//! The kernel spreads one address's connections over every shard, so this
//! table is shared. It is touched once when a connection is accepted and
//! once when it ends — never per message — and is striped so that shards
//! accepting from different addresses do not contend.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use super::rate::TokenBucket;

const STRIPES: usize = 64;
/// Every this many admissions a stripe forgets idle addresses.
const CLEANUP_EVERY: u32 = 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Too many concurrent connections from this address.
    TooManyConnections {
        limit: u32,
    },
    /// Connecting too fast; retry after this many seconds.
    TooFast {
        retry_after_secs: u32,
    },
}

struct Entry {
    connections: u32,
    bucket: TokenBucket,
}

#[derive(Default)]
struct Stripe {
    entries: HashMap<IpAddr, Entry>,
    since_cleanup: u32,
}

pub struct Admission {
    max_per_ip: u32,
    rate: u32,
    burst: u32,
    hasher: RandomState,
    stripes: Box<[Mutex<Stripe>]>,
}

impl Admission {
    /// `0` disables the respective limit; with both off nothing is tracked.
    pub fn new(max_per_ip: u32, rate: u32, burst: u32) -> Self {
        Admission {
            max_per_ip,
            rate,
            burst,
            hasher: RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    fn enabled(&self) -> bool {
        self.max_per_ip > 0 || self.rate > 0
    }

    fn stripe(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, Stripe> {
        let i = self.hasher.hash_one(ip) as usize % STRIPES;
        // A poisoned stripe only means another shard panicked mid-update of
        // plain counters; the data is still usable.
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides on a new connection from `ip`. An admitted connection must
    /// be `release`d when it ends.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Verdict {
        if !self.enabled() {
            return Verdict::Admit;
        }
        let (rate, burst, max) = (self.rate, self.burst, self.max_per_ip);
        let mut stripe = self.stripe(ip);
        stripe.since_cleanup += 1;
        if stripe.since_cleanup >= CLEANUP_EVERY {
            stripe.since_cleanup = 0;
            stripe
                .entries
                .retain(|_, e| e.connections > 0 || !e.bucket.is_full(now, rate.max(1), burst));
        }
        let entry = stripe.entries.entry(ip).or_insert_with(|| Entry {
            connections: 0,
            bucket: TokenBucket::new(burst, now),
        });
        if max > 0 && entry.connections >= max {
            return Verdict::TooManyConnections { limit: max };
        }
        if rate > 0 && !entry.bucket.take(now, rate, burst) {
            return Verdict::TooFast {
                retry_after_secs: entry.bucket.retry_after_secs(rate),
            };
        }
        entry.connections += 1;
        Verdict::Admit
    }

    /// An admitted connection from `ip` ended.
    pub fn release(&self, ip: IpAddr) {
        if !self.enabled() {
            return;
        }
        let mut stripe = self.stripe(ip);
        if let Some(e) = stripe.entries.get_mut(&ip) {
            e.connections = e.connections.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn concurrent_limit_counts_releases() {
        let a = Admission::new(2, 0, 1);
        let t = Instant::now();
        assert_eq!(a.admit(ip(1), t), Verdict::Admit);
        assert_eq!(a.admit(ip(1), t), Verdict::Admit);
        assert_eq!(a.admit(ip(1), t), Verdict::TooManyConnections { limit: 2 });
        assert_eq!(
            a.admit(ip(2), t),
            Verdict::Admit,
            "other addresses unaffected"
        );
        a.release(ip(1));
        assert_eq!(a.admit(ip(1), t), Verdict::Admit);
    }

    #[test]
    fn accept_rate_says_when_to_retry() {
        let a = Admission::new(0, 1, 2);
        let t = Instant::now();
        assert_eq!(a.admit(ip(1), t), Verdict::Admit);
        assert_eq!(a.admit(ip(1), t), Verdict::Admit);
        assert_eq!(
            a.admit(ip(1), t),
            Verdict::TooFast {
                retry_after_secs: 1
            }
        );
        assert_eq!(a.admit(ip(1), t + Duration::from_secs(1)), Verdict::Admit);
    }

    #[test]
    fn disabled_tracks_nothing() {
        let a = Admission::new(0, 0, 1);
        for _ in 0..10 {
            assert_eq!(a.admit(ip(1), Instant::now()), Verdict::Admit);
        }
        assert!(a
            .stripes
            .iter()
            .all(|s| s.lock().unwrap().entries.is_empty()));
    }
}
