//! TLS: the public listener over HTTPS (`server.tls_cert`, `server.tls_key`),
//! what it does with clients that do not speak TLS or do not finish or
//! pass the handshake, the certificate swapped on SIGHUP (and the reload's
//! other effects: the log level, what needs a restart), an https://
//! upstream verified against `upstream.tls_ca`, and the configuration
//! errors. Certificates are made at test time (rcgen, ECDSA P-256); the
//! clients and the HTTPS counter are rustls, and curl where installed.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::tls::{
    Leaf, TestCa, TlsClient, TlsUpstream, certificate_error, client_hello, client_hello_offering,
    handshake_failures, https_get, server_lines, tls_connect, wait_for_handshake_failures,
};
use common::{
    Backend, Behaviour, Client, GatewayConfig, Process, TestUpstream, counter_tally, raw_exchange,
    read_until_close,
};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, CertificateError};

/// The names the gateway's certificates carry: tests connect to
/// 127.0.0.1 and verify `localhost`, or the IP itself.
const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1"];

const WELCOME: &str = "Welcome to my site!";

/// Writes `leaf` (chain and key) as `folder/server.{crt,key}` and starts
/// the gateway of `config` serving it, its config file in `folder`.
fn serve_tls(config: GatewayConfig, leaf: &Leaf, folder: &Path) -> Process {
    let (cert, key) = leaf.write(folder, "server");
    config
        .server(&server_lines(&cert, &key))
        .in_folder(folder)
        .start()
}

/// Asserts the gateway process is still running.
fn assert_alive(gateway: &mut Process) {
    let exited = gateway.child.try_wait().expect("try_wait");
    assert!(
        exited.is_none(),
        "the gateway exited ({exited:?}); its log:\n{}",
        gateway.log_text()
    );
}

/// New connections until one shows `expected` (at most 5 s): a reload is
/// applied some time after the signal.
async fn wait_for_certificate(addr: std::net::SocketAddr, ca: &TestCa, expected: &Leaf) {
    common::eventually(
        "the new certificate on new connections after SIGHUP",
        Duration::from_secs(5),
        async || match TlsClient::try_connect(addr, "localhost", ca.client_config()).await {
            Ok(client) if client.peer == expected.der => Ok(()),
            Ok(_) => Err("the old certificate".to_owned()),
            Err(error) => Err(error.to_string()),
        },
    )
    .await
}

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
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr).with_admin(),
        &ca.leaf(SERVER_NAMES),
        folder.path(),
    );
    let public = gateway.addr("public");
    let admin = gateway.addr("admin");
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
    assert_eq!(https_get(public, &ca, "/").await.status, StatusCode::OK);
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
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr).with_admin(),
        &ca.leaf(SERVER_NAMES),
        folder.path(),
    );
    let (public, admin) = (gateway.addr("public"), gateway.addr("admin"));
    // Health checks' TCP connects, browsers' unused preconnects.
    for _ in 0..3 {
        drop(TcpStream::connect(public).await.unwrap());
    }
    common::eventually(
        "the silent connections closed",
        Duration::from_secs(5),
        async || {
            let open = common::scrape(admin).await["gateway_connections_open"];
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
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr).with_admin(),
        &ca.leaf(SERVER_NAMES),
        folder.path(),
    );
    let public = gateway.addr("public");
    let admin = gateway.addr("admin");
    let mut served = TlsClient::connect(public, &ca).await;
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
    assert_eq!(https_get(public, &ca, "/").await.status, StatusCode::OK);
    assert_eq!(upstream.posts(), 3);
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

