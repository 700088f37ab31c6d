//! The command line: config validation names the key and the allowed range.

use std::process::Command;

fn shardcast(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run shardcast");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shardcast-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_config_accepts_a_good_file() {
    let p = temp_file(
        "good.toml",
        "[server]\nlisten = \"127.0.0.1:9999\"\nshards = 3\n",
    );
    let (code, out, err) = shardcast(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("127.0.0.1:9999") && out.contains("3 shards"),
        "{out}"
    );
}

#[test]
fn keys_shows_default_range_flag_and_variable() {
    let (code, out, err) = shardcast(&["keys"], &[]);
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["KEY", "DEFAULT", "ACCEPTS", "FLAG", "VARIABLE"]);
    let row = |key: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no row for {key}:\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("fanout.max_batch"),
        [
            "fanout.max_batch",
            "64",
            "1–4096",
            "--fanout-max-batch",
            "SHARDCAST_FANOUT_MAX_BATCH"
        ]
    );
    assert_eq!(
        row("server.listen")[1..3],
        ["\"127.0.0.1:8080\"", "IP:PORT"]
    );
    assert_eq!(row("auth.require_exp")[1..3], ["false", "bool"]);
    assert_eq!(lines.count(), shardcast::config::Config::keys().len());
}

#[test]
fn the_example_config_passes_check_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/shardcast.example.toml");
    let (code, out, err) = shardcast(&["check-config", "--config", example], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("config OK: listen 127.0.0.1:8080"), "{out}");
    assert!(!err.contains("warning"), "{err}");
    // What the systemd unit reads is where the docs install the example.
    let unit = include_str!("../systemd/shardcast.service");
    assert!(
        unit.contains("--config /etc/shardcast/shardcast.toml"),
        "the unit's config path"
    );
    let install = include_str!("../systemd/README.md");
    assert!(
        install.contains("install -m 644 shardcast.example.toml /etc/shardcast/shardcast.toml"),
        "systemd/README.md installs the example where the unit reads it"
    );
}

