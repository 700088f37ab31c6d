//! Arbitrary bytes, in arbitrary chunkings, through `HandshakeParser::feed`.
//!
//! Input layout as in the deframer target: byte 0 = number of chunk-size bytes
//! (0..=15), each size byte `s` a chunk of `s + 1` bytes, cycled; then the data.
//! Checked: no panic; work stays linear (each byte examined at most twice, the
//! CVE-2023-43669 property); the chunked run gives the same request (with the
//! same leftover bytes) or the same error as the one-piece run; responses built
//! from the outcome are well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::protocol::ws::{
    accept_key, accept_response, error_response, HandshakeError, HandshakeLimits, HandshakeParser,
    Request,
};

/// Small limits so the fuzzer reaches the 431 paths with short inputs.
const LIMITS: HandshakeLimits = HandshakeLimits {
    max_header_bytes: 1024,
    max_headers: 16,
};

fn run(data: &[u8], sizes: &[u8]) -> Result<Option<Request>, HandshakeError> {
    let mut parser = HandshakeParser::new(LIMITS);
    let mut next_size = sizes.iter().cycle().map(|&s| usize::from(s) + 1);
    let mut pos = 0;
    let mut fed = 0;
    let mut outcome = Ok(None);
    while pos < data.len() {
        let end = next_size
            .next()
            .map_or(data.len(), |s| (pos + s).min(data.len()));
        outcome = parser.feed(&data[pos..end]);
        fed += end - pos;
        pos = end;
        assert!(
            parser.bytes_examined() <= 2 * fed,
            "parser rescanned its input"
        );
        if !matches!(outcome, Ok(None)) {
            assert_eq!(parser.feed(b"x"), Err(HandshakeError::AlreadyFinished));
            break;
        }
    }
    // Bytes never fed because the head ended in an earlier chunk are leftover too.
    outcome.map(|request| {
        request.map(|mut r| {
            r.leftover.extend_from_slice(&data[pos..]);
            r
        })
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&count, rest)) = input.split_first() else {
        return;
    };
    let count = usize::from(count % 16).min(rest.len());
    let (sizes, data) = rest.split_at(count);
    let whole = run(data, &[]);
    let chunked = run(data, sizes);
    assert_eq!(whole, chunked, "chunking changed the outcome");
    match whole {
        Ok(Some(request)) => {
            let response = accept_response(
                &request.key,
                request.subprotocols.first().map(String::as_str),
            );
            let text = String::from_utf8(response).expect("response is ASCII");
            assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
            assert!(text.contains(&accept_key(&request.key)));
            assert!(text.ends_with("\r\n\r\n"));
        }
        Ok(None) => {}
        Err(err) => {
            let message = err.to_string();
            let response = error_response(err.status(), &message);
            let text = String::from_utf8(response).expect("response is UTF-8");
            let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
            assert_eq!(body.len(), message.len() + 1);
            assert!(head.contains(&format!("Content-Length: {}", body.len())));
        }
    }
});
