//! Every byte the server queues for a connection counts against its outbound
//! budget, whatever produced it: pongs, replies, catch-up from history. A
//! client that never reads can pin at most the documented bound
//! (README, "Memory per connection").

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Client, RawClient, Server, UPGRADE, WAIT};
use shardcast::protocol::wire::{
    decode_server_frame, ClientEncoder, DecodeLimits, Position, ServerMessage,
};
use shardcast::protocol::ws::{encode_client_frame, OpCode};

/// A raw client whose receive buffer is 4 KiB (no autotuning), so the
/// server's writes block as soon as the kernel's small buffers fill.
fn raw_small_window(addr: SocketAddr) -> RawClient {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let sock: std::net::TcpStream = sock.into();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut c = RawClient { sock };
    c.write(UPGRADE.as_bytes());
    let head = c.read_http_head();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let connect = ClientEncoder::new().connect(1, None);
    c.send(OpCode::Binary, true, &connect);
    c
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// RFC 6455 §5.5.3: a server may answer only the most recent ping. A client
/// that floods pings and never reads gets at most what the kernel buffers
/// took plus one pong, the answer to its last ping.
#[test]
fn a_ping_flood_that_never_reads_owes_one_pong() {
    let s = Server::start(&["--fanout-outbound-max-age-ms", "60000"]);
    let mut c = raw_small_window(s.addr);
    // What the kernel may buffer for the server's side of the socket
    // (tcp_wmem's maximum; the client's 4 KiB window adds little).
    let wmem_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    // Pings worth 1.5 times that, one write each and paced so that the
    // server reads (and, before the fix, queued a pong for) nearly every
    // one on its own.
    const FRAME: u64 = 127; // a pong with a 125-byte payload
    let mut sent = 0u64;
    while sent * FRAME < wmem_max * 3 / 2 {
        sent += 1;
        let mut payload = [0u8; 125];
        payload[..8].copy_from_slice(&sent.to_be_bytes());
        let frame = encode_client_frame(OpCode::Ping, true, &payload, [9, 8, 7, 6]);
        c.sock.write_all(&frame).unwrap();
        std::thread::sleep(Duration::from_micros(50));
    }
    // Now read what the server owes.
    let mut pongs = 0u64;
    let mut last_seen = 0u64;
    loop {
        let (op, payload) = c
            .read_frame()
            .expect("the server closed instead of answering");
        match op {
            0x2 => continue, // Connected
            0xA => {
                let n = u64::from_be_bytes(payload[..8].try_into().unwrap());
                assert!(n > last_seen, "pong {n} after pong {last_seen}");
                last_seen = n;
                pongs += 1;
                if n == sent {
                    break;
                }
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
    eprintln!("{pongs} pongs for {sent} pings");
    // What the kernel buffered is all that can come before the last pong:
    // the server itself kept at most one.
    assert!(
        pongs * FRAME < wmem_max + (64 << 10),
        "{pongs} pongs for {sent} pings: the server queued pongs beyond \
         what the kernel buffers ({wmem_max} bytes)"
    );
}

/// Replies to requests count against the budget: a client that sends
/// requests and never reads is closed as a slow consumer (4001).
#[test]
fn replies_to_a_client_that_never_reads_stay_within_the_budget() {
    let s = Server::start(&[
        "--fanout-outbound-budget-bytes",
        "4096",
        "--fanout-outbound-max-age-ms",
        "60000",
        "--limits-messages-per-second",
        "1000000",
        "--limits-message-burst",
        "1000000",
    ]);
    let mut c = raw_small_window(s.addr);
    let mut enc = ClientEncoder::new();
    let mut batch = Vec::new();
    // Each Ping request's Pong reply is one small frame; 100,000 of them
    // are megabytes, far past the kernel's buffers and the 4 KiB budget.
    for id in 2..100_002u32 {
        batch.extend_from_slice(&encode_client_frame(
            OpCode::Binary,
            true,
            &enc.ping(id),
            [1, 2, 3, 4],
        ));
        if batch.len() > 1 << 16 {
            if c.sock.write_all(&batch).is_err() {
                break; // closed already: the reply below says why
            }
            batch.clear();
        }
    }
    let _ = c.sock.write_all(&batch);
    let (code, reason) = c.expect_close();
    assert_eq!(code, 4001, "{reason}");
    assert!(reason.contains("outbound budget"), "{reason}");
}

/// Catch-up from history is produced as the socket drains: clients that
/// recover a large history and do not read pin about the budget each, not
/// the history; once they read they get all of it, in order, once.
#[tokio::test]
async fn catch_up_is_produced_as_the_socket_drains() {
    let s = Server::start(&[
        "--server-shards",
        "1",
        "--fanout-outbound-budget-bytes",
        "65536",
        "--fanout-outbound-max-age-ms",
        "60000",
        "--limits-messages-per-second",
        "100000",
        "--limits-message-burst",
        "100000",
    ]);
    const N: usize = 300;
    const SIZE: usize = 32 << 10;
    let mut publisher = Client::connect(s.addr).await;
    let mut acks = Vec::new();
    for i in 0..N {
        let mut p = vec![b'x'; SIZE];
        p[..8].copy_from_slice(&(i as u64).to_be_bytes());
        // Acknowledged one by one: the acks (small) stay within the budget.
        acks.push(publisher.publish("big", &p).await);
    }
    let start = Position {
        epoch: acks[0].epoch,
        offset: acks[0].offset - 1,
    };
    drop(publisher);
    let before = rss_kib(s.pid());
    // Ten clients ask for the whole 9.6 MB history and do not read.
    const READERS: usize = 10;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut c = raw_small_window(s.addr);
        let sub = ClientEncoder::new().subscribe(
            2,
            "big",
            Some(Position {
                epoch: start.epoch,
                offset: start.offset,
            }),
        );
        c.send(OpCode::Binary, true, &sub);
        readers.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut grown = 0;
    while Instant::now() < deadline {
        grown = grown.max(rss_kib(s.pid()).saturating_sub(before));
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("RSS grew {grown} KiB for {READERS} idle catch-ups");
    // Queued all at once, each would hold ~9.6 MB (96 MB in all); paced,
    // each holds the 64 KiB budget plus what the kernel buffers.
    assert!(
        grown < 30 << 10,
        "server RSS grew {grown} KiB for {READERS} idle catch-ups"
    );
    // Now they read: every publication, in order, exactly once.
    let t0 = Instant::now();
    let mut threads = Vec::new();
    for c in readers {
        threads.push(std::thread::spawn(move || read_catch_up(c, N, SIZE)));
    }
    for t in threads {
        t.join().unwrap();
    }
    eprintln!("caught up in {:?}", t0.elapsed());
}

/// Reads Subscribed and then `n` publications of `size` bytes numbered 0..n
/// from a raw native connection.
fn read_catch_up(mut c: RawClient, n: usize, size: usize) {
    let mut next = 0u64;
    while next < n as u64 {
        let (op, payload) = c.read_frame().expect("closed during catch-up");
        if op == 0x9 {
            continue; // keepalive ping
        }
        assert_eq!(op, 0x2, "binary frames only, got {op}: {payload:?}");
        let msgs = decode_server_frame(&payload, &DecodeLimits::default()).unwrap();
        for (_, m) in msgs {
            if let ServerMessage::Publication { payload, .. } = m {
                assert_eq!(payload.len(), size);
                let i = u64::from_be_bytes(payload[..8].try_into().unwrap());
                assert_eq!(i, next, "publication out of order or repeated");
                next += 1;
            }
        }
    }
    let mut rest = [0u8; 1];
    c.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        c.sock.read(&mut rest).is_err(),
        "nothing may follow the last publication"
    );
}
