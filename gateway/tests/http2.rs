//! HTTP/2 on the public listener: h2c with prior knowledge and h2 by
//! ALPN, each beside HTTP/1.1 on the same port; the server's limits and
//! timeouts; shutdown; exact counting over streams; and every abuse the
//! server cuts off, sent as raw frames.

mod common;

use std::time::Duration;

use common::h2::{
    self, CANCEL, CONTINUATION, DATA, END_HEADERS, HEADERS, INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS, NO_ERROR, PING, SETTINGS, frame, header_block,
};
use common::tls::{TlsSite, WELCOME, tls_connect};
use common::{Backend, Behaviour, GatewayConfig, TestUpstream, counter_tally};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

/// Short timeouts, so that a test sees them pass.
const FAST: &str = "header_read_timeout_ms = 1000\nidle_timeout_ms = 1000";

/// SETTINGS_MAX_HEADER_LIST_SIZE.
const MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// A gateway with the built-in counter on a port of its own.
async fn counting_gateway(backend: Backend) -> (common::Process, std::net::SocketAddr) {
    let counter = TestUpstream::closed_port().await;
    let gateway = GatewayConfig::new(backend, counter)
        .with_counter_on(counter)
        .with_admin()
        .start();
    (gateway, counter)
}

async fn prior_knowledge_and_http1_share_the_plain_port(backend: Backend) {
    let (gateway, counter) = counting_gateway(backend).await;
    let public = gateway.addr("public");
    let mut sender = h2::client(public).await;
    let answer = h2::get_over(&mut sender).await.unwrap();
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, WELCOME)
    );
    let answer = common::get(public, "/").await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, WELCOME),
        "HTTP/1.1 on the same port"
    );
    assert_eq!(counter_tally(counter).await, 2, "each counted once");
}

async fn alpn_chooses_h2_or_http1_on_the_tls_port(backend: Backend) {
    let site = TlsSite::start(backend).await;
    let (public, ca) = (site.public, &site.ca);
    let mut config = (*ca.client_config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let stream = tls_connect(public, "localhost", config.into())
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut sender = h2::handshake(hyper_util::rt::TokioIo::new(stream)).await;
    let answer = h2::get_over(&mut sender).await.unwrap();
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, WELCOME)
    );
    // A client offering only HTTP/1.1 gets it.
    let mut client = common::tls::TlsClient::connect(public, ca).await;
    assert_eq!(client.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(client.get("/").await.status, StatusCode::OK);
    assert_eq!(site.upstream.accepted_visits(), 2);
}

