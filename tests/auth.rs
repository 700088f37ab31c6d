//! Connect tokens (JWT) and channel authorisation against the real binary.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{try_connect, RawClient, Server};
use serde_json::json;
use shardcast::auth::jwt::mint;
use shardcast::protocol::wire::{ErrorCode, ServerMessage};

const SECRET: &[u8] = b"auth-test-secret-of-at-least-32-bytes";

fn ed_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[42u8; 32])
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn server(extra: &[&str]) -> Server {
    let public =
        base64::engine::general_purpose::STANDARD.encode(ed_key().verifying_key().to_bytes());
    let secret = String::from_utf8(SECRET.to_vec()).unwrap();
    let mut args = vec![
        "--auth-anonymous",
        "false",
        "--auth-hs256-secret",
        &secret,
        "--auth-ed25519-public-key",
        &public,
        "--auth-leeway-secs",
        "0",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[tokio::test]
async fn valid_tokens_of_both_algorithms_connect() {
    let s = server(&[]);
    let claims = json!({"sub": "alice", "exp": now() + 60});
    assert!(try_connect(s.addr, Some(&mint::hs256(SECRET, &claims)))
        .await
        .is_ok());
    assert!(try_connect(s.addr, Some(&mint::eddsa(&ed_key(), &claims)))
        .await
        .is_ok());
}

#[tokio::test]
async fn bad_tokens_are_refused_with_4004() {
    let s = server(&[]);
    let good = json!({"sub": "alice", "exp": now() + 60});
    let public_bytes = ed_key().verifying_key().to_bytes();
    let tampered = {
        let t = mint::hs256(SECRET, &good);
        let other = mint::hs256(SECRET, &json!({"sub": "root", "exp": now() + 60}));
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[1] = other.split('.').nth(1).unwrap();
        let sig = t.split('.').nth(2).unwrap();
        format!("{}.{}.{}", parts[0], parts[1], sig)
    };
    let cases = [
        (
            "expired",
            mint::hs256(SECRET, &json!({"sub": "alice", "exp": now() - 10})),
        ),
        ("alg=none", mint::none(&good)),
        // Algorithm confusion: an HMAC keyed with the Ed25519 public key.
        ("wrong algorithm", mint::hs256(&public_bytes, &good)),
        ("wrong secret", mint::hs256(b"guess", &good)),
        ("tampered", tampered),
        ("garbage", "not.a.jwt".to_string()),
    ];
    for (what, token) in cases {
        let (code, reason) = match try_connect(s.addr, Some(&token)).await {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e,
        };
        assert_eq!(code, 4004, "{what}: {reason}");
        assert!(reason.starts_with("connect refused"), "{what}: {reason}");
    }
    // No token at all, with anonymous access off.
    assert_eq!(
        try_connect(s.addr, None).await.err().map(|e| e.0),
        Some(4004)
    );
}

#[tokio::test]
async fn channel_permissions_follow_the_token() {
    let s = server(&[]);
    let token = mint::hs256(
        SECRET,
        &json!({"sub": "bob", "exp": now() + 60, "channels": ["private-team-*"]}),
    );
    let mut c = try_connect(s.addr, Some(&token)).await.unwrap();
    c.subscribe("private-team-red").await;
    c.subscribe("user:bob").await;
    c.subscribe("news").await;
    for denied in ["private-other", "user:alice", "presence-x"] {
        let id = c.request(|e, id| e.subscribe(id, denied, None)).await;
        match c.reply(id).await {
            ServerMessage::Error { code, .. } => {
                assert_eq!(code, ErrorCode::Unauthorized.as_u16(), "{denied}")
            }
            other => panic!("{denied}: expected Unauthorized, got {other:?}"),
        }
    }
    // Publishing to someone else's user channel is refused too.
    let id = c
        .request(|e, id| e.publish(id, "user:alice", b"hi", None))
        .await;
    assert!(
        matches!(c.reply(id).await, ServerMessage::Error { code, .. } if code == ErrorCode::Unauthorized.as_u16())
    );
}

/// Identity providers issue ids like `auth0|5f2b9c0e`: every `sub` accepted
/// at Connect has a working personal channel, `user:` + the id
/// percent-encoded, for subscribe, publish and recovery.
#[tokio::test]
async fn an_identity_provider_id_has_a_personal_channel() {
    let s = server(&[]);
    let sub = "auth0|5f2b9c0e";
    let personal = shardcast::protocol::channel::personal(sub).unwrap();
    assert_eq!(personal, "user:auth0%7C5f2b9c0e");
    let token = mint::hs256(SECRET, &json!({"sub": sub, "exp": now() + 60}));
    let mut user = try_connect(s.addr, Some(&token)).await.unwrap();
    let at = user.subscribe(&personal).await;
    // A backend token that may publish to every personal channel.
    let backend = mint::hs256(
        SECRET,
        &json!({"sub": "backend", "exp": now() + 60, "publish": ["user:*"]}),
    );
    let mut backend = try_connect(s.addr, Some(&backend)).await.unwrap();
    let first = backend.publish(&personal, b"one").await;
    assert_eq!(user.publication().await.3, b"one");
    drop(user);
    backend.publish(&personal, b"two").await;
    let mut user = try_connect(s.addr, Some(&token)).await.unwrap();
    let (_, recovered) = user.subscribe_from(&personal, Some(first)).await;
    assert!(recovered);
    assert_eq!(user.publication().await.3, b"two");
    assert!(first.offset > at.offset);
    // The raw id is not a channel name; nobody else gets the channel.
    let other = mint::hs256(SECRET, &json!({"sub": "auth0|other", "exp": now() + 60}));
    let mut other = try_connect(s.addr, Some(&other)).await.unwrap();
    let id = other
        .request(|e, id| e.subscribe(id, &personal, None))
        .await;
    assert!(
        matches!(other.reply(id).await, ServerMessage::Error { code, .. } if code == ErrorCode::Unauthorized.as_u16())
    );
    // An id whose personal channel cannot exist is refused at Connect.
    let long = mint::hs256(SECRET, &json!({"sub": "|".repeat(80), "exp": now() + 60}));
    let (code, reason) = try_connect(s.addr, Some(&long)).await.err().unwrap();
    assert_eq!(code, 4004, "{reason}");
    assert!(reason.contains("personal channel"), "{reason}");
}

#[tokio::test]
async fn expiring_token_closes_unless_refreshed() {
    let s = server(&[]);
    let short =
        |sub: &str, secs: u64| mint::hs256(SECRET, &json!({"sub": sub, "exp": now() + secs}));
    let mut stale = try_connect(s.addr, Some(&short("carol", 2))).await.unwrap();
    let mut fresh = try_connect(s.addr, Some(&short("dave", 2))).await.unwrap();
    // dave refreshes before expiry; carol does not.
    let token = short("dave", 60);
    let id = fresh.request(|e, id| e.connect(id, Some(&token))).await;
    assert!(matches!(
        fresh.reply(id).await,
        ServerMessage::Connected { .. }
    ));
    let (code, reason) = stale
        .next_or_close()
        .await
        .expect_err("carol must be closed");
    assert_eq!(code, 4003, "{reason}");
    // dave is still served after carol's (and his old token's) expiry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fresh.subscribe("still-here").await;
    // A refresh for another user is refused.
    let other = short("mallory", 60);
    let id = fresh.request(|e, id| e.connect(id, Some(&other))).await;
    assert!(matches!(fresh.reply(id).await, ServerMessage::Error { .. }));
}

#[tokio::test]
async fn connect_deadline_closes_silent_clients() {
    let s = server(&["--auth-deadline-ms", "300"]);
    let mut raw = RawClient::upgrade(s.addr);
    let (code, reason) = raw.expect_close();
    assert_eq!(code, 4005, "{reason}");
    let token = mint::hs256(SECRET, &json!({"sub": "eve", "exp": now() + 60}));
    assert!(try_connect(s.addr, Some(&token)).await.is_ok());
}

#[tokio::test]
async fn anonymous_access_when_allowed() {
    let s = Server::start(&["--auth-anonymous-publish", "false"]);
    let mut c = try_connect(s.addr, None).await.unwrap();
    c.subscribe("public").await;
    let id = c.request(|e, id| e.subscribe(id, "private-x", None)).await;
    assert!(
        matches!(c.reply(id).await, ServerMessage::Error { code, .. } if code == ErrorCode::Unauthorized.as_u16())
    );
    let id = c.request(|e, id| e.publish(id, "public", b"x", None)).await;
    assert!(
        matches!(c.reply(id).await, ServerMessage::Error { code, .. } if code == ErrorCode::Unauthorized.as_u16())
    );
}
