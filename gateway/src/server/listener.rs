//! The listener: accepts connections up to the listener's cap until its
//! stop is set, and spawns each on the worker whose turn it is, served
//! there by that worker's service. Accept errors that would recur at once
//! (out of descriptors or memory) make it back off instead of spinning.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::pin::{Pin, pin};
use std::time::{Duration, Instant};

use async_lock::SemaphoreGuardArc;
use backends::Runtime;
use futures_lite::future;

use super::ServerSettings;
use super::connection::{Accepted, Listening, Offered, adopt, serve_connection};
use super::drain::{Connections, Open};
use super::handshake::serve_tls;
use crate::service::Service;
use crate::shutdown::Stop;
use crate::tls::Security;

/// A bound socket and what serves the connections accepted on it.
pub(super) struct Listener<R: Runtime, S: 'static> {
    pub(super) socket: R::Listener,
    /// One per worker that connections are handed to, in turn.
    pub(super) workers: &'static [Listening<S>],
    pub(super) settings: &'static ServerSettings,
    pub(super) connections: &'static Connections,
    pub(super) stop: &'static Stop,
}

impl<R: Runtime, S: Service> Listener<R, S> {
    /// Accepts until the stop is set, then closes the socket (new clients
    /// are refused from then on).
    pub(super) async fn run(self) {
        let mut stopped = pin!(self.stop.latch().wait());
        let mut next_worker = 0;
        loop {
            // `or` polls its first future first: an accept that always
            // finds a connection waiting would never let `stopped` be
            // polled, and a flood would keep coming in past the signal and
            // the deadline.
            if self.stop.latch().is_set() {
                break;
            }
            let permit = self.connections.limit.acquire_arc();
            let Some(permit) = unless_stopped(stopped.as_mut(), permit).await else {
                break;
            };
            let accepted = R::accept(&self.socket);
            let Some(accepted) = unless_stopped(stopped.as_mut(), accepted).await else {
                break;
            };
            match accepted {
                Ok((stream, peer)) => {
                    // With one worker every connection goes to worker 0,
                    // which per core is the acceptor's own, and shared is
                    // any worker.
                    let worker = next_worker;
                    next_worker = (next_worker + 1) % self.workers.len();
                    self.spawn_connection(worker, stream, peer, permit);
                }
                Err(error) => {
                    drop(permit);
                    self.after_accept_error(&error).await;
                }
            }
        }
    }

    /// Hands an accepted connection to `worker`'s task. The accepted
    /// socket is in no reactor yet: the task that serves it registers it
    /// with its own worker's, once. Each kind of connection is a task of
    /// its own type, so that a plain one's is no larger than it needs.
    fn spawn_connection(
        &self,
        worker: usize,
        stream: TcpStream,
        peer: SocketAddr,
        permit: SemaphoreGuardArc,
    ) {
        let connection = Accepted {
            peer,
            at: Instant::now(),
            listening: &self.workers[worker],
            open: Open::new(self.connections, permit),
            // With TLS, ALPN decides before the first byte.
            offered: match self.settings.http2 {
                Some(_) => Offered::Either,
                None => Offered::Http1,
            },
        };
        match self.settings.tls {
            None => R::spawn_on(
                worker,
                serve_connection::<R, S, _>(
                    move |peer| adopt::<R>(stream, peer),
                    Security::Plain,
                    Box::new(connection),
                    backends::Stream::poll_readable,
                ),
            ),
            Some(tls) => R::spawn_on(worker, serve_tls::<R, S>(tls, stream, connection)),
        }
    }

    /// Backs off after an accept that failed for want of resources:
    /// accepting again at once would spin, and closing connections frees
    /// what is needed. Other failures concern one client only.
    async fn after_accept_error(&self, error: &io::Error) {
        if is_resource_exhaustion(error) {
            tracing::warn!(listener = self.settings.name, %error, "accept failed, backing off 100ms");
            R::sleep_until(Instant::now() + Duration::from_millis(100)).await;
        } else {
            tracing::debug!(listener = self.settings.name, %error, "accept failed");
        }
    }
}

/// `step`'s output, or `None` if `stopped` completes first; `step` is
/// polled first.
async fn unless_stopped<T>(
    stopped: Pin<&mut impl Future<Output = ()>>,
    step: impl Future<Output = T>,
) -> Option<T> {
    future::or(async { Some(step.await) }, async {
        stopped.await;
        None
    })
    .await
}

/// Out of file descriptors (the process's or the system's), socket
/// buffers or memory: an accept that fails so fails again at once.
fn is_resource_exhaustion(error: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(error),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
    )
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::is_resource_exhaustion;

    #[test]
    fn running_out_of_descriptors_buffers_or_memory_is_resource_exhaustion() {
        // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux; then ECONNABORTED.
        for errno in [24, 23, 105, 12] {
            assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!is_resource_exhaustion(&io::Error::from_raw_os_error(103)));
        assert!(!is_resource_exhaustion(&io::ErrorKind::WouldBlock.into()));
    }
}
