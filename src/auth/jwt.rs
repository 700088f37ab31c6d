//! JWT (RFC 7519) verification for connect tokens.
//!
//! Only compact JWS tokens with `HS256` or `EdDSA` (Ed25519) are accepted,
//! and only for algorithms that have a configured key: the token's `alg`
//! header selects among *configured* keys and can never switch verification
//! off (`none`) or turn a public key into an HMAC secret. A token whose
//! header has `crit` is refused: no JWS extension is implemented
//! (RFC 7515 §4.1.11). HS256 secrets are at least 32 bytes (RFC 7518 §3.2).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{KeyInit, Mac};
use serde::Deserialize;
use thiserror::Error;

/// Why a token was refused. Messages never contain the token itself.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not three dot-separated parts (RFC 7515 §7.1).
    #[error("token is not a compact JWS (header.payload.signature)")]
    Malformed,
    /// A part is not unpadded base64url, or the header or claims are not
    /// a JSON object.
    #[error("token header or claims are not valid base64url JSON")]
    BadEncoding,
    /// A claim shardcast reads has the wrong JSON type, e.g. `channels` as
    /// a string instead of an array of strings.
    #[error("token claim {claim} must be {expected}")]
    BadClaim {
        /// The claim's name.
        claim: &'static str,
        /// What it must be, e.g. `"an array of strings"`.
        expected: &'static str,
    },
    /// `alg` is not `HS256` or `EdDSA`, or has no configured key (its first
    /// 16 characters).
    #[error("token algorithm {0:?} is not accepted by this server")]
    AlgorithmNotAllowed(String),
    /// The JOSE header has a `crit` parameter: the token depends on JWS
    /// extensions, and this server implements none (RFC 7515 §4.1.11).
    #[error("token header marks extensions critical (crit); none are supported")]
    CriticalExtension,
    /// The HS256 MAC (compared in constant time) or the Ed25519 signature
    /// (strict verification) does not match.
    #[error("token signature does not verify")]
    BadSignature,
    /// `now` is past `exp` plus the leeway (seconds).
    #[error("token has expired")]
    Expired,
    /// The token has no `exp` and `auth.require_exp` is on.
    #[error("token has no expiry (exp), which this server requires")]
    NoExpiry,
    /// `now` plus the leeway (seconds) is before `nbf`.
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// An issuer is configured and `iss` is absent or differs.
    #[error("token issuer does not match")]
    WrongIssuer,
    /// An audience is configured and `aud` is absent or does not contain it.
    #[error("token audience does not match")]
    WrongAudience,
    /// `sub` is absent or empty.
    #[error("token has no subject (sub)")]
    NoSubject,
}

/// Keys and claim rules, from configuration.
pub struct Verifier {
    hs256: Option<Vec<u8>>,
    ed25519: Option<ed25519_dalek::VerifyingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
    require_exp: bool,
}

/// The claims shardcast uses.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Subject: the user id (required by [`Verifier::verify`]).
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch (RFC 7519 §4.1.4).
    pub exp: Option<u64>,
    /// Not before, seconds since the Unix epoch (RFC 7519 §4.1.5).
    pub nbf: Option<u64>,
    /// Issuer (RFC 7519 §4.1.1), checked against `auth.issuer` if set.
    pub iss: Option<String>,
    /// Audience (RFC 7519 §4.1.3), checked against `auth.audience` if set.
    #[serde(default)]
    pub aud: Audience,
    /// Channel patterns the holder may subscribe to (and publish to, when
    /// `publish` is absent) beyond public channels; `*` at the end matches
    /// any suffix.
    #[serde(default)]
    pub channels: Vec<String>,
    /// If present, the only channel patterns the holder may publish to.
    pub publish: Option<Vec<String>>,
}

/// The `aud` claim, which RFC 7519 §4.1.3 allows as one string or an array.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    /// No `aud` claim.
    #[default]
    None,
    /// `aud` as a single string.
    One(String),
    /// `aud` as an array of strings; matches if any element does.
    Many(Vec<String>),
}

