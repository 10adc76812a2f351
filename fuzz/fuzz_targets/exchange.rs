//! Hostile upstream answers, through the real exchange over a real TCP
//! connection: each input is what the upstream writes back to one POST.
//! The exchange must end (answered or failed) without a panic, and when it
//! says the connection can be reused, the next exchange on it must read
//! the next answer and nothing of this one: a parser fooled about where an
//! answer ends would hand a later visit this answer's leftovers, a 200 for
//! a visit that was never counted.
//!
//! `cargo +nightly fuzz run exchange seeds/exchange -- -max_total_time=60`
//! (`FUZZ_BACKEND=smol` for the other backend).
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use backends::{Runtime, Threading};
use gateway::config::Backend;
use gateway::daemon::{OnRuntime, on_backend};
use gateway::exchange::{Connection, Exchange};
use gateway::time::timeout_at;
use libfuzzer_sys::fuzz_target;

/// What the upstream answers the second request on a reused connection.
const SENTINEL: &[u8] = b"HTTP/1.1 299 Sentinel\r\ncontent-length: 0\r\n\r\n";
const SENTINEL_STATUS: u16 = 299;

/// Inputs up to this long arrive whole in the exchange's first read (one
/// loopback write, a 2 KiB buffer), so whatever it leaves unconsumed is in
/// its buffer and the reuse check sees it. Longer inputs are checked for
/// ending cleanly only.
const WHOLE_IN_ONE_READ: usize = 2048;

/// The fuzzing side's end of the harness.
struct Harness {
    jobs: Sender<Vec<u8>>,
    results: Receiver<()>,
}

fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("panicked: {info}");
            std::process::abort();
        }));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let (answers, answer) = channel::<Vec<u8>>();
        std::thread::spawn(move || upstream(listener, answer));
        let (jobs, job) = channel();
        let (done, results) = channel();
        let backend = match std::env::var("FUZZ_BACKEND").as_deref() {
            Ok("smol") => Backend::Smol,
            _ => Backend::Tokio,
        };
        std::thread::spawn(move || {
            on_backend(
                backend,
                Exchanges {
                    addr,
                    job,
                    answers,
                    done,
                },
            )
        });
        Mutex::new(Harness { jobs, results })
    })
}

/// The upstream: for each connection, reads a request, writes the answer
/// it was given for it, and answers a second request with [`SENTINEL`].
fn upstream(listener: TcpListener, answers: Receiver<Vec<u8>>) {
    for answer in answers {
        let Ok((mut socket, _)) = listener.accept() else { return };
        if read_head(&mut socket).is_none() || socket.write_all(&answer).is_err() {
            continue;
        }
        if read_head(&mut socket).is_some() {
            let _ = socket.write_all(SENTINEL);
        }
        // Until the exchange side closes.
        let _ = socket.read_to_end(&mut Vec::new());
    }
}

fn read_head(socket: &mut TcpStream) -> Option<()> {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match socket.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(())
}

/// The exchange side, on the chosen backend.
struct Exchanges {
    addr: SocketAddr,
    job: Receiver<Vec<u8>>,
    answers: Sender<Vec<u8>>,
    done: Sender<()>,
}

impl OnRuntime for Exchanges {
    type Output = ();
    fn run<R: Runtime>(self) {
        let _ = R::block_on(1, Threading::Shared, async move {
            // Blocking between jobs is fine: nothing else runs here.
            while let Ok(answer) = self.job.recv() {
                let whole = answer.len() <= WHOLE_IN_ONE_READ;
                if self.answers.send(answer).is_err() {
                    return;
                }
                check::<R>(self.addr, whole).await;
                let _ = self.done.send(());
            }
        });
    }
}

const REQUEST: &[u8] = b"POST /counter HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n";

async fn check<R: Runtime>(addr: SocketAddr, whole: bool) {
    let Ok(stream) = R::connect(addr).await else {
        panic!("cannot connect to the harness's upstream");
    };
    let mut connection = Connection::new(stream);
    // An answer that never completes waits for more: not a finding.
    let deadline = Instant::now() + Duration::from_millis(20);
    let Ok(outcome) = timeout_at::<R, _>(deadline, connection.exchange(REQUEST)).await else {
        return;
    };
    let (status, reusable) = match outcome {
        Exchange::Answered { status, reusable } => (status, reusable),
        Exchange::Failed(_) => return,
        Exchange::Unsent(error) => panic!("a fresh connection could not send: {error}"),
    };
    assert!((100..600).contains(&status), "status {status}");
    if !reusable || !whole {
        return;
    }
    assert!(status >= 200 && status != 101, "reusable after {status}");
    connection.watch_while_idle();
    if !connection.is_usable() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    match timeout_at::<R, _>(deadline, connection.exchange(REQUEST)).await {
        Ok(Exchange::Answered { status, reusable }) => {
            assert_eq!(
                (status, reusable),
                (SENTINEL_STATUS, true),
                "the next answer on the reused connection was misread"
            );
        }
        Ok(Exchange::Failed(error)) => panic!("the reused connection failed: {error}"),
        Ok(Exchange::Unsent(error)) => panic!("the reused connection was dead: {error}"),
        Err(_) => panic!("the reused connection's answer never came"),
    }
}

fuzz_target!(|data: &[u8]| {
    let harness = harness().lock().unwrap_or_else(|e| e.into_inner());
    harness.jobs.send(data.to_vec()).expect("the exchange side is running");
    harness.results.recv().expect("the exchange side answered");
});
