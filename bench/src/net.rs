//! Opening client connections: source-address spreading, fd limits, and
//! naming the host limit behind a failure.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

use crate::proto::Proto;

pub type Ws = WebSocketStream<TcpStream>;

/// Read buffer per client connection.
const READ_BUFFER: usize = 8 * 1024;

/// Raises the soft fd limit to the hard one; returns (soft, hard) after.
pub fn raise_nofile() -> (u64, u64) {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        (r.rlim_cur, r.rlim_max)
    }
}

/// The source address for connection `i`: 127.0.0.1, .2, … round robin.
pub fn source_ip(i: u64, count: u32) -> Ipv4Addr {
    let n = (i % u64::from(count.max(1))) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + n)
}

/// TCP connect from `src` (port chosen at connect time, so each source
/// address has the whole ephemeral range per destination) and the
/// WebSocket handshake for `proto` (`zstd`: offering shardcast's zstd
/// subprotocol, which the server must accept).
pub async fn open(
    proto: Proto,
    zstd: bool,
    addr: SocketAddr,
    src: Ipv4Addr,
    timeout: Duration,
) -> Result<Ws, String> {
    let fut = async {
        let stream = connect_from(addr, src, "connect").await?;
        let mut req = format!("ws://{addr}{}", proto.path())
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let offered = proto.subprotocol(zstd);
        if let Some(p) = offered {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().expect("valid header"));
        }
        // tungstenite's default 128 KiB read buffer is zeroed on every
        // read: with thousands of sockets that memset was 70% of the
        // generator's CPU. Frames here are small.
        let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
        let (ws, resp) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
            .await
            .map_err(|e| handshake_error(&e))?;
        if zstd {
            let chosen = resp
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok());
            if chosen != offered {
                return Err(format!(
                    "the server did not accept {offered:?} (chose {chosen:?}): no zstd support in this build?"
                ));
            }
        }
        Ok(ws)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "connect + handshake timed out after {timeout:?} (host limit: listen backlog — net.core.somaxconn, net.ipv4.tcp_max_syn_backlog, server.backlog — or an overloaded server)"
        )),
    }
}

fn handshake_error(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Http(resp) => format!(
            "handshake refused with HTTP {} (server admission limit, e.g. limits.max_connections_per_shard, or its own fd limit)",
            resp.status()
        ),
        Error::Io(io) => io_error("handshake", io),
        other => format!("handshake: {other}"),
    }
}

/// A TCP connection to `addr` from source address `src` with
/// `IP_BIND_ADDRESS_NO_PORT` (the kernel picks the port at connect time, so
/// every source address gets the whole ephemeral range) and `TCP_NODELAY`.
/// `what` names the connect step in errors.
pub async fn connect_from(
    addr: SocketAddr,
    src: Ipv4Addr,
    what: &str,
) -> Result<TcpStream, String> {
    let sock = TcpSocket::new_v4().map_err(|e| io_error("socket", &e))?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a correctly sized int.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(SocketAddr::new(src.into(), 0))
        .map_err(|e| io_error("bind", &e))?;
    let stream = sock.connect(addr).await.map_err(|e| io_error(what, &e))?;
    stream
        .set_nodelay(true)
        .map_err(|e| io_error("nodelay", &e))?;
    Ok(stream)
}

/// An I/O error with the host limit it points at, if any.
pub fn io_error(what: &str, e: &io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EMFILE) => "host limit: RLIMIT_NOFILE of the load generator (use more workers: --per-worker)",
        Some(libc::ENFILE) => "host limit: fs.file-max (system-wide open files)",
        Some(libc::EADDRNOTAVAIL) => "host limit: ephemeral ports (net.ipv4.ip_local_port_range); add source addresses with --source-ips",
        Some(libc::ECONNREFUSED) => "server not listening, or its listen backlog overflowed (net.core.somaxconn, server.backlog)",
        Some(libc::ECONNRESET) => "server reset the connection (its RLIMIT_NOFILE, backlog overflow with tcp_abort_on_overflow, or an admission limit)",
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "host limit: kernel socket memory (net.ipv4.tcp_mem) or RAM",
        Some(libc::ETIMEDOUT) => "SYN not answered: listen backlog full (net.ipv4.tcp_max_syn_backlog, somaxconn)",
        _ => "",
    };
    if hint.is_empty() {
        format!("{what}: {e}")
    } else {
        format!("{what}: {e} — {hint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ips_cycle_through_loopback() {
        assert_eq!(source_ip(0, 4), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_ip(5, 4), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_ip(300, 300), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_ip(299, 300), Ipv4Addr::new(127, 0, 1, 44));
    }

    #[test]
    fn names_the_limit() {
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(io_error("connect", &e).contains("RLIMIT_NOFILE"));
        let e = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        assert!(io_error("connect", &e).contains("ip_local_port_range"));
    }
}
