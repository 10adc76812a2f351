//! Test harness: the real `gateway` binary in a child process, a real
//! `gateway counter`, a controllable upstream served by hyper in the test
//! process, and real HTTP clients (hyper, and raw sockets for exact bytes).
//!
//! Every behavioural test is one `async fn(Backend)` run once per backend
//! by [`both_backends!`].
#![allow(dead_code)]

pub mod netns;
pub mod postgres;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The backends every behavioural test runs on.
pub use gateway::config::Backend;

/// The backend after `backend` in the backends crate's list, for a test
/// that switches a running service from one to another.
pub fn other_backend(backend: Backend) -> Backend {
    use gateway::config::Named;
    let next = Backend::ALL
        .iter()
        .position(|&b| b == backend)
        .map_or(0, |i| i + 1);
    Backend::ALL[next % Backend::ALL.len()]
}

/// Runs each listed `async fn(Backend)` as one test per backend,
/// `NAME::tokio` and `NAME::smol`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(backends::for_every_backend!(on_every_backend!($name));)*
    };
}

/// `name::backend` for every backend the backends crate lists.
#[macro_export]
macro_rules! on_every_backend {
    ($name:ident ; $([$runtime:path, $variant:path, $backend:ident])*) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $backend() {
                    super::$name($variant).await
                }
            )*
        }
    };
}

