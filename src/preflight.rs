//! What `serve` checks before it binds anything, in one place, so that
//! `check-config` refuses exactly what `serve` would refuse: every value in
//! range ([`Config::validate`], keys included), a Redis URL that parses,
//! and a compression dictionary that can be read and that zstd accepts.
//! Combinations that are valid but leave a server nobody can use come back
//! as warnings ([`Config::warnings`]).
//!
//! What only the running server can find out (a port already taken, a
//! Redis that does not answer, socket activation) is not checked here.

#![forbid(unsafe_code)]

use crate::config::Config;
use crate::protocol::compression::{Compressor, Decompressor, Dictionary};

/// What the checks produced: what `serve` goes on to use.
#[derive(Debug)]
pub struct Checked {
    /// The compression dictionary (`compression.dictionary`), read, with
    /// its id derived from its content.
    pub dictionary: Option<Dictionary>,
    /// Sentences about settings that are valid but leave the server (or a
    /// part of it) unusable; not fatal.
    pub warnings: Vec<String>,
}

/// Runs every check `serve` runs before binding. `Err` is a sentence for
/// the operator naming the config key at fault.
pub fn check(config: &Config) -> Result<Checked, String> {
    config.validate().map_err(|e| e.to_string())?;
    if !config.redis.url.is_empty() {
        crate::bus::redis::check_url(&config.redis.url).map_err(|e| {
            format!(
                "config key `redis.url` = {}: not a Redis URL: {e}",
                crate::config::redact_url(&config.redis.url)
            )
        })?;
    }
    let dictionary = load_dictionary(config)?;
    Ok(Checked {
        dictionary,
        warnings: config.warnings(),
    })
}

/// Reads `compression.dictionary` (if set) and makes sure zstd accepts it
/// for both directions, as every shard will.
fn load_dictionary(config: &Config) -> Result<Option<Dictionary>, String> {
    let path = &config.compression.dictionary;
    if path.is_empty() {
        return Ok(None);
    }
    let bytes = std::fs::read(path)
        .map_err(|e| format!("config key `compression.dictionary`: cannot read {path}: {e}"))?;
    if bytes.is_empty() {
        return Err(format!(
            "config key `compression.dictionary`: {path} is empty; train one with `shardcast zstd-train`"
        ));
    }
    let dictionary = Dictionary::new(bytes);
    let unusable = |e: std::io::Error| {
        format!("config key `compression.dictionary`: zstd refuses {path}: {e}")
    };
    Compressor::new(
        config.compression.level as i32,
        config.compression.min_bytes as usize,
        Some(&dictionary),
    )
    .map_err(unusable)?;
    Decompressor::new(
        config.websocket.max_message_bytes as usize,
        Some(&dictionary),
    )
    .map_err(unusable)?;
    Ok(Some(dictionary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Origin, Override};

    fn flag(key: &str, value: &str) -> Override {
        Override {
            key: key.into(),
            value: value.into(),
            origin: Origin::Flag(Config::flag_name(key)),
        }
    }

    fn config(overrides: &[Override]) -> Config {
        Config::load(None, overrides).unwrap()
    }

    #[test]
    fn a_missing_or_empty_dictionary_is_refused() {
        let err = check(&config(&[flag(
            "compression.dictionary",
            "/nonexistent/shardcast.dict",
        )]))
        .unwrap_err();
        assert!(
            err.contains("compression.dictionary") && err.contains("/nonexistent/shardcast.dict"),
            "{err}"
        );
        let empty = std::env::temp_dir().join(format!("shardcast-empty-{}", std::process::id()));
        std::fs::write(&empty, b"").unwrap();
        let err = check(&config(&[flag(
            "compression.dictionary",
            empty.to_str().unwrap(),
        )]))
        .unwrap_err();
        std::fs::remove_file(&empty).unwrap();
        assert!(err.contains("is empty"), "{err}");
    }

    #[test]
    fn the_dictionary_id_is_derived_from_the_file() {
        let path = std::env::temp_dir().join(format!("shardcast-dict-{}", std::process::id()));
        let samples: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("{{\"user\":{i},\"text\":\"hello number {i}\"}}").into_bytes())
            .collect();
        let bytes = crate::protocol::compression::train(&samples, 4096).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let checked = check(&config(&[flag(
            "compression.dictionary",
            path.to_str().unwrap(),
        )]))
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        let d = checked.dictionary.expect("a dictionary");
        assert_eq!(d.bytes, bytes);
        assert_eq!(
            d.id,
            crate::protocol::compression::dictionary_id(&bytes),
            "the id follows the content"
        );
    }

    #[test]
    fn a_redis_url_that_does_not_parse_is_refused_without_its_password() {
        let err = check(&config(&[flag(
            "redis.url",
            "redis://user:hunter2@localhost:notaport",
        )]))
        .unwrap_err();
        assert!(err.contains("redis.url"), "{err}");
        assert!(!err.contains("hunter2"), "the password leaked: {err}");
        assert!(check(&config(&[flag("redis.url", "redis://127.0.0.1:6379")])).is_ok());
    }

    #[test]
    fn a_server_nobody_can_use_is_warned_about() {
        let c = check(&config(&[flag("auth.anonymous", "false")])).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("auth.anonymous = false"));
        let with_key = check(&config(&[
            flag("auth.anonymous", "false"),
            flag("auth.hs256_secret", "a-secret-of-at-least-32-bytes-xxxx"),
        ]))
        .unwrap();
        assert!(with_key.warnings.is_empty(), "{:?}", with_key.warnings);
        assert!(check(&config(&[])).unwrap().warnings.is_empty());
        let issuer_only = check(&config(&[flag("auth.issuer", "https://id.example")])).unwrap();
        assert_eq!(issuer_only.warnings.len(), 1, "{:?}", issuer_only.warnings);
    }
}
