//! Arbitrary connect tokens through `jwt::Verifier::verify`, with both an
//! HS256 secret and an Ed25519 key configured (so every `alg` branch is
//! live), and an issuer and audience to check.
//!
//! Input layout: byte 0 picks the mode.
//! - even: the rest (lossy UTF-8) is the token, as a client sends it;
//! - odd: the rest is `header 0xFF claims` (0xFF never occurs in UTF-8, so
//!   it cannot clash with JSON text), signed here with the HS256 secret so
//!   the header and claims checks behind the signature are reached too.
//!
//! Each token is verified at three times (0, a present-day time,
//! `u64::MAX`), which exercises the `exp`/`nbf` arithmetic at its edges.
//! Checked: no panic; the same input gives the same answer twice; an
//! accepted token has a non-empty `sub`, a header without `crit`, an `alg`
//! the verifier has a key for, the configured `iss` and `aud`, and `exp`
//! / `nbf` that hold at that time within the leeway; error messages are
//! never empty.
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use shardcast::auth::jwt::{mint, Audience, Claims, Verifier};

/// 40 bytes: HS256 keys must have at least 32 (RFC 7518 §3.2).
const SECRET: &str = "fuzz-jwt-hs256-secret-of-at-least-32-byt";
/// Base64 of an Ed25519 public key: RFC 8032 §7.1, TEST 1.
const ED25519_PUBLIC: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
const ISSUER: &str = "https://app.example";
const AUDIENCE: &str = "shardcast";
const LEEWAY_SECS: u32 = 5;
const TIMES: [u64; 3] = [0, 1_800_000_000, u64::MAX];

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        Verifier::new(SECRET, ED25519_PUBLIC, ISSUER, AUDIENCE, LEEWAY_SECS)
            .expect("fuzz keys are valid")
    })
}

fn token(data: &[u8]) -> Option<String> {
    let (&mode, rest) = data.split_first()?;
    Some(if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let split = rest.iter().position(|&b| b == 0xFF).unwrap_or(rest.len());
        let (header, claims) = rest.split_at(split);
        let claims = claims.get(1..).unwrap_or_default();
        mint::hs256_raw(SECRET.as_bytes(), header, claims)
    })
}

/// What must hold of a token `verify` accepted at `now`.
fn check_accepted(token: &str, claims: &Claims, now: u64) {
    assert!(
        claims.sub.as_deref().is_some_and(|s| !s.is_empty()),
        "no sub"
    );
    assert_eq!(claims.iss.as_deref(), Some(ISSUER));
    let aud_ok = match &claims.aud {
        Audience::None => false,
        Audience::One(a) => a == AUDIENCE,
        Audience::Many(list) => list.iter().any(|a| a == AUDIENCE),
    };
    assert!(aud_ok, "audience {:?}", claims.aud);
    let leeway = u64::from(LEEWAY_SECS);
    if let Some(exp) = claims.exp {
        assert!(now <= exp.saturating_add(leeway), "expired");
    }
    if let Some(nbf) = claims.nbf {
        assert!(now.saturating_add(leeway) >= nbf, "not yet valid");
    }
    // The header verify trusted: an object with a configured alg and no
    // crit (serde_json undoes any escapes a raw text search would miss).
    let header = token.split('.').next().expect("a header part");
    let bytes = URL_SAFE_NO_PAD.decode(header).expect("header base64url");
    let header: serde_json::Value = serde_json::from_slice(&bytes).expect("header JSON");
    assert!(header.get("crit").is_none(), "crit accepted: {header}");
    let alg = header.get("alg").and_then(|a| a.as_str());
    assert!(matches!(alg, Some("HS256" | "EdDSA")), "alg {alg:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some(token) = token(data) else {
        return;
    };
    let v = verifier();
    for now in TIMES {
        let first = v.verify(&token, now);
        let again = v.verify(&token, now);
        match (&first, &again) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "same token, same claims");
                check_accepted(&token, a, now);
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b, "same token, same error");
                assert!(!a.to_string().is_empty());
            }
            _ => panic!("verify is not deterministic: {first:?} then {again:?}"),
        }
    }
});