pub fn gateway_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gateway"))
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
    /// fails the test if they are not within 20 s.
    pub fn wait_for_listeners(&mut self, expected: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.listeners.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.listening.recv_timeout(left) {
                Ok(listener) => self.listeners.push(listener),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("gateway did not start; its log:\n{}", self.log_text());
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
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = self.log.lock().unwrap()[from..]
                .iter()
                .find(|line| wanted(line))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no such log line within 5 s; the log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
    /// Serve the built-in counter in the same process.
    pub counter: bool,
    /// `counter.listen`: an ephemeral port unless set.
    pub counter_listen: String,
    /// Serve the admin listener.
    pub admin: bool,
    /// `runtime.workers`: 2 unless a test asks for the one-worker setup,
    /// which tokio runs on its single-threaded scheduler.
    pub workers: usize,
    /// `runtime.threading`: "per-core" (the default) or "shared".
    pub threading: &'static str,
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
            counter: false,
            counter_listen: "127.0.0.1:0".to_owned(),
            admin: false,
            workers: 2,
            threading: "per-core",
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

    pub fn threading(mut self, threading: &'static str) -> Self {
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
            "[runtime]\nbackend = \"{}\"\nworkers = {}\nthreading = \"{}\"\n\n[server]\nlisten = \"{}\"\n{}\n[upstream]\nurl = \"{}\"\n{}\n{}[log]\nlevel = \"info\"\n",
            self.backend.name(),
            self.workers,
            self.threading,
            self.listen,
            self.server,
            self.upstream,
            self.upstream_extra,
            counter,
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

/// Reads from `stream` (plain or TLS) until `count` welcomes have arrived,
/// within 5 s each; the text.
pub async fn read_welcomes<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    count: usize,
) -> String {
    let mut seen = String::new();
    let mut buf = [0; 4096];
    while seen.matches("Welcome to my site!").count() < count {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

/// A keep-alive HTTP/1.1 client connection (hyper).
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::try_connect(addr).await.expect("connect")
    }

    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    pub async fn send(&mut self, request: Request<Empty<Bytes>>) -> Result<Answer, hyper::Error> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        read_answer(response).await
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.send(request("GET", path)).await.expect("GET")
    }

    pub async fn post(&mut self, path: &str) -> Answer {
        self.send(request("POST", path)).await.expect("POST")
    }
}

pub fn request(method: &str, path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gateway.test")
        .body(Empty::new())
        .unwrap()
}

async fn read_answer(response: Response<Incoming>) -> Result<Answer, hyper::Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `clients` keep-alive clients at once, each sending `visits` `GET /`
/// in turn; every answer must be 200.
pub async fn visit_concurrently(addr: SocketAddr, clients: usize, visits: usize) {
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(async move {
            let mut client = Client::connect(addr).await;
            for _ in 0..visits {
                assert_eq!(client.get("/").await.status, StatusCode::OK);
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("client task");
    }
}

/// One GET on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    Client::connect(addr).await.get(path).await
}

/// The admin listener's `/metrics` as `name{labels}` → value.
pub async fn scrape(admin: SocketAddr) -> std::collections::HashMap<String, f64> {
    let page = get(admin, "/metrics").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.ends_with("# EOF\n"), "{}", page.body);
    page.body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Reads the built-in counter's tally.
pub async fn counter_tally(counter: SocketAddr) -> u64 {
    let answer = get(counter, "/counter").await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.body.trim().parse().expect("tally is a number")
}

/// Writes `bytes` on a new connection and reads until the server closes
/// it or `limit` passes; returns what was read.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_until_close(&mut stream, limit).await
}

/// A `GET /` on a new connection whose client then shuts down its
/// sending side (as `nc -N` does); what came back until the close.
pub async fn get_then_half_close(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("write");
    stream.shutdown().await.expect("shutdown");
    read_until_close(&mut stream, Duration::from_secs(5)).await
}

pub async fn read_until_close(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// What the test upstream does with each POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// 200, empty body.
    Ok,
    /// This status, with a short body.
    Status(u16),
    /// Never answers.
    Hang,
    /// Answers after a delay.
    Delay(Duration),
    /// Answers this status after a delay.
    Slow(Duration, u16),
    /// Reads a whole request, waits, then resets the connection without
    /// an answer: the visits may or may not count, and nothing says which.
    ResetAfterRead(Duration),
    /// Writes bytes that are not HTTP, then closes.
    Garbage,
    /// Answers 200 while announcing keep-alive, then closes the connection
    /// shortly after: the stale pooled connection every client meets.
    CloseAfterAnswer,
    /// Keep-alive upstream that misbehaves on a fixed pattern: every 7th
    /// request (from the 4th) gets its connection reset without an answer,
    /// and every 5th answer (from the 2nd) is followed by a close.
    Flaky,
    /// Sends half a response head, then closes.
    CloseMidResponse,
    /// Answers every request with exactly these bytes, keeping the
    /// connection: an unusual but well-framed answer.
    Raw(&'static [u8]),
    /// Answers the first request on a connection with these bytes. A later
    /// request on the same connection is answered 200 but not counted, as
    /// if it had landed where the first answer said its body or another
    /// protocol goes: what a client fooled by the first answer would send
    /// (see [`TestUpstream::trapped`]).
    Trap(&'static [u8]),
}

/// What the test upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct UpstreamState {
    behaviour: Mutex<Behaviour>,
    /// Requests seen by the raw (non-hyper) behaviours, for their patterns.
    raw_sequence: AtomicU64,
    requests: Mutex<Vec<Seen>>,
    posts: AtomicU64,
    connections: AtomicUsize,
    /// Requests that reached a connection after a `Trap` answer.
    trapped: AtomicU64,
    /// Visits the POSTs carried (a POST's body is its count, or it is one).
    received_visits: AtomicU64,
    /// Visits in POSTs that were answered 2xx: the upstream's own tally.
    accepted_visits: AtomicU64,
}

/// The visits a POST's body says it carries: none is one.
pub fn visits_in(body: &[u8]) -> u64 {
    if body.is_empty() {
        return 1;
    }
    std::str::from_utf8(body)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("a POST body that is not a count: {body:?}"))
}

/// An upstream counter in the test process whose behaviour the test sets,
/// and which can stop (closing its listener and every connection) and
/// start again on the same port.
pub struct TestUpstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    tasks: Option<JoinSet<()>>,
}

