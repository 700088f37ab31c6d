//! The servers the bench can start and measure: shardcast itself (native
//! protocol, or its Pusher endpoint as `shardcast-pusher`), the in-crate
//! tokio-tungstenite baseline, NATS (WebSocket listener) and Sockudo. Each
//! is started on a free loopback port with the same number of threads, and
//! stopped (killed) when dropped.

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
    /// The same binary with a Pusher app configured, driven over Pusher
    /// protocol 7 (WebSocket subscribers, HTTP API publishers): the same
    /// clients and load as Sockudo.
    ShardcastPusher,
    Baseline,
    Nats,
    Sockudo,
}

/// Every target, in the order `compare` runs them: shardcast-pusher right
/// after native shardcast (same binary, the protocol is the difference)
/// and before Sockudo (same protocol, the server is the difference).
pub const ALL: [Target; 5] = [
    Target::Shardcast,
    Target::ShardcastPusher,
    Target::Baseline,
    Target::Nats,
    Target::Sockudo,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Shardcast => "shardcast",
            Target::ShardcastPusher => "shardcast-pusher",
            Target::Baseline => "baseline",
            Target::Nats => "nats",
            Target::Sockudo => "sockudo",
        }
    }

    pub fn parse(s: &str) -> Result<Target, String> {
        ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            let names: Vec<&str> = ALL.iter().map(|t| t.name()).collect();
            format!("unknown target {s:?} ({})", names.join(", "))
        })
    }

    /// `a,b,c` (compare's `--targets`), in the order given, each once.
    pub fn parse_list(s: &str) -> Result<Vec<Target>, String> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let t = Target::parse(name)?;
            if out.contains(&t) {
                return Err(format!("--targets names {name} twice"));
            }
            out.push(t);
        }
        if out.is_empty() {
            return Err("--targets needs at least one target".into());
        }
        Ok(out)
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
        Target::Shardcast | Target::ShardcastPusher => {
            if !o.shardcast.is_file() {
                return Err(format!(
                    "{} not found: build it with `cargo build --release -p shardcast` (or pass --server PATH)",
                    o.shardcast.display()
                ));
            }
            if t == Target::ShardcastPusher
                && !shardcast_flags(&o.shardcast)
                    .iter()
                    .any(|f| f == PUSHER_KEY_FLAG)
            {
                return Err(format!(
                    "{} has no Pusher endpoint (no {PUSHER_KEY_FLAG} in `shardcast keys`): build a newer one",
                    o.shardcast.display()
                ));
            }
            Ok(o.shardcast.clone())
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
        Target::Sockudo => on_path("sockudo").ok_or_else(|| crate::sockudo::INSTALL_HINT.into()),
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

/// The flag that turns shardcast's Pusher endpoint on.
const PUSHER_KEY_FLAG: &str = "--pusher-app-key";

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

/// `shardcast serve`'s arguments for a run: loopback on a free port,
/// `o.threads` shards, quiet logs; `flags` (from `shardcast keys`) says
/// which keys this build has. With `pusher`, the Pusher app of
/// `pusher.rs`, placed after `o.extra_args` because the clients know only
/// those credentials (the last occurrence of a flag wins).
fn shardcast_args(flags: &[String], o: &ServerOpts, pusher: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--server-listen",
        "127.0.0.1:0",
        "--log-level",
        "warn",
        "--server-shards",
    ]
    .map(String::from)
    .into();
    args.push(o.threads.to_string());
    // The bench publishes far above the per-connection message rate limit
    // meant for real clients, and runs several servers, so it turns the
    // limit up and the admin port off where this build has them.
    for (flag, value) in [
        ("--limits-messages-per-second", "1000000"),
        ("--limits-message-burst", "1000000"),
        ("--admin-listen", ""),
    ] {
        if flags.iter().any(|f| f == flag) && !o.extra_args.iter().any(|a| a == flag) {
            args.extend([flag.to_owned(), value.to_owned()]);
        }
    }
    args.extend(o.extra_args.iter().cloned());
    if pusher {
        use crate::pusher::{APP_ID, APP_KEY, APP_SECRET};
        for (flag, value) in [
            ("--pusher-app-id", APP_ID),
            ("--pusher-app-key", APP_KEY),
            ("--pusher-app-secret", APP_SECRET),
        ] {
            args.extend([flag.to_owned(), value.to_owned()]);
        }
    }
    args
}

