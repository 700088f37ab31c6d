//! systemd integration without libsystemd: service notifications
//! (`sd_notify`) and socket activation (`sd_listen_fds`).
//!
//! The unit (`systemd/shardcast.service`) is `Type=notify` with a watchdog,
//! so the server tells systemd three things over `$NOTIFY_SOCKET`:
//!
//! - [`READY`] once every shard accepts: `systemctl start` returns and
//!   dependent units start only when connections are really served;
//! - [`WATCHDOG`] every [`watchdog_interval`] while the shards make
//!   progress, so a wedged event loop gets the process restarted;
//! - [`STOPPING`] when SIGTERM starts the drain, so `systemctl status`
//!   shows "deactivating" instead of a healthy service that stopped
//!   answering.
//!
//! With `systemd/shardcast.socket`, systemd binds the listening sockets and
//! passes them to the process ([`listen_fds`]); they survive restarts, so
//! clients connecting during a restart wait in the accept queue instead of
//! being refused.
//!
//! Everything here is a no-op when the process does not run under systemd:
//! [`notify`] returns `Ok(false)` and [`listen_fds`] an empty list.
//!
//! What systemd passes in the environment (`WATCHDOG_*`, `LISTEN_*`) is read
//! by the `sd-notify` crate. Sending a notification stays here (one
//! datagram, see `sd_notify(3)`): sd-notify 0.5 connects to
//! `$NOTIFY_SOCKET` as a file-system path, so a `@name` abstract socket,
//! which the protocol allows and some containers use, fails with `ENOENT`.
//! So does checking an inherited descriptor before it becomes a listener
//! ([`tcp_listener`]), which sd-notify does not do.

// Inherited descriptors taken as owned, sd-notify's call that unsets the
// environment, getsockopt: each block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The service is up: every shard accepts connections.
pub const READY: &str = "READY=1";
/// The service begins its shutdown (the drain).
pub const STOPPING: &str = "STOPPING=1";
/// Keep-alive ping for `WatchdogSec=`.
pub const WATCHDOG: &str = "WATCHDOG=1";

/// Variable holding the notification socket's address.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// Watchdog period in microseconds, set when the unit has `WatchdogSec=`.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// Process the watchdog period is meant for, when set.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";
/// Process the passed sockets are meant for.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// How many sockets were passed, starting at [`LISTEN_FDS_START`].
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// Colon-separated names of the passed sockets (`FileDescriptorName=`).
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// First passed descriptor: 0, 1 and 2 stay stdin, stdout and stderr.
pub const LISTEN_FDS_START: RawFd = 3;

/// A `STATUS=` line: free text that `systemctl status` shows, e.g.
/// `"draining 1200 connections"`. Newlines would start a new assignment,
/// so they become spaces.
pub fn status(text: &str) -> String {
    format!("STATUS={}", text.replace('\n', " "))
}

/// An `EXTEND_TIMEOUT_USEC=` line: asks systemd to wait `extra` longer
/// than the current start or stop timeout, from now. A drain that needs
/// more than `TimeoutStopSec=` can send this instead of being killed.
pub fn extend_timeout(extra: Duration) -> String {
    format!("EXTEND_TIMEOUT_USEC={}", extra.as_micros())
}

/// Sends `state` (one or more `KEY=VALUE` lines, e.g. [`READY`]) to the
/// socket named by `$NOTIFY_SOCKET`.
///
/// Returns `Ok(false)` when the variable is unset: the process is not a
/// `Type=notify` service (started by hand, in tests), and there is no one
/// to tell. The variable is left in place (unlike `sd_notify`'s
/// `unset_environment`), so the watchdog task can use it for the process's
/// whole life, and the environment is never mutated from a running thread.
/// Safe to call from any thread; each call opens its own socket.
pub fn notify(state: &str) -> io::Result<bool> {
    // Not sd_notify::notify: 0.5 cannot reach an `@` abstract socket.
    let Some(socket) = env_str(NOTIFY_SOCKET)? else {
        return Ok(false);
    };
    notify_to(&socket, state)?;
    Ok(true)
}

