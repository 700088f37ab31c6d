//! systemd integration, end to end against the real binary: READY=1 once
//! serving, STOPPING=1 when SIGTERM starts the drain, WATCHDOG=1 at half
//! of WATCHDOG_USEC (and none when WATCHDOG_PID is another process), and
//! socket activation (LISTEN_FDS) instead of binding `server.listen`.
//!
//! The test plays systemd: it binds the notification socket, sets the
//! variables, and for socket activation puts a listening socket at fd 3
//! and has `sh` set LISTEN_PID to its own pid before exec'ing the server
//! under that pid.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{self, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// The notification socket systemd would listen on.
struct NotifySocket {
    sock: UnixDatagram,
    /// What NOTIFY_SOCKET is set to.
    name: String,
    path: Option<PathBuf>,
}

impl NotifySocket {
    fn path(tag: &str) -> NotifySocket {
        let dir = std::env::temp_dir().join(format!("shardcast-sd-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            name: path.to_str().unwrap().to_owned(),
            path: Some(dir),
        }
    }

    fn abstract_name(tag: &str) -> NotifySocket {
        let name = format!("shardcast-sd-{}-{tag}", std::process::id());
        let addr = net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        NotifySocket {
            sock: UnixDatagram::bind_addr(&addr).unwrap(),
            name: format!("@{name}"),
            path: None,
        }
    }

    /// Every datagram received within `limit`.
    fn collect(&self, limit: Duration) -> Vec<String> {
        self.collect_timed(limit)
            .into_iter()
            .map(|(_, m)| m)
            .collect()
    }

    /// Every datagram received within `limit`, with when it arrived.
    fn collect_timed(&self, limit: Duration) -> Vec<(Instant, String)> {
        let until = Instant::now() + limit;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.sock.recv(&mut buf) {
                Ok(n) => out.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                )),
                Err(_) => return out,
            }
        }
    }

    /// Datagrams up to and including the first with the line `want`.
    fn until(&self, want: &str) -> Vec<String> {
        let until = Instant::now() + WAIT;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {want:?} within {WAIT:?}; got {seen:?}");
            self.sock.set_read_timeout(Some(left)).unwrap();
            let Ok(n) = self.sock.recv(&mut buf) else {
                continue;
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if let Some(dir) = &self.path {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A running `shardcast serve`, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Starts the server with `env`; with `passed`, that listening socket
    /// is handed over as systemd would (fd 3, LISTEN_PID = the server).
    fn start(args: &[&str], env: &[(&str, &str)], passed: Option<RawFd>) -> Server {
        let bin = env!("CARGO_BIN_EXE_shardcast");
        let mut cmd = match passed {
            None => Command::new(bin),
            Some(fd) => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg("export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=shardcast; exec \"$0\" \"$@\"")
                    .arg(bin);
                // SAFETY: dup2/fcntl are async-signal-safe and only place the
                // listener at fd 3 without close-on-exec.
                unsafe {
                    cmd.pre_exec(move || {
                        let rc = if fd == 3 {
                            libc::fcntl(fd, libc::F_SETFD, 0)
                        } else {
                            libc::dup2(fd, 3)
                        };
                        if rc < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                cmd
            }
        };
        cmd.arg("serve")
            .args(["--server-listen", "127.0.0.1:0", "--server-shards", "2"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(args)
            .env("SHARDCAST_LOG_LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn shardcast");
        let (addr, _) = common::read_listening_line(&mut child);
        Server { child, addr }
    }

    fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let until = Instant::now() + WAIT + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < until, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ready_when_serving_and_stopping_on_sigterm() {
    let notify = NotifySocket::path("ready");
    let mut server = Server::start(&[], &[("NOTIFY_SOCKET", &notify.name)], None);
    let seen = notify.until("READY=1");
    assert!(
        !seen.iter().any(|m| m.contains("STOPPING=1")),
        "stopping before ready: {seen:?}"
    );
    // Ready means accepting.
    TcpStream::connect_timeout(&server.addr, WAIT).expect("connect after READY=1");

    server.terminate();
    notify.until("STOPPING=1");
    assert!(server.wait_exit().success(), "drain must exit 0");
}

#[test]
fn abstract_notify_socket() {
    let notify = NotifySocket::abstract_name("abstract");
    let _server = Server::start(&[], &[("NOTIFY_SOCKET", &notify.name)], None);
    notify.until("READY=1");
}

#[test]
fn watchdog_pings_at_half_the_period() {
    let notify = NotifySocket::path("watchdog");
    // A 2 s period: a ping every second. systemd kills a service that
    // goes a whole period without one, so that is what is checked: no gap
    // (from READY, between pings) reaches 2 s.
    let period = Duration::from_secs(2);
    let _server = Server::start(
        &[],
        &[
            ("NOTIFY_SOCKET", &notify.name),
            ("WATCHDOG_USEC", "2000000"),
        ],
        None,
    );
    notify.until("READY=1");
    let ready = Instant::now();
    let pings: Vec<Instant> = notify
        .collect_timed(Duration::from_millis(5500))
        .into_iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| at)
        .collect();
    let end = ready + Duration::from_millis(5500);
    let mut last = ready;
    for &at in pings.iter().chain([&end]) {
        assert!(
            at - last < period,
            "{:?} without a watchdog ping; the period is {period:?}",
            at - last
        );
        last = at;
    }
    // ~5 expected in 5.5 s; more than one per half period would be a bug.
    assert!(
        (4..=7).contains(&pings.len()),
        "{} pings in 5.5 s at 1 s",
        pings.len()
    );
}

#[test]
fn watchdog_meant_for_another_pid_sends_nothing() {
    let notify = NotifySocket::path("watchdog-pid");
    let _server = Server::start(
        &[],
        &[
            ("NOTIFY_SOCKET", &notify.name),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
        None,
    );
    notify.until("READY=1");
    let msgs = notify.collect(Duration::from_millis(800));
    assert!(
        !msgs.iter().any(|m| m.contains("WATCHDOG=1")),
        "pinged for pid 1: {msgs:?}"
    );
}

#[test]
fn socket_activation_serves_on_the_passed_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let passed_addr = listener.local_addr().unwrap();
    let notify = NotifySocket::path("activation");
    // Two shards share the one passed socket; server.listen is ignored.
    let server = Server::start(
        &[],
        &[("NOTIFY_SOCKET", &notify.name)],
        Some(listener.as_fd().as_raw_fd()),
    );
    assert_eq!(server.addr, passed_addr, "the server bound its own socket");
    notify.until("READY=1");
    // Our copy is the same socket; closing it leaves the server's open.
    drop(listener);
    for _ in 0..4 {
        TcpStream::connect_timeout(&passed_addr, WAIT).expect("connect to the passed socket");
    }
}

#[test]
fn socket_activation_on_the_configured_address_starts_and_blocks_a_second_server() {
    // The usual setup: the socket unit and server.listen name the same
    // address. The passed socket is not this process's to check, so the
    // server starts although something (systemd, here the test) listens.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let passed_addr = listener.local_addr().unwrap();
    let listen = passed_addr.to_string();
    let notify = NotifySocket::path("activation-same");
    let server = Server::start(
        &["--server-listen", &listen],
        &[("NOTIFY_SOCKET", &notify.name)],
        Some(listener.as_fd().as_raw_fd()),
    );
    assert_eq!(server.addr, passed_addr);
    notify.until("READY=1");
    drop(listener);
    // A second server started by hand on that address refuses.
    let mut second = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .args(["serve", "--server-listen", &listen, "--admin-listen", ""])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run a second shardcast");
    let until = Instant::now() + WAIT;
    while second.try_wait().unwrap().is_none() {
        if Instant::now() >= until {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second server on {listen} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&listen) && err.contains("another process already listens"),
        "{err}"
    );
    TcpStream::connect_timeout(&passed_addr, WAIT).expect("the first one still serves");
}

#[test]
fn ready_watchdog_stopping_arrive_in_order() {
    let notify = NotifySocket::path("order");
    let mut server = Server::start(
        &["--server-drain-window-ms", "500"],
        &[
            ("NOTIFY_SOCKET", &notify.name),
            ("WATCHDOG_USEC", "1000000"),
        ],
        None,
    );
    let mut seen = notify.until("READY=1");
    seen.extend(notify.until("WATCHDOG=1"));
    server.terminate();
    seen.extend(notify.until("STOPPING=1"));
    let position = |state: &str| {
        seen.iter()
            .position(|m| m.lines().any(|l| l == state))
            .unwrap_or_else(|| panic!("{state} missing from {seen:?}"))
    };
    assert!(position("READY=1") < position("WATCHDOG=1"), "{seen:?}");
    assert!(position("WATCHDOG=1") < position("STOPPING=1"), "{seen:?}");
    assert!(server.wait_exit().success());
}
