//! The coordinator: starts the server, spreads connections over worker
//! processes, opens the measurement window, samples the server from /proc
//! and assembles the [`Report`].

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::clock::{now_ns, utc_stamp};
use crate::measure::{self, Recorder, Window};
use crate::plan::Scenario;
use crate::proc_stats::{self, CpuReading, CpuWindow, ProcSample};
use crate::report::{self, Host, Report, ServerFigures};
use crate::target::{self, ServerOpts, Target};
use crate::worker::{Go, Job, Report as WorkerReport};

#[derive(Clone, Debug)]
pub struct RunOpts {
    pub server: ServerOpts,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub payload_bytes: usize,
    pub payload_kind: crate::payload::Kind,
    /// Native protocol: negotiate `shardcast.v1+zstd`.
    pub zstd: bool,
    /// With `zstd`: the dictionary the server was given (id, file).
    pub zstd_dict: Option<(u32, PathBuf)>,
    pub per_worker: u64,
    /// None = one per 25,000 connections.
    pub source_ips: Option<u32>,
    pub concurrency: usize,
    pub warm_connections: u64,
    pub out_dir: PathBuf,
    pub write_files: bool,
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl WorkerProc {
    fn spawn(job: &Job) -> Result<WorkerProc, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start a worker process: {e}"))?;
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut stdin = child.stdin.take().expect("piped");
        writeln!(
            stdin,
            "{}",
            serde_json::to_string(job).expect("serialisable")
        )
        .map_err(|e| format!("worker stdin: {e}"))?;
        Ok(WorkerProc {
            child,
            stdin,
            lines,
        })
    }

