//! The HTTP/1.1 upgrade request a WebSocket client opens with (RFC 6455 §4),
//! parsed incrementally, and the responses we send back.
//!
//! # Why incremental, line by line
//! The head arrives in arbitrary pieces. Rescanning the whole buffer for
//! `\r\n\r\n` on every read is quadratic (tungstenite CVE-2023-43669: a slow
//! client feeding one byte at a time burns CPU proportional to the square of
//! the head size). This parser looks at every byte exactly once to find line
//! ends, parses each line as soon as it is complete, and then forgets it: it
//! buffers only the current incomplete line, never the whole head.
//!
//! # Strictness decisions
//! - **Bare LF is rejected (400).** RFC 9112 §2.2 lets a recipient accept a
//!   lone LF as a line end, but every real WebSocket client sends CRLF, and
//!   accepting both is how a proxy in front of us and this parser could
//!   disagree about where the head ends. A lone CR inside a line is rejected
//!   for the same reason.
//! - **obs-fold is rejected (400)**, as RFC 9112 §5.2 allows for requests.
//! - **Whitespace between a field name and its colon is rejected (400)**, as
//!   RFC 9112 §5.1 requires.
//! - **A request body is rejected (400):** `Transfer-Encoding`, or a
//!   `Content-Length` other than `0`, would mean the bytes after the head are
//!   not WebSocket frames.
//! - Origin-form targets (`/path?query`) and, as RFC 9112 §3.2.2 requires,
//!   absolute-form ones (`ws://host/path?query`, schemes http/https/ws/wss)
//!   are accepted; a `#` fragment is rejected (RFC 6455 §3 forbids fragments
//!   in WebSocket URIs).
//! - `Host`, `Sec-WebSocket-Key`, `Sec-WebSocket-Version` and `Origin` may
//!   appear at most once; `Upgrade`, `Connection` and
//!   `Sec-WebSocket-Protocol` are lists and may repeat.
//! - A missing `Sec-WebSocket-Version` is answered like a wrong one, 426 with
//!   `Sec-WebSocket-Version: 13`, so the client learns what we speak.

use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// RFC 6455 §1.3: the GUID appended to the client key before hashing.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Hard caps for the request head; a client that exceeds them gets a 431.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Bytes of the whole head, request line and final blank line included.
    pub max_header_bytes: usize,
    /// Header lines after the request line.
    pub max_headers: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 8192,
            max_headers: 64,
        }
    }
}

/// A validated WebSocket upgrade request, or a plain `GET` (see
/// [`Request::websocket`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `false` for a plain HTTP `GET` that asks for no upgrade at all (none
    /// of `Upgrade`, `Connection: upgrade`, `Sec-WebSocket-Key`,
    /// `Sec-WebSocket-Version`): the caller may answer it as an HTTP
    /// request; `key` and `subprotocols` are then empty. A request with any
    /// of them is validated as an upgrade (RFC 6455 §4.2.1).
    pub websocket: bool,
    /// The request-target path, without the query, exactly as sent (not percent-decoded).
    pub path: String,
    /// The part after `?`, if any, exactly as sent.
    pub query: Option<String>,
    /// `Sec-WebSocket-Key` as sent; verified to be base64 of exactly 16 bytes.
    pub key: String,
    /// Offered `Sec-WebSocket-Protocol` tokens in order, across all header lines.
    pub subprotocols: Vec<String>,
    /// The `Origin` header, if present (browsers always send it).
    pub origin: Option<String>,
    /// Bytes that followed the blank line: a client may pipeline its first frame.
    pub leftover: Vec<u8>,
}

/// Why a handshake was refused; [`HandshakeError::status`] gives the HTTP status to answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The head exceeds [`HandshakeLimits::max_header_bytes`]; 431.
    #[error("request head exceeds {limit} bytes")]
    HeadersTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// More header lines than [`HandshakeLimits::max_headers`]; 431.
    #[error("more than {limit} header fields")]
    TooManyHeaders {
        /// The limit, in header lines.
        limit: usize,
    },
    /// A line ends in a bare LF, or has a CR inside it (RFC 9112 §2.2); 400.
    #[error("line not terminated by CRLF")]
    BareLineFeed,
    /// The request line is not `METHOD SP target SP HTTP/x.y`; 400.
    #[error("malformed request line")]
    MalformedRequestLine,
    /// A method other than `GET` (its first 16 bytes); 405.
    #[error("method {0} not allowed, use GET")]
    MethodNotAllowed(String),
    /// An HTTP version other than `HTTP/1.1`; 505.
    #[error("HTTP version not supported, use HTTP/1.1")]
    HttpVersionNotSupported,
    /// The target is not printable ASCII, has a `#` fragment, or is neither
    /// origin-form nor absolute-form with scheme http/https/ws/wss; 400.
    #[error("request target must be an origin-form path without a fragment")]
    InvalidTarget,
    /// A header line starting with SP or HTAB (obs-fold, RFC 9112 §5.2); 400.
    #[error("obsolete header line folding is not allowed")]
    ObsoleteLineFolding,
    /// No colon, a name that is not a token (e.g. space before the colon),
    /// a control byte in the value, or a non-UTF-8 value where text is
    /// needed; 400.
    #[error("malformed header field")]
    MalformedHeader,
    /// A required header is absent (its name: `Host`, `Upgrade`,
    /// `Connection`, `Sec-WebSocket-Key`); 400.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// A single-valued header appears twice (its name: `Host`,
    /// `Sec-WebSocket-Key`, `Sec-WebSocket-Version`, `Origin`); 400.
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    /// `Upgrade` is present but does not list `websocket`; 400.
    #[error("Upgrade header does not name websocket")]
    NotWebSocketUpgrade,
    /// `Connection` is present but does not list `upgrade`; 400.
    #[error("Connection header does not contain upgrade")]
    ConnectionNotUpgrade,
    /// `Sec-WebSocket-Version` is missing or not `13`; 426.
    #[error("unsupported WebSocket version, use 13")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is not canonical base64 of exactly 16 bytes
    /// (RFC 6455 §4.1); 400.
    #[error("Sec-WebSocket-Key is not base64 of 16 bytes")]
    InvalidKey,
    /// A `Sec-WebSocket-Protocol` element is not a token; 400.
    #[error("Sec-WebSocket-Protocol is not a list of tokens")]
    InvalidSubprotocol,
    /// `Transfer-Encoding`, or a `Content-Length` other than `0`; 400.
    #[error("an upgrade request must not have a body")]
    UnexpectedBody,
    /// The caller fed the parser again after it returned a request or an error.
    #[error("handshake parser already finished")]
    AlreadyFinished,
}

