//! The admin endpoint: health, readiness and Prometheus metrics that match
//! what the test did.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{http_get, Client, RedisServer, Server};

/// Parses Prometheus text format strictly enough to catch malformed
/// output: every sample belongs to a declared metric family, labels are
/// well-formed, values are numbers. Returns (name, labels) → value.
fn parse_prometheus(text: &str) -> HashMap<(String, String), f64> {
    let mut declared: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            declared.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect("closing brace");
                for pair in l.split(',') {
                    let (k, v) = pair.split_once('=').expect("label k=v");
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                }
                (n, l.to_string())
            }
            None => (series, String::new()),
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| declared.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(
            declared.contains_key(family),
            "sample before its TYPE: {line}"
        );
        samples.insert((name.to_string(), labels), value);
    }
    samples
}

fn total(m: &HashMap<(String, String), f64>, name: &str) -> f64 {
    m.iter()
        .filter(|((n, _), _)| n == name)
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn health_readiness_and_metrics_match_activity() {
    let s = Server::start(&[]);
    let admin = s.admin.expect("admin endpoint");
    assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(admin, "/readyz"), (200, "ready\n".into()));
    assert_eq!(http_get(admin, "/nope").0, 404);

    // 3 connections; 1 subscribe; 5 publishes → 9 requests in, 5 out.
    let mut sub = Client::connect(s.addr).await;
    sub.subscribe("metrics-test").await;
    let mut publisher = Client::connect(s.addr).await;
    let _idle = Client::connect(s.addr).await;
    for i in 0..5u8 {
        publisher.publish("metrics-test", &[i]).await;
    }
    for _ in 0..5 {
        sub.publication().await;
    }

    let deadline = Instant::now() + common::WAIT;
    let m = loop {
        let (status, body) = http_get(admin, "/metrics");
        assert_eq!(status, 200);
        let m = parse_prometheus(&body);
        if total(&m, "shardcast_messages_out_total") == 5.0
            && total(&m, "shardcast_messages_in_total") == 9.0
        {
            break m;
        }
        assert!(Instant::now() < deadline, "metrics never matched:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(total(&m, "shardcast_connections"), 3.0);
    assert_eq!(total(&m, "shardcast_subscriptions"), 1.0);
    assert_eq!(total(&m, "shardcast_channels"), 1.0);
    assert_eq!(total(&m, "shardcast_connections_accepted_total"), 3.0);
    assert!(total(&m, "shardcast_bytes_in_total") > 0.0);
    assert!(total(&m, "shardcast_bytes_out_total") > 0.0);
    assert_eq!(total(&m, "shardcast_slow_consumer_closes_total"), 0.0);
    assert_eq!(total(&m, "shardcast_publish_to_write_seconds_count"), 5.0);
    assert_eq!(total(&m, "shardcast_ingress_to_write_seconds_count"), 5.0);
    let inf = m[&(
        "shardcast_publish_to_write_seconds_bucket".to_string(),
        "le=\"+Inf\"".to_string(),
    )];
    assert_eq!(inf, 5.0);
    assert_eq!(total(&m, "shardcast_ready"), 1.0);
}

/// One slow or stalled client cannot hold up the admin endpoint: requests
/// are served concurrently, and every connection has a total deadline
/// (`REQUEST_DEADLINE`, 5 s) after which it is closed.
#[test]
fn a_stalled_admin_client_holds_up_nobody_and_is_cut_at_the_deadline() {
    use std::io::{Read, Write};
    let s = Server::start(&[]);
    let admin = s.admin.unwrap();
    // Half a request head, then nothing; and a connection that sends
    // nothing at all.
    let mut half = std::net::TcpStream::connect(admin).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHo").unwrap();
    let silent = std::net::TcpStream::connect(admin).unwrap();
    let opened = Instant::now();
    for path in ["/healthz", "/metrics", "/readyz"] {
        let asked = Instant::now();
        let (status, _) = http_get(admin, path);
        assert!(status == 200 || status == 503, "{path}: {status}");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{path} waited {:?} behind a stalled client",
            asked.elapsed()
        );
    }
    for mut c in [half, silent] {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 512];
        // The server closes it (maybe after a 408-style error): read to EOF.
        while c.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(8),
            "a stalled admin connection was closed after {took:?}; the deadline is 5 s"
        );
    }
}

