//! The client's own rules, in process, against an upstream on a plain
//! thread over real local sockets: the one retry of a request that never
//! left, the late finish of a POST whose visitor is gone, and what the
//! batch sender's guard does when it is dropped mid-way. Each runs on
//! every backend.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backends::{Backend, Named, OnRuntime, Runtime, Threading};

use super::batch::Joined;
use super::{Upstream, UpstreamMetrics};
use crate::config::{UpstreamConfig, UpstreamTarget};
use crate::forever;
use crate::outcome::Outcome;
use crate::time::timeout_at;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

/// A client for the upstream at `addr`, for the rest of the test process.
fn client<R: Runtime>(
    addr: SocketAddr,
    batch_max: usize,
) -> (&'static Upstream<R>, &'static UpstreamMetrics) {
    let config = UpstreamConfig {
        url: format!("http://{addr}/count"),
        request_timeout_ms: 1000,
        batch_max,
        ..UpstreamConfig::default()
    };
    let metrics = forever(UpstreamMetrics::default());
    let target = UpstreamTarget::parse(&config.url).unwrap();
    let upstream = Upstream::<R>::new(&config, &target, &[addr], 1, None, metrics).unwrap();
    (forever(upstream), metrics)
}

/// Reads one request, head and `content-length` body, off `socket`; false
/// if the connection closed first.
fn read_request(socket: &mut TcpStream) -> bool {
    let mut request = Vec::new();
    let mut byte = [0];
    while !request.ends_with(b"\r\n\r\n") {
        match socket.read(&mut byte) {
            Ok(1) => request.push(byte[0]),
            _ => return false,
        }
    }
    let head = String::from_utf8_lossy(&request).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    socket.read_exact(&mut body).is_ok()
}

/// Whether another connection is waiting to be accepted on `listener`.
fn dialled_again(listener: &TcpListener) -> bool {
    listener.set_nonblocking(true).unwrap();
    listener.accept().is_ok()
}

/// Waits for `probe` to hold, on the runtime, for up to five seconds.
async fn until<R: Runtime>(probe: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !probe() {
        if Instant::now() > deadline {
            return false;
        }
        R::sleep_until(Instant::now() + Duration::from_millis(10)).await;
    }
    true
}

fn on_every_backend(test: impl OnRuntime<Output = ()> + Clone) {
    for backend in Backend::ALL {
        backend.run(test.clone());
    }
}

/// A pooled connection the upstream closed while it was idle is found
/// closed before a byte of the next request leaves: the request goes out
/// once more, on a fresh connection, and is counted.
#[derive(Clone)]
struct RetriedOnceOnAFreshConnection;

impl OnRuntime for RetriedOnceOnAFreshConnection {
    type Output = ();
    fn run<R: Runtime>(self) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (upstream, _) = client::<R>(listener.local_addr().unwrap(), 1);
        let (closed, first_closed) = mpsc::channel();
        let counter = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            assert!(read_request(&mut first));
            first.write_all(OK).unwrap();
            drop(first);
            closed.send(()).unwrap();
            let (mut second, _) = listener.accept().unwrap();
            assert!(read_request(&mut second));
            second.write_all(OK).unwrap();
            dialled_again(&listener)
        });
        let outcomes = R::block_on(1, Threading::Shared, async move {
            let visit =
                || upstream.visit_request(&Default::default(), "10.0.0.1:1".parse().unwrap());
            let first = upstream.register_visit(visit(), Instant::now()).await;
            first_closed.recv().unwrap();
            // The close reaches the pooled connection's socket.
            R::sleep_until(Instant::now() + Duration::from_millis(50)).await;
            let second = upstream.register_visit(visit(), Instant::now()).await;
            (first, second)
        })
        .unwrap();
        assert_eq!(
            outcomes,
            (Outcome::Counted, Outcome::Counted),
            "{}",
            R::NAME
        );
        assert!(!counter.join().unwrap(), "{}: one retry, no more", R::NAME);
    }
}

#[test]
fn a_request_found_unsent_on_a_pooled_connection_is_retried_once_on_a_fresh_one() {
    on_every_backend(RetriedOnceOnAFreshConnection);
}

/// A pooled connection that takes the request and then closes without an
/// answer may have had the visit counted: the visit fails (502), and the
/// request is not sent again.
#[derive(Clone)]
struct NotRetriedOnceSent;

