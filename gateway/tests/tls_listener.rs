//! TLS on the public listener (`server.tls_cert`, `server.tls_key`): the
//! protocol versions and key formats served, and what it does with clients
//! that do not speak TLS or do not finish or pass the handshake.
//! Certificates are made at test time (rcgen, ECDSA P-256); the clients
//! are rustls, and curl where installed.

mod common;

use std::time::{Duration, Instant};

use common::tls::{
    SERVER_NAMES, TestCa, TlsClient, TlsSite, WELCOME, certificate_error, client_hello,
    client_hello_offering, handshake_failures, https_get, serve_tls, server_lines, tls_connect,
    wait_for_handshake_failures,
};
use common::{
    Backend, Behaviour, GatewayConfig, TestUpstream, counter_tally, raw_exchange, read_until_close,
};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, CertificateError};

async fn https_get_is_welcomed_and_counted_once(backend: Backend) {
    // The built-in counter in the same daemon, and the admin listener:
    // both stay plain HTTP. The certificate and key are named relative to
    // the config file's folder.
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    ca.leaf(SERVER_NAMES).write(folder.path(), "server");
    let counter = TestUpstream::closed_port().await;
    let gateway = GatewayConfig::new(backend, counter)
        .with_counter_on(counter)
        .with_admin()
        .server("tls_cert = \"server.crt\"\ntls_key = \"server.key\"")
        .in_folder(folder.path())
        .start();
    let public = gateway.addr("public");

    let mut client = TlsClient::connect(public, &ca).await;
    assert_eq!(client.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let answer = client.get("/").await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, WELCOME)
    );
    assert_eq!(counter_tally(counter).await, 1, "counted once");
    let health = common::get(gateway.addr("admin"), "/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "admin stays plain HTTP");
    // The same keep-alive connection serves a second visit.
    assert_eq!(client.get("/").await.status, StatusCode::OK);
    assert_eq!(counter_tally(counter).await, 2);
}

async fn tls12_and_tls13_are_both_served(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr),
        &ca.leaf(SERVER_NAMES),
        folder.path(),
    );
    let public = gateway.addr("public");
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let mut client =
            TlsClient::try_connect(public, "localhost", ca.client_config_for(&[version]))
                .await
                .unwrap_or_else(|error| panic!("{expected:?}: {error}"));
        assert_eq!(client.version, Some(expected));
        assert_eq!(client.alpn.as_deref(), Some(&b"http/1.1"[..]));
        let answer = client.get("/").await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (StatusCode::OK, WELCOME),
            "{expected:?}"
        );
    }
    assert_eq!(upstream.posts(), 2);
}

/// What the server sends on `stream` until it closes it, at most
/// `limit`; and whether it closed.
async fn read_bytes_until_close(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (out, closed)
}

async fn tls10_and_tls11_clients_are_refused(backend: Backend) {
    let site = TlsSite::start(backend).await;
    let (ca, public, admin) = (&site.ca, site.public, site.admin);
    let failures_before = handshake_failures(admin).await;
    for (name, version) in [("TLS 1.0", [3, 1]), ("TLS 1.1", [3, 2])] {
        let mut stream = TcpStream::connect(public).await.unwrap();
        stream
            .write_all(&client_hello_offering(version))
            .await
            .unwrap();
        let (reply, closed) = read_bytes_until_close(&mut stream, Duration::from_secs(4)).await;
        // An alert (21) if anything, never a ServerHello (a handshake
        // record, 22).
        assert!(
            reply.first().is_none_or(|kind| *kind == 21),
            "{name}: {reply:02x?}"
        );
        assert!(closed, "{name}: the connection stayed open");
    }
    wait_for_handshake_failures(admin, failures_before + 2.0).await;
    // The same hello offering TLS 1.2 is answered with a ServerHello.
    let mut stream = TcpStream::connect(public).await.unwrap();
    stream
        .write_all(&client_hello_offering([3, 3]))
        .await
        .unwrap();
    let mut head = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head))
        .await
        .expect("an answer to a TLS 1.2 hello within 5 s")
        .expect("a TLS 1.2 hello answered");
    assert_eq!(
        (head[0], head[5]),
        (22, 2),
        "a ServerHello for TLS 1.2: {head:02x?}"
    );
    assert_eq!(https_get(public, ca, "/").await.status, StatusCode::OK);
}

/// Keys as SEC1 (`EC PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`, made
/// with openssl where it is installed) serve as PKCS#8 ones do.
async fn sec1_and_pkcs1_keys_serve_too(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let leaf = ca.leaf(SERVER_NAMES);
    let cert = folder.path().join("server.crt");
    let key = folder.path().join("server.key");
    std::fs::write(&cert, leaf.chain_pem()).unwrap();
    std::fs::write(&key, leaf.key_sec1_pem()).unwrap();
    let mut served = vec![("SEC1", cert, key, leaf.der.clone())];
    match ca.rsa_leaf(SERVER_NAMES, folder.path(), 2048) {
        Some((cert, key, der)) => served.push(("PKCS#1", cert, key, der)),
        None => common::require::skip_for_want_of(
            "openssl",
            "the PKCS#1 key: openssl, which makes it, is not installed",
        ),
    }
    for (format, cert, key, der) in served {
        let upstream = TestUpstream::start(Behaviour::Ok).await;
        let gateway = GatewayConfig::new(backend, upstream.addr)
            .server(&server_lines(&cert, &key))
            .start();
        let mut client = TlsClient::connect(gateway.addr("public"), &ca).await;
        assert_eq!(client.peer, der, "{format}");
        assert_eq!(client.get("/").await.status, StatusCode::OK, "{format}");
        assert_eq!(upstream.posts(), 1, "{format}");
    }
}

