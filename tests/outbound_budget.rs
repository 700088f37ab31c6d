//! Every byte the server queues for a connection counts against its outbound
//! budget, whatever produced it: pongs, replies, catch-up from history. A
//! client that never reads can pin at most the documented bound
//! (README, "Memory per connection").

mod common;

use std::io::Write;
use std::time::Duration;

use common::{raw_small_window, Server};
use shardcast::protocol::wire::ClientEncoder;
use shardcast::protocol::ws::{encode_client_frame, OpCode};

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
    let mut args = vec!["--server-shards", "1"];
    args.extend_from_slice(&common::PACED_CATCH_UP);
    let s = Server::start(&args);
    common::check_paced_catch_up(&s).await;
}
