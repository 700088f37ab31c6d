//! The real Pusher SDKs against the real binary: drivers in `tests/sdk/`
//! (installed by `scripts/test.sh`: `npm ci --prefix tests/sdk` and a venv
//! with the PyPI `pusher` package in `tests/sdk/.venv`).
//!
//! - [`SdkClient`]: one pusher-js 8 connection (optionally through Laravel
//!   Echo 2) in a `node tests/sdk/client.js` process, scripted with JSON
//!   lines; see the top of `client.js` for the commands and output lines.
//! - [`trigger`]: one HTTP API call through pusher-http-node 5
//!   (`tests/sdk/trigger.js`); [`trigger_py`]: the same through the PyPI
//!   `pusher` SDK (`tests/sdk/trigger.py`).
//!
//! ```ignore
//! let s = Server::start(&sdk::pusher_args(&[]));
//! let mut c = SdkClient::spawn();
//! let socket_id = c.connect(s.addr.port());
//! c.subscribe("orders");
//! let r = sdk::trigger(&sdk::api(s.addr.port(), json!({
//!     "op": "trigger", "channels": ["orders"], "event": "shipped", "data": {"id": 1}})));
//! assert_eq!(r["status"], 200);
//! c.next_matching(sdk::has(json!({"type": "event", "event": "shipped"})), WAIT);
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::WAIT;

/// The app the SDK tests configure (`pusher_args`).
pub const APP_ID: &str = "1";
pub const APP_KEY: &str = "app-key";
pub const APP_SECRET: &str = "app-secret";

/// `serve` arguments for the test app, then `extra`.
pub fn pusher_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--pusher-app-id",
        APP_ID,
        "--pusher-app-key",
        APP_KEY,
        "--pusher-app-secret",
        APP_SECRET,
    ];
    args.extend_from_slice(extra);
    args
}

/// `tests/sdk/`.
pub fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

fn require(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{} is missing ({what}): run scripts/test.sh once, which installs it",
        path.display()
    );
}

fn require_node_modules() {
    require(
        &sdk_dir().join("node_modules/pusher-js"),
        "npm ci --prefix tests/sdk",
    );
}

/// Whether `line` has every field of `pattern` with an equal value,
/// recursively for objects (other fields are ignored).
pub fn contains(line: &Value, pattern: &Value) -> bool {
    match (line, pattern) {
        (Value::Object(l), Value::Object(p)) => p
            .iter()
            .all(|(k, pv)| l.get(k).is_some_and(|lv| contains(lv, pv))),
        _ => line == pattern,
    }
}

/// A predicate for [`SdkClient::next_matching`]: the line contains
/// `pattern` (see [`contains`]).
pub fn has(pattern: Value) -> impl Fn(&Value) -> bool {
    move |line| contains(line, &pattern)
}

/// `extra`'s fields over `base`'s (both objects).
pub fn merged(base: &Value, extra: Value) -> Value {
    let mut out = base.clone();
    if let (Value::Object(o), Value::Object(e)) = (&mut out, extra) {
        o.extend(e);
    }
    out
}

/// The connection fields of the test app on `port`, merged with `op`'s:
/// the argument of [`trigger`] and [`trigger_py`].
pub fn api(port: u16, op: Value) -> Value {
    merged(
        &json!({"port": port, "appId": APP_ID, "key": APP_KEY, "secret": APP_SECRET}),
        op,
    )
}

/// A pusher-js client in its own `node` process, killed on drop. Output
/// lines are read on a thread into a channel; lines skipped by one
/// [`next_matching`](Self::next_matching) stay queued for the next.
pub struct SdkClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    backlog: VecDeque<Value>,
    /// Every line received so far, in order (for failure messages).
    pub seen: Vec<Value>,
    /// The first line: `{"type":"ready", "pusher_js", "laravel_echo",
    /// "pusher_http_node", "node"}`.
    pub ready: Value,
}

