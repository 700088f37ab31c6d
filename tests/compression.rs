//! Compressed broadcasts: zstd and plain subscribers on one channel get the
//! same publications; dictionaries for small messages; hostile compressed
//! input is refused cleanly.

mod common;

use std::io::Write;

use common::{assert_serving, http_get_bytes, Client, Server, Zstd, BULK_PUBLISHER};

fn chat_message(i: usize) -> Vec<u8> {
    format!(
        r#"{{"type":"message","room":"lobby-{}","user":{{"id":{},"name":"user{}"}},"text":"hello there, number {}","ts":{}}}"#,
        i % 7,
        i % 100,
        i % 100,
        i,
        1_700_000_000 + i
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_and_plain_subscribers_receive_identical_publications() {
    let s = Server::start(&BULK_PUBLISHER);
    let mut z = Client::connect_with(s.addr, Some(Zstd::default())).await;
    let mut p = Client::connect(s.addr).await;
    let start = z.subscribe("mix").await;
    assert_eq!(p.subscribe("mix").await, start);
    let mut publisher = Client::connect(s.addr).await;

    let mut sent: Vec<Vec<u8>> = Vec::new();
    // A burst that batches within ticks, one large message, small ones.
    for i in 0..300 {
        sent.push(chat_message(i));
    }
    sent.push((0..40).flat_map(chat_message).collect());
    for i in 0..5 {
        sent.push(chat_message(10_000 + i));
    }
    for m in &sent {
        publisher.publish_nowait("mix", m).await;
    }
    for client in [&mut z, &mut p] {
        for (k, m) in sent.iter().enumerate() {
            let (_, _, offset, payload) = client.publication().await;
            assert_eq!(offset, start.offset + 1 + k as u64);
            assert_eq!(&payload, m, "payload {k} differs");
        }
    }
    let stats = z.zstd.as_ref().unwrap();
    assert!(
        stats.received[1] >= 1,
        "nothing was compressed: {:?}",
        stats.received
    );
    assert!(stats.received[0] >= 1, "small frames go uncompressed");
    assert!(
        stats.wire_bytes < stats.plain_bytes,
        "compression saved nothing"
    );
}

#[tokio::test]
async fn dictionary_compressed_single_message_round_trips() {
    let dir = std::env::temp_dir().join(format!("shardcast-dict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let samples = dir.join("samples.txt");
    let mut f = std::fs::File::create(&samples).unwrap();
    for i in 0..3000 {
        f.write_all(&chat_message(i)).unwrap();
        f.write_all(b"\n").unwrap();
    }
    let dict_path = dir.join("chat.dict");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .args(["zstd-train", "--lines", "--max-bytes", "8192", "--out"])
        .arg(&dict_path)
        .arg(&samples)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The id is derived from the dictionary's content: zstd-train prints
    // it, and anyone can compute it from the file.
    let trained = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = shardcast::protocol::compression::dictionary_id(&std::fs::read(&dict_path).unwrap());
    assert!(trained.contains(&format!("(its id: {id})")), "{trained}");

    let s = Server::start(&["--compression-dictionary", dict_path.to_str().unwrap()]);
    // Clients fetch the dictionary where they connect (the admin port is
    // private).
    let (status, dict) = http_get_bytes(s.addr, &format!("/dictionaries/{id}"));
    assert_eq!(status, 200);
    assert_eq!(dict, std::fs::read(&dict_path).unwrap());
    assert_eq!(
        http_get_bytes(s.addr, &format!("/dictionaries/{}", id ^ 1)).0,
        404
    );
    assert_eq!(
        http_get_bytes(s.addr, "/ws").0,
        426,
        "the WebSocket endpoint wants an upgrade"
    );
    assert_eq!(
        http_get_bytes(s.admin.unwrap(), &format!("/dictionaries/{id}")).0,
        404
    );

    let zstd = Zstd {
        dictionary: Some((id, dict)),
        ..Zstd::default()
    };
    let mut z = Client::connect_with(s.addr, Some(zstd)).await;
    z.subscribe("chat").await;
    let mut publisher = Client::connect(s.addr).await;
    let msg = chat_message(123_456);
    publisher.publish("chat", &msg).await;
    let (_, _, _, payload) = z.publication().await;
    assert_eq!(payload, msg);
    let stats = z.zstd.as_ref().unwrap();
    assert_eq!(stats.received[2], 1, "the publication used the dictionary");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn decompression_bomb_and_oversized_window_are_refused() {
    let s = Server::start(&[
        "--websocket-max-message-bytes",
        "65536",
        "--fanout-max-publish-bytes",
        "1024",
    ]);
    let mut z = Client::connect_with(s.addr, Some(Zstd::default())).await;
    // 16 MiB of zeros in a few hundred bytes.
    let bomb = zstd::bulk::compress(&vec![0u8; 16 << 20], 3).unwrap();
    z.send_wire([&[1u8][..], &bomb].concat()).await;
    let (code, reason) = z.next_or_close().await.expect_err("closed");
    assert_eq!(code, 1009, "{reason}");

    let mut z = Client::connect_with(s.addr, Some(Zstd::default())).await;
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_contentsize(false).unwrap();
    enc.window_log(27).unwrap();
    enc.write_all(&[1u8; 1000]).unwrap();
    z.send_wire([&[1u8][..], &enc.finish().unwrap()].concat())
        .await;
    let (code, reason) = z.next_or_close().await.expect_err("closed");
    assert_eq!(code, 4000, "{reason}");
    assert!(reason.contains("window"), "{reason}");

    assert_serving(s.addr).await;
}
