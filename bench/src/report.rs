//! What a run found, and how it is shown: a human table, JSON, markdown, an
//! SVG percentile plot, a verdict against the requirements, and the
//! side-by-side table of `compare`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::measure::{Counts, Percentiles};
use crate::plan::Scenario;
use crate::precision;
use crate::proc_stats::CpuWindow;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Host {
    pub cores: usize,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    pub server_nofile: Option<u64>,
    pub ip_local_port_range: String,
    pub somaxconn: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerFigures {
    pub rss_at_rest_bytes: u64,
    /// After the warm-up connections: the base for per-connection figures.
    pub rss_base_bytes: u64,
    /// After all measured connections were set up.
    pub rss_loaded_bytes: u64,
    /// At the end of the measured window (idle: after the hold).
    pub rss_window_end_bytes: u64,
    /// After the workers finished (connections closing).
    pub rss_end_bytes: u64,
    pub rss_per_connection_bytes: f64,
    /// CPU over the measured window: the total in ns (schedstat), the
    /// user/system split in ticks (stat). See proc_stats.rs.
    #[serde(default)]
    pub window_cpu: CpuWindow,
    /// The split in µs (whole ticks).
    pub window_user_us: u64,
    pub window_system_us: u64,
    /// Cores busy on average during the window (from the total).
    pub cpu_cores: f64,
    /// From ticks, like `user_us_per_frame`.
    pub user_us_per_msg: Option<f64>,
    pub system_us_per_msg: Option<f64>,
    /// From the total.
    pub total_us_per_msg: Option<f64>,
    pub user_us_per_frame: Option<f64>,
    /// CPU while the measured connections were being set up.
    #[serde(default)]
    pub setup_cpu: CpuWindow,
    /// Server CPU spent while the connections were being set up, per
    /// connection.
    pub setup_cpu_us_per_connection: Option<f64>,
    /// Idle scenario: server CPU per connection per second of idling.
    pub idle_cpu_us_per_connection_second: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Pass,
    Fail,
    #[serde(rename = "n/a")]
    NotApplicable,
    /// The run could judge it, but the figure is too coarse to (see
    /// precision.rs); `measured` says which rule it missed.
    #[serde(rename = "insufficient sample")]
    Insufficient,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::NotApplicable => "n/a",
            Status::Insufficient => "insufficient sample",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub measured: String,
    pub status: Status,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: Scenario,
    pub target: String,
    /// The protocol the clients spoke (`Proto::name`): `compare` takes a
    /// peer's ratios against the shardcast run that spoke the same one.
    #[serde(default)]
    pub protocol: String,
    pub banner: String,
    pub started_utc: String,
    pub host: Host,
    /// Measured connections that completed setup (warm-up ones excluded).
    pub connections: u64,
    pub warm_connections: u64,
    pub workers: usize,
    pub source_ips: u32,
    pub payload_bytes: usize,
    /// `pad` or `json` (see payload.rs).
    #[serde(default)]
    pub payload_kind: String,
    /// `off`, or the zstd framing the clients negotiated.
    #[serde(default)]
    pub compression: String,
    pub setup_secs: f64,
    pub connects_per_sec: f64,
    pub setup_latency: Percentiles,
    pub warmup_secs: f64,
    pub window_secs: f64,
    pub drain_secs: f64,
    pub latency: Percentiles,
    /// How late the generator sent (actual − intended), µs: its own
    /// contribution to `latency`.
    pub send_lag: Percentiles,
    /// Publish → acknowledgement at the publisher (intended send → ack or
    /// error), µs; empty for protocols without acks.
    #[serde(default)]
    pub ack: Percentiles,
    /// (quantile, µs) points of the latency distribution.
    pub distribution: Vec<(f64, u64)>,
    pub counts: Counts,
    pub lost: u64,
    /// Measured publications sent per second.
    pub offered_per_sec: f64,
    /// Deliveries received per second while the window was open.
    pub delivered_per_sec: f64,
    pub msgs_per_frame: f64,
    /// Bytes received per delivered message: WebSocket payloads as
    /// received (compressed, flag byte included) plus frame headers, of
    /// the frames that carried deliveries in the window, over those
    /// deliveries.
    #[serde(default)]
    pub wire_bytes_per_msg: Option<f64>,
    /// The same after decompression (native: FlatBuffers frame bytes).
    #[serde(default)]
    pub content_bytes_per_msg: Option<f64>,
    pub server: ServerFigures,
    /// Cores the load-generator workers used during the window.
    pub generator_cpu_cores: f64,
    #[serde(default)]
    pub generator_cpu: CpuWindow,
    /// The limit or failure that stopped the run early, if any.
    pub stopped_by: Option<String>,
    pub first_error: Option<String>,
    pub verdict: Vec<Check>,
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

fn us(v: f64) -> String {
    format!("{v:.3} µs")
}

fn opt_us(v: Option<f64>) -> String {
    v.map(us).unwrap_or_else(|| "—".into())
}

/// A resolution of `ns` nanoseconds: ms from one up (a whole tick), else µs.
fn resolution(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{} ms", ns / 1e6)
    } else {
        us(ns / 1000.0)
    }
}

fn tick_ms(w: &CpuWindow) -> String {
    format!("{} ms ticks", w.tick_ns as f64 / 1e6)
}

/// How finely a CPU total was measured, for a figure divided by `per`.
fn total_resolution(w: &CpuWindow, per: f64) -> String {
    match &w.total_from_ticks {
        None => "schedstat, 1 ns resolution".into(),
        Some(why) => format!(
            "resolution {}: {} from stat, {why}",
            resolution(w.total_resolution_ns as f64 / per.max(1.0)),
            tick_ms(w)
        ),
    }
}

/// How finely the user/system split was measured, for a figure divided by
/// `per`, and whether it has enough ticks to be judged.
fn split_resolution(w: &CpuWindow, per: f64) -> String {
    let enough = match (precision::cpu_user(w), precision::cpu_system(w)) {
        (Ok(()), Ok(())) => String::new(),
        _ => format!(
            "; under {} ticks: insufficient sample",
            precision::MIN_TICKS
        ),
    };
    format!(
        "resolution {}: {}, {} user + {} system{enough}",
        resolution(w.tick_ns as f64 / per.max(1.0)),
        tick_ms(w),
        w.user_ticks,
        w.system_ticks
    )
}

pub(crate) fn int(n: f64) -> String {
    // Thousands separators for readability.
    let s = format!("{:.0}", n);
    let (sign, digits) = s.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("", &s));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// Evaluates the original requirements and our targets.
pub fn verdict(r: &Report) -> Vec<Check> {
    let mut v = Vec::new();
    let publishes = r.scenario.publishes();
    let na = |name: &str, why: String| Check {
        name: name.into(),
        measured: why,
        status: Status::NotApplicable,
    };
    let check = |name: &str, ok: bool, measured: String| Check {
        name: name.into(),
        measured,
        status: if ok { Status::Pass } else { Status::Fail },
    };
    // A pass/fail only when the figure is fine enough to carry it.
    let judge = |name: &str, sample: Result<(), String>, ok: bool, measured: String| match sample {
        Ok(()) => check(name, ok, measured),
        Err(why) => Check {
            name: name.into(),
            measured: format!("{measured}: {why}"),
            status: Status::Insufficient,
        },
    };
    let cpu = &r.server.window_cpu;
    if let Some(s) = &r.stopped_by {
        v.push(check("run completed", false, s.clone()));
    }
    let expected_rate = r.scenario.expected_delivery_rate();
    const R1: &str = "requirement: ≥ 10,000 msg/s delivered";
    if !publishes {
        v.push(na(R1, "scenario does not publish".into()));
    } else if expected_rate < 10_000.0 {
        v.push(na(
            R1,
            format!("offered load is only {} deliveries/s", int(expected_rate)),
        ));
    } else {
        v.push(check(
            R1,
            r.delivered_per_sec >= 10_000.0,
            format!("{} msg/s", int(r.delivered_per_sec)),
        ));
    }
    const R2: &str = "requirement: P95 < 100 ms";
    if publishes && r.latency.count > 0 {
        v.push(judge(
            R2,
            precision::percentile("p95", 0.95, r.latency.count),
            r.latency.p95 < 100_000,
            ms(r.latency.p95),
        ));
    } else {
        v.push(na(R2, "no latency measured".into()));
    }
    const R3: &str = "requirement: ≥ 10,000 connections";
    let requested = r.scenario.connections();
    if requested < 10_000 {
        v.push(na(
            R3,
            format!("run asked for {} connections", int(requested as f64)),
        ));
    } else {
        v.push(check(
            R3,
            r.connections >= 10_000,
            format!("{} held", int(r.connections as f64)),
        ));
    }
    if publishes {
        let c = &r.counts;
        v.push(check(
            "zero losses (every expected delivery arrived, in order)",
            c.lost() == 0 && c.out_of_order == 0 && c.expected > 0,
            format!(
                "lost {}, out of order {}, of {} expected",
                c.lost(),
                c.out_of_order,
                int(c.expected as f64)
            ),
        ));
        v.push(check(
            "load generator kept its schedule (nothing unsent)",
            c.unsent == 0,
            format!("{} unsent", c.unsent),
        ));
    }
    const T1: &str = "target: ≤ 2.5 KB server RSS per idle connection";
    if matches!(r.scenario, Scenario::Idle { .. }) {
        v.push(judge(
            T1,
            precision::rss(2560.0, r.connections),
            r.server.rss_per_connection_bytes <= 2560.0,
            format!(
                "{} B (resolution {} B)",
                int(r.server.rss_per_connection_bytes),
                int(precision::rss_resolution(r.connections))
            ),
        ));
    } else {
        v.push(na(
            T1,
            format!(
                "connections not idle ({:.0} B/conn measured)",
                r.server.rss_per_connection_bytes
            ),
        ));
    }
    const T2: &str = "target: ≤ 0.5 µs server user CPU per delivered frame";
    match r.server.user_us_per_frame {
        Some(x) if publishes => v.push(judge(
            T2,
            precision::cpu_user(cpu),
            x <= 0.5,
            format!(
                "{x:.3} µs (resolution {})",
                resolution(cpu.tick_ns as f64 / r.counts.window_frames.max(1) as f64)
            ),
        )),
        _ => v.push(na(T2, "no deliveries measured".into())),
    }
    const T3: &str = "target: ≤ 1.5 µs total server CPU per message when a tick batches ≥ 8";
    match r.server.total_us_per_msg {
        Some(x) if publishes && r.msgs_per_frame >= 8.0 => v.push(judge(
            T3,
            precision::cpu_total(cpu),
            x <= 1.5,
            format!(
                "{x:.3} µs ({}) at {:.1} msg/frame",
                total_resolution(cpu, r.counts.window_msgs as f64),
                r.msgs_per_frame
            ),
        )),
        Some(x) if publishes => v.push(na(
            T3,
            format!(
                "batch was {:.1} msg/frame ({x:.3} µs/msg)",
                r.msgs_per_frame
            ),
        )),
        _ => v.push(na(T3, "no deliveries measured".into())),
    }
    const T4: &str = "target: p99 ≤ 1 ms publish→deliver at 100,000 deliveries/s";
    if publishes && r.delivered_per_sec >= 95_000.0 {
        v.push(judge(
            T4,
            precision::percentile("p99", 0.99, r.latency.count),
            r.latency.p99 <= 1_000,
            format!(
                "{} at {} msg/s",
                ms(r.latency.p99),
                int(r.delivered_per_sec)
            ),
        ));
    } else if publishes {
        v.push(na(
            T4,
            format!(
                "rate was {} deliveries/s (p99 {})",
                int(r.delivered_per_sec),
                ms(r.latency.p99)
            ),
        ));
    } else {
        v.push(na(T4, "scenario does not publish".into()));
    }
    v
}

fn scenario_line(s: &Scenario) -> String {
    match *s {
        Scenario::Fanout {
            subscribers,
            publishers,
            rate,
        } => format!(
            "fanout: {publishers} publisher(s) → 1 channel × {} subscribers at {rate} msg/s",
            int(subscribers as f64)
        ),
        Scenario::Rooms {
            rooms,
            members,
            rate,
        } => {
            format!("rooms: {rooms} rooms × {members} members, each member publishes {rate} msg/s")
        }
        Scenario::Direct { users, rate, peers } => format!(
            "direct: {} users, each sends {rate} msg/s to {peers} peers' inboxes",
            int(users as f64)
        ),
        Scenario::Connect { connections } => {
            format!(
                "connect: storm of {} handshakes + Connect + Subscribe",
                int(connections as f64)
            )
        }
        Scenario::Idle {
            connections,
            subscribe,
        } => format!(
            "idle: {} idle connections{}",
            int(connections as f64),
            if subscribe { ", each subscribed" } else { "" }
        ),
    }
}

/// Label/value rows of the human table (also used for markdown).
fn rows(r: &Report) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, val: String| v.push((k.to_owned(), val));
    add("scenario", scenario_line(&r.scenario));
    add(
        "server",
        if r.protocol.is_empty() {
            format!("{} — {}", r.target, r.banner)
        } else {
            format!("{} ({}) — {}", r.target, r.protocol, r.banner)
        },
    );
    add(
        "connections",
        format!(
            "{} (+{} warm-up) over {} worker process(es), {} source address(es)",
            int(r.connections as f64),
            r.warm_connections,
            r.workers,
            r.source_ips
        ),
    );
    add(
        "setup",
        format!(
            "{:.2} s, {} conn/s; per connection p50 {} p99 {} max {}",
            r.setup_secs,
            int(r.connects_per_sec),
            ms(r.setup_latency.p50),
            ms(r.setup_latency.p99),
            ms(r.setup_latency.max)
        ),
    );
    if r.scenario.publishes() {
        add(
            "window",
            format!(
                "{:.1} s measured after {:.1} s warm-up, {:.1} s drain",
                r.window_secs, r.warmup_secs, r.drain_secs
            ),
        );
        add(
            "payload",
            format!(
                "{} bytes, {}; compression {}",
                r.payload_bytes,
                if r.payload_kind.is_empty() {
                    "pad"
                } else {
                    &r.payload_kind
                },
                if r.compression.is_empty() {
                    "off"
                } else {
                    &r.compression
                }
            ),
        );
        add(
            "published",
            format!(
                "{} msg/s ({} in window)",
                int(r.offered_per_sec),
                int(r.counts.sent as f64)
            ),
        );
        add(
            "delivered",
            format!(
                "{} msg/s ({:.2} msg per frame)",
                int(r.delivered_per_sec),
                r.msgs_per_frame
            ),
        );
        if let (Some(w), Some(c)) = (r.wire_bytes_per_msg, r.content_bytes_per_msg) {
            add(
                "wire bytes per delivered msg",
                format!(
                    "{w:.1} B incl. WS headers ({c:.1} B decoded, ratio {:.2}; {:.2} msg per frame)",
                    if w > 0.0 { c / w } else { 0.0 },
                    r.msgs_per_frame
                ),
            );
        }
        let l = &r.latency;
        add(
            "latency (intended send → receive)",
            format!(
                "p50 {}  p90 {}  p95 {}  p99 {}  p99.9 {}  max {}",
                ms(l.p50),
                ms(l.p90),
                ms(l.p95),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            ),
        );
        let g = &r.send_lag;
        add(
            "generator send lag (actual − intended)",
            format!("p50 {}  p99 {}  max {}", ms(g.p50), ms(g.p99), ms(g.max)),
        );
        let a = &r.ack;
        if a.count > 0 {
            add(
                "publish → ack (at the publisher)",
                format!(
                    "p50 {}  p90 {}  p99 {}  max {}",
                    ms(a.p50),
                    ms(a.p90),
                    ms(a.p99),
                    ms(a.max)
                ),
            );
        }
        let c = &r.counts;
        add(
            "deliveries",
            format!(
                "expected {}  received {}  lost {}  out-of-order {}  unsent {}",
                int(c.expected as f64),
                int(c.received as f64),
                int(r.lost as f64),
                c.out_of_order,
                c.unsent
            ),
        );
        let s = &r.server;
        let msgs = r.counts.window_msgs as f64;
        add(
            "server CPU per delivered msg",
            format!(
                "total {} ({})",
                opt_us(s.total_us_per_msg),
                total_resolution(&s.window_cpu, msgs)
            ),
        );
        add(
            "  user / system per msg",
            format!(
                "user {}  system {} ({})",
                opt_us(s.user_us_per_msg),
                opt_us(s.system_us_per_msg),
                split_resolution(&s.window_cpu, msgs)
            ),
        );
        add(
            "  user per frame",
            format!(
                "{} (resolution {})",
                opt_us(s.user_us_per_frame),
                resolution(s.window_cpu.tick_ns as f64 / r.counts.window_frames.max(1) as f64)
            ),
        );
    } else {
        add("hold", format!("{:.1} s", r.window_secs));
    }
    let c = &r.counts;
    add(
        "errors",
        format!(
            "setup failures {}  server errors {}  closed {}  foreign payloads {}",
            c.setup_errors, c.errors, c.closed, c.foreign
        ),
    );
    let s = &r.server;
    let w = &s.window_cpu;
    add(
        "server CPU",
        format!(
            "{:.3} cores over the window: {:.3} ms on CPU ({}); user {} ms, system {} ms ({})",
            s.cpu_cores,
            w.total_ns as f64 / 1e6,
            total_resolution(w, 1.0),
            w.user_ns() / 1_000_000,
            w.system_ns() / 1_000_000,
            split_resolution(w, 1.0)
        ),
    );
    let conns = r.connections as f64;
    if let Some(x) = s.setup_cpu_us_per_connection {
        add(
            "server CPU per connection setup",
            format!("{} ({})", us(x), total_resolution(&s.setup_cpu, conns)),
        );
    }
    if let Some(x) = s.idle_cpu_us_per_connection_second {
        add(
            "server CPU per idle connection",
            format!(
                "{x:.3} µs/s ({})",
                total_resolution(w, conns * r.window_secs)
            ),
        );
    }
    add(
        "server RSS",
        format!(
            "rest {:.1} MiB, base {:.1} MiB, loaded {:.1} MiB, window end {:.1} MiB → {} B per connection (resolution {} B: one {} MiB step over {} connections)",
            s.rss_at_rest_bytes as f64 / 1048576.0,
            s.rss_base_bytes as f64 / 1048576.0,
            s.rss_loaded_bytes as f64 / 1048576.0,
            s.rss_window_end_bytes as f64 / 1048576.0,
            int(s.rss_per_connection_bytes),
            int(precision::rss_resolution(r.connections)),
            precision::RSS_STEP_BYTES >> 20,
            int(conns)
        ),
    );
    add(
        "load generator CPU",
        format!(
            "{:.3} cores (of {}; {})",
            r.generator_cpu_cores,
            r.host.cores,
            total_resolution(&r.generator_cpu, 1.0)
        ),
    );
    if let Some(e) = &r.stopped_by {
        add("STOPPED BY", e.clone());
    }
    if let Some(e) = &r.first_error {
        add("first error", e.clone());
    }
    v
}