/// A certificate out of its validity period is served (clients refuse
/// it, as `an_expired_certificate_fails_client_verification` shows), but
/// the log says so, naming the file and the date, at start (and
/// `--check`) and on each reload that reads one; a reload to a valid
/// certificate warns of nothing.
async fn an_out_of_date_certificate_is_warned_of_at_start_and_on_reload(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let expired = ca.leaf_with(SERVER_NAMES, |params| {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let mut gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr),
        &expired,
        folder.path(),
    );
    let cert = folder.path().join("server.crt");
    let cert = cert.to_str().unwrap();
    let line = gateway
        .wait_for_log_line(0, |line| line.contains("expired"))
        .await;
    eprintln!("logged at start: {line}");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(cert), "names the file: {line}");
    assert!(line.contains("2001-01-01 00:00:00 UTC"), "{line}");
    // `--check` passes the configuration, and says the same.
    let output = std::process::Command::new(common::gateway_binary())
        .arg("--check")
        .arg("--config")
        .arg(gateway.config_path().unwrap())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{said}");
    assert!(
        said.contains("has expired") && said.contains(cert),
        "{said}"
    );
    assert!(said.contains("2001-01-01 00:00:00 UTC"), "{said}");

    // Not valid yet, on reload.
    let early = ca.leaf_with(SERVER_NAMES, |params| {
        params.not_before = rcgen::date_time_ymd(3000, 1, 1);
        params.not_after = rcgen::date_time_ymd(3001, 1, 1);
    });
    early.write(folder.path(), "server");
    let logged = gateway.log.lock().unwrap().len();
    gateway.signal("HUP");
    let line = gateway
        .wait_for_log_line(logged, |line| line.contains("not valid yet"))
        .await;
    eprintln!("logged on reload: {line}");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(cert), "names the file: {line}");
    assert!(line.contains("3000-01-01 00:00:00 UTC"), "{line}");
    gateway
        .wait_for_log_line(logged, |line| line.contains("reloaded"))
        .await;

    // Expired again, on reload: the reload that reads it warns again.
    expired.write(folder.path(), "server");
    let logged = gateway.log.lock().unwrap().len();
    gateway.signal("HUP");
    let line = gateway
        .wait_for_log_line(logged, |line| line.contains("expired"))
        .await;
    assert!(line.contains("2001-01-01 00:00:00 UTC"), "{line}");
    gateway
        .wait_for_log_line(logged, |line| line.contains("reloaded"))
        .await;

    // A valid one: served, and nothing to warn of.
    let valid = ca.leaf(SERVER_NAMES);
    valid.write(folder.path(), "server");
    let logged = gateway.log.lock().unwrap().len();
    gateway.signal("HUP");
    gateway
        .wait_for_log_line(logged, |line| line.contains("reloaded"))
        .await;
    wait_for_certificate(gateway.addr("public"), &ca, &valid).await;
    let after = gateway.log.lock().unwrap()[logged..].join("\n");
    assert!(!after.contains("server.tls_cert: the"), "{after}");
    assert_alive(&mut gateway);
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
        let mut command = tokio::process::Command::new(common::gateway_binary());
        if check {
            command.arg("--check");
        }
        command
            .arg("--config")
            .arg(&file)
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(10), command.output())
            .await
            .unwrap_or_else(|_| panic!("{how}: still running after 10 s"))
            .expect("run gateway");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{how}: {stderr}");
        let line = stderr
            .lines()
            .find(|line| line.contains("server.tls_key"))
            .unwrap_or_else(|| panic!("{how}: no line names server.tls_key: {stderr}"));
        assert!(line.contains(key.to_str().unwrap()), "{how}: {line}");
        assert!(line.contains("RSA key of 1024 bits"), "{how}: {line}");
        assert!(line.contains("2048, 3072 or 4096 bits"), "{how}: {line}");
        assert!(!line.contains("does not go with"), "{how}: {line}");
        if check {
            eprintln!("{line}");
        }
    }
}

