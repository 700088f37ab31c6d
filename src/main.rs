//! The `shardcast` command: a thin CLI over the library.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use shardcast::config::{Config, Origin, Override};
use shardcast::preflight;
use shardcast::protocol::compression;
use shardcast::server::serve;

// mimalloc keeps per-thread heaps, so shards allocating and freeing frames
// on their own threads never contend on a global allocator lock, and its
// small-object size classes keep per-connection overhead low.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
shardcast — thread-per-core WebSocket push server

USAGE:
    shardcast serve [--config FILE] [--env-file FILE]... [--SECTION-KEY VALUE]...
    shardcast check-config [--config FILE] [--env-file FILE]... [--print] [--SECTION-KEY VALUE]...
                          run every check `serve` runs before it binds (files
                          readable, keys parse, ...) and warn about settings
                          that leave a server nobody can use; --print shows
                          every key, its value and where it came from
                          (secrets masked)
    shardcast keys        list every config key with its default, the values it
                          accepts, its flag and its environment variable
    shardcast zstd-train --out FILE [--max-bytes N] [--lines] SAMPLE...
                          train a zstd dictionary for small messages
    shardcast --version

Every config key `section.key` can be set in the TOML file, by the
environment variable SHARDCAST_SECTION_KEY, or by the flag --section-key
(flags win over the environment, which wins over the file). --env-file
reads SHARDCAST_* variables from a file as systemd's EnvironmentFile= does
(KEY=VALUE lines, # comments, quotes); they count as environment variables
and win over the process's own. A boolean is true/false, yes/no, on/off or
1/0, in any case, wherever it is set.
";

struct Args {
    config: Option<String>,
    env_files: Vec<String>,
    print: bool,
    overrides: Vec<Override>,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut config = None;
    let mut env_files = Vec::new();
    let mut print = false;
    let mut overrides = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--print" {
            print = true;
            i += 1;
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        if !flag.starts_with("--") {
            return Err(format!("unexpected argument {arg:?}\n\n{USAGE}"));
        }
        let mut value = || -> Result<String, String> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| format!("flag {flag} needs a value"))
        };
        if flag == "--config" || flag == "-c" {
            config = Some(value()?);
        } else if flag == "--env-file" {
            env_files.push(value()?);
        } else if let Some(key) = Config::key_for_flag(&flag) {
            let v = value()?;
            overrides.push(Override {
                key,
                value: v,
                origin: Origin::Flag(flag.clone()),
            });
        } else {
            return Err(format!(
                "unknown flag {flag}; run `shardcast keys` for the list of settings"
            ));
        }
        i += 1;
    }
    Ok(Args {
        config,
        env_files,
        print,
        overrides,
    })
}

/// A loaded configuration and what it was loaded from.
struct Loaded {
    config: Config,
    path: Option<String>,
    overrides: Vec<Override>,
    print: bool,
}

/// The configuration: the file, then the environment, then each
/// `--env-file` in turn, then the flags, each winning over what came before.
fn load(args: &[String]) -> Result<Loaded, String> {
    let args = parse_args(args)?;
    let mut overrides = Config::env_overrides(std::env::vars()).map_err(|e| e.to_string())?;
    for path in &args.env_files {
        overrides.extend(Config::env_file_overrides(path).map_err(|e| e.to_string())?);
    }
    overrides.extend(args.overrides);
    let config = Config::load(args.config.as_deref(), &overrides).map_err(|e| e.to_string())?;
    Ok(Loaded {
        config,
        path: args.config,
        overrides,
        print: args.print,
    })
}

/// `shardcast check-config`: the checks `serve` runs before binding, the
/// warnings (on stderr), and with `--print` the effective configuration.
fn check_config(args: &[String]) -> Result<(), String> {
    let loaded = load(args)?;
    let config = &loaded.config;
    let checked = preflight::check(config)?;
    for warning in &checked.warnings {
        eprintln!("shardcast: warning: {warning}");
    }
    if loaded.print {
        let settings = config
            .settings(loaded.path.as_deref(), &loaded.overrides)
            .map_err(|e| e.to_string())?;
        for s in settings {
            println!("{:58} # {}", format!("{} = {}", s.key, s.value), s.source);
        }
    }
    let dictionary = checked
        .dictionary
        .map(|d| format!(", dictionary id {} ({} bytes)", d.id, d.bytes.len()))
        .unwrap_or_default();
    println!(
        "config OK: listen {} with {} shards{dictionary}",
        config.server.listen,
        config.shard_count()
    );
    Ok(())
}

/// `shardcast zstd-train --out FILE [--max-bytes N] [--lines] SAMPLE...`:
/// each sample file is one message, or with `--lines` each line of each
/// file is one.
fn zstd_train(args: &[String]) -> Result<(), String> {
    let mut out = None;
    let mut max_bytes = 16 * 1024;
    let mut lines = false;
    let mut files = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = it.next().cloned(),
            "--max-bytes" => {
                max_bytes = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--max-bytes needs a number of bytes")?
            }
            "--lines" => lines = true,
            f if !f.starts_with("--") => files.push(f.to_string()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    let out = out.ok_or("--out FILE is required")?;
    let mut samples: Vec<Vec<u8>> = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| format!("cannot read {f}: {e}"))?;
        if lines {
            samples.extend(
                bytes
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec),
            );
        } else {
            samples.push(bytes);
        }
    }
    if samples.len() < 8 {
        return Err(format!(
            "{} samples given; train on hundreds of representative messages",
            samples.len()
        ));
    }
    let dict = compression::train(&samples, max_bytes)
        .map_err(|e| format!("training failed: {e} (more or more varied samples help)"))?;
    std::fs::write(&out, &dict).map_err(|e| format!("cannot write {out}: {e}"))?;
    println!(
        "wrote a {}-byte dictionary trained on {} samples to {out} (its id: {})",
        dict.len(),
        samples.len(),
        compression::dictionary_id(&dict)
    );
    Ok(())
}

/// `shardcast keys`: a header, then one line per key with its default,
/// what it accepts, its flag and its variable, in aligned columns.
fn print_keys() {
    let header = ["KEY", "DEFAULT", "ACCEPTS", "FLAG", "VARIABLE"].map(String::from);
    let rows: Vec<[String; 5]> = std::iter::once(header)
        .chain(
            Config::key_info()
                .into_iter()
                .map(|k| [k.key, k.default, k.accepts, k.flag, k.env]),
        )
        .collect();
    let mut widths = [0; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        // A closed pipe (`shardcast keys | head`) ends the listing quietly.
        if writeln!(out, "{line}").is_err() {
            return;
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => load(&args[1..]).and_then(|l| {
            if l.print {
                return Err("--print is for `shardcast check-config`".into());
            }
            serve(l.config)
        }),
        Some("check-config") => check_config(&args[1..]),
        Some("zstd-train") => zstd_train(&args[1..]),
        Some("keys") => {
            print_keys();
            Ok(())
        }
        Some("--version" | "-V" | "version") => {
            println!("shardcast {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("--help" | "-h" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("shardcast: {message}");
            ExitCode::from(2)
        }
    }
}
