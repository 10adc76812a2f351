//! A bounded soak: mixed good and bad traffic against an upstream that
//! keeps failing in different ways; afterwards the gateway holds the same
//! file descriptors as after the warm-up, its memory is within a small
//! bound of that level, and the count is exact: every 200 counted once.
//!
//! Ignored by default (it runs for a while):
//! `GATEWAY_SOAK_SECS=300 cargo test --release -p gateway --test soak -- --ignored --nocapture`.
//! CI runs it for 20 s per backend.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Behaviour, Client, GatewayConfig, TestUpstream, request};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// What the clients saw: tag → status.
type Seen = Arc<std::sync::Mutex<Vec<(String, StatusCode)>>>;

async fn traffic(public: SocketAddr, stop: Arc<AtomicBool>, seen: Seen, worker: usize, phase: u8) {
    let mut i = 0u64;
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        match i % 10 {
            // Malformed and abandoned requests.
            0 => {
                let _ =
                    common::raw_exchange(public, b"GARBAGE\r\n\r\n", Duration::from_secs(2)).await;
            }
            1 => {
                if let Ok(mut s) = TcpStream::connect(public).await {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-half").await;
                }
            }
            2 => {
                let _ = common::raw_exchange(
                    public,
                    b"GET /missing HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                    Duration::from_secs(5),
                )
                .await;
            }
            // Tagged visits on a kept-alive connection, and on new ones.
            n => {
                // Unique per visit: phase, worker and sequence number.
                let tag = format!("p{phase}-w{worker}-{i}");
                let fresh = n == 3;
                if fresh || client.is_none() {
                    client = Client::try_connect(public).await.ok();
                }
                let Some(connection) = client.as_mut() else {
                    continue;
                };
                let mut visit = request("GET", "/");
                visit
                    .headers_mut()
                    .insert("x-forwarded-for", tag.parse().unwrap());
                match tokio::time::timeout(Duration::from_secs(10), connection.send(visit)).await {
                    Ok(Ok(answer)) => seen.lock().unwrap().push((tag, answer.status)),
                    _ => client = None,
                }
                if fresh {
                    client = None;
                }
            }
        }
    }
}

async fn run_phase(
    public: SocketAddr,
    upstream: &mut TestUpstream,
    length: Duration,
    seen: Seen,
    phase: u8,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..6 {
        tasks.spawn(traffic(public, stop.clone(), seen.clone(), worker, phase));
    }
    // The upstream cycles through its failures meanwhile.
    let started = Instant::now();
    let mut step = 0;
    while started.elapsed() < length {
        match step % 6 {
            0 => upstream.set(Behaviour::Ok),
            1 => upstream.set(Behaviour::Flaky),
            2 => upstream.set(Behaviour::Status(500)),
            3 => upstream.set(Behaviour::Delay(Duration::from_millis(30))),
            4 => upstream.stop().await,
            _ => {
                upstream.restart().await;
                upstream.set(Behaviour::Ok);
            }
        }
        step += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    upstream.restart().await;
    upstream.set(Behaviour::Ok);
    stop.store(true, Ordering::Relaxed);
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
}

async fn soak(backend: Backend) {
    let total = Duration::from_secs(
        std::env::var("GATEWAY_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let warmup = total / 5;
    let mut upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("header_read_timeout_ms = 1000")
        .upstream("pool_idle_timeout_ms = 500\nrequest_timeout_ms = 1000")
        .start();
    let public = gateway.addr("public");
    let pid = gateway.child.id();
    let seen: Seen = Arc::default();

    run_phase(public, &mut upstream, warmup, seen.clone(), 0).await;
    // Quiet: half-sent heads time out, the pool's idle connections close.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));

    run_phase(public, &mut upstream, total - warmup, seen.clone(), 1).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (fds_after, rss_after) = (open_fds(pid), rss_kib(pid));

    let seen = seen.lock().unwrap().clone();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for (_, status) in &seen {
        *statuses.entry(status.as_u16()).or_default() += 1;
    }
    eprintln!(
        "{} soak, {:?}: {} visits {:?}; fds {} -> {}; RSS {} KiB -> {} KiB",
        backend.name(),
        total,
        seen.len(),
        statuses,
        fds_before,
        fds_after,
        rss_before,
        rss_after
    );
    assert_eq!(fds_after, fds_before, "file descriptors leaked");
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "RSS grew {rss_before} -> {rss_after} KiB"
    );

    // Exact: each 200 received once; nothing twice.
    let mut received: HashMap<String, usize> = HashMap::new();
    for r in upstream.requests() {
        if let Some(tag) = r
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            let tag = tag.split(',').next().unwrap_or("").trim().to_owned();
            *received.entry(tag).or_default() += 1;
        }
    }
    for (tag, status) in &seen {
        let times = received.get(tag).copied().unwrap_or(0);
        assert!(times <= 1, "{tag} reached the upstream {times} times");
        if *status == StatusCode::OK {
            assert_eq!(times, 1, "{tag} answered 200 but not counted");
        }
        if *status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(times, 0, "{tag} answered 503 but reached the upstream");
        }
    }
    assert!(statuses.get(&200).copied().unwrap_or(0) > 0);
}

/// `soak::backend` for every backend, run only when asked for.
macro_rules! soak_on_every_backend {
    ( ; $([$runtime:path, $variant:path, $backend:ident])*) => {
        mod soak {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "runs for GATEWAY_SOAK_SECS (default 60) per backend"]
                async fn $backend() {
                    super::soak($variant).await
                }
            )*
        }
    };
}

backends::for_every_backend!(soak_on_every_backend!());