#[test]
fn booleans_read_alike_from_every_source() {
    let p = temp_file("bools.toml", "[server]\npin_threads = \"Off\"\n");
    let path = p.to_str().unwrap();
    let (code, out, err) = shardcast(&["check-config", "--config", path, "--print"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("server.pin_threads = false"), "{out}");
    let (code, out, err) = shardcast(
        &["check-config", "--print"],
        &[("SHARDCAST_SERVER_PIN_THREADS", "NO")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("server.pin_threads = false"), "{out}");
    let (code, out, err) = shardcast(
        &["check-config", "--print", "--server-pin-threads", "FALSE"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("server.pin_threads = false"), "{out}");
    let (code, _, err) = shardcast(&["check-config", "--server-pin-threads", "maybe"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--server-pin-threads") && err.contains("yes/no"),
        "{err}"
    );
}

#[test]
fn out_of_range_value_names_key_and_range() {
    let p = temp_file("bad.toml", "[fanout]\nmax_batch = 0\n");
    let (code, _, err) = shardcast(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("fanout.max_batch") && err.contains("between 1 and 4096"),
        "{err}"
    );
}

#[test]
fn flags_and_environment_override_and_are_checked() {
    let (code, _, err) = shardcast(&["check-config", "--server-shards", "many"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--server-shards"), "{err}");

    let (code, _, err) = shardcast(&["check-config"], &[("SHARDCAST_SERVER_SHARDS", "5000")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("server.shards") && err.contains("between 0 and 1024"),
        "{err}"
    );

    // Flags win over the environment.
    let (code, out, err) = shardcast(
        &["check-config", "--server-shards", "7"],
        &[("SHARDCAST_SERVER_SHARDS", "5000")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("7 shards"), "{out}");
}

#[test]
fn unknown_key_flag_and_variable_are_errors() {
    let p = temp_file("typo.toml", "[server]\nlistn = \"x\"\n");
    let (code, _, err) = shardcast(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("listn"), "{err}");

    let (code, _, err) = shardcast(&["serve", "--server-listn", "x"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--server-listn"), "{err}");

    let (code, _, err) = shardcast(&["check-config"], &[("SHARDCAST_SERVR_LISTEN", "x")]);
    assert_eq!(code, 2);
    assert!(err.contains("SHARDCAST_SERVR_LISTEN"), "{err}");
}

#[test]
fn port_in_use_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = shardcast(
        &["serve", "--server-listen", &addr, "--server-shards", "1"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot listen") && err.contains(&addr),
        "{err}"
    );
}

/// `serve` with `args` on a free port, stopped as soon as it listens:
/// `Ok(())` if it started, else its exit code and stderr.
fn serve_outcome(args: &[&str], env: &[(&str, &str)]) -> Result<(), (i32, String)> {
    use std::io::{BufRead, Read};
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .arg("serve")
        .args(["--server-listen", "127.0.0.1:0", "--server-shards", "1"])
        .args(["--admin-listen", ""])
        .args(args)
        .env("SHARDCAST_LOG_LEVEL", "warn")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn shardcast serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.contains("listening") {
        child.kill().unwrap();
        child.wait().unwrap();
        return Ok(());
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    Err((status.code().unwrap_or(-1), err))
}

/// `check-config` with `args`: `Ok(())` if it passed, else its exit code
/// and stderr.
fn check_outcome(args: &[&str], env: &[(&str, &str)]) -> Result<(), (i32, String)> {
    let mut all = vec!["check-config"];
    all.extend_from_slice(args);
    match shardcast(&all, env) {
        (0, _, _) => Ok(()),
        (code, _, err) => Err((code, err)),
    }
}

/// The body of the PEM `openssl pkey -pubout` writes for an Ed25519 key:
/// base64 of the 44-byte DER SubjectPublicKeyInfo.
const SPKI_BODY: &str = "MCowBQYDK2VwAyEAw9e+9fMljcYScipsMTLAR1sYwC5cFHUZUC0BFwQPC4I=";

#[test]
fn check_config_fails_exactly_where_serve_fails() {
    let empty = temp_file("empty.dict", "");
    // A zstd dictionary header (magic, id) followed by garbage tables:
    // readable, but zstd refuses it.
    let corrupt = temp_file("corrupt.dict", "");
    std::fs::write(
        &corrupt,
        [
            &[0x37u8, 0xa4, 0x30, 0xec, 1, 0, 0, 0][..],
            &[0xffu8; 64][..],
        ]
        .concat(),
    )
    .unwrap();
    let missing = corrupt.with_file_name("missing.dict");
    let pem = format!("-----BEGIN PUBLIC KEY-----\n{SPKI_BODY}\n-----END PUBLIC KEY-----\n");
    let cases: Vec<(Vec<&str>, bool)> = vec![
        (
            vec!["--compression-dictionary", missing.to_str().unwrap()],
            false,
        ),
        (
            vec!["--compression-dictionary", empty.to_str().unwrap()],
            false,
        ),
        (
            vec!["--compression-dictionary", corrupt.to_str().unwrap()],
            false,
        ),
        (vec!["--auth-ed25519-public-key", "notakey"], false),
        // Base64 of 3 bytes: neither 32 key bytes nor a 44-byte SPKI.
        (vec!["--auth-ed25519-public-key", "AAAA"], false),
        (
            vec!["--redis-url", "redis://app:hunter2@localhost:notaport"],
            false,
        ),
        (vec!["--compression-dictionary-id", "1"], false),
        // The PEM body alone (44 bytes, SPKI) and the whole PEM: accepted.
        (vec!["--auth-ed25519-public-key", SPKI_BODY], true),
        (vec!["--auth-ed25519-public-key", &pem], true),
        (vec![], true),
    ];
    for (args, ok) in cases {
        let checked = check_outcome(&args, &[]);
        let served = serve_outcome(&args, &[]);
        assert_eq!(checked.is_ok(), ok, "check-config {args:?}: {checked:?}");
        assert_eq!(served.is_ok(), ok, "serve {args:?}: {served:?}");
        if let (Err((c1, e1)), Err((c2, e2))) = (&checked, &served) {
            assert_eq!((c1, c2), (&2, &2), "{args:?}");
            assert!(
                e2.contains(e1.trim()),
                "{args:?}: check-config said {e1:?}, serve said {e2:?}"
            );
            assert!(!e1.contains("hunter2"), "the password leaked: {e1}");
        }
    }
}

#[test]
fn env_file_is_read_like_systemds_environment_file() {
    let env = temp_file(
        "unit.env",
        "# secrets for the unit\nSHARDCAST_SERVER_SHARDS=\"3\"\nSHARDCAST_AUTH_HS256_SECRET='an hs256 secret of 32 bytes or more'\nLANG=C\n",
    );
    let env = env.to_str().unwrap();
    let (code, out, err) = shardcast(&["check-config", "--env-file", env], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 shards"), "{out}");
    // The file wins over the process environment, flags over the file.
    let (code, out, err) = shardcast(
        &["check-config", "--env-file", env],
        &[("SHARDCAST_SERVER_SHARDS", "5")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 shards"), "{out}");
    let (_, out, _) = shardcast(
        &["check-config", "--env-file", env, "--server-shards", "4"],
        &[],
    );
    assert!(out.contains("4 shards"), "{out}");

    // What the unit would refuse, check-config refuses.
    let bad = temp_file("bad.env", "SHARDCAST_SERVER_SHARDS=5000\n");
    let bad = bad.to_str().unwrap();
    let (code, _, err) = shardcast(&["check-config", "--env-file", bad], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("server.shards") && err.contains("between 0 and 1024"),
        "{err}"
    );
    let typo = temp_file("typo.env", "SHARDCAST_SERVER_SHARDZ=2\n");
    let (code, _, err) = shardcast(&["check-config", "--env-file", typo.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("SHARDCAST_SERVER_SHARDZ"), "{err}");
    let (code, _, err) = shardcast(&["check-config", "--env-file", "/nonexistent.env"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent.env"), "{err}");
    // serve reads it alike (a key the helper does not set by flag).
    let batch = temp_file("batch.env", "SHARDCAST_FANOUT_MAX_BATCH=0\n");
    let batch = batch.to_str().unwrap();
    let (code, err) = serve_outcome(&["--env-file", batch], &[]).unwrap_err();
    assert_eq!(code, 2);
    assert!(err.contains("fanout.max_batch"), "{err}");
    let (code, _, checked) = shardcast(&["check-config", "--env-file", batch], &[]);
    assert_eq!(code, 2);
    assert!(err.contains(checked.trim()), "{checked} vs {err}");
}

#[test]
fn print_shows_every_key_with_its_origin_and_masks_secrets() {
    let config = temp_file("print.toml", "[server]\nbacklog = 100\n");
    let secret = "an hs256 secret of 32 bytes or more";
    let env = temp_file(
        "print.env",
        &format!("SHARDCAST_AUTH_HS256_SECRET=\"{secret}\"\n"),
    );
    let (code, out, err) = shardcast(
        &[
            "check-config",
            "--config",
            config.to_str().unwrap(),
            "--env-file",
            env.to_str().unwrap(),
            "--print",
            "--server-shards",
            "2",
        ],
        &[
            (
                "SHARDCAST_REDIS_URL",
                "redis://app:hunter2@redis.local:6379/0",
            ),
            ("SHARDCAST_LOG_LEVEL", "debug"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no line for {key}:\n{out}"))
            .to_string()
    };
    // Every key has its line.
    let (_, keys, _) = shardcast(&["keys"], &[]);
    for key in keys
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
    {
        line(key);
    }
    assert!(line("server.listen").ends_with("# default"), "{out}");
    assert!(
        line("server.backlog").contains("= 100")
            && line("server.backlog").contains("# config file"),
        "{out}"
    );
    assert!(
        line("server.shards").ends_with("# flag --server-shards"),
        "{out}"
    );
    assert!(
        line("log.level").ends_with("# environment variable SHARDCAST_LOG_LEVEL"),
        "{out}"
    );
    let secret_line = line("auth.hs256_secret");
    assert!(
        secret_line.contains("SHARDCAST_AUTH_HS256_SECRET in environment file"),
        "{secret_line}"
    );
    assert!(secret_line.contains("(secret, 35 bytes)"), "{secret_line}");
    assert!(
        line("redis.url").contains("redis://app:***@redis.local:6379/0"),
        "{out}"
    );
    assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
    assert!(out.contains("config OK"), "{out}");
    let (code, _, err) = shardcast(&["serve", "--print"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("check-config"), "{err}");
}

#[test]
fn a_server_nobody_can_use_is_warned_about() {
    let (code, out, err) = shardcast(&["check-config", "--auth-anonymous", "false"], &[]);
    assert_eq!(code, 0, "a warning is not an error: {err}");
    assert!(out.contains("config OK"), "{out}");
    assert!(
        err.contains("warning") && err.contains("auth.anonymous = false"),
        "{err}"
    );
    let (code, _, err) = shardcast(
        &[
            "check-config",
            "--auth-anonymous",
            "false",
            "--auth-ed25519-public-key",
            SPKI_BODY,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "a key makes it usable: {err}");
}

#[test]
fn a_dictionary_id_follows_its_content() {
    let samples: String = (0..2000)
        .map(|i| {
            format!(
                "{{\"room\":\"r{}\",\"user\":{i},\"text\":\"hello {i}\"}}\n",
                i % 9
            )
        })
        .collect();
    let samples = temp_file("samples.txt", &samples);
    let dict = std::env::temp_dir()
        .join(format!("shardcast-cli-{}", std::process::id()))
        .join("a.dict");
    let dict_s = dict.to_str().unwrap();
    let (code, out, err) = shardcast(
        &[
            "zstd-train",
            "--lines",
            "--max-bytes",
            "4096",
            "--out",
            dict_s,
            samples.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&dict).unwrap();
    let id = shardcast::protocol::compression::dictionary_id(&bytes);
    assert!(out.contains(&format!("its id: {id}")), "{out}");
    let (code, out, err) = shardcast(&["check-config", "--compression-dictionary", dict_s], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("dictionary id {id} ")), "{out}");
    // Retrained (here: edited) content, new id.
    let mut edited = bytes.clone();
    *edited.last_mut().unwrap() ^= 0x55;
    std::fs::write(&dict, &edited).unwrap();
    let (_, out, _) = shardcast(&["check-config", "--compression-dictionary", dict_s], &[]);
    let new_id = shardcast::protocol::compression::dictionary_id(&edited);
    assert_ne!(new_id, id);
    assert!(out.contains(&format!("dictionary id {new_id} ")), "{out}");
}

#[test]
fn a_bad_pusher_app_table_stops_serve_and_check_config_naming_it() {
    let good = "[pusher]\napp_id = \"1\"\napp_key = \"k1\"\napp_secret = \"s1\"\n\
                [[pusher.apps]]\nid = \"2\"\nkey = \"k2\"\nsecret = \"s2\"\n";
    let p = temp_file("apps-good.toml", good);
    let path = p.to_str().unwrap();
    assert_eq!(check_outcome(&["--config", path], &[]), Ok(()));
    assert_eq!(serve_outcome(&["--config", path], &[]), Ok(()));
    for (name, app, field) in [
        (
            "apps-dup-key.toml",
            "[[pusher.apps]]\nid = \"3\"\nkey = \"k2\"\nsecret = \"s3\"\n",
            "`key`",
        ),
        (
            "apps-dup-default-key.toml",
            "[[pusher.apps]]\nid = \"3\"\nkey = \"k1\"\nsecret = \"s3\"\n",
            "`key`",
        ),
        (
            "apps-no-secret.toml",
            "[[pusher.apps]]\nid = \"3\"\nkey = \"k3\"\n",
            "`secret`",
        ),
    ] {
        let p = temp_file(name, &format!("{good}{app}"));
        let path = p.to_str().unwrap();
        let (code, err) = check_outcome(&["--config", path], &[]).unwrap_err();
        assert_ne!(code, 0);
        for want in ["pusher.apps", "table 2", field] {
            assert!(
                err.contains(want),
                "check-config {name}: {err:?} lacks {want}"
            );
        }
        assert!(!err.contains("s3"), "the secret is not printed: {err}");
        let (code, serve_err) = serve_outcome(&["--config", path], &[]).unwrap_err();
        assert_ne!(code, 0);
        for want in ["pusher.apps", "table 2", field] {
            assert!(
                serve_err.contains(want),
                "serve {name}: {serve_err:?} lacks {want}"
            );
        }
    }
}
