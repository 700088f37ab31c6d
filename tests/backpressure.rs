//! Backpressure: a subscriber that stops reading is closed as a slow
//! consumer; the others receive everything.

mod common;

use common::{Client, RawClient, Server};
use shardcast::protocol::wire::{self, ClientEncoder, DecodeLimits, ServerMessage};
use shardcast::protocol::ws::OpCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_closed_and_others_keep_receiving() {
    let server = Server::start(&[
        common::BULK_PUBLISHER[0],
        common::BULK_PUBLISHER[1],
        common::BULK_PUBLISHER[2],
        common::BULK_PUBLISHER[3],
        "--fanout-outbound-budget-bytes",
        "1048576",
        "--fanout-outbound-max-age-ms",
        "2000",
        "--websocket-close-timeout-ms",
        "60000",
    ]);

    // The slow consumer: a raw socket with a tiny receive buffer that
    // subscribes and then stops reading.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&server.addr.into()).unwrap();
    let mut slow = RawClient { sock: sock.into() };
    slow.sock.set_read_timeout(Some(common::WAIT)).unwrap();
    slow.write(common::UPGRADE.as_bytes());
    let head = slow.read_http_head();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut enc = ClientEncoder::new();
    slow.send(OpCode::Binary, true, &enc.connect(1, None));
    slow.send(OpCode::Binary, true, &enc.subscribe(2, "firehose", None));
    let mut subscribed = false;
    while !subscribed {
        let (_, payload) = slow.read_frame().expect("reply");
        let msgs = wire::decode_server_frame(&payload, &DecodeLimits::default()).unwrap();
        subscribed = msgs
            .iter()
            .any(|(id, m)| *id == 2 && matches!(m, ServerMessage::Subscribed { .. }));
    }

    let mut fast = Client::connect(server.addr).await;
    let start = fast.subscribe("firehose").await;
    let mut publisher = Client::connect(server.addr).await;

    // ~16 MB: far beyond what the kernel buffers for the slow socket (its
    // receive buffer is tiny; the server's send buffer autotunes to at most
    // tcp_wmem's 4 MB by default) plus the 1 MiB budget.
    const N: u64 = 1000;
    let payload = vec![0xAB; 16 * 1024];
    let reader = tokio::spawn(async move {
        for k in 1..=N {
            let (_, _, offset, body) = fast.publication().await;
            assert_eq!(offset, start.offset + k);
            assert_eq!(body.len(), 16 * 1024);
        }
    });
    for _ in 0..N {
        publisher.publish("firehose", &payload).await;
    }
    reader
        .await
        .expect("the fast subscriber received every message in order");

    // Now the slow client reads: whole frames, then close 4001, then EOF.
    let (code, reason) = tokio::task::spawn_blocking(move || slow.expect_close())
        .await
        .unwrap();
    assert_eq!(code, 4001, "{reason}");
    assert!(reason.contains("slow consumer"), "{reason}");
}
