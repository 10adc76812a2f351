//! Connection lifetimes and process lifetime: header-read and idle
//! timeouts, parked idle connections, the connection cap, SIGTERM, and
//! the signals that must not end the process, during start-up too.

mod common;

use std::time::{Duration, Instant};

use common::{
    Backend, Behaviour, Client, GatewayConfig, Process, TestUpstream, Threading, read_until_close,
    read_welcomes,
};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long until the server closes `stream`, waiting at most `limit`.
async fn time_to_close(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    read_until_close(stream, limit).await;
    started.elapsed()
}

/// Longer than the gateway waits before parking an idle connection
/// (taking hyper's connection apart, keeping only the socket).
const PARKED: Duration = Duration::from_millis(600);

/// A parked connection serves on as before: a visit, then a pipelined
/// pair (both answered, in order), then a request whose head comes in two
/// parts, each counted once; a half-close after a request is answered,
/// then closed.
async fn a_parked_connection_serves_on(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let mut stream = TcpStream::connect(gateway.addr("public")).await.unwrap();
    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    stream.write_all(GET).await.unwrap();
    read_welcomes(&mut stream, 1).await;

    tokio::time::sleep(PARKED).await;
    stream.write_all(GET).await.unwrap();
    read_welcomes(&mut stream, 1).await;

    tokio::time::sleep(PARKED).await;
    stream.write_all(&[GET, GET].concat()).await.unwrap();
    let pair = read_welcomes(&mut stream, 2).await;
    assert_eq!(pair.matches("HTTP/1.1 200 OK").count(), 2, "{pair}");

    tokio::time::sleep(PARKED).await;
    stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(b"host: x\r\n\r\n").await.unwrap();
    read_welcomes(&mut stream, 1).await;

    tokio::time::sleep(PARKED).await;
    stream.write_all(GET).await.unwrap();
    stream.shutdown().await.unwrap();
    let last = read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert!(last.contains("Welcome to my site!"), "{last}");
    assert_eq!(upstream.accepted_visits(), 6, "every visit counted once");
}

/// A parked connection's timeouts hold: the idle timeout from its last
/// answer, and the header-read timeout for a head begun after it woke.
async fn a_parked_connection_keeps_its_timeouts(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("header_read_timeout_ms = 1000\nidle_timeout_ms = 1500")
        .start();
    let mut idle = TcpStream::connect(gateway.addr("public")).await.unwrap();
    let mut slow = TcpStream::connect(gateway.addr("public")).await.unwrap();
    for stream in [&mut idle, &mut slow] {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        read_welcomes(stream, 1).await;
    }
    tokio::time::sleep(PARKED).await;
    slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let began = Instant::now();
    let (idle_closed, slow_closed) = tokio::join!(
        time_to_close(&mut idle, Duration::from_secs(5)),
        time_to_close(&mut slow, Duration::from_secs(5)),
    );
    // The idle one: 1.5 s from its answer, PARKED of which had passed.
    let idle_closed = idle_closed + PARKED;
    assert!(
        idle_closed >= Duration::from_millis(1400) && idle_closed < Duration::from_millis(3500),
        "idle closed after {idle_closed:?}"
    );
    assert!(
        slow_closed >= Duration::from_millis(900) && slow_closed < Duration::from_millis(3000),
        "the slow head closed after {slow_closed:?} ({:?} since it began)",
        began.elapsed()
    );
}

/// SIGTERM closes parked connections at once and exits 0.
async fn sigterm_closes_parked_connections_at_once(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("shutdown_timeout_ms = 10000")
        .start();
    let mut parked = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(gateway.addr("public")).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        read_welcomes(&mut stream, 1).await;
        parked.push(stream);
    }
    tokio::time::sleep(PARKED).await;
    gateway.terminate();
    for stream in &mut parked {
        let took = time_to_close(stream, Duration::from_secs(5)).await;
        assert!(took < Duration::from_secs(2), "closed after {took:?}");
    }
    gateway.assert_exits_0_within(Duration::from_secs(5)).await;
}

