//! Server-side figures read from /proc: they stay meaningful when the load
//! generator, not the server, is the bottleneck.
//!
//! CPU time comes from two files, because neither is enough alone:
//!
//! - `/proc/PID/task/TID/schedstat`, first field: the thread's time on a
//!   CPU in nanoseconds (the scheduler's own `sum_exec_runtime`). It is per
//!   thread — `/proc/PID/schedstat` is the main thread's, not the
//!   process's — so a process's total is the sum over its threads, and a
//!   thread that exits takes its time with it.
//! - `/proc/PID/stat`, utime and stime: the whole process, exited threads
//!   included, split into user and kernel time, but counted in clock ticks
//!   (USER_HZ: 10 ms), so a short window holds only a few of them.
//!
//! A window's total comes from the first whenever it can; the user/system
//! split always comes from the second (see precision.rs for when it has
//! enough ticks to be used).

use std::collections::BTreeMap;
use std::io;

use serde::{Deserialize, Serialize};

/// A snapshot of a process's resource use.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcSample {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    pub cpu: CpuReading,
}

/// CPU time used so far by one or more processes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuReading {
    /// utime from `stat`, clock ticks.
    pub user_ticks: u64,
    /// stime from `stat`, clock ticks.
    pub system_ticks: u64,
    /// On-CPU nanoseconds of each live thread, by thread id (ids are
    /// system-wide, so several processes' threads share one map). `None`
    /// when the kernel keeps no schedstat or a thread's could not be read.
    pub thread_ns: Option<BTreeMap<u32, u64>>,
}

/// One line of `/proc/.../schedstat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedstat {
    /// Time spent on a CPU, ns.
    pub on_cpu_ns: u64,
    /// Time spent runnable but waiting for a CPU, ns.
    pub run_delay_ns: u64,
    /// Times the thread was scheduled in.
    pub timeslices: u64,
}

/// CPU time a process (or a set of them) used between two readings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuWindow {
    /// Time on a CPU, ns.
    pub total_ns: u64,
    /// How finely `total_ns` was measured: 1 from schedstat, one clock
    /// tick when it fell back to `stat`.
    pub total_resolution_ns: u64,
    /// Why the total fell back to `stat`'s ticks, if it did.
    pub total_from_ticks: Option<String>,
    pub user_ticks: u64,
    pub system_ticks: u64,
    /// Length of a clock tick, ns (10,000,000 at USER_HZ 100).
    pub tick_ns: u64,
}

impl CpuWindow {
    /// The CPU time between `from` and `to`.
    pub fn between(from: &CpuReading, to: &CpuReading, tick_ns: u64) -> CpuWindow {
        let user_ticks = to.user_ticks.saturating_sub(from.user_ticks);
        let system_ticks = to.system_ticks.saturating_sub(from.system_ticks);
        let total = match (&from.thread_ns, &to.thread_ns) {
            (Some(a), Some(b)) => {
                // A thread gone by the end took its share of the window with
                // it; a counter that went down is a thread id reused by a
                // new thread. Either way the sum would be short.
                let lost = a
                    .iter()
                    .any(|(tid, &ns)| b.get(tid).is_none_or(|&n| n < ns));
                if lost {
                    Err("a thread exited during the window")
                } else {
                    // Threads born in the window count from zero.
                    Ok(b.iter()
                        .map(|(tid, &ns)| ns - a.get(tid).copied().unwrap_or(0))
                        .sum())
                }
            }
            _ => Err("no schedstat (kernel without CONFIG_SCHED_INFO, or unreadable)"),
        };
        match total {
            Ok(total_ns) => CpuWindow {
                total_ns,
                total_resolution_ns: 1,
                total_from_ticks: None,
                user_ticks,
                system_ticks,
                tick_ns,
            },
            Err(why) => CpuWindow {
                total_ns: (user_ticks + system_ticks) * tick_ns,
                total_resolution_ns: tick_ns,
                total_from_ticks: Some(why.into()),
                user_ticks,
                system_ticks,
                tick_ns,
            },
        }
    }

    pub fn user_ns(&self) -> u64 {
        self.user_ticks * self.tick_ns
    }

    pub fn system_ns(&self) -> u64 {
        self.system_ticks * self.tick_ns
    }
}

/// Reads `/proc/PID/stat`, `/proc/PID/statm` and the threads' schedstat.
pub fn sample(pid: u32) -> io::Result<ProcSample> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let rss_bytes = parse_statm(&statm, page_size()).ok_or_else(unparsable)?;
    Ok(ProcSample {
        rss_bytes,
        cpu: cpu(&[pid])?,
    })
}

/// The CPU time of `pids` together.
pub fn cpu(pids: &[u32]) -> io::Result<CpuReading> {
    let mut r = CpuReading {
        thread_ns: Some(BTreeMap::new()),
        ..Default::default()
    };
    for &pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let (user, system) = parse_stat(&stat).ok_or_else(unparsable)?;
        r.user_ticks += user;
        r.system_ticks += system;
        r.thread_ns = match (r.thread_ns, thread_ns(pid)) {
            (Some(mut all), Some(these)) => {
                all.extend(these);
                Some(all)
            }
            _ => None,
        };
    }
    Ok(r)
}

fn unparsable() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc entry")
}

/// Each live thread's on-CPU ns.
fn thread_ns(pid: u32) -> Option<BTreeMap<u32, u64>> {
    let mut out = BTreeMap::new();
    let mut kept = false;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let entry = entry.ok()?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let s = match std::fs::read_to_string(entry.path().join("schedstat")) {
            Ok(text) => parse_schedstat(&text)?,
            // Exited since the listing: it is not in this reading, so a
            // window that began with it sees it as gone.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                continue
            }
            Err(_) => return None,
        };
        kept |= s.timeslices > 0 || s.on_cpu_ns > 0;
        out.insert(tid, s.on_cpu_ns);
    }
    // Without CONFIG_SCHED_INFO every thread reads "0 0 0"; a single thread
    // not yet scheduled reads the same, so only all of them tell.
    kept.then_some(out)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// Length of the clock tick `stat` counts in, ns.
