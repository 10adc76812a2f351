//! The runtime seam of the gateway.
//!
//! Everything the gateway needs from an async runtime fits in one trait,
//! [`Runtime`]: run a future on N worker threads (sharing one scheduler,
//! or one scheduler each: [`Threading`]), spawn tasks, adopt a bound
//! TCP listener and accept from it, connect, sleep until an instant, hand
//! hyper a timer, and catch the signals a daemon gets ([`Signal`]). The
//! gateway is generic over it (the daemon's `run_on::<Tokio>` /
//! `run_on::<Smol>`), so the hot path is monomorphic and both runtimes run
//! exactly the same HTTP code.
//!
//! Streams are handed out as [`hyper::rt::Read`] + [`hyper::rt::Write`]
//! because hyper's IO traits are already the runtime-neutral vocabulary the
//! gateway speaks; nothing here knows about HTTP messages, counters or visits.
//!
//! The backends by name are [`Backend`] (with [`Threading`], the
//! [`Named`] choices of the gateway's `[runtime]`), and
//! [`for_every_backend!`] hands the same list to tests: the gateway's
//! config and command line, its tests, the fuzz targets and the bench all
//! take theirs from here. Adding a backend means one new module
//! implementing [`Runtime`], its variant in [`Backend`], and a line in
//! [`for_every_backend!`], which puts it through the conformance tests
//! (`tests/conformance.rs`: what the gateway relies on from a runtime)
//! and every behavioural test of the gateway. (`.ci/run` still names the
//! backends in its shell loops.)
#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

mod named;
mod pass_through;
mod smol;
mod tokio;

pub use crate::named::{Backend, Named, OnRuntime};
pub use crate::smol::Smol;
pub use crate::tokio::Tokio;

/// For [`pass_through!`]: hyper, reached through this crate so that a
/// crate using the macro need not name hyper itself.
#[doc(hidden)]
pub use hyper as __hyper;

/// Calls `$callback!(args... ; [runtime type, Backend value, name] ...)`
/// once, with every backend: the one list that tests which must cover
/// every backend expand from, so that a backend added here is covered by
/// them all.
#[macro_export]
macro_rules! for_every_backend {
    ($callback:ident ! ( $($args:tt)* )) => {
        $callback! {
            $($args)* ;
            [$crate::Tokio, $crate::Backend::Tokio, tokio]
            [$crate::Smol, $crate::Backend::Smol, smol]
        }
    };
}

/// A connected TCP stream as the gateway uses it: hyper's IO traits, plus
/// what a connection pool asks of an idle stream and how a server waits
/// on one without a buffer.
pub trait Stream: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static {
    /// The stream goes idle with nothing expected on it (into a pool):
    /// from now on, anything arriving on it should be noticed, for
    /// [`Stream::is_reusable`]. A runtime whose reactor already watches
    /// every stream has nothing to do.
    fn watch_while_idle(&mut self) {}

    /// Whether a kept-alive stream that nothing is expected on can still
    /// carry a request: the peer has not closed or reset it and has sent
    /// nothing unasked. Never waits.
    fn is_reusable(&mut self) -> bool;

    /// Ready once something may be read (bytes, the end of the stream, an
    /// error), without reading it and without a buffer: how a server waits
    /// on a connection it keeps idle at the cost of its socket alone. It may
    /// be ready when nothing came after all; a read then says so.
    fn poll_readable(&mut self, cx: &mut std::task::Context<'_>)
    -> std::task::Poll<io::Result<()>>;
}

/// How a runtime spreads tasks over its worker threads
/// (`runtime.threading` in the gateway's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threading {
    /// One scheduler for every worker: any worker runs any task, and idle
    /// workers take work from busy ones (tokio's work stealing, smol's
    /// shared executor).
    Shared,
    /// One single-threaded scheduler per worker: a task runs on the worker
    /// that spawned it, or the one [`Runtime::spawn_on`] named, and never
    /// moves. Nothing is shared on the way through a task; nothing
    /// rebalances a worker that has more than its share. The gateway's
    /// default: with one upstream pool per worker too, it served more than
    /// shared on four and eight cores (bench/HISTORY.md).
    #[default]
    PerCore,
}

/// The signals the daemon catches: it stops on the first two and must not
/// be ended by the others, whose default action would kill it with
/// requests in flight (`kill -HUP` is what operators try first for a
/// reload; `USR1`/`USR2` are sent by log rotators and other tools, and
/// nginx, which a gateway is often swapped for, survives `ALRM` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Interrupt,
    Hangup,
    User1,
    User2,
    Alarm,
    /// A write went past the file-size limit (`RLIMIT_FSIZE`). Caught so
    /// that the write fails with `EFBIG`, which the counter's store
    /// answers as an error, rather than ending the process.
    FileSizeLimit,
}

impl Signal {
    /// Every signal [`Runtime::signals`] catches.
    pub const ALL: [Signal; 7] = [
        Signal::Terminate,
        Signal::Interrupt,
        Signal::Hangup,
        Signal::User1,
        Signal::User2,
        Signal::Alarm,
        Signal::FileSizeLimit,
    ];

