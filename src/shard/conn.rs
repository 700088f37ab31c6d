//! The per-connection tasks.
//!
//! A connection has one reader task for its whole life and, only while its
//! socket buffer is full, a writer task. The reader waits for readability
//! and then reads into the shard's scratch buffer, so an idle connection
//! pins no read buffer: the only per-connection input state is whatever the
//! WebSocket session keeps of an incomplete frame.

#![forbid(unsafe_code)]

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use monoio::net::TcpStream;

use super::slab::ConnId;
use super::state::{CloseCause, Flushed, Form, State, PUSHER_PATH};
use super::{now, sys, transmit, Shard};
use crate::api::pusher_http::{RequestReader, Response, API_PATH, USERS_PATH};
use crate::metrics::Limit;
use crate::protocol::compression;
use crate::protocol::ws::{self, Event, HandshakeParser, Session};

/// The WebSocket subprotocol of the native FlatBuffers protocol.
pub const NATIVE_SUBPROTOCOL: &str = "shardcast.v1";
/// The path of the native endpoint.
pub const NATIVE_PATH: &str = "/ws";
/// Subprotocols the native endpoint speaks.
const SUBPROTOCOLS: [&str; 2] = [NATIVE_SUBPROTOCOL, compression::SUBPROTOCOL];

// The session lives inline: it is the state of every open connection, so
// boxing it would only add an allocation and a pointer to each of them.
#[allow(clippy::large_enum_variant)]
enum Input {
    /// Nothing read yet, or too little to tell a WebSocket upgrade from an
    /// HTTP API request (kept here, at most [`SNIFF_BYTES`]; no allocation
    /// until then).
    Start(Vec<u8>),
    /// Reading the HTTP upgrade request. Boxed so that an open connection's
    /// task does not carry the parser's size.
    Handshake(Box<HandshakeParser>),
    /// Reading a Pusher HTTP API request (`/apps/…`), with httparse.
    Api(Box<RequestReader>),
    Open(Session),
    /// We sent a close (or an HTTP error); discard input until the peer
    /// closes or the linger deadline shuts the socket.
    Draining,
}

/// Drives one accepted connection until it is closed.
pub async fn run(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr) {
    let fd = stream.as_raw_fd();
    let stream = Rc::new(stream);
    let id = {
        let mut state = shard.state.borrow_mut();
        state.touch(now());
        // The descriptor is the socket's handle in the state: valid for as
        // long as the connection is there (see `transmit`).
        state.add_conn(peer, fd as u32)
    };
    shard.sockets.borrow_mut().insert(id, stream.clone());
    let mut input = Input::Start(Vec::new());
    loop {
        if stream.readable(false).await.is_err() {
            break;
        }
        match read_available(&shard, id, fd, &mut input) {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
    }
    // Shutting the socket wakes a writer still waiting on it.
    sys::shutdown(fd, Shutdown::Both);
    shard.sockets.borrow_mut().remove(id);
    shard.state.borrow_mut().remove_conn(id);
}

/// Reads until the socket has nothing more; `Ok(false)` at end of stream.
fn read_available(shard: &Shard, id: ConnId, fd: RawFd, input: &mut Input) -> io::Result<bool> {
    let mut scratch = shard.scratch.borrow_mut();
    loop {
        let n = match sys::recv(fd, &mut scratch) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        };
        let mut state = shard.state.borrow_mut();
        state.touch(now());
        state.received(id, n);
        on_bytes(shard, &mut state, id, input, &scratch[..n]);
        state.wake_if_needed();
        if n < scratch.len() {
            // The socket is very likely empty now; readiness is level
            // triggered, so stopping early loses nothing and saves a syscall.
            return Ok(true);
        }
    }
}

/// Bytes after which a request line that has not shown an HTTP API target
/// is taken for a WebSocket upgrade (the handshake parser judges it).
const SNIFF_BYTES: usize = 32;

/// What the first bytes of a connection are, as far as they tell.
enum Sniff {
    Api,
    Upgrade,
    Undecided,
}

/// An HTTP API request has a target under `/apps/` (any method: the API
/// answers 405 itself); everything else goes to the WebSocket handshake
/// parser, which answers what is not an upgrade.
fn sniff(bytes: &[u8]) -> Sniff {
    let Some(space) = bytes.iter().take(SNIFF_BYTES).position(|&b| b == b' ') else {
        return if bytes.len() < SNIFF_BYTES {
            Sniff::Undecided
        } else {
            Sniff::Upgrade
        };
    };
    let target = &bytes[space + 1..];
    let mut undecided = false;
    for prefix in [API_PATH.as_bytes(), USERS_PATH.as_bytes()] {
        if target.len() < prefix.len() {
            undecided |= prefix.starts_with(target);
        } else if target.starts_with(prefix) {
            return Sniff::Api;
        }
    }
    if undecided {
        Sniff::Undecided
    } else {
        Sniff::Upgrade
    }
}

