//! The servers the bench can start and measure: shardcast itself, the
//! in-crate tokio-tungstenite baseline, NATS (WebSocket listener) and
//! Sockudo. Each is started on a free loopback port with the same number of
//! threads, and stopped (killed) when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::proto::Proto;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Shardcast,
    Baseline,
    Nats,
    Sockudo,
}

pub const ALL: [Target; 4] = [
    Target::Shardcast,
    Target::Baseline,
    Target::Nats,
    Target::Sockudo,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Shardcast => "shardcast",
            Target::Baseline => "baseline",
            Target::Nats => "nats",
            Target::Sockudo => "sockudo",
        }
    }

    pub fn parse(s: &str) -> Result<Target, String> {
        ALL.into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown target {s:?} (shardcast, baseline, nats, sockudo)"))
    }
}

/// How to start servers.
#[derive(Clone, Debug)]
pub struct ServerOpts {
    /// Path of the shardcast binary.
    pub shardcast: PathBuf,
    /// Threads (shards, tokio workers, GOMAXPROCS).
    pub threads: u32,
    /// Extra arguments for shardcast.
    pub extra_args: Vec<String>,
}

/// A running server.
pub struct Server {
    pub proto: Proto,
    pub addr: SocketAddr,
    pub pid: u32,
    /// What it said about itself (first output line or version).
    pub banner: String,
    child: Child,
    _tmp: Option<TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .map(|e| e.with_file_name(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

/// Whether `t` can be started here; if not, how to get it.
pub fn availability(t: Target, o: &ServerOpts) -> Result<PathBuf, String> {
    match t {
        Target::Shardcast => {
            if o.shardcast.is_file() {
                Ok(o.shardcast.clone())
            } else {
                Err(format!(
                    "{} not found: build it with `cargo build --release -p shardcast` (or pass --server PATH)",
                    o.shardcast.display()
                ))
            }
        }
        Target::Baseline => {
            let p = sibling("bench-baseline");
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!(
                    "{} not found: build it with `cargo build --release -p shardcast-bench`",
                    p.display()
                ))
            }
        }
        Target::Nats => on_path("nats-server").ok_or_else(|| {
            "nats-server not installed: `apt-get install nats-server` (Debian/Ubuntu), or a release from the NATS project".into()
        }),
        Target::Sockudo => on_path("sockudo").ok_or_else(|| crate::pusher::INSTALL_HINT.into()),
    }
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Reads the first stdout line (with a deadline) and keeps draining the
/// rest so the child never blocks on a full pipe.
fn first_line(child: &mut Child, within: Duration) -> Result<String, String> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    rx.recv_timeout(within)
        .map_err(|_| "the server printed no address in time".to_string())
}

fn addr_from_banner(line: &str) -> Result<SocketAddr, String> {
    line.split_whitespace()
        .find_map(|w| w.parse().ok())
        .ok_or_else(|| format!("unexpected server output {line:?}"))
}

/// The `--key` flags this shardcast build accepts (from `shardcast keys`).
fn shardcast_flags(bin: &Path) -> Vec<String> {
    Command::new(bin)
        .arg("keys")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter(|w| w.starts_with("--"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

pub fn start(t: Target, o: &ServerOpts) -> Result<Server, String> {
    let bin = availability(t, o)?;
    let threads = o.threads.to_string();
    match t {
        Target::Shardcast => {
            let flags = shardcast_flags(&bin);
            let mut cmd = Command::new(&bin);
            cmd.args([
                "serve",
                "--server-listen",
                "127.0.0.1:0",
                "--log-level",
                "warn",
            ])
            .args(["--server-shards", &threads]);
            // The bench publishes far above the per-connection message
            // rate limit meant for real clients, and runs several servers,
            // so it turns the limit up and the admin port off where this
            // build has them.
            for (flag, value) in [
                ("--limits-messages-per-second", "1000000"),
                ("--limits-message-burst", "1000000"),
                ("--admin-listen", ""),
            ] {
                if flags.iter().any(|f| f == flag) && !o.extra_args.iter().any(|a| a == flag) {
                    cmd.args([flag, value]);
                }
            }
            cmd.args(&o.extra_args);
            let mut child = cmd
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            let banner = first_line(&mut child, Duration::from_secs(15))?;
            let addr = addr_from_banner(&banner)?;
            Ok(Server {
                proto: Proto::Native,
                addr,
                pid: child.id(),
                banner: banner.trim().to_owned(),
                child,
                _tmp: None,
            })
        }
        Target::Baseline => {
            let mut child = Command::new(&bin)
                .args(["--listen", "127.0.0.1:0", "--threads", &threads])
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            let banner = first_line(&mut child, Duration::from_secs(15))?;
            let addr = addr_from_banner(&banner)?;
            Ok(Server {
                proto: Proto::Baseline,
                addr,
                pid: child.id(),
                banner: banner.trim().to_owned(),
                child,
                _tmp: None,
            })
        }
        Target::Nats => {
            let dir =
                std::env::temp_dir().join(format!("shardcast-bench-nats-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let tmp = TempDir(dir.clone());
            let (client_port, ws_port) = (free_port()?, free_port()?);
            let conf = dir.join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "# written by shardcast-bench\nlisten: \"127.0.0.1:{client_port}\"\nmax_connections: 1000000\nmax_payload: 1048576\nwrite_deadline: \"10s\"\nwebsocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n  compression: false\n}}\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            let version = Command::new(&bin)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .env("GOMAXPROCS", &threads)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            let addr: SocketAddr = format!("127.0.0.1:{ws_port}").parse().expect("valid");
            let t0 = Instant::now();
            while TcpStream::connect(addr).is_err() {
                if t0.elapsed() > Duration::from_secs(15) {
                    return Err("nats-server did not open its WebSocket port".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(Server {
                proto: Proto::Nats,
                addr,
                pid: child.id(),
                banner: format!("{version} websocket on {addr} GOMAXPROCS={threads}"),
                child,
                _tmp: Some(tmp),
            })
        }
        Target::Sockudo => {
            let dir = std::env::temp_dir()
                .join(format!("shardcast-bench-sockudo-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let tmp = TempDir(dir.clone());
            let (child, addr, banner) = crate::pusher::spawn_server(&bin, &dir, o.threads)?;
            Ok(Server {
                proto: Proto::Pusher,
                addr,
                pid: child.id(),
                banner,
                child,
                _tmp: Some(tmp),
            })
        }
    }
}

/// The soft RLIMIT_NOFILE of a running process (from /proc/PID/limits).
pub fn process_nofile(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_address() {
        assert_eq!(
            addr_from_banner("shardcast listening on 127.0.0.1:4567 shards=2 driver=io_uring")
                .unwrap(),
            "127.0.0.1:4567".parse::<SocketAddr>().unwrap()
        );
        assert!(addr_from_banner("nothing here").is_err());
    }

    #[test]
    fn reads_own_nofile() {
        assert!(process_nofile(std::process::id()).unwrap() > 0);
    }
}
