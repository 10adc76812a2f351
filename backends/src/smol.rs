//! The smol backend: one shared `async-executor` driven by `workers`
//! threads (per core: one executor per worker thread), async-io's reactor
//! and timers, smol-hyper's timer, and a small adapter from futures-io
//! streams to hyper's IO traits. No tokio runtime exists in this mode.
//!
//! The shared executor is a process-wide static so that
//! [`Runtime::spawn`] can reach it from anywhere, as `tokio::spawn`
//! reaches tokio's; a per-core worker finds its own in a thread-local.
//! async-io runs its reactor on whichever thread is blocked waiting, or
//! on its own "async-io" thread when none is.

use std::future::Future;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use std::cell::Cell;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker, ready};

use futures_lite::{AsyncWrite, StreamExt};
use smol::{Async, Executor, Timer};
use smol_hyper::rt::SmolTimer;

use crate::{Runtime, Signal, Threading};

/// The executor shared by every worker thread. A static because the
/// [`Runtime`] trait's spawns are associated functions, called from any task
/// with no runtime value to reach it through (see `PER_CORE` in tokio.rs);
/// `'static` too because every spawned task may outlive any scope.
static EXECUTOR: Executor<'static> = Executor::new();

/// Runs the gateway on smol: a shared executor over async-io.
#[derive(Debug, Clone, Copy, Default)]
pub struct Smol;

/// Completes at a deadline; async-io's [`Timer`] yields the instant, hyper
/// and the gateway want `()`.
pub struct SmolSleep(Timer);

