//! The gateway and the counter as child processes under test: a config
//! rendered into a file ([`GatewayConfig`]), the process started from it
//! with its stderr collected, the listeners it logs, signals, and its exit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::eventually::{Text, eventually, within_blocking};
use super::{Backend, Threading};

pub fn gateway_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gateway"))
}

/// Runs the gateway on the configuration `file`, with `--check` if asked,
/// to its exit; asserts that it was 78, a refused configuration, and
/// returns the line of its stderr that names one of `keys`. `what` names
/// the case in a failure.
pub async fn refused_config_line(file: &Path, check: bool, keys: &[&str], what: &str) -> String {
    let mut command = tokio::process::Command::new(gateway_binary());
    if check {
        command.arg("--check");
    }
    command
        .arg("--config")
        .arg(file)
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(10), command.output())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after 10 s"))
        .expect("run gateway");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{what}: {stderr}");
    stderr
        .lines()
        .find(|line| keys.iter().any(|key| line.contains(key)))
        .unwrap_or_else(|| panic!("{what}: no line names {keys:?}: {stderr}"))
        .to_owned()
}

/// A child process whose stderr is collected; killed on drop.
pub struct Process {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    /// `(name, address)` of each "listening on ADDR (NAME)" line.
    pub listeners: Vec<(String, SocketAddr)>,
    /// Those lines as the log reader finds them.
    listening: std::sync::mpsc::Receiver<(String, SocketAddr)>,
    _config: Option<tempfile::NamedTempFile>,
    /// The folder of the counter's state file, removed with the process.
    pub state: Option<tempfile::TempDir>,
    /// The folder of the built-in counter's state file when started from a
    /// [`GatewayConfig`], shared with it: kept while the process runs, so
    /// that a gateway started from a config that is then dropped still has
    /// the folder its counter writes in.
    state_folder: Option<Arc<tempfile::TempDir>>,
}

impl Process {
    /// Starts `command` and waits until `expected` listeners are logged.
    fn start(command: Command, expected: usize, config: Option<tempfile::NamedTempFile>) -> Self {
        let mut process = Self::spawn(command, config);
        process.wait_for_listeners(expected);
        process
    }

    /// Starts `command`, without waiting for it to listen.
    fn spawn(mut command: Command, config: Option<tempfile::NamedTempFile>) -> Self {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn gateway");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(listener) = parse_listening(&line) {
                    let _ = tx.send(listener);
                }
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            log,
            listeners: Vec::new(),
            listening: rx,
            _config: config,
            state: None,
            state_folder: None,
        }
    }

    /// Waits until `expected` listeners are logged; kills the process and
    /// fails the test if they are not within 20 s, or at once if it exits
    /// first. Not [`eventually`]: the channel closing is the news that the
    /// process ended, and a poll would sit out the 20 s instead.
    pub fn wait_for_listeners(&mut self, expected: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.listeners.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.listening.recv_timeout(left) {
                Ok(listener) => self.listeners.push(listener),
                Err(why) => {
                    let _ = self.child.kill();
                    let ended = match why {
                        RecvTimeoutError::Timeout => "did not start within 20 s".to_owned(),
                        RecvTimeoutError::Disconnected => match self.child.wait() {
                            Ok(status) => format!("ended before it listened ({status})"),
                            Err(error) => format!("ended before it listened ({error})"),
                        },
                    };
                    panic!(
                        "gateway {ended} (listening: {:?}); its log:\n{}",
                        self.listeners,
                        self.log_text()
                    );
                }
            }
        }
    }

    /// Starts a prepared command, without waiting for it to listen.
    pub fn spawn_command(command: Command) -> Self {
        Self::spawn(command, None)
    }

    /// Starts a prepared command; waits for `expected` listeners.
    pub fn start_command(command: Command, expected: usize) -> Self {
        Self::start(command, expected, None)
    }

    /// The configuration file it was started with, for a test to change
    /// before a reload.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self._config.as_ref().map(|file| file.path())
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {name} listener in {:?}", self.listeners))
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (at most 5 s) for a log line from index `from` on that
    /// satisfies `wanted`; the line.
    pub async fn wait_for_log_line(&self, from: usize, wanted: impl Fn(&str) -> bool) -> String {
        eventually("a log line", Duration::from_secs(5), async || {
            let log = self.log.lock().unwrap();
            match log[from..].iter().find(|line| wanted(line)) {
                Some(line) => Ok(line.clone()),
                None => Err(Text(format!("the log:\n{}", log.join("\n")))),
            }
        })
        .await
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (as `kill -NAME` spells it).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        within_blocking(limit, || self.child.try_wait().expect("try_wait").ok_or(())).ok()
    }

    /// Waits (off the async runtime) for the process to exit within
    /// `limit`, asserts it exited 0, and hands it back for its log.
    pub async fn assert_exits_0_within(mut self, limit: Duration) -> Process {
        let (status, process) = tokio::task::spawn_blocking(move || {
            let status = self.wait_exit(limit);
            (status, self)
        })
        .await
        .expect("the waiting thread");
        assert_eq!(
            status.map(|s| s.code()),
            Some(Some(0)),
            "{}",
            process.log_text()
        );
        process
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let (addr, name) = rest.split_once(" (")?;
    let name = name.split_once(')')?.0;
    Some((name.to_owned(), addr.parse().ok()?))
}

