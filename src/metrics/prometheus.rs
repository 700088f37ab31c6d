//! Prometheus text exposition (format 0.0.4) of a registry snapshot.

use std::fmt::Write;

use hdrhistogram::Histogram;

use super::{Limit, ShardReport};

/// Bucket bounds in seconds for the latency histograms.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// `extra`: counters from collectors, as (name, help, value).
pub fn render(
    shards: &[ShardReport],
    ready: bool,
    draining: bool,
    extra: &[(&str, &str, u64)],
) -> String {
    let mut out = String::with_capacity(8192);
    let per_shard =
        |out: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(&ShardReport) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (i, s) in shards.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", f(s));
            }
        };
    per_shard(
        &mut out,
        "shardcast_connections",
        "gauge",
        "Open connections.",
        &|s| s.counters.connections,
    );
    per_shard(
        &mut out,
        "shardcast_subscriptions",
        "gauge",
        "Subscriptions held by connections.",
        &|s| s.counters.subscriptions,
    );
    per_shard(
        &mut out,
        "shardcast_channels",
        "gauge",
        "Channels with at least one local subscriber.",
        &|s| s.counters.channels,
    );
    per_shard(
        &mut out,
        "shardcast_connections_accepted_total",
        "counter",
        "Connections accepted.",
        &|s| s.counters.connections_accepted,
    );
    per_shard(
        &mut out,
        "shardcast_messages_in_total",
        "counter",
        "Requests received from clients.",
        &|s| s.counters.messages_in,
    );
    per_shard(
        &mut out,
        "shardcast_messages_out_total",
        "counter",
        "Publications delivered (one per recipient).",
        &|s| s.counters.messages_out,
    );
    per_shard(
        &mut out,
        "shardcast_bytes_in_total",
        "counter",
        "Bytes read from client sockets.",
        &|s| s.counters.bytes_in,
    );
    per_shard(
        &mut out,
        "shardcast_bytes_out_total",
        "counter",
        "Bytes written to client sockets.",
        &|s| s.counters.bytes_out,
    );
    per_shard(
        &mut out,
        "shardcast_slow_consumer_closes_total",
        "counter",
        "Connections closed for exceeding their outbound budget (4001).",
        &|s| s.counters.slow_consumer_closes,
    );
    per_shard(
        &mut out,
        "shardcast_auth_failures_total",
        "counter",
        "Connect requests refused.",
        &|s| s.counters.auth_failures,
    );
    let name = "shardcast_limit_hits_total";
    let _ = writeln!(
        out,
        "# HELP {name} Connections refused or closed by a limit."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for l in Limit::ALL {
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",limit=\"{}\"}} {}",
                l.name(),
                s.counters.limit_hits[l as usize]
            );
        }
    }
    let merged = |pick: &dyn Fn(&ShardReport) -> &Histogram<u64>| {
        let mut h = pick(&shards[0]).clone();
        for s in &shards[1..] {
            let _ = h.add(pick(s));
        }
        h
    };
    if !shards.is_empty() {
        histogram(
            &mut out,
            "shardcast_publish_to_write_seconds",
            "Publication sequenced to written, per delivered message.",
            &merged(&|s| &s.latencies.publish_to_write),
        );
        histogram(
            &mut out,
            "shardcast_ingress_to_write_seconds",
            "Publisher's frame read to delivery written, per delivered message.",
            &merged(&|s| &s.latencies.ingress_to_write),
        );
    }
    for (name, help, value) in extra {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
    let _ = writeln!(
        out,
        "# HELP shardcast_ready Whether the server accepts new connections."
    );
    let _ = writeln!(out, "# TYPE shardcast_ready gauge");
    let _ = writeln!(out, "shardcast_ready {}", u8::from(ready));
    let _ = writeln!(
        out,
        "# HELP shardcast_draining Whether the server is draining."
    );
    let _ = writeln!(out, "# TYPE shardcast_draining gauge");
    let _ = writeln!(out, "shardcast_draining {}", u8::from(draining));
    out
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for le in BUCKETS {
        let us = (le * 1e6) as u64;
        let count = if h.is_empty() {
            0
        } else {
            h.count_between(0, us)
        };
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.len());
    // hdrhistogram keeps no exact sum; mean × count is exact to its
    // precision (3 significant digits).
    let _ = writeln!(out, "{name}_sum {}", h.mean() * h.len() as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {}", h.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Counters, Latencies};

    #[test]
    fn renders_counters_per_shard_and_cumulative_buckets() {
        let mut a = ShardReport::default();
        a.counters.messages_out = 3;
        a.counters.limit(Limit::Rate);
        let mut b = ShardReport {
            counters: Counters::default(),
            latencies: Latencies::default(),
        };
        b.latencies.record(200, 300, 4); // 0.2 ms
        b.latencies.record(20_000, 30_000, 1); // 20 ms
        let text = render(
            &[a, b],
            true,
            false,
            &[("shardcast_x_total", "An extra.", 7)],
        );
        assert!(text.contains("# TYPE shardcast_x_total counter\nshardcast_x_total 7\n"));
        assert!(text.contains("shardcast_messages_out_total{shard=\"0\"} 3\n"));
        assert!(text.contains("shardcast_limit_hits_total{shard=\"0\",limit=\"message_rate\"} 1\n"));
        assert!(text.contains("shardcast_publish_to_write_seconds_bucket{le=\"0.0001\"} 0\n"));
        assert!(text.contains("shardcast_publish_to_write_seconds_bucket{le=\"0.00025\"} 4\n"));
        assert!(text.contains("shardcast_publish_to_write_seconds_bucket{le=\"0.025\"} 5\n"));
        assert!(text.contains("shardcast_publish_to_write_seconds_count 5\n"));
        assert!(text.contains("shardcast_ready 1\n"));
    }
}