impl OnRuntime for NotRetriedOnceSent {
    type Output = ();
    fn run<R: Runtime>(self) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (upstream, _) = client::<R>(listener.local_addr().unwrap(), 1);
        let (done, visits_done) = mpsc::channel::<()>();
        let counter = std::thread::spawn(move || {
            let (mut connection, _) = listener.accept().unwrap();
            assert!(read_request(&mut connection));
            connection.write_all(OK).unwrap();
            assert!(read_request(&mut connection));
            drop(connection);
            let _ = visits_done.recv();
            dialled_again(&listener)
        });
        let outcomes = R::block_on(1, Threading::Shared, async move {
            let visit =
                || upstream.visit_request(&Default::default(), "10.0.0.1:1".parse().unwrap());
            let first = upstream.register_visit(visit(), Instant::now()).await;
            let second = upstream.register_visit(visit(), Instant::now()).await;
            (first, second)
        })
        .unwrap();
        done.send(()).unwrap();
        assert_eq!(outcomes, (Outcome::Counted, Outcome::Failed), "{}", R::NAME);
        assert!(!counter.join().unwrap(), "{}: sent once only", R::NAME);
    }
}

#[test]
fn a_request_that_may_have_left_is_not_sent_again() {
    on_every_backend(NotRetriedOnceSent);
}

/// A visit dropped while its POST is out (its client reset the connection)
/// does not abandon the POST: it is finished in the background, recorded
/// as counted, and its connection goes back to the pool for the next.
#[derive(Clone)]
struct LatePostFinished;

impl OnRuntime for LatePostFinished {
    type Output = ();
    fn run<R: Runtime>(self) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (upstream, metrics) = client::<R>(listener.local_addr().unwrap(), 1);
        let (received, request_in) = mpsc::channel();
        let (dropped, visit_dropped) = mpsc::channel::<()>();
        let counter = std::thread::spawn(move || {
            let (mut connection, _) = listener.accept().unwrap();
            assert!(read_request(&mut connection));
            received.send(()).unwrap();
            let _ = visit_dropped.recv();
            connection.write_all(OK).unwrap();
            // The next visit comes on the same connection.
            assert!(read_request(&mut connection));
            connection.write_all(OK).unwrap();
            dialled_again(&listener)
        });
        let (finished, next) = R::block_on(1, Threading::Shared, async move {
            let visit =
                || upstream.visit_request(&Default::default(), "10.0.0.1:1".parse().unwrap());
            let first = upstream.register_visit(visit(), Instant::now());
            // Dropped once the POST is out: the visitor is gone.
            let request_in = move || request_in.try_recv().is_ok();
            let gone = futures_lite::future::or(async { Some(first.await) }, async move {
                until::<R>(request_in).await;
                None
            })
            .await;
            assert_eq!(gone, None, "the visit was dropped unanswered");
            dropped.send(()).unwrap();
            let finished = until::<R>(|| metrics.posts(Outcome::Counted) == 1).await;
            let next = upstream.register_visit(visit(), Instant::now()).await;
            (finished, next)
        })
        .unwrap();
        assert!(finished, "{}: the POST was finished and recorded", R::NAME);
        assert_eq!(metrics.visits(Outcome::Counted), 2, "{}", R::NAME);
        assert_eq!(next, Outcome::Counted, "{}", R::NAME);
        assert!(
            !counter.join().unwrap(),
            "{}: the connection was kept",
            R::NAME
        );
    }
}

#[test]
fn a_post_whose_visitor_left_is_finished_and_recorded() {
    on_every_backend(LatePostFinished);
}

/// A POST answered after its visit's deadline (504) runs on for another
/// `request_timeout`: its connection goes back to the pool for the next
/// visit, and the POST is recorded once, as the timeout it was answered.
#[derive(Clone)]
struct TimedOutPostFinished;

