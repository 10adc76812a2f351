//! TLS and SIGHUP: the listener's certificate swapped for new connections,
//! a bad one refused while the old one serves on, an out-of-date one
//! warned of, HTTP/2 connections kept and h2 still offered, and the
//! reload's other effects (the log level, what needs a restart).

mod common;

use std::time::Duration;

use common::h2;
use common::tls::{Leaf, SERVER_NAMES, TestCa, TlsClient, WELCOME, serve_tls, tls_connect};
use common::{Backend, Behaviour, GatewayConfig, Process, TestUpstream, raw_exchange};
use http::StatusCode;

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

/// An HTTPS gateway whose certificate is renewed under it, with an idle
/// timeout long enough for a connection kept across the renewal.
struct Renewing {
    folder: tempfile::TempDir,
    ca: TestCa,
    old: Leaf,
    upstream: TestUpstream,
    gateway: Process,
}

impl Renewing {
    async fn start(backend: Backend) -> Self {
        let folder = tempfile::tempdir().unwrap();
        let ca = TestCa::new("test CA");
        let old = ca.leaf(SERVER_NAMES);
        let upstream = TestUpstream::start(Behaviour::Ok).await;
        let gateway = serve_tls(
            GatewayConfig::new(backend, upstream.addr).server("idle_timeout_ms = 60000"),
            &old,
            folder.path(),
        );
        Self {
            folder,
            ca,
            old,
            upstream,
            gateway,
        }
    }

    /// Writes a new certificate over the old, sends SIGHUP, and returns
    /// it once new connections get it.
    async fn renew(&mut self) -> Leaf {
        let new = self.ca.leaf_with(SERVER_NAMES, |params| {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, "renewed");
        });
        assert_ne!(new.der, self.old.der);
        new.write(self.folder.path(), "server");
        self.gateway.signal("HUP");
        wait_for_certificate(self.gateway.addr("public"), &self.ca, &new).await;
        new
    }
}

async fn sighup_serves_the_new_certificate_to_new_connections(backend: Backend) {
    let mut site = Renewing::start(backend).await;
    let (public, ca, old) = (site.gateway.addr("public"), &site.ca, &site.old);
    let mut kept = TlsClient::connect(public, ca).await;
    assert_eq!(kept.peer, old.der);
    assert_eq!(kept.get("/").await.status, StatusCode::OK);

    let new = site.renew().await;
    let mut fresh = TlsClient::connect(public, &site.ca).await;
    assert_eq!(fresh.peer, new.der);
    assert_eq!(fresh.get("/").await.status, StatusCode::OK);
    // The connection made before the reload goes on.
    let answer = kept.get("/").await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, WELCOME)
    );
    assert_alive(&mut site.gateway);
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

/// HTTP/2 through a reload, as HTTP/1.1: an h2 connection made before
/// SIGHUP goes on with its streams, and new connections get the new
/// certificate and are still offered h2.
async fn sighup_keeps_http2_connections_and_offers_h2_with_the_new_certificate(backend: Backend) {
    let mut site = Renewing::start(backend).await;
    let (public, ca, old) = (site.gateway.addr("public"), &site.ca, &site.old);
    let mut h2_config = (*ca.client_config()).clone();
    h2_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // A resumed session shows the certificate of the handshake it
    // resumes: each connection here makes a full one.
    h2_config.resumption = rustls::client::Resumption::disabled();
    let h2_config = std::sync::Arc::new(h2_config);
    let h2_connect = async || {
        let stream = tls_connect(public, "localhost", h2_config.clone())
            .await
            .unwrap();
        let (_, session) = stream.get_ref();
        assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
        let peer = session.peer_certificates().unwrap()[0].clone();
        (
            h2::handshake(hyper_util::rt::TokioIo::new(stream)).await,
            peer,
        )
    };
    let (mut kept, peer) = h2_connect().await;
    assert_eq!(peer, old.der);
    assert_eq!(
        h2::get_over(&mut kept).await.unwrap().status,
        StatusCode::OK
    );

    let new = site.renew().await;

    let (mut fresh, peer) = h2_connect().await;
    assert_eq!(peer, new.der);
    assert_eq!(
        h2::get_over(&mut fresh).await.unwrap().status,
        StatusCode::OK
    );
    let answer = h2::get_over(&mut kept).await.unwrap();
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, WELCOME)
    );
    assert_eq!(site.upstream.accepted_visits(), 3);
    assert_alive(&mut site.gateway);
}

both_backends!(
    an_out_of_date_certificate_is_warned_of_at_start_and_on_reload,
    sighup_serves_the_new_certificate_to_new_connections,
    sighup_with_a_bad_key_keeps_the_old_certificate,
    sighup_keeps_http2_connections_and_offers_h2_with_the_new_certificate,
    sighup_applies_the_log_level_and_names_what_needs_a_restart,
);
