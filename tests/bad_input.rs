//! Bad input: each violation gets its documented answer, and the server
//! keeps serving everyone else.

mod common;

use common::{assert_serving, RawClient, Server, UPGRADE};
use shardcast::protocol::ws::OpCode;

#[tokio::test]
async fn garbage_handshake_is_400() {
    let mut server = Server::start(&[]);
    let mut c = RawClient::connect(server.addr);
    c.write(b"HELLO THERE\r\n\r\n");
    let head = c.read_http_head();
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(server.is_running());
    assert_serving(server.addr).await;
}

#[tokio::test]
async fn wrong_version_is_426_with_supported_version() {
    let server = Server::start(&[]);
    let mut c = RawClient::connect(server.addr);
    c.write(UPGRADE.replace("Version: 13", "Version: 8").as_bytes());
    let head = c.read_http_head();
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(head.contains("Sec-WebSocket-Version: 13"), "{head}");
    assert_serving(server.addr).await;
}

/// RFC 9112 §3.2.2: a server MUST accept the absolute form of the request
/// target, as proxies and some clients send it.
#[tokio::test]
async fn absolute_form_targets_upgrade() {
    let server = Server::start(&[]);
    let addr = server.addr;
    for target in [format!("ws://{addr}/ws"), format!("http://{addr}/ws")] {
        let mut c = RawClient::connect(addr);
        c.write(
            UPGRADE
                .replace("GET /ws ", &format!("GET {target} "))
                .as_bytes(),
        );
        let head = c.read_http_head();
        assert!(head.starts_with("HTTP/1.1 101"), "{target}: {head}");
    }
    let mut c = RawClient::connect(addr);
    c.write(
        UPGRADE
            .replace("GET /ws ", &format!("GET ws://{addr}/nope "))
            .as_bytes(),
    );
    let head = c.read_http_head();
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[tokio::test]
async fn unknown_path_is_404() {
    let server = Server::start(&[]);
    let mut c = RawClient::connect(server.addr);
    c.write(UPGRADE.replace("GET /ws ", "GET /nope ").as_bytes());
    let head = c.read_http_head();
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert_serving(server.addr).await;
}

#[tokio::test]
async fn unmasked_frame_is_1002() {
    let server = Server::start(&[]);
    let mut c = RawClient::upgrade(server.addr);
    // A binary frame without the mask bit.
    c.write(&[0x82, 0x03, 1, 2, 3]);
    assert_eq!(c.expect_close().0, 1002);
    assert_serving(server.addr).await;
}

#[tokio::test]
async fn oversized_message_is_1009() {
    let server = Server::start(&[
        "--websocket-max-message-bytes",
        "1024",
        "--fanout-max-publish-bytes",
        "512",
    ]);
    let mut c = RawClient::upgrade(server.addr);
    // Two fragments that are each fine but together exceed the limit.
    c.send(OpCode::Binary, false, &[0u8; 700]);
    c.send(OpCode::Continuation, true, &[0u8; 700]);
    assert_eq!(c.expect_close().0, 1009);

    let mut c = RawClient::upgrade(server.addr);
    c.send(OpCode::Binary, true, &[0u8; 2000]);
    assert_eq!(c.expect_close().0, 1009);
    assert_serving(server.addr).await;
}

#[tokio::test]
async fn invalid_utf8_text_is_1007() {
    let server = Server::start(&[]);
    let mut c = RawClient::upgrade(server.addr);
    c.send(OpCode::Text, true, &[b'o', b'k', 0xff, 0xfe]);
    assert_eq!(c.expect_close().0, 1007);
    assert_serving(server.addr).await;
}

#[tokio::test]
async fn valid_text_is_1003_on_the_binary_endpoint() {
    let server = Server::start(&[]);
    let mut c = RawClient::upgrade(server.addr);
    c.send(OpCode::Text, true, b"{\"hello\":1}");
    let (code, reason) = c.expect_close();
    assert_eq!(code, 1003);
    assert!(reason.contains("binary"), "{reason}");
}

#[tokio::test]
async fn ping_over_125_bytes_is_1002() {
    let server = Server::start(&[]);
    let mut c = RawClient::upgrade(server.addr);
    c.send(OpCode::Ping, true, &[7u8; 126]);
    assert_eq!(c.expect_close().0, 1002);
    assert_serving(server.addr).await;
}

#[tokio::test]
async fn ping_gets_its_pong() {
    let server = Server::start(&[]);
    let mut c = RawClient::upgrade(server.addr);
    c.send(OpCode::Ping, true, b"are you there");
    let (op, payload) = c.read_frame().expect("pong");
    assert_eq!(op, 0xA);
    assert_eq!(payload, b"are you there");
}

#[tokio::test]
async fn envelope_failing_verification_is_4000() {
    let server = Server::start(&[]);
    let mut c = RawClient::upgrade(server.addr);
    let junk = b"definitely not a flatbuffer, but long enough";
    c.send(OpCode::Binary, true, junk);
    let (code, reason) = c.expect_close();
    assert_eq!(code, 4000);
    let expected = shardcast::protocol::wire::decode_client_frame(junk, &Default::default())
        .unwrap_err()
        .reason();
    assert_eq!(reason, expected);

    // A frame with the right identifier whose offsets point outside it.
    let mut c = RawClient::upgrade(server.addr);
    let mut forged = vec![0xFFu8; 40];
    forged[4..8].copy_from_slice(b"SCW1");
    c.send(OpCode::Binary, true, &forged);
    let (code, reason) = c.expect_close();
    assert_eq!(code, 4000);
    assert_eq!(reason, "envelope failed verification");
    assert_serving(server.addr).await;
}

#[tokio::test]
async fn close_is_echoed() {
    let server = Server::start(&[]);
    let mut c = RawClient::upgrade(server.addr);
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    c.send(OpCode::Close, true, &payload);
    assert_eq!(c.expect_close().0, 1000);
    // And then the server ends the TCP connection.
    assert!(c.read_frame().is_none());
}

#[tokio::test]
async fn requests_before_connect_are_refused() {
    use shardcast::protocol::wire::{self, ClientEncoder, DecodeLimits, ServerMessage};
    let server = Server::start(&[]);
    let mut c = RawClient::upgrade(server.addr);
    let frame = ClientEncoder::new().subscribe(9, "room", None);
    c.send(OpCode::Binary, true, &frame);
    let (op, payload) = c.read_frame().expect("reply");
    assert_eq!(op, 0x2);
    let msgs = wire::decode_server_frame(&payload, &DecodeLimits::default()).unwrap();
    assert!(
        matches!(&msgs[..], [(9, ServerMessage::Error { .. })]),
        "{msgs:?}"
    );
}

/// A ping and a refused frame in one read: the pong owed for the ping must
/// not follow the close frame, nor keep the shard flushing forever (it
/// did: the pong could never be sent once closing, and the flush looped).
#[tokio::test]
async fn a_ping_then_a_refused_frame_closes_cleanly() {
    let server = Server::start(&["--server-shards", "1"]);
    for _ in 0..3 {
        let mut c = RawClient::upgrade(server.addr);
        let mut both =
            shardcast::protocol::ws::encode_client_frame(OpCode::Ping, true, b"hi", [1, 2, 3, 4]);
        both.extend(shardcast::protocol::ws::encode_client_frame(
            OpCode::Text,
            true,
            b"text is refused on /ws",
            [5, 6, 7, 8],
        ));
        c.write(&both);
        let (code, reason) = c.expect_close();
        assert_eq!(code, 1003, "{reason}");
        // Nothing after the close frame (no pong): the next read is the
        // end of the stream.
        let mut rest = [0u8; 64];
        let n = std::io::Read::read(&mut c.sock, &mut rest).expect("read after close");
        assert_eq!(n, 0, "bytes after the close frame: {:?}", &rest[..n]);
    }
    assert_serving(server.addr).await;
}