/// The JOSE header fields shardcast looks at (RFC 7515 §4.1); others are
/// ignored, as §4 allows, unless `crit` says they must be understood.
#[derive(Deserialize)]
struct Header {
    alg: String,
    /// Whether the header has a `crit` parameter, whatever its value.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

/// `true` for any value (`null` included): a field deserialized with this
/// (and `#[serde(default)]`) tells "present" from "absent".
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

/// The shortest HS256 secret accepted, in bytes: RFC 7518 §3.2 requires a
/// key at least as long as the hash output (256 bits).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Errors in the key configuration, reported at start (and by
/// `check-config`, which validates through [`Verifier::new`]).
#[derive(Debug, Error)]
#[error("{}: {}", self.key(), self.reason())]
pub enum KeyError {
    /// `auth.ed25519_public_key` is neither a PEM Ed25519 SPKI nor base64 of
    /// the 32 key bytes or of the 44-byte DER SPKI, or is not a valid point
    /// (why, never the key).
    Ed25519(String),
    /// The HS256 secret's length in bytes (never its value).
    Hs256TooShort(usize),
}

impl KeyError {
    /// The config key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            KeyError::Ed25519(_) => "auth.ed25519_public_key",
            KeyError::Hs256TooShort(_) => "auth.hs256_secret",
        }
    }

    /// What is wrong with it (never its value).
    pub fn reason(&self) -> String {
        match self {
            KeyError::Ed25519(why) => why.clone(),
            KeyError::Hs256TooShort(n) => format!(
                "is {n} bytes; an HS256 key must be at least {MIN_HS256_SECRET_BYTES} bytes (256 bits, RFC 7518 §3.2), e.g. the output of `openssl rand -base64 32`; empty turns HS256 off"
            ),
        }
    }
}

impl Verifier {
    /// Empty `hs256_secret` / `ed25519_public_key` turn that algorithm off;
    /// empty `issuer` / `audience` skip that check.
    ///
    /// Errors: [`KeyError::Hs256TooShort`] for a non-empty HS256 secret
    /// under [`MIN_HS256_SECRET_BYTES`], [`KeyError::Ed25519`] for a key
    /// that does not parse.
    pub fn new(
        hs256_secret: &str,
        ed25519_public_key: &str,
        issuer: &str,
        audience: &str,
        leeway_secs: u32,
    ) -> Result<Self, KeyError> {
        if !hs256_secret.is_empty() && hs256_secret.len() < MIN_HS256_SECRET_BYTES {
            return Err(KeyError::Hs256TooShort(hs256_secret.len()));
        }
        let ed25519 = if ed25519_public_key.trim().is_empty() {
            None
        } else {
            Some(parse_ed25519_key(ed25519_public_key).map_err(KeyError::Ed25519)?)
        };
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(Verifier {
            hs256: nonempty(hs256_secret).map(String::into_bytes),
            ed25519,
            issuer: nonempty(issuer),
            audience: nonempty(audience),
            leeway_secs: u64::from(leeway_secs),
            require_exp: false,
        })
    }

    /// With `true`, tokens without an `exp` claim are refused
    /// ([`TokenError::NoExpiry`]); by default `exp` is optional
    /// (`auth.require_exp`).
    pub fn require_exp(mut self, require: bool) -> Self {
        self.require_exp = require;
        self
    }

    /// Whether any key is configured (otherwise every token is refused).
    pub fn has_keys(&self) -> bool {
        self.hs256.is_some() || self.ed25519.is_some()
    }

