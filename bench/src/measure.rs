//! Client-side measurement: latency from the *intended* send time (so a
//! stalled publisher or a stalled server shows up as latency instead of
//! silently lowering the offered load — no coordinated omission), delivery
//! and loss accounting, and merging across worker processes.

use std::collections::HashMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::payload::Stamp;

/// Largest latency the histogram holds, µs (larger values are clamped).
const MAX_LATENCY_US: u64 = 120_000_000;

/// The measured interval on the [`crate::clock::now_ns`] scale. Publications
/// whose intended send time lies in `[from_ns, to_ns)` are measured; those
/// before are warm-up and ignored (but still sent and delivered).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Window {
    pub from_ns: u64,
    pub to_ns: u64,
}

impl Window {
    pub fn contains(&self, ns: u64) -> bool {
        ns >= self.from_ns && ns < self.to_ns
    }
}

/// Per connection: the last sequence number seen on each stream. Streams
/// are FIFO on every server we test, so a sequence number at or below the
/// last one is a duplicate or a reordering — never counted as a delivery.
#[derive(Default)]
pub struct StreamTracker {
    last: HashMap<u64, u64>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    OutOfOrder,
}

impl StreamTracker {
    pub fn observe(&mut self, stream: u64, seq: u64) -> Seen {
        match self.last.get_mut(&stream) {
            Some(last) if seq <= *last => Seen::OutOfOrder,
            Some(last) => {
                *last = seq;
                Seen::New
            }
            None => {
                self.last.insert(stream, seq);
                Seen::New
            }
        }
    }
}

/// What one worker process measured; also the merged total.
pub struct Recorder {
    pub window: Window,
    /// Latency intended send → receive, µs, of measured deliveries.
    pub latency: Histogram<u64>,
    /// Connection setup time (TCP connect → subscribed), µs.
    pub setup: Histogram<u64>,
    /// How late the generator actually sent measured publications
    /// (actual send − intended), µs: the generator's share of `latency`.
    pub send_lag: Histogram<u64>,
    /// Publish → acknowledgement (or error) at the publisher, intended send
    /// → answer, µs, of measured publications (protocols with acks).
    pub ack: Histogram<u64>,
    pub counts: Counts,
}

/// Plain counters, summed across workers.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Connections that completed setup.
    pub connections: u64,
    /// Connections that failed setup.
    pub setup_errors: u64,
    /// Publications sent whose intended time is in the window.
    pub sent: u64,
    /// Publications sent in total, warm-up included.
    pub sent_total: u64,
    /// Publications due in the window that the generator never sent (it
    /// fell behind its schedule by more than the grace period).
    pub unsent: u64,
    /// Deliveries the measured publications should cause (sent × the
    /// channel's subscribers).
    pub expected: u64,
    /// Measured publications received (each counted once per receiver).
    pub received: u64,
    /// Received with a sequence number at or below one already seen.
    pub out_of_order: u64,
    /// Payloads that were not ours.
    pub foreign: u64,
    /// Deliveries / WebSocket frames received while the window was open
    /// (by receive time): the denominator for server CPU per message.
    pub window_msgs: u64,
    pub window_frames: u64,
    /// Bytes those frames took on the wire: WebSocket payload as received
    /// (compressed, flag byte included) plus the server's frame header
    /// (unmasked: 2, 4 or 10 bytes, see [`ws_frame_bytes`]).
    #[serde(default)]
    pub window_wire_bytes: u64,
    /// Their content after decompression (native: FlatBuffers frame bytes;
    /// other protocols: the message as received).
    #[serde(default)]
    pub window_content_bytes: u64,
    /// Publish acknowledgements (protocols that have them).
    pub acks: u64,
    /// Error replies from the server.
    pub errors: u64,
    /// Connections the server closed (or that failed) during the run.
    pub closed: u64,
}

impl Counts {
    /// Expected deliveries that never arrived.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    pub fn add(&mut self, o: &Counts) {
        self.connections += o.connections;
        self.setup_errors += o.setup_errors;
        self.sent += o.sent;
        self.sent_total += o.sent_total;
        self.unsent += o.unsent;
        self.expected += o.expected;
        self.received += o.received;
        self.out_of_order += o.out_of_order;
        self.foreign += o.foreign;
        self.window_msgs += o.window_msgs;
        self.window_frames += o.window_frames;
        self.window_wire_bytes += o.window_wire_bytes;
        self.window_content_bytes += o.window_content_bytes;
        self.acks += o.acks;
        self.errors += o.errors;
        self.closed += o.closed;
    }
}