pub fn table(r: &Report) -> String {
    let rows = rows(r);
    let w = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut s = String::new();
    for (k, v) in rows {
        let _ = writeln!(s, "{k:<w$}  {v}");
    }
    let _ = writeln!(s, "\nverdict");
    let lw = r
        .verdict
        .iter()
        .map(|c| c.status.label().chars().count())
        .max()
        .unwrap_or(0);
    for c in &r.verdict {
        let _ = writeln!(
            s,
            "  [{:<lw$}] {} — {}",
            c.status.label(),
            c.name,
            c.measured
        );
    }
    s
}

pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# shardcast-bench: {} against {}\n\nRun {} UTC.\n\n| | |\n|---|---|\n",
        r.scenario.name(),
        r.target,
        r.started_utc
    );
    for (k, v) in rows(r) {
        let _ = writeln!(s, "| {k} | {} |", v.replace('|', "\\|"));
    }
    let _ = writeln!(
        s,
        "\n## Verdict\n\n| check | measured | result |\n|---|---|---|"
    );
    for c in &r.verdict {
        let _ = writeln!(s, "| {} | {} | {} |", c.name, c.measured, c.status.label());
    }
    let _ = writeln!(
        s,
        "\n## How to read this\n\n- Latency runs from the time a publication was *scheduled* to be sent (open loop, stamped in the payload) to its receipt, so a stalled sender or server shows as latency (no coordinated omission). Warm-up publications are excluded.\n- Every (publication, subscriber) pair is an expected delivery; one that did not arrive before the drain ended is a loss.\n- Server CPU is measured over the window and divided by the deliveries received in it. The total is on-CPU nanoseconds summed over the server's threads (/proc/PID/task/*/schedstat; from /proc/PID/stat's 10 ms ticks if a thread exited or the kernel keeps no schedstat); the user/system split is always in ticks. RSS per connection is the RSS growth over the measured connections, divided by their number (kernel socket buffers are not in RSS); RSS grows in 2 MiB steps, so its resolution is 2 MiB / connections.\n- A verdict or ratio says *insufficient sample* instead of PASS/FAIL when its figure is too coarse: a tick-based CPU time of fewer than {} ticks, an RSS step per connection larger than a quarter of what it is compared with, a percentile with fewer than {} samples beyond it.\n- Host: {} cores, load generator RLIMIT_NOFILE {}/{}, server RLIMIT_NOFILE {}, ip_local_port_range {}, somaxconn {}. The load generator shares the cores with the server.\n\n![latency percentiles](latency.svg)",
        precision::MIN_TICKS,
        precision::TAIL_SAMPLES,
        r.host.cores,
        r.host.nofile_soft,
        r.host.nofile_hard,
        r.host.server_nofile.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
        r.host.ip_local_port_range,
        r.host.somaxconn
    );
    s
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// A percentile-distribution plot: x is the percentile on a
/// 1/(1-q) log scale (50%, 90%, 99%, …), y is latency in ms on a log scale.
pub fn svg(title: &str, series: &[(&str, &[(f64, u64)])]) -> String {
    let (w, h) = (760.0, 440.0);
    let (l, r, t, b) = (70.0, 170.0, 40.0, 50.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let xmax_dec = 5.0; // up to 99.999%
    let xv = |q: f64| {
        (1.0 / (1.0 - q.min(0.999_999)))
            .log10()
            .clamp(0.0, xmax_dec)
    };
    let all: Vec<u64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .collect();
    let lo_ms = all.iter().copied().min().unwrap_or(1).max(1) as f64 / 1000.0;
    let hi_ms = all.iter().copied().max().unwrap_or(1000).max(1) as f64 / 1000.0;
    let ylo = lo_ms.log10().floor();
    let mut yhi = hi_ms.log10().ceil();
    if yhi <= ylo {
        yhi = ylo + 1.0;
    }
    let px = |x: f64| l + x / xmax_dec * pw;
    let py = |ms: f64| t + ph - (ms.max(1e-9).log10() - ylo) / (yhi - ylo) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        l + pw / 2.0,
        xml(title)
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let x = px(i as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            t + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            t + ph + 16.0
        );
    }
    let mut d = ylo;
    while d <= yhi + 1e-9 {
        let v = 10f64.powf(d);
        let y = py(v);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            l + pw
        );
        let label = if v < 1.0 {
            format!("{v}")
        } else {
            format!("{v:.0}")
        };
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
            l - 6.0,
            y + 4.0
        );
        d += 1.0;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        l + pw / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">latency, ms (intended send → receive)</text>"#,
        t + ph / 2.0,
        t + ph / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if !pts.is_empty() {
            let path: Vec<String> = pts
                .iter()
                .map(|&(q, us)| format!("{:.1},{:.1}", px(xv(q)), py(us as f64 / 1000.0)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
        }
        let ly = t + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/>"#,
            l + pw + 12.0,
            l + pw + 32.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            l + pw + 38.0,
            ly + 4.0,
            xml(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Where results go without `--out`: under the directory the bench runs
/// in. Not next to the sources it was built from (`CARGO_MANIFEST_DIR`):
/// a binary run from elsewhere has no business writing into that checkout.
pub const DEFAULT_OUT: &str = "shardcast-bench-results";

/// Where a run's files go: `<base>/<name>-<timestamp>/`. Creates `base`;
/// the default one gets a `.gitignore` of `*` (as cargo does for
/// `target/`), so that runs in a git work tree leave `git status` clean.
pub fn result_dir(base: &Path, name: &str, stamp: &str) -> Result<PathBuf, String> {
    let fresh = !base.exists();
    std::fs::create_dir_all(base).map_err(|e| format!("{}: {e}", base.display()))?;
    if fresh && base == Path::new(DEFAULT_OUT) {
        std::fs::write(base.join(".gitignore"), "*\n")
            .map_err(|e| format!("{}: {e}", base.display()))?;
    }
    Ok(base.join(format!("{name}-{stamp}")))
}

/// Writes result.json, report.md, table.txt and latency.svg.
pub fn write_files(r: &Report, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let w = |name: &str, body: String| {
        std::fs::write(dir.join(name), body).map_err(|e| format!("{name}: {e}"))
    };
    w(
        "result.json",
        serde_json::to_string_pretty(r).map_err(|e| e.to_string())?,
    )?;
    w("report.md", markdown(r))?;
    w("table.txt", table(r))?;
    w(
        "latency.svg",
        svg(
            &format!("{} — {}", r.scenario.name(), r.target),
            &[(r.target.as_str(), r.distribution.as_slice())],
        ),
    )?;
    Ok(())
}

/// One metric across the compared runs.
struct Metric {
    name: &'static str,
    get: fn(&Report) -> Option<f64>,
    fmt: fn(f64) -> String,
    /// Whether a run's figure can carry a ratio (precision.rs).
    sample: fn(&Report) -> Result<(), String>,
    /// How finely a run's figure was measured, in its unit, where that is
    /// coarse enough to show (ticks, RSS steps).
    resolution: fn(&Report) -> Option<f64>,
}

impl Metric {
    /// A count, a rate or a size: exact.
    fn exact(
        name: &'static str,
        get: fn(&Report) -> Option<f64>,
        fmt: fn(f64) -> String,
    ) -> Metric {
        Metric {
            name,
            get,
            fmt,
            sample: |_| Ok(()),
            resolution: |_| None,
        }
    }

    fn sampled(
        mut self,
        sample: fn(&Report) -> Result<(), String>,
        resolution: fn(&Report) -> Option<f64>,
    ) -> Metric {
        self.sample = sample;
        self.resolution = resolution;
        self
    }
}

/// A latency percentile: none without samples.
fn latency(r: &Report, p: u64) -> Option<f64> {
    (r.latency.count > 0).then_some(p as f64)
}

/// The resolution of a CPU total divided by `per`, in µs, when it came
/// from ticks.
fn total_res_us(w: &CpuWindow, per: f64) -> Option<f64> {
    w.total_from_ticks
        .as_ref()
        .map(|_| w.total_resolution_ns as f64 / 1000.0 / per.max(1.0))
}

/// One clock tick per delivered message, µs.
fn tick_us_per_msg(r: &Report) -> f64 {
    r.server.window_cpu.tick_ns as f64 / 1000.0 / r.counts.window_msgs.max(1) as f64
}

fn metrics() -> Vec<Metric> {
    let msf = |v: f64| format!("{:.3} ms", v / 1000.0);
    let usf = |v: f64| format!("{v:.3} µs");
    let coresf = |v: f64| format!("{v:.3}");
    let intf = |v: f64| int(v);
    let none = |_: &Report| None;
    vec![
        Metric::exact("connections", |r| Some(r.connections as f64), intf),
        Metric::exact("published msg/s", |r| Some(r.offered_per_sec), intf),
        Metric::exact("delivered msg/s", |r| Some(r.delivered_per_sec), intf),
        Metric::exact(
            "msg per frame",
            |r| Some(r.msgs_per_frame),
            |v| format!("{v:.2}"),
        ),
        Metric::exact(
            "wire B / msg",
            |r| r.wire_bytes_per_msg,
            |v| format!("{v:.1} B"),
        ),
        Metric::exact("p50", |r| latency(r, r.latency.p50), msf)
            .sampled(|r| precision::percentile("p50", 0.5, r.latency.count), none),
        Metric::exact("p90", |r| latency(r, r.latency.p90), msf)
            .sampled(|r| precision::percentile("p90", 0.9, r.latency.count), none),
        Metric::exact("p95", |r| latency(r, r.latency.p95), msf).sampled(
            |r| precision::percentile("p95", 0.95, r.latency.count),
            none,
        ),
        Metric::exact("p99", |r| latency(r, r.latency.p99), msf).sampled(
            |r| precision::percentile("p99", 0.99, r.latency.count),
            none,
        ),
        Metric::exact("p99.9", |r| latency(r, r.latency.p999), msf).sampled(
            |r| precision::percentile("p99.9", 0.999, r.latency.count),
            none,
        ),
        Metric::exact("max", |r| latency(r, r.latency.max), msf),
        Metric::exact(
            "publish → ack p50",
            |r| (r.ack.count > 0).then_some(r.ack.p50 as f64),
            msf,
        )
        .sampled(|r| precision::percentile("p50", 0.5, r.ack.count), none),
        Metric::exact(
            "publish → ack p99",
            |r| (r.ack.count > 0).then_some(r.ack.p99 as f64),
            msf,
        )
        .sampled(|r| precision::percentile("p99", 0.99, r.ack.count), none),
        Metric::exact("lost", |r| Some(r.lost as f64), intf),
        Metric::exact(
            "errors + closed",
            |r| Some((r.counts.errors + r.counts.closed) as f64),
            intf,
        ),
        Metric::exact("server CPU (cores)", |r| Some(r.server.cpu_cores), coresf).sampled(
            |r| precision::cpu_total(&r.server.window_cpu),
            |r| total_res_us(&r.server.window_cpu, r.window_secs * 1e6),
        ),
        Metric::exact("server user CPU / msg", |r| r.server.user_us_per_msg, usf).sampled(
            |r| precision::cpu_user(&r.server.window_cpu),
            |r| Some(tick_us_per_msg(r)),
        ),
        Metric::exact("server sys CPU / msg", |r| r.server.system_us_per_msg, usf).sampled(
            |r| precision::cpu_system(&r.server.window_cpu),
            |r| Some(tick_us_per_msg(r)),
        ),
        Metric::exact("server total CPU / msg", |r| r.server.total_us_per_msg, usf).sampled(
            |r| precision::cpu_total(&r.server.window_cpu),
            |r| total_res_us(&r.server.window_cpu, r.counts.window_msgs as f64),
        ),
        Metric::exact(
            "server RSS / conn",
            |r| Some(r.server.rss_per_connection_bytes),
            |v| format!("{} B", int(v)),
        )
        .sampled(
            |r| precision::rss(r.server.rss_per_connection_bytes, r.connections),
            |r| Some(precision::rss_resolution(r.connections)),
        ),
        Metric::exact("setup conn/s", |r| Some(r.connects_per_sec), intf),
        Metric::exact(
            "load generator CPU",
            |r| Some(r.generator_cpu_cores),
            coresf,
        )
        .sampled(
            |r| precision::cpu_total(&r.generator_cpu),
            |r| total_res_us(&r.generator_cpu, r.window_secs * 1e6),
        ),
    ]
}

/// Which run each run's ratio is taken against (`None` for the first
/// run): a peer is compared with the shardcast run that spoke its
/// protocol (Sockudo with shardcast-pusher: same clients, same load), and
/// everything else with the first run (shardcast-pusher with native
/// shardcast: same server, another protocol).
pub fn ratio_bases(runs: &[Report]) -> Vec<Option<usize>> {
    let is_shardcast = |r: &Report| r.target.starts_with("shardcast");
    runs.iter()
        .enumerate()
        .map(|(i, r)| {
            if i == 0 {
                return None;
            }
            let same_protocol = (!is_shardcast(r) && !r.protocol.is_empty())
                .then(|| {
                    runs.iter()
                        .position(|b| is_shardcast(b) && b.protocol == r.protocol)
                })
                .flatten();
            Some(same_protocol.unwrap_or(0))
        })
        .collect()
}

/// The side-by-side table: one column per server, then each run's value
/// as a ratio of its base run's ([`ratio_bases`]: the shardcast run of the
/// same protocol, else the first run). A figure shows its
/// resolution (±) where ticks or RSS steps make it coarse; a ratio of a
/// figure too coarse to carry one says "insufficient sample", and a note
/// under the table says why. `skipped` lists peers that were not run and
/// why.
pub fn compare_table(runs: &[Report], skipped: &[(String, String)], markdown: bool) -> String {
    let bases = ratio_bases(runs);
    let mut header = vec!["metric".to_string()];
    header.extend(runs.iter().map(|r| r.target.clone()));
    header.extend(
        runs.iter()
            .zip(&bases)
            .filter_map(|(r, b)| b.map(|b| format!("{}/{}", r.target, runs[b].target))),
    );
    let mut body: Vec<Vec<String>> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for m in metrics() {
        let vals: Vec<Option<f64>> = runs.iter().map(|r| (m.get)(r)).collect();
        let samples: Vec<Result<(), String>> = runs.iter().map(|r| (m.sample)(r)).collect();
        let mut row = vec![m.name.to_string()];
        row.extend(runs.iter().zip(&vals).map(|(r, v)| match v {
            Some(v) => match (m.resolution)(r) {
                Some(res) => format!("{} ±{}", (m.fmt)(*v), (m.fmt)(res)),
                None => (m.fmt)(*v),
            },
            None => "—".into(),
        }));
        for (i, base) in bases.iter().enumerate() {
            let Some(base) = *base else { continue };
            row.push(match (vals[base], vals[i]) {
                (Some(b), Some(v)) => match (&samples[base], &samples[i]) {
                    (Ok(()), Ok(())) if b != 0.0 => format!("{:.2}×", v / b),
                    (Ok(()), Ok(())) => "—".into(),
                    _ => "insufficient sample".into(),
                },
                _ => "—".into(),
            });
        }
        if runs.len() > 1 {
            for ((r, v), sample) in runs.iter().zip(&vals).zip(&samples) {
                if let (Some(_), Err(why)) = (v, sample) {
                    notes.push(format!(
                        "insufficient sample: {} of {}: {why}",
                        m.name, r.target
                    ));
                }
            }
        }
        body.push(row);
    }
    let mut s = String::new();
    if markdown {
        let _ = writeln!(s, "| {} |", header.join(" | "));
        let _ = writeln!(s, "|{}|", vec!["---"; header.len()].join("|"));
        for row in &body {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
    } else {
        let cols = header.len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                std::iter::once(&header)
                    .chain(body.iter())
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |row: &[String]| {
            row.iter()
                .enumerate()
                .map(|(i, c)| {
                    let pad = widths[i] - c.chars().count();
                    if i == 0 {
                        format!("{c}{}", " ".repeat(pad))
                    } else {
                        format!("{}{c}", " ".repeat(pad))
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        let _ = writeln!(s, "{}", line(&header));
        for row in &body {
            let _ = writeln!(s, "{}", line(row));
        }
    }
    for n in &notes {
        let _ = writeln!(s, "{}{n}", if markdown { "\n" } else { "" });
    }
    for (name, why) in skipped {
        let _ = writeln!(
            s,
            "{}skipped {name}: {why}",
            if markdown { "\n" } else { "" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_report() -> Report {
        let mut r = Report {
            scenario: Scenario::Fanout {
                subscribers: 10_000,
                publishers: 1,
                rate: 20.0,
            },
            target: "shardcast".into(),
            protocol: "shardcast.v1".into(),
            banner: "shardcast listening on 127.0.0.1:1 shards=2 driver=io_uring".into(),
            started_utc: "20260101-000000".into(),
            host: Host {
                cores: 2,
                ..Default::default()
            },
            connections: 10_001,
            warm_connections: 200,
            workers: 3,
            source_ips: 1,
            payload_bytes: 64,
            payload_kind: "pad".into(),
            compression: "off".into(),
            setup_secs: 2.0,
            connects_per_sec: 5000.0,
            setup_latency: Percentiles::default(),
            warmup_secs: 2.0,
            window_secs: 10.0,
            drain_secs: 2.0,
            send_lag: Percentiles::default(),
            ack: Percentiles::default(),
            latency: Percentiles {
                count: 2_000_000,
                p50: 800,
                p90: 1500,
                p95: 2000,
                p99: 5000,
                p999: 9000,
                max: 20_000,
                mean: 900.0,
            },
            distribution: vec![
                (0.0, 100),
                (0.5, 800),
                (0.9, 1500),
                (0.99, 5000),
                (1.0, 20_000),
            ],
            counts: Counts {
                expected: 2_000_000,
                received: 2_000_000,
                window_msgs: 2_000_000,
                window_frames: 2_000_000,
                sent: 200,
                ..Default::default()
            },
            lost: 0,
            offered_per_sec: 20.0,
            delivered_per_sec: 200_000.0,
            msgs_per_frame: 1.0,
            wire_bytes_per_msg: Some(146.0),
            content_bytes_per_msg: Some(144.0),
            server: ServerFigures {
                rss_per_connection_bytes: 3000.0,
                // 2,000,000 messages and frames in 10 s: 0.4 µs user and
                // 1 µs system each, 1.4 µs total, all well sampled.
                window_cpu: CpuWindow {
                    total_ns: 2_800_000_000,
                    total_resolution_ns: 1,
                    total_from_ticks: None,
                    user_ticks: 80,
                    system_ticks: 200,
                    tick_ns: 10_000_000,
                },
                cpu_cores: 0.28,
                user_us_per_msg: Some(0.4),
                system_us_per_msg: Some(1.0),
                total_us_per_msg: Some(1.4),
                user_us_per_frame: Some(0.4),
                ..Default::default()
            },
            generator_cpu_cores: 1.0,
            generator_cpu: CpuWindow {
                total_ns: 10_000_000_000,
                total_resolution_ns: 1,
                tick_ns: 10_000_000,
                ..Default::default()
            },
            stopped_by: None,
            first_error: None,
            verdict: vec![],
        };
        r.verdict = verdict(&r);
        r
    }

    fn status(r: &Report, prefix: &str) -> Status {
        r.verdict
            .iter()
            .find(|c| c.name.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix}"))
            .status
    }

    #[test]
    fn verdict_applies_each_rule() {
        let mut r = sample_report();
        assert_eq!(status(&r, "requirement: ≥ 10,000 msg/s"), Status::Pass);
        assert_eq!(status(&r, "requirement: P95"), Status::Pass);
        assert_eq!(
            status(&r, "requirement: ≥ 10,000 connections"),
            Status::Pass
        );
        assert_eq!(status(&r, "zero losses"), Status::Pass);
        assert_eq!(status(&r, "target: ≤ 2.5 KB"), Status::NotApplicable);
        assert_eq!(status(&r, "target: ≤ 0.5 µs"), Status::Pass);
        assert_eq!(status(&r, "target: ≤ 1.5 µs"), Status::NotApplicable); // 1 msg/frame
        assert_eq!(status(&r, "target: p99"), Status::Fail); // 5 ms at 200k/s

        r.counts.received -= 3;
        r.latency.p95 = 150_000;
        r.msgs_per_frame = 10.0;
        r.verdict = verdict(&r);
        assert_eq!(status(&r, "zero losses"), Status::Fail);
        assert_eq!(status(&r, "requirement: P95"), Status::Fail);
        assert_eq!(status(&r, "target: ≤ 1.5 µs"), Status::Pass);

        r.scenario = Scenario::Idle {
            connections: 10_000,
            subscribe: false,
        };
        r.server.rss_per_connection_bytes = 2000.0;
        r.verdict = verdict(&r);
        assert_eq!(status(&r, "target: ≤ 2.5 KB"), Status::Pass);
        assert_eq!(
            status(&r, "requirement: ≥ 10,000 msg/s"),
            Status::NotApplicable
        );
    }

    fn measured(r: &Report, prefix: &str) -> String {
        r.verdict
            .iter()
            .find(|c| c.name.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix}"))
            .measured
            .clone()
    }

    /// A short run: 200 messages in 1 frame each over 2 s, CPU in a few
    /// ticks, 150 latency samples.
    fn tiny_report() -> Report {
        let mut r = sample_report();
        r.connections = 51;
        r.latency.count = 150;
        r.counts.window_msgs = 200;
        r.counts.window_frames = 20;
        r.msgs_per_frame = 10.0;
        r.server.window_cpu = CpuWindow {
            total_ns: 5_000_000,
            total_resolution_ns: 1,
            total_from_ticks: None,
            user_ticks: 0,
            system_ticks: 1,
            tick_ns: 10_000_000,
        };
        r.server.user_us_per_msg = Some(0.0);
        r.server.system_us_per_msg = Some(50.0);
        r.server.total_us_per_msg = Some(25.0);
        r.server.user_us_per_frame = Some(0.0);
        r.verdict = verdict(&r);
        r
    }

    #[test]
    fn verdict_on_tiny_samples_says_insufficient_sample() {
        let mut r = tiny_report();
        // 0 user ticks: "0.000 µs PASS" before.
        assert_eq!(status(&r, "target: ≤ 0.5 µs"), Status::Insufficient);
        let m = measured(&r, "target: ≤ 0.5 µs");
        assert!(
            m.contains("resolution 500.000 µs") && m.contains("0 clock tick(s), fewer than 50"),
            "{m}"
        );
        // 150 samples cannot place a p95.
        assert_eq!(status(&r, "requirement: P95"), Status::Insufficient);
        assert!(measured(&r, "requirement: P95").contains("fewer than 200"));
        // The total is in nanoseconds: judged however short the run.
        assert_eq!(status(&r, "target: ≤ 1.5 µs"), Status::Fail);
        // ... unless it had to fall back to ticks.
        r.server.window_cpu.total_from_ticks = Some("a thread exited during the window".into());
        r.server.window_cpu.total_resolution_ns = 10_000_000;
        r.verdict = verdict(&r);
        assert_eq!(status(&r, "target: ≤ 1.5 µs"), Status::Insufficient);
        let m = measured(&r, "target: ≤ 1.5 µs");
        assert!(
            m.contains("a thread exited") && m.contains("fewer than 50"),
            "{m}"
        );
        // Counts are exact at any size.
        assert_eq!(status(&r, "zero losses"), Status::Pass);

        // 300 idle connections: one 2 MiB step is 6,991 B each.
        r.scenario = Scenario::Idle {
            connections: 300,
            subscribe: false,
        };
        r.connections = 300;
        r.server.rss_per_connection_bytes = 6991.0;
        r.verdict = verdict(&r);
        assert_eq!(status(&r, "target: ≤ 2.5 KB"), Status::Insufficient);
        let m = measured(&r, "target: ≤ 2.5 KB");
        assert!(m.contains("6,991 B (resolution 6,991 B)"), "{m}");
        assert!(m.contains("3,277 connections or more"), "{m}");
        let t = table(&r);
        assert!(t.contains("[insufficient sample] target: ≤ 2.5 KB"), "{t}");
        assert!(
            t.contains("[n/a                ] requirement: ≥ 10,000 msg/s"),
            "{t}"
        );
        assert!(markdown(&r).contains("| insufficient sample |"));
    }

    #[test]
    fn verdict_on_adequate_samples_computes_as_before() {
        let mut r = sample_report();
        r.scenario = Scenario::Idle {
            connections: 10_000,
            subscribe: false,
        };
        r.server.rss_per_connection_bytes = 2600.0;
        r.verdict = verdict(&r);
        assert_eq!(status(&r, "target: ≤ 2.5 KB"), Status::Fail);
        // Enough ticks: the user figure is judged (0.4 µs ≤ 0.5).
        let mut r = sample_report();
        r.server.window_cpu.user_ticks = 50;
        r.verdict = verdict(&r);
        assert_eq!(status(&r, "target: ≤ 0.5 µs"), Status::Pass);
        r.server.user_us_per_frame = Some(0.6);
        r.verdict = verdict(&r);
        assert_eq!(status(&r, "target: ≤ 0.5 µs"), Status::Fail);
        let t = table(&r);
        assert!(t.contains("[FAIL] target: ≤ 0.5 µs"), "{t}");
        assert!(!t.contains("insufficient"), "{t}");
    }

    #[test]
    fn renders_table_markdown_svg_and_json() {
        let r = sample_report();
        let t = table(&r);
        assert!(t.contains("p99.9 9.000 ms"), "{t}");
        assert!(t.contains("[PASS]"));
        let md = markdown(&r);
        assert!(md.contains("| delivered | 200,000 msg/s"), "{md}");
        assert!(
            md.contains(
                "| wire bytes per delivered msg | 146.0 B incl. WS headers (144.0 B decoded"
            ),
            "{md}"
        );
        assert!(t.contains("64 bytes, pad; compression off"), "{t}");
        assert!(
            t.contains("total 1.400 µs (schedstat, 1 ns resolution)"),
            "{t}"
        );
        assert!(
            t.contains("user 0.400 µs  system 1.000 µs (resolution 0.005 µs: 10 ms ticks, 80 user + 200 system)"),
            "{t}"
        );
        assert!(
            t.contains("(resolution 210 B: one 2 MiB step over 10,001 connections)"),
            "{t}"
        );
        assert!(md.contains("latency.svg"));
        let s = svg("t", &[("shardcast", &r.distribution)]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("<polyline"));
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.latency, r.latency);
    }

    #[test]
    fn compare_table_has_ratios_and_skips() {
        let a = sample_report();
        let mut b = sample_report();
        b.target = "baseline".into();
        b.latency.p99 = 10_000;
        let t = compare_table(&[a, b], &[("nats".into(), "not installed".into())], false);
        let p99 = t.lines().find(|l| l.starts_with("p99 ")).unwrap();
        assert!(
            p99.contains("5.000 ms") && p99.contains("10.000 ms") && p99.contains("2.00×"),
            "{p99}"
        );
        assert!(t.contains("skipped nats: not installed"));
        let user = t
            .lines()
            .find(|l| l.starts_with("server user CPU"))
            .unwrap();
        assert!(
            user.contains("0.400 µs ±0.005 µs") && user.ends_with("1.00×"),
            "{user}"
        );
        assert!(!t.contains("insufficient"), "{t}");
        let md = compare_table(&[sample_report()], &[], true);
        assert!(md.starts_with("| metric | shardcast |"));
    }

    #[test]
    fn peers_are_compared_with_shardcast_on_their_protocol() {
        let run = |target: &str, protocol: &str, p99: u64| {
            let mut r = sample_report();
            r.target = target.into();
            r.protocol = protocol.into();
            r.latency.p99 = p99;
            r
        };
        let runs = [
            run("shardcast", "shardcast.v1", 5_000),
            run("shardcast-pusher", "Pusher 7", 10_000),
            run("baseline", "baseline JSON", 20_000),
            run("sockudo", "Pusher 7", 40_000),
        ];
        assert_eq!(ratio_bases(&runs), [None, Some(0), Some(0), Some(1)]);
        let t = compare_table(&runs, &[], false);
        let header = t.lines().next().unwrap();
        assert!(
            header.ends_with(
                "shardcast-pusher/shardcast  baseline/shardcast  sockudo/shardcast-pusher"
            ),
            "{header}"
        );
        let p99 = t.lines().find(|l| l.starts_with("p99 ")).unwrap();
        // shardcast-pusher / shardcast, baseline / shardcast, sockudo /
        // shardcast-pusher.
        let ratios: Vec<&str> = p99.split_whitespace().rev().take(3).collect();
        assert_eq!(ratios, ["4.00×", "4.00×", "2.00×"], "{p99}");
        // Without a shardcast run of its protocol, a peer is compared with
        // the first run; so is every run of older results (no protocol).
        let runs = [
            run("shardcast", "shardcast.v1", 5_000),
            run("sockudo", "Pusher 7", 40_000),
        ];
        assert_eq!(ratio_bases(&runs), [None, Some(0)]);
        let old = [run("shardcast", "", 1), run("sockudo", "", 1)];
        assert_eq!(ratio_bases(&old), [None, Some(0)]);
    }

    #[test]
    fn compare_has_no_ratio_from_tiny_samples() {
        let a = tiny_report();
        let mut b = tiny_report();
        b.target = "baseline".into();
        b.server.window_cpu.system_ticks = 2;
        b.server.system_us_per_msg = Some(100.0);
        b.server.total_us_per_msg = Some(30.0);
        let t = compare_table(&[a, b], &[], false);
        let row = |name: &str| t.lines().find(|l| l.starts_with(name)).unwrap().to_string();
        // 1 vs 2 ticks was "2.00×".
        let sys = row("server sys CPU");
        assert!(sys.ends_with("insufficient sample"), "{sys}");
        assert!(sys.contains("50.000 µs ±50.000 µs"), "{sys}");
        assert!(row("p99 ").ends_with("insufficient sample"));
        // Nanosecond totals still compare.
        assert!(row("server total CPU").ends_with("1.20×"), "{t}");
        assert!(
            t.contains("insufficient sample: server sys CPU / msg of shardcast: system CPU time is 1 clock tick(s), fewer than 50"),
            "{t}"
        );
        assert!(
            t.contains(
                "insufficient sample: p99 of baseline: 150 latency sample(s), fewer than 1,000"
            ),
            "{t}"
        );
    }

    #[test]
    fn thousands() {
        assert_eq!(int(1234567.0), "1,234,567");
        assert_eq!(int(999.0), "999");
        assert_eq!(int(-1000.0), "-1,000");
    }
}