    /// Verifies `token` at `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header = decode_json(h)?;
        // RFC 7515 §4.1.11: a recipient that does not understand every
        // extension listed in `crit` must reject the JWS. We understand
        // none, so any `crit` (even an empty or malformed one, itself
        // invalid) is refused, before the signature is looked at.
        if header.crit {
            return Err(TokenError::CriticalExtension);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| TokenError::BadEncoding)?;
        let signed = &token[..h.len() + 1 + p.len()];
        match (header.alg.as_str(), &self.hs256, &self.ed25519) {
            ("HS256", Some(secret), _) => {
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
                    .map_err(|_| TokenError::BadSignature)?;
                mac.update(signed.as_bytes());
                // Constant-time comparison.
                mac.verify_slice(&signature)
                    .map_err(|_| TokenError::BadSignature)?;
            }
            ("EdDSA", _, Some(key)) => {
                let sig = ed25519_dalek::Signature::from_slice(&signature)
                    .map_err(|_| TokenError::BadSignature)?;
                key.verify_strict(signed.as_bytes(), &sig)
                    .map_err(|_| TokenError::BadSignature)?;
            }
            (alg, _, _) => {
                return Err(TokenError::AlgorithmNotAllowed(
                    alg.chars().take(16).collect(),
                ))
            }
        }
        let claims = decode_claims(p)?;
        if self.require_exp && claims.exp.is_none() {
            return Err(TokenError::NoExpiry);
        }
        if let Some(exp) = claims.exp {
            if now > exp.saturating_add(self.leeway_secs) {
                return Err(TokenError::Expired);
            }
        }
        if let Some(nbf) = claims.nbf {
            if now.saturating_add(self.leeway_secs) < nbf {
                return Err(TokenError::NotYetValid);
            }
        }
        if let Some(iss) = &self.issuer {
            if claims.iss.as_deref() != Some(iss) {
                return Err(TokenError::WrongIssuer);
            }
        }
        if let Some(aud) = &self.audience {
            let ok = match &claims.aud {
                Audience::None => false,
                Audience::One(a) => a == aud,
                Audience::Many(list) => list.iter().any(|a| a == aud),
            };
            if !ok {
                return Err(TokenError::WrongAudience);
            }
        }
        if claims.sub.as_deref().is_none_or(str::is_empty) {
            return Err(TokenError::NoSubject);
        }
        Ok(claims)
    }
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::BadEncoding)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::BadEncoding)
}

/// The claims shardcast reads, each with the JSON it must be (`null`
/// counts as absent where the claim is optional): a claim of the wrong
/// type is refused naming it ([`TokenError::BadClaim`]), not as bad JSON.
const CLAIM_SHAPES: [(&str, &str, ClaimCheck); 7] = [
    ("sub", "a string", |v| v.is_string() || v.is_null()),
    (
        "exp",
        "a whole number of seconds since the Unix epoch",
        |v| v.is_u64() || v.is_null(),
    ),
    (
        "nbf",
        "a whole number of seconds since the Unix epoch",
        |v| v.is_u64() || v.is_null(),
    ),
    ("iss", "a string", |v| v.is_string() || v.is_null()),
    ("aud", "a string or an array of strings", |v| {
        v.is_string() || v.is_null() || strings(v)
    }),
    ("channels", "an array of strings", strings),
    ("publish", "an array of strings", |v| {
        v.is_null() || strings(v)
    }),
];

/// Whether a claim's JSON value has the type the claim needs.
type ClaimCheck = fn(&serde_json::Value) -> bool;

/// Whether `v` is a JSON array of strings.
fn strings(v: &serde_json::Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.iter().all(serde_json::Value::is_string))
}

/// The claims part. When it does not decode, the error names the claim
/// of the wrong type, if one is ([`CLAIM_SHAPES`]); what is accepted is
/// exactly what decodes as [`Claims`].
fn decode_claims(part: &str) -> Result<Claims, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::BadEncoding)?;
    serde_json::from_slice(&bytes).map_err(|_| {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(&bytes) else {
            return TokenError::BadEncoding;
        };
        CLAIM_SHAPES
            .iter()
            .find(|(claim, _, ok)| object.get(*claim).is_some_and(|v| !ok(v)))
            .map_or(TokenError::BadEncoding, |&(claim, expected, _)| {
                TokenError::BadClaim { claim, expected }
            })
    })
}

/// The DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410) is this fixed
/// 12-byte prefix followed by the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Accepts a PEM `PUBLIC KEY` (SubjectPublicKeyInfo for Ed25519), base64 of
/// the 32 raw bytes, or base64 of the 44-byte DER SubjectPublicKeyInfo (the
/// body of the PEM that `openssl pkey -pubout` writes, pasted without its
/// `-----BEGIN/END-----` lines). Whitespace inside the base64 is ignored.
fn parse_ed25519_key(text: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    use base64::engine::general_purpose::STANDARD;
    let text = text.trim();
    let pem = text.starts_with("-----BEGIN PUBLIC KEY-----");
    let body: String = text
        .lines()
        .filter(|l| !pem || !l.starts_with("-----"))
        .flat_map(|l| l.chars().filter(|c| !c.is_ascii_whitespace()))
        .collect();
    let der = STANDARD.decode(&body).map_err(|e| {
        if pem {
            format!("PEM body is not base64: {e}")
        } else {
            format!("expected a PEM PUBLIC KEY, or base64 of the 32 key bytes or of the 44-byte DER SubjectPublicKeyInfo: not base64 ({e})")
        }
    })?;
    let raw = match der.strip_prefix(&SPKI_PREFIX[..]) {
        Some(key) => key,
        None if pem => return Err("PEM is not an Ed25519 SubjectPublicKeyInfo".into()),
        None => &der[..],
    };
    let bytes: [u8; 32] = raw.try_into().map_err(|_| {
        format!(
            "key is {} bytes; expected the 32 key bytes, or 44 bytes of DER SubjectPublicKeyInfo (the prefix 302a300506032b6570032100, then the key)",
            der.len()
        )
    })?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|e| format!("invalid key: {e}"))
}