impl SdkClient {
    /// Starts `node tests/sdk/client.js` and waits for its `ready` line.
    pub fn spawn() -> SdkClient {
        require_node_modules();
        let dir = sdk_dir();
        let mut child = Command::new("node")
            .arg(dir.join("client.js"))
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node tests/sdk/client.js (is Node.js installed?)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"type": "unparsed", "line": line}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut c = SdkClient {
            child,
            stdin,
            lines: rx,
            backlog: VecDeque::new(),
            seen: Vec::new(),
            ready: Value::Null,
        };
        c.ready = c.next_matching(has(json!({"type": "ready"})), WAIT);
        c
    }

    /// Sends one command line.
    pub fn send(&mut self, cmd: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("client.js stopped reading ({e}); lines: {:#?}", self.seen));
    }

    /// The first line (queued or arriving within `timeout`) for which `pred`
    /// holds, or `None`; lines passed over stay queued, in order.
    pub fn try_next_matching(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<Value> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                    self.backlog.push_back(line);
                }
                // Disconnected: the process ended, nothing more will come.
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Like [`try_next_matching`](Self::try_next_matching), panicking with
    /// every line seen when nothing matches within `timeout` (use
    /// [`WAIT`](super::WAIT) unless the test means a shorter bound).
    pub fn next_matching(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        match self.try_next_matching(pred, timeout) {
            Some(line) => line,
            None => panic!(
                "no matching line from client.js within {timeout:?}; lines seen: {:#?}",
                self.seen
            ),
        }
    }

    /// Asserts that no line matching `pred` arrives within `within` (and
    /// none is queued).
    pub fn expect_none(&mut self, pred: impl Fn(&Value) -> bool, within: Duration) {
        if let Some(line) = self.try_next_matching(&pred, within) {
            panic!("unexpected line {line}; lines seen: {:#?}", self.seen);
        }
    }

    /// Connects to the test app on `port` (key and secret of [`APP_KEY`],
    /// [`APP_SECRET`]) and waits for `connected`; the socket id.
    pub fn connect(&mut self, port: u16) -> String {
        self.connect_with(json!({"port": port, "key": APP_KEY, "secret": APP_SECRET}))
    }

    /// Sends `connect` with these fields (`port`, `key`, `secret`, ...) and
    /// waits for `connected`; the socket id.
    pub fn connect_with(&mut self, fields: Value) -> String {
        self.send(&merged(&json!({"op": "connect"}), fields));
        let line = self.next_matching(has(json!({"type": "state", "current": "connected"})), WAIT);
        line["socket_id"]
            .as_str()
            .unwrap_or_else(|| panic!("connected without a socket_id: {line}"))
            .to_string()
    }

    /// Subscribes (`extra`: `user`, `auth`, ... as client.js takes them) and
    /// waits for the outcome: the `subscribed` or `subscription_error` line.
    pub fn subscribe_with(&mut self, channel: &str, extra: Value) -> Value {
        self.send(&merged(
            &json!({"op": "subscribe", "channel": channel}),
            extra,
        ));
        self.next_matching(
            |l| {
                l["channel"] == channel
                    && (l["type"] == "subscribed" || l["type"] == "subscription_error")
            },
            WAIT,
        )
    }

    /// Subscribes and asserts success; the `subscribed` line.
    pub fn subscribe(&mut self, channel: &str) -> Value {
        let line = self.subscribe_with(channel, json!({}));
        assert_eq!(line["type"], "subscribed", "subscribe {channel}: {line}");
        line
    }

    /// Joins a presence channel as `user_id` with `user_info`; the
    /// `subscribed` line (members, me, count).
    pub fn join(&mut self, channel: &str, user_id: Value, user_info: Value) -> Value {
        let line = self.subscribe_with(
            channel,
            json!({"user": {"user_id": user_id, "user_info": user_info}}),
        );
        assert_eq!(line["type"], "subscribed", "join {channel}: {line}");
        line
    }

    /// The next `event` line for `event` on `channel`.
    pub fn event(&mut self, channel: &str, event: &str) -> Value {
        self.next_matching(
            has(json!({"type": "event", "channel": channel, "event": event})),
            WAIT,
        )
    }

    /// The next `event` line on `channel`, whatever its event (presence
    /// events included): with events published in order per channel, a
    /// test triggers a marker event and asserts it is the next one, so
    /// nothing unwanted came before it.
    pub fn next_event_on(&mut self, channel: &str) -> Value {
        self.next_matching(has(json!({"type": "event", "channel": channel})), WAIT)
    }

    /// The names of the next `n` events on `channel`, in order.
    pub fn next_events_on(&mut self, channel: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                self.next_event_on(channel)["event"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }

    /// A `pusher:ping` on the SDK's socket, waiting for the `pusher:pong`:
    /// the server has handled everything this connection sent before
    /// (Pusher acknowledges neither unsubscribes nor client events).
    pub fn round_trip(&mut self) {
        self.send(&json!({"op": "send_raw", "data": r#"{"event":"pusher:ping","data":{}}"#}));
        self.next_matching(has(json!({"type": "pong"})), WAIT);
    }

    /// The socket's next `closed` line (its close code and reason).
    pub fn closed(&mut self) -> Value {
        self.next_matching(has(json!({"type": "closed"})), WAIT)
    }

    /// Asserts that the socket was never closed and pusher-js never left
    /// `connected` since it connected (the lines seen so far).
    pub fn assert_stayed_connected(&self) {
        let left = self.seen.iter().find(|l| {
            l["type"] == "closed" || (l["type"] == "state" && l["previous"] == "connected")
        });
        if let Some(line) = left {
            panic!(
                "the connection did not stay: {line}; lines seen: {:#?}",
                self.seen
            );
        }
    }
}

/// Whether `s` is a Pusher `socket_id`: `\d+\.\d+`.
pub fn is_socket_id(s: &str) -> bool {
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    s.split_once('.')
        .is_some_and(|(a, b)| digits(a) && digits(b))
}

/// [`trigger`] (pusher-http-node) for the test app on `port`, asserting
/// `200 {}`.
pub fn trigger_ok(port: u16, op: Value) {
    let r = trigger(&api(port, op.clone()));
    assert_eq!(r["status"], 200, "pusher-http-node {op}: {r}");
    assert_eq!(r["body"], json!({}), "pusher-http-node {op}: {r}");
}

/// [`trigger_py`] (PyPI pusher) for the test app on `port`, asserting 200.
pub fn trigger_py_ok(port: u16, op: Value) {
    let r = trigger_py(&api(port, op.clone()));
    assert_eq!(r["ok"], true, "PyPI pusher {op}: {r}");
    assert_eq!(r["status"], 200, "PyPI pusher {op}: {r}");
}

impl Drop for SdkClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a one-shot script and parses its one JSON line, within `WAIT`.
fn run_one_shot(mut cmd: Command, what: &str) -> Value {
    let mut child = cmd
        .current_dir(sdk_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = reader.join().expect("reader thread");
    let line = text.lines().rev().find(|l| !l.trim().is_empty());
    match line.map(serde_json::from_str::<Value>) {
        Some(Ok(v)) => v,
        _ => panic!("{what} exited {status} without a JSON line; stdout: {text:?}"),
    }
}

/// One HTTP API call through pusher-http-node (`tests/sdk/trigger.js`):
/// `{"ok", "status", "body", ...}`. See [`api`] for the connection fields.
pub fn trigger(cmd: &Value) -> Value {
    require_node_modules();
    let mut c = Command::new("node");
    c.arg(sdk_dir().join("trigger.js")).arg(cmd.to_string());
    run_one_shot(c, "node tests/sdk/trigger.js")
}

/// One HTTP API call through the PyPI `pusher` SDK (`tests/sdk/trigger.py`
/// in `tests/sdk/.venv`): `{"ok", "status", "body", ...}`.
pub fn trigger_py(cmd: &Value) -> Value {
    let python = sdk_dir().join(".venv/bin/python");
    require(&python, "a venv with the PyPI pusher package");
    let mut c = Command::new(python);
    c.arg(sdk_dir().join("trigger.py")).arg(cmd.to_string());
    run_one_shot(c, "tests/sdk/trigger.py")
}
