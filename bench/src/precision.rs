//! When a figure is fine enough to carry a verdict or a ratio.
//!
//! CPU time counted in 10 ms ticks, RSS that grows in 2 MiB steps and a
//! percentile of a few samples can all be read off a short or small run,
//! but their error is then as large as the figure: one tick more or less
//! turned "user 0.000 µs PASS" into "1.000 µs", and a 300-connection idle
//! run failed the RSS target on a single 2 MiB step. Such figures are still
//! shown, with their resolution; a verdict or ratio from them says
//! "insufficient sample" and which rule below it missed.

use crate::proc_stats::CpuWindow;

/// Fewest clock ticks a CPU figure from `/proc/PID/stat` needs. Each
/// reading is truncated to whole ticks, so a difference of two is off by
/// up to one: under 2 % from 50 on. The kernel also splits user from
/// system time by which mode the ticks find the process in, which needs
/// many ticks to mean anything.
pub const MIN_TICKS: u64 = 50;

/// RSS grows in steps, not bytes: 2 MiB is a transparent huge page, and
/// what a 300-connection idle run measured as one step.
pub const RSS_STEP_BYTES: u64 = 2 << 20;

/// A per-connection RSS figure is used only when one step spread over the
/// connections is at most 1/RSS_STEPS of what it is compared with (the
/// target for a verdict; the figure itself for a ratio, i.e. the RSS grew
/// by at least this many steps).
pub const RSS_STEPS: u64 = 4;

/// A percentile needs this many samples beyond it (p95: 200 samples, p99:
/// 1,000), or it is just one of the few largest values.
pub const TAIL_SAMPLES: u64 = 10;

fn ticks(what: &str, n: u64) -> Result<(), String> {
    if n >= MIN_TICKS {
        Ok(())
    } else {
        Err(format!(
            "{what} is {n} clock tick(s), fewer than {MIN_TICKS}"
        ))
    }
}

/// The total CPU time: always from schedstat's nanoseconds, otherwise
/// enough ticks.
pub fn cpu_total(w: &CpuWindow) -> Result<(), String> {
    match &w.total_from_ticks {
        None => Ok(()),
        Some(why) => ticks(
            &format!("CPU time (from ticks: {why})"),
            w.user_ticks + w.system_ticks,
        ),
    }
}

/// User CPU time (ticks only).
pub fn cpu_user(w: &CpuWindow) -> Result<(), String> {
    ticks("user CPU time", w.user_ticks)
}

/// System CPU time (ticks only).
pub fn cpu_system(w: &CpuWindow) -> Result<(), String> {
    ticks("system CPU time", w.system_ticks)
}

/// How finely RSS per connection is measured: one step over the
/// connections.
pub fn rss_resolution(connections: u64) -> f64 {
    RSS_STEP_BYTES as f64 / connections.max(1) as f64
}

/// RSS per connection over `connections`, compared with `bytes` per
/// connection.
pub fn rss(bytes: f64, connections: u64) -> Result<(), String> {
    let res = rss_resolution(connections);
    if res * RSS_STEPS as f64 <= bytes.abs() {
        Ok(())
    } else {
        let need = (RSS_STEPS * RSS_STEP_BYTES) as f64 / bytes.abs().max(1.0);
        let int = crate::report::int;
        Err(format!(
            "one 2 MiB RSS step is {} B per connection over {} connection(s), \
             more than 1/{RSS_STEPS} of {} B (needs {} connections or more)",
            int(res),
            int(connections as f64),
            int(bytes.abs()),
            int(need.ceil())
        ))
    }
}

/// Fewest samples for percentile `q` (0.95 for p95).
pub fn percentile_samples(q: f64) -> u64 {
    (TAIL_SAMPLES as f64 / (1.0 - q)).round() as u64
}

/// Percentile `q`, called `name` (`p95`), of `count` samples.
pub fn percentile(name: &str, q: f64, count: u64) -> Result<(), String> {
    let need = percentile_samples(q);
    if count >= need {
        Ok(())
    } else {
        Err(format!(
            "{} latency sample(s), fewer than {} ({TAIL_SAMPLES} beyond {name})",
            crate::report::int(count as f64),
            crate::report::int(need as f64)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_rule() {
        let mut w = CpuWindow {
            user_ticks: 4,
            system_ticks: 77,
            tick_ns: 10_000_000,
            total_resolution_ns: 1,
            ..Default::default()
        };
        assert!(cpu_total(&w).is_ok(), "nanoseconds need no ticks");
        let e = cpu_user(&w).unwrap_err();
        assert!(e.contains("4 clock tick(s), fewer than 50"), "{e}");
        assert!(cpu_system(&w).is_ok());
        w.total_from_ticks = Some("a thread exited during the window".into());
        assert!(cpu_total(&w).is_ok()); // 81 ticks
        w.system_ticks = 40;
        assert!(cpu_total(&w).unwrap_err().contains("a thread exited"));
    }

    #[test]
    fn rss_rule() {
        // 300 connections: one step is 6,991 B each, too coarse for 2.5 KB.
        let e = rss(2560.0, 300).unwrap_err();
        assert!(e.contains("6,991 B per connection over 300"), "{e}");
        assert!(e.contains("3,277 connections or more"), "{e}");
        assert!(rss(2560.0, 10_000).is_ok());
        // As a figure of its own: the RSS must have grown by 4 steps.
        assert!(rss(1000.0, 10_000).is_ok()); // 10 MB
        assert!(rss(500.0, 10_000).is_err()); // 5 MB
    }

    #[test]
    fn percentile_rule() {
        assert_eq!(percentile_samples(0.5), 20);
        assert_eq!(percentile_samples(0.95), 200);
        assert_eq!(percentile_samples(0.99), 1000);
        assert_eq!(percentile_samples(0.999), 10_000);
        assert!(percentile("p95", 0.95, 200).is_ok());
        let e = percentile("p95", 0.95, 199).unwrap_err();
        assert!(
            e.contains("199 latency sample(s), fewer than 200 (10 beyond p95)"),
            "{e}"
        );
    }
}
