//! `shardcast-bench`: load scenarios against a running or self-started
//! shardcast, measured from the server's side (/proc) as well as the
//! client's.
//!
//! Scenarios so far: `idle` (hold N idle connections, report the server's
//! RSS per connection).

mod proc_stats;
mod scenario_idle;

use std::process::ExitCode;

const USAGE: &str = "\
shardcast-bench — load scenarios for shardcast

USAGE:
    shardcast-bench idle [--connections N] [--server PATH] [--subscribe]

idle: starts `shardcast serve` (release build next to this binary unless
--server is given) on a free loopback port, opens N native connections that
complete Connect (and, with --subscribe, subscribe to one channel each),
lets them sit idle, and reports the server's RSS growth per connection.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("idle") => scenario_idle::run(&args[1..]),
        Some("--help" | "-h" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown scenario {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardcast-bench: {e}");
            ExitCode::from(2)
        }
    }
}
