//! docs/systemd.md, "Restarts and switching backend": sd_notify, socket activation, and replacing the running
//! gateway (alternating backends) without a refused connection or a
//! failed request.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Behaviour, Client, GatewayConfig, TestUpstream, Threading, start_counter};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Collects notifications sent to a datagram socket, as systemd's
/// `NOTIFY_SOCKET` receives them.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    /// Messages received until one contains `needle`, or `limit` passes.
    fn until(&self, needle: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = message.contains(needle);
                seen.push(message);
                if done {
                    return seen;
                }
            }
        }
        panic!("no {needle:?} within {limit:?}; got {seen:?}");
    }
}

async fn notifies_ready_watchdog_status_and_stopping(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let notify = NotifySocket::bind();
    let path = notify.path.clone();
    let mut gateway = GatewayConfig::new(backend, upstream.addr).start_with(|command| {
        command
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "400000");
    });
    let ready = notify.until("READY=1", Duration::from_secs(5));
    let ready = ready.last().unwrap();
    assert!(
        ready.contains(&format!("STATUS={} with 2 workers", backend.name())),
        "{ready}"
    );

    // Pings at half the watchdog timeout, from the runtime.
    let started = Instant::now();
    notify.until("WATCHDOG=1", Duration::from_secs(2));
    notify.until("WATCHDOG=1", Duration::from_secs(2));
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );

    // The status line counts requests served.
    for _ in 0..3 {
        assert_eq!(
            common::get(gateway.addr("public"), "/").await.status,
            StatusCode::OK
        );
    }
    let status = notify.until("3 requests served", Duration::from_secs(8));
    assert!(status.last().unwrap().starts_with("STATUS="), "{status:?}");

    gateway.terminate();
    let stopping = notify.until("STOPPING=1", Duration::from_secs(5));
    assert!(
        stopping.last().unwrap().contains("STATUS=stopping"),
        "{stopping:?}"
    );
    let status = gateway.wait_exit(Duration::from_secs(5)).expect("exited");
    assert_eq!(status.code(), Some(0));
}

async fn serves_the_socket_systemd_passes(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // server.listen names another port: it must not be used.
    let mut config = GatewayConfig::new(backend, upstream.addr);
    config.listen = "127.0.0.1:1".to_owned();
    let gateway = config.start_activated(&listener);
    assert_eq!(gateway.addr("public"), addr);
    let answer = common::get(addr, "/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "Welcome to my site!");
    assert!(
        gateway.log_text().contains("passed by systemd"),
        "{}",
        gateway.log_text()
    );
}

/// sd_listen_fds(3): `LISTEN_FDS` counts only for the process
/// `LISTEN_PID` names. Inherited without it, or naming another process,
/// the socket at fd 3 is not this gateway's to serve.
async fn sockets_passed_to_another_process_are_left_alone(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let passed = listener.local_addr().unwrap();
    for environment in ["LISTEN_FDS=1", "LISTEN_PID=1 LISTEN_FDS=1"] {
        let gateway =
            GatewayConfig::new(backend, upstream.addr).start_passing(&listener, environment);
        let own = gateway.addr("public");
        assert_ne!(own, passed, "{environment}: served the passed socket");
        assert_eq!(common::get(own, "/").await.status, StatusCode::OK);
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    retried: AtomicU64,
}

/// New connection per request, as a browser opening a page would.
async fn fresh_connection_load(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => stream,
            Err(_) => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let mut reply = String::new();
        let exchange = async {
            stream
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await?;
            stream.read_to_string(&mut reply).await
        };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Ok(_))
                if reply.starts_with("HTTP/1.1 200 OK")
                    && reply.ends_with("Welcome to my site!") =>
            {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                eprintln!("fresh connection failed: {other:?} {reply:?}");
                tally.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Keep-alive client that, like any HTTP client, retries a request once
/// on a new connection when the reused one turns out to have been closed
/// before any answer came.
async fn keep_alive_load(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let reused = client.is_some();
        let connection = match &mut client {
            Some(connection) => connection,
            None => match tokio::time::timeout(Duration::from_secs(10), Client::try_connect(addr))
                .await
            {
                Ok(Ok(connection)) => client.insert(connection),
                _ => {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        match tokio::time::timeout(
            Duration::from_secs(10),
            connection.send(common::request("GET", "/")),
        )
        .await
        {
            Ok(Ok(answer)) if answer.status == StatusCode::OK => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                if answer
                    .headers
                    .get("connection")
                    .is_some_and(|v| v == "close")
                {
                    client = None;
                }
            }
            Ok(Err(_)) if reused => {
                // Closed between requests: no answer, so not processed.
                tally.retried.fetch_add(1, Ordering::Relaxed);
                client = None;
            }
            other => {
                eprintln!("keep-alive request failed: {other:?}");
                tally.failed.fetch_add(1, Ordering::Relaxed);
                client = None;
            }
        }
    }
}

async fn switching_backend_or_threading_refuses_nothing_and_fails_nothing(first: Backend) {
    let counter = start_counter(Backend::Tokio);
    let counter_addr = counter.addr("counter");
    // The socket outlives every gateway, as systemd's gateway.socket does.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(4096).unwrap();
    let listener: std::net::TcpListener = socket.into();
    let addr = listener.local_addr().unwrap();

    let other = common::other_backend(first);
    let mut gateway = GatewayConfig::new(first, counter_addr).start_activated(&listener);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..6 {
        load.spawn(fresh_connection_load(addr, stop.clone(), tally.clone()));
        load.spawn(keep_alive_load(addr, stop.clone(), tally.clone()));
    }

    // Each restart also switches `runtime.threading`, so the socket is
    // served in turn by one accept loop and by one per worker.
    let mut served_by = vec![(first, Threading::Shared)];
    for generation in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        // `systemctl restart`: stop the old one, then start the new one.
        gateway.terminate();
        gateway.assert_exits_0_within(Duration::from_secs(10)).await;
        let (next, threading) = if generation % 2 == 0 {
            (other, Threading::PerCore)
        } else {
            (first, Threading::Shared)
        };
        served_by.push((next, threading));
        gateway = GatewayConfig::new(next, counter_addr)
            .threading(threading)
            .start_activated(&listener);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(result) = load.join_next().await {
        result.unwrap();
    }
    gateway.terminate();
    let ok = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "served by {served_by:?}: {ok} ok, {} retried on a closed idle connection",
        tally.retried.load(Ordering::Relaxed)
    );
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failed requests");
    assert_eq!(
        tally.refused.load(Ordering::Relaxed),
        0,
        "refused connections"
    );
    assert!(ok > 100, "only {ok} requests");
    assert_eq!(common::counter_tally(counter_addr).await, ok);
}

async fn sigterm_with_many_idle_connections_exits_at_once(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let addr = gateway.addr("public");
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let mut client = Client::connect(addr).await;
        assert_eq!(client.get("/").await.status, StatusCode::OK);
        idle.push(client);
    }
    let signalled = Instant::now();
    gateway.terminate();
    gateway.assert_exits_0_within(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    eprintln!("SIGTERM to exit with 1000 idle keep-alive connections: {took:?}");
    // Idle connections are closed at once, not waited out (the shutdown
    // timeout is 10 s).
    assert!(took < Duration::from_secs(3), "{took:?}");
}

both_backends!(
    sockets_passed_to_another_process_are_left_alone,
    notifies_ready_watchdog_status_and_stopping,
    serves_the_socket_systemd_passes,
    switching_backend_or_threading_refuses_nothing_and_fails_nothing,
    sigterm_with_many_idle_connections_exits_at_once,
);