/// Builds a signed token; used by tests and by tools that mint tokens for
/// load tests.
pub mod mint {
    use super::*;

    fn encode(header: &str, claims: &serde_json::Value) -> String {
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    /// A compact HS256 JWS (`{"alg":"HS256","typ":"JWT"}`) of `claims`,
    /// signed with `secret` (any length).
    pub fn hs256(secret: &[u8], claims: &serde_json::Value) -> String {
        hs256_raw(
            secret,
            br#"{"alg":"HS256","typ":"JWT"}"#,
            claims.to_string().as_bytes(),
        )
    }

    /// An HS256 signature over whatever `header` and `claims` bytes are
    /// given (base64url-encoded here), valid JSON or not: for tests and
    /// fuzzing of the header and claims checks behind the signature.
    pub fn hs256_raw(secret: &[u8], header: &[u8], claims: &[u8]) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(signed.as_bytes());
        let sig = mac.finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// A compact EdDSA (Ed25519) JWS (`{"alg":"EdDSA","typ":"JWT"}`) of
    /// `claims`, signed with `key`.
    pub fn eddsa(key: &ed25519_dalek::SigningKey, claims: &serde_json::Value) -> String {
        use ed25519_dalek::Signer;
        let signed = encode(r#"{"alg":"EdDSA","typ":"JWT"}"#, claims);
        let sig = key.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    /// An unsigned `alg: none` token, for tests that it is refused.
    pub fn none(claims: &serde_json::Value) -> String {
        format!("{}.", encode(r#"{"alg":"none","typ":"JWT"}"#, claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;
    /// 41 bytes: HS256 keys must have at least 32 (RFC 7518 §3.2).
    const SECRET: &str = "jwt-unit-test-secret-of-at-least-32-bytes";

    fn signing_key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
    }

    fn verifier() -> Verifier {
        let public = STANDARD.encode(signing_key().verifying_key().to_bytes());
        Verifier::new(SECRET, &public, "", "", 5).unwrap()
    }

    #[test]
    fn accepts_hs256_and_eddsa() {
        let v = verifier();
        let c = json!({"sub": "u1", "exp": NOW + 60});
        assert_eq!(
            v.verify(&mint::hs256(SECRET.as_bytes(), &c), NOW)
                .unwrap()
                .sub
                .as_deref(),
            Some("u1")
        );
        assert_eq!(
            v.verify(&mint::eddsa(&signing_key(), &c), NOW)
                .unwrap()
                .sub
                .as_deref(),
            Some("u1")
        );
    }

    #[test]
    fn refuses_none_unknown_and_unconfigured_algorithms() {
        let c = json!({"sub": "u1"});
        let v = verifier();
        assert!(matches!(
            v.verify(&mint::none(&c), NOW),
            Err(TokenError::AlgorithmNotAllowed(_))
        ));
        let hs_only = Verifier::new(SECRET, "", "", "", 5).unwrap();
        assert!(matches!(
            hs_only.verify(&mint::eddsa(&signing_key(), &c), NOW),
            Err(TokenError::AlgorithmNotAllowed(_))
        ));
        let ed_only = Verifier::new(
            "",
            &STANDARD.encode(signing_key().verifying_key().to_bytes()),
            "",
            "",
            5,
        )
        .unwrap();
        assert!(matches!(
            ed_only.verify(&mint::hs256(SECRET.as_bytes(), &c), NOW),
            Err(TokenError::AlgorithmNotAllowed(_))
        ));
    }

    #[test]
    fn refuses_tampered_and_wrongly_signed_tokens() {
        let v = verifier();
        let good = mint::hs256(SECRET.as_bytes(), &json!({"sub": "u1"}));
        let other = mint::hs256(SECRET.as_bytes(), &json!({"sub": "admin"}));
        // Claims of one token with the signature of another.
        let (h, rest) = good.split_once('.').unwrap();
        let sig = rest.split_once('.').unwrap().1;
        let forged_claims = other.split('.').nth(1).unwrap();
        let forged = format!("{h}.{forged_claims}.{sig}");
        assert_eq!(v.verify(&forged, NOW), Err(TokenError::BadSignature));
        assert_eq!(
            v.verify(&mint::hs256(b"wrong", &json!({"sub": "u1"})), NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(v.verify("a.b", NOW), Err(TokenError::Malformed));
        assert_eq!(v.verify("!!.!!.!!", NOW), Err(TokenError::BadEncoding));
    }

    /// A token signed with the test HS256 secret whose JOSE header is
    /// `header` (JSON text).
    fn hs256_with_header(header: &str, claims: &serde_json::Value) -> String {
        mint::hs256_raw(
            SECRET.as_bytes(),
            header.as_bytes(),
            claims.to_string().as_bytes(),
        )
    }

    #[test]
    fn refuses_any_critical_extension() {
        let v = verifier();
        let c = json!({"sub": "u1"});
        assert!(
            v.verify(&hs256_with_header(r#"{"alg":"HS256"}"#, &c), NOW)
                .is_ok(),
            "the helper signs correctly"
        );
        for header in [
            r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
            r#"{"alg":"HS256","b64":false,"crit":["b64"]}"#,
            r#"{"alg":"HS256","crit":[]}"#,
            r#"{"alg":"HS256","crit":"b64"}"#,
            r#"{"alg":"HS256","crit":null}"#,
            r#"{"crit":["x"],"alg":"HS256"}"#,
        ] {
            assert_eq!(
                v.verify(&hs256_with_header(header, &c), NOW),
                Err(TokenError::CriticalExtension),
                "{header}"
            );
        }
        let eddsa = mint::eddsa(&signing_key(), &c);
        let (_, rest) = eddsa.split_once('.').unwrap();
        let crit = URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","crit":["x"],"x":1}"#);
        assert_eq!(
            v.verify(&format!("{crit}.{rest}"), NOW),
            Err(TokenError::CriticalExtension),
            "refused before the signature is looked at"
        );
    }

    #[test]
    fn time_claims_with_leeway() {
        let v = verifier();
        let t = |c| mint::hs256(SECRET.as_bytes(), &c);
        assert!(
            v.verify(&t(json!({"sub": "u", "exp": NOW - 3})), NOW)
                .is_ok(),
            "within leeway"
        );
        assert_eq!(
            v.verify(&t(json!({"sub": "u", "exp": NOW - 6})), NOW),
            Err(TokenError::Expired)
        );
        assert_eq!(
            v.verify(&t(json!({"sub": "u", "nbf": NOW + 6})), NOW),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn exp_is_optional_unless_required() {
        let t = |c| mint::hs256(SECRET.as_bytes(), &c);
        let no_exp = t(json!({"sub": "u"}));
        assert!(
            verifier().verify(&no_exp, NOW).is_ok(),
            "optional by default"
        );
        let strict = verifier().require_exp(true);
        assert_eq!(strict.verify(&no_exp, NOW), Err(TokenError::NoExpiry));
        assert_eq!(
            strict.verify(&t(json!({"sub": "u", "exp": null})), NOW),
            Err(TokenError::NoExpiry)
        );
        assert!(strict
            .verify(&t(json!({"sub": "u", "exp": NOW + 60})), NOW)
            .is_ok());
        assert_eq!(
            strict.verify(&t(json!({"sub": "u", "exp": NOW - 60})), NOW),
            Err(TokenError::Expired)
        );
        assert!(TokenError::NoExpiry.to_string().contains("(exp)"));
    }

    #[test]
    fn a_claim_of_the_wrong_type_is_named() {
        let v = verifier();
        let t = |c| mint::hs256(SECRET.as_bytes(), &c);
        for (claims, claim) in [
            (json!({"sub": "u", "channels": "private-a"}), "channels"),
            (json!({"sub": "u", "channels": ["a", 1]}), "channels"),
            (json!({"sub": "u", "channels": null}), "channels"),
            (json!({"sub": "u", "publish": "chat:*"}), "publish"),
            (json!({"sub": "u", "exp": "tomorrow"}), "exp"),
            (json!({"sub": "u", "nbf": 1.5}), "nbf"),
            (json!({"sub": 7}), "sub"),
            (json!({"sub": "u", "aud": 1}), "aud"),
        ] {
            let err = v.verify(&t(claims.clone()), NOW).unwrap_err();
            assert!(
                matches!(err, TokenError::BadClaim { claim: c, .. } if c == claim),
                "{claims}: {err:?}"
            );
        }
        let msg = v
            .verify(&t(json!({"sub": "u", "channels": "private-a"})), NOW)
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "token claim channels must be an array of strings");
        let msg = v
            .verify(&t(json!({"sub": "u", "publish": "chat:*"})), NOW)
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "token claim publish must be an array of strings");
        // What is not an object at all is still bad JSON; valid shapes pass.
        let not_object = mint::hs256_raw(SECRET.as_bytes(), br#"{"alg":"HS256"}"#, b"[1]");
        assert_eq!(v.verify(&not_object, NOW), Err(TokenError::BadEncoding));
        let ok = json!({"sub": "u", "channels": ["a"], "publish": null, "aud": null});
        assert!(v.verify(&t(ok), NOW).is_ok());
    }

    #[test]
    fn issuer_audience_and_subject() {
        let v = Verifier::new(SECRET, "", "https://app", "shardcast", 0).unwrap();
        let t = |c| mint::hs256(SECRET.as_bytes(), &c);
        assert!(v
            .verify(
                &t(json!({"sub": "u", "iss": "https://app", "aud": ["x", "shardcast"]})),
                NOW
            )
            .is_ok());
        assert_eq!(
            v.verify(
                &t(json!({"sub": "u", "iss": "evil", "aud": "shardcast"})),
                NOW
            ),
            Err(TokenError::WrongIssuer)
        );
        assert_eq!(
            v.verify(
                &t(json!({"sub": "u", "iss": "https://app", "aud": "x"})),
                NOW
            ),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            v.verify(&t(json!({"iss": "https://app", "aud": "shardcast"})), NOW),
            Err(TokenError::NoSubject)
        );
    }

    #[test]
    fn short_hs256_secrets_are_refused() {
        let short = &SECRET[..MIN_HS256_SECRET_BYTES - 1];
        assert!(matches!(
            Verifier::new(short, "", "", "", 5),
            Err(KeyError::Hs256TooShort(31))
        ));
        let msg = Verifier::new(short, "", "", "", 5)
            .err()
            .unwrap()
            .to_string();
        assert!(!msg.contains(short), "the secret leaked: {msg}");
        assert!(Verifier::new(&SECRET[..MIN_HS256_SECRET_BYTES], "", "", "", 5).is_ok());
        assert!(!Verifier::new("", "", "", "", 5).unwrap().has_keys());
    }

    #[test]
    fn pem_keys_parse() {
        let raw = signing_key().verifying_key().to_bytes();
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(&raw);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(der)
        );
        assert_eq!(parse_ed25519_key(&pem).unwrap().to_bytes(), raw);
        assert!(parse_ed25519_key("AAAA").is_err());
    }

    #[test]
    fn base64_of_the_spki_der_is_accepted() {
        let raw = signing_key().verifying_key().to_bytes();
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&raw);
        // The PEM body alone: what one pastes from `openssl pkey -pubout`.
        let body = STANDARD.encode(&der);
        assert_eq!(body.len(), 60);
        assert_eq!(parse_ed25519_key(&body).unwrap().to_bytes(), raw);
        assert_eq!(
            parse_ed25519_key(&format!(" {}\n{} ", &body[..30], &body[30..]))
                .unwrap()
                .to_bytes(),
            raw,
            "whitespace inside is ignored"
        );
        assert_eq!(
            parse_ed25519_key(&STANDARD.encode(raw)).unwrap().to_bytes(),
            raw
        );
        // 44 bytes with another prefix: the message says what is expected.
        let mut other = der.clone();
        other[0] = 0x31;
        let msg = parse_ed25519_key(&STANDARD.encode(&other)).unwrap_err();
        assert!(
            msg.contains("44 bytes") && msg.contains("302a300506032b6570032100"),
            "{msg}"
        );
        let msg = parse_ed25519_key("notakey").unwrap_err();
        assert!(msg.contains("not base64"), "{msg}");
    }
}