fn on_bytes(shard: &Shard, state: &mut State, id: ConnId, input: &mut Input, bytes: &[u8]) {
    match input {
        Input::Start(pending) => {
            let mut data = std::mem::take(pending);
            data.extend_from_slice(bytes);
            match sniff(&data) {
                Sniff::Undecided => *pending = data,
                Sniff::Api => {
                    *input = Input::Api(Box::new(RequestReader::new(
                        shard.settings.handshake_max_header_bytes,
                        shard.settings.frame_limits.max_message_bytes,
                    )));
                    on_bytes(shard, state, id, input, &data);
                }
                Sniff::Upgrade => {
                    *input = Input::Handshake(Box::new(HandshakeParser::new(
                        shard.settings.handshake_limits(),
                    )));
                    on_bytes(shard, state, id, input, &data);
                }
            }
        }
        Input::Api(reader) => {
            if let Some(r) = state.take_refusal(id) {
                state.respond_http(id, &Response::error(r.status, &r.message));
                *input = Input::Draining;
                return;
            }
            match reader.feed(bytes) {
                Ok(None) => {
                    if reader.take_continue() {
                        state.send_raw(id, b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                }
                Ok(Some(request)) => {
                    state.on_api_request(id, &request);
                    *input = Input::Draining;
                }
                Err(response) => {
                    state.respond_http(id, &response);
                    *input = Input::Draining;
                }
            }
        }
        Input::Handshake(parser) => match parser.feed(bytes) {
            Ok(None) => {}
            Ok(Some(request)) => {
                if let Some(r) = state.take_refusal(id) {
                    let retry = r.retry_after_secs.map(|s| s.to_string());
                    let headers: Vec<(&str, &str)> = retry
                        .as_deref()
                        .map(|v| ("Retry-After", v))
                        .into_iter()
                        .collect();
                    let response = ws::error_response_with(r.status, &r.message, &headers);
                    state.reject_upgrade(id, response);
                    *input = Input::Draining;
                    return;
                }
                if !request.websocket {
                    state.reject_upgrade(id, plain_get(&request, &shard.settings));
                    *input = Input::Draining;
                    return;
                }
                // Pusher Channels clients (pusher-js, Laravel Echo) on
                // `/app/{key}`: no subprotocol, JSON text frames.
                if let Some(key) = request.path.strip_prefix(PUSHER_PATH) {
                    if shard.settings.pusher.is_none() && shard.settings.pusher_apps.is_empty() {
                        state.reject_upgrade(
                            id,
                            ws::error_response(
                                404,
                                "no Pusher app is configured on this server (pusher.app_key)",
                            ),
                        );
                        *input = Input::Draining;
                        return;
                    }
                    if let Err((status, message)) =
                        check_origin(&request, &shard.settings.allowed_origins)
                    {
                        state.counters.limit(Limit::Origin);
                        state.reject_upgrade(id, ws::error_response(status, &message));
                        *input = Input::Draining;
                        return;
                    }
                    let refuse = state.pusher_refusal(key, request.query.as_deref());
                    let refused = refuse.is_some();
                    state.accept_pusher(id, key, ws::accept_response(&request.key, None), refuse);
                    if refused {
                        *input = Input::Draining;
                        return;
                    }
                    *input = Input::Open(Session::new(shard.settings.frame_limits));
                    if !request.leftover.is_empty() {
                        on_bytes(shard, state, id, input, &request.leftover);
                    }
                    return;
                }
                let checked = check_route(&request)
                    .and_then(|()| check_origin(&request, &shard.settings.allowed_origins));
                if let Err((status, message)) = checked {
                    if status == 403 {
                        state.counters.limit(Limit::Origin);
                    }
                    state.reject_upgrade(id, ws::error_response(status, &message));
                    *input = Input::Draining;
                    return;
                }
                // The client lists subprotocols in order of preference.
                let protocol = request
                    .subprotocols
                    .iter()
                    .find_map(|p| SUBPROTOCOLS.iter().find(|s| *s == p))
                    .copied();
                let form = if protocol == Some(compression::SUBPROTOCOL) {
                    Form::NativeZstd
                } else {
                    Form::Native
                };
                state.accept_upgrade(id, ws::accept_response(&request.key, protocol), form);
                *input = Input::Open(Session::new(shard.settings.frame_limits));
                if !request.leftover.is_empty() {
                    on_bytes(shard, state, id, input, &request.leftover);
                }
            }
            Err(e) => {
                state.reject_upgrade(id, ws::error_response(e.status(), &e.to_string()));
                *input = Input::Draining;
            }
        },
        Input::Open(session) => {
            if let Err(why) = on_frames(state, id, session, bytes) {
                state.close(id, &why);
                *input = Input::Draining;
            }
        }
        Input::Draining => {}
    }
}

/// Where zstd dictionaries are served on the main port (`/dictionaries/<id>`):
/// clients fetch them where they connect, not from the private admin port.
pub const DICTIONARY_PATH: &str = "/dictionaries/";

/// The answer to a plain `GET` (no upgrade asked): a zstd dictionary, or
/// 426 on the WebSocket endpoint, or 404.
fn plain_get(request: &ws::Request, settings: &super::Settings) -> Vec<u8> {
    if let Some(id) = request.path.strip_prefix(DICTIONARY_PATH) {
        return match &settings.dictionary {
            Some(d) if id.parse::<u32>().ok() == Some(d.id) => ws::ok_response(
                "application/octet-stream",
                // An id names one dictionary for good: a new one gets a new id.
                &[("Cache-Control", "public, max-age=31536000, immutable")],
                &d.bytes,
            ),
            _ => ws::error_response(404, &format!("no dictionary with id {id}")),
        };
    }
    if request.path == NATIVE_PATH {
        return ws::error_response(
            426,
            "this endpoint speaks WebSocket: send an upgrade request (RFC 6455)",
        );
    }
    ws::error_response(
        404,
        &format!(
            "no endpoint at {}; the WebSocket endpoint is {NATIVE_PATH}, dictionaries are at {DICTIONARY_PATH}<id>",
            request.path
        ),
    )
}

fn check_route(request: &ws::Request) -> Result<(), (u16, String)> {
    if request.path != NATIVE_PATH {
        return Err((
            404,
            format!(
                "no endpoint at {}; the WebSocket endpoint is {NATIVE_PATH}",
                request.path
            ),
        ));
    }
    if !request.subprotocols.is_empty()
        && !request
            .subprotocols
            .iter()
            .any(|p| SUBPROTOCOLS.contains(&p.as_str()))
    {
        return Err((
            400,
            format!(
                "unsupported subprotocol; this endpoint speaks {}",
                SUBPROTOCOLS.join(" or ")
            ),
        ));
    }
    Ok(())
}

/// Browsers send `Origin`; native clients do not. Only a present origin
/// that is not on a non-empty allowlist is refused.
fn check_origin(request: &ws::Request, allowed: &[String]) -> Result<(), (u16, String)> {
    match &request.origin {
        Some(origin) if !allowed.is_empty() && !allowed.iter().any(|a| a == origin) => {
            Err((403, format!("origin {origin} is not allowed")))
        }
        _ => Ok(()),
    }
}

/// Decodes every complete message in `bytes`. `Err` closes the connection.
fn on_frames(
    state: &mut State,
    id: ConnId,
    session: &mut Session,
    mut bytes: &[u8],
) -> Result<(), CloseCause> {
    while !bytes.is_empty() {
        let (used, event) = session.decode(bytes).map_err(|e| CloseCause::WebSocket {
            code: e.close_code(),
            reason: e.to_string(),
        })?;
        bytes = &bytes[used..];
        if let Some(pong) = session.take_pong() {
            state.owe_pong(id, pong);
        }
        match event {
            None => break,
            Some(Event::Binary(message)) => state.on_client_message(id, &message)?,
            Some(Event::Text(message)) => state.on_client_text(id, &message)?,
            Some(Event::Pong(_)) => {}
            Some(Event::Close { code, reason }) => {
                tracing::debug!(
                    peer = %state.peer(id).map_or("?".into(), |p| p.to_string()),
                    code,
                    reason = %reason,
                    "connection closed by the peer"
                );
                // Echo the peer's code, as RFC 6455 §5.5.1 asks.
                return Err(CloseCause::PeerClosed(code));
            }
        }
        if used == 0 {
            break;
        }
    }
    Ok(())
}

/// Waits for a full socket to drain, writing whenever it can take more.
pub async fn writer(shard: Rc<Shard>, id: ConnId, stream: Rc<TcpStream>) {
    loop {
        let ready = stream.writable(false).await;
        let mut state = shard.state.borrow_mut();
        state.touch(now());
        let flushed = match ready {
            Ok(()) => transmit::write(&mut state, id),
            Err(_) => {
                state.write_failed(id);
                None
            }
        };
        if flushed != Some(Flushed::Blocked) {
            state.writer_done(id);
        }
        // What the write left (a shutdown, a resumed catch-up) is the
        // dispatcher's to perform.
        state.wake_if_needed();
        if flushed != Some(Flushed::Blocked) {
            break;
        }
    }
}
