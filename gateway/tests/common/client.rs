//! HTTP clients for the tests: a keep-alive hyper connection, one-shot
//! GETs, the admin listener's metrics and the counter's tally, and raw
//! sockets for exact bytes.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Reads from `stream` (plain or TLS) until `count` welcomes have arrived,
/// within 5 s each; the text.
pub async fn read_welcomes<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    count: usize,
) -> String {
    let mut seen = String::new();
    let mut buf = [0; 4096];
    while seen.matches("Welcome to my site!").count() < count {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

/// A keep-alive HTTP/1.1 client connection (hyper).
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::try_connect(addr).await.expect("connect")
    }

    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    pub async fn send(&mut self, request: Request<Empty<Bytes>>) -> Result<Answer, hyper::Error> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        read_answer(response).await
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.send(request("GET", path)).await.expect("GET")
    }

    pub async fn post(&mut self, path: &str) -> Answer {
        self.send(request("POST", path)).await.expect("POST")
    }
}

pub fn request(method: &str, path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gateway.test")
        .body(Empty::new())
        .unwrap()
}

pub async fn read_answer(response: Response<Incoming>) -> Result<Answer, hyper::Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `clients` keep-alive clients at once, each sending `visits` `GET /`
/// in turn; every answer must be 200.
pub async fn visit_concurrently(addr: SocketAddr, clients: usize, visits: usize) {
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(async move {
            let mut client = Client::connect(addr).await;
            for _ in 0..visits {
                assert_eq!(client.get("/").await.status, StatusCode::OK);
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("client task");
    }
}

/// One GET on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    Client::connect(addr).await.get(path).await
}

/// The admin listener's `/metrics` as `name{labels}` → value.
pub async fn scrape(admin: SocketAddr) -> std::collections::HashMap<String, f64> {
    let page = get(admin, "/metrics").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.ends_with("# EOF\n"), "{}", page.body);
    page.body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Reads the built-in counter's tally.
pub async fn counter_tally(counter: SocketAddr) -> u64 {
    let answer = get(counter, "/counter").await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.body.trim().parse().expect("tally is a number")
}

/// Writes `bytes` on a new connection and reads until the server closes
/// it or `limit` passes; returns what was read.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_until_close(&mut stream, limit).await
}

/// A `GET /` on a new connection whose client then shuts down its
/// sending side (as `nc -N` does); what came back until the close.
pub async fn get_then_half_close(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("write");
    stream.shutdown().await.expect("shutdown");
    read_until_close(&mut stream, Duration::from_secs(5)).await
}

pub async fn read_until_close(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs curl with `args` (silent, errors shown, 5 s at most), none of the
/// environment's CA settings reaching it.
pub async fn curl(args: &[&str]) -> std::process::Output {
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