/// With every connection slot held (32 stalled clients), a new request is
/// answered 503 at once instead of waiting; once the stalled ones are cut
/// at their deadline it is served again.
#[test]
fn a_full_admin_endpoint_answers_503_at_once() {
    let s = Server::start(&[]);
    let admin = s.admin.unwrap();
    let stalled: Vec<_> = (0..32)
        .map(|_| std::net::TcpStream::connect(admin).unwrap())
        .collect();
    // Let the endpoint accept all of them first.
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let (status, body) = http_get(admin, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(asked.elapsed() < Duration::from_secs(2));
    let until = Instant::now() + Duration::from_secs(20);
    while http_get(admin, "/healthz").0 != 200 {
        assert!(Instant::now() < until, "never served again");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(stalled);
}

/// A file under `docs/`.
fn doc(name: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

/// One row of the families table of `docs/metrics.md`.
#[derive(Debug)]
struct Documented {
    kind: String,
    /// Label names (the backquoted words of the labels column).
    labels: BTreeSet<String>,
    /// Whether the present column says "always" (else: only with Redis).
    always: bool,
}

/// Words between backquotes.
fn backquoted(cell: &str) -> impl Iterator<Item = &str> {
    cell.split('`').skip(1).step_by(2)
}

/// The families table of `docs/metrics.md` (rows `| \`shardcast_…\` | type
/// | labels | unit | meaning | present |`), and the values of its `limit`
/// label table (rows whose first cell is a backquoted lowercase word).
fn documented_families(text: &str) -> (BTreeMap<String, Documented>, BTreeSet<String>) {
    let mut families = BTreeMap::new();
    let mut limits = BTreeSet::new();
    let mut in_limits = false;
    for line in text.lines() {
        if line.starts_with("## ") {
            in_limits = line.contains("`limit` label values");
        }
        let Some(row) = line.strip_prefix('|') else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let first = cells[0];
        if let Some(name) = first
            .strip_prefix("`shardcast_")
            .and_then(|n| n.strip_suffix('`'))
        {
            assert_eq!(cells.len(), 7, "docs/metrics.md: 6 columns in {line}");
            assert!(
                cells[1..6].iter().all(|c| !c.is_empty()),
                "docs/metrics.md: an empty cell in {line}"
            );
            let present = cells[5];
            assert!(
                present == "always" || present == "with `redis.url`",
                "docs/metrics.md: present is `always` or `with \\`redis.url\\``: {line}"
            );
            let d = Documented {
                kind: cells[1].to_string(),
                labels: backquoted(cells[2]).map(String::from).collect(),
                always: present == "always",
            };
            let prev = families.insert(format!("shardcast_{name}"), d);
            assert!(prev.is_none(), "docs/metrics.md: {name} twice");
        } else if in_limits {
            if let Some(value) = first.strip_prefix('`').and_then(|v| v.strip_suffix('`')) {
                limits.insert(value.to_string());
            }
        }
    }
    (families, limits)
}

/// What one scrape of `/metrics` exposes.
struct Exposed {
    /// Family → type, from the `# TYPE` lines.
    kinds: BTreeMap<String, String>,
    /// Family → label names of its samples (`le` of histograms left out).
    labels: BTreeMap<String, BTreeSet<String>>,
    /// Values of the `limit` label.
    limits: BTreeSet<String>,
}

fn scrape(admin: SocketAddr) -> Exposed {
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    let samples = parse_prometheus(&body);
    let kinds: BTreeMap<String, String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("TYPE name kind");
            (name.to_string(), kind.to_string())
        })
        .collect();
    let mut labels: BTreeMap<String, BTreeSet<String>> =
        kinds.keys().map(|k| (k.clone(), BTreeSet::new())).collect();
    let mut limits = BTreeSet::new();
    for (name, pairs) in samples.keys() {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| kinds.contains_key(*f)))
            .unwrap_or(name);
        for pair in pairs.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').expect("label k=v");
            if k == "limit" {
                limits.insert(v.trim_matches('"').to_string());
            }
            if k != "le" {
                labels.get_mut(family).expect("declared").insert(k.into());
            }
        }
    }
    Exposed {
        kinds,
        labels,
        limits,
    }
}

/// Checks the documented families against one server's: the same names,
/// types and labels. `redis`: whether the server runs the Redis bus (else
/// the families documented as present only with `redis.url` are absent).
fn check_documented(
    docs: &BTreeMap<String, Documented>,
    exposed: &Exposed,
    redis: bool,
    server: &str,
) {
    let expected: BTreeSet<&String> = docs
        .iter()
        .filter(|(_, d)| d.always || redis)
        .map(|(n, _)| n)
        .collect();
    let actual: BTreeSet<&String> = exposed.kinds.keys().collect();
    let undocumented: Vec<_> = actual.difference(&expected).collect();
    assert!(
        undocumented.is_empty(),
        "{server}: /metrics exposes families docs/metrics.md does not document: {undocumented:?}"
    );
    let missing: Vec<_> = expected.difference(&actual).collect();
    assert!(
        missing.is_empty(),
        "{server}: docs/metrics.md documents families /metrics does not expose: {missing:?}"
    );
    for (name, kind) in &exposed.kinds {
        let d = &docs[name];
        assert_eq!(
            &d.kind, kind,
            "{server}: the type of {name} in docs/metrics.md"
        );
        assert_eq!(
            d.labels, exposed.labels[name],
            "{server}: the labels of {name} in docs/metrics.md"
        );
    }
}

/// Every `shardcast_[a-z_]+` word of `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.match_indices("shardcast_")
        .map(|(at, _)| {
            let len = text[at..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(text.len() - at);
            text[at..at + len].to_string()
        })
        .collect()
}

