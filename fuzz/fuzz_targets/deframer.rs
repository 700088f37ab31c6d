//! Arbitrary client bytes, in arbitrary chunkings, through `Session::decode`.
//!
//! Input layout: byte 0 says how many chunk-size bytes follow (0..=15); each
//! size byte `s` is a chunk of `s + 1` bytes, cycled; the rest is the stream.
//! Checked: no panic; every call consumes at most its input and makes progress;
//! `None` only once the input is used up; error reasons fit a close frame; and
//! the chunked run yields exactly the events and error of the one-piece run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::protocol::ws::{Event, FrameLimits, Session, WsError};

/// Small limits so the fuzzer reaches the 1009 paths with short inputs.
const LIMITS: FrameLimits = FrameLimits {
    max_frame_bytes: 4096,
    max_message_bytes: 8192,
    max_fragments: 8,
};

fn run(data: &[u8], sizes: &[u8]) -> (Vec<Event>, Option<WsError>) {
    let mut session = Session::new(LIMITS);
    let mut events = Vec::new();
    let mut pos = 0;
    let mut next_size = sizes.iter().cycle().map(|&s| usize::from(s) + 1);
    while pos < data.len() {
        let end = next_size
            .next()
            .map_or(data.len(), |s| (pos + s).min(data.len()));
        let mut rest = &data[pos..end];
        while !rest.is_empty() {
            match session.decode(rest) {
                Ok((consumed, event)) => {
                    assert!(consumed <= rest.len(), "consumed more than given");
                    assert!(consumed > 0, "no progress on non-empty input");
                    rest = &rest[consumed..];
                    match event {
                        Some(event) => events.push(event),
                        None => assert!(rest.is_empty(), "None before the input ended"),
                    }
                }
                Err(err) => {
                    assert!(err.to_string().len() <= 123, "close reason too long");
                    assert_eq!(session.decode(rest), Err(err), "errors must be sticky");
                    return (events, Some(err));
                }
            }
        }
        pos = end;
    }
    (events, None)
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
});
