//! The admin endpoint: health, readiness and Prometheus metrics that match
//! what the test did.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{http_get, Client, Server};

/// Parses Prometheus text format strictly enough to catch malformed
/// output: every sample belongs to a declared metric family, labels are
/// well-formed, values are numbers. Returns (name, labels) → value.
fn parse_prometheus(text: &str) -> HashMap<(String, String), f64> {
    let mut declared: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            declared.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect("closing brace");
                for pair in l.split(',') {
                    let (k, v) = pair.split_once('=').expect("label k=v");
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                }
                (n, l.to_string())
            }
            None => (series, String::new()),
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| declared.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(
            declared.contains_key(family),
            "sample before its TYPE: {line}"
        );
        samples.insert((name.to_string(), labels), value);
    }
    samples
}

fn total(m: &HashMap<(String, String), f64>, name: &str) -> f64 {
    m.iter()
        .filter(|((n, _), _)| n == name)
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn health_readiness_and_metrics_match_activity() {
    let s = Server::start(&[]);
    let admin = s.admin.expect("admin endpoint");
    assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(admin, "/readyz"), (200, "ready\n".into()));
    assert_eq!(http_get(admin, "/nope").0, 404);

    // 3 connections; 1 subscribe; 5 publishes → 9 requests in, 5 out.
    let mut sub = Client::connect(s.addr).await;
    sub.subscribe("metrics-test").await;
    let mut publisher = Client::connect(s.addr).await;
    let _idle = Client::connect(s.addr).await;
    for i in 0..5u8 {
        publisher.publish("metrics-test", &[i]).await;
    }
    for _ in 0..5 {
        sub.publication().await;
    }

    let deadline = Instant::now() + common::WAIT;
    let m = loop {
        let (status, body) = http_get(admin, "/metrics");
        assert_eq!(status, 200);
        let m = parse_prometheus(&body);
        if total(&m, "shardcast_messages_out_total") == 5.0
            && total(&m, "shardcast_messages_in_total") == 9.0
        {
            break m;
        }
        assert!(Instant::now() < deadline, "metrics never matched:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(total(&m, "shardcast_connections"), 3.0);
    assert_eq!(total(&m, "shardcast_subscriptions"), 1.0);
    assert_eq!(total(&m, "shardcast_channels"), 1.0);
    assert_eq!(total(&m, "shardcast_connections_accepted_total"), 3.0);
    assert!(total(&m, "shardcast_bytes_in_total") > 0.0);
    assert!(total(&m, "shardcast_bytes_out_total") > 0.0);
    assert_eq!(total(&m, "shardcast_slow_consumer_closes_total"), 0.0);
    assert_eq!(total(&m, "shardcast_publish_to_write_seconds_count"), 5.0);
    assert_eq!(total(&m, "shardcast_ingress_to_write_seconds_count"), 5.0);
    let inf = m[&(
        "shardcast_publish_to_write_seconds_bucket".to_string(),
        "le=\"+Inf\"".to_string(),
    )];
    assert_eq!(inf, 5.0);
    assert_eq!(total(&m, "shardcast_ready"), 1.0);
}

/// One slow or stalled client cannot hold up the admin endpoint: requests
/// are served concurrently, and every connection has a total deadline
/// (`REQUEST_DEADLINE`, 5 s) after which it is closed.
#[test]
fn a_stalled_admin_client_holds_up_nobody_and_is_cut_at_the_deadline() {
    use std::io::{Read, Write};
    let s = Server::start(&[]);
    let admin = s.admin.unwrap();
    // Half a request head, then nothing; and a connection that sends
    // nothing at all.
    let mut half = std::net::TcpStream::connect(admin).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHo").unwrap();
    let silent = std::net::TcpStream::connect(admin).unwrap();
    let opened = Instant::now();
    for path in ["/healthz", "/metrics", "/readyz"] {
        let asked = Instant::now();
        let (status, _) = http_get(admin, path);
        assert!(status == 200 || status == 503, "{path}: {status}");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{path} waited {:?} behind a stalled client",
            asked.elapsed()
        );
    }
    for mut c in [half, silent] {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 512];
        // The server closes it (maybe after a 408-style error): read to EOF.
        while c.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(8),
            "a stalled admin connection was closed after {took:?}; the deadline is 5 s"
        );
    }
}

/// With every connection slot held (32 stalled clients), a new request is
/// answered 503 at once instead of waiting; once the stalled ones are cut
/// at their deadline it is served again.
#[test]
fn a_full_admin_endpoint_answers_503_at_once() {
    let s = Server::start(&[]);
    let admin = s.admin.unwrap();
    let stalled: Vec<_> = (0..32)
        .map(|_| std::net::TcpStream::connect(admin).unwrap())
        .collect();
    // Let the endpoint accept all of them first.
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let (status, body) = http_get(admin, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(asked.elapsed() < Duration::from_secs(2));
    let until = Instant::now() + Duration::from_secs(20);
    while http_get(admin, "/healthz").0 != 200 {
        assert!(Instant::now() < until, "never served again");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(stalled);
}
