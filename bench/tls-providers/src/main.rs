//! Per-handshake and per-request CPU of rustls's ring and aws-lc-rs
//! providers, both ends in one thread over memory (so each figure is a
//! client's plus a server's work).
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

fn pump(c: &mut ClientConnection, s: &mut ServerConnection) {
    loop {
        let mut moved = false;
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut r = &buf[..];
            while !r.is_empty() {
                s.read_tls(&mut r).unwrap();
                s.process_new_packets().unwrap();
            }
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut r = &buf[..];
            while !r.is_empty() {
                c.read_tls(&mut r).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        if !moved {
            break;
        }
    }
}

fn main() {
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = ca.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca.signing_key.serialize_der()));
    for (name, provider) in [
        ("ring", rustls::crypto::ring::default_provider()),
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()),
    ] {
        let provider: Arc<CryptoProvider> = Arc::new(provider);
        let server = Arc::new(
            ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.clone()], key.clone_key())
                .unwrap(),
        );
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let mut cc = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cc.resumption = rustls::client::Resumption::disabled();
        let client = Arc::new(cc);
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            let mut c =
                ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap())
                    .unwrap();
            let mut s = ServerConnection::new(server.clone()).unwrap();
            pump(&mut c, &mut s);
        }
        let hs = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        let mut c =
            ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap())
                .unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        pump(&mut c, &mut s);
        let req = b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n";
        let resp = [b'x'; 140];
        let m = 200_000;
        let mut sink = [0u8; 4096];
        let t = Instant::now();
        for _ in 0..m {
            c.writer().write_all(req).unwrap();
            pump(&mut c, &mut s);
            let _ = s.reader().read(&mut sink).unwrap();
            s.writer().write_all(&resp).unwrap();
            pump(&mut c, &mut s);
            let _ = c.reader().read(&mut sink).unwrap();
        }
        let rq = t.elapsed().as_secs_f64() / m as f64 * 1e9;
        println!(
            "{name}: full TLS 1.3 handshake (ECDSA P-256, both ends) {hs:.0} us; request+answer records (both ends) {rq:.0} ns; suite {:?}",
            c.negotiated_cipher_suite().unwrap().suite()
        );
    }
}
