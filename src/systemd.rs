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
//! [`notify`] returns `Ok(false)` and [`listen_fds`] an empty list. The
//! protocol is small and stable (see `sd_notify(3)` and
//! `sd_listen_fds(3)`), so it is spoken directly rather than through a C
//! library or a crate.

// sd_notify over a Unix datagram socket, inherited descriptors, fcntl:
// libc calls, each block says why it is sound.
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
/// `None` when the unit has no watchdog, when the period is meant for
/// another process (`WATCHDOG_PID` is set to a pid that is not ours, e.g.
/// a child that inherited the environment), or when the variables are
/// malformed; use [`try_watchdog_interval`] to log the latter.
pub fn watchdog_interval() -> Option<Duration> {
    try_watchdog_interval().ok().flatten()
}

/// Like [`watchdog_interval`], but a malformed `WATCHDOG_USEC` or
/// `WATCHDOG_PID` is an error: systemd will kill a service that expected
/// to be pinged and was not, so the caller should say why it is not
/// pinging.
pub fn try_watchdog_interval() -> io::Result<Option<Duration>> {
    parse_watchdog(
        env_str(WATCHDOG_USEC)?.as_deref(),
        env_str(WATCHDOG_PID)?.as_deref(),
        std::process::id(),
    )
}

/// The pure part of [`try_watchdog_interval`]: the ping cadence for the
/// values of `WATCHDOG_USEC` and `WATCHDOG_PID`, as seen by process
/// `our_pid`.
pub fn parse_watchdog(
    usec: Option<&str>,
    pid: Option<&str>,
    our_pid: u32,
) -> io::Result<Option<Duration>> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    let period: u64 = usec
        .parse()
        .map_err(|e| invalid(format!("{WATCHDOG_USEC}={usec:?} is not a number: {e}")))?;
    if let Some(pid) = pid {
        let pid: u32 = pid
            .parse()
            .map_err(|e| invalid(format!("{WATCHDOG_PID}={pid:?} is not a pid: {e}")))?;
        if pid != our_pid {
            return Ok(None);
        }
    }
    if period == 0 {
        // sd_watchdog_enabled treats 0 as "no watchdog".
        return Ok(None);
    }
    Ok(Some(Duration::from_micros((period / 2).max(1))))
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
pub fn listen_fds_with_names() -> io::Result<Vec<(OwnedFd, String)>> {
    let pid = env_str(LISTEN_PID);
    let fds = env_str(LISTEN_FDS);
    let names = env_str(LISTEN_FDNAMES);
    // Unset whatever happens next, like sd_listen_fds(unset_environment=1):
    // even a malformed or foreign set must not reach a child process.
    for key in [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES] {
        // Sound only while no other thread runs: see the doc comment.
        std::env::remove_var(key);
    }
    let passed = parse_listen_fds(
        pid?.as_deref(),
        fds?.as_deref(),
        names?.as_deref(),
        std::process::id(),
    )?;
    let mut out = Vec::with_capacity(passed.len());
    for (fd, name) in passed {
        set_cloexec(fd).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("socket activation: fd {fd} ({name}) from {LISTEN_FDS}: {e}"),
            )
        })?;
        // SAFETY: systemd passed `fd` to this process for it to own, and
        // set_cloexec just showed it is open. Nothing else in the process
        // claims descriptors from LISTEN_FDS: the variables are gone now,
        // so this is the only time they are handed out.
        out.push((unsafe { OwnedFd::from_raw_fd(fd) }, name));
    }
    Ok(out)
}