/// curl, as a user would try it: `--http2` over TLS and `--http1.1` on
/// the same port, and `--http2-prior-knowledge` on a plain listener.
async fn curl_gets_http2_and_http1_on_each_port(backend: Backend) {
    if !common::require::tool_or_skip("curl", &["--version"], "curl over HTTP/2") {
        return;
    }
    let site = TlsSite::start(backend).await;
    let folder = tempfile::tempdir().unwrap();
    let ca_file = site.ca.write(folder.path(), "ca.pem");
    let port = site.public.port();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let https = format!("https://localhost:{port}/");
    let plain = GatewayConfig::new(backend, site.upstream.addr).start();
    let http = format!("http://{}/", plain.addr("public"));
    let ca_file = ca_file.to_str().unwrap();
    let tls = ["--cacert", ca_file, "--resolve", &resolve];
    for (args, version) in [
        ([&tls[..], &["--http2", &https]].concat(), "2"),
        ([&tls[..], &["--http1.1", &https]].concat(), "1.1"),
        (vec!["--http2-prior-knowledge", &http], "2"),
        (vec![&http[..]], "1.1"),
    ] {
        let args = [&args[..], &["--write-out", " %{http_version} %{http_code}"]].concat();
        let output = common::curl(&args).await;
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("{WELCOME} {version} 200"),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(site.upstream.accepted_visits(), 4);
}

async fn http2_off_leaves_http1_alone(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("http2 = false")
        .start();
    let public = gateway.addr("public");
    let seen = h2::send_and_watch(
        h2::connect(public, &[]).await,
        h2::get(1, true),
        Duration::from_secs(5),
    )
    .await;
    assert!(!seen.answered(1), "{seen:?}");
    assert!(seen.ended(), "{seen:?}");
    assert_eq!(common::get(public, "/").await.status, StatusCode::OK);
    assert_eq!(upstream.accepted_visits(), 1);
}

async fn the_servers_settings_bound_streams_headers_and_windows(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    for (lines, streams, window) in [
        ("", 128, 16384),
        (
            "http2_max_streams = 8\nhttp2_stream_window_bytes = 4096",
            8,
            4096,
        ),
    ] {
        let gateway = GatewayConfig::new(backend, upstream.addr)
            .server(lines)
            .start();
        let mut stream = h2::connect(gateway.addr("public"), &[]).await;
        let seen = h2::read_frames(&mut stream, Duration::from_millis(500)).await;
        let settings = seen
            .frames
            .iter()
            .find(|f| f.kind == SETTINGS && f.flags == 0)
            .unwrap_or_else(|| panic!("no SETTINGS: {seen:?}"));
        assert_eq!(settings.setting(MAX_CONCURRENT_STREAMS), Some(streams));
        assert_eq!(settings.setting(INITIAL_WINDOW_SIZE), Some(window));
        assert_eq!(settings.setting(MAX_HEADER_LIST_SIZE), Some(16384));
    }
}

/// More streams than one connection may have open at once, all at once:
/// every one is answered 200 and counted once.
async fn streams_on_one_connection_are_each_counted_once(backend: Backend) {
    let (gateway, counter) = counting_gateway(backend).await;
    let sender = h2::client(gateway.addr("public")).await;
    let mut visits = JoinSet::new();
    for _ in 0..300 {
        let mut sender = sender.clone();
        visits.spawn(async move { h2::get_over(&mut sender).await.unwrap().status });
    }
    while let Some(status) = visits.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert_eq!(counter_tally(counter).await, 300);
    let metrics = common::scrape(gateway.addr("admin")).await;
    assert_eq!(
        metrics[r#"gateway_requests_total{protocol="h2",status="200"}"#],
        300.0
    );
    assert_eq!(
        metrics[r#"gateway_requests_total{protocol="http/1.1",status="200"}"#],
        0.0
    );
    assert_eq!(
        metrics[r#"gateway_connections_open{protocol="h2"}"#], 1.0,
        "the client's connection"
    );
}

/// With batching on, visits on streams wait for a POST and go together,
/// as visits on connections do.
async fn streams_are_batched_like_connections(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(200))).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .upstream("batch_max = 64")
        .workers(1)
        .start();
    let sender = h2::client(gateway.addr("public")).await;
    let mut visits = JoinSet::new();
    for _ in 0..60 {
        let mut sender = sender.clone();
        visits.spawn(async move { h2::get_over(&mut sender).await.unwrap().status });
    }
    while let Some(status) = visits.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert_eq!(upstream.accepted_visits(), 60, "each counted once");
    assert!(upstream.posts() < 60, "{} POSTs", upstream.posts());
}

/// A stream reset while its visit waits for a connection leaves, as a
/// client that leaves does: its POST is never sent. The other stream's
/// visit, whose POST had left, is answered.
async fn a_stream_reset_while_its_visit_waits_is_never_sent(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(600))).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .upstream("max_connections = 1")
        .workers(1)
        .start();
    let mut stream = h2::connect(gateway.addr("public"), &[]).await;
    stream.write_all(&h2::get(1, true)).await.unwrap();
    upstream.wait_for_posts(1).await;
    stream.write_all(&h2::get(3, true)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    stream.write_all(&h2::rst_stream(3, CANCEL)).await.unwrap();
    let seen = h2::read_frames(&mut stream, Duration::from_millis(1500)).await;
    assert!(seen.answered(1), "{seen:?}");
    assert!(!seen.answered(3), "{seen:?}");
    assert_eq!(upstream.posts(), 1, "the reset stream's visit was not sent");
}

async fn the_preface_and_first_request_must_come_within_the_header_read_timeout(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server(FAST)
        .start();
    let public = gateway.addr("public");
    // Half the preface; then the preface and SETTINGS, and no request.
    for bytes in [&h2::PREFACE[..10], &h2::settings(&[])[..0]] {
        let mut stream = match bytes.is_empty() {
            true => h2::connect(public, &[]).await,
            false => {
                let mut stream = tokio::net::TcpStream::connect(public).await.unwrap();
                stream.write_all(bytes).await.unwrap();
                stream
            }
        };
        let seen = h2::read_frames(&mut stream, Duration::from_secs(5)).await;
        assert!(seen.ended(), "{seen:?}");
        assert!(
            seen.after >= Duration::from_millis(800) && seen.after < Duration::from_secs(4),
            "{seen:?}"
        );
    }
    assert_eq!(upstream.posts(), 0);
}

/// With no stream open for the idle timeout, the connection says GOAWAY
/// and closes.
async fn an_idle_connection_says_goaway_and_closes(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server(FAST)
        .start();
    let stream = h2::connect(gateway.addr("public"), &[]).await;
    let seen = h2::send_and_watch(stream, h2::get(1, true), Duration::from_secs(6)).await;
    assert!(seen.answered(1), "{seen:?}");
    assert_eq!(seen.goaways().first(), Some(&NO_ERROR), "{seen:?}");
    assert!(seen.ended(), "{seen:?}");
    assert!(seen.after >= Duration::from_millis(900), "{seen:?}");
}

/// SIGTERM: GOAWAY at once, the stream in flight finishes with its 200,
/// and the daemon exits 0.
async fn sigterm_says_goaway_and_lets_open_streams_finish(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(500))).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let mut sender = h2::client(gateway.addr("public")).await;
    let in_flight = tokio::spawn({
        let mut sender = sender.clone();
        async move { h2::get_over(&mut sender).await.unwrap().status }
    });
    upstream.wait_for_posts(1).await;
    gateway.terminate();
    assert_eq!(in_flight.await.unwrap(), StatusCode::OK);
    assert!(
        h2::get_over(&mut sender).await.is_err(),
        "no new stream after GOAWAY"
    );
    gateway.assert_exits_0_within(Duration::from_secs(5)).await;
    assert_eq!(upstream.accepted_visits(), 1);
}

