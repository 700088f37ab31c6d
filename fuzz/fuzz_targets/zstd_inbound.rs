//! What the server does with a binary message from a `shardcast.v1+zstd`
//! client: open the flag byte (decompressing with output and window caps),
//! then verify the FlatBuffers envelope. Must never panic, never produce
//! more than the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::protocol::compression::{CompressionError, Decompressor};
use shardcast::protocol::wire::{decode_client_frame, DecodeLimits};

const CAP: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut d = Decompressor::new(CAP, None).expect("zstd context");
    match d.open(data) {
        Ok(inner) => {
            assert!(inner.len() <= CAP);
            let _ = decode_client_frame(inner, &DecodeLimits::default());
        }
        Err(CompressionError::TooLarge(n)) => assert_eq!(n, CAP),
        Err(_) => {}
    }
});