/// Sends `state` to the datagram socket at `socket`: an absolute path, or
/// `@name` for a socket in the abstract namespace (what systemd uses inside
/// some containers). Errors name the socket and the message.
pub fn notify_to(socket: &str, state: &str) -> io::Result<()> {
    let context = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot send {state:?} to {NOTIFY_SOCKET}={socket:?}: {e}"),
        )
    };
    let addr = notify_addr(socket).map_err(context)?;
    let sock = UnixDatagram::unbound().map_err(context)?;
    let sent = sock
        .send_to_addr(state.as_bytes(), &addr)
        .map_err(context)?;
    if sent != state.len() {
        // A datagram is sent whole or not at all; anything else is a bug
        // somewhere below us, and a partial READY=1 must not pass silently.
        return Err(context(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", state.len()),
        )));
    }
    Ok(())
}

/// Parses a `$NOTIFY_SOCKET` value into a socket address.
fn notify_addr(socket: &str) -> io::Result<SocketAddr> {
    if let Some(name) = socket.strip_prefix('@') {
        if name.is_empty() {
            return Err(invalid("'@' without an abstract socket name".into()));
        }
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(socket)
    } else {
        // systemd >= 253 can also hand out "vsock:CID:PORT" (for VMs); a
        // bare-metal service never gets one.
        Err(invalid(
            "neither an absolute path nor '@' and an abstract socket name".into(),
        ))
    }
}

/// The cadence at which to send [`WATCHDOG`]: half of `WatchdogSec=`, the
/// usual margin for a ping that may be late by a scheduling hiccup.
///
/// `None` when the unit has no watchdog, or when the period is meant for
/// another process (`WATCHDOG_PID` is set to a pid that is not ours, e.g.
/// a child that inherited the environment). The variables are read, not
/// removed, so the environment is never mutated from a running thread.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        // sd_watchdog_enabled(3) rejects a period of 0; sd-notify 0.5 returns it.
        .filter(|period| !period.is_zero())
        .map(|period| (period / 2).max(Duration::from_micros(1)))
}

/// [`watchdog_interval`], in the `Result` that callers log errors from.
///
/// Currently never an error: the variables are read by sd-notify, which
/// ignores a malformed `WATCHDOG_USEC` (no watchdog) and a malformed
/// `WATCHDOG_PID` (no pid restriction). systemd never sets either; the
/// `Result` stays so callers keep handling a failure should one appear.
pub fn try_watchdog_interval() -> io::Result<Option<Duration>> {
    Ok(watchdog_interval())
}

/// Takes the listening sockets systemd passed to this process (socket
/// activation, `systemd/shardcast.socket`), in the order of the socket
/// unit's `Listen*=` lines. Empty when none were passed.
///
/// Each descriptor is marked close-on-exec, so it does not leak into
/// anything the server spawns, and `LISTEN_PID`, `LISTEN_FDS` and
/// `LISTEN_FDNAMES` are removed from the environment, so a second call
/// (or a child process) cannot take the same descriptors again: the
/// returned [`OwnedFd`]s are the only owners.
///
/// **Call this at the very start of `main`, before any thread is
/// spawned.** Changing the environment while another thread may read it
/// (`getenv` inside libc, DNS resolution, another `env::var`) is undefined
/// behaviour; it is why `std::env::remove_var` is `unsafe` from Rust 2024
/// on. Taking the sockets first, then building the runtime, keeps that
/// window empty.
///
/// The descriptors are blocking, as systemd created them; hand each to
/// [`tcp_listener`], which checks it and makes it non-blocking.
pub fn listen_fds() -> io::Result<Vec<OwnedFd>> {
    Ok(listen_fds_with_names()?
        .into_iter()
        .map(|(fd, _)| fd)
        .collect())
}

