//! Logs, end to end: no ANSI colour codes when stderr is not a terminal
//! (files, pipes, the journal), `log.format = json` gives one JSON object
//! per line, and at debug level a connection's life is logged with its
//! peer address — a refused token with the peer, never the token.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{open_ws, Ws, WAIT};
use futures_util::{SinkExt, StreamExt};
use shardcast::protocol::wire::ClientEncoder;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

/// A `shardcast serve` whose stderr (a pipe, so not a terminal) is
/// collected until it exits.
struct Logged {
    child: Child,
    addr: SocketAddr,
    stderr: std::thread::JoinHandle<String>,
}

impl Logged {
    fn start(level: &str, args: &[&str]) -> Logged {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
            .arg("serve")
            .args(["--server-listen", "127.0.0.1:0", "--server-shards", "2"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--server-drain-window-ms", "200"])
            .args(args)
            .env("SHARDCAST_LOG_LEVEL", level)
            // Colour must be off because stderr is a pipe, not because of
            // NO_COLOR.
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardcast");
        // Drain stderr from the start: a full pipe would block the server.
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            err.read_to_string(&mut text).expect("utf-8 logs");
            text
        });
        let (addr, _) = common::read_listening_line(&mut child);
        Logged {
            child,
            addr,
            stderr,
        }
    }

    /// Stops the server (SIGTERM, a short drain) and returns its stderr.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
        let until = Instant::now() + WAIT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < until, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stderr.join().expect("stderr reader")
    }
}

/// The client's side of a WebSocket: the address the server sees.
fn local_addr(ws: &Ws) -> SocketAddr {
    match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.local_addr().unwrap(),
        _ => unreachable!("plain TCP"),
    }
}

/// Reads until the server's close frame (or the end); returns its code.
async fn until_closed(ws: &mut Ws) -> Option<u16> {
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, ws.next()).await {
        if let Message::Close(Some(f)) = m {
            code = Some(u16::from(f.code));
        }
    }
    code
}

/// Connects (anonymously), then closes with 1000 "bye". Returns the
/// client's address.
async fn connect_and_close(addr: SocketAddr) -> SocketAddr {
    let mut ws = open_ws(addr).await;
    let peer = local_addr(&ws);
    let frame = ClientEncoder::new().connect(1, None);
    ws.send(Message::Binary(frame.into())).await.unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(reply, Some(Ok(Message::Binary(_)))), "{reply:?}");
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    until_closed(&mut ws).await;
    peer
}

/// The lines of `logs` that contain every one of `needles` and have
/// `peer=<peer>` as one of their fields.
fn lines_matching<'a>(logs: &'a str, peer: SocketAddr, needles: &[&str]) -> Vec<&'a str> {
    let field = format!("peer={peer}");
    logs.lines()
        .filter(|l| l.split_whitespace().any(|w| w == field))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

#[tokio::test]
async fn text_logs_have_no_colour_codes_off_a_terminal() {
    let server = Logged::start("debug", &[]);
    connect_and_close(server.addr).await;
    let logs = server.stop();
    assert!(logs.contains("serving"), "{logs}");
    assert!(logs.contains("connection opened"), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "ANSI escape codes on a pipe:\n{logs:?}"
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let server = Logged::start("debug", &["--log-format", "json"]);
    let addr = server.addr;
    let peer = connect_and_close(addr).await;
    // Let the server log the socket's end before it is stopped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = server.stop();
    assert!(!logs.contains('\x1b'), "{logs:?}");
    let events: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for e in &events {
        for field in ["timestamp", "level", "message"] {
            assert!(e.get(field).is_some(), "no {field}: {e}");
        }
    }
    let find = |message: &str| {
        events
            .iter()
            .find(|e| e["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} event in {logs}"))
    };
    let serving = find("serving");
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["addr"], addr.to_string());
    assert_eq!(serving["shards"], 2);
    let opened = find("connection opened");
    assert_eq!(opened["level"], "DEBUG");
    assert_eq!(opened["peer"], peer.to_string());
    let connected = find("client connected");
    assert_eq!(connected["peer"], peer.to_string());
    assert!(connected["client_id"].is_u64(), "{connected}");
    let closed = find("connection closed by the peer");
    assert_eq!(closed["peer"], peer.to_string());
    assert_eq!(closed["code"], 1000);
    assert_eq!(closed["reason"], "bye");
}

#[tokio::test]
async fn debug_logs_follow_a_connection_with_its_peer_and_never_the_token() {
    let server = Logged::start("debug", &[]);
    let addr = server.addr;
    let peer = connect_and_close(addr).await;

    // A refused token: logged with the peer and why, never the token.
    let token = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LWNsYWltcw.TOKEN-SIGNATURE-SECRET";
    let mut ws = open_ws(addr).await;
    let refused = local_addr(&ws);
    let frame = ClientEncoder::new().connect(1, Some(token));
    ws.send(Message::Binary(frame.into())).await.unwrap();
    let code = until_closed(&mut ws).await;
    assert!(code.is_some_and(|c| c >= 4000), "closed with {code:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = server.stop();

    for (what, needles) in [
        ("open", vec!["DEBUG", "connection opened"]),
        ("connect", vec!["client connected", "client_id="]),
        (
            "close",
            vec!["connection closed by the peer", "code=1000", "reason=bye"],
        ),
        ("end", vec!["connection ended"]),
    ] {
        assert_eq!(
            lines_matching(&logs, peer, &needles).len(),
            1,
            "{what}: one line with peer={peer} and {needles:?} in\n{logs}"
        );
    }
    assert_eq!(
        lines_matching(&logs, refused, &["connect refused", "error="]).len(),
        1,
        "{logs}"
    );
    assert_eq!(
        lines_matching(&logs, refused, &["closing connection", "code=4"]).len(),
        1,
        "the server's close, with its code and reason: {logs}"
    );
    for part in token.split('.') {
        assert!(
            !logs.contains(part),
            "the token leaked into the logs: {logs}"
        );
    }
}

#[tokio::test]
async fn connection_lines_stay_off_at_info() {
    let server = Logged::start("info", &[]);
    connect_and_close(server.addr).await;
    let logs = server.stop();
    assert!(logs.contains("serving"), "{logs}");
    assert!(!logs.contains("connection opened"), "{logs}");
}

#[test]
fn an_unknown_log_format_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .args(["check-config", "--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("log.format") && err.contains("text, json"),
        "{err}"
    );
}
