//! What the gateway relies on from a runtime, checked on every backend:
//! where tasks run, how an idle pooled stream tells a live connection from
//! one closed, reset or sent to unasked, waiting for readability without
//! a read, timers, signals, and accepted sockets' options.
//!
//! Each case runs in a process of its own (the test runs this binary
//! again for it): a runtime's per-core workers are the process's, started
//! by one [`Runtime::block_on`] per process, and a signal sent to the
//! process must reach the one case that waits for it.

use std::future::Future;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::process::Command;
use std::time::{Duration, Instant};

use backends::{Runtime, Signal, Stream as _, Threading};
use futures_lite::StreamExt;
use futures_lite::future::{self, poll_fn};
use hyper::rt::Read as _;

/// Set in the process that runs one case: the case's test name.
const CASE: &str = "BACKENDS_CONFORMANCE_CASE";

/// Runs `case` in a new process of this test binary, and fails with its
/// output if it fails there.
fn isolated(name: &str, case: fn()) {
    if std::env::var(CASE).as_deref() == Ok(name) {
        case();
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CASE, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{name}:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{name} did not run:\n{stdout}");
}

/// One test per case and backend, named `case::backend`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        $(backends::for_every_backend!(on_every_backend!($case));)*
    };
}

macro_rules! on_every_backend {
    ($case:ident ; $([$runtime:path, $variant:path, $backend:ident])*) => {
        mod $case {
            $(
                #[test]
                fn $backend() {
                    super::isolated(
                        concat!(stringify!($case), "::", stringify!($backend)),
                        super::$case::<$runtime>,
                    )
                }
            )*
        }
    };
}

conformance!(
    spawn_on_runs_a_task_on_the_worker_it_names,
    spawn_per_core_stays_on_the_calling_worker,
    shared_workers_run_every_task_and_block_on_returns_mains_output,
    a_quiet_idle_stream_is_reusable,
    an_idle_stream_the_peer_closed_is_not_reusable,
    an_idle_stream_the_peer_reset_is_not_reusable,
    an_idle_stream_sent_unasked_bytes_is_not_reusable,
    a_stream_is_reusable_after_a_whole_exchange,
    poll_readable_is_ready_without_reading,
    sleep_until_waits_for_its_instant,
    every_signal_is_caught_and_yielded,
    accepted_streams_have_nodelay_and_their_peer,
);

/// Runs `main` on `workers` workers.
fn run<R: Runtime, T: Send + 'static>(
    workers: usize,
    threading: Threading,
    main: impl Future<Output = T> + Send + 'static,
) -> T {
    R::block_on(workers, threading, main).unwrap()
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("").to_owned()
}

/// Which worker thread `spawn_on` puts each task on: worker 4 of three is
/// worker 1.
fn spawn_on_runs_a_task_on_the_worker_it_names<R: Runtime>() {
    let (main, tasks) = run::<R, _>(3, Threading::PerCore, async {
        let mut tasks = Vec::new();
        for worker in [0, 1, 2, 4] {
            let (sender, receiver) = async_channel::bounded(1);
            R::spawn_on(worker, async move {
                let _ = sender.send(thread_name()).await;
            });
            tasks.push(receiver.recv().await.unwrap());
        }
        (thread_name(), tasks)
    });
    assert_eq!(main, "gateway-worker-0");
    assert_eq!(
        tasks,
        [
            "gateway-worker-0",
            "gateway-worker-1",
            "gateway-worker-2",
            "gateway-worker-1"
        ]
    );
}

/// Per core, `spawn` keeps a task on the worker that spawned it.
fn spawn_per_core_stays_on_the_calling_worker<R: Runtime>() {
    let names = run::<R, _>(3, Threading::PerCore, async {
        let (sender, receiver) = async_channel::bounded(2);
        R::spawn_on(2, async move {
            let inner = sender.clone();
            R::spawn(async move {
                let _ = inner.send(thread_name()).await;
            });
            let _ = sender.send(thread_name()).await;
        });
        [
            receiver.recv().await.unwrap(),
            receiver.recv().await.unwrap(),
        ]
    });
    assert_eq!(names, ["gateway-worker-2", "gateway-worker-2"]);
}

