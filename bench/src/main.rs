//! `shardcast-bench`: load scenarios against a self-started shardcast (or a
//! peer server), measured open-loop from the clients and from the server's
//! side (/proc). See bench/README.md.

mod clock;
mod coord;
mod measure;
mod net;
mod payload;
mod plan;
mod precision;
mod proc_stats;
mod proto;
mod pusher;
mod report;
mod sockudo;
mod target;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use coord::RunOpts;
use plan::Scenario;
use target::{ServerOpts, Target};

const USAGE: &str = "\
shardcast-bench — load scenarios for shardcast

USAGE:
    shardcast-bench <scenario> [options]           run against one server
    shardcast-bench compare <scenario> [options]   run against every available
                                                   server, one after another
                    [--targets T,T,...]            (or these, in this order)
    shardcast-bench samples [--payload B] [--payload-kind K] [--count N]
                                                   print N payloads, one a line
                                                   (to train a zstd dictionary)

SCENARIOS (defaults in brackets):
    fanout   --subscribers N [10000] --publishers P [1] --rate MSG/S [10]
             P publishers → one channel with N subscribers; rate is the total
    rooms    --rooms R [100] --members M [10] --rate MSG/S [1]
             every member subscribes to its room and publishes `rate` msg/s
    direct   --users N [2000] --rate MSG/S [5] --peers K [4]
             each user subscribes to inbox.<i> and sends `rate` msg/s to K others
    connect  --connections N [10000]
             connection storm: handshake + Connect + Subscribe, time to N
    idle     --connections N [10000] [--subscribe]
             N idle connections: server RSS and CPU per connection

OPTIONS:
    --target T          shardcast | shardcast-pusher | baseline | nats |
                        sockudo [shardcast]; shardcast-pusher is shardcast
                        driven over Pusher protocol 7 like sockudo
    --server PATH       shardcast binary [target/release/shardcast next to this one]
    --shards N          server threads (shards / tokio workers / GOMAXPROCS) [2]
    --server-arg ARG    extra argument for shardcast serve (repeatable)
    --duration S        measured seconds (idle: hold time) [10]
    --warmup S          warm-up seconds, not measured [2]
    --drain S           seconds to wait for deliveries after the window [2]
    --payload BYTES     publication payload size [64]
    --payload-kind K    pad: stamp + '.' padding | json: stamp + a chat
                        message as JSON, varying fields, >= ~150 B [pad]
    --zstd              shardcast: every connection negotiates
                        shardcast.v1+zstd and decompresses what it receives
    --zstd-dict FILE    with --zstd: give the server this dictionary
                        (--compression-dictionary; its id is derived from
                        its content) and the clients too
    --per-worker N      connections per load-generator process [9000]
    --source-ips N      spread connections over 127.0.0.1..N [one per 25,000]
    --concurrency N     handshakes in flight per worker process [256]
    --warm-connections N  idle connections opened before the base RSS sample [200]
    --out DIR           results directory [./shardcast-bench-results]
    --no-files          print only, write nothing

Each run writes <out>/<scenario>-<target>-<utc time>/ with result.json,
report.md, table.txt and latency.svg.
";

fn num<T: std::str::FromStr>(flag: &str, v: Option<&String>) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.ok_or(format!("{flag} needs a value"))?
        .parse()
        .map_err(|e| format!("{flag}: {e}"))
}

struct Cli {
    scenario: Scenario,
    target: Target,
    run: RunOpts,
}

