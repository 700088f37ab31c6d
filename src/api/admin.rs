//! The admin endpoint: `/healthz`, `/readyz` and `/metrics` on a separate,
//! by default loopback-only, port.
//!
//! It runs on its own thread (a tokio current-thread runtime serving HTTP/1.1
//! with hyper), off the shards: a slow scraper can never delay a delivery.
//! Connections are served concurrently (at most [`MAX_CONNECTIONS`] at once)
//! and each gets [`REQUEST_DEADLINE`] in all, head, handler and response
//! together, so one slow or stalled client cannot hold up `/healthz` or
//! `/metrics` for anyone else. zstd dictionaries are not served here (this
//! port is private): clients fetch them from the main listener.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;

use crate::metrics::{self, Registry};

/// Connections served at once; more are answered 503 at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Total time one connection may take, from accept to the last byte of
/// its response.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Largest request head read from a client (hyper's buffer limit), bytes.
const MAX_HEAD: usize = 8192;

/// Binds the endpoint and serves it on a background thread.
pub fn spawn(addr: SocketAddr, registry: Arc<Registry>) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || runtime.block_on(serve(listener, registry)))?;
    Ok(local)
}

async fn serve(listener: std::net::TcpListener, registry: Arc<Registry>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin endpoint cannot start");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Every slot is held (by stalled clients, say): answer at once
            // rather than make this request wait for one.
            tokio::spawn(busy(stream));
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(route(&req, &registry)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(REQUEST_DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "admin request failed"),
                Err(_) => tracing::debug!("admin request over its deadline; closed"),
            }
            drop(slot);
        });
    }
}

/// The answer when every slot is held: 503, then the request is read and
/// dropped for a moment (closing with unread input would reset the
/// connection and could lose the answer), all within a second.
async fn busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = async {
        stream
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 20\r\nRetry-After: 1\r\nConnection: close\r\n\r\nadmin endpoint busy\n")
            .await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// Answers one request. The query string is ignored (and never logged).
fn route(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if registry.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" if registry.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        "/metrics" => {
            let body = metrics::render(
                &registry.snapshot(),
                registry.is_ready(),
                registry.is_draining(),
                &registry.collected(),
            );
            response(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    response(status, "text/plain", body.to_string())
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}