async fn idle_keep_alive_outlives_the_header_timeout(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("header_read_timeout_ms = 300\nidle_timeout_ms = 1500")
        .start();
    let mut client = Client::connect(gateway.addr("public")).await;
    assert_eq!(client.get("/").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Idle longer than the header timeout, shorter than the idle timeout.
    assert_eq!(client.get("/").await.status, StatusCode::OK);
}

async fn idle_connection_is_closed_after_idle_timeout(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("header_read_timeout_ms = 300\nidle_timeout_ms = 1000")
        .start();
    let mut stream = TcpStream::connect(gateway.addr("public")).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let took = time_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(took < Duration::from_millis(2500), "closed after {took:?}");
}

async fn silent_and_slow_clients_are_closed_at_the_header_timeout(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("header_read_timeout_ms = 500\nidle_timeout_ms = 10000")
        .start();
    let addr = gateway.addr("public");

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let took = time_to_close(&mut silent, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(400),
        "silent closed after {took:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "silent closed after {took:?}"
    );

    // A head trickled a byte at a time never completes in time.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let trickle = async {
        for byte in b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    trickle.await;
    let rest = read_until_close(&mut slow, Duration::from_secs(3)).await;
    let closed_by = started.elapsed();
    // The trickle would take 2.5s; the server stops reading it at 0.5s.
    assert!(
        closed_by < Duration::from_millis(1500),
        "closed after {closed_by:?}"
    );
    assert!(!rest.contains("200 OK"), "{rest}");
    assert_eq!(upstream.posts(), 0);
}

async fn connections_over_the_cap_wait_in_the_backlog(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("max_connections = 2")
        .start();
    let addr = gateway.addr("public");
    let mut first = Client::connect(addr).await;
    let mut second = Client::connect(addr).await;
    assert_eq!(first.get("/").await.status, StatusCode::OK);
    assert_eq!(second.get("/").await.status, StatusCode::OK);

    // The third connects (the kernel's backlog) but is not served...
    let third = tokio::spawn(async move { Client::connect(addr).await.get("/").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served at a cap of 2"
    );
    // ...until one of the others closes.
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once below the cap")
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(second.get("/").await.status, StatusCode::OK);
}

async fn sigterm_answers_requests_in_flight_and_exits_0(backend: Backend) {
    sigterm_with_100_visits_in_flight(backend, 2, Threading::PerCore).await;
}

async fn sigterm_on_one_worker_answers_requests_in_flight(backend: Backend) {
    sigterm_with_100_visits_in_flight(backend, 1, Threading::Shared).await;
}

async fn sigterm_shared_answers_requests_in_flight(backend: Backend) {
    sigterm_with_100_visits_in_flight(backend, 2, Threading::Shared).await;
}

async fn sigterm_with_100_visits_in_flight(backend: Backend, workers: usize, threading: Threading) {
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(700))).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .workers(workers)
        .threading(threading)
        .start();
    let addr = gateway.addr("public");

    // Idle keep-alive connections, to be closed at once.
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut client = Client::connect(addr).await;
        upstream.set(Behaviour::Ok);
        assert_eq!(client.get("/").await.status, StatusCode::OK);
        idle.push(client);
    }
    upstream.set(Behaviour::Delay(Duration::from_millis(700)));
    let mut in_flight = tokio::task::JoinSet::new();
    for _ in 0..100 {
        in_flight.spawn(common::get(addr, "/"));
    }
    // Every visit has reached the upstream before the signal.
    upstream.wait_for_posts(120).await;
    gateway.terminate();
    let mut answered = 0;
    while let Some(answer) = in_flight.join_next().await {
        assert_eq!(answer.unwrap().status, StatusCode::OK);
        answered += 1;
    }
    assert_eq!(answered, 100);
    gateway.assert_exits_0_within(Duration::from_secs(5)).await;
    // New connections are refused once it has gone.
    assert!(TcpStream::connect(addr).await.is_err());
}

/// Every listener holds a connection that will not finish by itself: a
/// visit the upstream never answers, and half a request head on each of
/// the public, admin and counter listeners. They drain one after another,
/// yet the stop must take one `shutdown_timeout_ms` in all.
async fn sigterm_closes_what_is_left_within_one_shutdown_timeout(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Hang).await;
    let mut config = GatewayConfig::new(backend, upstream.addr)
        .server("shutdown_timeout_ms = 1500\nheader_read_timeout_ms = 60000")
        .upstream("request_timeout_ms = 60000")
        .with_admin();
    config.counter = true;
    let gateway = config.start();

    let mut visit = TcpStream::connect(gateway.addr("public")).await.unwrap();
    visit
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    upstream.wait_for_posts(1).await;
    let mut half_heads = Vec::new();
    for (listener, path) in [
        ("public", "/nowhere"),
        ("admin", "/healthz"),
        ("counter", "/counter"),
    ] {
        // One whole exchange first, so the connection is surely accepted
        // and served, then half of the next request's head.
        let mut stream = TcpStream::connect(gateway.addr(listener)).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "{listener} closed the connection");
            answer.extend_from_slice(&buf[..n]);
        }
        stream.write_all(b"GET / HTTP/1.1\r\nhos").await.unwrap();
        half_heads.push(stream);
    }
    // Let the gateway read the half heads before the signal.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    gateway.terminate();
    gateway.assert_exits_0_within(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    // It waited for the unanswered visit, then closed everything at once:
    // three listeners draining in turn with a deadline each took 4.5 s.
    assert!(took >= Duration::from_millis(1400), "exited after {took:?}");
    assert!(took < Duration::from_millis(3000), "exited after {took:?}");
    assert_eq!(
        read_until_close(&mut visit, Duration::from_secs(1)).await,
        ""
    );
}