/// Like [`listen_fds`], with each socket's `FileDescriptorName=`
/// (`"unknown"` when the socket unit set none, as in `sd_listen_fds(3)`).
/// The same rule applies: call it before spawning threads.
///
/// As `sd_listen_fds(3)`: nothing when `LISTEN_PID` is unset or names
/// another process (the variables were inherited, not meant for us);
/// otherwise `LISTEN_FDS` descriptors from [`LISTEN_FDS_START`] on. A
/// malformed value, a name list whose length differs from the count, or a
/// descriptor that is not open is an error showing the three variables.
pub fn listen_fds_with_names() -> io::Result<Vec<(OwnedFd, String)>> {
    // sd-notify's errors say "invalid LISTEN_FDS", not what it held.
    let seen = describe_env(&[LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES]);
    let foreign = matches!(
        std::env::var(LISTEN_PID).map(|pid| pid.parse::<u32>()),
        Ok(Ok(pid)) if pid != std::process::id()
    );
    // SAFETY: this removes the three variables whatever the outcome (like
    // sd_listen_fds(unset_environment=1): even a malformed or foreign set
    // must not reach a child process), which is sound only while no other
    // thread reads the environment: the caller's contract, see above.
    let passed = match unsafe { sd_notify::listen_fds_with_names_and_unset_env() } {
        // sd-notify 0.5 checks LISTEN_FDNAMES even when LISTEN_PID is another
        // process's (then it has touched no descriptor); libsystemd returns 0.
        Err(_) if foreign => return Ok(Vec::new()),
        passed => passed.map_err(|e| io::Error::new(e.kind(), format!("{e} ({seen})")))?,
    };
    Ok(passed
        .map(|(fd, name)| {
            // SAFETY: systemd passed `fd` to this process for it to own,
            // and sd-notify just set close-on-exec on it, so it is open
            // (F_GETFD fails on a closed descriptor). Nothing else in the
            // process claims descriptors from LISTEN_FDS: the variables are
            // gone now, so this is the only time they are handed out.
            (unsafe { OwnedFd::from_raw_fd(fd) }, name)
        })
        .collect())
}

