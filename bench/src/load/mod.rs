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
//!
//! With `--http2`, h2load drives the load instead ([`h2load`]).

mod clients;
pub mod h2load;
mod http;
mod result;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use self::clients::{connection, stall, stay_idle};
use self::http::Client;
pub use self::http::tls_probe;
pub use self::result::LoadResult;
use self::result::empty_result;
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

/// When a run starts, when its measured window opens, and when it stops.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    window_start: Instant,
    stop: Instant,
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
    let clock = Clock {
        start,
        window_start,
        stop: window_start + spec.duration,
    };
    let mut handles = Vec::new();
    for thread in 0..threads {
        let cpu = spec.cpus.0[thread % spec.cpus.len()];
        let spec = spec.clone();
        handles.push(std::thread::spawn(
            move || -> std::io::Result<LoadResult> {
                pin_current_thread(cpu);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(load_thread(spec, thread, threads, clock)))
            },
        ));
    }
    std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
    let at_start = sample();
    std::thread::sleep(clock.stop.saturating_duration_since(Instant::now()));
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

/// `thread`'s share of `clients` dealt round-robin over `threads`.
fn dealt(clients: usize, thread: usize, threads: usize) -> usize {
    clients / threads + usize::from(thread < clients % threads)
}

/// What load thread `thread` of `threads` runs: its share of the load's
/// connections, of the stalled clients and of the idle ones, all until
/// the clock's stop; returns their results added up.
async fn load_thread(spec: LoadSpec, thread: usize, threads: usize, clock: Clock) -> LoadResult {
    // Connections dealt round-robin over the threads.
    let tasks: Vec<_> = (0..dealt(spec.connections, thread, threads))
        .map(|i| {
            let index = thread + i * threads;
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
            tokio::spawn(connection(client, clock, schedule))
        })
        .collect();
    // The stalled clients, dealt over the threads like the load. Their
    // first connects spread over the warm-up, so that the server's
    // closes (and their reconnects) are too, as a crowd of slow clients
    // arrives.
    let stalling: Vec<_> = (0..dealt(spec.stalled, thread, threads))
        .map(|i| {
            let index = thread + i * threads;
            let first = clock.start + spec.warmup.mul_f64(index as f64 / spec.stalled as f64);
            tokio::spawn(stall(spec.target, spec.tls.is_some(), first, clock.stop))
        })
        .collect();
    // The idle clients, dealt and spread the same way: their one request
    // each is made in the warm-up.
    let idling: Vec<_> = (0..dealt(spec.idle, thread, threads))
        .map(|i| {
            let index = thread + i * threads;
            let first = clock.start + spec.warmup.mul_f64(index as f64 / spec.idle as f64);
            let client = Client {
                target: spec.target,
                tls: spec.tls.clone().map(TlsConnector::from),
                new_connections: false,
            };
            tokio::spawn(stay_idle(client, first, clock.stop))
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
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::{HandshakeKind, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
