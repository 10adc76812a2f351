//! The load generator: HTTP/1.1 keep-alive connections spread over a few
//! pinned threads, one request in flight per connection.
//!
//! Closed loop (the default): each connection sends its next request as
//! soon as the previous answer is in, like `wrk`. Open loop (`--rate`):
//! each connection sends on a fixed schedule so that all together make the
//! target rate, and a latency is measured from when the request *should*
//! have been sent, so a stalled server cannot hide its stall by slowing the
//! client down (coordinated omission, corrected as wrk2 does).
//!
//! With `--new-connections`, each request goes on a connection of its own
//! (sent with `connection: close`), connect included in its latency.
//!
//! Over TLS (`--tls`) each connection first makes a TLS 1.3 handshake with
//! tokio-rustls, every connection on one shared client configuration
//! ([`crate::tls`]); a keep-alive connection makes it once, a connection
//! per request makes a full one per request.
//!
//! Each thread runs a single-threaded tokio runtime; requests are fixed
//! bytes and answers are parsed with `httparse`, so the client costs far
//! less per request than the servers it measures (see the README for the
//! cross-check against wrk).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::layout::{CpuList, pin_current_thread};

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub connections: usize,
    pub cpus: CpuList,
    pub warmup: Duration,
    pub duration: Duration,
    /// Requests per second for the open loop; `None` for the closed loop.
    pub rate: Option<f64>,
    /// Each request on a new connection instead of keep-alive ones.
    pub new_connections: bool,
    /// HTTPS with this client configuration, shared by every connection.
    pub tls: Option<Arc<ClientConfig>>,
    /// Connections held open beside the load that send the start of a
    /// request (over TLS, of a ClientHello) and never finish it: each is
    /// opened again as soon as the server closes it.
    pub stalled: usize,
    /// Keep-alive connections held open beside the load, idle after one
    /// request each: each is opened again (with its request) if the
    /// server closes it.
    pub idle: usize,
}

/// What one run measured.
#[derive(Debug)]
pub struct LoadResult {
    /// Answers completed inside the measured window.
    pub requests: u64,
    /// Of those, answers that were not 200, and failed connections.
    pub errors: u64,
    /// Every 200 seen, warm-up and drain included: what the counter's
    /// tally must have grown by.
    pub ok_total: u64,
    /// Every answer that was not 200 and every request whose outcome was
    /// lost (connection failed with it in flight), warm-up included.
    pub failed_total: u64,
    /// Latencies in microseconds of the answers in the window.
    pub latency: Histogram<u64>,
    pub window: Duration,
    /// Why the first connection or exchange that failed did, so that a
    /// row of errors says what went wrong (a refused connect, a
    /// certificate the client does not trust).
    pub first_error: Option<String>,
}

impl LoadResult {
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }

    fn merge(&mut self, other: LoadResult) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.ok_total += other.ok_total;
        self.failed_total += other.failed_total;
        let _ = self.latency.add(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 100 s at 3 significant figures.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant bounds are valid")
}

