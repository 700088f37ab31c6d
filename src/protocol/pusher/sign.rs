//! Pusher's HMAC-SHA256 signatures, checked in constant time
//! (`Mac::verify_slice`):
//! - a private or presence subscription: `auth` is `"<app key>:<hex
//!   HMAC(secret, socket_id:channel[:channel_data])>"`;
//! - a user sign-in: the same over `socket_id::user::user_data`;
//! - an HTTP API request: `auth_signature` is the hex HMAC of
//!   `METHOD\nPATH\nQUERY`, QUERY being every other query parameter,
//!   lower-cased keys sorted, `key=value` joined by `&` (values decoded),
//!   with `auth_key`, `auth_timestamp` (Unix seconds, within
//!   [`MAX_TIMESTAMP_SKEW_SECS`] of now), `auth_version` `1.0` and, when
//!   there is a body, `body_md5` (hex MD5 of the body) among them.

#![forbid(unsafe_code)]

use hmac::{KeyInit, Mac};
use thiserror::Error;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// How far an API request's `auth_timestamp` may be from the server's
/// clock, in seconds (Pusher's HTTP API: 600).
pub const MAX_TIMESTAMP_SKEW_SECS: u64 = 600;

/// Why a subscription's or sign-in's `auth` was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    /// `auth` is not `key:signature`.
    #[error("auth is not of the form \"<app key>:<signature>\"")]
    Malformed,
    /// The key before the colon is not this app's key.
    #[error("auth was signed for another app key")]
    WrongKey,
    /// The signature does not match (wrong secret, or signed for another
    /// socket_id, channel or channel_data).
    #[error("invalid signature")]
    BadSignature,
}

/// Why an HTTP API request was refused (all answered 401).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ApiAuthError {
    /// A required query parameter is missing.
    #[error("missing query parameter {0}")]
    Missing(&'static str),
    /// `auth_key` names another app.
    #[error("auth_key does not belong to this app")]
    WrongKey,
    /// `auth_version` is not `1.0`.
    #[error("auth_version {0:?} is not supported (use 1.0)")]
    Version(String),
    /// `auth_timestamp` is not a number of seconds.
    #[error("auth_timestamp {0:?} is not a Unix time in seconds")]
    BadTimestamp(String),
    /// `auth_timestamp` is more than [`MAX_TIMESTAMP_SKEW_SECS`] away
    /// from the server's clock.
    #[error("auth_timestamp is {skew_secs} s away from the server's time; the limit is {MAX_TIMESTAMP_SKEW_SECS} s (check the clock)")]
    StaleTimestamp {
        /// How far off it was, in seconds.
        skew_secs: u64,
    },
    /// `body_md5` does not match the body.
    #[error("body_md5 does not match the request body")]
    BodyMd5,
    /// The signature does not match.
    #[error("invalid signature")]
    BadSignature,
}

/// The lower-case hex HMAC-SHA256 of `data` under `secret`.
pub fn hmac_hex(secret: &[u8], data: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

/// What a private or presence subscription signs:
/// `socket_id:channel[:channel_data]`.
pub fn channel_string_to_sign(
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    }
}

/// What a user sign-in signs: `socket_id::user::user_data`.
pub fn signin_string_to_sign(socket_id: &str, user_data: &str) -> String {
    format!("{socket_id}::user::{user_data}")
}

/// The `auth` value an app's backend gives a client for `signed`
/// (`"<key>:<hex signature>"`): for tests and tools.
pub fn auth_value(key: &str, secret: &[u8], signed: &str) -> String {
    format!("{key}:{}", hmac_hex(secret, signed.as_bytes()))
}

/// Checks `auth` (`"<key>:<hex signature>"`) over `signed` for the app
/// (`key`, `secret`).
pub fn verify_auth(key: &str, secret: &[u8], signed: &str, auth: &str) -> Result<(), AuthError> {
    let (given_key, signature) = auth.split_once(':').ok_or(AuthError::Malformed)?;
    if given_key != key {
        return Err(AuthError::WrongKey);
    }
    verify_hex(secret, signed.as_bytes(), signature).map_err(|()| AuthError::BadSignature)
}

/// Constant-time check of a hex signature.
fn verify_hex(secret: &[u8], data: &[u8], signature_hex: &str) -> Result<(), ()> {
    let signature = hex::decode(signature_hex).map_err(|_| ())?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(data);
    mac.verify_slice(&signature).map_err(|_| ())
}

