//! Reaching the upstream: its name resolved at start and again after a
//! failed connect, its addresses tried in turn, and for an https upstream
//! the TLS handshake, all within the connect timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use backends::Runtime;

use super::UpstreamError;
use super::metrics::UpstreamMetrics;
use crate::config::UpstreamTarget;
use crate::outcome::Outcome;
use crate::time::{Elapsed, timeout_at};
use crate::tls::{ClientTls, UpstreamStream};

/// Where the upstream is, and how to open a connection to it.
pub(super) struct Dialer {
    target: UpstreamTarget,
    connect_timeout: Duration,
    /// The resolved upstream addresses; replaced by a re-resolution after
    /// a failed connect.
    addrs: RwLock<Arc<[SocketAddr]>>,
    /// Round-robin index into `addrs`.
    next_addr: AtomicUsize,
    resolving: AtomicBool,
    /// For an https upstream.
    tls: Option<&'static ClientTls>,
    /// The last handshake failed: the next failures are not logged as
    /// warnings again, every visit would log one.
    tls_failing: AtomicBool,
    metrics: &'static UpstreamMetrics,
}

impl Dialer {
    /// Dials `target` at `addrs`, what its name resolved to at start; an
    /// error names the upstream.
    pub(super) fn new(
        target: UpstreamTarget,
        addrs: &[SocketAddr],
        connect_timeout: Duration,
        tls: Option<&'static ClientTls>,
        metrics: &'static UpstreamMetrics,
    ) -> Result<Self, UpstreamError> {
        if target.tls && tls.is_none() {
            return Err(UpstreamError::NoTls {
                authority: target.authority,
            });
        }
        let tls = tls.filter(|_| target.tls);
        Ok(Self {
            target,
            connect_timeout,
            addrs: RwLock::new(addrs.into()),
            next_addr: AtomicUsize::new(0),
            resolving: AtomicBool::new(false),
            tls,
            tls_failing: AtomicBool::new(false),
            metrics,
        })
    }

    /// Dials the upstream within the connect timeout and `deadline`.
    pub(super) async fn connect<R: Runtime>(
        &'static self,
        deadline: Instant,
    ) -> Result<UpstreamStream<R::Stream>, Outcome> {
        let connect_deadline = deadline.min(Instant::now() + self.connect_timeout);
        let addrs = self.addrs.read().unwrap_or_else(|e| e.into_inner()).clone();
        let first = self.next_addr.fetch_add(1, Ordering::Relaxed);
        let connected = connect_any::<R>(&addrs, first, connect_deadline).await;
        if connected.is_err() {
            self.re_resolve();
        }
        let stream = connected?;
        match self.tls {
            None => Ok(UpstreamStream::Plain(stream)),
            Some(tls) => self.handshake::<R>(tls, stream, connect_deadline).await,
        }
    }

    /// TLS over a connected stream, by `deadline`. A failure is the
    /// connect's (502; nothing was sent), counted, and logged as a warning
    /// when it starts: a certificate that does not verify fails every visit
    /// until it is fixed, and is never let through.
    async fn handshake<R: Runtime>(
        &self,
        tls: &ClientTls,
        stream: R::Stream,
        deadline: Instant,
    ) -> Result<UpstreamStream<R::Stream>, Outcome> {
        let outcome = match timeout_at::<R, _>(deadline, tls.connect(stream)).await {
            Ok(Ok(stream)) => {
                self.tls_failing.store(false, Ordering::Relaxed);
                return Ok(stream);
            }
            Ok(Err(error)) => {
                self.metrics.record_tls_failure();
                if self.tls_failing.swap(true, Ordering::Relaxed) {
                    tracing::debug!(upstream = %self.target.authority, %error, "upstream TLS handshake failed");
                } else {
                    tracing::warn!(upstream = %self.target.authority, %error, "upstream TLS handshake failed; visits fail with 502 until it succeeds");
                }
                Outcome::Failed
            }
            Err(Elapsed) => {
                self.metrics.record_tls_failure();
                tracing::debug!(upstream = %self.target.authority, "upstream TLS handshake timed out");
                Outcome::TimedOut
            }
        };
        Err(outcome)
    }

    /// Looks the upstream's name up again after a failed connect, on a
    /// plain thread (the resolver blocks), one lookup at a time. An IP
    /// literal needs none.
    fn re_resolve(&'static self) {
        if self.target.host.parse::<std::net::IpAddr>().is_ok()
            || self.resolving.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("gateway-resolve".to_owned())
            .spawn(move || {
                match self.target.resolve() {
                    Ok(addrs) => {
                        *self.addrs.write().unwrap_or_else(|e| e.into_inner()) = addrs.into();
                    }
                    Err(error) => {
                        tracing::warn!(host = ?self.target.host, %error, "upstream re-resolution failed");
                    }
                }
                self.resolving.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.resolving.store(false, Ordering::Release);
        }
    }
}

/// Connects to the first of `addrs`, taken in turn from `first`, that
/// accepts before `deadline`. A name can resolve to addresses the upstream
/// does not listen on (`localhost` to `::1` and `127.0.0.1`, with a counter
/// on one of them); a visit must not fail while another address would
/// do. A refusal moves on at once; an address that does not answer takes
/// what is left of the deadline.
async fn connect_any<R: Runtime>(
    addrs: &[SocketAddr],
    first: usize,
    deadline: Instant,
) -> Result<R::Stream, Outcome> {
    for i in 0..addrs.len() {
        let addr = addrs[first.wrapping_add(i) % addrs.len()];
        match timeout_at::<R, _>(deadline, R::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(error)) => tracing::debug!(%addr, %error, "upstream connect failed"),
            Err(Elapsed) => {
                tracing::debug!(%addr, "upstream connect timed out");
                return Err(Outcome::TimedOut);
            }
        }
    }
    Err(Outcome::Failed)
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener};
    use std::time::{Duration, Instant};

    use backends::{Backend, Named, OnRuntime, Runtime, Threading};

    use super::connect_any;
    use crate::outcome::Outcome;

    /// An address nothing listens on (bound, then let go).
    fn refusing() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
    }

    struct ConnectPastARefusal;

    impl OnRuntime for ConnectPastARefusal {
        type Output = ();
        fn run<R: Runtime>(self) {
            let listening = TcpListener::bind("127.0.0.1:0").unwrap();
            let open = listening.local_addr().unwrap();
            let closed = refusing();
            let (past, none) = R::block_on(1, Threading::Shared, async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                let past = connect_any::<R>(&[closed, open], 0, deadline).await;
                let none = connect_any::<R>(&[closed, closed], 1, deadline).await;
                (past.map(drop), none.map(drop))
            })
            .unwrap();
            assert_eq!(past, Ok(()), "{}", R::NAME);
            assert_eq!(none, Err(Outcome::Failed), "{}", R::NAME);
            // The connection made is the listener's.
            listening.set_nonblocking(true).unwrap();
            assert!(listening.accept().is_ok(), "{}", R::NAME);
        }
    }

    #[test]
    fn a_connect_moves_past_an_address_that_refuses() {
        for backend in Backend::ALL {
            backend.run(ConnectPastARefusal);
        }
    }
}