/// Runs the load described by `spec` and returns what it measured, with
/// what `sample` returned at the start and at the end of the measured
/// window (taken on this thread while the load threads run).
pub fn run<S>(
    spec: &LoadSpec,
    mut sample: impl FnMut() -> S,
) -> std::io::Result<(LoadResult, S, S)> {
    let threads = spec.cpus.len().min(spec.connections).max(1);
    let start = Instant::now() + Duration::from_millis(50);
    let window_start = start + spec.warmup;
    let stop = window_start + spec.duration;
    let mut handles = Vec::new();
    for thread in 0..threads {
        // Connections dealt round-robin over the threads.
        let count = spec.connections / threads + usize::from(thread < spec.connections % threads);
        let cpu = spec.cpus.0[thread % spec.cpus.len()];
        let spec = spec.clone();
        let first = thread;
        handles.push(std::thread::spawn(
            move || -> std::io::Result<LoadResult> {
                pin_current_thread(cpu);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let mut tasks = Vec::new();
                    for i in 0..count {
                        let index = first + i * threads;
                        let clock = Clock {
                            start,
                            window_start,
                            stop,
                        };
                        let schedule = spec.rate.map(|rate| {
                            let interval = Duration::from_secs_f64(spec.connections as f64 / rate);
                            // Spread the connections' first sends over one interval.
                            let offset = interval.mul_f64(index as f64 / spec.connections as f64);
                            (interval, offset)
                        });
                        let client = Client {
                            target: spec.target,
                            tls: spec.tls.clone().map(TlsConnector::from),
                            new_connections: spec.new_connections,
                        };
                        tasks.push(tokio::spawn(connection(client, clock, schedule)));
                    }
                    // The stalled clients, dealt over the threads like the load.
                    let stalled =
                        spec.stalled / threads + usize::from(thread < spec.stalled % threads);
                    // Their first connects spread over the warm-up, so that
                    // the server's closes (and their reconnects) are too,
                    // as a crowd of slow clients arrives.
                    let stalling: Vec<_> = (0..stalled)
                        .map(|i| {
                            let index = thread + i * threads;
                            let first =
                                start + spec.warmup.mul_f64(index as f64 / spec.stalled as f64);
                            tokio::spawn(stall(spec.target, spec.tls.is_some(), first, stop))
                        })
                        .collect();
                    // The idle clients, dealt and spread the same way: their
                    // one request each is made in the warm-up.
                    let idle = spec.idle / threads + usize::from(thread < spec.idle % threads);
                    let idling: Vec<_> = (0..idle)
                        .map(|i| {
                            let index = thread + i * threads;
                            let first =
                                start + spec.warmup.mul_f64(index as f64 / spec.idle as f64);
                            let client = Client {
                                target: spec.target,
                                tls: spec.tls.clone().map(TlsConnector::from),
                                new_connections: false,
                            };
                            tokio::spawn(stay_idle(client, first, stop))
                        })
                        .collect();
                    let mut total = empty_result(spec.duration);
                    for task in tasks {
                        if let Ok(result) = task.await {
                            total.merge(result);
                        }
                    }
                    for task in stalling {
                        let _ = task.await;
                    }
                    for task in idling {
                        if let Ok(result) = task.await {
                            total.ok_total += result.ok_total;
                            total.failed_total += result.failed_total;
                            if total.first_error.is_none() {
                                total.first_error = result.first_error;
                            }
                        }
                    }
                    Ok(total)
                })
            },
        ));
    }
    std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
    let at_start = sample();
    std::thread::sleep(stop.saturating_duration_since(Instant::now()));
    let at_end = sample();
    let mut total = empty_result(spec.duration);
    for handle in handles {
        match handle.join() {
            Ok(result) => total.merge(result?),
            Err(_) => return Err(std::io::Error::other("a load thread panicked")),
        }
    }
    Ok((total, at_start, at_end))
}

