//! A real `redis-server` for tests: the Redis integration tests use it
//! through `tests/common`, and the Redis bus's unit tests include this same
//! file (`#[path]` in `src/bus/redis/tests.rs`), so there is one copy.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long `redis-server` may take to answer its first `PING`.
const START_WAIT: Duration = Duration::from_secs(20);

/// Ports `start` tries. A free port is only probed (bound, then released),
/// so another test's `redis-server` may take it before ours binds it.
const PORT_ATTEMPTS: usize = 5;

/// The server's `--logfile` and its stderr (errors from before the log is
/// set up), in its directory; shown if the test panics.
const LOG: &str = "redis.log";
const STDERR: &str = "redis.stderr";

/// Lines of each shown at most.
const LOG_TAIL: usize = 60;

/// A real `redis-server` on a free loopback port with its own temporary
/// directory, for the Redis bus tests; killed (SIGKILL) on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    appendonly: bool,
}

impl RedisServer {
    /// Starts `redis-server` with no RDB snapshots and, if `appendonly`,
    /// an append-only file fsynced on every write.
    pub fn start(appendonly: bool) -> RedisServer {
        let mut s = RedisServer {
            child: None,
            port: 0,
            dir: Self::fresh_dir(),
            appendonly,
        };
        for _ in 0..PORT_ATTEMPTS {
            s.port = free_port();
            match s.spawn() {
                Ok(()) => return s,
                // A setup collision, not a test failure: try another port.
                Err(why) => eprintln!("redis-server: port {} is not ours ({why})", s.port),
            }
        }
        panic!("redis-server found no port of its own in {PORT_ATTEMPTS} attempts");
    }

    /// A server with its port and directory chosen but not started: for a
    /// test of what happens before Redis is up. [`RedisServer::start_now`]
    /// starts it on that port.
    pub fn reserve(appendonly: bool) -> RedisServer {
        RedisServer {
            child: None,
            port: free_port(),
            dir: Self::fresh_dir(),
            appendonly,
        }
    }

    /// Starts a [`RedisServer::reserve`]d server on its port.
    pub fn start_now(&mut self) {
        self.respawn();
    }

