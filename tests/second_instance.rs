//! One address, one server: a second `shardcast serve` on an address
//! another process already listens on refuses to start (with
//! `SO_REUSEPORT` the kernel would otherwise split new connections between
//! two processes whose buses do not know each other), while a new server
//! may start on the address of one that is draining for a restart.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{assert_serving, RawClient, Server, WAIT};

/// Runs `shardcast serve` on `addr` (shards and admin as the tests use
/// them) and waits for it to exit. Returns its status, stdout and stderr,
/// or panics (killing it) if it is still running after `WAIT`: a second
/// server that starts instead of refusing would run forever.
fn serve_expecting_exit(addr: SocketAddr) -> (ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .arg("serve")
        .args(["--server-listen", &addr.to_string(), "--server-shards", "2"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("SHARDCAST_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardcast");
    let until = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            let mut out = String::new();
            let _ = child.stdout.take().unwrap().read_to_string(&mut out);
            panic!("a second server on {addr} started instead of refusing: {out}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, out, err)
}

#[tokio::test]
async fn a_second_server_on_the_same_address_refuses_to_start() {
    let first = Server::start(&[]);
    let addr = first.addr;
    let (status, out, err) = serve_expecting_exit(addr);
    assert_eq!(status.code(), Some(2), "stdout {out:?} stderr {err:?}");
    assert!(!out.contains("listening"), "it announced itself: {out}");
    // One sentence naming the address and what to do.
    let message = err.trim();
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains(&addr.to_string()), "{message}");
    assert!(
        message.contains("another process already listens"),
        "{message}"
    );
    assert!(message.contains("server.listen"), "{message}");
    // The first one never noticed.
    assert_serving(addr).await;
}

#[tokio::test]
async fn a_server_bound_to_any_address_blocks_one_on_loopback() {
    // 0.0.0.0:P covers 127.0.0.1:P: the kernel would put both in one
    // SO_REUSEPORT group.
    let first = Server::start(&["--server-listen", "0.0.0.0:0"]);
    let loopback = SocketAddr::from(([127, 0, 0, 1], first.addr.port()));
    let (status, _, err) = serve_expecting_exit(loopback);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("another process already listens"), "{err}");
    assert_serving(loopback).await;
}

#[tokio::test]
async fn a_new_server_may_start_while_the_old_one_drains() {
    // A restart without socket activation: the old process stops accepting
    // at once but lingers over its drain window; the new one must not be
    // refused meanwhile.
    let mut old = Server::start(&["--server-drain-window-ms", "4000"]);
    let addr = old.addr;
    // A client that never answers the close frame keeps the old process
    // draining (until the close timeout or the window's end).
    let _lingering = RawClient::upgrade(addr);
    old.signal(libc::SIGTERM);
    // Wait until the old process no longer accepts.
    let until = Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < until, "the old server kept accepting");
        std::thread::sleep(Duration::from_millis(10));
    }
    let new = Server::start(&["--server-listen", &addr.to_string()]);
    assert_eq!(new.addr, addr);
    assert!(old.is_running(), "the old server was not draining any more");
    assert_serving(addr).await;
    assert_eq!(
        old.wait_exit(WAIT).and_then(|s| s.code()),
        Some(0),
        "the old server finishes its drain"
    );
}