/// SIGTERM with a client that has no stream open and never answers the
/// server's PING: it has the header-read timeout after the GOAWAY, not
/// the whole shutdown timeout.
async fn on_sigterm_an_idle_client_has_the_header_read_timeout(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server(
            "header_read_timeout_ms = 1000\nidle_timeout_ms = 30000\nshutdown_timeout_ms = 30000",
        )
        .start();
    let mut stream = h2::connect(gateway.addr("public"), &[]).await;
    stream.write_all(&h2::get(1, true)).await.unwrap();
    let seen = h2::read_frames(&mut stream, Duration::from_millis(500)).await;
    assert!(seen.answered(1), "{seen:?}");
    gateway.terminate();
    let seen = h2::read_frames(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(seen.goaways().first(), Some(&NO_ERROR), "{seen:?}");
    assert!(seen.ended(), "{seen:?}");
    assert!(seen.after < Duration::from_secs(4), "{seen:?}");
    gateway.assert_exits_0_within(Duration::from_secs(5)).await;
}

async fn the_access_log_says_http_2(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .log("access = true")
        .start();
    let mut sender = h2::client(gateway.addr("public")).await;
    assert_eq!(
        h2::get_over(&mut sender).await.unwrap().status,
        StatusCode::OK
    );
    let line = gateway
        .wait_for_log_line(0, |line| line.contains("access") && line.contains("GET"))
        .await;
    assert!(line.contains("version=HTTP/2.0"), "{line}");
}

/// The timeouts of a gateway under abuse: long, so that a connection
/// the test sees end was cut off, not timed out.
const SLOW: &str = "header_read_timeout_ms = 20000\nidle_timeout_ms = 20000";

/// How long to wait between the chunks of an abuse.
const PACE: Duration = Duration::from_millis(20);

/// Sends the chunks of `abuse` after the preface and `settings` on a
/// connection of its own, and checks that the server ends that
/// connection long before its timeouts (unless `server` shortens them)
/// while another client is served; what the server sent meanwhile, for
/// the case to check.
async fn assert_cut_off(
    backend: Backend,
    settings: &[(u16, u32)],
    abuse: Vec<Vec<u8>>,
    server: &str,
) -> h2::Seen {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server(server)
        .start();
    let public = gateway.addr("public");
    let stream = h2::connect(public, settings).await;
    let seen = h2::send_paced_and_watch(stream, abuse, PACE, Duration::from_secs(10)).await;
    assert!(seen.ended(), "still open: {seen:?}");
    if server == SLOW {
        assert!(seen.after < Duration::from_secs(8), "{seen:?}");
        assert!(
            !seen.goaways().contains(&NO_ERROR),
            "a GOAWAY without an error: {seen:?}"
        );
    }
    let mut sender = h2::client(public).await;
    assert_eq!(
        h2::get_over(&mut sender).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(common::get(public, "/").await.status, StatusCode::OK);
    seen
}

/// Rapid reset: HEADERS and RST_STREAM, stream after stream, ten at a
/// time: each ten opened, then reset once the server has taken them (h2
/// itself cuts off a client whose streams are reset before the server
/// takes them, but not this one).
async fn rapid_reset_is_cut_off(backend: Backend) {
    let abuse = rapid_resets(|stream| h2::get(stream, true));
    assert_cut_off(backend, &[], abuse, SLOW).await;
}

/// The same with a trailer before each reset: HEADERS, trailing
/// HEADERS, RST_STREAM. A trailer opens no stream, so it does not hide
/// the resets.
async fn rapid_reset_behind_trailers_is_cut_off(backend: Backend) {
    let trailer = header_block(&[("x-trailer", "1")]);
    let abuse = rapid_resets(|stream| {
        let mut frames = h2::get(stream, false);
        frames.extend(frame(
            HEADERS,
            END_HEADERS | h2::END_STREAM,
            stream,
            &trailer,
        ));
        frames
    });
    assert_cut_off(backend, &[], abuse, SLOW).await;
}

/// 2,000 streams, ten at a time: each ten opened with `open`, then
/// reset, as two chunks.
fn rapid_resets(open: impl Fn(u32) -> Vec<u8>) -> Vec<Vec<u8>> {
    (0..200u32)
        .flat_map(|group| {
            let streams: Vec<u32> = (0..10).map(|i| 2 * (group * 10 + i) + 1).collect();
            let opened = streams.iter().flat_map(|&s| open(s)).collect();
            let reset = streams
                .iter()
                .flat_map(|&s| h2::rst_stream(s, CANCEL))
                .collect();
            [opened, reset]
        })
        .collect()
}

async fn settings_floods_are_cut_off(backend: Backend) {
    let abuse = vec![h2::settings(&[]).repeat(5000)];
    let seen = assert_cut_off(backend, &[], abuse, SLOW).await;
    let acks = seen
        .frames
        .iter()
        .filter(|f| f.kind == SETTINGS && f.flags == 1)
        .count();
    assert!(acks < 5000, "{acks} acknowledged");
}

async fn ping_floods_are_cut_off(backend: Backend) {
    let abuse = vec![(0..5000).flat_map(h2::ping).collect()];
    let seen = assert_cut_off(backend, &[], abuse, SLOW).await;
    let pongs = seen.frames.iter().filter(|f| f.kind == PING).count();
    assert!(pongs < 5000, "{pongs} answered");
}

async fn window_update_floods_are_cut_off(backend: Backend) {
    let abuse = vec![h2::window_update(0, 1).repeat(5000)];
    assert_cut_off(backend, &[], abuse, SLOW).await;
}

async fn empty_data_floods_are_cut_off(backend: Backend) {
    let mut abuse = h2::get(1, false);
    abuse.extend(frame(DATA, 0, 1, &[]).repeat(5000));
    assert_cut_off(backend, &[], vec![abuse], SLOW).await;
}

/// A header block that never ends: CONTINUATION after CONTINUATION.
async fn continuation_floods_are_cut_off(backend: Backend) {
    let mut block = header_block(&h2::get_fields(&[]));
    // A literal whose value is a megabyte long, sent a little at a time.
    block.extend([0x00, 0x01, b'x', 0x7f, 0xc1, 0xff, 0x3f]);
    let mut abuse = frame(HEADERS, 0, 1, &block);
    abuse.extend(frame(CONTINUATION, 0, 1, b"aaaaaaaaaaaaaaaa").repeat(10_000));
    assert_cut_off(backend, &[], vec![abuse], SLOW).await;
}

/// A header list four times `max_header_bytes`.
async fn oversized_headers_are_cut_off(backend: Backend) {
    let value = "v".repeat(4 * 16384);
    let block = header_block(&h2::get_fields(&[("x-big", &value)]));
    let mut chunks = block.chunks(16384).peekable();
    let mut abuse = frame(HEADERS, 0x1, 1, chunks.next().unwrap());
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        abuse.extend(frame(CONTINUATION, flags, 1, chunk));
    }
    let seen = assert_cut_off(backend, &[], vec![abuse], SLOW).await;
    assert!(!seen.answered(1), "{seen:?}");
}

/// A client that asks and then never opens its window: its answer can
/// never be sent, and the connection is closed once it has been idle
/// and then had the header-read timeout to finish.
async fn a_zero_window_stall_is_closed(backend: Backend) {
    let seen = assert_cut_off(
        backend,
        &[(INITIAL_WINDOW_SIZE, 0)],
        vec![h2::get(1, true)],
        FAST,
    )
    .await;
    assert!(seen.answered(1), "its head goes: {seen:?}");
    assert!(
        !seen.frames.iter().any(|f| f.kind == DATA),
        "no body fits a closed window: {seen:?}"
    );
    assert!(seen.after < Duration::from_secs(6), "{seen:?}");
}

both_backends!(
    prior_knowledge_and_http1_share_the_plain_port,
    alpn_chooses_h2_or_http1_on_the_tls_port,
    curl_gets_http2_and_http1_on_each_port,
    http2_off_leaves_http1_alone,
    the_servers_settings_bound_streams_headers_and_windows,
    streams_on_one_connection_are_each_counted_once,
    streams_are_batched_like_connections,
    a_stream_reset_while_its_visit_waits_is_never_sent,
    the_preface_and_first_request_must_come_within_the_header_read_timeout,
    an_idle_connection_says_goaway_and_closes,
    sigterm_says_goaway_and_lets_open_streams_finish,
    on_sigterm_an_idle_client_has_the_header_read_timeout,
    the_access_log_says_http_2,
    rapid_reset_is_cut_off,
    rapid_reset_behind_trailers_is_cut_off,
    settings_floods_are_cut_off,
    ping_floods_are_cut_off,
    window_update_floods_are_cut_off,
    empty_data_floods_are_cut_off,
    continuation_floods_are_cut_off,
    oversized_headers_are_cut_off,
    a_zero_window_stall_is_closed,
);
