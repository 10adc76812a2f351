//! The processes a benchmark runs: the release `gateway` binary (as the
//! daemon and as `gateway counter`) and nginx, each pinned with `taskset`;
//! the counter's tally, read over HTTP; and wrk, for the cross-check.

mod config;
mod nginx;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::layout::CpuList;
use crate::tls::Certificates;

pub use self::config::GatewayTarget;
use self::config::gateway_config;
pub use self::nginx::{nginx_binary, start_nginx};

/// A child process, killed on drop.
pub struct Running {
    pub name: String,
    child: Child,
    pub addr: SocketAddr,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the process with SIGTERM, then SIGKILL if it lingers.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "bench: {} did not exit within 15s of SIGTERM; killing it",
            self.name
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway to measure: the one installed beside this program (the
/// package puts `gateway-bench` and `gateway` in `/usr/bin`), else, in a
/// checkout, the workspace's release build, built with cargo if missing.
/// A debug bench passes over the gateway beside it, a debug build too: it
/// would measure the compiler's settings, not the gateway.
pub fn gateway_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().ok();
    let beside_me = exe
        .as_ref()
        .and_then(|exe| exe.parent().map(|dir| dir.join("gateway")))
        .filter(|path| !cfg!(debug_assertions) && path.is_file());
    if let Some(installed) = beside_me {
        return Ok(installed);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = workspace.join("target/release/gateway");
    if built.is_file() {
        return Ok(built);
    }
    if !workspace.join("Cargo.toml").is_file() {
        let exe = exe.map(|e| e.display().to_string()).unwrap_or_default();
        return Err(format!(
            "no gateway binary beside {exe} and no checkout to build one in: \
             install the gateway package, or pass --gateway PATH"
        ));
    }
    eprintln!("bench: building the release gateway (cargo build --release -p gateway)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "gateway"])
        .current_dir(&workspace)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() || !built.is_file() {
        return Err("cargo build --release -p gateway failed".to_owned());
    }
    Ok(built)
}

/// `taskset -c CPUS program args...`
fn pinned(cpus: &CpuList, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cpus.to_string()).arg(program);
    command
}

/// Starts a gateway-binary process and waits for its "listening on" line.
fn start_logged(name: String, mut command: Command) -> Result<Running, String> {
    command
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {name} (is taskset installed?): {e}"))?;
    let Some(stderr) = child.stderr.take() else {
        return Err(format!("{name}: no stderr"));
    };
    let (found, listening) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining after the first line, or the child would block
        // on a full pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split_once("listening on ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|addr| addr.parse::<SocketAddr>().ok())
            {
                let _ = found.send(addr);
            } else if line.contains("ERROR") || line.contains("WARN") {
                eprintln!("  {line}");
            }
        }
    });
    match listening.recv_timeout(Duration::from_secs(15)) {
        Ok(addr) => Ok(Running { name, child, addr }),
        Err(_) => {
            let _ = child.kill();
            Err(format!("{name} did not start listening within 15s"))
        }
    }
}

/// `gateway counter` on its own CPUs, keeping its count in `store`
/// ("memory", or "file": a state file in `out`, started afresh).
pub fn start_counter(
    binary: &Path,
    cpus: &CpuList,
    store: &str,
    postgres_url: Option<&str>,
    out: &Path,
) -> Result<Running, String> {
    let mut command = pinned(cpus, binary);
    command.args([
        "counter",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "tokio",
        "--workers",
        &cpus.len().to_string(),
        "--store",
        store,
    ]);
    if store == "file" {
        let state = out.join("counter.state");
        match std::fs::remove_file(&state) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("{}: {error}", state.display()));
            }
            _ => {}
        }
        command.arg("--path").arg(state);
    }
    if let Some(url) = postgres_url {
        command.args(["--postgres-url", url]);
    }
    start_logged("counter".to_owned(), command)
}

/// The gateway daemon for `target` (see [`gateway_config`]), forwarding
/// to `counter`, serving HTTPS with `tls`.
pub fn start_gateway(
    binary: &Path,
    cpus: &CpuList,
    target: &str,
    workers: usize,
    counter: SocketAddr,
    out: &Path,
    tls: Option<&Certificates>,
) -> Result<Running, String> {
    let name = format!("{target}{}", if tls.is_some() { "/tls" } else { "" });
    let config = out.join(format!("gateway-{}.toml", name.replace('/', "-")));
    let text = gateway_config(target, workers, counter, tls)?;
    std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut command = pinned(cpus, binary);
    command.arg("--config").arg(&config);
    start_logged(name, command)
}

/// The counter's tally (`GET /counter`).
pub fn tally(counter: SocketAddr) -> Result<u64, String> {
    let mut stream = TcpStream::connect(counter).map_err(|e| format!("counter: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /counter HTTP/1.1\r\nhost: counter\r\nconnection: close\r\n\r\n")
        .map_err(|e| format!("counter: {e}"))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("counter: {e}"))?;
    reply
        .rsplit("\r\n\r\n")
        .next()
        .and_then(|body| body.trim().parse().ok())
        .ok_or_else(|| format!("counter answered {reply:?}"))
}

/// The counter's tally once it has stopped moving: visits still in flight
/// from a previous load (wrk, for one, leaves requests unanswered when it
/// stops) must not be counted against the next run.
pub fn settled_tally(counter: SocketAddr) -> Result<u64, String> {
    let mut last = tally(counter)?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = tally(counter)?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Err("the counter's tally kept moving with no load running".to_owned())
}

/// Runs `wrk` with the same connections and duration on the load CPUs,
/// for the cross-check; returns its requests/s. `https` and
/// `new_connections` follow the load generator's mode (wrk reconnects
/// after each answer to `connection: close`).
pub fn wrk(
    cpus: &CpuList,
    target: SocketAddr,
    connections: usize,
    duration: Duration,
    https: bool,
    new_connections: bool,
) -> Option<f64> {
    let threads = cpus.len().min(connections).max(1);
    let mut command = Command::new("taskset");
    command
        .arg("-c")
        .arg(cpus.to_string())
        .arg("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)));
    if new_connections {
        command.args(["-H", "connection: close"]);
    }
    let scheme = if https { "https" } else { "http" };
    let output = command.arg(format!("{scheme}://{target}/")).output().ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