/// An HTTP API request as far as its signature covers it.
pub struct ApiRequest<'a> {
    /// `GET` or `POST`.
    pub method: &'a str,
    /// The path, e.g. `/apps/1/events`, as sent.
    pub path: &'a str,
    /// The query string after `?`, as sent (percent-encoded).
    pub query: &'a str,
    /// The body (empty for `GET`).
    pub body: &'a [u8],
}

/// Checks an HTTP API request's signature for the app (`key`, `secret`)
/// at `now_secs` (Unix time, seconds). Order of checks: parameters
/// present, key, version, timestamp, body MD5, signature.
pub fn verify_api_request(
    request: &ApiRequest<'_>,
    key: &str,
    secret: &[u8],
    now_secs: u64,
) -> Result<(), ApiAuthError> {
    let mut params: Vec<(String, String)> = form_urlencoded::parse(request.query.as_bytes())
        .map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned()))
        .collect();
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let signature = get("auth_signature")
        .ok_or(ApiAuthError::Missing("auth_signature"))?
        .to_string();
    let given_key = get("auth_key").ok_or(ApiAuthError::Missing("auth_key"))?;
    let timestamp = get("auth_timestamp").ok_or(ApiAuthError::Missing("auth_timestamp"))?;
    let version = get("auth_version").ok_or(ApiAuthError::Missing("auth_version"))?;
    if given_key != key {
        return Err(ApiAuthError::WrongKey);
    }
    if version != "1.0" {
        return Err(ApiAuthError::Version(version.to_string()));
    }
    let at: u64 = timestamp
        .parse()
        .map_err(|_| ApiAuthError::BadTimestamp(timestamp.to_string()))?;
    let skew_secs = at.abs_diff(now_secs);
    if skew_secs > MAX_TIMESTAMP_SKEW_SECS {
        return Err(ApiAuthError::StaleTimestamp { skew_secs });
    }
    if !request.body.is_empty() {
        let md5 = get("body_md5").ok_or(ApiAuthError::Missing("body_md5"))?;
        let actual = format!("{:x}", md5::compute(request.body));
        if !md5.eq_ignore_ascii_case(&actual) {
            return Err(ApiAuthError::BodyMd5);
        }
    }
    params.retain(|(k, _)| k != "auth_signature");
    params.sort();
    let query = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let signed = format!("{}\n{}\n{query}", request.method, request.path);
    verify_hex(secret, signed.as_bytes(), &signature).map_err(|()| ApiAuthError::BadSignature)
}

