//! A real `redis-server` for tests: the Redis integration tests use it
//! through `tests/common`, and the Redis bus's unit tests include this same
//! file (`#[path]` in `src/bus/redis/tests.rs`), so there is one copy.

#![allow(dead_code)]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long `redis-server` may take to answer its first `PING`.
const START_WAIT: Duration = Duration::from_secs(20);

/// A real `redis-server` on a free loopback port with its own temporary
/// directory, for the Redis bus tests; killed (SIGKILL) on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: std::path::PathBuf,
    appendonly: bool,
}

impl RedisServer {
    /// Starts `redis-server` with no RDB snapshots and, if `appendonly`,
    /// an append-only file fsynced on every write.
    pub fn start(appendonly: bool) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut s = RedisServer {
            child: None,
            port,
            dir: Self::fresh_dir(),
            appendonly,
        };
        s.spawn();
        s
    }

    fn fresh_dir() -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sc-it-redis-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        dir
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", if self.appendonly { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)");
        self.child = Some(child);
        let until = std::time::Instant::now() + START_WAIT;
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(
                std::time::Instant::now() < until,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
        self.spawn();
    }

    /// Starts it again on the same port with a fresh, empty directory and
    /// no persistence: everything is lost.
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.dir = Self::fresh_dir();
        self.appendonly = false;
        self.spawn();
    }

    /// Runs one `redis-cli` command; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
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
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
