//! CPU time of each side of a run, read from `/proc`: the server's (with
//! its child processes, nginx's workers), the counter's, and the load
//! generator's (this process, and with `--http2` the h2load it ran and
//! waited for). Taken at both edges of the measured window,
//! it gives the server's CPU per request and tells which side was the
//! bottleneck: a row where the load side ran out of CPU while the server
//! still had some measures the load side, not the server.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::layout::CpuList;

/// CPU time used so far by each side, at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    server: Option<Duration>,
    counter: Option<Duration>,
    load: Option<Duration>,
}

impl Sample {
    /// Reads the server's and the counter's process trees (where known)
    /// and this process with the children it has waited for: an h2load
    /// that exits inside the window is counted at its end, all of it, as
    /// the load side (one still running at its start is not yet counted).
    pub fn take(server: Option<u32>, counter: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            server: server.and_then(process_tree),
            counter: counter.and_then(process_tree),
            load: process_and_waited_children(std::process::id()),
        }
    }
}

/// CPU seconds each side used over one measured window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub window_s: f64,
    pub server_s: Option<f64>,
    pub counter_s: Option<f64>,
    pub load_s: Option<f64>,
}

impl Usage {
    pub fn between(start: &Sample, end: &Sample) -> Self {
        let spent =
            |a: Option<Duration>, b: Option<Duration>| Some(b?.checked_sub(a?)?.as_secs_f64());
        Self {
            window_s: end.at.duration_since(start.at).as_secs_f64(),
            server_s: spent(start.server, end.server),
            counter_s: spent(start.counter, end.counter),
            load_s: spent(start.load, end.load),
        }
    }

    /// The fraction of `cpus` that `seconds` kept busy over the window.
    pub fn busy(&self, seconds: Option<f64>, cpus: &CpuList) -> Option<f64> {
        (self.window_s > 0.0 && !cpus.is_empty())
            .then(|| seconds.map(|s| s / (self.window_s * cpus.len() as f64)))
            .flatten()
    }
}

/// Clock ticks per second, the unit of `/proc/PID/stat`'s CPU times.
fn ticks_per_second() -> Option<f64> {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&ticks| ticks > 0)
        .map(|ticks| ticks as f64)
}

/// What `/proc/PID/stat` says of one process's CPU time.
struct Stat {
    parent: u32,
    /// User + system ticks, all its threads.
    ticks: u64,
    /// User + system ticks of the children it has waited for.
    waited_children: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces and parentheses:
    // the fields that follow start after the last ')'.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 4 (ppid), 14 (utime), 15 (stime), 16 (cutime) and 17
    // (cstime), counted from 1 at the pid.
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        parent: u32::try_from(field(4)?).ok()?,
        ticks: field(14)? + field(15)?,
        waited_children: field(16)? + field(17)?,
    })
}

fn ticks(ticks: u64) -> Option<Duration> {
    Some(Duration::from_secs_f64(ticks as f64 / ticks_per_second()?))
}

#[cfg(test)]
fn process(pid: u32) -> Option<Duration> {
    ticks(stat(pid)?.ticks)
}

fn process_and_waited_children(pid: u32) -> Option<Duration> {
    let stat = stat(pid)?;
    ticks(stat.ticks + stat.waited_children)
}

/// A process and its direct children: nginx's master and its workers.
fn process_tree(root: u32) -> Option<Duration> {
    let mut total = stat(root)?.ticks;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // A process that exits between the listing and the read is skipped.
        if let Some(child) = stat(pid) {
            if child.parent == root {
                total += child.ticks;
            }
        }
    }
    ticks(total)
}

/// Held by the test that reads this process's CPU time and by the tests
/// that burn much of it on other threads or in children they wait for,
/// which would be counted in.
#[cfg(test)]
pub(crate) static PROCESS_CPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_cpu_this_process_burns() {
        let _alone = PROCESS_CPU.lock().unwrap_or_else(|e| e.into_inner());
        let start = Sample::take(None, None);
        let spin_until = Instant::now() + Duration::from_millis(300);
        let mut spins = 0u64;
        while Instant::now() < spin_until {
            spins = std::hint::black_box(spins + 1);
        }
        let usage = Usage::between(&start, &Sample::take(None, None));
        let load = usage.load_s.unwrap_or(0.0);
        // 300 ms of spinning, read in 10 ms ticks, on a possibly busy host.
        assert!(load > 0.1 && load < 0.5, "{usage:?}");
        assert_eq!(usage.server_s, None);
    }

    #[test]
    fn a_process_tree_includes_its_children() {
        let _alone = PROCESS_CPU.lock().unwrap_or_else(|e| e.into_inner());
        // Busy for longer than the test looks, then killed.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("sh runs");
        std::thread::sleep(Duration::from_millis(400));
        let me = std::process::id();
        let tree = process_tree(me).unwrap_or_default();
        let own = process(me).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            tree.saturating_sub(own) > Duration::from_millis(100),
            "tree {tree:?}, own {own:?}"
        );
    }

    #[test]
    fn a_child_waited_for_inside_the_window_counts_toward_the_load_side() {
        let _alone = PROCESS_CPU.lock().unwrap_or_else(|e| e.into_inner());
        // As h2load is: started after the window opens, waited for before
        // it closes.
        let start = Sample::take(None, None);
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("sh runs");
        std::thread::sleep(Duration::from_millis(400));
        let _ = child.kill();
        let _ = child.wait();
        let usage = Usage::between(&start, &Sample::take(None, None));
        let load = usage.load_s.unwrap_or(0.0);
        assert!(load > 0.1, "{usage:?}");
    }
}