impl Future for SmolSleep {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// A TCP stream in hyper's IO vocabulary.
///
/// hyper hands a reader uninitialised memory; futures-io readers want
/// initialised memory, and zeroing hyper's whole read buffer before every
/// read (what a generic adapter must do without `unsafe`) would cost more
/// than the rest of a small request. Instead reads land in a per-thread
/// buffer, zeroed once, and what arrived is copied; a per-stream buffer
/// would cost every idle connection its size.
///
/// async-io's own `poll_read` tries the read syscall on every poll, and
/// hyper polls a connection's read side each time its task wakes (for
/// the next request, or to notice a client that left mid-visit), so most
/// of those reads would find nothing and come back `EAGAIN`. Like tokio,
/// this adapter remembers when a read has drained the socket (a short
/// read) and then waits for the reactor's next readable event before
/// reading again.
pub struct SmolStream {
    io: Async<TcpStream>,
    /// False once a read came back short or would block, until async-io
    /// reports the socket readable again.
    may_be_readable: bool,
    /// For a stream in a pool: set when something arrives while it idles.
    arrived: Option<Arc<Arrived>>,
}

impl SmolStream {
    fn new(io: Async<TcpStream>) -> Self {
        Self {
            io,
            may_be_readable: true,
            arrived: None,
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; 16 * 1024].into_boxed_slice());
}

impl hyper::rt::Read for SmolStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.may_be_readable {
                // Arms the socket's one-shot interest; should data have
                // arrived since the short read, epoll reports it at once.
                ready!(this.io.poll_readable(cx))?;
                this.may_be_readable = true;
            }
            let read = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let len = buf.remaining().min(scratch.len());
                let n = (&mut this.io.get_ref()).read(&mut scratch[..len])?;
                buf.put_slice(&scratch[..n]);
                Ok::<_, io::Error>((n, len))
            });
            match read {
                Ok((n, len)) => {
                    // A short read emptied the receive queue; an empty
                    // read is the end of the stream, which stays readable.
                    if n != 0 && n < len {
                        this.may_be_readable = false;
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    this.may_be_readable = false;
                }
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

/// async-io's reactor only watches a stream while a task waits on it, with
/// one-shot interest, so nothing notices what arrives on an idle pooled
/// stream unless it is armed for it. It is armed with a waker that only
/// raises a flag: the next event (a FIN, a reset, bytes nobody asked for)
/// sets it, and checking it costs no syscall. The waker is what counts:
/// `poll_readable`'s own "an event came since" answer can miss an event
/// delivered by a reactor turn that began before the arming, and a closed
/// connection would be taken as usable. The exchange that reuses the stream
/// finds the interest still armed and replaces the waker with its own.
impl crate::Stream for SmolStream {
    fn watch_while_idle(&mut self) {
        if self.may_be_readable {
            return; // `is_reusable` asks the socket
        }
        let arrived = self.arrived.get_or_insert_with(Default::default);
        arrived.0.store(false, Ordering::Release);
        let waker = Waker::from(arrived.clone());
        if self
            .io
            .poll_readable(&mut Context::from_waker(&waker))
            .is_ready()
        {
            self.may_be_readable = true;
        }
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.may_be_readable {
            ready!(self.io.poll_readable(cx))?;
            self.may_be_readable = true;
        }
        Poll::Ready(Ok(()))
    }

    fn is_reusable(&mut self) -> bool {
        if let (false, Some(arrived)) = (self.may_be_readable, &self.arrived) {
            return !arrived.0.load(Ordering::Acquire);
        }
        // Not drained, or not watched: ask the socket.
        let mut probe = [std::mem::MaybeUninit::uninit(); 1];
        matches!(
            socket2::SockRef::from(self.io.get_ref()).peek(&mut probe),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock
        )
    }
}

/// Raised by async-io when an idle stream's armed interest fires.
#[derive(Default)]
struct Arrived(AtomicBool);

impl Wake for Arrived {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

impl hyper::rt::Write for SmolStream {
    crate::pass_through!(
        self.io => poll_write, poll_write_vectored, poll_flush, poll_shutdown = poll_close
    );

    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// Tasks between two polls of the reactor by a busy worker.
///
/// async-io's fallback thread wakes often and takes the reactor itself
/// when no one polled it since its last look; its wake-ups then preempt
/// the worker, and the worker parks whenever it finds the reactor taken.
/// A batch must therefore end before that thread looks again, even with
/// many connections ready, or the fallback thread stays in charge and
/// most visits pay a context switch. A smaller batch polls the reactor
/// more often than light load needs, which costs syscalls.
const TASKS_PER_REACTOR_POLL: usize = 16;

/// A worker's loop: run tasks, and every few let `smol::block_on` poll the
/// reactor without blocking. A worker inside `Executor::run` never returns
/// to `block_on` while tasks are ready, so under load only async-io's
/// fallback thread would collect I/O events, and its every wake-up
/// preempts a worker: a context switch per batch of events. Yielding keeps
/// event collection on the workers.
async fn work(executor: &'static Executor<'static>) {
    loop {
        executor.tick().await;
        for _ in 1..TASKS_PER_REACTOR_POLL {
            if !executor.try_tick() {
                break;
            }
        }
        futures_lite::future::yield_now().await;
    }
}

/// The per-core workers' executors, for [`Runtime::spawn_on`]; unset with
/// shared threading. A static, as [`EXECUTOR`] is: `spawn_on` is called
/// with no runtime value to hold them, from any task.
static PER_CORE: OnceLock<Vec<&'static Executor<'static>>> = OnceLock::new();

thread_local! {
    /// A per-core worker's own executor; `None` on other threads.
    static OWN_EXECUTOR: Cell<Option<&'static Executor<'static>>> = const { Cell::new(None) };
}

/// The executor a task spawned on this thread joins: a per-core worker's
/// own; elsewhere the first worker's, or the shared one.
fn current_executor() -> &'static Executor<'static> {
    OWN_EXECUTOR
        .with(Cell::get)
        .or_else(|| PER_CORE.get().map(|executors| executors[0]))
        .unwrap_or(&EXECUTOR)
}

impl Runtime for Smol {
    const NAME: &'static str = "smol";

    type Listener = Async<TcpListener>;
    type Stream = SmolStream;
    type Timer = SmolTimer;
    type Sleep = SmolSleep;

    fn block_on<F>(workers: usize, threading: Threading, main: F) -> io::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        // Per core, each worker drives an executor of its own; async-io's
        // reactor stays one for the process, polled by whichever worker
        // gets to it.
        let executors: Vec<&'static Executor<'static>> = match threading {
            Threading::Shared => vec![&EXECUTOR; workers.max(1)],
            Threading::PerCore => {
                let own: Vec<_> = (0..workers.max(1))
                    .map(|_| &*Box::leak(Box::new(Executor::new())))
                    .collect();
                PER_CORE
                    .set(own.clone())
                    .map_err(|_| io::Error::other("the per-core workers are already running"))?;
                own
            }
        };
        for (index, &executor) in executors.iter().enumerate() {
            crate::spawn_worker(index, executors.len(), move || {
                if threading == Threading::PerCore {
                    OWN_EXECUTOR.with(|own| own.set(Some(executor)));
                }
                smol::block_on(work(executor))
            })?;
        }
        // The main thread only waits for `main`, which runs on the workers,
        // like tokio's `block_on` with its worker pool. It parks without
        // driving async-io's reactor (futures-lite's `block_on`, not
        // smol's): otherwise it sits in epoll_wait and every readiness
        // event costs a wake-up and a context switch to hand the work to
        // a worker. Idle workers drive the reactor themselves.
        Ok(futures_lite::future::block_on(executors[0].spawn(main)))
    }

    fn spawn<F>(task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        current_executor().spawn(task).detach();
    }

    fn spawn_on<F>(worker: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match PER_CORE.get() {
            Some(executors) => executors[worker % executors.len()].spawn(task).detach(),
            None => Self::spawn(task),
        }
    }

    fn adopt_listener(listener: TcpListener) -> io::Result<Self::Listener> {
        Async::new(listener)
    }

    async fn accept(listener: &Self::Listener) -> io::Result<(TcpStream, SocketAddr)> {
        listener
            .read_with(|listener| crate::accept_nonblocking(listener))
            .await
    }

    fn adopt_stream(stream: TcpStream) -> io::Result<Self::Stream> {
        // `accept` made it non-blocking already.
        Ok(SmolStream::new(Async::new_nonblocking(stream)?))
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = Async::<TcpStream>::connect(addr).await?;
        stream.get_ref().set_nodelay(true)?;
        Ok(SmolStream::new(stream))
    }

    fn sleep_until(deadline: Instant) -> Self::Sleep {
        SmolSleep(Timer::at(deadline))
    }

    fn timer() -> Self::Timer {
        SmolTimer::new()
    }

    fn signals() -> io::Result<impl futures_lite::Stream<Item = Signal> + Send + Unpin + 'static> {
        use async_signal::{Signal as Caught, Signals};
        let signals = Signals::new(Signal::ALL.map(|signal| match signal {
            Signal::Terminate => Caught::Term,
            Signal::Interrupt => Caught::Int,
            Signal::Hangup => Caught::Hup,
            Signal::User1 => Caught::Usr1,
            Signal::User2 => Caught::Usr2,
            Signal::Alarm => Caught::Alarm,
            Signal::FileSizeLimit => Caught::Xfsz,
        }))?;
        Ok(signals.filter_map(|caught| match caught.ok()? {
            Caught::Term => Some(Signal::Terminate),
            Caught::Int => Some(Signal::Interrupt),
            Caught::Hup => Some(Signal::Hangup),
            Caught::Usr1 => Some(Signal::User1),
            Caught::Usr2 => Some(Signal::User2),
            Caught::Alarm => Some(Signal::Alarm),
            Caught::Xfsz => Some(Signal::FileSizeLimit),
            _ => None,
        }))
    }
}
