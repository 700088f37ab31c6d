//! `idle`: what an idle connection costs the server.
//!
//! Opens a warm-up batch first (so one-time allocations such as per-shard
//! buffers and allocator arenas are already paid), samples the server's RSS,
//! opens the measured connections, lets them sit, samples again, and divides.
//! Kernel socket memory is not in RSS and is not counted.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use shardcast::protocol::wire::{self, ClientEncoder, DecodeLimits, ServerMessage};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::proc_stats;

const WARMUP: usize = 200;

struct Options {
    connections: usize,
    server: String,
    shards: u32,
    subscribe: bool,
    hold: Duration,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut o = Options {
        connections: 10_000,
        server: exe
            .with_file_name("shardcast")
            .to_string_lossy()
            .into_owned(),
        shards: 2,
        subscribe: false,
        hold: Duration::from_secs(3),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--connections" => {
                o.connections = val()?.parse().map_err(|e| format!("--connections: {e}"))?
            }
            "--server" => o.server = val()?,
            "--shards" => o.shards = val()?.parse().map_err(|e| format!("--shards: {e}"))?,
            "--hold-secs" => {
                o.hold =
                    Duration::from_secs(val()?.parse().map_err(|e| format!("--hold-secs: {e}"))?)
            }
            "--subscribe" => o.subscribe = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// Raises the soft fd limit to the hard one; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        r.rlim_cur
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let limit = raise_nofile();
    let needed = (o.connections + WARMUP + 64) as u64;
    if limit < needed {
        return Err(format!(
            "RLIMIT_NOFILE is {limit} but {needed} descriptors are needed: lower --connections or raise the hard limit (see tuning/)"
        ));
    }
    let mut child = Command::new(&o.server)
        .args([
            "serve",
            "--server-listen",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .args(["--server-shards", &o.shards.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e} (build it with cargo build --release)",
                o.server
            )
        })?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr: SocketAddr = line
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .ok_or(format!("unexpected server output {line:?}"))?;
    let pid = child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = rt.block_on(measure(&o, addr, pid));
    let _ = child.kill();
    let _ = child.wait();
    let r = result?;
    println!("scenario           idle");
    println!(
        "driver             {}",
        line.split("driver=").nth(1).unwrap_or("?").trim()
    );
    println!("shards             {}", o.shards);
    println!("connections        {} (+{WARMUP} warm-up)", o.connections);
    println!("subscribed         {}", o.subscribe);
    println!("connect time       {:.2} s", r.connect_secs);
    println!(
        "server RSS before  {:.1} MiB",
        r.before.rss_bytes as f64 / 1048576.0
    );
    println!(
        "server RSS after   {:.1} MiB",
        r.after.rss_bytes as f64 / 1048576.0
    );
    println!(
        "RSS per connection {:.0} bytes",
        (r.after.rss_bytes as f64 - r.before.rss_bytes as f64) / o.connections as f64
    );
    println!(
        "server CPU while idle for {:.0}s: user {} µs, system {} µs",
        o.hold.as_secs_f64(),
        r.idle_end.user_us - r.after.user_us,
        r.idle_end.system_us - r.after.system_us
    );
    Ok(())
}

struct Measured {
    before: proc_stats::ProcSample,
    after: proc_stats::ProcSample,
    idle_end: proc_stats::ProcSample,
    connect_secs: f64,
}

async fn measure(o: &Options, addr: SocketAddr, pid: u32) -> Result<Measured, String> {
    let sample = || proc_stats::sample(pid).map_err(|e| format!("reading server /proc: {e}"));
    let mut held = open_many(addr, WARMUP, o.subscribe).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = sample()?;
    let t0 = Instant::now();
    held.extend(open_many(addr, o.connections, o.subscribe).await?);
    let connect_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = sample()?;
    tokio::time::sleep(o.hold).await;
    let idle_end = sample()?;
    drop(held);
    Ok(Measured {
        before,
        after,
        idle_end,
        connect_secs,
    })
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_many(addr: SocketAddr, n: usize, subscribe: bool) -> Result<Vec<Ws>, String> {
    const PARALLEL: usize = 128;
    let mut out = Vec::with_capacity(n);
    let mut started = 0;
    while started < n {
        let batch = PARALLEL.min(n - started);
        let tasks: Vec<_> = (0..batch)
            .map(|i| tokio::spawn(open_one(addr, subscribe, started + i)))
            .collect();
        for t in tasks {
            out.push(t.await.map_err(|e| e.to_string())??);
        }
        started += batch;
    }
    Ok(out)
}

async fn open_one(addr: SocketAddr, subscribe: bool, n: usize) -> Result<Ws, String> {
    let mut req = format!("ws://{addr}/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "shardcast.v1".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| format!("connection {n}: {e}"))?;
    let mut enc = ClientEncoder::new();
    ws.send(Message::Binary(enc.connect(1, None).into()))
        .await
        .map_err(|e| e.to_string())?;
    let mut want = 1;
    if subscribe {
        let channel = format!("idle-{}", n % 1000);
        ws.send(Message::Binary(enc.subscribe(2, &channel, None).into()))
            .await
            .map_err(|e| e.to_string())?;
        want = 2;
    }
    let mut got = 0;
    while got < want {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                for (_, m) in wire::decode_server_frame(&b, &DecodeLimits::default())
                    .map_err(|e| e.to_string())?
                {
                    match m {
                        ServerMessage::Connected { .. } | ServerMessage::Subscribed { .. } => {
                            got += 1
                        }
                        ServerMessage::Error { message, .. } => {
                            return Err(format!("server error: {message}"))
                        }
                        _ => {}
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("connection {n}: {e}")),
            None => return Err(format!("connection {n} closed during setup")),
        }
    }
    Ok(ws)
}
