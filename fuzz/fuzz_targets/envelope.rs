//! Arbitrary bytes through the native wire decoders
//! (`decode_client_frame`, `decode_server_frame`).
//!
//! Checked: no panic (the verifier bounds every read and the work); an error
//! has a close reason that fits a close frame; and whatever decodes survives
//! a re-encode/decode round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::protocol::wire::{
    decode_client_frame, decode_server_frame, ClientEncoder, DecodeLimits, Encoder,
};

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits::default();
    // Re-encoding flattens batches (one channel string per item), so the
    // copy may be larger than the original.
    let relaxed = DecodeLimits {
        max_bytes: 64 << 20,
        ..limits
    };

    match decode_client_frame(data, &limits) {
        Ok(reqs) => {
            let again = ClientEncoder::new().frame(&reqs);
            let back = decode_client_frame(&again, &relaxed).expect("re-encoded client frame");
            assert_eq!(back, reqs);
        }
        Err(e) => assert!(e.reason().len() <= 123),
    }

    match decode_server_frame(data, &limits) {
        // A frame of empty batches decodes to nothing; nothing to re-encode.
        Ok(msgs) if msgs.is_empty() => {}
        Ok(msgs) => {
            let mut enc = Encoder::new();
            let back = decode_server_frame(enc.frame(&msgs), &relaxed).expect("re-encoded server frame");
            assert_eq!(back, msgs);
        }
        Err(e) => assert!(e.reason().len() <= 123),
    }
});