/// The built-in counter keeps idle keep-alive connections for at least
/// 120 s, whatever the public listener's idle timeout (README, "Built-in
/// counter"): the gateway's own pool must not find them closed under it.
async fn the_counter_outlasts_the_public_idle_timeout(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let mut config = GatewayConfig::new(backend, upstream.addr)
        .server("idle_timeout_ms = 300\nheader_read_timeout_ms = 300");
    config.counter = true;
    let gateway = config.start();
    let mut counter = Client::connect(gateway.addr("counter")).await;
    let mut public = Client::connect(gateway.addr("public")).await;
    assert_eq!(counter.get("/counter").await.status, StatusCode::OK);
    assert_eq!(public.get("/").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let again = counter.send(common::request("GET", "/counter")).await;
    assert_eq!(
        again.expect("the counter kept the connection").status,
        StatusCode::OK
    );
    assert!(
        public.send(common::request("GET", "/")).await.is_err(),
        "the public listener closed its idle connection"
    );
}

/// SIGINT (Ctrl-C in a terminal) stops the daemon as SIGTERM does.
async fn sigint_answers_the_request_in_flight_and_exits_0(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(500))).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let visit = tokio::spawn(common::get(gateway.addr("public"), "/"));
    upstream.wait_for_posts(1).await;
    gateway.signal("INT");
    assert_eq!(visit.await.unwrap().status, StatusCode::OK);
    let gateway = gateway.assert_exits_0_within(Duration::from_secs(5)).await;
    assert!(gateway.log_text().contains("shutdown signal received"));
}

/// SIGHUP, SIGUSR1, SIGUSR2 and SIGALRM (whose default action would end the
/// process with every visit in flight unanswered) are logged and ignored:
/// every visit in flight is answered, and the gateway serves on.
async fn stray_signals_neither_stop_nor_disturb_the_daemon(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(300))).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let addr = gateway.addr("public");
    let mut in_flight = tokio::task::JoinSet::new();
    for _ in 0..20 {
        in_flight.spawn(common::get(addr, "/"));
    }
    upstream.wait_for_posts(20).await;
    for signal in ["HUP", "USR1", "USR2", "ALRM", "HUP"] {
        gateway.signal(signal);
    }
    while let Some(answer) = in_flight.join_next().await {
        assert_eq!(answer.unwrap().status, StatusCode::OK);
    }
    upstream.set(Behaviour::Ok);
    assert_eq!(common::get(addr, "/").await.status, StatusCode::OK);
    let log = gateway.log_text();
    for name in ["SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM"] {
        assert!(log.contains(name), "{name} not logged: {log}");
    }
    gateway.terminate();
    gateway.assert_exits_0_within(Duration::from_secs(5)).await;
}