/// Shared threading runs every spawned task, on the workers, and
/// `block_on` hands back what `main` returned.
fn shared_workers_run_every_task_and_block_on_returns_mains_output<R: Runtime>() {
    let names = run::<R, _>(2, Threading::Shared, async {
        let (sender, receiver) = async_channel::unbounded();
        for _ in 0..100 {
            let sender = sender.clone();
            R::spawn(async move {
                let _ = sender.send(thread_name()).await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..100 {
            names.push(receiver.recv().await.unwrap());
        }
        names
    });
    assert_eq!(names.len(), 100);
    assert!(
        names.iter().all(|name| name.starts_with("gateway-worker")),
        "{names:?}"
    );
}

/// A connection from the runtime's `connect` and the accepted peer end.
async fn connected<R: Runtime>() -> (R::Stream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = R::connect(listener.local_addr().unwrap()).await.unwrap();
    let (peer, _) = listener.accept().unwrap();
    (stream, peer)
}

/// Lets the runtime's reactor see what has arrived.
async fn settle<R: Runtime>() {
    R::sleep_until(Instant::now() + Duration::from_millis(100)).await;
}

/// What `is_reusable` says of a pooled stream after `peer_does` acts on
/// the peer end: with `watch_while_idle` first (as the pool calls it) and
/// without.
fn reusable_after<R: Runtime>(peer_does: fn(TcpStream) -> Option<TcpStream>) -> [bool; 2] {
    run::<R, _>(1, Threading::Shared, async move {
        let mut seen = [false; 2];
        for (watched, seen) in seen.iter_mut().enumerate() {
            let (mut stream, peer) = connected::<R>().await;
            if watched == 1 {
                stream.watch_while_idle();
            }
            let _kept = peer_does(peer);
            settle::<R>().await;
            *seen = stream.is_reusable();
        }
        seen
    })
}

fn a_quiet_idle_stream_is_reusable<R: Runtime>() {
    assert_eq!(reusable_after::<R>(Some), [true, true]);
}

fn an_idle_stream_the_peer_closed_is_not_reusable<R: Runtime>() {
    let close = |peer: TcpStream| {
        drop(peer);
        None
    };
    assert_eq!(reusable_after::<R>(close), [false, false]);
}

fn an_idle_stream_the_peer_reset_is_not_reusable<R: Runtime>() {
    let reset = |peer: TcpStream| {
        // Closing with a zero linger sends a reset instead of a FIN.
        socket2::SockRef::from(&peer)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(peer);
        None
    };
    assert_eq!(reusable_after::<R>(reset), [false, false]);
}

fn an_idle_stream_sent_unasked_bytes_is_not_reusable<R: Runtime>() {
    let chatter = |mut peer: TcpStream| {
        peer.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        Some(peer)
    };
    assert_eq!(reusable_after::<R>(chatter), [false, false]);
}

async fn write_all<S: backends::Stream>(stream: &mut S, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *stream).poll_write(cx, bytes))
            .await
            .unwrap();
        bytes = &bytes[n..];
    }
}

/// Reads what one read gives (waiting for it).
async fn read_some<S: backends::Stream>(stream: &mut S) -> Vec<u8> {
    let mut buffer = [MaybeUninit::uninit(); 64];
    let mut read = hyper::rt::ReadBuf::uninit(&mut buffer);
    poll_fn(|cx| Pin::new(&mut *stream).poll_read(cx, read.unfilled()))
        .await
        .unwrap();
    read.filled().to_vec()
}

