//! Raw bytes in, through the real server loop: the first input starts a
//! complete gateway (public listener, built-in counter as its upstream) in
//! this process, on the backend named by `FUZZ_BACKEND` (tokio unless
//! `smol`); every input is then written to a fresh TCP connection to it.
//! Whatever comes back must be an HTTP/1.x answer or nothing (or, to an
//! input that starts with HTTP/2's preface, HTTP/2 frames, the server's
//! SETTINGS first), and any panic in the gateway aborts the process,
//! which libFuzzer reports as a crash.
//!
//! `cargo +nightly fuzz run request -- -max_total_time=60`
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gateway::config::Config;
use gateway::daemon::{self, Mode};
use gateway::startup_signals::StartupSignals;
use libfuzzer_sys::fuzz_target;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn gateway() -> SocketAddr {
    static GATEWAY: OnceLock<SocketAddr> = OnceLock::new();
    *GATEWAY.get_or_init(|| {
        // A panic on any gateway thread (tokio would catch it per task)
        // must end the process so that the fuzzer sees it.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("gateway panicked: {info}");
            std::process::abort();
        }));
        let backend = std::env::var("FUZZ_BACKEND").unwrap_or_else(|_| "tokio".to_owned());
        let (public, counter) = (free_port(), free_port());
        let text = format!(
            "[runtime]\nbackend = \"{backend}\"\nworkers = 2\n\
             [server]\nlisten = \"127.0.0.1:{public}\"\nheader_read_timeout_ms = 1000\n\
             [upstream]\nurl = \"http://127.0.0.1:{counter}/counter\"\n\
             [counter]\nlisten = \"127.0.0.1:{counter}\"\nstore = \"memory\"\n"
        );
        let config = Config::parse(Path::new("fuzz.toml"), &text).expect("valid fuzz config");
        let signals = StartupSignals::catch().expect("catch signals");
        std::thread::spawn(move || {
            if let Err(error) = daemon::run(config, Mode::Gateway, gateway::logging::LogLevel::none(), signals) {
                eprintln!("gateway failed: {error}");
                std::process::abort();
            }
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], public));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the gateway did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        addr
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut stream) = TcpStream::connect(gateway()) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    let _ = stream.write_all(data);
    let _ = stream.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    // HTTP/2 with prior knowledge: the server's first frame is SETTINGS
    // (type 0x4) on stream 0.
    let http2 = data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        && answer.get(3..9) == Some(&[0x4, 0, 0, 0, 0, 0][..]);
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.") || http2,
        "not HTTP: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
});