    fn next(&self, deadline: Instant) -> Result<WorkerReport, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = self.lines.recv_timeout(left).map_err(|_| {
            "a worker process did not report in time (or died; see its stderr above)".to_string()
        })?;
        serde_json::from_str(&line).map_err(|e| format!("bad worker report {line:?}: {e}"))
    }

    fn go(&mut self, go: &Go) -> Result<(), String> {
        writeln!(
            self.stdin,
            "{}",
            serde_json::to_string(go).expect("serialisable")
        )
        .map_err(|e| format!("worker stdin: {e}"))
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sysctl(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn sample(pid: u32) -> Result<ProcSample, String> {
    proc_stats::sample(pid).map_err(|e| format!("reading server /proc/{pid}: {e} (did it exit?)"))
}

/// The workers' CPU together; a worker that cannot be read (it died, and
/// says so elsewhere) counts as none.
fn workers_cpu(pids: &[u32]) -> CpuReading {
    proc_stats::cpu(pids).unwrap_or_default()
}

fn sleep_until_ns(t: u64) {
    let now = now_ns();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

/// Runs `scenario` against a freshly started `target`.
pub fn run(t: Target, scenario: &Scenario, o: &RunOpts) -> Result<Report, String> {
    let (soft, hard) = crate::net::raise_nofile();
    let started_utc = utc_stamp();
    let server = target::start(t, &o.server)?;
    let pid = server.pid;
    let banner = server.banner.clone();
    let proto = server.proto;
    let n = scenario.connections();
    let total = n + o.warm_connections;
    let source_ips = o.source_ips.unwrap_or(total.div_ceil(25_000).max(1) as u32);
    let host = Host {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        nofile_soft: soft,
        nofile_hard: hard,
        server_nofile: target::process_nofile(pid),
        ip_local_port_range: sysctl("/proc/sys/net/ipv4/ip_local_port_range"),
        somaxconn: sysctl("/proc/sys/net/core/somaxconn"),
    };
    // Limits we can see before starting.
    if let Some(lim) = host.server_nofile {
        if total + 64 > lim {
            return Err(format!(
                "host limit: the server's RLIMIT_NOFILE is {lim}, below the {total} connections this run needs (+ a few). Raise the hard limit (tuning/, LimitNOFILE=) or lower the count."
            ));
        }
    }
    let ports: Vec<u64> = host
        .ip_local_port_range
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let [lo, hi] = ports[..] {
        let per_ip = total.div_ceil(u64::from(source_ips));
        if per_ip > hi - lo + 1 {
            return Err(format!(
                "host limit: {per_ip} connections per source address exceed the ephemeral port range ({lo}–{hi}); use --source-ips {} or widen net.ipv4.ip_local_port_range",
                total.div_ceil(hi - lo + 1)
            ));
        }
    }
    if o.zstd && server.proto != crate::proto::Proto::Native {
        return Err(format!("--zstd is shardcast-only, not for {}", t.name()));
    }
    let job = |scenario: Scenario, range: (u64, u64)| Job {
        scenario,
        proto: server.proto,
        addr: server.addr,
        source_ips,
        range,
        concurrency: o.concurrency,
        payload_bytes: o.payload_bytes,
        payload_kind: o.payload_kind,
        zstd: o.zstd,
        zstd_dict: o
            .zstd_dict
            .as_ref()
            .map(|(id, p)| (*id, p.display().to_string())),
        setup_timeout_ms: 15_000,
    };

    eprintln!("[{}] {} — {} connections", t.name(), server.banner, n);
    let at_rest = sample(pid)?;
    // Warm-up connections: one-time costs (buffers, allocator arenas) are
    // paid before the base sample.
    let mut warm = Vec::new();
    if o.warm_connections > 0 {
        let w = WorkerProc::spawn(&job(
            Scenario::Idle {
                connections: o.warm_connections,
                subscribe: false,
            },
            (n, n + o.warm_connections), // distinct indices → other source ports
        ))?;
        match w.next(Instant::now() + Duration::from_secs(60))? {
            WorkerReport::Ready { failed: 0, .. } => {}
            WorkerReport::Ready { first_error, .. } => {
                return Err(format!(
                    "warm-up connections failed: {}",
                    first_error.unwrap_or_default()
                ))
            }
            other => return Err(format!("unexpected worker report {other:?}")),
        }
        warm.push(w);
        std::thread::sleep(Duration::from_millis(300));
    }
    let base = sample(pid)?;

    // Measured connections.
    let ranges = scenario.worker_ranges(o.per_worker);
    let t_setup = Instant::now();
    let mut workers = Vec::new();
    for r in &ranges {
        workers.push(WorkerProc::spawn(&job(scenario.clone(), *r))?);
    }
    let setup_deadline = Instant::now() + Duration::from_secs(60 + total / 500);
    let mut opened = 0;
    let mut failed = 0;
    let mut stopped_by = None;
    for w in &workers {
        match w.next(setup_deadline) {
            Ok(WorkerReport::Ready {
                opened: a,
                failed: f,
                first_error,
                ..
            }) => {
                opened += a;
                failed += f;
                if f > 0 && stopped_by.is_none() {
                    stopped_by = first_error;
                }
            }
            Ok(other) => return Err(format!("unexpected worker report {other:?}")),
            Err(e) => {
                stopped_by.get_or_insert(e);
            }
        }
    }
    let setup_secs = t_setup.elapsed().as_secs_f64();
    let after_setup = sample(pid)?;
    if let Some(s) = &stopped_by {
        eprintln!(
            "[{}] setup stopped after {opened} connections: {s}",
            t.name()
        );
    } else {
        eprintln!(
            "[{}] {opened} connections set up in {setup_secs:.2} s",
            t.name()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let loaded = sample(pid)?;

    // The run. Non-publishing scenarios just hold their connections.
    let publishes = scenario.publishes();
    let measure_publishing = publishes && stopped_by.is_none();
    let (warmup, window_len, drain) = match scenario {
        _ if !measure_publishing && publishes => (Duration::ZERO, Duration::ZERO, Duration::ZERO),
        Scenario::Connect { .. } => (Duration::ZERO, Duration::from_secs(1), Duration::ZERO),
        Scenario::Idle { .. } => (Duration::ZERO, o.duration, Duration::ZERO),
        _ => (o.warmup, o.duration, o.drain),
    };
    let start_ns = now_ns() + 100_000_000;
    let window = Window {
        from_ns: start_ns + warmup.as_nanos() as u64,
        to_ns: start_ns + (warmup + window_len).as_nanos() as u64,
    };
    let go = Go {
        start_ns: if measure_publishing {
            start_ns
        } else {
            u64::MAX / 4
        },
        window,
        grace_ns: (drain / 2).as_nanos() as u64,
        stop_ns: window.to_ns + drain.as_nanos() as u64,
    };
    for w in workers.iter_mut().chain(warm.iter_mut()) {
        w.go(&go)?;
    }
    let worker_pids: Vec<u32> = workers.iter().map(|w| w.child.id()).collect();
    if measure_publishing {
        eprintln!(
            "[{}] publishing: {:.1} s warm-up, {:.1} s measured, {:.1} s drain",
            t.name(),
            warmup.as_secs_f64(),
            window_len.as_secs_f64(),
            drain.as_secs_f64()
        );
    }
    sleep_until_ns(window.from_ns);
    let s_from = sample(pid)?;
    let g_from = workers_cpu(&worker_pids);
    sleep_until_ns(window.to_ns);
    let s_to = sample(pid)?;
    let g_to = workers_cpu(&worker_pids);

    let mut total_rec = Recorder::new(window);
    let mut first_error = None;
    let result_deadline = Instant::now() + drain + Duration::from_secs(60);
    for w in &workers {
        match w.next(result_deadline)? {
            WorkerReport::Result {
                recorder,
                first_error: e,
            } => {
                total_rec.merge(&recorder);
                if first_error.is_none() {
                    first_error = e;
                }
            }
            other => return Err(format!("unexpected worker report {other:?}")),
        }
    }
    let end = sample(pid)?;
    drop(warm);
    drop(workers);
    drop(server);

    let c = total_rec.counts;
    let win = window_len.as_secs_f64();
    let per = |num: u64, den: u64| (den > 0).then(|| num as f64 / den as f64);
    let tick_ns = proc_stats::tick_ns();
    let cpu = CpuWindow::between(&s_from.cpu, &s_to.cpu, tick_ns);
    let setup_cpu = CpuWindow::between(&base.cpu, &after_setup.cpu, tick_ns);
    let generator_cpu = CpuWindow::between(&g_from, &g_to, tick_ns);
    // µs: the split in whole ticks, the total in ns.
    let user = cpu.user_ns() / 1000;
    let system = cpu.system_ns() / 1000;
    let total = cpu.total_ns as f64 / 1000.0;
    let per_f = |num: f64, den: u64| (den > 0).then(|| num / den as f64);
    let server_fig = ServerFigures {
        rss_at_rest_bytes: at_rest.rss_bytes,
        rss_base_bytes: base.rss_bytes,
        rss_loaded_bytes: loaded.rss_bytes,
        rss_window_end_bytes: s_to.rss_bytes,
        rss_end_bytes: end.rss_bytes,
        // Idle: after the hold, when transient setup allocations have been
        // returned; otherwise right after setup, before traffic.
        rss_per_connection_bytes: if opened > 0 {
            let at = match scenario {
                Scenario::Idle { .. } => s_to.rss_bytes,
                _ => loaded.rss_bytes,
            };
            (at as f64 - base.rss_bytes as f64) / opened as f64
        } else {
            0.0
        },
        window_user_us: user,
        window_system_us: system,
        cpu_cores: if win > 0.0 { total / 1e6 / win } else { 0.0 },
        user_us_per_msg: per(user, c.window_msgs),
        system_us_per_msg: per(system, c.window_msgs),
        total_us_per_msg: per_f(total, c.window_msgs),
        user_us_per_frame: per(user, c.window_frames),
        setup_cpu_us_per_connection: per_f(setup_cpu.total_ns as f64 / 1000.0, opened),
        idle_cpu_us_per_connection_second: match scenario {
            Scenario::Idle { .. } if opened > 0 && win > 0.0 => Some(total / opened as f64 / win),
            _ => None,
        },
        window_cpu: cpu,
        setup_cpu,
    };
    let mut rep = Report {
        scenario: scenario.clone(),
        target: t.name().into(),
        protocol: proto.name().into(),
        banner,
        started_utc,
        host,
        connections: opened,
        warm_connections: o.warm_connections,
        workers: ranges.len(),
        source_ips,
        payload_bytes: o.payload_bytes,
        payload_kind: o.payload_kind.name().into(),
        compression: match (o.zstd, &o.zstd_dict) {
            (false, _) => "off".into(),
            (true, None) => "zstd (shardcast.v1+zstd)".into(),
            (true, Some((id, p))) => format!(
                "zstd (shardcast.v1+zstd), dictionary {id} = {}",
                p.display()
            ),
        },
        setup_secs,
        connects_per_sec: if setup_secs > 0.0 {
            opened as f64 / setup_secs
        } else {
            0.0
        },
        setup_latency: measure::percentiles(&total_rec.setup),
        warmup_secs: warmup.as_secs_f64(),
        window_secs: win,
        drain_secs: drain.as_secs_f64(),
        latency: measure::percentiles(&total_rec.latency),
        send_lag: measure::percentiles(&total_rec.send_lag),
        ack: measure::percentiles(&total_rec.ack),
        distribution: measure::distribution(&total_rec.latency),
        counts: c,
        lost: c.lost(),
        offered_per_sec: if win > 0.0 { c.sent as f64 / win } else { 0.0 },
        delivered_per_sec: if win > 0.0 {
            c.window_msgs as f64 / win
        } else {
            0.0
        },
        msgs_per_frame: per(c.window_msgs, c.window_frames).unwrap_or(0.0),
        wire_bytes_per_msg: per(c.window_wire_bytes, c.window_msgs),
        content_bytes_per_msg: per(c.window_content_bytes, c.window_msgs),
        server: server_fig,
        generator_cpu_cores: if win > 0.0 {
            generator_cpu.total_ns as f64 / 1e9 / win
        } else {
            0.0
        },
        generator_cpu,
        stopped_by: stopped_by.map(|s| {
            if failed > 0 {
                format!("{failed} connection(s) failed after {opened} opened: {s}")
            } else {
                s
            }
        }),
        first_error,
        verdict: vec![],
    };
    rep.verdict = report::verdict(&rep);
    Ok(rep)
}