/// Settings for a gateway under test; rendered into a config file.
pub struct GatewayConfig {
    pub backend: Backend,
    pub upstream: String,
    /// `server.listen`.
    pub listen: String,
    /// Extra `key = value` lines for `[server]`.
    pub server: String,
    /// Extra `key = value` lines for `[upstream]`.
    pub upstream_extra: String,
    /// Extra `key = value` lines for `[log]`.
    pub log_extra: String,
    /// Serve the built-in counter in the same process.
    pub counter: bool,
    /// `counter.listen`: an ephemeral port unless set.
    pub counter_listen: String,
    /// Serve the admin listener.
    pub admin: bool,
    /// `runtime.workers`: 2 unless a test asks for the one-worker setup,
    /// which tokio runs on its single-threaded scheduler.
    pub workers: usize,
    /// `runtime.threading`: per-core unless set.
    pub threading: Threading,
    /// The folder of the built-in counter's state file: one per config, so
    /// that gateways started from it one after another share a count.
    pub state: Arc<tempfile::TempDir>,
    /// The folder the config file is written to (relative paths in it are
    /// relative to it): a temporary folder unless set.
    pub folder: Option<PathBuf>,
}

impl GatewayConfig {
    pub fn new(backend: Backend, upstream: SocketAddr) -> Self {
        Self {
            backend,
            upstream: format!("http://{upstream}/counter"),
            listen: "127.0.0.1:0".to_owned(),
            server: String::new(),
            upstream_extra: String::new(),
            log_extra: String::new(),
            counter: false,
            counter_listen: "127.0.0.1:0".to_owned(),
            admin: false,
            workers: 2,
            threading: Threading::PerCore,
            state: Arc::new(tempfile::tempdir().expect("a state folder")),
            folder: None,
        }
    }

    /// Serves the built-in counter on `addr` (a port found free with
    /// [`TestUpstream::closed_port`]) and sends the visits to it.
    pub fn with_counter_on(mut self, addr: SocketAddr) -> Self {
        self.counter = true;
        self.counter_listen = addr.to_string();
        self.upstream = format!("http://{addr}/counter");
        self
    }

    /// Writes the config file into `folder`.
    pub fn in_folder(mut self, folder: &std::path::Path) -> Self {
        self.folder = Some(folder.to_owned());
        self
    }

    /// The built-in counter's state file.
    pub fn state_file(&self) -> PathBuf {
        self.state.path().join("counter.state")
    }

    pub fn threading(mut self, threading: Threading) -> Self {
        self.threading = threading;
        self
    }

    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    pub fn server(mut self, lines: &str) -> Self {
        self.server.push_str(lines);
        self.server.push('\n');
        self
    }

    /// Also serve the admin listener.
    pub fn with_admin(mut self) -> Self {
        self.admin = true;
        self
    }

    pub fn upstream(mut self, lines: &str) -> Self {
        self.upstream_extra.push_str(lines);
        self.upstream_extra.push('\n');
        self
    }