/// `KEY="value"` (or `KEY unset`) for each of `keys`, for error messages.
fn describe_env(keys: &[&str]) -> String {
    keys.iter()
        .map(|key| match std::env::var_os(key) {
            Some(value) => format!("{key}={value:?}"),
            None => format!("{key} unset"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Turns a passed descriptor into a listener a shard can accept on:
/// checks that it is a listening TCP socket (a socket unit with a typo,
/// `ListenDatagram=` say, must fail at start, not at the first accept) and
/// makes it non-blocking, which the epoll driver needs (a blocking listener
/// would stall the whole shard in `accept`).
pub fn tcp_listener(fd: OwnedFd) -> io::Result<TcpListener> {
    let raw = fd.as_raw_fd();
    let context = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket activation: fd {raw} is not a listening TCP socket: {what}"),
        )
    };
    let wrap = |e: io::Error| io::Error::new(e.kind(), format!("socket activation: fd {raw}: {e}"));
    let domain = sockopt_int(fd.as_fd(), libc::SO_DOMAIN).map_err(wrap)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(context(format!("address family {domain}")));
    }
    let ty = sockopt_int(fd.as_fd(), libc::SO_TYPE).map_err(wrap)?;
    if ty != libc::SOCK_STREAM {
        return Err(context(format!("socket type {ty}")));
    }
    if sockopt_int(fd.as_fd(), libc::SO_ACCEPTCONN).map_err(wrap)? == 0 {
        return Err(context("it is not listening".into()));
    }
    let listener = TcpListener::from(fd);
    listener.set_nonblocking(true).map_err(wrap)?;
    Ok(listener)
}

fn sockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the size passed,
    // and `fd` is a live descriptor for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// An environment variable as UTF-8, `None` when unset. Every variable
/// read here is ASCII when systemd sets it; anything else is an error
/// rather than a silently ignored value.
fn env_str(key: &str) -> io::Result<Option<String>> {
    match std::env::var_os(key) {
        None => Ok(None),
        Some(value) => value
            .into_string()
            .map(Some)
            .map_err(|v| invalid(format!("{key}={v:?} is not UTF-8"))),
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn status_and_extend_timeout_lines() {
        assert_eq!(status("draining\n12 left"), "STATUS=draining 12 left");
        assert_eq!(
            extend_timeout(Duration::from_millis(1500)),
            "EXTEND_TIMEOUT_USEC=1500000"
        );
    }

    #[test]
    fn notify_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("shardcast-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let msg = format!("{READY}\n{}", status("serving"));
        notify_to(path.to_str().unwrap(), &msg).unwrap();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], msg.as_bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notify_to_an_abstract_socket() {
        let name = format!("shardcast-sd-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), WATCHDOG).unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], WATCHDOG.as_bytes());
    }

    #[test]
    fn notify_to_errors_name_socket_and_message() {
        let err = notify_to("/nonexistent/shardcast/notify.sock", STOPPING).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/shardcast/notify.sock"), "{msg}");
        assert!(msg.contains("STOPPING=1"), "{msg}");

        for bad in ["relative/notify.sock", "@", "", "vsock:2:1234"] {
            let err = notify_to(bad, READY).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
    }

    #[test]
    fn notify_without_notify_socket_is_false() {
        // The test harness never runs under a notify-type unit; if it ever
        // does, the variable is set and this says nothing.
        if std::env::var_os(NOTIFY_SOCKET).is_none() {
            assert!(!notify(READY).unwrap());
        }
    }

    #[test]
    fn tcp_listener_accepts_a_listening_socket_and_makes_it_nonblocking() {
        let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_listener.local_addr().unwrap();
        let fd: OwnedFd = std_listener.into();
        let listener = tcp_listener(fd).unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        // Non-blocking: no pending connection is WouldBlock, not a hang.
        assert_eq!(
            listener.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn tcp_listener_rejects_other_sockets() {
        let udp: OwnedFd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into();
        let err = tcp_listener(udp).unwrap_err();
        assert!(err.to_string().contains("socket type"), "{err}");

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = tcp_listener(OwnedFd::from(a)).unwrap_err();
        assert!(err.to_string().contains("address family"), "{err}");

        // A bound but not listening TCP socket.
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0);
        // SAFETY: `raw` was just created and is owned by nothing else.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let err = tcp_listener(sock).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
    }

    /// Set, to its argument, in the copy of this test binary that
    /// [`run_child`] starts; the `*_child` tests do nothing without it.
    const CHILD_MARK: &str = "SHARDCAST_SD_TEST_CHILD";

    /// Runs `test`, one of this module's `*_child` tests, alone in a copy of
    /// this test binary with [`CHILD_MARK`] set to `arg`; fails unless it
    /// passed.
    ///
    /// The environment-reading functions are tested this way because the
    /// child sets variables and takes descriptors, which is sound only where
    /// no other thread runs: the child runs that one test
    /// (`--test-threads=1`), while this process runs many tests at once and
    /// never edits its environment.
    ///
    /// With `passed`, those listening sockets are handed over as systemd
    /// does: at fds 3, 4, … without close-on-exec, `LISTEN_FDS` and
    /// `LISTEN_FDNAMES` = `names` set, and `LISTEN_PID` set to the child's
    /// own pid by `sh`, which then execs the binary under that pid.
    fn run_child(test: &str, arg: &str, passed: &[RawFd], names: &str) {
        // Test names leave out the crate: "systemd::tests::…" wherever the
        // module is declared.
        let module = module_path!().split_once("::").map_or("", |(_, m)| m);
        let exe = std::env::current_exe().unwrap();
        let mut cmd = if passed.is_empty() {
            Command::new(exe)
        } else {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(format!(
                    "export LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={names}; exec \"$0\" \"$@\"",
                    passed.len()
                ))
                .arg(exe);
            let mut fds: [RawFd; 4] = [-1; 4];
            fds[..passed.len()].copy_from_slice(passed);
            let n = passed.len();
            // SAFETY: fcntl and dup2 are async-signal-safe and nothing here
            // allocates. The listeners are first copied out of the way
            // (close-on-exec copies at 64 and up, so moving one cannot
            // overwrite another still to be moved), then put at 3, 4, …,
            // where dup2 leaves them open across exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut high: [RawFd; 4] = [-1; 4];
                    for (h, &fd) in high.iter_mut().zip(&fds[..n]) {
                        *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64);
                        if *h < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    for (target, &h) in (LISTEN_FDS_START..).zip(&high[..n]) {
                        if libc::dup2(h, target) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            cmd
        };
        for key in [
            LISTEN_PID,
            LISTEN_FDS,
            LISTEN_FDNAMES,
            WATCHDOG_USEC,
            WATCHDOG_PID,
        ] {
            cmd.env_remove(key);
        }
        let child_test = format!("{module}::{test}");
        let out = cmd
            .args(["--exact", &child_test, "--test-threads=1", "--nocapture"])
            .env(CHILD_MARK, arg)
            .output()
            .unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed:\n{report}");
        assert!(report.contains("1 passed"), "child ran no test:\n{report}");
    }

    /// Sets (or, for `None`, removes) each variable. Only in a `*_child`
    /// test: see [`run_child`].
    fn set_env(vars: &[(&str, Option<&str>)]) {
        for &(key, value) in vars {
            match value {
                Some(value) => std::env::set_var(key, value),
                None => std::env::remove_var(key),
            }
        }
    }

    #[test]
    fn watchdog_from_the_environment() {
        run_child("watchdog_env_child", "", &[], "");
    }

    /// The child half of [`watchdog_from_the_environment`]; does nothing in
    /// a normal test run.
    #[test]
    fn watchdog_env_child() {
        if std::env::var_os(CHILD_MARK).is_none() {
            return;
        }
        let ours = std::process::id().to_string();
        let other = (std::process::id() + 1).to_string();
        let half = Some(Duration::from_secs(5));
        for (usec, pid, want) in [
            // No watchdog, or a period of 0 (as sd_watchdog_enabled(3)).
            (None, None, None),
            (None, Some(ours.as_str()), None),
            (Some("0"), None, None),
            // Half the period, whether or not WATCHDOG_PID names us.
            (Some("10000000"), None, half),
            (Some("10000000"), Some(ours.as_str()), half),
            // A 1 µs period still yields a usable (non-zero) interval.
            (Some("1"), None, Some(Duration::from_micros(1))),
            // Meant for another process (a parent that kept its variables).
            (Some("10000000"), Some(other.as_str()), None),
        ] {
            set_env(&[(WATCHDOG_USEC, usec), (WATCHDOG_PID, pid)]);
            assert_eq!(try_watchdog_interval().unwrap(), want, "{usec:?} {pid:?}");
            assert_eq!(watchdog_interval(), want, "{usec:?} {pid:?}");
            // Read, not taken: the environment is left as it was.
            assert_eq!(std::env::var(WATCHDOG_USEC).ok().as_deref(), usec);
            assert_eq!(std::env::var(WATCHDOG_PID).ok().as_deref(), pid);
        }
        // A malformed period never yields pings (sd-notify ignores it).
        for usec in ["ten", "-5", "", "1e6"] {
            set_env(&[(WATCHDOG_USEC, Some(usec)), (WATCHDOG_PID, None)]);
            assert!(!matches!(try_watchdog_interval(), Ok(Some(_))), "{usec:?}");
        }
    }

    #[test]
    fn listen_fds_from_the_environment() {
        run_child("listen_fds_env_child", "", &[], "");
    }

    /// The child half of [`listen_fds_from_the_environment`]: absent,
    /// foreign and malformed variables (the real handover is
    /// [`socket_activation_end_to_end`]); does nothing in a normal test run.
    #[test]
    fn listen_fds_env_child() {
        if std::env::var_os(CHILD_MARK).is_none() {
            return;
        }
        let ours = std::process::id().to_string();
        let ours = Some(ours.as_str());
        let other = (std::process::id() + 1).to_string();
        let gone = || {
            for key in [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES] {
                assert!(std::env::var_os(key).is_none(), "{key} still set");
            }
        };
        // Nothing passed, or passed to another process: empty, no error.
        for (pid, fds, names) in [
            (None, None, None),
            (None, Some("2"), None),
            // systemd sets names with the count, so a foreign set has them.
            (Some(other.as_str()), Some("2"), Some("a:b")),
            (ours, None, None),
            (ours, Some("0"), None),
        ] {
            set_env(&[
                (LISTEN_PID, pid),
                (LISTEN_FDS, fds),
                (LISTEN_FDNAMES, names),
            ]);
            let got = listen_fds_with_names().unwrap();
            assert!(got.is_empty(), "{pid:?} {fds:?} {names:?}: {got:?}");
            gone();
        }
        // Malformed: an error that shows what the variables held, and the
        // variables are gone all the same.
        for (pid, fds, names) in [
            (Some("seven"), Some("1"), None),
            (Some(""), Some("1"), None),
            (ours, Some("one"), None),
            (ours, Some("-1"), None),
            (ours, Some("2147483647"), None),
            (ours, Some("1"), Some("a:b")),
            (ours, Some("0"), Some("a")),
        ] {
            set_env(&[
                (LISTEN_PID, pid),
                (LISTEN_FDS, fds),
                (LISTEN_FDNAMES, names),
            ]);
            let err = listen_fds_with_names().unwrap_err();
            let msg = err.to_string();
            let shown = format!("{LISTEN_FDS}={:?}", fds.unwrap());
            assert!(msg.contains(&shown), "{pid:?} {fds:?} {names:?}: {msg}");
            gone();
        }
    }

    /// Socket activation for real: this test binary is re-run with two
    /// listening sockets at fds 3 and 4 and LISTEN_PID set to the child's
    /// own pid, as systemd does. The child takes the sockets, checks them,
    /// and reports through its exit status.
    #[test]
    fn socket_activation_end_to_end() {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let second = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = format!(
            "{},{}",
            first.local_addr().unwrap(),
            second.local_addr().unwrap()
        );
        run_child(
            "socket_activation_child",
            &addrs,
            &[first.as_raw_fd(), second.as_raw_fd()],
            "shardcast:admin",
        );
        // The child took the sockets and accepted on them; ours are the
        // same sockets (shared, not re-bound) and close only now.
        drop((first, second));
    }

    /// The child half of [`socket_activation_end_to_end`]; does nothing in
    /// a normal test run.
    #[test]
    fn socket_activation_child() {
        let Some(expected) = std::env::var_os(CHILD_MARK) else {
            return;
        };
        let expected: Vec<std::net::SocketAddr> = expected
            .to_str()
            .unwrap()
            .split(',')
            .map(|a| a.parse().unwrap())
            .collect();
        // This process runs this one test (--test-threads=1) and no other
        // thread reads the environment.
        let fds = listen_fds_with_names().unwrap();
        let names: Vec<&str> = fds.iter().map(|(_, name)| name.as_str()).collect();
        assert_eq!(names, ["shardcast", "admin"]);
        for key in [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES] {
            assert!(std::env::var_os(key).is_none(), "{key} still set");
        }
        // A second call finds nothing: the descriptors have one owner.
        assert!(listen_fds().unwrap().is_empty());

        for ((raw, (fd, _)), expected) in (LISTEN_FDS_START..).zip(fds).zip(expected) {
            assert_eq!(fd.as_raw_fd(), raw);
            // SAFETY: reads the flags of an fd we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert!(
                flags & libc::FD_CLOEXEC != 0,
                "fd {raw}: close-on-exec not set"
            );
            let listener = tcp_listener(fd).unwrap();
            assert_eq!(listener.local_addr().unwrap(), expected);
            let client = std::net::TcpStream::connect(expected).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let (accepted, peer) = loop {
                match listener.accept() {
                    Ok(conn) => break conn,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < deadline, "accept timed out");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            assert_eq!(peer, client.local_addr().unwrap());
            drop(accepted);
        }
    }
}