/// A client that never finishes its request: it sends the first bytes of
/// one (the 5-byte header of a TLS handshake record, or half a request
/// line) and waits for the server to close the connection, then does the
/// same again, from `first` until `stop`. What the server spends on it, and
/// whether the other clients feel it, is what `--stalled` shows.
async fn stall(target: SocketAddr, tls: bool, first: Instant, stop: Instant) {
    let start: &[u8] = if tls {
        &[0x16, 0x03, 0x01, 0x02, 0x00]
    } else {
        b"GET / HT"
    };
    let stop = tokio::time::Instant::from(stop);
    tokio::time::sleep_until(first.into()).await;
    let mut sink = [0u8; 512];
    while tokio::time::Instant::now() < stop {
        let held = async {
            let mut stream = TcpStream::connect(target).await?;
            stream.write_all(start).await?;
            // Until the server closes it (or resets it).
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        if tokio::time::timeout_at(stop, held)
            .await
            .is_ok_and(|held| held.is_err())
        {
            // Refused or reset: do not spin on a server that is gone.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A keep-alive client that goes idle: at `first` it connects, sends one
/// `GET /` and reads the answer, then holds the connection without a
/// word until `stop`; if the server closes it, it does the same again.
/// Its answers count toward the totals the counter is checked against
/// (not toward the window's requests or latency).
async fn stay_idle(client: Client, first: Instant, stop: Instant) -> LoadResult {
    let mut result = empty_result(Duration::ZERO);
    let request = format!("GET / HTTP/1.1\r\nhost: {}\r\n\r\n", client.target).into_bytes();
    let mut buffer = Vec::with_capacity(1024);
    let stop = tokio::time::Instant::from(stop);
    tokio::time::sleep_until(first.into()).await;
    while tokio::time::Instant::now() < stop {
        let held = async {
            let mut stream = client.connect().await?;
            let answer = match &mut stream {
                Stream::Plain(s) => exchange(s, &request, &mut buffer).await,
                Stream::Tls(s) => exchange(s.as_mut(), &request, &mut buffer).await,
            };
            match answer {
                Ok(Answer { status: 200, .. }) => result.ok_total += 1,
                Ok(_) => result.failed_total += 1,
                Err(error) => {
                    result.failed_total += 1;
                    return Err(error);
                }
            }
            // Idle until the server closes it (or resets it).
            let mut sink = [0u8; 64];
            loop {
                let read = match &mut stream {
                    Stream::Plain(s) => s.read(&mut sink).await?,
                    Stream::Tls(s) => s.read(&mut sink).await?,
                };
                if read == 0 {
                    return Ok(());
                }
            }
        };
        if let Ok(Err(error)) = tokio::time::timeout_at(stop, held).await {
            note_error(&mut result, &error);
            // Refused or reset: do not spin on a server that is gone.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    result
}

fn empty_result(window: Duration) -> LoadResult {
    LoadResult {
        requests: 0,
        errors: 0,
        ok_total: 0,
        failed_total: 0,
        latency: new_histogram(),
        window,
        first_error: None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    window_start: Instant,
    stop: Instant,
}

/// How one client connection reaches the server.
struct Client {
    target: SocketAddr,
    tls: Option<TlsConnector>,
    new_connections: bool,
}

/// A connection to the server, plain or TLS; the TLS state is boxed, as it
/// is far larger than a socket.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Client {
    /// A TCP connection, and over TLS its handshake, verified against the
    /// bench's CA for the address connected to (the certificate names
    /// `127.0.0.1` as well as `localhost`).
    async fn connect(&self) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(self.target)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let Some(connector) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let tls = connector
            .connect(ServerName::from(self.target.ip()), tcp)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// One TLS handshake with `target`, to say what it negotiated (protocol,
/// cipher suite, key exchange, ALPN, full or resumed), and to fail early,
/// with rustls's reason, where the server does not present the bench's
/// certificate.
pub fn tls_probe(target: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Client {
        target,
        tls: Some(TlsConnector::from(config)),
        new_connections: true,
    };
    let stream = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), client.connect())
            .await
            .map_err(|_| std::io::Error::other("TLS handshake: no answer within 5s"))?
    })?;
    let Stream::Tls(stream) = stream else {
        return Err(std::io::Error::other("not a TLS connection"));
    };
    let (_, session) = stream.get_ref();
    let show = |value: Option<String>| value.unwrap_or_else(|| "none".to_owned());
    Ok(format!(
        "{}, {}, {}, ALPN {}, {} handshake",
        show(session.protocol_version().map(|v| format!("{v:?}"))),
        show(
            session
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
        ),
        show(
            session
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
        ),
        show(
            session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
        ),
        show(session.handshake_kind().map(|k| format!("{k:?}"))).to_lowercase(),
    ))
}

/// One client connection's loop, reconnecting when the server closes it
/// (and after every answer, with `new_connections`).
async fn connection(
    client: Client,
    clock: Clock,
    schedule: Option<(Duration, Duration)>,
) -> LoadResult {
    let mut result = empty_result(clock.stop - clock.window_start);
    let target = client.target;
    let close = if client.new_connections {
        "connection: close\r\n"
    } else {
        ""
    };
    let request = format!("GET / HTTP/1.1\r\nhost: {target}\r\n{close}\r\n").into_bytes();
    let mut buffer = Vec::with_capacity(4096);
    let mut stream: Option<Stream> = None;
    tokio::time::sleep_until(clock.start.into()).await;
    let mut next_send = schedule.map(|(_, offset)| clock.start + offset);
    loop {
        // Open loop: wait for this request's slot; the latency runs from
        // the slot, not from when it could actually be sent.
        let intended = match (next_send, schedule) {
            (Some(at), Some((interval, _))) => {
                if at >= clock.stop {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                next_send = Some(at + interval);
                at
            }
            _ => {
                let now = Instant::now();
                if now >= clock.stop {
                    break;
                }
                now
            }
        };
        if stream.is_none() {
            match client.connect().await {
                Ok(s) => stream = Some(s),
                Err(error) => {
                    note_error(&mut result, &error);
                    count_error(&mut result, &clock, Instant::now());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let outcome = match stream.as_mut() {
            Some(Stream::Plain(s)) => exchange(s, &request, &mut buffer).await,
            Some(Stream::Tls(s)) => exchange(s.as_mut(), &request, &mut buffer).await,
            None => continue,
        };
        let done = Instant::now();
        match outcome {
            Ok(Answer { status, keep_alive }) => {
                if status == 200 {
                    result.ok_total += 1;
                } else {
                    result.failed_total += 1;
                }
                if done >= clock.window_start && done < clock.stop {
                    result.requests += 1;
                    if status != 200 {
                        result.errors += 1;
                    }
                    let micros = done.duration_since(intended).as_micros() as u64;
                    let _ = result.latency.record(micros.max(1));
                }
                if !keep_alive || client.new_connections {
                    stream = None;
                }
            }
            Err(error) => {
                note_error(&mut result, &error);
                result.failed_total += 1;
                count_error(&mut result, &clock, done);
                stream = None;
            }
        }
    }
    result
}

fn note_error(result: &mut LoadResult, error: &std::io::Error) {
    if result.first_error.is_none() {
        result.first_error = Some(error.to_string());
    }
}

fn count_error(result: &mut LoadResult, clock: &Clock, at: Instant) {
    if at >= clock.window_start && at < clock.stop {
        result.requests += 1;
        result.errors += 1;
    }
}

struct Answer {
    status: u16,
    keep_alive: bool,
}

/// Writes one request and reads its answer whole.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
    buffer: &mut Vec<u8>,
) -> std::io::Result<Answer> {
    stream.write_all(request).await?;
    // A TLS stream may hold the record it sealed until flushed; a socket's
    // flush does nothing.
    stream.flush().await?;
    buffer.clear();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buffer) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.unwrap_or(0);
                let mut content_length = 0usize;
                let mut chunked = false;
                let mut keep_alive = response.version == Some(1);
                for header in response.headers.iter() {
                    if header.name.eq_ignore_ascii_case("content-length") {
                        content_length = std::str::from_utf8(header.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| std::io::Error::other("bad content-length"))?;
                    } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = true;
                    } else if header.name.eq_ignore_ascii_case("connection") {
                        keep_alive = !header.value.eq_ignore_ascii_case(b"close");
                    }
                }
                read_body(stream, buffer, head_len, content_length, chunked).await?;
                return Ok(Answer { status, keep_alive });
            }
            Ok(httparse::Status::Partial) => read_more(stream, buffer).await?,
            Err(error) => return Err(std::io::Error::other(error)),
        }
    }
}

async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
    head_len: usize,
    content_length: usize,
    chunked: bool,
) -> std::io::Result<()> {
    if chunked {
        // The servers measured here send at most a small chunked body:
        // read until its terminating zero-length chunk.
        while !buffer[head_len..].ends_with(b"0\r\n\r\n") {
            read_more(stream, buffer).await?;
        }
        return Ok(());
    }
    while buffer.len() < head_len + content_length {
        read_more(stream, buffer).await?;
    }
    Ok(())
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
) -> std::io::Result<()> {
    let len = buffer.len();
    buffer.resize(len + 4096, 0);
    let n = stream.read(&mut buffer[len..]).await;
    match n {
        Ok(0) => {
            buffer.truncate(len);
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
        Ok(n) => {
            buffer.truncate(len + n);
            Ok(())
        }
        Err(error) => {
            buffer.truncate(len);
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::{HandshakeKind, ServerConfig};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use crate::layout::{CpuList, available_cpus};

    #[derive(Default)]
    struct Handshakes {
        full: AtomicU64,
        resumed: AtomicU64,
    }

    /// An HTTPS server on the bench's certificate that answers every
    /// request 200 and counts the handshakes, full and resumed (it offers
    /// resumption: the client is what must refuse it).
    fn https_server(files: &crate::tls::Certificates) -> (SocketAddr, Arc<Handshakes>) {
        let chain = CertificateDer::pem_file_iter(&files.chain)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Handshakes::default());
        let counted = Arc::clone(&handshakes);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let (acceptor, counted) = (acceptor.clone(), Arc::clone(&counted));
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        match tls.get_ref().1.handshake_kind() {
                            Some(HandshakeKind::Resumed) => &counted.resumed,
                            _ => &counted.full,
                        }
                        .fetch_add(1, Ordering::SeqCst);
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while tls.read_exact(&mut byte).await.is_ok() {
                            head.push(byte[0]);
                            if !head.ends_with(b"\r\n\r\n") {
                                continue;
                            }
                            let close = head.ends_with(b"connection: close\r\n\r\n");
                            let answer: &[u8] = if close {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            };
                            head.clear();
                            if tls.write_all(answer).await.is_err() || close {
                                let _ = tls.shutdown().await;
                                return;
                            }
                        }
                    });
                }
            });
        });
        (addr, handshakes)
    }

    fn load(addr: SocketAddr, tls: Arc<ClientConfig>, new_connections: bool) -> LoadResult {
        let spec = LoadSpec {
            target: addr,
            connections: 4,
            cpus: CpuList(vec![available_cpus()[0]]),
            warmup: Duration::ZERO,
            duration: Duration::from_millis(300),
            rate: None,
            new_connections,
            tls: Some(tls),
            stalled: 0,
            idle: 0,
        };
        let (result, (), ()) = run(&spec, || ()).unwrap();
        assert_eq!(result.first_error, None);
        assert_eq!(result.failed_total, 0);
        assert!(result.ok_total > 4, "{result:?}");
        result
    }

    #[test]
    fn keep_alive_makes_one_handshake_a_connection_and_new_connections_one_full_a_request() {
        let _alone = crate::cpu::PROCESS_CPU
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("bench-load-test-{}", std::process::id()));
        let files = crate::tls::generate(&dir).unwrap();
        let (addr, handshakes) = https_server(&files);
        std::fs::remove_dir_all(&dir).unwrap();
        let negotiated = tls_probe(addr, files.client_config(false).unwrap()).unwrap();
        assert_eq!(
            negotiated,
            "TLSv1_3, TLS13_AES_256_GCM_SHA384, X25519, ALPN none, full handshake"
        );
        // The server counts the probe's handshake on its own time.
        while handshakes.full.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        handshakes.full.store(0, Ordering::SeqCst);

        load(addr, files.client_config(true).unwrap(), false);
        assert_eq!(handshakes.full.load(Ordering::SeqCst), 4);
        assert_eq!(handshakes.resumed.load(Ordering::SeqCst), 0);

        handshakes.full.store(0, Ordering::SeqCst);
        let result = load(addr, files.client_config(false).unwrap(), true);
        assert_eq!(handshakes.full.load(Ordering::SeqCst), result.ok_total);
        assert_eq!(handshakes.resumed.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_stalled_client_sends_the_start_of_a_handshake_and_comes_back_when_closed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let starts = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Instant::now() + Duration::from_secs(2);
            let client = tokio::spawn(stall(addr, true, Instant::now(), stop));
            // The server closes each connection once it has the 5 bytes.
            let mut starts = Vec::new();
            for _ in 0..3 {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut start = [0u8; 5];
                tcp.read_exact(&mut start).await.unwrap();
                starts.push(start);
            }
            client.await.unwrap();
            starts
        });
        assert_eq!(starts, [[0x16, 0x03, 0x01, 0x02, 0x00]; 3]);
    }

    #[test]
    fn an_idle_client_makes_one_request_then_waits_and_comes_back_when_closed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = Client {
                target: listener.local_addr().unwrap(),
                tls: None,
                new_connections: false,
            };
            let stop = Instant::now() + Duration::from_secs(2);
            let idle = tokio::spawn(stay_idle(client, Instant::now(), stop));
            // Closed by the server after the first two answers, the client
            // comes back; the last connection it holds until the stop.
            let mut last = None;
            for answer in ["200 OK", "200 OK", "503 Service Unavailable"] {
                drop(last.take());
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    assert_eq!(tcp.read(&mut byte).await.unwrap(), 1);
                    head.push(byte[0]);
                }
                assert!(head.starts_with(b"GET / HTTP/1.1\r\n"));
                let response = format!("HTTP/1.1 {answer}\r\ncontent-length: 2\r\n\r\nok");
                tcp.write_all(response.as_bytes()).await.unwrap();
                let mut byte = [0u8];
                let quiet = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut byte));
                assert!(quiet.await.is_err(), "the idle client sent more");
                last = Some(tcp);
            }
            let result = idle.await.unwrap();
            drop(last);
            result
        });
        assert_eq!((result.ok_total, result.failed_total), (2, 1));
    }

    #[test]
    fn a_server_the_client_does_not_trust_fails_with_rustls_reason() {
        let dir = std::env::temp_dir().join(format!("bench-load-test2-{}", std::process::id()));
        let served = crate::tls::generate(&dir.join("served")).unwrap();
        let other = crate::tls::generate(&dir.join("other")).unwrap();
        let (addr, _) = https_server(&served);
        std::fs::remove_dir_all(&dir).unwrap();
        let error = tls_probe(addr, other.client_config(false).unwrap()).unwrap_err();
        // Both CAs bear the same name: the signature is what gives it away.
        assert!(
            error.to_string().contains("invalid peer certificate"),
            "{error}"
        );
    }
}
