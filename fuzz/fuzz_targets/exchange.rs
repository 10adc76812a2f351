//! Hostile upstream answers, through the real exchange over a real TCP
//! connection. An input is a byte that picks how the answer is cut into
//! writes, then the answer the upstream writes back to one POST.
//!
//! Each answer is sent twice on fresh connections: in one write, and cut
//! into up to 64 writes a little apart, after every line feed or every few
//! bytes (so that heads, lines and chunks begin and end in different
//! reads). Checked:
//! - the exchange ends (answered or failed) without a panic;
//! - both deliveries end alike (the same status, or both failures): how
//!   the bytes were cut must not change what they mean;
//! - when the exchange calls the connection reusable (and the pool's own
//!   check, once every byte has arrived, agrees), the next exchange on it
//!   reads the next answer and nothing of this one: a reader fooled about
//!   where an answer ends would hand a later visit this answer's
//!   leftovers, a 200 for a visit that was never counted;
//! - and then hyper's client, a reader written apart from this one, given
//!   the same answer, reads it too, with the same status, and then the next
//!   answer (unless the head is over hyper's own limit of 100 headers).
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

use backends::{Backend, Named, OnRuntime, Runtime, Threading};
use gateway::time::timeout_at;
use gateway::upstream::exchange::{Connection, Exchange};
use libfuzzer_sys::fuzz_target;

/// What the upstream answers the second request on a reused connection.
const SENTINEL: &[u8] = b"HTTP/1.1 299 Sentinel\r\ncontent-length: 0\r\n\r\n";
const SENTINEL_STATUS: u16 = 299;

const REQUEST: &[u8] = b"POST /counter HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n";

/// Writes an answer is cut into at most, and the pause between them.
const MAX_PIECES: usize = 64;
const PAUSE: Duration = Duration::from_micros(150);

/// How one answer goes out.
#[derive(Debug, Clone, Copy)]
enum Delivery {
    Whole,
    /// A write after every line feed: each line begins a read.
    Lines,
    /// Writes of this many bytes.
    Pieces(usize),
}

impl Delivery {
    /// `answer` cut into the writes this delivery makes.
    fn cut(self, answer: &[u8]) -> Vec<&[u8]> {
        let mut pieces: Vec<&[u8]> = match self {
            Delivery::Whole => return vec![answer],
            Delivery::Lines => answer.split_inclusive(|&b| b == b'\n').collect(),
            Delivery::Pieces(size) => answer.chunks(size.max(1)).collect(),
        };
        if pieces.len() > MAX_PIECES {
            let (_, rest) = answer.split_at(pieces[..MAX_PIECES - 1].iter().map(|p| p.len()).sum());
            pieces.truncate(MAX_PIECES - 1);
            pieces.push(rest);
        }
        pieces
    }
}

/// One connection's worth of upstream work.
struct Job {
    answer: Vec<u8>,
    delivery: Delivery,
    /// Told once every byte of the answer is written.
    written: Sender<()>,
}

/// How an exchange ended, as far as the checks compare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Answered { status: u16, reusable: bool },
    Failed,
    /// Still waiting for more at the deadline: not a finding.
    Waiting,
}

/// The fuzzing side's end of the harness.
struct Harness {
    inputs: Sender<(Vec<u8>, Delivery)>,
    done: Receiver<()>,
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
        let (jobs, job) = channel::<Job>();
        std::thread::spawn(move || upstream(listener, job));
        let (inputs, input) = channel();
        let (done, finished) = channel();
        // FUZZ_BACKEND names one of the backends; the default one otherwise.
        let backend = std::env::var("FUZZ_BACKEND")
            .ok()
            .and_then(|name| Backend::from_name(&name))
            .unwrap_or_default();
        std::thread::spawn(move || {
            backend.run(Exchanges {
                addr,
                input,
                jobs,
                done,
            })
        });
        Mutex::new(Harness {
            inputs,
            done: finished,
        })
    })
}

