//! What the daemon says to, and takes from, systemd: the listening socket
//! of socket activation (`LISTEN_FDS`/`LISTEN_PID`) and the notifications
//! of `Type=notify` services (`READY=1`, `STOPPING=1`, `WATCHDOG=1`,
//! `STATUS=`). Outside systemd every call here is a no-op.

use std::net::TcpListener;
use std::time::Duration;

use sd_notify::NotifyState;

/// The public listener systemd passed (socket activation), if it did.
/// It must be a TCP listening socket; anything else is an error.
pub fn passed_listener() -> std::io::Result<Option<TcpListener>> {
    // sd_listen_fds(3): the sockets are this process's only when LISTEN_PID
    // names it. listenfd takes LISTEN_FDS alone when LISTEN_PID is unset,
    // as a variable inherited from a socket-activated parent would be.
    let for_this_process = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    if !for_this_process {
        if std::env::var_os("LISTEN_FDS").is_some() {
            tracing::warn!(
                "LISTEN_FDS is set but LISTEN_PID does not name this process: not taking the sockets"
            );
        }
        return Ok(None);
    }
    let mut passed = listenfd::ListenFd::from_env();
    if passed.len() == 0 {
        return Ok(None);
    }
    if passed.len() > 1 {
        tracing::warn!(
            count = passed.len(),
            "systemd passed several sockets; serving the first"
        );
    }
    passed.take_tcp_listener(0)
}

/// Sends a notification; failures are logged, never fatal (the service
/// manager may have gone, or the daemon runs outside systemd).
fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "sd_notify failed");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with the monotonic time systemd matches it by, as
/// sd_notify(3) asks of a reload; [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(error) => tracing::debug!(%error, "cannot read the monotonic clock for RELOADING=1"),
    }
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// `STATUS=` alone, for `systemctl status`.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// `WATCHDOG=1`.
pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, when systemd
/// set one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}