pub fn tick_ns() -> u64 {
    // SAFETY: as above.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / hz.max(1) as u64
}

/// utime and stime (ticks) from `/proc/PID/stat`. The second field (the
/// command) may contain spaces and parentheses, so fields are counted after
/// the last ')'.
pub fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3 overall, utime 14, stime 15.
    let utime = fields.get(14 - 3)?.parse().ok()?;
    let stime = fields.get(15 - 3)?.parse().ok()?;
    Some((utime, stime))
}

/// Resident bytes from `/proc/PID/statm` (second field, in pages).
pub fn parse_statm(statm: &str, page: u64) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page)
}

/// `/proc/.../schedstat`: three numbers on one line.
pub fn parse_schedstat(text: &str) -> Option<Schedstat> {
    let mut it = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let s = Schedstat {
        on_cpu_ns: it.next()??,
        run_delay_ns: it.next()??,
        timeslices: it.next()??,
    };
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_command_with_spaces_and_parens() {
        let stat = "1234 (shard (x) 1) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 3 0 100 1000000 2500 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((250, 75)));
        assert_eq!(
            parse_statm("250000 2500 300 100 0 5000 0", 4096),
            Some(2500 * 4096)
        );
        assert_eq!(parse_stat("1234 (x) S 1 2"), None);
    }

    #[test]
    fn parses_schedstat() {
        assert_eq!(
            parse_schedstat("35106999 47451224 39\n"),
            Some(Schedstat {
                on_cpu_ns: 35_106_999,
                run_delay_ns: 47_451_224,
                timeslices: 39
            })
        );
        assert_eq!(parse_schedstat("12 x 3"), None);
        assert_eq!(parse_schedstat("12 3"), None);
    }

    fn reading(user: u64, system: u64, threads: Option<&[(u32, u64)]>) -> CpuReading {
        CpuReading {
            user_ticks: user,
            system_ticks: system,
            thread_ns: threads.map(|t| t.iter().copied().collect()),
        }
    }

    #[test]
    fn window_sums_threads_in_nanoseconds() {
        let tick = 10_000_000;
        let a = reading(10, 20, Some(&[(1, 1_000), (2, 5_000)]));
        // Thread 3 was born in the window: all of its time counts.
        let b = reading(11, 22, Some(&[(1, 1_500), (2, 9_000), (3, 250)]));
        let w = CpuWindow::between(&a, &b, tick);
        assert_eq!(w.total_ns, 500 + 4_000 + 250);
        assert_eq!(w.total_resolution_ns, 1);
        assert_eq!(w.total_from_ticks, None);
        assert_eq!((w.user_ticks, w.system_ticks), (1, 2));
        assert_eq!((w.user_ns(), w.system_ns()), (tick, 2 * tick));
    }

    #[test]
    fn window_falls_back_to_ticks_when_a_thread_exits_or_schedstat_is_missing() {
        let tick = 10_000_000;
        let a = reading(10, 20, Some(&[(1, 1_000), (2, 5_000)]));
        let gone = reading(13, 21, Some(&[(1, 9_000)]));
        let w = CpuWindow::between(&a, &gone, tick);
        assert_eq!(w.total_ns, 4 * tick);
        assert_eq!(w.total_resolution_ns, tick);
        assert!(w.total_from_ticks.unwrap().contains("exited"));
        // A reused thread id: its counter restarted.
        let reused = reading(13, 21, Some(&[(1, 9_000), (2, 10)]));
        assert!(CpuWindow::between(&a, &reused, tick)
            .total_from_ticks
            .is_some());
        let none = reading(13, 21, None);
        let w = CpuWindow::between(&a, &none, tick);
        assert!(w.total_from_ticks.unwrap().contains("no schedstat"));
    }

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
        assert!(tick_ns() > 0);
    }

    /// This thread's CPU time, ns, from the clock (not from /proc).
    fn thread_cpu_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the local struct.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    #[test]
    fn own_schedstat_grows_after_a_busy_loop() {
        // /proc/self/schedstat is the main thread's; this test runs on a
        // harness thread, whose line is /proc/thread-self/schedstat. The
        // process total (what the bench reads of a server) sums all of them.
        let own = || {
            parse_schedstat(&std::fs::read_to_string("/proc/thread-self/schedstat").unwrap())
                .unwrap()
                .on_cpu_ns
        };
        assert!(
            parse_schedstat(&std::fs::read_to_string("/proc/self/schedstat").unwrap()).is_some()
        );
        let (t0, p0) = (own(), cpu(&[std::process::id()]).unwrap());
        // Spin for 20 ms of this thread's CPU time, however long a busy
        // host makes that take.
        const BUSY_NS: u64 = 20_000_000;
        let start = thread_cpu_ns();
        let mut x = 0u64;
        while thread_cpu_ns() - start < BUSY_NS {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        // Being scheduled out brings the counter up to date.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let (t1, p1) = (own(), cpu(&[std::process::id()]).unwrap());
        assert!(t1 >= t0 + BUSY_NS, "{t0} → {t1}");
        // The process total holds the spin too (give or take the scheduler
        // tick by which a running thread's count can lag), unless another
        // test's thread exited meanwhile and it fell back to ticks.
        let w = CpuWindow::between(&p0, &p1, tick_ns());
        if w.total_from_ticks.is_none() {
            assert!(w.total_ns >= BUSY_NS / 2, "{w:?}");
        }
    }
}