impl OnRuntime for TimedOutPostFinished {
    type Output = ();
    fn run<R: Runtime>(self) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (upstream, metrics) = client::<R>(listener.local_addr().unwrap(), 1);
        let counter = std::thread::spawn(move || {
            let (mut connection, _) = listener.accept().unwrap();
            assert!(read_request(&mut connection));
            // Past the visit's deadline (`request_timeout_ms`, 1000).
            std::thread::sleep(Duration::from_millis(1400));
            connection.write_all(OK).unwrap();
            assert!(read_request(&mut connection));
            connection.write_all(OK).unwrap();
            dialled_again(&listener)
        });
        let (late, next) = R::block_on(1, Threading::Shared, async move {
            let visit =
                || upstream.visit_request(&Default::default(), "10.0.0.1:1".parse().unwrap());
            let late = upstream.register_visit(visit(), Instant::now()).await;
            // The late answer arrives meanwhile.
            R::sleep_until(Instant::now() + Duration::from_millis(900)).await;
            let next = upstream.register_visit(visit(), Instant::now()).await;
            (late, next)
        })
        .unwrap();
        assert_eq!(
            (late, next),
            (Outcome::TimedOut, Outcome::Counted),
            "{}",
            R::NAME
        );
        assert_eq!(metrics.posts(Outcome::TimedOut), 1, "{}", R::NAME);
        assert_eq!(
            metrics.posts(Outcome::Counted),
            1,
            "{}: the next only",
            R::NAME
        );
        assert!(
            !counter.join().unwrap(),
            "{}: the connection was kept",
            R::NAME
        );
    }
}

#[test]
fn a_post_answered_past_its_deadline_keeps_its_connection_and_is_recorded_once() {
    on_every_backend(TimedOutPostFinished);
}

/// A batch's sender stopped while its POST is out (its task dropped, as a
/// runtime shutting down drops it): its guard answers the batch's visitors
/// 504 and puts the waiting batch on a new sender, which sends it.
#[derive(Clone)]
struct StoppedSenderHandsOn;

impl OnRuntime for StoppedSenderHandsOn {
    type Output = ();
    fn run<R: Runtime>(self) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (upstream, _) = client::<R>(listener.local_addr().unwrap(), 8);
        let (posted, post_seen) = std::sync::mpsc::channel();
        let counter = std::thread::spawn(move || {
            // The stopped sender's POST: read, and answered only after the
            // batch handed on has been, on a connection of its own.
            let (mut first, _) = listener.accept().unwrap();
            assert!(read_request(&mut first));
            posted.send(()).unwrap();
            let (mut second, _) = listener.accept().unwrap();
            assert!(read_request(&mut second));
            second.write_all(OK).unwrap();
            first.write_all(OK).unwrap();
        });
        let (stopped, waited) = R::block_on(1, Threading::Shared, async move {
            let batcher = upstream.batcher.as_ref().unwrap();
            let visit =
                || upstream.visit_request(&Default::default(), "10.0.0.1:1".parse().unwrap());
            // Two POSTs in flight (one worker): the third visit waits.
            let mut in_flight = Vec::new();
            for _ in 0..2 {
                match batcher.join(visit(), Instant::now()) {
                    Joined::Send(batch, ticket) => in_flight.push((batch, ticket)),
                    Joined::Wait(_) => panic!("expected to be sent at once"),
                }
            }
            let Joined::Wait(mut waiting) = batcher.join(visit(), Instant::now()) else {
                panic!("expected to wait");
            };
            let (batch, mut ticket) = in_flight.remove(0);
            let until_posted = async move {
                while post_seen.try_recv().is_err() {
                    R::sleep_until(Instant::now() + Duration::from_millis(5)).await;
                }
            };
            futures_lite::future::or(
                // The sender, dropped with this future once the POST is out.
                async move {
                    upstream.send_batches(batcher, batch).await;
                    panic!("the sender ended before its POST was answered");
                },
                until_posted,
            )
            .await;
            let deadline = Instant::now() + Duration::from_secs(5);
            let stopped = timeout_at::<R, _>(deadline, ticket.outcome()).await;
            let waited = timeout_at::<R, _>(deadline, waiting.outcome()).await;
            (stopped, waited)
        })
        .unwrap();
        assert_eq!(stopped, Ok(Outcome::TimedOut), "{}", R::NAME);
        assert_eq!(waited, Ok(Outcome::Counted), "{}: sent anew", R::NAME);
        counter.join().unwrap();
    }
}

#[test]
fn a_stopped_batch_sender_answers_its_visits_and_hands_the_next_batch_on() {
    on_every_backend(StoppedSenderHandsOn);
}
