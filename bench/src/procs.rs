//! The processes a benchmark runs: the release `gateway` binary (as the
//! daemon and as `gateway counter`) and nginx, each pinned with `taskset`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backends::{Backend, Named, Threading};

use crate::layout::CpuList;
use crate::tls::Certificates;

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

/// A gateway row's settings, from its name: `backend[/threading][/batchN]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTarget<'a> {
    pub backend: &'a str,
    /// `None`: the gateway's default (per-core), so that a bare backend
    /// measures what ships.
    pub threading: Option<&'a str>,
    /// `upstream.batch_max`; `None` leaves the default (1).
    pub batch_max: Option<usize>,
}

impl<'a> GatewayTarget<'a> {
    pub fn parse(target: &'a str) -> Result<Self, String> {
        let wrong = || {
            format!(
                "`{target}` is not {}, optionally with /{}, then optionally /batchN \
                 (N of 2 or more)",
                Backend::NAMES.join(" or "),
                Threading::NAMES.join(" or /"),
            )
        };
        let mut parts = target.split('/');
        let backend = parts.next().filter(|b| Backend::from_name(b).is_some());
        let backend = backend.ok_or_else(wrong)?;
        let mut parsed = Self {
            backend,
            threading: None,
            batch_max: None,
        };
        for part in parts {
            if let Some(n) = part.strip_prefix("batch") {
                let n: usize = n.parse().map_err(|_| wrong())?;
                if n < 2 || parsed.batch_max.is_some() {
                    return Err(wrong());
                }
                parsed.batch_max = Some(n);
            } else if Threading::from_name(part).is_some()
                && parsed.threading.is_none()
                && parsed.batch_max.is_none()
            {
                parsed.threading = Some(part);
            } else {
                return Err(wrong());
            }
        }
        Ok(parsed)
    }
}

/// The config.toml for `target` (see [`GatewayTarget`]), with the
/// certificate and key of `tls` on the public listener. The upstream stays
/// plain http: TLS is measured where clients meet the server.
fn gateway_config(
    target: &str,
    workers: usize,
    counter: SocketAddr,
    tls: Option<&Certificates>,
) -> Result<String, String> {
    let parsed = GatewayTarget::parse(target).unwrap_or(GatewayTarget {
        backend: target,
        threading: None,
        batch_max: None,
    });
    let backend = parsed.backend;
    let threading = parsed
        .threading
        .map(|t| format!("threading = \"{t}\"\n"))
        .unwrap_or_default();
    let batch = parsed
        .batch_max
        .map(|n| format!("batch_max = {n}\n"))
        .unwrap_or_default();
    let tls = match tls {
        Some(files) => format!(
            "tls_cert = {}\ntls_key = {}\n",
            toml_string(&files.chain)?,
            toml_string(&files.key)?
        ),
        None => String::new(),
    };
    Ok(format!(
        "# Written by the bench; identical for every target but `backend`, `threading` \
         and `batch_max`.\n\
         [runtime]\nbackend = \"{backend}\"\nworkers = {workers}\n{threading}\n\
         [server]\nlisten = \"127.0.0.1:0\"\n{tls}\n\
         [upstream]\nurl = \"http://{counter}/counter\"\n{batch}\n\
         [log]\nlevel = \"info\"\n"
    ))
}

/// `path` as a TOML basic string; TOML text is UTF-8, so a path that is
/// not cannot be written into the config.
fn toml_string(path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8, cannot go in a TOML file", path.display()))?;
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    Ok(quoted)
}

/// `path` as an nginx quoted string. nginx would take a `$` in
/// `ssl_certificate` for a variable (and then load the file at every
/// handshake), so such a path is refused rather than measured.
fn nginx_string(path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8, cannot go in nginx.conf", path.display()))?;
    if text.contains('$') || text.chars().any(char::is_control) {
        return Err(format!(
            "{text}: nginx.conf cannot name a path with `$` or control characters in it; \
             choose another --out"
        ));
    }
    Ok(format!(
        "\"{}\"",
        text.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// Whether an `nginx` binary is on the PATH (or at `$NGINX`).
pub fn nginx_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NGINX") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
            .map(|dir| dir.join("nginx"))
            .find(|path| path.is_file())
    })
}