/// Bytes a server-to-client WebSocket frame with a `payload_len`-byte
/// payload takes: the payload plus the header (unmasked; 7-bit, 16-bit or
/// 64-bit length). Assumes one frame per message, which is how shardcast,
/// the baseline and NATS send.
pub fn ws_frame_bytes(payload_len: usize) -> u64 {
    let header = match payload_len {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    };
    payload_len as u64 + header
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

impl Recorder {
    pub fn new(window: Window) -> Self {
        Self {
            window,
            latency: new_histogram(),
            setup: new_histogram(),
            send_lag: new_histogram(),
            ack: new_histogram(),
            counts: Counts::default(),
        }
    }

    /// One WebSocket message carrying deliveries arrived at `recv_ns`:
    /// `payload_len` bytes as received, `content_len` after decompression.
    pub fn on_frame(&mut self, recv_ns: u64, payload_len: usize, content_len: usize) {
        if self.window.contains(recv_ns) {
            self.counts.window_frames += 1;
            self.counts.window_wire_bytes += ws_frame_bytes(payload_len);
            self.counts.window_content_bytes += content_len as u64;
        }
    }

    /// One publication payload arrived at `recv_ns` on a connection whose
    /// streams `tracker` follows.
    pub fn on_delivery(
        &mut self,
        payload: Option<Stamp>,
        recv_ns: u64,
        tracker: &mut StreamTracker,
    ) {
        if self.window.contains(recv_ns) {
            self.counts.window_msgs += 1;
        }
        let Some(s) = payload else {
            self.counts.foreign += 1;
            return;
        };
        if tracker.observe(s.stream, s.seq) == Seen::OutOfOrder {
            self.counts.out_of_order += 1;
            return;
        }
        if self.window.contains(s.intended_ns) {
            self.counts.received += 1;
            let us = (recv_ns.saturating_sub(s.intended_ns) / 1000).clamp(1, MAX_LATENCY_US);
            self.latency.record(us).expect("clamped into range");
        }
    }

    /// A publication with intended time `intended_ns` was sent at
    /// `sent_ns` on a channel with `subscribers` receivers.
    pub fn on_sent(&mut self, intended_ns: u64, sent_ns: u64, subscribers: u64) {
        self.counts.sent_total += 1;
        if self.window.contains(intended_ns) {
            self.counts.sent += 1;
            self.counts.expected += subscribers;
            let lag = (sent_ns.saturating_sub(intended_ns) / 1000).clamp(1, MAX_LATENCY_US);
            self.send_lag.record(lag).expect("clamped into range");
        }
    }

    /// The answer (ack or error) to a publication intended at `intended_ns`
    /// arrived at `recv_ns`.
    pub fn on_answer(&mut self, intended_ns: u64, recv_ns: u64) {
        if self.window.contains(intended_ns) {
            let us = (recv_ns.saturating_sub(intended_ns) / 1000).clamp(1, MAX_LATENCY_US);
            self.ack.record(us).expect("clamped into range");
        }
    }

    /// A connection's setup took `us` microseconds.
    pub fn on_setup(&mut self, us: u64) {
        self.counts.connections += 1;
        let _ = self.setup.record(us.clamp(1, MAX_LATENCY_US));
    }

    pub fn to_wire(&self) -> RecorderWire {
        RecorderWire {
            window: self.window,
            latency: hist_to_pairs(&self.latency),
            setup: hist_to_pairs(&self.setup),
            send_lag: hist_to_pairs(&self.send_lag),
            ack: hist_to_pairs(&self.ack),
            counts: self.counts,
        }
    }

    pub fn merge(&mut self, w: &RecorderWire) {
        add_pairs(&mut self.latency, &w.latency);
        add_pairs(&mut self.setup, &w.setup);
        add_pairs(&mut self.send_lag, &w.send_lag);
        add_pairs(&mut self.ack, &w.ack);
        self.counts.add(&w.counts);
    }
}

/// A [`Recorder`] as sent from a worker to the coordinator (JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecorderWire {
    pub window: Window,
    pub latency: Vec<(u64, u64)>,
    pub setup: Vec<(u64, u64)>,
    pub send_lag: Vec<(u64, u64)>,
    #[serde(default)]
    pub ack: Vec<(u64, u64)>,
    pub counts: Counts,
}

fn hist_to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, n) in pairs {
        let _ = h.record_n(v.clamp(1, MAX_LATENCY_US), n);
    }
}

/// The percentile set every report shows, in µs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p95: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: h.len(),
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p95: h.value_at_quantile(0.95),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
        mean: h.mean(),
    }
}

