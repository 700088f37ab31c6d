//! The admin endpoint: `/healthz`, `/readyz` and `/metrics` on a separate,
//! by default loopback-only, port.
//!
//! It runs on its own plain thread with blocking sockets: scrapes are rare
//! and tiny, and keeping them off the shards means a slow scraper can never
//! delay a delivery.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::{self, Registry};
use crate::protocol::compression::Dictionary;

/// Largest request head read from a scraper.
const MAX_HEAD: usize = 8192;

/// Binds the endpoint and serves it on a background thread.
pub fn spawn(
    addr: SocketAddr,
    registry: Arc<Registry>,
    dictionary: Option<Dictionary>,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = serve(s, &registry, dictionary.as_ref()) {
                            tracing::debug!(error = %e, "admin request failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(local)
}

fn serve(mut s: TcpStream, registry: &Registry, dictionary: Option<&Dictionary>) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(&mut s, 431, "text/plain", "request head too large\n");
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut s, 405, "text/plain", "only GET is supported\n");
    }
    // The query string is ignored (and never logged).
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/healthz" => respond(&mut s, 200, "text/plain", "ok\n"),
        "/readyz" if registry.is_ready() => respond(&mut s, 200, "text/plain", "ready\n"),
        "/readyz" if registry.is_draining() => respond(&mut s, 503, "text/plain", "draining\n"),
        "/readyz" => respond(&mut s, 503, "text/plain", "starting\n"),
        "/metrics" => {
            let body = metrics::render(
                &registry.snapshot(),
                registry.is_ready(),
                registry.is_draining(),
                &registry.collected(),
            );
            respond(&mut s, 200, "text/plain; version=0.0.4", &body)
        }
        p if p.starts_with("/dictionaries/") => {
            let id = p["/dictionaries/".len()..].parse::<u32>().ok();
            match dictionary {
                Some(d) if Some(d.id) == id => {
                    respond_bytes(&mut s, "application/octet-stream", &d.bytes)
                }
                _ => respond(&mut s, 404, "text/plain", "no such dictionary\n"),
            }
        }
        _ => respond(
            &mut s,
            404,
            "text/plain",
            "not found: try /healthz, /readyz, /metrics or /dictionaries/<id>\n",
        ),
    }
}

fn respond_bytes(s: &mut TcpStream, content_type: &str, body: &[u8]) -> io::Result<()> {
    write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    s.flush()
}

fn respond(s: &mut TcpStream, status: u16, content_type: &str, body: &str) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    write!(
        s,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}
