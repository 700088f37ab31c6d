//! Graceful drain on SIGTERM: every client gets 1012 with a reason, the
//! process exits 0 within the drain window; a second signal exits at once.

mod common;

use std::time::{Duration, Instant};

use common::{http_get, try_connect, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_client_with_1012_and_exits_zero() {
    const CLIENTS: usize = 1000;
    const WINDOW_MS: u64 = 2000;
    let mut server = Server::start(&["--server-drain-window-ms", "2000"]);
    let addr = server.addr;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(CLIENTS);
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = try_connect(addr, None).await.expect("connect");
            c.subscribe("drain").await;
            ready.send(()).await.unwrap();
            loop {
                match c.next_or_close().await {
                    Ok(_) => continue,
                    Err(close) => return close,
                }
            }
        }));
    }
    for _ in 0..CLIENTS {
        ready_rx.recv().await.unwrap();
    }

    let admin = server.admin.unwrap();
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    // Readiness turns false while draining.
    let mut saw_draining = false;
    while started.elapsed() < Duration::from_millis(WINDOW_MS) {
        let (status, body) = http_get(admin, "/readyz");
        if status == 503 && body == "draining\n" {
            saw_draining = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(saw_draining, "/readyz never reported draining");

    let status = server
        .wait_exit(Duration::from_millis(WINDOW_MS + 1500))
        .expect("server did not exit within the drain window");
    let elapsed = started.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        elapsed <= Duration::from_millis(WINDOW_MS + 1000),
        "took {elapsed:?}"
    );

    for t in tasks {
        let (code, reason) = t.await.unwrap();
        assert_eq!(code, 1012, "{reason}");
        assert!(reason.contains("restarting"), "{reason}");
    }
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let mut server = Server::start(&["--server-drain-window-ms", "60000"]);
    let _clients = [
        try_connect(server.addr, None).await.unwrap(),
        try_connect(server.addr, None).await.unwrap(),
    ];
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(server.is_running(), "a 60 s drain must still be running");
    server.signal(libc::SIGINT);
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("second signal did not end the process");
    assert_eq!(status.code(), Some(1));
}
