//! `bench-baseline`: the "obvious Rust" WebSocket broadcast server that
//! `shardcast-bench compare` measures shardcast against. It is what a
//! competent first version looks like: tokio multi-thread runtime,
//! tokio-tungstenite, one `tokio::sync::broadcast` channel per topic, one
//! writer task per connection that coalesces queued frames before flushing.
//! Each outgoing message is serialised once and shared (tungstenite text is
//! reference-counted). The read buffer is 8 KiB instead of tungstenite's
//! 128 KiB default.
//!
//! Protocol (text frames, JSON), on any path:
//!   client → server  {"op":"sub","ch":C}  {"op":"unsub","ch":C}  {"op":"pub","ch":C,"data":S}
//!   server → client  {"op":"subok","ch":C}  {"ch":C,"data":S}  {"op":"err","msg":M}
//! Publishers receive their own messages if subscribed. A subscriber that
//! falls more than 4096 messages behind loses them (counted by the bench).
//!
//! Usage: bench-baseline [--listen 127.0.0.1:0] [--threads N]
//! Prints `bench-baseline listening on ADDR threads=N` first.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Message;

type Hub = Arc<Mutex<HashMap<String, broadcast::Sender<Message>>>>;

#[derive(Deserialize)]
struct In {
    op: String,
    ch: String,
    #[serde(default)]
    data: Option<String>,
}

#[derive(Serialize)]
struct Out<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    op: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    msg: Option<&'a str>,
}

fn text(o: &Out<'_>) -> Message {
    Message::Text(serde_json::to_string(o).expect("serialisable").into())
}

fn main() {
    let mut listen = "127.0.0.1:0".to_string();
    let mut threads = 0usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => listen = it.next().expect("--listen ADDR").clone(),
            "--threads" => threads = it.next().and_then(|v| v.parse().ok()).expect("--threads N"),
            other => {
                eprintln!("bench-baseline: unknown option {other}");
                std::process::exit(2);
            }
        }
    }
    // Same fd headroom the bench gives shardcast.
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        b.worker_threads(threads);
    }
    let rt = b.enable_all().build().expect("tokio runtime");
    rt.block_on(async move {
        // Same listen backlog as shardcast's default (tokio's bind uses 1024).
        let addr: std::net::SocketAddr = listen.parse().expect("--listen IP:PORT");
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .expect("socket");
        sock.set_reuseaddr(true).expect("SO_REUSEADDR");
        sock.bind(addr).expect("bind");
        let l = sock.listen(4096).expect("listen");
        let addr = l.local_addr().expect("local addr");
        let n = if threads > 0 {
            threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        };
        println!("bench-baseline listening on {addr} threads={n}");
        let _ = std::io::stdout().flush();
        let hub: Hub = Arc::default();
        loop {
            let (sock, _) = match l.accept().await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bench-baseline: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            tokio::spawn(connection(sock, hub.clone()));
        }
    });
}

async fn connection(sock: tokio::net::TcpStream, hub: Hub) {
    // The one non-default setting: tungstenite's 128 KiB read buffer per
    // connection (zeroed on each read) would make this baseline a straw man
    // on memory and CPU.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(sock, Some(config)).await else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(4096);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut subs: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    while let Some(Ok(m)) = stream.next().await {
        let Message::Text(t) = m else {
            continue;
        };
        let req: In = match serde_json::from_str(t.as_str()) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx
                    .send(text(&Out {
                        op: Some("err"),
                        ch: None,
                        data: None,
                        msg: Some(&e.to_string()),
                    }))
                    .await;
                continue;
            }
        };
        match req.op.as_str() {
            "sub" => {
                if !subs.contains_key(&req.ch) {
                    let mut brx = hub
                        .lock()
                        .expect("hub lock")
                        .entry(req.ch.clone())
                        .or_insert_with(|| broadcast::channel(4096).0)
                        .subscribe();
                    let tx2 = tx.clone();
                    subs.insert(
                        req.ch.clone(),
                        tokio::spawn(async move {
                            loop {
                                match brx.recv().await {
                                    Ok(m) => {
                                        if tx2.send(m).await.is_err() {
                                            return;
                                        }
                                    }
                                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                                    Err(broadcast::error::RecvError::Closed) => return,
                                }
                            }
                        }),
                    );
                }
                let _ = tx
                    .send(text(&Out {
                        op: Some("subok"),
                        ch: Some(&req.ch),
                        data: None,
                        msg: None,
                    }))
                    .await;
            }
            "unsub" => {
                if let Some(h) = subs.remove(&req.ch) {
                    h.abort();
                }
            }
            "pub" => {
                let data = req.data.as_deref().unwrap_or("");
                let out = text(&Out {
                    op: None,
                    ch: Some(&req.ch),
                    data: Some(data),
                    msg: None,
                });
                let sender = hub.lock().expect("hub lock").get(&req.ch).cloned();
                if let Some(s) = sender {
                    let _ = s.send(out);
                }
            }
            other => {
                let _ = tx
                    .send(text(&Out {
                        op: Some("err"),
                        ch: None,
                        data: None,
                        msg: Some(&format!("unknown op {other}")),
                    }))
                    .await;
            }
        }
    }
    for (_, h) in subs {
        h.abort();
    }
    writer.abort();
}