impl TestUpstream {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            behaviour: Mutex::new(behaviour),
            raw_sequence: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
            posts: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            trapped: AtomicU64::new(0),
            received_visits: AtomicU64::new(0),
            accepted_visits: AtomicU64::new(0),
        });
        let mut upstream = Self {
            addr,
            state,
            tasks: None,
        };
        upstream.serve(listener);
        upstream
    }

    /// An address where nothing listens (bound, then closed).
    pub async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().unwrap()
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        let mut tasks = JoinSet::new();
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let held = connections.clone();
        tasks.spawn(async move {
            let _held = held;
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                connections.lock().unwrap().spawn(async move {
                    let behaviour = *state.behaviour.lock().unwrap();
                    if behaviour == Behaviour::CloseAfterAnswer {
                        let mut stream = stream;
                        let mut buf = [0u8; 4096];
                        if let Ok(n) = stream.read(&mut buf).await {
                            if n > 0 {
                                state.posts.fetch_add(1, Ordering::SeqCst);
                                let _ = stream
                                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                    .await;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        return;
                    }
                    if behaviour == Behaviour::Flaky {
                        serve_flaky(stream, &state).await;
                        return;
                    }
                    if let Behaviour::Raw(reply) | Behaviour::Trap(reply) = behaviour {
                        let trap = matches!(behaviour, Behaviour::Trap(_));
                        serve_scripted(stream, &state, reply, trap).await;
                        return;
                    }
                    if let Behaviour::ResetAfterRead(delay) = behaviour {
                        reset_after_read(stream, &state, delay).await;
                        return;
                    }
                    if behaviour == Behaviour::CloseMidResponse {
                        answer_raw_and_close(stream, &state, b"HTTP/1.1 200 OK\r\ncontent-le").await;
                        return;
                    }
                    if behaviour == Behaviour::Garbage {
                        answer_raw_and_close(stream, &state, b"\x00\x01garbage, not HTTP\r\n\r\n")
                            .await;
                        return;
                    }
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        self.tasks = Some(tasks);
    }

    /// Closes the listener and resets every connection.
    pub async fn stop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.shutdown().await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.expect("rebind");
        self.serve(listener);
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().unwrap() = behaviour;
    }

    /// POSTs received (counted when the request head arrives).
    pub fn posts(&self) -> u64 {
        self.state.posts.load(Ordering::SeqCst)
    }

    /// Waits until `count` requests have arrived (at most 5 s).
    pub async fn wait_for_posts(&self, count: u64) {
        let waited = Instant::now();
        while self.posts() < count {
            assert!(
                waited.elapsed() < Duration::from_secs(5),
                "{} of {count} visits arrived",
                self.posts()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Requests sent on a connection after a [`Behaviour::Trap`] answer:
    /// each was answered 200 and never counted.
    pub fn trapped(&self) -> u64 {
        self.state.trapped.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Visits carried by the POSTs received, answered or not.
    pub fn received_visits(&self) -> u64 {
        self.state.received_visits.load(Ordering::SeqCst)
    }

    /// Visits in POSTs answered 2xx.
    pub fn accepted_visits(&self) -> u64 {
        self.state.accepted_visits.load(Ordering::SeqCst)
    }

    /// The most visits one POST carried.
    pub fn largest_batch(&self) -> u64 {
        self.requests()
            .iter()
            .map(|seen| visits_in(&seen.body))
            .max()
            .unwrap_or(0)
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
        }
    }
}

async fn answer(state: &UpstreamState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let visits = visits_in(&body);
    if parts.method == http::Method::POST {
        state.posts.fetch_add(1, Ordering::SeqCst);
        state.received_visits.fetch_add(visits, Ordering::SeqCst);
    }
    state.requests.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.to_string(),
        headers: parts.headers,
        body,
    });
    let behaviour = *state.behaviour.lock().unwrap();
    let status = match behaviour {
        Behaviour::Ok => 200,
        Behaviour::Status(code) => code,
        Behaviour::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Behaviour::Delay(delay) => {
            tokio::time::sleep(delay).await;
            200
        }
        Behaviour::Slow(delay, status) => {
            tokio::time::sleep(delay).await;
            status
        }
        Behaviour::ResetAfterRead(_)
        | Behaviour::Garbage
        | Behaviour::CloseAfterAnswer
        | Behaviour::Flaky
        | Behaviour::CloseMidResponse
        | Behaviour::Raw(_)
        | Behaviour::Trap(_) => 200,
    };
    if (200..300).contains(&status) && parts.method == http::Method::POST {
        state.accepted_visits.fetch_add(visits, Ordering::SeqCst);
    }
    let mut response = Response::new(Full::new(Bytes::from_static(b"upstream says hi")));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

/// [`Behaviour::ResetAfterRead`]: each request, body included, is read and
/// tallied as received; then, after `delay`, the connection is reset.
async fn reset_after_read(mut stream: TcpStream, state: &UpstreamState, delay: Duration) {
    let mut buffer = Vec::new();
    let Some(head_end) = read_head(&mut stream, &mut buffer).await else {
        return;
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    let body_start = head_end + 4;
    while buffer.len() < body_start + length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    let body = Bytes::copy_from_slice(&buffer[body_start..body_start + length]);
    state.posts.fetch_add(1, Ordering::SeqCst);
    state
        .received_visits
        .fetch_add(visits_in(&body), Ordering::SeqCst);
    state.requests.lock().unwrap().push(Seen {
        method: "POST".to_owned(),
        path: head.split(' ').nth(1).unwrap_or("").to_owned(),
        headers: HeaderMap::new(),
        body,
    });
    tokio::time::sleep(delay).await;
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

/// Reads a request, counts it, answers `reply` (whatever it is) and closes.
async fn answer_raw_and_close(mut stream: TcpStream, state: &UpstreamState, reply: &[u8]) {
    let mut buf = [0u8; 1024];
    let _ = stream.read(&mut buf).await;
    state.posts.fetch_add(1, Ordering::SeqCst);
    let _ = stream.write_all(reply).await;
}

/// The `Flaky` behaviour, over raw bytes so that it can reset a connection
/// with a request unanswered (SO_LINGER 0) or close one after answering.
async fn serve_flaky(mut stream: TcpStream, state: &UpstreamState) {
    let mut buffer = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut stream, &mut buffer).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        buffer.drain(..head_end + 4);
        let mut headers = HeaderMap::new();
        for line in head.lines().skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                if let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(name.trim().as_bytes()),
                    http::HeaderValue::from_str(value.trim()),
                ) {
                    headers.append(name, value);
                }
            }
        }
        state.posts.fetch_add(1, Ordering::SeqCst);
        state.requests.lock().unwrap().push(Seen {
            method: head.split(' ').next().unwrap_or("").to_owned(),
            path: head.split(' ').nth(1).unwrap_or("").to_owned(),
            headers,
            body: Bytes::new(),
        });
        let sequence = state.raw_sequence.fetch_add(1, Ordering::SeqCst);
        if sequence % 7 == 3 {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            return;
        }
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        if sequence % 5 == 1 {
            return;
        }
    }
}

/// Reads until `buffer` holds a whole request head; its length without
/// the blank line, or `None` when the peer closed first.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// [`Behaviour::Raw`] and [`Behaviour::Trap`]: every request (or, with
/// `trap`, the first) is counted and answered `reply`; with `trap`, later
/// ones are answered 200 uncounted.
async fn serve_scripted(mut stream: TcpStream, state: &UpstreamState, reply: &[u8], trap: bool) {
    let mut buffer = Vec::new();
    let mut answered = 0;
    while let Some(head_end) = read_head(&mut stream, &mut buffer).await {
        buffer.drain(..head_end + 4);
        let reply: &[u8] = if trap && answered > 0 {
            state.trapped.fetch_add(1, Ordering::SeqCst);
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        } else {
            state.posts.fetch_add(1, Ordering::SeqCst);
            reply
        };
        answered += 1;
        if stream.write_all(reply).await.is_err() {
            return;
        }
    }
}