    pub fn log(mut self, lines: &str) -> Self {
        self.log_extra.push_str(lines);
        self.log_extra.push('\n');
        self
    }

    fn listeners(&self) -> usize {
        1 + usize::from(self.counter) + usize::from(self.admin)
    }

    pub fn render(&self) -> String {
        let mut counter = String::new();
        if self.counter {
            counter.push_str(&format!(
                "[counter]\nlisten = \"{}\"\npath = {:?}\n",
                self.counter_listen,
                self.state_file()
            ));
        }
        if self.admin {
            counter.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n");
        }
        format!(
            "[runtime]\nbackend = \"{}\"\nworkers = {}\nthreading = \"{}\"\n\n[server]\nlisten = \"{}\"\n{}\n[upstream]\nurl = \"{}\"\n{}\n{}[log]\nlevel = \"info\"\n{}",
            self.backend.name(),
            self.workers,
            self.threading.name(),
            self.listen,
            self.server,
            self.upstream,
            self.upstream_extra,
            counter,
            self.log_extra,
        )
    }

    pub fn start(&self) -> Process {
        self.start_with(|_| {})
    }

    fn write_config(&self) -> tempfile::NamedTempFile {
        let mut file = match &self.folder {
            Some(folder) => tempfile::NamedTempFile::new_in(folder),
            None => tempfile::NamedTempFile::new(),
        }
        .expect("temp config");
        std::io::Write::write_all(&mut file, self.render().as_bytes()).expect("write config");
        file
    }

    /// Starts the gateway after `adjust` has had its say on the command
    /// (environment, file descriptors).
    pub fn start_with(&self, adjust: impl FnOnce(&mut Command)) -> Process {
        let file = self.write_config();
        let mut command = Command::new(gateway_binary());
        command
            .arg("--config")
            .arg(file.path())
            .env_remove("RUST_LOG");
        adjust(&mut command);
        self.keeping_state(Process::start(command, self.listeners(), Some(file)))
    }

    fn keeping_state(&self, mut process: Process) -> Process {
        process.state_folder = Some(self.state.clone());
        process
    }

    /// Starts the gateway the way systemd's socket activation does: the
    /// listening socket as fd 3, `LISTEN_FDS=1`, `LISTEN_PID` = its pid.
    pub fn start_activated(&self, listener: &std::net::TcpListener) -> Process {
        self.start_passing(listener, "LISTEN_PID=$$ LISTEN_FDS=1")
    }

    /// Starts the gateway with `listener` as fd 3 and `environment` (shell
    /// assignments; `$$` is the gateway's pid) set for it.
    pub fn start_passing(&self, listener: &std::net::TcpListener, environment: &str) -> Process {
        use command_fds::{CommandFdExt, FdMapping};
        let file = self.write_config();
        let socket = std::os::fd::OwnedFd::from(listener.try_clone().expect("dup listener"));
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{environment} exec \"$0\" \"$@\""))
            .arg(gateway_binary())
            .arg("--config")
            .arg(file.path())
            .env_remove("RUST_LOG")
            .fd_mappings(vec![FdMapping {
                parent_fd: socket,
                child_fd: 3,
            }])
            .expect("map fd 3");
        self.keeping_state(Process::start(command, self.listeners(), Some(file)))
    }
}

/// Starts `gateway counter` on an ephemeral port, with its default (file)
/// store in a folder of its own.
pub fn start_counter(backend: Backend) -> Process {
    let state = tempfile::tempdir().expect("a state folder");
    let mut process = start_counter_on(backend, &state.path().join("counter.state"), &[]);
    process.state = Some(state);
    process
}

/// Starts `gateway counter` on an ephemeral port with the state file
/// `path` and `extra` arguments.
pub fn start_counter_on(backend: Backend, path: &std::path::Path, extra: &[&str]) -> Process {
    let mut command = counter_command(backend);
    command.arg("--path").arg(path).args(extra);
    Process::start(command, 1, None)
}

/// `gateway counter` on an ephemeral port, on `backend`: add the store's
/// arguments.
pub fn counter_command(backend: Backend) -> Command {
    let mut command = Command::new(gateway_binary());
    command
        .args([
            "counter",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            backend.name(),
        ])
        .env_remove("RUST_LOG");
    command
}