/// The pure part of [`listen_fds_with_names`]: which descriptors the
/// values of `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` hand to
/// process `our_pid`, with their names.
///
/// As `sd_listen_fds(3)`: nothing when `LISTEN_PID` is unset or names
/// another process (the variables were inherited, not meant for us);
/// otherwise `LISTEN_FDS` descriptors from 3 on. A malformed value, or a
/// name list whose length differs from the count, is an error.
pub fn parse_listen_fds(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    our_pid: u32,
) -> io::Result<Vec<(RawFd, String)>> {
    let Some(pid) = pid else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .parse()
        .map_err(|e| invalid(format!("{LISTEN_PID}={pid:?} is not a pid: {e}")))?;
    if pid != our_pid {
        return Ok(Vec::new());
    }
    let Some(fds) = fds else {
        return Ok(Vec::new());
    };
    let count: RawFd = fds
        .parse()
        .ok()
        .filter(|n: &RawFd| (0..=RawFd::MAX - LISTEN_FDS_START).contains(n))
        .ok_or_else(|| invalid(format!("{LISTEN_FDS}={fds:?} is not a descriptor count")))?;
    let names: Vec<String> = match names {
        Some(list) => {
            let names: Vec<String> = if count == 0 && list.is_empty() {
                Vec::new()
            } else {
                list.split(':').map(str::to_owned).collect()
            };
            if names.len() != count as usize {
                return Err(invalid(format!(
                    "{LISTEN_FDNAMES}={list:?} names {} sockets, {LISTEN_FDS}={count}",
                    names.len()
                )));
            }
            names
        }
        None => vec!["unknown".to_owned(); count as usize],
    };
    Ok((LISTEN_FDS_START..LISTEN_FDS_START + count)
        .zip(names)
        .collect())
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

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only read and write the descriptor's flags;
    // an fd that is not open yields EBADF, which is reported.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::FD_CLOEXEC == 0
            && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
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
    fn watchdog_absent_or_zero_is_off() {
        assert_eq!(parse_watchdog(None, None, 10).unwrap(), None);
        assert_eq!(parse_watchdog(None, Some("10"), 10).unwrap(), None);
        assert_eq!(parse_watchdog(Some("0"), None, 10).unwrap(), None);
    }

    #[test]
    fn watchdog_pings_at_half_the_period() {
        assert_eq!(
            parse_watchdog(Some("10000000"), None, 10).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_watchdog(Some("10000000"), Some("10"), 10).unwrap(),
            Some(Duration::from_secs(5))
        );
        // A 1 µs period still yields a usable (non-zero) interval.
        assert_eq!(
            parse_watchdog(Some("1"), None, 10).unwrap(),
            Some(Duration::from_micros(1))
        );
    }

    #[test]
    fn watchdog_for_another_pid_is_not_ours() {
        assert_eq!(
            parse_watchdog(Some("10000000"), Some("11"), 10).unwrap(),
            None
        );
    }

    #[test]
    fn watchdog_malformed_values_are_errors_naming_the_variable() {
        for (usec, pid) in [
            (Some("ten"), None),
            (Some("-5"), None),
            (Some(""), None),
            (Some("10000000"), Some("pid")),
            (Some("10000000"), Some("")),
        ] {
            let err = parse_watchdog(usec, pid, 10).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let msg = err.to_string();
            assert!(msg.contains("WATCHDOG_"), "{msg}");
        }
    }

    #[test]
    fn listen_fds_absent_or_foreign_is_empty() {
        assert!(parse_listen_fds(None, None, None, 7).unwrap().is_empty());
        assert!(parse_listen_fds(None, Some("2"), None, 7)
            .unwrap()
            .is_empty());
        assert!(parse_listen_fds(Some("8"), Some("2"), None, 7)
            .unwrap()
            .is_empty());
        assert!(parse_listen_fds(Some("7"), None, None, 7)
            .unwrap()
            .is_empty());
        assert!(parse_listen_fds(Some("7"), Some("0"), None, 7)
            .unwrap()
            .is_empty());
        assert!(parse_listen_fds(Some("7"), Some("0"), Some(""), 7)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn listen_fds_start_at_three_with_names() {
        assert_eq!(
            parse_listen_fds(Some("7"), Some("2"), None, 7).unwrap(),
            vec![(3, "unknown".to_owned()), (4, "unknown".to_owned())]
        );
        assert_eq!(
            parse_listen_fds(Some("7"), Some("3"), Some("shardcast:shardcast:admin"), 7).unwrap(),
            vec![
                (3, "shardcast".to_owned()),
                (4, "shardcast".to_owned()),
                (5, "admin".to_owned())
            ]
        );
        // An empty name is a name (a socket unit without one, among named).
        assert_eq!(
            parse_listen_fds(Some("7"), Some("2"), Some(":x"), 7).unwrap(),
            vec![(3, String::new()), (4, "x".to_owned())]
        );
    }

    #[test]
    fn listen_fds_malformed_values_are_errors() {
        for (pid, fds, names) in [
            (Some("seven"), Some("1"), None),
            (Some(""), Some("1"), None),
            (Some("7"), Some("one"), None),
            (Some("7"), Some("-1"), None),
            (Some("7"), Some("2147483647"), None),
            (Some("7"), Some("2"), Some("only-one")),
            (Some("7"), Some("1"), Some("a:b")),
            (Some("7"), Some("0"), Some("a")),
        ] {
            let err = parse_listen_fds(pid, fds, names, 7).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidData,
                "{pid:?} {fds:?} {names:?}"
            );
            assert!(err.to_string().contains("LISTEN_"), "{err}");
        }
    }

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

    /// Set by [`socket_activation_end_to_end`] for the copy of this test
    /// binary it starts the way systemd would.
    const CHILD_MARK: &str = "SHARDCAST_SD_TEST_CHILD_ADDR";

    /// Socket activation for real: this test binary is re-run with a
    /// listening socket at fd 3 and LISTEN_PID set to the child's own pid
    /// (by `sh`, which then execs the binary under the same pid), as
    /// systemd does. The child takes the socket, checks it, and reports
    /// through its exit status. A separate process, because taking fds and
    /// removing variables in the shared test process would be unsound.
    #[test]
    fn socket_activation_end_to_end() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = listener.as_fd().as_raw_fd();
        // Test names leave out the crate: "systemd::tests::…" wherever the
        // module is declared.
        let module = module_path!().split_once("::").map_or("", |(_, m)| m);
        let child_test = format!("{module}::socket_activation_child");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=shardcast; exec \"$0\" \"$@\"")
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", &child_test, "--test-threads=1", "--nocapture"])
            .env(CHILD_MARK, addr.to_string());
        // SAFETY: dup2 and fcntl are async-signal-safe; they put the
        // listener at fd 3 in the child without close-on-exec (dup2 onto
        // itself would keep the flag, hence the fcntl) and touch nothing
        // else.
        unsafe {
            cmd.pre_exec(move || {
                let rc = if fd == LISTEN_FDS_START {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, LISTEN_FDS_START)
                };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed:\n{report}");
        assert!(report.contains("1 passed"), "child ran no test:\n{report}");
        // The child took the socket and accepted on it; our copy still
        // works too (it is the same socket), so the listener was shared,
        // not re-bound.
        drop(listener);
    }

    /// The child half of [`socket_activation_end_to_end`]; does nothing in
    /// a normal test run.
    #[test]
    fn socket_activation_child() {
        let Some(expected) = std::env::var_os(CHILD_MARK) else {
            return;
        };
        let expected: std::net::SocketAddr = expected.to_str().unwrap().parse().unwrap();
        // This process runs this one test (--test-threads=1) and no other
        // thread reads the environment.
        let fds = listen_fds_with_names().unwrap();
        assert_eq!(fds.len(), 1);
        let (fd, name) = fds.into_iter().next().unwrap();
        assert_eq!(fd.as_raw_fd(), LISTEN_FDS_START);
        assert_eq!(name, "shardcast");
        // SAFETY: reads the flags of an fd we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0, "close-on-exec not set");
        for key in [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES] {
            assert!(std::env::var_os(key).is_none(), "{key} still set");
        }
        // A second call finds nothing: the descriptors have one owner.
        assert!(listen_fds().unwrap().is_empty());

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
