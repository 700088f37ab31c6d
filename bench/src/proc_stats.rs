//! Server-side figures read from /proc: they stay meaningful when the load
//! generator, not the server, is the bottleneck.

use std::io;

/// A snapshot of a process's resource use.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcSample {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// User-mode CPU time, microseconds.
    pub user_us: u64,
    /// Kernel-mode CPU time, microseconds.
    pub system_us: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/statm`.
pub fn sample(pid: u32) -> io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    parse(&stat, &statm, page_size(), clock_ticks())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc entry"))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

fn clock_ticks() -> u64 {
    // SAFETY: as above.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

/// Parses the two files. `stat`'s second field (the command) may contain
/// spaces and parentheses, so fields are counted after the last ')'.
pub fn parse(stat: &str, statm: &str, page: u64, ticks: u64) -> Option<ProcSample> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3 overall, utime 14, stime 15.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(ProcSample {
        rss_bytes: resident_pages * page,
        user_us: utime * 1_000_000 / ticks,
        system_us: stime * 1_000_000 / ticks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_command_with_spaces_and_parens() {
        let stat = "1234 (shard (x) 1) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 3 0 100 1000000 2500 18446744073709551615";
        let statm = "250000 2500 300 100 0 5000 0";
        let s = parse(stat, statm, 4096, 100).unwrap();
        assert_eq!(s.user_us, 2_500_000);
        assert_eq!(s.system_us, 750_000);
        assert_eq!(s.rss_bytes, 2500 * 4096);
    }

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
    }
}