/// Signs an HTTP API request the way the Pusher SDKs do; the query string
/// to send (parameters, then `auth_signature`). For tests and tools.
pub fn sign_api_request(
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: &[u8],
    key: &str,
    secret: &[u8],
    now_secs: u64,
) -> String {
    let mut all: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    all.push(("auth_key".into(), key.into()));
    all.push(("auth_timestamp".into(), now_secs.to_string()));
    all.push(("auth_version".into(), "1.0".into()));
    if !body.is_empty() {
        all.push(("body_md5".into(), format!("{:x}", md5::compute(body))));
    }
    all.sort();
    let query = all
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let signature = hmac_hex(secret, format!("{method}\n{path}\n{query}").as_bytes());
    let mut encoded = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &all {
        encoded.append_pair(k, v);
    }
    encoded.append_pair("auth_signature", &signature);
    encoded.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "app-key";
    const SECRET: &[u8] = b"app-secret";

    #[test]
    fn channel_auth_matches_the_documented_example() {
        // Pusher's documentation example: key 278d425bdf160c739803,
        // secret 7ad3773142a6692b25b8, socket 1234.1234, channel
        // private-foobar.
        let signed = channel_string_to_sign("1234.1234", "private-foobar", None);
        assert_eq!(
            auth_value("278d425bdf160c739803", b"7ad3773142a6692b25b8", &signed),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }

    #[test]
    fn channel_auth_is_checked_against_socket_channel_and_data() {
        let data = r#"{"user_id":"1"}"#;
        let signed = channel_string_to_sign("1.2", "presence-a", Some(data));
        let auth = auth_value(KEY, SECRET, &signed);
        assert_eq!(verify_auth(KEY, SECRET, &signed, &auth), Ok(()));
        for other in [
            channel_string_to_sign("1.3", "presence-a", Some(data)),
            channel_string_to_sign("1.2", "presence-b", Some(data)),
            channel_string_to_sign("1.2", "presence-a", Some(r#"{"user_id":"2"}"#)),
            channel_string_to_sign("1.2", "presence-a", None),
        ] {
            assert_eq!(
                verify_auth(KEY, SECRET, &other, &auth),
                Err(AuthError::BadSignature)
            );
        }
        assert_eq!(
            verify_auth(KEY, b"other-secret", &signed, &auth),
            Err(AuthError::BadSignature)
        );
        let other_key = auth_value("other", SECRET, &signed);
        assert_eq!(
            verify_auth(KEY, SECRET, &signed, &other_key),
            Err(AuthError::WrongKey)
        );
        for bad in ["", "nocolon", "app-key:zz", "app-key:abcd"] {
            assert!(verify_auth(KEY, SECRET, &signed, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signin_signs_socket_and_user_data() {
        let signed = signin_string_to_sign("1.2", r#"{"id":"7"}"#);
        assert_eq!(signed, r#"1.2::user::{"id":"7"}"#);
    }

    fn request<'a>(
        method: &'a str,
        path: &'a str,
        query: &'a str,
        body: &'a [u8],
    ) -> ApiRequest<'a> {
        ApiRequest {
            method,
            path,
            query,
            body,
        }
    }

    #[test]
    fn api_requests_signed_like_the_sdks_pass() {
        let body = br#"{"name":"ev","channel":"c","data":"{}"}"#;
        let q = sign_api_request("POST", "/apps/1/events", &[], body, KEY, SECRET, 1_000);
        let r = request("POST", "/apps/1/events", &q, body);
        assert_eq!(verify_api_request(&r, KEY, SECRET, 1_000), Ok(()));
        // Within the skew either way.
        assert_eq!(verify_api_request(&r, KEY, SECRET, 1_600), Ok(()));
        let q = sign_api_request(
            "GET",
            "/apps/1/channels",
            &[
                ("info", "user_count,subscription_count"),
                ("filter_by_prefix", "presence-"),
            ],
            b"",
            KEY,
            SECRET,
            5_000,
        );
        // The comma is sent encoded; the signature covers the decoded value.
        assert!(q.contains("info=user_count%2Csubscription_count"), "{q}");
        let r = request("GET", "/apps/1/channels", &q, b"");
        assert_eq!(verify_api_request(&r, KEY, SECRET, 4_500), Ok(()));
    }

    #[test]
    fn api_requests_are_refused_with_the_reason() {
        let body = br#"{"name":"ev","channel":"c","data":"{}"}"#;
        let q = sign_api_request("POST", "/apps/1/events", &[], body, KEY, SECRET, 1_000);
        let check = |method, path, query: &str, body: &[u8], now| {
            verify_api_request(&request(method, path, query, body), KEY, SECRET, now)
        };
        assert_eq!(
            check("POST", "/apps/1/events", &q, body, 1_601),
            Err(ApiAuthError::StaleTimestamp { skew_secs: 601 })
        );
        assert_eq!(
            check("POST", "/apps/1/events", &q, b"{}", 1_000),
            Err(ApiAuthError::BodyMd5)
        );
        assert_eq!(
            check("POST", "/apps/2/events", &q, body, 1_000),
            Err(ApiAuthError::BadSignature)
        );
        assert_eq!(
            check("GET", "/apps/1/events", &q, body, 1_000),
            Err(ApiAuthError::BadSignature)
        );
        let wrong_secret =
            sign_api_request("POST", "/apps/1/events", &[], body, KEY, b"nope", 1_000);
        assert_eq!(
            check("POST", "/apps/1/events", &wrong_secret, body, 1_000),
            Err(ApiAuthError::BadSignature)
        );
        let other_key = sign_api_request("POST", "/apps/1/events", &[], body, "k2", SECRET, 1_000);
        assert_eq!(
            check("POST", "/apps/1/events", &other_key, body, 1_000),
            Err(ApiAuthError::WrongKey)
        );
        assert_eq!(
            check("POST", "/apps/1/events", "auth_key=app-key", body, 1_000),
            Err(ApiAuthError::Missing("auth_signature"))
        );
        let v2 = q.replace("auth_version=1.0", "auth_version=2.0");
        assert_eq!(
            check("POST", "/apps/1/events", &v2, body, 1_000),
            Err(ApiAuthError::Version("2.0".into()))
        );
        let no_md5: String = q
            .split('&')
            .filter(|p| !p.starts_with("body_md5="))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(
            check("POST", "/apps/1/events", &no_md5, body, 1_000),
            Err(ApiAuthError::Missing("body_md5"))
        );
    }
}
