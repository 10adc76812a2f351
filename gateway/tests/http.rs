//! README, "What it answers", row by row: what the public listener answers, and what it
//! sends upstream.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Backend, Behaviour, Client, GatewayConfig, TestUpstream, raw_exchange, request};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Sends `bytes` on a new connection and reads until the server closes
/// it; fails if it is still open after 5 s (the idle timeout is 60 s).
async fn exchange_until_closed(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    assert!(read.is_ok(), "still open 5 s after answering: {reply:?}");
    reply
}

/// The value of every `connection` line in the first answer's head, in
/// order, lowercased.
fn connection_lines(reply: &str) -> Vec<String> {
    let head = reply.split("\r\n\r\n").next().unwrap_or_default();
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("connection"))
        .map(|(_, value)| value.trim().to_ascii_lowercase())
        .collect()
}

/// Every answer after which the connection closes says `connection:
/// close` and nothing else, and the connection does close (a request sent
/// behind it is not answered): to HTTP/1.1 clients, and to HTTP/1.0
/// clients that asked for keep-alive, whom hyper would also tell
/// `keep-alive`.
async fn answers_that_close_say_connection_close_alone(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .server("idle_timeout_ms = 60000")
        .start();
    let counter = common::start_counter(backend);
    let public = gateway.addr("public");
    let counted = counter.addr("counter");
    // (case, listener, request line's target and method, head lines, body,
    // status)
    let cases: [(&str, SocketAddr, &str, &str, &str, u16); 6] = [
        (
            "GET with a body",
            public,
            "GET /",
            "host: x\r\ncontent-length: 3\r\n",
            "abc",
            200,
        ),
        (
            "two host lines",
            public,
            "GET /",
            "host: a\r\nhost: b\r\n",
            "",
            400,
        ),
        ("an invalid host", public, "GET /", "host: a b\r\n", "", 400),
        (
            "the counter's 400 for a count of 0",
            counted,
            "POST /counter",
            "host: x\r\ncontent-length: 1\r\n",
            "0",
            400,
        ),
        (
            "the counter's 400 for a count too long",
            counted,
            "POST /counter",
            "host: x\r\ncontent-length: 8\r\n",
            "12345678",
            400,
        ),
        (
            "the counter's 400 for a count that is not digits",
            counted,
            "POST /counter",
            "host: x\r\ncontent-length: 2\r\n",
            "1x",
            400,
        ),
    ];
    for (version, asks) in [("HTTP/1.0", "connection: keep-alive\r\n"), ("HTTP/1.1", "")] {
        for (case, addr, target, lines, body, status) in cases {
            let next = format!("GET / {version}\r\n{asks}host: x\r\n\r\n");
            let request = format!("{target} {version}\r\n{asks}{lines}\r\n{body}{next}");
            let reply = exchange_until_closed(addr, request.as_bytes()).await;
            assert!(
                reply.starts_with(&format!("{version} {status} ")),
                "{case}, {version}: {reply:?}"
            );
            assert_eq!(
                connection_lines(&reply),
                ["close"],
                "{case}, {version}: {reply:?}"
            );
            assert_eq!(
                reply.matches(version).count(),
                1,
                "{case}, {version}: the request behind it was answered: {reply:?}"
            );
        }
    }
    // Keep-alive answers to the same clients still say keep-alive (to
    // HTTP/1.0) or nothing (to HTTP/1.1).
    for (version, asks, said) in [
        (
            "HTTP/1.0",
            "connection: keep-alive\r\n",
            &["keep-alive"][..],
        ),
        ("HTTP/1.1", "", &[]),
    ] {
        let request = format!(
            "GET / {version}\r\n{asks}host: x\r\n\r\nGET / {version}\r\nhost: x\r\nconnection: close\r\n\r\n"
        );
        let reply = exchange_until_closed(public, request.as_bytes()).await;
        assert_eq!(connection_lines(&reply), said, "{version}: {reply:?}");
        assert_eq!(reply.matches(version).count(), 2, "{version}: {reply:?}");
    }
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
    answers_that_close_say_connection_close_alone,
);