    fn fresh_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sc-it-redis-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        dir
    }

    /// Spawns `redis-server` on `self.port` and waits until it answers.
    /// `Err` if the port is not ours after all: another server answers on
    /// it (a `PONG` alone would pass for ours), or ours could not bind it.
    fn spawn(&mut self) -> Result<(), String> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(STDERR))
            .expect("redis-server stderr file");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", if self.appendonly { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join(LOG))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)");
        let pid = child.id();
        self.child = Some(child);
        let until = Instant::now() + START_WAIT;
        loop {
            if let Some(status) = self.exited() {
                return self.exited_early(pid, status);
            }
            if self.cli(&["PING"]).trim() == "PONG" {
                match self.serving_pid() {
                    Some(p) if p == pid => return Ok(()),
                    Some(p) => {
                        self.kill();
                        return Err(format!("pid {p} answers on it, ours is {pid}"));
                    }
                    // Answered PING but not INFO: look again.
                    None => {}
                }
            }
            assert!(
                Instant::now() < until,
                "redis-server (pid {pid}) did not answer PING on port {} within {START_WAIT:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Our `redis-server`'s exit status, if it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("try_wait redis-server")
    }

    /// Ours (`pid`) exited before answering: `Err` if its port was taken
    /// (its own log lines say so; the log is appended to across attempts),
    /// a panic otherwise (the log is shown on drop).
    fn exited_early(&mut self, pid: u32, status: ExitStatus) -> Result<(), String> {
        self.child = None;
        let log = std::fs::read_to_string(self.dir.join(LOG)).unwrap_or_default();
        let ours = format!("{pid}:");
        if log
            .lines()
            .any(|l| l.starts_with(&ours) && l.contains("Address already in use"))
        {
            return Err(format!("ours exited ({status}): address already in use"));
        }
        panic!(
            "redis-server on port {} exited ({status}) before answering PING",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The pid of our `redis-server`, while it has not been killed.
    pub fn child_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The pid of whichever `redis-server` answers on our port (`INFO
    /// server`), if one does: ours unless the port was taken.
    pub fn serving_pid(&self) -> Option<u32> {
        let info = self.cli(&["INFO", "server"]);
        info.lines()
            .find_map(|l| l.trim().strip_prefix("process_id:"))
            .and_then(|p| p.parse().ok())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory (the append-only
    /// file, if any, is replayed).
    pub fn restart(&mut self) {
        self.kill();
        self.respawn();
    }

    /// Starts it again on the same port with a fresh, empty directory and
    /// no persistence: everything is lost (but the log, kept for a trace).
    pub fn restart_empty(&mut self) {
        self.kill();
        let old = std::mem::replace(&mut self.dir, Self::fresh_dir());
        for name in [LOG, STDERR] {
            let _ = std::fs::rename(old.join(name), self.dir.join(name));
        }
        let _ = std::fs::remove_dir_all(&old);
        self.appendonly = false;
        self.respawn();
    }

    /// Spawns on the same port: the nodes under test have its URL, so a
    /// port taken while Redis was down cannot be swapped for another.
    fn respawn(&mut self) {
        if let Err(why) = self.spawn() {
            panic!(
                "redis-server could not restart on port {}: taken while it was down ({why})",
                self.port
            );
        }
    }

    /// Runs one `redis-cli` command; its stdout, or "" if redis-cli could
    /// not reach Redis — for callers that expect Redis to be down at times.
    /// Where that must not pass for an empty answer, use `cli_checked`.
    pub fn cli(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.run_cli(args).stdout).into_owned()
    }

    /// Runs one `redis-cli` command that must reach Redis; its stdout.
    /// Panics with redis-cli's exit status and stderr if it fails (an error
    /// reply is not a failure: redis-cli prints it to stdout and exits 0).
    pub fn cli_checked(&self, args: &[&str]) -> String {
        let out = self.run_cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stderr.contains("Could not connect") {
            panic!(
                "redis-cli -p {} {} failed ({}): {}",
                self.port,
                args.join(" "),
                out.status,
                stderr.trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run_cli(&self, args: &[&str]) -> Output {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli")
    }

    /// Runs many commands (one per line) through one `redis-cli`.
    pub fn cli_batch(&self, commands: &str) {
        let mut child = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-cli");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(commands.as_bytes())
            .expect("write to redis-cli");
        assert!(child.wait().expect("redis-cli").success());
    }

    /// The end of the server's log and stderr, for failure reports.
    fn log_tail(&self) -> String {
        let mut out = String::new();
        for name in [LOG, STDERR] {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
            out.push_str(&format!("--- {name}, last {} lines:\n", tail.len()));
            for l in tail {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// A loopback port free right now (bound, then released).
/// A free loopback port *below* the kernel's ephemeral range
/// (`ip_local_port_range`), so that no `bind(0)` or outgoing connection of
/// any test can take it while our Redis is down for a restart; only another
/// test's Redis could, which `spawn` detects. Ports are drawn from a
/// pseudo-random sequence seeded per process, so concurrent test binaries
/// do not walk the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral_start: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    if ephemeral_start <= LOW + 1000 {
        // An unusual range leaves no room below it: any free port.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
    }
    let span = u64::from(ephemeral_start - LOW);
    let _ = STATE.compare_exchange(
        0,
        u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..1000 {
        // xorshift64: cheap, and distinct per process through its seed.
        let mut x = STATE.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        STATE.store(x, Ordering::Relaxed);
        let port = LOW + (x % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{ephemeral_start}");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        // The directory goes with it: show why a failing test's Redis
        // misbehaved (a crash, a failed bind) first.
        if std::thread::panicking() {
            eprintln!(
                "redis-server on port {} ({}):\n{}",
                self.port,
                self.dir.display(),
                self.log_tail()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
