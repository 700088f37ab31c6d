//! What a run found, and how it is shown: a human table, JSON, markdown, an
//! SVG percentile plot, a verdict against the requirements, and the
//! side-by-side table of `compare`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::measure::{Counts, Percentiles};
use crate::plan::Scenario;

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
    /// CPU over the measured window.
    pub window_user_us: u64,
    pub window_system_us: u64,
    /// Cores busy on average during the window.
    pub cpu_cores: f64,
    pub user_us_per_msg: Option<f64>,
    pub system_us_per_msg: Option<f64>,
    pub total_us_per_msg: Option<f64>,
    pub user_us_per_frame: Option<f64>,
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
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::NotApplicable => "n/a",
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
    /// The limit or failure that stopped the run early, if any.
    pub stopped_by: Option<String>,
    pub first_error: Option<String>,
    pub verdict: Vec<Check>,
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

fn opt_us(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3} µs"))
        .unwrap_or_else(|| "—".into())
}

fn int(n: f64) -> String {
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
        v.push(check(R2, r.latency.p95 < 100_000, ms(r.latency.p95)));
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
        v.push(check(
            T1,
            r.server.rss_per_connection_bytes <= 2560.0,
            format!("{:.0} B", r.server.rss_per_connection_bytes),
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
        Some(x) if publishes => v.push(check(T2, x <= 0.5, format!("{x:.3} µs"))),
        _ => v.push(na(T2, "no deliveries measured".into())),
    }
    const T3: &str = "target: ≤ 1.5 µs total server CPU per message when a tick batches ≥ 8";
    match r.server.total_us_per_msg {
        Some(x) if publishes && r.msgs_per_frame >= 8.0 => v.push(check(
            T3,
            x <= 1.5,
            format!("{x:.3} µs at {:.1} msg/frame", r.msgs_per_frame),
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
        v.push(check(
            T4,
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
    add("server", format!("{} — {}", r.target, r.banner));
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
        add(
            "server CPU per delivered msg",
            format!(
                "user {}  system {}  total {}  (user per frame {})",
                opt_us(s.user_us_per_msg),
                opt_us(s.system_us_per_msg),
                opt_us(s.total_us_per_msg),
                opt_us(s.user_us_per_frame)
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
    add(
        "server CPU",
        format!(
            "{:.2} cores over the window (user {} µs, system {} µs)",
            s.cpu_cores,
            int(s.window_user_us as f64),
            int(s.window_system_us as f64)
        ),
    );
    if let Some(x) = s.setup_cpu_us_per_connection {
        add("server CPU per connection setup", format!("{x:.1} µs"));
    }
    if let Some(x) = s.idle_cpu_us_per_connection_second {
        add("server CPU per idle connection", format!("{x:.3} µs/s"));
    }
    add(
        "server RSS",
        format!(
            "rest {:.1} MiB, base {:.1} MiB, loaded {:.1} MiB, window end {:.1} MiB → {:.0} B per connection",
            s.rss_at_rest_bytes as f64 / 1048576.0,
            s.rss_base_bytes as f64 / 1048576.0,
            s.rss_loaded_bytes as f64 / 1048576.0,
            s.rss_window_end_bytes as f64 / 1048576.0,
            s.rss_per_connection_bytes
        ),
    );
    add(
        "load generator CPU",
        format!("{:.2} cores (of {})", r.generator_cpu_cores, r.host.cores),
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
    for c in &r.verdict {
        let _ = writeln!(s, "  [{:<4}] {} — {}", c.status.label(), c.name, c.measured);
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
        "\n## How to read this\n\n- Latency runs from the time a publication was *scheduled* to be sent (open loop, stamped in the payload) to its receipt, so a stalled sender or server shows as latency (no coordinated omission). Warm-up publications are excluded.\n- Every (publication, subscriber) pair is an expected delivery; one that did not arrive before the drain ended is a loss.\n- Server CPU comes from /proc/PID/stat over the measured window, divided by the deliveries received in that window; RSS per connection is the RSS growth while the measured connections were set up, divided by their number (kernel socket buffers are not in RSS).\n- Host: {} cores, load generator RLIMIT_NOFILE {}/{}, server RLIMIT_NOFILE {}, ip_local_port_range {}, somaxconn {}. The load generator shares the cores with the server.\n\n![latency percentiles](latency.svg)",
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

/// Where a run's files go: `<base>/<name>-<timestamp>/`.
pub fn result_dir(base: &Path, name: &str, stamp: &str) -> PathBuf {
    base.join(format!("{name}-{stamp}"))
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
}

fn metrics() -> Vec<Metric> {
    let msf = |v: f64| format!("{:.3} ms", v / 1000.0);
    let usf = |v: f64| format!("{v:.3} µs");
    let intf = |v: f64| int(v);
    vec![
        Metric {
            name: "connections",
            get: |r| Some(r.connections as f64),
            fmt: intf,
        },
        Metric {
            name: "published msg/s",
            get: |r| Some(r.offered_per_sec),
            fmt: intf,
        },
        Metric {
            name: "delivered msg/s",
            get: |r| Some(r.delivered_per_sec),
            fmt: intf,
        },
        Metric {
            name: "msg per frame",
            get: |r| Some(r.msgs_per_frame),
            fmt: |v| format!("{v:.2}"),
        },
        Metric {
            name: "wire B / msg",
            get: |r| r.wire_bytes_per_msg,
            fmt: |v| format!("{v:.1} B"),
        },
        Metric {
            name: "p50",
            get: |r| Some(r.latency.p50 as f64),
            fmt: msf,
        },
        Metric {
            name: "p90",
            get: |r| Some(r.latency.p90 as f64),
            fmt: msf,
        },
        Metric {
            name: "p95",
            get: |r| Some(r.latency.p95 as f64),
            fmt: msf,
        },
        Metric {
            name: "p99",
            get: |r| Some(r.latency.p99 as f64),
            fmt: msf,
        },
        Metric {
            name: "p99.9",
            get: |r| Some(r.latency.p999 as f64),
            fmt: msf,
        },
        Metric {
            name: "max",
            get: |r| Some(r.latency.max as f64),
            fmt: msf,
        },
        Metric {
            name: "lost",
            get: |r| Some(r.lost as f64),
            fmt: intf,
        },
        Metric {
            name: "errors + closed",
            get: |r| Some((r.counts.errors + r.counts.closed) as f64),
            fmt: intf,
        },
        Metric {
            name: "server CPU (cores)",
            get: |r| Some(r.server.cpu_cores),
            fmt: |v| format!("{v:.2}"),
        },
        Metric {
            name: "server user CPU / msg",
            get: |r| r.server.user_us_per_msg,
            fmt: usf,
        },
        Metric {
            name: "server sys CPU / msg",
            get: |r| r.server.system_us_per_msg,
            fmt: usf,
        },
        Metric {
            name: "server total CPU / msg",
            get: |r| r.server.total_us_per_msg,
            fmt: usf,
        },
        Metric {
            name: "server RSS / conn",
            get: |r| Some(r.server.rss_per_connection_bytes),
            fmt: |v| format!("{v:.0} B"),
        },
        Metric {
            name: "setup conn/s",
            get: |r| Some(r.connects_per_sec),
            fmt: intf,
        },
        Metric {
            name: "load generator CPU",
            get: |r| Some(r.generator_cpu_cores),
            fmt: |v| format!("{v:.2}"),
        },
    ]
}

/// The side-by-side table: one column per server, then each peer's value
/// as a ratio of shardcast's (the first run). `skipped` lists peers that
/// were not run and why.
pub fn compare_table(runs: &[Report], skipped: &[(String, String)], markdown: bool) -> String {
    let mut header = vec!["metric".to_string()];
    header.extend(runs.iter().map(|r| r.target.clone()));
    if let Some(base) = runs.first() {
        header.extend(
            runs.iter()
                .skip(1)
                .map(|r| format!("{}/{}", r.target, base.target)),
        );
    }
    let mut body: Vec<Vec<String>> = Vec::new();
    for m in metrics() {
        let vals: Vec<Option<f64>> = runs.iter().map(|r| (m.get)(r)).collect();
        let mut row = vec![m.name.to_string()];
        row.extend(
            vals.iter()
                .map(|v| v.map(m.fmt).unwrap_or_else(|| "—".into())),
        );
        if let Some(Some(b)) = vals.first() {
            for v in vals.iter().skip(1) {
                row.push(match v {
                    Some(v) if *b != 0.0 => format!("{:.2}×", v / b),
                    _ => "—".into(),
                });
            }
        } else {
            row.extend(vals.iter().skip(1).map(|_| "—".to_string()));
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
                user_us_per_msg: Some(0.4),
                system_us_per_msg: Some(1.0),
                total_us_per_msg: Some(1.4),
                user_us_per_frame: Some(0.4),
                ..Default::default()
            },
            generator_cpu_cores: 1.0,
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
        let md = compare_table(&[sample_report()], &[], true);
        assert!(md.starts_with("| metric | shardcast |"));
    }

    #[test]
    fn thousands() {
        assert_eq!(int(1234567.0), "1,234,567");
        assert_eq!(int(999.0), "999");
        assert_eq!(int(-1000.0), "-1,000");
    }
}