async fn sighup_serves_the_new_certificate_to_new_connections(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let old = ca.leaf(SERVER_NAMES);
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let mut gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr).server("idle_timeout_ms = 60000"),
        &old,
        folder.path(),
    );
    let public = gateway.addr("public");
    let mut kept = TlsClient::connect(public, &ca).await;
    assert_eq!(kept.peer, old.der);
    assert_eq!(kept.get("/").await.status, StatusCode::OK);

    let new = ca.leaf_with(SERVER_NAMES, |params| {
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "renewed");
    });
    assert_ne!(new.der, old.der);
    new.write(folder.path(), "server");
    gateway.signal("HUP");
    wait_for_certificate(public, &ca, &new).await;

    let mut fresh = TlsClient::connect(public, &ca).await;
    assert_eq!(fresh.peer, new.der);
    assert_eq!(fresh.get("/").await.status, StatusCode::OK);
    // The connection made before the reload goes on.
    let answer = kept.get("/").await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, WELCOME)
    );
    assert_alive(&mut gateway);
}

async fn sighup_with_a_bad_key_keeps_the_old_certificate(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let old = ca.leaf(SERVER_NAMES);
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let mut gateway = serve_tls(
        GatewayConfig::new(backend, upstream.addr),
        &old,
        folder.path(),
    );
    let public = gateway.addr("public");

    // A new certificate beside a key file that holds no key.
    let new = ca.leaf(SERVER_NAMES);
    let (_, key) = new.write(folder.path(), "server");
    std::fs::write(&key, "garbage, not a PEM key\n").unwrap();
    let logged = gateway.log.lock().unwrap().len();
    gateway.signal("HUP");
    // The line that tells the outcome, not one announcing the reload.
    let line = gateway
        .wait_for_log_line(logged, |line| {
            line.contains("reload failed") && line.contains("server.tls_key")
        })
        .await;
    eprintln!("logged on the bad reload: {line}");

    for _ in 0..3 {
        let mut client = TlsClient::connect(public, &ca).await;
        assert_eq!(client.peer, old.der, "the old certificate is kept");
        assert_eq!(client.get("/").await.status, StatusCode::OK);
    }
    assert_alive(&mut gateway);

    // Once the files are right, the next SIGHUP applies them.
    new.write(folder.path(), "server");
    gateway.signal("HUP");
    wait_for_certificate(public, &ca, &new).await;
    assert_alive(&mut gateway);
}

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

async fn sighup_applies_the_log_level_and_names_what_needs_a_restart(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let public = gateway.addr("public");
    // A request without a host header is refused, logged at debug level.
    let refused = b"GET / HTTP/1.1\r\n\r\n";
    let reply = raw_exchange(public, refused, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    assert!(!gateway.log_text().contains("request refused"));

    let path = gateway.config_path().expect("a config file");
    let text = std::fs::read_to_string(path).unwrap();
    let changed = text
        .replace("level = \"info\"", "level = \"debug\"")
        .replace("[server]\n", "[server]\nidle_timeout_ms = 1234\n");
    assert_ne!(text, changed);
    std::fs::write(path, changed).unwrap();
    let logged = gateway.log.lock().unwrap().len();
    gateway.signal("HUP");
    let line = gateway
        .wait_for_log_line(logged, |line| line.contains("reloaded"))
        .await;
    assert!(
        line.contains("log.level") && line.contains("needs_restart=server"),
        "{line}"
    );

    // The same process, now at debug level.
    let reply = raw_exchange(public, refused, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    gateway
        .wait_for_log_line(logged, |line| line.contains("request refused"))
        .await;
    assert_eq!(common::get(public, "/").await.status, StatusCode::OK);
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

/// `curl ARGS`, at most 10 s.
async fn curl(args: &[&str]) -> Output {
    let run = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "5"])
        .args(args)
        .env_remove("CURL_CA_BUNDLE")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("curl within 10 s")
        .expect("run curl")
}

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
        let output = curl(&args).await;
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
    let output = curl(&["--resolve", &resolve, &by_name]).await;
    assert_eq!(
        output.status.code(),
        Some(60),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(upstream.posts(), 3);
}

/// What a configuration error case writes and expects: the config's
/// extra `[server]` and `[upstream]` lines, the upstream URL when not the
/// plain default, the key the error names and the path it names.
struct BadConfig {
    case: &'static str,
    server: String,
    upstream: String,
    url: Option<String>,
    keys: &'static [&'static str],
    /// Any of these paths (as text) in the message; `None`: the config
    /// file's own path.
    paths: Option<Vec<PathBuf>>,
}