impl HandshakeError {
    /// The HTTP status code to answer with (see [`error_response`]).
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadersTooLarge { .. } | Self::TooManyHeaders { .. } => 431,
            Self::MethodNotAllowed(_) => 405,
            Self::HttpVersionNotSupported => 505,
            Self::UnsupportedVersion => 426,
            Self::AlreadyFinished => 500,
            _ => 400,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    RequestLine,
    Headers,
    Finished,
}

/// What the header lines told us so far; judged once the blank line arrives.
#[derive(Default)]
struct Seen {
    path: String,
    query: Option<String>,
    host: bool,
    upgrade_websocket: bool,
    connection_upgrade: bool,
    upgrade_present: bool,
    connection_present: bool,
    version: Option<Vec<u8>>,
    key: Option<String>,
    subprotocols: Vec<String>,
    origin: Option<String>,
}

/// Incremental parser for the client's upgrade request.
pub struct HandshakeParser {
    limits: HandshakeLimits,
    /// The current line while it is incomplete; empty between lines.
    line: Vec<u8>,
    /// Head bytes consumed so far, checked against `max_header_bytes`.
    total: usize,
    /// Header lines seen, checked against `max_headers`.
    headers: usize,
    /// Bytes looked at, for tests and fuzzers to assert linear work.
    examined: usize,
    stage: Stage,
    seen: Seen,
}

impl HandshakeParser {
    /// A parser at the start of a head, enforcing `limits`.
    pub fn new(limits: HandshakeLimits) -> Self {
        Self {
            limits,
            line: Vec::new(),
            total: 0,
            headers: 0,
            examined: 0,
            stage: Stage::RequestLine,
            seen: Seen::default(),
        }
    }

    /// Feed bytes as they arrive. `Ok(None)` means the head is not complete yet.
    ///
    /// Every byte is examined once to find line ends (plus once more when its
    /// line is parsed), whatever the chunking. At most `max_header_bytes` are
    /// buffered. After a request or an error is returned the parser is
    /// finished and further calls return [`HandshakeError::AlreadyFinished`].
    pub fn feed(&mut self, input: &[u8]) -> Result<Option<Request>, HandshakeError> {
        if self.stage == Stage::Finished {
            return Err(HandshakeError::AlreadyFinished);
        }
        match self.feed_inner(input) {
            Ok(None) => Ok(None),
            done => {
                self.stage = Stage::Finished;
                self.line = Vec::new();
                done
            }
        }
    }

    /// Bytes examined so far: the newline scan plus line parsing. Linear in the
    /// bytes fed (at most twice as many), whatever the chunking; exposed so tests
    /// and fuzzers can assert that no input makes the parser rescan.
    pub fn bytes_examined(&self) -> usize {
        self.examined
    }