fn parse(name: &str, args: &[String]) -> Result<Cli, String> {
    let mut scenario = match name {
        "fanout" => Scenario::Fanout {
            subscribers: 10_000,
            publishers: 1,
            rate: 10.0,
        },
        "rooms" => Scenario::Rooms {
            rooms: 100,
            members: 10,
            rate: 1.0,
        },
        "direct" => Scenario::Direct {
            users: 2_000,
            rate: 5.0,
            peers: 4,
        },
        "connect" => Scenario::Connect {
            connections: 10_000,
        },
        "idle" => Scenario::Idle {
            connections: 10_000,
            subscribe: false,
        },
        other => return Err(format!("unknown scenario {other:?}\n\n{USAGE}")),
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut target = Target::Shardcast;
    let mut run = RunOpts {
        server: ServerOpts {
            shardcast: exe.with_file_name("shardcast"),
            threads: 2,
            extra_args: vec![],
        },
        warmup: Duration::from_secs(2),
        duration: Duration::from_secs(10),
        drain: Duration::from_secs(2),
        payload_bytes: 64,
        payload_kind: payload::Kind::Pad,
        zstd: false,
        zstd_dict: None,
        per_worker: 9_000,
        source_ips: None,
        concurrency: 256,
        warm_connections: 200,
        out_dir: PathBuf::from(report::DEFAULT_OUT),
        write_files: true,
    };
    let secs = |f: &str, v: Option<&String>| -> Result<Duration, String> {
        let s: f64 = num(f, v)?;
        if !(0.0..=3600.0).contains(&s) {
            return Err(format!("{f}: 0–3600 seconds"));
        }
        Ok(Duration::from_secs_f64(s))
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.as_str();
        match (a, &mut scenario) {
            ("--subscribers", Scenario::Fanout { subscribers, .. }) => {
                *subscribers = num(a, it.next())?
            }
            ("--publishers", Scenario::Fanout { publishers, .. }) => {
                *publishers = num(a, it.next())?
            }
            (
                "--rate",
                Scenario::Fanout { rate, .. }
                | Scenario::Rooms { rate, .. }
                | Scenario::Direct { rate, .. },
            ) => {
                *rate = num(a, it.next())?;
                if !(*rate > 0.0 && *rate <= 10_000_000.0) {
                    return Err("--rate must be in (0, 10,000,000]".into());
                }
            }
            ("--rooms", Scenario::Rooms { rooms, .. }) => *rooms = num(a, it.next())?,
            ("--members", Scenario::Rooms { members, .. }) => *members = num(a, it.next())?,
            ("--users", Scenario::Direct { users, .. }) => *users = num(a, it.next())?,
            ("--peers", Scenario::Direct { peers, .. }) => *peers = num(a, it.next())?,
            (
                "--connections",
                Scenario::Connect { connections } | Scenario::Idle { connections, .. },
            ) => *connections = num(a, it.next())?,
            ("--subscribe", Scenario::Idle { subscribe, .. }) => *subscribe = true,
            ("--target", _) => target = Target::parse(it.next().ok_or("--target needs a value")?)?,
            ("--server", _) => {
                run.server.shardcast = PathBuf::from(it.next().ok_or("--server needs a value")?)
            }
            ("--shards", _) => run.server.threads = num(a, it.next())?,
            ("--server-arg", _) => run
                .server
                .extra_args
                .push(it.next().ok_or("--server-arg needs a value")?.clone()),
            ("--duration", _) => run.duration = secs(a, it.next())?,
            ("--warmup", _) => run.warmup = secs(a, it.next())?,
            ("--drain", _) => run.drain = secs(a, it.next())?,
            ("--payload", _) => run.payload_bytes = num(a, it.next())?,
            ("--payload-kind", _) => {
                run.payload_kind =
                    payload::Kind::parse(it.next().ok_or("--payload-kind needs a value")?)?
            }
            ("--zstd", _) => run.zstd = true,
            ("--zstd-dict", _) => {
                let p = PathBuf::from(it.next().ok_or("--zstd-dict needs a file")?);
                // Workers and the server may run elsewhere than here.
                let p = std::fs::canonicalize(&p)
                    .map_err(|e| format!("--zstd-dict {}: {e}", p.display()))?;
                // The server derives the id from the content: so do we.
                let bytes =
                    std::fs::read(&p).map_err(|e| format!("--zstd-dict {}: {e}", p.display()))?;
                let id = shardcast::protocol::compression::dictionary_id(&bytes);
                run.zstd_dict = Some((id, p));
            }
            ("--per-worker", _) => run.per_worker = num(a, it.next())?,
            ("--source-ips", _) => run.source_ips = Some(num(a, it.next())?),
            ("--concurrency", _) => run.concurrency = num(a, it.next())?,
            ("--warm-connections", _) => run.warm_connections = num(a, it.next())?,
            ("--out", _) => run.out_dir = PathBuf::from(it.next().ok_or("--out needs a value")?),
            ("--no-files", _) => run.write_files = false,
            (other, _) => return Err(format!("unknown option {other} for {name}\n\n{USAGE}")),
        }
    }
    if let Some((_, p)) = &run.zstd_dict {
        if !run.zstd {
            return Err("--zstd-dict needs --zstd".into());
        }
        run.server
            .extra_args
            .extend(["--compression-dictionary".into(), p.display().to_string()]);
    }
    if run.zstd && target != Target::Shardcast {
        return Err("--zstd is shardcast's zstd framing: only with --target shardcast".into());
    }
    if scenario.connections() == 0 {
        return Err("the scenario has no connections".into());
    }
    if run.duration.is_zero() {
        return Err("--duration must be > 0".into());
    }
    if !(1..=1_000_000).contains(&run.payload_bytes) {
        return Err("--payload: 1–1,000,000 bytes".into());
    }
    if !(1..=18_000).contains(&run.per_worker) {
        return Err("--per-worker: 1–18,000 (a process may hold 20,000 fds)".into());
    }
    if run.source_ips == Some(0) || run.source_ips.is_some_and(|n| n > 65_000) {
        return Err("--source-ips: 1–65,000".into());
    }
    Ok(Cli {
        scenario,
        target,
        run,
    })
}

fn run_one(name: &str, args: &[String]) -> Result<(), String> {
    let cli = parse(name, args)?;
    let rep = coord::run(cli.target, &cli.scenario, &cli.run)?;
    println!("{}", report::table(&rep));
    if cli.run.write_files {
        let dir = report::result_dir(
            &cli.run.out_dir,
            &format!("{}-{}", rep.scenario.name(), rep.target),
            &rep.started_utc,
        )?;
        report::write_files(&rep, &dir)?;
        println!("results: {}", dir.display());
    }
    if rep.stopped_by.is_some() {
        return Err("the run was stopped early (see STOPPED BY)".into());
    }
    Ok(())
}

fn compare(args: &[String]) -> Result<(), String> {
    let name = args
        .first()
        .ok_or(format!("compare needs a scenario\n\n{USAGE}"))?;
    if args.iter().any(|a| a == "--target") {
        return Err("compare runs every target (or --targets a,b,…); drop --target".into());
    }
    if args.iter().any(|a| a.starts_with("--zstd")) {
        return Err("--zstd is shardcast-only; run it without compare".into());
    }
    let (targets, rest) = compare_targets(&args[1..])?;
    let cli = parse(name, &rest)?;
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for t in targets {
        if let Err(why) = target::availability(t, &cli.run.server) {
            eprintln!("skipping {}: {why}", t.name());
            skipped.push((t.name().to_string(), why));
            continue;
        }
        match coord::run(t, &cli.scenario, &cli.run) {
            Ok(r) => {
                println!("{}", report::table(&r));
                if cli.run.write_files {
                    let dir = report::result_dir(
                        &cli.run.out_dir,
                        &format!("{}-{}", r.scenario.name(), r.target),
                        &r.started_utc,
                    )?;
                    report::write_files(&r, &dir)?;
                }
                runs.push(r);
            }
            Err(e) => {
                eprintln!("{} failed: {e}", t.name());
                skipped.push((t.name().to_string(), format!("run failed: {e}")));
            }
        }
        // Let the kernel settle TIME_WAIT sockets and the page cache between
        // servers.
        std::thread::sleep(Duration::from_secs(2));
    }
    if runs.is_empty() {
        return Err("no server could be run".into());
    }
    let text = report::compare_table(&runs, &skipped, false);
    println!("compare {name}\n\n{text}");
    if cli.run.write_files {
        let stamp = clock::utc_stamp();
        let dir = report::result_dir(&cli.run.out_dir, &format!("compare-{name}"), &stamp)?;
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let series: Vec<(&str, &[(f64, u64)])> = runs
            .iter()
            .map(|r| (r.target.as_str(), r.distribution.as_slice()))
            .collect();
        let svg = report::svg(&format!("{name}: latency by server"), &series);
        let md = format!(
            "# shardcast-bench compare {name}\n\nRun {stamp} UTC; scenario: `{}`.\n\n{}\n![latency percentiles](latency.svg)\n\nPer-server reports: the `{name}-<server>-*` directories next to this one.\n",
            serde_json::to_string(&cli.scenario).unwrap_or_default(),
            report::compare_table(&runs, &skipped, true)
        );
        let w = |f: &str, body: String| {
            std::fs::write(dir.join(f), body).map_err(|e| format!("{f}: {e}"))
        };
        w("latency.svg", svg)?;
        w("compare.md", md)?;
        w("compare.txt", text)?;
        w(
            "compare.json",
            serde_json::to_string_pretty(&runs).map_err(|e| e.to_string())?,
        )?;
        println!("results: {}", dir.display());
    }
    Ok(())
}

/// `compare`'s `--targets a,b,…` (default: every target) and the other
/// arguments, which are the scenario's.
fn compare_targets(args: &[String]) -> Result<(Vec<Target>, Vec<String>), String> {
    let mut targets = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--targets" {
            let list = it
                .next()
                .ok_or("--targets needs a list, e.g. shardcast,sockudo")?;
            targets = Some(Target::parse_list(list)?);
        } else {
            rest.push(a.clone());
            // A server argument is the server's, whatever it says.
            if a == "--server-arg" {
                rest.extend(it.next().cloned());
            }
        }
    }
    Ok((targets.unwrap_or_else(|| target::ALL.to_vec()), rest))
}