pub fn start(t: Target, o: &ServerOpts) -> Result<Server, String> {
    let bin = availability(t, o)?;
    let threads = o.threads.to_string();
    match t {
        Target::Shardcast | Target::ShardcastPusher => {
            let pusher = t == Target::ShardcastPusher;
            let args = shardcast_args(&shardcast_flags(&bin), o, pusher);
            let mut child = Command::new(&bin)
                .args(&args)
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            let banner = first_line(&mut child, Duration::from_secs(15))?;
            let addr = addr_from_banner(&banner)?;
            let banner = banner.trim();
            Ok(Server {
                proto: if pusher { Proto::Pusher } else { Proto::Native },
                addr,
                pid: child.id(),
                banner: if pusher {
                    format!("{banner} pusher-v7 app {}", crate::pusher::APP_ID)
                } else {
                    banner.to_owned()
                },
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
            let (child, addr, banner) = crate::sockudo::spawn_server(&bin, &dir, o.threads)?;
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
    fn target_names() {
        for t in ALL {
            assert_eq!(Target::parse(t.name()), Ok(t));
        }
        let e = Target::parse("pusher").unwrap_err();
        assert!(
            e.contains("shardcast-pusher") && e.contains("sockudo"),
            "{e}"
        );
        assert_eq!(
            Target::parse_list("shardcast, shardcast-pusher,sockudo"),
            Ok(vec![
                Target::Shardcast,
                Target::ShardcastPusher,
                Target::Sockudo
            ])
        );
        assert!(Target::parse_list("shardcast,shardcast").is_err());
        assert!(Target::parse_list(",").is_err());
        assert!(Target::parse_list("shardcast,nope").is_err());
    }

    fn opts(extra: &[&str]) -> ServerOpts {
        ServerOpts {
            shardcast: PathBuf::from("shardcast"),
            threads: 3,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn value<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn shardcast_arguments() {
        let flags: Vec<String> = ["--limits-messages-per-second", "--admin-listen"]
            .map(String::from)
            .into();
        let native = shardcast_args(&flags, &opts(&["--fanout-tick-pause-ms", "0"]), false);
        assert_eq!(native[0], "serve");
        assert_eq!(value(&native, "--server-shards"), ["3"]);
        assert_eq!(value(&native, "--server-listen"), ["127.0.0.1:0"]);
        // Only the keys this build has; the user's extra args are passed.
        assert_eq!(value(&native, "--limits-messages-per-second"), ["1000000"]);
        assert!(value(&native, "--limits-message-burst").is_empty());
        assert_eq!(value(&native, "--fanout-tick-pause-ms"), ["0"]);
        assert!(!native.iter().any(|a| a.starts_with("--pusher")));
        // A limit the user sets is not set twice.
        let own = shardcast_args(&flags, &opts(&["--limits-messages-per-second", "5"]), false);
        assert_eq!(value(&own, "--limits-messages-per-second"), ["5"]);

        // shardcast-pusher: everything native has, plus the bench's app,
        // last, so a user's --pusher-app-key cannot leave the clients with
        // the wrong credentials.
        let p = shardcast_args(&flags, &opts(&["--pusher-app-key", "other"]), true);
        assert_eq!(&p[..native.len() - 2], &native[..native.len() - 2]);
        assert_eq!(value(&p, "--pusher-app-id"), [crate::pusher::APP_ID]);
        assert_eq!(
            value(&p, "--pusher-app-key").last(),
            Some(&crate::pusher::APP_KEY)
        );
        assert_eq!(
            value(&p, "--pusher-app-secret"),
            [crate::pusher::APP_SECRET]
        );
        assert_eq!(p[p.len() - 6], "--pusher-app-id");
    }

    #[test]
    fn reads_own_nofile() {
        assert!(process_nofile(std::process::id()).unwrap() > 0);
    }
}
