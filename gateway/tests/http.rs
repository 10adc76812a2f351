//! README, "What it answers", row by row: what the public listener answers, and what it
//! sends upstream.

mod common;

use std::time::Duration;

use common::{Backend, Behaviour, Client, GatewayConfig, TestUpstream, raw_exchange, request};
use http::StatusCode;

async fn get_is_welcomed_and_counted(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let answer = common::get(gateway.addr("public"), "/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "Welcome to my site!");
    assert_eq!(answer.headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(answer.headers["content-length"], "19");
    assert_eq!(upstream.posts(), 1);
}

async fn upstream_request_is_an_empty_post_with_host_and_forwarded_for(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let mut client = Client::connect(gateway.addr("public")).await;
    let mut with_xff = request("GET", "/");
    let headers = with_xff.headers_mut();
    headers.append("x-forwarded-for", "203.0.113.9".parse().unwrap());
    // A second header, with a byte HTTP allows but UTF-8 does not: passed on
    // as it came.
    headers.append(
        "x-forwarded-for",
        http::HeaderValue::from_bytes(b"unknown \xe9").unwrap(),
    );
    assert_eq!(client.send(with_xff).await.unwrap().status, StatusCode::OK);
    assert_eq!(client.get("/").await.status, StatusCode::OK);

    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/counter");
        assert_eq!(request.headers["host"], upstream.addr.to_string().as_str());
        assert_eq!(request.headers["content-length"], "0");
        assert!(request.body.is_empty());
    }
    assert_eq!(
        seen[0].headers["x-forwarded-for"].as_bytes(),
        b"203.0.113.9, unknown \xe9, 127.0.0.1"
    );
    assert_eq!(seen[1].headers["x-forwarded-for"], "127.0.0.1");
}

async fn head_is_welcomed_without_a_body(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let reply = raw_exchange(
        gateway.addr("public"),
        b"HEAD / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains("content-length: 19\r\n"), "{reply}");
    assert!(
        reply.ends_with("\r\n\r\n"),
        "HEAD answer carries no body: {reply:?}"
    );
    assert_eq!(upstream.posts(), 1);
}

async fn other_methods_get_405_with_allow(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let mut client = Client::connect(gateway.addr("public")).await;
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let answer = client.send(request(method, "/")).await.unwrap();
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(answer.headers["allow"], "GET, HEAD");
    }
    assert_eq!(upstream.posts(), 0);
}

async fn other_paths_get_404(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let mut client = Client::connect(gateway.addr("public")).await;
    for path in ["/index.html", "/counter", "/?", "//"] {
        let answer = client.get(path).await;
        let expected = if path == "/?" {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        };
        assert_eq!(answer.status, expected, "{path}");
    }
    assert_eq!(upstream.posts(), 1, "only `/?` is a visit");
}

async fn http10_with_and_without_keep_alive(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let addr = gateway.addr("public");

    // Without keep-alive the server closes after one answer.
    let reply = raw_exchange(addr, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
    assert!(reply.ends_with("Welcome to my site!"), "{reply}");

    // With keep-alive, two requests on one connection.
    let reply = raw_exchange(
        addr,
        b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reply.matches("HTTP/1.0 200 OK").count(), 2, "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("connection: keep-alive"),
        "{reply}"
    );
    assert_eq!(upstream.posts(), 3);
}

async fn fifty_pipelined_requests_on_one_connection(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let mut requests = Vec::new();
    for _ in 0..49 {
        requests.extend_from_slice(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    }
    requests.extend_from_slice(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let reply = raw_exchange(gateway.addr("public"), &requests, Duration::from_secs(10)).await;
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 50, "{reply}");
    assert_eq!(reply.matches("Welcome to my site!").count(), 50);
    assert_eq!(upstream.posts(), 50);
}

async fn oversized_head_gets_431(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("max_header_bytes = 8192")
        .start();
    let mut head = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 10_000));
    head.extend_from_slice(b"\r\n\r\n");
    let reply = raw_exchange(gateway.addr("public"), &head, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");

    let mut many = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let reply = raw_exchange(gateway.addr("public"), &many, Duration::from_secs(5)).await;
    assert!(
        reply.starts_with("HTTP/1.1 431 "),
        "too many headers: {reply}"
    );
    assert_eq!(upstream.posts(), 0);
    // And the gateway still serves.
    assert_eq!(
        common::get(gateway.addr("public"), "/").await.status,
        StatusCode::OK
    );
}

async fn malformed_requests_get_400_and_a_close(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let addr = gateway.addr("public");
    let cases: [&[u8]; 4] = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nhost: \x01\x00x\r\n\r\n",
    ];
    for case in cases {
        let reply = raw_exchange(addr, case, Duration::from_secs(5)).await;
        assert!(
            reply.starts_with("HTTP/1.1 400 "),
            "{:?} got {reply:?}",
            String::from_utf8_lossy(case)
        );
    }
    assert_eq!(upstream.posts(), 0);
}

async fn content_length_with_transfer_encoding_is_never_smuggled(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    // If the gateway trusted content-length, the body would hold a second
    // request; read as chunked it does not, and either way the connection
    // must close after the first answer.
    let smuggle = b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 44\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    let reply = raw_exchange(gateway.addr("public"), smuggle, Duration::from_secs(5)).await;
    let answers = reply.matches("HTTP/1.1 ").count();
    assert_eq!(answers, 1, "exactly one answer: {reply}");
    assert!(
        reply.starts_with("HTTP/1.1 400 ") || reply.starts_with("HTTP/1.1 200 "),
        "{reply}"
    );
    assert!(
        !reply.contains("404"),
        "the smuggled request was read: {reply}"
    );
}

both_backends!(
    get_is_welcomed_and_counted,
    upstream_request_is_an_empty_post_with_host_and_forwarded_for,
    head_is_welcomed_without_a_body,
    other_methods_get_405_with_allow,
    other_paths_get_404,
    http10_with_and_without_keep_alive,
    fifty_pipelined_requests_on_one_connection,
    oversized_head_gets_431,
    malformed_requests_get_400_and_a_close,
    content_length_with_transfer_encoding_is_never_smuggled,
);