    /// The signal's name, as `kill -l` spells it with the `SIG` prefix.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
            Signal::Hangup => "SIGHUP",
            Signal::User1 => "SIGUSR1",
            Signal::User2 => "SIGUSR2",
            Signal::Alarm => "SIGALRM",
            Signal::FileSizeLimit => "SIGXFSZ",
        }
    }
}

/// The listen backlog the gateway asks for when it binds a socket itself;
/// the kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 65535;

/// An async runtime the gateway can run on.
///
/// All methods are associated functions: a process runs one runtime, set up
/// once by [`Runtime::block_on`], and the functions reach it through its
/// thread-local or global context, as `tokio::spawn` does.
pub trait Runtime: Sized + Send + Sync + 'static {
    /// The name used in `config.toml` (`runtime.backend`) and in logs.
    const NAME: &'static str;

    /// A listening TCP socket registered with this runtime's reactor.
    type Listener: Send + Sync + 'static;
    /// A connected TCP stream, in hyper's IO vocabulary.
    type Stream: Stream;
    /// The timer hyper uses for its own timeouts.
    type Timer: hyper::rt::Timer + Clone + Send + Sync + 'static;
    /// A future that completes at a given instant.
    type Sleep: Future<Output = ()> + Send + 'static;

    /// Runs `main` to completion with `workers` threads executing spawned
    /// tasks, spread as `threading` says, and returns its output. With
    /// [`Threading::PerCore`], `main` runs on worker 0. Tasks still running
    /// when `main` returns are abandoned. Call it once per process.
    fn block_on<F>(workers: usize, threading: Threading, main: F) -> io::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static;

    /// Spawns a detached task onto the running runtime: with
    /// [`Threading::PerCore`], onto the calling worker's own scheduler.
    /// Called where no runtime runs (a future dropped as its runtime is
    /// torn down), the task is dropped instead: never a panic.
    fn spawn<F>(task: F)
    where
        F: Future<Output = ()> + Send + 'static;

    /// Spawns a detached task onto worker `worker` (modulo the number of
    /// workers) with [`Threading::PerCore`]; like [`Runtime::spawn`] with
    /// [`Threading::Shared`], where any worker may run it. The task is
    /// first polled on that worker, so what it registers with the reactor
    /// (a stream from [`Runtime::adopt_stream`], say) belongs to that
    /// worker.
    fn spawn_on<F>(worker: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static;

    /// Registers an already bound, listening socket (bound by
    /// [`bind_listener`] or passed in by systemd) with this runtime.
    fn adopt_listener(listener: TcpListener) -> io::Result<Self::Listener>;

    /// Accepts one connection: a non-blocking socket with `TCP_NODELAY`
    /// set (see [`accept_nonblocking`]), registered with no reactor yet,
    /// so that the worker that will serve it registers it, once.
    fn accept(
        listener: &Self::Listener,
    ) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send;

    /// Registers a socket from [`Runtime::accept`] with the calling
    /// worker's reactor.
    fn adopt_stream(stream: TcpStream) -> io::Result<Self::Stream>;

    /// Opens a connection, with `TCP_NODELAY` set.
    fn connect(addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;

    /// A future that completes at `deadline`.
    fn sleep_until(deadline: Instant) -> Self::Sleep;

    /// The timer to give hyper's connection builders.
    fn timer() -> Self::Timer;

    /// Catches every [`Signal`] from now on (none of them ends the process
    /// by its default action any more) and yields each as it arrives.
    /// Call it once, inside [`Runtime::block_on`].
    fn signals() -> io::Result<impl futures_lite::Stream<Item = Signal> + Send + Unpin + 'static>;
}

/// One `accept4` on a non-blocking listener: the connection comes back
/// non-blocking already (no `ioctl` to make it so) and gets `TCP_NODELAY`.
/// `WouldBlock` when none is waiting; the backends wait for readiness.
pub fn accept_nonblocking(listener: impl std::os::fd::AsFd) -> io::Result<(TcpStream, SocketAddr)> {
    use rustix::net::{SocketFlags, acceptfrom_with};
    let (socket, peer) = acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let stream = TcpStream::from(socket);
    stream.set_nodelay(true)?;
    let peer = match peer.map(SocketAddr::try_from) {
        Some(Ok(peer)) => peer,
        // Not an IP peer on a TCP listener: ask the socket.
        _ => stream.peer_addr()?,
    };
    Ok((stream, peer))
}

/// Starts worker thread `index` of `count`. A refusal (a task or memory
/// limit) is an error naming the thread, for the daemon to report and exit
/// on, not a panic.
fn spawn_worker<T: Send + 'static>(
    index: usize,
    count: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(format!("gateway-worker-{index}"))
        .spawn(work)
        .map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "cannot start worker thread {} of {count}: {error}",
                    index + 1
                ),
            )
        })
}

/// Binds a listening TCP socket the way a server wants it: `SO_REUSEADDR`
/// (a restart does not wait out TIME_WAIT), a large backlog, non-blocking.
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}