async fn a_connection_closed_before_sending_a_byte_is_no_failed_handshake(backend: Backend) {
    let site = TlsSite::start(backend).await;
    let (public, admin) = (site.public, site.admin);
    // Health checks' TCP connects, browsers' unused preconnects.
    for _ in 0..3 {
        drop(TcpStream::connect(public).await.unwrap());
    }
    common::eventually(
        "the silent connections closed",
        Duration::from_secs(5),
        async || {
            let open =
                common::scrape(admin).await[r#"gateway_connections_open{protocol="http/1.1"}"#];
            if open > 0.0 { Err(open) } else { Ok(()) }
        },
    )
    .await;
    // Then one client that does fail: counted, alone.
    let reply = raw_exchange(public, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    assert_eq!(wait_for_handshake_failures(admin, 1.0).await, 1.0);
}

async fn plain_http_to_the_tls_listener_gets_400_and_close(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr),
        &ca.leaf(SERVER_NAMES),
        folder.path(),
    );
    let public = gateway.addr("public");

    let started = Instant::now();
    let reply = raw_exchange(
        public,
        b"GET / HTTP/1.1\r\nhost: gateway.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let took = started.elapsed();
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "the connection was not closed after the 400 ({took:?})"
    );
    assert_eq!(upstream.posts(), 0, "a plain-HTTP visit is never counted");

    // HTTPS is served as before.
    assert_eq!(https_get(public, &ca, "/").await.status, StatusCode::OK);
    assert_eq!(upstream.posts(), 1);
}

async fn unfinished_handshakes_are_closed_at_the_header_timeout(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr)
            .server("header_read_timeout_ms = 500\nidle_timeout_ms = 10000"),
        &ca.leaf(SERVER_NAMES),
        folder.path(),
    );
    let public = gateway.addr("public");
    let hello = client_hello(ca.client_config());

    // A client that says nothing, and one that sends half a ClientHello,
    // at once: both are closed at the timeout, not before.
    let silent = async {
        let mut stream = TcpStream::connect(public).await.unwrap();
        let started = Instant::now();
        read_until_close(&mut stream, Duration::from_secs(6)).await;
        started.elapsed()
    };
    let half = async {
        let mut stream = TcpStream::connect(public).await.unwrap();
        let started = Instant::now();
        stream.write_all(&hello[..hello.len() / 2]).await.unwrap();
        read_until_close(&mut stream, Duration::from_secs(6)).await;
        started.elapsed()
    };
    let (silent, half) = tokio::join!(silent, half);
    for (who, took) in [("silent", silent), ("half a ClientHello", half)] {
        assert!(
            took >= Duration::from_millis(400),
            "{who}: closed after {took:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{who}: closed after {took:?}"
        );
    }
    assert_eq!(upstream.posts(), 0);
    assert_eq!(https_get(public, &ca, "/").await.status, StatusCode::OK);
}

