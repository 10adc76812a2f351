//! An https:// upstream verified against `upstream.tls_ca`: pooled and
//! resumed connections, the name asked for, a record split across answers,
//! and a certificate that does not verify.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::tls::{Leaf, TestCa, TlsUpstream, WELCOME};
use common::{Backend, Client, GatewayConfig};
use http::StatusCode;
use tokio_rustls::rustls::{self};

async fn https_upstream_counts_every_visit_over_pooled_connections(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("upstream CA");
    let upstream = TlsUpstream::start(&ca.leaf(&["127.0.0.1"])).await;
    let ca_file = ca.write(folder.path(), "upstream-ca.pem");
    let mut config =
        GatewayConfig::new(backend, upstream.addr).upstream(&format!("tls_ca = {ca_file:?}"));
    config.upstream = format!("https://{}/counter", upstream.addr);
    let gateway = config.start();

    // 50 visits over 5 keep-alive clients at once, every one 200.
    common::visit_concurrently(gateway.addr("public"), 5, 10).await;
    assert_eq!(upstream.posts(), 50, "every visit counted exactly once");
    eprintln!(
        "{}: 50 visits over {} TCP connections, {} TLS handshakes",
        backend.name(),
        upstream.connections(),
        upstream.handshakes()
    );
    // At most 5 POSTs are ever in flight; a pool per worker (2) keeps
    // them, so reuse means no more than 10 connections.
    assert!(
        upstream.handshakes() <= 10 && upstream.connections() <= 10,
        "{} connections, {} handshakes for 50 visits: pooled connections not reused",
        upstream.connections(),
        upstream.handshakes()
    );
}

async fn https_upstream_reconnects_resume_the_tls_session(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("upstream CA");
    let upstream = TlsUpstream::start(&ca.leaf(&["127.0.0.1"])).await;
    let ca_file = ca.write(folder.path(), "upstream-ca.pem");
    // Pooled connections are closed after 100 ms idle, so every visit
    // after a pause reconnects.
    let mut config = GatewayConfig::new(backend, upstream.addr)
        .upstream(&format!("tls_ca = {ca_file:?}\npool_idle_timeout_ms = 100"));
    config.upstream = format!("https://{}/counter", upstream.addr);
    let gateway = config.start();
    for visit in 1..=3 {
        let answer = common::get(gateway.addr("public"), "/").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", gateway.log_text());
        // Until the gateway's pool has closed the connection, idle.
        common::eventually(
            "the idle connection closed",
            Duration::from_secs(5),
            async || common::at_least(upstream.closed(), visit),
        )
        .await;
    }
    assert_eq!(upstream.posts(), 3);
    assert_eq!(
        upstream.connections(),
        3,
        "each visit after a pause reconnects"
    );
    // The first handshake is full; the other two resume a session (the
    // pools of both workers share one TLS client, so one cache).
    assert_eq!(
        (upstream.handshakes(), upstream.resumed()),
        (3, 2),
        "reconnects resume their session"
    );
}

async fn https_upstream_by_name_is_asked_for_that_name(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("upstream CA");
    let upstream = TlsUpstream::start(&ca.leaf(&["localhost"])).await;
    let ca_file = ca.write(folder.path(), "upstream-ca.pem");
    let mut config =
        GatewayConfig::new(backend, upstream.addr).upstream(&format!("tls_ca = {ca_file:?}"));
    config.upstream = format!("https://localhost:{}/counter", upstream.addr.port());
    let gateway = config.start();
    let mut client = Client::connect(gateway.addr("public")).await;
    for _ in 0..3 {
        let answer = client.get("/").await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (StatusCode::OK, WELCOME),
            "{}",
            gateway.log_text()
        );
    }
    assert_eq!(upstream.posts(), 3);
    let names = upstream.server_names();
    assert!(!names.is_empty());
    assert!(
        names
            .iter()
            .all(|name| name.as_deref() == Some("localhost")),
        "SNI sent: {names:?}"
    );
}

/// An https counter on plain threads and rustls's own connection, so that
/// it can split its records as it likes: after each connection's first
/// answer it sends, unasked, the first 3 bytes of the record of a second
/// 200, and the rest of it after the next request, which it does not
/// count. A client that took that 200 for the next request's answer would
/// answer a visit 200 that no counter counted.
fn start_record_splitting_upstream(leaf: &Leaf) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let counted = Arc::new(AtomicU64::new(0));
    let config = leaf.server_config();
    let served = counted.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let (Ok(tcp), config, counted) = (tcp, config.clone(), served.clone()) else {
                continue;
            };
            std::thread::spawn(move || serve_splitting_records(tcp, config, &counted));
        }
    });
    (addr, counted)
}

