//! The built-in counter's side of visit batching: a POST whose body is a
//! decimal count adds that many visits at once (in one commit with a
//! durable store) on a connection that stays open; a POST with no body is
//! one visit; a body that is not a count is a 400, nothing counted, and
//! the connection closes, as does a body that does not arrive in time.

mod common;

use std::time::Duration;

use common::{
    Backend, GatewayConfig, Process, TestUpstream, counter_tally, raw_exchange, read_until_close,
    start_counter,
};
use tokio::io::AsyncWriteExt;

fn post(body: &str) -> String {
    format!(
        "POST /counter HTTP/1.1\r\nhost: c\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

const READ: &str = "GET /counter HTTP/1.1\r\nhost: c\r\nconnection: close\r\n\r\n";

async fn counts_in_bodies(counter: &Process) {
    let addr = counter.addr("counter");
    // Two batches and a lone visit on one connection, then a read on it.
    let bytes = format!("{}{}{}{READ}", post("37"), post("5"), post(""));
    let answers = raw_exchange(addr, bytes.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 4, "{answers}");
    assert!(answers.ends_with("\r\n\r\n43\n"), "{answers}");
    assert_eq!(counter_tally(addr).await, 43);

    for bad in ["0", "abc", "-1", "1e3", "12345678", " 7", "1048577"] {
        let bytes = format!("{}{READ}", post(bad));
        let answers = raw_exchange(addr, bytes.as_bytes(), Duration::from_secs(5)).await;
        assert!(answers.starts_with("HTTP/1.1 400 "), "{bad}: {answers}");
        assert!(answers.contains("connection: close"), "{bad}: {answers}");
        // The read behind it was never taken for a request.
        assert_eq!(answers.matches("HTTP/1.1").count(), 1, "{bad}: {answers}");
    }
    assert_eq!(
        counter_tally(addr).await,
        43,
        "nothing counted for a bad body"
    );
}

async fn a_post_carries_a_count_of_visits_in_memory(backend: Backend) {
    let mut command = std::process::Command::new(common::gateway_binary());
    command
        .args(["counter", "--listen", "127.0.0.1:0", "--store", "memory"])
        .args(["--backend", backend.name()])
        .env_remove("RUST_LOG");
    let counter = Process::start_command(command, 1);
    counts_in_bodies(&counter).await;
}

async fn a_post_carries_a_count_of_visits_durably(backend: Backend) {
    let counter = start_counter(backend);
    counts_in_bodies(&counter).await;
}

/// A count announced and never finished holds no connection: it is
/// answered 400 within the header-read timeout and nothing is counted.
async fn a_count_that_never_arrives_is_refused_in_time(backend: Backend) {
    let unused = TestUpstream::closed_port().await;
    let mut config = GatewayConfig::new(backend, unused).server("header_read_timeout_ms = 300");
    config.counter = true;
    let gateway = config.start();
    let addr = gateway.addr("counter");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"POST /counter HTTP/1.1\r\nhost: c\r\ncontent-length: 3\r\n\r\n1")
        .await
        .expect("write");
    let answer = read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(counter_tally(addr).await, 0);
}

both_backends!(
    a_post_carries_a_count_of_visits_in_memory,
    a_post_carries_a_count_of_visits_durably,
    a_count_that_never_arrives_is_refused_in_time,
);
