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
//! Each thread runs a single-threaded tokio runtime; requests are fixed
//! bytes and answers are parsed with `httparse`, so the client costs far
//! less per request than the servers it measures (see the README for the
//! cross-check against wrk).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
                        tasks.push(tokio::spawn(connection(spec.target, clock, schedule)));
                    }
                    let mut total = empty_result(spec.duration);
                    for task in tasks {
                        if let Ok(result) = task.await {
                            total.merge(result);
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

fn empty_result(window: Duration) -> LoadResult {
    LoadResult {
        requests: 0,
        errors: 0,
        ok_total: 0,
        failed_total: 0,
        latency: new_histogram(),
        window,
    }
}

#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    window_start: Instant,
    stop: Instant,
}

/// One client connection's loop, reconnecting when the server closes it.
async fn connection(
    target: SocketAddr,
    clock: Clock,
    schedule: Option<(Duration, Duration)>,
) -> LoadResult {
    let mut result = empty_result(clock.stop - clock.window_start);
    let request = format!("GET / HTTP/1.1\r\nhost: {target}\r\n\r\n").into_bytes();
    let mut buffer = Vec::with_capacity(4096);
    let mut stream: Option<TcpStream> = None;
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
            match TcpStream::connect(target).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stream = Some(s);
                }
                Err(_) => {
                    count_error(&mut result, &clock, Instant::now());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = stream.as_mut() else { continue };
        let outcome = exchange(s, &request, &mut buffer).await;
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
                if !keep_alive {
                    stream = None;
                }
            }
            Err(_) => {
                result.failed_total += 1;
                count_error(&mut result, &clock, done);
                stream = None;
            }
        }
    }
    result
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
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buffer: &mut Vec<u8>,
) -> std::io::Result<Answer> {
    stream.write_all(request).await?;
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

async fn read_body(
    stream: &mut TcpStream,
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

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<()> {
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
