//! Per-IP admission: concurrent connections and accept rate per address.
//!
//! An "address" here is what one client controls: an IPv4 address, or an
//! IPv6 /64 prefix. One IPv6 host routinely has a whole /64 to pick source
//! addresses from (temporary addresses, RFC 8981; a prefix per host,
//! RFC 8273), so counting each of its 2^64 addresses apart would let one
//! client walk around every per-IP limit. See [`limit_key`].
//!
//! The kernel spreads one address's connections over every shard, so this
//! table is shared. It is touched once when a connection is accepted and
//! once when it ends — never per message — and is striped so that shards
//! accepting from different addresses do not contend.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
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
    /// Keyed by [`limit_key`], never by the raw peer address.
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

    /// The stripe of a [`limit_key`].
    fn stripe(&self, key: IpAddr) -> std::sync::MutexGuard<'_, Stripe> {
        let i = self.hasher.hash_one(key) as usize % STRIPES;
        // A poisoned stripe only means another shard panicked mid-update of
        // plain counters; the data is still usable.
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides on a new connection from `ip` (the peer address as
    /// accepted; counted by its [`limit_key`]). An admitted connection must
    /// be `release`d, with the same `ip`, when it ends.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Verdict {
        if !self.enabled() {
            return Verdict::Admit;
        }
        let (rate, burst, max) = (self.rate, self.burst, self.max_per_ip);
        let key = limit_key(ip);
        let mut stripe = self.stripe(key);
        stripe.since_cleanup += 1;
        if stripe.since_cleanup >= CLEANUP_EVERY {
            stripe.since_cleanup = 0;
            stripe
                .entries
                .retain(|_, e| e.connections > 0 || !e.bucket.is_full(now, rate.max(1), burst));
        }
        let entry = stripe.entries.entry(key).or_insert_with(|| Entry {
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
        let key = limit_key(ip);
        let mut stripe = self.stripe(key);
        if let Some(e) = stripe.entries.get_mut(&key) {
            e.connections = e.connections.saturating_sub(1);
        }
    }
}

/// The address a per-IP limit counts `ip` against:
/// - an IPv4 address, as is;
/// - an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2, what
///   a dual-stack socket reports for an IPv4 peer): its IPv4 address, so
///   the same client counts once whichever socket family accepted it (and
///   IPv4 clients are not lumped together in `::ffff:0:0/64`);
/// - any other IPv6 address: its /64 prefix (the interface identifier, the
///   low 64 bits, zeroed; RFC 4291 §2.5.1), the smallest block one client
///   is normally given. End sites are often given more (a /56 or /48,
///   RFC 6177); those still count as one address per /64.
///
/// The deprecated IPv4-compatible form (`::a.b.c.d`) is not mapped: `::1`
/// is the IPv6 loopback, not `0.0.0.1`.
fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
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

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv6_slash_64_is_one_address() {
        let a = Admission::new(2, 0, 1);
        let t = Instant::now();
        assert_eq!(a.admit(v6("2001:db8:1:2::1"), t), Verdict::Admit);
        assert_eq!(a.admit(v6("2001:db8:1:2:aaaa::7"), t), Verdict::Admit);
        assert_eq!(
            a.admit(v6("2001:db8:1:2:ffff:ffff:ffff:ffff"), t),
            Verdict::TooManyConnections { limit: 2 },
            "a third address of the same /64"
        );
        assert_eq!(
            a.admit(v6("2001:db8:1:3::1"), t),
            Verdict::Admit,
            "the neighbouring /64 is another client"
        );
        // Any address of the prefix releases one of the prefix's slots.
        a.release(v6("2001:db8:1:2::1"));
        assert_eq!(a.admit(v6("2001:db8:1:2::99"), t), Verdict::Admit);
    }

    #[test]
    fn an_ipv6_slash_64_shares_one_accept_rate() {
        let a = Admission::new(0, 1, 2);
        let t = Instant::now();
        assert_eq!(a.admit(v6("2001:db8::1"), t), Verdict::Admit);
        assert_eq!(a.admit(v6("2001:db8::2"), t), Verdict::Admit);
        assert_eq!(
            a.admit(v6("2001:db8::3"), t),
            Verdict::TooFast {
                retry_after_secs: 1
            }
        );
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_their_ipv4_address() {
        let a = Admission::new(2, 0, 1);
        let t = Instant::now();
        assert_eq!(a.admit(v6("::ffff:10.0.0.1"), t), Verdict::Admit);
        assert_eq!(a.admit(ip(1), t), Verdict::Admit);
        assert_eq!(
            a.admit(v6("::ffff:10.0.0.1"), t),
            Verdict::TooManyConnections { limit: 2 }
        );
        assert_eq!(
            a.admit(v6("::ffff:10.0.0.2"), t),
            Verdict::Admit,
            "not the /64 ::ffff:0:0/64, which holds every IPv4 address"
        );
        a.release(v6("::ffff:10.0.0.1"));
        assert_eq!(a.admit(ip(1), t), Verdict::Admit);
    }

    #[test]
    fn limit_keys() {
        assert_eq!(limit_key(ip(9)), ip(9));
        assert_eq!(limit_key(v6("::ffff:10.0.0.9")), ip(9));
        assert_eq!(limit_key(v6("2001:db8:a:b:c:d:e:f")), v6("2001:db8:a:b::"));
        assert_eq!(
            limit_key(v6("::1")),
            v6("::"),
            "not IPv4-compatible 0.0.0.1"
        );
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