fn serve_splitting_records(
    mut tcp: std::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    counted: &AtomicU64,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let mut connection = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut held_back: Option<Vec<u8>> = None;
    let mut head = Vec::new();
    loop {
        // One request head (the gateway's POSTs have no body).
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let mut stream = rustls::Stream::new(&mut connection, &mut tcp);
            if stream.read(&mut byte)? == 0 {
                return Ok(());
            }
            head.push(byte[0]);
        }
        head.clear();
        if let Some(rest) = held_back.take() {
            // The 200 already begun: the request is not counted.
            tcp.write_all(&rest)?;
            continue;
        }
        counted.fetch_add(1, Ordering::SeqCst);
        let mut records = Vec::new();
        connection.writer().write_all(OK)?;
        connection.write_tls(&mut records)?;
        let mut next = Vec::new();
        connection.writer().write_all(OK)?;
        connection.write_tls(&mut next)?;
        records.extend_from_slice(&next[..3]);
        held_back = Some(next[3..].to_vec());
        tcp.write_all(&records)?;
    }
}

async fn https_upstream_sending_part_of_a_record_unasked_is_not_reused(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("upstream CA");
    let (upstream, counted) = start_record_splitting_upstream(&ca.leaf(&["127.0.0.1"]));
    let ca_file = ca.write(folder.path(), "upstream-ca.pem");
    let mut config =
        GatewayConfig::new(backend, upstream).upstream(&format!("tls_ca = {ca_file:?}"));
    config.upstream = format!("https://{upstream}/counter");
    let gateway = config.start();
    let mut client = Client::connect(gateway.addr("public")).await;
    let mut welcomed = 0;
    for _ in 0..4 {
        if client.get("/").await.status == StatusCode::OK {
            welcomed += 1;
        }
    }
    assert_eq!(
        welcomed,
        counted.load(Ordering::SeqCst),
        "every 200 is a counted visit; the log:\n{}",
        gateway.log_text()
    );
    assert_eq!(welcomed, 4, "a fresh connection serves each visit");
}

async fn https_upstream_that_does_not_verify_gives_502_and_no_visit(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("upstream CA");
    let ca_file = ca.write(folder.path(), "upstream-ca.pem");
    let stranger = TestCa::new("another CA");
    for (case, leaf, tls_ca) in [
        (
            "signed by another CA",
            stranger.leaf(&["127.0.0.1"]),
            Some(&ca_file),
        ),
        (
            "for another name",
            ca.leaf(&["counter.example"]),
            Some(&ca_file),
        ),
        (
            "not under the system roots (no tls_ca)",
            ca.leaf(&["127.0.0.1"]),
            None,
        ),
    ] {
        let upstream = TlsUpstream::start(&leaf).await;
        let mut config = GatewayConfig::new(backend, upstream.addr);
        config.upstream = format!("https://{}/counter", upstream.addr);
        if let Some(tls_ca) = tls_ca {
            config = config.upstream(&format!("tls_ca = {tls_ca:?}"));
        }
        let gateway = config.start();
        let public = gateway.addr("public");
        let mut client = Client::connect(public).await;
        for _ in 0..3 {
            let answer = client.get("/").await;
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (StatusCode::BAD_GATEWAY, "Error registering your visit"),
                "{case}"
            );
        }
        assert_eq!(
            common::get(public, "/").await.status,
            StatusCode::BAD_GATEWAY,
            "{case}"
        );
        assert_eq!(
            upstream.posts(),
            0,
            "{case}: no request reached the counter"
        );
        assert_eq!(upstream.handshakes(), 0, "{case}");
        let line = gateway
            .wait_for_log_line(0, |line| {
                let line = line.to_ascii_lowercase();
                line.contains("certificate") || line.contains("tls")
            })
            .await;
        eprintln!("{case}: {line}");
    }
}

both_backends!(
    https_upstream_counts_every_visit_over_pooled_connections,
    https_upstream_reconnects_resume_the_tls_session,
    https_upstream_by_name_is_asked_for_that_name,
    https_upstream_sending_part_of_a_record_unasked_is_not_reused,
    https_upstream_that_does_not_verify_gives_502_and_no_visit,
);