/// A request answered and read whole leaves the stream reusable, and the
/// next exchange on it works: the drained-socket bookkeeping of a stream
/// does not mistake the last read for a new arrival, or miss the next.
fn a_stream_is_reusable_after_a_whole_exchange<R: Runtime>() {
    let (reusable, second) = run::<R, _>(1, Threading::Shared, async {
        let (mut stream, mut peer) = connected::<R>().await;
        let server = std::thread::spawn(move || {
            for answer in [&b"pong"[..], b"again"] {
                let mut request = [0; 4];
                peer.read_exact(&mut request).unwrap();
                peer.write_all(answer).unwrap();
            }
            peer
        });
        write_all(&mut stream, b"ping").await;
        assert_eq!(read_some(&mut stream).await, b"pong");
        stream.watch_while_idle();
        settle::<R>().await;
        let reusable = stream.is_reusable();
        write_all(&mut stream, b"ping").await;
        let second = read_some(&mut stream).await;
        let _peer = server.join().unwrap();
        (reusable, second)
    });
    assert!(reusable, "not reusable after a whole exchange");
    assert_eq!(second, b"again");
}

/// `poll_readable` waits for bytes and leaves them to be read.
fn poll_readable_is_ready_without_reading<R: Runtime>() {
    let (early, read) = run::<R, _>(1, Threading::Shared, async {
        let (mut stream, mut peer) = connected::<R>().await;
        // Nothing yet: not ready (an empty read is drained first).
        let early = future::poll_once(poll_fn(|cx| stream.poll_readable(cx))).await;
        let early = early.is_some() && {
            // A runtime may say "maybe" once; a read then says no.
            let mut probe = [MaybeUninit::uninit(); 1];
            let mut probe = hyper::rt::ReadBuf::uninit(&mut probe);
            let polled = future::poll_once(poll_fn(|cx| {
                Pin::new(&mut stream).poll_read(cx, probe.unfilled())
            }))
            .await;
            polled.is_some()
        };
        peer.write_all(b"next").unwrap();
        poll_fn(|cx| stream.poll_readable(cx)).await.unwrap();
        (early, read_some(&mut stream).await)
    });
    assert!(!early, "readable before anything was sent");
    assert_eq!(read, b"next");
}

fn sleep_until_waits_for_its_instant<R: Runtime>() {
    let (waited, past) = run::<R, _>(1, Threading::Shared, async {
        let start = Instant::now();
        R::sleep_until(start + Duration::from_millis(200)).await;
        let waited = start.elapsed();
        let start = Instant::now();
        R::sleep_until(start - Duration::from_secs(1)).await;
        (waited, start.elapsed())
    });
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(
        past < Duration::from_secs(1),
        "an instant past waited {past:?}"
    );
}

/// Each signal the daemon catches, sent to this process, is yielded by
/// `signals()` and ends nothing.
fn every_signal_is_caught_and_yielded<R: Runtime>() {
    let yielded = run::<R, _>(1, Threading::Shared, async {
        let mut signals = R::signals().unwrap();
        let mut yielded = Vec::new();
        for signal in Signal::ALL {
            let name = signal.name().trim_start_matches("SIG");
            let sent = Command::new("kill")
                .args(["-s", name, &std::process::id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success(), "kill -s {name}");
            let next = future::or(signals.next(), async {
                R::sleep_until(Instant::now() + Duration::from_secs(5)).await;
                None
            });
            yielded.push(next.await);
        }
        yielded
    });
    assert_eq!(yielded, Signal::ALL.map(Some));
}

/// An accepted socket has `TCP_NODELAY` (every answer is one small write)
/// and the address of the client that connected.
fn accepted_streams_have_nodelay_and_their_peer<R: Runtime>() {
    let listener = backends::bind_listener(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = listener.local_addr().unwrap();
    let (nodelay, peer, client) = run::<R, _>(1, Threading::Shared, async move {
        let listener = R::adopt_listener(listener).unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let (accepted, peer) = R::accept(&listener).await.unwrap();
        let nodelay = accepted.nodelay().unwrap();
        // Registered with the runtime, it serves.
        let mut accepted = R::adopt_stream(accepted).unwrap();
        write_all(&mut accepted, b"hi").await;
        (nodelay, peer, client)
    });
    assert!(nodelay, "an accepted socket without TCP_NODELAY");
    assert_eq!(peer, client.local_addr().unwrap());
    let mut greeting = [0; 2];
    (&client).read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"hi");
}
