//! The clients a run holds open: the load's connections (closed or open
//! loop, keep-alive or a connection per request), and beside them the
//! stalled and the idle ones.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Clock;
use super::http::{Answer, Client, Stream, exchange};
use super::result::{LoadResult, count_error, empty_result, note_error};

/// One client connection's loop, reconnecting when the server closes it
/// (and after every answer, with `new_connections`).
pub(super) async fn connection(
    client: Client,
    clock: Clock,
    schedule: Option<(Duration, Duration)>,
) -> LoadResult {
    let mut result = empty_result(clock.stop - clock.window_start);
    let target = client.target;
    let close = if client.new_connections {
        "connection: close\r\n"
    } else {
        ""
    };
    let request = format!("GET / HTTP/1.1\r\nhost: {target}\r\n{close}\r\n").into_bytes();
    let mut buffer = Vec::with_capacity(4096);
    let mut stream: Option<Stream> = None;
    tokio::time::sleep_until(clock.start.into()).await;
    let mut next_send = schedule.map(|(_, offset)| clock.start + offset);
    loop {
        // Open loop: wait for this request's slot; the latency runs from
        // the slot, not from when it could actually be sent.
        let intended = match (next_send, schedule) {
            (Some(at), Some((interval, _))) => {
                if at >= clock.stop {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                next_send = Some(at + interval);
                at
            }
            _ => {
                let now = Instant::now();
                if now >= clock.stop {
                    break;
                }
                now
            }
        };
        if stream.is_none() {
            match client.connect().await {
                Ok(s) => stream = Some(s),
                Err(error) => {
                    note_error(&mut result, &error);
                    count_error(&mut result, &clock, Instant::now());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let outcome = match stream.as_mut() {
            Some(Stream::Plain(s)) => exchange(s, &request, &mut buffer).await,
            Some(Stream::Tls(s)) => exchange(s.as_mut(), &request, &mut buffer).await,
            None => continue,
        };
        let done = Instant::now();
        match outcome {
            Ok(Answer { status, keep_alive }) => {
                if status == 200 {
                    result.ok_total += 1;
                } else {
                    result.failed_total += 1;
                }
                if done >= clock.window_start && done < clock.stop {
                    result.requests += 1;
                    if status != 200 {
                        result.errors += 1;
                    }
                    let micros = done.duration_since(intended).as_micros() as u64;
                    let _ = result.latency.record(micros.max(1));
                }
                if !keep_alive || client.new_connections {
                    stream = None;
                }
            }
            Err(error) => {
                note_error(&mut result, &error);
                result.failed_total += 1;
                count_error(&mut result, &clock, done);
                stream = None;
            }
        }
    }
    result
}

/// A client that never finishes its request: it sends the first bytes of
/// one (the 5-byte header of a TLS handshake record, or half a request
/// line) and waits for the server to close the connection, then does the
/// same again, from `first` until `stop`. What the server spends on it, and
/// whether the other clients feel it, is what `--stalled` shows.
pub(super) async fn stall(target: SocketAddr, tls: bool, first: Instant, stop: Instant) {
    let start: &[u8] = if tls {
        &[0x16, 0x03, 0x01, 0x02, 0x00]
    } else {
        b"GET / HT"
    };
    let stop = tokio::time::Instant::from(stop);
    tokio::time::sleep_until(first.into()).await;
    let mut sink = [0u8; 512];
    while tokio::time::Instant::now() < stop {
        let held = async {
            let mut stream = TcpStream::connect(target).await?;
            stream.write_all(start).await?;
            // Until the server closes it (or resets it).
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        if tokio::time::timeout_at(stop, held)
            .await
            .is_ok_and(|held| held.is_err())
        {
            // Refused or reset: do not spin on a server that is gone.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A keep-alive client that goes idle: at `first` it connects, sends one
/// `GET /` and reads the answer, then holds the connection without a
/// word until `stop`; if the server closes it, it does the same again.
/// Its answers count toward the totals the counter is checked against
/// (not toward the window's requests or latency).
pub(super) async fn stay_idle(client: Client, first: Instant, stop: Instant) -> LoadResult {
    let mut result = empty_result(Duration::ZERO);
    let request = format!("GET / HTTP/1.1\r\nhost: {}\r\n\r\n", client.target).into_bytes();
    let mut buffer = Vec::with_capacity(1024);
    let stop = tokio::time::Instant::from(stop);
    tokio::time::sleep_until(first.into()).await;
    while tokio::time::Instant::now() < stop {
        let held = async {
            let mut stream = client.connect().await?;
            let answer = match &mut stream {
                Stream::Plain(s) => exchange(s, &request, &mut buffer).await,
                Stream::Tls(s) => exchange(s.as_mut(), &request, &mut buffer).await,
            };
            match answer {
                Ok(Answer { status: 200, .. }) => result.ok_total += 1,
                Ok(_) => result.failed_total += 1,
                Err(error) => {
                    result.failed_total += 1;
                    return Err(error);
                }
            }
            // Idle until the server closes it (or resets it).
            let mut sink = [0u8; 64];
            loop {
                let read = match &mut stream {
                    Stream::Plain(s) => s.read(&mut sink).await?,
                    Stream::Tls(s) => s.read(&mut sink).await?,
                };
                if read == 0 {
                    return Ok(());
                }
            }
        };
        if let Ok(Err(error)) = tokio::time::timeout_at(stop, held).await {
            note_error(&mut result, &error);
            // Refused or reset: do not spin on a server that is gone.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn a_stalled_client_sends_the_start_of_a_handshake_and_comes_back_when_closed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let starts = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Instant::now() + Duration::from_secs(2);
            let client = tokio::spawn(stall(addr, true, Instant::now(), stop));
            // The server closes each connection once it has the 5 bytes.
            let mut starts = Vec::new();
            for _ in 0..3 {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut start = [0u8; 5];
                tcp.read_exact(&mut start).await.unwrap();
                starts.push(start);
            }
            client.await.unwrap();
            starts
        });
        assert_eq!(starts, [[0x16, 0x03, 0x01, 0x02, 0x00]; 3]);
    }

    #[test]
    fn an_idle_client_makes_one_request_then_waits_and_comes_back_when_closed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = Client {
                target: listener.local_addr().unwrap(),
                tls: None,
                new_connections: false,
            };
            let stop = Instant::now() + Duration::from_secs(2);
            let idle = tokio::spawn(stay_idle(client, Instant::now(), stop));
            // Closed by the server after the first two answers, the client
            // comes back; the last connection it holds until the stop.
            let mut last = None;
            for answer in ["200 OK", "200 OK", "503 Service Unavailable"] {
                drop(last.take());
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    assert_eq!(tcp.read(&mut byte).await.unwrap(), 1);
                    head.push(byte[0]);
                }
                assert!(head.starts_with(b"GET / HTTP/1.1\r\n"));
                let response = format!("HTTP/1.1 {answer}\r\ncontent-length: 2\r\n\r\nok");
                tcp.write_all(response.as_bytes()).await.unwrap();
                let mut byte = [0u8];
                let quiet = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut byte));
                assert!(quiet.await.is_err(), "the idle client sent more");
                last = Some(tcp);
            }
            let result = idle.await.unwrap();
            drop(last);
            result
        });
        assert_eq!((result.ok_total, result.failed_total), (2, 1));
    }
}