/// `samples`: payloads as the bench sends them, one a line, for
/// `shardcast zstd-train --lines`.
fn samples(args: &[String]) -> Result<(), String> {
    let (mut size, mut kind, mut count) = (64usize, payload::Kind::Pad, 2000u64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--payload" => size = num(a, it.next())?,
            "--payload-kind" => {
                kind = payload::Kind::parse(it.next().ok_or("--payload-kind needs a value")?)?
            }
            "--count" => count = num(a, it.next())?,
            other => return Err(format!("unknown option {other} for samples")),
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut buf = Vec::new();
    // Streams, sequence numbers and times like a run's, but not a run's:
    // the dictionary must not have seen the measured messages.
    for i in 0..count {
        let stamp = payload::Stamp {
            stream: 0xFFFF_0000 + i % 16,
            seq: i / 16,
            intended_ns: 1_000_000_000_000 + i * 1_000_000,
        };
        payload::write(kind, stamp, size, &mut buf);
        buf.push(b'\n');
        std::io::Write::write_all(&mut out, &buf).map_err(|e| e.to_string())?;
    }
    std::io::Write::flush(&mut out).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("worker") => worker::main(),
        Some("compare") => compare(&args[1..]),
        Some("samples") => samples(&args[1..]),
        Some("--help" | "-h" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(name) => run_one(name, &args[1..]),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardcast-bench: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn compare_runs_every_target_or_the_listed_ones() {
        let (t, rest) = compare_targets(&args("--rate 5")).unwrap();
        assert_eq!(t, target::ALL.to_vec());
        assert_eq!(rest, args("--rate 5"));
        let (t, rest) = compare_targets(&args(
            "--subscribers 9 --targets shardcast-pusher,sockudo --server-arg --targets",
        ))
        .unwrap();
        assert_eq!(t, [Target::ShardcastPusher, Target::Sockudo]);
        assert_eq!(rest, args("--subscribers 9 --server-arg --targets"));
        assert!(compare_targets(&args("--targets")).is_err());
        assert!(compare_targets(&args("--targets shardcast,redis")).is_err());
    }

    #[test]
    fn pusher_target_parses_and_refuses_zstd() {
        let cli = parse("fanout", &args("--target shardcast-pusher --subscribers 5")).unwrap();
        assert_eq!(cli.target, Target::ShardcastPusher);
        assert!(parse("fanout", &args("--target shardcast-pusher --zstd")).is_err());
    }
}