/// The upstream: for each connection, reads a request, writes the answer
/// of its job as the job says, and answers a second request with
/// [`SENTINEL`].
fn upstream(listener: TcpListener, jobs: Receiver<Job>) {
    for job in jobs {
        let Ok((mut socket, _)) = listener.accept() else { return };
        let _ = socket.set_nodelay(true);
        if read_head(&mut socket).is_some() {
            for bytes in job.delivery.cut(&job.answer) {
                if socket.write_all(bytes).is_err() {
                    break;
                }
                std::thread::sleep(PAUSE);
            }
        }
        let _ = job.written.send(());
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
    input: Receiver<(Vec<u8>, Delivery)>,
    jobs: Sender<Job>,
    done: Sender<()>,
}

impl OnRuntime for Exchanges {
    type Output = ();
    fn run<R: Runtime>(self) {
        let Exchanges {
            addr,
            input,
            jobs,
            done,
        } = self;
        let _ = R::block_on(1, Threading::Shared, async move {
            // Blocking between inputs is fine: nothing else runs here.
            while let Ok((answer, split)) = input.recv() {
                let whole = check::<R>(addr, &jobs, answer.clone(), Delivery::Whole).await;
                let cut = check::<R>(addr, &jobs, answer.clone(), split).await;
                if let Ended::Answered {
                    status,
                    reusable: true,
                } = whole
                {
                    compare_with_hyper::<R>(addr, &jobs, answer, status).await;
                }
                match (whole, cut) {
                    (Ended::Waiting, _) | (_, Ended::Waiting) => {}
                    (Ended::Failed, Ended::Failed) => {}
                    (
                        Ended::Answered { status: a, .. },
                        Ended::Answered { status: b, .. },
                    ) if a == b => {}
                    (whole, cut) => panic!("delivered whole: {whole:?}; cut {split:?}: {cut:?}"),
                }
                let _ = done.send(());
            }
        });
    }
}

/// Runs one exchange against `answer` delivered as `delivery`, checks a
/// reusable connection with a second exchange, and says how the first
/// ended.
async fn check<R: Runtime>(
    addr: SocketAddr,
    jobs: &Sender<Job>,
    answer: Vec<u8>,
    delivery: Delivery,
) -> Ended {
    let (written, all_written) = channel();
    let job = Job {
        answer,
        delivery,
        written,
    };
    if jobs.send(job).is_err() {
        panic!("the harness's upstream is gone");
    }
    let Ok(stream) = R::connect(addr).await else {
        panic!("cannot connect to the harness's upstream");
    };
    let mut connection = Connection::new(stream);
    let deadline = Instant::now() + Duration::from_millis(50);
    let Ok(outcome) = timeout_at::<R, _>(deadline, connection.exchange(REQUEST)).await else {
        return Ended::Waiting;
    };
    let (status, reusable) = match outcome {
        Exchange::Answered { status, reusable } => (status, reusable),
        Exchange::Failed(_) => return Ended::Failed,
        Exchange::Unsent(error) => panic!("a fresh connection could not send: {error}"),
    };
    assert!((100..600).contains(&status), "status {status}");
    let ended = Ended::Answered { status, reusable };
    if !reusable {
        return ended;
    }
    assert!(status >= 200 && status != 101, "reusable after {status}");
    // As the pool would: the connection idles, then is checked before
    // reuse; here only once every byte of the answer has arrived.
    connection.watch_while_idle();
    let _ = all_written.recv_timeout(Duration::from_secs(10));
    R::sleep_until(Instant::now() + Duration::from_millis(2)).await;
    if !connection.is_usable() {
        return ended;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
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
    ended
}

/// Has hyper's client read `answer` and then the sentinel, and checks it
/// read `status` (what this reader found, calling the connection
/// reusable) and then the sentinel.
async fn compare_with_hyper<R: Runtime>(
    addr: SocketAddr,
    jobs: &Sender<Job>,
    answer: Vec<u8>,
    status: u16,
) {
    use http_body_util::{BodyExt, Empty};
    let (written, _) = channel();
    let job = Job {
        answer,
        delivery: Delivery::Whole,
        written,
    };
    if jobs.send(job).is_err() {
        panic!("the harness's upstream is gone");
    }
    let Ok(stream) = R::connect(addr).await else {
        panic!("cannot connect to the harness's upstream");
    };
    let post = || {
        hyper::Request::post("/counter")
            .header("host", "t")
            .header("content-length", "0")
            .body(Empty::<bytes::Bytes>::new())
            .expect("a request")
    };
    let talk = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(stream).await?;
        let exchanges = async {
            let first = sender.send_request(post()).await?;
            let first_status = first.status().as_u16();
            first.into_body().collect().await?;
            sender.ready().await?;
            let second = sender.send_request(post()).await?;
            Ok::<_, hyper::Error>(Some((first_status, second.status().as_u16())))
        };
        // hyper ends the connection when it refuses an answer (`None`);
        // the exchange then fails too, and either may be seen first.
        futures_lite::future::or(exchanges, async {
            connection.await?;
            Ok(None)
        })
        .await
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    match timeout_at::<R, _>(deadline, talk).await {
        Ok(Ok(Some(read))) => assert_eq!(
            read,
            (status, SENTINEL_STATUS),
            "hyper read the answer (and the next one) otherwise"
        ),
        Ok(Err(error)) if error.is_parse_too_large() => {}
        Ok(Err(error)) => panic!("hyper refused an answer read as {status}, reusable: {error}"),
        Ok(Ok(None)) => panic!("hyper closed on an answer read as {status}, reusable"),
        Err(_) => panic!("hyper waited for more of an answer read as {status}, reusable"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, answer)) = data.split_first() else {
        return;
    };
    let split = match cut {
        _ if cut % 2 == 1 => Delivery::Lines,
        _ => Delivery::Pieces(usize::from(cut / 2 % 32) + 1),
    };
    let harness = harness().lock().unwrap_or_else(|e| e.into_inner());
    harness
        .inputs
        .send((answer.to_vec(), split))
        .expect("the exchange side is running");
    harness.done.recv().expect("the exchange side answered");
});
