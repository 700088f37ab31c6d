//! The two tiny base64 jobs the handshake needs: encode the 20-byte SHA-1
//! accept digest, and check that a client key is the canonical encoding of
//! exactly 16 bytes. A general-purpose crate would be more code than this.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with `=` padding (RFC 4648 §4).
pub(super) fn encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

fn value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// True when `s` is the canonical base64 encoding of exactly 16 bytes:
/// 22 alphabet characters, `==`, and zero padding bits (so no two distinct
/// strings name the same key).
pub(super) fn is_16_byte_key(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 24 || &b[22..] != b"==" {
        return false;
    }
    let mut last = 0;
    for &c in &b[..22] {
        match value(c) {
            Some(v) => last = v,
            None => return false,
        }
    }
    // 16 bytes = 128 bits; 22 sextets carry 132, so the last one's low 4 bits are padding.
    last & 0x0f == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_rfc4648_vectors() {
        let cases: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (raw, enc) in cases {
            assert_eq!(encode(raw), enc);
        }
    }

    #[test]
    fn accepts_any_encoded_16_bytes() {
        for seed in 0u8..=255 {
            let raw: Vec<u8> = (0..16u8)
                .map(|i| seed.wrapping_mul(31).wrapping_add(i.wrapping_mul(seed | 1)))
                .collect();
            assert!(is_16_byte_key(&encode(&raw)));
        }
    }

    #[test]
    fn rejects_wrong_length_padding_alphabet_and_nonzero_pad_bits() {
        assert!(is_16_byte_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25jZQ")); // no padding
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25jZQ=")); // short
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25jZQ===")); // long
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25jZR==")); // pad bits set
        assert!(!is_16_byte_key("dGhlIHNhbXBsZSBub25j-Q==")); // url-safe alphabet
        assert!(!is_16_byte_key("Zm9vYmFyZm9vYmFyZm9vYmFy")); // 18 bytes
    }
}
