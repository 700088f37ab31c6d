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
