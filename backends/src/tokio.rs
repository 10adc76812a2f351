//! The tokio backend: a multi-thread runtime with `workers` worker threads
//! (the current-thread runtime for one), tokio's reactor and timer, and
//! hyper-util's adapters between tokio's IO traits and hyper's.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::Interest;
use tokio::signal::unix::{SignalKind, signal};

use crate::{Runtime, Signal, Threading};

/// A listening socket in tokio's reactor, accepted from without
/// registering the connections (see [`Runtime::accept`]).
///
/// tokio's `TcpListener` only accepts into a registered `TcpStream`, and
/// waiting for readiness without an `unsafe` `AsyncFd` is only public on
/// `TcpStream`: so the listening socket is held as one. Its registration
/// is what any socket's is (the descriptor in tokio's epoll set, readable
/// when a connection waits); only `async_io` is ever called on it.
pub struct Listener(tokio::net::TcpStream);

/// The per-core workers' runtimes, for [`Runtime::spawn_on`]; unset with
/// shared threading.
///
/// Process-wide because the [`Runtime`] trait's spawns are associated
/// functions: a connection or a pool reaches its worker by index, from any
/// thread, without a handle threaded through every call. It is set once, by
/// the one `block_on` a process runs (a second is an error, not a silent
/// swap), which is why the conformance tests run each case in a process of
/// its own.
static PER_CORE: OnceLock<Vec<tokio::runtime::Handle>> = OnceLock::new();

/// `workers` current-thread runtimes, each driven by a thread of its own;
/// `main` runs on the first, and the rest stop when it returns.
fn per_core<F>(workers: usize, main: F) -> io::Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let runtimes = (0..workers)
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .collect::<io::Result<Vec<_>>>()?;
    let handles: Vec<_> = runtimes.iter().map(|r| r.handle().clone()).collect();
    PER_CORE
        .set(handles.clone())
        .map_err(|_| io::Error::other("the per-core workers are already running"))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let threads = runtimes
        .into_iter()
        .enumerate()
        .map(|(index, runtime)| {
            let mut stopped = stopped.clone();
            crate::spawn_worker(index, workers, move || {
                runtime.block_on(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    let output = futures_lite::future::block_on(handles[0].spawn(main));
    let _ = stop.send(true);
    for thread in threads {
        let _ = thread.join();
    }
    match output {
        Ok(output) => Ok(output),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => Err(io::Error::other(error)),
    }
}

/// Fails, as the OS would refuse them, if `count` threads cannot all run
/// at once.
///
/// tokio's multi-thread builder starts each worker through its blocking
/// pool, which panics ("OS can't spawn worker thread") when the OS
/// refuses one: tokio has no fallible way to build that runtime, and the
/// release build aborts on a panic, so it cannot be caught either. So the
/// same threads (the same default stack size) are asked for first, held
/// until all have started, and let go: a task or memory limit below the
/// worker count becomes an error. It is a check, not a reservation: a
/// limit reached in the moment between it and tokio's own spawns still
/// ends in tokio's panic.
fn check_threads_available(count: usize) -> io::Result<()> {
    let gate = Arc::new(RwLock::new(()));
    let closed = gate.write().unwrap_or_else(PoisonError::into_inner);
    let mut threads = Vec::with_capacity(count);
    let mut refused = None;
    for index in 0..count {
        let gate = gate.clone();
        match crate::spawn_worker(index, count, move || drop(gate.read())) {
            Ok(thread) => threads.push(thread),
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
    }
    drop(closed);
    for thread in threads {
        let _ = thread.join();
    }
    refused.map_or(Ok(()), Err)
}

/// tokio's readiness is edge-triggered and tracked for every registered
/// stream, so an idle stream's FIN or RST has already marked it readable:
/// `try_read` only makes a syscall when something arrived.
impl crate::Stream for TokioIo<tokio::net::TcpStream> {
    fn is_reusable(&mut self) -> bool {
        matches!(
            self.inner().try_read(&mut [0; 1]),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock
        )
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_read_ready(cx)
    }
}

/// Runs the gateway on tokio's work-stealing multi-thread scheduler, or on
/// its single-threaded one when there is one worker; per core, on one
/// single-threaded runtime per worker thread.
///
/// One worker has no one to steal from, and the multi-thread scheduler's
/// split between a 256-task local queue and a shared overflow queue, which
/// it visits once every 31 tasks, made it unfair under load: with many
/// busy connections, those that spilled into the overflow queue waited
/// far longer than the rest for their turn. The single-threaded scheduler
/// keeps one FIFO queue, and a tail like nginx's (bench/HISTORY.md).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokio;

impl Runtime for Tokio {
    const NAME: &'static str = "tokio";

    type Listener = Listener;
    type Stream = TokioIo<tokio::net::TcpStream>;
    type Timer = TokioTimer;
    type Sleep = tokio::time::Sleep;

    fn block_on<F>(workers: usize, threading: Threading, main: F) -> io::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let workers = workers.max(1);
        if threading == Threading::PerCore {
            return per_core(workers, main);
        }
        let runtime = if workers == 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            check_threads_available(workers)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("gateway-worker")
                .enable_all()
                .build()?
        };
        Ok(runtime.block_on(main))
    }

    fn spawn<F>(task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(task));
        }
    }

    fn spawn_on<F>(worker: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match PER_CORE.get() {
            Some(workers) => drop(workers[worker % workers.len()].spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }

    fn adopt_listener(listener: TcpListener) -> io::Result<Self::Listener> {
        listener.set_nonblocking(true)?;
        let socket = std::net::TcpStream::from(std::os::fd::OwnedFd::from(listener));
        Ok(Listener(tokio::net::TcpStream::from_std(socket)?))
    }

    async fn accept(listener: &Self::Listener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        let socket = &listener.0;
        socket
            .async_io(Interest::READABLE, || crate::accept_nonblocking(socket))
            .await
    }

    fn adopt_stream(stream: std::net::TcpStream) -> io::Result<Self::Stream> {
        Ok(TokioIo::new(tokio::net::TcpStream::from_std(stream)?))
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(TokioIo::new(stream))
    }

    fn sleep_until(deadline: Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline.into())
    }

    fn timer() -> Self::Timer {
        TokioTimer::new()
    }

    fn signals() -> io::Result<impl futures_lite::Stream<Item = Signal> + Send + Unpin + 'static> {
        let mut caught = Signal::ALL
            .into_iter()
            .map(|caught| Ok((caught, signal(kind(caught))?)))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(futures_lite::stream::poll_fn(move |cx| {
            for (caught, receiver) in &mut caught {
                match receiver.poll_recv(cx) {
                    Poll::Ready(Some(())) => return Poll::Ready(Some(*caught)),
                    // The runtime is shutting down: no signal will come.
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        }))
    }
}

fn kind(caught: Signal) -> SignalKind {
    match caught {
        Signal::Terminate => SignalKind::terminate(),
        Signal::Interrupt => SignalKind::interrupt(),
        Signal::Hangup => SignalKind::hangup(),
        Signal::User1 => SignalKind::user_defined1(),
        Signal::User2 => SignalKind::user_defined2(),
        Signal::Alarm => SignalKind::alarm(),
        Signal::FileSizeLimit => SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw()),
    }
}
