//! Scenarios as pure data: how many connections, what each one subscribes
//! to and publishes. Every process derives connection `i`'s role from the
//! same [`Scenario`], so a worker needs only its index range, and the plan
//! stays small at a million connections.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum Scenario {
    /// `publishers` connections publish `rate` msg/s in total to one channel
    /// that `subscribers` connections receive.
    Fanout {
        subscribers: u64,
        publishers: u64,
        rate: f64,
    },
    /// `rooms` channels of `members` connections; every member subscribes to
    /// its room and publishes `rate` msg/s to it.
    Rooms { rooms: u64, members: u64, rate: f64 },
    /// `users` connections each subscribe to their inbox `inbox.<i>` and
    /// send `rate` msg/s spread over `peers` other users' inboxes.
    Direct { users: u64, rate: f64, peers: u64 },
    /// Connection storm: `connections` handshakes + Connect + Subscribe as
    /// fast as the host allows.
    Connect { connections: u64 },
    /// `connections` idle connections (optionally subscribed).
    Idle { connections: u64, subscribe: bool },
}

/// One publishing stream: a (connection, channel) pair.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamSpec {
    pub id: u64,
    pub channel: String,
    /// Messages per second.
    pub rate: f64,
    /// Offset of the first intended send after the start, ns (spreads
    /// publishers over the period instead of firing them together).
    pub phase_ns: u64,
    /// Connections subscribed to `channel` (deliveries per publication).
    pub subscribers: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Role {
    pub subscribe: Vec<String>,
    pub streams: Vec<StreamSpec>,
}

