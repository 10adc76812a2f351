//! The scripted upstream: a counter in the test process whose answers the
//! test sets ([`Behaviour`]), from well-behaved hyper to raw bytes that
//! reset, stall, or lie about their framing; it tallies what it saw and can
//! stop and start again on the same port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::eventually::{at_least, eventually};

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
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                connections
                    .lock()
                    .unwrap()
                    .spawn(serve_connection(stream, state));
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
        eventually(
            &format!("{count} visits at the upstream"),
            Duration::from_secs(5),
            async || at_least(self.posts(), count),
        )
        .await
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

/// Serves one connection as the behaviour set when it was accepted says.
async fn serve_connection(stream: TcpStream, state: Arc<UpstreamState>) {
    let behaviour = *state.behaviour.lock().unwrap();
    match behaviour {
        Behaviour::CloseAfterAnswer => answer_once_then_close(stream, &state).await,
        Behaviour::Flaky => serve_flaky(stream, &state).await,
        Behaviour::Raw(reply) => serve_scripted(stream, &state, reply, false).await,
        Behaviour::Trap(reply) => serve_scripted(stream, &state, reply, true).await,
        Behaviour::ResetAfterRead(delay) => reset_after_read(stream, &state, delay).await,
        Behaviour::CloseMidResponse => {
            answer_raw_and_close(stream, &state, b"HTTP/1.1 200 OK\r\ncontent-le").await
        }
        Behaviour::Garbage => {
            answer_raw_and_close(stream, &state, b"\x00\x01garbage, not HTTP\r\n\r\n").await
        }
        Behaviour::Ok
        | Behaviour::Status(_)
        | Behaviour::Hang
        | Behaviour::Delay(_)
        | Behaviour::Slow(..) => serve_http(stream, state).await,
    }
}

/// The well-framed behaviours, over hyper: each request is answered as
/// [`answer`] says (the behaviour read again per request).
async fn serve_http(stream: TcpStream, state: Arc<UpstreamState>) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&state, request).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// [`Behaviour::CloseAfterAnswer`]: the first read is counted and answered
/// 200 with keep-alive implied, then the connection closes shortly after.
async fn answer_once_then_close(mut stream: TcpStream, state: &UpstreamState) {
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
