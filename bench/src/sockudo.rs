//! The Sockudo peer: `sockudo --config <generated JSON>` on a free
//! loopback port with everything in process (local adapter, memory cache
//! and app manager, no queue, no Redis), rate limiters and metrics off, one
//! app whose credentials are [`crate::pusher`]'s constants, and
//! `TOKIO_WORKER_THREADS` set to the bench's thread count. The environment
//! is cleared so none of Sockudo's many environment overrides (PORT,
//! ADAPTER_DRIVER, …) leaks in. The clients are the Pusher ones of
//! `pusher.rs`, shared with the `shardcast-pusher` target.

use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pusher::{APP_ID, APP_KEY, APP_SECRET};

/// What `compare` says when `sockudo` is not on PATH.
pub const INSTALL_HINT: &str = "sockudo not installed: `apt-get install protobuf-compiler && cargo install sockudo --locked` (a long build), then make sure `sockudo` is on PATH";

/// Sockudo's configuration for a bench run (JSON; Sockudo 5 reads JSON or
/// TOML by file extension, every section defaulted when absent).
pub fn server_config(port: u16) -> String {
    let cfg = serde_json::json!({
        "debug": false,
        "host": "127.0.0.1",
        "port": port,
        "mode": "production",
        "max_connections": 0,
        "adapter": { "driver": "local" },
        "cache": { "driver": "memory" },
        "queue": { "driver": "none" },
        "app_manager": {
            "driver": "memory",
            "array": { "apps": [{
                "id": APP_ID,
                "key": APP_KEY,
                "secret": APP_SECRET,
                "enabled": true,
                "policy": {
                    "limits": { "max_connections": 0, "max_client_events_per_second": 0 },
                    "features": { "enable_client_messages": false }
                }
            }]}
        },
        // Defaults are 100 API requests and 20 WebSocket connects per
        // minute per IP: a bench would measure the limiter.
        "rate_limiter": { "enabled": false },
        "metrics": { "enabled": false },
    });
    serde_json::to_string_pretty(&cfg).expect("serialisable")
}

/// Starts `bin` with a generated config in `dir` on a free loopback port
/// and waits until the port accepts. Returns the child, the address and a
/// banner. Server output goes to `dir/sockudo.log` (quoted on failure).
pub fn spawn_server(
    bin: &Path,
    dir: &Path,
    threads: u32,
) -> Result<(Child, SocketAddr, String), String> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?.port()
    };
    let conf = dir.join("sockudo.json");
    std::fs::write(&conf, server_config(port)).map_err(|e| format!("{}: {e}", conf.display()))?;
    let log_path = dir.join("sockudo.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let version = Command::new(bin)
        .arg("--version")
        .env_clear()
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&conf)
        // Sockudo also loads config/config.{toml,json} from its working
        // directory; the run's own directory has none.
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TOKIO_WORKER_THREADS", threads.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let t0 = Instant::now();
    loop {
        if StdTcpStream::connect(addr).is_ok() {
            break;
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "sockudo did not open {addr} ({}); its last output:\n{}",
                match exited {
                    Some(s) => format!("exited: {s}"),
                    None => "timed out".into(),
                },
                tail.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let version = if version.is_empty() {
        "sockudo".to_owned()
    } else {
        version
    };
    Ok((
        child,
        addr,
        format!("{version} pusher-v7 on {addr} TOKIO_WORKER_THREADS={threads}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pusher::WS_PATH;

    #[test]
    fn config_is_in_process_and_unthrottled() {
        let v: serde_json::Value = serde_json::from_str(&server_config(4321)).unwrap();
        assert_eq!(v["port"], 4321);
        assert_eq!(v["host"], "127.0.0.1");
        assert_eq!(v["adapter"]["driver"], "local");
        assert_eq!(v["queue"]["driver"], "none");
        assert_eq!(v["rate_limiter"]["enabled"], false);
        let app = &v["app_manager"]["array"]["apps"][0];
        assert_eq!(
            (app["id"].as_str(), app["key"].as_str()),
            (Some(APP_ID), Some(APP_KEY))
        );
        assert!(WS_PATH.starts_with(&format!("/app/{APP_KEY}?protocol=7")));
    }
}
