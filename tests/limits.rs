//! Every limit trips with its documented answer, and other clients do not
//! notice.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{assert_serving, try_connect, Client, RawClient, Server, UPGRADE, WAIT};
use shardcast::protocol::wire::{ClientEncoder, ErrorCode, ServerMessage};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn message_rate_limit_errors_then_closes() {
    let s = Server::start(&[
        "--limits-messages-per-second",
        "5",
        "--limits-message-burst",
        "5",
        "--limits-rate-limit-strikes",
        "3",
    ]);
    // The Connect took one token: 4 pings pass, then 2 errors, then close.
    let mut c = Client::connect(s.addr).await;
    let mut enc = ClientEncoder::new();
    for id in 10..20 {
        c.send_raw(enc.ping(id)).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    let close = loop {
        match c.next_or_close().await {
            Ok((_, ServerMessage::Pong)) => pongs += 1,
            Ok((_, ServerMessage::Error { code, .. })) => {
                assert_eq!(code, ErrorCode::RateLimited.as_u16());
                limited += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(close) => break close,
        }
    };
    assert_eq!((pongs, limited), (4, 2));
    assert_eq!(close.0, 4008, "{}", close.1);
    assert_serving(s.addr).await;
}

#[tokio::test]
async fn subscription_cap_per_connection() {
    let s = Server::start(&["--fanout-max-subscriptions-per-connection", "2"]);
    let mut c = Client::connect(s.addr).await;
    c.subscribe("a").await;
    c.subscribe("b").await;
    let id = c.request(|e, id| e.subscribe(id, "c", None)).await;
    match c.reply(id).await {
        ServerMessage::Error { code, .. } => {
            assert_eq!(code, ErrorCode::TooManySubscriptions.as_u16())
        }
        other => panic!("expected TooManySubscriptions, got {other:?}"),
    }
    // Unsubscribing makes room again.
    let id = c.request(|e, id| e.unsubscribe(id, "a")).await;
    assert!(matches!(
        c.reply(id).await,
        ServerMessage::Unsubscribed { .. }
    ));
    c.subscribe("c").await;
}

#[tokio::test]
async fn connections_per_shard_cap_is_503() {
    let s = Server::start(&[
        "--server-shards",
        "1",
        "--limits-max-connections-per-shard",
        "2",
    ]);
    let _a = Client::connect(s.addr).await;
    let _b = Client::connect(s.addr).await;
    let mut c = RawClient::connect(s.addr);
    let head = c.request_upgrade();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.contains("Retry-After: "), "{head}");
}

#[tokio::test]
async fn concurrent_connections_per_ip() {
    let s = Server::start(&["--limits-max-connections-per-ip", "2"]);
    let mut a = RawClient::connect_from(s.addr, ip("127.0.0.2"));
    assert!(a.request_upgrade().starts_with("HTTP/1.1 101"));
    let mut b = RawClient::connect_from(s.addr, ip("127.0.0.2"));
    assert!(b.request_upgrade().starts_with("HTTP/1.1 101"));
    let mut c = RawClient::connect_from(s.addr, ip("127.0.0.2"));
    let head = c.request_upgrade();
    assert!(
        head.starts_with("HTTP/1.1 503") && head.contains("Retry-After: "),
        "{head}"
    );
    // Another address is unaffected.
    let mut d = RawClient::connect_from(s.addr, ip("127.0.0.3"));
    assert!(d.request_upgrade().starts_with("HTTP/1.1 101"));
    // Closing one frees a slot for that address.
    drop(a);
    let deadline = Instant::now() + common::WAIT;
    loop {
        let mut e = RawClient::connect_from(s.addr, ip("127.0.0.2"));
        if e.request_upgrade().starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn accept_rate_per_ip_is_503_with_retry_after() {
    let s = Server::start(&[
        "--limits-accept-rate-per-ip",
        "1",
        "--limits-accept-burst-per-ip",
        "2",
    ]);
    let heads: Vec<String> = (0..3)
        .map(|_| RawClient::connect_from(s.addr, ip("127.0.0.4")).request_upgrade())
        .collect();
    assert!(heads[0].starts_with("HTTP/1.1 101"));
    assert!(heads[1].starts_with("HTTP/1.1 101"));
    assert!(heads[2].starts_with("HTTP/1.1 503"), "{}", heads[2]);
    assert!(heads[2].contains("Retry-After: 1"), "{}", heads[2]);
    let mut other = RawClient::connect_from(s.addr, ip("127.0.0.5"));
    assert!(other.request_upgrade().starts_with("HTTP/1.1 101"));
}

/// Waits (up to `WAIT`) until the server closes `c`; returns when.
fn closed_at(c: &mut RawClient) -> Instant {
    assert!(c.is_closed_by_peer(), "still open after {WAIT:?}");
    Instant::now()
}

/// How late a deadline may fire: the sweeper runs every 100 ms; the rest is
/// slack for a loaded test machine. Deadlines of other lengths must not add
/// to it (the input delayed a 5 s deadline to 19.5 s).
const LATE: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn slowloris_handshake_is_cut_at_the_deadline() {
    let s = Server::start(&["--limits-handshake-timeout-ms", "500"]);
    // Before the connect: the deadline runs from the server's accept.
    let started = Instant::now();
    let mut slow = RawClient::connect(s.addr);
    // Dribble one byte every 100 ms from another thread: the whole head
    // would take ~20 s.
    let mut writer = slow.sock.try_clone().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        for b in UPGRADE.as_bytes() {
            if writer.write_all(std::slice::from_ref(b)).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let took = closed_at(&mut slow) - started;
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(500) + LATE,
        "cut after {took:?}; the deadline is 500 ms"
    );
    assert_serving(s.addr).await;
}

// Deadlines of different lengths (a long Connect deadline set first must
// not delay a short handshake deadline, and the other way round) are
// tested on simulated time in `shard::state::tests`.

#[tokio::test]
async fn silent_clients_are_pinged_then_closed() {
    let s = Server::start(&[
        "--limits-ping-interval-ms",
        "300",
        "--limits-idle-timeout-ms",
        "2500",
    ]);
    // A raw client that never answers.
    let mut raw = RawClient::upgrade(s.addr);
    let (op, _) = raw.read_frame().expect("a ping");
    assert_eq!(op, 0x9, "expected a keepalive ping");
    assert_eq!(raw.expect_close().0, 4002);

    // A tungstenite client answers pings while it reads, and survives.
    let mut c = Client::connect(s.addr).await;
    c.subscribe("alive").await;
    // Longer than the idle timeout, answering pings all along.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let _ = tokio::time::timeout(Duration::from_millis(200), c.next_or_close()).await;
    }
    let pos = c.publish("alive", b"still here").await;
    assert!(pos.offset >= 1);
}

#[tokio::test]
async fn origin_allowlist() {
    let s = Server::start(&[
        "--limits-allowed-origins",
        "https://good.example, https://also.example",
    ]);
    let with_origin = |o: &str| UPGRADE.replace("\r\n\r\n", &format!("\r\nOrigin: {o}\r\n\r\n"));
    let mut bad = RawClient::connect(s.addr);
    bad.write(with_origin("https://evil.example").as_bytes());
    assert!(bad.read_http_head().starts_with("HTTP/1.1 403"));
    let mut good = RawClient::connect(s.addr);
    good.write(with_origin("https://also.example").as_bytes());
    assert!(good.read_http_head().starts_with("HTTP/1.1 101"));
    // Native clients send no Origin and are not affected.
    assert!(try_connect(s.addr, None).await.is_ok());
}