/// Spreads `i` over `[0, period)` (multiplicative hashing).
fn phase(i: u64, rate: f64) -> u64 {
    if rate <= 0.0 {
        return 0;
    }
    let period = (1e9 / rate) as u64;
    if period == 0 {
        return 0;
    }
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % period
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout { .. } => "fanout",
            Scenario::Rooms { .. } => "rooms",
            Scenario::Direct { .. } => "direct",
            Scenario::Connect { .. } => "connect",
            Scenario::Idle { .. } => "idle",
        }
    }

    pub fn connections(&self) -> u64 {
        match *self {
            Scenario::Fanout {
                subscribers,
                publishers,
                ..
            } => subscribers + publishers,
            Scenario::Rooms { rooms, members, .. } => rooms * members,
            Scenario::Direct { users, .. } => users,
            Scenario::Connect { connections } | Scenario::Idle { connections, .. } => connections,
        }
    }

    /// Whether the scenario publishes (and so has latency to measure).
    pub fn publishes(&self) -> bool {
        matches!(
            self,
            Scenario::Fanout { .. } | Scenario::Rooms { .. } | Scenario::Direct { .. }
        )
    }

    /// Publications per second offered in total.
    pub fn offered_rate(&self) -> f64 {
        match *self {
            Scenario::Fanout { rate, .. } => rate,
            Scenario::Rooms {
                rooms,
                members,
                rate,
            } => (rooms * members) as f64 * rate,
            Scenario::Direct { users, rate, .. } => users as f64 * rate,
            _ => 0.0,
        }
    }

    /// Deliveries per second expected at the offered rate.
    pub fn expected_delivery_rate(&self) -> f64 {
        match *self {
            Scenario::Fanout {
                subscribers, rate, ..
            } => subscribers as f64 * rate,
            Scenario::Rooms { members, .. } => self.offered_rate() * members as f64,
            Scenario::Direct { .. } => self.offered_rate(),
            _ => 0.0,
        }
    }

    pub fn role(&self, i: u64) -> Role {
        match *self {
            Scenario::Fanout {
                subscribers,
                publishers,
                rate,
            } => {
                if i < subscribers {
                    Role {
                        subscribe: vec!["fanout".into()],
                        streams: vec![],
                    }
                } else {
                    let r = rate / publishers.max(1) as f64;
                    Role {
                        subscribe: vec![],
                        streams: vec![StreamSpec {
                            id: i,
                            channel: "fanout".into(),
                            rate: r,
                            phase_ns: phase(i, r),
                            subscribers,
                        }],
                    }
                }
            }
            Scenario::Rooms { members, rate, .. } => {
                let ch = format!("room.{}", i / members.max(1));
                Role {
                    subscribe: vec![ch.clone()],
                    streams: vec![StreamSpec {
                        id: i,
                        channel: ch,
                        rate,
                        phase_ns: phase(i, rate),
                        subscribers: members,
                    }],
                }
            }
            Scenario::Direct { users, rate, peers } => {
                let peers = peers.clamp(1, users.saturating_sub(1).max(1));
                let r = rate / peers as f64;
                let streams = (0..peers)
                    .map(|k| {
                        // Peers i+1, i+1+stride, ... so inboxes get senders
                        // from across the population, not only neighbours.
                        let stride = (users / peers).max(1);
                        let to = (i + 1 + k * stride) % users.max(1);
                        StreamSpec {
                            id: (i << 16) | k,
                            channel: format!("inbox.{to}"),
                            rate: r,
                            phase_ns: phase(i * 65_537 + k, r),
                            subscribers: 1,
                        }
                    })
                    .collect();
                Role {
                    subscribe: vec![format!("inbox.{i}")],
                    streams,
                }
            }
            Scenario::Connect { .. } => Role {
                subscribe: vec![format!("storm.{}", i % 100)],
                streams: vec![],
            },
            Scenario::Idle { subscribe, .. } => Role {
                subscribe: if subscribe {
                    vec![format!("idle.{}", i % 1000)]
                } else {
                    vec![]
                },
                streams: vec![],
            },
        }
    }

    /// Connection index ranges, one per worker process, each at most
    /// `per_worker` long. Fanout publishers get a worker of their own so that
    /// their send schedule does not queue behind thousands of receivers.
    pub fn worker_ranges(&self, per_worker: u64) -> Vec<(u64, u64)> {
        let per_worker = per_worker.max(1);
        let split = |lo: u64, hi: u64, out: &mut Vec<(u64, u64)>| {
            let n = hi - lo;
            if n == 0 {
                return;
            }
            let parts = n.div_ceil(per_worker);
            for k in 0..parts {
                out.push((lo + n * k / parts, lo + n * (k + 1) / parts));
            }
        };
        let mut out = Vec::new();
        match *self {
            Scenario::Fanout {
                subscribers,
                publishers,
                ..
            } => {
                split(0, subscribers, &mut out);
                split(subscribers, subscribers + publishers, &mut out);
            }
            _ => split(0, self.connections(), &mut out),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_roles_and_expectations() {
        let s = Scenario::Fanout {
            subscribers: 10,
            publishers: 2,
            rate: 100.0,
        };
        assert_eq!(s.connections(), 12);
        assert_eq!(s.role(3).subscribe, ["fanout"]);
        let p = s.role(11);
        assert!(p.subscribe.is_empty());
        assert_eq!(p.streams[0].rate, 50.0);
        assert_eq!(p.streams[0].subscribers, 10);
        assert!(p.streams[0].phase_ns < 20_000_000);
        assert_eq!(s.expected_delivery_rate(), 1000.0);
        assert_eq!(s.worker_ranges(4), [(0, 3), (3, 6), (6, 10), (10, 12)]);
    }

    #[test]
    fn direct_streams_have_distinct_ids_and_targets() {
        let s = Scenario::Direct {
            users: 100,
            rate: 4.0,
            peers: 4,
        };
        let r = s.role(7);
        assert_eq!(r.subscribe, ["inbox.7"]);
        let ids: std::collections::HashSet<_> = r.streams.iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), 4);
        assert!(r.streams.iter().all(|s| s.channel != "inbox.7"));
        // Every inbox receives from exactly `peers` streams.
        let mut inbound = std::collections::HashMap::<String, u32>::new();
        for i in 0..100 {
            for st in s.role(i).streams {
                *inbound.entry(st.channel).or_default() += 1;
            }
        }
        assert!(inbound.values().all(|&n| n == 4));
    }

    #[test]
    fn rooms_members_share_a_channel() {
        let s = Scenario::Rooms {
            rooms: 3,
            members: 5,
            rate: 2.0,
        };
        assert_eq!(s.role(4).subscribe, ["room.0"]);
        assert_eq!(s.role(5).subscribe, ["room.1"]);
        assert_eq!(s.expected_delivery_rate(), 150.0);
        assert_eq!(s.worker_ranges(100), [(0, 15)]);
    }
}