/// Every metric name `file` mentions is a documented family (or a
/// documented histogram's `_bucket`, `_sum` or `_count` series).
fn check_names(docs: &BTreeMap<String, Documented>, file: &str, text: &str) {
    let names = metric_names(text);
    assert!(!names.is_empty(), "{file} names no metric");
    let unknown: Vec<_> = names
        .iter()
        .filter(|n| {
            !docs.contains_key(n.as_str())
                && !["_bucket", "_sum", "_count"].iter().any(|s| {
                    n.strip_suffix(s)
                        .and_then(|f| docs.get(f))
                        .is_some_and(|d| d.kind == "histogram")
                })
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "{file} uses metrics docs/metrics.md does not document: {unknown:?}"
    );
}

/// The dashboard is JSON Grafana can import: a `DS_PROMETHEUS` input that
/// every query panel uses, unique panel ids, a query in every target.
fn check_dashboard(text: &str) {
    let d: serde_json::Value = serde_json::from_str(text).expect("grafana-dashboard.json parses");
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(inputs
        .iter()
        .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"));
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "panel {id}: gridPos.{k}");
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {id}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "panel {id}"
            );
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {id}");
            queries += 1;
        }
    }
    assert!(queries >= 10, "only {queries} queries");
}

/// The alert rules file has the rule-file structure: `groups:` of rules,
/// each with `alert`, `expr`, `for`, a `severity` label and `summary` and
/// `description` annotations. Read line by line; also parsed as YAML when
/// python3 with PyYAML is at hand (no Rust YAML crate needed).
fn check_alerts(path: &std::path::Path, text: &str) {
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    assert_eq!(
        first,
        Some("groups:"),
        "prometheus-alerts.yml starts with groups:"
    );
    let rules: Vec<&str> = text.split("- alert: ").skip(1).collect();
    assert!(rules.len() >= 5, "only {} alert rules", rules.len());
    for rule in &rules {
        let name = rule.lines().next().unwrap_or("");
        for key in [
            "expr:",
            "for:",
            "labels:",
            "severity:",
            "annotations:",
            "summary:",
        ] {
            assert!(
                rule.lines().any(|l| l.trim_start().starts_with(key)),
                "alert {name} has no {key}"
            );
        }
        assert!(
            rule.lines()
                .any(|l| l.trim_start().starts_with("description:")),
            "alert {name} has no description"
        );
    }
    let has_yaml = std::process::Command::new("python3")
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_yaml {
        eprintln!("python3 with PyYAML not found: prometheus-alerts.yml checked line by line only");
        return;
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "prometheus-alerts.yml is not YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from python3");
    let groups = doc["groups"].as_array().expect("groups: a list");
    let mut alerts = 0;
    for g in groups {
        assert!(g["name"].is_string(), "a group without a name");
        for r in g["rules"].as_array().expect("rules: a list") {
            let name = r["alert"].as_str().expect("alert: a string");
            assert!(r["expr"].is_string(), "{name}: expr");
            assert!(r["for"].is_string(), "{name}: for");
            let severity = r["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("critical" | "warning" | "info")),
                "{name}: severity {severity:?}"
            );
            for a in ["summary", "description"] {
                assert!(
                    r["annotations"][a].as_str().is_some_and(|s| !s.is_empty()),
                    "{name}: annotation {a}"
                );
            }
            alerts += 1;
        }
    }
    assert_eq!(alerts, rules.len(), "YAML and line reading disagree");
}

/// docs/metrics.md documents exactly the families `/metrics` exposes (the
/// `shardcast_redis_*` ones with the Redis bus only), with their types,
/// labels and the `limit` label's values; the example alert rules and the
/// Grafana dashboard use only those families, and parse.
#[test]
fn metrics_docs_alert_rules_and_dashboard_match_the_server() {
    let (_, metrics_md) = doc("metrics.md");
    let (docs, limits) = documented_families(&metrics_md);
    assert!(
        docs.values().any(|d| !d.always),
        "no Redis-only family documented"
    );

    let local = Server::start(&[]);
    let exposed = scrape(local.admin.expect("admin endpoint"));
    check_documented(&docs, &exposed, false, "embedded bus");
    assert_eq!(
        limits, exposed.limits,
        "the limit values in docs/metrics.md (Limit::ALL)"
    );
    drop(local);

    let redis = RedisServer::start(false);
    let url = redis.url();
    let node = Server::start(&["--redis-url", &url]);
    let exposed = scrape(node.admin.expect("admin endpoint"));
    check_documented(&docs, &exposed, true, "Redis bus");
    drop(node);

    let (alerts_path, alerts) = doc("prometheus-alerts.yml");
    check_names(&docs, "docs/prometheus-alerts.yml", &alerts);
    check_alerts(&alerts_path, &alerts);
    let (_, dashboard) = doc("grafana-dashboard.json");
    check_names(&docs, "docs/grafana-dashboard.json", &dashboard);
    check_dashboard(&dashboard);
}