    fn feed_inner(&mut self, input: &[u8]) -> Result<Option<Request>, HandshakeError> {
        let mut pos = 0;
        while pos < input.len() {
            let budget = self.limits.max_header_bytes - self.total;
            let window = &input[pos..input.len().min(pos + budget)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.examined += i + 1;
                    self.total += i + 1;
                    let done = if self.line.is_empty() {
                        self.process_line(&window[..i])?
                    } else {
                        let mut line = std::mem::take(&mut self.line);
                        line.extend_from_slice(&window[..i]);
                        self.process_line(&line)?
                    };
                    pos += i + 1;
                    if done {
                        let mut request = self.finish()?;
                        request.leftover = input[pos..].to_vec();
                        return Ok(Some(request));
                    }
                }
                None => {
                    self.examined += window.len();
                    if window.len() < input.len() - pos {
                        return Err(HandshakeError::HeadersTooLarge {
                            limit: self.limits.max_header_bytes,
                        });
                    }
                    self.total += window.len();
                    self.line.extend_from_slice(window);
                    pos = input.len();
                }
            }
        }
        Ok(None)
    }

    /// Handles one complete line (without its `\n`); true at the blank line ending the head.
    fn process_line(&mut self, raw: &[u8]) -> Result<bool, HandshakeError> {
        self.examined += raw.len();
        let line = raw
            .strip_suffix(b"\r")
            .ok_or(HandshakeError::BareLineFeed)?;
        if line.contains(&b'\r') {
            return Err(HandshakeError::BareLineFeed);
        }
        match self.stage {
            Stage::RequestLine => {
                self.request_line(line)?;
                self.stage = Stage::Headers;
                Ok(false)
            }
            Stage::Headers if line.is_empty() => Ok(true),
            Stage::Headers => {
                self.headers += 1;
                if self.headers > self.limits.max_headers {
                    return Err(HandshakeError::TooManyHeaders {
                        limit: self.limits.max_headers,
                    });
                }
                self.header(line)?;
                Ok(false)
            }
            Stage::Finished => Err(HandshakeError::AlreadyFinished),
        }
    }

    fn request_line(&mut self, line: &[u8]) -> Result<(), HandshakeError> {
        let mut parts = line.split(|&b| b == b' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(HandshakeError::MalformedRequestLine);
        };
        if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
            return Err(HandshakeError::MalformedRequestLine);
        }
        if !is_http_version(version) {
            return Err(HandshakeError::MalformedRequestLine);
        }
        if method != b"GET" {
            // `method` is all tchars, hence ASCII; keep the message short.
            let name = String::from_utf8_lossy(&method[..method.len().min(16)]).into_owned();
            return Err(HandshakeError::MethodNotAllowed(name));
        }
        if version != b"HTTP/1.1" {
            return Err(HandshakeError::HttpVersionNotSupported);
        }
        // Printable ASCII, no fragment; origin-form or absolute-form.
        if !target.iter().all(|&b| b.is_ascii_graphic() && b != b'#') {
            return Err(HandshakeError::InvalidTarget);
        }
        let target = std::str::from_utf8(target).map_err(|_| HandshakeError::InvalidTarget)?;
        let (path, query) = origin_form(target).ok_or(HandshakeError::InvalidTarget)?;
        self.seen.path = path.to_owned();
        self.seen.query = query.map(str::to_owned);
        Ok(())
    }

    fn header(&mut self, line: &[u8]) -> Result<(), HandshakeError> {
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(HandshakeError::ObsoleteLineFolding);
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HandshakeError::MalformedHeader)?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(HandshakeError::MalformedHeader);
        }
        let value = trim_ows(&line[colon + 1..]);
        if !value.iter().all(|&b| is_field_vchar(b)) {
            return Err(HandshakeError::MalformedHeader);
        }
        let seen = &mut self.seen;
        if name.eq_ignore_ascii_case(b"host") {
            if std::mem::replace(&mut seen.host, true) {
                return Err(HandshakeError::DuplicateHeader("Host"));
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            seen.upgrade_present = true;
            seen.upgrade_websocket |= list(value).any(|t| t.eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            seen.connection_present = true;
            seen.connection_upgrade |= list(value).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
        } else if name.eq_ignore_ascii_case(b"sec-websocket-version") {
            if seen.version.replace(value.to_vec()).is_some() {
                return Err(HandshakeError::DuplicateHeader("Sec-WebSocket-Version"));
            }
        } else if name.eq_ignore_ascii_case(b"sec-websocket-key") {
            let key = utf8(value)?;
            if seen.key.replace(key).is_some() {
                return Err(HandshakeError::DuplicateHeader("Sec-WebSocket-Key"));
            }
        } else if name.eq_ignore_ascii_case(b"sec-websocket-protocol") {
            for token in list(value) {
                if !token.iter().all(|&b| is_tchar(b)) {
                    return Err(HandshakeError::InvalidSubprotocol);
                }
                seen.subprotocols.push(utf8(token)?);
            }
        } else if name.eq_ignore_ascii_case(b"origin") {
            let origin = utf8(value)?;
            if seen.origin.replace(origin).is_some() {
                return Err(HandshakeError::DuplicateHeader("Origin"));
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || (name.eq_ignore_ascii_case(b"content-length") && value != b"0")
        {
            return Err(HandshakeError::UnexpectedBody);
        }
        Ok(())
    }

    /// Judges the complete head; the checks run in a fixed order so a given
    /// request always gets the same answer, whatever order its headers came in.
    fn finish(&mut self) -> Result<Request, HandshakeError> {
        let seen = std::mem::take(&mut self.seen);
        if !seen.host {
            return Err(HandshakeError::MissingHeader("Host"));
        }
        let asks_upgrade = seen.upgrade_present
            || seen.connection_upgrade
            || seen.key.is_some()
            || seen.version.is_some();
        if !asks_upgrade {
            return Ok(Request {
                websocket: false,
                path: seen.path,
                query: seen.query,
                key: String::new(),
                subprotocols: Vec::new(),
                origin: seen.origin,
                leftover: Vec::new(),
            });
        }
        if !seen.upgrade_present {
            return Err(HandshakeError::MissingHeader("Upgrade"));
        }
        if !seen.upgrade_websocket {
            return Err(HandshakeError::NotWebSocketUpgrade);
        }
        if !seen.connection_present {
            return Err(HandshakeError::MissingHeader("Connection"));
        }
        if !seen.connection_upgrade {
            return Err(HandshakeError::ConnectionNotUpgrade);
        }
        if seen.version.as_deref() != Some(b"13") {
            return Err(HandshakeError::UnsupportedVersion);
        }
        let key = seen
            .key
            .ok_or(HandshakeError::MissingHeader("Sec-WebSocket-Key"))?;
        if !is_16_byte_key(&key) {
            return Err(HandshakeError::InvalidKey);
        }
        Ok(Request {
            websocket: true,
            path: seen.path,
            query: seen.query,
            key,
            subprotocols: seen.subprotocols,
            origin: seen.origin,
            leftover: Vec::new(),
        })
    }
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Field-value bytes: visible ASCII, SP, HTAB and obs-text; no controls.
fn is_field_vchar(b: u8) -> bool {
    b == b'\t' || b == b' ' || b.is_ascii_graphic() || b >= 0x80
}

/// `HTTP/<digit>.<digit>`: anything else is not an HTTP request at all (400).
fn is_http_version(v: &[u8]) -> bool {
    matches!(v, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
        if major.is_ascii_digit() && minor.is_ascii_digit())
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Elements of an RFC 9110 §5.6.1 comma list, trimmed, empty elements skipped.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

fn utf8(v: &[u8]) -> Result<String, HandshakeError> {
    std::str::from_utf8(v)
        .map(str::to_owned)
        .map_err(|_| HandshakeError::MalformedHeader)
}

/// Whether a `Sec-WebSocket-Key` is the canonical standard base64 (RFC
/// 4648 §4, padded, zero pad bits) of exactly 16 bytes (RFC 6455 §4.1).
fn is_16_byte_key(key: &str) -> bool {
    BASE64.decode(key).is_ok_and(|raw| raw.len() == 16)
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key ++ GUID)).
pub fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(sha.digest().bytes())
}

/// The `101 Switching Protocols` response completing the handshake.
///
/// `subprotocol` should be one of [`Request::subprotocols`] (which are
/// validated tokens); a value that is not a token is left out rather than
/// risk writing a malformed header.
pub fn accept_response(key: &str, subprotocol: Option<&str>) -> Vec<u8> {
    let mut out = String::with_capacity(160);
    out.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.push_str(&accept_key(key));
    out.push_str("\r\n");
    if let Some(p) = subprotocol.filter(|p| !p.is_empty() && p.bytes().all(is_tchar)) {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A `200 OK` carrying `body` (`content_type`), closing the connection
/// after it: the answer to a plain `GET` on the WebSocket port. Extra
/// headers are checked as in [`error_response_with`].
pub fn ok_response(content_type: &str, extra_headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = String::with_capacity(160);
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    push_extra_headers(&mut out, extra_headers);
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Appends caller headers, skipping any whose name is not a token or whose
/// value contains control characters, so a caller mistake cannot split the
/// response.
fn push_extra_headers(out: &mut String, extra_headers: &[(&str, &str)]) {
    for (name, value) in extra_headers {
        if !name.is_empty() && name.bytes().all(is_tchar) && value.bytes().all(is_field_vchar) {
            // Writing to a String cannot fail.
            let _ = write!(out, "{name}: {value}\r\n");
        }
    }
}

/// A plain-text error response that closes the connection.
pub fn error_response(status: u16, message: &str) -> Vec<u8> {
    error_response_with(status, message, &[])
}

/// Like [`error_response`], plus caller headers (e.g. `Retry-After` on 503).
///
/// 426 automatically carries `Sec-WebSocket-Version: 13` and `Upgrade:
/// websocket` (RFC 6455 §4.4, RFC 9110 §15.5.22); 405 carries `Allow: GET`
/// (RFC 9110 §15.5.6). Extra headers whose name is not a token or whose value
/// contains control characters are skipped, so a caller mistake cannot split
/// the response.
pub fn error_response_with(status: u16, message: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = String::with_capacity(192 + message.len());
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        reason_phrase(status),
        message.len() + 1
    );
    match status {
        426 => out.push_str(
            "Connection: close, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        ),
        405 => out.push_str("Connection: close\r\nAllow: GET\r\n"),
        _ => out.push_str("Connection: close\r\n"),
    }
    push_extra_headers(&mut out, extra_headers);
    out.push_str("\r\n");
    out.push_str(message);
    out.push('\n');
    out.into_bytes()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// The path and query of a request target. RFC 9112 §3.2.2: a server MUST
/// accept the absolute form (`ws://host:port/path?query`, as proxies and
/// some clients send it) besides the origin form (`/path?query`); its
/// scheme must be `http`, `https`, `ws` or `wss` (any case), its authority
/// is not empty and carries no userinfo (RFC 9110 §4.2.4), and an empty
/// path means `/`. `None` for anything else (`*`, authority-form, other
/// schemes).
fn origin_form(target: &str) -> Option<(&str, Option<&str>)> {
    let path_and_query = if target.starts_with('/') {
        target
    } else {
        let (scheme, rest) = target.split_once("://")?;
        if !["http", "https", "ws", "wss"]
            .iter()
            .any(|s| s.eq_ignore_ascii_case(scheme))
        {
            return None;
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path_and_query) = rest.split_at(end);
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        path_and_query
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    Some((if path.is_empty() { "/" } else { path }, query))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request_with(headers: &[&str]) -> Vec<u8> {
        let mut s = String::from("GET /chat?room=1 HTTP/1.1\r\n");
        for h in headers {
            s.push_str(h);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s.into_bytes()
    }

    fn valid() -> Vec<u8> {
        request_with(&[
            "Host: example.com",
            "Upgrade: websocket",
            "Connection: keep-alive, Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            "Origin: https://example.com",
            "Sec-WebSocket-Protocol: chat, superchat",
            "Sec-WebSocket-Protocol: shardcast.v1+zstd",
        ])
    }

    fn parse(bytes: &[u8]) -> Result<Option<Request>, HandshakeError> {
        HandshakeParser::new(HandshakeLimits::default()).feed(bytes)
    }

    fn status_of(bytes: &[u8]) -> u16 {
        parse(bytes)
            .expect_err("request should be refused")
            .status()
    }

    fn expect_request(bytes: &[u8]) -> Request {
        parse(bytes)
            .expect("request should be accepted")
            .expect("head is complete")
    }

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_valid_request() {
        let r = expect_request(&valid());
        assert_eq!(r.path, "/chat");
        assert_eq!(r.query.as_deref(), Some("room=1"));
        assert_eq!(r.key, KEY);
        assert_eq!(r.subprotocols, ["chat", "superchat", "shardcast.v1+zstd"]);
        assert_eq!(r.origin.as_deref(), Some("https://example.com"));
        assert!(r.leftover.is_empty());
    }

    #[test]
    fn valid_request_split_at_every_position() {
        let bytes = valid();
        let whole = expect_request(&bytes);
        for split in 0..=bytes.len() {
            let mut p = HandshakeParser::new(HandshakeLimits::default());
            let first = p.feed(&bytes[..split]).unwrap();
            let got = match first {
                Some(r) => r,
                None => p.feed(&bytes[split..]).unwrap().unwrap(),
            };
            assert_eq!(got, whole, "split at {split}");
        }
    }

    #[test]
    fn valid_request_fed_one_byte_at_a_time() {
        let bytes = valid();
        let mut p = HandshakeParser::new(HandshakeLimits::default());
        for (i, b) in bytes.iter().enumerate() {
            let r = p.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(r.is_some(), i == bytes.len() - 1);
        }
    }

    #[test]
    fn header_names_are_case_insensitive_and_values_trimmed() {
        let r = expect_request(&request_with(&[
            "hOsT:x",
            "UPGRADE: \tWebSocket ",
            "connection: UPGRADE",
            "SEC-WEBSOCKET-KEY:   dGhlIHNhbXBsZSBub25jZQ==\t",
            "sec-websocket-version: 13",
        ]));
        assert_eq!(r.key, KEY);
        assert!(r.subprotocols.is_empty());
        assert_eq!(r.origin, None);
        assert_eq!(r.query.as_deref(), Some("room=1"));
    }

    #[test]
    fn target_without_query() {
        let mut bytes = valid();
        bytes.splice(0..16, b"GET /ws".iter().copied());
        let r = expect_request(&bytes);
        assert_eq!((r.path.as_str(), r.query), ("/ws", None));
    }

    #[test]
    fn pipelined_bytes_are_leftover() {
        let mut bytes = valid();
        bytes.extend_from_slice(b"\x81\x85frame");
        assert_eq!(expect_request(&bytes).leftover, b"\x81\x85frame");
    }

    #[test]
    fn leftover_only_from_the_final_chunk() {
        let bytes = valid();
        let mut p = HandshakeParser::new(HandshakeLimits::default());
        assert!(p.feed(&bytes[..bytes.len() - 1]).unwrap().is_none());
        let r = p.feed(b"\nXY").unwrap().unwrap();
        assert_eq!(r.leftover, b"XY");
    }

    #[test]
    fn missing_key_is_400() {
        let bytes = request_with(&[
            "Host: x",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
        ]);
        assert_eq!(
            parse(&bytes),
            Err(HandshakeError::MissingHeader("Sec-WebSocket-Key"))
        );
        assert_eq!(status_of(&bytes), 400);
    }

    fn with_key(key: &str) -> Vec<u8> {
        request_with(&[
            "Host: x",
            "Upgrade: websocket",
            "Connection: Upgrade",
            &format!("Sec-WebSocket-Key: {key}"),
            "Sec-WebSocket-Version: 13",
        ])
    }

    #[test]
    fn bad_keys_are_400() {
        for key in [
            "",
            "short==",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZR==",
            "Zm9vYmFyZm9vYmFyZm9vYmFy",
            "dGhlIHNhbXBsZSBub25j!Q==",
        ] {
            assert_eq!(
                parse(&with_key(key)),
                Err(HandshakeError::InvalidKey),
                "{key:?}"
            );
        }
        assert!(parse(&with_key(KEY)).is_ok());
    }

    #[test]
    fn duplicate_key_is_400() {
        let bytes = request_with(&[
            "Host: x",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ]);
        assert_eq!(
            parse(&bytes),
            Err(HandshakeError::DuplicateHeader("Sec-WebSocket-Key"))
        );
    }

    fn with_version(v: Option<&str>) -> Vec<u8> {
        let version = v.map(|v| format!("Sec-WebSocket-Version: {v}"));
        let mut headers = vec![
            "Host: x",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ];
        headers.extend(version.as_deref());
        request_with(&headers)
    }

    #[test]
    fn wrong_or_missing_version_is_426() {
        for v in [Some("8"), Some("12"), Some("13, 8"), Some(""), None] {
            assert_eq!(
                parse(&with_version(v)),
                Err(HandshakeError::UnsupportedVersion),
                "{v:?}"
            );
            assert_eq!(status_of(&with_version(v)), 426);
        }
        assert!(parse(&with_version(Some("13"))).is_ok());
    }

    #[test]
    fn version_is_judged_before_key() {
        let bytes = request_with(&[
            "Host: x",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: nope",
            "Sec-WebSocket-Version: 8",
        ]);
        assert_eq!(status_of(&bytes), 426);
    }

    #[test]
    fn missing_host_is_400() {
        let bytes = request_with(&[
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ]);
        assert_eq!(parse(&bytes), Err(HandshakeError::MissingHeader("Host")));
    }

    #[test]
    fn upgrade_must_name_websocket() {
        let mut h = vec![
            "Host: x",
            "Upgrade: h2c",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ];
        assert_eq!(
            parse(&request_with(&h)),
            Err(HandshakeError::NotWebSocketUpgrade)
        );
        h[1] = "Upgrade: h2c, WEBSOCKET";
        assert!(parse(&request_with(&h)).is_ok());
        h.remove(1);
        assert_eq!(
            parse(&request_with(&h)),
            Err(HandshakeError::MissingHeader("Upgrade"))
        );
    }

    #[test]
    fn connection_must_contain_upgrade() {
        let mut h = vec![
            "Host: x",
            "Upgrade: websocket",
            "Connection: keep-alive",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ];
        assert_eq!(
            parse(&request_with(&h)),
            Err(HandshakeError::ConnectionNotUpgrade)
        );
        h[2] = "Connection: upgradex";
        assert_eq!(
            parse(&request_with(&h)),
            Err(HandshakeError::ConnectionNotUpgrade)
        );
        h.insert(3, "Connection: ,UpGrAdE,");
        assert!(parse(&request_with(&h)).is_ok());
    }

    #[test]
    fn non_get_is_405() {
        let mut bytes = valid();
        bytes.splice(0..3, b"POST".iter().copied());
        assert_eq!(
            parse(&bytes),
            Err(HandshakeError::MethodNotAllowed("POST".into()))
        );
        assert_eq!(status_of(&bytes), 405);
    }

    #[test]
    fn http_1_0_and_2_are_505() {
        for v in ["HTTP/1.0", "HTTP/2.0"] {
            let bytes = format!("GET / {v}\r\nHost: x\r\n\r\n");
            assert_eq!(status_of(bytes.as_bytes()), 505, "{v}");
        }
    }

    #[test]
    fn request_line_fails_fast_before_headers() {
        let mut p = HandshakeParser::new(HandshakeLimits::default());
        assert_eq!(
            p.feed(b"GET / HTTP/1.0\r\n"),
            Err(HandshakeError::HttpVersionNotSupported)
        );
        assert_eq!(p.feed(b"Host: x\r\n"), Err(HandshakeError::AlreadyFinished));
    }

    #[test]
    fn malformed_request_lines_are_400() {
        for line in [
            "GET / HTTP/1.1 extra",
            "GET  / HTTP/1.1",
            "GET /",
            "",
            "GET / FTP/1.1",
            "G(T / HTTP/1.1",
        ] {
            let bytes = format!("{line}\r\nHost: x\r\n\r\n");
            assert_eq!(
                parse(bytes.as_bytes()),
                Err(HandshakeError::MalformedRequestLine),
                "{line:?}"
            );
        }
    }

    #[test]
    fn a_plain_get_is_not_an_upgrade_but_a_partial_upgrade_is_refused() {
        let r = parse(b"GET /dictionaries/9?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.websocket);
        assert_eq!(
            (r.path.as_str(), r.query.as_deref()),
            ("/dictionaries/9", Some("x=1"))
        );
        // Any upgrade header makes it an upgrade attempt, checked in full.
        for h in [
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            "Connection: Upgrade",
        ] {
            let bytes = format!("GET /ws HTTP/1.1\r\nHost: x\r\n{h}\r\n\r\n");
            assert_eq!(
                parse(bytes.as_bytes()),
                Err(HandshakeError::MissingHeader("Upgrade")),
                "{h}"
            );
        }
        assert!(parse(&valid()).unwrap().unwrap().websocket);
    }

    #[test]
    fn absolute_form_targets_are_accepted() {
        for (target, path, query) in [
            ("ws://127.0.0.1:8080/ws", "/ws", None),
            ("http://example.com/ws?token=a", "/ws", Some("token=a")),
            ("WSS://example.com", "/", None),
            ("https://example.com?x=1", "/", Some("x=1")),
        ] {
            let bytes = String::from_utf8(valid()).unwrap().replacen(
                "GET /chat?room=1 ",
                &format!("GET {target} "),
                1,
            );
            let r = parse(bytes.as_bytes())
                .unwrap_or_else(|e| panic!("{target}: {e}"))
                .expect("a complete head");
            assert_eq!(
                (r.path.as_str(), r.query.as_deref()),
                (path, query),
                "{target}"
            );
        }
    }

    #[test]
    fn bad_targets_are_400() {
        for target in [
            "*",
            "example.com:80",
            "ftp://x/",
            "http://user@x/",
            "http:///ws",
            "http://x#frag",
            "/a#frag",
            "/a\x7fb",
            "/caf\u{e9}",
        ] {
            let bytes = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(
                parse(bytes.as_bytes()),
                Err(HandshakeError::InvalidTarget),
                "{target:?}"
            );
        }
    }

    #[test]
    fn bare_lf_is_400() {
        let bytes = String::from_utf8(valid()).unwrap().replacen(
            "Host: example.com\r\n",
            "Host: example.com\n",
            1,
        );
        assert_eq!(parse(bytes.as_bytes()), Err(HandshakeError::BareLineFeed));
        assert_eq!(
            parse(b"GET / HTTP/1.1\n"),
            Err(HandshakeError::BareLineFeed)
        );
    }

    #[test]
    fn bare_cr_inside_a_line_is_400() {
        let bytes = request_with(&["Host: a\rb"]);
        assert_eq!(parse(&bytes), Err(HandshakeError::BareLineFeed));
    }

    #[test]
    fn obs_fold_is_400() {
        for fold in [" continued", "\tcontinued"] {
            let bytes = request_with(&["Host: x", "X-Long: a", fold]);
            assert_eq!(parse(&bytes), Err(HandshakeError::ObsoleteLineFolding));
        }
    }

    #[test]
    fn header_without_colon_or_bad_name_is_400() {
        for line in [
            "NoColonHere",
            ": empty-name",
            "Bad Name: x",
            "Host : x",
            "X-A: a\x00b",
        ] {
            let bytes = request_with(&["Host: x", line]);
            assert_eq!(
                parse(&bytes),
                Err(HandshakeError::MalformedHeader),
                "{line:?}"
            );
        }
    }

    #[test]
    fn bad_subprotocol_token_is_400() {
        let bytes = request_with(&["Host: x", "Sec-WebSocket-Protocol: chat, a b"]);
        assert_eq!(parse(&bytes), Err(HandshakeError::InvalidSubprotocol));
    }

    #[test]
    fn request_body_is_400() {
        for line in ["Content-Length: 5", "Transfer-Encoding: chunked"] {
            let bytes = request_with(&["Host: x", line]);
            assert_eq!(parse(&bytes), Err(HandshakeError::UnexpectedBody), "{line}");
        }
        let mut bytes = valid();
        bytes.splice(
            bytes.len() - 2..bytes.len() - 2,
            b"Content-Length: 0\r\n".iter().copied(),
        );
        assert!(parse(&bytes).unwrap().is_some());
    }

    #[test]
    fn too_many_headers_is_431() {
        let limits = HandshakeLimits {
            max_header_bytes: 8192,
            max_headers: 6,
        };
        let mut headers = vec![
            "Host: x",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            "X-A: 1",
        ];
        let mut p = HandshakeParser::new(limits);
        assert!(p.feed(&request_with(&headers)).unwrap().is_some());
        headers.push("X-B: 2");
        let mut p = HandshakeParser::new(limits);
        let err = p.feed(&request_with(&headers)).unwrap_err();
        assert_eq!(err, HandshakeError::TooManyHeaders { limit: 6 });
        assert_eq!(err.status(), 431);
    }

    #[test]
    fn too_many_bytes_is_431() {
        let bytes = valid();
        // Exactly the head size fits...
        let mut p = HandshakeParser::new(HandshakeLimits {
            max_header_bytes: bytes.len(),
            max_headers: 64,
        });
        assert!(p.feed(&bytes).unwrap().is_some());
        // ...one byte less does not, whether fed whole or byte by byte.
        let tight = HandshakeLimits {
            max_header_bytes: bytes.len() - 1,
            max_headers: 64,
        };
        let mut p = HandshakeParser::new(tight);
        let err = p.feed(&bytes).unwrap_err();
        assert_eq!(err.status(), 431);
        let mut p = HandshakeParser::new(tight);
        let mut result = Ok(None);
        for b in &bytes {
            result = p.feed(std::slice::from_ref(b));
            if result != Ok(None) {
                break;
            }
        }
        assert_eq!(result.unwrap_err().status(), 431);
    }

    #[test]
    fn endless_line_is_431_and_buffer_stays_bounded() {
        let mut p = HandshakeParser::new(HandshakeLimits::default());
        let chunk = [b'a'; 1000];
        let mut fed = 0;
        let err = loop {
            match p.feed(&chunk) {
                Ok(None) => fed += chunk.len(),
                Ok(Some(_)) => panic!("no request in an endless line"),
                Err(e) => break e,
            }
            assert!(p.line.len() <= 8192);
        };
        assert_eq!(err.status(), 431);
        assert!(fed <= 8192);
    }

    #[test]
    fn incremental_feed_is_linear() {
        // ~8000 bytes of headers, one byte per feed: a rescanning parser would
        // examine ~n²/2 = 32 million bytes; this one looks at each byte at most twice.
        let tail = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let mut head = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        while head.len() + tail.len() < 8100 {
            let room = 8100 - head.len() - tail.len();
            head.push_str("X-Filler: ");
            head.push_str(&"v".repeat(room.clamp(1, 400)));
            head.push_str("\r\n");
        }
        head.push_str(tail);
        let bytes = head.into_bytes();
        assert!(bytes.len() > 8000 && bytes.len() <= 8192);
        let mut p = HandshakeParser::new(HandshakeLimits::default());
        let mut done = None;
        for b in &bytes {
            if let Some(r) = p.feed(std::slice::from_ref(b)).unwrap() {
                done = Some(r);
            }
        }
        assert!(done.is_some());
        assert!(
            p.bytes_examined() <= 2 * bytes.len(),
            "examined {} for {} bytes",
            p.bytes_examined(),
            bytes.len()
        );
    }

    #[test]
    fn accept_response_format() {
        let r = String::from_utf8(accept_response(KEY, None)).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        let r = String::from_utf8(accept_response(KEY, Some("chat"))).unwrap();
        assert!(r.ends_with("Sec-WebSocket-Protocol: chat\r\n\r\n"));
        let r = String::from_utf8(accept_response(KEY, Some("bad\r\nX: y"))).unwrap();
        assert!(!r.contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn error_response_format() {
        let r = String::from_utf8(error_response(400, "missing Host header")).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 20\r\nConnection: close\r\n\r\nmissing Host header\n"
        );
    }

    #[test]
    fn error_426_names_version_13() {
        let r = String::from_utf8(error_response(426, "x")).unwrap();
        assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(r.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(r.contains("\r\nUpgrade: websocket\r\n"));
    }

    #[test]
    fn error_405_names_allowed_method() {
        let r = String::from_utf8(error_response(405, "x")).unwrap();
        assert!(r.contains("\r\nAllow: GET\r\n"));
    }

    #[test]
    fn error_response_with_extra_headers() {
        let r = String::from_utf8(error_response_with(
            503,
            "busy",
            &[
                ("Retry-After", "5"),
                ("Bad\r\nName", "x"),
                ("X-Bad", "a\r\nInjected: 1"),
            ],
        ))
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(r.contains("\r\nRetry-After: 5\r\n"));
        assert!(!r.contains("Injected"));
        assert!(!r.contains("Bad"));
        assert!(r.ends_with("\r\n\r\nbusy\n"));
    }

    #[test]
    fn every_error_has_a_status_and_message() {
        let errors = [
            HandshakeError::HeadersTooLarge { limit: 1 },
            HandshakeError::TooManyHeaders { limit: 1 },
            HandshakeError::BareLineFeed,
            HandshakeError::MalformedRequestLine,
            HandshakeError::MethodNotAllowed("PUT".into()),
            HandshakeError::HttpVersionNotSupported,
            HandshakeError::InvalidTarget,
            HandshakeError::ObsoleteLineFolding,
            HandshakeError::MalformedHeader,
            HandshakeError::MissingHeader("Host"),
            HandshakeError::DuplicateHeader("Host"),
            HandshakeError::NotWebSocketUpgrade,
            HandshakeError::ConnectionNotUpgrade,
            HandshakeError::UnsupportedVersion,
            HandshakeError::InvalidKey,
            HandshakeError::InvalidSubprotocol,
            HandshakeError::UnexpectedBody,
            HandshakeError::AlreadyFinished,
        ];
        let statuses: Vec<u16> = errors.iter().map(HandshakeError::status).collect();
        assert_eq!(
            statuses,
            [
                431, 431, 400, 400, 405, 505, 400, 400, 400, 400, 400, 400, 400, 426, 400, 400,
                400, 500
            ]
        );
        for e in &errors {
            assert!(!e.to_string().is_empty());
        }
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic_and_work_is_linear(
                data in proptest::collection::vec(any::<u8>(), 0..2048),
                chunk in 1usize..64,
            ) {
                let mut p = HandshakeParser::new(HandshakeLimits { max_header_bytes: 1024, max_headers: 8 });
                let mut fed = 0;
                for c in data.chunks(chunk) {
                    fed += c.len();
                    if p.feed(c).map_or(true, |r| r.is_some()) {
                        break;
                    }
                }
                prop_assert!(p.bytes_examined() <= 2 * fed);
            }

            #[test]
            fn chunking_does_not_change_the_outcome(
                junk in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b':'), Just(b' '), any::<u8>()], 0..64),
                at in 0usize..400,
                splits in proptest::collection::vec(1usize..40, 1..20),
            ) {
                let mut bytes = super::valid();
                let at = at.min(bytes.len());
                bytes.splice(at..at, junk);
                let whole = super::parse(&bytes);
                let mut p = HandshakeParser::new(HandshakeLimits::default());
                let mut pos = 0;
                let mut chunked = Ok(None);
                for s in splits.iter().cycle() {
                    if pos >= bytes.len() { break; }
                    let end = (pos + s).min(bytes.len());
                    chunked = p.feed(&bytes[pos..end]);
                    pos = end;
                    if chunked != Ok(None) { break; }
                }
                // Bytes never fed because the head ended earlier count as leftover.
                let chunked = chunked.map(|r| r.map(|mut r| {
                    r.leftover.extend_from_slice(&bytes[pos..]);
                    r
                }));
                prop_assert_eq!(whole, chunked);
            }
        }
    }

    #[test]
    fn a_key_must_be_canonical_base64_of_16_bytes() {
        assert!(is_16_byte_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25jZQ")); // no padding
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25jZQ=")); // short
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25jZQ===")); // long
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25jZR==")); // pad bits set
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25j-Q==")); // url-safe alphabet
        assert!(!is_16_byte_key("Zm9vYmFyZm9vYmFyZm9vYmFy")); // 18 bytes
    }
}