/// The percentile distribution (quantile, µs) for plots, up to the max.
pub fn distribution(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut pts: Vec<(f64, u64)> = h
        .iter_quantiles(4)
        .map(|v| {
            (
                v.quantile_iterated_to(),
                h.highest_equivalent(v.value_iterated_to()),
            )
        })
        .collect();
    pts.dedup_by(|a, b| a.0 == b.0);
    pts
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn stamp(stream: u64, seq: u64, intended_ns: u64) -> Option<Stamp> {
        Some(Stamp {
            stream,
            seq,
            intended_ns,
        })
    }

    fn rec() -> Recorder {
        Recorder::new(Window {
            from_ns: 1_000 * MS,
            to_ns: 2_000 * MS,
        })
    }

    #[test]
    fn latency_is_measured_from_the_intended_time() {
        let mut r = rec();
        let mut t = StreamTracker::default();
        // Meant for t=1100 ms, actually sent late and received at 1150 ms:
        // the whole 50 ms counts, not just the time on the wire.
        r.on_delivery(stamp(1, 0, 1_100 * MS), 1_150 * MS, &mut t);
        let p = percentiles(&r.latency);
        assert_eq!(p.count, 1);
        assert!((49_950..=50_050).contains(&p.p50), "{p:?}");
    }

    #[test]
    fn warm_up_and_late_intents_are_not_measured() {
        let mut r = rec();
        let mut t = StreamTracker::default();
        r.on_delivery(stamp(1, 0, 900 * MS), 1_001 * MS, &mut t); // warm-up
        r.on_delivery(stamp(1, 1, 2_000 * MS), 2_001 * MS, &mut t); // after window
        assert_eq!(r.counts.received, 0);
        assert!(r.latency.is_empty());
        // Both arrived inside the window by receive time: they count towards
        // the per-message CPU denominator.
        assert_eq!(r.counts.window_msgs, 1);
    }

    #[test]
    fn losses_are_expected_minus_unique_deliveries() {
        let mut pubr = rec();
        // One stream, 5 measured publications to a channel of 3 subscribers.
        for seq in 0..5 {
            pubr.on_sent(1_100 * MS + seq, 1_102 * MS, 3);
        }
        pubr.on_sent(500 * MS, 500 * MS, 3); // warm-up: not expected
        assert_eq!(pubr.counts.expected, 15);
        assert_eq!(pubr.counts.sent, 5);
        assert_eq!(pubr.counts.sent_total, 6);
        // Sent ~2 ms late: the lag is recorded for measured sends only.
        assert_eq!(pubr.send_lag.len(), 5);
        assert!((1_990..=2_010).contains(&percentiles(&pubr.send_lag).p50));

        let mut sub = rec();
        for receiver in 0..3 {
            let mut t = StreamTracker::default();
            for seq in 0..5 {
                // Receiver 2 misses seq 3; receiver 1 gets seq 1 twice.
                if receiver == 2 && seq == 3 {
                    continue;
                }
                sub.on_delivery(stamp(7, seq, 1_100 * MS + seq), 1_200 * MS, &mut t);
                if receiver == 1 && seq == 1 {
                    sub.on_delivery(stamp(7, seq, 1_100 * MS + seq), 1_200 * MS, &mut t);
                }
            }
        }
        let mut total = rec();
        total.merge(&pubr.to_wire());
        total.merge(&sub.to_wire());
        assert_eq!(total.counts.received, 14);
        assert_eq!(total.counts.out_of_order, 1);
        assert_eq!(total.counts.lost(), 1);
        assert_eq!(total.latency.len(), 14);
    }

    #[test]
    fn wire_bytes_count_frames_in_the_window_with_their_header() {
        assert_eq!(ws_frame_bytes(0), 2);
        assert_eq!(ws_frame_bytes(125), 127);
        assert_eq!(ws_frame_bytes(126), 130);
        assert_eq!(ws_frame_bytes(65_535), 65_539);
        assert_eq!(ws_frame_bytes(65_536), 65_546);
        let mut r = rec();
        r.on_frame(1_500 * MS, 100, 900); // compressed 900 → 100
        r.on_frame(1_600 * MS, 300, 300);
        r.on_frame(2_500 * MS, 1_000, 1_000); // after the window
        let mut other = rec();
        other.on_frame(1_700 * MS, 70_000, 70_000);
        r.merge(&other.to_wire());
        assert_eq!(r.counts.window_frames, 3);
        assert_eq!(r.counts.window_wire_bytes, 102 + 304 + 70_010);
        assert_eq!(r.counts.window_content_bytes, 900 + 300 + 70_000);
    }

    #[test]
    fn foreign_payloads_are_counted_not_measured() {
        let mut r = rec();
        let mut t = StreamTracker::default();
        r.on_delivery(None, 1_500 * MS, &mut t);
        assert_eq!(r.counts.foreign, 1);
        assert_eq!(r.counts.received, 0);
    }

    #[test]
    fn merge_preserves_the_distribution() {
        let mut a = rec();
        let mut b = rec();
        let mut t = StreamTracker::default();
        for i in 0..100u64 {
            let r = if i % 2 == 0 { &mut a } else { &mut b };
            r.on_delivery(
                stamp(1, i, 1_100 * MS),
                1_100 * MS + (i + 1) * 1_000,
                &mut t,
            );
        }
        let json = serde_json::to_string(&b.to_wire()).unwrap();
        a.merge(&serde_json::from_str(&json).unwrap());
        let p = percentiles(&a.latency);
        assert_eq!(p.count, 100);
        assert_eq!(p.max, 100);
        assert_eq!(p.p50, 50);
        assert_eq!(p.p99, 99);
        let d = distribution(&a.latency);
        assert!(d.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(d.last().unwrap().1, 100);
    }
}