async fn clients_failing_verification_leave_others_served(backend: Backend) {
    let site = TlsSite::start(backend).await;
    let (ca, public, admin) = (&site.ca, site.public, site.admin);
    let mut served = TlsClient::connect(public, ca).await;
    assert_eq!(served.get("/").await.status, StatusCode::OK);
    let failures_before = handshake_failures(admin).await;

    // A client trusting another CA.
    let stranger = TestCa::new("another CA");
    let error = TlsClient::try_connect(public, "localhost", stranger.client_config())
        .await
        .err()
        .expect("a client not trusting the CA fails the handshake");
    assert!(
        matches!(
            certificate_error(&error),
            Some(CertificateError::UnknownIssuer)
        ),
        "{error:?}"
    );

    // A client connecting by IP, asking for (and verifying) another name.
    let error = TlsClient::try_connect(public, "wrong.example", ca.client_config())
        .await
        .err()
        .expect("a client asking for another name fails verification");
    assert!(
        matches!(
            certificate_error(&error),
            Some(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{error:?}"
    );

    wait_for_handshake_failures(admin, failures_before + 2.0).await;
    // The open connection and new ones are served as before.
    assert_eq!(served.get("/").await.status, StatusCode::OK);
    assert_eq!(https_get(public, ca, "/").await.status, StatusCode::OK);
    assert_eq!(site.upstream.posts(), 3);
}

async fn an_expired_certificate_fails_client_verification(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let expired = ca.leaf_with(SERVER_NAMES, |params| {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr).with_admin(),
        &expired,
        folder.path(),
    );
    let public = gateway.addr("public");
    let admin = gateway.addr("admin");
    let failures_before = handshake_failures(admin).await;
    for _ in 0..2 {
        let error = TlsClient::try_connect(public, "localhost", ca.client_config())
            .await
            .err()
            .expect("an expired certificate fails verification");
        assert!(
            matches!(
                certificate_error(&error),
                Some(CertificateError::Expired | CertificateError::ExpiredContext { .. })
            ),
            "{error:?}"
        );
    }
    wait_for_handshake_failures(admin, failures_before + 2.0).await;
    assert_eq!(upstream.posts(), 0);
    // Still serving: plain scrapes on the admin listener, and the public
    // listener still answers handshakes (which the client refuses).
    assert!(
        TlsClient::try_connect(public, "localhost", ca.client_config())
            .await
            .is_err()
    );
}

/// An RSA key too small for ring (1024 bits) is a configuration error
/// (exit 78) that names the key's file and says why, not one saying the
/// key does not go with its certificate.
async fn an_rsa_key_of_1024_bits_is_refused_saying_why(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    let ca = TestCa::new("test CA");
    let Some((cert, key, _)) = ca.rsa_leaf(SERVER_NAMES, dir, 1024) else {
        common::require::skip_for_want_of(
            "openssl",
            "the 1024-bit RSA key: openssl, which makes it, is not installed",
        );
        return;
    };
    let file = dir.join("gateway.toml");
    let config = GatewayConfig::new(backend, "127.0.0.1:9".parse().unwrap())
        .server(&server_lines(&cert, &key));
    std::fs::write(&file, config.render()).unwrap();
    for check in [true, false] {
        let how = if check { "--check" } else { "a plain start" };
        let line = common::refused_config_line(&file, check, &["server.tls_key"], how).await;
        assert!(line.contains(key.to_str().unwrap()), "{how}: {line}");
        assert!(line.contains("RSA key of 1024 bits"), "{how}: {line}");
        assert!(line.contains("2048, 3072 or 4096 bits"), "{how}: {line}");
        assert!(!line.contains("does not go with"), "{how}: {line}");
        if check {
            eprintln!("{line}");
        }
    }
}

/// `curl ARGS`, at most 10 s.
async fn curl_gets_the_welcome_over_https(backend: Backend) {
    if !common::require::tool_or_skip("curl", &["--version"], "curl over HTTPS") {
        return;
    }
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let ca_file = ca.write(folder.path(), "ca.pem");
    let ca_file = ca_file.to_str().unwrap();
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr),
        &ca.leaf(SERVER_NAMES),
        folder.path(),
    );
    let port = gateway.addr("public").port();
    let by_name = format!("https://localhost:{port}/");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let by_ip = format!("https://127.0.0.1:{port}/");
    for args in [
        vec!["--cacert", ca_file, "--resolve", &resolve, &by_name],
        vec!["--cacert", ca_file, &by_ip],
        vec!["--cacert", ca_file, "--tlsv1.2", "--tls-max", "1.2", &by_ip],
    ] {
        let output = common::curl(&args).await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), WELCOME, "{args:?}");
    }
    // Without the CA, curl refuses the certificate (60: peer certificate
    // cannot be authenticated with known CA certificates).
    let output = common::curl(&["--resolve", &resolve, &by_name]).await;
    assert_eq!(
        output.status.code(),
        Some(60),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(upstream.posts(), 3);
}

/// An HTTPS connection left idle is parked as a plain one is, and serves
/// on: a visit, then a pipelined pair, each counted once.
async fn a_parked_https_connection_serves_on(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    ca.leaf(SERVER_NAMES).write(folder.path(), "server");
    let counter = TestUpstream::closed_port().await;
    let gateway = GatewayConfig::new(backend, counter)
        .with_counter_on(counter)
        .server("tls_cert = \"server.crt\"\ntls_key = \"server.key\"")
        .in_folder(folder.path())
        .start();
    let mut stream = tls_connect(gateway.addr("public"), "localhost", ca.client_config())
        .await
        .unwrap();
    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    for requests in [1, 1, 2] {
        stream.write_all(&GET.repeat(requests)).await.unwrap();
        let seen = common::read_welcomes(&mut stream, requests).await;
        assert_eq!(seen.matches("HTTP/1.1 200 OK").count(), requests, "{seen}");
        // Longer than the gateway waits before parking an idle connection.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(counter_tally(counter).await, 4, "every visit counted once");
}

both_backends!(
    https_get_is_welcomed_and_counted_once,
    tls12_and_tls13_are_both_served,
    tls10_and_tls11_clients_are_refused,
    sec1_and_pkcs1_keys_serve_too,
    a_connection_closed_before_sending_a_byte_is_no_failed_handshake,
    plain_http_to_the_tls_listener_gets_400_and_close,
    unfinished_handshakes_are_closed_at_the_header_timeout,
    clients_failing_verification_leave_others_served,
    an_expired_certificate_fails_client_verification,
    an_rsa_key_of_1024_bits_is_refused_saying_why,
    curl_gets_the_welcome_over_https,
    a_parked_https_connection_serves_on,
);