impl BadConfig {
    /// A case in `[server]` alone.
    fn server(
        case: &'static str,
        server: String,
        keys: &'static [&'static str],
        paths: Option<Vec<PathBuf>>,
    ) -> Self {
        Self {
            case,
            server,
            upstream: String::new(),
            url: None,
            keys,
            paths,
        }
    }
}

async fn tls_config_errors_are_exit_78_naming_file_and_key(backend: Backend) {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    let ca = TestCa::new("test CA");
    let leaf = ca.leaf(SERVER_NAMES);
    let (cert, key) = leaf.write(dir, "good");
    let other_key = ca.leaf(SERVER_NAMES).write(dir, "other").1;
    let missing = dir.join("missing.pem");
    let key_only = dir.join("key-only.pem");
    std::fs::write(&key_only, leaf.key_pem()).unwrap();
    let cert_only = dir.join("cert-only.pem");
    std::fs::write(&cert_only, &leaf.pem).unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n").unwrap();
    let ca_file = ca.write(dir, "ca.pem");
    let a_folder = dir.join("a-folder");
    std::fs::create_dir(&a_folder).unwrap();
    let https = "https://127.0.0.1:9/counter".to_owned();

    // The same files, well configured, pass the check.
    let good = dir.join("good.toml");
    let mut config = GatewayConfig::new(backend, "127.0.0.1:9".parse().unwrap())
        .server(&server_lines(&cert, &key))
        .upstream(&format!("tls_ca = {ca_file:?}"));
    config.upstream = https.clone();
    std::fs::write(&good, config.render()).unwrap();
    let output = tokio::process::Command::new(common::gateway_binary())
        .arg("--check")
        .arg("--config")
        .arg(&good)
        .output()
        .await
        .expect("run gateway --check");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let tls = |c: &Path, k: &Path| server_lines(c, k);
    let cases = [
        BadConfig::server(
            "missing certificate file",
            tls(&missing, &key),
            &["server.tls_cert"],
            Some(vec![missing.clone()]),
        ),
        BadConfig::server(
            "missing key file",
            tls(&cert, &missing),
            &["server.tls_key"],
            Some(vec![missing.clone()]),
        ),
        BadConfig::server(
            "unreadable key file (a folder)",
            tls(&cert, &a_folder),
            &["server.tls_key"],
            Some(vec![a_folder.clone()]),
        ),
        BadConfig::server(
            "missing certificate file, relative to the config's folder",
            format!("tls_cert = \"nowhere.crt\"\ntls_key = {key:?}"),
            &["server.tls_cert"],
            Some(vec![dir.join("nowhere.crt")]),
        ),
        BadConfig::server(
            "certificate file with no certificate",
            tls(&key_only, &key),
            &["server.tls_cert"],
            Some(vec![key_only.clone()]),
        ),
        BadConfig::server(
            "key file with no key",
            tls(&cert, &cert_only),
            &["server.tls_key"],
            Some(vec![cert_only.clone()]),
        ),
        BadConfig::server(
            "garbage key file",
            tls(&cert, &garbage),
            &["server.tls_key"],
            Some(vec![garbage.clone()]),
        ),
        BadConfig::server(
            "key not matching the certificate",
            tls(&cert, &other_key),
            &["server.tls_key", "server.tls_cert"],
            Some(vec![other_key.clone(), cert.clone()]),
        ),
        BadConfig::server(
            "tls_cert without tls_key",
            format!("tls_cert = {cert:?}"),
            &["tls_key"],
            None,
        ),
        BadConfig::server(
            "tls_key without tls_cert",
            format!("tls_key = {key:?}"),
            &["tls_cert"],
            None,
        ),
        BadConfig {
            case: "missing CA file",
            server: String::new(),
            upstream: format!("tls_ca = {missing:?}"),
            url: Some(https.clone()),
            keys: &["upstream.tls_ca"],
            paths: Some(vec![missing.clone()]),
        },
        BadConfig {
            case: "CA file with no certificate",
            server: String::new(),
            upstream: format!("tls_ca = {garbage:?}"),
            url: Some(https.clone()),
            keys: &["upstream.tls_ca"],
            paths: Some(vec![garbage.clone()]),
        },
        BadConfig {
            case: "tls_ca with an http:// url",
            server: String::new(),
            upstream: format!("tls_ca = {ca_file:?}"),
            url: None,
            keys: &["upstream.tls_ca"],
            paths: None,
        },
    ];
    for bad in cases {
        let case = bad.case;
        let mut config = GatewayConfig::new(backend, "127.0.0.1:9".parse().unwrap());
        if !bad.server.is_empty() {
            config = config.server(&bad.server);
        }
        if !bad.upstream.is_empty() {
            config = config.upstream(&bad.upstream);
        }
        if let Some(url) = bad.url {
            config.upstream = url;
        }
        let file = dir.join("gateway.toml");
        std::fs::write(&file, config.render()).unwrap();
        let paths = bad.paths.unwrap_or_else(|| vec![file.clone()]);
        for check in [true, false] {
            let how = if check { "--check" } else { "a plain start" };
            let mut command = tokio::process::Command::new(common::gateway_binary());
            if check {
                command.arg("--check");
            }
            command
                .arg("--config")
                .arg(&file)
                .env_remove("RUST_LOG")
                .kill_on_drop(true);
            let output = tokio::time::timeout(Duration::from_secs(10), command.output())
                .await
                .unwrap_or_else(|_| panic!("{case}, {how}: still running after 10 s"))
                .expect("run gateway");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(78), "{case}, {how}: {stderr}");
            let line = stderr
                .lines()
                .find(|line| bad.keys.iter().any(|key| line.contains(key)))
                .unwrap_or_else(|| panic!("{case}, {how}: no line names {:?}: {stderr}", bad.keys));
            assert!(
                paths
                    .iter()
                    .any(|path| line.contains(path.to_str().unwrap())),
                "{case}, {how}: the line does not name {paths:?}: {line}"
            );
            if check {
                eprintln!("{case}: {line}");
            }
        }
    }
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
    a_parked_https_connection_serves_on,
    https_get_is_welcomed_and_counted_once,
    tls12_and_tls13_are_both_served,
    tls10_and_tls11_clients_are_refused,
    sec1_and_pkcs1_keys_serve_too,
    plain_http_to_the_tls_listener_gets_400_and_close,
    a_connection_closed_before_sending_a_byte_is_no_failed_handshake,
    unfinished_handshakes_are_closed_at_the_header_timeout,
    clients_failing_verification_leave_others_served,
    an_expired_certificate_fails_client_verification,
    an_out_of_date_certificate_is_warned_of_at_start_and_on_reload,
    an_rsa_key_of_1024_bits_is_refused_saying_why,
    sighup_serves_the_new_certificate_to_new_connections,
    sighup_with_a_bad_key_keeps_the_old_certificate,
    sighup_applies_the_log_level_and_names_what_needs_a_restart,
    https_upstream_counts_every_visit_over_pooled_connections,
    https_upstream_reconnects_resume_the_tls_session,
    https_upstream_sending_part_of_a_record_unasked_is_not_reused,
    https_upstream_by_name_is_asked_for_that_name,
    https_upstream_that_does_not_verify_gives_502_and_no_visit,
    curl_gets_the_welcome_over_https,
    tls_config_errors_are_exit_78_naming_file_and_key,
);