/// A SIGHUP (`systemctl reload`) or SIGUSR1 that comes while the daemon
/// still starts, its database slow to answer, neither ends it nor is lost:
/// once up, it reloads the configuration changed meanwhile, and says the
/// other was ignored.
async fn signals_during_a_slow_start_are_acted_on_once_up(backend: Backend) {
    // A "database" that takes the counter's connection and says nothing
    // until the test closes it.
    let database = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let counter = TestUpstream::closed_port().await;
    let folder = tempfile::tempdir().unwrap();
    let config_path = folder.path().join("gateway.toml");
    let config = |level: &str| {
        format!(
            "[runtime]\nbackend = \"{}\"\nworkers = 2\n[server]\nlisten = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"http://{counter}/counter\"\n\
             [counter]\nlisten = \"{counter}\"\nstore = \"postgres\"\n\
             postgres_url = \"postgres://gateway@{}/gateway\"\n[log]\nlevel = \"{level}\"\n",
            backend.name(),
            database.local_addr().unwrap(),
        )
    };
    std::fs::write(&config_path, config("info")).unwrap();
    let mut command = std::process::Command::new(common::gateway_binary());
    command
        .arg("--config")
        .arg(&config_path)
        .env_remove("RUST_LOG");
    let mut gateway = Process::spawn_command(command);
    let (connection, _) = tokio::time::timeout(Duration::from_secs(10), database.accept())
        .await
        .expect("the counter connects to its database")
        .unwrap();
    // It is opening its store: the start is under way.
    std::fs::write(&config_path, config("debug")).unwrap();
    gateway.signal("HUP");
    gateway.signal("USR1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(connection);
    let mut gateway = tokio::task::spawn_blocking(move || {
        gateway.wait_for_listeners(2);
        gateway
    })
    .await
    .unwrap();
    gateway
        .wait_for_log_line(0, |line| {
            line.contains("SIGUSR1") && line.contains("signal during start-up ignored")
        })
        .await;
    gateway
        .wait_for_log_line(0, |line| {
            line.contains("SIGHUP during start-up: reloading the configuration")
        })
        .await;
    gateway
        .wait_for_log_line(0, |line| {
            line.contains("reloaded") && line.contains("log.level")
        })
        .await;
    gateway.signal("HUP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gateway.child.try_wait().unwrap(),
        None,
        "a later SIGHUP ended it"
    );
    gateway.terminate();
    gateway.assert_exits_0_within(Duration::from_secs(5)).await;
}

/// Under an open-file limit below what the connection caps need, the
/// gateway warns; `gateway counter`, which has no such caps, does not.
async fn only_the_caps_in_use_are_held_against_the_open_file_limit(backend: Backend) {
    const WARNING: &str = "the open-file limit is below";
    let limited = |arguments: &[&str]| {
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
            .arg(common::gateway_binary())
            .args(arguments)
            .env_remove("RUST_LOG");
        command
    };
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let config = GatewayConfig::new(backend, upstream.addr);
    let gateway = config.start_with(|command| {
        let config_file = command.get_args().nth(1).unwrap().to_owned();
        *command = limited(&["--config", config_file.to_str().unwrap()]);
    });
    gateway
        .wait_for_log_line(0, |line| line.contains(WARNING))
        .await;

    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("counter.state");
    let mut command = limited(&[
        "counter",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        backend.name(),
    ]);
    command.arg("--path").arg(&path);
    let counter = Process::start_command(command, 1);
    common::counter_tally(counter.addr("counter")).await;
    let log = counter.log_text();
    assert!(!log.contains(WARNING), "{log}");
}

/// Log lines carry a timestamp, except under journald (`JOURNAL_STREAM`
/// set), which stamps them itself.
async fn log_lines_are_timestamped_except_under_journald(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let config = GatewayConfig::new(backend, upstream.addr);
    let year = |line: &str| line.get(..4).is_some_and(|y| y.parse::<u16>().is_ok());

    let plain = config.start();
    let text = plain.log_text();
    let first = text.lines().next().unwrap_or_default();
    assert!(year(first), "no timestamp: {first}");

    let journald = config.start_with(|command| {
        command.env("JOURNAL_STREAM", "8:12345");
    });
    let text = journald.log_text();
    let first = text.lines().next().unwrap_or_default();
    let level = first.split_whitespace().next().unwrap_or_default();
    assert!(
        ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
        "expected the level first, no timestamp: {first}"
    );
}

both_backends!(
    a_parked_connection_serves_on,
    a_parked_connection_keeps_its_timeouts,
    sigterm_closes_parked_connections_at_once,
    idle_keep_alive_outlives_the_header_timeout,
    idle_connection_is_closed_after_idle_timeout,
    silent_and_slow_clients_are_closed_at_the_header_timeout,
    connections_over_the_cap_wait_in_the_backlog,
    sigterm_answers_requests_in_flight_and_exits_0,
    sigterm_on_one_worker_answers_requests_in_flight,
    sigterm_shared_answers_requests_in_flight,
    sigterm_closes_what_is_left_within_one_shutdown_timeout,
    sigint_answers_the_request_in_flight_and_exits_0,
    stray_signals_neither_stop_nor_disturb_the_daemon,
    signals_during_a_slow_start_are_acted_on_once_up,
    only_the_caps_in_use_are_held_against_the_open_file_limit,
    the_counter_outlasts_the_public_idle_timeout,
    log_lines_are_timestamped_except_under_journald,
);