/// nginx with one worker per gateway worker, proxying to the counter with
/// an upstream keep-alive pool: the outside yardstick. With `tls`, it
/// serves HTTPS, TLS 1.3 only, on the gateway's certificate and key.
pub fn start_nginx(
    binary: &Path,
    cpus: &CpuList,
    workers: usize,
    counter: SocketAddr,
    out: &Path,
    tls: Option<&Certificates>,
) -> Result<Running, String> {
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let dir = out.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let template = include_str!("../nginx.conf");
    let (ssl, tls) = match tls {
        Some(files) => (
            " ssl",
            format!(
                "ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.3;",
                nginx_string(&files.chain)?,
                nginx_string(&files.key)?
            ),
        ),
        None => ("", "# plain HTTP (the bench without --tls)".to_owned()),
    };
    let config = template
        .replace("{{workers}}", &workers.to_string())
        .replace("{{dir}}", &dir.display().to_string())
        .replace("{{listen}}", &format!("127.0.0.1:{port}"))
        .replace("{{ssl}}", ssl)
        .replace("{{tls}}", &tls)
        .replace("{{counter}}", &counter.to_string());
    let config_path = dir.join("nginx.conf");
    std::fs::write(&config_path, config).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let mut command = pinned(cpus, binary);
    command
        .arg("-c")
        .arg(&config_path)
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start nginx: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut running = Running {
        name: "nginx".to_owned(),
        child,
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        // A config nginx rejects (a certificate it cannot load) ends it at
        // once: say so now rather than after the deadline.
        let exited = matches!(running.child.try_wait(), Ok(Some(_)));
        if exited || Instant::now() > deadline {
            return Err(format!(
                "nginx did not start listening; see {}/error.log",
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(running)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

#[cfg(test)]
mod tests {
    use super::{GatewayTarget, gateway_config, nginx_string, toml_string};
    use gateway::config::{Backend, Config, Threading};
    use std::path::Path;

    fn parsed(target: &str) -> Config {
        let counter = "127.0.0.1:3001".parse().unwrap();
        let text = gateway_config(target, 4, counter, None).unwrap();
        Config::parse(Path::new("bench.toml"), &text).unwrap()
    }

    /// Needs the gateway's `server.tls_cert` and `server.tls_key`.
    #[test]
    fn a_tls_row_names_the_certificate_and_key_and_parses() {
        let dir = std::env::temp_dir().join(format!("bench-config-test-{}", std::process::id()));
        let files = crate::tls::generate(&dir).unwrap();
        let counter = "127.0.0.1:3001".parse().unwrap();
        let text = gateway_config("tokio/batch8", 4, counter, Some(&files)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let chain = toml_string(&files.chain).unwrap();
        let key = toml_string(&files.key).unwrap();
        let server = text.split("[server]").nth(1).unwrap();
        let server = server.split("\n[").next().unwrap();
        assert!(server.contains(&format!("tls_cert = {chain}\n")), "{text}");
        assert!(server.contains(&format!("tls_key = {key}\n")), "{text}");
        let config = Config::parse(Path::new("bench.toml"), &text);
        assert!(config.is_ok(), "{text}\n{:?}", config.err());
        assert_eq!(config.unwrap().upstream.batch_max, 8);
    }

    #[test]
    fn paths_are_quoted_for_toml_and_nginx() {
        assert_eq!(
            toml_string(Path::new("/a b/c.pem")).unwrap(),
            r#""/a b/c.pem""#
        );
        assert_eq!(toml_string(Path::new(r#"/a"\b"#)).unwrap(), r#""/a\"\\b""#);
        assert_eq!(toml_string(Path::new("/a\tb")).unwrap(), r#""/a\u0009b""#);
        assert_eq!(
            nginx_string(Path::new("/a b/c.pem")).unwrap(),
            r#""/a b/c.pem""#
        );
        assert!(nginx_string(Path::new("/a$b/c.pem")).is_err());
    }

    #[test]
    fn a_bare_backend_runs_the_gateways_default_threading() {
        let config = parsed("smol");
        assert_eq!(config.runtime.backend, Backend::Smol);
        assert_eq!(config.runtime.workers, 4);
        assert_eq!(
            config.runtime.threading,
            Config::default().runtime.threading
        );
    }

    #[test]
    fn a_named_threading_is_written_into_the_config() {
        assert_eq!(parsed("tokio/shared").runtime.threading, Threading::Shared);
        assert_eq!(
            parsed("tokio/per-core").runtime.threading,
            Threading::PerCore
        );
    }

    #[test]
    fn a_batch_row_sets_batch_max_and_nothing_else() {
        let config = parsed("smol/shared/batch64");
        assert_eq!(config.upstream.batch_max, 64);
        assert_eq!(config.runtime.threading, Threading::Shared);
        assert_eq!(parsed("tokio/batch8").upstream.batch_max, 8);
        assert_eq!(parsed("tokio").upstream.batch_max, 1);
        for bad in [
            "nginx",
            "tokio/batch1",
            "tokio/batch",
            "tokio/batch8/shared",
            "smol/x",
        ] {
            assert!(GatewayTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
