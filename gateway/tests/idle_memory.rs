//! What an idle keep-alive connection costs the gateway's heap, counted by
//! a counting allocator around the system's, with the daemon running in
//! this process: at most 1 KiB each once parked. (RSS, what the operating
//! system sees, is the benchmark's measure: `bench/idle-memory.py`.)
//!
//! The clients are blocking std sockets, which allocate nothing, so every
//! byte counted is the daemon's. The two backends' daemons share this
//! process, one after the other: each test holds [`ONE_AT_A_TIME`].

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use common::Backend;
use gateway::config::Config;
use gateway::daemon::{self, Mode};
use gateway::startup_signals::StartupSignals;

/// The system's allocator, keeping count of the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Connections measured: enough that a few allocations of the daemon's
/// own (a timer, a log line) are lost in the division.
const CONNECTIONS: usize = 2000;
const BUDGET: isize = 1024;

/// Starts the daemon on `backend` in this process, one worker, its
/// counter in memory; the public listener's address. It runs until the
/// test process ends.
fn start_daemon(backend: Backend) -> SocketAddr {
    let public = free_port();
    let counter = free_port();
    let text = format!(
        "[runtime]\nbackend = \"{}\"\nworkers = 1\nthreading = \"shared\"\n\
         [server]\nlisten = \"{public}\"\n\
         [upstream]\nurl = \"http://{counter}/counter\"\n\
         [counter]\nlisten = \"{counter}\"\nstore = \"memory\"\n",
        backend.name()
    );
    let config = Config::parse(Path::new("idle-memory.toml"), &text).unwrap();
    let signals = StartupSignals::catch().unwrap();
    std::thread::spawn(move || {
        daemon::run(
            config,
            Mode::Gateway,
            gateway::logging::LogLevel::none(),
            signals,
        )
    });
    common::eventually_blocking("the daemon's listener", Duration::from_secs(10), || {
        TcpStream::connect(public).map(drop)
    });
    public
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Sends `GET /` on `stream` and reads its whole answer; whether it was a
/// counted visit's.
fn visit(stream: &mut TcpStream) -> bool {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    read_answers(stream, 1)
}

/// Reads `count` whole answers; whether each was a counted visit's.
fn read_answers(stream: &mut TcpStream, count: usize) -> bool {
    const WELCOME: &[u8] = b"Welcome to my site!";
    let mut seen = Vec::new();
    let mut buf = [0; 1024];
    while seen
        .windows(WELCOME.len())
        .filter(|w| *w == WELCOME)
        .count()
        < count
    {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            return false;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    seen.starts_with(b"HTTP/1.1 200")
}

/// The live heap once it has stopped changing (the daemon parking the
/// last connections, finishing what the last answers started): the same
/// over a second, on a machine that may be slow to run the daemon.
fn settled_live() -> isize {
    let mut last = LIVE.load(Ordering::Relaxed);
    let mut same = 0;
    while same < 5 {
        std::thread::sleep(Duration::from_millis(200));
        let now = LIVE.load(Ordering::Relaxed);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

async fn a_parked_connection_holds_at_most_1_kib_of_heap(backend: Backend) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let public = start_daemon(backend);
    // Everything made once per process (pools, the first connection's
    // lazily built parts) is in place before the count.
    let mut warm = TcpStream::connect(public).unwrap();
    assert!(visit(&mut warm));
    drop(warm);
    let before = settled_live();

    let mut idle = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(public).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert!(visit(&mut stream), "a visit not welcomed");
        idle.push(stream);
    }
    let after = settled_live();
    let each = (after - before) / CONNECTIONS as isize;
    eprintln!(
        "{}: {each} bytes of heap per parked connection ({before} -> {after})",
        backend.name()
    );
    assert!(
        each <= BUDGET,
        "{each} bytes per parked connection, over {BUDGET}"
    );

    // Parked, they still serve: a visit, and a pipelined pair.
    for stream in idle.iter_mut().take(50) {
        assert!(visit(stream));
    }
    std::thread::sleep(Duration::from_millis(500));
    for stream in idle.iter_mut().take(50) {
        let pair = b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n";
        stream.write_all(pair).unwrap();
        assert!(read_answers(stream, 2));
    }
    drop(idle);
    // The next backend's daemon is measured against a quiet heap.
    settled_live();
}

both_backends!(a_parked_connection_holds_at_most_1_kib_of_heap);
